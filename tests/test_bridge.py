"""vmq_bridge: bridges to mosquitto and to another vmqapi node, outages, restarts, loops, TLS, refusals."""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from capped import capped_node, child_setup
from conftest import Client, body_json, wait_for, password_file
from mqtt_client import MqttClient
from test_tls_ws import pki  # noqa: F401 - the module's CA and server certificate, made with openssl
import vmqapi
from vmqapi import Connect, Publish, Suback, Subscribe

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def port_of(node, kind="mqtt"):
    return next(x["port"] for x in node.listeners() if x["type"] == kind)




def bridge_rows(node):
    return node.in_broker(node.bridges.rows)


def bridge_up(node, name="br0"):
    return wait_for(lambda: any(r["name"] == name and r["status"] == "up" for r in bridge_rows(node)),
                    what=f"bridge {name} up")


def bridge_down(node, name="br0"):
    return wait_for(lambda: any(r["name"] == name and r["status"] == "down" for r in bridge_rows(node)),
                    what=f"bridge {name} down")


def bridge_config(port, *topics, name="br0", kind="tcp", **options):
    """Config values for one bridge to 127.0.0.1:``port``."""
    values = {"plugins.vmq_bridge": "on", f"vmq_bridge.{kind}.{name}": f"127.0.0.1:{port}",
              f"vmq_bridge.{kind}.{name}.restart_timeout": "1"}
    for n, topic in enumerate(topics, 1):
        values[f"vmq_bridge.{kind}.{name}.topic.{n}"] = topic
    values.update({f"vmq_bridge.{kind}.{name}.{k}": str(v) for k, v in options.items()})
    return values


def connected(port, client_id, version=4, clean=True, **kwargs):
    c = MqttClient(port, version=version)
    ack = c.connect(client_id, clean, **kwargs)
    assert ack.return_code == 0, ack
    return c


def messages(c, count, timeout=10.0):
    """Read ``count`` PUBLISHes (acknowledged), then make sure no more come."""
    got = [c.message(timeout=timeout) for _ in range(count)]
    c.no_message(0.5)
    return got


class Proxy:
    """A TCP forwarder on 127.0.0.1 port 0 to a port that may change; ``cut`` makes the remote unreachable."""

    def __init__(self, target):
        self.target, self.up, self.stopping = target, True, False
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                if not self.up:
                    raise OSError("cut")
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                conn.close()
                continue
            with self.lock:
                self.open += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                thread = threading.Thread(target=self._pump, args=(a, b), name="proxy-pump", daemon=True)
                thread.start()
                self.threads.append(thread)

    @staticmethod
    def _pump(a, b):
        a.settimeout(None)
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self):
        """Close every forwarded connection and refuse new ones."""
        self.up = False
        with self.lock:
            sockets, self.open = self.open, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self, target=None):
        self.target = target or self.target
        self.up = True

    def close(self):
        self.stopping = True
        self.cut()
        self.sock.close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def proxy():
    made = []

    def make(target):
        made.append(Proxy(target))
        return made[-1]
    try:
        yield make
    finally:
        for p in made:
            p.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mosquitto(tmp_path):
    """Start mosquitto as a child on a free loopback port; yield the port; stop it at the end."""
    if MOSQUITTO is None:
        print("SKIPPED REASON: no mosquitto (apt-get install mosquitto)")
        pytest.skip("no mosquitto (apt-get install mosquitto)")
    proc = None
    try:
        for attempt in range(5):  # the port is free when asked; another process may take it first: ask again
            port = free_port()
            conf = tmp_path / f"mosquitto{attempt}.conf"
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
            with open(tmp_path / f"mosquitto{attempt}.log", "w") as log:
                proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=child_setup())
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                time.sleep(0.05)
            if proc.poll() is None and time.monotonic() < deadline:
                yield port
                return
            proc.kill()
            proc.wait(10)
        raise AssertionError("mosquitto did not start")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# -- the config ---------------------------------------------------------------------------
