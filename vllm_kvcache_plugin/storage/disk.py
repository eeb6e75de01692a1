"""The local disk tier: one file per chunk, written atomically, LRU within a byte budget.

File name = SHA-256 of the key (keys contain '/' and '@'); content = the naive serde's bytes, whose
header and checksums make a torn or foreign file detectable. Writes are atomic (atomic_files.py):
a writer killed mid-write leaves only a temp file, never a readable half value; stale temp files
are swept at start. The index is rebuilt from the folder at start (oldest
modification first), so the LRU order survives a restart.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import mmap
import os
import threading
from collections.abc import Sequence

from .. import events
from ..atomic_files import is_temp, sweep_temp_files, write_atomic
from ..errors import CorruptValueError
from ..lru import ByteLRU
from ..memory import MADV_POPULATE_READ, ChunkMeta, MemoryObj
from ..metrics import TierCounters
from ..serde.base import Serde
from .throttle import WarningThrottle
from .tier import Tier, TierName

logger = logging.getLogger(__name__)

SUFFIX = ".kv"
STALE_TMP_SECS = 600.0
WARN_INTERVAL_SECS = 10.0  # at most one warning this often


def file_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest() + SUFFIX


class DiskTier(Tier):
    name = TierName.DISK

    def __init__(self, path: str, max_bytes: int, serde: Serde, counters: TierCounters | None = None) -> None:
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.serde = serde
        self.counters = counters or TierCounters("disk")
        self._index: ByteLRU[str, None] = ByteLRU(max_bytes)  # file name -> (None, file size)
        self._lock = threading.Lock()
        self._warnings = WarningThrottle(logger, WARN_INTERVAL_SECS)
        #: Map files to read them (see :meth:`get`); False reads them into pooled buffers (A/B timing).
        self.map_reads = os.environ.get("VLLM_KVCACHE_DISK_MMAP", "1") != "0"
        os.makedirs(self.path, exist_ok=True)
        self._rebuild_index()

    # -- index -----------------------------------------------------------------------------
    def _rebuild_index(self) -> None:
        entries = []
        sweep_temp_files(self.path, STALE_TMP_SECS)
        with os.scandir(self.path) as it:
            for entry in it:
                try:
                    st = entry.stat()
                except OSError:
                    continue
                if is_temp(entry.name):
                    continue
                if entry.name.endswith(SUFFIX) and entry.is_file():
                    entries.append((st.st_mtime, entry.name, st.st_size))
        entries.sort()
        for _, name, size in entries:
            self._index.add(name, None, size)
        if entries:
            logger.info("Disk tier %s: %d chunks, %.1f MB found at start", self.path, len(entries),
                        self._index.used / 1e6)
        self._evict_to(0)

    @property
    def bytes_used(self) -> int:
        return self._index.used

    def __len__(self) -> int:
        return len(self._index)

    def contains(self, key: str) -> bool:
        with self._lock:
            return file_name(key) in self._index

    def _forget(self, name: str) -> None:
        with self._lock:
            self._index.pop(name)

    def _evict_to(self, incoming: int) -> None:
        """Make room for ``incoming`` more bytes within the budget (oldest files first)."""
        with self._lock:
            victims = [name for name, _ in self._index.evict(incoming)]
            self.counters.add(evictions=len(victims))
        for name in victims:
            self._unlink(os.path.join(self.path, name))

    def _unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    def _warn(self, msg: str, *args: object) -> None:
        self.counters.add(errors=1)
        self._warnings.warn(msg, *args)  # a failing disk must not flood the log

    # -- Tier ------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [file_name(key) in self._index for key in keys]

    def get_many(self, keys: Sequence[str], expected: ChunkMeta | None = None,
                 defer_check: bool = False) -> list[MemoryObj | None]:
        return [self.get(key, expected, defer_check) for key in keys]

    def put_many(self, items: Sequence[tuple[str, MemoryObj]]) -> bool:
        return all([self.put(key, obj) for key, obj in items])

    def receive_sizes(self, expected: ChunkMeta) -> list[int]:
        return [self.serde.max_value_size(expected)]

    # -- single keys -----------------------------------------------------------------------
    def put(self, key: str, obj: MemoryObj) -> bool:
        """Write ``obj`` (the caller keeps its reference). False if the disk refused it."""
        data = self.serde.serialize(obj)
        size = len(data)
        if size > self.max_bytes:
            return False
        name = file_name(key)
        self._evict_to(size)
        try:
            write_atomic(os.path.join(self.path, name), [data])
        except OSError as exc:
            self._warn("Disk tier %s: write failed (%s); chunk not cached on disk", self.path, exc.strerror or exc)
            return False
        with self._lock:
            self._index.add(name, None, size)
            self.counters.add(puts=1, bytes_written=size)
        return True

    def get(self, key: str, expected: ChunkMeta | None = None, defer_check: bool = False) -> MemoryObj | None:
        """The chunk stored under ``key``, or None (absent, vanished, unreadable, corrupt, foreign).

        One copy: the file is mapped (:func:`map_file`: its page-cache pages enter this process's
        page tables in one call) and the naive serde's chunk is a view of the mapping, so the load's
        verify-and-scatter reads the page cache directly. Reading into a pooled buffer first, as
        before, was a second copy: 15-17 ms of a 4k-token load's 27-36 ms on an AVX2 machine, where
        the mapped load takes 16-21 ms (``benchmarks/bench_load.py``, issue 14). The chunk is lent
        (``MemoryObj.lend``): the mapping goes with its last reference, and a tier that keeps it
        (the hot cache) gets a copy of its own. Where the file cannot be mapped, it is read into a
        pooled buffer (the serde's receive size for ``expected``, the one the pool is pre-warmed
        with). A file larger than that size cannot hold
        a chunk of this geometry: it is dropped as foreign without being read.

        The tier's files are replaced by rename and removed by unlink, never truncated, and either
        leaves a mapping valid. Only another program truncating a file in the few milliseconds it is
        mapped would fault the reader."""
        name = file_name(key)
        with self._lock:
            known = name in self._index
            if known:
                self._index.get(name)  # now the most recently used
        if not known:
            self.counters.add(misses=1)
            return None
        path = os.path.join(self.path, name)
        allocator = self.serde.allocator
        max_size = getattr(self.serde, "max_value_size", None)
        capacity = max_size(expected) if expected is not None and max_size is not None else None
        block = mapping = None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                size = os.fstat(fd).st_size
                if capacity is not None and size > capacity:
                    return self._reject(key, name, path, f"file of {size} bytes is larger than a "
                                        f"{capacity}-byte value of this geometry (foreign?)")
                mapping = map_file(fd, size) if self.map_reads else None
                if mapping is not None:
                    data = memoryview(mapping)
                else:
                    block = allocator.buffer(size if capacity is None else capacity)  # pooled: no fresh pages
                    data = memoryview(block.numpy())[: _read_into(fd, memoryview(block.numpy())[:size])]
            finally:
                os.close(fd)
        except FileNotFoundError:
            self._forget(name)
            self._warn("Disk tier %s: %s vanished underneath; treating as a miss", self.path, name)
            self.counters.add(misses=1)
            return None
        except OSError as exc:
            if block is not None:
                allocator.recycle(block)
            self._warn("Disk tier %s: read failed (%s); treating as a miss", self.path, exc.strerror or exc)
            self.counters.add(misses=1)
            return None
        try:
            if mapping is not None:
                obj = self.serde.deserialize(data, expected, defer_check).lend(functools.partial(unmap, mapping))
            else:
                # deserialize_block recycles the block if it raises
                obj = self.serde.deserialize_block(data, block, expected, defer_check)
        except CorruptValueError as exc:
            if mapping is not None:
                with contextlib.suppress(BufferError):  # a view of it may still be alive (the traceback's)
                    data.release()
                unmap(mapping)
            return self._reject(key, name, path, str(exc))
        if not obj.checked:
            obj.on_corrupt(lambda: self._reject(key, name, path, "payload checksum mismatch"))
        try:
            os.utime(path)  # persist recency for the index rebuilt at the next start
        except OSError:
            pass
        self.counters.add(hits=1, bytes_read=len(data))
        return obj

    def _reject(self, key: str, name: str, path: str, reason: str) -> None:
        """A corrupt or foreign file: dropped, counted, and a miss."""
        self.counters.add(corrupt=1)
        self._forget(name)
        self._unlink(path)
        self._warn("Disk tier %s: dropped corrupt chunk %s (%s)", self.path, name, reason)
        events.emit("chunk_rejected", logging.WARNING, tier=self.name.value, key=key, reason=reason)
        self.counters.add(misses=1)
        return None

    def remove(self, key: str) -> bool:
        name = file_name(key)
        with self._lock:
            entry = self._index.pop(name)
        if entry is None:
            return False
        self._unlink(os.path.join(self.path, name))
        return True


def map_file(fd: int, size: int) -> mmap.mmap | None:
    """``fd``'s first ``size`` bytes mapped read-only, every page entered now, or None where the file
    is empty or cannot be mapped (then it is read instead). The pages are entered with
    ``MADV_POPULATE_READ``, which reports a failed disk read as an error (raised here as OSError: a
    miss, as for a failed read) where touching an unreadable page of a mapping would be a SIGBUS;
    a kernel older than 5.14 lacks it, and the file is read instead."""
    if size <= 0:
        return None
    try:
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    try:
        mapping.madvise(MADV_POPULATE_READ)
    except OSError as exc:
        mapping.close()
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            return None
        raise
    return mapping


def unmap(mapping: mmap.mmap) -> None:
    """Unmap now, or, while a view of it is still alive somewhere, when the last one goes."""
    try:
        mapping.close()
    except BufferError:
        pass


def _read_into(fd: int, view: memoryview) -> int:
    """Read from ``fd`` into ``view`` until it is full or the file ends; the bytes read."""
    total = 0
    while total < view.nbytes:
        n = os.readv(fd, [view[total:]])
        if n == 0:  # the file is shorter than it was at fstat: the header check rejects it
            break
        total += n
    return total
