"""The load pipeline and the background loader (integration/vllm/loads.py), with real chunk objects.

The fetch and scatter steps are the pipeline's own parameters here, so each test can hold one of
them at a chosen point and see what the other does meanwhile.
"""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM adapter needs vLLM (pip install -e '.[cpu]')")

from vllm_kvcache_plugin.integration.vllm.loads import GROUP_CHUNKS, BackgroundLoads, LoadPipeline
from vllm_kvcache_plugin.integration.vllm.metadata import LoadSpec
from vllm_kvcache_plugin.keys import ChunkRef
from vllm_kvcache_plugin.memory import Allocator, ChunkMeta, KVFormat

CHUNK = 16


class FakeEngine:
    def key(self, ref: ChunkRef, part: str = "") -> str:
        return f"key-{ref.start}{part}"


def spec(req_id: str, chunks: int, start_hash: int = 0) -> LoadSpec:
    refs = tuple(ChunkRef(i * CHUNK, (i + 1) * CHUNK, f"{start_hash + i:064x}") for i in range(chunks))
    return LoadSpec(req_id, 0, chunks * CHUNK, refs, (tuple(range(chunks)),), asynchronous=True)


class Recorder:
    """retrieve / scatter doubles over a real allocator; every chunk's bytes are checked on scatter."""

    def __init__(self) -> None:
        self.allocator = Allocator()
        self.lock = threading.Lock()
        self.log: list[tuple[str, int]] = []
        self.scattered: dict[str, list[int]] = {}
        self.missing: set[int] = set()
        self.fetch_hooks: dict[int, threading.Event] = {}  # group's first token -> set when fetched
        self.hold_scatter: dict[int, threading.Event] = {}  # token -> wait for this before scattering

    def retrieve(self, items):
        refs = [item.ref for item in items]
        with self.lock:
            self.log.append(("fetch", refs[0].start))
        out = []
        for ref in refs:
            if ref.start in self.missing:
                out.append(None)
                continue
            obj = self.allocator.allocate(ChunkMeta(KVFormat.KV, torch.float32, (2, 1, CHUNK, 1, 4)))
            obj.tensor.fill_(ref.start)
            out.append(obj)
        if (hook := self.fetch_hooks.get(refs[0].start)) is not None:
            hook.set()
        return out

    def scatter(self, load_spec, item, obj) -> int:
        ref = item.ref
        if (gate := self.hold_scatter.get(ref.start)) is not None:
            assert gate.wait(10), "the pipeline waited for this scatter before fetching ahead"
        assert torch.all(obj.tensor == ref.start)
        with self.lock:
            self.log.append(("scatter", ref.start))
            self.scattered.setdefault(load_spec.req_id, []).append(ref.start)
        return obj.nbytes


def test_the_next_group_arrives_while_this_one_is_scattered():
    rec = Recorder()
    pipeline = LoadPipeline(FakeEngine(), rec.retrieve, rec.scatter)
    try:
        second_group = GROUP_CHUNKS * CHUNK
        # The first group's scatter may only finish once the second group has been fetched: a
        # pipeline that fetched only after scattering would wait here forever (10 s, then fail).
        rec.fetch_hooks[second_group] = rec.hold_scatter[0] = threading.Event()
        (outcome,) = pipeline.run([spec("r", 2 * GROUP_CHUNKS)])
    finally:
        pipeline.close()
    assert outcome.complete and outcome.loaded_to == 2 * GROUP_CHUNKS * CHUNK
    assert rec.log.index(("fetch", second_group)) < rec.log.index(("scatter", 0))
    assert rec.allocator.live == 0  # every fetched chunk dropped after its scatter


def test_one_stream_for_the_loads_of_a_step_and_a_gap_ends_only_its_request():
    rec = Recorder()
    pipeline = LoadPipeline(FakeEngine(), rec.retrieve, rec.scatter)
    a, b = spec("a", 3), spec("b", 3, start_hash=100)
    rec.missing = {CHUNK}  # chunk 1 of both requests is gone
    try:
        outcomes = {o.spec.req_id: o for o in pipeline.run([a, b])}
    finally:
        pipeline.close()
    # Six chunks of two requests: two fetches of up to four chunks, not one per request.
    assert [e for e in rec.log if e[0] == "fetch"] == [("fetch", 0), ("fetch", CHUNK)]
    assert outcomes["a"].loaded_to == CHUNK and outcomes["b"].loaded_to == CHUNK
    assert rec.scattered == {"a": [0], "b": [0]}  # nothing after the gap
    assert rec.allocator.live == 0


