"""MQTT throughput, CPU per delivery and memory per connection: vmqapi, and mosquitto when installed.

    python bench/mqtt.py [--messages N] [--rounds R] [--connections 1000,5000] [--protocol 4|5|4,5]
                         [--inflight 20|0]

Every load runs in separate processes speaking raw MQTT over loopback sockets, bounded
in count and time. When ``mosquitto`` is on PATH, the same loads run against it in the
same run, interleaved, and the table shows vmqapi / mosquitto. ``--protocol`` picks
MQTT 3.1.1 (4), MQTT 5 (5) or both (4,5: the table adds vmqapi's v5 / v4 ratio).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD = b"x" * 64
TOPIC = b"bench/t"
DEADLINE = 60.0  # seconds any one load may take


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


# -- raw MQTT --------------------------------------------------------------------------

def varint(n):
    # vmqapi.encode_length's twin: importing vmqapi from here would find bench/http.py as "http".
    out = bytearray()
    while True:
        b, n = n & 127, n >> 7
        out.append(b | 128 if n else b)
        if not n:
            return bytes(out)


def connect_packet(client_id, version=4):
    cid = client_id.encode()
    props = b"\x00" if version == 5 else b""  # MQTT 5: an empty property list
    body = b"\x00\x04MQTT" + bytes((version,)) + b"\x02\x00\x00" + props + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + varint(len(body)) + body


def publish_packet(qos, pid=0, version=4):
    topic = len(TOPIC).to_bytes(2, "big") + TOPIC
    body = topic + (pid.to_bytes(2, "big") if qos else b"") + (b"\x00" if version == 5 else b"") + PAYLOAD
    return bytes((0x30 | qos << 1,)) + varint(len(body)) + body


def read_packet(sock):
    """Read one whole packet (small ones: CONNACK, SUBACK)."""
    data = b""
    while True:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
        if len(data) >= 2 and not data[-1] & 128:
            break
    need = sum((b & 127) << 7 * k for k, b in enumerate(data[1:]))  # the remaining length
    while need > 0:
        chunk = sock.recv(need)
        if not chunk:
            raise ConnectionError("closed")
        data, need = data + chunk, need - len(chunk)
    return data


def open_client(port, client_id, version=4):
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id, version))
    ack = read_packet(sock)
    assert ack[0] == 0x20 and ack[3] == 0, ack
    return sock


def subscribe(sock, qos, version=4):
    props = b"\x00" if version == 5 else b""
    body = b"\x00\x01" + props + len(TOPIC).to_bytes(2, "big") + TOPIC + bytes((qos,))
    sock.sendall(b"\x82" + varint(len(body)) + body)
    assert read_packet(sock)[0] == 0x90


def packets(buf, pos):
    """Yield (first byte, start of body, end) for each whole packet from pos; return the rest offset."""
    n = len(buf)
    while True:
        if pos + 2 > n:
            return
        i, length, shift = pos + 1, 0, 0
        while True:
            if i >= n:
                return
            b = buf[i]
            length |= (b & 127) << shift
            i += 1
            if not b & 128:
                break
            shift += 7
        if i + length > n:
            return
        yield buf[pos], i, i + length
        pos = i + length


def take_publishes(buf):
    """Return (PUBLISHes whole in ``buf``, the acknowledgements a subscriber owes for them, bytes used)."""
    got, acks, consumed = 0, [], 0
    for head, body, end in packets(buf, 0):
        consumed = end
        if head >> 4 == 3:
            got += 1
            if head & 6:
                tlen = buf[body] << 8 | buf[body + 1]
                acks.append(b"\x40\x02" + buf[body + 2 + tlen:body + 4 + tlen])
    return got, acks, consumed


# -- load processes ----------------------------------------------------------------------

def subscriber(port, qos, count, ready, results, name, version):
    sock = open_client(port, name, version)
    subscribe(sock, qos, version)
    ready.put(name)
    got, first, buf = 0, None, b""
    end_by = time.monotonic() + DEADLINE
    while got < count and time.monotonic() < end_by:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter()
        buf += chunk
        taken, acks, consumed = take_publishes(buf)
        got += taken
        buf = buf[consumed:]
        if acks:
            sock.sendall(b"".join(acks))
    results.put((name, got, time.perf_counter()))
    sock.close()


def publisher(port, qos, count, go, results, version):
    sock = open_client(port, "pub", version)
    go.wait(DEADLINE)
    start = time.perf_counter()
    if qos == 0:
        frame = publish_packet(0, 0, version)
        batch = 500
        for sent in range(0, count, batch):
            sock.sendall(frame * min(batch, count - sent))
    else:
        window, sent, acked, buf = 200, 0, 0, b""
        end_by = time.monotonic() + DEADLINE
        while acked < count and time.monotonic() < end_by:
            burst = min(window - (sent - acked), count - sent)
            if burst > 0:
                sock.sendall(b"".join(publish_packet(1, (sent + k) % 65535 + 1, version) for k in range(burst)))
                sent += burst
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
            consumed = 0
            for head, body, end in packets(buf, 0):
                consumed = end
                acked += head >> 4 == 4
            buf = buf[consumed:]
    results.put(("pub", start))
    time.sleep(0.5)
    sock.close()


def idle_clients(port, count, ready, done, version=4):
    raise_fd_limit()
    socks = [open_client(port, f"idle{n}", version) for n in range(count)]
    ready.set()
    done.wait(DEADLINE)
    for s in socks:
        s.close()


# -- brokers ----------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc):
    end_by = time.monotonic() + 20
    while time.monotonic() < end_by:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited: {proc.communicate()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("broker did not listen")


class Broker:
    def __init__(self, name, cmd, port, tmp):
        self.name, self.port = name, port
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=raise_fd_limit, cwd=tmp)
        wait_port(port, self.proc)

    def cpu(self):
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self):
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


INFLIGHT = [20]  # the in-flight window both brokers keep (--inflight); VerneMQ's default is 20


def start_vmqapi(tmp):
    port = free_port()
    data = tempfile.mkdtemp(dir=tmp)
    cmd = [sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", data, "--set",
           f"listener.tcp.default=127.0.0.1:{port}", "--set", "listener.http.default=127.0.0.1:0",
           "--set", "log.console.level=warning", "--set", "max_online_messages=-1",
           "--set", f"max_inflight_messages={INFLIGHT[0]}"]
    return Broker("vmqapi", cmd, port, tmp)


def start_mosquitto(tmp):
    port = free_port()
    conf = os.path.join(tmp, f"mosquitto-{port}.conf")
    with open(conf, "w") as fh:
        fh.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                 f"max_inflight_messages {INFLIGHT[0]}\n")  # 0: no limit, in both brokers
    return Broker("mosquitto", ["mosquitto", "-c", conf], port, tmp)


# -- scenarios --------------------------------------------------------------------------

def run_flow(broker, qos, subscribers, count, version):
    """Return (deliveries per second, broker CPU seconds per delivery)."""
    ctx = mp.get_context("fork")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    subs = [ctx.Process(target=subscriber, args=(broker.port, qos, count, ready, results, f"sub{n}", version))
            for n in range(subscribers)]
    for p in subs:
        p.start()
    for _ in subs:
        ready.get(timeout=DEADLINE)
    pub = ctx.Process(target=publisher, args=(broker.port, qos, count, go, results, version))
    pub.start()
    time.sleep(0.2)
    cpu0 = broker.cpu()
    go.set()
    got = [results.get(timeout=DEADLINE * 2) for _ in range(subscribers + 1)]
    cpu1 = broker.cpu()
    for p in subs + [pub]:
        p.join(DEADLINE)
        if p.is_alive():
            p.kill()
    start = next(r[1] for r in got if r[0] == "pub")
    delivered = sum(r[1] for r in got if r[0] != "pub")
    finished = max(r[2] for r in got if r[0] != "pub")
    if delivered < count * subscribers:
        print(f"  note: {broker.name} delivered {delivered} of {count * subscribers}", file=sys.stderr)
    return delivered / (finished - start), (cpu1 - cpu0) / max(delivered, 1)


def run_idle(broker, count, version):
    """Return bytes of broker memory per idle connection."""
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    time.sleep(0.3)
    before = broker.rss()
    p = ctx.Process(target=idle_clients, args=(broker.port, count, ready, done, version))
    p.start()
    ready.wait(DEADLINE)
    time.sleep(0.5)
    after = broker.rss()
    done.set()
    p.join(DEADLINE)
    return (after - before) / count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="1000,5000")
    parser.add_argument("--protocol", default="4", choices=("4", "5", "4,5"),
                        help="MQTT protocol level of every client: 4 (3.1.1), 5, or both")
    parser.add_argument("--inflight", type=int, default=20,
                        help="max_inflight_messages of both brokers (0: no limit; mosquitto applies its own "
                             "limit to MQTT 5 clients only)")
    args = parser.parse_args()
    INFLIGHT[0] = args.inflight
    raise_fd_limit()
    peers = [start_vmqapi] + ([start_mosquitto] if shutil.which("mosquitto") else [])
    versions = [int(v) for v in args.protocol.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for start in peers:  # interleaved, so both see the same machine
                for version in versions:
                    broker = start(tmp)
                    column = broker.name + (f" v{version}" if len(versions) > 1 else "")
                    try:
                        for k in args.connections.split(","):  # first, on a broker that has not grown yet
                            rows.setdefault(f"KB per idle connection ({k})", {}).setdefault(column, []).append(
                                run_idle(broker, int(k), version) / 1024)
                        for label, qos, subs, n in (("1->1 QoS 0 msg/s", 0, 1, args.messages),
                                                    ("1->1 QoS 1 msg/s", 1, 1, args.messages // 2),
                                                    ("1->10 QoS 0 deliveries/s", 0, 10, args.messages // 10)):
                            rate, cpu = run_flow(broker, qos, subs, n, version)
                            rows.setdefault(label, {}).setdefault(column, []).append(rate)
                            if subs == 10:
                                rows.setdefault("CPU us per delivery (fan-out)", {}).setdefault(
                                    column, []).append(cpu * 1e6)
                    finally:
                        broker.stop()
    suffixes = [f" v{v}" for v in versions] if len(versions) > 1 else [""]
    names = [p.__name__.replace("start_", "") + s for p in peers for s in suffixes]
    ratios = [(f"{s.strip() or 'ratio'} vs mosq", "vmqapi" + s, "mosquitto" + s) for s in suffixes
              if "mosquitto" + s in names]
    if len(versions) > 1:
        ratios.append(("v5 / v4", "vmqapi v5", "vmqapi v4"))
    print(f"{'measure (median of ' + str(args.rounds) + ')':34}" + "".join(f"{n:>14}" for n in names)
          + "".join(f"{label:>14}" for label, _, _ in ratios))
    for label, by in rows.items():
        values = {n: statistics.median(by[n]) for n in names}
        line = f"{label:34}" + "".join(f"{values[n]:14,.1f}" for n in names)
        line += "".join(f"{values[a] / values[b]:14.2f}" if values[b] else f"{'-':>14}" for _, a, b in ratios)
        print(line)


if __name__ == "__main__":
    main()
