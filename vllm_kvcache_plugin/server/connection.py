"""One client connection of the lm server: framing, flow control and time-outs around the commands.

Requests are answered in order as their frames complete; the store is in memory, so every command
(commands.py) is synchronous and nothing waits on another client. A peer that breaks the protocol
gets an error reply where possible and is disconnected; everyone else is unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..errors import ProtocolError
from ..lm_protocol import (
    OPS_WITH_BODY,
    FrameReader,
    FrameWriter,
    Header,
    Op,
    Status,
    VersionMismatch,
    pack_header,
)
from .commands import Commands, Disconnect, RequestError
from .state import ServerState

logger = logging.getLogger("vllm_kvcache_plugin.server")

MAX_QUEUED_REPLY_BYTES = 8 << 20  # stop reading a client's requests while more than this waits to be sent
MAX_TOKEN_LEN = 4096
CLOSE_GRACE_SECS = 5.0  # a closed connection whose peer does not take its last replies is aborted
SKIP_LIMIT = 1 << 32  # a refused frame's body up to this size is read and discarded, not disconnected


class ServerConnection(asyncio.BufferedProtocol):
    """One client. Implements the :class:`~vllm_kvcache_plugin.lm_protocol.FrameHandler` hooks."""

    def __init__(self, server: ServerState) -> None:
        self.server = server
        self.limits = server.config.limits
        self.reader = FrameReader(self, self.limits.max_meta_len, server.pool)
        self.transport: asyncio.Transport | None = None
        self.writer: FrameWriter | None = None
        self.commands = Commands(server, self._peer)
        self.connected_at = self.last_data_at = time.monotonic()
        self._reading_paused = False
        self._meta_reserved = 0  # a large meta being received is charged to the memory budget
        self._closing_since: float | None = None

    @property
    def authenticated(self) -> bool:
        return self.commands.authenticated

    def _peer(self) -> object:
        return self.transport.get_extra_info("peername") if self.transport else None

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
        self.commands.drop_incoming()
        self._unreserve_meta()
        self.reader.release()
        if self.writer is not None:
            self.writer.clear()
        self.commands.unpin()  # the transport is gone: nothing reads the replies' memory any more
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.last_data_at = time.monotonic()
        self.server.stats.bytes_received += nbytes
        try:
            self.reader.buffer_updated(nbytes)
        except Disconnect as exc:
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
        if self.commands.sending and self.writer.idle:
            self.commands.unpin()
        if self._reading_paused and self.writer.queued <= MAX_QUEUED_REPLY_BYTES:
            self._reading_paused = False
            self.last_data_at = time.monotonic()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- FrameHandler ------------------------------------------------------------------------
    def frame_started(self, header: Header) -> bool:
        op = header.code
        if not self.authenticated and op != Op.HELLO:
            raise Disconnect(Status.UNAUTHORIZED, "the first frame must be HELLO", header.request_id)
        if op == Op.HELLO and header.meta_len > MAX_TOKEN_LEN:
            raise Disconnect(Status.BAD_REQUEST, f"token over {MAX_TOKEN_LEN} bytes", header.request_id)
        if not self.commands.handles(op):
            return self._refuse(header, Status.UNKNOWN_COMMAND, f"unknown command {op}")
        self.server.stats.requests[Op(op).name] += 1
        if op not in OPS_WITH_BODY and header.body_len:
            raise Disconnect(Status.BAD_REQUEST, f"{Op(op).name} carries no body", header.request_id)
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
            return self.commands.body_buffers(header.code, meta, header.body_len, header.request_id)
        except RequestError as exc:
            self._unreserve_meta()
            self._reply_error(header.request_id, exc.status, str(exc))
            return None

    def frame_received(self, header: Header, meta: bytes, body: list[memoryview]) -> None:
        op, request_id = header.code, header.request_id
        try:
            status, reply_meta, parts = self.commands.run(op, meta)
        except RequestError as exc:
            self.commands.drop_incoming()
            self._reply_error(request_id, exc.status, str(exc))
            return
        except Disconnect as exc:
            exc.request_id = request_id
            raise
        finally:
            self._unreserve_meta()
        self._reply(request_id, status, reply_meta, parts)

    # -- helpers -----------------------------------------------------------------------------
    def _unreserve_meta(self) -> None:
        if self._meta_reserved:
            self.server.store.unreserve(self._meta_reserved)
            self._meta_reserved = 0

    def _refuse(self, header: Header, status: Status, message: str) -> bool:
        """Answer with an error and skip the frame, or disconnect if its body is too big to skip
        (bytes the client would only send to tie the connection up)."""
        if header.body_len > max(4 * self.limits.max_value_size, SKIP_LIMIT):
            raise Disconnect(status, message, header.request_id)
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
        if self.commands.sending and writer.idle:
            self.commands.unpin()
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
        self.commands.drop_incoming()
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
