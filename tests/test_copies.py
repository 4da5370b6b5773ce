"""Persistent sessions kept on a second node (``queue_replicas = 2``): ``copy_node`` and ``Copies``.

First ``copy_node`` (rendezvous hashing) and the copy side of ``Copies`` (``use``, ``take``) on a
real ``SqliteStore``. Then the main test, a simulated network of 2-5 nodes, each running the
real ``Copies`` over a real ``SqliteStore`` of its own (``store.watch = copies``), with
stand-ins for what ``KeptFrames`` and ``Cluster._copy`` do around it:

- a batch at a session's home queues messages (``add_message``), consumes the oldest
  (``delete_message``) or ends the session (``delete_session``); at the batch's end, as
  ``Cluster._copy`` does, ``retarget()`` when the member list changed since the last batch (and
  always at a node's first batch), then ``flush()``, then the store commits;
- ``keep`` (a stand-in of ``KeptFrames.keep``) stores the frame in the batch's commit and sends it
  when the link is up; a link carries frames in order; the copy node applies a new one with
  ``use`` and records its mark in the same commit, then acknowledges; a link that comes up sends
  every frame still unacknowledged again, in order;
- a QoS 1 message's PUBACK goes exactly when ``Cluster._copy`` lets it (with
  ``allow_publish_during_netsplit`` off): at the commit when no frame of the batch carries it,
  else when the copy node acknowledged the last frame the batch kept for it, up or down when it
  was kept (or when that node is removed);
- as with ``allow_publish_during_netsplit = off`` (the default), a home refuses publishes while
  one of its links to a member is down;
- links break (what is in flight is lost) and heal; a node is killed (before a batch's end, or
  after its frames went out and were used but before its commit: its uncommitted changes are
  lost) and restarts with an empty ``Copies`` and the frames its store kept; a node dies for good
  and is then removed from the member list everywhere: each survivor takes up with ``take(dead)``
  the copies it kept, the session's heir (``copy_node`` among the survivors, as
  ``SessionRows.member_gone`` picks it) adopts the session with those messages, then every
  survivor runs a batch (its ``retarget`` gives the sessions the dead node kept to their new copy
  node), and what was kept for the dead node is dropped, its PUBACKs let go (a copy's wait is not
  fatal in ``KeptFrames.settle_waits``);
- the ends of copies ``Copies`` defers (``wait`` on the batch's frames) are released by the
  acknowledgements, and its ``flush_soon`` runs a batch then;
- takeovers: a session's client connects at another live node X (X makes the session in a batch
  of its own), and the home H hands the session over in one batch, as ``Peers.hand_over`` and
  ``SessionMoves.migrate`` do: its messages in order (``session_messages``), ``delete_session``
  (``Copies.ended`` defers the end of the copy on H's copy node until this batch's frames are
  acknowledged: ``batch_numbers``, the last main-stream frame kept per peer, names the
  hand-over), and a KEPT_MIGRATE frame for X on the main stream (numbered in an epoch of its
  own, delivered, acknowledged and sent again in order like the copy stream). X uses it in a
  batch (``SessionMoves.on_migrate``: ``add_message`` each message, new rows there, so X's
  ``Copies`` copies them to X's copy node) and acknowledges it after the commit, held while that
  batch's copy frames are unacknowledged, in order behind earlier held ones (``KeptFrames.send_acks``
  with ``ack_wait``; a restarted node has none held). H may be killed in the hand-over's batch
  (it hands the session over again once restarted), X in the batch that used it (after its copies
  went out and were used: the hand-over comes again). When a dead node is removed, the copies its
  copy nodes kept of a session taken over meanwhile go to the session's home (``member_gone``:
  a KEPT_MIGRATE frame, or added there when the holder is the home).

Deaths allowed (the guarantee covers them): one at a time: a node dies only while no other node
is dead and not yet removed, and not before every frame kept since the last removal (the new copy
nodes' whole sessions) was acknowledged; and not while a hand-over to it is unacknowledged (see
below). Restarts are allowed at any time, deaths right after them too.

What a takeover guarantees, from the code: while a session moves, each acknowledged message is on
two nodes at every moment: H's kept hand-over and H's copy node's copy until X used it; X and that
copy until X's copy node acknowledged X's copy (X's acknowledgement of the hand-over waits for it,
and the old copy's end waits, firmly, for that acknowledgement); then X and X's copy node. So H
dying for good at any point loses nothing (before X used the hand-over, the copy is taken at H's
removal and goes to X: duplicates, never losses), nor does either copy node dying. X dying for
good before it acknowledged the hand-over loses nothing either: its removal cancels the old copy's
end (WAIT_FIRM fails at a removal), and the hand-over kept for it goes to the session's heir
(``SessionMoves.rehome``), which takes it up with the old copy too (examples at the end; the
machine itself does not let X die then). A home killed between a hand-over's commit and its
acknowledgement loses the end it deferred in memory; once every session of its new run is sent
whole and what its last run kept is acknowledged, its ``["s"]`` op makes every node forget the
copies of its sessions it no longer keeps there (examples at the end).

The oracle, a naive model of which messages were acknowledged and which consumed (the client had
them: a kill before the commit may give them again), checks that every acknowledged, not consumed
message of a live session is in its home's store, in order (or, for one taken over, on its way
there: in a hand-over kept at a live node, or in the copies of a dead node that its removal sends
there); that, with no node dead and the copies settled since the last removal, it is committed on
two live nodes (in a session, a copy, or a kept hand-over: an old copy never ends too early); that
it is on the copy node when its PUBACK goes (the copy node being an up member; for a session taken
over since, there or in the session); that once no frame is unacknowledged the copy node holds
exactly the home's messages in row order and no node keeps any other copy; and that a session taken
up after its home's removal has every acknowledged, not consumed message, in order (duplicates
allowed, losses never). Messages published at X before the hand-over arrived get rows before the
moved ones (a restart reads them first): for such a session the oracle checks only that every
message is there.

Not covered by the simulation: the real KeptFrames (test_cluster_kept.py), QoS 2
(``mark_released``), messages big enough for a batch to take several frames per peer, a publish in
the first batch after the members changed, messages forwarded by a node that sees no netsplit
(examples at the end pin those three), nodes joining (an example shows a copy moving), more than
COPY_RESETS sessions, takeovers of a session on another node while its home is down, a session
taken over again before the last hand-over was used (``HandedOver`` passing it on), the markers
that order a moved queue (KEPT_FLUSH), QoS 0 messages, subscriptions (they travel in replicated rows), failing store
writes, and processes (test_replicas.py runs those).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import types

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import vmqapi
from vmqapi import (KEPT_COPY, KEPT_MIGRATE, ClusterError, Copies, Message, SqliteStore, copy_node, decode_term,
                    encode_forward, encode_term, migrated_message, session_key)

NAMES = ["n0", "n1", "n2", "n3", "n4"]
LIMITS = types.SimpleNamespace(packet_limits=types.SimpleNamespace(properties=0))


def message(n: int) -> Message:
    return Message("plant/line-1", b"m%d" % n, 1, origin="device")


def payloads(messages) -> list[bytes]:
    return [m.payload for m in messages]


def note(text: str) -> None:
    """Hypothesis's ``event``, also callable from a plain example (where it records nothing)."""
    with contextlib.suppress(InvalidArgument):
        event(text)


def is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