def test_topic_lines_parse_as_vernemq_documents_them():
    parse = vmqapi.parse_bridge_topic
    assert parse("/demo/+ both 1") == ("/demo/+", "both", 1, "", "")
    assert parse("$SYS/* in remote") == ("$SYS/#", "in", 0, "remote", "")
    assert parse('a/* out 2 "" up/') == ("a/#", "out", 2, "", "up/")
    assert parse("x") == ("x", "out", 0, "", "")
    with pytest.raises(ValueError):
        parse("a b c d e f")
    assert vmqapi.find_setting("vmq_bridge.ssl.br0.cafile").name == "vmq_bridge.$type.$name.cafile"
    assert vmqapi.find_setting("vmq_bridge.tcp.br0.topic.7").name == "vmq_bridge.$type.$name.topic.$n"
    with pytest.raises(vmqapi.VmqError):
        vmqapi.find_setting("vmq_bridge.tcp.br0.cafile")  # TLS options belong to ssl bridges
    assert vmqapi.parse_endpoint("mqtt.example.com:8883") == ("mqtt.example.com", 8883)


def test_a_bridge_that_cannot_work_stops_the_start_with_a_clear_error(make_node):
    with pytest.raises(vmqapi.ConfigError, match="topic"):
        make_node(**bridge_config(1883))  # no topic: it would bridge nothing
    with pytest.raises(vmqapi.ConfigError, match="not a topic filter"):
        make_node(**bridge_config(1883, "a/#/b out"))
    with pytest.raises(vmqapi.ConfigError, match="no-such.pem"):
        make_node(**bridge_config(1883, "a out", kind="ssl", cafile="/nonexistent/no-such.pem"))


def test_plugin_show_and_bridge_commands_follow_the_plugin(make_node):
    off = make_node()
    assert "vmq_bridge" not in [r["Plugin"] for r in off.plugin_rows()]
    key = off.keystore.create("mgmt")
    c = Client(off)
    try:
        status, _, body = c.get("/api/v1/bridge/show", key)
        assert "not enabled" in body.decode()
    finally:
        c.close()
    on = make_node(**bridge_config(1, "a out"))  # port 1: refused at once
    assert "vmq_bridge" in [r["Plugin"] for r in on.plugin_rows()]


# -- vmqapi <-> vmqapi ------------------------------------------------------------------------
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_vmqapi_to_vmqapi_both_ways_with_qos_and_prefixes(make_node, qos):
    remote = make_node()
    local = make_node(**bridge_config(port_of(remote), f"out/* out {qos} here/ there/",
                                      f"in/* in {qos} from/ to/"))
    bridge_up(local)
    far = connected(port_of(remote), "far")
    assert far.subscribe(("there/#", 2)) == (2,)
    near = connected(port_of(local), "near")
    assert near.subscribe(("from/#", 2)) == (2,)
    near.publish("here/out/x", b"up", 2, retain=False)
    (p,) = messages(far, 1)
    assert (p.topic, p.payload, p.qos) == ("there/out/x", b"up", qos)
    wait_for(lambda: any(s["client_id"] == "vmqapi@127.0.0.1-br0" for s in remote.session_records()),
             what="the bridge's session at the remote")
    time.sleep(0.2)  # its SUBSCRIBE is on its way
    far.publish("to/in/y", b"down", 2)
    (p,) = messages(near, 1)
    assert (p.topic, p.payload, p.qos) == ("from/in/y", b"down", qos)
    near.publish("elsewhere/x", b"local only", 1)  # matches no out pattern
    far.no_message(0.3)
    samples = local.metric_samples()
    assert samples[("bridge_messages_out", (("bridge", "br0"),))] == 1
    assert samples[("bridge_messages_in", (("bridge", "br0"),))] == 1
    assert samples[("bridge_bytes_out", (("bridge", "br0"),))] == len(b"up") + len("there/out/x")
    for c in (far, near):
        c.close()


def test_a_vmqapi_listener_answers_a_bridge_with_no_local_and_retain_as_published(node):
    port = port_of(node)
    bridge = MqttClient(port)
    bridge.send(Connect("peer-bridge", proto_level=4 | 0x80))  # try_private: MQTT 3.1.1 + 128
    assert bridge.expect(vmqapi.Connack).return_code == 0
    assert bridge.subscribe(("t/#", 1)) == (1,)
    bridge.publish("t/own", b"echo?", 1)
    bridge.no_message(0.3)  # No Local: its own message does not come back
    other = connected(port, "other")
    other.publish("t/kept", b"r", 1, retain=True)
    p = bridge.message()
    assert p.retain  # Retain As Published (a plain MQTT 3.1.1 subscriber sees 0)
    (record,) = [r for r in node.session_records() if r["client_id"] == "peer-bridge"]
    assert record["protocol"] == 132  # as VerneMQ shows a bridge
    intruder = MqttClient(port)
    assert intruder.connect("$bridge/br0").return_code == 2  # the bridges' client ids are not for clients
    for c in (bridge, other, intruder):
        c.close()


