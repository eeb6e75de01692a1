"""Portable torch gather/scatter: the reference every other implementation is tested against.

It indexes the token views of :mod:`.layouts` with advanced indexing, one layer and one of K/V at a
time. Data moves as same-width integers, so NaN payloads and fp8 bytes survive bit for bit.
"""

from __future__ import annotations

import torch

from .copier import CopyGeometry, KVCopier, LayerSet
from .layouts import Packing, PagedKVSpec, token_views

_BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as integers of the same width (a view, never a copy)."""
    return tensor.view(_BITS_DTYPES[tensor.element_size()])


def _token_index(slots: torch.Tensor, block_size: int, group: int) -> tuple[torch.Tensor, ...]:
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots - blocks * block_size
    return blocks, torch.div(offsets, group, rounding_mode="floor"), offsets % group


def _all_layers_view(layer_set: LayerSet) -> torch.Tensor | None:
    """[L, B, H, N, C] over every layer (plain packing, layers at a constant stride), as bits."""
    if layer_set.layer_step is None or layer_set.spec.packing is not Packing.PLAIN:
        return None
    first = as_bits(layer_set.layers[0])
    return torch.as_strided(first, (len(layer_set.layers), *first.shape), (layer_set.layer_step, *first.stride()),
                            first.storage_offset())


class TorchCopier(KVCopier):
    """Works on any device torch supports; obviously right rather than fast. Plain layers at a
    constant layer stride (vLLM's case) take one indexing op for all layers, others one per layer."""

    name = "torch"

    def _copy(self, geo: CopyGeometry, spec: PagedKVSpec, slots: torch.Tensor, chunk: torch.Tensor,
              gather: bool) -> None:
        slots = slots.to(device=geo.layer_set.device, dtype=torch.int64)
        (self._gather if gather else self._scatter)(geo, spec, slots, as_bits(chunk))

    @staticmethod
    def _gather(geo: CopyGeometry, spec: PagedKVSpec, slots: torch.Tensor, staged: torch.Tensor) -> None:
        every_layer = _all_layers_view(geo.layer_set)
        if every_layer is not None:
            blocks, offsets, _ = _token_index(slots, spec.block_size, 1)
            rows = every_layer[:, blocks, :, offsets]  # [T, L, H, C]: indexed dims 1 and 3 move first
            rows = rows.view(geo.num_tokens, geo.num_layers, spec.num_kv_heads, spec.num_kv, spec.head_size)
            staged.copy_(rows.permute(3, 1, 0, 2, 4))
            return
        shape = (geo.num_tokens, spec.num_kv_heads, spec.head_size)
        index_cache: dict[int, tuple[torch.Tensor, ...]] = {}
        for layer_index, layer in enumerate(geo.layer_set.layers):
            for kv, view in enumerate(token_views(as_bits(layer), spec)):
                if view.group not in index_cache:
                    index_cache[view.group] = _token_index(slots, spec.block_size, view.group)
                blocks, outer, inner = index_cache[view.group]
                staged[kv, layer_index] = view.tensor[blocks, :, outer, inner].reshape(shape)

    @staticmethod
    def _scatter(geo: CopyGeometry, spec: PagedKVSpec, slots: torch.Tensor, source: torch.Tensor) -> None:
        every_layer = _all_layers_view(geo.layer_set)
        if every_layer is not None:
            blocks, offsets, _ = _token_index(slots, spec.block_size, 1)
            rows = source.permute(2, 1, 3, 0, 4).reshape(geo.num_tokens, geo.num_layers, spec.num_kv_heads, -1)
            every_layer[:, blocks, :, offsets] = rows
            return
        index_cache: dict[int, tuple[torch.Tensor, ...]] = {}
        for layer_index, layer in enumerate(geo.layer_set.layers):
            for kv, view in enumerate(token_views(as_bits(layer), spec)):
                if view.group not in index_cache:
                    index_cache[view.group] = _token_index(slots, spec.block_size, view.group)
                blocks, outer, inner = index_cache[view.group]
                _, heads, _, _, pairs, pair = view.tensor.shape
                values = source[kv, layer_index].reshape(geo.num_tokens, heads, pairs, pair)
                view.tensor[blocks, :, outer, inner] = values
