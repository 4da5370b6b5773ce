"""HTTP publish (vmq_http_pub) and API v2 (vmq_http_v2_api) over real sockets (README, "HTTP publish")."""

from __future__ import annotations

import base64
import json
import os

import pytest

from conftest import Client, basic, body_json, password_file
from mqtt_client import MqttClient

import vmqapi

PUBLISH = "/restmqtt/api/v1/publish"


def mqtt_port(node):
    return next(x["port"] for x in node.listeners() if x["type"] == "mqtt")


@pytest.fixture
def pub(node):
    """(HTTP client, httppub key, a subscribed MQTT client on t/#) for ``node``."""
    http, sub = Client(node), MqttClient(mqtt_port(node), version=5)
    try:
        sub.connect("sub")
        sub.subscribe(("t/#", 1))
        yield http, node.keystore.create("httppub"), sub
    finally:
        sub.close()
        http.close()


def post(http, key, body=b"", query="", method="POST", **headers):
    hdrs = dict(headers)
    if key is not None:
        hdrs["Authorization"] = basic(key)
    return http.request(method, PUBLISH + query, hdrs, body)


def js(**fields):
    return json.dumps(fields).encode()


def test_json_plain_publish_reaches_a_subscriber(pub):
    http, key, sub = pub
    status, headers, data = post(http, key, js(topic="t/a", payload="hello", qos=1, retain=False,
                                               user_properties=[{"k": "v"}]))
    assert (status, data) == (200, b"Published") and headers["content-type"] == "text/plain"
    msg = sub.message()
    assert (msg.topic, msg.payload, msg.qos) == ("t/a", b"hello", 1)
    assert ("user_property", ("k", "v")) in msg.properties


def test_json_base64_publish_is_decoded(pub):
    http, key, sub = pub
    raw = bytes(range(256))
    status, _, data = post(http, key, js(topic="t/b", payload=base64.b64encode(raw).decode()),
                           query="?encoding=base64")
    assert (status, data) == (200, b"Published")
    assert sub.message().payload == raw
    status, _, data = post(http, key, js(topic="t/b", payload="not base64!"), query="?encoding=base64")
    assert (status, data) == (400, b"Unknown payload encoding")


def test_header_and_query_forms_take_the_body_as_the_payload(pub):
    http, key, sub = pub
    assert post(http, key, b"\x00raw", method="PUT", topic="t/h", qos="2")[0] == 200
    msg = sub.message()
    assert (msg.topic, msg.payload, msg.qos) == ("t/h", b"\x00raw", 1)  # the subscription's QoS 1
    assert post(http, key, b"q", query="?topic=t/q&qos=1")[0] == 200
    msg = sub.message()
    assert (msg.topic, msg.payload, msg.qos) == ("t/q", b"q", 1)


def test_query_form_retains(node, pub):
    http, key, sub = pub
    assert post(http, key, b"kept", query="?topic=t/r&retain=true")[:1] == (200,)
    assert sub.message().payload == b"kept"
    late = MqttClient(mqtt_port(node))
    try:
        late.connect("late")
        late.subscribe(("t/r", 0))
        msg = late.message()
        assert (msg.payload, msg.retain) == (b"kept", True)
    finally:
        late.close()


@pytest.mark.parametrize("body,query,headers,text", [
    (js(topic="t/#", payload="x"), "", {}, b"Invalid topic"),
    (js(topic="$SYS/x", payload="x"), "", {}, b"Invalid topic"),
    (js(payload="x"), "", {}, b"Invalid topic"),
    (js(topic="t/x", payload="x", qos=3), "", {}, b"Invalid QoS value. Must be in range 0..2"),
    (js(topic="t/x", payload="x", retain="yes"), "", {}, b"Invalid retain flag. Must be in true or false"),
    (js(topic="t/x", payload="x", user_properties=[{"k": 1}]), "", {},
     b"User properties need to be a key/value list (json encoded)"),
    (b"{not json", "", {}, b"Content is not a valid json"),
    (js(topic="t/x", payload="x"), "?encoding=hex", {}, b"Only encoding plain or base64 allows. "
                                                         b"No more URL parameters supported."),
    (js(topic="t/x", payload="x"), "?foo=1", {}, b"Only encoding plain or base64 allows. "
                                                  b"No more URL parameters supported."),
    (b"x", "?topic=t/x", {"topic": "t/x"}, b"Parameters found in header as well as url-encoded"),
    (b"x", "", {"topic": "t/x", "qos": "x"}, b"Invalid QoS value. Must be in range 0..2"),
    (js(topic="t/x"), "", {}, b'Payload missing: the JSON form needs a "payload" string'),
])
def test_bad_requests_get_400_and_publish_nothing(pub, body, query, headers, text):
    http, key, sub = pub
    status, _, data = post(http, key, body, query=query, **headers)
    assert status == 400 and (data == text or data.startswith(text + b": ")), data  # the reason may follow
    sub.no_message(0.1)


