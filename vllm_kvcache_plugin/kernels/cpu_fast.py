"""CPU fast path: a small C + OpenMP library (cpu_copy.c), compiled on first use and called via ctypes.

Why not torch ops: a token's head row is a few hundred bytes, and per-row torch indexing runs at a
tenth of memory bandwidth. Why not a torch C++ extension: compiling against torch's headers takes a
minute on two cores; this file needs only a C compiler and builds in about a second. The library is
cached under ``$VLLM_KVCACHE_KERNEL_CACHE`` (default ``~/.cache/vllm_kvcache_plugin``), keyed by
a hash of its source, flags and compiler, and written atomically so concurrent processes can race.
``VLLM_KVCACHE_CPU_STREAMING=0`` turns off the non-temporal stores (for A/B timing).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from .copier import CopyGeometry, KVCopier, check_copy_args, host_threads, slot_error
from .layouts import Packing, PagedKVSpec

SOURCE = Path(__file__).with_name("cpu_copy.c")
CACHE_ENV = "VLLM_KVCACHE_KERNEL_CACHE"
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_PACKING_CODES = {Packing.PLAIN: 0, Packing.CPU_VEC: 1, Packing.CPU_AMX: 2}
_ABI_VERSION = 4
_BUILD_TIMEOUT_S = 120
STREAMING = os.environ.get("VLLM_KVCACHE_CPU_STREAMING", "1") != "0"


class _KVArgs(ctypes.Structure):
    """Mirror of ``KVArgs`` in cpu_copy.c (field order matters)."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "num_layers", "num_tokens", "num_heads", "block_size", "head_size", "num_kv", "elem_size", "packing")] + [
        ("layer_addrs", ctypes.POINTER(ctypes.c_int64)),
        ("slots", ctypes.POINTER(ctypes.c_int64)),
    ] + [(name, ctypes.c_int64) for name in (
        "layer_stride_block", "layer_stride_head", "layer_stride_token", "chunk_addr",
        "chunk_stride_kv", "chunk_stride_layer", "chunk_stride_token", "chunk_stride_head", "num_slots",
        "streaming")]


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc/clang) on PATH to build the CPU fast path")
    return compiler


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vllm_kvcache_plugin")
    return Path(root) / "kernels"


def build_library(verbose: bool = False) -> Path:
    """Compile cpu_copy.c into the cache (once per source/flags/compiler) and return the .so path."""
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot run the C compiler {compiler}: {exc}") from exc
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = _cache_dir() / f"libkvcopy-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".libkvcopy-", suffix=".so", dir=target.parent)
    os.close(fd)
    command = [compiler, *FLAGS, str(SOURCE), "-o", partial]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"building the CPU fast path failed: {' '.join(command)}: {result.stderr.strip()[:500]}")
        if verbose and result.stderr:
            print(result.stderr)
        os.replace(partial, target)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"building the CPU fast path timed out after {_BUILD_TIMEOUT_S}s") from exc
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


_load_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_error: str | None = None


def load_library() -> ctypes.CDLL:
    """Build (if needed) and load the library once per process; a failure is remembered, not retried."""
    global _library, _load_error
    with _load_lock:
        if _load_error is not None:
            raise RuntimeError(_load_error)
        if _library is None:
            try:
                library = ctypes.CDLL(str(build_library()))
            except (OSError, RuntimeError) as exc:
                _load_error = f"CPU fast path unavailable: {exc}"
                raise RuntimeError(_load_error) from exc
            if library.kv_abi_version() != _ABI_VERSION:
                raise RuntimeError(f"stale CPU fast path library (ABI {library.kv_abi_version()} != {_ABI_VERSION})")
            for name in ("kv_gather", "kv_scatter"):
                function = getattr(library, name)
                function.argtypes = [ctypes.POINTER(_KVArgs), ctypes.c_int]
                function.restype = ctypes.c_int64
            library.kv_scatter_verified.argtypes = [ctypes.POINTER(_KVArgs), ctypes.c_int, ctypes.c_void_p,
                                                    ctypes.c_void_p]
            library.kv_scatter_verified.restype = ctypes.c_int64
            library.kv_hash_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                             ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            library.kv_hash_copy.restype = ctypes.c_int64
            _library = library
        return _library


