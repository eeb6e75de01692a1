"""After a model's weights change under the same name, ``vllm-kvcache purge`` drops its old KV: on the
real vLLM CPU engine (float32), a restart then misses the purged model's prompt and still hits the
other model's.

Three vLLM starts on one lm:// store: "smol-a" stores a prompt; its chunks are copied under the key
names of "smol-b" (the same weights served under another name, so the copy is real, valid KV for
it); ``purge --model smol-a`` (the console script); a restarted "smol-a" misses, a "smol-b" hits.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import prompts
from testbed.events import requests
from testbed.lm_server import LMServerProcess
from testbed.processes import free_port
from testbed.vllm_process import VLLMServer, clean_env, launched_together
from tests.e2e_scenario import greedy_margins
from tests.fixtures.vllm_server import FLOAT32_NEAR_TIE
from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.keys import ChunkKey, model_prefix

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = prompts.text(420, offset=47000)  # ~530 tokens: two whole chunks and a partial one
TOKENS = 12
SCRIPT = shutil.which("vllm-kvcache", path=str(Path(sys.executable).parent))


async def _on_store(url: str, work):
    connector = create_connector(url)
    await connector.connect()
    try:
        return await work(connector)
    finally:
        await connector.close()


def copy_model(url: str, source: str, target: str) -> int:
    """Put every chunk of ``source`` again under ``target``'s key names; returns how many."""
    async def work(c):
        keys = [k for page in [p async for p in c.scan(model_prefix(source))] for k in page.keys]
        values = await c.batched_get(keys)
        renamed = [str(ChunkKey("vllm", target, *_rank(k), ChunkKey.from_string(k).chunk_hash)) for k in keys]
        await c.batched_put([(k, bytes(v)) for k, v in zip(renamed, values, strict=True) if v is not None])
        return len(keys)
    return asyncio.run(_on_store(url, work))


def _rank(key: str) -> tuple[int, int]:
    chunk = ChunkKey.from_string(key)
    return chunk.world_size, chunk.rank


def loaded(server: VLLMServer, reply: dict) -> int:
    events = requests(server.log(), reply["id"])
    assert events, f"no request event for {reply['id']}"
    return events[0]["loaded_tokens"]


def serve(store: LMServerProcess, model_name: str, tmp: Path) -> VLLMServer:
    env = clean_env(LMCACHE_REMOTE_URL=store.url, LMCACHE_MODEL_NAME=model_name)
    return VLLMServer(env, dtype="float32", name=f"vllm-purge-{model_name}", log_dir=str(tmp))


def inspect(url: str) -> dict:
    result = subprocess.run([SCRIPT, "inspect", url, "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_purge_then_restart_misses_the_purged_model_and_hits_the_other(tmp_path):
    assert SCRIPT, "the vllm-kvcache console script is not installed next to this Python"
    store = LMServerProcess(free_port(), ("--max-size-gb", "1")).start()
    try:
        # The two restarted instances start beside the cold one; they are asked nothing before the
        # purge (they keep no answer from before their first request).
        with launched_together(serve(store, "smol-a", tmp_path), serve(store, "smol-a", tmp_path),
                               serve(store, "smol-b", tmp_path)) as (cold, purged, other):
            cold.wait_healthy()
            first = cold.complete(PROMPT, TOKENS, logprobs=2)
            assert loaded(cold, first) == 0
            cold.stop()  # a clean stop flushes pending writes
            assert min(greedy_margins(first)) > FLOAT32_NEAR_TIE, "the prompt has a greedy near-tie; pick another"
            prompt_tokens = first["usage"]["prompt_tokens"]
            copied = copy_model(store.url, "smol-a", "smol-b")
            assert copied == -(-prompt_tokens // 256), "the cold run stored one chunk per 256 tokens"
            before = inspect(store.url)
            assert {m: sum(g["chunks"] for g in groups) for m, groups in before["models"].items()} == \
                {"smol-a": copied, "smol-b": copied}

            purge = subprocess.run([SCRIPT, "purge", store.url, "--model", "smol-a"], capture_output=True,
                                   text=True, timeout=60)
            assert purge.returncode == 0, purge.stderr
            assert f"deleted {copied} chunks" in purge.stdout
            assert set(inspect(store.url)["models"]) == {"smol-b"}

            again = purged.wait_healthy().complete(PROMPT, TOKENS)
            assert loaded(purged, again) == 0, "the purged model's prompt was loaded from the store"
            hit = other.wait_healthy().complete(PROMPT, TOKENS)
            assert loaded(other, hit) == prompt_tokens - 1, "the other model's chunks were not loaded"
        text = first["choices"][0]["text"]
        assert again["choices"][0]["text"] == text and hit["choices"][0]["text"] == text
    finally:
        store.stop()
