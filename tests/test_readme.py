"""Every curl line in the README answers as printed, against a fresh node."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from conftest import ROOT
from mqtt_client import MqttClient

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
LIVE_COUNTS = ("active_conns", "all_conns")


def examples():
    """Yield (curl line, expected output or None) from the README's indented blocks."""
    lines = README.splitlines()
    for n, line in enumerate(lines):
        if line.startswith("    $ curl ") and " | " not in line:  # piped examples depend on traffic
            nxt = lines[n + 1] if n + 1 < len(lines) else ""
            expected = nxt[4:] if nxt.startswith("    ") and not nxt.startswith("    $") else None
            yield line[6:], expected


def curl(line, key, port):
    """Perform a README curl line with urllib, as curl would."""
    words = shlex.split(line.replace("$KEY", key))[1:]
    headers, data, url = {}, None, None
    while words:
        word = words.pop(0)
        if word == "-H":
            name, _, value = words.pop(0).partition(": ")
            headers[name] = value
        elif word == "-u":
            headers["Authorization"] = "Basic " + base64.b64encode(words.pop(0).encode()).decode()
        elif word == "--data":
            data = words.pop(0).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")  # as curl: -H wins
        else:
            url = word
    match = re.match(r"http://(?:([^@/]+)@)?127\.0\.0\.1:8888(/.*)", url)
    if match.group(1):
        headers["Authorization"] = "Basic " + base64.b64encode(match.group(1).encode() + b":").decode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{match.group(2)}", data=data, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def normalise(body, ports):
    data = json.loads(body)
    for element in data if isinstance(data, list) else [data]:
        for row in element.get("table", ()) if isinstance(element, dict) else ():
            for name in LIVE_COUNTS:
                row.pop(name, None)
            if row.get("port") in ports:
                row["port"] = ports[row["port"]]
        if isinstance(element, dict) and "usage" in element:
            element["usage"] = element["usage"].split(" ...")[0]  # printed whole, or cut with " ..."
    return data


def test_readme_curl_lines(node):
    key = node.keystore.create()
    scoped = {"$PUBKEY": node.keystore.create("httppub"), "$V2KEY": node.keystore.create("api2")}
    port = next(x["port"] for x in node.listeners() if x["type"] == "http")
    mqtt_port = next(x["port"] for x in node.listeners() if x["type"] == "mqtt")
    vmq_port = next(x["port"] for x in node.listeners() if x["type"] == "vmq")
    ports = {str(port): "8888", str(mqtt_port): "1883", str(vmq_port): "44053"}
    found = list(examples())
    assert len(found) >= 10
    for line, expected in found:
        for name, value in scoped.items():
            line = line.replace(name, value)
        status, body = curl(line, key, port)
        assert status in (200, 400), (line, status, body)
        if expected is not None and not expected.startswith(("{", "[", '"')):
            assert body.decode() == expected, line  # a plain-text answer (HTTP publish)
        elif expected is not None:
            want = expected.replace(" ...\"", "\"")
            assert normalise(body, ports) == normalise(want.encode(), {}), line


def test_the_http_teaching_line_uses_the_key_variable_the_readme_sets(tmp_path):
    from conftest import run_cli
    result = run_cli("admin", "cluster", "show", "--http", data_dir=tmp_path / "data")
    name = re.search(r'curl -u "\$(\w+):"', result.stdout).group(1)
    assert re.search(rf"^    \$ (export )?{name}=", README, re.M), f"the README never sets ${name}"
    assert f'curl -u "${name}:"' in README


def test_the_piped_metrics_example_prints_what_it_shows(node):
    from mqtt_client import MqttClient
    lines = README.splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith("    $ curl -s http://127.0.0.1:8888/metrics | grep"))
    pattern = shlex.split(lines[n].partition("| grep ")[2])[0]
    shown = []
    for line in lines[n + 1:]:
        if not line.startswith("    ") or line.startswith("    $"):
            break
        shown.append(line[4:])
    c = MqttClient(next(x["port"] for x in node.listeners() if x["type"] == "mqtt"))  # MQTT 3.1.1
    try:
        c.connect("readme")
        c.subscribe(("t", 0))
    finally:
        c.close()
    port = next(x["port"] for x in node.listeners() if x["type"] == "http")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert [line for line in text.splitlines() if re.search(pattern, line)] == shown


def test_the_readme_prints_the_quick_run_and_how_long_each_run_takes():
    from conftest import QUICK
    start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "    python -m pip install -q pytest hypothesis && python -m pytest -q\n" in start
    assert "    python -m pytest -q -m quick\n" in start
    assert re.search(r"^    quick: ", open(os.path.join(ROOT, "tox.ini"), encoding="utf-8").read(), re.M)
    assert len(re.findall(r"about \d+ (?:s|minutes?) on two cores", " ".join(start.split()))) >= 2, "how long"
    assert "test_codec.py" in QUICK and "QUICK" in README


def webhooks_example():
    """Return the README's hooks.py and vernemq.conf of "Webhooks", as printed."""
    section = README.split("\n## Webhooks\n", 1)[1].split("\n## ", 1)[0]
    hooks = re.search(r"An example: `hooks.py`.*?```python\n(.*?)```", section, re.S).group(1)
    conf = re.search(r"and in `vernemq.conf`.*?```\n(.*?)```", section, re.S).group(1)
    return hooks, conf


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "hooks.py exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}")


def test_the_webhooks_example_works_as_printed(tmp_path):
    """hooks.py and vernemq.conf, word for word on a loopback node with allow_anonymous unset: only joe/secret
    comes in, over MQTT 3.1.1 and MQTT 5."""
    from capped import capped_node, child_setup
    hooks, conf = webhooks_example()
    assert "allow_anonymous" not in conf and hooks.count("8080") == 1 and conf.count("8080") >= 1
    port = str(free_port())
    (tmp_path / "hooks.py").write_text(hooks.replace("8080", port))
    (tmp_path / "vernemq.conf").write_text(conf.replace("8080", port))
    endpoint = subprocess.Popen([sys.executable, str(tmp_path / "hooks.py")], cwd=str(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=child_setup())
    try:
        wait_listening(int(port), endpoint)
        with capped_node(tmp_path / "data", args=("--config", str(tmp_path / "vernemq.conf"))) as node:
            for version, refused in ((4, 5), (5, 0x87)):  # MQTT 5: 0x87 Not authorized
                for kwargs, code in (({}, refused), ({"username": "joe", "password": b"wrong"}, refused),
                                     ({"username": "joe", "password": b"secret"}, 0)):
                    c = MqttClient(node.port("mqtt"), version=version)
                    try:
                        assert c.connect("c", **kwargs).return_code == code, (version, kwargs)
                    finally:
                        c.close()
            assert "allow_anonymous is not set" not in node.log(), "the warning speaks of a node that asks hooks.py"
    finally:
        endpoint.kill()
        endpoint.wait(10)
