"""Attacks on this round's surfaces: a peer with the cookie that sends hostile frames of kinds 16-20.

The node runs in a child process under an address-space cap (tests/capped.py); the hostile
peer is the module's own ClusterLinks (it runs the cookie's handshake) on a loop of its own
in this process. The project's rule: a bad frame or row costs one log line, never a
traceback, never the node's start, never memory without bound.
"""

from __future__ import annotations

import asyncio
import base64
import os
import select
import socket
import threading
import time

import pytest

import vmqapi
from capped import capped_node
from mqtt_client import MqttClient

COOKIE = "attack-cookie-of-the-tests"
NODE = "vmqapi@127.0.0.1"  # the default nodename of a capped node
EVIL = "evil@127.0.0.1"
T = vmqapi.encode_term
SYNC = "cluster_sync_interval=100"  # ms between the cluster's rounds (key file sync, saving rows): 1 s by default


class FakePeer:
    """A node with the cookie, linked to the capped node: it sends what it likes and records what comes back."""

    def __init__(self, port, cookie=COOKIE, timeout=10.0):
        self.frames: list[tuple[int, bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-peer", daemon=True)
        self.thread.start()
        self.links = self._run(self._make(port, cookie))
        deadline = time.monotonic() + timeout
        while not self._run(self._is_up()):
            assert time.monotonic() < deadline, "the fake peer's link did not come up"
            time.sleep(0.02)

    async def _make(self, port, cookie):
        links = vmqapi.ClusterLinks(self.loop, EVIL, cookie, vmqapi.Metrics(), buffer_size=1 << 30,
                                    on_up=lambda peer: None, on_down=lambda peer, why: None,
                                    on_frame=lambda peer, kind, body: self.frames.append((kind, body)))
        await links.listen("127.0.0.1", 0)
        links.connect(NODE, "127.0.0.1", port)
        return links

    async def _is_up(self):
        return self.links.is_up(NODE)

    def _run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def send(self, kind, body):
        self.loop.call_soon_threadsafe(self.links.send, NODE, kind, body)

    def rows(self, *rows):
        """Send replica rows [kind, key, value] stamped by this peer (a META "r" message)."""
        self.send(vmqapi.FRAME_META, T(["r", [[kind, key, value, 1000.0, EVIL] for kind, key, value in rows], False]))

    def replies(self):
        return [vmqapi.decode_term(body) for kind, body in list(self.frames) if kind == vmqapi.FRAME_REPLY]

    def close(self):
        self._run(self.links.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _settle(node, peer, seconds=0.5):
    """Let the node take what was sent: a CALL's answer comes after every frame before it; then ``seconds`` of
    its timers (the engine's tick is 0.5 s; SYNC, the cluster's rounds, 0.1 s here)."""
    marker = 10 ** 6 + len(peer.frames)
    peer.send(vmqapi.FRAME_CALL, T([marker, "no-such-op", []]))
    assert _until(lambda: any(r[0] == marker for r in peer.replies()), 20), "the node did not answer"
    time.sleep(seconds)
    assert node.alive()


def _forward(topic, payload=b"x", retain=False):
    msg = vmqapi.Message(topic, payload, 0, retain, 1, b"", False, (), None, None, False)
    return vmqapi.encode_forward("", msg, True, ())


@pytest.fixture
def hostile(tmp_path):
    """A capped node with the cookie and a fake peer linked to it: (node, peer)."""
    with capped_node(tmp_path / "n", f"distributed_cookie={COOKIE}", SYNC) as node:
        peer = FakePeer(node.port("vmq"))
        try:
            yield node, peer
        finally:
            peer.close()


# -- a bad replica row poisons the cluster ------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("not json", {"node": EVIL, "clean": False, "online": False, "subs": {"a": [0, False, False, 0, 0]}}),
    ('["", "c"]', {"node": EVIL, "clean": False, "online": False, "subs": {"a/#/b": [0, False, False, 0, 0]}}),
    ('["", "c", "x"]', {"node": EVIL, "clean": False, "online": False, "subs": {}}),
])
def test_bad_session_row_from_a_peer_does_not_stop_the_next_start(tmp_path, key, value):
    """One bad "session" row is kept in cluster.db (and spread to every node); the next start must still work."""
    data = tmp_path / "n"
    with capped_node(data, f"distributed_cookie={COOKIE}", SYNC) as node:
        peer = FakePeer(node.port("vmq"))
        try:
            peer.rows(("session", key, value))
            _settle(node, peer, seconds=0.5)  # the timer saves the rows every round (SYNC)
        finally:
            peer.close()
    with capped_node(data, f"distributed_cookie={COOKIE}", SYNC) as again:
        time.sleep(0.5)
        assert again.alive()
        assert "Traceback" not in again.log()


@pytest.mark.parametrize("rows", [
    [("session", "not json", {"node": EVIL, "subs": {"a": [0, False, False, 0, 0]}})],
    [("session", '["", "c"]', {"node": EVIL, "subs": {"a/#/b": [0, False, False, 0, 0]}})],
    [("retain", '["", "r/t"]', b"not a forward body")],
    [("retain", "not json", _forward("r/t", retain=True))],
])
def test_bad_replica_rows_cost_a_log_line_not_a_traceback(hostile, rows):
    node, peer = hostile
    peer.rows(*rows)
    _settle(node, peer)
    assert "Traceback" not in node.log()


# -- RPC between nodes ---------------------------------------------------------------------

@pytest.mark.parametrize("op, args", [("show", 5), ("show", []), (["show"], []), ("disconnect", ["c"]),
                                      ("session_rows", ["x", "y", "z"])])
def test_call_with_bad_args_answers_an_error_without_a_traceback(hostile, op, args):
    node, peer = hostile
    peer.send(vmqapi.FRAME_CALL, T([7, op, args]))
    assert _until(lambda: any(r[0] == 7 for r in peer.replies()))
    (reply,) = [r for r in peer.replies() if r[0] == 7]
    assert reply[1] is False
    _settle(node, peer, seconds=0.2)
    assert "Traceback" not in node.log()


@pytest.mark.slow
def test_a_flood_of_calls_does_not_grow_the_node_without_bound(hostile):
    """Each CALL waited in the call workers' queue, which had no bound: 300k small frames (18 MB) cost 675 MB."""
    node, peer = hostile
    before = node.rss()
    body = T([1, "session_rows", [None, ["client_id"], 10]])
    for _ in range(100_000):  # unbounded, about 225 MB
        peer.send(vmqapi.FRAME_CALL, body)
    peak, deadline = 0, time.monotonic() + 8
    while time.monotonic() < deadline and node.alive():
        peak = max(peak, node.rss())
        time.sleep(0.25)
    assert node.alive()
    assert peak - before < 100 << 20, f"RSS grew by {(peak - before) >> 20} MB"


# -- sessions handed over ------------------------------------------------------------------

@pytest.mark.parametrize("summary", ["not a dict", {"clean": False, "subs": "not a dict"}])
def test_migrate_with_a_bad_summary_costs_a_log_line(hostile, summary):
    node, peer = hostile
    peer.send(vmqapi.FRAME_MIGRATE, T(["", "moved", summary, []]))
    _settle(node, peer)
    assert "Traceback" not in node.log()


def test_a_bad_message_in_a_session_handed_over_is_dropped_alone(hostile):
    """One queued message a node refuses (too many properties, a wildcard topic) lost every message of the session."""
    node, peer = hostile
    props = tuple(("user_property", ("k", str(i))) for i in range(129))
    bad = vmqapi.Message("m/2", b"x", 1, False, 1, b"", False, props, None, None, False)
    bodies = [_forward("m/1"), vmqapi.encode_forward("", bad, True, ()), _forward("m/#"), b"junk", 7, _forward("m/3")]
    summary = {"clean": False, "online": False, "subs": {"m/#": [1, False, False, 0, 0]}}
    peer.send(vmqapi.FRAME_MIGRATE, T(["", "moved", summary, bodies]))
    _settle(node, peer, seconds=0.2)
    client = MqttClient(node.port("mqtt"))
    try:
        assert client.connect("moved", clean=False).session_present
        assert [client.message(timeout=5).topic for _ in range(2)] == ["m/1", "m/3"]
        client.no_message(timeout=0.5)
    finally:
        client.close()
    assert "4 of the 6 queued message(s)" in node.log() and "Traceback" not in node.log()


# -- what reaches MQTT clients -------------------------------------------------------------

@pytest.mark.parametrize("topic", ["r/#", "r/+/x", "bad\0topic"])
def test_a_retained_row_with_a_topic_no_client_may_publish_is_refused(hostile, topic):
    """A subscriber to # must never get a PUBLISH whose topic has a wildcard or U+0000 (its client drops it)."""
    node, peer = hostile
    peer.rows(("retain", vmqapi.session_key("", topic), _forward(topic, retain=True)))
    _settle(node, peer, seconds=0.3)
    client = MqttClient(node.port("mqtt"))
    try:
        client.connect("watcher")
        client.subscribe(("#", 0))
        client.no_message(timeout=1.0)  # raises (MalformedPacket) on the bad PUBLISH
    finally:
        client.close()


@pytest.mark.parametrize("topic", ["f/#", "bad\0topic"])
def test_a_forwarded_message_with_a_topic_no_client_may_publish_is_dropped(hostile, topic):
    node, peer = hostile
    client = MqttClient(node.port("mqtt"))
    try:
        client.connect("watcher")
        client.subscribe(("#", 0))
        peer.send(vmqapi.FRAME_FORWARD, _forward(topic))
        _settle(node, peer, seconds=0.3)
        client.no_message(timeout=1.0)
    finally:
        client.close()


def test_a_forwarded_message_with_more_properties_than_a_client_may_send_is_dropped(hostile):
    node, peer = hostile  # max_properties_per_packet: 128 by default, for a peer's frames as for a client's
    client = MqttClient(node.port("mqtt"), version=5)
    try:
        client.connect("watcher")
        client.subscribe(("p/#", 0))
        for n in (129, 128):
            props = tuple(("user_property", ("k", str(i))) for i in range(n))
            msg = vmqapi.Message(f"p/{n}", b"x", 0, False, 1, b"", False, props, None, None, False)
            peer.send(vmqapi.FRAME_FORWARD, vmqapi.encode_forward("", msg, True, ()))
        _settle(node, peer, seconds=0.3)
        got = client.message(timeout=5)
        assert got.topic == "p/128" and len(got.properties) == 128
        client.no_message(timeout=0.5)
        assert "max_properties_per_packet" in node.log() and "Traceback" not in node.log()
    finally:
        client.close()


# -- keys and config -----------------------------------------------------------------------

def test_an_unreadable_apikey_row_is_logged_once_not_every_second(hostile):
    """In a cluster (the key file is synced every round: SYNC), a key entry that cannot be read was retried
    and logged every round, and the key file rewritten each time."""
    node, peer = hostile
    peer.rows(("member", NODE, {"address": f"127.0.0.1:{node.port('vmq')}"}),
              ("member", EVIL, {"address": f"127.0.0.1:{peer.links.bound[1]}"}))
    peer.rows(("apikey", "k1", {"not": "a key"}))
    _settle(node, peer, seconds=1.5)  # 15 rounds
    assert node.log().count("skipped an API key") <= 1


def test_a_config_row_cannot_change_a_setting_that_set_refuses(hostile):
    """`set` refuses keys not settable at run time; a replicated config row must not get past that."""
    node, peer = hostile
    assert not vmqapi.find_setting("min_apikey_length").settable
    peer.rows(("config", "*\0min_apikey_length", "4000"))
    _settle(node, peer, seconds=0.3)
    peer.send(vmqapi.FRAME_CALL, T([8, "show", [["min_apikey_length"]]]))
    assert _until(lambda: any(r[0] == 8 for r in peer.replies()))
    (reply,) = [r for r in peer.replies() if r[0] == 8]
    assert reply[1] is True
    assert str(reply[2]["min_apikey_length"]) == "0", reply


# -- webhooks: a hostile endpoint ------------------------------------------------------------

class TricklingEndpoint:
    """An HTTP endpoint that answers 200 at once, then its body one byte every ``gap`` seconds."""

    def __init__(self, gap=0.3, size=200):
        import socket
        self.gap, self.size, self.stop = gap, size, threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.threads = [threading.Thread(target=self._serve, name="trickle", daemon=True)]
        self.threads[0].start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            worker = threading.Thread(target=self._answer, args=(conn,), name="trickle-conn", daemon=True)
            self.threads.append(worker)
            worker.start()

    def _answer(self, conn):
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {self.size}\r\n\r\n".encode())
                for _ in range(self.size):  # bounded: size bytes, gap apart, until told to stop
                    if self.stop.wait(self.gap):
                        return
                    conn.sendall(b" ")
            except OSError:
                return

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.server.close()


def test_an_endpoint_that_answers_byte_by_byte_is_cut_at_response_timeout(tmp_path):
    """README: an auth hook that answers later than response_timeout refuses. A trickle of one byte
    every 0.3 s never trips a per-read timeout of 1 s, so the call (and the client) waits a minute."""
    endpoint = TricklingEndpoint()
    try:
        with capped_node(tmp_path / "n", "plugins.vmq_webhooks=on", "vmq_webhooks.reg.hook=auth_on_register",
                         f"vmq_webhooks.reg.endpoint=http://127.0.0.1:{endpoint.port}/",
                         "vmq_webhooks.reg.response_timeout=1000", "allow_anonymous=off") as node:
            client = MqttClient(node.port("mqtt"), timeout=15)
            try:
                started = time.monotonic()
                client.send(vmqapi.Connect("slow", clean_session=True, proto_level=4))
                try:
                    ack = client.expect(vmqapi.Connack, timeout=10)
                except TimeoutError:
                    ack = None
                took = time.monotonic() - started
            finally:
                client.close()
            assert ack is not None and ack.return_code != 0, f"no refusal after {took:.1f} s"
            assert took < 5
    finally:
        endpoint.close()


# -- strangers on the cluster port ----------------------------------------------------------

class Strangers:
    """``count`` connections to a cluster port, held open without a word (or after ``greeting``) and
    opened again as soon as the node closes one, from a thread, until close(); bounded in reopenings."""

    def __init__(self, port, count=80, greeting=b"", max_reopen=200_000, max_seconds=120.0):
        self.port, self.count, self.greeting = port, count, greeting
        self.max_reopen, self.deadline = max_reopen, time.monotonic() + max_seconds
        self.reopened = 0
        self.socks: list = []
        self.stop = threading.Event()
        for _ in range(count):
            self.socks.append(self._open())
        self.thread = threading.Thread(target=self._run, name="strangers", daemon=True)
        self.thread.start()

    def _open(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        if self.greeting:
            s.sendall(self.greeting)
        return s

    def _run(self):
        while not self.stop.is_set() and time.monotonic() < self.deadline and self.reopened < self.max_reopen:
            readable, _, _ = select.select(self.socks, [], [], 0.05)
            for s in readable:
                try:
                    if s.recv(65536):
                        continue  # what the node says (its HELLO): the stranger stays silent
                except OSError:
                    pass
                self.socks.remove(s)
                s.close()
                try:
                    self.socks.append(self._open())
                    self.reopened += 1
                except OSError:
                    pass  # the node's queue is full: try again next round
            while len(self.socks) < self.count and not self.stop.is_set():
                try:
                    self.socks.append(self._open())
                    self.reopened += 1
                except OSError:
                    break

    def open(self):
        """How many of them the node holds open now (those it closed are not yet seen)."""
        return len(self.socks)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        for s in self.socks:
            s.close()


def _connack(port):
    c = MqttClient(port, timeout=5)
    try:
        return c.connect("control").return_code
    finally:
        c.close()


def _cluster_show(port, key):
    import json
    import urllib.request
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/cluster/show",
                                     headers={"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()})
    with urllib.request.urlopen(request, timeout=30) as resp:
        body = json.loads(resp.read())
    return {row["Node"]: row["Running"] for row in body["table"]}


def _join(port, key, discovery):
    import json
    import urllib.parse
    import urllib.request
    query = urllib.parse.urlencode({"discovery-node": discovery})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/cluster/join?{query}",
                                     headers={"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


HELLO = vmqapi.encode_cluster_frame(vmqapi.K_HELLO, vmqapi.encode_hello(b"n" * 16, "mallory@127.0.0.1"))


@pytest.mark.slow
@pytest.mark.parametrize("count, greeting", [(80, b""), (300, HELLO)], ids=["80-silent", "300-saying-hello"])
def test_strangers_holding_the_cluster_ports_never_keep_a_node_out(tmp_path, count, greeting):
    """80 idle connections on each node's cluster port, reopened as soon as closed, kept a restarted peer out
    for as long as they stayed (40 s tried) and every MQTT CONNECT got CONNACK 3 (netsplit) meanwhile.
    300 that each send a HELLO (and never a proof) must not either."""
    env = {vmqapi.COOKIE_ENV: COOKIE}  # one cookie for every node, off the command line
    names = {n: [f"nodename={n}@127.0.0.1", SYNC] for n in "abc"}
    with capped_node(tmp_path / "a", *names["a"], env=env) as a:
        key = vmqapi.KeyStore(os.path.join(str(tmp_path / "a"), vmqapi.KEY_FILE)).create("mgmt")
        with capped_node(tmp_path / "b", *names["b"], env=env) as b:
            assert _join(b.port("http"), key_of(tmp_path / "b"), f"a@127.0.0.1:{a.port('vmq')}")["text"] == "Done"
        # b is down; strangers take a's cluster port, then b's as soon as it is back
        on_a = Strangers(a.port("vmq"), count, greeting)
        try:
            with capped_node(tmp_path / "b", *names["b"], env=env) as b:
                on_b = Strangers(b.port("vmq"), count, greeting)
                try:
                    assert _until(lambda: _cluster_show(a.port("http"), key).get("b@127.0.0.1") is True, 8), \
                        "b restarted was kept out of the cluster"
                    for port in (a.port("mqtt"), b.port("mqtt")):
                        assert _connack(port) == 0  # no netsplit
                    with capped_node(tmp_path / "c", *names["c"], env=env) as c:  # a join, meanwhile
                        started = time.monotonic()
                        answer = _join(c.port("http"), key_of(tmp_path / "c"), f"a@127.0.0.1:{a.port('vmq')}")
                        assert answer.get("text") == "Done" and time.monotonic() - started < 8, answer
                        assert _connack(c.port("mqtt")) == 0
                    assert on_a.reopened > 0 and on_b.reopened > 0  # the node made room: strangers were closed
                    assert "Traceback" not in a.log() + b.log()
                finally:
                    on_b.close()
        finally:
            on_a.close()


def key_of(data_dir):
    return vmqapi.KeyStore(os.path.join(str(data_dir), vmqapi.KEY_FILE)).create("mgmt")


def _fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid):
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))


def _ping(port):
    c = MqttClient(port, timeout=5)
    try:
        assert c.connect("control").return_code == 0
        started = time.monotonic()
        c.ping()
        return time.monotonic() - started
    finally:
        c.close()


@pytest.mark.slow
def test_what_strangers_on_the_cluster_port_can_make_a_node_hold(tmp_path):
    """Past cluster_max_pending_handshakes (64) a newcomer takes the oldest one's place: 400 strangers that each
    send 4 KB of a frame they never finish hold about 64 descriptors and 5.4 KB each, and no thread."""
    import urllib.request
    partial = (4091).to_bytes(4, "big") + b"\x01" + b"x" * 4089  # 4094 bytes: one short of the frame they announce
    with capped_node(tmp_path / "n", env={vmqapi.COOKIE_ENV: COOKIE}) as node:
        time.sleep(0.5)
        fds, threads, rss = _fds(node.pid), _threads(node.pid), node.rss()
        strangers = Strangers(node.port("vmq"), count=400, greeting=partial)
        try:
            peak_fds = peak_threads = peak_rss = worst = 0
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                peak_fds, peak_threads = max(peak_fds, _fds(node.pid)), max(peak_threads, _threads(node.pid))
                peak_rss = max(peak_rss, node.rss())
                worst = max(worst, _ping(node.port("mqtt")))
                with urllib.request.urlopen(f"http://127.0.0.1:{node.port('http')}/health", timeout=5) as resp:
                    assert resp.status == 200
                time.sleep(0.1)
            started = time.monotonic()
            peer = FakePeer(node.port("vmq"))  # a node with the cookie gets in, meanwhile
            joined = time.monotonic() - started
            peer.close()
            assert strangers.reopened > 0
        finally:
            strangers.close()
        # 64 in their handshake, a few turns' batches of 8 being accepted or closed, the control clients
        assert peak_fds - fds <= vmqapi.CLUSTER_MAX_UNAUTHENTICATED + 8 * vmqapi.CLUSTER_ACCEPT_BATCH, (fds, peak_fds)
        assert peak_threads == threads, (threads, peak_threads)
        assert peak_rss - rss < 16 << 20, f"RSS grew by {(peak_rss - rss) >> 10} KB"
        assert worst < 0.5 and joined < 5, (worst, joined)
        print(f"fds {fds}->{peak_fds} threads {threads}->{peak_threads} rss +{(peak_rss - rss) >> 10} KB "
              f"ping {worst * 1000:.1f} ms joined {joined:.2f} s reopened {strangers.reopened}")
