"""Cluster figures: cross-node throughput next to one node's, subscription propagation, failure detection.

    python bench/cluster.py [--messages N] [--rounds R] [--probes P] [--only-replicas]

Two vmqapi nodes run as child processes on loopback, joined with ``cluster join``. In the same
run: QoS 0 and QoS 1 throughput publisher on A -> subscriber on B, next to publisher and
subscriber both on A; the time from a SUBSCRIBE on A (its SUBACK) until a message published on B
reaches it, p50/p99; and the time from ``kill -9`` of B until A's ``cluster show`` says
``Running: false``. The loads are bench/mqtt.py's (same payload, same in-flight window).

Then "QoS 1 into a persistent session", on two more pairs of nodes started one after the other,
one with ``queue_replicas = 1`` and one with ``queue_replicas = 2`` (both nodes of a pair; the
default message_store, sqlite): a subscriber with CleanSession=0 and a QoS 1 subscription on A,
online and reading, and a QoS 1 publisher on B keeping bench/mqtt.py's publisher window of
unacknowledged publishes; the rounds alternate between the pairs. The table shows the msg/s the
publisher gets acknowledged (with queue_replicas = 2 a PUBACK waits for A and A's copy node, B,
to have committed the message), the msg/s the subscriber receives, and replicas 2 / replicas 1.
``--only-replicas`` runs this group alone.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == HERE:
    sys.path.pop(0)  # bench/http.py must not stand in for the standard library's http
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
_spec = importlib.util.spec_from_file_location("bench_mqtt", os.path.join(HERE, "mqtt.py"))
load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)

import urllib.request  # noqa: E402

import vmqapi  # noqa: E402

COOKIE = "bench-cookie-" + os.urandom(12).hex()  # 16 characters at least, as every node demands
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Node:
    """A vmqapi child process with MQTT, HTTP and cluster ports of its own."""

    def __init__(self, tmp, name, settings=()):
        self.name = f"{name}@127.0.0.1"
        self.data = os.path.join(tmp, name)
        self.mqtt, self.http, self.vmq = load.free_port(), load.free_port(), load.free_port()
        cmd = [sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", self.data,
               "--set", f"nodename={self.name}",
               "--set", f"listener.tcp.default=127.0.0.1:{self.mqtt}",
               "--set", f"listener.http.default=127.0.0.1:{self.http}",
               "--set", f"listener.vmq.clustering=127.0.0.1:{self.vmq}",
               "--set", "log.console.level=warning", "--set", "max_online_messages=-1",
               "--set", f"max_inflight_messages={load.INFLIGHT[0]}"]
        for setting in settings:
            cmd += ["--set", setting]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=load.raise_fd_limit, cwd=tmp,
                                     env=dict(os.environ, **{vmqapi.COOKIE_ENV: COOKIE}))  # off the command line
        try:
            load.wait_port(self.mqtt, self.proc)
            load.wait_port(self.http, self.proc)
            self.key = vmqapi.KeyStore(os.path.join(self.data, vmqapi.KEY_FILE)).create("mgmt")
        except BaseException:
            self.stop()
            raise

    def api(self, path, query=""):
        auth = base64.b64encode(f"{self.key}:".encode()).decode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}/api/v1/{path}{query}",
                                         headers={"Authorization": f"Basic {auth}"})
        with OPENER.open(request, timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self):
        if self.proc.poll() is None:
            load.Broker.stop(self)  # terminate, then kill after 10 s


def running(node):
    table = node.api("cluster/show")["table"]
    return {r["Node"]: r["Running"] for r in table}


def flow(pub_node, sub_node, qos, count):
    """Messages per second from a publisher on ``pub_node`` to one subscriber on ``sub_node``."""
    ctx = mp.get_context("fork")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    sub = ctx.Process(target=load.subscriber, args=(sub_node.mqtt, qos, count, ready, results, "sub", 4))
    sub.start()
    ready.get(timeout=load.DEADLINE)
    time.sleep(0.5)  # the subscription reaches the other node
    pub = ctx.Process(target=load.publisher, args=(pub_node.mqtt, qos, count, go, results, 4))
    pub.start()
    time.sleep(0.2)
    go.set()
    got = [results.get(timeout=load.DEADLINE * 2) for _ in range(2)]
    for p in (sub, pub):
        p.join(load.DEADLINE)
        if p.is_alive():
            p.kill()
    start = next(r[1] for r in got if r[0] == "pub")
    name, delivered, finished = next(r for r in got if r[0] != "pub")
    if delivered < count:
        print(f"  note: delivered {delivered} of {count}", file=sys.stderr)
    return delivered / (finished - start)


def propagation(a, b, probes):
    """Seconds from SUBACK on ``a`` until a message published on ``b`` to that topic arrives, per probe."""
    pub = load.open_client(b.mqtt, "prop-pub")
    times = []
    for n in range(probes):
        topic = f"prop/{n}".encode()
        sub = load.open_client(a.mqtt, f"prop-sub{n}")
        body = (1).to_bytes(2, "big") + len(topic).to_bytes(2, "big") + topic + b"\x00"
        sub.sendall(b"\x82" + load.varint(len(body)) + body)
        load.read_packet(sub)  # SUBACK
        start = time.perf_counter()
        frame_body = len(topic).to_bytes(2, "big") + topic + b"x"
        frame = b"\x30" + load.varint(len(frame_body)) + frame_body
        sub.settimeout(0.002)
        end_by = time.monotonic() + 5
        while time.monotonic() < end_by:
            pub.sendall(frame)
            try:
                if sub.recv(1 << 16):
                    times.append(time.perf_counter() - start)
                    break
            except socket.timeout:
                continue
        sub.close()
    pub.close()
    return times


def detection(a, b):
    """Seconds from kill -9 of ``b`` until ``a`` shows it not running."""
    os.kill(b.proc.pid, signal.SIGKILL)
    start = time.perf_counter()
    b.proc.wait(10)
    while time.perf_counter() - start < 60:
        if running(a).get(b.name) is False:
            return time.perf_counter() - start
        time.sleep(0.02)
    return float("inf")


# -- QoS 1 into a persistent session (queue_replicas) -------------------------------------

PUB_WINDOW = 200  # unacknowledged QoS 1 publishes the publisher keeps, as bench/mqtt.py's publisher
SESSION_WAIT = 10.0  # seconds a new session may take to show on the other node of the pair


def persistent_connect(port, client_id):
    """A connected MQTT 3.1.1 client with CleanSession=0: its session outlives the connection."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x00\x00\x00" + len(cid).to_bytes(2, "big") + cid  # flags 0: keep the session
    sock = socket.create_connection(("127.0.0.1", port), timeout=load.DEADLINE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"\x10" + load.varint(len(body)) + body)
    ack = load.read_packet(sock)
    assert ack[0] == 0x20 and ack[3] == 0, ack
    return sock


