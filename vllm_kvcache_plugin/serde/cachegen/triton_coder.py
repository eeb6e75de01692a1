"""The Triton twin of the CPU coders: one program per lane group of 64 lanes, one lane per thread.

Byte-identical to ``rans_numpy`` / ``rans_cpu.cpp`` by construction: the same integer rANS steps, and
the per-step word order (ascending lanes) comes from an exclusive ``tl.cumsum`` over the group's
renormalising lanes instead of a sequential pointer. Quantisation and table choice run before it in
torch on the same device (IEEE float32 division and round-half-even, exact integer moments), so a GPU
writes the stream a CPU writes. Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow:
tests use small shapes).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ...errors import CorruptValueError
from .lanes import LANE_GROUP, PROB_BITS, PROB_SCALE, RANS_L, RENORM_SHIFT, CodedLanes, LanePlan


@triton.jit
def _encode_kernel(sym, fc_anchor, fc_delta, sel, freq, cum, scratch, states, counts, T, K, n_lanes,
                   BLOCK: tl.constexpr, PBITS: tl.constexpr, SHIFT: tl.constexpr, LOW: tl.constexpr):
    g = tl.program_id(0)
    lane = g * BLOCK + tl.arange(0, BLOCK)
    valid = lane < n_lanes
    row = lane // K
    base = row.to(tl.int64) * T * K + lane % K
    fa = tl.load(fc_anchor + lane, mask=valid, other=0)
    fd = tl.load(fc_delta + lane, mask=valid, other=0)
    x = tl.full((BLOCK,), LOW, tl.int64)
    cap = BLOCK * T
    pos = cap
    for i in range(T):
        t = T - 1 - i
        s = tl.load(sym + base + t * K, mask=valid, other=0).to(tl.int64)
        off = tl.where(tl.load(sel + t) != 0, fd, fa) + s
        f = tl.load(freq + off, mask=valid, other=1 << PBITS).to(tl.int64)  # padding: one symbol, no output
        c = tl.load(cum + off, mask=valid, other=0).to(tl.int64)
        emit = (x >> SHIFT) >= f
        e = emit.to(tl.int32)
        n = tl.sum(e, axis=0)
        rank = tl.cumsum(e, axis=0) - e
        tl.store(scratch + g.to(tl.int64) * cap + pos - n + rank, (x & 0xFFFF).to(tl.int32), mask=emit)
        pos -= n
        x = tl.where(emit, x >> 16, x)
        q = x // f
        x = (q << PBITS) + (x - q * f) + c
    tl.store(states + lane, x, mask=valid)
    tl.store(counts + g, cap - pos)


@triton.jit
def _decode_kernel(words, offsets, states, lut_anchor, lut_delta, fc_anchor, fc_delta, sel, sym_lut, freq_cum,
                   half, step, out, errors, T, K, n_lanes, LIMIT: tl.constexpr, LOCALITY: tl.constexpr,
                   BF16: tl.constexpr, BLOCK: tl.constexpr, PBITS: tl.constexpr, LOW: tl.constexpr):
    """Grid (groups, chunks): chunk c's per-lane arrays start at c * n_lanes, its steps at c * R * T,
    its output at c * R * T * K; ``offsets`` holds absolute word positions, groups + 1 per chunk."""
    g = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    groups = tl.num_programs(0)
    rows = n_lanes // K
    lane = g * BLOCK + tl.arange(0, BLOCK)
    valid = lane < n_lanes
    at = c * n_lanes + lane
    row = lane // K
    obase = c * rows * T * K + row.to(tl.int64) * T * K + lane % K
    sbase = c * rows * T + row.to(tl.int64) * T
    x = tl.load(states + at, mask=valid, other=LOW)
    bad = tl.sum((x < LOW).to(tl.int32), axis=0)
    la = tl.load(lut_anchor + at, mask=valid, other=0)
    ld = tl.load(lut_delta + at, mask=valid, other=0)
    fa = tl.load(fc_anchor + at, mask=valid, other=0)
    fd = tl.load(fc_delta + at, mask=valid, other=0)
    centre = tl.load(half + row, mask=valid, other=0).to(tl.int32)
    anchor = tl.zeros((BLOCK,), tl.int32)
    ptr = tl.load(offsets + c * (groups + 1) + g)
    end = tl.load(offsets + c * (groups + 1) + g + 1)
    mask = (1 << PBITS) - 1
    for t in range(T):
        delta = tl.load(sel + t) != 0
        slot = x & mask
        s = tl.load(sym_lut + tl.where(delta, ld, la) + slot, mask=valid, other=0).to(tl.int32)
        fcv = tl.load(freq_cum + tl.where(delta, fd, fa) + s, mask=valid, other=0).to(tl.int64)
        st = (fcv & 0xFFFF) * (x >> PBITS) + slot - (fcv >> 16)
        need = (st < LOW) & valid
        e = need.to(tl.int32)
        where = ptr + tl.cumsum(e, axis=0) - e
        w = tl.load(words + where, mask=need & (where < end), other=0).to(tl.int64) & 0xFFFF
        x = tl.where(need, (st << 16) | w, tl.where(valid, st, x))
        ptr += tl.sum(e, axis=0)
        if LOCALITY > 1:
            if t % LOCALITY == 0:
                anchor = s
            else:
                n = 2 * centre + 1
                s = s + anchor - centre
                s = tl.where(s >= n, s - n, tl.where(s < 0, s + n, s))
        v = (s - centre).to(tl.float32) * tl.load(step + sbase + t, mask=valid, other=0.0)
        v = tl.minimum(tl.maximum(v, -LIMIT), LIMIT)  # a rounded-up scale never decodes to inf
        if BF16:  # round half to even by hand: the same bits as the C++ coder on every backend
            bits = v.to(tl.int32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(out + obase + t * K, (bits >> 16).to(tl.int16), mask=valid)
        else:
            tl.store(out + obase + t * K, v.to(out.dtype.element_ty), mask=valid)
    bad += tl.sum((valid & (x != LOW)).to(tl.int32), axis=0)
    bad += (ptr != end).to(tl.int32)
    tl.store(errors + c * groups + g, bad)


class TritonCoder:
    """rANS lanes as Triton programs on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, device: str | torch.device = "cuda") -> None:
        self.device = torch.device(device)
        self._tables: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def _dev(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # a view into the received bytes: torch wants writable memory
            array = array.copy()
        return torch.from_numpy(array).to(device=self.device, dtype=dtype)

    def _table_tensors(self, plan: LanePlan) -> dict[str, torch.Tensor]:
        key = (plan.tables.fingerprint, str(self.device))
        if key not in self._tables:
            ts = plan.tables
            self._tables[key] = {
                "freq": self._dev(ts.freq.astype(np.int32), torch.int32),
                "cum": self._dev(ts.cum.astype(np.int32), torch.int32),
                "sym_lut": self._dev(ts.sym_lut, torch.uint8),
                "freq_cum": self._dev(ts.freq_cum.astype(np.int32), torch.int32),
            }
        return self._tables[key]

    def encode(self, sym: torch.Tensor, plan: LanePlan) -> CodedLanes:
        tables = self._table_tensors(plan)
        sym = sym.to(self.device).contiguous()
        groups, tokens = plan.groups, plan.tokens
        fc_anchor = self._dev(plan.tables.sym_base[plan.anchor_rows], torch.int64)
        fc_delta = self._dev(plan.tables.sym_base[plan.delta_rows], torch.int64)
        sel = self._dev(plan.token_table_select(), torch.uint8)
        cap = LANE_GROUP * tokens
        scratch = torch.zeros(groups * cap, dtype=torch.int32, device=self.device)
        states = torch.empty(plan.lanes, dtype=torch.int64, device=self.device)
        counts = torch.empty(groups, dtype=torch.int64, device=self.device)
        _encode_kernel[(groups,)](sym, fc_anchor, fc_delta, sel, tables["freq"], tables["cum"], scratch, states,
                                  counts, tokens, plan.channels, plan.lanes, BLOCK=LANE_GROUP, PBITS=PROB_BITS,
                                  SHIFT=RENORM_SHIFT, LOW=RANS_L)
        # Concatenate the right-aligned group streams (word w of group g sits at g*cap + cap - count + w).
        starts = torch.cumsum(counts, 0) - counts
        group_of = torch.repeat_interleave(torch.arange(groups, device=self.device), counts)
        index = torch.arange(group_of.numel(), device=self.device)
        source = group_of * cap + cap - counts[group_of] + (index - starts[group_of])
        words = scratch[source]
        return CodedLanes(states.cpu().numpy().astype(np.uint32), counts.cpu().numpy().astype(np.uint32),
                          words.cpu().numpy().astype(np.uint16))

    def prepare_decode(self, coded: list[CodedLanes], plans: list[LanePlan], steps: list[torch.Tensor],
                       out: torch.Tensor, exact: list[torch.Tensor] | None = None):
        """Upload a batch of same-shape chunks and return ``launch()``, which decodes all of them in one
        kernel into ``out`` [chunks, ...] (then writes their ``exact`` leading tokens [R, E, K]) and
        returns the per-(chunk, group) error counts."""
        plan = plans[0]
        if any(p.half.tolist() != plan.half.tolist() or p.locality != plan.locality for p in plans):
            raise ValueError("a decode batch needs chunks of one shape, bins and locality")
        tables = self._table_tensors(plan)
        counts = [c.group_words.astype(np.int64) for c in coded]
        if any(int(n.sum()) != len(c.words) for n, c in zip(counts, coded, strict=True)):
            raise CorruptValueError("group streams do not add up to the payload's words")
        bases = np.cumsum([0] + [len(c.words) for c in coded])
        offsets = np.concatenate([base + np.concatenate([[0], np.cumsum(n)]) for base, n in
                                  zip(bases[:-1], counts, strict=True)])
        words = np.concatenate([c.words for c in coded] + [np.zeros(1, np.uint16)]).view(np.int16)
        ts = plan.tables
        anchor = np.concatenate([p.anchor_rows for p in plans])
        delta = np.concatenate([p.delta_rows for p in plans])
        args = [self._dev(words, torch.int16), self._dev(offsets, torch.int64),
                self._dev(np.concatenate([c.states for c in coded]).astype(np.int64), torch.int64),
                self._dev(anchor * PROB_SCALE, torch.int64), self._dev(delta * PROB_SCALE, torch.int64),
                self._dev(ts.sym_base[anchor], torch.int64), self._dev(ts.sym_base[delta], torch.int64),
                self._dev(plan.token_table_select(), torch.uint8), tables["sym_lut"], tables["freq_cum"],
                self._dev(plan.half, torch.int64),
                torch.stack([s.to(device=self.device, dtype=torch.float32) for s in steps]).contiguous()]
        bf16 = out.dtype == torch.bfloat16
        target = out.view(torch.int16) if bf16 else out
        errors = torch.zeros(len(coded) * plan.groups, dtype=torch.int32, device=self.device)

        exact_all = torch.stack([e.to(self.device) for e in exact]) if exact else None

        def launch() -> torch.Tensor:
            _decode_kernel[(plan.groups, len(coded))](
                *args, target, errors, plan.tokens, plan.channels, plan.lanes, LIMIT=torch.finfo(out.dtype).max,
                LOCALITY=max(plan.locality, 0), BF16=bf16, BLOCK=LANE_GROUP, PBITS=PROB_BITS, LOW=RANS_L)
            if exact_all is not None:
                view = out.view(len(coded), plan.rows, plan.tokens, plan.channels)
                view[:, :, : exact_all.shape[2]] = exact_all
            return errors

        return launch

    def decode_into(self, coded: CodedLanes, plan: LanePlan, step: torch.Tensor, out: torch.Tensor) -> None:
        target = out if out.is_contiguous() and out.device == self.device else \
            torch.empty(out.shape, dtype=out.dtype, device=self.device)
        errors = self.prepare_decode([coded], [plan], [step], target)()
        if bool(errors.any()):
            raise CorruptValueError("rANS streams are corrupt (over-read, or states/lengths do not match)")
        if target is not out:
            out.copy_(target)
