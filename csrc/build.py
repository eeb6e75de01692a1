#!/usr/bin/env python
"""Build the CUDA extension (csrc/kv_copy.cu) ahead of time, where CUDA exists.

The copier builds it on first use anyway; this only moves the compile out of the first request.
On a machine without CUDA it says so and exits 0 (there is nothing to build; the dispatcher will use
the CPU or Triton paths). Usage: python csrc/build.py [--verbose]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("csrc/build.py: no CUDA device here; nothing to build (CPU installs never need nvcc)")
        return 0
    from vllm_kvcache_plugin.kernels.cuda_copy import load_extension

    start = time.monotonic()
    module = load_extension(verbose=args.verbose)
    print(f"csrc/build.py: built {module.__file__} in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
