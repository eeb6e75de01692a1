"""`make demo`: the same prompts before and after a vLLM restart, with the embedded lm:// server.

Starts our lm:// server and vLLM (CPU build) with the LMCacheConnector, sends the seed's request and
a ~4k-token prompt, restarts vLLM (its own prefix cache is gone), sends both again, and prints the
text, hit/miss and time to first token of each, and the keys in the store. Cleans up after itself.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed import prompts  # noqa: E402
from testbed.events import requests  # noqa: E402
from testbed.lm_server import LMServerProcess  # noqa: E402
from testbed.processes import free_port  # noqa: E402
from testbed.vllm_process import VLLMServer, clean_env  # noqa: E402
from vllm_kvcache_plugin.connectors import create_connector  # noqa: E402

SEED_PROMPT = "San Francisco is a 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"


def outcome(log: str, completion_id: str) -> str:
    for event in requests(log, completion_id):
        if event["loaded_tokens"]:
            return f"HIT  ({event['loaded_tokens']}/{event['prompt_tokens']} tokens loaded)"
        return "MISS"
    return "vLLM prefix cache"


def run_round(server: VLLMServer, label: str, long_prompt: list[int]) -> None:
    print(f"\n--- {label} ---")
    for name, prompt, max_tokens in (("seed request", SEED_PROMPT, 10), ("~4k-token prompt", long_prompt, 10)):
        streamed = server.ttft(prompt, max_tokens=max_tokens)
        tokens = len(prompt) if isinstance(prompt, list) else len(server.tokenize(prompt))
        text = streamed.text.replace("\n", " ")
        print(f"{name:18s} {tokens:5d} tokens  TTFT {streamed.ttft * 1000:8.1f} ms  "
              f"{outcome(server.log(), streamed.id):34s} -> {text[:50]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m"), help="model folder")
    parser.add_argument("--words", type=int, default=3000, help="words in the long prompt (~4k tokens)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kvcache-demo-"))
    lm = LMServerProcess(free_port(), ("--max-size-gb", "2")).start()
    print(f"lm:// server on {lm.url} (pid {lm.pid})")
    env = clean_env(LMCACHE_REMOTE_URL=lm.url, LMCACHE_CHUNK_SIZE="256")
    servers: list[VLLMServer] = []
    try:
        for round_no, label in enumerate(("first vLLM: cold", "after a vLLM restart: loaded from lm://")):
            started = time.perf_counter()
            server = VLLMServer(env, model=Path(args.model), name=f"vllm-demo-{round_no}", log_dir=str(workdir))
            servers.append(server)
            server.start()
            print(f"\nvLLM ready on {server.url} in {time.perf_counter() - started:.0f}s "
                  f"(log: {server.process.log_path})")
            long_prompt = server.tokenize(prompts.text(args.words))[:4000]
            run_round(server, label, long_prompt)
            server.stop()
        keys = asyncio.run(_list_keys(lm.url))
        print(f"\n{len(keys)} chunks stored in {lm.url}, e.g.:")
        for key in keys[:3]:
            print(f"  {key}")
        return 0
    finally:
        for server in servers:
            server.stop()
        lm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _list_keys(url: str) -> list[str]:
    connector = create_connector(url)
    try:
        return sorted(await connector.list("vllm@"))
    finally:
        await connector.close()


if __name__ == "__main__":
    sys.exit(main())
