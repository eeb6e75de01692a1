"""Per-token quantisation with layer-dependent bins, and the optional token-wise locality transform.

Each (plane, layer, token) row of ``H*D`` channels has one scale ``s`` (its max |x| rounded *up* to bf16,
so it costs 16 bits and bounds every element). With ``B`` bins a layer uses ``C = B//2 - 1`` half levels
(LMCache's convention: 32 bins -> 31 levels), step ``s / C``, symbols ``round(x / step) + C`` in
``[0, 2C]``. Reconstruction is ``(q - C) * step``, so every element is within half a step of its input
(plus the output dtype's own rounding). All arithmetic is IEEE float32 division/multiplication and
round-half-even, which CPUs and GPUs compute identically: both sides produce the same symbols.

Non-finite inputs are rejected at serialize (:class:`UnsupportedValueError`): a NaN/inf KV row is garbage
to attention anyway, and storing nothing is the honest outcome.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import KVCacheError
from .bins import parse_bins_spec
from .tables import MAX_HALF_LEVELS

BF16_MAX_FINITE_BITS = 0x7F7F


class UnsupportedValueError(KVCacheError, ValueError):
    """A chunk CacheGen cannot encode (NaN or inf values): store it another way or not at all."""


BinsLike = str | int | Sequence[int] | None


DEFAULT_KEY_BINS = 64
DEFAULT_VALUE_BINS = 24


def default_bins(num_layers: int, plane: int) -> list[int]:
    """The default: keys 64 bins, values 24, in every layer (any depth).

    Measured on SmolLM2-135M (docs/cachegen.md): keys move the model ~4x more than values at equal
    error, and early layers are no more sensitive than the rest, so the bits go to keys, not to early
    layers (LMCache's "32:10,16" rule is one spec away)."""
    return [DEFAULT_KEY_BINS if plane == 0 else DEFAULT_VALUE_BINS] * num_layers


def resolve_bins(spec: BinsLike, num_layers: int, plane: int) -> list[int]:
    """Bins per layer from a spec ("32:10,16", an int, or a per-layer list); None -> :func:`default_bins`.

    The last group of a string spec extends to every remaining layer; groups past the model's last
    layer are ignored (one spec serves models of different depth)."""
    if spec is None:
        return default_bins(num_layers, plane)
    if isinstance(spec, int):
        per_layer = [spec] * num_layers
    elif isinstance(spec, str):
        per_layer = []
        for bins, count in parse_bins_spec(spec):
            per_layer.extend([bins] * (count if count is not None else max(0, num_layers - len(per_layer))))
        per_layer.extend([per_layer[-1]] * max(0, num_layers - len(per_layer)))
    else:
        per_layer = [int(b) for b in spec]
        if len(per_layer) != num_layers:
            raise ValueError(f"bins list has {len(per_layer)} entries for {num_layers} layers")
    per_layer = per_layer[:num_layers]
    for bins in per_layer:
        if not 2 <= bins <= 2 * (MAX_HALF_LEVELS + 1):
            raise ValueError(f"{bins} bins is outside 2..{2 * (MAX_HALF_LEVELS + 1)}")
    return per_layer


def half_levels(bins: Sequence[int]) -> list[int]:
    return [b // 2 - 1 for b in bins]


def scale_bits(x: torch.Tensor) -> torch.Tensor:
    """bf16 bit pattern (int32 tensor) of max|x| over the last axis, rounded up. Raises on NaN/inf."""
    peak = x.abs().amax(-1).float()
    if not bool(torch.isfinite(peak).all()):
        raise UnsupportedValueError("chunk holds NaN or inf values; CacheGen encodes finite KV only")
    bits = peak.view(torch.int32)
    upper = (bits >> 16) + ((bits & 0xFFFF) != 0).to(torch.int32)
    return upper.clamp_(max=BF16_MAX_FINITE_BITS)


def steps_from_bits(bits: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Quantisation step per row: fp32(scale) / C, 0 where C == 0 (``bits`` [R, T], ``half`` [R])."""
    scale = (bits.to(torch.int32) << 16).view(torch.float32)
    c = half.to(device=bits.device, dtype=torch.float32)[:, None]
    return torch.where(c > 0, scale / torch.where(c > 0, c, 1.0), torch.zeros((), device=bits.device))


def quantize(x: torch.Tensor, step: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Symbols uint8 [R, T, K] in [0, 2C] for ``x`` [R, T, K] (any float dtype)."""
    st = step[..., None]
    safe = torch.where(st > 0, st, torch.ones((), device=st.device))
    q = torch.where(st > 0, torch.round(x.float() / safe), torch.zeros((), device=x.device))
    c = half.to(device=x.device, dtype=torch.float32)[:, None, None]
    return (torch.minimum(torch.maximum(q, -c), c) + c).to(torch.uint8)


def dequantize(sym: torch.Tensor, step: torch.Tensor, half: torch.Tensor, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(sym - C) * step clamped to ``dtype``'s finite range, cast to ``dtype`` (the reference every
    coder's fused decode matches)."""
    c = half.to(device=sym.device, dtype=torch.float32)[:, None, None]
    # A scale rounded up past the dtype's largest value (fp16 65504 -> 65536) must not decode to inf.
    limit = torch.finfo(dtype).max
    values = ((sym.float() - c) * step[..., None]).clamp_(-limit, limit)
    if out is None:
        return values.to(dtype)
    out.copy_(values)
    return out


def locality_forward(sym: torch.Tensor, half: torch.Tensor, group: int) -> torch.Tensor:
    """Token-wise locality: within each group of ``group`` tokens the first (anchor) keeps its symbol,
    the others become ``(q - q_anchor + C) mod (2C + 1)`` (same alphabet, lossless)."""
    if group <= 1:
        return sym
    _r, t, _k = sym.shape
    anchors = sym[:, ::group].repeat_interleave(group, dim=1)[:, :t]
    c = half.to(device=sym.device, dtype=torch.int16)[:, None, None]
    n = 2 * c + 1
    delta = torch.remainder(sym.to(torch.int16) - anchors.to(torch.int16) + c, n).to(torch.uint8)
    delta[:, ::group] = sym[:, ::group]
    return delta


def locality_inverse(coded: torch.Tensor, half: torch.Tensor, group: int) -> torch.Tensor:
    if group <= 1:
        return coded
    t = coded.shape[1]
    anchors = coded[:, ::group].repeat_interleave(group, dim=1)[:, :t]
    c = half.to(device=coded.device, dtype=torch.int16)[:, None, None]
    sym = torch.remainder(coded.to(torch.int16) + anchors.to(torch.int16) - c, 2 * c + 1).to(torch.uint8)
    sym[:, ::group] = coded[:, ::group]
    return sym


def anchor_mask(num_tokens: int, group: int) -> torch.Tensor:
    """True at tokens coded with the anchor table (every token when locality is off)."""
    t = torch.arange(num_tokens)
    return (t % group == 0) if group > 1 else torch.ones(num_tokens, dtype=torch.bool)
