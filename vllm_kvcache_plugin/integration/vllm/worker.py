"""Worker side: register vLLM's paged caches, load chunks before the forward, save after it.

Load = get chunks -> deserialize (storage) -> scatter into the request's blocks (loads.py: pipelined,
before the forward or, for asynchronous loads, on a loader thread while vLLM runs other requests).
A model with several KV-cache groups (vLLM's hybrid manager) stores each chunk in parts, one
:class:`RegisteredCache` each (layout.py); every copy goes group by group, each with its block table,
and never touches the null block (id 0: a sliding window's blocks below the window).
Save = gather the step's completed chunks out of the blocks (the only work on the forward's
critical path) -> hot cache now, disk / remote on the storage writer thread.
A chunk that cannot be loaded (missing, corrupt, foreign, store down) reports its blocks through
``load_error_blocks`` so vLLM recomputes them: a miss, never a wrong token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ... import events
from ...engine import ChunkShape, KVCacheEngine, TierName
from ...kernels import AttentionKind, KVCopier, PagedKVSpec, get_copier
from ...keys import ChunkRef
from ...memory import KVFormat, MemoryObj, chunk_checksum
from ...serde.header import PayloadCheck
from ...serde.naive import slab_bytes
from .layout import CacheLayout, PartLayout, plain_layout
from .loads import IDLE_WAIT_SECS, BackgroundLoads, LoadItem, LoadOutcome, LoadPipeline, StageTimes
from .lookup import LookupReply, LookupServer
from .metadata import LoadSpec, SaveSpec, StepMetadata
from .stats import StepStats

logger = logging.getLogger(__name__)


PLAIN_PART = PartLayout("", (0,))
NULL_BLOCK = 0  # vLLM's null block: stands for blocks a request does not hold (below a sliding window)


@dataclass
class RegisteredCache:
    """vLLM's paged layers of one stored part as the kernels see them (one entry per distinct
    storage). ``segments``: (KV-cache group, first, last + 1) of the part's layers, group by group."""

    layer_names: list[str]
    layers: list[torch.Tensor]
    spec: PagedKVSpec
    shape: ChunkShape
    copier: KVCopier
    part: PartLayout = PLAIN_PART
    segments: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.segments:
            self.segments = ((self.part.groups[0], 0, len(self.layers)),)


