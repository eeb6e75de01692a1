"""Hybrid models end to end on vLLM's CPU build, with vLLM's hybrid KV-cache manager (HMA) left on.

Without HMA support the connector makes vLLM turn HMA off: a sliding-window model then keeps every
block of its sliding layers (Gemma3 here: 2.5x less KV capacity), and an SSM hybrid cannot start at
all. These tests check that the connector keeps HMA on and stays correct:

* Gemma3 (tiny, random, float32; 5 sliding layers with a 128-token window + 1 full layer), lm://
  store, three vLLM starts: a reference without the connector, a cold instance that stores, and a
  restarted one (prefix caching off, so every hit comes from the store). Capacity matches vLLM
  alone; prompts several windows long miss, then hit after the restart with the reference's first
  token logprob; a prompt sharing only a prefix loads whole chunks of it.
* GraniteMoeHybrid (tiny, 3 Mamba2 + 1 attention), two starts: with the connector it starts and
  serves what vLLM alone does, and its requests are plain misses (nothing is stored or loaded:
  attention KV without the SSM state cannot resume a prompt).

The random models' text is degenerate: logprobs and token ids are compared, not text.
"""

from __future__ import annotations

import asyncio

import pytest

from testbed import prompts
from testbed.events import events, hits_for, requests
from testbed.lm_server import LMServerProcess
from testbed.processes import free_port
from testbed.vllm_process import (
    VLLMServer,
    clean_env,
    hybrid_manager_turned_off,
    kv_cache_tokens,
    launched_together,
    started_together,
)
from tests.tiny_models import gemma3_tiny, granite_hybrid_tiny

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHUNK = 256  # the connector's default chunk size
WINDOW = 128  # the tiny Gemma3's sliding window
SHARED = 600  # P3 = P1's first SHARED tokens + another tail
TOKENS = 4
# float32 and the same kernels: a cold run matches vLLM alone exactly; a hit's last token runs in
# another batch shape (~1e-5 nats apart).
LOGPROB_TOLERANCE = 1e-4
CAPACITY_SHARE = 0.95  # of vLLM alone's KV cache tokens


def ask(server: VLLMServer, prompt: list[int]) -> dict:
    """The completion, with the first token's logprob and the token ids pulled out."""
    reply = server.complete(prompt, TOKENS, logprobs=1)
    logprobs = reply["choices"][0]["logprobs"]
    reply["first_logprob"] = logprobs["token_logprobs"][0]
    reply["tokens"] = logprobs["tokens"]
    return reply


def scheduled(log: str, reply: dict) -> tuple[int, int]:
    """(tokens the connector loaded, tokens vLLM's own prefix cache had) when vLLM first scheduled it."""
    events = requests(log, reply["id"])
    assert events, f"no request event for {reply['id']}"
    return events[0]["loaded_tokens"], events[0]["local_tokens"]


def assert_same_as(reference: dict, reply: dict, label: str) -> None:
    assert reply["tokens"] == reference["tokens"], f"{label}: other tokens than vLLM without the connector"
    diff = abs(reply["first_logprob"] - reference["first_logprob"])
    assert diff < LOGPROB_TOLERANCE, f"{label}: first-token logprob {diff:.2e} away from vLLM without the connector"


def stored_keys(url: str) -> list[str]:
    from vllm_kvcache_plugin.connectors import create_connector

    async def run() -> list[str]:
        connector = create_connector(url)
        try:
            return list(await connector.list(""))
        finally:
            await connector.close()

    return asyncio.run(run())


# -- Gemma3: sliding window + full attention --------------------------------------------------------

@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid-gemma3")
    model = gemma3_tiny(tmp / "gemma3-tiny")
    server = LMServerProcess(free_port()).start()
    env = clean_env(LMCACHE_REMOTE_URL=server.url, LMCACHE_LOCAL_CPU="False")
    out: dict = {}

    def engine(name: str, connector: bool, *args: str) -> VLLMServer:
        return VLLMServer(env if connector else clean_env(), dtype="float32", model=model, name=name,
                          log_dir=str(tmp), connector=connector, extra_args=args)

    try:
        # The reference (no connector) and the cold instance need nothing from each other; the
        # restarted instance starts beside them and is asked nothing before the cold one stopped.
        # Prefix caching off there: P3's shared prefix must come from the store, not from P1 in
        # vLLM's cache.
        with launched_together(engine("vllm-gemma3-restart", True, "--no-enable-prefix-caching")) as (warm,):
            with started_together(engine("vllm-gemma3-reference", False, "--no-enable-prefix-caching"),
                                  engine("vllm-gemma3-cold", True)) as (ref, cold):
                p1 = ref.tokenize(prompts.text(1000, offset=61000))  # ~1200 tokens: 9+ windows
                p2 = ref.tokenize(prompts.text(1100, offset=64000))
                p3 = p1[:SHARED] + p2[-500:]
                out["prompts"] = {"P1": p1, "P2": p2, "P3": p3}
                out["reference"] = {name: ask(ref, p) for name, p in out["prompts"].items()}
                out["reference_capacity"] = ref.kv_cache_tokens()
                out["cold"] = {name: ask(cold, out["prompts"][name]) for name in ("P1", "P2")}
                out["cold_log"] = cold.log()
            warm.wait_healthy()
            out["restart"] = {name: ask(warm, p) for name, p in out["prompts"].items()}
            out["restart_log"] = warm.log()
    finally:
        server.stop()
    return out


