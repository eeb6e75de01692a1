"""Counters and latency histograms shared by the tiers, the engine and the vLLM adapter.

Plain objects with no dependency: the vLLM adapter turns snapshots of them into vLLM's
KVConnectorStats / Prometheus metrics, the lm server into its /metrics text.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field, fields

# Seconds; covers a hot-cache hit (~100 us) to a remote time-out (seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Counters:
    """Counters updated from several threads at once (vLLM's forward, the lookup channel, the
    writer, the event loop): ``x += n`` on an attribute is a read and a write, and two threads
    interleaving them lose counts. Every update goes through :meth:`add` / :meth:`set` under one
    lock; :meth:`snapshot` reads them all under it."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def set(self, **values: int) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {f.name: (v.snapshot() if isinstance(v := getattr(self, f.name), Histogram) else v)
                    for f in fields(self)}


@dataclass
class TierCounters(_Counters):
    """What happened in one tier (hot, disk, remote) since start."""

    tier: str
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    corrupt: int = 0
    timeouts: int = 0


@dataclass
class Histogram:
    """A cumulative-bucket histogram (Prometheus semantics), thread-safe."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        idx = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self.counts[idx] += 1
            self.total += value
            self.count += 1

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total,
                    "count": self.count}

    def quantile(self, q: float) -> float:
        """Upper bucket bound below which a fraction ``q`` of observations fall (inf if beyond)."""
        with self._lock:
            target = q * self.count
            seen = 0
            for bound, n in zip(self.buckets, self.counts, strict=False):
                seen += n
                if seen >= target and self.count:
                    return bound
        return float("inf")


@dataclass
class StorageCounters(_Counters):
    """Storage-manager wide counters (besides the per-tier ones)."""

    lookups: int = 0
    lookup_chunks_hit: int = 0
    lookup_chunks_total: int = 0
    puts_queued: int = 0
    puts_dropped: int = 0
    puts_dropped_bytes: int = 0
    puts_done: int = 0
    put_queue_bytes: int = 0  # a gauge: bytes of chunks waiting to be written
    remote_healthy: int = 1
    remote_reconnects: int = 0
    existence_cache_hits: int = 0
    lookup_latency: Histogram = field(default_factory=Histogram)
    get_latency: Histogram = field(default_factory=Histogram)
    put_latency: Histogram = field(default_factory=Histogram)
