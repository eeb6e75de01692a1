"""The fast CPU coder: ``rans_cpu.cpp`` built on first use with torch.utils.cpp_extension, called through
ctypes (which drops the GIL, so ``threads`` workers decode disjoint lane groups in parallel).

numpy alone tops out far below the 200 MB/s decode bar (it pays a memory pass per operation), hence C++.
The build needs a C++ compiler; :func:`load_library` returns None (and the serde falls back to the
numpy coder) when there is none.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import CorruptValueError
from ...memory import ChunkPlacement
from ...threads import thread_pool
from .lanes import LANE_GROUP, CodedLanes, LanePlan, group_offsets
from .quant import UnsupportedValueError

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rans_cpu.cpp")
_P = ctypes.c_void_p
_I = ctypes.c_int64
_build_lock = threading.Lock()


def _build_dir(tag: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "torch_extensions")
    path = Path(root) / f"vllm_kvcache_cachegen_{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_tag() -> str:
    """The CPU's feature flags: a -march=native build must never be reused on another CPU model."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


# -ffp-contract=off: no fused multiply-adds, so float results match torch's bit for bit. The first set
# is native (AVX2 where the CPU has it: the decoder's eight-lane path); the second, portable, is the
# fallback where -march=native is refused, and builds the scalar code only.
NATIVE = ("-O3", "-funroll-loops", "-fno-math-errno", "-ffp-contract=off", "-march=native")
PORTABLE = ("-O3", "-fno-math-errno", "-ffp-contract=off")
_FLAGS = (NATIVE, PORTABLE)


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    """Build (once per source version and CPU) and load the coder; None if it cannot be built here."""
    errors = []
    for flags in _FLAGS:
        try:
            return build_library(flags)
        except Exception as exc:  # no compiler, no ninja, read-only home, flags refused...
            errors.append(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
    logger.warning("CacheGen C++ coder unavailable (%s); using the slower numpy coder", "; ".join(errors))
    return None


@functools.lru_cache(maxsize=len(_FLAGS))
def build_library(flags: tuple[str, ...]) -> ctypes.CDLL:
    """The coder built with ``flags`` (cached on disk per source version, flags and CPU), loaded."""
    with _build_lock:
        from torch.utils import cpp_extension

        flags = list(flags)
        tag = hashlib.sha256(SOURCE.read_bytes() + repr(flags).encode() + _cpu_tag().encode()).hexdigest()[:12]
        name = f"cachegen_rans_{tag}"
        build = _build_dir(tag)
        library = build / f"{name}.so"
        if not library.exists():
            cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, build_directory=str(build),
                               is_python_module=False, verbose=False)
        lib = ctypes.CDLL(str(library))
    _C = ctypes.c_int
    lib.cg_scales.argtypes = [_P, _C, _I, _I, _P]
    lib.cg_scales.restype = _C
    lib.cg_quantize.argtypes = [_P, _C, _I, _I, _I, _P, _P, _P, _P, _P]
    lib.cg_quantize.restype = None
    lib.cg_encode.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _P, _P, _P]
    lib.cg_encode.restype = None
    lib.cg_pack.argtypes = [_P, _I, _P, _P, _I, _I, _P]
    lib.cg_pack.restype = None
    lib.cg_decode.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _C]
    lib.cg_decode.restype = _C
    lib.cg_decode_placed.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _C, _P]
    lib.cg_decode_placed.restype = _C
    return lib


def _ptr(array) -> int:
    return array.ctypes.data if isinstance(array, np.ndarray) else array.data_ptr()


