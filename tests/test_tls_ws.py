"""TLS and WebSocket listeners: certificates made at run time with openssl, MQTT over both."""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from conftest import Client, body_json
from mqtt_client import MqttClient, WsMqttClient
import vmqapi


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate, and one from another CA."""
    if shutil.which("openssl") is None:
        print("SKIPPED REASON: no openssl command to make test certificates")
        pytest.skip("no openssl command to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other"):  # CA extensions that strict X.509 checking (Python 3.13's default) asks for
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", f"/CN={ca}",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d)
    leaf = "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\nbasicConstraints=CA:FALSE\n"
    (d / "server.cnf").write_text(leaf + "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "leaf.cnf").write_text(leaf)
    for name, ca, cn in (("server", "ca", "localhost"), ("client", "ca", "device-7"), ("rogue", "other", "rogue")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", "30", "-out", f"{name}.pem",
                "-extfile", "server.cnf" if name == "server" else "leaf.cnf", cwd=d)
    return d


def client_context(pki, cert=None):
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


def tls_node(make_node, pki, kind="ssl", **extra):
    return make_node(**{f"listener.{kind}.secure": "127.0.0.1:0", f"listener.{kind}.certfile": str(pki / "server.pem"),
                        f"listener.{kind}.keyfile": str(pki / "server.key"),
                        f"listener.{kind}.cafile": str(pki / "ca.pem"), **extra})


def port_of(node, kind):
    return next(x["port"] for x in node.listeners() if x["type"] == kind)


def test_mqtt_over_tls(make_node, pki):
    node = tls_node(make_node, pki)
    c = MqttClient(port_of(node, "mqtts"), tls=client_context(pki))
    try:
        assert c.connect("tls-client").return_code == 0
        c.subscribe(("t", 1))
        c.publish("t", b"secret", 1)
        assert c.message().payload == b"secret"
    finally:
        c.close()
    key = node.keystore.create()
    http = Client(node)
    try:
        rows = body_json(http.get("/api/v1/listener/show?--tls", key=key)[2])["table"]
        row = next(r for r in rows if r["type"] == "mqtts")
        assert row["certfile"] == str(pki / "server.pem") and row["tls_version"] == "tlsv1.2"
    finally:
        http.close()


def test_required_certificate_and_wrong_ca(make_node, pki):
    node = tls_node(make_node, pki, **{"listener.ssl.secure.require_certificate": "on"})
    port = port_of(node, "mqtts")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c = MqttClient(port, tls=client_context(pki))
        c.connect("no-cert")  # TLS 1.3 may report the refusal only on the first read
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c = MqttClient(port, tls=client_context(pki, "rogue"))
        c.connect("rogue")
    good = MqttClient(port, tls=client_context(pki, "client"))
    try:
        assert good.connect("with-cert").return_code == 0
    finally:
        good.close()


def test_identity_as_username(make_node, pki):
    node = tls_node(make_node, pki, allow_anonymous="off", **{"listener.ssl.secure.require_certificate": "on",
                                                             "listener.ssl.secure.use_identity_as_username": "on"})
    c = MqttClient(port_of(node, "mqtts"), tls=client_context(pki, "client"))
    try:
        assert c.connect("dev", username="ignored", password=b"x").return_code == 0
        key = node.keystore.create()
        http = Client(node)
        try:
            rows = body_json(http.get("/api/v1/session/show?--client_id=dev&--user", key=key)[2])["table"]
            assert rows == [{"user": "device-7"}]
        finally:
            http.close()
    finally:
        c.close()


def test_bad_certificate_file_stops_the_node(tmp_path, pki):
    from conftest import node_config
    node = vmqapi.Node(node_config(tmp_path / "d", **{"listener.ssl.x": "127.0.0.1:0",
                                                     "listener.ssl.x.certfile": str(tmp_path / "missing.pem")}))
    with pytest.raises(vmqapi.ConfigError, match="listener.ssl.x"):
        node.start()
    node.stop()


# -- WebSocket ---------------------------------------------------------------------------

def ws_node(make_node):
    return make_node(**{"listener.ws.web": "127.0.0.1:0"})


def test_mqtt_over_websocket(make_node):
    node = ws_node(make_node)
    port = port_of(node, "mqttws")
    c = WsMqttClient(port)
    try:
        assert c.handshake.startswith("HTTP/1.1 101 ")
        assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in c.handshake  # RFC 6455 1.3's example
        assert "Sec-WebSocket-Protocol: mqtt" in c.handshake
        assert c.connect("ws-client").return_code == 0
        c.subscribe(("w", 1))
        tcp = MqttClient(port_of(node, "mqtt"))
        tcp.connect("tcp-pub")
        tcp.publish("w", b"x" * 300, 1)  # a 16-bit frame length
        assert c.message().payload == b"x" * 300
        tcp.close()
    finally:
        c.close()


def test_fragmented_message_and_ping(make_node):
    node = ws_node(make_node)
    c = WsMqttClient(port_of(node, "mqttws"))
    try:
        data = vmqapi.encode_packet(vmqapi.Connect("frag"))
        c.sock.sendall(c.frame(2, data[:5], fin=False) + c.frame(9, b"hi") + c.frame(0, data[5:9], fin=False)
                       + c.frame(0, data[9:]))
        assert c.expect(vmqapi.Connack).return_code == 0
        assert c.ping()
    finally:
        c.close()


@pytest.mark.parametrize("frame, code", [
    (WsMqttClient.frame(2, b"\x10\x00", mask=False), 1002),
    (WsMqttClient.frame(1, b"text"), 1003),
    (bytes((0xC2, 0x80)) + b"\x00\x00\x00\x00", 1002),  # a reserved bit
])
def test_websocket_violations_close_with_a_code(make_node, frame, code):
    node = ws_node(make_node)
    c = WsMqttClient(port_of(node, "mqttws"))
    try:
        c.sock.sendall(frame)
        assert c.closed(3) and c.close_code == code
    finally:
        c.close()


def test_websocket_frame_size_limit(make_node):
    node = make_node(**{"listener.ws.web": "127.0.0.1:0", "max_ws_frame_size": "64"})
    c = WsMqttClient(port_of(node, "mqttws"))
    try:
        c.sock.sendall(c.frame(2, b"x" * 100))
        assert c.closed(3) and c.close_code == 1009
    finally:
        c.close()


@pytest.mark.parametrize("path, protocol, status", [("/other", "mqtt", "404"), ("/mqtt", "chat", "400")])
def test_websocket_handshake_refusals(make_node, path, protocol, status):
    node = ws_node(make_node)
    c = WsMqttClient(port_of(node, "mqttws"), path=path, protocol=protocol)
    try:
        assert c.handshake.split(" ")[1] == status
    finally:
        c.close()


def test_mqtt_over_secure_websocket(make_node, pki):
    node = tls_node(make_node, pki, kind="wss")
    c = WsMqttClient(port_of(node, "mqttwss"), tls=client_context(pki))
    try:
        assert c.connect("wss-client").return_code == 0
        assert c.ping()
    finally:
        c.close()


# -- HTTPS, tls show and check, TLS and WebSocket listeners started at run time -------------

def https_get(port, path, key, pki):
    import http.client
    from conftest import basic
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(pki), timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": basic(key)})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_admin_api_over_https_and_tls_commands(make_node, pki):
    node = make_node(**{"listener.https.admin": "127.0.0.1:0", "listener.https.admin.certfile": str(pki / "server.pem"),
                        "listener.https.admin.keyfile": str(pki / "server.key")})
    key = node.keystore.create()
    port = port_of(node, "https")
    status, body = https_get(port, "/api/v1/cluster/show", key, pki)
    assert status == 200 and body_json(body)["table"][0]["Running"] is True
    status, body = https_get(port, "/api/v1/tls/show", key, pki)
    (row,) = body_json(body)["table"]
    assert row["File"] == str(pki / "server.pem") and row["CN"] == "localhost" and row["Issuer"] == "ca"
    assert "127.0.0.1" in row["SAN"]
    status, body = https_get(port, "/api/v1/tls/check", key, pki)
    assert body_json(body) == {"text": "All fine", "type": "text"}
    status, body = https_get(port, "/api/v1/tls/check?--validity=3456000", key, pki)  # certificates last 30 days
    assert body_json(body)["table"][0]["SecExp"] < 3456000
    with socket_to(port) as raw:  # plain HTTP on the HTTPS port: the handshake fails, the node carries on
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert https_get(port, "/api/v1/cluster/show", key, pki)[0] == 200


def test_tls_show_reads_certificates_as_ssl_decodes_them(pki, tmp_path):
    """tls show's own X.509 reader agrees with the ssl module's decoding: names, dates, every SAN kind."""
    (tmp_path / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1,IP:2001:db8::1,email:a@b.c,"
                                      "URI:http://x/y,otherName:1.2.3.4;UTF8:hi\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-utf8", "-subj", "/C=DE/CN=l\u00f3calhost/CN=second",
            "-keyout", "s.key", "-out", "s.csr", cwd=tmp_path)
    openssl("x509", "-req", "-in", "s.csr", "-CA", str(pki / "ca.pem"), "-CAkey", str(pki / "ca.key"),
            "-CAcreateserial", "-days", "20000", "-extfile", "san.cnf", "-out", "s.pem", cwd=tmp_path)
    (tmp_path / "both.pem").write_bytes((tmp_path / "s.key").read_bytes() + (tmp_path / "s.pem").read_bytes())
    got = vmqapi.decode_certificate((tmp_path / "both.pem").read_bytes())
    assert got == {"CN": "l\u00f3calhost", "Issuer": "ca", "Not_Before": got["Not_Before"],
                   "Not_After": got["Not_After"], "SAN": "localhost, 127.0.0.1, 2001:DB8:0:0:0:0:0:1, a@b.c, "
                                                        "http://x/y, <unsupported>"}
    assert got["Not_After"].endswith(" GMT") and int(got["Not_After"].split()[3]) >= 2080  # GeneralizedTime
    (row,) = vmqapi.certificate_rows([str(tmp_path / "s.pem")], 0)
    assert row["expires"] == ssl.cert_time_to_seconds(got["Not_After"])
    (row,) = vmqapi.certificate_rows([str(tmp_path / "s.key")], 7)
    assert row["CN"].startswith("unreadable") and row["expires"] == 7


def test_the_certificate_reader_takes_what_openssl_takes(pki):
    """The older X509 CERTIFICATE label, an IP entry that is no address (shown <invalid>, as ssl shows it)."""
    pem = (pki / "server.pem").read_bytes()
    labelled = pem.replace(b"BEGIN CERTIFICATE", b"BEGIN X509 CERTIFICATE").replace(b"END CERTIFICATE",
                                                                                    b"END X509 CERTIFICATE")
    assert vmqapi.decode_certificate(labelled) == vmqapi.decode_certificate(pem)
    assert vmqapi._san_value(0x87, bytes([127, 0, 0, 1])) == "127.0.0.1"
    assert vmqapi._san_value(0x87, bytes(8)) == "<invalid>"  # an address with its mask
    assert vmqapi._san_value(0x82, "b\u00fccher.example".encode()) == "b\u00fccher.example"
    with pytest.raises(ValueError):
        vmqapi._der_time(0x17, b"260007083400Z")  # month 00


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_bytes_in_a_certificate_file_give_a_row_never_an_exception(tmp_path_factory, pki, data):
    """tls show's X.509 reader on a damaged certificate (a byte changed, cut short, a date no calendar has)."""
    pem = (pki / "server.pem").read_bytes()
    der = bytearray(base64.b64decode(b"".join(pem.split(b"-----")[2].split())))
    dates = [i + 2 + k for i in range(len(der) - 15) if der[i] == 0x17 and der[i + 1] == 13 for k in range(13)]
    for _ in range(data.draw(st.integers(1, 4))):  # anywhere, or in the validity's UTCTime digits
        at = data.draw(st.one_of(st.integers(0, len(der) - 1), st.sampled_from(dates)))
        der[at] = data.draw(st.sampled_from(b"0123456789Z+-\x00\x17\x18\x30\xff"))
    if data.draw(st.booleans()):
        der = der[:data.draw(st.integers(0, len(der)))]
    path = tmp_path_factory.mktemp("cert") / "bad.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(der)) + b"-----END CERTIFICATE-----\n")
    (row,) = vmqapi.certificate_rows([str(path)], 5)
    assert row["File"] == str(path) and isinstance(row["expires"], float | int)