class Recorder:
    """A ``kept`` stand-in: records each frame, numbered as KeptFrames numbers them, and what waits for them."""

    def __init__(self):
        self.frames: list[tuple[str, int, bytes]] = []
        self.numbers: list[tuple[int, int]] = []  # of each frame in ``frames``
        self.count = 0
        self.batch_numbers: dict[str, tuple[int, int]] = {}  # no other frame is kept here
        self.start_tails: list = []  # nothing was kept before the start
        self.waits: list = []  # (peer, number, Awaited, mode)

    def keep(self, peer, kind, body):
        self.count += 1
        self.frames.append((peer, kind, body))
        self.numbers.append((1, self.count))
        return 1, self.count

    def is_up(self, peer):
        return True

    def wait(self, peer, number, what, mode):
        self.waits.append((peer, number, what, mode))

    def acknowledged(self, peer, number):
        for w in [w for w in self.waits if w[0] == peer and w[1] <= number]:
            self.waits.remove(w)
            w[2].settle()


def copies_on(store, me="n0", members=("n0", "n1"), sessions=None):
    seam = types.SimpleNamespace(sessions={} if sessions is None else sessions, ctx=LIMITS)
    kept = Recorder()
    copies = Copies(me, seam, kept, store, lambda: list(members), lambda: 2)
    return copies, kept


@pytest.fixture
def store(tmp_path):
    store = SqliteStore(str(tmp_path / "messages.db"))
    yield store
    store.close()


# -- copy_node: rendezvous hashing ----------------------------------------------------------------


def test_copy_node_is_another_member_the_same_on_every_reckoning():
    members = ["n0", "n1", "n2", "n3"]
    key = session_key("", "sink")
    chosen = copy_node(key, "n0", members)
    assert chosen in members[1:]
    assert copy_node(key, "n0", list(reversed(members))) == chosen  # the order of the list does not matter
    assert copy_node(key, "n0", ["n0"]) is None and copy_node(key, "n0", []) is None
    assert copy_node(key, "n0", ["n0", "n1"]) == "n1"


@given(members=st.sets(st.sampled_from(NAMES), min_size=1), home=st.sampled_from(NAMES),
       gone=st.sampled_from(NAMES), key=st.text(max_size=10))
def test_a_member_leaving_moves_only_the_copies_it_kept(members, home, gone, key):
    chosen = copy_node(key, home, sorted(members))
    assert chosen != home and (chosen is None) == (members <= {home})
    assert copy_node(key, home, sorted(members, reverse=True)) == chosen  # every node reckons the same
    after = copy_node(key, home, sorted(members - {gone}))
    if gone != chosen:
        assert after == chosen
    else:
        assert after != gone


# -- the copy side: use and take --------------------------------------------------------------------


def test_use_keeps_adds_per_session_deletes_and_ends_and_take_forgets_them(store):
    copies, _ = copies_on(store, me="n1")
    body = lambda n, mp="": vmqapi.encode_forward(mp, message(n), True, ())  # noqa: E731
    copies.use("n0", encode_term([["a", "", "c1", [3, body(3), 1, body(1), 5, body(5)]],
                                  ["a", "mp", "c2", [2, body(2, "mp")]], ["d", [3]]]))
    copies.use("n2", encode_term([["a", "", "c1", [1, body(9)]]]))  # another home's row 1 is another copy
    assert [(h, r, mp, c) for h, r, mp, c, _ in store.load_copies("n0")] == [("n0", 1, "", "c1"), ("n0", 2, "mp", "c2"),
                                                                          ("n0", 5, "", "c1")]
    copies.use("n0", encode_term([["e", "mp", "c2"]]))
    found = copies.take("n0")
    assert {k: payloads(v) for k, v in found.items()} == {("", "c1"): [b"m1", b"m5"]}  # in row order
    assert store.load_copies("n0") == [] and copies.take("n0") == {}
    assert payloads(copies.take("n2", ("", "c1"))[("", "c1")]) == [b"m9"]
    assert store.load_copies() == []


def test_a_home_copies_each_persistent_session_but_a_bridges_and_counts_those_on_one_node(store):
    members = ["n0"]
    sessions = {key: types.SimpleNamespace(clean=False, copy="") for key in [("", "s1"), ("", "$bridge/up")]}
    sessions["", "c"] = types.SimpleNamespace(clean=True, copy="")  # a clean session is never copied
    copies, kept = copies_on(store, me="n0", members=members, sessions=sessions)
    store.watch = copies
    for key in sessions:
        store.add_message(*key, message(1), 1)
    assert copies.flush() == ({}, {}) and kept.frames == []  # no other member: no copy
    assert copies.one_copy(lambda peer: True) == 1  # s1 (a bridge's session stays on its node, uncounted)
    members.append("n1")
    copies.retarget()
    numbers, publishers = copies.flush()
    assert numbers == {"n1": (1, 1)} and publishers == {}  # sent whole: no publisher of this batch waits
    sent = vmqapi.decode_term(kept.frames[0][2])  # sent whole: its adds, then which rows stay
    assert [op[0] for op in sent] == ["a", "k"] and sent[-1] == ["k", "", "s1", [1]] and len(kept.frames) == 1
    assert sessions["", "s1"].copy == "n1"
    assert copies.one_copy(lambda peer: True) == 0 and copies.one_copy(lambda peer: False) == 1
    store.add_message("", "s1", message(2), 1)
    numbers, publishers = copies.flush()
    assert numbers == {"n1": (1, 2)} and publishers == {"n1": {("", "device")}}
    store.delete_session("", "s1")
    del sessions["", "s1"]
    copies.flush()  # the end waits for this batch's frames (none): it goes in the next
    copies.flush()
    assert vmqapi.decode_term(kept.frames[-1][2]) == [["e", "", "s1"]]


TERMS = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 70) | st.text(max_size=5)
                     | st.binary(max_size=8) | st.sampled_from(["a", "d", "e", "k", "s"]),
                     lambda inner: st.lists(inner, max_size=5), max_leaves=20)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=TERMS | st.lists(st.lists(TERMS, max_size=5).map(lambda op: [["a", "d", "e", "k", "s"][len(op) % 5], *op]),
                            max_size=4))
def test_any_copy_frame_is_used_or_a_cluster_error(store, ops):
    copies, _ = copies_on(store, me="n1")
    try:
        copies.use("n0", encode_term(ops))
    except ClusterError:
        pass
    copies.take("n0")  # whatever was kept, bad or not, take reads it without raising
    assert store.load_copies("n0") == []


ROWS = st.integers(-(2 ** 63), 2 ** 63 - 1)  # what SQLite's INTEGER holds (see the example below for more)
SHAPED = st.one_of(
    st.tuples(st.just("a"), st.text(max_size=3), st.text(max_size=3),
              st.lists(st.tuples(ROWS, st.binary(max_size=80) | st.builds(
                  lambda n: vmqapi.encode_forward("", message(n), True, ()), st.integers(0, 9))),
                  max_size=3).map(lambda pairs: [x for pair in pairs for x in pair])),
    st.tuples(st.just("d"), st.lists(ROWS, max_size=3)),
    st.tuples(st.just("e"), st.text(max_size=3), st.text(max_size=3)),
    st.tuples(st.just("k"), st.text(max_size=3), st.text(max_size=3), st.lists(ROWS, max_size=3)),
    st.tuples(st.just("s"), st.lists(st.lists(st.text(max_size=3), min_size=2, max_size=2), max_size=3))).map(list)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(SHAPED | TERMS, max_size=5))
