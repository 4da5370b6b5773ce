"""The engine's side of a cluster: two or three Engines wired by hand, as the cluster would wire them.

The test plays the cluster: it copies each node's Peers' ``take_forwards()`` into the named
node's Peers' ``deliver_forwarded``, sets other nodes' interest from ``take_session_changes()``
and ``session_summary``, and answers ``elsewhere`` from the other engines' sessions.
"""

from __future__ import annotations

import itertools
import types

import pytest
from hypothesis import given, settings, strategies as st

import vmqapi
from vmqapi import Connack, Connect, Disconnect, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, \
    Unsuback, Unsubscribe

LISTENER = types.SimpleNamespace(mountpoint="", allowed_versions=(3, 4, 5), allow_anonymous_override=False)
NOW = 1000.0


def first(pool):
    return pool[0]


class Node:
    """One engine and the settings it reads."""

    def __init__(self, name, choose=first, store=None, **settings):
        self.name = name
        self.config = vmqapi.Config(settings)
        ids = itertools.count()
        self.engine = vmqapi.Engine(lambda: self.config, store or vmqapi.MemoryStore(), vmqapi.Hooks(),
                                    new_client_id=lambda: f"anon-{next(ids)}", choose=choose, now=NOW)
        self.peers = vmqapi.Peers(self.engine.ctx, self.engine.life)  # the engine's side, as the cluster builds it
        self.engine.join_cluster(self.peers)
        self.peers.clustered = True

    def set(self, **values):
        self.config = self.config.with_values(values)


class Cluster:
    """The glue, by hand: interest, forwards, takeovers."""

    def __init__(self, *nodes):
        self.nodes = {n.name: n for n in nodes}
        self.summaries = {n.name: {} for n in nodes}  # node -> (mp, client id) -> summary
        self.forwarded = []  # every forward taken, for the tests to look at
        for node in nodes:
            node.peers.elsewhere = self.elsewhere_of(node.name)

    def elsewhere_of(self, here):
        def elsewhere(mountpoint, client_id):
            for name, node in self.nodes.items():
                summary = node.peers.session_summary(mountpoint, client_id)
                if name != here and summary is not None:
                    return {"node": name, "clean": summary["clean"], "subs": summary["subs"]}
            return None
        return elsewhere

    def sync(self):
        """Send every node's changed sessions to the others as (members, online) per filter."""
        for name, node in self.nodes.items():
            changed = node.peers.take_session_changes()
            if not changed:
                continue
            table = self.summaries[name]
            for key in changed:
                summary = node.peers.session_summary(*key)
                if summary is None:
                    table.pop(key, None)
                else:
                    table[key] = summary
            counts = {}
            for (mp, _), summary in table.items():
                for topic_filter in summary["subs"]:
                    members, online = counts.get((mp, topic_filter), (0, 0))
                    counts[(mp, topic_filter)] = (members + 1, online + summary["online"])
            for other_name, other in self.nodes.items():
                if other_name == name:
                    continue
                router = other.engine.router
                for mp, topic_filter in list(router.remote.get(name, {})):
                    if (mp, topic_filter) not in counts:
                        router.set_remote(name, mp, topic_filter, 0, 0)
                for (mp, topic_filter), (members, online) in counts.items():
                    router.set_remote(name, mp, topic_filter, members, online)

    def forward(self):
        """Carry each node's forwards to their nodes; return how many went."""
        moved = 0
        for node in self.nodes.values():
            for target, mountpoint, msg, plain, groups in node.peers.take_forwards():
                self.forwarded.append((node.name, target, msg, plain, groups))
                self.nodes[target].peers.deliver_forwarded(mountpoint, msg, plain, groups, NOW)
                moved += 1
        return moved

    def takeovers(self):
        for name, node in self.nodes.items():
            for old, mountpoint, client_id in node.peers.take_takeovers():
                messages = self.nodes[old].peers.hand_over(mountpoint, client_id, NOW)
                node.peers.adopt_messages(mountpoint, client_id, messages, NOW)


