"""The API key file: expiry, storage modes, a stateful model, crash safety, concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from conftest import ROOT, Client, basic
import vmqapi
from vmqapi import KeyRejected, KeyStore

NOW = 1_900_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


def iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# -- expiry ------------------------------------------------------------------

def test_parse_expiry_forms():
    assert vmqapi.parse_expiry("2031-01-01T00:00:00Z", NOW) == 1924992000
    future = NOW + 86400
    assert vmqapi.parse_expiry(iso(future), NOW) == int(future)
    assert vmqapi.parse_expiry(iso(future).replace("Z", "+02:00"), NOW) == int(future) - 7200
    local = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(future))
    assert vmqapi.parse_expiry(local, NOW) == int(future)
    assert vmqapi.parse_expiry(None, NOW) is None


@pytest.mark.parametrize("text", ["2020-01-01T00:00:00", "tomorrow", "2099-13-01T00:00:00", "2099-01-01"])
def test_parse_expiry_refuses(text):
    with pytest.raises(KeyRejected, match="invalid_expiry_date"):
        vmqapi.parse_expiry(text, NOW)


def test_max_expiry_days_caps_and_requires():
    with pytest.raises(KeyRejected):
        vmqapi.parse_expiry(None, NOW, max_days=10)
    with pytest.raises(KeyRejected):
        vmqapi.parse_expiry(iso(NOW + 11 * 86400), NOW, max_days=10)
    assert vmqapi.parse_expiry(iso(NOW + 9 * 86400), NOW, max_days=10)


# -- the store ---------------------------------------------------------------

def test_file_mode_and_format(tmp_path):
    store = KeyStore(str(tmp_path / "k.json"))
    key = store.create()
    assert len(key) == 32 and key.isalnum()
    assert stat.S_IMODE(os.stat(tmp_path / "k.json").st_mode) == 0o600
    doc = json.loads((tmp_path / "k.json").read_text())
    assert doc["keys"] == [{"key": key, "scope": "mgmt", "expires": None}]
    assert store.authenticate(key, ["mgmt"]) == "mgmt"
    assert store.authenticate(key, ["status"]) is None
    assert store.authenticate(key + "x", ["mgmt"]) is None


def test_hashed_storage_keeps_no_key(tmp_path):
    store = KeyStore(str(tmp_path / "k.json"), storage="hashed")
    key = store.create("status")
    text = (tmp_path / "k.json").read_text()
    assert key not in text
    assert store.rows() == [{"Key": key[:6] + "\u2026", "Scope": "status", "Expires (UTC)": "never",
                             "has expired": False}]
    assert KeyStore(str(tmp_path / "k.json")).authenticate(key, ["status"]) == "status"
    store.delete(key, "status")
    assert store.rows() == []


def test_add_refusals(tmp_path):
    store = KeyStore(str(tmp_path / "k.json"), min_length=8)
    store.add("abcdefgh")
    for key, scope, code in [("abcdefgh", "mgmt", "key_already_exists"), ("short", "mgmt", "invalid_key_length"),
                             ("abcdefgh", "nope", "invalid_scope"), ("abc:defgh", "mgmt", "invalid_key"),
                             (" abcdefgh", "mgmt", "invalid_key")]:
        with pytest.raises(KeyRejected, match=code):
            store.add(key, scope)
    store.add("abcdefgh", "metrics")  # the same key once per scope
    assert len(KeyStore(str(tmp_path / "k.json"), min_length=40).create()) == 40
    with pytest.raises(KeyRejected, match="key_not_found"):
        store.delete("zzzzzzzz")


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"keys": [{"key": "a"}]}', b'{"keys": [{"key": "a", '
                                     b'"scope": "root", "expires": null}]}', b"\xff\xfe",
                                     pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-too-deep")])
def test_corrupt_file_is_refused_and_left_alone(tmp_path, content):
    path = tmp_path / "k.json"
    path.write_bytes(content)
    store = KeyStore(str(path))
    with pytest.raises(vmqapi.KeyStoreError, match="corrupt"):
        store.load()
    with pytest.raises(vmqapi.KeyStoreError):
        store.add("abcdefgh")
    assert path.read_bytes() == content


def test_provision_is_idempotent_and_never_names_the_key(tmp_path):
    store = KeyStore(str(tmp_path / "k.json"))
    lines = ["k1secretvalue", "k2secretvalue:status", f"k3secretvalue:metrics:{iso(time.time() + 3600)}", "# c", ""]
    assert store.provision(lines, "env") == 3
    assert store.provision(lines, "env") == 0
    with pytest.raises(vmqapi.ConfigError) as info:
        store.provision(["okkeyvalue", "badsecretvalue:root"], "file.txt")
    assert "file.txt, entry 2: invalid_scope" in info.value.text and "badsecret" not in info.value.text


# -- a stateful model ------------------------------------------------------------

keys_st = st.text(alphabet="abcdefXYZ0123456789", min_size=4, max_size=8)
scopes_st = st.sampled_from(vmqapi.SCOPES)


class KeyStoreModel(RuleBasedStateMachine):
    """The store agrees with a dict {(key, scope): expires} through changes and reopens."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="vmqapi-ks-")
        self.path = os.path.join(self.dir, "k.json")
        self.clock = Clock()
        self.storage = "plain"
        self.store = KeyStore(self.path, clock=self.clock)
        self.model: dict[tuple[str, str], float | None] = {}

    def teardown(self):
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(scope=scopes_st, lifetime=st.none() | st.integers(1, 1000))
    def create(self, scope, lifetime):
        expires = None if lifetime is None else iso(self.clock.now + lifetime)
        key = self.store.create(scope, expires)
        self.model[(key, scope)] = None if lifetime is None else int(self.clock.now + lifetime)

    @rule(key=keys_st, scope=scopes_st)
    def add(self, key, scope):
        try:
            self.store.add(key, scope)
        except KeyRejected as exc:
            assert exc.code == "key_already_exists" and (key, scope) in self.model
        else:
            assert (key, scope) not in self.model
            self.model[(key, scope)] = None

    @rule(key=keys_st, scope=scopes_st)
    def delete(self, key, scope):
        try:
            self.store.delete(key, scope)
        except KeyRejected as exc:
            assert exc.code == "key_not_found" and (key, scope) not in self.model
        else:
            del self.model[(key, scope)]

    @rule(seconds=st.integers(1, 600))
    def expire(self, seconds):
        self.clock.now += seconds

    @rule(storage=st.sampled_from(["plain", "hashed"]))
    def reopen_from_disk(self, storage):
        self.storage = storage
        self.store = KeyStore(self.path, clock=self.clock, storage=storage)

    @invariant()
    def authentication_agrees(self):
        for (key, scope), expires in self.model.items():
            valid = expires is None or self.clock.now < expires
            assert (self.store.authenticate(key, [scope]) == scope) is valid
        assert len(self.store.entries()) == len(self.model)

    @invariant()
    def file_is_valid_json(self):
        if os.path.exists(self.path):
            with open(self.path) as fh:
                json.load(fh)


