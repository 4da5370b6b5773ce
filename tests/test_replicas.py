"""queue_replicas = 2: persistent sessions kept on two nodes, taken up elsewhere when their node dies for good.

Real node processes (the harness of ``test_faults.py``): a publisher counts an id once its PUBACK
is read, persistent subscribers record what they receive, a node is killed with ``kill -9`` and
never started again, ``cluster leave node=<it>`` removes it, and the subscriber connects to a
node still alive. The checker: every acknowledged id arrived (0 lost), first arrivals in order.
"""

from __future__ import annotations

import signal
import time

import pytest

from conftest import wait_for
from test_faults import (CASE_DEADLINE, TOPIC, Cluster, Publisher, Subscriber, check, connect, drain, probe)

REPLICAS = ("queue_replicas=2",)


def session_rows(node, client_id):
    """session show --client_id=<it> --node --copy_node, as a JSON table (None while empty)."""
    flags = {"--client_id": client_id, "--node": None, "--copy_node": None}
    return node.api("session/show", **flags).get("table") or None


def remove(survivor, dead):
    """``cluster leave node=<dead>`` on ``survivor`` once it sees the dead node down."""
    wait_for(lambda: not survivor.whole([dead.name]), CASE_DEADLINE, f"{survivor.name} to see {dead.name} down")
    answer = survivor.api("cluster/leave", node=dead.name)
    assert answer.get("text") == "Done", answer


@pytest.mark.slow
def test_an_offline_queue_survives_its_node_dying_for_good(tmp_path):
    """A pair: 500 acknowledged messages queued for an offline session on a; a is killed and removed;
    the client connects to b: session present, all 500, in order."""
    cluster = Cluster(str(tmp_path), REPLICAS, names="ab")
    subscriber = publisher = None
    try:
        cluster.start()
        a, b = cluster["a"], cluster["b"]
        subscriber = Subscriber("replica-sub").subscribe(a)
        probe(b, [subscriber])
        subscriber.offline()
        publisher = Publisher(b, "replica-pub").start()
        publisher.wait_acked(500)
        publisher.stop()
        rows = wait_for(lambda: session_rows(b, "replica-sub"), CASE_DEADLINE, "the session row on b")
        assert (rows[0]["node"], rows[0]["copy_node"]) == (a.name, b.name)
        a.signal(signal.SIGKILL)
        wait_for(lambda: not a.alive(), CASE_DEADLINE, "a to die")
        remove(b, a)
        client = wait_for(lambda: connect(b, "replica-sub", clean=False), CASE_DEADLINE, "the client on b")
        client.close()
        subscriber.move(b)
        drain(publisher, [subscriber])
        verdict = check(publisher.acked, subscriber.arrivals)
        assert verdict.ok, verdict
        assert len(publisher.acked) >= 500
    finally:
        for party in (publisher, subscriber):
            if party is not None:
                party.stop()
        cluster.stop()


@pytest.mark.slow
def test_a_subscriber_whose_node_dies_mid_stream_resumes_on_a_third(tmp_path):
    """Three nodes: the publisher on b, the subscriber online on a; a is killed mid-stream and removed;
    the subscriber resumes on c and misses nothing that was acknowledged."""
    cluster = Cluster(str(tmp_path), REPLICAS)
    subscriber = publisher = None
    try:
        cluster.start()
        a, b, c = cluster["a"], cluster["b"], cluster["c"]
        subscriber = Subscriber("replica-sub").subscribe(a)
        probe(b, [subscriber])
        publisher = Publisher(b, "replica-pub").start()
        publisher.wait_acked(300)
        subscriber.target = c  # where it reconnects once its connection breaks
        publisher.on_ack = lambda: a.signal(signal.SIGKILL)
        wait_for(lambda: not a.alive(), CASE_DEADLINE, "a to die")
        at_kill = len(publisher.acked)
        remove(b, a)
        wait_for(lambda: not c.whole([a.name]) or a.name not in {r["Node"] for r in c.api("cluster/show")["table"]},
                 CASE_DEADLINE, "c to hear of the removal")
        publisher.wait_acked(300)
        publisher.stop()
        drain(publisher, [subscriber])
        verdict = check(publisher.acked, subscriber.arrivals)
        assert verdict.ok, f"{verdict}; acknowledged at the kill {at_kill}; connections {subscriber.events}"
    finally:
        for party in (publisher, subscriber):
            if party is not None:
                party.stop()
        cluster.stop()