class Client:
    """A client of one engine: decodes what the engine leaves in its outbox and acknowledges publishes."""

    def __init__(self, node, cid, version=4, clean=True, expiry=0, ack=True, will_topic=None):
        self.node, self.engine, self.cid, self.version, self.ack = node, node.engine, cid, version, ack
        self.conn = self.engine.connection_made(None, LISTENER, ("127.0.0.1", 1), None, NOW)
        self._received, self.packets, self.pid = [], [], itertools.count(1)
        props = (("session_expiry_interval", expiry),) if version == 5 and expiry else ()
        self.send(Connect(cid, version, clean, will_topic=will_topic, properties=props))
        self.connack = self.packets[0]
        assert isinstance(self.connack, Connack)

    @property
    def received(self):
        """Every PUBLISH the client got, once it has read what waits."""
        self.read()
        return self._received

    def send(self, packet):
        self.engine.handle(self.conn, packet, NOW)
        self.read()

    def read(self):
        self.engine.take_dirty()
        data = b"".join(self.conn.out)
        self.conn.out.clear()
        self.conn.out_bytes = 0
        pos, acks = 0, []
        while pos < len(data):
            packet, pos = vmqapi.decode_packet(data, pos, 0, self.version)
            self.packets.append(packet)
            if isinstance(packet, Publish):
                self._received.append(packet)
                if self.ack and packet.qos == 1:
                    acks.append(Puback(packet.packet_id))
                elif self.ack and packet.qos == 2:
                    acks.append(Pubrec(packet.packet_id))
            elif isinstance(packet, Pubrel):
                acks.append(Pubcomp(packet.packet_id))
        for ack in acks:
            self.send(ack)

    def subscribe(self, *filters, qos=1):
        self.send(Subscribe(next(self.pid), tuple((f, qos) for f in filters)))
        return self.packets[-1]

    def unsubscribe(self, *filters):
        self.send(Unsubscribe(next(self.pid), filters))
        return self.packets[-1]

    def publish(self, topic, payload, qos=0, retain=False):
        self.send(Publish(topic, payload, qos, retain, False, next(self.pid) if qos else None))

    def payloads(self):
        return [p.payload for p in self.received]

    def lost(self):
        self.engine.connection_lost(self.conn, NOW)


def pair(**settings):
    a, b = Node("a@x", **settings), Node("b@x", **settings)
    return a, b, Cluster(a, b)


# -- forwarding -----------------------------------------------------------------------
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_a_subscriber_on_b_gets_a_publish_once_in_order(qos):
    a, b, cluster = pair()
    sub = Client(b, "sub")
    sub.subscribe("t/#", qos=2)
    cluster.sync()
    pub = Client(a, "pub")
    for n in range(5):
        pub.publish("t/x", str(n).encode(), qos)
    assert a.engine.counters["router_matches_remote", ()] == 5
    assert cluster.forward() == 5
    got = sub.received
    assert [p.payload for p in got] == [str(n).encode() for n in range(5)]
    assert {p.qos for p in got} == {qos}
    assert cluster.forward() == 0  # B forwards nothing back
    assert sub.payloads() == [str(n).encode() for n in range(5)]  # and nothing more came once acknowledged


def test_no_forward_without_interest_and_after_unsubscribe():
    a, b, cluster = pair()
    sub = Client(b, "sub")
    sub.subscribe("other")
    cluster.sync()
    pub = Client(a, "pub")
    pub.publish("t", b"nobody")
    assert a.peers.take_forwards() == []
    sub.subscribe("t")
    cluster.sync()
    pub.publish("t", b"one")
    sub.unsubscribe("t")
    cluster.sync()
    pub.publish("t", b"none")
    assert [f[2].payload for f in a.peers.take_forwards()] == [b"one"]