def test_more_user_properties_than_max_properties_per_packet_get_400(pub):
    """Every node refuses a forwarded message with more: it would reach no other node's subscribers."""
    http, key, sub = pub
    for n, status in ((129, 400), (128, 200)):
        props = {f"k{i}": "v" for i in range(n)}
        answer = post(http, key, js(topic=f"t/{n}", payload="x", user_properties=props))
        assert answer[0] == status, answer
    msg = sub.message()
    assert msg.topic == "t/128" and len(msg.properties) == 128
    sub.no_message(0.1)


def test_the_api_key_needs_scope_httppub(node, pub):
    http, key, sub = pub
    assert post(http, None, js(topic="t/x", payload="x"))[0] == 401
    assert post(http, node.keystore.create("mgmt"), js(topic="t/x", payload="x"))[0] == 401
    assert post(http, node.keystore.create("api2"), js(topic="t/x", payload="x"))[0] == 401
    status, headers, _ = post(http, key, method="GET")
    assert status == 405 and headers["allow"] == "PUT, POST"
    sub.no_message(0.1)


def test_max_message_size_gives_413(make_node):
    node = make_node(max_message_size="10")
    http = Client(node)
    try:
        key = node.keystore.create("httppub")
        status, _, data = post(http, key, js(topic="t/x", payload="x" * 11))
        assert (status, data) == (413, b"Payload too large.")
        assert post(http, key, js(topic="t/x", payload="x" * 10))[0] == 200
    finally:
        http.close()


@pytest.fixture
def secured(make_node, tmp_path):
    """A node with vmq_passwd (alice/secret) and vmq_acl (alice may write t/alice/# only)."""
    passwd = password_file(tmp_path / "vmq.passwd", alice="secret")
    acl = tmp_path / "vmq.acl"
    acl.write_text("user alice\ntopic write t/alice/#\ntopic read t/#\n")
    return make_node(allow_anonymous="off", **{"vmq_passwd.password_file": str(passwd),
                                               "vmq_acl.acl_file": str(acl)})


def watch(node, user="alice", password=b"secret"):
    sub = MqttClient(mqtt_port(node))
    assert sub.connect("watcher", username=user, password=password).return_code == 0
    sub.subscribe(("t/#", 0))
    return sub


def test_on_behalf_of_checks_credentials_and_the_acl(secured):
    http, sub = Client(secured), watch(secured)
    try:
        key = secured.keystore.create("httppub")
        me = {"user": "alice", "password": "secret", "client_id": "http-1"}
        assert post(http, key, js(topic="t/alice/1", payload="ok", **me))[2] == b"Published"
        assert sub.message().payload == b"ok"
        status, _, data = post(http, key, js(topic="t/bob/1", payload="no", **me))
        assert (status, data) == (403, b"Authorization failure.")
        status, _, data = post(http, key, js(topic="t/alice/1", payload="no", **{**me, "password": "wrong"}))
        assert (status, data) == (401, b"Authentication failure.")
        status, _, data = post(http, key, js(topic="t/alice/1", payload="no", client_id="c"))
        assert (status, data) == (401, b"Authentication failure.")
        assert post(http, key, b"hdr", topic="t/alice/2", user="alice", password="secret")[0] == 200
        assert sub.message().payload == b"hdr"
        sub.no_message(0.1)
    finally:
        sub.close()
        http.close()


def test_predefined_credentials_ignore_the_request(secured):
    secured.apply_settings({"vmq_http_pub.mqtt_auth.mode": "predefined", "vmq_http_pub.mqtt_auth.user": "alice",
                            "vmq_http_pub.mqtt_auth.password": "secret", "vmq_http_pub.mqtt_auth.client_id": "gw"})
    http, sub = Client(secured), watch(secured)
    try:
        key = secured.keystore.create("httppub")
        body = js(topic="t/alice/p", payload="pre", user="mallory", password="x")
        assert post(http, key, body)[:3:2] == (200, b"Published")
        assert sub.message().payload == b"pre"
        secured.apply_settings({"vmq_http_pub.mqtt_auth.password": "wrong"})
        assert post(http, key, js(topic="t/alice/p", payload="x"))[0] == 401
    finally:
        sub.close()
        http.close()


