"""The rest of the vmq-admin catalogue on a live broker, and settings judged by their effect."""

from __future__ import annotations

import logging
import time

import pytest

from conftest import Client, body_json
from mqtt_client import MqttClient
from test_broker import mqtt_port
import vmqapi


@pytest.fixture
def api(node, client, key):
    return lambda target: body_json(client.get(target, key=key)[2])


def clients(node, *ids, clean=True):
    out = []
    for client_id in ids:
        c = MqttClient(mqtt_port(node))
        c.connect(client_id, clean)
        out.append(c)
    return out


def test_disconnect_clients_and_batch(node, api):
    a, b, c, d = clients(node, "a", "b", "c", "d")
    assert api("/api/v1/session/disconnect/clients?client-ids=a,b") == {"text": "Done", "type": "text"}
    assert a.closed(2) and b.closed(2)
    assert api("/api/v1/session/disconnect/batch?count=5&--filter-client-ids=d") == {"text": "Done", "type": "text"}
    assert c.closed(2) and d.ping()
    rows = api("/api/v1/session/show?--client_id")["table"]
    assert rows == [{"client_id": "d"}]
    for x in (a, b, c, d):
        x.close()


def test_session_unsubscribe(node, api):
    (c,) = clients(node, "u")
    c.subscribe(("x/#", 0), ("y", 1))
    assert api("/api/v1/session/unsubscribe?client-id=u&topic=x/%23") == {"text": "Done", "type": "text"}
    assert api("/api/v1/session/unsubscribe?client-id=u&topic=x/%23") == {"text": "Not successful", "type": "text"}
    assert api("/api/v1/session/show?--client_id=u&--topic")["table"] == [{"topic": "y"}]
    c.close()


