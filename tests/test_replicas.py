"""queue_replicas = 2: persistent sessions kept on two nodes, taken up elsewhere when their node dies for good.

Real node processes (the harness of ``test_faults.py``): a publisher counts an id once its PUBACK
is read, persistent subscribers record what they receive, a node is killed with ``kill -9`` and
never started again, ``cluster leave node=<it>`` removes it, and the subscriber connects to a
node still alive. The checker: every acknowledged id arrived (0 lost), first arrivals in order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest

from conftest import ROOT, wait_for
from mqtt_client import MqttClient
from pasted import commands, free_ports, pasted
from test_cluster import NODE_LINE
from test_faults import CASE_DEADLINE, PROBE, Cluster, Publisher, Subscriber, check, connect, drain, probe

REPLICAS = ("queue_replicas=2",)


def session_rows(node, client_id):
    """session show --client_id=<it> --node --copy_node, as a JSON table (None while empty)."""
    flags = {"--client_id": client_id, "--node": None, "--copy_node": None}
    return node.api("session/show", **flags).get("table") or None


@contextlib.contextmanager
def streaming(cluster):
    """Start ``cluster``; yield a list for the publishers and subscribers made; stop them all, then the nodes."""
    parties = []
    try:
        cluster.start()
        yield parties
    finally:
        for party in parties:
            party.stop()
        cluster.stop()


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
    with streaming(cluster) as parties:
        a, b = cluster["a"], cluster["b"]
        subscriber = Subscriber("replica-sub").subscribe(a)
        parties.append(subscriber)
        probe(b, [subscriber])
        subscriber.offline()
        publisher = Publisher(b, "replica-pub").start()
        parties.append(publisher)
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


@pytest.mark.slow
def test_a_subscriber_whose_node_dies_mid_stream_resumes_on_a_third(tmp_path):
    """Three nodes: the publisher on b, the subscriber online on a; a is killed mid-stream and removed;
    the subscriber resumes on c and misses nothing that was acknowledged."""
    cluster = Cluster(str(tmp_path), REPLICAS)
    with streaming(cluster) as parties:
        a, b, c = cluster["a"], cluster["b"], cluster["c"]
        subscriber = Subscriber("replica-sub").subscribe(a)
        parties.append(subscriber)
        probe(b, [subscriber])
        publisher = Publisher(b, "replica-pub").start()
        parties.append(publisher)
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
        rows = session_rows(b, "replica-sub")  # kept on two nodes again: the two alive
        assert [(r["node"], r["copy_node"]) for r in rows] == [(c.name, b.name)]


@pytest.mark.slow
def test_the_readme_gateway_pair_works_as_printed(tmp_path):
    """The README's gateway pair, pasted as one script on free ports; between the join and the kill the
    test's own clients make the session on g1 and publish 100 acknowledged messages on g2."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    lines = readme.split("\n### A gateway pair", 1)[1].split("\n## ", 1)[0].splitlines()
    ports = free_ports(lines)
    found, expected = commands(lines, ports)
    script = ["set -m"]  # job control: %1 is the first node
    for command in found:
        if command.startswith("kill"):  # the clients' part, then the pids for the test to stop them
            script += ["jobs -p > pids.new", "mv pids.new pids", "while [ ! -e go ]; do sleep 0.05; done"]
        script.append(command)
    assert len(script) == 10 and script[-3].startswith("kill -9 %1")
    script += ["touch done", "wait"]
    mqtt = {name: ports[port] for name, port in (("g1", 1883), ("g2", 1884))}
    clients = []
    with pasted(tmp_path, script) as shell:
        try:
            wait_for(lambda: (tmp_path / "pids").exists() or shell.poll() is not None, timeout=60, what="the join")
            assert len((tmp_path / "pids").read_text().split()) == 2, (tmp_path / "err").read_text()
            sink = MqttClient(mqtt["g1"])
            clients.append(sink)
            sink.connect("sink", clean=False)
            assert sink.subscribe(("plant/#", 1)) == (1,)
            device = MqttClient(mqtt["g2"])
            clients.append(device)
            device.connect("device")
            wait_for(lambda: seen_on(device, sink), CASE_DEADLINE, "the subscription on g2")
            sink.disconnect()
            for n in range(100):
                device.publish("plant/line-1", str(n).encode(), 1)  # returns once its PUBACK is read
            device.disconnect()
            (tmp_path / "go").touch()
            wait_for(lambda: (tmp_path / "done").exists() or shell.poll() is not None, timeout=60, what="the script")
            printed = [x for x in (tmp_path / "out").read_text().splitlines() if not NODE_LINE.match(x)]
            assert printed == expected, (tmp_path / "err").read_text()
            again = MqttClient(mqtt["g2"])
            clients.append(again)
            assert again.connect("sink", clean=False).session_present
            got = []
            while len(got) < 100:
                payload = again.message(timeout=10).payload
                if payload != PROBE:
                    got.append(int(payload))
            assert got == list(range(100))
        finally:
            for client in clients:
                client.close()