def test_one_forward_per_node_whatever_number_of_filters_match():
    a, b, cluster = pair()
    s1, s2 = Client(b, "s1"), Client(b, "s2")
    s1.subscribe("t/#", "t/+", "#")
    s2.subscribe("t/x")
    cluster.sync()
    Client(a, "pub").publish("t/x", b"m", 1)
    forwards = a.peers.take_forwards()
    assert [(node, mp, plain, groups) for node, mp, _, plain, groups in forwards] == [("b@x", "", True, ())]
    assert a.engine.counters["router_matches_remote", ()] == 1
    assert a.engine.counters["router_matches_local", ()] == 0
    b.peers.deliver_forwarded(*forwards[0][1:], NOW)
    assert s1.payloads() == [b"m"] and s2.payloads() == [b"m"]  # one copy per session, as on one node


def test_a_forwarded_message_is_never_forwarded_again():
    a, b, c = Node("a@x"), Node("b@x"), Node("c@x")
    cluster = Cluster(a, b, c)
    subs = [Client(n, f"s-{n.name}") for n in (a, b, c)]
    for s in subs:
        s.subscribe("t")
    cluster.sync()
    Client(a, "pub").publish("t", b"once", 1)
    forwards = a.peers.take_forwards()
    assert sorted(f[0] for f in forwards) == ["b@x", "c@x"]
    for target, mp, msg, plain, groups in forwards:
        cluster.nodes[target].peers.deliver_forwarded(mp, msg, plain, groups, NOW)
    assert b.peers.take_forwards() == [] and c.peers.take_forwards() == []
    assert [s.payloads() for s in subs] == [[b"once"]] * 3


def test_a_retained_publish_is_forwarded_as_published_and_not_stored_there():
    a, b, cluster = pair()
    sub = Client(b, "sub", version=5)
    sub.send(Subscribe(1, (("r", 1 | 8),)))  # Retain As Published
    cluster.sync()
    Client(a, "pub").publish("r", b"kept", 1, retain=True)
    (node, mp, msg, plain, groups), = a.peers.take_forwards()
    assert msg.retain
    b.peers.deliver_forwarded(mp, msg, plain, groups, NOW)
    assert [(p.payload, p.retain) for p in sub.received] == [(b"kept", True)]
    assert b.engine.router.retained_count() == 0  # retained messages travel apart (apply_remote_retained)
    assert b.peers.take_retained_changes() == []


def test_remote_interest_is_idempotent_clears_the_cache_and_is_checked():
    router = Node("a@x").engine.router
    assert router.match("", "t") == {}  # cached
    router.set_remote("b@x", "", "t", 2, 1)
    router.set_remote("b@x", "", "t", 2, 1)
    router.set_remote("b@x", "", "#", 1, 0)
    assert list(router.match("", "t")) == [vmqapi.RemoteNode("b@x")]
    router.set_remote("b@x", "", "t", 0, 0)
    assert list(router.match("", "t")) == [vmqapi.RemoteNode("b@x")]  # "#" still wants it
    router.drop_remote("b@x")
    assert router.match("", "t") == {} and router.remote == {} and router.subscription_count() == 0
    for bad in (("t/#/x", 1, 0), ("t", 1, 2), ("t", -1, 0)):
        with pytest.raises(vmqapi.ClusterError):
            router.set_remote("b@x", "", *bad)


# -- shared subscriptions across nodes ------------------------------------------------
def shared_setup(policy, local, remote, choose=first):
    """A publisher on A; ``local``/``remote``: member states ("on"/"off") of $share/g/t on A and B."""
    a, b = Node("a@x", choose, shared_subscription_policy=policy), Node("b@x", choose,
                                                                           shared_subscription_policy=policy)
    cluster = Cluster(a, b)
    members = []
    for node, states in ((a, local), (b, remote)):
        for n, state in enumerate(states):
            m = Client(node, f"{node.name}-{n}", clean=False)
            m.subscribe("$share/g/t")
            if state == "off":
                m.send(Disconnect())
            members.append(m)
    cluster.sync()
    return a, b, cluster, members


def deliveries(cluster, members, count=6):
    pub = Client(cluster.nodes["a@x"], "pub")
    for n in range(count):
        pub.publish("t", str(n).encode(), 1)
    cluster.forward()
    return {m.cid: m.payloads() for m in members}


