"""The fixed header in front of every stored value.

Layout (little-endian, 64 bytes)::

    0  4s   magic b"KVCP"
    4  u8   format version (2; version 1 values, whose byte 28 is always 0, are still read)
    5  u8   serde id (0 naive, 1 cachegen, ...)
    6  u8   dtype code (memory.DTYPE_CODES) of the decoded chunk
    7  u8   KVFormat of the decoded chunk (0 KV, 1 MLA)
    8  5u32 decoded shape (always 5-D canonical)
    28 u32  checksum segment S in bytes (0: one segment, the whole payload)
    32 u64  payload length in bytes
    40 u64  payload checksum: xxh3-64 of the payload when S is 0, else xxh3-64 of the little-endian
            u64 xxh3-64 digests of its S-byte segments (the last may be shorter)
    48 u64  xxh3-64 of bytes 0..47 (so a flipped header bit is caught too)
    56 u64  reserved (must be 0)

Why segments: the naive serde cuts its payload into the chunk's ``(kv, layer)`` slabs, so the CPU
scatter can hash each slab just before it copies it, on every copy thread, and read each byte from
memory once (kernels ``scatter_verified``); a single xxh3 over the payload can only run on one
thread, before the copy.

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
VERSION = 2
READABLE_VERSIONS = (1, 2)
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
    checksum_segment: int = 0


def segment_digests(payload, segment: int) -> bytes:
    """The little-endian u64 xxh3-64 digests of ``payload``'s ``segment``-byte pieces."""
    view = memoryview(payload).cast("B")
    digests = [xxhash.xxh3_64_intdigest(view[i:i + segment]) for i in range(0, view.nbytes, segment)]
    return struct.pack(f"<{len(digests)}Q", *digests)


def combine_digests(digests: bytes) -> int:
    """The payload checksum of a segmented payload, from its segments' digests."""
    return xxhash.xxh3_64_intdigest(digests)


def payload_checksum(payload, segment: int = 0) -> int:
    if not segment:
        return xxhash.xxh3_64_intdigest(payload)
    return combine_digests(segment_digests(payload, segment))


@dataclass(frozen=True, eq=False)
class PayloadCheck:
    """A payload checksum left to the reader (``MemoryObj.defer_check``): called, it hashes the
    payload here; a scatter that hashed the segments as it copied them hands their digests to
    :meth:`matches` instead."""

    payload: memoryview
    expected: int
    segment: int

    def __call__(self) -> bool:
        return payload_checksum(self.payload, self.segment) == self.expected

    def matches(self, digests: bytes) -> bool:
        return bool(self.segment) and combine_digests(digests) == self.expected


def pack_header(serde_id: int, meta: ChunkMeta, payload, segment: int = 0) -> bytes:
    """The 64 header bytes for ``payload`` (any buffer), its checksum over ``segment``-byte pieces
    (0: one piece)."""
    if len(meta.shape) != 5:
        raise ValueError(f"canonical chunks are 5-D, got shape {meta.shape}")
    if not 0 <= segment < 1 << 32:
        raise ValueError(f"checksum segment {segment} does not fit the header's u32")
    view = memoryview(payload)
    prefix = _PREFIX.pack(
        MAGIC, VERSION, serde_id, DTYPE_CODES[meta.dtype], int(meta.fmt), *meta.shape, segment,
        view.nbytes, payload_checksum(view, segment),
    )
    return prefix + _SUFFIX.pack(xxhash.xxh3_64_intdigest(prefix), 0)


def parse_header(data, expected_serde_id: int | None = None, verify: bool = True) -> tuple[Header, memoryview]:
    """Check a stored value and return its header and payload view (no copy)."""
    view = memoryview(data).cast("B")
    if view.nbytes < HEADER_SIZE:
        raise CorruptValueError(f"value of {view.nbytes} bytes is shorter than the {HEADER_SIZE}-byte header")
    prefix = view[: _PREFIX.size]
    (magic, version, serde_id, dtype_code, fmt, s0, s1, s2, s3, s4, segment, length, checksum) = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise CorruptValueError(f"bad magic {bytes(magic)!r} (not a value written by this package)")
    (header_sum, _r2) = _SUFFIX.unpack(view[_PREFIX.size : HEADER_SIZE])
    if header_sum != xxhash.xxh3_64_intdigest(prefix) or _r2 != 0:
        raise CorruptValueError("header checksum mismatch")
    if version not in READABLE_VERSIONS or (version == 1 and segment):
        raise CorruptValueError(f"format version {version} is not supported (this build reads "
                                f"{', '.join(map(str, READABLE_VERSIONS))})")
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
    if verify and payload_checksum(payload, segment) != checksum:
        raise CorruptValueError("payload checksum mismatch")
    meta = ChunkMeta(kv_format, CODE_DTYPES[dtype_code], (s0, s1, s2, s3, s4))
    return Header(serde_id, meta, length, checksum, segment), payload
