"""The engine: chunk hashes -> keys -> the storage tiers. Knows nothing of vLLM.

It is the one door an integration (the vLLM adapter) has into the store: it names chunks with
this worker's keys (which carry the model and the rank), stores gathered chunks, retrieves
chunks for a load, answers prefix lookups, and sizes and pre-warms chunk buffers. Everything
below it (tiers, serde, connectors) stays out of the adapter's sight, so neither has to change
when the other does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from . import connectors
from .config import KVCacheConfig
from .keys import ChunkRef, KeyBuilder
from .memory import Allocator, ChunkMeta, KVFormat, MemoryObj
from .storage import LookupResult, StorageManager, TierName

logger = logging.getLogger(__name__)

#: How many chunks back a lookup looks for the last-chunk parts of a hit (a chunk saved while its
#: window was gone has none; the one before it usually has).
LAST_PART_TRIES = 4

__all__ = ["ChunkShape", "KVCacheEngine", "LookupResult", "TierName", "describe_remote"]


def describe_remote(url: str | None) -> str:
    """The remote URL as logs may show it (secrets redacted; "none" when unset)."""
    return connectors.describe_remote(url)


@dataclass(frozen=True)
class ChunkShape:
    """The per-token geometry of this model's chunks (everything but the token count)."""

    fmt: KVFormat
    dtype: object  # torch.dtype
    num_layers: int
    num_heads: int
    head_size: int

    def meta(self, num_tokens: int) -> ChunkMeta:
        lead = 2 if self.fmt == KVFormat.KV else 1
        return ChunkMeta(self.fmt, self.dtype, (lead, self.num_layers, num_tokens, self.num_heads, self.head_size))


class KVCacheEngine:
    def __init__(self, config: KVCacheConfig, model_name: str, world_size: int = 1, rank: int = 0,
                 storage: StorageManager | None = None, allocator: Allocator | None = None,
                 serde_options: dict | None = None) -> None:
        self.config = config
        self.allocator = allocator or (storage.allocator if storage else Allocator())
        self.keys = KeyBuilder(config.model_name or model_name, world_size, rank)
        self.storage = storage or StorageManager(config, allocator=self.allocator, serde_options=serde_options)

    # -- what the adapter asks -------------------------------------------------------------
    @property
    def tiers(self) -> list[str]:
        return self.storage.tiers

    @property
    def key_pattern(self) -> str:
        return self.keys.pattern

    def key(self, ref: ChunkRef, part: str = "") -> str:
        return self.keys.key(ref.chunk_hash, part)

    def lookup(self, chunk_hashes: Sequence[str], every: Sequence[str] = ("",),
               last: Sequence[str] = ()) -> LookupResult:
        """How many leading chunks are stored, and in which tier. A chunk counts when every part in
        ``every`` is stored for it and for each chunk before it; the parts in ``last`` are needed for
        the last chunk of a hit only (a sliding window's tail), so the hit ends at the last chunk
        that has them (at most ``LAST_PART_TRIES`` chunks back)."""
        every = list(every)
        keys = [self.keys.key(h, part) for h in chunk_hashes for part in every]
        found = self.storage.lookup_prefix(keys)
        hit = found.hit_chunks // len(every) if every else len(chunk_hashes)
        sources = found.sources[::len(every)][:hit] if every else []
        if last and hit:
            for end in range(hit, max(0, hit - LAST_PART_TRIES), -1):
                tail = self.storage.lookup_prefix([self.keys.key(chunk_hashes[end - 1], p) for p in last])
                if tail.hit_chunks == len(last):
                    return LookupResult(end, sources[:end])
            return LookupResult(0, [])
        return LookupResult(hit, sources)

    def allocate(self, shape: ChunkShape, num_tokens: int) -> MemoryObj:
        """A pooled chunk buffer to gather into (the caller drops its reference)."""
        return self.allocator.allocate(shape.meta(num_tokens))

    def store(self, refs: Sequence[ChunkRef], chunks: Sequence[MemoryObj], part: str = "",
              tokens: Sequence[int] | None = None) -> None:
        """Store each chunk (or ``part`` of it, of ``tokens[i]`` tokens) under its key (the caller
        keeps its references)."""
        for i, (ref, obj) in enumerate(zip(refs, chunks, strict=True)):
            want = tokens[i] if tokens is not None else ref.num_tokens
            if obj.meta.num_tokens != want:
                raise ValueError(f"chunk has {obj.meta.num_tokens} tokens, ref {ref.start}:{ref.end} wants {want}")
            self.storage.put(self.key(ref, part), obj)

    def retrieve(self, refs: Sequence[ChunkRef], shape: ChunkShape, part: str = "",
                 tokens: Sequence[int] | None = None, defer_check: bool = False) -> list[MemoryObj | None]:
        """Each ref's chunk (or ``part`` of it, of ``tokens[i]`` tokens: default the ref's own) as a
        reference the caller drops, or None when missing, corrupt or foreign. ``defer_check``: a
        chunk may come with its checksum still to verify (``MemoryObj.check()``, which the caller
        runs just before it reads the chunk: a load then reads each byte from memory once)."""
        if not refs:
            return []
        counts = list(tokens) if tokens is not None else [r.num_tokens for r in refs]
        # Chunks can differ in length (the partial tail): the longest sizes receive buffers, and
        # each chunk's full geometry is checked below.
        expected = shape.meta(max(counts))
        found = self.storage.get_many([self.key(r, part) for r in refs], expected, defer_check)
        for i, (ref, obj) in enumerate(zip(refs, found, strict=True)):
            if obj is not None and obj.meta.shape != shape.meta(counts[i]).shape:
                logger.warning("Chunk %s has shape %s, expected %s tokens; treating as a miss",
                               self.key(ref, part), obj.meta.shape, counts[i])
                obj.ref_down()
                found[i] = None
        return found

    def prewarm(self, shape: ChunkShape, num_tokens: int | None = None) -> int:
        """Touch pooled buffers for this model's chunks (gathers) and stored values (loads), and let
        the tiers set up what a first load would (a serde's coder), before the first request, so a
        restart hit pays for neither. Returns the bytes of buffers prepared."""
        full = shape.meta(num_tokens or self.config.chunk_size)
        self.storage.prewarm(full)
        return self.allocator.prewarm([full.nbytes, *self.storage.receive_sizes(full)])

    def stats(self) -> dict[str, object]:
        return self.storage.stats()

    def close(self) -> None:
        self.storage.close()