TestKeyStoreModel = KeyStoreModel.TestCase
TestKeyStoreModel.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


# -- crash safety ----------------------------------------------------------------

def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    store = KeyStore(str(tmp_path / "k.json"))
    store.add("firstkey")
    before = (tmp_path / "k.json").read_bytes()

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(vmqapi.os, "replace", boom)
    with pytest.raises(vmqapi.KeyStoreError, match="disk full"):  # a clear error, not a traceback
        store.add("secondkey")
    monkeypatch.undo()
    assert (tmp_path / "k.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["k.json", "k.json.lock"]


def test_writer_killed_between_temp_file_and_rename(tmp_path):
    path = tmp_path / "k.json"
    KeyStore(str(path)).add("firstkey")
    before = path.read_bytes()
    script = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); import vmqapi\n"
        "vmqapi.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "vmqapi.KeyStore(sys.argv[2]).add('secondkey')\n")
    proc = subprocess.run([sys.executable, "-c", script, ROOT, str(path)], timeout=60)
    assert proc.returncode == -9
    assert path.read_bytes() == before
    store = KeyStore(str(path))
    store.add("thirdkey")  # the lock died with the writer
    assert [e.key for e in store.entries()] == ["firstkey", "thirdkey"]


# -- concurrency: 4 CLI processes x 200 keys while the node serves ---------------

def _add_keys(data_dir, prefix, count):
    sys.path.insert(0, ROOT)
    import contextlib
    import io
    import vmqapi as v
    for n in range(count):
        with contextlib.redirect_stdout(io.StringIO()):
            rc = v.main(["--data-dir", data_dir, "admin", "api-key", "add", f"key={prefix}{n:04d}xyz"])
        assert rc == 0


KEYS_EACH = 100  # keys each of four writer processes adds, each write rewriting the whole file


@pytest.mark.slow
def test_concurrent_cli_writers_lose_nothing(make_node):
    node = make_node()
    data_dir = node.data_dir
    path = os.path.join(data_dir, vmqapi.KEY_FILE)
    stop = threading.Event()
    problems = []

    def watch_file_and_serve():
        client = Client(node)
        try:
            while not stop.is_set():
                with contextlib_suppress_missing():
                    with open(path, "rb") as fh:
                        json.loads(fh.read())
                status, _, _ = client.get("/api/v1/cluster/show", key="nokey-yet")
                if status != 401:
                    problems.append(status)
        except ValueError as exc:
            problems.append(repr(exc))
        finally:
            client.close()

    watcher = threading.Thread(target=watch_file_and_serve)
    watcher.start()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_keys, args=(data_dir, f"p{i}k", KEYS_EACH)) for i in range(4)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(240)
    finally:
        stop.set()
        watcher.join(30)
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert not problems
    with open(path) as fh:
        stored = {k["key"] for k in json.load(fh)["keys"]}
    expected = {f"p{i}k{n:04d}xyz" for i in range(4) for n in range(KEYS_EACH)}
    assert stored == expected
    client = Client(node)
    try:
        for key in sorted(expected):
            status, _, _ = client.request("GET", "/api/v1/cluster/show", {"Authorization": basic(key)})
            assert status == 200, key
    finally:
        client.close()