@functools.cache
def _xxh3_function() -> int | None:
    """The address of ``XXH3_64bits`` in the xxhash module's own library (the checksum's one
    implementation, already loaded), or None when it does not export it: then no fused verify."""
    try:
        import xxhash._xxhash as module

        return ctypes.cast(ctypes.CDLL(module.__file__).XXH3_64bits, ctypes.c_void_p).value
    except (ImportError, OSError, AttributeError):
        return None


def hash_copy(src: torch.Tensor, dst: torch.Tensor | None, segment: int) -> bytes | None:
    """The xxh3-64 digests of ``src``'s ``segment``-byte pieces (little-endian u64, the order of
    ``serde.header.segment_digests``), each piece copied into ``dst`` (when given) right after it is
    hashed, on up to :func:`host_threads` threads (ctypes releases the GIL). For a GPU cache's
    verify-and-stage pass. None, with nothing copied, where the library or the hash is unavailable
    or a tensor is not a contiguous CPU tensor of the same bytes."""
    nbytes = src.numel() * src.element_size()
    if (src.device.type != "cpu" or not src.is_contiguous() or segment <= 0
            or (dst is not None and (dst.device.type != "cpu" or not dst.is_contiguous()
                                     or dst.numel() * dst.element_size() != nbytes))):
        return None
    xxh3 = _xxh3_function()
    try:
        library = load_library()
    except RuntimeError:
        return None
    if xxh3 is None:
        return None
    digests = (ctypes.c_uint64 * (-(-nbytes // segment)))()
    status = library.kv_hash_copy(src.data_ptr(), None if dst is None else dst.data_ptr(), nbytes, segment,
                                  host_threads(), xxh3, digests)
    return bytes(digests) if status == 0 else None


class CpuCopier(KVCopier):
    """OpenMP copies of contiguous runs (and tiled transposes for the CPU attention packings)."""

    name = "cpu"

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        self._xxh3 = _xxh3_function()

    @classmethod
    def create(cls) -> CpuCopier:
        return cls(load_library())

    checks_slots = True  # the kernel range-checks every slot before it copies anything

    def _reachable(self, chunk: torch.Tensor, geo: CopyGeometry) -> torch.Tensor:
        if geo.layer_set.device.type != "cpu":
            raise ValueError(f"the cpu copier needs CPU layers, got {geo.layer_set.device}")
        return super()._reachable(chunk, geo)

    def _copy(self, geo: CopyGeometry, spec: PagedKVSpec, slots: torch.Tensor, chunk: torch.Tensor,
              gather: bool) -> None:
        function = self._library.kv_gather if gather else self._library.kv_scatter
        self._call(function, spec, slots, chunk, geo, "gather" if gather else "scatter")

    def scatter_verified(self, layers: Sequence[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                         src: torch.Tensor) -> bytes | None:
        if self._xxh3 is None or not src.is_contiguous() or src.device.type != "cpu" or src.numel() == 0:
            return None
        geo = check_copy_args(layers, spec, slots, src, "src", check_slots=False)
        if geo.layer_set.device.type != "cpu":
            return None
        digests = (ctypes.c_uint64 * (src.shape[0] * src.shape[1]))()
        self._call(lambda args, threads: self._library.kv_scatter_verified(args, threads, self._xxh3, digests),
                   spec, slots, src, geo, "scatter")
        return bytes(digests)

    @staticmethod
    def _call(function, spec: PagedKVSpec, slots: torch.Tensor, chunk: torch.Tensor, geo: CopyGeometry,
              what: str) -> None:
        # The kernel range-checks every slot before it copies anything (no separate min/max pass).
        slots = slots.to(device="cpu", dtype=torch.int64).contiguous()
        addresses = (ctypes.c_int64 * geo.num_layers)(*geo.layer_set.addresses)
        args = _KVArgs(
            geo.num_layers, geo.num_tokens, spec.num_kv_heads, spec.block_size, spec.head_size, spec.num_kv,
            spec.element_size, _PACKING_CODES[spec.packing],
            addresses, ctypes.cast(slots.data_ptr(), ctypes.POINTER(ctypes.c_int64)),
            *geo.layer_strides, chunk.data_ptr(), *geo.chunk_strides,
            geo.layer_set.num_blocks * spec.block_size, int(STREAMING),
        )
        status = function(ctypes.byref(args), host_threads())
        if status > 0:
            raise slot_error(int(slots[status - 1]), geo.layer_set)
        if status < 0:
            raise MemoryError(f"cpu {what}: could not allocate working memory for {geo.num_tokens} tokens")