def test_session_reauthorize(make_node, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic a/#\ntopic b/#\n")
    node = make_node(**{"vmq_acl.acl_file": str(acl), "vmq_acl.acl_reload_interval": "1"})
    key = node.keystore.create()
    http = Client(node)
    c = MqttClient(mqtt_port(node))
    try:
        c.connect("c1", username="alice", password=b"")
        assert c.subscribe(("a/1", 0), ("b/1", 0)) == (0, 0)
        target = "/api/v1/session/reauthorize?username=alice&client-id=c1"
        assert body_json(http.get(target, key=key)[2])["text"] == "Unchanged"
        acl.write_text("user alice\ntopic a/#\n# b is gone\n")
        time.sleep(1.1)
        assert body_json(http.get(target, key=key)[2])["text"] == "Done"
        rows = body_json(http.get("/api/v1/session/show?--topic", key=key)[2])["table"]
        assert rows == [{"topic": "a/1"}]
    finally:
        c.close(), http.close()


def test_retain_delete_and_delete_expired(node, api):
    (c,) = clients(node, "r")
    c.publish("keep/me", b"1", 1, retain=True)
    c.publish("drop/me", b"2", 1, retain=True)
    assert api("/api/v1/retain/delete?--topic=drop/me") == {"text": "Done", "type": "text"}
    assert api("/api/v1/retain/delete?--topic=drop/me")["type"] == "alert"
    assert api("/api/v1/retain/delete")["alert"][0]["text"] == "No valid topic given."
    assert api("/api/v1/retain/show?--topic")["table"] == [{"topic": "keep/me"}]
    assert api("/api/v1/retain/delete-expired") == {"table": [{"expired": 0}], "type": "table"}
    c.close()


def test_log_commands(api):
    rows = api("/api/v1/log/show/config")["table"]
    assert rows[0]["logger"] == "vmqapi" and set(rows[0]) == {"logger", "level", "type", "file"}
    before = logging.getLogger("vmqapi").level
    try:
        assert api("/api/v1/log/level?logger=vmqapi&level=debug") == {"text": "Done", "type": "text"}
        assert logging.getLogger("vmqapi").getEffectiveLevel() == logging.DEBUG
        assert api("/api/v1/log/level?logger=nosuch&level=debug")["type"] == "alert"
        assert api("/api/v1/log/level?logger=vmqapi&level=loud")["error"] == "invalid_value"
    finally:
        logging.getLogger("vmqapi").setLevel(before)


# -- every settable key, judged by its effect ------------------------------------------------

def test_retry_interval_resends_unacknowledged(make_node):
    node = make_node(retry_interval="1")
    sub, pub = clients(node, "sub", "pub")
    sub.subscribe(("t", 1))
    pub.publish("t", b"x", 1)
    first = sub.message(ack=False)
    started = time.monotonic()
    again = sub.message(ack=False, timeout=5)
    assert again.dup and again.packet_id == first.packet_id and time.monotonic() - started >= 0.5
    sub.close(), pub.close()


def test_max_message_rate_throttles(make_node):
    node = make_node(max_message_rate="20")
    sub, pub = clients(node, "sub", "pub")
    sub.subscribe(("t", 0))
    started = time.monotonic()
    pub.send_raw(vmqapi.encode_packet(vmqapi.Publish("t", b"x")) * 70)
    for _ in range(70):
        sub.message(timeout=10)
    assert time.monotonic() - started >= 1.9  # 20 per wall-clock second: three second boundaries
    sub.close(), pub.close()


def test_upgrade_outgoing_qos(make_node):
    node = make_node(upgrade_outgoing_qos="on")
    sub, pub = clients(node, "sub", "pub")
    sub.subscribe(("t", 1))
    pub.publish("t", b"x", 0)
    assert sub.message().qos == 1
    sub.close(), pub.close()


def test_limits_set_at_run_time(node, api):
    assert api("/api/v1/set?max_online_messages=2&max_inflight_messages=1") == []
    sub, pub = clients(node, "sub", "pub")
    sub.subscribe(("t", 1))
    for n in range(5):
        pub.publish("t", str(n).encode(), 1)
    got = [sub.message().payload for _ in range(3)]
    assert got == [b"0", b"1", b"2"]  # one in flight, two queued, two dropped
    sub.no_message()
    assert api("/api/v1/set?max_message_size=20") == []
    pub.send(vmqapi.Publish("t", b"y" * 50))
    assert pub.closed(2)
    sub.close(), pub.close()


def test_allow_anonymous_and_passwd_file_set_at_run_time(node, api, tmp_path):
    passwd = tmp_path / "pw"
    passwd.write_text("bob:" + vmqapi.hash_password("pw") + "\n")
    assert api("/api/v1/set?allow_anonymous=off") == []
    c = MqttClient(mqtt_port(node))
    assert c.connect("x").return_code == 5
    api(f"/api/v1/set?vmq_passwd.password_file={passwd}&vmq_passwd.password_reload_interval=1")
    c = MqttClient(mqtt_port(node))
    assert c.connect("x", username="bob", password=b"pw").return_code == 0
    c.close()


def test_acl_file_set_at_run_time(node, api, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("topic read open/#\n")
    api(f"/api/v1/set?vmq_acl.acl_file={acl}")
    (c,) = clients(node, "c")
    assert c.subscribe(("open/x", 0), ("closed/x", 0)) == (0, 0x80)
    c.close()


def test_persistent_client_expiration(node, api):
    api("/api/v1/set?persistent_client_expiration=1")
    (c,) = clients(node, "p", clean=False)
    c.disconnect()
    time.sleep(2.2)
    assert api("/api/v1/session/show")["table"] == []


def test_mqtt_connect_timeout_set_at_run_time(node, api):
    api("/api/v1/set?mqtt_connect_timeout=300")
    c = MqttClient(mqtt_port(node))
    assert c.closed(3)
    c.close()


# -- trace -------------------------------------------------------------------------------

def test_trace_client_over_http(node, key):
    import threading
    (c,) = clients(node, "traced")
    c.subscribe(("t", 1))
    http = Client(node)
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(
        r=http.get("/api/v1/trace/client?client-id=traced&--duration=1&--trunc-payload=3", key=key)))
    worker.start()
    time.sleep(0.3)
    c.publish("t", b"hello world", 1)
    c.message()
    worker.join(10)
    http.close()
    c.close()
    text = body_json(answer["r"][2])["text"]
    lines = text.splitlines()
    assert any("MQTT RECV: CID: 'traced' PUBLISH(q1, r0, d0, m" in l and "payload b'hel' (+8 bytes)" in l for l in lines)
    assert any("MQTT SEND: CID: 'traced' PUBACK" in l for l in lines)
    assert any("MQTT SEND: CID: 'traced' PUBLISH" in l for l in lines)
    assert any("MQTT RECV: CID: 'traced' PUBACK" in l for l in lines)


def test_trace_rate_limit():
    tracer = vmqapi.Tracer("c", rate_max=2, rate_interval=1000)
    for n in range(5):
        tracer.packet("in", vmqapi.Pingreq(), 100.0 + n / 100)
    lines = tracer.take()
    assert len(lines) == 3 and lines[-1] == "... 3 packets not shown (rate limit)"


def test_trace_streams_in_the_cli_until_interrupted(node):
    import os
    import signal
    import subprocess
    import sys
    from conftest import ROOT
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "vmqapi.py"), "--data-dir", node.data_dir, "admin",
                             "trace", "client", "client-id=streamed"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a background shell starts the suite with SIGINT ignored; the child must not inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(1.0)
        (c,) = clients(node, "streamed")
        c.ping()
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "CONNECT(c: 'streamed'" in out and "PINGREQ" in out and "PINGRESP" in out
    c.close()


