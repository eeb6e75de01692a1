"""Shared helpers for the benchmarks: timing, percentiles, tables, PNG plots, the machine line.

Figures taken on a shared machine are noisy: report best-of-N throughput and say where they came from.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1e9


@dataclass
class Samples:
    """Per-call latencies (seconds) and the bytes / items one call moved."""

    seconds: list[float] = field(default_factory=list)

    def add(self, secs: float) -> None:
        self.seconds.append(secs)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile, ``q`` in 0..100 (NaN when empty)."""
        if not self.seconds:
            return float("nan")
        ordered = sorted(self.seconds)
        rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
        return ordered[rank]

    @property
    def p50_ms(self) -> float:
        return self.percentile(50) * 1e3

    @property
    def p99_ms(self) -> float:
        return self.percentile(99) * 1e3

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def vector_isa() -> str:
    """The widest SIMD extensions the CPU reports: bf16 prefill is ~4x slower without avx512_bf16/amx."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return "unknown ISA"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    have = [f for f in wanted if f in flags]
    return "+".join(have) if have else "no AVX2"


def add_engine_env_option(parser: Any) -> None:
    """``--engine-env KEY=VALUE`` (repeatable): set for every vLLM the benchmark starts, e.g.
    VLLM_CPU_OMP_THREADS_BIND=auto (vLLM's default; the testbed's is nobind) or LMCACHE_THREAD_CPUS."""
    parser.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for every vLLM started (repeatable), e.g. VLLM_CPU_OMP_THREADS_BIND=auto")


def apply_engine_env(pairs: Sequence[str]) -> None:
    from testbed.vllm_process import ENGINE_ENV

    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-env {pair!r}: give KEY=VALUE")
        ENGINE_ENV[key] = value


def environment_line() -> str:
    """The command line and the machine, printed at the top of every benchmark output (and, for
    the benchmarks that start vLLM, how its threads are bound)."""
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    # glibc malloc settings change large-buffer costs a lot here (page faults): record them.
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    return (
        f"command: {command}\n"
        f"machine: {os.cpu_count()} cores, {cpu_model()} ({vector_isa()}), {platform.machine()}, "
        f"Python {platform.python_version()}, "
        f"load average {load} (at start), {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
        + (f"\nmalloc: {malloc}" if malloc else "")
        + (f"\nengines: {_engine_env_line()}" if "testbed.vllm_process" in sys.modules else "")
    )


def _engine_env_line() -> str:
    from testbed.vllm_process import engine_env_line

    return engine_env_line()


def fmt(value: float | str | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value != value:  # NaN
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def save_bar_plot(path: Path, title: str, groups: Sequence[str], series: dict[str, Sequence[float]],
                  ylabel: str, subplot_titles: Sequence[str] | None = None,
                  split: Sequence[Sequence[int]] | None = None) -> Path:
    """Grouped bars (one colour per series) saved as PNG with the Agg back end (no display needed).

    ``split`` puts subsets of the groups into side-by-side panels (e.g. one per chunk size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(split) if split else [list(range(len(groups)))]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 0.9 * len(groups) + 3), 4.8), squeeze=False)
    width = 0.8 / max(1, len(series))
    for p, indexes in enumerate(panels):
        ax = axes[0][p]
        for s, (label, values) in enumerate(series.items()):
            xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(indexes))]
            ys = [values[i] if values[i] == values[i] else 0.0 for i in indexes]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(indexes)))
        ax.set_xticklabels([groups[i] for i in indexes], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        if subplot_titles:
            ax.set_title(subplot_titles[p], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
