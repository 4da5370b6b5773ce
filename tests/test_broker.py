"""The MQTT broker end to end: real sockets on 127.0.0.1, the module's own codec as client."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import pytest

from conftest import Client, basic, body_json, run_cli, password_file
from mqtt_client import MqttClient
from test_cli import stop_process
import vmqapi
from vmqapi import Publish


def mqtt_port(node):
    return next(x["port"] for x in node.listeners() if x["type"] == "mqtt")


@contextlib.contextmanager
def client_maker(node, default_version=4):
    """Yield ``make(client_id, clean, target=None, version=..., **connect_args)``; every client is closed after."""
    clients = []

    def make(client_id="c", clean=True, target=None, version=default_version, **kwargs):
        c = MqttClient(mqtt_port(target or node), version=version)
        clients.append(c)
        ack = c.connect(client_id, clean, **kwargs)
        assert ack.return_code == 0, ack
        c.ack, c.session_present = ack, ack.session_present
        return c

    try:
        yield make
    finally:
        for c in clients:
            c.close()


@pytest.fixture
def connect(node):
    """Open MQTT 3.1.1 clients to ``node``; all are closed at the end."""
    with client_maker(node) as make:
        yield make


@pytest.mark.parametrize("pub_qos", [0, 1, 2])
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
def test_publish_subscribe_each_qos(connect, pub_qos, sub_qos):
    sub = connect("sub")
    assert sub.subscribe(("t/+", sub_qos)) == (sub_qos,)
    pub = connect("pub")
    pub.publish("t/1", b"hello", pub_qos)
    msg = sub.message()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("t/1", b"hello", min(pub_qos, sub_qos), False)
    sub.no_message()


def test_overlapping_subscriptions_deliver_once_at_the_highest_qos(connect):
    sub = connect("sub")
    sub.subscribe(("a/#", 0), ("a/+", 1))
    connect("pub").publish("a/b", b"x", 1)
    assert sub.message().qos == 1
    sub.no_message()


def test_unsubscribe_stops_delivery(connect):
    sub = connect("sub")
    sub.subscribe(("x", 0))
    pub = connect("pub")
    pub.publish("x", b"1")
    assert sub.message().payload == b"1"
    sub.unsubscribe("x")
    pub.publish("x", b"2")
    sub.no_message()


def test_retained_set_replace_delete(connect):
    pub = connect("pub")
    pub.publish("r/1", b"first", 1, retain=True)
    pub.publish("r/1", b"second", 1, retain=True)
    pub.publish("r/2", b"other", 0, retain=True)
    sub = connect("sub")
    sub.subscribe(("r/#", 1))
    got = {m.topic: m for m in (sub.message(), sub.message())}
    assert got["r/1"].payload == b"second" and got["r/1"].retain and got["r/1"].qos == 1
    assert got["r/2"].qos == 0 and got["r/2"].retain
    pub.publish("r/1", b"live", 0, retain=True)
    live = sub.message()
    assert live.payload == b"live" and not live.retain  # [MQTT-3.3.1-9]
    pub.publish("r/1", b"", 0, retain=True)
    sub.message()
    later = connect("later")
    later.subscribe(("r/#", 0))
    assert later.message().topic == "r/2"
    later.no_message()


def test_will_on_abnormal_close_only(connect):
    watcher = connect("watcher")
    watcher.subscribe(("will/#", 1))
    doomed = connect("doomed", will_topic="will/doomed", will_payload=b"gone", will_qos=1)
    doomed.close()
    msg = watcher.message()
    assert (msg.topic, msg.payload, msg.qos) == ("will/doomed", b"gone", 1)
    polite = connect("polite", will_topic="will/polite", will_payload=b"gone")
    polite.disconnect()
    watcher.no_message()


def test_retained_will(connect):
    doomed = connect("doomed", will_topic="will/r", will_payload=b"bye", will_retain=True)
    doomed.close()
    time.sleep(0.2)
    sub = connect("sub")
    sub.subscribe(("will/r", 0))
    msg = sub.message()
    assert msg.payload == b"bye" and msg.retain


def test_session_takeover(connect):
    first = connect("same")
    second = connect("same")
    assert first.closed(2)
    assert second.ping()


def test_keepalive_expiry_closes_and_sends_the_will(connect, node):
    watcher = connect("watcher")
    watcher.subscribe(("will/k", 0))
    started = time.monotonic()
    silent = connect("silent", keepalive=1, will_topic="will/k", will_payload=b"timeout")
    assert silent.closed(5)
    assert 1.4 < time.monotonic() - started < 4
    assert watcher.message().payload == b"timeout"
    assert node.metrics.value("client_keepalive_expired") == 1


def test_pings_keep_a_client_alive(connect):
    c = connect("alive", keepalive=1)
    for _ in range(4):
        time.sleep(0.5)
        c.ping()


def test_connack_refusals(node, make_node, tmp_path):
    port = mqtt_port(node)
    cases = [(vmqapi.Connect("x", proto_level=6), 1), (vmqapi.Connect("", clean_session=False), 2),
             (vmqapi.Connect("x" * 101), 2)]
    for packet, code in cases:
        c = MqttClient(port)
        c.send(packet)
        assert c.expect(vmqapi.Connack).return_code == code
        assert c.closed(2)
        c.close()
    c = MqttClient(port)
    ack = c.connect("", True)
    assert ack.return_code == 0
    c.close()


def test_passwords_and_anonymous(make_node, tmp_path):
    passwd = password_file(tmp_path / "vmq.passwd", alice="secret")
    node = make_node(allow_anonymous="off", **{"vmq_passwd.password_file": str(passwd)})
    port = mqtt_port(node)
    for kwargs, code in [({}, 5), ({"username": "bob", "password": b"x"}, 5),
                         ({"username": "alice", "password": b"wrong"}, 4),
                         ({"username": "alice", "password": b"secret"}, 0)]:
        c = MqttClient(port)
        assert c.connect("c", **kwargs).return_code == code, kwargs
        c.close()


def test_a_password_file_is_asked_on_a_loopback_node_with_allow_anonymous_unset(make_node, tmp_path):
    """Unset, allow_anonymous lets clients in unasked only while no authentication plugin is configured."""
    passwd = password_file(tmp_path / "vmq.passwd", joe="secret")
    node = make_node(**{"vmq_passwd.password_file": str(passwd)})  # every listener on 127.0.0.1
    assert node.config["allow_anonymous"] is None
    port = mqtt_port(node)
    for version in (4, 5):
        bad, unknown = (4, 5) if version == 4 else (0x86, 0x87)  # MQTT 5: Bad user name or password, Not authorized
        for kwargs, code in [({}, unknown), ({"username": "joe", "password": b"wrong"}, bad),
                             ({"username": "joe", "password": b"secret"}, 0)]:
            c = MqttClient(port, version=version)
            try:
                assert c.connect("c", **kwargs).return_code == code, (version, kwargs)
            finally:
                c.close()


def test_allow_anonymous_on_still_lets_clients_in_before_the_password_file(make_node, tmp_path):
    """VerneMQ's meaning of an explicit allow_anonymous = on: anonymous clients in, no plugin asked."""
    passwd = password_file(tmp_path / "vmq.passwd", joe="secret")
    node = make_node(allow_anonymous="on", **{"vmq_passwd.password_file": str(passwd)})
    c = MqttClient(mqtt_port(node))
    try:
        assert c.connect("c").return_code == 0
    finally:
        c.close()