def test_two_nodes_bridged_both_ways_never_loop(make_node, proxy):
    a_proxy, b_proxy = proxy(1), proxy(1)  # each bridge needs the other's port before both run
    a = make_node(**bridge_config(b_proxy.port, "t/* both 1", name="to_b"))
    b = make_node(**bridge_config(a_proxy.port, "t/* both 1", name="to_a"))
    a_proxy.restore(port_of(a))
    b_proxy.restore(port_of(b))
    b.in_broker(b.bridges.restart)
    a.in_broker(a.bridges.restart)
    bridge_up(a, "to_b")
    bridge_up(b, "to_a")
    sa, sb = connected(port_of(a), "sa"), connected(port_of(b), "sb")
    sa.subscribe(("t/#", 1))
    sb.subscribe(("t/#", 1))
    time.sleep(0.3)  # the bridges' SUBSCRIBEs
    pa = connected(port_of(a), "pa")
    pa.publish("t/1", b"from a", 1)
    # on b it arrives twice (pushed by a's bridge, pulled by b's); neither copy goes over a bridge again
    assert [p.payload for p in messages(sa, 1)] == [b"from a"]
    assert [p.payload for p in messages(sb, 2)] == [b"from a"] * 2
    time.sleep(0.5)
    totals = [n.metrics.value("bridge_messages_out") + n.metrics.value("bridge_messages_in") for n in (a, b)]
    time.sleep(1.0)
    assert [n.metrics.value("bridge_messages_out") + n.metrics.value("bridge_messages_in") for n in (a, b)] == totals
    assert totals == [1, 1]  # a pushed one, b pulled one
    for c in (sa, sb, pa):
        c.close()


# -- outages ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_500_messages_wait_for_a_stopped_remote_and_arrive_once_in_order(make_node, proxy, tmp_path):
    remote = vmqapi.Node({"data_dir": str(tmp_path / "remote"), "listener.http.default": "127.0.0.1:0",
                          "listener.tcp.default": "127.0.0.1:0"}).start()
    try:
        link = proxy(port_of(remote))
        local = make_node(**bridge_config(link.port, "data/* out 1", max_outgoing_buffered_messages=1000))
        bridge_up(local)
        sub = connected(port_of(remote), "sub", clean=False)
        sub.subscribe(("data/#", 1))
        sub.close()
        remote.stop()
        link.cut()
        bridge_down(local)
        pub = connected(port_of(local), "pub")
        for n in range(500):
            pub.publish(f"data/{n % 3}", str(n).encode(), 1)  # each acknowledged by the local node
        (row,) = bridge_rows(local)
        assert (row["buffer size"], row["buffer dropped msgs"], row["status"]) == (500, 0, "down")
        remote = vmqapi.Node({"data_dir": str(tmp_path / "remote"), "listener.http.default": "127.0.0.1:0",
                              "listener.tcp.default": "127.0.0.1:0"}).start()
        link.restore(port_of(remote))
        key = local.keystore.create("mgmt")
        http = Client(local)
        try:
            status, _, body = http.get("/api/v1/bridge/start", key)
            assert "VerneMQ Bridges restarted." in body.decode()
        finally:
            http.close()
        bridge_up(local)
        sub = connected(port_of(remote), "sub", clean=False)
        got = [sub.message(timeout=20).payload for _ in range(500)]
        sub.no_message(0.5)
        assert got == [str(n).encode() for n in range(500)]
        wait_for(lambda: bridge_rows(local)[0]["buffer size"] == 0, what="an empty buffer")
        sub.close()
        pub.close()
    finally:
        remote.stop()


