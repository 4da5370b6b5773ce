"""Persistent sessions and subscriptions at scale: vmqapi, and mosquitto when installed.

    python bench/scale.py [--sessions 10000] [--filters 10000] [--rounds 3]

Three figures per broker, from one run, each load a separate process speaking raw MQTT 3.1.1
over loopback:

- sessions made: ``--sessions`` clients, one connection after another, each CONNECT with
  clean session off, one SUBSCRIBE (its own topic, QoS 1) and DISCONNECT; the seconds it takes.
- memory per persistent session: the broker's RSS (``/proc/<pid>/status``) after those
  sessions, all offline, less its RSS before, per session.
- memory per subscription filter: on a broker started afresh, one connection subscribes to
  ``--filters`` distinct filters over connections of 1,000 each (100 per SUBSCRIBE; vmqapi's
  max_subscriptions_per_client is 1,000); the RSS they add, per filter.

vmqapi runs with its defaults (sessions committed to its SQLite store before the CONNACK and
SUBACK go); mosquitto with its own (sessions in memory, written only to its periodic
snapshot when persistence is on, which it is not here).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("mqttbench", os.path.join(_HERE, "mqtt.py"))
mqttbench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mqttbench)  # raw MQTT helpers and the two brokers

DEADLINE = 300.0  # seconds any one load may take
PER_CONNECTION = 1000  # filters per connection: max_subscriptions_per_client's default


def persistent_connect(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x00\x00\x3c" + len(cid).to_bytes(2, "big") + cid  # flags 0: clean session off
    return b"\x10" + mqttbench.varint(len(body)) + body


def subscribe_packet(pid: int, filters: list[bytes], qos: int = 1) -> bytes:
    body = pid.to_bytes(2, "big") + b"".join(len(f).to_bytes(2, "big") + f + bytes((qos,)) for f in filters)
    return b"\x82" + mqttbench.varint(len(body)) + body


def make_sessions(port: int, count: int, results) -> None:
    """One connection after another: CONNECT (clean session off), SUBSCRIBE, DISCONNECT."""
    start, end_by = time.perf_counter(), time.monotonic() + DEADLINE
    made = 0
    for n in range(count):
        if time.monotonic() > end_by:
            break
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(persistent_connect(f"scale-{n}"))
        ack = mqttbench.read_packet(sock)
        assert ack[0] == 0x20 and ack[3] == 0, ack
        sock.sendall(subscribe_packet(1, [f"scale/{n}/state".encode()]))
        suback = mqttbench.read_packet(sock)
        assert suback[0] == 0x90 and suback[-1] == 1, suback
        sock.sendall(b"\xe0\x00")
        sock.close()
        made += 1
    results.put((made, time.perf_counter() - start))


def subscribe_many(port: int, count: int, ready, done) -> None:
    """Connections holding ``count`` distinct filters between them (PER_CONNECTION each) until ``done``."""
    socks = []
    for first in range(0, count, PER_CONNECTION):
        sock = mqttbench.open_client(port, f"scale-filters-{first}")
        socks.append(sock)
        for pid, low in enumerate(range(first, min(first + PER_CONNECTION, count), 100), 1):
            sock.sendall(subscribe_packet(pid, [f"scale/f/{n}/+/x".encode()
                                                for n in range(low, min(low + 100, first + PER_CONNECTION, count))], 0))
            suback = mqttbench.read_packet(sock)
            assert suback[0] == 0x90 and not any(code & 0x80 for code in suback[4:]), "a filter was refused"
    ready.set()
    done.wait(DEADLINE)
    for sock in socks:
        sock.close()


def settle(broker, seconds: float = 0.5) -> int:
    time.sleep(seconds)
    return broker.rss()


def measure_sessions(broker, sessions: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    row = {}
    before = settle(broker)
    results = ctx.Queue()
    p = ctx.Process(target=make_sessions, args=(broker.port, sessions, results))
    p.start()
    made, seconds = results.get(timeout=DEADLINE + 30)
    p.join(30)
    if made < sessions:
        print(f"  note: {broker.name} made {made} of {sessions} sessions in {seconds:.0f} s", file=sys.stderr)
    row[f"{sessions:,} sessions made, s"] = seconds
    row["sessions made per s"] = made / seconds
    row["KB per persistent session"] = (settle(broker, 1.0) - before) / max(made, 1) / 1024
    return row


def measure_filters(broker, filters: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    before = settle(broker)
    p = ctx.Process(target=subscribe_many, args=(broker.port, filters, ready, done))
    p.start()
    ready.wait(DEADLINE)
    row = {"KB per subscription filter": (settle(broker, 1.0) - before) / filters / 1024}
    done.set()
    p.join(30)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--filters", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    mqttbench.raise_fd_limit()
    peers = [mqttbench.start_vmqapi] + ([mqttbench.start_mosquitto] if shutil.which("mosquitto") else [])
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for start in peers:  # interleaved, so both see the same machine
                for measure, size in ((measure_sessions, args.sessions), (measure_filters, args.filters)):
                    broker = start(tmp)  # each figure on a broker of its own, that has not grown yet
                    try:
                        for label, value in measure(broker, size).items():
                            rows.setdefault(label, {}).setdefault(broker.name, []).append(value)
                    finally:
                        broker.stop()
    names = [p.__name__.replace("start_", "") for p in peers]
    print(f"{'measure (median of ' + str(args.rounds) + ')':34}" + "".join(f"{n:>14}" for n in names)
          + (f"{'ratio':>14}" if len(names) > 1 else ""))
    for label, by in rows.items():
        values = [statistics.median(by[n]) for n in names]
        line = f"{label:34}" + "".join(f"{v:14,.2f}" for v in values)
        if len(values) > 1 and values[1]:
            line += f"{values[0] / values[1]:14.2f}"
        print(line)
    print("ratio: vmqapi / mosquitto (for seconds and KB, lower is better; for the rate, higher)")


if __name__ == "__main__":
    main()
