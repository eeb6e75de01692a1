"""CacheGen's Triton coder on a GPU, with synthetic KV (the GPU machine has no transformers / vLLM):
throughput of encode and decode. Run as ``python benchmarks/bench_cachegen.py --gpu-only``."""

from __future__ import annotations

import time

import torch

from benchmarks._common import fmt, markdown_table
from vllm_kvcache_plugin.serde.cachegen import codec


def synthetic_kv(layers=30, tokens=256, heads=3, size=64, seed=0, device="cpu") -> torch.Tensor:
    """KV-like data for the GPU run (no model there): per-channel offsets/spreads, outlier channels."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(2, layers, 1, heads, size, generator=g) * 0.5
    spread = torch.rand(2, layers, 1, heads, size, generator=g) * 2 + 0.05
    spread[..., :2] *= 12
    noise = torch.randn(2, layers, tokens, heads, size, generator=g)
    return (offset + spread * noise).to(torch.bfloat16).to(device)


def gpu_only(quick: bool, device: str = "cuda", layers: int = 30, tokens: int = 256,
             batches: tuple[int, ...] | None = None, reps: int | None = None) -> dict:
    """Triton throughput on ``device`` (the CLI: CUDA; a CPU under TRITON_INTERPRET=1 smoke-tests it)."""
    from vllm_kvcache_plugin.serde.cachegen.triton_coder import TritonCoder

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu-only needs CUDA")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    coder, settings, results = TritonCoder(device), codec.EncodeSettings(), {}
    kv = synthetic_kv(layers=layers, tokens=tokens, device=device)
    payload = codec.encode(kv, settings, coder)
    cpu_coder = codec.NumpyCoder()
    try:
        from vllm_kvcache_plugin.serde.cachegen.rans_cpp import CppCoder, load_library

        cpu_coder = CppCoder(load_library(), 4) if load_library() is not None else cpu_coder
    except Exception as exc:  # a GPU box without a compiler still benches Triton
        print(f"C++ coder unavailable ({exc}); comparing with numpy")
    results["identical_to_cpu"] = bytes(payload) == bytes(codec.encode(kv.cpu(), settings, cpu_coder))
    out = torch.empty_like(kv)

    def timed(fn, reps):
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - start) / reps

    reps = reps or (5 if quick else 20)
    mb = kv.numel() * 2 / 1e6
    enc = timed(lambda: codec.encode(kv, settings, coder), reps)
    dec = timed(lambda: codec.decode(payload, kv.shape, out, coder), reps)
    reference = torch.empty_like(kv)
    codec.decode(payload, kv.shape, reference, cpu_coder)
    results["decode_identical_to_cpu"] = torch.equal(out.cpu(), reference.cpu())
    plan, coded, step, exact = codec.parse_payload(payload, kv.shape, device, kv.dtype)
    results["ratio"] = kv.numel() * 2 / (len(payload) + 64)
    rows = [["encode (end to end, incl. host table choice)", fmt(mb / enc / 1e3, 3)],
            ["decode (end to end, incl. upload)", fmt(mb / dec / 1e3, 3)]]
    for batch in batches or ((1, 8, 32) if quick else (1, 8, 32, 128)):
        batch_out = torch.empty((batch, *kv.shape), dtype=kv.dtype, device=device)
        launch = coder.prepare_decode([coded] * batch, [plan] * batch, [step] * batch, batch_out, [exact] * batch)
        t = timed(launch, reps)
        assert not launch().any() and torch.equal(batch_out[-1], out)
        rows.append([f"decode kernel, {batch} chunk(s) per launch", fmt(batch * mb / t / 1e3, 3)])
        results[f"decode_kernel_gb_s_{batch}"] = batch * mb / t / 1e3
    results.update({"encode_gb_s": mb / enc / 1e3, "decode_gb_s": mb / dec / 1e3})
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"\n## Triton on {name} (synthetic KV, {tokens}-token chunks of {mb:.1f} MB bf16, ratio "
          f"{results['ratio']:.2f}; bytes identical to the CPU coder: {results['identical_to_cpu']}, decoded "
          f"values identical: {results['decode_identical_to_cpu']})\n")
    print(markdown_table(["operation", "GB/s of bf16"], rows))
    return results
