"""Storage tiers: hot-cache budget, disk atomicity and index, manager order/promotion/queue."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import torch

from vllm_kvcache_plugin.config import load_config
from vllm_kvcache_plugin.memory import Allocator, ChunkMeta, KVFormat, tensor_bytes
from vllm_kvcache_plugin.serde.naive import NaiveSerde
from vllm_kvcache_plugin.storage import StorageManager
from vllm_kvcache_plugin.storage import disk as disk_module
from vllm_kvcache_plugin.storage.disk import DiskTier, file_name, map_file
from vllm_kvcache_plugin.storage.hot import HotCache


def _obj(alloc, tokens=4, fill=None):
    t = torch.randn(2, 2, tokens, 1, 8) if fill is None else torch.full((2, 2, tokens, 1, 8), float(fill))
    return alloc.wrap(t)


def test_hot_cache_never_exceeds_budget_over_10000_random_puts():
    alloc = Allocator()
    budget = 200_000
    hot = HotCache(budget)
    rng = random.Random(0)
    for i in range(10_000):
        obj = alloc.wrap(torch.empty(rng.randint(1, 30_000), dtype=torch.uint8))
        hot.put(f"k{rng.randint(0, 500)}", obj)
        obj.ref_down()
        assert hot.bytes_used <= budget
        if i % 1000 == 0:
            assert hot.bytes_used == sum(o.nbytes for o in hot._entries.values())
    assert alloc.live == len(hot)  # every evicted chunk was freed exactly once
    hot.clear()
    assert alloc.live == 0 and alloc.allocations == alloc.frees


def test_hot_cache_lru_order_and_oversize():
    alloc = Allocator()
    a, b, c = (_obj(alloc) for _ in range(3))
    hot = HotCache(a.nbytes * 2)
    hot.put("a", a)
    hot.put("b", b)
    hot.get("a").ref_down()  # a is now most recent
    hot.put("c", c)
    assert hot.contains("a") and hot.contains("c") and not hot.contains("b")
    big = alloc.wrap(torch.empty(a.nbytes * 3, dtype=torch.uint8))
    assert hot.put("big", big) is False


def test_disk_round_trip_index_rebuild_and_lru(tmp_path):
    alloc = Allocator()
    serde = NaiveSerde(alloc)
    objs = [_obj(alloc) for _ in range(4)]
    size = len(serde.serialize(objs[0]))
    disk = DiskTier(str(tmp_path), size * 3, serde)
    for i, obj in enumerate(objs[:3]):
        assert disk.put(f"key{i}", obj)
        time.sleep(0.01)  # distinct mtimes for the rebuilt LRU order
    assert disk.get("key0") is not None  # key0 becomes most recent
    time.sleep(0.01)
    reopened = DiskTier(str(tmp_path), size * 3, serde)
    assert len(reopened) == 3
    assert reopened.put("key3", objs[3])
    assert not reopened.contains("key1")  # least recently used went first
    back = reopened.get("key0")
    assert torch.equal(back.tensor, objs[0].tensor)
    assert reopened.bytes_used <= size * 3


def test_disk_corrupt_and_vanished_files_are_misses(tmp_path):
    alloc = Allocator()
    disk = DiskTier(str(tmp_path), 10**8, NaiveSerde(alloc))
    disk.put("a", _obj(alloc))
    disk.put("b", _obj(alloc))
    path = tmp_path / file_name("a")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert disk.get("a") is None and disk.counters.corrupt == 1 and not path.exists()
    os.unlink(tmp_path / file_name("b"))
    assert disk.get("b") is None and not disk.contains("b")


FULL = ChunkMeta(KVFormat.KV, torch.float32, (2, 2, 16, 1, 8))  # what _obj(alloc, 16) makes


def test_disk_maps_each_file_and_lends_the_chunk_over_the_mapping(tmp_path):
    """A read maps the file: the chunk is a view of the page cache (no pooled buffer taken), lent,
    so a holder that keeps it (the hot cache) gets a copy; a chunk mapped before its file is
    replaced or removed keeps its own bytes; corrupt bytes under the mapping are still caught."""
    alloc = Allocator()
    serde = NaiveSerde(alloc)
    disk = DiskTier(str(tmp_path), 10**8, serde)
    assert disk.map_reads
    for tokens in (1, 5, 16):
        src = _obj(alloc, tokens)
        disk.put(f"t{tokens}", src)
        back = disk.get(f"t{tokens}", FULL)
        assert back is not None and back.meta == src.meta and back.lent and back._block is None
        assert bytes(tensor_bytes(back.tensor)) == bytes(tensor_bytes(src.tensor))
        kept = back.ref_up()  # what the hot cache does with a promoted chunk
        assert kept is not back and kept.tensor.data_ptr() != back.tensor.data_ptr()
        back.ref_down()  # the mapping goes; the copy stays
        assert bytes(tensor_bytes(kept.tensor)) == bytes(tensor_bytes(src.tensor))
        kept.ref_down()
        src.ref_down()
    assert serde.max_value_size(FULL) not in alloc._pool  # no receive buffer taken (the copies' are there)
    old, new = _obj(alloc, 16, fill=1), _obj(alloc, 16, fill=2)
    disk.put("replaced", old)
    mapped = disk.get("replaced", FULL)
    disk.put("replaced", new)  # written to a temp file, renamed over the mapped one
    assert torch.equal(mapped.tensor, old.tensor)
    assert torch.equal(disk.get("replaced", FULL).tensor, new.tensor)
    assert disk.remove("replaced") and torch.equal(mapped.tensor, old.tensor)  # unlinked, still mapped
    mapped.ref_down()
    disk.put("flipped", old)
    path = tmp_path / file_name("flipped")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    deferred = disk.get("flipped", FULL, defer_check=True)
    assert deferred is not None and deferred.lent and not deferred.check()
    assert not path.exists() and disk.counters.corrupt == 1
    deferred.ref_down()


def test_disk_reads_each_chunk_into_one_pooled_receive_buffer_where_it_does_not_map(tmp_path):
    """Without a mapping (VLLM_KVCACHE_DISK_MMAP=0, or a file system that cannot map), full and
    partial chunks are read straight into the pool's receive-size buffer (one copy, one pool
    bucket), byte-exact, and the buffer goes back to the pool when the chunk is freed."""
    alloc = Allocator()
    serde = NaiveSerde(alloc)
    capacity = serde.max_value_size(FULL)
    disk = DiskTier(str(tmp_path), 10**8, serde)
    disk.map_reads = False
    for _ in range(2):
        for tokens in (1, 5, 15, 16):
            src = _obj(alloc, tokens)
            disk.put(f"t{tokens}", src)
            back = disk.get(f"t{tokens}", FULL)
            assert back is not None and back.meta == src.meta
            assert bytes(tensor_bytes(back.tensor)) == bytes(tensor_bytes(src.tensor))
            assert back._block.numel() == capacity
            back.ref_down()
            src.ref_down()
    assert list(alloc._pool) == [capacity] and alloc.pool_hits >= 7  # one buffer, reused
    assert alloc.live == 0
    legacy = disk.get("t5")  # no geometry given: a buffer of the file's size
    assert legacy is not None and legacy.meta.shape[2] == 5
    legacy.ref_down()


def _serialized(alloc, shape):
    return bytes(NaiveSerde(alloc).serialize(alloc.wrap(torch.randn(shape))))


def test_disk_corrupt_truncated_and_foreign_files_are_misses(tmp_path, monkeypatch):
    alloc = Allocator()
    serde = NaiveSerde(alloc)
    capacity = serde.max_value_size(FULL)
    alloc.prewarm([capacity], per_size=1)
    disk = DiskTier(str(tmp_path), 10**8, serde)
    good = _serialized(alloc, FULL.shape)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    cases = {
        "flipped payload": bytes(flipped),
        "truncated": good[:-100],
        "header only": good[:64],
        "empty": b"",
        "foreign bytes": os.urandom(len(good)),
        "larger than any chunk of this geometry": good + b"x" * 4096,
        "another geometry": _serialized(alloc, (2, 2, 16, 1, 4)),
        "another dtype": bytes(serde.serialize(alloc.wrap(torch.randn(FULL.shape).to(torch.bfloat16)))),
    }
    for name, content in cases.items():
        disk.put(name, _obj(alloc, 16))
        path = tmp_path / file_name(name)
        path.write_bytes(content)
        assert disk.get(name, FULL) is None, name
        assert not path.exists() and not disk.contains(name), name
        assert alloc.pool_bytes == capacity, f"{name}: the receive buffer was not recycled"
    assert disk.counters.corrupt == len(cases) and disk.counters.hits == 0
    disk.put("eio", _obj(alloc, 16))  # a read error mid-file: a miss, the buffer back in the pool

    def failing_read(*args):
        raise OSError(5, "Input/output error")

    # Injected: an unreadable disk block cannot be made here. Mapped, the error comes from
    # entering the pages (map_file); read, from readv.
    monkeypatch.setattr(disk_module, "map_file", failing_read)
    assert disk.get("eio", FULL) is None and alloc.pool_bytes == capacity
    disk.map_reads = False
    monkeypatch.setattr(os, "readv", failing_read)
    assert disk.get("eio", FULL) is None and alloc.pool_bytes == capacity
    assert disk.counters.errors >= 2


def test_map_file_maps_whole_files_and_leaves_empty_ones_to_a_read(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 5000)
    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = map_file(fd, os.fstat(fd).st_size)
        assert mapping is not None and mapping[:] == b"abc" * 5000
        mapping.close()
        path.write_bytes(b"")
        assert map_file(fd, 0) is None
    finally:
        os.close(fd)


def test_disk_read_only_folder_is_a_warning_not_a_crash(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a full disk is simulated by a budget instead
        disk = DiskTier(str(tmp_path), 10, NaiveSerde())
        assert disk.put("a", _obj(Allocator())) is False
        return
    os.chmod(tmp_path, 0o500)
    try:
        disk = DiskTier(str(tmp_path), 10**8, NaiveSerde())
        assert disk.put("a", _obj(Allocator())) is False
        assert disk.counters.errors == 1
    finally:
        os.chmod(tmp_path, 0o700)


KILLED_WRITER = r"""
import os, sys, torch
from vllm_kvcache_plugin.memory import Allocator, ChunkMeta, KVFormat, tensor_bytes
from vllm_kvcache_plugin.serde.naive import NaiveSerde
from vllm_kvcache_plugin.storage.disk import DiskTier
disk = DiskTier(sys.argv[1], 10**10, NaiveSerde())
obj = Allocator().wrap(torch.randn(2, 30, 256, 3, 64))
real_write = os.write
def slow_write(fd, data):
    n = real_write(fd, bytes(data[:65536]))
    print("wrote", flush=True)
    import time; time.sleep(60)
    return n
