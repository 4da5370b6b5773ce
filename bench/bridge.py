"""Messages per second through a vmq_bridge next to the same load published directly, in one run.

    python bench/bridge.py [--messages N] [--rounds R]

Each node is a child ``python vmqapi.py`` on loopback port 0. For QoS 0 and 1 it measures:
``direct`` (publisher and subscriber on the remote node), ``bridge`` (the publisher on a
second node whose bridge sends ``bench/#`` to the remote) and, when mosquitto is installed,
the same pair with mosquitto as the remote. A rate is messages received by the subscriber
per second, from the first PUBLISH sent to the last one received; ``lost`` counts QoS 0
messages that never arrived (a queue that was full). Every load is bounded in time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_spec = importlib.util.spec_from_file_location("bench_mqtt", os.path.join(HERE, "mqtt.py"))
load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)
PAYLOAD = load.PAYLOAD  # the same loads as bench/mqtt.py's
DEADLINE = 60.0  # seconds any one load may take
IDLE = 3.0  # seconds without a message after which the subscriber stops counting
WINDOW = 100  # QoS 1 PUBLISHes the publisher has unacknowledged at once


varint, connect_packet, publish_packet = load.varint, load.connect_packet, load.publish_packet  # MQTT 3.1.1


def frames(buf):
    """Split complete MQTT frames off ``buf``: ([(first byte, body)], rest)."""
    out, pos = [], 0
    while pos + 2 <= len(buf):
        length, shift, i = 0, 0, pos + 1
        while i < len(buf):
            byte = buf[i]
            length |= (byte & 127) << shift
            i += 1
            if not byte & 128:
                break
            shift += 7
        else:
            break
        if i + length > len(buf):
            break
        out.append((buf[pos], buf[i:i + length]))
        pos = i + length
    return out, buf[pos:]


def open_client(port, client_id):
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id))
    buf = b""
    while not buf.startswith(b"\x20\x02"):
        buf += sock.recv(4)
    return sock, buf[4:]


def subscriber(port, qos, count, ready, result):
    sock, buf = open_client(port, "bench-sub")
    topic = b"bench/#"
    body = b"\x00\x01" + len(topic).to_bytes(2, "big") + topic + bytes((qos,))
    sock.sendall(b"\x82" + varint(len(body)) + body)
    got, first, last, suback = 0, None, None, False
    sock.settimeout(IDLE)
    deadline = time.monotonic() + DEADLINE
    while got < count and time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 16)
        except socket.timeout:
            if suback and got:
                break
            continue
        if not data:
            break
        packets, buf = frames(buf + data)
        acks = []
        for first_byte, body in packets:
            kind = first_byte >> 4
            if kind == 9 and not suback:
                suback = True
                ready.set()
            elif kind == 3:
                got += 1
                last = time.time()
                first = first or last
                if first_byte & 6:
                    pid = body[2 + int.from_bytes(body[:2], "big"):][:2]
                    acks.append(b"\x40\x02" + pid)
        if acks:
            sock.sendall(b"".join(acks))
    result.put((got, last))
    sock.close()


def publisher(port, qos, count, result):
    sock, buf = open_client(port, "bench-pub")
    started = time.time()
    if qos == 0:
        batch = publish_packet(0, 0) * 100
        for _ in range(count // 100):
            sock.sendall(batch)
        sock.sendall(publish_packet(0, 0) * (count % 100))
    else:
        sent = acked = 0
        while acked < count:
            while sent < count and sent - acked < WINDOW:
                sent += 1
                sock.sendall(publish_packet(1, sent % 65535 + 1))
            packets, buf = frames(buf + sock.recv(1 << 16))
            acked += sum(1 for first_byte, _ in packets if first_byte >> 4 == 4)
    result.put(started)
    sock.close()


def run_load(pub_port, sub_port, qos, count):
    """Return (messages per second, messages lost) for one load."""
    ctx = mp.get_context("spawn")
    ready, results, starts = ctx.Event(), ctx.Queue(), ctx.Queue()
    sub = ctx.Process(target=subscriber, args=(sub_port, qos, count, ready, results))
    sub.start()
    if not ready.wait(10):
        sub.kill()
        raise RuntimeError("the subscriber got no SUBACK")
    time.sleep(0.5)  # a bridge's own subscription is in place long before; this settles the new one
    pub = ctx.Process(target=publisher, args=(pub_port, qos, count, starts))
    pub.start()
    started = starts.get(timeout=DEADLINE)
    got, last = results.get(timeout=DEADLINE + IDLE + 5)
    for proc in (pub, sub):
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    rate = got / (last - started) if got and last > started else 0.0
    return rate, count - got


class Child:
    """A vmqapi node or mosquitto in a child process on loopback, stopped by its pid."""

    def __init__(self, cmd, port=None, data_dir=None):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while port is None:
            try:
                with open(os.path.join(data_dir, "node.json")) as fh:
                    info = json.load(fh)
                port = next(x["port"] for x in info["listeners"] if x["type"] == "mqtt")
            except (OSError, ValueError, StopIteration):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("a node did not start") from None
                time.sleep(0.05)
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("a broker did not start") from None
                time.sleep(0.05)
        self.port = port

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def vmqapi_node(tmp, name, *sets):
    data_dir = os.path.join(tmp, name)
    cmd = [sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", data_dir,
           "--set", "listener.tcp.default=127.0.0.1:0", "--set", "listener.http.default=127.0.0.1:0",
           "--set", "max_online_messages=100000", "--set", "max_offline_messages=100000"]
    for item in sets:
        cmd += ["--set", item]
    return Child(cmd, data_dir=data_dir)


def bridged_node(tmp, name, remote_port, qos):
    return vmqapi_node(tmp, name, "plugins.vmq_bridge=on", f"vmq_bridge.tcp.br0=127.0.0.1:{remote_port}",
                       f"vmq_bridge.tcp.br0.topic.1=bench/* out {qos}",
                       "vmq_bridge.tcp.br0.max_outgoing_buffered_messages=100000")


def mosquitto(tmp):
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    if path is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = os.path.join(tmp, "mosquitto.conf")
    with open(conf, "w") as fh:
        fh.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n")
    return Child([path, "-c", conf], port=port)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        remotes = [("vmqapi", vmqapi_node(tmp, "remote"))]
        broker = mosquitto(tmp)
        if broker is not None:
            remotes.append(("mosquitto", broker))
        try:
            for remote_name, remote in remotes:
                for qos in (0, 1):
                    local = bridged_node(tmp, f"local-{remote_name}-{qos}", remote.port, qos)
                    time.sleep(1)  # the bridge connects
                    try:
                        direct, bridged = [], []
                        for _ in range(args.rounds):  # interleaved, so load from the others hits both alike
                            direct.append(run_load(remote.port, remote.port, qos, args.messages))
                            bridged.append(run_load(local.port, remote.port, qos, args.messages))
                    finally:
                        local.stop()
                    d, b = statistics.median(r for r, _ in direct), statistics.median(r for r, _ in bridged)
                    rows.append((f"vmqapi -> {remote_name}", qos, d, b, b / d if d else 0.0,
                                 max(lost for _, lost in direct), max(lost for _, lost in bridged)))
        finally:
            for _, remote in remotes:
                remote.stop()
    print(f"{args.messages} messages of {len(PAYLOAD)} bytes, median of {args.rounds} rounds (msg/s)")
    print(f"{'path':<22} {'qos':>3} {'direct':>9} {'bridge':>9} {'ratio':>6} {'lost d/b':>10}")
    for path, qos, d, b, ratio, lost_d, lost_b in rows:
        print(f"{path:<22} {qos:>3} {d:>9.0f} {b:>9.0f} {ratio:>6.2f} {f'{lost_d}/{lost_b}':>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