def slots_for(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Slot (block_id * block_size + offset) of every token in ``[start, end)``."""
    positions = torch.arange(start, end, dtype=torch.int64)
    blocks = torch.as_tensor(block_ids, dtype=torch.int64)[positions // block_size]
    return blocks * block_size + positions % block_size


def held_from(block_ids: Sequence[int], block_size: int, start: int, end: int) -> int:
    """The first token of ``[start, end)`` from which every block is a real one (not the null
    block); ``end`` when none is. vLLM's null blocks come first (a sliding window's past)."""
    first, last = start // block_size, (end - 1) // block_size
    held = first
    for index in range(first, last + 1):
        if block_ids[index] == NULL_BLOCK:
            held = index + 1
    return max(start, held * block_size) if held <= last else end


class WorkerSide:
    def __init__(self, engine: KVCacheEngine, block_size: int, lookup_address: str | None,
                 layout: CacheLayout | None = None) -> None:
        self.engine = engine
        self.block_size = block_size  # the scheduler's block size: block ids are in these units
        self.layout = layout or plain_layout()
        self.caches: dict[str, RegisteredCache] = {}  # by part name ("" for a plain chunk)
        self.stats = StepStats()
        self._lock = threading.Lock()  # load errors and completions come from the loader thread too
        self._load_errors: set[int] = set()
        self._failed_loads: set[str] = set()  # hybrid models: failed asynchronous loads, by request
        self._finished_early: list[LoadOutcome] = []
        self.pipeline = LoadPipeline(engine, self._retrieve, self._scatter, self._load_items)
        self.background = BackgroundLoads(self.pipeline, self._background_done)
        self._lookup_server = LookupServer(lookup_address, self.lookup) if lookup_address else None

    # -- set-up ----------------------------------------------------------------------------
    def register(self, caches: Sequence[RegisteredCache]) -> None:
        self.caches = {cache.part.name: cache for cache in caches}
        if caches and caches[0].layers[0].device.type == "cuda":
            self.engine.allocator.pin_memory = True  # chunk buffers the GPU copies reach directly
        for cache in caches:
            prepared = self.engine.prewarm(cache.shape, cache.part.max_tokens(self.engine.config.chunk_size,
                                                                              self.block_size))
            logger.info("KV cache registered%s: %d layers, %s, block size %d, %d kv heads x %d, %s, packing %s, "
                        "copier %s; %.0f MB of chunk buffers prepared",
                        f" (part {cache.part.name}: {_tokens_note(cache.part)})" if cache.part.name else "",
                        len(cache.layers), cache.spec.kind, cache.spec.block_size, cache.spec.num_kv_heads,
                        cache.spec.head_size, cache.spec.dtype, cache.spec.packing, cache.copier.name, prepared / 1e6)

    def lookup(self, hashes: list[str]) -> LookupReply:
        start = time.perf_counter()
        result = self.engine.lookup(hashes, self.layout.every_parts, self.layout.last_parts)
        tiers = result.count_by_tier()
        self.stats.record_lookup(len(hashes), result.hit_chunks, tiers, time.perf_counter() - start)
        return LookupReply(result.hit_chunks, *(tiers.get(t.value, 0) for t in TierName))

    # -- load ------------------------------------------------------------------------------
    def load(self, meta: StepMetadata) -> None:
        if meta.cancelled:
            self.background.cancel(meta.cancelled)
        if not self.caches:
            # Nothing registered yet: every load is a miss (asynchronous ones still end).
            outcomes = [LoadOutcome(spec, spec.start) for spec in meta.loads]
            self._record([o for o in outcomes if not o.spec.asynchronous], StageTimes(), asynchronous=False)
            self._finish(self._record([o for o in outcomes if o.spec.asynchronous], StageTimes(), asynchronous=True))
            return
        inline = [spec for spec in meta.loads if not spec.asynchronous]
        if inline:
            times = StageTimes()
            # Before the forward: nothing else computes, the copies may use every core.
            self._record(self.pipeline.run(inline, times=times, exclusive=True), times, asynchronous=False)
        self.background.submit([spec for spec in meta.loads if spec.asynchronous and
                                spec.req_id not in meta.cancelled])
        for spec in meta.loads:  # aborted before its load began: it ends at once
            if spec.asynchronous and spec.req_id in meta.cancelled:
                self._finish([LoadOutcome(spec, spec.start, cancelled=True)])

    def _load_items(self, spec: LoadSpec) -> list[LoadItem]:
        """Every-chunk parts of each chunk, then the last chunk's tail parts."""
        items = [LoadItem(ref, name) for ref in spec.chunks for name in self.layout.every_parts]
        if spec.chunks:
            items += [LoadItem(spec.chunks[-1], name, tail=True) for name in self.layout.last_parts]
        return items

    def _retrieve(self, items: Sequence[LoadItem]) -> list[MemoryObj | None]:
        out: list[MemoryObj | None] = [None] * len(items)
        for name, cache in self.caches.items():
            todo = [i for i, item in enumerate(items) if item.part == name]
            if not todo:
                continue
            refs = [items[i].ref for i in todo]
            tokens = [_span(cache.part.tokens(ref, self.block_size)) for ref in refs]
            # The checksum is verified in _scatter, just before the copy reads the same bytes.
            for i, obj in zip(todo, self.engine.retrieve(refs, cache.shape, name, tokens, defer_check=True),
                              strict=True):
                out[i] = obj
        return out

    def _scatter(self, spec: LoadSpec, item: LoadItem, obj: MemoryObj) -> int | None:
        """Write the tokens of ``[spec.start, spec.end)`` the value holds into each group's real
        blocks (never the null block); None when a window part does not reach back to the first
        block vLLM holds for the request in that group (it would stay unwritten)."""
        cache = self.caches[item.part]
        first, last = cache.part.tokens(item.ref, self.block_size)
        a, b = max(first, spec.start), min(last, spec.end)
        copies = []  # (layers, slots, src) per KV-cache group, checked before anything is written
        offsets = []  # each copy's first token in the chunk
        for group, lo, hi in cache.segments:
            if a >= b:
                break
            ids = spec.block_ids[group]
            if item.tail and (need := held_from(ids, self.block_size, spec.start, b)) < a:
                logger.warning("Chunk %s holds tokens from %d, but vLLM holds group %d's blocks from token %d; "
                               "recomputing", self.engine.key(item.ref, item.part), first, group, need)
                return None
            start = held_from(ids, self.block_size, a, b)
            if start >= b:
                continue
            copies.append((cache.layers[lo:hi], slots_for(ids, self.block_size, start, b),
                           obj.tensor[:, lo:hi, start - first:b - first]))
            offsets.append(start - first)
        nbytes = sum(src.numel() * src.element_size() for _, _, src in copies)
        placed = self._placed_decode(cache, obj, copies, offsets[0] if offsets else 0)
        if placed is not None:
            if not placed:
                return None  # corrupt: written blocks are recomputed; the tier has forgotten the value
            self._placed_event(item, cache, copies)
            return nbytes
        if not self._verified_scatter(cache, obj, copies):
            if not obj.check():  # corrupt: the tier that returned it has said so and forgotten it
                return None
            for layers, slots, src in copies:
                # Host chunks go to the copier as they are: the CUDA copier reads pinned ones
                # directly, the others stage them (KVCopier._reachable).
                cache.copier.scatter(layers, cache.spec, slots, src)
        elif not obj.checked:
            return None  # corrupt: written blocks are recomputed; the tier has forgotten the value
        self._chunk_event("loaded", item.ref, obj.tensor, item.part)
        return nbytes

    @staticmethod
    def _placed_decode(cache: RegisteredCache, obj: MemoryObj, copies: list, first: int) -> bool | None:
        """Decode a value whose decode was left to this reader (CacheGen) straight into the blocks,
        where it applies: the chunk's every layer goes to one group, the copier can say where each
        element lives (host memory), and no tier waits to keep the decoded chunk (the hot cache's
        promotion). True when written (the chunk is spent), False when corrupt (what was written
        is recomputed), None where it does not apply (nothing written)."""
        place = getattr(obj.deferred_check, "place", None)
        if place is None or obj.awaited or len(copies) != 1 or len(copies[0][0]) != obj.meta.shape[1]:
            return None  # obj.awaited: the hot cache keeps the decoded chunk, so decode it, then scatter
        layers, slots, _ = copies[0]
        placement = cache.copier.placement(layers, cache.spec, slots, obj.meta.shape[2], first)
        written = None if placement is None else place(placement)
        if written is None:
            return None
        if not written:
            obj.settle_check(False)
            return False
        obj.spend()
        return True

    def _placed_event(self, item: LoadItem, cache: RegisteredCache, copies: list) -> None:
        """At DEBUG, :meth:`_chunk_event` for a chunk decoded into the blocks: its checksum read back."""
        if logger.isEnabledFor(logging.DEBUG) or events.enabled(logging.DEBUG):
            layers, slots, src = copies[0]
            back = torch.empty(src.shape, dtype=src.dtype)
            cache.copier.gather(layers, cache.spec, slots, back)
            self._chunk_event("loaded", item.ref, back, item.part)

    @staticmethod
    def _verified_scatter(cache: RegisteredCache, obj: MemoryObj, copies: list) -> bool:
        """Verify-and-scatter in one pass where it applies: the whole chunk goes to one group and
        its checksum is over the chunk's slabs (the naive serde), so the copier hashes each slab as
        it copies it. False, with nothing written, where it does not. Corrupt bytes are then in
        the blocks already; the caller reports them as not loaded, so vLLM recomputes them."""
        check = obj.deferred_check
        if not (isinstance(check, PayloadCheck) and check.segment and check.segment == slab_bytes(obj.meta)
                and len(copies) == 1 and copies[0][2].shape == obj.tensor.shape):
            return False
        layers, slots, src = copies[0]
        digests = cache.copier.scatter_verified(layers, cache.spec, slots, src)
        if digests is None:
            return False
        obj.settle_check(check.matches(digests))
        return True

    def _record(self, outcomes: list[LoadOutcome], times: StageTimes, asynchronous: bool) -> list[LoadOutcome]:
        """Log and count finished loads; a synchronous load's failed blocks are reported at once."""
        for outcome in outcomes:
            spec, loaded_to = outcome.spec, outcome.loaded_to
            if not outcome.complete and not outcome.cancelled:
                # One group: vLLM recomputes from the first block not loaded; several: the whole prompt.
                recompute_from = 0 if self.layout.hybrid else loaded_to
                logger.warning("Request %s: loaded %d of %d tokens; tokens from %d will be recomputed",
                               spec.req_id, loaded_to - spec.start, spec.end - spec.start, recompute_from)
                events.emit("load_failed", logging.WARNING, request_id=spec.req_id,
                            loaded_tokens=loaded_to - spec.start, wanted_tokens=spec.end - spec.start,
                            recompute_from=recompute_from)
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
        for a cancelled load: its request is gone). One group only: with several, vLLM takes a
        failed load per request (:meth:`take_failed_loads`)."""
        if outcome.complete or outcome.cancelled:
            return []
        spec = outcome.spec
        ids = spec.block_ids[0]
        return [b for b in ids[outcome.loaded_to // self.block_size:(spec.end - 1) // self.block_size + 1]
                if b != NULL_BLOCK]

    def _add_load_errors(self, outcomes: list[LoadOutcome]) -> None:
        with self._lock:
            for outcome in outcomes:
                if not self.layout.hybrid:
                    self._load_errors.update(self._failed_blocks(outcome))
                elif not outcome.complete and not outcome.cancelled:
                    self._failed_loads.add(outcome.spec.req_id)

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

    def _chunk_event(self, what: str, ref: ChunkRef, tensor: torch.Tensor, part: str = "") -> None:
        """At DEBUG: the chunk's key, tokens and checksum (logs that prove loads are bit-exact)."""
        log_line, event = logger.isEnabledFor(logging.DEBUG), events.enabled(logging.DEBUG)
        if not (log_line or event):
            return
        key, checksum = self.engine.key(ref, part), f"{chunk_checksum(tensor):016x}"
        if log_line:
            logger.debug("%s chunk %s tokens %d-%d xxh3=%s", what, key, ref.start, ref.end, checksum)
        events.emit(f"chunk_{what}", logging.DEBUG, key=key, start=ref.start, end=ref.end, xxh3=checksum)

    def take_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def take_failed_loads(self) -> set[str]:
        """Requests (of a hybrid model) whose asynchronous load failed: vLLM recomputes them whole."""
        with self._lock:
            failed, self._failed_loads = self._failed_loads, set()
        return failed

    # -- save ------------------------------------------------------------------------------
    def save(self, meta: StepMetadata) -> None:
        if not self.caches or not meta.saves:
            return
        for spec in meta.saves:
            self._save_one(spec)

    def _save_one(self, save: SaveSpec) -> None:
        started = time.perf_counter()
        tokens = nbytes = 0
        for ref in save.chunks:
            for cache in self.caches.values():
                stored = self._save_part(save, ref, cache)
                nbytes += stored
                if stored and not cache.part.last_only:
                    tokens += ref.num_tokens
        self.stats.record_save(tokens, nbytes, time.perf_counter() - started)

    def _save_part(self, save: SaveSpec, ref: ChunkRef, cache: RegisteredCache) -> int:
        """Gather one part of a chunk and store it; 0 (nothing stored) when vLLM no longer holds all
        of its tokens: a window below the blocks kept in this step, or null blocks."""
        first, last = cache.part.tokens(ref, self.block_size)
        if first < cache.part.kept_from(save.computed_before, self.block_size) or any(
                held_from(save.block_ids[group], self.block_size, first, last) != first
                for group, _, _ in cache.segments):
            logger.debug("Chunk %s: vLLM no longer holds tokens %d-%d of part %r; not stored",
                         self.engine.key(ref, cache.part.name), first, last, cache.part.name)
            return 0
        obj = self.engine.allocate(cache.shape, last - first)
        try:
            for group, lo, hi in cache.segments:
                slots = slots_for(save.block_ids[group], self.block_size, first, last)
                cache.copier.gather(cache.layers[lo:hi], cache.spec, slots, obj.tensor[:, lo:hi])
            self.engine.store([ref], [obj], cache.part.name, [last - first])
            self._chunk_event("saved", ref, obj.tensor, cache.part.name)
            return obj.nbytes
        except Exception:
            logger.exception("Saving chunk %s of request %s failed; it stays uncached",
                             self.engine.key(ref, cache.part.name), save.req_id)
            return 0
        finally:
            obj.ref_down()

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


