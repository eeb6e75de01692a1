"""CacheGen on float32 KV: the size ratio and first-token logprob gap that tests/test_e2e_cachegen.py bounds.

    python benchmarks/bench_cachegen_float32.py [--quick] [--out DIR]

The end-to-end test runs vLLM in float32, where a lossless hit reproduces the cold run token for
token on every CPU (bf16 arithmetic differs between AVX2, AVX-512 BF16 and AMX, and with it which
near-ties a hit flips). Its two numeric bounds come from this script, on real SmolLM2-135M KV
(transformers, float32 throughout, prompts cut from the licence texts as in bench_cachegen.py):

* ratio: naive bytes (64-byte header + float32 payload per chunk) / CacheGen bytes, default bins;
* first-token logprob gap: for each prompt, |log p(t)| with the original KV minus the same with the
  KV restored by CacheGen, where t is the greedy first token of the original (what the test reads
  from vLLM's `logprobs=20` of the warm run). Also how often t stays the greedy token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import environment_line, fmt, markdown_table  # noqa: E402
from benchmarks.cachegen_kv import cache_to_canonical, canonical_to_cache, load_model, natural_text, roundtrip  # noqa: E402
from vllm_kvcache_plugin.serde.cachegen import codec  # noqa: E402

HEADER_BYTES = 64


def first_logprobs(model, ids: torch.Tensor, prefix_kv: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the token after ``ids`` with the KV of ``ids[:-1]`` given as ``prefix_kv``."""
    with torch.no_grad():
        logits = model(ids[:, -1:], past_key_values=canonical_to_cache(prefix_kv), use_cache=True).logits
    return logits[0, -1].float().log_softmax(-1)


def measure(model, tokenizer, text: str, n_prompts: int, span: int, coder) -> dict:
    words = text.split()
    settings = codec.EncodeSettings()
    gaps, same_top, naive_bytes, stored_bytes, tokens = [], 0, 0, 0, 0
    for i in range(n_prompts):
        ids = tokenizer(" ".join(words[i * span:(i + 1) * span]), return_tensors="pt").input_ids
        with torch.no_grad():
            prefix = cache_to_canonical(model(ids[:, :-1], use_cache=True).past_key_values, torch.float32)
        restored, nbytes = roundtrip(prefix, settings, coder, 256)
        chunks = -(-prefix.shape[2] // 256)
        naive_bytes += prefix.numel() * 4 + HEADER_BYTES * chunks
        stored_bytes += nbytes
        tokens += ids.shape[1]

        original, after = (first_logprobs(model, ids, kv) for kv in (prefix, restored))
        token = int(original.argmax())
        gaps.append(abs(float(original[token] - after[token])))
        same_top += int(after.argmax()) == token
    ordered = sorted(gaps)
    return {"prompts": n_prompts, "mean_tokens": tokens / n_prompts, "ratio": naive_bytes / stored_bytes,
            "gap_mean": statistics.mean(gaps), "gap_p90": ordered[int(0.9 * (len(ordered) - 1))],
            "gap_max": ordered[-1], "same_first_token": same_top, "gaps": gaps}


def save_plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.hist(result["gaps"], bins=20, color="C0")
    ax.axvline(result["gap_max"], color="k", linestyle=":", label=f"max {result['gap_max']:.3f}")
    ax.axvline(2 * result["gap_max"], color="r", linestyle="--", label="test bound: 2 x max")
    ax.set(xlabel="|first-token logprob change| after a CacheGen round trip (nats)", ylabel="prompts",
           title=f"float32 KV, default bins, ratio {result['ratio']:.2f}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "cachegen_float32.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="6 prompts instead of 20")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "cachegen-float32")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no model at {args.model}: python scripts/build_model.py --out {args.model}")
    from vllm_kvcache_plugin.serde.cachegen.rans_cpp import CppCoder, load_library

    lines = [environment_line()]
    tokenizer, model = load_model(args.model)
    text, _ = natural_text()
    result = measure(model, tokenizer, text, 6 if args.quick else 20, 330, CppCoder(load_library(), 2))
    row = [result["prompts"], fmt(result["mean_tokens"], 0), fmt(result["ratio"]), fmt(result["gap_mean"], 3),
           fmt(result["gap_p90"], 3), fmt(result["gap_max"], 3), f"{result['same_first_token']}/{result['prompts']}"]
    lines += ["", "## CacheGen on float32 KV, default bins (the bounds of tests/test_e2e_cachegen.py)", "",
              markdown_table(["prompts", "mean tokens", "ratio vs naive float32", "logprob gap mean", "p90", "max",
                              "same greedy first token"], [row])]
    report = "\n".join(lines)
    print(report)
    (args.out / "cachegen_float32.md").write_text(report.replace("\n## ", "\n### ") + "\n")
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    save_plot(result, args.out)
    print(f"\nplot: {args.out / 'cachegen_float32.png'}\nresults: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
