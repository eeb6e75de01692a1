"""The remote tier: serde + a connector, behind deadlines, a health flag and an existence cache.

Every connector failure or time-out becomes a miss here (never an exception to the caller). A
refused or reset call marks the tier unhealthy at once; a time-out (or a failed load) starts
pings, and only a store that answers none of them is marked down. While unhealthy, lookups and loads
miss at once and writes are skipped, while a background task pings the store with exponential
back-off and restores the tier when it answers. Positive existence answers (and our own
successful writes) are remembered for ``existence_cache_ttl_secs``, so a repeated lookup costs no
round trip at all.

A connector with shared memory (lm:// on the same host: ``shm_active``) hands values over as views
of the server's memory under read leases instead of bytes received into pooled buffers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from .. import events
from ..config import KVCacheConfig
from ..connectors.base import RemoteConnector
from ..errors import CorruptValueError
from ..memory import ChunkMeta, MemoryObj
from ..metrics import StorageCounters, TierCounters
from ..serde.base import Serde
from .loop import EventLoopThread
from .throttle import WarningThrottle
from .tier import Tier, TierName

logger = logging.getLogger(__name__)

BACKOFF_START_SECS = 0.5
BACKOFF_MAX_SECS = 30.0
PROBE_PINGS = 2  # pings in a row a store must miss, after a time-out, to be marked down
WARN_INTERVAL_SECS = 30.0  # at most one time-out warning this often
HANDOFF_LEASE_FRACTION = 0.5  # a leased chunk goes to the caller only with this much of its lease left


class ExistenceCache:
    """Keys known to exist in the remote, each until its expiry (monotonic seconds)."""

    def __init__(self, ttl: float, max_entries: int = 1_000_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}

    def known(self, key: str, now: float) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry < now:
            self._expiry.pop(key, None)
            return False
        return True

    def add(self, key: str, now: float) -> None:
        if self.ttl <= 0:
            return
        if len(self._expiry) >= self.max_entries:
            self._expiry.clear()  # cheap and safe: the cache only saves round trips
        self._expiry[key] = now + self.ttl

    def discard(self, key: str) -> None:
        self._expiry.pop(key, None)

    def clear(self) -> None:
        self._expiry.clear()


class RemoteTier(Tier):
    name = TierName.REMOTE

    def __init__(self, connector: RemoteConnector, serde: Serde, config: KVCacheConfig, loop: EventLoopThread,
                 counters: TierCounters | None = None, storage_counters: StorageCounters | None = None) -> None:
        self.connector = connector
        self.serde = serde
        self.timeout = config.blocking_timeout_secs
        self.loop = loop
        self.counters = counters or TierCounters("remote")
        self.storage_counters = storage_counters or StorageCounters()
        self.existence = ExistenceCache(config.existence_cache_ttl_secs)
        self.healthy = False
        self.min_load_bytes_per_sec = config.min_load_gb_per_sec * 1e9
        self._reconnect_task: asyncio.Future | None = None
        self._probe_task: asyncio.Future | None = None
        self._slow_warnings = WarningThrottle(logger, WARN_INTERVAL_SECS)
        self._closed = False

    # -- health ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect within the time-out; if the store is down, warn and keep retrying in the background."""
        try:
            self.loop.run(asyncio.wait_for(self.connector.connect(), self.timeout), self.timeout + 1.0)
            self._set_healthy(True)
            logger.info("Remote store %s connected", self.connector.url.redacted())
        except Exception as exc:
            logger.warning("Remote store %s is unreachable at start-up (%s); every lookup is a miss until it "
                           "answers, retrying in the background", self.connector.url.redacted(), _reason(exc))
            self._mark_failed(exc, log=False)

    def _set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        self.storage_counters.set(remote_healthy=int(healthy))

    def _mark_failed(self, exc: BaseException, log: bool = True) -> None:
        self.counters.add(errors=1)
        if self.healthy and log:
            logger.warning("Remote store %s failed (%s); serving misses and retrying in the background",
                           self.connector.url.redacted(), _reason(exc))
        self._set_healthy(False)
        if not self._closed:
            self.loop.loop.call_soon_threadsafe(self._ensure_reconnect)

    def _ensure_reconnect(self) -> None:
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        delay = BACKOFF_START_SECS
        while not self._closed and not self.healthy:
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self.connector.connect(), self.timeout)
                ok = await asyncio.wait_for(self.connector.ping(), self.timeout)
            except Exception:
                ok = False
            if ok:
                self._set_healthy(True)
                self.storage_counters.add(remote_reconnects=1)
                logger.info("Remote store %s is back", self.connector.url.redacted())
                return
            delay = min(delay * 2, BACKOFF_MAX_SECS)

    def load_deadline(self, nbytes: int) -> float:
        """Seconds a load of ``nbytes`` may take: the blocking time-out plus the bytes at the
        slowest rate allowed (``min_load_gb_per_sec``), so a big load on a slow store can finish."""
        return self.timeout + nbytes / self.min_load_bytes_per_sec

    def _call(self, coro, what: str, deadline: float | None = None, nbytes: int = 0) -> tuple[bool, object]:
        """Run a connector coroutine within ``deadline`` (default: the blocking time-out):
        (True, result), or (False, None) on any failure. A store that refuses or resets the call is
        marked unhealthy at once. A call that ran out of time (any call: a lookup queued behind a
        big load on a busy 2-core host times out as easily as the load), or a load that failed, is
        a miss, and pings decide in the background: only a store that answers none of
        ``PROBE_PINGS`` in a row is marked down, so one slow moment under load does not turn every
        following hit into a recompute. A frozen store is marked down that many time-outs later."""
        deadline = self.timeout if deadline is None else deadline
        try:
            return True, self.loop.run(asyncio.wait_for(coro, deadline), deadline + 1.0)
        except (TimeoutError, asyncio.TimeoutError) as exc:  # ConnectorTimeout too
            self.counters.add(timeouts=1)
            if nbytes:
                self._warn_slow("Remote %s of %.1f MB took over %.1f s (slower than %.2f GB/s); a miss, and a ping "
                                "decides whether the store is down", what, nbytes / 1e6, deadline,
                                self.min_load_bytes_per_sec / 1e9)
            else:
                self._warn_slow("Remote %s got no answer in time (%s); a miss, and a ping decides whether the store "
                                "is down", what, _reason(exc))
            self._start_probe()
            return False, None
        except Exception as exc:
            if nbytes and not self._closed:
                self.counters.add(errors=1)
                self._warn_slow("Remote %s of %.1f MB failed (%s); a miss, and a ping decides whether the store "
                                "is down", what, nbytes / 1e6, _reason(exc))
                self._start_probe()
                return False, None
            logger.debug("Remote %s failed: %s", what, _reason(exc))
            self._mark_failed(exc)
            return False, None

    def _warn_slow(self, msg: str, *args: object) -> None:
        """A busy store would log one per request: at most one per WARN_INTERVAL_SECS, none while down."""
        self._slow_warnings.warn(msg, *args, enabled=self.healthy)

    def _start_probe(self) -> None:
        if not self._closed:
            self.loop.loop.call_soon_threadsafe(self._ensure_probe)

    def _ensure_probe(self) -> None:
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        """Ping up to PROBE_PINGS times: the first ping may itself queue behind the loads that made
        a call time out; only a store that answers none is marked down."""
        for _ in range(PROBE_PINGS):
            try:
                if await asyncio.wait_for(self.connector.ping(), self.timeout):
                    return
            except Exception:
                pass
            if self._closed or not self.healthy:
                return
        self._mark_failed(TimeoutError(f"no answer to {PROBE_PINGS} pings after a call timed out"))

    # -- data ------------------------------------------------------------------------------
    def batched_exists(self, keys: Sequence[str]) -> list[bool]:
        """Existence of each key: the existence cache first, then ONE batched round trip."""
        if not keys:
            return []
        now = time.monotonic()
        answer = [self.existence.known(k, now) for k in keys]
        unknown = [i for i, known in enumerate(answer) if not known]
        self.storage_counters.add(existence_cache_hits=len(keys) - len(unknown))
        if not unknown:
            return answer
        if not self.healthy:
            return answer
        ok, result = self._call(self.connector.batched_exists([keys[i] for i in unknown]), "exists")
        if not ok:
            return answer
        for i, present in zip(unknown, result, strict=True):
            if present:
                answer[i] = True
                self.existence.add(keys[i], now)
        return answer

    def batched_get(self, keys: Sequence[str], expected: ChunkMeta | None = None,
                    defer_check: bool = False) -> list[MemoryObj | None]:
        """Each key's chunk or None (missing, corrupt, foreign, or the store failed)."""
        if not keys or not self.healthy:
            self.counters.add(misses=len(keys))
            return [None] * len(keys)
        if getattr(self.connector, "shm_active", False):
            return self._get_leased(keys, expected, defer_check)
        size = self.receive_size(expected) if expected is not None else None
        if size is not None:
            return self._get_into_pooled(keys, expected, size, defer_check)
        max_size = getattr(self.serde, "max_value_size", None)
        nbytes = len(keys) * max_size(expected) if expected is not None and max_size is not None else 0
        ok, values = self._call(self.connector.batched_get(list(keys)), "get", self.load_deadline(nbytes), nbytes)
        if not ok:
            self.counters.add(misses=len(keys))
            return [None] * len(keys)
        return [self._decode(key, value, None, expected, defer_check=defer_check)
                for key, value in zip(keys, values, strict=True)]

    def _get_leased(self, keys: Sequence[str], expected: ChunkMeta | None,
                    defer_check: bool = False) -> list[MemoryObj | None]:
        """Values as read-only views of the server's shared memory, each under a read lease.

        The serde checks the header and the payload checksum over the mapping itself; only then is
        the lease's deadline checked, so a chunk whose lease ran out during the read (its region
        may hold another value by now) is a miss, never wrong data. A chunk that is a view of the
        mapping (naive) is lent to the caller with at least HANDOFF_LEASE_FRACTION of its lease left
        for the scatter, and its lease goes back when the caller's reference goes; any other holder
        (the hot cache's promotion) gets a copy (``MemoryObj.lend``). A chunk decoded into memory of
        its own (cachegen) gives its lease back at once."""
        max_size = getattr(self.serde, "max_value_size", None)
        nbytes = len(keys) * max_size(expected) if expected is not None and max_size is not None else 0
        ok, leased = self._call(self.connector.batched_get_leased(list(keys)), "get", self.load_deadline(nbytes),
                                nbytes)
        if not ok:
            self.counters.add(misses=len(keys))
            return [None] * len(keys)
        out: list[MemoryObj | None] = []
        for key, lease in zip(keys, leased, strict=True):
            if lease is None:
                out.append(self._decode(key, None, None, expected))
                continue
            usable_until = lease.deadline - HANDOFF_LEASE_FRACTION * lease.lease_secs
            obj = self._decode(key, lease.view, None, expected, usable_until, defer_check)
            tensor = None if obj is None else obj.tensor
            if obj is not None and tensor is not None and (
                    lease.address <= tensor.data_ptr() < lease.address + len(lease.view)):
                obj.lend(lease.release, lease.deadline)
            else:
                lease.release()
            out.append(obj)
        return out

    def receive_size(self, expected: ChunkMeta) -> int | None:
        """The pooled buffer a stored value of this geometry is received into, or None when this
        connector / serde pair cannot receive in place."""
        max_size = getattr(self.serde, "max_value_size", None)
        if not self.connector.supports_get_into or max_size is None:
            return None
        return max_size(expected)

    def _get_into_pooled(self, keys: Sequence[str], expected: ChunkMeta, size: int,
                         defer_check: bool = False) -> list[MemoryObj | None]:
        """Receive straight into pooled buffers: no fresh pages to fault in on the load path.

        A failed or timed-out receive hands its buffers back to the pool from the event loop, after
        the connector has given them up (see ``batched_get_into``), never from this thread: here the
        wait may end while bytes are still arriving, and a buffer reused then would be overwritten."""
        allocator = self.serde.allocator
        blocks = [allocator.buffer(size) for _ in keys]

        async def receive() -> list[int | None]:
            try:
                return await self.connector.batched_get_into(list(keys), [b.numpy() for b in blocks])
            except BaseException:
                for block in blocks:
                    allocator.recycle(block)
                raise

        nbytes = size * len(keys)
        ok, lengths = self._call(receive(), "get", self.load_deadline(nbytes), nbytes)
        if not ok:
            self.counters.add(misses=len(keys))
            return [None] * len(keys)
        out: list[MemoryObj | None] = []
        for key, block, n in zip(keys, blocks, lengths, strict=True):
            if n is None or n > size:  # a miss, or a value too big for this geometry (foreign)
                allocator.recycle(block)
                out.append(self._decode(key, None if n is None else b"", None, expected))
                continue
            out.append(self._decode(key, memoryview(block.numpy())[:n], block, expected, defer_check=defer_check))
        return out

    def _decode(self, key: str, value, block, expected: ChunkMeta | None,
                usable_until: float | None = None, defer_check: bool = False) -> MemoryObj | None:
        if value is None or len(value) == 0:
            self.counters.add(misses=1)
            self.existence.discard(key)
            if value is not None:  # present but unusable
                self.counters.add(corrupt=1)
                logger.warning("Remote chunk %s does not fit this model's chunks; recomputing", key)
                events.emit("chunk_rejected", logging.WARNING, tier=self.name.value, key=key, reason="foreign size")
            return None
        try:
            obj = (self.serde.deserialize(value, expected, defer_check) if block is None
                   else self.serde.deserialize_block(value, block, expected, defer_check))
        except CorruptValueError as exc:
            self.counters.add(misses=1)
            self._reject(key, str(exc))
            return None
        if not obj.checked:
            obj.on_corrupt(lambda: self._reject(key, "payload checksum mismatch"))
        if usable_until is not None and time.monotonic() > usable_until:
            obj.ref_down()  # read from shared memory whose lease ran out: the bytes may be another value's
            self.counters.add(misses=1, timeouts=1)
            logger.warning("Remote chunk %s: its shared-memory lease ran out during the read; recomputing", key)
            events.emit("chunk_rejected", logging.WARNING, tier=self.name.value, key=key, reason="lease expired")
            return None
        self.counters.add(hits=1, bytes_read=len(value))
        return obj

    def _reject(self, key: str, reason: str) -> None:
        """A corrupt value: counted, forgotten by the existence cache, and recomputed."""
        self.counters.add(corrupt=1)
        self.existence.discard(key)
        logger.warning("Remote chunk %s is corrupt (%s); recomputing", key, reason)
        events.emit("chunk_rejected", logging.WARNING, tier=self.name.value, key=key, reason=reason)

    def batched_put(self, items: Sequence[tuple[str, MemoryObj]]) -> bool:
        """Serialize in the calling thread (the writer), send in one batch. False if not stored."""
        if not items:
            return True
        if not self.healthy:
            return False
        now = time.monotonic()
        todo = [(k, o) for k, o in items if not self.existence.known(k, now)]
        if not todo:
            return True
        payload = []
        for key, obj in todo:
            try:
                payload.append((key, self.serde.serialize(obj)))
            except Exception as exc:  # e.g. values the codec rejects (NaN/inf): store nothing, say why
                self.counters.add(errors=1)
                logger.warning("Chunk %s not stored: %s serde refused it (%s)", key, self.serde.name, exc)
        if not payload:
            return False
        ok, _ = self._call(self.connector.batched_put(payload), "put")
        if not ok:
            return False
        for key, value in payload:
            self.existence.add(key, now)
            self.counters.add(puts=1, bytes_written=len(value))
        return True

    # -- Tier ------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[str]) -> list[bool]:
        return self.batched_exists(keys)

    def get_many(self, keys: Sequence[str], expected: ChunkMeta | None = None,
                 defer_check: bool = False) -> list[MemoryObj | None]:
        return self.batched_get(keys, expected, defer_check)

    def put_many(self, items: Sequence[tuple[str, MemoryObj]]) -> bool:
        return self.batched_put(items)

    def receive_sizes(self, expected: ChunkMeta) -> list[int]:
        size = self.receive_size(expected)
        return [] if size is None else [size]

    def prewarm(self, expected: ChunkMeta) -> None:
        """The serde's set-up (CacheGen: its coder and tables). A failure only costs the first load."""
        try:
            self.serde.prewarm(expected)
        except Exception as exc:
            logger.warning("Remote serde %s could not set up for %s chunks at start (%s); it sets up on its "
                           "first load instead", self.serde.name, expected.dtype, _reason(exc))

    def close(self) -> None:
        self._closed = True
        try:
            self.loop.run(self.connector.close(), self.timeout)
        except Exception as exc:
            logger.debug("Remote close failed: %s", _reason(exc))


def _reason(exc: BaseException) -> str:
    if str(exc):
        return str(exc)
    return "timed out" if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) else type(exc).__name__
