"""Asynchronous loads and lookups in the real engine (float32, real redis behind a loopback proxy).

vLLM's own prefix caching is off, so a repeated prompt can only be a hit from the store. The hot
cache is off (every hit needs I/O), and a long generation decodes beside the hits: that is when a
load runs in the background (with nothing else running it runs before the step's forward).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from testbed import prompts
from testbed.events import events, hits_for, requests
from testbed.processes import descendants
from testbed.redis_servers import start_redis
from testbed.vllm_process import VLLMServer, clean_env
from tests.e2e_scenario import greedy_margins
from tests.fixtures.vllm_server import FLOAT32_NEAR_TIE
from tests.proxy import DelayProxy
from vllm_kvcache_plugin.threads import format_cpu_list, parse_cpu_list

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHUNK = 256


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("async-redis")
    redis = start_redis("redis-async", str(workdir))
    proxy = DelayProxy(redis.node.port).start()
    yield redis, proxy
    proxy.release()
    proxy.stop()
    redis.stop()


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    _, proxy = store
    # vLLM's own default thread binding (the testbed's is nobind): the loads run as deployed.
    env = clean_env(LMCACHE_REMOTE_URL=f"redis://127.0.0.1:{proxy.port}", LMCACHE_LOCAL_CPU="False",
                    LMCACHE_BLOCKING_TIMEOUT_SECS="10", VLLM_CPU_OMP_THREADS_BIND="auto")
    vllm = VLLMServer(env, dtype="float32", name="vllm-async", log_dir=str(tmp_path_factory.mktemp("async-vllm")),
                      extra_args=("--no-enable-prefix-caching",))
    with vllm:
        yield vllm


def wait_stored(redis, keys_at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while redis.node.call(lambda c: c.dbsize()) < keys_at_least:
        assert time.monotonic() < deadline, "the saves did not reach redis"
        time.sleep(0.2)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


@contextmanager
def decoding_beside(server: VLLMServer) -> Iterator[None]:
    """A long greedy generation streams while the block runs (the "other requests" of a step)."""
    tokens, stop = [], threading.Event()

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        body = {"model": server.model, "prompt": prompts.text(20, offset=90), "max_tokens": 3000, "temperature": 0,
                "stream": True, "ignore_eos": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        while not stop.is_set() and resp.readline():
            tokens.append(1)
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: len(tokens) > 5, 60, "the decode beside to start")
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


def computed(server: VLLMServer, prompt: str, **kwargs) -> dict:
    """A completion whose text later runs must reproduce: no greedy step is a near-tie (float32
    noise between a miss and a hit, ~1e-5 nats, cannot flip one on any CPU)."""
    result = server.complete(prompt, 8, logprobs=2, **kwargs)
    assert min(greedy_margins(result)) > FLOAT32_NEAR_TIE, "the prompt has a greedy near-tie; pick another"
    return result


def hit_eventually(server: VLLMServer, prompt: str, timeout: float = 120) -> dict:
    """The prompt sent until the connector loads it (once the store is back, and it was saved)."""
    def hit_once():
        result = server.complete(prompt, 8)
        return result if hits_for(server.log(), result["id"]) else None

    return wait_for(hit_once, timeout, "hits to resume")


def test_a_hit_beside_a_running_request_loads_asynchronously_with_the_same_text(server: VLLMServer, store):
    redis, _ = store
    prompt = prompts.text(700, offset=31_000)
    cold = computed(server, prompt)
    wait_stored(redis, cold["usage"]["prompt_tokens"] // CHUNK)
    with decoding_beside(server):
        hit = server.complete(prompt, 8)
    assert hit["choices"][0]["text"] == cold["choices"][0]["text"]
    (event,) = [e for e in requests(server.log(), hit["id"]) if e["loaded_tokens"]]
    assert event["asynchronous"] and event["loaded_tokens"] == hit["usage"]["prompt_tokens"] - 1
    done = [e for e in events(server.log(), "loads_done") if event["request_id"] in e["requests"]]
    assert len(done) == 1 and done[0]["asynchronous"] and done[0]["tokens"] == event["loaded_tokens"]


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # the process ended
        return b""


def _cpus_allowed(pid: int, tid: int | str) -> frozenset[int]:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return parse_cpu_list(next(line.split()[1] for line in status.splitlines()
                               if line.startswith("Cpus_allowed_list")))


def _threads(pid: int) -> dict[str, list[frozenset[int]]]:
    """Kernel thread name -> the CPUs each thread of that name may run on."""
    found: dict[str, list[frozenset[int]]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            found.setdefault(name, []).append(_cpus_allowed(pid, tid))
        except OSError:  # the thread ended
            continue
    return found


def test_connector_threads_use_every_core_vllm_bound_not_the_model_runners_one(server: VLLMServer):
    """vLLM (auto binding) pins the model runner to the first core of its OpenMP team; the threads
    the connector starts would inherit that one core. They run on all of the team's cores instead
    (those that run an OpenMP region themselves, a scatter, are placed by OpenMP like vLLM's team)."""
    workers = {pid: gomp for pid in descendants(server.process.pid)
               for gomp in _environ(pid).split(b"\0") if gomp.startswith(b"GOMP_CPU_AFFINITY=")}
    assert len(workers) == 1, "vLLM's auto binding set GOMP_CPU_AFFINITY for its one worker"
    ((pid, gomp),) = workers.items()
    team = parse_cpu_list(gomp.split(b"=", 1)[1].decode())
    if len(team) < 2:
        pytest.skip(f"vLLM bound its team to one CPU ({sorted(team)}): no other core to use")
    main = _cpus_allowed(pid, pid)
    assert len(main) == 1 and main <= team, "vLLM pins its model runner to one core of the team"
    threads = _threads(pid)
    for name in ("kvcache-io", "kvcache-writer", "kvcache-lookup"):
        assert name in threads, (name, sorted(threads))
        assert all(cpus == team for cpus in threads[name]), (name, threads[name], team)
    assert (f"connector threads run on CPUs {format_cpu_list(team)} (this worker's OpenMP binding, "
            "GOMP_CPU_AFFINITY)") in server.log()


def test_a_client_that_leaves_mid_load_releases_its_blocks(server: VLLMServer, store):
    redis, proxy = store
    prompt = prompts.text(900, offset=36_000)
    before = redis.node.call(lambda c: c.dbsize())
    cold = computed(server, prompt)
    wait_stored(redis, before + cold["usage"]["prompt_tokens"] // CHUNK)
    # The store freezes in the middle of the first value, so the load is in flight when the client
    # goes away (vLLM aborts the request).
    with decoding_beside(server):
        proxy.stall_replies_after(64 * 1024)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        body = {"model": server.model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        assert proxy.stalled.wait(60), "the load never reached the store"
        conn.close()
        cancelled = wait_for(lambda: [e for e in events(server.log(), "loads_done") if e["cancelled"]], 90,
                             "the aborted request's load to end")
    proxy.release()
    assert len(cancelled) == 1 and cancelled[0]["asynchronous"]
    # vLLM freed the request's blocks (it holds them until the worker reports the load over), and
    # the engine serves the same prompt again with the cold run's text: at once (a miss while the
    # connector still counts the frozen store as down), then as a hit.
    wait_for(lambda: server.metric_value("vllm:kv_cache_usage_perc") == 0, 30, "the blocks to be freed")
    assert server.complete(prompt, 8, timeout=60)["choices"][0]["text"] == cold["choices"][0]["text"]
    assert hit_eventually(server, prompt)["choices"][0]["text"] == cold["choices"][0]["text"]


def test_a_frozen_store_makes_a_new_prompt_a_miss_not_a_hang(server: VLLMServer, store):
    redis, _ = store
    prompt = prompts.text(500, offset=41_000)
    redis.node.pause()  # accepts connections, answers nothing
    try:
        started = time.monotonic()
        frozen = computed(server, prompt, timeout=120)
        assert time.monotonic() - started < 90
    finally:
        redis.node.resume()
    assert not hits_for(server.log(), frozen["id"])
    # Once the store answers again, the prompt is saved and then hits, with the same text.
    assert hit_eventually(server, prompt)["choices"][0]["text"] == frozen["choices"][0]["text"]
