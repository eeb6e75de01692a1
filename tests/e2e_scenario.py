"""The end-to-end scenario every store goes through on the real vLLM CPU engine (float32).

A test module defines a module-scoped ``backend`` fixture (a :class:`Backend`) and imports the
tests below with ``from tests.e2e_scenario import *``. The scenario starts vLLM with the connector
("cold"), sends prompts, stops it, starts a fresh vLLM ("warm", a restart: vLLM's own prefix cache
is empty; on a remote store it starts beside the cold one and is asked nothing before the cold one
has stopped) and checks that the prompts are loaded from the store and give the reference output, the
output of a vLLM without the connector and without prefix caching.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import xxhash

from testbed import prompts
from testbed.events import chunk_checksums, hits_for, local_hits_for
from testbed.vllm_process import VLLMServer, clean_env
from vllm_kvcache_plugin.serde.header import parse_header

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 16
LONG = prompts.text(560, offset=0)  # ~700 tokens: two full 256-token chunks and a partial one
SHARED_WORDS = 400  # SHARES_PREFIX repeats LONG's first words (one whole chunk and more)
SHARES_PREFIX = prompts.text(SHARED_WORDS, offset=0) + " " + prompts.text(100, offset=9000)
FAMILY = prompts.shared_prefix_family(16, prefix_words=220, tail_words=30, offset=2000)
UNSEEN = prompts.text(300, offset=12000)
LATE = prompts.text(350, offset=15000)  # stored by the cold run, first asked for after the store broke
ALL_PROMPTS = [LONG, SHARES_PREFIX, UNSEEN, LATE, *FAMILY]

KEY_RE = r"vllm@{model}@1@0@[0-9a-f]{{64}}"


@dataclass
class Backend:
    """A store under test: the settings for vLLM, and ways to look into (and break) the store."""

    name: str
    env: dict[str, str]
    list_keys: Callable[[], list[str]] | None  # None: the store cannot list keys (disk: hashed names)
    read_value: Callable[[str], bytes | None]
    break_store: Callable[[], None]
    extra: dict = field(default_factory=dict)
    #: An instance finds what another one stored after it started (a remote store): the restarted
    #: instance may then start beside the cold one. Not the disk tier, which reads its folder's
    #: index at start-up.
    sees_later_writes: bool = True


def start_vllm(backend: Backend, tmp_path_factory, name: str) -> VLLMServer:
    return vllm_for(backend, tmp_path_factory, name).start()


def vllm_for(backend: Backend, tmp_path_factory, name: str) -> VLLMServer:
    env = clean_env(LMCACHE_LOG_LEVEL="DEBUG", **backend.env)
    log_dir = str(tmp_path_factory.mktemp(f"{backend.name}-{name}"))
    return VLLMServer(env, dtype="float32", name=f"vllm-{name}", log_dir=log_dir)


def greedy_margins(result: dict) -> list[float]:
    """Per generated token, its logprob minus the runner-up's (needs ``logprobs`` >= 2): how far
    the greedy choice is from a tie, i.e. how much noise a text comparison of it can stand."""
    margins = []
    for top in result["choices"][0]["logprobs"]["top_logprobs"]:
        best = sorted(top.values(), reverse=True)
        margins.append(best[0] - best[1] if len(best) > 1 else float("inf"))
    return margins


@dataclass
class ColdRun:
    texts: dict[str, str]
    log: str
    model: str
    restarted: VLLMServer | None = None  # the "warm" instance, started beside the cold one


@pytest.fixture(scope="module")
def cold(backend: Backend, request, tmp_path_factory):
    server = vllm_for(backend, tmp_path_factory, "cold").launch()
    # The restarted instance starts meanwhile where the store allows it (a start is ~45 s, most of it
    # importing on one core): it is asked nothing before the cold one has stopped and flushed, so
    # it still begins with an empty prefix cache and finds exactly what the cold run stored.
    restarted = vllm_for(backend, tmp_path_factory, "warm").launch() if backend.sees_later_writes else None
    try:
        try:
            # The session's reference outputs (computed by the first module that gets here) while
            # this engine starts: the two need nothing from each other.
            request.getfixturevalue("reference")
            server.wait_healthy()
            texts = {LONG: server.text(LONG, MAX_TOKENS), LATE: server.text(LATE, MAX_TOKENS)}
            with ThreadPoolExecutor(16) as pool:
                texts.update(zip(FAMILY, pool.map(lambda p: server.text(p, MAX_TOKENS), FAMILY), strict=True))
        finally:
            server.stop()  # a clean stop flushes pending writes
        yield ColdRun(texts, server.log(), server.model, restarted)
    finally:
        if restarted is not None:
            restarted.stop()


@pytest.fixture(scope="module")
def warm(backend: Backend, cold: ColdRun, tmp_path_factory):
    if cold.restarted is not None:
        server = cold.restarted.wait_healthy()
    else:
        server = start_vllm(backend, tmp_path_factory, "warm")
    yield server
    server.stop()


def test_cold_run_matches_reference(cold: ColdRun, reference):
    for prompt, text in cold.texts.items():
        assert text == reference[prompt]


def test_cold_run_stored_chunks_under_seed_keys(cold: ColdRun, backend: Backend):
    pattern = re.compile(KEY_RE.format(model=re.escape(cold.model)))
    saved = set(chunk_checksums(cold.log, "saved"))
    assert saved, "the cold run saved nothing"
    assert all(pattern.fullmatch(k) for k in saved), sorted(saved)[:3]
    for key in saved:
        assert backend.read_value(key) is not None, f"saved chunk {key} is not in the store"
    if backend.list_keys is not None:
        keys = backend.list_keys()
        assert all(pattern.fullmatch(k) for k in keys), keys[:3]
        assert saved <= set(keys)


def test_prompt_sharing_a_prefix_loads_only_that_prefix(warm: VLLMServer, reference, backend: Backend):
    # First request of the restarted instance: vLLM's own prefix cache is empty, so any hit is ours.
    result = warm.complete(SHARES_PREFIX, MAX_TOKENS)
    assert result["choices"][0]["text"] == reference[SHARES_PREFIX]
    shared_tokens = len(warm.tokenize(prompts.text(SHARED_WORDS, offset=0)))
    chunk = int(backend.extra.get("chunk_size", 256))
    (loaded,) = hits_for(warm.log(), result["id"])
    # Whole chunks of the shared prefix only (the boundary token may tokenize differently).
    assert loaded % chunk == 0 and 0 < loaded <= shared_tokens
    assert loaded >= (shared_tokens - 1) // chunk * chunk - chunk


def test_restart_loads_prompt_and_gives_reference_output(warm: VLLMServer, reference):
    result = warm.complete(LONG, MAX_TOKENS)
    assert result["choices"][0]["text"] == reference[LONG]
    prompt_tokens = result["usage"]["prompt_tokens"]
    log = warm.log()
    (loaded,), (local,) = hits_for(log, result["id"]), local_hits_for(log, result["id"])
    # Everything but the one token the forward must compute, beyond what vLLM's own prefix cache had
    # (the prompt-sharing test before this one left LONG's first blocks there).
    assert loaded > 0 and local + loaded == prompt_tokens - 1


def test_stored_kv_is_bit_exact(cold: ColdRun, warm: VLLMServer, backend: Backend):
    warm.text(LONG, 1)  # loaded by the previous test, or now
    saved = chunk_checksums(cold.log, "saved")
    loaded = chunk_checksums(warm.log(), "loaded")
    assert loaded, "the warm instance loaded nothing"
    for key, checksum in loaded.items():
        assert saved[key] == checksum, f"chunk {key} changed between save and load"
        value = backend.read_value(key)
        if value is not None:  # the disk tier may hold what the remote does not, and vice versa
            _, payload = parse_header(value)
            assert f"{xxhash.xxh3_64_intdigest(payload):016x}" == checksum


def test_sixteen_concurrent_shared_prefix_requests_match_reference(warm: VLLMServer, reference):
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: warm.complete(p, MAX_TOKENS), FAMILY))
    for prompt, result in zip(FAMILY, results, strict=True):
        assert result["choices"][0]["text"] == reference[prompt]
    log = warm.log()
    assert sum(bool(hits_for(log, r["id"])) for r in results) >= 8, "most requests should be store hits"


def test_connector_metrics_are_in_vllm_metrics(warm: VLLMServer):
    assert warm.metric_value("vllm:kvcache_plugin_load_tokens_total") > 0
    assert warm.metric_value("vllm:kvcache_plugin_lookup_chunks_total") > 0


def test_broken_store_still_serves_reference_output(warm: VLLMServer, backend: Backend, reference):
    backend.break_store()
    for prompt in (LATE, UNSEEN):
        assert warm.text(prompt, MAX_TOKENS) == reference[prompt]