os.write = slow_write
disk.put("victim", obj)
"""


def test_killed_writer_leaves_nothing_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "wrote"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / file_name("victim")).exists()
    disk = DiskTier(str(tmp_path), 10**10, NaiveSerde())
    assert not disk.contains("victim") and disk.get("victim") is None


def test_manager_tiers_promotion_and_lookup(tmp_path):
    cfg = load_config({"local_disk": str(tmp_path), "max_local_disk_size": 1, "max_local_cpu_size": 0.001}, env={})
    mgr = StorageManager(cfg)
    try:
        objs = [_obj(mgr.allocator, tokens=16) for _ in range(3)]
        for i, obj in enumerate(objs):
            mgr.put(f"k{i}", obj)
        assert mgr.flush(10)
        assert mgr.lookup_prefix(["k0", "k1", "k2", "nope", "k0"]).hit_chunks == 3
        mgr.hot.clear()
        res = mgr.lookup_prefix(["k0", "k1"])
        assert res.hit_chunks == 2 and res.sources == ["disk", "disk"]
        got = mgr.get_many(["k1", "missing"])
        assert torch.equal(got[0].tensor, objs[1].tensor) and got[1] is None
        got[0].ref_down()
        assert mgr.hot.contains("k1")  # promoted
    finally:
        mgr.close()
    for obj in objs:
        obj.ref_down()
    assert mgr.allocator.live == 0


def stalled_manager(**config) -> tuple[StorageManager, threading.Event, list[str]]:
    """A manager whose writer hangs until ``release`` is set (a fault injected on purpose), and
    the keys it wrote, in order, once released."""
    mgr = StorageManager(load_config({"local_cpu": False, **config}, env={}))
    release = threading.Event()
    real_write = mgr._write_batch
    written: list[str] = []

    def stalled_write(batch):
        release.wait(10)
        written.extend(k for k, _ in batch)
        real_write(batch)

    mgr._write_batch = stalled_write
    return mgr, release, written


def put_five_behind_a_stuck_writer(mgr: StorageManager, tokens: int = 4) -> None:
    """k0 reaches the writer and sticks there; k1..k4 wait in the queue (or are dropped)."""
    first = _obj(mgr.allocator, tokens=tokens)
    mgr.put("k0", first)
    first.ref_down()
    deadline = time.monotonic() + 5
    while mgr._queue and time.monotonic() < deadline:  # the writer took k0 and is stuck on it
        time.sleep(0.01)
    for i in range(1, 5):
        obj = _obj(mgr.allocator, tokens=tokens)
        mgr.put(f"k{i}", obj)
        obj.ref_down()


def test_manager_queue_drops_oldest_when_full(tmp_path):
    mgr, release, written = stalled_manager(local_disk=str(tmp_path), put_queue_size=2)
    try:
        put_five_behind_a_stuck_writer(mgr)
        assert mgr.counters.puts_dropped == 2  # k1 and k2, the oldest pending ones
        release.set()
        assert mgr.flush(10)
        assert written == ["k0", "k3", "k4"]
        assert mgr.disk.contains("k4") and not mgr.disk.contains("k1")
    finally:
        release.set()
        mgr.close()
    assert mgr.allocator.live == 0


def test_close_finishes_queued_writes_and_says_so(tmp_path, caplog):
    """vLLM's worker shutdown calls close(): chunks still queued must reach the store before exit."""
    cfg = load_config({"local_disk": str(tmp_path), "local_cpu": False}, env={})
    mgr = StorageManager(cfg)
    real_write = mgr._write_batch

    def slow_write(batch):  # a slow encoder / store: each batch takes 50 ms
        time.sleep(0.05)
        real_write(batch)

    mgr._write_batch = slow_write
    for i in range(6):
        obj = _obj(mgr.allocator)
        mgr.put(f"k{i}", obj)
        obj.ref_down()
    with caplog.at_level("INFO", logger="vllm_kvcache_plugin"):
        mgr.close()
    reopened = DiskTier(str(tmp_path), 1 << 30, NaiveSerde(Allocator()))
    assert all(reopened.contains(f"k{i}") for i in range(6))
    assert any("queued chunk writes finished" in r.getMessage() for r in caplog.records), caplog.text
    assert mgr.allocator.live == 0


