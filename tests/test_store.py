"""The message store under hostile conditions: byte limits, lazy restart, full disk, corruption, file modes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capped import capped_node, child_setup
from conftest import ROOT, engine_output, node_config, run_cli
from mqtt_client import MqttClient
from test_broker import client_maker
import vmqapi

MB = 1 << 20


# -- a node in a child Python -------------------------------------------------
@contextlib.contextmanager
def child_node(data_dir, *sets, cap=None, umask=None, env=None):
    """Run ``vmqapi.py`` in a child Python; yield (process, node.json); stop it at the end."""
    with capped_node(data_dir, *sets, cap=cap, umask=umask, env=env, timeout=20) as node:
        yield node.proc, node.info


def port_of(info, kind="mqtt"):
    return next(x["port"] for x in info["listeners"] if x["type"] == kind)


def rss(pid) -> int:
    """Return a process's resident set size in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def round_trip(port, timeout=10.0):
    """Return how long a PINGREQ takes to be answered by a fresh control client."""
    c = MqttClient(port, timeout=timeout)
    try:
        c.connect("control")
        started = time.monotonic()
        c.ping()
        return time.monotonic() - started
    finally:
        c.close()


def new_client(port, client_id, clean=True, version=4, timeout=10.0):
    c = MqttClient(port, timeout=timeout, version=version)
    ack = c.connect(client_id, clean)
    assert ack.return_code == 0, ack
    return c


