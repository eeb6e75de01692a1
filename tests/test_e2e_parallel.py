"""Tensor parallel end to end on vLLM's CPU build: TP=2 with a small random Llama made here
(SmolLM2's 9 heads cannot be split in two), float32, redis.

Each rank saves and loads its own heads under its own rank in the key; a chunk is a hit only if
every rank has it; a restarted TP=2 instance loads both ranks' chunks bit for bit, and its first
token's logprobs equal those of a TP=2 vLLM without the connector (the model's text is
degenerate, so logprobs are compared, not text).
"""

from __future__ import annotations

import math
import re

import pytest

from testbed import prompts
from testbed.events import chunk_checksums, chunk_events, hits_for
from testbed.redis_servers import start_redis
from testbed.vllm_process import VLLMServer, clean_env, started_together
from tests.tiny_models import tiny_llama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [prompts.text(300 + 60 * i, offset=52000 + 900 * i) for i in range(3)]
LOGPROB_TOLERANCE = 1e-3  # float32: a hit's tail runs in another batch shape (~1e-5 nats apart)


def tp2(env: dict[str, str], model, name: str, tmp, connector: bool = True) -> VLLMServer:
    env = {**env, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per worker (vLLM binds one per NUMA node)
    return VLLMServer(env, dtype="float32", model=model, name=name, log_dir=str(tmp), connector=connector,
                      extra_args=("--tensor-parallel-size", "2", "--no-enable-prefix-caching"))


def first_logprobs(server: VLLMServer) -> list[dict[str, float]]:
    return [server.complete(p, 4, logprobs=5)["choices"][0]["logprobs"]["top_logprobs"][0] for p in PROMPTS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp2")
    model = tiny_llama(tmp / "tiny-llama")
    (tmp / "redis").mkdir()
    redis = start_redis("redis-tp2", str(tmp / "redis"))
    env = clean_env(LMCACHE_REMOTE_URL=redis.url, LMCACHE_LOCAL_CPU="False", LMCACHE_LOG_LEVEL="DEBUG")
    out = {"model": str(model)}
    try:
        # The reference (no connector) and the cold instance need nothing from each other.
        with started_together(tp2(clean_env(), model, "vllm-tp2-reference", tmp, connector=False),
                              tp2(env, model, "vllm-tp2-cold", tmp)) as (ref, cold):
            out["reference"] = first_logprobs(ref)
            out["cold"] = first_logprobs(cold)
            out["cold_log"] = cold.log()
        client = redis.client()
        out["keys"] = sorted(k.decode() for k in client.scan_iter(match="vllm@*"))
        # Take one chunk away from rank 1 only: that prompt may then hit only the chunks before it.
        partial = next(e["key"] for e in chunk_events(out["cold_log"], "saved")
                       if "@2@1@" in e["key"] and e["start"] == 256)
        out["removed"] = partial
        client.delete(partial)
        with tp2(env, model, "vllm-tp2-warm", tmp) as warm:
            out["warm_results"] = [warm.complete(p, 4, logprobs=5) for p in PROMPTS]
            out["warm"] = [r["choices"][0]["logprobs"]["top_logprobs"][0] for r in out["warm_results"]]
            out["warm_log"] = warm.log()
    finally:
        redis.stop()
    return out


def test_every_rank_stores_its_own_chunks(runs):
    pattern = re.compile(rf"vllm@{re.escape(runs['model'])}@2@([01])@([0-9a-f]{{64}})")
    matches = [pattern.fullmatch(k) for k in runs["keys"]]
    assert matches and all(matches), runs["keys"][:3]
    by_rank = {r: {m.group(2) for m in matches if m.group(1) == r} for r in "01"}
    assert by_rank["0"] == by_rank["1"], "both ranks store the same chunks (each its own heads)"


def test_restart_loads_both_ranks_bit_for_bit(runs):
    saved, loaded = chunk_checksums(runs["cold_log"], "saved"), chunk_checksums(runs["warm_log"], "loaded")
    assert {k.split("@")[3] for k in loaded} == {"0", "1"}, "both ranks must load"
    for key, checksum in loaded.items():
        assert saved[key] == checksum, f"chunk {key} changed between save and load"
    # The two ranks hold different heads: their chunks of the same tokens differ.
    by_hash = {}
    for key, checksum in saved.items():
        by_hash.setdefault(key.rsplit("@", 1)[1], {})[key.split("@")[3]] = checksum
    assert all(c["0"] != c["1"] for c in by_hash.values() if len(c) == 2)


def test_a_chunk_is_a_hit_only_if_every_rank_has_it(runs):
    """Rank 1 lost one prompt's chunk [256, 512) (deleted before the restart): that prompt loads only
    its first chunk, which both ranks have; the others load everything but the last token."""
    loaded = [(hits_for(runs["warm_log"], r["id"]) or [0])[0] for r in runs["warm_results"]]
    whole = [r["usage"]["prompt_tokens"] - 1 for r in runs["warm_results"]]
    assert sorted(a == b for a, b in zip(loaded, whole, strict=True)) == [False] + [True] * (len(PROMPTS) - 1)
    assert sorted(loaded)[0] == 256, loaded


def test_first_token_logprobs_equal_a_tp2_run_without_the_connector(runs):
    for label in ("cold", "warm"):
        for ref, got in zip(runs["reference"], runs[label], strict=True):
            assert ref.keys() == got.keys(), f"{label}: other top tokens than without the connector"
            for token, logprob in ref.items():
                assert math.isclose(got[token], logprob, abs_tol=LOGPROB_TOLERANCE), (label, token)
