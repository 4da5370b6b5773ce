"""Cluster state: terms, the forward codec, and the replicated state with its anti-entropy protocol.

Pure values throughout: no sockets, no clock. The network between replicas is simulated
(a list of messages in flight that rules deliver, drop, duplicate or swap).
"""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import vmqapi
from vmqapi import ClusterError, Message, Replica, Update, decode_forward, decode_term, encode_forward, encode_term

# -- terms ------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2 ** 80, 2 ** 80)
           | st.floats(allow_nan=False) | st.text() | st.binary())
terms = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=30)


def normal(term):
    """The value decode_term gives back for ``term``: tuples become lists."""
    if isinstance(term, (list, tuple)):
        return [normal(item) for item in term]
    if isinstance(term, dict):
        return {key: normal(value) for key, value in term.items()}
    return term


def same(a, b):
    """Equal, and of the same types all the way down (1, 1.0 and True are not the same term)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b or (isinstance(a, float) and math.copysign(1, a) == math.copysign(1, b) and a == b)


@given(terms)
@example([1, 1.0, True, -0.0, 2 ** 63, -2 ** 63 - 1, "\ud800", b"", {}, ()])
def test_term_round_trip(term):
    data = encode_term(term)
    back = decode_term(data)
    assert same(back, normal(term))
    assert encode_term(back) == data  # one encoding per value: anti-entropy hashes these bytes


def test_term_dicts_encode_the_same_whatever_their_order():
    assert encode_term({"a": 1, "b": 2}) == encode_term({"b": 2, "a": 1})


@given(st.binary(max_size=200))
@example(b"")
@example(b"I\x00\x00\x00\x00")
@example(b"d\x00\x00\x00\x01i\x00\x00\x00\x00\x00\x00\x00\x00N")
def test_arbitrary_bytes_decode_or_raise_cluster_error(data):
    try:
        decode_term(data)
    except ClusterError:
        pass


@given(terms, st.data())
def test_damaged_terms_decode_or_raise_cluster_error(term, data):
    raw = bytearray(encode_term(term))
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode_term(bytes(raw))
    except ClusterError:
        pass
    for n in range(len(raw)):
        with pytest.raises(ClusterError):
            decode_term(encode_term(term)[:n])
    with pytest.raises(ClusterError):
        decode_term(encode_term(term) + b"N")


@pytest.mark.parametrize("data, reason", [
    (b"l\x00\x00\x00\x01" * 100_000 + b"N", "nested deeper"),
    (b"l\xff\xff\xff\xff" + b"N" * 100_000, "declares more"),  # four billion items declared: not one is read
    (b"l\x00\x01\x00\x00" + b"N" * 65_535, "declares more"),
    (b"d\xff\xff\xff\xff" + b"N" * 100, "declares more"),
    (b"s\xff\xff\xff\xff" + b"x" * 100, "declares more"),
    (b"b\x7f\xff\xff\xff", "declares more"),
    (b"I\xff\xff\xff\xff", "declares more"),
], ids=["deep", "list", "list-by-one", "dict", "str", "bytes", "bigint"])
def test_deep_nesting_and_huge_declared_sizes_are_refused_quickly(data, reason):
    started = time.perf_counter()
    with pytest.raises(ClusterError, match=reason):
        decode_term(data)
    assert time.perf_counter() - started < 0.5


def test_nesting_up_to_the_limit_is_a_term_and_past_it_is_not():
    deep = None
    for _ in range(vmqapi.TERM_MAX_DEPTH):
        deep = [deep]
    assert decode_term(encode_term(deep)) == deep
    with pytest.raises(ClusterError):
        encode_term([deep])
    with pytest.raises(ClusterError):
        decode_term(b"l\x00\x00\x00\x01" + encode_term(deep))


@pytest.mark.parametrize("value", [{1: 2}, {"a": {(): 1}}, object(), {1.5}, [print]])
def test_what_is_not_a_term_is_refused(value):
    with pytest.raises(ClusterError):
        encode_term(value)


# -- the forward codec --------------------------------------------------------------------

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
prop_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8)


@st.composite
def forwarded_props(draw):
    """MQTT 5 properties that go on to subscribers (MQTT 5.0 3.3.2.3), in any order, user properties repeated."""
    single = draw(st.lists(st.sampled_from(["payload_format_indicator", "content_type", "response_topic",
                                            "correlation_data"]), unique=True, max_size=4))
    values = {"payload_format_indicator": st.integers(0, 1), "content_type": prop_text,
              "response_topic": prop_text, "correlation_data": st.binary(max_size=8)}
    props = [(name, draw(values[name])) for name in single]
    props += [("user_property", (draw(prop_text), draw(prop_text))) for _ in range(draw(st.integers(0, 3)))]
    return tuple(draw(st.permutations(props)))


messages = st.builds(
    Message, topic=text, payload=st.binary(max_size=64), qos=st.integers(0, 2), retain=st.booleans(),
    ref=st.integers(0, 2 ** 64 - 1), frame=st.binary(max_size=16), frame5=st.booleans(), props=forwarded_props(),
    expires=st.none() | st.floats(allow_nan=False), origin=st.none() | text, bridged=st.booleans())
forwards = st.tuples(text, messages, st.booleans(), st.lists(text, max_size=3).map(tuple))


@given(forwards)
@example(("", Message("a", b"", 0), False, ()))
def test_forward_round_trip(forward):
    body = encode_forward(*forward)
    assert decode_forward(body) == forward


def test_a_forward_with_more_properties_than_the_node_allows_is_refused():
    props = tuple(("user_property", ("k", "v")) for _ in range(129))
    body = encode_forward("", Message("t", b"x", 0, props=props), True, ())
    assert decode_forward(body, 129)[1].props == props
    with pytest.raises(ClusterError, match="max_properties_per_packet"):
        decode_forward(body, 128)


@given(forwards)
def test_every_truncation_of_a_forward_and_any_extra_byte_raise_cluster_error(forward):
    body = encode_forward(*forward)
    for n in range(len(body)):
        with pytest.raises(ClusterError):
            decode_forward(body[:n])
    with pytest.raises(ClusterError):
        decode_forward(body + b"\x00")


@given(st.binary(max_size=120), forwards, st.data())
def test_arbitrary_and_damaged_forward_bodies_decode_or_raise_cluster_error(junk, forward, data):
    raw = bytearray(encode_forward(*forward))
    raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    for body in (junk, bytes([vmqapi.FORWARD_VERSION]) + junk, bytes(raw)):
        try:
            decode_forward(body)
        except ClusterError:
            pass


@pytest.mark.parametrize("msg", [Message("a", b"", 3), Message("a", b"", 0, ref=-1), Message("a", b"", 0, ref=2 ** 64),
                                 Message("a", b"", 0, props=(("no_such_property", 1),))])
def test_a_message_that_cannot_be_forwarded_is_a_cluster_error(msg):
    with pytest.raises(ClusterError):
        encode_forward("", msg, True, ())


def test_forwarding_a_small_message_is_quick():
    msg = Message("building/3/room/12/temperature", b"x" * 100, 1, False, 123456, origin="sensor-12")
    n = 20_000
    best = math.inf
    for _ in range(3):  # the best of three: other work shares the machine
        started = time.perf_counter()
        for _ in range(n):
            decode_forward(encode_forward("", msg, True, ()))
        best = min(best, (time.perf_counter() - started) / n)
    assert best < 20e-6, f"{best * 1e6:.1f} us per encode and decode"  # the target is well under 5 us


# -- put, merge, get against a dict model ------------------------------------------------------------

KINDS = st.sampled_from(["session", "retain"])
KEYS = st.sampled_from(["x", "y", "z"])
VALUES = st.none() | st.integers(0, 2) | st.sampled_from(["a", "b"]) | st.just([1, "a"])
TIMES = st.sampled_from([1.0, 2.0, 3.0, 3.0000005])
NAMES = st.sampled_from(["n1", "n2"])
updates = st.builds(Update, KINDS, KEYS, VALUES, st.tuples(TIMES, NAMES))

ops = st.lists(st.one_of(st.tuples(st.just("put"), KINDS, KEYS, VALUES, TIMES),
                         st.tuples(st.just("merge"), updates)), max_size=30)


def rows_of(replica):
    return [(u.kind, u.key, u.value, u.stamp) for u in replica.rows()]


@given(ops)
def test_put_merge_get_agree_with_a_dict_model(ops):
    replica, model = Replica("n1"), {}  # (kind, key) -> (stamp, value)
    for op in ops:
        if op[0] == "put":
            _, kind, key, value, now = op
            stamp, live = model.get((kind, key), ((-math.inf, ""), None))
            update = replica.put(kind, key, value, now)
            if live == value and type(live) is type(value):
                assert update is None
                continue
            t = max(now, stamp[0] + 1e-6)
            assert update == Update(kind, key, value, (t, "n1"))
            model[kind, key] = (t, "n1"), value
        else:
            u = op[1]
            stamp, live = model.get((u.kind, u.key), ((-math.inf, ""), None))
            newer = (u.stamp, encode_term(u.value)) > (stamp, encode_term(live))
            assert replica.merge([u]) == ([u] if newer else [])
            if newer:
                model[u.kind, u.key] = u.stamp, u.value
        for (kind, key), (stamp, value) in model.items():
            assert replica.get(kind, key, "absent") == ("absent" if value is None else value)
    for kind in ("session", "retain"):
        assert replica.items(kind) == sorted((key, value) for (k, key), (_, value) in model.items()
                                             if k == kind and value is not None)
    assert rows_of(replica) == sorted((k, key, value, stamp) for (k, key), (stamp, value) in model.items())


def join(*lists):
    replica = Replica("j")
    for rows in lists:
        replica.merge(rows)
    return replica


@given(st.lists(updates, max_size=8), st.lists(updates, max_size=8), st.lists(updates, max_size=8))
def test_merge_is_commutative_associative_and_idempotent(a, b, c):
    assert rows_of(join(a, b)) == rows_of(join(b, a))
    assert rows_of(join(join(a, b).rows(), c)) == rows_of(join(a, join(b, c).rows()))
    assert rows_of(join(a, a)) == rows_of(join(a))
    assert join(a, b).digest_message() == join(b, a).digest_message()


def test_a_local_write_wins_over_anything_held_even_with_a_slow_clock():
    replica = Replica("a")
    replica.merge([Update("config", "k", 1, (500.0, "zz"))])
    update = replica.put("config", "k", 2, now=100.0)
    assert update.stamp == (500.0 + 1e-6, "a") and replica.get("config", "k") == 2
    replica.merge([Update("config", "huge", 1, (1e300, "zz"))])
    assert replica.put("config", "huge", 2, now=0.0).stamp[0] > 1e300


def test_a_delete_is_a_tombstone_that_beats_an_older_write_arriving_later():
    a = Replica("a")
    old = a.put("session", "c1", {"node": "a"}, 10.0)
    gone = a.put("session", "c1", None, 11.0)
    assert a.put("session", "c1", None, 12.0) is None and a.put("session", "nothing", None, 12.0) is None
    b = Replica("b")
    assert b.merge([gone, old]) == [gone]
    assert b.get("session", "c1") is None and b.items("session") == [] and b.rows() == [gone]


def test_a_renewed_row_beats_a_delete_this_node_has_not_seen_yet():
    """A join renews the joining node's own row: held unchanged, it would lose to its removal."""
    c, a = Replica("c"), Replica("a")
    kept = c.put("member", "c", {"address": "h:1"}, 10.0)
    a.merge([kept])
    removed = a.put("member", "c", None, 20.0)
    assert c.put("member", "c", {"address": "h:1"}, 30.0) is None  # equal: no new stamp
    renewed = c.put("member", "c", {"address": "h:1"}, 30.0, renew=True)
    assert renewed.stamp == (30.0, "c") and renewed.value == {"address": "h:1"}
    assert a.merge([renewed]) == [renewed] and c.merge([removed]) == []
    assert a.get("member", "c") == c.get("member", "c") == {"address": "h:1"}


