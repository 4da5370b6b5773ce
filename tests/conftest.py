"""Fixtures: a node on 127.0.0.1 port 0 in a temporary data dir, and HTTP helpers."""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def _write_bytecode() -> None:
    """Write vmqapi.py's cached bytecode, as a user's first start does: the suite's children
    (``vmqapi_command``) start from it as every later start does. An environment that keeps Python
    from writing .pyc files (PYTHONDONTWRITEBYTECODE) would have each compile the whole file again."""
    import py_compile
    try:
        py_compile.compile(os.path.join(ROOT, "vmqapi.py"), doraise=True)
    except (OSError, py_compile.PyCompileError):  # a read-only checkout: they compile, more slowly
        pass


_write_bytecode()
import vmqapi  # noqa: E402


# The quick run (README, "Quick start": python -m pytest -q -m quick): every section's pure tests (values,
# codecs, parsers, models and Hypothesis properties; no node process, no waiting), in well under a minute.
# A file's name maps to "*" (all of its tests) or to the names of its tests that belong; a slow test never
# does. test_hygiene.py checks that every name here is a test of its file.
QUICK = {
    "test_config.py": "*",
    "test_codec.py": "*",
    "test_topics.py": "*",
    "test_commands.py": "*",
    "test_transcripts.py": "*",
    "test_broker_model.py": "*",
    "test_cluster_state.py": "*",
    "test_cluster_kept.py": "*",
    "test_copies.py": "*",
    "test_engine_cluster.py": "*",
    "test_keystore.py": "*",
    "test_hygiene.py": "*",
    "test_acl.py": ("test_filter_covers_agrees_with_brute_force",
                    "test_subscription_granted_only_if_every_topic_it_matches_is",
                    "test_publish_granted_exactly_when_the_model_grants", "test_a_bad_acl_line_stops_the_start",
                    "test_rule_files_with_windows_line_ends_and_extra_spaces_mean_the_same"),
    "test_store.py": ("test_offline_queue_and_all_queues_are_bounded_in_bytes",
                      "test_retained_messages_are_limited_in_number_and_bytes"),
    "test_http.py": ("test_any_authorization_gives_200_400_or_401", "test_malformed_or_refused_authorization",
                     "test_x_api_key_only_without_authorization", "test_password_part_is_ignored",
                     "test_authentication_before_validation", "test_noauth_mode",
                     "test_failed_authentications_are_counted", "test_aliases",
                     "test_bad_requests_get_400_with_a_reason", "test_missing_argument_carries_usage",
                     "test_help_is_text_200", "test_set_then_show", "test_describe", "test_methods", "test_options",
                     "test_accept", "test_post_form_body", "test_read_only_key",
                     "test_read_only_key_sees_no_key_material_and_no_payloads",
                     "test_other_scopes_do_not_unlock_the_api", "test_crash_in_a_command_is_a_logged_500",
                     "test_unknown_path_is_404_json", "test_redact_hides_keys"),
    "test_observability.py": ("test_label_values_are_escaped", "test_status_history_is_a_ring_of_fifteen_minutes",
                              "test_status_page_has_no_external_assets",
                              "test_status_rows_are_computed_once_per_interval_whatever_the_readers"),
    "test_plugins_http.py": ("test_scopes_are_verneMQs_six_and_mgmt_ro",),
    "test_cluster_links.py": ("test_frames_decode_whatever_the_reads",
                              "test_a_frame_over_the_limit_is_refused_from_its_header"),
    "test_cluster.py": ("test_the_cluster_store_purges_old_tombstones_only", "test_good_node_names_pass"),
    "test_bridge.py": ("test_topic_lines_parse_as_vernemq_documents_them",),
    "test_webhooks.py": ("test_answers_in_hooks_terms", "test_unusable_answers_fail", "test_max_age_as_verneMQ_reads_it",
                         "test_a_full_cache_drops_the_expired_then_the_oldest",
                         "test_a_configured_webhook_needs_hook_and_endpoint"),
    "test_embedding.py": ("test_unknown_hook_name_is_refused",),
}