def test_acl(make_node, tmp_path):
    acl = tmp_path / "vmq.acl"
    acl.write_text("# everyone\ntopic read public/#\nuser alice\ntopic alice/#\npattern write users/%c/out\n")
    node = make_node(**{"vmq_acl.acl_file": str(acl)})
    c = MqttClient(mqtt_port(node))
    assert c.connect("me", username="alice", password=b"").return_code == 0
    assert c.subscribe(("public/x", 0), ("alice/x", 1), ("private/x", 0)) == (0, 1, 0x80)
    c.publish("users/me/out", b"ok")
    c.publish("public/x", b"refused")  # read-only for everyone: dropped, counted
    c.publish("alice/x", b"mine", 1)
    assert c.message().payload == b"mine"
    c.no_message()
    assert node.metrics.value("mqtt_publish_auth_error") == 1
    c.close()


def test_persistent_session_gets_offline_messages_and_dup_redelivery(connect, node):
    sub = connect("persist", clean=False)
    assert not sub.session_present
    sub.subscribe(("p/#", 1))
    sub.disconnect()
    pub = connect("pub")
    pub.publish("p/1", b"while away", 1)
    pub.publish("p/2", b"qos0 too", 0)
    back = connect("persist", clean=False)
    assert back.session_present
    first = back.message(ack=False)
    assert first.payload == b"while away" and first.qos == 1
    assert back.message().payload == b"qos0 too"
    back.close()  # without acknowledging the QoS 1 message
    again = connect("persist", clean=False)
    dup = again.message()
    assert dup.payload == b"while away" and dup.dup
    again.no_message()


