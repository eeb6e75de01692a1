"""Worker side: register vLLM's paged caches, load chunks before the forward, save after it.

Load = get chunks -> deserialize (storage) -> scatter into the request's blocks (loads.py: pipelined,
before the forward or, for asynchronous loads, on a loader thread while vLLM runs other requests).
Save = gather the step's completed chunks out of the blocks (the only work on the forward's
critical path) -> hot cache now, disk / remote on the storage writer thread.
A chunk that cannot be loaded (missing, corrupt, foreign, store down) reports its blocks through
``load_error_blocks`` so vLLM recomputes them: a miss, never a wrong token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ... import events
from ...engine import ChunkShape, KVCacheEngine, TierName
from ...kernels import AttentionKind, KVCopier, PagedKVSpec, get_copier
from ...keys import ChunkRef
from ...memory import KVFormat, MemoryObj, chunk_checksum
from .loads import IDLE_WAIT_SECS, BackgroundLoads, LoadOutcome, LoadPipeline, StageTimes
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
        self._lock = threading.Lock()  # load errors and completions come from the loader thread too
        self._load_errors: set[int] = set()
        self._finished_early: list[LoadOutcome] = []
        self.pipeline = LoadPipeline(engine, self._retrieve, self._scatter)
        self.background = BackgroundLoads(self.pipeline, self._background_done)
        self._lookup_server = LookupServer(lookup_address, self.lookup) if lookup_address else None

    # -- set-up ----------------------------------------------------------------------------
    def register(self, cache: RegisteredCache) -> None:
        self.cache = cache
        if cache.layers[0].device.type == "cuda":
            self.engine.allocator.pin_memory = True  # chunk buffers the GPU copies reach directly
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
        if meta.cancelled:
            self.background.cancel(meta.cancelled)
        if self.cache is None:
            # Nothing registered yet: every load is a miss (asynchronous ones still end).
            outcomes = [LoadOutcome(spec, spec.start) for spec in meta.loads]
            self._record([o for o in outcomes if not o.spec.asynchronous], StageTimes(), asynchronous=False)
            self._finish(self._record([o for o in outcomes if o.spec.asynchronous], StageTimes(), asynchronous=True))
            return
        inline = [spec for spec in meta.loads if not spec.asynchronous]
        if inline:
            times = StageTimes()
            self._record(self.pipeline.run(inline, times=times), times, asynchronous=False)
        self.background.submit([spec for spec in meta.loads if spec.asynchronous and
                                spec.req_id not in meta.cancelled])
        for spec in meta.loads:  # aborted before its load began: it ends at once
            if spec.asynchronous and spec.req_id in meta.cancelled:
                self._finish([LoadOutcome(spec, spec.start, cancelled=True)])

    def _retrieve(self, refs: Sequence[ChunkRef]) -> list[MemoryObj | None]:
        assert self.cache is not None
        return self.engine.retrieve(refs, self.cache.shape)

    def _scatter(self, spec: LoadSpec, ref: ChunkRef, obj: MemoryObj, a: int, b: int) -> int:
        cache = self.cache
        assert cache is not None
        src = obj.tensor[:, :, a - ref.start:b - ref.start]
        # Host chunks go to the copier as they are: the CUDA copier reads pinned ones directly, the
        # others stage them (KVCopier._reachable).
        cache.copier.scatter(cache.layers, cache.spec, slots_for(spec.block_ids, self.block_size, a, b), src)
        self._chunk_event("loaded", ref, obj.tensor)
        return src.numel() * src.element_size()

    def _record(self, outcomes: list[LoadOutcome], times: StageTimes, asynchronous: bool) -> list[LoadOutcome]:
        """Log and count finished loads; a synchronous load's failed blocks are reported at once."""
        for outcome in outcomes:
            spec, loaded_to = outcome.spec, outcome.loaded_to
            if self._failed_blocks(outcome):
                logger.warning("Request %s: loaded %d of %d tokens; blocks from token %d will be recomputed",
                               spec.req_id, loaded_to - spec.start, spec.end - spec.start, loaded_to)
                events.emit("load_failed", logging.WARNING, request_id=spec.req_id,
                            loaded_tokens=loaded_to - spec.start, wanted_tokens=spec.end - spec.start,
                            recompute_from=loaded_to)
            self.stats.record_load(loaded_to - spec.start, outcome.nbytes, not outcome.complete, times.total)
        if outcomes:
            events.emit("loads_done", asynchronous=asynchronous, requests=[o.spec.req_id for o in outcomes],
                        tokens=sum(o.loaded_to - o.spec.start for o in outcomes),
                        bytes=sum(o.nbytes for o in outcomes),
                        cancelled=[o.spec.req_id for o in outcomes if o.cancelled], **times.as_ms())
        if not asynchronous:
            self._add_load_errors(outcomes)
        return outcomes

    def _failed_blocks(self, outcome: LoadOutcome) -> list[int]:
        """The blocks vLLM must recompute: from the first token not loaded to the load's end (none
        for a cancelled load: its request is gone)."""
        if outcome.complete or outcome.cancelled:
            return []
        spec = outcome.spec
        return list(spec.block_ids[outcome.loaded_to // self.block_size:(spec.end - 1) // self.block_size + 1])

    def _add_load_errors(self, outcomes: list[LoadOutcome]) -> None:
        with self._lock:
            for outcome in outcomes:
                self._load_errors.update(self._failed_blocks(outcome))

    def _background_done(self, outcomes: list[LoadOutcome], times: StageTimes) -> None:
        self._record(outcomes, times, asynchronous=True)

    def _finish(self, outcomes: list[LoadOutcome]) -> None:
        """Completions to report without the loader thread (cancelled or impossible loads)."""
        with self._lock:
            self._finished_early.extend(outcomes)

    def take_finished_loads(self, wait: bool = False) -> set[str]:
        """Requests whose asynchronous load has ended; their failed blocks go to the load errors of
        the same step, so vLLM sees both together. ``wait``: the step computes nothing, so wait a
        moment for a load rather than spin."""
        outcomes = self.background.take_finished(IDLE_WAIT_SECS if wait else 0.0)
        with self._lock:
            outcomes += self._finished_early
            self._finished_early = []
        self._add_load_errors(outcomes)
        return {outcome.spec.req_id for outcome in outcomes}

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
        with self._lock:
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
        self.background.close()
        self.pipeline.close()
        self.engine.close()


def chunk_shape_for(spec: PagedKVSpec, num_layers: int) -> ChunkShape:
    if spec.kind is AttentionKind.MLA:
        return ChunkShape(KVFormat.MLA, spec.dtype, num_layers, 1, spec.head_size)
    return ChunkShape(KVFormat.KV, spec.dtype, num_layers, spec.num_kv_heads, spec.head_size)


def build_registered_cache(names: list[str], layers: list[torch.Tensor], spec: PagedKVSpec) -> RegisteredCache:
    device = layers[0].device
    return RegisteredCache(names, layers, spec, chunk_shape_for(spec, len(layers)), get_copier(spec, device))
