#!/usr/bin/env bash
# One GPU check, for a GPU machine with torch (CUDA), Triton and nvcc but no vLLM and no network.
# Steps: build (the CUDA extension), tests (the GPU correctness tests), bench (every copier against a
# device copy; bar: >= 80%), load (bench_load.py --device cuda: a restart load from lm:// over shared
# memory and TCP and from the disk tier into a GPU cache, pinned against pageable chunk buffers, beside
# one host-to-device copy of the same bytes), cachegen (the CacheGen Triton coder on CUDA). Every step
# runs (with its own time limit) even if an earlier one failed, so one session on a GPU yields all the
# evidence; the exit status is non-zero if any step failed.
# Usage: benchmarks/gpu_check.sh [OUT_DIR]   (default: ./gpu_check_out)
#
# Environment: PYTHON (default python3); GPU_CHECK_STEPS, the steps to run (default all:
# "build tests bench load cachegen"; the others need build first); GPU_CHECK_QUICK=1 for a shorter
# kernel benchmark; GPU_CHECK_SKIP_CACHEGEN=1 to leave out the CacheGen benchmark.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
OUT_DIR=${1:-${GPU_CHECK_OUT:-$ROOT/gpu_check_out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export VLLM_KVCACHE_KERNEL_CACHE=${VLLM_KVCACHE_KERNEL_CACHE:-$OUT_DIR/kernel_cache}
START=$(date +%s)
FAILED=()

banner() { printf '\n=== [%4ss] %s ===\n' "$(( $(date +%s) - START ))" "$*"; }

# run_step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, remember failures.
run_step() {
  local name=$1 limit=$2
  shift 2
  banner "$name (limit ${limit}s)"
  local status=0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log" || status=$?
  if [[ $status -ne 0 ]]; then
    [[ $status -eq 124 ]] && echo "!!! $name timed out after ${limit}s"
    echo "!!! $name failed (exit $status)"
    FAILED+=("$name")
  fi
}

banner "environment"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); nothing to check" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'PY'
import importlib.util
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {torch.cuda.get_device_name()}")
for name in ("triton", "cupy", "vllm"):
    spec = importlib.util.find_spec(name)
    version = getattr(__import__(name), "__version__", "?") if spec else "absent"
    print(f"{name}: {version}")
PY
command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc: not on PATH"

STEPS=" ${GPU_CHECK_STEPS:-build tests bench load cachegen} "
wanted() { [[ "$STEPS" == *" $1 "* ]] || { banner "$1: skipped (not in GPU_CHECK_STEPS)"; return 1; }; }

wanted build && run_step build 240 "$PYTHON" csrc/build.py
wanted tests && run_step tests 180 "$PYTHON" -m pytest --noconftest -p no:cacheprovider -q -rs --maxfail=20 \
  tests/test_kernels_cuda.py tests/test_kernels.py

BENCH_ARGS=(--device cuda --out "$OUT_DIR/bench" --bar 0.8)
[[ "${GPU_CHECK_QUICK:-0}" == 1 ]] && BENCH_ARGS+=(--quick)
wanted bench && run_step bench 150 "$PYTHON" benchmarks/bench_kernels.py "${BENCH_ARGS[@]}"

wanted load && run_step load 200 "$PYTHON" benchmarks/bench_load.py --device cuda --stores lm,lm-tcp,disk \
  --host-memory both --runs 2 --out "$OUT_DIR/load"

if ! wanted cachegen; then
  :
elif [[ "${GPU_CHECK_SKIP_CACHEGEN:-0}" == 1 ]]; then
  banner "cachegen: skipped (GPU_CHECK_SKIP_CACHEGEN=1)"
elif [[ -f benchmarks/bench_cachegen.py ]]; then
  run_step cachegen 120 "$PYTHON" benchmarks/bench_cachegen.py --gpu-only
else
  banner "cachegen: benchmarks/bench_cachegen.py not present, skipped"
fi

banner "summary"
for table in "$OUT_DIR/bench/results.md" "$OUT_DIR/load/load.md"; do
  if [[ -f "$table" ]]; then cat "$table"; fi
done
echo "logs and results: $OUT_DIR"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu_check: FAILED steps: ${FAILED[*]} ($(( $(date +%s) - START )) s)"
  exit 1
fi
echo "gpu_check: all steps passed ($(( $(date +%s) - START )) s)"
