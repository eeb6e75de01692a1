"""Chunks in memory: a tensor in the canonical layout, its metadata and a reference count.

Canonical layouts (what every tier, serde and kernel agrees on):

* ``KVFormat.KV``  (multi-head / grouped-query attention): ``[2, num_layers, num_tokens,
  num_kv_heads, head_size]``, K then V.
* ``KVFormat.MLA`` (multi-head latent attention): ``[1, num_layers, num_tokens, 1, latent_size]``
  (one latent vector per token; the leading 1 and the head axis keep both formats 5-D).

A chunk held by several tiers (hot cache and a pending remote write, say) is freed once: each holder
takes a reference with :meth:`MemoryObj.ref_up` and drops it with :meth:`MemoryObj.ref_down`; the last
drop releases the tensor and is counted as a free by the :class:`Allocator`.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

logger = logging.getLogger(__name__)


class KVFormat(enum.IntEnum):
    KV = 0
    MLA = 1


# Stable one-byte codes for dtypes on the wire (never renumber).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.uint8: 4,  # fp8 caches are stored as raw bytes
    torch.float8_e4m3fn: 5,
    torch.float8_e5m2: 6,
    torch.int8: 7,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class ChunkMeta:
    """What a reader must know to interpret a chunk's bytes."""

    fmt: KVFormat
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.shape[2]

    def fits(self, expected: ChunkMeta) -> bool:
        """Same format, dtype and every axis but the token count (partial chunks differ there)."""
        return (self.fmt == expected.fmt and self.dtype == expected.dtype
                and self.shape[:2] == expected.shape[:2] and self.shape[3:] == expected.shape[3:])

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.tensor([], dtype=self.dtype).element_size()


@dataclass(frozen=True, eq=False)
class ChunkPlacement:
    """Where a reader wants a chunk's elements written when that is not a chunk tensor: vLLM's paged
    blocks, so a serde that decodes (CacheGen) writes each element once, straight to its place.

    Element ``(p, l, t, h, d)`` of the canonical chunk ``[P, L, T, H, D]`` goes to the byte address
    ``rows[p * L + l] + tokens[p, t] + channels[p, h * D + d]``; only tokens in ``[first, last)`` are
    written. Every packing of vLLM's CPU cache splits this way (kernels/layouts.py). ``keep`` holds
    the memory the addresses point into."""

    rows: np.ndarray  # int64 [P * L]
    tokens: np.ndarray  # int64 [P, T]
    channels: np.ndarray  # int64 [P, H * D]
    first: int
    last: int
    dtype: torch.dtype
    keep: tuple = ()

    @property
    def planes(self) -> int:
        return int(self.tokens.shape[0])


DEFAULT_POOL_BYTES = 512 << 20

#: madvise advice (Linux 5.14+): enter a mapped range's pages into the page tables in one call, no
#: fault per page (shared-memory values, mapped disk files); a failed read is an error, not a SIGBUS.
MADV_POPULATE_READ = 22

#: Called with (address, size) of each buffer an Allocator lets go of (the pool is full), before
#: its memory can be freed and reused: a connector that registered pooled buffers with a transport
#: (Mooncake) forgets that registration. Listeners must be cheap and must not raise.
_drop_listeners: list[Callable[[int, int], None]] = []


def add_drop_listener(listener: Callable[[int, int], None]) -> None:
    _drop_listeners.append(listener)


def remove_drop_listener(listener: Callable[[int, int], None]) -> None:
    if listener in _drop_listeners:
        _drop_listeners.remove(listener)