def build_registered_cache(names: list[str], layers: list[torch.Tensor], spec: PagedKVSpec,
                           part: PartLayout | None = None,
                           segments: tuple[tuple[int, int, int], ...] = ()) -> RegisteredCache:
    device = layers[0].device
    return RegisteredCache(names, layers, spec, chunk_shape_for(spec, len(layers)), get_copier(spec, device),
                           part or PLAIN_PART, segments)


def registered_parts(layout: CacheLayout, kv_caches: dict[str, torch.Tensor],
                     paged_spec: Callable[[str, torch.Tensor], PagedKVSpec]) -> list[RegisteredCache]:
    """One :class:`RegisteredCache` per part of a hybrid layout: its groups' layers, group by group
    (each group's layers contiguous in the stored part, so one copy per group with its block table)."""
    caches = []
    for part in layout.parts:
        names: list[str] = []
        segments = []
        for index in part.groups:
            group = layout.groups[index]
            segments.append((index, len(names), len(names) + len(group.layer_names)))
            names += group.layer_names
        layers = [kv_caches[name] for name in names]
        caches.append(build_registered_cache(names, layers, paged_spec(names[0], layers[0]), part, tuple(segments)))
    return caches


def _span(tokens: tuple[int, int]) -> int:
    return tokens[1] - tokens[0]


def _tokens_note(part: PartLayout) -> str:
    return f"the {part.window}-token window before each chunk's end" if part.window else "each chunk's tokens"
