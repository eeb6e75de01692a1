"""The lm server's shared-memory arena: one memfd the size of the memory budget, carved into value
regions by a first-fit allocator, and the read leases that keep a region from being reused while a
client on the same host reads it through its own (read-only) mapping of the same fd.

Why one memfd: its fd is handed to a client once (SCM_RIGHTS, see shm.py) and mapped once, after
which a value is only an (offset, length) pair. Why first-fit with coalescing: the KV chunks of one
model share a size, so a freed region is reused whole, and mixed sizes merge back into large holes.

A region is *live* while the store holds it (stored, or being received) and *referenced* while
leases or TCP replies still being sent hold it. It returns to the free list only when it is
neither: an evicted, replaced or deleted value that a client still reads is never overwritten.
Leases expire (``lease_secs`` after they were granted) so a client that dies or stalls cannot pin
memory for ever; a client must treat its view as void past that time (it checks its own clock).
"""

from __future__ import annotations

import bisect
import mmap
import os
import time

from ..lm_protocol import SHM_MAGIC as MAGIC

HEADER_BYTES = 4096  # MAGIC + arena id at offset 0: a client checks it mapped the arena it was told of
ALIGN = 64  # region starts are cache-line aligned; the rounding is covered by the per-entry overhead


def _round_up(n: int) -> int:
    return (max(n, 1) + ALIGN - 1) // ALIGN * ALIGN


class Region:
    __slots__ = ("length", "live", "offset", "refs", "size", "view")

    def __init__(self, offset: int, size: int, length: int, view: memoryview) -> None:
        self.offset, self.size, self.length, self.view = offset, size, length, view
        self.live = True  # held by the store
        self.refs = 0  # leases + replies in flight


class Arena:
    """Single-threaded (the server's event loop)."""

    def __init__(self, capacity: int, lease_secs: float = 10.0) -> None:
        self.size = HEADER_BYTES + _round_up(capacity)
        self.fd = os.memfd_create("vllm-kvcache-lm-arena", os.MFD_CLOEXEC)  # OSError where unsupported
        try:
            os.ftruncate(self.fd, self.size)  # sparse: pages are only allocated when first written
            self._map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.id = os.urandom(16)
        self._map[: len(MAGIC) + 16] = MAGIC + self.id
        self._view = memoryview(self._map)
        self._free: list[list[int]] = [[HEADER_BYTES, self.size - HEADER_BYTES]]  # [offset, size], by offset
        self.free_bytes = self.size - HEADER_BYTES
        self.held_bytes = 0  # regions the store let go of that leases or replies still hold
        self.leases = Leases(lease_secs, self)

    # -- allocation --------------------------------------------------------------------------
    def alloc(self, length: int) -> Region | None:
        """A region for a value of ``length`` bytes, or None when no hole is large enough."""
        need = _round_up(length)
        for i, (offset, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = [offset + need, size - need]
                self.free_bytes -= need
                return Region(offset, need, length, self._view[offset : offset + length])
        return None

    def retire(self, region: Region) -> None:
        """The store no longer holds ``region``: free it now, or once its last reference goes."""
        region.live = False
        if region.refs:
            self.held_bytes += region.size
        else:
            self._release(region)

    def ref(self, region: Region) -> None:
        region.refs += 1

    def unref(self, region: Region) -> None:
        region.refs -= 1
        if region.refs == 0 and not region.live:
            self.held_bytes -= region.size
            self._release(region)

    def _release(self, region: Region) -> None:
        try:
            region.view.release()  # a stray use of a freed region raises instead of reading another value
        except BufferError:
            pass
        offset, size = region.offset, region.size
        free = self._free
        i = bisect.bisect_left(free, [offset, 0])
        if i < len(free) and free[i][0] == offset + size:  # merge with the hole after
            size += free[i][1]
            del free[i]
        if i and free[i - 1][0] + free[i - 1][1] == offset:  # and the hole before
            free[i - 1][1] += size
        else:
            free.insert(i, [offset, size])
        self.free_bytes += region.size

    @property
    def largest_free(self) -> int:
        return max((size for _, size in self._free), default=0)

    def close(self) -> None:
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # views still exported (a reply in flight at shutdown): the GC frees it
            pass
        os.close(self.fd)

    def stats(self) -> dict:
        return {"arena_bytes": self.size, "free_bytes": self.free_bytes, "largest_free": self.largest_free,
                "held_bytes": self.held_bytes, **self.leases.stats()}


class Leases:
    """Read leases: id -> (region, expiry). Granted in time order with one ``ttl``, so the oldest
    expire first and a sweep only looks at the front of the (insertion-ordered) dict."""

    def __init__(self, ttl: float, arena: Arena) -> None:
        self.ttl = ttl
        self._arena = arena
        self._by_id: dict[int, tuple[Region, float]] = {}
        self._next_id = 1
        self.granted = self.released = self.expired = self.late_releases = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def grant(self, region: Region, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        self.sweep(now)
        lease_id, self._next_id = self._next_id, self._next_id + 1
        self._arena.ref(region)
        self._by_id[lease_id] = (region, now + self.ttl)
        self.granted += 1
        return lease_id

    def release(self, lease_ids: list[int], now: float | None = None) -> list[bool]:
        """Drop each lease; True where it was still valid (so the client's read was safe)."""
        now = time.monotonic() if now is None else now
        valid = []
        for lease_id in lease_ids:
            entry = self._by_id.pop(lease_id, None)
            if entry is None:  # expired and swept already, or never granted
                self.late_releases += 1
                valid.append(False)
                continue
            region, expiry = entry
            ok = now <= expiry
            self.released += ok
            self.late_releases += not ok
            self.expired += not ok
            valid.append(ok)
            self._arena.unref(region)
        self.sweep(now)
        return valid

    def sweep(self, now: float | None = None) -> int:
        """Expire leases past their time; returns how many."""
        now = time.monotonic() if now is None else now
        n = 0
        while self._by_id:
            lease_id, (region, expiry) = next(iter(self._by_id.items()))
            if expiry >= now:
                break
            del self._by_id[lease_id]
            self._arena.unref(region)
            self.expired += 1
            n += 1
        return n

    def stats(self) -> dict:
        return {"leases_active": len(self._by_id), "leases_granted": self.granted,
                "leases_released": self.released, "leases_expired": self.expired,
                "late_releases": self.late_releases}
