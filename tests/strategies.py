"""Shared Hypothesis strategies."""

from __future__ import annotations

from hypothesis import strategies as st

import vmqapi

# Text the grammar must carry through: '=', '+', '#', '%', '&', spaces, unicode.
SPECIALS = "=+#%&/?;~ -_.:@"
value_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00") | st.sampled_from(SPECIALS),
    min_size=1, max_size=20)
name_text = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,15}", fullmatch=True)
word = st.text(alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from(SPECIALS),
               min_size=1, max_size=12)

long_flag = st.tuples(name_text.map(lambda n: "--" + n), st.none() | value_text | st.just(""))
short_flag = st.tuples(st.sampled_from("abcdefghijklmnopqrstuvwxyz").map(lambda c: "-" + c),
                       st.none() | st.just("") | value_text.filter(lambda v: not v.startswith("=")))
argv = st.builds(
    vmqapi.Argv,
    words=st.lists(word, max_size=4).map(tuple),
    args=st.lists(st.tuples(name_text, value_text), max_size=5).map(tuple),
    flags=st.lists(long_flag | short_flag, max_size=5).map(tuple),
)

# -- MQTT --------------------------------------------------------------------------

mqtt_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
topic_name = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#/"),
                              max_size=6), min_size=1, max_size=5).map("/".join).filter(bool)
topic_filter = st.lists(st.sampled_from(["a", "b", "+", "$SYS", "", "c d"]), min_size=1, max_size=4).map(
    lambda levels: "/".join(levels)) | st.lists(st.sampled_from(["a", "b", "+", ""]), max_size=3).map(
    lambda levels: "/".join(levels + ["#"]))
pid = st.integers(1, 65535)
payload = st.binary(max_size=64)


@st.composite
def connects(draw):
    will = draw(st.booleans())
    username = draw(st.none() | mqtt_text)
    return vmqapi.Connect(
        client_id=draw(mqtt_text), proto_level=draw(st.sampled_from([3, 4])), clean_session=draw(st.booleans()),
        keepalive=draw(st.integers(0, 65535)), username=username,
        password=draw(st.none() | payload) if username is not None else None,
        will_topic=draw(topic_name) if will else None, will_payload=draw(payload) if will else b"",
        will_qos=draw(st.integers(0, 2)) if will else 0, will_retain=draw(st.booleans()) if will else False)


@st.composite
def publishes(draw):
    qos = draw(st.integers(0, 2))
    return vmqapi.Publish(draw(topic_name), draw(payload), qos, draw(st.booleans()),
                          draw(st.booleans()) if qos else False, draw(pid) if qos else None)


packets = st.one_of(
    connects(), publishes(),
    st.builds(vmqapi.Connack, st.integers(0, 5), st.booleans()),
    st.builds(vmqapi.Puback, pid), st.builds(vmqapi.Pubrec, pid), st.builds(vmqapi.Pubrel, pid),
    st.builds(vmqapi.Pubcomp, pid), st.builds(vmqapi.Unsuback, pid),
    st.builds(vmqapi.Subscribe, pid, st.lists(st.tuples(mqtt_text, st.integers(0, 2)), min_size=1, max_size=4)
              .map(tuple)),
    st.builds(vmqapi.Suback, pid, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=4).map(tuple)),
    st.builds(vmqapi.Unsubscribe, pid, st.lists(mqtt_text, min_size=1, max_size=4).map(tuple)),
    st.just(vmqapi.Pingreq()), st.just(vmqapi.Pingresp()), st.just(vmqapi.Disconnect()),
)