def test_well_shaped_copy_ops_are_kept_and_taken_in_row_order(store, ops):
    """Ops of the right shape with any rows and bodies: kept, or a ClusterError; take gives what it can decode."""
    copies, _ = copies_on(store, me="n1")
    try:
        copies.use("n0", encode_term(ops))
    except ClusterError:
        pass
    rows = [row for _, row, _, _, _ in store.load_copies("n0")]
    assert rows == sorted(rows)
    found = copies.take("n0")
    assert all(isinstance(m, Message) for messages in found.values() for m in messages)
    assert store.load_copies("n0") == []


def test_a_row_sqlite_cannot_hold_is_a_cluster_error(store):
    copies, _ = copies_on(store, me="n1")
    for op in (["a", "", "c", [2 ** 63, b"x"]], ["d", [2 ** 63]]):
        with pytest.raises(ClusterError):
            copies.use("n0", encode_term([op]))


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=30))
def test_any_bytes_as_a_copy_frame_are_used_or_a_cluster_error(store, data):
    copies, _ = copies_on(store, me="n1")
    try:
        copies.use("n0", data)
    except ClusterError:
        pass


# -- the simulated network -------------------------------------------------------------------------


class SimNode:
    """One node: its store (what it committed survives a crash), its Copies, its kept frames and marks."""

    def __init__(self, net: CopiesNetwork, name: str):
        self.net, self.name = net, name
        self.path = os.path.join(net.tmp, name, "messages.db")
        os.makedirs(os.path.dirname(self.path))
        self.start()

    def start(self):
        self.store = SqliteStore(self.path)
        # as Outbox.number: the main stream's epoch (even) and the copy stream's (the next, odd); (peer, stream) -> seq
        self.epoch, self.seqs = 2 * next(self.net.epochs), {}
        self.sessions = {(mp, cid): types.SimpleNamespace(clean=False, copy="")
                         for mp, cid, _ in self.store.load()[1]}
        seam = types.SimpleNamespace(sessions=self.sessions, ctx=LIMITS)
        self.copies = Copies(self.name, seam, self, self.store, self.net.member_list, lambda: 2, self.flush_soon)
        self.batch_numbers: dict = {}  # peer -> the last main-stream frame kept in this batch (KeptFrames')
        self.kept_waits: list = []  # (peer, epoch, seq, Awaited): what waits for a copy frame (ends of copies)
        self.due = False  # Copies asked for a batch soon
        self.store.watch = self.copies
        # peer -> [(epoch, seq, body, row)] kept and not acknowledged, oldest first
        self.outbox: dict[str, list] = {}
        for peer, epoch, seq, kind, body, row in self.store.load_kept():
            assert kind == (KEPT_COPY if epoch % 2 else KEPT_MIGRATE)
            self.outbox.setdefault(peer, []).append((epoch, seq, body, row))
        self.marks = {(origin, epoch): seq for origin, epoch, seq in self.store.load_marks()}
        # as KeptFrames.start_tails: the last frame of each (peer, epoch) kept when the node started
        self.start_tails = [(peer, entries[-1][:2]) for peer, entries in self.outbox.items()
                            for entries in [[e for e in entries if e[0] == epoch] for epoch in {e[0] for e in entries}]]
        self.members_seen: tuple = ()
        self.waits: list = []  # (peer, epoch, seq, session, message ids): PUBACKs waiting for a copy
        self.batch: list = []  # (session, message id) published in the open batch
        self.acks_due: dict = {}  # (origin, epoch) -> seq of main-stream frames used in the open batch
        # KeptFrames.held_acks: [copy frames (peer, epoch, seq) a batch's acknowledgements wait for, those acks]
        self.held: list = []

    def crash(self):
        self.store.db.rollback()
        self.store.db.close()

    # -- what Copies calls: the kept-frame stand-in --
    def flush_soon(self):
        self.due = True

    def is_up(self, peer):
        return self.net.is_up(self.name, peer)

    def wait(self, peer, number, what, fatal):
        self.kept_waits.append((peer, *number, what))

    def keep(self, peer, kind, body):
        assert kind in (KEPT_COPY, KEPT_MIGRATE)
        stream = 1 if kind == KEPT_COPY else 0
        epoch, seq = self.epoch + stream, self.seqs.get((peer, stream), 0) + 1
        self.seqs[peer, stream] = seq
        if kind != KEPT_COPY:
            self.batch_numbers[peer] = (epoch, seq)
        row = self.store.add_kept(peer, epoch, seq, kind, body)
        self.outbox.setdefault(peer, []).append((epoch, seq, body, row))
        self.net.send(self.name, peer, ("frame", epoch, seq, body))
        return epoch, seq

    def end_batch(self, late_crash=False):
        """As Cluster._copy, then the commit; return the message ids acknowledged at once.

        ``late_crash``: the node is killed after its frames went out, before its commit."""
        members = tuple(self.net.members)
        if members != self.members_seen:
            self.members_seen = members
            self.copies.retarget()
        self.due = False  # (this batch's flush may ask for another: ends of copies due at once)
        numbers, publishers = self.copies.flush()
        self.batch_numbers = {}  # Cluster.after_batch clears them after _copy
        # allow_publish_during_netsplit = off: a copy node that is down is waited for until it is back or removed
        if late_crash:
            return None
        assert self.store.commit()
        self.send_acks(numbers)
        batch, self.batch = self.batch, []
        now = []
        for key, msg_id in batch:  # every message here has the same publisher ("device" in mountpoint key[0])
            waiting = [peer for peer in numbers if (key[0], "device") in publishers.get(peer, ())]
            if not waiting:
                now.append((key, msg_id, self.name))
            for peer in waiting:
                self.waits.append([peer, *numbers[peer], key, msg_id])
        return now

    def send_acks(self, numbers):
        """KeptFrames.send_acks after the commit: with copies made in this batch (Cluster._copy's ``ack_wait``),
        the acknowledgements of main-stream frames wait until the copy nodes acknowledged them, in order."""
        wait = {(peer, *number) for peer, number in numbers.items()} if numbers else None
        if (wait is not None or self.held) and (self.acks_due or wait is not None):
            self.held.append([wait, dict(self.acks_due)])
            self.acks_due.clear()
            return self.send_held()
        for (peer, epoch), seq in self.acks_due.items():
            self.net.send(self.name, peer, ("ack", epoch, seq, None))
        self.acks_due.clear()

    def send_held(self):
        while self.held and not self.held[0][0]:
            for (peer, epoch), seq in self.held.pop(0)[1].items():
                self.net.send(self.name, peer, ("ack", epoch, seq, None))

    def settle_held(self, which):
        for entry in self.held:
            if entry[0]:
                entry[0] -= {w for w in entry[0] if which(w)}
        self.send_held()

    # -- the copy node's side --
    def receive(self, origin, epoch, seq, body):
        """Use a frame; return True when a batch must end now (a main-stream frame: its acknowledgement follows
        that batch's commit, held while its copies are unacknowledged)."""
        last = self.marks.get((origin, epoch), 0)
        if epoch % 2 == 0:  # the main stream: a session's messages handed over (KEPT_MIGRATE)
            if seq > last:
                assert seq == last + 1, f"a gap in {origin}'s frames: {last} then {seq}"
                self.adopt(body)
                self.marks[origin, epoch] = last = seq
                self.store.put_mark(origin, epoch, seq)
            self.acks_due[origin, epoch] = last
            return True
        if seq > last:
            assert seq == last + 1, f"a gap in {origin}'s frames: {last} then {seq}"
            self.copies.use(origin, body)
            self.marks[origin, epoch] = seq
            self.store.put_mark(origin, epoch, seq)
            assert self.store.commit()
        self.net.send(self.name, origin, ("ack", epoch, seq, None))
        return False

    def adopt(self, body):
        """SessionMoves.on_migrate: the messages go into the session here as new rows (its copies go to this
        node's copy node in this batch); no session here (it ended meanwhile): they are dropped."""
        mountpoint, client_id, _, bodies = decode_term(body)
        key = (mountpoint, client_id)
        if key not in self.sessions:
            return
        self.store.put_session(*key)
        for item in bodies:
            msg = migrated_message(item, 0)
            assert self.store.add_message(*key, msg, msg.qos)

    def moving(self):
        """{(target, session): [message ids]} of the main-stream frames kept here, unacknowledged."""
        found = {}
        for peer, entries in self.outbox.items():
            for epoch, _, body, _ in entries:
                if epoch % 2 == 0:
                    mountpoint, client_id, _, bodies = decode_term(body)
                    found.setdefault((peer, (mountpoint, client_id)), []).extend(
                        int(migrated_message(b, 0).payload[1:]) for b in bodies)
        return found

    def acknowledged(self, peer, epoch, upto):
        """Return the (session, message id) whose PUBACK this acknowledgement lets go."""
        kept = self.outbox.get(peer, [])
        done = [f for f in kept if f[0] == epoch and f[1] <= upto]
        self.outbox[peer] = [f for f in kept if not (f[0] == epoch and f[1] <= upto)]
        self.store.delete_kept([f[3] for f in done])
        self.store.commit()
        self.settle_kept(lambda w: w[0] == peer and w[1] == epoch and w[2] <= upto)
        self.settle_held(lambda w: w[0] == peer and w[1] == epoch and w[2] <= upto)
        return self.settle(lambda w: w[0] == peer and w[1] == epoch and w[2] <= upto)

    def settle_kept(self, which, ok=True):
        for w in [w for w in self.kept_waits if which(w)]:
            self.kept_waits.remove(w)
            w[3].settle(ok)

    def settle(self, which):
        settled = [w for w in self.waits if which(w)]
        self.waits = [w for w in self.waits if not which(w)]
        return [(w[3], w[4], self.name) for w in settled]

    def pending(self) -> bool:
        return any(self.outbox.values())


