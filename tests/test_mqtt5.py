"""MQTT 5 end to end: real sockets on 127.0.0.1, the module's own codec as an MQTT 5 client."""

from __future__ import annotations

import time

import pytest

from conftest import Client, body_json, node_config
from mqtt_client import MqttClient
from test_broker import client_maker, mqtt_port
import vmqapi
from vmqapi import Auth, Connack, Connect, Disconnect, Publish


@pytest.fixture
def connect(node):
    """Open MQTT clients (MQTT 5 unless told) to ``node`` or ``target``; all are closed at the end."""
    with client_maker(node, 5) as make:
        yield make


def props(packet):
    """The properties of a packet as a dict (user properties as a list)."""
    out = {}
    for name, value in packet.properties:
        if name in ("user_property", "subscription_identifier"):
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    return out


def session_rows(node, client_id):
    client = Client(node)
    try:
        key = node.keystore.create("mgmt")
        _, _, data = client.get(f"/api/v1/session/show?--client_id={client_id}&--protocol&--clean_session",
                                key=key)
        return body_json(data)["table"]
    finally:
        client.close()


def test_mqtt5_publish_subscribe_each_qos_with_reason_codes(connect):
    sub = connect("sub")
    assert sub.subscribe(("t/0", 0), ("t/1", 1), ("t/2", 2)) == (0, 1, 2)
    pub = connect("pub")
    for qos in (0, 1, 2):
        assert pub.publish(f"t/{qos}", b"m%d" % qos, qos) == 0
        msg = sub.message()
        assert (msg.topic, msg.payload, msg.qos) == (f"t/{qos}", b"m%d" % qos, qos)
    assert pub.publish("nobody/here", b"x", 1) == 0x10  # No matching subscribers
    assert pub.publish("nobody/here", b"x", 2) == 0x10
    assert sub.unsubscribe("t/0", "never") == (0, 0x11)  # Success, No subscription existed


def test_v311_and_v5_clients_exchange_messages_both_ways(connect):
    v5 = connect("five")
    v4 = connect("four", version=4)
    v5.subscribe(("from/4", 1))
    v4.subscribe(("from/5", 1))
    v4.publish("from/4", b"hi five", 1)
    v5.publish("from/5", b"hi four", 1, properties=[("user_property", ("k", "v")), ("content_type", "text/plain")])
    got5, got4 = v5.message(), v4.message()
    assert (got5.payload, got5.properties) == (b"hi five", ())
    assert got4.payload == b"hi four" and got4.properties == ()  # MQTT 3.1.1 has no properties
    v5.subscribe(("qos0/#", 0))
    v4.subscribe(("qos0/#", 0))
    v4.publish("qos0/a", b"zero")  # forwarded as received to 3.1.1, re-encoded once for 5
    assert v5.message().payload == b"zero" and v4.message().payload == b"zero"


def test_properties_are_passed_through(connect):
    sub = connect("sub")
    sub.subscribe(("req", 1))
    sent = (("payload_format_indicator", 1), ("content_type", "application/json"), ("response_topic", "resp/1"),
            ("correlation_data", b"\x00\x01"), ("user_property", ("a", "1")), ("user_property", ("a", "2")))
    connect("pub").publish("req", b"{}", 1, properties=sent)
    got = sub.message()
    assert tuple(p for p in got.properties if p[0] != "message_expiry_interval") == sent


def test_payload_that_is_not_the_utf8_it_claims_is_refused(connect, node):
    sub = connect("sub")
    sub.subscribe(("text", 1))
    pub = connect("pub")
    utf8 = [("payload_format_indicator", 1)]
    assert pub.publish("text", b"\xff\xfe", 1, properties=utf8) == 0x99  # Payload format invalid
    assert pub.publish("text", "grüße".encode(), 1, properties=utf8) == 0
    assert sub.message().payload == "grüße".encode()
    sub.no_message()
    assert node.metrics.value("mqtt_publish_error") == 1


def test_connack_assigns_a_client_id_and_reports_limits(make_node):
    node = make_node(receive_max_broker="10", topic_alias_max_broker="5", max_message_size="4096",
                     max_keepalive="30", persistent_client_expiration="1h")
    c = MqttClient(mqtt_port(node), version=5)
    ack = c.connect("", True, keepalive=600, properties=(("session_expiry_interval", 0xFFFFFFFF),))
    p = props(ack)
    assert p["assigned_client_identifier"].startswith("anon-")
    assert p["session_expiry_interval"] == 3600  # what the node will really keep
    assert (p["receive_maximum"], p["topic_alias_maximum"], p["maximum_packet_size"]) == (10, 5, 4096)
    assert p["server_keep_alive"] == 30
    c.close()
    assert MqttClient(mqtt_port(node)).connect("old", keepalive=600).return_code == 2  # 3.1.1 cannot be told