def test_manager_queue_is_bounded_in_bytes_with_the_hot_cache_off(tmp_path):
    """Two 16 KB chunks fit a 40 KB queue: each one beyond pushes the oldest pending one out."""
    mgr, release, _ = stalled_manager(local_disk=str(tmp_path), put_queue_max_gb=40e3 / 1e9)
    try:
        put_five_behind_a_stuck_writer(mgr, tokens=128)  # 16 KB of float32 each
        assert mgr.counters.puts_dropped == 2 and mgr.counters.puts_dropped_bytes == 2 * 16384
        assert mgr.counters.put_queue_bytes == 2 * 16384
        release.set()
        assert mgr.flush(10)
        assert [mgr.disk.contains(f"k{i}") for i in range(5)] == [True, False, False, True, True]
        assert mgr.counters.put_queue_bytes == 0
    finally:
        release.set()
        mgr.close()
    assert mgr.allocator.live == 0


def test_counters_are_exact_under_concurrency():
    """Forward, lookup and writer threads update the same counters: none may be lost."""
    from vllm_kvcache_plugin.metrics import StorageCounters, TierCounters

    tier, storage, hot = TierCounters("remote"), StorageCounters(), HotCache(1 << 30)
    alloc = Allocator()
    hot.put("present", _obj(alloc))
    threads, rounds = 4, 40000  # enough that unlocked read-add-writes do lose counts (checked)

    def hammer(i: int) -> None:
        for n in range(rounds):
            tier.add(hits=1, bytes_read=3)
            storage.add(lookups=1, lookup_chunks_total=2)
            if n % 10 == 0:
                obj = hot.get("present" if i % 2 else "absent")
                if obj is not None:
                    obj.ref_down()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a lost update would show
    try:
        workers = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(old)
    total = threads * rounds
    assert tier.snapshot()["hits"] == total and tier.bytes_read == 3 * total
    assert storage.lookups == total and storage.lookup_chunks_total == 2 * total
    assert hot.counters.hits == total // 20 and hot.counters.misses == total // 20


