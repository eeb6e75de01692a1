"""The engine: token ids -> chunk keys -> store / retrieve / lookup. Knows nothing of vLLM.

The vLLM adapter (or any other integration) hands it token ids and canonical chunks; the engine
cuts the tokens into chunks with chained keys and talks to the storage manager.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import KVCacheConfig
from .keys import ChunkSpan, KeyBuilder
from .memory import Allocator, ChunkMeta, KVFormat, MemoryObj
from .storage import StorageManager

logger = logging.getLogger(__name__)


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


@dataclass
class EngineLookup:
    """The result of a prefix lookup, in tokens."""

    hit_tokens: int
    total_tokens: int
    chunks_by_tier: dict[str, int] = field(default_factory=dict)


class KVCacheEngine:
    def __init__(self, config: KVCacheConfig, model_name: str, world_size: int = 1, rank: int = 0,
                 storage: StorageManager | None = None, allocator: Allocator | None = None,
                 serde_options: dict | None = None) -> None:
        self.config = config
        self.allocator = allocator or (storage.allocator if storage else Allocator())
        self.keys = KeyBuilder(config.model_name or model_name, world_size, rank, config.chunk_size)
        self.storage = storage or StorageManager(config, allocator=self.allocator, serde_options=serde_options)

    def spans(self, token_ids: Sequence[int] | np.ndarray, include_partial: bool | None = None) -> list[ChunkSpan]:
        if include_partial is None:
            include_partial = self.config.save_unfull_chunk
        return self.keys.spans(token_ids, include_partial)

    def lookup(self, token_ids: Sequence[int] | np.ndarray) -> EngineLookup:
        """How many leading tokens are stored (whole chunks, the partial tail included if stored)."""
        spans = self.spans(token_ids, include_partial=True)
        if not spans:
            return EngineLookup(0, len(token_ids))
        result = self.storage.lookup_prefix([s.key for s in spans])
        hit_tokens = spans[result.hit_chunks - 1].end if result.hit_chunks else 0
        return EngineLookup(hit_tokens, len(token_ids), result.count_by_tier())

    def store(self, spans: Sequence[ChunkSpan], chunks: Sequence[MemoryObj]) -> None:
        """Store each chunk under its span's key (the caller keeps its references)."""
        for span, obj in zip(spans, chunks, strict=True):
            if obj.meta.num_tokens != span.num_tokens:
                raise ValueError(f"chunk has {obj.meta.num_tokens} tokens, span {span.start}:{span.end} wants "
                                 f"{span.num_tokens}")
            self.storage.put(span.key, obj)

    def retrieve(self, spans: Sequence[ChunkSpan], shape: ChunkShape) -> list[MemoryObj | None]:
        """Each span's chunk (a reference the caller drops) or None when missing, corrupt or foreign."""
        if not spans:
            return []
        # Spans can differ in length (the partial tail): the longest sizes receive buffers, and
        # each chunk's full geometry is checked below.
        expected = shape.meta(max(s.num_tokens for s in spans))
        found = self.storage.get_many([s.key for s in spans], expected)
        for i, (span, obj) in enumerate(zip(spans, found, strict=True)):
            if obj is not None and obj.meta.shape != shape.meta(span.num_tokens).shape:
                logger.warning("Chunk %s has shape %s, expected %s tokens; treating as a miss",
                               span.key, obj.meta.shape, span.num_tokens)
                obj.ref_down()
                found[i] = None
        return found

    def prewarm(self, shape: ChunkShape) -> int:
        """Touch pooled buffers for this model's chunks (gathers) and stored values (loads) before the
        first request, so a restart hit does not pay for fresh pages. Returns the bytes prepared."""
        full = shape.meta(self.config.chunk_size)
        sizes = [full.nbytes]
        if self.storage.remote is not None and (size := self.storage.remote.receive_size(full)) is not None:
            sizes.append(size)
        if self.storage.disk is not None:
            sizes.append(self.storage.disk.serde.max_value_size(full))
        return self.allocator.prewarm(sizes)

    def close(self) -> None:
        self.storage.close()