def test_listener_without_version_5_refuses_it_in_mqtt5_form(make_node):
    node = make_node(**{"listener.allowed_protocol_versions": "3,4"})
    c = MqttClient(mqtt_port(node), version=5)
    ack = c.connect("x")
    assert ack.return_code == 0x84 and "protocol level 5" in props(ack)["reason_string"]
    assert c.closed(2)
    assert MqttClient(mqtt_port(node)).connect("y").return_code == 0


def test_session_expiry_keeps_then_ends_the_session(connect, node):
    c = connect("keep", clean=True, properties=(("session_expiry_interval", 1),))
    c.subscribe(("q", 1))
    c.close()
    pub = connect("pub")
    pub.publish("q", b"while away", 1)
    back = connect("keep", clean=False, properties=(("session_expiry_interval", 1),))
    assert back.ack.session_present
    assert back.message().payload == b"while away"
    back.close()
    time.sleep(2.2)  # the interval passes; the node's tick runs every 0.5 s
    again = connect("keep", clean=False)
    assert not again.ack.session_present
    assert session_rows(node, "keep")[0]["clean_session"] is True  # expiry 0: ends with the connection


def test_session_expiry_zero_ends_with_the_connection_and_disconnect_may_extend(connect, node):
    c = connect("short")
    c.subscribe(("x", 1))
    c.close()
    time.sleep(0.2)
    assert session_rows(node, "short") == []
    d = connect("extend", properties=(("session_expiry_interval", 10),))
    d.subscribe(("x", 1))
    d.send(Disconnect(0, (("session_expiry_interval", 60),)))
    d.close()
    time.sleep(0.2)
    assert [r["protocol"] for r in session_rows(node, "extend")] == [5]
    e = connect("zero")
    e.send(Disconnect(0, (("session_expiry_interval", 60),)))  # CONNECT said 0: a protocol error
    assert e.closed(2)


def test_message_expiry_while_queued(connect, node):
    sub = connect("offline", properties=(("session_expiry_interval", 60),))
    sub.subscribe(("exp/#", 1))
    sub.close()
    pub = connect("pub")
    pub.publish("exp/short", b"gone", 1, properties=[("message_expiry_interval", 1)])
    pub.publish("exp/long", b"kept", 1, properties=[("message_expiry_interval", 100)])
    time.sleep(1.3)
    back = connect("offline", clean=False, properties=(("session_expiry_interval", 60),))
    got = back.message()
    assert got.payload == b"kept"
    assert 0 < props(got)["message_expiry_interval"] <= 100  # what is left of it
    back.no_message()
    assert node.metrics.value("queue_message_expired") == 1


def test_retained_message_expires(connect):
    pub = connect("pub")
    pub.publish("ret/x", b"brief", 1, retain=True, properties=[("message_expiry_interval", 1)])
    time.sleep(1.3)
    sub = connect("sub")
    sub.subscribe(("ret/#", 1))
    sub.no_message()


def test_will_delay_and_reconnect_cancels_it(connect):
    watcher = connect("watcher")
    watcher.subscribe(("will/#", 0))
    will = dict(will_topic="will/a", will_payload=b"late", will_properties=(("will_delay_interval", 1),))
    c = connect("w", properties=(("session_expiry_interval", 30),), **will)
    c.close()  # no DISCONNECT: the will is due, after its delay
    watcher.no_message(0.5)
    assert watcher.message(timeout=3).payload == b"late"
    c = connect("w2", properties=(("session_expiry_interval", 30),), **dict(will, will_topic="will/b"))
    c.close()
    connect("w2", clean=False, properties=(("session_expiry_interval", 30),))  # back within the delay
    watcher.no_message(1.8)


def test_will_is_sent_when_the_session_ends_before_the_delay(connect):
    watcher = connect("watcher")
    watcher.subscribe(("will/#", 0))
    c = connect("w", properties=(("session_expiry_interval", 0),), will_topic="will/now", will_payload=b"now",
                will_properties=(("will_delay_interval", 60),))
    c.close()
    assert watcher.message(timeout=2).payload == b"now"


def test_disconnect_with_will_message_sends_the_will(connect):
    watcher = connect("watcher")
    watcher.subscribe(("will/#", 0))
    c = connect("w", will_topic="will/x", will_payload=b"asked")
    c.send(Disconnect(0x04))
    assert watcher.message(timeout=2).payload == b"asked"
    d = connect("w2", will_topic="will/y", will_payload=b"never")
    d.send(Disconnect(0))
    watcher.no_message()


