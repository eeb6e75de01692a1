"""The copier interface and the argument checks every implementation shares.

A copier moves the KV of chosen tokens between vLLM's paged layers and a canonical chunk
(``[2, L, T, H, D]`` for MHA, ``[1, L, T, 1, C]`` for MLA). Checks run before any byte moves, so a
bad slot or a mismatched tensor never leaves a half-written cache behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from ..memory import ChunkPlacement
from .layouts import Packing, PagedKVSpec, token_views

T = TypeVar("T")


@dataclass(frozen=True)
class LayerSet:
    """A checked group of layers: same shape, strides, dtype and device; remembered by identity."""

    layers: tuple[torch.Tensor, ...]
    spec: PagedKVSpec
    num_blocks: int
    strides: tuple[int, int, int]  # elements: block, head, token (content stride is 1)
    addresses: tuple[int, ...]  # data_ptr() of each layer
    layer_step: int | None  # elements from one layer to the next, when constant, positive and in one storage

    @property
    def device(self) -> torch.device:
        return self.layers[0].device


@dataclass(frozen=True)
class CopyGeometry:
    """What a kernel needs to address every element, after the arguments were checked."""

    layer_set: LayerSet
    num_tokens: int
    chunk_strides: tuple[int, int, int, int]  # elements: kv, layer, token, head (channel stride is 1)

    @property
    def num_layers(self) -> int:
        return len(self.layer_set.layers)

    @property
    def layer_strides(self) -> tuple[int, int, int]:
        return self.layer_set.strides

    def for_chunk(self, chunk: torch.Tensor) -> CopyGeometry:
        """The same copy addressed into ``chunk`` (a staging copy may have other strides)."""
        strides = tuple(chunk.stride()[:4])
        return self if strides == self.chunk_strides else dataclasses.replace(self, chunk_strides=strides)


# The worker passes the same layer list on every call: checking 30+ layers costs more than copying
# a small chunk, so checked sets are remembered by the identity of their tensors (held here, so the
# ids cannot be reused while cached).
_MAX_CACHED_SETS = 16
_layer_sets: dict[tuple[int, ...], LayerSet] = {}
_layer_sets_lock = threading.Lock()


def check_layers(layers: Sequence[torch.Tensor], spec: PagedKVSpec) -> LayerSet:
    """Validate the paged layers against ``spec`` (cached by tensor identity)."""
    key = (id(spec), *map(id, layers))
    cached = _layer_sets.get(key)
    if cached is not None and cached.spec == spec:
        return cached
    checked = _check_layers(layers, spec)
    with _layer_sets_lock:
        if len(_layer_sets) >= _MAX_CACHED_SETS:
            _layer_sets.pop(next(iter(_layer_sets)))
        _layer_sets[key] = checked
    return checked


def _check_layers(layers: Sequence[torch.Tensor], spec: PagedKVSpec) -> LayerSet:
    if len(layers) == 0:
        raise ValueError("no KV layers given")
    first = layers[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 4:
        raise ValueError(f"a KV layer must be a 4-D tensor [blocks, heads, block_size, content], got "
                         f"{getattr(first, 'shape', type(first))}")
    num_blocks, heads, block_size, content = first.shape
    expected = (spec.num_kv_heads, spec.block_size, spec.content_size)
    if (heads, block_size, content) != expected:
        raise ValueError(f"KV layer shape {tuple(first.shape)} does not match the spec "
                         f"[blocks, {expected[0]}, {expected[1]}, {expected[2]}]")
    if first.dtype != spec.dtype:
        raise ValueError(f"KV layer dtype {first.dtype} does not match the spec dtype {spec.dtype}")
    if first.stride(3) != 1:
        raise ValueError(f"KV layer content axis must be contiguous, got strides {tuple(first.stride())}")
    for index, layer in enumerate(layers[1:], start=1):
        if (not isinstance(layer, torch.Tensor) or layer.shape != first.shape or layer.stride() != first.stride()
                or layer.dtype != first.dtype or layer.device != first.device):
            raise ValueError(f"KV layer {index} ({tuple(layer.shape)}, strides {tuple(layer.stride())}, "
                             f"{layer.dtype}, {layer.device}) differs from layer 0 ({tuple(first.shape)}, "
                             f"strides {tuple(first.stride())}, {first.dtype}, {first.device})")
    if spec.packing is not Packing.PLAIN and first.stride(2) != content:
        raise ValueError(f"packing {spec.packing.value!r} needs each (block, head) region contiguous, "
                         f"got layer strides {tuple(first.stride())}")
    addresses = tuple(layer.data_ptr() for layer in layers)
    return LayerSet(tuple(layers), spec, num_blocks, (first.stride(0), first.stride(1), first.stride(2)),
                    addresses, _uniform_layer_step(layers, addresses))


def _uniform_layer_step(layers: Sequence[torch.Tensor], addresses: tuple[int, ...]) -> int | None:
    """vLLM's layers are one buffer at a fixed layer stride: then all of them form one strided view."""
    if len(layers) < 2:
        return None
    storage = layers[0].untyped_storage().data_ptr()
    if any(layer.untyped_storage().data_ptr() != storage for layer in layers[1:]):
        return None
    step_bytes = addresses[1] - addresses[0]
    size = layers[0].element_size()
    if step_bytes <= 0 or step_bytes % size:
        return None
    if any(b - a != step_bytes for a, b in itertools.pairwise(addresses)):
        return None
    return step_bytes // size


