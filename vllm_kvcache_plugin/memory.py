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
import threading
from dataclasses import dataclass

import torch


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


class Allocator:
    """Counts chunk allocations and frees (the seed's allocator metrics); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.allocations = 0
        self.frees = 0
        self.bytes_live = 0

    def allocate(self, meta: ChunkMeta, tensor: torch.Tensor | None = None) -> MemoryObj:
        """Wrap ``tensor`` (or a new empty one) as a chunk with one reference."""
        if tensor is None:
            tensor = torch.empty(meta.shape, dtype=meta.dtype)
        elif tuple(tensor.shape) != tuple(meta.shape) or tensor.dtype != meta.dtype:
            raise ValueError(f"tensor {tuple(tensor.shape)}/{tensor.dtype} does not match {meta}")
        obj = MemoryObj(meta, tensor, self)
        with self._lock:
            self.allocations += 1
            self.bytes_live += obj.nbytes
        return obj

    def wrap(self, tensor: torch.Tensor, fmt: KVFormat = KVFormat.KV) -> MemoryObj:
        return self.allocate(ChunkMeta(fmt, tensor.dtype, tuple(tensor.shape)), tensor)

    def _release(self, obj: MemoryObj) -> None:
        with self._lock:
            self.frees += 1
            self.bytes_live -= obj.nbytes

    @property
    def live(self) -> int:
        return self.allocations - self.frees


class MemoryObj:
    """A chunk: tensor + metadata + reference count. Create through :class:`Allocator`."""

    __slots__ = ("_lock", "_refs", "allocator", "meta", "nbytes", "tensor")

    def __init__(self, meta: ChunkMeta, tensor: torch.Tensor, allocator: Allocator) -> None:
        self.meta = meta
        self.tensor: torch.Tensor | None = tensor
        self.allocator = allocator
        self.nbytes = tensor.numel() * tensor.element_size()
        self._refs = 1
        self._lock = threading.Lock()

    @property
    def refs(self) -> int:
        return self._refs

    def ref_up(self) -> MemoryObj:
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
        if freed:
            self.allocator._release(self)

    def __repr__(self) -> str:
        return f"MemoryObj({self.meta.fmt.name}, {self.meta.dtype}, {self.meta.shape}, refs={self._refs})"