@pytest.hookimpl(tryfirst=True)  # before -m reads the marks
def pytest_collection_modifyitems(items):
    """Mark the quick run's tests (QUICK) ``quick``."""
    for item in items:
        spec = QUICK.get(item.path.name, ())
        name = getattr(item, "originalname", item.name)
        if (spec == "*" or name in spec) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.quick)


def password_file(path, **users):
    """Write a vmq_passwd file (mode 0600, as the node demands) of ``users``' passwords; return ``path``."""
    path.write_text("".join(f"{user}:{vmqapi.hash_password(password)}\n" for user, password in users.items()))
    path.chmod(0o600)
    return path


def wait_for(predicate, timeout=10.0, what="a condition"):
    """Poll ``predicate`` until it returns something true (returned); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def node_config(data_dir, **extra):
    """Config values for a test node: any free port, the given data dir."""
    values = {"data_dir": str(data_dir), "listener.http.default": "127.0.0.1:0",
              "listener.tcp.default": "127.0.0.1:0", "listener.vmq.clustering": "127.0.0.1:0",
              "http_poll_interval": "10"}  # a stop waits this long for the HTTP listener, 100 ms by default
    values.update(extra)
    return values


@pytest.fixture
def make_node(tmp_path):
    """Start nodes on demand; every one is stopped at the end of the test."""
    nodes = []

    def make(**extra):
        node = vmqapi.Node(node_config(tmp_path / f"data{len(nodes)}", **extra))
        nodes.append(node)
        return node.start()

    try:
        yield make
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def node(make_node):
    """A running node with the default configuration."""
    return make_node()


@pytest.fixture
def key(node):
    """A mgmt key of ``node``."""
    return node.keystore.create("mgmt")


def basic(key):
    """Return the Authorization header value for ``key``."""
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


class Client:
    """A keep-alive HTTP client for one node's HTTP listener."""

    def __init__(self, node):
        listener = next(x for x in node.listeners() if x["type"] == "http")
        self.conn = http.client.HTTPConnection(listener["address"], listener["port"], timeout=10)

    def request(self, method, target, headers=None, body=None):
        self.conn.request(method, target, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def get(self, target, key=None, **headers):
        hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
        if key is not None:
            hdrs["Authorization"] = basic(key)
        return self.request("GET", target, hdrs)

    def close(self):
        self.conn.close()


@pytest.fixture
def client(node):
    """An HTTP client of ``node``, closed afterwards."""
    c = Client(node)
    try:
        yield c
    finally:
        c.close()


def vmqapi_command(*args):
    """``python vmqapi.py <args>`` as that command runs once it has handed over to the file's cached
    bytecode (the hand-over at the top of vmqapi.py): the same program in the same process, without
    compiling the whole file again at every start (about 0.2 s each). test_cli's script tests, and a
    few others, start the file itself."""
    return [sys.executable, "-S", "-c", vmqapi._FROM_BYTECODE, os.path.join(ROOT, "vmqapi.py"), *args]


def engine_output(engine, conn, version=4):
    """Take what an engine left in ``conn``'s outbox, as the I/O shell would send it, decoded."""
    engine.take_dirty()
    data, pos, out = b"".join(conn.out), 0, []
    conn.out.clear()
    conn.out_bytes = 0
    while pos < len(data):
        packet, pos = vmqapi.decode_packet(data, pos, 0, version)
        out.append(packet)
    return out


def vmqapi_env(**extra):
    """The environment ``vmqapi_command`` runs in: the hand-over's (MALLOC_ARENA_MAX=2 unless set), with ``extra``."""
    return {"MALLOC_ARENA_MAX": "2", **os.environ, **extra}


def run_cli(*args, data_dir, env=None, timeout=60):
    """Run ``python vmqapi.py --data-dir D <args>`` in a child Python; return the result."""
    cmd = vmqapi_command("--data-dir", str(data_dir), *args)
    full_env = vmqapi_env(**(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(data_dir.parent))


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves vmqapi threads running."""
    before = {t.ident for t in threading.enumerate()}
    yield
    for t in threading.enumerate():
        if t.name.startswith("vmqapi") and t.ident not in before:
            t.join(5)
    leaked = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("vmqapi")]
    assert not leaked, f"threads left running: {leaked}"


def body_json(data):
    """Decode a JSON response body."""
    return json.loads(data)
