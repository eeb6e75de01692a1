"""Hybrid models (vLLM's hybrid KV-cache manager): layouts read from vLLM's own config objects, and the
scheduler and worker sides driven step by step as for a model with sliding-window and full layers.

The layers here are separate tensors per KV-cache group (in vLLM they alias one buffer; a block id
is owned by one group at a time, so the copies are the same). Block ids start at 1: vLLM keeps block
0 as its null block, which stands for the blocks of a sliding group below its window.
"""

from __future__ import annotations

import time
import uuid

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM adapter needs vLLM (pip install -e '.[cpu]')")

from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)
from vllm.v1.request import Request

from vllm_kvcache_plugin.config import load_config
from vllm_kvcache_plugin.engine import KVCacheEngine
from vllm_kvcache_plugin.integration.vllm.layout import FULL_PART, cache_layout
from vllm_kvcache_plugin.integration.vllm.lookup import AsyncLookups, LookupClient
from vllm_kvcache_plugin.integration.vllm.scheduler import SchedulerSide
from vllm_kvcache_plugin.integration.vllm.worker import WorkerSide, registered_parts, slots_for
from vllm_kvcache_plugin.kernels import PagedKVSpec, TorchCopier, allocate_paged_layers
from vllm_kvcache_plugin.keys import ChunkRef

BLOCK = 16
CHUNK = 64
WINDOW = 24  # a window part of a chunk: [align_down(end - 24, 16), end) = its last 32 tokens
DTYPE = torch.float32
SPEC = PagedKVSpec(kind="mha", block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=DTYPE)
NUM_BLOCKS = 96
GROUPS = ("sliding", "sliding", "full")  # as Gemma 3: sliding groups first
SWA = f"swa{WINDOW}"


def attn(block_size: int = BLOCK):
    return FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=8, dtype=DTYPE)


def sliding(window: int = WINDOW):
    return SlidingWindowSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=DTYPE, sliding_window=window)


def vllm_config(*specs) -> KVCacheConfig:
    groups = [KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn"], spec) for i, spec in enumerate(specs)]
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=groups)


# -- layouts from vLLM's own config objects ------------------------------------------------------
def test_one_group_keeps_the_plain_chunk_and_its_keys():
    layout = cache_layout(vllm_config(attn()))
    assert not layout.hybrid and [p.name for p in layout.parts] == [""] and layout.uncached_reason is None
    assert [p.name for p in cache_layout(vllm_config(sliding())).parts] == [""]  # all-sliding: one group


def test_sliding_and_full_groups_become_an_every_chunk_part_and_a_window_part():
    layout = cache_layout(vllm_config(sliding(), sliding(), attn(), sliding(48)))
    assert layout.hybrid and layout.uncached_reason is None
    assert [(p.name, p.groups, p.window) for p in layout.parts] == [
        (FULL_PART, (2,), None), (SWA, (0, 1), WINDOW), ("swa48", (3,), 48)]
    assert layout.every_parts == (FULL_PART,) and layout.last_parts == (SWA, "swa48")


def test_a_window_part_never_holds_more_tokens_than_its_buffers_are_sized_for():
    for window in (24, 100, 300):  # shorter and longer than a chunk
        part = cache_layout(vllm_config(sliding(window), attn())).parts[1]
        spans = [part.tokens(ChunkRef(max(0, end - CHUNK), end, "0" * 64), BLOCK) for end in range(1, 1200)]
        assert max(b - a for a, b in spans) <= part.max_tokens(CHUNK, BLOCK)
        assert all(b - a >= min(b, window) for a, b in spans)  # and always the whole window before the end


def test_an_ssm_hybrid_is_not_cached_and_says_why():
    mamba = MambaSpec(block_size=BLOCK, shapes=((4, 8), (8, 8)), dtypes=(DTYPE, DTYPE))
    layout = cache_layout(vllm_config(mamba, mamba, attn()))
    assert layout.parts == () and "MambaSpec" in layout.uncached_reason