def persistent_subscriber(port, count, ready, results, client_id):
    """Subscribe at QoS 1 in a persistent session, then read (and PUBACK) until ``count`` arrived."""
    sock = persistent_connect(port, client_id)
    load.subscribe(sock, 1)
    ready.put(client_id)
    sock.settimeout(1.0)
    got, last, buf = 0, None, b""
    end_by = time.monotonic() + load.DEADLINE
    while got < count and time.monotonic() < end_by:
        try:
            chunk = sock.recv(1 << 20)
        except socket.timeout:
            continue
        if not chunk:
            break
        buf += chunk
        taken, acks, consumed = load.take_publishes(buf)
        buf = buf[consumed:]
        if taken:
            got += taken
            last = time.perf_counter()
        if acks:
            sock.sendall(b"".join(acks))
    results.put(("sub", got, last))
    sock.close()


def acked_publisher(port, count, go, results, client_id):
    """Publish ``count`` QoS 1 messages, at most PUB_WINDOW unacknowledged; report when the last PUBACK came."""
    sock = load.open_client(port, client_id)
    sock.settimeout(1.0)
    go.wait(load.DEADLINE)
    start = last = time.perf_counter()
    sent, acked, buf = 0, 0, b""
    end_by = time.monotonic() + load.DEADLINE
    while acked < count and time.monotonic() < end_by:
        burst = min(PUB_WINDOW - (sent - acked), count - sent)
        if burst > 0:
            sock.sendall(b"".join(load.publish_packet(1, (sent + k) % 65535 + 1) for k in range(burst)))
            sent += burst
        try:
            chunk = sock.recv(1 << 16)
        except socket.timeout:
            continue
        if not chunk:
            break
        buf += chunk
        consumed, before = 0, acked
        for head, body, end in load.packets(buf, 0):
            consumed = end
            acked += head >> 4 == 4
        buf = buf[consumed:]
        if acked > before:
            last = time.perf_counter()
    results.put(("pub", start, acked, sent, last))
    sock.close()