@pytest.mark.parametrize("policy, local, remote, winner", [
    ("prefer_local", ["on"], ["on"], "a@x-0"),
    ("prefer_local", ["off"], ["on"], "a@x-0"),  # a local member, even offline, before another node
    ("prefer_local", [], ["on"], "b@x-0"),
    ("local_only", ["off"], ["on"], "a@x-0"),
    ("local_only", [], ["on"], None),  # never leaves the node
    ("prefer_online_before_local", ["off"], ["on"], "b@x-0"),
    ("prefer_online_before_local", ["on"], ["on"], "a@x-0"),
    ("prefer_online_before_local", ["off"], ["off"], "a@x-0"),
    ("random", ["off"], ["on"], "b@x-0"),  # online members first, wherever they are
])
def test_shared_policy_picks_one_member_per_message(policy, local, remote, winner):
    a, b, cluster, members = shared_setup(policy, local, remote)
    got = deliveries(cluster, members)
    for m in members:
        if m.cid.startswith("a@x") and m.conn.closed:
            m2 = Client(a, m.cid, clean=False)  # offline local members kept theirs in their queue
            got[m.cid] = m2.payloads()
    expected = [str(n).encode() for n in range(6)]
    assert {cid: p for cid, p in got.items() if p} == ({winner: expected} if winner else {})
    if winner is None:
        assert cluster.forwarded == []
    if winner and winner.startswith("b@x"):
        assert [f[3:] for f in cluster.forwarded] == [(False, ("g/t",))] * 6


def test_random_counts_each_remote_member_and_never_duplicates():
    seen = []

    def choose(pool):
        seen.append([pool[i] for i in range(len(pool))])
        return pool[len(seen) % len(pool)]

    a, b, cluster, members = shared_setup("random", ["on"], ["on", "on", "on"], choose)
    got = deliveries(cluster, members, count=8)
    assert seen[0][0].client_id == "a@x-0" and seen[0][1:4] == ["b@x"] * 3  # A's member, B's three
    assert sorted(p for ps in got.values() for p in ps) == sorted(str(n).encode() for n in range(8))  # once each
    on_a = [s for s in seen if len(s) == 4]
    on_b = [s for s in seen if len(s) == 3]  # B picks among its own online members only
    assert len(on_a) == 8 and all(isinstance(m, vmqapi.Session) and m.mountpoint == "" for s in on_b for m in s)
    assert len(got["a@x-0"]) == 8 - len(on_b) == 8 - len(cluster.forwarded) > 0


def test_a_group_with_members_on_both_sides_and_a_plain_subscriber_gets_one_forward():
    a, b, cluster = pair(shared_subscription_policy="prefer_online_before_local")
    off = Client(a, "a-member", clean=False)
    off.subscribe("$share/g/t")
    off.send(Disconnect())
    Client(b, "b-member").subscribe("$share/g/t")
    Client(b, "b-plain").subscribe("t")
    Client(b, "b-other-group").subscribe("$share/h/t")
    cluster.sync()
    Client(a, "pub").publish("t", b"m", 1)
    (node, _, _, plain, groups), = a.peers.take_forwards()
    assert (node, plain, sorted(groups)) == ("b@x", True, ["g/t", "h/t"])


# -- netsplits ------------------------------------------------------------------------
@pytest.mark.parametrize("version", [4, 5])
def test_netsplit_refuses_connect_unless_allowed(version):
    a = Node("a@x")
    a.peers.netsplit = "b@x unreachable"
    refused = Client(a, "c", version=version)
    assert refused.connack.return_code == (3 if version == 4 else 0x88) and refused.conn.closing
    label = ("return_code", "server_unavailable") if version == 4 else ("reason_code", "server_unavailable")
    assert a.engine.counters["mqtt_connack_sent", (("mqtt_version", str(version)), label)] == 1
    a.set(allow_register_during_netsplit="on")
    assert Client(a, "c", version=version).connack.return_code == 0


