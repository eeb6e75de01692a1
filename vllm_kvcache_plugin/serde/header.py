"""The fixed header in front of every stored value.

Layout (little-endian, 64 bytes)::

    0  4s   magic b"KVCP"
    4  u8   format version (1)
    5  u8   serde id (0 naive, 1 cachegen, ...)
    6  u8   dtype code (memory.DTYPE_CODES) of the decoded chunk
    7  u8   KVFormat of the decoded chunk (0 KV, 1 MLA)
    8  5u32 decoded shape (always 5-D canonical)
    28 u32  reserved (0)
    32 u64  payload length in bytes
    40 u64  xxh3-64 of the payload
    48 u64  xxh3-64 of bytes 0..47 (so a flipped header bit is caught too)
    56 u64  reserved (must be 0)

A value whose magic, version, length or checksums do not match raises CorruptValueError, which
the storage layer turns into a miss; nothing in a value is ever unpickled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from ..errors import CorruptValueError
from ..memory import CODE_DTYPES, DTYPE_CODES, ChunkMeta, KVFormat

MAGIC = b"KVCP"
VERSION = 1
_PREFIX = struct.Struct("<4sBBBB5IIQQ")  # 48 bytes, covered by header_checksum
_SUFFIX = struct.Struct("<QQ")
HEADER_SIZE = _PREFIX.size + _SUFFIX.size
assert HEADER_SIZE == 64


@dataclass(frozen=True)
class Header:
    serde_id: int
    meta: ChunkMeta
    payload_length: int
    payload_checksum: int


def payload_checksum(payload) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def pack_header(serde_id: int, meta: ChunkMeta, payload) -> bytes:
    """The 64 header bytes for ``payload`` (any buffer)."""
    if len(meta.shape) != 5:
        raise ValueError(f"canonical chunks are 5-D, got shape {meta.shape}")
    view = memoryview(payload)
    prefix = _PREFIX.pack(
        MAGIC, VERSION, serde_id, DTYPE_CODES[meta.dtype], int(meta.fmt), *meta.shape, 0,
        view.nbytes, payload_checksum(view),
    )
    return prefix + _SUFFIX.pack(xxhash.xxh3_64_intdigest(prefix), 0)


def parse_header(data, expected_serde_id: int | None = None, verify: bool = True) -> tuple[Header, memoryview]:
    """Check a stored value and return its header and payload view (no copy)."""
    view = memoryview(data).cast("B")
    if view.nbytes < HEADER_SIZE:
        raise CorruptValueError(f"value of {view.nbytes} bytes is shorter than the {HEADER_SIZE}-byte header")
    prefix = view[: _PREFIX.size]
    (magic, version, serde_id, dtype_code, fmt, s0, s1, s2, s3, s4, _r, length, checksum) = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise CorruptValueError(f"bad magic {bytes(magic)!r} (not a value written by this package)")
    (header_sum, _r2) = _SUFFIX.unpack(view[_PREFIX.size : HEADER_SIZE])
    if header_sum != xxhash.xxh3_64_intdigest(prefix) or _r2 != 0:
        raise CorruptValueError("header checksum mismatch")
    if version != VERSION:
        raise CorruptValueError(f"format version {version} is not supported (this build reads {VERSION})")
    if expected_serde_id is not None and serde_id != expected_serde_id:
        raise CorruptValueError(f"value was written by serde id {serde_id}, expected {expected_serde_id}")
    if dtype_code not in CODE_DTYPES:
        raise CorruptValueError(f"unknown dtype code {dtype_code}")
    try:
        kv_format = KVFormat(fmt)
    except ValueError:
        raise CorruptValueError(f"unknown chunk format {fmt}") from None
    payload = view[HEADER_SIZE:]
    if payload.nbytes != length:
        raise CorruptValueError(f"payload is {payload.nbytes} bytes, header says {length} (truncated?)")
    if verify and payload_checksum(payload) != checksum:
        raise CorruptValueError("payload checksum mismatch")
    meta = ChunkMeta(kv_format, CODE_DTYPES[dtype_code], (s0, s1, s2, s3, s4))
    return Header(serde_id, meta, length, checksum), payload