def test_a_full_buffer_refuses_qos_1_before_its_puback_drops_qos_0_counted_and_logs_once(make_node, proxy,
                                                                                           caplog):
    link = proxy(1)
    link.cut()
    remote = make_node()
    with caplog.at_level(logging.WARNING, logger="vmqapi"):
        local = make_node(**bridge_config(link.port, "d/* out 1", max_outgoing_buffered_messages=10))
        wait_for(lambda: "cannot reach" in bridge_rows(local)[0]["error"], what="the outage in bridge show")
        pub = connected(port_of(local), "pub", version=5)
        codes = [pub.publish("d/x", str(n).encode(), 1) for n in range(15)]
        assert codes == [0] * 10 + [0x97] * 5  # past the bound: Quota exceeded, never a PUBACK for a dropped one
        assert pub.publish("d/x", b"two", 2) == 0x97  # PUBREC 0x97 ends the QoS 2 exchange
        old = connected(port_of(local), "old")
        with pytest.raises(ConnectionError):
            old.publish("d/x", b"3.1.1", 1)  # no negative PUBACK in MQTT 3.1.1: cut off unacknowledged, it resends
        http = Client(local)
        try:
            status, _, body = http.request("POST", "/restmqtt/api/v1/publish?topic=d/x&qos=1",
                                           {"x-api-key": local.keystore.create("httppub")}, b"over HTTP")
        finally:
            http.close()
        assert status == 503 and b"max_outgoing_buffered_bytes" in body  # HTTP publish is refused too
        for n in range(20):
            pub.publish("d/x", b"best effort", 0)
        wait_for(lambda: bridge_rows(local)[0]["buffer dropped msgs"] == 20, what="20 QoS 0 drops")
    (row,) = bridge_rows(local)
    assert (row["buffer size"], row["buffer max"], row["buffer dropped msgs"]) == (10, 10, 20)
    assert local.metric_samples()[("bridge_messages_dropped", (("bridge", "br0"),))] == 20
    warnings = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(warnings) == 1 and "bridge br0" in warnings[0] and "max_outgoing_buffered_messages = 10" in warnings[0]
    sub = connected(port_of(remote), "sub")
    sub.subscribe(("d/#", 1))
    link.restore(port_of(remote))
    local.in_broker(local.bridges.restart)
    assert [p.payload for p in messages(sub, 10)] == [str(n).encode() for n in range(10)]
    for c in (pub, old, sub):
        c.close()


def test_a_bridge_reconnects_by_itself_with_back_off(make_node, proxy):
    link = proxy(1)
    link.cut()
    remote = make_node()
    local = make_node(**bridge_config(link.port, "d/* out 1"))
    bridge_down(local)
    time.sleep(1.5)  # a reconnect or two has failed by now
    link.restore(port_of(remote))
    wait_for(lambda: bridge_rows(local)[0]["status"] == "up", timeout=15, what="the reconnect")


def test_bridge_show_clears_the_last_error_once_the_bridge_is_up_again(make_node, proxy):
    link = proxy(1)
    link.cut()
    remote = make_node()
    local = make_node(**bridge_config(link.port, "d/* out 1"))
    wait_for(lambda: "cannot reach" in bridge_rows(local)[0]["error"], what="the outage in bridge show")
    link.restore(port_of(remote))
    local.in_broker(local.bridges.restart)
    bridge_up(local)
    (row,) = bridge_rows(local)
    assert (row["status"], row["error"]) == ("up", "")  # the outage is over: its error is not shown as current


@pytest.mark.slow
def test_kill_9_of_the_node_loses_none_of_the_buffered_messages(make_node, proxy, tmp_path):
    remote = make_node()
    link = proxy(port_of(remote))
    link.cut()
    sub = connected(port_of(remote), "sub")
    sub.subscribe(("k/#", 1))
    sets = [f"{k}={v}" for k, v in bridge_config(link.port, "k/* out 1",
                                                  max_outgoing_buffered_messages=500).items()]
    data = tmp_path / "local"
    with capped_node(data, *sets, cap=None) as first:
        pub = MqttClient(first.port("mqtt"))
        assert pub.connect("pub").return_code == 0
        for n in range(200):
            pub.publish("k/x", str(n).encode(), 1)  # acknowledged: kept in the store
        pub.close()
        first.proc.kill()  # SIGKILL: nothing is flushed on the way out
        first.proc.wait(10)
    link.restore()
    with capped_node(data, *sets, cap=None) as second:
        got = [sub.message(timeout=20).payload for _ in range(200)]
        sub.no_message(0.5)
        assert got == [str(n).encode() for n in range(200)]
        assert "Traceback" not in second.log()
    sub.close()


CHILD_KEY = "b" * 32  # the management key a child node takes from VMQAPI_API_KEYS


