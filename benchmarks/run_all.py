"""`make bench`: run every benchmark, each next to its baseline, and rewrite benchmarks/RESULTS.md.

Each benchmark writes its tables (.md) and plots (.png) into benchmarks/results/<name>/; this script
shows a progress line while they run, keeps each one's full log beside its results, and assembles
RESULTS.md from the tables with the command that produced each. A benchmark that fails is reported
in RESULTS.md with the tail of its log (and makes this script exit non-zero); the others still run.

    python benchmarks/run_all.py [--only ttft,chat] [--skip soak] [--quick] [--soak-minutes 30]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from benchmarks._common import environment_line  # noqa: E402


@dataclass(frozen=True)
class Bench:
    name: str
    title: str
    argv: tuple[str, ...]
    quick_argv: tuple[str, ...] = ("--quick",)


BENCHES = (
    Bench("connectors", "Remote connectors vs their raw clients", ("benchmarks/bench_connectors.py",)),
    Bench("kernels", "Gather/scatter kernels vs a plain copy (CPU)",
          ("benchmarks/bench_kernels.py", "--device", "cpu")),
    Bench("cachegen", "CacheGen: size, quality and speed on real SmolLM2 KV", ("benchmarks/bench_cachegen.py",)),
    Bench("cachegen-float32", "CacheGen on float32 KV: the bounds of the end-to-end test",
          ("benchmarks/bench_cachegen_float32.py",)),
    Bench("cachegen-e2e", "CacheGen on vLLM: restart hits through redis, cachegen vs naive",
          ("benchmarks/bench_cachegen.py", "--e2e")),
    Bench("ttft", "Time to first token on vLLM's CPU build",
          ("benchmarks/bench_ttft.py", "--stores", "lm,redis,disk,mooncake,peer", "--lengths", "1000,4000")),
    Bench("load", "A restart load outside vLLM, stage by stage", ("benchmarks/bench_load.py",), ("--runs", "1")),
    Bench("hybrid", "A hybrid (sliding-window) model: KV capacity and TTFT with the connector",
          ("benchmarks/bench_hybrid.py",)),
    Bench("interference", "Decode interference: running streams while hits load, and a frozen store",
          ("benchmarks/bench_interference.py",), ()),
    Bench("chat", "Multi-turn chat workload", ("benchmarks/bench_chat.py",)),
    Bench("soak", "Soak: 30 minutes at concurrency 16", ("benchmarks/soak.py",), ("--minutes", "3")),
)


# Results recorded on machines this command does not run on (the lent GPU), kept as they were.
RECORDED = (("gpu", "Kernels on a GPU (recorded from benchmarks/gpu_check.sh)"),)


def recorded_sections() -> list[str]:
    out = []
    for folder, title in RECORDED:
        parts = [f"## {title}\n"]
        for md in sorted((RESULTS_DIR / folder).glob("*.md")):
            parts.append(md.read_text().strip() + "\n")
        if len(parts) > 1:
            out.append("\n".join(parts))
    return out


def run(bench: Bench, quick: bool, extra: tuple[str, ...], index: int, total: int) -> tuple[int, float, str]:
    out = RESULTS_DIR / bench.name
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, *bench.argv, *(bench.quick_argv if quick else ()), *extra, "--out", str(out)]
    command = " ".join(shlex.quote(a) for a in ["python", *argv[1:]]).replace(str(REPO) + "/", "")
    log_path = out / "log.txt"
    start = time.monotonic()
    done = threading.Event()

    def progress() -> None:
        # A spinner on a terminal; in a log file, one line a minute instead of a wall of \r frames.
        tty = sys.stdout.isatty()
        spinner = "|/-\\"
        i = 0
        while not done.wait(1.0 if tty else 60.0):
            i += 1
            mark = spinner[i % 4] if tty else "."
            line = f"[{index}/{total}] {bench.name:12s} {mark} {time.monotonic() - start:6.0f} s"
            print(f"\r{line}" if tty else line, end="" if tty else "\n", flush=True)

    ticker = threading.Thread(target=progress, daemon=True)
    ticker.start()
    with open(log_path, "w") as log:
        code = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    done.set()
    ticker.join()
    elapsed = time.monotonic() - start
    print(f"{chr(13) if sys.stdout.isatty() else ''}[{index}/{total}] {bench.name:12s} "
          f"{'ok ' if code == 0 else 'FAILED'} {elapsed:6.0f} s", flush=True)
    return code, elapsed, command


def section(bench: Bench, code: int, elapsed: float, command: str) -> str:
    out = RESULTS_DIR / bench.name
    parts = [f"## {bench.title}\n", f"Command: `{command}` ({elapsed:.0f} s)\n"]
    if code != 0:
        tail = "\n".join((out / "log.txt").read_text(errors="replace").splitlines()[-30:])
        parts.append(f"**This benchmark failed (exit {code}).** End of its log:\n\n```\n{tail}\n```\n")
    for md in sorted(out.glob("*.md")):
        parts.append(md.read_text().strip() + "\n")
    for png in sorted(out.glob("*.png")):
        parts.append(f"![{bench.name}: {png.stem}](results/{bench.name}/{png.name})\n")
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated benchmark names to run")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick mode (a smoke run)")
    parser.add_argument("--soak-minutes", type=float, default=None, help="override the soak's length")
    args = parser.parse_args()
    only = {x for x in args.only.split(",") if x}
    skip = {x for x in args.skip.split(",") if x}
    benches = [b for b in BENCHES if (not only or b.name in only) and b.name not in skip]
    print(environment_line(), flush=True)
    sections = []
    failed = []
    for i, bench in enumerate(benches, 1):
        extra = ("--minutes", str(args.soak_minutes)) if bench.name == "soak" and args.soak_minutes else ()
        code, elapsed, command = run(bench, args.quick, extra, i, len(benches))
        sections.append(section(bench, code, elapsed, command))
        if code != 0:
            failed.append(bench.name)
    header = ("# Benchmark results\n\nWritten by `make bench` (`python benchmarks/run_all.py`); every figure below "
              "comes from the command printed above it, run on the machine named in its own header, with its "
              f"baseline measured in the same run.\n\n```\n{environment_line()}\n```\n")
    results_md = REPO / "benchmarks" / "RESULTS.md"
    if only or skip:
        # A partial run replaces only its own sections of an existing RESULTS.md.
        existing = results_md.read_text() if results_md.exists() else header
        for bench, text in zip(benches, sections, strict=True):
            marker = f"## {bench.title}\n"
            if marker in existing:
                before, rest = existing.split(marker, 1)
                after = rest.split("\n## ", 1)[1] if "\n## " in rest else ""
                existing = before + text + ("\n## " + after if after else "")
            else:  # a new section goes before the recorded ones, which stay last
                recorded_at = [existing.index(f"## {title}\n") for _, title in RECORDED if f"## {title}\n" in existing]
                cut = min(recorded_at, default=len(existing))
                existing = existing[:cut].rstrip("\n") + "\n\n" + text + "\n" + existing[cut:]
        for recorded in recorded_sections():
            if recorded.splitlines()[0] + "\n" not in existing:
                existing += "\n" + recorded
        results_md.write_text(existing)
    else:
        results_md.write_text(header + "\n" + "\n".join(sections + recorded_sections()))
    print(f"wrote {results_md}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
