"""The kernel benchmark and the GPU check script, as far as a machine without a GPU can run them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_quick_cpu_run(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_kernels.py", "--quick", "--device", "cpu", "--shapes", "smollm2",
         "--impl", "cpu", "torch", "--bar", "0.7", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    # two CPU layout cases x two directions for each implementation that could run here, and for
    # the CPU fast path also its two ways to verify a load's checksum (one pass, or xxh3 then copy)
    implementations = {row["implementation"] for row in rows}
    assert "torch" in implementations
    directions = {name: sorted({row["direction"] for row in rows if row["implementation"] == name})
                  for name in implementations}
    assert directions["torch"] == ["gather", "scatter"]
    if "cpu" in implementations:
        assert directions["cpu"] == ["checksum, then scatter", "gather", "scatter", "scatter_verified"]
    assert len(rows) == 2 * sum(len(d) for d in directions.values())
    assert all(row["gbps"] > 0 and row["copy_gbps"] > 0 for row in rows)
    report_md = (out / "results.md").read_text()
    assert "Bar: cpu >= 70%" in report_md and "scatter_verified:" not in report_md.split("Bar:")[1]
    if "cpu" not in implementations:
        assert "did not run" in result.stdout
    pytest.importorskip("matplotlib")
    assert (out / "plot.png").stat().st_size > 1000


def test_bench_kernels_help():
    result = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--device" in result.stdout and "--quick" in result.stdout


def test_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit; this machine has a GPU")
def test_gpu_check_says_no_gpu_and_exits_2(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr


def test_compile_csrc_without_nvcc_fails_clearly(tmp_path):
    """CI runs the real compile (scripts/compile_csrc.sh, ~1-2 min); here: a PATH without nvcc."""
    (tmp_path / "dirname").symlink_to(shutil.which("dirname"))
    env = dict(os.environ, PATH=str(tmp_path), NVCC="")
    result = subprocess.run([shutil.which("bash"), "scripts/compile_csrc.sh"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "nvcc not found" in result.stderr