def metric(port, name):
    """Read one counter from /metrics (noauth)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f"vernemq_{name}{{") or line.startswith(f"vernemq_{name} "))


# -- 3. queues in bytes ---------------------------------------------------------
@pytest.mark.slow
def test_a_subscriber_that_never_reads_holds_at_most_max_online_bytes(tmp_path):
    """60 MB queued at QoS 1 to a subscriber that never reads: the node keeps 20 MB of it, drops the rest."""
    with child_node(tmp_path / "d", "max_online_bytes=20000000", "max_inflight_messages=2", cap=700 * MB) as (
            proc, info):
        port = port_of(info)
        sub = new_client(port, "sink")
        sub.subscribe(("big/#", 1))
        sub.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never reads again
        pub = new_client(port, "pub")
        time.sleep(0.3)
        before = rss(proc.pid)
        payload = b"x" * MB
        for n in range(60):
            pub.publish(f"big/{n}", payload, 1)
        assert round_trip(port) < 2
        grown = rss(proc.pid) - before
        assert grown < 40 * MB, f"the node grew by {grown / MB:.0f} MB for a 20 MB queue"
        assert metric(port_of(info, "http"), "queue_message_drop") >= 30
        sub.close()
        pub.close()


def test_offline_queue_and_all_queues_are_bounded_in_bytes(make_node):
    node = make_node(max_offline_bytes="2500", max_queued_bytes="4000")
    with client_maker(node) as connect:
        for name in ("a", "b"):
            c = connect(name, clean=False)
            c.subscribe(("q", 1))
            c.disconnect()
        pub = connect("pub")
        for n in range(4):
            pub.publish("q", b"%d" % n + b"." * 999, 1)  # 1000 bytes of payload, 1 of topic
    rows = {r["client_id"]: r["offline_messages"] for r in node.session_records(subscriptions=False, messages=False)}
    # a: 2 (a third passes 2500 bytes); b: 1 (a second passes 4000 bytes for all queues together)
    assert (rows["a"], rows["b"]) == (2, 1), rows
    assert node.metrics.value("queue_message_drop") == 5
    assert node.mqtt.engine.queued_bytes == 3 * 1001


@pytest.mark.slow
def test_a_restart_reads_stored_queues_lazily(tmp_path):
    """150 MB queued on disk for offline sessions; the node restarts under a cap the whole queue would pass."""
    data = tmp_path / "d"
    payload = b"y" * MB
    sets = ("max_offline_bytes=-1", "max_queued_bytes=-1", "max_offline_messages=-1")
    with child_node(data, *sets) as (proc, info):
        port = port_of(info)
        for name in ("s1", "s2", "s3"):
            c = new_client(port, name, clean=False)
            c.subscribe(("big/#", 1))
            c.disconnect()
        pub = new_client(port, "pub")
        for n in range(50):
            pub.publish(f"big/{n}", payload, 1)
        pub.close()
    assert os.path.getsize(data / "messages.db") > 140 * MB
    # Idle, the node needs an address space of about 150 MB; reading the whole queue at start needed 225 MB.
    with child_node(data, *sets, "max_inflight_messages=4", cap=200 * MB) as (proc, info):
        port = port_of(info)
        assert rss(proc.pid) < 100 * MB
        shown = run_cli("admin", "session", "show", "--client_id", "--offline_messages", data_dir=data)
        assert shown.returncode == 0, shown.stderr
        rows = [line.replace(" ", "") for line in shown.stdout.splitlines()]
        assert {"|s1|50|", "|s2|50|", "|s3|50|"} <= set(rows), shown.stdout
        back = new_client(port, "s1", clean=False)
        got = [back.message().topic for _ in range(50)]
        assert got == [f"big/{n}" for n in range(50)]
        back.no_message()
        assert rss(proc.pid) < 100 * MB  # delivered a page at a time
        back.close()


# -- 4. retained messages --------------------------------------------------------
def test_retained_messages_are_limited_in_number_and_bytes(make_node):
    node = make_node(max_retained_messages="3", max_retained_bytes="3000")
    with client_maker(node, default_version=5) as connect:
        pub = connect("pub")
        for n in range(3):
            assert pub.publish(f"r/{n}", b"v", 1, retain=True) == 0x10  # no subscribers, kept
        assert pub.publish("r/new", b"v", 1, retain=True) == 0x97  # quota exceeded
        assert pub.publish("r/new", b"v", 2, retain=True) == 0x97
        assert pub.publish("r/0", b"replaced", 1, retain=True) == 0x10  # replacing stays allowed
        assert pub.publish("r/1", b"", 1, retain=True) == 0x10  # and clearing
        assert pub.publish("r/big", b"z" * 2990, 1, retain=True) == 0x97  # past max_retained_bytes
        assert pub.publish("r/ok", b"z" * 2000, 1, retain=True) == 0x10
        sub = connect("sub")
        sub.subscribe(("r/#", 0))
        assert sorted(sub.message().topic for _ in range(3)) == ["r/0", "r/2", "r/ok"]
        sub.no_message()
    assert node.metrics.value("retain_message_refused") == 3
    assert node.mqtt.engine.router.retained_bytes == len("r/0replaced") + len("r/2v") + len("r/ok") + 2000


@pytest.mark.slow
def test_retained_flood_stays_within_max_retained_bytes(tmp_path):
    """60 MB of retained messages on distinct topics: the node keeps 20 MB."""
    with child_node(tmp_path / "d", "max_retained_bytes=20000000", "message_store=memory", cap=700 * MB) as (
            proc, info):
        port = port_of(info)
        pub = new_client(port, "pub")
        time.sleep(0.3)
        before = rss(proc.pid)
        payload = b"r" * MB
        for n in range(60):
            pub.send(vmqapi.Publish(f"keep/{n}", payload, 0, True))
        pub.ping()
        assert round_trip(port) < 2
        grown = rss(proc.pid) - before
        assert grown < 40 * MB, f"the node grew by {grown / MB:.0f} MB for 20 MB of retained messages"
        assert metric(port_of(info, "http"), "retain_message_refused") >= 30
        pub.close()


# -- 10. a store that cannot write ----------------------------------------------
@contextlib.contextmanager
def small_tmpfs(path, size="8m"):
    os.makedirs(path, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the full-disk test needs one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def fill(path):
    """Write a file until the file system is full."""
    with open(path, "wb") as fh:
        with contextlib.suppress(OSError):
            for _ in range(10_000):
                fh.write(b"\0" * 65536)
                fh.flush()
            os.fsync(fh.fileno())


def health(node):
    port = next(x["port"] for x in node.listeners() if x["type"] == "http")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def session_ids(node):
    return {r["client_id"] for r in node.session_records(subscriptions=False, messages=False)}


def publish_until_refused(c, payload, tries=300):
    """Publish QoS 1 until the node refuses (a reason >= 0x80) or closes; return what happened."""
    for n in range(tries):
        try:
            reason = c.publish(f"t/{n}", payload, 1)
        except (ConnectionError, OSError):
            return "closed"
        if reason >= 0x80:
            return reason
    return None


def test_a_full_disk_refuses_qos1_says_so_on_health_and_recovers(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with small_tmpfs(tmp_path / "fs") as fs:
        node = vmqapi.Node(node_config(fs / "data", mqtt_connect_timeout="1000"))
        node.start()
        try:
            with client_maker(node, default_version=5) as connect:
                sub = connect("sub", clean=False, properties=(("session_expiry_interval", 3600),))
                sub.subscribe(("t/#", 1))
                sub.disconnect()
                fill(fs / "filler")
                payload = b"p" * 65536
                outcome = publish_until_refused(connect("pub5"), payload)
                if outcome == "closed":  # the batch whose commit failed: its connection is closed, say so again
                    outcome = publish_until_refused(connect("pub5b"), payload)
                assert outcome == 0x80
                status, body = health(node)
                assert status == 503 and any("message store" in r for r in body["reasons"]), body
                v3 = connect("pub3", version=4)
                with pytest.raises((ConnectionError, OSError)):
                    v3.publish("t/x", b"no", 1)  # MQTT 3.1.1: no acknowledgement, the connection is closed
                os.unlink(fs / "filler")
                deadline = time.monotonic() + 10
                while health(node)[0] != 200 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert health(node)[0] == 200
                assert connect("pub5c").publish("t/again", b"ok", 1) == 0
                brief = connect("brief", clean=False, properties=(("session_expiry_interval", 1),))
                brief.disconnect()
                deadline = time.monotonic() + 10  # the housekeeping still runs: the session expires
                while session_ids(node) & {"brief"} and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert "brief" not in session_ids(node)
        finally:
            node.stop()
    assert node.metrics.value("store_error") >= 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Fatal error" not in text and not any(r.exc_info for r in caplog.records if r.name == "asyncio"), text


def test_the_tick_survives_an_error(make_node, monkeypatch):
    node = make_node()
    broker = node.mqtt.engine
    real, calls = broker.tick, []

    def failing_once(now):
        calls.append(now)
        if len(calls) == 1:
            raise vmqapi.sqlite3.OperationalError("database or disk is full")
        real(now)
    monkeypatch.setattr(broker, "tick", failing_once)
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(calls) >= 3  # ticks go on after the one that failed
    assert node.metrics.value("tick_error") == 1
    with client_maker(node, default_version=5) as connect:  # and they still do their work
        connect("brief", clean=False, properties=(("session_expiry_interval", 1),)).disconnect()
        deadline = time.monotonic() + 10
        while "brief" in session_ids(node) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert "brief" not in session_ids(node)


# -- 11. a corrupt store ------------------------------------------------------------
def make_store(path):
    store = vmqapi.SqliteStore(str(path))
    store.put_session("", "s", None)
    for n in range(400):
        store.add_message("", f"s{n % 7}", vmqapi.Message(f"t/{n}", b"m" * 300, 1, ref=n), 1)
    store.put_retained("", vmqapi.Message("r", b"kept", 0, True, 1))
    store.close()
    db = vmqapi.sqlite3.connect(str(path))
    pages = dict(db.execute("SELECT name, rootpage FROM sqlite_master WHERE name IN ('messages', "
                            "'messages_by_session')"))
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return pages, page_size


@pytest.mark.parametrize("which", ["messages", "messages_by_session"])
def test_a_corrupt_store_stops_the_node_with_one_message(tmp_path, which):
    data = tmp_path / "d"
    data.mkdir(mode=0o700)
    db = data / "messages.db"
    pages, page_size = make_store(db)
    with open(db, "r+b") as fh:
        fh.seek((pages[which] - 1) * page_size)
        fh.write(bytes(range(256)) * (page_size // 256))
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    cmd = [sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", str(data),
           "--set", "listener.tcp.default=127.0.0.1:0", "--set", "listener.http.default=127.0.0.1:0",
           "--set", "listener.vmq.clustering=127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=child_setup())
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the node started on a corrupt store") from None
    err = err.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "messages.db" in line]
    assert len(lines) == 1 and "corrupt" in lines[0] and "Move it away" in lines[0], err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


def test_a_store_another_process_holds_stops_the_node_saying_so_not_that_it_is_corrupt(tmp_path):
    """SQLite's "database is locked" (here another connection's exclusive lock) is not damage: the node
    used to call the file corrupt and tell the user to move it away, sessions and all. (After SQLite's
    5 s wait for the lock; the cluster state's case, below, does without it.)"""
    from conftest import vmqapi_command, vmqapi_env
    name = "messages.db"
    data = tmp_path / "d"
    data.mkdir(mode=0o700)
    vmqapi.SqliteStore(str(data / "messages.db")).close()
    vmqapi.ClusterStore(str(data / "cluster.db")).close()
    db = data / name
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    holder = vmqapi.sqlite3.connect(str(db), isolation_level=None, timeout=0)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        cmd = vmqapi_command("--data-dir", str(data), "--set", "listener.tcp.default=127.0.0.1:0",
                             "--set", "listener.http.default=127.0.0.1:0", "--set", "listener.vmq.clustering=127.0.0.1:0")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=vmqapi_env(),
                                preexec_fn=child_setup())
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the node did not stop on a store another process holds") from None
    finally:
        holder.close()
    err = err.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if name in line]
    assert len(lines) == 1 and "in use by another process" in lines[0], err
    assert "corrupt" not in err and "Move it away" not in err, err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("where", ["open", "load"])
