"""The copier interface and the argument checks every implementation shares.

A copier moves the KV of chosen tokens between vLLM's paged layers and a canonical chunk
(``[2, L, T, H, D]`` for MHA, ``[1, L, T, 1, C]`` for MLA). Checks run before any byte moves, so a
bad slot or a mismatched tensor never leaves a half-written cache behind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .layouts import PagedKVSpec


@dataclass(frozen=True)
class CopyGeometry:
    """What a kernel needs to address every element, after the arguments were checked."""

    num_layers: int
    num_blocks: int
    num_tokens: int
    layer_strides: tuple[int, int, int]  # elements: block, head, token (content stride is 1)
    chunk_strides: tuple[int, int, int, int]  # elements: kv, layer, token, head (channel stride is 1)


def check_copy_args(layers: Sequence[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                    chunk: torch.Tensor, chunk_name: str = "out") -> CopyGeometry:
    """Validate a gather/scatter call; raise ValueError with one clear line on the first problem."""
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
        if (layer.shape != first.shape or layer.stride() != first.stride() or layer.dtype != first.dtype
                or layer.device != first.device):
            raise ValueError(f"KV layer {index} ({tuple(layer.shape)}, strides {tuple(layer.stride())}, "
                             f"{layer.dtype}, {layer.device}) differs from layer 0 ({tuple(first.shape)}, "
                             f"strides {tuple(first.stride())}, {first.dtype}, {first.device})")
    if spec.packing != "plain" and first.stride(2) != content:
        raise ValueError(f"packing {spec.packing!r} needs each (block, head) region contiguous, "
                         f"got layer strides {tuple(first.stride())}")

    if not isinstance(slots, torch.Tensor) or slots.dim() != 1:
        raise ValueError(f"slots must be a 1-D tensor, got {getattr(slots, 'shape', type(slots))}")
    if slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slots must be int64 (or int32), got {slots.dtype}")
    num_tokens = slots.numel()
    want = spec.chunk_shape(len(layers), num_tokens)
    if tuple(chunk.shape) != want:
        raise ValueError(f"{chunk_name} has shape {tuple(chunk.shape)}, expected {list(want)}")
    if chunk.dtype != spec.dtype:
        raise ValueError(f"{chunk_name} dtype {chunk.dtype} does not match the KV dtype {spec.dtype}")
    if chunk.stride(4) != 1 and spec.head_size > 1:
        raise ValueError(f"{chunk_name} channel axis must be contiguous, got strides {tuple(chunk.stride())}")
    if num_tokens:
        limit = num_blocks * block_size
        low, high = int(slots.min()), int(slots.max())
        if low < 0 or high >= limit:
            bad = low if low < 0 else high
            raise ValueError(f"slot {bad} out of range [0, {limit}) ({num_blocks} blocks of {block_size})")
    return CopyGeometry(
        num_layers=len(layers),
        num_blocks=num_blocks,
        num_tokens=num_tokens,
        layer_strides=(first.stride(0), first.stride(1), first.stride(2)),
        chunk_strides=(chunk.stride(0), chunk.stride(1), chunk.stride(2), chunk.stride(3)),
    )


class KVCopier(ABC):
    """One back end's gather/scatter between paged KV layers and a canonical chunk."""

    name: str = "abstract"

    @abstractmethod
    def gather(self, layers: Sequence[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
               out: torch.Tensor) -> None:
        """Copy the KV of tokens at ``slots`` (int64 [T], ``block_id * block_size + offset``) from
        every layer into ``out`` ([2, L, T, H, D] for MHA, [1, L, T, 1, C] for MLA). ``out`` may be
        on another device (e.g. CPU pinned memory)."""

    @abstractmethod
    def scatter(self, layers: Sequence[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                src: torch.Tensor) -> None:
        """Write ``src``'s tokens into the paged layers at ``slots``. Out-of-range slots raise
        ValueError before anything is written."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
