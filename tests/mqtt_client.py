"""A small blocking MQTT client for tests, built on vmqapi's own codec."""

from __future__ import annotations

import os
import socket
import ssl
import time

import vmqapi
from vmqapi import (Connack, Connect, Disconnect, Pingreq, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback,
                    Subscribe, Unsuback, Unsubscribe)


class MqttClient:
    """One connection; every wait is bounded by ``timeout`` seconds.

    ``version`` 5 speaks MQTT 5 once ``connect`` (or ``send`` of a level 5 CONNECT) said so.
    """

    def __init__(self, port, timeout=5.0, tls=None, version=4):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.timeout = timeout
        self.buffer = b""
        self.next_pid = 1
        self.received = []  # packets read while waiting for something else
        self.version = version
        self.aliases = {}  # topic aliases the server set, for MQTT 5

    def send(self, packet):
        self.send_raw(vmqapi.encode_packet(packet, self.version))

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv_raw(self):
        """Return the next bytes of the MQTT stream (b"" when closed)."""
        return self.sock.recv(65536)

    def read(self, timeout=None):
        """Return the next packet, or None when the server closed the connection."""
        if self.received:
            return self.received.pop(0)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            result = vmqapi.decode_packet(self.buffer, 0, 0, self.version)
            if result is not None:
                packet, used = result
                self.buffer = self.buffer[used:]
                return packet
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no packet")
            self.sock.settimeout(left)
            try:
                chunk = self.recv_raw()
            except socket.timeout:
                raise TimeoutError("no packet") from None
            except (ConnectionResetError, ssl.SSLError):
                return None
            if not chunk:
                return None
            self.buffer += chunk

    def expect(self, kind, timeout=None):
        """Read until a packet of ``kind`` arrives; keep the others for later."""
        kept = []
        try:
            while True:
                packet = self.read(timeout)
                if packet is None:
                    raise ConnectionError(f"closed while waiting for {kind.__name__}")
                if isinstance(packet, kind):
                    return packet
                kept.append(packet)
        finally:
            self.received = kept + self.received

    def closed(self, timeout=None):
        """Return True once the server has closed the connection."""
        try:
            while True:
                if self.read(timeout) is None:
                    return True
        except TimeoutError:
            return False

    def pid(self):
        pid = self.next_pid
        self.next_pid = pid % 65535 + 1
        return pid

    def connect(self, client_id, clean=True, **kwargs):
        self.send(Connect(client_id, clean_session=clean, proto_level=kwargs.pop("proto_level", self.version),
                          **kwargs))
        return self.expect(Connack)

    def subscribe(self, *topics, properties=()):
        pid = self.pid()
        self.send(Subscribe(pid, tuple(topics), properties))
        ack = self.expect(Suback)
        assert ack.packet_id == pid
        return ack.return_codes

    def unsubscribe(self, *topics):
        pid = self.pid()
        self.send(Unsubscribe(pid, tuple(topics)))
        ack = self.expect(Unsuback)
        assert ack.packet_id == pid
        return ack.reason_codes

    def publish(self, topic, payload, qos=0, retain=False, properties=()):
        """Publish and finish the QoS flow; return the acknowledgement's reason code (MQTT 5)."""
        pid = self.pid() if qos else None
        self.send(Publish(topic, payload, qos, retain, False, pid, tuple(properties)))
        if qos == 1:
            ack = self.expect(Puback)
            assert ack.packet_id == pid
            return ack.reason_code
        if qos == 2:
            ack = self.expect(Pubrec)
            assert ack.packet_id == pid
            if ack.reason_code < 0x80:
                self.send(Pubrel(pid))
                assert self.expect(Pubcomp).packet_id == pid
            return ack.reason_code
        return 0

    def message(self, ack=True, timeout=None):
        """Wait for a PUBLISH (an MQTT 5 topic alias resolved); acknowledge it unless told not to."""
        p = self.expect(Publish, timeout)
        alias = dict(p.properties).get("topic_alias")
        if alias is not None:
            if p.topic:
                self.aliases[alias] = p.topic
            else:
                p = vmqapi.dataclasses.replace(p, topic=self.aliases[alias])
        if ack and p.qos == 1:
            self.send(Puback(p.packet_id))
        elif ack and p.qos == 2:
            self.send(Pubrec(p.packet_id))
            assert self.expect(Pubrel).packet_id == p.packet_id
            self.send(Pubcomp(p.packet_id))
        return p

    def no_message(self, timeout=0.3):
        """Assert nothing is published to us within ``timeout``."""
        try:
            p = self.expect(Publish, timeout)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected {p}")

    def ping(self):
        self.send(Pingreq())
        return self.expect(vmqapi.Pingresp)

    def disconnect(self):
        self.send(Disconnect())
        self.close()

    def close(self):
        self.sock.close()


class WsMqttClient(MqttClient):
    """MQTT over a WebSocket (RFC 6455): masked binary frames out, frames in."""

    def __init__(self, port, timeout=5.0, tls=None, path="/mqtt", protocol="mqtt", version=4):
        super().__init__(port, timeout, tls, version)
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                break
            head += chunk
        self.handshake = head.decode("iso-8859-1")
        self.frames = b""
        self.close_code = None

    @staticmethod
    def frame(opcode, payload, fin=True, mask=True):
        """Encode one client frame."""
        n = len(payload)
        head = bytes((0x80 * fin | opcode,))
        length = bytes((0x80 * mask | n,)) if n < 126 else bytes((0x80 * mask | 126,)) + n.to_bytes(2, "big")
        if not mask:
            return head + length + payload
        key = os.urandom(4)
        return head + length + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    def send_raw(self, data):
        self.sock.sendall(self.frame(2, data))

    def recv_raw(self):
        while True:
            if len(self.frames) >= 2:
                n, i = self.frames[1] & 0x7F, 2
                if n == 126:
                    n, i = int.from_bytes(self.frames[2:4], "big"), 4
                elif n == 127:
                    n, i = int.from_bytes(self.frames[2:10], "big"), 10
                if len(self.frames) >= i + n:
                    opcode, payload = self.frames[0] & 0x0F, self.frames[i:i + n]
                    self.frames = self.frames[i + n:]
                    if opcode == 8:
                        self.close_code = int.from_bytes(payload[:2], "big")
                        return b""
                    if opcode == 2:
                        return payload
                    continue
            chunk = self.sock.recv(65536)
            if not chunk:
                return b""
            self.frames += chunk
