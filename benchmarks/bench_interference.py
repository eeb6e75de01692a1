"""What a hit costs the requests already running: decode gaps while other prompts load.

Two decode streams run (short prompts, long greedy generations) while new prompts arrive; the
figure is the largest gap between two tokens of either stream while the newcomers are served
(from the moment they are sent until each has its first token). Scenarios, one vLLM + redis:

* (a) four ~3.7k-token prompts served as vLLM prefix-cache hits in the same instance;
* (b) the same four loaded from redis after a vLLM restart (its prefix cache is gone);
* healthy: two new prompts (misses: their own prefill) with redis answering;
* frozen: two other new prompts while redis is stopped (SIGSTOP) for 1.5 s: a store that accepts
  connections and answers nothing.

    python benchmarks/bench_interference.py [--prompt-tokens 3700] [--out DIR]

Bars (issue 14): (b) <= 2x (a); frozen <= max(2x healthy, healthy + 100 ms). The scheduler's
lookup wait per step (p50 / p99 / max, from the connector's ``lookup_waits`` event at shutdown) is
printed too: the aim is ~1 ms. Steps after one that computed something do not wait at all (their
count is printed); the waits are those of idle steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import add_engine_env_option, apply_engine_env, environment_line, fmt, markdown_table  # noqa: E402
from testbed import prompts  # noqa: E402
from testbed.events import events  # noqa: E402
from testbed.redis_servers import start_redis  # noqa: E402
from testbed.vllm_process import VLLMServer, clean_env, ensure_model  # noqa: E402

STREAMS = 2
LAST_IDS: list[str] = []  # completion ids of the newcomers, for their events


@dataclass
class DecodeStream:
    """One streamed greedy generation; the arrival time of every token event."""

    server: VLLMServer
    prompt: str
    times: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> DecodeStream:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        body = {"model": self.server.model, "prompt": self.prompt, "max_tokens": 4000, "temperature": 0,
                "stream": True, "ignore_eos": True}
        req = urllib.request.Request(f"{self.server.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            for raw in resp:
                if raw.startswith(b"data:") and not raw.startswith(b"data: [DONE]"):
                    self.times.append(time.perf_counter())
                if self._stop.is_set():
                    return

    def wait_tokens(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.times) < n:
            if time.monotonic() > deadline:
                raise TimeoutError("the decode stream does not produce tokens")
            time.sleep(0.05)

    def largest_gap(self, start: float, end: float) -> float:
        """The longest wait for a token that arrived in [start, end] (the gap may begin before start)."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False) if start <= b <= end]
        return max(gaps, default=float("nan"))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


