"""Real SmolLM2-135M KV for the CacheGen benchmarks: the model through transformers (float32 compute
from the bf16 weights), prompts from the licence texts in /usr/share/common-licenses, conversion
between transformers' cache and the canonical chunk layout, and a codec round trip."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from vllm_kvcache_plugin.serde.cachegen import codec

LICENCES = ("GPL-3", "GFDL-1.3", "Apache-2.0", "LGPL-3", "MPL-2.0")


def natural_text() -> tuple[str, str]:
    root = Path("/usr/share/common-licenses")
    texts = [(root / n).read_text(errors="replace") for n in LICENCES if (root / n).exists()]
    if len(texts) < 2:
        from pydoc_data.topics import topics

        texts = ["\n\n".join(topics[k] for k in sorted(topics))[i::2] for i in range(2)]
    return "\n\n".join(texts[:-1]), texts[-1]  # (KV and prompts, held-out text for perplexity)


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def cache_to_canonical(cache, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """transformers cache (per layer [1, H, T, D]) -> canonical [2, L, T, H, D]."""
    keys = torch.stack([layer.keys[0].transpose(0, 1) for layer in cache.layers])
    values = torch.stack([layer.values[0].transpose(0, 1) for layer in cache.layers])
    return torch.stack([keys, values]).to(dtype)


def canonical_to_cache(kv: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(kv.shape[1]):
        cache.update(kv[0, layer].transpose(0, 1)[None].float(), kv[1, layer].transpose(0, 1)[None].float(), layer)
    return cache


def real_kv(model, tokenizer, text: str, tokens: int, out: Path) -> torch.Tensor:
    """KV of the first ``tokens`` tokens of ``text``, cached as .npy (uint16 bits, no pickle)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    tag = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:12]
    path = out / f"kv_{tag}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path, allow_pickle=False)).view(torch.bfloat16)
    start = time.perf_counter()
    with torch.no_grad():
        kv = cache_to_canonical(model(ids, use_cache=True).past_key_values)
    print(f"computed KV of {ids.shape[1]} tokens in {time.perf_counter() - start:.1f} s")
    np.save(path, kv.view(torch.uint16).numpy(), allow_pickle=False)
    return kv


def roundtrip(kv: torch.Tensor, settings: codec.EncodeSettings, coder, chunk: int) -> tuple[torch.Tensor, int]:
    """Encode/decode ``kv`` chunk by chunk (a partial tail chunk too); (restored KV, bytes incl. headers)."""
    out, total = torch.empty_like(kv), 0
    for start in range(0, kv.shape[2], chunk):
        part = kv[:, :, start : start + chunk].contiguous()
        payload = codec.encode(part, settings, coder)
        total += len(payload) + 64
        restored = torch.empty_like(part)
        codec.decode(payload, part.shape, restored, coder)
        out[:, :, start : start + chunk] = restored
    return out, total


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
