"""Cluster links: handshake, frames, buffers, reconnects, heartbeats, hostile clients.

Every test runs its ClusterLinks on one asyncio loop of its own, on 127.0.0.1 port 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

import vmqapi

COOKIE = "s3cret-cookie-of-the-tests"


class Recorder:
    """The callbacks of one ClusterLinks, recorded."""

    def __init__(self):
        self.ups, self.downs, self.frames = [], [], []

    def on_up(self, peer):
        self.ups.append(peer)

    def on_down(self, peer, reason):
        self.downs.append((peer, reason))

    def on_frame(self, peer, kind, body):
        self.frames.append((peer, kind, body))


def make(name, cookie=COOKIE, buffer_size=10000, **kw):
    """A ClusterLinks on the running loop, with a Recorder as ``.rec`` and its own Metrics as ``.m``."""
    rec, metrics = Recorder(), vmqapi.Metrics()
    links = vmqapi.ClusterLinks(asyncio.get_running_loop(), name, cookie, metrics, buffer_size=buffer_size,
                                on_up=rec.on_up, on_down=rec.on_down, on_frame=rec.on_frame, **kw)
    links.rec, links.m = rec, metrics
    return links


async def until(cond, timeout=5.0):
    """Wait until ``cond()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def run(coro, timeout=30):
    asyncio.run(asyncio.wait_for(coro, timeout))


async def closing(*links):
    for x in links:
        await x.close()


async def pair(**kw):
    """Two linked nodes a and b (a dialed b)."""
    a, b = make("a", **kw), make("b", **kw)
    await a.listen("127.0.0.1", 0)
    await b.listen("127.0.0.1", 0)
    a.connect("b", *b.bound)
    await until(lambda: a.is_up("b") and b.is_up("a"))
    return a, b


def up_links(links):
    """The PeerLinks of ``links`` in stage UP, counted from the peers and the pending handshakes."""
    found = {e.link for e in links.peers.values() if e.link is not None}
    found |= {e.dialing for e in links.peers.values() if e.dialing is not None}
    return [x for x in found | set(links.pending) if x.stage is vmqapi.LinkStage.UP]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- framing (pure) --