def test_clean_session_discards_the_old_one(connect):
    sub = connect("s", clean=False)
    sub.subscribe(("c/#", 1))
    sub.disconnect()
    fresh = connect("s", clean=True)
    assert not fresh.session_present
    connect("pub").publish("c/1", b"x", 1)
    fresh.no_message()


def test_inflight_window(make_node, connect):
    node = make_node(max_inflight_messages="2")
    sub = connect("sub", target=node)
    sub.subscribe(("w", 1))
    pub = connect("pub", target=node)
    for n in range(5):
        pub.publish("w", str(n).encode(), 1)
    first = [sub.message(ack=False) for _ in range(2)]
    sub.no_message()
    for p in first:
        sub.send(vmqapi.Puback(p.packet_id))
    assert [sub.message().payload for _ in range(3)] == [b"2", b"3", b"4"]


def test_offline_queue_limit_counts_drops(make_node, connect):
    node = make_node(max_offline_messages="3")
    sub = connect("sub", clean=False, target=node)
    sub.subscribe(("q", 1))
    sub.disconnect()
    pub = connect("pub", target=node)
    for n in range(5):
        pub.publish("q", str(n).encode(), 1)
    back = connect("sub", clean=False, target=node)
    assert [back.message().payload for _ in range(3)] == [b"0", b"1", b"2"]
    back.no_message()
    assert node.metrics.value("queue_message_drop") == 2


def test_malformed_packet_closes_only_that_connection(connect):
    sub = connect("sub")
    sub.subscribe(("m", 0))
    bad = connect("bad")
    bad.send_raw(b"\x36\x05\x00\x01a\x00\x01")  # PUBLISH with QoS 3
    assert bad.closed(2)
    connect("pub").publish("m", b"still here")
    assert sub.message().payload == b"still here"


def test_first_packet_must_be_connect(node):
    c = MqttClient(mqtt_port(node))
    c.send(vmqapi.Pingreq())
    assert c.closed(2)
    c.close()


def test_connect_timeout(make_node):
    node = make_node(mqtt_connect_timeout="500")
    c = MqttClient(mqtt_port(node))
    assert c.closed(3)
    c.close()


def test_hundred_concurrent_clients(connect, node):
    subs = [connect(f"s{n}") for n in range(100)]
    for n, s in enumerate(subs):
        s.subscribe((f"each/{n}", 1), ("all", 0))
    pub = connect("pub")
    for n in range(100):
        pub.publish(f"each/{n}", str(n).encode(), 1)
    pub.publish("all", b"everyone")
    for n, s in enumerate(subs):
        got = sorted([s.message().payload, s.message().payload])
        assert got == sorted([str(n).encode(), b"everyone"])
    assert node.status()["num_online"] == 101


def test_mountpoints_separate_listeners(make_node):
    node = make_node(**{"listener.tcp.other": "127.0.0.1:0", "listener.tcp.other.mountpoint": "tenant"})
    ports = [x["port"] for x in node.listeners() if x["type"] == "mqtt"]
    a, b = MqttClient(ports[0]), MqttClient(ports[1])
    try:
        a.connect("a"), b.connect("b")
        a.subscribe(("t", 0))
        b.subscribe(("t", 0))
        a.publish("t", b"from default")
        assert a.message().payload == b"from default"
        b.no_message()
    finally:
        a.close(), b.close()


# -- admin commands on the live broker ---------------------------------------------------