# -- OpenAPI -----------------------------------------------------------------------------

def check_openapi(doc):
    """A structural check of an OpenAPI 3.1 document: versions, paths, operations, refs."""
    assert doc["openapi"].startswith("3.1.") and doc["info"]["title"] and doc["info"]["version"]
    schemes = doc["components"]["securitySchemes"]
    assert all(next(iter(req)) in schemes for req in doc["security"])

    def refs(value):
        if isinstance(value, dict):
            for k, v in value.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(value, list):
            for v in value:
                yield from refs(v)

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in doc["components"]["schemas"]
    operation_ids = set()
    for path, item in doc["paths"].items():
        assert path.startswith("/")
        for method, op in item.items():
            assert method in ("get", "post", "put", "delete", "head", "options", "patch")
            assert op["operationId"] not in operation_ids
            operation_ids.add(op["operationId"])
            assert "200" in op["responses"] and all("description" in r for r in op["responses"].values())
            for param in op.get("parameters", ()):
                assert param["in"] in ("query", "path", "header", "cookie") and "schema" in param
                assert param["name"]
                if param["in"] == "path":
                    assert param["required"] is True and "{" + param["name"] + "}" in path


def test_openapi_lists_every_command(node, key):
    node.commands.register(("gateway", "show"), lambda call: "up", usage="Show the gateway.")
    http = Client(node)
    try:
        status, headers, data = http.get("/api/v1/openapi.json", key=key)
        assert status == 200
        doc = body_json(data)
        assert http.get("/api/v1/openapi.json")[0] == 401
    finally:
        http.close()
    check_openapi(doc)
    paths = set(doc["paths"])
    for cmd in node.commands:
        expected = "/api/v1/" + "/".join(cmd.words) + (f"/{{{cmd.extra_words}}}" if cmd.extra_words else "")
        assert expected in paths
    assert "/api/v1/gateway/show" in paths
    op = doc["paths"]["/api/v1/session/disconnect"]["get"]
    names = {p["name"]: p for p in op["parameters"]}
    assert names["client-id"]["required"] is True and names["--cleanup"]["allowEmptyValue"] is True


def test_followed_trace_misses_nothing_between_calls(node, key):
    (c,) = clients(node, "followed")
    http = Client(node)
    try:
        target = "/api/v1/trace/client?client-id=followed&--duration=1&--follow=tok1"
        first = body_json(http.get(target, key=key)[2])["text"]
        assert "PINGREQ" not in first
        c.ping()  # between the two calls
        second = body_json(http.get(target, key=key)[2])["text"]
        assert "PINGREQ" in second and "PINGRESP" in second
    finally:
        http.close(), c.close()