def test_https_connections_beyond_max_connections_are_closed(make_node, pki):
    node = make_node(**{"listener.https.admin": "127.0.0.1:0", "listener.https.admin.certfile": str(pki / "server.pem"),
                        "listener.https.admin.keyfile": str(pki / "server.key"),
                        "listener.https.admin.max_connections": "1"})
    port = port_of(node, "https")
    held = client_context(pki).wrap_socket(socket_to(port), server_hostname="localhost")
    try:
        # Refused at accept, before any thread or handshake (http.server hands a thread only the
        # connections it serves): the client's handshake meets the FIN. No answer either way.
        raw = refused = socket_to(port)
        try:
            refused = client_context(pki).wrap_socket(raw, server_hostname="localhost")
            refused.sendall(b"GET /health HTTP/1.1\r\n\r\n")
            got = refused.recv(100)
        except (ConnectionResetError, ssl.SSLError):
            got = b""  # the handshake was cut short
        finally:
            refused.close()  # the TLS socket once the handshake got that far, else the plain one
        assert got == b""  # closed without an answer
        held.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        assert held.recv(100).startswith(b"HTTP/1.1 200 ")
    finally:
        held.close()


def test_http_and_https_listeners_at_run_time(node, pki):
    import http.client
    key = node.keystore.create()
    admin = Client(node)
    ports = []
    try:
        for flags in ("&--http", f"&--http&--ssl&--certfile={pki / 'server.pem'}&--keyfile={pki / 'server.key'}"):
            with socket_to_free() as port:
                pass
            ports.append(port)
            _, _, data = admin.get(f"/api/v1/listener/start?address=127.0.0.1&port={port}{flags}", key=key)
            assert body_json(data) == {"text": "Done", "type": "text"}
        assert http_get(ports[0], "/health") == 200
        assert https_get(ports[1], "/api/v1/cluster/show", key, pki)[0] == 200
        rows = {r["port"]: r for r in body_json(admin.get("/api/v1/listener/show", key=key)[2])["table"]}
        assert (rows[str(ports[0])]["type"], rows[str(ports[1])]["type"]) == ("http", "https")
        kept = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=5)  # a keep-alive client
        kept.request("GET", "/health")
        assert kept.getresponse().read() == b'{"status":"OK"}'
        admin.get(f"/api/v1/listener/stop?address=127.0.0.1&port={ports[0]}", key=key)
        with pytest.raises(OSError):
            http_get(ports[0], "/health")  # suspended: no new connections
        kept.request("GET", "/health")
        assert kept.getresponse().status == 503  # ... the open ones stay, and health reports the suspension
        kept.close()
        _, _, data = admin.get(f"/api/v1/listener/restart?address=127.0.0.1&port={ports[0]}", key=key)
        assert body_json(data) == {"text": "Done", "type": "text"}
        assert http_get(ports[0], "/health") == 200
        for port in ports:
            _, _, data = admin.get(f"/api/v1/listener/delete?address=127.0.0.1&port={port}", key=key)
            assert body_json(data) == {"text": "Done", "type": "text"}
        rows = body_json(admin.get("/api/v1/listener/show", key=key)[2])["table"]
        assert not {str(p) for p in ports} & {r["port"] for r in rows}
    finally:
        admin.close()