def test_warning_throttle_warns_once_per_interval_and_counts_the_rest(caplog):
    import logging

    from vllm_kvcache_plugin.storage.throttle import WarningThrottle

    log = logging.getLogger("vllm_kvcache_plugin.test_throttle")
    throttle = WarningThrottle(log, interval_secs=3600.0)  # no second warning within this test
    with caplog.at_level("DEBUG", logger="vllm_kvcache_plugin.test_throttle"):
        throttle.warn("store slow: %s", "a")
        throttle.warn("store slow: %s", "b")
        throttle.warn("store down: %s", "c", enabled=False)
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert levels == [("WARNING", "store slow: a"), ("DEBUG", "store slow: b"), ("DEBUG", "store down: c")]
    throttle._last -= 3600.0  # the interval has passed
    caplog.clear()
    with caplog.at_level("DEBUG", logger="vllm_kvcache_plugin.test_throttle"):
        throttle.warn("store slow: %s", "d")
    assert [r.getMessage() for r in caplog.records] == ["store slow: d (1 more like this since the last warning)"]


def test_a_lent_chunk_is_promoted_only_if_its_lease_held_through_the_copy():
    """The hot cache copies a chunk lent from shared memory; a copy finished after the lease ran out
    may hold another value's bytes, so it is not kept."""
    from vllm_kvcache_plugin.storage.manager import _promote

    alloc = Allocator()
    hot = HotCache(10**8)
    for key, valid_for in (("held", 60.0), ("expired", -1.0)):
        source = _obj(alloc, tokens=16)
        lent = alloc.allocate(source.meta, source.tensor.clone()).lend(lambda: None, time.monotonic() + valid_for)
        _promote((hot,), key, lent)
        lent.ref_down()
        source.ref_down()
    assert hot.contains("held") and not hot.contains("expired")
    kept = hot.get("held")
    assert kept is not None and not kept.lent
    kept.ref_down()
    hot.clear()
    assert alloc.live == 0