def test_receive_maximum_limits_messages_in_flight_to_the_client(connect):
    sub = connect("slow", properties=(("receive_maximum", 2),))
    sub.subscribe(("rm", 1))
    pub = connect("pub")
    for n in range(5):
        pub.publish("rm", b"%d" % n, 1)
    first = [sub.message(ack=False), sub.message(ack=False)]
    sub.no_message()  # two in flight: the third waits
    for p in first:
        sub.send(vmqapi.Puback(p.packet_id))
    assert [sub.message().payload for _ in range(3)] == [b"2", b"3", b"4"]


def test_receive_maximum_of_the_node_disconnects_a_client_that_exceeds_it(make_node):
    node = make_node(receive_max_broker="2")
    c = MqttClient(mqtt_port(node), version=5)
    assert props(c.connect("greedy"))["receive_maximum"] == 2
    for pid in (1, 2, 3):
        c.send(Publish("t", b"x", 2, packet_id=pid))  # no PUBREL: all three stay unacknowledged
    goodbye = c.expect(Disconnect)
    assert goodbye.reason_code == 0x93  # Receive Maximum exceeded
    assert c.closed(2)


def test_maximum_packet_size_drops_larger_messages(connect):
    sub = connect("small", properties=(("maximum_packet_size", 64),))
    sub.subscribe(("big/#", 1))
    pub = connect("pub")
    pub.publish("big/1", b"x" * 100, 1)
    pub.publish("big/2", b"fits", 1)
    assert sub.message().payload == b"fits"
    sub.no_message()


def test_topic_aliases_both_ways(make_node):
    node = make_node(topic_alias_max_broker="3", topic_alias_max_client="2")
    port = mqtt_port(node)
    sub = MqttClient(port, version=5)
    sub.connect("sub", properties=(("topic_alias_maximum", 10),))
    sub.subscribe(("alias/#", 0))
    plain = MqttClient(port, version=5)
    plain.connect("plain")  # allows no aliases: gets whole topics
    plain.subscribe(("alias/long/#", 0))
    pub = MqttClient(port, version=5)
    pub.connect("pub")
    pub.publish("alias/long/topic/name", b"1", properties=[("topic_alias", 1)])
    pub.publish("", b"2", properties=[("topic_alias", 1)])  # the alias stands for the topic
    assert [(p.topic, p.payload, p.properties) for p in (plain.expect(Publish), plain.expect(Publish))] == \
        [("alias/long/topic/name", b"1", ()), ("alias/long/topic/name", b"2", ())]
    got = [sub.expect(Publish), sub.expect(Publish)]
    assert got[0].topic == "alias/long/topic/name" and props(got[0])["topic_alias"] == 1
    assert got[1].topic == "" and props(got[1])["topic_alias"] == 1  # the node uses an alias too
    for name in ("alias/a", "alias/b", "alias/c"):
        pub.publish(name, b"n")
    third = [sub.expect(Publish) for _ in range(3)]
    assert [props(p).get("topic_alias") for p in third] == [2, None, None]  # only two aliases allowed
    assert third[2].topic == "alias/c"
    pub.publish("alias/x", b"bad", properties=[("topic_alias", 4)])  # above the maximum of 3
    assert pub.expect(Disconnect).reason_code == 0x94
    assert pub.closed(2)
    late = MqttClient(port, version=5)
    late.connect("late")
    late.publish("", b"?", properties=[("topic_alias", 2)])  # never set on this connection
    assert late.expect(Disconnect).reason_code == 0x82
    for c in (sub, plain, pub, late):
        c.close()


def test_an_alias_is_not_used_before_the_client_learned_it(make_node):
    node = make_node(topic_alias_max_client="5")
    port = mqtt_port(node)
    sub = MqttClient(port, version=5)
    sub.connect("sub", properties=(("topic_alias_maximum", 5), ("maximum_packet_size", 64)))
    sub.subscribe(("big/#", 0))
    pub = MqttClient(port, version=5)
    pub.connect("pub")
    pub.publish("big/t", b"x" * 100)  # too large for sub: dropped, with the alias it would have set
    pub.publish("big/t", b"small")
    got = sub.expect(Publish)
    assert (got.topic, got.payload, props(got)["topic_alias"]) == ("big/t", b"small", 1)
    sub.close()
    pub.close()


