"""Sections 12 and 22: kept frames, what makes a QoS 1/2 message acknowledged on one node reach another.

The codec and the two halves (``Outbox``, ``Inbox``) first; then ``KeptFrames`` itself, the
cluster's use of them, on a simulated network: each node keeps every forward in its store and
acknowledges its publisher only after the commit; a receiver uses a frame, commits, then
acknowledges it; a link that comes up gets everything still kept, in order. Nodes crash and come
back with only what they committed; links break, losing what was in flight, and heal; a link
may take only a few frames at a time.
"""

from __future__ import annotations

import itertools
import time
import types

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

import vmqapi
from vmqapi import (FRAME_KEPT, FRAME_KEPT_ACK, KEPT_FORWARD, ClusterError, Inbox, KeptFrames, Outbox, decode_kept,
                    decode_kept_ack, encode_kept)

# -- the codec and the two halves -----------------------------------------------------------------


@given(epoch=st.integers(1, 2 ** 62), floor=st.integers(1, 2 ** 40), extra=st.integers(0, 2 ** 20),
       kind=st.integers(0, 255), body=st.binary(max_size=64))
def test_kept_frame_round_trip(epoch, floor, extra, kind, body):
    assert decode_kept(encode_kept(epoch, floor + extra, floor, kind, body)) == (epoch, floor + extra, floor, kind,
                                                                                 body)


@given(data=st.binary(max_size=40))
def test_arbitrary_bytes_are_a_kept_frame_an_ack_or_a_cluster_error(data):
    for decode in (decode_kept, decode_kept_ack, vmqapi.decode_passed, vmqapi.decode_marker):
        try:
            decode(data)
        except ClusterError:
            pass


def test_a_message_passed_on_round_trips_and_a_bad_one_is_a_cluster_error():
    assert vmqapi.decode_passed(vmqapi.encode_term(["client", b"forward"])) == ("client", b"forward")
    for bad in (["client"], [b"client", b"forward"], ["client", "forward"], "client", ["c", b"f", 1]):
        with pytest.raises(ClusterError):
            vmqapi.decode_passed(vmqapi.encode_term(bad))


def test_a_session_marker_round_trips_and_a_bad_one_is_a_cluster_error():
    assert vmqapi.decode_marker(vmqapi.encode_term(["key", "n1@host", 1.5])) == ("key", "n1@host", 1.5)
    for bad in (["key", "n1@host"], ["key", b"node", 1.5], "key", ["k", "n", "x"], ["k", "n", 1]):
        with pytest.raises(ClusterError):
            vmqapi.decode_marker(vmqapi.encode_term(bad))


def test_a_kept_frame_whose_floor_is_above_its_number_is_refused():
    with pytest.raises(ClusterError):
        decode_kept(encode_kept(1, 3, 4, KEPT_FORWARD, b""))
    with pytest.raises(ClusterError):
        decode_kept(encode_kept(1, 0, 0, KEPT_FORWARD, b""))


def test_the_outbox_keeps_in_order_forgets_what_is_acknowledged_and_counts_bytes():
    box = Outbox(7)
    box.keep("b", 3, 9, KEPT_FORWARD, b"old", row=1)  # from the store, of an earlier epoch
    numbers = []
    for body in (b"x", b"yy", b"zzz"):
        number = box.number("b")
        box.keep("b", *number, KEPT_FORWARD, body, row=10 + number[1])
        numbers.append(number)
    assert box.pending("b") == [(3, 9), (7, 1), (7, 2), (7, 3)]
    assert box.size["b"] == 9
    assert decode_kept(box.frame("b", 7, 2)) == (7, 2, 1, KEPT_FORWARD, b"yy")
    assert box.ack("b", 7, 2) == [11, 12]  # cumulative within its epoch, never across
    assert box.pending("b") == [(3, 9), (7, 3)]
    assert box.frame("b", 7, 1) is None and decode_kept(box.frame("b", 7, 3))[2] == 3  # the floor moved up
    assert box.ack("b", 7, 2) == [] and box.ack("c", 7, 9) == []
    assert [row for row, _, _ in box.drop("b")] == [1, 13] and box.pending("b") == [] and box.size["b"] == 0


def test_acknowledging_a_long_outbox_a_little_at_a_time_takes_linear_time():
    box, count = Outbox(1), 200_000
    for _ in range(count):
        box.keep("b", *box.number("b"), KEPT_FORWARD, b"x")
    started = time.perf_counter()
    for upto in range(100, count + 1, 100):
        assert len(box.ack("b", 1, upto)) == 100
        box.frame("b", 1, upto + 1)
    assert box.pending("b") == [] and time.perf_counter() - started < 5  # quadratic: minutes


