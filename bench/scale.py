"""Persistent sessions and subscriptions at scale: vmqapi, and mosquitto when installed.

    python bench/scale.py [--sessions 10000] [--filters 10000] [--rounds 3] [--floor]

Three figures per broker, from one run, each load a separate process speaking raw MQTT 3.1.1
over loopback:

- sessions made: ``--sessions`` clients, one connection after another, each CONNECT with
  clean session off, one SUBSCRIBE (its own topic, QoS 1) and DISCONNECT; the seconds it takes.
- memory per persistent session: the broker's RSS (``/proc/<pid>/status``) after those
  sessions, all offline, less its RSS before, per session.
- memory per subscription filter: on a broker started afresh, one connection subscribes to
  ``--filters`` distinct filters over connections of 1,000 each (100 per SUBSCRIBE; vmqapi's
  max_subscriptions_per_client is 1,000); the RSS they add, per filter.

vmqapi runs with its defaults (sessions committed to its SQLite store before the SUBACK goes);
mosquitto with its own (sessions in memory, written only to its periodic snapshot when
persistence is on, which it is not here).

``--floor`` adds two rows of sessions made against what any asyncio broker pays: a server of
a few lines in this file that answers the load's CONNECT and SUBSCRIBE at once and keeps
nothing, and the same server committing a session row and a subscription row to SQLite
(WAL, synchronous NORMAL, as vmqapi's store) before each SUBACK.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing as mp
import os
import shutil
import socket
import sqlite3
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


class FloorProtocol(asyncio.Protocol):
    """Answer the load's CONNECT with CONNACK and its SUBSCRIBE with SUBACK (granted QoS 1), at once."""

    db: sqlite3.Connection | None = None  # set: commit the session and its subscription before the SUBACK

    def connection_made(self, transport):
        self.transport, self.buffer, self.client_id = transport, b"", ""

    def data_received(self, data):
        buf = self.buffer + data
        while len(buf) >= 2 and len(buf) >= 2 + buf[1]:  # the load's packets are under 128 bytes
            packet, buf = buf[:2 + buf[1]], buf[2 + buf[1]:]
            kind = packet[0] >> 4
            if kind == 1:  # CONNECT: its client id follows the 10 bytes of the variable header
                self.client_id = packet[14:].decode()
                self.transport.write(b"\x20\x02\x00\x00")
            elif kind == 8:  # SUBSCRIBE: packet id, then one filter and its options byte
                if self.db is not None:
                    self.db.execute("INSERT OR REPLACE INTO sessions VALUES ('', ?)", (self.client_id,))
                    self.db.execute("INSERT OR REPLACE INTO subscriptions VALUES ('', ?, ?, 1)",
                                    (self.client_id, packet[6:-1].decode()))
                    self.db.commit()
                self.transport.write(b"\x90\x03" + packet[2:4] + b"\x01")
            elif kind == 14:  # DISCONNECT
                self.transport.close()
        self.buffer = buf


def floor_server(tmp: str, commit: bool, ports) -> None:
    """Serve FloorProtocol on a free loopback port (sent to ``ports``) until killed."""
    if commit:
        db = sqlite3.connect(os.path.join(tmp, "floor.db"), isolation_level="DEFERRED")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE sessions (mountpoint TEXT, client_id TEXT, PRIMARY KEY (mountpoint, client_id)) "
                   "WITHOUT ROWID")
        db.execute("CREATE TABLE subscriptions (mountpoint TEXT, client_id TEXT, filter TEXT, qos INTEGER, "
                   "PRIMARY KEY (mountpoint, client_id, filter)) WITHOUT ROWID")
        FloorProtocol.db = db

    async def serve():
        server = await asyncio.get_running_loop().create_server(FloorProtocol, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await asyncio.sleep(DEADLINE * 10)

    asyncio.run(serve())


def measure_floor(commit: bool, sessions: int) -> float:
    """Seconds the load takes against the floor server."""
    ctx = mp.get_context("fork")
    ports, results = ctx.Queue(), ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        server = ctx.Process(target=floor_server, args=(tmp, commit, ports), daemon=True)
        server.start()
        try:
            port = ports.get(timeout=30)
            load = ctx.Process(target=make_sessions, args=(port, sessions, results))
            load.start()
            made, seconds = results.get(timeout=DEADLINE + 30)
            load.join(30)
        finally:
            server.kill()
            server.join(10)
    return seconds * sessions / max(made, 1)


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
    parser.add_argument("--floor", action="store_true", help="add the asyncio floor's rows (see above)")
    args = parser.parse_args()
    mqttbench.raise_fd_limit()
    peers = [mqttbench.start_vmqapi] + ([mqttbench.start_mosquitto] if shutil.which("mosquitto") else [])
    rows: dict[str, dict[str, list[float]]] = {}
    floors: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for commit in (False, True) if args.floor else ():
                label = "floor: asyncio + SQLite, per s" if commit else "floor: asyncio alone, per s"
                floors.setdefault(label, []).append(args.sessions / measure_floor(commit, args.sessions))
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
    made = rows.get("sessions made per s", {})
    for label, rates in floors.items():  # the floor's rate in the first column, its ratio to mosquitto's
        rate = statistics.median(rates)
        line = f"{label:34}{rate:14,.2f}"
        if "mosquitto" in made:
            peer = statistics.median(made["mosquitto"])
            line += f"{peer:14,.2f}{rate / peer:14.2f}"
        print(line)
    print("ratio: vmqapi / mosquitto (for seconds and KB, lower is better; for the rate, higher)"
          + ("; floor rows: the floor server's rate / mosquitto's" if floors else ""))


if __name__ == "__main__":
    main()
