"""Where the connector's threads run (threads.py, integration/vllm/cpus.py): CPU lists, vLLM's
OpenMP binding read from the variables vLLM sets, and real threads moved with sched_setaffinity."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from vllm_kvcache_plugin import threads
from vllm_kvcache_plugin.config import load_config
from vllm_kvcache_plugin.integration.vllm.cpus import connector_thread_cpus, place_connector_threads

CPUS = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="moving a thread between CPUs needs two CPUs")


@pytest.fixture(autouse=True)
def _reset_background_cpus():
    yield
    threads.set_background_cpus(None)


@pytest.mark.parametrize("text,cpus", [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0 1", {0, 1}), ("0,2 5-6", {0, 2, 5, 6}),
                                       ("0-6:3", {0, 3, 6}), (" 7 ", {7})])
def test_cpu_lists_in_taskset_and_gomp_syntax(text, cpus):
    assert threads.parse_cpu_list(text) == cpus
    assert threads.parse_cpu_list(threads.format_cpu_list(cpus)) == cpus


def test_format_joins_runs():
    assert threads.format_cpu_list({5, 0, 1, 2, 9, 10}) == "0-2,5,9-10"


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "0-4:0", "1;2", "0-40000000"])
def test_bad_cpu_lists(text):
    with pytest.raises(ValueError):
        threads.parse_cpu_list(text)


@pytest.mark.parametrize("env,found", [
    # What vllm/utils/ompmultiprocessing.py writes for a worker, per OpenMP runtime.
    ({"GOMP_CPU_AFFINITY": "0 1 2 3"}, ({0, 1, 2, 3}, "GOMP_CPU_AFFINITY")),
    ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[4,5,6]", "KMP_BLOCKTIME": "5"},
     ({4, 5, 6}, "KMP_AFFINITY")),
    ({"OMP_PLACES": "{8,9}", "OMP_PROC_BIND": "true"}, ({8, 9}, "OMP_PLACES")),
    ({"OMP_NUM_THREADS": "2"}, None),  # VLLM_CPU_OMP_THREADS_BIND=nobind: nothing bound
    ({"OMP_PLACES": "cores"}, None),  # an abstract place name says no CPU numbers
    ({"GOMP_CPU_AFFINITY": "zero"}, None),  # not understood: keep the inherited CPUs
])
def test_openmp_binding_from_the_variables_vllm_sets(env, found):
    assert threads.openmp_bound_cpus(env) == found


def test_connector_cpus_follow_the_setting_then_vllms_binding():
    gomp = {"GOMP_CPU_AFFINITY": "0 1"}
    assert connector_thread_cpus(load_config(env={}), gomp) == ({0, 1}, "this worker's OpenMP binding, "
                                                                        "GOMP_CPU_AFFINITY")
    assert connector_thread_cpus(load_config(env={}), {})[0] is None
    inherit = load_config(env={"LMCACHE_THREAD_CPUS": "inherit"})
    assert connector_thread_cpus(inherit, gomp) == (None, "thread_cpus: inherit")
    explicit = load_config(env={"LMCACHE_THREAD_CPUS": "1"})
    assert connector_thread_cpus(explicit, gomp) == ({1}, "thread_cpus from env LMCACHE_THREAD_CPUS")


def _where(start) -> tuple[set[int], str]:
    """Start a thread with ``start`` and return the CPUs it may run on and its kernel name."""
    seen = {}

    def probe():
        seen["cpus"] = os.sched_getaffinity(0)
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as comm:
            seen["name"] = comm.read().strip()

    start(probe)
    return seen["cpus"], seen["name"]


def _on_thread(probe):
    threads.start_thread(probe, "kvcache-loader").join()


def _on_pool(probe):
    pool = threads.thread_pool(1, "kvcache-fetch")
    try:
        pool.submit(probe).result()
    finally:
        pool.shutdown()


@needs_two_cpus
@pytest.mark.parametrize("start,name", [(_on_thread, "kvcache-loader"), (_on_pool, "kvcache-fetch_0")])
def test_threads_leave_the_starters_single_core_for_the_background_cpus(start, name):
    """The starter is pinned to one core (as vLLM pins its model runner); the thread it starts
    runs on the CPUs set, and the kernel knows it by its name."""
    result = {}

    def starter():
        os.sched_setaffinity(0, {CPUS[0]})
        result["moved"] = _where(start)

    t = threading.Thread(target=starter)
    threads.set_background_cpus(CPUS[:2])
    t.start()
    t.join()
    assert result["moved"] == (set(CPUS[:2]), name)
    threads.set_background_cpus(None)
    t = threading.Thread(target=starter)
    t.start()
    t.join()
    assert result["moved"][0] == {CPUS[0]}, "with nothing set a thread keeps its starter's CPUs"


@needs_two_cpus
def test_place_connector_threads_logs_its_choice(caplog):
    config = load_config(env={})
    with caplog.at_level("INFO", logger="vllm_kvcache_plugin"):
        cpus = place_connector_threads(config, {"GOMP_CPU_AFFINITY": " ".join(map(str, CPUS[:2]))})
    assert cpus == set(CPUS[:2]) and threads.background_cpus() == cpus
    assert f"connector threads run on CPUs {threads.format_cpu_list(CPUS[:2])} (this worker's OpenMP binding, " \
           "GOMP_CPU_AFFINITY)" in caplog.text


@pytest.mark.parametrize("error", [OSError(22, "Invalid argument"), OverflowError("cpu number too large")])
def test_a_cpuset_without_those_cpus_warns_and_keeps_the_thread_where_it_is(caplog, monkeypatch, error):
    def refuse(pid, cpus):
        raise error

    monkeypatch.setattr(os, "sched_setaffinity", refuse)  # a cpuset narrower than the setting: not made here
    monkeypatch.setattr(threads, "_warned", False)
    threads.set_background_cpus({0})
    with caplog.at_level("WARNING", logger="vllm_kvcache_plugin"):
        cpus, _ = _where(lambda p: threads.start_thread(p, "kvcache-writer").join())
    assert cpus == set(CPUS)
    assert "cannot move the connector's threads to CPUs 0" in caplog.text


def test_the_io_loops_own_pool_runs_on_the_background_cpus():
    """asyncio.to_thread / run_in_executor(None) on the I/O loop: threads started here too."""
    import asyncio

    from vllm_kvcache_plugin.storage.loop import EventLoopThread

    threads.set_background_cpus(CPUS[:1])
    loop = EventLoopThread("kvcache-io")
    try:
        async def where():
            return await asyncio.to_thread(_where, lambda p: p())

        cpus, name = loop.run(where(), timeout=30)
    finally:
        loop.stop()
    assert cpus == set(CPUS[:1]) and name == "kvcache-io-pool"


needs_sched_idle = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")


@needs_sched_idle
def test_an_idle_pool_runs_its_threads_at_idle_priority_and_others_keep_theirs():
    idle = threads.thread_pool(1, "test-idle", idle=True)
    plain = threads.thread_pool(1, "test-plain")
    try:
        assert idle.submit(os.sched_getscheduler, 0).result(10) == os.SCHED_IDLE
        assert plain.submit(os.sched_getscheduler, 0).result(10) == os.SCHED_OTHER
        name = idle.submit(lambda: Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text()).result(10)
        assert name.strip().startswith("test-idle")  # started like every other thread (named, placed)
    finally:
        idle.shutdown()
        plain.shutdown()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own thread is untouched


def test_idle_waits_are_off_unless_asked_and_reach_the_io_loop():
    """``idle_waits`` holds for the calling thread's context only, and it reaches the coroutine the
    storage layer's loop runs for that caller (the Mooncake connector reads it there)."""
    from vllm_kvcache_plugin.storage.loop import EventLoopThread

    async def allowed() -> bool:
        return threads.idle_waits_allowed()

    loop = EventLoopThread("test-io")
    try:
        assert loop.run(allowed(), 10) is False
        with threads.idle_waits():
            assert threads.idle_waits_allowed()
            assert loop.run(allowed(), 10) is True
            with threads.idle_waits(False):
                assert loop.run(allowed(), 10) is False
            other = threading.Thread(target=lambda: seen.append(threads.idle_waits_allowed()))
            seen: list[bool] = []
            other.start()
            other.join()
            assert seen == [False]  # another thread's context is its own
        assert loop.run(allowed(), 10) is False
    finally:
        loop.stop()