SESSIONS = [("", "c0"), ("", "c1"), ("mp", "c2")]
CRASHES = st.sampled_from([None, None, None, None, None, "early", "late"])


class CopiesNetwork(RuleBasedStateMachine):
    """2-5 nodes with persistent sessions kept on two of them; links break, nodes crash or die for good."""

    @initialize(n=st.integers(2, 5))
    def start(self, n):
        self.tmp = tempfile.mkdtemp(prefix="copies-")
        self.epochs = itertools.count(1)
        self.names = NAMES[:n]
        self.members = list(self.names)  # the member list, the same on every node (removal is instant)
        self.up = {frozenset(p) for p in itertools.combinations(self.names, 2)}
        self.flight: dict[tuple[str, str], list] = {}
        self.nodes = {name: SimNode(self, name) for name in self.names}
        self.dead: str | None = None  # died for good, not yet removed
        self.settling = False  # frames kept since the last removal may be unacknowledged
        self.ids = itertools.count(1)
        self.home: dict[tuple[str, str], str] = {}  # live session -> its node
        self.acked: dict[tuple[str, str], list[int]] = {}  # session -> message ids acknowledged, in order
        self.consumed: set[int] = set()  # message ids the client has had
        self.unordered: set = set()  # sessions published to while older messages were on their way to them
        self.old_home: dict = {}  # session -> the node it was last taken over from
        self.restarted: set = set()  # nodes killed once (a copy they left may stay: see the examples at the end)
        for i, key in enumerate(SESSIONS):  # every session starts at a node, with no message
            home = self.home[key] = self.names[i % n]
            self.nodes[home].store.put_session(*key)
            self.nodes[home].sessions[key] = types.SimpleNamespace(clean=False, copy="")
        for name in self.names:
            self.batch(name)

    # -- the network --
    def member_list(self):
        return list(self.members)

    def is_up(self, a, b):
        return frozenset((a, b)) in self.up

    def send(self, src, dst, item):
        if self.is_up(src, dst):
            self.flight.setdefault((src, dst), []).append(item)

    def link_up(self, a, b):
        """Both ends resend every frame still unacknowledged, in order."""
        self.up.add(frozenset((a, b)))
        for src, dst in ((a, b), (b, a)):
            self.flight[src, dst] = [("frame", e, s, body) for e, s, body, _ in self.nodes[src].outbox.get(dst, [])]

    def link_down(self, a, b):
        self.up.discard(frozenset((a, b)))
        self.flight.pop((a, b), None)
        self.flight.pop((b, a), None)

    def live(self):
        return [n for n in self.members if n != self.dead]

    def pick(self, i, live=True):
        names = self.live() if live else self.members
        return names[i % len(names)]

    # -- the oracle's bookkeeping --
    def acknowledge(self, done, check=True):
        for key, msg_id, home in done:  # home: where it was published (the session may have moved on since)
            if self.home.get(key) is None:
                continue  # the session ended meanwhile
            self.acked.setdefault(key, []).append(msg_id)
            peer = copy_node(session_key(*key), home, self.members)
            if check and peer is not None and peer != self.dead and msg_id not in self.consumed:
                # the PUBACK goes once the copy node committed it (unless the client had it first) ...
                copied = [int(vmqapi.decode_forward(body)[1].payload[1:])
                          for _, _, _, _, body in self.nodes[peer].store.load_copies(home, key)]
                if home != self.home[key] and msg_id not in copied:
                    # ... or, taken over since, that copy ended once the new home acknowledged the hand-over
                    copied = [int(m.payload[1:]) for _, m in self.messages_at_home(key)] + self.on_their_way(key)
                assert msg_id in copied, (key, msg_id, home, peer)

    def batch(self, name, crash=None):
        """End a batch at ``name``; ``crash``: it is killed "early" (before the batch's end) or "late" (its
        frames went out, and arrived, but it did not commit)."""
        if crash == "early":
            return self.crash_node(name)
        done = self.nodes[name].end_batch(late_crash=crash == "late")
        if done is None:
            for peer in self.live():  # what it sent before the kill arrives and is used
                if peer != name:
                    self.deliver(self.members.index(name), self.members.index(peer), 1000)
            return self.crash_node(name)
        self.acknowledge(done)
        if self.nodes[name].due:  # Copies.flush_soon (ends of copies due now): the cluster runs a batch soon
            self.batch(name)

    def waiting_for(self, key):
        return [m for m in self.acked.get(key, []) if m not in self.consumed]

    def messages_at_home(self, key):
        return [(row, m) for row, m, _ in self.nodes[self.home[key]].store.session_messages(*key)]

    def on_their_way(self, key):
        """Message ids of session ``key`` not at its home yet: in a hand-over kept (committed) at a live node for
        its home, or in the copies a dead node's copy nodes keep of it (its removal sends them to the home)."""
        found = []
        for name in self.live():
            found += self.nodes[name].moving().get((self.home[key], key), [])
            if self.dead is not None:
                found += [int(vmqapi.decode_forward(body)[1].payload[1:])
                          for _, _, _, _, body in self.nodes[name].store.load_copies(self.dead, key)]
        return found

    def moving(self, key):
        """Whether a hand-over of ``key`` is kept at a live node and not yet used by the node it goes to."""
        for name in self.live():
            node = self.nodes[name]
            for peer, entries in node.outbox.items():
                marks = self.nodes[peer].marks
                if any(epoch % 2 == 0 and seq > marks.get((name, epoch), 0) and tuple(decode_term(body)[:2]) == key
                       for epoch, seq, body, _ in entries):
                    return True
        return False

    # -- rules --
    @rule(s=st.sampled_from(SESSIONS), a=st.integers(0, 4), count=st.integers(1, 3), crash=CRASHES)
    def publish(self, s, a, count, crash, via=None):
        """QoS 1 messages for a persistent session (made at node ``a`` when it has none), from a client of its
        home (``via``: of that node, which forwards them to the home)."""
        home = self.home.get(s) or self.pick(a)
        via = via or home
        if home == self.dead or any(not self.is_up(via, m) for m in self.members if m != via):
            return  # a netsplit as the publisher's node sees it: publishes are refused
        node = self.nodes[home]
        if s in self.home and self.moving(s):
            self.unordered.add(s)  # older messages arrive after these (the store's rows say so; see the docstring)
        if s not in self.home:
            node.store.put_session(*s)
            node.sessions[s] = types.SimpleNamespace(clean=False, copy="")
        for _ in range(count):
            msg_id = next(self.ids)
            assert node.store.add_message(*s, message(msg_id), 1)
            node.batch.append((s, msg_id))
        if crash:
            return self.batch(home, crash)
        self.home[s] = home
        self.batch(home)

    @rule(s=st.sampled_from(SESSIONS), a=st.integers(0, 4), count=st.integers(1, 3))
    def publish_acknowledged(self, s, a, count):
        """QoS 1 messages, then every up link carries all it has."""
        self.publish(s, a, count, None)
        self.calm()

    @rule(s=st.sampled_from(SESSIONS), count=st.integers(1, 3), crash=CRASHES)
    def consume(self, s, count, crash):
        """The session's client takes its oldest messages (deleted at its home)."""
        home = self.home.get(s)
        if home is None or home == self.dead:
            return
        taken = self.messages_at_home(s)[:count]
        for row, _ in taken:
            self.nodes[home].store.delete_message(row)
        # the client has them (their PUBACKs deleted them): a crash before the commit may give them again
        self.consumed |= {int(m.payload[1:]) for _, m in taken}
        self.batch(home, crash)

    @rule(s=st.sampled_from(SESSIONS))
    def expire(self, s):
        """The session ends with its messages."""
        home = self.home.get(s)
        if home is None or home == self.dead:
            return
        node = self.nodes[home]
        node.store.delete_session(*s)
        del node.sessions[s]
        for other in self.live():  # its PUBACKs go (at the nodes it was at), of no concern to the copies
            self.nodes[other].waits = [w for w in self.nodes[other].waits if w[3] != s]
        self.batch(home)
        del self.home[s]
        self.acked.pop(s, None)

    @rule(s=st.sampled_from(SESSIONS), a=st.integers(0, 4), crash=CRASHES)
    def take_over(self, s, a, crash):
        """Session ``s``'s client connects at another live node: the old home hands the session over there."""
        old = self.home.get(s)
        others = [n for n in self.live() if n != old]
        if old is None or old == self.dead or not others or self.moving(s):
            return  # (a move of a session whose last move is not used yet: not covered)
        new = others[a % len(others)]
        node = self.nodes[new]  # the client's CONNECT makes the session there (its row claims it)
        node.store.put_session(*s)
        node.sessions[s] = types.SimpleNamespace(clean=False, copy="")
        self.batch(new)
        if crash:  # the old home is killed in its hand-over's batch: restarted, it hands the session over again
            self.hand_over(s, old, new, crash)
        self.hand_over(s, old, new)
        self.home[s], self.old_home[s] = new, old
        note("a session taken over with acknowledged messages" if self.waiting_for(s) else "a session taken over")

    def hand_over(self, key, old, new, crash=None):
        """Peers.hand_over and SessionMoves.migrate at the old home, in one batch: its messages in order, the
        session's end (Copies.ended defers the end of its copy), a KEPT_MIGRATE frame for the new home."""
        node = self.nodes[old]
        messages = [m for _, m, _ in node.store.session_messages(*key)]
        node.store.delete_session(*key)
        del node.sessions[key]
        node.keep(new, KEPT_MIGRATE, encode_term([*key, None, [encode_forward(key[0], m, True, ()) for m in messages]]))
        self.batch(old, crash)

    @rule(a=st.integers(0, 4))
    def hand_over_used_then_killed(self, a):
        """A link carrying a hand-over delivers up to it; the node it goes to uses it and is killed before its
        commit, once the copies of that batch went out and were used."""
        live = self.live()
        pairs = [pair for pair, frames in sorted(self.flight.items()) if set(pair) <= set(live)
                 and any(item[0] == "frame" and item[1] % 2 == 0 for item in frames)]
        if not pairs:
            return
        src, dst = pairs[a % len(pairs)]
        frames = self.flight[src, dst]
        while not (frames[0][0] == "frame" and frames[0][1] % 2 == 0):
            self.deliver(self.members.index(src), self.members.index(dst), 1)
        _, epoch, seq, body = frames.pop(0)
        if self.nodes[dst].receive(src, epoch, seq, body):
            note("a hand-over used, then its node killed before the commit")
            self.batch(dst, "late")

    @rule(a=st.integers(0, 4), b=st.integers(0, 4), count=st.integers(1, 4))
    def deliver(self, a, b, count):
        src, dst = self.pick(a, live=False), self.pick(b, live=False)
        frames = self.flight.get((src, dst), [])
        for _ in range(min(count, len(frames))):
            kind, epoch, seq, body = frames.pop(0)
            if kind == "frame":
                if self.nodes[dst].receive(src, epoch, seq, body):
                    self.batch(dst)
            else:
                self.acknowledge(self.nodes[dst].acknowledged(src, epoch, seq))
                if self.nodes[dst].due:  # ends of copies released: a batch sends them
                    self.batch(dst)

    @rule(heal=st.booleans())
    def calm(self, heal=False):
        """Every up link (``heal``: every link between live nodes) carries all it has, both ways, until
        nothing is in flight."""
        for a, b in itertools.combinations(self.live(), 2) if heal else ():
            if not self.is_up(a, b):
                self.link_up(a, b)
        for _ in range(50):
            busy = [key for key, frames in self.flight.items() if frames]
            if not busy:
                return
            for src, dst in busy:
                self.deliver(self.members.index(src), self.members.index(dst), 100)
        pytest.fail("frames still in flight after 50 rounds")

    @rule(a=st.integers(0, 4), b=st.integers(0, 4), up=st.booleans())
    def link(self, a, b, up):
        """The link between ``a`` and ``b`` breaks (what is in flight is lost), or heals."""
        a, b = self.pick(a), self.pick(b)
        if a != b and up != self.is_up(a, b):
            self.link_up(a, b) if up else self.link_down(a, b)

    @rule(a=st.integers(0, 4))
    def restart(self, a):
        self.crash_node(self.pick(a))

    def crash_node(self, name):
        """Killed: what it did not commit is gone, its links drop; it starts again and links up again."""
        node = self.nodes[name]
        node.crash()
        for other in self.members:
            if other != name:
                self.link_down(name, other)
        self.restarted.add(name)
        node.start()
        note("a restart with kept frames" if node.pending() else "a restart")
        for other in self.live():
            if other != name:
                self.link_up(name, other)
        self.batch(name)  # Cluster._copy: the first batch after a start retargets every session

    @rule(s=st.sampled_from(SESSIONS), a=st.integers(0, 4), who=st.sampled_from(["node", "home", "old home"]))
    def die(self, s, a, who):
        """A node dies for good (allowed: see the module's docstring): node ``a``, session ``s``'s home, or the
        node it was last taken over from."""
        name = {"home": self.home, "old home": self.old_home}[who].get(s) if who != "node" else None
        name = name if name in self.live() else self.pick(a)
        if self.dead is not None or self.settling or len(self.members) < 2:
            return
        if any(peer == name for other in self.live() for peer, _ in self.nodes[other].moving()):
            return  # a node a session is being handed over to: a known loss (see the examples at the end)
        self.kill_for_good(name)

    def kill_for_good(self, name):
        self.nodes[name].crash()
        for other in self.members:
            if other != name:
                self.link_down(name, other)
        self.dead = name

    @rule()
    def remove(self):
        """The dead node is removed everywhere: its sessions go on at their heirs with the copies kept."""
        dead = self.dead
        if dead is None:
            return
        self.members.remove(dead)
        self.dead, self.settling = None, True
        alive = sorted(self.members)
        # a hand-over the dead one never acknowledged goes to the session's heir (SessionMoves.rehome): here
        # added to what the heir takes up, or sent there (then it arrives later: ``travelling``)
        rehomed, travelling = {}, set()
        for name in alive:
            for epoch, _, body, _ in [e for e in self.nodes[name].outbox.get(dead, []) if e[0] % 2 == 0]:
                mp, cid, _, bodies = vmqapi.decode_term(body)
                key, heir = (mp, cid), copy_node(session_key(mp, cid), dead, alive)
                note("a hand-over to a removed node goes to the heir")
                self.home[key] = dead  # its session goes on at the heir, with these
                if heir == name:
                    rehomed.setdefault(key, []).extend(vmqapi.decode_forward(raw)[1] for raw in bodies)
                else:
                    self.nodes[name].keep(heir, KEPT_MIGRATE, body)
                    travelling.add(key)
        taken = {}
        for name in alive:
            for key, messages in self.nodes[name].copies.take(dead).items():
                assert key not in taken, f"two nodes kept a copy of {key}"
                taken[key] = (name, messages)
        for key in [k for k, home in self.home.items() if home == dead]:
            heir = copy_node(session_key(*key), dead, alive)
            holder, messages = taken.pop(key, (heir, []))
            # SessionRows.member_gone: copies of it from the node that handed it to the dead one, wherever kept
            # (the heir and a holder each take theirs up and the two merge; the model puts them together)
            earlier = [m for name in alive for m in self.nodes[name].copies.take(None, key).get(key, [])]
            messages = earlier + messages + rehomed.pop(key, [])
            assert holder == heir or not messages, (key, holder, heir)
            got = [int(p[1:]) for p in payloads(messages)]
            waiting = self.waiting_for(key)
            if key not in travelling:
                assert set(waiting) <= set(got) if key in self.unordered else is_subsequence(waiting, got), \
                    (key, waiting, got)
            note("a session taken up with acknowledged messages" if self.waiting_for(key) else "a session taken up")
            node = self.nodes[heir]
            node.store.put_session(*key)
            node.sessions[key] = types.SimpleNamespace(clean=False, copy="")
            for msg in messages:
                node.store.add_message(*key, msg, 1)
            self.home[key] = heir
            self.acked[key] = self.waiting_for(key)
        for key, (holder, messages) in taken.items():
            home = self.home.get(key)
            if home is None:  # ended there (an ["e"] not yet used) or never committed: no session takes them
                note("copies with no session taken")
                continue
            # taken over elsewhere while its node was away (SessionRows.member_gone): they go to its home
            note("copies of a session taken over sent to its home")
            if home == holder:
                for msg in messages:
                    self.nodes[holder].store.add_message(*key, msg, msg.qos)
            else:
                self.nodes[holder].keep(home, KEPT_MIGRATE, encode_term(
                    [*key, None, [encode_forward(key[0], m, True, ()) for m in messages]]))
        for name in alive:
            node = self.nodes[name]
            self.batch(name)  # members changed: retarget
            node.outbox.pop(dead, None)  # what was kept for it is dropped (KeptFrames.drop) ...
            for row in [r for peer, _, _, _, _, r in node.store.load_kept() if peer == dead]:
                node.store.delete_kept([row])
            node.store.commit()
            # ... and the PUBACKs waiting for it go (KeptFrames.settle_waits: a copy's wait is not fatal)
            self.acknowledge(node.settle(lambda w: w[0] == dead), check=False)
            node.settle_kept(lambda w: w[0] == dead, ok=False)  # WAIT_FIRM: a removal cancels what waited
            node.settle_held(lambda w: w[0] == dead)
            if node.due:
                self.batch(name)

    # -- invariants --
    @invariant()
    def acknowledged_messages_are_at_home(self):
        if not hasattr(self, "nodes"):
            return
        for key, home in self.home.items():
            if home == self.dead:
                continue
            there = [int(m.payload[1:]) for _, m in self.messages_at_home(key)]
            waiting = self.waiting_for(key)
            if key not in self.unordered and is_subsequence(waiting, there):
                continue
            there += self.on_their_way(key)
            assert set(waiting) <= set(there), (key, waiting, there)

    @invariant()
    def acknowledged_messages_are_on_two_nodes(self):
        """With no node dead and the copies settled since the last removal, every acknowledged, not consumed
        message is committed on two live nodes (in a session, a copy, or a hand-over kept): a takeover's old copy
        ends only once the new home's copy is committed."""
        if not hasattr(self, "nodes") or self.dead is not None or self.settling or len(self.members) < 2:
            return
        places: dict[tuple, set] = {}
        for name in self.members:
            node = self.nodes[name]
            for key in self.home:
                for _, m, _ in node.store.session_messages(*key):
                    places.setdefault((key, int(m.payload[1:])), set()).add(name)
            for _, _, mountpoint, client_id, body in node.store.load_copies():
                msg_id = int(vmqapi.decode_forward(body)[1].payload[1:])
                places.setdefault(((mountpoint, client_id), msg_id), set()).add(name)
            for (_, key), ids in node.moving().items():
                for msg_id in ids:
                    places.setdefault((key, msg_id), set()).add(name)
        for key in self.home:
            for msg_id in self.waiting_for(key):
                assert len(places.get((key, msg_id), ())) >= 2, (key, msg_id, places.get((key, msg_id)))

    @invariant()
    def quiet_copies_are_the_home(self):
        if not hasattr(self, "nodes"):
            return
        if any(self.nodes[n].pending() for n in self.live()):
            return
        self.settling = False
        if self.dead is not None:
            return
        for key, home in self.home.items():
            peer = copy_node(session_key(*key), home, self.members)
            if peer is None:
                continue
            at_home = [(row, m.payload) for row, m in self.messages_at_home(key)]
            copied = [(row, vmqapi.decode_forward(body)[1].payload)
                      for _, row, _, _, body in self.nodes[peer].store.load_copies(home, key)]
            if home in self.restarted and copied != at_home:  # a copy its last run left, the session back since
                note("a copy left behind by a restarted home, its session back there")
                assert is_subsequence(at_home, copied), (key, home, peer, at_home, copied)
                continue
            assert copied == at_home, (key, home, peer)
        for name in self.members:  # and no node keeps any other copy (an old copy node's, a session's that ended)
            for home, _, mountpoint, client_id, _ in self.nodes[name].store.load_copies():
                key = (mountpoint, client_id)
                if home in self.restarted and (self.home.get(key) != home or copy_node(
                        session_key(*key), home, self.members) != name):
                    note("a copy left behind by a restarted home")
                    continue
                assert self.home.get(key) == home and copy_node(session_key(*key), home, self.members) == name, \
                    (name, home, key, self.home.get(key))

    def teardown(self):
        if not hasattr(self, "nodes"):
            return
        try:
            self.remove()
            self.calm(heal=True)
            assert not any(self.nodes[n].pending() for n in self.members)
            self.acknowledged_messages_are_at_home()
            self.quiet_copies_are_the_home()
            for name in self.members:
                assert not self.nodes[name].waits
        finally:
            self.close()

    def close(self):
        for name in self.live():
            self.nodes[name].crash()
        shutil.rmtree(self.tmp, ignore_errors=True)


