"""Shared-memory loads over lm:// (connectors/lm_shm.py, server/arena.py, server/shm.py) against
real server processes: byte-exact leased loads, fallback to TCP, leases that run out mid-read,
eviction under a lease, batched releases, and the server's counters."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.request

import pytest
import torch

from testbed.processes import free_port, wait_for
from vllm_kvcache_plugin.config import load_config
from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.memory import Allocator, ChunkMeta, KVFormat, tensor_bytes
from vllm_kvcache_plugin.serde.naive import NaiveSerde
from vllm_kvcache_plugin.storage import StorageManager

MB = 10**6
GEOMETRY = (2, 4, 256, 2, 64)  # 256 tokens, fp16: 512 KB a chunk
FULL = ChunkMeta(KVFormat.KV, torch.float16, GEOMETRY)


def meta(tokens: int) -> ChunkMeta:
    return ChunkMeta(KVFormat.KV, torch.float16, (*GEOMETRY[:2], tokens, *GEOMETRY[3:]))


def chunk(alloc: Allocator, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return alloc.allocate(meta(tokens), torch.randn(meta(tokens).shape, generator=gen).to(torch.float16))


def manager(url: str, **extra) -> StorageManager:
    cfg = load_config({"remote_url": url, "local_cpu": False, "blocking_timeout_secs": 5.0,
                       "existence_cache_ttl_secs": 0, **extra}, env={})
    return StorageManager(cfg)


def server_stats(url: str) -> dict:
    async def body() -> dict:
        c = create_connector(url + "?shm=off")
        try:
            return await c.stats()
        finally:
            await c.close()

    return asyncio.run(body())


def same(a, b) -> bool:
    return bytes(tensor_bytes(a.tensor)) == bytes(tensor_bytes(b.tensor))


def test_shm_loads_are_byte_exact_and_leases_come_back(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.1", "--metrics-port", str(metrics_port := free_port()))
    mgr = manager(server.url)
    try:
        assert mgr.remote.connector.shm_active
        sizes = [1, 7, 64, 255, 256]
        objs = {f"k{t}": chunk(mgr.allocator, t, t) for t in sizes}
        for key, obj in objs.items():
            mgr.put(key, obj)
        assert mgr.flush(10)
        before = server_stats(server.url)
        got = mgr.get_many([*objs, "absent"], FULL)
        assert got[-1] is None
        for (key, obj), back in zip(objs.items(), got, strict=False):
            assert back is not None and back.meta == obj.meta and same(back, obj), key
            assert back.lent  # a view of the server's memory, not a received copy
        for back in got[:-1]:
            back.ref_down()
        wait_for(lambda: server_stats(server.url)["shm"]["leases_active"] == 0, 10, "the leases to come back")
        s = server_stats(server.url)
        assert s["shm"]["leases_granted"] == s["shm"]["leases_released"] == len(sizes)
        assert s["shm"]["leases_expired"] == 0 and s["shm"]["attaches"] >= 1
        assert s["hits"] - before["hits"] == len(sizes) and s["misses"] - before["misses"] == 1
        assert s["requests"]["BATCH_GET_LEASE"] == 1 and "BATCH_GET" not in s["requests"]
        assert s["bytes_used"] <= s["budget"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert f"lm_server_shm_leases_granted_total {len(sizes)}" in text and "lm_server_hits_total" in text
    finally:
        mgr.close()


def test_hot_cache_promotion_copies_a_leased_chunk(lm_server_factory) -> None:
    """The hot cache keeps a copy of its own: the lease comes back when the caller drops the chunk."""
    server = lm_server_factory("--max-size-gb", "0.1")
    writer, reader = manager(server.url), manager(server.url, local_cpu=True)
    try:
        obj = chunk(writer.allocator, 256, 1)
        writer.put("p", obj)
        assert writer.flush(10)
        (back,) = reader.get_many(["p"], FULL)
        assert back is not None and back.lent and same(back, obj)
        held = reader.hot.get("p")
        assert held is not None and not held.lent and held is not back and same(held, obj)
        back.ref_down()
        wait_for(lambda: server_stats(server.url)["shm"]["leases_active"] == 0, 10, "the lease to come back")
        assert same(held, obj)  # the copy outlives the lease
        held.ref_down()
    finally:
        writer.close()
        reader.close()


def test_releases_are_batched(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.1")
    mgr = manager(server.url)
    try:
        keys = [f"b{i}" for i in range(16)]
        for i, key in enumerate(keys):
            mgr.put(key, chunk(mgr.allocator, 256, i))
        assert mgr.flush(10)
        got = mgr.get_many(keys, FULL)
        assert all(g is not None for g in got)
        for g in got:  # the worker drops them one by one, from its own thread
            g.ref_down()
        wait_for(lambda: server_stats(server.url)["shm"]["leases_active"] == 0, 10, "the leases to come back")
        frames = server_stats(server.url)["requests"]["LEASE_RELEASE"]
        assert frames <= 4, f"{frames} release frames for 16 chunks"
        assert mgr.remote.connector.shm_stats["release_frames"] == frames
    finally:
        mgr.close()


@pytest.mark.parametrize("how", ["client shm=off", "server --no-shm"])
def test_fallback_to_tcp_is_byte_exact_and_logged_once(lm_server_factory, caplog, how: str) -> None:
    server = lm_server_factory("--max-size-gb", "0.1", *(["--no-shm"] if "server" in how else []))
    url = server.url + ("?shm=off" if "client" in how else "")
    caplog.set_level(logging.INFO, logger="vllm_kvcache_plugin.connectors.lm")
    mgr = manager(url)
    try:
        assert not mgr.remote.connector.shm_active
        obj = chunk(mgr.allocator, 100, 3)
        mgr.put("f", obj)
        assert mgr.flush(10)
        for _ in range(2):
            (back,) = mgr.get_many(["f"], FULL)
            assert back is not None and not back.lent and same(back, obj)
            back.ref_down()
        lines = [r.getMessage() for r in caplog.records if "loads over" in r.getMessage()]
        assert len(lines) == 1 and "loads over TCP" in lines[0], lines
        s = server_stats(server.url)
        assert s["requests"]["BATCH_GET"] == 2 and "BATCH_GET_LEASE" not in s["requests"]
        assert (s["shm"] is None) == ("server" in how)
    finally:
        mgr.close()


def test_lease_that_expires_mid_read_is_a_miss_not_wrong_data(lm_server_factory, monkeypatch) -> None:
    """A slow reader: while it checks the value, its lease runs out and the region is handed to
    another value, itself a valid chunk (so the checksum alone would pass). The load is a miss."""
    server = lm_server_factory("--max-size-gb", "0.004", "--lease-secs", "0.3")  # room for ~7 chunks
    mgr, other = manager(server.url), manager(server.url)
    try:
        victim = chunk(mgr.allocator, 256, 42)
        mgr.put("victim", victim)
        assert mgr.flush(10)
        serde = mgr.remote.serde
        real = serde.deserialize

        def slow(data, expected=None, defer_check=False):
            time.sleep(0.5)  # past the lease
            for i in range(12):  # evict "victim" and reuse every region, with valid chunks
                other.put(f"filler{i}", chunk(other.allocator, 256, 1000 + i))
            assert other.flush(10)
            return real(data, expected, defer_check)

        monkeypatch.setattr(serde, "deserialize", slow)
        assert mgr.get_many(["victim"], FULL) == [None]
        assert mgr.remote.counters.timeouts == 1 and mgr.remote.counters.hits == 0
        assert server_stats(server.url)["shm"]["leases_expired"] >= 1
    finally:
        mgr.close()
        other.close()


def test_eviction_under_a_lease_does_not_reuse_the_region(lm_server_factory) -> None:
    # A lease far longer than the test, so a slow, loaded machine cannot let it run out mid-way.
    server = lm_server_factory("--max-size-gb", "0.004", "--lease-secs", "120")

    async def body() -> None:
        c = create_connector(server.url)
        original = bytes(range(256)) * 2000  # 512 KB
        await c.put("held", original)
        (lease,) = await c.batched_get_leased(["held"])
        assert lease is not None and c.shm_active
        for i in range(20):  # 10 MB through a 4 MB store: "held" is evicted, its region is not reused
            await c.put(f"fill{i}", bytes([i]) * len(original))
        assert not await c.exists("held")
        assert bytes(lease.view) == original
        s = await c.stats()
        assert s["shm"]["held_bytes"] >= len(original) and s["evictions"] >= 1
        assert s["bytes_used"] + s["bytes_reserved"] <= s["budget"]
        lease.release()
        lease.release()  # at most once
        for _ in range(500):  # releases are batched: wait for the batch (up to 10 s)
            s = await c.stats()
            if s["shm"]["leases_active"] == 0:
                break
            await asyncio.sleep(0.02)
        assert s["shm"]["held_bytes"] == 0 and s["shm"]["leases_released"] == 1
        assert c.shm_stats["released"] == 1 and c.shm_stats["expired_at_release"] == 0
        await c.put("after", b"x" * len(original))  # the freed region is usable again
        assert bytes(await c.get("after")) == b"x" * len(original)
        await c.close()

    asyncio.run(body())


def test_fd_is_only_given_for_a_valid_nonce(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.01")

    async def body() -> dict:
        c = create_connector(server.url)
        await c.connect()
        from vllm_kvcache_plugin.lm_protocol import Op
        reply = await c._call(Op.SHM_ATTACH)
        await c.close()
        import json

        return json.loads(bytes(reply.body[0]))

    info = asyncio.run(body())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect("\0" + info["socket"])
        sock.sendall(b"\0" * 16)
        message, fds, _, _ = socket.recv_fds(sock, 16, 1)
    assert message == b"NONCE" and fds == []
    assert server_stats(server.url)["shm"]["attaches_refused"] == 1


def test_serde_checksum_still_guards_shm_values(lm_server_factory) -> None:
    """A value with a bad payload checksum, read over shared memory, is a miss (corrupt)."""
    server = lm_server_factory("--max-size-gb", "0.01")
    alloc = Allocator()
    good = bytearray(NaiveSerde(alloc).serialize(chunk(alloc, 16, 5)))
    good[-1] ^= 0xFF

    async def put() -> None:
        c = create_connector(server.url)
        await c.put("bad", bytes(good))
        await c.close()

    asyncio.run(put())
    mgr = manager(server.url)
    try:
        assert mgr.remote.connector.shm_active
        assert mgr.get_many(["bad"], FULL) == [None]
        assert mgr.remote.counters.corrupt == 1
        wait_for(lambda: server_stats(server.url)["shm"]["leases_active"] == 0, 10, "the lease to come back")
    finally:
        mgr.close()


def test_populate_maps_only_pages_that_hold_data():
    """The background walk maps the pages that hold data and never touches a hole (mapping a
    hole of a memfd would allocate it: the server's memory)."""
    import mmap
    import os

    from vllm_kvcache_plugin.connectors.lm_shm import populate_resident

    page = mmap.PAGESIZE
    fd = os.memfd_create("populate-test")
    try:
        os.ftruncate(fd, 64 * page)
        writer = mmap.mmap(fd, 64 * page)
        writer[3 * page:7 * page] = b"x" * (4 * page)  # two runs of data, holes around them
        writer[40 * page:41 * page] = b"y" * page
        blocks = os.fstat(fd).st_blocks
        reader = mmap.mmap(fd, 64 * page, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        import numpy as np

        address = int(np.frombuffer(reader, dtype=np.uint8, count=1).ctypes.data)
        assert populate_resident(address, 64 * page, slice_bytes=16 * page) == 5 * page  # runs across slices too
        assert os.fstat(fd).st_blocks == blocks  # no hole was allocated
        del address
        reader.close()
        writer.close()
    finally:
        os.close(fd)


def test_a_new_connection_maps_the_stored_values_ahead(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.1")
    writer = manager(server.url)
    try:
        for i in range(8):
            writer.put(f"k{i}", chunk(writer.allocator, 256, i))
        assert writer.flush(10)
    finally:
        writer.close()
    mgr = manager(server.url)
    try:
        assert mgr.remote.connector.shm_active
        mapping = mgr.remote.connector._proto.shm
        stored = 8 * FULL.nbytes
        # The arena is 0.1 GB; only the pages of the 8 values (and the arena's header) are mapped.
        wait_for(lambda: mapping.populated >= stored, 10, "the stored values to be mapped")
        assert mapping.populated < stored + 2 * MB
        got = mgr.get_many([f"k{i}" for i in range(8)], FULL)
        assert all(obj is not None and obj.check() for obj in got)
        for obj in got:
            obj.ref_down()
    finally:
        mgr.close()
