"""The MQTT I/O shell's bounds: what a client can make the node hold, and when it is cut off.

Memory attacks run the node in a child process under an address-space cap (tests/capped.py)
and measure its RSS while a control client keeps its round trip.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
import urllib.request

import pytest

from capped import capped_node
from mqtt_client import MqttClient, WsMqttClient
from test_broker import mqtt_port
import vmqapi

MB = 1 << 20


def control_round_trip(port, client_id="control"):
    """Connect, subscribe, publish at QoS 1 and receive it; return the seconds it took."""
    started = time.monotonic()
    c = MqttClient(port)
    try:
        assert c.connect(client_id).return_code == 0
        c.subscribe(("ctl/" + client_id, 1))
        c.publish("ctl/" + client_id, b"ping", 1)
        assert c.message().payload == b"ping"
    finally:
        c.close()
    return time.monotonic() - started


def publish_header(size, topic=b"big"):
    """The first bytes of a QoS 0 PUBLISH whose whole payload is ``size`` bytes."""
    body = len(topic).to_bytes(2, "big") + topic
    return b"\x30" + vmqapi.encode_length(len(body) + size) + body


def send_some(sock, data, seconds):
    """Send as much of ``data`` as the peer takes within ``seconds``; return the bytes sent."""
    sock.setblocking(False)
    sent, end = 0, time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < end:
        try:
            sent += sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.005)
        except OSError:
            break
    return sent


def hard_close(sock):
    """Close with a reset: what the socket still had to send is dropped at once, not left to the kernel."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def is_closed(sock, timeout):
    """Whether the peer closed ``sock`` (or reset it) within ``timeout`` seconds."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


# -- before CONNECT ------------------------------------------------------------------------

def test_a_question_to_the_loop_gets_an_answer_when_the_loop_stops_first(make_node):
    """A read queued just before the loop stops is answered 503 at once, not after its 30 s timeout."""
    node = make_node()
    io = node.mqtt
    holding = threading.Event()

    def hold():  # the question and the stop then meet in one turn of the loop, the question's first
        holding.set()
        time.sleep(0.5)
    io.loop.call_soon_threadsafe(hold)
    assert holding.wait(5)
    got = []

    def ask():
        began = time.monotonic()
        try:
            got.append(io.read(lambda: "answered", timeout=20))
        except vmqapi.VmqError as exc:
            got.append(exc)
        got.append(time.monotonic() - began)
    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.1)
    io.loop.call_soon_threadsafe(io.loop.stop)
    asker.join(25)
    assert not asker.is_alive()
    answer, waited = got
    assert waited < 5
    assert answer == "answered" or isinstance(answer, vmqapi.BrokerStopped)


def test_a_connection_that_does_not_begin_with_connect_is_closed_at_once(make_node):
    node = make_node(mqtt_connect_timeout="30000")
    with socket.create_connection(("127.0.0.1", mqtt_port(node)), timeout=5) as sock:
        sock.sendall(publish_header(1000))  # a PUBLISH announcing more to come, before any CONNECT
        assert is_closed(sock, 1.0)


def test_sockets_that_are_not_yet_accepted_cannot_make_the_node_hold_much(tmp_path):
    with capped_node(tmp_path / "d", "allow_anonymous=off") as node:
        port = node.port("mqtt")
        before = node.rss()
        socks, chunk = [], b"\0" * 65536
        try:
            for _ in range(30):  # each announces a 200 MB CONNECT and sends 3 MB of it
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                socks.append(sock)
                head = b"\x10" + vmqapi.encode_length(200 * MB)
                send_some(sock, head + chunk * 48, 2)
            grown = node.rss() - before
            assert all(is_closed(s, 2) for s in socks)
            assert grown < 20 * MB, f"the node grew by {grown / MB:.0f} MB"
            assert node.alive() and "Traceback" not in node.log()
        finally:
            for s in socks:
                hard_close(s)


# -- after CONNECT: unfinished packets share one budget ---------------------------------------

def test_unfinished_packets_share_a_node_wide_budget(tmp_path):
    budget = 16 * MB
    with capped_node(tmp_path / "d", f"partial_packet_budget={budget}") as node:
        port = node.port("mqtt")
        before = node.rss()
        clients = []
        try:
            for n in range(12):  # each sends 4 MB of a 200 MB PUBLISH: 48 MB against a 16 MB budget
                c = MqttClient(port)
                clients.append(c)
                assert c.connect(f"big{n}").return_code == 0
                send_some(c.sock, publish_header(200 * MB) + b"\0" * (4 * MB), 5)
            assert control_round_trip(port) < 5
            grown = node.rss() - before
            assert grown < budget + 24 * MB, f"the node grew by {grown / MB:.0f} MB"
            assert node.metric("socket_close_partial_budget") >= 7
            assert sum(is_closed(c.sock, 0.5) for c in clients) >= 7  # the largest holders went
            assert node.alive() and "Traceback" not in node.log()
        finally:
            for c in clients:
                hard_close(c.sock)


@pytest.mark.slow
def test_a_large_packet_is_taken_in_without_quadratic_copies(tmp_path):
    size = 96 * MB
    with capped_node(tmp_path / "d", "partial_packet_budget=134217728", "max_online_bytes=134217728",
                     cap=3 << 30) as node:  # a subscriber may hold the whole message
        port = node.port("mqtt")
        sub = MqttClient(port, timeout=60)
        pub = MqttClient(port, timeout=60)
        try:
            assert sub.connect("sub").return_code == 0
            sub.subscribe(("big", 0))
            assert pub.connect("pub").return_code == 0
            started = time.monotonic()
            pub.send_raw(publish_header(size) + b"\1" * size)  # copying the buffer per read: minutes
            got, want = 0, len(publish_header(size)) + size
            while got < want:  # counted, not decoded: the test client's own buffer would be the slow part
                chunk = sub.sock.recv(1 << 20)
                assert chunk, "the subscriber was disconnected"
                got += len(chunk)
            assert got == want and time.monotonic() - started < 30
        finally:
            sub.close()
            pub.close()


# -- answers a peer does not read ----------------------------------------------------------

def slow_reader(port, client_id, *subscriptions, version=4):
    """A connected client with a tiny receive buffer that never reads after its SUBACK."""
    c = MqttClient(port, version=version)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert c.connect(client_id, keepalive=0).return_code == 0
    if subscriptions:
        pid = c.pid()
        c.send(vmqapi.Subscribe(pid, tuple(subscriptions)))
    return c


def flood(sock, frame, seconds):
    """Send ``frame`` again and again without reading; return how many bytes went out."""
    return send_some(sock, frame * (4 * MB // len(frame)) * 16, seconds)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_a_peer_that_never_reads_cannot_grow_the_node(tmp_path, transport):
    settings = ["mqtt_write_timeout=30000"]
    if transport == "ws":
        settings.append("listener.ws.default=127.0.0.1:0")
    with capped_node(tmp_path / "d", *settings) as node:
        before = node.rss()
        if transport == "ws":
            c = WsMqttClient(node.port("mqttws"))
            assert c.handshake.startswith("HTTP/1.1 101")
            frame = WsMqttClient.frame(9, b"p" * 125)  # WebSocket pings: each asks for a pong
        else:
            c = MqttClient(node.port("mqtt"))
            frame = vmqapi.encode_packet(vmqapi.Pingreq())
        try:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            assert c.connect("flooder", keepalive=0).return_code == 0
            sent = flood(c.sock, frame, 3)  # until the socket buffers on both sides are full
            first = node.rss() - before
            sent += flood(c.sock, frame, 3)  # reading on, the node held about 2 MB more per second of this
            grown = node.rss() - before
            assert control_round_trip(node.port("mqtt")) < 5
            assert grown - first < 2 * MB and grown < 24 * MB, \
                f"{sent / MB:.0f} MB of pings grew the node by {first / MB:.1f}, then {grown / MB:.1f} MB"
            assert node.metric("socket_close_write_timeout") == 0  # not yet: mqtt_write_timeout is 30 s
        finally:
            c.close()
        assert node.alive() and "Traceback" not in node.log()


def test_a_connection_that_leaves_its_answers_unread_is_closed_after_mqtt_write_timeout(make_node):
    node = make_node(mqtt_write_timeout="1000")
    stalled = slow_reader(mqtt_port(node), "stalled", ("big", 0))
    pub = MqttClient(mqtt_port(node))
    try:
        assert pub.connect("pub").return_code == 0
        time.sleep(0.2)
        for _ in range(12):  # 12 MB for a reader that takes nothing: more than both sides' socket buffers
            pub.publish("big", b"\0" * MB)
        deadline = time.monotonic() + 10
        while node.metrics.value("socket_close_write_timeout") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.metrics.value("socket_close_write_timeout") == 1
        assert node.in_broker(lambda: "stalled" not in {c.session.client_id for c in node.mqtt.engine.clients
                                                        if c.session is not None})
    finally:
        hard_close(stalled.sock)
        pub.close()


# -- WebSocket before the upgrade ----------------------------------------------------------

def ws_port(node):
    return next(x["port"] for x in node.listeners() if x["type"] == "mqttws")


def test_websocket_handshakes_and_silent_sockets_are_timed_out(make_node):
    node = make_node(**{"listener.ws.default": "127.0.0.1:0", "mqtt_connect_timeout": "1000"})
    socks = []
    try:
        for n in range(40):
            sock = socket.create_connection(("127.0.0.1", ws_port(node)), timeout=5)
            if n % 2:
                sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")  # a handshake never finished
            socks.append(sock)
        upgraded = WsMqttClient(ws_port(node))  # upgraded, then no CONNECT
        socks.append(upgraded.sock)
        assert upgraded.handshake.startswith("HTTP/1.1 101")
        time.sleep(1.5)
        assert all(is_closed(s, 1.5) for s in socks)
    finally:
        for s in socks:
            s.close()


def test_websocket_sockets_count_against_max_connections(make_node):
    node = make_node(**{"listener.ws.default": "127.0.0.1:0", "listener.ws.default.max_connections": "5"})
    socks = [socket.create_connection(("127.0.0.1", ws_port(node)), timeout=5) for _ in range(5)]
    try:
        extra = socket.create_connection(("127.0.0.1", ws_port(node)), timeout=5)
        socks.append(extra)
        assert is_closed(extra, 2)  # the sixth, before any handshake
        row = next(x for x in node.listeners() if x["type"] == "mqttws")
        assert row["port"] == ws_port(node)
    finally:
        for s in socks:
            s.close()


def test_a_websocket_handshake_over_the_cap_in_one_read_is_refused(make_node):
    node = make_node(**{"listener.ws.default": "127.0.0.1:0"})
    headers = "".join(f"X-H{n}: v\r\n" for n in range(10000))  # about 120 KB
    with socket.create_connection(("127.0.0.1", ws_port(node)), timeout=5) as sock:
        sock.sendall((f"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                      f"Sec-WebSocket-Protocol: mqtt\r\n{headers}\r\n").encode())
        answer = sock.recv(200)
        assert not answer.startswith(b"HTTP/1.1 101") and answer.startswith(b"HTTP/1.1 431")


def test_a_websocket_handshake_from_another_sites_page_is_refused(make_node):
    """A browser sends Origin with every WebSocket handshake: another site's page could publish and subscribe
    through a local listener with loopback's anonymous access. Own origin, none, and listed ones are taken."""
    node = make_node(**{"listener.ws.default": "127.0.0.1:0", "websocket_allowed_origins": "https://Dash.example"})
    host = f"127.0.0.1:{ws_port(node)}"

    def status(origin):
        with socket.create_connection(("127.0.0.1", ws_port(node)), timeout=5) as sock:
            sock.sendall((f"GET /mqtt HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                          f"Sec-WebSocket-Protocol: mqtt\r\n{origin}\r\n").encode())
            return sock.recv(200).split(b"\r\n")[0]
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1", f"http://{host}.evil.example",
                   "https://dash.example:444"):
        assert status(f"Origin: {origin}\r\n") == b"HTTP/1.1 403 Forbidden", origin
    for origin in ("", f"Origin: http://{host}\r\n", f"Origin: HTTPS://{host}\r\n",
                   "Origin: https://dash.example\r\n"):
        assert status(origin) == b"HTTP/1.1 101 Switching Protocols", origin
    with pytest.raises(vmqapi.InvalidValue, match="http"):
        make_node(websocket_allowed_origins="dash.example")


def test_a_continuation_frame_with_nothing_to_continue_fails_the_connection(make_node):
    node = make_node(**{"listener.ws.default": "127.0.0.1:0"})
    c = WsMqttClient(ws_port(node))
    try:
        c.sock.sendall(c.frame(0, vmqapi.encode_packet(vmqapi.Connect("orphan"))))
        assert c.read() is None and c.close_code == 1002  # RFC 6455 5.4
    finally:
        c.close()


def test_a_text_frame_inside_a_fragmented_message_fails_the_connection(make_node):
    node = make_node(**{"listener.ws.default": "127.0.0.1:0"})
    c = WsMqttClient(ws_port(node))
    try:
        connect = vmqapi.encode_packet(vmqapi.Connect("fragments"))
        c.sock.sendall(c.frame(2, connect[:4], fin=False) + c.frame(1, b"text"))
        assert c.read() is None and c.close_code == 1002  # RFC 6455 5.4, not 1003
    finally:
        c.close()


# -- timing ----------------------------------------------------------------------------------

def test_keepalive_is_enforced_at_one_and_a_half_times(make_node):
    node = make_node()
    alive, pings = MqttClient(mqtt_port(node)), []
    assert alive.connect("pinger", keepalive=1).return_code == 0

    def ping_every_1_2_s():  # beside the silent clients, in the same seconds
        for _ in range(3):
            time.sleep(1.2)
            try:
                pings.append(bool(alive.ping()))
            except (OSError, ConnectionError) as exc:
                pings.append(repr(exc))

    pinger = threading.Thread(target=ping_every_1_2_s)
    pinger.start()
    silent = [MqttClient(mqtt_port(node)) for _ in range(3)]
    try:
        for n, c in enumerate(silent):  # the old half-second tick let such a client live half of the time
            assert c.connect(f"ka{n}", keepalive=1).return_code == 0
            time.sleep(0.17)  # the next one at another phase of the node's tick
        time.sleep(1.75 - 0.17 * 3)
        for n, c in enumerate(silent):
            if n:
                time.sleep(0.17)  # ka<n> too has been silent 1.75 s now
            try:
                c.send(vmqapi.Pingreq())
            except OSError:
                continue
            assert c.closed(1), "a client silent 1.75 s with keep-alive 1 is still connected"
        pinger.join(10)
        assert pings == [True] * 3, pings
    finally:
        pinger.join(10)
        for c in (*silent, alive):
            c.close()


def test_a_server_disconnect_respects_the_clients_maximum_packet_size(make_node):
    node = make_node()
    c = MqttClient(mqtt_port(node), version=5)
    try:
        assert c.connect("tiny", properties=(("maximum_packet_size", 10),)).return_code == 0
        c.send_raw(b"\x30\x02\x00\x05")  # a topic length past the packet: malformed, with a reason string
        data, end = b"", time.monotonic() + 5
        while time.monotonic() < end:
            chunk = c.sock.recv(100)
            if not chunk:
                break
            data += chunk
        assert data and data[0] == 0xE0 and len(data) <= 10, data  # DISCONNECT, reason code only
    finally:
        c.close()


# -- file descriptors --------------------------------------------------------------------------

def test_the_admin_api_stays_reachable_when_mqtt_sockets_use_every_descriptor(tmp_path):
    with capped_node(tmp_path / "d", nofile=(400, 400)) as node:
        socks = []
        try:
            for _ in range(450):
                try:
                    socks.append(socket.create_connection(("127.0.0.1", node.port("mqtt")), timeout=2))
                except OSError:
                    break
            time.sleep(0.5)
            started = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{node.port('http')}/health", timeout=5) as resp:
                assert resp.status == 200
            assert time.monotonic() - started < 2
            assert node.metric("socket_close_no_descriptors") > 0
        finally:
            for s in socks:
                hard_close(s)
        assert "Traceback" not in node.log()


def test_the_node_raises_its_descriptor_limit_toward_the_hard_one(tmp_path):
    with capped_node(tmp_path / "d", nofile=(256, 4096)) as node:
        with open(f"/proc/{node.pid}/limits") as fh:
            line = next(x for x in fh if x.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"]
        assert "file descriptor limit (4096) is below" in node.log()  # 10000 + 10000 wanted


# -- what a client can make the node send ------------------------------------------------------

@pytest.mark.slow
def test_one_subscribe_cannot_make_the_node_send_retained_messages_without_bound(tmp_path):
    with capped_node(tmp_path / "d") as node:
        port = node.port("mqtt")
        pub = MqttClient(port)
        try:
            assert pub.connect("retainer").return_code == 0
            for n in range(8):
                pub.publish(f"r/{n}", b"\1" * MB, 1, retain=True)
            before = node.rss()
            reader = slow_reader(port, "amplifier", *[("#", 1)] * 30)  # 30 x 8 MB of retained copies asked
            time.sleep(2)
            assert control_round_trip(port) < 5
            grown = node.rss() - before
            assert grown < 64 * MB, f"one SUBSCRIBE grew the node by {grown / MB:.0f} MB"
            reader.close()
        finally:
            pub.close()
        assert node.alive() and "Traceback" not in node.log()


@pytest.mark.slow
def test_a_large_qos0_message_is_not_copied_for_every_subscriber_that_does_not_read(tmp_path):
    # Over max_online_bytes (8 MB), it goes to an empty queue all the same, but such messages still in
    # the buffers of peers that do not read share max_queued_bytes: one copy here, not eight.
    with capped_node(tmp_path / "d", f"max_queued_bytes={48 * MB}") as node:
        port = node.port("mqtt")
        readers = [slow_reader(port, f"slow{n}", ("big", 0)) for n in range(8)]
        pub = MqttClient(port, timeout=30)
        try:
            time.sleep(0.5)
            before = node.rss()
            assert pub.connect("pub").return_code == 0
            pub.send_raw(publish_header(40 * MB) + b"\1" * (40 * MB))
            time.sleep(2)
            assert control_round_trip(port) < 5
            grown = node.rss() - before
            assert grown < 96 * MB, f"one 40 MB message grew the node by {grown / MB:.0f} MB"
            assert node.metric("queue_message_drop") >= 7
        finally:
            pub.close()
            for r in readers:
                r.close()


@pytest.mark.slow
def test_a_large_qos1_message_waits_for_subscribers_that_do_not_read_without_a_copy_each(tmp_path):
    # At QoS 1 it is not dropped: each queue holds it (counted once), and a copy leaves a queue only while
    # the outboxes and unread peer buffers leave room under max_queued_bytes.
    with capped_node(tmp_path / "d", f"max_queued_bytes={48 * MB}") as node:
        port = node.port("mqtt")
        readers = [slow_reader(port, f"slow{n}", ("big", 1)) for n in range(8)]
        pub = MqttClient(port, timeout=30)
        try:
            time.sleep(0.5)
            before = node.rss()
            assert pub.connect("pub").return_code == 0
            pub.send_raw(b"\x32" + vmqapi.encode_length(40 * MB + 7) + b"\0\3big\0\1" + b"\1" * (40 * MB))
            assert isinstance(pub.read(20), vmqapi.Puback)
            time.sleep(2)
            assert control_round_trip(port) < 5
            grown = node.rss() - before
            assert grown < 96 * MB, f"one 40 MB message grew the node by {grown / MB:.0f} MB"
            assert node.metric("queue_message_drop") == 0
        finally:
            pub.close()
            for r in readers:
                r.close()


def test_a_connect_and_a_large_publish_in_one_write_are_both_taken(make_node):
    node = make_node()
    sub = MqttClient(mqtt_port(node))
    pub = MqttClient(mqtt_port(node))
    try:
        assert sub.connect("sub").return_code == 0
        sub.subscribe(("big", 0))
        payload = b"\2" * (300 * 1024)  # over max_connect_size: allowed once CONNECT is accepted
        pub.send_raw(vmqapi.encode_packet(vmqapi.Connect("pipelined")) + publish_header(len(payload)) + payload)
        assert sub.message(timeout=10).payload == payload
    finally:
        sub.close()
        pub.close()


def test_a_websocket_frame_before_connect_is_bounded_by_max_connect_size(make_node):
    node = make_node(**{"listener.ws.default": "127.0.0.1:0", "max_connect_size": "65536"})
    with socket.create_connection(("127.0.0.1", ws_port(node)), timeout=5) as sock:
        sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Protocol: mqtt\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        sock.sendall(bytes((0x82, 0xFF)) + (1 << 20).to_bytes(8, "big") + b"mask")  # a 1 MB frame announced
        data = b""
        while len(data) < 4:
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
        assert data[:4] == b"\x88\x02\x03\xf1"  # close 1009: too big, said at once (RFC 6455 7.4.1)


def test_the_partial_packet_budget_closes_connections_not_yet_accepted_first(make_node):
    node = make_node(partial_packet_budget="1048576", max_connect_size="262144")
    port = mqtt_port(node)
    uploader = MqttClient(port)
    strangers = []
    try:
        assert uploader.connect("uploader").return_code == 0
        uploader.send_raw(publish_header(2 * MB) + b"\0" * (700 * 1024))  # 700 KB of an upload held
        time.sleep(0.3)
        for _ in range(6):  # 6 x 200 KB of CONNECTs never finished: over the 1 MB budget together
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"\x10" + vmqapi.encode_length(250 * 1024) + b"\0" * (200 * 1024))
            strangers.append(s)
        time.sleep(0.5)
        assert node.metrics.value("socket_close_partial_budget") >= 1
        assert not uploader.closed(0.3)  # the known client's upload goes on
    finally:
        uploader.close()
        for s in strangers:
            s.close()


def test_topics_deeper_than_max_topic_levels_are_refused(make_node):
    node = make_node(max_topic_levels="8")
    deep = "/".join("a" * 8) + "/b"  # 9 levels
    c = MqttClient(mqtt_port(node))
    try:
        assert c.connect("deep").return_code == 0
        assert c.subscribe((deep, 0), ("a/b", 0)) == (0x80, 0)
        c.send(vmqapi.Publish(deep, b"x"))
        assert c.closed(2)
    finally:
        c.close()


def test_delayed_wills_count_against_max_queued_bytes(make_node):
    node = make_node(max_queued_bytes="120000")
    watcher = MqttClient(mqtt_port(node))
    clients = []
    try:
        assert watcher.connect("watcher").return_code == 0
        watcher.subscribe(("wills/#", 0))
        for n in range(5):  # 5 x 50 KB wills waiting an hour: only two fit in 120 KB
            c = MqttClient(mqtt_port(node), version=5)
            clients.append(c)
            assert c.connect(f"w{n}", False, will_topic=f"wills/{n}", will_payload=b"w" * 50_000,
                             will_properties=(("will_delay_interval", 3600),),
                             properties=(("session_expiry_interval", 3600),)).return_code == 0
            c.close()  # no DISCONNECT: the will is due, after its delay
        got = set()
        for _ in range(3):  # the three that do not fit go out at once
            got.add(watcher.message(timeout=5).topic)
        assert len(got) == 3
        watcher.no_message(0.5)
        assert node.in_broker(lambda: node.mqtt.engine.queued_bytes) <= 120000
    finally:
        watcher.close()


def test_acknowledgements_fit_the_clients_maximum_packet_size(make_node):
    node = make_node(max_client_id_size="5")
    c = MqttClient(mqtt_port(node), version=5)
    try:  # refused for its long id: the CONNACK's reason string would make it 40 bytes
        c.send(vmqapi.Connect("much-too-long", 5, properties=(("maximum_packet_size", 8),)))
        data = c.sock.recv(100)
        assert len(data) <= 8 and data[0] == 0x20 and data[3] == 0x85, data
    finally:
        c.close()
    c = MqttClient(mqtt_port(node), version=5)
    try:
        assert c.connect("tiny", properties=(("maximum_packet_size", 12),)).return_code == 0
        c.send(vmqapi.Subscribe(1, tuple((f"t/{n}", 0) for n in range(20))))  # a 25-byte SUBACK: not sent
        c.send(vmqapi.Subscribe(2, (("a", 0),)))
        assert c.expect(vmqapi.Suback).packet_id == 2
    finally:
        c.close()


# -- what one packet may cost the loop every client shares -------------------------------------

def empty_user_properties(n):
    """A property list of ``n`` empty user properties: 5 bytes each, the cheapest to send."""
    body = b"\x26\x00\x00\x00\x00" * n
    return vmqapi.encode_length(len(body)) + body


def connect5_with(props, client_id=b"attacker"):
    """An MQTT 5 CONNECT whose property list is ``props`` (already encoded)."""
    body = b"\x00\x04MQTT\x05\x02\x00\x3c" + props + len(client_id).to_bytes(2, "big") + client_id
    return b"\x10" + vmqapi.encode_length(len(body)) + body


def publish5_with(props, topic=b"t"):
    """An MQTT 5 QoS 0 PUBLISH whose property list is ``props`` (already encoded)."""
    body = len(topic).to_bytes(2, "big") + topic + props + b"x"
    return b"\x30" + vmqapi.encode_length(len(body)) + body


def answers(sock, timeout):
    """The MQTT 5 packets the node sends before it closes ``sock`` (within ``timeout`` seconds)."""
    buf, end, packets = b"", time.monotonic() + timeout, []
    sock.settimeout(timeout)
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
    pos = 0
    while (result := vmqapi.decode_packet(buf, pos, 0, 5)) is not None:
        packet, pos = result
        packets.append(packet)
    return packets


def attack(port, data, seconds, seen):
    """Open connections that send ``data`` for ``seconds``; note in ``seen`` what each heard back."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(seen) < 200:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                with contextlib.suppress(OSError):
                    sock.sendall(data)
                seen.append(answers(sock, 10))
        except OSError:
            seen.append(None)


def test_packets_full_of_properties_cannot_hold_the_loop(tmp_path):
    with capped_node(tmp_path / "d") as node:  # defaults: max_properties_per_packet 128, max_connect_size 256 KB
        port = node.port("mqtt")
        control = MqttClient(port)
        control.connect("control")
        control.subscribe(("ctl", 0))
        heavy_publish = connect5_with(b"\x00", b"publisher") \
            + publish5_with(empty_user_properties(1_900_000))  # 9.5 MB: 1.9 million properties
        heavy_connect = connect5_with(empty_user_properties(52_000))  # 260 KB, before any credential
        seen = {"publish": [], "connect": []}
        threads = [threading.Thread(target=attack, args=(port, heavy_publish, 2, seen["publish"]))] + [
            threading.Thread(target=attack, args=(port, heavy_connect, 2, seen["connect"])) for _ in range(3)]
        trips = []
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads) and len(trips) < 100_000:
                started = time.monotonic()
                control.publish("ctl", b"ping")
                assert control.message(timeout=30).payload == b"ping"
                trips.append(time.monotonic() - started)
        finally:
            for t in threads:
                t.join(60)
            control.close()
        trips.sort()
        median, worst = trips[len(trips) // 2], trips[-1]
        print(f"control round trips: {len(trips)}, median {median * 1000:.1f} ms, worst {worst * 1000:.0f} ms; "
              f"attacks: {len(seen['publish'])} PUBLISH, {len(seen['connect'])} CONNECT")
        assert median < 0.05 and worst < 0.5, f"median {median * 1000:.0f} ms, worst {worst * 1000:.0f} ms"
        assert seen["publish"] and all(
            p and isinstance(p[-1], vmqapi.Disconnect) and p[-1].reason_code == 0x95 for p in seen["publish"])
        assert seen["connect"] and all(
            p and isinstance(p[0], vmqapi.Connack) and p[0].return_code == 0x95 for p in seen["connect"])
        assert node.metric("mqtt_packet_limit_error") == len(seen["publish"]) + len(seen["connect"])
        assert node.alive() and "Traceback" not in node.log()


def test_a_packet_with_as_many_properties_as_allowed_is_delivered_whole(tmp_path):
    with capped_node(tmp_path / "d", "max_properties_per_packet=128") as node:
        port = node.port("mqtt")
        sub, pub = MqttClient(port, version=5), MqttClient(port, version=5)
        try:
            assert sub.connect("sub").return_code == 0
            sub.subscribe(("t", 0))
            assert pub.connect("pub").return_code == 0
            props = tuple(("user_property", ("k", str(n))) for n in range(128))
            pub.publish("t", b"x", properties=props)
            assert sub.message().properties == props
            pub.publish("t", b"y", properties=props + (("content_type", "one more"),))
            assert pub.expect(vmqapi.Disconnect).reason_code == 0x95 and pub.closed(5)
            assert sub.no_message()
            assert node.metric("mqtt_packet_limit_error") == 1
        finally:
            sub.close()
            pub.close()


def measure_round_trips(control, busy, limit=100_000):
    """Round trips (seconds, sorted) of a control client's QoS 0 message while ``busy()`` is true."""
    trips = []
    while busy() and len(trips) < limit:
        started = time.monotonic()
        control.publish("ctl", b"ping")
        assert control.message(timeout=30).payload == b"ping"
        trips.append(time.monotonic() - started)
    return sorted(trips)


def test_topic_filters_cannot_hold_the_loop(tmp_path):
    with capped_node(tmp_path / "d") as node:  # max_subscriptions_per_client 1000: filters per packet too
        port = node.port("mqtt")
        control, piped, huge = MqttClient(port), MqttClient(port, timeout=30), MqttClient(port, timeout=30)
        try:
            for c, name in ((control, "control"), (piped, "piped"), (huge, "huge")):
                assert c.connect(name).return_code == 0
            control.subscribe(("ctl", 0))
            full = vmqapi.encode_packet(vmqapi.Subscribe(1, tuple((f"f/{n}", 1) for n in range(1000))))
            over = vmqapi.encode_packet(vmqapi.Subscribe(2, tuple((f"f/{n}", 1) for n in range(50_000))))
            piped.send_raw(full * 40)  # pipelined: one read of the node holds many
            huge.send_raw(over)
            done = []
            waiter = threading.Thread(target=lambda: done.append(
                [piped.expect(vmqapi.Suback).return_codes for _ in range(40)]))
            waiter.start()
            trips = measure_round_trips(control, waiter.is_alive)
            waiter.join(60)
            worst = trips[-1]
            print(f"control round trips: {len(trips)}, worst {worst * 1000:.0f} ms")
            assert worst < 0.25, f"a control round trip took {worst * 1000:.0f} ms"
            assert done and all(codes == (1,) * 1000 for codes in done[0])  # 1000 filters: as many as allowed
            assert huge.closed(5)
            assert node.metric("mqtt_packet_limit_error") == 1
        finally:
            for c in (control, piped, huge):
                c.close()


def ws_payloads(data):
    """The payloads of the unmasked server frames in ``data``, joined (every frame must be whole)."""
    out, pos = bytearray(), 0
    while pos < len(data):
        n, i = data[pos + 1] & 0x7F, pos + 2
        if n == 126:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        assert data[pos] == 0x82 and i + n <= len(data)
        out += data[i:i + n]
        pos = i + n
    return bytes(out)


@pytest.mark.slow
def test_a_websocket_read_of_many_frames_takes_one_turn_of_the_loop(tmp_path):
    """One 256 KiB read of 32768 one-PINGREQ frames, eight times: a TCP client's PINGREQ still comes back
    soon, and every PINGRESP is sent, in order."""
    bursts, per_burst = 8, 256 * 1024 // 8
    with capped_node(tmp_path / "data", "listener.ws.web=127.0.0.1:0") as node:
        control = MqttClient(node.port("mqtt"))
        attacker = WsMqttClient(node.port("mqttws"))
        try:
            assert control.connect("control").return_code == 0
            assert attacker.connect("attacker").return_code == 0
            burst = WsMqttClient.frame(2, b"\xc0\x00") * per_burst
            received = bytearray()

            def drain():  # until the node has sent nothing for half a second
                attacker.sock.settimeout(0.5)
                with contextlib.suppress(OSError):
                    while chunk := attacker.sock.recv(1 << 20):
                        received.extend(chunk)

            reader = threading.Thread(target=drain, daemon=True)
            sender = threading.Thread(target=lambda: [attacker.sock.sendall(burst) for _ in range(bursts)])
            reader.start()
            sender.start()
            rtts, end = [], time.monotonic() + 20
            while reader.is_alive() and time.monotonic() < end:  # while the node answers the attacker
                started = time.perf_counter()
                control.ping()
                rtts.append(time.perf_counter() - started)
            sender.join(20)
            reader.join(20)
            assert len(rtts) > 10 and max(rtts) < 0.1, (len(rtts), max(rtts, default=0))
            assert ws_payloads(received) == b"\xd0\x00" * (bursts * per_burst)
        finally:
            control.close()
            attacker.close()


def test_whole_packets_left_for_a_later_turn_are_not_unfinished_ones(make_node):
    """A known client's 256 KiB burst of small QoS 0 PUBLISHes, decoded over several turns of the loop,
    is not charged to partial_packet_budget: only the packet still unfinished is."""
    node = make_node(partial_packet_budget="65536")
    port = mqtt_port(node)
    sub, pub = MqttClient(port), MqttClient(port)
    try:
        assert sub.connect("sub").return_code == 0
        sub.subscribe(("t", 0))
        assert pub.connect("pub").return_code == 0
        packet = vmqapi.encode_packet(vmqapi.Publish("t", b"x" * 10), 4)
        pub.send_raw(packet * (256 * 1024 // len(packet)))
        got, end = 0, time.monotonic() + 10
        while got < 256 * 1024 // len(packet) and time.monotonic() < end and sub.read(2) is not None:
            got += 1
        assert got == 256 * 1024 // len(packet)
        assert node.metrics.value("socket_close_partial_budget") == 0
        assert pub.ping()
    finally:
        sub.close()
        pub.close()


def test_a_large_qos1_message_reaches_every_subscriber_however_many(tmp_path):
    """2 MB, over max_online_bytes, to eight QoS 1 subscribers: eight copies would pass max_queued_bytes in
    the outboxes at once, so some wait for room there instead of being dropped."""
    with capped_node(tmp_path / "d", f"max_online_bytes={MB}", f"max_queued_bytes={8 * MB}") as node:
        port = node.port("mqtt")
        subs = [MqttClient(port, timeout=10) for _ in range(8)]
        pub = MqttClient(port, timeout=10)
        try:
            for n, sub in enumerate(subs):
                assert sub.connect(f"s{n}").return_code == 0
                sub.subscribe(("big", 1))
            assert pub.connect("pub").return_code == 0
            pub.publish("big", b"x" * 2_000_000, qos=1)
            assert [len(sub.message(timeout=5).payload) for sub in subs] == [2_000_000] * 8
            assert node.metric("queue_message_drop") == 0
        finally:
            pub.close()
            for sub in subs:
                sub.close()


def test_every_mqtt_connection_is_sent_without_nagle_delay(make_node):
    """A small acknowledgement is sent at once (TCP_NODELAY on the node's side), over TCP and WebSocket alike."""
    node = make_node(**{"listener.ws.default": "127.0.0.1:0"})
    clients = [MqttClient(mqtt_port(node)), WsMqttClient(ws_port(node))]
    try:
        for n, c in enumerate(clients):
            c.connect(f"nagle{n}")

        def nodelay():
            return sorted((c.session.client_id, c.link.transport.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0) for c in node.mqtt.engine.clients)
        assert node._read(nodelay) == [("nagle0", True), ("nagle1", True)]
    finally:
        for c in clients:
            c.close()
