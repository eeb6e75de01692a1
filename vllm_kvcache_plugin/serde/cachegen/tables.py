"""The frequency tables: one fixed bank of discretised Gaussians per alphabet size, chosen per lane by moments.

Why a bank: a full 16-bit CDF per (layer, channel) costs about 2 bits per element at 256 tokens (it is
what holds LMCache near 3.5x). Here a lane's table is one 16-bit index into a bank that both sides
rebuild from this file, so a table costs 16 bits per 256 symbols (0.06 bits per element). The bank is a
grid of Gaussians over (location, variance); the encoder picks the grid point nearest the lane's mean
and variance (moment matching is the cross-entropy optimum within the Gaussian family; measured within
0.005 bits of an exhaustive argmin on SmolLM2 KV).

Determinism: every implementation (numpy, C++, Triton) reads the same integer tables, and the tables
must be the same on every machine that may read a stream. The exact definition is
``f = max(1, floor(p * (2**P - n)))`` with ``p`` the mathematically exact normalised Gaussian weight,
plus the remainder on the most probable symbol. It is computed in float64 and every entry whose product
lies within 1e-9 of an integer is recomputed with ``decimal`` (correctly rounded exp, 40 digits), so no
libm difference can change a table. Grid parameters are exact rationals. A fingerprint of the bank is
written into each stream anyway and checked on read.
"""

from __future__ import annotations

import decimal
import functools
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import xxhash

PROB_BITS = 11
"""rANS probability precision: every table sums to 2**PROB_BITS."""
PROB_SCALE = 1 << PROB_BITS
MAX_HALF_LEVELS = 127
"""C of the widest alphabet (2*C + 1 = 255 symbols fit a byte)."""

VAR_MIN = Fraction(9, 400)  # sigma 0.15 symbols: a channel that hardly moves
VAR_RATIO = Fraction(3, 2)  # consecutive grid variances differ by 1.5x (sigma by 1.22x)
LOC_STEPS_MAX = 32  # at most 2*32+1 locations across [-C, C] (half-symbol steps up to C = 32)

_GUARD = 1e-9


@dataclass(frozen=True)
class Bank:
    """Tables for one alphabet of ``n = 2*half + 1`` symbols (centred symbol s - half in [-half, half])."""

    half: int
    loc_steps: int  # m: locations are half * (j - m) / m, j = 0..2m
    variances: tuple[Fraction, ...]
    freq: np.ndarray  # [rows, n] int64, each row sums to PROB_SCALE, every entry >= 1
    cum: np.ndarray  # [rows, n] int64, exclusive prefix sums of freq
    var_thresholds: np.ndarray  # float64 [len(variances) - 1], geometric midpoints

    @property
    def n(self) -> int:
        return 2 * self.half + 1

    @property
    def rows(self) -> int:
        return self.freq.shape[0]

    @property
    def num_vars(self) -> int:
        return len(self.variances)


def _variance_grid(n: int) -> tuple[Fraction, ...]:
    """Variances from VAR_MIN up to the first one above (2n)^2: flat enough for a near-uniform lane."""
    grid = [VAR_MIN]
    while n > 1 and grid[-1] < 4 * n * n:
        grid.append(grid[-1] * VAR_RATIO)
    return tuple(grid)


def _exact_row(half: int, m: int, j: int, var: Fraction, budget: int) -> np.ndarray:
    """floor(p * budget) computed with correctly rounded decimal exp (the definition; slow, rare)."""
    ctx = decimal.Context(prec=40)
    # (s - mu)^2 = (s*m - half*(j-m))^2 / m^2 ; weight = exp(-(s-mu)^2 / (2 var))
    weights = []
    for s in range(-half, half + 1):
        num = s * m - half * (j - m)
        arg = Fraction(num * num) / (2 * var * m * m) if m else Fraction(0)
        weights.append(ctx.exp(ctx.divide(-decimal.Decimal(arg.numerator), decimal.Decimal(arg.denominator))))
    total = ctx.add(sum(weights[1:], decimal.Decimal(0)), weights[0]) if len(weights) > 1 else weights[0]
    return np.array([int(ctx.divide(ctx.multiply(w, budget), total).to_integral_value(decimal.ROUND_FLOOR))
                     for w in weights], dtype=np.int64)