def test_session_show_and_disconnect(connect, node, client, key):
    c = connect("admin-me", username="u1")
    c.subscribe(("some/topic/1", 0), ("with/wildcard/#", 1))
    status, _, data = client.get("/api/v1/session/show", key=key)
    (row,) = body_json(data)["table"]
    assert row["client_id"] == "admin-me" and row["is_online"] is True and row["user"] == "u1"
    assert row["mountpoint"] == "" and row["peer_host"] == "127.0.0.1" and isinstance(row["peer_port"], int)
    assert list(row) == sorted(row)
    _, _, data = client.get("/api/v1/session/show?--client_id=admin-me&--topic&--qos", key=key)
    assert body_json(data)["table"] == [{"qos": 0, "topic": "some/topic/1"}, {"qos": 1, "topic": "with/wildcard/#"}]
    _, _, data = client.get("/api/v1/session/show?--protocol=4&--statename&--clean_session", key=key)
    assert body_json(data)["table"] == [{"clean_session": True, "statename": "online"}]
    _, _, data = client.get("/api/v1/session/disconnect?client-id=admin-me", key=key)
    assert body_json(data) == {"text": "Done", "type": "text"}
    assert c.closed(2)
    assert body_json(client.get("/api/v1/session/show", key=key)[2])["table"] == []


def test_session_disconnect_cleanup_removes_a_persistent_session(connect, client, key):
    c = connect("keeper", clean=False)
    c.subscribe(("k", 1))
    c.disconnect()
    time.sleep(0.1)
    rows = body_json(client.get("/api/v1/session/show?--client_id&--is_online", key=key)[2])["table"]
    assert rows == [{"client_id": "keeper", "is_online": False}]
    client.get("/api/v1/session/disconnect?client-id=keeper&--cleanup", key=key)
    assert body_json(client.get("/api/v1/session/show", key=key)[2])["table"] == []


def test_retain_show_and_listener_counts(connect, client, key):
    pub = connect("pub")
    pub.publish("status/door", b"open", 1, retain=True)
    data = body_json(client.get("/api/v1/retain/show", key=key)[2])
    assert data == {"table": [{"payload": "open", "topic": "status/door"}], "type": "table"}
    rows = body_json(client.get("/api/v1/listener/show", key=key)[2])["table"]
    mqtt = next(r for r in rows if r["type"] == "mqtt")
    assert mqtt["active_conns"] == 1 and mqtt["all_conns"] == 1
    status = {r["Status"]: r["Value"] for r in body_json(client.get("/api/v1/node/status", key=key)[2])["table"]}
    assert status["num_online"] == 1 and status["msg_in"] == 1 and status["num_retained"] == 1


def test_set_takes_effect_at_once(connect, client, key, node):
    client.get("/api/v1/set?max_client_id_size=5", key=key)
    c = MqttClient(mqtt_port(node))
    try:
        assert c.connect("toolong").return_code == 2
    finally:
        c.close()
    assert connect("short") is not None


# -- the passwd command ------------------------------------------------------------------

