"""Loads: fetch stored chunks and scatter them into vLLM's paged cache, inline or in the background.

:class:`LoadPipeline` runs the loads of one step as one stream: their chunks are fetched in groups
of ``GROUP_CHUNKS`` on fetch threads, the next ``FETCH_DEPTH`` groups arriving (network, decode,
checksum) while one is scattered, so the scatter hides behind the I/O instead of following it.

:class:`BackgroundLoads` runs a step's asynchronous loads on a loader thread while vLLM keeps
computing other requests. A request's load ends exactly once (loaded, failed, or cancelled), and
only after its last write into vLLM's blocks: then it is reported to vLLM (``take_finished``), with
the blocks that could not be loaded, and vLLM may schedule the request or free its blocks.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from ...engine import KVCacheEngine
from ...kernels import copy_threads
from ...memory import MemoryObj
from ...threads import idle_waits, start_thread, thread_pool
from .metadata import ChunkRef, LoadSpec

logger = logging.getLogger(__name__)

GROUP_CHUNKS = 4  # chunks per fetch: small enough to overlap with scatter, big enough to batch
# Fetches in flight while a group is scattered: with 2, one connection's reads overlap the other's
# server-side copy (measured for issue 14: a lone 4k-token redis load ~110 -> ~85 ms; 3 gained no more).
FETCH_DEPTH = 2
IDLE_WAIT_SECS = 0.01  # longest wait for a background load in a step that computes nothing


@dataclass(frozen=True)
class LoadItem:
    """One stored value a load writes: a chunk, or one part of it (layout.py)."""

    ref: ChunkRef
    part: str = ""
    #: A last-chunk part (a sliding window's tail): the load is complete only with it, but it moves
    #: no token boundary (every token it holds is also in the chunks' other parts).
    tail: bool = False


def plain_items(spec: LoadSpec) -> list[LoadItem]:
    return [LoadItem(ref) for ref in spec.chunks]


@dataclass
class LoadOutcome:
    """What one request's load delivered."""

    spec: LoadSpec
    loaded_to: int  # tokens [spec.start, loaded_to) are in vLLM's cache
    nbytes: int = 0
    cancelled: bool = False
    tail_missing: bool = False  # a last-chunk part could not be loaded

    @property
    def complete(self) -> bool:
        return self.loaded_to >= self.spec.end and not self.tail_missing


@dataclass
class StageTimes:
    """Where a batch of loads spent its time (seconds), for logs, events and the TTFT benchmark."""

    queued: float = 0.0  # planned until the loader started it
    fetch_wait: float = 0.0  # waiting for chunks the scatter was ready for (I/O not hidden)
    scatter: float = 0.0  # copying chunks into vLLM's blocks
    total: float = 0.0

    def as_ms(self) -> dict[str, float]:
        return {f"{name}_ms": round(1e3 * getattr(self, name), 3) for name in ("queued", "fetch_wait", "scatter",
                                                                               "total")}


ScatterFn = Callable[[LoadSpec, LoadItem, MemoryObj], "int | None"]  # -> bytes copied; None: could not


