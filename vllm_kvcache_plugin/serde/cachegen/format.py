"""The CacheGen payload: what follows the package's 64-byte header (which carries dtype, format, shape,
length and checksum). Little-endian, every section aligned to its element size::

    0   4s   magic b"CGEN"
    4   u8   codec version (1)
    5   u8   probability bits (11)
    6   u8   token-wise locality group G (0 = off)
    7   u8   lanes per stream group (64)
    8   u8   tables per lane (1, or 2 with locality: anchor, delta)
    9   u8   E: leading tokens stored exactly (the attention sink; their scales are 0)
    10  2x   reserved (0)
    12  u32  table-bank fingerprint (xxh32 of the alphabets and frequencies)
    16  u8   [R]             half levels C per row (R = planes * layers), zero-padded to 4 bytes
    ..  u32  [groups]        words in each group's stream
    ..  u32  [N]             each lane's initial decoder state (N = R * heads * head_size)
    ..  dtype [R, E, K]      the exact tokens, in the chunk's dtype (K = heads * head_size)
    ..  u16  [R * T]         per-token scale: bf16 bits of max|x|, rounded up
    ..  u16  [N * tables]    table row per lane in its alphabet's bank (anchor rows, then delta rows)
    ..  u16  [sum(words)]    the group streams, back to back

Nothing is unpickled; every count is derived from the header's shape and checked against the length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ...errors import CorruptValueError
from .lanes import LANE_GROUP, PROB_BITS, CodedLanes
from .tables import MAX_HALF_LEVELS

MAGIC = b"CGEN"
CODEC_VERSION = 1
_PREFIX = struct.Struct("<4sBBBBBB2xI")
PREFIX_SIZE = _PREFIX.size
assert PREFIX_SIZE == 16


@dataclass(frozen=True)
class Stream:
    """A parsed payload: numpy views into the buffer (no copies)."""

    locality: int
    fingerprint: int
    exact: np.ndarray  # uint8 [R, E, K * itemsize]: the leading tokens' raw bytes
    half: np.ndarray  # uint8 [R]
    scale_bits: np.ndarray  # uint16 [R, T]
    table_rows: np.ndarray  # uint16 [tables, N]
    coded: CodedLanes


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def payload_size(rows: int, tokens: int, lanes: int, tables: int, words: int, exact_bytes: int = 0) -> int:
    groups = -(-lanes // LANE_GROUP)
    return (PREFIX_SIZE + _pad4(rows) + 4 * groups + 4 * lanes + _pad4(exact_bytes) + 2 * rows * tokens
            + 2 * lanes * tables + 2 * words)


def section_offsets(rows: int, tokens: int, lanes: int, tables: int, exact_bytes: int) -> dict[str, int]:
    """Byte offset of each section in a payload (the layout above, as numbers)."""
    groups = -(-lanes // LANE_GROUP)
    out, pos = {}, PREFIX_SIZE
    for name, size in (("half", _pad4(rows)), ("group_words", 4 * groups), ("states", 4 * lanes),
                       ("exact", _pad4(exact_bytes)), ("scales", 2 * rows * tokens), ("tables", 2 * lanes * tables),
                       ("words", 0)):
        out[name] = pos
        pos += size
    return out


def pack(locality: int, fingerprint: int, half: np.ndarray, exact: np.ndarray, scale_bits: np.ndarray,
         table_rows: np.ndarray, coded: CodedLanes, reserve: int = 0) -> bytearray:
    """The payload, after ``reserve`` zero bytes (room for the caller's header: one buffer, one copy).
    ``exact``: uint8 [R, E, K * itemsize], the leading tokens' raw bytes."""
    rows, tokens = scale_bits.shape
    tables, lanes = table_rows.shape
    size = payload_size(rows, tokens, lanes, tables, len(coded.words), exact.size)
    out = bytearray(reserve + size)
    _PREFIX.pack_into(out, reserve, MAGIC, CODEC_VERSION, PROB_BITS, locality, LANE_GROUP, tables, exact.shape[1],
                      fingerprint)
    pos = reserve + PREFIX_SIZE
    for array, dtype in ((half, np.uint8), (coded.group_words, np.uint32), (coded.states, np.uint32),
                         (exact, np.uint8), (scale_bits, np.uint16), (table_rows, np.uint16),
                         (coded.words, np.uint16)):
        raw = np.ascontiguousarray(array, dtype=dtype).view(np.uint8).ravel()
        out[pos : pos + raw.size] = raw.data
        pos += _pad4(raw.size) if dtype is np.uint8 else raw.size
    assert pos == reserve + size, (pos, size)
    return out


def parse(payload, planes: int, layers: int, tokens: int, channels: int, itemsize: int = 2) -> Stream:
    """Split a payload into its sections, checking every size; CorruptValueError on any mismatch.
    ``itemsize``: bytes per element of the chunk's dtype (for the exact tokens)."""
    view = memoryview(payload).cast("B")
    if view.nbytes < PREFIX_SIZE:
        raise CorruptValueError(f"cachegen payload of {view.nbytes} bytes is shorter than its prefix")
    magic, version, prob_bits, locality, group, tables, exact_tokens, fingerprint = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptValueError(f"cachegen payload has magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != CODEC_VERSION:
        raise CorruptValueError(f"cachegen codec version {version} is not supported (this build reads "
                                f"{CODEC_VERSION})")
    if prob_bits != PROB_BITS or group != LANE_GROUP:
        raise CorruptValueError(f"cachegen stream uses {prob_bits} probability bits / {group} lanes per "
                                f"group; this build uses {PROB_BITS} / {LANE_GROUP}")
    if tables != (2 if locality > 1 else 1):
        raise CorruptValueError(f"cachegen stream has {tables} tables per lane with locality group {locality}")
    if exact_tokens > tokens:
        raise CorruptValueError(f"cachegen stream keeps {exact_tokens} exact tokens of a {tokens}-token chunk")
    rows, lanes = planes * layers, planes * layers * channels
    groups = -(-lanes // LANE_GROUP)
    exact_bytes = rows * exact_tokens * channels * itemsize
    fixed = payload_size(rows, tokens, lanes, tables, 0, exact_bytes)
    if view.nbytes < fixed or (view.nbytes - fixed) % 2:
        raise CorruptValueError(f"cachegen payload of {view.nbytes} bytes does not fit shape "
                                f"{planes}x{layers}x{tokens}x{channels} (truncated?)")
    buf = np.frombuffer(view, np.uint8)
    pos = PREFIX_SIZE

    def take(count: int, dtype, pad: bool = False) -> np.ndarray:
        nonlocal pos
        nbytes = count * np.dtype(dtype).itemsize
        arr = buf[pos : pos + nbytes].view(dtype)
        pos += _pad4(nbytes) if pad else nbytes
        return arr

    half = take(rows, np.uint8, pad=True)
    group_words = take(groups, np.uint32)
    states = take(lanes, np.uint32)
    exact = take(exact_bytes, np.uint8, pad=True).reshape(rows, exact_tokens, channels * itemsize)
    scale_bits = take(rows * tokens, np.uint16).reshape(rows, tokens)
    table_rows = take(lanes * tables, np.uint16).reshape(tables, lanes)
    words = buf[pos:].view(np.uint16)
    if int(half.max(initial=0)) > MAX_HALF_LEVELS:
        raise CorruptValueError(f"cachegen half levels {int(half.max())} exceed {MAX_HALF_LEVELS}")
    if int(group_words.astype(np.int64).sum()) != len(words):
        raise CorruptValueError(f"cachegen group lengths sum to {int(group_words.astype(np.int64).sum())} words, "
                                f"payload holds {len(words)}")
    if ((scale_bits & 0x8000) != 0).any() or ((scale_bits & 0x7F80) == 0x7F80).any():
        raise CorruptValueError("cachegen scale is negative or not finite")
    if scale_bits[:, :exact_tokens].any():
        raise CorruptValueError("cachegen exact tokens must have zero scales")
    return Stream(locality, fingerprint, exact, half, scale_bits, table_rows, CodedLanes(states, group_words, words))
