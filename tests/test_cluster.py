"""A cluster of real nodes on loopback: join, replication, routing, sessions, netsplits, leave (README, "Cluster")."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import vmqapi
from capped import capped_node
from conftest import wait_for
from mqtt_client import MqttClient

COOKIE = "cluster-test-cookie"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))




def port_of(info_or_node, kind):
    listeners = info_or_node.listeners() if hasattr(info_or_node, "listeners") else info_or_node["listeners"]
    return next(x["port"] for x in listeners if x["type"] == kind)


def api(port, path, api_key, *flags, timeout=30, **params):
    """GET /api/v1/<path>?params&flags with ``api_key``; return (status, JSON body).

    ``params``: key=value arguments (``_dash_`` in a name stands for ``-``); ``flags``: ``--flag`` or
    ``--flag=value`` items, as the API takes them.
    """
    items = [urllib.parse.urlencode({k.replace("_dash_", "-"): v}) for k, v in params.items()]
    items += [f.partition("=")[0] + ("=" + urllib.parse.quote(f.partition("=")[2]) if "=" in f else "")
              for f in flags]
    query = "&".join(items)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/{path}" + (f"?{query}" if query else ""),
                                     headers={"Authorization": "Basic " + base64.b64encode(f"{api_key}:".encode())
                                              .decode()})
    try:
        with OPENER.open(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def text_of(body):
    """The texts of a command's answer (Done, an alert's words)."""
    out = []
    for element in body if isinstance(body, list) else [body]:
        if isinstance(element, dict):
            out += [element.get("text", "")] + [t.get("text", "") for t in element.get("alert", [])]
    return " ".join(x for x in out if x)


def table_of(body):
    return next((e["table"] for e in (body if isinstance(body, list) else [body])
                 if isinstance(e, dict) and "table" in e), [])


def cluster_settings(name, **extra):
    values = {"nodename": f"{name}@127.0.0.1", "listener.vmq.clustering": "127.0.0.1:0",
              "distributed_cookie": COOKIE, "cluster_sync_interval": "100"}  # housekeeping (key sync, rows) 10 times a second
    values.update(extra)
    return values


class Member:
    """An in-process node of a test cluster, with a mgmt key and its ports."""

    def __init__(self, node):
        self.node = node
        self.name = node.name
        self.key = node.keystore.create("mgmt")
        self.http, self.mqtt, self.vmq = (port_of(node, k) for k in ("http", "mqtt", "vmq"))

    def api(self, path, *flags, **params):
        return api(self.http, path, self.key, *flags, **params)

    def join(self, other):
        return self.api("cluster/join", discovery_dash_node=f"{other.name}:{other.vmq}")

    def running(self):
        status, body = self.api("cluster/show")
        return {row["Node"]: row["Running"] for row in table_of(body)}

    def client(self, client_id, version=4, clean=True, **kwargs):
        c = MqttClient(self.mqtt, version=version)
        c.connect(client_id, clean=clean, **kwargs)
        return c


@pytest.fixture
def make_cluster(make_node):
    """Start ``n`` in-process nodes and join them into one cluster."""
    def make(n=3, **extra):
        members = [Member(make_node(**cluster_settings(f"n{i}", **extra))) for i in range(n)]
        for member in members[1:]:
            status, body = member.join(members[0])
            assert status == 200 and text_of(body) == "Done", body
        everyone = {m.name for m in members}
        for member in members:
            wait_for(lambda: member.running() == dict.fromkeys(everyone, True), what=f"{member.name} to see all")
        for member in members:  # a join is no netsplit for the nodes already in the cluster
            assert member.node.metric_samples().get(("netsplit_detected", ()), 0) == 0, member.name
        return members
    return make


def test_join_show_listener_and_keys_everywhere(make_cluster):
    a, b, c = make_cluster(3)
    assert a.running() == {"n0@127.0.0.1": True, "n1@127.0.0.1": True, "n2@127.0.0.1": True}
    _, body = b.api("listener/show")
    assert any(row["type"] == "vmq" and row["port"] == str(b.vmq) for row in table_of(body))
    assert {"type": "vmq", "address": "127.0.0.1", "port": c.vmq} in vmqapi.read_node_file(c.node.data_dir)[
        "listeners"]
    # a key made on one node counts on every node within a second or two
    wait_for(lambda: api(c.http, "cluster/show", a.key)[0] == 200, what="a's key on c")
    made = b.api("api-key/create")[1]
    new_key = text_of(made) or table_of(made)
    assert isinstance(new_key, str) and new_key
    wait_for(lambda: api(a.http, "cluster/show", new_key)[0] == 200, what="b's new key on a")
    # deleted on one, refused on all
    assert b.api("api-key/delete", key=new_key)[0] == 200
    wait_for(lambda: api(c.http, "cluster/show", new_key)[0] == 401, what="the deleted key refused on c")


def test_join_answers_why_not(make_cluster, make_node):
    a, b = make_cluster(2)
    status, body = b.join(a)
    assert "already a member" in text_of(body)
    status, body = a.api("cluster/join", discovery_dash_node="nobody@127.0.0.1:1")
    assert status == 200 and "unreachable" in text_of(body)
    stranger = Member(make_node(**cluster_settings("n9", distributed_cookie="another-cookie-entirely")))
    status, body = stranger.join(a)
    assert "cookie" in text_of(body)
    assert "n9@127.0.0.1" not in a.running()
    status, body = a.api("cluster/join", discovery_dash_node=f"wrong@127.0.0.1:{b.vmq}")
    assert "is n1@127.0.0.1" in text_of(body)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_cross_node_publish_exactly_once_in_order(make_cluster, qos):
    a, b, c = make_cluster(3)
    sub = b.client("sub")
    assert sub.subscribe((f"t/{qos}/#", qos)) == (qos,)
    other = c.client("other")
    other.subscribe(("t/#", 1), (f"t/{qos}/x", 0))  # two matching filters: still one copy per node
    wait_for(lambda: sum(isinstance(k, vmqapi.RemoteNode) for k in a.node.mqtt.engine.router.match("", f"t/{qos}/x"))
             == 2, what="b's and c's subscriptions on a")
    pub = a.client("pub")
    for n in range(50):
        pub.publish(f"t/{qos}/x", str(n).encode(), qos)
    got = [sub.message().payload for _ in range(50)]
    assert got == [str(n).encode() for n in range(50)]
    sub.no_message(0.3)
    assert [other.message().payload for _ in range(50)] == got
    other.no_message(0.3)
    assert a.node.status()["matches_remote"] == 100  # one per node per message: b and c
    samples = b.node.metric_samples()
    assert samples[("cluster_bytes_received", ())] > 0 and samples[("cluster_bytes_sent", ())] > 0
    for client in (sub, other, pub):
        client.disconnect()


def test_a_member_learned_with_other_rows_is_arriving_not_split(make_cluster):
    # A join elsewhere reaches a member as one batch of rows: the joiner's row and the row it
    # rewrote of the node it joined through. Every row of the batch is in the replica before the
    # first is applied, so the new member must count as arriving before any split check runs.
    a, b = make_cluster(2)
    cluster, newcomer, now = b.node.cluster, "n9@127.0.0.1", time.time()
    rows = [["member", a.name, {"address": f"127.0.0.1:{a.vmq}"}, now, newcomer],  # sorts before the newcomer
            ["member", newcomer, {"address": "127.0.0.1:1"}, now, newcomer]]
    cluster.in_loop(cluster._on_frame, a.name, vmqapi.FRAME_META, vmqapi.encode_term(["r", rows, False]))
    assert newcomer in cluster.in_loop(cluster.peers)
    assert b.node.metric_samples().get(("netsplit_detected", ()), 0) == 0
    # the check still counts it once its time to come up is over and no link to it exists
    def expire():
        cluster.membership.arriving[newcomer] = 0.0
        cluster.membership.check_split()
    cluster.in_loop(expire)
    assert b.node.metric_samples().get(("netsplit_detected", ()), 0) == 1
    assert newcomer in b.node.mqtt.engine.seam.netsplit
    # a later row of a member already missing (its address written again) gives it no new time
    again = [["member", newcomer, {"address": "127.0.0.1:1"}, time.time() + 1, a.name]]
    cluster.in_loop(cluster._on_frame, a.name, vmqapi.FRAME_META, vmqapi.encode_term(["r", again, False]))
    assert newcomer in b.node.mqtt.engine.seam.netsplit
    assert b.node.metric_samples().get(("netsplit_resolved", ()), 0) == 0


def test_retained_replicated_and_deleted(make_cluster):
    a, b, c = make_cluster(3)
    pub = a.client("pub")
    pub.publish("r/1", b"kept", 1, retain=True)
    wait_for(lambda: any(r.get("topic") == "r/1" for r in table_of(c.api("retain/show", "--topic", "--payload")[1])),
             what="the retained message on c")
    sub = c.client("sub")
    sub.subscribe(("r/#", 1))
    msg = sub.message()
    assert (msg.topic, msg.payload, msg.retain) == ("r/1", b"kept", True)
    pub.publish("r/1", b"", 1, retain=True)  # deleted on a: gone everywhere
    wait_for(lambda: not table_of(b.api("retain/show", "--topic")[1]), what="the delete on b")


def test_shared_subscriptions_spread_and_never_duplicated(make_cluster):
    a, b, c = make_cluster(3, shared_subscription_policy="random")
    subs = [b.client("s1"), c.client("s2")]
    for s in subs:
        assert s.subscribe(("$share/g/job", 1)) == (1,)
    wait_for(lambda: len(a.node.mqtt.engine.router.match("", "job")) >= 1, what="the group on a")
    time.sleep(0.3)
    pub = a.client("pub")
    for n in range(60):
        pub.publish("job", str(n).encode(), 1)
    got = []
    for s in subs:
        while True:
            try:
                got.append((s, s.message(timeout=1.0).payload))
            except TimeoutError:
                break
    payloads = sorted(int(p) for _, p in got)
    assert payloads == list(range(60))  # each once
    assert {s for s, _ in got} == set(subs)  # spread over both nodes


def test_local_only_policy_keeps_messages_on_the_node(make_cluster):
    a, b = make_cluster(2, shared_subscription_policy="local_only")
    remote = b.client("remote")
    remote.subscribe(("$share/g/job", 1))
    local = a.client("local")
    local.subscribe(("$share/g/job", 1))
    time.sleep(0.5)
    pub = a.client("pub")
    for n in range(10):
        pub.publish("job", str(n).encode(), 1)
    assert [local.message().payload for _ in range(10)] == [str(n).encode() for n in range(10)]
    remote.no_message(0.5)


def test_takeover_moves_a_persistent_session_and_its_queue(make_cluster):
    a, b, c = make_cluster(3)
    first = a.client("mover", clean=False)
    first.subscribe(("q/#", 1))
    first.disconnect()
    time.sleep(0.3)
    pub = c.client("pub")
    for n in range(10):
        pub.publish("q/x", str(n).encode(), 1)  # queued on a
    second = MqttClient(b.mqtt)
    ack = second.connect("mover", clean=False)
    assert ack.session_present
    got = [second.message().payload for _ in range(10)]
    assert got == [str(n).encode() for n in range(10)]
    second.no_message(0.3)
    pub.publish("q/y", b"after", 1)  # now routed to b
    assert second.message().payload == b"after"
    assert a.node.cluster.seam.session_summary("", "mover") is None
    # b no longer sends q/... to a: the session's filters moved with it
    assert not any(isinstance(k, vmqapi.RemoteNode) for k in b.node.mqtt.engine.router.match("", "q/z"))


def test_online_takeover_disconnects_the_old_connection_with_0x8e(make_cluster):
    a, b = make_cluster(2)
    old = a.client("dup", version=5)
    old.subscribe(("d", 0))
    new = b.client("dup", version=5)
    packet = old.expect(vmqapi.Disconnect, 5)
    assert packet.reason_code == 0x8E
    assert new.ping()


def test_session_show_and_disconnect_reach_every_node(make_cluster):
    a, b, c = make_cluster(3)
    client = c.client("far-away")
    status, body = a.api("session/show", "--client_id", "--node")
    rows = table_of(body)
    assert {"client_id": "far-away", "node": "n2@127.0.0.1"} in rows
    status, body = a.api("session/disconnect", client_dash_id="far-away")
    assert text_of(body) == "Done"
    assert client.closed(5)
    batch = [b.client(f"batch{n}") for n in range(3)]
    status, body = a.api("session/disconnect/batch", "--node=n1@127.0.0.1", count="2")
    assert text_of(body) == "Done"
    assert sum(c.closed(5) for c in batch[:2]) + sum(c.closed(0.5) for c in batch[2:]) == 2


def test_set_all_and_show_all(make_cluster):
    a, b, c = make_cluster(3)
    status, body = a.api("set", "--all", max_inflight_messages="7")
    assert status == 200, body
    def rows():
        return {r["node"]: r["max_inflight_messages"] for r in table_of(b.api("show/max_inflight_messages",
                                                                               "--all")[1])}
    wait_for(lambda: rows() == {m.name: 7 for m in (a, b, c)}, what="the setting on every node")
    status, body = a.api("set", "--node=n2@127.0.0.1", max_inflight_messages="9")
    wait_for(lambda: c.node.config["max_inflight_messages"] == 9, what="the setting on n2")
    assert b.node.config["max_inflight_messages"] == 7


def test_a_hostile_client_on_the_cluster_port_disturbs_nothing(make_cluster):
    a, b = make_cluster(2)
    sub = b.client("sub")
    sub.subscribe(("h", 0))
    wait_for(lambda: a.node.mqtt.engine.router.match("", "h"), what="the subscription on a")
    socks = []
    try:
        for n in range(30):
            s = socket.create_connection(("127.0.0.1", a.vmq), timeout=5)
            s.sendall(os.urandom(512) if n % 2 else b"\x00\x00")  # garbage, or a half frame left open
            socks.append(s)
        pub = a.client("pub")
        for n in range(20):
            pub.publish("h", str(n).encode(), 0)
        assert [sub.message().payload for _ in range(20)] == [str(n).encode() for n in range(20)]
        assert a.running()[b.name] is True
    finally:
        for s in socks:
            s.close()


def test_leave_a_live_node_without_and_with_kill_sessions(make_cluster):
    a, b, c = make_cluster(3)
    status, body = a.api("cluster/leave", node=c.name)
    assert text_of(body) == vmqapi.LEAVE_HINT
    wait_for(lambda: all(r["status"] != "running" for r in table_of(c.api("listener/show")[1])
                         if r["type"] == "mqtt"), what="c's MQTT listeners to stop")
    keep = b.client("keeper", clean=False)
    keep.subscribe(("k/#", 1))
    keep.disconnect()
    time.sleep(0.3)
    a.client("pub").publish("k/1", b"queued", 1)
    time.sleep(0.3)
    status, body = a.api("cluster/leave", "--kill_sessions", node=b.name)
    assert text_of(body) == "Done", body
    wait_for(lambda: b.name not in a.running(), what="b gone from a's cluster show")
    wait_for(lambda: not b.node._running, what="b to stop")
    again = MqttClient(a.mqtt)
    assert again.connect("keeper", clean=False).session_present
    assert again.message().payload == b"queued"


# -- real processes: kill -9, netsplits, restart -------------------------------

def child_settings(name):
    return [f"nodename={name}@127.0.0.1", "listener.vmq.clustering=127.0.0.1:0", f"distributed_cookie={COOKIE}",
            "cluster_sync_interval=100"]


def child_key(data_dir):
    result = vmqapi.KeyStore(os.path.join(str(data_dir), vmqapi.KEY_FILE))
    return result.create("mgmt")


def health(port):
    try:
        with OPENER.open(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_netsplit_behaviour_and_restart(tmp_path):
    with capped_node(tmp_path / "a", *child_settings("a")) as a:
        key_a = child_key(tmp_path / "a")
        with capped_node(tmp_path / "b", *child_settings("b")) as b:
            key_b = child_key(tmp_path / "b")
            status, body = api(b.port("http"), "cluster/join", key_b,
                               **{"discovery-node": f"a@127.0.0.1:{a.port('vmq')}"})
            assert text_of(body) == "Done", body
            assert health(a.port("http"))[0] == 200
            os.kill(b.pid, signal.SIGKILL)
            b.proc.wait(10)
            started = time.monotonic()
            wait_for(lambda: {r["Node"]: r["Running"] for r in
                              table_of(api(a.port("http"), "cluster/show", key_a)[1])}.get("b@127.0.0.1") is False,
                     timeout=15, what="b shown down")
            detected = time.monotonic() - started
            assert detected < 10
            status, body = health(a.port("http"))
            assert status == 503 and "b@127.0.0.1" in " ".join(body["reasons"])
            # the four allow_* settings are off: CONNECT refused (3.1.1: 3, MQTT 5: 0x88)
            c = MqttClient(a.port("mqtt"))
            assert c.connect("during-split").return_code == 3
            c5 = MqttClient(a.port("mqtt"), version=5)
            assert c5.connect("during-split5").return_code == 0x88
            api(a.port("http"), "set", key_a, allow_register_during_netsplit="on")
            c5 = MqttClient(a.port("mqtt"), version=5)
            assert c5.connect("during-split5").return_code == 0
            assert c5.subscribe(("s", 1))[0] >= 0x80  # subscribe refused
            assert c5.publish("s", b"x", 1) == 0x80  # publish not acknowledged as delivered
            api(a.port("http"), "set", key_a, allow_subscribe_during_netsplit="on",
                allow_publish_during_netsplit="on")
            assert c5.subscribe(("s", 1)) == (1,)
            assert c5.publish("s", b"x", 1) == 0
            assert c5.message().payload == b"x"
            assert a.metric("netsplit_detected") == 1
        # b comes back with the same data dir: it reconnects and resyncs by itself
        with capped_node(tmp_path / "b", *child_settings("b")) as b:
            wait_for(lambda: health(a.port("http"))[0] == 200, timeout=15, what="the cluster whole again")
            rows = {r["Node"]: r["Running"] for r in table_of(api(a.port("http"), "cluster/show", key_a)[1])}
            assert rows == {"a@127.0.0.1": True, "b@127.0.0.1": True}
            assert a.metric("netsplit_resolved") == 1
            # the key made on b before the kill counts on a (and a's on b)
            assert api(b.port("http"), "cluster/show", key_a)[0] == 200
            assert api(a.port("http"), "cluster/show", key_b)[0] == 200
            # leave of a node that is down: removed, and reported Done
        os.kill(b.pid, signal.SIGKILL) if b.alive() else None
        wait_for(lambda: health(a.port("http"))[0] == 503, timeout=15, what="b down again")
        status, body = api(a.port("http"), "cluster/leave", key_a, node="b@127.0.0.1")
        assert text_of(body) == "Done"
        assert health(a.port("http"))[0] == 200
        assert [r["Node"] for r in table_of(api(a.port("http"), "cluster/show", key_a)[1])] == ["a@127.0.0.1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shown(node, key):
    return {r["Node"]: r["Running"] for r in table_of(api(node.port("http"), "cluster/show", key)[1])}


def flows(publisher, topic, subscriber, tag):
    """Publish to ``topic`` until ``subscriber`` has a copy (routes spread within a second or two);
    ``tag`` marks this round's messages, so that a late one of an earlier round does not count."""
    for n in range(40):
        publisher.publish(topic, f"{tag} {n}".encode(), 1)
        with contextlib.suppress(TimeoutError):
            while True:
                if subscriber.message(timeout=0.25).payload.startswith(f"{tag} ".encode()):
                    return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("address", ["same", "new"])
