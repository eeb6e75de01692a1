"""Faults against real processes, at the storage layer: a store killed, slow, or serving bad bytes,
and a disk that is full, read-only or emptied underneath. Every fault must be a miss (never an
exception or a wrong chunk), cost at most one time-out, and heal without a restart."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest
import torch

from testbed.lm_server import LMServerProcess
from testbed.processes import free_port, wait_for
from testbed.redis_servers import start_redis
from tests.proxy import DelayProxy
from vllm_kvcache_plugin.config import load_config
from vllm_kvcache_plugin.memory import Allocator, ChunkMeta, KVFormat
from vllm_kvcache_plugin.serde.naive import NaiveSerde
from vllm_kvcache_plugin.storage import StorageManager

TIMEOUT = 0.5
BOUNDED = 10.0  # 20 time-outs: far above one time-out on a loaded machine, far below a hang
SHAPE = (2, 4, 16, 2, 32)
META = ChunkMeta(KVFormat.KV, torch.bfloat16, SHAPE)


def chunk(alloc: Allocator):
    return alloc.allocate(META, torch.randn(SHAPE).to(torch.bfloat16))


def manager(url: str, **extra) -> StorageManager:
    cfg = load_config({"remote_url": url, "local_cpu": False, "blocking_timeout_secs": TIMEOUT,
                       "existence_cache_ttl_secs": 0, **extra}, env={})
    return StorageManager(cfg)


class RedisStore:
    def __init__(self, tmp_path):
        workdir = tmp_path / "redis"
        workdir.mkdir()
        self.server = start_redis("redis-faults", str(workdir))
        self.url = self.server.url
        self.port = self.server.node.port

    def kill(self):
        self.server.node.kill()

    def restart(self):
        self.server.node.start()

    def raw_set(self, key: str, value: bytes):
        self.server.client().set(key, value)

    def raw_get(self, key: str) -> bytes:
        return self.server.client().get(key)

    def stop(self):
        self.server.stop()


class LMStore:
    def __init__(self, tmp_path):
        self.process = LMServerProcess(free_port(), ("--max-size-gb", "0.5")).start()
        self.url = self.process.url
        self.port = self.process.port

    def kill(self):
        self.process.kill()

    def restart(self):
        self.process.start()

    def stop(self):
        self.process.stop()


@pytest.fixture(params=["redis", "lm"])
def store(request, tmp_path):
    s = RedisStore(tmp_path) if request.param == "redis" else LMStore(tmp_path)
    yield s
    s.stop()


def test_store_killed_is_a_bounded_miss_and_heals(store):
    mgr = manager(store.url)
    try:
        objs = [chunk(mgr.allocator) for _ in range(3)]
        for i, obj in enumerate(objs):
            mgr.put(f"k{i}", obj)
        assert mgr.flush(10)
        assert mgr.lookup_prefix(["k0", "k1", "k2"]).hit_chunks == 3

        store.kill()
        errors = mgr.remote.counters.errors
        start = time.monotonic()
        assert mgr.lookup_prefix(["k0", "k1", "k2"]).hit_chunks == 0
        assert time.monotonic() - start < BOUNDED, "a dead store may cost at most one time-out"
        assert not mgr.remote.healthy
        assert mgr.remote.counters.errors == errors + 1, "one failed call, then the tier is down"
        assert mgr.get_many(["k0", "k1"]) == [None, None]
        assert mgr.lookup_prefix(["k0"]).hit_chunks == 0
        # Once unhealthy, misses are immediate: no call reached the store (each would have failed).
        assert mgr.remote.counters.errors == errors + 1

        store.restart()
        wait_for(lambda: mgr.remote.healthy, 30, "the remote tier to reconnect")
        assert mgr.counters.remote_reconnects >= 1
        fresh = chunk(mgr.allocator)
        mgr.put("after", fresh)
        assert mgr.flush(10)
        (back,) = mgr.get_many(["after"])
        assert back is not None and torch.equal(back.tensor, fresh.tensor)
        back.ref_down()
    finally:
        mgr.close()


def test_slow_store_is_a_miss_within_the_timeout(tmp_path):
    store = RedisStore(tmp_path)
    proxy = DelayProxy(store.port).start()
    mgr = manager(f"redis://127.0.0.1:{proxy.port}")
    try:
        obj = chunk(mgr.allocator)
        mgr.put("k", obj)
        assert mgr.flush(10)
        assert mgr.lookup_prefix(["k"]).hit_chunks == 1
        proxy.delay = BOUNDED  # a round trip now takes 2 x BOUNDED: waiting for it would fail below
        start = time.monotonic()
        assert mgr.lookup_prefix(["k"]).hit_chunks == 0
        assert time.monotonic() - start < BOUNDED
        proxy.delay = 0.0
        # A ping sent while the delay held may still mark the store down; either way it heals.
        wait_for(lambda: mgr.remote.healthy and mgr.lookup_prefix(["k"]).hit_chunks == 1, 30,
                 "the remote tier to recover and hit again")
    finally:
        mgr.close()
        proxy.stop()
        store.stop()


def _raw(url: str, method: str, *args):
    """Talk to the store with the project's own connector, under the storage layer."""
    import asyncio

    from vllm_kvcache_plugin.connectors import create_connector

    async def run():
        connector = create_connector(url)
        try:
            return await getattr(connector, method)(*args)
        finally:
            await connector.close()

    return asyncio.run(run())


