"""One client connection of the lm server: frames in, commands against the shared store, replies out.

Requests are answered in order as their frames complete; the store is in memory, so every handler
is synchronous and nothing waits on another client. A peer that breaks the protocol gets an error
reply where possible and is disconnected; everyone else is unaffected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import ProtocolError
from ..lm_protocol import (
    KNOWN_OPS,
    OPS_WITH_BODY,
    PROTOCOL_VERSION,
    FrameReader,
    FrameWriter,
    Header,
    Op,
    Status,
    VersionMismatch,
    decode_keys,
    decode_put_meta,
    encode_keys,
    encode_lengths,
    pack_header,
)
from .store import entry_cost

if TYPE_CHECKING:
    from .app import LMServer

logger = logging.getLogger("vllm_kvcache_plugin.server")

MAX_QUEUED_REPLY_BYTES = 8 << 20  # stop reading a client's requests while more than this waits to be sent
MAX_TOKEN_LEN = 4096
CLOSE_GRACE_SECS = 5.0  # a closed connection whose peer does not take its last replies is aborted
SKIP_LIMIT = 1 << 32  # a refused frame's body up to this size is read and discarded, not disconnected


class _RequestError(Exception):
    """Answer this request with an error status; the connection stays open."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Disconnect(Exception):
    """Answer with an error status, then close the connection."""

    def __init__(self, status: Status, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class ServerConnection(asyncio.BufferedProtocol):
    """One client. Implements the :class:`~vllm_kvcache_plugin.lm_protocol.FrameHandler` hooks."""

    def __init__(self, server: LMServer) -> None:
        self.server = server
        self.limits = server.config.limits
        self.reader = FrameReader(self, self.limits.max_meta_len, server.pool)
        self.transport: asyncio.Transport | None = None
        self.writer: FrameWriter | None = None
        self.authenticated = False
        self.connected_at = self.last_data_at = time.monotonic()
        self._reading_paused = False
        self._incoming: list[tuple[bytes, bytearray]] = []
        self._meta_reserved = 0  # a large meta being received is charged to the memory budget
        self._closing_since: float | None = None

    # -- asyncio.BufferedProtocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.writer = FrameWriter(transport)  # type: ignore[arg-type]
        stats = self.server.stats
        if len(self.server.connections) >= self.server.config.max_connections:
            logger.warning("refusing a connection: %d connections open", len(self.server.connections))
            transport.abort()
            return
        self.server.connections.add(self)
        stats.connections += 1
        stats.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.server.stats.connections -= 1
        self._drop_incoming()
        self._unreserve_meta()
        self.reader.release()
        if self.writer is not None:
            self.writer.clear()
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.last_data_at = time.monotonic()
        self.server.stats.bytes_received += nbytes
        try:
            self.reader.buffer_updated(nbytes)
        except _Disconnect as exc:
            self._disconnect(exc.status, str(exc), exc.request_id)
        except VersionMismatch as exc:
            self._disconnect(Status.UNSUPPORTED_VERSION, str(exc))
        except ProtocolError as exc:
            self._disconnect(Status.BAD_REQUEST, str(exc))

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        if self.writer is not None:
            self.writer.pause()

    def resume_writing(self) -> None:
        if self.writer is None:
            return
        self.writer.resume()
        if self._reading_paused and self.writer.queued <= MAX_QUEUED_REPLY_BYTES:
            self._reading_paused = False
            self.last_data_at = time.monotonic()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- FrameHandler ------------------------------------------------------------------------
    def frame_started(self, header: Header) -> bool:
        op = header.code
        if not self.authenticated and op != Op.HELLO:
            raise _Disconnect(Status.UNAUTHORIZED, "the first frame must be HELLO", header.request_id)
        if op == Op.HELLO and header.meta_len > MAX_TOKEN_LEN:
            raise _Disconnect(Status.BAD_REQUEST, f"token over {MAX_TOKEN_LEN} bytes", header.request_id)
        if op not in KNOWN_OPS:
            return self._refuse(header, Status.UNKNOWN_COMMAND, f"unknown command {op}")
        self.server.stats.requests[Op(op).name] += 1
        if op not in OPS_WITH_BODY and header.body_len:
            raise _Disconnect(Status.BAD_REQUEST, f"{Op(op).name} carries no body", header.request_id)
        limit = self.limits.max_value_size if op == Op.PUT else self.server.store.budget
        if header.body_len > limit:
            return self._refuse(header, Status.VALUE_TOO_LARGE, f"{header.body_len} bytes is over the limit of {limit}")
        if header.meta_len > self.server.pool.size:  # a large meta is a buffer too: charge it
            if not self.server.store.reserve(header.meta_len):
                return self._refuse(header, Status.NO_SPACE, "memory is held by values still arriving; retry later")
            self._meta_reserved = header.meta_len
        return True

    def body_targets(self, header: Header, meta: bytes) -> list[memoryview] | None:
        if header.code not in OPS_WITH_BODY:
            return []
        try:
            if header.code == Op.PUT:
                keys, lengths = [self._check_key(meta)], [header.body_len]
            else:
                keys, lengths = decode_put_meta(meta, self.limits.max_batch)
                for key in keys:
                    self._check_key(key)
                if sum(lengths) != header.body_len:
                    raise _Disconnect(Status.BAD_REQUEST, "value lengths do not add up to the body", header.request_id)
            self._allocate(keys, lengths)
        except _RequestError as exc:
            self._unreserve_meta()
            self._reply_error(header.request_id, exc.status, str(exc))
            return None
        return [memoryview(value) for _key, value in self._incoming]

    def frame_received(self, header: Header, meta: bytes, body: list[memoryview]) -> None:
        op, request_id = header.code, header.request_id
        try:
            handler = self._HANDLERS[op]
            status, reply_meta, parts = handler(self, meta)
        except _RequestError as exc:
            self._drop_incoming()
            self._reply_error(request_id, exc.status, str(exc))
            return
        except _Disconnect as exc:
            exc.request_id = request_id
            raise
        finally:
            self._unreserve_meta()
        self._reply(request_id, status, reply_meta, parts)

    # -- commands: each returns (status, reply meta, reply body parts) ----------------------
    def _hello(self, meta: bytes) -> tuple[Status, bytes, list]:
        if not self.server.token_ok(meta):
            peer = self.transport.get_extra_info("peername") if self.transport else None
            logger.warning("bad token from %s", peer)
            raise _Disconnect(Status.UNAUTHORIZED, "bad token")
        self.authenticated = True
        info = {"server": f"vllm-kvcache-plugin {__version__}", "protocol_version": PROTOCOL_VERSION,
                **vars(self.limits)}
        return Status.OK, b"", [json.dumps(info).encode()]

    def _put(self, meta: bytes) -> tuple[Status, bytes, list]:
        store = self.server.store
        for key, value in self._incoming:
            store.commit(key, value)
        self._incoming = []
        return Status.OK, b"", []

    def _get(self, meta: bytes) -> tuple[Status, bytes, list]:
        value = self.server.store.get(self._check_key(meta))
        return (Status.NOT_FOUND, b"", []) if value is None else (Status.OK, b"", [value])

    def _exists(self, meta: bytes) -> tuple[Status, bytes, list]:
        found = self.server.store.contains(self._check_key(meta))
        return Status.OK if found else Status.NOT_FOUND, b"", []

    def _delete(self, meta: bytes) -> tuple[Status, bytes, list]:
        found = self.server.store.delete(self._check_key(meta))
        return Status.OK if found else Status.NOT_FOUND, b"", []

    def _list(self, meta: bytes) -> tuple[Status, bytes, list]:
        if len(meta) > self.limits.max_key_len:
            raise _RequestError(Status.KEY_TOO_LONG, "prefix is longer than the longest key")
        return Status.OK, b"", [encode_keys(self.server.store.keys(meta))]

    def _health(self, meta: bytes) -> tuple[Status, bytes, list]:
        return Status.OK, b"", []

    def _stats(self, meta: bytes) -> tuple[Status, bytes, list]:
        return Status.OK, b"", [json.dumps(self.server.snapshot()).encode()]

    def _batch_exists(self, meta: bytes) -> tuple[Status, bytes, list]:
        store = self.server.store
        return Status.OK, b"", [bytes(store.contains(k) for k in self._decode_keys(meta))]

    def _batch_get(self, meta: bytes) -> tuple[Status, bytes, list]:
        values = [self.server.store.get(k) for k in self._decode_keys(meta)]
        lengths = [-1 if v is None else len(v) for v in values]
        return Status.OK, encode_lengths(lengths), [v for v in values if v]

    def _batch_delete(self, meta: bytes) -> tuple[Status, bytes, list]:
        store = self.server.store
        return Status.OK, b"", [bytes(store.delete(k) for k in self._decode_keys(meta))]

    _HANDLERS = {
        Op.HELLO: _hello, Op.PUT: _put, Op.BATCH_PUT: _put, Op.GET: _get, Op.EXISTS: _exists,
        Op.DELETE: _delete, Op.LIST: _list, Op.HEALTH: _health, Op.STATS: _stats,
        Op.BATCH_EXISTS: _batch_exists, Op.BATCH_GET: _batch_get, Op.BATCH_DELETE: _batch_delete,
    }

    # -- helpers -----------------------------------------------------------------------------
    def _check_key(self, key: bytes) -> bytes:
        if not key:
            raise _RequestError(Status.BAD_REQUEST, "empty key")
        if len(key) > self.limits.max_key_len:
            raise _RequestError(Status.KEY_TOO_LONG, f"key of {len(key)} bytes is over {self.limits.max_key_len}")
        return key

    def _decode_keys(self, meta: bytes) -> list[bytes]:
        try:
            keys = decode_keys(meta, self.limits.max_batch)
        except ProtocolError as exc:
            raise _RequestError(Status.BAD_REQUEST, str(exc)) from None
        for key in keys:
            self._check_key(key)
        return keys

    def _allocate(self, keys: list[bytes], lengths: list[int]) -> None:
        """Buffers for the values about to arrive, charged to the memory budget."""
        store = self.server.store
        if any(n > self.limits.max_value_size for n in lengths):
            raise _RequestError(Status.VALUE_TOO_LARGE, f"a value is over the limit of {self.limits.max_value_size}")
        cost = sum(entry_cost(len(k), n) for k, n in zip(keys, lengths, strict=True))
        if cost > store.budget:
            raise _RequestError(Status.VALUE_TOO_LARGE, f"{cost} bytes is over the memory budget of {store.budget}")
        for key, n in zip(keys, lengths, strict=True):
            buffer = store.allocate(len(key), n)
            if buffer is None:
                self._drop_incoming()
                raise _RequestError(Status.NO_SPACE, "memory is held by values still arriving; retry later")
            self._incoming.append((key, buffer))

    def _unreserve_meta(self) -> None:
        if self._meta_reserved:
            self.server.store.unreserve(self._meta_reserved)
            self._meta_reserved = 0

    def _drop_incoming(self) -> None:
        incoming, self._incoming = self._incoming, []
        for key, buffer in incoming:
            self.server.store.release(len(key), buffer)

    def _refuse(self, header: Header, status: Status, message: str) -> bool:
        """Answer with an error and skip the frame, or disconnect if its body is too big to skip
        (bytes the client would only send to tie the connection up)."""
        if header.body_len > max(4 * self.limits.max_value_size, SKIP_LIMIT):
            raise _Disconnect(status, message, header.request_id)
        self._reply_error(header.request_id, status, message)
        return False

    def _reply(self, request_id: int, status: Status, meta: bytes = b"", parts: list | tuple = ()) -> None:
        transport, writer = self.transport, self.writer
        if transport is None or writer is None or transport.is_closing():
            return
        body_len = sum(len(p) for p in parts)
        head = pack_header(status, request_id, len(meta), body_len) + meta
        self.server.stats.bytes_sent += len(head) + body_len
        if status >= Status.BAD_REQUEST:
            self.server.stats.errors[status.name] += 1
        writer.write_frame(head, parts)
        if writer.queued > MAX_QUEUED_REPLY_BYTES and not self._reading_paused:
            self._reading_paused = True  # a client that does not read its replies sends no more requests
            transport.pause_reading()

    def _reply_error(self, request_id: int, status: Status, message: str) -> None:
        self._reply(request_id, status, b"", [message.encode()[:4096]])

    def _disconnect(self, status: Status, message: str, request_id: int = 0) -> None:
        self.server.stats.protocol_errors += 1
        logger.debug("closing a connection: %s: %s", status.name, message)
        self._reply_error(request_id, status, message)
        self.close()

    def close(self) -> None:
        """Close after the queued replies are sent (a peer that never reads them is aborted later)."""
        self._drop_incoming()
        if self.transport is not None and not self.transport.is_closing():
            self._closing_since = time.monotonic()
            self.transport.close()

    def close_if_stuck(self, now: float) -> None:
        config = self.server.config
        if self._closing_since is not None:
            if now - self._closing_since > CLOSE_GRACE_SECS and self.transport is not None:
                self.transport.abort()
        elif not self.authenticated and now - self.connected_at > config.handshake_timeout_secs:
            self._disconnect(Status.UNAUTHORIZED, "no HELLO in time")
        elif (
            self.reader.mid_frame
            and not self._reading_paused
            and now - self.last_data_at > config.frame_timeout_secs
        ):
            self._disconnect(Status.BAD_REQUEST, "frame not finished in time")
