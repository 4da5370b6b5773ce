"""Embedding: the README's gateway example, hooks, plugin show/enable/disable."""

from __future__ import annotations

import os
import re

from conftest import ROOT, Client, body_json, node_config, run_cli, password_file
from mqtt_client import MqttClient
from test_broker import mqtt_port
import vmqapi


def readme_example():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"## Embedding.*?```python\n(.*?)```", text, re.S).group(1)
    namespace = {"__name__": "gateway_example"}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_readme_gateway_example(tmp_path):
    example = readme_example()
    node = example["gateway"](node_config(tmp_path / "gw"))
    with node:
        key = node.keystore.create()
        http = Client(node)
        sub, pub = MqttClient(mqtt_port(node)), MqttClient(mqtt_port(node))
        try:
            _, _, data = http.get("/api/v1/gateway/show", key=key)
            assert body_json(data) == {"table": [{"uplink": "lte0", "state": "up"}], "type": "table"}
            cli = run_cli("admin", "gateway", "show", data_dir=tmp_path / "gw")
            assert cli.returncode == 0 and "|lte0  |up   |" in cli.stdout
            assert "gateway show" in body_json(http.get("/api/v1/gateway/show?--help", key=key)[2])["text"]
            sub.connect("sub")
            sub.subscribe(("#", 1))
            pub.connect("pub")
            pub.publish("sensors/t", b"21", 1)
            msg = sub.message()
            assert (msg.topic, msg.payload) == ("gw/sensors/t", b"21")
            pub.publish("secret/key", b"x", 1)
            sub.no_message()
            assert node.metrics.value("mqtt_publish_auth_error") == 1
            rows = body_json(http.get("/api/v1/plugin/show?--plugin=gateway", key=key)[2])["table"]
            assert rows == [{"Plugin": "gateway", "Type": "python", "Hook(s)": "auth_on_publish\n",
                             "M:F/A": "gateway_example:tag_publishes/6\n"}]
            http.get("/api/v1/plugin/disable?--name=gateway", key=key)
            assert body_json(http.get("/api/v1/plugin/show?--plugin=gateway", key=key)[2])["table"] == []
            pub.publish("secret/key", b"y", 1)
            assert sub.message().topic == "secret/key"
            http.get("/api/v1/plugin/enable?--name=gateway", key=key)
            pub.publish("a", b"z", 1)
            assert sub.message().topic == "gw/a"
        finally:
            sub.close(), pub.close(), http.close()


def test_notification_and_subscribe_hooks(make_node):
    events = []
    node = make_node()
    for name in ("on_register", "on_subscribe", "on_unsubscribe", "on_publish", "on_deliver", "on_client_offline",
                 "on_client_gone", "on_offline_message", "on_client_wakeup"):
        node.hooks.register(name, lambda *args, _n=name: events.append((_n, args)), plugin="recorder")

    def only_qos0(username, subscriber_id, topics):
        return [(t, 0) for t, _ in topics]

    node.hooks.register("auth_on_subscribe", only_qos0, plugin="limiter")
    c = MqttClient(mqtt_port(node))
    c.connect("p", clean=False)
    assert c.subscribe(("a", 2)) == (0,)
    c.publish("a", b"1", 1)
    c.message()
    c.unsubscribe("a")
    c.subscribe(("b", 1))
    c.disconnect()
    other = MqttClient(mqtt_port(node))
    other.connect("q")
    other.publish("b", b"queued")
    other.disconnect()
    for _ in range(50):
        if any(e[0] == "on_client_gone" for e in events):
            break
        import time
        time.sleep(0.02)
    names = [e[0] for e in events]
    for expected in ("on_register", "on_client_wakeup", "on_subscribe", "on_publish", "on_deliver",
                     "on_unsubscribe", "on_client_offline", "on_offline_message", "on_client_gone"):
        assert expected in names, expected
    assert ("on_subscribe", (None, ("", "p"), [("a", 0)])) in events
    assert ("on_client_offline", (("", "p"),)) in events and ("on_client_gone", (("", "q"),)) in events


