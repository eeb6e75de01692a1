"""The lm:// protocol: wire format (:mod:`.wire`) and framing over asyncio (:mod:`.framing`), shared
by the client (``connectors/lm.py`` with its connection, ``connectors/lm_client.py``) and the server.
Floor 1: imports nothing from either, which both build on it. docs/lm-protocol.md is the specification."""

from .framing import FrameHandler, FrameReader, FrameWriter, ScratchPool
from .wire import (
    HEADER_SIZE,
    KNOWN_OPS,
    KNOWN_STATUSES,
    MAGIC,
    MAX_ERROR_MESSAGE,
    MISSING,
    OPS_WITH_BODY,
    PROTOCOL_VERSION,
    SHM_MAGIC,
    Header,
    Limits,
    LMServerError,
    Op,
    Status,
    VersionMismatch,
    as_byte_view,
    decode_ids,
    decode_key_page,
    decode_keys,
    decode_leases,
    decode_lengths,
    decode_page_request,
    decode_put_meta,
    encode_ids,
    encode_key_page,
    encode_keys,
    encode_leases,
    encode_lengths,
    encode_page_request,
    encode_put_meta,
    new_buffer,
    pack_header,
    unpack_header,
)

__all__ = [
    "HEADER_SIZE", "KNOWN_OPS", "KNOWN_STATUSES", "MAGIC", "MAX_ERROR_MESSAGE", "MISSING", "OPS_WITH_BODY",
    "PROTOCOL_VERSION", "SHM_MAGIC", "FrameHandler", "FrameReader", "FrameWriter", "Header", "LMServerError",
    "Limits", "Op", "ScratchPool", "Status", "VersionMismatch", "as_byte_view", "decode_ids", "decode_key_page",
    "decode_keys", "decode_leases", "decode_lengths", "decode_page_request", "decode_put_meta", "encode_ids",
    "encode_key_page", "encode_keys", "encode_leases", "encode_lengths", "encode_page_request", "encode_put_meta",
    "new_buffer", "pack_header", "unpack_header",
]
