"""The lm:// wire protocol, shared by the server and its client connector.

Every message is one frame: a 20-byte little-endian header, then ``meta_len`` bytes of meta (keys,
length tables), then ``body_len`` bytes of body (values)::

    0  2s  magic b"KV"
    2  u8  protocol version (1)
    3  u8  opcode (request) or status (response)
    4  u32 request id (a response carries its request's id: requests may be pipelined)
    8  u32 meta length
    12 u64 body length

Values never travel in the meta, so a receiver knows every value's length before its bytes arrive
and can receive it straight into a buffer of its own (see :mod:`.framing`). docs/lm-protocol.md
describes each command. This module imports nothing from the connectors or the server.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ConnectorError, ProtocolError

MAGIC = b"KV"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<2sBBIIQ")
HEADER_SIZE = HEADER.size  # 20
MISSING = -1  # a batched GET's length for a key that is not stored
MAX_ERROR_MESSAGE = 4096
SHM_MAGIC = b"LMKVSHM1"  # offset 0 of the shared-memory arena, followed by its 16-byte id


class Op(enum.IntEnum):
    HELLO = 1
    PUT = 2
    GET = 3
    EXISTS = 4
    DELETE = 5
    LIST = 6
    HEALTH = 7
    STATS = 8
    BATCH_EXISTS = 9
    BATCH_GET = 10
    BATCH_PUT = 11
    BATCH_DELETE = 12
    # Shared memory (same host; the HELLO reply says ``"shm": true`` where the server offers it).
    SHM_ATTACH = 13  # -> JSON: the unix socket to fetch the arena's fd from, a one-time nonce, ...
    BATCH_GET_LEASE = 14  # key list -> lease table: where each value lies in the arena, under a lease
    LEASE_RELEASE = 15  # lease id list -> one byte per lease: 1 still valid, 0 expired or unknown
    LIST_PAGE = 16  # page size, cursor, prefix -> next cursor; a key page (keys and value sizes)


class Status(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_REQUEST = 2
    UNKNOWN_COMMAND = 3
    KEY_TOO_LONG = 4
    VALUE_TOO_LARGE = 5
    NO_SPACE = 6
    UNAUTHORIZED = 7
    UNSUPPORTED_VERSION = 8
    SERVER_ERROR = 9


OPS_WITH_BODY = frozenset({Op.PUT, Op.BATCH_PUT})
KNOWN_OPS = frozenset(int(op) for op in Op)
KNOWN_STATUSES = frozenset(int(s) for s in Status)


@dataclass(frozen=True)
class Limits:
    """What a server accepts; sent to the client in the HELLO reply."""

    max_key_len: int = 4096
    max_value_size: int = 1 << 30
    max_batch: int = 4096
    max_meta_len: int = 1 << 20


class LMServerError(ConnectorError):
    """The server answered a request with an error status (or the client refused to send it)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""


class Header(NamedTuple):  # a NamedTuple: built once per frame on the hot path
    code: int  # an Op in a request, a Status in a response
    request_id: int
    meta_len: int
    body_len: int
    version: int = PROTOCOL_VERSION


def pack_header(code: int, request_id: int, meta_len: int = 0, body_len: int = 0) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, code, request_id, meta_len, body_len)


def unpack_header(data: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    """Parse and check a header; a wrong magic or version is a :class:`ProtocolError`."""
    magic, version, code, request_id, meta_len, body_len = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})")
    return Header(code, request_id, meta_len, body_len, version)


def _uninitialized_allocator():
    try:
        import ctypes

        new = ctypes.pythonapi.PyByteArray_FromStringAndSize
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
        return lambda nbytes: new(None, nbytes)
    except (ImportError, AttributeError):  # not CPython
        return bytearray


_new_uninitialized = _uninitialized_allocator()


def new_buffer(nbytes: int) -> bytearray:
    """A bytearray for a value about to be received into it. Large ones skip ``bytearray(n)``'s
    zero fill (measured: a third of the cost of receiving a 5.9 MB value); their bytes are
    only handed out once fully overwritten."""
    return bytearray(nbytes) if nbytes < 65536 else _new_uninitialized(nbytes)


def as_byte_view(value: object) -> memoryview:
    """A flat byte view of any C-contiguous buffer (bytes, bytearray, numpy arrays, ...)."""
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"a value must be bytes-like (buffer protocol), not {type(value).__name__}") from None
    if view.ndim == 1 and view.format in ("B", "b", "c"):
        return view if view.format == "B" else view.cast("B")
    if not view.c_contiguous:
        raise TypeError("a value must be a C-contiguous buffer")
    return view.cast("B")


# -- meta encodings ----------------------------------------------------------------------------
# A key list:            u32 count, count x u32 key lengths, the keys' bytes.
# A batched PUT's meta:  u32 count, count x u32 key lengths, count x u64 value lengths, the keys.
# A batched GET reply:   u32 count, count x i64 value lengths (MISSING = -1); the body holds the
#                        found values back to back.
# A lease table:         u32 count, count x (i64 length (MISSING = -1), i64 offset, i64 lease id).
# A lease id list:       u32 count, count x i64 lease ids.
# A LIST_PAGE request:   u32 page size, u64 cursor, the prefix's bytes; its reply's meta is the u64
#                        next cursor (0: complete), its body a key page: a key list, then count x
#                        u64 value sizes.


def encode_keys(keys: Sequence[bytes]) -> bytes:
    n = len(keys)
    return struct.pack(f"<I{n}I", n, *map(len, keys)) + b"".join(keys)


