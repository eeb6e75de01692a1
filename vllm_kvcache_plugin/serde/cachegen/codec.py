"""Chunk <-> CacheGen payload, with a pluggable lane coder (numpy, C++ or Triton).

Encode: quantise per token (torch, on the chunk's device) -> optional locality transform -> exact
integer moments per lane -> table rows from the fixed bank (host, numpy) -> the coder's rANS lanes ->
:mod:`.format`. Decode is the mirror; the C++ and Triton coders fuse the inverse locality transform and
the dequantisation into their decode loop and write the output tensor directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ...errors import CorruptValueError
from . import format as wire
from . import quant
from .lanes import CodedLanes, LanePlan
from .tables import TableSet, bank, select_tables, table_set


class LaneCoder(Protocol):
    name: str

    def encode(self, sym: torch.Tensor, plan: LanePlan) -> CodedLanes: ...

    def decode_into(self, coded: CodedLanes, plan: LanePlan, step: torch.Tensor, out: torch.Tensor) -> None:
        """Decode, undo locality, dequantise into ``out`` [R, T, K]; CorruptValueError on a bad stream."""


@dataclass(frozen=True)
class EncodeSettings:
    key_bins: quant.BinsLike = None
    value_bins: quant.BinsLike = None
    locality: int = 0  # token group size for token-wise locality; 0 or 1 = off
    exact_tokens: int = 1  # leading tokens of each chunk stored exactly (the attention sink)

    def halves(self, planes: int, layers: int) -> np.ndarray:
        """Half levels per row; plane 0 (keys, or the MLA latent) uses key bins, plane 1 value bins."""
        per_plane = [quant.half_levels(quant.resolve_bins(self.key_bins if p == 0 else self.value_bins, layers, p))
                     for p in range(planes)]
        return np.array([c for plane in per_plane for c in plane], np.int64)


def _moments(centred: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact int64 sum, sum of squares and count per lane over the tokens in ``mask``."""
    sel = centred[:, mask.to(centred.device)]
    s1 = sel.sum(1).reshape(-1)
    s2 = (sel * sel).sum(1).reshape(-1)
    count = np.full(s1.numel(), int(mask.sum()), np.int64)
    return s1.cpu().numpy(), s2.cpu().numpy(), count


def make_plan(rows: int, tokens: int, channels: int, locality: int, half: np.ndarray, tables: TableSet,
              table_rows: np.ndarray) -> LanePlan:
    lane_half = np.repeat(half, channels)
    anchor = tables.global_rows(lane_half, table_rows[0].astype(np.int64))
    delta = tables.global_rows(lane_half, table_rows[-1].astype(np.int64))
    return LanePlan(rows, tokens, channels, locality, half, tables, anchor, delta)


def encode(tensor: torch.Tensor, settings: EncodeSettings, coder: LaneCoder, reserve: int = 0) -> bytearray:
    """The payload of ``tensor`` [planes, L, T, H, D], after ``reserve`` bytes left for a header."""
    planes, layers, tokens, heads, size = tensor.shape
    rows, channels = planes * layers, heads * size
    x = tensor.reshape(rows, tokens, channels)
    half_np = settings.halves(planes, layers)
    half = torch.from_numpy(half_np).to(x.device)
    locality = settings.locality if settings.locality > 1 else 0
    lane_half = np.repeat(half_np, channels)
    fast = getattr(coder, "quantize", None) if not locality else None
    bits = coder.scale_bits(x) if fast else quant.scale_bits(x)
    exact_tokens = min(max(settings.exact_tokens, 0), tokens)
    exact = x[:, :exact_tokens].contiguous().cpu().view(torch.uint8).numpy()
    bits[:, :exact_tokens] = 0  # step 0: the exact tokens code as the centre symbol, nearly free
    step = quant.steps_from_bits(bits, half)
    if fast:
        coded_sym, s1, s2 = fast(x, step, half_np)
        table_rows = select_tables(lane_half, s1, s2, np.full(len(s1), tokens, np.int64))[None]
    else:
        sym = quant.quantize(x, step, half)
        coded_sym = quant.locality_forward(sym, half, locality)
        centred = coded_sym.to(torch.int64) - half[:, None, None]
        anchor = quant.anchor_mask(tokens, locality)
        masks = [anchor] if not locality else [anchor, ~anchor]
        table_rows = np.stack([select_tables(lane_half, *_moments(centred, m)) for m in masks])
    tables = table_set(tuple(int(h) for h in np.unique(half_np)))
    plan = make_plan(rows, tokens, channels, locality, half_np, tables, table_rows)
    coded = coder.encode(coded_sym, plan)
    return wire.pack(locality, tables.fingerprint, half_np.astype(np.uint8), exact,
                     bits.cpu().numpy().astype(np.uint16), table_rows.astype(np.uint16), coded, reserve)


def parse_payload(payload, shape: tuple[int, ...], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.bfloat16) -> tuple[LanePlan, CodedLanes, torch.Tensor, torch.Tensor]:
    """Check a payload; return its lane plan, coded lanes, per-(row, token) steps on ``device`` and
    the exact leading tokens [R, E, K] (``dtype``, the chunk's)."""
    planes, layers, tokens, heads, size = shape
    rows, channels = planes * layers, heads * size
    itemsize = torch.empty((), dtype=dtype).element_size()
    stream = wire.parse(payload, planes, layers, tokens, channels, itemsize)
    half_np = stream.half.astype(np.int64)
    tables = table_set(tuple(int(h) for h in np.unique(half_np)))
    if stream.fingerprint != tables.fingerprint:
        raise CorruptValueError("cachegen table bank fingerprint differs (written by an incompatible build)")
    lane_half = np.repeat(half_np, channels)
    for which in stream.table_rows:
        for h in np.unique(half_np):
            if which[lane_half == h].max(initial=0) >= bank(int(h)).rows:
                raise CorruptValueError("cachegen table row outside its bank")
    plan = make_plan(rows, tokens, channels, stream.locality, half_np, tables, stream.table_rows)
    half = torch.from_numpy(half_np).to(device)
    bits = torch.from_numpy(stream.scale_bits.astype(np.int32)).to(device)
    exact = (torch.from_numpy(stream.exact.copy()).view(dtype) if stream.exact.size else
             torch.empty((rows, 0, channels), dtype=dtype)).to(device)
    return plan, stream.coded, quant.steps_from_bits(bits, half), exact


def decode(payload, shape: tuple[int, ...], out: torch.Tensor, coder: LaneCoder) -> torch.Tensor:
    """Decode ``payload`` into ``out`` (shape ``shape``, its dtype the chunk's; any device the coder serves)."""
    plan, coded, step, exact = parse_payload(payload, shape, out.device, out.dtype)
    view = out.view(plan.rows, plan.tokens, plan.channels)
    coder.decode_into(coded, plan, step, view)
    view[:, : exact.shape[1]] = exact
    return out


class NumpyCoder:
    """The reference coder (numpy rANS) with torch dequantisation."""

    name = "numpy"

    def encode(self, sym: torch.Tensor, plan: LanePlan) -> CodedLanes:
        from . import rans_numpy

        return rans_numpy.encode(sym.cpu().numpy(), plan)

    def decode_into(self, coded: CodedLanes, plan: LanePlan, step: torch.Tensor, out: torch.Tensor) -> None:
        from . import rans_numpy

        coded_sym = torch.from_numpy(rans_numpy.decode(coded, plan)).to(out.device)
        half = torch.from_numpy(plan.half).to(out.device)
        sym = quant.locality_inverse(coded_sym, half, plan.locality)
        quant.dequantize(sym, step, half, out.dtype, out=out)
