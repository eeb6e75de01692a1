"""A hybrid (sliding-window) model on vLLM's CPU build: KV capacity and TTFT without and with the connector.

A connector without vLLM's SupportsHMA makes vLLM turn its hybrid KV-cache manager off, and a
sliding-window model then keeps every block of its sliding layers: fewer tokens fit in the same
KV memory. This measures what the connector costs such a model and what its hits give, on the tiny
random Gemma3 (5 sliding layers, window 128, + 1 full; float32; testbed/tiny_models.py), lm:// store:

* KV cache capacity in tokens, as vLLM logs it at start-up, without and with the connector;
* TTFT (streamed, max_tokens=1) of ~4k-token prompts: cold, vLLM's own prefix-cache hit (the same
  prompt again in the same instance) and, with the connector, the restart hit (a fresh vLLM, same
  store). Each of ``--reps`` distinct prompts is measured once per column; the table gives medians.

    python benchmarks/bench_hybrid.py [--tokens 4000] [--reps 3] [--quick] [--out DIR]

The without-connector half runs first, so its figures come out even if the connector's half fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import environment_line, fmt, markdown_table  # noqa: E402
from testbed import prompts  # noqa: E402
from testbed.events import requests  # noqa: E402
from testbed.lm_server import LMServerProcess  # noqa: E402
from testbed.processes import free_port  # noqa: E402
from testbed.tiny_models import gemma3_tiny  # noqa: E402
from testbed.vllm_process import VLLMServer, clean_env  # noqa: E402

MODEL_DIR = REPO / "models" / "gemma3-tiny"


@dataclass
class EngineRun:
    name: str
    capacity: int | None = None
    hma_off: bool | None = None
    cold: list[float] = field(default_factory=list)
    prefix_hit: list[float] = field(default_factory=list)
    restart_hit: list[float] = field(default_factory=list)
    loaded: list[int] = field(default_factory=list)  # tokens each restart hit loaded (its request event)
    error: str = ""


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def make_prompts(server: VLLMServer, tokens: int, count: int) -> list[list[int]]:
    """``count`` token-id prompts of exactly ``tokens`` tokens, from distinct parts of the corpus."""
    out = []
    for i in range(count):
        ids = server.tokenize(prompts.text(int(tokens * 0.9) + 50, offset=20000 + 7000 * i))
        while len(ids) < tokens:
            ids += ids
        out.append(ids[:tokens])
    return out


def engine(name: str, env: dict[str, str], workdir: Path, connector: bool) -> VLLMServer:
    return VLLMServer(env, dtype="float32", model=MODEL_DIR, name=name, log_dir=str(workdir), connector=connector)


def warm_up(server: VLLMServer) -> None:
    """One short request first, so no measured request pays a fresh engine's one-time costs."""
    server.ttft(server.tokenize(prompts.text(40, offset=7)), max_tokens=1)


def cold_and_prefix_hit(run: EngineRun, server: VLLMServer, prompt_ids: list[list[int]]) -> None:
    run.capacity, run.hma_off = server.kv_cache_tokens(), server.hybrid_manager_turned_off()
    warm_up(server)
    for i, ids in enumerate(prompt_ids):
        run.cold.append(server.ttft(ids).ttft)
        run.prefix_hit.append(server.ttft(ids).ttft)
        print(f"  {run.name}: prompt {i}: cold {run.cold[-1]:.3f}s, vLLM prefix hit {run.prefix_hit[-1]:.3f}s",
              flush=True)


def measure(tokens: int, reps: int, workdir: Path) -> tuple[EngineRun, EngineRun]:
    alone, with_connector = EngineRun("vLLM alone"), EngineRun("with the connector")
    with engine("vllm-hybrid-alone", clean_env(), workdir, connector=False) as server:
        prompt_ids = make_prompts(server, tokens, reps)
        cold_and_prefix_hit(alone, server, prompt_ids)
    store = LMServerProcess(free_port(), ("--max-size-gb", "4")).start()
    env = clean_env(LMCACHE_REMOTE_URL=store.url, LMCACHE_LOCAL_CPU="False")
    try:
        with engine("vllm-hybrid-cold", env, workdir, connector=True) as server:
            cold_and_prefix_hit(with_connector, server, prompt_ids)
        with engine("vllm-hybrid-restart", env, workdir, connector=True) as server:
            warm_up(server)
            for i, ids in enumerate(prompt_ids):  # each prompt once: its first ask is the store's hit
                result = server.ttft(ids)
                events = requests(server.log(), result.id)
                with_connector.restart_hit.append(result.ttft)
                with_connector.loaded.append(events[0]["loaded_tokens"] if events else 0)
                print(f"  restart hit: prompt {i}: {result.ttft:.3f}s, loaded {with_connector.loaded[-1]} tokens",
                      flush=True)
    except Exception:  # the connector's half failed: report it, keep vLLM alone's figures
        with_connector.error = traceback.format_exc(limit=3)
        print(with_connector.error, flush=True)
    finally:
        store.stop()
    return alone, with_connector


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def loaded_range(loaded: list[int]) -> str:
    if not loaded:
        return "-"
    return str(loaded[0]) if min(loaded) == max(loaded) else f"{min(loaded)}-{max(loaded)}"