def child_bridge_row(node):
    """bridge show of a child node, over its HTTP API: the one bridge's row."""
    conn = http.client.HTTPConnection("127.0.0.1", node.port("http"), timeout=10)
    try:
        conn.request("GET", "/api/v1/bridge/show", headers={"x-api-key": CHILD_KEY})
        (row,) = body_json(conn.getresponse().read())["table"]
        return row
    finally:
        conn.close()


@pytest.mark.slow
def test_the_default_buffer_keeps_300_acknowledged_messages_through_kill_9_for_mosquitto(mosquitto, proxy,
                                                                                       tmp_path):
    link = proxy(mosquitto)
    link.cut()  # the remote is down
    sub = connected(mosquitto, "sub")
    sub.subscribe(("k/#", 1))
    sets = [f"{k}={v}" for k, v in bridge_config(link.port, "k/* out 1").items()]  # the default buffer
    env = {"VMQAPI_API_KEYS": f"{CHILD_KEY}:mgmt"}
    data = tmp_path / "local"
    with capped_node(data, *sets, cap=None, env=env) as first:
        pub = MqttClient(first.port("mqtt"))
        assert pub.connect("pub").return_code == 0
        for n in range(300):
            assert pub.publish("k/x", str(n).encode(), 1) == 0  # acknowledged: the node keeps it
        pub.close()
        row = child_bridge_row(first)
        assert (row["buffer size"], row["buffer dropped msgs"], row["status"]) == (300, 0, "down")
        assert row["buffer max"] == 0 and row["buffer max bytes"] == 64 << 20
        first.proc.kill()  # SIGKILL: nothing is flushed on the way out
        first.proc.wait(10)
    link.restore()  # the remote is back
    with capped_node(data, *sets, cap=None, env=env) as second:
        got = [sub.message(timeout=20).payload for _ in range(300)]
        sub.no_message(0.5)
        assert got == [str(n).encode() for n in range(300)]
        wait_for(lambda: child_bridge_row(second)["buffer size"] == 0, what="an empty buffer")
        assert child_bridge_row(second)["buffer dropped msgs"] == second.metric("bridge_messages_dropped") == 0
        assert "Traceback" not in second.log()
    sub.close()


@pytest.mark.slow
def test_drops_past_the_byte_bound_are_counted_in_the_store_across_kill_9(proxy, tmp_path):
    link = proxy(1)
    link.cut()
    sets = [f"{k}={v}" for k, v in bridge_config(link.port, "d/* out 1", max_outgoing_buffered_bytes=1000).items()]
    env = {"VMQAPI_API_KEYS": f"{CHILD_KEY}:mgmt"}
    data = tmp_path / "local"
    payload = b"p" * 97  # 100 bytes with the topic d/x: 10 fill the buffer
    with capped_node(data, *sets, cap=None, env=env) as first:
        pub = MqttClient(first.port("mqtt"), version=5)
        assert pub.connect("pub").return_code == 0
        assert [pub.publish("d/x", payload, 1) for _ in range(11)] == [0] * 10 + [0x97]  # refused, not dropped
        for _ in range(25):
            pub.publish("d/x", payload, 0)  # QoS 0 past the bound: dropped and counted
        wait_for(lambda: child_bridge_row(first)["buffer dropped msgs"] == 25, what="25 drops")
        assert first.metric("bridge_messages_dropped") == 25
        row = child_bridge_row(first)
        assert (row["buffer size"], row["buffer bytes"], row["buffer max bytes"]) == (10, 1000, 1000)
        lines = [line for line in first.log().splitlines() if "dropping" in line]
        assert len(lines) == 1 and "bridge br0" in lines[0] and "max_outgoing_buffered_bytes = 1000" in lines[0]
        pub.close()
        first.proc.kill()
        first.proc.wait(10)
    with capped_node(data, *sets, cap=None, env=env) as second:
        assert child_bridge_row(second)["buffer dropped msgs"] == second.metric("bridge_messages_dropped") == 25
        pub = MqttClient(second.port("mqtt"), version=5)
        assert pub.connect("pub").return_code == 0
        pub.publish("d/x", payload, 0)
        wait_for(lambda: child_bridge_row(second)["buffer dropped msgs"] == 26, what="one more drop")
        assert second.metric("bridge_messages_dropped") == 26
        assert "Traceback" not in second.log()
        pub.close()