class LayerSetCache(Generic[T]):
    """What a kernel derives once per checked layer set (device address tables), at most ``size``
    sets, held with their set so an id cannot be reused while cached."""

    def __init__(self, build: Callable[[LayerSet], T], size: int = _MAX_CACHED_SETS) -> None:
        self._build = build
        self._size = size
        self._entries: dict[int, tuple[LayerSet, T]] = {}
        self._lock = threading.Lock()

    def get(self, layer_set: LayerSet) -> T:
        cached = self._entries.get(id(layer_set))
        if cached is not None and cached[0] is layer_set:
            return cached[1]
        value = self._build(layer_set)
        with self._lock:
            if len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[id(layer_set)] = (layer_set, value)
        return value


_thread_cap = threading.local()


@contextlib.contextmanager
def copy_threads(limit: int | None) -> Iterator[None]:
    """Cap the host threads of copies made by this thread (None: no cap, torch's thread count).

    A CPU copy that shares the cores with other work (a fetch still receiving, vLLM's forward)
    runs on one thread: an OpenMP team whose member is preempted stalls at its barrier while the
    others spin, and the copy took 4-8x longer that way (measured for issue 14 during redis and
    Mooncake fetches)."""
    previous = getattr(_thread_cap, "limit", None)
    _thread_cap.limit = limit
    try:
        yield
    finally:
        _thread_cap.limit = previous


def host_threads() -> int:
    """The host threads a copy made now may use (see :func:`copy_threads`)."""
    limit = getattr(_thread_cap, "limit", None)
    available = torch.get_num_threads()
    return available if limit is None else max(1, min(limit, available))


def slot_error(slot: int, layer_set: LayerSet) -> ValueError:
    spec = layer_set.spec
    return ValueError(f"slot {slot} out of range [0, {layer_set.num_blocks * spec.block_size}) "
                      f"({layer_set.num_blocks} blocks of {spec.block_size})")