def decode_keys(meta: bytes | memoryview, max_count: int) -> list[bytes]:
    _count, lengths, offset = _read_count_and(meta, "I", max_count)
    return _split_keys(meta, offset, lengths)


def encode_put_meta(keys: Sequence[bytes], value_lengths: Sequence[int]) -> bytes:
    n = len(keys)
    return struct.pack(f"<I{n}I{n}Q", n, *map(len, keys), *value_lengths) + b"".join(keys)


def decode_put_meta(meta: bytes | memoryview, max_count: int) -> tuple[list[bytes], list[int]]:
    count, key_lengths, offset = _read_count_and(meta, "I", max_count)
    end = offset + 8 * count
    if len(meta) < end:
        raise ProtocolError("batched PUT meta is shorter than its length table")
    value_lengths = list(struct.unpack_from(f"<{count}Q", meta, offset))
    return _split_keys(meta, end, key_lengths), value_lengths


def encode_lengths(lengths: Sequence[int]) -> bytes:
    n = len(lengths)
    return struct.pack(f"<I{n}q", n, *lengths)


def decode_lengths(meta: bytes | memoryview, max_count: int) -> list[int]:
    _count, lengths, offset = _read_count_and(meta, "q", max_count)
    if offset != len(meta):
        raise ProtocolError("length table has trailing bytes")
    if any(n < MISSING for n in lengths):
        raise ProtocolError("length table holds a negative length")
    return lengths


def _read_count_and(meta: bytes | memoryview, item: str, max_count: int) -> tuple[int, list[int], int]:
    if len(meta) < 4:
        raise ProtocolError("meta is too short for its count")
    (count,) = struct.unpack_from("<I", meta, 0)
    if count > max_count:
        raise ProtocolError(f"batch of {count} items is over the limit of {max_count}")
    size = struct.calcsize(f"<{count}{item}")
    if len(meta) < 4 + size:
        raise ProtocolError("meta is shorter than its length table")
    return count, list(struct.unpack_from(f"<{count}{item}", meta, 4)), 4 + size


def _split_keys(meta: bytes | memoryview, offset: int, lengths: Sequence[int]) -> list[bytes]:
    if offset + sum(lengths) != len(meta):
        raise ProtocolError("key lengths do not add up to the meta length")
    keys = []
    for n in lengths:
        keys.append(bytes(meta[offset : offset + n]))
        offset += n
    return keys


PAGE_REQUEST = struct.Struct("<IQ")
CURSOR = struct.Struct("<Q")


def encode_page_request(page_size: int, cursor: int, prefix: bytes) -> bytes:
    return PAGE_REQUEST.pack(page_size, cursor) + prefix


def decode_page_request(meta: bytes | memoryview) -> tuple[int, int, bytes]:
    """(page size, cursor, prefix)."""
    if len(meta) < PAGE_REQUEST.size:
        raise ProtocolError("LIST_PAGE meta is shorter than its page size and cursor")
    page_size, cursor = PAGE_REQUEST.unpack_from(meta)
    return page_size, cursor, bytes(meta[PAGE_REQUEST.size :])


def encode_key_page(next_cursor: int, keys: Sequence[bytes], sizes: Sequence[int]) -> tuple[bytes, bytes]:
    """A LIST_PAGE reply's (meta, body)."""
    return CURSOR.pack(next_cursor), encode_keys(keys) + struct.pack(f"<{len(sizes)}Q", *sizes)


def decode_key_page(meta: bytes | memoryview, body: bytes | memoryview,
                    max_count: int) -> tuple[int, list[bytes], list[int]]:
    """(next cursor, keys, value sizes) of a LIST_PAGE reply."""
    if len(meta) != CURSOR.size:
        raise ProtocolError("LIST_PAGE reply meta is not a cursor")
    count, lengths, offset = _read_count_and(body, "I", max_count)
    end = offset + sum(lengths)
    if len(body) != end + 8 * count:
        raise ProtocolError("key page length does not match its counts")
    keys = _split_keys(body[:end], offset, lengths)
    return CURSOR.unpack(meta)[0], keys, list(struct.unpack_from(f"<{count}Q", body, end))


def encode_leases(entries: Sequence[tuple[int, int, int]]) -> bytes:
    n = len(entries)
    return struct.pack(f"<I{3 * n}q", n, *(x for entry in entries for x in entry))


def decode_leases(meta: bytes | memoryview, max_count: int) -> list[tuple[int, int, int]]:
    """(length, offset, lease id) per key; MISSING length for a key not stored."""
    if len(meta) < 4:
        raise ProtocolError("meta is too short for its count")
    (count,) = struct.unpack_from("<I", meta, 0)
    if count > max_count:
        raise ProtocolError(f"batch of {count} items is over the limit of {max_count}")
    if len(meta) != 4 + 24 * count:
        raise ProtocolError("lease table length does not match its count")
    flat = struct.unpack_from(f"<{3 * count}q", meta, 4)
    entries = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, 3 * count, 3)]
    if any(n < MISSING or off < 0 for n, off, _ in entries):
        raise ProtocolError("lease table holds a negative length or offset")
    return entries


def encode_ids(ids: Sequence[int]) -> bytes:
    return encode_lengths(ids)


def decode_ids(meta: bytes | memoryview, max_count: int) -> list[int]:
    _count, ids, offset = _read_count_and(meta, "q", max_count)
    if offset != len(meta):
        raise ProtocolError("id list has trailing bytes")
    return ids