def test_a_cluster_state_another_process_holds_is_in_use_not_corrupt(tmp_path, monkeypatch, where):
    import functools
    path = str(tmp_path / "cluster.db")
    vmqapi.ClusterStore(path).close()
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    opened = vmqapi.ClusterStore(path) if where == "load" else None
    if opened is not None:
        opened.db.execute("PRAGMA busy_timeout = 0")
    monkeypatch.setattr(vmqapi.sqlite3, "connect", functools.partial(vmqapi.sqlite3.connect, timeout=0))
    holder = vmqapi.sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(vmqapi.ConfigError) as caught:
            (opened.load if opened is not None else functools.partial(vmqapi.ClusterStore, path))()
    finally:
        holder.close()
        if opened is not None:
            opened.close()
    assert "in use by another process" in caught.value.text and "corrupt" not in caught.value.text
    assert "Move it away" not in caught.value.text
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest


# -- 12. file modes --------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_data_dir_and_files_are_private_whatever_the_umask(tmp_path, umask):
    data = tmp_path / "new" / "data"
    with child_node(data, umask=umask, env={"VMQAPI_API_KEYS": "k" * 32}) as (proc, info):
        c = new_client(port_of(info), "keep", clean=False)
        c.subscribe(("t", 1))
        c.publish("t", b"secret", 1, retain=True)
        c.message()
        c.close()
        time.sleep(0.2)
        assert os.stat(data).st_mode & 0o777 == 0o700
        names = sorted(os.listdir(data))
        assert {"messages.db", "messages.db-wal", "messages.db-shm", "node.json", "api_keys.json"} <= set(names)
        modes = {name: oct(os.stat(data / name).st_mode & 0o777) for name in names}
        assert all(mode == "0o600" for mode in modes.values()), modes


