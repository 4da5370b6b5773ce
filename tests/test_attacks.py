"""A node that no input can break: Hypothesis-driven hostile clients, slowloris, floods.

Each attack runs against one live node while a control client publishes and receives;
afterwards every broker and HTTP thread is alive and the control client still works.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import Client, body_json
from mqtt_client import MqttClient
from test_broker import mqtt_port
import vmqapi

ATTACK = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """One node for every attack of this module, with a control client subscribed to ``control``."""
    from conftest import node_config
    node = vmqapi.Node(node_config(tmp_path_factory.mktemp("attacked"), mqtt_connect_timeout="2000",
                                   http_request_timeout="2", max_message_size="65536"))
    node.start()
    control = MqttClient(mqtt_port(node))
    control.connect("control")
    control.subscribe(("control", 1))
    try:
        yield node, control
    finally:
        control.close()
        node.stop()


def still_serving(node, control):
    """The control client's round trip and an HTTP answer both work; no node thread died."""
    control.publish("control", b"ping", 1)
    assert control.message(timeout=5).payload == b"ping"
    http = Client(node)
    try:
        assert http.get("/health")[0] == 200
    finally:
        http.close()
    names = {t.name for t in threading.enumerate()}
    assert {"vmqapi-mqtt", "vmqapi-http-default"} <= names