def test_tls_mqtt_listener_stop_and_restart(node, pki):
    key = node.keystore.create()
    admin = Client(node)
    try:
        with socket_to_free() as port:
            pass
        admin.get(f"/api/v1/listener/start?address=127.0.0.1&port={port}&--ssl&--certfile={pki / 'server.pem'}"
                  f"&--keyfile={pki / 'server.key'}", key=key)
        c = MqttClient(port, tls=client_context(pki))
        assert c.connect("tls-kept").return_code == 0
        _, _, data = admin.get(f"/api/v1/listener/stop?address=127.0.0.1&port={port}&--kill_sessions", key=key)
        assert body_json(data) == {"text": "Done", "type": "text"}
        assert c.closed(3)
        c.close()
        _, _, data = admin.get(f"/api/v1/listener/restart?address=127.0.0.1&port={port}", key=key)
        assert body_json(data) == {"text": "Done", "type": "text"}
        c = MqttClient(port, tls=client_context(pki))
        assert c.connect("tls-back").return_code == 0
        c.close()
    finally:
        admin.close()


def http_get(port, path):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def socket_to_free():
    import contextlib
    import socket

    @contextlib.contextmanager
    def free():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            yield s.getsockname()[1]
    return free()


def socket_to(port):
    import socket
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_cli_reaches_a_node_that_only_speaks_https(make_node, pki):
    from conftest import run_cli
    from pathlib import Path
    node = make_node(**{"listener.http.default": "127.0.0.1:0", "listener.https.admin": "127.0.0.1:0",
                        "listener.https.admin.certfile": str(pki / "server.pem"),
                        "listener.https.admin.keyfile": str(pki / "server.key")})
    result = run_cli("admin", "listener", "show", data_dir=Path(node.data_dir))
    assert result.returncode == 0 and "|https|running|" in result.stdout


