"""Connector statistics in vLLM's KVConnectorStats / Prometheus plumbing.

Each worker step returns the counts since the previous step (``StepStats.take``); vLLM aggregates
them per logging interval, prints ``reduce()`` in its periodic "KV Transfer metrics" log line and
feeds ``PromMetrics.observe`` for its /metrics endpoint. Storage-wide state (tier bytes, health,
allocator counts, evictions, dropped writes) travels as the latest cumulative snapshot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

# Counts summed across steps and workers.
SUMMED = ("loads", "load_tokens", "load_bytes", "load_errors", "saves", "save_tokens", "save_bytes",
          "lookups", "lookup_chunks", "lookup_hit_chunks", "hit_chunks_hot", "hit_chunks_disk",
          "hit_chunks_remote")
# Per-operation durations (seconds), concatenated.
TIMINGS = ("load_seconds", "save_seconds", "lookup_seconds")
# Cumulative storage counters and gauges: the latest snapshot wins.
SNAPSHOT_PREFIX = "store_"


@dataclass
class StepStats:
    """Worker-side accumulator; ``take`` returns and clears what the last steps recorded."""

    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # lookups are recorded from the lookup thread

    def _add(self, **values: float) -> None:
        for key, value in values.items():
            if key in TIMINGS:
                self.data.setdefault(key, []).append(value)
            else:
                self.data[key] = self.data.get(key, 0) + value

    def record_load(self, tokens: int, nbytes: int, failed: bool, seconds: float) -> None:
        with self._lock:
            self._add(loads=1, load_tokens=tokens, load_bytes=nbytes, load_errors=int(failed), load_seconds=seconds)

    def record_save(self, tokens: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._add(saves=1, save_tokens=tokens, save_bytes=nbytes, save_seconds=seconds)

    def record_lookup(self, chunks: int, hit_chunks: int, tiers: dict[str, int], seconds: float) -> None:
        with self._lock:
            self._add(lookups=1, lookup_chunks=chunks, lookup_hit_chunks=hit_chunks, lookup_seconds=seconds,
                      **{f"hit_chunks_{tier}": n for tier, n in tiers.items()})

    def take(self, storage_snapshot: dict[str, float] | None = None) -> dict[str, Any] | None:
        with self._lock:
            data, self.data = self.data, {}
        if not data and not storage_snapshot:
            return None
        for key, value in (storage_snapshot or {}).items():
            data[SNAPSHOT_PREFIX + key] = value
        return data


def flatten_storage_stats(stats: dict[str, Any]) -> dict[str, float]:
    """The storage manager's stats as flat numbers (cumulative counters and gauges)."""
    storage = stats["storage"]
    flat: dict[str, float] = {
        "remote_healthy": storage["remote_healthy"],
        "puts_dropped": storage["puts_dropped"],
        "puts_done": storage["puts_done"],
        "remote_reconnects": storage["remote_reconnects"],
        "hot_bytes": stats["hot_bytes"],
        "disk_bytes": stats["disk_bytes"],
        "allocations": stats["allocator"]["allocations"],
        "frees": stats["allocator"]["frees"],
        "live_chunks": stats["allocator"]["live"],
    }
    for tier, counters in stats["tiers"].items():
        for name in ("hits", "misses", "evictions", "errors", "corrupt", "bytes_read", "bytes_written"):
            flat[f"{tier}_{name}"] = counters[name]
    return flat


class KVCacheConnectorStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in (*SUMMED, *TIMINGS))

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if key in TIMINGS:
                self.data.setdefault(key, []).extend(value)
            elif key.startswith(SNAPSHOT_PREFIX):
                self.data[key] = value
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {}
        if d.get("lookups"):
            out["lookup_hit_rate"] = round(d.get("lookup_hit_chunks", 0) / max(1, d.get("lookup_chunks", 0)), 3)
            out["hit_chunks(hot/disk/remote)"] = (
                f"{d.get('hit_chunks_hot', 0)}/{d.get('hit_chunks_disk', 0)}/{d.get('hit_chunks_remote', 0)}")
        if d.get("loads"):
            secs = d.get("load_seconds", [])
            out["loaded_tokens"] = d.get("load_tokens", 0)
            out["load_MB"] = round(d.get("load_bytes", 0) / 1e6, 1)
            out["load_ms_avg"] = round(1e3 * sum(secs) / max(1, len(secs)), 2)
            out["load_errors"] = d.get("load_errors", 0)
        if d.get("saves"):
            secs = d.get("save_seconds", [])
            out["saved_tokens"] = d.get("save_tokens", 0)
            out["save_MB"] = round(d.get("save_bytes", 0) / 1e6, 1)
            out["save_ms_avg"] = round(1e3 * sum(secs) / max(1, len(secs)), 2)
        if f"{SNAPSHOT_PREFIX}remote_healthy" in d:
            out["remote_healthy"] = int(d[f"{SNAPSHOT_PREFIX}remote_healthy"])
            out["puts_dropped"] = int(d.get(f"{SNAPSHOT_PREFIX}puts_dropped", 0))
        return out