def test_publish_goes_through_the_plugin_hooks(node, pub):
    http, key, sub = pub
    seen = []

    def on_publish(user, sid, qos, topic, payload, retain):
        seen.append((user, sid, topic))
        return {"topic": "t/changed"} if topic == "t/change" else False if topic == "t/deny" else None
    node.hooks.register("auth_on_publish", on_publish)
    me = {"user": "u", "client_id": "c1"}
    assert post(http, key, js(topic="t/change", payload="x", **me))[0] == 200
    assert sub.message().topic == "t/changed"
    assert post(http, key, js(topic="t/deny", payload="x", **me))[0] == 403
    sub.no_message(0.1)
    assert seen[0] == ("u", ("", "c1"), "t/change")


def test_mountpoint_setting(make_node):
    node = make_node(**{"vmq_http_pub.mountpoint": "site1", "listener.mountpoint": "site1"})
    http, sub = Client(node), MqttClient(mqtt_port(node))
    try:
        sub.connect("s")
        sub.subscribe(("t/#", 0))
        assert post(http, node.keystore.create("httppub"), js(topic="t/m", payload="mp"))[0] == 200
        assert sub.message().payload == b"mp"
    finally:
        sub.close()
        http.close()


def test_noauth_mode_needs_no_key(make_node):
    node = make_node(**{"http_module.vmq_http_pub.auth.mode": "noauth"})
    http = Client(node)
    try:
        assert post(http, None, js(topic="t/x", payload="x"))[:3:2] == (200, b"Published")
    finally:
        http.close()


# -- API v2 -------------------------------------------------------------------------------

def v2(http, target, key, method="GET"):
    status, headers, data = http.request(method, "/api/v2/" + target, {"Authorization": basic(key)} if key else {})
    return status, headers, data


def test_api_v2_client_and_disconnect(node):
    http, c = Client(node), MqttClient(mqtt_port(node))
    try:
        key = node.keystore.create("api2")
        c.connect("dev1", clean=False)
        c.subscribe(("a/b", 1), ("c/#", 0))
        status, headers, data = v2(http, "client?client_id=dev1", key)
        assert status == 200 and headers["content-type"] == "application/json" and body_json(data) == \
            {"status": "online"}
        assert body_json(v2(http, "client?client_id=dev1&topics", key)[2]) == \
            {"status": "online", "topics": {"a/b": 1, "c/#": 0}}
        assert body_json(v2(http, "client?client_id=nobody&topics", key)[2]) == {"status": "unknown", "topics": []}
        assert body_json(v2(http, "client?client_id=dev1&mountpoint=other", key)[2]) == {"status": "unknown"}
        assert body_json(v2(http, "disconnect?client_id=dev1", key)[2]) == "ok"
        assert c.closed()
        assert body_json(v2(http, "client?client_id=dev1", key)[2]) == {"status": "offline"}
        assert body_json(v2(http, "disconnect?client_id=dev1&cleanup", key)[2]) == "ok"
        assert body_json(v2(http, "client?client_id=dev1", key)[2]) == {"status": "unknown"}
        assert body_json(v2(http, "disconnect?client_id=dev1", key)[2]) == "unknown"
    finally:
        c.close()
        http.close()


def test_api_v2_answers(node):
    http = Client(node)
    try:
        key = node.keystore.create("api2")
        assert v2(http, "bogus?client_id=x", key)[::2] == (400, b"invalid_command")
        assert v2(http, "client", key)[0] == 400
        assert v2(http, "client?client_id=x", None)[0] == 401
        assert v2(http, "client?client_id=x", node.keystore.create("mgmt"))[0] == 401
        status, headers, _ = v2(http, "client?client_id=x", key, method="POST")
        assert status == 405 and headers["allow"] == "GET, OPTIONS, HEAD"
        status, headers, _ = v2(http, "client?client_id=x", key, method="OPTIONS")
        assert status == 200 and headers["access-control-allow-methods"] == "HEAD, GET"
    finally:
        http.close()


def test_openapi_lists_api_v2_and_http_publish(node, key):
    from test_catalogue import check_openapi
    http = Client(node)
    try:
        status, _, data = http.get("/api/v1/openapi.json", key=key)
    finally:
        http.close()
    doc = body_json(data)
    check_openapi(doc)
    assert {"/api/v2/client", "/api/v2/disconnect", PUBLISH} <= set(doc["paths"])
    assert {"post", "put"} == set(doc["paths"][PUBLISH])
    assert "413" in doc["paths"][PUBLISH]["post"]["responses"]


