"""Soak: mixed requests with shared prefixes at concurrency 16 against redis, with a small hot cache,
for a fixed time (30 minutes by default). Samples the vLLM worker's RSS and the connector's metrics
and checks: RSS flat (second half grows < 5%), hot cache within its budget, no leaked chunks
(allocations == frees + live).

    python benchmarks/soak.py [--minutes 30] [--concurrency 16] [--hot-gb 0.05] [--out DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import environment_line, markdown_table  # noqa: E402
from testbed import prompts  # noqa: E402
from testbed.processes import descendants, rss_bytes  # noqa: E402
from testbed.redis_servers import start_redis  # noqa: E402
from testbed.vllm_process import VLLMServer, clean_env, ensure_model  # noqa: E402

M = "vllm:kvcache_plugin_"


def worker_rss_mb(root_pid: int) -> float:
    """RSS of the process vLLM names VLLM::Worker (the one that holds our tiers)."""
    for pid in descendants(root_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"Worker" not in fh.read():
                    continue
            return rss_bytes(pid) / 2**20
        except (OSError, ValueError):  # the process ended
            continue
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--hot-gb", type=float, default=0.05, help="max_local_cpu_size (small on purpose)")
    parser.add_argument("--sample-secs", type=float, default=30.0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_model()
    print(environment_line(), flush=True)
    rng = random.Random(0)
    families = [prompts.shared_prefix_family(8, prefix_words=rng.randint(150, 600), tail_words=60, offset=7000 * f)
                for f in range(6)]
    samples: list[tuple[float, float, float, float, float, float]] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        (Path(tmp) / "redis").mkdir()
        redis = start_redis("redis-soak", str(Path(tmp) / "redis"))
        env = clean_env(LMCACHE_REMOTE_URL=redis.url, LMCACHE_MAX_LOCAL_CPU_SIZE=str(args.hot_gb))
        server = VLLMServer(env, name="vllm-soak", log_dir=tmp)
        try:
            server.start()
            stop = threading.Event()
            done = [0]

            def client(i: int) -> None:
                local = random.Random(i)
                while not stop.is_set():
                    family = local.choice(families)
                    prompt = local.choice(family) + f" (variant {local.randint(0, 50)})"
                    try:
                        server.complete(prompt, max_tokens=local.randint(1, 16), timeout=600)
                        done[0] += 1
                    except Exception as exc:  # counted, reported; a soak must not hide failures
                        errors.append(repr(exc))

            start = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                for i in range(args.concurrency):
                    pool.submit(client, i)
                while time.monotonic() - start < args.minutes * 60:
                    time.sleep(args.sample_secs)
                    t = time.monotonic() - start
                    samples.append((t / 60, worker_rss_mb(server.process.pid),
                                    server.metric_value(f"{M}store_hot_bytes"),
                                    server.metric_value(f"{M}store_allocations_total"),
                                    server.metric_value(f"{M}store_frees_total"),
                                    server.metric_value(f"{M}store_live_chunks")))
                    print(f"  {t / 60:5.1f} min: {done[0]} requests, worker RSS {samples[-1][1]:.0f} MB, "
                          f"hot {samples[-1][2] / 1e6:.1f} MB, live chunks {samples[-1][5]:.0f}", flush=True)
                stop.set()
        finally:
            server.stop()
            redis.stop()
    half = samples[len(samples) // 2:]
    growth = (half[-1][1] / half[0][1] - 1) * 100 if len(half) >= 2 else float("nan")
    last = samples[-1]
    checks = [
        ("requests failed", len(errors), len(errors) == 0),
        ("worker RSS growth over the second half (< 5%)", f"{growth:+.1f}%", growth < 5),
        ("hot cache bytes <= budget", f"{last[2] / 1e6:.1f} MB <= {args.hot_gb * 1e3:.0f} MB",
         last[2] <= args.hot_gb * 1e9),
        ("allocations == frees + live", f"{last[3]:.0f} == {last[4]:.0f} + {last[5]:.0f}",
         abs(last[3] - last[4] - last[5]) <= args.concurrency * 8),  # chunks in flight at the sample instant
    ]
    table = markdown_table(["minute", "worker RSS MB", "hot MB", "allocations", "frees", "live"],
                           [[f"{s[0]:.1f}", f"{s[1]:.0f}", f"{s[2] / 1e6:.1f}", f"{s[3]:.0f}", f"{s[4]:.0f}",
                             f"{s[5]:.0f}"] for s in samples])
    verdict = markdown_table(["check", "value", "ok"], [[c, v, "yes" if ok else "NO"] for c, v, ok in checks])
    text = (f"{environment_line()}\n\nSoak: {args.minutes:g} min, concurrency {args.concurrency}, redis, hot cache "
            f"{args.hot_gb} GB, {done[0]} requests\n\n{verdict}\n\n{table}\n")
    print("\n" + text)
    (out / "soak.md").write_text(text)
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