def test_corrupt_and_foreign_values_are_misses(store):
    mgr = manager(store.url)
    try:
        obj = chunk(mgr.allocator)
        keys = ("flipped", "truncated", "foreign-dtype", "foreign-shape", "garbage")
        for key in keys:
            mgr.put(key, obj)
        assert mgr.flush(10)
        good = bytes(_raw(store.url, "get", "flipped"))
        flipped = bytearray(good)
        flipped[len(flipped) // 2] ^= 0x01
        other_dtype = Allocator().wrap(torch.randn(SHAPE, dtype=torch.float32))  # another model's dtype: 2x bigger
        other_shape = Allocator().wrap(torch.randn(2, 4, 16, 3, 32).to(torch.bfloat16))
        _raw(store.url, "batched_put", [
            ("flipped", bytes(flipped)), ("truncated", good[: len(good) // 3]),
            ("foreign-dtype", bytes(NaiveSerde().serialize(other_dtype))),
            ("foreign-shape", bytes(NaiveSerde().serialize(other_shape))), ("garbage", os.urandom(1000))])
        assert mgr.get_many(list(keys), META) == [None] * len(keys)
        assert mgr.tier_counters["remote"].corrupt == len(keys)
        assert mgr.remote.healthy, "bad values are the values' fault, not the store's"
        assert mgr.allocator.live == 1  # only `obj`: every rejected buffer went back
    finally:
        mgr.close()


def _flipped(mgr, store, key: str):
    """Store a chunk under ``key``, then flip one payload bit of the stored value."""
    obj = chunk(mgr.allocator)
    mgr.put(key, obj)
    assert mgr.flush(10)
    value = bytearray(_raw(store.url, "get", key))
    value[len(value) // 2] ^= 0x01
    _raw(store.url, "batched_put", [(key, bytes(value))])
    return obj


def test_a_deferred_check_catches_a_flipped_bit_and_the_tier_counts_it(store):
    """Loads take chunks with their checksum still to verify (the scatter checks just before it
    reads them): an intact chunk checks True and is byte-exact, a flipped bit checks False, is
    counted corrupt by the remote tier and forgotten, and its buffer goes back."""
    mgr = manager(store.url, existence_cache_ttl_secs=60)
    try:
        good = chunk(mgr.allocator)
        mgr.put("good", good)
        bad = _flipped(mgr, store, "bad")
        assert mgr.lookup_prefix(["good", "bad"]).hit_chunks == 2  # both known to the existence cache
        got_good, got_bad = mgr.get_many(["good", "bad"], META, defer_check=True)
        assert not got_good.checked and not got_bad.checked  # nothing read yet beyond the headers
        assert got_good.check() and got_good.checked
        assert torch.equal(got_good.tensor, good.tensor)
        assert not got_bad.check()
        assert mgr.tier_counters["remote"].corrupt == 1
        assert mgr.remote.healthy
        assert not mgr.remote.existence.known("bad", time.monotonic())  # asked again, the store decides
        with pytest.raises(RuntimeError, match="not yet verified"):
            mgr.get_many(["bad"], META, defer_check=True)[0].ref_up()  # nothing keeps unchecked bytes
        for obj in (got_good, got_bad, good, bad):
            obj.ref_down()
    finally:
        mgr.close()


def test_a_chunk_is_promoted_into_the_hot_cache_only_once_its_reader_has_checked_it(store):
    """With the hot cache on, a deferred-check load promotes a chunk when the reader's check (the
    verify-and-scatter pass) has passed, so promotion reads nothing itself, and never a corrupt one."""
    mgr = manager(store.url, local_cpu=True)
    try:
        good = chunk(mgr.allocator)
        mgr.put("good", good)
        bad = _flipped(mgr, store, "bad")
        assert mgr.flush(10)
        mgr.hot.clear()  # the puts kept them in memory; the loads must come from the store
        got_good, got_bad = mgr.get_many(["good", "bad"], META, defer_check=True)
        assert not mgr.hot.contains("good") and not mgr.hot.contains("bad")  # nothing verified yet
        assert got_good.check() and mgr.hot.contains("good")
        assert not got_bad.check() and not mgr.hot.contains("bad")
        assert mgr.tier_counters["remote"].corrupt == 1
        held = mgr.hot.get("good")
        assert torch.equal(held.tensor, good.tensor)
        for obj in (held, got_good, got_bad, good, bad):
            obj.ref_down()
    finally:
        mgr.close()


def test_pool_reuses_freed_chunk_memory_within_its_cap():
    alloc = Allocator(max_pool_bytes=3 * 4096)
    meta = ChunkMeta(KVFormat.KV, torch.uint8, (2, 1, 16, 2, 64))  # 4096 bytes
    first = alloc.allocate(meta)
    ptr = first.tensor.data_ptr()
    first.ref_down()
    again = alloc.allocate(meta)
    assert again.tensor.data_ptr() == ptr and alloc.pool_hits == 1
    objs = [alloc.allocate(meta) for _ in range(5)]
    for o in [again, *objs]:
        o.ref_down()
    assert alloc.pool_bytes == 3 * 4096  # capped; the rest went back to the system
    assert (alloc.allocations, alloc.frees, alloc.live) == (7, 7, 0)


def test_prewarm_fills_the_pool_within_its_cap():
    alloc = Allocator(max_pool_bytes=10 * 4096)
    assert alloc.prewarm([4096, 8192, 4096], per_size=3) == 3 * 4096 + 3 * 8192
    assert alloc.prewarm([4096], per_size=5) == 4096  # only what the cap still allows
    meta = ChunkMeta(KVFormat.KV, torch.uint8, (2, 1, 16, 2, 64))
    hits = alloc.pool_hits
    alloc.allocate(meta).ref_down()
    assert alloc.pool_hits == hits + 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="page-locking works on a CUDA machine: nothing refuses it")
def test_a_pool_that_cannot_page_lock_turns_pageable_with_one_warning(caplog):
    """A GPU worker asks for pinned chunk buffers; where page-locking is refused (here: torch has no
    pinned allocator without an accelerator, as a locked-memory limit refuses it on a GPU host), the
    pool warns once and hands out pageable buffers instead of failing vLLM's start or a load."""
    alloc = Allocator(max_pool_bytes=8 * 4096, pin_memory=True)
    with caplog.at_level("WARNING", logger="vllm_kvcache_plugin.memory"):
        assert alloc.prewarm([4096], per_size=2) == 2 * 4096
        block = alloc.buffer(8192)
    assert not alloc.pin_memory and not block.is_pinned() and block.numel() == 8192
    warned = [r for r in caplog.records if "Could not page-lock" in r.getMessage()]
    assert len(warned) == 1


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MB file system (tmpfs), for a disk that fills up or turns read-only."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_and_read_only_are_warnings_not_crashes(small_tmpfs, caplog):
    cfg = load_config({"local_disk": str(small_tmpfs), "local_cpu": False, "max_local_disk_size": 1}, env={})
    mgr = StorageManager(cfg)
    try:
        objs = [mgr.allocator.wrap(torch.randn(2, 4, 128, 2, 32).to(torch.bfloat16)) for _ in range(12)]  # 128 KB each
        for i, obj in enumerate(objs):
            mgr.put(f"k{i}", obj)
        assert mgr.flush(10)
        stored = [i for i in range(12) if mgr.disk.contains(f"k{i}")]
        assert 0 < len(stored) < 12, "a 1 MB disk holds some chunks, not all"
        assert mgr.tier_counters["disk"].errors > 0
        assert "write failed" in caplog.text
        assert not [p for p in os.listdir(small_tmpfs) if p.startswith(".tmp-")], "no half-written files left"
        got = mgr.get_many([f"k{stored[0]}"])[0]
        assert got is not None and torch.equal(got.tensor, objs[stored[0]].tensor)

        subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
        errors = mgr.tier_counters["disk"].errors
        mgr.put("ro", objs[0])
        assert mgr.flush(10)
        assert mgr.tier_counters["disk"].errors == errors + 1 and not mgr.disk.contains("ro")
        assert mgr.get_many([f"k{stored[0]}"])[0] is not None, "a read-only disk still serves reads"
    finally:
        mgr.close()


def test_lookup_timing_out_on_a_busy_store_is_a_miss_not_a_store_down(tmp_path):
    """A lookup that gets no answer in time (the store busy: here a real CLIENT PAUSE longer than
    the socket time-out) is a miss, and the pings that follow decide: one is answered once the
    pause ends, so the store stays up and the next lookup hits. A store silent through every ping
    (frozen) is marked down."""
    store = RedisStore(tmp_path)
    mgr = manager(store.url, blocking_timeout_secs=4.0)  # socket time-out 2 s; each ping up to 2 s more

    def pause(ms: int) -> None:
        store.server.node.call(lambda c: c.execute_command("CLIENT", "PAUSE", str(ms), "ALL"))

    try:
        obj = chunk(mgr.allocator)
        mgr.put("k", obj)
        assert mgr.flush(10)
        errors, timeouts = mgr.remote.counters.errors, mgr.remote.counters.timeouts
        pause(3000)  # the lookup gives up at ~2 s; the ping sent then is answered at 3 s
        assert mgr.lookup_prefix(["k"]).hit_chunks == 0
        assert mgr.remote.counters.timeouts == timeouts + 1
        time.sleep(2.5)
        assert mgr.remote.healthy and mgr.remote.counters.errors == errors, "a busy store was marked down"
        assert mgr.lookup_prefix(["k"]).hit_chunks == 1

        pause(12000)  # silent through the lookup (2 s) and both pings (2 s each)
        assert mgr.lookup_prefix(["k"]).hit_chunks == 0
        wait_for(lambda: not mgr.remote.healthy, 9, "a store silent through every ping to be marked down")
        wait_for(lambda: mgr.remote.healthy, 40, "the remote tier to recover after the pause")
        assert mgr.lookup_prefix(["k"]).hit_chunks == 1
    finally:
        mgr.close()
        store.stop()


def test_a_connectors_own_time_out_keeps_its_message():
    """The loop's wait and a connector's time-out are both TimeoutError (Python 3.11): the log must
    name the store's failure, not a wait that never ran out."""
    import asyncio

    from vllm_kvcache_plugin.errors import ConnectorTimeout
    from vllm_kvcache_plugin.storage.loop import EventLoopThread

    loop = EventLoopThread()
    try:
        async def store_silent():
            raise ConnectorTimeout("redis: batched_exists failed: Timeout reading from socket")

        async def never_answers():
            await asyncio.sleep(30)

        with pytest.raises(ConnectorTimeout, match="Timeout reading from socket"):
            loop.run(store_silent(), 5.0)
        with pytest.raises(TimeoutError, match=r"no answer within 0\.20s"):
            loop.run(never_answers(), 0.2)
    finally:
        loop.stop()


def test_unreachable_store_at_start_up(tmp_path):
    start = time.monotonic()
    mgr = manager(f"redis://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        assert time.monotonic() - start < BOUNDED
        assert not mgr.remote.healthy
        assert mgr.lookup_prefix([uuid.uuid4().hex]).hit_chunks == 0
    finally:
        mgr.close()


def test_receive_that_times_out_mid_value_never_writes_into_a_reused_buffer(tmp_path):
    """A store that freezes in the middle of a value's bytes, then sends the rest after the load
    gave up: the load is a miss, and the pooled receive buffer (handed to the next user at once)
    is never written by the late bytes. Real lm server; the freeze is a proxy holding its reply."""
    store = LMStore(tmp_path)
    proxy = DelayProxy(store.port).start()
    mgr = manager(f"lm://127.0.0.1:{proxy.port}")
    try:
        obj = chunk(mgr.allocator)
        mgr.put("k", obj)
        assert mgr.flush(10)
        size = mgr.remote.receive_size(META)
        proxy.stall_replies_after(4096)  # the reply header and the first 4 KB of the value, then nothing
        assert mgr.get_many(["k"], META) == [None]
        assert proxy.stalled.is_set(), "the reply must have been cut inside the value"
        reused = mgr.allocator.buffer(size)  # the pool's most recent buffer of this size: the one given up
        reused.fill_(0x5A)
        proxy.release()
        assert proxy.drained.wait(10), "the proxy did not send the held bytes"
        time.sleep(0.5)  # let any late bytes land (a wrong implementation would write them into `reused`)
        assert bool((reused == 0x5A).all()), "late reply bytes were written into a buffer reused after the time-out"
        wait_for(lambda: mgr.remote.healthy, 30, "the remote tier to recover")
        (back,) = mgr.get_many(["k"], META)  # a fresh connection: the value arrives whole
        assert back is not None and torch.equal(back.tensor, obj.tensor)
        back.ref_down()
    finally:
        mgr.close()
        proxy.stop()
        store.stop()


BIG_SHAPE = (2, 4, 256, 8, 64)  # 4 MB of bf16: ~64 reads through the proxy
BIG_META = ChunkMeta(KVFormat.KV, torch.bfloat16, BIG_SHAPE)


def test_load_deadline_scales_with_the_bytes_asked_for(store, tmp_path):
    """A load given time for its size finishes on a slow store that a flat time-out would cut off,
    and one that runs out of time on a slow but alive store is a miss without marking it down."""
    proxy = DelayProxy(store.port).start()
    try:
        for floor, expect_hit in ((0.001, True), (1000.0, False)):  # 1 MB/s: 4.5 s for 4 MB; 1 TB/s: 0.5 s
            mgr = manager(f"{store.url.split('://')[0]}://127.0.0.1:{proxy.port}", min_load_gb_per_sec=floor)
            try:
                obj = mgr.allocator.allocate(BIG_META, torch.randn(BIG_SHAPE).to(torch.bfloat16))
                mgr.put(f"big-{floor}", obj)
                assert mgr.flush(30)
                proxy.delay = 0.03  # per 64 KB read: 4 MB take ~2 s, a ping ~0.1 s
                errors = mgr.remote.counters.errors
                (back,) = mgr.get_many([f"big-{floor}"], BIG_META)
                if expect_hit:
                    assert back is not None and torch.equal(back.tensor, obj.tensor)
                    back.ref_down()
                else:
                    assert back is None and mgr.remote.counters.timeouts == 1
                    time.sleep(2 * TIMEOUT)  # the ping after the slow load answers
                    assert mgr.remote.healthy and mgr.remote.counters.errors == errors, \
                        "one slow load must not mark a live store down"
                    assert mgr.lookup_prefix([f"big-{floor}"]).hit_chunks == 1
                proxy.delay = 0.0
                obj.ref_down()
            finally:
                mgr.close()
    finally:
        proxy.stop()
