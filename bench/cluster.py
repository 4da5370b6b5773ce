"""Cluster figures: cross-node throughput next to one node's, subscription propagation, failure detection.

    python bench/cluster.py [--messages N] [--rounds R] [--probes P]

Two vmqapi nodes run as child processes on loopback, joined with ``cluster join``. In the same
run: QoS 0 and QoS 1 throughput publisher on A -> subscriber on B, next to publisher and
subscriber both on A; the time from a SUBSCRIBE on A (its SUBACK) until a message published on B
reaches it, p50/p99; and the time from ``kill -9`` of B until A's ``cluster show`` says
``Running: false``. The loads are bench/mqtt.py's (same payload, same in-flight window).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import multiprocessing as mp
import os
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

    def __init__(self, tmp, name):
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
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=load.raise_fd_limit, cwd=tmp,
                                     env=dict(os.environ, **{vmqapi.COOKIE_ENV: COOKIE}))  # off the command line
        load.wait_port(self.mqtt, self.proc)
        load.wait_port(self.http, self.proc)
        self.key = vmqapi.KeyStore(os.path.join(self.data, vmqapi.KEY_FILE)).create("mgmt")

    def api(self, path):
        auth = base64.b64encode(f"{self.key}:".encode()).decode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}/api/v1/{path}",
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probes", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Node(tmp, "a"), Node(tmp, "b")
        try:
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
            b.stop()


if __name__ == "__main__":
    main()
