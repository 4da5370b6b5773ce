"""MQTT codec: round trips, prefixes, byte-at-a-time feeding, arbitrary bytes."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import example, given, settings, strategies as st

import strategies
import vmqapi
from vmqapi import MalformedPacket


def decode_stream(data, chunks):
    """Feed ``data`` in pieces as a connection would; return the packets."""
    out, buf = [], b""
    for piece in chunks(data):
        buf += piece
        pos = 0
        while True:
            result = vmqapi.decode_packet(buf, pos)
            if result is None:
                break
            packet, pos = result
            out.append(packet)
        buf = buf[pos:]
    assert buf == b""
    return out


@given(strategies.packets)
def test_decode_inverts_encode(packet):
    data = vmqapi.encode_packet(packet)
    assert vmqapi.decode_packet(data) == (packet, len(data))


@given(strategies.packets)
def test_every_proper_prefix_needs_more(packet):
    data = vmqapi.encode_packet(packet)
    for n in range(len(data)):
        assert vmqapi.decode_packet(data[:n]) is None


@given(st.lists(strategies.packets, max_size=6))
def test_byte_at_a_time_gives_the_same_packets(packets):
    data = b"".join(vmqapi.encode_packet(p) for p in packets)
    assert decode_stream(data, lambda d: (d[i:i + 1] for i in range(len(d)))) == packets
    assert decode_stream(data, lambda d: [d]) == packets


@settings(max_examples=500)
@given(st.binary(max_size=200))
@example(b"\x30\xff\xff\xff\xff\x01")
@example(b"\x00\x00")
@example(b"\xf0\x00")
def test_arbitrary_bytes_give_packets_or_our_error(data):
    pos = 0
    try:
        while True:
            result = vmqapi.decode_packet(data, pos)
            if result is None:
                return
            _, pos = result
    except MalformedPacket:
        pass


@pytest.mark.parametrize("data, reason", [
    (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
    (b"\x38\x03\x00\x01a", "DUP"),
    (b"\x30\x03\x00\x01#", "wildcard"),
    (b"\x32\x05\x00\x01a\x00\x00", "identifier 0"),
    (b"\x30\x04\x00\x02\xc3\x28", "UTF-8"),
    (b"\x30\x03\x00\x01\x00", "U+0000"),
    (b"\x82\x05\x00\x01\x00\x01a", "requested QoS"),
    (b"\x80\x06\x00\x01\x00\x01a\x00", "reserved flags"),
    (b"\x82\x02\x00\x01", "without a topic"),
    (b"\xa2\x02\x00\x01", "without a topic"),
    (b"\x62\x02\x00\x01", None),
    (b"\x60\x02\x00\x01", "reserved flags"),
    (b"\xc0\x01\x00", "has a body"),
    (b"\x10\x0c\x00\x04MQTT\x04\x01\x00\x00\x00\x00", "reserved flag"),
    (b"\x10\x0c\x00\x04MQTT\x04\x40\x00\x00\x00\x00", "password without user"),
    (b"\x10\x0c\x00\x04MQTT\x04\x18\x00\x00\x00\x00", "will QoS"),
    (b"\x10\x0c\x00\x04HTTP\x04\x02\x00\x00\x00\x00", "protocol name"),
    (b"\x30\xff\xff\xff\xff\x01", "four bytes"),
    (b"\x10\x11\x00\x04MQTT\x04\x06\x00\x00\x00\x00\x00\x01#\x00\x00", "will topic"),
])
def test_violations_are_refused(data, reason):
    if reason is None:
        assert vmqapi.decode_packet(data)[0] == vmqapi.Pubrel(1)
        return
    with pytest.raises(MalformedPacket, match=re.escape(reason)):
        vmqapi.decode_packet(data)


def test_unknown_protocol_level_is_decoded_for_connack_1():
    packet, _ = vmqapi.decode_packet(b"\x10\x0c\x00\x04MQTT\x06\x02\x00\x00\x00\x00")
    assert packet.proto_level == 6


def test_max_size_refuses_before_the_body_arrives():
    header = vmqapi.encode_publish_header(b"\x00\x01a", 1000, 0, False, False, None)
    with pytest.raises(MalformedPacket, match="max_message_size"):
        vmqapi.decode_packet(header, 0, max_size=100)


def test_mqtt31_connect():
    packet = vmqapi.Connect("c", proto_level=3)
    data = vmqapi.encode_packet(packet)
    assert data[4:10] == b"MQIsdp" and vmqapi.decode_packet(data)[0] == packet


# -- MQTT 5 properties ---------------------------------------------------------------------

def property_value(kind):
    return {"byte": st.integers(0, 255), "u16": st.integers(0, 65535), "u32": st.integers(0, 2**32 - 1),
            "varint": st.integers(1, 268_435_455), "str": strategies.mqtt_text, "bin": strategies.payload,
            "pair": st.tuples(strategies.mqtt_text, strategies.mqtt_text)}[kind]


@st.composite
def property_lists(draw):
    names = draw(st.lists(st.sampled_from(sorted(vmqapi.PROPERTY_IDS)), max_size=8))
    seen, props = set(), []
    for name in names:
        if name in seen and name not in vmqapi.REPEATABLE_PROPERTIES:
            continue
        seen.add(name)
        props.append((name, draw(property_value(vmqapi.PROPERTY_IDS[name][1]))))
    return tuple(props)


@given(property_lists())
def test_properties_round_trip(props):
    data = vmqapi.encode_properties(props)
    assert vmqapi.decode_properties(data, 0, len(data)) == (props, len(data))
    for n in range(len(data)):  # a cut list is refused, never misread
        with pytest.raises(MalformedPacket):
            vmqapi.decode_properties(data[:n], 0, n)


def test_property_errors_carry_reason_codes():
    unknown = b"\x02\x7f\x00"
    with pytest.raises(MalformedPacket) as info:
        vmqapi.decode_properties(unknown, 0, len(unknown))
    assert info.value.reason_code == 0x81
    twice = vmqapi.encode_properties([("content_type", "a")])[1:] * 2
    twice = bytes((len(twice),)) + twice
    with pytest.raises(vmqapi.ProtocolError) as info:
        vmqapi.decode_properties(twice, 0, len(twice))
    assert info.value.reason_code == 0x82
    users = vmqapi.encode_properties([("user_property", ("a", "1")), ("user_property", ("a", "2"))])
    assert len(vmqapi.decode_properties(users, 0, len(users))[0]) == 2
    topic_alias = vmqapi.encode_properties([("topic_alias", 3)])
    with pytest.raises(vmqapi.ProtocolError, match="not allowed"):
        vmqapi.decode_properties(topic_alias, 0, len(topic_alias), frozenset({"user_property"}))
    zero_id = b"\x02\x0b\x00"
    with pytest.raises(vmqapi.ProtocolError):
        vmqapi.decode_properties(zero_id, 0, len(zero_id))


def empty_user_properties(n):
    """A property list of ``n`` empty user properties (5 bytes each): the cheapest to send, costly to read."""
    body = b"\x26\x00\x00\x00\x00" * n
    return vmqapi.encode_length(len(body)) + body


def test_decoding_stops_at_the_property_limit():
    data = empty_user_properties(129)
    assert len(vmqapi.decode_properties(data, 0, len(data), limit=129)[0]) == 129
    with pytest.raises(vmqapi.PacketLimitExceeded) as info:
        vmqapi.decode_properties(data, 0, len(data), limit=128)
    assert info.value.reason_code == 0x95 and info.value.metric == "mqtt_packet_limit_error"
    huge = empty_user_properties(1_000_000)  # refused after reading 129 of them, not a million
    started = time.perf_counter()
    with pytest.raises(vmqapi.PacketLimitExceeded):
        vmqapi.decode_properties(huge, 0, len(huge), limit=128)
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize("kind", ["publish", "subscribe", "unsubscribe", "puback", "disconnect", "auth"])
def test_every_mqtt5_packet_with_properties_obeys_the_limit(kind):
    user = tuple(("user_property", ("k", str(n))) for n in range(5))
    packet = {"publish": vmqapi.Publish("t", b"x", properties=user),
              "subscribe": vmqapi.Subscribe(1, (("a", 0),), user), "unsubscribe": vmqapi.Unsubscribe(1, ("a",), user),
              "puback": vmqapi.Puback(1, 0x10, user), "disconnect": vmqapi.Disconnect(0, user),
              "auth": vmqapi.Auth(0x18, (("authentication_method", "m"),) + user)}[kind]
    data = vmqapi.encode_packet(packet, 5)
    needed = len(packet.properties)
    assert vmqapi.decode_packet(data, 0, 0, 5, vmqapi.Limits(properties=needed))[0] == packet
    with pytest.raises(vmqapi.PacketLimitExceeded):
        vmqapi.decode_packet(data, 0, 0, 5, vmqapi.Limits(properties=needed - 1))


def test_a_connect_counts_its_own_and_its_will_properties_together_and_names_its_level():
    connect = vmqapi.Connect("c", 5, properties=(("user_property", ("a", "1")),) * 3, will_topic="w",
                             will_properties=(("user_property", ("b", "2")),) * 3)
    data = vmqapi.encode_packet(connect)
    assert vmqapi.decode_packet(data, 0, 0, 4, vmqapi.Limits(properties=6))[0] == connect
    with pytest.raises(vmqapi.PacketLimitExceeded) as info:
        vmqapi.decode_packet(data, 0, 0, 4, vmqapi.Limits(properties=5))
    assert info.value.proto_level == 5  # so the node can answer CONNACK 0x95


@pytest.mark.parametrize("version", [4, 5])
def test_subscribe_and_unsubscribe_stop_at_the_topic_filter_limit(version):
    for packet in (vmqapi.Subscribe(1, tuple((f"t/{n}", 0) for n in range(4))),
                   vmqapi.Unsubscribe(1, tuple(f"t/{n}" for n in range(4)))):
        data = vmqapi.encode_packet(packet, version)
        assert vmqapi.decode_packet(data, 0, 0, version, vmqapi.Limits(topics=4))[0] == packet
        with pytest.raises(vmqapi.PacketLimitExceeded, match="max_subscriptions_per_client"):
            vmqapi.decode_packet(data, 0, 0, version, vmqapi.Limits(topics=3))


# -- MQTT 5 packets ------------------------------------------------------------------------

def props_for(allowed):
    return property_lists().map(lambda props: tuple(p for p in props if p[0] in allowed))


A = vmqapi.ALLOWED_PROPERTIES
reason = st.integers(0, 255)


@st.composite
def publishes5(draw):
    qos = draw(st.integers(0, 2))
    props = draw(props_for(A["publish"]))
    return vmqapi.Publish(draw(strategies.topic_name), draw(strategies.payload), qos, draw(st.booleans()),
                          draw(st.booleans()) if qos else False, draw(strategies.pid) if qos else None, props)


@st.composite
def connects5(draw):
    base = draw(strategies.connects())
    will = base.will_topic is not None
    return vmqapi.dataclasses.replace(base, proto_level=5, properties=draw(props_for(A["connect"])),
                                      will_properties=draw(props_for(A["will"])) if will else ())


options = st.builds(lambda q, nl, rap, rh: q | nl << 2 | rap << 3 | rh << 4, st.integers(0, 2), st.integers(0, 1),
                    st.integers(0, 1), st.integers(0, 2))
packets5 = st.one_of(
    connects5(), publishes5(),
    st.builds(vmqapi.Connack, reason, st.booleans(), props_for(A["connack"])),
    *(st.builds(cls, strategies.pid, reason, props_for(A["ack"]))
      for cls in (vmqapi.Puback, vmqapi.Pubrec, vmqapi.Pubrel, vmqapi.Pubcomp)),
    st.builds(vmqapi.Subscribe, strategies.pid, st.lists(st.tuples(strategies.mqtt_text, options), min_size=1,
                                                         max_size=3).map(tuple), props_for(A["subscribe"])),
    st.builds(vmqapi.Suback, strategies.pid, st.lists(st.sampled_from(sorted(vmqapi.SUBACK_CODES_5)), min_size=1,
                                                      max_size=3).map(tuple), props_for(A["ack"])),
    st.builds(vmqapi.Unsubscribe, strategies.pid, st.lists(strategies.mqtt_text, min_size=1, max_size=3).map(tuple),
              props_for(A["unsubscribe"])),
    st.builds(vmqapi.Unsuback, strategies.pid, st.lists(reason, min_size=1, max_size=3).map(tuple),
              props_for(A["ack"])),
    st.builds(vmqapi.Disconnect, reason, props_for(A["disconnect"])),
    st.builds(vmqapi.Auth, reason, props_for(A["auth"])),
    st.just(vmqapi.Pingreq()), st.just(vmqapi.Pingresp()),
)


@given(packets5)
def test_mqtt5_decode_inverts_encode(packet):
    data = vmqapi.encode_packet(packet, 5)
    assert vmqapi.decode_packet(data, 0, 0, 5) == (packet, len(data))
    for n in range(len(data)):
        assert vmqapi.decode_packet(data[:n], 0, 0, 5) is None


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_mqtt5_arbitrary_bytes_give_packets_or_our_error(data):
    pos = 0
    try:
        while (result := vmqapi.decode_packet(data, pos, 0, 5)) is not None:
            pos = result[1]
    except MalformedPacket:
        pass


def test_mqtt5_misplaced_or_repeated_property_is_a_protocol_error():
    bad = vmqapi.Puback(1, 0, (("topic_alias", 1),))  # topic alias belongs to PUBLISH only
    with pytest.raises(vmqapi.ProtocolError):
        vmqapi.decode_packet(vmqapi.encode_packet(bad, 5), 0, 0, 5)
    twice = vmqapi.Publish("t", b"", 0, properties=(("content_type", "a"), ("content_type", "b")))
    with pytest.raises(vmqapi.ProtocolError) as info:
        vmqapi.decode_packet(vmqapi.encode_packet(twice, 5), 0, 0, 5)
    assert info.value.reason_code == 0x82
    no_alias = vmqapi.encode_packet(vmqapi.Publish("x", b"p"), 5).replace(b"\x00\x01x", b"\x00\x00", 1)
    no_alias = bytes((no_alias[0], no_alias[1] - 1)) + no_alias[2:]
    with pytest.raises(vmqapi.ProtocolError, match="topic alias"):
        vmqapi.decode_packet(no_alias, 0, 0, 5)


def test_short_mqtt5_acks_mean_success():
    assert vmqapi.decode_packet(b"\x40\x02\x00\x07", 0, 0, 5)[0] == vmqapi.Puback(7)
    assert vmqapi.decode_packet(b"\x40\x03\x00\x07\x10", 0, 0, 5)[0] == vmqapi.Puback(7, 0x10)
    assert vmqapi.decode_packet(b"\xe0\x00", 0, 0, 5)[0] == vmqapi.Disconnect()