# -- TLS and refusals ----------------------------------------------------------------------------
def test_tls_to_a_remote_with_a_ca_made_at_test_time(make_node, pki):  # noqa: F811
    remote = make_node(**{"listener.ssl.secure": "127.0.0.1:0", "listener.ssl.certfile": str(pki / "server.pem"),
                          "listener.ssl.keyfile": str(pki / "server.key")})
    tls_port = port_of(remote, "mqtts")
    trusted = make_node(**bridge_config(tls_port, "s/* out 1", kind="ssl", cafile=pki / "ca.pem"))
    untrusted = make_node(**bridge_config(tls_port, "s/* out 1", kind="ssl", cafile=pki / "other.pem"))
    insecure = make_node(**bridge_config(tls_port, "s/* out 1", kind="ssl", cafile=pki / "other.pem",
                                         insecure="on", tls_version="tlsv1.2,tlsv1.3"))
    bridge_up(trusted)
    bridge_up(insecure)
    wait_for(lambda: "certificate verify failed" in bridge_rows(untrusted)[0]["error"], what="the TLS refusal")
    sub = connected(port_of(remote), "sub")
    sub.subscribe(("s/#", 1))
    for n, node in enumerate((trusted, untrusted, insecure)):
        c = connected(port_of(node), f"p{n}")
        c.publish("s/x", str(n).encode(), 1)
        c.close()
    assert sorted(p.payload for p in messages(sub, 2)) == [b"0", b"2"]
    assert bridge_rows(untrusted)[0]["buffer size"] == 1  # waits for a remote it can trust
    sub.close()


def test_refused_credentials_show_down_with_the_reason(make_node, tmp_path, caplog):
    passwd = password_file(tmp_path / "passwd", gw="right")
    remote = make_node(**{"allow_anonymous": "off", "vmq_passwd.password_file": str(passwd)})
    with caplog.at_level(logging.WARNING, logger="vmqapi"):
        wrong = make_node(**bridge_config(port_of(remote), "c/* out 1", username="gw", password="wrong"))
        right = make_node(**bridge_config(port_of(remote), "c/* out 1", username="gw", password="right"))
        bridge_up(right)
        wait_for(lambda: "bad_username_or_password" in bridge_rows(wrong)[0]["error"], what="the refusal")
    key = wrong.keystore.create("mgmt")
    http = Client(wrong)
    try:
        status, _, body = http.get("/api/v1/bridge/show", key)
    finally:
        http.close()
    (row,) = body_json(body)["table"]
    assert row["status"] == "down" and row["name"] == "br0"
    assert "refused the connection: bad_username_or_password (CONNACK 4)" in row["error"]
    assert any("bridge br0 is down" in r.getMessage() and "CONNACK 4" in r.getMessage() for r in caplog.records)
    assert not any("wrong" in r.getMessage() for r in caplog.records)  # no password in the log


def test_a_removed_bridge_takes_its_session_with_it(make_node, tmp_path):
    remote = make_node()
    data = tmp_path / "gw"
    first = vmqapi.Node({"data_dir": str(data), "listener.http.default": "127.0.0.1:0",
                         "listener.tcp.default": "127.0.0.1:0", **bridge_config(port_of(remote), "a out")}).start()
    first.stop()
    second = vmqapi.Node({"data_dir": str(data), "listener.http.default": "127.0.0.1:0",
                          "listener.tcp.default": "127.0.0.1:0",
                          **bridge_config(port_of(remote), "a out", name="br1")}).start()
    try:
        ids = {r["client_id"] for r in second.session_records()}
        assert "$bridge/br1" in ids and "$bridge/br0" not in ids
    finally:
        second.stop()


# -- mosquitto ------------------------------------------------------------------------------------
@pytest.mark.parametrize("version,qos", [(4, 0), (4, 1), (4, 2), (5, 1), (5, 2), (3, 1)])
def test_vmqapi_and_mosquitto_both_ways(make_node, mosquitto, version, qos):
    local = make_node(**bridge_config(mosquitto, f"up/* out {qos} gw/ cloud/", f"down/* in {qos} gw/ cloud/",
                                      mqtt_version=version))
    bridge_up(local)
    far = connected(mosquitto, "far", version=5)
    far.subscribe(("cloud/#", 2))
    near = connected(port_of(local), "near", version=5)
    near.subscribe(("gw/down/#", 2))
    time.sleep(0.3)  # the bridge's SUBSCRIBE at mosquitto
    props = (("user_property", ("k", "v")),)
    near.publish("gw/up/1", b"to the cloud", 2, properties=props)
    (p,) = messages(far, 1)
    assert (p.topic, p.payload, p.qos) == ("cloud/up/1", b"to the cloud", qos)
    assert (("user_property", ("k", "v")) in p.properties) == (version == 5)  # MQTT 5 keeps properties
    far.publish("cloud/down/2", b"to the gateway", 2)
    (p,) = messages(near, 1)
    assert (p.topic, p.payload, p.qos) == ("gw/down/2", b"to the gateway", qos)
    far.close()
    near.close()