def blast(port, data, read=True):
    """Send bytes on a fresh connection; return what came back before the node closed it (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""
        got = b""
        end = time.monotonic() + 3
        while read and time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        return got


CONNECT = vmqapi.encode_packet(vmqapi.Connect("attacker"))
CONNECT5 = vmqapi.encode_packet(vmqapi.Connect("attacker5", 5, properties=(("topic_alias_maximum", 5),)), 5)


@pytest.mark.parametrize("connect", [CONNECT, CONNECT5], ids=["mqtt3.1.1", "mqtt5"])
@ATTACK
@given(tail=st.binary(max_size=300))
def test_arbitrary_bytes_after_connect(target, connect, tail):
    node, control = target
    blast(mqtt_port(node), connect + tail)
    still_serving(node, control)


@ATTACK
@given(packets=st.lists(st.sampled_from([
    vmqapi.Publish("", b"x", properties=(("topic_alias", 1),)), vmqapi.Publish("a", b"x", properties=(
        ("topic_alias", 1), ("message_expiry_interval", 0))), vmqapi.Publish("b", b"y", 2, packet_id=1),
    vmqapi.Pubrel(1), vmqapi.Pubrel(9, 0x92), vmqapi.Puback(3, 0x80), vmqapi.Pubrec(4, 0x80),
    vmqapi.Subscribe(2, (("a/#", 0x2E),), (("subscription_identifier", 268435455),)),
    vmqapi.Subscribe(3, (("$share/g/a", 1),)), vmqapi.Unsubscribe(4, ("a/#", "zz")),
    vmqapi.Auth(0x19, (("authentication_method", "x"),)), vmqapi.Disconnect(0, (("session_expiry_interval", 9),)),
    vmqapi.Disconnect(0x04), vmqapi.Pingreq()]), max_size=8))
def test_well_formed_mqtt5_packets_in_any_order(target, packets):
    node, control = target
    blast(mqtt_port(node), CONNECT5 + b"".join(vmqapi.encode_packet(p, 5) for p in packets))
    still_serving(node, control)


@ATTACK
@given(first=st.integers(0, 255), length=st.binary(min_size=1, max_size=5), body=st.binary(max_size=40))
def test_bad_fixed_headers_and_lengths(target, first, length, body):
    node, control = target
    answer = blast(mqtt_port(node), CONNECT + bytes((first,)) + length + body)
    assert answer[:2] == b"\x20\x02" or answer == b""  # at most our CONNACK, then a close
    still_serving(node, control)


@ATTACK
@given(topic=st.binary(min_size=1, max_size=20))
def test_invalid_utf8_and_wildcard_topics(target, topic):
    node, control = target
    body = len(topic).to_bytes(2, "big") + topic + b"payload"
    blast(mqtt_port(node), CONNECT + b"\x30" + vmqapi.encode_length(len(body)) + body)
    still_serving(node, control)


def test_oversized_and_truncated_packets(target):
    node, control = target
    huge = vmqapi.encode_publish_header(b"\x00\x01t", 100_000, 0, False, False, None)
    blast(mqtt_port(node), CONNECT + huge + b"x" * 1000)  # over max_message_size: cut at the header
    blast(mqtt_port(node), CONNECT + vmqapi.encode_packet(vmqapi.Publish("t", b"x" * 50))[:-10])
    assert node.metrics.value("mqtt_invalid_msg_size_error") >= 1
    still_serving(node, control)


request_line = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                       max_size=120)


@ATTACK
@given(line=request_line, headers=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=5),
       query=st.text(max_size=60))
def test_arbitrary_http_requests(target, line, headers, query):
    node, control = target
    port = next(x["port"] for x in node.listeners() if x["type"] == "http")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers).encode("utf-8", "surrogatepass")
    for request in (line.encode("utf-8", "surrogatepass") + b"\r\n" + head + b"\r\n",
                    f"GET /api/v1/session/show?{query} HTTP/1.1\r\n".encode("utf-8", "surrogatepass") + head
                    + b"Connection: close\r\n\r\n"):
        answer = blast(port, request)
        if answer:
            status = int(answer.split(b" ")[1])
            assert status != 500 and 200 <= status < 600
    still_serving(node, control)


def test_memory_returns_to_baseline_after_attack_clients_leave(target):
    node, control = target
    import gc
    gc.collect()
    before = len(node.mqtt.engine.clients)
    socks = [socket.create_connection(("127.0.0.1", mqtt_port(node))) for _ in range(50)]
    for s in socks:
        s.sendall(CONNECT[:5])  # half a CONNECT each
    time.sleep(0.2)
    assert len(node.mqtt.engine.clients) >= before + 50
    for s in socks:
        s.close()
    end = time.monotonic() + 5
    while time.monotonic() < end and len(node.mqtt.engine.clients) > before:
        time.sleep(0.05)
    assert len(node.mqtt.engine.clients) == before
    assert node.in_broker(lambda: len(node.mqtt.engine.dirty)) == 0
    still_serving(node, control)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["http", "mqtt"])
def test_slowloris(target, kind):
    """200 connections that trickle bytes are cut off by the timeouts; a normal client keeps its answers."""
    node, control = target
    port = next(x["port"] for x in node.listeners() if x["type"] == kind)
    trickle = b"GET /api/v1/cluster/show HTTP/1.1\r\nX-Slow: " if kind == "http" else CONNECT[:-1]
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
    started = time.monotonic()
    closed = set()
    for step in range(40):  # a byte every 100 ms, bounded to 4 s; both timeouts are 2 s
        for n, s in enumerate(socks):
            if n in closed:
                continue
            try:
                s.sendall(trickle[step % len(trickle):step % len(trickle) + 1])
            except OSError:
                closed.add(n)
        if step % 10 == 0:
            still_serving(node, control)
        time.sleep(0.1)
        if len(closed) == len(socks):
            break
    for n, s in enumerate(socks):
        if n not in closed:
            s.settimeout(3)
            try:
                if s.recv(100) in (b"",):
                    closed.add(n)
            except OSError:
                closed.add(n)
        s.close()
    assert len(closed) == 200, f"{200 - len(closed)} trickling connections survived"
    assert time.monotonic() - started < 10
    still_serving(node, control)


def test_connection_flood_beyond_max_connections(make_node):
    node = make_node(**{"listener.tcp.default.max_connections": "20"})
    port = mqtt_port(node)
    clients = [MqttClient(port) for _ in range(20)]
    try:
        for n, c in enumerate(clients):
            assert c.connect(f"c{n}").return_code == 0
        refused = 0
        for n in range(30):
            extra = MqttClient(port)
            try:
                extra.connect(f"x{n}")
            except (ConnectionError, OSError):
                refused += 1
            finally:
                extra.close()
        assert refused == 30
        assert all(c.ping() for c in clients)
    finally:
        for c in clients:
            c.close()


def test_a_packet_trickled_after_connect_is_cut_off(make_node):
    node = make_node(mqtt_packet_timeout="700")
    c = MqttClient(mqtt_port(node))
    try:
        assert c.connect("slow-after-connect", keepalive=0).return_code == 0  # no keep-alive to save it
        frame = vmqapi.encode_packet(vmqapi.Publish("t", b"x" * 20))
        started = time.monotonic()
        for n in range(len(frame) - 1):
            try:
                c.send_raw(frame[n:n + 1])
            except OSError:
                break
            time.sleep(0.1)
            if c.closed(0.01):
                break
        assert time.monotonic() - started < 3 and c.closed(3)
        assert node.metrics.value("socket_close_timeout") == 1
    finally:
        c.close()
    idle = MqttClient(mqtt_port(node))
    try:
        assert idle.connect("idle-is-fine", keepalive=0).return_code == 0
        time.sleep(1.2)  # nothing half-sent: no timeout
        assert idle.ping()
    finally:
        idle.close()


def _capped_child():
    """In the child before exec: default signal dispositions, at most 1 GiB of address space."""
    import resource
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_a_catastrophic_regex_cannot_freeze_the_node(tmp_path):
    import http.client
    import os
    import subprocess
    import sys
    from test_cli import ROOT, stop_process, wait_for_node_file
    key = "k" * 32
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", str(tmp_path / "d"),
         "--set", "listener.http.default=127.0.0.1:0", "--set", "listener.tcp.default=127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, VMQAPI_API_KEYS=f"{key}:mgmt"),
        preexec_fn=_capped_child)
    clients = []
    try:
        info = wait_for_node_file(tmp_path / "d", proc)
        ports = {x["type"]: x["port"] for x in info["listeners"]}
        for client_id in ("a" * 25 + "!", "control"):  # (a+)+$ against 25 a's and a "!": 2**25 steps
            clients.append(MqttClient(ports["mqtt"]))
            assert clients[-1].connect(client_id).return_code == 0
        control = clients[-1]
        control.subscribe(("control", 1))
        answers = {}

        def ask(name, query):
            conn = http.client.HTTPConnection("127.0.0.1", ports["http"], timeout=60)
            conn.request("GET", "/api/v1/session/show?" + query, headers={"x-api-key": key})
            resp = conn.getresponse()
            answers[name] = (resp.status, body_json(resp.read()))
            conn.close()

        worst = 0.0
        for name, query in (("nested", "--client_id=~(a%2B)%2B%24"), ("allowed", "--client_id=~.*.*.*%21%24")):
            asker = threading.Thread(target=ask, args=(name, query))
            asker.start()
            deadline = time.monotonic() + 60
            while True:
                started = time.monotonic()
                control.publish("control", b"ping", 1)
                assert control.message(timeout=30).payload == b"ping"
                worst = max(worst, time.monotonic() - started)
                if not asker.is_alive() or time.monotonic() > deadline:
                    break
            asker.join(60)
        assert worst < 0.5, f"a control round trip took {worst:.2f} s"
        assert answers["nested"][0] == 400 and answers["nested"][1]["error"] == "invalid_value", answers
        status, body = answers["allowed"]
        assert status == 200 and [r["client_id"] for r in body["table"]] == ["a" * 25 + "!"], answers
    finally:
        for c in clients:
            c.close()
        stop_process(proc)