def test_gemma3_prompts_span_many_windows(gemma):
    p1, p3 = gemma["prompts"]["P1"], gemma["prompts"]["P3"]
    assert len(p1) > 8 * WINDOW and len(gemma["prompts"]["P2"]) > 8 * WINDOW
    assert p3[:SHARED] == p1[:SHARED] and p3[SHARED] != p1[SHARED]
    assert gemma["reference_capacity"], "vLLM logged no KV cache size"


def test_gemma3_connector_keeps_the_hybrid_manager_and_its_capacity(gemma):
    log = gemma["cold_log"]
    assert not hybrid_manager_turned_off(log), "the connector made vLLM turn its hybrid KV-cache manager off"
    layout = events(log, "layout")
    assert layout and layout[-1]["uncached"] is None and layout[-1]["groups"] == 6, layout
    capacity, reference = kv_cache_tokens(log), gemma["reference_capacity"]
    assert capacity is not None and capacity >= CAPACITY_SHARE * reference, \
        f"KV cache {capacity} tokens with the connector, {reference} without"


def test_gemma3_cold_requests_miss_and_match_vllm_alone(gemma):
    for name, reply in gemma["cold"].items():
        assert scheduled(gemma["cold_log"], reply)[0] == 0, f"{name} loaded from an empty store"
        assert_same_as(gemma["reference"][name], reply, f"cold {name}")


def test_gemma3_restart_hits_the_whole_prompt(gemma):
    for name in ("P1", "P2"):
        reply = gemma["restart"][name]
        assert scheduled(gemma["restart_log"], reply) == (reply["usage"]["prompt_tokens"] - 1, 0), name
        assert_same_as(gemma["reference"][name], reply, f"restart {name}")


def test_gemma3_shared_prefix_loads_whole_chunks(gemma):
    """P3 was never stored; only P1's chunks before the first differing token can hit."""
    reply = gemma["restart"]["P3"]
    loaded, local = scheduled(gemma["restart_log"], reply)
    assert local == 0
    assert 0 < loaded <= SHARED and loaded % CHUNK == 0, f"P3 loaded {loaded} tokens"
    assert_same_as(gemma["reference"]["P3"], reply, "restart P3")


# -- GraniteMoeHybrid: Mamba2 + attention -----------------------------------------------------------

# ~100 tokens: with prefix caching on (vLLM's default, Mamba "align" mode) a prompt longer than one
# Mamba chunk (256 tokens) crashes vLLM 0.32's CPU Mamba2 kernel (it ignores return_intermediate_states),
# with or without the connector; up to ~140 tokens works.
SSM_PROMPT = prompts.text(80, offset=70000)


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid-granite")
    model = granite_hybrid_tiny(tmp / "granite-hybrid-tiny")
    server = LMServerProcess(free_port()).start()
    env = clean_env(LMCACHE_REMOTE_URL=server.url, LMCACHE_LOCAL_CPU="False")
    out: dict = {}
    try:
        # The reference (no connector) starts while the connector's engine does.
        with launched_together(VLLMServer(env, dtype="float32", model=model, name="vllm-granite-connector",
                                          log_dir=str(tmp))) as (engine,):
            with VLLMServer(clean_env(), dtype="float32", model=model, name="vllm-granite-reference",
                            log_dir=str(tmp), connector=False) as ref:
                out["prompt"] = ref.tokenize(SSM_PROMPT)
                out["reference"] = ask(ref, out["prompt"])
                out["reference_capacity"] = ref.kv_cache_tokens()
            try:
                engine.wait_healthy()
            except RuntimeError as exc:  # start-up failed: what the tests report
                out["start_error"] = str(exc)[-3000:]
                return out
            out["replies"] = [ask(engine, out["prompt"]) for _ in range(2)]
            out["log"] = engine.log()
        # Stopped by now, after its queued writes, if any.
        out["keys"] = stored_keys(server.url)
    finally:
        server.stop()
    return out


def started(granite) -> dict:
    assert "start_error" not in granite, f"vLLM with the connector failed to start:\n{granite.get('start_error')}"
    return granite


def test_ssm_hybrid_starts_with_the_connector(granite):
    run = started(granite)
    assert 50 < len(run["prompt"]) <= 140
    layout = events(run["log"], "layout")
    assert layout and layout[-1]["uncached"], "the connector must say why it caches nothing for an SSM hybrid"
    assert kv_cache_tokens(run["log"]) >= CAPACITY_SHARE * run["reference_capacity"]


def test_ssm_hybrid_serves_what_vllm_alone_does_as_plain_misses(granite):
    """The second ask would hit for an attention-only model (the store keeps a prompt's partial last
    chunk too); attention KV without the SSM state cannot resume a prompt, so nothing is stored or loaded."""
    run = started(granite)
    for i, reply in enumerate(run["replies"]):
        assert hits_for(run["log"], reply["id"]) == [], f"ask {i + 1} loaded tokens for an SSM hybrid"
        assert_same_as(run["reference"], reply, f"ask {i + 1}")
    assert run["keys"] == [], f"the store got {len(run['keys'])} keys for an SSM hybrid"
