"""vmq_acl: filter coverage, ids that hold wildcards, bad files, hook refusals (unit and over MQTT)."""

from __future__ import annotations

import itertools
import logging
import os
import time

import pytest
from hypothesis import example, given, settings, strategies as st

from mqtt_client import MqttClient
from test_broker import client_maker, mqtt_port
from test_topics import naive_match
from conftest import password_file
import vmqapi


# -- a brute-force model ---------------------------------------------------

LEVELS = ["a", "b", "$s", ""]  # literal levels filters are made of ("$s": a $ level at the top)
IDS = ["a", "b", "+", "#", "a/b", "victim/x", "b+"]


def literals(*texts):
    """Every literal level of ``texts``, plus one no filter names (what a "+" may also match)."""
    found = {level for text in texts if text is not None for level in text.split("/")}
    return sorted((found - {"+", "#"}) | {"fresh"})


def enumerate_topics(alphabet, depth):
    """Every topic name of 1..depth levels over ``alphabet``."""
    for n in range(1, depth + 1):
        for levels in itertools.product(alphabet, repeat=n):
            yield "/".join(levels)


def depth_of(*texts):
    return max(len(t.split("/")) for t in texts if t is not None) + 1


def pattern_matches(pattern, topic, subst):
    """Match a vmq_acl pattern as the words say: a substituted level equals the id, literally.

    A topic level never holds "+", "#" or "/", so an id holding one matches no topic.
    """
    p, t = pattern.split("/"), topic.split("/")
    if topic.startswith("$") and p[0] in ("+", "#"):
        return False
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i == len(t):
            return False
        if level in subst:
            if subst[level] is None or subst[level] != t[i]:
                return False
        elif level not in ("+", t[i]):
            return False
    return len(p) == len(t)


def topic_granted(grants, patterns, topic, user, client_id):
    """Model: may ``topic`` be read, by brute force over the naive matcher."""
    subst = {"%u": user, "%c": client_id, "%m": ""}
    return any(naive_match(g, topic) for g in grants) or any(pattern_matches(p, topic, subst) for p in patterns)


def topic_filter(allow_placeholders=False):
    """A valid filter of up to 3 levels over LEVELS ("#" only last), maybe with %c / %u levels."""
    level = st.sampled_from(LEVELS + ["+"] + (["%c", "%u"] if allow_placeholders else []))
    return st.tuples(st.lists(level, min_size=1, max_size=3), st.booleans()).map(
        lambda t: "/".join(t[0] + ["#"]) if t[1] else "/".join(t[0])).filter(bool)


# -- filter within filter ----------------------------------------------------

@given(topic_filter(), topic_filter())
@example("sensors/+", "sensors/#")
@example("#", "$s/a")
@example("+/#", "$s")
@example("a/#", "a")
def test_filter_covers_agrees_with_brute_force(granted, wanted):
    alphabet = literals(granted, wanted)
    expected = all(naive_match(granted, t) for t in enumerate_topics(alphabet, depth_of(granted, wanted))
                   if naive_match(wanted, t))
    assert vmqapi.filter_covers(granted, wanted) == expected


@settings(deadline=None)
@given(st.lists(topic_filter(), max_size=3), st.lists(topic_filter(True), max_size=3), topic_filter(),
       st.sampled_from(IDS), st.sampled_from(IDS + [None]))
@example([], ["inbox/%c"], "inbox/+", "+", None)
@example([], ["clients/%c/#"], "clients/#", "#", None)
@example([], ["clients/%c/#"], "clients/victim/#", "victim/x", None)
@example(["sensors/+"], [], "sensors/#", "a", None)
def test_subscription_granted_only_if_every_topic_it_matches_is(grants, patterns, sub, client_id, user):
    text = "".join(f"topic read {g}\n" for g in grants) + "".join(f"pattern read {p}\n" for p in patterns)
    rules = vmqapi.parse_acl(text)
    allowed = vmqapi.acl_allows(rules, "read", sub, user, client_id, "")
    ids = [client_id, user]
    alphabet = literals(sub, *grants, *patterns, *ids)
    topics = [t for t in enumerate_topics(alphabet, depth_of(sub, *grants, *patterns, *ids)) if naive_match(sub, t)]
    if allowed:
        assert all(topic_granted(grants, patterns, t, user, client_id) for t in topics)
    # one grant that covers the whole subscription is enough (the other direction of "filter within filter")
    for g in grants:
        if all(naive_match(g, t) for t in topics):
            assert allowed


