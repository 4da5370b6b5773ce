"""Fixtures: a node on 127.0.0.1 port 0 in a temporary data dir, and HTTP helpers."""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import vmqapi  # noqa: E402


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


def run_cli(*args, data_dir, env=None, timeout=60):
    """Run ``python vmqapi.py --data-dir D <args>`` in a child Python; return the result."""
    cmd = [sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", str(data_dir), *args]
    full_env = dict(os.environ, **(env or {}))
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