def test_both_through_mosquitto_never_echoes(make_node, mosquitto):
    local = make_node(**bridge_config(mosquitto, "t/* both 1"))
    bridge_up(local)
    near = connected(port_of(local), "near")
    near.subscribe(("t/#", 1))
    far = connected(mosquitto, "far")
    far.subscribe(("t/#", 1))
    time.sleep(0.3)
    near.publish("t/a", b"local", 1)
    assert [p.payload for p in messages(near, 1)] == [b"local"]  # once: mosquitto knows a bridge (try_private)
    assert [p.payload for p in messages(far, 1)] == [b"local"]
    far.publish("t/b", b"remote", 1)
    assert [p.payload for p in messages(near, 1)] == [b"remote"]
    assert [p.payload for p in messages(far, 1)] == [b"remote"]  # and not sent back up
    near.close()
    far.close()


def test_qos_0_under_the_same_topics_goes_on_as_published_retain_flag_included(make_node):
    remote = make_node()
    local = make_node(**bridge_config(port_of(remote), "plain/* out 0"))
    bridge_up(local)
    far = connected(port_of(remote), "far")
    far.subscribe(("plain/#", 0))
    near = connected(port_of(local), "near")
    near.publish("plain/kept", b"retained", 0, retain=True)
    near.publish("plain/live", b"live", 0)
    assert [(p.topic, p.payload) for p in messages(far, 2)] == [("plain/kept", b"retained"), ("plain/live", b"live")]
    assert [r["topic"] for r in remote.retained_rows()] == ["plain/kept"]  # the retain flag crossed the bridge
    assert local.metric_samples()[("bridge_bytes_out", (("bridge", "br0"),))] == len("plain/keptretainedplain/livelive")
    far.close()
    near.close()


def test_the_readme_gateway_config_works_as_printed(make_node, pki, tmp_path):  # noqa: F811
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme[readme.index("## Bridge\n"):]
    block = section[section.index("    plugins.vmq_bridge = on"):].split("\n\n")[0]
    passwd = password_file(tmp_path / "passwd", **{"gateway-17": "s3cret"})
    cloud = make_node(**{"listener.ssl.secure": "127.0.0.1:0", "listener.ssl.certfile": str(pki / "server.pem"),
                         "listener.ssl.keyfile": str(pki / "server.key"), "allow_anonymous": "off",
                         "vmq_passwd.password_file": str(passwd)})
    conf = tmp_path / "gateway.conf"  # only the address and the CA file differ from the README's
    conf.write_text("\n".join(line.strip() for line in block.splitlines())
                    .replace("broker.example.com:8883", f"127.0.0.1:{port_of(cloud, 'mqtts')}")
                    .replace("/etc/vmqapi/upstream-ca.pem", str(pki / "ca.pem")) + "\n")
    config = vmqapi.Config.from_sources(str(conf), base={"data_dir": str(tmp_path / "gw"),
                                                         "listener.http.default": "127.0.0.1:0",
                                                         "listener.tcp.default": "127.0.0.1:0"})
    gateway = vmqapi.Node(config).start()
    try:
        bridge_up(gateway, "cloud")
        operator = MqttClient(port_of(cloud))
        assert operator.connect("operator", username="gateway-17", password=b"s3cret").return_code == 0
        operator.subscribe(("site/17/#", 1))
        sensor = connected(port_of(gateway), "sensor")
        sensor.subscribe(("commands/#", 1))
        time.sleep(0.3)
        sensor.publish("sensors/t1", b"21.5", 1)
        assert [(p.topic, p.payload) for p in messages(operator, 1)] == [("site/17/sensors/t1", b"21.5")]
        operator.publish("site/17/commands/open", b"1", 1)
        assert [(p.topic, p.payload) for p in messages(sensor, 1)] == [("commands/open", b"1")]
        operator.close()
        sensor.close()
    finally:
        gateway.stop()


