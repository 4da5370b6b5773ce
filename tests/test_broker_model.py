"""The broker engine against a dict model (Hypothesis RuleBasedStateMachine), without sockets or a clock.

Clients speak MQTT 3.1.1 or 5; MQTT 5 adds session expiry (0 or long), No Local,
Retain As Published, Retain Handling and subscription identifiers to the model.
"""

from __future__ import annotations

import itertools
import types

from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vmqapi
from conftest import engine_output
from vmqapi import Puback, Pubcomp, Publish, Pubrec, Pubrel

LISTENER = types.SimpleNamespace(mountpoint="", allowed_versions=(3, 4, 5), allow_anonymous_override=False)
CLIENT_IDS = st.sampled_from(["c1", "c2", "c3"])
FILTERS = st.sampled_from(["a", "a/#", "+", "#", "+/b", "a/b"])
TOPICS = st.sampled_from(["a", "a/b", "b", "b/b"])
NOW = 1000.0  # the model's clock: it never moves, so nothing expires or is resent


class BrokerModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        ids = itertools.count()
        self.engine = vmqapi.Engine(lambda: vmqapi.Config({}), vmqapi.MemoryStore(), vmqapi.Hooks(),
                                    new_client_id=lambda: f"anon-{next(ids)}", choose=lambda pool: pool[0], now=NOW)
        self.clients = {}  # client id -> Connection while connected
        self.gone = []  # connections the engine closed or lost: nothing may be written for them again
        self.versions = {}  # client id -> protocol level of its connection
        # client id -> {"clean": ends with its connection, "subs": {filter: SubOptions},
        #               "pending": [delivery]}; a delivery is (topic, payload, qos, rap retain, ids, retained)
        self.model = {}
        self.received = {}  # client id -> [(topic, payload, qos, retain, ids)] since the last check
        self.expected = {}
        self.retained = {}
        self.counter = 0

    # -- plumbing -------------------------------------------------------------------
    def handle(self, conn, packet):
        self.engine.handle(conn, packet, NOW)

    def output(self, conn):
        """Take what the engine left in a connection's outbox, as the I/O shell does after a batch."""
        self.engine.take_dirty()
        data = b"".join(conn.out)
        conn.out.clear()
        return data

    def pump(self):
        """Decode what the engine wrote; acknowledge publishes as a well-behaved client."""
        busy = True
        while busy:
            busy = False
            for cid, client in list(self.clients.items()):
                data = self.output(client)
                pos = 0
                while pos < len(data):
                    packet, pos = vmqapi.decode_packet(data, pos, 0, self.versions[cid])
                    if isinstance(packet, Publish):
                        ids = tuple(sorted(v for n, v in packet.properties if n == "subscription_identifier"))
                        self.received.setdefault(cid, []).append((packet.topic, packet.payload, packet.qos,
                                                                  packet.retain, ids))
                        if packet.qos == 1:
                            self.handle(client, Puback(packet.packet_id))
                        elif packet.qos == 2:
                            self.handle(client, Pubrec(packet.packet_id))
                        busy = True
                    elif isinstance(packet, Pubrel):
                        self.handle(client, Pubcomp(packet.packet_id))
                        busy = True

    def drop_connection(self, cid):
        client = self.clients.pop(cid)
        self.output(client)  # a DISCONNECT's goodbye, if any, before the socket goes
        self.engine.connection_lost(client, NOW)
        self.gone.append(client)

    def go_offline(self, cid):
        if self.model[cid]["clean"]:
            del self.model[cid]

    def expect(self, cid, deliveries):
        """What ``cid``'s connection should see of ``deliveries``: MQTT 3.1.1 has no ids, no RAP retain flag."""
        v5 = self.versions[cid] == 5
        self.expected.setdefault(cid, []).extend(
            (topic, payload, qos, retained or (v5 and rap), ids if v5 else ())
            for topic, payload, qos, rap, ids, retained in deliveries)

    # -- rules ----------------------------------------------------------------------
    @rule(cid=CLIENT_IDS, clean=st.booleans(), version=st.sampled_from([4, 5]), expiry=st.sampled_from([0, 100]))
    def connect(self, cid, clean, version, expiry):
        old_client = self.clients.pop(cid, None)
        client = self.engine.connection_made(None, LISTENER, ("127.0.0.1", 1), None, NOW)
        props = (("session_expiry_interval", expiry),) if version == 5 and expiry else ()
        self.handle(client, vmqapi.Connect(cid, version, clean, properties=props))
        data = self.output(client)
        connack, used = vmqapi.decode_packet(data, 0, 0, version)
        assert connack.return_code == 0
        client.out.append(data[used:])  # what follows CONNACK (its queued messages) is read by pump below
        if old_client is not None:
            assert old_client.closing and old_client.closed  # the takeover closed it
            self.output(old_client)
            self.engine.connection_lost(old_client, NOW)
            self.gone.append(old_client)
        ephemeral = clean if version == 4 else expiry == 0  # MQTT 5: Clean Start and the expiry are apart
        previous = self.model.get(cid)
        assert connack.session_present == (previous is not None and not clean and not previous["clean"])
        if clean or previous is None or previous["clean"]:
            self.model[cid] = {"clean": ephemeral, "subs": {}, "pending": []}
        else:
            self.model[cid]["clean"] = ephemeral
        self.clients[cid] = client
        self.versions[cid] = version
        self.expect(cid, self.model[cid]["pending"])
        self.model[cid]["pending"] = []
        self.pump()

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), graceful=st.booleans())
    def leave(self, data, graceful):
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        if graceful:
            self.handle(self.clients[cid], vmqapi.Disconnect())
        self.drop_connection(cid)
        self.go_offline(cid)

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), topic_filter=FILTERS, qos=st.integers(0, 2), no_local=st.booleans(), rap=st.booleans(),
          handling=st.integers(0, 2), sub_id=st.sampled_from([0, 1, 300]))
    def subscribe(self, data, topic_filter, qos, no_local, rap, handling, sub_id):
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        if self.versions[cid] == 4:
            no_local = rap = False
            handling = sub_id = 0
        options = qos | no_local << 2 | rap << 3 | handling << 4
        props = (("subscription_identifier", sub_id),) if sub_id else ()
        self.handle(self.clients[cid], vmqapi.Subscribe(1, ((topic_filter, options),), props))
        existed = topic_filter in self.model[cid]["subs"]
        self.model[cid]["subs"][topic_filter] = vmqapi.SubOptions(qos, no_local, rap, handling, sub_id)
        if handling == 0 or (handling == 1 and not existed):
            self.expect(cid, [(topic, payload, min(qos, msg_qos), False, (sub_id,) if sub_id else (), True)
                              for topic, (payload, msg_qos) in sorted(self.retained.items())  # by topic
                              if vmqapi.topic_matches(topic_filter, topic)])
        self.pump()

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), topic_filter=FILTERS)
    def unsubscribe(self, data, topic_filter):
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        self.handle(self.clients[cid], vmqapi.Unsubscribe(2, (topic_filter,)))
        self.model[cid]["subs"].pop(topic_filter, None)
        self.pump()

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), topic=TOPICS, qos=st.integers(0, 2), retain=st.booleans())
    def publish(self, data, topic, qos, retain):
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        self.counter += 1
        payload = str(self.counter).encode()
        self.handle(self.clients[cid], Publish(topic, payload, qos, retain, False, 7 if qos else None))
        if qos == 2:
            self.handle(self.clients[cid], Pubrel(7))
        if retain:
            self.retained[topic] = (payload, qos)
        for other, state in self.model.items():
            matching = [sub for f, sub in state["subs"].items()
                        if vmqapi.topic_matches(f, topic) and not (sub.no_local and other == cid)]  # No Local
            if not matching:
                continue
            ids = tuple(sorted(sub.identifier for sub in matching if sub.identifier))
            delivery = (topic, payload, min(qos, max(sub.qos for sub in matching)),
                        retain and any(sub.retain_as_published for sub in matching), ids, False)
            if other in self.clients:
                self.expect(other, [delivery])
            else:
                state["pending"].append(delivery)
        self.pump()

    # -- invariants -------------------------------------------------------------------
    @invariant()
    def deliveries_equal_the_models_matches(self):
        for cid in set(self.expected) | set(self.received):
            assert self.received.get(cid, []) == self.expected.get(cid, []), cid
        self.received.clear()
        self.expected.clear()

    @invariant()
    def sessions_agree(self):
        assert {cid for (_, cid) in self.engine.sessions} == set(self.model)
        for cid, state in self.model.items():
            assert self.engine.sessions[("", cid)].subs == state["subs"]

    @invariant()
    def nothing_is_written_after_a_close(self):
        assert not any(conn.out for conn in self.gone)


