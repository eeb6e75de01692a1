"""Every stored key (memory and disk) with its value's size, in fixed hash buckets, for LIST_PAGE.

A key lives in bucket ``xxh3_64(key) % nbuckets`` for as long as it is stored, and a listing walks
the buckets in index order, a whole bucket at a time; its cursor is the next bucket to examine. So
the server keeps no state per listing, a key stored for the whole listing is returned exactly once
however many keys come and go meanwhile (Redis SCAN's argument, without its rehashing: the bucket
count never changes), and the hash is stable across processes, so a cursor survives a restart.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import xxhash

NBUCKETS = 1 << 16
EXAMINE_FACTOR = 8  # a page stops after examining this many times its page size in keys


class KeyIndex:
    """key -> value size. Buckets exist only while they hold keys; ``_occupied`` lists their
    indexes in order, so a page skips empty buckets without touching them."""

    def __init__(self, nbuckets: int = NBUCKETS) -> None:
        self.nbuckets = nbuckets
        self._buckets: dict[int, dict[bytes, int]] = {}
        self._occupied: list[int] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        for bucket in self._buckets.values():
            yield from bucket

    def bucket_of(self, key: bytes) -> int:
        return xxhash.xxh3_64_intdigest(key) % self.nbuckets

    def add(self, key: bytes, size: int) -> None:
        """Index ``key`` (or update its size)."""
        index = self.bucket_of(key)
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = {}
            bisect.insort(self._occupied, index)
        self._count += key not in bucket
        bucket[key] = size

    def discard(self, key: bytes) -> None:
        index = self.bucket_of(key)
        bucket = self._buckets.get(index)
        if bucket is None or bucket.pop(key, None) is None:
            return
        self._count -= 1
        if not bucket:
            del self._buckets[index]
            del self._occupied[bisect.bisect_left(self._occupied, index)]

    def page(self, prefix: bytes, cursor: int, page_size: int) -> tuple[list[tuple[bytes, int]], int]:
        """(key, size) pairs with ``prefix`` from the buckets at and after ``cursor``, sorted within
        each bucket, and the cursor to continue from (0: no bucket left). Walks whole buckets until
        ``page_size`` keys are found or ``EXAMINE_FACTOR * page_size`` keys were examined, so a page
        can hold up to one bucket's keys more than ``page_size``, or none at all."""
        found: list[tuple[bytes, int]] = []
        examined, limit = 0, EXAMINE_FACTOR * page_size
        occupied = self._occupied
        i = bisect.bisect_left(occupied, cursor)
        while i < len(occupied) and len(found) < page_size and examined < limit:
            bucket = self._buckets[occupied[i]]
            examined += len(bucket)
            found.extend(sorted(item for item in bucket.items() if item[0].startswith(prefix)))
            i += 1
        # A page examines at least one bucket, so the next one's index is above 0: 0 can mean "done".
        return found, occupied[i] if i < len(occupied) else 0