def test_background_loads_end_once_each_and_a_cancelled_one_stops_writing():
    rec = Recorder()
    pipeline = LoadPipeline(FakeEngine(), rec.retrieve, rec.scatter)
    finished = []
    background = BackgroundLoads(pipeline, lambda outcomes, times: finished.extend(outcomes))
    gate = threading.Event()
    rec.hold_scatter[0] = gate  # the first chunk's scatter waits: the load is in flight
    try:
        background.submit([spec("keep", 2), spec("drop", 2 * GROUP_CHUNKS, start_hash=50)])
        assert background.pending == 2
        background.cancel({"drop"})
        gate.set()
        ended = []
        for _ in range(20):
            ended += background.take_finished(wait=1)
            if len(ended) >= 2:
                break
    finally:
        background.close()
        pipeline.close()
    by_id = {o.spec.req_id: o for o in ended}
    assert sorted(by_id) == ["drop", "keep"] and len(ended) == 2 and len(finished) == 2
    assert by_id["keep"].complete and not by_id["keep"].cancelled
    assert by_id["drop"].cancelled and not by_id["drop"].complete
    assert rec.scattered.get("drop", []) == []  # cancelled before its first chunk was written
    assert rec.allocator.live == 0 and background.pending == 0


def test_a_failing_fetch_still_ends_the_load():
    def broken(refs):
        raise RuntimeError("the store vanished")

    pipeline = LoadPipeline(FakeEngine(), broken, lambda *a: 0)
    background = BackgroundLoads(pipeline, lambda outcomes, times: None)
    try:
        background.submit([spec("r", 2)])
        (outcome,) = background.take_finished(wait=10)
    finally:
        background.close()
        pipeline.close()
    assert not outcome.complete and not outcome.cancelled and outcome.loaded_to == 0


def test_a_chunk_whose_lease_ran_out_during_the_scatter_is_a_load_error():
    import time

    rec = Recorder()
    released = []
    real_retrieve = rec.retrieve

    def leased(items):
        objs = real_retrieve(items)
        for ref, obj in zip([item.ref for item in items], objs, strict=True):
            # Chunk 1's lease ends before its scatter is over (as after a stall of lease_secs).
            until = time.monotonic() - 1 if ref.start == CHUNK else time.monotonic() + 60
            obj.lend(lambda start=ref.start: released.append(start), until)
        return objs

    pipeline = LoadPipeline(FakeEngine(), leased, rec.scatter)
    try:
        (outcome,) = pipeline.run([spec("r", 3)])
    finally:
        pipeline.close()
    # Chunk 0 counts; chunk 1 was written but may hold another value's bytes: recomputed from it on.
    assert outcome.loaded_to == CHUNK and not outcome.complete
    assert sorted(released) == [0, CHUNK, 2 * CHUNK]  # every lease given back


def test_scatters_use_every_copier_thread_only_when_nothing_else_runs():
    """Before the forward with every fetch done, a scatter may use all of torch's threads; beside
    a fetch still receiving, or in a background load (vLLM's forward runs), it copies on one."""
    from vllm_kvcache_plugin.kernels.copier import host_threads

    rec = Recorder()
    seen: dict[int, int] = {}
    last_group = 2 * GROUP_CHUNKS * CHUNK
    arrive = threading.Event()  # the last group arrives only after the first group's scatter

    def retrieve(items):
        if items[0].ref.start == last_group:
            assert arrive.wait(10)
        return rec.retrieve(items)

    def scatter(load_spec, item, obj):
        seen[item.ref.start] = host_threads()
        if item.ref.start == GROUP_CHUNKS * CHUNK - CHUNK:  # the first group's last chunk
            arrive.set()
        return rec.scatter(load_spec, item, obj)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipeline = LoadPipeline(FakeEngine(), retrieve, scatter)
        try:
            (outcome,) = pipeline.run([spec("r", 3 * GROUP_CHUNKS)], exclusive=True)
            assert outcome.complete
            assert seen[0] == 1  # the last group was still arriving
            assert seen[last_group] == 2  # nothing in flight any more: every thread
            arrive.set()
            seen.clear()
            (outcome,) = pipeline.run([spec("s", 3 * GROUP_CHUNKS)])  # beside a forward
            assert outcome.complete and set(seen.values()) == {1}
        finally:
            pipeline.close()
    finally:
        torch.set_num_threads(threads)
    assert host_threads() == torch.get_num_threads()  # the cap ends with the scatter


def test_only_an_exclusive_loads_fetches_may_wait_at_idle_priority():
    """A load before the forward fetches with ``threads.idle_waits`` on (its store calls may wait
    on idle-priority threads); a background load, beside vLLM's forward, with it off."""
    from vllm_kvcache_plugin.threads import idle_waits_allowed

    rec = Recorder()
    seen: list[bool] = []

    def retrieve(items):
        seen.append(idle_waits_allowed())
        return rec.retrieve(items)

    pipeline = LoadPipeline(FakeEngine(), retrieve, rec.scatter)
    try:
        (outcome,) = pipeline.run([spec("r", 2 * GROUP_CHUNKS)], exclusive=True)
        assert outcome.complete and seen == [True, True]
        seen.clear()
        (outcome,) = pipeline.run([spec("s", 2 * GROUP_CHUNKS)])
        assert outcome.complete and seen == [False, False]
    finally:
        pipeline.close()
    assert not idle_waits_allowed()
