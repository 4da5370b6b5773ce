"""Section 12: kept frames, what makes a QoS 1/2 message acknowledged on one node reach another.

The protocol's pure parts (``Outbox``, ``Inbox``, the kept frame codec) run here on a simulated
network, driven the way section 22's ``Cluster`` drives them: a node keeps each forward in its
store and acknowledges the publisher only after its commit; a receiver uses a frame, commits,
then acknowledges it; a link that comes up gets everything still kept, in order. Nodes crash and
come back with only what they committed; links break, losing what was in flight, and heal.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

import vmqapi
from vmqapi import KEPT_FORWARD, ClusterError, Inbox, Outbox, decode_kept, decode_kept_ack, encode_kept

# -- the codec and the two halves -----------------------------------------------------------------


@given(epoch=st.integers(1, 2 ** 62), floor=st.integers(1, 2 ** 40), extra=st.integers(0, 2 ** 20),
       kind=st.integers(0, 255), body=st.binary(max_size=64))
def test_kept_frame_round_trip(epoch, floor, extra, kind, body):
    assert decode_kept(encode_kept(epoch, floor + extra, floor, kind, body)) == (epoch, floor + extra, floor, kind,
                                                                                 body)


@given(data=st.binary(max_size=40))
def test_arbitrary_bytes_are_a_kept_frame_an_ack_or_a_cluster_error(data):
    for decode in (decode_kept, decode_kept_ack):
        try:
            decode(data)
        except ClusterError:
            pass


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
    assert box.drop("b") == [1, 13] and box.pending("b") == [] and box.size["b"] == 0


def test_the_inbox_says_new_again_or_gap():
    inbox = Inbox([("a", 5, 2)])
    assert inbox.take("a", 5, 2, 1) == "again"
    assert inbox.take("a", 5, 4, 1) == "gap"
    assert inbox.take("a", 5, 3, 1) == "new"
    assert inbox.take("a", 6, 4, 4) == "new"  # an epoch first seen starts at the frame's floor
    assert inbox.take("a", 6, 5, 4) == "gap"
    for epoch in range(100, 100 + vmqapi.INBOX_EPOCHS):
        inbox.mark("b", epoch, 1)
    assert inbox.mark("b", 999, 1) == 100  # the oldest epoch is forgotten
    assert inbox.last("b", 100) == 0 and inbox.last("b", 999) == 1


# -- the simulated network ------------------------------------------------------------------------

NAMES = ["n0", "n1", "n2", "n3", "n4"]


class SimNode:
    """A node's volatile state over what it committed (``durable``): the Cluster's use of the protocol."""

    def __init__(self, name, epochs):
        self.name, self.epochs = name, epochs
        self.durable = {"kept": {}, "marks": {}, "delivered": []}  # what survives a crash
        self.rows = itertools.count(1)
        self.restart()

    def restart(self):
        """Come back with what was committed only: kept frames in row order, marks, delivered messages."""
        self.outbox = Outbox(next(self.epochs))
        for row, (peer, epoch, seq, kind, body) in sorted(self.durable["kept"].items()):
            self.outbox.keep(peer, epoch, seq, kind, body, row)
        self.inbox = Inbox((o, e, s) for (o, e), s in self.durable["marks"].items())
        self.pending = []  # store writes since the last commit
        self.promised = []  # message ids whose PUBACK waits for the commit
        self.acks_due = {}

    def publish(self, peer, msg_id):
        epoch, seq = self.outbox.number(peer)
        body = msg_id.to_bytes(8, "big")
        row = next(self.rows)
        self.pending.append(("kept", row, (peer, epoch, seq, KEPT_FORWARD, body)))
        self.outbox.keep(peer, epoch, seq, KEPT_FORWARD, body, row)
        self.promised.append(msg_id)
        return epoch, seq

    def receive(self, origin, frame):
        epoch, seq, floor, kind, body = decode_kept(frame)
        verdict = self.inbox.take(origin, epoch, seq, floor)
        if verdict == "gap":
            return
        if verdict == "new":
            self.pending.append(("delivered", None, (origin, int.from_bytes(body, "big"))))
            forgotten = self.inbox.mark(origin, epoch, seq)
            self.pending.append(("mark", (origin, epoch), seq))
            if forgotten is not None:
                self.pending.append(("unmark", (origin, forgotten), None))
        self.acks_due[origin] = (epoch, self.inbox.last(origin, epoch))

    def commit(self):
        """Commit; return (message ids now acknowledged to publishers, acks to send)."""
        for what, key, value in self.pending:
            if what == "kept":
                self.durable["kept"][key] = value
            elif what == "unkept":
                self.durable["kept"].pop(key, None)
            elif what == "mark":
                self.durable["marks"][key] = value
            elif what == "unmark":
                self.durable["marks"].pop(key, None)
            else:
                self.durable["delivered"].append(value)
        self.pending = []
        promised, self.promised = self.promised, []
        acks, self.acks_due = self.acks_due, {}
        return promised, acks

    def acknowledged(self, peer, epoch, upto):
        for row in self.outbox.ack(peer, epoch, upto):
            self.pending.append(("unkept", row, None))


class KeptNetwork(RuleBasedStateMachine):
    """2-5 nodes; each publishes to the others; links break and heal, nodes crash, frames wait or swap."""

    @initialize(n=st.integers(2, 5))
    def start(self, n):
        self.names = NAMES[:n]
        epochs = itertools.count(1)
        self.nodes = {name: SimNode(name, epochs) for name in self.names}
        self.up = {frozenset((a, b)) for a in self.names for b in self.names if a != b}
        self.flight = {}  # (src, dst) -> frames in order (a link is ordered, as TCP is)
        self.ids = itertools.count(1)
        self.acked = []  # (publisher node, target node, message id, its epoch) acknowledged, in publish order
        self.sent_epoch = {}
        self.swapped = False

    def pick(self, i):
        return self.names[i % len(self.names)]

    def send(self, src, dst, frame):
        if frozenset((src, dst)) in self.up:
            self.flight.setdefault((src, dst), []).append(frame)

    def link_up(self, a, b):
        """What _on_up does on both ends: everything still kept goes again, in order."""
        for src, dst in ((a, b), (b, a)):
            box = self.nodes[src].outbox
            for number in box.pending(dst):
                self.send(src, dst, ("kept", box.frame(dst, *number)))

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def publish(self, a, b):
        src, dst = self.pick(a), self.pick(b)
        if src == dst:
            return
        msg_id = next(self.ids)
        epoch, seq = self.nodes[src].publish(dst, msg_id)
        self.sent_epoch[msg_id] = (src, dst, epoch)
        self.send(src, dst, ("kept", self.nodes[src].outbox.frame(dst, epoch, seq)))

    @rule(a=st.integers(0, 4))
    def commit(self, a):
        node = self.nodes[self.pick(a)]
        promised, acks = node.commit()
        for msg_id in promised:
            self.acked.append((*self.sent_epoch[msg_id][:2], msg_id, self.sent_epoch[msg_id][2]))
        for origin, (epoch, seq) in acks.items():
            self.send(node.name, origin, ("ack", (epoch, seq)))

    @rule(a=st.integers(0, 4), b=st.integers(0, 4), count=st.integers(1, 5))
    def deliver(self, a, b, count):
        src, dst = self.pick(a), self.pick(b)
        frames = self.flight.get((src, dst), [])
        for _ in range(min(count, len(frames))):
            self.arrive(src, dst, frames.pop(0))

    def arrive(self, src, dst, item):
        what, value = item
        if what == "kept":
            self.nodes[dst].receive(src, value)
        else:
            self.nodes[dst].acknowledged(src, *value)

    @rule(a=st.integers(0, 4), b=st.integers(0, 4))
    def break_link(self, a, b):
        pair = frozenset((self.pick(a), self.pick(b)))
        if len(pair) == 2 and pair in self.up:
            self.up.discard(pair)
            for key in [k for k in self.flight if frozenset(k) == pair]:
                del self.flight[key]  # what was in flight is lost with the link

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
        self.flight = {}
        for _ in range(20):
            for a, b in itertools.combinations(self.names, 2):
                self.link_up(a, b)
            for _ in range(3):
                while any(self.flight.values()):
                    for key, frames in self.flight.items():
                        if frames:
                            self.arrive(*key, frames.pop(0))
                for i in range(len(self.names)):
                    self.commit(i)
            if not any(node.outbox.pending(peer) for node in self.nodes.values() for peer in self.names):
                break
        else:
            pytest.fail("kept frames still unacknowledged after 20 rounds on a whole network")
        for publisher, target, msg_id, epoch in self.acked:
            assert (publisher, msg_id) in self.nodes[target].durable["delivered"], f"message {msg_id} lost"
        for target in self.names:
            seen, first = set(), []
            for publisher, msg_id in self.nodes[target].durable["delivered"]:
                if msg_id not in seen:
                    seen.add(msg_id)
                    first.append((publisher, msg_id))
            position = {entry: i for i, entry in enumerate(first)}
            for publisher in self.names:
                order = [(self.sent_epoch[m][2], position[publisher, m]) for p, t, m, e in self.acked
                         if p == publisher and t == target]
                if not self.swapped:  # on ordered links: in publish order, a crash of the publisher's node between
                    assert [pos for _, pos in order] == sorted(pos for _, pos in order)
                for epoch in {e for e, _ in order}:  # always in order within one run of the publisher's node
                    run = [pos for e, pos in order if e == epoch]
                    assert run == sorted(run)


KeptNetwork.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_acknowledged_forwards_arrive_at_least_once_in_order = KeptNetwork.TestCase