def run_passwd(tmp_path, *args, password="pw\n"):
    import subprocess
    import sys
    from conftest import ROOT
    return subprocess.run([sys.executable, os.path.join(ROOT, "vmqapi.py"), "passwd", *args], input=password,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_passwd_command(tmp_path):
    path = str(tmp_path / "vmq.passwd")
    assert run_passwd(tmp_path, "-c", path, "alice", password="s3cret\n").returncode == 0
    assert run_passwd(tmp_path, "-c", path, "bob").returncode == 1  # -c refuses to overwrite
    assert run_passwd(tmp_path, path, "bob", password="b0b\n").returncode == 0
    users = vmqapi.parse_passwd(open(path).read())
    assert set(users) == {"alice", "bob"} and vmqapi.check_password(b"s3cret", users["alice"])
    salt_b64 = users["alice"].split("$")[2]
    assert len(salt_b64) == 16 and len(users["alice"].split("$")[3]) == 88  # 12-byte salt, sha512
    assert run_passwd(tmp_path, "-D", path, "alice").returncode == 0
    assert set(vmqapi.parse_passwd(open(path).read())) == {"bob"}
    assert run_passwd(tmp_path, "-D", path, "nobody").returncode == 1
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


# -- persistence across restarts and kill -9 ----------------------------------------------

def start_node(data_dir):
    from test_cli import start_node_process, wait_for_node_file
    proc = start_node_process(data_dir)
    info = wait_for_node_file(data_dir, proc)
    return proc, next(x["port"] for x in info["listeners"] if x["type"] == "mqtt")


@pytest.mark.parametrize("how", ["sigterm", "kill -9"])
def test_acknowledged_messages_survive_a_restart(tmp_path, how):
    import signal
    data_dir = tmp_path / "data"
    proc, port = start_node(data_dir)
    try:
        sub = MqttClient(port)
        sub.connect("durable", clean=False)
        sub.subscribe(("d/#", 1))
        sub.disconnect()
        pub = MqttClient(port)
        pub.connect("pub")
        for n in range(20):
            pub.publish(f"d/{n}", str(n).encode(), 1 + n % 2)  # each one acknowledged before the next
        pub.publish("d/retained", b"kept", 1, retain=True)
        pub.close()
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        proc.communicate(timeout=20)
    finally:
        stop_process(proc)
    if how == "kill -9":
        assert (data_dir / vmqapi.NODE_FILE).exists()  # left behind; the next start sees its pid is dead
    proc, port = start_node(data_dir)
    try:
        back = MqttClient(port)
        assert back.connect("durable", clean=False).session_present
        payloads = [back.message().payload for _ in range(21)]
        assert sorted(p for p in payloads if p != b"kept") == sorted(str(n).encode() for n in range(20))
        assert b"kept" in payloads
        back.no_message()
        back.close()
        late = MqttClient(port)
        late.connect("late")
        late.subscribe(("d/retained", 0))
        assert late.message().payload == b"kept"
        late.close()
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_slow_subscriber_never_blocks_the_others(connect, node):
    import socket
    slow = MqttClient(mqtt_port(node))
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect("slow")
    slow.subscribe(("flood", 0))  # and then never reads again
    fast = connect("fast")
    fast.subscribe(("flood", 0))
    pub = connect("pub")
    payload = b"p" * 1000
    count = 20000  # 20 MB: more than the kernel's socket buffers hold for the slow one
    for start in range(0, count, 200):
        pub.send_raw(vmqapi.encode_packet(Publish("flood", payload)) * 200)
        for _ in range(200):
            assert fast.message(timeout=10).payload == payload
    assert node.metrics.value("queue_message_drop") > 0
    assert fast.ping()
    slow.close()


def test_mqtt_max_connections(make_node):
    node = make_node(**{"listener.tcp.default.max_connections": "2"})
    port = mqtt_port(node)
    first, second, third = MqttClient(port), MqttClient(port), MqttClient(port)
    try:
        assert first.connect("a").return_code == 0 and second.connect("b").return_code == 0
        with pytest.raises((ConnectionError, OSError)):
            third.connect("c")
        assert first.ping()
    finally:
        first.close(), second.close(), third.close()


def test_shared_subscriptions_spread_the_load(connect, node):
    members = [connect(f"m{n}") for n in range(3)]
    for m in members:
        assert m.subscribe(("$share/workers/jobs/+", 1)) == (1,)
    watcher = connect("watcher")
    watcher.subscribe(("jobs/+", 0))
    pub = connect("pub")
    pub.publish("jobs/retained", b"r", 1, retain=True)  # shared subscriptions get no retained messages
    late = connect("late")
    late.subscribe(("$share/workers/jobs/+", 1))
    late.no_message()
    late.unsubscribe("$share/workers/jobs/+")
    for n in range(30):
        pub.publish("jobs/x", str(n).encode(), 1)
    got = {}
    for m in members:
        got[m] = []
        while True:
            try:
                got[m].append(m.message(timeout=0.5).payload)
            except TimeoutError:
                break
    received = sorted(p for payloads in got.values() for p in payloads if p != b"r")
    assert received == sorted(str(n).encode() for n in range(30))  # each message to exactly one member
    assert all(len(payloads) > 0 for payloads in got.values())
    assert len([watcher.message() for _ in range(31)]) == 31  # plain subscribers still get everything
    codes = members[0].subscribe(("$share//jobs", 0), ("$share/g+/jobs", 0), ("$share/g", 0))
    assert codes == (0x80, 0x80, 0x80)


def test_shared_group_member_offline_keeps_its_messages(connect, node):
    a = connect("a", clean=False)
    a.subscribe(("$share/g/t", 1))
    a.disconnect()
    pub = connect("pub")
    pub.publish("t", b"for the only member", 1)
    back = connect("a", clean=False)
    assert back.message().payload == b"for the only member"


@pytest.mark.parametrize("stage", ["published", "released"])
def test_qos2_in_flight_survives_kill_9_with_its_packet_id(tmp_path, stage):
    import signal
    data_dir = tmp_path / "data"
    proc, port = start_node(data_dir)
    try:
        sub = MqttClient(port)
        sub.connect("exactly-once", clean=False)
        sub.subscribe(("x", 2))
        pub = MqttClient(port)
        pub.connect("pub")
        pub.publish("x", b"once", 2)
        first = sub.message(ack=False)
        if stage == "released":
            sub.send(vmqapi.Pubrec(first.packet_id))
            assert sub.expect(vmqapi.Pubrel).packet_id == first.packet_id
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=20)
        sub.close(), pub.close()
    finally:
        stop_process(proc)
    proc, port = start_node(data_dir)
    try:
        back = MqttClient(port)
        assert back.connect("exactly-once", clean=False).session_present
        if stage == "released":
            assert back.expect(vmqapi.Pubrel).packet_id == first.packet_id  # not the message again
            back.send(vmqapi.Pubcomp(first.packet_id))
        else:
            again = back.message()
            assert (again.packet_id, again.payload, again.dup) == (first.packet_id, b"once", True)
        back.no_message()
        back.close()
        again = MqttClient(port)  # and nothing is left in the store afterwards
        assert again.connect("exactly-once", clean=False).session_present
        again.no_message()
        again.close()
    finally:
        stop_process(proc)