TestBrokerModel = BrokerModel.TestCase
TestBrokerModel.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


# -- retained messages handed out over turns of the loop --------------------------------

def _engine_with_retained(count):
    ids = itertools.count()
    engine = vmqapi.Engine(lambda: vmqapi.Config({}), vmqapi.MemoryStore(), vmqapi.Hooks(),
                           new_client_id=lambda: f"anon-{next(ids)}", choose=lambda pool: pool[0], now=NOW)
    pub = _connected(engine, "pub")
    for i in range(count):
        engine.handle(pub, Publish(f"t/{i}", b"old", 0, True), NOW)
    return engine, pub


def _connected(engine, cid, version=4):
    conn = engine.connection_made(None, LISTENER, ("127.0.0.1", 1), None, NOW)
    engine.handle(conn, vmqapi.Connect(cid, version, True), NOW)
    _publishes(engine, conn, version)
    return conn


def _publishes(engine, conn, version=4):
    """Decode what the engine left for ``conn``: its PUBLISHes as (topic, payload, retain)."""
    return [(p.topic, p.payload, p.retain) for p in engine_output(engine, conn, version) if isinstance(p, Publish)]


def test_retained_messages_past_a_chunk_go_out_a_chunk_a_turn_never_after_a_live_one(monkeypatch):
    """A live message on a topic whose retained message is still to come gets it first (MQTT 5.0 4.6.0), once."""
    monkeypatch.setattr(vmqapi, "RETAINED_CHUNK", 10)
    engine, pub = _engine_with_retained(100)
    sub = _connected(engine, "sub")
    engine.handle(sub, vmqapi.Subscribe(1, (("#", 0),)), NOW)
    got = _publishes(engine, sub)
    assert 0 < len(got) < 10 and engine.handouts  # the first nodes of the walk, the rest waits
    live = next(f"t/{i}" for i in range(100) if (f"t/{i}", b"old", True) not in got)
    engine.handle(pub, Publish(live, b"live", 0, False), NOW)
    replaced = next(f"t/{i}" for i in range(100) if f"t/{i}" != live and (f"t/{i}", b"old", True) not in got)
    engine.handle(pub, Publish(replaced, b"new", 0, True), NOW)
    got += _publishes(engine, sub)
    assert got[-3:] == [(live, b"old", True), (live, b"live", False), (replaced, b"new", False)]
    for _ in range(100):  # bounded: 100 topics, 10 nodes a turn
        if not engine.handouts:
            break
        engine.hand_out(NOW)
        turn = _publishes(engine, sub)
        assert len(turn) <= 10
        got += turn
    assert not engine.handouts
    olds = [t for t, payload, retain in got if payload == b"old"]
    assert all(retain for _, payload, retain in got if payload == b"old")
    assert sorted(olds) == sorted(f"t/{i}" for i in range(100) if f"t/{i}" != replaced)  # each once
    assert engine.counters.get(("queue_message_drop", ()), 0) == 0


