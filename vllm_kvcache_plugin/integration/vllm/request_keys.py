"""What of a vLLM request decides its K/V, folded into its chunk hashes (see keys.py).

vLLM's own prefix cache hashes the same inputs into its block hashes
(``vllm/v1/core/kv_cache_utils.py``, ``generate_block_hash_extra_keys``): the LoRA adapter (name and
path), ``cache_salt``, the multimodal items in a block and the prompt embeddings of a block. The
connector's store outlives the instance and is shared, so it also folds in the instance settings
that change K/V for the same weights (on-the-fly quantization, a revision, ``hf_overrides``).
docs/architecture.md has the table of every such input and where it enters the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ...keys import KeyScope, chained_hashes
from .metadata import ChunkRef

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

def instance_variant(vllm_config: VllmConfig) -> tuple[tuple[str, str], ...]:
    """Instance settings that change K/V for the same model weights (none for a plain serve)."""
    model = vllm_config.model_config
    out = []
    if getattr(model, "quantization", None):
        out.append(("quantization", str(model.quantization)))
    if getattr(model, "revision", None):
        out.append(("revision", str(model.revision)))
    overrides = getattr(model, "hf_overrides", None)
    if isinstance(overrides, dict) and overrides:
        out.append(("hf_overrides", json.dumps(overrides, sort_keys=True, default=str)))
    elif callable(overrides):
        logger.warning("vllm-kvcache-plugin: hf_overrides is a function, which cannot be part of the keys; "
                       "set model_name to keep this variant's KV apart from the plain model's")
    return tuple(out)


def request_scope(request: Request, variant: tuple[tuple[str, str], ...] = ()) -> KeyScope:
    lora = getattr(request, "lora_request", None)
    adapter = (str(lora.lora_name), str(lora.lora_path)) if lora is not None else None
    return KeyScope(adapter=adapter, cache_salt=getattr(request, "cache_salt", None) or None, variant=variant)


def _int(value: int) -> bytes:
    return int(value).to_bytes(8, "little", signed=True)


def _text(value: Any) -> bytes:
    data = str(value).encode()
    return _int(len(data)) + data


def chunk_extras(request: Request) -> Callable[[int, int], bytes | None] | None:
    """``extra(start, end)``: the bytes besides token ids that decide chunk ``[start, end)``'s K/V
    (multimodal items overlapping it, its prompt embeddings), or None for a text-only request."""
    features = sorted(getattr(request, "mm_features", None) or [], key=lambda f: f.mm_position.offset)
    embeds = getattr(request, "prompt_embeds", None)
    mask = getattr(request, "prompt_is_token_ids", None)
    if not features and embeds is None:
        return None

    def extra(start: int, end: int) -> bytes | None:
        parts = []
        for feature in features:
            offset, length = feature.mm_position.offset, feature.mm_position.length
            if offset < end and offset + length > start:
                # As vLLM: the item's identity and where it sits relative to the chunk.
                parts += [b"mm", _text(feature.modality), _text(feature.identifier), _int(offset - start),
                          _int(length)]
        if embeds is not None:
            block = embeds[start:end].contiguous()
            digest = hashlib.sha256(block.reshape(-1).view(torch.uint8).numpy()).digest()
            parts += [b"embeds", _text(block.dtype), _text(tuple(block.shape)), digest]
            if mask is not None:
                parts += [b"mask", bytes(bool(m) for m in mask[start:end])]
        return b"".join(parts) or None

    return extra


class RequestKeys:
    """Cuts a vLLM request's prompt into chunk refs whose hashes carry every input of its K/V."""

    def __init__(self, chunk_size: int, include_partial: bool, variant: tuple[tuple[str, str], ...] = ()) -> None:
        self.chunk_size = chunk_size
        self.include_partial = include_partial
        self.variant = variant
        self._said_embeds_only = False

    def chunks(self, request: Request) -> list[ChunkRef]:
        """The request's chunks; empty when it cannot be cached (a prompt given only as embeddings,
        which has no token ids to key it by: said once in the log)."""
        tokens = request.prompt_token_ids
        if tokens is None:
            if not self._said_embeds_only:
                self._said_embeds_only = True
                logger.info("vllm-kvcache-plugin: requests given only as prompt embeddings are not cached "
                            "(no token ids); mixed text + embeddings prompts are, keyed by their embeddings")
            return []
        scope = request_scope(request, self.variant)
        return chained_hashes(tokens, self.chunk_size, self.include_partial, root=scope.root(),
                              chunk_extra=chunk_extras(request))
