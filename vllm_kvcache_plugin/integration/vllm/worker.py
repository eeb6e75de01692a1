"""Worker side: register vLLM's paged caches, load chunks before the forward, save after it.

Load = get chunks -> deserialize (storage) -> scatter into the request's blocks.
Save = gather the step's completed chunks out of the blocks (the only work on the forward's
critical path) -> hot cache now, disk / remote on the storage writer thread.
A chunk that cannot be loaded (missing, corrupt, foreign, store down) reports its blocks through
``load_error_blocks`` so vLLM recomputes them: a miss, never a wrong token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ... import events
from ...engine import ChunkShape, KVCacheEngine, TierName
from ...kernels import AttentionKind, KVCopier, PagedKVSpec, get_copier
from ...keys import ChunkRef
from ...memory import KVFormat, chunk_checksum
from .lookup import LookupReply, LookupServer
from .metadata import LoadSpec, SaveSpec, StepMetadata
from .stats import StepStats

logger = logging.getLogger(__name__)


@dataclass
class RegisteredCache:
    """vLLM's paged layers as the kernels see them (one entry per distinct storage)."""

    layer_names: list[str]
    layers: list[torch.Tensor]
    spec: PagedKVSpec
    shape: ChunkShape
    copier: KVCopier


def slots_for(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Slot (block_id * block_size + offset) of every token in ``[start, end)``."""
    positions = torch.arange(start, end, dtype=torch.int64)
    blocks = torch.as_tensor(block_ids, dtype=torch.int64)[positions // block_size]
    return blocks * block_size + positions % block_size


class WorkerSide:
    def __init__(self, engine: KVCacheEngine, block_size: int, lookup_address: str | None) -> None:
        self.engine = engine
        self.block_size = block_size  # the scheduler's block size: block ids are in these units
        self.cache: RegisteredCache | None = None
        self.stats = StepStats()
        self._load_errors: set[int] = set()
        self._lookup_server = LookupServer(lookup_address, self.lookup) if lookup_address else None

    # -- set-up ----------------------------------------------------------------------------
    def register(self, cache: RegisteredCache) -> None:
        self.cache = cache
        prepared = self.engine.prewarm(cache.shape)
        logger.info("KV cache registered: %d layers, %s, block size %d, %d kv heads x %d, %s, packing %s, copier %s; "
                    "%.0f MB of chunk buffers prepared", len(cache.layers), cache.spec.kind, cache.spec.block_size,
                    cache.spec.num_kv_heads, cache.spec.head_size, cache.spec.dtype, cache.spec.packing,
                    cache.copier.name, prepared / 1e6)

    def lookup(self, hashes: list[str]) -> LookupReply:
        start = time.perf_counter()
        result = self.engine.lookup(hashes)
        tiers = result.count_by_tier()
        self.stats.record_lookup(len(hashes), result.hit_chunks, tiers, time.perf_counter() - start)
        return LookupReply(result.hit_chunks, *(tiers.get(t.value, 0) for t in TierName))

    # -- load ------------------------------------------------------------------------------
    def load(self, meta: StepMetadata) -> None:
        if self.cache is None or not meta.loads:
            return
        for spec in meta.loads:
            self._load_one(spec)

    def _load_one(self, load: LoadSpec) -> None:
        cache = self.cache
        assert cache is not None
        started = time.perf_counter()
        chunks = self.engine.retrieve(load.chunks, cache.shape)
        loaded_to = load.start
        nbytes = 0
        try:
            for ref, obj in zip(load.chunks, chunks, strict=True):
                if obj is None:
                    break
                a, b = max(ref.start, load.start), min(ref.end, load.end)
                src = obj.tensor[:, :, a - ref.start:b - ref.start]
                try:
                    cache.copier.scatter(cache.layers, cache.spec, slots_for(load.block_ids, self.block_size, a, b),
                                         src.to(cache.layers[0].device))
                except Exception:
                    logger.exception("Scatter of chunk %s failed; recomputing", self.engine.key(ref))
                    break
                loaded_to = b
                nbytes += src.numel() * src.element_size()
                self._chunk_event("loaded", ref, obj.tensor)
        finally:
            for obj in chunks:
                if obj is not None:
                    obj.ref_down()
        if loaded_to < load.end:
            first_bad = loaded_to // self.block_size
            last = (load.end - 1) // self.block_size
            self._load_errors.update(load.block_ids[first_bad:last + 1])
            logger.warning("Request %s: loaded %d of %d tokens; blocks from token %d will be recomputed",
                           load.req_id, loaded_to - load.start, load.end - load.start, loaded_to)
            events.emit("load_failed", logging.WARNING, request_id=load.req_id, loaded_tokens=loaded_to - load.start,
                        wanted_tokens=load.end - load.start, recompute_from=loaded_to)
        self.stats.record_load(loaded_to - load.start, nbytes, loaded_to < load.end, time.perf_counter() - started)

    def _chunk_event(self, what: str, ref: ChunkRef, tensor: torch.Tensor) -> None:
        """At DEBUG: the chunk's key, tokens and checksum (logs that prove loads are bit-exact)."""
        log_line, event = logger.isEnabledFor(logging.DEBUG), events.enabled(logging.DEBUG)
        if not (log_line or event):
            return
        key, checksum = self.engine.key(ref), f"{chunk_checksum(tensor):016x}"
        if log_line:
            logger.debug("%s chunk %s tokens %d-%d xxh3=%s", what, key, ref.start, ref.end, checksum)
        events.emit(f"chunk_{what}", logging.DEBUG, key=key, start=ref.start, end=ref.end, xxh3=checksum)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- save ------------------------------------------------------------------------------
    def save(self, meta: StepMetadata) -> None:
        if self.cache is None or not meta.saves:
            return
        for spec in meta.saves:
            self._save_one(spec)

    def _save_one(self, save: SaveSpec) -> None:
        cache = self.cache
        assert cache is not None
        started = time.perf_counter()
        tokens = nbytes = 0
        for ref in save.chunks:
            obj = self.engine.allocate(cache.shape, ref.num_tokens)
            try:
                cache.copier.gather(cache.layers, cache.spec,
                                    slots_for(save.block_ids, self.block_size, ref.start, ref.end), obj.tensor)
                self.engine.store([ref], [obj])
                self._chunk_event("saved", ref, obj.tensor)
            except Exception:
                logger.exception("Saving chunk %s of request %s failed; it stays uncached", self.engine.key(ref),
                                 save.req_id)
            finally:
                obj.ref_down()
            tokens += ref.num_tokens
            nbytes += obj.nbytes
        self.stats.record_save(tokens, nbytes, time.perf_counter() - started)

    def close(self) -> None:
        if self._lookup_server is not None:
            self._lookup_server.close()
        self.engine.close()


def chunk_shape_for(spec: PagedKVSpec, num_layers: int) -> ChunkShape:
    if spec.kind is AttentionKind.MLA:
        return ChunkShape(KVFormat.MLA, spec.dtype, num_layers, 1, spec.head_size)
    return ChunkShape(KVFormat.KV, spec.dtype, num_layers, spec.num_kv_heads, spec.head_size)


def build_registered_cache(names: list[str], layers: list[torch.Tensor], spec: PagedKVSpec) -> RegisteredCache:
    device = layers[0].device
    return RegisteredCache(names, layers, spec, chunk_shape_for(spec, len(layers)), get_copier(spec, device))