def test_put_keeps_values_as_every_peer_will_hold_them():
    replica = Replica("a")
    update = replica.put("apikey", "k", ("mgmt", bytearray(b"x")), 1.0)
    assert update.value == ["mgmt", b"x"] and replica.get("apikey", "k") == ["mgmt", b"x"]
    assert replica.put("apikey", "k", ["mgmt", b"x"], 2.0) is None
    assert replica.put("apikey", "k", ["mgmt", b"x", 1], 2.0) is not None
    assert replica.put("n", "one", 1, 3.0) is not None and replica.put("n", "one", True, 3.0) is not None


@pytest.mark.parametrize("stamp", [(math.nan, "a"), (math.inf, "a"), (1.0, 2), ("1", "a"), (1.0,), (True, "a"),
                                   (10 ** 400, "a")])
def test_a_row_with_a_bad_stamp_cannot_exist(stamp):
    with pytest.raises(ClusterError):
        Update("k", "key", 1, stamp)


def test_purge_drops_old_tombstones_only():
    replica = Replica("a")
    replica.put("session", "live", 1, 1.0)
    replica.put("session", "old", 1, 1.0)
    replica.put("session", "old", None, 2.0)
    replica.put("session", "new", 1, 1.0)
    replica.put("session", "new", None, 9.0)
    assert replica.purge(before=5.0) == 1
    assert [u.key for u in replica.rows()] == ["live", "new"]
    assert replica.digest_message() == Replica("b", replica.rows()).digest_message()
    assert replica.purge(before=100.0) == 1 and replica.purge(before=100.0) == 0
    assert replica.items("session") == [("live", 1)]