def contextlib_suppress_missing():
    import contextlib
    return contextlib.suppress(FileNotFoundError)


def test_a_key_file_that_cannot_be_written_is_a_clear_error_and_changes_nothing(tmp_path, monkeypatch):
    store = KeyStore(str(tmp_path / "api_keys.json"))
    kept = store.create("mgmt")
    before = (tmp_path / "api_keys.json").read_bytes()

    def full_disk(path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vmqapi, "write_file_atomically", full_disk)
    with pytest.raises(vmqapi.KeyStoreError, match="No space left on device"):
        store.create("mgmt")
    assert (tmp_path / "api_keys.json").read_bytes() == before and store.authenticate(kept, ("mgmt",)) is not None


def test_a_garbled_node_file_counts_as_none(tmp_path):
    (tmp_path / "node.json").write_text("[" * 100_000)  # nested past the parser's recursion limit
    assert vmqapi.read_node_file(str(tmp_path)) is None


@pytest.mark.parametrize("storage", ["plain", "hashed"])
def test_keys_replicate_between_files_with_different_salts(tmp_path, storage):
    a = KeyStore(str(tmp_path / "a.json"), storage=storage)
    b = KeyStore(str(tmp_path / "b.json"), storage=storage)
    b.add("b-own-key-1234", "mgmt")  # b's file gets a salt of its own first
    a.add("a-made-key-5678", "mgmt")
    b.apply_replicated(a.replicated(), ())
    assert b.authenticate("a-made-key-5678", ["mgmt"]) == "mgmt"
    assert b.authenticate("b-own-key-1234", ["mgmt"]) == "mgmt"
    assert b.authenticate("a-made-key-567", ["mgmt"]) is None
    assert set(a.replicated()) <= set(b.replicated())  # the same names on both sides: no churn
    b.apply_replicated(a.replicated(), ())  # idempotent
    assert len(b.entries()) == 2
    with pytest.raises(KeyRejected):
        b.add("a-made-key-5678", "mgmt")  # known under a's salt
    b.delete("a-made-key-5678", "mgmt")
    assert b.authenticate("a-made-key-5678", ["mgmt"]) is None
    gone = set(a.replicated())
    b.apply_replicated(a.replicated(), ())
    b.apply_replicated({}, gone)
    assert b.authenticate("a-made-key-5678", ["mgmt"]) is None
    assert b.authenticate("b-own-key-1234", ["mgmt"]) == "mgmt"


def test_replicated_entries_that_cannot_be_read_are_skipped(tmp_path):
    b = KeyStore(str(tmp_path / "b.json"))
    b.apply_replicated({"mgmt:x": {"scope": "nope", "key": "k"}, "mgmt:y": {"hash": "zz", "scope": "mgmt"},
                        "mgmt:z": "not a dict"}, ())
    assert b.entries() == ()


def test_a_hashed_file_keeps_a_plain_key_from_another_node_hashed_under_the_same_name(tmp_path):
    plain = KeyStore(str(tmp_path / "a.json"), storage="plain")
    hashed = KeyStore(str(tmp_path / "b.json"), storage="hashed")
    plain.add("plain-made-key-123", "mgmt")
    hashed.apply_replicated(plain.replicated(), ())
    assert "plain-made-key-123" not in (tmp_path / "b.json").read_text()
    assert hashed.authenticate("plain-made-key-123", ["mgmt"]) == "mgmt"
    assert set(hashed.replicated()) == set(plain.replicated())  # no churn between the two
    hashed.delete("plain-made-key-123", "mgmt")
    assert hashed.authenticate("plain-made-key-123", ["mgmt"]) is None


def test_a_refused_key_file_is_read_once_per_version_and_its_mode_before_its_bytes(tmp_path, monkeypatch):
    path = str(tmp_path / "keys.json")
    store = KeyStore(path)
    key = store.create("mgmt")
    reads = []
    real = vmqapi.read_regular_file
    monkeypatch.setattr(vmqapi, "read_regular_file", lambda *a: reads.append(a) or real(*a))
    assert store.authenticate(key, ["mgmt"]) == "mgmt"
    assert not reads  # a change of its own is no change
    with open(path, "r+b") as fh:
        fh.truncate(vmqapi.MAX_SMALL_FILE + 1)  # sparse, and others may read it: refused for the mode, unread
    os.chmod(path, 0o644)
    for _ in range(3):
        with pytest.raises(vmqapi.KeyStoreError, match="chmod 600"):
            store.authenticate(key, ["mgmt"])
    assert len(reads) == 1  # the same version is not read again
    os.chmod(path, 0o600)
    with pytest.raises(vmqapi.KeyStoreError, match="larger than"):
        store.entries()
    os.remove(path)
    assert store.entries() == ()
