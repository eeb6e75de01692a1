"""What vLLM's KV-cache groups mean for a stored chunk.

A model whose layers all keep every token has one KV-cache group, and a stored chunk is what it
always was: every layer's K/V for the chunk's tokens, under the chunk's key. With vLLM's hybrid
KV-cache manager (HMA) a model that mixes full-attention and sliding-window layers has several
groups, each with its own block table, and a sliding group holds only the last ``window`` tokens
of a request (vLLM frees the blocks below it and hands out the null block, id 0, for them). So a
chunk of such a model is stored in **parts**, each its own value:

* ``attn``: the full-attention layers over the chunk's tokens (needed for every chunk of a hit);
* ``swa<W>``: the layers of window ``W`` over the window that ends at the chunk's end (needed for
  the last chunk of a hit only: the next token attends to nothing older). Saved in the step the
  chunk completes, when vLLM still holds that window.

A hit of N tokens then loads ``attn`` for every chunk and ``swa<W>`` of the chunk ending at N: the
bytes a hit needs, no more. The part names are in the keys (``<hash>~attn``), so a vLLM serving the
same model with one group (HMA off: every layer keeps every token) never takes a part for a chunk.

Groups that are not attention (SSM / Mamba state, or kinds this connector does not store) switch
caching off for the model: attention KV without the SSM state at the same token is worthless.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ...keys import ChunkRef

FULL_PART = "attn"


class GroupKind(enum.Enum):
    FULL = "full attention"
    SLIDING = "sliding window"
    OTHER = "other"


@dataclass(frozen=True)
class KVGroup:
    """One of vLLM's KV-cache groups: layers that share a block table."""

    index: int
    kind: GroupKind
    layer_names: tuple[str, ...]
    spec_name: str  # vLLM's spec class, for messages
    sliding_window: int | None = None
    extra_retained: int = 0  # tokens vLLM keeps below a sliding window (multi-token speculation)


@dataclass(frozen=True)
class PartLayout:
    """One stored value per chunk: the layers of ``groups``, over the chunk's tokens (``window``
    None) or over the sliding window that ends at the chunk's end."""

    name: str  # the key suffix; "" is the plain chunk (one group)
    groups: tuple[int, ...]
    window: int | None = None
    extra_retained: int = 0

    @property
    def last_only(self) -> bool:
        """Needed for the last chunk of a hit only."""
        return self.window is not None

    def tokens(self, ref: ChunkRef, block_size: int) -> tuple[int, int]:
        """The token range this part of ``ref`` holds: its window starts at the first block vLLM keeps
        for a hit ending at ``ref.end`` or one token before it (a hit leaves the last prompt token to
        compute)."""
        if self.window is None:
            return ref.start, ref.end
        start = max(0, ref.end - self.window - self.extra_retained) // block_size * block_size
        return start, ref.end

    def max_tokens(self, chunk_size: int, block_size: int) -> int:
        """The most tokens :meth:`tokens` gives for a chunk (what a buffer for this part must hold)."""
        if self.window is None:
            return chunk_size
        # A window may reach back before its chunk (a window longer than a chunk), by whole blocks.
        return self.window + self.extra_retained + block_size - 1

    def kept_from(self, computed: int, block_size: int) -> int:
        """The first token whose block vLLM still holds in a step that starts with ``computed``
        tokens computed (everything, for a part that is not a window)."""
        if self.window is None:
            return 0
        return max(0, computed - self.window + 1 - self.extra_retained) // block_size * block_size


@dataclass(frozen=True)
class CacheLayout:
    groups: tuple[KVGroup, ...]
    parts: tuple[PartLayout, ...]
    #: Why nothing is cached for this model (None: it is).
    uncached_reason: str | None = None

    @property
    def hybrid(self) -> bool:
        """More than one block table: block ids travel per group, and load failures are reported
        per request (vLLM cannot map a block id of one group back to its request)."""
        return len(self.groups) > 1

    @property
    def every_parts(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts if not p.last_only)

    @property
    def last_parts(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts if p.last_only)

    def describe(self) -> str:
        if self.uncached_reason:
            return f"not cached: {self.uncached_reason}"
        if not self.hybrid:
            return "one KV-cache group: plain chunks"
        kinds = ", ".join(f"{g.kind.value}{f' {g.sliding_window}' if g.sliding_window else ''}" for g in self.groups)
        parts = ", ".join(p.name for p in self.parts)
        return f"{len(self.groups)} KV-cache groups [{kinds}]: chunks stored as parts {parts}"


def plain_layout(layer_names: tuple[str, ...] = ()) -> CacheLayout:
    """One group: every layer over the chunk's tokens (today's chunks and keys)."""
    return CacheLayout((KVGroup(0, GroupKind.FULL, layer_names, "FullAttentionSpec"),), (PartLayout("", (0,)),))


def cache_layout(kv_cache_config: Any) -> CacheLayout:
    """Read vLLM's ``KVCacheConfig`` (its ``kv_cache_groups``) into parts."""
    from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec

    groups = []
    for index, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        names = tuple(group.layer_names)
        if type(spec) in (FullAttentionSpec, MLAAttentionSpec):
            groups.append(KVGroup(index, GroupKind.FULL, names, type(spec).__name__))
        elif isinstance(spec, SlidingWindowSpec):
            groups.append(KVGroup(index, GroupKind.SLIDING, names, type(spec).__name__, spec.sliding_window,
                                  getattr(spec, "extra_retained_tokens", 0)))
        else:
            kind = GroupKind.FULL if isinstance(spec, AttentionSpec) and len(kv_cache_config.kv_cache_groups) == 1 \
                else GroupKind.OTHER
            groups.append(KVGroup(index, kind, names, type(spec).__name__))
    if len(groups) == 1:
        if groups[0].kind is GroupKind.OTHER:
            return CacheLayout(tuple(groups), (), f"its KV cache is {groups[0].spec_name}, not attention")
        return CacheLayout(tuple(groups), (PartLayout("", (0,)),))
    others = sorted({g.spec_name for g in groups if g.kind is GroupKind.OTHER})
    if others:
        return CacheLayout(tuple(groups), (), f"it has {', '.join(others)} layers (SSM state or a kind this "
                           "connector does not store), and attention KV without them cannot resume a prompt")
    parts = []
    full = tuple(g.index for g in groups if g.kind is GroupKind.FULL)
    if full:
        parts.append(PartLayout(FULL_PART, full))
    for window in sorted({g.sliding_window for g in groups if g.kind is GroupKind.SLIDING}):
        members = [g for g in groups if g.kind is GroupKind.SLIDING and g.sliding_window == window]
        parts.append(PartLayout(f"swa{window}", tuple(g.index for g in members), window,
                                max(g.extra_retained for g in members)))
    return CacheLayout(tuple(groups), tuple(parts))
