"""A request never loads KV computed for other inputs: LoRA adapters, cache_salt and prompt
embeddings on the real vLLM CPU engine (float32, where a hit reproduces a cold run token for token).

One store (redis), three vLLM starts: a reference without the connector, a cold instance that
stores, and a restarted one (its own prefix cache empty, so every hit is the store's). The prompts
are the same token ids in every variant: only the adapter, the salt or the embeddings differ.
"""

from __future__ import annotations

import base64
import io
import re

import pytest
import torch

from testbed import prompts
from testbed.events import requests
from testbed.redis_servers import start_redis
from testbed.vllm_process import VLLMServer, clean_env, ensure_model, launched_together, started_together
from tests.tiny_models import lora_adapter

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOKENS = 12
PROMPT = prompts.text(420, offset=41000)  # ~530 tokens: two whole chunks and a partial one
ADAPTER = "ad"
CHUNK = 256  # the default chunk size
TEMPLATE_SLACK = 32  # the chat template's tokens before the user's text


def embeds_message(seed: int) -> list[dict]:
    """A chat turn of text, then 8 positions given as embeddings (the model's own embeddings of 8
    random tokens, so they read as words), then more text."""
    from safetensors import safe_open

    with safe_open(str(ensure_model() / "model.safetensors"), "pt") as weights:
        table = weights.get_tensor("model.embed_tokens.weight")
    ids = torch.randint(1000, 40000, (8,), generator=torch.Generator().manual_seed(seed))
    tensor = table[ids].float()
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return [{"role": "user", "content": [
        {"type": "text", "text": PROMPT},
        {"type": "prompt_embeds", "data": base64.b64encode(buf.getvalue()).decode()},
        {"type": "text", "text": prompts.text(60, offset=43000)}]}]


# name -> how to ask: (endpoint, extra body); every variant has the same text
VARIANTS = {
    "base": ("completions", {}),
    "lora": ("completions", {"model": ADAPTER}),
    "salt-a": ("completions", {"cache_salt": "tenant-a"}),
    "salt-b": ("completions", {"cache_salt": "tenant-b"}),
    "embeds-1": ("chat", {"messages": embeds_message(1)}),
    "embeds-2": ("chat", {"messages": embeds_message(2)}),
}


def ask(server: VLLMServer, variant: str) -> dict:
    endpoint, extra = VARIANTS[variant]
    body = {"model": server.model, "max_tokens": TOKENS, "temperature": 0, **extra}
    if endpoint == "chat":
        reply = server._post("/v1/chat/completions", body, 300)
        reply["text"] = reply["choices"][0]["message"]["content"]
    else:
        reply = server._post("/v1/completions", {"prompt": PROMPT, **body}, 300)
        reply["text"] = reply["choices"][0]["text"]
    return reply