@pytest.mark.parametrize("version", [4, 5])
def test_netsplit_refuses_subscribe_and_unsubscribe_unless_allowed(version):
    a = Node("a@x", allow_register_during_netsplit="on")
    c = Client(a, "c", version=version, clean=False, expiry=100)
    c.subscribe("kept")
    a.peers.netsplit = "b@x unreachable"
    assert c.subscribe("t", "u").return_codes == (0x80, 0x80)
    assert a.engine.counters["mqtt_subscribe_error", ()] == 2 and c.engine.sessions[("", "c")].subs.keys() == {"kept"}
    answer = c.unsubscribe("kept")
    assert a.engine.counters["mqtt_unsubscribe_error", ()] == 1
    assert "kept" in c.engine.sessions[("", "c")].subs
    if version == 5:
        assert isinstance(answer, Unsuback) and answer.reason_codes == (0x80,)
    else:  # MQTT 3.1.1 cannot say no to an UNSUBSCRIBE: the connection is closed instead
        assert not isinstance(answer, Unsuback) and c.conn.closing and c.conn.closed
        c = Client(a, "c", version=version, clean=False)
    a.set(allow_subscribe_during_netsplit="on", allow_unsubscribe_during_netsplit="on")
    assert c.subscribe("t").return_codes == (1,)
    answer = c.unsubscribe("t")
    assert isinstance(answer, Unsuback) and c.engine.sessions[("", "c")].subs.keys() <= {"kept"}


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_netsplit_refuses_publish_unless_allowed(version, qos):
    a = Node("a@x", allow_register_during_netsplit="on")
    sub = Client(a, "sub")
    sub.subscribe("t")
    pub = Client(a, "pub", version=version)
    a.peers.netsplit = "b@x unreachable"
    pub.publish("t", b"refused", qos)
    assert sub.payloads() == [] and a.engine.counters["mqtt_publish_error", ()] == 1
    answer = pub.packets[-1]
    if qos and version == 5:
        assert isinstance(answer, Puback if qos == 1 else Pubrec) and answer.reason_code == 0x80
    elif qos:
        assert pub.conn.closed  # MQTT 3.1.1 cannot refuse: cut off, as when the store cannot keep it
    else:
        assert isinstance(answer, Connack) and not pub.conn.closed  # QoS 0: dropped
    a.set(allow_publish_during_netsplit="on")
    pub = Client(a, "pub", version=version)
    pub.publish("t", b"taken", qos)
    assert sub.payloads() == [b"taken"]
    a.peers.netsplit = ""
    a.set(allow_publish_during_netsplit="off")
    pub.publish("t", b"whole again", qos)
    assert sub.payloads() == [b"taken", b"whole again"]


# -- sessions and takeover ------------------------------------------------------------
def test_session_changes_and_summaries():
    a = Node("a@x")
    a.peers.take_session_changes()
    c = Client(a, "c", version=5, clean=False, expiry=100)
    assert a.peers.take_session_changes() == {("", "c")}
    c.send(Subscribe(1, (("t/+", 2 | 4 | 8 | 16),), (("subscription_identifier", 7),)))
    assert a.peers.take_session_changes() == {("", "c")}
    assert a.peers.session_summary("", "c") == {"clean": False, "online": True,
                                                 "subs": {"t/+": [2, True, True, 1, 7]}}
    assert a.peers.take_session_changes() == set()
    c.send(Disconnect())
    assert a.peers.take_session_changes() == {("", "c")}
    assert a.peers.session_summary("", "c")["online"] is False
    a.engine.disconnect("c", cleanup=True)
    assert a.peers.take_session_changes() == {("", "c")} and a.peers.session_summary("", "c") is None