@given(st.lists(st.tuples(st.integers(16, 255), st.binary(max_size=300)), max_size=20), st.data())
@settings(max_examples=100, deadline=None)
def test_frames_decode_whatever_the_reads(frames, data):
    wire = b"".join(vmqapi.encode_cluster_frame(k, b) for k, b in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    buf, pos, out = bytearray(), 0, []
    for start, end in zip([0, *cuts], [*cuts, len(wire)]):
        buf += wire[start:end]
        while (frame := vmqapi.decode_cluster_frame(buf, pos, 1000)) is not None:
            kind, body, pos = frame
            out.append((kind, body))
    assert out == frames and pos == len(wire)


def test_a_frame_over_the_limit_is_refused_from_its_header():
    with pytest.raises(vmqapi.ClusterError):
        vmqapi.decode_cluster_frame(b"\xff\xff\xff\xff\x10", 0, vmqapi.CLUSTER_MAX_FRAME)
    with pytest.raises(vmqapi.ClusterError):
        vmqapi.decode_cluster_frame(b"\x00\x00\x00\x00\x10", 0, 100)
    assert vmqapi.decode_cluster_frame(b"\x00\x00\x00\x05\x10ab", 0, 100) is None


# -- links --

def test_handshake_and_frames_both_ways_in_order():
    async def main():
        a, b = await pair()
        assert a.rec.ups == ["b"] and b.rec.ups == ["a"]
        for i in range(500):
            assert a.send("b", 16 + i % 200, b"a%d" % i)
            assert b.send("a", 17, b"b%d" % i)
        await until(lambda: len(a.rec.frames) == 500 and len(b.rec.frames) == 500)
        assert b.rec.frames == [("a", 16 + i % 200, b"a%d" % i) for i in range(500)]
        assert a.rec.frames == [("b", 17, b"b%d" % i) for i in range(500)]
        assert a.m.value("cluster_bytes_sent") > 500 * 7 and b.m.value("cluster_bytes_received") > 500 * 7
        assert [r["name"] for r in a.rows()] == ["b"] and a.rows()[0]["up"] is True
        with pytest.raises(ValueError):
            a.send("b", 3, b"links' own kind")
        await closing(a, b)
    run(main())


def test_wrong_cookie_is_refused_on_both_sides_and_logged(caplog):
    async def main():
        a, b = make("a"), make("b", cookie="another")
        await b.listen("127.0.0.1", 0)
        with caplog.at_level(logging.WARNING, logger="vmqapi"):
            a.connect("b", *b.bound)
            await until(lambda: sum("wrong cookie" in r.getMessage() for r in caplog.records) >= 2)
            await asyncio.sleep(0.3)
        assert a.rec.ups == b.rec.ups == [] and not a.is_up("b")
        refusals = [r for r in caplog.records if "wrong cookie" in r.getMessage()]
        assert all(r.levelno == logging.WARNING and r.exc_info is None for r in refusals)
        assert any("127.0.0.1" in r.getMessage() and "from" in r.getMessage() for r in refusals)  # b's side
        assert any("to b" in r.getMessage() for r in refusals)  # a's side
        await closing(a, b)
    run(main())


def test_probe_answers():
    async def main():
        a, b, also_a = make("a"), make("b"), make("a")
        await b.listen("127.0.0.1", 0)
        await also_a.listen("127.0.0.1", 0)
        assert await a.probe(*b.bound) == "b"
        assert b.rec.ups == [] and b.rec.downs == []  # a probe never links
        with pytest.raises(vmqapi.ClusterError, match="^unreachable: 127.0.0.1:.*refused"):
            await a.probe("127.0.0.1", free_port())
        with pytest.raises(vmqapi.ClusterError, match="^name already taken"):
            await a.probe(*also_a.bound)
        wrong = make("c", cookie="another")
        with pytest.raises(vmqapi.ClusterError, match="^wrong cookie$"):
            await wrong.probe(*b.bound)
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
        with pytest.raises(vmqapi.ClusterError, match="^no handshake"):
            await a.probe(*silent.sockets[0].getsockname()[:2], timeout=0.5)
        silent.close()
        await closing(a, b, also_a, wrong)
    run(main())


def kill(links):
    """Stop a node abruptly: its listener and every socket, no goodbye."""
    links._server.close()
    links._closed = True
    for entry in links.peers.values():
        for link in (entry.link, entry.dialing):
            if link is not None and link.transport is not None:
                link.transport.abort()


def test_peer_killed_frames_wait_and_follow_in_order_when_it_is_back():
    async def main():
        a, b = await pair()
        port = b.bound[1]
        kill(b)
        await until(lambda: a.rec.downs)
        assert a.rec.downs[0][0] == "b" and not a.is_up("b")
        for i in range(20):
            assert a.send("b", 20, b"%d" % i)
        assert a.rows()[0]["buffered"] == sum(len(b"%d" % i) + 5 for i in range(20))
        b2 = make("b")
        await b2.listen("127.0.0.1", port)
        await until(lambda: len(b2.rec.frames) == 20, timeout=8)  # a redials by itself
        assert b2.rec.frames == [("a", 20, b"%d" % i) for i in range(20)]
        assert a.rows()[0]["buffered"] == 0 and a.rec.ups == ["b", "b"]
        await closing(a, b2)
    run(main())


def test_buffer_overflow_drops_and_counts():
    async def main():
        a = make("a", buffer_size=1000)
        a.connect("b", "127.0.0.1", free_port())  # nobody there
        sent = [a.send("b", 16, b"x" * 150) for _ in range(10)]  # 155 bytes each with the header
        assert sent == [True] * 6 + [False] * 4
        assert a.m.value("cluster_bytes_dropped") == 4 * 155
        assert a.rows()[0]["buffered"] == 6 * 155
        assert not a.send("nobody", 16, b"y")  # an unknown peer: dropped too
        a.forget("b")
        assert a.rows() == []
        await closing(a)
    run(main())


def test_simultaneous_dials_keep_one_link():
    """Both dial at once (or nearly: whichever handshake is first): one link stays, the same on both sides."""
    async def main():
        for first, delay in (("a", 0), ("b", 0), ("a", 0.002), ("b", 0.002), ("b", 0.01)):
            a, b = make("a"), make("b")
            await a.listen("127.0.0.1", 0)
            await b.listen("127.0.0.1", 0)
            a.send("b", 16, b"early")  # unknown yet: dropped
            x, y = (a, b) if first == "a" else (b, a)
            x.connect(y.me, *y.bound)
            await asyncio.sleep(delay)
            y.connect(x.me, *x.bound)
            a.send("b", 16, b"first")
            b.send("a", 16, b"first")
            await until(lambda: a.is_up("b") and b.is_up("a"))
            for i in range(50):
                a.send("b", 16, b"%d" % i)
                b.send("a", 16, b"%d" % i)
            await asyncio.sleep(0.3)
            assert a.rec.ups == ["b"] and b.rec.ups == ["a"] and a.rec.downs == b.rec.downs == []
            (la,), (lb,) = up_links(a), up_links(b)
            assert la.transport.get_extra_info("sockname") == lb.transport.get_extra_info("peername")
            if delay == 0:
                assert la.dialer  # both live at once: the one a (the smaller name) dialed
            expected = [b"first"] + [b"%d" % i for i in range(50)]
            assert [f[2] for f in b.rec.frames] == expected and [f[2] for f in a.rec.frames] == expected
            await closing(a, b)
    run(main())


def test_a_silent_peer_is_down_with_timeout():
    async def main():
        a = make("a", heartbeat=0.1, timeout=1.0)
        b = make("b", heartbeat=1000, timeout=1000)  # links, then never says anything again
        await b.listen("127.0.0.1", 0)
        a.connect("b", *b.bound)
        await until(lambda: a.is_up("b"))
        started = time.monotonic()
        await until(lambda: a.rec.downs, timeout=3)
        assert a.rec.downs[0] == ("b", "timeout")
        assert 0.9 <= time.monotonic() - started <= 1.6
        await closing(a, b)
    run(main())


async def rtt(a, n=1):
    """Send ``n`` frames a -> b and wait for b's echo of each; return the worst round trip."""
    worst = 0.0
    for _ in range(n):
        mark, started = os.urandom(8), time.monotonic()
        a.send("b", 30, mark)
        await until(lambda: a.rec.frames and a.rec.frames[-1][2] == mark, timeout=2)
        worst = max(worst, time.monotonic() - started)
    return worst


async def raw(port, data=b""):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if data:
        writer.write(data)
    return reader, writer


async def closed_by_peer(reader, timeout):
    """Whether the node closes the connection within ``timeout`` (reading what it sends meanwhile)."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
        return True
    except (asyncio.TimeoutError, ConnectionError):
        return False


def test_hostile_clients_never_disturb_an_established_link():
    async def main():
        a, b = await pair(handshake_timeout=1.0)
        b.on_frame = lambda peer, kind, body: b.send(peer, kind, body)  # echo
        port = a.bound[1]
        assert await rtt(a) < 0.2
        garbage = await raw(port, os.urandom(10000))
        huge = await raw(port, b"\xff\xff\xff\xff\x01")
        hello = vmqapi.encode_cluster_frame(vmqapi.K_HELLO, vmqapi.encode_hello(b"n" * 16, "mallory"))
        half = await raw(port, hello)  # the handshake begun, never finished
        flood = await asyncio.gather(*(raw(port) for _ in range(200)))
        worst = await rtt(a, 20)
        assert len(a.pending) <= vmqapi.CLUSTER_MAX_UNAUTHENTICATED
        assert await closed_by_peer(garbage[0], 0.5) and await closed_by_peer(huge[0], 0.5)
        assert not await closed_by_peer(half[0], 0.2)  # it got a's HELLO and waits
        assert await closed_by_peer(half[0], 2.0)  # cut at the handshake timeout
        refused = await asyncio.gather(*(closed_by_peer(r, 2.0) for r, _ in flood))
        assert all(refused)  # past 64 at once at arrival, the others at the handshake timeout
        worst = max(worst, await rtt(a, 20))
        assert worst < 0.5 and a.is_up("b") and a.rec.downs == []
        for _, writer in [garbage, huge, half, *flood]:
            writer.close()
        await closing(a, b)
    run(main())


def test_a_peer_breaking_the_protocol_loses_only_its_link(caplog):
    async def main():
        a, b = await pair()
        c = make("c")
        c.connect("a", *a.bound)
        await until(lambda: a.is_up("c"))
        b.on_frame = lambda peer, kind, body: b.send(peer, kind, body)
        with caplog.at_level(logging.INFO, logger="vmqapi"):
            c.peers["a"].link.transport.write(b"\x7f\xff\xff\xff\x10")  # a frame of 2 GB announced
            await until(lambda: ("c" in [d[0] for d in a.rec.downs]))
        assert "frame of 2147483647 bytes" in a.rec.downs[0][1]
        assert a.is_up("b") and await rtt(a) < 0.2
        lines = [r for r in caplog.records if "2147483647" in r.getMessage()]
        assert [r.levelno for r in lines].count(logging.WARNING) == 1 and not any(r.exc_info for r in lines)
        await closing(a, b, c)
    run(main())


# -- TLS between nodes --

def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with one node certificate, and a certificate from another CA."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", f"/CN={ca}",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d)
    (d / "leaf.cnf").write_text("authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\nbasicConstraints=CA:FALSE\n")
    for name, ca in (("node", "ca"), ("rogue", "other")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
                "-days", "30", "-out", f"{name}.pem", "-extfile", "leaf.cnf", cwd=d)
    return d


def tls_config(pki, cert="node"):
    return vmqapi.Config({"listener.vmqs.clustering": "127.0.0.1:0", "listener.vmqs.certfile": str(pki / f"{cert}.pem"),
                          "listener.vmqs.keyfile": str(pki / f"{cert}.key"), "listener.vmqs.cafile": str(pki / "ca.pem")})


def test_tls_links_check_the_peer_against_the_cafile(pki):
    async def main():
        server, client = vmqapi.cluster_tls_contexts(tls_config(pki))
        a = make("a", server_tls=server, client_tls=client)
        b = make("b", server_tls=server, client_tls=client)
        await a.listen("127.0.0.1", 0)
        await b.listen("127.0.0.1", 0)
        a.connect("b", *b.bound)
        await until(lambda: a.is_up("b") and b.is_up("a"))
        a.send("b", 16, b"over TLS")
        await until(lambda: b.rec.frames == [("a", 16, b"over TLS")])
        assert b.peers["a"].link.transport.get_extra_info("peercert")["subject"] == ((("commonName", "node"),),)
        rogue_server, rogue_client = vmqapi.cluster_tls_contexts(tls_config(pki, "rogue"))
        rogue = make("r", client_tls=rogue_client)  # right cookie, certificate from another CA
        with pytest.raises(vmqapi.ClusterError, match="^unreachable|^closed before the handshake .*certificate"):
            await rogue.probe(*b.bound)  # TLS 1.3: the client learns only after its handshake
        plain = make("p")
        with pytest.raises(vmqapi.ClusterError):
            await plain.probe(*b.bound, timeout=1.0)
        assert b.rec.ups == ["a"]
        await closing(a, b, rogue, plain)
    run(main())


def test_strangers_in_their_tls_handshake_count_among_the_pending_ones(pki):
    """TLS ran before a connection was counted: 200 strangers that never sent a ClientHello held 200 descriptors
    for the handshake timeout, past the 64 pending handshakes."""
    async def main():
        server, client = vmqapi.cluster_tls_contexts(tls_config(pki))
        a, b = make("a", server_tls=server, client_tls=client), make("b", server_tls=server, client_tls=client)
        await a.listen("127.0.0.1", 0)
        await b.listen("127.0.0.1", 0)
        before = len(os.listdir("/proc/self/fd"))
        strangers = [await raw(b.bound[1]) for _ in range(200)]
        await asyncio.sleep(0.5)
        held = len(os.listdir("/proc/self/fd")) - before - len(strangers)  # b's ends (both are in this process)
        assert len(b.pending) <= vmqapi.CLUSTER_MAX_UNAUTHENTICATED
        assert held <= vmqapi.CLUSTER_MAX_UNAUTHENTICATED + 4 * vmqapi.CLUSTER_ACCEPT_BATCH, held
        a.connect("b", *b.bound)  # a node with the certificate and the cookie gets in, meanwhile
        await until(lambda: a.is_up("b") and b.is_up("a"), timeout=5)
        for _, writer in strangers:
            writer.close()
        await closing(a, b)
    run(main())


def test_strangers_closed_in_their_tls_handshake_leave_no_traceback(pki, caplog):
    """A stranger closed mid-TLS-handshake (evicted, or at the handshake deadline) left a task whose
    exception was never retrieved: one logged traceback per stranger."""
    async def main():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx.get("message")))
        server, client = vmqapi.cluster_tls_contexts(tls_config(pki))
        b = make("b", server_tls=server, client_tls=client, handshake_timeout=0.5, max_pending=4)
        await b.listen("127.0.0.1", 0)
        strangers = [await raw(b.bound[1]) for _ in range(12)]  # past 4 pending: evicted mid-TLS; the rest time out
        await until(lambda: not b.pending, timeout=3)
        await asyncio.sleep(0.1)
        gc.collect()  # an unretrieved exception is reported when its task is collected
        for _, writer in strangers:
            writer.close()
        await closing(b)
        gc.collect()
        await asyncio.sleep(0)
        return errors
    with caplog.at_level(logging.DEBUG):
        errors = asyncio.run(asyncio.wait_for(main(), 30))
    assert errors == []
    assert not [r for r in caplog.records if r.exc_info or "never retrieved" in r.getMessage()]


def test_a_cluster_listener_on_an_ipv6_address_takes_ipv6_only(monkeypatch):
    """create_server set IPV6_V6ONLY; the listener's own socket did not, so one on :: took IPv4 too. The
    wildcard bind is moved to ::1 (loopback only); the option is read as it was when bind was called."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    seen = []

    class Socket(socket.socket):
        def bind(self, address):
            if self.family == socket.AF_INET6 and address[0] == "::":
                seen.append(self.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
                address = ("::1", *address[1:])
            return super().bind(address)

    monkeypatch.setattr(vmqapi.socket, "socket", Socket)

    async def main():
        b = make("b")
        await b.listen("::", 0)
        await closing(b)
    run(main())
    assert seen == [1]


# -- configuration --

def test_the_cluster_config_is_checked(pki):
    check = vmqapi.check_cluster_config
    check(vmqapi.Config({}))
    for values in ({"listener.vmq.clustering": "10.0.0.2:0", "distributed_cookie": "vmq"},
                   {"listener.vmqs.clustering": "0.0.0.0:44054", "distributed_cookie": ' "vmq" '}):
        with pytest.raises(vmqapi.InvalidValue, match="distributed_cookie_file"):  # refused wherever it is
            vmqapi.Config(values)
    check(vmqapi.Config({"listener.vmq.clustering": "0.0.0.0:44053"}))  # no cookie given: the node makes one
    check(vmqapi.Config({"listener.vmq.clustering": "0.0.0.0:44053", "distributed_cookie": "s3cret-of-sixteen"}))
    with pytest.raises(vmqapi.ConfigError, match="listener.vmqs.certfile"):
        check(vmqapi.Config({"listener.vmqs.clustering": "127.0.0.1:0"}))
    with pytest.raises(vmqapi.ConfigError, match="cannot load"):
        check(vmqapi.Config({"listener.vmqs.clustering": "127.0.0.1:0", "listener.vmqs.certfile": "/nonexistent",
                             "listener.vmqs.cafile": "/nonexistent"}))
    check(tls_config(pki))
    config = vmqapi.Config({"outgoing_clustering_buffer_size": "500", "listener.vmqs.clustering.certfile": "x"})
    assert config["outgoing_clustering_buffer_size"] == 500
    assert config.listener_option("vmqs", "clustering", "certfile") == "x"
    assert vmqapi.find_setting("distributed_cookie").secret
    with pytest.raises(vmqapi.InvalidKey):
        vmqapi.find_setting("listener.vmq.nonsense")


# -- the cluster port under attack, in a child under an address-space cap --

CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import vmqapi

async def main():
    loop = asyncio.get_running_loop()
    links = vmqapi.ClusterLinks(loop, "b", sys.argv[2], vmqapi.Metrics(), buffer_size=10000, on_up=lambda p: None,
                                on_down=lambda p, r: None, on_frame=lambda p, k, body: links.send(p, k, body),
                                handshake_timeout=2.0)
    await links.listen("127.0.0.1", 0)
    print(links.bound[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    await links.close()

asyncio.run(main())
"""


def rss(pid):
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) << 10 for line in fh if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_cluster_port_floods_cost_a_capped_child_little_memory_and_no_latency():
    from capped import child_setup
    from conftest import ROOT
    proc = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, COOKIE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, preexec_fn=child_setup(512 << 20))

    async def main(port):
        a = make("a")
        a.connect("b", "127.0.0.1", port)
        await until(lambda: a.is_up("b"))
        before, worst = rss(proc.pid), 0.0
        held = []
        for round_ in range(3):
            # 60 connections sending a MB of a 60 MB "HELLO" (under the frame limit: only the handshake's
            # 4 KB bound stops it), 60 holding a nearly complete 4 KB handshake frame, 100 announcing 64 MB,
            # 200 connecting and saying nothing
            big = (60 << 20).to_bytes(4, "big") + b"\x01" + os.urandom(1 << 20)
            part = (4000).to_bytes(4, "big") + b"\x01" + b"h" * 3990
            held += await asyncio.gather(*(raw(port, big) for _ in range(60)))
            await asyncio.sleep(0.3)  # the child reads what it is given
            held += await asyncio.gather(*(raw(port, part) for _ in range(60)))
            held += await asyncio.gather(*(raw(port, b"\x04\x00\x00\x00\x01") for _ in range(100)))
            held += await asyncio.gather(*(raw(port) for _ in range(200)))
            worst = max(worst, await rtt(a, 10))
        grown = rss(proc.pid) - before
        for _, writer in held:
            writer.close()
        assert a.is_up("b") and a.rec.downs == []
        assert worst < 0.5, worst
        print(f"child RSS grew {grown >> 20} MB, worst round trip {worst * 1000:.0f} ms")
        assert grown < 25 << 20, grown
        await closing(a)

    try:
        port = int(proc.stdout.readline())
        run(main(port), timeout=60)
        assert proc.poll() is None  # the cap was never hit
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