def test_kept_frames_and_marks_survive_a_restart_in_order(tmp_path):
    """What the cluster keeps for other nodes (KeptFrames) is written in the batch's commit."""
    path = str(tmp_path / "messages.db")
    store = vmqapi.SqliteStore(path)
    rows = [store.add_kept("n2@host", 7, seq, vmqapi.KEPT_FORWARD, f"body{seq}".encode()) for seq in (1, 2, 3)]
    store.put_mark("n3@host", 9, 41)
    assert store.commit()
    store.delete_kept(rows[:1])
    store.add_kept("n3@host", 7, 1, vmqapi.KEPT_MIGRATE, b"moved")
    store.put_mark("n3@host", 9, 42)
    store.close()
    store = vmqapi.SqliteStore(path)
    try:
        assert [(peer, epoch, seq, kind, body) for peer, epoch, seq, kind, body, _ in store.load_kept()] == [
            ("n2@host", 7, 2, vmqapi.KEPT_FORWARD, b"body2"), ("n2@host", 7, 3, vmqapi.KEPT_FORWARD, b"body3"),
            ("n3@host", 7, 1, vmqapi.KEPT_MIGRATE, b"moved")]
        assert store.load_marks() == [("n3@host", 9, 42)]
        assert store.add_kept("n2@host", 8, 1, vmqapi.KEPT_FORWARD, b"new") > max(r for *_, r in store.load_kept())
    finally:
        store.close()