def scheduled(log: str, reply: dict) -> tuple[int, int]:
    """(tokens the connector loaded, tokens vLLM's own prefix cache had) when vLLM first scheduled it."""
    events = requests(log, reply["id"])
    assert events, f"no request event for {reply['id']}"
    return events[0]["loaded_tokens"], events[0]["local_tokens"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    adapter = lora_adapter(tmp / "adapter")
    args = ("--enable-lora", "--max-lora-rank", "8", "--max-loras", "1", "--lora-modules", f"{ADAPTER}={adapter}",
            "--enable-prompt-embeds")
    (tmp / "redis").mkdir()
    redis = start_redis("redis-isolation", str(tmp / "redis"))
    env = clean_env(LMCACHE_REMOTE_URL=redis.url, LMCACHE_LOCAL_CPU="False")
    out = {}
    try:
        # The reference (no connector) and the cold instance need nothing from each other; the
        # restarted instance starts beside them and is asked nothing before the cold one stopped.
        with launched_together(VLLMServer(env, dtype="float32", name="vllm-iso-warm", log_dir=str(tmp),
                                          extra_args=args)) as (warm,):
            with started_together(
                    VLLMServer(clean_env(), dtype="float32", connector=False, name="vllm-iso-reference",
                               log_dir=str(tmp), extra_args=(*args, "--no-enable-prefix-caching")),
                    VLLMServer(env, dtype="float32", name="vllm-iso-cold", log_dir=str(tmp), extra_args=args),
            ) as (ref, cold):
                out["reference"] = {v: ask(ref, v)["text"] for v in VARIANTS}
                out["prompt_tokens"] = len(ref.tokenize(PROMPT))
                # Stored in this order: each later variant finds the earlier ones' chunks in the store
                # (and in vLLM's own cache) under other keys, and must miss them.
                out["cold"] = {v: ask(cold, v) for v in ("base", "lora", "salt-a", "embeds-1")}
                out["cold_log"] = cold.log()
            out["cold_keys"] = {k.decode() for k in redis.client().scan_iter(match="vllm@*")}
            warm.wait_healthy()
            out["warm"] = {v: ask(warm, v) for v in ("salt-b", "base", "lora", "salt-a", "embeds-2", "embeds-1")}
            out["warm_log"] = warm.log()
        out["keys"] = {k.decode() for k in redis.client().scan_iter(match="vllm@*")}
    finally:
        redis.stop()
    return out


def test_each_variant_changes_the_text_so_a_mix_up_would_show(runs):
    ref = runs["reference"]
    assert ref["lora"] != ref["base"], "the adapter must change the text, or the LoRA test proves nothing"
    assert ref["embeds-1"] != ref["embeds-2"], "the embeddings must change the text"
    assert ref["salt-a"] == ref["salt-b"] == ref["base"]  # a salt changes only who may share


def test_cold_instance_never_loads_another_variants_chunks(runs):
    log = runs["cold_log"]
    for variant, reply in runs["cold"].items():
        assert scheduled(log, reply)[0] == 0, f"{variant} loaded KV stored for another variant"
        assert reply["text"] == runs["reference"][variant]


def test_restart_hits_each_variant_only_in_its_own_key_space(runs):
    log, warm, ref = runs["warm_log"], runs["warm"], runs["reference"]
    for variant, reply in warm.items():
        assert reply["text"] == ref[variant], f"{variant}: wrong text after the restart"
    prompt_tokens = warm["base"]["usage"]["prompt_tokens"]
    assert scheduled(log, warm["salt-b"]) == (0, 0), "salt B may not load what salt A or no salt stored"
    chunks = -(-prompt_tokens // CHUNK)
    new_keys = runs["keys"] - runs["cold_keys"]
    assert len(new_keys) >= chunks, "salt B's recomputed prompt is stored under its own keys"
    assert scheduled(log, warm["base"])[0] == prompt_tokens - 1
    assert scheduled(log, warm["lora"]) == (prompt_tokens - 1, 0), "the adapter's own chunks, not the base's"
    assert scheduled(log, warm["salt-a"]) == (prompt_tokens - 1, 0)
    # Different embeddings: only the whole chunks before them are shared (the chat's leading text).
    loaded_2, local_2 = scheduled(log, warm["embeds-2"])
    assert local_2 == 0 and loaded_2 % CHUNK == 0
    assert CHUNK <= loaded_2 <= runs["prompt_tokens"] + TEMPLATE_SLACK, \
        f"embeds-2 loaded {loaded_2} tokens: past the embeddings, which follow ~{runs['prompt_tokens']} text tokens"
    # The same embeddings as stored: everything hits (vLLM's own cache now has the shared text).
    loaded_1, local_1 = scheduled(log, warm["embeds-1"])
    assert loaded_1 > 0 and loaded_1 + local_1 == warm["embeds-1"]["usage"]["prompt_tokens"] - 1


def test_no_salt_appears_in_a_key(runs):
    assert runs["keys"] and not any(re.search("tenant", k) for k in runs["keys"])