def test_no_local_and_retain_as_published(connect):
    c = connect("self")
    c.subscribe(("nl", 1 | 4), ("rap", 1 | 8), ("plain", 1))
    c.publish("nl", b"mine", 1)
    c.no_message()  # No Local: not back to its publisher
    other = connect("other")
    other.publish("nl", b"theirs", 1)
    assert c.message().payload == b"theirs"
    other.publish("rap", b"r", 1, retain=True)
    assert c.message().retain is True  # Retain As Published
    other.publish("plain", b"p", 1, retain=True)
    assert c.message().retain is False


def test_retain_handling(connect):
    pub = connect("pub")
    pub.publish("rh/a", b"kept", 1, retain=True)
    sub = connect("sub")
    sub.subscribe(("rh/#", 1 | 2 << 4))  # 2: never send retained messages
    sub.no_message()
    sub.subscribe(("rh/+", 1 | 1 << 4))  # 1: only for a new subscription
    assert sub.message().payload == b"kept"
    sub.subscribe(("rh/+", 1 | 1 << 4))
    sub.no_message()
    sub.subscribe(("rh/+", 1))  # 0: always
    assert sub.message().payload == b"kept"


def test_subscription_identifiers(connect):
    sub = connect("sub")
    sub.subscribe(("id/#", 1), properties=(("subscription_identifier", 7),))
    sub.subscribe(("id/+", 0), properties=(("subscription_identifier", 300),))
    sub.subscribe(("id/x", 1))
    connect("pub").publish("id/x", b"x", 1)
    got = sub.message()
    assert sorted(props(got)["subscription_identifier"]) == [7, 300] and got.qos == 1
    sub.no_message()  # one copy, every identifier


def test_shared_subscription_spreads_load_over_v5_and_v311_members(connect, node):
    members = [connect("m5"), connect("m4", version=4)]
    for m in members:
        m.subscribe(("$share/g/work/#", 0))
    pub = connect("pub")
    for n in range(40):
        pub.publish("work/job", b"%d" % n)
    counts = []
    for m in members:
        got = 0
        try:
            while True:
                m.expect(Publish, 0.5)
                got += 1
        except TimeoutError:
            pass
        counts.append(got)
    assert sum(counts) == 40 and min(counts) >= 5  # random choice: 40 draws, each member gets some


def test_no_local_on_a_shared_subscription_is_a_protocol_error(connect):
    c = connect("nl")
    c.send(vmqapi.Subscribe(1, (("$share/g/t", 4),)))
    assert c.expect(Disconnect).reason_code == 0x82


def test_takeover_and_admin_disconnect_give_reasons(connect, node):
    first = connect("dup")
    connect("dup")
    assert first.expect(Disconnect).reason_code == 0x8E  # Session taken over
    other = connect("kicked")
    assert node.disconnect_session("kicked")
    assert other.expect(Disconnect).reason_code == 0x98  # Administrative action


def test_malformed_packet_gets_a_disconnect_with_a_reason(connect):
    c = connect("bad")
    c.send_raw(b"\x30\x05\x00\x01t\x09\x00")  # a property list of length 9 in a 5-byte packet
    goodbye = c.expect(Disconnect)
    assert goodbye.reason_code == 0x81 and props(goodbye)["reason_string"]
    assert c.closed(2)


def test_enhanced_authentication_through_the_hook(node):
    steps = []

    def challenge(user, sid, properties):
        steps.append(properties["authentication_data"])
        if properties["authentication_method"] != "demo":
            return None
        if properties["authentication_data"] == b"hello":
            return {"reason": "continue_authentication", "authentication_data": b"prove it"}
        if properties["authentication_data"] == b"proof":
            return {"reason": "success", "authentication_data": b"welcome"}
        return "error"

    node.hooks.register("on_auth_m5", challenge, "demo_auth")
    port = mqtt_port(node)
    c = MqttClient(port, version=5)
    c.send(Connect("ea", proto_level=5, properties=(("authentication_method", "demo"),
                                                    ("authentication_data", b"hello"))))
    step = c.expect(Auth)
    assert step.reason_code == 0x18 and props(step)["authentication_data"] == b"prove it"
    c.send(Auth(0x18, (("authentication_method", "demo"), ("authentication_data", b"proof"))))
    ack = c.expect(Connack)
    assert ack.return_code == 0 and props(ack)["authentication_data"] == b"welcome"
    c.send(Auth(0x19, (("authentication_method", "demo"), ("authentication_data", b"proof"))))
    assert c.expect(Auth).reason_code == 0  # re-authentication
    c.close()
    bad = MqttClient(port, version=5)
    bad.send(Connect("eb", proto_level=5, properties=(("authentication_method", "demo"),
                                                      ("authentication_data", b"wrong"))))
    assert bad.expect(Connack).return_code == 0x87 and bad.closed(2)
    unknown = MqttClient(port, version=5)
    unknown.send(Connect("ec", proto_level=5, properties=(("authentication_method", "other"),)))
    assert unknown.expect(Connack).return_code == 0x8C  # Bad authentication method
    assert steps == [b"hello", b"proof", b"proof", b"wrong", None]