CopiesNetwork.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
test_acknowledged_messages_survive_one_death_at_a_time = CopiesNetwork.TestCase


# -- examples of behaviours found doubtful -------------------------------------------------------------


def test_a_forwarded_message_is_acknowledged_only_once_its_copy_is_committed():
    net, key = CopiesNetwork(), ("", "c0")
    net.start(n=3)
    try:
        home = net.home[key]
        keeper = copy_node(session_key(*key), home, net.members)
        publisher = next(n for n in net.members if n not in (home, keeper))
        net.link_down(home, keeper)  # a partial split: the publisher's node still reaches both
        net.publish(key, 0, 1, None, via=publisher)  # the oracle checks the copy when the PUBACK goes
    finally:
        net.close()


class Pair:
    """A home node's Copies and its copy nodes' Copies, over real stores; frames are delivered by hand."""

    def __init__(self, tmp_path, members):
        self.members = list(members)
        self.stores = {n: SqliteStore(str(tmp_path / f"{n}.db")) for n in self.members + ["n2"]}
        self.sessions = {}
        self.copies = {n: copies_on(self.stores[n], me=n, members=self.members, sessions=self.sessions if n == "n0"
                                    else {})[0] for n in self.stores}
        for copies in self.copies.values():
            copies.members = lambda: list(self.members)
        self.home = self.copies["n0"]
        self.stores["n0"].watch = self.home

    @property
    def frames(self):
        return self.home.kept.frames

    def session(self, key):
        self.stores["n0"].put_session(*key)
        self.sessions[key] = types.SimpleNamespace(clean=False, copy="")

    def batch(self, retarget=False):
        """Cluster._copy's order: the batch's adds went to the watch, then retarget, flush, commit."""
        if retarget:
            self.home.retarget()
        numbers, publishers = self.home.flush()
        self.stores["n0"].commit()
        return numbers, publishers

    def deliver(self, upto=None):
        """The copy nodes use the frames kept so far (the first ``upto`` of them), each committed and acknowledged."""
        kept = self.home.kept
        frames, kept.frames[:] = kept.frames[:upto], kept.frames[upto:] if upto is not None else []
        numbers, kept.numbers[:] = kept.numbers[:upto], kept.numbers[upto:] if upto is not None else []
        for (peer, _, body), number in zip(frames, numbers):
            self.copies[peer].use("n0", body)
            self.stores[peer].commit()
            kept.acknowledged(peer, number)

    def copied(self, key):
        return {n: [vmqapi.decode_forward(b)[1].payload for _, _, _, _, b in self.stores[n].load_copies("n0", key)]
                for n in self.stores if n != "n0"}

    def close(self):
        for store in self.stores.values():
            store.close()