FILTERS = ["a/b", "a/+", "a/#", "#", "+/b", "c", "$sys/x", "+/+/c"]
TOPICS = ["a/b", "a/c", "a", "c", "x/b", "$sys/x", "a/b/c", "d/e/c"]


@given(ops=st.lists(st.tuples(st.sampled_from(["add", "forget", "expire"]), st.sampled_from(["", "mp"]),
                              st.sampled_from(["c1", "c2", "c3"]), st.sets(st.sampled_from(FILTERS), max_size=3),
                              st.integers(0, 6)), max_size=30))
def test_sessions_handed_over_want_what_their_filters_match(ops):
    """HandedOver against a naive model: a dict of sessions scanned with topic_matches."""
    handed, model, now = vmqapi.HandedOver(), {}, 0
    for op, mountpoint, client_id, filters, step in ops:
        now += step  # the monotonic clock
        if op == "add":
            handed.add(mountpoint, client_id, f"owner-{now}", list(filters) + ["$share/g/a/b"], now)
            model[mountpoint, client_id] = (f"owner-{now}", filters, now + vmqapi.MOVED_KEEP)
        elif op == "forget":
            handed.forget(mountpoint, client_id)
            model.pop((mountpoint, client_id), None)
        else:
            handed.expire(now)
            model = {k: v for k, v in model.items() if v[2] > now}
        for mp in ("", "mp"):
            for topic in TOPICS:
                want = sorted((cid, owner) for (m, cid), (owner, fs, _) in model.items()
                              if m == mp and any(vmqapi.topic_matches(f, topic) for f in fs))
                assert sorted(handed.wanting(mp, topic)) == want, (mp, topic)
        for (mp, cid), (owner, _, _) in model.items():
            assert handed.owner(mp, cid) == owner


def test_the_inbox_says_new_again_or_gap():
    inbox = Inbox([("a", 5, 2)])
    assert inbox.take("a", 5, 2, 1) == "again"
    assert inbox.take("a", 5, 4, 1) == "gap"
    assert inbox.take("a", 5, 3, 1) == "new"
    assert inbox.take("a", 6, 4, 4) == "new"  # an epoch first seen starts at the frame's floor
    assert inbox.take("a", 6, 5, 4) == "gap"
    assert inbox.take("a", 5, 9, 9) == "new"  # the sender keeps nothing below its floor: nothing to wait for
    for epoch in range(100, 100 + vmqapi.INBOX_EPOCHS):
        inbox.mark("b", epoch, 1)
    assert inbox.mark("b", 999, 1) == 100  # the oldest epoch is forgotten
    assert inbox.last("b", 100) == 0 and inbox.last("b", 999) == 1


# -- the simulated network ------------------------------------------------------------------------

NAMES = ["n0", "n1", "n2", "n3", "n4"]


class SimStore:
    """The message store's kept-frame calls over a dict that only ``commit`` makes durable."""

    def __init__(self):
        self.durable = {"kept": {}, "marks": {}, "delivered": []}  # what survives a crash
        self.rows = itertools.count(1)
        self.pending = []
        self.error = None  # the store writes

    def add_kept(self, peer, epoch, seq, kind, body):
        row = next(self.rows)
        self.pending.append(("kept", row, (peer, epoch, seq, kind, body)))
        return row

    def delete_kept(self, rows):
        self.pending += [("unkept", row, None) for row in rows]

    def load_kept(self):
        return [(*value, row) for row, value in sorted(self.durable["kept"].items())]

    def put_mark(self, origin, epoch, seq):
        self.pending.append(("mark", (origin, epoch), seq))

    def delete_mark(self, origin, epoch):
        self.pending.append(("unmark", (origin, epoch), None))

    def load_marks(self):
        return [(o, e, s) for (o, e), s in self.durable["marks"].items()]

    def commit(self):
        table = {"kept": self.durable["kept"], "unkept": self.durable["kept"], "mark": self.durable["marks"],
                 "unmark": self.durable["marks"]}
        for what, key, value in self.pending:
            if what == "delivered":
                self.durable["delivered"].append(value)
            elif what.startswith("un"):
                table[what].pop(key, None)
            else:
                table[what][key] = value
        self.pending = []