_PROM_COUNTERS = {
    "load_tokens": "Prompt tokens loaded from the KV cache store",
    "load_bytes": "Bytes of KV loaded into vLLM's paged cache",
    "load_errors": "Loads that failed and were recomputed",
    "save_tokens": "Prompt tokens saved to the KV cache store",
    "save_bytes": "Bytes of KV gathered for saving",
    "lookup_chunks": "Chunks asked for by prefix lookups",
    "lookup_hit_chunks": "Chunks found by prefix lookups",
    "hit_chunks_hot": "Lookup hits served by the CPU hot cache",
    "hit_chunks_disk": "Lookup hits served by the local disk tier",
    "hit_chunks_remote": "Lookup hits served by the remote store",
}
_PROM_HISTOGRAMS = {
    "load_seconds": "Time to load one request's chunks (get + deserialize + scatter)",
    "save_seconds": "Time to gather and queue one request's chunks",
    "lookup_seconds": "Time of one prefix lookup in the worker's tiers",
}
# Cumulative snapshot values exported as counters (by delta) and gauges.
_PROM_SNAPSHOT_COUNTERS = ("allocations", "frees", "puts_dropped", "remote_reconnects", "hot_evictions",
                           "disk_evictions", "remote_errors", "remote_corrupt", "disk_corrupt", "remote_bytes_read",
                           "remote_bytes_written", "disk_bytes_read", "disk_bytes_written")
_PROM_GAUGES = ("remote_healthy", "hot_bytes", "disk_bytes", "live_chunks")
_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
PREFIX = "vllm:kvcache_plugin_"


class PromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(metric):
            return {idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()}

        self.counters = {k: per_engine(self._counter_cls(name=f"{PREFIX}{k}", documentation=doc,
                                                         labelnames=labelnames))
                         for k, doc in _PROM_COUNTERS.items()}
        self.histograms = {k: per_engine(self._histogram_cls(name=f"{PREFIX}{k}", documentation=doc,
                                                             labelnames=labelnames, buckets=_BUCKETS))
                           for k, doc in _PROM_HISTOGRAMS.items()}
        self.snapshot_counters = {
            k: per_engine(self._counter_cls(name=f"{PREFIX}store_{k}", documentation=f"Storage: {k} (cumulative)",
                                            labelnames=labelnames))
            for k in _PROM_SNAPSHOT_COUNTERS}
        self.gauges = {k: per_engine(self._gauge_cls(name=f"{PREFIX}store_{k}", documentation=f"Storage: {k}",
                                                     labelnames=labelnames, multiprocess_mode="mostrecent"))
                       for k in _PROM_GAUGES}
        self._last_seen: dict[tuple[int, str], float] = {}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, metric in self.counters.items():
            value = transfer_stats_data.get(key, 0)
            if value:
                metric[engine_idx].inc(value)
        for key, metric in self.histograms.items():
            for value in transfer_stats_data.get(key, ()):
                metric[engine_idx].observe(value)
        for key, metric in self.snapshot_counters.items():
            value = transfer_stats_data.get(SNAPSHOT_PREFIX + key)
            if value is None:
                continue
            last = self._last_seen.get((engine_idx, key), 0)
            if value > last:
                metric[engine_idx].inc(value - last)
            self._last_seen[(engine_idx, key)] = value
        for key, metric in self.gauges.items():
            value = transfer_stats_data.get(SNAPSHOT_PREFIX + key)
            if value is not None:
                metric[engine_idx].set(value)
