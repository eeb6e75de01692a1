"""Triton copier: one program per (token, layer), all layers in one launch.

Layers are addressed as element offsets from the lowest-addressed layer (vLLM's layers are views of
one buffer), so the kernel takes one pointer plus an offset table rather than a pointer per layer.
Data moves as same-width integers (dtype-agnostic, NaN-safe). Runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (how the tests exercise it without a GPU).
"""

from __future__ import annotations

import os

import torch

from .copier import CopyGeometry, KVCopier, LayerSet, LayerSetCache
from .layouts import PagedKVSpec
from .torch_ref import as_bits

try:
    import triton
    import triton.language as tl
except ImportError:  # the dispatcher reports the copier as unavailable
    triton = None


def _kv_copy_body(cache_ptr, layer_offsets_ptr, slots_ptr, chunk_ptr, block_size,
                    stride_block, stride_head, stride_token,
                    chunk_stride_kv, chunk_stride_layer, chunk_stride_token, chunk_stride_head,
                    ROWS: tl.constexpr, ROWS_P2: tl.constexpr, NUM_KV: tl.constexpr,
                    HEAD_SIZE: tl.constexpr, HEAD_SIZE_P2: tl.constexpr, GATHER: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + token)
    block = slot // block_size
    offset = slot - block * block_size
    layer_base = tl.load(layer_offsets_ptr + layer)

    rows = tl.arange(0, ROWS_P2)[:, None]  # (head, kv) pairs of this token
    channels = tl.arange(0, HEAD_SIZE_P2)[None, :]
    head = rows // NUM_KV
    kv = rows % NUM_KV
    mask = (rows < ROWS) & (channels < HEAD_SIZE)
    cache_offsets = (layer_base + block * stride_block + offset * stride_token + head * stride_head
                     + kv * HEAD_SIZE + channels)
    chunk_offsets = (kv * chunk_stride_kv + layer * chunk_stride_layer + token * chunk_stride_token
                     + head * chunk_stride_head + channels)
    if GATHER:
        values = tl.load(cache_ptr + cache_offsets, mask=mask)
        tl.store(chunk_ptr + chunk_offsets, values, mask=mask)
    else:
        values = tl.load(chunk_ptr + chunk_offsets, mask=mask)
        tl.store(cache_ptr + cache_offsets, values, mask=mask)


_jitted: dict[bool, object] = {}


def _kernel():
    """The kernel, jitted for the current mode: triton decides compile vs. interpret at decoration
    time, so decorate lazily (a process may set TRITON_INTERPRET after importing this module)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret not in _jitted:
        _jitted[interpret] = triton.jit(_kv_copy_body)
    return _jitted[interpret]


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


class TritonCopier(KVCopier):
    """Plain-packing layers only (the GPU layouts); the CPU packings go to the cpu/torch copiers."""

    name = "triton"

    def __init__(self) -> None:
        self._tables: LayerSetCache[tuple[torch.Tensor, torch.Tensor]] = LayerSetCache(self._layer_table)

    @classmethod
    def create(cls) -> TritonCopier:
        if triton is None:
            raise RuntimeError("triton is not installed")
        return cls()

    @staticmethod
    def _layer_table(layer_set: LayerSet) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest-addressed layer (as bits) and each layer's element offset from it."""
        element_size = layer_set.spec.element_size
        base_index = min(range(len(layer_set.addresses)), key=layer_set.addresses.__getitem__)
        base_address = layer_set.addresses[base_index]
        deltas = [address - base_address for address in layer_set.addresses]
        if any(delta % element_size for delta in deltas):
            raise ValueError("KV layers are not element-aligned relative to each other")
        offsets = torch.tensor([delta // element_size for delta in deltas], dtype=torch.int64,
                               device=layer_set.device)
        return as_bits(layer_set.layers[base_index]), offsets

    def _copy(self, geo: CopyGeometry, spec: PagedKVSpec, slots: torch.Tensor, chunk: torch.Tensor,
              gather: bool) -> None:
        layer_set = geo.layer_set
        base, offsets = self._tables.get(layer_set)
        slots = slots.to(device=layer_set.device, dtype=torch.int64).contiguous()
        rows = spec.num_kv_heads * spec.num_kv
        grid = (geo.num_tokens, geo.num_layers)
        _kernel()[grid](
            base, offsets, slots, as_bits(chunk), spec.block_size,
            *layer_set.strides, *geo.chunk_strides,
            ROWS=rows, ROWS_P2=_next_power_of_two(rows), NUM_KV=spec.num_kv,
            HEAD_SIZE=spec.head_size, HEAD_SIZE_P2=_next_power_of_two(spec.head_size), GATHER=gather,
        )
