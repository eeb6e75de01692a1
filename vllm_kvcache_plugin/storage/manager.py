"""The storage manager: tier order, promotion, the asynchronous write queue, prefix lookups.

Tiers (tier.py: hot, disk, remote) are searched in that order; the manager knows them only
through the :class:`Tier` interface. ``put`` stores into the hot cache at once (the caller's
tensor, no copy) and queues the disk and remote writes for a writer thread, so the caller (vLLM's
forward loop) never waits on I/O. The queue is bounded in count and in bytes: beyond either, the
oldest pending writes are dropped and counted. A hit in a lower tier is promoted to the hot cache.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config import KVCacheConfig
from ..connectors import RemoteConnector, create_connector
from ..memory import Allocator, ChunkMeta, MemoryObj
from ..metrics import StorageCounters, TierCounters
from ..serde import create_serde
from ..threads import start_thread
from .disk import DiskTier
from .hot import HotCache
from .loop import EventLoopThread
from .remote import RemoteTier
from .tier import Tier, TierName

logger = logging.getLogger(__name__)

WRITE_BATCH = 8


@dataclass
class LookupResult:
    """How many leading chunks exist, and which tier holds each of them."""

    hit_chunks: int
    sources: list[str] = field(default_factory=list)

    def count_by_tier(self) -> dict[str, int]:
        return dict(collections.Counter(self.sources))


class StorageManager:
    def __init__(self, config: KVCacheConfig, allocator: Allocator | None = None,
                 connector: RemoteConnector | None = None, serde_options: dict | None = None) -> None:
        self.config = config
        self.allocator = allocator or Allocator()
        self.counters = StorageCounters()
        self.tier_counters = {name.value: TierCounters(name.value) for name in TierName}
        self._loop: EventLoopThread | None = None
        self._tiers: list[Tier] = self._build_tiers(connector, serde_options or {})
        by_name = {tier.name: tier for tier in self._tiers}
        # The tiers by name, for callers that look into one (tests, the engine's stats).
        self.hot: HotCache | None = by_name.get(TierName.HOT)  # type: ignore[assignment]
        self.disk: DiskTier | None = by_name.get(TierName.DISK)  # type: ignore[assignment]
        self.remote: RemoteTier | None = by_name.get(TierName.REMOTE)  # type: ignore[assignment]
        if not self._tiers:
            logger.warning("No storage tier is enabled (local_cpu off, no local_disk, no remote_url): "
                           "nothing will be cached")
        self._inline = [t for t in self._tiers if t.writes_inline]
        self._queued = [t for t in self._tiers if not t.writes_inline]
        self._queue: collections.deque[tuple[str, MemoryObj]] = collections.deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._inflight = 0
        self._closed = False
        self._writer: threading.Thread | None = None
        if self._queued:
            self._writer = start_thread(self._write_loop, "kvcache-writer")

    def _build_tiers(self, connector: RemoteConnector | None, serde_options: dict) -> list[Tier]:
        """The enabled tiers, in search order: hot, disk, remote."""
        config, tiers = self.config, []
        if config.local_cpu and config.max_local_cpu_bytes > 0:
            tiers.append(HotCache(config.max_local_cpu_bytes, self.tier_counters["hot"]))
        if config.local_disk_path and config.max_local_disk_bytes > 0:
            # The disk keeps the exact KV whatever the remote's serde: it is local and cheap to fill.
            tiers.append(DiskTier(config.local_disk_path, config.max_local_disk_bytes,
                                  create_serde("naive", allocator=self.allocator), self.tier_counters["disk"]))
        if connector is None and config.remote_url:
            connector = create_connector(config.remote_url, config)
        if connector is not None:
            self._loop = EventLoopThread()
            serde = create_serde(config.remote_serde, allocator=self.allocator, config=config, **serde_options)
            remote = RemoteTier(connector, serde, config, self._loop, self.tier_counters["remote"], self.counters)
            remote.start()
            tiers.append(remote)
        return tiers

    @property
    def tiers(self) -> list[str]:
        return [tier.name.value for tier in self._tiers]

    def receive_sizes(self, expected: ChunkMeta) -> list[int]:
        """Buffer sizes loads of this geometry receive into, over every tier (to pre-warm them)."""
        return [size for tier in self._tiers for size in tier.receive_sizes(expected)]

    def prewarm(self, expected: ChunkMeta) -> None:
        """Each tier's one-time set-up for loads of this geometry (Tier.prewarm)."""
        for tier in self._tiers:
            tier.prewarm(expected)

    # -- writes ----------------------------------------------------------------------------
    def put(self, key: str, obj: MemoryObj) -> None:
        """Store ``obj`` under ``key``. The caller keeps (and must drop) its own reference."""
        for tier in self._inline:
            tier.put_many([(key, obj)])
        if self._writer is None:
            return
        dropped: list[MemoryObj] = []
        with self._cond:
            # Bounded in count and in bytes; the newest write always gets in (a stale one is the
            # cheaper loss: its prompt is older), so one chunk above the byte bound is still stored.
            while self._queue and (len(self._queue) >= self.config.put_queue_size
                                   or self._queued_bytes + obj.nbytes > self.config.put_queue_max_bytes):
                _, old = self._queue.popleft()
                self._queued_bytes -= old.nbytes
                dropped.append(old)
            self._queue.append((key, obj.ref_up()))
            self._queued_bytes += obj.nbytes
            self.counters.add(puts_queued=1, puts_dropped=len(dropped),
                              puts_dropped_bytes=sum(o.nbytes for o in dropped))
            self.counters.set(put_queue_bytes=self._queued_bytes)
            self._cond.notify()
        for old in dropped:
            old.ref_down()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(WRITE_BATCH, len(self._queue)))]
                self._queued_bytes -= sum(obj.nbytes for _, obj in batch)
                self.counters.set(put_queue_bytes=self._queued_bytes)
                self._inflight = len(batch)
            try:
                self._write_batch(batch)
            except Exception:  # never let the writer die: a lost write is only a future miss
                logger.exception("Writing %d chunks failed", len(batch))
            finally:
                for _, obj in batch:
                    obj.ref_down()
                with self._cond:
                    self._inflight = 0
                    self.counters.add(puts_done=len(batch))
                    self._cond.notify_all()

    def _write_batch(self, batch: list[tuple[str, MemoryObj]]) -> None:
        start = time.perf_counter()
        for tier in self._queued:
            if not tier.put_many(batch):  # refused (store down, disk full): counted as dropped
                self.counters.add(puts_dropped=len(batch))
        self.counters.put_latency.observe(time.perf_counter() - start)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued write is done (tests, shutdown). False on time-out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    # -- reads -----------------------------------------------------------------------------
    def lookup_prefix(self, keys: Sequence[str]) -> LookupResult:
        """How many leading ``keys`` exist in any tier. Each tier is asked once, for the keys the
        tiers above it lack from the first gap on (so the remote costs at most ONE round trip)."""
        start = time.perf_counter()
        sources: list[str | None] = [None] * len(keys)
        for tier in self._tiers:
            first_missing = next((i for i, s in enumerate(sources) if s is None), len(keys))
            todo = [i for i in range(first_missing, len(keys)) if sources[i] is None]
            if not todo:
                break
            for i, present in zip(todo, tier.lookup([keys[i] for i in todo]), strict=True):
                if present:
                    sources[i] = tier.name.value
        hit = next((i for i, s in enumerate(sources) if s is None), len(keys))
        self.counters.add(lookups=1, lookup_chunks_total=len(keys), lookup_chunks_hit=hit)
        self.counters.lookup_latency.observe(time.perf_counter() - start)
        return LookupResult(hit, [s for s in sources[:hit] if s is not None])

    def get_many(self, keys: Sequence[str], expected: ChunkMeta | None = None,
                 defer_check: bool = False) -> list[MemoryObj | None]:
        """Each key's chunk (a reference the caller must drop) or None, searched tier by tier;
        a hit is copied into the tiers above it that promote (the hot cache). ``defer_check``: see
        :meth:`Tier.get_many`; a chunk whose check is deferred is promoted once its reader has
        verified it (``MemoryObj.after_check``), so nothing unverified is kept and promotion costs
        no pass of its own (a reader that could decode straight into vLLM's blocks sees the chunk
        ``awaited`` and decodes it into its tensor, to be kept)."""
        start = time.perf_counter()
        out: list[MemoryObj | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        promote_into: list[Tier] = []
        for tier in self._tiers:
            if not todo:
                break
            found = tier.get_many([keys[i] for i in todo], expected, defer_check)
            for i, obj in zip(todo, found, strict=True):
                out[i] = obj
                if obj is not None and promote_into:
                    obj.after_check(functools.partial(_promote, tuple(promote_into), keys[i]))
            todo = [i for i in todo if out[i] is None]
            if tier.promotes:
                promote_into.append(tier)
        self.counters.get_latency.observe(time.perf_counter() - start)
        return out

    # -- lifecycle -------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        out: dict[str, object] = {"storage": self.counters.snapshot(),
                                  "tiers": {n: c.snapshot() for n, c in self.tier_counters.items()},
                                  "allocator": {"allocations": self.allocator.allocations,
                                                "frees": self.allocator.frees,
                                                "live": self.allocator.live,
                                                "bytes_live": self.allocator.bytes_live}}
        out["hot_bytes"] = self.hot.bytes_used if self.hot is not None else 0
        out["disk_bytes"] = self.disk.bytes_used if self.disk is not None else 0
        return out

    def close(self, flush_timeout: float = 10.0) -> None:
        if self._closed:
            return
        with self._cond:
            waiting = len(self._queue) + self._inflight
        start = time.perf_counter()
        flushed = self.flush(flush_timeout)
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
        if waiting:
            # Saves still queued at shutdown: say whether they made it (a restart hits only what did).
            log = logger.info if flushed else logger.warning
            outcome = "finished" if flushed else f"not finished ({len(pending)} dropped)"
            log("Shutdown: %d queued chunk writes %s in %.0f ms", waiting, outcome,
                1e3 * (time.perf_counter() - start))
        for _, obj in pending:
            obj.ref_down()
        if self._writer:
            self._writer.join(timeout=flush_timeout)
        for tier in self._tiers:
            tier.close()
        if self._loop:
            self._loop.stop()


def _promote(tiers: tuple[Tier, ...], key: str, obj: MemoryObj) -> None:
    """Keep a loaded chunk in the tiers above the one it came from (it runs on the reader's thread,
    inside its check: a failure here must not fail the load). A chunk lent from shared memory is
    copied first (``ref_up``), and the copy is kept only if the lease still held once it was made:
    after that, the region may hold another value."""
    try:
        held = obj.ref_up()
        try:
            if not obj.lease_held():
                logger.debug("Chunk %s: its lease ran out before the hot cache's copy was made; not kept", key)
                return
            for tier in tiers:
                tier.put_many([(key, held)])
        finally:
            held.ref_down()
    except Exception:
        logger.exception("Promoting chunk %s failed; it stays where it was", key)