def test_scopes_are_verneMQs_six_and_mgmt_ro():
    assert set(vmqapi.SCOPES) == {"status", "mgmt", "metrics", "health", "api2", "httppub", "mgmt_ro"}
    config = vmqapi.Config()
    assert config["http_module.vmq_http_pub.auth.mode"] == "apikey"
    assert config["http_module.vmq_http_v2_api.auth.mode"] == "apikey"
    assert config["vmq_http_pub.mqtt_auth.mode"] == "on-behalf-of"


def test_show_never_prints_the_predefined_password(node, key, client):
    status, _, data = client.get("/api/v1/set?vmq_http_pub.mqtt_auth.password=s3cret", key=key)
    assert status == 200
    status, _, data = client.get("/api/v1/show/vmq_http_pub.mqtt_auth.password", key=key)
    assert status == 200 and b"s3cret" not in data and b"********" in data, data


# -- HTTP publish checks a topic as an MQTT PUBLISH is checked --------------------------------------

from urllib.parse import quote  # noqa: E402

from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

BAD_TOPICS = {"nul": "a\x00b", "301-levels": "t/" * 300 + "x", "30002-levels": "/" * 30_001,
              "surrogate": "public/\ud800", "wildcard": "t/+/x", "empty": ""}


@pytest.mark.parametrize("form,topic", [pytest.param(form, topic, id=f"{form}-{name}")
                                        for name, topic in BAD_TOPICS.items() for form in ("json", "query")
                                        if form == "json" or len(topic) < 8000])  # a request line holds 8000
def test_a_topic_mqtt_refuses_is_refused_over_http_too(node, topic, form):
    """README (HTTP publish): a NUL, more than max_topic_levels levels, a lone surrogate were published,
    retained and delivered (the surrogate: a 500 with a traceback). Now 400 with the reason, and nothing
    reaches a subscriber or the retained store."""
    http, sub = Client(node), MqttClient(mqtt_port(node), version=5)
    try:
        key = node.keystore.create("httppub")
        sub.connect("watcher")
        sub.subscribe(("#", 0))
        if form == "json":
            status, _, data = post(http, key, js(topic=topic, payload="x", retain=True))
        else:
            query = "?retain=true&topic=" + quote(topic, safe="/", errors="surrogatepass")
            status, _, data = post(http, key, b"x", query=query)
        # the reason, or (a surrogate in a query) the query is not UTF-8
        assert status == 400 and (data.startswith(b"Invalid topic: ") or b"not UTF-8" in data), data[:200]
        sub.no_message(0.2)
    finally:
        sub.close()
        http.close()
    late = MqttClient(mqtt_port(node))
    try:
        late.connect("late")
        late.subscribe(("#", 0))
        late.no_message(0.2)  # nothing was retained
    finally:
        late.close()


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(topic=st.text(max_size=40) | st.text(alphabet="/\x00+#$\ud800a", max_size=300))
@example(topic="public/\ud800")
@example(topic="a" + "/" * 250)
def test_no_topic_string_makes_http_publish_answer_5xx(node, topic):
    http = Client(node)
    try:
        key = node.keystore.create("httppub")
        status, _, data = post(http, key, js(topic=topic, payload="x", user=topic, client_id=topic,
                                             user_properties={topic: topic}))
        assert status < 500, (status, data[:300])
        query = "?topic=" + quote(topic, safe="", errors="surrogatepass")
        status, _, data = post(http, key, b"x", query=query)
        assert status < 500, (status, data[:300])
    finally:
        http.close()


@pytest.mark.parametrize("query", ["client_id=a%00b", "client_id=x&mountpoint=%00", "client_id=" + "a" * 70_000])
def test_api_v2_refuses_ids_no_mqtt_client_could_have(node, query):
    http = Client(node)
    try:
        status, _, data = v2(http, "client?" + query, node.keystore.create("api2"))
        assert status in (400, 414), (status, data[:200])
    finally:
        http.close()


# -- the OpenAPI document says what the node sends ---------------------------------------------------

def _raw(node, data):
    """Send raw bytes to the HTTP listener; return (status, content type, body) of the answer."""
    import socket
    port = next(x["port"] for x in node.listeners() if x["type"] == "http")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                dict(line.split(b": ", 1) for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
                     if b": " in line).get(b"Content-Length", b"0")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    fields = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
    return int(head.split(b" ")[1]), fields.get("content-type", ""), body


