"""Configuration: the settings table, files, --set, listener options."""

from __future__ import annotations

import pytest

import vmqapi
from vmqapi import Config


def test_defaults_and_parsing():
    config = Config({"max_client_id_size": "50", "allow_anonymous": "on", "listener.http.default": "[::1]:0"})
    assert config["max_client_id_size"] == 50 and config["allow_anonymous"] is True
    assert config["retry_interval"] == 20 and config["nodename"] == "vmqapi@127.0.0.1"
    assert config.listeners("http") == {"default": ("::1", 0)}
    assert config["http_module.vmq_http_mgmt_api.auth.mode"] == "apikey"
    assert config["http_module.vmq_status_http.auth.mode"] == "noauth"


def test_config_is_immutable():
    config = Config({})
    with pytest.raises(TypeError):
        config.values["nodename"] = "x"
    changed = config.with_values({"retry_interval": "5"})
    assert changed["retry_interval"] == 5 and config["retry_interval"] == 20


@pytest.mark.parametrize("key, value", [
    ("max_client_id_size", "0"), ("max_client_id_size", "x"), ("allow_anonymous", "yes"),
    ("listener.http.default", "localhost"), ("listener.http.default", "1.2.3:80"),
    ("listener.http.default", "127.0.0.1:70000"), ("shared_subscription_policy", "roundrobin"),
    ("persistent_client_expiration", "1q"),
])
def test_bad_values(key, value):
    with pytest.raises(vmqapi.InvalidValue):
        vmqapi.parse_setting(key, value)


@pytest.mark.parametrize("key", ["nope", "listener.tcp.x.y.z", "http_module.other.auth.mode", "listener.bogus.a"])
def test_unknown_keys(key):
    with pytest.raises(vmqapi.InvalidKey):
        vmqapi.find_setting(key)


def test_durations():
    assert vmqapi.parse_duration("never") is None
    assert vmqapi.parse_duration("1w") == 604800 and vmqapi.parse_duration("30") == 30


def test_listener_options_most_specific_wins():
    config = Config({"listener.max_connections": "10", "listener.http.max_connections": "20",
                     "listener.http.admin": "127.0.0.1:0", "listener.http.admin.max_connections": "infinity"})
    assert config.listener_option("http", "admin", "max_connections") is None
    assert config.listener_option("http", "default", "max_connections") == 20
    assert config.listeners("http") == {"default": ("127.0.0.1", 8888), "admin": ("127.0.0.1", 0)}


def test_file_and_set(tmp_path):
    conf = tmp_path / "v.conf"
    conf.write_text('# a comment\nnodename = "n@h"\nretry_interval = 30\n  \nmax_client_id_size=9\n')
    config = Config.from_sources(str(conf), ["retry_interval=40"])
    assert (config["nodename"], config["retry_interval"], config["max_client_id_size"]) == ("n@h", 40, 9)
    conf.write_text("retry_interval = 30\nretry_interval\n")
    with pytest.raises(vmqapi.ConfigError, match=r"v.conf:2: expected key = value"):
        Config.from_sources(str(conf))
    with pytest.raises(vmqapi.ConfigError, match="--set 'retry_interval=-1'"):
        Config.from_sources(None, ["retry_interval=-1"])
    with pytest.raises(vmqapi.ConfigError, match="cannot read"):
        Config.from_sources(str(tmp_path / "missing.conf"))


def test_every_settable_key_of_the_spec_exists():
    spec = ("allow_anonymous allow_publish_during_netsplit allow_subscribe_during_netsplit "
            "allow_register_during_netsplit allow_unsubscribe_during_netsplit retry_interval max_client_id_size "
            "max_inflight_messages max_online_messages max_offline_messages max_message_size max_message_rate "
            "persistent_client_expiration upgrade_outgoing_qos systree_enabled systree_interval "
            "shared_subscription_policy vmq_acl.acl_file vmq_acl.acl_reload_interval vmq_passwd.password_file "
            "vmq_passwd.password_reload_interval").split()
    for key in spec:
        assert vmqapi.find_setting(key).settable, key


def test_http_listeners_hold_a_thread_per_connection_so_their_default_cap_is_lower():
    config = vmqapi.Config({})
    assert config.listener_option("http", "default", "max_connections") == 1000
    assert config.listener_option("https", "admin", "max_connections") == 1000
    assert config.listener_option("tcp", "default", "max_connections") == 10000
    assert config["listener.http.default.max_connections"] == 1000  # what show prints is what applies
    explicit = vmqapi.Config({"listener.max_connections": "5000"})
    assert explicit.listener_option("http", "default", "max_connections") == 5000  # a key given wins
    assert vmqapi.Config({"listener.http.max_connections": "infinity"}).listener_option(
        "http", "default", "max_connections") is None


def test_the_waits_the_tests_lower_are_settings_with_the_shipped_defaults():
    """A test node stops in 10 ms, not 100, and a test cluster's join answers within a few tenths of a second,
    not about 2 s: by these settings, never by a different code path."""
    config = Config({})
    assert config["http_poll_interval"] == 100 and config["cluster_sync_interval"] == 1000
    assert Config({"http_poll_interval": "10", "cluster_sync_interval": "100"})["cluster_sync_interval"] == 100
    for key, value in (("http_poll_interval", "0"), ("http_poll_interval", "1001"),
                       ("cluster_sync_interval", "9"), ("cluster_sync_interval", "60001")):
        with pytest.raises(vmqapi.InvalidValue):
            vmqapi.parse_setting(key, value)