@given(st.lists(topic_filter(True), max_size=3), st.sampled_from(IDS), st.sampled_from(IDS + [None]),
       st.lists(st.sampled_from(LEVELS[:3] + ["victim", "x"]), min_size=1, max_size=4).map("/".join))
def test_publish_granted_exactly_when_the_model_grants(patterns, client_id, user, topic):
    rules = vmqapi.parse_acl("".join(f"pattern write {p}\n" for p in patterns))
    assert vmqapi.acl_allows(rules, "write", topic, user, client_id, "") == \
        topic_granted([], patterns, topic, user, client_id)


# -- over MQTT ----------------------------------------------------------------

@pytest.fixture
def acl_node(make_node, tmp_path):
    """A node whose ACL lets each client read its own inbox and read/write below clients/<id>/."""
    def make(text, **extra):
        acl = tmp_path / "vmq.acl"
        acl.write_text(text)
        return make_node(**{"vmq_acl.acl_file": str(acl), **extra}), acl
    return make


def test_client_ids_with_wildcards_do_not_widen_patterns(acl_node, caplog):
    node, _ = acl_node("pattern read inbox/%c\npattern clients/%c/#\n")
    caplog.set_level(logging.WARNING, logger="vmqapi")
    with client_maker(node) as connect:
        victim = connect("victim")
        assert victim.subscribe(("inbox/victim", 0), ("clients/victim/#", 0)) == (0, 0)
        plus = connect("+")
        assert plus.subscribe(("inbox/+", 0)) == (0x80,)
        assert plus.subscribe(("inbox/#", 0), ("clients/+/#", 0)) == (0x80, 0x80)
        hash_ = connect("#")
        assert hash_.subscribe(("clients/#", 0)) == (0x80,)
        hash_.publish("clients/victim/cmd", b"from #", 1)
        slash = connect("victim/x")
        slash.publish("clients/victim/x/cmd", b"from victim/x", 1)
        assert slash.subscribe(("clients/victim/x/#", 0)) == (0x80,)
        other = connect("other")
        other.publish("inbox/victim", b"mail", 1)  # nobody may write there
        victim.publish("clients/victim/self", b"own", 1)
        assert victim.message().payload == b"own"
        victim.no_message()
    warned = [r.getMessage() for r in caplog.records if "patterns do not apply" in r.getMessage()]
    assert len(warned) == 3, warned  # once per client, though "+" asked three times
    assert any("'+'" in w and "contains +" in w for w in warned)
    assert any("'victim/x'" in w and "contains /" in w for w in warned)


@pytest.mark.parametrize("version, refused", [(4, 0x80), (5, 0x87)])
def test_subscription_wider_than_the_grant_is_refused(acl_node, version, refused):
    node, _ = acl_node("topic read sensors/+\ntopic write sensors/#\n")
    with client_maker(node, default_version=version) as connect:
        sub = connect("reader")
        assert sub.subscribe(("sensors/#", 0), ("sensors/+/private", 0), ("sensors/room1", 0)) == \
            (refused, refused, 0)
        connect("writer").publish("sensors/room1/private", b"secret", 1)
        connect("writer2").publish("sensors/room1", b"public", 1)
        assert sub.message().payload == b"public"
        sub.no_message()
    assert node.metrics.value("mqtt_subscribe_auth_error") == 2


def test_a_bad_acl_line_stops_the_start(tmp_path):
    acl = tmp_path / "vmq.acl"
    acl.write_text("topic read public/#\ntopci write secret/#\n")
    config = {"data_dir": str(tmp_path / "d"), "listener.http.default": "127.0.0.1:0",
              "listener.tcp.default": "127.0.0.1:0", "vmq_acl.acl_file": str(acl)}
    node = vmqapi.Node(config)
    with pytest.raises(vmqapi.ConfigError, match=r"vmq\.acl: line 2: expected topic, user or pattern"):
        node.start()
    node.stop()
    acl.write_text("topic read public/a+b\n")  # a filter that is not one is not skipped either
    with pytest.raises(vmqapi.ConfigError, match="line 1: invalid topic filter"):
        vmqapi.Node(config).start()
    missing = dict(config, **{"vmq_acl.acl_file": str(tmp_path / "nowhere.acl")})
    with pytest.raises(vmqapi.ConfigError, match="cannot read it"):
        vmqapi.Node(missing).start()


