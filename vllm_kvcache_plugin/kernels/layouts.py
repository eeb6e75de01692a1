"""How vLLM 0.32 lays out its paged KV cache, described without importing vLLM.

Every attention layer is a logical 4-D view ``[num_blocks, num_kv_heads, block_size, content]``
(``content = 2 * head_size`` for MHA, K then V; the latent size for MLA) over one flat byte buffer.
The physical order of ``[L, B, H, N, C]`` is one of vLLM's ``KVCacheLayout`` permutations; the content
axis is always innermost (stride 1), so one token's head row is contiguous for ``packing="plain"``.

vLLM's CPU attention back end (layout LBHNC) re-packs the ``2 * N * D`` elements of each
(block, head) region: a K region then a V region of ``N * D`` elements, in an ISA-dependent order:

* ``cpu_vec`` (ISA vec, vec16, ...): K transposed, index ``d * N + o``; V plain, index ``o * D + d``.
* ``cpu_amx`` (ISA amx): K index ``(o // 16) * 16 * D + (d // 2) * 32 + (o % 16) * 2 + d % 2``,
  V index ``(d // 16) * 16 * N + (o // 2) * 32 + (d % 16) * 2 + o % 2``.

Each is a pure reshape + permutation of the region, so :func:`token_views` exposes every packing as
strided views indexed the same way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class AttentionKind(str, enum.Enum):
    """What a layer's KV is: K and V per head (MHA / GQA) or one latent per token (MLA)."""

    MHA = "mha"
    MLA = "mla"

    def __str__(self) -> str:  # logs and messages show the plain name ("mha", "cpu_vec")
        return self.value

    __format__ = str.__format__


class Packing(str, enum.Enum):
    """How tokens are laid out inside one (block, head) region (see the module docstring)."""

    PLAIN = "plain"
    CPU_VEC = "cpu_vec"
    CPU_AMX = "cpu_amx"

    def __str__(self) -> str:  # logs and messages show the plain name ("mha", "cpu_vec")
        return self.value

    __format__ = str.__format__


KINDS = tuple(k.value for k in AttentionKind)
PACKINGS = tuple(p.value for p in Packing)

# vLLM's KVCacheLayout: the physical order of the logical axes [L, B, H, N, C] (outermost first).
LAYOUT_ORDERS: dict[str, tuple[int, ...]] = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}

# The attention ISAs vLLM's CPU back end picks (cpu_attn._get_attn_isa) and the packing each writes.
# Only "vec"/"vec16" were observed on this project's machines; the others are documented to share
# the vec packing (neon, vsx, vxe, rvv), and "amx" is modelled from its formula.
_ISA_PACKING = {
    "vec": Packing.CPU_VEC,
    "vec16": Packing.CPU_VEC,
    "neon": Packing.CPU_VEC,
    "vsx": Packing.CPU_VEC,
    "vxe": Packing.CPU_VEC,
    "rvv": Packing.CPU_VEC,
    "amx": Packing.CPU_AMX,
}


