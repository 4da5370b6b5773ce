"""vmqapi: a small MQTT node with VerneMQ's admin surface, in one dependency-free module.

vmqapi is an MQTT 3.1/3.1.1/5.0 broker (QoS 0-2, retained messages, wills, persistent
sessions in SQLite, TLS and WebSocket listeners, vmq_passwd and vmq_acl) that serves
VerneMQ's HTTP admin API (``GET /api/v1/<command words>?k=v&--flag``) and its
``vmq-admin`` command set from one command table, with API keys kept in a JSON file,
so that scripts, dashboards and curl lines written for VerneMQ keep working. It runs
on Python 3.10+ with the standard library only.

Quick start, a node::

    python vmqapi.py                      # MQTT on 127.0.0.1:1883, HTTP on :8888, state in ./vmqapi-data
    python vmqapi.py admin api-key create # prints a new key
    curl "http://KEY@127.0.0.1:8888/api/v1/cluster/show"

Quick start, embedded::

    import vmqapi
    with vmqapi.Node({"listener.http.default": "127.0.0.1:0", "listener.tcp.default": "127.0.0.1:0"}) as node:
        print(node.listeners())

Contents (``grep -nE '^# [0-9]+\\. ' vmqapi.py`` prints them with line numbers):

  Part 0. Foundations: the preamble, errors, configuration, metrics
    0. Preamble
    1. Errors
    2. Configuration: the settings table and the frozen Config
    3. Metrics registry

  Part I. The admin API
    4. Key store: the API key file
    5. Command machinery: argv grammar, command table, result elements
    6. Command catalogue
    7. HTTP: the admin API
    8. Observability endpoints
    9. HTTP server

  Part II. The broker
    10. MQTT codec
    11. Topics: validation and trie
    12. Broker values: messages, options, deliveries, sessions, connections
    13. Policy: passwords, ACL rules and the hook chain
    14. Routing and retained messages
    15. Delivery: queues, in-flight windows, packet ids, resends
    16. Sessions: connections, CONNECT, wills, administration
    17. Engine: packets and time
    18. Message store
    19. Broker shell: plugin hooks, rule files, tracing
    20. MQTT connections: TCP, TLS and WebSocket links
    21. MQTT listeners and the broker's loop

  Part III. Plugins: the cluster, the bridge, webhooks
    22. Peers: the engine's side of a cluster
    23. Cluster state: replicated metadata and the node-to-node codec
    24. Cluster links: node-to-node connections
    25. Cluster requests: replication, calls between nodes, kept frames
    26. Cluster: sessions moving between nodes, and their copies
    27. Cluster: membership, joins and leaves, routing, the Cluster itself
    28. Bridge: vmq_bridge
    29. Webhooks: bodies, answers, the cache and the client
    30. Webhooks: the plugin, its gate and commands

  Part IV. The node and the CLI
    31. Node
    32. CLI
"""

###############################################################################
# Part 0. Foundations: the preamble, errors, configuration, metrics           #
###############################################################################
# The map, one VmqError root, the settings table and the frozen Config, the counters.
# Everything below may use these; they know no socket.


###############################################################################
# 0. Preamble #################################################################
###############################################################################
# Owns: the public names, the version, imports and named constants.
# Must not know: anything that runs.

from __future__ import annotations

import os
import stat
import sys

# Run as a script (``python vmqapi.py``), this file first hands over to its own cached
# bytecode; see "Start-up" in the CLI section, next to main(), for why and for the rest of
# it. Only the hand-over itself stands here: it must come before the imports it saves.
_FROM_BYTECODE = ("import signal,sys\n"
                  "try:\n"
                  " signal.pthread_sigmask(signal.SIG_UNBLOCK,{signal.SIGINT})\n"
                  " import importlib.util as u,os;sys.argv.pop(0);p=sys.argv[0]\n"
                  " if sys.path and sys.path[0]=='':sys.path[0]=os.path.dirname(os.path.abspath(p))\n"
                  " s=u.spec_from_file_location('__main__',p);m=u.module_from_spec(s);"
                  "sys.modules['__main__']=m;s.loader.exec_module(m)\n"
                  "except KeyboardInterrupt:\n"
                  " sys.exit(130)\n")
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what a shell shows for a command Ctrl-C stopped before it served


def _start_from_bytecode() -> None:
    """Run this script again, in this process, from its cached bytecode (written on first use)."""
    import signal
    options = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
    # pthread_sigmask raises a KeyboardInterrupt that came before the block: no exec then.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    # glibc reserves 64 MB of address space per thread that allocates (up to 8 per core): with a
    # thread per HTTP connection, 50 connections passed a 1 GB ulimit -v. Two areas serve them all.
    env = os.environ if "MALLOC_ARENA_MAX" in os.environ else {**os.environ, "MALLOC_ARENA_MAX": "2"}
    # -S: the new interpreter leaves out `site` (site-packages, their .pth files, sitecustomize): the
    # program imports only the standard library, and what is installed beside it stays out of the node.
    try:
        os.execve(sys.executable, [sys.executable, *options, "-S", "-c", _FROM_BYTECODE,
                                   os.path.abspath(__file__), *sys.argv[1:]], env)
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # run on from the source, as Python started it


if __name__ == "__main__" and os.name == "posix" and sys.executable and __spec__ is None \
        and globals().get("__file__", "").endswith(".py"):
    try:
        _start_from_bytecode()
    except KeyboardInterrupt:  # Ctrl-C before the hand-over: nothing has started
        sys.exit(INTERRUPTED_EXIT)

# A node started as a script leaves OpenSSL out until it needs TLS: asyncio and http.client import
# ssl as they are imported, and hashlib loads OpenSSL's libcrypto for its hashes, which costs
# about 4.5 MB of resident memory a node without TLS never uses. Their imports below see ssl and
# _hashlib as absent (a name mapped to None in sys.modules is not importable), so hashlib keeps
# Python's own SHA-1, SHA-2 and BLAKE2; tls_module() imports ssl at the first TLS context and
# gives asyncio the module it could not import. Not for `admin` and `passwd` (the CLI's urllib
# needs https at once), nor when vmqapi is imported (the program owns its modules), nor for a
# Python whose asyncio was not read for it (3.10 to 3.13 keep ssl in the same three modules' globals,
# see tls_module(); the tests run 3.11), nor for one built without its own hashes (FIPS builds:
# hashlib and random need OpenSSL's there).


def _own_hashes() -> bool:
    """Whether this Python has its own MD5, SHA-1, SHA-2, SHA-3 and BLAKE2 (what hashlib falls back to)."""
    import importlib.util
    sha2 = ("_sha2",) if sys.version_info >= (3, 12) else ("_sha256", "_sha512")
    return all(importlib.util.find_spec(name) is not None for name in ("_md5", "_sha1", "_sha3", "_blake2", *sha2))


_SSL_LATER = (__name__ == "__main__" and (3, 10) <= sys.version_info[:2] <= (3, 13)
              and not {"ssl", "_hashlib", "hashlib", "asyncio", "http.client"} & sys.modules.keys()
              and not {"admin", "passwd"} & set(sys.argv[1:]) and _own_hashes())
if _SSL_LATER:
    sys.modules["ssl"] = sys.modules["_hashlib"] = None  # type: ignore[assignment]

import argparse
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import enum
import errno
import datetime as _dt
import functools
import hashlib
import heapq
import hmac
import http.server
import inspect
import itertools
import io
import ipaddress
import json
import logging
import math
import random
import re
import secrets
import signal
import socket
import socketserver
import sqlite3
import string
import struct
import tempfile
import threading
import time
import types
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Coroutine, Iterable, Iterator, Mapping, Protocol, Sequence

if _SSL_LATER:
    del sys.modules["ssl"], sys.modules["_hashlib"]


def tls_module() -> types.ModuleType:
    """Return the ssl module, which a node started as a script imports here, at its first TLS context.

    asyncio could not import it then (see the imports at the top): it gets it now, before any TLS
    connection can exist (each needs a context, built through here). asyncio keeps the module in
    three of its modules' globals, and since 3.11 the errors that mean "again" in one of them.
    """
    import ssl
    if _SSL_LATER:
        for name in ("asyncio.base_events", "asyncio.selector_events", "asyncio.sslproto"):
            module = sys.modules.get(name)
            if module is not None and getattr(module, "ssl", ssl) is None:
                module.ssl = ssl  # type: ignore[attr-defined]
        proto = sys.modules.get("asyncio.sslproto")
        if proto is not None and not hasattr(proto, "SSLAgainErrors"):
            proto.SSLAgainErrors = (ssl.SSLWantReadError, ssl.SSLSyscallError)  # type: ignore[attr-defined]
    return ssl


def is_tls(sock: socket.socket) -> bool:
    """Whether ``sock`` is a TLS socket (none is while ssl was never imported)."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(sock, ssl.SSLSocket)


try:  # POSIX advisory locks; Windows falls back to msvcrt below.
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

try:  # POSIX resource limits (file descriptors)
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

__version__ = "0.1.0"

__all__ = [
    "VmqError", "ConfigError", "KeyStoreError", "NodeNotRunning",
    "Config", "Setting", "Metrics", "KeyStore", "parse_expiry",
    "Param", "Command", "CommandTable", "Argv", "Call",
    "Text", "Table", "Alert", "ListElement",
    "parse_query", "render_query", "parse_cli_tokens", "render_json", "render_human",
    "Request", "Response", "handle_http",
    "Node", "main", "admin_main",
]

log = logging.getLogger("vmqapi")

NODE_FILE = "node.json"
START_FILE = "starting.pid"  # in the data dir: the pid of a node whose start is under way, until node.json is written
NODE_START_WAIT = 10.0  # s the CLI (and a node reading another's cookie file) waits for a node whose start is under way
# s to look again for a start marker: a node started at the same moment as the command may not have
# written it yet (seen: 0.6 s later, with four Pythons starting on two busy cores)
NODE_START_GRACE = 2.0
NODE_START_POLL = 0.05  # s between looks while waiting for a starting node
TRACE_FOLLOW_GRACE = 5.0  # seconds a followed trace stays on after its last call
GIL_SWITCH_INTERVAL = 0.0005  # s; the CLI node's: MQTT waits less for the GIL while HTTP builds a big answer
HEALTH_LOOP_WAIT = 5.0  # s /health waits for the broker's loop; past it the answer is 503, naming the stuck loop
QUICK_SESSION_SHOW = 1000  # sessions up to which session show (a few ms) is quick: it takes no slow-command slot
SLOW_COMMANDS = 16  # commands not marked quick that run at once, node-wide; more get 503 (a thread each is no cap)
TICK_BATCH = 2000  # sessions the broker's tick (every 0.5 s) looks at
TICK_INTERVAL = 0.5  # seconds between housekeeping ticks (retries, session expiry, delayed wills, $SYS)
TICK_ERROR_LOG_INTERVAL = 60  # seconds between log lines about failing ticks (each is counted in tick_error)
RETAINED_CHUNK = 500  # retained messages (or trie nodes) new subscriptions get per turn of the loop (about 3 ms)
SESSION_CHUNK = 500  # sessions session show reads per turn of the broker's loop (about 2 ms)
JSON_CHUNK = 1000  # table rows per json.dumps call, so a big answer never holds the GIL for long
KEY_FILE = "api_keys.json"
DEFAULT_DATA_DIR = "vmqapi-data"
DATA_DIR_ENV = "VMQAPI_DATA_DIR"  # the data dir when --data-dir is not given (then ./vmqapi-data)
COLUMNS_HEADER = "x-vmqapi-columns"  # an empty table's columns, for the CLI's box (the JSON has none)
KEY_ALPHABET = string.ascii_letters + string.digits  # VerneMQ: [A-Za-z0-9]
DEFAULT_KEY_LENGTH = 32  # VerneMQ vmq_auth_apikey: max(32, min_apikey_length)
HASHED_PREFIX_LENGTH = 6  # README, "API keys": hashed keys show their first 6 characters
SCOPES = ("mgmt", "mgmt_ro", "status", "metrics", "health", "api2", "httppub")  # README, "API keys"
SECRET_HEADER = "x-vmqapi-node-secret"  # the CLI's credential, from node.json
REALM = 'Basic realm="VerneMQ"'  # VerneMQ 1.x form; 2.x sends a malformed one
ALLOW = "GET, OPTIONS, HEAD, POST"
CORS_HEADERS = (  # VerneMQ vmq_http_mgmt_api:options/2
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "HEAD, GET"),
    ("Access-Control-Allow-Headers", "content-type, authorization"),
    ("Access-Control-Max-Age", "1728000"),
)
PATH_ALIASES = {  # VerneMQ maps "cluster" to the removed "cluster status"
    "sessions": ("session", "show"),
    "listeners": ("listener", "show"),
    "plugins": ("plugin", "show"),
    "cluster": ("cluster", "show"),
}
STATUS_KEYS = (  # README, "The command catalogue", node status; VerneMQ vmq_info:node_status/0
    "num_online", "num_offline", "msg_in", "msg_out", "queue_in", "queue_out",
    "queue_drop", "queue_unhandled", "num_subscriptions", "num_retained",
    "matches_local", "matches_remote", "version",
)


###############################################################################
# 1. Errors ###################################################################
###############################################################################
# Owns: one exception root; each subclass knows its HTTP status, exit code and code.
# Must not know: who catches it.


class VmqError(Exception):
    """Root of every error vmqapi raises on purpose."""

    http_status = 500
    exit_code = 1
    code = "internal_error"

    def __init__(self, text: str, usage: str | None = None):
        super().__init__(text)
        self.text = text
        self.usage = usage

    def to_json(self) -> dict:
        """Return the JSON error body of README, "The API by example"."""
        body = {"error": self.code, "text": self.text, "type": "error"}
        if self.usage:
            body["usage"] = self.usage
        return body


class BadRequest(VmqError):
    """A request that cannot be read: bad encoding, repeated or empty arguments."""

    http_status, exit_code, code = 400, 2, "bad_request"


class UnknownCommand(BadRequest):
    """No command has these words."""

    code = "unknown_command"


class InvalidKey(BadRequest):
    """An argument key the command does not take, or a key that cannot be set."""

    code = "invalid_key"


class InvalidFlag(BadRequest):
    """A flag the command does not take."""

    code = "invalid_flag"


class InvalidValue(BadRequest):
    """A value of the wrong type or out of range."""

    code = "invalid_value"


class MissingArgument(BadRequest):
    """A mandatory argument is absent."""

    code = "missing_argument"


class Unauthorized(VmqError):
    """No valid API key for this scope."""

    http_status, code = 401, "unauthorized"


class Forbidden(VmqError):
    """A valid key whose scope does not allow this command."""

    http_status, code = 403, "forbidden"


class NotFound(VmqError):
    """No endpoint at this path."""

    http_status, code = 404, "not_found"


class MethodNotAllowed(VmqError):
    """PUT, PATCH or DELETE."""

    http_status, code = 405, "method_not_allowed"


class NotAcceptable(VmqError):
    """The Accept header rules out application/json."""

    http_status, code = 406, "not_acceptable"


class PayloadTooLarge(VmqError):
    """A request body larger than listener.max_body_size."""

    http_status, code = 413, "payload_too_large"


class PublishRefused(VmqError):
    """An HTTP publish (vmq_http_pub) refused; ``reason`` names VerneMQ's answer (HTTP_PUB_ANSWERS), ``detail``
    says more after it."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class UriTooLong(VmqError):
    """A request line longer than max_request_line_length."""

    http_status, code = 414, "uri_too_long"


class HeaderTooLarge(VmqError):
    """A header value longer than max_header_value_length, or too many headers."""

    http_status, code = 431, "header_too_large"


class VersionNotSupported(VmqError):
    """An HTTP version other than 1.x."""

    http_status, code = 505, "http_version_not_supported"


class ServiceUnavailable(VmqError):
    """Too many slow commands run at once; the answer carries Retry-After."""

    http_status, code = 503, "service_unavailable"
    retry_after = 1  # seconds


class BrokerStopped(ServiceUnavailable, RuntimeError):
    """The broker's loop stopped before it ran what another thread asked of it (a RuntimeError too, as
    asking a closed loop is, so that what stops the node carries on)."""


class NotImplementedMethod(VmqError):
    """A method HTTP does not define for this API, or a transfer coding the node does not decode."""

    http_status, code = 501, "not_implemented"


class MalformedPacket(VmqError):
    """Bytes that break the MQTT specification; only the connection that sent them is closed.

    ``reason_code`` is the MQTT 5 reason a DISCONNECT would carry: 0x81 Malformed Packet,
    0x82 Protocol Error (MQTT 5.0 2.4).
    """

    http_status, code = 400, "malformed_packet"
    reason_code = 0x81
    metric = "mqtt_malformed_packet_error"  # what the MQTT link counts it in
    proto_level = 0  # a CONNECT's protocol level, once read: MQTT 5 hears CONNACK with the reason


class WsError(VmqError):
    """A WebSocket protocol violation (RFC 6455), with the close code to send; only that connection ends."""

    http_status, code = 400, "websocket_error"

    def __init__(self, close_code: int, reason: str):
        super().__init__(reason)
        self.close_code, self.reason = close_code, reason


class TopicTooDeep(MalformedPacket):
    """A topic name or will topic with more levels than max_topic_levels; MQTT 5 hears 0x90."""

    reason_code = 0x90  # Topic Name invalid (MQTT 5.0 2.4)


class ProtocolError(MalformedPacket):
    """Well-formed bytes that break a protocol rule (a repeated property, say)."""

    reason_code = 0x82


class PacketTooLarge(MalformedPacket):
    """A packet larger than max_message_size."""

    reason_code = 0x95
    metric = "mqtt_invalid_msg_size_error"


class PacketLimitExceeded(PacketTooLarge):
    """A packet with more properties, or topic filters, than one packet may carry; MQTT 5 hears 0x95."""

    metric = "mqtt_packet_limit_error"


class ReceiveMaxExceeded(ProtocolError):
    """An MQTT 5 client sent more unacknowledged QoS 2 messages than the node's Receive Maximum."""

    reason_code = 0x93


class TopicAliasInvalid(ProtocolError):
    """An MQTT 5 topic alias of 0 or above the Topic Alias Maximum the node announced."""

    reason_code = 0x94


class ClusterError(VmqError):
    """A peer node that broke the cluster protocol (bad frame, failed challenge) or cannot be reached;
    only that link ends."""

    http_status, code = 503, "cluster_error"


class WebhookFailed(VmqError):
    """A webhook call that got no usable answer (unreachable, timed out, not 200, not JSON); an auth hook refuses."""

    def __init__(self, reason: str, timeout: bool = False):
        super().__init__(reason)
        self.timeout = timeout


class ConfigError(VmqError):
    """A configuration the node cannot start with; the text names file and line."""

    code = "config_error"


class FileRefused(ConfigError):
    """A file the node reads is not a regular file, is larger than it reads, or (a bridge's TLS file) cannot be
    used; it is left untouched."""

    exit_code, code = 2, "file_refused"


class KeyStoreError(VmqError):
    """The API key file is unreadable or corrupt; it is left untouched."""

    code = "key_store_error"


class KeyFileRefused(KeyStoreError):
    """The API key file is not a regular file, or larger than the node reads: exit 2, as FileRefused."""

    exit_code = 2


class NodeNotRunning(VmqError):
    """The CLI found no live node in the data dir."""

    code = "node_not_running"


class KeyRejected(VmqError):
    """A key store change refused for a reason the user can fix (becomes an alert, not an error answer)."""

    http_status = 400

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


###############################################################################
# 2. Configuration: the settings table and the frozen Config ##################
###############################################################################
# Owns: every config key with its type, default, doc and settability; Config.
# Must not know: files other than the one it parses, sockets, commands.


def parse_flag(text: str) -> bool:
    """Parse VerneMQ's on/off flag (true/false accepted too)."""
    value = text.strip().lower()
    if value in ("on", "true"):
        return True
    if value in ("off", "false"):
        return False
    raise ValueError(f"expected on or off, got {text!r}")


def parse_int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """Return a parser for an integer in [low, high]."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"-?[0-9]+", text.strip()):
            raise ValueError(f"expected an integer, got {text!r}")
        value = int(text)
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"{value} is out of range ({bound})")
        return value
    return parse


def parse_choice(*choices: str) -> Callable[[str], str]:
    """Return a parser that accepts one of ``choices``."""
    def parse(text: str) -> str:
        if text.strip() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text.strip()
    return parse


SECRET_SHOWN = "********"  # what show prints for a password setting that is set, and for the secret parts of a URL


def mask_url(url: str) -> str:
    """Return ``url`` with its user information (a password) and its query (a token) masked."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return SECRET_SHOWN
    netloc = parts.netloc
    if "@" in netloc:
        netloc = SECRET_SHOWN + "@" + netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, SECRET_SHOWN if parts.query else "",
                                    SECRET_SHOWN if parts.fragment else ""))


def parse_text(text: str) -> str:
    """Accept any string; surrounding quotes as in vernemq.conf are removed."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def parse_optional_int(text: str) -> int | None:
    """Parse a non-negative integer, or ``undefined``/``off`` for none."""
    if text.strip() in ("undefined", "off", ""):
        return None
    return parse_int_range(0)(text)


def parse_max_connections(text: str) -> int | None:
    """Parse ``listener.max_connections``: an integer or ``infinity`` (None)."""
    return None if text.strip() == "infinity" else parse_int_range(0)(text)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(text: str) -> int | None:
    """Parse ``never`` (None) or a VerneMQ duration such as ``1w``, ``2d``, ``30``."""
    value = text.strip()
    if value == "never":
        return None
    match = re.fullmatch(r"([0-9]+)([smhdwy]?)", value)
    if not match:
        raise ValueError(f"expected never or a duration like 1w, 2d, 3h, got {text!r}")
    return int(match.group(1)) * _DURATION_UNITS.get(match.group(2) or "s", 1)


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``ip:port`` or ``[ipv6]:port``; port 0 means any free port."""
    value = text.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:\s]+):([0-9]+)", value)
    if not match:
        raise ValueError(f"expected ip:port, got {text!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    ipaddress.ip_address(host)  # raises ValueError on a non-address
    if port > 65535:
        raise ValueError(f"port {port} is out of range (0..65535)")
    return host, port


def parse_optional_address(text: str) -> tuple[str, int] | None:
    """Parse ``ip:port``, or ``undefined``/``off``/empty for none."""
    return None if text.strip() in ("undefined", "off", "") else parse_address(text)


CLUSTER_PORT = 44053  # VerneMQ: the port of listener.vmq.clustering, and of cluster join's discovery-node
WELL_KNOWN_COOKIE = "vmq"  # VerneMQ's default distributed_cookie: known to everyone, so refused as a cookie
COOKIE_MIN_LENGTH = 16  # characters of a cookie: a shorter one is guessed (the made one has 43)
CLUSTER_HANDSHAKE_TIMEOUT = 5  # seconds to finish the handshake (TLS included): cluster_handshake_timeout
CLUSTER_MAX_UNAUTHENTICATED = 64  # incoming connections in their handshake at once: cluster_max_pending_handshakes
CLUSTER_SYNC_INTERVAL = 1000  # ms between two rounds of cluster housekeeping: cluster_sync_interval
COOKIE_ENV = "VMQAPI_DISTRIBUTED_COOKIE"  # a cookie given by the environment (never on a command line)
COOKIE_FILE = "cookie"  # in the data dir: the cookie a node given none made at its first start (mode 0600)
COOKIE_HINT = (f"leave distributed_cookie unset (the node then makes a random one in DATA_DIR/{COOKIE_FILE}) or "
               f"give a secret of your own, the same on every node, in the config file, in a file named by "
               f"distributed_cookie_file, or in the environment variable {COOKIE_ENV}")
MAX_NODE_NAME = 255  # characters of a node name (Erlang's limit on an atom)
_NODE_NAME_RE = re.compile(r"[A-Za-z0-9_.+-]+@"  # the name, then a host name (labels of DNS's 63 at most) or an IPv6
                           r"([A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)")


def parse_node_name(text: str) -> str:
    """Parse a node name ``name@host`` (VerneMQ's nodename): see check_node_name."""
    return check_node_name(parse_text(text))


def check_node_name(value: str) -> str:
    """Return ``value`` if it is a node name ``name@host`` (no space or control character, a host name of
    labels up to 63 characters or an address, at most MAX_NODE_NAME in all); raise ValueError if not."""
    match = _NODE_NAME_RE.fullmatch(value)
    ok = match is not None and len(value) <= MAX_NODE_NAME
    if ok and ":" in match.group(1):
        ok = _is_ip(match.group(1))
    if not ok:
        raise ValueError(f"expected a node name name@host (letters, digits, _ . + - in the name; a host name "
                         f"or an address; at most {MAX_NODE_NAME} characters), got {ascii(value)}")
    return value


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_cookie(text: str) -> str:
    """Parse ``distributed_cookie``: a secret that check_cookie takes (empty: none given)."""
    value = parse_text(text)
    return check_cookie(value) if value else ""


def check_cookie(value: str) -> str:
    """Return ``value`` if it can be the cluster's cookie, wherever it came from; raise ValueError if it is
    empty (an empty HMAC key), VerneMQ's well-known default or shorter than COOKIE_MIN_LENGTH."""
    if not value:
        raise ValueError(f"the cookie is empty: {COOKIE_HINT}")
    if value == WELL_KNOWN_COOKIE:
        raise ValueError(f"{WELL_KNOWN_COOKIE!r} is VerneMQ's well-known default, not a secret: {COOKIE_HINT}")
    if len(value) < COOKIE_MIN_LENGTH:
        raise ValueError(f"the cookie has {len(value)} characters, fewer than {COOKIE_MIN_LENGTH}: {COOKIE_HINT}")
    return value


CLUSTER_TLS_OPTIONS = ("certfile", "keyfile", "cafile", "tls_version")  # what listener.vmqs[.clustering] takes


def parse_origins(text: str) -> tuple[str, ...]:
    """Parse ``websocket_allowed_origins``: a comma list of scheme://host[:port] (empty: none)."""
    origins = tuple(o.strip().lower().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"expected origins as http(s)://host[:port], got {origin!r}")
    return origins


def is_own_origin(origin: str, host: str, schemes: tuple[str, ...]) -> bool:
    """Whether ``origin`` is one of ``schemes`` and the node's own host:port, as its Host header ``host`` names it
    (RFC 6454: an origin is scheme, host and port; browsers send it with cross-site requests and WebSockets)."""
    scheme, sep, netloc = origin.strip().lower().partition("://")
    return bool(sep) and scheme in schemes and bool(netloc) and netloc == host.strip().lower()


def parse_versions(text: str) -> tuple[int, ...]:
    """Parse ``allowed_protocol_versions``: a comma list of 3 (MQTT 3.1), 4 (3.1.1) and 5 (5.0)."""
    versions = tuple(sorted({parse_int_range(3, 5)(v) for v in text.split(",") if v.strip()}))
    if not versions:
        raise ValueError("expected a comma separated list of 3, 4 and 5")
    return versions


def parse_tls_versions(text: str) -> tuple[str, ...]:
    """Parse ``tls_version``: a comma list of tlsv1.2 and tlsv1.3 (older ones are refused)."""
    versions = tuple(sorted({v.strip() for v in text.split(",") if v.strip()}))
    if not versions or any(v not in TLS_VERSIONS for v in versions):
        raise ValueError(f"expected tlsv1.2 and/or tlsv1.3, got {text!r}")
    return versions


def parse_endpoint(text: str) -> tuple[str, int]:
    """Parse a remote broker's ``host:port`` (a name or an address; ``[ipv6]:port`` too)."""
    value = text.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([A-Za-z0-9_.-]+):([0-9]+)", value)
    if not match:
        raise ValueError(f"expected host:port, got {text!r}")
    port = int(match.group(2) or match.group(4))
    if not 0 < port <= 65535:
        raise ValueError(f"port {port} is out of range (1..65535)")
    return match.group(1) or match.group(3), port


BRIDGE_DIRECTIONS = ("in", "out", "both")  # VerneMQ vmq_bridge (mosquitto's topic syntax)


def parse_bridge_topic(text: str) -> tuple[str, str, int, str, str]:
    """Parse ``pattern [in|out|both] [qos] [local-prefix] [remote-prefix]``: (filter, direction, qos, local, remote).

    ``*`` as a level stands for ``#``, as in VerneMQ's config (whose parser takes ``#`` for a comment);
    ``""`` is an empty prefix. Direction defaults to out and QoS to 0, as in VerneMQ.
    """
    words = [w[1:-1] if len(w) >= 2 and w[0] == w[-1] == '"' else w for w in text.split()]
    if not words or not words[0]:
        raise ValueError("expected a topic pattern")
    pattern = "/".join("#" if level == "*" else level for level in words[0].split("/"))
    rest = words[1:]
    direction = rest.pop(0) if rest and rest[0] in BRIDGE_DIRECTIONS else "out"
    qos = int(rest.pop(0)) if rest and rest[0] in ("0", "1", "2") else 0
    if len(rest) > 2:
        raise ValueError(f"expected pattern [in|out|both] [qos] [local-prefix] [remote-prefix], got {text!r}")
    local, remote = (rest + ["", ""])[:2]
    return pattern, direction, qos, local, remote


def render_value(value: Any) -> str:
    """Render a parsed setting back into its vernemq.conf form."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    if value is None:
        return "undefined"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


@dataclass(frozen=True, slots=True)
class Setting:
    """One config key: how to parse it, its default, whether ``set`` may change it."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    settable: bool = False
    secret: bool = False  # show never prints its value
    masked: Callable[[Any], str] | None = None  # show prints masked(value): its secret parts hidden

    def __post_init__(self):
        if not re.fullmatch(r"[a-z0-9_.$]+", self.name):
            raise ValueError(f"bad setting name {self.name!r}")


DEFAULT_LISTENERS = {"http": ("127.0.0.1", 8888), "tcp": ("127.0.0.1", 1883)}
HTTP_MODULES = ("vmq_http_mgmt_api", "vmq_status_http", "vmq_metrics_http", "vmq_health_http", "vmq_http_v2_api",
                "vmq_http_pub")
APIKEY_MODULES = ("vmq_http_mgmt_api", "vmq_http_v2_api", "vmq_http_pub")  # VerneMQ schema: auth.mode apikey
LISTENER_TYPES = ("http", "https", "tcp", "ssl", "ws", "wss")  # VerneMQ's listener types
MQTT_LISTENER_KINDS = {"tcp": "mqtt", "ssl": "mqtts", "ws": "mqttws", "wss": "mqttwss"}  # as listener show names them
TLS_VERSIONS = {"tlsv1.2": "TLSv1_2", "tlsv1.3": "TLSv1_3"}  # names of ssl.TLSVersion members (tls_version())
# A bridge's outgoing buffer is bounded by bytes on disk, not by a message count: an outage of hours at
# a sensor gateway's rate fits, and half of max_queued_bytes (128 MiB) is left to the node's own clients.
BRIDGE_BUFFER_BYTES = 64 << 20


def tls_version(name: str) -> Any:
    """The ssl.TLSVersion a ``tls_version`` setting's word names."""
    return getattr(tls_module().TLSVersion, TLS_VERSIONS[name])


_S = Setting
SETTINGS: tuple[Setting, ...] = (
    _S("nodename", parse_node_name, "vmqapi@127.0.0.1", "The node's name (name@host), shown by cluster show and "
       "in metrics."),
    _S("data_dir", parse_text, DEFAULT_DATA_DIR, "Directory for node.json, api_keys.json and stored state (--data-dir)."),
    _S("log.console.level", parse_choice("debug", "info", "warning", "error"), "info",
       "Level of the log written to standard error."),
    _S("min_apikey_length", parse_int_range(0, 4096), 0,
       "Shortest key api-key add accepts; api-key create makes max(32, this) characters."),
    _S("max_apikey_expiry_days", parse_optional_int, None,
       "When set, every new key needs an expiry at most this many days ahead."),
    _S("api_key_storage", parse_choice("plain", "hashed"), "plain",
       "plain keeps keys in api_keys.json as given; hashed keeps only a salted hash."),
    _S("api_key_bootstrap_file", parse_text, "",
       "File of key[:scope[:expires]] lines added, idempotently, when the node starts."),
    _S("http_request_timeout", parse_int_range(1, 3600), 15,
       "Seconds a client has to send a whole HTTP request; also the keep-alive idle limit."),
    _S("http_poll_interval", parse_int_range(1, 1000), 100,
       "Milliseconds between an HTTP listener's looks at a stop or suspend and at refused connections to close: "
       "a stop waits up to this long for its listeners. Tests lower it."),
    _S("http_max_header_bytes", parse_int_range(1024, 1 << 20), 32768,
       "Bytes the head of an HTTP request (request line and header fields together) may hold; past it the "
       "request gets 431 as soon as they are read, and the connection is closed."),
    _S("http_max_unfinished_bytes", parse_int_range(65536, 1 << 30), 16777216,
       "Bytes that HTTP requests still being read (heads and bodies) may hold together, node-wide; past it the "
       "requests holding the most get 503 and are closed."),
    _S("http_cors_allow_origin", parse_text, "*", "Access-Control-Allow-Origin sent with /status.json."),
    _S("prometheus_namespace", parse_text, "vernemq_", "Prefix of every metric name in /metrics."),
    _S("http_module.$module.auth.mode", parse_choice("apikey", "noauth"), None,
       "apikey or noauth for one HTTP module (vmq_http_mgmt_api, vmq_http_v2_api and vmq_http_pub default to "
       "apikey, others to noauth)."),
    _S("vmq_http_pub.mqtt_auth.mode", parse_choice("on-behalf-of", "predefined"), "on-behalf-of",
       "HTTP publish: on-behalf-of takes user, password and client_id from each request; predefined publishes "
       "as vmq_http_pub.mqtt_auth.user/password/client_id.", True),
    _S("vmq_http_pub.mqtt_auth.user", parse_text, "", "HTTP publish, predefined: the MQTT user name.", True),
    _S("vmq_http_pub.mqtt_auth.password", parse_text, "", "HTTP publish, predefined: the MQTT password.", True,
       secret=True),
    _S("vmq_http_pub.mqtt_auth.client_id", parse_text, "", "HTTP publish, predefined: the MQTT client id.", True),
    _S("vmq_http_pub.mountpoint", parse_text, "", "Mountpoint that HTTP publishes go to.", True),
    _S("listener.$type.$name", parse_address, None, "Address (ip:port) of a listener; port 0 binds any free port."),
    _S("listener.max_connections", parse_max_connections, 10000,
       "Connections a listener accepts at once (integer or infinity)."),
    _S("listener.http.max_connections", parse_max_connections, 1000,
       "Connections an HTTP listener serves at once: each holds a thread (about 25 KB resident, 512 KiB of stack "
       "reserved); an explicit listener.max_connections applies too."),
    _S("listener.https.max_connections", parse_max_connections, 1000,
       "Connections an HTTPS listener serves at once, as listener.http.max_connections."),
    _S("listener.mountpoint", parse_text, "", "Topic prefix that separates this listener's clients from others."),
    _S("listener.allowed_protocol_versions", parse_versions, (3, 4, 5),
       "MQTT versions a listener accepts: 3 (3.1), 4 (3.1.1) and 5 (5.0)."),
    _S("listener.allow_anonymous_override", parse_flag, False,
       "Let this listener's clients in without credentials whatever allow_anonymous says."),
    _S("message_store", parse_choice("sqlite", "memory"), "sqlite",
       "sqlite keeps retained messages and persistent sessions in DATA_DIR/messages.db; memory keeps nothing."),
    _S("listener.certfile", parse_text, "", "PEM certificate (chain) of a TLS listener."),
    _S("listener.keyfile", parse_text, "", "PEM private key of a TLS listener (empty: in the certfile)."),
    _S("listener.cafile", parse_text, "", "PEM CA certificates that client certificates are checked against."),
    _S("listener.require_certificate", parse_flag, False, "Refuse TLS clients without a valid certificate."),
    _S("listener.use_identity_as_username", parse_flag, False,
       "Use the client certificate's CN as the MQTT user name (the certificate then authenticates)."),
    _S("listener.tls_version", parse_tls_versions, ("tlsv1.2",), "Comma list of tlsv1.2 and tlsv1.3; the lowest "
       "one is the minimum."),
    _S("listener.ciphers", parse_text, "", "OpenSSL cipher list of a TLS listener (empty: OpenSSL's default)."),
    _S("max_ws_frame_size", parse_int_range(2, 268435456), 268435456, "Largest WebSocket frame accepted, in bytes."),
    _S("websocket_allowed_origins", parse_origins, (),
       "Comma list of origins (scheme://host:port) whose pages may open an MQTT WebSocket (EMQX's "
       "websocket.check_origins). Empty: a handshake with an Origin header is taken only from the node's own "
       "host and port (its Host header); one without (MQTT libraries outside browsers) is taken."),
    _S("listener.max_body_size", parse_int_range(0, 1 << 24), 65536,
       "Largest HTTP request body (a POST form of arguments), in bytes; larger ones get 413."),
    _S("listener.max_headers", parse_int_range(1, 100), 100,  # http.server's parser stops at 100 (_MAXHEADERS)
       "Most header lines in an HTTP request (at most 100); more get 431."),
    _S("listener.tls_handshake_timeout", parse_int_range(100, 600000), 5000,
       "Milliseconds a TLS client has to finish its handshake (VerneMQ's name and default)."),
    _S("listener.max_request_line_length", parse_int_range(64, 1 << 20), 8000,
       "Longest HTTP request line, in bytes; longer ones get 414."),
    _S("listener.max_header_value_length", parse_int_range(64, 65000), 4096,  # its lines: 64 KiB (_MAXLINE)
       "Longest HTTP header value, in bytes (at most 65000); longer ones get 431."),
    # README, "The command catalogue": the keys set/show/describe work on at run time.
    _S("allow_anonymous", parse_flag, None,
       "Let clients connect without credentials. Unset: on while every MQTT listener is on loopback "
       "and no authentication plugin (auth_on_register hook, vmq_passwd.password_file) is configured.",
       True),
    _S("allow_register_during_netsplit", parse_flag, False, "Accept CONNECTs during a netsplit.", True),
    _S("allow_publish_during_netsplit", parse_flag, False, "Accept PUBLISHes during a netsplit.", True),
    _S("allow_subscribe_during_netsplit", parse_flag, False, "Accept SUBSCRIBEs during a netsplit.", True),
    _S("allow_unsubscribe_during_netsplit", parse_flag, False, "Accept UNSUBSCRIBEs during a netsplit.", True),
    _S("retry_interval", parse_int_range(1), 20, "Seconds before an unacknowledged QoS 1/2 message is resent.", True),
    _S("max_client_id_size", parse_int_range(1, 65535), 100, "Longest client id accepted at CONNECT.", True),
    _S("max_inflight_messages", parse_int_range(0, 65535), 20,
       "QoS 1/2 messages in flight to one client (0: no limit).", True),
    _S("max_online_messages", parse_int_range(-1), 1000,
       "Messages queued for an online client before drops (-1: no limit).", True),
    _S("max_offline_messages", parse_int_range(-1), 1000,
       "Messages queued for an offline persistent session before drops (-1: no limit).", True),
    _S("max_online_bytes", parse_int_range(-1), 8 << 20,
       "Bytes (payloads and topics) queued for an online client before drops (-1: no limit).", True),
    _S("max_offline_bytes", parse_int_range(-1), 8 << 20,
       "Bytes (payloads and topics) queued for an offline persistent session before drops (-1: no limit).", True),
    _S("max_queued_bytes", parse_int_range(-1), 128 << 20,
       "Bytes queued for every session together, in memory and in the message store, before drops (-1: no limit).",
       True),
    _S("max_retained_messages", parse_int_range(-1), 100_000,
       "Retained topics kept; a retained message for a new topic past this is refused (-1: no limit).", True),
    _S("max_retained_bytes", parse_int_range(-1), 32 << 20,
       "Bytes (payloads and topics) of every retained message together; a retained message that would pass it "
       "is refused (-1: no limit).", True),
    _S("max_message_size", parse_int_range(0, 268435455), 0, "Largest accepted PUBLISH in bytes (0: no limit).", True),
    _S("max_message_rate", parse_int_range(0), 0, "PUBLISHes per second accepted from one client (0: no limit).", True),
    _S("persistent_client_expiration", parse_duration, None,
       "How long an offline persistent session is kept (never, or a duration such as 1w).", True),
    _S("upgrade_outgoing_qos", parse_flag, False, "Deliver at the subscription's QoS even when published lower.", True),
    _S("systree_enabled", parse_flag, True, "Publish the $SYS tree.", True),
    _S("systree_interval", parse_int_range(0), 20000, "Milliseconds between $SYS publications (0: off).", True),
    _S("shared_subscription_policy", parse_choice("prefer_local", "local_only", "random",
                                                  "prefer_online_before_local"), "prefer_local",
       "How a shared subscription picks its member across the cluster's nodes.", True),
    _S("mqtt_connect_timeout", parse_int_range(1), 30000, "Milliseconds a new MQTT connection has to send CONNECT.",
       True),
    _S("mqtt_packet_timeout", parse_int_range(1), 60000,
       "Milliseconds a client has to finish a packet it started sending (cuts trickling clients, keep-alive or not).",
       True),
    _S("max_connect_size", parse_int_range(64, 268435455), 262144,
       "Largest packet a connection may send before it is accepted (its CONNECT, will included), in bytes; "
       "never more than max_message_size when that is set.", True),
    _S("partial_packet_budget", parse_int_range(65536), 67108864,
       "Bytes of unfinished packets and WebSocket frames the node holds for all connections together; past it "
       "the connections holding the most are closed.", True),
    _S("max_topic_levels", parse_int_range(1, 65535), 200,
       "Most levels in a topic name or filter (mosquitto's fixed limit, 200): each level costs the routing and "
       "retained trees memory whatever its length.", True),
    _S("max_properties_per_packet", parse_int_range(0, 65535), 128,
       "MQTT 5: most properties in one packet (all its lists together; 0: no limit); past it the client is closed "
       "with 0x95. Each costs a turn of the loop every client waits on (an empty user property is 5 bytes); 128 is "
       "far more than applications send and is read in well under a millisecond.",
       True),
    _S("max_subscriptions_per_client", parse_int_range(0), 1000,
       "Subscriptions one session may hold (EMQX's max_subscriptions; 0: no limit); past it SUBACK says 0x97 "
       "(MQTT 3.1.1: 0x80). Also the most topic filters in one SUBSCRIBE or UNSUBSCRIBE. A subscription costs "
       "about 1 KB of memory: 1000 bounds a session near 1 MB and one SUBSCRIBE near 20 ms of the loop.", True),
    _S("max_subscriptions_total", parse_int_range(0), 1_000_000,
       "Subscriptions the node's routing tables hold for every session together (0: no limit); past it a new "
       "filter gets SUBACK 0x97 (MQTT 3.1.1: 0x80). At about 1 KB each, 1000000 bounds them near 1 GB.", True),
    _S("max_persistent_sessions", parse_int_range(0), 100_000,
       "Persistent sessions (online or offline) the node keeps (0: no limit); past it a CONNECT that would make "
       "a new one is refused with 0x97 (MQTT 3.1.1: 3, server unavailable). A session costs about 2 KB of "
       "memory and under 1 KB on disk before its subscriptions and messages: 100000 bounds them near 300 MB.", True),
    _S("mqtt_write_timeout", parse_int_range(1), 60000,
       "Milliseconds a connection may leave its answers unread (outgoing buffer full, its input paused) before "
       "it is closed.", True),
    _S("receive_max_broker", parse_int_range(1, 65535), 65535,
       "MQTT 5: QoS 1/2 PUBLISHes a client may have unacknowledged towards the node (Receive Maximum in CONNACK).",
       True),
    _S("receive_max_client", parse_int_range(1, 65535), 65535,
       "MQTT 5: most QoS 1/2 messages in flight to a client, whatever larger Receive Maximum it asks for.", True),
    _S("topic_alias_max_broker", parse_int_range(0, 65535), 0,
       "MQTT 5: topic aliases a client may use towards the node (Topic Alias Maximum in CONNACK; 0: none).", True),
    _S("topic_alias_max_client", parse_int_range(0, 65535), 0,
       "MQTT 5: topic aliases the node uses towards a client, at most what the client allows (0: none).", True),
    _S("max_keepalive", parse_int_range(1, 65535), 65535,
       "Longest keep-alive in seconds: MQTT 5 clients asking for more (or 0) get this as Server Keep Alive; "
       "MQTT 3 clients asking for more are refused.", True),
    _S("max_last_will_delay", parse_int_range(0, 4294967295), 4294967295,
       "MQTT 5: longest Will Delay Interval honoured, in seconds.", True),
    _S("vmq_acl.acl_file", parse_text, "", "ACL file of vmq_acl (empty: none).", True),
    _S("vmq_acl.acl_reload_interval", parse_int_range(0), 10, "Seconds between ACL file reloads (0: never).", True),
    _S("vmq_passwd.password_file", parse_text, "", "Password file of vmq_passwd (empty: none).", True),
    _S("vmq_passwd.password_reload_interval", parse_int_range(0), 10,
       "Seconds between password file reloads (0: never).", True),
    # -- cluster (README, "Cluster") --
    _S("listener.vmq.clustering", parse_address, ("127.0.0.1", CLUSTER_PORT),
       "Address (ip:port) of the listener other nodes link to (port 0: any free port)."),
    _S("listener.vmqs.clustering", parse_optional_address, None,
       "Address of a TLS cluster listener (used instead of listener.vmq.clustering; the node then dials its "
       "peers with TLS too): listener.vmqs.certfile, keyfile and cafile, peers checked against the cafile."),
    _S("distributed_cookie", parse_cookie, "",
       "The cluster's shared secret: nodes prove it to each other by HMAC challenge and never send it. Empty: "
       "distributed_cookie_file, else the environment variable VMQAPI_DISTRIBUTED_COOKIE, else the random one "
       "the node makes in DATA_DIR/cookie at its first start. Wherever it is given, vmq (VerneMQ's default), an "
       "empty one and one shorter than 16 characters are refused.", secret=True),
    _S("distributed_cookie_file", parse_text, "",
       "File holding the cookie (its first line; readable by its owner only, as Erlang's .erlang.cookie), used "
       "when distributed_cookie is empty: copy one node's DATA_DIR/cookie to give the others the same."),
    _S("cluster_handshake_timeout", parse_int_range(1, 60), CLUSTER_HANDSHAKE_TIMEOUT,
       "Seconds an incoming cluster connection has to prove the cookie (TLS included) before it is closed."),
    _S("cluster_max_pending_handshakes", parse_int_range(1, 4096), CLUSTER_MAX_UNAUTHENTICATED,
       "Incoming cluster connections that have not proven the cookie yet, held at once; past it newcomers take "
       "the places of those that sent nothing, then of the oldest."),
    _S("cluster_sync_interval", parse_int_range(10, 60000), CLUSTER_SYNC_INTERVAL,
       "Milliseconds between two rounds of the cluster's housekeeping (the key file's sync, saving replicated "
       "rows); every second round sends each peer an anti-entropy digest, and a join returns once one found "
       "nothing new. Tests lower it; a cluster of many nodes may raise it."),
    _S("outgoing_clustering_buffer_size", parse_int_range(0), 10000,
       "Bytes of QoS 0 frames kept for each unreachable peer node; past it they are dropped (cluster_bytes_dropped)."),
    _S("cluster_max_unacknowledged_bytes", parse_int_range(1 << 16), 16 << 20,
       "Bytes of QoS 1/2 messages forwarded to one peer node and not yet acknowledged by it (kept in the store "
       "until it has committed them); past it QoS 1/2 publishes for its subscribers are refused (MQTT 5: 0x97)."),
    _S("queue_replicas", parse_int_range(1, 2), 1,
       "Nodes each persistent session is kept on: 1 (VerneMQ's way: its home node only) or 2 (also on one "
       "other member, which takes it up with every acknowledged message when its home node is removed; a QoS "
       "1/2 publish is acknowledged once both have committed it). Needs message_store = sqlite, and the same "
       "value on every node of the cluster."),
    _S("cluster_remove_down_after", parse_int_range(0), 0,
       "Seconds after which a member whose link is down is removed, as cluster leave node=<it> does (its "
       "persistent sessions go on elsewhere); 0: never, as VerneMQ. Both sides of a netsplit longer than "
       "this remove each other: set it only where a node that is gone this long is gone for good."),

    # -- vmq_bridge (README, "Bridge") --

    _S("plugins.vmq_bridge", parse_flag, False, "Run the bridges configured as vmq_bridge.tcp.<name> and "
       "vmq_bridge.ssl.<name> (VerneMQ's vmq_bridge)."),
    _S("vmq_bridge.$type.$name", parse_endpoint, None, "host:port of a bridge's remote broker (tcp: plain, ssl: TLS)."),
    _S("vmq_bridge.$type.$name.topic.$n", parse_bridge_topic, None,
       "pattern [in|out|both] [qos] [local-prefix] [remote-prefix]; * stands for #."),
    _S("vmq_bridge.$type.$name.cleansession", parse_flag, False, "Connect to the remote with a clean session."),
    _S("vmq_bridge.$type.$name.client_id", parse_text, "auto",
       "Client id at the remote (auto: the node's name and the bridge's)."),
    _S("vmq_bridge.$type.$name.keepalive_interval", parse_int_range(0, 65535), 60,
       "Keep-alive towards the remote, in seconds."),
    _S("vmq_bridge.$type.$name.username", parse_text, "", "User name at the remote (empty: none)."),
    _S("vmq_bridge.$type.$name.password", parse_text, "", "Password at the remote.", secret=True),
    _S("vmq_bridge.$type.$name.restart_timeout", parse_int_range(1, 3600), 10,
       "Seconds before the first reconnect; it doubles on each failure, up to ten times as long."),
    _S("vmq_bridge.$type.$name.try_private", parse_flag, True,
       "Tell the remote it is a bridge (MQTT 3.1/3.1.1 protocol level + 128): no echo, retain as published."),
    _S("vmq_bridge.$type.$name.mqtt_version", parse_int_range(3, 5), 4,
       "MQTT version spoken to the remote: 3 (3.1), 4 (3.1.1) or 5."),
    _S("vmq_bridge.$type.$name.max_outgoing_buffered_bytes", parse_int_range(0), BRIDGE_BUFFER_BYTES,
       "Bytes (payloads and topics) for the remote kept in the message store while it is unreachable or slow "
       "(0: no bound of its own). Past it a local QoS 1/2 publish for it is refused (MQTT 5 0x97; a 3.1.1 "
       "publisher is disconnected unacknowledged, so it resends); QoS 0, and messages forwarded by other "
       "nodes, are dropped and counted."),
    _S("vmq_bridge.$type.$name.max_outgoing_buffered_messages", parse_int_range(0), 0,
       "Messages for the remote kept in the message store (0: no count bound, only "
       "max_outgoing_buffered_bytes); past it as max_outgoing_buffered_bytes."),
    _S("vmq_bridge.$type.$name.cafile", parse_text, "", "ssl: PEM CA certificates the remote's is checked against "
       "(empty: the system's)."),
    _S("vmq_bridge.$type.$name.certfile", parse_text, "", "ssl: PEM client certificate for the remote."),
    _S("vmq_bridge.$type.$name.keyfile", parse_text, "", "ssl: PEM key of the client certificate."),
    _S("vmq_bridge.$type.$name.insecure", parse_flag, False, "ssl: do not check the remote's certificate or name."),
    _S("vmq_bridge.$type.$name.tls_version", parse_tls_versions, ("tlsv1.2",),
       "ssl: tlsv1.2 and/or tlsv1.3, the TLS versions the bridge may use."),

    # -- vmq_webhooks (README, "Webhooks") --

    _S("plugins.vmq_webhooks", parse_flag, False, "Turn vmq_webhooks on: HTTP endpoints as plugin hooks."),
    _S("vmq_webhooks.$name.hook", parse_text, None, "The hook of webhook <name> (auth_on_register, ...)."),
    _S("vmq_webhooks.$name.endpoint", parse_text, None, "The http:// or https:// URL webhook <name> POSTs to "
       "(show masks its user information and query).", masked=mask_url),
    _S("vmq_webhooks.$name.base64encode", parse_flag, True, "Base64 encode the MQTT payload in webhook <name>'s "
       "bodies."),
    _S("vmq_webhooks.$name.no_payload", parse_flag, False, "Leave the payload out of auth_on_publish bodies."),
    _S("vmq_webhooks.$name.response_timeout", parse_int_range(1, 3600000), 5000,
       "Milliseconds webhook <name>'s endpoint has to answer; an auth hook then refuses."),
    _S("vmq_webhooks.pool_max_connections", parse_int_range(1, 1000), 100,
       "Webhook calls at once (each pool of worker threads: auth hooks, notifications), read at start."),
    _S("vmq_webhooks.max_pending_calls", parse_int_range(1), 1000,
       "Packets (CONNECT, PUBLISH, SUBSCRIBE) waiting for auth webhook answers, node-wide; past it a CONNECT is "
       "refused at once (CONNACK 3, MQTT 5 0x89 Server busy), a PUBLISH or SUBSCRIBE fails for now (MQTT 5 0x97; "
       "a 3.1.1 QoS 1/2 publisher is disconnected unacknowledged, so it resends).",
       True),
    _S("vmq_webhooks.max_pending_calls_per_hook", parse_int_range(1), 500,
       "Packets waiting for one auth hook (auth_on_register, auth_on_publish, auth_on_subscribe); past it as "
       "vmq_webhooks.max_pending_calls.", True),
    _S("vmq_webhooks.pool_timeout", parse_int_range(0), 60000,
       "Milliseconds an idle keep-alive connection to an endpoint is kept.", True),
    _S("vmq_webhooks.cafile", parse_text, "", "PEM CA certificates for https endpoints (empty: the system's).",
       True),
    _S("vmq_webhooks.certfile", parse_text, "", "PEM client certificate for https endpoints.", True),
    _S("vmq_webhooks.keyfile", parse_text, "", "PEM key of vmq_webhooks.certfile (empty: in the certfile).", True),
    _S("vmq_webhooks.verify_peer", parse_flag, True, "Check https endpoints' certificates and host names.", True),
    _S("vmq_webhooks.tls_version", parse_tls_versions, ("tlsv1.2",),
       "Lowest TLS version (tlsv1.2 or tlsv1.3) for https endpoints.", True),
)
del _S

_SETTINGS_BY_NAME = types.MappingProxyType({s.name: s for s in SETTINGS})
LISTENER_TLS_OPTIONS = ("certfile", "keyfile", "cafile", "require_certificate", "use_identity_as_username",
                        "tls_version", "ciphers", "tls_handshake_timeout")
LISTENER_MQTT_OPTIONS = ("mountpoint", "max_connections", "allowed_protocol_versions", "allow_anonymous_override",
                         *LISTENER_TLS_OPTIONS)
BRIDGE_TLS_OPTIONS = ("cafile", "certfile", "keyfile", "insecure", "tls_version")  # only for vmq_bridge.ssl.<name>
LISTENER_OPTIONS = frozenset(
    s.name.split(".", 1)[1] for s in SETTINGS if s.name.startswith("listener.") and "$" not in s.name)


def find_setting(key: str) -> Setting:
    """Return the Setting that governs ``key``, or raise InvalidKey.

    Listener keys are hierarchical as in VerneMQ: ``listener.<opt>``,
    ``listener.<type>.<opt>`` and ``listener.<type>.<name>.<opt>``; the most
    specific one wins (see ``Config.listener_option``).
    """
    if key in _SETTINGS_BY_NAME and "$" not in key:
        return _SETTINGS_BY_NAME[key]
    parts = key.split(".")
    if parts[0] == "listener" and len(parts) in (3, 4) and parts[1] in LISTENER_TYPES:
        if parts[-1] in LISTENER_OPTIONS:  # the type's own setting where it has one (listener.http.max_connections)
            own = _SETTINGS_BY_NAME.get(f"listener.{parts[1]}.{parts[-1]}")
            return own or _SETTINGS_BY_NAME["listener." + parts[-1]]
        if len(parts) == 3 and re.fullmatch(r"[A-Za-z0-9_-]+", parts[2]):
            return _SETTINGS_BY_NAME["listener.$type.$name"]
    if len(parts) == 4 and parts[0] == "http_module" and parts[1] in HTTP_MODULES \
            and parts[2:] == ["auth", "mode"]:
        return _SETTINGS_BY_NAME["http_module.$module.auth.mode"]
    # -- cluster keys --
    if parts[:2] == ["listener", "vmqs"] and parts[-1] in CLUSTER_TLS_OPTIONS \
            and (len(parts) == 3 or (len(parts) == 4 and parts[2] == "clustering")):
        return _SETTINGS_BY_NAME["listener." + parts[-1]]  # most specific wins, as for the other listeners

    # -- vmq_bridge keys --

    if parts[0] == "vmq_bridge" and len(parts) in (3, 4, 5) and parts[1] in ("tcp", "ssl") \
            and re.fullmatch(r"[A-Za-z0-9_-]+", parts[2]):
        pattern = "vmq_bridge.$type.$name" + ("." + parts[3] if len(parts) > 3 else "")
        if len(parts) == 5 and parts[3] == "topic" and re.fullmatch(r"[A-Za-z0-9_-]+", parts[4]):
            return _SETTINGS_BY_NAME["vmq_bridge.$type.$name.topic.$n"]
        tls_only = parts[1] == "tcp" and len(parts) == 4 and parts[3] in BRIDGE_TLS_OPTIONS
        if len(parts) < 5 and pattern in _SETTINGS_BY_NAME and not pattern.endswith(".topic") and not tls_only:
            return _SETTINGS_BY_NAME[pattern]

    # -- vmq_webhooks keys --

    if len(parts) == 3 and parts[0] == "vmq_webhooks" and re.fullmatch(r"[A-Za-z0-9_-]+", parts[1]) \
            and parts[2] in ("hook", "endpoint", "base64encode", "no_payload", "response_timeout"):
        return _SETTINGS_BY_NAME[f"vmq_webhooks.$name.{parts[2]}"]
    raise InvalidKey(f"unknown configuration key {key!r}")


def parse_setting(key: str, text: str) -> Any:
    """Parse ``text`` as the value of ``key``; raise InvalidKey or InvalidValue."""
    setting = find_setting(key)
    try:
        return setting.parse(text.strip())  # "key = value": the message quotes the value, not its spacing
    except ValueError as exc:
        raise InvalidValue(f"bad value for {key}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Config:
    """The node's configuration: explicit values over the table's defaults.

    Immutable: ``set`` makes a new Config (``with_values``) and the node swaps it in.
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    _defaults: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # memo of lookups

    def __post_init__(self):
        checked = {}
        for key, value in dict(self.values).items():
            checked[key] = parse_setting(key, value) if isinstance(value, str) else value
            find_setting(key)
        object.__setattr__(self, "values", types.MappingProxyType(checked))

    def __getitem__(self, key: str) -> Any:
        if key in self.values:
            return self.values[key]
        try:
            return self._defaults[key]
        except KeyError:
            value = self._defaults[key] = self._default(key)
            return value

    @staticmethod
    def _default(key: str) -> Any:
        setting = find_setting(key)
        if setting.name == "http_module.$module.auth.mode":
            return "apikey" if key.split(".")[1] in APIKEY_MODULES else "noauth"
        return setting.default

    def with_values(self, changes: Mapping[str, Any]) -> Config:
        """Return a Config with ``changes`` (strings are parsed) applied."""
        return Config({**self.values, **changes})

    def listeners(self, kind: str) -> dict[str, tuple[str, int]]:
        """Return name -> (host, port) for every listener of ``kind`` (``http``, ...)."""
        found = {}
        if kind in DEFAULT_LISTENERS:
            found["default"] = DEFAULT_LISTENERS[kind]  # VerneMQ include_default "default"
        prefix = f"listener.{kind}."
        for key, value in self.values.items():
            rest = key[len(prefix):]
            if key.startswith(prefix) and "." not in rest and rest not in LISTENER_OPTIONS:
                found[rest] = value
        return found

    def listener_option(self, kind: str, name: str, option: str) -> Any:
        """Return ``option`` for one listener, the most specific key winning."""
        for key in (f"listener.{kind}.{name}.{option}", f"listener.{kind}.{option}", f"listener.{option}"):
            if key in self.values:
                return self.values[key]
        kind_default = f"listener.{kind}.{option}"  # an HTTP listener's own default (a thread per connection)
        return self[kind_default if kind_default in _SETTINGS_BY_NAME else f"listener.{option}"]

    @classmethod
    def from_sources(cls, file_path: str | None = None, sets: Sequence[str] = (),
                     base: Mapping[str, Any] | None = None) -> Config:
        """Build a Config from a vernemq.conf-style file and ``--set k=v`` items.

        ``--set`` wins over the file; an unknown key or bad value raises
        ConfigError naming the file and line.
        """
        values: dict[str, Any] = dict(base or {})
        if file_path:
            values.update(_read_config_file(file_path))
        for item in sets:
            key, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected key=value")
            try:
                values[key.strip()] = parse_setting(key.strip(), text)
            except BadRequest as exc:
                raise ConfigError(f"--set {item!r}: {exc.text}") from None
        return cls(values)


MAX_SMALL_FILE = 16 << 20  # bytes of the config file, api_keys.json or node.json read at most (~80,000 keys)
MAX_RULES_FILE = 64 << 20  # bytes of a vmq_passwd or vmq_acl file read at most (~400,000 users)
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def file_kind(mode: int) -> str:
    """Name what a stat mode describes, for messages."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def read_regular_file(path: str, limit: int, what: str,
                      check: Callable[[os.stat_result], None] | None = None) -> tuple[bytes, os.stat_result]:
    """Return the bytes and stat of ``path``: a regular file (a symlink to one too) of at most ``limit`` bytes.

    A FIFO, a device (``/dev/zero``) or a directory is never read, and a FIFO is opened without waiting
    for a writer. Raises FileRefused naming ``what`` and the file; OSError when it cannot be opened.
    ``check`` may refuse the opened file by its stat before a byte of it is read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{what} {path} is {file_kind(st.st_mode)}, not a regular file; vmqapi reads "
                              "only regular files and left it alone")
        if check is not None:
            check(st)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise FileRefused(f"{what} {path} is larger than {limit} bytes; vmqapi did not read it and left it alone")
    return b"".join(chunks), st


def require_regular_file(path: str, what: str) -> None:
    """Raise FileRefused when ``path`` exists and is not a regular file (a database the node opens)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot check {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise FileRefused(f"{what} {path} is {file_kind(mode)}, not a regular file; vmqapi left it alone")


def require_tls_files(options: Mapping[str, Any]) -> None:
    """Raise FileRefused when a certfile, keyfile or cafile is no regular file: OpenSSL would wait on a FIFO."""
    for option in ("certfile", "keyfile", "cafile"):
        if options.get(option):
            require_regular_file(options[option], f"the {option}")


def _read_config_file(path: str) -> dict[str, Any]:
    """Read ``key = value`` lines with ``#`` comments; report errors by file and line."""
    try:
        lines = read_regular_file(path, MAX_SMALL_FILE, "the config file")[0].decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    values = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, text = line.partition("=")
        if not sep:
            raise ConfigError(f"{path}:{number}: expected key = value")
        try:
            values[key.strip()] = parse_setting(key.strip(), text)
        except BadRequest as exc:
            raise ConfigError(f"{path}:{number}: {exc.text}") from None
    return values


@dataclass(frozen=True, slots=True)
class Limits:
    """What one packet may carry (0: no limit): each property or filter costs a turn of the loop all clients share."""

    properties: int = 0  # properties of every list in the packet together (max_properties_per_packet)
    topics: int = 0  # topic filters of a SUBSCRIBE or UNSUBSCRIBE (max_subscriptions_per_client)

    def __post_init__(self):
        if self.properties < 0 or self.topics < 0:
            raise ValueError("packet limits are counts, 0 or more")


NO_LIMITS = Limits()


###############################################################################
# 3. Metrics registry #########################################################
###############################################################################
# Owns: counters and gauges by VerneMQ name and labels, and their descriptions.
# Must not know: who increments them, how they are rendered on the wire.

LabelSet = tuple[tuple[str, str], ...]
_NO_LABELS: tuple[LabelSet, ...] = ((),)
V4: LabelSet = (("mqtt_version", "4"),)  # metric labels of MQTT 3.1 and 3.1.1 packets, as VerneMQ counts them
V5: LabelSet = (("mqtt_version", "5"),)
V5_SUCCESS: LabelSet = (("mqtt_version", "5"), ("reason_code", "success"))
_BY_VERSION: tuple[LabelSet, ...] = (V4, V5)
_CONNACK: tuple[LabelSet, ...] = tuple(
    (("mqtt_version", "4"), ("return_code", code)) for code in (
        "success", "unsupported_protocol_version", "client_identifier_not_valid", "server_unavailable",
        "bad_username_or_password", "not_authorized")) + (V5_SUCCESS,)


def _packets(kind: str, direction: str, reasons: bool = False) -> tuple[str, str, tuple[LabelSet, ...]]:
    """A packet counter by protocol; ``reasons``: MQTT 5 packets also carry their reason code."""
    sets = (_BY_VERSION[0], V5_SUCCESS) if reasons else _BY_VERSION
    return ("counter", f"The number of {kind} packets {direction}.", sets)


METRIC_DEFINITIONS: dict[str, tuple[str, str, tuple[LabelSet, ...]]] = {  # VerneMQ vmq_metrics.hrl names
    "socket_open": ("counter", "The number of times an MQTT socket has been opened.", _NO_LABELS),
    "socket_close": ("counter", "The number of times an MQTT socket has been closed.", _NO_LABELS),
    "socket_close_timeout": ("counter", "The number of MQTT sockets closed for a packet not finished in time.",
                             _NO_LABELS),
    "bytes_received": ("counter", "The total number of bytes received.", _NO_LABELS),
    "bytes_sent": ("counter", "The total number of bytes sent.", _NO_LABELS),
    "mqtt_connect_received": _packets("CONNECT", "received"),
    "mqtt_connack_sent": ("counter", "The number of CONNACK packets sent.", _CONNACK),
    "mqtt_publish_received": _packets("PUBLISH", "received"),
    "mqtt_publish_sent": _packets("PUBLISH", "sent"),
    "mqtt_puback_received": _packets("PUBACK", "received", True),
    "mqtt_puback_sent": _packets("PUBACK", "sent", True),
    "mqtt_pubrec_received": _packets("PUBREC", "received", True),
    "mqtt_pubrec_sent": _packets("PUBREC", "sent", True),
    "mqtt_pubrel_received": _packets("PUBREL", "received", True),
    "mqtt_pubrel_sent": _packets("PUBREL", "sent", True),
    "mqtt_pubcomp_received": _packets("PUBCOMP", "received", True),
    "mqtt_pubcomp_sent": _packets("PUBCOMP", "sent", True),
    "mqtt_subscribe_received": _packets("SUBSCRIBE", "received"),
    "mqtt_suback_sent": _packets("SUBACK", "sent"),
    "mqtt_unsubscribe_received": _packets("UNSUBSCRIBE", "received"),
    "mqtt_unsuback_sent": _packets("UNSUBACK", "sent"),
    "mqtt_pingreq_received": _packets("PINGREQ", "received"),
    "mqtt_pingresp_sent": _packets("PINGRESP", "sent"),
    "mqtt_disconnect_received": ("counter", "The number of DISCONNECT packets received.",
                                 (_BY_VERSION[0], (("mqtt_version", "5"), ("reason_code", "normal_disconnect")))),
    "mqtt_disconnect_sent": ("counter", "The number of DISCONNECT packets sent (MQTT 5).",
                             ((("mqtt_version", "5"), ("reason_code", "normal_disconnect")),)),
    "mqtt_auth_received": ("counter", "The number of AUTH packets received (MQTT 5).", (V5_SUCCESS,)),
    "mqtt_auth_sent": ("counter", "The number of AUTH packets sent (MQTT 5).", (V5_SUCCESS,)),
    "mqtt_publish_auth_error": ("counter", "The number of unauthorized publish attempts.", _NO_LABELS),
    "mqtt_subscribe_auth_error": ("counter", "The number of unauthorized subscription attempts.", _NO_LABELS),
    "acl_reload_error": ("counter", "The number of times the vmq_acl file could not be loaded again (the "
                         "previous rules stay in force).", _NO_LABELS),
    "mqtt_publish_error": ("counter", "The number of PUBLISH packets refused as invalid (an MQTT 5 payload that is "
                           "not the UTF-8 it claims to be).", _NO_LABELS),
    "mqtt_subscribe_error": ("counter", "The number of subscriptions refused as invalid.", _NO_LABELS),
    "mqtt_invalid_msg_size_error": ("counter", "The number of packets larger than max_message_size.", _NO_LABELS),
    "mqtt_packet_limit_error": ("counter", "The number of packets with more properties than "
                                "max_properties_per_packet, or more topic filters than "
                                "max_subscriptions_per_client.", _NO_LABELS),
    "mqtt_subscription_quota_error": ("counter", "The number of topic filters refused because their session "
                                      "held max_subscriptions_per_client, or the node max_subscriptions_total.",
                                      _NO_LABELS),
    "mqtt_session_quota_error": ("counter", "The number of CONNECTs refused because the node held "
                                 "max_persistent_sessions persistent sessions.", _NO_LABELS),
    "mqtt_puback_invalid_error": ("counter", "The number of unexpected PUBACK packets received.", _NO_LABELS),
    "mqtt_pubrec_invalid_error": ("counter", "The number of unexpected PUBREC packets received.", _NO_LABELS),
    "mqtt_pubcomp_invalid_error": ("counter", "The number of unexpected PUBCOMP packets received.", _NO_LABELS),
    "mqtt_malformed_packet_error": ("counter", "The number of connections closed for a protocol violation.",
                                    _NO_LABELS),
    "client_keepalive_expired": ("counter", "The number of clients that failed to communicate within the "
                                 "keepalive time frame.", _NO_LABELS),
    "socket_close_partial_budget": ("counter", "The number of connections closed because unfinished packets "
                                    "held more than partial_packet_budget bytes (largest first).", _NO_LABELS),
    "socket_close_write_timeout": ("counter", "The number of connections closed for leaving their answers unread "
                                   "longer than mqtt_write_timeout.", _NO_LABELS),
    "socket_close_no_descriptors": ("counter", "The number of MQTT connections refused to keep file descriptors "
                                    "for the admin API.", _NO_LABELS),
    "queue_message_in": ("counter", "The number of messages that entered a queue.", _NO_LABELS),
    "queue_message_out": ("counter", "The number of messages that left a queue.", _NO_LABELS),
    "queue_message_drop": ("counter", "The number of messages dropped because a queue was full or its client "
                           "could not keep up.", _NO_LABELS),
    "queue_message_expired": ("counter", "The number of messages that expired before delivery.", _NO_LABELS),
    "queue_message_unhandled": ("counter", "The number of published messages no subscription matched.",
                                _NO_LABELS),
    "router_matches_local": ("counter", "The number of matched local subscriptions.", _NO_LABELS),
    "router_matches_remote": ("counter", "The number of matched remote subscriptions.", _NO_LABELS),
    "http_api_auth_failed": ("counter", "The number of HTTP requests refused for a missing, malformed or "
                             "unknown API key.", _NO_LABELS),
    "active_mqtt_connections": ("gauge", "The number of open MQTT connections that completed CONNECT.",
                                _NO_LABELS),
    "total_active_connections": ("gauge", "The number of open MQTT sockets.", _NO_LABELS),
    "queue_processes": ("gauge", "The number of sessions, online and offline.", _NO_LABELS),
    "router_subscriptions": ("gauge", "The number of subscriptions in the routing table.", _NO_LABELS),
    "retain_messages": ("gauge", "The number of retained messages.", _NO_LABELS),
    "retain_message_refused": ("counter", "The number of retained messages refused for max_retained_messages or "
                               "max_retained_bytes.", _NO_LABELS),
    "store_error": ("counter", "The number of message store reads, writes or commits that failed.", _NO_LABELS),
    "tick_error": ("counter", "The number of housekeeping ticks that failed (and were run again).", _NO_LABELS),
    # -- cluster metrics (README, "Cluster") --
    "cluster_bytes_received": ("counter", "The number of bytes received from other nodes.", _NO_LABELS),
    "cluster_bytes_sent": ("counter", "The number of bytes sent to other nodes.", _NO_LABELS),
    "cluster_bytes_dropped": ("counter", "The number of bytes for other nodes dropped because the node's buffer "
                              "for an unreachable or slow peer was full.", _NO_LABELS),

    "mqtt_unsubscribe_error": ("counter", "The number of UNSUBSCRIBE packets refused (during a netsplit).",
                               _NO_LABELS),

    # -- vmq_bridge metrics --

    "bridge_messages_in": ("counter", "The number of messages a bridge received from its remote broker.", ()),
    "bridge_messages_out": ("counter", "The number of messages a bridge sent to its remote broker.", ()),
    "bridge_bytes_in": ("counter", "The payload and topic bytes a bridge received from its remote broker.", ()),
    "bridge_bytes_out": ("counter", "The payload and topic bytes a bridge sent to its remote broker.", ()),
    "bridge_messages_dropped": ("counter", "The number of messages for a bridge's remote broker dropped because "
                                "its buffer was full (max_outgoing_buffered_bytes or _messages); kept in the "
                                "message store, so it survives a restart.", ()),

    # -- vmq_webhooks metrics --

    **{f"webhooks_{hook}_{kind}": ("counter", f"The number of {what} {hook} webhooks.", _NO_LABELS)
       for hook in ("auth_on_register", "auth_on_publish", "auth_on_subscribe", "on_register", "on_publish",
                    "on_subscribe", "on_unsubscribe", "on_deliver", "on_offline_message", "on_client_wakeup",
                    "on_client_offline", "on_client_gone", "auth_on_register_m5", "auth_on_publish_m5",
                    "auth_on_subscribe_m5", "on_register_m5", "on_publish_m5", "on_subscribe_m5",
                    "on_unsubscribe_m5", "on_deliver_m5")  # VerneMQ vmq_webhooks_metrics names
       for kind, what in (("requests", "requests to"), ("errors", "errors calling"), ("bytes_sent", "bytes sent to"))},
    **{f"webhooks_{hook}_timeouts": ("counter", f"The number of {hook} webhook requests that timed out.", _NO_LABELS)
       for hook in ("auth_on_register", "auth_on_publish", "auth_on_subscribe", "auth_on_register_m5",
                    "auth_on_publish_m5", "auth_on_subscribe_m5")},
    "webhooks_notifications_dropped": ("counter", "The number of webhook notifications (on_publish, ...) dropped "
                                       "because the queue for the endpoints was full.", _NO_LABELS),
    "webhooks_auth_busy": ("counter", "The number of packets refused without asking an auth webhook because "
                           "vmq_webhooks.max_pending_calls(_per_hook) packets were waiting.", _NO_LABELS),
    "webhooks_auth_dropped": ("counter", "The number of auth webhook calls not made because the connection "
                              "had closed.", _NO_LABELS),
}


class Metrics:
    """Counters and gauges keyed by (name, labels).

    The node's own counters are bumped under ``_lock``; the broker keeps its
    counters in its event loop thread without a lock and registers them as a
    source, read (summed) only from that thread.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, LabelSet], int] = {}
        self._sources: list[tuple[Callable[[], Mapping], Callable[[], Mapping[str, int]]]] = []

    def add_source(self, counters: Callable[[], Mapping], gauges: Callable[[], Mapping[str, int]]) -> None:
        """Read counters ``{(name, labels): n}`` (zeroed by reset) and gauges ``{name: n}`` from an owner."""
        self._sources.append((counters, gauges))

    def incr(self, name: str, amount: int = 1, **labels: str) -> None:
        """Add ``amount`` to a counter."""
        key = (name, tuple(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def samples(self) -> dict[tuple[str, LabelSet], int]:
        """Return every series, defined ones first and at 0 when never bumped."""
        out = {(name, labels): 0 for name, (_, _, sets) in METRIC_DEFINITIONS.items() for labels in sets}
        with self._lock:
            own = list(self._values.items())
        for counters, gauges in self._sources:
            own += list(counters().items())
            own += [((name, ()), value) for name, value in gauges().items()]
        for key, value in own:
            out[key] = out.get(key, 0) + value
        return out

    def totals(self) -> dict[str, int]:
        """Return every metric summed over its labels (as metrics show, node status and $SYS give them)."""
        totals: dict[str, int] = {}
        for (name, _), value in self.samples().items():
            totals[name] = totals.get(name, 0) + value
        return totals

    def value(self, name: str) -> int:
        """Return the value of ``name`` summed over its labels and sources."""
        return self.totals().get(name, 0)

    def reset(self) -> None:
        """Zero every counter (gauges follow what they measure)."""
        with self._lock:
            self._values.clear()
        for counters, _ in self._sources:
            counters().clear()


###############################################################################
# Part I. The admin API                                                       #
###############################################################################
# What vmqapi grew from: API keys, the vmq-admin command table and its argv grammar,
# HTTP requests to commands and back, the ThreadingHTTPServer, observability. It reaches
# the node only through NodeApi (Command machinery) and knows nothing of the broker.


###############################################################################
# 4. Key store: the API key file ##############################################
###############################################################################
# Owns: api_keys.json (atomic writes, inter-process lock, reload on change),
#       key generation, expiry parsing, constant-time authentication; the
#       data dir's start marker (starting.pid) and waiting on it.
# Must not know: HTTP, commands, the node.

_EXPIRY_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(Z|[+-][0-9]{2}:?[0-9]{2})?")


def parse_expiry(text: str | None, now: float, max_days: int | None = None) -> int | None:
    """Parse an expiry into UTC epoch seconds, or None for no expiry.

    Accepts VerneMQ's ``YYYY-MM-DDThh:mm:ss`` (the node's local time) and the
    same with ``Z`` or an offset. Raises KeyRejected("invalid_expiry_date") for
    another form, a date not in the future, or one past ``max_days``.
    """
    if not text:
        if max_days is not None:  # VerneMQ: with a maximum, a key must expire
            raise KeyRejected("invalid_expiry_date")
        return None
    match = _EXPIRY_RE.fullmatch(text.strip())
    if not match:
        raise KeyRejected("invalid_expiry_date")
    try:
        moment = _dt.datetime(*(int(g) for g in match.groups()[:6]))
        zone = match.group(7)
        if zone:
            offset = _dt.timedelta(0) if zone == "Z" else _dt.timedelta(
                hours=int(zone[1:3]), minutes=int(zone[-2:])) * (-1 if zone[0] == "-" else 1)
            moment = moment.replace(tzinfo=_dt.timezone(offset))
        else:
            moment = moment.astimezone()  # naive: the node's local time
        expires = int(moment.timestamp())
    except (ValueError, OverflowError, OSError):
        raise KeyRejected("invalid_expiry_date") from None
    if expires <= now or (max_days is not None and expires > now + max_days * 86400):
        raise KeyRejected("invalid_expiry_date")
    return expires


def render_expiry(expires: int | None) -> str:
    """Render an expiry as ``api-key show`` does: UTC ``YYYY-MM-DD hh:mm:ss`` or never."""
    if expires is None:
        return "never"
    return _dt.datetime.fromtimestamp(expires, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One entry of api_keys.json; ``key`` is None when only its hash is kept.

    ``salt`` (hex) is set only on a hashed key that another node of the cluster made: its
    hash was taken with that node's salt, which this file's salt cannot replace.
    """

    scope: str
    expires: int | None
    digest: str
    key: str | None = None
    prefix: str = ""
    salt: str = ""
    rid: str = ""  # the cluster's name of a plain key another node made, kept here only hashed

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}")
        if self.expires is not None and (type(self.expires) is not int):
            raise ValueError("expires must be an integer or null")
        if not re.fullmatch(r"[0-9a-f]{64}", self.digest):
            raise ValueError("bad digest")
        if self.salt and (self.key is not None or not re.fullmatch(r"(?:[0-9a-f]{2}){1,64}", self.salt)):
            raise ValueError("bad salt")

    def shown(self) -> str:
        """Return the key as api-key show prints it."""
        return self.key if self.key is not None else self.prefix + "\u2026"

    def to_json(self) -> dict:
        """Return the entry as stored on disk."""
        if self.key is not None:
            return {"key": self.key, "scope": self.scope, "expires": self.expires}
        entry = {"hash": self.digest, "prefix": self.prefix, "scope": self.scope, "expires": self.expires}
        if self.salt:
            entry["salt"] = self.salt
        if self.rid:
            entry["rid"] = self.rid
        return entry

    def replica_id(self, file_salt: bytes) -> str:
        """Return the name the cluster knows this key by: the same on every node that holds it.

        A plain key is named by an unsalted hash of itself (never the key); a hashed one by
        its salt and hash, since nothing else of it is known.
        """
        if self.key is not None:
            return f"{self.scope}:{hashlib.sha256(self.key.encode('utf-8', 'surrogatepass')).hexdigest()}"
        return self.rid or f"{self.scope}:{self.salt or file_salt.hex()}:{self.digest}"

    def replica_value(self, file_salt: bytes) -> dict:
        """Return the entry as the cluster carries it (a hashed key with the salt its hash needs)."""
        entry = self.to_json()
        if self.key is None:
            entry["salt"] = self.salt or file_salt.hex()
        return entry


def _key_digest(salt: bytes, key: str) -> str:
    # Keys are looked up by this digest; a salted SHA-256 costs ~1 us where OpenSSL's HMAC costs ~8.
    return hashlib.sha256(salt + key.encode("utf-8", "surrogatepass")).hexdigest()


def _holds(entry: StoredKey, file_salt: bytes, key: str) -> bool:
    """Whether ``entry`` is ``key`` (its hash taken with its own salt, or the file's)."""
    if entry.key is not None:
        return entry.key == key
    return entry.digest == _key_digest(bytes.fromhex(entry.salt) if entry.salt else file_salt, key)


@contextlib.contextmanager
def _file_lock(path: str):
    """Hold an exclusive inter-process lock on ``path`` + ``.lock``."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:  # pragma: no cover - Windows
            import msvcrt
            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_file_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file (0600), fsync, rename, fsync dir.

    A failure at any step leaves the old file as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name != "posix":
        return True  # Windows' os.kill(pid, 0) would end the process: assume it runs
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone; or a number no process can have
        return False
    except PermissionError:
        return True
    return True


# A node writes its pid to DATA_DIR/starting.pid first thing in its start and removes it once
# node.json is written (or the start failed), so that a command run a moment after the node
# was started with "&" (the README's cluster lines) waits for it instead of finding no node.
START_FILE_MAX = 64  # bytes of a start marker read at most (a pid and a newline)


def mark_start(data_dir: str) -> None:
    """Write the start marker: this process's pid in ``data_dir``/starting.pid (0600)."""
    path = os.path.join(data_dir, START_FILE)
    try:
        write_file_atomically(path, f"{os.getpid()}\n".encode())
    except OSError as exc:  # bad configuration, as a data dir that cannot be made
        raise FileRefused(f"cannot write {path}: {exc.strerror or exc}") from None


def unmark_start(data_dir: str) -> None:
    """Remove this process's start marker (node.json supersedes it, or the start failed)."""
    _remove_marker(os.path.join(data_dir, START_FILE), os.getpid())


def starting_pid(data_dir: str) -> int | None:
    """Return the pid of the node whose start is under way in ``data_dir``, or None.

    A marker whose process is gone (a start killed half-way) is stale: it is removed and counts as none.
    """
    path = os.path.join(data_dir, START_FILE)
    pid = _marker_pid(path)
    if pid is None or _pid_alive(pid):
        return pid
    _remove_marker(path, pid)
    return None


def _marker_pid(path: str) -> int | None:
    try:
        return int(read_regular_file(path, START_FILE_MAX, START_FILE)[0])
    except (OSError, ValueError, FileRefused):  # none, unreadable, garbled, a FIFO (left alone): no start
        return None


def _remove_marker(path: str, pid: int) -> None:
    """Remove the marker at ``path`` if it still names ``pid`` (a new start may have replaced it meanwhile)."""
    if _marker_pid(path) == pid:
        with contextlib.suppress(OSError):
            os.unlink(path)


def wait_for_start(data_dir: str, ready: Callable[[], bool], announce: Callable[[int], None],
                   clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Wait until ``ready()`` while a node's start is under way in ``data_dir``; return ``ready()``.

    A start is under way while ``data_dir`` holds a live start marker: wait up to NODE_START_WAIT
    seconds for it. With no marker, look again for NODE_START_GRACE seconds: a node started at the
    same moment writes it a moment later. ``announce(pid)`` is called once, when a marker is seen.
    """
    began, told = clock(), False
    while not ready():
        pid = starting_pid(data_dir)
        if pid is not None and not told:
            announce(pid)
            told = True
        if clock() - began >= (NODE_START_WAIT if pid is not None else NODE_START_GRACE):
            return ready()
        sleep(NODE_START_POLL)
    return True


def _cookie_written(path: str) -> bool:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return os.path.lexists(path)  # a dangling symlink: read_cookie_file says so at once
    except OSError:
        return True  # read_cookie_file says why
    return not stat.S_ISREG(info.st_mode) or info.st_size > 0  # an empty one may be half made


def await_cookie_file(path: str) -> None:
    """Wait for a data dir's cookie file (``DIR/cookie``) not there yet while a node starting on DIR may make it.

    The README's cluster lines start three nodes at once: the first makes ``n1/cookie``, which
    the other two name. A file that stays missing fails as before, after the wait.
    """
    if os.path.basename(path) != COOKIE_FILE:
        return  # no node makes it
    folder = os.path.dirname(os.path.abspath(path))
    wait_for_start(folder, lambda: _cookie_written(path), lambda pid: log.info(
        "waiting for the cookie file %s: the node starting on %s (pid %d) makes it", path, folder, pid))


def _file_signature(st: os.stat_result) -> tuple:
    """What tells one version of a file from another without reading it; a chmod is a change."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode


class KeyStore:
    """API keys in one JSON file, shared by a running node and the CLI.

    Every change takes the file lock, re-reads the file, applies itself and
    writes atomically. Readers stat the file on each check and reload when it
    changed, so a key the CLI adds or deletes counts on the next request.
    Keys are looked up by a SHA-256 of the file's salt and the key, so the
    lookup compares digests, never the secret itself.
    """

    def __init__(self, path: str, *, storage: str = "plain", min_length: int = 0,
                 max_expiry_days: int | None = None, clock: Callable[[], float] = time.time):
        self.path = path
        self.storage = storage
        self.min_length = min_length
        self.max_expiry_days = max_expiry_days
        self._clock = clock
        self._lock = threading.Lock()  # held by writers and reloaders; readers use the current view
        # One immutable view (signature, salt, entries, index), swapped whole, read without a lock.
        # The salts: the file's, then those of keys other nodes hashed (usually none).
        self._view: tuple[tuple | None, bytes, tuple[StoredKey, ...], dict, tuple[bytes, ...]] = \
            (("unread",), b"", (), {}, (b"",))
        self._refused: tuple | None = None  # (signature, why) of the version of the file refused (logged once)

    # -- reading ----------------------------------------------------------
    def load(self) -> None:
        """Read the file now; raise KeyStoreError if it is corrupt or unreadable."""
        with self._lock:
            self._install(*self._read())

    def _read(self) -> tuple[tuple | None, bytes, tuple[StoredKey, ...]]:
        try:
            data, st = read_regular_file(self.path, MAX_SMALL_FILE, "the API key file", self._check_mode)
        except (FileNotFoundError, NotADirectoryError):
            return None, b"", ()
        except FileRefused as exc:  # a FIFO or an oversized file: a key store problem, as a corrupt file is
            raise KeyFileRefused(exc.text) from None
        except OSError as exc:
            raise KeyStoreError(f"cannot read the API key file {self.path}: {exc.strerror}") from None
        salt, entries = self._parse(data)
        return _file_signature(st), salt, entries

    def _check_mode(self, st: os.stat_result) -> None:
        """Refuse, before reading it, a key file others may read (as at start-up)."""
        if os.name == "posix" and st.st_mode & 0o077:
            raise KeyStoreError(f"the API key file {self.path} can be read by others (mode {st.st_mode & 0o777:o}); "
                                f"vmqapi uses none of its keys until you run: chmod 600 {self.path}")

    def _parse(self, data: bytes) -> tuple[bytes, tuple[StoredKey, ...]]:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
                raise ValueError('expected an object with a "keys" list')
            salt = bytes.fromhex(doc.get("salt", ""))
            entries = tuple(self._parse_entry(salt, item) for item in doc["keys"])
        except RecursionError:  # json nests deeper than the interpreter's stack
            raise KeyStoreError(
                f"the API key file {self.path} is corrupt (nested too deeply); fix or move it away, "
                "vmqapi will not overwrite it") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise KeyStoreError(
                f"the API key file {self.path} is corrupt ({exc}); fix or move it away, "
                "vmqapi will not overwrite it") from None
        return salt, entries

    @staticmethod
    def _parse_entry(salt: bytes, item: dict) -> StoredKey:
        expires = item.get("expires")
        if "key" in item:
            key = item["key"]
            if not isinstance(key, str) or not key:
                raise ValueError("a key must be a non-empty string")
            return StoredKey(item["scope"], expires, _key_digest(salt, key), key=key)
        own_salt = str(item.get("salt", ""))
        return StoredKey(item["scope"], expires, item["hash"], prefix=str(item.get("prefix", "")),
                         salt="" if own_salt == salt.hex() else own_salt, rid=str(item.get("rid", "")))

    def _install(self, signature, salt, entries) -> None:
        salts = (salt, *sorted({bytes.fromhex(e.salt) for e in entries if e.salt}))
        self._view = (signature, salt, entries, {(e.scope, e.digest): e for e in entries}, salts)

    def _current(self) -> tuple:
        """Return the view of the file as it is on disk now: one stat, a reload only when it changed."""
        view = self._view
        try:
            signature = _file_signature(os.stat(self.path))
        except (FileNotFoundError, NotADirectoryError):  # no file, or a file where its directory should be: no keys
            signature = None
        if signature != view[0]:
            with self._lock:
                refused = self._refused
                if refused is not None and refused[0] == signature:  # the same version: not read again
                    raise KeyStoreError(refused[1])
                if signature != self._view[0]:
                    try:
                        self._install(*self._read())
                    except VmqError as exc:  # fail closed: no key is valid until the file is fixed
                        self._refused = (signature, exc.text)
                        log.error("%s", exc.text)  # once per version of the file
                        raise
                    self._refused = None
                view = self._view
        return view

    def authenticate(self, key: str, scopes: Iterable[str]) -> str | None:
        """Return the first of ``scopes`` for which ``key`` is valid now, or None."""
        _, _, _, index, salts = self._current()
        now = self._clock()
        for salt in salts:
            digest = _key_digest(salt, key)
            for scope in scopes:
                entry = index.get((scope, digest))
                if entry is not None and hmac.compare_digest(entry.digest, digest) \
                        and (entry.expires is None or now < entry.expires):
                    return scope
        return None

    def entries(self) -> tuple[StoredKey, ...]:
        """Return the stored keys, oldest first, as on disk now."""
        return self._current()[2]

    # -- changing ---------------------------------------------------------
    def _mutate(self, change: Callable[[bytes, list[StoredKey]], Any]) -> Any:
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as exc:  # a file on the way, /proc, a parent of another user: bad configuration
            raise KeyFileRefused(f"cannot create the directory {folder}: {exc.strerror or exc}") from None
        with self._lock, _file_lock(self.path):
            _, salt, entries = self._read()
            salt = salt or secrets.token_bytes(16)
            entries = list(entries)
            result = change(salt, entries)
            doc = {"version": 1, "salt": salt.hex(), "keys": [e.to_json() for e in entries]}
            try:
                write_file_atomically(self.path, json.dumps(doc, indent=1).encode() + b"\n")
            except OSError as exc:  # a full disk, a read-only folder: the old file stands, nothing changed
                raise KeyStoreError(f"cannot write {self.path}: {exc.strerror or exc}; nothing was changed") \
                    from None
            self._install(_file_signature(os.stat(self.path)), salt, tuple(entries))
            self._refused = None
            return result

    def _check_scope(self, scope: str) -> None:
        if scope not in SCOPES:
            raise KeyRejected("invalid_scope")

    def add(self, key: str, scope: str = "mgmt", expires: str | None = None) -> None:
        """Add ``key``; raise KeyRejected with VerneMQ's error name on refusal."""
        self._check_scope(scope)
        if not key or any(c in key for c in ":\0") or not key.isprintable() or key != key.strip():
            raise KeyRejected("invalid_key")  # Basic auth splits at ':'; no spaces or controls
        if len(key) < self.min_length:
            raise KeyRejected("invalid_key_length")
        expiry = parse_expiry(expires, self._clock(), self.max_expiry_days)

        def change(salt: bytes, entries: list[StoredKey]) -> None:
            digest = _key_digest(salt, key)
            if any(e.scope == scope and _holds(e, salt, key) for e in entries):
                raise KeyRejected("key_already_exists")
            if self.storage == "hashed":
                entries.append(StoredKey(scope, expiry, digest, prefix=key[:HASHED_PREFIX_LENGTH]))
            else:
                entries.append(StoredKey(scope, expiry, digest, key=key))
        self._mutate(change)

    def create(self, scope: str = "mgmt", expires: str | None = None) -> str:
        """Generate, store and return a new key (``secrets``, [A-Za-z0-9])."""
        length = max(DEFAULT_KEY_LENGTH, self.min_length)
        while True:
            key = "".join(secrets.choice(KEY_ALPHABET) for _ in range(length))
            try:
                self.add(key, scope, expires)
                return key
            except KeyRejected as exc:
                if exc.code != "key_already_exists":
                    raise

    def delete(self, key: str, scope: str = "mgmt") -> None:
        """Remove ``key`` from ``scope``; raise KeyRejected("key_not_found") if absent."""
        self._check_scope(scope)

        def change(salt: bytes, entries: list[StoredKey]) -> None:
            keep = [e for e in entries if not (e.scope == scope and _holds(e, salt, key))]
            if len(keep) == len(entries):
                raise KeyRejected("key_not_found")
            entries[:] = keep
        self._mutate(change)

    def replicated(self) -> dict[str, dict]:
        """Return every key as the cluster carries it, by its replica id."""
        _, salt, entries, _, _ = self._current()
        return {e.replica_id(salt): e.replica_value(salt) for e in entries}

    def apply_replicated(self, adds: Mapping[str, dict], removes: Iterable[str]) -> None:
        """Take keys added and deleted elsewhere in the cluster: one locked rewrite of the file.

        An entry that cannot be read is skipped and logged: a peer never corrupts this file.
        """
        removes = set(removes)

        def change(salt: bytes, entries: list[StoredKey]) -> None:
            held = {e.replica_id(salt) for e in entries}
            entries[:] = [e for e in entries if e.replica_id(salt) not in removes]
            for rid, item in adds.items():
                if rid in held:
                    continue
                try:
                    entry = self._parse_entry(salt, dict(item))
                    if entry.key is not None and self.storage == "hashed":  # this file keeps no key itself
                        entry = StoredKey(entry.scope, entry.expires, entry.digest,
                                          prefix=entry.key[:HASHED_PREFIX_LENGTH], rid=entry.replica_id(salt))
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    log.warning("cluster: skipped an API key that cannot be read (%s)", exc)
                    continue
                if entry.replica_id(salt) == rid:
                    entries.append(entry)
        self._mutate(change)

    def rows(self, scope: str = "all") -> list[dict]:
        """Return api-key show's table rows for ``scope`` (a scope or ``all``)."""
        if scope != "all":
            self._check_scope(scope)
        now = self._clock()
        return [{"Key": e.shown(), "Scope": e.scope, "Expires (UTC)": render_expiry(e.expires),
                 "has expired": e.expires is not None and now >= e.expires}
                for e in self.entries() if scope in ("all", e.scope)]

    def provision(self, lines: Iterable[str], source: str) -> int:
        """Add ``key[:scope[:expires]]`` entries that are not there yet; return how many.

        Raises ConfigError naming ``source`` and the entry's position, never the key.
        """
        added = 0
        for position, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, rest = line.partition(":")
            scope, _, expires = rest.partition(":")
            try:
                self.add(key, scope or "mgmt", expires or None)
                added += 1
            except KeyRejected as exc:
                if exc.code != "key_already_exists":
                    raise ConfigError(f"{source}, entry {position}: {exc.code}") from None
        return added


###############################################################################
# 5. Command machinery: argv grammar, command table, result elements ##########
###############################################################################
# Owns: the vmq-admin argv grammar and its query-string form, Command specs,
#       the CommandTable, binding argv to a command, result elements and their
#       JSON and boxed-table renderings.
# Must not know: sockets, the broker, the key file.

FLAG_VALUES = ("none", "optional", "required")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True, slots=True)
class Param:
    """One argument key or flag of a command.

    ``value`` says whether a flag takes a value: ``none`` (``--cleanup``),
    ``optional`` (``--topic`` selects, ``--topic=x`` filters) or ``required``.
    Argument keys always take one. ``secret``: given at all (to select or to
    filter), the flag shows message payloads, so a read-only key may not use it.
    """

    name: str
    parse: Callable[[str], Any] = str
    short: str = ""
    doc: str = ""
    value: str = "required"
    secret: bool = False

    def __post_init__(self):
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"bad parameter name {self.name!r}")
        if len(self.short) > 1 or self.value not in FLAG_VALUES:
            raise ValueError(f"bad short name or value kind for {self.name!r}")

    def cast(self, text: str | None) -> Any:
        """Parse ``text`` (None: given bare) or raise InvalidValue."""
        if text is None:
            if self.value == "required":
                raise InvalidValue(f"{self.name} needs a value")
            return None
        if self.value == "none":
            raise InvalidValue(f"--{self.name} takes no value")
        try:
            return self.parse(text)
        except (ValueError, TypeError) as exc:
            raise InvalidValue(f"bad value for {self.name}: {exc}") from None


def _params(items: Iterable[Any], flag: bool) -> tuple[Param, ...]:
    """Normalise names, (name, parser) pairs and Params into Params."""
    out = []
    for item in items:
        if isinstance(item, Param):
            out.append(item)
        elif isinstance(item, str):
            out.append(Param(item, value="optional" if flag else "required"))
        else:
            name, parse = item
            out.append(Param(name, parse))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Command:
    """One vmq-admin command: its words, parameters, usage and handler.

    What a read-only (``mgmt_ro``) key may run is marked here, not in the HTTP
    handler: ``read_only`` (it changes nothing), ``secret`` (its answer holds
    key material or payloads, whatever the flags), a Param's ``secret`` (that
    flag shows payloads), and ``default_columns`` (the columns shown when no
    ``optional`` flag selects one, so a secret default column counts as given).
    """

    words: tuple[str, ...]
    handler: Callable[[Call], Any]
    keys: tuple[Param, ...] = ()
    flags: tuple[Param, ...] = ()
    required: tuple[str, ...] = ()
    doc: str = ""
    read_only: bool = False
    local: bool = False
    extra_words: str = ""
    open_keys: bool = False
    quick: bool | Callable[[NodeApi], bool] = False  # small, bounded work: no slow-command slot (callable: ask node)
    secret: bool = False
    default_columns: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.words or not all(_NAME_RE.fullmatch(w) for w in self.words):
            raise ValueError(f"bad command words {self.words!r}")
        names = {k.name for k in self.keys}
        if not set(self.required) <= names:
            raise ValueError(f"required keys not declared: {set(self.required) - names}")

    def read_only_refusal(self, flags: Mapping[str, Any]) -> str:
        """Return why a read-only key may not run this command with ``flags`` ('' when it may)."""
        words = " ".join(self.words)
        if not self.read_only:
            return f"a mgmt_ro key may not run {words}, which changes the node"
        if self.secret:
            return f"a mgmt_ro key may not run {words}, which shows key material or message payloads"
        selecting = any(flags.get(f.name, "") is None for f in self.flags if f.value == "optional")
        for f in self.flags:
            if f.secret and (f.name in flags or (not selecting and f.name in self.default_columns)):
                return f"a mgmt_ro key may not see --{f.name} of {words}, which shows message payloads"
        return ""

    def key(self, name: str) -> Param | None:
        """Return the argument key ``name``, or None."""
        return next((k for k in self.keys if k.name == name), None)

    def flag(self, name: str) -> Param | None:
        """Return the flag written ``--name`` or ``-n``, or None."""
        if name.startswith("--"):
            return next((f for f in self.flags if f.name == name[2:]), None)
        return next((f for f in self.flags if f.short and f.short == name[1:]), None)

    def synopsis(self) -> str:
        """Return the one-line form: words, keys, flags."""
        parts = ["vmq-admin", *self.words]
        if self.extra_words:
            parts.append(f"<{self.extra_words}> ...")
        for k in self.keys:
            parts.append(f"{k.name}=<{k.name}>" if k.name in self.required else f"[{k.name}=<{k.name}>]")
        if self.open_keys:
            parts.append("<key>=<value> ...")
        for f in self.flags:
            shown = {"none": f"--{f.name}", "optional": f"--{f.name}[=<value>]",
                     "required": f"--{f.name}=<value>"}[f.value]
            parts.append(f"[{shown}]")
        return " ".join(parts)

    def usage(self) -> str:
        """Return the usage text generated from the spec and the handler's docstring."""
        lines = [self.synopsis(), ""]
        doc = " ".join((self.doc or "").split())
        if doc:
            lines += [f"  {doc}", ""]
        for title, params, prefix in (("Keys", self.keys, ""), ("Flags", self.flags, "--")):
            if params:
                lines.append(f"  {title}:")
                for p in params:
                    short = f"-{p.short}, " if p.short else ""
                    lines.append(f"    {short}{prefix}{p.name}  {p.doc}".rstrip())
                lines.append("")
        return "\n".join(lines).rstrip() + "\n"


# -- the node's interface --------------------------------------------------

class Listener(Protocol):
    """What listener show, stop, restart, delete and tls show read of a listener, MQTT or HTTP."""

    name: str
    kind: str  # tcp, ssl, ws, wss, http or https
    address: str
    port: int
    status: str  # running, suspended or stopped
    tls: ssl.SSLContext | None

    def option(self, key: str) -> Any:
        """Return one of the listener's settings (certfile, max_connections, ...)."""

    def row(self, tls: bool = False, mqtt: bool = False) -> dict:
        """Return the listener's row of listener show."""

    def suspend(self, kill_sessions: bool = False) -> None:
        """Stop accepting (suspended); with ``kill_sessions`` also close the connections (stopped)."""

    def resume(self) -> None:
        """Accept again on the same address and port; raise OSError when it is taken."""

    def delete(self) -> None:
        """Stop for good and close the connections."""


class NodeApi(Protocol):
    """What the admin API (commands, HTTP endpoints, observability) asks of the node; ``Node`` implements it.

    Whatever touches the broker runs in the broker's loop thread: these methods are called
    from HTTP connection threads and return values, never the broker's own objects.
    ``local=True`` keeps a call on this node; otherwise it reaches every node of the cluster.
    Commands marked ``local`` (api-key) run in the CLI against ``name``, ``config`` and
    ``keystore`` alone.
    """

    name: str
    data_dir: str
    secret: str  # node.json's: the local CLI's credential
    keystore: KeyStore
    metrics: Metrics
    commands: CommandTable
    slow_commands: threading.BoundedSemaphore  # see slow_command_slot
    history: StatusHistory
    status_rows: StatusRows
    unfinished_http: UnfinishedRequests

    @property
    def config(self) -> Config:
        """The configuration in force now."""

    def apply_settings(self, changes: Mapping[str, Any]) -> None:
        """Swap in a Config with ``changes`` (already parsed) applied."""

    def request_stop(self) -> None:
        """Stop the node from another thread."""

    def in_broker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the broker's thread, committed (for the plugins, which own broker objects)."""

    # -- status and metrics
    def status(self) -> dict[str, Any]:
        """Return node status's values."""

    def metric_samples(self) -> dict[tuple[str, LabelSet], int]:
        """Return every metric series."""

    def reset_metrics(self) -> None:
        """Zero every counter."""

    def health_reasons(self) -> list[str]:
        """Return why the node is not healthy (empty: it is)."""

    def health_warnings(self) -> list[str]:
        """Return what /health says of a healthy node (sessions kept on one node only)."""

    def plugin_rows(self) -> list[dict]:
        """Return the rows of plugin show."""

    def enable_plugin(self, name: str, on: bool) -> bool:
        """Switch a plugin on or off; return False when there is no such plugin."""

    # -- listeners
    def listener_rows(self, tls: bool = False, mqtt: bool = False) -> list[dict]:
        """Return the rows of listener show."""

    def find_listener(self, address: str, port: int) -> Listener | None:
        """Return the listener at address:port, or None."""

    def tls_listeners(self) -> list[Listener]:
        """Return the listeners that speak TLS."""

    def start_listener(self, address: str, port: int, options: Mapping[str, Any], kind: str = "tcp") -> None:
        """Start a listener; raise OSError when it cannot bind or load its certificate."""

    def delete_listener(self, listener: Listener) -> None:
        """Stop a listener, close its connections and forget it."""

    # -- sessions, subscriptions, retained messages
    def session_count(self) -> int:
        """Return how many sessions this node holds."""

    def session_records(self, client_id: str | None = None, subscriptions: bool = True, messages: bool = True,
                        local: bool = False) -> list[dict]:
        """Return every session show field of each session (or ``client_id``'s)."""

    def session_rows(self, client_id: str | None, columns: Sequence[str], window: slice,
                     local: bool = False) -> list[dict]:
        """Return session show rows of ``columns`` for a listing without filters, paged by ``window``."""

    def client_status(self, key: tuple[str, str]) -> tuple[str, dict[str, int]] | None:
        """Return (online or offline, {filter: QoS}) of the session of (mountpoint, client id), or None."""

    def disconnect_session(self, client_id: str, mountpoint: str = "", cleanup: bool = False,
                           local: bool = False) -> bool:
        """Disconnect a client (``cleanup``: drop its session); return whether it existed."""

    def disconnect_batch(self, count: int, mountpoint: str, cleanup: bool, keep: Iterable[str]) -> int:
        """Disconnect up to ``count`` online clients of this node, sparing ``keep``; return how many."""

    def unsubscribe(self, client_id: str, topic: str, mountpoint: str = "", local: bool = False) -> bool:
        """Remove one subscription of a session; return whether it existed."""

    def reauthorize(self, username: str, client_id: str, mountpoint: str = "", local: bool = False) -> int:
        """Check a session's subscriptions against the ACL as ``username``; return how many were dropped."""

    def retained_rows(self) -> list[dict]:
        """Return mountpoint, topic and payload of every retained message."""

    def delete_retained(self, mountpoint: str, topic: str) -> bool:
        """Delete one retained message; return whether there was one."""

    def delete_expired_retained(self) -> int:
        """Delete the retained messages whose expiry has passed; return how many."""

    def http_publish(self, peer: tuple, user: str | None, password: bytes | None, client_id: str,
                     mountpoint: str, message: HttpMessage) -> str | None:
        """Publish as an MQTT client would; return HTTP_PUB_ANSWERS' reason (None: no broker)."""

    def trace_client(self, client_id: str, mountpoint: str, duration: float, rate: tuple[int, int, int],
                     follow: str | None = None) -> list[str]:
        """Trace a client for ``duration`` seconds (``rate``: lines, per ms, payload bytes); return the lines."""

    def topic_problem(self, topic: str, max_levels: int = 0) -> str | None:
        """Return why a PUBLISH to ``topic`` is refused (``max_levels`` 0: any depth), or None."""

    def string_problem(self, text: str) -> str | None:
        """Return why ``text`` cannot travel as an MQTT string, or None."""

    # -- the cluster (alone, this node is the only member)
    def cluster_members(self) -> list[str]:
        """Return every member's name (empty when the node is in no cluster)."""

    def cluster_peers(self) -> list[str]:
        """Return the other members."""

    def call_node(self, target: str, op: str, *args: Any) -> Any:
        """Ask node ``target`` to run cluster op ``op``; raise ClusterError."""

    def gather(self, op: str, *args: Any) -> list[tuple[str, Any]]:
        """Ask every other reachable member to run ``op``; return (node, answer) pairs."""

    def replicate_settings(self, target: str, texts: Mapping[str, str]) -> None:
        """Hand ``set``'s changes to ``target`` (a node name or ``*``); a node that is down takes them on return."""


@dataclass(frozen=True, slots=True)
class Call:
    """A command bound to its arguments, ready to run against ``node``."""

    command: Command
    node: NodeApi
    args: Mapping[str, Any]
    flags: Mapping[str, Any]
    extra: tuple[str, ...] = ()
    after: list = field(default_factory=list)  # run once the answer has been sent
    read_only: bool = False  # for a mgmt_ro key: the answer masks what such a key may not see


class CommandTable:
    """The commands one node serves: CLI, HTTP and --help all read this table."""

    def __init__(self, commands: Iterable[Command] = ()):
        self._lock = threading.Lock()
        self._commands: dict[tuple[str, ...], Command] = {}
        for cmd in commands:
            self.add(cmd)

    def add(self, command: Command) -> Command:
        """Add (or replace) ``command``."""
        with self._lock:  # copy on write: readers use the dict they got, no lock
            self._commands = {**self._commands, command.words: command}
        return command

    def register(self, words: Sequence[str], fn: Callable[[Call], Any], *, keys: Iterable[Any] = (),
                 flags: Iterable[Any] = (), usage: str | None = None, required: Iterable[str] = (),
                 read_only: bool = False, quick: bool | Callable[[NodeApi], bool] = False,
                 secret: bool = False) -> Command:
        """Add a command from an embedding program; it then exists in CLI, HTTP and --help.

        ``keys`` and ``flags`` are names, ``(name, parser)`` pairs or Params;
        ``fn(call)`` returns a string, an element, or a list of elements. Over HTTP it
        runs in the connection's thread and takes one of the node's SLOW_COMMANDS slots
        (past them: 503), unless ``quick`` says its work is small and bounded.
        ``read_only`` lets mgmt_ro keys run it, unless ``secret`` says its answer shows secrets.
        """
        return self.add(Command(tuple(words), fn, keys=_params(keys, False), flags=_params(flags, True),
                                required=tuple(required), doc=usage or fn.__doc__ or "",
                                read_only=read_only, quick=quick, secret=secret))

    def __iter__(self):
        return iter(sorted(self._commands.values(), key=lambda c: c.words))

    def table(self) -> Mapping[tuple[str, ...], Command]:
        """Return the commands as they are now (a new mapping after every change)."""
        return self._commands

    def resolve(self, words: Sequence[str]) -> tuple[Command, tuple[str, ...]]:
        """Return the command with the longest matching prefix and the words left over."""
        words, commands = tuple(words), self._commands
        for n in range(len(words), 0, -1):
            cmd = commands.get(words[:n])
            if cmd is not None and (n == len(words) or cmd.extra_words):
                return cmd, words[n:]
        below = sorted({c.words[len(words)] for c in commands.values()
                        if len(c.words) > len(words) and c.words[:len(words)] == words})
        shown = " ".join(words) or "(none)"
        if below:
            raise UnknownCommand(f"{shown!r} is not a whole command; it continues with: {', '.join(below)}")
        raise UnknownCommand(f"unknown command {shown!r}")

    def usage(self) -> str:
        """Return the synopsis of every command."""
        return "".join(c.synopsis() + "\n" for c in self)


# -- argv grammar ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Argv:
    """A parsed command line: words, ``key=value`` arguments and flags, in order.

    Flags keep their dashes: ``("--cleanup", None)``, ``("-l", "10")``.
    """

    words: tuple[str, ...] = ()
    args: tuple[tuple[str, str], ...] = ()
    flags: tuple[tuple[str, str | None], ...] = ()


def _classify(key: str, value: str | None) -> tuple[str, str, str | None]:
    """Sort one decoded ``key[=value]`` item into ("arg"|"flag", name, value)."""
    if key.startswith("--"):
        if len(key) == 2:
            raise BadRequest("a flag needs a name after '--'")
        return "flag", key, value
    if key.startswith("-"):
        if len(key) == 1:
            raise BadRequest("a flag needs a name after '-'")
        rest = key[2:]
        if value is None:
            return "flag", key[:2], rest or None
        return "flag", key[:2], rest + "=" + value if rest else value
    if not key:
        raise BadRequest("an argument has an empty name")
    if value is None:
        raise BadRequest(f"argument {key!r} has no value (write {key}=<value>)")
    if value == "":
        raise BadRequest(f"argument {key!r} has an empty value")
    return "arg", key, value


def _build_argv(words: Sequence[str], items: Iterable[tuple[str, str | None]]) -> Argv:
    args, flags = [], []
    for key, value in items:
        kind, name, val = _classify(key, value)
        (args if kind == "arg" else flags).append((name, val))
    return Argv(tuple(words), tuple(args), tuple(flags))


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _unquote(text: str, plus: bool) -> str:
    if _BAD_PERCENT.search(text):
        raise BadRequest("bad percent-encoding")
    try:
        return (urllib.parse.unquote_plus if plus else urllib.parse.unquote)(text, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("percent-encoding that is not UTF-8") from None


def parse_query(words: Sequence[str], query: str) -> Argv:
    """Translate path words and a query string into an Argv (README, "How a request becomes a command").

    ``k=v`` is an argument, ``--f`` a bare flag, ``--f=v`` a flag with a value,
    ``-x``/``-xV`` a short flag; values may hold ``=``; ``+`` is a space.
    """
    items = []
    for piece in query.split("&"):
        if not piece:
            continue
        raw_key, sep, raw_value = piece.partition("=")
        items.append((_unquote(raw_key, True), _unquote(raw_value, True) if sep else None))
    return _build_argv(words, items)


def render_query(argv: Argv) -> tuple[str, str]:
    """Return the (path, query) that ``parse_query`` reads back as ``argv``."""
    q = urllib.parse.quote_plus
    path = "/api/v1/" + "/".join(urllib.parse.quote(w, safe="") for w in argv.words)
    pieces = [f"{q(k, safe='')}={q(v, safe='')}" for k, v in argv.args]
    for name, value in argv.flags:
        if name.startswith("--"):
            pieces.append(q(name, safe="") + ("" if value is None else "=" + q(value, safe="")))
        elif value is None:
            pieces.append(q(name, safe=""))
        else:
            pieces.append(q(name, safe="") + (q(value, safe="") if value else "="))
    return path, "&".join(pieces)


def parse_path_words(path: str) -> tuple[str, ...]:
    """Split and percent-decode the segments of a path ('+' stays '+'); drop a trailing '/'."""
    segments = path.split("/")
    if segments and segments[-1] == "":
        segments.pop()
    return tuple(_unquote(s, False) for s in segments)


def parse_cli_tokens(tokens: Sequence[str]) -> Argv:
    """Parse vmq-admin's argv: leading words, then ``k=v`` and flags in any order."""
    tokens = list(tokens)
    n = 0
    while n < len(tokens) and not tokens[n].startswith("-") and "=" not in tokens[n]:
        n += 1
    items = []
    for token in tokens[n:]:
        key, sep, value = token.partition("=")
        if not sep and not token.startswith("-"):
            raise BadRequest(f"unexpected word {token!r} after arguments (write key=value)")
        items.append((key, value if sep else None))
    return _build_argv(tokens[:n], items)


# -- binding and running ---------------------------------------------------

GLOBAL_FLAGS = ("--format", "--help", "-h")


def bind(command: Command, argv: Argv, extra: tuple[str, ...], node: NodeApi) -> tuple[Call, bool]:
    """Check ``argv`` against ``command``; return the Call and whether --help was asked."""
    try:
        return _bind(command, argv, extra, node)
    except BadRequest as exc:
        exc.usage = exc.usage or command.usage()
        raise


def _bind(command: Command, argv: Argv, extra: tuple[str, ...], node: NodeApi) -> tuple[Call, bool]:
    args: dict[str, Any] = {}
    for key, value in argv.args:
        if key in args:
            raise BadRequest(f"argument {key!r} is given twice")
        spec = command.key(key)
        if spec is None and not command.open_keys:
            raise InvalidKey(f"{' '.join(command.words)} takes no argument {key!r}")
        args[key] = spec.cast(value) if spec else value
    flags: dict[str, Any] = {}
    wants_help = False
    for name, value in argv.flags:
        if name in GLOBAL_FLAGS:
            wants_help = wants_help or name != "--format"
            if name == "--format" and value not in ("json", "human", None):
                raise InvalidValue("--format takes json or human")
            continue
        spec = command.flag(name)
        if spec is None:
            raise InvalidFlag(f"{' '.join(command.words)} takes no flag {name!r}")
        if spec.name in flags:
            raise BadRequest(f"flag --{spec.name} is given twice")
        flags[spec.name] = spec.cast(value)
    return Call(command, node, types.MappingProxyType(args), types.MappingProxyType(flags), extra), wants_help


def prepare(table: CommandTable, argv: Argv, node: NodeApi) -> tuple[Call, bool]:
    """Resolve and bind ``argv``; raise a BadRequest subclass on any mistake."""
    command, extra = table.resolve(argv.words)
    call, wants_help = bind(command, argv, extra, node)
    if not wants_help:
        missing = [k for k in command.required if k not in call.args]
        if missing:
            raise MissingArgument(f"{' '.join(command.words)} needs {', '.join(m + '=' for m in missing)}",
                                  command.usage())
    return call, wants_help


def execute(call: Call, wants_help: bool = False) -> list:
    """Run a prepared call and return its result elements."""
    if wants_help:
        return [Text(call.command.usage())]
    return as_elements(call.command.handler(call))


# -- result elements -------------------------------------------------------

_CELL_TYPES = (str, int, float, bool, type(None))
_CELL_TYPE_SET = frozenset(_CELL_TYPES)


@dataclass(frozen=True, slots=True)
class Text:
    """A text element."""

    text: str

    def to_json(self) -> dict:
        """Return the element as VerneMQ's JSON writer shapes it."""
        return {"text": self.text, "type": "text"}


@dataclass(frozen=True, slots=True)
class Table:
    """A table element; rows keep the column order the command gives."""

    rows: tuple
    columns: tuple[str, ...] = ()

    def __post_init__(self):
        rows = tuple(r if type(r) is dict else dict(r) for r in self.rows)
        for row in rows:
            for key, value in row.items():
                if type(value) not in _CELL_TYPE_SET and not isinstance(value, _CELL_TYPES) \
                        or type(key) is not str:
                    raise TypeError(f"table cell {key!r} must be a string, number, bool or None")
        object.__setattr__(self, "rows", rows)
        if not self.columns and rows:
            object.__setattr__(self, "columns", tuple(rows[0]))

    def to_json(self) -> dict:
        """Return the element as VerneMQ's JSON writer shapes it."""
        return {"table": list(self.rows), "type": "table"}


@dataclass(frozen=True, slots=True)
class Alert:
    """An alert: the command ran but could not do its job."""

    items: tuple

    def to_json(self) -> dict:
        """Return the element as VerneMQ's JSON writer shapes it."""
        return {"alert": [i.to_json() for i in self.items], "type": "alert"}


@dataclass(frozen=True, slots=True)
class ListElement:
    """A list element, optionally titled."""

    items: tuple
    title: str | None = None

    def to_json(self) -> dict:
        """Return the element as VerneMQ's JSON writer shapes it."""
        body: dict[str, Any] = {"list": list(self.items)}
        if self.title is not None:
            body["title"] = self.title
        body["type"] = "list"
        return body


def alert(text: str) -> Alert:
    """Return an alert holding one text."""
    return Alert((Text(text),))


def as_elements(result: Any) -> list:
    """Normalise a handler's return value (str, element, list of them) into elements."""
    if result is None:
        return []
    if isinstance(result, (str, Text, Table, Alert, ListElement)):
        result = [result]
    return [Text(r) if isinstance(r, str) else r for r in result]


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _element_json(element: Any) -> str:
    """Encode one element; a big table goes JSON_CHUNK rows per call, letting other threads run between."""
    if isinstance(element, Table) and len(element.rows) > JSON_CHUNK:
        rows = element.rows
        parts = [_dumps(list(rows[i:i + JSON_CHUNK]))[1:-1] for i in range(0, len(rows), JSON_CHUNK)]
        return '{"table":[' + ",".join(parts) + '],"type":"table"}'
    return _dumps(element.to_json())


def render_json(elements: Sequence) -> bytes:
    """Frame elements as VerneMQ does: one -> the object; else an array and a newline."""
    if len(elements) == 1:
        return _element_json(elements[0]).encode()
    return ("[" + ",".join(_element_json(e) for e in elements) + "]\n").encode()


def elements_from_json(data: Any) -> list:
    """Rebuild elements from the JSON body (the CLI renders what the node answered)."""
    items = data if isinstance(data, list) else [data]
    out = []
    for item in items:
        kind = item.get("type")
        if kind == "text":
            out.append(Text(item["text"]))
        elif kind == "table":
            out.append(Table(tuple(item["table"])))
        elif kind == "alert":
            out.append(Alert(tuple(elements_from_json(item["alert"]))))
        elif kind == "list":
            out.append(ListElement(tuple(item["list"]), item.get("title")))
        else:
            raise ValueError(f"unknown element type {kind!r}")
    return out


def _cell(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return "" if value is None else str(value)


def render_box(table: Table) -> str:
    """Render a table boxed, as vmq-admin prints it; multi-line cells span lines."""
    if not table.columns:
        return ""
    cells = [[_cell(row.get(c)).rstrip("\n").split("\n") for c in table.columns] for row in table.rows]
    widths = [max([len(c)] + [len(line) for row in cells for line in row[i]])
              for i, c in enumerate(table.columns)]
    rule = "+" + "+".join("-" * w for w in widths) + "+\n"
    out = [rule, "|" + "|".join(c.center(w) for c, w in zip(table.columns, widths)) + "|\n", rule]
    for row in cells:
        for n in range(max(len(c) for c in row)):
            out.append("|" + "|".join((c[n] if n < len(c) else "").ljust(w) for c, w in zip(row, widths)) + "|\n")
    out.append(rule)
    return "".join(out)


def render_human(elements: Sequence) -> tuple[str, str]:
    """Return (stdout, stderr) text for a terminal; alerts go to stderr."""
    out, err = [], []
    for e in elements:
        if isinstance(e, Alert):
            err.append(render_human(e.items)[0])
        elif isinstance(e, Table):
            out.append(render_box(e))
        elif isinstance(e, ListElement):
            out.append((e.title + "\n" if e.title else "") + "".join(f"{i}\n" for i in e.items))
        else:
            out.append(e.text if not e.text or e.text.endswith("\n") else e.text + "\n")
    return "".join(out), "".join(err)


###############################################################################
# 6. Command catalogue ########################################################
###############################################################################
# Owns: one cmd_<words> function per vmq-admin command; its docstring is its usage.
# Must not know: sockets, HTTP, how the answer is rendered.

_catalogue: list[Command] = []  # filled by @command below, frozen into CATALOGUE


def command(*words: str, keys: Iterable[Param] = (), flags: Iterable[Param] = (), required: Iterable[str] = (),
            read_only: bool = False, local: bool = False, extra_words: str = "", open_keys: bool = False,
            quick: bool | Callable[[NodeApi], bool] = False, secret: bool = False, default_columns: Iterable[str] = ()):
    """Declare a catalogue command; the decorated function is its handler."""
    def register(fn: Callable[[Call], Any]) -> Callable[[Call], Any]:
        _catalogue.append(Command(tuple(words), fn, tuple(keys), tuple(flags), tuple(required), fn.__doc__ or "",
                                  read_only, local, extra_words, open_keys, quick, secret, tuple(default_columns)))
        return fn
    return register


def parse_positive_int(text: str) -> int:
    """Parse an integer >= 1."""
    return parse_int_range(1)(text)


# A ~regex filter runs in Python's re, which backtracks while holding the GIL, so one search
# can stop every thread (the broker's too). What could backtrack without bound is refused;
# what is left costs about len(text) ** (quantifiers + 1) * 4 ** alternations steps (measured:
# 2**24 of them take a few ms), so the text a regex looks at is capped to keep one search that short.
REGEX_MAX_LENGTH = 100  # characters of a ~regex
REGEX_MAX_REPEATS = 3  # quantifiers (* + ? {m,n}) in one ~regex
REGEX_MAX_ALTERNATIONS = 8  # | in one ~regex: at most 2**8 ways through its groups
REGEX_WORK = 2 ** 24  # steps one search may take: a few milliseconds with the GIL held
REGEX_TEXT_MAX = 65536  # characters of a value any ~regex looks at
_REGEX_QUANTIFIER = re.compile(r"[*+?]|\{[0-9]*(?:,[0-9]*)?\}")
_REGEX_GROUP_OPENINGS = ("(?:", "(?P<", "(?>")  # groups that only group; flags (?i) are fine too


def _regex_group(pattern: str, i: int) -> str:
    """Return why the group opening at ``pattern[i]`` is refused ('' when it is a plain group)."""
    if not pattern.startswith("(?", i) or pattern.startswith(_REGEX_GROUP_OPENINGS, i):
        return ""
    if re.match(r"\(\?[aiLmsux]+(?:-[imsx]+)?[:)]", pattern[i:]):
        return ""
    return "backreferences, lookarounds and conditional groups are not supported"


def _regex_quantifier(pattern: str, i: int) -> int:
    """Return the length of the quantifier at ``pattern[i]`` (0: none), a lazy or possessive suffix included."""
    match = _REGEX_QUANTIFIER.match(pattern, i)
    if match is None:
        return 0
    return match.end() - i + (match.end() < len(pattern) and pattern[match.end()] in "?+")


def analyse_regex(pattern: str) -> tuple[str, int, int]:
    """Return (why ``pattern`` may backtrack without bound or '', its quantifiers, its alternations).

    A refused pattern's counts are 0.

    Refused: more than REGEX_MAX_LENGTH characters, backreferences, lookarounds,
    a repeated group that holds a repetition or an alternation (``(a+)+``,
    ``(a|aa)*``), more than REGEX_MAX_REPEATS quantifiers or REGEX_MAX_ALTERNATIONS ``|``.
    """
    if len(pattern) > REGEX_MAX_LENGTH:
        return f"longer than {REGEX_MAX_LENGTH} characters", 0, 0
    groups, repeats, alternations, i = [[False]], 0, 0, 0  # per open group: holds a repetition or |
    while i < len(pattern):
        char, atom = pattern[i], None
        if char == "\\":
            if pattern[i + 1:i + 2].isdigit() and pattern[i + 1] != "0":
                return "backreferences are not supported", 0, 0
            atom, i = False, i + 2
        elif char == "[":
            end = re.match(r"\[\^?\]?(?:\\.|[^\]\\])*\]", pattern[i:])
            atom, i = False, i + (end.end() if end else len(pattern))
        elif char == "(":
            reason = _regex_group(pattern, i)
            if reason:
                return reason, 0, 0
            groups.append([False])
            i += 1
            continue
        elif char == ")" and len(groups) > 1:
            atom, i = groups.pop()[0], i + 1
        elif char == "|":
            alternations += 1
            groups[-1][0] = True
            i += 1
            continue
        else:
            atom, i = False, i + 1
        size = _regex_quantifier(pattern, i)
        if size:
            if atom:
                return "a repeated group holds a repetition or an alternation (nested repetition)", 0, 0
            repeats, i = repeats + 1, i + size
        groups[-1][0] = groups[-1][0] or atom or bool(size)
    if repeats > REGEX_MAX_REPEATS or alternations > REGEX_MAX_ALTERNATIONS:
        return f"more than {REGEX_MAX_REPEATS} quantifiers or {REGEX_MAX_ALTERNATIONS} alternations", 0, 0
    return "", repeats, alternations


def regex_text_limit(pattern: str) -> int:
    """Return how many characters of a value the (accepted) ``pattern`` looks at."""
    _, repeats, alternations = analyse_regex(pattern)
    return min(REGEX_TEXT_MAX, int((REGEX_WORK / 4 ** alternations) ** (1 / (repeats + 1)) + 1e-6))


def parse_regex_or_text(text: str) -> str:
    """Accept a filter value; ``~regex`` must compile and be one whose work is bounded."""
    if text.startswith("~"):
        reason = analyse_regex(text[1:])[0]
        if reason:
            raise ValueError(f"regular expression refused: {reason}")
        try:
            re.compile(text[1:])
        except re.error as exc:
            raise ValueError(f"bad regular expression: {exc}") from None
    return text


_SCOPE = Param("scope", doc="mgmt (default), mgmt_ro, status, metrics, health, api2 or httppub")
_EXPIRES = Param("expires", doc="YYYY-MM-DDThh:mm:ss local time, or ISO 8601 with Z or an offset")


def _key_change(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except KeyRejected as exc:
        return alert(exc.code)


@command("api-key", "create", keys=(_SCOPE, _EXPIRES), local=True)
def cmd_api_key_create(call: Call) -> Any:
    """Create a new random API key and print it."""
    return _key_change(lambda: call.node.keystore.create(call.args.get("scope", "mgmt"), call.args.get("expires")))


@command("api-key", "add", keys=(Param("key", doc="the key to add"), _SCOPE, _EXPIRES), required=("key",),
         local=True)
def cmd_api_key_add(call: Call) -> Any:
    """Add an API key of your own choosing."""
    return _key_change(lambda: call.node.keystore.add(
        call.args["key"], call.args.get("scope", "mgmt"), call.args.get("expires")) or "ok")


@command("api-key", "delete", keys=(Param("key", doc="the key to delete"), _SCOPE), required=("key",), local=True)
def cmd_api_key_delete(call: Call) -> Any:
    """Delete an API key from one scope."""
    return _key_change(lambda: call.node.keystore.delete(call.args["key"], call.args.get("scope", "mgmt")) or "ok")


@command("api-key", "show", quick=True, keys=(Param("scope", doc="a scope, or all (default)"),), read_only=True,
         local=True, secret=True)
def cmd_api_key_show(call: Call) -> Any:
    """List the API keys with their scope and expiry, oldest first."""
    columns = ("Key", "Scope", "Expires (UTC)", "has expired")
    return _key_change(lambda: Table(tuple(call.node.keystore.rows(call.args.get("scope", "all"))), columns))


@command("node", "status", quick=True, read_only=True)
def cmd_node_status(call: Call) -> Any:
    """Show the node's counters: sessions, messages, queues, subscriptions."""
    status = call.node.status()
    return Table(tuple({"Status": k, "Value": status[k]} for k in STATUS_KEYS))


@command("node", "stop")
def cmd_node_stop(call: Call) -> Any:
    """Stop the node cleanly once this answer has been sent."""
    call.after.append(call.node.request_stop)
    return "Done"


@command("listener", "show", quick=True, read_only=True,
         flags=(Param("tls", short="t", value="none", doc="add the TLS columns"),
                Param("mqtt", short="m", value="none", doc="add the MQTT columns")))
def cmd_listener_show(call: Call) -> Any:
    """Show the listeners: type, status, address, port and connections."""
    return Table(tuple(call.node.listener_rows(tls="tls" in call.flags, mqtt="mqtt" in call.flags)))


def parse_ip(text: str) -> str:
    """Parse an IP address."""
    return str(ipaddress.ip_address(text.strip()))


_LISTENER_KEYS = (Param("address", parse_ip, doc="IP address of the listener"),
                  Param("port", parse_int_range(0, 65535), doc="port of the listener"))
HTTP_LISTENER_OPTIONS = ("max_connections", *LISTENER_TLS_OPTIONS)


@command("listener", "start", keys=_LISTENER_KEYS, required=("address", "port"), flags=(
    Param("mountpoint", short="m", doc="topic prefix of the listener's clients"),
    Param("max_connections", parse_max_connections, doc="connections at once (integer or infinity)"),
    Param("allowed_protocol_versions", parse_versions, doc="comma list of 3 (3.1), 4 (3.1.1) and 5"),
    Param("allow_anonymous_override", parse_flag, doc="on: let clients in without credentials"),
    Param("websocket", value="none", doc="MQTT over WebSocket (with --ssl: over TLS)"),
    Param("http", value="none", doc="an HTTP listener of the admin API (with --ssl: HTTPS)"),
    Param("ssl", value="none", doc="MQTT over TLS"),
    *(Param(f, doc="TLS: as listener.ssl.<name>." + f) for f in ("certfile", "keyfile", "cafile", "ciphers")),
    *(Param(f, parse_flag, doc="TLS: on or off") for f in ("require_certificate", "use_identity_as_username")),
    Param("tls_version", parse_tls_versions, doc="TLS: tlsv1.2 and/or tlsv1.3")))
def cmd_listener_start(call: Call) -> Any:
    """Start a listener at run time (not kept across restarts): MQTT, WebSocket or HTTP, each with --ssl."""
    ssl_on = "ssl" in call.flags
    if "http" in call.flags:
        kind, names = ("https" if ssl_on else "http"), HTTP_LISTENER_OPTIONS
    else:
        kind = {(False, False): "tcp", (True, False): "ssl", (False, True): "ws", (True, True): "wss"}[
            (ssl_on, "websocket" in call.flags)]
        names = LISTENER_MQTT_OPTIONS
    address, port = call.args["address"], call.args["port"]
    if call.node.find_listener(address, port) is not None:
        return alert(f"can't start listener due to 'a listener exists at {address}:{port}'")
    config = call.node.config
    options = {o: call.flags.get(o, config.listener_option(kind, "default", o)) for o in names}
    if "mountpoint" in call.flags:
        options["mountpoint"] = call.flags["mountpoint"] or ""
    try:
        call.node.start_listener(address, port, options, kind)
    except OSError as exc:  # ssl.SSLError too: a bad certificate or key
        return alert(f"can't start listener due to '{exc.strerror or exc}'")
    return "Done"


def _find_listener(call: Call, verb: str) -> Listener | Alert:
    """Return the listener named by address= and port=, or the alert to answer."""
    listener = call.node.find_listener(call.args["address"], call.args["port"])
    if listener is None:
        return alert(f"can't {verb} listener due to 'not_found'")
    return listener


@command("listener", "stop", keys=_LISTENER_KEYS, required=("address", "port"), flags=(
    Param("kill_sessions", short="k", value="none", doc="also close the listener's clients"),))
def cmd_listener_stop(call: Call) -> Any:
    """Stop accepting connections; without --kill_sessions the clients stay (status suspended)."""
    listener = _find_listener(call, "stop")
    if isinstance(listener, Alert):
        return listener
    listener.suspend("kill_sessions" in call.flags)
    return "Done"


@command("listener", "restart", keys=_LISTENER_KEYS, required=("address", "port"))
def cmd_listener_restart(call: Call) -> Any:
    """Accept connections again on a stopped or suspended listener."""
    listener = _find_listener(call, "restart")
    if isinstance(listener, Alert):
        return listener
    try:
        listener.resume()
    except OSError as exc:
        return alert(f"can't restart listener due to '{exc.strerror or exc}'")
    return "Done"


@command("listener", "delete", keys=_LISTENER_KEYS, required=("address", "port"))
def cmd_listener_delete(call: Call) -> Any:
    """Stop a listener, close its clients and remove it."""
    listener = _find_listener(call, "delete")
    if isinstance(listener, Alert):
        return listener
    call.node.delete_listener(listener)
    return "Done"


# -- the certificates of tls show: X.509 (RFC 5280) read as far as its columns need -----

_PEM_CERTIFICATE = re.compile(  # RFC 7468 5.1, and the older "X509 CERTIFICATE" label OpenSSL also reads
    rb"-----BEGIN (?:X509 )?CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END (?:X509 )?CERTIFICATE-----")
_OID_CN, _OID_SAN = b"\x55\x04\x03", b"\x55\x1d\x11"  # 2.5.4.3 commonName, 2.5.29.17 subjectAltName
_DER_TEXT = {0x0C: "utf-8", 0x13: "latin-1", 0x14: "latin-1", 0x16: "latin-1", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}
_SAN_KINDS = {0x81: "email", 0x82: "DNS", 0x86: "URI"}  # GeneralName's IA5String choices, named as ssl names them
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def der_items(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, bytes]]:
    """Return the (tag, contents) of each DER element in ``data[start:end]``; raise ValueError when malformed."""
    items, i, end = [], start, len(data) if end is None else end
    while i < end:
        tag, size, i = data[i], data[i + 1], i + 2
        if size & 0x80:
            n = size & 0x7F
            size, i = int.from_bytes(data[i:i + n], "big"), i + n
        if i + size > end:
            raise ValueError("a DER element runs past its end")
        items.append((tag, data[i:i + size]))
        i += size
    return items


def _der_cn(name: bytes) -> str:
    """Return the first commonName of an X.509 Name, '' when it has none."""
    for _, rdn in der_items(name):
        for _, pair in der_items(rdn):
            (_, oid), (kind, value) = der_items(pair)[:2]
            if oid == _OID_CN:
                return value.decode(_DER_TEXT.get(kind, "latin-1"))
    return ""


def _der_time(tag: int, value: bytes) -> str:
    """Return an X.509 UTCTime or GeneralizedTime as ssl shows it: 'Jan  5 09:34:43 2018 GMT'."""
    text = value.decode("ascii")
    if tag == 0x17:  # UTCTime: YY from 50 is 19YY (RFC 5280 4.1.2.5.1)
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    year, month, day, hh, mm, ss = (int(text[a:b]) for a, b in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14)))
    if not 1 <= month <= 12:
        raise ValueError(f"a certificate date with month {month}")
    return f"{_MONTHS[month - 1]} {day:2d} {hh:02d}:{mm:02d}:{ss:02d} {year} GMT"


def _san_value(kind: int, value: bytes) -> str:
    """Return one GeneralName as ssl shows it (an IPv6 address as eight uncompressed hex groups)."""
    if kind == 0x87 and len(value) == 16:
        return ":".join(f"{int.from_bytes(value[i:i + 2], 'big'):X}" for i in range(0, 16, 2))
    if kind == 0x87:  # four bytes, or what ssl calls invalid (an address with its mask, say)
        return str(ipaddress.ip_address(value)) if len(value) == 4 else "<invalid>"
    return value.decode("utf-8", "backslashreplace") if kind in _SAN_KINDS else "<unsupported>"


def _der_san(extensions: bytes) -> list[str]:
    """Return the subjectAltName entries of X.509 extensions: DNS names, IP addresses, e-mails, URIs."""
    for _, extension in der_items(der_items(extensions)[0][1]):
        parts = der_items(extension)
        if parts[0][1] == _OID_SAN:
            names = der_items(parts[-1][1])[0][1]
            return [_san_value(kind, value) for kind, value in der_items(names)]
    return []


def decode_certificate(pem: bytes) -> dict:
    """Return CN, Issuer (its CN), Not_Before, Not_After and SAN of the first certificate of a PEM text."""
    found = _PEM_CERTIFICATE.search(pem)
    if found is None:
        raise ValueError("no PEM certificate in it")
    der = base64.b64decode(b"".join(found.group(1).split()))
    tbs = der_items(der_items(der)[0][1])[0][1]
    fields = der_items(tbs)
    if fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    issuer, validity, subject = fields[2][1], der_items(fields[3][1]), fields[4][1]
    extensions = next((v for t, v in fields[6:] if t == 0xA3), b"")
    return {"CN": _der_cn(subject), "Issuer": _der_cn(issuer), "Not_Before": _der_time(*validity[0]),
            "Not_After": _der_time(*validity[1]), "SAN": ", ".join(_der_san(extensions)) if extensions else ""}


def certificate_rows(files: Iterable[str], now: float) -> list[dict]:
    """Describe PEM certificate files as tls show does (the first certificate of each file)."""
    rows = []
    for path in files:
        try:
            cert = decode_certificate(read_regular_file(path, MAX_SMALL_FILE, "a certificate file")[0])
            seconds = tls_module().cert_time_to_seconds  # a date no calendar has: unreadable
            times = {"expires": seconds(cert["Not_After"]), "valid_from": seconds(cert["Not_Before"])}
        except (OSError, ValueError, IndexError, FileRefused) as exc:  # UnicodeDecodeError is a ValueError
            rows.append({"File": path, "Not_Before": "", "Not_After": "", "CN": f"unreadable: {exc}", "Issuer": "",
                         "SAN": "", "expires": now})
            continue
        rows.append({"File": path, **cert, **times})
    return rows


def _certificate_files(node: NodeApi) -> list[str]:
    files = []
    for listener in node.tls_listeners():
        for key in ("certfile", "cafile"):
            path = listener.option(key)
            if path and path not in files:
                files.append(path)
    return files


@command("tls", "show", read_only=True)
def cmd_tls_show(call: Call) -> Any:
    """Show the certificates of the TLS listeners: validity, CN, issuer, SAN."""
    rows = certificate_rows(_certificate_files(call.node), time.time())
    return Table(tuple({k: r[k] for k in ("File", "Not_Before", "Not_After", "CN", "Issuer", "SAN")} for r in rows),
                 ("File", "Not_Before", "Not_After", "CN", "Issuer", "SAN"))


@command("tls", "check", read_only=True, flags=(
    Param("validity", parse_int_range(0), short="v", doc="seconds a certificate must stay valid (172800)"),))
def cmd_tls_check(call: Call) -> Any:
    """Check that every TLS certificate stays valid for --validity seconds."""
    now, validity = time.time(), call.flags.get("validity")
    validity = 172800 if validity is None else validity
    bad = [r for r in certificate_rows(_certificate_files(call.node), now)
           if r["expires"] - now < validity or r.get("valid_from", now) > now]
    if not bad:
        return "All fine"
    return Table(tuple({"File": r["File"], "Not_Before": r["Not_Before"], "Not_After": r["Not_After"],
                        "SecExp": int(r["expires"] - now), "SecToVal": int(max(0, r.get("valid_from", now) - now))}
                       for r in bad))


METRIC_LABELS = ("mqtt_version", "reason_code", "return_code")


@command("metrics", "show", quick=True, read_only=True, flags=(
    Param("with-descriptions", short="d", value="none", doc="print each metric's description"),
    Param("aggregate", lambda v: v == "true", short="a", doc="true (default): sum series of one name"),
    *(Param(label, doc=f"only metrics with this {label}") for label in METRIC_LABELS)))
def cmd_metrics_show(call: Call) -> Any:
    """Show every metric as lines of <type>.<name> = <value>."""
    wanted = {k: call.flags[k] for k in METRIC_LABELS if k in call.flags}
    series = [(name, labels, value) for (name, labels), value in call.node.metric_samples().items()
              if all(dict(labels).get(k) == v for k, v in wanted.items())]
    if call.flags.get("aggregate", True):
        totals: dict[str, int] = {}
        for name, _, value in series:
            totals[name] = totals.get(name, 0) + value
        series = [(name, (), value) for name, value in totals.items()]
    lines = []
    for name, labels, value in series:
        kind, doc = METRIC_DEFINITIONS.get(name, ("gauge", name, ()))[:2]
        shown = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
        line = f"{kind}.{shown} = {value}\n"
        lines.append(f"# {doc}\n{line}\n" if "with-descriptions" in call.flags else line)
    return Text("".join(lines))


@command("metrics", "reset")
def cmd_metrics_reset(call: Call) -> Any:
    """Set every counter back to zero."""
    call.node.reset_metrics()
    return "Done"


SESSION_FIELDS = (  # README, "The command catalogue"; VerneMQ vmq_info:fields_config/0
    "node", "mountpoint", "client_id", "queue_pid", "queue_size", "session_pid", "is_offline", "is_online",
    "statename", "deliver_mode", "offline_messages", "online_messages", "num_sessions", "clean_session",
    "is_plugin", "queue_started_at", "user", "peer_host", "peer_port", "protocol", "waiting_acks",
    "session_started_at", "copy_node", "topic", "qos", "rap", "no_local", "msg_ref", "msg_qos", "routing_key", "dup",
    "payload",
)
SESSION_DEFAULT_COLUMNS = ("client_id", "is_online", "mountpoint", "peer_host", "peer_port", "user")
SUBSCRIPTION_FIELDS = ("topic", "qos", "rap", "no_local")
MESSAGE_FIELDS = ("msg_ref", "msg_qos", "routing_key", "dup", "payload")
SECRET_SESSION_FIELDS = ("payload",)  # what a mgmt_ro key may not select or filter on (README, "API keys")


def _expand(record: Mapping[str, Any], fields: set[str]) -> list[Mapping[str, Any]]:
    """One row per subscription and/or queued message when their fields are used."""
    rows: list[Mapping[str, Any]] = [record]
    for group, items in ((SUBSCRIPTION_FIELDS, "subscriptions"), (MESSAGE_FIELDS, "messages")):
        if not fields.isdisjoint(group):
            rows = [{**row, **item} for row in rows for item in record.get(items, ())]
    return rows


def session_query(flags: Mapping[str, Any]) -> tuple[list[str], dict[str, str], set[str]]:
    """Return session show's (selected columns, filters, every field used) for its flags."""
    selected = [f for f in SESSION_FIELDS if f in flags and flags[f] is None] or list(SESSION_DEFAULT_COLUMNS)
    filters = {f: flags[f] for f in SESSION_FIELDS if flags.get(f) is not None}
    return selected, filters, set(selected) | set(filters)


def compile_filters(filters: Mapping[str, str]) -> list[tuple[str, str, Any, int]]:
    """Return (field, wanted text, compiled ~regex or None, characters the regex sees) per filter."""
    out = []
    for name, wanted in filters.items():
        regex = wanted[1:] if wanted.startswith("~") else None
        out.append((name, wanted, regex and re.compile(regex), regex and regex_text_limit(regex)))
    return out


def _matches(row: Mapping[str, Any], filters: Sequence[tuple[str, str, Any, int]]) -> bool:
    for name, wanted, regex, limit in filters:
        shown = _cell(row.get(name)) if row.get(name) is not None else "null"
        if regex is not None:
            if not regex.search(shown, 0, limit):
                return False
        elif shown != wanted:
            return False
    return True


ROWTIMEOUT_DEFAULT = 100  # ms, VerneMQ session show --rowtimeout


def session_table(records: Iterable[Mapping[str, Any]], flags: Mapping[str, Any],
                  clock: Callable[[], float] = time.monotonic) -> Any:
    """Select, filter, expand, order and page session records as session show does.

    ``--field`` selects a column, ``--field=v`` filters (``~regex`` by regular
    expression); filters AND; rows come ordered by (mountpoint, client_id) and
    their keys alphabetically. A scan that finds no row within ``--rowtimeout``
    ms stops: the answer is the rows found and an alert saying so.
    """
    selected, filters, used = session_query(flags)
    matchers = compile_filters(filters)
    ordered = sorted(records, key=lambda r: (r.get("mountpoint", ""), r.get("client_id", "")))
    offset, limit = flags.get("offset") or 0, flags.get("limit") or 100
    budget = (flags.get("rowtimeout") or ROWTIMEOUT_DEFAULT) / 1000
    rows, last, cut = [], clock(), False
    for row in (row for rec in ordered for row in _expand(rec, used)):
        if not matchers or _matches(row, matchers):
            rows.append(row)
            last = clock()
            if len(rows) >= offset + limit:
                break
        elif clock() - last > budget:
            cut = True
            break
    columns = tuple(sorted(selected))
    table = Table(tuple({c: row.get(c) for c in columns} for row in rows[offset:offset + limit]), columns)
    if not cut:
        return table
    return [table, alert(f"session show stopped after {len(rows)} rows: no further row matched within "
                         f"--rowtimeout={int(budget * 1000)} ms; narrow the filter or raise --rowtimeout")]


@command("session", "show", read_only=True, quick=lambda node: node.session_count() <= QUICK_SESSION_SHOW,
         flags=(
    Param("limit", parse_positive_int, doc="rows to return at most (default 100)"),
    Param("rowtimeout", parse_positive_int, doc="milliseconds to wait for a row (default 100)"),
    Param("offset", parse_int_range(0), doc="rows to skip first, for paging"),
    *(Param(f, parse_regex_or_text, value="optional", doc="select; =value or =~regex filters",
            secret=f in SECRET_SESSION_FIELDS) for f in SESSION_FIELDS)))
def cmd_session_show(call: Call) -> Any:
    """Show sessions; --field selects a column, --field=value filters (=~regex too)."""
    wanted = call.flags.get("client_id")
    lookup = wanted if wanted is not None and not wanted.startswith("~") else None
    selected, filters, used = session_query(call.flags)
    subs, msgs = not used.isdisjoint(SUBSCRIPTION_FIELDS), not used.isdisjoint(MESSAGE_FIELDS)
    if filters or subs or msgs:
        return session_table(call.node.session_records(lookup, subs, msgs), call.flags)
    offset, limit = call.flags.get("offset") or 0, call.flags.get("limit") or 100
    columns = tuple(sorted(selected))
    return Table(tuple(call.node.session_rows(lookup, columns, slice(offset, offset + limit))), columns)


_MOUNTPOINT = Param("mountpoint", short="m", doc="the session's mountpoint (default none)")


@command("session", "disconnect", keys=(Param("client-id", doc="the client to disconnect"),),
         required=("client-id",),
         flags=(_MOUNTPOINT, Param("cleanup", short="c", value="none", doc="also remove the session and its queue")))
def cmd_session_disconnect(call: Call) -> Any:
    """Disconnect a client; with --cleanup also delete its session."""
    call.node.disconnect_session(call.args["client-id"], call.flags.get("mountpoint") or "", "cleanup" in call.flags)
    return "Done"


def parse_id_list(text: str) -> tuple[str, ...]:
    """Parse a comma separated list of client ids."""
    ids = tuple(i for i in text.split(",") if i)
    if not ids:
        raise ValueError("expected a comma separated list of client ids")
    return ids


@command("session", "disconnect", "clients", keys=(Param("client-ids", parse_id_list, doc="a,b,c"),),
         required=("client-ids",),
         flags=(_MOUNTPOINT, Param("cleanup", short="c", value="none", doc="also remove the sessions")))
def cmd_session_disconnect_clients(call: Call) -> Any:
    """Disconnect several clients at once."""
    for client_id in call.args["client-ids"]:
        call.node.disconnect_session(client_id, call.flags.get("mountpoint") or "", "cleanup" in call.flags)
    return "Done"


@command("session", "disconnect", "batch", keys=(Param("count", parse_positive_int, doc="clients to disconnect"),),
         required=("count",), flags=(
             _MOUNTPOINT, Param("cleanup", short="c", value="none", doc="also remove the sessions"),
             Param("filter-client-ids", parse_id_list, short="f", doc="client ids to spare (a,b)"),
             Param("node", short="n", doc="only on this node")))
def cmd_session_disconnect_batch(call: Call) -> Any:
    """Disconnect up to count online clients, for example to move load off a node."""
    target = call.flags.get("node")
    if target not in (None, call.node.name):
        if target in call.node.cluster_peers():
            try:
                call.node.call_node(target, "broker", "disconnect_batch", call.args["count"],
                                    call.flags.get("mountpoint") or "", "cleanup" in call.flags,
                                    list(call.flags.get("filter-client-ids") or ()))
            except ClusterError as exc:
                return alert(f"cannot reach {target}: {exc.text}")
        return "Done"  # VerneMQ: no session of a node outside the cluster matches
    call.node.disconnect_batch(call.args["count"], call.flags.get("mountpoint") or "", "cleanup" in call.flags,
                               call.flags.get("filter-client-ids") or ())
    return "Done"


@command("session", "unsubscribe", keys=(Param("client-id", doc="the session's client id"),
                                         Param("topic", doc="the subscription's filter")),
         required=("client-id", "topic"), flags=(_MOUNTPOINT,))
def cmd_session_unsubscribe(call: Call) -> Any:
    """Remove one subscription from a session."""
    done = call.node.unsubscribe(call.args["client-id"], call.args["topic"], call.flags.get("mountpoint") or "")
    return "Done" if done else "Not successful"


@command("session", "reauthorize", keys=(Param("username", doc="the user to check as"),
                                         Param("client-id", doc="the session's client id")),
         required=("username", "client-id"), flags=(_MOUNTPOINT,))
def cmd_session_reauthorize(call: Call) -> Any:
    """Check a session's subscriptions against the ACL again and drop the refused ones."""
    dropped = call.node.reauthorize(call.args["username"], call.args["client-id"], call.flags.get("mountpoint") or "")
    return "Done" if dropped else "Unchanged"


@command("retain", "delete", flags=(Param("topic", short="t", value="optional", doc="the retained topic"),
                                    Param("mountpoint", short="m", doc="its mountpoint (default none)")))
def cmd_retain_delete(call: Call) -> Any:
    """Delete one retained message."""
    topic = call.flags.get("topic")
    if not topic or call.node.topic_problem(topic) is not None:
        return alert("No valid topic given.")
    if not call.node.delete_retained(call.flags.get("mountpoint") or "", topic):
        return alert(f"No retained message for topic {topic!r}.")
    return "Done"


@command("retain", "delete-expired")
def cmd_retain_delete_expired(call: Call) -> Any:
    """Delete the retained messages whose MQTT 5 Message Expiry Interval has passed (3.1.1 ones never expire)."""
    return Table(({"expired": call.node.delete_expired_retained() or 0},))


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@command("log", "show", "config", quick=True, read_only=True)
def cmd_log_show_config(call: Call) -> Any:
    """Show the loggers: name, level, where they write."""
    rows = [{"logger": "vmqapi", "level": logging.getLevelName(log.getEffectiveLevel()).lower(),
             "type": "logger", "file": "-"}]
    for n, handler in enumerate(logging.getLogger().handlers + log.handlers):
        rows.append({"logger": f"handler{n}", "level": logging.getLevelName(handler.level).lower(),
                     "type": "file" if isinstance(handler, logging.FileHandler) else "console",
                     "file": getattr(handler, "baseFilename", "-")})
    return Table(tuple(rows), ("logger", "level", "type", "file"))


@command("log", "level", keys=(Param("logger", doc="vmqapi or a handlerN of log show config"),
                               Param("level", parse_choice(*LOG_LEVELS), doc=", ".join(LOG_LEVELS))),
         required=("logger", "level"))
def cmd_log_level(call: Call) -> Any:
    """Change a logger's level at run time."""
    name, level = call.args["logger"], call.args["level"].upper()
    handlers = logging.getLogger().handlers + log.handlers
    if name == "vmqapi":
        log.setLevel(level)
    elif re.fullmatch(r"handler[0-9]+", name) and int(name[7:]) < len(handlers):
        handlers[int(name[7:])].setLevel(level)
    else:
        return alert(f"unknown logger {name!r}; log show config lists them")
    return "Done"


@command("trace", "client", keys=(Param("client-id", doc="the client to trace"),), required=("client-id",),
         read_only=True, secret=True, flags=(
             _MOUNTPOINT, Param("rate-max", parse_positive_int, doc="lines per interval (10)"),
             Param("rate-interval", parse_positive_int, doc="the interval in ms (100)"),
             Param("trunc-payload", parse_int_range(0), doc="payload bytes shown (200)"),
             Param("duration", parse_int_range(1, 600), doc="seconds to trace over HTTP (5)"),
             Param("follow", doc="a token of your choosing: the trace stays on between calls that give it, "
                                 "so repeated calls miss nothing (the CLI's streaming uses it)")))
def cmd_trace_client(call: Call) -> Any:
    """Trace a client's packets both ways (the CLI streams until Ctrl-C; HTTP answers after --duration)."""
    trunc = call.flags.get("trunc-payload")
    rate = (call.flags.get("rate-max") or 10, call.flags.get("rate-interval") or 100, 200 if trunc is None else trunc)
    lines = call.node.trace_client(call.args["client-id"], call.flags.get("mountpoint") or "",
                                   call.flags.get("duration") or 5, rate, call.flags.get("follow"))
    return Text("".join(line + "\n" for line in lines))


@command("plugin", "show", quick=True, read_only=True, flags=(
    Param("plugin", doc="show only this plugin"), Param("hook", doc="show only plugins with this hook"),
    Param("internal", value="none", doc="show internal hooks too (accepted as in VerneMQ; vmqapi has none)")))
def cmd_plugin_show(call: Call) -> Any:
    """Show the enabled plugins and the hooks they register."""
    rows = [r for r in call.node.plugin_rows()
            if call.flags.get("plugin") in (None, r["Plugin"])
            and (call.flags.get("hook") is None or call.flags["hook"] in r["Hook(s)"].split("\n"))]
    return Table(tuple(rows), ("Plugin", "Type", "Hook(s)", "M:F/A"))


@command("retain", "show", read_only=True, default_columns=("payload", "topic"), flags=(
    Param("limit", parse_positive_int, doc="rows to return at most (default 100)"),
    Param("rowtimeout", parse_positive_int, doc="milliseconds to wait for a row (default 100)"),
    Param("payload", value="optional", doc="select; =value filters", secret=True),
    Param("topic", value="optional", doc="select; =value filters"),
    Param("mountpoint", value="optional", doc="select; =value filters (default: the empty mountpoint)")))
def cmd_retain_show(call: Call) -> Any:
    """Show retained messages; --field selects a column, --field=value filters."""
    fields = ("mountpoint", "payload", "topic")
    selected = [f for f in fields if f in call.flags and call.flags[f] is None] or list(call.command.default_columns)
    filters = {f: call.flags[f] for f in fields if call.flags.get(f) is not None}
    filters.setdefault("mountpoint", "")
    rows = [r for r in call.node.retained_rows() if all(r[f] == v for f, v in filters.items())]
    limit = call.flags.get("limit") or 100
    return Table(tuple({f: r[f] for f in sorted(selected)} for r in rows[:limit]), tuple(sorted(selected)))


def _plugin_switch(call: Call, on: bool) -> Any:
    name = call.flags.get("name")
    if not name:
        return alert("Incomplete plugin specification")
    if not call.node.enable_plugin(name, on):
        return alert(f"Can't {'enable' if on else 'disable'} plugin: {name} due to 'not_found'")
    return "Done"


@command("plugin", "enable", flags=(Param("name", short="n", doc="the plugin to enable"),))
def cmd_plugin_enable(call: Call) -> Any:
    """Turn a plugin's checks and hooks on."""
    return _plugin_switch(call, True)


@command("plugin", "disable", flags=(Param("name", short="n", doc="the plugin to disable"),))
def cmd_plugin_disable(call: Call) -> Any:
    """Turn a plugin's checks and hooks off (vmq_passwd off: nobody logs in with a password)."""
    return _plugin_switch(call, False)


_NODE_FLAGS = (Param("node", short="n", doc="the node to act on (this node)"),
               Param("all", short="a", value="none", doc="act on every node of the cluster"))


def _check_node_flags(call: Call) -> None:
    if "node" in call.flags and "all" in call.flags:
        raise BadRequest("--node and --all exclude each other", call.command.usage())
    if call.flags.get("node") not in (None, call.node.name, *call.node.cluster_members()):
        raise InvalidValue(f"bad_node: {call.flags['node']!r} is not a node of this cluster", call.command.usage())


@command("set", open_keys=True, flags=_NODE_FLAGS)
def cmd_set(call: Call) -> Any:
    """Change settings at run time: set key=value ... (see describe <key>)."""
    _check_node_flags(call)
    if not call.args:
        raise MissingArgument("set needs at least one key=value", call.command.usage())
    changes = {}
    for key, text in call.args.items():
        if not find_setting(key).settable:
            raise InvalidKey(f"{key} cannot be set at run time", call.command.usage())
        changes[key] = parse_setting(key, text)
    target = "*" if "all" in call.flags else call.flags.get("node") or call.node.name
    if target in ("*", call.node.name):
        call.node.apply_settings(changes)
    if target != call.node.name:  # replicated: a node that is down takes it on return
        call.node.replicate_settings(target, {key: str(text) for key, text in call.args.items()})
    return []


def _shown_setting(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else render_value(value)


@command("show", extra_words="key", quick=True, read_only=True, flags=_NODE_FLAGS)
def cmd_show(call: Call) -> Any:
    """Show the current value of settings: show <key> [<key> ...]."""
    _check_node_flags(call)
    if not call.extra:
        raise MissingArgument("show needs at least one setting name", call.command.usage())
    rows = [_setting_row(call.node, call.extra)]
    if "all" in call.flags or call.flags.get("node") not in (None, call.node.name):
        wanted = call.flags.get("node")
        rows = [r for r in rows if wanted in (None, r["node"])]
        rows += [row for peer, row in call.node.gather("show", list(call.extra)) if wanted in (None, peer)]
    return Table(tuple(rows))


def _setting_row(node: NodeApi, keys: Sequence[str]) -> dict:
    """Return show's row of one node: its name and each setting's value (a secret one masked)."""
    config = node.config
    row = {"node": node.name}
    for key in keys:
        setting, value = find_setting(key), config[key]
        if setting.secret and value:
            row[key] = SECRET_SHOWN
        else:
            row[key] = setting.masked(value) if setting.masked and value else _shown_setting(value)
    return row


@command("describe", extra_words="key", quick=True, read_only=True)
def cmd_describe(call: Call) -> Any:
    """Describe settings: describe <key> [<key> ...]."""
    if not call.extra:
        raise MissingArgument("describe needs at least one setting name", call.command.usage())
    return [Text(f"{key}:\n  {find_setting(key).doc}\n") for key in call.extra]


###############################################################################
# 7. HTTP: the admin API ######################################################
###############################################################################
# Owns: the admin API's rules (method, auth, command, OPTIONS, Accept, run) as
#       pure functions from a Request to a Response; /api/v2 and HTTP publish (README, "HTTP publish").
# Must not know: sockets, MQTT internals, the key file's format.

HTTP_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST"})
# Known to HTTP (RFC 9110 9.3), refused with 405 and Allow; 501 is for methods not known (15.6.2).
REFUSED_METHODS = frozenset({"PUT", "PATCH", "DELETE", "TRACE", "CONNECT"})
JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request as read off the wire; header names are lower case."""

    method: str
    target: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    peer: tuple = ("", 0)  # the client's (address, port), for the plugin hooks of an HTTP publish
    scheme: str = "http"  # the listener's (http or https): the node's own origin is scheme://Host


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP response; ``after`` runs once it has been sent."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    after: tuple[Callable[[], Any], ...] = ()


def error_response(exc: VmqError, extra: Iterable[tuple[str, str]] = ()) -> Response:
    """Return the JSON error answer of README, "The API by example" for ``exc``."""
    headers = [("Content-Type", JSON_TYPE), *extra]
    if exc.http_status == 401:
        headers.append(("WWW-Authenticate", REALM))
    if exc.http_status == 405:
        headers.append(("Allow", getattr(exc, "allow", ALLOW)))
    if exc.http_status == 503:
        headers.append(("Retry-After", str(getattr(exc, "retry_after", 1))))
    body = json.dumps(exc.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    return Response(exc.http_status, tuple(headers), body)


@functools.lru_cache(maxsize=256)
def _basic_user(credentials: str) -> str:
    """Return the user part of Basic credentials (memoised: a client sends the same header each time)."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadRequest("malformed Authorization header: the credentials are not base64 of UTF-8") from None
    if ":" not in decoded:
        raise BadRequest("malformed Authorization header: the credentials have no ':'")
    return decoded.partition(":")[0]


def request_key(headers: Mapping[str, str]) -> str:
    """Return the API key a request carries (Basic user name, else x-api-key).

    Raises Unauthorized when there is none, BadRequest when Authorization is malformed.
    """
    auth = headers.get("authorization")
    if auth is None:
        key = headers.get("x-api-key", "").strip()
        if not key:
            raise Unauthorized("an API key is needed: Authorization: Basic base64(<key>:) or x-api-key: <key>")
        return key
    scheme, _, credentials = auth.strip().partition(" ")
    if scheme.lower() in ("bearer", "digest"):
        raise Unauthorized(f"{scheme} credentials are not accepted; send the API key with Basic")
    if scheme.lower() != "basic":
        raise BadRequest("malformed Authorization header: expected Basic base64(<key>:)")
    key = _basic_user(credentials.strip())
    if not key:
        raise Unauthorized("the Authorization header carries an empty key")
    return key


def authenticate(node: NodeApi, module: str, headers: Mapping[str, str], scopes: Sequence[str]) -> str:
    """Return the scope a request may act in for ``module``; raise on failure."""
    if node.config[f"http_module.{module}.auth.mode"] == "noauth":
        return scopes[0]
    secret = headers.get(SECRET_HEADER)
    if secret is not None and hmac.compare_digest(secret.encode("utf-8", "replace"), node.secret.encode()):
        return scopes[0]
    try:
        key = request_key(headers)
        scope = node.keystore.authenticate(key, scopes)
        if scope is None:
            raise Unauthorized("the API key is unknown, expired, or not valid for this endpoint")
    except (Unauthorized, BadRequest):
        node.metrics.incr("http_api_auth_failed")
        raise
    return scope


def accepts_json(accept: str | None) -> bool:
    """Return whether an Accept header admits application/json (no header does)."""
    if accept is None or not accept.strip():
        return True
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media.lower() in (JSON_TYPE, "application/*", "*/*") and q > 0:
            return True
    return False


def apply_alias(words: tuple[str, ...]) -> tuple[str, ...]:
    """Map ``sessions`` to ``session show``, ``sessions/x`` to ``session/x``, and so on."""
    if words and words[0] in PATH_ALIASES:
        target = PATH_ALIASES[words[0]]
        return target if len(words) == 1 else (target[0], *words[1:])
    return words


@functools.lru_cache(maxsize=1024)
def parse_target(rest: str, query: str) -> Argv:
    """Parse the path after /api/v1/ and the query into an Argv (memoised: dashboards repeat themselves)."""
    return parse_query(apply_alias(parse_path_words(rest)), query)


def request_argv(req: Request, rest: str, query: str) -> Argv:
    """Build the Argv from the path, query string and (for POST) a form body."""
    if req.method == "POST" and req.body:
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != FORM_TYPE:
            raise BadRequest(f"a POST body must be {FORM_TYPE}")
        try:
            form = req.body.decode("ascii")
        except UnicodeDecodeError:
            raise BadRequest("a form body must be percent-encoded ASCII") from None
        query = f"{query}&{form}" if query else form
    return parse_target(rest, query)


_ELEMENT_SCHEMAS = {
    "Text": {"type": "object", "required": ["text", "type"],
             "properties": {"text": {"type": "string"}, "type": {"const": "text"}}},
    "Table": {"type": "object", "required": ["table", "type"],
              "properties": {"table": {"type": "array", "items": {"type": "object"}}, "type": {"const": "table"}}},
    "Alert": {"type": "object", "required": ["alert", "type"],
              "properties": {"alert": {"type": "array", "items": {"$ref": "#/components/schemas/Element"}},
                             "type": {"const": "alert"}}},
    "List": {"type": "object", "required": ["list", "type"],
             "properties": {"list": {"type": "array"}, "title": {"type": "string"}, "type": {"const": "list"}}},
    "Element": {"oneOf": [{"$ref": f"#/components/schemas/{n}"} for n in ("Text", "Table", "Alert", "List")]},
    "Result": {"oneOf": [{"$ref": "#/components/schemas/Element"},
                         {"type": "array", "items": {"$ref": "#/components/schemas/Element"}}]},
    "Error": {"type": "object", "required": ["error", "text", "type"],
              "properties": {"error": {"type": "string"}, "text": {"type": "string"}, "type": {"const": "error"},
                             "usage": {"type": "string"}}},
}


def _openapi_operation(cmd: Command) -> dict:
    params = [{"name": k.name, "in": "query", "required": k.name in cmd.required, "description": k.doc,
               "schema": {"type": "string", "minLength": 1}} for k in cmd.keys]
    for f in cmd.flags:
        schema = {"type": "string", "maxLength": 0} if f.value == "none" else {"type": "string"}
        params.append({"name": f"--{f.name}", "in": "query", "required": False, "description": f.doc,
                       "allowEmptyValue": f.value != "required", "schema": schema})
    if cmd.extra_words:
        params.append({"name": cmd.extra_words, "in": "path", "required": True, "schema": {"type": "string"},
                       "description": "one or more words, separated by /"})
    error = {"description": "error", "content": {JSON_TYPE: {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {"summary": " ".join((cmd.doc or "").split()) or " ".join(cmd.words),
            "operationId": "_".join(w.replace("-", "_") for w in cmd.words),
            "tags": [cmd.words[0]], "parameters": params,
            "responses": {"200": {"description": "the command's result",
                                  "content": {JSON_TYPE: {"schema": {"$ref": "#/components/schemas/Result"}}}},
                          **{code: error for code in ("400", "401", "403", "406", "500")}}}


OPENAPI_HTTP_ERRORS = {  # JSON errors the HTTP layer may answer to any request (README, "The API by example")
    "400": "a request that cannot be read (header lines, Content-Length, a query not UTF-8, Authorization)",
    "413": "a body over listener.max_body_size", "414": "a request line over listener.max_request_line_length",
    "431": "header fields over the listener's limits", "500": "a bug, logged; the node serves on",
    "503": "no thread to answer now (Retry-After)", "505": "an HTTP version other than 1.0 and 1.1"}


OPENAPI_CROSS_SITE = "a change asked by another site's page (Sec-Fetch-Site, Origin)"


def _openapi_answers(texts: Iterable[tuple[int, str]], errors: Mapping[str, str]) -> dict:
    """Return OpenAPI responses: plain-text answers (status, text) and JSON errors ({status: when}), merged
    per status, each with the content type the node sends it as."""
    answers: dict[str, dict] = {}

    def add(code: str, kind: str, schema: dict, line: str) -> None:
        entry = answers.setdefault(code, {"description": "", "content": {}})
        entry["content"][kind] = {"schema": schema}
        entry["description"] = f"{entry['description']}; {line}" if entry["description"] else line
    for code, line in texts:
        add(str(code), TEXT_TYPE, {"type": "string"}, line)
    for code, when in errors.items():
        add(code, JSON_TYPE, {"$ref": "#/components/schemas/Error"}, f"JSON error: {when}")
    return dict(sorted(answers.items()))


def _openapi_plugin_paths() -> dict:
    """Return the OpenAPI paths of /api/v2 and HTTP publish, which are not commands."""
    def query(name: str, doc: str, required: bool = False, empty: bool = False) -> dict:
        return {"name": name, "in": "query", "required": required, "description": doc,
                "allowEmptyValue": empty, "schema": {"type": "string"}}
    subscriber = [query("client_id", "the client id", True), query("mountpoint", "its mountpoint (default empty)")]
    v2_errors = {**OPENAPI_HTTP_ERRORS, "400": "client_id missing, or an id no MQTT client could have; " +
                 OPENAPI_HTTP_ERRORS["400"], "401": "no API key of scope api2", "406": "Accept excludes application/json"}
    v2 = _openapi_answers([(400, "invalid_command: no such command")], v2_errors)
    client = {"summary": "A session's status (online, offline, unknown), with &topics its subscriptions",
              "operationId": "api_v2_client", "tags": ["api2"],
              "parameters": [*subscriber, query("topics", "list the subscriptions too", empty=True)],
              "responses": {"200": {"description": "status and topics", "content": {JSON_TYPE: {"schema": {
                  "type": "object", "required": ["status"], "properties": {
                      "status": {"enum": ["online", "offline", "unknown", "no_queue"]},
                      "topics": {"oneOf": [{"type": "object", "additionalProperties": {"type": "integer"}},
                                           {"type": "array", "maxItems": 0}]}}}}}}, **v2}}
    disconnect = {"summary": "Disconnect a client; with &cleanup drop its session too",
                  "operationId": "api_v2_disconnect", "tags": ["api2"],
                  "parameters": [*subscriber, query("cleanup", "drop the session too", empty=True)],
                  "responses": {"200": {"description": "ok, or unknown when there is no such session",
                                        "content": {JSON_TYPE: {"schema": {"enum": ["ok", "unknown"]}}}},
                                **_openapi_answers([(400, "invalid_command: no such command")], {
                                    **v2_errors, "403": OPENAPI_CROSS_SITE})}}
    answers = _openapi_answers(HTTP_PUB_ANSWERS.values(), {  # the plain-text body names the case
        **OPENAPI_HTTP_ERRORS, "401": "no API key of scope httppub", "403": OPENAPI_CROSS_SITE})
    body = {"type": "object", "required": ["topic", "payload"], "properties": {
        **{k: {"type": "string"} for k in ("topic", "payload", "user", "password", "client_id")},
        "qos": {"enum": [0, 1, 2]}, "retain": {"type": "boolean"},
        "user_properties": {"type": "array", "items": {"type": "object"}}}}
    publish = {"summary": "Publish a message as an MQTT client would (vmq_http_pub); the fields in a JSON "
                          "body, or in headers or the query with the payload as the body",
               "tags": ["httppub"], "responses": answers,
               "parameters": [query("encoding", "plain (default) or base64: how the JSON payload is written")],
               "requestBody": {"content": {JSON_TYPE: {"schema": body},
                                           "application/octet-stream": {"schema": {"type": "string"}}}}}
    return {"/api/v2/client": {"get": client}, "/api/v2/disconnect": {"get": disconnect},
            "/restmqtt/api/v1/publish": {"post": {**publish, "operationId": "http_publish"},
                                         "put": {**publish, "operationId": "http_publish_put"}}}


def openapi_document(commands: CommandTable) -> dict:
    """Return an OpenAPI 3.1 description of /api/v1, generated from the command table."""
    paths = {}
    for cmd in commands:
        path = "/api/v1/" + "/".join(cmd.words) + (f"/{{{cmd.extra_words}}}" if cmd.extra_words else "")
        paths[path] = {"get": _openapi_operation(cmd)}
    paths.update(_openapi_plugin_paths())
    return {"openapi": "3.1.0",
            "info": {"title": "vmqapi admin API (VerneMQ /api/v1)", "version": __version__,
                     "description": "Every vmq-admin command as GET /api/v1/<words>?key=value&--flag; "
                                    "POST with a form body takes the same arguments."},
            "paths": paths,
            "components": {"schemas": _ELEMENT_SCHEMAS, "securitySchemes": {
                "apiKeyBasic": {"type": "http", "scheme": "basic",
                                "description": "the API key as user name, empty password"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
            "security": [{"apiKeyBasic": []}, {"apiKeyHeader": []}]}


def refuse_cross_site(req: Request, what: str) -> None:
    """Refuse (403) a request another site's page made a browser send: it may carry the browser's cached Basic key.

    A form POST or an <img> GET from elsewhere gets the key a browser remembers for this
    node; requests that change the node answer only to the node's own pages and to clients
    that are no browser page (curl sends neither header). Fetch Metadata: ``same-site``
    is refused too, since every port of the same host is the same site.
    """
    site = req.headers.get("sec-fetch-site", "").strip().lower()
    if site in ("cross-site", "same-site"):
        raise Forbidden(f"{what}: refused for a request sent from another site's page (Sec-Fetch-Site: {site})")
    origin, host = req.headers.get("origin"), req.headers.get("host", "")
    if origin is not None and not is_own_origin(origin, host, (req.scheme,)):
        own = f"{req.scheme}://{host.strip()}"
        raise Forbidden(f"{what}: refused for a request sent from another origin ({origin.strip()[:100]!r}, "
                        f"not {own[:100]!r})")


@contextlib.contextmanager
def slow_command_slot(node: NodeApi, command: Command, wants_help: bool = False) -> Iterable[None]:
    """Hold one of the node's SLOW_COMMANDS slots while a command not marked quick runs.

    Each connection has its own thread, so a slow command holds up nobody else; the slots
    bound how many run at once (trace client waits, a big session show builds megabytes and
    competes with MQTT for the GIL). Past them the answer is 503 with Retry-After.
    """
    quick = command.quick
    if wants_help or quick is True or (callable(quick) and quick(node)):
        yield
        return
    slots = node.slow_commands
    if not slots.acquire(blocking=False):
        raise ServiceUnavailable(f"{SLOW_COMMANDS} slow commands (session show, trace client, ...) run already; "
                                 f"try again in a moment")
    try:
        yield
    finally:
        slots.release()


def serve_api(node: NodeApi, req: Request, rest: str, query: str) -> Response:
    """Answer /api/v1: method, auth, command, OPTIONS, Accept, run (README, "The API by example")."""
    if req.method in REFUSED_METHODS:
        raise MethodNotAllowed(f"{req.method} is not allowed; use GET, HEAD, POST or OPTIONS")
    if req.method not in HTTP_METHODS:
        raise NotImplementedMethod(f"method {req.method} is not implemented")
    scope = authenticate(node, "vmq_http_mgmt_api", req.headers, ("mgmt", "mgmt_ro"))
    if rest == "openapi.json" and req.method in ("GET", "HEAD"):
        body = json.dumps(openapi_document(node.commands), separators=(",", ":")).encode()
        return Response(200, (("Content-Type", JSON_TYPE),), body)
    argv = request_argv(req, rest, query)
    call, wants_help = prepare(node.commands, argv, node)
    refusal = "" if wants_help else call.command.read_only_refusal(call.flags)
    if refusal and scope == "mgmt_ro":
        raise Forbidden(refusal)
    if refusal:  # it changes the node (or shows secrets): never for another site's page
        refuse_cross_site(req, " ".join(call.command.words))
    if scope == "mgmt_ro":
        call = dataclasses.replace(call, read_only=True)
    if req.method == "OPTIONS":
        return Response(200, CORS_HEADERS)
    if not accepts_json(req.headers.get("accept")):
        raise NotAcceptable("this API answers application/json only")
    with slow_command_slot(node, call.command, wants_help):
        elements = execute(call, wants_help)
        body = render_json(elements)
    headers = [("Content-Type", JSON_TYPE)]
    empty = next((e.columns for e in elements if isinstance(e, Table) and not e.rows and e.columns), None)
    if empty:
        headers.append((COLUMNS_HEADER, json.dumps(empty)))
    return Response(200, tuple(headers), body, tuple(call.after))


# -- HTTP publish (vmq_http_pub) and API v2 (vmq_http_v2_api) --------------------------------------

HTTP_PUB_ALLOW = "PUT, POST"  # VerneMQ vmq_http_pub:allowed_methods/2
API_V2_ALLOW = "GET, OPTIONS, HEAD"  # VerneMQ vmq_http_v2_api:allowed_methods/2
TEXT_TYPE = "text/plain"
HTTP_PUB_FIELDS = ("topic", "qos", "retain", "user", "password", "client_id", "user_properties")
HTTP_PUB_ANSWERS = {  # VerneMQ vmq_http_pub:map_to_response_code/1 and map_to_response_text/1
    "published": (200, "Published"),
    "invalid_topic": (400, "Invalid topic"),
    "invalid_qos_value": (400, "Invalid QoS value. Must be in range 0..2"),
    "invalid_retain_value": (400, "Invalid retain flag. Must be in true or false"),
    "invalid_user_properties": (400, "User properties need to be a key/value list (json encoded)"),
    "parameters_in_header_and_url": (400, "Parameters found in header as well as url-encoded"),
    "content_not_json": (400, "Content is not a valid json"),
    "wrong_url_parameters": (400, "Only encoding plain or base64 allows. No more URL parameters supported."),
    "unknown_payload_encoding": (400, "Unknown payload encoding"),
    "authentication_failed": (401, "Authentication failure."),
    "authorization_failed": (403, "Authorization failure."),
    "message_too_large": (413, "Payload too large."),
    # vmqapi's own, where VerneMQ crashes (500) or has no such case
    "payload_missing": (400, "Payload missing: the JSON form needs a \"payload\" string"),
    "invalid_credentials": (400, "user, password and client_id must be strings"),
    "invalid_payload": (400, "Payload is not well-formed UTF-8"),
    "quota_exceeded": (507, "Retained message refused: max_retained_messages or max_retained_bytes reached"),
    "store_down": (503, "The message store cannot keep a QoS 1 or 2 message now; try again later"),
    "cluster_full": (503, "A cluster node with subscribers of this topic has cluster_max_unacknowledged_bytes "
                          "of messages it has not confirmed yet; try again later"),
    "bridge_full": (503, "A bridge's buffer for its remote is full (max_outgoing_buffered_bytes or "
                         "max_outgoing_buffered_messages); try a QoS 1 or 2 message again later"),
    "no_broker": (503, "The node runs no MQTT broker"),
}


def query_pairs(query: str) -> dict[str, str]:
    """Return a query string's parameters, the first of repeated ones (as proplists:get_value); a bare one is ""."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("malformed query string: bad percent-encoding or not UTF-8") from None
    found: dict[str, str] = {}
    for name, value in pairs:
        found.setdefault(name, value)
    return found


def _pub_json(body: bytes, encoding: str) -> tuple[dict, bytes]:
    """Read the JSON form: the fields and the payload, decoded by ``?encoding``."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):  # json.JSONDecodeError is a ValueError
        raise PublishRefused("content_not_json") from None
    if not isinstance(doc, dict):
        raise PublishRefused("content_not_json")
    payload = doc.get("payload")
    if not isinstance(payload, str):
        raise PublishRefused("payload_missing")
    if encoding != "base64":
        try:
            return doc, payload.encode()
        except UnicodeEncodeError:  # JSON may escape a lone surrogate: "\ud800"
            raise PublishRefused("invalid_payload", "it holds a lone surrogate") from None
    try:
        return doc, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise PublishRefused("unknown_payload_encoding") from None


def publish_fields(req: Request, query: str) -> tuple[dict, bytes]:
    """Return an HTTP publish's fields and payload, in VerneMQ's three forms.

    A ``topic`` header: the fields in headers, the body is the payload. A ``topic`` query
    parameter: the fields in the query. Neither: a JSON body, ``?encoding=plain|base64``
    its only query parameter (VerneMQ vmq_http_pub:process_post/2).
    """
    params = query_pairs(query)
    in_header, in_query = "topic" in req.headers, "topic" in params
    if in_header and in_query:
        raise PublishRefused("parameters_in_header_and_url")
    if in_header:
        fields = {k: req.headers[k] for k in HTTP_PUB_FIELDS if k in req.headers}
        if "user_properties" in fields:
            try:
                fields["user_properties"] = json.loads(fields["user_properties"])
            except ValueError:
                raise PublishRefused("invalid_user_properties") from None
        return fields, req.body
    if in_query:
        return {k: params[k] for k in HTTP_PUB_FIELDS if k in params and k != "user_properties"}, req.body
    if set(params) - {"encoding"} or params.get("encoding", "plain") not in ("plain", "base64"):
        raise PublishRefused("wrong_url_parameters")
    return _pub_json(req.body, params.get("encoding", "plain"))


def _pub_qos(value: Any) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if type(value) is not int or value not in (0, 1, 2):
        raise PublishRefused("invalid_qos_value")
    return value


def _pub_retain(value: Any) -> bool:
    flag = {"true": True, "false": False}.get(value) if isinstance(value, str) else value
    if not isinstance(flag, bool):
        raise PublishRefused("invalid_retain_value")
    return flag


def _pub_user_properties(value: Any, node: NodeApi, limit: int = 0) -> tuple:
    """Return MQTT 5 user properties from ``{"k": "v"}`` or VerneMQ's ``[{"k": "v"}]``, at most ``limit`` (0: any).

    The limit is max_properties_per_packet, which every node applies to a message forwarded to it:
    a message with more would reach no other node, and its retained row would differ between them.
    """
    if value is None:
        return ()
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # VerneMQ vmq_http_pub:list_from_map/1 reads the first map
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise PublishRefused("invalid_user_properties")
    if limit and len(value) > limit:
        raise PublishRefused("invalid_user_properties", f"more than {limit} (max_properties_per_packet)")
    for text in (*value, *value.values()):
        problem = node.string_problem(text)
        if problem is not None:
            raise PublishRefused("invalid_user_properties", f"{text[:40]!r}: {problem}")
    return tuple(("user_property", (k, v)) for k, v in value.items())


@dataclass(frozen=True, slots=True)
class HttpMessage:
    """An HTTP publish's message, checked: the node makes it the PUBLISH of an MQTT client."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: tuple = ()  # ("user_property", (key, value)) pairs, the only properties it sets


def publish_message(fields: Mapping[str, Any], payload: bytes, node: NodeApi, max_levels: int = 200,
                    max_props: int = 0) -> HttpMessage:
    """Check an HTTP publish's fields as VerneMQ does (check_values/2), and its topic and properties as an
    MQTT PUBLISH's are checked (by ``node``); return its message."""
    topic = fields.get("topic")
    if not isinstance(topic, str):
        raise PublishRefused("invalid_topic", "the topic must be a string")
    if topic.startswith("$"):
        raise PublishRefused("invalid_topic", "topics beginning with $ are not published over HTTP")  # as VerneMQ
    problem = node.topic_problem(topic, max_levels)
    if problem is not None:
        raise PublishRefused("invalid_topic", problem)
    qos = _pub_qos(fields.get("qos", 0))
    retain = _pub_retain(fields.get("retain", False))
    props = _pub_user_properties(fields.get("user_properties"), node, max_props)
    return HttpMessage(topic, payload, qos, retain, props)


def publish_credentials(config: Config, fields: Mapping[str, Any],
                        node: NodeApi) -> tuple[str | None, bytes | None, str]:
    """Return (user, password, client id) to authenticate as: the request's, or predefined ones."""
    if config["vmq_http_pub.mqtt_auth.mode"] == "predefined":
        fields = {k: config[f"vmq_http_pub.mqtt_auth.{k}"] for k in ("user", "password", "client_id")}
    user, password, client_id = (fields.get(k) for k in ("user", "password", "client_id"))
    if any(v is not None and not isinstance(v, str) for v in (user, password, client_id)):
        raise PublishRefused("invalid_credentials")
    for name, value in (("user", user), ("password", password), ("client_id", client_id)):
        problem = None if value is None else node.string_problem(value)
        if problem is not None:
            raise PublishRefused("invalid_credentials", f"{name}: {problem}")
    return user or None, None if password is None else password.encode(), client_id or ""


def publish_answer(reason: str, detail: str = "") -> Response:
    """Return VerneMQ's plain-text answer for an HTTP publish (``detail`` after it)."""
    status, text = HTTP_PUB_ANSWERS[reason]
    return Response(status, (("Content-Type", TEXT_TYPE),), (f"{text}: {detail}" if detail else text).encode())


def serve_http_pub(node: NodeApi, req: Request, rest: str, query: str) -> Response:
    """Answer POST/PUT /restmqtt/api/v1/publish: publish as an MQTT client would (README, "HTTP publish")."""
    if rest:
        raise NotFound(f"no endpoint at /restmqtt/api/v1/publish/{rest}")
    if req.method not in HTTP_PUB_ALLOW.split(", "):
        exc = MethodNotAllowed(f"{req.method} is not allowed here; use POST or PUT")
        exc.allow = HTTP_PUB_ALLOW
        raise exc
    authenticate(node, "vmq_http_pub", req.headers, ("httppub",))
    refuse_cross_site(req, "HTTP publish")
    config = node.config
    try:
        fields, payload = publish_fields(req, query)
        message = publish_message(fields, payload, node, config["max_topic_levels"],
                                  config["max_properties_per_packet"])
        user, password, client_id = publish_credentials(config, fields, node)
        limit = config["max_message_size"]
        if limit and len(payload) > limit:
            raise PublishRefused("message_too_large")
    except PublishRefused as exc:
        return publish_answer(exc.reason, exc.detail)
    reason = node.http_publish(req.peer, user, password, client_id, config["vmq_http_pub.mountpoint"], message)
    return publish_answer(reason or "no_broker")


def _api_v2_client(node: NodeApi, key: tuple[str, str], topics: bool) -> Any:
    """The answer of /api/v2/client: the session's status and, when asked, its subscriptions."""
    record = node.client_status(key)
    status, subs = record if record is not None else ("unknown", {})
    answer: dict[str, Any] = {"status": status}
    if topics:
        answer["topics"] = subs or []  # VerneMQ: jsx writes no subscriptions as []
    return answer


def _api_v2_disconnect(node: NodeApi, key: tuple[str, str], cleanup: bool) -> Any:
    """The answer of /api/v2/disconnect: ok, or unknown when there is no such session."""
    return "ok" if node.disconnect_session(key[1], key[0], cleanup) else "unknown"


API_V2_COMMANDS = {  # name: (answer, its flag, whether it changes the node)
    "client": (_api_v2_client, "topics", False), "disconnect": (_api_v2_disconnect, "cleanup", True)}


def serve_api_v2(node: NodeApi, req: Request, rest: str, query: str) -> Response:
    """Answer GET /api/v2/client and /api/v2/disconnect (VerneMQ vmq_http_v2_api)."""
    if req.method in ("POST", *REFUSED_METHODS):
        exc = MethodNotAllowed(f"{req.method} is not allowed here; use GET, HEAD or OPTIONS")
        exc.allow = API_V2_ALLOW
        raise exc
    if req.method not in HTTP_METHODS:
        raise NotImplementedMethod(f"method {req.method} is not implemented")
    authenticate(node, "vmq_http_v2_api", req.headers, ("api2",))
    if req.method == "OPTIONS":
        return Response(200, CORS_HEADERS)
    if not accepts_json(req.headers.get("accept")):
        raise NotAcceptable("this API answers application/json only")
    command = API_V2_COMMANDS.get(rest)
    if command is None:
        return Response(400, (("Content-Type", TEXT_TYPE),), b"invalid_command")  # VerneMQ's answer
    params = query_pairs(query)
    client_id = params.get("client_id", "")
    if not client_id:
        raise BadRequest("client_id is required: /api/v2/<command>?client_id=<id>[&mountpoint=<mp>]")
    for name in ("client_id", "mountpoint"):  # what an MQTT client could not have sent is nobody's
        problem = node.string_problem(params.get(name, ""))
        if problem is not None:
            raise BadRequest(f"{name}: {problem}")
    fn, flag, changes = command
    if changes:
        refuse_cross_site(req, f"/api/v2/{rest}")
    answer = fn(node, (params.get("mountpoint", ""), client_id), flag in params)
    return Response(200, (("Content-Type", JSON_TYPE),), json.dumps(answer, separators=(",", ":")).encode())


###############################################################################
# 8. Observability endpoints ##################################################
###############################################################################
# Owns: /metrics (Prometheus text 0.0.4), /health, /status.json and the /status page.
# Must not know: sockets, MQTT internals (it reads the metrics registry and the node).

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUS_GAUGES = {  # README, "Monitoring" [better]: the status page's numbers as gauges too
    "num_online": "Sessions with a connected client.",
    "num_offline": "Persistent sessions without a connected client.",
    "msg_in": "PUBLISH packets received (mqtt_publish_received).",
    "msg_out": "PUBLISH packets sent (mqtt_publish_sent).",
    "queue_in": "Messages that entered a queue (queue_message_in).",
    "queue_out": "Messages that left a queue (queue_message_out).",
    "queue_drop": "Messages dropped from queues (queue_message_drop).",
    "queue_unhandled": "Messages no subscription matched (queue_message_unhandled).",
    "num_subscriptions": "Subscriptions in the routing table.",
    "num_retained": "Retained messages.",
    "matches_local": "Matched local subscriptions (router_matches_local).",
    "matches_remote": "Matched remote subscriptions (router_matches_remote).",
}


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(samples: Mapping[tuple[str, LabelSet], int], node: str, namespace: str,
                      status: Mapping[str, Any]) -> str:
    """Render series as Prometheus text 0.0.4: HELP and TYPE once per name, ``node`` the first label."""
    order: dict[str, int] = {}
    for name, _ in samples:
        order.setdefault(name, len(order))
    lines: list[str] = []
    current = None
    node_label = f'node="{_label_value(node)}"'
    for (name, labels), value in sorted(samples.items(), key=lambda kv: order[kv[0][0]]):
        full = namespace + name
        if name != current:
            kind, doc = METRIC_DEFINITIONS.get(name, ("gauge", name, ()))[:2]
            help_text = doc.replace("\\", "\\\\").replace("\n", "\\n")
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
            current = name
        extra = "".join(f',{k}="{_label_value(v)}"' for k, v in labels)
        lines.append(f"{full}{{{node_label}{extra}}} {value}")
    for name, doc in STATUS_GAUGES.items():
        full = namespace + name
        lines += [f"# HELP {full} {doc}", f"# TYPE {full} gauge", f"{full}{{{node_label}}} {status[name]}"]
    return "\n".join(lines) + "\n"


def _only_get(req: Request) -> None:
    if req.method not in ("GET", "HEAD"):
        exc = MethodNotAllowed(f"{req.method} is not allowed here; use GET or HEAD")
        exc.allow = "GET, HEAD"
        raise exc


def serve_metrics(node: NodeApi, req: Request, rest: str, query: str) -> Response:
    """Answer /metrics in Prometheus text format (any Accept header is fine)."""
    _only_get(req)
    if rest:
        raise NotFound(f"no endpoint at /metrics/{rest}")
    authenticate(node, "vmq_metrics_http", req.headers, ("metrics",))
    body = render_prometheus(node.metric_samples(), node.name, node.config["prometheus_namespace"], node.status())
    return Response(200, (("Content-Type", PROMETHEUS_TYPE),), body.encode())


def serve_health(node: NodeApi, req: Request, rest: str, query: str) -> Response:
    """Answer /health, /health/ping and /health/listeners: 200 OK, or 503 with the reasons."""
    _only_get(req)
    if rest not in ("", "ping", "listeners"):
        raise NotFound(f"no endpoint at /health/{rest}")
    authenticate(node, "vmq_health_http", req.headers, ("health",))
    reasons = [] if rest == "ping" else node.health_reasons()
    body = {"status": "DOWN", "reasons": reasons} if reasons else {"status": "OK"}
    warnings = [] if rest == "ping" else node.health_warnings()
    if warnings:
        body["warnings"] = warnings
    return Response(503 if reasons else 200, (("Content-Type", JSON_TYPE),),
                    json.dumps(body, separators=(",", ":")).encode())


def status_document(node: NodeApi) -> list:
    """Return /status.json: ``[{node: {node status..., listeners, mystatus}}]`` as VerneMQ shapes it."""
    listeners = [{"type": r["type"], "status": r["status"], "ip": r["address"], "port": int(r["port"]),
                  "mountpoint": r["mountpoint"], "max_conns": r["max_conns"], "active_conns": r["active_conns"]}
                 for r in node.listener_rows()]
    return [{node.name: {**node.status(), "listeners": listeners, "mystatus": [{r["Node"]: r["Running"]} for r in _command_rows(node, ("cluster", "show"), ())]}}]


def serve_status_json(node: NodeApi, req: Request, rest: str, query: str) -> Response:
    """Answer /status.json, with CORS from http_cors_allow_origin."""
    _only_get(req)
    authenticate(node, "vmq_status_http", req.headers, ("status",))
    body = json.dumps(status_document(node), separators=(",", ":"), ensure_ascii=False).encode()
    return Response(200, (("Content-Type", JSON_TYPE),
                          ("Access-Control-Allow-Origin", node.config["http_cors_allow_origin"])), body)


HISTORY_INTERVAL = 2.0  # s between two samples of the status page's charts (the page polls as often)
HISTORY_SAMPLES = 450  # 15 minutes at HISTORY_INTERVAL
HISTORY_FIELDS = ("at", "msg_in", "msg_out", "num_online", "num_offline", "queued")
STATUS_PAGE_ROWS = 100  # sessions and retained topics the page lists
STATUS_SESSION_ROWS = 5000  # session show rows the page's filter looks through (sessions, subscriptions)


def history_sample(status: Mapping[str, Any], at: float) -> tuple:
    """Return one history point (HISTORY_FIELDS) from node status values."""
    queued = max(0, status["queue_in"] - status["queue_out"] - status["queue_drop"])  # entered, not yet left
    return (round(at, 1), status["msg_in"], status["msg_out"], status["num_online"], status["num_offline"], queued)


class StatusHistory:
    """The last HISTORY_SAMPLES points of the node's status, sampled by a thread of its own."""

    def __init__(self, status: Callable[[], Mapping[str, Any]], interval: float = HISTORY_INTERVAL,
                 size: int = HISTORY_SAMPLES, clock: Callable[[], float] = time.time):
        self._status, self.interval, self._clock = status, interval, clock
        self._lock = threading.Lock()
        self._points: collections.deque = collections.deque(maxlen=size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Take a first sample now, then one every ``interval`` seconds until stop()."""
        self._stop.clear()
        self._sample()
        thread = threading.Thread(target=self._run, name="vmqapi-status-history", daemon=True)
        thread.start()
        self._thread = thread  # (one that never started cannot be joined)

    def stop(self) -> None:
        """Stop sampling and wait for the thread; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            self.record()
        except (RuntimeError, concurrent.futures.CancelledError, TimeoutError):
            log.debug("status history: the broker did not answer (stopping?)")  # the next turn retries

    def record(self) -> None:
        """Add one sample of the node's status."""
        point = history_sample(self._status(), self._clock())
        with self._lock:
            self._points.append(point)

    def points(self) -> list[tuple]:
        """Return the samples, oldest first."""
        with self._lock:
            return list(self._points)


def _command_rows(node: NodeApi, words: tuple[str, ...], flags: Iterable[tuple[str, str | None]]) -> list[dict]:
    """Run a read-only command of the node's own table and return its first table's rows."""
    call, _ = prepare(node.commands, Argv(words, (), tuple(flags)), node)
    return next((list(e.rows) for e in execute(call) if isinstance(e, Table)), [])


def status_rows(node: NodeApi) -> dict:
    """Return what /status/details.json reads from commands: sessions, their subscription counts, retained, cluster."""
    listed = _command_rows(node, ("session", "show"), (("--client_id", None), ("--is_online", None),
                                                       ("--protocol", None), ("--limit", str(STATUS_SESSION_ROWS))))
    counts = collections.Counter(r["client_id"] for r in _command_rows(
        node, ("session", "show"), (("--client_id", None), ("--topic", None), ("--limit", str(STATUS_SESSION_ROWS)))))
    retained = _command_rows(node, ("retain", "show"), (("--topic", None), ("--limit", str(STATUS_PAGE_ROWS))))
    return {"sessions": listed, "counts": counts, "retained": [r["topic"] for r in retained],
            "cluster": _command_rows(node, ("cluster", "show"), ())}


class StatusRows:
    """status_rows shared by every reader: computed by one of them at most once per ``interval``.

    Each computation scans thousands of sessions twice; a page open in many browsers (or a
    loop of clients) must not multiply that work, which competes with MQTT for the GIL.
    """

    def __init__(self, compute: Callable[[], dict], interval: float = HISTORY_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self._compute, self.interval, self._clock = compute, interval, clock
        self._lock = threading.Lock()  # held while one reader computes: the others wait for its result
        self._rows: dict | None = None
        self._at = 0.0
        self.computations = 0

    def get(self) -> dict:
        """Return the rows, computed now when the last ones are ``interval`` old."""
        with self._lock:
            if self._rows is None or self._clock() - self._at >= self.interval:
                self._rows = self._compute()
                self._at = self._clock()
                self.computations += 1
            return self._rows


def status_sessions(rows: Mapping[str, Any], contains: str, state: str) -> list[dict]:
    """Return the page's sessions (client id, online, protocol, subscriptions) from the shared rows."""
    wanted = {"online": True, "offline": False}.get(state)
    picked = [r for r in rows["sessions"] if contains in r["client_id"] and wanted in (None, r["is_online"])]
    counts = rows["counts"]
    return [{"client_id": r["client_id"], "online": r["is_online"], "protocol": r["protocol"],
             "subscriptions": counts[r["client_id"]]} for r in picked[:STATUS_PAGE_ROWS]]


def status_details(node: NodeApi, query: str) -> dict:
    """Return /status/details.json: the charts' history, sessions, retained topics and cluster members."""
    params = urllib.parse.parse_qs(query)
    contains, state = params.get("client_id", [""])[0], params.get("state", ["all"])[0]
    now = history_sample(node.status(), time.time())
    rows = node.status_rows.get()
    return {"interval": node.history.interval, "fields": HISTORY_FIELDS, "history": [*node.history.points(), now],
            "sessions": status_sessions(rows, contains, state), "retained": rows["retained"],
            "cluster": rows["cluster"], "health": node.health_reasons()}  # what /health says, for the badge


def serve_status_page(node: NodeApi, req: Request, rest: str, query: str) -> Response:
    """Answer /status, one self-contained page, and /status/details.json, the data it draws."""
    _only_get(req)
    if rest == "details.json":
        authenticate(node, "vmq_status_http", req.headers, ("status",))
        body = json.dumps(status_details(node, query), separators=(",", ":"), ensure_ascii=False).encode()
        return Response(200, (("Content-Type", JSON_TYPE), ("Cache-Control", "no-store")), body)
    if rest:
        raise NotFound(f"no endpoint at /status/{rest}")
    return Response(200, (("Content-Type", "text/html; charset=utf-8"),
                          ("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; "
                                                      "script-src 'unsafe-inline'")), STATUS_PAGE.encode())


ENDPOINTS = {  # GET / for a JSON client: where to go
    "/status": "the status page, for a browser",
    "/status.json": "the node's status, sessions and listeners as JSON",
    "/api/v1": "the admin API: /api/v1/<vmq-admin words>?key=value&--flag (an API key as Basic user name)",
    "/api/v1/openapi.json": "the admin API described as OpenAPI 3.1",
    "/metrics": "Prometheus text format 0.0.4",
    "/health": "200 OK, or 503 with the reasons",
}


def serve_root(node: NodeApi, req: Request, rest: str, query: str) -> Response:
    """Answer /: a redirect to /status for browsers, an index of the endpoints for JSON clients."""
    _only_get(req)
    if rest:
        raise NotFound(f"no endpoint at //{rest}")
    accept = req.headers.get("accept", "")
    if JSON_TYPE in accept.lower() and accepts_json(accept):
        body = json.dumps({"endpoints": ENDPOINTS}, separators=(",", ":")).encode()
        return Response(200, (("Content-Type", JSON_TYPE),), body)
    text = "The status page is at /status, the admin API at /api/v1 (GET / with Accept: application/json lists all).\n"
    return Response(302, (("Location", "/status"), ("Content-Type", "text/plain; charset=utf-8")), text.encode())


STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vmqapi status</title>
<style>
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2330;--mute:#667085;--line:#e3e6ea;--grid:#eef0f3;--in:#2e7d32;--out:#1565c0;
--on:#2e7d32;--off:#b26a00;--q:#6a1b9a;--bad:#c62828}
@media (prefers-color-scheme:dark){:root{--bg:#14171c;--card:#1c2027;--ink:#e8eaed;--mute:#9aa3af;--line:#2b313a;
--grid:#252a32;--in:#66bb6a;--out:#64b5f6;--on:#66bb6a;--off:#ffb74d;--q:#ce93d8}}
*{box-sizing:border-box}body{margin:0;font:15px/1.4 system-ui,sans-serif;background:var(--bg);color:var(--ink)}
header{padding:14px 20px;border-bottom:1px solid var(--line);display:flex;flex-wrap:wrap;gap:6px 18px;align-items:baseline}
h1{font-size:20px;margin:0}#state,#version{color:var(--mute);font-size:14px}#health{font-weight:600}
main{padding:16px 20px;display:grid;gap:16px;grid-template-columns:repeat(2,minmax(0,1fr))}
@media (max-width:700px){main{grid-template-columns:1fr;padding:12px}}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;min-width:0}
.card h2{font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:var(--mute);margin:0 0 8px}
.wide{grid-column:1/-1}.nums{display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:10px}
.num b{display:block;font-size:24px}.num span{color:var(--mute);font-size:13px}.num small{display:block;color:var(--mute);font-size:12px}
svg.chart{width:100%;height:190px;display:block}svg text{fill:var(--mute);font-size:11px}
.legend{display:flex;gap:14px;font-size:13px;color:var(--mute);margin-top:4px}.legend i{display:inline-block;width:12px;height:3px;margin-right:5px;vertical-align:middle}
.scroll{overflow-x:auto}table{width:100%;border-collapse:collapse;font-size:14px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);white-space:nowrap}th{color:var(--mute);font-weight:600}
td.n,th.n{text-align:right}.running,.online,.ok{color:var(--on)}.offline{color:var(--off)}.suspended,.stopped,.down{color:var(--bad)}
.filters{display:flex;gap:8px;flex-wrap:wrap;margin-bottom:8px}.filters input,.filters select{font:inherit;padding:4px 8px;border:1px solid var(--line);border-radius:6px;background:var(--bg);color:var(--ink)}
.empty{color:var(--mute);font-size:14px;padding:6px 0}.note{color:var(--mute);font-size:12px;margin:6px 0 0}
</style></head><body>
<header><h1 id="node">vmqapi</h1><span id="health"></span><span id="version"></span><span id="state">loading status.json ...</span></header>
<main>
<section class="card"><h2>Sessions</h2><div class="nums">
<div class="num"><b id="num_online">-</b><span>online</span><small>clients connected now</small></div>
<div class="num"><b id="num_offline">-</b><span>offline</span><small>persistent sessions whose client is away</small></div>
<div class="num"><b id="num_subscriptions">-</b><span>subscriptions</span><small>in the routing table</small></div>
<div class="num"><b id="num_retained">-</b><span>retained</span><small>retained messages kept</small></div></div></section>
<section class="card"><h2>Messages since start</h2><div class="nums">
<div class="num"><b id="msg_in">-</b><span>received</span><small>PUBLISH packets from clients</small></div>
<div class="num"><b id="msg_out">-</b><span>sent</span><small>PUBLISH packets to subscribers</small></div>
<div class="num"><b id="queue_drop">-</b><span>dropped</span><small>lost: a queue was full or a slow client could not take QoS 0</small></div>
<div class="num"><b id="queue_unhandled">-</b><span>unhandled</span><small>published to a topic no subscription matched</small></div></div></section>
<section class="card"><h2>Messages per second</h2><svg class="chart" id="chart_rate" viewBox="0 0 600 190" role="img" aria-label="messages in and out per second"></svg>
<div class="legend"><span><i style="background:var(--in)"></i>in (received)</span><span><i style="background:var(--out)"></i>out (sent)</span></div></section>
<section class="card"><h2>Connections</h2><svg class="chart" id="chart_conn" viewBox="0 0 600 190" role="img" aria-label="sessions online and offline"></svg>
<div class="legend"><span><i style="background:var(--on)"></i>online sessions</span><span><i style="background:var(--off)"></i>offline sessions</span></div></section>
<section class="card"><h2>Queued messages</h2><svg class="chart" id="chart_queue" viewBox="0 0 600 190" role="img" aria-label="messages waiting in queues"></svg>
<div class="legend"><span><i style="background:var(--q)"></i>waiting in session queues (entered, not yet sent or dropped)</span></div></section>
<section class="card"><h2>Listeners</h2><div class="scroll"><table id="listeners"><thead><tr><th>type</th><th>status</th>
<th>address</th><th class="n">port</th><th>mountpoint</th><th class="n">connections</th><th class="n">max</th></tr></thead><tbody></tbody></table></div>
<h2 style="margin-top:14px">Cluster</h2><div class="scroll"><table id="cluster"><thead><tr><th>node</th><th>running</th></tr></thead><tbody></tbody></table></div></section>
<section class="card wide"><h2>Sessions <span id="sessions_note" class="note"></span></h2>
<div class="filters"><input id="filter" type="search" placeholder="client id contains ..." aria-label="filter by client id">
<select id="stateFilter" aria-label="online or offline"><option value="all">online and offline</option><option value="online">online</option><option value="offline">offline</option></select></div>
<div class="scroll"><table id="sessions"><thead><tr><th>client id</th><th>state</th><th class="n">protocol</th><th class="n">subscriptions</th></tr></thead><tbody></tbody></table></div>
<div class="empty" id="sessions_empty" hidden>no session matches</div></section>
<section class="card wide"><h2>Retained topics <span id="retained_note" class="note"></span></h2><div class="scroll"><table id="retained"><thead><tr><th>topic</th></tr></thead><tbody></tbody></table></div>
<div class="empty" id="retained_empty" hidden>no retained messages</div></section>
</main>
<script>
"use strict";
const POLL_MS = 2000, H = 190, L = 48, R = 12, T = 24, B = 26, PROTOCOLS = {3: "3.1", 4: "3.1.1", 5: "5.0"};
function $(id) { return document.getElementById(id); }
function text(id, value) { $(id).textContent = String(value); }
function fmt(v) { return v >= 1e6 ? (v / 1e6).toFixed(1) + "M" : v >= 1e4 ? (v / 1e3).toFixed(0) + "k" : v >= 100 ? v.toFixed(0) : v >= 10 ? String(+v.toFixed(1)) : String(+v.toFixed(2)); }
function niceMax(v) { if (v <= 0) return 1; const p = Math.pow(10, Math.floor(Math.log10(v))); for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p; return 10 * p; }
function clock(t, seconds) { return new Date(t * 1000).toTimeString().slice(0, seconds ? 8 : 5); }
function el(name, attrs, content) {  // numbers and clock times only: nothing to escape
  let out = "<" + name;
  for (const k in attrs) out += " " + k + '="' + attrs[k] + '"';
  return out + (content === undefined ? "/>" : ">" + content + "</" + name + ">");
}
function chart(id, times, series, unit) {
  const svg = $(id), W = Math.max(280, Math.round(svg.getBoundingClientRect().width) || 600);
  const now = times[times.length - 1] || Date.now() / 1000, span = Math.max(60, now - (times[0] || now));
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const top = niceMax(Math.max(0, ...series.flatMap(s => s.values))), x = t => L + (W - L - R) * (1 - (now - t) / span);
  const y = v => H - B - (H - B - T) * v / top, parts = [];
  for (let i = 0; i <= 4; i++) {
    const v = top * i / 4;
    parts.push(el("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "var(--grid)"}));
    parts.push(el("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, fmt(v)));
  }
  parts.push(el("text", {x: 4, y: 12}, unit));
  for (let i = 0; i <= 4; i++) {
    const t = now - span * (4 - i) / 4;
    if (W < 420 && i % 2) continue;  // a phone: three labels fit
    parts.push(el("text", {x: x(t), y: H - 8, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle"},
                  clock(t, span < 600)));
  }
  parts.push(el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "var(--line)"}));
  for (const s of series) {
    if (!s.values.length) continue;
    const d = s.values.map((v, i) => (i ? "L" : "M") + x(s.times[i]).toFixed(1) + "," + y(v).toFixed(1)).join("");
    parts.push(el("path", {d: d, fill: "none", stroke: s.colour, "stroke-width": 2, "data-points": s.values.length}));
  }
  svg.innerHTML = parts.join("");
}
function rows(id, items, cells) {
  $(id).querySelector("tbody").replaceChildren(...items.map(item => {
    const row = document.createElement("tr");
    for (const [value, cls] of cells(item)) {
      const cell = document.createElement("td"); cell.textContent = String(value);
      if (cls) cell.className = cls; row.appendChild(cell);
    }
    return row;
  }));
}
function renderStatus(doc) {
  const name = Object.keys(doc[0])[0], s = doc[0][name];
  text("node", name); text("version", "vmqapi " + s.version);
  for (const key of ["num_online", "num_offline", "num_subscriptions", "num_retained", "msg_in", "msg_out",
                     "queue_drop", "queue_unhandled"]) text(key, s[key]);
  rows("listeners", s.listeners, l => [[l.type], [l.status, l.status], [l.ip], [l.port, "n"], [l.mountpoint || "-"],
                                      [l.active_conns, "n"], [l.max_conns, "n"]]);
}
function renderDetails(d) {
  const at = d.fields.indexOf("at"), h = d.history, col = name => h.map(p => p[d.fields.indexOf(name)]);
  const times = col("at"), rate = name => {
    const v = col(name), out = [];
    for (let i = 1; i < v.length; i++) out.push(Math.max(0, (v[i] - v[i - 1]) / Math.max(0.1, times[i] - times[i - 1])));
    return out;
  };
  const later = times.slice(1);
  chart("chart_rate", times, [{values: rate("msg_in"), times: later, colour: "var(--in)"},
                              {values: rate("msg_out"), times: later, colour: "var(--out)"}], "msg/s");
  chart("chart_conn", times, [{values: col("num_online"), times: times, colour: "var(--on)"},
                              {values: col("num_offline"), times: times, colour: "var(--off)"}], "sessions");
  chart("chart_queue", times, [{values: col("queued"), times: times, colour: "var(--q)"}], "messages");
  rows("sessions", d.sessions, s => [[s.client_id], [s.online ? "online" : "offline", s.online ? "online" : "offline"],
                                     [PROTOCOLS[s.protocol] || s.protocol, "n"], [s.subscriptions, "n"]]);
  $("sessions_empty").hidden = d.sessions.length > 0;
  text("sessions_note", d.sessions.length >= 100 ? "(the first 100)" : "");
  rows("retained", d.retained, t => [[t]]);
  $("retained_empty").hidden = d.retained.length > 0;
  text("retained_note", d.retained.length >= 100 ? "(the first 100)" : "");
  rows("cluster", d.cluster, m => [[m.Node], [m.Running ? "yes" : "no", m.Running ? "running" : "down"]]);
  text("health", d.health.length ? d.health.join("; ") : "healthy");  // as /health: listeners, store, cluster
  $("health").className = d.health.length ? "down" : "ok";
}
async function fetchJson(url) {
  const answer = await fetch(url, {cache: "no-store"});
  if (answer.status === 401) throw new Error(url + " needs an API key with scope status");
  if (!answer.ok) throw new Error(url + " answered " + answer.status);
  return answer.json();
}
async function poll() {
  try {
    const query = "?client_id=" + encodeURIComponent($("filter").value) + "&state=" + $("stateFilter").value;
    const [doc, details] = await Promise.all([fetchJson("status.json"), fetchJson("status/details.json" + query)]);
    renderStatus(doc); renderDetails(details);
    text("state", "updated " + new Date().toLocaleTimeString() + ", every 2 s; charts: the last 15 minutes");
  } catch (err) { text("state", "node unreachable: " + err.message); }
}
let timer = null;
function loop() { clearTimeout(timer); poll().finally(() => { timer = setTimeout(loop, POLL_MS); }); }
$("filter").addEventListener("input", loop); $("stateFilter").addEventListener("change", loop);
loop();
</script></body></html>
"""


###############################################################################
# 9. HTTP server ##############################################################
###############################################################################
# Owns: the route table, handle_http, and http.server's ThreadingHTTPServer (a
#       thread per connection) with the limits and timeouts around it; the
#       listeners' TLS contexts (the MQTT listeners' too).
# Must not know: MQTT internals, the key file's format.

def tls_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """Build a server TLS context from a listener's certfile, keyfile, cafile, versions and ciphers."""
    require_tls_files(options)
    ssl = tls_module()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls_version(min(options["tls_version"]))
    ctx.load_cert_chain(options["certfile"], options["keyfile"] or None)
    if options["cafile"]:
        ctx.load_verify_locations(options["cafile"])
        ctx.verify_mode = ssl.CERT_REQUIRED if options["require_certificate"] else ssl.CERT_OPTIONAL
    elif options["require_certificate"]:
        raise ssl.SSLError("require_certificate needs a cafile")
    if options["ciphers"]:
        ctx.set_ciphers(options["ciphers"])
    return ctx


def tls_columns(option: Callable[[str], Any] | None) -> dict[str, str]:
    """Return listener show --tls's columns for a listener (``option`` reads its settings; None: no TLS)."""
    row = {}
    for key in ("tls_version", "certfile", "cafile", "keyfile", "require_certificate", "use_identity_as_username"):
        value = option(key) if option else ""
        row[key] = render_value(value) if value != "" else ""
    return {**row, "psk_support": "", "pskfile": ""}


def route(path: str) -> tuple[Callable[..., Response], str]:
    """Return the endpoint serving ``path`` and the rest of the path after its prefix."""
    for prefix, endpoint in ROUTES:
        if path == prefix or path.startswith(prefix + "/"):
            return endpoint, path[len(prefix) + 1:]
    raise NotFound(f"no endpoint at {path}")


ROUTES: tuple[tuple[str, Callable[..., Response]], ...] = (
    ("/api/v1", serve_api), ("/api/v2", serve_api_v2), ("/restmqtt/api/v1/publish", serve_http_pub),
    ("/metrics", serve_metrics), ("/health", serve_health),
    ("/status.json", serve_status_json), ("/status", serve_status_page), ("/", serve_root))


def handle_http(node: NodeApi, req: Request) -> Response:
    """Answer one request; every VmqError becomes its JSON error, any other one a logged 500."""
    try:
        path, _, query = req.target.partition("?")
        if req.method == "CONNECT":  # a tunnel, which no resource here is (RFC 9110 9.3.6)
            raise MethodNotAllowed("CONNECT is not allowed; use GET, HEAD, POST or OPTIONS")
        endpoint, rest = route(path)
        return endpoint(node, req, rest, query)
    except VmqError as exc:
        return error_response(exc)
    except Exception:
        log.exception("internal error answering %s %s", req.method, redact(req.target))
        return error_response(VmqError("the command crashed; the node logged the error and keeps serving"))


_SECRET_ARG = re.compile(r"(?i)((?:^|[?&])(?:--)?[a-z0-9_.$%-]*(?:key|password|cookie|endpoint|secret|token)=)[^&]*")


def redact(target: str) -> str:
    """Hide the value of every argument that may hold a secret (``key=``, ``endpoint=``, ``...password=``,
    ``distributed_cookie=``), for logs."""
    return _SECRET_ARG.sub(r"\1***", target)


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    """Return the Date header for a second (cached: every answer of that second shares it)."""
    return email.utils.formatdate(second, usegmt=True)


_STATUS_LINES: dict[int, bytes] = {}
HTTP_THREAD_STACK = 512 * 1024  # bytes per connection thread (Python's default: 8 MiB). Measured on 3.11:
# 256 KiB already runs our deepest paths (TLS handshake, JSON of nested results, 1,000 Python frames);
# twice that leaves room for an embedding program's command. Recursion hundreds of levels deep
# through C code (map/sorted calling back into Python) needs about 2 MiB: do such work in a thread of its own.
REFUSED_LINGER = 1.0  # s a refused connection is drained before it is closed (a close with unread data is a RST)
_STACK_LOCK = threading.Lock()  # threading.stack_size is process-wide: set and restore it around one start
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Connection: close\r\nContent-Length: 89\r\n\r\n"
               b'{"error":"service_unavailable","text":"the node cannot start a thread now","type":"error"}')


@functools.lru_cache(maxsize=2)
def _server_and_date(second: int) -> bytes:
    """Return the Server and Date header lines for a second (every answer of that second shares them)."""
    return SERVER_HEADER + f"Date: {_http_date(second)}\r\n".encode()


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()
    return line


def start_with_small_stack(thread: threading.Thread) -> None:
    """Start ``thread`` with an HTTP_THREAD_STACK stack; the process default is back afterwards."""
    with _STACK_LOCK:
        previous = threading.stack_size(HTTP_THREAD_STACK)
        try:
            thread.start()
        finally:
            threading.stack_size(previous)


DEADLINE_SLACK = 0.01  # s a kernel timeout set earlier may end off a deadline before it is set again


def socket_deadline(sock: socket.socket, option: int, seconds: float, held: float | None = None) -> float | None:
    """Let the kernel end one blocking recv or send (``option``: SO_RCVTIMEO, SO_SNDTIMEO) after ``seconds``;
    return the timeout now set (None: a TLS socket's own). ``held`` (the one set before) is kept while it
    ends within DEADLINE_SLACK of the deadline, either way.

    A Python timeout would do the same with a poll before every call and a mode switch each time it
    changes, each letting go of the GIL: with many connections at once that costs more than the request.
    A TLS socket gets a Python timeout all the same: in blocking mode ``ssl`` calls SSL_read again when
    the kernel's timeout ends one recv, and would wait for ever.
    """
    if is_tls(sock):  # a blocking TLS socket retries its read past a kernel timeout
        sock.settimeout(max(seconds, 0.001))
        return None
    if held is not None and abs(held - seconds) <= DEADLINE_SLACK:
        return held
    whole = max(seconds, 0.001)  # 0 would mean no limit at all
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", int(whole), int(whole % 1 * 1e6)))
    return whole


class _DeadlineReader(socket.SocketIO):
    """A connection's reads, each allowed only what is left of its handler's deadline.

    A timeout per recv would let a client trickling a byte at a time renew it forever; the kernel's
    receive timeout, set to what is left before each recv, bounds the whole request.
    """

    def __init__(self, sock: socket.socket, handler: HttpHandler):
        super().__init__(sock, "rb")
        self._handler = handler
        self.timeout: float | None = None  # the receive timeout set on the socket

    def readinto(self, buffer: Any) -> int | None:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("http_request_timeout passed")
        self.timeout = socket_deadline(self._sock, socket.SO_RCVTIMEO, left, self.timeout)
        try:
            got = self._sock.recv_into(buffer)
        except BlockingIOError:  # the kernel's timeout ended the call (a TLS socket raises TimeoutError)
            raise TimeoutError("http_request_timeout passed") from None
        self._handler.hold(got)  # what a request being read holds, counted as it arrives
        return got


def send_within(sock: socket.socket, data: bytes, seconds: float, held: float | None = None) -> float | None:
    """Send all of ``data`` within ``seconds`` in all (a client that reads nothing is given up: TimeoutError);
    return the send timeout left set on the socket (``held``: the one set before)."""
    deadline, view = time.monotonic() + seconds, memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client took nothing for http_request_timeout")
        held = socket_deadline(sock, socket.SO_SNDTIMEO, left, held)
        try:
            view = view[sock.send(view):]
        except BlockingIOError:  # the kernel's timeout ended the call (a TLS socket raises TimeoutError)
            raise TimeoutError("the client took nothing for http_request_timeout") from None
    return held


HEAD_CHUNK = 4096  # bytes read at a time while a request's head is read: the most one look can overshoot
HEAD_LINE_MAX = 65536  # bytes of one header line at most (http.client's bound), whatever http_max_header_bytes says
FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a field name: a token (RFC 9110 5.1, 5.6.2)


class UnfinishedRequests:
    """The bytes that HTTP requests still being read hold, node-wide (http_max_unfinished_bytes).

    Past the budget the requests holding the most are cut, the newest one too when it is the
    biggest: trickled heads cannot grow the node, and a small request still gets through.
    """

    def __init__(self, budget: Callable[[], int]):
        self._budget = budget
        self._lock = threading.Lock()
        self._held: dict[HttpHandler, int] = {}
        self.total = 0

    def hold(self, handler: HttpHandler, n: int) -> None:
        """Count ``n`` more bytes for ``handler``; past the budget evict the biggest holders."""
        budget = self._budget()
        with self._lock:  # evicted under the lock: a request released meanwhile (read whole) is never cut
            self._held[handler] = self._held.get(handler, 0) + n
            self.total += n
            if self.total > budget:
                for holder, held in sorted(self._held.items(), key=lambda item: -item[1]):
                    if self.total <= budget:
                        break
                    self.total -= held
                    del self._held[holder]
                    holder.evict()

    def release(self, handler: HttpHandler) -> None:
        """Forget what ``handler`` held: its request is read (or given up)."""
        with self._lock:
            self.total -= self._held.pop(handler, 0)


class _HeadReader:
    """A request's head, read a line at a time within http_max_header_bytes (what it receives counts in
    the node's budget as _DeadlineReader receives it).

    http.client.parse_headers takes up to 100 lines of 64 KiB each before anyone looks at
    them; handed this reader instead of the socket's, it meets the bound while it reads.
    """

    def __init__(self, handler: HttpHandler, limit: int):
        self._handler, self._raw, self.limit, self.left = handler, handler.rfile, limit, limit

    def readline(self, size: int = -1) -> bytes:
        """Return one line (at most ``size`` bytes); raise HeaderTooLarge past the head's bound."""
        parts: list[bytes] = []
        got, size = 0, size if size >= 0 else self.left + 1
        while got < size:
            piece = self._raw.readline(min(HEAD_CHUNK, size - got, self.left + 1))  # counted by _DeadlineReader
            if not piece:
                break
            self.left -= len(piece)
            if self.left < 0:
                raise HeaderTooLarge(f"the request head is longer than {self.limit} bytes (http_max_header_bytes)")
            parts.append(piece)
            got += len(piece)
            if piece.endswith(b"\n"):
                break
        return b"".join(parts)


class HttpServer(http.server.ThreadingHTTPServer):
    """http.server's threading server for one listener: a thread per connection, counted and capped."""

    request_queue_size = 128  # socketserver's 5 turns 16 clients into a 300 ms p99
    daemon_threads = True
    block_on_close = False  # stop cuts the connections and joins their threads itself, bounded

    def __init__(self, listener: HttpListener, address: tuple[str, int]):
        self.listener = listener
        self.node = listener.node
        self._lock = threading.Lock()
        self.conns: dict[socket.socket, socket.socket] = {}  # accepted socket -> the one its thread uses
        self.threads: set[threading.Thread] = set()
        self.all_conns = 0
        self.closing = False  # stop: a TLS handshake that ends now is not served
        self._refused: list[tuple[socket.socket, float]] = []  # touched by the serving thread only
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, HttpHandler)

    @property
    def max_connections(self) -> int | None:
        """Connections served at once (listener.max_connections; None: no limit)."""
        return self.listener.option("max_connections")

    def connections(self) -> int:
        """Return the number of open connections (each has its thread)."""
        return len(self.conns)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: its getfqdn may wait on DNS, for CGI only
        self.server_name, self.server_port = self.server_address[:2]

    def reopen(self) -> None:
        """Bind and listen again on the same address and port (after suspend); raise OSError when taken."""
        self.socket = socket.socket(self.address_family, self.socket_type)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.socket.close()
            raise

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Give the connection its thread, or refuse it past max_connections."""
        limit = self.max_connections
        with self._lock:
            full = limit is not None and len(self.conns) >= limit
            if not full:
                self.conns[request] = request
                self.all_conns += 1
        if full:
            self._refuse(request)
            return
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name=f"vmqapi-http-{self.listener.name}-conn", daemon=True)
        with self._lock:
            self.threads.add(thread)
        try:
            start_with_small_stack(thread)
        except RuntimeError:  # no thread to be had: answer, never drop the request silently
            log.warning("http %s: cannot start a connection thread; answered 503", self.listener.name)
            with self._lock:
                self.conns.pop(request, None)
                self.threads.discard(thread)
            self._refuse(request, b"" if self.listener.tls else BUSY_ANSWER)

    def _refuse(self, sock: socket.socket, answer: bytes = b"") -> None:
        """Send ``answer`` and a FIN now; drain what the client sends until it closes, REFUSED_LINGER at most."""
        try:
            sock.setblocking(False)
            if answer:
                sock.send(answer)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self._refused.append((sock, time.monotonic() + REFUSED_LINGER))

    def service_actions(self) -> None:
        """Close refused connections once their client closed, or REFUSED_LINGER passed."""
        if not self._refused:
            return
        now, keep = time.monotonic(), []
        for sock, until in self._refused:
            try:
                done = not sock.recv(65536) or now > until  # b"": the client closed
            except BlockingIOError:
                done = now > until
            except OSError:
                done = True
            if done:
                sock.close()
            else:
                keep.append((sock, until))
        self._refused = keep

    def close_refused(self) -> None:
        """Close every refused connection still draining (the serving thread has stopped)."""
        for sock, _ in self._refused:
            sock.close()
        self._refused = []

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        """Serve one connection; an HTTPS one first finishes its handshake here, in its own thread."""
        tls = self.listener.tls
        if tls is not None:
            try:
                wrapped = tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                with self._lock:
                    self.conns[request] = wrapped  # stop cuts the TLS socket from now on
                if self.closing:
                    return
                wrapped.settimeout(self.listener.option("tls_handshake_timeout") / 1000)
                wrapped.do_handshake()
            except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, a reset
                log.info("TLS handshake with %s failed: %s", client_address[0], exc)
                return
            request = wrapped
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._lock:
            used = self.conns.pop(request, request)
            self.threads.discard(threading.current_thread())
        if used is not request:  # the TLS socket: the accepted one was detached into it
            used.close()
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # the client went away mid-answer
            return
        log.exception("error serving %s", client_address[0])

    def cut(self) -> None:
        """Cut every open connection: its thread sees the end of its stream and finishes."""
        with self._lock:
            socks = list(self.conns.values())
        for sock in socks:
            with contextlib.suppress(OSError):  # the plain socket's shutdown: SSLSocket's drops its TLS state
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class HttpHandler(http.server.BaseHTTPRequestHandler):
    """One connection: http.server reads each request; handle_http answers it in one write.

    The head reaches http.server's parser through _HeadReader, which keeps http_max_header_bytes
    and the node's http_max_unfinished_bytes while it reads; listener.max_* are checked on what
    http.server parsed, http_request_timeout on every read. Every error is the JSON answer of
    README, "The API by example".
    """

    protocol_version = "HTTP/1.1"  # keep-alive, 100-continue
    server_version = "vmqapi/" + __version__
    sys_version = ""
    disable_nagle_algorithm = True  # one write per answer plus no Nagle: no 40 ms delayed-ACK stall
    server: HttpServer
    deadline = 0.0  # time.monotonic() by which the request being read must be whole
    fields: dict[str, str] | None = None  # the request's header fields, once check_head passed them
    raw_head: list[tuple[str, str]] = []  # the request's field lines as read_field_lines read them
    send_timeout: float | None = None  # the send timeout set on the socket (send_within)
    evicted = False  # http_max_unfinished_bytes was exceeded and this request held the most
    ERRORS = {400: BadRequest, 414: UriTooLong, 431: HeaderTooLarge, 501: NotImplementedMethod,
              505: VersionNotSupported}  # what http.server's send_error codes mean here

    def setup(self) -> None:
        self._thread = threading.current_thread()
        super().setup()
        if not is_tls(self.connection):
            self.connection.settimeout(None)  # blocking: the kernel times each call (socket_deadline)
        self.rfile.close()  # http.server's reader, replaced by one that keeps the request's deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def handle_one_request(self) -> None:
        """Read one request within the limits and the deadline, answer it, run its ``after`` actions."""
        node = self.server.node
        self.deadline = time.monotonic() + node.config["http_request_timeout"]  # also the keep-alive idle limit
        try:
            request = self.read_request()
        except VmqError as exc:  # the request could not be read: answer and close
            self.close_connection = True
            self.answer(None, error_response(exc))
            return
        except (OSError, ValueError):  # a timeout, a reset, a client gone mid-request: nobody to answer
            self.close_connection = True
            return
        finally:
            node.unfinished_http.release(self)
        if request is None:
            self.close_connection = True
            return
        response = handle_http(node, request)
        self.answer(request, response)
        for fn in response.after:
            fn()

    def read_request(self) -> Request | None:
        """Return the next request, None when the connection ended (or http.server already answered)."""
        line_limit = self.server.listener.limits()[0]
        head = _HeadReader(self, self.server.node.config["http_max_header_bytes"])
        self.raw_requestline = head.readline(line_limit + 3)
        if self.raw_requestline in (b"\r\n", b"\n"):  # an empty line before a request is ignored (RFC 9112 2.2)
            self.raw_requestline = head.readline(line_limit + 3)
        if len(self.raw_requestline.rstrip(b"\r\n")) > line_limit:
            raise UriTooLong(f"request line longer than {line_limit} bytes")
        self.fields = None
        if not self.raw_requestline.endswith(b"\n"):
            return None  # ended mid-line
        reader, self.rfile = self.rfile, head  # http.server reads the header lines through the bound
        try:
            if not self.parse_request():
                return None  # http.server's send_error (below) answered
        finally:
            self.rfile = reader
        fields = self.fields or self.check_head()
        body = self.read_body(int(fields.get("content-length", "0")))
        if body is None:
            return None  # the client went away inside the body
        return Request(self.command, self.path, fields, body, tuple(self.client_address[:2]), self.server.listener.kind)

    def parse_request(self) -> bool:
        """Parse the request line as http.server does (answering its errors through ``send_error``), and the
        head's field lines here (RFC 9112 5): email's parser, which http.server uses, costs more than all
        the rest of answering a request. Raise BadRequest for a line that is no field line, HeaderTooLarge
        past listener.max_headers; return False when nothing is to be answered (or http.server's error was)."""
        self.command, self.request_version, self.close_connection = None, self.default_request_version, True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False
        if len(words) >= 3:  # the version, RFC 9112 2.3 (as http.server reads it)
            version = words[-1]
            number = version[5:].split(".") if version.startswith("HTTP/") else []
            if len(number) != 2 or not all(n.isascii() and n.isdigit() and len(n) <= 10 for n in number):
                self.send_error(400, f"Bad request version ({version!r})")
                return False
            major, minor = int(number[0]), int(number[1])
            if major >= 2:
                self.send_error(505, f"Invalid HTTP version ({version[5:]})")
                return False
            self.close_connection = (major, minor) < (1, 1)
            self.request_version, one_one = version, (major, minor) >= (1, 1)
        else:
            one_one = False
        if not 2 <= len(words) <= 3:
            self.send_error(400, f"Bad request syntax ({self.requestline!r})")
            return False
        self.command, self.path = words[:2]
        if len(words) == 2:  # HTTP/0.9: a GET is refused once the head is read (check_head)
            self.close_connection = True
            if self.command != "GET":
                self.send_error(400, f"Bad HTTP/0.9 request type ({self.command!r})")
                return False
        if self.path.startswith("//"):  # never an absolute URI without a scheme
            self.path = "/" + self.path.lstrip("/")
        self.raw_head = self.read_field_lines()
        if self.raw_head is None:
            return False  # the client went away inside the head
        options, expect = set(), ""
        for name, value in self.raw_head:
            lower = name.lower()
            if lower == "connection":  # a list, maybe over several lines (RFC 9110 7.6.1)
                options.update(option.strip().lower() for option in value.split(","))
            elif lower == "expect" and not expect:
                expect = value.lower()
        if "close" in options:  # RFC 9112 9.6: the connection closes after the answer
            self.close_connection = True
        elif "keep-alive" in options:
            self.close_connection = False
        if expect == "100-continue" and one_one:
            return self.handle_expect_100()
        return True

    def read_field_lines(self) -> list[tuple[str, str]] | None:
        """Read the head's field lines up to the empty one: (name, value without the whitespace around it)."""
        most = self.server.listener.limits()[2]
        lines: list[tuple[str, str]] = []
        while True:
            line = self.rfile.readline(HEAD_LINE_MAX + 1)
            if line in (b"\r\n", b"\n"):
                return lines
            if not line.endswith(b"\n"):
                if len(line) > HEAD_LINE_MAX:
                    raise HeaderTooLarge(f"a header line is longer than {HEAD_LINE_MAX} bytes")
                return None
            if line[0] in b" \t":
                raise BadRequest("malformed header line: obsolete line folding")  # RFC 9112 5.2
            name, colon, value = line.decode("iso-8859-1").partition(":")
            if not colon or FIELD_NAME.fullmatch(name) is None:
                raise BadRequest("malformed header line")  # RFC 9112 5.1: a token, no space before ':'
            value = value.strip(" \t\r\n")
            if "\0" in value or "\r" in value:  # (a line ends at its first LF)
                raise BadRequest(f"header {name} holds a NUL or a bare CR")  # RFC 9110 5.5
            if len(lines) == most:
                raise HeaderTooLarge(f"more than {most} headers (listener.max_headers)")
            lines.append((name, value))

    def read_body(self, length: int) -> bytes | None:
        """Read a body of ``length`` bytes, counted in the node's budget; None when the client went away."""
        parts, got = [], 0
        while got < length:
            piece = self.rfile.read(min(65536, length - got))  # counted by _DeadlineReader
            if not piece:
                return None
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def hold(self, n: int) -> None:
        """Count ``n`` bytes read in the node's budget; raise once this request was evicted from it."""
        if n:
            self.server.node.unfinished_http.hold(self, n)
        if self.evicted:
            raise ServiceUnavailable("requests being read hold more than http_max_unfinished_bytes; "
                                     "this one held the most")

    def evict(self) -> None:
        """Give up this request (the node's budget is exceeded): its reads end now, then it answers 503."""
        self.evicted = True
        if threading.current_thread() is not self._thread:
            with contextlib.suppress(OSError):  # the plain socket's shutdown: the answer can still be written
                socket.socket.shutdown(self.connection, socket.SHUT_RD)

    def check_head(self) -> dict[str, str]:
        """Return the header fields read_field_lines read (lower-case names, the first of repeated ones).

        Raise for a head that the limits or RFC 9112 refuse.
        """
        if self.request_version == "HTTP/0.9":
            raise BadRequest(f"bad request line {self.requestline[:80]!r}")
        _, value_limit, _, body_limit = self.server.listener.limits()
        raw = self.raw_head  # read_field_lines kept the count and the syntax
        fields: dict[str, str] = {}
        for name, value in raw:
            if len(value) > value_limit:
                raise HeaderTooLarge(f"header {name} is longer than {value_limit} bytes")
            fields.setdefault(name.lower(), value)
        self.check_framing(fields, [v for n, v in raw if n.lower() == "content-length"])
        length = fields.get("content-length", "0")
        if not (length.isascii() and length.isdigit()):
            raise BadRequest("bad Content-Length")
        if int(length) > body_limit:
            raise PayloadTooLarge(f"a request body may hold {body_limit} bytes at most (listener.max_body_size)")
        self.fields = fields
        return fields

    @staticmethod
    def check_framing(fields: Mapping[str, str], lengths: Sequence[str]) -> None:
        """Refuse a head whose body length is not one sure number (RFC 9112 6.3): the connection then closes.

        Two readings of where a body ends let a second, smuggled request ride in the first.
        """
        if len(set(lengths)) > 1:
            raise BadRequest("Content-Length fields with different values")
        if "transfer-encoding" in fields:
            if lengths:
                raise BadRequest("Transfer-Encoding together with Content-Length")
            raise NotImplementedMethod("Transfer-Encoding is not supported; send the body with a Content-Length")

    def handle_expect_100(self) -> bool:
        """Send 100 Continue only for a request that will be read (RFC 9110 10.1.1)."""
        try:
            self.check_head()
        except VmqError as exc:
            self.close_connection = True
            self.answer(None, error_response(exc))
            return False
        return super().handle_expect_100()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer http.server's own refusals (bad request line, version, header lines) as JSON errors."""
        exc = self.ERRORS.get(code, BadRequest)(message or http.HTTPStatus(code).phrase)
        self.close_connection = True
        self.answer(None, error_response(exc))

    def answer(self, req: Request | None, resp: Response) -> None:
        """Write the whole answer in one call (HEAD: without its body), then log it without keys."""
        head = "".join([f"{k}: {v}\r\n" for k, v in resp.headers])
        end = "Connection: close\r\n\r\n" if self.close_connection else "\r\n"
        data = b"".join((_status_line(resp.status), _server_and_date(int(time.time())),
                         f"{head}Content-Length: {len(resp.body)}\r\n{end}".encode("latin-1"),
                         b"" if req is not None and req.method == "HEAD" else resp.body))
        try:  # a client that reads nothing: the write gives up after http_request_timeout
            self.send_timeout = send_within(self.connection, data, self.server.node.config["http_request_timeout"],
                                            self.send_timeout)
        except OSError:
            self.close_connection = True
        if log.isEnabledFor(logging.INFO):
            log.info('%s "%s %s" %d %d', self.client_address[0], req.method if req else "-",
                     redact(req.target) if req else "-", resp.status, len(resp.body))

    def log_message(self, format: str, *args: Any) -> None:
        log.info("http %s: %s", self.client_address[0], redact(format % args))


SERVER_HEADER = f"Server: vmqapi/{__version__}\r\n".encode()


class HttpListener:
    """One HTTP listener of the node: its HttpServer and the thread that accepts for it."""

    def __init__(self, node: NodeApi, name: str, address: tuple[str, int], tls: bool = False,
                 options: Mapping[str, Any] | None = None):
        self.node, self.name = node, name
        self.kind = "https" if tls else "http"
        self.options = dict(options or {})  # a listener started at run time: its own options
        self.status = "running"
        self.tls = tls_context({o: self.option(o) for o in LISTENER_TLS_OPTIONS}) if tls else None
        self.server = HttpServer(self, address)
        self.address, self.port = self.server.server_address[:2]
        self._thread: threading.Thread | None = None
        self._limits: tuple[Any, tuple[int, int, int, int]] | None = None

    @property
    def all_conns(self) -> int:
        """Connections accepted since the listener started."""
        return self.server.all_conns

    def option(self, name: str) -> Any:
        """Return a listener option: its own, else the most specific config key."""
        if name in self.options:
            return self.options[name]
        return self.node.config.listener_option(self.kind, self.name, name)

    def limits(self) -> tuple[int, int, int, int]:
        """Return (request line, header value, header count, body) limits, read again after a ``set``."""
        config = self.node.config
        if self._limits is None or self._limits[0] is not config:
            self._limits = (config, tuple(self.option(o) for o in ("max_request_line_length", "max_header_value_length",
                                                                   "max_headers", "max_body_size")))
        return self._limits[1]

    def start(self) -> None:
        """Start accepting."""
        poll = self.node.config["http_poll_interval"] / 1000  # s between looks at suspend/stop and refused sockets
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": poll},
                                        name=f"vmqapi-http-{self.name}", daemon=True)
        self._thread.start()

    def active(self) -> int:
        """Return the number of open connections."""
        return self.server.connections()

    def _stop_accepting(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.server.shutdown()  # serve_forever returns within http_poll_interval
            self._thread.join(5)
        self._thread = None
        self.server.close_refused()
        self.server.socket.close()

    def suspend(self, kill_sessions: bool = False) -> None:
        """Stop accepting (status suspended); with ``kill_sessions`` also cut every connection (stopped)."""
        self._stop_accepting()
        if kill_sessions:
            self.server.cut()
        self.status = "stopped" if kill_sessions else "suspended"

    def resume(self) -> None:
        """Accept again on the same address and port; raise OSError when it is taken meanwhile."""
        if self.status == "running":
            return
        self.server.reopen()
        self.status = "running"
        self.start()

    def stop(self) -> None:
        """Stop serving, cut every connection and wait for their threads (5 s at most in all)."""
        self.server.closing = True
        self._stop_accepting()
        self.server.cut()
        end = time.monotonic() + 5
        with self.server._lock:
            threads = list(self.server.threads)
        for thread in threads:  # one busy in a command ends with it; its write then fails
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, end - time.monotonic()))
        self.status = "stopped"

    def delete(self) -> None:
        """Stop for good (listener delete)."""
        self.stop()

    def row(self, tls: bool = False, mqtt: bool = False) -> dict:
        """Return this listener's row of listener show."""
        limit = self.option("max_connections")
        row = {"type": self.kind, "status": self.status, "address": self.address, "port": str(self.port),
               "mountpoint": "", "max_conns": "infinity" if limit is None else limit,
               "active_conns": self.active(), "all_conns": self.all_conns}
        if tls:
            row.update(tls_columns(self.option if self.tls else None))
        if mqtt:
            row.update(allowed_protocol_versions="", allow_anonymous_override="")
        return row


###############################################################################
# Part II. The broker                                                         #
###############################################################################
# MQTT from bytes to the subscriber's socket: a pure core (codec to engine) that takes
# packets and the time and leaves output in outboxes, the store, and the I/O shell that
# drains them. Other nodes are reached only through ClusterSeam; HTTP is unknown here.


###############################################################################
# 10. MQTT codec ##############################################################
###############################################################################
# Owns: MQTT 3.1/3.1.1/5.0 bytes <-> frozen packet dataclasses, strict validation
#       with the conformance statement it enforces, incremental decoding.
# Must not know: sockets, sessions, clocks.

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
MAX_REMAINING_LENGTH = 268_435_455  # MQTT 3.1.1 2.2.3: four bytes of variable length
MAX_PACKET_ID = 65535  # MQTT 3.1.1 2.3.1
PROTOCOLS = {3: "MQIsdp", 4: "MQTT", 5: "MQTT"}  # MQTT 3.1, 3.1.1 and 5.0: level -> protocol name
CODEC_PROTOCOLS = PROTOCOLS
BRIDGE_BIT = 0x80  # a bridge's CONNECT sets it on the protocol level (mosquitto's try_private)
BRIDGE_LEVELS = (3 | BRIDGE_BIT, 4 | BRIDGE_BIT)  # VerneMQ's 131 and 132: MQTT 3.1 and 3.1.1 from a bridge
AUTH = 15
SUBACK_FAILURE = 0x80  # MQTT 3.1.1 3.9.3
CONNACK_ACCEPTED, CONNACK_BAD_VERSION, CONNACK_BAD_ID, CONNACK_UNAVAILABLE = 0, 1, 2, 3
CONNACK_BAD_CREDENTIALS, CONNACK_NOT_AUTHORIZED = 4, 5  # MQTT 3.1.1 3.2.2.3
REASON_NAMES = {  # MQTT 5.0 2.4: reason code -> VerneMQ's label atom
    0x00: "success", 0x01: "granted_qos1", 0x02: "granted_qos2", 0x04: "disconnect_with_will_msg",
    0x10: "no_matching_subscribers", 0x11: "no_subscription_existed", 0x18: "continue_authentication",
    0x19: "reauthenticate", 0x80: "unspecified_error", 0x81: "malformed_packet", 0x82: "protocol_error",
    0x83: "impl_specific_error", 0x84: "unsupported_protocol_version", 0x85: "client_identifier_not_valid",
    0x86: "bad_username_or_password", 0x87: "not_authorized", 0x88: "server_unavailable", 0x89: "server_busy",
    0x8A: "banned", 0x8B: "server_shutting_down", 0x8C: "bad_authentication_method", 0x8D: "keep_alive_timeout",
    0x8E: "session_taken_over", 0x8F: "topic_filter_invalid", 0x90: "topic_name_invalid",
    0x91: "packet_id_in_use", 0x92: "packet_id_not_found", 0x93: "receive_max_exceeded",
    0x94: "topic_alias_invalid", 0x95: "packet_too_large", 0x96: "message_rate_too_high", 0x97: "quota_exceeded",
    0x98: "administrative_action", 0x99: "payload_format_invalid", 0x9A: "retain_not_supported",
    0x9B: "qos_not_supported", 0x9C: "use_another_server", 0x9D: "server_moved",
    0x9E: "shared_subs_not_supported", 0x9F: "connection_rate_exceeded", 0xA0: "max_connect_time",
    0xA1: "subscription_ids_not_supported", 0xA2: "wildcard_subs_not_supported",
}
CONNACK_V5_CODES = (0x00, 0x84, 0x85, 0x88, 0x86, 0x87)  # the MQTT 5 reason of each MQTT 3.1.1 CONNACK code
CONNACK_RETURN_NAMES = ("success", "unsupported_protocol_version", "client_identifier_not_valid",
                        "server_unavailable", "bad_username_or_password", "not_authorized")  # VerneMQ labels
REASON_FAILURE = 0x80  # MQTT 5.0 2.4: reason codes from 0x80 on say the operation failed


class Reason(enum.IntEnum):
    """The MQTT 5 reason codes the node sends or acts on (MQTT 5.0 2.4)."""

    SUCCESS = 0x00
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    REAUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    NOT_AUTHORIZED = 0x87
    SERVER_BUSY = 0x89
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    PACKET_ID_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99


PINGRESP_FRAME = bytes((PINGRESP << 4, 0))  # MQTT 3.1.1 3.13, the same in MQTT 5


def ack_frame(kind: int, packet_id: int) -> bytes:
    """Encode a PUBACK, PUBREC, PUBREL or PUBCOMP without reason (the same bytes in MQTT 3.1.1 and 5)."""
    return bytes((kind << 4 | (2 if kind == PUBREL else 0), 2)) + packet_id.to_bytes(2, "big")


@dataclass(frozen=True, slots=True)
class Connect:
    """CONNECT: who the client is, how its session should be kept, its will."""

    client_id: str = ""
    proto_level: int = 4
    clean_session: bool = True
    keepalive: int = 0
    username: str | None = None
    password: bytes | None = None
    will_topic: str | None = None
    will_payload: bytes = b""
    will_qos: int = 0
    will_retain: bool = False
    properties: tuple = ()  # MQTT 5: ((name, value), ...)
    will_properties: tuple = ()

    def __post_init__(self):
        if not 0 <= self.keepalive <= 65535 or self.will_qos not in (0, 1, 2):
            raise MalformedPacket("keep-alive or will QoS out of range")
        if self.password is not None and self.username is None:
            raise MalformedPacket("password without user name")  # MQTT 3.1.1 [MQTT-3.1.2-22]


@dataclass(frozen=True, slots=True)
class Connack:
    """CONNACK: the server's answer to CONNECT."""

    return_code: int = 0  # MQTT 5: the reason code
    session_present: bool = False
    properties: tuple = ()


@dataclass(frozen=True, slots=True)
class Publish:
    """PUBLISH: one application message."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: tuple = ()

    def __post_init__(self):
        if self.qos not in (0, 1, 2) or (self.packet_id is None) != (self.qos == 0):
            raise MalformedPacket("QoS and packet identifier disagree")  # MQTT 3.1.1 [MQTT-2.3.1-5]


@dataclass(frozen=True, slots=True)
class Puback:
    """PUBACK: QoS 1 acknowledgement."""

    packet_id: int
    reason_code: int = 0  # MQTT 5
    properties: tuple = ()


@dataclass(frozen=True, slots=True)
class Pubrec:
    """PUBREC: QoS 2 delivery, part 1."""

    packet_id: int
    reason_code: int = 0  # MQTT 5
    properties: tuple = ()


@dataclass(frozen=True, slots=True)
class Pubrel:
    """PUBREL: QoS 2 delivery, part 2."""

    packet_id: int
    reason_code: int = 0  # MQTT 5
    properties: tuple = ()


@dataclass(frozen=True, slots=True)
class Pubcomp:
    """PUBCOMP: QoS 2 delivery, part 3."""

    packet_id: int
    reason_code: int = 0  # MQTT 5
    properties: tuple = ()


@dataclass(frozen=True, slots=True)
class Subscribe:
    """SUBSCRIBE: (filter, requested QoS) pairs."""

    packet_id: int
    topics: tuple[tuple[str, int], ...]  # (filter, options): QoS in bits 0-1; MQTT 5 adds NL, RAP, RH
    properties: tuple = ()


@dataclass(frozen=True, slots=True)
class Suback:
    """SUBACK: granted QoS (or 0x80) per requested filter."""

    packet_id: int
    return_codes: tuple[int, ...]
    properties: tuple = ()


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """UNSUBSCRIBE: filters to drop."""

    packet_id: int
    topics: tuple[str, ...]
    properties: tuple = ()


@dataclass(frozen=True, slots=True)
class Unsuback:
    """UNSUBACK."""

    packet_id: int
    reason_codes: tuple[int, ...] = ()  # MQTT 5
    properties: tuple = ()


@dataclass(frozen=True, slots=True)
class Pingreq:
    """PINGREQ."""


@dataclass(frozen=True, slots=True)
class Pingresp:
    """PINGRESP."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """DISCONNECT: a clean goodbye (no will); MQTT 5 adds a reason."""

    reason_code: int = 0
    properties: tuple = ()


@dataclass(frozen=True, slots=True)
class Auth:
    """AUTH (MQTT 5): a step of enhanced authentication."""

    reason_code: int = 0
    properties: tuple = ()


def _u16(buf, i: int, end: int) -> int:
    if i + 2 > end:
        raise MalformedPacket("packet ends inside a two-byte integer")
    return buf[i] << 8 | buf[i + 1]


def _string(buf, i: int, end: int) -> tuple[str, int]:
    """Read a UTF-8 string with its two-byte length (MQTT 3.1.1 1.5.3)."""
    size = _u16(buf, i, end)
    stop = i + 2 + size
    if stop > end:
        raise MalformedPacket("string longer than the packet")
    try:
        text = str(buf[i + 2:stop], "utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("string is not well-formed UTF-8") from None  # [MQTT-1.5.3-1]
    if "\x00" in text:
        raise MalformedPacket("string contains U+0000")  # [MQTT-1.5.3-2]
    return text, stop


def _binary(buf, i: int, end: int) -> tuple[bytes, int]:
    size = _u16(buf, i, end)
    if i + 2 + size > end:
        raise MalformedPacket("field longer than the packet")
    return bytes(buf[i + 2:i + 2 + size]), i + 2 + size


def _packet_id(buf, i: int, end: int) -> int:
    pid = _u16(buf, i, end)
    if pid == 0:
        raise MalformedPacket("packet identifier 0")  # [MQTT-2.3.1-1]
    return pid


def _check_flags(flags: int, expected: int, name: str) -> None:
    if flags != expected:
        raise MalformedPacket(f"reserved flags of {name} are {flags:#x}")  # [MQTT-2.2.2-2]


def decode_connect(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Connect:
    """Decode CONNECT; an unknown protocol level comes back for CONNACK 1, an error carries the level read."""
    _check_flags(flags, 0, "CONNECT")
    name, i = _string(buf, i, end)
    if i >= end:
        raise MalformedPacket("CONNECT ends before the protocol level")
    level = buf[i]
    if name not in ("MQTT", "MQIsdp"):
        raise MalformedPacket(f"unknown protocol name {name!r}")  # [MQTT-3.1.2-1]
    if CODEC_PROTOCOLS.get(level & ~BRIDGE_BIT if level in BRIDGE_LEVELS else level) != name:
        return Connect(proto_level=level)  # answered with CONNACK 1 [MQTT-3.1.2-2]
    if i + 4 > end:
        raise MalformedPacket("CONNECT ends inside its variable header")
    try:
        return _connect_body(level, buf, i, end, limits)
    except MalformedPacket as exc:
        exc.proto_level = level
        raise


def _connect_body(level: int, buf, i: int, end: int, limits: Limits) -> Connect:
    cflags, keepalive, i = buf[i + 1], buf[i + 2] << 8 | buf[i + 3], i + 4
    props = will_props = ()
    cap = limits.properties or None
    if level == 5:
        props, i = decode_properties(buf, i, end, ALLOWED_PROPERTIES["connect"], cap)
    if cflags & 1:
        raise MalformedPacket("CONNECT reserved flag is set")  # [MQTT-3.1.2-3]
    will, will_qos, will_retain = cflags & 4, (cflags >> 3) & 3, bool(cflags & 32)
    if not will and (will_qos or will_retain):
        raise MalformedPacket("will QoS or retain without a will")  # [MQTT-3.1.2-13], [MQTT-3.1.2-15]
    if will_qos == 3:
        raise MalformedPacket("will QoS 3")  # [MQTT-3.1.2-14]
    if cflags & 64 and not cflags & 128:
        raise MalformedPacket("password without user name")  # [MQTT-3.1.2-22]
    client_id, i = _string(buf, i, end)
    will_topic, will_payload, username, password = None, b"", None, None
    if will:
        if level == 5:
            will_props, i = decode_properties(buf, i, end, ALLOWED_PROPERTIES["will"], cap and cap - len(props))
        will_topic, i = _string(buf, i, end)
        if not will_topic or "+" in will_topic or "#" in will_topic:
            raise MalformedPacket("will topic is empty or has a wildcard")  # [MQTT-3.1.3-10], 4.7
        will_payload, i = _binary(buf, i, end)
    if cflags & 128:
        username, i = _string(buf, i, end)
    if cflags & 64:
        password, i = _binary(buf, i, end)
    if i != end:
        raise MalformedPacket("bytes after the CONNECT payload")
    return Connect(client_id, level, bool(cflags & 2), keepalive, username, password, will_topic, will_payload,
                   will_qos, will_retain, props, will_props)


def decode_connack(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Connack:
    """Decode CONNACK."""
    _check_flags(flags, 0, "CONNACK")
    if end - i != 2 or buf[i] & 0xFE:
        raise MalformedPacket("bad CONNACK")  # MQTT 3.1.1 3.2.2.1
    return Connack(buf[i + 1], bool(buf[i]))


def decode_publish(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Publish:
    """Decode PUBLISH."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    if qos == 0 and flags & 8:
        raise MalformedPacket("DUP set on a QoS 0 PUBLISH")  # [MQTT-3.3.1-2]
    topic, i = _string(buf, i, end)
    if not topic or "+" in topic or "#" in topic:
        raise MalformedPacket("PUBLISH topic is empty or has a wildcard")  # [MQTT-3.3.2-2], [MQTT-4.7.3-1]
    pid = None
    if qos:
        pid = _packet_id(buf, i, end)
        i += 2
    return Publish(topic, bytes(buf[i:end]), qos, bool(flags & 1), bool(flags & 8), pid)


def _decode_ack(cls: type, expected_flags: int) -> Callable[..., Any]:
    def decode(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS):
        _check_flags(flags, expected_flags, cls.__name__.upper())
        if end - i != 2:
            raise MalformedPacket(f"{cls.__name__.upper()} must have 2 bytes")
        return cls(_packet_id(buf, i, end))
    decode.__doc__ = f"Decode {cls.__name__.upper()}."
    return decode


def _too_many_topics(topics: list, limits: Limits) -> None:
    if limits.topics and len(topics) >= limits.topics:
        raise PacketLimitExceeded(f"more than {limits.topics} topic filters (max_subscriptions_per_client)")


def decode_subscribe(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Subscribe:
    """Decode SUBSCRIBE; filters are validated by the broker (SUBACK 0x80)."""
    _check_flags(flags, 2, "SUBSCRIBE")  # [MQTT-3.8.1-1]
    pid, i = _packet_id(buf, i, end), i + 2
    topics = []
    while i < end:
        _too_many_topics(topics, limits)
        topic, i = _string(buf, i, end)
        if i >= end or buf[i] > 2:
            raise MalformedPacket("bad requested QoS")  # [MQTT-3-8.3-4]
        topics.append((topic, buf[i]))
        i += 1
    if not topics:
        raise MalformedPacket("SUBSCRIBE without a topic")  # [MQTT-3.8.3-3]
    return Subscribe(pid, tuple(topics))


def decode_suback(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Suback:
    """Decode SUBACK."""
    _check_flags(flags, 0, "SUBACK")
    pid = _packet_id(buf, i, end)
    codes = tuple(buf[i + 2:end])
    if not codes or any(c not in (0, 1, 2, SUBACK_FAILURE) for c in codes):
        raise MalformedPacket("bad SUBACK return code")  # [MQTT-3.9.3-2]
    return Suback(pid, codes)


def decode_unsubscribe(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Unsubscribe:
    """Decode UNSUBSCRIBE."""
    _check_flags(flags, 2, "UNSUBSCRIBE")  # [MQTT-3.10.1-1]
    pid, i = _packet_id(buf, i, end), i + 2
    topics = []
    while i < end:
        _too_many_topics(topics, limits)
        topic, i = _string(buf, i, end)
        topics.append(topic)
    if not topics:
        raise MalformedPacket("UNSUBSCRIBE without a topic")  # [MQTT-3.10.3-2]
    return Unsubscribe(pid, tuple(topics))


def _decode_empty(cls: type) -> Callable[..., Any]:
    instance = cls()

    def decode(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS):
        _check_flags(flags, 0, cls.__name__.upper())
        if end != i:
            raise MalformedPacket(f"{cls.__name__.upper()} has a body")
        return instance
    decode.__doc__ = f"Decode {cls.__name__.upper()}."
    return decode


DECODERS: dict[int, Callable[..., Any]] = {
    CONNECT: decode_connect, CONNACK: decode_connack, PUBLISH: decode_publish,
    PUBACK: _decode_ack(Puback, 0), PUBREC: _decode_ack(Pubrec, 0), PUBREL: _decode_ack(Pubrel, 2),
    PUBCOMP: _decode_ack(Pubcomp, 0), SUBSCRIBE: decode_subscribe, SUBACK: decode_suback,
    UNSUBSCRIBE: decode_unsubscribe, UNSUBACK: _decode_ack(Unsuback, 0), PINGREQ: _decode_empty(Pingreq),
    PINGRESP: _decode_empty(Pingresp), DISCONNECT: _decode_empty(Disconnect),
}


def fixed_header(buf, pos: int = 0) -> tuple[int, int] | None:
    """Decode the fixed header at ``buf[pos:]``: (remaining length, where the body starts), or None if incomplete."""
    n = len(buf)
    i = pos + 1
    length = shift = 0
    while True:
        if i >= n:
            return None
        byte = buf[i]
        length |= (byte & 127) << shift
        i += 1
        if not byte & 128:
            return length, i
        shift += 7
        if shift > 21:
            raise MalformedPacket("remaining length longer than four bytes")  # MQTT 3.1.1 2.2.3


def decode_packet(buf, pos: int = 0, max_size: int = 0, version: int = 4,
                  limits: Limits = NO_LIMITS) -> tuple[Any, int] | None:
    """Decode the packet at ``buf[pos:]``: (packet, next position), or None if incomplete.

    ``version`` is the connection's protocol level once CONNECT told it (5: MQTT 5 forms). Raises
    MalformedPacket for anything the specification forbids, for a packet larger than ``max_size``
    bytes (0: no limit) as soon as its length is known, and past ``limits`` as soon as passed.
    """
    if len(buf) > pos + 1 and buf[pos + 1] < 128:  # a remaining length of one byte: most packets
        length, i = buf[pos + 1], pos + 2
    else:
        header = fixed_header(buf, pos)
        if header is None:
            return None
        length, i = header
    if max_size and i - pos + length > max_size:
        raise PacketTooLarge(f"packet of {i - pos + length} bytes is over the {max_size}-byte limit "
                             f"(max_message_size; before CONNECT, max_connect_size)")
    end = i + length
    if end > len(buf):
        return None
    decoder = (DECODERS5 if version == 5 else DECODERS).get(buf[pos] >> 4)
    if decoder is None:
        raise MalformedPacket(f"reserved packet type {buf[pos] >> 4}")  # MQTT 3.1.1 2.2.1
    return decoder(buf[pos] & 15, buf, i, end, limits), end


def encode_length(n: int) -> bytes:
    """Encode a remaining length (MQTT 3.1.1 2.2.3)."""
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise MalformedPacket(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n & 127, n >> 7
        out.append(byte | 128 if n else byte)
        if not n:
            return bytes(out)


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 65535:
        raise MalformedPacket("string longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def _bin(data: bytes) -> bytes:
    if len(data) > 65535:
        raise MalformedPacket("field longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_length(len(body)) + body


def encode_connect(p: Connect) -> bytes:
    """Encode CONNECT."""
    flags = (2 if p.clean_session else 0) | (128 if p.username is not None else 0) \
        | (64 if p.password is not None else 0)
    payload = _str(p.client_id)
    if p.will_topic is not None:
        flags |= 4 | p.will_qos << 3 | (32 if p.will_retain else 0)
        will_props = encode_properties(p.will_properties) if p.proto_level == 5 else b""
        payload += will_props + _str(p.will_topic) + _bin(p.will_payload)
    if p.username is not None:
        payload += _str(p.username)
    if p.password is not None:
        payload += _bin(p.password)
    header = _str(CODEC_PROTOCOLS.get(p.proto_level & ~BRIDGE_BIT, "MQTT")) + bytes((p.proto_level, flags)) \
        + p.keepalive.to_bytes(2, "big") + (encode_properties(p.properties) if p.proto_level == 5 else b"")
    return _frame(CONNECT << 4, header + payload)


def encode_publish_header(topic: bytes, payload_len: int, qos: int, retain: bool, dup: bool,
                          packet_id: int | None) -> bytes:
    """Encode a PUBLISH up to its payload; ``topic`` is the length-prefixed topic."""
    first = PUBLISH << 4 | qos << 1 | (8 if dup else 0) | (1 if retain else 0)
    if qos:
        return bytes((first,)) + encode_length(len(topic) + 2 + payload_len) + topic + packet_id.to_bytes(2, "big")
    return bytes((first,)) + encode_length(len(topic) + payload_len) + topic


def encode_publish(p: Publish) -> bytes:
    """Encode PUBLISH."""
    return encode_publish_header(_str(p.topic), len(p.payload), p.qos, p.retain, p.dup, p.packet_id) + p.payload


ENCODERS: dict[type, Callable[[Any], bytes]] = {
    Connect: encode_connect,
    Connack: lambda p: bytes((CONNACK << 4, 2, 1 if p.session_present else 0, p.return_code)),
    Publish: encode_publish,
    Puback: lambda p: bytes((PUBACK << 4, 2)) + p.packet_id.to_bytes(2, "big"),
    Pubrec: lambda p: bytes((PUBREC << 4, 2)) + p.packet_id.to_bytes(2, "big"),
    Pubrel: lambda p: bytes((PUBREL << 4 | 2, 2)) + p.packet_id.to_bytes(2, "big"),
    Pubcomp: lambda p: bytes((PUBCOMP << 4, 2)) + p.packet_id.to_bytes(2, "big"),
    Subscribe: lambda p: _frame(SUBSCRIBE << 4 | 2, p.packet_id.to_bytes(2, "big")
                                + b"".join(_str(t) + bytes((q,)) for t, q in p.topics)),
    Suback: lambda p: _frame(SUBACK << 4, p.packet_id.to_bytes(2, "big") + bytes(p.return_codes)),
    Unsubscribe: lambda p: _frame(UNSUBSCRIBE << 4 | 2, p.packet_id.to_bytes(2, "big")
                                  + b"".join(_str(t) for t in p.topics)),
    Unsuback: lambda p: bytes((UNSUBACK << 4, 2)) + p.packet_id.to_bytes(2, "big"),
    Pingreq: lambda p: bytes((PINGREQ << 4, 0)),
    Pingresp: lambda p: bytes((PINGRESP << 4, 0)),
    Disconnect: lambda p: bytes((DISCONNECT << 4, 0)),
}


def encode_packet(packet: Any, version: int = 4) -> bytes:
    """Encode any packet (``version`` 5: in its MQTT 5 form)."""
    return (ENCODERS5 if version == 5 else ENCODERS)[type(packet)](packet)


# -- MQTT 5 properties (2.2.2): the first piece of MQTT 5 support ----------------------------

PROPERTY_TYPES = {  # MQTT 5.0 2.2.2.2: identifier -> (name, type)
    0x01: ("payload_format_indicator", "byte"), 0x02: ("message_expiry_interval", "u32"),
    0x03: ("content_type", "str"), 0x08: ("response_topic", "str"), 0x09: ("correlation_data", "bin"),
    0x0B: ("subscription_identifier", "varint"), 0x11: ("session_expiry_interval", "u32"),
    0x12: ("assigned_client_identifier", "str"), 0x13: ("server_keep_alive", "u16"),
    0x15: ("authentication_method", "str"), 0x16: ("authentication_data", "bin"),
    0x17: ("request_problem_information", "byte"), 0x18: ("will_delay_interval", "u32"),
    0x19: ("request_response_information", "byte"), 0x1A: ("response_information", "str"),
    0x1C: ("server_reference", "str"), 0x1F: ("reason_string", "str"), 0x21: ("receive_maximum", "u16"),
    0x22: ("topic_alias_maximum", "u16"), 0x23: ("topic_alias", "u16"), 0x24: ("maximum_qos", "byte"),
    0x25: ("retain_available", "byte"), 0x26: ("user_property", "pair"), 0x27: ("maximum_packet_size", "u32"),
    0x28: ("wildcard_subscription_available", "byte"), 0x29: ("subscription_identifier_available", "byte"),
    0x2A: ("shared_subscription_available", "byte"),
}
PROPERTY_IDS = {name: (ident, kind) for ident, (name, kind) in PROPERTY_TYPES.items()}
REPEATABLE_PROPERTIES = frozenset({"user_property", "subscription_identifier"})  # MQTT 5.0 2.2.2.2
_FIXED_WIDTH = {"byte": 1, "u16": 2, "u32": 4}


def decode_varint(buf, i: int, end: int) -> tuple[int, int]:
    """Read a Variable Byte Integer (MQTT 5.0 1.5.5) that must lie within ``end``."""
    value = shift = 0
    while True:
        if i >= end:
            raise MalformedPacket("packet ends inside a variable byte integer")
        byte = buf[i]
        value |= (byte & 127) << shift
        i += 1
        if not byte & 128:
            return value, i
        shift += 7
        if shift > 21:
            raise MalformedPacket("variable byte integer longer than four bytes")


def decode_properties(buf, i: int, end: int, allowed: frozenset[str] | None = None,
                      limit: int | None = None) -> tuple[tuple, int]:
    """Read a property list: ((name, value), ...) in order, and the position after it.

    An unknown identifier is a Malformed Packet; a property repeated that may not be, or one ``allowed``
    does not hold, is a Protocol Error (MQTT 5.0 2.2.2.2); more than ``limit`` (None: any) PacketLimitExceeded.
    """
    length, i = decode_varint(buf, i, end)
    stop = i + length
    if stop > end:
        raise MalformedPacket("property list longer than the packet")
    props, seen = [], set()
    while i < stop:
        if limit is not None and len(props) >= limit:
            raise PacketLimitExceeded(f"more than {limit} properties in one packet (max_properties_per_packet)")
        ident, i = decode_varint(buf, i, stop)
        if ident not in PROPERTY_TYPES:
            raise MalformedPacket(f"unknown property identifier {ident:#x}")
        name, kind = PROPERTY_TYPES[ident]
        if name in seen and name not in REPEATABLE_PROPERTIES:
            raise ProtocolError(f"property {name} given twice")
        if allowed is not None and name not in allowed:
            raise ProtocolError(f"property {name} is not allowed here")
        seen.add(name)
        if kind in _FIXED_WIDTH:
            width = _FIXED_WIDTH[kind]
            if i + width > stop:
                raise MalformedPacket(f"property {name} is cut short")
            value, i = int.from_bytes(buf[i:i + width], "big"), i + width
        elif kind == "varint":
            value, i = decode_varint(buf, i, stop)
            if value == 0:
                raise ProtocolError("subscription identifier 0")  # MQTT 5.0 3.8.2.1.2
        elif kind == "str":
            value, i = _string(buf, i, stop)
        elif kind == "bin":
            value, i = _binary(buf, i, stop)
        else:
            key, i = _string(buf, i, stop)
            text, i = _string(buf, i, stop)
            value = (key, text)
        props.append((name, value))
    return tuple(props), stop


def encode_properties(props: Iterable[tuple[str, Any]]) -> bytes:
    """Encode a property list with its length (the inverse of decode_properties)."""
    out = bytearray()
    for name, value in props:
        ident, kind = PROPERTY_IDS[name]
        out += encode_length(ident)
        if kind in _FIXED_WIDTH:
            out += value.to_bytes(_FIXED_WIDTH[kind], "big")
        elif kind == "varint":
            out += encode_length(value)
        elif kind == "str":
            out += _str(value)
        elif kind == "bin":
            out += _bin(value)
        else:
            out += _str(value[0]) + _str(value[1])
    return encode_length(len(out)) + bytes(out)


_F = frozenset
ALLOWED_PROPERTIES = {  # MQTT 5.0 2.2.2.2, table 2-4
    "connect": _F({"session_expiry_interval", "receive_maximum", "maximum_packet_size", "topic_alias_maximum",
                   "request_response_information", "request_problem_information", "user_property",
                   "authentication_method", "authentication_data"}),
    "will": _F({"will_delay_interval", "payload_format_indicator", "message_expiry_interval", "content_type",
                "response_topic", "correlation_data", "user_property"}),
    "connack": _F({"session_expiry_interval", "receive_maximum", "maximum_qos", "retain_available",
                   "maximum_packet_size", "assigned_client_identifier", "topic_alias_maximum", "reason_string",
                   "user_property", "wildcard_subscription_available", "subscription_identifier_available",
                   "shared_subscription_available", "server_keep_alive", "response_information", "server_reference",
                   "authentication_method", "authentication_data"}),
    "publish": _F({"payload_format_indicator", "message_expiry_interval", "topic_alias", "response_topic",
                   "correlation_data", "user_property", "subscription_identifier", "content_type"}),
    "ack": _F({"reason_string", "user_property"}),
    "subscribe": _F({"subscription_identifier", "user_property"}),
    "unsubscribe": _F({"user_property"}),
    "disconnect": _F({"session_expiry_interval", "reason_string", "user_property", "server_reference"}),
    "auth": _F({"authentication_method", "authentication_data", "reason_string", "user_property"}),
}
del _F
SUBACK_CODES_5 = frozenset({0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})  # MQTT 5.0 3.9.3


def _reason_and_properties(buf, i: int, end: int, allowed: str, limits: Limits) -> tuple[int, tuple]:
    """Read the optional reason code and properties that end MQTT 5 acks, DISCONNECT and AUTH."""
    if i == end:
        return 0, ()  # MQTT 5.0 3.4.2.1: no reason code means 0x00 Success
    reason = buf[i]
    if i + 1 == end:
        return reason, ()
    props, i = decode_properties(buf, i + 1, end, ALLOWED_PROPERTIES[allowed], limits.properties or None)
    if i != end:
        raise MalformedPacket("bytes after the properties")
    return reason, props


def _encode_reason_and_properties(reason: int, props: tuple) -> bytes:
    if props:
        return bytes((reason,)) + encode_properties(props)
    return bytes((reason,)) if reason else b""


def decode_connack5(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Connack:
    """Decode an MQTT 5 CONNACK."""
    _check_flags(flags, 0, "CONNACK")
    if end - i < 3 or buf[i] & 0xFE:
        raise MalformedPacket("bad CONNACK")
    props, stop = decode_properties(buf, i + 2, end, ALLOWED_PROPERTIES["connack"], limits.properties or None)
    if stop != end:
        raise MalformedPacket("bytes after the CONNACK properties")
    return Connack(buf[i + 1], bool(buf[i]), props)


def decode_publish5(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Publish:
    """Decode an MQTT 5 PUBLISH (an empty topic needs a topic alias, MQTT 5.0 3.3.2.3.4)."""
    qos = (flags >> 1) & 3
    if qos == 3 or (qos == 0 and flags & 8):
        raise MalformedPacket("PUBLISH with QoS 3, or DUP on QoS 0")  # [MQTT-3.3.1-4], [MQTT-3.3.1-2]
    topic, i = _string(buf, i, end)
    if "+" in topic or "#" in topic:
        raise MalformedPacket("PUBLISH topic has a wildcard")  # [MQTT-3.3.2-2]
    pid = None
    if qos:
        pid, i = _packet_id(buf, i, end), i + 2
    if i < end and buf[i] == 0:  # the common case: no properties
        props, i = (), i + 1
    else:
        props, i = decode_properties(buf, i, end, ALLOWED_PROPERTIES["publish"], limits.properties or None)
    if not topic and not any(name == "topic_alias" for name, _ in props):
        raise ProtocolError("empty PUBLISH topic without a topic alias")
    return Publish(topic, bytes(buf[i:end]), qos, bool(flags & 1), bool(flags & 8), pid, props)


def _decode_ack5(cls: type, expected_flags: int) -> Callable[..., Any]:
    def decode(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS):
        _check_flags(flags, expected_flags, cls.__name__.upper())
        pid = _packet_id(buf, i, end)
        if end - i == 2:  # the common case: success, no properties
            return cls(pid)
        return cls(pid, *_reason_and_properties(buf, i + 2, end, "ack", limits))
    decode.__doc__ = f"Decode an MQTT 5 {cls.__name__.upper()}."
    return decode


def decode_subscribe5(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Subscribe:
    """Decode an MQTT 5 SUBSCRIBE: options carry QoS, No Local, Retain As Published, Retain Handling."""
    _check_flags(flags, 2, "SUBSCRIBE")  # [MQTT-3.8.1-1]
    pid = _packet_id(buf, i, end)
    props, i = decode_properties(buf, i + 2, end, ALLOWED_PROPERTIES["subscribe"], limits.properties or None)
    topics = []
    while i < end:
        _too_many_topics(topics, limits)
        topic, i = _string(buf, i, end)
        if i >= end:
            raise MalformedPacket("subscription without options")
        options = buf[i]
        if options & 0xC0 or options & 3 == 3 or (options >> 4) & 3 == 3:
            raise MalformedPacket("bad subscription options")  # MQTT 5.0 3.8.3.1
        topics.append((topic, options))
        i += 1
    if not topics:
        raise ProtocolError("SUBSCRIBE without a topic")  # [MQTT-3.8.3-2]
    return Subscribe(pid, tuple(topics), props)


def decode_suback5(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Suback:
    """Decode an MQTT 5 SUBACK."""
    _check_flags(flags, 0, "SUBACK")
    pid = _packet_id(buf, i, end)
    props, i = decode_properties(buf, i + 2, end, ALLOWED_PROPERTIES["ack"], limits.properties or None)
    codes = tuple(buf[i:end])
    if not codes or any(c not in SUBACK_CODES_5 for c in codes):
        raise MalformedPacket("bad SUBACK reason code")
    return Suback(pid, codes, props)


def decode_unsubscribe5(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Unsubscribe:
    """Decode an MQTT 5 UNSUBSCRIBE."""
    _check_flags(flags, 2, "UNSUBSCRIBE")  # [MQTT-3.10.1-1]
    pid = _packet_id(buf, i, end)
    props, i = decode_properties(buf, i + 2, end, ALLOWED_PROPERTIES["unsubscribe"], limits.properties or None)
    topics = []
    while i < end:
        _too_many_topics(topics, limits)
        topic, i = _string(buf, i, end)
        topics.append(topic)
    if not topics:
        raise ProtocolError("UNSUBSCRIBE without a topic")  # [MQTT-3.10.3-2]
    return Unsubscribe(pid, tuple(topics), props)


def decode_unsuback5(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS) -> Unsuback:
    """Decode an MQTT 5 UNSUBACK."""
    _check_flags(flags, 0, "UNSUBACK")
    pid = _packet_id(buf, i, end)
    props, i = decode_properties(buf, i + 2, end, ALLOWED_PROPERTIES["ack"], limits.properties or None)
    codes = tuple(buf[i:end])
    if not codes:
        raise MalformedPacket("UNSUBACK without reason codes")
    return Unsuback(pid, codes, props)


def _decode_reasoned(cls: type, allowed: str) -> Callable[..., Any]:
    def decode(flags: int, buf, i: int, end: int, limits: Limits = NO_LIMITS):
        _check_flags(flags, 0, cls.__name__.upper())
        return cls(*_reason_and_properties(buf, i, end, allowed, limits))
    decode.__doc__ = f"Decode an MQTT 5 {cls.__name__.upper()}."
    return decode


DECODERS5: dict[int, Callable[..., Any]] = {
    **DECODERS, CONNACK: decode_connack5, PUBLISH: decode_publish5, PUBACK: _decode_ack5(Puback, 0),
    PUBREC: _decode_ack5(Pubrec, 0), PUBREL: _decode_ack5(Pubrel, 2), PUBCOMP: _decode_ack5(Pubcomp, 0),
    SUBSCRIBE: decode_subscribe5, SUBACK: decode_suback5, UNSUBSCRIBE: decode_unsubscribe5,
    UNSUBACK: decode_unsuback5, DISCONNECT: _decode_reasoned(Disconnect, "disconnect"),
    AUTH: _decode_reasoned(Auth, "auth"),
}


def _ack5(kind: int, flags: int = 0) -> Callable[[Any], bytes]:
    return lambda p: _frame(kind << 4 | flags, p.packet_id.to_bytes(2, "big")
                            + _encode_reason_and_properties(p.reason_code, p.properties))


def encode_publish5(p: Publish) -> bytes:
    """Encode an MQTT 5 PUBLISH."""
    first = PUBLISH << 4 | p.qos << 1 | (8 if p.dup else 0) | (1 if p.retain else 0)
    pid = p.packet_id.to_bytes(2, "big") if p.qos else b""
    return _frame(first, _str(p.topic) + pid + encode_properties(p.properties) + p.payload)


ENCODERS5: dict[type, Callable[[Any], bytes]] = {
    **ENCODERS,
    Connack: lambda p: _frame(CONNACK << 4, bytes((1 if p.session_present else 0, p.return_code))
                              + encode_properties(p.properties)),
    Publish: encode_publish5,
    Puback: _ack5(PUBACK), Pubrec: _ack5(PUBREC), Pubrel: _ack5(PUBREL, 2), Pubcomp: _ack5(PUBCOMP),
    Subscribe: lambda p: _frame(SUBSCRIBE << 4 | 2, p.packet_id.to_bytes(2, "big") + encode_properties(p.properties)
                                + b"".join(_str(t) + bytes((o,)) for t, o in p.topics)),
    Suback: lambda p: _frame(SUBACK << 4, p.packet_id.to_bytes(2, "big") + encode_properties(p.properties)
                             + bytes(p.return_codes)),
    Unsubscribe: lambda p: _frame(UNSUBSCRIBE << 4 | 2, p.packet_id.to_bytes(2, "big")
                                  + encode_properties(p.properties) + b"".join(_str(t) for t in p.topics)),
    Unsuback: lambda p: _frame(UNSUBACK << 4, p.packet_id.to_bytes(2, "big") + encode_properties(p.properties)
                               + bytes(p.reason_codes)),
    Disconnect: lambda p: _frame(DISCONNECT << 4, _encode_reason_and_properties(p.reason_code, p.properties)),
    Auth: lambda p: _frame(AUTH << 4, _encode_reason_and_properties(p.reason_code, p.properties)),
}


###############################################################################
# 11. Topics: validation and trie #############################################
###############################################################################
# Owns: topic name and filter rules, and a subscription trie whose matching
#       cost grows with the depth of the topic, not with the subscriptions.
# Must not know: clients, sessions, sockets.


def valid_topic_name(topic: str) -> bool:
    """Return whether ``topic`` may be published to (MQTT 3.1.1 4.7; topic_name_problem says why not)."""
    return topic_name_problem(topic) is None


def string_problem(text: str) -> str | None:
    """Return why ``text`` cannot travel as an MQTT UTF-8 string (MQTT 3.1.1 1.5.3), or None."""
    if "\x00" in text:
        return "it contains U+0000"  # [MQTT-1.5.3-2]
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        return "it is not well-formed UTF-8 (a lone surrogate)"  # [MQTT-1.5.3-1]
    return f"it is longer than 65535 bytes ({size})" if size > 65535 else None


def topic_name_problem(topic: str, max_levels: int = 0) -> str | None:
    """Return why a PUBLISH to ``topic`` is refused, as the codec and the engine check one, or None.

    ``max_levels`` 0 checks no depth (max_topic_levels is the engine's, not the protocol's).
    """
    if not topic:
        return "it is empty"  # [MQTT-4.7.3-1]
    if "+" in topic or "#" in topic:
        return "it contains a wildcard (+ or #)"  # [MQTT-3.3.2-2]
    problem = string_problem(topic)
    if problem is None and max_levels and topic.count("/") >= max_levels:
        problem = f"it has more than {max_levels} levels (max_topic_levels)"
    return problem


def valid_topic_filter(topic: str) -> bool:
    """Return whether ``topic`` may be subscribed to (MQTT 3.1.1 4.7.1)."""
    if not topic or len(topic.encode()) > 65535:
        return False  # [MQTT-4.7.3-1]
    levels = topic.split("/")
    for n, level in enumerate(levels):
        if "#" in level and (level != "#" or n != len(levels) - 1):
            return False  # [MQTT-4.7.1-2]
        if "+" in level and level != "+":
            return False  # [MQTT-4.7.1-3]
    return True


SHARE_PREFIX = "$share/"  # MQTT 5 4.8.2, which VerneMQ also allows for 3.1.1 clients


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """Return (group, filter) of ``$share/<group>/<filter>``, or (None, topic_filter) for a plain one."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    group, sep, rest = topic_filter[len(SHARE_PREFIX):].partition("/")
    if not sep or not group or "+" in group or "#" in group:
        return "", rest  # an empty group marks an invalid shared filter [MQTT-4.8.2-1], [MQTT-4.8.2-2]
    return group, rest


def valid_subscription(topic_filter: str) -> bool:
    """Return whether ``topic_filter`` (plain or shared) may be subscribed to."""
    group, rest = split_shared(topic_filter)
    return group != "" and valid_topic_filter(rest)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Match one filter against one topic name directly (used for ACLs and checks)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    fl, tl = topic_filter.split("/"), topic.split("/")
    for n, level in enumerate(fl):
        if level == "#":
            return True
        if n >= len(tl) or (level != "+" and level != tl[n]):
            return False
    return len(fl) == len(tl)


class _TrieNode:
    __slots__ = ("children", "subscribers")

    def __init__(self):
        self.children: dict[str, _TrieNode] = {}
        self.subscribers: dict[Any, int] = {}  # subscriber -> QoS


class TopicTrie:
    """Subscriptions by filter level; ``match`` walks only the branches a topic can reach."""

    def __init__(self):
        self._root = _TrieNode()
        self.count = 0

    def add(self, topic_filter: str, subscriber: Any, qos: int) -> bool:
        """Subscribe; return True when the subscription is new (False: QoS replaced)."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _TrieNode()
            node = child
        new = subscriber not in node.subscribers
        node.subscribers[subscriber] = qos
        self.count += new
        return new

    def remove(self, topic_filter: str, subscriber: Any) -> bool:
        """Unsubscribe; return whether the subscription existed. Prunes empty branches."""
        path = [self._root]
        for level in topic_filter.split("/"):
            nxt = path[-1].children.get(level)
            if nxt is None:
                return False
            path.append(nxt)
        if path[-1].subscribers.pop(subscriber, None) is None:
            return False
        self.count -= 1
        levels = topic_filter.split("/")
        for n in range(len(levels), 0, -1):
            node = path[n]
            if node.children or node.subscribers:
                break
            del path[n - 1].children[levels[n - 1]]
        return True

    def match(self, topic: str) -> dict[Any, int]:
        """Return subscriber -> highest QoS over every filter that matches ``topic``."""
        out: dict[Any, int] = {}
        levels = topic.split("/")
        last = len(levels)
        stack = [(self._root, 0)]
        dollar = topic.startswith("$")
        while stack:
            node, depth = stack.pop()
            children = node.children
            hash_node = children.get("#")
            if hash_node is not None and not (dollar and depth == 0):
                _merge(out, hash_node.subscribers)  # '#' also matches the parent level [MQTT-4.7.1-2]
            if depth == last:
                _merge(out, node.subscribers)
                continue
            level = levels[depth]
            child = children.get(level)
            if child is not None:
                stack.append((child, depth + 1))
            plus = children.get("+")
            if plus is not None and not (dollar and depth == 0):
                stack.append((plus, depth + 1))
        return out


class _RetainNode:
    __slots__ = ("children", "value", "names")

    def __init__(self):
        self.children: dict[str, _RetainNode] = {}
        self.value: Any = None
        self.names: tuple[str, ...] | None = None  # the children's names as walks last copied them, until one changes

    def child_names(self) -> tuple[str, ...]:
        """Return the children's names: one copy shared by every walk until a child comes or goes."""
        if self.names is None:
            self.names = tuple(self.children)
        return self.names


class RetainTree:
    """Retained messages by topic level: a new subscription walks only the branches its filter reaches.

    Dict-like (``tree[topic] = value``, ``pop``, ``items``, ``len``), plus ``walk(filter)``.
    """

    def __init__(self):
        self._root = _RetainNode()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __setitem__(self, topic: str, value: Any) -> None:
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _RetainNode()
                node.names = None
            node = child
        self._count += node.value is None
        node.value = value

    def get(self, topic: str, default: Any = None) -> Any:
        """Return the value at ``topic`` (``default`` when none)."""
        node = self._root
        for level in topic.split("/"):
            node = node.children.get(level)
            if node is None:
                return default
        return default if node.value is None else node.value

    def pop(self, topic: str, default: Any = None) -> Any:
        """Remove and return the value at ``topic`` (``default`` when none); prune empty branches."""
        path, node = [], self._root
        for level in topic.split("/"):
            path.append((node, level))
            node = node.children.get(level)
            if node is None:
                return default
        value = node.value
        if value is None:
            return default
        node.value = None
        self._count -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.children or child.value is not None:
                break
            del parent.children[level]
            parent.names = None
        return value

    def items(self) -> list[tuple[str, Any]]:
        """Return (topic, value) of every entry, sorted by topic."""
        out, stack = [], [(self._root, "")]
        while stack:
            node, prefix = stack.pop()
            for level, child in node.children.items():
                topic = f"{prefix}/{level}" if node is not self._root else level
                if child.value is not None:
                    out.append((topic, child.value))
                stack.append((child, topic))
        return sorted(out, key=lambda item: item[0])

    def walk(self, topic_filter: str) -> Iterator[tuple[str, Any]]:
        """Yield (topic, value or None) for each node ``topic_filter`` reaches, lazily: one node a step.

        The same entries as a scan would find, in trie order, not sorted. A node's child names are
        copied (not its items: no object per child for the collector; one copy for every walk until
        they change) when the walk reaches it, so the tree may change between steps; a child gone
        since yields nothing.
        """
        levels = topic_filter.split("/")
        stack: list[tuple[_RetainNode, int, str, Iterator[str] | None]] = [(self._root, 0, "", None)]
        while stack:
            node, depth, prefix, names = stack[-1]
            if names is None:  # reached: what does the filter's level here ask for?
                stack.pop()
                level = levels[depth] if depth < len(levels) else None
                if level is None or level == "#":
                    yield from (((prefix, node.value),) if level is None else self._descendants(node, depth, prefix))
                    continue
                if level == "+":
                    stack.append((node, depth, prefix, iter(node.child_names())))
                elif level in node.children:
                    stack.append((node.children[level], depth + 1, f"{prefix}/{level}" if depth else level, None))
                yield prefix, None
                continue
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child = node.children.get(name)
            if child is not None and not (depth == 0 and name.startswith("$")):  # [MQTT-4.7.2-1]
                stack.append((child, depth + 1, f"{prefix}/{name}" if depth else name, None))
            yield prefix, None

    @staticmethod
    def _descendants(node: _RetainNode, depth: int, prefix: str) -> Iterator[tuple[str, Any]]:
        """Yield ``node`` (a '#' also matches its parent level) and every descendant, one node a step."""
        yield prefix, node.value if depth else None
        stack = [(node, depth, prefix, iter(node.child_names()))]
        while stack:
            current, d, pre, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child = current.children.get(name)
            if child is None or (d == 0 and name.startswith("$")):  # [MQTT-4.7.2-1]
                yield pre, None
                continue
            topic = f"{pre}/{name}" if d else name
            yield topic, child.value
            if child.children:
                stack.append((child, d + 1, topic, iter(child.child_names())))


def _merge(out: dict[Any, Any], subscribers: dict[Any, Any]) -> None:
    for sub, opts in subscribers.items():
        old = out.get(sub)
        if old is None or old < opts:
            out[sub] = opts


###############################################################################
# 12. Broker values: messages, options, deliveries, sessions, connections #####
###############################################################################
# Owns: the values the engine works on, and the two protocol dialects that put
#       them into packets (MQTT 3.1/3.1.1 and MQTT 5).
# Must not know: sockets, clocks, files, threads.

@dataclass(frozen=True, slots=True)
class Message:
    """An application message inside one mountpoint; ``ref`` is its stable id."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    ref: int = 0
    frame: bytes = b""  # the message as a QoS 0, non-retained PUBLISH, when already at hand
    frame5: bool = False  # ``frame`` is in its MQTT 5 form (else MQTT 3.1.1)
    props: tuple = ()  # MQTT 5 properties passed on to subscribers (user properties, content type, ...)
    expires: float | None = None  # MQTT 5 message expiry, as a clock time
    origin: str | None = None  # the publisher's client id (in this mountpoint), for No Local subscriptions
    bridged: bool = False  # came in over a bridge (vmq_bridge, or a client that connected as one): no bridge sends it on


def message_bytes(msg: Message) -> int:
    """Return what a queued or retained message counts against the byte limits: payload and topic."""
    return len(msg.payload) + len(msg.topic)


MAX_SUBSCRIPTION_ID = 268_435_455  # MQTT 5.0 3.8.2.1.2: a Variable Byte Integer of 1 to this


@dataclass(frozen=True, slots=True)
class SubOptions:
    """One subscription's options (MQTT 5.0 3.8.3.1); MQTT 3.1.1 subscriptions carry a QoS only.

    ``plain``: nothing but a QoS, so a message may go out in a frame shared with others.
    Ordered so that a session's best match over several filters is the one with options
    (the engine then looks at every filter), else the highest QoS.
    """

    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    identifier: int = 0
    plain: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.qos not in (0, 1, 2) or self.retain_handling not in (0, 1, 2) \
                or not 0 <= self.identifier <= MAX_SUBSCRIPTION_ID:
            raise ValueError(f"bad subscription options {self!r}")
        object.__setattr__(self, "plain", not (self.no_local or self.retain_as_published or self.identifier))

    def __lt__(self, other: SubOptions) -> bool:
        return (not self.plain, self.qos) < (not other.plain, other.qos)

    @property
    def ids(self) -> tuple[int, ...]:
        """The subscription identifiers a delivery for this subscription carries."""
        return (self.identifier,) if self.identifier else ()

    def packed(self) -> int:
        """Return the options as the message store keeps them: QoS, flags in bits 2-5, the id from bit 8."""
        return (self.qos | self.no_local << 2 | self.retain_as_published << 3 | self.retain_handling << 4
                | self.identifier << 8)

    @classmethod
    def unpack(cls, n: int) -> SubOptions:
        """Rebuild options from ``packed()`` (a store of MQTT 3.1.1 days holds the bare QoS)."""
        return cls(n & 3, bool(n & 4), bool(n & 8), (n >> 4) & 3, n >> 8)


QOS_ONLY = tuple(SubOptions(qos) for qos in (0, 1, 2))  # shared by every MQTT 3.1.1 subscription
BRIDGE_OPTIONS = tuple(SubOptions(qos, True, True) for qos in (0, 1, 2))  # a bridge's (VerneMQ, mosquitto): no echo
BRIDGE_CLIENT_PREFIX = "$bridge/"  # the client id of a bridge's own session; no MQTT client may take it


class Stage(enum.Enum):
    """Where a delivery to a session stands (MQTT 3.1.1 4.3)."""

    QUEUED = "queued"  # waiting in the session's queue
    SENT = "sent"  # PUBLISH sent, PUBACK or PUBREC awaited
    RELEASED = "released"  # PUBREL sent, PUBCOMP awaited (QoS 2)


class Outgoing:
    """One message on its way to one session: queued, then in flight until acknowledged.

    ``retain`` is the flag an MQTT 5 client sees (Retain As Published, or a retained
    message sent for a new subscription, ``retained``, which MQTT 3.1.1 clients see too).
    """

    __slots__ = ("msg", "qos", "row", "retain", "ids", "retained", "stage", "sent_at", "shared")

    def __init__(self, msg: Message, qos: int, row: int = 0, retain: bool = False, ids: tuple = (),
                 retained: bool = False):
        self.msg, self.qos, self.row = msg, qos, row  # row: its id in the message store (0: not stored)
        self.retain, self.ids, self.retained = retain or retained, ids, retained
        self.stage = Stage.QUEUED
        self.sent_at = 0.0
        self.shared = False  # a large message queued for many: its bytes count once node-wide (Delivery.shared)

    @property
    def extra(self) -> tuple | None:
        """The delivery options the message store keeps with a queued message (None: none)."""
        return (self.retain, self.ids) if self.retain or self.ids else None


NO_QUEUE = ()  # a session's queue before its first message: read as empty, never appended to
NO_IDS: frozenset[int] = frozenset()  # a session's QoS 2 ids before its first (an empty set is 216 bytes)


class Session:
    """An MQTT session: subscriptions, queue and in-flight window of one client id."""

    __slots__ = ("mountpoint", "client_id", "subs", "client", "queue", "inflight", "incoming",
                 "next_pid", "user", "peer", "protocol", "started_at", "offline_since", "expiry", "will",
                 "queue_bytes", "stored", "stored_bytes", "loaded_upto", "parked", "relay", "limit", "max_bytes",
                 "dropped", "warned", "waiting", "ahead", "copy")

    def __init__(self, mountpoint: str, client_id: str, now: float, expiry: int | None = 0):
        self.mountpoint, self.client_id = mountpoint, client_id
        self.expiry = expiry  # seconds kept offline (0: it ends with its connection); None: persistent_client_expiration
        self.will: tuple[Message, float] | None = None  # a delayed will (MQTT 5) and when it is due
        self.subs: dict[str, SubOptions] = {}
        self.client: Connection | None = None
        # What waits to be sent: NO_QUEUE (nothing ever queued: an empty deque is 760 bytes, more than a
        # third of an idle persistent session) until the first message (``queue_for``), then a deque.
        self.queue: collections.deque[Outgoing] | tuple[()] = NO_QUEUE
        self.inflight: dict[int, Outgoing] = {}  # packet id -> delivery awaiting its acknowledgement
        self.incoming: set[int] | frozenset[int] = NO_IDS  # QoS 2 packet ids received, PUBREL pending (incoming_for)
        self.next_pid = 1
        self.user: str | None = None
        self.peer = ("", 0)
        self.protocol = 4
        self.started_at = now
        self.offline_since: float | None = now
        # The queue is ``queue`` (in memory) followed by ``stored`` messages only in the message store
        # (rows after ``loaded_upto``), read a page at a time as they are delivered.
        self.queue_bytes = 0  # bytes of the whole queue (see message_bytes), in memory and stored
        self.stored = self.stored_bytes = self.loaded_upto = 0
        self.parked = 0  # QoS 2 messages in flight when the node stopped, still only in the store
        # A bridge's own session (vmq_bridge): it never expires, gets no message that came in over a
        # bridge, and queues at most ``limit`` messages and ``max_bytes`` bytes (max_outgoing_buffered_*,
        # -1: no bound), counting drops in the store.
        self.relay = False
        self.limit = self.max_bytes = -1
        self.dropped = 0
        self.warned = False  # its first drop since the node started was logged
        # Taken over from another node whose queue is on its way: queued messages wait for it (they are newer),
        # and the first ``ahead`` of the queue are the old node's, put before what came directly meanwhile
        self.waiting = 0  # (0: not waiting) which takeover it waits for: a timer of an earlier one does not end it
        self.ahead = 0
        self.copy = ""  # the other node that keeps a copy of it (queue_replicas = 2; '': none)

    @property
    def clean(self) -> bool:
        """Whether the session ends with its connection (and is never stored)."""
        return self.expiry == 0

    @property
    def key(self) -> tuple[str, str]:
        """(mountpoint, client id): the session's name, and VerneMQ's subscriber id."""
        return self.mountpoint, self.client_id

    def queue_for(self) -> collections.deque[Outgoing]:
        """Return the queue to append to (made at the first message)."""
        if self.queue is NO_QUEUE:
            self.queue = collections.deque()
        return self.queue  # type: ignore[return-value]

    def incoming_for(self) -> set[int]:
        """Return the QoS 2 ids received to add to (made at the first one)."""
        if self.incoming is NO_IDS:
            self.incoming = set()
        return self.incoming  # type: ignore[return-value]

    def take_pid(self) -> int:
        """Return a packet id not in flight (MQTT 3.1.1 2.3.1)."""
        pid = self.next_pid
        while pid in self.inflight:
            pid = pid % MAX_PACKET_ID + 1
        self.next_pid = pid % MAX_PACKET_ID + 1
        return pid


def bridge_session(s: Session) -> bool:
    """Whether a session is a bridge's: this node's own (vmq_bridge), or a remote bridge's that connected as one.

    A message that came in over a bridge goes to neither: two brokers bridged both ways never loop.
    """
    return s.relay or s.protocol in BRIDGE_LEVELS


def _online(s: Session) -> bool:
    return s.client is not None


def _queued(s: Session) -> int:
    return len(s.queue) + s.stored


def _subscriptions(s: Session) -> list[dict]:
    return [{"topic": t, "qos": o.qos, "rap": o.retain_as_published, "no_local": o.no_local} for t, o in s.subs.items()]


def _messages(s: Session, stored: Iterable[tuple] = ()) -> list[dict]:
    """List a session's queued and in-flight messages; ``stored``: (msg, qos, ...) of those only in the store."""
    queued = [(e.msg, e.qos) for e in s.queue] + [(e[0], e[1]) for e in stored] + \
        [(e.msg, e.qos) for e in s.inflight.values()]
    return [{"msg_ref": base64.b64encode(m.ref.to_bytes(8, "big")).decode(), "msg_qos": q, "routing_key": m.topic,
             "dup": False, "payload": m.payload.decode("utf-8", "replace")} for m, q in queued]


def _default_row(s: Session) -> dict:
    """session show's default columns, in one go (the common listing of many sessions)."""
    return {"client_id": s.client_id, "is_online": s.client is not None, "mountpoint": s.mountpoint,
            "peer_host": s.peer[0], "peer_port": s.peer[1], "user": s.user}


SESSION_GETTERS: dict[str, Callable[[Session], Any]] = {  # session show's per-session fields
    "node": lambda s: "", "mountpoint": lambda s: s.mountpoint, "client_id": lambda s: s.client_id,
    "queue_pid": lambda s: f"<q.{id(s):x}>", "queue_size": _queued,  # messages queued, offline or online
    "session_pid": lambda s: f"<s.{id(s):x}>" if _online(s) else None,
    "is_offline": lambda s: not _online(s), "is_online": _online,
    "statename": lambda s: "online" if _online(s) else "offline", "deliver_mode": lambda s: "fanout",
    "offline_messages": lambda s: 0 if _online(s) else _queued(s),
    "online_messages": lambda s: _queued(s) if _online(s) else 0,
    "num_sessions": lambda s: 1 if _online(s) else 0, "clean_session": lambda s: s.clean,
    "is_plugin": lambda s: False, "queue_started_at": lambda s: int(s.started_at * 1000),
    "user": lambda s: s.user, "peer_host": lambda s: s.peer[0], "peer_port": lambda s: s.peer[1],
    "protocol": lambda s: s.protocol, "waiting_acks": lambda s: len(s.inflight) + s.parked,
    "session_started_at": lambda s: int(s.started_at * 1000), "copy_node": lambda s: s.copy,
}


def session_record(s: Session, subscriptions: bool, messages: Iterable[tuple] | None) -> dict:
    """Return every session show field of ``s`` (``messages``: those only in the store, or None: no list)."""
    record = {name: get(s) for name, get in SESSION_GETTERS.items()}
    if subscriptions:
        record["subscriptions"] = _subscriptions(s)
    if messages is not None:
        record["messages"] = _messages(s, messages)
    return record


_NO_ALIASES: Mapping[Any, Any] = types.MappingProxyType({})  # shared by every client without topic aliases


class Connection:
    """One network connection's state from accept to close, and its outbox.

    The engine never touches a socket: what must go out is left here (``out``: frames;
    ``closing``: close once they are sent; ``pause_for``: stop reading for so many
    seconds), and the I/O shell takes it after each batch, once the store has committed.
    ``link`` is the shell's own handle; the engine only carries it. The shell keeps
    ``writable`` (whether the socket takes more now) up to date.
    """

    __slots__ = ("link", "listener", "peer", "identity", "session", "connected", "closed", "proto", "dialect",
                 "keepalive", "last_seen", "opened_at", "user", "will", "clean_exit", "rate_second", "rate_count",
                 "labels", "plain", "receive_max", "receive_max_in", "max_packet", "alias_max", "aliases_out",
                 "aliases_in", "alias_max_in", "will_delay", "auth", "auth_method", "expiry_at_connect", "out",
                 "out_bytes", "held_back", "closing", "pause_for", "writable", "tracer", "bridge")

    def __init__(self, link: Any, listener: Any, peer: tuple, identity: str | None, now: float):
        self.link, self.listener, self.peer, self.identity = link, listener, peer, identity
        self.session: Session | None = None
        self.connected = self.closed = self.clean_exit = False
        self.proto = 4
        self.dialect: Dialect = V311
        self.labels = V4  # metric labels of this client's packets
        self.plain = True  # QoS 0 may go out as a frame shared with other clients of its version
        self.keepalive = 0
        self.last_seen = self.opened_at = now
        self.user: str | None = None
        self.will: Message | None = None
        self.rate_second = self.rate_count = 0
        # MQTT 5 (MQTT 5.0 3.1.2.11): what the client asked for in CONNECT and what the node granted
        self.receive_max = 0  # most QoS 1/2 in flight to the client (0: max_inflight_messages alone)
        self.receive_max_in = 65535  # most unacknowledged QoS 2 PUBLISHes from the client
        self.max_packet = 0  # largest packet the client accepts (0: no limit)
        self.alias_max = 0  # topic aliases the node may use towards the client
        self.aliases_out: Mapping[str, int] = _NO_ALIASES  # a dict of its own once aliases are allowed
        self.alias_max_in = 0  # topic aliases the client may use towards the node
        self.aliases_in: Mapping[int, str] = _NO_ALIASES
        self.will_delay = 0
        self.auth: tuple | None = None  # an enhanced authentication in progress: (CONNECT, client id, assigned)
        self.auth_method: str | None = None
        self.expiry_at_connect = 0  # the Session Expiry Interval CONNECT asked for
        self.out: list[bytes] = []
        self.out_bytes = 0  # bytes in ``out``, bounded like a queue (max_online_bytes)
        self.held_back = False  # the engine kept queued messages back for a full outbox: drain again once sent
        self.closing = False
        self.pause_for = 0.0
        self.writable = True
        self.tracer: Any = None  # the I/O shell's tracer of this client, when one is on
        self.bridge = False  # connected as a bridge (protocol level + 128): No Local, Retain As Published

    def speak(self, proto: int) -> None:
        """Read and write protocol level ``proto`` from now on."""
        self.proto, self.dialect = proto, DIALECTS[proto]
        self.labels = self.dialect.labels


def reason_labels(code: int, zero: str = "success") -> LabelSet:
    """Return the metric labels of an MQTT 5 packet with reason ``code`` (``zero`` names 0x00)."""
    return (("mqtt_version", "5"), ("reason_code", REASON_NAMES.get(code, f"{code:#04x}") if code else zero))


class Dialect:
    """How one protocol version says things: CONNACK, acknowledgements, refusals, DISCONNECT.

    The engine asks its connection's dialect (``DIALECTS[level]``) instead of testing the version.
    """

    v5 = False
    reason_codes = False  # acknowledgements say no reason: a refused PUBLISH is acknowledged, or the link closed
    assigns_client_id = False  # an empty client id only with a clean session, and none is assigned [MQTT-3.1.3-8]
    subscribe_quota = SUBACK_FAILURE  # a filter past max_subscriptions_per_client (MQTT 3.1.1 3.9.3)
    session_quota = CONNACK_UNAVAILABLE  # a CONNECT past max_persistent_sessions (MQTT 3.1.1 3.2.2.3)
    busy = CONNACK_UNAVAILABLE  # a CONNECT the node cannot look at now (MQTT 3.1.1 3.2.2.3)
    labels: LabelSet = V4
    success_labels: LabelSet = V4  # of an acknowledgement that says success

    def ack_labels(self, code: int) -> LabelSet:
        """Return the metric labels of an acknowledgement with reason ``code``."""
        return self.labels

    def ack_reason(self, reason: int) -> int:
        """The reason an acknowledgement can say for ``reason``: MQTT 3.1.1 has none, it acknowledges as if delivered."""
        return Reason.SUCCESS

    def reason_string(self, text: str) -> tuple:
        """Return the properties telling ``text`` (MQTT 3.1.1 has no properties)."""
        return ()

    def disconnect_labels(self, code: int) -> LabelSet:
        """Return the metric labels of a DISCONNECT received with reason ``code``."""
        return self.labels

    def connect_options(self, client: Connection, props: Mapping[str, Any], config: Config) -> None:
        """Take the client's limits from its CONNECT properties: MQTT 3.1.1 has none."""

    def keepalive(self, asked: int, most: int) -> int | None:
        """Return the keep-alive granted for ``asked`` (``most``: max_keepalive); None: refuse, MQTT 3 cannot be
        told another one."""
        return None if asked > most else asked

    def session_expiry(self, client: Connection, p: Connect) -> int | None:
        """Return how long the session outlives the connection: Clean Session ends it with it (0), else kept (None)."""
        return 0 if p.clean_session else None

    def connack_properties(self, config: Config, client: Connection, p: Connect, assigned_id: str | None) -> tuple:
        """Return the properties of an accepting CONNACK (MQTT 3.1.1 has none)."""
        return ()

    def sub_options(self, qos: int, options: int, identifier: int, bridge: bool) -> SubOptions:
        """Return a granted filter's options: a QoS alone (a bridge's: no echo, Retain As Published)."""
        return BRIDGE_OPTIONS[qos] if bridge else QOS_ONLY[qos]

    def connack(self, present: bool, props: tuple = ()) -> tuple[Connack, LabelSet]:
        """Accept: (CONNACK, its metric labels) [MQTT-3.2.2-2]."""
        return Connack(CONNACK_ACCEPTED, present), (("mqtt_version", "4"), ("return_code", "success"))

    def refusal(self, code: int, text: str = "") -> tuple[Connack, LabelSet]:
        """Refuse with MQTT 3.1.1 return ``code`` (or an MQTT 5 reason): (CONNACK, labels) [MQTT-3.2.2-5]."""
        code = code if code < len(CONNACK_RETURN_NAMES) else CONNACK_NOT_AUTHORIZED
        return Connack(code), (("mqtt_version", "4"), ("return_code", CONNACK_RETURN_NAMES[code]))

    def ack(self, kind: type, pid: int, reason: int = Reason.SUCCESS, text: str = "") -> Any:
        """Return an acknowledgement packet; MQTT 3.1.1 has no reason codes."""
        return kind(pid)

    def subscribe_failure(self, valid: bool) -> int:
        """The SUBACK code of a filter that is invalid (or, ``valid``, refused) (MQTT 3.1.1 3.9.3)."""
        return SUBACK_FAILURE

    def hook_refusal(self, qos: int) -> int:
        """The SUBACK code of an auth_on_subscribe answer outside QoS 0-2: 0x80 (MQTT 3.1.1 3.9.3)."""
        return SUBACK_FAILURE

    def unsuback(self, pid: int, existed: Sequence[bool]) -> Unsuback:
        """Answer UNSUBSCRIBE [MQTT-3.10.4-4]; MQTT 3.1.1 says nothing per filter."""
        return Unsuback(pid)

    def disconnect(self, reason: int, text: str) -> Disconnect | None:
        """Return the server DISCONNECT telling why, or None: before MQTT 5 the server says nothing."""
        return None


class _Mqtt5(Dialect):
    """MQTT 5.0: reason codes and properties."""

    v5 = reason_codes = True
    assigns_client_id = True  # MQTT 5.0 3.1.3.1
    labels, success_labels = V5, V5_SUCCESS
    subscribe_quota = session_quota = Reason.QUOTA_EXCEEDED  # MQTT 5.0 3.9.3, 3.2.2.2
    busy = Reason.SERVER_BUSY  # MQTT 5.0 3.2.2.2

    def ack_labels(self, code: int) -> LabelSet:
        return V5_SUCCESS if not code else reason_labels(code)

    def ack_reason(self, reason: int) -> int:
        return reason

    def reason_string(self, text: str) -> tuple:
        return (("reason_string", text),) if text else ()

    def disconnect_labels(self, code: int) -> LabelSet:
        return reason_labels(code, "normal_disconnect")

    def connect_options(self, client: Connection, props: Mapping[str, Any], config: Config) -> None:
        """Take the client's limits from its CONNECT properties, within the node's settings."""
        receive_max = props.get("receive_maximum", 65535)
        max_packet = props.get("maximum_packet_size")
        if receive_max == 0 or max_packet == 0:
            raise ProtocolError("Receive Maximum or Maximum Packet Size of 0")  # MQTT 5.0 3.1.2.11.3-4
        client.receive_max = min(receive_max, config["receive_max_client"])
        client.receive_max_in = config["receive_max_broker"]
        client.max_packet = max_packet or 0
        client.alias_max = min(props.get("topic_alias_maximum", 0), config["topic_alias_max_client"])
        client.alias_max_in = config["topic_alias_max_broker"]
        if client.alias_max:
            client.aliases_out = {}
        if client.alias_max_in:
            client.aliases_in = {}
        client.plain = not client.alias_max and not client.max_packet
        client.expiry_at_connect = props.get("session_expiry_interval", 0)

    def keepalive(self, asked: int, most: int) -> int | None:
        # over max_keepalive, or 0 where the node has a limit: sent back as Server Keep Alive (MQTT 5.0 3.2.2.3.14)
        return most if asked > most or (not asked and most < 65535) else asked

    def session_expiry(self, client: Connection, p: Connect) -> int | None:
        interval = client.expiry_at_connect
        return None if interval == 0xFFFFFFFF else interval  # MQTT 5.0 3.1.2.11.2

    def connack_properties(self, config: Config, client: Connection, p: Connect, assigned_id: str | None) -> tuple:
        return connack_properties(config, client, p, assigned_id)

    def sub_options(self, qos: int, options: int, identifier: int, bridge: bool) -> SubOptions:
        return SubOptions(qos, bool(options & 4), bool(options & 8), (options >> 4) & 3, identifier)

    def connack(self, present: bool, props: tuple = ()) -> tuple[Connack, LabelSet]:
        return Connack(CONNACK_ACCEPTED, present, props), V5_SUCCESS

    def refusal(self, code: int, text: str = "") -> tuple[Connack, LabelSet]:
        reason = CONNACK_V5_CODES[code] if code < len(CONNACK_V5_CODES) else code
        return Connack(reason, properties=(("reason_string", text),) if text else ()), reason_labels(reason)

    def ack(self, kind: type, pid: int, reason: int = Reason.SUCCESS, text: str = "") -> Any:
        return kind(pid, reason, (("reason_string", text),) if text else ())

    def subscribe_failure(self, valid: bool) -> int:
        return Reason.NOT_AUTHORIZED if valid else Reason.TOPIC_FILTER_INVALID

    def hook_refusal(self, qos: int) -> int:
        # 128 is VerneMQ's "not allowed"; a hook may name an MQTT 5 failure code (0x87, 0x97, ...) itself
        return qos if qos in SUBACK_CODES_5 and qos >= REASON_FAILURE else SUBACK_FAILURE

    def unsuback(self, pid: int, existed: Sequence[bool]) -> Unsuback:
        return Unsuback(pid, tuple(Reason.SUCCESS if e else Reason.NO_SUBSCRIPTION_EXISTED for e in existed))

    def disconnect(self, reason: int, text: str) -> Disconnect | None:
        return Disconnect(reason, (("reason_string", text),) if text else ())


V311, V5_DIALECT = Dialect(), _Mqtt5()
DIALECTS: Mapping[int, Dialect] = types.MappingProxyType({3: V311, 4: V311, 5: V5_DIALECT})


FORWARDED_PROPERTIES = frozenset({"payload_format_indicator", "content_type", "response_topic", "correlation_data",
                                  "user_property"})  # MQTT 5.0 3.3.2.3: passed unaltered to subscribers


def forwarded_properties(props: Iterable[tuple[str, Any]]) -> tuple:
    """Return the properties of a PUBLISH or will that go on to subscribers, in order."""
    return tuple((name, value) for name, value in props if name in FORWARDED_PROPERTIES)


def utf8_payload(payload: bytes) -> bool:
    """Whether a payload is well-formed UTF-8, as Payload Format Indicator 1 promises."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def connack_properties(config: Config, client: Connection, p: Connect, assigned_id: str | None) -> tuple:
    """Return the properties of an accepting MQTT 5 CONNACK: only those that differ from the defaults."""
    props: list[tuple[str, Any]] = []
    if assigned_id is not None:
        props.append(("assigned_client_identifier", assigned_id))  # MQTT 5.0 3.2.2.3.7
    limit = config["persistent_client_expiration"]
    if limit is not None and client.expiry_at_connect > limit:
        props.append(("session_expiry_interval", limit))  # the node keeps it no longer (MQTT 5.0 3.2.2.3.2)
    if client.keepalive != p.keepalive:
        props.append(("server_keep_alive", client.keepalive))  # MQTT 5.0 3.2.2.3.14
    if client.receive_max_in < 65535:
        props.append(("receive_maximum", client.receive_max_in))
    largest = min(n for n in (config["max_message_size"], config["partial_packet_budget"]) if n)
    if largest < MAX_REMAINING_LENGTH:  # a packet over partial_packet_budget is cut off however big max_message_size
        props.append(("maximum_packet_size", largest))
    if client.alias_max_in:
        props.append(("topic_alias_maximum", client.alias_max_in))
    return tuple(props)


def describe_packet(packet: Any, trunc: int = 200) -> str:
    """Return one readable line for a packet, its payload cut to ``trunc`` bytes."""
    kind = type(packet).__name__.upper()
    if isinstance(packet, Publish):
        payload = packet.payload[:trunc]
        more = f" (+{len(packet.payload) - trunc} bytes)" if len(packet.payload) > trunc else ""
        return (f"PUBLISH(q{packet.qos}, r{int(packet.retain)}, d{int(packet.dup)}, m{packet.packet_id or 0}, "
                f"{packet.topic!r}) payload {payload!r}{more}")
    if isinstance(packet, Connect):
        return (f"CONNECT(c: {packet.client_id!r}, v: {packet.proto_level}, u: {packet.username!r}, "
                f"cs: {int(packet.clean_session)}, ka: {packet.keepalive}, will: {packet.will_topic!r})")
    if isinstance(packet, (Subscribe, Unsubscribe, Suback)):
        detail = packet.return_codes if isinstance(packet, Suback) else packet.topics
        return f"{kind}(m{packet.packet_id}, {list(detail)!r})"
    fields = ", ".join(f"{f.name}: {getattr(packet, f.name)!r}" for f in dataclasses.fields(packet))
    return f"{kind}({fields})"


###############################################################################
# 13. Policy: passwords, ACL rules and the hook chain #########################
###############################################################################
# Owns: vmq_passwd and vmq_acl decisions on rules they are given, and calling
#       plugin hooks in order.
# Must not know: files (the I/O shell reads and reloads them), sockets, clocks.

def check_password(password: bytes, stored: str) -> bool:
    """Check a password against a vmq_passwd hash in constant time."""
    try:
        _, kind, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.sha512(password + base64.b64decode(salt)).digest()
    except (ValueError, binascii.Error):
        return False
    return kind == "6" and hmac.compare_digest(actual, expected)


def parse_passwd(text: str) -> dict[str, str]:
    """Parse a vmq_passwd file: ``user:$6$salt$hash`` lines."""
    users = {}
    for line in text.split("\n"):
        line = line.rstrip("\r")  # a file written on Windows means the same
        if not line:
            continue
        user, sep, stored = line.partition(":")
        if not sep or stored.count("$") != 3:
            raise ValueError(f"bad password line for user {user!r}")
        users[user] = stored
    return users


@dataclass(frozen=True, slots=True)
class AclRules:
    """vmq_acl rules: topics for all, per user, and patterns with %u %c %m."""

    everyone: tuple[tuple[str, str], ...] = ()
    users: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    patterns: tuple[tuple[str, str], ...] = ()


def parse_acl(text: str) -> AclRules:
    """Parse a vmq_acl file (``topic [read|write] T``, ``user U``, ``pattern [read|write] T``).

    Any line that is not one of these raises ValueError naming the line: a rule
    file read half is a rule file that grants what its author did not write.
    """
    everyone, users, patterns, user = [], {}, [], None
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")  # a file written on Windows means the same
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        rest = rest.lstrip(" \t")
        if word == "user":
            user = rest.strip(" \t")
            users.setdefault(user, [])
            continue
        if word not in ("topic", "pattern"):
            raise ValueError(f"line {number}: expected topic, user or pattern")
        access, _, topic = rest.partition(" ")
        topic = topic.lstrip(" \t")
        if access not in ("read", "write"):
            access, topic = "readwrite", rest
        topic = topic.strip(" \t")
        if not valid_topic_filter(topic):
            raise ValueError(f"line {number}: invalid topic filter {topic!r}")
        target = patterns if word == "pattern" else (users[user] if user is not None else everyone)
        target.append((access, topic))
    return AclRules(tuple(everyone), {u: tuple(r) for u, r in users.items()}, tuple(patterns))


def filter_covers(granted: str, wanted: str) -> bool:
    """Tell whether every topic ``wanted`` (a name or a filter) matches is matched by ``granted``.

    For a topic name this is ``topic_matches``; for a filter it is filter
    inclusion, so ``sensors/+`` does not cover ``sensors/#``. A leading wildcard
    matches no ``$`` topic [MQTT-4.7.2-1], so ``#`` does not cover ``$SYS/x``.
    """
    g, w = granted.split("/"), wanted.split("/")
    for n, level in enumerate(g):
        if level == "#":  # also matches the parent level [MQTT-4.7.1-2], as a wanted "#" does
            return n > 0 or not w[0].startswith("$")
        if n >= len(w) or w[n] == "#" or (level != w[n] and level != "+"):
            return False
        if n == 0 and level == "+" and w[0].startswith("$"):
            return False  # [MQTT-4.7.2-1]
    return len(g) == len(w)


ACL_WARNED_MAX = 10_000  # clients remembered as already warned about, before the memory starts over
ACL_ID_WILDCARDS = ("+", "#", "/")  # mosquitto CVE-2017-7650: an id with these would widen a pattern


def acl_unsafe_id(user: str | None, client_id: str) -> str:
    """Return why patterns with ``%u``/``%c`` cannot apply to this client ('' when they can)."""
    for name, value in (("client id", client_id), ("user name", user)):
        bad = [c for c in ACL_ID_WILDCARDS if value is not None and c in value]
        if bad:
            return f"its {name} {value!r} contains {' '.join(bad)}"
    return ""


def acl_allows(rules: AclRules, access: str, topic: str, user: str | None, client_id: str,
               mountpoint: str) -> bool:
    """Check all-users rules, then the user's, then patterns (whole-level %u %c %m).

    ``topic`` is a topic name (write) or a subscription filter (read): a filter
    must be covered by one granted filter. A pattern never applies through a
    substituted id holding ``+``, ``#`` or ``/``.
    """
    def hit(entries):
        return any(a in (access, "readwrite") and filter_covers(t, topic) for a, t in entries)
    if hit(rules.everyone) or (user is not None and hit(rules.users.get(user, ()))):
        return True
    subst = {"%u": user, "%c": client_id, "%m": mountpoint}
    unsafe = {"%u": user, "%c": client_id}
    for a, pattern in rules.patterns:
        if a not in (access, "readwrite"):
            continue
        levels = pattern.split("/")
        if any(unsafe.get(level) is not None and any(c in unsafe[level] for c in ACL_ID_WILDCARDS)
               for level in levels):
            continue  # the substituted id would be a wildcard or reach into another level
        levels = [subst.get(level, level) for level in levels]
        if None not in levels and filter_covers("/".join(levels), topic):
            return True
    return False


HOOK_NAMES = (  # VerneMQ's plugin hooks (README, "Embedding")
    "auth_on_register", "auth_on_publish", "auth_on_subscribe", "on_register", "on_publish", "on_subscribe",
    "on_unsubscribe", "on_deliver", "on_client_offline", "on_client_gone", "on_offline_message",
    "on_client_wakeup", "on_auth_m5",
)
BUILTIN_PLUGINS = {  # plugin -> ((hook, arity), ...) as plugin show lists them
    "vmq_passwd": (("auth_on_register", 5),),
    "vmq_acl": (("auth_on_publish", 6), ("auth_on_subscribe", 3)),
}


def _mfa(fn: Callable[..., Any]) -> str:
    try:
        arity = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        arity = 0
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}/{arity}"


def auth_plugin_configured(hooks: Any, config: Config) -> bool:
    """Whether an authentication plugin is asked at CONNECT: an auth_on_register hook (a Python one, or
    a webhook on auth_on_register or auth_on_register_m5), or vmq_passwd with a password file."""
    return bool(hooks.auth_on_register) or bool(hooks.builtin["vmq_passwd"] and config["vmq_passwd.password_file"])


def anonymous_allowed(config: Config, loopback_only: bool, hooks: Any) -> bool:
    """Whether allow_anonymous lets clients in before any auth plugin is asked (VerneMQ's meaning, when set).

    Unset, it is on only while every MQTT listener is on loopback and no authentication plugin is
    configured: a plugin the operator configured is always asked (README, "Security").
    """
    anonymous = config["allow_anonymous"]
    if anonymous is None:
        return loopback_only and not auth_plugin_configured(hooks, config)
    return anonymous


def run_auth_hooks(hooks: tuple[Callable[..., Any], ...], *args: Any) -> Any:
    """Ask hooks in order; return the first answer that is not ``next`` (None when all said next).

    A hook that raises refuses: its exception is logged and the answer is ``error``.
    """
    for fn in hooks:
        try:
            answer = fn(*args)
        except Exception:
            log.exception("plugin hook %s failed; refusing", _mfa(fn))
            return "error"
        if answer is not None and answer != "next":
            return "ok" if answer is True else "error" if answer is False else answer
    return None


def notify(hooks: tuple[Callable[..., Any], ...], *args: Any) -> None:
    """Call notification hooks; an exception is logged and does not stop the broker."""
    for fn in hooks:
        try:
            fn(*args)
        except Exception:
            log.exception("plugin hook %s failed", _mfa(fn))


###############################################################################
# 14. Routing and retained messages ###########################################
###############################################################################
# Owns: who wants a topic (the subscription tries and shared groups of every
#       mountpoint) and the retained messages, with their limits.
# Must not know: queues, connections, packets, the message store.

@dataclass(frozen=True, slots=True)
class RemoteNode:
    """Another node of the cluster as ``Router.match`` names it: some of its sessions want the topic."""

    name: str


SHARE_POLICY_TIERS: Mapping[str, tuple[tuple[str, ...], ...]] = types.MappingProxyType({
    # shared_subscription_policy -> the pools tried in turn; the first that is not empty gives the member
    "prefer_local": (("local_online",), ("local",), ("remote_online",), ("remote",)),
    "local_only": (("local_online",), ("local",)),
    "random": (("local_online", "remote_online"), ("local", "remote")),  # online members first, as one node did
    "prefer_online_before_local": (("local_online",), ("remote_online",), ("local",), ("remote",)),
})
_POOL_PARTS = {"local_online": (True, True), "local": (True, False),  # part -> (local members?, online only?)
               "remote_online": (False, True), "remote": (False, False)}


class MemberPool:
    """Local member sessions, then each remote node once per member it counts: what ``choose`` picks from.

    A node with a thousand members is one entry, not a thousand: the pool is never spelled out.
    """

    __slots__ = ("local", "remote", "size")

    def __init__(self, local: list, remote: list[tuple[str, int]]):
        self.local, self.remote = local, remote
        self.size = len(local) + sum(n for _, n in remote)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Any:
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(i)
        if i < len(self.local):
            return self.local[i]
        i -= len(self.local)
        for node, count in self.remote:
            if i < count:
                return node
            i -= count
        raise IndexError(i)


class SharedGroup:
    """The members of one ``$share/<group>/<filter>``; the trie sees the group as one subscriber.

    ``members``: local sessions; ``remote``: node name -> (members, online) there.
    """

    __slots__ = ("name", "label", "members", "remote")

    def __init__(self, name: str, topic_filter: str = ""):
        self.name, self.label = name, f"{name}/{topic_filter}"  # label: how a forward names the group
        self.members: dict[Session, SubOptions] = {}
        self.remote: dict[str, tuple[int, int]] = {}

    def pick(self, choose: Callable[[Sequence[Any]], Any], policy: str = "prefer_local") -> Session | str | None:
        """Choose who gets a message: a local member session, or the name of a node that picks one of its own.

        ``policy`` is shared_subscription_policy (SHARE_POLICY_TIERS); None: nobody may take it.
        """
        for tier in SHARE_POLICY_TIERS[policy]:
            local: list = []
            remote: list[tuple[str, int]] = []
            for part in tier:
                is_local, online = _POOL_PARTS[part]
                if is_local:
                    local = [m for m in self.members if not online or m.client is not None]
                else:  # counts[1]: online members there, counts[0]: all of them
                    remote = [(node, counts[online]) for node, counts in self.remote.items() if counts[online]]
            if remote:
                return choose(MemberPool(local, remote))
            if local:
                return choose(local)
        return None

    @property
    def empty(self) -> bool:
        """Whether no node has a member left."""
        return not self.members and not self.remote


MATCH_CACHE_MAX = 10_000  # (mountpoint, topic) answers remembered between subscription changes
MATCH_CACHE_TOPIC = 256  # characters: longer topics are matched afresh, so the cache holds at most about 2.5 MB


class Router:
    """Subscriptions and retained messages by mountpoint; ``match`` answers who wants a topic.

    The seam to the rest of a cluster: a message's recipients come from one ``match``, other
    nodes among them (``RemoteNode``, from ``set_remote``). ``choose`` picks a shared group's
    member (the I/O shell hands in its randomness).
    """

    def __init__(self, choose: Callable[[Sequence[Any]], Any]):
        self.choose = choose
        self.tries: dict[str, TopicTrie] = collections.defaultdict(TopicTrie)
        self.groups: dict[tuple[str, str, str], SharedGroup] = {}  # (mountpoint, group, filter)
        self.retained: dict[str, RetainTree] = collections.defaultdict(RetainTree)
        self.retained_bytes = 0  # of every retained message together (max_retained_bytes)
        self.cache: dict[tuple[str, str], dict] = {}  # match's answers, read directly on the hot path
        self.remote: dict[str, dict[tuple[str, str], tuple[int, int]]] = {}  # node -> (mp, filter) -> counts
        self.nodes: dict[str, RemoteNode] = {}  # one RemoteNode per node with interest, as the tries hold it

    # -- subscriptions ----------------------------------------------------
    def add(self, session: Session, topic_filter: str, opts: SubOptions) -> None:
        """Route ``topic_filter`` to ``session``; a shared one joins its group, which the trie holds once."""
        group, plain = split_shared(topic_filter)
        if group is None:
            self.tries[session.mountpoint].add(topic_filter, session, opts)
        else:
            self.group(session.mountpoint, group, plain).members[session] = opts
        self.cache.clear()

    def group(self, mountpoint: str, group: str, topic_filter: str) -> SharedGroup:
        """Return the shared group of ``$share/<group>/<topic_filter>``, made (and routed) if new."""
        key = (mountpoint, group, topic_filter)
        shared = self.groups.get(key)
        if shared is None:
            shared = self.groups[key] = SharedGroup(group, topic_filter)
            self.tries[mountpoint].add(topic_filter, shared, QOS_ONLY[2])
        return shared

    def prune(self, mountpoint: str, group: str, topic_filter: str) -> None:
        """Forget a shared group no node has members of any more."""
        key = (mountpoint, group, topic_filter)
        shared = self.groups.get(key)
        if shared is not None and shared.empty:
            del self.groups[key]
            self.tries[mountpoint].remove(topic_filter, shared)

    def remove(self, session: Session, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` to ``session``."""
        group, plain = split_shared(topic_filter)
        trie = self.tries[session.mountpoint]
        self.cache.clear()
        if group is None:
            trie.remove(topic_filter, session)
            return
        shared = self.groups.get((session.mountpoint, group, plain))
        if shared is not None:
            shared.members.pop(session, None)
            self.prune(session.mountpoint, group, plain)

    # -- other nodes' interest ------------------------------------------------
    def set_remote(self, node: str, mountpoint: str, topic_filter: str, members: int, online: int) -> None:
        """Say how many sessions on ``node`` hold ``topic_filter`` (0: none) and how many are online.

        Idempotent: the cluster calls it again with recounted numbers. A shared filter's counts
        feed its group's shared_subscription_policy; a plain one makes ``match`` name the node.
        """
        if not valid_subscription(topic_filter) or not 0 <= online <= members:
            raise ClusterError(f"bad remote interest of {node}: {topic_filter!r} {members}/{online}")
        interest = self.remote.get(node, {})
        key, counts = (mountpoint, topic_filter), ((members, online) if members else None)
        if interest.get(key) == counts:
            return
        group, plain = split_shared(topic_filter)
        if group is not None:
            shared = self.group(mountpoint, group, plain)
            if counts is None:
                shared.remote.pop(node, None)
                self.prune(mountpoint, group, plain)
            else:
                shared.remote[node] = counts
        elif counts is None:
            self.tries[mountpoint].remove(topic_filter, self.nodes[node])
        elif key not in interest:
            self.tries[mountpoint].add(topic_filter, self.nodes.setdefault(node, RemoteNode(node)), QOS_ONLY[2])
        if counts is None:
            del interest[key]
        else:
            interest[key] = counts
        if interest:
            self.remote[node] = interest
        else:
            self.remote.pop(node, None)
            self.nodes.pop(node, None)
        self.cache.clear()

    def drop_remote(self, node: str) -> None:
        """Forget every filter ``node`` wanted (it left the cluster, or its interest is sent again)."""
        for mountpoint, topic_filter in list(self.remote.get(node, ())):
            self.set_remote(node, mountpoint, topic_filter, 0, 0)

    def match(self, mountpoint: str, topic: str) -> dict[Any, SubOptions]:
        """Return who wants ``topic``: each session, shared group or other node (``RemoteNode``), with options.

        A node is named once, whatever number of its filters match; a session has its best options.
        """
        key = (mountpoint, topic)
        matches = self.cache.get(key)
        if matches is None:
            matches = self.tries[mountpoint].match(topic)
            if len(topic) <= MATCH_CACHE_TOPIC:
                if len(self.cache) >= MATCH_CACHE_MAX:
                    self.cache.clear()
                self.cache[key] = matches
        return matches

    def subscription_count(self) -> int:
        """Return how many subscriptions the tries hold (a shared group, and another node's filter, count once)."""
        return sum(t.count for t in list(self.tries.values()))

    # -- retained messages -------------------------------------------------
    def retain(self, mountpoint: str, msg: Message, max_count: int, max_bytes: int) -> bool | None:
        """Keep, replace or (empty payload) delete a retained message [MQTT-3.3.1-5..11].

        Return True when kept, None when deleted, and False when a new topic (or a bigger
        message) would pass ``max_count`` or ``max_bytes`` (-1: no limit): it is refused.
        Replacing by a message no bigger, and deleting, are always allowed.
        """
        if not msg.payload:
            self.unretain(mountpoint, msg.topic)
            return None
        table = self.retained[mountpoint]
        old = table.get(msg.topic)
        grow = message_bytes(msg) - (message_bytes(old) if old is not None else 0)
        full = old is None and 0 <= max_count <= self.retained_count()
        if full or (grow > 0 and 0 <= max_bytes < self.retained_bytes + grow):
            return False
        table[msg.topic] = msg
        self.retained_bytes += grow
        return True

    def unretain(self, mountpoint: str, topic: str) -> Message | None:
        """Delete one retained message; return it (None when there was none)."""
        old = self.retained[mountpoint].pop(topic, None)
        if old is not None:
            self.retained_bytes -= message_bytes(old)
        return old

    def restore_retained(self, mountpoint: str, msg: Message) -> None:
        """Put back a retained message read from the store at start."""
        self.retained[mountpoint][msg.topic] = msg
        self.retained_bytes += message_bytes(msg)

    def retained_count(self) -> int:
        """Return how many retained messages every mountpoint holds together."""
        return sum(len(r) for r in list(self.retained.values()))

    def retained_walk(self, mountpoint: str, topic_filter: str) -> Iterator[tuple[str, Any]]:
        """Walk the retained messages a new subscription to ``topic_filter`` gets (``RetainTree.walk``)."""
        return self.retained[mountpoint].walk(topic_filter)

    def retained_rows(self, mountpoint: str | None = None) -> list[dict]:
        """Return (mountpoint, topic, payload) of each retained message."""
        return [{"mountpoint": mp, "topic": t, "payload": m.payload.decode("utf-8", "replace")}
                for mp, table in sorted(self.retained.items()) if mountpoint in (None, mp)
                for t, m in table.items()]

    def expired_retained(self, now: float) -> list[tuple[str, str]]:
        """Return (mountpoint, topic) of every retained message whose MQTT 5 expiry has passed."""
        return [(mp, t) for mp, table in list(self.retained.items()) for t, m in table.items()
                if m.expires is not None and m.expires <= now]


###############################################################################
# 15. Delivery: queues, in-flight windows, packet ids, resends ################
###############################################################################
# Owns: getting a routed message to each session: the QoS 0 fast path, bounded
#       queues (in memory and in the store), windows, packet ids, one resend path,
#       and what goes into each connection's outbox; the interfaces the engine's
#       parts are built with (the message store, the cluster's seam, the context).
# Must not know: sockets, clocks (``now`` is set by the engine's entry points),
#       other nodes (only through ``ClusterSeam``).

class Store(Protocol):
    """What the engine asks of its message store (``MemoryStore``, ``SqliteStore``).

    ``error``: why the store cannot write (None: it can); the engine then refuses QoS 1/2.
    """

    error: str | None

    def load_queue(self, mountpoint: str, client_id: str, after: int) -> list:
        """Return the next page of a session's queued messages: (msg, qos, row, extra) after row ``after``."""

    def load_inflight(self, mountpoint: str, client_id: str) -> list:
        """Return the QoS 2 messages in flight when the node stopped: (msg, qos, row, pid, released, extra)."""

    def add_message(self, mountpoint: str, client_id: str, msg: Message, qos: int, extra: Any = None) -> int:
        """Keep a queued message; return its row."""

    def delete_message(self, row: int) -> None:
        """Forget a queued message."""

    def mark_sent(self, row: int, pid: int) -> None:
        """Note the packet id a stored QoS 2 message went out with."""

    def mark_released(self, row: int) -> None:
        """Note that a stored QoS 2 message's PUBREL went out."""

    def put_retained(self, mountpoint: str, msg: Message) -> None:
        """Keep a retained message."""

    def delete_retained(self, mountpoint: str, topic: str) -> None:
        """Forget a retained message."""

    def put_session(self, mountpoint: str, client_id: str, expiry: int | None = None, new: bool = False) -> None:
        """Keep a persistent session (``new``: one just made, whose row may wait for the next write)."""

    def delete_session(self, mountpoint: str, client_id: str) -> None:
        """Forget a session with its subscriptions and messages."""

    def put_subscription(self, mountpoint: str, client_id: str, topic_filter: str, qos: int) -> None:
        """Keep a subscription (``qos``: ``SubOptions.packed()``)."""

    def delete_subscription(self, mountpoint: str, client_id: str, topic_filter: str) -> None:
        """Forget a subscription."""

    def put_dropped(self, mountpoint: str, client_id: str, count: int) -> None:
        """Keep how many messages a bridge's session dropped."""


class ClusterSeam(Protocol):
    """What the core asks of the cluster, besides the router: the one small interface to other nodes.

    ``NO_CLUSTER`` answers for a node on its own; for a member of a cluster, the cluster's
    ``Peers``, handed to ``Engine.join_cluster``.
    """

    netsplit: str  # why the cluster is split ('' when whole): registers, publishes, (un)subscribes may be refused
    full_nodes: Collection[str]  # nodes with too much unacknowledged: QoS 1/2 for them is refused

    def forwards_to_full(self, mountpoint: str, topic: str) -> bool:
        """Whether a message on ``topic`` would go to one of ``full_nodes``."""

    def forward(self, mountpoint: str, msg: Message, nodes: Mapping[str, list]) -> None:
        """Pass a routed message on: node -> [its plain subscribers want it, ["group/filter", ...] it serves]."""

    def session_changed(self, key: tuple[str, str]) -> None:
        """A session was made, ended, (un)subscribed, or went on or off line."""

    def retained_changed(self, mountpoint: str, topic: str) -> None:
        """A client or command changed the retained message of ``topic``."""

    def claim(self, key: tuple[str, str], clean_start: bool) -> Any:
        """Before a CONNECT is accepted: find the session on another node (None: not elsewhere)."""

    def release(self, claim: Any) -> None:
        """The CONNECT was refused after ``claim``: the session stays on its node."""

    def took_over(self, claim: Any) -> None:
        """The CONNECT was accepted after ``claim``: the session moves here."""


class _NoCluster:
    """The cluster's seam of a node on its own: never split, nobody to forward to, nothing to record."""

    __slots__ = ()
    netsplit = ""
    full_nodes: Collection[str] = frozenset()

    def forwards_to_full(self, mountpoint: str, topic: str) -> bool:
        """Nothing goes to another node."""
        return False

    def forward(self, mountpoint: str, msg: Message, nodes: Mapping[str, list]) -> None:
        """No other node."""

    def session_changed(self, key: tuple[str, str]) -> None:
        """Nobody to tell."""

    def retained_changed(self, mountpoint: str, topic: str) -> None:
        """Nobody to tell."""

    def claim(self, key: tuple[str, str], clean_start: bool) -> Any:
        """No session is elsewhere."""
        return None

    def release(self, claim: Any) -> None:
        """Nothing was claimed."""

    took_over = release


NO_CLUSTER: ClusterSeam = _NoCluster()


class Context:
    """What every part of the engine reads: the settings in force, cached for the hot path, and ``now``.

    ``settings()`` returns the Config in force, so ``set`` takes effect at once (``refresh``);
    the engine sets ``now`` at each entry point (the core reads no clock).
    """

    def __init__(self, settings: Callable[[], Config], now: float = 0.0):
        self.settings, self.now = settings, now
        self.config: Config | None = None
        self.refresh()

    def refresh(self) -> Config:
        """Read the Config in force; cache the values the hot path needs when it changed."""
        config = self.settings()
        if config is not self.config:
            self.config = config
            self.upgrade_qos = config["upgrade_outgoing_qos"]
            self.max_inflight = config["max_inflight_messages"]
            self.max_online = config["max_online_messages"]
            self.max_offline = config["max_offline_messages"]
            self.max_online_bytes = config["max_online_bytes"]
            self.max_offline_bytes = config["max_offline_bytes"]
            self.max_queued_bytes = config["max_queued_bytes"]
            self.max_retained = config["max_retained_messages"]
            self.max_retained_bytes = config["max_retained_bytes"]
            self.acl_file = config["vmq_acl.acl_file"]
            self.max_rate = config["max_message_rate"]
            self.max_levels = config["max_topic_levels"]
            self.share_policy = config["shared_subscription_policy"]
            self.publish_in_netsplit = config["allow_publish_during_netsplit"]
            self.max_subs = config["max_subscriptions_per_client"]
            self.max_subs_total = config["max_subscriptions_total"]
            self.max_persistent = config["max_persistent_sessions"]
            self.packet_limits = Limits(config["max_properties_per_packet"], self.max_subs)
        return config


class Handout:
    """The retained messages a new subscription has still to get: a lazy walk of the retained trie.

    ``sent``: the topics handed out already, by the walk or ahead of a live message on the same
    topic (the older retained message must not follow it, MQTT 5.0 4.6.0; nor come twice).
    """

    __slots__ = ("topic_filter", "opts", "walk", "sent")

    def __init__(self, topic_filter: str, opts: SubOptions, walk: Iterator[tuple[str, Any]]):
        self.topic_filter, self.opts, self.walk = topic_filter, opts, walk
        self.sent: set[str] = set()


def _first(item: tuple) -> Any:
    return item[0]


def add_forward(fwd: dict[str, list] | None, node: str, group: str | None) -> dict[str, list]:
    """Note that ``node`` gets this message: for its plain subscribers (``group`` None) or for a shared group."""
    if fwd is None:
        fwd = {}
    entry = fwd.get(node)
    if entry is None:
        entry = fwd[node] = [False, []]
    if group is None:
        entry[0] = True
    else:
        entry[1].append(group)
    return fwd


QUEUE_BOUNDS = {  # online (None: a bridge's buffer) -> the settings that bound its queue: (messages, bytes)
    True: ("max_online_messages", "max_online_bytes"), False: ("max_offline_messages", "max_offline_bytes"),
    None: ("max_outgoing_buffered_messages", "max_outgoing_buffered_bytes")}


class Output:
    """The engine's output: frames left in each connection's outbox, and the encoding of PUBLISH.

    ``dirty``: the connections with output since the I/O shell last took it (``take_dirty``).
    """

    def __init__(self, ctx: Context, counters: dict[tuple, int], hooks: Any, store: Store):
        self.ctx, self.counters, self.hooks, self.store = ctx, counters, hooks, store
        self.dirty: list[Connection] = []

    def emit(self, conn: Connection, data: bytes) -> None:
        """Leave bytes in a connection's outbox; nothing is written once it is closed."""
        if conn.closed:
            return
        out = conn.out
        if not out:  # (a connection asked to close is listed already; twice is harmless)
            self.dirty.append(conn)
        out.append(data)
        conn.out_bytes += len(data)

    def fits(self, conn: Connection, size: int) -> bool:
        """Whether ``size`` more bytes may go to a connection now: its socket takes more, its outbox has room."""
        limit = self.ctx.max_online_bytes
        return conn.writable and (limit < 0 or conn.out_bytes + size <= limit)

    def emit_packet(self, conn: Connection, packet: Any) -> bool:
        """Encode a packet in the connection's protocol version and leave it in its outbox.

        Over an MQTT 5 client's Maximum Packet Size, the Reason String and User Properties go
        first (MQTT 5.0 3.1.2.11.4, [MQTT-3.14.2-3]); a packet that still does not fit is not sent
        [MQTT-3.1.2-24]. Return whether it was.
        """
        frame = encode_packet(packet, conn.proto)
        if conn.max_packet and len(frame) > conn.max_packet:
            props = getattr(packet, "properties", ())
            kept = tuple(p for p in props if p[0] not in ("reason_string", "user_property"))
            if kept != props:
                frame = encode_packet(dataclasses.replace(packet, properties=kept), conn.proto)
            if len(frame) > conn.max_packet:
                log.info("not sending %s of %d bytes: over the client's Maximum Packet Size %d",
                         type(packet).__name__.upper(), len(frame), conn.max_packet)
                return False
        self.emit(conn, frame)
        return True

    def request_close(self, conn: Connection) -> None:
        """Ask the I/O shell to close the connection once its outbox is sent."""
        if not conn.out and not conn.closing:
            self.dirty.append(conn)
        conn.closing = True

    def take_dirty(self) -> list[Connection]:
        """Return (and forget) the connections with output to send, a close or a pause."""
        dirty, self.dirty = self.dirty, []
        return dirty

    # -- encoding ---------------------------------------------------------
    def send_publish(self, client: Connection, out: Outgoing, pid: int | None, dup: bool = False) -> None:
        """Leave one PUBLISH of ``out`` in the client's outbox, in its protocol version.

        A message larger than an MQTT 5 client's Maximum Packet Size is dropped as if
        delivered [MQTT-3.1.2-25].
        """
        msg = out.msg
        if client.proto == 5:
            retain = out.retain
            frame = self.publish_frame5(client, msg, out.qos, pid, dup, retain, out.ids)
            if client.max_packet and len(frame) > client.max_packet:
                self.counters["queue_message_drop", ()] += 1
                dropped = client.session.inflight.pop(pid, None) if pid is not None else None
                if dropped is not None and dropped.row:  # forgotten, its row in the store too
                    self.store.delete_message(dropped.row)
                return
            self.emit(client, frame)
            self.counters["mqtt_publish_sent", V5] += 1
        else:  # MQTT 3.1.1 sets retain only for a retained message of a new subscription [MQTT-3.3.1-8..9]
            retain = out.retain if client.bridge else out.retained  # a bridge's: Retain As Published
            self.emit(client, encode_publish_header(_str(msg.topic), len(msg.payload), out.qos, retain, dup,
                                                    pid) + msg.payload)
            self.counters["mqtt_publish_sent", V4] += 1
        if self.hooks.on_deliver:
            notify(self.hooks.on_deliver, client.user, client.session.key, msg.topic, msg.payload)

    def publish_frame5(self, client: Connection, msg: Message, qos: int, pid: int | None, dup: bool,
                       retain: bool, ids: tuple = ()) -> bytes:
        """Encode an MQTT 5 PUBLISH: the message's properties, its remaining expiry, ids, a topic alias."""
        topic, alias, new_alias = msg.topic, 0, False
        if client.alias_max:  # MQTT 5.0 3.3.2.3.4: the node picks its aliases
            alias = client.aliases_out.get(topic, 0)
            if alias:
                topic = ""
            elif len(client.aliases_out) < client.alias_max:
                alias = client.aliases_out[topic] = len(client.aliases_out) + 1
                new_alias = True
        frame = self.encode5(msg, topic, alias, qos, pid, dup, retain, ids)
        if new_alias and client.max_packet and len(frame) > client.max_packet:
            del client.aliases_out[msg.topic]  # this frame will be dropped: the client never learns the alias
        return frame

    def encode5(self, msg: Message, topic: str, alias: int, qos: int, pid: int | None, dup: bool, retain: bool,
                ids: tuple) -> bytes:
        """Encode an MQTT 5 PUBLISH of ``msg`` under ``topic`` (or a topic ``alias``) with its properties."""
        props = msg.props
        if msg.expires is not None or alias or ids:
            extra = [("subscription_identifier", i) for i in ids]
            if msg.expires is not None:
                extra.append(("message_expiry_interval", max(0, math.ceil(msg.expires - self.ctx.now))))
            if alias:
                extra.append(("topic_alias", alias))
            props = props + tuple(extra)
        if not props:  # the common case: an empty property list is one zero byte
            return encode_publish_header(_str(topic), len(msg.payload) + 1, qos, retain, dup, pid) + b"\x00" \
                + msg.payload
        return encode_packet(Publish(topic, msg.payload, qos, retain, dup, pid, props), 5)


class Delivery:
    """Getting routed messages to sessions: the QoS 0 fast path, queues, in-flight windows, resends,
    retained messages (kept, and handed out to new subscriptions).

    Built with what it uses: the context, the output, the router, the message store, the hooks,
    the counters and the sessions by key; ``seam`` is the cluster's (``NO_CLUSTER`` on its own).
    """

    def __init__(self, ctx: Context, output: Output, router: Router, store: Store, hooks: Any,
                 counters: dict[tuple, int], sessions: dict[tuple[str, str], Session]):
        self.ctx, self.output, self.router, self.store, self.hooks = ctx, output, router, store, hooks
        self.counters, self.sessions = counters, sessions
        self.seam: ClusterSeam = NO_CLUSTER
        self.emit, self.emit_packet, self.fits = output.emit, output.emit_packet, output.fits  # bound once: hot
        self.send_publish = output.send_publish
        self.queued_bytes = 0  # of every session's queue together (max_queued_bytes)
        self.unsent_bytes = 0  # the I/O shell's: bytes sent to peers that do not read, still in their transports
        self.shared: dict[int, list] = {}  # id of a large queued message -> [it, queues holding it]
        self.big_waiters: dict[Session, None] = {}  # sessions whose large message waits for outbox room
        # sessions still getting retained messages for new subscriptions, oldest first (``hand_out``)
        self.handouts: dict[Session, list[Handout]] = {}
        self.relays: dict[tuple[str, str], Session] = {}  # the bridges' own sessions (vmq_bridge), by key
        self.drops_unsaved: dict[Session, None] = {}  # bridge sessions that dropped since the last save_drops

    # -- routing ------------------------------------------------------------
    def route(self, mountpoint: str, msg: Message, forward: bool = True) -> int:
        """Deliver ``msg`` to everyone the router names; return how many matched.

        QoS 0 to a plain subscriber that keeps up goes out at once, one encoding per
        protocol version shared by all of them; everything else goes through the queue.
        Other nodes (wanting it, or picked for a shared group) get one forward each through
        the cluster's seam; ``forward`` False (a message another node forwarded): local
        subscribers only, and no shared group (the publisher's node picked their members).
        """
        router, ctx = self.router, self.ctx
        matches = router.cache.get((mountpoint, msg.topic)) or router.match(mountpoint, msg.topic)
        counters = self.counters
        if not matches:
            counters["queue_message_unhandled", ()] += 1
            return 0
        upgrade, frame4, frame5, direct4, direct5 = ctx.upgrade_qos, None, None, 0, 0
        on_deliver, size, limit = self.hooks.on_deliver, len(msg.payload) + len(msg.topic), ctx.max_online_bytes
        dirty, nodes, fwd, handouts = self.output.dirty, 0, None, self.handouts
        for session, opts in matches.items():
            if type(session) is not Session:  # another node, or a shared group
                member = self.pick_member(session, forward)
                if type(member) is not Session:  # a node's name (it picks a group's member itself), or nobody
                    nodes += type(session) is RemoteNode
                    if member is not None:
                        fwd = add_forward(fwd, member, None if type(session) is RemoteNode else session.label)
                    continue
                session, opts = member, session.members[member]
                if not opts.plain:  # MQTT 5 options: this member's own
                    self.deliver(session, msg, opts.qos, opts.retain_as_published, opts.ids)
                    continue
            elif not opts.plain:  # some matching filter of this session has MQTT 5 options
                self.deliver_matching(session, msg)
                continue
            if handouts and session in handouts:
                self.retained_first(session, msg)
            qos = opts.qos if upgrade else min(msg.qos, opts.qos)
            client = session.client
            if qos == 0 and client is not None and client.writable and not session.queue and not session.stored \
                    and (limit < 0 or client.out_bytes + size <= limit):  # else queued behind what waits, or dropped
                if not client.plain:  # MQTT 5 topic aliases or a packet size limit: its own encoding
                    self.deliver(session, msg, 0, False, ())
                    continue
                if client.proto == 5:
                    if frame5 is None:
                        frame5 = msg.frame if msg.frame and msg.frame5 else self.output.encode5(
                            msg, msg.topic, 0, 0, None, False, False, ())
                    frame = frame5
                    direct5 += 1
                else:
                    if frame4 is None:
                        frame4 = msg.frame if msg.frame and not msg.frame5 else encode_publish_header(
                            _str(msg.topic), len(msg.payload), 0, False, False, None) + msg.payload
                    frame = frame4
                    direct4 += 1
                out = client.out  # emit, inlined: the hot loop; an online session's connection is never closed
                if not out:
                    dirty.append(client)
                out.append(frame)
                client.out_bytes += len(frame)
                if on_deliver:
                    notify(on_deliver, client.user, session.key, msg.topic, msg.payload)
            else:
                self.enqueue(session, Outgoing(msg, qos))
        counters["router_matches_local", ()] += len(matches) - nodes
        if fwd is not None:
            counters["router_matches_remote", ()] += len(fwd)
            self.seam.forward(mountpoint, msg, fwd)
        if direct4 or direct5:
            if direct4:
                counters["mqtt_publish_sent", V4] += direct4
            if direct5:
                counters["mqtt_publish_sent", V5] += direct5
            counters["queue_message_in", ()] += direct4 + direct5
            counters["queue_message_out", ()] += direct4 + direct5
        return len(matches)

    def pick_member(self, entry: RemoteNode | SharedGroup, forward: bool) -> Session | str | None:
        """Return who takes a message for a router entry other than a session: a node's name, a member, or None."""
        if not forward:
            return None  # a forwarded message: no other node, and the publisher's node picked group members
        if type(entry) is RemoteNode:
            return entry.name
        return entry.pick(self.router.choose, self.ctx.share_policy)

    def deliver_matching(self, session: Session, msg: Message) -> None:
        """Deliver to a session whose matching filters carry MQTT 5 options: highest QoS, every subscription id."""
        qos, rap, ids = -1, False, []
        for topic_filter, opts in session.subs.items():
            if (opts.no_local and msg.origin == session.client_id) or topic_filter.startswith(SHARE_PREFIX) \
                    or not topic_matches(topic_filter, msg.topic) or (msg.bridged and bridge_session(session)):
                continue  # No Local: not back to its publisher [MQTT-3.8.3-3]; nor over a bridge again
            qos, rap = max(qos, opts.qos), rap or opts.retain_as_published
            ids += opts.ids
        if qos >= 0:
            self.deliver(session, msg, qos, rap, tuple(ids))

    def deliver(self, session: Session, msg: Message, sub_qos: int, rap: bool, ids: tuple) -> None:
        """Deliver one message with its Retain As Published flag and subscription identifiers."""
        if self.handouts and session in self.handouts:
            self.retained_first(session, msg)
        qos = sub_qos if self.ctx.upgrade_qos else min(msg.qos, sub_qos)
        out = Outgoing(msg, qos, 0, rap and msg.retain, ids)
        client = session.client
        if qos == 0 and client is not None and not session.queue and not session.stored \
                and self.fits(client, message_bytes(msg)):
            self.send_publish(client, out, None)
            self.counters["queue_message_in", ()] += 1
            self.counters["queue_message_out", ()] += 1
        else:
            self.enqueue(session, out)

    # -- queues -----------------------------------------------------------
    def queue_full(self, session: Session, online: bool, size: int, out: Outgoing | None = None) -> str:
        """Which limit one more message of ``size`` bytes passes ('' none): its queue's count or bytes, or all queues'.

        An empty queue takes one message of any size (its byte limit bounds what waits behind
        it): a message the node accepted must reach an idle subscriber whatever its size. At
        QoS 1 or 2 to a connected subscriber it is marked shared (``out``): queued, it costs
        max_queued_bytes once for all its queues, and waits in drain for room in the outboxes.
        """
        ctx = self.ctx
        limit, byte_limit = (ctx.max_online, ctx.max_online_bytes) if online else \
            (ctx.max_offline, ctx.max_offline_bytes)
        bounds = QUEUE_BOUNDS[None if session.relay else online]
        if session.relay:
            limit, byte_limit = session.limit, session.max_bytes  # a bridge's own bounds
        queued = _queued(session)
        if 0 <= limit <= queued:
            return bounds[0]
        total = self.queued_bytes + size
        if 0 <= byte_limit < session.queue_bytes + size:
            if queued:
                return bounds[1]
            if out is not None and out.qos and online and not session.stored:
                out.shared = True
                if id(out.msg) in self.shared:
                    total -= size  # already counted
            else:
                # such big ones, copied for every subscriber (in this batch's outboxes, then in the buffers of
                # peers that do not read), share the node-wide bound
                total += self.outbox_bytes()
                if 0 <= ctx.max_queued_bytes < total:
                    return "max_queued_bytes, with the large messages in outboxes and unread peer buffers"
        return "max_queued_bytes" if 0 <= ctx.max_queued_bytes < total else ""

    def outbox_bytes(self) -> int:
        """Bytes in this batch's outboxes and in the transports of peers that do not read."""
        return self.unsent_bytes + sum(c.out_bytes for c in self.output.dirty)

    def _share(self, out: Outgoing, size: int) -> None:
        """Count a shared message's bytes node-wide when its first queue takes it."""
        entry = self.shared.setdefault(id(out.msg), [out.msg, 0])
        entry[1] += 1
        if entry[1] == 1:
            self.queued_bytes += size

    def _unshare(self, out: Outgoing, size: int) -> None:
        """A queue gave up a shared message: uncount its bytes once the last one has."""
        entry = self.shared[id(out.msg)]
        entry[1] -= 1
        if not entry[1]:
            del self.shared[id(out.msg)]
            self.queued_bytes -= size

    def room_for_big(self, size: int) -> bool:
        """Whether one more copy of a shared message fits in the outboxes (always, when they hold none)."""
        pending, limit = self.outbox_bytes(), self.ctx.max_queued_bytes
        return not pending or limit < 0 or self.queued_bytes + pending + size <= limit

    def retry_big(self, now: float) -> bool:
        """Drain the sessions whose large message waited for outbox room; return whether any sent."""
        self.ctx.now = now
        waiters, self.big_waiters = self.big_waiters, {}
        for session in waiters:
            self.drain(session)
        return len(self.big_waiters) < len(waiters)

    def enqueue(self, session: Session, out: Outgoing) -> None:
        """Queue for a session (bounded in messages and bytes), then drain.

        A stored message for an offline session (or behind other stored ones) waits only in the
        store: memory does not grow with offline queues.
        """
        online = session.client is not None
        msg, qos = out.msg, out.qos
        size = message_bytes(msg)
        full = self.queue_full(session, online, size, out) or (online and qos == 0 and not session.client.writable
                                                          and "its connection takes no more")
        if full:
            return self.drop(session, full, size)
        # QoS 0 is stored too when it must wait behind stored messages: the queue keeps its order
        if not session.clean and (qos or not online or session.stored):
            out.row = self.store.add_message(session.mountpoint, session.client_id, msg, qos, out.extra)
        if not online and self.hooks.on_offline_message:
            notify(self.hooks.on_offline_message, session.key, qos, msg.topic, msg.payload, msg.retain)
        session.queue_bytes += size
        if out.shared:
            self._share(out, size)
        else:
            self.queued_bytes += size
        if out.row and (session.stored or not online):
            session.stored += 1
            session.stored_bytes += size
        else:
            session.queue_for().append(out)
            session.loaded_upto = max(session.loaded_upto, out.row)
        self.counters["queue_message_in", ()] += 1
        if online:
            self.drain(session)

    def drop(self, session: Session, full: str, size: int) -> None:
        """Drop a message a full queue cannot take: counted (a bridge's in the store too), the first one logged."""
        self.counters["queue_message_drop", ()] += 1  # a slow subscriber loses QoS 0, never blocks others
        session.dropped += 1
        if session.relay:  # bridge show and bridge_messages_dropped say the same after a restart
            self.drops_unsaved[session] = None
        if session.warned:
            return  # one line per session, not per message
        session.warned = True
        if session.relay:
            bound = session.limit if full.endswith("messages") else session.max_bytes
            log.warning("bridge %s: dropping messages for the remote: its buffer is full (%s = %s; the first of "
                        "%d bytes; bridge_messages_dropped counts the rest)",
                        session.client_id[len(BRIDGE_CLIENT_PREFIX):], full, bound, size)
        else:
            log.warning("dropping messages for client %r: %s (the first of %d bytes; queue_message_drop counts "
                        "the rest)", session.client_id, full, size)

    def save_drops(self) -> None:
        """Write the bridges' counts of drops to the store: once per batch, not once per message dropped."""
        for session in self.drops_unsaved:
            self.store.put_dropped(session.mountpoint, session.client_id, session.dropped)
        self.drops_unsaved.clear()

    def fill(self, session: Session) -> bool:
        """Read the next page of a session's stored queue into memory; return whether there was any."""
        page = self.store.load_queue(session.mountpoint, session.client_id, session.loaded_upto)
        for msg, qos, row, extra in page:
            retain, ids = extra or (False, ())
            session.queue_for().append(Outgoing(msg, qos, row, retain, ids))
            session.loaded_upto = row
            session.stored_bytes -= message_bytes(msg)
        session.stored = max(0, session.stored - len(page))
        if not page and session.stored:  # rows lost to a failed commit: the queue is shorter than counted
            session.queue_bytes -= session.stored_bytes
            self.queued_bytes -= session.stored_bytes
            session.stored = session.stored_bytes = 0
        return bool(page)

    def unstore(self, session: Session) -> None:
        """Bring what a session keeps only in the store into memory: it is to live without the store now."""
        if session.parked:
            self.load_parked(session)
        while session.stored and self.fill(session):
            pass
        for out in itertools.chain(session.queue, session.inflight.values()):
            out.row = 0  # its row goes with the session's

    def load_parked(self, session: Session) -> None:
        """Read the QoS 2 messages in flight when the node stopped: the same packet ids again."""
        session.parked = 0
        for msg, qos, row, pid, released, extra in self.store.load_inflight(session.mountpoint, session.client_id):
            retain, ids = extra or (False, ())
            out = session.inflight[pid] = Outgoing(msg, qos, row, retain, ids)
            out.stage = Stage.RELEASED if released else Stage.SENT

    def forget_queue(self, session: Session) -> None:
        """Take a session's queue out of the node-wide byte count (the session ends)."""
        self.queued_bytes -= session.queue_bytes
        for out in session.queue:
            if out.shared:
                out.shared = False
                self.queued_bytes += message_bytes(out.msg)  # subtracted above; counted once, in _unshare
                self._unshare(out, message_bytes(out.msg))
        self.big_waiters.pop(session, None)
        session.queue_bytes = session.stored = session.stored_bytes = 0

    def drain(self, session: Session) -> None:
        """Send queued messages while the in-flight window (and an MQTT 5 Receive Maximum) has room."""
        client = session.client
        if client is None or session.waiting:
            return
        window, now = self.ctx.max_inflight, self.ctx.now
        if client.receive_max and (not window or client.receive_max < window):
            window = client.receive_max  # [MQTT-3.3.4-7]
        inflight = session.inflight
        while True:
            room = (not window or len(inflight) < window) and len(inflight) < MAX_PACKET_ID
            if not session.queue and not (room and session.stored and self.fill(session)):
                break
            queue = session.queue  # read again: fill made it if it was NO_QUEUE
            head = queue[0]
            if head.qos and not room:
                break
            if not client.writable or (client.out and not self.fits(client, message_bytes(head.msg))):
                client.held_back = True  # the I/O shell drains again once the peer has taken its output
                break
            if head.shared and not self.room_for_big(message_bytes(head.msg)):
                self.big_waiters[session] = None  # retry_big sends it once outboxes have room
                break
            out = queue.popleft()
            size = message_bytes(out.msg)
            session.queue_bytes -= size
            if out.shared:
                self._unshare(out, size)
            else:
                self.queued_bytes -= size
            if out.msg.expires is not None and out.msg.expires <= now:
                self.counters["queue_message_expired", ()] += 1  # MQTT 5.0 3.3.2.3.3
                if out.row:
                    self.store.delete_message(out.row)
                continue
            pid = None
            if out.qos:
                pid = session.take_pid()
                out.stage, out.sent_at = Stage.SENT, now
                inflight[pid] = out
                if out.qos == 2 and out.row:
                    self.store.mark_sent(out.row, pid)  # exactly once survives a restart too
            elif out.row:
                self.store.delete_message(out.row)  # QoS 0 is done once sent
            self.send_publish(client, out, pid)
            self.counters["queue_message_out", ()] += 1

    # -- in flight --------------------------------------------------------
    def forget(self, session: Session, pid: int) -> None:
        """Forget a delivery in flight, and its row in the store."""
        out = session.inflight.pop(pid)
        if out.row:
            self.store.delete_message(out.row)

    def complete(self, session: Session, pid: int) -> None:
        """A delivery is acknowledged (or ended by an MQTT 5 error): forget it, send the next."""
        self.forget(session, pid)
        self.drain(session)

    def resend(self, session: Session, older_than: float = 0.0) -> None:
        """Send again (DUP) what waited at least ``older_than`` s for its acknowledgement [MQTT-4.4.0-1]."""
        client = session.client
        for pid, out in list(session.inflight.items()):
            if not client.writable:
                break  # a peer that takes nothing gets nothing again: the next tick tries
            if self.ctx.now - out.sent_at >= older_than:
                out.sent_at = self.ctx.now
                if out.stage is Stage.RELEASED:
                    self.emit_packet(client, Pubrel(pid))
                else:
                    self.send_publish(client, out, pid, dup=True)

    # -- retained messages --------------------------------------------------
    def retain(self, mountpoint: str, msg: Message) -> bool | None:
        """Retain (or with an empty payload delete) a message, in the store too; False: refused, counted."""
        kept = self.router.retain(mountpoint, msg, self.ctx.max_retained, self.ctx.max_retained_bytes)
        if kept:
            self.store.put_retained(mountpoint, msg)
        elif kept is None:
            self.store.delete_retained(mountpoint, msg.topic)
        else:
            self.counters["retain_message_refused", ()] += 1
            return kept
        self.seam.retained_changed(mountpoint, msg.topic)
        return kept

    def delete_retained(self, mountpoint: str, topic: str) -> bool:
        """Delete one retained message, in the store too; return whether it existed."""
        if self.router.unretain(mountpoint, topic) is None:
            return False
        self.store.delete_retained(mountpoint, topic)
        self.seam.retained_changed(mountpoint, topic)
        return True

    def send_retained(self, session: Session, topic_filter: str, opts: SubOptions) -> None:
        """Deliver retained messages matching a new subscription, retain flag set [MQTT-3.3.1-8].

        They go through the session's queue like any delivery, so its window and limits hold.
        A walk of up to RETAINED_CHUNK trie nodes is handed out at once, by topic; the rest
        RETAINED_CHUNK a turn of the loop (``hand_out``): one SUBSCRIBE never holds it for long.
        A session still getting another subscription's gets these after it.
        """
        self.cancel_handout(session, topic_filter)  # subscribed again: the walk starts afresh
        job = Handout(topic_filter, opts, self.router.retained_walk(session.mountpoint, topic_filter))
        if session in self.handouts:  # behind the walk under way: one walk (and its copies) a session at a time
            self.handouts[session].append(job)
            return
        steps = list(itertools.islice(job.walk, RETAINED_CHUNK))
        if len(steps) == RETAINED_CHUNK:  # more to walk: at the next turns
            self.handouts[session] = [job]
        for topic, msg in sorted((step for step in steps if step[1] is not None), key=_first):
            job.sent.add(topic)
            self.hand(session, opts, msg)

    def cancel_handout(self, session: Session, topic_filter: str) -> None:
        """Hand out no more retained messages for one subscription of a session."""
        jobs = [job for job in self.handouts.pop(session, ()) if job.topic_filter != topic_filter]
        if jobs:
            self.handouts[session] = jobs

    def hand(self, session: Session, opts: SubOptions, msg: Message) -> None:
        """Queue one retained message for a new subscription (an expired one is deleted instead)."""
        if msg.expires is not None and msg.expires <= self.ctx.now:
            self.delete_retained(session.mountpoint, msg.topic)  # expired (MQTT 5.0 3.3.2.3.3)
            return
        self.enqueue(session, Outgoing(msg, min(opts.qos, msg.qos), 0, True, opts.ids, retained=True))

    def retained_first(self, session: Session, msg: Message) -> None:
        """A live message for a session still getting retained ones: the retained message of its topic goes
        first, never after it (MQTT 5.0 4.6.0), and is not handed out again."""
        topic = msg.topic
        for job in self.handouts[session]:
            if topic not in job.sent and topic_matches(job.topic_filter, topic):
                job.sent.add(topic)
                old = self.router.retained[session.mountpoint].get(topic)
                if old is not None and old is not msg:
                    self.hand(session, job.opts, old)

    def handout_ready(self) -> bool:
        """Whether ``hand_out`` has work: a session getting retained messages whose connection takes more."""
        return any(session.client is None or session.client.writable for session in self.handouts)

    def hand_out(self, now: float) -> None:
        """Go on with the retained messages of new subscriptions: RETAINED_CHUNK trie nodes, oldest first.

        A session whose connection takes no more waits (its queue would drop them) until it does;
        one that ended gets no more (``unsubscribe`` ends a subscription's hand-out).
        """
        self.ctx.now = now
        budget = RETAINED_CHUNK
        for session, jobs in list(self.handouts.items()):
            if budget <= 0:
                break
            if session.client is not None and not session.client.writable:
                continue
            live = self.sessions.get(session.key) is session
            while jobs and budget > 0:
                job, steps = jobs[0], 0
                if live and job.topic_filter in session.subs:
                    for topic, msg in job.walk:
                        steps += 1
                        if msg is not None and topic not in job.sent:
                            job.sent.add(topic)
                            self.hand(session, job.opts, msg)
                        if steps >= budget:
                            break
                    else:
                        jobs.pop(0)
                else:
                    jobs.pop(0)
                budget -= max(steps, 1)
            if not jobs:
                del self.handouts[session]

    def writable_again(self, conn: Connection, now: float) -> None:
        """The I/O shell sent a full outbox: go on with the messages held back for it."""
        self.ctx.now = now
        conn.held_back = False
        session = conn.session
        if session is not None and session.client is conn and not conn.closed:
            self.drain(session)


###############################################################################
# 16. Sessions: connections, CONNECT, wills, administration ###################
###############################################################################
# Owns: a connection's life (CONNECT and authentication, takeover, wills, close),
#       session life (expiry, drop, restore, subscriptions) and the named operations
#       the admin commands call. Its output is left in each connection's outbox.
# Must not know: sockets, the clock (``now`` comes with every entry point),
#       randomness and id generation (handed in), files (rules are handed in),
#       other nodes (only through ``ClusterSeam``).

STORE_DOWN = "the message store cannot write"  # the Reason String of a QoS 1/2 PUBLISH refused for it
CLUSTER_FULL = "a cluster node has too much unacknowledged (cluster_max_unacknowledged_bytes)"


class Gate:
    """Who may connect, publish and subscribe: the auth hooks, vmq_passwd and vmq_acl on the rules in force.

    The I/O shell hands in the password and ACL rules it reads from their files (``set_rules``)
    and sets ``anonymous_default`` (every MQTT listener on loopback).
    """

    def __init__(self, ctx: Context, hooks: Any):
        self.ctx, self.hooks = ctx, hooks
        self.anonymous_default = True  # the node sets it: every MQTT listener on loopback
        self.users: Mapping[str, str] = {}  # vmq_passwd: user -> hash
        self.acl_rules: AclRules | None = None  # vmq_acl (None: a configured file that never loaded)
        self._acl_warned: set[tuple[str, str, str | None]] = set()  # clients told patterns skip them

    def set_rules(self, users: Mapping[str, str], acl_rules: AclRules | None) -> None:
        """Take the vmq_passwd users and vmq_acl rules in force (the I/O shell reloads their files)."""
        self.users, self.acl_rules = users, acl_rules

    def lets_in_unasked(self, listener: Any, config: Config) -> bool:
        """Whether a client of ``listener`` is let in without asking the auth plugins."""
        return getattr(listener, "allow_anonymous_override", False) or \
            anonymous_allowed(config, self.anonymous_default, self.hooks)

    def authenticate(self, client: Connection, p: Connect, client_id: str, config: Config) -> int:
        """Return 0 to accept, or CONNACK 4 (bad credentials) / 5 (not authorized)."""
        if self.lets_in_unasked(client.listener, config):
            return 0  # VerneMQ: allow_anonymous skips the auth plugins
        answer = run_auth_hooks(self.hooks.auth_on_register, client.peer, (client.listener.mountpoint, client_id),
                                p.username, p.password, p.clean_session)
        if answer is not None:
            return CONNACK_NOT_AUTHORIZED if answer == "error" else 0
        if not self.hooks.builtin["vmq_passwd"]:
            return CONNACK_NOT_AUTHORIZED  # every plugin said next
        users = self.users
        if p.username is None or p.password is None or p.username not in users:
            return CONNACK_NOT_AUTHORIZED  # every plugin said next
        return 0 if check_password(p.password, users[p.username]) else CONNACK_BAD_CREDENTIALS

    def acl(self, client: Connection, access: str, topic: str) -> bool:
        """Ask vmq_acl about a connected client; with no ACL file configured (or vmq_acl disabled) all is allowed."""
        if not self.ctx.acl_file or not self.hooks.builtin["vmq_acl"]:
            return True  # the common case, without a call
        session = client.session
        return self.acl_check(client.user, session.client_id, session.mountpoint, access, topic)

    def acl_check(self, user: str | None, client_id: str, mountpoint: str, access: str, topic: str) -> bool:
        """Ask vmq_acl whether ``user``/``client_id`` may ``access`` (read or write) ``topic``."""
        if not self.ctx.acl_file or not self.hooks.builtin["vmq_acl"]:
            return True
        rules = self.acl_rules
        if rules is None:
            return False  # a file is configured but never loaded: refuse rather than grant all
        if rules.patterns:
            self._warn_unsafe_id(user, mountpoint, client_id)
        return acl_allows(rules, access, topic, user, client_id, mountpoint)

    def will_allowed(self, p: Connect, client_id: str, mountpoint: str) -> bool:
        """Whether a CONNECT's will may be published: asked of auth_on_publish and vmq_acl like a PUBLISH."""
        answer = run_auth_hooks(self.hooks.auth_on_publish, p.username, (mountpoint, client_id), p.will_qos,
                                p.will_topic, p.will_payload, p.will_retain)
        if answer is not None:
            return answer != "error"
        return self.acl_check(p.username, client_id, mountpoint, "write", p.will_topic)

    def _warn_unsafe_id(self, user: str | None, mountpoint: str, client_id: str) -> None:
        """Log once per client that vmq_acl patterns do not apply to it, and why."""
        key = (mountpoint, client_id, user)
        if key in self._acl_warned:
            return
        reason = acl_unsafe_id(user, client_id)
        if reason:
            if len(self._acl_warned) >= ACL_WARNED_MAX:
                self._acl_warned.clear()  # bounded: a flood of odd ids cannot grow it without end
            self._acl_warned.add(key)
            log.warning("vmq_acl: patterns do not apply to client %r: %s", client_id, reason)


class Sessions:
    """Connections and sessions: CONNECT, authentication, takeover, wills, session life, admin operations.

    Built with what it uses: the context, the delivery part (with its output, router, counters
    and sessions by key), the gate, the message store and the hooks; ``seam`` is the
    cluster's (``NO_CLUSTER`` on its own). The I/O shell hands in ``new_client_id`` (assigned
    client ids) and sets ``now`` before it calls an admin operation.
    """

    def __init__(self, ctx: Context, delivery: Delivery, gate: Gate, store: Store, hooks: Any,
                 new_client_id: Callable[[], str]):
        self.ctx, self.delivery, self.output, self.gate = ctx, delivery, delivery.output, gate
        self.router, self.store, self.hooks, self.counters = delivery.router, store, hooks, delivery.counters
        self.sessions = delivery.sessions
        self.seam: ClusterSeam = NO_CLUSTER
        self.new_client_id = new_client_id
        self.emit_packet, self.request_close = delivery.output.emit_packet, delivery.output.request_close
        self.route, self.drain, self.resend = delivery.route, delivery.drain, delivery.resend
        self.retain, self.delete_retained = delivery.retain, delivery.delete_retained
        self.forget_queue, self.unstore = delivery.forget_queue, delivery.unstore
        self.load_parked = delivery.load_parked
        self.persistent = 0  # sessions in ``sessions`` that outlive their connection (max_persistent_sessions)
        self.clients: set[Connection] = set()
        self._next_ref = 1
        self.tracers: dict[tuple[str, str], Any] = {}
        self.mountpoints: set[str] = {""}

    def new_ref(self) -> int:
        """Return a fresh message reference."""
        self._next_ref += 1
        return self._next_ref

    # -- connections ------------------------------------------------------
    def connection_made(self, link: Any, listener: Any, peer: tuple, identity: str | None, now: float) -> Connection:
        """Register a new network connection (``listener``: its mountpoint, versions and options)."""
        self.ctx.now = now
        client = Connection(link, listener, peer, identity, now)
        self.clients.add(client)
        self.counters["socket_open", ()] += 1
        return client

    def connection_lost(self, client: Connection, now: float) -> None:
        """The network connection ended; publish the will unless it said DISCONNECT."""
        self.ctx.now = now
        self.close_client(client, close_link=False)
        self.clients.discard(client)

    def say_disconnect(self, client: Connection, reason: int, text: str = "") -> None:
        """Tell an MQTT 5 client why the node closes its connection (MQTT 5.0 3.14); others hear nothing."""
        if client.connected and not client.closed:
            packet = client.dialect.disconnect(reason, text)
            if packet is not None and self.emit_packet(client, packet):
                self.counters["mqtt_disconnect_sent", reason_labels(reason, "normal_disconnect")] += 1

    def refuse_packet(self, client: Connection, exc: MalformedPacket) -> None:
        """Close a client whose packet broke a rule or a limit: MQTT 5 hears the reason, in CONNACK if the
        packet was its CONNECT (MQTT 5.0 4.13.1), else in DISCONNECT."""
        if not client.connected and exc.proto_level == 5 and not client.closed:
            client.speak(5)
            return self.refuse(client, exc.reason_code, exc.text)
        self.close_client(client, reason=exc.reason_code, text=exc.text)

    def goodbye(self, client: Connection, reason: int) -> None:
        """Say why and close, leaving the session as it is (the node stops)."""
        self.say_disconnect(client, reason)
        self.request_close(client)

    def close_client(self, client: Connection, close_link: bool = True, reason: int | None = None,
                     text: str = "") -> None:
        """End a client: its will (if due), its session's link, then (``close_link``) its socket.

        ``reason``: the reason code of the DISCONNECT an MQTT 5 client gets first.
        """
        if client.closed:
            return
        if reason is not None and close_link:
            self.say_disconnect(client, reason, text)
        if close_link:
            self.request_close(client)
        client.closed = True
        self.counters["socket_close", ()] += 1
        session = client.session
        attached = session is not None and session.client is client
        if attached:  # first: the will must not go back to the connection that is closing
            session.client, session.offline_since = None, self.ctx.now
            self.seam.session_changed(session.key)
        if client.connected and not client.clean_exit and client.will is not None:
            self.publish_will(client, session, attached)
        if attached:
            if session.clean:
                self.drop_session(session)
                notify(self.hooks.on_client_gone, session.key)
            else:
                notify(self.hooks.on_client_offline, session.key)

    def publish_will(self, client: Connection, session: Session | None, attached: bool) -> None:
        """Publish a will now [MQTT-3.1.2-8], or after its Will Delay Interval while the session lives on.

        ``attached``: the session was this client's until now (not taken over).
        """
        will, client.will = client.will, None
        delay = min(client.will_delay, self.ctx.config["max_last_will_delay"])
        size, limit = message_bytes(will), self.ctx.max_queued_bytes
        if delay and attached and not session.clean \
                and not 0 <= limit < self.delivery.queued_bytes + size:  # waiting wills count as queued
            session.will = (will, self.ctx.now + delay)  # sent by tick, or when the session ends [MQTT-3.1.3-9]
            self.delivery.queued_bytes += size
            return
        self.send_will(session.mountpoint if session else "", will)

    def take_will(self, session: Session) -> Message | None:
        """Take a session's delayed will out of it (to send it, or because it is no longer due)."""
        if session.will is None:
            return None
        will, session.will = session.will[0], None
        self.delivery.queued_bytes -= message_bytes(will)
        return will

    def send_will(self, mountpoint: str, will: Message) -> None:
        """Route (and retain) a will; its Message Expiry Interval counts from now."""
        if will.expires is not None:  # a will keeps its interval, not a clock time, until it is sent
            will = dataclasses.replace(will, expires=self.ctx.now + will.expires)
        if will.retain:
            self.retain(mountpoint, will)
        self.route(mountpoint, will)

    def add_session(self, mountpoint: str, client_id: str, expiry: int | None) -> Session:
        """Make a session and keep it (counted in ``persistent`` unless it ends with its connection)."""
        session = self.sessions[(mountpoint, client_id)] = Session(mountpoint, client_id, self.ctx.now, expiry)
        self.persistent += not session.clean
        return session

    def drop_session(self, session: Session) -> None:
        """Forget a session: subscriptions, queue and stored rows; a delayed will goes out now."""
        for topic_filter in session.subs:
            self.router.remove(session, topic_filter)
        if self.sessions.pop(session.key, None) is session:
            self.persistent -= not session.clean
        if session.relay:
            self.delivery.relays.pop(session.key, None)
            self.delivery.drops_unsaved.pop(session, None)
        self.seam.session_changed(session.key)
        self.forget_queue(session)
        if not session.clean:
            self.store.delete_session(session.mountpoint, session.client_id)
        will = self.take_will(session)
        if will is not None:
            self.send_will(session.mountpoint, will)

    def set_expiry(self, session: Session, expiry: int | None) -> None:
        """Change how long a session outlives its connection (0: it ends with it)."""
        if expiry == 0 and not session.clean:
            self.unstore(session)
            self.store.delete_session(session.mountpoint, session.client_id)
        elif expiry != 0:
            self.store.put_session(session.mountpoint, session.client_id, expiry)
            if session.clean:  # from now on kept: its subscriptions too
                for topic_filter, opts in session.subs.items():
                    self.store.put_subscription(session.mountpoint, session.client_id, topic_filter, opts.packed())
        if (expiry == 0) != session.clean:
            self.seam.session_changed(session.key)
            if self.sessions.get(session.key) is session:
                self.persistent += 1 if session.clean else -1
        session.expiry = expiry

    # -- CONNECT ----------------------------------------------------------
    def on_connect(self, client: Connection, p: Connect, raw: bytes = b"") -> None:
        """Check version, client id, keep-alive and credentials; then accept."""
        if client.auth is not None:
            raise ProtocolError("CONNECT during enhanced authentication")  # [MQTT-3.1.0-2]
        config = self.ctx.settings()
        listener = client.listener
        client.bridge = p.proto_level in BRIDGE_LEVELS  # VerneMQ answers 131/132 as a bridge too
        level = p.proto_level & ~BRIDGE_BIT if client.bridge else p.proto_level
        client.speak(level if level in DIALECTS else 4)  # an MQTT 5 refusal is said in MQTT 5
        self.counters["mqtt_connect_received", client.labels] += 1
        if level not in PROTOCOLS or level not in listener.allowed_versions:
            return self.refuse(client, CONNACK_BAD_VERSION, f"protocol level {p.proto_level} is not accepted here")
        props, dialect = dict(p.properties), client.dialect
        dialect.connect_options(client, props, config)  # first: a refusal must fit its Maximum Packet Size too
        client_id, assigned = p.client_id, False
        if not client_id:
            if not p.clean_session and not dialect.assigns_client_id:
                return self.refuse(client, CONNACK_BAD_ID)  # [MQTT-3.1.3-8]
            client_id, assigned = self.new_client_id(), dialect.assigns_client_id  # [MQTT-3.1.3-6]
        if len(client_id) > config["max_client_id_size"]:
            return self.refuse(client, CONNACK_BAD_ID, f"client id longer than {config['max_client_id_size']}")
        if client_id.startswith(BRIDGE_CLIENT_PREFIX):
            return self.refuse(client, CONNACK_BAD_ID, f"client ids beginning {BRIDGE_CLIENT_PREFIX} are the bridges'")
        keepalive = dialect.keepalive(p.keepalive, config["max_keepalive"])
        if keepalive is None:
            return self.refuse(client, CONNACK_BAD_ID)  # MQTT 3 cannot be told another keep-alive
        client.keepalive = keepalive
        method = props.get("authentication_method")
        if method is not None:  # enhanced authentication (MQTT 5.0 4.12) through the on_auth_m5 hook
            if not self.hooks.on_auth_m5:
                return self.refuse(client, Reason.BAD_AUTHENTICATION_METHOD,
                                   f"no plugin knows authentication method {method!r}")
            client.auth, client.auth_method = (p, client_id, assigned), method
            return self.auth_step(client, props.get("authentication_data"))
        if getattr(listener, "use_identity_as_username", False):
            if client.identity is None:
                return self.refuse(client, CONNACK_NOT_AUTHORIZED)  # no certificate, no user name
            p = dataclasses.replace(p, username=client.identity, password=None)
            verdict = 0  # the verified certificate is the credential
        else:
            verdict = self.gate.authenticate(client, p, client_id, config)
        if verdict:
            return self.refuse(client, verdict)
        self.accept(client, p, client_id, assigned)

    def accept(self, client: Connection, p: Connect, client_id: str, assigned: bool = False,
               auth_props: tuple = ()) -> None:
        """Refuse during a netsplit (unless allowed); take a session over from another node; then attach."""
        seam = self.seam
        if seam.netsplit and not self.ctx.config["allow_register_during_netsplit"]:
            return self.refuse(client, CONNACK_UNAVAILABLE, f"netsplit: {seam.netsplit}")  # MQTT 5: 0x88
        claim = seam.claim((client.listener.mountpoint, client_id), p.clean_session)
        try:
            self.attach(client, p, client_id, assigned, auth_props)
        finally:
            if claim is not None and not client.connected:
                seam.release(claim)  # refused after all: the session stays on its node
        if claim is not None and client.connected:
            seam.took_over(claim)

    def attach(self, client: Connection, p: Connect, client_id: str, assigned: bool = False,
               auth_props: tuple = ()) -> None:
        """Attach the client to its session (a takeover closes the old link) and answer CONNACK."""
        mountpoint = client.listener.mountpoint
        if p.will_topic is not None and p.will_topic.count("/") >= self.ctx.max_levels:
            raise TopicTooDeep(f"will topic of more than {self.ctx.max_levels} levels (max_topic_levels)")
        if p.will_topic is not None and not self.gate.will_allowed(p, client_id, mountpoint):
            self.counters["mqtt_publish_auth_error", ()] += 1
            return self.refuse(client, CONNACK_NOT_AUTHORIZED, "the will's topic is not allowed")
        self.mountpoints.add(mountpoint)
        key = (mountpoint, client_id)
        expiry = client.dialect.session_expiry(client, p)
        old = self.sessions.get(key)
        if old is not None and old.client is not None:
            self.close_client(old.client, reason=Reason.SESSION_TAKEN_OVER)  # takeover [MQTT-3.1.4-2]
            old = self.sessions.get(key)  # a clean session ended with its connection
        if old is not None:
            self.take_will(old)  # a new connection for this client id: no delayed will [MQTT-3.1.3-9]
            if p.clean_session:  # MQTT 5: Clean Start
                self.drop_session(old)
                old = None
        if old is None:
            if expiry != 0 and 0 < self.ctx.max_persistent <= self.persistent:
                self.counters["mqtt_session_quota_error", ()] += 1
                return self.refuse(client, client.dialect.session_quota,
                                   f"the node holds {self.persistent} persistent sessions (max_persistent_sessions)")
            session = self.add_session(mountpoint, client_id, expiry)
            if expiry != 0:
                self.store.put_session(mountpoint, client_id, expiry, new=True)
        else:
            session = old
            self.set_expiry(session, expiry)
        session.client, session.offline_since = client, None
        self.seam.session_changed(key)
        session.user, session.peer, session.protocol = p.username, client.peer, p.proto_level
        client.session, client.connected, client.user = session, True, p.username
        client.tracer = self.tracers.get(key)
        if p.will_topic is not None:
            will_props = dict(p.will_properties)
            client.will = Message(p.will_topic, p.will_payload, p.will_qos, p.will_retain, self.new_ref(),
                                  props=forwarded_properties(p.will_properties),
                                  expires=will_props.get("message_expiry_interval"), origin=client_id)
            client.will_delay = will_props.get("will_delay_interval", 0)
        props = client.dialect.connack_properties(self.ctx.config, client, p, client_id if assigned else None)
        connack, labels = client.dialect.connack(old is not None, props + auth_props)
        self.emit_packet(client, connack)
        self.counters["mqtt_connack_sent", labels] += 1
        if self.hooks.on_register or self.hooks.on_client_wakeup:
            notify(self.hooks.on_register, client.peer, key, p.username)
            notify(self.hooks.on_client_wakeup, key)
        self.resume(session)

    def refuse(self, client: Connection, code: int, text: str = "") -> None:
        """Answer CONNACK with a refusal and close [MQTT-3.2.2-5]; ``code`` is 3.1.1's or an MQTT 5 reason.

        An MQTT 5 client also gets ``text`` as the Reason String.
        """
        connack, labels = client.dialect.refusal(code, text)
        self.emit_packet(client, connack)
        self.counters["mqtt_connack_sent", labels] += 1
        self.close_client(client)

    def refuse_busy(self, client: Connection, p: Connect, text: str) -> None:
        """Refuse a CONNECT the node cannot look at now: CONNACK 3, MQTT 5 0x89 Server busy (MQTT 5.0 3.2.2.2)."""
        level = p.proto_level & ~BRIDGE_BIT if p.proto_level in BRIDGE_LEVELS else p.proto_level
        client.speak(level if level in DIALECTS else 4)
        self.counters["mqtt_connect_received", client.labels] += 1
        self.refuse(client, client.dialect.busy, text)

    def auth_step(self, client: Connection, data: bytes | None) -> None:
        """Ask the on_auth_m5 hooks about one step of enhanced authentication and answer it."""
        connect, client_id, assigned = client.auth or (None, client.session.client_id, False)
        user = connect.username if connect is not None else client.user
        answer = run_auth_hooks(self.hooks.on_auth_m5, user, (client.listener.mountpoint, client_id),
                                {"authentication_method": client.auth_method, "authentication_data": data})
        if answer == "ok":
            answer = {}
        reason = answer.get("reason", "success") if isinstance(answer, Mapping) else None
        if reason not in ("success", "continue_authentication"):
            code = Reason.BAD_AUTHENTICATION_METHOD if answer is None else Reason.NOT_AUTHORIZED
            if connect is not None:
                return self.refuse(client, code)
            return self.close_client(client, reason=code)
        out = (("authentication_method", client.auth_method),)
        if answer.get("authentication_data") is not None:
            out += (("authentication_data", bytes(answer["authentication_data"])),)
        if reason == "continue_authentication":
            self.emit_packet(client, Auth(Reason.CONTINUE_AUTHENTICATION, out))
            self.counters["mqtt_auth_sent", reason_labels(Reason.CONTINUE_AUTHENTICATION)] += 1
        elif connect is not None:
            client.auth = None
            self.accept(client, connect, client_id, assigned, out)
        else:
            self.emit_packet(client, Auth(Reason.SUCCESS, out))  # re-authentication succeeded
            self.counters["mqtt_auth_sent", V5_SUCCESS] += 1

    def on_auth(self, client: Connection, p: Auth, raw: bytes = b"") -> None:
        """AUTH: the client's next step of enhanced authentication, or a re-authentication (MQTT 5.0 4.12)."""
        self.counters["mqtt_auth_received", reason_labels(p.reason_code)] += 1
        props = dict(p.properties)
        if client.auth_method is None or props.get("authentication_method") != client.auth_method:
            raise ProtocolError("AUTH without the authentication method of CONNECT")  # [MQTT-4.12.0-5]
        expected = (Reason.CONTINUE_AUTHENTICATION,) if not client.connected else \
            (Reason.CONTINUE_AUTHENTICATION, Reason.REAUTHENTICATE)
        if p.reason_code not in expected:
            raise ProtocolError(f"AUTH reason code {p.reason_code:#x} out of turn")
        self.auth_step(client, props.get("authentication_data"))

    def resume(self, session: Session) -> None:
        """Send again what was in flight (DUP), then drain the queue."""
        if session.parked:  # in flight when the node stopped: the same packet ids again
            self.load_parked(session)
        self.resend(session)
        self.drain(session)

    # -- subscriptions ----------------------------------------------------
    def subscribe(self, session: Session, topic_filter: str, opts: SubOptions) -> None:
        """Add or replace one subscription [MQTT-3.8.4-3]."""
        self.router.add(session, topic_filter, opts)
        session.subs[topic_filter] = opts
        self.seam.session_changed(session.key)
        if not session.clean:
            self.store.put_subscription(session.mountpoint, session.client_id, topic_filter, opts.packed())

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        """Remove one subscription; return whether it existed."""
        if session.subs.pop(topic_filter, None) is None:
            return False
        self.router.remove(session, topic_filter)
        self.seam.session_changed(session.key)
        if not session.clean:
            self.store.delete_subscription(session.mountpoint, session.client_id, topic_filter)
        if session in self.delivery.handouts:  # its retained messages still to come are not wanted now
            self.delivery.cancel_handout(session, topic_filter)
        return True

    # -- administration ---------------------------------------------------
    def disconnect(self, client_id: str, mountpoint: str = "", cleanup: bool = False) -> bool:
        """Close a client's connection (its will is due); with ``cleanup`` drop its session."""
        session = self.sessions.get((mountpoint, client_id))
        if session is None:
            return False
        if session.client is not None:
            self.close_client(session.client, reason=Reason.ADMINISTRATIVE_ACTION)
        if cleanup and (mountpoint, client_id) in self.sessions:
            self.drop_session(session)
        return True

    def client_status(self, key: tuple[str, str]) -> tuple[str, dict[str, int]] | None:
        """Return (online or offline, {topic filter: QoS}) of a session; None when there is none (API v2)."""
        session = self.sessions.get(key)
        if session is None:
            return None
        return "online" if session.client is not None else "offline", {t: o.qos for t, o in session.subs.items()}

    def close_listener_clients(self, listener: Any) -> None:
        """Close every client of one listener (listener stop --kill_sessions, delete)."""
        for client in list(self.clients):
            if client.listener is listener:
                self.close_client(client, reason=Reason.ADMINISTRATIVE_ACTION)

    def trace(self, key: tuple[str, str], tracer: Any) -> None:
        """Start (or with None stop) tracing the client of ``key``, now and at its next CONNECT."""
        if tracer is None:
            self.tracers.pop(key, None)
        else:
            self.tracers[key] = tracer
        session = self.sessions.get(key)
        if session is not None and session.client is not None:
            session.client.tracer = tracer

    def disconnect_batch(self, count: int, mountpoint: str, cleanup: bool, keep: Iterable[str]) -> int:
        """Disconnect up to ``count`` online clients of a mountpoint, sparing ``keep``; return how many."""
        spared = set(keep)
        chosen = [s.client_id for (mp, cid), s in sorted(self.sessions.items())
                  if mp == mountpoint and s.client is not None and cid not in spared][:count]
        for client_id in chosen:
            self.disconnect(client_id, mountpoint, cleanup)
        return len(chosen)

    def admin_unsubscribe(self, client_id: str, topic: str, mountpoint: str = "") -> bool:
        """Remove one subscription of a session; return whether it existed."""
        session = self.sessions.get((mountpoint, client_id))
        return session is not None and self.unsubscribe(session, topic)

    def reauthorize(self, username: str, client_id: str, mountpoint: str = "") -> int:
        """Check a session's subscriptions again as ``username``; drop the refused ones; return how many."""
        session = self.sessions.get((mountpoint, client_id))
        if session is None:
            return 0
        probe = Connection(None, None, ("", 0), None, self.ctx.now)
        probe.user, probe.session = username, session
        refused = [t for t in list(session.subs) if not self.gate.acl(probe, "read", split_shared(t)[1])]
        for topic_filter in refused:
            self.unsubscribe(session, topic_filter)
        return len(refused)

    def delete_expired_retained(self) -> int:
        """Delete the retained messages whose MQTT 5 Message Expiry Interval has passed; return how many."""
        expired = self.router.expired_retained(self.ctx.now)
        for mountpoint, topic in expired:
            self.delete_retained(mountpoint, topic)
        return len(expired)

    def restore(self, retained: Iterable[tuple[str, Message]], sessions: Iterable[tuple[str, str, int | None]],
                subscriptions: Iterable[tuple[str, str, str, int]],
                queues: Iterable[tuple[str, str, int, int, int, int]], now: float) -> None:
        """Rebuild state from the message store after a restart (offline time counts from ``now``).

        Queued messages stay in the store: ``queues`` says how many each session has (and their
        bytes); they are read a page at a time once the session is back online.
        """
        self.ctx.now = now
        for mountpoint, msg in retained:
            self.router.restore_retained(mountpoint, msg)
            self._next_ref = max(self._next_ref, msg.ref)
        for mountpoint, client_id, expiry in sessions:
            self.add_session(mountpoint, client_id, expiry)
            self.seam.session_changed((mountpoint, client_id))
            self.mountpoints.add(mountpoint)
        for mountpoint, client_id, topic_filter, packed in subscriptions:
            session = self.sessions.get((mountpoint, client_id))
            if session is not None:
                opts = SubOptions.unpack(packed)
                self.router.add(session, topic_filter, opts)
                session.subs[topic_filter] = opts
        for mountpoint, client_id, waiting, size, parked, last_ref in queues:
            session = self.sessions.get((mountpoint, client_id))
            if session is not None:
                session.stored, session.stored_bytes, session.parked = waiting or 0, size or 0, parked or 0
                session.queue_bytes = session.stored_bytes
                self.delivery.queued_bytes += session.stored_bytes
            self._next_ref = max(self._next_ref, last_ref or 0)

    def session_keys(self, client_id: str | None = None) -> list[tuple[str, str]]:
        """Return the sorted (mountpoint, client id) of every session; for one client id, a lookup per mountpoint."""
        if client_id is None:
            return sorted(self.sessions)
        return [key for key in ((mp, client_id) for mp in sorted(self.mountpoints)) if key in self.sessions]

    def session_records(self, keys: Iterable[tuple[str, str]], subscriptions: bool = True,
                        messages: bool = True) -> list[dict]:
        """Return every session show field of the sessions of ``keys`` that still exist.

        The per-subscription and per-message lists are built only when asked for.
        """
        sessions = self.sessions
        return [session_record(sessions[key], subscriptions, self.stored_messages(sessions[key]) if messages
                               else None) for key in keys if key in sessions]

    def session_rows(self, keys: Iterable[tuple[str, str]], columns: Sequence[str]) -> list[dict]:
        """Return finished session show rows (``columns``, alphabetical) for listings without filters."""
        sessions = self.sessions
        if tuple(columns) == SESSION_DEFAULT_COLUMNS:
            return [_default_row(sessions[key]) for key in keys if key in sessions]
        getters = [(c, SESSION_GETTERS[c]) for c in columns]
        return [{c: get(sessions[key]) for c, get in getters} for key in keys if key in sessions]

    def stored_messages(self, s: Session) -> list[tuple]:
        """Return the messages of a session that wait only in the store (session show asked for them)."""
        found: list[tuple] = []
        if s.parked:
            found += self.store.load_inflight(s.mountpoint, s.client_id)
        after = s.loaded_upto
        while len(found) < s.stored + s.parked:
            page = self.store.load_queue(s.mountpoint, s.client_id, after)
            if not page:
                break
            found += page
            after = page[-1][2]
        return found

    def retained_rows(self, mountpoint: str | None = None) -> list[dict]:
        """Return (mountpoint, topic, payload) of each retained message."""
        return self.router.retained_rows(mountpoint)


###############################################################################
# 17. Engine: packets and time ################################################
###############################################################################
# Owns: what each packet means (one dispatch table from connection state and
#       packet type to its handler), acknowledgements, subscriptions, deadlines
#       and the tick; the engine as its parts put together.
# Must not know: sockets, the clock (``now`` comes with every entry point),
#       other nodes (only through ``ClusterSeam``, the one the cluster hands to
#       ``join_cluster``).

ENGINE_PARTS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    # part -> its operations that the engine offers as its own (the I/O shell, the node, the commands, the
    # cluster, the bridge and webhooks call them on the engine); each is the part's bound method
    "output": ("emit", "emit_packet", "request_close", "take_dirty"),
    "delivery": ("route", "deliver", "complete", "resend", "queue_full", "send_retained", "cancel_handout", "retain",
                 "delete_retained", "retry_big", "save_drops", "hand_out", "handout_ready", "writable_again"),
    "gate": ("set_rules", "lets_in_unasked", "authenticate", "acl", "acl_check"),
    "life": ("new_ref", "connection_made", "connection_lost", "say_disconnect", "refuse_packet", "goodbye",
             "close_client", "take_will", "send_will", "add_session", "drop_session", "set_expiry", "accept", "refuse",
             "refuse_busy", "subscribe", "unsubscribe", "disconnect", "client_status", "close_listener_clients",
             "trace", "disconnect_batch", "admin_unsubscribe", "reauthorize", "delete_expired_retained", "restore",
             "session_keys", "session_records", "session_rows", "retained_rows"),
})


def _part_attribute(part: str, name: str) -> property:
    """An attribute of the engine that is its part's."""
    def get(self: Engine) -> Any:
        return getattr(getattr(self, part), name)

    def put(self: Engine, value: Any) -> None:
        setattr(getattr(self, part), name, value)
    return property(get, put, doc=f"``{part}.{name}``")


class Engine:
    """MQTT 3.1/3.1.1/5.0 broker state, driven by packets; output goes to each Connection's outbox.

    Composed of parts, each built with what it uses: ``ctx`` (the settings in force and
    ``now``), ``output``, ``delivery``, ``gate`` (authentication and ACL), ``life``
    (``Sessions``: connections and sessions). Other nodes are asked through ``seam``, the
    parts' ``ClusterSeam``: ``NO_CLUSTER`` until the cluster hands its own to ``join_cluster``.
    The operations of ``ENGINE_PARTS`` are the engine's own names. Entry points: ``connection_made``, ``handle(conn, packet, now)``,
    ``deadline``, ``tick(now)``, ``connection_lost`` and the admin operations of ``Sessions``.
    """

    now = _part_attribute("ctx", "now")
    packet_limits = _part_attribute("ctx", "packet_limits")
    dirty = _part_attribute("output", "dirty")
    queued_bytes = _part_attribute("delivery", "queued_bytes")
    unsent_bytes = _part_attribute("delivery", "unsent_bytes")
    big_waiters = _part_attribute("delivery", "big_waiters")
    anonymous_default = _part_attribute("gate", "anonymous_default")
    persistent = _part_attribute("life", "persistent")
    new_client_id = _part_attribute("life", "new_client_id")

    def __init__(self, settings: Callable[[], Config], store: Store, hooks: Any, new_client_id: Callable[[], str],
                 choose: Callable[[Sequence[Any]], Any], now: float = 0.0):
        self.ctx = ctx = Context(settings, now)
        self.store, self.hooks, self.router = store, hooks, Router(choose)
        self.counters: dict[tuple, int] = collections.defaultdict(int)
        self.sessions: dict[tuple[str, str], Session] = {}
        self.output = Output(ctx, self.counters, hooks, store)
        self.delivery = Delivery(ctx, self.output, self.router, store, hooks, self.counters, self.sessions)
        self.gate = Gate(ctx, hooks)
        self.life = Sessions(ctx, self.delivery, self.gate, store, hooks, new_client_id)
        self.seam: ClusterSeam = NO_CLUSTER
        self.clients, self.handouts, self.relays = self.life.clients, self.delivery.handouts, self.delivery.relays
        for part, names in ENGINE_PARTS.items():
            for name in names:
                setattr(self, name, getattr(getattr(self, part), name))
        self.refresh_settings = ctx.refresh
        self._tick_sessions: list[Session] = []  # what the next ticks still have to look at
        self._dispatch: dict[bool, dict[type, Callable[..., None]]] = {  # connected? -> packet type -> handler
            False: {Connect: self.life.on_connect, Auth: self.life.on_auth},
            True: {Publish: self.on_publish, Puback: self.on_puback, Pubrec: self.on_pubrec, Pubrel: self.on_pubrel,
                   Pubcomp: self.on_pubcomp, Subscribe: self.on_subscribe, Unsubscribe: self.on_unsubscribe,
                   Pingreq: self.on_pingreq, Disconnect: self.on_disconnect, Auth: self.life.on_auth},
        }

    def join_cluster(self, seam: ClusterSeam) -> None:
        """Ask ``seam`` (the cluster's ``Peers``) instead of ``NO_CLUSTER`` from now on: the node is in a cluster."""
        if self.seam is NO_CLUSTER:
            self.seam = self.delivery.seam = self.life.seam = seam

    def handle(self, client: Connection, packet: Any, now: float, raw: bytes = b"") -> None:
        """Act on one decoded packet from ``client``; ``raw`` is its wire form if it is a plain QoS 0 PUBLISH."""
        ctx = self.ctx
        ctx.now = client.last_seen = now
        if ctx.settings() is not ctx.config:
            ctx.refresh()
        handler = self._dispatch[client.connected].get(type(packet))
        if handler is None:
            if not client.connected:
                raise ProtocolError("the first packet must be CONNECT")  # [MQTT-3.1.0-1]
            raise ProtocolError(f"a client may not send {type(packet).__name__.upper()}")  # [MQTT-3.1.0-2] too
        handler(client, packet, raw)

    def gauges(self) -> dict[str, int]:
        """Return the live gauges."""
        clients = list(self.clients)  # copies, so another thread may read a consistent view
        return {"active_mqtt_connections": sum(1 for c in clients if c.connected),
                "total_active_connections": len(clients), "queue_processes": len(self.sessions),
                "router_subscriptions": self.router.subscription_count(),
                "retain_messages": self.router.retained_count()}

    # -- publishing -------------------------------------------------------
    def on_publish(self, client: Connection, p: Publish, raw: bytes = b"") -> None:
        """Route an incoming PUBLISH and acknowledge it; ``raw`` lets QoS 0 go out as it came in."""
        ctx, seam = self.ctx, self.seam
        self.counters["mqtt_publish_received", client.labels] += 1
        session, dialect = client.session, client.dialect
        if p.qos == 2 and p.packet_id in session.incoming:
            self.emit_packet(client, Pubrec(p.packet_id))  # a resent QoS 2 message is routed once
            return
        if ctx.max_rate:
            self.throttle(client)
        if seam.netsplit and not ctx.publish_in_netsplit:
            return self.refuse_unsaved(client, p, f"netsplit: {seam.netsplit}")
        if p.qos and self.store.error is not None:
            return self.refuse_unsaved(client, p)
        topic, props, expires = p.topic, (), None
        if p.properties:  # MQTT 5
            topic, props, expires, raw = self.publish_properties(client, p, raw)
        if p.qos == 2 and len(session.incoming) >= client.receive_max_in:  # (65535 packet ids: never MQTT 3)
            raise ReceiveMaxExceeded(f"more than {client.receive_max_in} QoS 2 messages unacknowledged")
        if len(topic) >= ctx.max_levels and topic.count("/") >= ctx.max_levels:  # a short topic cannot be deep
            raise TopicTooDeep(f"topic of more than {ctx.max_levels} levels (max_topic_levels)")
        reason, hooks = Reason.SUCCESS, self.hooks
        if props and ("payload_format_indicator", 1) in props and not utf8_payload(p.payload):
            msg, reason = None, Reason.PAYLOAD_FORMAT_INVALID  # MQTT 5.0 3.3.2.3.2: dropped, and said so
            self.counters["mqtt_publish_error", ()] += 1
        elif hooks.auth_on_publish or hooks.on_publish:
            msg = self.authorize_publish(client, p, topic, props, expires)
        elif self.acl(client, "write", topic):
            msg = Message(topic, p.payload, p.qos, p.retain, self.new_ref(), raw, dialect.v5, props, expires,
                          session.client_id, client.bridge)
        else:
            msg = None
        if msg is None:
            if not reason:
                self.counters["mqtt_publish_auth_error", ()] += 1
                reason = Reason.NOT_AUTHORIZED
        elif msg.qos and self.relays and (full := self.relay_full(session.mountpoint, msg)):
            return self.refuse_unsaved(client, p, full, Reason.QUOTA_EXCEEDED)  # kept by its publisher, not lost
        elif msg.qos and seam.full_nodes and seam.forwards_to_full(session.mountpoint, msg.topic):
            return self.refuse_unsaved(client, p, CLUSTER_FULL, Reason.QUOTA_EXCEEDED)  # refused, never dropped later
        elif msg.retain and self.retain(session.mountpoint, msg) is False:
            reason = Reason.QUOTA_EXCEEDED  # MQTT 5.0 3.4.2.1: max_retained_messages or max_retained_bytes
        elif not self.route(session.mountpoint, msg):
            reason = Reason.NO_MATCHING_SUBSCRIBERS  # MQTT 5.0 3.4.2.1
        if not p.qos:
            return
        if self.store.error is not None:  # the store failed while keeping this message
            return self.refuse_unsaved(client, p)
        if not reason or not dialect.reason_codes:  # MQTT 3.1.1 acknowledges a refused message as if delivered
            if p.qos == 1:
                self.emit(client, ack_frame(PUBACK, p.packet_id))  # the same bytes in MQTT 5
                self.counters["mqtt_puback_sent", dialect.success_labels] += 1
            else:
                session.incoming_for().add(p.packet_id)
                self.emit(client, ack_frame(PUBREC, p.packet_id))
                self.counters["mqtt_pubrec_sent", dialect.success_labels] += 1
            return
        kind = Puback if p.qos == 1 else Pubrec
        if kind is Pubrec and reason < REASON_FAILURE:
            session.incoming_for().add(p.packet_id)  # an error reason ends the exchange (MQTT 5.0 4.3.3)
        self.emit_packet(client, dialect.ack(kind, p.packet_id, reason))
        self.counters["mqtt_puback_sent" if kind is Puback else "mqtt_pubrec_sent", reason_labels(reason)] += 1

    def relay_full(self, mountpoint: str, msg: Message) -> str:
        """Say which bridge's full buffer a QoS 1/2 message would be dropped by ('' none).

        Refused before its acknowledgement, the publisher keeps it; dropped after, it would be lost.
        """
        if msg.bridged:
            return ""  # no bridge takes it
        size = message_bytes(msg)
        for session in self.relays.values():
            if session.mountpoint != mountpoint:
                continue
            qos = max((o.qos for f, o in session.subs.items() if topic_matches(f, msg.topic)), default=0)
            full = self.queue_full(session, session.client is not None, size) if qos else ""
            if full:  # at QoS 0 for the bridge it may be dropped: nothing was promised
                return f"the buffer of bridge {session.client_id[len(BRIDGE_CLIENT_PREFIX):]} is full ({full})"
        return ""

    def refuse_unsaved(self, client: Connection, p: Publish, text: str = STORE_DOWN,
                       reason: int = Reason.UNSPECIFIED_ERROR) -> None:
        """Refuse a PUBLISH the node cannot take now (the store cannot keep it, a netsplit, busy webhooks).

        MQTT 5 QoS 1/2 hears ``reason`` with ``text``, MQTT 3 QoS 1/2 is cut off (it resends), QoS 0 is dropped.
        """
        self.counters["mqtt_publish_error", ()] += 1
        if not p.qos:
            return  # nothing to acknowledge, so nothing to refuse
        if not client.dialect.reason_codes:
            return self.close_client(client)  # 3.1.1 has no negative acknowledgement
        kind = Puback if p.qos == 1 else Pubrec
        self.emit_packet(client, client.dialect.ack(kind, p.packet_id, reason, text))
        self.counters["mqtt_puback_sent" if kind is Puback else "mqtt_pubrec_sent", reason_labels(reason)] += 1

    def refuse_overloaded(self, client: Connection, p: Publish | Subscribe, text: str) -> None:
        """Refuse a PUBLISH or SUBSCRIBE the node cannot look at now: a temporary failure, never a refusal.

        Acknowledging a PUBLISH would lose it (MQTT 3.1.1 acknowledges refused messages as delivered),
        and MQTT 5's Not authorized tells the client not to retry: it hears 0x97 Quota exceeded instead.
        """
        if type(p) is Publish:
            self.counters["mqtt_publish_received", client.labels] += 1
            return self.refuse_unsaved(client, p, text, Reason.QUOTA_EXCEEDED)
        self.counters["mqtt_subscribe_received", client.labels] += 1
        self.counters["mqtt_subscribe_error", ()] += len(p.topics)
        props = client.dialect.reason_string(text)
        self.emit_packet(client, Suback(p.packet_id, (client.dialect.subscribe_quota,) * len(p.topics), props))
        self.counters["mqtt_suback_sent", client.labels] += 1

    def publish_properties(self, client: Connection, p: Publish, raw: bytes) -> tuple[str, tuple, float | None, bytes]:
        """Read an MQTT 5 PUBLISH's properties: (topic, properties to pass on, expiry time, raw frame or b"")."""
        topic, props, expires = p.topic, [], None
        for name, value in p.properties:
            if name == "topic_alias":  # MQTT 5.0 3.3.2.3.4
                if not 0 < value <= client.alias_max_in:
                    raise TopicAliasInvalid(f"topic alias {value} outside 1..{client.alias_max_in}")
                if topic:
                    client.aliases_in[value] = topic
                else:
                    topic = client.aliases_in.get(value)
                    if topic is None:
                        raise ProtocolError(f"topic alias {value} was never set")
                raw = b""  # the frame names an alias of this connection: it cannot be passed on
            elif name == "message_expiry_interval":
                expires = self.ctx.now + value
            elif name == "subscription_identifier":
                raise ProtocolError("a client PUBLISH with a subscription identifier")  # [MQTT-3.3.4-6]
            else:
                props.append((name, value))
        return topic, tuple(props), expires, raw

    def throttle(self, client: Connection) -> None:
        """Enforce max_message_rate: at the limit, ask the I/O shell to stop reading until the next second."""
        second = int(self.ctx.now)
        if client.rate_second != second:
            client.rate_second, client.rate_count = second, 0
        client.rate_count += 1
        if client.rate_count >= self.ctx.max_rate and not client.pause_for:
            if not client.out and not client.closing:
                self.output.dirty.append(client)
            client.pause_for = second + 1 - self.ctx.now

    def authorize_publish(self, client: Connection, p: Publish, topic: str, props: tuple = (),
                          expires: float | None = None) -> Message | None:
        """Ask auth_on_publish hooks, then vmq_acl; apply a hook's changes; call on_publish."""
        sid = client.session.key
        answer = run_auth_hooks(self.hooks.auth_on_publish, client.user, sid, p.qos, topic, p.payload, p.retain)
        if answer == "error" or (answer is None and not self.acl(client, "write", topic)):
            return None
        payload, qos, retain = p.payload, p.qos, p.retain
        if answer != "ok" and isinstance(answer, Mapping):  # "ok", the usual answer, skips the slow ABC check
            topic, payload = answer.get("topic", topic), answer.get("payload", payload)
            qos, retain = answer.get("qos", qos), answer.get("retain", retain)
            if not valid_topic_name(topic) or qos not in (0, 1, 2) or not isinstance(payload, bytes):
                log.error("auth_on_publish returned bad changes %r; refusing", answer)
                return None
        notify(self.hooks.on_publish, client.user, sid, qos, topic, payload, retain)
        return Message(topic, payload, qos, bool(retain), self.new_ref(), props=props, expires=expires,
                       origin=sid[1], bridged=client.bridge)

    def http_publish(self, peer: tuple, user: str | None, password: bytes | None, client_id: str,
                     mountpoint: str, p: Publish) -> str:
        """Publish a message that came over HTTP (vmq_http_pub) as client ``client_id`` would over MQTT.

        The credentials go through auth_on_register and vmq_passwd as a CONNECT's do (skipped
        when anonymous clients are let in, as for MQTT), the message through auth_on_publish
        and vmq_acl as a PUBLISH's. No session is made: a client connected with that id is left
        alone. Returns published, authentication_failed, authorization_failed, quota_exceeded, store_down,
        bridge_full or cluster_full.
        """
        if self.ctx.settings() is not self.ctx.config:
            self.ctx.refresh()
        probe = Connection(None, types.SimpleNamespace(mountpoint=mountpoint), peer, None, self.ctx.now)
        connect = Connect(client_id, username=user, password=password if user is not None else None)
        if self.authenticate(probe, connect, client_id, self.ctx.config):
            return "authentication_failed"
        probe.user, probe.session = user, Session(mountpoint, client_id, self.ctx.now)
        msg = self.authorize_publish(probe, p, p.topic, p.properties)
        if msg is None:
            self.counters["mqtt_publish_auth_error", ()] += 1
            return "authorization_failed"
        if msg.qos and self.store.error is not None:
            return "store_down"
        if msg.qos and self.relays and self.relay_full(mountpoint, msg):
            return "bridge_full"  # refused, not acknowledged and then dropped
        if msg.qos and self.seam.full_nodes and self.seam.forwards_to_full(mountpoint, msg.topic):
            return "cluster_full"
        if msg.retain and self.retain(mountpoint, msg) is False:
            return "quota_exceeded"  # max_retained_messages or max_retained_bytes: not routed either, as for MQTT
        self.route(mountpoint, msg)
        return "published"

    # -- acknowledgements -------------------------------------------------
    def on_puback(self, client: Connection, p: Puback, raw: bytes = b"") -> None:
        """QoS 1 delivered: forget it, send the next."""
        self.counters["mqtt_puback_received", client.dialect.ack_labels(p.reason_code)] += 1
        out = client.session.inflight.get(p.packet_id)
        if out is None or out.qos != 1:
            self.counters["mqtt_puback_invalid_error", ()] += 1
            return
        self.complete(client.session, p.packet_id)

    def on_pubrec(self, client: Connection, p: Pubrec, raw: bytes = b"") -> None:
        """QoS 2 received by the client: answer PUBREL [MQTT-4.3.3-1]; an MQTT 5 error reason ends it."""
        self.counters["mqtt_pubrec_received", client.dialect.ack_labels(p.reason_code)] += 1
        session, dialect, reason = client.session, client.dialect, Reason.SUCCESS
        out = session.inflight.get(p.packet_id)
        if out is None or out.qos != 2:
            self.counters["mqtt_pubrec_invalid_error", ()] += 1
            reason = dialect.ack_reason(Reason.PACKET_ID_NOT_FOUND)
        elif out.stage is Stage.SENT:
            if p.reason_code >= REASON_FAILURE:
                return self.complete(session, p.packet_id)  # MQTT 5.0 4.3.3: no PUBREL after an error
            out.stage, out.sent_at = Stage.RELEASED, self.ctx.now
            if out.row:
                self.store.mark_released(out.row)
        self.emit_packet(client, dialect.ack(Pubrel, p.packet_id, reason))
        self.counters["mqtt_pubrel_sent", dialect.ack_labels(reason)] += 1

    def on_pubrel(self, client: Connection, p: Pubrel, raw: bytes = b"") -> None:
        """The client releases a QoS 2 message it sent: answer PUBCOMP [MQTT-4.3.3-2]."""
        self.counters["mqtt_pubrel_received", client.dialect.ack_labels(p.reason_code)] += 1
        session, dialect = client.session, client.dialect
        known = p.packet_id in session.incoming
        reason = Reason.SUCCESS if known else dialect.ack_reason(Reason.PACKET_ID_NOT_FOUND)
        if known:  # a set, then: it holds an id
            session.incoming_for().discard(p.packet_id)
        self.emit_packet(client, dialect.ack(Pubcomp, p.packet_id, reason))
        self.counters["mqtt_pubcomp_sent", dialect.ack_labels(reason)] += 1

    def on_pubcomp(self, client: Connection, p: Pubcomp, raw: bytes = b"") -> None:
        """QoS 2 complete: forget it, send the next."""
        self.counters["mqtt_pubcomp_received", client.dialect.ack_labels(p.reason_code)] += 1
        out = client.session.inflight.get(p.packet_id)
        if out is None or out.stage is not Stage.RELEASED:
            self.counters["mqtt_pubcomp_invalid_error", ()] += 1
            return
        self.complete(client.session, p.packet_id)

    # -- subscriptions ----------------------------------------------------
    def on_subscribe(self, client: Connection, p: Subscribe, raw: bytes = b"") -> None:
        """Subscribe each filter (a failure code when invalid or refused), then send retained matches."""
        self.counters["mqtt_subscribe_received", client.labels] += 1
        session, dialect = client.session, client.dialect
        if self.seam.netsplit and not self.ctx.config["allow_subscribe_during_netsplit"]:
            return self.refuse_change(client, p, f"netsplit: {self.seam.netsplit}")
        if not session.clean and self.store.error is not None:  # its subscriptions could not be kept
            return self.refuse_change(client, p, STORE_DOWN)
        ids = [value for name, value in p.properties if name == "subscription_identifier"]  # MQTT 5
        if len(ids) > 1:
            raise ProtocolError("SUBSCRIBE with more than one subscription identifier")  # MQTT 5.0 3.8.2.1.2
        sub_id = ids[0] if ids else 0
        topics = [(t, o & 3) for t, o in p.topics]
        answer = run_auth_hooks(self.hooks.auth_on_subscribe, client.user, session.key, topics) \
            if self.hooks.auth_on_subscribe else None
        if isinstance(answer, list):
            if len(answer) != len(topics):
                log.error("auth_on_subscribe changed the number of topics; refusing")
                answer = "error"
            else:
                topics, answer = [(str(t), int(q)) for t, q in answer], "ok"
        codes, granted = [], []
        for (topic_filter, qos), (_, options) in zip(topics, p.topics):
            if qos not in (0, 1, 2):  # only a hook's answer can say so: it refused this one topic
                codes.append(dialect.hook_refusal(qos))
                self.counters["mqtt_subscribe_auth_error", ()] += 1
                continue
            valid = valid_subscription(topic_filter) and topic_filter.count("/") < self.ctx.max_levels
            shared, plain = split_shared(topic_filter)
            if options & 4 and shared is not None:  # (MQTT 3.1.1 options are a QoS alone)
                raise ProtocolError("No Local on a shared subscription")  # [MQTT-3.8.3-4]
            if not valid or answer == "error" or (answer is None and not self.acl(client, "read", plain)):
                codes.append(dialect.subscribe_failure(valid))
                self.counters["mqtt_subscribe_auth_error" if valid else "mqtt_subscribe_error", ()] += 1
                continue
            opts = dialect.sub_options(qos, options, sub_id, client.bridge)
            existed = topic_filter in session.subs
            if not existed and (0 < self.ctx.max_subs <= len(session.subs)
                                or 0 < self.ctx.max_subs_total <= self.router.subscription_count()):
                codes.append(dialect.subscribe_quota)
                self.counters["mqtt_subscription_quota_error", ()] += 1
                continue
            self.subscribe(session, topic_filter, opts)
            codes.append(qos)
            granted.append((topic_filter, opts, existed))
        self.emit_packet(client, Suback(p.packet_id, tuple(codes)))
        self.counters["mqtt_suback_sent", client.labels] += 1
        if granted:
            notify(self.hooks.on_subscribe, client.user, session.key, [(t, o.qos) for t, o, _ in granted])
        for topic_filter, opts, existed in granted:
            # no retained messages on shared subscriptions; Retain Handling 1: only if new, 2: never
            handling = opts.retain_handling
            if not topic_filter.startswith(SHARE_PREFIX) and handling != 2 and not (handling == 1 and existed):
                self.send_retained(session, topic_filter, opts)

    def on_unsubscribe(self, client: Connection, p: Unsubscribe, raw: bytes = b"") -> None:
        """Drop filters and answer UNSUBACK [MQTT-3.10.4-4]; MQTT 5 says per filter whether it existed."""
        self.counters["mqtt_unsubscribe_received", client.labels] += 1
        session = client.session
        if self.seam.netsplit and not self.ctx.config["allow_unsubscribe_during_netsplit"]:
            return self.refuse_change(client, p, f"netsplit: {self.seam.netsplit}")
        if not session.clean and self.store.error is not None:
            return self.refuse_change(client, p, STORE_DOWN)
        existed = [self.unsubscribe(session, topic_filter) for topic_filter in p.topics]
        notify(self.hooks.on_unsubscribe, client.user, session.key, list(p.topics))
        self.emit_packet(client, client.dialect.unsuback(p.packet_id, existed))
        self.counters["mqtt_unsuback_sent", client.labels] += 1

    def refuse_change(self, client: Connection, p: Subscribe | Unsubscribe, why: str) -> None:
        """Refuse a SUBSCRIBE or UNSUBSCRIBE the node cannot carry out now (a netsplit; a persistent
        session's while the store cannot write), every filter with 0x80 and, in MQTT 5, ``why``.

        MQTT 3.1.1 has no failure code in UNSUBACK (3.11.3): acknowledging would say the
        filters are gone while messages keep coming, so the connection is closed instead, as
        for a PUBLISH the node cannot take; the client unsubscribes again once it is back.
        """
        codes = (SUBACK_FAILURE,) * len(p.topics)  # MQTT 3.1.1 3.9.3, MQTT 5.0 3.9.3 and 3.11.3: 0x80
        text = client.dialect.reason_string(why)
        if isinstance(p, Subscribe):
            self.counters["mqtt_subscribe_error", ()] += len(codes)
            self.emit_packet(client, Suback(p.packet_id, codes, text))
            self.counters["mqtt_suback_sent", client.labels] += 1
            return
        self.counters["mqtt_unsubscribe_error", ()] += 1
        if not client.dialect.reason_codes:
            return self.close_client(client)
        self.emit_packet(client, Unsuback(p.packet_id, codes, text))
        self.counters["mqtt_unsuback_sent", client.labels] += 1

    def on_pingreq(self, client: Connection, p: Pingreq, raw: bytes = b"") -> None:
        """Answer PINGRESP [MQTT-3.12.4-1]."""
        self.counters["mqtt_pingreq_received", client.labels] += 1
        self.emit(client, PINGRESP_FRAME)
        self.counters["mqtt_pingresp_sent", client.labels] += 1

    def on_disconnect(self, client: Connection, p: Disconnect, raw: bytes = b"") -> None:
        """A goodbye: drop the will [MQTT-3.14.4-3] (MQTT 5: unless reason 0x04 asks for it) and close."""
        self.counters["mqtt_disconnect_received", client.dialect.disconnect_labels(p.reason_code)] += 1
        for name, value in p.properties:  # MQTT 5
            if name == "session_expiry_interval":
                if not client.expiry_at_connect and value:
                    raise ProtocolError("DISCONNECT sets a Session Expiry Interval CONNECT had at 0")
                self.set_expiry(client.session, None if value == 0xFFFFFFFF else value)  # [MQTT-3.14.2-2]
        client.clean_exit = p.reason_code != Reason.DISCONNECT_WITH_WILL
        self.close_client(client)

    # -- time -------------------------------------------------------------
    def deadline(self, client: Connection, now: float, partial_since: float | None = None) -> float | None:
        """Close ``client`` if one of its deadlines has passed; else return when the next one falls.

        The deadlines: CONNECT within mqtt_connect_timeout, a begun packet (``partial_since``)
        finished within mqtt_packet_timeout, a packet within 1.5 x keep-alive [MQTT-3.1.2-24].
        None: the client is closed, or has no deadline until it sends again.
        """
        if client.closed:
            return None
        self.ctx.now = now
        config = self.ctx.settings()
        due: list[float] = []
        if partial_since is not None:
            due.append(partial_since + config["mqtt_packet_timeout"] / 1000)
            if now >= due[-1]:
                self.counters["socket_close_timeout", ()] += 1
                self.close_client(client)  # a packet begun and never finished
                return None
        if client.connected:
            if client.keepalive:
                due.append(client.last_seen + 1.5 * client.keepalive)
                if now >= due[-1]:
                    self.counters["client_keepalive_expired", ()] += 1
                    self.close_client(client, reason=Reason.KEEP_ALIVE_TIMEOUT)
                    return None
        else:
            due.append(client.opened_at + config["mqtt_connect_timeout"] / 1000)
            if now >= due[-1]:
                self.close_client(client)  # no CONNECT in time
                return None
        return min(due) if due else None

    def tick(self, now: float) -> None:
        """Send delayed wills, retry unacknowledged messages, expire sessions.

        Each tick looks at up to TICK_BATCH sessions, going round, so ten thousand idle
        sessions never hold up deliveries for long. Connections keep their own deadlines
        (``deadline``), which the I/O shell times exactly.
        """
        self.ctx.now = now
        config = self.ctx.settings()
        retry = config["retry_interval"]
        limit = config["persistent_client_expiration"]
        expired = []
        if not self._tick_sessions:
            self._tick_sessions = list(self.sessions.values())
        batch, self._tick_sessions = self._tick_sessions[-TICK_BATCH:], self._tick_sessions[:-TICK_BATCH]
        for session in batch:
            if self.sessions.get(session.key) is not session:
                continue  # ended since the round began
            if session.client is not None:
                if session.inflight:
                    self.resend(session, retry)
                continue
            if session.will is not None and session.will[1] <= now:
                self.send_will(session.mountpoint, self.take_will(session))  # its Will Delay Interval has passed
            offline = now - session.offline_since if session.offline_since is not None else 0
            if session.relay:
                continue  # a bridge's session waits for its remote however long
            if (session.expiry is not None and offline > session.expiry) or (limit is not None and offline > limit):
                expired.append(session)
        for session in expired:
            self.drop_session(session)

###############################################################################
# 18. Message store ###########################################################
###############################################################################
# Owns: retained messages and persistent sessions (subscriptions, queued QoS 1/2
#       messages) in SQLite, committed once per batch of packets.
# Must not know: sockets, packets, the broker's in-memory shapes beyond Message.

MESSAGE_DB = "messages.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS retained (mountpoint TEXT, topic TEXT, payload BLOB, qos INTEGER, ref INTEGER,
                                     props BLOB, expires REAL, PRIMARY KEY (mountpoint, topic));
CREATE TABLE IF NOT EXISTS sessions (mountpoint TEXT, client_id TEXT, expiry INTEGER,
                                     PRIMARY KEY (mountpoint, client_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (mountpoint TEXT, client_id TEXT, filter TEXT, qos INTEGER,
                                          PRIMARY KEY (mountpoint, client_id, filter)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, mountpoint TEXT, client_id TEXT,
                                     topic TEXT, payload BLOB, qos INTEGER, msg_qos INTEGER, ref INTEGER,
                                     pid INTEGER DEFAULT 0, released INTEGER DEFAULT 0, props BLOB,
                                     expires REAL, extra TEXT);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (mountpoint, client_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS kept (id INTEGER PRIMARY KEY AUTOINCREMENT, peer TEXT, epoch INTEGER, seq INTEGER,
                                 kind INTEGER, body BLOB);
CREATE TABLE IF NOT EXISTS kept_marks (origin TEXT, epoch INTEGER, seq INTEGER, PRIMARY KEY (origin, epoch));
CREATE TABLE IF NOT EXISTS copies (home TEXT, row INTEGER, mountpoint TEXT, client_id TEXT, body BLOB,
                                   PRIMARY KEY (home, row));
CREATE INDEX IF NOT EXISTS copies_by_session ON copies (mountpoint, client_id);
"""
_PUT_SESSION = "INSERT OR REPLACE INTO sessions (mountpoint, client_id, expiry) VALUES (?, ?, ?)"
_ADDED_COLUMNS = {  # columns newer than the first stores: table -> ((name, type), ...)
    "messages": (("pid", "INTEGER DEFAULT 0"), ("released", "INTEGER DEFAULT 0"), ("props", "BLOB"),
                 ("expires", "REAL"), ("extra", "TEXT")),
    "retained": (("props", "BLOB"), ("expires", "REAL")),
    "sessions": (("expiry", "INTEGER"),),
}


def _dropped_key(mountpoint: str, client_id: str) -> str:
    """The meta key of a bridge session's count of dropped messages."""
    return f"dropped\x00{mountpoint}\x00{client_id}"


def _props_blob(props: tuple) -> bytes | None:
    return encode_properties(props) if props else None


def _blob_props(blob: bytes | None) -> tuple:
    return decode_properties(blob, 0, len(blob))[0] if blob else ()


def _extra_text(extra: Any) -> str | None:
    """Write a delivery's (retain flag, subscription ids) as text: ``1:3,4``."""
    return f"{int(extra[0])}:{','.join(map(str, extra[1]))}" if extra else None


def _text_extra(text: str | None) -> Any:
    if not text:
        return None
    flag, _, ids = text.partition(":")
    return (flag == "1", tuple(int(i) for i in ids.split(",") if i))


class StoreWatch(Protocol):
    """What a store tells of the queued messages it keeps and forgets (``MemoryStore.watch``)."""

    def added(self, mountpoint: str, client_id: str, row: int, msg: Message, qos: int) -> None:
        """A message queued for a persistent session was kept as ``row`` (``qos``: its delivery's)."""

    def deleted(self, row: int) -> None:
        """A kept message is done with (delivered, expired, dropped), or its QoS 2 delivery was released."""

    def ended(self, mountpoint: str, client_id: str) -> None:
        """A persistent session was forgotten with every message it had."""


class MemoryStore:
    """``message_store = memory``: nothing is kept across restarts."""

    error: str | None = None  # why the store cannot write now (None: it can)
    # told of every queued message kept and forgotten (the cluster's copies on a second node, queue_replicas)
    watch: StoreWatch | None = None

    def __init__(self):
        self.counters: dict[tuple, int] = collections.defaultdict(int)  # a metrics source

    def load(self) -> tuple[list, list, list, list]:
        """Return nothing to restore."""
        return [], [], [], []

    def load_queue(self, mountpoint: str, client_id: str, after: int) -> list:
        """Return nothing: no message is ever kept here."""
        return []

    def load_inflight(self, mountpoint: str, client_id: str) -> list:
        """Return nothing: no message is ever kept here."""
        return []

    def put_retained(self, mountpoint: str, msg: Message) -> None:
        """Keep nothing."""

    def delete_retained(self, mountpoint: str, topic: str) -> None:
        """Keep nothing."""

    def put_session(self, mountpoint: str, client_id: str, expiry: int | None = None, new: bool = False) -> None:
        """Keep nothing."""

    def delete_session(self, mountpoint: str, client_id: str) -> None:
        """Keep nothing."""

    def put_subscription(self, mountpoint: str, client_id: str, topic_filter: str, qos: int) -> None:
        """Keep nothing."""

    def delete_subscription(self, mountpoint: str, client_id: str, topic_filter: str) -> None:
        """Keep nothing."""

    def add_message(self, mountpoint: str, client_id: str, msg: Message, qos: int, extra: Any = None) -> int:
        """Keep nothing; 0 means no row."""
        return 0

    def delete_message(self, row: int) -> None:
        """Keep nothing."""

    def mark_sent(self, row: int, pid: int) -> None:
        """Keep nothing."""

    def mark_released(self, row: int) -> None:
        """Keep nothing."""

    def add_kept(self, peer: str, epoch: int, seq: int, kind: int, body: bytes) -> int:
        """Keep nothing; 0 means no row (the cluster keeps kept frames in memory only)."""
        return 0

    def delete_kept(self, rows: Iterable[int]) -> None:
        """Keep nothing."""

    def load_kept(self) -> list:
        """Return nothing: no kept frame is ever stored here."""
        return []

    def put_mark(self, origin: str, epoch: int, seq: int) -> None:
        """Keep nothing."""

    def delete_mark(self, origin: str, epoch: int) -> None:
        """Keep nothing."""

    def load_marks(self) -> list:
        """Return nothing."""
        return []

    def session_messages(self, mountpoint: str, client_id: str) -> list:
        """Return nothing: no message is ever kept here."""
        return []

    def put_copies(self, home: str, mountpoint: str, client_id: str, rows: Sequence[tuple[int, bytes]]) -> None:
        """Keep nothing."""

    def delete_copies(self, home: str | None, rows: Iterable[int] = (), session: tuple[str, str] | None = None,
                      whole: bool = False) -> None:
        """Keep nothing."""

    def load_copies(self, home: str | None = None, session: tuple[str, str] | None = None) -> list:
        """Return nothing."""
        return []

    def put_dropped(self, mountpoint: str, client_id: str, count: int) -> None:
        """Keep nothing."""

    def load_dropped(self, mountpoint: str, client_id: str) -> int:
        """Return 0: nothing is kept here."""
        return 0

    def commit(self) -> bool:
        """Nothing to commit: nothing acknowledged is ever lost here."""
        return True

    def settle(self) -> None:
        """Nothing waits."""

    def probe(self) -> None:
        """Nothing to try."""

    def close(self) -> None:
        """Nothing to close."""


STORE_PAGE = 100  # queued messages read from the store at a time, so memory never holds a whole stored queue
STORE_PAGE_BYTES = 1 << 20  # ... and at most about this many payload bytes per read
_SQLITE_OK = [("ok",)]  # what PRAGMA quick_check answers for a sound file (sqlite.org/pragma.html#pragma_quick_check)


def create_private_file(path: str) -> None:
    """Create ``path`` (mode 0600, whatever the umask) if missing; make an existing one 0600."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.name == "posix":
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _corrupt_store(path: str, detail: str | sqlite3.Error) -> ConfigError:
    if isinstance(detail, sqlite3.Error) and _in_use(detail):
        return _file_in_use("the message store", path)
    detail = " ".join(str(detail).split())  # quick_check's lines, on the one line of the error
    return ConfigError(f"the message store {path} is corrupt ({detail}); vmqapi did not change it. Move it away "
                       "(the node then starts with no retained messages or persistent sessions) or restore it "
                       "from a backup, then start again")


def _in_use(exc: sqlite3.Error) -> bool:
    """Whether SQLite said busy or locked: another connection holds the file, which is not damage."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11 on
    return (code & 0xFF) in (5, 6) if isinstance(code, int) else "is locked" in str(exc)  # SQLITE_BUSY, _LOCKED


def _file_in_use(what: str, path: str) -> ConfigError:
    return ConfigError(f"{what} {path} is in use by another process (database is locked); vmqapi did not change "
                       "it. Stop what holds it (a second node on this data dir, a tool with the file open) and "
                       "start again")


class SqliteStore(MemoryStore):
    """SQLite in WAL mode; ``commit`` once per batch makes acknowledged messages survive kill -9.

    A write that fails (disk full, I/O error) never raises: it sets ``error`` and is counted
    in ``store_error``; the broker then refuses QoS 1/2 messages until a write succeeds again
    (``probe`` tries one).
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        for suffix in ("", "-wal", "-shm"):  # SQLite gives -wal and -shm the database file's mode
            require_regular_file(path + suffix, "the message store")
            if suffix == "" or os.path.exists(path + suffix):
                try:
                    create_private_file(path + suffix)
                except OSError as exc:
                    raise ConfigError(f"cannot open the message store {path}{suffix}: {exc.strerror}") from None
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the message store {path}: {exc}") from None
        try:
            self._check()
            self._prepare()
            self._next_row = self._last_row()
            self._next_kept = self.db.execute("SELECT MAX(id) FROM kept").fetchone()[0] or 0
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise _corrupt_store(path, exc) from None
        except BaseException:
            self.db.close()
            raise
        self._dirty = False
        self._promised = False  # the open transaction holds messages a QoS 1/2 publisher may hear were kept
        self._lost = False  # a transaction that failed since the last commit held such messages
        self._kept_rows: list[tuple] = []  # kept frames of this batch, written at its commit
        self._new_sessions: list[tuple] = []  # rows of sessions just made, written with the next write (put_session)
        self._new_unsaved: list[tuple] = []  # those written into the open transaction: waiting again if it fails

    def _check(self) -> None:
        """Refuse a damaged file before anything writes to it."""
        try:
            found = self.db.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            raise _corrupt_store(self.path, exc) from None
        if found != _SQLITE_OK:
            raise _corrupt_store(self.path, "; ".join(str(row[0]) for row in found[:3]))

    def _prepare(self) -> None:
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across process crashes
            self.db.executescript(_SCHEMA)
            for table, added in _ADDED_COLUMNS.items():
                columns = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                for column, kind in added:
                    if column not in columns:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")  # an older store
        except sqlite3.DatabaseError as exc:
            raise _corrupt_store(self.path, exc) from None
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the message store {self.path}: {exc}") from None

    def _last_row(self) -> int:
        """Return the highest message row id ever given out (row ids are never reused, even after a failure)."""
        ids = [self.db.execute("SELECT MAX(id) FROM messages").fetchone()[0] or 0]
        ids += [row[0] for row in self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'")]
        return max(ids)

    def _failed(self, exc: sqlite3.Error) -> None:
        """Note a failed write: the transaction is gone (SQLite rolls it back on a full disk, so do we), and
        with it whatever it held that the batch's answers promise (``commit`` then says so)."""
        self._lost, self._promised = self._lost or self._promised, False
        if self.error is None:
            log.error("the message store %s cannot write: %s; QoS 1/2 messages are refused until it can",
                      self.path, exc)
        self.error = str(exc)
        self.counters["store_error", ()] += 1
        with contextlib.suppress(sqlite3.Error):
            self.db.rollback()
        self._dirty = False
        self._new_sessions[:0], self._new_unsaved = self._new_unsaved, []  # they wait for the next write again

    def _run(self, sql: str, args: tuple) -> bool:
        self._dirty = True
        try:
            if self._new_sessions:
                self._write_new_sessions()
            self.db.execute(sql, args)
        except sqlite3.Error as exc:
            self._failed(exc)
            return False
        return True

    def load(self) -> tuple[list, list, list, list]:
        """Return (retained, sessions, subscriptions, queue summaries); queued messages stay on disk.

        A queue summary is (mountpoint, client id, messages waiting, their bytes, messages in
        flight, highest message reference).
        """
        q = self.db.execute
        try:
            retained = [(mp, Message(t, p, qos, True, ref, props=_blob_props(props), expires=expires))
                        for mp, t, p, qos, ref, props, expires in
                        q("SELECT mountpoint, topic, payload, qos, ref, props, expires FROM retained")]
            sessions = list(q("SELECT mountpoint, client_id, expiry FROM sessions"))
            subs = list(q("SELECT mountpoint, client_id, filter, qos FROM subscriptions"))
            queues = list(q("SELECT mountpoint, client_id, SUM(pid = 0), "  # length() reads no payload
                            "SUM(CASE WHEN pid = 0 THEN length(payload) + length(topic) ELSE 0 END), "
                            "SUM(pid != 0), MAX(ref) FROM messages GROUP BY mountpoint, client_id"))
        except sqlite3.DatabaseError as exc:
            raise _corrupt_store(self.path, exc) from None
        return retained, sessions, subs, queues

    def _messages(self, where: str, args: tuple, limit: int = -1) -> sqlite3.Cursor:
        return self.db.execute("SELECT id, topic, payload, qos, msg_qos, ref, pid, released, props, expires, extra "
                               f"FROM messages WHERE mountpoint = ? AND client_id = ? AND {where} ORDER BY id LIMIT ?",
                               (*args, limit))

    def load_queue(self, mountpoint: str, client_id: str, after: int) -> list:
        """Return the next page of a session's waiting messages after row ``after``: (msg, qos, row, extra)."""
        page, size = [], 0
        try:
            for row, t, p, qos, mq, ref, _pid, _rel, props, expires, extra in self._messages(
                    "pid = 0 AND id > ?", (mountpoint, client_id, after), STORE_PAGE):
                page.append((Message(t, p, mq, False, ref, props=_blob_props(props), expires=expires), qos, row,
                             _text_extra(extra)))
                size += len(p)
                if size >= STORE_PAGE_BYTES:
                    break
        except sqlite3.Error as exc:
            log.error("cannot read the queue of %r from the message store: %s", client_id, exc)
            self.counters["store_error", ()] += 1
        return page

    def load_inflight(self, mountpoint: str, client_id: str) -> list:
        """Return a session's QoS 2 messages in flight when the node stopped: (msg, qos, row, pid, released, extra)."""
        try:
            return [(Message(t, p, mq, False, ref, props=_blob_props(props), expires=expires), qos, row, pid,
                     bool(released), _text_extra(extra))
                    for row, t, p, qos, mq, ref, pid, released, props, expires, extra in
                    self._messages("pid != 0", (mountpoint, client_id))]
        except sqlite3.Error as exc:
            log.error("cannot read the messages in flight to %r from the message store: %s", client_id, exc)
            self.counters["store_error", ()] += 1
            return []

    def put_retained(self, mountpoint: str, msg: Message) -> None:
        """Store or replace a retained message."""
        if self._run("INSERT OR REPLACE INTO retained (mountpoint, topic, payload, qos, ref, props, expires) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (mountpoint, msg.topic, msg.payload, msg.qos, msg.ref, _props_blob(msg.props), msg.expires)):
            self._promised = self._promised or msg.qos > 0

    def delete_retained(self, mountpoint: str, topic: str) -> None:
        """Delete a retained message."""
        self._run("DELETE FROM retained WHERE mountpoint = ? AND topic = ?", (mountpoint, topic))

    def put_session(self, mountpoint: str, client_id: str, expiry: int | None = None, new: bool = False) -> None:
        """Record a persistent session and how long it outlives its connection (None: no limit of its own).

        The row of a ``new`` session (one a CONNECT just made) waits for the next write of a
        session, subscription, message or kept frame, and goes first in its transaction, or for
        ``settle``: its CONNACK says "no session present", which stays true of a session lost to a
        crash before that commit, so the CONNACK need not wait for one. Anything that makes the
        session worth keeping (a subscription, a queued message) is such a write, and commits the
        row with it; a transaction that fails puts the row back to wait.
        """
        row = (mountpoint, client_id, expiry)
        if new:
            self._new_sessions.append(row)
            return
        if self._new_sessions or self._new_unsaved:  # a row that waits, or would wait again: with this expiry
            self._new_sessions = [row if waiting[:2] == row[:2] else waiting for waiting in self._new_sessions]
            self._new_unsaved = [row if waiting[:2] == row[:2] else waiting for waiting in self._new_unsaved]
        self._run(_PUT_SESSION, row)

    def delete_session(self, mountpoint: str, client_id: str) -> None:
        """Forget a session with its subscriptions and messages (and a bridge's, its count of drops); as a
        subscription, a delete that fails loses the batch's answers (a restart would bring the session back)."""
        key = (mountpoint, client_id)
        if self._new_sessions or self._new_unsaved:  # its row, if still waiting, must not come back
            self._new_sessions = [row for row in self._new_sessions if row[:2] != key]
            self._new_unsaved = [row for row in self._new_unsaved if row[:2] != key]
        self._promised = True  # what the batch answers (CONNACK "no session present", say) waits for the commit
        for table in ("sessions", "subscriptions", "messages"):
            self._run(f"DELETE FROM {table} WHERE mountpoint = ? AND client_id = ?", (mountpoint, client_id))
        if client_id.startswith(BRIDGE_CLIENT_PREFIX):
            self._run("DELETE FROM meta WHERE key = ?", (_dropped_key(mountpoint, client_id),))
        if self.watch is not None:
            self.watch.ended(mountpoint, client_id)

    def put_subscription(self, mountpoint: str, client_id: str, topic_filter: str, qos: int) -> None:
        """Store or replace a subscription; the batch's SUBACK leaves only once it is committed (a write or
        commit that fails loses it: the batch's connections are closed unanswered, as for a QoS 1 message)."""
        self._promised = True
        self._run("INSERT OR REPLACE INTO subscriptions VALUES (?, ?, ?, ?)", (mountpoint, client_id, topic_filter, qos))

    def delete_subscription(self, mountpoint: str, client_id: str, topic_filter: str) -> None:
        """Delete a subscription; as ``put_subscription``, the batch's UNSUBACK waits for the commit."""
        self._promised = True
        self._run("DELETE FROM subscriptions WHERE mountpoint = ? AND client_id = ? AND filter = ?",
                  (mountpoint, client_id, topic_filter))

    def add_message(self, mountpoint: str, client_id: str, msg: Message, qos: int, extra: Any = None) -> int:
        """Store a message queued for a persistent session; return its row id (0: it could not be stored)."""
        row = self._next_row + 1
        if not self._run("INSERT INTO messages (id, mountpoint, client_id, topic, payload, qos, msg_qos, ref, props, "
                         "expires, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (row, mountpoint, client_id, msg.topic, msg.payload, qos, msg.qos, msg.ref,
                          _props_blob(msg.props), msg.expires, _extra_text(extra))):
            return 0
        self._next_row, self._promised = row, self._promised or qos > 0
        if self.watch is not None:
            self.watch.added(mountpoint, client_id, row, msg, qos)
        return row

    def delete_message(self, row: int) -> None:
        """Delete a delivered message."""
        self._run("DELETE FROM messages WHERE id = ?", (row,))
        if self.watch is not None:
            self.watch.deleted(row)

    def mark_sent(self, row: int, pid: int) -> None:
        """Record the packet id a QoS 2 message went out with (a restart resends it with that id)."""
        self._run("UPDATE messages SET pid = ? WHERE id = ?", (pid, row))

    def mark_released(self, row: int) -> None:
        """Record that PUBREC came for a QoS 2 message (a restart resends PUBREL, not the message)."""
        self._run("UPDATE messages SET released = 1 WHERE id = ?", (row,))
        if self.watch is not None:  # the client has it: a session handed over or taken up again leaves it out
            self.watch.deleted(row)

    # -- kept frames for other nodes, and what this node has of theirs (Outbox and Inbox, in the cluster state) --
    def add_kept(self, peer: str, epoch: int, seq: int, kind: int, body: bytes) -> int:
        """Keep a frame for ``peer`` until it acknowledges it; return its row.

        The rows of a batch are written together when it commits (one statement for all of them).
        """
        self._next_kept += 1
        self._kept_rows.append((self._next_kept, peer, epoch, seq, kind, body))
        self._dirty = self._promised = True  # a publisher hears its message was kept once this commits
        return self._next_kept

    def _write_new_sessions(self) -> None:
        """Write the rows of new sessions (``put_session``) into the open transaction, before anything else."""
        rows, self._new_sessions = self._new_sessions, []
        self._new_unsaved += rows  # until the commit: a rollback puts them back to wait (``_failed``)
        self._dirty = True
        self.db.executemany(_PUT_SESSION, rows)

    def settle(self) -> None:
        """Write the rows of new sessions no write has taken along into the open transaction, which the
        caller's commit ends: each housekeeping round's (its batch's commit, which alone may say what
        the batch lost), and close's."""
        if self._new_sessions:
            try:
                self._write_new_sessions()
            except sqlite3.Error as exc:
                self._failed(exc)

    def _write_kept(self) -> None:
        rows, self._kept_rows = self._kept_rows, []
        try:
            if self._new_sessions:
                self._write_new_sessions()
            self.db.executemany("INSERT INTO kept (id, peer, epoch, seq, kind, body) VALUES (?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:
            self._lost = True  # their publishers' acknowledgements are in this batch
            self._failed(exc)

    def delete_kept(self, rows: Iterable[int]) -> None:
        """Forget kept frames a peer has acknowledged."""
        rows = [(row,) for row in rows if row]
        if rows and self._kept_rows:
            self._write_kept()  # an acknowledgement may come before the batch that kept them commits
        if rows:
            self._dirty = True
            try:
                self.db.executemany("DELETE FROM kept WHERE id = ?", rows)
            except sqlite3.Error as exc:
                self._failed(exc)

    def load_kept(self) -> list:
        """Return every kept frame, oldest first: (peer, epoch, seq, kind, body, row)."""
        return self._read_all("SELECT peer, epoch, seq, kind, body, id FROM kept ORDER BY id")

    def _read_all(self, sql: str) -> list:
        """Every row a query gives, at start; a damaged file stops the node, naming it."""
        try:
            return list(self.db.execute(sql))
        except sqlite3.DatabaseError as exc:
            raise _corrupt_store(self.path, exc) from None

    def put_mark(self, origin: str, epoch: int, seq: int) -> None:
        """Record the highest seq of (origin, epoch) this node has used."""
        self._run("INSERT OR REPLACE INTO kept_marks (origin, epoch, seq) VALUES (?, ?, ?)", (origin, epoch, seq))

    def delete_mark(self, origin: str, epoch: int) -> None:
        """Forget an old epoch's mark."""
        self._run("DELETE FROM kept_marks WHERE origin = ? AND epoch = ?", (origin, epoch))

    def load_marks(self) -> list:
        """Return every (origin, epoch, seq) recorded, the least recently written first."""
        return self._read_all("SELECT origin, epoch, seq FROM kept_marks ORDER BY rowid")

    # -- copies of other nodes' persistent sessions (queue_replicas = 2), by the row their home node gave --
    def session_messages(self, mountpoint: str, client_id: str) -> list:
        """Return a session's kept messages not yet released, in order: (row, msg, qos)."""
        try:
            return [(row, Message(t, p, mq, False, ref, props=_blob_props(props), expires=expires), qos)
                    for row, t, p, qos, mq, ref, _pid, _rel, props, expires, _extra in
                    self._messages("released = 0", (mountpoint, client_id))]
        except sqlite3.Error as exc:
            log.error("cannot read the messages of %r from the message store: %s", client_id, exc)
            self.counters["store_error", ()] += 1
            return []

    def put_copies(self, home: str, mountpoint: str, client_id: str, rows: Sequence[tuple[int, bytes]]) -> None:
        """Keep copies of messages (their row there, the message) of a session whose home is node ``home``; the
        kept frame they came in is acknowledged to ``home`` once they are committed (a failure loses that)."""
        self._dirty = self._promised = True
        try:
            self.db.executemany("INSERT OR REPLACE INTO copies (home, row, mountpoint, client_id, body) "
                                "VALUES (?, ?, ?, ?, ?)", [(home, row, mountpoint, client_id, body) for row, body in rows])
        except sqlite3.Error as exc:
            self._failed(exc)

    def delete_copies(self, home: str | None, rows: Iterable[int] = (), session: tuple[str, str] | None = None,
                      whole: bool = False) -> None:
        """Forget copies of ``home``'s messages: those ``rows``, all of ``session``'s, or (``whole``) every one;
        ``home`` None: ``session``'s of every home."""
        if home is None:
            if session is not None:
                self._run("DELETE FROM copies WHERE mountpoint = ? AND client_id = ?", session)
            return
        rows = [(home, row) for row in rows]
        if rows:
            self._dirty = True
            try:
                self.db.executemany("DELETE FROM copies WHERE home = ? AND row = ?", rows)
            except sqlite3.Error as exc:
                self._failed(exc)
        if session is not None:
            self._run("DELETE FROM copies WHERE home = ? AND mountpoint = ? AND client_id = ?", (home, *session))
        if whole:
            self._run("DELETE FROM copies WHERE home = ?", (home,))

    def load_copies(self, home: str | None = None, session: tuple[str, str] | None = None) -> list:
        """Return the copies kept (of ``home``'s, of ``session`` when given), in order: (home, row, mountpoint,
        client id, body)."""
        clauses, args = (["home = ?"], [home]) if home is not None else ([], [])
        if session is not None:
            clauses.append("mountpoint = ? AND client_id = ?")
            args += session
        where = "WHERE " + " AND ".join(clauses) if clauses else ""
        try:
            return list(self.db.execute(f"SELECT home, row, mountpoint, client_id, body FROM copies {where} "
                                        "ORDER BY home, row", args))
        except sqlite3.Error as exc:
            log.error("cannot read the copies of other nodes' sessions from the message store: %s", exc)
            self.counters["store_error", ()] += 1
            return []

    def put_dropped(self, mountpoint: str, client_id: str, count: int) -> None:
        """Record how many messages a bridge's session has dropped (committed with the batch that dropped them)."""
        self._run("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                  (_dropped_key(mountpoint, client_id), count))

    def load_dropped(self, mountpoint: str, client_id: str) -> int:
        """Return how many messages a bridge's session has dropped, over every run of the node."""
        try:
            key = _dropped_key(mountpoint, client_id)
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            log.error("cannot read the drops of %r from the message store: %s", client_id, exc)
            self.counters["store_error", ()] += 1
            return 0
        return row[0] if row and isinstance(row[0], int) else 0

    def commit(self) -> bool:
        """Commit what the last batch of packets changed.

        Return False when this batch's changes are lost and held messages that may have been
        acknowledged (the caller must not send those acknowledgements).
        """
        if self._kept_rows:
            self._write_kept()
        if self._dirty:
            try:
                self.db.commit()
            except sqlite3.Error as exc:
                self._failed(exc)
            else:
                self._dirty = False
                self._new_unsaved = []
                if self.error is not None:
                    log.warning("the message store %s writes again", self.path)
                self.error = None
        lost, self._lost, self._promised = self._lost, False, False
        return not lost

    def probe(self) -> None:
        """While ``error`` is set, try a small write; the housekeeping round's commit that ends it clears
        ``error`` when it succeeds (a commit here would clear what the open batch lost, unsaid)."""
        if self.error is not None:
            self._run("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (time.time(),))

    def close(self) -> None:
        """Commit and close."""
        self.settle()
        self.commit()
        self.db.close()


###############################################################################
# 19. Broker shell: plugin hooks, rule files, tracing #########################
###############################################################################
# Owns: what the engine is handed from outside: the hook registry (threads add to
#       it), the password and ACL files (read and reloaded), password hashing (with
#       its random salt) and packet tracing (with its clock).
# Must not know: sockets, packets' meaning.

PASSWD_SALT_BYTES = 12  # VerneMQ vmq_passwd: 12-byte salt, sha512(password ++ salt)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Return vmq_passwd's ``$6$<b64 salt>$<b64 sha512(password + salt)>``."""
    salt = secrets.token_bytes(PASSWD_SALT_BYTES) if salt is None else salt
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


class ReloadingFile:
    """A file parsed again when its mtime changes, checked at most every ``interval`` s."""

    def __init__(self, parse: Callable[[str], Any], empty: Any, on_error: Callable[[], None] = lambda: None,
                 what: str = "the file"):
        self._parse, self._empty, self._on_error, self._what = parse, empty, on_error, what
        self.path, self.value = "", empty
        self._signature: tuple | None = None
        self._checked = -1e18

    def get(self, path: str, interval: int, now: float) -> Any:
        """Return the parsed content of ``path`` (``empty`` when no path)."""
        if path != self.path:
            self.path, self._signature, self._checked = path, None, -1e18
        if not path:
            return self._empty
        if self._signature is None or (interval and now - self._checked >= interval):
            self._checked = now
            signature = ("failed",)
            try:
                st = os.stat(path)
                signature = (st.st_ino, st.st_mtime_ns, st.st_size)
                if signature != self._signature:
                    data = read_regular_file(path, MAX_RULES_FILE, self._what)[0]  # never blocks the loop
                    self.value = self._parse(data.decode("utf-8"))
                    self._signature = signature
            except (OSError, ValueError, UnicodeDecodeError, FileRefused) as exc:
                log.error("cannot load %s: %s; keeping the previous rules", path, getattr(exc, "text", exc))
                self._signature = signature  # a bad version is reported once, tried again when it changes
                self._on_error()
        return self.value


def check_passwd_file(path: str) -> None:
    """Raise FileRefused when the vmq_passwd file is not a regular file or too large (start-up; a missing
    or bad one is reported when it is read, and refuses every password meanwhile)."""
    with contextlib.suppress(OSError):
        read_regular_file(path, MAX_RULES_FILE, "vmq_passwd.password_file")


def check_acl_file(path: str) -> None:
    """Raise ConfigError naming the file and line when the vmq_acl file cannot be used (start-up)."""
    try:
        parse_acl(read_regular_file(path, MAX_RULES_FILE, "vmq_acl.acl_file")[0].decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"vmq_acl.acl_file {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") \
            from None
    except ValueError as exc:
        raise ConfigError(f"vmq_acl.acl_file {path}: {exc}") from None


class Hooks:
    """Python plugin hooks by VerneMQ hook name, called in the broker's thread.

    Each hook name is also an attribute holding a tuple of functions, so the
    broker's hot path pays one attribute read when nothing is registered.
    An ``auth_on_*`` hook returns ``"ok"``/True (allow), ``"next"``/None (ask the
    next plugin), ``"error"``/False (refuse) or a dict of changes (allow with
    them: ``topic``, ``payload``, ``qos``, ``retain`` for publish; for subscribe
    a list of (topic, qos) pairs replaces the request).

    ``on_auth_m5(username, subscriber_id, {"authentication_method": m,
    "authentication_data": d})`` runs MQTT 5 enhanced authentication: it answers
    like an ``auth_on_*`` hook, or with a dict ``{"reason": "success" |
    "continue_authentication", "authentication_data": bytes}``; "continue"
    sends the data to the client in AUTH and asks the hook again with its reply.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: list[tuple[str, Callable[..., Any], str, bool]] = []  # hook, fn, plugin, enabled
        self.builtin = dict.fromkeys(BUILTIN_PLUGINS, True)
        self._publish()

    def _publish(self) -> None:
        for name in HOOK_NAMES:
            setattr(self, name, tuple(fn for hook, fn, _, on in self._entries if hook == name and on))

    def register(self, name: str, fn: Callable[..., Any], plugin: str | None = None) -> None:
        """Add ``fn`` to hook ``name``; ``plugin`` (default: fn's module) groups it in plugin show."""
        if name not in HOOK_NAMES:
            raise ValueError(f"unknown hook {name!r}; hooks: {', '.join(HOOK_NAMES)}")
        with self._lock:
            self._entries.append((name, fn, plugin or getattr(fn, "__module__", None) or "python", True))
            self._publish()

    def unregister(self, name: str, fn: Callable[..., Any]) -> None:
        """Remove ``fn`` from hook ``name`` (webhooks deregister takes a hook's last endpoint away)."""
        with self._lock:
            self._entries = [e for e in self._entries if not (e[0] == name and e[1] is fn)]
            self._publish()

    def enable(self, plugin: str, on: bool) -> bool:
        """Turn a plugin's hooks on or off; return whether such a plugin exists."""
        with self._lock:
            if plugin in self.builtin:
                self.builtin[plugin] = on
                return True
            found = [e for e in self._entries if e[2] == plugin]
            self._entries = [(h, f, p, on if p == plugin else e) for h, f, p, e in self._entries]
            self._publish()
            return bool(found)

    def rows(self) -> list[dict]:
        """Return plugin show's rows: enabled plugins, their hooks and module:function/arity."""
        with self._lock:
            plugins: dict[str, list[tuple[str, str]]] = {}
            kinds = {}
            for plugin, hooks in BUILTIN_PLUGINS.items():
                if self.builtin[plugin]:
                    plugins[plugin] = [(h, f"{plugin}:{h}/{arity}") for h, arity in hooks]
                    kinds[plugin] = "application"
            for hook, fn, plugin, on in self._entries:
                if on:
                    plugins.setdefault(plugin, []).append((hook, f"{_mfa(fn)}"))
                    kinds.setdefault(plugin, "python")
        return [{"Plugin": p, "Type": kinds[p], "Hook(s)": "".join(h + "\n" for h, _ in hooks),
                 "M:F/A": "".join(m + "\n" for _, m in hooks)} for p, hooks in plugins.items()]


class Tracer:
    """Collects one client's packets, both ways, as lines; at most ``rate_max`` per ``rate_interval`` ms."""

    def __init__(self, client_id: str, rate_max: int = 10, rate_interval: int = 100, trunc: int = 200):
        self.client_id, self.rate_max, self.rate_interval, self.trunc = client_id, rate_max, rate_interval, trunc
        self._lock = threading.Lock()
        self._lines: collections.deque[str] = collections.deque(maxlen=100_000)
        self._window, self._in_window, self._skipped = 0.0, 0, 0

    def packet(self, direction: str, packet: Any, now: float) -> None:
        """Record one packet (``in`` from the client, ``out`` to it)."""
        window = now - now % (self.rate_interval / 1000)
        with self._lock:
            if window != self._window:
                if self._skipped:
                    self._lines.append(f"... {self._skipped} packets not shown (rate limit)")
                self._window, self._in_window, self._skipped = window, 0, 0
            self._in_window += 1
            if self._in_window > self.rate_max:
                self._skipped += 1
                return
            stamp = _dt.datetime.fromtimestamp(now, _dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
            arrow = "MQTT RECV" if direction == "in" else "MQTT SEND"
            self._lines.append(f"{stamp} {arrow}: CID: {self.client_id!r} {describe_packet(packet, self.trunc)}")

    def take(self) -> list[str]:
        """Return and forget the lines collected so far."""
        with self._lock:
            lines = list(self._lines)
            self._lines.clear()
            if self._skipped:
                lines.append(f"... {self._skipped} packets not shown (rate limit)")
                self._skipped = 0
        return lines


###############################################################################
# 20. MQTT connections: TCP, TLS and WebSocket links ##########################
###############################################################################
# Owns: bytes in and out of one connection: packets decoded per read and handed
#       to the engine with the time, input bounds (CONNECT; its share of the
#       node-wide partial-packet budget, which MqttIO keeps), deadlines, and one
#       write per batch of what its outbox holds.
# Must not know: HTTP, commands, what a packet means.

PARTIAL_BIG = 65536  # bytes: an unfinished packet this large grows in a bytearray, not by copying per read
WAIT_READ_AHEAD = 65536  # bytes read while a packet waits for webhook answers, so a peer that hangs up is seen
FD_RESERVE = 128  # file descriptors MQTT connections leave to the admin API, the store and the listeners
CONNECT_FIRST_BYTE = 0x10  # CONNECT, flags 0 [MQTT-3.1.0-1]: a new connection starting otherwise is closed at once
BATCH_SECONDS = 0.005  # one read's packets hold the loop this long at most; the rest waits for others' turn


def certificate_cn(cert: Mapping[str, Any] | None) -> str | None:
    """Return the common name of a peer certificate as ``ssl`` decodes it."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


AWAITING_MAX = 8 << 20  # bytes of a connection's output that may wait for other nodes' acknowledgements
AWAIT_FAILED = "a node that had to keep a copy of a message was removed first: publish it again"
AWAIT_TOO_LONG = "too much output waits for other nodes to keep what it acknowledges: publish again"


class Awaited:
    """What held output waits for: ``count`` acknowledgements from other nodes (queue_replicas = 2).

    ``settle`` counts one; a failed one (the node that was to commit it was removed) fails it
    whole. ``done`` runs once, when the count reaches 0 or it failed.
    """

    __slots__ = ("count", "done", "failed")

    def __init__(self, count: int, done: Callable[[], None], failed: bool = False):
        self.count, self.done, self.failed = count, done, failed

    def settle(self, ok: bool = True) -> None:
        """One acknowledgement came (``ok``), or will never come."""
        if self.count <= 0:
            return
        self.count = self.count - 1 if ok else 0
        self.failed = self.failed or not ok
        if self.count == 0:
            self.done()


class MqttLink(asyncio.Protocol):
    """One MQTT connection: decodes every packet of a read, then writes once.

    Reading pauses while the outgoing buffer is over its high-water mark (a peer gets
    answers only as fast as it takes them), and for ``throttle``; the connection's
    deadlines (CONNECT, keep-alive, a begun packet) are timed by one timer.
    """

    def __init__(self, listener: MqttListener, counted: bool = True):
        self.listener = listener
        self.io = listener.io
        self.counted = counted  # False inside a WsLink, which counts the socket itself
        self.transport: asyncio.Transport | None = None
        self.client: Connection | None = None
        self.buffer = b""  # the unfinished end of the last read
        self.big: bytearray | None = None  # an unfinished packet over PARTIAL_BIG, growing in place
        self.need = 0  # the whole size of ``big``
        self.held = 0  # unfinished bytes this link holds, counted in the node's partial_packet_budget
        self.writable = True
        self.closing = self.paused = False
        self.waiting = False  # a packet waits for webhook answers (the webhooks plugin): read and decode nothing more
        self.waiting_size = 0  # its bytes, counted in partial_packet_budget while it waits
        self.on_gone: Callable[[], Any] | None = None  # forgets its webhook call if the connection closes first
        self.on_ready: Callable[[], Any] | None = None  # a WsLink's: it may feed the frames it kept back
        self.reading = True
        self.fresh = True  # nothing received yet
        self.partial_since: float | None = None  # when the unfinished packet in ``buffer`` began
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.armed_connected = False  # whether the timer was set for a connected client
        self.stall: asyncio.TimerHandle | None = None
        self.unsent = 0  # bytes its transport held when it last paused writing (in the engine's unsent_bytes)
        self.peer = ("", 0)
        # output that waits for other nodes to commit what it acknowledges (queue_replicas = 2): [Awaited, chunks]
        self.awaiting: collections.deque[tuple[Awaited, list[bytes]]] = collections.deque()
        self.next_wait: Awaited | None = None  # what the next drain's output waits for
        self.awaiting_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.listener.admit():
            self.closing = True
            transport.abort()
            return
        self.attach(transport, time.time())

    def attach(self, transport: Any, opened_at: float) -> None:
        """Start the MQTT side of an admitted connection (``opened_at``: when its socket was accepted)."""
        self.transport = transport  # (asyncio's socket transports set TCP_NODELAY themselves)
        self.peer = tuple(transport.get_extra_info("peername") or ("", 0))[:2]
        identity = certificate_cn(transport.get_extra_info("peercert")) if self.listener.tls else None
        # mqtt_connect_timeout counts from the accept, handshakes included
        self.client = self.io.engine.connection_made(self, self.listener, self.peer, identity, opened_at)
        self.arm(time.time())

    def data_received(self, data: bytes) -> None:
        self.feed(data, time.perf_counter() + BATCH_SECONDS)

    def feed(self, data: bytes, turn_ends: float) -> None:
        """Decode ``data`` after what is kept; past ``turn_ends`` (a perf_counter time) the rest waits its turn."""
        if self.closing or self.client is None:
            return
        self.io.engine.counters["bytes_received", ()] += len(data)
        if self.fresh and data:
            self.fresh = False
            if data[0] != CONNECT_FIRST_BYTE:
                log.info("closing MQTT connection from %s: it did not begin with CONNECT", self.peer[0])
                self.io.engine.counters["mqtt_malformed_packet_error", ()] += 1
                self.abort()
                return
        if self.big is not None:
            self.big += data
            if len(self.big) < self.need:
                self.io.hold(self, len(self.big))
                return
            buf, self.big = bytes(self.big), None  # complete: one copy, then decoded as usual
        else:
            buf = self.buffer + data if self.buffer else data
        self._decode(buf, turn_ends=turn_ends)
        if self.waiting:
            self._reading()  # read ahead is bounded
        self.io.after_batch()

    def _max_size(self) -> int:
        config = self.io.settings()
        limit = config["max_message_size"]
        if self.client.connected:
            return limit
        return min(limit, config["max_connect_size"]) if limit else config["max_connect_size"]

    def _decode(self, buf: bytes, held: tuple | None = None, turn_ends: float | None = None) -> None:
        pos, engine, client, io = 0, self.io.engine, self.client, self.io
        now = time.time()
        if io.settings() is not io.rules_config:
            io.refresh_rules(now)  # a set of vmq_acl.* or vmq_passwd.* counts from the next packet
        max_size, connected = self._max_size(), client.connected
        engine.refresh_settings()
        limits = engine.packet_limits
        turn_ends = time.perf_counter() + BATCH_SECONDS if turn_ends is None else turn_ends
        try:
            if held is not None:  # it waited for webhook answers, which the gate has set
                engine.handle(client, held[0], now, held[1])
                max_size, connected = self._max_size(), client.connected
            while not self.closing and not self.paused and not self.waiting and not client.closing \
                    and not client.pause_for:
                start = pos
                result = decode_packet(buf, pos, max_size, client.proto, limits)  # CONNECT may change the version
                if result is None:
                    break
                packet, pos = result
                # A plain QoS 0 PUBLISH (first byte 0x30) is forwarded as the bytes it came in.
                frame = buf[start:pos] if buf[start] == 0x30 else b""
                if io.gate is None:
                    engine.handle(client, packet, now, frame)
                elif not io.gate(self, packet, frame, now):
                    self.waiting_size = pos - start  # a held CONNECT counts as an unfinished one
                    break  # held until its webhook answers come (release)
                if client.tracer is not None:
                    client.tracer.packet("in", packet, now)
                if client.connected != connected:  # accepted: max_message_size from the next packet on
                    max_size, connected = self._max_size(), client.connected
                if time.perf_counter() > turn_ends and pos < len(buf) and not client.pause_for:
                    self.throttle(0.0)  # the rest is decoded on a later turn of the loop
        except MalformedPacket as exc:
            log.info("closing MQTT connection from %s: %s", self.peer[0], exc.text)
            engine.counters[exc.metric, ()] += 1
            engine.refuse_packet(client, exc)
        except Exception:  # a bug: it costs this connection, never the node or its other clients
            log.exception("internal error on the MQTT connection from %s; closing it", self.peer[0])
            engine.close_client(client, reason=Reason.IMPLEMENTATION_SPECIFIC_ERROR)
        self._keep(buf, pos)

    def _keep(self, buf: bytes, pos: int) -> None:
        """Keep the unfinished end of ``buf`` (from ``pos``) for the next read, and time it."""
        if self.closing or self.client.closing or pos >= len(buf):
            self.buffer, self.partial_since = b"", None
            self.io.hold(self, 0 if self.closing or self.client.closing else self.waiting_size)
        else:
            now = time.time()
            began = self.partial_since is None or pos > 0  # a new packet has begun; mqtt_packet_timeout runs
            self.buffer = buf[pos:] if pos else buf
            if began:
                self.partial_since = now
            try:
                header = None if self.paused or self.waiting or self.client.pause_for else fixed_header(self.buffer)
            except MalformedPacket:
                header = None  # the next read's decode says so, and closes

            if header is not None and sum(header) > max(len(self.buffer), PARTIAL_BIG):
                self.big, self.need, self.buffer = bytearray(self.buffer), sum(header), b""
            # Complete packets left for a later turn (the 5 ms turn, max_message_rate, webhook answers) are not
            # unfinished: they are bounded per link by one read (reading pauses meanwhile) and WAIT_READ_AHEAD.
            deferred = self.paused or self.waiting or self.client.pause_for
            unfinished = 0 if deferred else len(self.buffer) or len(self.big or b"")
            self.io.hold(self, unfinished + self.waiting_size)
            if began:
                self.arm(now)
        if self.client.connected != self.armed_connected:
            self.arm(time.time())

    def arm(self, now: float) -> None:
        """Set the deadline timer for this connection's next deadline (the broker closes it once one passes)."""
        if self.client is None or self.closing:
            return
        self.armed_connected = self.client.connected
        when = self.io.engine.deadline(self.client, now, self.partial_since)
        if when is None:
            return
        if self.timer is not None:
            if self.timer_at <= when:
                return  # it fires first and sets the next one then
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.io.loop.call_later(max(0.0, when - now), self._deadline)

    def _deadline(self) -> None:
        self.timer = None
        self.arm(time.time())
        self.io.after_batch()

    def throttle(self, delay: float) -> None:
        """Read nothing more from this client for ``delay`` seconds (max_message_rate)."""
        if not self.paused and not self.closing:
            self.paused = True
            self._reading()
            self.io.loop.call_later(delay, self._unthrottle)

    def _unthrottle(self) -> None:
        self.paused = False
        if not self.closing:
            self._reading()
            if self.buffer:
                self.data_received(b"")

    def hold(self, on_gone: Callable[[], Any] | None = None) -> None:
        """Read nothing more until ``release``: the packet just decoded waits for webhook answers
        (``on_gone``: what to call if the connection closes before they come)."""
        self.waiting, self.on_gone = True, on_gone
        self._reading()

    def release(self, packet: Any, raw: bytes) -> None:
        """Hand the engine the packet that waited, then decode what came after it and read on."""
        self.waiting, self.waiting_size, self.on_gone = False, 0, None
        if self.closing or self.client is None or self.client.closed:
            return
        self._reading()
        self._decode(self.buffer, (packet, raw))
        self.io.after_batch()

    def _reading(self) -> None:
        """Read while neither throttled, nor holding answers the peer has not taken, nor waiting for webhooks
        with WAIT_READ_AHEAD bytes read (reading on while waiting sees a peer that hangs up, and forgets its call)."""
        want = self.writable and not self.paused and not self.closing \
            and not (self.waiting and len(self.buffer) >= WAIT_READ_AHEAD)
        if want != self.reading and self.transport is not None:
            self.reading = want
            (self.transport.resume_reading if want else self.transport.pause_reading)()
        if self.on_ready is not None and self.decoding():
            self.on_ready()

    def decoding(self) -> bool:
        """Whether a packet fed now would be decoded (not throttled, paused, waiting or closing)."""
        client = self.client
        return not (self.closing or self.paused or self.waiting or client is None or client.closing
                    or client.pause_for)

    def drain(self) -> None:
        """Send what the engine left in this connection's outbox in one write; then pause or close as it asked."""
        conn = self.client
        if self.closing or self.transport is None:
            conn.out.clear()
            return
        if conn.out:
            data = conn.out[0] if len(conn.out) == 1 else b"".join(conn.out)
            conn.out.clear()
            conn.out_bytes = 0
            if self.next_wait is not None and self.next_wait.count <= 0 and not self.awaiting:
                self.next_wait = None  # what it waited for came before any output did
            if self.next_wait is not None or self.awaiting:
                self._hold(data)
            else:
                self._write(conn, data)
        self._after_drain(conn)

    def _write(self, conn: Connection, data: bytes) -> None:
        self.io.engine.counters["bytes_sent", ()] += len(data)
        if conn.tracer is not None:
            self._trace_out(conn, data)
        self.transport.write(data)  # may call pause_writing: then resume_writing goes on
        if not self.writable:
            self._unsent(self.transport.get_write_buffer_size())
        if conn.held_back and self.writable:
            self.io.loop.call_soon(self._deliver_more)

    def _hold(self, data: bytes) -> None:
        """Keep output behind what it waits for (and behind output that waits already: the order holds)."""
        if self.next_wait is not None:
            self.awaiting.append((self.next_wait, [data]))
            self.next_wait = None
        else:
            self.awaiting[-1][1].append(data)
        self.awaiting_bytes += len(data)
        if self.awaiting_bytes > AWAITING_MAX:  # deliveries pile up behind acknowledgements that do not come
            log.info("closing %s: %d bytes of output wait for other nodes", self.client.session and
                     self.client.session.client_id, self.awaiting_bytes)
            self._give_up(AWAIT_TOO_LONG)

    def awaited(self, what: Awaited) -> None:
        """Something held output waits for has come (or failed: the connection closes, unacknowledged)."""
        conn = self.client
        if conn is None or self.closing or self.transport is None:
            return
        if what.failed:
            return self._give_up(AWAIT_FAILED)
        while self.awaiting and self.awaiting[0][0].count <= 0:
            _, chunks = self.awaiting.popleft()
            data = b"".join(chunks)
            self.awaiting_bytes -= len(data)
            self._write(conn, data)

    def _give_up(self, text: str) -> None:
        """Close the connection without its held output (what it acknowledges is resent by the client)."""
        self.awaiting.clear()
        self.next_wait, self.awaiting_bytes = None, 0
        self.client.out.clear()
        self.io.engine.close_client(self.client, reason=Reason.UNSPECIFIED_ERROR, text=text)
        self.io.loop.call_soon(self.io.after_batch)  # its DISCONNECT, its will

    def _after_drain(self, conn: Connection) -> None:
        if conn.pause_for:
            delay, conn.pause_for = conn.pause_for, 0.0
            self.throttle(delay)
        if conn.closing:
            self.closing = True
            self.transport.close()  # asyncio sends what is buffered first

    @staticmethod
    def _trace_out(conn: Connection, data: bytes) -> None:
        pos, now = 0, time.time()
        while pos < len(data):
            packet, pos = decode_packet(data, pos, 0, conn.proto)
            conn.tracer.packet("out", packet, now)

    def abort(self) -> None:
        """Close at once, dropping what is buffered (the peer is not reading, or never spoke MQTT)."""
        if self.client is not None:
            self.client.out.clear()
            if not self.client.closed:
                self.io.engine.close_client(self.client, close_link=False)
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def drop_partial(self) -> None:
        """Give up the unfinished packet (the node-wide partial_packet_budget is exceeded) and close."""
        self.buffer, self.big = b"", None
        self.io.hold(self, 0)
        self.abort()

    def pause_writing(self) -> None:
        self.writable = False
        if self.client is not None:
            self.client.writable = False
        self._reading()
        if self.stall is None:  # closing too: a close waits for the buffer, which a peer that never reads keeps full
            self.stall = self.io.loop.call_later(self.io.settings()["mqtt_write_timeout"] / 1000, self._stalled)

    def _unsent(self, size: int) -> None:
        """Tell the engine how many bytes this peer leaves unread in its transport (0: none that matter)."""
        self.io.engine.unsent_bytes += size - self.unsent
        self.unsent = size

    def resume_writing(self) -> None:
        self._unsent(0)
        self.writable = True
        if self.client is not None:
            self.client.writable = True
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        self._reading()
        self._deliver_more()

    def _deliver_more(self) -> None:
        conn = self.client
        if conn is not None and conn.held_back and self.writable and not self.closing:
            self.io.engine.writable_again(conn, time.time())
            self.io.after_batch()
        elif self.io.engine.handouts:
            self.io.schedule_handout()  # it may have waited for this connection

    def _stalled(self) -> None:
        self.stall = None
        if not self.writable and self.transport is not None:  # closing or not: its buffer never drained
            log.info("closing MQTT connection from %s: it left its answers unread", self.peer[0])
            self.io.engine.counters["socket_close_write_timeout", ()] += 1
            self.abort()
            self.io.after_batch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.listener.release()
        self.closing = True
        self.buffer, self.big = b"", None
        self.io.hold(self, 0)
        self._unsent(0)
        if self.on_gone is not None:  # its webhook call is not made (or its answer not used)
            on_gone, self.on_gone = self.on_gone, None
            on_gone()
        for handle in (self.timer, self.stall):
            if handle is not None:
                handle.cancel()
        if self.client is not None:
            self.client.out.clear()
            self.io.engine.connection_lost(self.client, time.time())
            self.io.after_batch()


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
WS_PATH = "/mqtt"  # README, "The MQTT broker"
WS_MAX_HANDSHAKE = 8192  # bytes of an opening handshake; a browser's is well under 1 KB
WS_CLOSE_PROTOCOL, WS_CLOSE_UNSUPPORTED, WS_CLOSE_TOO_BIG = 1002, 1003, 1009  # RFC 6455 7.4.1


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """Encode one unmasked, final server frame (RFC 6455 5.2)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def ws_decode(buf: bytes, pos: int, max_size: int) -> tuple[int, bool, bytes, int] | None:
    """Decode one client frame at ``buf[pos:]``: (opcode, fin, unmasked payload, next pos), or None.

    Raises WsError for an unmasked frame, reserved bits, a bad control frame or one over ``max_size``.
    """
    if len(buf) - pos < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    if b0 & 0x70:
        raise WsError(WS_CLOSE_PROTOCOL, "reserved bits set")  # RFC 6455 5.2: no extension was agreed
    if not b1 & 0x80:
        raise WsError(WS_CLOSE_PROTOCOL, "client frame not masked")  # RFC 6455 5.1
    opcode, fin, n, i = b0 & 0x0F, bool(b0 & 0x80), b1 & 0x7F, pos + 2
    if n >= 126:
        width = 2 if n == 126 else 8
        if len(buf) < i + width:
            return None
        n, i = int.from_bytes(buf[i:i + width], "big"), i + width
    if opcode >= 8 and (not fin or n > 125):
        raise WsError(WS_CLOSE_PROTOCOL, "bad control frame")  # RFC 6455 5.5
    if n > max_size:
        raise WsError(WS_CLOSE_TOO_BIG, f"frame of {n} bytes is over max_ws_frame_size")
    if len(buf) < i + 4 + n:
        return None
    mask, data = buf[i:i + 4], buf[i + 4:i + 4 + n]
    payload = (int.from_bytes(data, "little") ^ int.from_bytes(mask * (n // 4 + 1), "little")
               ).to_bytes(n + 4, "little")[:n] if n else b""
    return opcode, fin, payload, i + 4 + n


def ws_handshake(request: bytes, allowed_origins: tuple[str, ...] = ()) -> tuple[bytes, bool]:
    """Answer an opening handshake: (response bytes, accepted) (RFC 6455 4.2).

    A browser sends Origin with every handshake, and its page is not the user: another site's page
    could publish and subscribe through a local listener with the anonymous access of loopback.
    Only the node's own origin and ``allowed_origins`` are taken (RFC 6455 10.2).
    """
    lines = request.decode("iso-8859-1").split("\r\n")
    words = lines[0].split()
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    protocols = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
    key = headers.get("sec-websocket-key", "")
    if len(words) != 3 or words[0] != "GET" or words[1].split("?")[0] != WS_PATH:
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", False
    if headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in headers.get("connection", "").lower() \
            or headers.get("sec-websocket-version") != "13" or len(key) != 24 or "mqtt" not in protocols:
        return (b"HTTP/1.1 400 Bad Request\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n"), False
    origin = headers.get("origin")
    if origin is not None and not ws_origin_allowed(origin, headers.get("host", ""), allowed_origins):
        return b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", False
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").encode(), True


def ws_origin_allowed(origin: str, host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a page of ``origin`` may open a WebSocket to the node reached as ``host`` (its Host header)."""
    return is_own_origin(origin, host, ("http", "https")) or origin.strip().lower() in allowed


class WsTransport:
    """What an MqttLink needs of a transport, carried in WebSocket binary frames."""

    def __init__(self, transport: asyncio.Transport, link: WsLink):
        self._transport, self._link = transport, link

    def write(self, data: bytes) -> None:
        self._transport.write(ws_frame(2, data))

    def close(self) -> None:
        if not self._transport.is_closing():
            self._transport.write(ws_frame(8, (1000).to_bytes(2, "big")))
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def pause_reading(self) -> None:
        self._link.inner_reading(False)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def resume_reading(self) -> None:
        self._link.inner_reading(True)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class WsLink(asyncio.Protocol):
    """MQTT over WebSocket: the opening handshake, then frames in, MqttLink inside.

    The socket is counted against the listener's max_connections from the accept, and the
    handshake shares mqtt_connect_timeout with the CONNECT that must follow it.
    """

    def __init__(self, listener: MqttListener):
        self.listener = listener
        self.io = listener.io
        self.inner = MqttLink(listener, counted=False)
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.held = 0  # unfinished bytes, counted in the node's partial_packet_budget
        self.open = self.admitted = self.fragmented = False
        self.opened_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.wanted = self.reading = True  # whether the inner link reads; whether the socket is read
        self.kept = False  # ``buffer`` may hold whole frames kept back for a later turn of the loop
        self.turn: asyncio.Handle | None = None  # the later turn, when one is due
        self.inner.on_ready = self._ready

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.admitted = True
        if not self.listener.admit():
            self.open = False
            transport.abort()
            return
        self.opened_at = time.time()
        timeout = self.io.settings()["mqtt_connect_timeout"] / 1000
        self.timer = self.io.loop.call_later(timeout, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if not self.open and not self.transport.is_closing():
            self.io.engine.counters["socket_close_timeout", ()] += 1
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        self.buffer += data
        if not self.open and not self._handshake():
            return
        self._frames()

    def _handshake(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 and len(self.buffer) <= WS_MAX_HANDSHAKE:
            return False
        if end < 0 or end + 4 > WS_MAX_HANDSHAKE:  # whether it came in one read or many
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
            self.transport.close()
            return False
        allowed = self.io.settings()["websocket_allowed_origins"]
        answer, self.open = ws_handshake(bytes(self.buffer[:end]), allowed)
        self.transport.write(answer)
        if not self.open:
            self.transport.close()
            return False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        del self.buffer[:end + 4]
        self.inner.attach(WsTransport(self.transport, self), self.opened_at)
        return True

    def _frames(self) -> None:
        """Feed the inner link the frames read, for one turn of the loop (BATCH_SECONDS across all of them).

        Frames the inner link cannot take now (throttled, waiting for webhook answers, its turn over)
        stay in ``buffer``, unsliced, until it can; the socket is read meanwhile only up to
        WAIT_READ_AHEAD bytes kept (so a peer that hangs up is still seen).
        """
        pos, inner = 0, self.inner
        turn_ends = time.perf_counter() + BATCH_SECONDS
        self.kept = False
        try:
            while not inner.closing:
                if not inner.decoding() or time.perf_counter() > turn_ends:
                    self.kept = True
                    break
                frame = ws_decode(self.buffer, pos, self._max_frame())
                if frame is None:
                    break
                opcode, fin, payload, pos = frame
                if opcode in (0, 2):
                    if (opcode == 0) != self.fragmented:  # RFC 6455 5.4: a continuation needs a start, a start none
                        raise WsError(WS_CLOSE_PROTOCOL, "continuation frame out of place")
                    self.fragmented = not fin
                    inner.feed(payload, turn_ends)  # MQTT is a byte stream: fragments feed it as they come
                elif opcode == 1:  # inside a fragmented message a new data frame is itself a violation (5.4)
                    raise WsError(WS_CLOSE_PROTOCOL if self.fragmented else WS_CLOSE_UNSUPPORTED,
                                  "MQTT needs binary frames")
                elif opcode == 8:
                    self._close(int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000)
                    return
                elif opcode == 9:
                    self.transport.write(ws_frame(10, payload))  # ping -> pong, RFC 6455 5.5.2
                elif opcode != 10:
                    raise WsError(WS_CLOSE_PROTOCOL, f"unknown opcode {opcode}")
        except WsError as exc:
            log.info("closing WebSocket from %s: %s", self.inner.peer[0], exc.reason)
            self._close(exc.close_code)
            return
        del self.buffer[:pos]
        # Whole frames kept back are not unfinished: one read's worth at most (the socket waits meanwhile)
        self.io.hold(self, 0 if self.kept else len(self.buffer))
        if self.kept and inner.decoding() and self.turn is None:
            self.turn = self.io.loop.call_soon(self._next_turn)
        self._socket_reading()

    def _ready(self) -> None:
        """The inner link decodes again: the frames kept back get a turn soon."""
        if self.kept and self.turn is None:
            self.turn = self.io.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.turn = None
        if self.open and not self.transport.is_closing():
            self._frames()
            self.io.after_batch()

    def inner_reading(self, want: bool) -> None:
        """The inner link's pause_reading or resume_reading."""
        self.wanted = want
        self._socket_reading()

    def _socket_reading(self) -> None:
        want = self.wanted and not (self.kept and (self.turn is not None or len(self.buffer) >= WAIT_READ_AHEAD))
        if want != self.reading and not self.transport.is_closing():
            self.reading = want
            (self.transport.resume_reading if want else self.transport.pause_reading)()

    def _max_frame(self) -> int:
        config = self.io.settings()
        if self.inner.client is None or not self.inner.client.connected:  # nobody is known yet: a CONNECT's worth
            return min(config["max_ws_frame_size"], config["max_connect_size"])
        return config["max_ws_frame_size"]

    def _close(self, code: int) -> None:
        self.buffer = bytearray()
        self.io.hold(self, 0)
        if self.inner.client is not None:
            self.io.engine.close_client(self.inner.client, close_link=False)
            self.io.after_batch()
        if not self.transport.is_closing():
            self.transport.write(ws_frame(8, code.to_bytes(2, "big")))
            self.transport.close()

    def drop_partial(self) -> None:
        """Give up the unfinished frame (the node-wide partial_packet_budget is exceeded) and close."""
        self.buffer = bytearray()
        self.io.hold(self, 0)
        if self.inner.client is not None:
            self.inner.abort()
        else:
            self.transport.abort()

    def pause_writing(self) -> None:
        if self.open:
            self.inner.pause_writing()
        else:
            self.transport.pause_reading()  # a handshake answer is small; a peer that takes none waits

    def resume_writing(self) -> None:
        if self.open:
            self.inner.resume_writing()
        else:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.admitted:
            self.listener.release()
        if self.timer is not None:
            self.timer.cancel()
        if self.turn is not None:
            self.turn.cancel()
        self.buffer = bytearray()
        self.io.hold(self, 0)
        if self.open:
            self.inner.connection_lost(exc)


###############################################################################
# 21. MQTT listeners and the broker's loop ####################################
###############################################################################
# Owns: file descriptor limits, the MQTT listeners and the event loop
#       thread that runs the engine, drains outboxes after each commit, and
#       takes calls from other threads.
# Must not know: HTTP, the meaning of packets.

def descriptor_limit() -> int | None:
    """Return the soft limit on open file descriptors (None: unknown or unlimited)."""
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def raise_descriptor_limit() -> int | None:
    """Raise the soft file descriptor limit to the hard one (as far as the kernel allows); return the soft limit."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (hard, 1 << 20, 1 << 16):
        if wanted == resource.RLIM_INFINITY or wanted <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            break
        except (ValueError, OSError):
            continue  # above the kernel's nr_open: try a lower one
    return descriptor_limit()


def socket_budget() -> float:
    """Return how many MQTT sockets may be open at once so that FD_RESERVE descriptors stay for the rest."""
    soft = descriptor_limit()
    return math.inf if soft is None else max(1, soft - min(FD_RESERVE, soft // 4))


def _budget_order(link: Any) -> tuple[bool, int]:
    """Who goes first when the partial packet budget is exceeded: connections not yet accepted, then the biggest."""
    client = link.client if isinstance(link, MqttLink) else link.inner.client
    return client is not None and client.connected, -link.held


class MqttListener:
    """One MQTT listener (TCP, TLS, WebSocket or both): address, options, status and counters."""

    def __init__(self, io: MqttIO, name: str, address: tuple[str, int], options: Mapping[str, Any],
                 kind: str = "tcp"):
        self.io, self.name = io, name
        self.kind = MQTT_LISTENER_KINDS[kind]
        self.websocket = kind in ("ws", "wss")
        self.options = dict(options)
        self.tls = tls_context(options) if kind in ("ssl", "wss") else None
        self.use_identity_as_username = bool(self.tls) and options["use_identity_as_username"]
        self.address, self.port = address
        self.mountpoint = options["mountpoint"]
        self.max_connections = options["max_connections"]
        self.allowed_versions = options["allowed_protocol_versions"]
        self.allow_anonymous_override = options["allow_anonymous_override"]
        self.status = "running"
        self.active = self.all_conns = 0
        self.server: asyncio.base_events.Server | None = None

    def admit(self) -> bool:
        """Count a new socket; say whether to keep it (running, under max_connections, descriptors to spare)."""
        self.active += 1
        self.all_conns += 1
        io = self.io
        io.sockets += 1
        limit = self.max_connections
        if self.status != "running" or (limit is not None and self.active > limit):
            return False
        if io.sockets > io.socket_budget:
            io.engine.counters["socket_close_no_descriptors", ()] += 1
            if not io.warned_descriptors:
                io.warned_descriptors = True
                log.warning("refusing MQTT connections: %d are open, the most the file descriptor limit allows "
                            "while keeping some for the admin API and the store (raise ulimit -n)", io.sockets - 1)
            return False
        return True

    def release(self) -> None:
        """Uncount a socket that closed."""
        self.active -= 1
        self.io.sockets -= 1

    @property
    def loopback(self) -> bool:
        """Whether this listener accepts only local connections."""
        return ipaddress.ip_address(self.address).is_loopback

    def option(self, key: str) -> Any:
        """Return one of the listener's settings (None when it has no such one)."""
        return self.options.get(key)

    def suspend(self, kill_sessions: bool = False) -> None:
        """Stop accepting (suspended); with ``kill_sessions`` also close the clients (stopped)."""
        self.io.suspend_listener(self, kill_sessions)

    def resume(self) -> None:
        """Accept again on the same address and port; raise OSError when it is taken."""
        self.io.resume_listener(self)

    def delete(self) -> None:
        """Stop for good, close the clients and leave the loop's listeners."""
        self.io.delete_listener(self)

    def row(self, tls: bool = False, mqtt: bool = False) -> dict:
        """Return this listener's row of listener show."""
        row = {"type": self.kind, "status": self.status, "address": self.address, "port": str(self.port),
               "mountpoint": self.mountpoint, "max_conns": "infinity" if self.max_connections is None
               else self.max_connections, "active_conns": self.active, "all_conns": self.all_conns}
        if tls:
            row.update(tls_columns(self.options.get if self.tls else None))
        if mqtt:
            names = {3: "mqtt 3.1", 4: "mqtt 3.1.1", 5: "mqtt 5"}
            row["allowed_protocol_versions"] = ", ".join(names.get(v, str(v)) for v in self.allowed_versions)
            row["allow_anonymous_override"] = "on" if self.allow_anonymous_override else "off"
        return row


class MqttIO:
    """The broker's event loop thread: listeners, ticks, and calls from other threads."""

    def __init__(self, settings: Callable[[], Config], store: Any, metrics: Metrics, node_name: str,
                 hooks: Hooks | None = None):
        self.settings = settings
        self.store = store
        self.metrics, self.node_name = metrics, node_name
        self._systree_at = time.time()
        self.engine = Engine(settings, store, hooks, new_client_id=lambda: "anon-" + secrets.token_hex(8),
                             choose=random.choice, now=time.time())
        self._passwd = ReloadingFile(parse_passwd, {}, what="vmq_passwd.password_file")
        self._acl = ReloadingFile(parse_acl, None, self._acl_failed, what="vmq_acl.acl_file")
        self.rules_config: Config | None = None  # the Config the rules were last read for
        self.listeners: list[MqttListener] = []
        self.sockets = 0  # MQTT sockets open on every listener
        self.socket_budget = socket_budget()
        self.warned_descriptors = False
        self._resource_warned = -math.inf
        self.partial_bytes = 0  # unfinished packet and frame bytes held for all connections
        self.holders: set[Any] = set()  # the links holding some
        self.gate: Callable[..., bool] | None = None  # webhooks (plugins.vmq_webhooks) see packets first: handled, or held
        self.loop = asyncio.new_event_loop()
        self.big_retry: asyncio.Handle | None = None  # retry_big on the next turn of the loop
        self._thread = threading.Thread(target=self._run, name="vmqapi-mqtt", daemon=True)
        self._lock = threading.Lock()  # guards _waiting: other threads' questions to the loop
        self._waiting: set[concurrent.futures.Future] = set()
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick_error_at = 0.0  # when a failed tick was last logged
        self.batch_hooks: list[Callable[[], None]] = []  # run first in after_batch (the cluster's sends)
        self.commit_hooks: list[Callable[[], None]] = []  # run once a batch is committed (the cluster's acks)
        self.rollback_hooks: list[Callable[[], None]] = []  # run when its commit failed
        self._handout_handle: asyncio.Handle | None = None  # the next turn's retained messages (Engine.hand_out)
        self.session_total = 0  # len(engine.sessions) after the last batch, published for other threads

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(self._loop_error)
        try:
            self.loop.run_forever()
        finally:
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        """Answer the questions the stopped loop will never run: asked while it stopped, they get 503 now."""
        with self._lock:
            unanswered, self._waiting = list(self._waiting), set()
        for future in unanswered:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(BrokerStopped("the broker stopped before it answered"))

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """Log what asyncio reports; running out of descriptors is a condition, not a bug: no traceback."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self.engine.counters["socket_close_no_descriptors", ()] += 1
            now = time.monotonic()
            if now - self._resource_warned >= 10:  # asyncio retries the accept every second: say it now and then
                self._resource_warned = now
                log.warning("MQTT listeners wait: %s (raise ulimit -n)", exc.strerror)
            return
        loop.default_exception_handler(context)

    def start(self) -> None:
        """Start the loop thread and bind every MQTT listener; raise ConfigError on a failure."""
        self._thread.start()
        config = self.settings()
        for kind in MQTT_LISTENER_KINDS:
            for name, address in sorted(config.listeners(kind).items()):
                options = {o: config.listener_option(kind, name, o) for o in LISTENER_MQTT_OPTIONS}
                try:
                    self.open_listener(name, address, options, kind)
                except OSError as exc:  # ssl.SSLError too: a bad certificate or key file
                    raise ConfigError(f"cannot start listener.{kind}.{name} on {render_value(address)}: "
                                      f"{getattr(exc, 'strerror', None) or exc}") from None
        self.call(self._tick)

    def open_listener(self, name: str, address: tuple[str, int], options: Mapping[str, Any],
                      kind: str = "tcp") -> MqttListener:
        """Bind a new MQTT listener (from any thread but the loop's); raise OSError on failure."""
        listener = MqttListener(self, name, address, options, kind)
        self.call_async(self._bind(listener))
        self.call(self.listeners.append, listener)  # the loop owns the list (the tick and health walk it)
        return listener

    def find_listener(self, address: str, port: int) -> MqttListener | None:
        """Return the MQTT listener bound to address:port."""
        return next((x for x in self.listeners if (x.address, x.port) == (address, port)), None)

    def suspend_listener(self, listener: MqttListener, kill_sessions: bool = False) -> None:
        """Stop accepting; keep the clients (status suspended) or close them (status stopped)."""
        self.call_async(self._unbind(listener))
        if kill_sessions:
            self.call(self._kill_clients, listener)

    def resume_listener(self, listener: MqttListener) -> None:
        """Accept again on the same address and port; raise OSError on failure."""
        if self.read(lambda: listener.status) != "running":
            self.call_async(self._bind(listener))

    def delete_listener(self, listener: MqttListener) -> None:
        """Stop a listener, close its clients and forget it."""
        self.suspend_listener(listener, kill_sessions=True)
        self.call(self.listeners.remove, listener)

    async def _unbind(self, listener: MqttListener) -> None:
        listener.status = "suspended"  # written in the loop, where admit reads it
        if listener.server is not None:
            listener.server.close()  # stops accepting at once; its clients stay (wait_closed would wait for them)
            listener.server = None
            await asyncio.sleep(0)

    def _kill_clients(self, listener: MqttListener) -> None:
        self.engine.close_listener_clients(listener)
        listener.status = "stopped"

    async def _bind(self, listener: MqttListener) -> None:
        protocol = (lambda: WsLink(listener)) if listener.websocket else (lambda: MqttLink(listener))
        # A TLS socket reaches the listener's accounting only once its handshake is done (asyncio calls
        # connection_made then): the handshake therefore gets no longer than a CONNECT would.
        handshake = min(listener.options["tls_handshake_timeout"], self.settings()["mqtt_connect_timeout"]) / 1000
        listener.server = await self.loop.create_server(protocol, listener.address, listener.port, backlog=1024,
                                                        reuse_address=True, ssl=listener.tls,
                                                        ssl_handshake_timeout=handshake if listener.tls else None)
        listener.port = listener.server.sockets[0].getsockname()[1]
        listener.status = "running"

    def _tick(self) -> None:
        """Run the housekeeping; whatever fails is logged and counted, and the next tick is always due."""
        delay = TICK_INTERVAL
        try:
            delay = self._housekeeping()
        except Exception as exc:  # keep-alive, retries, expiry and wills must outlive any one failure
            self.engine.counters["tick_error", ()] += 1
            now = time.time()
            if now - self._tick_error_at >= TICK_ERROR_LOG_INTERVAL:
                self._tick_error_at = now
                log.error("housekeeping failed, trying again in %.1f s: %s", delay, exc, exc_info=True)
        finally:
            if not self.loop.is_closed():
                self._tick_handle = self.loop.call_later(delay, self._tick)

    def _housekeeping(self) -> float:
        """Tick the broker, publish $SYS when due, commit and flush; return when to run again."""
        now = time.time()
        self.store.probe()
        self.store.settle()
        self.refresh_rules(now)
        self.engine.tick(now)
        config = self.settings()
        interval = config["systree_interval"] / 1000
        if config["systree_enabled"] and interval and now - self._systree_at >= interval:
            self._systree_at = now
            self.publish_systree()
        self.after_batch()
        return min(TICK_INTERVAL, interval or TICK_INTERVAL)

    def publish_systree(self) -> None:
        """Publish every metric, aggregated, as ``$SYS/<node>/<name split on _>`` (QoS 0)."""
        for name, value in self.metrics.totals().items():
            topic = f"$SYS/{self.node_name}/" + name.replace("_", "/")
            if self.engine.router.match("", topic):  # nobody listening: not an unhandled message
                self.engine.route("", Message(topic, str(value).encode(), 0))

    def hold(self, link: Any, n: int) -> None:
        """Record that ``link`` holds ``n`` unfinished bytes; past partial_packet_budget close the biggest holders."""
        delta = n - link.held
        if not delta:
            return
        link.held = n
        self.partial_bytes += delta
        if n:
            self.holders.add(link)
        else:
            self.holders.discard(link)
        budget = self.settings()["partial_packet_budget"]
        if delta > 0 and self.partial_bytes > budget:
            for holder in sorted(self.holders, key=_budget_order):
                if self.partial_bytes <= budget:
                    break
                log.info("closing the connection holding %d unfinished bytes: partial_packet_budget is exceeded",
                         holder.held)
                self.engine.counters["socket_close_partial_budget", ()] += 1
                holder.drop_partial()

    def after_batch(self) -> None:
        """Commit the store, then flush every connection written to in this batch.

        When the commit failed and lost messages whose PUBACK or PUBREC this batch wrote, no
        connection of the batch gets its output: each is closed (MQTT 5: DISCONNECT 0x80) and
        its client resends what was not acknowledged.
        """
        for hook in self.batch_hooks:
            try:
                hook()
            except Exception:  # the commit and the flush below must happen whatever a hook did
                log.exception("a batch hook failed")
        self.engine.save_drops()
        saved = self.store.commit()
        engine = self.engine
        dirty = engine.take_dirty()
        if not saved:
            for hook in self.rollback_hooks:
                try:
                    hook()
                except Exception:
                    log.exception("a rollback hook failed")
            for conn in dirty:
                conn.out.clear()
            for conn in dirty:
                engine.close_client(conn, reason=Reason.UNSPECIFIED_ERROR, text=STORE_DOWN)
            dirty = engine.take_dirty()  # the DISCONNECTs, and wills routed to others
        else:
            for hook in self.commit_hooks:
                try:
                    hook()
                except Exception:
                    log.exception("a commit hook failed")
        for conn in dirty:
            conn.link.drain()
        self.session_total = len(engine.sessions)
        if engine.handouts:
            self.schedule_handout()
        if engine.big_waiters and self.big_retry is None:
            self.big_retry = self.loop.call_soon(self._retry_big)

    def schedule_handout(self) -> None:
        """Hand out more retained messages at the next turn of the loop, after what is ready to read."""
        if self._handout_handle is None and self.engine.handout_ready():
            self._handout_handle = self.loop.call_soon(self._hand_out)

    def _hand_out(self) -> None:
        self._handout_handle = None
        try:
            self.engine.hand_out(time.time())
        except Exception:  # not again at every turn: the subscribers keep what they got
            log.exception("handing out retained messages failed; the rest are not sent")
            self.engine.handouts.clear()
        self.after_batch()

    def _retry_big(self) -> None:
        """Large messages waiting for outbox room go on; when none could, the next tick tries again."""
        self.big_retry = None
        if self.engine.retry_big(time.time()):
            self.after_batch()

    def refresh_rules(self, now: float) -> None:
        """Hand the engine the vmq_passwd users and vmq_acl rules in force (files reloaded as configured)."""
        config = self.rules_config = self.settings()
        users = self._passwd.get(config["vmq_passwd.password_file"], config["vmq_passwd.password_reload_interval"],
                                 now)
        rules = self._acl.get(config["vmq_acl.acl_file"], config["vmq_acl.acl_reload_interval"], now)
        self.engine.set_rules(users, rules)

    def _acl_failed(self) -> None:
        self.engine.counters["acl_reload_error", ()] += 1

    def in_loop_thread(self) -> bool:
        """Whether the caller runs in the broker's event loop thread."""
        return threading.current_thread() is self._thread

    def _future(self) -> concurrent.futures.Future:
        """Return a future for an answer from the loop, failed by stop() if the loop stops before it runs."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._waiting.add(future)
        future.add_done_callback(self._answered)
        if self._thread.ident is not None and not self._thread.is_alive():
            self._fail_waiting()  # the loop has ended: nothing would ever run it
        return future

    def _answered(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._waiting.discard(future)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
        """Run ``fn(*args)`` in the loop thread and return its result (from any other thread)."""
        future = self._future()

        def run() -> None:
            try:
                self.engine.now = time.time()
                result = fn(*args)
            except BaseException as exc:  # re-raised in the calling thread
                self.after_batch()
                future.set_exception(exc)
                return
            self.after_batch()  # the answer leaves only once what it did is committed
            future.set_result(result)
        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def read(self, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
        """Run ``fn(*args)``, which changes nothing, in the loop thread and return its result: nothing to commit.

        It runs a turn of the loop later, after what the sockets had delivered when it was asked:
        a client that disconnected before the question is seen gone.
        """
        future = self._future()

        def run() -> None:
            try:
                self.engine.now = time.time()
                future.set_result(fn(*args))
            except BaseException as exc:  # re-raised in the calling thread
                future.set_exception(exc)
        self.loop.call_soon_threadsafe(self.loop.call_soon, run)
        return future.result(timeout)

    def call_async(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine in the loop thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Close listeners and connections, stop the loop, close the store."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self.call_async(self._shutdown(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self.store.close()

    async def _shutdown(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.close()
        for client in list(self.engine.clients):
            self.engine.goodbye(client, Reason.SERVER_SHUTTING_DOWN)
        self.after_batch()
        for listener in self.listeners:
            if listener.server is not None:  # since 3.12 this also waits for the connections: bounded
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(listener.server.wait_closed(), 2)
        await asyncio.sleep(0)


###############################################################################
# Part III. Plugins: the cluster, the bridge, webhooks                        #
###############################################################################
# What reaches beyond this node: the cluster (Peers, its side of the engine, then the
# replicated state, links, requests, the cluster itself), the MQTT bridge and webhooks.


###############################################################################
# 22. Peers: the engine's side of a cluster ###################################
###############################################################################
# Owns: the ``ClusterSeam`` of a clustered node: forwards out and in, sessions
#       taken over from or by other nodes, netsplits, full nodes, and the change
#       lists the cluster drains.
# Must not know: sockets, the clock (``now`` comes with every entry point),
#       links between nodes (the cluster drains and feeds these seams).

class _Discard:
    """A change list that keeps nothing: a node outside a cluster records no changes for it."""

    __slots__ = ()

    def add(self, item: Any) -> None:
        """Keep nothing."""

    append = add


DISCARD = _Discard()


def summary_subs(subs: Mapping[str, Sequence[Any]]) -> dict[str, SubOptions]:
    """Read the ``subs`` of a session summary ({filter: [qos, no_local, rap, retain_handling, id]}).

    Entries that are not valid are left out (and logged): a peer's bad data loses only them.
    """
    out: dict[str, SubOptions] = {}
    for topic_filter, fields in subs.items():
        try:
            qos, no_local, rap, handling, identifier = fields
            if not isinstance(topic_filter, str) or not valid_subscription(topic_filter):
                raise ValueError(topic_filter)
            out[topic_filter] = SubOptions(int(qos), bool(no_local), bool(rap), int(handling), int(identifier))
        except (TypeError, ValueError):
            log.warning("a session summary from another node has a bad subscription %r: %r", topic_filter, fields)
    return out


def summary_fields(opts: SubOptions) -> list:
    """Return one subscription of a session summary: [qos, no_local, rap, retain_handling, identifier]."""
    return [opts.qos, opts.no_local, opts.retain_as_published, opts.retain_handling, opts.identifier]


class Peers:
    """The engine's side of a cluster: it never sends to another node, it leaves lists the cluster drains.

    The cluster builds it on the engine's parts and hands it to ``Engine.join_cluster``:
    from then on the engine's parts ask it as their ``ClusterSeam``. The cluster sets ``netsplit`` (a reason, '' when whole), ``elsewhere`` ((mountpoint,
    client id) -> None or {"node", "clean", "subs"} of a session on another node),
    ``full_nodes``, ``clustered`` (record changes for it) and, through ``router.set_remote``,
    other nodes' interest; it drains ``take_forwards``, ``take_session_changes``,
    ``take_retained_changes`` and ``take_takeovers``, and feeds ``deliver_forwarded``,
    ``apply_remote_retained``, ``hand_over`` and ``adopt_messages``.
    """

    def __init__(self, ctx: Context, life: Sessions):
        self.ctx, self.life, self.delivery = ctx, life, life.delivery
        self.router, self.store, self.counters, self.sessions = life.router, life.store, life.counters, life.sessions
        self.netsplit = ""
        self.elsewhere: Callable[[str, str], dict | None] | None = None
        self.full_nodes: set[str] = set()  # nodes with too much unacknowledged: QoS 1/2 for them is refused
        # sessions whose summary (session_summary) and retained messages that changed since the cluster last took them
        self.session_changes: set[tuple[str, str]] | _Discard = DISCARD
        self.retained_changes: list[tuple[str, str]] | _Discard = DISCARD
        # (node, mountpoint, message, plain, groups) for other nodes, in publish order, until the shell takes them
        self.forwards: list[tuple[str, str, Message, bool, tuple[str, ...]]] = []
        self.takeovers: list[tuple[str, str, str]] = []  # (old node, mountpoint, client id)
        self.adopting: set[tuple[str, str]] = set()  # sessions taken over with their state: messages to come
        self.waits = 0  # takeovers so far whose session waited for the old node's messages (Session.waiting)

    @property
    def clustered(self) -> bool:
        """Whether changes are recorded for the cluster (off: a standalone node keeps no change lists)."""
        return self.session_changes is not DISCARD

    @clustered.setter
    def clustered(self, on: bool) -> None:
        # Turned on, every session and retained message counts as changed: the first take is the whole state.
        if on and not self.clustered:
            self.session_changes = set(self.sessions)
            self.retained_changes = [(mp, t) for mp, table in self.router.retained.items() for t, _ in table.items()]
        elif not on:
            self.session_changes = self.retained_changes = DISCARD

    # -- the seam the engine's parts ask ------------------------------------
    def forward(self, mountpoint: str, msg: Message, nodes: Mapping[str, list]) -> None:
        """Keep a routed message for the nodes that get it (``take_forwards``)."""
        self.forwards += [(node, mountpoint, msg, plain, tuple(groups)) for node, (plain, groups) in nodes.items()]

    def session_changed(self, key: tuple[str, str]) -> None:
        """Note a session whose summary changed (nothing while not clustered)."""
        self.session_changes.add(key)

    def retained_changed(self, mountpoint: str, topic: str) -> None:
        """Note a retained message a client or command changed here (nothing while not clustered)."""
        self.retained_changes.append((mountpoint, topic))

    def claim(self, key: tuple[str, str], clean_start: bool) -> tuple | None:
        """Find the session of a CONNECT on another node; made here, offline with its subscriptions, when it
        is persistent and Clean Start is off (CONNACK then says session present). None: not elsewhere."""
        there = self.elsewhere(*key) if self.elsewhere is not None and key not in self.sessions else None
        if there is None:
            return None
        made = not clean_start and not there.get("clean", True)
        if made:
            self.make_session(key, summary_subs(there.get("subs") or {}))
        return key, there, made

    def release(self, claim: tuple) -> None:
        """The CONNECT was refused after all: the session made here goes, it stays on its node."""
        key, _, made = claim
        if made:
            self.life.drop_session(self.sessions[key])

    def took_over(self, claim: tuple) -> None:
        """The CONNECT was accepted: the old node gives the session up; one made here waits for its messages."""
        key, there, made = claim
        self.takeovers.append((str(there.get("node", "")), *key))
        if made:
            self.adopting.add(key)
            self.waits += 1
            self.sessions[key].waiting = self.waits  # until its messages come (adopt_messages) or stop_waiting

    # -- forwards -----------------------------------------------------------
    def take_forwards(self) -> list[tuple[str, str, Message, bool, tuple[str, ...]]]:
        """Return (and forget) the forwards for other nodes: (node, mountpoint, message, plain, groups).

        ``plain``: that node's own non-shared subscribers want the message; ``groups``: the
        "group/filter" of each shared group that node serves once. In publish order.
        """
        forwards, self.forwards = self.forwards, []
        return forwards

    def deliver_forwarded(self, mountpoint: str, msg: Message, plain: bool, groups: Sequence[str],
                          now: float) -> None:
        """Deliver a message another node forwarded, to local subscribers only; never forward it again.

        ``plain``: every local non-shared match; ``groups``: "group/filter" of each shared group
        that gets one local member (online first). Retained messages are not touched here.
        """
        self.ctx.now = now
        if self.ctx.settings() is not self.ctx.config:
            self.ctx.refresh()
        msg = dataclasses.replace(msg, ref=self.life.new_ref())  # references are this node's own
        if plain:
            self.delivery.route(mountpoint, msg, forward=False)
        for label in groups:
            name, _, topic_filter = label.partition("/")
            shared = self.router.groups.get((mountpoint, name, topic_filter))
            member = shared.pick(self.router.choose, "local_only") if shared is not None else None
            if member is None:
                self.counters["queue_message_unhandled", ()] += 1  # its members here left meanwhile
                continue
            opts = shared.members[member]
            self.delivery.deliver(member, msg, opts.qos, opts.retain_as_published, opts.ids)

    def deliver_to(self, mountpoint: str, client_id: str, msg: Message, now: float) -> bool:
        """Deliver a message passed on by the node that held a session before, to that session only.

        False when it is not here (it moved on, or ended).
        """
        self.ctx.now = now
        session = self.sessions.get((mountpoint, client_id))
        if session is None:
            return False
        msg = dataclasses.replace(msg, ref=self.life.new_ref())
        self.put_ahead(session, lambda: self.delivery.deliver_matching(session, msg))
        return True

    def full_for(self, mountpoint: str, msg: Message) -> list[tuple[str, str]]:
        """The local subscribers of a forwarded QoS 1/2 message whose queue has no room for it now (their keys).

        Only each queue's own bounds count (max_online_*/max_offline_*), not the node-wide one.
        """
        if not msg.qos:
            return []
        matches = self.router.cache.get((mountpoint, msg.topic)) or self.router.match(mountpoint, msg.topic)
        size, full, ctx = message_bytes(msg), [], self.ctx
        for session in matches:
            if type(session) is Session and not session.clean:
                limit, byte_limit = (ctx.max_online, ctx.max_online_bytes) if session.client is not None else \
                    (ctx.max_offline, ctx.max_offline_bytes)
                queued = _queued(session)
                if 0 <= limit <= queued or (queued and 0 <= byte_limit < session.queue_bytes + size):
                    full.append(session.key)
        return full

    def forwards_to_full(self, mountpoint: str, topic: str) -> bool:
        """Whether a message on ``topic`` would go to a node with too much unacknowledged (``full_nodes``)."""
        matches = self.router.cache.get((mountpoint, topic)) or self.router.match(mountpoint, topic)
        full = self.full_nodes
        return any(type(entry) is RemoteNode and entry.name in full or type(entry) is Session and entry.copy in full
                   for entry in matches)  # (a persistent session kept on a full node too: queue_replicas = 2)

    # -- change lists -------------------------------------------------------
    def take_session_changes(self) -> set[tuple[str, str]]:
        """Return (and forget) the (mountpoint, client id) of sessions made, ended, (un)subscribed, on or off line."""
        changes = self.session_changes
        if changes is DISCARD:
            return set()
        self.session_changes = set()
        return changes

    def session_summary(self, mountpoint: str, client_id: str) -> dict | None:
        """Return what other nodes know of a local session: clean, online, subs; None: no session here."""
        session = self.sessions.get((mountpoint, client_id))
        if session is None:
            return None
        return {"clean": session.clean, "online": session.client is not None,
                "subs": {t: summary_fields(o) for t, o in session.subs.items()}}

    def take_retained_changes(self) -> list[tuple[str, str]]:
        """Return (and forget) the (mountpoint, topic) whose retained message a client or command changed here."""
        changes = self.retained_changes
        if changes is DISCARD:
            return []
        self.retained_changes = []
        return changes

    def apply_remote_retained(self, mountpoint: str, topic: str, msg: Message | None) -> bool:
        """Set (or with None or an empty payload delete) a retained message another node changed.

        Kept in the store as any retained message, not reported back as a local change. The
        node's own limits hold: False when refused (counted in retain_message_refused).
        """
        if msg is None or not msg.payload:
            if self.router.unretain(mountpoint, topic) is not None:
                self.store.delete_retained(mountpoint, topic)
            return True
        msg = dataclasses.replace(msg, topic=topic, ref=self.life.new_ref(), frame=b"")
        if not self.router.retain(mountpoint, msg, self.ctx.max_retained, self.ctx.max_retained_bytes):
            self.counters["retain_message_refused", ()] += 1
            return False
        self.store.put_retained(mountpoint, msg)
        return True

    # -- sessions across nodes ----------------------------------------------
    def make_session(self, key: tuple[str, str], subs: Mapping[str, SubOptions]) -> Session:
        """Make an offline persistent session with ``subs`` (one taken over from another node)."""
        mountpoint, client_id = key
        session = self.life.add_session(mountpoint, client_id, None)
        self.life.mountpoints.add(mountpoint)
        self.store.put_session(mountpoint, client_id, None)
        for topic_filter, opts in subs.items():
            self.router.add(session, topic_filter, opts)
            session.subs[topic_filter] = opts
            self.store.put_subscription(mountpoint, client_id, topic_filter, opts.packed())
        return session

    def adopt_session(self, mountpoint: str, client_id: str, summary: Mapping[str, Any], now: float) -> bool:
        """Make here, offline, a persistent session another node gave up (it left, or was removed while down).

        Its messages may follow with ``adopt_messages``. Return False when a session of that
        name is here already (it wins) or the summary is of a clean session.
        """
        self.ctx.now = now
        key = (mountpoint, client_id)
        if key in self.sessions or summary.get("clean", True):
            return False
        self.make_session(key, summary_subs(summary.get("subs") or {}))
        self.adopting.add(key)
        self.session_changes.add(key)
        return True

    def take_takeovers(self) -> list[tuple[str, str, str]]:
        """Return (and forget) (old node, mountpoint, client id) of sessions clients took over from other nodes."""
        takeovers, self.takeovers = self.takeovers, []
        return takeovers

    def hand_over(self, mountpoint: str, client_id: str, now: float) -> list[Message]:
        """Give a session up to another node: close its connection (MQTT 5: 0x8E), end it here, return its messages.

        The messages are those queued and those sent but not acknowledged, in order, each
        with the QoS of its delivery; a QoS 2 message the client already received (PUBREL
        sent) is not among them. Also removes a session that a newer owner elsewhere won.
        """
        self.ctx.now = now
        key = (mountpoint, client_id)
        session = self.sessions.get(key)
        if session is not None and session.client is not None:
            self.life.close_client(session.client, reason=Reason.SESSION_TAKEN_OVER)  # [MQTT-3.1.4-2]
            session = self.sessions.get(key)  # a clean session ended with its connection
        if session is None:
            return []
        self.life.take_will(session)  # its client connects elsewhere: no delayed will [MQTT-3.1.3-9]
        self.delivery.unstore(session)
        moving = [dataclasses.replace(out.msg, qos=out.qos, retain=out.retain, frame=b"")
                  for out in itertools.chain(session.inflight.values(), session.queue)
                  if out.stage is not Stage.RELEASED]
        self.life.drop_session(session)
        self.adopting.discard(key)
        return moving

    def adopt_messages(self, mountpoint: str, client_id: str, messages: Iterable[Message], now: float,
                       force: bool = False, settle: bool = False) -> int:
        """Queue the messages ``hand_over`` gave up on the old node into the session that took it over.

        Only a session made here with the old one's state (session present) takes them, once;
        ``force``: a persistent session the cluster says is here takes them too (this node
        restarted since it took the session over). They go before what came directly since the
        takeover. ``settle``: the queue goes on waiting (for what the old node still passes on,
        ``deliver_to``) until ``stop_waiting``. Return how many were offered to its queue (its
        limits still hold).
        """
        self.ctx.now = now
        key = (mountpoint, client_id)
        session = self.sessions.get(key)
        if session is None or (key not in self.adopting and not (force and not session.clean)):
            return 0
        self.adopting.discard(key)
        count = 0
        for msg in messages:
            ids = tuple(o.identifier for t, o in session.subs.items()
                        if o.identifier and topic_matches(split_shared(t)[1], msg.topic))
            out = Outgoing(dataclasses.replace(msg, ref=self.life.new_ref()), msg.qos, 0, msg.retain, ids,
                           retained=msg.retain)
            self.put_ahead(session, lambda: self.delivery.enqueue(session, out))
            count += 1
        if not settle:
            self.stop_waiting(mountpoint, client_id, now)
        return count

    def put_ahead(self, session: Session, deliver: Callable[[], None]) -> None:
        """Run ``deliver`` for a session; while it waits, what it queued goes before what came directly (newer)."""
        before = len(session.queue)
        deliver()
        queue = session.queue  # read after: deliver makes it if it was NO_QUEUE
        if session.waiting and len(queue) == before + 1 and session.ahead < before:
            queue.insert(session.ahead, queue.pop())
        session.ahead += session.waiting and len(queue) == before + 1

    def waiting(self, mountpoint: str, client_id: str) -> int:
        """Which takeover a session waits for (0: it does not wait)."""
        session = self.sessions.get((mountpoint, client_id))
        return session.waiting if session is not None else 0

    def stop_waiting(self, mountpoint: str, client_id: str, now: float, which: int = 0) -> None:
        """Deliver a taken-over session's queue without waiting any longer for the old node's messages.

        ``which``: only if it still waits for that takeover (``waiting``); 0: whichever.
        """
        self.ctx.now = now
        session = self.sessions.get((mountpoint, client_id))
        if session is not None and session.waiting and which in (0, session.waiting):
            session.waiting, session.ahead = 0, 0
            self.delivery.drain(session)


###############################################################################
# 23. Cluster state: replicated metadata and the node-to-node codec ###########
###############################################################################
# Owns: the replicated state of a cluster (last writer wins per key, tombstones,
#       anti-entropy digests) and the codec of node-to-node frames, as pure values.
# Must not know: sockets, clocks, the store, the engine's shapes.

# -- terms: the encoding of everything nodes tell each other about their state -----------
# A tag byte, then (for sizes) a 4-byte count or length: compact, self-describing, and
# checkable against the bytes at hand before anything is allocated. Tuples travel as lists.

TERM_MAX_DEPTH = 32  # containers a term may nest; replicated metadata needs a handful
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_I64_MIN, _I64_MAX = -2 ** 63, 2 ** 63 - 1
_SMALLEST_DICT_ENTRY = 6  # an empty key (tag and length) and a one-byte value


def encode_term(obj: Any) -> bytes:
    """Encode a term: None, bool, int, float, str, bytes, list, tuple (decoded as a list), dict with str keys.

    Dict keys are written sorted, so equal terms have equal bytes (anti-entropy hashes them).
    """
    out = bytearray()
    _put_term(out, obj, 0)
    return bytes(out)


def _put_term(out: bytearray, obj: Any, depth: int) -> None:
    writer = _TERM_WRITERS.get(type(obj)) or _term_writer_for(obj)
    writer(out, obj, depth)


def _term_writer_for(obj: Any) -> Callable:
    """Find the writer of a subclass of a term type (an IntEnum, say), or refuse the value."""
    for cls in (bool, int, float, str, bytes, bytearray, memoryview, list, tuple, dict):
        if isinstance(obj, cls):
            return _TERM_WRITERS[cls]
    raise ClusterError(f"a {type(obj).__name__} is not a term")


def _put_int(out: bytearray, n: int, depth: int) -> None:
    if _I64_MIN <= n <= _I64_MAX:
        out += b"i" + _I64.pack(n)
    else:
        raw = int(n).to_bytes(n.bit_length() // 8 + 1, "big", signed=True)
        out += b"I" + _U32.pack(len(raw)) + raw


def _put_str(out: bytearray, text: str, depth: int) -> None:
    raw = text.encode("utf-8", "surrogatepass")  # any Python str travels, lone surrogates too
    out += b"s" + _U32.pack(len(raw)) + raw


def _put_bytes(out: bytearray, raw: bytes, depth: int) -> None:
    out += b"b" + _U32.pack(len(raw)) + raw


def _nest(depth: int) -> None:
    if depth >= TERM_MAX_DEPTH:
        raise ClusterError(f"term nested deeper than {TERM_MAX_DEPTH}")


def _put_list(out: bytearray, items: Sequence, depth: int) -> None:
    _nest(depth)
    out += b"l" + _U32.pack(len(items))
    for item in items:
        _put_term(out, item, depth + 1)


def _put_dict(out: bytearray, mapping: dict, depth: int) -> None:
    _nest(depth)
    keys = list(mapping)
    if not all(isinstance(key, str) for key in keys):
        raise ClusterError("a term's dict keys must be str")
    out += b"d" + _U32.pack(len(keys))
    for key in sorted(keys):
        _put_str(out, key, depth)
        _put_term(out, mapping[key], depth + 1)


_TERM_WRITERS: Mapping[type, Callable] = types.MappingProxyType({
    type(None): lambda out, obj, depth: out.append(0x4E),  # N
    bool: lambda out, obj, depth: out.append(0x54 if obj else 0x46),  # T, F
    int: _put_int,
    float: lambda out, obj, depth: out.extend(b"f" + _F64.pack(obj)),
    str: _put_str,
    bytes: _put_bytes, bytearray: _put_bytes, memoryview: lambda out, obj, depth: _put_bytes(out, bytes(obj), depth),
    list: _put_list, tuple: _put_list,
    dict: _put_dict,
})


def decode_term(data: bytes) -> Any:
    """Decode one term that fills ``data`` exactly; anything else raises ClusterError."""
    data = bytes(data)
    value, i = _get_term(data, 0, 0)
    if i != len(data):
        raise ClusterError(f"{len(data) - i} bytes after a term")
    return value


def _get_term(data: bytes, i: int, depth: int) -> tuple[Any, int]:
    if i >= len(data):
        raise ClusterError("term cut short")
    reader = _TERM_READERS.get(data[i])
    if reader is None:
        raise ClusterError(f"unknown term tag {data[i]:#04x}")
    return reader(data, i + 1, depth)


def _get_fixed(data: bytes, i: int, codec: struct.Struct) -> tuple[Any, int]:
    if i + codec.size > len(data):
        raise ClusterError("term cut short")
    return codec.unpack_from(data, i)[0], i + codec.size


def _get_size(data: bytes, i: int, unit: int = 1) -> tuple[int, int]:
    """Read a count or length, refused when its ``unit``-byte items cannot fit in what is left."""
    n, i = _get_fixed(data, i, _U32)
    if n * unit > len(data) - i:
        raise ClusterError("term declares more than its bytes hold")
    return n, i


def _get_str(data: bytes, i: int, depth: int) -> tuple[str, int]:
    n, i = _get_size(data, i)
    try:
        return str(data[i:i + n], "utf-8", "surrogatepass"), i + n
    except UnicodeDecodeError:
        raise ClusterError("term string is not UTF-8") from None


def _get_bigint(data: bytes, i: int, depth: int) -> tuple[int, int]:
    n, i = _get_size(data, i)
    return int.from_bytes(data[i:i + n], "big", signed=True), i + n


def _get_bytes(data: bytes, i: int, depth: int) -> tuple[bytes, int]:
    n, i = _get_size(data, i)
    return data[i:i + n], i + n


def _get_list(data: bytes, i: int, depth: int) -> tuple[list, int]:
    _nest(depth)
    n, i = _get_size(data, i)
    items = []
    for _ in range(n):
        item, i = _get_term(data, i, depth + 1)
        items.append(item)
    return items, i


def _get_dict(data: bytes, i: int, depth: int) -> tuple[dict, int]:
    _nest(depth)
    n, i = _get_size(data, i, _SMALLEST_DICT_ENTRY)
    mapping = {}
    for _ in range(n):
        if i >= len(data) or data[i] != 0x73:  # s
            raise ClusterError("a term's dict key is not a str")
        key, i = _get_str(data, i + 1, depth)
        mapping[key], i = _get_term(data, i, depth + 1)
    return mapping, i


_TERM_READERS: Mapping[int, Callable] = types.MappingProxyType({
    0x4E: lambda data, i, depth: (None, i), 0x54: lambda data, i, depth: (True, i),
    0x46: lambda data, i, depth: (False, i),
    0x69: lambda data, i, depth: _get_fixed(data, i, _I64), 0x49: _get_bigint,  # i, I
    0x66: lambda data, i, depth: _get_fixed(data, i, _F64),  # f
    0x73: _get_str, 0x62: _get_bytes, 0x6C: _get_list, 0x64: _get_dict,  # s, b, l, d
})


# -- the forward codec: one message on its way to a node with subscribers --------------
# The hot path between nodes: a fixed struct header with every length, then the raw parts,
# so decoding is one unpack and a slice per part. Properties keep their MQTT 5 encoding.

FORWARD_VERSION = 1  # first byte of a forward body; a node refuses another layout
_FORWARD = struct.Struct(">BBHHHHIIIQd")  # version, flags, lengths of mountpoint, topic, origin,
# the number of groups, lengths of properties, payload and frame, then ref and expiry time
_FWD_RETAIN, _FWD_FRAME5, _FWD_PLAIN, _FWD_EXPIRES, _FWD_ORIGIN, _FWD_BRIDGED = 4, 8, 16, 32, 64, 128  # above the QoS


def encode_forward(mountpoint: str, msg: Message, plain: bool, groups: tuple[str, ...]) -> bytes:
    """Encode a message forwarded to a node: ``plain`` (its subscribers need no options) and the shared
    ``groups`` ("group/filter") the receiver serves once."""
    try:
        mp, topic, props = mountpoint.encode(), msg.topic.encode(), encode_properties(msg.props) if msg.props else b""
        origin = b"" if msg.origin is None else msg.origin.encode()
        if msg.qos not in (0, 1, 2):
            raise ValueError(f"QoS {msg.qos}")
        flags = (msg.qos | _FWD_RETAIN * bool(msg.retain) | _FWD_FRAME5 * bool(msg.frame5) | _FWD_PLAIN * bool(plain)
                 | _FWD_EXPIRES * (msg.expires is not None) | _FWD_ORIGIN * (msg.origin is not None)
                 | _FWD_BRIDGED * bool(msg.bridged))
        head = _FORWARD.pack(FORWARD_VERSION, flags, len(mp), len(topic), len(origin), len(groups), len(props),
                             len(msg.payload), len(msg.frame), msg.ref, 0.0 if msg.expires is None else msg.expires)
        parts = [head, mp, topic, origin, props, msg.payload, msg.frame]
        for group in groups:
            raw = group.encode()
            parts += (_U16.pack(len(raw)), raw)
    except (struct.error, ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
        raise ClusterError(f"cannot forward this message: {e}") from None
    return b"".join(parts)


def decode_forward(body: bytes, max_props: int = 0) -> tuple[str, Message, bool, tuple[str, ...]]:
    """Decode what encode_forward made: (mountpoint, message, plain, groups).

    More than ``max_props`` properties (0: no limit; max_properties_per_packet) is refused as soon as
    it is seen, as an MQTT client's packet would be.
    """
    if type(body) is not bytes:
        body = bytes(body)  # slices of it become the payload and frame
    if len(body) < _FORWARD.size or body[0] != FORWARD_VERSION:
        raise ClusterError("forwarded message cut short or of another version")
    _, flags, n_mp, n_topic, n_origin, n_groups, n_props, n_payload, n_frame, ref, expires = _FORWARD.unpack_from(body)
    a = _FORWARD.size + n_mp
    b = a + n_topic
    c = b + n_origin
    d = c + n_props
    e = d + n_payload
    f = e + n_frame
    if (f != len(body) if not n_groups else f + 2 * n_groups > len(body)) or flags & 3 == 3:
        raise ClusterError("forwarded message of the wrong length or with bad flags")
    try:
        mountpoint, topic = str(body[_FORWARD.size:a], "utf-8"), str(body[a:b], "utf-8")
        origin = str(body[b:c], "utf-8")
        props = _forward_props(body, c, d, max_props or None) if n_props else ()
    except UnicodeDecodeError:
        raise ClusterError("forwarded message with a string that is not UTF-8") from None
    groups = _forward_groups(body, f, n_groups) if n_groups else ()
    msg = Message(topic, body[d:e], flags & 3, bool(flags & _FWD_RETAIN), ref, body[e:f], bool(flags & _FWD_FRAME5),
                  props, expires if flags & _FWD_EXPIRES else None, origin if flags & _FWD_ORIGIN else None,
                  bool(flags & _FWD_BRIDGED))
    return mountpoint, msg, bool(flags & _FWD_PLAIN), groups


def _forward_props(body: bytes, start: int, stop: int, limit: int | None) -> tuple:
    try:
        props, end = decode_properties(body, start, stop, None, limit)
    except MalformedPacket as e:
        raise ClusterError(f"forwarded message with bad properties: {e}") from None
    if end != stop:
        raise ClusterError("forwarded message with bytes after its properties")
    return props


def _forward_groups(body: bytes, i: int, count: int) -> tuple[str, ...]:
    groups = []
    for _ in range(count):
        if i + 2 > len(body):
            raise ClusterError("forwarded message cut short in its groups")
        n = _U16.unpack_from(body, i)[0]
        if i + 2 + n > len(body):
            raise ClusterError("forwarded message cut short in its groups")
        try:
            groups.append(str(body[i + 2:i + 2 + n], "utf-8"))
        except UnicodeDecodeError:
            raise ClusterError("forwarded message with a group that is not UTF-8") from None
        i += 2 + n
    if i != len(body):
        raise ClusterError("forwarded message with bytes after its groups")
    return tuple(groups)


# -- the replicated state: last writer wins per key, with tombstones ---------------------

Stamp = tuple[float, str]  # (wall-clock seconds, node name): newer time wins, then the greater name
STAMP_STEP = 1e-6  # s; a local write's stamp is at least this past the one it replaces
SYNC_BUCKETS = 256  # key buckets per kind that anti-entropy compares: 10,000 sessions make ~40 keys each
SYNC_KEYS = 512  # key stamps one listing holds (whole buckets, at least one)
SYNC_ROWS = 256  # rows one message holds; the rest follows in the next round
SYNC_KINDS = 64  # kinds a digest may name (the glue uses five)


def _stamp_time(t: Any) -> float:
    if type(t) not in (int, float):
        raise ClusterError(f"stamp time {t!r} is not a number")
    try:
        t = float(t)
    except OverflowError:
        raise ClusterError("stamp time out of range") from None
    if not math.isfinite(t):
        raise ClusterError(f"stamp time {t!r} is not finite")
    return t


@dataclass(frozen=True, slots=True)
class Update:
    """One row of the replicated state; ``value`` None is a tombstone, ``stamp`` orders the writes to a key."""

    kind: str
    key: str
    value: Any  # a term
    stamp: Stamp

    def __post_init__(self):
        stamp = self.stamp
        if not (isinstance(self.kind, str) and isinstance(self.key, str) and isinstance(stamp, (tuple, list))
                and len(stamp) == 2 and isinstance(stamp[1], str)):
            raise ClusterError(f"bad replicated row {self.kind!r} {self.key!r} {stamp!r}")
        if type(stamp) is not tuple or type(stamp[0]) is not float:
            object.__setattr__(self, "stamp", (_stamp_time(stamp[0]), stamp[1]))
        elif not math.isfinite(stamp[0]):
            raise ClusterError(f"stamp time {stamp[0]!r} is not finite")


def _key_bucket(key: str) -> int:
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "big") % SYNC_BUCKETS


def _row_hash(update: Update, value_term: bytes) -> int:
    head = encode_term([update.kind, update.key, update.stamp[0], update.stamp[1]])
    return int.from_bytes(hashlib.blake2b(head + value_term, digest_size=8).digest(), "big")


class _Kind:
    """The rows of one kind, with the XOR of their hashes per bucket of keys and in all."""

    __slots__ = ("rows", "hashes", "members", "sums", "total")

    def __init__(self):
        self.rows: dict[str, Update] = {}
        self.hashes: dict[str, int] = {}
        self.members: dict[int, set[str]] = {}  # bucket -> keys
        self.sums = [0] * SYNC_BUCKETS
        self.total = 0

    def set(self, update: Update, value_term: bytes) -> None:
        """Hold ``update`` for its key, in place of what was held."""
        key, bucket, new = update.key, _key_bucket(update.key), _row_hash(update, value_term)
        old = self.hashes.get(key)
        if old is None:
            self.members.setdefault(bucket, set()).add(key)
            old = 0
        self.rows[key], self.hashes[key] = update, new
        self.sums[bucket] ^= old ^ new
        self.total ^= old ^ new

    def remove(self, key: str) -> None:
        """Forget ``key`` altogether (a purged tombstone)."""
        bucket, old = _key_bucket(key), self.hashes.pop(key)
        del self.rows[key]
        self.members[bucket].discard(key)
        self.sums[bucket] ^= old
        self.total ^= old

    def entries(self, bucket: int) -> list[list]:
        """The listing of one bucket: [key, stamp time, stamp node, row hash] per key, sorted."""
        return [[key, self.rows[key].stamp[0], self.rows[key].stamp[1], self.hashes[key]]
                for key in sorted(self.members.get(bucket, ()))]


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ClusterError(f"malformed cluster state message: {what}")


def _row_term(update: Update) -> list:
    return [update.kind, update.key, update.value, update.stamp[0], update.stamp[1]]


def _row_from_term(row: Any) -> Update:
    _check(isinstance(row, list) and len(row) == 5, "a row is [kind, key, value, time, node]")
    return Update(row[0], row[1], row[2], (row[3], row[4]))


class Replica:
    """This node's copy of the cluster's replicated state, and the anti-entropy protocol with its peers.

    Rows are grouped by kind; per key the newest stamp wins, a delete being a tombstone with
    its own stamp. Messages (terms, see ``receive``) are lists that start with a tag:
    ``["r", rows, more]`` rows to merge (what ``announce`` sends); ``["d", {kind: hash}]`` the
    digest; ``["b", kind, hashes]`` the 8-byte hashes of a kind's buckets of keys, when its
    digest differs; ``["k", kind, buckets, [[key, time, node, hash], ...], more]`` the rows'
    stamps in the buckets that differ; ``["w", kind, keys, more]`` rows asked for. A digest of
    replicas that agree gets no answer. A round that was cut at a bound carries ``more`` on
    to its last message, which is answered with a digest, so the next round starts at once.
    Anything lost is found by a later digest.
    """

    def __init__(self, me: str, rows: Iterable[Update] = ()):
        self.me = me
        self._kinds: dict[str, _Kind] = {}
        self.merge(rows)

    # -- local use ----------------------------------------------------------------
    def put(self, kind: str, key: str, value: Any, now: float, renew: bool = False) -> Update | None:
        """Write locally (value None deletes). The stamp is (max(now, held stamp's time + 1e-6), me) so a
        local write always wins over what this node holds. Return None (and change nothing) when the live
        value is already equal (deleting an absent key is also None), unless ``renew`` asks for a fresh
        stamp all the same (a row this node holds may have lost, unseen, to a peer's newer delete)."""
        value_term = encode_term(value)
        held = self._held(kind, key)
        live = None if held is None else held.value
        same = (live is None) if value is None else (live is not None and encode_term(live) == value_term)
        if same and not renew:
            return None
        t = _stamp_time(now)
        if held is not None:
            t = max(t, held.stamp[0] + STAMP_STEP)
            if t <= held.stamp[0]:  # a time so large that the step vanishes in its precision
                t = math.nextafter(held.stamp[0], math.inf)
        update = Update(kind, key, decode_term(value_term), (t, self.me))  # decoded: as every peer will hold it
        self._kind(kind).set(update, value_term)
        return update

    def get(self, kind: str, key: str, default: Any = None) -> Any:
        """Return the live value of ``key`` or ``default``."""
        held = self._held(kind, key)
        return default if held is None or held.value is None else held.value

    def items(self, kind: str) -> list[tuple[str, Any]]:
        """Return the live (key, value) pairs of a kind, sorted by key."""
        rows = self._kinds[kind].rows if kind in self._kinds else {}
        # get, not rows[key]: cluster show reads members from an HTTP thread while the loop may purge a tombstone
        return [(key, held.value) for key in sorted(rows) if (held := rows.get(key)) is not None
                and held.value is not None]

    def rows(self) -> list[Update]:
        """Return every row, tombstones too (what the store keeps), by kind and key."""
        return [held.rows[key] for kind, held in sorted(self._kinds.items()) for key in sorted(held.rows)]

    def merge(self, updates: Iterable[Update]) -> list[Update]:
        """Keep each update that is newer than what is held for its key; return those kept."""
        kept = []
        for update in updates:
            if not isinstance(update, Update):
                raise ClusterError(f"not a replicated row: {update!r}")
            value_term = encode_term(update.value)
            update = dataclasses.replace(update, value=decode_term(value_term))  # lists, not tuples, as peers hold
            if self._newer(update, value_term):
                self._kind(update.kind).set(update, value_term)
                kept.append(update)
        return kept

    def purge(self, before: float) -> int:
        """Drop the tombstones stamped before ``before``; return how many.

        Safe only once every peer holds the delete: a peer that still holds the old value
        would bring it back.
        """
        dropped = 0
        for name, kind in list(self._kinds.items()):
            for key in [key for key, held in kind.rows.items() if held.value is None and held.stamp[0] < before]:
                kind.remove(key)
                dropped += 1
            if not kind.rows:
                del self._kinds[name]
        return dropped

    def _held(self, kind: str, key: str) -> Update | None:
        held = self._kinds.get(kind)
        return None if held is None else held.rows.get(key)

    def _kind(self, kind: str) -> _Kind:
        held = self._kinds.get(kind)
        if held is None:
            held = self._kinds[kind] = _Kind()
        return held

    def _newer(self, update: Update, value_term: bytes) -> bool:
        """Whether ``update`` beats the held row; equal stamps (a node restored from an old store)
        are settled by the greater value encoding, the same way on every node."""
        held = self._held(update.kind, update.key)
        if held is None or update.stamp > held.stamp:
            return True
        return update.stamp == held.stamp and value_term > encode_term(held.value)

    # -- the protocol between replicas --------------------------------------------------
    def announce(self, updates: Sequence[Update]) -> Any:
        """Return the message that carries local updates to a peer (keep batches to a few hundred rows)."""
        return ["r", [_row_term(update) for update in updates], False]

    def digest_message(self) -> Any:
        """Return the anti-entropy summary sent on link-up and every few seconds to each peer."""
        return ["d", {name: kind.total for name, kind in self._kinds.items() if kind.total}]

    def receive(self, message: Any) -> tuple[list[Update], list[Any]]:
        """Take a message from one peer: return (updates that changed this replica, messages to send back
        to that same peer). Raise ClusterError (only ClusterError) for a message that is not well formed."""
        _check(isinstance(message, list) and message and isinstance(message[0], str), "not a tagged list")
        handler = _REPLICA_HANDLERS.get(message[0])
        _check(handler is not None, f"unknown tag {message[0]!r}")
        return handler(self, message)

    def _on_rows(self, message: list) -> tuple[list[Update], list[Any]]:
        _check(len(message) == 3 and isinstance(message[1], list) and isinstance(message[2], bool), "rows")
        updates = [_row_from_term(row) for row in message[1]]
        return self.merge(updates), [self.digest_message()] if message[2] else []

    def _on_digest(self, message: list) -> tuple[list[Update], list[Any]]:
        _check(len(message) == 2 and isinstance(message[1], dict) and len(message[1]) <= SYNC_KINDS, "digest")
        theirs = message[1]
        _check(all(type(h) is int for h in theirs.values()), "digest hashes")
        names = sorted(set(theirs) | {name for name, kind in self._kinds.items() if kind.total})
        replies = []
        for name in names:
            kind = self._kinds.get(name) or _Kind()
            if kind.total != theirs.get(name, 0):
                replies.append(["b", name, b"".join(h.to_bytes(8, "big") for h in kind.sums)])
        return [], replies

    def _on_buckets(self, message: list) -> tuple[list[Update], list[Any]]:
        _check(len(message) == 3 and isinstance(message[1], str) and isinstance(message[2], bytes)
               and len(message[2]) == 8 * SYNC_BUCKETS, "buckets")
        blob, kind = message[2], self._kinds.get(message[1]) or _Kind()
        differ = [i for i in range(SYNC_BUCKETS) if kind.sums[i] != int.from_bytes(blob[8 * i:8 * i + 8], "big")]
        covered, entries = [], []
        for i in differ:
            listing = kind.entries(i)
            if covered and len(entries) + len(listing) > SYNC_KEYS:
                break
            covered.append(i)
            entries += listing
        more = len(covered) < len(differ)
        return [], [["k", message[1], covered, entries, more]] if differ else []

    def _on_keys(self, message: list) -> tuple[list[Update], list[Any]]:
        _check(len(message) == 5 and isinstance(message[1], str) and isinstance(message[2], list)
               and isinstance(message[3], list) and isinstance(message[4], bool), "keys")
        _check(all(type(i) is int and 0 <= i < SYNC_BUCKETS for i in message[2]), "bucket indices")
        kind = self._kinds.get(message[1]) or _Kind()
        theirs, send, want = {}, [], []
        for entry in message[3]:
            _check(isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                   and isinstance(entry[2], str) and type(entry[3]) is int, "a key stamp is [key, time, node, hash]")
            theirs[entry[0]] = stamp = (_stamp_time(entry[1]), entry[2])
            held = kind.rows.get(entry[0])
            if held is None or held.stamp < stamp or (held.stamp == stamp and kind.hashes[entry[0]] != entry[3]):
                want.append(entry[0])  # equal stamps, other values: both send, the tie-break picks one
            if held is not None and (held.stamp > stamp or (held.stamp == stamp and kind.hashes[entry[0]] != entry[3])):
                send.append(held)
        for i in message[2]:
            send += [kind.rows[key] for key in sorted(kind.members.get(i, ())) if key not in theirs]
        more = message[4] or len(send) > SYNC_ROWS  # the W's answer, else the R, carries it on
        replies = [["w", message[1], want, more]] if want else []
        if send or (more and not want):
            replies.append(["r", [_row_term(update) for update in send[:SYNC_ROWS]], more and not want])
        return [], replies

    def _on_want(self, message: list) -> tuple[list[Update], list[Any]]:
        _check(len(message) == 4 and isinstance(message[1], str) and isinstance(message[2], list)
               and all(isinstance(key, str) for key in message[2]) and isinstance(message[3], bool), "want")
        kind = self._kinds.get(message[1]) or _Kind()
        rows = [kind.rows[key] for key in message[2][:SYNC_ROWS] if key in kind.rows]
        more = message[3] or len(message[2]) > SYNC_ROWS
        return [], [["r", [_row_term(update) for update in rows], more]] if rows or more else []


_REPLICA_HANDLERS: Mapping[str, Callable] = types.MappingProxyType({
    "r": Replica._on_rows, "d": Replica._on_digest, "b": Replica._on_buckets, "k": Replica._on_keys,
    "w": Replica._on_want,
})


# -- kept frames: what must reach another node, numbered until it says it committed it -------
# A QoS 1/2 message forwarded to a node (and a session handed over with its queue) is acknowledged
# to its publisher only once this node has committed it for that peer. The peer answers each kept
# frame, after its own commit, with the highest number it has committed; everything up to that
# number is then forgotten here. Lost links are redialed and everything still kept is sent again,
# in order; the receiver drops what it has already by number. Numbers are (epoch, seq): the epoch
# is drawn at each start, so they never repeat without a counter on disk, and entries restored
# from the store keep the number they were first sent with.

KEPT_FORWARD, KEPT_MIGRATE, KEPT_PASSED = 1, 2, 3  # what a kept frame carries (see SessionMoves.use)
KEPT_FLUSH, KEPT_FLUSHED = 4, 5  # the end of what a node sent the old node of a session that moved, and its echo
KEPT_COPY = 6  # changes to the copies a node keeps of another node's persistent sessions (queue_replicas = 2)
COPY_STREAM = 1  # KEPT_COPY frames are numbered in an epoch of their own (the sender's epoch + 1)
WAIT_FATAL, WAIT_GOES_ON, WAIT_FIRM = "fatal", "goes on", "firm"  # what a wait does when no acknowledgement comes
_KEPT = struct.Struct(">QQQB")  # epoch, seq, the lowest seq of that epoch still kept (floor), kind
_KEPT_ACK = struct.Struct(">QQ")  # epoch, the highest seq of it committed


def encode_kept(epoch: int, seq: int, floor: int, kind: int, body: bytes) -> bytes:
    """Encode a kept frame's body."""
    return _KEPT.pack(epoch, seq, floor, kind) + body


def decode_kept(frame: bytes) -> tuple[int, int, int, int, bytes]:
    """Decode what encode_kept made: (epoch, seq, floor, kind, body)."""
    if len(frame) < _KEPT.size:
        raise ClusterError("a kept frame cut short")
    epoch, seq, floor, kind = _KEPT.unpack_from(frame)
    if not 0 < floor <= seq:
        raise ClusterError("a kept frame with a bad number")
    return epoch, seq, floor, kind, frame[_KEPT.size:]


def decode_kept_ack(frame: bytes) -> tuple[int, int]:
    """Decode an acknowledgement of kept frames: (epoch, highest seq committed)."""
    if len(frame) != _KEPT_ACK.size:
        raise ClusterError("an acknowledgement of the wrong length")
    return _KEPT_ACK.unpack(frame)


def decode_fields(body: bytes, kinds: tuple[type, ...], what: str) -> tuple:
    """Decode a term that must be a list of exactly these kinds of values; ClusterError names ``what`` else."""
    term = decode_term(body)
    if not (isinstance(term, list) and len(term) == len(kinds)
            and all(type(value) is kind for value, kind in zip(term, kinds))):
        raise ClusterError(f"{what} of the wrong shape")
    return tuple(term)


def decode_passed(body: bytes) -> tuple[str, bytes]:
    """Decode a KEPT_PASSED body, ``encode_term([client id, forward])``: (client id, forward)."""
    return decode_fields(body, (str, bytes), "a message passed on")


def decode_marker(body: bytes) -> tuple[str, str, float]:
    """Decode a KEPT_FLUSH or KEPT_FLUSHED body, ``encode_term([session key, node, stamp])``: the session, a
    node, and the time stamp of the session row that moved it (which move the marker is of)."""
    return decode_fields(body, (str, str, float), "a session marker")


class Outbox:
    """The kept frames this node owes each peer, in the order they were made, until acknowledged.

    ``number`` numbers a new one and ``keep`` keeps it (or one from the store); ``pending`` lists a
    peer's entries in order (send them all again when its link comes back), ``ack`` forgets those
    a peer has committed and returns their store rows. ``size`` is bytes kept per peer.
    """

    def __init__(self, epoch: int):
        self.epoch = epoch
        # (peer, stream) -> the last seq given: one run per peer and stream, each stream an epoch of its own
        self.seq: dict[tuple[str, int], int] = collections.defaultdict(int)
        # peer -> epoch -> seq -> (row in the store, kind, body); epochs in the order they were made
        self.kept: dict[str, dict[int, collections.OrderedDict[int, tuple[int, int, bytes]]]] = {}
        self.size: dict[str, int] = collections.defaultdict(int)

    def number(self, peer: str, stream: int = 0) -> tuple[int, int]:
        """Return the number (epoch, seq) of a new entry for ``peer``; each ``stream`` is numbered (and
        acknowledged) on its own, as an epoch of its own."""
        self.seq[peer, stream] += 1
        return self.epoch + stream, self.seq[peer, stream]

    def keep(self, peer: str, epoch: int, seq: int, kind: int, body: bytes, row: int = 0) -> None:
        """Keep an entry for ``peer``, numbered by ``number`` or earlier (from the store, in the order made)."""
        # an OrderedDict: its first entry is found at once however many were taken off its front
        self.kept.setdefault(peer, {}).setdefault(epoch, collections.OrderedDict())[seq] = (row, kind, body)
        self.size[peer] += len(body)

    def frame(self, peer: str, epoch: int, seq: int) -> bytes | None:
        """Return the kept frame numbered (epoch, seq) for ``peer``; None once acknowledged."""
        entries = self.kept.get(peer, {}).get(epoch)
        entry = entries.get(seq) if entries else None
        if entry is None:
            return None
        return encode_kept(epoch, seq, next(iter(entries)), entry[1], entry[2])

    def pending(self, peer: str) -> list[tuple[int, int]]:
        """Return the numbers of everything kept for ``peer``, oldest first."""
        return [(epoch, seq) for epoch, entries in self.kept.get(peer, {}).items() for seq in entries]

    def ack(self, peer: str, epoch: int, upto: int) -> list[int]:
        """Forget the entries of ``epoch`` up to seq ``upto`` (the peer committed them); return their rows."""
        entries = self.kept.get(peer, {}).get(epoch)
        rows: list[int] = []
        while entries:
            seq = next(iter(entries))
            if seq > upto:
                break
            row, _, body = entries.pop(seq)
            self.size[peer] -= len(body)
            rows.append(row)
        if entries is not None and not entries:
            del self.kept[peer][epoch]
        return rows

    def drop(self, peer: str) -> list[tuple[int, int, bytes]]:
        """Forget everything kept for a peer that left the cluster; return (row, kind, body) of each, in order."""
        self.size.pop(peer, None)
        return [entry for entries in self.kept.pop(peer, {}).values() for entry in entries.values()]


INBOX_EPOCHS = 32  # epochs of one origin whose highest number is remembered (older ones are forgotten; two a run)


class Inbox:
    """What this node has committed of each peer's kept frames: the highest seq per (origin, epoch).

    ``take`` says what to do with a frame: "new" (use it, then record it with ``mark``),
    "again" (had it: acknowledge only) or "gap" (an earlier one is missing: ignore it, it
    comes again in order). Nothing below the frame's floor is waited for: the sender keeps
    nothing below it (acknowledged before, to this node or to one that lost its state).
    """

    def __init__(self, marks: Iterable[tuple[str, int, int]] = ()):
        self.marks: dict[str, dict[int, int]] = {}
        for origin, epoch, seq in marks:
            self.marks.setdefault(origin, {})[epoch] = seq

    def take(self, origin: str, epoch: int, seq: int, floor: int) -> str:
        """Classify a kept frame: "new", "again" or "gap"."""
        # below the floor the sender holds nothing: acknowledged before, or given up (a peer removed)
        have = max(self.marks.get(origin, {}).get(epoch, 0), floor - 1)
        return "again" if seq <= have else "new" if seq == have + 1 else "gap"

    def mark(self, origin: str, epoch: int, seq: int) -> int | None:
        """Record a frame used; return an epoch of that origin forgotten to make room, or None."""
        epochs = self.marks.setdefault(origin, {})
        epochs[epoch] = seq
        if len(epochs) > INBOX_EPOCHS:
            oldest = next(iter(epochs))
            del epochs[oldest]
            return oldest
        return None

    def last(self, origin: str, epoch: int) -> int:
        """The highest seq of (origin, epoch) recorded (0: none)."""
        return self.marks.get(origin, {}).get(epoch, 0)



###############################################################################
# 24. Cluster links: node-to-node connections #################################
###############################################################################
# Owns: the cluster listener and the links to peers on the broker's loop: the
#       cookie's HMAC challenge, heartbeats, reconnects, per-peer buffers.
# Must not know: what the frames mean.

CLUSTER_PROTOCOL = 1  # version byte of this node-to-node protocol, in HELLO
CLUSTER_MAX_FRAME = 64 << 20  # bytes; a peer declaring a longer frame is cut off (a retained message is at most 256 MB
#                              in MQTT, but a cluster frame carries one message, and 64 MB bounds what a peer makes us hold)
CLUSTER_HANDSHAKE_BYTES = 4096  # bytes a connection may send before its handshake is done (a HELLO and a PROOF: < 300)
CLUSTER_TRIM_SLACK = 32  # pending handshakes past max_pending at which the listener trims at once, not after reads
CLUSTER_BACKLOG = 256  # connections the kernel queues for the cluster listener
CLUSTER_ACCEPT_BATCH = 8  # connections taken from that queue per turn of the loop: strangers that reconnect
#                           as fast as they are closed then replace at most a few per turn, not all at once
CLUSTER_HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats on a link
CLUSTER_HEARTBEAT_TIMEOUT = 5.0  # seconds of silence after which a link is down ("timeout")
CLUSTER_REDIAL_FIRST, CLUSTER_REDIAL_MAX = 0.1, 3.0  # seconds: back-off between dials to a lost peer, doubling
CLUSTER_WRITE_LIMIT = 64 << 20  # bytes unsent to an up peer past which send() drops (it does not read)
CLUSTER_READ_PAUSE = 0.25  # seconds reading a peer pauses while our writes to it pile up (never longer: two
#                            peers that both write much would otherwise wait for each other forever)
CLUSTER_NONCE_BYTES = 16
CLUSTER_MAX_NAME = 1024  # bytes of a node name in HELLO
CLUSTER_PRIVATE_KINDS = 16  # frame kinds below this belong to the links; 16-255 are the cluster's (on_frame)
K_HELLO, K_PROOF, K_HEARTBEAT, K_BYE = 1, 2, 3, 4
HELLO_PROBE = 0x01  # HELLO flag: the dialer only checks the cookie and name (probe), it does not link
ROLE_DIALER, ROLE_LISTENER = b"vmqapi-dialer", b"vmqapi-listener"  # distinct, so a proof cannot be reflected
FRAME_HEADER = 5  # 4 bytes of length (kind and body), 1 of kind
CLUSTER_RECEIVED, CLUSTER_SENT, CLUSTER_DROPPED = (
    ("cluster_bytes_received", ()), ("cluster_bytes_sent", ()), ("cluster_bytes_dropped", ()))


def encode_cluster_frame(kind: int, body: bytes = b"") -> bytes:
    """Encode one frame: 4-byte big-endian length of what follows, the kind byte, the body."""
    return (len(body) + 1).to_bytes(4, "big") + bytes((kind,)) + body


def decode_cluster_frame(buf: bytes | bytearray, pos: int, limit: int) -> tuple[int, bytes, int] | None:
    """Decode the frame at ``buf[pos:]``: (kind, body, next pos), None when incomplete.

    Raises ClusterError for a length of 0 or over ``limit``, before the body arrives.
    """
    if len(buf) - pos < FRAME_HEADER:
        return None
    size = int.from_bytes(buf[pos:pos + 4], "big")
    if not 1 <= size <= limit:
        raise ClusterError(f"frame of {size} bytes (at most {limit})")
    end = pos + 4 + size
    if len(buf) < end:
        return None
    with memoryview(buf) as view:
        return buf[pos + 4], bytes(view[pos + 5:end]), end


def encode_hello(nonce: bytes, name: str, probe: bool = False) -> bytes:
    """The body of HELLO: protocol version, flags, nonce, node name."""
    return bytes((CLUSTER_PROTOCOL, HELLO_PROBE if probe else 0)) + nonce + name.encode()


def decode_hello(body: bytes) -> tuple[bytes, str, bool]:
    """Return (nonce, name, probe) of a HELLO body; raise ClusterError if it is not one."""
    if len(body) < 3 + CLUSTER_NONCE_BYTES or len(body) > 2 + CLUSTER_NONCE_BYTES + CLUSTER_MAX_NAME:
        raise ClusterError("malformed hello")
    if body[0] != CLUSTER_PROTOCOL:
        raise ClusterError(f"cluster protocol {body[0]}, this node speaks {CLUSTER_PROTOCOL}")
    try:
        name = body[2 + CLUSTER_NONCE_BYTES:].decode()
    except UnicodeDecodeError:
        raise ClusterError("node name is not UTF-8") from None
    if not name.isprintable() or any(c.isspace() for c in name):  # it goes into log lines
        raise ClusterError("node name has spaces or control characters")
    return body[2:2 + CLUSTER_NONCE_BYTES], name, bool(body[1] & HELLO_PROBE)


def cluster_proof(cookie: str, role: bytes, nonce_other: bytes, nonce_own: bytes, dialer: str, listener: str) -> bytes:
    """HMAC-SHA256 by which a node proves the cookie: its role, both nonces and both names (dialer first)."""
    names = len(dialer.encode()).to_bytes(2, "big") + dialer.encode() + listener.encode()
    return hmac.new(cookie.encode(), role + nonce_other + nonce_own + names, hashlib.sha256).digest()


def cluster_listener(config: Config) -> tuple[tuple[str, int], bool]:
    """Return the cluster listener's address and whether it is the TLS one (listener.vmqs.clustering)."""
    secure = config["listener.vmqs.clustering"]
    return (secure, True) if secure is not None else (config["listener.vmq.clustering"], False)


def cluster_tls_contexts(config: Config) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """Return (server, client) TLS contexts for the links, (None, None) without listener.vmqs.clustering.

    Both sides show a certificate and check the other's against the cafile; host names are not
    checked (peers are dialed by address, and the cookie's challenge follows anyway).
    """
    if not cluster_listener(config)[1]:
        return None, None
    opts = {o: config.listener_option("vmqs", "clustering", o) for o in CLUSTER_TLS_OPTIONS}
    if not opts["certfile"] or not opts["cafile"]:
        raise ConfigError("listener.vmqs.clustering needs listener.vmqs.certfile and listener.vmqs.cafile: "
                          "nodes show each other certificates from that CA")
    require_tls_files(opts)
    contexts, ssl = [], tls_module()
    try:
        for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
            ctx = ssl.SSLContext(purpose)
            ctx.minimum_version = tls_version(min(opts["tls_version"]))
            ctx.load_cert_chain(opts["certfile"], opts["keyfile"] or None)
            ctx.load_verify_locations(opts["cafile"])
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            contexts.append(ctx)
    except OSError as exc:  # ssl.SSLError too
        raise ConfigError(f"listener.vmqs.clustering: cannot load its certificates: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return contexts[0], contexts[1]


def check_cluster_config(config: Config) -> None:
    """Raise ConfigError for bad TLS files of the cluster listener, or copies a memory store cannot keep."""
    cluster_tls_contexts(config)
    if config["queue_replicas"] > 1 and config["message_store"] != "sqlite":
        raise ConfigError("queue_replicas = 2 needs message_store = sqlite: the copies of persistent sessions "
                          "are kept in the message store")


COOKIE_MAX_BYTES = 4096  # a cookie file longer than this is not one (a device, a log file named by mistake)


def read_cookie_file(path: str) -> str:
    """Return the cookie in ``path`` (its first line); raise ConfigError unless it is a small regular
    file that only its owner can read (as Erlang insists for .erlang.cookie) holding a cookie."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not hold the start
    except OSError as exc:
        raise ConfigError(f"cannot read the cookie file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > COOKIE_MAX_BYTES:
            raise ConfigError(f"the cookie file {path} is not a regular file of at most {COOKIE_MAX_BYTES} bytes")
        if os.name == "posix" and info.st_mode & 0o077:
            raise ConfigError(f"the cookie file {path} can be read by others (mode {info.st_mode & 0o777:o}); "
                              f"run: chmod 600 {path}")
        data = fh.read(COOKIE_MAX_BYTES + 1)
    try:
        lines = data.decode("utf-8").splitlines()
        return parse_text(lines[0]) if lines else ""  # load_cookie checks it
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the cookie file {path}: {exc}") from None


def make_cookie_file(path: str) -> str:
    """Write a new random cookie to ``path`` (created, mode 0600); return it."""
    cookie = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(cookie + "\n")  # one write: a reader that sees a size sees the whole cookie
    return cookie


def load_cookie(config: Config, data_dir: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """Return (cookie, where it came from): distributed_cookie, else distributed_cookie_file, else the
    environment's VMQAPI_DISTRIBUTED_COOKIE, else DATA_DIR/cookie (made at the first start).

    Raise ConfigError for an unusable one (see check_cookie; a file others can read, ...).
    """
    cookie, where = _find_cookie(config, data_dir, environ)
    try:
        return check_cookie(cookie), where
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _find_cookie(config: Config, data_dir: str, environ: Mapping[str, str]) -> tuple[str, str]:
    if config["distributed_cookie"]:
        return config["distributed_cookie"], "distributed_cookie"
    named = config["distributed_cookie_file"]
    if named:
        await_cookie_file(named)
        return read_cookie_file(named), f"distributed_cookie_file {named}"
    if environ.get(COOKIE_ENV, "").strip():
        return parse_text(environ[COOKIE_ENV]), COOKIE_ENV
    path = os.path.join(data_dir, COOKIE_FILE)
    if os.path.lexists(path):
        return read_cookie_file(path), f"the cookie file {path}"
    try:
        return make_cookie_file(path), f"{path}, made now (give the other nodes of a cluster the same)"
    except OSError as exc:
        raise ConfigError(f"cannot make the cookie file {path}: {exc.strerror}") from None


class LinkStage(enum.Enum):
    """Where a link stands: HELLO sent or awaited, PROOF awaited, PROBED (a probe's, done), UP, CLOSED."""

    HELLO = "hello"
    PROOF = "proof"
    PROBED = "probed"
    UP = "up"
    CLOSED = "closed"


class PeerLink(asyncio.Protocol):
    """One connection to another node: the handshake, then frames both ways, heartbeats, flow control.

    The dialer sends HELLO; the listener answers with its own; the dialer proves the cookie, the
    listener checks that and only then proves it too (an unauthenticated dialer learns no HMAC).
    """

    def __init__(self, links: ClusterLinks, dialer: bool, peer: str | None = None,
                 probe: asyncio.Future | None = None):
        self.links, self.dialer, self.expect, self.probe = links, dialer, peer, probe
        self.transport: asyncio.Transport | None = None
        self.stage = LinkStage.HELLO
        self.inbuf = bytearray()
        self.name: str | None = None  # the remote node's, once its HELLO is in
        self.nonce, self.remote_nonce = secrets.token_bytes(CLUSTER_NONCE_BYTES), b""
        self.probing = False  # a listener's: the dialer only probes
        self.handshake_bytes = 0
        self.admitted = 0.0  # when the listener counted it among its pending handshakes
        self.generation = 0  # the listener's trims before it was admitted (see ClusterLinks._trim)
        self.in_tls = False  # a listener's, in its TLS handshake: nothing may be written in clear
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.flush_handle: asyncio.Handle | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.unpause: asyncio.TimerHandle | None = None
        self.last_rx = time.monotonic()
        self.address = ("", 0)

    @property
    def live(self) -> bool:
        """Whether the remote answered (its HELLO came in) and the link is not closed."""
        return self.name is not None and self.stage is not LinkStage.CLOSED

    @property
    def silent(self) -> bool:
        """Whether the remote has sent nothing yet (in a TLS handshake, what it sent is not seen: not silent)."""
        return self.handshake_bytes == 0 and not self.inbuf and self.stage is LinkStage.HELLO and not self.in_tls

    def evict(self, why: str) -> None:
        """Close an incoming link still in its handshake to make room (logged at debug level: strangers
        could otherwise fill the log)."""
        log.debug("closing cluster link %s: %s", self.describe(), why)
        self.close("too many handshakes", bye=False)
        if self.transport is not None:
            self.transport.abort()

    def describe(self) -> str:
        """Name the link for a log line: direction, node, address."""
        return f"{'to' if self.dialer else 'from'} {self.name or '?'} at {self.address[0]}:{self.address[1]}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.address = tuple(transport.get_extra_info("peername") or ("", 0))[:2]
        if self.stage is LinkStage.CLOSED or (not self.dialer and not self.links.admit(self)):
            self.stage = LinkStage.CLOSED
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timer = self.links.loop.call_later(self.links.handshake_timeout, self._handshake_timeout)
        if self.dialer:
            self.write(K_HELLO, encode_hello(self.nonce, self.links.me, self.probe is not None))
        elif self.links.server_tls is not None:
            self.links.spawn(self._start_tls(transport))  # once admitted: it counts as pending

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        """Run the listener's TLS handshake on an admitted connection (within the handshake's deadline)."""
        self.in_tls = True
        tls: asyncio.Transport | None = None
        why: BaseException | str = "closed"
        try:
            tls = await self.links.loop.start_tls(raw, self, self.links.server_tls, server_side=True,
                                                  ssl_handshake_timeout=self.links.handshake_timeout)
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError and ConnectionError are OSErrors
            why = exc or why
        self.in_tls = False
        # start_tls gives None when the raw transport was closed under it (evict, the handshake deadline).
        if tls is not None and self.stage is not LinkStage.CLOSED:
            self.transport = tls  # type: ignore[assignment]
            return
        for transport in (tls, raw):
            if transport is not None:
                transport.abort()
        if self.stage is not LinkStage.CLOSED:
            self.stage = LinkStage.CLOSED
            self._cancel_timers()
            log.info("closing cluster link %s: TLS handshake failed: %s", self.describe(), why)
            self.links.lost(self, "TLS handshake failed")

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.stage not in (LinkStage.UP, LinkStage.CLOSED):
            self.fail(f"no handshake within {self.links.handshake_timeout:g} s", quiet=True)

    def data_received(self, data: bytes) -> None:
        if self.stage is LinkStage.CLOSED:
            return
        self.last_rx = time.monotonic()
        self.links.counters[CLUSTER_RECEIVED] += len(data)
        buf = self.inbuf
        buf += data
        pos = 0
        try:
            while self.stage is not LinkStage.CLOSED:
                up = self.stage is LinkStage.UP
                frame = decode_cluster_frame(buf, pos, CLUSTER_MAX_FRAME if up else CLUSTER_HANDSHAKE_BYTES)
                if frame is None:
                    break
                kind, body, end = frame
                if not up:
                    self.handshake_bytes += end - pos
                pos = end
                self._frame(kind, body)
            if self.stage not in (LinkStage.UP, LinkStage.CLOSED) \
                    and self.handshake_bytes + len(buf) - pos > CLUSTER_HANDSHAKE_BYTES:
                raise ClusterError(f"more than {CLUSTER_HANDSHAKE_BYTES} bytes before the handshake was done")
        except ClusterError as exc:
            self.fail(exc.text, quiet=self.stage is not LinkStage.UP)
            return
        if self.stage is LinkStage.CLOSED:
            self.inbuf = bytearray()
        else:
            del buf[:pos]

    def _frame(self, kind: int, body: bytes) -> None:
        if kind >= CLUSTER_PRIVATE_KINDS:
            if self.stage is not LinkStage.UP:
                raise ClusterError(f"frame of kind {kind} before the handshake")
            self.links.deliver(self.name, kind, body)
            return
        handler = self._HANDLERS.get((kind, self.stage))
        if handler is None:
            raise ClusterError(f"unexpected frame of kind {kind} in stage {self.stage.value}")
        handler(self, body)

    def _hello(self, body: bytes) -> None:
        self.remote_nonce, name, self.probing = decode_hello(body)
        self.name = name
        if name == self.links.me:
            self.refuse("name already taken", f"the node at {self.address[0]}:{self.address[1]} is also called {name}")
            return
        if self.dialer and self.expect is not None and name != self.expect:
            self.refuse("wrong node", f"the node at {self.address[0]}:{self.address[1]} is {name}, not {self.expect}")
            return
        self.stage = LinkStage.PROOF
        if self.dialer:
            self.write(K_PROOF, self._proof(ROLE_DIALER))
        else:
            self.write(K_HELLO, encode_hello(self.nonce, self.links.me))

    def _proof(self, role: bytes, own: bool = True) -> bytes:
        """This node's proof (``own``) or the one expected from the remote, for ``role``."""
        dialer, listener = (self.links.me, self.name) if self.dialer else (self.name, self.links.me)
        nonces = (self.remote_nonce, self.nonce) if own else (self.nonce, self.remote_nonce)
        return cluster_proof(self.links.cookie, role, *nonces, dialer, listener)

    def _check(self, body: bytes) -> None:
        role = ROLE_LISTENER if self.dialer else ROLE_DIALER
        if not hmac.compare_digest(body, self._proof(role, own=False)):
            log.warning("cluster link %s refused: wrong cookie", self.describe())
            self.refuse("wrong cookie")
            return
        if self.dialer:
            self._dialer_proven()
        elif self.probing:
            self.stage = LinkStage.PROBED
            self.write(K_PROOF, self._proof(ROLE_LISTENER))
        elif not self.links.accept(self):
            log.debug("cluster link %s: closed, the link dialed the other way is kept", self.describe())
            self.refuse("duplicate")
        else:
            self.write(K_PROOF, self._proof(ROLE_LISTENER))
            self.links.up(self)

    def _dialer_proven(self) -> None:
        if self.probe is not None:
            if not self.probe.done():
                self.probe.set_result(self.name)
            self.close("probe done")
        else:
            self.links.up(self)

    def _bye(self, body: bytes) -> None:
        reason = body[:200].decode("utf-8", "replace")
        if reason == "wrong cookie":
            log.warning("cluster link %s refused: wrong cookie", self.describe())
        elif reason == "name already taken":
            reason += f": the node at {self.address[0]}:{self.address[1]} is also called {self.links.me}"
        self.close(reason if self.stage is not LinkStage.UP else f"closed by the peer: {reason}", bye=False)

    def _heartbeat(self, body: bytes) -> None:
        pass  # data_received noted the time

    _HANDLERS: dict[tuple[int, LinkStage], Callable[[PeerLink, bytes], None]] = {
        (K_HELLO, LinkStage.HELLO): _hello,
        (K_PROOF, LinkStage.PROOF): _check,
        (K_HEARTBEAT, LinkStage.UP): _heartbeat,
        (K_BYE, LinkStage.HELLO): _bye,
        (K_BYE, LinkStage.PROOF): _bye,
        (K_BYE, LinkStage.PROBED): _bye,
        (K_BYE, LinkStage.UP): _bye,
    }

    def write(self, kind: int, body: bytes = b"") -> None:
        """Queue a frame; the queue goes out in one write once this turn of the loop is over."""
        self.out += ((len(body) + 1).to_bytes(4, "big") + bytes((kind,)), body)
        self.out_bytes += len(body) + FRAME_HEADER
        if self.flush_handle is None:
            self.flush_handle = self.links.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_handle = None
        if self.out and self.transport is not None and not self.transport.is_closing():
            data = b"".join(self.out)
            self.links.counters[CLUSTER_SENT] += len(data)
            self.transport.write(data)
        self.out.clear()
        self.out_bytes = 0

    def unsent(self) -> int:
        """Bytes queued or in the transport's buffer, not yet taken by the kernel."""
        return self.out_bytes + (self.transport.get_write_buffer_size() if self.transport is not None else 0)

    def refuse(self, reason: str, text: str | None = None) -> None:
        """End the handshake: tell the remote why, then close."""
        if text is not None:
            log.warning("cluster link %s refused: %s", self.describe(), text)
        self.close(reason)

    def fail(self, text: str, quiet: bool = False, reason: str | None = None) -> None:
        """Close for a broken protocol or a timeout, logged in one line (``quiet``: at info level)."""
        (log.info if quiet else log.warning)("closing cluster link %s: %s", self.describe(), text)
        self.close(reason or text)

    def close(self, reason: str, bye: bool = True) -> None:
        """Close (after a BYE with ``reason`` when ``bye``) and tell the links, once."""
        if self.stage is LinkStage.CLOSED:
            return
        self.stage = LinkStage.CLOSED
        if bye and self.transport is not None and not self.in_tls:
            self.write(K_BYE, reason.encode()[:200])
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self._cancel_timers()
        self.links.lost(self, reason)

    def abort(self) -> None:
        """Close at once, dropping what is unsent (the node stops)."""
        self.out.clear()
        self.close("closed", bye=False)
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timers(self) -> None:
        for handle in (self.timer, self.unpause, self.flush_handle):
            if handle is not None:
                handle.cancel()
        self.timer = self.unpause = self.flush_handle = None

    def pause_writing(self) -> None:
        # The peer takes our frames slower than we make them: read it no further for a while.
        if self.transport is not None and self.unpause is None and self.stage is not LinkStage.CLOSED:
            self.transport.pause_reading()
            self.unpause = self.links.loop.call_later(CLUSTER_READ_PAUSE, self.resume_writing)

    def resume_writing(self) -> None:
        if self.unpause is not None:
            self.unpause.cancel()
            self.unpause = None
            self.last_rx = time.monotonic()  # the silence while we did not read is not the peer's
            if self.transport is not None and self.stage is not LinkStage.CLOSED:
                self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inbuf = bytearray()
        if self.stage is not LinkStage.CLOSED:
            reason = f"connection lost: {exc}" if exc else "connection closed"
            if self.stage is LinkStage.HELLO and self.dialer and self.name is None:
                reason = "closed before the handshake" + (" (does the peer take this node's certificate?)"
                                                          if self.links.client_tls else "")
            self.stage = LinkStage.CLOSED
            self._cancel_timers()
            self.links.lost(self, reason)


@dataclass(slots=True, eq=False)
class Peer:
    """What the links keep for one other node: where to dial it, its link, frames waiting for it."""

    name: str
    address: tuple[str, int]
    wanted: bool = False  # connect() asked for it: dial, and redial after a loss
    link: PeerLink | None = None  # the link that is up
    dialing: PeerLink | None = None  # our link to it in its handshake
    task: asyncio.Task | None = None  # our TCP (and TLS) connect in progress
    retry: asyncio.TimerHandle | None = None
    backoff: float = CLUSTER_REDIAL_FIRST
    buffer: collections.deque = field(default_factory=collections.deque)  # (kind, body) while down
    buffered: int = 0  # bytes in ``buffer``, frame headers included
    since: float = field(default_factory=time.time)  # when it last went up or down
    failing: bool = False  # the last dial failed (later failures are logged at debug level)


class ClusterLinks:
    """The links to the other nodes, on the broker's asyncio loop (MqttIO.loop).

    Every method but the constructor is called in the loop thread; callbacks run there too.
    ``on_up(peer)`` fires once a link is authenticated, ``on_down(peer, reason)`` when an up
    link is lost ("timeout" after a silent heartbeat timeout), ``on_frame(peer, kind, body)``
    for each frame of kind 16-255. Two links for one pair (both nodes dialed at once) end as
    one: the link dialed by the node with the smaller name survives.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, me: str, cookie: str, metrics: Metrics, *,
                 buffer_size: int, on_up: Callable[[str], None], on_down: Callable[[str, str], None],
                 on_frame: Callable[[str, int, bytes], None], server_tls: ssl.SSLContext | None = None,
                 client_tls: ssl.SSLContext | None = None, heartbeat: float = CLUSTER_HEARTBEAT_INTERVAL,
                 timeout: float = CLUSTER_HEARTBEAT_TIMEOUT, handshake_timeout: float = CLUSTER_HANDSHAKE_TIMEOUT,
                 max_pending: int = CLUSTER_MAX_UNAUTHENTICATED):
        self.loop, self.me, self.cookie, self.metrics = loop, me, cookie, metrics
        self.buffer_size = buffer_size
        self.on_up, self.on_down, self.on_frame = on_up, on_down, on_frame
        self.server_tls, self.client_tls = server_tls, client_tls
        self.heartbeat, self.timeout, self.handshake_timeout = heartbeat, timeout, handshake_timeout
        self.max_pending = max_pending
        self.peers: dict[str, Peer] = {}
        self.pending: dict[PeerLink, None] = {}  # incoming links in their handshake, oldest first
        self._generation = 0  # trims so far: a link admitted before the last one has had its first read
        self._trim_handle: asyncio.TimerHandle | None = None
        self.probes: set[PeerLink] = set()
        self.bound: tuple[str, int] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._closed = False
        self.tasks: set[asyncio.Task[None]] = set()  # kept until done: the loop holds only weak references
        # Counted in the loop thread without a lock; Metrics reads (and resets) them there, as the broker's.
        self.counters: dict[tuple[str, LabelSet], int] = dict.fromkeys((CLUSTER_RECEIVED, CLUSTER_SENT,
                                                                         CLUSTER_DROPPED), 0)
        metrics.add_source(lambda: self.counters, dict)

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Open the cluster listener; return the address actually bound."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sock.family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                # as create_server does: a listener on :: takes IPv6 only, IPv4 needs its own address
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            # TLS starts once a connection is admitted (PeerLink._start_tls), so that a stranger's TLS
            # handshake counts among the pending ones too.
            self._server = await self.loop.create_server(
                lambda: PeerLink(self, dialer=False), sock=sock, backlog=CLUSTER_ACCEPT_BATCH)
        except BaseException:
            sock.close()
            raise
        sock.listen(CLUSTER_BACKLOG)  # asyncio takes its backlog as the batch it accepts per turn, too
        self.bound = tuple(sock.getsockname()[:2])
        self._start_ticking()
        return self.bound

    def connect(self, peer: str, host: str, port: int) -> None:
        """Keep a link to ``peer`` at host:port from now on: dial, and on loss redial with back-off
        (capped at a few seconds) until forget(peer). Idempotent; a new address replaces the old."""
        if peer == self.me:
            raise ClusterError(f"{peer} is this node")
        entry = self._peer(peer, (host, port))
        moved = entry.address != (host, port)
        entry.address, entry.wanted = (host, port), True
        if moved and entry.retry is not None:
            entry.retry.cancel()
            entry.retry = None
            entry.backoff = CLUSTER_REDIAL_FIRST
        self._start_ticking()
        self._dial(entry)

    def forget(self, peer: str) -> None:
        """Stop dialing ``peer``, close its link (on_down does not fire) and drop what waits for it."""
        entry = self.peers.pop(peer, None)
        if entry is None:
            return
        self._stop_dialing(entry)
        if entry.link is not None:
            link, entry.link = entry.link, None
            link.close("forgotten")

    def send(self, peer: str, kind: int, body: bytes) -> bool:
        """Queue a frame. While the peer is down, frames wait in its buffer up to buffer_size bytes and go
        out in order once it is up; past that they are dropped, counted in cluster_bytes_dropped, and False
        is returned. Frames to an up peer are written at once (one write per turn of the loop)."""
        if not CLUSTER_PRIVATE_KINDS <= kind <= 255:
            raise ValueError(f"frame kind {kind} is not in 16..255")
        entry, size = self.peers.get(peer), len(body) + FRAME_HEADER
        if entry is not None and entry.link is not None:
            unsent = entry.link.unsent()
            if unsent == 0 or unsent + size <= CLUSTER_WRITE_LIMIT:
                entry.link.write(kind, body)
                return True
        elif entry is not None and entry.buffered + size <= self.buffer_size:
            entry.buffer.append((kind, body))
            entry.buffered += size
            return True
        self.counters[CLUSTER_DROPPED] += size
        return False

    def room(self, peer: str, size: int) -> bool:
        """Whether ``peer``'s link is up and takes a frame of ``size`` bytes now (send would not drop it)."""
        entry = self.peers.get(peer)
        return entry is not None and entry.link is not None \
            and (entry.link.unsent() == 0 or entry.link.unsent() + size + FRAME_HEADER <= CLUSTER_WRITE_LIMIT)

    def is_up(self, peer: str) -> bool:
        """Whether ``peer`` has an authenticated link."""
        entry = self.peers.get(peer)
        return entry is not None and entry.link is not None

    def rows(self) -> list[dict]:
        """Per known peer: name, address, up, since (epoch seconds), buffered (bytes waiting)."""
        return [{"name": e.name, "address": render_value(e.address), "up": e.link is not None, "since": e.since,
                 "buffered": e.buffered} for e in sorted(self.peers.values(), key=lambda e: e.name)]

    async def probe(self, host: str, port: int, timeout: float = 5.0) -> str:
        """Connect once, run the handshake, return the remote node's name, close.

        Raise ClusterError with a reason a user can act on: "unreachable: ...", "wrong cookie",
        "name already taken: ..." (the remote is called like this node), "no handshake: ...".
        """
        answer = self.loop.create_future()
        started = time.monotonic()
        try:
            _, link = await asyncio.wait_for(self.loop.create_connection(
                lambda: PeerLink(self, dialer=True, probe=answer), host, port, ssl=self.client_tls,
                ssl_handshake_timeout=timeout if self.client_tls else None), timeout)
        except (OSError, asyncio.TimeoutError, UnicodeError) as exc:
            if isinstance(exc, UnicodeError):  # the IDNA codec's: a label too long for DNS
                why = "the host name is not valid"
            elif isinstance(exc, socket.gaierror):
                why = f"the host name is not known ({exc.strerror})"
            else:
                why = os.strerror(exc.errno) if getattr(exc, "errno", None) else f"no answer within {timeout:g} s"
            raise ClusterError(f"unreachable: {render_value((host, port))}: {why}") from None
        self.probes.add(link)
        try:
            return await asyncio.wait_for(answer, max(0.0, timeout - (time.monotonic() - started)))
        except asyncio.TimeoutError:
            raise ClusterError(f"no handshake: {render_value((host, port))} did not finish it within "
                               f"{timeout:g} s (is it a cluster listener?)") from None
        finally:
            self.probes.discard(link)
            link.close("probe done")

    async def close(self) -> None:
        """Close the listener and every link, cancel the timers; on_down does not fire."""
        self._closed = True
        for handle in (self._tick_handle, self._trim_handle):
            if handle is not None:
                handle.cancel()
        if self._server is not None:
            self._server.close()
        for entry in list(self.peers.values()):
            self._stop_dialing(entry)
            if entry.link is not None:
                link, entry.link = entry.link, None
                link.close("shutdown")
        for link in list(self.pending) + list(self.probes):
            link.abort()
        for task in list(self.tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):  # since 3.12 it waits for the connections too
                await asyncio.wait_for(self._server.wait_closed(), 2)
        await asyncio.sleep(0)

    # -- used by PeerLink --

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task kept until done; an exception it raises is logged in one line."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster links: a task failed: %r", task.exception())

    def admit(self, link: PeerLink) -> bool:
        """Count an incoming connection in its handshake; past max_pending, close others for it (_trim)."""
        if self._closed:
            return False
        link.admitted = time.monotonic()
        link.generation = self._generation
        self.pending[link] = None
        if len(self.pending) >= self.max_pending + CLUSTER_TRIM_SLACK:
            self._trim()  # the loop is too slow to look after each read: bound what strangers hold anyway
        elif len(self.pending) > self.max_pending and self._trim_handle is None:
            self._trim_handle = self.loop.call_later(0, self._trim)
        return True

    def _trim(self) -> None:
        """Close pending links until max_pending are left, the first of: one that has had its turn to be
        read and sent nothing, the oldest one that has, the oldest.

        A timer of 0 s runs after the reads of the turn it falls in, so every link admitted before the
        previous trim has had its first bytes read: a node that holds the cookie sends its HELLO at once,
        and is then kept over strangers that say nothing, and over the older strangers that speak. A
        newcomer is never turned away: it cannot be told from a node before its first bytes are read.
        """
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        current, self._generation = self._generation, self._generation + 1
        while len(self.pending) > self.max_pending:
            victim = min(self.pending, key=lambda x: (x.generation >= current, not x.silent, x.admitted))
            victim.evict(f"{len(self.pending)} connections are in their handshake and it is the one to go")

    def accept(self, link: PeerLink) -> bool:
        """Whether to keep an authenticated incoming link: one dialed by the larger name loses to ours."""
        entry = self.peers.get(link.name)
        if entry is None or link.name < self.me:
            return True
        ours = entry.dialing if entry.dialing is not None and entry.dialing.live else None
        return ours is None and (entry.link is None or not entry.link.dialer)

    def up(self, link: PeerLink) -> None:
        """Make ``link`` the peer's link: close any other, send what waited, then on_up."""
        self.pending.pop(link, None)
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        entry = self._peer(link.name, link.address)
        if entry.dialing is not link:
            self._stop_dialing(entry)  # ours loses, in its handshake (accept said so) or still connecting
        entry.dialing = None
        old, entry.link = entry.link, link
        link.stage = LinkStage.UP
        entry.since, entry.backoff, entry.failing = time.time(), CLUSTER_REDIAL_FIRST, False
        if entry.retry is not None:
            entry.retry.cancel()
            entry.retry = None
        if old is not None:  # the peer dialed anew, so it lost the old link: it is stale
            old.close("replaced")
            self._callback(self.on_down, link.name, "replaced")
        for kind, body in entry.buffer:
            link.write(kind, body)
        entry.buffer.clear()
        entry.buffered = 0
        log.info("cluster link %s is up", link.describe())
        self._callback(self.on_up, link.name)

    def lost(self, link: PeerLink, reason: str) -> None:
        """A link closed: a probe's answer, a failed dial to retry, or a peer down."""
        self.pending.pop(link, None)
        if link.probe is not None:
            if not link.probe.done():
                link.probe.set_exception(ClusterError(reason))
            return
        entry = self.peers.get(link.expect if link.dialer else link.name)
        if entry is None:
            return
        if entry.dialing is link:
            entry.dialing = None
            self._retry(entry)
        elif entry.link is link:
            entry.link, entry.since = None, time.time()
            log.info("cluster link %s is down: %s", link.describe(), reason)
            self._callback(self.on_down, entry.name, reason)
            self._retry(entry)

    def deliver(self, peer: str, kind: int, body: bytes) -> None:
        """Hand a frame of kind 16-255 to on_frame."""
        self._callback(self.on_frame, peer, kind, body)

    @staticmethod
    def _callback(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a bug of the cluster above: it costs that callback, never the link or the loop
            log.exception("internal error in a cluster link callback")

    # -- dialing and heartbeats --

    def _peer(self, name: str, address: tuple[str, int]) -> Peer:
        entry = self.peers.get(name)
        if entry is None:
            entry = self.peers[name] = Peer(name, address)
        return entry

    def _dial(self, entry: Peer) -> None:
        entry.retry = None
        busy = entry.link or entry.dialing or (entry.task is not None and not entry.task.done())
        if self._closed or busy or not entry.wanted or self.peers.get(entry.name) is not entry:
            return
        entry.task = self.loop.create_task(self._open(entry))

    async def _open(self, entry: Peer) -> None:
        host, port = entry.address
        try:
            await asyncio.wait_for(self.loop.create_connection(
                lambda: self._dialing(entry), host, port, ssl=self.client_tls,
                ssl_handshake_timeout=self.handshake_timeout if self.client_tls else None), self.handshake_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            (log.debug if entry.failing else log.info)("cannot reach cluster peer %s at %s: %s", entry.name,
                                                        render_value(entry.address), exc or "no answer")
            entry.failing = True
            if entry.dialing is not None and entry.dialing.transport is None:
                entry.dialing = None
            self._retry(entry)

    def _dialing(self, entry: Peer) -> PeerLink:
        entry.dialing = PeerLink(self, dialer=True, peer=entry.name)
        return entry.dialing

    def _retry(self, entry: Peer) -> None:
        if self._closed or not entry.wanted or entry.link or entry.dialing or entry.retry \
                or self.peers.get(entry.name) is not entry:
            return
        entry.retry = self.loop.call_later(entry.backoff, self._dial, entry)
        entry.backoff = min(entry.backoff * 2, CLUSTER_REDIAL_MAX)

    def _stop_dialing(self, entry: Peer) -> None:
        for handle in (entry.retry, entry.task):
            if handle is not None:
                handle.cancel()
        entry.retry = entry.task = None
        if entry.dialing is not None:
            link, entry.dialing = entry.dialing, None
            link.close("duplicate")

    def _start_ticking(self) -> None:
        if self._tick_handle is None and not self._closed:
            self._tick_handle = self.loop.call_later(self.heartbeat, self._tick)

    def _tick(self) -> None:
        """Send a heartbeat on every up link; close those silent past the timeout."""
        self._tick_handle = self.loop.call_later(self.heartbeat, self._tick)
        now = time.monotonic()
        for entry in list(self.peers.values()):
            link = entry.link
            if link is None:
                continue
            if now - link.last_rx > self.timeout and link.unpause is None:
                link.fail(f"nothing heard for {self.timeout:g} s", reason="timeout")
            else:
                link.write(K_HEARTBEAT)


###############################################################################
# 25. Cluster requests: replication, calls between nodes, kept frames #########
###############################################################################
# Owns: the cluster's constants, its replicated rows (their store and their
#       flow), requests to other nodes and their answers, and the frames kept
#       until another node committed them.
# Must not know: the bytes on a link, the engine's shapes.

CLUSTER_DB = "cluster.db"  # the replicated state, kept so a restarted node knows its peers
FRAME_META, FRAME_FORWARD, FRAME_CALL, FRAME_REPLY, FRAME_MIGRATE = 16, 17, 18, 19, 20
FRAME_KEPT, FRAME_KEPT_ACK = 21, 22  # a frame kept until acknowledged, and its acknowledgement (Outbox and Inbox)
KEPT_RESEND = 30.0  # s without an acknowledgement from an up peer after which everything kept goes to it again
KEPT_PATIENCE = 5.0  # s a peer's kept frames wait for a persistent subscriber's queue to have room
KEPT_GIVEN_UP = 60.0  # s after that during which that subscriber's full queue holds nothing up
MARKERS_MAX = 8  # markers one session still here may hold for the node it moves to (a cluster has 2-5 nodes)
ADOPT_WAIT = 3.0  # s a session taken over from a running node holds its queue for the messages that node hands over
MOVED_KEEP = 10.0  # s a node passes on what still arrives for a session it handed over (publishers' nodes
#                   learn of the move within a round trip or two; meanwhile a message may come twice)
MOVED_MAX = 10_000  # sessions handed over that it remembers so at once (the oldest are forgotten)
SYNC_EVERY = 2  # housekeeping rounds (cluster_sync_interval) between anti-entropy digests to each peer
JOIN_TIMEOUT = 10.0  # s a join waits for the link and the first merge
ARRIVAL_SLACK = 0.1  # s after a new member's JOIN_TIMEOUT at which the split is looked at again
FIRST_SYNC_WAIT = 10.0  # s a restarted node waits for its peers' state before it reports its sessions
CALL_TIMEOUT = 10.0  # s a command waits for another node's answer
TOMBSTONE_DAYS = 7  # deleted rows are remembered this long (a node away longer may bring old rows back)
CLUSTER_CALL_WORKERS = 4  # threads that run other nodes' requests (they may call into this node's loop)
CLUSTER_MAX_CALLS = 256  # other nodes' requests queued or running at once; more are answered "busy" (the queue
#                          of a thread pool has no bound, and each waiting request holds a few KB)
LEAVE_HINT = "Done! Use -k to teardown and migrate existing sessions!"  # VerneMQ's words
LEAVE_STOP_DELAY = 0.5  # s between a leaving node's answer and its stop, so that the answer is sent
FORGET_DELAY = 3.0  # s the link to a removed node stays, for the answers still on their way


def parse_discovery_node(text: str) -> tuple[str, str, int]:
    """Split VerneMQ's discovery-node ``name@host[:port]``: return the node name (``name@host``), host, port."""
    name, at, rest = text.partition("@")
    host, port = rest, str(CLUSTER_PORT)
    if rest.startswith("["):  # [IPv6]:port
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else port if not tail else ""
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    if not at or not name or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidValue(f"bad discovery-node {ascii(text)}: expected name@host[:port]")
    try:
        return check_node_name(f"{name}@{host}"), host, int(port)
    except ValueError as exc:
        raise InvalidValue(f"bad discovery-node: {exc}") from None


def retained_value(mountpoint: str, msg: Message) -> bytes:
    """Return a retained message as the replica keeps it: the same bytes on every node that holds it."""
    return encode_forward(mountpoint, dataclasses.replace(msg, ref=0, frame=b"", frame5=False), False, ())


def session_key(mountpoint: str, client_id: str) -> str:
    """Return the replica key of a session: ``[mountpoint, client id]`` as compact JSON, same on every node."""
    if _plain_json(mountpoint) and _plain_json(client_id):  # nothing to escape: JSON's text is the string's
        return f'["{mountpoint}","{client_id}"]'
    return json.dumps([mountpoint, client_id], ensure_ascii=False, separators=(",", ":"))


def _plain_json(text: str) -> bool:
    """Whether JSON (ensure_ascii off) writes ``text`` as it is: no quote, backslash or control character."""
    return text.isprintable() and '"' not in text and "\\" not in text


def check_publishable(topic: str) -> None:
    """Raise ClusterError for a topic from another node that no client may be sent (a wildcard, U+0000)."""
    if not valid_topic_name(topic):  # [MQTT-4.7.3-1], [MQTT-1.5.3-2]
        raise ClusterError(f"a message for the topic {topic[:100]!r}, which no client may publish to")


def split_session_key(key: str) -> tuple[str, str]:
    """Return (mountpoint, client id) of a replica session (or retain) key; ClusterError for a peer's bad one."""
    try:
        mountpoint, client_id = json.loads(key)
    except (ValueError, TypeError):
        raise ClusterError(f"bad replica key {key[:100]!r}") from None
    if not isinstance(mountpoint, str) or not isinstance(client_id, str):
        raise ClusterError(f"bad replica key {key[:100]!r}")
    return mountpoint, client_id


class ClusterStore:
    """The replica's rows in DATA_DIR/cluster.db: membership survives a restart."""

    def __init__(self, path: str):
        self.path = path
        require_regular_file(path, "the cluster state")
        try:
            create_private_file(path)
            self.db = sqlite3.connect(path, check_same_thread=False)
            found = self.db.execute("PRAGMA quick_check").fetchall()
            if found != _SQLITE_OK:
                raise sqlite3.DatabaseError("; ".join(str(row[0]) for row in found[:3]))
            self.db.execute("CREATE TABLE IF NOT EXISTS rows (kind TEXT, key TEXT, value BLOB, at REAL, node TEXT, "
                            "PRIMARY KEY (kind, key))")
            self.db.execute("CREATE TABLE IF NOT EXISTS local (name TEXT PRIMARY KEY, value BLOB)")  # not replicated
            self.db.commit()
        except sqlite3.DatabaseError as exc:
            if _in_use(exc):
                raise _file_in_use("the cluster state", path) from None
            raise ConfigError(f"the cluster state {path} is corrupt ({' '.join(str(exc).split())}); vmqapi did "
                              "not change it. Move it away (the node then starts outside any cluster) and "
                              "start again") from None
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cannot open the cluster state {path}: {exc}") from None

    def load(self) -> list[Update]:
        """Return every row kept; a row that cannot be read stops the start, naming the file."""
        try:
            return [Update(kind, key, decode_term(value), (at, node))
                    for kind, key, value, at, node in self.db.execute("SELECT kind, key, value, at, node FROM rows")]
        except (sqlite3.Error, ClusterError) as exc:
            if isinstance(exc, sqlite3.Error) and _in_use(exc):
                raise _file_in_use("the cluster state", self.path) from None
            raise ConfigError(f"the cluster state {self.path} cannot be read ({exc}); vmqapi did not change it. "
                              "Move it away and start again") from None

    def save(self, updates: Iterable[Update]) -> None:
        """Keep ``updates`` (one transaction); a failure is logged, the peers still hold the rows."""
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?)",
                                    [(u.kind, u.key, encode_term(u.value), u.stamp[0], u.stamp[1])
                                     for u in updates])
        except sqlite3.Error as exc:
            log.error("cannot save the cluster state to %s: %s", self.path, exc)

    def get_local(self, name: str) -> Any:
        """Return a value only this node keeps (None when there is none or it cannot be read)."""
        try:
            row = self.db.execute("SELECT value FROM local WHERE name = ?", (name,)).fetchone()
            return None if row is None else decode_term(row[0])
        except (sqlite3.Error, ClusterError):
            return None

    def put_local(self, name: str, value: Any) -> None:
        """Keep a value only this node needs (what its key file and the cluster agreed on last)."""
        try:
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO local VALUES (?, ?)", (name, encode_term(value)))
        except sqlite3.Error as exc:
            log.error("cannot save the cluster state to %s: %s", self.path, exc)

    def purge(self, before: float) -> None:
        """Delete the tombstones stamped before ``before``, as the replica does (Replica.purge)."""
        with contextlib.suppress(sqlite3.Error), self.db:
            self.db.execute("DELETE FROM rows WHERE at < ? AND value = ?", (before, encode_term(None)))

    def close(self) -> None:
        """Close the database."""
        with contextlib.suppress(sqlite3.Error):
            self.db.close()


# Kinds of rows a peer sends that are kept as they arrive, not at the next housekeeping round: a join
# is Done once both nodes have heard each other in step, and a node killed at once must come back a
# member all the same. (This node's own member changes are saved where it makes them: Membership.add,
# remove_down, leave_now.)
SAVED_AT_ONCE = frozenset({"member"})


class Replication:
    """The replicated rows and their flow (loop thread): this node's writes (``put``) go to the peers after
    the batch (``announce``) and to the store at the next round (``save``); a peer's rows come in through
    ``merge`` (saved at once for SAVED_AT_ONCE kinds), each changed row given to its kind's applier
    (``appliers``, filled by the cluster).

    ``written`` holds what follows this node's own write of a row of a kind (a session's: its index).
    """

    def __init__(self, me: str, store: ClusterStore):
        self.me, self.store = me, store
        self.replica = Replica(me, store.load())
        self.links: ClusterLinks | None = None
        self.appliers: dict[str, Callable[[Update], None]] = {}
        self.written: dict[str, Callable[[Update], None]] = {}
        self.dirty: dict[tuple[str, str], Update] = {}  # rows to save at the next timer round
        self.outgoing: list[Update] = []  # local updates to announce after this batch
        self.quiet: dict[str, bool] = {}  # peer -> a merge with it found nothing new since the link came up
        self.unsynced: set[str] = set()  # peers not heard in step with since the start

    def put(self, kind: str, key: str, value: Any, renew: bool = False, quiet: bool = False) -> None:
        """Write a row here; it goes out after the batch."""
        # quiet: stamped just after this node's last write of the row, so that a claim another node made
        # meanwhile (a takeover, stamped with its time) still wins over it
        update = self.replica.put(kind, key, value, 0.0 if quiet else time.time(), renew)
        if update is not None:
            self.dirty[kind, key] = update
            self.outgoing.append(update)
            written = self.written.get(kind)
            if written is not None:
                written(update)

    def merge(self, peer: str, body: bytes) -> bool:
        """Merge a peer's FRAME_META and answer it; True when it brought nothing new and asked nothing."""
        changed, replies = self.replica.receive(decode_term(body))
        self.take_remote(changed)
        if any(update.kind in SAVED_AT_ONCE for update in changed):
            self.save()  # before the answer: a peer that hears this node in step may count on it
        for reply in replies:
            self.links.send(peer, FRAME_META, encode_term(reply))
        if changed or replies:
            return False
        if not self.quiet.get(peer, False):  # quiet now: say so with this digest, and the peer is quiet at once too
            self.quiet[peer] = True          # (not at its next digest round, two cluster_sync_interval away)
            self.links.send(peer, FRAME_META, encode_term(self.replica.digest_message()))
        self.unsynced.discard(peer)
        return True

    def take_remote(self, updates: list[Update]) -> None:
        """Apply updates that came from other nodes and changed the replica."""
        for update in updates:
            self.dirty[update.kind, update.key] = update
            apply = self.appliers.get(update.kind)
            try:
                if apply is not None:
                    apply(update)
            except ClusterError as exc:  # a peer's bad row: one line, and the others still apply
                log.warning("cluster: cannot apply %s %r: %s", update.kind, update.key[:100], exc.text)
            except Exception:  # one bad row must not stop the others; the row stays for the next look
                log.exception("cluster: cannot apply %s %r", update.kind, update.key)

    def hello(self, peer: str) -> None:
        """A link to ``peer`` came up: offer it a digest (it answers what either side lacks)."""
        self.quiet[peer] = False
        self.links.send(peer, FRAME_META, encode_term(self.replica.digest_message()))

    def digest(self, peers: Iterable[str]) -> None:
        """Send the anti-entropy digest to each of ``peers`` that is up."""
        body = encode_term(self.replica.digest_message())
        for peer in peers:
            if self.links.is_up(peer):
                self.links.send(peer, FRAME_META, body)

    def announce(self) -> None:
        """Send this batch's writes to every linked node."""
        updates, self.outgoing = self.outgoing, []
        if updates and self.links is not None:
            body = encode_term(self.replica.announce(updates))
            for row in self.links.rows():  # every linked node, a member just removed too: it hears why
                if row["up"]:
                    self.links.send(row["name"], FRAME_META, body)

    def save(self) -> None:
        """Keep the rows changed since the last save."""
        rows, self.dirty = list(self.dirty.values()), {}
        if rows:
            self.store.save(rows)

    def purge(self, before: float) -> None:
        """Forget the tombstones older than ``before``, here and in the store (else a restart loads them)."""
        self.replica.purge(before)
        self.store.purge(before)


class ClusterCalls:
    """Requests between nodes: this node's to a peer (``call``, ``gather``, from command threads) and the
    peers' to this node (``take``), each run by ``ops`` (CLUSTER_OPS) on ``node`` in a worker thread.

    ``peers`` and ``in_loop`` are the cluster's; ``links`` is set once the cluster's links exist. The
    calls waiting for an answer belong to the loop thread.
    """

    def __init__(self, node: NodeApi, ops: Mapping[str, Callable[..., Any]], loop: asyncio.AbstractEventLoop,
                 peers: Callable[[], list[str]], in_loop: Callable[..., Any]):
        self.node, self.ops, self.loop, self.peers, self.in_loop = node, ops, loop, peers, in_loop
        self.links: ClusterLinks | None = None
        self.waiting: dict[int, tuple[str, concurrent.futures.Future]] = {}  # call id -> peer, its answer
        self.last_id = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(CLUSTER_CALL_WORKERS, thread_name_prefix="vmqapi-cluster")
        self.serving = threading.BoundedSemaphore(CLUSTER_MAX_CALLS)  # taken in the loop, given back by a worker
        self.stop_after_answer = False  # set by cluster leave -k on the node that leaves

    def call(self, peer: str, op: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """Ask ``peer`` to run ``op`` (one of CLUSTER_OPS) and return its answer; raise ClusterError."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def send() -> None:
            self.last_id += 1
            self.waiting[self.last_id] = (peer, future)
            if self.links is None or not self.links.is_up(peer):
                self.waiting.pop(self.last_id)
                future.set_exception(ClusterError(f"{peer} is not reachable"))
                return
            self.links.send(peer, FRAME_CALL, encode_term([self.last_id, op, list(args)]))
        self.loop.call_soon_threadsafe(send)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise ClusterError(f"{peer} did not answer within {timeout:g} s") from None

    def gather(self, op: str, *args: Any) -> list[tuple[str, Any]]:
        """Ask every reachable peer ``op``; return (peer, answer) for those that answered."""
        answers = []
        for peer in self.in_loop(self.peers):
            try:
                answers.append((peer, self.call(peer, op, *args)))
            except ClusterError as exc:
                log.info("cluster: %s did not answer %s: %s", peer, op, exc.text)
        return answers

    def reply(self, peer: str, body: bytes) -> None:
        """Take a peer's answer (FRAME_REPLY) to one of this node's calls."""
        call_id, ok, result = decode_term(body)
        target, future = self.waiting.pop(call_id, (None, None))
        if future is not None and not future.done():
            future.set_result(result) if ok else future.set_exception(ClusterError(str(result)))

    def fail(self, peer: str | None, text: str) -> None:
        """Fail the calls waiting for ``peer`` (None: every call) with ``text``."""
        for call_id, (target, future) in list(self.waiting.items()):
            if peer is None or target == peer:
                del self.waiting[call_id]
                if not future.done():
                    future.set_exception(ClusterError(text))

    def shutdown(self) -> None:
        """Run no more requests (the node stops); those running finish on their own."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def take(self, peer: str, body: bytes) -> None:
        """Run another node's request (FRAME_CALL) in a worker, or answer busy when CLUSTER_MAX_CALLS wait."""
        call_id, op, args = decode_term(body)
        if not self.serving.acquire(blocking=False):
            self.links.send(peer, FRAME_REPLY, encode_term([call_id, False, f"busy: {CLUSTER_MAX_CALLS} requests "
                                                                               "wait already"]))
            return
        try:
            self.pool.submit(self._serve, peer, call_id, op, args)
        except RuntimeError:  # the node stops
            self.serving.release()

    def _serve(self, peer: str, call_id: int, op: str, args: list) -> None:
        try:
            self._answer(peer, call_id, op, args)
        finally:
            self.serving.release()

    def _answer(self, peer: str, call_id: int, op: str, args: list) -> None:
        fn = self.ops.get(op) if isinstance(op, str) else None
        try:
            if fn is None:
                raise BadRequest(f"unknown request {op[:100]!r}" if isinstance(op, str) else "a request without a name")
            try:
                inspect.signature(fn).bind(self.node, *args)
            except TypeError:
                raise BadRequest(f"bad arguments for {op}") from None
            reply = [call_id, True, fn(self.node, *args)]
        except VmqError as exc:
            reply = [call_id, False, exc.text]
        except Exception as exc:  # the caller hears it; this node logs it
            log.exception("cluster: request %s from %s failed", op, peer)
            reply = [call_id, False, f"{type(exc).__name__}: {exc}"]
        try:
            body = encode_term(reply)
        except ClusterError as exc:
            body = encode_term([call_id, False, f"the answer cannot be sent: {exc}"])
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(lambda: self.links.send(peer, FRAME_REPLY, body))
            if self.stop_after_answer:  # cluster leave -k: the asking node hears Done first
                self.loop.call_soon_threadsafe(self.loop.call_later, LEAVE_STOP_DELAY, self.node.request_stop)


def migrated_message(body: Any, max_props: int) -> Message | None:
    """Decode one message of a session handed over; None (logged) for a bad one: it alone is lost."""
    try:
        if not isinstance(body, bytes):
            raise ClusterError("a queued message that is not a forwarded message")
        msg = decode_forward(body, max_props)[1]
        check_publishable(msg.topic)
    except ClusterError as exc:
        log.warning("cluster: a queued message handed over is dropped: %s", exc.text)
        return None
    return msg


def _summary_ok(summary: Any) -> bool:
    """Whether a session summary from another node has the shape adopt_session reads (its entries are checked there)."""
    return isinstance(summary, dict) and isinstance(summary.get("subs") or {}, dict)


class KeptFrames:
    """Frames to other nodes that must arrive (the cluster state's ``Outbox`` and ``Inbox``), on the links and the store.

    ``keep`` stores a frame in this batch's commit and writes it to the peer's link when up;
    ``up`` sends everything still kept again, in order; ``receive`` hands each new frame to
    ``use(peer, kind, body, force)`` once and acknowledges it after the commit that holds what
    was done with it (``write_marks`` runs before the commit, ``send_acks`` after). Past
    ``limit()`` bytes unacknowledged for a peer, the engine refuses QoS 1/2 publishes for it
    (``full_nodes``). All in the loop thread.

    ``use`` answers "used", "full" (a persistent subscriber's queue has no room now: the frame
    and every later one from that peer wait, unacknowledged, and ``retry`` offers them again)
    or "forced" (used although full: it waited KEPT_PATIENCE, ``force``; the subscriber's own
    queue bound drops it, as on one node, and SessionMoves stops waiting for that subscriber).
    """

    def __init__(self, io: MqttIO, seam: Peers, limit: Callable[[], int], epoch: int,
                 use: Callable[[str, int, bytes, bool], str]):
        self.io, self.seam, self.limit, self.use = io, seam, limit, use
        self.links: ClusterLinks | None = None
        self.outbox, self.inbox = Outbox(epoch), Inbox()
        self.unsent: dict[str, collections.deque[tuple[int, int]]] = {}  # up peer -> kept numbers to write
        self.marks_due: dict[tuple[str, int], int] = {}  # (origin, epoch) -> seq to record before the commit
        self.acks_due: dict[tuple[str, int], int] = {}  # (peer, epoch) -> seq to acknowledge after it
        self.progress: dict[str, float] = {}  # up peer -> when it last acknowledged something (or came up)
        # peer -> its frames (decoded) waiting for queue room or for the store to write again
        self.parked: dict[str, collections.deque[tuple[int, int, int, int, bytes]]] = {}
        self.parked_at: dict[str, float] = {}  # peer -> since when its first parked frame waits
        # (seq, n, Awaited, mode) that wait for a peer's acknowledgements; ``mode`` says what happens when
        # they will not come: WAIT_FATAL fails when the peer is removed first, WAIT_GOES_ON goes on then (and
        # when the peer is down and publishes go on in a netsplit), WAIT_FIRM fails when it is removed and
        # waits on through a netsplit
        self.waits_made = 0
        self.waits: dict[tuple[str, int], list[tuple[int, int, Awaited, str]]] = {}  # (peer, epoch) -> a heap of
        self.ack_wait: Awaited | None = None  # what this batch's acknowledgements wait for (set by the cluster)
        self.held_acks: collections.deque[tuple[Awaited | None, dict[tuple[str, int], int]]] = collections.deque()
        self.copy_acks: dict[tuple[str, int], int] = {}  # acknowledgements of KEPT_COPY frames: never held
        self.batch_numbers: dict[str, tuple[int, int]] = {}  # peer -> the last other frame kept in this batch
        self.start_tails: list[tuple[str, tuple[int, int]]] = []  # the last frame of each (peer, epoch) at the start

    def load(self) -> None:
        """Bring back what the store keeps (before any link is up)."""
        store = self.io.store
        tails: dict[tuple[str, int], int] = {}
        for peer, epoch, seq, kind, body, row in store.load_kept():
            self.outbox.keep(peer, epoch, seq, kind, body, row)
            tails[peer, epoch] = max(seq, tails.get((peer, epoch), 0))
        self.start_tails = [(peer, (epoch, seq)) for (peer, epoch), seq in tails.items()]
        self.inbox = Inbox(store.load_marks())
        self.io.commit_hooks.append(self.send_acks)
        self.io.rollback_hooks.append(self.rolled_back)
        self.check_room()

    def keep(self, peer: str, kind: int, body: bytes) -> tuple[int, int] | None:
        """Keep a frame for ``peer`` until it says it committed it, and send it; return its (epoch, seq).

        KEPT_COPY frames are a stream of their own (COPY_STREAM): their acknowledgements never wait
        behind others (see ``send_acks``), so two nodes copying to each other never wait for each other.
        """
        if len(body) + _KEPT.size > CLUSTER_MAX_FRAME:  # no link carries it: said, not kept for ever
            log.error("cluster: a frame of %d bytes for %s is over the %d a link carries; it is dropped",
                      len(body), peer, CLUSTER_MAX_FRAME)
            return None
        epoch, seq = self.outbox.number(peer, COPY_STREAM if kind == KEPT_COPY else 0)
        if kind != KEPT_COPY:
            self.batch_numbers[peer] = (epoch, seq)
        row = self.io.store.add_kept(peer, epoch, seq, kind, body)
        self.outbox.keep(peer, epoch, seq, kind, body, row)
        unsent = self.unsent.get(peer)
        if unsent is not None:
            unsent.append((epoch, seq))
            self.pump(peer)
        if self.outbox.size[peer] > self.limit():
            self.check_room()
        return epoch, seq

    def is_up(self, peer: str) -> bool:
        """Whether the link to ``peer`` is up (what waits for it is then acknowledged in time)."""
        return self.links is not None and self.links.is_up(peer)

    def wait(self, peer: str, number: tuple[int, int], what: Awaited, mode: str) -> None:
        """Let ``what`` count the acknowledgement of frame ``number`` kept for ``peer`` (``mode``: see ``waits``)."""
        epoch, seq = number
        self.waits_made += 1
        heapq.heappush(self.waits.setdefault((peer, epoch), []), (seq, self.waits_made, what, mode))

    def settle_waits(self, peer: str, removed: bool) -> None:
        """Nothing more waits for ``peer``: it is down and the cluster lets publishes go on without it, or it was
        ``removed`` (then what was WAIT_FATAL fails: the frames it waited for are dropped, never committed)."""
        for key in [k for k in self.waits if k[0] == peer]:
            kept = []
            for entry in self.waits.pop(key):
                if entry[3] == WAIT_FIRM and not removed:
                    kept.append(entry)
                else:
                    entry[2].settle(not (removed and entry[3] in (WAIT_FATAL, WAIT_FIRM)))
            if kept:
                heapq.heapify(kept)
                self.waits[key] = kept

    def up(self, peer: str) -> None:
        """A link to ``peer`` came up: everything kept goes again (the last link may have lost some)."""
        self.unsent[peer] = collections.deque(self.outbox.pending(peer))
        self.progress[peer] = time.monotonic()
        self.pump(peer)

    def down(self, peer: str) -> None:
        """The link to ``peer`` is gone: nothing is written until it is up again, and its parked frames
        are forgotten (unacknowledged, they all come again on the next link)."""
        self.unsent.pop(peer, None)
        self.progress.pop(peer, None)
        self.parked.pop(peer, None)
        self.parked_at.pop(peer, None)

    def pump(self, peer: str) -> None:
        """Write kept frames to an up peer while its link takes them (the rest as acknowledgements make room)."""
        unsent, links = self.unsent.get(peer), self.links
        while unsent and links is not None:
            frame = self.outbox.frame(peer, *unsent[0])
            if frame is not None and not links.room(peer, len(frame)):
                break
            unsent.popleft()
            if frame is not None:
                links.send(peer, FRAME_KEPT, frame)

    def pump_all(self) -> None:
        """Write what waits for link room, to every up peer (the cluster's timer); send everything kept
        again to a peer that has acknowledged nothing for KEPT_RESEND seconds (a frame it could not use)."""
        now = time.monotonic()
        for peer in list(self.unsent):
            if self.outbox.size[peer] and now - self.progress.get(peer, now) > KEPT_RESEND:
                self.up(peer)
            self.pump(peer)

    def check_room(self) -> None:
        """Tell the engine which nodes have too much unacknowledged: QoS 1/2 publishes for them are refused."""
        limit = self.limit()
        self.seam.full_nodes = {peer for peer, size in self.outbox.size.items() if size > limit}

    def receive(self, peer: str, frame: bytes) -> None:
        """Take a kept frame from ``peer``: use a new one, acknowledge it after the commit; or park it."""
        decoded = decode_kept(frame)
        parked = self.parked.get(peer)
        if parked is not None:
            parked.append(decoded)  # behind the one that waits: the peer's order holds
        elif not self._take(peer, decoded):
            self.parked[peer] = collections.deque([decoded])
            self.parked_at[peer] = time.monotonic()

    def retry(self) -> None:
        """Offer parked frames again (after each batch: queues may have drained, the store may write)."""
        now = time.monotonic()
        if self.io.store.error is not None:  # waiting for the store is no subscriber's fault: no patience spent
            for peer in self.parked:
                self.parked_at[peer] = now
            return
        for peer, parked in list(self.parked.items()):
            while parked and self._take(peer, parked[0], now - self.parked_at[peer] >= KEPT_PATIENCE):
                parked.popleft()
                self.parked_at[peer] = now
            if not parked:
                del self.parked[peer], self.parked_at[peer]

    def _take(self, peer: str, frame: tuple[int, int, int, int, bytes], force: bool = False) -> bool:
        """Use, acknowledge or ignore one frame; False when it must wait for room (or for the store).

        ``force``: it has waited KEPT_PATIENCE: it goes in whatever its subscribers' queues say."""
        epoch, seq, floor, kind, body = frame
        verdict = self.inbox.take(peer, epoch, seq, floor)
        if verdict == "gap":
            return True  # an earlier one is missing: this one comes again after it
        if verdict == "new":
            if self.io.store.error is not None:
                return False  # what it brings could not be kept: it waits, unacknowledged
            try:
                used = self.use(peer, kind, body, force)
            except (ClusterError, ValueError, TypeError) as exc:  # it alone is lost, not the frames after it
                log.warning("cluster: a kept frame from %s could not be used (%s)", peer, exc)
                used = "used"
            except Exception:  # a bug: it costs this frame, never the stream behind it
                log.exception("cluster: internal error using a kept frame from %s", peer)
                used = "used"
            if used == "full":
                return False
            forgotten = self.inbox.mark(peer, epoch, seq)
            self.marks_due[peer, epoch] = seq
            if forgotten is not None:
                self.marks_due.pop((peer, forgotten), None)
                self.io.store.delete_mark(peer, forgotten)
        (self.copy_acks if kind == KEPT_COPY else self.acks_due)[peer, epoch] = self.inbox.last(peer, epoch)
        return True

    def acknowledged(self, peer: str, frame: bytes) -> None:
        """``peer`` committed kept frames: forget them here."""
        epoch, upto = decode_kept_ack(frame)
        full = peer in self.seam.full_nodes
        rows = self.outbox.ack(peer, epoch, upto)
        waits = self.waits.get((peer, epoch))
        while waits and waits[0][0] <= upto:
            heapq.heappop(waits)[2].settle()
        if rows:
            self.progress[peer] = time.monotonic()
        self.io.store.delete_kept(rows)
        if full:
            self.check_room()
        self.pump(peer)

    def write_marks(self) -> None:
        """Record what this batch used of each peer's frames, in the commit of what it did with them."""
        store = self.io.store
        for (origin, epoch), seq in self.marks_due.items():
            store.put_mark(origin, epoch, seq)
        self.marks_due.clear()

    def send_acks(self) -> None:
        """Acknowledge the kept frames this commit made safe (MqttIO runs this after each commit); with copies
        made in this batch (``ack_wait``), once the nodes that keep them have committed them too, in order."""
        wait, self.ack_wait = self.ack_wait, None
        if self.copy_acks and self.links is not None:  # copies make no copies: nothing to wait for
            for (peer, epoch), seq in self.copy_acks.items():
                self.links.send(peer, FRAME_KEPT_ACK, _KEPT_ACK.pack(epoch, seq))
        self.copy_acks.clear()
        if (wait is not None or self.held_acks) and (self.acks_due or wait is not None):
            self.held_acks.append((wait, dict(self.acks_due)))
            self.acks_due.clear()
            return self.send_held()
        if self.acks_due and self.links is not None:
            for (peer, epoch), seq in self.acks_due.items():
                self.links.send(peer, FRAME_KEPT_ACK, _KEPT_ACK.pack(epoch, seq))
            self.acks_due.clear()

    def send_held(self) -> None:
        """Send the held acknowledgements whose copies are committed, oldest first."""
        held = self.held_acks
        while held and (held[0][0] is None or held[0][0].count <= 0):
            for (peer, epoch), seq in held.popleft()[1].items():
                if self.links is not None:
                    self.links.send(peer, FRAME_KEPT_ACK, _KEPT_ACK.pack(epoch, seq))

    def rolled_back(self) -> None:
        """A commit failed: what this batch used is not kept, so nothing of it is acknowledged and the
        marks are those of the store again (the peers send it again when KEPT_RESEND passes)."""
        self.acks_due.clear()
        self.copy_acks.clear()
        self.marks_due.clear()
        self.ack_wait = None
        self.inbox = Inbox(self.io.store.load_marks())

    def drop(self, peer: str) -> list[bytes]:
        """Forget what was kept for a node that left the cluster; return the sessions handed over to it that it
        never acknowledged (KEPT_MIGRATE bodies: they go on elsewhere, ``SessionMoves.rehome``)."""
        dropped = self.outbox.drop(peer)
        moving = [body for _, kind, body in dropped if kind == KEPT_MIGRATE]
        if len(dropped) > len(moving):
            log.warning("cluster: %d kept frame(s) for %s are dropped: it left the cluster",
                        len(dropped) - len(moving), peer)
        self.io.store.delete_kept([row for row, _, _ in dropped])
        self.settle_waits(peer, removed=True)
        self.check_room()
        return moving


###############################################################################
# 26. Cluster: sessions moving between nodes, and their copies ################
###############################################################################
# Owns: sessions moving between nodes with their messages, other nodes'
#       sessions in the router, this node's sessions as rows, sessions taken
#       up when their node is removed, and the copies of persistent sessions
#       kept on a second node (queue_replicas = 2).
# Must not know: the bytes on a link, the links themselves.

class HandedOver:
    """Persistent sessions this node handed to another node lately: what still arrives for them follows them.

    Kept MOVED_KEEP seconds (a publisher's node learns of the move well before), MOVED_MAX at most;
    their filters sit in a trie per mountpoint, so ``wanting`` costs a topic's levels, not a scan.
    """

    def __init__(self):
        self.sessions: dict[tuple[str, str], tuple[str, tuple[str, ...], float]] = {}  # -> owner, filters, until
        self.tries: dict[str, TopicTrie] = {}

    def add(self, mountpoint: str, client_id: str, owner: str, filters: Iterable[str], now: float) -> None:
        """Remember that a session went to ``owner`` with these subscriptions."""
        self.forget(mountpoint, client_id)
        plain = tuple(f for f in filters if not f.startswith(SHARE_PREFIX))
        self.sessions[mountpoint, client_id] = (owner, plain, now + MOVED_KEEP)
        trie = self.tries.setdefault(mountpoint, TopicTrie())
        for topic_filter in plain:
            trie.add(topic_filter, client_id, 0)
        if len(self.sessions) > MOVED_MAX:
            self.forget(*next(iter(self.sessions)))

    def forget(self, mountpoint: str, client_id: str) -> None:
        """The session is back here (or gone): nothing follows it any more."""
        entry = self.sessions.pop((mountpoint, client_id), None)
        if entry is not None:
            trie = self.tries[mountpoint]
            for topic_filter in entry[1]:
                trie.remove(topic_filter, client_id)  # an emptied trie stays: mountpoints are few

    def expire(self, now: float) -> None:
        """Forget those handed over more than MOVED_KEEP ago."""
        while self.sessions and next(iter(self.sessions.values()))[2] <= now:
            self.forget(*next(iter(self.sessions)))

    def owner(self, mountpoint: str, client_id: str) -> str | None:
        """Where a session handed over went (None: not handed over lately)."""
        entry = self.sessions.get((mountpoint, client_id))
        return entry[0] if entry is not None else None

    def wanting(self, mountpoint: str, topic: str) -> list[tuple[str, str]]:
        """(client id, owner) of each session handed over with a subscription matching ``topic``."""
        trie = self.tries.get(mountpoint)
        if trie is None:
            return []
        return [(client_id, self.sessions[mountpoint, client_id][0]) for client_id in trie.match(topic)]


class SessionMoves:
    """Sessions moving between nodes, with their messages in order (the cluster's part; the engine's
    side, ``Peers``, does ``hand_over``, ``adopt_messages``, ``deliver_to`` and ``stop_waiting``).

    The old node hands a session over (``moved``) as a kept frame and passes on, for a while, what
    still reaches it (``HandedOver``). Every other node, on seeing the session's row move, sends
    the old node a marker behind what it sent there (``row_moved``: KEPT_FLUSH); the old node
    passes each marker on to the new one (KEPT_FLUSHED) behind what it passed on. The new node's
    queue waits (``took_over``) until the old node's messages and the marker of every other node
    up have come, at most ADOPT_WAIT: then every older message is ahead of every newer one.
    """

    def __init__(self, seam: Peers, kept: KeptFrames, me: str, replica: Replica, loop: asyncio.AbstractEventLoop,
                 flush_soon: Callable[[], None]):
        self.seam, self.kept, self.me, self.replica, self.loop = seam, kept, me, replica, loop
        self.flush_soon = flush_soon  # the cluster's: what a timer did here is committed and sent
        self.handed = HandedOver()
        # session taken over here -> [its wait (Session.waiting), nodes whose marker is due, migrated, row stamp]
        self.awaiting: dict[tuple[str, str], list[Any]] = {}
        self.markers: dict[tuple[str, str], list[tuple[str, float]]] = {}  # sessions still here: markers that wait
        self.given_up: dict[tuple[str, str], float] = {}  # full queues forwards do not wait for, until when

    # -- the old node -----------------------------------------------------
    def moved(self, key: str, owner: str, stamp: float) -> None:
        """A newer row (of time ``stamp``) puts a session this node holds on ``owner``: hand it over there."""
        mountpoint, client_id = split_session_key(key)
        summary = self.seam.session_summary(mountpoint, client_id)
        if summary is None:
            return
        messages = self.seam.hand_over(mountpoint, client_id, time.time())
        self.migrate(owner, mountpoint, client_id, None, messages)
        if not summary["clean"]:  # what still comes here for it, sent before its publisher's node knew, follows it
            self.handed.add(mountpoint, client_id, owner, summary["subs"], time.monotonic())
        for node, of in self.markers.pop((mountpoint, client_id), ()):
            if of >= stamp:  # an older one is of an earlier move
                self.kept.keep(owner, KEPT_FLUSHED, encode_term([key, node, of]))

    def migrate(self, owner: str, mountpoint: str, client_id: str, summary: dict | None,
                messages: Sequence[Message]) -> None:
        """Send a session's messages (and with ``summary`` the session itself) to ``owner``."""
        body = encode_term([mountpoint, client_id, summary,
                            [encode_forward(mountpoint, m, True, ()) for m in messages]])
        self.kept.keep(owner, KEPT_MIGRATE, body)  # committed with the session's end here

    def row_moved(self, key: str, old: str, owner: str, stamp: float) -> None:
        """Another node's session row moved from ``old`` to ``owner``: mark the end of what went to ``old``."""
        if old != self.me:
            self.kept.keep(old, KEPT_FLUSH, encode_term([key, owner, stamp]))

    def _on_flush(self, peer: str, body: bytes) -> None:
        key, owner, stamp = decode_marker(body)
        mountpoint, client_id = split_session_key(key)
        target = self.handed.owner(mountpoint, client_id)
        if target is None and self.seam.session_summary(mountpoint, client_id) is not None:
            waiting = self.markers.setdefault((mountpoint, client_id), [])  # the row reaches this node later
            if len(waiting) < MARKERS_MAX:
                waiting.append((peer, stamp))
            if len(self.markers) > MOVED_MAX:  # of sessions that never moved after all: the oldest go
                del self.markers[next(iter(self.markers))]
        elif (target or owner) != self.me:
            self.kept.keep(target or owner, KEPT_FLUSHED, encode_term([key, peer, stamp]))

    # -- the new node -----------------------------------------------------
    def took_over(self, old: str, mountpoint: str, client_id: str, up: Iterable[str]) -> None:
        """A client took a session over here from ``old``: its queue waits for what the others owe it."""
        self.handed.forget(mountpoint, client_id)  # back here: nothing to pass on any more
        which = self.seam.waiting(mountpoint, client_id)
        if not which:
            return
        if old not in up:  # a node down sends later: nothing to wait for
            return self._done(mountpoint, client_id, which)
        self.awaiting[mountpoint, client_id] = [which, set(up) - {old}, False, None]
        self.loop.call_later(ADOPT_WAIT, self._done, mountpoint, client_id, which)

    def _check(self, mountpoint: str, client_id: str) -> None:
        entry = self.awaiting.get((mountpoint, client_id))
        if entry is not None and entry[2] and not entry[1]:
            self._done(mountpoint, client_id, entry[0])

    def stamped(self, key: str, stamp: float) -> None:
        """This node wrote a session's row: the first one since a takeover is the move the markers name."""
        entry = self.awaiting.get(split_session_key(key))
        if entry is not None and entry[3] is None:
            entry[3] = stamp

    def _done(self, mountpoint: str, client_id: str, which: int) -> None:
        entry = self.awaiting.get((mountpoint, client_id))
        if entry is not None and entry[0] == which:
            del self.awaiting[mountpoint, client_id]
        self.seam.stop_waiting(mountpoint, client_id, time.time(), which)
        self.flush_soon()

    def down(self, peer: str) -> None:
        """A node is gone: no marker will come from it."""
        for (mountpoint, client_id), entry in list(self.awaiting.items()):
            entry[1].discard(peer)
            self._check(mountpoint, client_id)

    def read_migrate(self, body: bytes) -> tuple[str, str, dict | None, list[Message]]:
        """Read a KEPT_MIGRATE body: mountpoint, client id, the session's summary (None: messages only) and
        its messages (one that cannot be used is left out, logged); ClusterError for a bad one."""
        try:
            mountpoint, client_id, summary, bodies = decode_term(body)
        except (TypeError, ValueError):
            raise ClusterError("a session handed over that is not one") from None
        if not (isinstance(mountpoint, str) and isinstance(client_id, str) and isinstance(bodies, list)
                and (summary is None or _summary_ok(summary))):
            raise ClusterError(f"a session handed over with a bad summary: {str(client_id)[:100]!r}")
        limit = self.seam.ctx.packet_limits.properties
        messages = [msg for msg in (migrated_message(b, limit) for b in bodies) if msg is not None]
        if len(messages) < len(bodies):
            log.warning("cluster: %d of the %d queued message(s) of %r handed over could not be used",
                        len(bodies) - len(messages), len(bodies), client_id[:100])
        return mountpoint, client_id, summary, messages

    def on_migrate(self, body: bytes) -> None:
        """A session (or its messages) handed over to this node."""
        seam = self.seam
        mountpoint, client_id, summary, messages = self.read_migrate(body)
        now = time.time()
        if summary is not None:
            seam.adopt_session(mountpoint, client_id, summary, now)
        held = self.replica.get("session", session_key(mountpoint, client_id))
        ours = isinstance(held, dict) and held.get("node") == self.me  # here, whatever this node forgot
        owner = self.handed.owner(mountpoint, client_id)
        if owner is not None and seam.session_summary(mountpoint, client_id) is None:
            self.kept.keep(owner, KEPT_MIGRATE, body)  # it moved on from here meanwhile: its queue follows it
            return
        if not seam.adopt_messages(mountpoint, client_id, messages, now, force=ours, settle=True) and messages:
            log.warning("cluster: %d queued message(s) of %r handed over have no session here to go to",
                        len(messages), client_id[:100])
        entry = self.awaiting.get((mountpoint, client_id))
        if entry is None:
            self._done(mountpoint, client_id, seam.waiting(mountpoint, client_id))
        else:
            entry[2] = True
            self._check(mountpoint, client_id)

    def rehome(self, body: bytes, handed: tuple[str, str, dict | None, list[Message]], heir: str | None) -> None:
        """A session handed over to a node removed before it acknowledged it (``body``, as ``read_migrate``
        read it: ``handed``): its messages go to the node that took that node's sessions up (``heir``)."""
        mountpoint, client_id, summary, messages = handed
        if heir is None:
            log.warning("cluster: %d message(s) of %r handed over to a removed node have no node to go to",
                        len(messages), client_id[:100])
        elif heir != self.me:
            self.kept.keep(heir, KEPT_MIGRATE, body)
        else:
            seam, now = self.seam, time.time()
            if summary is not None:
                seam.adopt_session(mountpoint, client_id, summary, now)
            seam.adopt_messages(mountpoint, client_id, messages, now, force=True)

    # -- every node -------------------------------------------------------
    def use(self, peer: str, kind: int, body: bytes, force: bool) -> str:
        """Act on a kept frame (KeptFrames.receive): "used", "full" (not now) or "forced" (see KeptFrames)."""
        seam = self.seam
        if kind == KEPT_FORWARD:
            mountpoint, msg, plain, groups = decode_forward(body, seam.ctx.packet_limits.properties)
            check_publishable(msg.topic)
            now = time.monotonic()
            full = [key for key in seam.full_for(mountpoint, msg) if self.given_up.get(key, 0) < now] if plain \
                else []
            if full and not force:
                return "full"
            for key in full:  # a queue that did not drain in KEPT_PATIENCE: its bound drops, as on one node
                self.given_up[key] = now + KEPT_GIVEN_UP
            if len(self.given_up) > MOVED_MAX:
                self.given_up = {k: t for k, t in self.given_up.items() if t >= now}
            seam.deliver_forwarded(mountpoint, msg, plain, groups, time.time())
            for client_id, owner in self.handed.wanting(mountpoint, msg.topic) if plain else ():
                if seam.session_summary(mountpoint, client_id) is None:  # not made here again meanwhile
                    self.kept.keep(owner, KEPT_PASSED, encode_term([client_id, body]))
            return "forced" if full else "used"
        if kind == KEPT_MIGRATE:
            self.on_migrate(body)
        elif kind == KEPT_PASSED:
            client_id, forward = decode_passed(body)
            mountpoint, msg = decode_forward(forward, seam.ctx.packet_limits.properties)[:2]
            check_publishable(msg.topic)
            if not seam.deliver_to(mountpoint, client_id, msg, time.time()):
                owner = self.handed.owner(mountpoint, client_id)
                if owner is None:
                    seam.counters["queue_message_unhandled", ()] += 1
                else:  # it moved on again
                    self.kept.keep(owner, KEPT_PASSED, body)
        elif kind == KEPT_FLUSH:
            self._on_flush(peer, body)
        elif kind == KEPT_FLUSHED:
            key, node, stamp = decode_marker(body)
            mountpoint, client_id = split_session_key(key)
            entry = self.awaiting.get((mountpoint, client_id))
            if entry is not None and entry[3] is not None and stamp >= entry[3]:  # of this move, not an earlier
                entry[1].discard(node)
                self._check(mountpoint, client_id)
        else:
            raise ClusterError(f"a kept frame of unknown kind {kind}")
        return "used"


COPY_FRAME_BYTES = 1 << 20  # about how many bytes of copies one kept frame carries (a reset takes several)
COPY_RESETS = 64  # sessions sent whole per batch (the rest in the next ones): a start never builds them all at once


def _rows_ok(rows: Any) -> bool:
    """Whether a copy op's rows are a list of row numbers a store can hold."""
    return isinstance(rows, list) and all(type(r) is int and 0 < r < 1 << 63 for r in rows)


def copy_node(key: str, home: str, members: Iterable[str]) -> str | None:
    """Return the member that keeps the second copy of session ``key`` (``session_key``) whose home is
    ``home``; None when there is no other member.

    Each member scores the key (rendezvous hashing) and the highest score wins: every node finds
    the same one from the member list alone, and a member leaving moves only the copies it kept.
    """
    best: tuple[int, str] | None = None
    for member in members:
        if member != home:
            score = (zlib.crc32(f"{key}\0{member}".encode()), member)
            if best is None or score > best:
                best = score
    return best[1] if best is not None else None


class Copies:
    """Persistent sessions kept on two nodes (queue_replicas = 2), both halves (loop thread).

    The home node: the message store tells it (``StoreWatch``) of every queued message kept and
    done with; each goes, in the batch that kept it, to the session's second node
    (``copy_node``) as a kept frame of KEPT_COPY ops: ``["a", mountpoint, client id, [row,
    message, row, message...]]``, ``["d", [row...]]``, ``["e", mountpoint, client id]`` (the
    copy ends) and ``["k", mountpoint, client id, [row...]]`` (only these rows stay: after its
    adds, a session sent whole; its copy is never shorter meanwhile, whatever frame a death
    cuts it at), and after a start ``["s", [[mountpoint, client id]...]]`` (copies of this
    node's other sessions go: what an earlier run left). ``flush`` keeps this batch's frames and
    says which publishers' acknowledgements wait for which of them. The session's subscriptions travel in its
    replicated row, as for every session.

    The second node: ``use`` applies the ops to its store's copies (committed before the
    acknowledgement); ``take`` hands them over when the home node is removed or a client takes
    the session up here while its home is down.
    """

    def __init__(self, me: str, seam: Peers, kept: KeptFrames, store: Any, members: Callable[[], list[str]],
                 replicas: Callable[[], int], flush_soon: Callable[[], None] = lambda: None):
        self.me, self.seam, self.kept, self.store, self.members, self.replicas = me, seam, kept, store, members, replicas
        self.flush_soon = flush_soon  # the cluster's: a batch runs soon (resets left, ends released)
        self.ops: dict[str, list[list]] = {}  # peer -> this batch's ops for it, in order
        self.resets: dict[str, set[tuple[str, str]]] = {}  # peer -> sessions it gets whole at this batch's end
        # session -> publishers (mountpoint, client id) whose PUBACK waits for its copy node (known at flush)
        self.publishers: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self.rows: dict[int, tuple[str, str]] = {}  # row of a message copied -> its session
        self.by_session: dict[tuple[str, str], set[int]] = {}  # ... and the other way
        self.assigned: dict[tuple[str, str], str] = {}  # session -> the node that has (or is being sent) its copy
        self.tail: dict[str, int] = {}  # peer -> bytes of the last op of this batch's ops for it
        # copies to end on a node once what replaces them is committed elsewhere: (node, session), this batch's
        # (``ending``) and those whose replacement has been acknowledged (``ends_due``, sent at the next flush)
        self.ending: list[tuple[str, tuple[str, str]]] = []
        self.ends_due: list[tuple[str, tuple[str, str]]] = []
        self.urgent: set[tuple[str, str]] = set()  # sessions to send whole in this batch (a publisher waits)
        self.started = False  # retarget ran once since this node started
        # the sync after a start ("s": each node keeps copies of this node's sessions it is assigned, only):
        # "" none, "waits" (for the sessions sent whole, then acknowledgements), "due" (at the next flush)
        self.sync = ""

    # -- the home node: what the store tells ---------------------------------
    def target(self, key: tuple[str, str]) -> str | None:
        """The node that is to keep a copy of this node's persistent session ``key`` (None: none)."""
        if self.replicas() < 2 or key[1].startswith(BRIDGE_CLIENT_PREFIX):  # a bridge's session stays here
            return None
        return copy_node(session_key(*key), self.me, self.members())

    def added(self, mountpoint: str, client_id: str, row: int, msg: Message, qos: int) -> None:
        """A message was queued (and kept) for a persistent session here: its copy goes too."""
        if not qos:  # QoS 0 is not kept for anyone (its copy would cost without promising anything)
            return
        key = (mountpoint, client_id)
        peer = self.assigned.get(key)  # members changed: retarget moves it at the batch's end
        if peer is None:
            peer = self.target(key)
            if peer is None:
                return
            self.assign(key, peer)  # sent whole at the batch's end, this message with it
            self.urgent.add(key)
        elif key in self.resets.get(peer, ()):  # sent whole in this batch, this message with it
            self.urgent.add(key)
        else:
            self.add(peer, key, row, msg, qos)
        self.rows[row] = key
        self.by_session.setdefault(key, set()).add(row)
        if msg.qos and msg.origin is not None:
            self.publishers.setdefault(key, set()).add((mountpoint, msg.origin))

    def add(self, peer: str, key: tuple[str, str], row: int, msg: Message, qos: int) -> None:
        """Put the copy of a message into this batch's ops for ``peer`` (with the adds before it, when of ``key``)."""
        if msg.qos != qos or msg.frame:
            msg = dataclasses.replace(msg, qos=qos, frame=b"", frame5=False)
        body = encode_forward(key[0], msg, True, ())
        ops = self.ops.setdefault(peer, [])
        size = len(body) + 16
        if ops and ops[-1][0] == "a" and ops[-1][1] == key[0] and ops[-1][2] == key[1] \
                and self.tail[peer] + size <= COPY_FRAME_BYTES:  # one op never outgrows a frame
            ops[-1][3] += (row, body)
            self.tail[peer] += size
        else:
            ops.append(["a", key[0], key[1], [row, body]])
            self.tail[peer] = size

    def deleted(self, row: int) -> None:
        """A kept message is done with: its copy goes."""
        key = self.rows.pop(row, None)
        if key is None:
            return
        rows = self.by_session.get(key)
        if rows is not None:
            rows.discard(row)
        peer = self.assigned.get(key)
        if peer is not None:
            ops = self.ops.setdefault(peer, [])
            if ops and ops[-1][0] == "d":
                ops[-1][1].append(row)
            else:
                ops.append(["d", [row]])

    def ended(self, mountpoint: str, client_id: str) -> None:
        """A persistent session ended (or moved to another node): its copy ends."""
        key = (mountpoint, client_id)
        peer = self.assigned.pop(key, None)
        session = self.seam.sessions.get(key)
        if session is not None:
            session.copy = ""
        if peer is not None:  # once this batch's frames (the session handed over, say) are committed
            self.ending.append((peer, key))
            self.resets.get(peer, set()).discard(key)
        for row in self.by_session.pop(key, ()):
            self.rows.pop(row, None)

    def assign(self, key: tuple[str, str], peer: str | None) -> None:
        """Give a session's copy to ``peer`` (None: to no node): the old one ends, the new one gets it whole."""
        old = self.assigned.pop(key, None)
        if old is not None and old != peer:  # once the new one has it
            self.ending.append((old, key))
            self.resets.get(old, set()).discard(key)
        session = self.seam.sessions.get(key)
        if session is not None:
            session.copy = peer or ""
        if peer is not None:
            self.assigned[key] = peer
            self.resets.setdefault(peer, set()).add(key)

    def retarget(self) -> None:
        """Members changed (or the node started): every persistent session's copy goes where it belongs now."""
        if self.replicas() < 2:
            return
        for key, session in self.seam.sessions.items():
            if not session.clean:
                peer = self.target(key)
                if self.assigned.get(key) != peer:
                    self.assign(key, peer)
        for key in [k for k in self.assigned if k not in self.seam.sessions]:
            self.assign(key, None)
        if not self.started:  # what this node's last run left on other nodes (an end that never went) ends:
            self.started = True  # once every session is sent whole and what that run kept is acknowledged
            self.sync = "waits"

    def flush(self) -> tuple[dict[str, tuple[int, int]], dict[str, set[tuple[str, str]]]]:
        """Keep this batch's copy frames; return the last (epoch, seq) kept for each peer, and the publishers
        (mountpoint, client id) whose acknowledgement waits for each peer."""
        budget = COPY_RESETS
        for peer, keys in self.resets.items():
            for key in sorted(keys & self.urgent):  # a publisher waits for these: whatever the budget
                keys.discard(key)
                self._whole(peer, key)
            while keys and budget > 0:
                key = min(keys)
                keys.discard(key)
                budget -= 1
                self._whole(peer, key)
        self.urgent.clear()
        self.resets = {peer: keys for peer, keys in self.resets.items() if keys}
        due, self.ends_due = self.ends_due, []
        for peer, key in dict.fromkeys(due):  # (once each)
            if self.assigned.get(key) != peer:  # not given back to it meanwhile (its reset ends it first)
                self.ops.setdefault(peer, []).append(["e", *key])
        if self.sync == "due":
            self.sync = ""
            for peer in self.members():
                if peer != self.me:
                    self.ops.setdefault(peer, []).append(
                        ["s", sorted([*key] for key, there in self.assigned.items() if there == peer)])
        numbers = self._keep(self.ops)
        self.ops.clear()
        self.tail.clear()
        self._defer_ends(numbers)
        if self.resets:
            self.flush_soon()
        publishers: dict[str, set[tuple[str, str]]] = {}
        for key, waiting in self.publishers.items():  # the node that has the copy now, members changed or not
            peer = self.assigned.get(key)
            if peer is not None:
                publishers.setdefault(peer, set()).update(waiting)
        self.publishers = {}
        return numbers, publishers

    def _whole(self, peer: str, key: tuple[str, str]) -> None:
        """Send a session whole: its QoS 1/2 messages, then which rows stay (older copies of others go)."""
        rows = []
        for row, msg, qos in self.store.session_messages(*key):
            if qos:
                self.rows[row] = key
                self.by_session.setdefault(key, set()).add(row)
                self.add(peer, key, row, msg, qos)
                rows.append(row)
        self.ops.setdefault(peer, []).append(["k", *key, rows])

    def _keep(self, ops_by_peer: Mapping[str, list[list]]) -> dict[str, tuple[int, int]]:
        """Keep ops as KEPT_COPY frames of about COPY_FRAME_BYTES; return the last number kept for each peer."""
        numbers: dict[str, tuple[int, int]] = {}
        members = set(self.members())
        for peer, ops in ops_by_peer.items():
            if peer not in members:  # removed: it will never acknowledge them
                continue
            chunk: list[list] = []
            size = 0
            for n, op in enumerate(ops):
                chunk.append(op)
                size += sum(map(len, op[3][1::2])) + 16 * len(op[3]) + 64 if op[0] == "a" else \
                    16 * len(op[-1]) + 64
                if size >= COPY_FRAME_BYTES or n == len(ops) - 1:
                    number = self.kept.keep(peer, KEPT_COPY, encode_term(chunk))
                    if number is not None:
                        numbers[peer] = number
                    chunk, size = [], 0
        return numbers

    def _defer_ends(self, numbers: Mapping[str, tuple[int, int]]) -> None:
        """Send this batch's ends of copies once every frame this batch kept is acknowledged: the new copy
        node's copy, or the session handed over to another node, is committed there before the old copy goes."""
        if self.sync == "waits" and not self.resets:  # every session sent whole (in this batch, or before)
            self.sync = "acknowledged"
            self._after_frames(numbers, self.kept.start_tails, lambda: setattr(self, "sync", "due"))
        pending = {key for keys in self.resets.values() for key in keys}  # not sent whole yet: their ends wait
        ending = [e for e in self.ending if e[1] not in pending]
        self.ending = [e for e in self.ending if e[1] in pending]
        if ending:
            self._after_frames(numbers, [], lambda: self.ends_due.extend(ending))

    def _after_frames(self, numbers: Mapping[str, tuple[int, int]], more: Sequence[tuple[str, tuple[int, int]]],
                      then: Callable[[], None]) -> None:
        """Run ``then`` (and a batch soon) once every frame this batch kept, and ``more``, is acknowledged; never
        when a node is removed before it acknowledged (what ends copies must not run without what replaces them)."""
        frames = [*numbers.items(), *self.kept.batch_numbers.items(), *more]

        def released() -> None:
            if not what.failed:
                then()
                self.flush_soon()
        what = Awaited(len(frames), released)
        if not frames:
            return released()
        for peer, number in frames:  # acknowledged: a netsplit never releases it, a removal cancels it
            self.kept.wait(peer, number, what, WAIT_FIRM)

    def one_copy(self, up: Callable[[str], bool]) -> int:
        """How many persistent sessions here are kept on this node only now (no other member, or it is down)."""
        if self.replicas() < 2:
            return 0
        return sum(1 for key, s in self.seam.sessions.items()
                   if not s.clean and not key[1].startswith(BRIDGE_CLIENT_PREFIX)
                   and not (s.copy and up(s.copy)))

    # -- the second node ----------------------------------------------------
    def use(self, home: str, body: bytes) -> None:
        """Apply a KEPT_COPY frame from ``home`` to the copies kept here (committed before it is acknowledged)."""
        ops = decode_term(body)
        if not isinstance(ops, list):
            raise ClusterError("a copy frame that is not a list")
        store = self.store
        for op in ops:
            if not isinstance(op, list) or not op:
                raise ClusterError("a bad copy op")
            if op[0] == "d" and len(op) == 2 and _rows_ok(op[1]):
                store.delete_copies(home, op[1])
            elif op[0] == "a" and len(op) == 4 and isinstance(op[1], str) and isinstance(op[2], str) \
                    and isinstance(op[3], list) and len(op[3]) % 2 == 0 and _rows_ok(op[3][::2]) \
                    and all(type(b) is bytes for b in op[3][1::2]):
                store.put_copies(home, op[1], op[2], list(zip(op[3][::2], op[3][1::2])))
            elif op[0] == "e" and len(op) == 3 and isinstance(op[1], str) and isinstance(op[2], str):
                store.delete_copies(home, session=(op[1], op[2]))
            elif op[0] == "s" and len(op) == 2 and isinstance(op[1], list) \
                    and all(isinstance(k, list) and len(k) == 2 and all(type(x) is str for x in k) for k in op[1]):
                keep = {tuple(k) for k in op[1]}
                for session in {(mp, cid) for _, _, mp, cid, _ in store.load_copies(home)} - keep:
                    store.delete_copies(home, session=session)
            elif op[0] == "k" and len(op) == 4 and isinstance(op[1], str) and isinstance(op[2], str) \
                    and _rows_ok(op[3]):
                keep = set(op[3])
                store.delete_copies(home, [row for _, row, _, _, _ in store.load_copies(home, (op[1], op[2]))
                                           if row not in keep])
            else:
                raise ClusterError(f"a bad copy op {str(op[0])[:20]!r}")

    def take(self, home: str | None, session: tuple[str, str] | None = None) -> dict[tuple[str, str], list[Message]]:
        """Return (and forget) the copies kept here of ``home``'s sessions (or of that one; ``home`` None: that
        one's, whatever node they were copied from): their messages, in each home's order."""
        found: dict[tuple[str, str], list[Message]] = {}
        limit = self.seam.ctx.packet_limits.properties
        for _, _, mountpoint, client_id, body in self.store.load_copies(home, session):
            msg = migrated_message(body, limit)
            if msg is not None:
                found.setdefault((mountpoint, client_id), []).append(msg)
        self.store.delete_copies(home, session=session, whole=session is None)
        return found


class SessionRows:
    """The replica's session and retained rows and the engine (through ``Peers``), kept in step (loop thread).

    Other nodes' sessions give the router their subscriptions (``index``); this node's session and
    retained changes become rows (``record``); a session row that moves hands the session over
    (``SessionMoves``); a member removed while down leaves its persistent sessions to the others.
    """

    def __init__(self, me: str, seam: Peers, rows: Replication, moves: SessionMoves, copies: Copies):
        self.me, self.seam, self.rows, self.moves, self.copies = me, seam, rows, moves, copies
        self.replica = rows.replica
        self.owned: dict[str, tuple[str, tuple[str, ...], bool]] = {}  # session key -> node, filters, online
        self.interest: dict[tuple[str, str, str], list[int]] = {}  # (node, mp, filter) -> [members, online]
        self.initial = False  # the next record is the first since this node records: every session

    def index_all(self) -> None:
        """Give the router every other node's subscriptions the replica holds (at the start, and on a rejoin)."""
        for key, value in self.replica.items("session"):
            try:
                self.index(key, value)
            except ClusterError as exc:  # a bad row a peer sent once must not stop every later start
                log.warning("cluster: cannot apply session %r: %s", key[:100], exc.text)

    def index(self, key: str, value: Any) -> None:
        """Keep the router's view of other nodes' subscriptions in step with a session row."""
        mountpoint, _ = split_session_key(key)
        old = self.owned.pop(key, None)
        touched = set()
        if old is not None:
            node, filters, online = old
            for topic_filter in filters:
                counts = self.interest[node, mountpoint, topic_filter]
                counts[0] -= 1
                counts[1] -= online
                touched.add((node, mountpoint, topic_filter))
        if isinstance(value, dict) and value.get("node") != self.me and value.get("node") \
                and isinstance(value["node"], str):
            node, online = value["node"], bool(value.get("online"))
            subs = value.get("subs") or ()
            filters = tuple(f for f in subs if isinstance(f, str) and valid_subscription(f)) \
                if isinstance(subs, (list, dict)) else ()
            self.owned[key] = (node, filters, online)
            for topic_filter in filters:
                counts = self.interest.setdefault((node, mountpoint, topic_filter), [0, 0])
                counts[0] += 1
                counts[1] += online
                touched.add((node, mountpoint, topic_filter))
        for node, mp, topic_filter in touched:
            members, online = self.interest[node, mp, topic_filter]
            if members <= 0:
                del self.interest[node, mp, topic_filter]
            self.seam.router.set_remote(node, mp, topic_filter, max(members, 0), max(online, 0))

    def written(self, update: Update) -> None:
        """This node wrote a session's row: the node it moved from no longer wants its filters."""
        self.index(update.key, update.value)
        self.moves.stamped(update.key, float(update.stamp[0]))

    def apply_session(self, update: Update) -> None:
        """A peer's session row: index it; hand the session over when it moved from here, mark a move elsewhere."""
        key, value = update.key, update.value
        before = self.owned.get(key)
        self.index(key, value)
        owner, stamp = value.get("node") if isinstance(value, dict) else None, float(update.stamp[0])
        if owner is not None and owner != self.me:
            self.moves.moved(key, owner, stamp)
        if before is not None and owner not in (None, before[0]):
            self.moves.row_moved(key, before[0], owner, stamp)

    def apply_retained(self, update: Update) -> None:
        """A peer's retained row: the engine's retained messages follow it."""
        mountpoint, topic = split_session_key(update.key)
        check_publishable(topic)
        value = update.value
        msg = decode_forward(value, self.seam.ctx.packet_limits.properties)[1] if isinstance(value, bytes) else None
        self.seam.apply_remote_retained(mountpoint, topic, msg)

    def elsewhere(self, mountpoint: str, client_id: str) -> dict | None:
        """Return the row of a session another node holds (the engine's ``elsewhere``), else None."""
        value = self.replica.get("session", session_key(mountpoint, client_id))
        if isinstance(value, dict) and value.get("node") not in (None, self.me):
            return value
        return None

    def record(self) -> None:
        """Write the rows of what the engine changed in this batch: its sessions, its retained messages."""
        self._session_changes()
        seam = self.seam
        for mountpoint, topic in seam.take_retained_changes():
            msg = seam.router.retained[mountpoint].get(topic)
            self.rows.put("retain", session_key(mountpoint, topic),
                          None if msg is None else retained_value(mountpoint, msg))

    def _session_changes(self) -> None:
        seam, put = self.seam, self.rows.put
        changes = seam.take_session_changes()
        initial, self.initial = self.initial, False
        if initial:  # rows of this node's that name sessions it no longer has (it stopped, or was killed)
            for key, value in self.replica.items("session"):
                if isinstance(value, dict) and value.get("node") == self.me \
                        and split_session_key(key) not in seam.sessions:
                    put("session", key, None)
        for mountpoint, client_id in changes:
            key = session_key(mountpoint, client_id)
            summary = seam.session_summary(mountpoint, client_id)
            held = self.replica.get("session", key)
            ours = isinstance(held, dict) and held.get("node") == self.me
            if summary is None:
                if ours:
                    put("session", key, None, quiet=True)  # a takeover elsewhere meanwhile still wins
                continue
            row = {"node": self.me, "clean": bool(summary["clean"]), "online": bool(summary["online"]),
                   "subs": summary["subs"]}
            # A session restored from the store claims nothing: not one another node holds now, and
            # not with a fresh stamp for being offline after a kill (its row still wins or loses as it was).
            if initial and (isinstance(held, dict) and not ours
                            or ours and encode_term({**held, "online": row["online"]}) == encode_term(row)):
                continue
            # A session coming online here, or new here, claims it; a change of one that is here already (its
            # client gone, its subscriptions) must not win over a takeover another node stamped a moment ago.
            put("session", key, row, quiet=ours and not (row["online"] and not held.get("online")))

    def member_gone(self, name: str, alive: list[str]) -> None:
        """A member was removed while down: its persistent sessions live on among ``alive`` (sorted).

        With queue_replicas = 2 each goes on at the node that kept its copy, with every message of
        it; the others route its subscriptions there at once, before that node's row comes.
        """
        self.seam.router.drop_remote(name)
        copied = self.copies.replicas() > 1
        kept = self.copies.take(name)  # whatever the setting now: copies made while it was on are used
        for key, value in self.replica.items("session"):
            if isinstance(value, dict) and value.get("node") not in (None, name) \
                    and split_session_key(key) in kept:  # taken over elsewhere while its node was away
                mountpoint, client_id = split_session_key(key)
                messages = kept.pop((mountpoint, client_id))
                if value["node"] == self.me:
                    self.seam.adopt_messages(mountpoint, client_id, messages, time.time(), force=True)
                else:
                    self.moves.migrate(value["node"], mountpoint, client_id, None, messages)
            if not isinstance(value, dict) or value.get("node") != name:
                continue
            if value.get("clean"):  # its client was connected there: that session is gone
                self.rows.put("session", key, None)
                continue
            if not _summary_ok(value):
                continue
            mountpoint, client_id = split_session_key(key)
            heir = self.heir(key, name, alive)
            # a copy from the node that handed it to the removed one is kept until that one had its own
            earlier = self.copies.take(None, (mountpoint, client_id)).get((mountpoint, client_id), [])
            messages = earlier + kept.pop((mountpoint, client_id), [])
            if heir == self.me or messages:
                now = time.time()
                self.seam.adopt_session(mountpoint, client_id, value, now)
                self.seam.adopt_messages(mountpoint, client_id, messages, now, force=True)
            elif heir is not None and copied:
                with contextlib.suppress(ClusterError):
                    self.index(key, {**value, "node": heir})
        for (mountpoint, client_id), messages in kept.items():  # a session that ended there meanwhile
            log.warning("cluster: %d message(s) kept for %r of the removed %s have no session left to go to",
                        len(messages), client_id[:100], name)

    def heir(self, key: str, gone: str, others: list[str]) -> str | None:
        """The node that takes up session ``key`` of ``gone`` among ``others`` (sorted): the one that kept its
        copy (queue_replicas = 2), else one by the key's hash."""
        if self.copies.replicas() > 1:
            return copy_node(key, gone, others)
        others = [m for m in others if m != gone]
        return others[zlib.crc32(key.encode()) % len(others)] if others else None

    def forget_others(self) -> None:
        """This node was taken out: no other node's subscription counts any more."""
        for peer in list(self.seam.router.remote):
            self.seam.router.drop_remote(peer)
        self.owned.clear()
        self.interest.clear()


###############################################################################
# 27. Cluster: membership, joins and leaves, routing, the Cluster itself ######
###############################################################################
# Owns: membership (joins, leaves, netsplits), shared keys and config,
#       forwarding messages; the Cluster that holds the parts; the cluster
#       commands.
# Must not know: the bytes on a link.


class Membership:
    """Who is in the cluster and who is reachable (loop thread): members and their links, joins and
    leaves, netsplits, and when this node starts recording its sessions for the others.

    ``bound`` (the cluster listener's address) and ``links`` are set by the cluster's start;
    ``after_batch`` is the cluster's, run when a join here changed rows outside a batch.
    """

    def __init__(self, me: str, address: tuple[str, int], seam: Peers, loop: asyncio.AbstractEventLoop,
                 rows: Replication, sessions: SessionRows, kept: KeptFrames, moves: SessionMoves,
                 after_batch: Callable[[], None]):
        self.me, self.address, self.seam, self.loop = me, address, seam, loop
        self.rows, self.replica, self.sessions, self.kept, self.moves = rows, rows.replica, sessions, kept, moves
        self.after_batch = after_batch
        self.links: ClusterLinks | None = None
        self.bound: tuple[str, int] | None = None
        self.split = ""  # why the cluster is not whole ('' when it is)
        self.arriving: dict[str, float] = {}  # members learned of while running -> until when not missing
        self.known: set[str] = set()  # the peers the last split check saw (a member not among them is new)
        self.record_after = 0.0  # when a restarted node records its sessions even if a peer was not heard
        self.new_address = False  # this node's address is to be put once a peer is heard: see advertise
        self.down_since: dict[str, float] = {}  # members without a link -> since when (monotonic)

    def start(self) -> None:
        """Take up the kept membership: index the others' sessions, link to the members, count the missing."""
        # A node that left or was removed stays out: its address, when it changed, is put only once
        # a peer has been heard (see advertise), not before a removal made while it was down.
        self.new_address = self.bound is not None and self.me in self.members()
        self.sessions.index_all()
        self.connect()
        self.known = set(self.peers())  # members kept from before a restart are missing until they link
        self.check_split()
        # A restarted node first hears what its peers hold, so that it never claims back with a
        # fresh stamp a session that moved while it was away; on its own it records changes at once.
        self.rows.unsynced = set(self.peers())
        self.record_after = time.monotonic() + FIRST_SYNC_WAIT
        self.maybe_record()

    def members(self) -> list[str]:
        """Return every member's name, this node's included when it is in a cluster."""
        return sorted(k for k, _ in self.replica.items("member"))

    def peers(self) -> list[str]:
        """Return the other members (none while this node is in no cluster, or was taken out of it)."""
        members = self.members()
        return [m for m in members if m != self.me] if self.me in members else []

    def links_up(self) -> int:
        """Return how many peers this node has a link to now."""
        return sum(row["up"] for row in self.links.rows()) if self.links is not None else 0

    def show_rows(self) -> list[dict]:
        """Return cluster show's rows (any thread: it reads the member rows' keys and each peer's link entry,
        every read whole under the interpreter's lock; a change the loop makes meanwhile shows next time)."""
        members = [*self.peers(), self.me]  # a node in no cluster (or taken out) lists itself alone
        return [{"Node": m, "Running": m == self.me or (self.links is not None and self.links.is_up(m))}
                for m in sorted(members)]

    def in_step(self, name: str) -> bool:
        """Whether ``name`` is a member linked and heard since its link came up."""
        return self.links.is_up(name) and self.rows.quiet.get(name, False)

    def advertise(self) -> None:
        """Put this node's address once a peer has been heard since the start (the peers dial it there).

        Stamped before that, the row would win over a removal made while this node was down, and
        bring it back into the cluster unasked, only because its address changed.
        """
        if self.new_address and (not self.peers() or any(self.rows.quiet.values())):
            self.new_address = False
            if self.me in self.members():
                self.rows.put("member", self.me, {"address": self.advertised()})

    def maybe_record(self) -> None:
        """Let the engine record changes once this node is in a cluster (a standalone node keeps none)."""
        self.advertise()
        if not self.seam.clustered and self.peers() and \
                (not self.rows.unsynced or time.monotonic() >= self.record_after):
            self.seam.clustered = True
            self.sessions.initial = True  # the first take is every session: see SessionRows.record

    def advertised(self) -> str:
        """Return the address the peers dial this node at."""
        host, port = self.bound or self.address
        if ipaddress.ip_address(host).is_unspecified:
            host = self.me.partition("@")[2] or "127.0.0.1"
        return f"{host}:{port}"

    # -- joins and leaves -------------------------------------------------
    def add(self, name: str, address: str) -> None:
        """Join ``name`` (at ``address``, as typed) and this node into one cluster."""
        rejoin = self.me not in self.members()
        # renewed: the row this node kept may have lost already, unseen, to its removal while it was down
        self.rows.put("member", self.me, {"address": self.advertised()}, renew=True)
        if not isinstance(self.replica.get("member", name), dict):  # its own address wins over the one typed
            self.rows.put("member", name, {"address": address})
        if rejoin:
            self.sessions.index_all()  # taken out before (left): the others' subscribers count again
        self.rows.quiet[name] = False  # Done once the peer is heard after these rows, not on an earlier merge
        self.expect(name, time.monotonic())
        self.connect()
        self.maybe_record()
        self.after_batch()
        self.rows.save()

    def remove_down(self, name: str) -> None:
        """Take out a member that is down (its link is gone: it is not asked)."""
        self.rows.put("member", name, None)
        self.gone(name)
        self.links.forget(name)
        self.drop_kept(name)  # never to be acknowledged: what waited for it goes on, or fails (KeptFrames.drop)
        self.connect()
        self.check_split()
        self.rows.announce()
        self.rows.save()

    def leave_now(self, kill_sessions: bool) -> None:
        """This node leaves: with ``kill_sessions`` its sessions move to the others first."""
        others = self.peers()
        if kill_sessions and others:
            seam, now = self.seam, time.time()
            for mountpoint, client_id in list(seam.life.session_keys(None)):
                summary = seam.session_summary(mountpoint, client_id)
                if summary is None:
                    continue
                messages = seam.hand_over(mountpoint, client_id, now)
                if not summary["clean"]:
                    target = self.sessions.heir(session_key(mountpoint, client_id), self.me, others)
                    self.moves.migrate(target, mountpoint, client_id, summary, messages)
        self.rows.put("member", self.me, None)
        self.rows.announce()
        self.rows.save()

    def member_row(self, update: Update) -> None:
        """A peer's member row: a member joined, left, or took this node out."""
        key, value = update.key, update.value
        if key == self.me:
            self.left() if value is None else self.sessions.index_all()  # a join elsewhere named this node
        elif value is None:
            self.gone(key)
            # later: a node that leaves with -k sends its answer right after this row
            self.loop.call_later(FORGET_DELAY, self.forget_if_gone, key)
        self.connect()
        self.check_split()  # a member first heard of now is arriving, not missing: see there

    def left(self) -> None:
        """Another node removed this one: forget the peers, run standalone."""
        log.warning("cluster: this node was taken out of the cluster")
        self.sessions.forget_others()
        for row in self.links.rows():  # after a moment: hand-overs to the others are still on their way
            self.loop.call_later(FORGET_DELAY, self.forget_if_out, row["name"])
        self.seam.clustered = False

    def gone(self, name: str) -> None:
        """A member was removed while down: its persistent sessions live on among the others; what waited for
        it goes on, or fails at once (its publisher resends after what it sent later, not before)."""
        self.kept.settle_waits(name, removed=True)
        self.sessions.member_gone(name, sorted(set(self.members()) | {self.me}))

    # -- the links --------------------------------------------------------
    def connect(self) -> None:
        """Dial every member (ClusterLinks keeps a link to each it is told of)."""
        if self.links is None or self.bound is None:
            return
        members = dict(self.replica.items("member"))
        if self.me not in members:
            return
        for name, value in members.items():
            if name != self.me and isinstance(value, dict):
                host, _, port = str(value.get("address", "")).rpartition(":")
                if host and port.isdigit():
                    self.links.connect(name, host.strip("[]"), int(port))

    def forget_if_gone(self, name: str) -> None:
        """Drop the link to, and what is kept for, a member removed FORGET_DELAY ago (if still out)."""
        if name not in self.members() and self.links is not None:
            self.links.forget(name)
            self.drop_kept(name)

    def drop_kept(self, name: str) -> None:
        """Drop what was kept for a removed member; sessions handed over to it go to its sessions' heirs."""
        alive = sorted(set(self.members()) | {self.me})
        for body in self.kept.drop(name):
            try:
                handed = self.moves.read_migrate(body)
                self.moves.rehome(body, handed, self.sessions.heir(session_key(*handed[:2]), name, alive))
            except ClusterError as exc:
                log.warning("cluster: a session handed over to %s cannot go on elsewhere: %s", name, exc)

    def forget_if_out(self, name: str) -> None:
        """Drop the link to a peer, this node being out of the cluster still."""
        if self.me not in self.members() and self.links is not None:  # not joined again meanwhile
            self.links.forget(name)

    def up(self, peer: str) -> None:
        """A link to ``peer`` came up: it is arriving no longer."""
        self.arriving.pop(peer, None)
        self.check_split()

    def down(self, peer: str, reason: str) -> None:
        """The link to ``peer`` is gone (not replaced)."""
        if peer in self.members():
            log.warning("cluster: lost %s (%s)", peer, reason)
        self.check_split()

    def expect(self, peer: str, now: float) -> None:
        """Give a member being joined JOIN_TIMEOUT to link before it counts as missing."""
        self.arriving[peer] = now + JOIN_TIMEOUT
        # a timer may run up to the clock's resolution early: look again once the time is surely over
        self.loop.call_later(JOIN_TIMEOUT + ARRIVAL_SLACK, self.check_split)

    def check_split(self) -> None:
        """Count a netsplit when a member has no link: one that had, or one that did not link in time.

        A member this node first hears of (a join here or through another node) gets JOIN_TIMEOUT
        to link. That is decided here, from every member the replica holds, and not row by row: a
        join reaches the others as one batch of rows, all merged before the first is applied, so a
        check run for an earlier row of the batch already sees the newcomer of a later one.
        """
        now = time.monotonic()
        peers = self.peers()
        for peer in set(peers) - self.known:
            if self.links is not None and not self.links.is_up(peer):
                self.expect(peer, now)
        self.known = set(peers)
        for peer in [p for p, until in self.arriving.items() if p not in self.known or until <= now]:
            del self.arriving[peer]
        down = [p for p in peers if (self.links is None or not self.links.is_up(p))
                and p not in self.arriving]  # a member being joined is not missing yet
        self.down_since = {p: self.down_since.get(p, now) for p in down}
        split = f"cluster nodes not reachable: {', '.join(down)}" if down else ""
        if bool(split) != bool(self.split):
            self.seam.counters["netsplit_detected" if split else "netsplit_resolved", ()] += 1
            log.warning("cluster: netsplit: %s", split) if split else log.info("cluster: every member is back")
        self.split = self.seam.netsplit = split


class SharedSettings:
    """The API keys and ``set --all`` values the cluster shares (loop thread): the key file and the
    replica's keys brought together each round, and a setting for this node applied when its row comes."""

    def __init__(self, me: str, keystore: KeyStore, apply_settings: Callable[[Mapping[str, Any]], None],
                 rows: Replication, peers: Callable[[], list[str]]):
        self.me, self.keystore, self.apply_settings, self.rows, self.peers = me, keystore, apply_settings, rows, peers
        self.replica, self.store = rows.replica, rows.store
        self.keys_synced: set[str] | None = None

    def sync_keys(self) -> None:
        """Bring the key file and the replica's keys together: local changes go out, remote ones in."""
        keystore, put = self.keystore, self.rows.put
        if not self.peers():
            return  # standalone: the file is the only copy
        try:
            local = keystore.replicated()
        except KeyStoreError:
            return  # the key store logged it, once for each version of the file; tried again next tick
        live = dict(self.replica.items("apikey"))
        if self.keys_synced is None:  # first look: what the file and the cluster agreed on when last in step
            kept = self.store.get_local("keys_synced")
            self.keys_synced = set(kept) if isinstance(kept, list) else set(local) & set(live)
        before = self.keys_synced
        for rid in set(local) - self.keys_synced:
            put("apikey", rid, local[rid])
        for rid in self.keys_synced - set(local):
            put("apikey", rid, None)
        live = dict(self.replica.items("apikey"))
        adds = {rid: v for rid, v in live.items() if rid not in local and isinstance(v, dict)}
        removes = {rid for rid in local if rid not in live}
        if adds or removes:
            try:
                keystore.apply_replicated(adds, removes)
            except KeyStoreError as exc:
                log.warning("cluster: cannot write the API key file: %s", exc.text)
                return
        # What was reconciled, not the file read again: a key the CLI adds meanwhile is new next time.
        self.keys_synced = (set(local) | set(adds)) - removes
        if self.keys_synced != before:  # kept, so that a key deleted while this node was down stays deleted
            self.store.put_local("keys_synced", sorted(self.keys_synced))

    def apply_all(self) -> None:
        """Apply every kept setting row (at the start)."""
        for key, value in self.replica.items("config"):
            self.apply_config(key, value)

    def config_row(self, update: Update) -> None:
        """A peer's setting row."""
        self.apply_config(update.key, update.value)

    def apply_config(self, key: str, value: Any) -> None:
        """Apply a ``set`` row meant for this node (``*`` or its name)."""
        target, _, setting = key.partition("\0")
        if target not in ("*", self.me) or not isinstance(value, str):
            return
        try:
            if not find_setting(setting).settable:  # set --all checked it; a peer's row is checked again
                raise InvalidKey(f"{setting} cannot be set at run time")
            self.apply_settings({setting: parse_setting(setting, value)})
        except VmqError as exc:
            log.warning("cluster: cannot apply %s = %s: %s", setting, value, exc)

    def set_all(self, target: str, changes: Mapping[str, str]) -> None:
        """Write ``set`` changes for ``target`` (a node name, or ``*`` for every node) and send them."""
        for key, text in changes.items():
            self.rows.put("config", f"{target}\0{key}", text)
        self.rows.announce()


class Cluster:
    """This node's part in a cluster: the links, and the parts that say what they mean for the engine.

    Its parts: ``seam`` (``Peers``, the engine's side, which it drains and feeds), ``rows`` (the
    replica and its flow), ``sessions`` (session and retained rows and the engine), ``membership`` (members, joins, leaves, netsplits), ``moves`` (sessions moving between
    nodes), ``kept`` (frames kept until acknowledged), ``settings`` (shared keys and ``set --all``)
    and ``calls`` (requests between nodes). Of the node it uses its name, config, data_dir, metrics,
    keystore, apply_settings, in_broker and request_stop; CLUSTER_OPS run on it whole.

    Everything but the command entry points (``join``, ``leave``, ``gather``, ``set_all``...)
    runs in the broker's loop thread, which owns the engine, the replica and the links.
    """

    def __init__(self, node: NodeApi, io: MqttIO):
        self.node, self.io, self.engine = node, io, io.engine
        self.me: str = node.name
        config = node.config
        check_cluster_config(config)
        address, self.tls = cluster_listener(config)
        self.explicit = self.tls or "listener.vmq.clustering" in config.values  # the default port may be taken
        self.store = ClusterStore(os.path.join(node.data_dir, CLUSTER_DB))
        self.links: ClusterLinks | None = None
        self._round = 0
        self._timer: asyncio.TimerHandle | None = None
        self._flush_due = False
        self.rows = Replication(self.me, self.store)
        self.seam = Peers(self.engine.ctx, self.engine.life)  # the engine asks it once the cluster starts
        self.kept = KeptFrames(io, self.seam, lambda: node.config["cluster_max_unacknowledged_bytes"],
                               secrets.randbits(62) + 1, self._use)
        self.moves = SessionMoves(self.seam, self.kept, self.me, self.rows.replica, io.loop, self.flush_soon)
        self.copies = Copies(self.me, self.seam, self.kept, io.store, lambda: self.membership.members(),
                             lambda: node.config["queue_replicas"], self.flush_soon)
        self.sessions = SessionRows(self.me, self.seam, self.rows, self.moves, self.copies)
        self._members_seen: tuple[str, ...] = ()  # the members the copies were last placed among
        self.membership = Membership(self.me, address, self.seam, io.loop, self.rows, self.sessions, self.kept,
                                     self.moves, self.after_batch)
        self.settings = SharedSettings(self.me, node.keystore, node.apply_settings, self.rows, self.peers)
        self.calls = ClusterCalls(node, CLUSTER_OPS, io.loop, self.peers, self.in_loop)
        self.rows.appliers.update(session=self.sessions.apply_session, retain=self.sessions.apply_retained,
                                  member=self.membership.member_row, config=self.settings.config_row,
                                  apikey=lambda update: self.settings.sync_keys())
        self.rows.written["session"] = self.sessions.written
        self.frames: dict[int, Callable[[str, bytes], None]] = {  # kind -> what takes it (_on_frame)
            FRAME_FORWARD: self._on_forward, FRAME_KEPT: self.kept.receive, FRAME_KEPT_ACK: self.kept.acknowledged,
            FRAME_META: self._on_meta, FRAME_CALL: self.calls.take, FRAME_REPLY: self.calls.reply,
            FRAME_MIGRATE: lambda peer, body: self.moves.on_migrate(body)}  # as a node before kept frames sent it

    # -- what the node and the commands ask ---------------------------------
    @property
    def bound(self) -> tuple[str, int] | None:
        """The cluster listener's address (None: this node runs standalone)."""
        return self.membership.bound

    @property
    def split(self) -> str:
        """Why the cluster is not whole ('' when it is)."""
        return self.membership.split

    @property
    def stop_after_answer(self) -> bool:
        """Whether the node stops once its answer to a request is sent (cluster leave -k here)."""
        return self.calls.stop_after_answer

    @stop_after_answer.setter
    def stop_after_answer(self, value: bool) -> None:
        self.calls.stop_after_answer = value

    def in_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` in the loop thread (directly when called there) and return its result."""
        return self.node.in_broker(fn, *args)

    def members(self) -> list[str]:
        """Return every member's name, this node's included when it is in a cluster (loop thread)."""
        return self.membership.members()

    def peers(self) -> list[str]:
        """Return the other members (loop thread)."""
        return self.membership.peers()

    def links_up(self) -> int:
        """Return how many peers this node has a link to now (loop thread)."""
        return self.membership.links_up()

    def show_rows(self) -> list[dict]:
        """Return cluster show's rows (any thread); with queue_replicas = 2 each says how many persistent
        sessions of that node are kept on one node only (their second node is missing, or down as this node
        sees it), which the loop thread counts."""
        if self.node.config["queue_replicas"] < 2:
            return self.membership.show_rows()  # no wait for the loop: an API call never queues behind MQTT

        def rows() -> list[dict]:
            shown = self.membership.show_rows()
            counts = self.one_copy()
            for row in shown:
                row["Sessions on one copy"] = counts.get(row["Node"], 0)
            return shown
        return self.in_loop(rows)

    def one_copy(self) -> dict[str, int]:
        """Members -> how many of their persistent sessions are kept on one node only, as this node sees it
        (loop thread): this node's own from its sessions, the others' from their session rows."""
        members = self.members() or [self.me]
        running = {r["Node"] for r in self.membership.show_rows() if r["Running"]}
        counts = {self.me: self.copies.one_copy(lambda peer: peer in running)}
        for key, value in self.rows.replica.items("session"):
            if isinstance(value, dict) and value.get("node") in members and value["node"] != self.me \
                    and not value.get("clean", True):
                copy = copy_node(key, value["node"], members)
                if copy is None or copy not in running:
                    counts[value["node"]] = counts.get(value["node"], 0) + 1
        return counts

    def health_warnings(self) -> list[str]:
        """What /health says without answering 503 (loop thread): sessions kept on one node only."""
        if self.node.config["queue_replicas"] < 2:
            return []
        alone = self.one_copy().get(self.me, 0)
        return [f"{alone} persistent session(s) of this node are kept on this node only: queue_replicas = 2 and "
                "their second node is missing or down"] if alone else []

    def call(self, peer: str, op: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """Ask ``peer`` to run ``op`` (one of CLUSTER_OPS) and return its answer; raise ClusterError."""
        return self.calls.call(peer, op, *args, timeout=timeout)

    def gather(self, op: str, *args: Any) -> list[tuple[str, Any]]:
        """Ask every reachable peer ``op``; return (peer, answer) for those that answered."""
        return self.calls.gather(op, *args)

    def set_all(self, target: str, changes: Mapping[str, str]) -> None:
        """Replicate ``set`` changes to ``target`` (a node name, or ``*`` for every node)."""
        self.in_loop(self.settings.set_all, target, changes)

    def leave_now(self, kill_sessions: bool) -> None:
        """This node leaves (loop thread): with ``kill_sessions`` its sessions move to the others first."""
        self.membership.leave_now(kill_sessions)

    def join(self, discovery: str) -> str:
        """Join the cluster ``discovery`` belongs to; return Done, or raise ClusterError saying why not."""
        name, host, port = parse_discovery_node(discovery)
        if name == self.me:
            raise ClusterError(f"{name} is this node")
        if self.bound is None:
            raise ClusterError("this node has no cluster listener (set listener.vmq.clustering)")
        # Only a peer heard since its link came up: a node removed while it was down still holds the
        # others' rows, and links to them after a restart until it hears of its removal from them.
        membership = self.membership
        if self.in_loop(lambda: name in membership.peers() and membership.in_step(name)):
            raise ClusterError(f"{name} is already a member of this node's cluster")
        remote = self.io.call_async(self.links.probe(host, port), timeout=JOIN_TIMEOUT + 5)
        if remote != name:
            raise ClusterError(f"the node at {host}:{port} is {remote}, not {name}")
        self.in_loop(membership.add, name, f"{host}:{port}")
        deadline = time.monotonic() + JOIN_TIMEOUT
        while time.monotonic() < deadline:
            if self.in_loop(membership.in_step, name):
                return "Done"
            time.sleep(0.05)
        raise ClusterError(f"{name} answered, but the link to it did not come up within {JOIN_TIMEOUT:g} s; "
                           "this node keeps trying")

    def leave(self, name: str, kill_sessions: bool, timeout: float) -> str:
        """Take ``name`` out of the cluster, as VerneMQ's cluster leave (README, "Cluster")."""
        members = self.in_loop(self.members)
        if name not in members:
            raise ClusterError(f"{name} is not a member of this cluster")
        if name == self.me:
            return leave_here(self.node, kill_sessions, timeout)
        if self.in_loop(lambda: self.links.is_up(name)):
            return self.call(name, "leave", kill_sessions, timeout, timeout=timeout + CALL_TIMEOUT)
        self.in_loop(self.membership.remove_down, name)
        return "Done"

    # -- life cycle -------------------------------------------------------
    def start(self) -> None:
        """Bind the cluster listener, apply the kept state, reconnect to the members (from any thread)."""
        config = self.node.config
        server_tls, client_tls = cluster_tls_contexts(config)
        cookie, source = load_cookie(config, self.node.data_dir, os.environ)
        log.info("cluster cookie: %s", source)  # where it is, never what
        self.io.call(self.engine.join_cluster, self.seam)  # first: no forward may meet NO_CLUSTER from now on
        self.io.call(self.kept.load)  # before any link can bring a frame
        self.links = ClusterLinks(self.io.loop, self.me, cookie, self.node.metrics,
                                  buffer_size=config["outgoing_clustering_buffer_size"], on_up=self._on_up,
                                  on_down=self._on_down, on_frame=self._on_frame, server_tls=server_tls,
                                  client_tls=client_tls, handshake_timeout=config["cluster_handshake_timeout"],
                                  max_pending=config["cluster_max_pending_handshakes"])
        self.kept.links = self.rows.links = self.membership.links = self.calls.links = self.links
        try:
            self.membership.bound = self.io.call_async(self.links.listen(*self.membership.address))
        except OSError as exc:
            address = render_value(self.membership.address)
            if self.explicit or exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"cannot start the cluster listener on {address}: "
                                  f"{exc.strerror or exc}") from None
            log.warning("cluster listener %s is in use: this node runs standalone (set listener.vmq.clustering "
                        "to join a cluster)", address)
            self.membership.bound = None
        self.io.call(self._started)

    def _started(self) -> None:
        self.seam.elsewhere = self.sessions.elsewhere
        self.io.batch_hooks.append(self.after_batch)
        if self.node.config["queue_replicas"] > 1:
            self.io.store.watch = self.copies
        self.settings.apply_all()
        self.membership.start()
        self._timer = self.io.loop.call_later(self._interval(), self._tick)

    def stop(self) -> None:
        """Say goodbye to the clients and tell the peers, then close the links and save (the loop still runs)."""
        if self.links is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                self.io.call(self._farewell)  # its after_batch announces the sessions that went offline or ended
                self.io.call(self._stop_timer)  # the frames of the farewell are flushed before this runs
                self.io.call_async(self.links.close(), timeout=5)
        self.calls.shutdown()
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self.in_loop(self.rows.save)
        self.store.close()

    def _farewell(self) -> None:
        if not self.peers():
            return
        # In a cluster a stop ends the connections here and now, as a lost connection does (clean
        # sessions end, wills go out), so the peers hear of it before the links close.
        for client in list(self.engine.clients):
            self.engine.close_client(client, reason=Reason.SERVER_SHUTTING_DOWN)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.calls.fail(None, "the node stops")

    # -- the links --------------------------------------------------------
    def _on_up(self, peer: str) -> None:
        self.rows.hello(peer)
        self.kept.up(peer)
        self.membership.up(peer)

    def _on_down(self, peer: str, reason: str) -> None:
        self.rows.quiet.pop(peer, None)
        self.kept.down(peer)
        if reason != "replaced" and self.node.config["allow_publish_during_netsplit"]:
            self.kept.settle_waits(peer, removed=False)  # publishes go on without it: acknowledged on this side
        self.moves.down(peer)
        if reason == "replaced":  # a fresher link to the same peer comes up at once
            return
        self.calls.fail(peer, f"{peer} is not reachable ({reason})")
        self.membership.down(peer, reason)

    def _on_frame(self, peer: str, kind: int, body: bytes) -> None:
        take = self.frames.get(kind)
        try:
            if take is not None:
                take(peer, body)
        except (ClusterError, ValueError, TypeError) as exc:
            log.warning("cluster: a frame from %s could not be used (%s)", peer, exc)
        self.flush_soon()

    def _on_meta(self, peer: str, body: bytes) -> None:
        if self.rows.merge(peer, body):  # in step with that peer now
            self.membership.maybe_record()

    def _use(self, peer: str, kind: int, body: bytes, force: bool) -> str:
        """Act on a kept frame from ``peer`` (KeptFrames.receive)."""
        if kind == KEPT_COPY:
            self.copies.use(peer, body)
            return "used"
        return self.moves.use(peer, kind, body, force)

    def _on_forward(self, peer: str, body: bytes) -> None:
        mountpoint, msg, plain, groups = decode_forward(body, self.engine.packet_limits.properties)
        check_publishable(msg.topic)
        self.seam.deliver_forwarded(mountpoint, msg, plain, groups, time.time())

    # -- after each batch, and housekeeping ---------------------------------
    def flush_soon(self) -> None:
        """Commit and flush at the next turn of the loop (what a frame or a timer did outside a batch)."""
        if not self._flush_due:
            self._flush_due = True
            self.io.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        self.io.after_batch()

    def after_batch(self) -> None:
        """Send what the engine left for other nodes; announce local changes (MqttIO.after_batch calls this)."""
        copies = self.node.config["queue_replicas"] > 1
        lenient = self.node.config["allow_publish_during_netsplit"]
        waits: dict[tuple[str, str], dict[tuple[str, int], tuple[int, bool]]] = {}  # publisher -> (peer, epoch) ->
        if self.links is not None:
            send, up = self.links.send, self.links.is_up
            for node, mountpoint, msg, plain, groups in self.seam.take_forwards():
                body = encode_forward(mountpoint, msg, plain, groups)
                if msg.qos:  # kept until that node has committed it: committed here before the PUBACK
                    number = self.kept.keep(node, KEPT_FORWARD, body)
                    if copies and number is not None and msg.origin is not None and (up(node) or not lenient):
                        waits.setdefault((mountpoint, msg.origin), {})[node, number[0]] = (number[1], True)
                else:
                    send(node, FRAME_FORWARD, body)
        self.kept.retry()
        self.kept.write_marks()
        for old, mountpoint, client_id in self.seam.take_takeovers():  # the old node hands over on the newer row
            up_peers = [p for p in self.peers() if self.links.is_up(p)]
            if copies and old not in up_peers:  # its home is away: the copy kept here is what it had
                for key, messages in self.copies.take(old, (mountpoint, client_id)).items():
                    self.seam.adopt_messages(*key, messages, time.time(), settle=True)
            self.moves.took_over(old, mountpoint, client_id, up_peers)
        self.sessions.record()
        try:
            if copies:
                self._copy(waits)
        finally:
            self.kept.batch_numbers.clear()
        self.rows.announce()

    def _copy(self, waits: dict[tuple[str, str], dict[tuple[str, int], tuple[int, bool]]]) -> None:
        """Send this batch's copies; hold the acknowledgements of what they copy until the copies are committed."""
        members = tuple(self.members())
        if members != self._members_seen:
            self._members_seen = members
            self.copies.retarget()
        numbers, publishers = self.copies.flush()
        # a copy node that is down is waited for until it is back (or removed), unless publishes go on in a
        # netsplit: a node that cannot reach it refuses its own clients' publishes, not other nodes' forwards
        lenient = self.node.config["allow_publish_during_netsplit"]
        numbers = {peer: n for peer, n in numbers.items() if not lenient or self.kept.is_up(peer)}
        if numbers:  # the frames this batch acknowledges to other nodes were copied: they wait for the copies
            batch = Awaited(len(numbers), self.kept.send_held)
            self.kept.ack_wait = batch
            for peer, number in numbers.items():
                self.kept.wait(peer, number, batch, WAIT_GOES_ON)
                for publisher in publishers.get(peer, ()):  # the copy stream: never the same key as a forward's
                    waits.setdefault(publisher, {})[peer, number[0]] = (number[1], False)
        for publisher, frames in waits.items():
            session = self.seam.sessions.get(publisher)
            link = session.client.link if session is not None and session.client is not None else None
            if not isinstance(link, MqttLink):
                continue
            what = Awaited(len(frames), lambda: None)
            what.done = functools.partial(link.awaited, what)
            link.next_wait = what
            for (peer, epoch), (seq, fatal) in frames.items():
                self.kept.wait(peer, (epoch, seq), what, WAIT_FATAL if fatal else WAIT_GOES_ON)

    def _tick(self) -> None:
        try:
            self._round += 1
            self.membership.maybe_record()
            self.settings.sync_keys()
            if self._round % SYNC_EVERY == 0 and self.links is not None:
                self.rows.digest(self.peers())
            if self._round % max(1, round(3600 / self._interval())) == 0:  # about hourly
                self.rows.purge(time.time() - TOMBSTONE_DAYS * 86400)
            self.rows.announce()
            self.rows.save()
            self.kept.pump_all()
            self._remove_down()
            if self.kept.parked:  # their patience may be over: the next batch offers them again
                self.flush_soon()
            self.moves.handed.expire(time.monotonic())
        except Exception:
            log.exception("cluster housekeeping failed")
        finally:
            self._timer = self.io.loop.call_later(self._interval(), self._tick)

    def _remove_down(self) -> None:
        """Remove the members down longer than cluster_remove_down_after (0: never)."""
        after, now = self.node.config["cluster_remove_down_after"], time.monotonic()
        for peer, since in list(self.membership.down_since.items()) if after else ():
            if now - since >= after and peer in self.peers() and not self.links.is_up(peer):
                log.warning("cluster: %s has been unreachable for %d s (cluster_remove_down_after): it is removed",
                            peer, after)
                self.membership.remove_down(peer)
                self.flush_soon()

    def _interval(self) -> float:
        """Return the seconds between two housekeeping rounds (cluster_sync_interval)."""
        return self.node.config["cluster_sync_interval"] / 1000


def leave_here(node: Node, kill_sessions: bool, timeout: float) -> str:
    """Run cluster leave on the node that leaves (VerneMQ's two cases for a live node)."""
    cluster = node.cluster
    if not kill_sessions:
        for listener in node.mqtt.read(lambda: [x for x in node.mqtt.listeners if x.status == "running"]):
            listener.suspend()
        return LEAVE_HINT
    for listener in list(node.mqtt.listeners):
        listener.suspend(kill_sessions=True)
    cluster.in_loop(cluster.leave_now, True)
    deadline = time.monotonic() + min(timeout, 5)
    while time.monotonic() < deadline and any(r["buffered"] for r in cluster.in_loop(cluster.links.rows)):
        time.sleep(0.05)
    cluster.stop_after_answer = True  # the node stops once its answer is on its way
    return "Done"


def _checked(*pairs: tuple[Any, Any]) -> None:
    """Raise BadRequest unless each (value, type or types) matches: another node's request is checked."""
    for value, kinds in pairs:
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple)
                                                                                    else (kinds,)):
            raise BadRequest(f"a request argument of the wrong type: {type(value).__name__}")


def _op_session_rows(node: NodeApi, client_id: str | None, columns: list, stop: int | None) -> list[dict]:
    _checked((client_id, (str, type(None))), (columns, list), (stop, (int, type(None))))
    if not all(c in SESSION_FIELDS for c in columns):
        raise BadRequest("a session show column that does not exist")
    return node.session_rows(client_id, columns, slice(0, stop), local=True)


def _op_session_records(node: NodeApi, client_id: str | None, subscriptions: bool, messages: bool) -> list[dict]:
    _checked((client_id, (str, type(None))), (subscriptions, bool), (messages, bool))
    return node.session_records(client_id, subscriptions, messages, local=True)


def _op_disconnect(node: NodeApi, client_id: str, mountpoint: str, cleanup: bool) -> bool:
    _checked((client_id, str), (mountpoint, str), (cleanup, bool))
    return node.disconnect_session(client_id, mountpoint, cleanup, local=True)


_BROKER_OPS: dict[str, Callable[..., Any]] = {  # op "broker": the names on the wire, as older nodes send them
    "admin_unsubscribe": lambda node, *args: node.unsubscribe(*args, local=True),
    "reauthorize": lambda node, *args: node.reauthorize(*args, local=True),
    "disconnect_batch": lambda node, *args: node.disconnect_batch(*args)}


def _op_broker(node: NodeApi, method: str, *args: Any) -> Any:
    op = _BROKER_OPS.get(method)
    if op is None:
        raise BadRequest(f"{method} is not asked of other nodes")
    return op(node, *args)


def _op_show(node: NodeApi, keys: list) -> dict:
    _checked((keys, list), *((k, str) for k in keys))
    return _setting_row(node, keys)


def _op_leave(node: NodeApi, kill_sessions: bool, timeout: float) -> str:
    _checked((kill_sessions, bool), (timeout, (int, float)))
    return leave_here(node, kill_sessions, timeout)


CLUSTER_OPS: dict[str, Callable[..., Any]] = {  # what one node may ask another (FRAME_CALL)
    "session_rows": _op_session_rows, "session_records": _op_session_records, "disconnect": _op_disconnect,
    "broker": _op_broker, "show": _op_show, "leave": _op_leave}


def _cluster(call: Call) -> Cluster | None:
    return getattr(call.node, "cluster", None)


@command("cluster", "show", quick=True, read_only=True)
def cmd_cluster_show(call: Call) -> Any:
    """Show the nodes of the cluster and whether they run."""
    cluster = _cluster(call)
    if cluster is None:
        return Table(({"Node": call.node.name, "Running": True},))
    return Table(tuple(cluster.show_rows()))


@command("cluster", "join", keys=(Param("discovery-node", doc="a node of the cluster to join: name@host[:port]"),),
         required=("discovery-node",))
def cmd_cluster_join(call: Call) -> Any:
    """Join the cluster that the discovery node belongs to."""
    cluster = _cluster(call)
    if cluster is None:
        return alert("this node runs no broker, so it cannot join a cluster")
    try:
        return cluster.join(call.args["discovery-node"])
    except ClusterError as exc:
        return alert(f"cannot join {call.args['discovery-node']}: {exc.text}")


@command("cluster", "leave", keys=(Param("node", check_node_name, doc="the node to take out of the cluster"),),
         required=("node",),
         flags=(Param("kill_sessions", short="k", value="none", doc="tear down and migrate sessions"),
                Param("summary-interval", parse_positive_int, short="i", doc="seconds between progress reports"),
                Param("timeout", parse_positive_int, short="t", doc="seconds to wait for the leave")))
def cmd_cluster_leave(call: Call) -> Any:
    """Take a node out of the cluster; a live node without -k stops its MQTT listeners only."""
    cluster = _cluster(call)
    if cluster is None:
        return alert("this node runs no broker, so it is in no cluster")
    try:
        answer = cluster.leave(call.args["node"], "kill_sessions" in call.flags, call.flags.get("timeout") or 60)
        if cluster.stop_after_answer and call.args["node"] == call.node.name:
            call.after.append(call.node.request_stop)
        return answer
    except ClusterError as exc:
        return alert(f"cannot take {call.args['node']} out: {exc.text}")



###############################################################################
# 28. Bridge: vmq_bridge ######################################################
###############################################################################
# Owns: bridges to other brokers (vmq_bridge): an MQTT client per bridge, its
#       store-backed outgoing buffer, loop prevention; bridge commands.
# Must not know: HTTP.

BRIDGE_CONNECT_TIMEOUT = 10  # seconds for the TCP connect, the TLS handshake and CONNACK together
BRIDGE_BACKOFF_FACTOR = 10  # reconnect delays double from restart_timeout up to this many times it
BRIDGE_READ = 65536  # bytes read from the remote at a time
BRIDGE_HIGH_WATER = 1 << 20  # bytes waiting for the remote's socket before the bridge takes no more QoS 0
BRIDGE_MAX_CONNACK = 65536  # bytes of the remote's first packet (its CONNACK, properties included) at most
BRIDGE_COLUMNS = ("name", "endpoint", "buffer size", "buffer max", "buffer dropped msgs", "MQTT process mailbox len",
                  "buffer bytes", "buffer max bytes", "status", "error")  # VerneMQ vmq_bridge_cli's, then ours
BRIDGE_LISTENER = types.SimpleNamespace(  # what the engine reads of a listener, for a bridge's own connection
    mountpoint="", allowed_versions=(4, 5), allow_anonymous_override=True, use_identity_as_username=False)
_NOT_RELAYED = frozenset({"subscription_identifier", "topic_alias"})  # properties of one hop only


@dataclass(frozen=True, slots=True)
class BridgeTopic:
    """One ``topic.<n>`` of a bridge: a pattern shared with the remote, its direction, QoS and prefixes."""

    pattern: str
    direction: str = "out"
    qos: int = 0
    local_prefix: str = ""
    remote_prefix: str = ""

    def __post_init__(self):
        for topic_filter in (self.local_filter, self.remote_filter):
            if not valid_subscription(topic_filter) or topic_filter.startswith(SHARE_PREFIX):
                raise ValueError(f"{topic_filter!r} is not a topic filter")

    @property
    def local_filter(self) -> str:
        return self.local_prefix + self.pattern

    @property
    def remote_filter(self) -> str:
        return self.remote_prefix + self.pattern

    def to_remote(self, topic: str) -> str | None:
        """Return the remote topic of a local message this topic sends out (None: not one of them)."""
        if self.direction == "in" or not topic.startswith(self.local_prefix) \
                or not topic_matches(self.local_filter, topic):
            return None
        return self.remote_prefix + topic[len(self.local_prefix):]

    def to_local(self, topic: str) -> str | None:
        """Return the local topic of a remote message this topic brings in (None: not one of them)."""
        if self.direction == "out" or not topic.startswith(self.remote_prefix) \
                or not topic_matches(self.remote_filter, topic):
            return None
        return self.local_prefix + topic[len(self.remote_prefix):]


@dataclass(frozen=True, slots=True)
class BridgeSpec:
    """A bridge as the config describes it (``vmq_bridge.<tcp|ssl>.<name>...``)."""

    name: str
    tls: bool
    host: str
    port: int
    topics: tuple[BridgeTopic, ...]
    client_id: str
    clean: bool = False
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)  # never in a log line
    restart_timeout: int = 10
    try_private: bool = True
    version: int = 4
    max_buffered: int = 0  # messages waiting for the remote (0: no count bound)
    tls_options: Mapping[str, Any] = field(default_factory=dict)
    max_buffered_bytes: int = BRIDGE_BUFFER_BYTES  # their payload and topic bytes (0: no bound of its own)

    @property
    def local_id(self) -> str:
        """The client id of the bridge's own session in this node."""
        return BRIDGE_CLIENT_PREFIX + self.name

    @property
    def endpoint(self) -> str:
        return render_value((self.host, self.port))

    def local_subscriptions(self) -> dict[str, SubOptions]:
        """The filters (and options) whose messages go to the remote: no echo, retain flag kept, no retained."""
        return {t.local_filter: SubOptions(t.qos, True, True, 2) for t in self.topics if t.direction != "in"}

    def remote_subscriptions(self) -> tuple[tuple[str, int], ...]:
        """The remote filters to subscribe to, with their SUBSCRIBE options byte (MQTT 5: No Local, RAP)."""
        flags = 4 | 8 if self.version == 5 else 0
        return tuple((t.remote_filter, t.qos | flags) for t in self.topics if t.direction != "out")

    def to_remote(self, topic: str) -> str | None:
        return next((r for r in (t.to_remote(topic) for t in self.topics) if r is not None), None)

    def to_local(self, topic: str) -> str | None:
        return next((r for r in (t.to_local(topic) for t in self.topics) if r is not None), None)

    def connect_packet(self) -> Connect:
        """The CONNECT the remote gets; try_private sets the bridge bit of MQTT 3.1/3.1.1 (MQTT 5 has none)."""
        level = self.version | BRIDGE_BIT if self.try_private and self.version != 5 else self.version
        props = (("session_expiry_interval", 0xFFFFFFFF),) if self.version == 5 and not self.clean else ()
        return Connect(self.client_id, level, self.clean, self.keepalive, self.username, self.password,
                       properties=props)


def bridge_specs(config: Config) -> list[BridgeSpec]:
    """Read every bridge of the config; raise ConfigError for one that cannot work."""
    if not config["plugins.vmq_bridge"]:
        return []
    specs = []
    for key in sorted(config.values):
        parts = key.split(".")
        if parts[0] == "vmq_bridge" and len(parts) == 3:
            specs.append(_bridge_spec(config, parts[1], parts[2]))
    return specs


def _bridge_spec(config: Config, kind: str, name: str) -> BridgeSpec:
    prefix = f"vmq_bridge.{kind}.{name}"
    option = lambda o: config[f"{prefix}.{o}"]  # noqa: E731 - a reader of this bridge's keys
    topics = []
    for key in sorted(k for k in config.values if k.startswith(prefix + ".topic.")):
        try:
            topics.append(BridgeTopic(*config[key]))
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    if not topics:
        raise ConfigError(f"{prefix} has no {prefix}.topic.<n> = <pattern> [in|out|both] ...: it would bridge nothing")
    username, password = option("username") or None, option("password")
    if password and username is None:
        raise ConfigError(f"{prefix}.password needs {prefix}.username (MQTT sends no password alone)")
    version = option("mqtt_version")
    client_id = option("client_id")
    if client_id == "auto":
        client_id = f"{config['nodename']}-{name}"[:23 if version == 3 else None]  # MQTT 3.1: at most 23
    host, port = config[prefix]
    tls_options = {o: option(o) for o in BRIDGE_TLS_OPTIONS} if kind == "ssl" else {}
    spec = BridgeSpec(name, kind == "ssl", host, port, tuple(topics), client_id, option("cleansession"),
                      option("keepalive_interval"), username, password.encode() if username else None,
                      option("restart_timeout"), option("try_private"), version,
                      option("max_outgoing_buffered_messages"), tls_options, option("max_outgoing_buffered_bytes"))
    if spec.tls:
        bridge_tls_context(spec)  # a missing or bad file is said now, not at every reconnect
    return spec


def bridge_tls_context(spec: BridgeSpec) -> ssl.SSLContext:
    """Build the client TLS context of a bridge; raise ConfigError for a file that cannot be used."""
    options, ssl = spec.tls_options, tls_module()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = tls_version(min(options["tls_version"]))
    ctx.maximum_version = tls_version(max(options["tls_version"]))
    option, path = ("cafile", options["cafile"]) if options["cafile"] else ("certfile", options["certfile"])
    require_tls_files(options)
    try:
        if options["cafile"]:
            ctx.load_verify_locations(options["cafile"])
        else:
            ctx.load_default_certs()
        option, path = "certfile", options["certfile"]
        if options["certfile"]:
            ctx.load_cert_chain(options["certfile"], options["keyfile"] or None)
    except OSError as exc:  # ssl.SSLError too; bad configuration: exit 2, as README, "The CLI"
        raise FileRefused(f"vmq_bridge.ssl.{spec.name}.{option} {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    if options["insecure"]:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connack_refusal(connack: Connack, v5: bool) -> str:
    """Say why a remote refused the bridge's CONNECT."""
    code = connack.return_code
    if v5:
        text = dict(connack.properties).get("reason_string")
        return f"{REASON_NAMES.get(code, hex(code))} (CONNACK {code:#04x})" + (f": {text}" if text else "")
    name = CONNACK_RETURN_NAMES[code] if code < len(CONNACK_RETURN_NAMES) else "unknown"
    return f"{name} (CONNACK {code})"


class Bridge:
    """One bridge on the broker's loop: an MQTT client of the remote, and a session of this node.

    Its session (``$bridge/<name>``, persistent, subscribed to the out patterns) is the
    outgoing buffer: while the remote is down the session is offline and its messages wait in
    the message store; once the remote is up the bridge attaches a connection to it, and the
    engine's outbox (``drain``) hands it the PUBLISHes to send on. A local QoS 1/2 message is
    acknowledged to the engine only once the remote acknowledged it, so it leaves the store
    only then. The buffer is bounded in bytes (max_outgoing_buffered_bytes) and, when set, in
    messages; at the bound the engine refuses a local QoS 1/2 publish before acknowledging it
    (``relay_full``) and drops only what no publisher here waits for, counted in the store.
    Messages from the remote are routed here marked ``bridged``, which no bridge sends out again.
    """

    def __init__(self, io: MqttIO, spec: BridgeSpec, counters: dict):
        self.io, self.engine, self.spec, self.counters = io, io.engine, spec, counters
        self.labels = (("bridge", spec.name),)
        self.status, self.error = "down", ""
        self.conn: Connection | None = None  # this node's side, while the remote is up
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None
        self.wake = asyncio.Event()
        self.stopping = False
        self.version = spec.version
        self.passthrough = spec.version != 5 and all(t.local_prefix == t.remote_prefix for t in spec.topics)
        self.remote_pids: dict[int, int] = {}  # remote packet id -> the local one, QoS 1/2 on their way out
        self.local_pids: dict[int, int] = {}  # local packet id -> the remote one
        self.incoming: set[int] = set()  # remote QoS 2 packet ids whose PUBREL is awaited
        self.next_pid = 1
        self.pinger: asyncio.TimerHandle | None = None
        self.pending = b""  # what came with CONNACK
        self.outbox: list[bytes] = []  # encoded packets for the remote, written once per batch
        self.dropped_seen = 0  # the session's drops already counted in bridge_messages_dropped

    # -- this node's side ---------------------------------------------------
    def session(self) -> Session:
        """Return the bridge's session, made (or brought up to date with the config) first."""
        engine, spec = self.engine, self.spec
        session = engine.sessions.get(("", spec.local_id))
        if session is None:
            session = engine.add_session("", spec.local_id, None)
            engine.store.put_session("", spec.local_id, None)
        session.relay, session.limit, session.max_bytes = True, spec.max_buffered or -1, spec.max_buffered_bytes or -1
        engine.relays[session.key] = session  # a local QoS 1/2 publish is refused, not dropped, when it is full
        wanted = spec.local_subscriptions()
        for topic_filter in [f for f in session.subs if f not in wanted]:
            engine.unsubscribe(session, topic_filter)
        for topic_filter, opts in wanted.items():
            if session.subs.get(topic_filter) != opts:
                engine.subscribe(session, topic_filter, opts)
        return session

    def attach(self) -> None:
        """Connect the bridge's session: what waits in it (in flight first, DUP) comes to ``drain``."""
        engine = self.engine
        engine.now = time.time()
        self.session()
        conn = engine.connection_made(self, BRIDGE_LISTENER, (self.spec.host, self.spec.port), None, engine.now)
        level = 5 if self.version == 5 else 4  # the remote's form: QoS 0 frames can go on as they are
        conn.speak(level)
        conn.bridge = True  # the retain flag as published, in MQTT 3.1.1 too
        conn.expiry_at_connect = 0xFFFFFFFF
        self.conn = conn
        engine.accept(conn, Connect(self.spec.local_id, level, clean_session=False), self.spec.local_id)

    def reattach(self) -> None:
        """Attach again after the engine closed the bridge's connection, while the remote is still up."""
        if self.conn is None and self.writer is not None and not self.stopping:
            self.attach()
            self.io.after_batch()

    def detach(self) -> None:
        """Take the bridge's session offline: from now on its messages wait in the store."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.out.clear()
            self.engine.connection_lost(conn, time.time())

    def drain(self) -> None:
        """Send on what the engine left in the outbox of the bridge's connection (called after each commit)."""
        conn = self.conn
        if conn is None:
            return
        data = b"".join(conn.out)
        conn.out.clear()
        conn.out_bytes = 0
        pos, deferred, passthrough = 0, [], self.passthrough and self.writer is not None
        while pos < len(data):
            if passthrough and data[pos] in (0x30, 0x31):  # QoS 0 under the same topic there: the frame as it is
                length, start = fixed_header(data, pos)
                self.outbox.append(data[pos:start + length])
                self.counters["bridge_messages_out", self.labels] += 1
                self.counters["bridge_bytes_out", self.labels] += length - 2  # the topic's length field
                pos = start + length
                continue
            packet, pos = decode_packet(data, pos, 0, conn.proto)
            if isinstance(packet, Publish):
                self.send_out(packet, deferred)
            elif isinstance(packet, Pubrel):
                remote = self.local_pids.get(packet.packet_id)
                if remote is None or self.writer is None:
                    deferred.append(Pubcomp(packet.packet_id))  # its remote exchange ended with the old connection
                else:
                    self.write(Pubrel(remote))
        if conn.closing:  # the engine closed it (session disconnect, shutdown): attach again while up
            self.detach()
            if self.writer is not None and not self.stopping:
                self.io.loop.call_soon(self.reattach)
        elif deferred:
            self.io.loop.call_soon(self.local_acks, conn, deferred)
        self.flush()
        self.watch_buffer(conn)

    def send_out(self, p: Publish, deferred: list) -> None:
        """Send one local message to the remote under its remote topic and a packet id of the remote's."""
        topic = self.spec.to_remote(p.topic)
        if topic is None or self.writer is None:
            if p.qos and topic is None:
                deferred.append(Puback(p.packet_id) if p.qos == 1 else Pubrec(p.packet_id))  # not ours: done
            return  # QoS 1/2 stay in flight in the session and go again after the reconnect
        pid = None
        if p.qos:
            pid = self.take_pid()
            self.remote_pids[pid], self.local_pids[p.packet_id] = p.packet_id, pid
        props = tuple(x for x in p.properties if x[0] not in _NOT_RELAYED) if self.version == 5 else ()
        self.write(Publish(topic, p.payload, p.qos, p.retain, False, pid, props))
        self.counters["bridge_messages_out", self.labels] += 1
        self.counters["bridge_bytes_out", self.labels] += len(p.payload) + len(topic)

    def local_acks(self, conn: Connection, packets: list) -> None:
        """Hand the engine acknowledgements for the bridge's session (after the batch that asked for them)."""
        if conn is self.conn:
            now = time.time()
            for packet in packets:
                self.engine.handle(conn, packet, now)
            self.io.after_batch()

    def watch_buffer(self, conn: Connection) -> None:
        """Take no more QoS 0 for a remote that reads slower than the node publishes; go on once it caught up."""
        writer = self.writer
        if writer is not None and conn.writable and writer.transport.get_write_buffer_size() > BRIDGE_HIGH_WATER:
            conn.writable = False
            self.io.loop.create_task(self.writable_again(conn, writer))

    async def writable_again(self, conn: Connection, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        conn.writable = True
        if conn is self.conn:
            self.engine.writable_again(conn, time.time())
            self.io.after_batch()

    # -- the remote's side --------------------------------------------------
    def take_pid(self) -> int:
        pid = self.next_pid
        while pid in self.remote_pids:
            pid = pid % MAX_PACKET_ID + 1
        self.next_pid = pid % MAX_PACKET_ID + 1
        return pid

    def write(self, packet: Any) -> None:
        """Queue a packet for the remote; ``flush`` writes what is queued in one go."""
        self.outbox.append(encode_packet(packet, self.version))

    def flush(self) -> None:
        if self.outbox and self.writer is not None:
            self.writer.write(b"".join(self.outbox))
        self.outbox.clear()

    async def run(self) -> None:
        """Connect, serve, and after any failure connect again, waiting longer after each one in a row."""
        failures = 0
        while not self.stopping:
            try:
                reader = await self.connect()
                failures = 0
                await self.serve(reader)
                reason = "reconnecting (bridge start)" if self.wake.is_set() else "the remote closed the connection"
            except asyncio.TimeoutError:
                reason = "the remote did not answer in time"
            except (OSError, EOFError) as exc:
                reason = f"cannot reach {self.spec.endpoint}: {getattr(exc, 'strerror', None) or exc}"
            except VmqError as exc:  # a refusal, or a packet that breaks the protocol
                reason = exc.text
            except Exception:  # a bug: it costs this connection, never the node or the bridge
                log.exception("bridge %s: internal error", self.spec.name)
                reason = "internal error (see the log)"
            self.down(reason)
            if self.stopping:
                break
            delay = min(self.spec.restart_timeout * 2 ** failures, self.spec.restart_timeout * BRIDGE_BACKOFF_FACTOR)
            failures += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)
            self.wake.clear()

    async def connect(self) -> asyncio.StreamReader:
        """Open the connection, CONNECT and wait for CONNACK; subscribe; attach the session."""
        spec = self.spec
        ctx = bridge_tls_context(spec) if spec.tls else None
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            spec.host, spec.port, ssl=ctx, server_hostname=spec.host if ctx else None), BRIDGE_CONNECT_TIMEOUT)
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.writer = writer
        self.write(spec.connect_packet())
        self.flush()
        connack, rest = await asyncio.wait_for(self.read_connack(reader), BRIDGE_CONNECT_TIMEOUT)
        if connack.return_code:
            raise VmqError(f"{spec.endpoint} refused the connection: {connack_refusal(connack, spec.version == 5)}")
        self.remote_pids.clear()
        self.local_pids.clear()
        if not connack.session_present:
            self.incoming.clear()
        topics = spec.remote_subscriptions()
        if topics:
            self.write(Subscribe(self.take_pid(), topics))
            self.flush()
        self.status, self.error = "up", ""  # the last error was the outage's: it is over
        log.info("bridge %s is up: connected to %s as %r", spec.name, spec.endpoint, spec.client_id)
        self.arm_ping()
        self.attach()
        self.io.after_batch()
        self.pending = rest
        return reader

    async def read_connack(self, reader: asyncio.StreamReader) -> tuple[Connack, bytes]:
        buf = b""
        while True:
            result = decode_packet(buf, 0, BRIDGE_MAX_CONNACK, self.version)
            if result is not None:
                packet, pos = result
                if not isinstance(packet, Connack):
                    raise ProtocolError(f"the remote sent {type(packet).__name__.upper()} before CONNACK")
                return packet, buf[pos:]
            data = await reader.read(BRIDGE_READ)
            if not data:
                raise EOFError("the remote closed the connection before CONNACK")
            buf += data

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Read the remote's packets until the connection ends; acknowledge them once the store has committed."""
        buf, self.pending = self.pending, b""
        silence = 1.5 * self.spec.keepalive if self.spec.keepalive else None  # MQTT 3.1.1 3.1.2.10
        while True:
            config = self.io.settings()  # a remote's packet is bounded as a client's unfinished one is
            pos, acks, limit = 0, [], config["max_message_size"] or config["partial_packet_budget"]
            while (result := decode_packet(buf, pos, limit, self.version)) is not None:
                packet, pos = result
                self.from_remote(packet, acks)
            buf = buf[pos:]
            self.io.after_batch()
            if acks:
                if self.io.store.error is not None:
                    raise VmqError(f"not acknowledging the remote's messages: {STORE_DOWN}")
                for ack in acks:
                    self.write(ack)
                self.flush()
            data = await asyncio.wait_for(reader.read(BRIDGE_READ), silence)
            if not data:
                return
            buf = await self.read_whole(reader, buf + data, limit, silence)

    async def read_whole(self, reader: asyncio.StreamReader, buf: bytes, limit: int, silence: float | None) -> bytes:
        """Return ``buf`` with the rest of the packet it begins, read in pieces and joined once (not copied per
        read); a packet declared larger than ``limit`` is refused before it is read."""
        header = fixed_header(buf)
        if header is None or sum(header) <= len(buf):
            return buf
        if header[0] > limit:
            raise PacketTooLarge(f"the remote sends a packet of {header[0]} bytes, more than {limit} "
                                 "(max_message_size, else partial_packet_budget)")
        parts, have = [buf], len(buf)
        while have < sum(header):
            data = await asyncio.wait_for(reader.read(min(sum(header) - have, 1 << 20)), silence)
            if not data:
                raise EOFError("the remote closed the connection inside a packet")
            parts.append(data)
            have += len(data)
        return b"".join(parts)

    def from_remote(self, packet: Any, acks: list) -> None:
        """Act on one packet from the remote; acknowledgements it needs go to ``acks``."""
        conn, now = self.conn, time.time()
        kind = type(packet)
        if kind is Publish:
            self.bring_in(packet, acks)
        elif kind is Pubrel:
            self.incoming.discard(packet.packet_id)
            acks.append(Pubcomp(packet.packet_id))
        elif kind in (Puback, Pubrec, Pubcomp):
            local = self.remote_pids.get(packet.packet_id)
            if local is None or conn is None:
                return
            failed = getattr(packet, "reason_code", 0) >= REASON_FAILURE
            if kind is not Pubrec or failed:
                del self.remote_pids[packet.packet_id]
                self.local_pids.pop(local, None)
            self.engine.handle(conn, kind(local, packet.reason_code) if failed else kind(local), now)
        elif kind is Suback:
            refused = [c for c in packet.return_codes if c >= REASON_FAILURE]
            if refused:
                self.error = f"the remote refused {len(refused)} of the bridge's subscriptions"
                log.warning("bridge %s: %s", self.spec.name, self.error)
        elif kind is Disconnect:
            text = dict(packet.properties).get("reason_string", "")
            raise VmqError(f"the remote disconnected: {REASON_NAMES.get(packet.reason_code, 'normal')}"
                                + (f" ({text})" if text else ""))

    def bring_in(self, p: Publish, acks: list) -> None:
        """Route a remote message here under its local topic, marked as bridged; acknowledge it after the commit."""
        if p.qos == 2 and p.packet_id in self.incoming:
            acks.append(Pubrec(p.packet_id))  # sent again: routed once
            return
        topic = self.spec.to_local(p.topic)
        if topic is not None and valid_topic_name(topic):
            engine = self.engine
            engine.now = time.time()
            props = dict(p.properties)
            expiry = props.get("message_expiry_interval")
            msg = Message(topic, p.payload, p.qos, p.retain, engine.new_ref(),
                          props=forwarded_properties(p.properties),
                          expires=engine.now + expiry if expiry is not None else None,
                          origin=self.spec.local_id, bridged=True)
            if not msg.retain or engine.retain("", msg) is not False:
                engine.route("", msg)
            self.counters["bridge_messages_in", self.labels] += 1
            self.counters["bridge_bytes_in", self.labels] += len(p.payload) + len(topic)
        if p.qos == 1:
            acks.append(Puback(p.packet_id))
        elif p.qos == 2:
            self.incoming.add(p.packet_id)
            acks.append(Pubrec(p.packet_id))

    def arm_ping(self) -> None:
        """Send PINGREQ every keep-alive interval while connected [MQTT-3.1.2-23]."""
        if self.spec.keepalive and self.writer is not None and not self.writer.is_closing():
            if self.pinger is not None:
                self.write(Pingreq())
                self.flush()
            self.pinger = self.io.loop.call_later(self.spec.keepalive, self.arm_ping)

    def down(self, reason: str) -> None:
        """The remote is gone (or never came): keep its messages in the store, say why once."""
        if self.pinger is not None:
            self.pinger.cancel()
            self.pinger = None
        if self.writer is not None:
            self.writer.transport.abort()
            self.writer = None
        self.outbox.clear()
        self.detach()
        self.io.after_batch()
        if (self.status, self.error) != ("down", reason) and not self.stopping:
            log.warning("bridge %s is down: %s", self.spec.name, reason)
        self.status, self.error = "down", reason

    def row(self) -> dict:
        """Return this bridge's row of bridge show."""
        session = self.engine.sessions.get(("", self.spec.local_id))
        waiting = _queued(session) + len(session.inflight) + session.parked if session is not None else 0
        return {"name": self.spec.name, "endpoint": self.spec.endpoint, "buffer size": waiting,
                "buffer max": self.spec.max_buffered, "buffer dropped msgs": session.dropped if session else 0,
                "MQTT process mailbox len": len(self.remote_pids),
                "buffer bytes": session.queue_bytes if session is not None else 0,
                "buffer max bytes": self.spec.max_buffered_bytes, "status": self.status, "error": self.error}


class Bridges:
    """Every bridge of the node (vmq_bridge), run on the broker's loop."""

    def __init__(self, io: MqttIO, config: Config):
        self.io = io
        self.enabled = config["plugins.vmq_bridge"]
        self.specs = bridge_specs(config)
        self._counters: dict[tuple, int] = collections.defaultdict(int)
        self.bridges: list[Bridge] = []

    def start(self) -> None:
        """Make each bridge's session (dropping those of bridges no longer configured) and start connecting."""
        self.io.call(self._start)

    def _start(self) -> None:
        engine = self.io.engine
        if self.enabled:
            names = {spec.local_id for spec in self.specs}
            for (mountpoint, client_id), session in list(engine.sessions.items()):
                if mountpoint == "" and client_id.startswith(BRIDGE_CLIENT_PREFIX) and client_id not in names:
                    log.warning("dropping the session of bridge %s (no longer configured) and its %d messages",
                                client_id[len(BRIDGE_CLIENT_PREFIX):], _queued(session) + len(session.inflight))
                    engine.drop_session(session)
        for spec in self.specs:
            bridge = Bridge(self.io, spec, self._counters)
            session = bridge.session()
            session.dropped = max(session.dropped, engine.store.load_dropped("", spec.local_id))  # of earlier runs
            bridge.task = self.io.loop.create_task(bridge.run())
            self.bridges.append(bridge)

    def stop(self) -> None:
        """Close every bridge; what waits for the remotes stays in the store."""
        if self.bridges:
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                self.io.call_async(self._stop(), timeout=10)

    async def _stop(self) -> None:
        for bridge in self.bridges:
            bridge.stopping = True
            bridge.task.cancel()
        await asyncio.gather(*(b.task for b in self.bridges), return_exceptions=True)
        for bridge in self.bridges:
            bridge.down("the node stops")
        self.bridges = []

    def restart(self) -> None:
        """Reconnect every bridge now (bridge start): a connected one is closed first; waits are cut short."""
        for bridge in self.bridges:
            if bridge.writer is not None:
                bridge.writer.transport.abort()  # its run sees the end and reconnects at once
            bridge.wake.set()

    def rows(self) -> list[dict]:
        return [bridge.row() for bridge in self.bridges]

    def counters(self) -> dict[tuple, int]:
        """The bridges' counters for the metrics registry; drops are the sessions' own counts since the last read."""
        for bridge in self.bridges:
            session = self.io.engine.sessions.get(("", bridge.spec.local_id))
            dropped = session.dropped if session is not None else 0
            if dropped > bridge.dropped_seen:
                self._counters["bridge_messages_dropped", bridge.labels] += dropped - bridge.dropped_seen
            bridge.dropped_seen = dropped
        return self._counters


BRIDGE_OFF = "vmq_bridge is not enabled (plugins.vmq_bridge = on)"


def _bridges(call: Call) -> Bridges | None:
    bridges = getattr(call.node, "bridges", None)
    return bridges if bridges is not None and bridges.enabled else None


@command("bridge", "show", quick=True, read_only=True)
def cmd_bridge_show(call: Call) -> Any:
    """Show each bridge: its remote, its buffer (messages waiting, the most, dropped; bytes waiting, the most),
    status and last error."""
    bridges = _bridges(call)
    if bridges is None:
        return alert(BRIDGE_OFF)
    return Table(tuple(call.node.in_broker(bridges.rows)), BRIDGE_COLUMNS)


@command("bridge", "start")
def cmd_bridge_start(call: Call) -> Any:
    """Reconnect every bridge now."""
    bridges = _bridges(call)
    if bridges is None:
        return alert(BRIDGE_OFF)
    call.node.in_broker(bridges.restart)
    return alert("VerneMQ Bridges restarted.")  # VerneMQ vmq_bridge_cli answers with an alert



###############################################################################
# 29. Webhooks: bodies, answers, the cache and the client #####################
###############################################################################
# Owns: webhooks (vmq_webhooks) as values: endpoints per hook, VerneMQ's JSON
#       bodies and answers, the auth answer cache, the keep-alive HTTP client.
# Must not know: the engine, sockets of MQTT clients.

WEBHOOK_HOOKS = (  # VerneMQ vmq_webhooks_cli hook_keyspec: what webhooks register accepts
    "auth_on_register", "auth_on_publish", "auth_on_subscribe", "on_register", "on_publish", "on_subscribe",
    "on_unsubscribe", "on_deliver", "on_offline_message", "on_client_wakeup", "on_client_offline",
    "on_client_gone", "on_session_expired", "auth_on_register_m5", "auth_on_publish_m5", "auth_on_subscribe_m5",
    "on_register_m5", "on_publish_m5", "on_subscribe_m5", "on_unsubscribe_m5", "on_deliver_m5", "on_auth_m5",
)
WEBHOOK_AUTH = frozenset({"auth_on_register", "auth_on_publish", "auth_on_subscribe"})  # answered; may be cached
WEBHOOK_NEVER_CALLED = {"on_session_expired": "vmqapi calls no hook when a session expires",  # registered, but
                        "on_auth_m5": "enhanced authentication (MQTT 5 AUTH) does not go to webhooks"}  # never called
WEBHOOK_TIMEOUT = 5000  # ms; VerneMQ vmq_webhooks_cli get_opts: response_timeout default
WEBHOOK_NOTIFY_QUEUE = 10_000  # notifications waiting for the pool; past it new ones are dropped and counted
WEBHOOK_CACHE_MAX = 100_000  # cached auth answers (VerneMQ keeps them forever); past it the oldest go first
WEBHOOK_MAX_ANSWER = 1 << 20  # bytes of an endpoint's answer read at most; more is an error
WEBHOOK_LOG_INTERVAL = 60  # seconds between log lines about one kind of failing webhook call
RETAIN_HANDLING_NAMES = ("send_retain", "send_if_new_sub", "dont_send")  # VerneMQ's names for MQTT 5 RH 0-2
WEBHOOK_ARGS = {hook: tuple(names.split()) for hook, names in (  # the engine's hook arguments by VerneMQ's names;
    ("auth_on_register", "peer sid username password clean_session"),  # peer and sid give two fields each
    ("auth_on_publish", "username sid qos topic payload retain"), ("auth_on_subscribe", "username sid topics"),
    ("on_register", "peer sid username"), ("on_publish", "username sid qos topic payload retain"),
    ("on_subscribe", "username sid topics"), ("on_unsubscribe", "username sid topics"),
    ("on_deliver", "username sid topic payload"), ("on_offline_message", "sid qos topic payload retain"),
    ("on_client_wakeup", "sid"), ("on_client_offline", "sid"), ("on_client_gone", "sid"), ("on_session_expired", "sid"))}


@dataclass(frozen=True, slots=True)
class Webhook:
    """One registered endpoint of one hook, with its options (VerneMQ's register flags)."""

    hook: str
    endpoint: str
    base64: bool = True
    no_payload: bool = False
    response_timeout: int = WEBHOOK_TIMEOUT  # ms

    def __post_init__(self):
        parse_webhook_hook(self.hook)
        parse_webhook_endpoint(self.endpoint)


def parse_webhook_endpoint(text: str) -> str:
    """Accept an http:// or https:// URL with a host (as VerneMQ's hackney_url parses it)."""
    url = urllib.parse.urlsplit(text.strip())
    try:
        url.port  # a bad port raises ValueError
    except ValueError:
        raise ValueError(f"bad port in endpoint {text!r}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return text.strip()


def parse_webhook_hook(text: str) -> str:
    """Accept one of VerneMQ's webhook hook names."""
    if text not in WEBHOOK_HOOKS:
        raise ValueError(f"unknown hook {text!r}; hooks: {', '.join(WEBHOOK_HOOKS)}")
    return text


# -- bodies and answers (pure) ----------------------------------------------

def webhook_args(hook: str, values: Sequence[Any], properties: Any = None) -> dict[str, Any]:
    """Name the engine's hook arguments as VerneMQ's webhook body does; ``_m5`` hooks add properties."""
    m5, args = hook.endswith("_m5"), {}
    for name, value in zip(WEBHOOK_ARGS[hook[:-3] if m5 else hook], values):
        if name == "peer":
            args["peer_addr"], args["peer_port"] = (value[0], value[1]) if value else (None, None)
        elif name == "sid":
            args["mountpoint"], args["client_id"] = value
        else:
            args["clean_start" if m5 and name == "clean_session" else name] = value
    if m5:
        args["properties"] = properties or ()
    return args


def _webhook_topics(hook: str, topics: Iterable[Any]) -> list:
    if hook.startswith("on_unsubscribe"):
        return list(topics)
    return [{"topic": t[0], "qos": t[1], **(t[2] if len(t) > 2 else {})} for t in topics]  # t[2]: MQTT 5 options


def _json_bytes(value: bytes, encode: bool) -> str:
    return base64.b64encode(value).decode() if encode else value.decode("utf-8", "replace")


def webhook_properties(properties: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Encode MQTT 5 properties as VerneMQ's webhooks do (``p_`` names, user properties as key/val, base64)."""
    out: dict[str, Any] = {}
    for name, value in properties:
        key = "p_" + name
        if name == "user_property":
            out.setdefault(key, []).append({"key": _json_bytes(value[0].encode(), True),
                                            "val": _json_bytes(value[1].encode(), True)})
        elif name == "payload_format_indicator":
            out[key] = "utf8" if value else "unspecified"
        elif isinstance(value, bytes):
            out[key] = _json_bytes(value, True)
        else:
            out[key] = value
    return out


def webhook_body(hook: str, args: Mapping[str, Any], webhook: Webhook) -> bytes:
    """Return the JSON body VerneMQ posts for ``hook``: payloads base64 unless base64encode is off."""
    body: dict[str, Any] = {}
    for name, value in args.items():
        if name == "payload":
            if webhook.no_payload and hook.startswith("auth_on_publish"):
                continue  # VerneMQ filter_args: no_payload applies to auth_on_publish only
            value = _json_bytes(value, webhook.base64)
        elif name == "password" and value is not None:
            value = value.decode("utf-8", "replace")
        elif name == "topics":
            value = _webhook_topics(hook, value)
        elif name == "properties":
            value = webhook_properties(value)
        body[name] = value
    return json.dumps(body, separators=(",", ":")).encode()


def parse_max_age(cache_control: str | None) -> int | None:
    """Return the ``max-age`` seconds of a cache-control header (VerneMQ parse_max_age), or None."""
    match = re.search(r"max-age=([0-9]+)", cache_control or "")
    return int(match.group(1)) if match else None


def _typed_modifiers(mods: Mapping[str, Any], fields: Iterable[tuple[str, type]]) -> dict[str, Any]:
    changes = {}
    for name, kind in fields:
        if name in mods and type(mods[name]) is not kind:
            raise WebhookFailed(f"modifier {name} must be a {kind.__name__}")
        changes.update({name: mods[name]} if name in mods else {})
    return changes


def _publish_modifiers(mods: Mapping[str, Any], base64_payload: bool) -> dict[str, Any]:
    changes = _typed_modifiers(mods, (("topic", str), ("qos", int), ("retain", bool), ("payload", str)))
    if "payload" in changes:
        try:
            changes["payload"] = base64.b64decode(mods["payload"], validate=True) if base64_payload \
                else mods["payload"].encode()
        except binascii.Error:
            raise WebhookFailed("modifier payload is not base64") from None
    if "topic" in changes and not valid_topic_name(changes["topic"]):
        raise WebhookFailed(f"modifier topic {changes['topic']!r} is not a valid topic")
    return changes


def _subscribe_modifiers(topics: Any) -> list[tuple[str, int]] | str:
    if not isinstance(topics, list):
        raise WebhookFailed("topics must be a list")
    if not topics:
        return "ok"
    out = []
    for item in topics:
        if not isinstance(item, dict) or not isinstance(item.get("topic"), str) or type(item.get("qos")) is not int:
            raise WebhookFailed("each topic must be {\"topic\": string, \"qos\": integer}")
        out.append((item["topic"], item["qos"]))  # qos 128: that one topic is refused
    return out


def _register_modifiers(mods: Mapping[str, Any]) -> dict[str, Any]:
    changes = _typed_modifiers(mods, (("client_id", str), ("mountpoint", str), ("clean_session", bool),
                                      ("clean_start", bool)))
    if "clean_start" in changes:  # MQTT 5's name
        changes["clean_session"] = changes.pop("clean_start")
    return changes


def parse_webhook_answer(hook: str, status: int, headers: Mapping[str, str], data: bytes,
                         base64_payload: bool = True) -> tuple[Any, int | None]:
    """Read an endpoint's answer: (``ok``, ``next``, ``error``, a dict of changes or a list of (topic, qos), and
    the max-age seconds to cache it or None). Only a 200 with a JSON body counts; else WebhookFailed."""
    if status != 200:
        raise WebhookFailed(f"invalid_response_code {status}")
    try:
        decoded = json.loads(data)
    except (ValueError, RecursionError):
        raise WebhookFailed("received_payload_not_json") from None
    base = hook.removesuffix("_m5")
    result = decoded.get("result") if isinstance(decoded, dict) else None
    if base not in WEBHOOK_AUTH:
        return "next", None  # a notification's answer is not used
    if result == "next":
        return "next", None
    if isinstance(result, dict):
        log.info("webhook %s refused: %s", hook, str(result.get("error", "unknown_error"))[:200])
        return "error", None
    if result != "ok":
        raise WebhookFailed("the answer has no result ok, next or {\"error\": ...}")
    mods = decoded.get("modifiers") or {}
    if not isinstance(mods, dict):
        raise WebhookFailed("modifiers must be an object")
    if base == "auth_on_subscribe":
        answer: Any = _subscribe_modifiers(decoded.get("topics", mods.get("topics", [])))
    elif base == "auth_on_publish":
        answer = _publish_modifiers(mods, base64_payload) or "ok"
    else:
        answer = _register_modifiers(mods) or "ok"
    return answer, parse_max_age(headers.get("cache-control"))


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


_UNKEYED = frozenset({"payload", "peer_port"})  # VerneMQ vmq_webhooks_cache: not part of the key
_SCALARS = frozenset({str, int, bool, bytes, type(None)})


def webhook_cache_key(endpoint: str, hook: str, args: Mapping[str, Any]) -> tuple:
    """Key an auth answer by what VerneMQ keys it by: every argument but the payload and the peer's port."""
    return endpoint, hook, tuple([v if v.__class__ in _SCALARS else _frozen(v)
                                  for k, v in args.items() if k not in _UNKEYED])


class WebhookCache:
    """Auth answers by call, until their max-age passes; hits, misses and entries per endpoint and hook."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._lock = threading.Lock()
        self._clock = clock
        self._entries: dict[tuple, tuple[float, Any]] = {}  # key -> (expires at, answer)
        self._stats: dict[tuple[str, str, str], int] = {}  # (stat, endpoint, hook) -> n
        self._loop_hits: dict[tuple, int] = {}  # (endpoint, hook) -> hits counted by the broker's loop, lock-free

    def _count(self, stat: str, key: tuple, n: int = 1) -> None:
        name = (stat, key[0], key[1])
        self._stats[name] = self._stats.get(name, 0) + n

    def lookup(self, key: tuple) -> Any:
        """Return the cached answer (None: a miss); both are counted."""
        entry = self._entries.get(key)  # one dict read is atomic; a change is made under _lock
        with self._lock:
            if entry is not None and entry[0] < self._clock():
                if self._entries.pop(key, None) is not None:
                    self._count("entries", key, -1)
                entry = None
            stat = ("misses" if entry is None else "hits", key[0], key[1])
            self._stats[stat] = self._stats.get(stat, 0) + 1
        return None if entry is None else entry[1]

    def lookup_in_loop(self, key: tuple, now: float) -> Any:
        """``lookup`` for the broker's loop: a hit takes no lock (only this thread counts _loop_hits)."""
        entry = self._entries.get(key)
        if entry is None or entry[0] < now:
            return self.lookup(key)
        hits, where = self._loop_hits, key[:2]
        hits[where] = hits.get(where, 0) + 1
        return entry[1]

    def insert(self, key: tuple, max_age: int, answer: Any) -> None:
        """Keep an ok answer (without a payload change, as VerneMQ) for ``max_age`` seconds."""
        if isinstance(answer, dict):
            answer = {k: v for k, v in answer.items() if k != "payload"} or "ok"
        with self._lock:
            now, entries = self._clock(), self._entries
            if key not in entries:
                if len(entries) >= WEBHOOK_CACHE_MAX:  # full: the expired go, or else the oldest
                    for gone in [k for k, (at, _) in entries.items() if at < now] or [next(iter(entries))]:
                        del entries[gone]
                        self._count("entries", gone, -1)
                self._count("entries", key)
            entries[key] = (now + max_age, answer)

    def rows(self) -> list[dict]:
        """Return webhooks cache show's rows: stat, endpoint, hook, value."""
        with self._lock:
            merged = dict(self._stats)
        for (endpoint, hook), n in dict(self._loop_hits).items():  # copied in one step: the loop may add keys
            merged["hits", endpoint, hook] = merged.get(("hits", endpoint, hook), 0) + n
        stats = sorted(merged.items(), key=lambda item: (item[0][1], item[0][2], item[0][0]))
        return [{"stat": s, "endpoint": e, "hook": h, "value": n} for (s, e, h), n in stats]

    def reset_stats(self) -> None:
        """Zero hits and misses (entries keep counting what is cached)."""
        with self._lock:
            self._stats = {k: v for k, v in self._stats.items() if k[0] == "entries" and v}
            self._loop_hits = {}  # a hit the loop counts meanwhile may be lost: it is only a statistic

    def clear(self) -> None:
        """Forget every cached answer and every statistic (VerneMQ purge_all)."""
        with self._lock:
            self._entries.clear()
            self._stats.clear()
            self._loop_hits = {}


def _cut_connection(conn: Any) -> None:
    """End a webhook call whose response_timeout passed (its thread is blocked in a read)."""
    conn.cut_off = True
    with contextlib.suppress(OSError, AttributeError):
        conn.sock.shutdown(socket.SHUT_RDWR)


class CallDeadlines:
    """One thread that cuts the webhook calls whose response_timeout passed (a timer thread each costs more
    than the call); it starts with the first call and ends after a second with none."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list[list] = []  # [deadline, sequence, connection or None once done]
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, conn: Any, seconds: float) -> list:
        """Cut ``conn`` after ``seconds`` unless ``done`` is called first; return the entry for done."""
        entry = [time.monotonic() + seconds, next(self._seq), conn]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vmqapi-webhook-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        return entry

    @staticmethod
    def done(entry: list) -> None:
        """The call ended in time: forget it (the entry is dropped when its time comes)."""
        entry[2] = None

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._closed:
                    self._thread = None
                    return
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    if not self._cond.wait(1.0) and not self._heap:
                        self._thread = None
                        return
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                conn = heapq.heappop(self._heap)[2]
                if conn is not None:
                    _cut_connection(conn)

    def stop(self) -> None:
        """Forget every call and end the thread (the calls themselves have ended)."""
        with self._cond:
            self._heap.clear()
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(5)



class TlsConnection(http.client.HTTPConnection):
    """An HTTPS connection: http.client's, its socket wrapped in ``context`` once connected.

    http.client.HTTPSConnection does the same, but exists only where ssl was imported before
    http.client was; a node started as a script imports ssl later (see tls_module()).
    """

    default_port = 443

    def __init__(self, host: str | None, port: int | None, *, context: Any):
        super().__init__(host, port)  # type: ignore[arg-type]
        self.context = context

    def connect(self) -> None:
        super().connect()
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host)


class WebhookClient:
    """POSTs to endpoints from worker threads, over keep-alive connections (one per thread and endpoint)."""

    def __init__(self, settings: Callable[[], Config], metrics: Metrics):
        self.deadlines = CallDeadlines()
        self.settings, self.metrics = settings, metrics
        self._lock = threading.Lock()
        self._local = threading.local()
        self._open: set[http.client.HTTPConnection] = set()  # every connection, closed at stop
        self._tls: tuple[tuple, ssl.SSLContext] | None = None
        self._logged: dict[str, float] = {}

    def tls_context(self) -> ssl.SSLContext:
        """Return the client TLS context vmq_webhooks.cafile/certfile/keyfile/verify_peer/tls_version describe."""
        config, held = self.settings(), self._tls
        options = tuple(config["vmq_webhooks." + k] for k in ("cafile", "certfile", "keyfile", "verify_peer",
                                                              "tls_version"))
        if held is not None and held[0] == options:
            return held[1]
        cafile, certfile, keyfile, verify, versions = options
        ssl = tls_module()
        ctx = ssl.create_default_context(cafile=cafile or None)
        ctx.minimum_version = tls_version(min(versions))
        if certfile:
            ctx.load_cert_chain(certfile, keyfile or None)
        if not verify:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        self._tls = (options, ctx)  # one assignment; two threads may each build it once
        return ctx

    def _connection(self, url: urllib.parse.SplitResult, timeout: float) -> Any:
        """Return this thread's connection to the endpoint (http.client reconnects a closed one by itself)."""
        conns = self._local.__dict__.setdefault("conns", {})
        key = (url.scheme, url.hostname, url.port)
        conn = conns.get(key)
        if conn is None:
            tls = {"context": self.tls_context()} if url.scheme == "https" else {}
            conn = conns[key] = (TlsConnection if tls else http.client.HTTPConnection)(
                url.hostname, url.port, **tls)
            with self._lock:
                self._open.add(conn)
        idle = time.monotonic() - getattr(conn, "used_at", 0.0)
        if conn.sock is not None and idle > self.settings()["vmq_webhooks.pool_timeout"] / 1000:
            conn.close()  # idle past pool_timeout: a new connection
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def post(self, webhook: Webhook, hook: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """POST ``body`` to the endpoint; return (status, headers, answer). A stale keep-alive is retried once."""
        url = urllib.parse.urlsplit(webhook.endpoint)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = {"Content-Type": JSON_TYPE, "vernemq-hook": hook}
        for attempt in range(2):
            try:
                conn = self._connection(url, webhook.response_timeout / 1000)
            except (OSError, ValueError) as exc:  # the TLS files cannot be read
                raise WebhookFailed(f"cannot set up TLS: {exc}") from None
            reused = conn.sock is not None
            # response_timeout bounds the whole call, not each read: an endpoint trickling bytes is cut
            conn.cut_off = False
            cut = self.deadlines.watch(conn, webhook.response_timeout / 1000)
            try:
                conn.request("POST", target, body, headers)
                resp = conn.getresponse()
                data = resp.read(WEBHOOK_MAX_ANSWER + 1)
                self.deadlines.done(cut)
            except (socket.timeout, TimeoutError):
                self.deadlines.done(cut)
                conn.close()
                raise WebhookFailed(f"no answer within {webhook.response_timeout} ms", timeout=True) from None
            except (OSError, http.client.HTTPException) as exc:
                self.deadlines.done(cut)
                conn.close()
                if getattr(conn, "cut_off", False):
                    raise WebhookFailed(f"no whole answer within {webhook.response_timeout} ms", timeout=True) \
                        from None
                if reused and not attempt and isinstance(exc, (http.client.RemoteDisconnected, ConnectionError)):
                    continue  # the endpoint closed an idle keep-alive connection: once more on a new one
                raise WebhookFailed(f"{type(exc).__name__}: {exc}") from None
            conn.used_at = time.monotonic()
            if len(data) > WEBHOOK_MAX_ANSWER or resp.will_close:
                conn.close()
            if len(data) > WEBHOOK_MAX_ANSWER:
                raise WebhookFailed(f"answer larger than {WEBHOOK_MAX_ANSWER} bytes")
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        raise WebhookFailed("the endpoint closed the connection twice")

    def call(self, webhook: Webhook, hook: str, args: Mapping[str, Any]) -> tuple[Any, int | None]:
        """Call one endpoint and read its answer; count requests, bytes, errors and timeouts."""
        body = webhook_body(hook, args, webhook)
        self.metrics.incr(f"webhooks_{hook}_requests")
        self.metrics.incr(f"webhooks_{hook}_bytes_sent", len(body))
        try:
            status, headers, data = self.post(webhook, hook, body)
            answer = parse_webhook_answer(hook, status, headers, data, webhook.base64)
        except WebhookFailed as exc:
            self.metrics.incr(f"webhooks_{hook}_errors")
            if exc.timeout and f"webhooks_{hook}_timeouts" in METRIC_DEFINITIONS:
                self.metrics.incr(f"webhooks_{hook}_timeouts")
            self.complain(hook, webhook.endpoint, exc.text)
            raise
        if answer[0] == "error":
            self.metrics.incr(f"webhooks_{hook}_errors")  # VerneMQ counts a refusal as an error too
        return answer

    def complain(self, hook: str, endpoint: str, reason: str) -> None:
        """Log a failing call, at most once a minute per hook and endpoint."""
        now = time.monotonic()
        with self._lock:
            if now - self._logged.get(hook + endpoint, -math.inf) < WEBHOOK_LOG_INTERVAL:
                return
            self._logged[hook + endpoint] = now
        log.error("webhook %s at %s failed: %s", hook, mask_url(endpoint), reason)

    def close(self) -> None:
        """Close every keep-alive connection (the workers have stopped)."""
        self.deadlines.stop()
        with self._lock:
            conns, self._open = self._open, set()
        for conn in conns:
            conn.close()


# -- the plugin --------------------------------------------------------------

###############################################################################
# 30. Webhooks: the plugin, its gate and commands #############################
###############################################################################
# Owns: the vmq_webhooks plugin: its hooks in the chain, the gate that holds a
#       connection's packet while its answer comes, the bounded pools; webhooks commands.
# Must not know: sockets of MQTT clients.


class AuthQueue:
    """Packets waiting for auth webhook answers: a bounded FIFO that ``workers`` threads take jobs from.

    Each entry counts against max_pending_calls and, for each hook it asks, max_pending_calls_per_hook
    from when it is queued until its job ends; an entry whose connection closes while it is queued
    leaves at once (``cancel``), with what it held.
    """

    def __init__(self, workers: int):
        self._cond = threading.Condition()
        self._queue: collections.OrderedDict[int, tuple[tuple[str, ...], Callable[[], Any]]] = \
            collections.OrderedDict()
        self._seq = itertools.count()
        self._workers, self._threads, self._idle = workers, [], 0
        self.waiting = 0  # entries queued or running
        self.by_hook: dict[str, int] = {}  # the same per hook name
        self._closed = False

    def put(self, hooks: tuple[str, ...], job: Callable[[], Any], limit: int, per_hook: int) -> int | None:
        """Queue ``job`` (it asks ``hooks``); return its ticket, or None when a bound is reached."""
        with self._cond:
            if self._closed or self.waiting >= limit or any(self.by_hook.get(h, 0) >= per_hook for h in hooks):
                return None
            self._count(hooks, 1)
            ticket = next(self._seq)
            self._queue[ticket] = (hooks, job)
            if len(self._queue) > self._idle and len(self._threads) < self._workers:
                thread = threading.Thread(target=self._work, name="vmqapi-webhook-auth", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._cond.notify()
            return ticket

    def cancel(self, ticket: int) -> None:
        """Forget a queued entry (its connection closed); one already running ends by itself."""
        with self._cond:
            entry = self._queue.pop(ticket, None)
            if entry is not None:
                self._count(entry[0], -1)

    def _count(self, hooks: tuple[str, ...], n: int) -> None:
        self.waiting += n
        for hook in hooks:
            self.by_hook[hook] = self.by_hook.get(hook, 0) + n

    def _work(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._queue and not self._closed:
                    self._cond.wait()
                self._idle -= 1
                if self._closed:
                    return
                hooks, job = self._queue.popitem(last=False)[1]
            try:
                job()
            finally:
                with self._cond:
                    self._count(hooks, -1)

    def stop(self) -> None:
        """Drop what is queued and wait for the jobs under way (each bounded by its response_timeout)."""
        with self._cond:
            self._closed = True
            for hooks, _ in self._queue.values():
                self._count(hooks, -1)
            self._queue.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()


class Webhooks:
    """vmq_webhooks on a node: endpoints per hook, the gate in front of the engine, the pool of calls.

    The engine calls hooks synchronously in the broker's loop, where no HTTP call may run.
    So ``gate`` sees each CONNECT, PUBLISH and SUBSCRIBE before the engine does: when an
    auth webhook must be asked and its answer is not cached, the connection holds the packet
    (it reads nothing more; later packets wait in order), a worker asks the endpoints, and
    the answer comes back to the loop, which hands the engine the packet with the answers in
    ``slot``; the hook functions registered in ``Hooks`` return them at once. Notifications
    go to a bounded queue that the workers drain; a full queue drops and counts.
    """

    def __init__(self, settings: Callable[[], Config], hooks: Hooks, metrics: Metrics, io: MqttIO):
        self.settings, self.hooks, self.metrics, self.io = settings, hooks, metrics, io
        self._lock = threading.Lock()
        self.endpoints: dict[str, tuple[Webhook, ...]] = {}  # hook -> endpoints in order; replaced whole, never changed
        self._functions: dict[str, Callable[..., Any]] = {}  # Hooks name -> the function registered for it
        self.cache = WebhookCache()
        self.client = WebhookClient(settings, metrics)
        size = settings()["vmq_webhooks.pool_max_connections"]
        self.waiting = AuthQueue(size)
        self._note_pool = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="vmqapi-webhook")
        self._notes = 0  # notifications queued or running
        self.slot: dict[str, Any] | None = None  # answers for the packet the engine handles now (loop thread)
        self._new_client_id = io.engine.new_client_id
        self._running = True

    def start(self) -> Webhooks:
        """Register the configured webhooks (in the order of their names) and put the gate in place."""
        for webhook in configured_webhooks(self.settings()):
            self.register(webhook)
        self.io.engine.new_client_id = self.assigned_client_id
        self.io.gate = self.gate
        return self

    def stop(self) -> None:
        """Stop calling: wait for calls under way (each bounded by its response_timeout), close connections."""
        self._running = False
        self.io.gate = None
        self.waiting.stop()
        self._note_pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()

    def register(self, webhook: Webhook) -> str:
        """Add an endpoint to a hook; return '' or VerneMQ's reason (already_registered)."""
        with self._lock:
            present = self.endpoints.get(webhook.hook, ())
            if any(w.endpoint == webhook.endpoint for w in present):
                return "already_registered"
            self.endpoints = {**self.endpoints, webhook.hook: (*present, webhook)}
            self._sync_hooks()
        if webhook.hook in WEBHOOK_NEVER_CALLED:
            log.warning("webhook %s at %s is registered but never called: %s", webhook.hook,
                        mask_url(webhook.endpoint), WEBHOOK_NEVER_CALLED[webhook.hook])
        return ""

    def deregister(self, hook: str, endpoint: str) -> str:
        """Remove an endpoint from a hook; return '' or VerneMQ's reason (not_found)."""
        with self._lock:
            present = self.endpoints.get(hook, ())
            kept = tuple(w for w in present if w.endpoint != endpoint)
            if len(kept) == len(present):
                return "not_found"
            self.endpoints = {**self.endpoints, hook: kept} if kept else \
                {h: w for h, w in self.endpoints.items() if h != hook}
            self._sync_hooks()
        return ""

    def _sync_hooks(self) -> None:
        """Register a function in Hooks for each hook some endpoint wants, and only those (holds _lock)."""
        wanted = {h.removesuffix("_m5") for h in self.endpoints if h not in WEBHOOK_NEVER_CALLED}
        for name in wanted - set(self._functions):
            self._functions[name] = fn = self._hook_function(name)
            self.hooks.register(name, fn, plugin="vmq_webhooks")
        for name in set(self._functions) - wanted:
            self.hooks.unregister(name, self._functions.pop(name))

    def _hook_function(self, name: str) -> Callable[..., Any]:
        """Return the function Hooks calls for ``name``; plugin show names it vmq_webhooks_plugin:<hook>/<arity>."""
        fn = self._answer_function(name) if name in WEBHOOK_AUTH else functools.partial(self._notify, name)
        fn.__signature__ = inspect.Signature([inspect.Parameter(a, inspect.Parameter.POSITIONAL_ONLY)  # type: ignore
                                              for a in WEBHOOK_ARGS[name]])
        fn.__module__, fn.__qualname__ = "vmq_webhooks_plugin", name  # type: ignore[attr-defined]
        return fn

    def rows(self, masked: bool = False) -> list[dict]:
        """Return webhooks show's rows: hook, endpoint (``masked``: its user information and query hidden),
        base64payload, response_timeout."""
        return [{"hook": w.hook, "endpoint": mask_url(w.endpoint) if masked else w.endpoint, "base64payload":
                 w.base64, "response_timeout": w.response_timeout}
                for hook in WEBHOOK_HOOKS for w in self.endpoints.get(hook, ())]

    # -- the hook functions (broker's loop) -------------------------------------
    def _answer_function(self, name: str) -> Callable[..., Any]:
        """An auth hook: the answer the gate fetched for this packet, else ``_answer``'s."""
        def answer(*args: Any) -> Any:
            slot = self.slot
            if slot is not None and name in slot:
                return slot.pop(name)
            return self._answer(name, *args)
        return answer

    def _answer(self, name: str, *args: Any) -> Any:
        """Answer an auth hook the gate did not see (an embedding program's call): a cached answer, or refuse."""
        webhooks = self.endpoints.get(name)  # the MQTT 3 hook's endpoints
        if not webhooks:
            return "next"
        cached = self.cache.lookup(webhook_cache_key(webhooks[0].endpoint, name, webhook_args(name, args)))
        if cached is None:  # the broker's loop never waits for an endpoint
            self.client.complain(name, webhooks[0].endpoint, "asked outside a packet the gate saw; refusing")
        return "error" if cached is None else cached

    def _notify(self, name: str, *args: Any) -> None:
        """A notification hook: queue a call per endpoint (dropped and counted when the queue is full)."""
        hook = name
        if name + "_m5" in self.endpoints and "sid" in WEBHOOK_ARGS[name]:
            session = self.io.engine.sessions.get(args[WEBHOOK_ARGS[name].index("sid")])
            if session is not None and session.protocol == 5:
                hook = name + "_m5"
        webhooks = self.endpoints.get(hook)
        if not webhooks or not self._running:
            return
        for webhook in webhooks:
            with self._lock:
                full = self._notes >= WEBHOOK_NOTIFY_QUEUE
                self._notes += not full
            if full:
                self.metrics.incr("webhooks_notifications_dropped")
                continue
            self._note_pool.submit(self._send_note, webhook, hook, args)

    def _send_note(self, webhook: Webhook, hook: str, args: tuple) -> None:
        try:
            self.client.call(webhook, hook, webhook_args(hook, args))
        except WebhookFailed:
            pass  # counted and logged by the client; a notification's failure changes nothing
        finally:
            with self._lock:
                self._notes -= 1

    def assigned_client_id(self) -> str:
        """The engine's new client id: the one the gate already sent to auth_on_register, if any."""
        slot = self.slot
        if slot is not None and "assigned" in slot:
            return slot.pop("assigned")
        return self._new_client_id()

    # -- the gate (broker's loop) -------------------------------------------------
    def gate(self, link: Any, packet: Any, raw: bytes, now: float) -> bool:
        """Hand a packet to the engine with its webhook answers (True), or hold it until they come (False)."""
        kind = type(packet)
        if kind is Publish:
            return self._gate_publish(link, packet, raw, now)
        calls = None
        if kind is Subscribe:
            calls = self._subscribe_calls(link.client, packet)
        elif kind is Connect:
            calls = self._connect_calls(link.client, packet)
        slot, pending = self._prepare(calls) if calls else (None, ())
        if pending:
            return self._hold(link, packet, raw, slot, pending)
        if kind is Connect and slot is not None:
            packet = apply_register_changes(packet, slot, link.client)
        return self._handle(link, packet, raw, now, slot)

    def _handle(self, link: Any, packet: Any, raw: bytes, now: float, slot: dict | None) -> bool:
        self._with_slot(slot, self.io.engine.handle, link.client, packet, now, raw)
        return True

    def _with_slot(self, slot: dict | None, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` (in the loop) with ``slot`` the answers the hook functions return; they are for it only."""
        self.slot = slot
        try:
            return fn(*args)
        finally:
            self.slot = None

    def _hold(self, link: Any, packet: Any, raw: bytes, slot: dict, pending: list) -> bool:
        """Queue the calls for ``packet`` and hold its connection; past the bounds refuse it at once."""
        config = self.settings()
        job = functools.partial(self._asked, link, packet, raw, slot, pending)
        ticket = self.waiting.put(tuple(name for name, *_ in pending), job, config["vmq_webhooks.max_pending_calls"],
                                  config["vmq_webhooks.max_pending_calls_per_hook"])
        if ticket is None:
            return self._busy(link, packet)
        link.hold(functools.partial(self.waiting.cancel, ticket))
        return False

    def _busy(self, link: Any, packet: Any) -> bool:
        """Too many packets wait for answers: a CONNECT hears Server busy, a PUBLISH or SUBSCRIBE fails for now."""
        self.metrics.incr("webhooks_auth_busy")
        self.client.complain("auth", "the endpoints", f"{self.waiting.waiting} packets wait for answers "
                             "(vmq_webhooks.max_pending_calls, _per_hook); refusing new ones")
        if type(packet) is Connect:
            self.io.engine.refuse_busy(link.client, packet, "too many clients wait for authentication")
        else:
            self.io.engine.refuse_overloaded(link.client, packet, "too many packets wait for authentication")
        return True

    def _gate_publish(self, link: Any, p: Publish, raw: bytes, now: float) -> bool:
        """PUBLISH, the hot path: a cached answer costs a key and one look in the cache (webhook_cache_key inlined)."""
        client = link.client
        if not self._asks("auth_on_publish") or not client.connected:
            return self._handle(link, p, raw, now, None)
        v5 = client.proto == 5
        hook = "auth_on_publish_m5" if v5 else "auth_on_publish"
        webhooks = self.endpoints.get(hook)
        if not webhooks:
            return self._handle(link, p, raw, now, {"auth_on_publish": "next"})
        topic, props, session = p.topic, (), client.session
        if p.properties:
            topic, props = publish_topic(client, p)
        if not topic or (p.qos == 2 and p.packet_id in session.incoming):
            return self._handle(link, p, raw, now, None)  # refused, or a resent QoS 2 message: nothing is asked
        keyed = (client.user, session.mountpoint, session.client_id, p.qos, topic, p.retain)
        if v5:
            keyed += (_frozen(props),)
        cached = self.cache.lookup_in_loop((webhooks[0].endpoint, hook, keyed), now)
        if cached is not None:
            return self._handle(link, p, raw, now, {"auth_on_publish": cached})
        args = webhook_args(hook, (client.user, session.key, p.qos, topic, p.payload, p.retain), props)
        return self._hold(link, p, raw, {}, [("auth_on_publish", hook, args, webhooks)])

    def _prepare(self, calls: list[tuple[str, str, dict]]) -> tuple[dict, list]:
        """Answer from the cache what it holds; return (answers so far, calls that must go out)."""
        slot: dict[str, Any] = {}
        pending = []
        for name, hook, args in calls:
            if name == "assigned":
                slot[name] = hook
                continue
            webhooks = self.endpoints.get(hook)
            if not webhooks:
                slot[name] = "next"
                continue
            cached = self.cache.lookup(webhook_cache_key(webhooks[0].endpoint, hook, args))
            if cached is not None:
                slot[name] = cached
            else:
                pending.append((name, hook, args, webhooks))
        return slot, pending

    def _ask(self, pending: list, link: Any = None) -> dict[str, Any]:
        """Walk each hook's endpoints in order, as VerneMQ's all_till_ok (worker thread)."""
        return {name: self._chain(hook, args, webhooks, link) for name, hook, args, webhooks in pending}

    def _chain(self, hook: str, args: Mapping[str, Any], webhooks: Sequence[Webhook], link: Any = None) -> Any:
        for n, webhook in enumerate(webhooks):
            if link is not None and link.closing:  # nobody waits for this answer: no call
                self.metrics.incr("webhooks_auth_dropped")
                return "error"
            key = webhook_cache_key(webhook.endpoint, hook, args)
            if n:  # the first endpoint's cache was looked at already
                cached = self.cache.lookup(key)
                if cached is not None:
                    return cached
            try:
                answer, max_age = self.client.call(webhook, hook, args)
            except WebhookFailed:
                return "error"  # fail closed: no answer is no permission
            if answer == "next":
                continue
            if max_age is not None and answer != "error":
                self.cache.insert(key, max_age, answer)
            return answer
        return "next"

    def _asked(self, link: Any, packet: Any, raw: bytes, slot: dict, pending: list) -> None:
        """Ask the endpoints (a worker thread), then hand the answers to the loop."""
        try:
            answers = self._ask(pending, link)
        except Exception as exc:  # a bug: this packet is refused (fail closed), the worker lives on
            log.exception("webhook calls failed: %s; refusing", exc)
            answers = {name: "error" for name, *_ in pending}
        if link.closing:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the node stops
            self.io.loop.call_soon_threadsafe(self._release, link, packet, raw, {**slot, **answers})

    def _release(self, link: Any, packet: Any, raw: bytes, slot: dict) -> None:
        """Hand the engine the held packet with its answers, then let the connection read on (loop thread)."""
        packet = apply_register_changes(packet, slot, link.client)
        self._with_slot(slot, link.release, packet, raw)  # the held packet first; later ones come through gate

    def http_publish(self, node: NodeApi, peer: tuple, user: str | None, password: bytes | None, client_id: str,
                     mountpoint: str, p: Publish) -> str | None:
        """An HTTP publish (vmq_http_pub): ask auth_on_register and auth_on_publish here, in the HTTP thread
        (which may wait), then publish in the broker's loop with the answers."""
        sid, calls = (mountpoint, client_id), []
        if self._asks("auth_on_register") and not self.io.engine.lets_in_unasked(None, self.settings()):
            calls.append(("auth_on_register", "auth_on_register", webhook_args(
                "auth_on_register", (peer, sid, user, password if user is not None else None, True))))
        if self._asks("auth_on_publish"):
            calls.append(("auth_on_publish", "auth_on_publish", webhook_args(
                "auth_on_publish", (user, sid, p.qos, p.topic, p.payload, p.retain))))
        slot, pending = self._prepare(calls)
        slot.update(self._ask(pending))
        return node.in_broker(self._with_slot, slot, self.io.engine.http_publish, peer, user, password, client_id,
                              mountpoint, p)

    def _asks(self, name: str) -> bool:
        """Whether the engine will call our function for hook ``name`` (registered, and not plugin disable'd)."""
        fn = self._functions.get(name)
        return fn is not None and fn in getattr(self.hooks, name)

    # -- what each packet will ask (VerneMQ calls the _m5 hooks for MQTT 5 clients) -------
    def _subscribe_calls(self, client: Any, p: Subscribe) -> list:
        if not self._asks("auth_on_subscribe") or not client.connected:
            return []
        hook = "auth_on_subscribe_m5" if client.proto == 5 else "auth_on_subscribe"
        topics = [(t, o & 3, {"no_local": bool(o & 4), "rap": bool(o & 8), "retain_handling":
                              RETAIN_HANDLING_NAMES[min((o >> 4) & 3, 2)]}) if client.proto == 5 else (t, o & 3)
                  for t, o in p.topics]
        props = [(n, v) for n, v in p.properties if n != "subscription_identifier"]
        return [("auth_on_subscribe", hook, webhook_args(hook, (client.user, client.session.key, topics), props))]

    def _connect_calls(self, client: Any, p: Connect) -> list:
        """auth_on_register (unless the engine lets the client in without asking) and the will's auth_on_publish."""
        listener = client.listener
        if client.connected or client.auth is not None or p.proto_level not in DIALECTS \
                or p.proto_level not in listener.allowed_versions or "authentication_method" in dict(p.properties):
            return []  # refused, or enhanced authentication: the engine asks no auth hook
        user = client.identity if listener.use_identity_as_username else p.username
        register = self._asks("auth_on_register") and not (self.io.engine.lets_in_unasked(listener, self.settings())
                                                            or listener.use_identity_as_username)
        will = self._asks("auth_on_publish") and p.will_topic is not None
        if not register and not will:
            return []
        calls: list = []
        client_id, v5 = p.client_id, p.proto_level == 5
        if not client_id:
            if not p.clean_session and not v5:
                return []  # refused with CONNACK 2 before any plugin is asked
            client_id = self._new_client_id()
            calls.append(("assigned", client_id, {}))
        sid = (listener.mountpoint, client_id)
        if register:
            hook = "auth_on_register_m5" if v5 else "auth_on_register"
            calls.append(("auth_on_register", hook, webhook_args(
                hook, (client.peer, sid, p.username, p.password, p.clean_session), p.properties)))
        if will:
            hook = "auth_on_publish_m5" if v5 else "auth_on_publish"
            calls.append(("auth_on_publish", hook, webhook_args(
                hook, (user, sid, p.will_qos, p.will_topic, p.will_payload, p.will_retain), p.will_properties)))
        return calls


def publish_topic(client: Any, p: Publish) -> tuple[str | None, tuple]:
    """Return an MQTT 5 PUBLISH's topic (an alias resolved) and the properties a webhook sees."""
    topic, props = p.topic, []
    for name, value in p.properties:
        if name == "topic_alias":
            topic = topic or client.aliases_in.get(value)
        elif name != "subscription_identifier":
            props.append((name, value))
    return topic, tuple(props)


def apply_register_changes(packet: Any, slot: dict, client: Any) -> Any:
    """Apply auth_on_register's client_id and clean_session changes to the CONNECT (a mountpoint change refuses)."""
    changes = slot.get("auth_on_register")
    if not isinstance(packet, Connect) or not isinstance(changes, dict):
        return packet
    if changes.get("mountpoint", client.listener.mountpoint) != client.listener.mountpoint:
        log.error("auth_on_register webhook moved client %r to mountpoint %r; vmqapi cannot, so it refuses",
                  packet.client_id, changes["mountpoint"])
        slot["auth_on_register"] = "error"
        return packet
    replace = {k: changes[k] for k in ("client_id", "clean_session") if changes.get(k) not in (None, "")}
    if "client_id" in replace:
        slot.pop("assigned", None)  # the engine assigns no id to a client the webhook named
    return dataclasses.replace(packet, **replace) if replace else packet


def configured_webhooks(config: Config) -> list[Webhook]:
    """Return the vmq_webhooks.<name>.* webhooks of the config, ordered by name; raise ConfigError when one is bad."""
    names = sorted({k.split(".")[1] for k in config.values if k.startswith("vmq_webhooks.") and k.count(".") == 2})
    webhooks = []
    for prefix in (f"vmq_webhooks.{name}." for name in names):
        for missing in [o for o in ("hook", "endpoint") if prefix + o not in config.values][:1]:
            raise ConfigError(f"{prefix}{missing} is not defined")  # VerneMQ's schema message
        try:
            webhooks.append(Webhook(parse_webhook_hook(config[prefix + "hook"]), config[prefix + "endpoint"],
                                    config[prefix + "base64encode"], config[prefix + "no_payload"],
                                    config[prefix + "response_timeout"]))
        except ValueError as exc:
            raise ConfigError(f"{prefix}*: {exc}") from None
    return webhooks


def _webhooks(call: Call) -> Webhooks:
    plugin = getattr(call.node, "webhooks", None)
    if plugin is None:
        raise UnknownCommand("the webhooks commands need the vmq_webhooks plugin: plugins.vmq_webhooks = on")
    return plugin


_HOOK_KEY = Param("hook", parse_webhook_hook, doc="one of " + ", ".join(WEBHOOK_HOOKS))
_ENDPOINT_KEY = Param("endpoint", parse_webhook_endpoint, doc="the http:// or https:// URL to POST to")


@command("webhooks", "show", quick=True, read_only=True)
def cmd_webhooks_show(call: Call) -> Any:
    """Show the registered webhooks (to a mgmt_ro key, endpoints without user information or query)."""
    return Table(tuple(_webhooks(call).rows(call.read_only)), ("hook", "endpoint", "base64payload", "response_timeout"))


@command("webhooks", "register", keys=(_HOOK_KEY, _ENDPOINT_KEY), required=("hook", "endpoint"), quick=True, flags=(
    Param("base64payload", parse_flag, doc="true (default) or false: base64 encode the MQTT payload"),
    Param("no_payload", parse_flag, doc="true or false (default): leave the payload out of auth_on_publish"),
    Param("response_timeout", parse_positive_int, doc="milliseconds the endpoint has to answer (default 5000)")))
def cmd_webhooks_register(call: Call) -> Any:
    """Register a webhook endpoint with a hook."""
    flags = call.flags
    webhook = Webhook(call.args["hook"], call.args["endpoint"], flags.get("base64payload", True),
                      flags.get("no_payload", False), flags.get("response_timeout") or WEBHOOK_TIMEOUT)
    reason = _webhooks(call).register(webhook)
    return alert(f"can't register endpoint due to '{reason}'") if reason else "Done"


@command("webhooks", "deregister", keys=(_HOOK_KEY, _ENDPOINT_KEY), required=("hook", "endpoint"), quick=True)
def cmd_webhooks_deregister(call: Call) -> Any:
    """Deregister a webhook endpoint."""
    reason = _webhooks(call).deregister(call.args["hook"], call.args["endpoint"])
    return alert(f"can't deregister endpoint due to '{reason}'") if reason else "Done"


@command("webhooks", "cache", "show", quick=True, flags=(
    Param("reset", value="none", doc="zero the hits and misses instead"),))
def cmd_webhooks_cache_show(call: Call) -> Any:
    """Show statistics about the cache of auth answers (hits, misses, entries per endpoint and hook)."""
    cache = _webhooks(call).cache
    if "reset" in call.flags:
        return cache.reset_stats() or "Done"
    return Table(tuple(cache.rows()), ("stat", "endpoint", "hook", "value"))


@command("webhooks", "cache", "clear", quick=True)
def cmd_webhooks_cache_clear(call: Call) -> Any:
    """Clear the cache of auth answers."""
    _webhooks(call).cache.clear()
    return "Done"


# The cluster, bridge and webhooks sections add their commands above; the table is complete here.
CATALOGUE: tuple[Command, ...] = tuple(_catalogue)
del _catalogue


###############################################################################
# Part IV. The node and the CLI                                               #
###############################################################################
# Node owns and starts everything above and implements NodeApi; main(argv) is last.


###############################################################################
# 31. Node ####################################################################
###############################################################################
# Owns: the running node: its config snapshot, key store, command table,
#       listeners, node.json, start and stop.
# Must not know: argv.


def keystore_for(config: Config, clock: Callable[[], float] = time.time) -> KeyStore:
    """Return the KeyStore the config describes (in its data dir)."""
    return KeyStore(os.path.join(config["data_dir"], KEY_FILE), storage=config["api_key_storage"],
                    min_length=config["min_apikey_length"], max_expiry_days=config["max_apikey_expiry_days"],
                    clock=clock)


def refuse_if_readable_by_others(path: str) -> None:
    """Raise ConfigError when a secret file (keys, passwords) can be read by group or others."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, ValueError):
        return
    except OSError as exc:
        raise ConfigError(f"cannot check {path}: {exc.strerror}") from None
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(f"{path} holds secrets but can be read by others (mode {mode & 0o777:o}); "
                          f"run: chmod 600 {path}")


def make_private_dir(path: str) -> None:
    """Create the data dir 0700; make an existing one 0700 when this user owns it, else refuse it (README)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:  # bad configuration: exit 2
        raise FileRefused(f"cannot create the data dir {path}: {exc.strerror or exc}") from None
    if os.name != "posix" or not st.st_mode & 0o077:
        return
    if st.st_uid != os.geteuid():
        raise FileRefused(f"the data dir {path} belongs to uid {st.st_uid} and others may enter it (mode "
                          f"{st.st_mode & 0o777:o}); use a directory of your own, or run: chmod 700 {path}")
    os.chmod(path, 0o700)
    log.warning("the data dir %s was mode %o; vmqapi made it 0700: it holds the API keys and the stores",
                path, st.st_mode & 0o777)


def read_node_file(data_dir: str) -> dict | None:
    """Return the node.json of ``data_dir``, or None when there is none (or it is unreadable)."""
    try:
        info = json.loads(read_regular_file(os.path.join(data_dir, NODE_FILE), MAX_SMALL_FILE, NODE_FILE)[0])
        return info if isinstance(info, dict) else None
    except (OSError, ValueError, RecursionError, FileRefused):  # unreadable, garbled, a FIFO: as good as none
        return None


class Node:
    """A vmqapi node: ``Node(config).start()`` ... ``.stop()``, or ``with Node(config) as node``.

    ``config`` is a Config or a mapping of config keys to values (strings are
    parsed as in vernemq.conf). ``node.commands.register(...)`` adds commands.
    It implements NodeApi, what the admin API asks of it.
    """

    def __init__(self, config: Config | Mapping[str, Any] | None = None):
        self._lock = threading.Lock()
        self._config = config if isinstance(config, Config) else Config(dict(config or {}))
        self.name: str = self._config["nodename"]
        self.data_dir = os.path.abspath(self._config["data_dir"])
        self.secret = secrets.token_urlsafe(32)
        self.announced = False  # node.json is written: whoever waits for it may use the node
        self.metrics = Metrics()
        self.hooks = Hooks()
        self.commands = CommandTable(CATALOGUE)
        self.keystore = keystore_for(self._config)
        self.started_at = time.time()
        self.history = StatusHistory(self.status)  # the status page's charts, off the MQTT path
        self.status_rows = StatusRows(lambda: status_rows(self))  # /status/details.json's, shared by its readers
        self._listeners: list[HttpListener] = []
        self.slow_commands = threading.BoundedSemaphore(SLOW_COMMANDS)  # see slow_command_slot
        self.unfinished_http = UnfinishedRequests(lambda: self.config["http_max_unfinished_bytes"])
        self.mqtt: MqttIO | None = None
        self.cluster: Cluster | None = None
        self.bridges: Bridges | None = None  # vmq_bridge
        self.webhooks: Webhooks | None = None  # plugins.vmq_webhooks
        self._follows: dict[str, tuple[Tracer, tuple[str, str], float]] = {}  # trace client --follow tokens
        self._stopped = threading.Event()
        self._running = False
        self._stop_asked = False  # a stop asked while the node was starting: start() stops it when whole
        self._starter: int | None = None  # the thread running start(), while it does
        self._start_ended = threading.Event()  # no start() under way: stop() from another thread waits for it
        self._start_ended.set()

    @property
    def config(self) -> Config:
        """The configuration in force now (``set`` swaps in a new one)."""
        return self._config

    def apply_settings(self, changes: Mapping[str, Any]) -> None:
        """Swap in a Config with ``changes`` (already parsed) applied, atomically."""
        with self._lock:
            self._config = self._config.with_values(changes)

    # -- life cycle -------------------------------------------------------
    def start(self) -> Node:
        """Load keys, provision, bind listeners, write node.json; raise VmqError on failure."""
        make_private_dir(self.data_dir)
        other = read_node_file(self.data_dir)
        if other and other.get("pid") != os.getpid() and _pid_alive(other.get("pid")):
            raise ConfigError(f"another node (pid {other['pid']}) runs with data dir {self.data_dir}")
        mark_start(self.data_dir)  # a CLI finding no node.json yet waits for this start (README, Cluster)
        with self._lock:
            self._stop_asked, self._starter = False, threading.get_ident()
            self._start_ended.clear()
        try:
            try:
                self._start()
            except BaseException:
                unmark_start(self.data_dir)  # a failed start leaves none
                raise
            self._stopped.clear()
            failure = None
            try:
                self.history.start()
            except RuntimeError as exc:  # no thread for it (out of memory or threads): the node stops, whole
                failure = VmqError(f"cannot start the node: {exc}")
            with self._lock:  # a stop asked meanwhile (node stop through the API, stop() from another thread)
                self._running, asked = True, self._stop_asked
            unmark_start(self.data_dir)  # node.json supersedes it
            if asked or failure is not None:
                self.stop()
            if failure is not None:
                raise failure
        finally:
            with self._lock:
                self._starter = None
            self._start_ended.set()
        return self

    def _start(self) -> None:
        """Load keys, provision, bind listeners, write node.json."""
        self.keystore.load()
        if self._config["vmq_passwd.password_file"]:
            check_passwd_file(self._config["vmq_passwd.password_file"])
        for path in (self.keystore.path, self._config["vmq_passwd.password_file"]):
            refuse_if_readable_by_others(path)
        if self._config["vmq_acl.acl_file"]:
            check_acl_file(self._config["vmq_acl.acl_file"])
        self._provision()
        try:
            self._start_mqtt()
            self.cluster = Cluster(self, self.mqtt)
            self.cluster.start()
        except BaseException:
            self._stop_mqtt()
            raise
        try:
            for kind in ("http", "https"):
                for name, address in sorted(self._config.listeners(kind).items()):
                    listener = HttpListener(self, name, address, tls=kind == "https")
                    self._listeners.append(listener)
                    listener.start()
        except OSError as exc:  # ssl.SSLError too
            self._close_listeners()
            self._stop_mqtt()
            raise ConfigError(f"cannot start listener.{kind}.{name} on {render_value(address)}: "
                              f"{exc.strerror or exc}") from None
        log.info("node %s started: %s", self.name,
                 ", ".join(f"{x['type']} {x['address']}:{x['port']}" for x in self.listeners()))
        engine = self.mqtt.engine
        if self._config["allow_anonymous"] is None and self._read(engine.lets_in_unasked, None, self._config):
            # said once the listeners are bound (a start that fails would speak of a node that never ran), and
            # before node.json appears, so whoever waits for that file has been told
            log.warning("allow_anonymous is not set, every MQTT listener is on loopback and no authentication "
                        "plugin is configured: clients may connect without credentials (set allow_anonymous = off "
                        "to refuse them; a password file or an auth_on_register hook is asked once configured)")
        try:
            self._write_node_file()
        except OSError as exc:  # a full disk, say: what started stops, and the start says why
            self._close_listeners()
            self._stop_mqtt()
            raise ConfigError(f"cannot write {os.path.join(self.data_dir, NODE_FILE)}: {exc.strerror or exc}") from None

    def _check_descriptors(self) -> None:
        """Raise the file descriptor limit as far as allowed; warn when it is below what the listeners may hold."""
        soft = raise_descriptor_limit()
        config = self._config
        limits = [config.listener_option(kind, name, "max_connections")
                  for kind in LISTENER_TYPES for name in config.listeners(kind)]
        wanted = sum(x for x in limits if x is not None)
        if soft is not None and wanted > soft:
            log.warning("the file descriptor limit (%d) is below the listeners' max_connections (%d together): "
                        "MQTT connections are refused %d before the limit, so the admin API stays reachable; "
                        "raise it (ulimit -n %d before the start) or lower listener.<type>.<name>.max_connections",
                        soft, wanted, min(FD_RESERVE, soft // 4), wanted + FD_RESERVE)

    def _start_mqtt(self) -> None:
        addresses = {(k, n): a for k in MQTT_LISTENER_KINDS for n, a in self._config.listeners(k).items()}
        self._check_descriptors()
        if self._config["message_store"] == "sqlite":
            store: MemoryStore = SqliteStore(os.path.join(self.data_dir, MESSAGE_DB))
        else:
            store = MemoryStore()
        self.mqtt = MqttIO(lambda: self._config, store, self.metrics, self.name, self.hooks)
        engine = self.mqtt.engine
        engine.anonymous_default = all(ipaddress.ip_address(h).is_loopback for h, _ in addresses.values())
        try:
            engine.restore(*store.load(), now=time.time())
        except VmqError:
            store.close()
            raise
        self.metrics.add_source(lambda: engine.counters, engine.gauges)
        self.metrics.add_source(lambda: store.counters, dict)
        self.bridges = Bridges(self.mqtt, self._config)  # first: a bridge that cannot work stops the start
        self.metrics.add_source(self.bridges.counters, dict)
        self.mqtt.start()
        self.bridges.start()
        if self._config["plugins.vmq_webhooks"]:
            self.webhooks = Webhooks(lambda: self._config, self.hooks, self.metrics, self.mqtt).start()

    def _stop_mqtt(self) -> None:
        if self.bridges is not None:
            self.bridges.stop()
        if self.webhooks is not None:
            self.webhooks.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.mqtt is not None:
            self.mqtt.stop()

    def in_broker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the broker's thread (directly when the node has no broker running)."""
        # The loop's state decides, not the node's: while the node starts or stops, HTTP threads
        # may still call, and the engine must then be reached through its loop as ever.
        if self.mqtt is None or not self.mqtt.loop.is_running() or self.mqtt.in_loop_thread():
            return fn(*args)  # no loop to ask; or a hook calling back into the node, already in the loop
        return self.mqtt.call(fn, *args)

    def _read(self, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
        """Run ``fn(*args)``, which changes nothing, in the broker's thread: as in_broker, without a commit."""
        if self.mqtt is None or not self.mqtt.loop.is_running() or self.mqtt.in_loop_thread():
            return fn(*args)
        return self.mqtt.read(fn, *args, timeout=timeout)

    def _provision(self) -> None:
        env = os.environ.get("VMQAPI_API_KEYS", "")
        added = self.keystore.provision(env.split(","), "VMQAPI_API_KEYS") if env.strip() else 0
        path = self._config["api_key_bootstrap_file"]
        if path:
            try:
                lines = read_regular_file(path, MAX_SMALL_FILE, "api_key_bootstrap_file")[0].decode().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read api_key_bootstrap_file {path}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
            added += self.keystore.provision(lines, path)
        if added:
            log.info("provisioned %d API key(s)", added)  # never the keys themselves

    def _write_node_file(self) -> None:
        info = {"node": self.name, "pid": os.getpid(), "secret": self.secret, "listeners": self.listeners()}
        self.announced = True  # before the file can be seen: a signal sent by whoever saw it finds it set
        try:
            write_file_atomically(os.path.join(self.data_dir, NODE_FILE), json.dumps(info, indent=1).encode())
        except BaseException:
            self.announced = False
            raise

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.stop()
        self._listeners = []

    def stop(self) -> None:
        """Stop every listener and remove node.json; safe to call twice. Called while another thread
        starts the node, it waits for that start, which stops the node once whole."""
        with self._lock:
            elsewhere = self._starter not in (None, threading.get_ident())
            if elsewhere:
                self._stop_asked = True
        if elsewhere:
            self._start_ended.wait()
        with self._lock:
            listeners, self._listeners = self._listeners, []
            was_running, self._running = self._running, False
        for listener in listeners:
            listener.stop()
        self.history.stop()
        if was_running:
            self._stop_mqtt()
            path = os.path.join(self.data_dir, NODE_FILE)
            info = read_node_file(self.data_dir)
            if info and info.get("secret") == self.secret:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            log.info("node %s stopped", self.name)
        self._stopped.set()

    def request_stop(self) -> None:
        """Stop from another thread (node stop answers first, then this runs); a node still starting
        stops once it is whole (stopped halfway, its start would have brought it back up)."""
        with self._lock:
            if not self._running:
                self._stop_asked = True
                return
        threading.Thread(target=self.stop, name="vmqapi-stop", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the node has stopped; return whether it has."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- what the commands read -------------------------------------------
    def _all_listeners(self) -> list[Any]:
        return [*self._listeners, *(self.mqtt.listeners if self.mqtt else ())]

    def listeners(self) -> list[dict]:
        """Return type, address and port of each listener, as node.json lists them."""
        found = [{"type": x.kind, "address": x.address, "port": x.port} for x in self._all_listeners()]
        if self.cluster is not None and self.cluster.bound is not None:
            found.append({"type": "vmqs" if self.cluster.tls else "vmq", "address": self.cluster.bound[0],
                          "port": self.cluster.bound[1]})
        return found

    def listener_rows(self, tls: bool = False, mqtt: bool = False) -> list[dict]:
        """Return the rows of listener show (the cluster's listener last, type vmq)."""
        cluster = self.cluster if self.cluster is not None and self.cluster.bound is not None else None

        def in_loop() -> tuple[list[dict], int]:  # the MQTT listeners' counters and the links belong to the loop
            return ([x.row(tls, mqtt) for x in self.mqtt.listeners] if self.mqtt is not None else [],
                    cluster.links_up() if cluster is not None else 0)
        mqtt_rows, links = self._read(in_loop)
        rows = [*(x.row(tls, mqtt) for x in self._listeners), *mqtt_rows]
        if cluster is not None:
            address, port = cluster.bound
            rows.append({"type": "vmqs" if cluster.tls else "vmq", "status": "running", "address": address,
                         "port": str(port), "mountpoint": "", "max_conns": "infinity", "active_conns": links,
                         "all_conns": links})
        return rows

    def status(self) -> dict[str, Any]:
        """Return node status's values, read from the metrics registry."""
        return self._read(self._status)

    def _status(self) -> dict[str, Any]:
        m = self.metrics.totals().__getitem__
        online = m("active_mqtt_connections")
        return {"num_online": online, "num_offline": max(0, m("queue_processes") - online),
                "msg_in": m("mqtt_publish_received"), "msg_out": m("mqtt_publish_sent"),
                "queue_in": m("queue_message_in"), "queue_out": m("queue_message_out"),
                "queue_drop": m("queue_message_drop"), "queue_unhandled": m("queue_message_unhandled"),
                "num_subscriptions": m("router_subscriptions"), "num_retained": m("retain_messages"),
                "matches_local": m("router_matches_local"), "matches_remote": m("router_matches_remote"),
                "version": __version__}

    def session_count(self) -> int:
        """Return how many sessions the broker holds (as its loop last published it: no call into its thread)."""
        return self.mqtt.session_total if self.mqtt is not None else 0

    def session_records(self, client_id: str | None = None, subscriptions: bool = True,
                        messages: bool = True, local: bool = False) -> list[dict]:
        """Return every session show field of each session (or ``client_id``'s), ordered by (mountpoint, id).

        In a cluster the other nodes' sessions follow this node's (``local``: this node's only).
        """
        if self.mqtt is None:
            return []
        cluster = self.cluster if not local else None
        remote, records = self._in_chunks(self.mqtt.engine.session_records, client_id, lambda _: slice(None),
                                          subscriptions, messages, peers=cluster.peers if cluster is not None else None)
        for record in records:
            record["node"] = self.name
        if remote:
            records += [r for _, rows in self.cluster.gather("session_records", client_id, subscriptions, messages)
                        for r in rows]
        return records

    def session_rows(self, client_id: str | None, columns: Sequence[str], window: slice,
                     local: bool = False) -> list[dict]:
        """Return finished session show rows for a listing without filters, paged before they are built."""
        if self.mqtt is None:
            return []
        cluster = self.cluster if not local else None

        def part(remote: bool) -> slice:  # with other nodes, this node's rows are paged with theirs
            return slice(0, window.stop) if remote else window
        remote, rows = self._in_chunks(self.mqtt.engine.session_rows, client_id, part, tuple(columns),
                                       peers=cluster.peers if cluster is not None else None)
        if "node" in columns:
            for row in rows:
                row["node"] = self.name
        if remote:
            rows += [r for _, found in self.cluster.gather("session_rows", client_id, list(columns), window.stop)
                     for r in found]
            rows = rows[window]
        return rows

    def _in_chunks(self, build: Callable[..., list[dict]], client_id: str | None, window: Callable[[bool], slice],
                   *args: Any, peers: Callable[[], list[str]] | None = None) -> tuple[bool, list[dict]]:
        """Return (whether ``peers`` named any, ``build(keys, *args)`` of the sessions in ``window(that)``).

        One turn of the broker's loop finds the keys and builds the first SESSION_CHUNK; each
        further chunk takes a turn of its own, so the broker delivers between them.
        """
        engine = self.mqtt.engine

        def first() -> tuple[bool, list, list[dict]]:
            remote = peers is not None and bool(peers())
            keys = engine.session_keys(client_id)[window(remote)]
            return remote, keys, build(keys[:SESSION_CHUNK], *args)
        remote, keys, out = self._read(first)
        for start in range(SESSION_CHUNK, len(keys), SESSION_CHUNK):
            out += self._read(build, keys[start:start + SESSION_CHUNK], *args)
        return remote, out

    def disconnect_session(self, client_id: str, mountpoint: str = "", cleanup: bool = False,
                           local: bool = False) -> bool:
        """Disconnect a client wherever it is in the cluster (and with ``cleanup`` drop its session).

        Return whether it existed (``local``: on this node only).
        """
        if self.mqtt is None:
            return False
        found = self.in_broker(self.mqtt.engine.disconnect, client_id, mountpoint, cleanup)
        if self.cluster is not None and not local:
            found = any([found, *(a for _, a in self.cluster.gather("disconnect", client_id, mountpoint, cleanup))])
        return found

    def _everywhere(self, op: str, answer: Any, *args: Any) -> Any:
        """Return the first true answer of this node's (``answer``) and the other nodes' to broker op ``op``."""
        if self.cluster is None:
            return answer
        answers = [a for _, a in self.cluster.gather("broker", op, *args)]
        return next((a for a in [answer, *answers] if a), answer)

    def client_status(self, key: tuple[str, str]) -> tuple[str, dict[str, int]] | None:
        """Return (online or offline, {filter: QoS}) of the session of (mountpoint, client id), or None."""
        return None if self.mqtt is None else self._read(self.mqtt.engine.client_status, key)

    def disconnect_batch(self, count: int, mountpoint: str, cleanup: bool, keep: Iterable[str]) -> int:
        """Disconnect up to ``count`` online clients of this node, sparing ``keep``; return how many."""
        return None if self.mqtt is None else self.in_broker(self.mqtt.engine.disconnect_batch, count, mountpoint,
                                                             cleanup, keep)

    def unsubscribe(self, client_id: str, topic: str, mountpoint: str = "", local: bool = False) -> bool:
        """Remove one subscription of a session (on every node unless ``local``); return whether it existed."""
        if self.mqtt is None:
            return None
        done = self.in_broker(self.mqtt.engine.admin_unsubscribe, client_id, topic, mountpoint)
        return done if local else self._everywhere("admin_unsubscribe", done, client_id, topic, mountpoint)

    def reauthorize(self, username: str, client_id: str, mountpoint: str = "", local: bool = False) -> int:
        """Check a session's subscriptions as ``username`` (on every node unless ``local``); return how many dropped."""
        if self.mqtt is None:
            return None
        dropped = self.in_broker(self.mqtt.engine.reauthorize, username, client_id, mountpoint)
        return dropped if local else self._everywhere("reauthorize", dropped, username, client_id, mountpoint)

    def delete_retained(self, mountpoint: str, topic: str) -> bool:
        """Delete one retained message; return whether there was one."""
        return None if self.mqtt is None else self.in_broker(self.mqtt.engine.delete_retained, mountpoint, topic)

    def delete_expired_retained(self) -> int:
        """Delete the retained messages whose MQTT 5 Message Expiry Interval has passed; return how many."""
        return None if self.mqtt is None else self.in_broker(self.mqtt.engine.delete_expired_retained)

    def http_publish(self, peer: tuple, user: str | None, password: bytes | None, client_id: str,
                     mountpoint: str, message: HttpMessage) -> str | None:
        """Publish as an MQTT client would; return HTTP_PUB_ANSWERS' reason (None: no broker).

        With webhooks their endpoints are asked first, here in the HTTP thread, which may wait.
        """
        packet = Publish(message.topic, message.payload, message.qos, message.retain,
                         packet_id=1 if message.qos else None, properties=message.properties)
        if self.webhooks is not None:
            return self.webhooks.http_publish(self, peer, user, password, client_id, mountpoint, packet)
        if self.mqtt is None:
            return None
        return self.in_broker(self.mqtt.engine.http_publish, peer, user, password, client_id, mountpoint, packet)

    def topic_problem(self, topic: str, max_levels: int = 0) -> str | None:
        """Return why a PUBLISH to ``topic`` is refused (``max_levels`` 0: any depth), or None."""
        return topic_name_problem(topic, max_levels)

    def string_problem(self, text: str) -> str | None:
        """Return why ``text`` cannot travel as an MQTT UTF-8 string, or None."""
        return string_problem(text)

    def trace_client(self, client_id: str, mountpoint: str, duration: float, rate: tuple[int, int, int],
                     follow: str | None = None) -> list[str]:
        """Trace a client for ``duration`` seconds (``rate``: lines per interval, the interval in ms, payload
        bytes shown); return the lines.

        With a ``follow`` token the trace stays on after the call (for ``TRACE_FOLLOW_GRACE``
        seconds unless the token comes again), so back-to-back calls miss no packet.
        """
        key = (mountpoint, client_id)
        tracer = Tracer(client_id, *rate)
        with self._lock:
            stale = self._expire_follows()
            held = self._follows.pop(follow, None) if follow else None
            tracer = held[0] if held is not None and held[1] == key else tracer
        for old_key in stale - {key}:
            self._trace(old_key, None)
        self._trace(key, tracer)
        try:
            self._stopped.wait(duration)
        finally:
            if follow and self._running:
                with self._lock:
                    self._follows[follow] = (tracer, key, time.monotonic() + TRACE_FOLLOW_GRACE)
            elif self._running:
                self._trace(key, None)
        return tracer.take()

    def _trace(self, key: tuple[str, str], tracer: Tracer | None) -> None:
        if self.mqtt is not None:
            self.in_broker(self.mqtt.engine.trace, key, tracer)

    def _expire_follows(self) -> set[tuple[str, str]]:
        """Forget followed traces nobody asked for lately; return the clients no trace follows now.

        The caller holds ``_lock`` and switches those traces off after releasing it.
        """
        now = time.monotonic()
        expired = {key for _, key, until in self._follows.values() if until < now}
        self._follows = {token: held for token, held in self._follows.items() if held[2] >= now}
        return expired - {key for _, key, _ in self._follows.values()}

    def tls_listeners(self) -> list[Listener]:
        """Return the listeners that speak TLS."""
        return [x for x in self._all_listeners() if x.tls is not None]

    def find_listener(self, address: str, port: int) -> Listener | None:
        """Return the listener at address:port (HTTP or MQTT), or None."""
        return next((x for x in self._all_listeners() if (x.address, x.port) == (address, port)), None)

    def start_listener(self, address: str, port: int, options: Mapping[str, Any], kind: str = "tcp") -> None:
        """Start a listener at run time; raise OSError when it cannot bind or load its certificate."""
        if kind in ("http", "https"):
            listener = HttpListener(self, f"{address}:{port}", (address, port), kind == "https", options)
            listener.start()
            self._listeners.append(listener)
            return
        if self.mqtt is None:
            raise OSError("the broker is not running")
        self.mqtt.open_listener(f"{address}:{port}", (address, port), options, kind)

    def delete_listener(self, listener: Listener) -> None:
        """Stop a listener, close its connections and forget it."""
        if listener in self._listeners:
            self._listeners.remove(listener)
        listener.delete()

    def metric_samples(self) -> dict[tuple[str, LabelSet], int]:
        """Return every metric series (read in the broker's thread)."""
        return self._read(self.metrics.samples)

    def reset_metrics(self) -> None:
        """Zero every counter."""
        self.in_broker(self.metrics.reset)

    def health_reasons(self) -> list[str]:
        """Return why the node is not healthy: listeners that are not running, a store that cannot write."""
        def in_loop() -> tuple[list[tuple[Listener, str]], Any, str]:  # what the broker's loop owns
            if self.mqtt is None:
                return [], None, ""
            return ([(x, x.status) for x in self.mqtt.listeners], self.mqtt.store.error,
                    self.cluster.split if self.cluster is not None else "")
        try:
            mqtt, error, split = self._read(in_loop, timeout=HEALTH_LOOP_WAIT)
        except concurrent.futures.TimeoutError:  # a probe must get its answer even then: the broker is stuck
            return [f"The broker's loop has not answered for {HEALTH_LOOP_WAIT:g} s"]
        listeners = [*((x, x.status) for x in self._listeners), *mqtt]
        down = [f"{x.kind} {x.address}:{x.port} ({status})" for x, status in listeners if status != "running"]
        reasons = [f"Listeners are not ready: [{', '.join(down)}]"] if down else []
        if error is not None:
            reasons.append(f"The message store cannot write: {error}")
        if split:
            reasons.append(f"The cluster is not ready: {split}")
        return reasons

    def health_warnings(self) -> list[str]:
        """Return what /health says of a healthy node: persistent sessions kept on this node only."""
        if self.cluster is None or self.mqtt is None:
            return []
        try:
            return self._read(self.cluster.health_warnings, timeout=HEALTH_LOOP_WAIT)
        except concurrent.futures.TimeoutError:
            return []

    def retained_rows(self) -> list[dict]:
        """Return mountpoint, topic and payload of every retained message."""
        return [] if self.mqtt is None else self._read(self.mqtt.engine.retained_rows)

    def plugin_rows(self) -> list[dict]:
        """Return the rows of plugin show: enabled built-in plugins and Python hooks."""
        bridge = [{"Plugin": "vmq_bridge", "Type": "application", "Hook(s)": "", "M:F/A": ""}] \
            if self._config["plugins.vmq_bridge"] else []  # it registers no hooks
        return self.hooks.rows() + bridge

    def enable_plugin(self, name: str, on: bool) -> bool:
        """Switch a plugin's checks and hooks on or off; return False when there is no such plugin."""
        return self.hooks.enable(name, on)

    # -- the cluster ------------------------------------------------------
    def cluster_members(self) -> list[str]:
        """Return every member's name (empty when the node is in no cluster)."""
        return self._read(self.cluster.members) if self.cluster is not None else []

    def cluster_peers(self) -> list[str]:
        """Return the other members."""
        return self._read(self.cluster.peers) if self.cluster is not None else []

    def call_node(self, target: str, op: str, *args: Any) -> Any:
        """Ask node ``target`` to run cluster op ``op`` (CLUSTER_OPS); raise ClusterError."""
        if self.cluster is None:
            raise ClusterError("this node runs no broker, so it is in no cluster")
        return self.cluster.call(target, op, *args)

    def gather(self, op: str, *args: Any) -> list[tuple[str, Any]]:
        """Ask every other reachable member to run cluster op ``op``; return (node, answer) pairs."""
        return self.cluster.gather(op, *args) if self.cluster is not None else []

    def replicate_settings(self, target: str, texts: Mapping[str, str]) -> None:
        """Hand ``set``'s changes to ``target`` (a node name or ``*``); a node that is down takes them on return."""
        if self.cluster is not None:
            self.cluster.set_all(target, texts)


###############################################################################
# 32. CLI #####################################################################
###############################################################################
# Owns: argv of the process: start a node, or run vmq-admin commands locally or
#       against the live node found through node.json.
# Must not know: how commands work inside.

GLOBAL_OPTIONS = ("--data-dir", "--config", "--set")


@dataclass(frozen=True, slots=True)
class LocalContext:
    """What a local command (api-key) sees of NodeApi when it runs in the CLI process."""

    config: Config
    keystore: KeyStore
    name: str


def take_global_options(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split the words after ``admin`` into the global options found anywhere among them and the rest."""
    taken: list[str] = []
    rest: list[str] = []
    n = 0
    while n < len(tokens):
        option = tokens[n].partition("=")[0]
        if option not in GLOBAL_OPTIONS:
            rest.append(tokens[n])
        elif "=" in tokens[n] or n + 1 == len(tokens):
            taken.append(tokens[n])  # a bare last one: argparse says it needs a value
        else:
            taken += tokens[n:n + 2]
            n += 1
        n += 1
    return taken, rest


def split_global_options(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv into the global options and the rest (sub-command and its words)."""
    tokens = list(tokens)
    n = 0
    while n < len(tokens) and tokens[n].startswith("-"):
        option = tokens[n].partition("=")[0]
        n += 2 if option in GLOBAL_OPTIONS and "=" not in tokens[n] else 1
    return tokens[:n], tokens[n:]


CLI_EPILOG = f"""sub-commands:
  (none)                      start a node; Ctrl-C or SIGTERM stops it
  admin <words> [key=value ...] [--flag[=value]]
                              run a vmq-admin command in the running node (api-key: in the key file);
                              admin --help lists the commands, admin <words> --help explains one
    --format=json             print the HTTP API's JSON answer instead of a table
    --http, --print-url       print the equal HTTP request and curl line instead of running it
  passwd [-c|-D] FILE USER    add, change (-c: create the file) or delete (-D) a vmq_passwd user

The data dir is --data-dir, else ${DATA_DIR_ENV}, else ./{DEFAULT_DATA_DIR}: give a second terminal the
same one as the node, or set {DATA_DIR_ENV} for both.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmqapi", description="Start a vmqapi node, or run vmq-admin commands: vmqapi [options] admin <words>",
        epilog=CLI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help=f"state directory (default ${DATA_DIR_ENV}, else ./{DEFAULT_DATA_DIR})")
    parser.add_argument("--config", help="a vernemq.conf-style file of key = value lines")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    parser.add_argument("--version", action="version", version=f"vmqapi {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    options, rest = split_global_options(sys.argv[1:] if argv is None else argv)
    if rest[:1] == ["admin"]:  # as vmq-admin takes them: admin --data-dir D cluster show, or after the words
        taken, words = take_global_options(rest[1:])
        options, rest = options + taken, ["admin", *words]
    ns = _parser().parse_args(options)
    try:
        base = {"data_dir": os.environ[DATA_DIR_ENV]} if os.environ.get(DATA_DIR_ENV) else None
        config = Config.from_sources(ns.config, ns.set, base)
        if ns.data_dir:
            config = config.with_values({"data_dir": ns.data_dir})
    except VmqError as exc:
        print(f"vmqapi: {exc.text}", file=sys.stderr)
        return 2
    if not rest:
        return run_node(config)
    if rest[0] == "admin":
        return admin(config, rest[1:])
    if rest[0] == "passwd":
        return passwd(rest[1:])
    print(f"vmqapi: unknown sub-command {rest[0]!r}; use 'admin <words>' or no sub-command to start a node",
          file=sys.stderr)
    return 2


def admin_main() -> None:
    """Entry point of the ``vmq-admin`` console script: ``vmq-admin [--data-dir D] <words> ...``."""
    tokens, n = sys.argv[1:], 0
    while n < len(tokens) and tokens[n].partition("=")[0] in GLOBAL_OPTIONS:  # only the node's own options
        n += 1 if "=" in tokens[n] else 2
    sys.exit(main([*tokens[:n], "admin", *tokens[n:]]))


def run_node(config: Config) -> int:
    """Start a node and serve until Ctrl-C, SIGTERM or ``node stop``."""
    logging.basicConfig(level=config["log.console.level"].upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # From here on Ctrl-C and SIGTERM only ask for a stop: a node half started is stopped in order.
    # Each signal that asked, and whether node.json was out by then: a signal sent once that file
    # appeared (by whoever waited for it) stops a node that served, even before start() returned here.
    asked: list[tuple[int, bool]] = []
    started: list[Node] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: asked.append((signum, bool(started) and started[0].announced)))
    node = Node(config)
    started.append(node)
    try:
        node.start()
    except VmqError as exc:
        print(f"vmqapi: {exc.text}", file=sys.stderr)
        return exc.exit_code
    if asked and not asked[0][1]:  # stopped before it served: 128 + the signal, as a shell shows it (130: Ctrl-C)
        node.stop()
        return 128 + asked[0][0]
    # One write: nodes started together into one file (a pasted script, PYTHONUNBUFFERED, where print writes
    # the text and its newline apart) must not cut each other's lines.
    sys.stdout.write("".join(f"{node.name} {x['type']} listener on {x['address']}:{x['port']}\n"
                             for x in node.listeners()))
    sys.stdout.flush()
    while not asked and not node.wait(0.2):
        pass
    node.stop()
    return 0


def passwd(tokens: Sequence[str]) -> int:
    """Manage a vmq_passwd file: ``passwd [-c|-D] FILE USER`` (password from the terminal or stdin)."""
    parser = argparse.ArgumentParser(prog="vmqapi passwd", description="Add, change or delete a user of a "
                                     "vmq_passwd file. The password is asked for, or read from standard input.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-c", action="store_true", help="create the file (refuses to overwrite one)")
    mode.add_argument("-D", action="store_true", help="delete the user")
    parser.add_argument("file")
    parser.add_argument("user")
    ns = parser.parse_args(tokens)
    if not ns.user or ":" in ns.user:
        parser.error("a user name must be non-empty and may not contain ':'")
    if ns.c and os.path.exists(ns.file):
        print(f"vmqapi passwd: {ns.file} exists; leave out -c to change it", file=sys.stderr)
        return 1
    try:
        users = {} if ns.c else parse_passwd(read_regular_file(ns.file, MAX_RULES_FILE, "the password file")[0]
                                             .decode("utf-8"))
    except FileNotFoundError:
        users = {}
    except (OSError, ValueError, FileRefused) as exc:
        print(f"vmqapi passwd: cannot read {ns.file}: {getattr(exc, 'text', exc)}", file=sys.stderr)
        return 2 if isinstance(exc, FileRefused) else 1
    if ns.D:
        if users.pop(ns.user, None) is None:
            print(f"vmqapi passwd: no user {ns.user!r} in {ns.file}", file=sys.stderr)
            return 1
    else:
        password = _read_password()
        if not password:
            print("vmqapi passwd: empty password, nothing changed", file=sys.stderr)
            return 1
        users[ns.user] = hash_password(password)
    write_file_atomically(ns.file, "".join(f"{u}:{h}\n" for u, h in users.items()).encode())
    return 0


def _read_password() -> str | None:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    import getpass
    first = getpass.getpass("Password: ")
    return first if first == getpass.getpass("Reenter password: ") else None


def _print(elements: Sequence, fmt: str, body: bytes | None = None) -> int:
    """Print a result; return 1 when it holds an alert, else 0."""
    if fmt == "json":
        sys.stdout.buffer.write(body if body is not None else render_json(elements))
        sys.stdout.flush()
    else:
        out, err = render_human(elements)
        sys.stdout.write(out)
        sys.stderr.write(err)
    return 1 if any(isinstance(e, Alert) for e in elements) else 0


def _print_error(exc: VmqError, fmt: str) -> int:
    if fmt == "json":
        print(json.dumps(exc.to_json(), separators=(",", ":")), file=sys.stderr)
    else:
        print(f"vmq-admin: {exc.text}", file=sys.stderr)
        if exc.usage:
            print("\n" + exc.usage, file=sys.stderr, end="")
    return exc.exit_code


def _http_address(config: Config) -> tuple[str, str, int]:
    """Return (scheme, host, port) of the node's admin API: its first HTTP listener, else HTTPS."""
    info = read_node_file(config["data_dir"]) or {}
    listeners = info.get("listeners", ())
    for kind in ("http", "https"):
        for x in listeners:
            if x.get("type") == kind:
                host = f"[{x['address']}]" if ":" in x["address"] else x["address"]
                return kind, host, x["port"]
    host, port = config.listeners("http")["default"]
    return "http", host, port


def admin(config: Config, tokens: Sequence[str]) -> int:
    """Run ``vmq-admin <words> [k=v] [--flag]``: local for api-key, else on the node."""
    teach = any(t in ("--http", "--print-url") for t in tokens)
    tokens = [t for t in tokens if t not in ("--http", "--print-url")]
    fmt = "json" if "--format=json" in tokens else "human"
    try:
        argv = parse_cli_tokens(tokens)
        asked = any(n in ("--help", "-h") for n, _ in argv.flags)
        if not argv.words:
            if any(n == "--version" for n, _ in argv.flags):
                print(f"vmqapi {__version__}")
                return 0
            print(CommandTable(CATALOGUE).usage(), end="", file=sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        if teach:
            return _teach(config, argv)
        try:
            call, wants_help = prepare(CommandTable(CATALOGUE), argv, None)
        except UnknownCommand:
            group = [c for c in CommandTable(CATALOGUE) if c.words[:len(argv.words)] == argv.words]
            if asked and group:  # a group such as "session": list its commands, as admin --help does
                print("".join(c.synopsis() + "\n" for c in group), end="")
                return 0
            _refuse_word_for_argument(argv.words)
            if read_node_file(config["data_dir"]) is None and starting_pid(config["data_dir"]) is None:
                raise
            return _remote(config, argv, fmt)  # the node may have commands an embedder registered
        if wants_help:
            return _print(execute(call, True), fmt)
        if call.command.local:
            return _run_local(config, call, fmt)
        if call.command.words == ("trace", "client") and "duration" not in call.flags:
            return _stream_trace(config, argv, fmt)
        return _remote(config, argv, fmt)
    except VmqError as exc:
        return _print_error(exc, fmt)


def _refuse_word_for_argument(words: tuple[str, ...]) -> None:
    """Raise HTTP's error for ``client-id`` written as a word after a whole command (no ``=``)."""
    commands = CommandTable(CATALOGUE).table()
    for n in range(len(words) - 1, 0, -1):
        cmd = commands.get(words[:n])
        if cmd is not None and cmd.key(words[n]) is not None:
            raise BadRequest(f"argument {words[n]!r} has no value (write {words[n]}=<value>)")


def _run_local(config: Config, call: Call, fmt: str) -> int:
    """Run an api-key command on the key file; say so when that makes a file no running node reads."""
    keystore = keystore_for(config)
    existed = os.path.exists(keystore.path)
    code = _print(execute(dataclasses.replace(call, node=LocalContext(config, keystore, config["nodename"]))), fmt)
    if not existed and os.path.exists(keystore.path) and read_node_file(config["data_dir"]) is None:
        folder = os.path.abspath(config["data_dir"])
        print(f"vmq-admin: made a new key file in {folder}, where no node runs now; a node started with "
              f"another data dir will not see this key (use --data-dir or ${DATA_DIR_ENV})", file=sys.stderr)
    return code


def _teach(config: Config, argv: Argv) -> int:
    """Print the HTTP request and curl line equal to ``argv`` instead of running it."""
    flags = tuple(f for f in argv.flags if f[0] != "--format")
    path, query = render_query(dataclasses.replace(argv, flags=flags))
    target = path + ("?" + query if query else "")
    scheme, host, port = _http_address(config)
    print(f"GET {target}")
    print(f'curl -u "$KEY:" "{scheme}://{host}:{port}{target}"')  # the README's name for the key
    return 0


def _stream_trace(config: Config, argv: Argv, fmt: str) -> int:
    """Print a client's trace until Ctrl-C, a second at a time, on one followed trace (no gaps)."""
    argv = dataclasses.replace(argv, flags=(*argv.flags, ("--duration", "1"), ("--follow", secrets.token_hex(8))))
    try:
        while True:
            code = _remote(config, argv, fmt)
            if code:
                return code
    except KeyboardInterrupt:
        return 0


def running_node(data_dir: str) -> dict | None:
    """Return the node.json of ``data_dir`` when its process is alive (not one a killed node left)."""
    info = read_node_file(data_dir)
    return info if info is not None and _pid_alive(info.get("pid")) else None


def find_node(data_dir: str) -> dict:
    """Return the node.json of the node running with ``data_dir``, waiting for one whose start is under way.

    Raise NodeNotRunning when there is none. node.json is written once every listener is bound,
    so the node it names answers (connections wait in the listen queue until it accepts them).
    """
    folder = os.path.abspath(data_dir)
    wait_for_start(folder, lambda: running_node(folder) is not None, lambda pid: print(
        f"vmq-admin: waiting for the node on {folder} to start (pid {pid}, at most {NODE_START_WAIT:g} s)...",
        file=sys.stderr, flush=True))
    info = read_node_file(folder)  # a dead pid's too: nothing answering there is said below
    if info is not None:
        return info
    pid = starting_pid(folder)
    if pid is not None:
        raise NodeNotRunning(f"the node on {folder} (pid {pid}) has not finished its start within "
                             f"{NODE_START_WAIT:g} s (no node.json yet); see its log")
    raise NodeNotRunning(f"no node is running with data dir {folder} "
                         "(no node.json); start one with: python vmqapi.py --data-dir DIR")


def _remote(config: Config, argv: Argv, fmt: str) -> int:
    """Run ``argv`` on the live node through its HTTP listener and node secret."""
    import urllib.request  # the CLI's alone: a node does without it (0.5 MB)
    info = find_node(config["data_dir"])
    scheme, host, port = _http_address(config)
    path, form = render_query(argv)
    request = urllib.request.Request(
        f"{scheme}://{host}:{port}{path}", data=form.encode("ascii"), method="POST",
        headers={"Content-Type": FORM_TYPE, "Accept": JSON_TYPE, SECRET_HEADER: str(info.get("secret", ""))})
    # The node's own listener, found through node.json: its certificate needs no check here.
    local_tls = tls_module()._create_unverified_context() if scheme == "https" else None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=local_tls))
    try:
        with opener.open(request, timeout=60) as resp:
            body, columns = resp.read(), resp.headers.get(COLUMNS_HEADER)
    except urllib.error.HTTPError as exc:
        return _remote_error(exc, fmt)
    except (urllib.error.URLError, OSError) as exc:
        raise NodeNotRunning(f"node.json names pid {info.get('pid')}, but nothing answers at {host}:{port} "
                             f"({getattr(exc, 'reason', exc)}); is the node running?") from None
    elements = elements_from_json(json.loads(body))
    if columns:  # an empty table still prints its header box, as vmq-admin does
        elements = [Table((), tuple(json.loads(columns))) if isinstance(e, Table) and not e.rows else e
                    for e in elements]
    return _print(elements, fmt, body)


def _remote_error(exc: urllib.error.HTTPError, fmt: str) -> int:
    body = exc.read()
    try:
        data = json.loads(body)
        error = VmqError(data["text"], data.get("usage"))
        error.code = data.get("error", "internal_error")
    except (ValueError, KeyError, TypeError):
        error = VmqError(f"the node answered HTTP {exc.code}")
    error.exit_code = 2 if exc.code == 400 else 1
    if fmt == "json":
        sys.stderr.buffer.write(body + b"\n")
        return error.exit_code
    return _print_error(error, fmt)


# -- Start-up ----------------------------------------------------------------
# Python compiles a script run directly (``python vmqapi.py``) on every start and never
# reads its .pyc; compiling this module leaves about 18 MB of the compiler's memory in the
# process (measured with bench/startup.py). The script therefore hands over, before the
# rest of the file runs (``_start_from_bytecode`` in the preamble: it must precede the
# imports it saves), to a fresh interpreter in the same process (os.execv keeps the pid,
# the arguments, the descriptors and the exit code) that runs this very file from its
# cached bytecode, as ``import vmqapi`` would. ``__spec__`` is None only in the script.
# SIGINT stays blocked through the exec (the new interpreter keeps the mask and a pending
# signal) until the stub can turn Ctrl-C into exit 130, as a shell reports a command that
# SIGINT stopped: no traceback however early the user gives up. What follows tidies up in
# the new interpreter, before main() runs.


def _free_compiler_memory() -> None:
    """Give the memory that compiling this file took back to the system (glibc's malloc_trim)."""
    import ctypes
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _show_script_in_cmdline() -> None:
    """Make ``ps`` show ``python .../vmqapi.py ARGS`` again instead of the stub's ``python -c ...`` (Linux).

    The kernel reads /proc/<pid>/cmdline from the process's own argument area; the stub's
    argv is longer than the one it stands for, so the script's fits there, padded with NULs.
    The area is written (through /proc/self/mem: no ctypes, which costs 0.4 MB of RSS) only
    where it holds exactly what /proc/self/cmdline says it holds.
    """
    with open("/proc/self/stat", "rb") as fh:
        fields = fh.read().rpartition(b")")[2].split()
    with open("/proc/self/cmdline", "rb") as fh:
        old = fh.read()
    start, end = int(fields[45]), int(fields[46])  # arg_start and arg_end, fields 48 and 49 of proc(5)
    stub = sys.orig_argv.index(_FROM_BYTECODE) - 2  # the hand-over's "-S", "-c" and the stub go
    if sys.orig_argv[stub] != "-S":
        return
    new = b"".join(os.fsencode(arg) + b"\0" for arg in [*sys.orig_argv[:stub], *sys.orig_argv[stub + 3:]])
    if not start or end - start != len(old) or len(new) > len(old):
        return
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        if mem.read(len(old)) == old:
            mem.seek(start)
            mem.write(new.ljust(len(old), b"\0"))


def settle_after_hand_over() -> None:
    """Handed over from the script (see Start-up): let ``ps`` show the script, free the compiler's memory."""
    if not (sys.platform.startswith("linux") and __spec__ is not None and __spec__.name == "__main__"
            and _FROM_BYTECODE in sys.orig_argv):
        return
    try:
        _show_script_in_cmdline()
    except (OSError, ValueError, IndexError):  # no /proc, an odd stat line: ps shows the stub
        pass
    # Handed over, but the loader compiled this file: no .pyc can be kept (PYTHONDONTWRITEBYTECODE, a
    # read-only folder), or the first start after the file changed wrote it. That compiler's memory is
    # free by now (left, it kept a node at 72 MB instead of 31 until it stopped).
    try:
        compiled = _compiled_here()
    except (OSError, ValueError, IndexError, StopIteration):
        compiled = True
    if compiled:
        _free_compiler_memory()


def _compiled_here() -> bool:
    """Whether this process compiled the file: it has no .pyc, one written since the process started, or
    one that does not match the file (stale, and not written again)."""
    try:
        written = os.stat(__spec__.cached or "").st_mtime
        with open(__spec__.cached, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return True
    with open("/proc/self/stat", "rb") as fh:
        ticks = int(fh.read().rpartition(b")")[2].split()[19])  # starttime, field 22 of proc(5)
    with open("/proc/stat", "rb") as fh:
        boot = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
    if written >= boot + ticks / os.sysconf("SC_CLK_TCK") - 1:  # btime is in whole seconds
        return True
    import importlib.util
    source = os.stat(__spec__.origin)
    flags = int.from_bytes(head[4:8], "little")  # the .pyc header of PEP 552
    if head[:4] != importlib.util.MAGIC_NUMBER or flags & ~3:
        return True
    if flags & 1:  # hash-based: used as it is unless checked against the source
        with open(__spec__.origin, "rb") as fh:
            return bool(flags & 2) and head[8:16] != importlib.util.source_hash(fh.read())
    return head[8:16] != ((int(source.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
                          + (source.st_size & 0xFFFFFFFF).to_bytes(4, "little"))


if __name__ == "__main__":
    settle_after_hand_over()
    sys.exit(main())