def newcomers(server: VLLMServer, token_prompts: list[list[int]], during: float = 0.0,
              on_sent=None) -> tuple[float, float, list[float]]:
    """Send the prompts at once (max_tokens=1); (start, end, TTFTs): end = the last first token."""
    ttfts: list[float] = [0.0] * len(token_prompts)

    def one(i: int) -> None:
        result = server.ttft(token_prompts[i], max_tokens=1)
        ttfts[i] = result.ttft
        LAST_IDS.append(result.id)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(token_prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    if on_sent is not None:
        on_sent()
    for t in threads:
        t.join()
    end = max(time.perf_counter(), start + during)
    return start, end, ttfts


def with_streams(server: VLLMServer, run) -> tuple[float, list[float], float]:
    """Run ``run()`` -> (start, end, ttfts) while the decode streams go; (largest gap, TTFTs, steady gap)."""
    streams = [DecodeStream(server, prompts.text(30, offset=50 + 97 * i)).start() for i in range(STREAMS)]
    try:
        for s in streams:
            s.wait_tokens(30)
        steady_from = time.perf_counter()
        time.sleep(1.0)
        steady = max(s.largest_gap(steady_from, time.perf_counter()) for s in streams)
        start, end, ttfts = run()
        time.sleep(0.3)  # the token after the newcomers' last first token closes the gap
        gap = max(s.largest_gap(start, end + 0.3) for s in streams)
    finally:
        for s in streams:
            s.stop()
    return gap, ttfts, steady


def token_prompts(server: VLLMServer, count: int, tokens: int, offset: int) -> list[list[int]]:
    out = []
    for i in range(count):
        ids = server.tokenize(prompts.text(int(tokens * 0.9) + 50, offset=offset + 2500 * i))
        while len(ids) < tokens:
            ids += ids
        out.append(ids[:tokens])
    return out


def load_stages(log: str, completion_ids: list[str]) -> str:
    """The newcomers' lookups and loads, from the connector's events: where (b)'s TTFT went."""
    lines = []
    for e in events(log, "request"):
        if any(e["request_id"].startswith(c) for c in completion_ids) and e["loaded_tokens"]:
            lines.append(f"  request {e['request_id'][:18]}: lookup {e['lookup_ms']:.1f} ms, "
                         f"{e['loaded_tokens']} tokens, {'async' if e['asynchronous'] else 'sync'}")
    for e in events(log, "loads_done"):
        if any(r.startswith(c) for r in e["requests"] for c in completion_ids):
            lines.append(f"  load of {len(e['requests'])} request(s), {e['bytes'] / 1e6:.0f} MB: queued "
                         f"{e['queued_ms']:.0f} ms, fetch wait {e['fetch_wait_ms']:.0f} ms, scatter "
                         f"{e['scatter_ms']:.0f} ms, total {e['total_ms']:.0f} ms")
    return "\n".join(lines)


def lookup_waits(server: VLLMServer) -> dict:
    found = events(server.log(), "lookup_waits")
    return found[-1] if found else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=3700)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    add_engine_env_option(parser)
    args = parser.parse_args()
    apply_engine_env(args.engine_env)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_model()
    print(environment_line(), flush=True)
    rows, waits = [], []
    with tempfile.TemporaryDirectory(prefix="bench-interference-") as tmp:
        workdir = Path(tmp)
        (workdir / "redis").mkdir()
        redis = start_redis("redis-interference", str(workdir / "redis"))
        env = clean_env(LMCACHE_REMOTE_URL=redis.url, LMCACHE_LOCAL_CPU="False")
        try:
            server = VLLMServer(env, name="vllm-interference-1", log_dir=str(out_dir)).start()
            try:
                four = token_prompts(server, 4, args.prompt_tokens, offset=1000)
                for ids in four:  # computed once: saved to redis and in vLLM's prefix cache
                    server.ttft(ids)
                gap_a, ttft_a, steady_a = with_streams(server, lambda: newcomers(server, four))
                print(f"(a) prefix-cache hits: largest gap {gap_a * 1e3:.0f} ms, TTFTs {fmt_list(ttft_a)}", flush=True)
            finally:
                server.stop()
            waits.append(("first instance", lookup_waits(server)))
            server = VLLMServer(env, name="vllm-interference-2", log_dir=str(out_dir)).start()
            try:
                LAST_IDS.clear()
                gap_b, ttft_b, steady_b = with_streams(server, lambda: newcomers(server, four))
                print(f"(b) loads from redis: largest gap {gap_b * 1e3:.0f} ms, TTFTs {fmt_list(ttft_b)}", flush=True)
                stages_b = load_stages(server.log(), list(LAST_IDS))
                print(stages_b, flush=True)
                fresh = token_prompts(server, 4, args.prompt_tokens // 2, offset=20_000)
                gap_h, ttft_h, steady_h = with_streams(server, lambda: newcomers(server, fresh[:2]))
                print(f"healthy store, 2 new prompts: largest gap {gap_h * 1e3:.0f} ms", flush=True)

                def frozen_run():
                    redis.node.pause()
                    timer = threading.Timer(1.5, redis.node.resume)
                    timer.start()
                    try:
                        return newcomers(server, fresh[2:], during=1.5)
                    finally:
                        timer.join()

                gap_f, ttft_f, steady_f = with_streams(server, frozen_run)
                print(f"frozen store (SIGSTOP 1.5 s), 2 new prompts: largest gap {gap_f * 1e3:.0f} ms", flush=True)
            finally:
                redis.node.resume()  # in case the frozen run failed half-way
                server.stop()
            waits.append(("restarted instance", lookup_waits(server)))
        finally:
            redis.stop()

    rows = [["(a) 4 prompts, vLLM prefix-cache hits", fmt(gap_a * 1e3, 0), fmt(steady_a * 1e3, 0),
             fmt_list(ttft_a), ""],
            ["(b) 4 prompts, loaded from redis after a restart", fmt(gap_b * 1e3, 0), fmt(steady_b * 1e3, 0),
             fmt_list(ttft_b), f"(b)/(a) = {gap_b / gap_a:.2f} (<= 2)"],
            ["healthy redis, 2 new prompts (misses)", fmt(gap_h * 1e3, 0), fmt(steady_h * 1e3, 0),
             fmt_list(ttft_h), ""],
            ["redis frozen 1.5 s, 2 new prompts", fmt(gap_f * 1e3, 0), fmt(steady_f * 1e3, 0), fmt_list(ttft_f),
             f"frozen/healthy = {gap_f / gap_h:.2f} (<= 2, or +100 ms: {(gap_f - gap_h) * 1e3:+.0f} ms)"]]
    table = markdown_table(["scenario", "largest decode gap ms", "steady gap ms (before)", "newcomers' TTFT s",
                            "bar"], rows)
    wait_rows = [[name, w.get("busy_steps_asked", "-"), w.get("steps", "-"), w.get("p50_ms", "-"),
                  w.get("p99_ms", "-"), w.get("max_ms", "-")] for name, w in waits]
    wait_table = markdown_table(["engine", "busy steps that asked (no wait)", "idle steps that waited", "p50 ms",
                                 "p99 ms", "max ms"], wait_rows)
    text = (f"{environment_line()}\n\nDecode interference ({STREAMS} greedy streams, SmolLM2-135M bf16, "
            f"{args.prompt_tokens}-token newcomers, redis, hot cache off)\n\n{table}\n\n"
            f"Scheduler wait for lookup answers, per step (connector's lookup_waits event)\n\n{wait_table}\n\n"
            f"(b)'s lookups and loads (connector events)\n\n```\n{stages_b}\n```\n")
    print("\n" + text)
    (out_dir / "interference.md").write_text(text)
    plot([r[0] for r in rows], [gap_a, gap_b, gap_h, gap_f], out_dir / "interference.png")
    return 0


def fmt_list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def plot(labels: list[str], gaps: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(range(len(gaps)), [g * 1e3 for g in gaps], color=["#888", "#36c", "#888", "#c63"])
    ax.set_yticks(range(len(gaps)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("largest inter-token gap of the running streams (ms)")
    ax.set_title("What newcomers cost running decodes")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