@functools.cache
def bank(half: int) -> Bank:
    """The bank for alphabet 2*half + 1 (cached; ~10 ms for the usual 15 and 31 symbols)."""
    if not 0 <= half <= MAX_HALF_LEVELS:
        raise ValueError(f"half levels {half} outside 0..{MAX_HALF_LEVELS}")
    n = 2 * half + 1
    m = min(2 * half, LOC_STEPS_MAX)
    variances = _variance_grid(n)
    budget = PROB_SCALE - n
    s = np.arange(-half, half + 1, dtype=np.float64)
    mus = half * (np.arange(2 * m + 1) - m) / m if m else np.zeros(1)
    var = np.array([float(v) for v in variances])
    d2 = (s[None, :] - mus[:, None]) ** 2  # [locs, n]
    w = np.exp(-d2[:, None, :] / (2.0 * var[None, :, None]))  # [locs, vars, n]
    scaled = w / w.sum(-1, keepdims=True) * budget
    floor = np.floor(scaled)
    # Products below 1.5 give 1 whatever the rounding (floor 0 or 1, then max(1, .)); above, an entry
    # within 1e-9 of an integer is the only place a 1-ulp libm difference could change the floor.
    nearest = np.rint(scaled)
    risky = ((scaled >= 1.5) & (np.abs(scaled - nearest) < _GUARD * scaled)).any(-1)
    for j, k in zip(*np.nonzero(risky), strict=True):
        floor[j, k] = _exact_row(half, m, int(j), variances[int(k)], budget)
    freq = np.maximum(floor.astype(np.int64), 1).reshape(-1, n)
    freq[np.arange(len(freq)), freq.argmax(1)] += PROB_SCALE - freq.sum(1)
    cum = np.concatenate([np.zeros((len(freq), 1), np.int64), np.cumsum(freq, 1)[:, :-1]], 1)
    thresholds = np.array([math.sqrt(float(a * b)) for a, b in itertools.pairwise(variances)])
    return Bank(half, m, variances, freq, cum, thresholds)


def select_tables(half: np.ndarray, s1: np.ndarray, s2: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Table row per lane from exact integer moments of its centred symbols (sum, sum of squares, count).

    Integer inputs and IEEE-exact float64 operations only, so every device that computes the same sums
    picks the same rows.
    """
    rows = np.zeros(half.shape, np.int64)
    for h in np.unique(half):
        sel = half == h
        b = bank(int(h))
        if h == 0:
            continue
        cnt = np.maximum(count[sel], 1).astype(np.int64)
        a1, a2 = s1[sel].astype(np.int64), s2[sel].astype(np.int64)
        m = b.loc_steps
        loc = np.clip(np.floor_divide(2 * a1 * m + cnt * h, 2 * cnt * h) + m, 0, 2 * m)
        var = (cnt * a2 - a1 * a1).astype(np.float64) / (cnt.astype(np.float64) ** 2)
        vidx = np.searchsorted(b.var_thresholds, var, side="right")
        rows[sel] = loc * b.num_vars + vidx
    return rows


@dataclass(frozen=True)
class TableSet:
    """The banks of every alphabet in one chunk, concatenated so that a lane is one global row."""

    halves: tuple[int, ...]
    row_base: dict[int, int]  # half -> first global row of its bank
    row_count: dict[int, int]
    sym_base: np.ndarray  # int64 [global rows]: offset of the row in freq / cum
    freq: np.ndarray  # uint32, rows concatenated
    cum: np.ndarray  # uint32, rows concatenated
    fingerprint: int

    def global_rows(self, half: np.ndarray, rows: np.ndarray) -> np.ndarray:
        base = np.zeros(len(half), np.int64)
        for h in self.halves:
            base[half == h] = self.row_base[h]
        return base + rows

    @functools.cached_property
    def sym_lut(self) -> np.ndarray:
        """Decoder lookup, uint8 [global rows * PROB_SCALE]: the symbol owning each slot of each row
        (2 KB a row, so a lane group's 64 rows stay in a 512 KB L2). Built on first use."""
        reps = np.concatenate([bank(h).freq.ravel() for h in self.halves])
        syms = np.concatenate([np.tile(np.arange(bank(h).n, dtype=np.uint8), bank(h).rows) for h in self.halves])
        return np.repeat(syms, reps)

    @functools.cached_property
    def freq_cum(self) -> np.ndarray:
        """uint32 ``freq | cum << 16`` per (row, symbol), laid out like :attr:`freq`."""
        return self.freq | (self.cum << 16)

    @functools.cached_property
    def reciprocal(self) -> np.ndarray:
        """uint64 ``ceil(2**43 / freq)``: ``(x * r) >> 43 == x // freq`` for every 32-bit x (freq <= 2**11)."""
        f = self.freq.astype(np.uint64)
        return ((np.uint64(1) << np.uint64(43)) + f - np.uint64(1)) // f


@functools.lru_cache(maxsize=32)
def table_set(halves: tuple[int, ...]) -> TableSet:
    halves = tuple(sorted(set(halves)))
    row_base, row_count, sym_bases, freqs, cums = {}, {}, [], [], []
    rows = sym_off = 0
    for h in halves:
        b = bank(h)
        row_base[h], row_count[h] = rows, b.rows
        sym_bases.append(sym_off + b.n * np.arange(b.rows, dtype=np.int64))
        freqs.append(b.freq.ravel())
        cums.append(b.cum.ravel())
        rows += b.rows
        sym_off += b.freq.size
    freq = np.concatenate(freqs).astype(np.uint32)
    digest = xxhash.xxh32(np.array(halves, np.int64).tobytes())
    digest.update(freq.tobytes())
    return TableSet(halves, row_base, row_count, np.concatenate(sym_bases), freq,
                    np.concatenate(cums).astype(np.uint32), digest.intdigest())
