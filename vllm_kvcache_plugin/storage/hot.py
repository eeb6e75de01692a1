"""The CPU hot cache: an LRU of chunks that never holds more than its byte budget."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..lru import ByteLRU
from ..memory import ChunkMeta, MemoryObj
from ..metrics import TierCounters
from .tier import Tier, TierName


class HotCache(Tier):
    """Thread-safe LRU. The cache holds one reference to each chunk it stores."""

    name = TierName.HOT
    writes_inline = True
    promotes = True

    def __init__(self, max_bytes: int, counters: TierCounters | None = None) -> None:
        self.max_bytes = max_bytes
        self.counters = counters or TierCounters("hot")
        self._entries: ByteLRU[str, MemoryObj] = ByteLRU(max_bytes)
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        return self._entries.used

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    # -- Tier ------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [key in self._entries for key in keys]

    def get_many(self, keys: Sequence[str], expected: ChunkMeta | None = None,
                 defer_check: bool = False) -> list[MemoryObj | None]:
        out = []  # chunks in memory were checked when they came in
        for key in keys:
            obj = self.get(key)
            if obj is not None and expected is not None and not obj.meta.fits(expected):
                obj.ref_down()  # another model's geometry under this key: not ours to load
                obj = None
            out.append(obj)
        return out

    def put_many(self, items: Sequence[tuple[str, MemoryObj]]) -> bool:
        return all([self.put(key, obj) for key, obj in items])

    def close(self) -> None:
        self.clear()

    # -- single keys -----------------------------------------------------------------------
    def get(self, key: str) -> MemoryObj | None:
        """The chunk with a reference taken for the caller (who must ``ref_down``), or None."""
        with self._lock:
            obj = self._entries.get(key)
            if obj is None:
                self.counters.add(misses=1)
                return None
            self.counters.add(hits=1, bytes_read=obj.nbytes)
            return obj.ref_up()

    def put(self, key: str, obj: MemoryObj) -> bool:
        """Store ``obj`` (taking a reference); evict least recently used chunks to fit.

        A chunk larger than the whole budget is not stored (returns False)."""
        if obj.nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key)
            evicted = [victim for _, victim in self._entries.evict(obj.nbytes)]
            self._entries.add(key, obj.ref_up(), obj.nbytes)
            self.counters.add(puts=1, bytes_written=obj.nbytes, evictions=len(evicted))
        if old is not None:
            evicted.append(old[0])
        for victim in evicted:
            victim.ref_down()
        return True

    def remove(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.pop(key)
        if entry is None:
            return False
        entry[0].ref_down()
        return True

    def clear(self) -> None:
        with self._lock:
            entries = self._entries.clear()
        for obj in entries:
            obj.ref_down()
