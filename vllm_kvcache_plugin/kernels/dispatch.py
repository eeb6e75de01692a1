"""Pick the fastest copier that works for a spec on a device.

Order: ``cuda`` > ``triton`` > ``torch`` on a GPU, ``cpu`` > ``torch`` on the CPU. The environment
variable ``VLLM_KVCACHE_KERNEL=torch|cpu|triton|cuda`` asks for one; if it cannot run here the
dispatcher warns and falls back to the default order. Each choice is logged once (INFO).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import torch

from .copier import KVCopier
from .layouts import Packing, PagedKVSpec
from .torch_ref import TorchCopier

logger = logging.getLogger(__name__)

ENV_VAR = "VLLM_KVCACHE_KERNEL"
IMPLEMENTATIONS = ("torch", "cpu", "triton", "cuda")


class KernelUnavailable(RuntimeError):
    """An implementation cannot run for this spec/device; the message says why."""


def _load_torch(spec: PagedKVSpec, device: torch.device) -> KVCopier:
    return TorchCopier()


def _load_cpu(spec: PagedKVSpec, device: torch.device) -> KVCopier:
    if device.type != "cpu":
        raise KernelUnavailable(f"the cpu fast path runs on CPU tensors, not {device}")
    from .cpu_fast import CpuCopier

    return CpuCopier.create()


def _load_triton(spec: PagedKVSpec, device: torch.device) -> KVCopier:
    if spec.packing is not Packing.PLAIN:
        raise KernelUnavailable(f"the triton kernel handles packing 'plain', not {spec.packing.value!r}")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelUnavailable("triton runs on CPU tensors only under TRITON_INTERPRET=1")
    if device.type not in ("cuda", "cpu"):
        raise KernelUnavailable(f"triton does not run on {device}")
    from .triton_copy import TritonCopier

    return TritonCopier.create()


def _load_cuda(spec: PagedKVSpec, device: torch.device) -> KVCopier:
    if device.type != "cuda":
        raise KernelUnavailable(f"the CUDA kernel runs on CUDA tensors, not {device}")
    if spec.packing is not Packing.PLAIN:
        raise KernelUnavailable(f"the CUDA kernel handles packing 'plain', not {spec.packing.value!r}")
    from .cuda_copy import CudaCopier

    return CudaCopier.create()


_LOADERS: dict[str, Callable[[PagedKVSpec, torch.device], KVCopier]] = {
    "torch": _load_torch,
    "cpu": _load_cpu,
    "triton": _load_triton,
    "cuda": _load_cuda,
}

_lock = threading.Lock()
_logged: set[tuple[str, str, str]] = set()
_cache: dict[tuple[PagedKVSpec, str, str], KVCopier] = {}


def default_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("cuda", "triton", "torch")
    if device.type == "cpu":
        return ("cpu", "torch")
    return ("torch",)


def _requested() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value and value not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {IMPLEMENTATIONS}")
    return value


def _try(name: str, spec: PagedKVSpec, device: torch.device) -> KVCopier | str:
    """The copier, or the reason it cannot run."""
    try:
        return _LOADERS[name](spec, device)
    except KernelUnavailable as exc:
        return str(exc)
    except (ImportError, OSError, RuntimeError) as exc:  # missing module, failed build or load
        return f"{type(exc).__name__}: {exc}"


def _log_once(level: int, key: tuple[str, str, str], message: str, *args: object) -> None:
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.log(level, message, *args)


def get_copier(spec: PagedKVSpec, device: torch.device | str) -> KVCopier:
    """The copier for ``spec`` on ``device`` (see the module docstring for the order)."""
    device = torch.device(device)
    requested = _requested()
    key = (spec, str(device), requested)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    candidates = list(default_order(device))
    if requested:
        candidates = [requested] + [name for name in candidates if name != requested]
    reasons: list[str] = []
    for name in candidates:
        result = _try(name, spec, device)
        if isinstance(result, KVCopier):
            break
        reasons.append(f"{name}: {result}")
        if name == requested:
            _log_once(logging.WARNING, ("unavailable", name, device.type),
                      "KV copy kernel %r requested by %s is unavailable on %s (%s); falling back",
                      name, ENV_VAR, device, result)
        elif name != "torch":
            logger.debug("KV copy kernel %r skipped on %s: %s", name, device, result)
    else:  # the torch reference always loads; this is a safeguard, not a path
        raise RuntimeError("no KV copy kernel available: " + "; ".join(reasons))
    _log_once(logging.INFO, ("chosen", result.name, f"{device.type}/{spec.packing}"),
              "KV copy kernel for %s (%s, packing %s): %s", device, spec.kind, spec.packing, result.name)
    with _lock:
        _cache[key] = result
    return result


def available_copiers(spec: PagedKVSpec, device: torch.device | str) -> dict[str, KVCopier | str]:
    """Every implementation for ``spec`` on ``device``: the copier, or why it cannot run (tests, benchmarks)."""
    device = torch.device(device)
    return {name: _try(name, spec, device) for name in IMPLEMENTATIONS}