def test_long_topics_are_not_remembered_by_the_match_cache(connect, node):
    publisher = connect("long-topics")
    for n in range(50):  # each distinct and unmatched: remembering them would hold 50 x 10 KB for nothing
        publisher.publish(f"t/{n}/" + "x" * 10_000, b"", 1)
    assert node.in_broker(lambda: len(node.mqtt.engine.router.cache)) == 0
    publisher.publish("short", b"", 1)
    assert node.in_broker(lambda: len(node.mqtt.engine.router.cache)) == 1


def test_queued_bytes_agree_across_a_restart_with_non_ascii_topics(tmp_path):
    from conftest import node_config
    config = node_config(tmp_path / "same")
    node = vmqapi.Node(config).start()
    try:
        with client_maker(node) as make:
            make("offline", clean=False).subscribe(("ü/#", 1))
        with client_maker(node) as make:
            for n in range(5):
                make("pub").publish(f"ü/{n}", b"12345", 1)
        before = node.in_broker(lambda: node.mqtt.engine.queued_bytes)
    finally:
        node.stop()
    again = vmqapi.Node(config).start()
    try:
        assert again.in_broker(lambda: again.mqtt.engine.queued_bytes) == before  # characters both times
        with client_maker(again) as make:
            c = make("offline", clean=False)
            for _ in range(5):
                c.message()
        assert again.in_broker(lambda: again.mqtt.engine.queued_bytes) == 0
    finally:
        again.stop()


# -- bounds on what one client makes the node hold -------------------------------------------

KEEP = (("session_expiry_interval", 3600),)  # MQTT 5: the session outlives its connection


def test_an_idle_subscriber_takes_one_message_of_any_size_the_node_accepts(make_node, caplog):
    import logging
    node = make_node()  # defaults: max_message_size 0 (no limit), max_online_bytes and max_offline_bytes 8 MiB
    big, small = b"b" * (8 * 1024 * 1024 + 1), b"s"
    with client_maker(node, 5) as make, caplog.at_level(logging.WARNING, logger="vmqapi"):
        online = make("online")
        online.subscribe(("big", 1))
        offline = make("offline", clean=False, properties=KEEP)
        offline.subscribe(("big", 1))
        offline.disconnect()
        pub = make("pub")
        assert pub.publish("big", big, 1) == 0
        assert online.message(timeout=20).payload == big
        for _ in range(3):  # behind the big one, the byte bound holds as before: dropped, logged once
            assert pub.publish("big", small, 1) == 0
        assert online.message().payload == small  # the online queue had emptied
        back = make("offline", clean=False, properties=KEEP)
        assert back.message(timeout=20).payload == big
        back.no_message()
    assert node.metrics.value("queue_message_drop") == 3
    lines = [r.getMessage() for r in caplog.records if "dropping messages" in r.getMessage()]
    assert len(lines) == 1 and "'offline'" in lines[0] and "max_offline_bytes" in lines[0], lines