def seen_on(device, sink):
    """Publish a QoS 0 probe on the device's node; True once the sink has it (its subscription is there)."""
    device.publish("plant/probe", PROBE, 0)
    try:
        return sink.message(timeout=0.2).payload == PROBE
    except TimeoutError:
        return False


# -- in-process nodes: removal by itself, and what cluster show and /health say ------------------

from test_cluster import health, make_cluster  # noqa: E402,F401  (make_cluster is a fixture)


def test_a_node_down_past_cluster_remove_down_after_is_removed_and_its_sessions_go_on(make_cluster):
    """b holds a persistent session with 20 acknowledged messages; b stops; a removes it after 1 s by itself
    and the client finds its session, with the 20, on a. a says it keeps that session alone."""
    a, b = make_cluster(2, queue_replicas="2", cluster_remove_down_after="1")
    keeper = b.client("keeper", clean=False)
    assert keeper.subscribe(("auto/#", 1)) == (1,)
    device = a.client("device")
    wait_for(lambda: a.node.mqtt.engine.router.match("", "auto/x"), what="keeper's subscription on a")
    keeper.disconnect()
    for n in range(20):
        assert device.publish("auto/x", str(n).encode(), 1) == 0
    status, body = b.api("session/show", "--client_id=keeper", "--node", "--copy_node")
    assert [(r["node"], r["copy_node"]) for r in body["table"]] == [(b.name, a.name)]
    assert health(a.http) == (200, {"status": "OK"})
    b.node.stop()
    wait_for(lambda: list(a.running()) == [a.name], timeout=15, what="b removed by a")
    status, body = a.api("cluster/show")
    assert body["table"] == [{"Node": a.name, "Running": True, "Sessions on one copy": 1}]
    status, answer = health(a.http)
    assert status == 200 and answer["status"] == "OK" and "kept on this node only" in answer["warnings"][0]
    again = a.client("keeper", clean=False)
    got = [again.message(timeout=5).payload for _ in range(20)]
    assert got == [str(n).encode() for n in range(20)]
    for client in (again, device):
        client.close()


def test_two_nodes_copying_to_each_other_never_wait_for_each_other(make_cluster):
    """A persistent session on each node of a pair, and a publisher on each node: every message goes into
    both sessions, so each node copies to the other while the other copies to it. Every PUBACK comes
    (acknowledgements of copies once waited behind acknowledgements that waited for the other's copies)."""
    a, b = make_cluster(2, queue_replicas="2")
    sinks = [a.client("sink-a", clean=False), b.client("sink-b", clean=False)]
    for sink in sinks:
        assert sink.subscribe(("both/#", 1)) == (1,)
    for node in (a, b):
        wait_for(lambda: len(node.node.mqtt.engine.router.match("", "both/x")) == 2, what="both sessions routed")
    errors = []

    def publish(member, name):
        client = member.client(name)
        try:
            for n in range(150):
                assert client.publish("both/x", f"{name} {n}".encode(), 1) == 0
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {exc!r}")
        finally:
            client.close()
    threads = [threading.Thread(target=publish, args=(m, f"pub-{m.name[:2]}")) for m in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    for sink in sinks:
        got = {sink.message(timeout=10).payload for _ in range(300)}
        assert len(got) == 300
        sink.close()
