"""``batched_get_into`` of the redis-family connectors (connectors/redis_reader.py) against real
servers: values received into the caller's buffers byte-exact over every transport, misses, values
too big for their buffer, error replies, a cluster's nodes and moved slots, and a server that
freezes in the middle of a value (the call ends in time and never writes into a buffer later)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import redis
import torch
from redis._parsers.hiredis import _HiredisParser
from redis._parsers.resp2 import _RESP2Parser

from testbed.processes import wait_for
from testbed.redis_servers import start_redis, start_redis_cluster, start_sentinel_set
from tests.proxy import DelayProxy
from vllm_kvcache_plugin.config import KVCacheConfig, load_config
from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.connectors import redis as redis_connector
from vllm_kvcache_plugin.connectors.redis_reader import CallState, parser_holds_data, receive
from vllm_kvcache_plugin.connectors.redis_wire import PACKER
from vllm_kvcache_plugin.errors import ConnectorError
from vllm_kvcache_plugin.memory import ChunkMeta, KVFormat
from vllm_kvcache_plugin.storage import StorageManager

CHUNK_256 = 2 * 30 * 256 * 3 * 64 * 2  # 5,898,240 bytes
SIZES = [0, 1, 100, 65536, 368640, 1_500_000, CHUNK_256]
FILL = 0xA5

TARGETS = [("fresh_redis", "url"), ("fresh_redis", "unix_url"), ("fresh_redis_tls", "url"),
           ("fresh_redis_sentinel", "url"), ("fresh_redis_cluster", "url")]
TARGET_IDS = ["redis", "unix", "rediss", "sentinel", "cluster"]


def key(i: int) -> str:
    return f"vllm@/models/SmolLM2-135M/@1@0@{i:064x}"


def buffers(count: int, size: int) -> list[np.ndarray]:
    return [np.full(size, FILL, dtype=np.uint8) for _ in range(count)]


def run_with(url: str, body, config: KVCacheConfig | None = None):
    async def main():
        conn = create_connector(url, config)
        await conn.connect()
        try:
            return await body(conn)
        finally:
            await conn.close()

    return asyncio.run(main())


@pytest.fixture(params=TARGETS, ids=TARGET_IDS)
def target_url(request) -> str:
    fixture, attr = request.param
    return getattr(request.getfixturevalue(fixture), attr)


@pytest.mark.timeout(120)
def test_values_land_in_the_buffers_byte_exact(target_url: str) -> None:
    values = {key(i): os.urandom(size) for i, size in enumerate(SIZES)}
    keys = [*values, key(999)]  # the last one is a miss

    async def body(conn):
        assert conn.supports_get_into
        await conn.batched_put(list(values.items()))
        outs = buffers(len(keys), CHUNK_256 + 7)
        lengths = await conn.batched_get_into(keys, outs)
        assert lengths == [*SIZES, None]
        for k, out, n in zip(keys, outs, lengths, strict=True):
            if n is not None:
                assert out[:n].tobytes() == values[k], f"{n}-byte value changed on the way"
            assert (out[n or 0 :] == FILL).all(), "bytes past the value were written"
        assert await conn.batched_get_into([], []) == []
        one = bytearray(1)  # bytearray and memoryview buffers too
        assert await conn.batched_get_into([key(1)], [memoryview(one)]) == [1] and bytes(one) == values[key(1)]
        assert [bytes(v) for v in await conn.batched_get(list(values))] == list(values.values())

    run_with(target_url, body)


def _connections_received(server) -> int:
    """Connections the server accepted, not counting the one this question opens."""
    return int(server.node.call(lambda c: c.info("stats")["total_connections_received"])) - 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fixture", ["fresh_redis", "fresh_redis_tls"])
def test_value_larger_than_its_buffer_is_drained_and_the_connection_kept(fixture: str, request) -> None:
    server = request.getfixturevalue(fixture)
    big, small = os.urandom(2_000_000), os.urandom(1000)

    async def body(conn):
        await conn.batched_put([("big", big), ("small", small)])
        await conn.batched_get_into(["small"], buffers(1, 1000))  # the connection is open
        before = _connections_received(server)
        outs = buffers(3, 1_000_000)
        assert await conn.batched_get_into(["big", "small", "big"], outs) == [2_000_000, 1000, 2_000_000]
        assert outs[1][:1000].tobytes() == small
        again = buffers(2, 2_000_000)
        assert await conn.batched_get_into(["small", "big"], again) == [1000, 2_000_000]
        assert again[0][:1000].tobytes() == small and again[1].tobytes() == big
        assert _connections_received(server) == before + 1, "the drained connection must stay in use"

    sep = "&" if "?" in server.url else "?"
    run_with(f"{server.url}{sep}threads=1", body)


@pytest.mark.timeout(60)
def test_error_reply_is_one_line_and_leaves_the_connection_clean(fresh_redis) -> None:
    fresh_redis.node.call(lambda c: c.rpush("a-list", "x"))

    async def body(conn):
        await conn.put("v", b"value")
        before = _connections_received(fresh_redis)
        with pytest.raises(ConnectorError) as err:
            await conn.batched_get_into(["v", "a-list", "v"], buffers(3, 10))
        assert "WRONGTYPE" in str(err.value) and "\n" not in str(err.value)
        out = buffers(1, 10)
        assert await conn.batched_get_into(["v"], out) == [5] and out[0][:5].tobytes() == b"value"
        assert _connections_received(fresh_redis) == before + 1, "the connection must stay in use"
        with pytest.raises(ValueError, match="2 keys but 1 buffers"):
            await conn.batched_get_into(["v", "w"], buffers(1, 10))
        with pytest.raises(TypeError, match="read-only"):
            await conn.batched_get_into(["v"], [b"immutable"])

    run_with(f"{fresh_redis.url}?threads=1", body)


@pytest.mark.timeout(60)
def test_cluster_keys_on_every_node(fresh_redis_cluster) -> None:
    values = {key(i): os.urandom(10_000 + i) for i in range(24)}

    async def body(conn):
        await conn.batched_put(list(values.items()))
        outs = buffers(len(values), 20_000)
        assert await conn.batched_get_into(list(values), outs) == [len(v) for v in values.values()]
        for out, v in zip(outs, values.values(), strict=True):
            assert out[: len(v)].tobytes() == v

    run_with(fresh_redis_cluster.url, body)
    sizes = [node.call(lambda c: c.dbsize()) for node in fresh_redis_cluster.nodes]
    assert all(n > 0 for n in sizes), f"the keys should span every node: {sizes}"


@pytest.mark.timeout(90)
def test_cluster_moved_slot_falls_back_to_redis_py(monkeypatch) -> None:
    fallbacks = []
    copy_into = redis_connector._copy_into
    monkeypatch.setattr(redis_connector, "_copy_into", lambda v, out: fallbacks.append(1) or copy_into(v, out))
    cluster = start_redis_cluster()
    loop = asyncio.new_event_loop()
    conn = create_connector(cluster.url)
    try:
        keys = [key(i) for i in range(16)]
        values = {k: os.urandom(5000) for k in keys}
        loop.run_until_complete(conn.batched_put(list(values.items())))
        slot = cluster.nodes[0].call(lambda c: c.cluster("keyslot", keys[0]))
        ids = {n.port: n.call(lambda c: c.cluster("myid")) for n in cluster.nodes}
        owner = next(n for n in cluster.nodes if n.call(lambda c: c.cluster("countkeysinslot", slot)) > 0)
        target = next(n for n in cluster.nodes if n is not owner)
        target.call(lambda c: c.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[owner.port]))
        owner.call(lambda c: c.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target.port]))
        for moving in owner.call(lambda c: c.cluster("getkeysinslot", slot, 100)):
            owner.call(lambda c, k=moving: c.execute_command("MIGRATE", "127.0.0.1", target.port, k, 0, 5000))
        for node in cluster.nodes:  # the connector still maps the slot to the old owner
            node.call(lambda c: c.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target.port]))
        outs = buffers(len(keys), 5000)
        assert loop.run_until_complete(conn.batched_get_into(keys, outs)) == [5000] * len(keys)
        assert [o.tobytes() for o in outs] == list(values.values())
        assert fallbacks, "the moved key must have gone through redis-py's own GET"
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
        cluster.stop()


@pytest.mark.timeout(120)
def test_sentinel_failover_keeps_gets_into_buffers_working() -> None:
    group = start_sentinel_set("failover-into")
    loop = asyncio.new_event_loop()
    conn = create_connector(group.url, KVCacheConfig(blocking_timeout_secs=2.0))
    values = {key(i): os.urandom(100_000) for i in range(4)}
    try:
        loop.run_until_complete(conn.batched_put(list(values.items())))
        group.wait_replicated()
        group.wait_ready_for_failover()
        old_port = group.master_port()
        assert group.kill_master_and_wait_failover() != old_port
        # The pooled connection points at the dead master: the reader's retry must follow the sentinels.
        outs = buffers(len(values), 100_000)
        assert loop.run_until_complete(conn.batched_get_into(list(values), outs)) == [100_000] * len(values)
        assert [o.tobytes() for o in outs] == list(values.values())
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
        group.stop()


def test_parser_buffer_is_seen_with_hiredis_and_the_python_parser(redis_server) -> None:
    for parser in (_HiredisParser, _RESP2Parser):
        pool = redis.ConnectionPool(host="127.0.0.1", port=redis_server.node.port, parser_class=parser,
                                    command_packer=PACKER)
        try:
            conn = pool.get_connection()
            assert not parser_holds_data(conn)
            conn.send_packed_command(conn.pack_commands([("PING",), ("PING",)]))
            time.sleep(0.2)
            assert conn.read_response() == b"PONG"
            assert parser_holds_data(conn), f"{parser.__name__}: the second PONG is buffered"
            pool.release(conn)
            (lengths,) = receive([(pool, ["absent"], [memoryview(bytearray(4))])], CallState())
            assert lengths == [None]  # the pool replaced the dirty connection first
        finally:
            pool.disconnect()


# -- a server that freezes in the middle of a value --------------------------------------------
@contextmanager
def stalled_setup(timeout: float) -> Iterator[tuple[DelayProxy, object, asyncio.AbstractEventLoop]]:
    """A redis-server behind a proxy that can stall replies, a one-thread connector through it and
    a loop to drive it; all closed afterwards."""
    server = start_redis("redis-stall")
    proxy = DelayProxy(server.node.port).start()
    conn = create_connector(f"redis://127.0.0.1:{proxy.port}?threads=1", KVCacheConfig(blocking_timeout_secs=timeout))
    loop = asyncio.new_event_loop()
    try:
        yield proxy, conn, loop
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
        proxy.stop()
        server.stop()


def _assert_no_late_writes(proxy: DelayProxy, out: np.ndarray) -> None:
    snapshot = out.copy()
    proxy.release()
    assert proxy.drained.wait(10), "the proxy did not send the held bytes"
    time.sleep(0.5)  # a wrong implementation would write the late bytes now
    assert np.array_equal(out, snapshot), "the buffer was written after the call had returned"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["socket time-out", "caller cancels"])
def test_stall_mid_value_fails_in_time_and_never_writes_later(how: str) -> None:
    timeout = 1.0 if how == "socket time-out" else 20.0  # cancelled: long before redis-py's time-out
    with stalled_setup(timeout) as (proxy, conn, loop):
        value = os.urandom(CHUNK_256)
        loop.run_until_complete(conn.put("k", value))
        assert loop.run_until_complete(conn.batched_get_into(["k"], buffers(1, CHUNK_256))) == [CHUNK_256]
        pool = conn._client.connection_pool
        (used,) = [c for c in pool._connections if c._sock is not None]
        proxy.stall_replies_after(1 << 20)  # the header and the first MB, then nothing
        (out,) = buffers(1, CHUNK_256)
        started = time.monotonic()
        if how == "socket time-out":
            with pytest.raises(ConnectorError, match="Timeout"):
                loop.run_until_complete(conn.batched_get_into(["k"], [out]))
            bound = timeout + 2
        else:
            with pytest.raises(asyncio.TimeoutError):
                loop.run_until_complete(asyncio.wait_for(conn.batched_get_into(["k"], [out]), 0.5))
            bound = 0.5 + 2  # the socket is shut down: no wait for the 10 s socket time-out
        elapsed = time.monotonic() - started
        assert elapsed < bound, f"the call took {elapsed:.2f}s"
        assert proxy.stalled.is_set(), "the reply must have been cut inside the value"
        assert (out[: 1 << 19] != FILL).any(), "the first bytes should have arrived before the stall"
        assert used._sock is None, "the half-read connection must be disconnected"
        _assert_no_late_writes(proxy, out)
        again = buffers(1, CHUNK_256)  # a fresh connection: the value arrives whole
        assert loop.run_until_complete(conn.batched_get_into(["k"], again)) == [CHUNK_256]
        assert again[0].tobytes() == value


@pytest.mark.timeout(60)
def test_call_cancelled_while_queued_returns_at_once_and_never_writes() -> None:
    """One worker thread, held by a stalled call: a second call that times out while queued behind
    it returns without waiting for it, and its buffer is never written, then or later."""
    with stalled_setup(20.0) as (proxy, conn, loop):  # threads=1; 10 s per socket operation
        value = os.urandom(CHUNK_256)
        loop.run_until_complete(conn.put("k", value))
        proxy.stall_replies_after(1 << 20)
        (first,), (queued,) = buffers(1, CHUNK_256), buffers(1, CHUNK_256)

        async def both():
            stalled = asyncio.ensure_future(conn.batched_get_into(["k"], [first]))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.batched_get_into(["k"], [queued]), 0.3)
            # Waiting for the call ahead would take its 10 s socket time-out.
            assert time.monotonic() - started < 5, "a queued call must not wait for the one ahead of it"
            with pytest.raises(ConnectorError, match="Timeout"):
                await stalled

        loop.run_until_complete(both())
        assert (queued == FILL).all()
        _assert_no_late_writes(proxy, queued)
        assert (queued == FILL).all()


@pytest.mark.timeout(60)
def test_slow_link_is_not_a_time_out() -> None:
    """Bytes trickling in slower than the receive's low-water mark but faster than the socket
    time-out: progress, not a stall (the low-water mark must not turn it into a time-out)."""
    with stalled_setup(4.0) as (proxy, conn, loop):  # 2 s per socket operation
        value = os.urandom(2_000_000)
        loop.run_until_complete(conn.put("k", value))
        # Per 64 KB piece: 1 MB (the low-water mark) takes ~4 s, twice the socket time-out, while
        # each piece comes 1.75 s before it would expire (a loaded machine cannot make it a stall).
        proxy.delay = 0.25
        (out,) = buffers(1, len(value))
        assert loop.run_until_complete(conn.batched_get_into(["k"], [out])) == [len(value)]
        assert out.tobytes() == value


SHAPE = (2, 4, 256, 8, 64)  # 4 MB of bf16
META = ChunkMeta(KVFormat.KV, torch.bfloat16, SHAPE)


@pytest.mark.timeout(90)
def test_storage_layer_load_that_stalls_never_writes_into_a_reused_pooled_buffer(tmp_path) -> None:
    """As tests/test_faults.py does for lm://: the storage layer receives into pooled buffers and
    hands the one of a failed load to the next user at once."""
    server = start_redis("redis-stall-storage", str(tmp_path))
    proxy = DelayProxy(server.node.port).start()
    cfg = load_config({"remote_url": f"redis://127.0.0.1:{proxy.port}", "local_cpu": False,
                       "blocking_timeout_secs": 0.5, "existence_cache_ttl_secs": 0}, env={})
    mgr = StorageManager(cfg)
    try:
        obj = mgr.allocator.allocate(META, torch.randn(SHAPE).to(torch.bfloat16))
        mgr.put("k", obj)
        assert mgr.flush(10)
        size = mgr.remote.receive_size(META)
        assert size is not None, "redis must receive into pooled buffers"
        (back,) = mgr.get_many(["k"], META)
        assert back is not None and torch.equal(back.tensor, obj.tensor)
        back.ref_down()
        proxy.stall_replies_after(1 << 20)
        assert mgr.get_many(["k"], META) == [None]
        assert proxy.stalled.is_set()
        reused = mgr.allocator.buffer(size)  # the buffer the failed load gave back
        reused.fill_(0x5A)
        proxy.release()
        assert proxy.drained.wait(10)
        time.sleep(0.5)
        assert bool((reused == 0x5A).all()), "late reply bytes were written into a reused buffer"
        wait_for(lambda: mgr.remote.healthy, 30, "the remote tier to recover")
        (back,) = mgr.get_many(["k"], META)
        assert back is not None and torch.equal(back.tensor, obj.tensor)
        back.ref_down()
        obj.ref_down()
    finally:
        mgr.close()
        proxy.stop()
        server.stop()