# -- the protocol ---------------------------------------------------------------------------------


def sync(replicas, start, limit=100_000):
    """Deliver ``start`` [(src, dst, message)] and every answer, in order, losslessly; return what went."""
    flight, sent = list(start), []
    while flight:
        src, dst, message = flight.pop(0)
        data = encode_term(message)
        sent.append((src, message, data))
        _, replies = replicas[dst].receive(decode_term(data))
        flight += [(dst, src, reply) for reply in replies]
        assert len(sent) < limit
    return sent


def sessions(n, node="a"):
    replica = Replica(node)
    for i in range(n):
        replica.put("session", f"client-{i}", {"node": node, "clean": i % 2 == 0, "subs": [["a/+", 1]]}, 1000.0 + i)
    return replica


def rows_sent(sent):
    return sum(len(message[1]) for _, message, _ in sent if message[0] == "r")


def test_replicas_that_agree_exchange_one_small_digest_each_way():
    a = sessions(10_000)
    b = Replica("b", a.rows())
    for me, peer in ((a, b), (b, a)):
        data = encode_term(peer.digest_message())
        assert len(data) < 100
        assert me.receive(decode_term(data)) == ([], [])


def test_one_differing_row_costs_that_row_and_one_bucket_listing():
    a = sessions(10_000)
    for i in range(0, 10_000, 7):  # a history of changes and deletes leaves the same hashes as the rows alone
        a.put("session", f"client-{i}", {"node": "c"} if i % 2 else None, 3000.0)
    b = Replica("b", a.rows())
    changed = b.put("session", "client-77", {"node": "b"}, 5000.0)
    sent = sync({"a": a, "b": b}, [("b", "a", b.digest_message()), ("a", "b", a.digest_message())])
    assert a.rows() == b.rows() and a.get("session", "client-77") == {"node": "b"}
    assert [len(message[2]) for _, message, _ in sent if message[0] == "k"] == [1, 1]
    assert rows_sent(sent) == 2  # each of the two rounds carries the one row
    assert sum(len(data) for _, _, data in sent) < 30_000  # two rounds: hashes of 256 buckets and one bucket's stamps
    assert changed in a.rows()


