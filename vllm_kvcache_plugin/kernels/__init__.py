"""Gather/scatter of token KV between vLLM's paged layers and the canonical chunk layout.

``get_copier(spec, device)`` returns the fastest implementation available (CUDA, Triton, a CPU fast
path, or the torch reference). Nothing here imports vLLM.
"""

from .copier import CopyGeometry, KVCopier, check_copy_args, copy_threads
from .dispatch import ENV_VAR, IMPLEMENTATIONS, KernelUnavailable, available_copiers, get_copier
from .layouts import (
    LAYOUT_ORDERS,
    AttentionKind,
    Packing,
    PagedKVSpec,
    allocate_paged_layers,
    layout_strides,
    token_views,
)
from .torch_ref import TorchCopier

__all__ = [
    "ENV_VAR",
    "IMPLEMENTATIONS",
    "LAYOUT_ORDERS",
    "AttentionKind",
    "CopyGeometry",
    "KVCopier",
    "KernelUnavailable",
    "Packing",
    "PagedKVSpec",
    "TorchCopier",
    "allocate_paged_layers",
    "available_copiers",
    "check_copy_args",
    "copy_threads",
    "get_copier",
    "layout_strides",
    "token_views",
]
