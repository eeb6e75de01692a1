"""The server's store: key -> value in memory, least recently used first out, within a byte budget.

The budget covers stored values, the buffers of values still arriving and the free buffers kept
for reuse. A PUT allocates (evicting as needed) before its body is received, so a thousand
half-sent values cannot push memory past the budget. Each entry costs its value, its key and a
fixed overhead.

Buffers of evicted, deleted or replaced values are kept (within the budget) and handed to the next
value of the same size: KV chunks mostly share one size, and fresh memory costs page faults that
on this kind of VM are slower than the network copy itself. With a :class:`DiskSpill`, evicted
values move to disk; a value read back is promoted to memory and keeps its disk copy (evicting it
again costs no write until it changes).

With an :class:`~.arena.Arena` (shared memory on), values live in regions of the arena instead of
bytearrays (the arena's free list replaces the pool of free buffers), so a client on the same host
can read them through its mapping under a lease; a region that leases or replies being sent still
hold outlives its entry (see arena.py), inside the arena, so memory never exceeds the budget.

A :class:`~.key_index.KeyIndex` holds every key stored in memory or on disk with its value's size
(LIST, LIST_PAGE, the key count); the store updates it wherever a key comes or goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..lm_protocol import new_buffer
from ..lru import ByteLRU
from .arena import Arena, Region
from .disk import DiskSpill
from .key_index import KeyIndex

ENTRY_OVERHEAD = 64  # bytes charged per entry for the dict slot, the key object and the value object
RECYCLE_MIN = 64 * 1024  # smaller buffers are cheap to allocate: not worth keeping


def entry_cost(key_len: int, value_len: int) -> int:
    return key_len + value_len + ENTRY_OVERHEAD


@dataclass
class StoreCounters:
    hits: int = 0
    misses: int = 0
    disk_hits: int = 0
    evictions: int = 0
    spills: int = 0
    rejected_no_space: int = 0
    recycled_buffers: int = 0


class MemoryStore:
    """Single-threaded (the server's event loop); every method is synchronous."""

    def __init__(self, budget: int, disk: DiskSpill | None = None, arena: Arena | None = None) -> None:
        if budget <= 0:
            raise ValueError(f"memory budget must be positive, got {budget}")
        self.budget = budget
        self.disk = disk
        self.reserved = 0  # cost of entries being received
        self.pooled = 0  # bytes of free buffers kept for reuse
        self.counters = StoreCounters()
        self._entries: ByteLRU[bytes, bytearray] = ByteLRU(budget)  # key -> (value, entry cost)
        self._clean: set[bytes] = set()  # keys whose disk copy equals the memory value
        self._free: dict[int, list[bytearray]] = {}  # size -> free buffers
        self.arena = arena
        self._regions: dict[int, Region] = {}  # id(view) -> its arena region (arena mode)
        self.index = KeyIndex()
        if disk is not None:
            for key, size in disk.value_sizes():
                self.index.add(key, size)
            disk.on_drop = self._disk_dropped

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used(self) -> int:
        """Cost of the stored entries."""
        return self._entries.used

    @property
    def total(self) -> int:
        """Bytes charged against the budget (stored + reserved + pooled); never above it."""
        return self.used + self.reserved + self.pooled

    # -- writes ------------------------------------------------------------------------------
    def allocate(self, key_len: int, value_len: int) -> bytearray | None:
        """Reserve an entry's cost and return the buffer to receive its value into; None when
        values still arriving hold the memory (or the entry is larger than the budget)."""
        cost = entry_cost(key_len, value_len)
        if cost > self.budget:
            return None
        if self.arena is not None:
            return self._allocate_region(value_len, cost)
        buffer = self._take_free(value_len)
        while self.total + cost > self.budget:
            if self.pooled:
                self._drop_free()
            elif self._entries:
                self._evict_oldest()
                if buffer is None:
                    buffer = self._take_free(value_len)
            else:
                break
        if self.total + cost > self.budget:
            self.counters.rejected_no_space += 1
            return None
        self.reserved += cost
        return buffer if buffer is not None else new_buffer(value_len)

    def _allocate_region(self, value_len: int, cost: int) -> memoryview | None:
        """Evict until the entry fits both the budget and a hole of the arena (expired leases are
        swept first: they only hold regions of values already gone)."""
        arena = self.arena
        assert arena is not None
        while True:
            if self.total + cost <= self.budget:
                region = arena.alloc(value_len)
                if region is not None:
                    break
                if arena.leases.sweep(time.monotonic()):
                    continue
            if not self._entries:
                self.counters.rejected_no_space += 1
                return None
            self._evict_oldest()
        self.reserved += cost
        self._regions[id(region.view)] = region
        return region.view

    def region_of(self, value: object) -> Region | None:
        """The arena region a stored value lives in (None: not in the arena)."""
        return self._regions.get(id(value))

    def reserve(self, nbytes: int) -> bool:
        """Charge ``nbytes`` of transient buffers (a large frame's meta) to the budget, evicting
        as needed; False when that is impossible. Give them back with :meth:`unreserve`."""
        while self.total + nbytes > self.budget and (self.pooled or self._entries):
            self._drop_free() if self.pooled else self._evict_oldest()
        if self.total + nbytes > self.budget:
            self.counters.rejected_no_space += 1
            return False
        self.reserved += nbytes
        return True

    def unreserve(self, nbytes: int) -> None:
        self.reserved -= nbytes

    def release(self, key_len: int, buffer: bytearray) -> None:
        """Give back an allocation whose value never arrived."""
        self.reserved -= entry_cost(key_len, len(buffer))
        self._recycle(buffer)

    def commit(self, key: bytes, buffer: bytearray) -> None:
        """Store a value received into an :meth:`allocate` buffer (replacing any old value)."""
        self.reserved -= entry_cost(len(key), len(buffer))
        self._drop_memory(key)
        if self.disk is not None:
            self.disk.delete(key)  # stale now
        self._entries.add(key, buffer, entry_cost(len(key), len(buffer)))
        self.index.add(key, len(buffer))

    def delete(self, key: bytes) -> bool:
        found = self._drop_memory(key)
        if self.disk is not None and self.disk.delete(key):
            found = True
        self.index.discard(key)
        return found

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: bytes) -> bytearray | None:
        value = self._entries.get(key)
        if value is not None:
            self.counters.hits += 1
            return value
        if self.disk is not None:
            value = self.disk.read(key)
            if value is not None:
                self.counters.hits += 1
                self.counters.disk_hits += 1
                return self._promote(key, value)
        self.counters.misses += 1
        return None

    def contains(self, key: bytes) -> bool:
        return key in self._entries or (self.disk is not None and key in self.disk)

    def keys(self, prefix: bytes = b"") -> list[bytes]:
        return sorted(k for k in self.index if k.startswith(prefix))

    def key_count(self) -> int:
        return len(self.index)

    # -- internals ---------------------------------------------------------------------------
    def _promote(self, key: bytes, value: bytearray) -> bytearray | memoryview:
        """Bring a value read from disk back into memory; returns what to serve."""
        cost = entry_cost(len(key), len(value))
        if self.arena is not None:
            view = self.allocate(len(key), len(value))
            if view is None:
                return value  # values still arriving hold the memory: serve from disk only
            view[:] = value
            value = view  # type: ignore[assignment]
        elif not self.reserve(cost):
            return value
        self.reserved -= cost
        self._entries.add(key, value, cost)
        self._clean.add(key)
        return value

    def _drop_memory(self, key: bytes) -> bool:
        entry = self._entries.pop(key)
        if entry is None:
            return False
        self._clean.discard(key)
        self._recycle(entry[0])
        return True

    def _evict_oldest(self) -> None:
        key, value, _ = self._entries.pop_oldest()
        self.counters.evictions += 1
        clean = key in self._clean
        self._clean.discard(key)
        if self.disk is not None and not (clean and key in self.disk) and self.disk.write(key, value):
            self.counters.spills += 1
        if self.disk is None or key not in self.disk:
            self.index.discard(key)
        self._recycle(value)

    def _disk_dropped(self, key: bytes) -> None:
        if key not in self._entries:
            self.index.discard(key)

    def _recycle(self, buffer: bytearray) -> None:
        """Arena mode: retire the buffer's region (arena.py frees it once nothing reads it). Else
        keep ``buffer`` for reuse if it is large, fits the budget and nobody holds a view of it
        (a reply still being sent does): shrinking a bytearray fails while views exist, and
        shrinking by one byte and appending it back never reallocates."""
        if self.arena is not None:
            region = self._regions.pop(id(buffer), None)
            if region is not None:
                self.arena.retire(region)
            return
        size = len(buffer)
        if size < RECYCLE_MIN or self.total + size > self.budget:
            return
        last = buffer[-1]
        try:
            del buffer[-1]
        except BufferError:
            return
        buffer.append(last)
        self._free.setdefault(size, []).append(buffer)
        self.pooled += size

    def _take_free(self, size: int) -> bytearray | None:
        buffers = self._free.get(size)
        if not buffers:
            return None
        buffer = buffers.pop()
        if not buffers:
            del self._free[size]
        self.pooled -= size
        self.counters.recycled_buffers += 1
        return buffer

    def _drop_free(self) -> None:
        size, buffers = next(iter(self._free.items()))
        buffers.pop()
        if not buffers:
            del self._free[size]
        self.pooled -= size
