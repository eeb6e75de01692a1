"""End to end on vLLM's CPU build with our lm:// server as the store (float32, no hot cache)."""

from __future__ import annotations

import asyncio

import pytest

from testbed.lm_server import LMServerProcess
from testbed.processes import free_port
from tests.e2e_scenario import *  # noqa: F403 - the shared scenario's tests run against this backend
from tests.e2e_scenario import Backend
from vllm_kvcache_plugin.connectors import create_connector


def _call(url: str, method: str, *args):
    async def run():
        connector = create_connector(url)
        try:
            return await getattr(connector, method)(*args)
        finally:
            await connector.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def backend():
    server = LMServerProcess(free_port(), ("--max-size-gb", "2")).start()
    value = _call(server.url, "get", "missing-key")
    assert value is None
    yield Backend(
        name="lm",
        env={"LMCACHE_REMOTE_URL": server.url, "LMCACHE_LOCAL_CPU": "False", "LMCACHE_BLOCKING_TIMEOUT_SECS": "1"},
        list_keys=lambda: sorted(_call(server.url, "list", "vllm@")),
        read_value=lambda key: (lambda v: bytes(v) if v is not None else None)(_call(server.url, "get", key)),
        break_store=server.kill,
    )
    server.stop()