def test_the_openapi_document_describes_every_answer_of_http_publish_and_api_v2(make_node, tmp_path):
    """README (HTTP publish): the document said HTTP publish answers 401 as text/plain, but without a key
    the node sends a JSON error. Every answer provoked here (status and content type) is in the document,
    and every status and type the document lists for these paths is provoked, but 500 and 503."""
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.write_text("u:" + vmqapi.hash_password("p") + "\n")
    os.chmod(passwd, 0o600)
    acl.write_text("user u\ntopic write ok/#\n")
    node = make_node(**{"allow_anonymous": "off", "vmq_passwd.password_file": str(passwd),
                        "vmq_acl.acl_file": str(acl), "max_message_size": "10", "listener.max_body_size": "1000",
                        "max_retained_messages": "0"})
    http = Client(node)
    doc = body_json(http.get("/api/v1/openapi.json", key=node.keystore.create("mgmt"))[2])
    pub_key, v2_key = node.keystore.create("httppub"), node.keystore.create("api2")
    auth = {"Authorization": basic(pub_key)}
    seen = {PUBLISH: set(), "/api/v2/client": set()}

    def check(path, status, kind, body):
        kind = kind.split(";")[0].strip()
        responses = doc["paths"][path]["post" if path == PUBLISH else "get"]["responses"]
        assert kind in responses.get(str(status), {}).get("content", {}), (path, status, kind, body[:200])
        if kind == "application/json" and status >= 400:
            assert {"error", "text", "type"} <= set(body_json(body)), body
        seen[path].add((str(status), kind))

    def publish(body=b"", query="", headers=auth, **fields):
        status, hdrs, data = http.request("POST", PUBLISH + query, {**headers, **fields}, body)
        check(PUBLISH, status, hdrs.get("content-type", ""), data)
        return status

    def v2(target, headers=None, body=b""):
        status, hdrs, data = http.request("GET", "/api/v2/" + target, {"Authorization": basic(v2_key),
                                                                         **(headers or {})}, body)
        check("/api/v2/client", status, hdrs.get("content-type", ""), data)
        return status

    try:
        assert publish(js(topic="ok/a", payload="x", user="u", password="p")) == 200
        assert publish(js(topic="a\x00", payload="x", user="u", password="p")) == 400  # text
        assert publish(js(topic="ok/a", payload="x"), query="?%zz") == 400  # JSON: the query
        assert publish(js(topic="ok/a", payload="x"), headers={"Authorization": "Basic !!!"}) == 400  # JSON
        assert publish(js(topic="ok/a", payload="x"), headers={}) == 401  # JSON: no key
        assert publish(js(topic="ok/a", payload="x", user="u", password="bad")) == 401  # text
        assert publish(js(topic="no/a", payload="x", user="u", password="p")) == 403  # text
        assert publish(js(topic="ok/a", payload="x", user="u", password="p"),
                       headers={**auth, "Sec-Fetch-Site": "cross-site"}) == 403  # JSON: another site's page
        assert publish(js(topic="ok/a", payload="x" * 20, user="u", password="p")) == 413  # text
        assert publish(b"x" * 2000, query="?topic=ok/a") == 413  # JSON: the body
        assert publish(js(topic="ok/a", payload="x", user="u", password="p", retain=True)) == 507
        assert publish(query="?topic=" + "a" * 9000) == 414
        assert publish(b"", X=["y" * 70_000][0]) == 431
        status, kind, body = _raw(node, b"POST " + PUBLISH.encode() + b" HTTP/2.0\r\n\r\n")
        check(PUBLISH, status, kind, body)

        assert v2("client?client_id=x") == 200
        assert v2("bogus?client_id=x") == 400  # text
        assert v2("client") == 400  # JSON
        assert v2("client?client_id=x", {"Authorization": basic(pub_key)}) == 401
        assert v2("client?client_id=x", {"Accept": "text/html"}) == 406
        assert v2("client?client_id=x", body=b"x" * 2000) == 413
        assert v2("client?client_id=" + "a" * 9000) == 414
        assert v2("client?client_id=x", {"X": "y" * 70_000}) == 431
        status, kind, body = _raw(node, b"GET /api/v2/client?client_id=x HTTP/2.0\r\n\r\n")
        check("/api/v2/client", status, kind, body)
        status, hdrs, data = http.request("GET", "/api/v2/disconnect?client_id=x", {
            "Authorization": basic(v2_key), "Origin": "http://elsewhere.example"})
        assert status == 403 and "403" in doc["paths"]["/api/v2/disconnect"]["get"]["responses"]
        assert "403" not in doc["paths"]["/api/v2/client"]["get"]["responses"]  # it changes nothing
        assert {"error", "text", "type"} <= set(body_json(data)), data
    finally:
        http.close()
    for path, method in ((PUBLISH, "post"), ("/api/v2/client", "get")):
        listed = {(code, kind) for code, answer in doc["paths"][path][method]["responses"].items()
                  for kind in answer.get("content", {}) if code not in ("500", "503")}
        assert listed == seen[path], (path, listed ^ seen[path])
