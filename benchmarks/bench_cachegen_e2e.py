"""CacheGen on vLLM: restart hits through redis, cachegen vs naive, 32 greedy tokens. Run as
``python benchmarks/bench_cachegen.py --e2e`` (~20 min)."""

from __future__ import annotations

from pathlib import Path

from benchmarks._common import fmt, markdown_table

E2E_FINE_BINS = ("256", "96")  # the finest quality row of the transformers table, for comparison


def e2e(out: Path, quick: bool) -> dict:
    """Restart hits through redis: for each serde a cold vLLM stores the prompts (and answers them:
    the no-cache reference), a fresh one (its own prefix cache empty) loads them and continues
    greedily. Both hits recompute the same tail, so cachegen vs naive differ only by the codec. bf16:
    greedy tokens can differ even between two cache paths (ENVIRONMENT.md), so the naive hit against
    the cold run is printed as the engine's own floor, and the logprob gap too.
    tests/test_e2e_cachegen.py checks the same path on fewer prompts in `make test`."""
    from testbed import prompts
    from testbed.events import all_loaded_tokens
    from testbed.redis_servers import start_redis
    from testbed.vllm_process import VLLMServer, clean_env

    texts = [prompts.text(500, offset=700 * i) for i in range(4 if quick else 20)]
    fine = f"cachegen {E2E_FINE_BINS[0]} / {E2E_FINE_BINS[1]}"
    variants = {"naive": {"LMCACHE_REMOTE_SERDE": "naive"}, "cachegen": {"LMCACHE_REMOTE_SERDE": "cachegen"},
                fine: {"LMCACHE_REMOTE_SERDE": "cachegen", "LMCACHE_CACHEGEN_KEY_BINS": E2E_FINE_BINS[0],
                       "LMCACHE_CACHEGEN_VALUE_BINS": E2E_FINE_BINS[1]}}
    runs: dict[str, dict] = {}
    for name, settings in variants.items():
        tag = name.replace(" ", "").replace("/", "-")
        for stale in (f"cold-{tag}", f"warm-{tag}"):  # logs append: an earlier run's hits would count
            (out / f"{stale}.log").unlink(missing_ok=True)
        redis = start_redis(f"bench-{tag}")
        try:
            env = clean_env(LMCACHE_REMOTE_URL=redis.url, LMCACHE_LOCAL_CPU="False", LMCACHE_LOG_LEVEL="DEBUG",
                            **settings)
            with VLLMServer(env, name=f"cold-{tag}", log_dir=str(out)) as cold:
                cold_answers = [cold.complete(text, max_tokens=32, logprobs=1)["choices"][0]["logprobs"]
                                for text in texts]
            client = redis.client()
            stored = sum(client.strlen(k) for k in client.scan_iter())
            with VLLMServer(env, name=f"warm-{tag}", log_dir=str(out)) as warm:
                answers = [warm.complete(text, max_tokens=32, logprobs=1)["choices"][0]["logprobs"] for text in texts]
                hit_tokens = sum(all_loaded_tokens(warm.log()))
            runs[name] = {"stored_bytes": stored, "answers": answers, "cold": cold_answers, "hit_tokens": hit_tokens}
        finally:
            redis.stop()

    def compare(a_runs: list[dict], b_runs: list[dict]) -> tuple[int, float, float]:
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(a_runs, b_runs, strict=True))
        agree = sum(sum(x == y for x, y in zip(a["tokens"], b["tokens"], strict=False)) for a, b in
                    zip(a_runs, b_runs, strict=True)) / (32 * len(texts))
        gap = max(abs(a["token_logprobs"][0] - b["token_logprobs"][0]) for a, b in zip(a_runs, b_runs, strict=True))
        return same, agree, gap

    naive = runs["naive"]
    rows, result = [], {"prompts": len(texts), "variants": {}}
    pairs = [("naive hit vs cold run (the engine's own floor)", naive["answers"], naive["cold"], naive)]
    pairs += [(f"{name} hit vs naive hit", runs[name]["answers"], naive["answers"], runs[name])
              for name in variants if name != "naive"]
    for label, a_runs, b_runs, run in pairs:
        same, agree, gap = compare(a_runs, b_runs)
        ratio = naive["stored_bytes"] / max(run["stored_bytes"], 1)
        result["variants"][label] = {"identical": same / len(texts), "token_agreement": agree,
                                     "first_token_logprob_gap": gap, "stored_ratio": ratio,
                                     "hit_tokens": run["hit_tokens"]}
        rows.append([label, f"{same}/{len(texts)}", f"{agree * 100:.0f}%", fmt(gap, 3), fmt(ratio, 2),
                     run["hit_tokens"]])
    # The headline figures (cachegen at its defaults), as earlier runs reported them.
    default = result["variants"]["cachegen hit vs naive hit"]
    result.update(identical=default["identical"], token_agreement=default["token_agreement"],
                  stored_ratio=default["stored_ratio"])
    print("\n## vLLM restart hits through redis: cachegen vs naive, 32 greedy tokens\n")
    print(markdown_table(["comparison", "identical 32-token", "token agreement", "first-token logprob gap",
                          "bytes stored: naive / this", "tokens loaded"], rows))
    return result
