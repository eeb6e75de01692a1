"""Models and adapters made locally (no download) for the end-to-end tests.

* :func:`lora_adapter`: a random LoRA adapter on ``k_proj`` / ``v_proj`` of the SmolLM2 model, in
  PEFT's folder layout (``adapter_config.json`` + ``adapter_model.safetensors``), so it changes
  K/V, which is what the connector must keep apart from the base model's.
* :func:`tiny_llama`: a small random-weight Llama (4 layers, 4 heads, 2 KV heads) with SmolLM2's
  tokenizer, for tensor parallel (SmolLM2's 9 heads cannot be split in two). Its greedy text is
  degenerate: compare logprobs or stored KV with it, not text.
* :func:`gemma3_tiny` (5 sliding-window layers + 1 full) and :func:`granite_hybrid_tiny` (3 Mamba2
  + 1 attention): hybrid models for vLLM's hybrid KV-cache manager, built in testbed/tiny_models.py
  (the hybrid benchmark uses them too) and re-exported here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from testbed.tiny_models import gemma3_tiny, granite_hybrid_tiny
from testbed.vllm_process import ensure_model

__all__ = ["gemma3_tiny", "granite_hybrid_tiny", "lora_adapter", "tiny_llama"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def lora_adapter(out: Path, base: Path | None = None, rank: int = 8, std: float = 0.05, seed: int = 0) -> Path:
    """A random adapter for ``base`` (default: the SmolLM2 model) in ``out``; returns ``out``."""
    from safetensors.torch import save_file

    base = base or ensure_model()
    config = json.loads((base / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv_out = config["num_key_value_heads"] * config.get("head_dim", hidden // config["num_attention_heads"])
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for proj in ("k_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(kv_out, rank, generator=g) * std
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "target_modules": ["k_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": str(base)}, indent=1))
    return out


def tiny_llama(out: Path, seed: int = 0) -> Path:
    """A ~15 M parameter random Llama with SmolLM2's tokenizer (built once per folder)."""
    if (out / "config.json").exists():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    base = ensure_model()
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    return out
