"""HTTP admin API: requests/s and latency next to a bare ThreadingHTTPServer, and MQTT latency under it.

    python bench/http.py [--seconds S] [--sessions 0,1000,10000]

For cluster/show and session/show (with 0, 1,000 and 10,000 connected sessions), with and
without keep-alive, the load runs from separate processes over loopback for a bounded
time. The "floor" is a bare ThreadingHTTPServer answering a fixed body of the same size
in one write: what this design can reach. Then a single-client lookup, the server time
of a 10,000-row answer, and MQTT delivery latency while session/show runs.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# This file is bench/http.py: keep its folder off sys.path so "http" is the standard library's.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
import http.server  # noqa: E402

_spec = importlib.util.spec_from_file_location("mqttbench", os.path.join(_HERE, "mqtt.py"))
mqttbench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mqttbench)  # raw MQTT helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "benchkey" + "x" * 24
AUTH = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
CLIENTS_PER_PROCESS = 8
PROCESSES = 2


# -- the floor -------------------------------------------------------------------------

def floor_server(body, ready):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    f"\r\n").encode()
            self.wfile.write(head + body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    ready.put(server.server_address[1])
    server.serve_forever()


# -- load --------------------------------------------------------------------------------

def read_response(sock, buf):
    buf = bytearray(buf)
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end])
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(buf) < end + 4 + length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return head.split(b" ")[1], bytes(buf[end + 4 + length:])


def client_loop(port, path, keepalive, seconds, out):
    request = (f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
               + ("" if keepalive else "Connection: close\r\n") + "\r\n").encode()
    latencies, errors = [], 0
    end = time.monotonic() + seconds
    sock, buf = None, b""
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)
            status, buf = read_response(sock, buf)
            if status != b"200":
                errors += 1
        except (OSError, ConnectionError):
            errors += 1
            sock = None
        latencies.append(time.perf_counter() - started)
        if not keepalive and sock is not None:
            sock.close()
            sock, buf = None, b""
    out.extend(latencies)
    out.append(-errors - 1)  # a marker: errors


def load_process(port, path, keepalive, seconds, results):
    collected = []
    threads = [threading.Thread(target=client_loop, args=(port, path, keepalive, seconds, collected))
               for _ in range(CLIENTS_PER_PROCESS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(collected)


def run_load(port, path, keepalive, seconds):
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=load_process, args=(port, path, keepalive, seconds, results))
             for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    values = []
    for _ in procs:
        values += results.get(timeout=seconds + 60)
    for p in procs:
        p.join(30)
    errors = sum(-v - 1 for v in values if v < 0)
    lat = sorted(v for v in values if v >= 0)
    rate = len(lat) / seconds
    return rate, lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000, errors


# -- the node ------------------------------------------------------------------------------

def start_node(tmp):
    data = tempfile.mkdtemp(dir=tmp)
    env = dict(os.environ, VMQAPI_API_KEYS=KEY)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", data,
                             "--set", "listener.http.default=127.0.0.1:0", "--set", "listener.tcp.default=127.0.0.1:0",
                             "--set", "log.console.level=warning", "--set", "listener.max_connections=infinity"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=mqttbench.raise_fd_limit)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            with open(os.path.join(data, "node.json")) as fh:
                info = json.load(fh)
            if info["pid"] == proc.pid:
                ports = {x["type"]: x["port"] for x in info["listeners"]}
                return proc, ports["http"], ports["mqtt"]
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError("node did not start")


def get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n\r\n".encode())
        status, _ = read_response(sock, b"")
    return status


def timed(port, path, n=15):
    samples = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n\r\n".encode()
        buf = b""
        for _ in range(n):
            started = time.perf_counter()
            sock.sendall(request)
            _, buf = read_response(sock, buf)
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def hammer(http_port, stop):
    while not stop.is_set():
        get(http_port, "/api/v1/session/show?--limit=100000")


def mqtt_latency(mqtt_port, http_port, seconds, with_load):
    """Return (p99, max) ms of publish->deliver latency at 200 msg/s, optionally during session/show calls."""
    sub = mqttbench.open_client(mqtt_port, "lat-sub")
    mqttbench.subscribe(sub, 0)
    pub = mqttbench.open_client(mqtt_port, "lat-pub")
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    helper = ctx.Process(target=hammer, args=(http_port, stop))  # its own process: its own GIL
    if with_load:
        helper.start()
    lat, buf = [], b""
    end = time.monotonic() + seconds
    frame_head = mqttbench.publish_packet(0)[:-len(mqttbench.PAYLOAD)]  # the payload: a timestamp, padded
    while time.monotonic() < end:
        pub.sendall(frame_head + time.perf_counter_ns().to_bytes(8, "big").ljust(len(mqttbench.PAYLOAD), b"x"))
        deadline = time.monotonic() + 2
        got = False
        while not got and time.monotonic() < deadline:
            buf += sub.recv(65536)
            for head, body, stop_at in mqttbench.packets(buf, 0):
                tlen = buf[body] << 8 | buf[body + 1]
                sent = int.from_bytes(buf[body + 2 + tlen:body + 10 + tlen], "big")
                lat.append((time.perf_counter_ns() - sent) / 1e6)
                buf = buf[stop_at:]
                got = True
                break
        time.sleep(0.005)
    stop.set()
    if with_load:
        helper.join(60)
    sub.close()
    pub.close()
    lat.sort()
    return lat[int(len(lat) * 0.99)], lat[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sessions", default="0,1000,10000")
    args = parser.parse_args()
    mqttbench.raise_fd_limit()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        node, http_port, mqtt_port = start_node(tmp)
        ctx = mp.get_context("fork")
        try:
            body_len = 69  # the size of cluster/show's body
            ready = ctx.Queue()
            floor = ctx.Process(target=floor_server, args=(b"x" * body_len, ready), daemon=True)
            floor.start()
            floor_port = ready.get(timeout=10)
            for keepalive in (True, False):
                label = "keep-alive" if keepalive else "new connection"
                f = run_load(floor_port, "/", keepalive, args.seconds)
                c = run_load(http_port, "/api/v1/cluster/show", keepalive, args.seconds)
                rows.append((f"floor ({label})", *f, ""))
                rows.append((f"cluster/show ({label})", *c, f"{c[0] / f[0]:.2f} of floor"))
            floor.terminate()
            idle_ready, idle_done, idle = None, None, None
            for count in (int(n) for n in args.sessions.split(",")):
                if count:
                    idle_ready, idle_done = ctx.Event(), ctx.Event()
                    idle = ctx.Process(target=mqttbench.idle_clients, args=(mqtt_port, count, idle_ready, idle_done))
                    idle.start()
                    idle_ready.wait(120)
                s = run_load(http_port, "/api/v1/session/show?--limit=100000", True, args.seconds)
                server = timed(http_port, "/api/v1/session/show?--limit=100000", 10)
                lookup = timed(http_port, "/api/v1/session/show?--client_id=idle0", 50)
                rows.append((f"session/show, {count} sessions", *s,
                             f"one answer {server:.1f} ms; one-client lookup {lookup:.2f} ms"))
                if count == max(int(n) for n in args.sessions.split(",")):
                    base = mqtt_latency(mqtt_port, http_port, args.seconds, False)
                    loaded = mqtt_latency(mqtt_port, http_port, args.seconds, True)
                    rows.append((f"MQTT latency, {count} sessions, idle API", 0, base[0], base[1], 0, "p99 / max ms"))
                    rows.append((f"MQTT latency during session/show", 0, loaded[0], loaded[1], 0, "p99 / max ms"))
                if idle is not None:
                    idle_done.set()
                    idle.join(60)
                    idle = None
        finally:
            node.terminate()
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
    print(f"{'measure':42}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}  note")
    for label, rate, p50, p99, errors, note in rows:
        print(f"{label:42}{rate:10,.0f}{p50:9.2f}{p99:9.2f}{errors:8}  {note}")


if __name__ == "__main__":
    main()
