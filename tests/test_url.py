"""Remote URL parsing: the seed's forms, clear errors, no secrets in logs."""

from __future__ import annotations

import pytest

from vllm_kvcache_plugin.connectors import create_connector, parse_remote_url
from vllm_kvcache_plugin.errors import URLError


def test_seed_forms():
    u = parse_remote_url("redis-sentinel://localhost:26379,localhost:26380,localhost:26381/mymaster")
    assert u.scheme == "redis-sentinel" and u.hosts == (("localhost", 26379), ("localhost", 26380),
                                                        ("localhost", 26381))
    assert u.path == "/mymaster"
    u = parse_remote_url("mooncakestore://localhost:50051/?device=mlx5_0")
    assert (u.host, u.port, u.device) == ("localhost", 50051, "mlx5_0")
    u = parse_remote_url("blackhole://host:0/")
    assert (u.host, u.port) == ("host", 0)
    assert parse_remote_url("fs:///mnt/kv").path == "/mnt/kv" and parse_remote_url("fs:///mnt/kv").hosts == ()
    assert parse_remote_url("redis://[::1]:6379/2").hosts == (("::1", 6379),)


def test_credentials_and_redaction():
    u = parse_remote_url("redis://alice:s3cr%40t@h:1/0?password=pw2&sentinel_password=pw3&db=1")
    assert (u.username, u.password) == ("alice", "s3cr@t")
    shown = u.redacted()
    for secret in ("s3cr", "pw2", "pw3"):
        assert secret not in shown and secret not in repr(u)
    assert "db=1" in shown
    assert "zq9" not in parse_remote_url("lm://h:1?token=zq9").redacted()


@pytest.mark.parametrize("url,needle", [
    ("", "empty"), ("localhost:6379", "no scheme"), ("redis://h:x", "not a number"),
    ("redis://h:70000", "0..65535"), ("redis://a:1,,b:2", "empty entry"), ("redis://[::1:6379", "unclosed"),
])
def test_parse_errors_name_the_problem(url, needle):
    with pytest.raises(URLError, match=needle):
        parse_remote_url(url)


def test_unknown_scheme_lists_known_ones():
    with pytest.raises(URLError) as info:
        create_connector("ftp://h:1")
    assert "ftp" in str(info.value) and "redis-sentinel" in str(info.value) and "mooncakestore" in str(info.value)
