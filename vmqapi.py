"""vmqapi: VerneMQ's admin surface in one dependency-free Python module.

vmqapi serves VerneMQ's HTTP admin API (``GET /api/v1/<command words>?k=v&--flag``)
and its ``vmq-admin`` command set from one command table, with API keys kept in a
JSON file, so that scripts, dashboards and curl lines written for VerneMQ keep
working. It runs on Python 3.10+ with the standard library only.

Quick start, a node::

    python vmqapi.py                      # HTTP on 127.0.0.1:8888, state in ./vmqapi-data
    python vmqapi.py admin api-key create # prints a new key
    curl "http://KEY@127.0.0.1:8888/api/v1/cluster/show"

Quick start, embedded::

    import vmqapi
    with vmqapi.Node({"listener.http.default": "127.0.0.1:0"}) as node:
        print(node.listeners())

Contents (``grep -nE '^# [0-9]+\\. ' vmqapi.py`` prints them with line numbers):

    0. Preamble
    1. Errors
    2. Configuration: the settings table and the frozen Config
    3. Metrics registry
    4. Key store: the API key file
    5. Command machinery: argv grammar, command table, result elements
    6. Command catalogue
    7. HTTP: request -> response, then the socket server
    8. Node
    9. CLI
"""

###############################################################################
# 0. Preamble #################################################################
###############################################################################
# Owns: the public names, the version, imports and named constants.
# Must not know: anything that runs.

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import string
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