def test_retained_hand_out_stops_with_the_subscription_or_the_session(monkeypatch):
    monkeypatch.setattr(vmqapi, "RETAINED_CHUNK", 10)
    engine, _ = _engine_with_retained(100)
    sub, gone = _connected(engine, "sub"), _connected(engine, "gone")
    for conn in (sub, gone):
        engine.handle(conn, vmqapi.Subscribe(1, (("t/#", 0),)), NOW)
        _publishes(engine, conn)
    assert len(engine.handouts) == 2
    engine.handle(sub, vmqapi.Unsubscribe(2, ("t/#",)), NOW)
    engine.connection_lost(gone, NOW)  # a clean session: it ends
    engine.hand_out(NOW)
    assert not engine.handouts and _publishes(engine, sub) == []


def test_a_second_subscriptions_retained_messages_wait_for_the_first_hand_out(monkeypatch):
    """One walk under way a session: the next subscription's retained messages follow it, each subscription's once."""
    monkeypatch.setattr(vmqapi, "RETAINED_CHUNK", 10)
    engine, _ = _engine_with_retained(30)
    sub = _connected(engine, "sub")
    engine.handle(sub, vmqapi.Subscribe(1, (("t/#", 0),)), NOW)
    got = _publishes(engine, sub)
    engine.handle(sub, vmqapi.Subscribe(2, (("t/+", 0),)), NOW)
    assert _publishes(engine, sub) == [] and len(engine.handouts[sub.session]) == 2
    for _ in range(20):  # bounded: 2 x 31 nodes, 10 a turn
        engine.hand_out(NOW)
        got += _publishes(engine, sub)
    assert not engine.handouts
    assert sorted(t for t, _, _ in got) == sorted(f"t/{i}" for i in range(30) for _ in range(2))