def test_a_join_never_leaves_an_acknowledged_message_on_one_node(tmp_path):
    """A joining node takes a session's copy over: the old copy node forgets it only once the new one committed it."""
    pair, key = Pair(tmp_path, ["n0", "n1"]), ("", "s1")  # s1: n1 keeps its copy, n2 when n2 joins
    try:
        assert copy_node(session_key(*key), "n0", ["n0", "n1", "n2"]) == "n2"
        pair.session(key)
        pair.stores["n0"].add_message(*key, message(1), 1)
        pair.batch()
        pair.deliver()  # n1 committed m1: its PUBACK went
        pair.members.append("n2")  # n2 joins
        pair.batch(retarget=True)
        assert [peer for peer, _, _ in pair.frames] == ["n2"]  # the session whole; n1's end waits for it
        assert pair.copied(key) == {"n1": [b"m1"], "n2": []}
        pair.deliver()
        pair.batch()
        sent = {peer: vmqapi.decode_term(body) for peer, _, body in pair.frames}  # and the sync after a start
        assert sent == {"n1": [["e", *key], ["s", []]], "n2": [["s", [list(key)]]]}
        assert pair.copied(key) == {"n1": [b"m1"], "n2": [b"m1"]}
        pair.deliver()
        assert pair.copied(key) == {"n1": [], "n2": [b"m1"]}
    finally:
        pair.close()