def session_rows(node, client_id):
    """session show --client_id=<it> --node --copy_node on ``node``: its rows (a list, empty while none)."""
    return node.api("session/show", f"?--client_id={client_id}&--node&--copy_node").get("table") or []


def session_known(a, b, client_id):
    """Wait until ``b`` shows ``client_id``'s session at home on ``a`` (its row carries its subscriptions);
    False past SESSION_WAIT."""
    end_by = time.monotonic() + SESSION_WAIT
    while time.monotonic() < end_by:
        if any(r.get("node") == a.name for r in session_rows(b, client_id)):
            return True
        time.sleep(0.05)
    return False


def drop_session(node, client_id):
    """Connect with CleanSession=1 and DISCONNECT: the persistent session (and its subscription) is gone."""
    sock = load.open_client(node.mqtt, client_id)
    sock.sendall(b"\xe0\x00")
    sock.close()


def persistent_flow(a, b, replicas, count, tag):
    """(acknowledged msg/s at the publisher on ``b``, received msg/s at the persistent subscriber on ``a``)."""
    ctx = mp.get_context("fork")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    sub_id, pub_id = f"persist-sub-{tag}", f"persist-pub-{tag}"
    sub = ctx.Process(target=persistent_subscriber, args=(a.mqtt, count, ready, results, sub_id))
    pub = None
    try:
        sub.start()
        ready.get(timeout=load.DEADLINE)
        if not session_known(a, b, sub_id):
            print(f"  note: queue_replicas={replicas}: {b.name} did not show {sub_id} at home on {a.name} "
                  f"within {SESSION_WAIT:g} s", file=sys.stderr)
        time.sleep(0.5)  # the subscription reaches the other node's routes
        pub = ctx.Process(target=acked_publisher, args=(b.mqtt, count, go, results, pub_id))
        pub.start()
        time.sleep(0.2)
        go.set()
        got = {}
        try:
            for _ in range(2):
                r = results.get(timeout=load.DEADLINE * 2)
                got[r[0]] = r
        except queue.Empty:
            pass
    finally:
        for p in (sub, pub):
            if p is None:
                continue
            p.join(10)  # each has reported (or given up) by now
            if p.is_alive():
                p.kill()
                p.join(5)
    if "pub" not in got or "sub" not in got:
        raise RuntimeError(f"queue_replicas={replicas}: no figures from {sorted({'pub', 'sub'} - set(got))}")
    _, start, acked, sent, acked_at = got["pub"]
    _, delivered, received_at = got["sub"]
    if acked < count:
        print(f"  note: queue_replicas={replicas}: {acked} of {count} PUBACKs came ({sent} sent, "
              f"{sent - acked} never acknowledged within {load.DEADLINE:g} s)", file=sys.stderr)
    if delivered < count:
        print(f"  note: queue_replicas={replicas}: the persistent subscriber received {delivered} of {count}",
              file=sys.stderr)
    copy = [r.get("copy_node") for r in session_rows(a, sub_id)]  # given at the first message kept for it
    if copy != [b.name if replicas > 1 else ""]:
        print(f"  note: queue_replicas={replicas}: {sub_id}'s copy node on {a.name} is {copy}", file=sys.stderr)
    drop_session(a, sub_id)
    acked_rate = acked / (acked_at - start) if acked and acked_at > start else 0.0
    received_rate = delivered / (received_at - start) if delivered and received_at > start else 0.0
    return acked_rate, received_rate