def test_subscriptions_per_client_are_capped(make_node):
    node = make_node(max_subscriptions_per_client="3")
    with client_maker(node, 5) as make:
        c5 = make("c5")
        assert c5.subscribe(("a", 0), ("b", 1), ("c", 2)) == (0, 1, 2)
        assert c5.subscribe(("d", 0)) == (0x97,)  # Quota exceeded (MQTT 5.0 3.9.3)
        assert c5.subscribe(("a", 1)) == (1,)  # a filter it holds may be subscribed again
        c5.unsubscribe("c")
        assert c5.subscribe(("d", 0), ("e", 0)) == (0, 0x97)
        c4 = make("c4", version=4)
        assert c4.subscribe(("a", 0), ("b", 0), ("c", 0)) == (0, 0, 0)
        assert c4.subscribe(("d", 0)) == (0x80,)
        c4.send(vmqapi.Subscribe(c4.pid(), tuple((f"x/{n}", 0) for n in range(4))))  # more than it may hold
        assert c4.closed(5)
    assert node.metrics.value("mqtt_subscription_quota_error") == 3
    assert node.metrics.value("mqtt_packet_limit_error") == 1


def test_subscriptions_are_capped_node_wide(make_node):
    node = make_node(max_subscriptions_total="3")
    with client_maker(node, 5) as make:
        a, b = make("a"), make("b")
        assert a.subscribe(("x", 0), ("y", 0)) == (0, 0)
        assert b.subscribe(("x", 0)) == (0,)
        assert b.subscribe(("z", 0)) == (0x97,)
        assert a.subscribe(("x", 1)) == (1,)  # one it holds may be subscribed again
        a.unsubscribe("y")
        assert b.subscribe(("z", 0)) == (0,)
    assert node.metrics.value("mqtt_subscription_quota_error") == 1


def test_the_subscription_cap_holds_across_a_restart(tmp_path):
    from conftest import node_config
    config = node_config(tmp_path / "subs", max_subscriptions_per_client="2")
    node = vmqapi.Node(config).start()
    try:
        with client_maker(node, 5) as make:
            c = make("kept", clean=False, properties=KEEP)
            assert c.subscribe(("a", 1), ("b", 1)) == (1, 1)
            assert c.subscribe(("c", 1)) == (0x97,)
    finally:
        node.stop()
    again = vmqapi.Node(config).start()
    try:
        with client_maker(again, 5) as make:
            c = make("kept", clean=False, properties=KEEP)
            assert c.session_present
            assert c.subscribe(("c", 1)) == (0x97,)
            c.unsubscribe("a")
            assert c.subscribe(("c", 1)) == (1,)
    finally:
        again.stop()


def test_persistent_sessions_are_capped_node_wide(tmp_path):
    from conftest import node_config
    config = node_config(tmp_path / "sessions", max_persistent_sessions="2")
    node = vmqapi.Node(config).start()
    try:
        with client_maker(node) as make:
            make("p1", clean=False).disconnect()
            make("p2", clean=False, version=5, properties=KEEP)
            refused = MqttClient(mqtt_port(node))
            assert refused.connect("p3", clean=False).return_code == 3  # MQTT 3.1.1: server unavailable
            refused.close()
            refused = MqttClient(mqtt_port(node), version=5)
            assert refused.connect("p3", properties=KEEP).return_code == 0x97  # Quota exceeded
            refused.close()
            make("clean")  # sessions that end with their connection are not counted
            assert make("p1", clean=False).session_present  # nor is taking up one that exists
    finally:
        node.stop()
    again = vmqapi.Node(config).start()
    try:
        assert again.in_broker(lambda: again.mqtt.engine.persistent) == 2
        with client_maker(again) as make:
            refused = MqttClient(mqtt_port(again))
            assert refused.connect("p3", clean=False).return_code == 3
            refused.close()
            make("p1", clean=True)  # a clean session ends p1's
            assert again.in_broker(lambda: again.mqtt.engine.persistent) == 1
            make("p3", clean=False)
        assert again.metrics.value("mqtt_session_quota_error") == 1
    finally:
        again.stop()