def test_auth_on_register_and_a_failing_hook(make_node):
    node = make_node(allow_anonymous="off")
    node.hooks.register("auth_on_register", lambda peer, sid, user, password, clean: user == "robot" or None)

    def broken(*args):
        raise RuntimeError("bug in a plugin")

    node.hooks.register("auth_on_publish", broken)
    ok, refused = MqttClient(mqtt_port(node)), MqttClient(mqtt_port(node))
    try:
        assert ok.connect("r", username="robot", password=b"").return_code == 0
        assert refused.connect("h", username="human", password=b"pw").return_code == 5
        ok.subscribe(("t", 0))
        ok.publish("t", b"x", 1)  # the broken hook refuses; the broker keeps going
        ok.no_message()
        assert ok.ping()
    finally:
        ok.close(), refused.close()


def test_an_auth_on_register_hook_is_asked_on_a_loopback_node_with_allow_anonymous_unset(make_node):
    """A registered hook is asked; disabled, the loopback node lets clients in without credentials again."""
    node = make_node()  # every listener on 127.0.0.1, allow_anonymous unset
    node.hooks.register("auth_on_register", lambda peer, sid, user, password, clean: user == "robot",
                        plugin="robots")
    key = node.keystore.create()
    http = Client(node)
    try:
        for version in (4, 5):
            ok, refused = MqttClient(mqtt_port(node), version=version), MqttClient(mqtt_port(node), version=version)
            try:
                assert ok.connect("r", username="robot", password=b"").return_code == 0
                assert refused.connect("h").return_code == (5 if version == 4 else 0x87)
            finally:
                ok.close(), refused.close()
        http.get("/api/v1/plugin/disable?--name=robots", key=key)
        anonymous = MqttClient(mqtt_port(node))
        try:
            assert anonymous.connect("h").return_code == 0
        finally:
            anonymous.close()
    finally:
        http.close()


def test_disabling_vmq_passwd_turns_its_checks_off(make_node, tmp_path):
    passwd = password_file(tmp_path / "pw", alice="pw")
    node = make_node(allow_anonymous="off", **{"vmq_passwd.password_file": str(passwd)})
    key = node.keystore.create()
    http = Client(node)
    try:
        assert MqttClient(mqtt_port(node)).connect("a", username="alice", password=b"pw").return_code == 0
        http.get("/api/v1/plugin/disable?--name=vmq_passwd", key=key)
        assert MqttClient(mqtt_port(node)).connect("a", username="alice", password=b"pw").return_code == 5
        names = [r["Plugin"] for r in body_json(http.get("/api/v1/plugin/show", key=key)[2])["table"]]
        assert names == ["vmq_acl"]
        _, _, data = http.get("/api/v1/plugin/enable?--name=nonesuch", key=key)
        assert body_json(data)["alert"][0]["text"] == "Can't enable plugin: nonesuch due to 'not_found'"
    finally:
        http.close()


def test_unknown_hook_name_is_refused():
    import pytest
    with pytest.raises(ValueError):
        vmqapi.Hooks().register("on_everything", print)


def test_a_hook_may_call_back_into_the_node(make_node):
    node = make_node()
    seen = []
    node.hooks.register("on_register", lambda peer, sid, user: seen.append(len(node.session_records())))
    c = MqttClient(mqtt_port(node))
    try:
        assert c.connect("me").return_code == 0
        assert c.ping()
        assert seen == [1]
    finally:
        c.close()


def test_admin_disconnect_runs_the_same_hooks_as_a_client_leaving(make_node):
    events = []
    node = make_node()
    node.hooks.register("on_client_offline", lambda sid: events.append(("offline", sid)))
    node.hooks.register("on_client_gone", lambda sid: events.append(("gone", sid)))
    keeper, passer = MqttClient(mqtt_port(node)), MqttClient(mqtt_port(node))
    try:
        keeper.connect("keeper", clean=False)
        passer.connect("passer", clean=True)
        assert node.disconnect_session("keeper") and node.disconnect_session("passer")
        assert events == [("offline", ("", "keeper")), ("gone", ("", "passer"))]
    finally:
        keeper.close(), passer.close()