class LoadPipeline:
    """Fetch in groups on fetch threads; scatter each group while the next ones arrive."""

    def __init__(self, engine: KVCacheEngine, retrieve: Callable[[Sequence[LoadItem]], list[MemoryObj | None]],
                 scatter: ScatterFn, items: Callable[[LoadSpec], list[LoadItem]] = plain_items) -> None:
        self.engine = engine
        self._retrieve = retrieve
        self._scatter = scatter
        self._items = items
        self._fetcher = thread_pool(FETCH_DEPTH, "kvcache-fetch")

    def run(self, specs: Sequence[LoadSpec], cancelled: Callable[[str], bool] = lambda _: False,
            times: StageTimes | None = None, exclusive: bool = False) -> list[LoadOutcome]:
        """Load ``specs``; ``exclusive``: nothing else computes meanwhile (a load before the forward),
        so a scatter may use every copier thread once no fetch is still receiving. Otherwise (a
        background load beside vLLM's forward, or bytes still arriving) it copies on one thread:
        the cores are taken, and a copy team sharing them stalls (``kernels.copy_threads``)."""
        started = time.perf_counter()
        times = times if times is not None else StageTimes()
        outcomes = {spec.req_id: LoadOutcome(spec, spec.start) for spec in specs}
        items = [(spec, item) for spec in specs for item in self._items(spec)]
        groups = [items[i:i + GROUP_CHUNKS] for i in range(0, len(items), GROUP_CHUNKS)]
        broken: set[str] = set()  # requests whose chain of loaded chunks has ended

        def note_cancel(req_id: str) -> None:
            if req_id not in broken and cancelled(req_id):  # aborted: its load ends here
                outcomes[req_id].cancelled = True
                broken.add(req_id)

        def live(group: list[tuple[LoadSpec, LoadItem]]) -> list[tuple[LoadSpec, LoadItem]]:
            for spec, _ in group:
                note_cancel(spec.req_id)
            return [(spec, item) for spec, item in group if spec.req_id not in broken]

        # Up to FETCH_DEPTH groups are in flight while one is scattered (none for requests already over).
        pending = collections.deque(self._fetch(live(g), exclusive) for g in groups[:FETCH_DEPTH])
        for k in range(len(groups)):
            group, future = pending.popleft()
            wait_start = time.perf_counter()
            objs = future.result()
            times.fetch_wait += time.perf_counter() - wait_start
            if k + FETCH_DEPTH < len(groups):
                pending.append(self._fetch(live(groups[k + FETCH_DEPTH]), exclusive))
            scatter_start = time.perf_counter()
            try:
                for (spec, item), obj in zip(group, objs, strict=True):
                    # Asked per chunk: a quick fetch (shared memory) is over after the first one.
                    alone = exclusive and all(f.done() for _, f in pending)
                    note_cancel(spec.req_id)  # aborted while its chunks arrived
                    if spec.req_id in broken:
                        continue
                    if obj is None or not self._scatter_one(spec, item, obj, outcomes, alone):
                        broken.add(spec.req_id)
                        outcomes[spec.req_id].tail_missing = item.tail
            finally:
                for obj in objs:
                    if obj is not None:
                        obj.ref_down()
                times.scatter += time.perf_counter() - scatter_start
        times.total += time.perf_counter() - started
        return list(outcomes.values())

    def _scatter_one(self, spec: LoadSpec, item: LoadItem, obj: MemoryObj, outcomes: dict[str, LoadOutcome],
                     alone: bool = False) -> bool:
        key = self.engine.key(item.ref, item.part)
        try:
            with copy_threads(None if alone else 1):
                nbytes = self._scatter(spec, item, obj)
        except Exception:
            logger.exception("Scatter of chunk %s failed; recomputing", key)
            return False
        if nbytes is None:
            return False
        if not obj.lease_held():
            # Read from shared memory whose lease ran out during the scatter: its region may have
            # held another value by then, so these blocks are recomputed.
            logger.warning("Chunk %s: its shared-memory lease ran out during the scatter; recomputing", key)
            return False
        outcome = outcomes[spec.req_id]
        outcome.nbytes += nbytes
        if not item.tail:
            outcome.loaded_to = min(item.ref.end, spec.end)
        return True

    def _fetch(self, group: list[tuple[LoadSpec, LoadItem]],
               exclusive: bool) -> tuple[list[tuple[LoadSpec, LoadItem]], Future]:
        if not group:
            done: Future = Future()
            done.set_result([])
            return group, done
        return group, self._fetcher.submit(self._retrieve_now, [item for _, item in group], exclusive)

    def _retrieve_now(self, items: list[LoadItem], exclusive: bool) -> list[MemoryObj | None]:
        """An exclusive load's store calls may wait at idle priority (``threads.idle_waits``)."""
        with idle_waits(exclusive):
            return self._retrieve(items)

    def close(self) -> None:
        self._fetcher.shutdown(wait=True)


@dataclass
class _Batch:
    specs: list[LoadSpec]
    planned: float = field(default_factory=time.perf_counter)


class BackgroundLoads:
    """Asynchronous loads on one loader thread; ``done(outcomes, times)`` runs there per batch."""

    def __init__(self, pipeline: LoadPipeline, done: Callable[[list[LoadOutcome], StageTimes], None]) -> None:
        self.pipeline = pipeline
        self._done = done
        self._cond = threading.Condition()
        self._batches: list[_Batch] = []
        self._in_flight: set[str] = set()
        self._cancelled: set[str] = set()
        self._finished: list[LoadOutcome] = []
        self._closed = False
        self._thread = start_thread(self._run, "kvcache-loader")

    def submit(self, specs: Sequence[LoadSpec]) -> None:
        if not specs:
            return
        with self._cond:
            self._batches.append(_Batch(list(specs)))
            self._in_flight.update(spec.req_id for spec in specs)
            self._cond.notify_all()

    def cancel(self, req_ids: set[str]) -> None:
        """Stop these requests' loads before their next chunk (they still end, as cancelled)."""
        with self._cond:
            self._cancelled.update(req_ids & self._in_flight)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._in_flight)

    def take_finished(self, wait: float = 0.0) -> list[LoadOutcome]:
        """Loads that ended since the last call; with ``wait``, first wait up to that long for one
        while any is in flight."""
        with self._cond:
            if wait > 0 and not self._finished and self._in_flight:
                self._cond.wait_for(lambda: self._finished or not self._in_flight, wait)
            finished, self._finished = self._finished, []
            return finished

    def _is_cancelled(self, req_id: str) -> bool:
        with self._cond:
            return req_id in self._cancelled or self._closed

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._batches or self._closed)
                if not self._batches:
                    return
                batch = self._batches.pop(0)
            times = StageTimes(queued=time.perf_counter() - batch.planned)
            try:
                outcomes = self.pipeline.run(batch.specs, self._is_cancelled, times)
            except Exception:  # never lose a load: vLLM would hold its blocks forever
                logger.exception("Background load of %d requests failed; recomputing them", len(batch.specs))
                outcomes = [LoadOutcome(spec, spec.start) for spec in batch.specs]
            try:
                self._done(outcomes, times)
            except Exception:
                logger.exception("Recording finished loads failed")
            with self._cond:
                for outcome in outcomes:
                    self._in_flight.discard(outcome.spec.req_id)
                    self._cancelled.discard(outcome.spec.req_id)
                self._finished.extend(outcomes)
                self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True  # loads in flight stop before their next chunk
            self._cond.notify_all()
        self._thread.join(timeout)