def test_the_scheduler_of_an_ssm_hybrid_answers_misses_and_plans_nothing():
    mamba = MambaSpec(block_size=BLOCK, shapes=((4, 8),), dtypes=(DTYPE,))
    layout = cache_layout(vllm_config(mamba, attn()))
    config = load_config({"chunk_size": CHUNK}, env={})
    lookups = AsyncLookups(LookupClient(["\0kvtest-nobody"], 0.1))
    try:
        # The connector turns loading and saving off for such a layout (connector.py).
        sched = SchedulerSide(config, lookups, can_load=False, can_save=False, block_size=BLOCK, layout=layout)
        req = make_request(list(range(300)))
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        sched.update_state_after_alloc(req, ([1, 2], [3, 4]), 0)
        meta = sched.build_meta(step(new=[(req, ([1, 2], [3, 4]), 0)], scheduled={req.request_id: 300}))
        assert meta.is_empty() and not sched.trackers
    finally:
        lookups.close()


# -- scheduler + worker ----------------------------------------------------------------------------
class Hybrid:
    """One worker (real storage, hot cache) and a scheduler side for a 3-group model."""

    def __init__(self, engine: KVCacheEngine | None = None) -> None:
        self.layout = cache_layout(vllm_config(*(sliding() if g == "sliding" else attn() for g in GROUPS)))
        self.config = load_config({"chunk_size": CHUNK}, env={})
        self.address = f"\0kvtest-{uuid.uuid4().hex}"
        self.engine = engine or KVCacheEngine(self.config, "hybrid-model")
        self.worker = WorkerSide(self.engine, BLOCK, self.address, self.layout)
        names = [g.layer_names[0] for g in self.layout.groups]
        self.layers = dict(zip(names, allocate_paged_layers(SPEC, "LBNHC", len(names), num_blocks=NUM_BLOCKS),
                               strict=True))
        self.worker.register(registered_parts(self.layout, self.layers, lambda name, layer: SPEC))
        self.sched = SchedulerSide(self.config, AsyncLookups(LookupClient([self.address], 2.0)), True, True, BLOCK,
                                   layout=self.layout)
        self.next_block = 1

    def layer(self, group: int) -> torch.Tensor:
        return self.layers[self.layout.groups[group].layer_names[0]]

    def blocks(self, n: int) -> list[int]:
        out = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return out

    def forward(self, block_ids: tuple[list[int], ...], start: int, end: int, kv: torch.Tensor) -> None:
        """Write every group's KV of tokens [start, end) (kv: [2, groups, tokens, heads, size])."""
        for group, ids in enumerate(block_ids):
            TorchCopier().scatter([self.layer(group)], SPEC, slots_for(ids, BLOCK, start, end),
                                  kv[:, group:group + 1, start:end])

    def read(self, group: int, ids: list[int], start: int, end: int) -> torch.Tensor:
        out = torch.empty(2, 1, end - start, 2, 8, dtype=DTYPE)
        TorchCopier().gather([self.layer(group)], SPEC, slots_for(ids, BLOCK, start, end), out)
        return out

    def matched(self, req: Request) -> tuple[int, bool]:
        for _ in range(10_000):
            answer = self.sched.get_num_new_matched_tokens(req, 0)
            if answer[0] is not None:
                return answer
            self.sched.lookups.new_step()
            time.sleep(0.001)
        raise AssertionError("the lookup never answered")

    def wait_load(self, req_id: str) -> tuple[set[str], set[str]]:
        deadline = time.monotonic() + 30
        finished: set[str] = set()
        while req_id not in finished and time.monotonic() < deadline:
            finished |= self.worker.take_finished_loads(wait=True)
        assert req_id in finished, "the load never ended"
        return finished, self.worker.take_failed_loads()

    def close(self) -> None:
        self.sched.lookups.close()
        self.worker.close()


def make_request(tokens: list[int]) -> Request:
    return Request(uuid.uuid4().hex, tokens, SamplingParams(max_tokens=4), None)


def step(new=(), cached=(), scheduled=None) -> SchedulerOutput:
    """``new`` = [(request, block_ids per group, num_computed)]; ``cached`` = [(req_id, new block ids
    per group, num_computed)]."""
    new_data = [NewRequestData.from_request(req, tuple(blocks)) for req, blocks, _ in new]
    for data, (_, _, computed) in zip(new_data, new, strict=True):
        data.num_computed_tokens = computed
    cached_data = CachedRequestData(
        req_ids=[c[0] for c in cached], resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
        new_block_ids=[tuple(c[1]) for c in cached], num_computed_tokens=[c[2] for c in cached],
        num_output_tokens=[0] * len(cached))
    scheduled = scheduled or {}
    return SchedulerOutput(scheduled_new_reqs=new_data, scheduled_cached_reqs=cached_data,
                           num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
                           scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
                           num_common_prefix_blocks=[], finished_req_ids=set(), free_encoder_mm_hashes=[])