# -- a new session's row waits for the next write ----------------------------------
_SESSION_OPS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["new", "put", "sub", "unsub", "delete"]), st.sampled_from("abc"),
              st.sampled_from(["t/1", "t/+", "#"])),
    st.tuples(st.sampled_from(["commit", "settle"]), st.just(""), st.just(""))), max_size=30)


def _committed(path):
    """The sessions and subscriptions another connection reads: what is committed."""
    db = vmqapi.sqlite3.connect(path)
    try:
        return ({cid for _, cid, _ in db.execute("SELECT * FROM sessions")},
                {(cid, f) for _, cid, f, _ in db.execute("SELECT * FROM subscriptions")})
    finally:
        db.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_SESSION_OPS)
def test_a_new_sessions_row_is_committed_with_the_next_write_or_at_settle(tmp_path_factory, ops):
    """A CONNECT's new session (``put_session(new=True)``) needs no commit of its own before its CONNACK,
    which says "no session present" (true again if a crash loses it): its row goes in with the next
    write, first, or at ``settle`` (every housekeeping round, and at close). Whatever was done, what is
    committed is what the engine holds but for new sessions no write has followed yet, and a
    subscription is never committed without its session."""
    path = str(tmp_path_factory.mktemp("store") / "messages.db")
    store = vmqapi.SqliteStore(path)
    sessions, subs, waiting = set(), set(), set()  # the model; waiting: new sessions no write has taken along
    try:
        for op, cid, topic in ops:
            if op == "new" and cid not in sessions:
                store.put_session("", cid, None, new=True)
                sessions.add(cid)
                waiting.add(cid)
                continue
            if op in ("commit", "settle"):
                if op == "settle":
                    store.settle()
                    waiting.clear()
                assert store.commit()
                committed_sessions, committed_subs = _committed(path)
                assert committed_subs == subs
                assert committed_sessions == sessions - waiting
                continue
            if op == "put":
                store.put_session("", cid, 60)
                sessions.add(cid)
            elif op == "sub" and cid in sessions:
                store.put_subscription("", cid, topic, 1)
                subs.add((cid, topic))
            elif op == "unsub" and cid in sessions:
                store.delete_subscription("", cid, topic)
                subs.discard((cid, topic))
            elif op == "delete":
                store.delete_session("", cid)
                sessions.discard(cid)
                subs = {(c, f) for c, f in subs if c != cid}
            else:
                continue
            waiting.clear()  # a write takes the waiting rows along, before itself
    finally:
        store.close()
    assert _committed(path) == (sessions, subs)  # close settles
    store = vmqapi.SqliteStore(path)
    try:
        _, stored_sessions, stored_subs, _ = store.load()
        assert {cid for _, cid, _ in stored_sessions} == sessions
        assert {(cid, f) for _, cid, f, _ in stored_subs} == subs
    finally:
        store.close()