@pytest.mark.parametrize("joiner", ["removed", "member"])
def test_a_node_removed_while_down_joins_again_at_once(tmp_path, joiner, address):
    """It answered "already a member" for 2-5 s (its links, kept FORGET_DELAY after it heard of its
    removal, made the others look like its members); with a new address it came back unasked."""
    everyone = {"a@127.0.0.1": True, "b@127.0.0.1": True, "c@127.0.0.1": True}
    c_port = free_port() if address == "same" else 0
    c_settings = (*child_settings("c"), f"listener.vmq.clustering=127.0.0.1:{c_port}")
    with capped_node(tmp_path / "a", *child_settings("a")) as a, \
            capped_node(tmp_path / "b", *child_settings("b")) as b:
        key_a, key_b = child_key(tmp_path / "a"), child_key(tmp_path / "b")
        discover_a = {"discovery-node": f"a@127.0.0.1:{a.port('vmq')}"}
        assert text_of(api(b.port("http"), "cluster/join", key_b, **discover_a)[1]) == "Done"
        sub_a = MqttClient(a.port("mqtt"))
        sub_a.connect("sub-a")
        sub_a.subscribe(("to/a", 1))
        with capped_node(tmp_path / "c", *c_settings) as c:
            key_c = child_key(tmp_path / "c")
            assert text_of(api(c.port("http"), "cluster/join", key_c, **discover_a)[1]) == "Done"
            pub_c = MqttClient(c.port("mqtt"))
            pub_c.connect("pub-c")
            assert flows(pub_c, "to/a", sub_a, "before")
            time.sleep(1.5)  # c has saved sub-a's row: after its restart it knows it from its store
            os.kill(c.pid, signal.SIGKILL)
            c.proc.wait(10)
        wait_for(lambda: shown(a, key_a).get("c@127.0.0.1") is False, timeout=15, what="c shown down")
        assert text_of(api(a.port("http"), "cluster/leave", key_a, node="c@127.0.0.1")[1]) == "Done"
        with capped_node(tmp_path / "c", *c_settings) as c:
            started = time.monotonic()
            if joiner == "removed":
                body = api(c.port("http"), "cluster/join", key_c, **discover_a)[1]
            else:
                discover_c = {"discovery-node": f"c@127.0.0.1:{c.port('vmq')}"}
                body = api(a.port("http"), "cluster/join", key_a, **discover_c)[1]
            assert text_of(body) == "Done", body
            assert time.monotonic() - started < 5
            for node, key in ((a, key_a), (b, key_b), (c, key_c)):
                wait_for(lambda: shown(node, key) == everyone, timeout=15, what=f"{node.port('http')} to see all")
            sub_c, pub_a, pub_c = (MqttClient(node.port("mqtt")) for node in (c, a, c))
            sub_c.connect("sub-c")
            sub_c.subscribe(("to/c", 1))
            pub_a.connect("pub-a")
            pub_c.connect("pub-c")
            assert flows(pub_c, "to/a", sub_a, "after")  # a subscription c knew from before its removal
            assert flows(pub_a, "to/c", sub_c, "after")
            for client in (sub_c, pub_a, pub_c, sub_a):
                client.close()


