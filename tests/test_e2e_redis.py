"""End to end on vLLM's CPU build with redis:// as the store (float32, no hot cache)."""

from __future__ import annotations

import pytest

from testbed.redis_servers import start_redis
from tests.e2e_scenario import *  # noqa: F403 - the shared scenario's tests run against this backend
from tests.e2e_scenario import Backend


@pytest.fixture(scope="module")
def backend():
    server = start_redis("redis-e2e")
    client = server.client()
    yield Backend(
        name="redis",
        env={"LMCACHE_REMOTE_URL": server.url, "LMCACHE_LOCAL_CPU": "False", "LMCACHE_BLOCKING_TIMEOUT_SECS": "1"},
        list_keys=lambda: sorted(k.decode() for k in client.scan_iter(match="vllm@*")),
        read_value=lambda key: client.get(key),
        break_store=server.stop,
    )
    server.stop()
