"""CacheGen serde: size, error, speed and model quality on real SmolLM2-135M KV.

    python benchmarks/bench_cachegen.py [--quick] [--out DIR]   # codec + transformers quality, CPU
    python benchmarks/bench_cachegen.py --speed                 # the CPU speed tables only (~2 min)
    python benchmarks/bench_cachegen.py --gpu-only              # Triton on CUDA, synthetic KV, no transformers
    python benchmarks/bench_cachegen.py --e2e                   # vLLM restart hits through redis (~20 min):
                                                                # naive, cachegen, cachegen 256/96 bins

Real KV: the model (scripts/build_model.py) run by transformers over the licence texts in
/usr/share/common-licenses (pydoc_data's topics where those are missing). The forward runs in float32
(bf16 matmuls are ~4x slower on this CPU) from the bf16 weights, and the KV is rounded to bf16: the
values vLLM's bf16 cache would hold, up to rounding. Figures taken on the shared 2-core machine are
provisional (other jobs load it); CPU-time throughput is printed beside wall-clock throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import environment_line, fmt, markdown_table  # noqa: E402
from benchmarks.cachegen_kv import (  # noqa: E402
    cache_to_canonical,
    canonical_to_cache,
    load_model,
    natural_text,
    real_kv,
    rel_l2,
    roundtrip,
)
from vllm_kvcache_plugin.memory import Allocator  # noqa: E402
from vllm_kvcache_plugin.serde.cachegen import codec  # noqa: E402
from vllm_kvcache_plugin.serde.cachegen import format as wire  # noqa: E402
from vllm_kvcache_plugin.serde.cachegen.quant import steps_from_bits  # noqa: E402
from vllm_kvcache_plugin.serde.naive import NaiveSerde  # noqa: E402

DEFAULT = "default (64 / 24)"
CONFIGS = {  # name -> settings (bins "K / V"; every chunk's first token exact unless "no sink")
    DEFAULT: codec.EncodeSettings(),
    "default, no sink": codec.EncodeSettings(exact_tokens=0),
    "lmcache bins (32:10,16 / 32:2,16)": codec.EncodeSettings("32:10,16", "32:2,16"),
    "lmcache bins, no sink": codec.EncodeSettings("32:10,16", "32:2,16", exact_tokens=0),
    "32 / 32": codec.EncodeSettings("32", "32"),
    "48 / 32": codec.EncodeSettings("48", "32"),
    "64 / 16": codec.EncodeSettings("64", "16"),
    "96 / 24": codec.EncodeSettings("96", "24"),
    "128 / 48": codec.EncodeSettings("128", "48"),
    "256 / 96": codec.EncodeSettings("256", "96"),
}
# The finer rows trace how far the bins must go before greedy continuations stop changing.
QUALITY_CONFIGS = (DEFAULT, "default, no sink", "lmcache bins (32:10,16 / 32:2,16)", "32 / 32",
                   "64 / 16", "96 / 24", "128 / 48", "256 / 96")
LMCACHE = {"ratio": 3.5, "rel_k": 0.21, "rel_v": 0.15, "mb_s": 10.0}  # 0.5.6 on this machine (ENVIRONMENT.md)


def half_step_excess(kv: torch.Tensor, settings, coder) -> float:
    """max |error| / (half a step of its token's scale), one 256-token chunk (<= 1 + bf16 rounding)."""
    part = kv[:, :, :256].contiguous()
    payload = codec.encode(part, settings, coder)
    planes, layers, tokens, heads, size = part.shape
    stream = wire.parse(payload, planes, layers, tokens, heads * size, part.element_size())
    step = steps_from_bits(torch.from_numpy(stream.scale_bits.astype(np.int32)),
                           torch.from_numpy(stream.half.astype(np.int64)))
    restored = torch.empty_like(part)
    codec.decode(payload, part.shape, restored, coder)
    err = (restored.float() - part.float()).reshape(planes * layers, tokens, -1).abs()
    return (err / (step[..., None] / 2).clamp_min(1e-30)).max().item()


def section_bits(kv: torch.Tensor, settings, coder) -> dict[str, float]:
    """Bits per element of each payload section, one 256-token chunk."""
    part = kv[:, :, :256].contiguous()
    planes, layers, tokens, heads, size = part.shape
    stream = wire.parse(codec.encode(part, settings, coder), planes, layers, tokens, heads * size, 2)
    n = part.numel()
    return {"scales": stream.scale_bits.nbytes * 8 / n, "tables": stream.table_rows.nbytes * 8 / n,
            "states": stream.coded.states.nbytes * 8 / n, "streams": stream.coded.words.nbytes * 8 / n}


def size_quality_tables(kv, coder, quick: bool) -> dict:
    results: dict = {"configs": {}, "chunks": {}, "locality": {}}
    rows = []
    for name, settings in CONFIGS.items():
        restored, nbytes = roundtrip(kv, settings, coder, 256)
        r = {"ratio": kv.numel() * 2 / nbytes, "rel_k": rel_l2(restored[0], kv[0]), "rel_v": rel_l2(restored[1], kv[1]),
             "bits": nbytes * 8 / kv.numel(), "half_step_max": half_step_excess(kv, settings, coder)}
        results["configs"][name] = r
        rows.append([name, fmt(r["ratio"]), fmt(r["bits"], 3), fmt(r["rel_k"], 4), fmt(r["rel_v"], 4),
                     fmt(r["half_step_max"], 3)])
    rows.append(["LMCache 0.5.6 (measured here)", fmt(LMCACHE["ratio"]), fmt(16 / LMCACHE["ratio"], 3),
                 fmt(LMCACHE["rel_k"]), fmt(LMCACHE["rel_v"]), "-"])
    print("\n## Size and error at chunk 256 (ratio = bf16 bytes / stored bytes incl. 64-byte header)\n")
    print(markdown_table(["bins (K / V)", "ratio", "bits/elem", "rel L2 K", "rel L2 V", "max err / half step"], rows))
    print("(max err / half step: 1 + bf16 output rounding at most; exact tokens count as 0)")
    default = codec.EncodeSettings()
    bits = section_bits(kv, default, coder)
    results["sections"] = bits
    print("\nDefault bins, bits per element by section: " + ", ".join(f"{k} {v:.3f}" for k, v in bits.items()))
    rows = []
    for chunk in (256, 512, 1024) if quick else (256, 512, 1024, 2048):
        if chunk > kv.shape[2]:
            continue
        _, nbytes = roundtrip(kv, default, coder, chunk)
        results["chunks"][chunk] = kv.numel() * 2 / nbytes
        rows.append([chunk, fmt(results["chunks"][chunk])])
    print("\n## Ratio by chunk size (default bins)\n")
    print(markdown_table(["chunk tokens", "ratio"], rows))
    rows = []
    for group in (0, 2, 4, 16):
        settings = codec.EncodeSettings("32:10,16", "32:2,16", group, exact_tokens=0)
        _, nbytes = roundtrip(kv, settings, coder, 256)
        results["locality"][group] = kv.numel() * 2 / nbytes
        rows.append([group or "off", fmt(results["locality"][group])])
    print("\n## Token-wise locality (LMCache bins; lossless, so only the size changes)\n")
    print(markdown_table(["anchor group", "ratio"], rows))
    return results


def best_of(fn, reps: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) over ``reps`` calls after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def _threads(count: int, kind: str = "") -> str:
    """"1 thread", "2 fetch threads": a table row's thread count."""
    return f"{count} {kind + ' ' if kind else ''}thread{'s' if count > 1 else ''}"


def cpp_coders() -> dict:
    """The default (native) C++ coder on 1 and 2 threads, and the portable build beside it: on an AVX2
    machine that is the scalar decoder the native build's eight-lane decoder replaced, so each run
    shows the baseline."""
    from vllm_kvcache_plugin.serde.cachegen.rans_cpp import PORTABLE, CppCoder, build_library, load_library

    coders = {f"cpp, {_threads(t)}": CppCoder(load_library(), t) for t in (1, 2)}
    try:
        portable = build_library(PORTABLE)
    except Exception as exc:  # a compiler that builds only one of the two: say so, measure the rest
        print(f"(portable build unavailable: {exc})")
        return coders
    if portable is not load_library():
        coders.update({f"cpp scalar (portable build), {_threads(t)}": CppCoder(portable, t) for t in (1, 2)})
    return coders


def speed_table(kv, quick: bool) -> dict:

    part = kv[:, :, :256].contiguous()
    mb = part.numel() * 2 / 1e6
    settings = codec.EncodeSettings()
    reps = 3 if quick else 7
    rows, results = [], {}
    coders = cpp_coders()
    coders["numpy"] = codec.NumpyCoder()
    for name, coder in coders.items():
        torch.set_num_threads(1)
        payload = codec.encode(part, settings, coder)
        out = torch.empty_like(part)
        n = 1 if name == "numpy" else reps
        enc = best_of(lambda c=coder: codec.encode(part, settings, c), n)
        dec = best_of(lambda c=coder, p=payload, o=out: codec.decode(p, part.shape, o, c), n)
        results[name] = {"encode_mb_s": mb / enc[0], "decode_mb_s": mb / dec[0], "encode_cpu_mb_s": mb / enc[1],
                         "decode_cpu_mb_s": mb / dec[1]}
        rows.append([name, fmt(mb / enc[0], 0), fmt(mb / dec[0], 0), fmt(mb / enc[1], 0), fmt(mb / dec[1], 0)])
    naive = NaiveSerde()
    obj = Allocator().wrap(part)
    blob = naive.serialize(obj)
    nd = best_of(lambda: naive.deserialize(blob).ref_down(), reps)
    results["naive"] = {"decode_mb_s": mb / nd[0]}
    rows.append(["LMCache 0.5.6 numba (measured here)", fmt(LMCACHE["mb_s"], 0), fmt(LMCACHE["mb_s"], 0), "-", "-"])
    print("\n## CPU speed, one 256-token chunk (MB/s of bf16 in / out; CPU columns: bytes per CPU-second)\n")
    print(markdown_table(["coder", "encode", "decode", "encode (CPU time)", "decode (CPU time)"], rows))
    return results


def load_decode_table(kv, quick: bool) -> dict:
    """A load's decode: every 256-token chunk of ``kv`` through ``CacheGenSerde.deserialize`` (header,
    checksum, decode into a pooled buffer), split over fetch threads the way a load's pipeline runs
    it. It is the least a cachegen load can take here, before any network or scatter."""
    from concurrent.futures import ThreadPoolExecutor

    from vllm_kvcache_plugin.integration.vllm.loads import FETCH_DEPTH, GROUP_CHUNKS
    from vllm_kvcache_plugin.serde.cachegen import CacheGenSerde

    allocator = Allocator()
    chunks = [kv[:, :, i:i + 256].contiguous() for i in range(0, kv.shape[2] - 255, 256)]
    mb = sum(c.numel() for c in chunks) * 2 / 1e6
    reps = 2 if quick else 5
    rows, results = [], {}
    for fetchers, coder_threads in ((1, 1), (1, 2), (FETCH_DEPTH, 1), (FETCH_DEPTH, 2)):
        serde = CacheGenSerde(allocator, threads=coder_threads)
        payloads = [bytes(serde.serialize(allocator.wrap(c))) for c in chunks]
        groups = [payloads[i:i + GROUP_CHUNKS] for i in range(0, len(payloads), GROUP_CHUNKS)]

        def decode_group(group: list[bytes], s=serde) -> None:
            for payload in group:
                s.deserialize(payload).ref_down()

        with ThreadPoolExecutor(fetchers) as pool:
            wall, _ = best_of(lambda p=pool, g=groups: list(p.map(decode_group, g)), reps)
        name = f"{_threads(fetchers, 'fetch')} x {_threads(coder_threads, 'coder')}"
        results[name] = {"ms": 1e3 * wall, "mb_s": mb / wall}
        rows.append([name, fmt(1e3 * wall, 1), fmt(mb / wall, 0)])
    print(f"\n## A load's decode: {len(chunks)} chunks ({mb:.0f} MB of bf16) through CacheGenSerde.deserialize, "
          f"{GROUP_CHUNKS} chunks a fetch (wall time, median of {reps})\n")
    print(markdown_table(["threads", "ms", "MB/s"], rows))
    return results


def crossover(speeds: dict, ratio: float) -> dict:
    """Link bandwidth below which a cachegen hit (fewer bytes, then decode) beats a naive hit."""
    naive = speeds["naive"]["decode_mb_s"]
    rows, out = [], {}
    for name in ("cpp, 1 thread", "cpp, 2 threads"):
        dec = speeds[name]["decode_mb_s"]
        # bytes B: naive B/bw + B/naive  vs  cachegen B/(r bw) + B/dec  ->  bw < (1 - 1/r) / (1/dec - 1/naive)
        bw = (1 - 1 / ratio) / max(1 / dec - 1 / naive, 1e-12)
        out[name] = bw
        rows.append([name, fmt(dec, 0), fmt(bw, 0), fmt(bw * 8 / 1000, 2)])
    print(f"\n## Link bandwidth below which a cachegen hit beats a naive hit (ratio {ratio:.2f})\n")
    print(markdown_table(["decoder", "decode MB/s", "crossover MB/s", "crossover Gbit/s"], rows))
    return out


def quality(model, tokenizer, held_out: str, prompt_text: str, quick: bool, coder, ratios: dict[str, float]) -> dict:
    """Perplexity and next-token KL on held-out text after a restored prefix; 32-token greedy agreement.

    ``ratios`` (config name -> compression ratio, from the size table) goes beside each row, so the
    table reads as the price in size of each step in quality."""
    ids = tokenizer(held_out, return_tensors="pt").input_ids
    prefix, scored = (512, 128) if quick else (1024, 256)
    ids = ids[:, : prefix + scored]
    with torch.no_grad():
        kv32 = cache_to_canonical(model(ids[:, :prefix], use_cache=True).past_key_values, torch.float32)
    kv = kv32.to(torch.bfloat16)

    def scores(cache_kv: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model(ids[:, prefix:], past_key_values=canonical_to_cache(cache_kv), use_cache=True).logits
        return logits[0].float().log_softmax(-1)

    base = scores(kv)
    target = ids[0, prefix + 1 :]
    base_ppl = float(torch.exp(-base[:-1].gather(1, target[:, None]).mean()))
    words = prompt_text.split()
    n_prompts, span = (4, 260) if quick else (20, 330)
    prompt_ids = [tokenizer(" ".join(words[i * span : (i + 1) * span]), return_tensors="pt").input_ids
                  for i in range(n_prompts)]
    with torch.no_grad():
        prefixes = [cache_to_canonical(model(pid[:, :-1], use_cache=True).past_key_values, torch.float32)
                    for pid in prompt_ids]

    def greedy(pid: torch.Tensor, cache_kv: torch.Tensor, steps: int = 32) -> list[int]:
        cache, token, out = canonical_to_cache(cache_kv), pid[:, -1:], []
        with torch.no_grad():
            for _ in range(steps):
                token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                out.append(int(token))
        return out

    reference = [greedy(pid, pre.to(torch.bfloat16)) for pid, pre in zip(prompt_ids, prefixes, strict=True)]
    rows = [["original bf16 KV", "1.00", fmt(base_ppl, 3), "-", "-", "-", "-", "-"]]
    results = {"original_ppl": base_ppl}
    variants = {"fp32 KV (no bf16 rounding: the noise floor)": lambda x: x}
    variants.update({name: (lambda x, s=CONFIGS[name]: roundtrip(x.to(torch.bfloat16), s, coder, 256)[0])
                     for name in QUALITY_CONFIGS})
    for name, restore in variants.items():
        lp = scores(restore(kv32))
        p = float(torch.exp(-lp[:-1].gather(1, target[:, None]).mean()))
        kl = float((base.exp() * (base - lp)).sum(-1).mean())
        conts = [greedy(pid, restore(pre)) for pid, pre in zip(prompt_ids, prefixes, strict=True)]
        same = sum(c == r for c, r in zip(conts, reference, strict=True))
        first = sum(c[0] == r[0] for c, r in zip(conts, reference, strict=True))
        tokens = sum(sum(a == b for a, b in zip(c, r, strict=True)) for c, r in zip(conts, reference, strict=True))
        results[name] = {"ppl": p, "ppl_change": p / base_ppl - 1, "kl": kl, "identical": same / n_prompts,
                         "first_token": first / n_prompts, "token_agreement": tokens / (32 * n_prompts)}
        ratio = fmt(ratios[name]) if name in ratios else "-"
        rows.append([name, ratio, fmt(p, 3), f"{(p / base_ppl - 1) * 100:+.2f}%", fmt(kl, 4), f"{same}/{n_prompts}",
                     f"{first}/{n_prompts}", f"{tokens / (32 * n_prompts) * 100:.0f}%"])
    print(f"\n## Model quality with restored KV (transformers, fp32 compute; {prefix}-token prefix of held-out "
          f"text, {scored} scored tokens; {n_prompts} prompts of ~{span} words, 32 greedy tokens vs the bf16 KV)\n")
    print(markdown_table(["KV", "ratio", "perplexity", "change", "KL/token", "identical 32-token", "same first token",
                          "token agreement"], rows))
    return results


def sensitivity(model, tokenizer, held_out: str, coder) -> dict:
    """Where the codec's error hurts: next-token KL with only keys, only values, or one layer restored
    (32 bins, the rest exact). Behind the default bins (keys get the bits, not early layers)."""
    ids = tokenizer(held_out, return_tensors="pt").input_ids[:, :640]
    with torch.no_grad():
        kv = cache_to_canonical(model(ids[:, :512], use_cache=True).past_key_values)

    def kl(cache_kv: torch.Tensor) -> float:
        with torch.no_grad():
            lp = [model(ids[:, 512:], past_key_values=canonical_to_cache(c), use_cache=True).logits[0].float()
                  .log_softmax(-1) for c in (kv, cache_kv)]
        return float((lp[0].exp() * (lp[0] - lp[1])).sum(-1).mean())

    restored = roundtrip(kv, codec.EncodeSettings("32", "32", exact_tokens=0), coder, 256)[0]
    cases = {"keys only": (slice(0, 1), slice(None)), "values only": (slice(1, 2), slice(None))}
    cases.update({f"layer {layer} only": (slice(None), slice(layer, layer + 1))
                  for layer in range(0, kv.shape[1], max(1, kv.shape[1] // 6))})
    results, rows = {}, []
    for name, (planes, layers) in cases.items():
        mixed = kv.clone()
        mixed[planes, layers] = restored[planes, layers]
        results[name] = kl(mixed)
        rows.append([name, fmt(results[name], 5)])
    print("\n## Sensitivity: next-token KL with part of the KV through 32-bin CacheGen (rest exact)\n")
    print(markdown_table(["restored part", "KL/token"], rows))
    return results


def save_plot(results: dict, out: Path) -> None:
    """Size vs error, size vs model KL, and CPU speed, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax4, ax3) = plt.subplots(1, 4, figsize=(20, 4.6))
    configs = {n: r for n, r in results["size"]["configs"].items() if "no sink" not in n}
    for name, r in configs.items():
        ax1.scatter(r["ratio"], r["rel_k"], marker="o", color="C0")
        ax1.scatter(r["ratio"], r["rel_v"], marker="s", color="C1")
        ax1.annotate(name.split(" (")[0], (r["ratio"], r["rel_k"]), fontsize=7, xytext=(3, 3),
                     textcoords="offset points")
    ax1.scatter([LMCACHE["ratio"]] * 2, [LMCACHE["rel_k"], LMCACHE["rel_v"]], marker="x", color="k",
                label="LMCache 0.5.6 (K, V)")
    ax1.set(xlabel="compression ratio vs bf16 (chunk 256)", ylabel="relative L2 error (o: K, s: V)")
    ax1.legend(fontsize=8)
    for name, q in results.get("quality", {}).items():
        if not (isinstance(q, dict) and name in results["size"]["configs"]):
            continue
        ratio = results["size"]["configs"][name]["ratio"]
        points = [(ax2, q["kl"], "C2")] + ([(ax4, q["identical"] * 100, "C3")] if "no sink" not in name else [])
        for ax, y, color in points:
            ax.scatter(ratio, y, color=color)
            ax.annotate(name.split(" (")[0], (ratio, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set(xlabel="compression ratio vs bf16 (chunk 256)", ylabel="next-token KL with restored KV", yscale="log")
    ax4.axhline(90, color="r", linestyle="--", linewidth=1, label="bar 90%")
    ax4.axvline(4, color="grey", linestyle=":", linewidth=1, label="bar 4x")
    ax4.set(xlabel="compression ratio vs bf16 (chunk 256)", ylabel="identical 32-token continuations (%)",
            ylim=(-5, 105))
    ax4.legend(fontsize=8)
    speed_panel(ax3, results["speed"])
    for ax in (ax1, ax2, ax3, ax4):
        ax.grid(alpha=0.3)
    fig.suptitle("CacheGen serde on SmolLM2-135M KV (licence text)")
    fig.tight_layout()
    fig.savefig(out / "cachegen.png", dpi=110)
    plt.close(fig)


def speed_panel(ax, speed: dict) -> None:
    names = [n for n in speed if n != "naive"]
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [speed[n]["encode_mb_s"] for n in names], 0.4, label="encode")
    ax.bar(xs + 0.2, [speed[n]["decode_mb_s"] for n in names], 0.4, label="decode")
    ax.axhline(200, color="r", linestyle="--", linewidth=1, label="decode bar 200 MB/s")
    ax.set_xticks(xs)
    ax.set_xticklabels([n.replace(" (portable build)", "\n(portable)") for n in names], fontsize=7)
    ax.set_ylabel("MB/s of bf16 (wall clock, shared machine)")
    ax.legend(fontsize=8)


def save_speed_plot(speed: dict, out: Path) -> None:
    """The ``--speed`` run's one panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.6))
    speed_panel(ax, speed)
    ax.grid(alpha=0.3)
    ax.set_title("CacheGen CPU coders, one 256-token chunk of SmolLM2-135M KV")
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer tokens, prompts and repetitions (~2 min)")
    parser.add_argument("--gpu-only", action="store_true", help="Triton throughput on CUDA with synthetic KV")
    parser.add_argument("--e2e", action="store_true", help="vLLM restart hits through redis, naive vs cachegen")
    parser.add_argument("--speed", action="store_true",
                        help="only the CPU speed tables: one chunk, and a whole load's decode "
                             "(real KV, no size or quality tables; ~2 min)")
    parser.add_argument("--sensitivity", action="store_true", help="also: KL by K/V and by layer (~1 min)")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m")
    parser.add_argument("--tokens", type=int, default=None, help="KV tokens for the codec tables (2048; quick 512)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "cachegen")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = _Tee(sys.stdout)
    sys.stdout = report
    try:
        return _run(args)
    finally:
        sys.stdout = report.stream
        # The tables printed above, kept as this run's report (its headings one level down, below
        # the section that `make bench` gives it in RESULTS.md).
        name = "gpu.md" if args.gpu_only else "e2e.md" if args.e2e else "cachegen.md"
        (args.out / name).write_text(report.text().replace("\n## ", "\n### "))


class _Tee:
    """Passes writes through to ``stream`` and keeps a copy."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def text(self) -> str:
        return "".join(self.parts)


def _run(args: argparse.Namespace) -> int:
    print(environment_line())
    if args.gpu_only:
        from benchmarks.bench_cachegen_gpu import gpu_only

        results = {"gpu": gpu_only(args.quick)}
    elif args.e2e:
        from benchmarks.bench_cachegen_e2e import e2e

        results = {"e2e": e2e(args.out, args.quick)}
    else:
        if not (args.model / "config.json").exists():
            raise SystemExit(f"no model at {args.model}: python scripts/build_model.py --out {args.model}")
        from vllm_kvcache_plugin.serde.cachegen.rans_cpp import CppCoder, load_library

        coder = CppCoder(load_library(), 2)
        tokenizer, model = load_model(args.model)
        text, held_out = natural_text()
        kv = real_kv(model, tokenizer, text, args.tokens or (512 if args.quick else 2048), args.out)
        print(f"\nKV: {tuple(kv.shape)} bf16 from {kv.shape[2]} tokens of licence text")
        if args.speed:
            results = {"speed": speed_table(kv, args.quick), "load_decode": load_decode_table(kv, args.quick)}
            save_speed_plot(results["speed"], args.out)
            print(f"\nplot: {args.out / 'speed.png'}")
            (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
            return 0
        results = {"size": size_quality_tables(kv, coder, args.quick), "speed": speed_table(kv, args.quick)}
        results["crossover_mb_s"] = crossover(results["speed"], results["size"]["configs"][DEFAULT]["ratio"])
        ratios = {name: r["ratio"] for name, r in results["size"]["configs"].items()}
        results["quality"] = quality(model, tokenizer, held_out, text, args.quick, coder, ratios)
        if args.sensitivity:
            results["sensitivity"] = sensitivity(model, tokenizer, held_out, coder)
        save_plot(results, args.out)
        print(f"\nplot: {args.out / 'cachegen.png'}")
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