def _split(groups: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, groups, max(1, min(parts, groups)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


class CppCoder:
    """rANS lanes in C++; ``threads`` workers split the lane groups."""

    name = "cpp"

    def __init__(self, lib: ctypes.CDLL, threads: int = 1) -> None:
        #: What :meth:`run` writes itself (a placed decode among them): others decode through float32.
        self.out_dtypes = tuple(_OUT_KINDS)
        self.lib = lib
        self.threads = max(1, int(threads))
        self._pool = thread_pool(self.threads, "cachegen") if self.threads > 1 else None

    def _run(self, groups: int, fn) -> list:
        return self._run_rows(groups, fn)

    @staticmethod
    def _input(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = x.contiguous() if x.device.type == "cpu" else x.cpu().contiguous()
        if x.dtype == torch.bfloat16:
            return x, 1
        return (x if x.dtype == torch.float32 else x.float()), 0

    def scale_bits(self, x: torch.Tensor) -> torch.Tensor:
        """quant.scale_bits in one pass: int32 [R, T]; raises UnsupportedValueError on NaN/inf."""
        src, kind = self._input(x)
        rows, tokens, channels = src.shape
        bits = torch.empty((rows, tokens), dtype=torch.int32)
        bad = self._run_rows(rows, lambda a, b: self.lib.cg_scales(
            src[a:b].data_ptr(), kind, (b - a) * tokens, channels, bits[a:b].data_ptr()))
        if any(bad):
            raise UnsupportedValueError("chunk holds NaN or inf values; CacheGen encodes finite KV only")
        return bits

    def quantize(self, x: torch.Tensor, step: torch.Tensor, half: np.ndarray):
        """quant.quantize plus each lane's exact moments (sum, sum of squares) over all tokens."""
        src, kind = self._input(x)
        rows, tokens, channels = src.shape
        sym = torch.empty((rows, tokens, channels), dtype=torch.uint8)
        s1 = np.empty(rows * channels, np.int64)
        s2 = np.empty(rows * channels, np.int64)
        half = np.ascontiguousarray(half, dtype=np.int64)
        step32 = step.to(device="cpu", dtype=torch.float32).contiguous()
        self._run_rows(rows, lambda a, b: self.lib.cg_quantize(
            src[a:b].data_ptr(), kind, b - a, tokens, channels, half[a:].ctypes.data, step32[a:b].data_ptr(),
            sym[a:b].data_ptr(), s1[a * channels:].ctypes.data, s2[a * channels:].ctypes.data))
        return sym, s1, s2

    def _run_rows(self, rows: int, fn) -> list:
        ranges = _split(rows, self.threads)
        if self._pool is None or len(ranges) == 1:
            return [fn(a, b) for a, b in ranges]
        return list(self._pool.map(lambda r: fn(*r), ranges))

    def encode(self, sym: torch.Tensor, plan: LanePlan) -> CodedLanes:
        sym_np = np.ascontiguousarray(sym.cpu().numpy())
        ts = plan.tables
        fc_anchor = np.ascontiguousarray(ts.sym_base[plan.anchor_rows])
        fc_delta = np.ascontiguousarray(ts.sym_base[plan.delta_rows])
        sel = plan.token_table_select()
        groups, tokens = plan.groups, plan.tokens
        scratch = np.empty((groups, LANE_GROUP * tokens), np.uint16)
        states = np.empty(plan.lanes, np.uint32)
        counts = np.empty(groups, np.uint32)
        self._run(groups, lambda a, b: self.lib.cg_encode(
            _ptr(sym_np), plan.rows, tokens, plan.channels, _ptr(fc_anchor), _ptr(fc_delta), _ptr(sel),
            _ptr(ts.freq), _ptr(ts.cum), _ptr(ts.reciprocal), a, b, _ptr(scratch), _ptr(states), _ptr(counts)))
        offsets = group_offsets(counts)
        words = np.empty(int(offsets[-1]), np.uint16)
        self._run(groups, lambda a, b: self.lib.cg_pack(_ptr(scratch), tokens, _ptr(counts), _ptr(offsets), a, b,
                                                        _ptr(words)))
        return CodedLanes(states, counts, words)

    def decode_into(self, coded: CodedLanes, plan: LanePlan, step: torch.Tensor, out: torch.Tensor) -> None:
        writes = out.dtype in _OUT_KINDS
        target = out if writes and out.is_contiguous() and out.device.type == "cpu" else \
            torch.empty(out.shape, dtype=torch.float32)
        self.run(self.prepare(coded, plan, step), target)
        if target is not out:
            limit = torch.finfo(out.dtype).max
            out.copy_(target.clamp_(-limit, limit))

    def prepare(self, coded: CodedLanes, plan: LanePlan, step: torch.Tensor) -> PreparedDecode:
        """Everything a decode needs but the decode itself, in arrays of its own (none is a view of
        the payload, so its buffer may be reused at once): the Python part of a decode, done where
        the value arrives, so that what a load's scatter step runs is the native loop alone."""
        offsets = group_offsets(coded.group_words)
        if offsets[-1] != len(coded.words):
            raise CorruptValueError(f"group streams claim {offsets[-1]} words, payload has {len(coded.words)}")
        # Padded by 64 words a token and 8 more: the decoder reads one word per lane and token
        # unconditionally, eight at a time where it decodes eight lanes at once.
        words = np.zeros(len(coded.words) + LANE_GROUP * plan.tokens + 8, np.uint16)
        words[: len(coded.words)] = coded.words
        return PreparedDecode(plan, words, offsets, np.array(coded.states, np.uint32),
                              np.ascontiguousarray(plan.anchor_rows), np.ascontiguousarray(plan.delta_rows),
                              plan.token_table_select(), np.ascontiguousarray(plan.half, dtype=np.int64),
                              step.to(device="cpu", dtype=torch.float32).contiguous())

    def run(self, prepared: PreparedDecode, out: torch.Tensor | None = None, placement: ChunkPlacement | None = None,
            exact: torch.Tensor | None = None) -> None:
        """Decode into ``out`` (contiguous CPU float32 or bfloat16 [R, T, K]) or, given ``placement``
        (bfloat16 or float32), through it, with the chunk's ``exact`` leading tokens [R, E, K]
        written there too. CorruptValueError on a bad stream (a placement may be partly written)."""
        plan = prepared.plan
        ts = plan.tables
        if placement is None:
            assert out is not None and out.is_contiguous() and out.dtype in _OUT_KINDS
            kind, target, fields = _OUT_KINDS[out.dtype], _ptr(out), None
        else:
            kind, target = _OUT_KINDS[placement.dtype], 0
            if exact is None or exact.dtype != placement.dtype or tuple(exact.shape[::2]) != (plan.rows, plan.channels):
                raise ValueError("a placed decode needs the chunk's exact tokens [R, E, K] in its dtype")
            exact = exact.contiguous()
            fields = np.array([_ptr(placement.rows), _ptr(placement.tokens), _ptr(placement.channels),
                               plan.rows // placement.planes, placement.first, placement.last, _ptr(exact),
                               exact.shape[1]], np.int64)
        results = self._run(plan.groups, lambda a, b: self.lib.cg_decode_placed(
            _ptr(prepared.words), _ptr(prepared.offsets), _ptr(prepared.states), _ptr(prepared.anchor),
            _ptr(prepared.delta), _ptr(ts.sym_base), _ptr(prepared.select), _ptr(ts.sym_lut), _ptr(ts.freq_cum),
            _ptr(prepared.half), _ptr(prepared.step), plan.rows, plan.tokens, plan.channels, plan.locality, a, b,
            target, kind, None if fields is None else _ptr(fields)))
        if any(results):
            raise CorruptValueError("rANS streams are corrupt (over-read, or states/lengths do not match)")


_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1}
"""Output dtypes the native decoder writes (others decode to float32, then convert)."""


@dataclass(frozen=True, eq=False)
class PreparedDecode:
    """A parsed CacheGen value, ready for :meth:`CppCoder.run`."""

    plan: LanePlan
    words: np.ndarray
    offsets: np.ndarray
    states: np.ndarray
    anchor: np.ndarray
    delta: np.ndarray
    select: np.ndarray
    half: np.ndarray
    step: torch.Tensor