@pytest.fixture
def hybrid():
    h = Hybrid()
    yield h
    h.close()


TOKENS = list(range(5000, 5200))  # 3 whole chunks of 64 and a partial one of 8
KV = torch.randn(2, len(GROUPS), len(TOKENS), 2, 8, generator=torch.Generator().manual_seed(0))


def prefill(h: Hybrid, steps: list[int]) -> tuple[Request, list]:
    """The prompt computed ``steps`` tokens at a time; sliding groups give their blocks below the
    window back between steps (the null block stands in for them), as vLLM's manager does."""
    req = make_request(TOKENS)
    assert h.matched(req) == (0, False)
    computed, ids = 0, [[] for _ in GROUPS]
    saves = []
    for i, n in enumerate(steps):
        need = -(-(computed + n) // BLOCK)
        fresh = [h.blocks(need - len(ids[g])) for g in range(len(GROUPS))]
        for g, kind in enumerate(GROUPS):  # blocks wholly below the window: freed, now the null block
            skipped = max(0, computed - WINDOW + 1) // BLOCK if kind == "sliding" else 0
            ids[g] = [0] * skipped + ids[g][skipped:] + fresh[g]
        if i == 0:
            h.sched.update_state_after_alloc(req, tuple(ids), 0)
            out = step(new=[(req, [list(x) for x in ids], 0)], scheduled={req.request_id: n})
        else:
            out = step(cached=[(req.request_id, fresh, computed)], scheduled={req.request_id: n})
        meta = h.sched.build_meta(out)
        h.forward(tuple(ids), computed, computed + n, KV)
        h.worker.save(meta)
        saves += [(c, s.computed_before) for s in meta.saves for c in s.chunks]
        computed += n
    return req, saves


def stored_parts(h: Hybrid, refs) -> set[tuple[str, str]]:
    """(chunk hash, part) of every part of ``refs`` in the hot cache."""
    return {(c.chunk_hash, p) for c in refs for p in (FULL_PART, SWA, "")
            if h.engine.storage.hot.contains(h.engine.key(c, p))}


def test_one_step_prefill_stores_each_chunk_as_parts_then_a_restart_loads_full_layers_and_the_window(hybrid):
    _, saves = prefill(hybrid, [200])
    refs = [c for c, _ in saves]
    assert [(c.start, c.end) for c in refs] == [(0, 64), (64, 128), (128, 192), (192, 200)]
    assert stored_parts(hybrid, refs) == {(c.chunk_hash, p) for c in refs for p in (FULL_PART, SWA)}
    window = hybrid.engine.retrieve([refs[-1]], hybrid.worker.caches[SWA].shape, SWA, [200 - 176])
    assert window[0] is not None and window[0].meta.num_tokens == 24  # [176, 200): the blocks a hit needs
    window[0].ref_down()

    # A restarted vLLM (same store, empty prefix cache) asks for the prompt again.
    again = make_request(TOKENS)
    assert hybrid.matched(again) == (199, True)  # hybrid loads are always asynchronous
    skipped = (199 - WINDOW + 1) // BLOCK  # what vLLM's sliding manager hands as null blocks
    ids = [[0] * skipped + hybrid.blocks(13 - skipped), [0] * skipped + hybrid.blocks(13 - skipped),
           hybrid.blocks(13)]
    hybrid.sched.update_state_after_alloc(again, tuple(ids), 199)
    null_before = [hybrid.layer(g)[0].clone() for g in range(3)]
    meta = hybrid.sched.build_meta(step(new=[(again, ids, 0)], scheduled={}))
    assert [(ld.start, ld.end, ld.asynchronous) for ld in meta.loads] == [(0, 199, True)]
    hybrid.worker.load(meta)
    _, failed = hybrid.wait_load(again.request_id)
    assert not failed
    assert torch.equal(hybrid.read(2, ids[2], 0, 199), KV[:, 2:3, :199])  # full layers: every token
    for g in (0, 1):  # sliding layers: the window vLLM holds blocks for
        first = skipped * BLOCK
        assert torch.equal(hybrid.read(g, ids[g], first, 199), KV[:, g:g + 1, first:199])
        assert torch.equal(hybrid.layer(g)[0], null_before[g]), "the null block was written"


def test_a_chunk_without_its_window_part_ends_the_hit_at_the_chunk_before(hybrid):
    _, saves = prefill(hybrid, [200])
    last = saves[-1][0]
    hybrid.engine.storage.hot.remove(hybrid.engine.key(last, SWA))
    assert hybrid.matched(make_request(TOKENS)) == (192, True)
    hybrid.engine.storage.hot.remove(hybrid.engine.key(saves[0][0], FULL_PART))
    assert hybrid.matched(make_request(TOKENS)) == (0, False)  # a full-attention part is needed for every chunk


def test_chunked_prefill_stores_windows_only_while_vllm_holds_them(hybrid):
    _, saves = prefill(hybrid, [100, 100])
    assert [(c.end, before) for c, before in saves] == [(64, 0), (128, 100), (192, 100), (200, 100)]
    parts = stored_parts(hybrid, [c for c, _ in saves])
    for chunk, _ in saves:  # every window part saved ends after the step's start: vLLM still held it
        assert (chunk.chunk_hash, FULL_PART) in parts and (chunk.chunk_hash, SWA) in parts
    # Tokens stored in each window part are the ones written by the forward (never a freed block).
    for chunk, _ in saves:
        first = max(0, chunk.end - WINDOW) // BLOCK * BLOCK
        (obj,) = hybrid.engine.retrieve([chunk], hybrid.worker.caches[SWA].shape, SWA, [chunk.end - first])
        assert torch.equal(obj.tensor, KV[:, 0:2, first:chunk.end]), chunk
        obj.ref_down()


def test_a_window_below_the_blocks_vllm_keeps_is_not_stored(hybrid):
    """A chunk saved in a step that starts past its window (a prefix vLLM had cached itself): the
    window's blocks may hold other requests' KV by then, so only the full layers are stored."""
    req = make_request(TOKENS)
    assert hybrid.matched(req) == (0, False)
    local = 128  # vLLM's own prefix cache had two chunks; this step computes the rest
    skipped = max(0, local - WINDOW + 1) // BLOCK
    ids = [[0] * skipped + hybrid.blocks(13 - skipped), [0] * skipped + hybrid.blocks(13 - skipped),
           hybrid.blocks(13)]
    hybrid.sched.update_state_after_alloc(req, tuple(ids), 0)
    meta = hybrid.sched.build_meta(step(new=[(req, ids, local)], scheduled={req.request_id: 200 - local}))
    hybrid.forward(tuple(ids), 0, 200, KV)  # (the null block absorbs the sliding tokens vLLM dropped)
    hybrid.worker.save(meta)
    refs = [c for s in meta.saves for c in s.chunks]
    ends = {c.chunk_hash: c.end for c in refs}
    parts = {(ends[h], p) for h, p in stored_parts(hybrid, refs)}
    assert parts == {(64, FULL_PART), (128, FULL_PART), (192, FULL_PART), (200, FULL_PART), (128, SWA),
                     (192, SWA), (200, SWA)}


def test_a_failed_hybrid_load_is_reported_per_request_never_as_block_ids(hybrid):
    _, saves = prefill(hybrid, [200])
    again = make_request(TOKENS)
    assert hybrid.matched(again) == (199, True)
    hybrid.engine.storage.hot.remove(hybrid.engine.key(saves[1][0], FULL_PART))  # gone after the lookup
    ids = [[0] * 11 + hybrid.blocks(2), [0] * 11 + hybrid.blocks(2), hybrid.blocks(13)]
    hybrid.sched.update_state_after_alloc(again, tuple(ids), 199)
    hybrid.worker.load(hybrid.sched.build_meta(step(new=[(again, ids, 0)], scheduled={})))
    finished, failed = hybrid.wait_load(again.request_id)
    assert failed == {again.request_id} <= finished
    assert hybrid.worker.take_load_errors() == set()  # vLLM cannot map one group's block ids to requests