def report(alone: EngineRun, conn: EngineRun, tokens: int, reps: int) -> str:
    def hma(run: EngineRun) -> str:
        return "-" if run.hma_off is None else ("off" if run.hma_off else "on")

    rows = [[run.name, hma(run), f"{run.capacity:,}" if run.capacity else "-", fmt(median(run.cold), 3),
             fmt(median(run.prefix_hit), 3), fmt(median(run.restart_hit), 3),
             loaded_range(run.loaded)] for run in (alone, conn)]
    table = markdown_table(["engine", "hybrid KV manager", "KV cache tokens", "cold s", "vLLM prefix hit s",
                            "restart hit s", "restart hit loaded tokens"], rows)
    ratios = markdown_table(
        ["capacity with / without", "restart hit / vLLM alone's prefix hit", "cold with / without",
         "cold / restart hit"],
        [[fmt(ratio(conn.capacity, alone.capacity)), fmt(ratio(median(conn.restart_hit), median(alone.prefix_hit))),
          fmt(ratio(median(conn.cold), median(alone.cold))),
          fmt(ratio(median(conn.cold), median(conn.restart_hit)), 1)]])
    text = (f"{environment_line()}\n\nTiny random Gemma3 (5 sliding layers, window 128, + 1 full), float32, "
            f"--enforce-eager, lm:// store; TTFT streamed, max_tokens=1, {tokens}-token prompts, median of {reps} "
            f"distinct prompts; capacity as vLLM logs it (VLLM_CPU_KVCACHE_SPACE=2 GiB)\n\n{table}\n\n{ratios}\n")
    if conn.error:
        text += f"\nThe connector's half failed:\n\n```\n{conn.error.strip()}\n```\n"
    return text


def plot(alone: EngineRun, conn: EngineRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cap_ax, ttft_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    runs = (alone, conn)
    cap_ax.bar([r.name for r in runs], [r.capacity or 0 for r in runs], color=["tab:blue", "tab:orange"])
    cap_ax.set_ylabel("KV cache capacity (tokens)")
    cap_ax.set_title("KV cache capacity", fontsize=10)
    columns = ("cold", "prefix_hit", "restart_hit")
    labels = ("cold", "vLLM prefix hit", "restart hit")
    for s, run in enumerate(runs):
        xs = [i + (s - 0.5) * 0.4 for i in range(len(columns))]
        ttft_ax.bar(xs, [median(getattr(run, c)) or 0 for c in columns], 0.4, label=run.name)
    ttft_ax.set_xticks(range(len(columns)))
    ttft_ax.set_xticklabels(labels)
    ttft_ax.set_yscale("log")
    ttft_ax.set_ylabel("time to first token (s, log)")
    ttft_ax.set_title("TTFT (median)", fontsize=10)
    ttft_ax.legend(fontsize=8)
    for ax in (cap_ax, ttft_ax):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Tiny Gemma3 (sliding window) on vLLM's CPU build, without and with the connector", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4000, help="prompt length in tokens")
    parser.add_argument("--reps", type=int, default=3, help="distinct prompts (each measured once per column)")
    parser.add_argument("--quick", action="store_true", help="one prompt")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"), help="folder for the table and PNG")
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gemma3_tiny(MODEL_DIR)
    print(environment_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-hybrid-") as tmp:
        alone, with_connector = measure(args.tokens, reps, Path(tmp))
    text = report(alone, with_connector, args.tokens, reps)
    print("\n" + text)
    (out_dir / "hybrid.md").write_text(text)
    plot(alone, with_connector, out_dir / "hybrid.png")
    print(f"wrote {out_dir / 'hybrid.md'} and {out_dir / 'hybrid.png'}")
    return 1 if with_connector.error else 0


if __name__ == "__main__":
    sys.exit(main())