def test_a_standalone_engine_records_no_changes():
    a = Node("a@x")
    a.peers.clustered = False
    Client(a, "c").publish("r", b"x", retain=True)
    assert a.peers.take_session_changes() == set() and a.peers.take_retained_changes() == []
    a.peers.clustered = True  # the first take is then the whole state
    assert a.peers.take_session_changes() == {("", "c")}
    assert a.peers.take_retained_changes() == [("", "r")]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_takeover_moves_a_persistent_session_and_its_messages(tmp_path, store):
    stores = {n: (vmqapi.SqliteStore(str(tmp_path / f"{n}.db")) if store == "sqlite" else vmqapi.MemoryStore())
              for n in "ab"}
    a = Node("a@x", store=stores["a"], max_inflight_messages=2)
    b = Node("b@x", store=stores["b"], max_inflight_messages=2)
    cluster = Cluster(a, b)
    try:
        old = Client(a, "mover", version=5, clean=False, expiry=3600, ack=False)
        old.subscribe("q/#", qos=1)
        pub = Client(a, "pub")
        for n in range(6):
            pub.publish("q/x", str(n).encode(), 1)
        assert [p.payload for p in old.received] == [b"0", b"1"]  # two in flight, four queued
        old.send(Puback(old.received[0].packet_id))  # the first is delivered: it must not come again
        assert [p.payload for p in old.received] == [b"0", b"1", b"2"]
        stores["a"].commit()
        new = Client(b, "mover", version=5, clean=False, expiry=3600)
        assert new.connack.session_present
        assert b.peers.session_summary("", "mover")["subs"] == {"q/#": [1, False, False, 0, 0]}
        cluster.takeovers()
        old.read()
        assert isinstance(old.packets[-1], Disconnect) and old.packets[-1].reason_code == 0x8E
        assert old.conn.closed and a.peers.session_summary("", "mover") is None
        assert [p.payload for p in new.received] == [str(n).encode() for n in range(1, 6)]  # each once, in order
        cluster.sync()
        pub.publish("q/y", b"after", 1)  # the subscription now lives on B
        cluster.forward()
        assert new.payloads()[-1] == b"after" and old.payloads().count(b"after") == 0
        assert [p.payload for p in new.received].count(b"after") == 1
        assert stores["a"].load()[1] == []  # no session left in A's store
    finally:
        for s in stores.values():
            s.close()


def test_a_taken_over_queue_goes_before_what_came_directly_meanwhile():
    """The old node's queue, and what it passes on after the hand-over, are older than what the
    publisher's node sends the new node directly once it knows: the new node holds its queue and
    puts them first, in the order each came, until stop_waiting."""
    a, b, cluster = pair(max_inflight_messages=2)
    old = Client(a, "mover", clean=False, ack=False)
    old.subscribe("q/#", qos=1)
    pub = Client(a, "pub")
    for n in range(4):
        pub.publish("q/x", f"old{n}".encode(), 1)
    new = Client(b, "mover", clean=False)
    assert new.connack.session_present
    [(_, mountpoint, client_id)] = b.peers.take_takeovers()
    cluster.sync()
    direct = vmqapi.Message("q/x", b"new0", 1, False, 1)
    b.peers.deliver_forwarded("", direct, True, (), NOW)  # the publisher's node already sends to B
    assert new.payloads() == []  # held: older messages are on their way
    moving = a.peers.hand_over(mountpoint, client_id, NOW)
    assert b.peers.adopt_messages("", "mover", moving, NOW, settle=True) == 4
    late = vmqapi.Message("q/x", b"old4", 1, False, 2)  # reached A after the hand-over: A passes it on
    assert b.peers.deliver_to("", "mover", late, NOW)
    assert new.payloads() == []
    b.peers.stop_waiting("", "mover", NOW)
    for _ in range(5):
        new.read()
    assert new.payloads() == [b"old0", b"old1", b"old2", b"old3", b"old4", b"new0"]


def test_a_clean_start_elsewhere_ends_the_old_session_and_takes_nothing():
    a, b, cluster = pair()
    old = Client(a, "c", clean=False, ack=False)
    old.subscribe("t")
    old.send(Disconnect())
    Client(a, "pub").publish("t", b"queued", 1)
    new = Client(b, "c", clean=True)
    assert not new.connack.session_present and b.peers.session_summary("", "c")["subs"] == {}
    cluster.takeovers()
    assert a.peers.session_summary("", "c") is None and new.payloads() == []