class Allocator:
    """Chunk memory with a free list, and the allocation / free counters (the seed's allocator metrics).

    Fresh memory is expensive: on a VM every first touch of a page is a fault, measured here at
    ~10x slower than writing warm memory (a 5.9 MB gather into a new tensor ran at 1.7 GB/s, into
    a reused one at 5+ GB/s). So the buffers of freed chunks are kept, by byte size, up to
    ``max_pool_bytes``, and handed out again. Thread-safe.
    """

    def __init__(self, max_pool_bytes: int = DEFAULT_POOL_BYTES, pin_memory: bool = False) -> None:
        self._lock = threading.Lock()
        self.max_pool_bytes = max_pool_bytes
        #: Page-locked buffers (set by the worker when vLLM's cache is on a GPU): the CUDA copier then
        #: moves chunks between them and the device directly, with no pageable staging copy.
        self.pin_memory = pin_memory
        self._pool: dict[int, list[torch.Tensor]] = {}
        self.pool_bytes = 0
        self.pool_hits = 0
        self.allocations = 0
        self.frees = 0
        self.bytes_live = 0

    # -- raw byte blocks ---------------------------------------------------------------------
    def buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (contents undefined), from the free list when one fits.
        Give it back with :meth:`recycle`, or attach it to a chunk with ``allocate(..., block=)``."""
        with self._lock:
            free = self._pool.get(nbytes)
            if free:
                self.pool_bytes -= nbytes
                self.pool_hits += 1
                return free.pop()
        return self._new_block(nbytes)

    def _new_block(self, nbytes: int) -> torch.Tensor:
        """Fresh memory, page-locked when asked. Where page-locking fails (a host or container that
        limits locked memory, no usable driver) the pool turns pageable, with one warning: loads
        then stage through the copier, slower but correct, instead of failing."""
        if self.pin_memory:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as exc:
                self.pin_memory = False
                logger.warning("Could not page-lock a %d-byte chunk buffer (%s); chunk buffers stay pageable, "
                               "so GPU copies stage through the copier (slower)", nbytes, str(exc).splitlines()[0])
        return torch.empty(nbytes, dtype=torch.uint8)

    def recycle(self, block: torch.Tensor) -> None:
        """Keep ``block`` for reuse (dropped when the pool is full)."""
        nbytes = block.numel()
        with self._lock:
            if self.pool_bytes + nbytes <= self.max_pool_bytes:
                self._pool.setdefault(nbytes, []).append(block)
                self.pool_bytes += nbytes
                return
        for listener in tuple(_drop_listeners):
            listener(block.data_ptr(), nbytes)

    def prewarm(self, sizes: list[int], per_size: int = 16) -> int:
        """Put ``per_size`` touched buffers of each size in the pool (within its cap), so the first
        loads and saves after start-up fault in no pages. Returns the bytes added."""
        added = 0
        for _ in range(per_size):
            for n in dict.fromkeys(sizes):
                if n <= 0 or self.pool_bytes + n > self.max_pool_bytes:
                    continue
                block = self._new_block(n)
                block.fill_(0)  # touch every page now, not on the request path
                self.recycle(block)
                added += n
        return added

    # -- chunks ------------------------------------------------------------------------------
    def allocate(self, meta: ChunkMeta, tensor: torch.Tensor | None = None,
                 block: torch.Tensor | None = None) -> MemoryObj:
        """A chunk with one reference: over ``tensor`` if given (``block``, if given, is the pooled
        buffer under it, recycled when the chunk is freed), else over a pooled buffer."""
        if tensor is None:
            block = self.buffer(meta.nbytes)
            tensor = block.view(meta.dtype).view(meta.shape)
        elif tuple(tensor.shape) != tuple(meta.shape) or tensor.dtype != meta.dtype:
            raise ValueError(f"tensor {tuple(tensor.shape)}/{tensor.dtype} does not match {meta}")
        obj = MemoryObj(meta, tensor, self, block)
        with self._lock:
            self.allocations += 1
            self.bytes_live += obj.nbytes
        return obj

    def wrap(self, tensor: torch.Tensor, fmt: KVFormat = KVFormat.KV) -> MemoryObj:
        return self.allocate(ChunkMeta(fmt, tensor.dtype, tuple(tensor.shape)), tensor)

    def _release(self, obj: MemoryObj, block: torch.Tensor | None) -> None:
        with self._lock:
            self.frees += 1
            self.bytes_live -= obj.nbytes
        if block is not None:
            self.recycle(block)

    @property
    def live(self) -> int:
        return self.allocations - self.frees


class MemoryObj:
    """A chunk: tensor + metadata + reference count. Create through :class:`Allocator`."""

    __slots__ = ("_after_check", "_block", "_check", "_lock", "_on_corrupt", "_on_free", "_refs", "_valid_until",
                 "allocator", "meta", "nbytes", "tensor")

    def __init__(self, meta: ChunkMeta, tensor: torch.Tensor, allocator: Allocator,
                 block: torch.Tensor | None = None) -> None:
        self.meta = meta
        self.tensor: torch.Tensor | None = tensor
        self.allocator = allocator
        self._block = block  # the pooled buffer under ``tensor``, recycled on free
        self.nbytes = tensor.numel() * tensor.element_size()
        self._refs = 1
        self._lock = threading.Lock()
        self._on_free: Callable[[], None] | None = None
        self._valid_until: float | None = None
        self._check: Callable[[], bool] | None = None  # a payload checksum (or a decode) still to do
        self._on_corrupt: Callable[[], None] | None = None
        self._after_check: list[Callable[[MemoryObj], None]] = []

    @property
    def refs(self) -> int:
        return self._refs

    def lend(self, on_free: Callable[[], None], valid_until: float | None = None) -> MemoryObj:
        """Mark the tensor as lent memory (a view of a shared mapping under a read lease):
        ``on_free`` runs once, when the last reference goes (it gives the lease back), and
        :meth:`ref_up` hands any further holder (the hot cache, a write queue) a copy of its own,
        so nothing keeps the lent memory beyond its one borrower. ``valid_until`` (monotonic
        seconds) is when the lease ends: bytes read after it may be another value's."""
        self._on_free = on_free
        self._valid_until = valid_until
        return self

    def lease_held(self) -> bool:
        """Whether the memory is still this chunk's: always, unless it is lent under a lease that
        has run out. A reader checks it AFTER reading: True then means nothing changed underneath."""
        return self._valid_until is None or time.monotonic() < self._valid_until

    @property
    def lent(self) -> bool:
        return self._on_free is not None

    def defer_check(self, check: Callable[[], bool]) -> MemoryObj:
        """Leave the payload checksum to :meth:`check`, which the next reader calls just before it
        reads the bytes: the check brings them from memory and the read finds them in the cache, so
        a load reads each byte from memory once (one verify-and-scatter pass, not two). A serde that
        decodes may leave its decode here the same way: then the tensor holds the values only once
        the check has run, and a reader with somewhere better to put them may have them written
        there instead (the check's ``place``, then :meth:`spend`)."""
        self._check = check
        return self

    def after_check(self, callback: Callable[[MemoryObj], None]) -> MemoryObj:
        """Run ``callback(self)`` once the chunk is known intact: now if nothing is deferred, else
        when the deferred check passes (never if it fails, or if the chunk is spent). The storage
        manager promotes a loaded chunk this way, so promotion does not read the bytes first."""
        if self.tensor is None:  # spent (its values are elsewhere) or freed: nothing to keep
            return self
        if self._check is None:
            callback(self)
        else:
            self._after_check.append(callback)
        return self

    @property
    def awaited(self) -> bool:
        """Whether something waits for the deferred check to pass (a promotion, which needs the
        values in this chunk's tensor: a reader then must not :meth:`spend` it)."""
        return bool(self._after_check)

    def on_corrupt(self, callback: Callable[[], None]) -> MemoryObj:
        """``callback`` runs once if a deferred check fails (the tier that returned the chunk counts
        it and forgets the key)."""
        self._on_corrupt = callback
        return self

    def check(self) -> bool:
        """Whether the bytes are intact: True when nothing is deferred, else the deferred checksum
        (computed once; a failure runs the :meth:`on_corrupt` callback). A False chunk is not used."""
        check = self._check
        return True if check is None else self.settle_check(check())

    @property
    def deferred_check(self) -> Callable[[], bool] | None:
        """The checksum still to verify, for a reader that verifies as it copies (then it reports
        the outcome with :meth:`settle_check`)."""
        return self._check

    def settle_check(self, intact: bool) -> bool:
        """Record the deferred checksum's outcome, computed by the caller; returns ``intact``."""
        waiting, self._after_check = self._after_check, []
        if intact:
            self._check = None
            for callback in waiting:
                callback(self)
            return True
        callback, self._on_corrupt = self._on_corrupt, None
        if callback is not None:
            callback()
        return False

    def spend(self) -> None:
        """The deferred work wrote the values elsewhere (a :class:`ChunkPlacement`), intact: the
        tensor never holds them, so nothing may read it from now on (it is dropped, and nothing
        waiting in :meth:`after_check` runs). The caller still drops its reference."""
        self._check = self._on_corrupt = None
        self._after_check = []
        self.tensor = None

    @property
    def checked(self) -> bool:
        return self._check is None

    def ref_up(self) -> MemoryObj:
        if self._check is not None:
            raise RuntimeError("ref_up on a chunk whose checksum is not yet verified (call check() first)")
        if self.tensor is None:
            raise RuntimeError("ref_up on a freed or spent chunk (its values are not in its tensor)")
        if self._on_free is not None:
            if self._refs <= 0:
                raise RuntimeError("ref_up on a freed chunk")
            copy = self.allocator.allocate(self.meta)
            assert copy.tensor is not None
            copy.tensor.copy_(self.tensor)
            return copy
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("ref_up on a freed chunk")
            self._refs += 1
        return self

    def ref_down(self) -> None:
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("ref_down on a freed chunk (double free)")
            self._refs -= 1
            freed = self._refs == 0
            if freed:
                self.tensor = None
                block, self._block = self._block, None
                self._check = self._on_corrupt = None  # they hold views of the freed bytes
                self._after_check = []
        if freed:
            self.allocator._release(self, block)
            on_free, self._on_free = self._on_free, None
            if on_free is not None:
                on_free()

    def __repr__(self) -> str:
        return f"MemoryObj({self.meta.fmt.name}, {self.meta.dtype}, {self.meta.shape}, refs={self._refs})"


# -- chunk bytes: the views every serde and log line reads ----------------------------------
def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (bf16 included)."""
    flat = tensor.contiguous().view(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def bytes_tensor(buffer, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor over ``buffer`` without copying (read-only buffers are fine: we never write)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable"
        return torch.frombuffer(buffer, dtype=dtype).view(shape) if len(buffer) else torch.empty(shape, dtype=dtype)


def chunk_checksum(tensor: torch.Tensor) -> int:
    """xxh3 of a chunk's bytes (the naive serde's payload), for logs that prove bit-exactness."""
    return xxhash.xxh3_64_intdigest(tensor_bytes(tensor.cpu()))