def test_a_new_node_gets_10000_sessions_in_bounded_messages():
    a, b = sessions(10_000), Replica("b")
    b.put("session", "client-1", {"node": "b"}, 9999.0)
    sent = sync({"a": a, "b": b}, [("b", "a", b.digest_message())])
    assert a.rows() == b.rows() and len(a.rows()) == 10_000
    for _, message, data in sent:
        assert len(data) < 64_000
        if message[0] == "r":
            assert len(message[1]) <= vmqapi.SYNC_ROWS
        if message[0] == "k":
            assert len(message[3]) <= vmqapi.SYNC_KEYS
    assert rows_sent(sent) < 10_100  # rows travel once, apart from a bucket cut at a bound
    assert len(sent) < 400  # about 40 rounds of 4 messages


def test_equal_stamps_with_different_values_settle_on_the_same_value():
    a = Replica("a", [Update("retain", "t", "from a", (5.0, "n"))])  # two stores restored with the same stamp
    b = Replica("b", [Update("retain", "t", "from b", (5.0, "n"))])
    sync({"a": a, "b": b}, [("a", "b", a.digest_message())])
    assert a.rows() == b.rows() and a.get("retain", "t") in ("from a", "from b")
    assert b.receive(a.digest_message()) == ([], [])


def test_announce_carries_updates_that_receive_merges():
    a, b = Replica("a"), Replica("b")
    updates = [a.put("retain", "x", b"payload", 1.0), a.put("apikey", "k", ["mgmt"], 1.0)]
    changed, replies = b.receive(decode_term(encode_term(a.announce(updates))))
    assert changed == updates and replies == [] and b.rows() == a.rows()
    assert b.receive(a.announce(updates)) == ([], [])  # a duplicate changes nothing


def protocol_messages():
    """Messages of a real exchange, to damage."""
    a, b = sessions(30), Replica("b")
    b.put("session", "client-3", None, 5000.0)
    return [message for _, message, _ in sync({"a": a, "b": b}, [("b", "a", b.digest_message())])]