try:  # POSIX advisory locks; Windows falls back to msvcrt below.
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

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
KEY_FILE = "api_keys.json"
DEFAULT_DATA_DIR = "vmqapi-data"
KEY_ALPHABET = string.ascii_letters + string.digits  # VerneMQ: [A-Za-z0-9]
DEFAULT_KEY_LENGTH = 32  # VerneMQ vmq_auth_apikey: max(32, min_apikey_length)
HASHED_PREFIX_LENGTH = 6  # SPEC 4: hashed keys show their first 6 characters
SCOPES = ("mgmt", "mgmt_ro", "status", "metrics", "health")  # SPEC 4
MAX_HTTP_BODY = 64 * 1024  # a form body holds a command's arguments, nothing more
MAX_HTTP_HEADERS = 100  # http.client's own limit, answered with 431
SECRET_HEADER = "x-vmqapi-node-secret"  # the CLI's credential, from node.json
REALM = 'Basic realm="VerneMQ"'  # SPEC 3 (VerneMQ 1.x form; 2.x sends a malformed one)
ALLOW = "GET, OPTIONS, HEAD, POST"
CORS_HEADERS = (  # VerneMQ vmq_http_mgmt_api:options/2
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "HEAD, GET"),
    ("Access-Control-Allow-Headers", "content-type, authorization"),
    ("Access-Control-Max-Age", "1728000"),
)
PATH_ALIASES = {  # SPEC 2 (VerneMQ maps "cluster" to the removed "cluster status")
    "sessions": ("session", "show"),
    "listeners": ("listener", "show"),
    "plugins": ("plugin", "show"),
    "cluster": ("cluster", "show"),
}
STATUS_KEYS = (  # SPEC 5, node status; VerneMQ vmq_info:node_status/0
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
        """Return the JSON error body of SPEC section 3."""
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
    """A request body larger than MAX_HTTP_BODY."""

    http_status, code = 413, "payload_too_large"


class UriTooLong(VmqError):
    """A request line longer than max_request_line_length."""

    http_status, code = 414, "uri_too_long"


class HeaderTooLarge(VmqError):
    """A header value longer than max_header_value_length, or too many headers."""

    http_status, code = 431, "header_too_large"


class NotImplementedMethod(VmqError):
    """A method HTTP does not define for this API."""

    http_status, code = 501, "not_implemented"


class ConfigError(VmqError):
    """A configuration the node cannot start with; the text names file and line."""

    code = "config_error"


class KeyStoreError(VmqError):
    """The API key file is unreadable or corrupt; it is left untouched."""

    code = "key_store_error"


class NodeNotRunning(VmqError):
    """The CLI found no live node in the data dir."""

    code = "node_not_running"


class KeyRejected(Exception):
    """A key store change refused for a reason the user can fix (becomes an alert)."""

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


def render_value(value: Any) -> str:
    """Render a parsed setting back into its vernemq.conf form."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    if value is None:
        return "undefined"
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(value)


@dataclass(frozen=True, slots=True)
class Setting:
    """One config key: how to parse it, its default, whether ``set`` may change it."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    settable: bool = False

    def __post_init__(self):
        if not re.fullmatch(r"[a-z0-9_.$]+", self.name):
            raise ValueError(f"bad setting name {self.name!r}")


HTTP_MODULES = ("vmq_http_mgmt_api", "vmq_status_http", "vmq_metrics_http", "vmq_health_http")
LISTENER_TYPES = ("http",)  # grows with the broker: tcp, ssl, ws, wss, https

_S = Setting
SETTINGS: tuple[Setting, ...] = (
    _S("nodename", parse_text, "vmqapi@127.0.0.1", "The node's name, shown by cluster show and in metrics."),
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
    _S("http_cors_allow_origin", parse_text, "*", "Access-Control-Allow-Origin sent with /status.json."),
    _S("http_module.$module.auth.mode", parse_choice("apikey", "noauth"), None,
       "apikey or noauth for one HTTP module (vmq_http_mgmt_api defaults to apikey, others to noauth)."),
    _S("listener.$type.$name", parse_address, None, "Address (ip:port) of a listener; port 0 binds any free port."),
    _S("listener.max_connections", parse_max_connections, 10000,
       "Connections a listener accepts at once (integer or infinity)."),
    _S("listener.max_request_line_length", parse_int_range(64, 1 << 20), 8000,
       "Longest HTTP request line, in bytes; longer ones get 414."),
    _S("listener.max_header_value_length", parse_int_range(64, 1 << 20), 4096,
       "Longest HTTP header value, in bytes; longer ones get 431."),
    # SPEC 5: the keys set/show/describe work on at run time.
    _S("allow_anonymous", parse_flag, None,
       "Let clients connect without credentials. Unset: on while every MQTT listener is on loopback.",
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
    _S("max_message_size", parse_int_range(0, 268435455), 0, "Largest accepted PUBLISH in bytes (0: no limit).", True),
    _S("max_message_rate", parse_int_range(0), 0, "PUBLISHes per second accepted from one client (0: no limit).", True),
    _S("persistent_client_expiration", parse_duration, None,
       "How long an offline persistent session is kept (never, or a duration such as 1w).", True),
    _S("upgrade_outgoing_qos", parse_flag, False, "Deliver at the subscription's QoS even when published lower.", True),
    _S("systree_enabled", parse_flag, True, "Publish the $SYS tree.", True),
    _S("systree_interval", parse_int_range(0), 20000, "Milliseconds between $SYS publications (0: off).", True),
    _S("shared_subscription_policy", parse_choice("prefer_local", "local_only", "random"), "prefer_local",
       "How a shared subscription picks its member.", True),
    _S("mqtt_connect_timeout", parse_int_range(1), 30000, "Milliseconds a new MQTT connection has to send CONNECT.",
       True),
    _S("vmq_acl.acl_file", parse_text, "", "ACL file of vmq_acl (empty: none).", True),
    _S("vmq_acl.acl_reload_interval", parse_int_range(0), 10, "Seconds between ACL file reloads (0: never).", True),
    _S("vmq_passwd.password_file", parse_text, "", "Password file of vmq_passwd (empty: none).", True),
    _S("vmq_passwd.password_reload_interval", parse_int_range(0), 10,
       "Seconds between password file reloads (0: never).", True),
)
del _S

_SETTINGS_BY_NAME = types.MappingProxyType({s.name: s for s in SETTINGS})
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
        if parts[-1] in LISTENER_OPTIONS:
            return _SETTINGS_BY_NAME["listener." + parts[-1]]
        if len(parts) == 3 and re.fullmatch(r"[A-Za-z0-9_-]+", parts[2]):
            return _SETTINGS_BY_NAME["listener.$type.$name"]
    if len(parts) == 4 and parts[0] == "http_module" and parts[1] in HTTP_MODULES \
            and parts[2:] == ["auth", "mode"]:
        return _SETTINGS_BY_NAME["http_module.$module.auth.mode"]
    raise InvalidKey(f"unknown configuration key {key!r}")


def parse_setting(key: str, text: str) -> Any:
    """Parse ``text`` as the value of ``key``; raise InvalidKey or InvalidValue."""
    setting = find_setting(key)
    try:
        return setting.parse(text)
    except ValueError as exc:
        raise InvalidValue(f"bad value for {key}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Config:
    """The node's configuration: explicit values over the table's defaults.

    Immutable: ``set`` makes a new Config (``with_values``) and the node swaps it in.
    """

    values: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        checked = {}
        for key, value in dict(self.values).items():
            checked[key] = parse_setting(key, value) if isinstance(value, str) else value
            find_setting(key)
        object.__setattr__(self, "values", types.MappingProxyType(checked))

    def __getitem__(self, key: str) -> Any:
        if key in self.values:
            return self.values[key]
        setting = find_setting(key)
        if key == "http_module.vmq_http_mgmt_api.auth.mode":
            return "apikey"  # VerneMQ schema: only the management API defaults to apikey
        if setting.name == "http_module.$module.auth.mode":
            return "noauth"
        return setting.default

    def with_values(self, changes: Mapping[str, Any]) -> Config:
        """Return a Config with ``changes`` (strings are parsed) applied."""
        return Config({**self.values, **changes})

    def listeners(self, kind: str) -> dict[str, tuple[str, int]]:
        """Return name -> (host, port) for every listener of ``kind`` (``http``, ...)."""
        found = {}
        if kind == "http":
            found["default"] = ("127.0.0.1", 8888)  # VerneMQ include_default "default"
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
        return self[f"listener.{option}"]

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


def _read_config_file(path: str) -> dict[str, Any]:
    """Read ``key = value`` lines with ``#`` comments; report errors by file and line."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
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


###############################################################################
# 3. Metrics registry #########################################################
###############################################################################
# Owns: counters and gauges by VerneMQ name and labels, and their descriptions.
# Must not know: who increments them, how they are rendered on the wire.

METRIC_DEFINITIONS = {  # name -> (type, description); VerneMQ vmq_metrics.hrl
    "socket_open": ("counter", "The number of times an MQTT socket has been opened."),
    "socket_close": ("counter", "The number of times an MQTT socket has been closed."),
    "mqtt_publish_received": ("counter", "The number of PUBLISH packets received."),
    "mqtt_publish_sent": ("counter", "The number of PUBLISH packets sent."),
    "queue_message_in": ("counter", "The number of messages that entered a queue."),
    "queue_message_out": ("counter", "The number of messages that left a queue."),
    "queue_message_drop": ("counter", "The number of messages dropped from queues."),
    "queue_message_unhandled": ("counter", "The number of messages no queue took."),
    "router_matches_local": ("counter", "The number of local subscriptions a publish matched."),
    "router_matches_remote": ("counter", "The number of remote subscriptions a publish matched."),
    "http_api_auth_failed": ("counter", "The number of HTTP requests refused for a missing or bad API key."),
    "active_mqtt_connections": ("gauge", "The number of open MQTT connections."),
    "queue_processes": ("gauge", "The number of session queues, online and offline."),
    "router_subscriptions": ("gauge", "The number of subscriptions in the routing table."),
    "retain_messages": ("gauge", "The number of retained messages."),
}


class Metrics:
    """Counters and gauges keyed by (name, labels), safe to bump from any thread.

    Gauges that are a view of live state register a function instead of being
    set, so they cannot drift from what they measure.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._gauge_fns: dict[str, Callable[[], int]] = {}

    def incr(self, name: str, amount: int = 1, **labels: str) -> None:
        """Add ``amount`` to a counter."""
        key = (name, tuple(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def gauge(self, name: str, fn: Callable[[], int]) -> None:
        """Make gauge ``name`` read ``fn()`` whenever it is looked at."""
        with self._lock:
            self._gauge_fns[name] = fn

    def value(self, name: str) -> int:
        """Return the value of ``name`` summed over all its labels."""
        with self._lock:
            fn = self._gauge_fns.get(name)
            if fn is None:
                return sum(v for (n, _), v in self._values.items() if n == name)
        return int(fn())

    def reset(self) -> None:
        """Zero every counter (gauges follow their source)."""
        with self._lock:
            self._values.clear()


###############################################################################
# 4. Key store: the API key file ##############################################
###############################################################################
# Owns: api_keys.json (atomic writes, inter-process lock, reload on change),
#       key generation, expiry parsing, constant-time authentication.
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
    """One entry of api_keys.json; ``key`` is None when only its hash is kept."""

    scope: str
    expires: int | None
    digest: str
    key: str | None = None
    prefix: str = ""

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}")
        if self.expires is not None and (type(self.expires) is not int):
            raise ValueError("expires must be an integer or null")
        if not re.fullmatch(r"[0-9a-f]{64}", self.digest):
            raise ValueError("bad digest")

    def shown(self) -> str:
        """Return the key as api-key show prints it."""
        return self.key if self.key is not None else self.prefix + "\u2026"

    def to_json(self) -> dict:
        """Return the entry as stored on disk."""
        if self.key is not None:
            return {"key": self.key, "scope": self.scope, "expires": self.expires}
        return {"hash": self.digest, "prefix": self.prefix, "scope": self.scope, "expires": self.expires}


def _key_digest(salt: bytes, key: str) -> str:
    return hmac.new(salt, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


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


class KeyStore:
    """API keys in one JSON file, shared by a running node and the CLI.

    Every change takes the file lock, re-reads the file, applies itself and
    writes atomically. Readers stat the file on each check and reload when it
    changed, so a key the CLI adds or deletes counts on the next request.
    Keys are looked up by an HMAC of the key under the file's salt, so the
    lookup compares digests, never the secret itself.
    """

    def __init__(self, path: str, *, storage: str = "plain", min_length: int = 0,
                 max_expiry_days: int | None = None, clock: Callable[[], float] = time.time):
        self.path = path
        self.storage = storage
        self.min_length = min_length
        self.max_expiry_days = max_expiry_days
        self._clock = clock
        self._lock = threading.Lock()
        self._signature: tuple | None = ("unread",)
        self._salt = b""
        self._entries: tuple[StoredKey, ...] = ()
        self._index: dict[tuple[str, str], StoredKey] = {}

    # -- reading ----------------------------------------------------------
    def load(self) -> None:
        """Read the file now; raise KeyStoreError if it is corrupt or unreadable."""
        with self._lock:
            self._install(*self._read())

    def _read(self) -> tuple[tuple | None, bytes, tuple[StoredKey, ...]]:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except FileNotFoundError:
            return None, b"", ()
        except OSError as exc:
            raise KeyStoreError(f"cannot read the API key file {self.path}: {exc.strerror}") from None
        salt, entries = self._parse(data)
        return (st.st_ino, st.st_size, st.st_mtime_ns), salt, entries

    def _parse(self, data: bytes) -> tuple[bytes, tuple[StoredKey, ...]]:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
                raise ValueError('expected an object with a "keys" list')
            salt = bytes.fromhex(doc.get("salt", ""))
            entries = tuple(self._parse_entry(salt, item) for item in doc["keys"])
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
        return StoredKey(item["scope"], expires, item["hash"], prefix=str(item.get("prefix", "")))

    def _install(self, signature, salt, entries) -> None:
        self._signature, self._salt, self._entries = signature, salt, entries
        self._index = {(e.scope, e.digest): e for e in entries}

    def _refresh(self) -> None:
        """Reload if the file changed on disk (caller holds ``_lock``)."""
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        if signature != self._signature:
            self._install(*self._read())

    def authenticate(self, key: str, scopes: Iterable[str]) -> str | None:
        """Return the first of ``scopes`` for which ``key`` is valid now, or None."""
        with self._lock:
            self._refresh()
            digest = _key_digest(self._salt, key)
            now = self._clock()
            for scope in scopes:
                entry = self._index.get((scope, digest))
                if entry is not None and hmac.compare_digest(entry.digest, digest) \
                        and (entry.expires is None or now < entry.expires):
                    return scope
        return None

    def entries(self) -> tuple[StoredKey, ...]:
        """Return the stored keys, oldest first, as on disk now."""
        with self._lock:
            self._refresh()
            return self._entries

    # -- changing ---------------------------------------------------------
    def _mutate(self, change: Callable[[bytes, list[StoredKey]], Any]) -> Any:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        with self._lock, _file_lock(self.path):
            _, salt, entries = self._read()
            salt = salt or secrets.token_bytes(16)
            entries = list(entries)
            result = change(salt, entries)
            doc = {"version": 1, "salt": salt.hex(), "keys": [e.to_json() for e in entries]}
            write_file_atomically(self.path, json.dumps(doc, indent=1).encode() + b"\n")
            st = os.stat(self.path)
            self._install((st.st_ino, st.st_size, st.st_mtime_ns), salt, tuple(entries))
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
            if any(e.scope == scope and e.digest == digest for e in entries):
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
            digest = _key_digest(salt, key)
            keep = [e for e in entries if not (e.scope == scope and e.digest == digest)]
            if len(keep) == len(entries):
                raise KeyRejected("key_not_found")
            entries[:] = keep
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
    Argument keys always take one.
    """

    name: str
    parse: Callable[[str], Any] = str
    short: str = ""
    doc: str = ""
    value: str = "required"

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
    """One vmq-admin command: its words, parameters, usage and handler."""

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

    def __post_init__(self):
        if not self.words or not all(_NAME_RE.fullmatch(w) for w in self.words):
            raise ValueError(f"bad command words {self.words!r}")
        names = {k.name for k in self.keys}
        if not set(self.required) <= names:
            raise ValueError(f"required keys not declared: {set(self.required) - names}")

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


@dataclass(frozen=True, slots=True)
class Call:
    """A command bound to its arguments, ready to run against ``node``."""

    command: Command
    node: Any
    args: Mapping[str, Any]
    flags: Mapping[str, Any]
    extra: tuple[str, ...] = ()
    after: list = field(default_factory=list)  # run once the answer has been sent


class CommandTable:
    """The commands one node serves: CLI, HTTP and --help all read this table."""

    def __init__(self, commands: Iterable[Command] = ()):
        self._lock = threading.Lock()
        self._commands: dict[tuple[str, ...], Command] = {}
        for cmd in commands:
            self.add(cmd)

    def add(self, command: Command) -> Command:
        """Add (or replace) ``command``."""
        with self._lock:
            self._commands[command.words] = command
        return command

    def register(self, words: Sequence[str], fn: Callable[[Call], Any], *, keys: Iterable[Any] = (),
                 flags: Iterable[Any] = (), usage: str | None = None, required: Iterable[str] = (),
                 read_only: bool = False) -> Command:
        """Add a command from an embedding program; it then exists in CLI, HTTP and --help.

        ``keys`` and ``flags`` are names, ``(name, parser)`` pairs or Params;
        ``fn(call)`` returns a string, an element, or a list of elements.
        """
        return self.add(Command(tuple(words), fn, keys=_params(keys, False), flags=_params(flags, True),
                                required=tuple(required), doc=usage or fn.__doc__ or "",
                                read_only=read_only))

    def __iter__(self):
        with self._lock:
            return iter(sorted(self._commands.values(), key=lambda c: c.words))

    def resolve(self, words: Sequence[str]) -> tuple[Command, tuple[str, ...]]:
        """Return the command with the longest matching prefix and the words left over."""
        words = tuple(words)
        with self._lock:
            for n in range(len(words), 0, -1):
                cmd = self._commands.get(words[:n])
                if cmd is not None and (n == len(words) or cmd.extra_words):
                    return cmd, words[n:]
            below = sorted({c.words[len(words)] for c in self._commands.values()
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
    """Translate path words and a query string into an Argv (SPEC section 2).

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


def bind(command: Command, argv: Argv, extra: tuple[str, ...], node: Any) -> tuple[Call, bool]:
    """Check ``argv`` against ``command``; return the Call and whether --help was asked."""
    try:
        return _bind(command, argv, extra, node)
    except BadRequest as exc:
        exc.usage = exc.usage or command.usage()
        raise


def _bind(command: Command, argv: Argv, extra: tuple[str, ...], node: Any) -> tuple[Call, bool]:
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


def prepare(table: CommandTable, argv: Argv, node: Any) -> tuple[Call, bool]:
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
        rows = tuple(dict(r) for r in self.rows)
        for row in rows:
            for key, value in row.items():
                if not isinstance(key, str) or not isinstance(value, _CELL_TYPES):
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


def render_json(elements: Sequence) -> bytes:
    """Frame elements as VerneMQ does: one -> the object; else an array and a newline."""
    if len(elements) == 1:
        return json.dumps(elements[0].to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    body = json.dumps([e.to_json() for e in elements], separators=(",", ":"), ensure_ascii=False)
    return (body + "\n").encode()


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
            out.append(e.text if e.text.endswith("\n") else e.text + "\n")
    return "".join(out), "".join(err)


###############################################################################
# 6. Command catalogue ########################################################
###############################################################################
# Owns: one cmd_<words> function per vmq-admin command; its docstring is its usage.
# Must not know: sockets, HTTP, how the answer is rendered.

_catalogue: list[Command] = []  # filled by @command below, frozen into CATALOGUE


def command(*words: str, keys: Iterable[Param] = (), flags: Iterable[Param] = (), required: Iterable[str] = (),
            read_only: bool = False, local: bool = False, extra_words: str = "", open_keys: bool = False):
    """Declare a catalogue command; the decorated function is its handler."""
    def register(fn: Callable[[Call], Any]) -> Callable[[Call], Any]:
        _catalogue.append(Command(tuple(words), fn, tuple(keys), tuple(flags), tuple(required), fn.__doc__ or "",
                                  read_only, local, extra_words, open_keys))
        return fn
    return register


def parse_positive_int(text: str) -> int:
    """Parse an integer >= 1."""
    return parse_int_range(1)(text)


def parse_regex_or_text(text: str) -> str:
    """Accept a filter value; ``~regex`` must compile."""
    if text.startswith("~"):
        try:
            re.compile(text[1:])
        except re.error as exc:
            raise ValueError(f"bad regular expression: {exc}") from None
    return text


_SCOPE = Param("scope", doc="mgmt (default), mgmt_ro, status, metrics or health")
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


@command("api-key", "show", keys=(Param("scope", doc="a scope, or all (default)"),), read_only=True, local=True)
def cmd_api_key_show(call: Call) -> Any:
    """List the API keys with their scope and expiry, oldest first."""
    columns = ("Key", "Scope", "Expires (UTC)", "has expired")
    return _key_change(lambda: Table(tuple(call.node.keystore.rows(call.args.get("scope", "all"))), columns))


@command("cluster", "show", read_only=True)
def cmd_cluster_show(call: Call) -> Any:
    """Show the nodes of the cluster and whether they run."""
    return Table(({"Node": call.node.name, "Running": True},))


_STANDALONE = "this node runs standalone: vmqapi has no clustering yet, so {} did nothing"


@command("cluster", "join", keys=(Param("discovery-node", doc="a node of the cluster to join"),),
         required=("discovery-node",))
def cmd_cluster_join(call: Call) -> Any:
    """Join the cluster that the discovery node belongs to."""
    return alert(_STANDALONE.format("cluster join"))


@command("cluster", "leave", keys=(Param("node", doc="the node to take out of the cluster"),), required=("node",),
         flags=(Param("kill_sessions", short="k", value="none", doc="tear down and migrate sessions"),
                Param("summary-interval", parse_positive_int, short="i", doc="seconds between progress reports"),
                Param("timeout", parse_positive_int, short="t", doc="seconds to wait for the leave")))
def cmd_cluster_leave(call: Call) -> Any:
    """Take a node out of the cluster."""
    return alert(_STANDALONE.format("cluster leave"))


@command("node", "status", read_only=True)
def cmd_node_status(call: Call) -> Any:
    """Show the node's counters: sessions, messages, queues, subscriptions."""
    status = call.node.status()
    return Table(tuple({"Status": k, "Value": status[k]} for k in STATUS_KEYS))


@command("node", "stop")
def cmd_node_stop(call: Call) -> Any:
    """Stop the node cleanly once this answer has been sent."""
    call.after.append(call.node.request_stop)
    return "Done"


@command("listener", "show", read_only=True,
         flags=(Param("tls", short="t", value="none", doc="add the TLS columns"),
                Param("mqtt", short="m", value="none", doc="add the MQTT columns")))
def cmd_listener_show(call: Call) -> Any:
    """Show the listeners: type, status, address, port and connections."""
    return Table(tuple(call.node.listener_rows(tls="tls" in call.flags, mqtt="mqtt" in call.flags)))


SESSION_FIELDS = (  # SPEC 5; VerneMQ vmq_info:fields_config/0
    "node", "mountpoint", "client_id", "queue_pid", "queue_size", "session_pid", "is_offline", "is_online",
    "statename", "deliver_mode", "offline_messages", "online_messages", "num_sessions", "clean_session",
    "is_plugin", "queue_started_at", "user", "peer_host", "peer_port", "protocol", "waiting_acks",
    "session_started_at", "topic", "qos", "rap", "no_local", "msg_ref", "msg_qos", "routing_key", "dup", "payload",
)
SUBSCRIPTION_FIELDS = ("topic", "qos", "rap", "no_local")
MESSAGE_FIELDS = ("msg_ref", "msg_qos", "routing_key", "dup", "payload")
SESSION_DEFAULT_COLUMNS = ("client_id", "is_online", "mountpoint", "peer_host", "peer_port", "user")


def _expand(record: Mapping[str, Any], fields: set[str]) -> list[dict]:
    """One row per subscription and/or queued message when their fields are used."""
    rows = [dict(record)]
    for group, items in ((SUBSCRIPTION_FIELDS, "subscriptions"), (MESSAGE_FIELDS, "messages")):
        if fields & set(group):
            rows = [{**row, **item} for row in rows for item in record.get(items, ())]
    return rows


def _matches(row: Mapping[str, Any], filters: Mapping[str, str]) -> bool:
    for name, wanted in filters.items():
        shown = _cell(row.get(name)) if row.get(name) is not None else "null"
        if wanted.startswith("~"):
            if not re.search(wanted[1:], shown):
                return False
        elif shown != wanted:
            return False
    return True


def session_table(records: Iterable[Mapping[str, Any]], flags: Mapping[str, Any]) -> Table:
    """Select, filter, expand, order and page session records as session show does.

    ``--field`` selects a column, ``--field=v`` filters (``~regex`` by regular
    expression); filters AND; rows come ordered by (mountpoint, client_id) and
    their keys alphabetically.
    """
    selected = [f for f in SESSION_FIELDS if f in flags and flags[f] is None] or list(SESSION_DEFAULT_COLUMNS)
    filters = {f: flags[f] for f in SESSION_FIELDS if flags.get(f) is not None}
    used = set(selected) | set(filters)
    ordered = sorted(records, key=lambda r: (r.get("mountpoint", ""), r.get("client_id", "")))
    rows = [row for rec in ordered for row in _expand(rec, used) if _matches(row, filters)]
    offset, limit = flags.get("offset") or 0, flags.get("limit") or 100
    columns = tuple(sorted(selected))
    return Table(tuple({c: row.get(c) for c in columns} for row in rows[offset:offset + limit]), columns)


@command("session", "show", read_only=True, flags=(
    Param("limit", parse_positive_int, doc="rows to return at most (default 100)"),
    Param("rowtimeout", parse_positive_int, doc="milliseconds to wait for a row (default 100)"),
    Param("offset", parse_int_range(0), doc="rows to skip first, for paging"),
    *(Param(f, parse_regex_or_text, value="optional", doc="select; =value or =~regex filters")
      for f in SESSION_FIELDS)))
def cmd_session_show(call: Call) -> Any:
    """Show sessions; --field selects a column, --field=value filters (=~regex too)."""
    wanted = call.flags.get("client_id")
    lookup = wanted if wanted is not None and not wanted.startswith("~") else None
    return session_table(call.node.session_records(client_id=lookup), call.flags)


_MOUNTPOINT = Param("mountpoint", short="m", doc="the session's mountpoint (default none)")


@command("session", "disconnect", keys=(Param("client-id", doc="the client to disconnect"),),
         required=("client-id",),
         flags=(_MOUNTPOINT, Param("cleanup", short="c", value="none", doc="also remove the session and its queue")))
def cmd_session_disconnect(call: Call) -> Any:
    """Disconnect a client; with --cleanup also delete its session."""
    call.node.disconnect_session(call.args["client-id"], call.flags.get("mountpoint") or "", "cleanup" in call.flags)
    return "Done"


@command("plugin", "show", read_only=True, flags=(
    Param("plugin", doc="show only this plugin"), Param("hook", doc="show only plugins with this hook"),
    Param("internal", value="none", doc="show internal hooks too")))
def cmd_plugin_show(call: Call) -> Any:
    """Show the enabled plugins and the hooks they register."""
    rows = [r for r in call.node.plugin_rows(internal="internal" in call.flags)
            if call.flags.get("plugin") in (None, r["Plugin"])
            and (call.flags.get("hook") is None or call.flags["hook"] in r["Hook(s)"].split("\n"))]
    return Table(tuple(rows), ("Plugin", "Type", "Hook(s)", "M:F/A"))


_NODE_FLAGS = (Param("node", short="n", doc="the node to act on (this node)"),
               Param("all", short="a", value="none", doc="act on every node of the cluster"))


def _check_node_flags(call: Call) -> None:
    if "node" in call.flags and "all" in call.flags:
        raise BadRequest("--node and --all exclude each other", call.command.usage())
    if call.flags.get("node") not in (None, call.node.name):
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
    call.node.apply_settings(changes)
    return []


def _shown_setting(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else render_value(value)


@command("show", extra_words="key", read_only=True, flags=_NODE_FLAGS)
def cmd_show(call: Call) -> Any:
    """Show the current value of settings: show <key> [<key> ...]."""
    _check_node_flags(call)
    if not call.extra:
        raise MissingArgument("show needs at least one setting name", call.command.usage())
    config = call.node.config
    row = {"node": call.node.name}
    for key in call.extra:
        row[key] = _shown_setting(config[key])
    return Table((row,))


@command("describe", extra_words="key", read_only=True)
def cmd_describe(call: Call) -> Any:
    """Describe settings: describe <key> [<key> ...]."""
    if not call.extra:
        raise MissingArgument("describe needs at least one setting name", call.command.usage())
    return [Text(f"{key}:\n  {find_setting(key).doc}\n") for key in call.extra]


CATALOGUE: tuple[Command, ...] = tuple(_catalogue)
del _catalogue


###############################################################################
# 7. HTTP: request -> response, then the socket server ########################
###############################################################################
# Owns: the admin API's rules (method, auth, command, OPTIONS, Accept, run) as a
#       pure function, and a thin ThreadingHTTPServer with limits and timeouts.
# Must not know: MQTT internals, the key file's format.

HTTP_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST"})
REFUSED_METHODS = frozenset({"PUT", "PATCH", "DELETE"})  # known to HTTP, refused with 405
JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request as read off the wire; header names are lower case."""

    method: str
    target: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP response; ``after`` runs once it has been sent."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    after: tuple[Callable[[], Any], ...] = ()


def error_response(exc: VmqError, extra: Iterable[tuple[str, str]] = ()) -> Response:
    """Return the JSON error answer of SPEC section 3 for ``exc``."""
    headers = [("Content-Type", JSON_TYPE), *extra]
    if exc.http_status == 401:
        headers.append(("WWW-Authenticate", REALM))
    if exc.http_status == 405:
        headers.append(("Allow", ALLOW))
    body = json.dumps(exc.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    return Response(exc.http_status, tuple(headers), body)


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
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadRequest("malformed Authorization header: the credentials are not base64 of UTF-8") from None
    if ":" not in decoded:
        raise BadRequest("malformed Authorization header: the credentials have no ':'")
    key = decoded.partition(":")[0]
    if not key:
        raise Unauthorized("the Authorization header carries an empty key")
    return key


def authenticate(node: Any, module: str, headers: Mapping[str, str], scopes: Sequence[str]) -> str:
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


def request_argv(req: Request, path_words: tuple[str, ...], query: str) -> Argv:
    """Build the Argv from path words, query string and (for POST) a form body."""
    if req.method == "POST" and req.body:
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != FORM_TYPE:
            raise BadRequest(f"a POST body must be {FORM_TYPE}")
        try:
            form = req.body.decode("ascii")
        except UnicodeDecodeError:
            raise BadRequest("a form body must be percent-encoded ASCII") from None
        query = f"{query}&{form}" if query else form
    return parse_query(apply_alias(path_words), query)


def serve_api(node: Any, req: Request, rest: str, query: str) -> Response:
    """Answer /api/v1: method, auth, command, OPTIONS, Accept, run (SPEC section 3)."""
    if req.method in REFUSED_METHODS:
        raise MethodNotAllowed(f"{req.method} is not allowed; use GET, HEAD, POST or OPTIONS")
    if req.method not in HTTP_METHODS:
        raise NotImplementedMethod(f"method {req.method} is not implemented")
    scope = authenticate(node, "vmq_http_mgmt_api", req.headers, ("mgmt", "mgmt_ro"))
    argv = request_argv(req, parse_path_words(rest), query)
    call, wants_help = prepare(node.commands, argv, node)
    if scope == "mgmt_ro" and not call.command.read_only and not wants_help:
        raise Forbidden(f"a mgmt_ro key may not run {' '.join(call.command.words)}, which changes the node")
    if req.method == "OPTIONS":
        return Response(200, CORS_HEADERS)
    if not accepts_json(req.headers.get("accept")):
        raise NotAcceptable("this API answers application/json only")
    body = render_json(execute(call, wants_help))
    return Response(200, (("Content-Type", JSON_TYPE),), body, tuple(call.after))


def route(path: str) -> tuple[Callable[..., Response], str]:
    """Return the endpoint serving ``path`` and the rest of the path after its prefix."""
    for prefix, endpoint in ROUTES:
        if path == prefix or path.startswith(prefix + "/"):
            return endpoint, path[len(prefix) + 1:]
    raise NotFound(f"no endpoint at {path}")


ROUTES: tuple[tuple[str, Callable[..., Response]], ...] = (("/api/v1", serve_api),)


def handle_http(node: Any, req: Request) -> Response:
    """Answer one request; every VmqError becomes its JSON error, any other one a logged 500."""
    try:
        path, _, query = req.target.partition("?")
        endpoint, rest = route(path)
        return endpoint(node, req, rest, query)
    except VmqError as exc:
        return error_response(exc)
    except Exception:
        log.exception("internal error answering %s %s", req.method, redact(req.target))
        return error_response(VmqError("the command crashed; the node logged the error and keeps serving"))


_SECRET_ARG = re.compile(r"(?i)((?:^|[?&])(?:--)?key=)[^&]*")


def redact(target: str) -> str:
    """Hide the value of every ``key=`` argument, for logs."""
    return _SECRET_ARG.sub(r"\1***", target)


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that counts, limits and times out its connections."""

    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 turns 16 clients into a 300 ms p99

    def __init__(self, address: tuple[str, int], node: Any, listener: HttpListener):
        self.node, self.listener = node, listener
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float | None] = {}
        self._closing = threading.Event()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def verify_request(self, request, client_address) -> bool:
        limit = self.listener.option("max_connections")
        with self._lock:
            return limit is None or len(self._deadlines) < limit

    def process_request(self, request, client_address) -> None:
        with self._lock:
            self._deadlines[request] = None
            self.listener.all_conns += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._deadlines.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        log.exception("error serving %s", client_address[0])

    def active(self) -> int:
        """Return the number of open connections."""
        with self._lock:
            return len(self._deadlines)

    def arm(self, conn: socket.socket) -> None:
        """Give ``conn`` http_request_timeout seconds to deliver a whole request."""
        deadline = time.monotonic() + self.node.config["http_request_timeout"]
        with self._lock:
            if conn in self._deadlines:
                self._deadlines[conn] = deadline

    def disarm(self, conn: socket.socket) -> None:
        """The request is in; no deadline while it is answered."""
        with self._lock:
            if conn in self._deadlines:
                self._deadlines[conn] = None

    def reap(self) -> None:
        """Cut connections past their deadline, until the server closes."""
        while not self._closing.wait(0.2):
            self._cut(time.monotonic())

    def _cut(self, now: float | None) -> None:
        with self._lock:
            late = [c for c, d in self._deadlines.items() if now is None or (d is not None and d < now)]
        for conn in late:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close_all(self) -> None:
        """Stop reaping and cut every open connection."""
        self._closing.set()
        self._cut(None)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Reads a request within the limits, calls handle_http, writes the answer at once."""

    protocol_version = "HTTP/1.1"
    server_version = "vmqapi/" + __version__
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        # One write per response plus no Nagle: no 40 ms delayed-ACK stall.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self) -> None:
        srv = self.server
        self.command = self.path = self.requestline = ""
        srv.arm(self.connection)
        limit = srv.listener.option("max_request_line_length")
        try:
            line = self.rfile.readline(limit + 3)
        except OSError:
            line = b""
        if not line:
            self.close_connection = True
            return
        if len(line.rstrip(b"\r\n")) > limit:
            self.close_connection = True
            self._send(error_response(UriTooLong(f"request line longer than {limit} bytes")))
            return
        self.raw_requestline = line
        if not self.parse_request():
            return
        try:
            request = self._read_request()
        except VmqError as exc:
            self.close_connection = True
            self._send(error_response(exc))
            return
        except OSError:
            self.close_connection = True
            return
        srv.disarm(self.connection)
        response = handle_http(srv.node, request)
        self._send(response)
        for fn in response.after:
            fn()

    def _read_request(self) -> Request:
        limit = self.server.listener.option("max_header_value_length")
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            if len(value) > limit:
                raise HeaderTooLarge(f"header {name} is longer than {limit} bytes")
            headers.setdefault(name.lower(), value)
        if "transfer-encoding" in headers:
            raise BadRequest("send a Content-Length body; Transfer-Encoding is not accepted")
        length_text = headers.get("content-length", "0").strip()
        if not length_text.isdigit():
            raise BadRequest("bad Content-Length")
        length = int(length_text)
        if length > MAX_HTTP_BODY:
            raise PayloadTooLarge(f"a request body may hold {MAX_HTTP_BODY} bytes at most")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            raise BadRequest("the body is shorter than Content-Length")
        return Request(self.command, self.path, headers, body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer parse-level failures of BaseHTTPRequestHandler with our JSON body."""
        exc = VmqError(message or explain or http.HTTPStatus(code).phrase)
        exc.http_status = code
        exc.code = {414: "uri_too_long", 431: "header_too_large", 501: "not_implemented"}.get(code, "bad_request")
        self.close_connection = True
        self._send(error_response(exc))

    def _send(self, resp: Response) -> None:
        head = self.command == "HEAD"
        status = http.HTTPStatus(resp.status)
        lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Server: {self.server_version}",
                 f"Date: {self.date_time_string()}"]
        lines += [f"{k}: {v}" for k, v in resp.headers]
        lines.append(f"Content-Length: {len(resp.body)}")
        if self.close_connection:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else resp.body)
        try:
            self.wfile.write(data)
        except OSError:
            self.close_connection = True
        log.info('%s "%s %s" %d %d', self.client_address[0], self.command or "-", redact(self.path or "-"),
                 resp.status, len(resp.body))

    def log_message(self, format: str, *args: Any) -> None:
        log.info("http: " + format, *args)


class HttpListener:
    """One HTTP listener of the node: its server, serving thread and reaper thread."""

    kind = "http"

    def __init__(self, node: Any, name: str, address: tuple[str, int]):
        self.node, self.name = node, name
        self.all_conns = 0
        self.status = "running"
        self.server = _Server(address, node, self)
        self.address = self.server.server_address[0]
        self.port = self.server.server_address[1]
        self._threads = [threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                          name=f"vmqapi-http-{name}", daemon=True),
                         threading.Thread(target=self.server.reap, name=f"vmqapi-reap-{name}", daemon=True)]

    def option(self, name: str) -> Any:
        """Return a listener option, the most specific config key winning."""
        return self.node.config.listener_option(self.kind, self.name, name)

    def start(self) -> None:
        """Start serving."""
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop serving, cut every connection and close the socket."""
        if self._threads[0].is_alive():
            self.server.shutdown()
        self.server.close_all()
        self.server.server_close()
        for t in self._threads:
            if t.is_alive():
                t.join(5)
        self.status = "stopped"

    def row(self, tls: bool = False, mqtt: bool = False) -> dict:
        """Return this listener's row of listener show."""
        limit = self.option("max_connections")
        row = {"type": self.kind, "status": self.status, "address": self.address, "port": str(self.port),
               "mountpoint": "", "max_conns": "infinity" if limit is None else limit,
               "active_conns": self.server.active(), "all_conns": self.all_conns}
        if tls:
            row.update(dict.fromkeys(("tls_version", "certfile", "cafile", "keyfile", "require_certificate",
                                      "use_identity_as_username", "psk_support", "pskfile"), ""))
        if mqtt:
            row.update(allowed_protocol_versions="", allow_anonymous_override="")
        return row


###############################################################################
# 8. Node #####################################################################
###############################################################################
# Owns: the running node: its config snapshot, key store, command table,
#       listeners, node.json, start and stop.
# Must not know: argv.


def keystore_for(config: Config, clock: Callable[[], float] = time.time) -> KeyStore:
    """Return the KeyStore the config describes (in its data dir)."""
    return KeyStore(os.path.join(config["data_dir"], KEY_FILE), storage=config["api_key_storage"],
                    min_length=config["min_apikey_length"], max_expiry_days=config["max_apikey_expiry_days"],
                    clock=clock)


def read_node_file(data_dir: str) -> dict | None:
    """Return the node.json of ``data_dir``, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(data_dir, NODE_FILE), encoding="utf-8") as fh:
            info = json.load(fh)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Node:
    """A vmqapi node: ``Node(config).start()`` ... ``.stop()``, or ``with Node(config) as node``.

    ``config`` is a Config or a mapping of config keys to values (strings are
    parsed as in vernemq.conf). ``node.commands.register(...)`` adds commands.
    """

    def __init__(self, config: Config | Mapping[str, Any] | None = None):
        self._lock = threading.Lock()
        self._config = config if isinstance(config, Config) else Config(dict(config or {}))
        self.name: str = self._config["nodename"]
        self.data_dir = os.path.abspath(self._config["data_dir"])
        self.secret = secrets.token_urlsafe(32)
        self.metrics = Metrics()
        self.commands = CommandTable(CATALOGUE)
        self.keystore = keystore_for(self._config)
        self.started_at = time.time()
        self._listeners: list[HttpListener] = []
        self._stopped = threading.Event()
        self._running = False

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
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        other = read_node_file(self.data_dir)
        if other and other.get("pid") != os.getpid() and _pid_alive(other.get("pid")):
            raise ConfigError(f"another node (pid {other['pid']}) runs with data dir {self.data_dir}")
        self.keystore.load()
        self._provision()
        try:
            for name, address in sorted(self._config.listeners("http").items()):
                listener = HttpListener(self, name, address)
                self._listeners.append(listener)
                listener.start()
        except OSError as exc:
            self._close_listeners()
            raise ConfigError(f"cannot bind listener.http.{name} on {render_value(address)}: {exc.strerror}") \
                from None
        self._write_node_file()
        self._running = True
        self._stopped.clear()
        log.info("node %s started: %s", self.name,
                 ", ".join(f"{x['type']} {x['address']}:{x['port']}" for x in self.listeners()))
        return self

    def _provision(self) -> None:
        env = os.environ.get("VMQAPI_API_KEYS", "")
        added = self.keystore.provision(env.split(","), "VMQAPI_API_KEYS") if env.strip() else 0
        path = self._config["api_key_bootstrap_file"]
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    lines = fh.read().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read api_key_bootstrap_file {path}: {exc.strerror}") from None
            added += self.keystore.provision(lines, path)
        if added:
            log.info("provisioned %d API key(s)", added)  # never the keys themselves

    def _write_node_file(self) -> None:
        info = {"node": self.name, "pid": os.getpid(), "secret": self.secret, "listeners": self.listeners()}
        write_file_atomically(os.path.join(self.data_dir, NODE_FILE), json.dumps(info, indent=1).encode())

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.stop()
        self._listeners = []

    def stop(self) -> None:
        """Stop every listener and remove node.json; safe to call twice."""
        with self._lock:
            listeners, self._listeners = self._listeners, []
            was_running, self._running = self._running, False
        for listener in listeners:
            listener.stop()
        if was_running:
            path = os.path.join(self.data_dir, NODE_FILE)
            info = read_node_file(self.data_dir)
            if info and info.get("secret") == self.secret:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            log.info("node %s stopped", self.name)
        self._stopped.set()

    def request_stop(self) -> None:
        """Stop from another thread (node stop answers first, then this runs)."""
        threading.Thread(target=self.stop, name="vmqapi-stop", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the node has stopped; return whether it has."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- what the commands read -------------------------------------------
    def listeners(self) -> list[dict]:
        """Return type, address and port of each listener, as node.json lists them."""
        return [{"type": x.kind, "address": x.address, "port": x.port} for x in self._listeners]

    def listener_rows(self, tls: bool = False, mqtt: bool = False) -> list[dict]:
        """Return the rows of listener show."""
        return [x.row(tls, mqtt) for x in self._listeners]

    def status(self) -> dict[str, Any]:
        """Return node status's values, read from the metrics registry."""
        m = self.metrics.value
        online = m("active_mqtt_connections")
        return {"num_online": online, "num_offline": max(0, m("queue_processes") - online),
                "msg_in": m("mqtt_publish_received"), "msg_out": m("mqtt_publish_sent"),
                "queue_in": m("queue_message_in"), "queue_out": m("queue_message_out"),
                "queue_drop": m("queue_message_drop"), "queue_unhandled": m("queue_message_unhandled"),
                "num_subscriptions": m("router_subscriptions"), "num_retained": m("retain_messages"),
                "matches_local": m("router_matches_local"), "matches_remote": m("router_matches_remote"),
                "version": __version__}

    def session_records(self, client_id: str | None = None) -> list[dict]:
        """Return session records for session show (none: this node has no MQTT broker yet)."""
        return []

    def disconnect_session(self, client_id: str, mountpoint: str = "", cleanup: bool = False) -> bool:
        """Disconnect a client; return whether one was found (none: no MQTT broker yet)."""
        return False

    def plugin_rows(self, internal: bool = False) -> list[dict]:
        """Return the rows of plugin show (none: no plugins are loaded yet)."""
        return []


###############################################################################
# 9. CLI ######################################################################
###############################################################################
# Owns: argv of the process: start a node, or run vmq-admin commands locally or
#       against the live node found through node.json.
# Must not know: how commands work inside.

GLOBAL_OPTIONS = ("--data-dir", "--config", "--set")


@dataclass(frozen=True, slots=True)
class LocalContext:
    """What a local command (api-key) sees when it runs in the CLI process."""

    config: Config
    keystore: KeyStore
    name: str


def split_global_options(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv into the global options and the rest (sub-command and its words)."""
    tokens = list(tokens)
    n = 0
    while n < len(tokens) and tokens[n].startswith("-"):
        option = tokens[n].partition("=")[0]
        n += 2 if option in GLOBAL_OPTIONS and "=" not in tokens[n] else 1
    return tokens[:n], tokens[n:]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmqapi", description="Start a vmqapi node, or run vmq-admin commands: vmqapi [options] admin <words>")
    parser.add_argument("--data-dir", help=f"state directory (default ./{DEFAULT_DATA_DIR})")
    parser.add_argument("--config", help="a vernemq.conf-style file of key = value lines")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    parser.add_argument("--version", action="version", version=f"vmqapi {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    options, rest = split_global_options(sys.argv[1:] if argv is None else argv)
    ns = _parser().parse_args(options)
    try:
        config = Config.from_sources(ns.config, ns.set)
        if ns.data_dir:
            config = config.with_values({"data_dir": ns.data_dir})
    except VmqError as exc:
        print(f"vmqapi: {exc.text}", file=sys.stderr)
        return 2
    if not rest:
        return run_node(config)
    if rest[0] == "admin":
        return admin(config, rest[1:])
    print(f"vmqapi: unknown sub-command {rest[0]!r}; use 'admin <words>' or no sub-command to start a node",
          file=sys.stderr)
    return 2


def admin_main() -> None:
    """Entry point of the ``vmq-admin`` console script."""
    options, rest = split_global_options(sys.argv[1:])
    sys.exit(main([*options, "admin", *rest]))


def run_node(config: Config) -> int:
    """Start a node and serve until Ctrl-C, SIGTERM or ``node stop``."""
    logging.basicConfig(level=config["log.console.level"].upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = Node(config)
    try:
        node.start()
    except VmqError as exc:
        print(f"vmqapi: {exc.text}", file=sys.stderr)
        return 1
    for x in node.listeners():
        print(f"{node.name} {x['type']} listener on {x['address']}:{x['port']}", flush=True)
    interrupted = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: interrupted.set())
    while not interrupted.is_set() and not node.wait(0.2):
        pass
    node.stop()
    return 0


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


def _http_address(config: Config) -> tuple[str, int]:
    info = read_node_file(config["data_dir"]) or {}
    for x in info.get("listeners", ()):
        if x.get("type") == "http":
            return x["address"], x["port"]
    return config.listeners("http")["default"]


def admin(config: Config, tokens: Sequence[str]) -> int:
    """Run ``vmq-admin <words> [k=v] [--flag]``: local for api-key, else on the node."""
    teach = any(t in ("--http", "--print-url") for t in tokens)
    tokens = [t for t in tokens if t not in ("--http", "--print-url")]
    fmt = "json" if "--format=json" in tokens else "human"
    try:
        argv = parse_cli_tokens(tokens)
        if not argv.words:
            asked = any(n in ("--help", "-h") for n, _ in argv.flags)
            print(CommandTable(CATALOGUE).usage(), end="", file=sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        if teach:
            return _teach(config, argv)
        try:
            call, wants_help = prepare(CommandTable(CATALOGUE), argv, None)
        except UnknownCommand:
            if read_node_file(config["data_dir"]) is None:
                raise
            return _remote(config, argv, fmt)  # the node may have commands an embedder registered
        if wants_help:
            return _print(execute(call, True), fmt)
        if call.command.local:
            context = LocalContext(config, keystore_for(config), config["nodename"])
            call = dataclasses.replace(call, node=context)
            return _print(execute(call), fmt)
        return _remote(config, argv, fmt)
    except VmqError as exc:
        return _print_error(exc, fmt)


def _teach(config: Config, argv: Argv) -> int:
    """Print the HTTP request and curl line equal to ``argv`` instead of running it."""
    flags = tuple(f for f in argv.flags if f[0] != "--format")
    path, query = render_query(dataclasses.replace(argv, flags=flags))
    target = path + ("?" + query if query else "")
    host, port = _http_address(config)
    host = f"[{host}]" if ":" in host else host
    print(f"GET {target}")
    print(f'curl -u "$VMQAPI_KEY:" "http://{host}:{port}{target}"')
    return 0


def _remote(config: Config, argv: Argv, fmt: str) -> int:
    """Run ``argv`` on the live node through its HTTP listener and node secret."""
    info = read_node_file(config["data_dir"])
    if info is None:
        raise NodeNotRunning(f"no node is running with data dir {os.path.abspath(config['data_dir'])} "
                             "(no node.json); start one with: python vmqapi.py --data-dir DIR")
    host, port = _http_address(config)
    host = f"[{host}]" if ":" in host else host
    path, form = render_query(argv)
    request = urllib.request.Request(
        f"http://{host}:{port}{path}", data=form.encode("ascii"), method="POST",
        headers={"Content-Type": FORM_TYPE, "Accept": JSON_TYPE, SECRET_HEADER: str(info.get("secret", ""))})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        return _remote_error(exc, fmt)
    except (urllib.error.URLError, OSError) as exc:
        raise NodeNotRunning(f"node.json names pid {info.get('pid')}, but nothing answers at {host}:{port} "
                             f"({getattr(exc, 'reason', exc)}); is the node running?") from None
    return _print(elements_from_json(json.loads(body)), fmt, body)


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


if __name__ == "__main__":
    sys.exit(main())
