"""How symbols map onto rANS lanes, and what every coder (numpy, C++, Triton) is given.

A chunk's symbols are ``[R, T, K]``: R = planes * layers rows, T tokens, K = heads * head_size channels.
Lane ``r * K + k`` codes channel k of row r, token by token, with its own table (one per (layer,
channel): channels differ far more than tokens do). Lanes are cut into groups of ``LANE_GROUP``
consecutive lanes; a group's lanes share one stream of 16-bit words, interleaved in decode order:

    for t in 0..T-1: for lane in group (ascending): decode symbol t of lane;
                                                    if state < 2**16: state = state << 16 | next word

The encoder is the exact mirror (tokens and lanes descending, words prepended). Each lane starts
(decoder side) from a 32-bit state stored beside the streams, and must end at exactly ``RANS_L``
with its group's stream fully consumed: the decoder checks both (a corrupt stream is detected even
without the header checksum). With token-wise locality, tokens ``t % G != 0`` use the lane's second
("delta") table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tables import PROB_BITS, PROB_SCALE, TableSet

LANE_GROUP = 64
RANS_L = 1 << 16
"""Lower bound of the rANS state; states live in [RANS_L, 2**32)."""
RENORM_SHIFT = 32 - PROB_BITS


@dataclass(frozen=True)
class LanePlan:
    rows: int
    tokens: int
    channels: int
    locality: int  # token group size; <= 1 means off
    half: np.ndarray  # int64 [R] half levels per row
    tables: TableSet
    anchor_rows: np.ndarray  # int64 [N] global table row per lane (tokens t % G == 0, or all)
    delta_rows: np.ndarray  # int64 [N] global table row per lane for the other tokens

    @property
    def lanes(self) -> int:
        return self.rows * self.channels

    @property
    def groups(self) -> int:
        return -(-self.lanes // LANE_GROUP)

    def uses_anchor(self, t: int) -> bool:
        return self.locality <= 1 or t % self.locality == 0

    def token_table_select(self) -> np.ndarray:
        """uint8 [T]: 0 where a token uses the anchor table, 1 where the delta table."""
        t = np.arange(self.tokens)
        return np.zeros(self.tokens, np.uint8) if self.locality <= 1 else (t % self.locality != 0).astype(np.uint8)


@dataclass(frozen=True)
class CodedLanes:
    """A coder's output: what the wire format stores besides scales and tables."""

    states: np.ndarray  # uint32 [N]
    group_words: np.ndarray  # uint32 [groups]
    words: np.ndarray  # uint16 [sum(group_words)]


def group_offsets(group_words: np.ndarray) -> np.ndarray:
    """int64 [groups + 1] start of each group's stream in ``words``."""
    out = np.zeros(len(group_words) + 1, np.int64)
    np.cumsum(group_words, out=out[1:])
    return out


__all__ = ["LANE_GROUP", "PROB_BITS", "PROB_SCALE", "RANS_L", "RENORM_SHIFT", "CodedLanes", "LanePlan",
           "group_offsets"]
