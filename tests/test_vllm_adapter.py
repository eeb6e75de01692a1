"""The vLLM adapter's scheduler and worker sides, driven step by step with vLLM's own data classes.

No engine is started: the tests play the scheduler's part (Request, NewRequestData,
CachedRequestData, SchedulerOutput are vLLM's real classes), while the worker side runs for real:
its storage, its lookup server on a unix socket, and the kernels on vLLM-shaped paged caches.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM adapter needs vLLM (pip install -e '.[cpu]')")

from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.request import Request

from vllm_kvcache_plugin.config import load_config
from vllm_kvcache_plugin.engine import KVCacheEngine
from vllm_kvcache_plugin.integration.vllm.lookup import AsyncLookups, LookupClient
from vllm_kvcache_plugin.integration.vllm.scheduler import SchedulerSide
from vllm_kvcache_plugin.integration.vllm.worker import WorkerSide, build_registered_cache, slots_for
from vllm_kvcache_plugin.kernels import PagedKVSpec, TorchCopier, allocate_paged_layers

BLOCK = 16
CHUNK = 32
SPEC = PagedKVSpec(kind="mha", block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
NUM_LAYERS = 3


class Harness:
    """One worker (real storage + lookup server) and one scheduler side talking to it."""

    def __init__(self, role: str = "kv_both", **config) -> None:
        self.config = load_config({"chunk_size": CHUNK, **config}, env={})
        self.address = f"\0kvtest-{uuid.uuid4().hex}"
        self.engine = KVCacheEngine(self.config, "test-model")
        self.worker = WorkerSide(self.engine, BLOCK, self.address)
        self.layers = allocate_paged_layers(SPEC, "LBNHC", NUM_LAYERS, num_blocks=64)
        self.worker.register([build_registered_cache([f"layers.{i}.attn" for i in range(NUM_LAYERS)],
                                                     self.layers, SPEC)])
        self.sched = SchedulerSide(self.config, AsyncLookups(LookupClient([self.address], 2.0)),
                                   can_load=role != "kv_producer", can_save=role != "kv_consumer", block_size=BLOCK)
        self.next_block = 1  # vLLM keeps block 0 as its null block

    def blocks(self, n: int) -> list[int]:
        out = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return out

    def forward(self, block_ids: list[int], start: int, end: int, kv: torch.Tensor) -> None:
        """What vLLM's forward does to the paged cache: write the KV of tokens [start, end)."""
        TorchCopier().scatter(self.layers, SPEC, slots_for(block_ids, BLOCK, start, end), kv[:, :, start:end])

    def read(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        out = torch.empty(2, NUM_LAYERS, end - start, SPEC.num_kv_heads, SPEC.head_size, dtype=SPEC.dtype)
        TorchCopier().gather(self.layers, SPEC, slots_for(block_ids, BLOCK, start, end), out)
        return out

    def matched(self, req: Request, local: int = 0, max_steps: int = 10_000) -> tuple[int, bool]:
        """``get_num_new_matched_tokens`` as vLLM calls it: again each step while it answers None."""
        for _ in range(max_steps):
            answer = self.sched.get_num_new_matched_tokens(req, local)
            if answer[0] is not None:
                return answer
            self.sched.lookups.new_step()
            time.sleep(0.001)
        raise AssertionError("the lookup never answered")

    def close(self) -> None:
        self.sched.lookups.close()
        self.worker.close()


def make_request(tokens: list[int], req_id: str | None = None) -> Request:
    return Request(req_id or uuid.uuid4().hex, tokens, SamplingParams(max_tokens=4), None)


def step(new=(), cached=(), scheduled: dict[str, int] | None = None, finished=()) -> SchedulerOutput:
    """A SchedulerOutput with ``new`` = [(request, block_ids, num_computed)] and
    ``cached`` = [(req_id, new_block_ids, num_computed, resumed)]."""
    new_data = [NewRequestData.from_request(req, (blocks,)) for req, blocks, _ in new]
    for data, (_, _, computed) in zip(new_data, new, strict=True):
        data.num_computed_tokens = computed
    cached_data = CachedRequestData(
        req_ids=[c[0] for c in cached], resumed_req_ids={c[0] for c in cached if c[3]}, new_token_ids=[],
        all_token_ids={}, new_block_ids=[(c[1],) if c[1] is not None else None for c in cached],
        num_computed_tokens=[c[2] for c in cached], num_output_tokens=[0] * len(cached))
    scheduled = scheduled or {}
    return SchedulerOutput(scheduled_new_reqs=new_data, scheduled_cached_reqs=cached_data,
                           num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
                           scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
                           num_common_prefix_blocks=[], finished_req_ids=set(finished),
                           free_encoder_mm_hashes=[])


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def run_chunked_prefill(h: Harness, tokens: list[int], kv: torch.Tensor, steps: list[int]) -> tuple[Request, list]:
    """Schedule ``tokens`` as vLLM's chunked prefill would, ``steps`` tokens at a time, saving each step."""
    req = make_request(tokens)
    assert h.matched(req, 0) == (0, False)
    blocks = h.blocks((steps[0] + BLOCK - 1) // BLOCK)
    h.sched.update_state_after_alloc(req, (blocks,), 0)
    saves = []
    computed = 0
    for i, n in enumerate(steps):
        if i == 0:
            out = step(new=[(req, blocks, 0)], scheduled={req.request_id: n})
            new_blocks = blocks
        else:
            need = (computed + n + BLOCK - 1) // BLOCK - len(blocks)
            new_blocks = h.blocks(need)
            blocks = blocks + new_blocks
            out = step(cached=[(req.request_id, new_blocks, computed, False)], scheduled={req.request_id: n})
        meta = h.sched.build_meta(out)
        h.forward(blocks, computed, computed + n, kv)
        h.worker.save(meta)
        saves.extend(c for s in meta.saves for c in s.chunks)
        computed += n
    return req, saves


def test_chunked_prefill_saves_each_chunk_once_and_a_new_instance_loads_it(harness: Harness):
    tokens = list(range(1000, 1300))  # 9 full chunks of 32 and a partial one of 12
    kv = torch.randn(2, NUM_LAYERS, 300, 2, 32).to(torch.bfloat16)
    _, saves = run_chunked_prefill(harness, tokens, kv, [100, 100, 100])
    assert [(c.start, c.end) for c in saves] == [(i, min(i + CHUNK, 300)) for i in range(0, 300, CHUNK)]
    assert len({c.chunk_hash for c in saves}) == len(saves)  # no chunk saved twice

    # Another request with the same prompt (as after a restart: nothing computed locally).
    again = make_request(tokens)
    hit, is_async = harness.matched(again, 0)
    assert (hit, is_async) == (299, False)  # capped: one token is left for the forward to compute
    blocks = harness.blocks(300 // BLOCK + 1)
    harness.sched.update_state_after_alloc(again, (blocks,), hit)
    meta = harness.sched.build_meta(step(new=[(again, blocks, 299)], scheduled={again.request_id: 1}))
    assert [(ld.start, ld.end) for ld in meta.loads] == [(0, 299)] and not meta.saves
    harness.worker.load(meta)
    assert harness.worker.take_load_errors() == set()
    assert torch.equal(harness.read(blocks, 0, 299), kv[:, :, :299])


def test_load_starts_after_vllms_own_prefix_hit(harness: Harness):
    tokens = list(range(5000, 5160))
    kv = torch.randn(2, NUM_LAYERS, 160, 2, 32).to(torch.bfloat16)
    run_chunked_prefill(harness, tokens, kv, [160])
    again = make_request(tokens)
    local = 64  # vLLM's prefix cache already holds 4 blocks
    hit, _ = harness.matched(again, local)
    assert hit == 159 - local
    blocks = harness.blocks(10)
    harness.forward(blocks, 0, local, kv)  # those blocks already hold the local hit
    harness.sched.update_state_after_alloc(again, (blocks,), hit)
    meta = harness.sched.build_meta(step(new=[(again, blocks, 159)], scheduled={again.request_id: 1}))
    (load,) = meta.loads
    assert (load.start, load.end) == (local, 159)
    assert [(c.start, c.end) for c in load.chunks] == [(64, 96), (96, 128), (128, 160)]
    harness.worker.load(meta)
    assert torch.equal(harness.read(blocks, 0, 159), kv[:, :, :159])


def test_preempted_request_resumes_with_new_blocks(harness: Harness):
    tokens = list(range(7000, 7128))
    kv = torch.randn(2, NUM_LAYERS, 128, 2, 32).to(torch.bfloat16)
    req = make_request(tokens)
    harness.matched(req, 0)
    blocks = harness.blocks(4)
    harness.sched.update_state_after_alloc(req, (blocks,), 0)
    meta = harness.sched.build_meta(step(new=[(req, blocks, 0)], scheduled={req.request_id: 64}))
    harness.forward(blocks, 0, 64, kv)
    harness.worker.save(meta)
    # Preempted: its blocks are freed. On resumption the scheduler looks it up again and gives it new
    # blocks, which replace the old ones (resumed_req_ids).
    hit, _ = harness.matched(req, 0)
    assert hit == 64
    new_blocks = harness.blocks(8)
    harness.sched.update_state_after_alloc(req, (new_blocks,), hit)
    out = step(cached=[(req.request_id, new_blocks, 64, True)], scheduled={req.request_id: 64})
    meta = harness.sched.build_meta(out)
    assert [(ld.start, ld.end, list(ld.block_ids[0])) for ld in meta.loads] == [(0, 64, new_blocks)]
    harness.worker.load(meta)
    harness.forward(new_blocks, 64, 128, kv)
    harness.worker.save(meta)
    assert [(c.start, c.end) for s in meta.saves for c in s.chunks] == [(64, 96), (96, 128)]  # not the first two again
    assert torch.equal(harness.read(new_blocks, 0, 128), kv)


def test_a_chunk_gone_between_lookup_and_load_is_a_load_error(harness: Harness):
    tokens = list(range(9000, 9100))
    kv = torch.randn(2, NUM_LAYERS, 100, 2, 32).to(torch.bfloat16)
    _, saves = run_chunked_prefill(harness, tokens, kv, [100])
    again = make_request(tokens)
    hit, _ = harness.matched(again, 0)
    harness.engine.storage.hot.remove(harness.engine.key(saves[2]))  # evicted before the load
    blocks = harness.blocks(7)
    harness.sched.update_state_after_alloc(again, (blocks,), hit)
    meta = harness.sched.build_meta(step(new=[(again, blocks, hit)], scheduled={again.request_id: 1}))
    harness.worker.load(meta)
    # Tokens 0..63 loaded; from token 64 (block 4) on vLLM must recompute.
    assert harness.worker.take_load_errors() == set(blocks[64 // BLOCK:(hit - 1) // BLOCK + 1])
    assert torch.equal(harness.read(blocks, 0, 64), kv[:, :, :64])


def test_roles_consumer_never_saves_producer_never_loads():
    consumer = Harness("kv_consumer")
    producer = Harness("kv_producer")
    try:
        tokens = list(range(300, 364))
        kv = torch.randn(2, NUM_LAYERS, 64, 2, 32).to(torch.bfloat16)
        req = make_request(tokens)
        consumer.matched(req, 0)
        blocks = consumer.blocks(4)
        consumer.sched.update_state_after_alloc(req, (blocks,), 0)
        meta = consumer.sched.build_meta(step(new=[(req, blocks, 0)], scheduled={req.request_id: 64}))
        assert not meta.saves

        _, saves = run_chunked_prefill(producer, tokens, kv, [64])
        assert len(saves) == 2
        assert producer.matched(make_request(tokens), 0) == (0, False)
    finally:
        consumer.close()
        producer.close()


def test_unreachable_worker_is_a_miss():
    config = load_config({"chunk_size": CHUNK}, env={})
    lookups = AsyncLookups(LookupClient([f"\0kvtest-nobody-{uuid.uuid4().hex}"], 0.5))
    sched = SchedulerSide(config, lookups, True, True, BLOCK)
    req = make_request(list(range(100)))
    deadline = time.monotonic() + 30
    while (answer := sched.get_num_new_matched_tokens(req, 0))[0] is None and time.monotonic() < deadline:
        lookups.new_step()
        time.sleep(0.01)
    lookups.close()
    assert answer == (0, False)


def test_shutdown_hint_only_when_vllm_would_kill_pending_saves():
    from vllm_kvcache_plugin.integration.vllm.connector import shutdown_hint

    hint = shutdown_hint(True, 0)
    assert hint is not None and "--shutdown-timeout 10" in hint
    assert shutdown_hint(True, 10) is None  # a grace period: the worker's shutdown flushes
    assert shutdown_hint(False, 0) is None  # kv_consumer: nothing is ever queued


# -- asynchronous lookups and loads --------------------------------------------------------------
@pytest.fixture
def disk_harness(tmp_path):
    """Hot cache off, a disk tier: every hit needs I/O, so it loads asynchronously."""
    h = Harness(local_cpu=False, local_disk=str(tmp_path / "kv"))
    yield h
    h.close()


def saved_prompt(h: Harness, tokens: list[int]) -> tuple[torch.Tensor, list]:
    kv = torch.randn(2, NUM_LAYERS, len(tokens), 2, 32).to(torch.bfloat16)
    _, saves = run_chunked_prefill(h, tokens, kv, [len(tokens)])
    assert h.engine.storage.flush(30)
    return kv, saves


def others_running(h: Harness) -> None:
    """A step that computed another request: a newcomer's load then runs in the background."""
    h.sched.build_meta(step(scheduled={"someone-else": 1}))


def start_async_load(h: Harness, tokens: list[int]) -> tuple[Request, list[int], int, object]:
    """Lookup, allocation and the step that starts the load (the request is not scheduled in it)."""
    others_running(h)
    req = make_request(tokens)
    hit, is_async = h.matched(req, 0)
    assert hit == len(tokens) - 1 and is_async
    blocks = h.blocks(len(tokens) // BLOCK + 1)
    h.sched.update_state_after_alloc(req, (blocks,), hit)
    meta = h.sched.build_meta(step())  # nothing scheduled: vLLM parks the request
    assert meta.idle and [(ld.req_id, ld.asynchronous) for ld in meta.loads] == [(req.request_id, True)]
    return req, blocks, hit, meta


def wait_finished(h: Harness, req_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while req_id not in h.worker.take_finished_loads(wait=True):
        assert time.monotonic() < deadline, "the load never finished"


def test_a_hit_that_needs_io_loads_in_the_background_and_is_reported_finished(disk_harness: Harness):
    h = disk_harness
    tokens = list(range(2000, 2200))
    kv, _ = saved_prompt(h, tokens)
    req, blocks, hit, meta = start_async_load(h, tokens)
    h.worker.load(meta)  # returns at once: the load runs on the loader thread
    wait_finished(h, req.request_id)
    assert h.worker.take_load_errors() == set()
    assert torch.equal(h.read(blocks, 0, hit), kv[:, :, :hit])
    # vLLM then schedules it with the loaded tokens computed (telling the connector of the blocks
    # again, with no external tokens): no second load, and no loaded chunk saved again.
    h.sched.update_state_after_alloc(req, (blocks,), 0)
    meta = h.sched.build_meta(step(new=[(req, blocks, hit)], scheduled={req.request_id: 1}))
    assert not meta.loads and not meta.idle
    h.forward(blocks, hit, len(tokens), kv)
    h.worker.save(meta)
    assert not meta.saves


def test_a_hot_cache_hit_loads_before_the_forward(harness: Harness):
    tokens = list(range(2400, 2500))
    saved_prompt(harness, tokens)
    others_running(harness)
    assert harness.matched(make_request(tokens), 0) == (99, False)  # a memory copy: synchronous


def test_with_nothing_else_running_a_disk_hit_loads_before_the_forward(disk_harness: Harness):
    tokens = list(range(2500, 2600))
    kv, _ = saved_prompt(disk_harness, tokens)
    disk_harness.sched.build_meta(step())  # the last step computed nothing: a sync load costs no one
    req = make_request(tokens)
    assert disk_harness.matched(req, 0) == (99, False)
    blocks = disk_harness.blocks(7)
    disk_harness.sched.update_state_after_alloc(req, (blocks,), 99)
    meta = disk_harness.sched.build_meta(step(new=[(req, blocks, 99)], scheduled={req.request_id: 1}))
    assert [(ld.start, ld.end, ld.asynchronous) for ld in meta.loads] == [(0, 99, False)]
    disk_harness.worker.load(meta)
    assert torch.equal(disk_harness.read(blocks, 0, 99), kv[:, :, :99])


def test_async_loading_off_loads_a_disk_hit_synchronously(tmp_path):
    h = Harness(local_cpu=False, local_disk=str(tmp_path / "kv"), async_loading=False)
    try:
        tokens = list(range(2600, 2700))
        saved_prompt(h, tokens)
        others_running(h)
        assert h.matched(make_request(tokens), 0) == (99, False)
    finally:
        h.close()


def test_a_frozen_lookup_never_holds_a_step(harness: Harness):
    release = threading.Event()
    real_lookup = harness.worker.engine.lookup

    def frozen(hashes, *parts):  # a store that accepts the question and answers nothing, for a while
        release.wait(30)
        return real_lookup(hashes, *parts)

    harness.worker.engine.lookup = frozen
    req = make_request(list(range(3000, 3100)))
    started = time.monotonic()
    answers = []
    for _ in range(20):
        answers.append(harness.sched.get_num_new_matched_tokens(req, 0))
        harness.sched.build_meta(step())  # the next step
    assert answers == [(None, False)] * 20  # "ask again": vLLM skips the request, runs the others
    # 20 steps went by while the store stayed frozen (a blocking lookup would have answered a miss
    # after the channel's 2 s time-out, never None); each step waited for answers, within its budget
    # (the bound here is loose: a loaded 2-core machine must not fail it).
    assert time.monotonic() - started < 10
    assert len(harness.sched.lookups.waited_seconds) == 20
    release.set()
    assert harness.matched(req, 0) == (0, False)


def test_a_step_after_one_that_computed_never_waits_for_a_lookup(harness: Harness):
    tokens = list(range(3200, 3300))
    saved_prompt(harness, tokens)
    asked, release = threading.Event(), threading.Event()
    real_lookup = harness.worker.engine.lookup

    def held(hashes, *parts):  # the answer comes only once the test lets it
        asked.set()
        release.wait(30)
        return real_lookup(hashes, *parts)

    harness.worker.engine.lookup = held
    req = make_request(tokens)
    others_running(harness)  # a decode step ran: the next step's newcomers find others running
    assert harness.sched.get_num_new_matched_tokens(req, 0) == (None, False)
    assert asked.wait(30)  # the question went out; the scheduler did not stay for it
    release.set()
    deadline = time.monotonic() + 30
    while not harness.sched.lookups._replies and time.monotonic() < deadline:
        time.sleep(0.001)  # the answer is in before the next step asks
    others_running(harness)
    assert harness.sched.get_num_new_matched_tokens(req, 0) == (99, False)  # taken at once, no wait
    waited_before = harness.sched.lookups.wait_summary()["steps"]
    harness.sched.build_meta(step())
    waits = harness.sched.lookups.wait_summary()
    assert waits["busy_steps_asked"] == 1 and waits["steps"] == waited_before  # neither busy step waited


def test_an_idle_step_waits_for_a_quick_lookup_within_the_step(harness: Harness):
    tokens = list(range(3300, 3400))
    saved_prompt(harness, tokens)
    harness.sched.build_meta(step())  # the last step computed nothing: a wait costs no one
    harness.sched.lookups.step_budget = 30.0  # a generous budget, so a loaded machine cannot miss it
    harness.sched.lookups.new_step(busy=False)
    waited_before = harness.sched.lookups.wait_summary()["steps"]
    assert harness.sched.get_num_new_matched_tokens(make_request(tokens), 0) == (99, False)  # first ask
    harness.sched.build_meta(step())
    assert harness.sched.lookups.wait_summary()["steps"] == waited_before + 1


def test_cancelling_a_load_mid_way_stops_writing_and_releases_everything(disk_harness: Harness):
    from vllm_kvcache_plugin.integration.vllm.loads import FETCH_DEPTH, GROUP_CHUNKS

    h = disk_harness
    groups = FETCH_DEPTH + 1  # one more group than the pipeline fetches ahead
    tokens = list(range(4000, 4000 + groups * GROUP_CHUNKS * CHUNK))
    saved_prompt(h, tokens)
    live_before = h.engine.allocator.live
    gate, ahead = threading.Event(), threading.Event()
    real_retrieve = h.worker.engine.retrieve
    calls = []

    def slow_retrieve(refs, shape, *args, **kwargs):
        calls.append(refs[0].start)
        if len(calls) == FETCH_DEPTH:
            ahead.set()
        if refs[0].start == 0:
            gate.wait(30)  # the first group is still "arriving" when the request is aborted
        return real_retrieve(refs, shape, *args, **kwargs)

    h.worker.engine.retrieve = slow_retrieve
    req, blocks, hit, meta = start_async_load(h, tokens)
    h.layers[0].zero_()
    h.worker.load(meta)
    assert ahead.wait(30)
    # The client went away: vLLM finishes the request and waits for the worker to let go of it.
    h.sched.request_finished(req)
    meta = h.sched.build_meta(step(finished={req.request_id}))
    assert meta.cancelled == {req.request_id}
    h.worker.load(meta)
    gate.set()
    wait_finished(h, req.request_id)
    assert h.worker.take_load_errors() == set()  # cancelled, not failed: nothing to recompute
    # The groups already in flight arrived; the last one was never fetched, nothing was written.
    assert sorted(calls) == [g * GROUP_CHUNKS * CHUNK for g in range(FETCH_DEPTH)]
    assert h.read(blocks, 0, hit)[:, 0].abs().sum() == 0
    assert h.engine.allocator.live == live_before  # every fetched chunk's buffer went back
    # A cancelled request's later steps plan nothing for it.
    assert h.sched.build_meta(step()).loads == []


def test_a_request_aborted_before_its_load_began_ends_at_once(disk_harness: Harness):
    h = disk_harness
    tokens = list(range(4500, 4600))
    saved_prompt(h, tokens)
    others_running(h)
    req = make_request(tokens)
    hit, is_async = h.matched(req, 0)
    assert is_async
    blocks = h.blocks(7)
    h.sched.update_state_after_alloc(req, (blocks,), hit)
    h.sched.request_finished(req)  # aborted in the same step
    meta = h.sched.build_meta(step(finished={req.request_id}))
    assert meta.cancelled == {req.request_id} and [ld.req_id for ld in meta.loads] == [req.request_id]
    h.worker.load(meta)
    assert h.worker.take_finished_loads() == {req.request_id}


def test_a_failed_background_load_reports_its_blocks_and_is_not_retried(disk_harness: Harness):
    h = disk_harness
    tokens = list(range(5000, 5000 + 4 * CHUNK))
    kv, saves = saved_prompt(h, tokens)
    req, blocks, hit, meta = start_async_load(h, tokens)
    h.engine.storage.disk.remove(h.engine.key(saves[1]))  # gone between lookup and load
    h.worker.load(meta)
    deadline = time.monotonic() + 30
    finished: set[str] = set()
    while req.request_id not in finished:
        finished |= h.worker.take_finished_loads(wait=True)
        assert time.monotonic() < deadline
    # Reported in the same step as the completion: vLLM recomputes from token 32 (block 2) on.
    assert h.worker.take_load_errors() == set(blocks[CHUNK // BLOCK:(hit - 1) // BLOCK + 1])
    assert torch.equal(h.read(blocks, 0, CHUNK), kv[:, :, :CHUNK])
    # Had vLLM freed every block (nothing valid) and asked again, the answer is a miss, not a
    # second load that would fail the same way.
    assert h.sched.get_num_new_matched_tokens(req, 0) == (0, False)


def test_a_flipped_bit_found_by_the_verify_and_scatter_pass_is_recomputed(disk_harness: Harness):
    """The CPU copier hashes each slab as it copies it (one pass): a chunk whose bytes changed on
    disk is written, found corrupt, reported as not loaded (vLLM recomputes its blocks), counted,
    and forgotten by the disk tier; the chunks before it are exact."""
    from vllm_kvcache_plugin.storage.disk import file_name

    h = disk_harness
    cache = h.worker.caches[""]
    if type(cache.copier).scatter_verified is TorchCopier.scatter_verified:
        pytest.skip(f"the {cache.copier.name} copier cannot hash as it copies (no C compiler for the CPU fast path)")
    tokens = list(range(2700, 2800))
    kv, saves = saved_prompt(h, tokens)
    path = os.path.join(h.config.local_disk, file_name(h.engine.key(saves[1])))
    with open(path, "r+b") as fh:  # one bit of chunk 1's V, layer 2
        fh.seek(os.path.getsize(path) - 100)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x08]))
    fused = []
    real = cache.copier.scatter_verified
    cache.copier.scatter_verified = lambda *args: fused.append(digests := real(*args)) or digests
    try:
        h.sched.build_meta(step())  # nothing else running: the load runs before the forward
        req = make_request(tokens)
        assert h.matched(req, 0) == (99, False)
        blocks = h.blocks(7)
        h.sched.update_state_after_alloc(req, (blocks,), 99)
        h.worker.load(h.sched.build_meta(step(new=[(req, blocks, 99)], scheduled={req.request_id: 1})))
    finally:
        del cache.copier.scatter_verified
    assert len(fused) == 2 and all(fused)  # chunks 0 and 1 went through the one-pass path
    assert h.worker.take_load_errors() == set(blocks[CHUNK // BLOCK:(99 - 1) // BLOCK + 1])
    assert torch.equal(h.read(blocks, 0, CHUNK), kv[:, :, :CHUNK])
    assert h.engine.storage.tier_counters["disk"].corrupt == 1 and not os.path.exists(path)


# -- values decoded straight into the blocks -----------------------------------------------------
def load_before_the_forward(h: Harness, tokens: list[int]) -> list[int]:
    """Lookup, allocation and a load that runs before the forward (nothing else running)."""
    h.sched.build_meta(step())
    req = make_request(tokens)
    hit = len(tokens) - 1
    assert h.matched(req, 0) == (hit, False)
    blocks = h.blocks(len(tokens) // BLOCK + 1)
    h.sched.update_state_after_alloc(req, (blocks,), hit)
    meta = h.sched.build_meta(step(new=[(req, blocks, hit)], scheduled={req.request_id: 1}))
    assert [(ld.start, ld.end, ld.asynchronous) for ld in meta.loads] == [(0, hit, False)]
    h.worker.load(meta)
    assert h.worker.take_load_errors() == set()
    return blocks


@pytest.mark.parametrize("hot_cache", [False, True], ids=["hot-cache-off", "hot-cache-on"])
def test_a_cachegen_hit_is_decoded_straight_into_the_blocks_unless_the_hot_cache_keeps_it(tmp_path, hot_cache):
    """A CacheGen value's decode waits for the scatter step. With nothing to keep the decoded chunk,
    the decoder writes through the copier's placement and no chunk is scattered; with the hot cache
    on, the chunk is decoded, promoted and scattered as before. Either way the blocks hold exactly
    what decode-then-scatter writes."""
    pytest.importorskip("vllm_kvcache_plugin.serde.cachegen.rans_cpp")
    h = Harness(remote_url=f"fs://{tmp_path / 'remote'}", remote_serde="cachegen", local_cpu=hot_cache)
    try:
        cache = h.worker.caches[""]
        tokens = list(range(3000, 3100))
        keys = [h.engine.key(ref) for ref in saved_prompt(h, tokens)[1]]
        if not hasattr(h.engine.storage.remote.serde.coder, "prepare"):
            pytest.skip("no C++ compiler here: the numpy coder decodes at once")
        if hot_cache:
            h.engine.storage.hot.clear()
        calls = {"placement": 0, "scatter": 0}

        def counted(name, real):
            def call(*args, **kwargs):
                calls[name] += 1
                return real(*args, **kwargs)
            return call
        cache.copier.placement = counted("placement", cache.copier.placement)
        cache.copier.scatter = counted("scatter", cache.copier.scatter)
        try:
            blocks = load_before_the_forward(h, tokens)
        finally:
            del cache.copier.placement, cache.copier.scatter
        if hot_cache:
            assert calls == {"placement": 0, "scatter": 4}
            assert all(h.engine.storage.hot.contains(key) for key in keys)
        else:
            assert calls == {"placement": 4, "scatter": 0}  # 3 whole chunks and 3 of the last one's 4 tokens
        decoded = h.engine.storage.remote.batched_get(keys)  # decoded at once, the usual way
        want = torch.cat([obj.tensor for obj in decoded], dim=2)[:, :, :len(tokens) - 1]
        assert torch.equal(h.read(blocks, 0, len(tokens) - 1), want)
        for obj in decoded:
            obj.ref_down()
    finally:
        h.close()


def test_a_remote_hit_is_promoted_after_its_verify_and_scatter_pass(tmp_path):
    """With the hot cache on, a naive remote hit still loads in one verify-and-scatter pass, and is
    promoted once that pass has verified it."""
    h = Harness(remote_url=f"fs://{tmp_path / 'remote'}")
    try:
        cache = h.worker.caches[""]
        if type(cache.copier).scatter_verified is TorchCopier.scatter_verified:
            pytest.skip(f"the {cache.copier.name} copier cannot hash as it copies (no C compiler)")
        tokens = list(range(3200, 3300))
        kv, saves = saved_prompt(h, tokens)
        keys = [h.engine.key(ref) for ref in saves]
        h.engine.storage.hot.clear()
        fused = []
        real = cache.copier.scatter_verified
        cache.copier.scatter_verified = lambda *args: fused.append(digests := real(*args)) or digests
        try:
            blocks = load_before_the_forward(h, tokens)
        finally:
            del cache.copier.scatter_verified
        assert len(fused) == 3 and all(fused)  # the whole chunks; the last one is scattered in part
        assert torch.equal(h.read(blocks, 0, len(tokens) - 1), kv[:, :, :len(tokens) - 1])
        assert all(h.engine.storage.hot.contains(key) for key in keys)
    finally:
        h.close()
