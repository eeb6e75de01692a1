#!/usr/bin/env python
"""Gather/scatter bandwidth of every KV copier next to a plain contiguous copy of the same bytes.

For each model shape (SmolLM2-135M: 30 layers, 3 KV heads, head 64; Llama-8B: 32 layers, 8 KV heads,
head 128; bf16, 256-token chunks) and each cache layout case, it times gather (cache -> chunk) and
scatter (chunk -> cache) of every implementation that runs on the device, and a contiguous copy of
the same number of bytes in the same run. For the CPU fast path it also times a load's two ways to
verify the payload checksum: xxh3 of the slabs on one thread, then the scatter; and
``scatter_verified``, which hashes each slab on the copy threads as it copies it. Chunks rotate
over a cache larger than the last-level cache; the copier and the plain copy are timed
alternately, and each figure is the best of several trials (the machine may be shared: best-of is
the least disturbed estimate). On CUDA it also reports GB/s of GPU busy time (profiler), free of
host overhead. Writes a table (stdout and results.md),
results.json and a PNG plot.

    python benchmarks/bench_kernels.py --quick --device cpu --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_kvcache_plugin.kernels import PagedKVSpec, allocate_paged_layers, available_copiers
from vllm_kvcache_plugin.serde.header import payload_checksum

SHAPES = {"smollm2": (30, 3, 64), "llama8b": (32, 8, 128)}
CHUNK_TOKENS = 256
# (layout, block size, packing, chunk memory): vLLM's CPU attention case, the GPU FlashAttention
# default, and a head-major GPU layout; on CUDA also the gather straight into pinned host memory.
CPU_CASES = [("LBHNC", 128, "cpu_vec", "cpu"), ("LBNHC", 16, "plain", "cpu")]
CUDA_CASES = [("LBNHC", 16, "plain", "cuda"), ("LBHNC", 16, "plain", "cuda"), ("LBNHC", 16, "plain", "pinned")]


@dataclass
class Row:
    shape: str
    layout: str
    block_size: int
    packing: str
    chunk_memory: str
    implementation: str
    direction: str
    mbytes: float
    gbps: float
    copy_gbps: float
    device_gbps: float = 0.0  # CUDA only: bytes / GPU busy time (profiler), without host overhead
    copy_device_gbps: float = 0.0

    @property
    def ratio(self) -> float:
        return self.gbps / self.copy_gbps if self.copy_gbps else 0.0

    @property
    def device_ratio(self) -> float:
        return self.device_gbps / self.copy_device_gbps if self.copy_device_gbps else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_seconds(step, device: torch.device, iterations: int, first: int) -> float:
    start = time.perf_counter()
    for i in range(iterations):
        step(first + i)
    _sync(device)
    return (time.perf_counter() - start) / iterations


def paired_best_seconds(step, baseline, device: torch.device, iterations: int, baseline_iterations: int,
                        trials: int) -> tuple[float, float]:
    """Best mean time per call of ``step`` and of ``baseline``, timed alternately in each trial so
    both see the same machine load (call i gets index i: the chunks rotate)."""
    for warm in (step, baseline):
        warm(0)
    _sync(device)
    best, best_baseline = float("inf"), float("inf")
    for trial in range(trials):
        best_baseline = min(best_baseline, _mean_seconds(baseline, device, baseline_iterations, 1 + trial * 1000))
        best = min(best, _mean_seconds(step, device, iterations, 1 + trial * 1000))
    return best, best_baseline


def device_seconds(step, iterations: int) -> float:
    """GPU busy time per call (kernels and copies, as the profiler sees them): no host overhead."""
    from torch.profiler import ProfilerActivity, profile

    step(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for i in range(iterations):
            step(i + 1)
        torch.cuda.synchronize()
    busy_us = sum(event.self_device_time_total for event in profiler.key_averages())
    return busy_us / 1e6 / iterations if busy_us else float("nan")


def run_case(shape: str, case: tuple, device: torch.device, implementations: list[str],
             iterations: int, trials: int) -> list[Row]:
    num_layers, heads, head_size = SHAPES[shape]
    layout, block_size, packing, chunk_memory = case
    spec = PagedKVSpec("mha", block_size, heads, head_size, torch.bfloat16, packing)
    chunk_bytes = 2 * num_layers * CHUNK_TOKENS * heads * head_size * 2
    llc = 64 << 20 if device.type == "cpu" else 128 << 20
    rotation = max(4, -(-llc // chunk_bytes))
    blocks_per_chunk = CHUNK_TOKENS // block_size
    layers = allocate_paged_layers(spec, layout, num_layers, rotation * blocks_per_chunk, device=device)
    torch.empty(0, dtype=torch.uint8, device=device).set_(layers[0].untyped_storage()).random_(0, 256)
    host = chunk_memory == "pinned"
    chunk_device = torch.device("cpu") if host else device
    chunks = [torch.ones(spec.chunk_shape(num_layers, CHUNK_TOKENS), dtype=spec.dtype, device=chunk_device,
                         pin_memory=host) for _ in range(rotation)]
    generator = torch.Generator().manual_seed(0)
    slot_sets = []
    for index in range(rotation):  # each chunk's blocks in a shuffled order, as a real block table has
        blocks = index * blocks_per_chunk + torch.randperm(blocks_per_chunk, generator=generator)
        # Slots stay on the host, as the connector builds them: their range check then costs no device sync.
        slot_sets.append((blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1))
    sources = torch.ones(rotation, chunk_bytes // 2, dtype=spec.dtype, device=device)
    slab_bytes = chunk_bytes // (2 * num_layers)  # the naive checksum's segment

    def plain_copy(i: int) -> None:
        chunks[i % rotation].view(-1).copy_(sources[(i + 1) % rotation], non_blocking=host)

    def plain_copy_back(i: int) -> None:
        sources[(i + 1) % rotation].copy_(chunks[i % rotation].view(-1), non_blocking=host)

    on_gpu = device.type == "cuda"
    copy_in_dev = chunk_bytes / device_seconds(plain_copy, iterations) / 1e9 if on_gpu else 0.0
    copy_out_dev = chunk_bytes / device_seconds(plain_copy_back, iterations) / 1e9 if on_gpu else 0.0
    found = available_copiers(spec, device)
    rows = []
    for name in implementations:
        copier = found.get(name)
        if isinstance(copier, str) or copier is None:
            continue
        reps = iterations if name != "torch" else max(2, iterations // 5)

        def gather(i: int, copier=copier) -> None:
            copier.gather(layers, spec, slot_sets[i % rotation], chunks[i % rotation])

        def scatter(i: int, copier=copier) -> None:
            copier.scatter(layers, spec, slot_sets[i % rotation], chunks[i % rotation])

        def check_then_scatter(i: int, copier=copier) -> None:
            chunk = chunks[i % rotation]
            payload_checksum(chunk.view(-1).view(torch.uint8).cpu().numpy(), slab_bytes)
            copier.scatter(layers, spec, slot_sets[i % rotation], chunk)

        def scatter_verified(i: int, copier=copier) -> None:
            copier.scatter_verified(layers, spec, slot_sets[i % rotation], chunks[i % rotation])

        directions = [("gather", gather, plain_copy, copy_in_dev), ("scatter", scatter, plain_copy_back, copy_out_dev)]
        if not on_gpu and copier.scatter_verified(layers, spec, slot_sets[0], chunks[0]) is not None:
            # A load's two ways to verify the naive checksum (serde/header.py) and scatter.
            directions += [("checksum, then scatter", check_then_scatter, plain_copy_back, 0.0),
                           ("scatter_verified", scatter_verified, plain_copy_back, 0.0)]
        for direction, step, baseline, baseline_dev in directions:
            seconds, copy_seconds = paired_best_seconds(step, baseline, device, reps, iterations, trials)
            device_gbps = chunk_bytes / device_seconds(step, reps) / 1e9 if on_gpu else 0.0
            rows.append(Row(shape, layout, block_size, packing, chunk_memory, name, direction, chunk_bytes / 1e6,
                            chunk_bytes / seconds / 1e9, chunk_bytes / copy_seconds / 1e9, device_gbps, baseline_dev))
    return rows


def format_table(rows: list[Row]) -> str:
    """Wall-clock GB/s per call (host overhead included); on CUDA also GB/s of GPU busy time."""
    gpu = any(r.copy_device_gbps for r in rows)
    head = "| shape | layout | N | packing | chunk in | impl | dir | MB | GB/s | copy GB/s | % of copy |"
    rule = "|---|---|---|---|---|---|---|---|---|---|---|"
    if gpu:
        head += " device GB/s | copy device GB/s | % (device) |"
        rule += "---|---|---|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r.shape} | {r.layout} | {r.block_size} | {r.packing} | {r.chunk_memory} | "
                f"{r.implementation} | {r.direction} | {r.mbytes:.1f} | {r.gbps:.2f} | {r.copy_gbps:.2f} | "
                f"{100 * r.ratio:.0f}% |")
        if gpu:
            line += f" {r.device_gbps:.1f} | {r.copy_device_gbps:.1f} | {100 * r.device_ratio:.0f}% |"
        lines.append(line)
    return "\n".join(lines)


def bar_verdicts(rows: list[Row], fast: str, bar: float) -> str:
    """One line per timed case of the fast implementation: its share of copy bandwidth vs the bar."""
    lines = [f"Bar: {fast} >= {100 * bar:.0f}% of a contiguous copy of the same bytes"
             + (" (GPU busy time)" if any(r.copy_device_gbps for r in rows) else "")]
    for r in rows:
        if r.implementation != fast or r.direction not in ("gather", "scatter"):
            continue  # the checksum rows compare two ways to verify, not the copy against memcpy
        # On CUDA the bar is about the kernel: GPU busy time against the copy's (host overhead apart).
        ratio, gbps, copy = ((r.device_ratio, r.device_gbps, r.copy_device_gbps) if r.copy_device_gbps
                             else (r.ratio, r.gbps, r.copy_gbps))
        verdict = "ok  " if ratio >= bar else "MISS"
        lines.append(f"- {verdict} {r.shape} {r.layout}/{r.block_size}/{r.packing} -> {r.chunk_memory} "
                     f"{r.direction}: {100 * ratio:.0f}% ({gbps:.1f} of {copy:.1f} GB/s; wall {100 * r.ratio:.0f}%)")
    if len(lines) == 1:
        lines.append(f"- no rows for {fast}: it did not run")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str, bar: float | None = None) -> bool:
    """Share of contiguous-copy bandwidth per case (scale-free: host and device cases side by side)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    labels = [f"{r.shape} {r.layout}/{r.block_size}/{r.packing}\n->{r.chunk_memory} {r.direction} [{r.implementation}]"
              for r in rows]
    device = any(r.copy_device_gbps for r in rows)
    figure, axis = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 5.5))
    positions = list(range(len(rows)))
    width = 0.4 if device else 0.8
    axis.bar([p - width / 2 if device else p for p in positions], [100 * r.ratio for r in rows], width=width,
             label="wall clock per call")
    if device:
        axis.bar([p + width / 2 for p in positions], [100 * r.device_ratio for r in rows], width=width,
                 label="GPU busy time")
    if bar is not None:
        axis.axhline(100 * bar, color="red", linestyle="--", linewidth=1, label=f"bar {100 * bar:.0f}%")
    axis.set_xticks(positions, labels, fontsize=6, rotation=90)
    axis.set_ylabel("% of a contiguous copy of the same bytes")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer iterations and trials (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md, results.json, plot.png")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--impl", nargs="+", default=None, help="implementations to time (default: all available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--bar", type=float, default=None,
                        help="report whether the fast path reaches this fraction of copy bandwidth (e.g. 0.7)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = CPU_CASES if device.type == "cpu" else CUDA_CASES
    implementations = args.impl or (["cpu", "torch"] if device.type == "cpu" else ["cuda", "triton", "torch"])
    iterations, trials = (3, 2) if args.quick else (20, 5)
    if device.type == "cuda":
        iterations, trials = (10, 3) if args.quick else (50, 5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# KV copy bandwidth on {name} (torch {torch.__version__}, load avg "
          f"{os.getloadavg()[0]:.1f}); best of {trials} x {iterations} calls", flush=True)
    rows: list[Row] = []
    for shape in args.shapes:
        for case in cases:
            rows.extend(run_case(shape, case, device, implementations, iterations, trials))
            print(f"done: {shape} {case}", flush=True)
    table = format_table(rows)
    if args.bar is not None:
        table += "\n\n" + bar_verdicts(rows, "cuda" if device.type == "cuda" else "cpu", args.bar)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(f"KV copy bandwidth on {name}\n\n{table}\n")
        (args.out / "results.json").write_text(json.dumps(
            {"device": name, "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}, indent=1))
        plot(rows, args.out / "plot.png", f"KV gather/scatter vs contiguous copy ({name})", args.bar)
    return 0


if __name__ == "__main__":
    sys.exit(main())