REAL = protocol_messages()


def damage(message, path, replacement):
    if not path or not isinstance(message, (list, dict)) or not message:
        return replacement
    keys = list(message) if isinstance(message, dict) else list(range(len(message)))
    key = keys[path[0] % len(keys)]
    copy = dict(message) if isinstance(message, dict) else list(message)
    copy[key] = damage(message[key], path[1:], replacement)
    return copy


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(REAL), st.lists(st.integers(0, 50), min_size=1, max_size=4), terms)
@example(["k", "session", [0], [["x", 10 ** 400, "n", 1]], False], [0], None)
@example(["d", {"session": 1}], [1], {"session": True})
@example(["b", "session", b"\x00" * 2048], [2], b"\x00" * 2047)
def test_a_damaged_message_changes_nothing_or_raises_cluster_error(message, path, replacement):
    replica = sessions(20)
    for bad in (damage(message, path, replacement), replacement, [message[0], replacement]):
        try:
            replica.receive(bad)
        except ClusterError:
            pass


# -- the simulated network ---------------------------------------------------------------------------

NODES = ["n0", "n1", "n2", "n3", "n4"]
SETTLE_ROUNDS = 50


class ClusterNetwork(RuleBasedStateMachine):
    """2-5 replicas on a network that drops, duplicates and reorders, split and healed at random."""

    @initialize(n=st.integers(2, 5), skews=st.lists(st.sampled_from([-2.0, 0.0, 0.0, 0.5, 3.0]),
                                                     min_size=5, max_size=5))
    def start(self, n, skews):
        self.nodes = NODES[:n]
        self.replicas = {name: Replica(name) for name in self.nodes}
        self.skew = dict(zip(self.nodes, skews))
        self.clock = 1000.0
        self.links = {frozenset((a, b)) for a in self.nodes for b in self.nodes if a != b}
        self.flight = []  # (src, dst, encoded message)
        self.newest = {}  # (kind, key) -> (stamp, value) of the newest put anywhere
        self.puts = {}  # (kind, key, stamp) -> value, every put ever made

    def pick(self, i):
        return self.nodes[i % len(self.nodes)]

    def send(self, src, dst, message):
        self.flight.append((src, dst, encode_term(message)))

    @rule(node=st.integers(0, 4), kind=st.sampled_from(["member", "session", "retain"]),
          key=st.sampled_from(["a", "b", "c", "d"]), value=st.none() | st.integers(0, 3) | st.sampled_from(["x", [1]]))
    def put(self, node, kind, key, value):
        name = self.pick(node)
        replica = self.replicas[name]
        live = replica.get(kind, key)
        held = {(u.kind, u.key): u.stamp for u in replica.rows()}.get((kind, key), (-math.inf, ""))
        update = replica.put(kind, key, value, self.clock + self.skew[name])
        if update is None:
            assert live == value
            return
        assert update.stamp > held and replica.get(kind, key) == value  # not always newer than other nodes' rows
        self.puts[kind, key, update.stamp] = update.value
        if (kind, key) not in self.newest or update.stamp > self.newest[kind, key][0]:
            self.newest[kind, key] = update.stamp, update.value
        for peer in self.nodes:
            if frozenset((name, peer)) in self.links:
                self.send(name, peer, replica.announce([update]))

    @rule(dt=st.sampled_from([0.0, 1e-7, 0.3, 2.0]))
    def tick(self, dt):
        self.clock += dt

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def split(self, a, b):
        pair = frozenset((self.pick(a), self.pick(b)))
        self.links.discard(pair)
        self.flight = [m for m in self.flight if frozenset(m[:2]) != pair]  # a link that goes down loses its bytes

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def heal(self, a, b):
        a, b = self.pick(a), self.pick(b)
        if a != b and frozenset((a, b)) not in self.links:
            self.links.add(frozenset((a, b)))
            self.send(a, b, self.replicas[a].digest_message())  # link-up
            self.send(b, a, self.replicas[b].digest_message())

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def digest(self, a, b):
        a, b = self.pick(a), self.pick(b)
        if frozenset((a, b)) in self.links:
            self.send(a, b, self.replicas[a].digest_message())

    def deliverable(self):
        return [i for i, (src, dst, _) in enumerate(self.flight) if frozenset((src, dst)) in self.links]

    def deliver_at(self, i):
        src, dst, data = self.flight.pop(i)
        changed, replies = self.replicas[dst].receive(decode_term(data))
        for reply in replies:
            self.send(dst, src, reply)
        return replies

    @rule(i=st.integers(0, 10 ** 6))
    def deliver(self, i):
        ready = self.deliverable()
        if ready:
            self.deliver_at(ready[i % len(ready)])

    @rule(i=st.integers(0, 10 ** 6))
    def deliver_oldest(self, i):
        ready = self.deliverable()
        for index in reversed(ready[:1 + i % 4]):
            self.deliver_at(index)

    @rule(i=st.integers(0, 10 ** 6))
    def drop(self, i):
        if self.flight:
            self.flight.pop(i % len(self.flight))

    @rule(i=st.integers(0, 10 ** 6))
    def duplicate(self, i):
        if self.flight:
            self.flight.append(self.flight[i % len(self.flight)])

    @rule(i=st.integers(0, 10 ** 6), j=st.integers(0, 10 ** 6))
    def swap(self, i, j):
        if self.flight:
            i, j = i % len(self.flight), j % len(self.flight)
            self.flight[i], self.flight[j] = self.flight[j], self.flight[i]

    @invariant()
    def every_row_is_a_put_that_was_made(self):
        for replica in self.replicas.values():
            for u in replica.rows():
                assert self.puts[u.kind, u.key, u.stamp] == u.value

    def teardown(self):
        if not hasattr(self, "replicas"):
            return
        self.links = {frozenset((a, b)) for a in self.nodes for b in self.nodes if a != b}
        quiet = False
        for _ in range(SETTLE_ROUNDS):
            for a in self.nodes:
                for b in self.nodes:
                    if a != b:
                        self.send(a, b, self.replicas[a].digest_message())
            answered = 0
            for _ in range(100_000):
                if not self.flight:
                    break
                answered += len(self.deliver_at(0))
            assert not self.flight
            if answered == 0:
                quiet = True
                break
        assert quiet, f"not quiet after {SETTLE_ROUNDS} rounds of digests"
        expected = sorted((kind, key, value, stamp) for (kind, key), (stamp, value) in self.newest.items())
        for replica in self.replicas.values():
            assert rows_of(replica) == expected