def test_tls_and_websocket_listeners_started_at_run_time(node, pki):
    key = node.keystore.create()
    http = Client(node)
    try:
        tls_flags = (f"&--ssl&--certfile={pki / 'server.pem'}&--keyfile={pki / 'server.key'}"
                     f"&--cafile={pki / 'ca.pem'}")
        for flags, kind in ((tls_flags, "mqtts"), ("&--websocket", "mqttws"), (tls_flags + "&--websocket", "mqttwss")):
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            _, _, data = http.get(f"/api/v1/listener/start?address=127.0.0.1&port={port}{flags}", key=key)
            assert body_json(data) == {"text": "Done", "type": "text"}, kind
            tls = client_context(pki) if "ssl" in flags else None
            c = WsMqttClient(port, tls=tls) if "websocket" in flags else MqttClient(port, tls=tls)
            try:
                assert c.connect(f"late-{kind}").return_code == 0
            finally:
                c.close()
        _, _, data = http.get("/api/v1/listener/start?address=127.0.0.1&port=1&--ssl&--certfile=/nonexistent",
                              key=key)
        assert body_json(data)["alert"][0]["text"].startswith("can't start listener due to")
    finally:
        http.close()


def test_an_https_client_that_sends_nothing_after_its_handshake_is_cut_after_http_request_timeout(make_node, pki):
    """A TLS connection keeps a Python timeout per read: in blocking mode ssl would retry past the kernel's."""
    import socket
    import time
    node = make_node(**{"listener.https.admin": "127.0.0.1:0", "listener.https.admin.certfile": str(pki / "server.pem"),
                        "listener.https.admin.keyfile": str(pki / "server.key"), "http_request_timeout": "1"})
    port = port_of(node, "https")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_context(pki).wrap_socket(raw, server_hostname="localhost") as tls:
            started = time.monotonic()
            try:
                ended = tls.recv(1024)  # the node closes: the end of the stream (or its TLS alert)
            except (ssl.SSLError, ConnectionResetError):
                ended = b""
            assert ended == b"" and time.monotonic() - started < 6
    key = node.keystore.create()
    assert https_get(port, "/api/v1/cluster/show", key, pki)[0] == 200