def test_the_bridge_session_outlives_persistent_client_expiration(make_node, proxy):
    link = proxy(1)
    link.cut()
    local = make_node(persistent_client_expiration="1", **bridge_config(link.port, "e/* out 1"))
    bridge_down(local)
    pub = connected(port_of(local), "pub")
    pub.publish("e/x", b"kept", 1)
    pub.close()
    time.sleep(2.5)  # past the expiration, several ticks
    assert bridge_rows(local)[0]["buffer size"] == 1
    assert "$bridge/br0" in {r["client_id"] for r in local.session_records()}


def test_a_session_disconnect_of_the_bridge_reattaches_it(make_node):
    remote = make_node()
    local = make_node(**bridge_config(port_of(remote), "r/* out 1"))
    bridge_up(local)
    assert local.disconnect_session("$bridge/br0")
    far = connected(port_of(remote), "far")
    far.subscribe(("r/#", 1))
    near = connected(port_of(local), "near")
    near.publish("r/1", b"still bridged", 1)
    assert [p.payload for p in messages(far, 1)] == [b"still bridged"]
    far.close()
    near.close()


# -- what a hostile remote can make the node hold ------------------------------------------------------

class HostileRemote:
    """A 'broker' on 127.0.0.1 port 0 that answers the bridge's CONNECT with ``first`` (bytes), then sends
    ``flood`` bytes of filler (bounded), and notes how much it sent."""

    def __init__(self, first, flood):
        self.first, self.flood, self.sent = first, flood, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.settimeout(5)
                    conn.recv(65536)  # the CONNECT
                    conn.sendall(self.first)
                    chunk = b"x" * 65536
                    while self.sent < self.flood and not self.stop.is_set():
                        conn.sendall(chunk)
                        self.sent += len(chunk)
                    self.stop.wait(3)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.server.close()


def _huge_publish_header(size):
    """A QoS 0 PUBLISH fixed header declaring ``size`` bytes (MQTT 3.1.1 2.2.3, four length bytes)."""
    return bytes((0x30, (size & 127) | 128, ((size >> 7) & 127) | 128, ((size >> 14) & 127) | 128, size >> 21))


@pytest.mark.parametrize("stage", ["before-connack", "after-connack"])
def test_a_remote_that_sends_a_huge_packet_is_cut_at_its_header(make_node, stage):
    """README (the bridge): a remote could declare a packet of 256 MB (before CONNACK, or after with
    max_message_size 0, the default) and the node read it all, copying its buffer once per 64 KiB read.
    Now the first packet may hold 64 KiB and later ones partial_packet_budget (or max_message_size): the
    bridge goes down at the header, with the reason, having read almost nothing."""
    first = _huge_publish_header(200 << 20)
    if stage == "after-connack":
        first = bytes((0x20, 2, 0, 0)) + first  # CONNACK accepted, then the huge PUBLISH
    remote = HostileRemote(first, 16 << 20)
    try:
        node = make_node(**bridge_config(remote.port, "t/# in 0"), partial_packet_budget="1048576")
        row = wait_for(lambda: next((r for r in bridge_rows(node) if "limit" in r["error"] or "more than"
                                     in r["error"]), None), timeout=8, what="the bridge cut at the header")
        assert row["status"] == "down"
    finally:
        remote.close()
    assert remote.sent < 16 << 20  # the node stopped reading: the remote's flood met a closed socket


def test_the_bridge_password_is_shown_to_no_key_and_never_logged(make_node, caplog):
    caplog.set_level(logging.INFO, logger="vmqapi")
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    node = make_node(**bridge_config(port, "c/* out 1", username="gw", password="BridgePass555"))
    bridge_down(node)
    http = Client(node)
    try:
        for scope in ("mgmt", "mgmt_ro"):
            key = node.keystore.create(scope)
            for path in ("/api/v1/show/vmq_bridge.tcp.br0.password", "/api/v1/bridge/show", "/api/v1/plugin/show"):
                status, _, data = http.get(path, key=key)
                assert status == 200 and b"BridgePass555" not in data, (scope, path, data)
    finally:
        http.close()
    assert not any("BridgePass555" in r.getMessage() for r in caplog.records)
