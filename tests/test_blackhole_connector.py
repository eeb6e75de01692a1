"""``blackhole://``: every write is dropped, every read misses, nothing ever fails."""

from __future__ import annotations

import asyncio
import os

import pytest

from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.connectors.blackhole import BlackholeConnector


def test_writes_vanish_and_reads_miss() -> None:
    conn = create_connector("blackhole://")
    assert isinstance(conn, BlackholeConnector)
    value = os.urandom(2 * 30 * 16 * 3 * 64 * 2)

    async def body():
        await conn.connect()
        assert await conn.ping() is True
        await conn.put("k", value)
        await conn.batched_put([("k", value), ("j", memoryview(value))])
        assert await conn.exists("k") is False
        assert await conn.get("k") is None
        assert await conn.batched_exists(["k", "j", "x"]) == [False, False, False]
        assert await conn.batched_get(["k", "j"]) == [None, None]
        assert await conn.delete("k") is False
        assert await conn.list() == [] and await conn.list("k") == []
        await conn.close()

    asyncio.run(body())


@pytest.mark.parametrize("url", ["blackhole://", "blackhole://anything/at/all?x=1"])
def test_any_blackhole_url_builds(url: str) -> None:
    assert isinstance(create_connector(url), BlackholeConnector)
