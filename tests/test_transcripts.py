"""Golden transcripts: each command and its exact JSON, over HTTP and through the CLI alike."""

from __future__ import annotations

import contextlib
import glob
import io
import os

import pytest

from conftest import HERE, Client
from mqtt_client import MqttClient
from test_broker import mqtt_port
import vmqapi


def load(path):
    """Return [("step", name) | ("run", tokens, expected)] from a transcript file."""
    items, lines = [], open(path, encoding="utf-8").read().splitlines()
    for n, line in enumerate(lines):
        if line.startswith("# step: "):
            items.append(("step", line[8:].strip()))
        elif line.startswith("$ "):
            items.append(("run", line[2:].split(" "), lines[n + 1]))
    return items


class Steps:
    """What a transcript's ``# step:`` lines do to the node."""

    def __init__(self, node):
        self.node, self.clients = node, []

    def persistent_31_client(self):
        c = MqttClient(mqtt_port(self.node))
        assert c.connect("vmq-client", clean=False, proto_level=3).return_code == 0
        c.subscribe(("some/topic/1", 0), ("with/wildcard/#", 1), ("with/+/wildcard", 2))
        self.clients.append(c)

    def offline_with_a_queued_message(self):
        self.clients.pop().disconnect()
        pub = MqttClient(mqtt_port(self.node))
        pub.connect("publisher")
        pub.publish("with/x/wildcard", b"hello", 1)
        pub.disconnect()

    def close(self):
        for c in self.clients:
            c.close()


def run_cli_in_process(node, tokens):
    out = io.StringIO()
    buffer = io.BytesIO()
    out.buffer = buffer  # the CLI writes JSON bodies as bytes
    with contextlib.redirect_stdout(out):
        vmqapi.main(["--data-dir", node.data_dir, "admin", *tokens, "--format=json"])
    return buffer.getvalue().decode() or out.getvalue()


TRANSCRIPTS = sorted(glob.glob(os.path.join(HERE, "transcripts", "*.txt")))


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[os.path.basename(p) for p in TRANSCRIPTS])
def test_transcript(node, path):
    key = node.keystore.create()
    http, steps = Client(node), Steps(node)
    try:
        for item in load(path):
            if item[0] == "step":
                getattr(steps, item[1])()
                continue
            _, tokens, expected = item
            argv = vmqapi.parse_cli_tokens(tokens)
            route, query = vmqapi.render_query(argv)
            _, _, body = http.get(route + ("?" + query if query else ""), key=key)
            assert body.decode().rstrip("\n") == expected, " ".join(tokens)
            assert run_cli_in_process(node, tokens).rstrip("\n") == expected, "CLI: " + " ".join(tokens)
    finally:
        steps.close()
        http.close()