NODE_LINE = re.compile(r"[a-z][0-9]@127\.0\.0\.1 \S+ listener on ")  # what a node started with & prints


@pytest.mark.slow
def test_the_readme_cluster_section_works_pasted_as_one_script(tmp_path):
    """The README's cluster lines, pasted at once: no sleep between them, so each `cluster join` runs
    while its node (and the first node, whose cookie the others name) is still starting."""
    from conftest import ROOT
    from pasted import commands, free_ports, pasted
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    lines = readme.split("\n## Cluster\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0].splitlines()
    script, expected = commands(lines, free_ports(lines), prefix="    $ python vmqapi.py ")
    assert not any("distributed_cookie=" in x for x in script)  # a cookie on a command line is in /proc/PID/cmdline
    assert sum(x.endswith(" &") for x in script) == 3 and len(script) == 6
    script += ["jobs -p > pids.new", "mv pids.new pids", "wait"]  # the nodes' pids, for the test to stop them
    with pasted(tmp_path, script) as shell:
        wait_for(lambda: (tmp_path / "pids").exists() or shell.poll() is not None, timeout=120, what="the script")
        pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
        printed = [x for x in (tmp_path / "out").read_text().splitlines() if not NODE_LINE.match(x)]
        assert printed == expected, (tmp_path / "err").read_text()
        assert len(pids) == 3
        assert os.stat(tmp_path / "n1" / vmqapi.COOKIE_FILE).st_mode & 0o777 == 0o600


def restarted(member):
    """Start ``member``'s node again on its data dir (new ports), as a new Member."""
    return Member(vmqapi.Node(member.node.config).start())


def test_a_stopped_node_takes_its_clean_sessions_out_of_routing(make_cluster):
    a, b = make_cluster(2)
    sub = b.client("clean-sub")  # kept: a client dropped here would close its socket at once
    sub.subscribe(("gone/#", 0))
    wait_for(lambda: a.node.mqtt.engine.router.match("", "gone/x"), what="the subscription on a")
    b.node.stop()
    wait_for(lambda: not a.node.mqtt.engine.router.match("", "gone/x"), what="b's clean session gone from a")
    sub.close()


def test_a_key_deleted_while_a_node_is_down_stays_deleted(make_cluster):
    a, b = make_cluster(2)
    made = a.node.keystore.create("mgmt")
    wait_for(lambda: api(b.http, "cluster/show", made)[0] == 200, what="the key on b")
    time.sleep(0.5)  # b's key sync has recorded it as agreed (five rounds of cluster_sync_interval)
    b.node.stop()
    a.node.keystore.delete(made, "mgmt")
    wait_for(lambda: api(a.http, "cluster/show", made)[0] == 401, what="the key refused on a")
    b2 = restarted(b)
    try:
        wait_for(lambda: b2.running().get(a.name) is True, what="b back in the cluster")
        time.sleep(0.5)  # a few key sync rounds on both (five)
        assert api(b2.http, "cluster/show", made)[0] == 401
        assert api(a.http, "cluster/show", made)[0] == 401
    finally:
        b2.node.stop()


def test_a_key_file_swapped_for_a_fifo_costs_one_line_not_a_traceback_a_second(make_cluster, caplog):
    """The refusal escaped the key sync into the cluster's housekeeping: a traceback every second."""
    a, b = make_cluster(2)
    caplog.set_level(logging.WARNING, logger="vmqapi")
    path = a.node.keystore.path
    os.replace(path, path + ".kept")
    os.mkfifo(path, 0o600)
    try:
        time.sleep(0.5)  # five housekeeping rounds (cluster_sync_interval)
        assert api(a.http, "cluster/show", a.key)[0] == 500
    finally:
        os.replace(path + ".kept", path)
    assert not [r for r in caplog.records if r.exc_info], "a traceback"
    assert [r.levelno for r in caplog.records if path in r.getMessage()] == [logging.ERROR]  # said once
    assert a.api("cluster/show")[0] == 200
    made = a.node.keystore.create("mgmt")  # and the key sync works again
    wait_for(lambda: api(b.http, "cluster/show", made)[0] == 200, what="a's new key on b")


def test_a_node_that_left_stays_out_after_a_restart(make_cluster):
    a, b, c = make_cluster(3)
    status, body = a.api("cluster/leave", "--kill_sessions", node=c.name)
    assert text_of(body) == "Done", body
    wait_for(lambda: not c.node._running, what="c to stop")
    c2 = restarted(c)
    try:
        time.sleep(2)
        assert c2.running() == {c.name: True}
        assert set(a.running()) == {a.name, b.name} and set(b.running()) == {a.name, b.name}
    finally:
        c2.node.stop()


def test_the_cluster_store_purges_old_tombstones_only(tmp_path):
    store = vmqapi.ClusterStore(str(tmp_path / "cluster.db"))
    try:
        store.save([vmqapi.Update("member", "old-gone", None, (100.0, "a")),
                    vmqapi.Update("member", "new-gone", None, (300.0, "a")),
                    vmqapi.Update("member", "old-live", {"address": "127.0.0.1:1"}, (100.0, "a"))])
        store.purge(200.0)
        assert sorted(u.key for u in store.load()) == ["new-gone", "old-live"]
    finally:
        store.close()


# -- the cookie and node names ------------------------------------------------------------

def default_settings(name, **extra):
    """A cluster node as a user who sets no cookie starts it."""
    return {"nodename": f"{name}@127.0.0.1", "listener.vmq.clustering": "127.0.0.1:0", **extra}


def cookie_of(node):
    path = os.path.join(node.data_dir, vmqapi.COOKIE_FILE)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with open(path) as fh:
        return fh.read().strip()


def test_a_node_with_default_settings_cannot_join_another(make_node, monkeypatch):
    monkeypatch.delenv(vmqapi.COOKIE_ENV, raising=False)
    a, b = (Member(make_node(**default_settings(n))) for n in ("d0", "d1"))
    status, body = b.join(a)
    assert status == 200 and text_of(body) != "Done" and "wrong cookie" in text_of(body), body
    assert b.name not in a.running()
    assert len(cookie_of(a.node)) >= 32 and cookie_of(a.node) != cookie_of(b.node)


def test_the_made_cookie_is_kept_across_a_restart_and_shared_by_its_file(make_node, monkeypatch):
    monkeypatch.delenv(vmqapi.COOKIE_ENV, raising=False)
    a = Member(make_node(**default_settings("k0")))
    made = cookie_of(a.node)
    a.node.stop()
    a = Member(vmqapi.Node(a.node.config).start())
    try:
        assert cookie_of(a.node) == made
        shared = os.path.join(os.path.dirname(a.node.data_dir), "copy-of-the-cookie")
        with open(os.open(shared, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fh.write(made + "\n")
        b = Member(make_node(**default_settings("k1", distributed_cookie_file=shared)))
        status, body = b.join(a)
        assert text_of(body) == "Done", body
        for member in (a, b):  # the cookie is never shown, wherever it came from
            for path, params in (("cluster/show", {}), ("show", {"distributed_cookie": ""}),
                                 ("show", {"distributed_cookie_file": ""})):
                assert made not in json.dumps(member.api(path, **params)[1])
    finally:
        a.node.stop()


def test_a_cookie_from_the_environment_joins(make_node, monkeypatch):
    monkeypatch.setenv(vmqapi.COOKIE_ENV, "from-the-environment")
    a, b = (Member(make_node(**default_settings(n))) for n in ("e0", "e1"))
    status, body = b.join(a)
    assert text_of(body) == "Done", body
    assert not os.path.exists(os.path.join(a.node.data_dir, vmqapi.COOKIE_FILE))  # none made
    assert "from-the-environment" not in json.dumps(a.api("show", distributed_cookie="")[1])


def test_vmq_is_refused_as_a_cookie_wherever_it_is_given(tmp_path, monkeypatch):
    hint = "distributed_cookie_file"
    with pytest.raises(vmqapi.ConfigError, match=hint):  # --set
        vmqapi.Config.from_sources(None, ["distributed_cookie=vmq"])
    conf = tmp_path / "vmqapi.conf"
    conf.write_text('distributed_cookie = "vmq"\n')
    with pytest.raises(vmqapi.ConfigError, match=hint):  # the config file
        vmqapi.Config.from_sources(str(conf))
    with pytest.raises(vmqapi.InvalidValue, match=hint):  # embedding
        vmqapi.Node({"distributed_cookie": "vmq"})
    named = tmp_path / "cookie-file"
    named.write_text("vmq\n")
    named.chmod(0o600)
    data = str(tmp_path / "d")
    os.makedirs(data)
    with pytest.raises(vmqapi.ConfigError, match=hint):  # a file named by distributed_cookie_file
        vmqapi.load_cookie(vmqapi.Config({"distributed_cookie_file": str(named)}), data, {})
    with pytest.raises(vmqapi.ConfigError, match=hint):  # the environment
        vmqapi.load_cookie(vmqapi.Config({}), data, {vmqapi.COOKIE_ENV: "vmq"})
    (tmp_path / "d" / vmqapi.COOKIE_FILE).write_text("vmq\n")
    (tmp_path / "d" / vmqapi.COOKIE_FILE).chmod(0o600)
    with pytest.raises(vmqapi.ConfigError, match=hint):  # the data dir's file
        vmqapi.load_cookie(vmqapi.Config({}), data, {})


@pytest.mark.parametrize("text", ["", '""', "   ", "short-cookie", '"short-cookie"'])
def test_an_empty_or_short_cookie_is_refused_wherever_it_is_given(tmp_path, text):
    """An environment cookie of '""' became an empty HMAC key, as well known as vmq; a short one is guessed."""
    data = tmp_path / "d"
    data.mkdir()
    named = tmp_path / "cookie-file"
    named.write_text(text + "\n")
    named.chmod(0o600)
    (data / vmqapi.COOKIE_FILE).write_text(text + "\n")
    (data / vmqapi.COOKIE_FILE).chmod(0o600)
    sources = [({"distributed_cookie_file": str(named)}, {}), ({}, {vmqapi.COOKIE_ENV: text}), ({}, {})]
    if text.strip() not in ("", '""'):  # an empty distributed_cookie is none given: the sources above are read
        sources.append(({"distributed_cookie": text}, {}))
        with pytest.raises(vmqapi.ConfigError, match="fewer than 16"):
            vmqapi.Config.from_sources(None, [f"distributed_cookie={text}"])
    for values, env in sources:
        with pytest.raises((vmqapi.ConfigError, vmqapi.InvalidValue)) as refused:
            vmqapi.load_cookie(vmqapi.Config(values), str(data), env)
        line = str(refused.value)
        assert "\n" not in line and ("is empty" in line or "fewer than 16" in line), line
        assert "distributed_cookie_file" in line, line  # how to set one
    assert vmqapi.load_cookie(vmqapi.Config({}), str(data), {vmqapi.COOKIE_ENV: "x" * 16})[0] == "x" * 16


def test_a_cookie_file_that_a_starting_node_makes_is_waited_for(tmp_path, caplog):
    """The README's cluster lines start n1, n2, n3 at once; n2 and n3 name n1/cookie, which n1 makes in its start."""
    first = tmp_path / "n1"
    first.mkdir(mode=0o700)
    vmqapi.mark_start(str(first))  # this process: a start under way on n1
    named = first / vmqapi.COOKIE_FILE
    named.touch(0o600)  # made but not yet written: never read as an empty cookie
    secret = "a-cookie-made-a-moment-later"
    maker = threading.Timer(0.3, named.write_text, args=(secret + "\n",))
    maker.start()
    try:
        with caplog.at_level(logging.INFO, logger="vmqapi"):
            cookie, _ = vmqapi.load_cookie(vmqapi.Config({"distributed_cookie_file": str(named)}), str(tmp_path), {})
    finally:
        maker.join()
        vmqapi.unmark_start(str(first))
    assert cookie == secret and "waiting for the cookie file" in caplog.text
    assert not (first / vmqapi.START_FILE).exists()
    started = time.monotonic()  # no node starts on n3: its cookie is missing, after a short look
    with pytest.raises(vmqapi.ConfigError, match="cannot read the cookie file"):
        vmqapi.load_cookie(vmqapi.Config({"distributed_cookie_file": str(tmp_path / "n3" / vmqapi.COOKIE_FILE)}),
                           str(tmp_path), {})
    assert vmqapi.NODE_START_GRACE <= time.monotonic() - started < vmqapi.NODE_START_WAIT


def test_a_cookie_file_must_be_small_regular_and_private(tmp_path):
    data = str(tmp_path)
    loose = tmp_path / "loose"
    secret = "s3cret-of-the-file"
    loose.write_text(secret + "\n")
    loose.chmod(0o644)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    for path, why in ((loose, "chmod 600"), (fifo, "regular file"), ("/dev/zero", "regular file"),
                      (tmp_path / "missing", "cannot read")):
        started = time.monotonic()
        with pytest.raises(vmqapi.ConfigError, match=why):
            vmqapi.load_cookie(vmqapi.Config({"distributed_cookie_file": str(path)}), data, {})
        assert time.monotonic() - started < 1  # a FIFO never holds the start
    loose.chmod(0o600)
    assert vmqapi.load_cookie(vmqapi.Config({"distributed_cookie_file": str(loose)}), data, {})[0] == secret
    # the order: distributed_cookie, its file, the environment, the data dir's file
    env = {vmqapi.COOKIE_ENV: "cookie-of-the-environment"}
    given = vmqapi.Config({"distributed_cookie": "cookie-of-the-config"})
    assert vmqapi.load_cookie(given, data, env)[0] == "cookie-of-the-config"
    assert vmqapi.load_cookie(vmqapi.Config({"distributed_cookie_file": str(loose)}), data, env)[0] == secret
    assert vmqapi.load_cookie(vmqapi.Config({}), data, env)[0] == "cookie-of-the-environment"
    assert not os.path.exists(tmp_path / vmqapi.COOKIE_FILE)


@pytest.mark.parametrize("bad", ["a@b\x00", "a@b%00", "a@b\r", "a@b\r\n:44053", "a\x01@127.0.0.1", "a@b c",
                                 "a@[::1\x00]:44053", "a@" + "b" * 64, "a@" + "b." * 130 + "c", "a@b\u2028"])
def test_a_node_name_with_control_characters_is_a_bad_value(make_cluster, caplog, bad):
    a, b = make_cluster(2)
    bad = urllib.parse.unquote(bad)
    for path, params in (("cluster/join", {"discovery_dash_node": bad}), ("cluster/leave", {"node": bad})):
        status, body = a.api(path, **params)
        assert status == 400 and body["error"] == "invalid_value", body
        assert "node name" in body["text"] and "name@host" in body["text"]
    name = bad.partition(":44053")[0]
    if name.strip() == name:  # a config value loses its surrounding spaces first
        with pytest.raises(vmqapi.InvalidValue, match="name@host"):
            vmqapi.Config({"nodename": name})
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= 40]
    assert a.running() == {a.name: True, b.name: True}


def test_good_node_names_pass():
    for name in ("vmqapi@127.0.0.1", "VerneMQ@10.0.0.2", "n1@host.example.com", "a.b-c_d+e@h", "n@::1",
                 "x@" + "h" * 63):
        assert vmqapi.parse_node_name(name) == name
    assert vmqapi.parse_discovery_node("n@[::1]:44054") == ("n@::1", "::1", 44054)


def test_the_status_page_says_what_health_says_when_a_member_is_down(make_cluster):
    """The status page's badge said "healthy" while /health answered 503 for a member that was down: the page
    reads the same reasons /health gives, from /status/details.json."""
    a, b = make_cluster(2)
    b.node.stop()

    def details():
        with OPENER.open(f"http://127.0.0.1:{a.http}/status/details.json", timeout=10) as answer:
            return json.loads(answer.read())

    wait_for(lambda: details()["health"], what="the page to hear of the split")
    reasons = details()["health"]
    try:
        OPENER.open(f"http://127.0.0.1:{a.http}/health", timeout=10)
        raise AssertionError("/health answered 200 with a member down")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503 and json.loads(exc.read())["reasons"] == reasons
    assert any("cluster" in r and b.name in r for r in reasons), reasons


def test_past_the_unacknowledged_bound_qos_1_is_refused_and_nothing_acknowledged_is_lost(make_cluster):
    """With b down and publishing allowed during the netsplit, a keeps what it acknowledged for b's
    subscriber until b has committed it; past cluster_max_unacknowledged_bytes it refuses (0x97)
    instead of dropping, and once b is back every acknowledged message arrives, in order."""
    a, b = make_cluster(2, allow_publish_during_netsplit="on", cluster_max_unacknowledged_bytes="65536")
    sub = b.client("keeper", clean=False)
    assert sub.subscribe(("kept/#", 1)) == (1,)
    sub.disconnect()
    wait_for(lambda: a.node.mqtt.engine.router.match("", "kept/x"), what="b's subscription on a")
    pub = a.client("pub", version=5)  # before the netsplit: CONNECTs are refused during one
    b.node.stop()
    wait_for(lambda: a.running().get(b.name) is False, what="a to see b down")
    answers = [pub.publish("kept/x", f"{n:03d}".encode() + bytes(10_000), 1) for n in range(20)]
    acked = [n for n, reason in enumerate(answers) if reason == 0]
    assert acked == list(range(len(acked))) and 5 <= len(acked) <= 8, answers  # 64 KB of 10 KB messages
    assert set(answers[len(acked):]) == {0x97}
    assert pub.publish("elsewhere/x", b"nobody wants it", 1) == 0x10  # other topics go on (no subscribers)
    key = base64.b64encode(f"{a.node.keystore.create('httppub')}:".encode()).decode()
    request = urllib.request.Request(f"http://127.0.0.1:{a.http}/restmqtt/api/v1/publish?topic=kept/x&qos=1",
                                     data=b"over http", headers={"Authorization": f"Basic {key}"})
    with pytest.raises(urllib.error.HTTPError) as refused:  # HTTP publish is refused the same way
        OPENER.open(request, timeout=10)
    assert refused.value.code == 503 and b"cluster_max_unacknowledged_bytes" in refused.value.read()
    back = restarted(b)
    try:  # until b's link to a is up, b is in a netsplit of its own and refuses CONNECT (return code 3)
        wait_for(lambda: back.running().get(a.name) is True, what="b to see a again")
        sub = back.client("keeper", clean=False)
        got = [sub.message().payload[:3] for _ in acked]
        assert got == [f"{n:03d}".encode() for n in acked]
        wait_for(lambda: pub.publish("kept/x", b"again", 1) == 0, what="a to take QoS 1 for b again")
        assert sub.message().payload == b"again"
        for client in (sub, pub):
            client.disconnect()
    finally:
        back.node.stop()
