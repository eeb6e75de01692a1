"""A multi-turn chat workload: several users, some sharing a system prompt; each turn's prompt is the
previous prompt + the answer + a new question. Hit rate and mean TTFT per turn, with and without
the connector, on a vLLM whose own KV cache is too small to keep every conversation (as on a busy
server), so earlier turns are evicted there and must come back from our tiers.

    python benchmarks/bench_chat.py [--users 6] [--turns 4] [--kv-space-gb 0.1] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import environment_line, fmt, markdown_table  # noqa: E402
from testbed import prompts  # noqa: E402
from testbed.events import requests  # noqa: E402
from testbed.lm_server import LMServerProcess  # noqa: E402
from testbed.processes import free_port  # noqa: E402
from testbed.vllm_process import VLLMServer, clean_env, ensure_model  # noqa: E402


@dataclass
class TurnStats:
    ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    loaded_tokens: int = 0  # from the connector, when the request was first scheduled
    vllm_cached_tokens: int = 0  # already in vLLM's own prefix cache then
    reloads: int = 0  # loads again after vLLM preempted the request (its tiny cache ran out)


def conversations(users: int, system_words: int) -> list[str]:
    """Opening prompts: half the users share one system prompt, the others have their own."""
    shared = prompts.text(system_words, offset=40000)
    return [(shared if u % 2 == 0 else prompts.text(system_words, offset=41000 + 900 * u))
            + f"\n\nUser {u}: {prompts.text(60, offset=50000 + 300 * u)}" for u in range(users)]


def run(server: VLLMServer, users: int, turns: int, system_words: int, answer_tokens: int) -> list[TurnStats]:
    history = conversations(users, system_words)
    stats = [TurnStats() for _ in range(turns)]

    lock = threading.Lock()  # the users' threads add to the same turn's totals

    def one_turn(u: int, turn: int) -> None:
        prompt_tokens = len(server.tokenize(history[u]))
        streamed = server.ttft(history[u], max_tokens=answer_tokens)
        question = prompts.text(80, offset=60000 + 700 * u + 90 * turn)
        history[u] += f"{streamed.text}\n\nUser {u}, turn {turn + 1}: {question}"
        lines = requests(server.log(), streamed.id)
        with lock:
            stats[turn].ttft.append(streamed.ttft)
            stats[turn].prompt_tokens += prompt_tokens
            if lines:  # the first scheduling gives the hit rate; later ones are restarts after preemption
                stats[turn].loaded_tokens += lines[0]["loaded_tokens"]
                stats[turn].vllm_cached_tokens += lines[0]["local_tokens"]
                stats[turn].reloads += sum(1 for e in lines[1:] if e["loaded_tokens"])

    with ThreadPoolExecutor(users) as pool:
        for turn in range(turns):
            list(pool.map(one_turn, range(users), [turn] * users))
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=900, help="size of the (shared) system prompt")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--kv-space-gb", default="0.1",
                        help="vLLM's own CPU KV cache (~4,500 tokens: earlier turns are evicted)")
    parser.add_argument("--quick", action="store_true", help="3 users, 3 turns")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    args = parser.parse_args()
    if args.quick:
        args.users, args.turns = 3, 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_model()
    print(environment_line(), flush=True)
    results: dict[str, list[TurnStats]] = {}
    lm = LMServerProcess(free_port(), ("--max-size-gb", "4")).start()
    try:
        for name, env, connector in (
            ("vLLM alone", {}, False),
            ("with connector (hot cache + lm://)",
             {"LMCACHE_REMOTE_URL": lm.url, "LMCACHE_MAX_LOCAL_CPU_SIZE": "1"}, True),
        ):
            started = time.perf_counter()
            # vLLM 0.32 reads VLLM_CPU_KVCACHE_SPACE as whole GiB and lets it override the flag
            # (and an empty value fails): leave it out and size the cache in bytes.
            kv_bytes = str(int(float(args.kv_space_gb) * 2**30))
            server_env = clean_env(**env)
            server_env.pop("VLLM_CPU_KVCACHE_SPACE", None)
            log_name = f"vllm-chat-{'connector' if connector else 'alone'}"
            (out / f"{log_name}.log").unlink(missing_ok=True)
            server = VLLMServer(server_env, connector=connector,  # its log stays in --out
                                name=log_name, log_dir=str(out),
                                # A context that fits that cache (vLLM refuses to start otherwise).
                                extra_args=("--kv-cache-memory-bytes", kv_bytes, "--max-model-len", "4096"))
            with server:
                results[name] = run(server, args.users, args.turns, args.system_words, args.answer_tokens)
            print(f"{name}: done in {time.perf_counter() - started:.0f}s", flush=True)
    finally:
        lm.stop()
    rows = []
    for turn in range(args.turns):
        conn = list(results.values())[1][turn]
        row = [turn + 1, round(conn.prompt_tokens / args.users)]
        row += [fmt(statistics.mean(stats[turn].ttft), 3) for stats in results.values()]
        row += [f"{100 * conn.loaded_tokens / max(1, conn.prompt_tokens):.0f}%",
                f"{100 * conn.vllm_cached_tokens / max(1, conn.prompt_tokens):.0f}%", conn.reloads]
        rows.append(row)
    table = markdown_table(["turn", "mean prompt tokens", *[f"mean TTFT s, {n}" for n in results],
                            "hit rate (prompt tokens loaded)", "prompt tokens in vLLM's own cache",
                            "loads again after preemption"], rows)
    text = (f"{environment_line()}\n\nMulti-turn chat: {args.users} users (half share a {args.system_words}-word "
            f"system prompt), {args.turns} turns, {args.answer_tokens}-token answers, vLLM KV cache "
            f"{args.kv_space_gb} GB\n\n{table}\n\nHit rate: prompt tokens the connector loaded when vLLM first "
            f"scheduled the request. Loads again: preempted requests (vLLM's small cache ran out) whose KV came "
            f"back from the connector instead of being recomputed.\n")
    print("\n" + text)
    (out / "chat.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