def test_the_publisher_waits_for_the_node_that_keeps_the_copy_after_the_members_changed(tmp_path):
    pair, key = Pair(tmp_path, ["n0", "n1"]), ("", "s1")
    pair.session(key)
    pair.stores["n0"].add_message(*key, message(1), 1)
    pair.batch()
    pair.deliver()
    pair.members.append("n2")  # n2 joins; in the next batch, a QoS 1 message comes before the retarget
    pair.stores["n0"].add_message(*key, message(2), 1)
    numbers, publishers = pair.batch(retarget=True)
    try:
        keeper = copy_node(session_key(*key), "n0", pair.members)
        assert ("", "device") in publishers.get(keeper, ())
    finally:
        pair.close()


def split_by_the_end_of_a_frame(pair):
    """Sessions a and b, sized so that a session-whole puts b's ["e"] at the end of one frame, its adds in the next
    (by the flush's reckoning: ["e"] of a, 16 + 64; ["a"] of a, its body, 16 a list item, 64; ["e"] of b)."""
    overhead = len(vmqapi.encode_forward("", Message("plant/line-1", b"", 1), True, ()))  # as the store gives it
    payload = vmqapi.COPY_FRAME_BYTES - 40 - (16 + 64) - (overhead + 2 * 16 + 64)  # 40 short after a's adds
    pair.stores["n0"].add_message("", "a", Message("plant/line-1", b"x" * payload, 1, origin="device"), 1)
    pair.stores["n0"].add_message("", "b", message(1), 1)


