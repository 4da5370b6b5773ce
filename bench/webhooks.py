"""Webhooks: QoS 1 publishes per second behind an auth_on_publish webhook, uncached and cached, and without one.

    python bench/webhooks.py [--seconds S] [--window N]

Three nodes in turn (each a child process on 127.0.0.1 port 0): (a) an auth_on_publish
webhook whose endpoint answers without cache-control, so every PUBLISH waits for a call;
(b) the same webhook answering with cache-control: max-age=3600, so after the first call
the answer comes from the cache; (c) no webhook. The endpoint is a keep-alive
ThreadingHTTPServer in another child process. One publisher keeps up to --window QoS 1
PUBLISHes unacknowledged on one topic and counts PUBACKs for --seconds. Aim: (b) within
20% of (c).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time

# bench/http.py sits beside this file: keep the folder off sys.path so "http" is the standard library's.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
ROOT = os.path.dirname(_HERE)
sys.path.insert(0, ROOT)
import http.server  # noqa: E402

import vmqapi  # noqa: E402


def endpoint(ports: mp.Queue) -> None:
    """Answer every hook ok; /cached adds cache-control: max-age=3600."""
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms wait between them

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"result":"ok"}'
            self.send_response(200)
            if self.path == "/cached":
                self.send_header("cache-control", "max-age=3600")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    ports.put(server.server_port)
    server.serve_forever()


def start_node(data_dir: str, sets: list[str]) -> tuple[subprocess.Popen, int]:
    """Start a node in a child Python; return it and its MQTT port."""
    args = [sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", data_dir,
            "--set", "listener.tcp.default=127.0.0.1:0", "--set", "listener.http.default=127.0.0.1:0",
            "--set", "message_store=memory", "--set", "allow_anonymous=on", "--set", "log.console.level=warning"]
    for item in sets:
        args += ["--set", item]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = vmqapi.read_node_file(data_dir)
        if info and info.get("pid") == proc.pid:
            return proc, next(x["port"] for x in info["listeners"] if x["type"] == "mqtt")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the node did not start")


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def publish_rate(port: int, seconds: float, window: int) -> tuple[float, int]:
    """Return (PUBACKs per second, PUBACKs) for one QoS 1 publisher keeping ``window`` PUBLISHes in flight."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(vmqapi.encode_packet(vmqapi.Connect("bench-pub"), 4))
    buf, acks, sent = b"", 0, 0
    started = None
    while True:
        result = vmqapi.decode_packet(buf, 0, 0, 4)
        if result is not None:
            packet, used = result
            buf = buf[used:]
            if isinstance(packet, vmqapi.Connack):
                started = time.monotonic()
            elif isinstance(packet, vmqapi.Puback):
                acks += 1
            if started is not None and time.monotonic() - started >= seconds:
                break
            continue
        if started is not None:
            batch = b"".join(vmqapi.encode_packet(vmqapi.Publish("bench/t", b"x" * 32, 1, packet_id=(sent + n) % 65535 + 1), 4)
                             for n in range(window - (sent - acks)))
            sent += window - (sent - acks)
            if batch:
                sock.sendall(batch)
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the node closed the connection")
        buf += chunk
    elapsed = time.monotonic() - started
    sock.close()
    return acks / elapsed, acks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--window", type=int, default=20)
    opts = parser.parse_args()
    ports: mp.Queue = mp.Queue()
    server = mp.Process(target=endpoint, args=(ports,), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ports.get(timeout=30)}"
    cases = (("(a) auth_on_publish webhook, uncached", [f"vmq_webhooks.b.endpoint={url}/plain"]),
             ("(b) auth_on_publish webhook, cached by max-age", [f"vmq_webhooks.b.endpoint={url}/cached"]),
             ("(c) no webhook", None))
    rows = []
    try:
        for title, sets in cases:
            extra = ["plugins.vmq_webhooks=on", "vmq_webhooks.b.hook=auth_on_publish", *sets] if sets else []
            with tempfile.TemporaryDirectory() as data_dir:
                proc, port = start_node(data_dir, extra)
                try:
                    cpu = cpu_seconds(proc.pid)
                    rate, acks = publish_rate(port, opts.seconds, opts.window)
                    rows.append((title, rate, (cpu_seconds(proc.pid) - cpu) / acks * 1e6))
                finally:
                    proc.terminate()
                    proc.wait(30)
    finally:
        server.terminate()
        server.join(10)
    print(f"QoS 1 publishes/s, one publisher, window {opts.window}, {opts.seconds:g} s each\n")
    print("| case | publishes/s | node CPU per publish |\n|---|---|---|")
    for title, rate, cpu in rows:
        print(f"| {title} | {rate:,.0f} | {cpu:.1f} µs |")
    cached, bare = rows[1][1], rows[2][1]
    print(f"\n(b) is {100 * cached / bare:.0f}% of (c) in publishes/s, {100 * rows[2][2] / rows[1][2]:.0f}% in CPU "
          f"per publish")


if __name__ == "__main__":
    main()