def replica_figures(tmp, rounds, count):
    """Both pairs started one after the other, rounds alternating between them; print the table."""
    nodes, pairs = [], {}
    try:
        for replicas in (1, 2):
            settings = (f"queue_replicas={replicas}", "message_store=sqlite")
            a = Node(tmp, f"r{replicas}a", settings)
            nodes.append(a)
            b = Node(tmp, f"r{replicas}b", settings)
            nodes.append(b)
            answer = b.api(f"cluster/join?discovery-node={a.name}:{a.vmq}")
            assert answer == {"text": "Done", "type": "text"}, answer
            pairs[replicas] = (a, b)
        figures = {1: [], 2: []}
        for n in range(rounds):
            for replicas in ((1, 2) if n % 2 == 0 else (2, 1)):  # alternate, so both see the same machine
                a, b = pairs[replicas]
                figures[replicas].append(persistent_flow(a, b, replicas, count, f"{replicas}-{n}"))
    finally:
        for node in nodes:
            node.stop()
    median = {r: [statistics.median(f[k] for f in figures[r]) for k in (0, 1)] for r in (1, 2)}
    print(f"QoS 1 into a persistent session: publisher on B, CleanSession=0 QoS 1 subscriber on A "
          f"(median of {rounds}, {count} messages)")
    print(f"{'queue_replicas':<22}{'acked msg/s':>14}{'received msg/s':>16}")
    for r in (1, 2):
        print(f"{r:<22}{median[r][0]:>14,.0f}{median[r][1]:>16,.0f}")
    print(f"{'replicas2 / replicas1':<22}" + "".join(
        f"{median[2][k] / median[1][k]:>{w}.2f}" if median[1][k] else f"{'-':>{w}}" for k, w in ((0, 14), (1, 16))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--only-replicas", action="store_true",
                        help='run only "QoS 1 into a persistent session" (queue_replicas = 1 and 2)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.only_replicas:
            cluster_figures(tmp, args)
        replica_figures(tmp, args.rounds, args.messages)


def cluster_figures(tmp, args):
    """Cross-node throughput, subscription propagation and failure detection on one pair of nodes."""
    a = Node(tmp, "a")
    b = None
    try:
        b = Node(tmp, "b")
        answer = b.api(f"cluster/join?discovery-node={a.name}:{a.vmq}")
        assert answer == {"text": "Done", "type": "text"}, answer
        figures = {}
        for _ in range(args.rounds):  # interleaved, so both sides see the same machine
            for qos in (0, 1):
                figures.setdefault(("one node", qos), []).append(flow(a, a, qos, args.messages))
                figures.setdefault(("A -> B", qos), []).append(flow(a, b, qos, args.messages))
        print(f"{'load':<22}{'QoS 0 msg/s':>14}{'QoS 1 msg/s':>14}")
        for where in ("one node", "A -> B"):
            print(f"{where:<22}" + "".join(f"{statistics.median(figures[where, q]):>14,.0f}" for q in (0, 1)))
        print(f"{'cross-node / one node':<22}" + "".join(
            f"{statistics.median(figures['A -> B', q]) / statistics.median(figures['one node', q]):>14.2f}"
            for q in (0, 1)))
        times = sorted(propagation(a, b, args.probes))
        if times:
            p50 = times[len(times) // 2] * 1000
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
            print(f"subscription propagation, {len(times)} probes: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        print(f"kill -9 to Running: false: {detection(a, b) * 1000:.0f} ms (the kernel closes its links at once;"
              " a node that goes silent is down after the 5 s heartbeat timeout)")
    finally:
        a.stop()
        if b is not None:
            b.stop()

if __name__ == "__main__":
    main()
