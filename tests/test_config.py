"""Configuration: precedence, parsing, and the one-line errors."""

from __future__ import annotations

import pytest

from vllm_kvcache_plugin.config import KVCacheConfig, describe_keys, load_config
from vllm_kvcache_plugin.errors import ConfigError
from vllm_kvcache_plugin.serde.cachegen.bins import parse_bins_spec
from vllm_kvcache_plugin.settings import load_settings


def test_defaults():
    cfg = load_config(env={})
    assert cfg == KVCacheConfig()
    assert cfg.chunk_size == 256 and cfg.local_cpu is True and cfg.max_local_cpu_size == 5.0


def test_precedence_file_env_extra(tmp_path):
    conf = tmp_path / "conf.yaml"
    conf.write_text("chunk_size: 64\nlocal_cpu: False\nmax_local_cpu_size: 1.5\nremote_serde: naive\n")
    env = {"LMCACHE_CONFIG_FILE": str(conf), "LMCACHE_CHUNK_SIZE": "32"}
    cfg = load_config(env=env)
    assert cfg.chunk_size == 32  # env beats file
    assert cfg.local_cpu is False and cfg.max_local_cpu_size == 1.5  # file beats defaults
    cfg = load_config({"chunk_size": 16, "lmcache.max_local_cpu_size": "2"}, env=env)
    assert cfg.chunk_size == 16 and cfg.max_local_cpu_size == 2.0  # extra config beats env and file


@pytest.mark.parametrize("raw,value", [("True", True), ("true", True), ("1", True), ("False", False),
                                       ("false", False), ("0", False), ("yes", True), ("off", False)])
def test_booleans_as_lmcache_users_write_them(raw, value):
    assert load_config(env={"LMCACHE_LOCAL_CPU": raw}).local_cpu is value


def test_seed_environment_is_accepted():
    env = {"LMCACHE_USE_EXPERIMENTAL": "True", "LMCACHE_TRACK_USAGE": "false", "LMCACHE_CHUNK_SIZE": "16",
           "LMCACHE_LOCAL_CPU": "False", "LMCACHE_MAX_LOCAL_CPU_SIZE": "5.0",
           "LMCACHE_REMOTE_URL": "mooncakestore://localhost:50051/", "LMCACHE_REMOTE_SERDE": "cachegen"}
    cfg = load_config(env=env)
    assert (cfg.chunk_size, cfg.local_cpu, cfg.remote_url, cfg.remote_serde) == (
        16, False, "mooncakestore://localhost:50051/", "cachegen")


def _error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    msg = str(info.value)
    assert "\n" not in msg, "config errors must be one line"
    return msg


def test_unknown_key_names_key_source_and_suggestion(tmp_path):
    msg = _error(env={"LMCACHE_CHUNK_SIZ": "16"})
    assert "LMCACHE_CHUNK_SIZ" in msg and "environment" in msg and "did you mean 'chunk_size'" in msg
    conf = tmp_path / "c.yaml"
    conf.write_text("remote_ulr: redis://x:1\n")
    msg = _error(env={"LMCACHE_CONFIG_FILE": str(conf)})
    assert "remote_ulr" in msg and str(conf) in msg and "did you mean 'remote_url'" in msg


@pytest.mark.parametrize("env,needles", [
    ({"LMCACHE_CHUNK_SIZE": "abc"}, ["chunk_size", "LMCACHE_CHUNK_SIZE", "integer"]),
    ({"LMCACHE_CHUNK_SIZE": "0"}, ["chunk_size", "positive"]),
    ({"LMCACHE_CHUNK_SIZE": "-16"}, ["chunk_size", "positive"]),
    ({"LMCACHE_MAX_LOCAL_CPU_SIZE": "-1"}, ["max_local_cpu_size", ">= 0"]),
    ({"LMCACHE_LOCAL_CPU": "maybe"}, ["local_cpu", "true/false"]),
    ({"LMCACHE_REMOTE_URL": "nope://h:1"}, ["remote_url", "unknown scheme 'nope'", "redis"]),
    ({"LMCACHE_REMOTE_URL": "redis://h:99999"}, ["remote_url", "99999"]),
    ({"LMCACHE_REMOTE_URL": "localhost:6379"}, ["remote_url", "no scheme"]),
    ({"LMCACHE_REMOTE_SERDE": "zip"}, ["remote_serde", "naive", "cachegen"]),
    ({"LMCACHE_LOG_LEVEL": "LOUD"}, ["log_level", "DEBUG"]),
    ({"LMCACHE_BLOCKING_TIMEOUT_SECS": "0"}, ["blocking_timeout_secs"]),
    ({"LMCACHE_BLOCKING_TIMEOUT_SECS": "inf"}, ["blocking_timeout_secs", "finite"]),
    ({"LMCACHE_BLOCKING_TIMEOUT_SECS": "nan"}, ["blocking_timeout_secs", "finite"]),
    ({"LMCACHE_MAX_LOCAL_CPU_SIZE": "1e999"}, ["max_local_cpu_size", "finite"]),
    ({"LMCACHE_MIN_LOAD_GB_PER_SEC": "0"}, ["min_load_gb_per_sec", "> 0"]),
    ({"LMCACHE_PUT_QUEUE_MAX_GB": "-1"}, ["put_queue_max_gb", "> 0"]),
    ({"LMCACHE_CACHEGEN_KEY_BINS": "32:x"}, ["cachegen_key_bins", "BINS[:LAYERS]"]),
    ({"LMCACHE_THREAD_CPUS": "0-x"}, ["thread_cpus", "LMCACHE_THREAD_CPUS", "'0-x'", "0-3,8", "inherit"]),
    ({"LMCACHE_THREAD_CPUS": "3-1"}, ["thread_cpus", "empty range"]),
    ({"LMCACHE_THREAD_CPUS": "4096"}, ["thread_cpus", "CPU 4096 does not exist"]),
])
def test_every_bad_value_gets_one_line(env, needles):
    msg = _error(env=env)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_bad_yaml_and_missing_file(tmp_path):
    assert "does not exist" in _error(env={"LMCACHE_CONFIG_FILE": str(tmp_path / "missing.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: [1\n")
    assert "not valid YAML" in _error(env={"LMCACHE_CONFIG_FILE": str(bad)})
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    assert "mapping" in _error(env={"LMCACHE_CONFIG_FILE": str(lst)})


def test_extra_config_errors_name_their_source():
    msg = _error(extra_config={"chunk_size": "big"}, env={})
    assert "kv_connector_extra_config" in msg


def test_local_disk_accepts_file_url():
    assert load_config(env={"LMCACHE_LOCAL_DISK": "file:///tmp/kv"}).local_disk_path == "/tmp/kv"
    assert load_config(env={"LMCACHE_LOCAL_DISK": "/tmp/kv"}).local_disk_path == "/tmp/kv"


def test_bins_spec():
    assert parse_bins_spec("32:10,16") == [(32, 10), (16, None)]
    with pytest.raises(ValueError):
        parse_bins_spec("32,16:3")


def test_every_key_is_documented():
    rows = describe_keys()
    assert {r[0] for r in rows} == set(KVCacheConfig.__dataclass_fields__)
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]
