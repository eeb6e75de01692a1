"""The reference CPU coder in numpy: one step per token, vectorised across every lane of the chunk.

Always available (no compiler needed) and the executable statement of the stream layout that the C++
and Triton coders must reproduce byte for byte. About 10x slower than the C++ coder: numpy pays a
memory pass per operation, ~20 operations per symbol.
"""

from __future__ import annotations

import numpy as np

from ...errors import CorruptValueError
from .lanes import LANE_GROUP, PROB_BITS, PROB_SCALE, RANS_L, RENORM_SHIFT, CodedLanes, LanePlan, group_offsets

_MASK = PROB_SCALE - 1


def _padded(values: np.ndarray, total: int, fill: int) -> np.ndarray:
    out = np.full(total, fill, np.int64)
    out[: len(values)] = values
    return out


def encode(sym: np.ndarray, plan: LanePlan) -> CodedLanes:
    """``sym`` uint8 [R, T, K] (locality already applied) -> states, per-group word counts, words."""
    n, ng, t_count = plan.lanes, plan.groups, plan.tokens
    padded = ng * LANE_GROUP
    freq = np.append(plan.tables.freq.astype(np.int64), PROB_SCALE)  # sentinel for padding lanes
    cum = np.append(plan.tables.cum.astype(np.int64), 0)
    sentinel = len(freq) - 1
    bases = [_padded(plan.tables.sym_base[rows], padded, sentinel)
             for rows in (plan.anchor_rows, plan.delta_rows)]
    pad_lanes = padded > n
    lanes_sym = sym.transpose(1, 0, 2).reshape(t_count, n)
    cap = LANE_GROUP * t_count
    scratch = np.zeros((ng, cap), np.uint16)
    emitted = np.zeros(ng, np.int64)
    x = np.full(padded, RANS_L, np.int64)
    s = np.zeros(padded, np.int64)
    for t in range(t_count - 1, -1, -1):
        s[:n] = lanes_sym[t]
        off = bases[0 if plan.uses_anchor(t) else 1] + s
        if pad_lanes:
            off[n:] = sentinel
        f = freq[off]
        emit = ((x >> RENORM_SHIFT) >= f).reshape(ng, LANE_GROUP)
        count = emit.sum(1)
        gi, li = np.nonzero(emit)
        if len(gi):
            rank = (np.cumsum(emit, 1) - emit)[gi, li]
            lane = gi * LANE_GROUP + li
            scratch[gi, cap - emitted[gi] - count[gi] + rank] = x[lane] & 0xFFFF
            x[lane] >>= 16
        emitted += count
        q = x // f
        x = (q << PROB_BITS) + (x - q * f) + cum[off]
    words = scratch[np.arange(cap)[None, :] >= (cap - emitted)[:, None]]
    return CodedLanes(x[:n].astype(np.uint32), emitted.astype(np.uint32), words)


def decode(coded: CodedLanes, plan: LanePlan) -> np.ndarray:
    """The symbols uint8 [R, T, K] (still locality-coded); CorruptValueError if any lane disagrees."""
    n, ng, t_count = plan.lanes, plan.groups, plan.tokens
    padded = ng * LANE_GROUP
    ts = plan.tables
    # Padding lanes read a sentinel row: one symbol of frequency 2^P, which leaves the state unchanged.
    sym_lut = np.concatenate([ts.sym_lut, np.zeros(PROB_SCALE, np.uint8)])
    freq_cum = np.append(ts.freq_cum.astype(np.int64), PROB_SCALE)
    lut_bases = [_padded(rows * PROB_SCALE, padded, len(sym_lut) - PROB_SCALE)
                 for rows in (plan.anchor_rows, plan.delta_rows)]
    fc_bases = [_padded(ts.sym_base[rows], padded, len(freq_cum) - 1) for rows in (plan.anchor_rows, plan.delta_rows)]
    offsets = group_offsets(coded.group_words)
    if offsets[-1] != len(coded.words):
        raise CorruptValueError(f"group streams claim {offsets[-1]} words, payload has {len(coded.words)}")
    # Each lane reads at most one word per token: zero padding keeps a corrupt stream's reads in bounds.
    words = np.concatenate([coded.words.astype(np.int64), np.zeros(LANE_GROUP * t_count, np.int64)])
    ptr = offsets[:-1].copy()
    x = _padded(coded.states.astype(np.int64), padded, RANS_L)
    if (x < RANS_L).any():
        raise CorruptValueError("a lane's initial rANS state is below the renormalisation bound")
    out = np.empty((t_count, padded), np.uint8)
    for t in range(t_count):
        which = 0 if plan.uses_anchor(t) else 1
        slot = x & _MASK
        s = sym_lut[lut_bases[which] + slot]
        out[t] = s
        fc = freq_cum[fc_bases[which] + s]
        x = (fc & 0xFFFF) * (x >> PROB_BITS) + slot - (fc >> 16)
        need = (x < RANS_L).reshape(ng, LANE_GROUP)
        gi, li = np.nonzero(need)
        if len(gi):
            rank = (np.cumsum(need, 1) - need)[gi, li]
            lane = gi * LANE_GROUP + li
            x[lane] = (x[lane] << 16) | words[ptr[gi] + rank]
            ptr += need.sum(1)
    if (x != RANS_L).any() or (ptr != offsets[1:]).any():
        raise CorruptValueError("rANS streams do not end where their lengths say (corrupt payload)")
    return np.ascontiguousarray(out[:, :n].reshape(t_count, plan.rows, plan.channels).transpose(1, 0, 2))