ClusterNetwork.TestCase.settings = settings(deadline=None)
test_replicas_converge_on_a_lossy_network = ClusterNetwork.TestCase


# -- Replication: when a link's two sides know they are in step --------------------------------------


class _Wire:
    """ClusterLinks as Replication sees it: every frame sent, in order, per direction."""

    def __init__(self, me, flight):
        self.me, self.flight = me, flight

    def send(self, peer, frame, body):
        self.flight.append((self.me, peer, body))


class _NoStore:
    def load(self):
        return []


@given(st.lists(st.tuples(st.sampled_from("ab"), KINDS, KEYS, VALUES, TIMES), max_size=12), st.randoms())
def test_both_sides_of_a_new_link_are_quiet_once_its_frames_are_delivered(puts, rnd):
    # A join is Done once the joined node has been heard in step (quiet): that must not wait for the
    # next digest round (two cluster_sync_interval away), only for the frames the link-up set off.
    flight = []
    rows = {}
    for name in "ab":
        rows[name] = vmqapi.Replication(name, _NoStore())
        rows[name].links = _Wire(name, flight)
    for name, kind, key, value, now in puts:
        rows[name].replica.put(kind, key, value, now)
    rows["a"].hello("b")
    rows["b"].hello("a")
    for _ in range(1000):  # each direction in order (a TCP link), the two directions interleaved at random
        if not flight:
            break
        firsts = {}
        for index, (src, _, _) in enumerate(flight):
            firsts.setdefault(src, index)
        src, dst, body = flight.pop(rnd.choice(sorted(firsts.values())))
        rows[dst].merge(src, body)
    assert not flight, "the link-up exchange did not end"
    assert rows["a"].quiet == {"b": True} and rows["b"].quiet == {"a": True}
    assert rows_of(rows["a"].replica) == rows_of(rows["b"].replica)


@given(st.text(), st.text())
@example("", 'quote"and\\back\nslash')
@example("mp", "\u2028\ud800\x7f")
def test_a_session_key_is_the_compact_json_of_its_two_strings_and_splits_back(mountpoint, client_id):
    """Every node must write the same key for a session: the plain strings' shortcut against json.dumps."""
    import json
    key = vmqapi.session_key(mountpoint, client_id)
    assert key == json.dumps([mountpoint, client_id], ensure_ascii=False, separators=(",", ":"))
    assert vmqapi.split_session_key(key) == (mountpoint, client_id)