def test_a_session_killed_right_after_its_suback_comes_back_with_its_subscription(tmp_path):
    """The SUBACK waits for the commit that holds the subscription and, first in it, the new session's row."""
    import signal
    data_dir = tmp_path / "data"
    with child_node(data_dir) as (proc, info):
        port = port_of(info)
        for n in range(3):
            client = MqttClient(port)
            client.connect(f"quick{n}", clean=False)
            client.subscribe((f"q/{n}", 1))
            client.close()
        proc.send_signal(signal.SIGKILL)  # before a housekeeping round can have committed anything else
        proc.wait(10)
    with child_node(data_dir) as (proc, info):
        port = port_of(info)
        pub = MqttClient(port)
        pub.connect("pub")
        for n in range(3):
            pub.publish(f"q/{n}", b"after", 1)
        pub.close()
        for n in range(3):
            back = MqttClient(port)
            assert back.connect(f"quick{n}", clean=False).session_present
            assert back.message().payload == b"after"
            back.close()


def test_a_new_session_without_writes_is_committed_by_the_next_housekeeping_round(make_node, tmp_path):
    node = make_node()
    with client_maker(node) as connect:
        connect("idle", clean=False).disconnect()
        path = str(tmp_path / "data0" / "messages.db")
        deadline = time.monotonic() + 5
        while "idle" not in _committed(path)[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "idle" in _committed(path)[0]


class _FailingDb:
    """A store's connection whose statements containing ``fail`` (or, with "COMMIT", its commit) fail once."""

    def __init__(self, db):
        self.db, self.fail = db, None

    def __getattr__(self, name):
        return getattr(self.db, name)

    def _check(self, sql):
        if self.fail is not None and self.fail in sql:
            self.fail = None
            raise vmqapi.sqlite3.OperationalError("database or disk is full")

    def execute(self, sql, *args):
        self._check(sql)
        return self.db.execute(sql, *args)

    def executemany(self, sql, rows):
        self._check(sql)
        return self.db.executemany(sql, rows)

    def commit(self):
        self._check("COMMIT")
        return self.db.commit()


@contextlib.contextmanager
def failing_store(path):
    """A SqliteStore at ``path`` whose connection fails what ``failing.fail`` names; closed at the end."""
    store = vmqapi.SqliteStore(path)
    store.db = failing = _FailingDb(store.db)
    try:
        yield store, failing
    finally:
        store.db = failing.db
        store.close()


def _stored(path):
    store = vmqapi.SqliteStore(path)
    try:
        _, sessions, subs, _ = store.load()
        return {cid for _, cid, _ in sessions}, {(cid, f) for _, cid, f, _ in subs}
    finally:
        store.close()


@pytest.mark.parametrize("fails", ["INSERT INTO messages", "COMMIT"])
def test_a_failed_transaction_puts_a_new_sessions_row_back_to_wait(tmp_path, fails):
    """Another client's write (or the commit) failing must not lose the row of a session just made:
    its next subscription would be committed without it, and dropped at the next start."""
    path = str(tmp_path / "messages.db")
    with failing_store(path) as (store, failing):
        store.put_session("", "a", None, new=True)
        failing.fail = fails
        store.add_message("", "b", vmqapi.Message("t", b"x", 1, ref=1), 1)  # takes a's row along, then fails
        store.commit()
        assert store.error is not None
        store.put_subscription("", "a", "a/#", 1)
        assert store.commit()
    assert _stored(path) == ({"a"}, {("a", "a/#")})


def test_a_subscription_whose_write_fails_is_not_acknowledged(tmp_path):
    """commit() says the batch lost what it promised, so the I/O shell sends no SUBACK (it closes the
    batch's connections, as for a QoS 1 message whose write failed)."""
    path = str(tmp_path / "messages.db")
    with failing_store(path) as (store, failing):
        failing.fail = "INSERT OR REPLACE INTO subscriptions"
        store.put_subscription("", "a", "a/#", 1)
        assert not store.commit()
        store.put_subscription("", "a", "a/#", 1)
        failing.fail = "COMMIT"
        assert not store.commit()
        store.put_subscription("", "a", "a/#", 1)
        assert store.commit()
        failing.fail = "DELETE FROM subscriptions"  # an UNSUBACK too: a restart would bring it back
        store.delete_subscription("", "a", "a/#")
        assert not store.commit()


_LISTENER = vmqapi.types.SimpleNamespace(mountpoint="", allowed_versions=(3, 4, 5), allow_anonymous_override=False)


def _engine_on(store):
    return vmqapi.Engine(lambda: vmqapi.Config({}), store, vmqapi.Hooks(), new_client_id=lambda: "anon",
                         choose=lambda pool: pool[0], now=1000.0)


def _packets(engine, conn, version):
    """What the engine left for ``conn`` (after the batch's commit), decoded."""
    assert engine.store.commit() or conn.closed
    return engine_output(engine, conn, version)


def _persistent(engine, cid, version):
    conn = engine.connection_made(None, _LISTENER, ("127.0.0.1", 1), None, 1000.0)
    props = (("session_expiry_interval", 3600),) if version == 5 else ()
    engine.handle(conn, vmqapi.Connect(cid, version, False, properties=props), 1000.0)
    engine.handle(conn, vmqapi.Subscribe(1, (("kept/#", 1),)), 1000.0)
    assert [type(p) for p in _packets(engine, conn, version)] == [vmqapi.Connack, vmqapi.Suback]
    return conn


def test_while_the_store_cannot_write_a_persistent_sessions_subscribe_is_refused_and_changes_nothing(tmp_path):
    """SUBACK 0x80 (MQTT 5: with the reason), nothing subscribed that a restart would drop, and the client
    stays connected; an UNSUBSCRIBE leaves the subscription (MQTT 5: UNSUBACK 0x80; MQTT 3.1.1, which has
    no failure code there, is closed). A clean session's subscriptions are not written: they go on."""
    with failing_store(str(tmp_path / "messages.db")) as (store, _):
        engine = _engine_on(store)
        v5, v3 = _persistent(engine, "v5", 5), _persistent(engine, "v3", 4)
        clean = engine.connection_made(None, _LISTENER, ("127.0.0.1", 1), None, 1000.0)
        engine.handle(clean, vmqapi.Connect("clean", 4, True), 1000.0)
        _packets(engine, clean, 4)
        store.error = "database or disk is full"  # what a failed write leaves until a commit succeeds
        for conn, version in ((v5, 5), (v3, 4)):
            engine.handle(conn, vmqapi.Subscribe(2, (("new/#", 1), ("kept/#", 0))), 1000.0)
            [suback] = _packets(engine, conn, version)
            assert suback.return_codes == (0x80, 0x80) and not conn.closed
            assert suback.properties == ((("reason_string", vmqapi.STORE_DOWN),) if version == 5 else ())
            assert list(conn.session.subs) == ["kept/#"] and conn.session.subs["kept/#"].qos == 1
            engine.handle(conn, vmqapi.Unsubscribe(3, ("kept/#",)), 1000.0)
            out = _packets(engine, conn, version)
            if version == 5:
                assert [p.reason_codes for p in out] == [(0x80,)] and not conn.closed
            else:
                assert conn.closed
            assert "kept/#" in conn.session.subs
        engine.handle(clean, vmqapi.Subscribe(2, (("new/#", 1),)), 1000.0)
        assert [p.return_codes for p in _packets(engine, clean, 4)] == [(1,)]
        routed = {session.client_id for session in engine.router.match("", "new/x")}
        assert routed == {"clean"}


@pytest.mark.parametrize("fails", ["INSERT OR REPLACE INTO copies", "INSERT OR REPLACE INTO retained"])
def test_a_rolled_back_transaction_never_lets_its_promises_be_acknowledged(tmp_path, fails):
    """Any write that fails rolls back the whole open transaction: a QoS 1 message written before it, and
    copies of another node's messages (acknowledged to it after the commit), must then count as lost,
    whichever statement failed. A failed copy write used to leave the message acknowledged; copies
    rolled back by another statement's failure used to be acknowledged."""
    with failing_store(str(tmp_path / "messages.db")) as (store, failing):
        if "copies" in fails:
            store.add_message("", "a", vmqapi.Message("t", b"x", 1, ref=1), 1)
        store.put_copies("home", "", "b", [(7, b"frame")])
        failing.fail = fails
        store.put_copies("home", "", "b", [(8, b"frame")])
        store.put_retained("", vmqapi.Message("r", b"kept", 0, True, 2))
        assert not store.commit()
        store.put_copies("home", "", "b", [(9, b"frame")])
        assert store.commit()


def test_a_session_deleted_while_its_row_waits_does_not_come_back(tmp_path):
    path = str(tmp_path / "messages.db")
    with failing_store(path) as (store, failing):
        store.put_session("", "a", None, new=True)
        store.put_subscription("", "z", "z", 1)  # a's row goes into this transaction...
        store.delete_session("", "a")  # ...and a ends in it
        failing.fail = "COMMIT"
        assert not store.commit()  # the transaction is rolled back: a's row must not wait again
        store.settle()
    assert "a" not in _stored(path)[0]


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
def test_every_subscription_acknowledged_before_a_kill_9_is_there_after_it(tmp_path, round_):
    """Clients make persistent sessions and subscribe, one after another on two threads, while the node
    is killed at a moment that differs per round: every client that got its SUBACK finds its session (session present)
    and its subscription (a message queued for it while it was away) on the restarted node."""
    import random
    import signal
    data_dir = tmp_path / "data"
    acked, stop = [], threading.Event()

    def subscribe_on(port, thread):
        n = 0
        while not stop.is_set() and n < 5000:
            client_id, n = f"k{thread}-{n}", n + 1
            try:
                c = MqttClient(port, timeout=2)
            except OSError:
                return  # the node is gone
            try:
                c.connect(client_id, clean=False)
                if list(c.subscribe(("k/all", 1))) == [1]:
                    acked.append(client_id)
            except (OSError, AssertionError):
                return
            finally:
                c.close()

    with child_node(data_dir) as (proc, info):
        threads = [threading.Thread(target=subscribe_on, args=(port_of(info), t)) for t in range(2)]
        for t in threads:
            t.start()
        time.sleep(random.Random(round_).uniform(0.2, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(10)
    assert len(acked) > 20, acked  # the load ran
    with child_node(data_dir) as (proc, info):
        port = port_of(info)
        pub = MqttClient(port)
        pub.connect("pub")
        pub.publish("k/all", b"after", 1)
        pub.close()
        for client_id in acked:
            back = MqttClient(port)
            assert back.connect(client_id, clean=False).session_present, client_id
            assert back.message().payload == b"after", client_id
            back.close()


def test_housekeeping_never_says_a_failed_batch_was_kept(tmp_path):
    """settle() and probe() run in the housekeeping round, perhaps between a batch's writes and its
    commit: they write into the open transaction and leave the commit, and what it says, to the batch."""
    path = str(tmp_path / "messages.db")
    with failing_store(path) as (store, failing):
        store.put_session("", "a", None, new=True)
        failing.fail = "INSERT OR REPLACE INTO subscriptions"
        store.put_subscription("", "z", "z", 1)  # fails: a's row goes back to wait
        store.probe()
        store.settle()
        assert not store.commit()  # the subscription was lost: said, once
        assert store.error is None  # the probe's commit wrote
        assert store.commit()
    assert _stored(path) == ({"a"}, set())


def test_a_waiting_row_put_back_after_a_failure_has_the_latest_expiry(tmp_path):
    path = str(tmp_path / "messages.db")
    with failing_store(path) as (store, failing):
        store.put_session("", "a", 10, new=True)
        store.put_subscription("", "a", "a/#", 1)  # a's row goes in first
        store.put_session("", "a", None)  # no limit now (MQTT 5: DISCONNECT with a new expiry)
        failing.fail = "COMMIT"
        assert not store.commit()
        store.settle()
        assert store.commit()
    store = vmqapi.SqliteStore(path)
    try:
        assert store.load()[1] == [("", "a", None)]
    finally:
        store.close()


def test_a_session_whose_delete_fails_is_not_said_gone(tmp_path):
    """A clean start answers "no session present" only once the old session's delete is committed."""
    path = str(tmp_path / "messages.db")
    with failing_store(path) as (store, failing):
        store.put_session("", "a", None)
        store.put_subscription("", "a", "a/#", 1)
        assert store.commit()
        failing.fail = "DELETE FROM sessions"
        store.delete_session("", "a")
        assert not store.commit()
        store.delete_session("", "a")
        assert store.commit()
    assert _stored(path) == (set(), set())