def test_a_bad_acl_reload_keeps_the_previous_rules(acl_node):
    node, acl = acl_node("topic read public/#\n", **{"vmq_acl.acl_reload_interval": "1"})
    with client_maker(node) as connect:
        c = connect("c")
        assert c.subscribe(("public/x", 0), ("private/x", 0)) == (0, 0x80)
        acl.write_text("garbage that grants nothing\ntopic read #\n")
        os.utime(acl, ns=(time.time_ns(), time.time_ns() + 10**9))
        deadline = time.monotonic() + 10
        while node.metrics.value("acl_reload_error") == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            assert c.subscribe(("private/x", 0), ("public/y", 0)) == (0x80, 0)  # still the old rules
        assert node.metrics.value("acl_reload_error") == 1
        time.sleep(1.1)
        assert c.subscribe(("private/x", 0), ("public/y", 0)) == (0x80, 0)
        assert node.metrics.value("acl_reload_error") == 1  # one bad version, counted once


def test_a_configured_acl_that_never_loaded_refuses(make_node, tmp_path):
    node = make_node()
    bad = tmp_path / "bad.acl"
    bad.write_text("nonsense\n")
    node.apply_settings({"vmq_acl.acl_file": str(bad)})
    with client_maker(node) as connect:
        assert connect("c").subscribe(("any/x", 0)) == (0x80,)
    assert node.metrics.value("acl_reload_error") == 1


@pytest.mark.parametrize("answer, v4, v5", [(128, 0x80, 0x80), (0x87, 0x80, 0x87), (0x97, 0x80, 0x97),
                                            (7, 0x80, 0x80)])
def test_auth_on_subscribe_refusal_codes(node, answer, v4, v5):
    node.hooks.register("auth_on_subscribe", lambda user, sid, topics: [
        (t, answer if t.startswith("no/") else q) for t, q in topics], plugin="refuser")
    for version, expected in ((4, v4), (5, v5)):
        with client_maker(node, default_version=version) as connect:
            assert connect(f"c{version}").subscribe(("no/x", 1), ("yes/x", 1)) == (expected, 1)


@pytest.mark.parametrize("version, refused", [(4, 5), (5, 0x87)])
def test_a_will_is_authorized_like_a_publish(acl_node, version, refused):
    node, _ = acl_node("pattern clients/%c/#\n")
    c = MqttClient(mqtt_port(node), version=version)
    try:  # a will into another client's topics would go out when the connection drops
        ack = c.connect("attacker", will_topic="clients/victim/cmd", will_payload=b"x", will_retain=True)
        assert ack.return_code == refused and c.closed(2)
    finally:
        c.close()
    with client_maker(node, default_version=version) as connect:
        connect("ok", will_topic="clients/ok/gone", will_payload=b"bye")  # its own topic is fine
    assert node.metrics.value("mqtt_publish_auth_error") == 1


def test_rule_files_with_windows_line_ends_and_extra_spaces_mean_the_same():
    rules = vmqapi.parse_acl("user alice\r\ntopic  read  sensors/+\r\n")
    assert rules.users == {"alice": (("read", "sensors/+"),)}
    assert vmqapi.parse_passwd("u:" + vmqapi.hash_password("p") + "\r\n").keys() == {"u"}


def test_a_password_file_swapped_for_a_fifo_never_freezes_the_broker(tmp_path):
    """README (files): the reload read whatever the path named, in the broker's loop: a FIFO froze every
    client. Now it is refused and logged, the rules read before stay, and the loop goes on."""
    from capped import capped_node
    passwd = password_file(tmp_path / "passwd", u="p")
    with capped_node(tmp_path / "n", f"vmq_passwd.password_file={passwd}", "allow_anonymous=off",
                     "vmq_passwd.password_reload_interval=1") as node:
        def connect(name):
            c = MqttClient(node.port("mqtt"), timeout=3)
            try:
                return c.connect(name, username="u", password=b"p").return_code
            finally:
                c.close()
        assert connect("before") == 0
        passwd.unlink()
        os.mkfifo(passwd, 0o600)
        time.sleep(1.2)  # the next reload looks at it
        assert [connect(f"after{n}") for n in range(3)] == [0, 0, 0]  # the rules read before still hold
        assert "is a FIFO, not a regular file" in node.log()
