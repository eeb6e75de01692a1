"""Tiny random-weight hybrid models made locally (no download), for the hybrid tests and benchmark.

Both use SmolLM2's tokenizer (:func:`testbed.vllm_process.ensure_model`), float32 weights and seed 0,
so every build is the same model. Their greedy text is degenerate: compare logprobs, not text.

* :func:`gemma3_tiny`: Gemma3 text, 5 sliding-window layers (window 128) + 1 full-attention layer,
  the shape that makes vLLM's hybrid KV-cache manager (HMA) matter: with HMA on, the sliding layers
  keep only their window's blocks (2.5x the capacity of HMA off here).
* :func:`granite_hybrid_tiny`: GraniteMoeHybrid, 3 Mamba2 layers + 1 attention layer (no experts):
  an SSM hybrid, which vLLM can run only with HMA on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from testbed.vllm_process import ensure_model

# generation_config.json is left out: the model's own (from save_pretrained) stays.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _save(model, out: Path) -> Path:
    model.save_pretrained(out)
    base = ensure_model()
    for name in _TOKENIZER_FILES:
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    return out


def _token_ids() -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_model())
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id or 0}


def gemma3_tiny(out: Path, seed: int = 0) -> Path:
    """A ~14 M parameter Gemma3 (6 layers: 5 sliding, window 128, + 1 full) in ``out`` (built once)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64, sliding_window=128, max_position_embeddings=8192,
                              torch_dtype="float32", **_token_ids())
    assert config.layer_types.count("full_attention") == 1, config.layer_types  # transformers' default 5:1 pattern
    return _save(Gemma3ForCausalLM(config).to(torch.float32), out)


def granite_hybrid_tiny(out: Path, seed: int = 0) -> Path:
    """A small GraniteMoeHybrid (layers: mamba, mamba, attention, mamba; dense MLP) in ``out`` (built once)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    torch.manual_seed(seed)
    config = GraniteMoeHybridConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=0, num_experts_per_tok=0, shared_intermediate_size=512, position_embedding_type="rope",
        layer_types=["mamba", "mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=64, mamba_n_groups=1,
        mamba_d_state=64, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256, max_position_embeddings=8192,
        time_step_limit=(0.0, 1e9), tie_word_embeddings=True, **_token_ids())
    return _save(GraniteMoeHybridForCausalLM(config).to(torch.float32), out)