def test_small_retained_sets_go_out_at_once_sorted_by_topic():
    engine, _ = _engine_with_retained(50)
    sub = _connected(engine, "sub")
    engine.handle(sub, vmqapi.Subscribe(1, (("t/+", 0),)), NOW)
    got = _publishes(engine, sub)
    assert [t for t, _, _ in got] == sorted(f"t/{i}" for i in range(50)) and not engine.handouts


RETAINED_TOPICS = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(RETAINED_TOPICS, max_size=30), st.sampled_from(["#", "a/#", "+/b", "+/+", "a/+/c", "+"]),
       st.lists(st.one_of(st.tuples(RETAINED_TOPICS, st.booleans()), st.none()), max_size=30))
def test_retained_hand_out_in_turns_keeps_each_topics_order(initial, topic_filter, ops):
    """Whatever live messages come between turns: per topic, nothing older after newer, no retained one twice,
    every retained message not replaced meanwhile comes once, every live one comes."""
    original = vmqapi.RETAINED_CHUNK
    vmqapi.RETAINED_CHUNK = 3
    try:
        engine, pub = _engine_with_retained(0)
        seq = itertools.count(1)
        retained = {}
        for topic in initial:
            retained[topic] = n = next(seq)
            engine.handle(pub, Publish(topic, str(n).encode(), 0, True), NOW)
        sub = _connected(engine, "sub")
        engine.handle(sub, vmqapi.Subscribe(1, ((topic_filter, 0),)), NOW)
        got, live, replaced = _publishes(engine, sub), [], set()
        for op in ops + [None] * 40:  # bounded: at most 39 topics, 3 nodes a turn
            if op is None:
                engine.hand_out(NOW)
            else:
                topic, retain = op
                n = next(seq)
                engine.handle(pub, Publish(topic, str(n).encode(), 0, retain), NOW)
                if vmqapi.topic_matches(topic_filter, topic):
                    live.append((topic, n))
                    if retain:
                        replaced.add(topic)
            got += _publishes(engine, sub)
        assert not engine.handouts
    finally:
        vmqapi.RETAINED_CHUNK = original
    last = {}
    for topic, payload, _ in got:
        assert int(payload) > last.get(topic, 0), (topic, got)  # MQTT 5.0 4.6.0: per topic, in order, once
        last[topic] = int(payload)
    received = {(topic, int(payload)) for topic, payload, _ in got}
    assert set(live) <= received
    for topic, n in retained.items():
        if vmqapi.topic_matches(topic_filter, topic) and topic not in replaced:
            assert (topic, n) in received
