"""CUDA copier: csrc/kv_copy.cu, one launch for all layers, built on first use where CUDA exists.

The extension is compiled with ``torch.utils.cpp_extension.load`` into
``$VLLM_KVCACHE_KERNEL_CACHE/cuda`` (default ``~/.cache/vllm_kvcache_plugin``), for the visible GPU's
architecture, so CPU installs never need nvcc. ``python csrc/build.py`` builds it ahead of time.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from . import cpu_fast
from .copier import CopyGeometry, KVCopier, LayerSet, LayerSetCache, check_copy_args
from .layouts import PagedKVSpec

CSRC_ENV = "VLLM_KVCACHE_CSRC"
CACHE_ENV = "VLLM_KVCACHE_KERNEL_CACHE"
EXTENSION_NAME = "vllm_kvcache_kv_copy"
_MAX_VEC_BYTES = 16


def csrc_dir() -> Path:
    """Where the CUDA sources live: ``$VLLM_KVCACHE_CSRC`` or the repository's csrc/."""
    override = os.environ.get(CSRC_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[2] / "csrc"


def _build_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vllm_kvcache_plugin")
    path = Path(root) / "cuda" / f"torch{torch.__version__}-cuda{torch.version.cuda}"
    path.mkdir(parents=True, exist_ok=True)
    return path


_lock = threading.Lock()
_extension: ModuleType | None = None
_load_error: str | None = None


def load_extension(verbose: bool = False) -> ModuleType:
    """Compile (once per torch/CUDA version, cached on disk) and import the extension. A failed
    build is remembered for the process: the dispatcher falls back instead of recompiling."""
    global _extension, _load_error
    with _lock:
        if _extension is not None:
            return _extension
        if _load_error is not None:
            raise RuntimeError(_load_error)
        try:
            _extension = _build(verbose)
        except (ImportError, OSError, RuntimeError) as exc:
            _load_error = f"CUDA copier unavailable: {exc}"
            raise RuntimeError(_load_error) from exc
        return _extension


def _build(verbose: bool) -> ModuleType:
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available: the CUDA copier cannot be built or run")
    source = csrc_dir() / "kv_copy.cu"
    if not source.is_file():
        raise RuntimeError(f"CUDA source {source} not found (set {CSRC_ENV} to the csrc/ folder)")
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(source)],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
        build_directory=str(_build_dir()),
        verbose=verbose,
    )


def _vector_bytes(values: Sequence[int]) -> int:
    """The widest power-of-two access (<= 16 bytes) that every address and byte stride allows."""
    common = 0
    for value in values:
        common = math.gcd(common, int(value))
    vec = _MAX_VEC_BYTES
    while vec > 1 and common % vec:
        vec //= 2
    return vec


class CudaCopier(KVCopier):
    """csrc/kv_copy.cu: 16-byte vector copies, all layers in one launch, pinned host chunks direct."""

    name = "cuda"

    def __init__(self, extension: ModuleType) -> None:
        self._ext = extension
        self._tables: LayerSetCache[tuple[torch.Tensor, int]] = LayerSetCache(self._layer_table)

    @classmethod
    def create(cls) -> CudaCopier:
        return cls(load_extension())

    def _reachable(self, chunk: torch.Tensor, geo: CopyGeometry) -> torch.Tensor:
        """The chunk itself when the kernel can reach it (same GPU, or pinned host), else a staging
        copy: pinned host memory for a host chunk (a view of a shared-memory or file mapping), a
        device buffer for another device's. Pinned, not pageable: the kernel then reads the host
        copy at PCIe speed, where the driver's pageable-to-device copy of 256-token chunks ran at
        ~4 GB/s (H200, benchmarks/RESULTS.md). torch's host allocator keeps freed pinned blocks, so
        a staging buffer is page-locked once, not per chunk."""
        device = geo.layer_set.device
        if device.type != "cuda":
            raise ValueError(f"the cuda copier needs CUDA layers, got {device}")
        if chunk.device == device or (chunk.device.type == "cpu" and chunk.is_pinned()):
            return chunk
        if chunk.device.type == "cpu":
            try:
                return torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=True)
            except RuntimeError:  # page-locking refused: the driver's pageable copy still works
                pass
        return torch.empty(chunk.shape, dtype=chunk.dtype, device=device)

    def scatter_verified(self, layers: Sequence[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                         src: torch.Tensor) -> bytes | None:
        """A host chunk's slabs hashed on the host threads, each copied into pinned staging right
        after (none for a pinned chunk), then one launch: the checksum costs no extra pass."""
        if src.device.type != "cpu" or not src.is_contiguous() or src.numel() == 0:
            return None
        geo = check_copy_args(layers, spec, slots, src, "src", check_slots=not self.checks_slots)
        if geo.layer_set.device.type != "cuda":
            return None
        source = self._reachable(src, geo)
        digests = cpu_fast.hash_copy(src, None if source is src else source, src.stride(1) * src.element_size())
        if digests is None:
            return None
        self._copy(geo.for_chunk(source), spec, slots, source, gather=False)
        return digests

    @staticmethod
    def _layer_table(layer_set: LayerSet) -> tuple[torch.Tensor, int]:
        """Device array of layer addresses and their common alignment."""
        table = torch.tensor(layer_set.addresses, dtype=torch.int64).to(layer_set.device)
        return table, _vector_bytes(layer_set.addresses)

    def _copy(self, geo: CopyGeometry, spec: PagedKVSpec, slots: torch.Tensor, chunk: torch.Tensor,
              gather: bool) -> None:
        layer_set = geo.layer_set
        table, address_alignment = self._tables.get(layer_set)
        es = spec.element_size
        row_bytes = spec.head_size * es
        layer_strides = [stride * es for stride in layer_set.strides]
        chunk_strides = [stride * es for stride in geo.chunk_strides]
        vec = _vector_bytes([address_alignment, row_bytes, chunk.data_ptr(), *layer_strides, *chunk_strides])
        # The layers' device, not the thread's current one: loads run on a loader thread, which
        # starts on device 0 whatever this worker's rank.
        with torch.cuda.device(layer_set.device):
            # CPU slots (pinned, ideally) cost no device sync: the range check ran on the host.
            slots = slots.to(device=layer_set.device, dtype=torch.int64, non_blocking=True).contiguous()
            self._ext.kv_copy(table, slots, chunk, spec.num_kv_heads, spec.num_kv, row_bytes, spec.block_size,
                              layer_set.num_blocks * spec.block_size, layer_strides, chunk_strides, vec, gather)
            if chunk.device.type == "cpu":
                # The kernel reads / writes the pinned host chunk asynchronously: wait, so the caller
                # may read it (gather) or hand its buffer to the next chunk (scatter) at once.
                torch.cuda.current_stream(layer_set.device).synchronize()
