"""vLLM start-up with the connector: bad settings stop it with one line; the seed's settings work."""

from __future__ import annotations

import pytest

from testbed import prompts
from testbed.events import all_loaded_tokens, chunk_checksums
from testbed.redis_servers import start_redis
from testbed.vllm_process import VLLMServer, clean_env, ensure_model, launched_together

pytestmark = [pytest.mark.vllm]


def failed_startup(tmp_path, env: dict[str, str], kv_transfer: dict | None = None) -> str:
    ensure_model()
    server = VLLMServer(clean_env(**env), kv_transfer=kv_transfer, name="vllm-bad", log_dir=str(tmp_path))
    server.process.start()
    code = server.wait_exit(timeout=300)
    log = server.log()
    assert code != 0, "vLLM started despite a bad setting"
    assert "Traceback" not in log, "a bad setting must not produce a traceback wall"
    (line,) = [ln for ln in log.splitlines() if "vllm-kvcache-plugin: invalid configuration" in ln]
    return line


def test_bad_url_stops_startup_with_one_line(tmp_path):
    line = failed_startup(tmp_path, {"LMCACHE_REMOTE_URL": "redis://localhost:notaport"})
    assert "remote_url (from env LMCACHE_REMOTE_URL)" in line and "notaport" in line


def test_unknown_key_stops_startup_naming_the_fix(tmp_path):
    line = failed_startup(tmp_path, {"LMCACHE_CHUNK_SIZ": "16"})
    assert "LMCACHE_CHUNK_SIZ" in line and "did you mean 'chunk_size'" in line


def test_bad_extra_config_names_its_source(tmp_path):
    transfer = {"kv_connector": "LMCacheConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"chunk_size": -16}}
    line = failed_startup(tmp_path, {}, kv_transfer=transfer)
    assert "chunk_size (from kv_connector_extra_config)" in line and "positive" in line


SEED_PROMPT = "San Francisco is a 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"


def first_logprob(result: dict) -> float:
    return result["choices"][0]["logprobs"]["token_logprobs"][0]


# bf16 is not bit-stable across a hit: the one token the hit computes runs in another batch shape,
# and which roundings that changes depends on the CPU's bf16 kernels. A lossless (naive) hit moved
# the first token's logprob by at most 0.039 nats over 20 prompts on an AVX2 machine and 0.048 on an
# AVX-512 BF16 one (benchmarks/RESULTS.md, CacheGen on vLLM, "naive hit vs cold run"; the bound is
# 10x that). KV in the wrong place, or another prompt's KV, moves it by whole nats; the bit-exact
# checksums below are the strict check.
BF16_LOGPROB_TOLERANCE = 0.5


@pytest.mark.slow
def test_seed_settings_cold_then_restart_hit_bf16(tmp_path):
    """The seed's environment, verbatim but for the store (chunk 16, no hot cache) and the log level
    (DEBUG, for the chunk checksums), in bf16, the dtype the seed ran in and the one the AMX packing
    applies to: a restart loads every chunk bit for bit as saved, and the answers stay close."""
    (tmp_path / "redis").mkdir()
    redis = start_redis("redis-seed", str(tmp_path / "redis"))
    env = {"VLLM_USE_V1": "0", "LMCACHE_USE_EXPERIMENTAL": "True", "LMCACHE_TRACK_USAGE": "false",
           "LMCACHE_CHUNK_SIZE": "16", "LMCACHE_LOCAL_CPU": "False", "LMCACHE_MAX_LOCAL_CPU_SIZE": "5.0",
           "LMCACHE_REMOTE_URL": redis.url, "LMCACHE_REMOTE_SERDE": "naive", "LMCACHE_LOG_LEVEL": "DEBUG"}
    long_prompt = prompts.text(600, offset=700)
    results, logs = [], []
    try:
        # The restarted instance starts beside the cold one and is asked nothing before it stopped.
        with launched_together(*(VLLMServer(clean_env(**env), name=f"vllm-seed-{name}", log_dir=str(tmp_path),
                                            extra_args=("--served-model-name", "smollm2-seed"))
                                 for name in ("cold", "warm"))) as servers:
            for server in servers:
                server.wait_healthy()
                server.model = "smollm2-seed"
                results.append([server.complete(p, 10, logprobs=5) for p in (SEED_PROMPT, long_prompt)])
                server.stop()  # a clean stop flushes pending writes
                logs.append(server.log())
        keys = [k.decode() for k in redis.client().scan_iter(match="vllm@*")]
    finally:
        redis.stop()
    cold, warm = results
    cold_log, warm_log = logs
    assert cold[0]["choices"][0]["text"].startswith(" 16 17 18")  # the seed's answer, counting on
    hits = all_loaded_tokens(warm_log)
    assert sorted(hits) == sorted(r["usage"]["prompt_tokens"] - 1 for r in warm)
    saved, loaded = chunk_checksums(cold_log, "saved"), chunk_checksums(warm_log, "loaded")
    assert len(loaded) == sum(-(-n // 16) for n in hits), "every chunk of both hits is loaded"
    assert all(saved[key] == checksum for key, checksum in loaded.items()), "a chunk changed in the store"
    for c, w in zip(cold, warm, strict=True):
        token, logprob = c["choices"][0]["logprobs"]["tokens"][0], first_logprob(c)
        warm_top = w["choices"][0]["logprobs"]["top_logprobs"][0]
        assert token in warm_top and abs(warm_top[token] - logprob) <= BF16_LOGPROB_TOLERANCE
    model_path = str(ensure_model())
    assert keys and all(k.startswith(f"vllm@{model_path}@1@0@") for k in keys)  # keys name the model path
