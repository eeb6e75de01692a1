#!/usr/bin/env bash
# Compile-only check of every csrc/*.cu against torch's headers (CI: a broken CUDA source fails here).
# Needs nvcc and a torch whose include/ has the ATen/c10 CUDA headers (the CPU wheel ships them);
# produces no usable extension and runs nothing. Usage: scripts/compile_csrc.sh [--arch sm_XX]...
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" ]]; then
  echo "compile_csrc: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
ARCHS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --arch) ARCHS+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "compile_csrc: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ ${#ARCHS[@]} -gt 0 ]] || ARCHS=(sm_90)

mapfile -t FLAGS < <("$PYTHON" - <<'PY'
import sysconfig
import torch
from torch.utils import cpp_extension

for path in cpp_extension.include_paths():
    print(f"-I{path}")
print(f"-I{sysconfig.get_paths()['include']}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
PY
)
# A CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated at torch's build; it only sets
# export macros), so skip it there. A CUDA wheel has it and needs nothing extra.
EXTRA=()
TORCH_INCLUDE=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
if [[ ! -f "$TORCH_INCLUDE/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  EXTRA+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
GENCODE=()
for arch in "${ARCHS[@]}"; do
  GENCODE+=("-gencode=arch=compute_${arch#sm_},code=${arch}")
done

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
status=0
shopt -s nullglob
sources=(csrc/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "compile_csrc: no csrc/*.cu files" >&2
  exit 1
fi
for source in "${sources[@]}"; do
  start=$(date +%s)
  if timeout 600 "$NVCC" -c "$source" -o "$OUT/$(basename "$source").o" -std=c++20 -O3 "${GENCODE[@]}" \
      --expt-relaxed-constexpr -Xcompiler -fPIC -DTORCH_EXTENSION_NAME=compile_check \
      -DTORCH_API_INCLUDE_EXTENSION_H "${FLAGS[@]}" "${EXTRA[@]}"; then
    echo "compile_csrc: OK   $source ($(( $(date +%s) - start )) s, ${ARCHS[*]})"
  else
    echo "compile_csrc: FAIL $source" >&2
    status=1
  fi
done
exit $status