def test_a_connect_refused_after_the_lookup_leaves_the_session_where_it_was():
    a, b, cluster = pair(max_topic_levels=3)
    Client(a, "c", clean=False).subscribe("t")
    b.peers.netsplit = "a@x unreachable"
    refused = Client(b, "c", clean=False)
    assert refused.connack.return_code == 3
    assert b.peers.session_summary("", "c") is None and b.peers.take_takeovers() == []
    b.peers.netsplit = ""
    with pytest.raises(vmqapi.TopicTooDeep):
        Client(b, "c", clean=False, will_topic="w/x/y/z")  # closes this connection
    b.engine.hooks.register("auth_on_publish", lambda *args: "error")  # refuses the will: CONNACK 5
    assert Client(b, "c", clean=False, will_topic="w").connack.return_code == 5
    assert b.peers.session_summary("", "c") is None and b.peers.take_takeovers() == []
    assert a.peers.session_summary("", "c")["subs"] == {"t": [1, False, False, 0, 0]}
    assert b.engine.router.match("", "t") == {}


# -- retained messages ------------------------------------------------------------------
def test_retained_changes_are_reported_and_remote_ones_not_echoed():
    a, b, cluster = pair()
    pub = Client(a, "pub")
    pub.publish("r/1", b"one", 1, retain=True)
    pub.publish("r/2", b"two", 0, retain=True)
    assert a.peers.take_retained_changes() == [("", "r/1"), ("", "r/2")]
    for mp, topic in [("", "r/1"), ("", "r/2")]:
        b.peers.apply_remote_retained(mp, topic, a.engine.router.retained[mp].get(topic))
    assert b.peers.take_retained_changes() == []
    late = Client(b, "late")
    late.subscribe("r/#")
    assert sorted(late.payloads()) == [b"one", b"two"]
    assert a.engine.delete_retained("", "r/1")  # an admin command
    pub.publish("r/2", b"", 0, retain=True)  # a client
    assert a.peers.take_retained_changes() == [("", "r/1"), ("", "r/2")]
    b.peers.apply_remote_retained("", "r/1", None)
    b.peers.apply_remote_retained("", "r/2", vmqapi.Message("r/2", b"", 0, True))
    assert b.engine.router.retained_count() == 0 and b.peers.take_retained_changes() == []


# -- a property: the cluster delivers as one broker would -----------------------------
FILTERS = ["a", "a/#", "+", "#", "+/b", "a/b", "b/+"]
TOPICS = ["a", "a/b", "b", "b/b"]


def oracle_matches(filters, topic):
    return any(vmqapi.topic_matches(f, topic) for f in filters)


@settings(max_examples=60, deadline=None)
@given(subs=st.lists(st.tuples(st.integers(0, 2), st.sets(st.sampled_from(FILTERS), min_size=1, max_size=3)),
                     min_size=1, max_size=6),
       pubs=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(TOPICS), st.integers(0, 2)), max_size=15),
       forward_each=st.booleans())
def test_three_engines_deliver_what_one_broker_would(subs, pubs, forward_each):
    nodes = [Node(f"n{i}@x") for i in range(3)]
    cluster = Cluster(*nodes)
    subscribers = []
    for k, (where, filters) in enumerate(subs):
        client = Client(nodes[where], f"s{k}")
        client.subscribe(*sorted(filters), qos=2)
        subscribers.append((client, filters))
    cluster.sync()
    publishers = [Client(n, f"p-{n.name}") for n in nodes]
    for seq, (where, topic, qos) in enumerate(pubs):
        publishers[where].publish(topic, f"{where}:{seq}".encode(), qos)
        if forward_each:
            cluster.forward()
    cluster.forward()
    assert cluster.forward() == 0
    for client, filters in subscribers:
        got = client.payloads()
        expected = [f"{w}:{seq}".encode() for seq, (w, topic, _) in enumerate(pubs) if oracle_matches(filters, topic)]
        assert sorted(got) == sorted(expected)  # each once
        for w in range(3):  # and in order per publisher
            prefix = f"{w}:".encode()
            assert [p for p in got if p.startswith(prefix)] == [p for p in expected if p.startswith(prefix)]