def split_by_its_size(pair):
    """Session a, 1.5 times COPY_FRAME_BYTES of messages; b empty."""
    for n in range(3):
        pair.stores["n0"].add_message("", "a", Message("t", b"%d" % n * (vmqapi.COPY_FRAME_BYTES // 2), 1), 1)


@pytest.mark.parametrize("fill", [split_by_the_end_of_a_frame, split_by_its_size])
def test_a_session_sent_whole_never_leaves_its_copy_node_short(tmp_path, fill):
    pair, keys = Pair(tmp_path, ["n0", "n1"]), [("", "a"), ("", "b")]
    try:
        for key in keys:
            pair.session(key)
        fill(pair)
        pair.batch()
        pair.deliver()
        before = {key: pair.copied(key)["n1"] for key in keys}  # committed on n1: their PUBACKs went
        restarted = Copies("n0", pair.home.seam, pair.home.kept, pair.stores["n0"], lambda: list(pair.members),
                           lambda: 2)
        pair.stores["n0"].watch = pair.home = restarted  # the home restarts: its first batch sends all whole
        pair.batch(retarget=True)
        for _ in range(len(pair.frames)):  # the home may die for good after any of them
            pair.deliver(upto=1)
            assert {key: pair.copied(key)["n1"] for key in keys} == before
    finally:
        pair.close()


def test_no_copy_frame_carries_much_more_than_copy_frame_bytes(tmp_path):
    """A session's queue sent whole is cut into frames of about COPY_FRAME_BYTES: one frame past
    CLUSTER_MAX_FRAME (64 MB) would be dropped by KeptFrames.keep, the copy lost and no PUBACK waiting."""
    pair, key = Pair(tmp_path, ["n0", "n1"]), ("", "s1")
    pair.session(key)
    for n in range(4):  # 2 MB of messages, half a frame's worth each
        pair.stores["n0"].add_message(*key, Message("t", b"%d" % n * (vmqapi.COPY_FRAME_BYTES // 2), 1), 1)
    pair.batch()
    try:
        biggest = max(len(body) for _, _, body in pair.frames)
        assert biggest < vmqapi.COPY_FRAME_BYTES + vmqapi.COPY_FRAME_BYTES // 2 + 1000  # the bound and one message
    finally:
        pair.close()


def test_a_batch_sends_each_message_to_the_copy_node_once(tmp_path):
    pair, key = Pair(tmp_path, ["n0", "n1"]), ("", "s1")
    pair.session(key)
    for n in range(3):
        pair.stores["n0"].add_message(*key, message(n), 1)
    pair.batch()
    try:
        rows = [row for _, _, body in pair.frames for op in vmqapi.decode_term(body) if op[0] == "a"
                for row in op[3][::2]]
        assert sorted(rows) == [1, 2, 3]
    finally:
        pair.close()


def test_a_session_with_a_waiting_publisher_is_sent_whole_at_once_whatever_the_budget(tmp_path):
    """More sessions to send whole than COPY_RESETS (a start, a join): the one a publisher's PUBACK waits for
    goes in this batch, and the publisher waits for the node it goes to."""
    pair = Pair(tmp_path, ["n0", "n1"])
    keys = [("", f"s{n:03d}") for n in range(vmqapi.COPY_RESETS + 20)]
    try:
        for key in keys:
            pair.session(key)
        pair.home.retarget()  # every session to be sent whole, COPY_RESETS per batch
        last = keys[-1]  # the last in line
        pair.stores["n0"].add_message(*last, message(1), 1)
        numbers, publishers = pair.batch()
        sent = {(op[1], op[2]) for _, _, body in pair.frames for op in vmqapi.decode_term(body) if op[0] == "k"}
        assert last in sent and publishers == {"n1": {("", "device")}} and "n1" in numbers
    finally:
        pair.close()


def test_an_old_copy_ends_only_once_the_new_one_is_acknowledged_even_across_a_netsplit(tmp_path):
    """The end of a copy waits for the new copy node's acknowledgement firmly: a netsplit with publishes
    going on (KeptFrames.settle_waits, removed=False) does not release it; the node's removal does."""
    pair, key = Pair(tmp_path, ["n0", "n1"]), ("", "s1")
    try:
        pair.session(key)
        pair.stores["n0"].add_message(*key, message(1), 1)
        pair.batch()
        pair.deliver()
        pair.members.append("n2")
        pair.batch(retarget=True)
        waits = pair.home.kept.waits
        assert {mode for _, _, _, mode in waits} == {vmqapi.WAIT_FIRM}  # the end, and the sync after a start
    finally:
        pair.close()
    kept = vmqapi.KeptFrames(None, None, lambda: 0, 1, None)  # what the real one does with each mode
    done = []
    whats = {mode: vmqapi.Awaited(1, lambda mode=mode: done.append(mode))
             for mode in (vmqapi.WAIT_FIRM, vmqapi.WAIT_GOES_ON, vmqapi.WAIT_FATAL)}
    for n, (mode, what) in enumerate(whats.items()):
        kept.wait("n2", (1, 5 - n), what, mode)
    kept.settle_waits("n2", removed=False)  # down, publishes going on in a netsplit
    assert sorted(done) == sorted([vmqapi.WAIT_GOES_ON, vmqapi.WAIT_FATAL]) and not whats[vmqapi.WAIT_FATAL].failed
    kept.settle_waits("n2", removed=True)
    assert done[-1] == vmqapi.WAIT_FIRM and whats[vmqapi.WAIT_FIRM].failed  # a removal cancels what it waited for


# -- sessions taken over: examples, two of them past what the machine lets happen --------------------


@pytest.mark.parametrize("used", [False, True])
def test_a_session_handed_over_to_a_node_that_dies_before_it_acknowledged_the_hand_over_keeps_its_messages(used):
    """The new home X dies for good before it acknowledged the hand-over: before it used it, or once it did but
    before its copy node acknowledged its copy (``used``). X's removal releases the old home's wait for it
    (WAIT_FIRM ends at a removal): the old copy node ends its copy, the KEPT_MIGRATE frame is dropped, and the
    heir takes the session up with what X's copy node kept of it: nothing. (Smallest: 2 nodes, publish m1 at
    n0, take over to n1, n1 dies, removed.)"""
    net, key = CopiesNetwork(), ("", "c0")
    net.start(n=3 if used else 2)
    try:
        net.publish_acknowledged(key, 0, 1)  # m1 at its home, its copy on the copy node: acknowledged
        old = net.home[key]
        new = next(n for n in net.members if n != old and (
            not used or copy_node(session_key(*key), n, net.members) != old))
        keeper = copy_node(session_key(*key), new, net.members)
        if used:
            net.link(net.members.index(new), net.members.index(keeper), False)  # X's copy does not get there
        net.take_over(key, [n for n in net.members if n != old].index(new), None)
        if used:
            net.calm()  # X used the hand-over; its acknowledgement waits for its copy node
            assert net.nodes[new].held and net.nodes[old].pending()
        net.kill_for_good(new)
        net.remove()  # the heir's session: every acknowledged message? (no: m1 is lost)
    finally:
        net.close()


def test_an_old_home_restarted_before_the_hand_over_is_acknowledged_still_ends_its_copy():
    """The old home is killed after its hand-over's commit, before the new home acknowledged it: the end of the
    copy it deferred (in memory) never goes; its copy node keeps the copy for ever, and when the old home is
    removed one day that copy goes to the session again: messages the client had long ago come back."""
    net, key = CopiesNetwork(), ("", "c0")
    net.start(n=2)
    try:
        net.publish_acknowledged(key, 0, 1)  # m1 at n0, its copy on n1
        net.take_over(key, 0, None)  # to n1 (n0's copy node): the end of n0's copy waits for n1's acknowledgement
        net.restart(0)  # n0 is killed and starts again: it has no session to end a copy of
        net.calm(heal=True)
        net.consume(key, 1, None)  # the client at n1 had m1
        net.calm(heal=True)
        assert not any(net.nodes[n].pending() for n in net.members)
        left = net.nodes["n1"].store.load_copies("n0", key)
        assert left == [], [vmqapi.decode_forward(body)[1].payload for *_, body in left]
    finally:
        net.close()


def test_a_message_the_client_had_does_not_come_back_from_a_copy_a_restarted_home_left():
    """The same copy left behind, the session back at that home later (n0 sends no reset for it: its copy node is
    the same): the copy of n0's session on n1 holds m1 again, and n0's removal gives it to the session."""
    net, key = CopiesNetwork(), ("", "c0")
    net.start(n=2)
    try:
        net.publish_acknowledged(key, 0, 1)  # m1 at n0, its copy on n1
        net.take_over(key, 0, None)  # to n1
        net.restart(0)  # n0 forgets the end of its copy
        net.calm(heal=True)
        net.consume(key, 1, None)  # the client at n1 had m1
        net.take_over(key, 0, None)  # back to n0 (copy node n1, as before)
        net.calm(heal=True)
        net.kill_for_good("n0")
        net.remove()  # n1 takes the session up with n0's copy
        back = [m.payload for _, m in net.messages_at_home(key)]
        assert b"m1" not in back, back
    finally:
        net.close()