class SimLinks:
    """A node's links as KeptFrames sees them: room and send, onto the network."""

    def __init__(self, net, name):
        self.net, self.name = net, name

    def room(self, peer, size):
        return frozenset((self.name, peer)) in self.net.up \
            and len(self.net.flight.get((self.name, peer), [])) < self.net.room.get((self.name, peer), 10 ** 9)

    def send(self, peer, kind, frame):
        self.net.send(self.name, peer, (kind, frame))
        return True


class SimNode:
    """One node: its KeptFrames over a store that survives a crash only as far as it was committed."""

    def __init__(self, net, name, epochs):
        self.net, self.name, self.epochs = net, name, epochs
        self.store = SimStore()
        self.restart()

    def restart(self):
        self.store.pending = []
        self.io = types.SimpleNamespace(store=self.store, commit_hooks=[], rollback_hooks=[])
        self.kept = KeptFrames(self.io, types.SimpleNamespace(full_nodes=set()), lambda: 10 ** 9, next(self.epochs),
                               self.use)
        self.kept.links = SimLinks(self.net, self.name)
        self.kept.load()
        self.promised = []  # message ids whose PUBACK waits for the commit
        self.full = False  # its subscriber's queue has no room now

    def use(self, origin, kind, body, force):
        if self.full and not force:
            return "full"
        self.store.pending.append(("delivered", None, (origin, int.from_bytes(body, "big"))))
        return "forced" if self.full else "used"

    def commit(self):
        """A batch ends: marks, commit, acknowledgements; return the message ids now acknowledged.

        With the store failing, the commit fails: nothing of the batch is kept or acknowledged."""
        self.kept.write_marks()
        promised, self.promised = self.promised, []
        if self.store.error is not None:
            self.store.pending = []
            for hook in self.io.rollback_hooks:
                hook()
            return []
        self.store.commit()
        for hook in self.io.commit_hooks:
            hook()
        return promised