def test_session_show_and_metrics_know_version_5(connect, node):
    c = connect("v5s")
    c.subscribe(("a/b", 1 | 4 | 8))
    client = Client(node)
    try:
        key = node.keystore.create("mgmt")
        _, _, data = client.get("/api/v1/session/show?--client_id=v5s&--protocol&--topic&--rap&--no_local",
                                key=key)
        assert body_json(data)["table"] == [{"no_local": True, "protocol": 5, "rap": True, "topic": "a/b"}]
        _, _, data = client.get("/metrics")
        text = data.decode()
        assert 'mqtt_connack_sent{node="' in text and 'mqtt_version="5",reason_code="success"' in text
        assert 'mqtt_subscribe_received{node="vmqapi@127.0.0.1",mqtt_version="5"} 1' in text
        _, _, data = client.get("/api/v1/metrics/show?--mqtt_version=5", key=key)
        shown = body_json(data)["text"]
        assert "counter.mqtt_connect_received = 1\n" in shown and "counter.mqtt_suback_sent = 1\n" in shown
    finally:
        client.close()


def test_persistent_v5_session_survives_a_restart_with_its_options(tmp_path):
    data_dir = tmp_path / "keep"
    node = vmqapi.Node(node_config(data_dir)).start()
    try:
        c = MqttClient(mqtt_port(node), version=5)
        c.connect("p", properties=(("session_expiry_interval", 3600),))
        c.subscribe(("s/#", 1 | 8), properties=(("subscription_identifier", 9),))
        c.close()
        pub = MqttClient(mqtt_port(node), version=5)
        pub.connect("pub")
        pub.publish("s/1", b"stored", 1, retain=True, properties=[("user_property", ("k", "v")),
                                                                   ("message_expiry_interval", 3600)])
        pub.close()
    finally:
        node.stop()
    node = vmqapi.Node(node_config(data_dir)).start()
    try:
        c = MqttClient(mqtt_port(node), version=5)
        assert c.connect("p", False, properties=(("session_expiry_interval", 3600),)).session_present
        got = c.message()
        p = props(got)
        assert (got.payload, got.retain, p["subscription_identifier"], p["user_property"]) == \
            (b"stored", True, [9], [("k", "v")])
        assert 3500 < p["message_expiry_interval"] <= 3600
        c.close()
        late = MqttClient(mqtt_port(node), version=5)
        late.connect("late")
        late.subscribe(("s/1", 0))
        assert props(late.message())["user_property"] == [("k", "v")]  # the retained copy kept them too
        late.close()
    finally:
        node.stop()


def test_retain_delete_expired_deletes_retained_messages_whose_expiry_passed(connect, node, key):
    pub = connect("retainer")
    pub.publish("keep/short", b"gone", 1, retain=True, properties=[("message_expiry_interval", 1)])
    pub.publish("keep/long", b"kept", 1, retain=True, properties=[("message_expiry_interval", 100)])
    pub.publish("keep/plain", b"kept", 1, retain=True)
    time.sleep(1.2)
    http = Client(node)
    try:
        status, _, data = http.get("/api/v1/retain/delete-expired", key=key)
    finally:
        http.close()
    assert status == 200 and body_json(data) == {"table": [{"expired": 1}], "type": "table"}
    assert sorted(r["topic"] for r in node.retained_rows()) == ["keep/long", "keep/plain"]


def test_connack_says_the_largest_packet_the_defaults_let_in(make_node):
    """max_message_size 0 means the protocol's limit, but one packet over partial_packet_budget is cut
    off anyway: an MQTT 5 client is told the smaller of the two (MQTT 5.0 3.2.2.3.6)."""
    node = make_node()
    c = MqttClient(mqtt_port(node), version=5)
    try:
        assert props(c.connect("sizes"))["maximum_packet_size"] == node.config["partial_packet_budget"]
    finally:
        c.close()
    small = make_node(max_message_size="4096")
    c = MqttClient(mqtt_port(small), version=5)
    try:
        assert props(c.connect("sizes"))["maximum_packet_size"] == 4096
    finally:
        c.close()
