"""The engine's parts alone: each is built with what it uses, without an Engine around it."""

from __future__ import annotations

import collections
import inspect
import types

import vmqapi
from vmqapi import Message, Publish

LISTENER = types.SimpleNamespace(mountpoint="", allowed_versions=(3, 4, 5), allow_anonymous_override=False)
NOW = 1000.0


def parts(seam=None):
    """A Delivery with its Output, a router, a store and counters; ``seam``: the cluster's (NO_CLUSTER)."""
    ctx = vmqapi.Context(lambda: vmqapi.Config({}), NOW)
    counters = collections.defaultdict(int)
    store, hooks = vmqapi.MemoryStore(), vmqapi.Hooks()
    output = vmqapi.Output(ctx, counters, hooks, store)
    delivery = vmqapi.Delivery(ctx, output, vmqapi.Router(lambda pool: pool[0]), store, hooks, counters, {})
    if seam is not None:
        delivery.seam = seam
    return delivery


def online(delivery, client_id):
    """A session of ``client_id`` with a connected MQTT 3.1.1 client."""
    session = delivery.sessions[("", client_id)] = vmqapi.Session("", client_id, NOW, None)
    conn = vmqapi.Connection(None, LISTENER, ("127.0.0.1", 1), None, NOW)
    conn.connected, conn.session, session.client = True, session, conn
    return session, conn


def sent(conn):
    data, pos, packets = b"".join(conn.out), 0, []
    while pos < len(data):
        packet, pos = vmqapi.decode_packet(data, pos, 0, conn.proto)
        packets.append(packet)
    conn.out.clear()
    return packets


def test_delivery_routes_to_a_session_and_forgets_what_is_acknowledged():
    delivery = parts()
    session, conn = online(delivery, "c1")
    delivery.router.add(session, "a/#", vmqapi.QOS_ONLY[1])
    assert delivery.route("", Message("a/b", b"x", 1, ref=1)) == 1
    assert delivery.output.take_dirty() == [conn]
    assert sent(conn) == [Publish("a/b", b"x", 1, packet_id=1)]
    assert list(session.inflight) == [1]
    delivery.complete(session, 1)
    assert not session.inflight and delivery.counters["queue_message_out", ()] == 1


def test_delivery_hands_other_nodes_to_the_cluster_seam_once_per_message():
    class Recorder:
        netsplit, full_nodes = "", frozenset()

        def __init__(self):
            self.forwards = []

        def forward(self, mountpoint, msg, nodes):
            wanted = {node: (plain, list(groups)) for node, (plain, groups) in nodes.items()}
            self.forwards.append((mountpoint, msg.topic, wanted))

    seam = Recorder()
    delivery = parts(seam)
    delivery.router.set_remote("b@x", "", "a/#", 2, 1)
    delivery.router.set_remote("b@x", "", "a/b", 1, 1)
    delivery.router.set_remote("b@x", "", "$share/g/a/b", 1, 1)
    delivery.route("", Message("a/b", b"x", 0, ref=1))
    assert seam.forwards == [("", "a/b", {"b@x": (True, ["g/a/b"])})]
    delivery.route("", Message("a/b", b"x", 0, ref=2), forward=False)  # a forwarded message: never on again
    assert len(seam.forwards) == 1


def test_a_node_on_its_own_asks_no_cluster():
    delivery = parts()
    assert delivery.seam is vmqapi.NO_CLUSTER
    delivery.router.set_remote("b@x", "", "a/#", 1, 1)  # (never on a node on its own; nothing goes anywhere)
    assert delivery.route("", Message("a/b", b"x", 0, ref=1)) == 1


def _methods(cls):
    return {name: inspect.signature(fn) for name, fn in vars(cls).items() if callable(fn) and not name.startswith("_")}


def test_the_stores_and_the_cluster_sides_have_what_their_protocols_name():
    for protocol, implementations in ((vmqapi.Store, (vmqapi.MemoryStore, vmqapi.SqliteStore)),
                                      (vmqapi.ClusterSeam, (type(vmqapi.NO_CLUSTER), vmqapi.Peers))):
        for name, signature in _methods(protocol).items():
            for cls in implementations:
                assert list(inspect.signature(getattr(cls, name)).parameters) == list(signature.parameters), \
                    (cls.__name__, name)
        for attribute in protocol.__annotations__:
            assert hasattr(vmqapi.NO_CLUSTER if protocol is vmqapi.ClusterSeam else vmqapi.MemoryStore(), attribute)


def test_the_engine_offers_its_parts_operations_as_its_own():
    engine = vmqapi.Engine(lambda: vmqapi.Config({}), vmqapi.MemoryStore(), vmqapi.Hooks(),
                           new_client_id=lambda: "anon", choose=lambda pool: pool[0], now=NOW)
    for part, names in vmqapi.ENGINE_PARTS.items():
        for name in names:
            assert getattr(engine, name) == getattr(getattr(engine, part), name), name
    assert engine.seam is vmqapi.NO_CLUSTER
    peers = vmqapi.Peers(engine.ctx, engine.life)  # the cluster's side, which the cluster builds and hands in
    engine.join_cluster(peers)
    peers.clustered = True
    assert engine.seam is engine.delivery.seam is engine.life.seam is peers


def test_an_idle_persistent_session_holds_no_queue_and_no_id_set_until_it_needs_them():
    # An empty deque is 760 bytes and an empty set 216: most of what an idle persistent session cost
    # (bench/scale.py: 2.54 KB of RSS each, 1.52 without them).
    import tracemalloc
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        idle = [vmqapi.Session("", f"client-{i:05}", NOW, None) for i in range(1000)]
        each = (tracemalloc.get_traced_memory()[0] - before) / len(idle)
    finally:
        tracemalloc.stop()
    assert each < 700, f"{each:.0f} bytes per idle session"
    delivery = parts()
    session = delivery.sessions[("", "c1")] = vmqapi.Session("", "c1", NOW, None)
    delivery.router.add(session, "a/#", vmqapi.QOS_ONLY[2])
    assert session.queue is vmqapi.NO_QUEUE and session.incoming is vmqapi.NO_IDS
    for n in range(3):  # offline: queued, the queue made at the first
        assert delivery.route("", Message("a/b", bytes([n]), 1, ref=n + 1)) == 1
    assert [out.msg.payload for out in session.queue] == [b"\0", b"\1", b"\2"]
    conn = vmqapi.Connection(None, LISTENER, ("127.0.0.1", 1), None, NOW)
    conn.connected, conn.session, session.client = True, session, conn
    delivery.drain(session)
    assert [p.payload for p in sent(conn)] == [b"\0", b"\1", b"\2"] and not session.queue