def check_copy_args(layers: Sequence[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                    chunk: torch.Tensor, chunk_name: str = "out", check_slots: bool = True) -> CopyGeometry:
    """Validate a gather/scatter call; raise ValueError with one clear line on the first problem.

    ``check_slots=False`` is for kernels that range-check every slot themselves before writing.
    """
    layer_set = check_layers(layers, spec)
    _check_slot_tensor(slots)
    num_tokens = slots.numel()
    want = spec.chunk_shape(len(layers), num_tokens)
    if chunk.shape != want:
        raise ValueError(f"{chunk_name} has shape {tuple(chunk.shape)}, expected {list(want)}")
    if chunk.dtype != spec.dtype:
        raise ValueError(f"{chunk_name} dtype {chunk.dtype} does not match the KV dtype {spec.dtype}")
    if chunk.stride(4) != 1 and spec.head_size > 1:
        raise ValueError(f"{chunk_name} channel axis must be contiguous, got strides {tuple(chunk.stride())}")
    if check_slots:
        _check_slot_range(slots, layer_set)
    return CopyGeometry(layer_set, num_tokens, chunk.stride()[:4])


def _check_slot_tensor(slots: torch.Tensor) -> None:
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1:
        raise ValueError(f"slots must be a 1-D tensor, got {getattr(slots, 'shape', type(slots))}")
    if slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slots must be int64 (or int32), got {slots.dtype}")


def _check_slot_range(slots: torch.Tensor, layer_set: LayerSet) -> None:
    if slots.numel():
        low, high = (int(v) for v in torch.aminmax(slots))
        if low < 0 or high >= layer_set.num_blocks * layer_set.spec.block_size:
            raise slot_error(low if low < 0 else high, layer_set)


class KVCopier(ABC):
    """One back end's gather/scatter between paged KV layers and a canonical chunk.

    :meth:`gather` and :meth:`scatter` are the same four steps for every back end: check the
    arguments (nothing moves before they pass), stage the chunk where the kernel can reach it,
    launch the copy (:meth:`_copy`, the one thing a back end must write), and copy a staged
    result back. A back end changes a step by overriding :meth:`_reachable` (where its kernel can
    read and write) or setting :attr:`checks_slots` (its kernel range-checks every slot itself).
    """

    name: str = "abstract"
    #: The kernel checks every slot before writing anything, so the host-side min/max pass is skipped.
    checks_slots: bool = False

    def gather(self, layers: Sequence[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
               out: torch.Tensor) -> None:
        """Copy the KV of tokens at ``slots`` (int64 [T], ``block_id * block_size + offset``) from
        every layer into ``out`` ([2, L, T, H, D] for MHA, [1, L, T, 1, C] for MLA). ``out`` may be
        on another device (e.g. CPU pinned memory)."""
        geo = check_copy_args(layers, spec, slots, out, "out", check_slots=not self.checks_slots)
        if geo.num_tokens == 0:
            return
        target = self._reachable(out, geo)
        self._copy(geo.for_chunk(target), spec, slots, target, gather=True)
        if target is not out:
            out.copy_(target)

    def scatter(self, layers: Sequence[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                src: torch.Tensor) -> None:
        """Write ``src``'s tokens into the paged layers at ``slots``. Out-of-range slots raise
        ValueError before anything is written."""
        geo = check_copy_args(layers, spec, slots, src, "src", check_slots=not self.checks_slots)
        if geo.num_tokens == 0:
            return
        source = self._reachable(src, geo)
        if source is not src:
            source.copy_(src)
        self._copy(geo.for_chunk(source), spec, slots, source, gather=False)

    def scatter_verified(self, layers: Sequence[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                         src: torch.Tensor) -> bytes | None:
        """:meth:`scatter` that also hashes ``src`` as it reads it: the xxh3-64 digest of each
        ``(kv, layer)`` slab of a contiguous ``src`` (little-endian u64, slabs in memory order), the
        segments of a payload checksum (serde/header.py). None, with nothing written, where the back
        end cannot (this default; a strided ``src``): then the caller verifies and scatters."""
        return None

    def placement(self, layers: Sequence[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                  chunk_tokens: int, first: int = 0) -> ChunkPlacement | None:
        """Where each element of a ``chunk_tokens``-token chunk goes when its tokens ``[first, first +
        len(slots))`` are written at ``slots``: the addresses a decoding serde writes through
        instead of a chunk tensor, so the scatter is not a second pass (``memory.ChunkPlacement``).
        None where the layers are not host memory (a GPU cache: its copies go through a kernel).
        Bad slots raise ValueError, as for :meth:`scatter`."""
        layer_set = check_layers(layers, spec)
        if layer_set.device.type != "cpu":
            return None
        _check_slot_tensor(slots)
        count = slots.numel()
        if not 0 <= first <= first + count <= chunk_tokens:
            raise ValueError(f"tokens [{first}, {first + count}) are not inside a {chunk_tokens}-token chunk")
        _check_slot_range(slots, layer_set)
        slot = slots.to(torch.int64).numpy()
        fixed = _placement_tables.get(layer_set)
        block, offset = slot // spec.block_size, slot % spec.block_size
        tokens = np.zeros((spec.num_kv, chunk_tokens), np.int64)
        for plane, (block_step, group_step, within_step, group) in enumerate(fixed.token_steps):
            tokens[plane, first:first + count] = (block * block_step + (offset // group) * group_step
                                                  + (offset % group) * within_step)
        return ChunkPlacement(fixed.rows, tokens, fixed.channels, first, first + count, spec.dtype,
                              keep=layer_set.layers)

    def _reachable(self, chunk: torch.Tensor, geo: CopyGeometry) -> torch.Tensor:
        """``chunk`` itself when the kernel can address it (same device as the layers), else an
        empty staging tensor there (filled from ``chunk`` before a scatter, copied back after a gather)."""
        device = geo.layer_set.device
        if chunk.device == device:
            return chunk
        return torch.empty(chunk.shape, dtype=chunk.dtype, device=device)

    @abstractmethod
    def _copy(self, geo: CopyGeometry, spec: PagedKVSpec, slots: torch.Tensor, chunk: torch.Tensor,
              gather: bool) -> None:
        """Move the tokens at ``slots`` between the layers and ``chunk`` (already reachable):
        layers -> chunk when ``gather``, chunk -> layers otherwise."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@dataclass(frozen=True)
class _PlacementTables:
    """The parts of a placement that depend on the layers only (byte offsets; see ChunkPlacement)."""

    rows: np.ndarray  # int64 [P * L]: each (plane, layer) view's address
    channels: np.ndarray  # int64 [P, H * D]
    token_steps: tuple[tuple[int, int, int, int], ...]  # per plane: block, token-group, in-group steps; group


def _build_placement_tables(layer_set: LayerSet) -> _PlacementTables:
    spec = layer_set.spec
    size = spec.element_size
    heads, head_size = spec.num_kv_heads, spec.head_size
    h = np.arange(heads, dtype=np.int64)[:, None]
    d = np.arange(head_size, dtype=np.int64)[None, :]
    channels, steps = [], []
    for view in token_views(layer_set.layers[0], spec):
        sb, sh, s_group, s_within, s_pair, s_in_pair = view.tensor.stride()
        pair = view.tensor.shape[5]
        channels.append(((h * sh + (d // pair) * s_pair + (d % pair) * s_in_pair) * size).reshape(-1))
        steps.append((sb * size, s_group * size, s_within * size, view.group))
    per_layer = [[view.tensor.data_ptr() for view in token_views(layer, spec)] for layer in layer_set.layers]
    rows = np.array([per_layer[layer][plane] for plane in range(spec.num_kv) for layer in range(len(per_layer))],
                    np.int64)
    return _PlacementTables(rows, np.stack(channels), tuple(steps))


_placement_tables: LayerSetCache[_PlacementTables] = LayerSetCache(_build_placement_tables)