@dataclass(frozen=True)
class PagedKVSpec:
    """The shape of one group of paged KV layers, as the vLLM adapter registers them."""

    kind: AttentionKind  # a plain string ("mha") is accepted and converted
    block_size: int  # tokens per block (N)
    num_kv_heads: int  # H (1 for MLA)
    head_size: int  # D for MHA (each layer's content is 2*D: K then V); the latent size for MLA
    dtype: torch.dtype  # storage dtype (fp8 caches are torch.uint8 storage)
    packing: Packing = Packing.PLAIN

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        object.__setattr__(self, "kind", AttentionKind(self.kind))
        object.__setattr__(self, "packing", Packing(self.packing))
        for name in ("block_size", "num_kv_heads", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {self.dtype!r}")
        if self.kind is AttentionKind.MLA and self.num_kv_heads != 1:
            raise ValueError(f"an MLA cache has one latent head, got num_kv_heads={self.num_kv_heads}")
        if self.kind is AttentionKind.MLA and self.packing is not Packing.PLAIN:
            raise ValueError(f"MLA caches are not packed, got packing={self.packing.value!r}")
        if self.packing is Packing.CPU_AMX:
            if self.block_size % 32 or self.head_size % 16:
                raise ValueError(
                    f"cpu_amx packing needs block_size % 32 == 0 and head_size % 16 == 0, "
                    f"got {self.block_size} and {self.head_size}"
                )
            if self.element_size != 2:
                raise ValueError(f"cpu_amx packing is defined for 2-byte dtypes, got {self.dtype}")

    @staticmethod
    def packing_for_cpu_isa(isa: str) -> Packing:
        """The packing vLLM's CPU attention writes for ``isa`` (``layer.isa``)."""
        try:
            return _ISA_PACKING[isa]
        except KeyError:
            raise ValueError(f"unknown CPU attention ISA {isa!r}; known: {sorted(_ISA_PACKING)}") from None

    @property
    def num_kv(self) -> int:
        """Tensors per token and head: 2 (K, V) for MHA, 1 (the latent) for MLA."""
        return 2 if self.kind is AttentionKind.MHA else 1

    @property
    def content_size(self) -> int:
        """Elements in the last dimension of a layer view."""
        return self.num_kv * self.head_size

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    def chunk_shape(self, num_layers: int, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Canonical chunk shape: [2, L, T, H, D] (MHA) or [1, L, T, 1, C] (MLA)."""
        return (self.num_kv, num_layers, num_tokens, self.num_kv_heads, self.head_size)

    def layer_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        return (num_blocks, self.num_kv_heads, self.block_size, self.content_size)


def layout_strides(layout: str, num_layers: int, num_blocks: int, num_heads: int, block_size: int,
                   content_bytes: int, block_stride: int | None = None) -> tuple[int, ...]:
    """Byte strides of the logical axes [L, B, H, N, C] for a vLLM layout.

    ``block_stride`` fixes the block axis' stride the way vLLM does for padded pages and for
    block-outermost buffers shared with other cache groups (their pages sit between our blocks).
    """
    try:
        order = LAYOUT_ORDERS[layout]
    except KeyError:
        raise ValueError(f"unknown KV cache layout {layout!r}; known: {sorted(LAYOUT_ORDERS)}") from None
    shape = (num_layers, num_blocks, num_heads, block_size, content_bytes)
    strides = [0] * 5
    current = 1
    for dim in reversed(order):
        strides[dim] = block_stride if dim == 1 and block_stride else current
        current = strides[dim] * shape[dim]
    return tuple(strides)


def allocate_paged_layers(spec: PagedKVSpec, layout: str, num_layers: int, num_blocks: int,
                          device: torch.device | str = "cpu", block_stride: int | None = None,
                          pin_memory: bool = False) -> list[torch.Tensor]:
    """Per-layer views over one flat int8 buffer, built the way vLLM's allocator builds them.

    For tests and benchmarks: vLLM's ``create_kv_cache_views`` does the same ``as_strided`` on an
    int8 buffer with byte strides, then ``.view(dtype)`` per layer.
    """
    content_bytes = spec.content_size * spec.element_size
    strides = layout_strides(layout, num_layers, num_blocks, spec.num_kv_heads, spec.block_size,
                             content_bytes, block_stride)
    shape = (num_layers, num_blocks, spec.num_kv_heads, spec.block_size, content_bytes)
    span = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True))
    buffer = torch.zeros(span, dtype=torch.int8, device=device, pin_memory=pin_memory)
    view_5d = torch.as_strided(buffer, shape, strides)
    return [view_5d[layer].view(spec.dtype) for layer in range(num_layers)]


@dataclass(frozen=True)
class TokenView:
    """One of K / V / latent as a 6-D view ``[B, H, N // group, group, D // pair, pair]``.

    Token ``o`` of block ``b`` is ``view[b, :, o // group, o % group]`` (shape ``[H, D // pair, pair]``,
    flattened to ``[H, D]``): one indexing rule covers the plain layout and both CPU packings.
    """

    tensor: torch.Tensor
    group: int


def token_views(layer: torch.Tensor, spec: PagedKVSpec) -> tuple[TokenView, ...]:
    """K and V (MHA) or the latent (MLA) of one layer, as token-indexable views over its memory."""
    num_blocks, heads, n, content = layer.shape
    d = spec.head_size
    sb, sh, sn = layer.stride(0), layer.stride(1), layer.stride(2)
    base = layer.storage_offset()

    def view(offset: int, group: int, pair: int, strides: tuple[int, int, int, int]) -> TokenView:
        sizes = (num_blocks, heads, n // group, group, d // pair, pair)
        return TokenView(torch.as_strided(layer, sizes, (sb, sh, *strides), base + offset), group)

    if spec.packing is Packing.PLAIN:
        return tuple(view(k * d, 1, 1, (sn, 0, 1, 0)) for k in range(spec.num_kv))
    if layer.stride(3) != 1 or sn != content:
        raise ValueError(f"packing {spec.packing.value!r} needs each (block, head) region contiguous, "
                         f"got layer strides {tuple(layer.stride())}")
    region = n * d
    if spec.packing is Packing.CPU_VEC:
        # K stored [D, N] (transposed), V stored [N, D].
        return view(0, 1, 1, (1, 0, n, 0)), view(region, 1, 1, (d, 0, 1, 0))
    # cpu_amx: K stored [N/16, D/2, 16, 2] by (o//16, d//2, o%16, d%2);
    #          V stored [D/16, N/2, 16, 2] by (d//16, o//2, d%16, o%2).
    return view(0, 16, 2, (16 * d, 2, 32, 1)), view(region, 2, 16, (32, 1, 16 * n, 2))