class KeptNetwork(RuleBasedStateMachine):
    """2-5 nodes; each publishes to the others; links break and heal, nodes crash, frames wait or swap."""

    @initialize(n=st.integers(2, 5))
    def start(self, n):
        self.names = NAMES[:n]
        self.up = {frozenset((a, b)) for a in self.names for b in self.names if a != b}
        self.flight = {}  # (src, dst) -> frames in order (a link is ordered, as TCP is)
        self.room = {}  # (src, dst) -> frames a link takes at once
        epochs = itertools.count(1)
        self.nodes = {name: SimNode(self, name, epochs) for name in self.names}
        self.ids = itertools.count(1)
        self.acked = []  # (publisher node, target node, message id, its epoch) acknowledged, in publish order
        self.sent = {}  # message id -> (publisher node, target node, epoch)
        self.swapped = False
        for a, b in itertools.permutations(self.names, 2):
            self.nodes[a].kept.up(b)

    def pick(self, i):
        return self.names[i % len(self.names)]

    def send(self, src, dst, item):
        if frozenset((src, dst)) in self.up:
            self.flight.setdefault((src, dst), []).append(item)

    def link_up(self, a, b):
        """Both ends' on_up: everything still kept goes again, in order."""
        self.nodes[a].kept.up(b)
        self.nodes[b].kept.up(a)

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def publish(self, a, b):
        src, dst = self.pick(a), self.pick(b)
        if src == dst:
            return
        msg_id = next(self.ids)
        node = self.nodes[src]
        node.kept.keep(dst, KEPT_FORWARD, msg_id.to_bytes(8, "big"))
        node.promised.append(msg_id)
        self.sent[msg_id] = (src, dst, node.kept.outbox.epoch)

    @rule(a=st.integers(0, 4))
    def commit(self, a):
        for msg_id in self.nodes[self.pick(a)].commit():
            self.acked.append((*self.sent[msg_id], msg_id))

    @rule(a=st.integers(0, 4), b=st.integers(0, 4), count=st.integers(1, 5))
    def deliver(self, a, b, count):
        src, dst = self.pick(a), self.pick(b)
        frames = self.flight.get((src, dst), [])
        for _ in range(min(count, len(frames))):
            self.arrive(src, dst, frames.pop(0))

    def arrive(self, src, dst, item):
        kind, frame = item
        node = self.nodes[dst]
        if kind == FRAME_KEPT:
            node.kept.receive(src, frame)
        else:
            assert kind == FRAME_KEPT_ACK
            node.kept.acknowledged(src, frame)

    @rule(a=st.integers(0, 4), b=st.integers(0, 4), room=st.integers(1, 3))
    def narrow(self, a, b, room):
        """A link that takes only a few frames at a time: the rest wait in the outbox for room."""
        self.room[self.pick(a), self.pick(b)] = room

    @rule(a=st.integers(0, 4), resend=st.booleans())
    def tick(self, a, resend):
        node = self.nodes[self.pick(a)]
        if resend:  # KEPT_RESEND passed without an acknowledgement
            for peer in node.kept.progress:
                node.kept.progress[peer] -= vmqapi.KEPT_RESEND + 1
        node.kept.pump_all()

    @rule(a=st.integers(0, 4), failing=st.booleans())
    def store(self, a, failing):
        """The store fails (a full disk) or writes again; a node takes no frame while it fails."""
        self.nodes[self.pick(a)].store.error = "disk full" if failing else None

    @rule(a=st.integers(0, 4), full=st.booleans(), patience_over=st.booleans())
    def subscriber(self, a, full, patience_over):
        """A subscriber's queue fills or drains; parked frames are offered again, forced once patience is over."""
        node = self.nodes[self.pick(a)]
        node.full = full
        if patience_over:
            for peer in node.kept.parked_at:
                node.kept.parked_at[peer] -= vmqapi.KEPT_PATIENCE
        node.kept.retry()

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def break_link(self, a, b):
        a, b = self.pick(a), self.pick(b)
        if a != b and frozenset((a, b)) in self.up:
            self.up.discard(frozenset((a, b)))
            self.flight.pop((a, b), None)  # what was in flight is lost with the link
            self.flight.pop((b, a), None)
            self.nodes[a].kept.down(b)
            self.nodes[b].kept.down(a)

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def heal(self, a, b):
        a, b = self.pick(a), self.pick(b)
        if a != b and frozenset((a, b)) not in self.up:
            self.up.add(frozenset((a, b)))
            self.link_up(a, b)

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def reconnect(self, a, b):
        """A link replaced by a fresh one at once: its frames may come twice."""
        a, b = self.pick(a), self.pick(b)
        if a != b and frozenset((a, b)) in self.up:
            self.link_up(a, b)

    @rule(a=st.integers(0, 4))
    def crash(self, a):
        name = self.pick(a)
        for key in [k for k in self.flight if name in k]:
            del self.flight[key]
        self.nodes[name].restart()
        for other in self.names:
            if other != name and frozenset((name, other)) in self.up:
                self.link_up(name, other)  # the links come back with the node

    @rule(a=st.integers(0, 4), b=st.integers(0, 4), i=st.integers(0, 100), j=st.integers(0, 100))
    def swap(self, a, b, i, j):
        """Two frames of one link trade places (TCP never does this: the receiver must cope anyway)."""
        frames = self.flight.get((self.pick(a), self.pick(b)), [])
        if len(frames) > 1:
            i, j = i % len(frames), j % len(frames)
            frames[i], frames[j] = frames[j], frames[i]
            self.swapped = self.swapped or i != j

    def teardown(self):
        if not hasattr(self, "nodes"):
            return
        self.up = {frozenset((a, b)) for a in self.names for b in self.names if a != b}
        self.flight, self.room = {}, {}
        for node in self.nodes.values():
            node.full, node.store.error = False, None
        for _ in range(20):
            for a, b in itertools.combinations(self.names, 2):
                self.link_up(a, b)
            for _ in range(3):
                for node in self.nodes.values():
                    node.kept.retry()
                while any(self.flight.values()):
                    for key, frames in list(self.flight.items()):
                        if frames:
                            self.arrive(*key, frames.pop(0))
                for i in range(len(self.names)):
                    self.commit(i)
            if not any(node.kept.outbox.pending(peer) for node in self.nodes.values() for peer in self.names):
                break
        else:
            pytest.fail("kept frames still unacknowledged after 20 rounds on a whole network")
        for publisher, target, epoch, msg_id in self.acked:
            assert (publisher, msg_id) in self.nodes[target].store.durable["delivered"], f"message {msg_id} lost"
        for target in self.names:
            first = list(dict.fromkeys(self.nodes[target].store.durable["delivered"]))  # first arrivals, in order
            position = {entry: i for i, entry in enumerate(first)}
            for publisher in self.names:
                order = [(epoch, position[publisher, m]) for p, t, epoch, m in self.acked
                         if p == publisher and t == target]
                if not self.swapped:  # on ordered links: in publish order, across crashes of the publisher's node
                    assert [pos for _, pos in order] == sorted(pos for _, pos in order)
                for epoch in {e for e, _ in order}:  # always in order within one run of the publisher's node
                    run = [pos for e, pos in order if e == epoch]
                    assert run == sorted(run)


KeptNetwork.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
test_acknowledged_forwards_arrive_at_least_once_in_order = KeptNetwork.TestCase
