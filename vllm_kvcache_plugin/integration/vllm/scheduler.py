"""Scheduler side: prefix lookups, request tracking through chunked prefill and preemption, and the
per-step plan (which chunks to load before the forward and which to save after it).

A request's prompt is cut into chunks once (chained hashes that carry every input of its K/V:
request_keys.py). ``stored`` counts the
leading chunks known to be in the store (found by the lookup, or saved by us); every step saves
the chunks that the step completes beyond it, so no chunk of a request is saved twice.

Nothing here waits on a store: lookups run on a background thread (``AsyncLookups``; a pending one
answers vLLM "not yet", ``None``), and while other requests run, a hit that needs I/O is loaded
asynchronously: vLLM parks the request (WAITING_FOR_REMOTE_KVS) until the workers report its load
finished, while every other request keeps running. A hit held entirely in the workers' hot cache,
or any hit while nothing else runs, loads before the step's forward instead (that costs no one,
and saves the step an asynchronous load adds).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ... import events
from ...config import KVCacheConfig
from .layout import CacheLayout, plain_layout
from .lookup import AsyncLookups, LookupReply
from .metadata import BlockIds, ChunkRef, LoadSpec, SaveSpec, StepMetadata
from .request_keys import RequestKeys

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


@dataclass
class RequestTracker:
    req_id: str
    prompt_len: int
    chunks: list[ChunkRef]
    block_ids: list[list[int]] = field(default_factory=list)  # per KV-cache group
    stored: int = 0  # leading chunks known to be stored
    load: tuple[int, int] | None = None  # tokens to load before the next forward
    loading: bool = False  # an asynchronous load is in flight
    tiers: dict[str, int] = field(default_factory=dict)  # where the lookup found the stored chunks

    @property
    def done_saving(self) -> bool:
        return self.stored >= len(self.chunks)


@dataclass
class PendingLookup:
    """What the last lookup of a waiting request found (kept until it is scheduled)."""

    chunks: list[ChunkRef]
    reply: LookupReply
    hit_tokens: int  # stored tokens, capped so that at least one token is computed
    local_tokens: int = 0
    asynchronous: bool = False  # how a load of this hit runs (see the module docstring)
    lookup_seconds: float = 0.0  # from the first question to the answer (steps included)


class SchedulerSide:
    def __init__(self, config: KVCacheConfig, lookups: AsyncLookups, can_load: bool, can_save: bool,
                 block_size: int, variant: tuple[tuple[str, str], ...] = (), layout: CacheLayout | None = None) -> None:
        self.config = config
        self.layout = layout or plain_layout()
        self.request_keys = RequestKeys(config.chunk_size, config.save_unfull_chunk, variant)
        self.lookups = lookups
        self.can_load = can_load
        self.can_save = can_save
        self.block_size = block_size
        self.trackers: dict[str, RequestTracker] = {}
        self.pending: dict[str, PendingLookup] = {}
        self._asking: dict[str, tuple[list[ChunkRef], float]] = {}  # lookups in flight, since when
        self._loads_to_start: list[LoadSpec] = []  # asynchronous loads planned since the last step
        self._cancelled: set[str] = set()
        self._others_running = False  # did the last step compute anything

    def _chunks(self, request: Request) -> list[ChunkRef]:
        return self.request_keys.chunks(request)

    # -- lookup ------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.can_load and not self.can_save:
            return 0, False
        req_id = request.request_id
        pending = self.pending.get(req_id)
        tracker = self.trackers.get(req_id)
        if pending is None and tracker is not None and tracker.loading:
            # Asked again while its asynchronous load was in flight: the load failed from its first
            # block on (vLLM freed the blocks). Compute it; a second load would fail the same way.
            logger.info("Request %s: its KV load failed; recomputing the prompt", req_id)
            pending = PendingLookup(tracker.chunks, LookupReply(0), 0)
            self.pending[req_id] = pending
        if pending is None:
            chunks, asked_at = self._asking.get(req_id) or (self._chunks(request), time.perf_counter())
            reply = self.lookups.reply(req_id, [c.chunk_hash for c in chunks]) if chunks else LookupReply(0)
            if reply is None:
                self._asking[req_id] = (chunks, asked_at)
                return None, False  # vLLM asks again next step
            self._asking.pop(req_id, None)
            stored_tokens = chunks[reply.hit_chunks - 1].end if reply.hit_chunks else 0
            # Leave at least one token for the forward to compute (vLLM samples from it).
            hit = min(stored_tokens, request.num_tokens - 1)
            pending = PendingLookup(chunks, reply, hit, asynchronous=self._load_asynchronously(reply),
                                    lookup_seconds=time.perf_counter() - asked_at)
            self.pending[req_id] = pending
        pending.local_tokens = num_computed_tokens
        if not self.can_load:
            return 0, False
        tokens = max(0, pending.hit_tokens - num_computed_tokens)
        return tokens, pending.asynchronous and tokens > 0

    def _load_asynchronously(self, reply: LookupReply) -> bool:
        """In the background only where that spares someone: other requests are running (their
        decode must not wait for our I/O) and the hit needs I/O (a hot-cache hit is a memory copy,
        faster than the step an asynchronous load adds). With nothing running, loading before the
        forward costs no one and saves that step (measured: benchmarks/RESULTS.md, TTFT)."""
        if self.layout.hybrid:
            # vLLM takes a failed load of a hybrid model only per request, and only from an
            # asynchronous one (a block id names a block of one group, not a request).
            return True
        all_hot = reply.hot >= reply.hit_chunks
        return self.config.async_loading and not all_hot and self._others_running

    def update_state_after_alloc(self, request: Request, block_ids: tuple[list[int], ...],
                                 num_external_tokens: int) -> None:
        """``block_ids``: the request's blocks, one list per KV-cache group."""
        if not self.can_load and not self.can_save:
            return
        pending = self.pending.pop(request.request_id, None)
        tracker = self.trackers.get(request.request_id)
        if pending is None and tracker is not None and tracker.loading:
            # Scheduled after its asynchronous load: the request is the one already tracked.
            tracker.loading = False
            tracker.block_ids = [list(ids) for ids in block_ids]
            events.emit("load_scheduled", request_id=request.request_id)
            return
        if pending is None:  # scheduled without a lookup (e.g. a role that does neither)
            pending = PendingLookup(self._chunks(request), LookupReply(0), 0)
        tracker = RequestTracker(request.request_id, len(request.prompt_token_ids or []), pending.chunks,
                                 [list(ids) for ids in block_ids], stored=pending.reply.hit_chunks,
                                 tiers=pending.reply.by_tier())
        if not self.can_save:
            tracker.stored = len(tracker.chunks)
        if num_external_tokens > 0:
            end = pending.hit_tokens
            start = end - num_external_tokens
            if pending.asynchronous:
                # Starts with this step (the request is not scheduled until the workers finish it).
                tracker.loading = True
                self._loads_to_start.append(self._load_spec(tracker, start, end, asynchronous=True))
            else:
                tracker.load = (start, end)
        self.trackers[request.request_id] = tracker
        self._log_request(request, pending, num_external_tokens)

    def _log_request(self, request: Request, pending: PendingLookup, num_external: int) -> None:
        total = len(request.prompt_token_ids or [])
        events.emit("request", request_id=request.request_id, prompt_tokens=total, loaded_tokens=num_external,
                    local_tokens=pending.local_tokens, stored_tokens=pending.hit_tokens,
                    chunks_by_tier=pending.reply.by_tier(), asynchronous=bool(num_external) and pending.asynchronous,
                    lookup_ms=round(1e3 * pending.lookup_seconds, 3))
        if num_external:
            tiers = ", ".join(f"{t}={n}" for t, n in pending.reply.by_tier().items()) or "none"
            logger.info("Request %s: cache hit, loading %d of %d prompt tokens (vLLM prefix cache had %d; "
                        "chunks by tier: %s)", request.request_id, num_external, total,
                        pending.local_tokens, tiers)
        else:
            logger.info("Request %s: cache miss, %d prompt tokens to compute (vLLM prefix cache had %d, "
                        "store had %d)", request.request_id, total, pending.local_tokens,
                        pending.hit_tokens)

    # -- per-step plan -------------------------------------------------------------------------
    def build_meta(self, output: SchedulerOutput) -> StepMetadata:
        idle = output.total_num_scheduled_tokens == 0
        self._others_running = not idle  # what the next step's newcomers find
        self.lookups.new_step(busy=not idle)
        meta = StepMetadata(loads=self._loads_to_start, cancelled=self._cancelled, idle=idle)
        self._loads_to_start, self._cancelled = [], set()
        for new in output.scheduled_new_reqs:
            tracker = self.trackers.get(new.req_id)
            if tracker is None:
                continue
            tracker.block_ids = [list(ids) for ids in new.block_ids]
            self._plan(meta, tracker, new.num_computed_tokens,
                       new.num_computed_tokens + output.num_scheduled_tokens.get(new.req_id, 0))
        cached = output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracker = self.trackers.get(req_id)
            if tracker is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracker.block_ids = [list(ids) for ids in new_blocks] if new_blocks else []
            elif new_blocks:
                if not tracker.block_ids:
                    tracker.block_ids = [[] for _ in new_blocks]
                for group, ids in zip(tracker.block_ids, new_blocks, strict=True):
                    group.extend(ids)
            computed = cached.num_computed_tokens[i]
            self._plan(meta, tracker, computed, computed + output.num_scheduled_tokens.get(req_id, 0))
        for req_id in output.finished_req_ids:
            self._forget(req_id)
        return meta

    @staticmethod
    def _load_spec(tracker: RequestTracker, start: int, end: int, asynchronous: bool = False) -> LoadSpec:
        chunks = tuple(c for c in tracker.chunks if c.overlaps(start, end))
        return LoadSpec(tracker.req_id, start, end, chunks, _frozen(tracker.block_ids), asynchronous)

    def _plan(self, meta: StepMetadata, tracker: RequestTracker, computed_before: int, computed_after: int) -> None:
        if tracker.load is not None:
            meta.loads.append(self._load_spec(tracker, *tracker.load))
            tracker.load = None
        if tracker.done_saving:
            return
        computed = min(computed_after, tracker.prompt_len)
        todo = []
        while tracker.stored < len(tracker.chunks) and tracker.chunks[tracker.stored].end <= computed:
            todo.append(tracker.chunks[tracker.stored])
            tracker.stored += 1
        if todo:
            meta.saves.append(SaveSpec(tracker.req_id, tuple(todo), _frozen(tracker.block_ids), computed_before))

    def request_finished(self, request: Request) -> None:
        tracker = self.trackers.get(request.request_id)
        if tracker is not None and tracker.loading:
            # Aborted while its KV arrives: vLLM frees its blocks once the workers report the load
            # finished, which they do as soon as they have stopped writing into them.
            self._cancelled.add(request.request_id)
        self._forget(request.request_id)

    def _forget(self, req_id: str) -> None:
        self.trackers.pop(req_id, None)
        self.pending.pop(req_id, None)
        if self._asking.pop(req_id, None) is not None:
            self.lookups.discard(req_id)


def _frozen(block_ids: list[list[int]]) -> BlockIds:
    return tuple(tuple(ids) for ids in block_ids)
