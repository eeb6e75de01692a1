"""Scheduler side: prefix lookups, request tracking through chunked prefill and preemption, and the
per-step plan (which chunks to load before the forward and which to save after it).

A request's prompt is cut into chunks once (chained hashes that carry every input of its K/V:
request_keys.py). ``stored`` counts the
leading chunks known to be in the store (found by the lookup, or saved by us); every step saves
the chunks that the step completes beyond it, so no chunk of a request is saved twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ... import events
from ...config import KVCacheConfig
from .lookup import LookupClient, LookupReply
from .metadata import ChunkRef, LoadSpec, SaveSpec, StepMetadata
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
    block_ids: list[int] = field(default_factory=list)
    stored: int = 0  # leading chunks known to be stored
    load: tuple[int, int] | None = None  # tokens to load before the next forward
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


class SchedulerSide:
    def __init__(self, config: KVCacheConfig, lookup: LookupClient, can_load: bool, can_save: bool,
                 block_size: int, variant: tuple[tuple[str, str], ...] = ()) -> None:
        self.config = config
        self.request_keys = RequestKeys(config.chunk_size, config.save_unfull_chunk, variant)
        self.lookup_client = lookup
        self.can_load = can_load
        self.can_save = can_save
        self.block_size = block_size
        self.trackers: dict[str, RequestTracker] = {}
        self.pending: dict[str, PendingLookup] = {}

    def _chunks(self, request: Request) -> list[ChunkRef]:
        return self.request_keys.chunks(request)

    # -- lookup ------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if not self.can_load and not self.can_save:
            return 0, False
        pending = self.pending.get(request.request_id)
        if pending is None:
            chunks = self._chunks(request)
            reply = self.lookup_client.lookup([c.chunk_hash for c in chunks]) if chunks else LookupReply(0)
            stored_tokens = chunks[reply.hit_chunks - 1].end if reply.hit_chunks else 0
            # A synchronous load must leave at least one token for the forward to compute.
            hit = min(stored_tokens, request.num_tokens - 1)
            pending = PendingLookup(chunks, reply, hit)
            self.pending[request.request_id] = pending
        pending.local_tokens = num_computed_tokens
        if not self.can_load:
            return 0, False
        return max(0, pending.hit_tokens - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        pending = self.pending.pop(request.request_id, None)
        if pending is None:  # scheduled without a lookup (e.g. a role that does neither)
            pending = PendingLookup(self._chunks(request), LookupReply(0), 0)
        tracker = RequestTracker(request.request_id, len(request.prompt_token_ids or []), pending.chunks,
                                 list(block_ids), stored=pending.reply.hit_chunks,
                                 tiers=pending.reply.by_tier())
        if not self.can_save:
            tracker.stored = len(tracker.chunks)
        if num_external_tokens > 0:
            end = pending.hit_tokens
            tracker.load = (end - num_external_tokens, end)
        self.trackers[request.request_id] = tracker
        self._log_request(request, pending, num_external_tokens)

    def _log_request(self, request: Request, pending: PendingLookup, num_external: int) -> None:
        total = len(request.prompt_token_ids or [])
        events.emit("request", request_id=request.request_id, prompt_tokens=total, loaded_tokens=num_external,
                    local_tokens=pending.local_tokens, stored_tokens=pending.hit_tokens,
                    chunks_by_tier=pending.reply.by_tier())
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
        meta = StepMetadata()
        for new in output.scheduled_new_reqs:
            tracker = self.trackers.get(new.req_id)
            if tracker is None:
                continue
            tracker.block_ids = list(new.block_ids[0])
            self._plan(meta, tracker, new.num_computed_tokens + output.num_scheduled_tokens.get(new.req_id, 0))
        cached = output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracker = self.trackers.get(req_id)
            if tracker is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracker.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                tracker.block_ids.extend(new_blocks[0])
            self._plan(meta, tracker, cached.num_computed_tokens[i] + output.num_scheduled_tokens.get(req_id, 0))
        for req_id in output.finished_req_ids:
            self.trackers.pop(req_id, None)
            self.pending.pop(req_id, None)
        return meta

    def _plan(self, meta: StepMetadata, tracker: RequestTracker, computed_after: int) -> None:
        if tracker.load is not None:
            start, end = tracker.load
            chunks = tuple(c for c in tracker.chunks if c.overlaps(start, end))
            meta.loads.append(LoadSpec(tracker.req_id, start, end, chunks, tuple(tracker.block_ids)))
            tracker.load = None
        if tracker.done_saving:
            return
        computed = min(computed_after, tracker.prompt_len)
        todo = []
        while tracker.stored < len(tracker.chunks) and tracker.chunks[tracker.stored].end <= computed:
            todo.append(tracker.chunks[tracker.stored])
            tracker.stored += 1
        if todo:
            meta.saves.append(SaveSpec(tracker.req_id, tuple(todo), tuple(tracker.block_ids)))

    def request_finished(self, request: Request) -> None:
        self.trackers.pop(request.request_id, None)
        self.pending.pop(request.request_id, None)