def _mapped_libraries(pid):
    with open(f"/proc/{pid}/maps") as fh:
        return {line.rsplit("/", 1)[-1].strip() for line in fh if ".so" in line}


def _openssl_loaded(pid):
    return any(name.startswith(("libcrypto", "libssl", "_ssl", "_hashlib")) for name in _mapped_libraries(pid))


def test_a_node_started_as_a_script_loads_openssl_at_its_first_tls_listener(tmp_path, pki):
    """Passwords (SHA-512), API keys (SHA-256), a WebSocket handshake (SHA-1) need no OpenSSL; TLS brings it."""
    import http.client
    from conftest import password_file, run_cli
    from test_cli import start_node_process, stop_process, wait_for_node_file
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    passwd = password_file(tmp_path / "passwd", joe="secret")
    proc = start_node_process(data_dir, "--set", "listener.ws.web=127.0.0.1:0", "--set", "allow_anonymous=off",
                              "--set", f"vmq_passwd.password_file={passwd}")
    try:
        info = wait_for_node_file(data_dir, proc)
        ports = {x["type"]: x["port"] for x in info["listeners"]}
        key = run_cli("admin", "api-key", "create", data_dir=data_dir).stdout.strip()
        conn = http.client.HTTPConnection("127.0.0.1", ports["http"], timeout=10)
        conn.request("GET", "/api/v1/session/show", headers={"Authorization": "Basic " + base64.b64encode(
            f"{key}:".encode()).decode()})
        assert conn.getresponse().status == 200
        conn.close()
        for client in (MqttClient(ports["mqtt"]), WsMqttClient(ports["mqttws"])):
            try:
                assert client.connect("joe-" + type(client).__name__, username="joe", password=b"secret").return_code == 0
            finally:
                client.close()
        refused = MqttClient(ports["mqtt"])
        try:
            assert refused.connect("intruder", username="joe", password=b"wrong").return_code != 0
        finally:
            refused.close()
        assert not _openssl_loaded(proc.pid), "OpenSSL loaded without TLS"

        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started = run_cli("admin", "listener", "start", "address=127.0.0.1", f"port={port}", "--ssl",
                          f"--certfile={pki / 'server.pem'}", f"--keyfile={pki / 'server.key'}", data_dir=data_dir)
        assert started.returncode == 0, started.stderr
        tls = MqttClient(port, tls=client_context(pki))
        try:
            assert tls.connect("joe-tls", username="joe", password=b"secret").return_code == 0
            tls.subscribe(("t", 1))
            tls.publish("t", b"over tls", 1)
            assert tls.message().payload == b"over tls"
        finally:
            tls.close()
        assert _openssl_loaded(proc.pid)
    finally:
        stop_process(proc)
