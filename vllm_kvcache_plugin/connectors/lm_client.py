"""The client side of a connection to the lm server: an ``asyncio.BufferedProtocol`` that sends
request frames and matches the replies (received straight into their own or the caller's buffers)
to waiting futures by request id. The connector in ``connectors/lm.py`` adds keys, values, batching
and reconnection on top."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import NamedTuple

from ..errors import ConnectorError, ConnectorTimeout, ProtocolError
from ..lm_protocol.framing import FrameReader, FrameWriter, ScratchPool
from ..lm_protocol.wire import (
    KNOWN_STATUSES,
    MAX_ERROR_MESSAGE,
    Header,
    Limits,
    Op,
    Status,
    decode_lengths,
    new_buffer,
    pack_header,
)

RECEIVE_SCRATCH = 256 * 1024
MAX_QUEUED_REQUEST_BYTES = 8 << 20  # a sender waits while more than this waits to be sent
MAX_LIST_BODY = 1 << 31


class Reply(NamedTuple):
    status: Status
    meta: bytes
    body: list[memoryview]


class Pending(NamedTuple):
    future: asyncio.Future
    op: Op
    sent_at: float
    into: Sequence[memoryview | None] | None  # caller's buffers for GET / BATCH_GET values


class ClientConnection(asyncio.BufferedProtocol):
    """The connection: sends frames, matches replies to waiting futures by request id.

    Replies come back in request order, so the oldest pending request is the first to time out:
    one watchdog timer per connection (not one per request) aborts a connection whose oldest
    request has waited longer than ``request_timeout``.
    """

    def __init__(self, where: str, limits: Limits, request_timeout: float) -> None:
        self.where = where
        self.limits = limits
        self.request_timeout = request_timeout
        self.reader = FrameReader(self, max_meta_len=16 << 20, pool=ScratchPool(RECEIVE_SCRATCH, keep=1))
        self.transport: asyncio.Transport | None = None
        self.writer: FrameWriter | None = None
        self.pending: dict[int, Pending] = {}
        self.lost: ConnectorError | None = None
        self._next_id = 0
        self._drain_waiters: list[asyncio.Future] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self.shm = None  # lm_shm.ShmMapping once this connection is attached to the server's arena

    @property
    def usable(self) -> bool:
        return self.lost is None and self.transport is not None and not self.transport.is_closing()

    # -- sending -----------------------------------------------------------------------------
    def send(self, op: Op, meta: bytes = b"", parts: Sequence[memoryview] = (), body_len: int = 0,
             into: Sequence[memoryview | None] | None = None) -> asyncio.Future:
        """Write one request frame now (never interleaved with another) and return its reply future."""
        if not self.usable:
            raise self.lost or ConnectorError(f"{self.where}: connection closed")
        assert self.writer is not None
        request_id = self._next_id
        while request_id in self.pending:
            request_id = (request_id + 1) & 0xFFFFFFFF
        self._next_id = (request_id + 1) & 0xFFFFFFFF
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending[request_id] = Pending(future, op, time.monotonic(), into)
        self.writer.write_frame(pack_header(op, request_id, len(meta), body_len) + meta, parts)
        if self._watchdog is None:
            self._watchdog = loop.call_later(min(1.0, self.request_timeout / 4), self._check_oldest)
        return future

    @property
    def needs_drain(self) -> bool:
        return self.writer is not None and self.writer.queued > MAX_QUEUED_REQUEST_BYTES

    async def drain(self) -> None:
        """Wait until the queue of unsent requests is short again."""
        if self.needs_drain and self.lost is None:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self.lost is not None:
            raise self.lost

    def abort(self, error: ConnectorError) -> None:
        if self.lost is None:
            self.lost = error
        if self.transport is not None:
            self.transport.abort()

    def forget(self, futures: Sequence[asyncio.Future]) -> None:
        """The caller gave up on these requests (a time-out, a cancel): once this returns, no byte
        of their replies lands in the caller's buffers, so the caller may reuse them at once. Later
        replies are discarded as they arrive; a reply already arriving into a caller's buffer can
        only be stopped by dropping the connection (the next call reconnects)."""
        given_up = set(map(id, futures))
        for request_id, entry in list(self.pending.items()):
            if id(entry.future) not in given_up:
                continue
            if not entry.future.done():
                entry.future.cancel()
            if entry.into is not None and self.reader.body_request_id == request_id:
                self.abort(ConnectorError(f"{self.where}: a {entry.op.name} reply was abandoned part-way; "
                                          "reconnecting"))

    def _check_oldest(self) -> None:
        self._watchdog = None
        if not self.pending or self.lost is not None:
            return
        oldest = next(iter(self.pending.values()))
        if time.monotonic() - oldest.sent_at > self.request_timeout:
            self.abort(ConnectorTimeout(f"{self.where}: no reply to {oldest.op.name} "
                                        f"within {self.request_timeout:g}s"))
            return
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(min(1.0, self.request_timeout / 4), self._check_oldest)

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.writer = FrameWriter(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            reason = f": {exc}" if exc else " by the server"
            self.lost = ConnectorError(f"{self.where}: connection closed{reason}")
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self.pending = self.pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(self.lost)
        self._wake_writers()
        self.reader.release()
        if self.writer is not None:
            self.writer.clear()

    def pause_writing(self) -> None:
        if self.writer is not None:
            self.writer.pause()

    def resume_writing(self) -> None:
        if self.writer is not None:
            self.writer.resume()
        if not self.needs_drain:
            self._wake_writers()

    def _wake_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.abort(ConnectorError(f"{self.where}: bad reply from the server: {exc}"))

    # -- FrameHandler ------------------------------------------------------------------------
    def frame_started(self, header: Header) -> bool:
        if header.code not in KNOWN_STATUSES:
            raise ProtocolError(f"unknown status {header.code}")
        return True

    def body_targets(self, header: Header, meta: bytes) -> list[memoryview] | None:
        entry = self.pending.get(header.request_id)
        if entry is None or entry.future.done():  # the caller gave up (cancelled): discard the reply
            self.pending.pop(header.request_id, None)
            return None
        if header.code != Status.OK:
            if header.body_len > MAX_ERROR_MESSAGE:
                raise ProtocolError(f"error message of {header.body_len} bytes")
            return [memoryview(bytearray(header.body_len))] if header.body_len else []
        if entry.op == Op.BATCH_GET:
            lengths = decode_lengths(meta, self.limits.max_batch)
            outs = entry.into or [None] * len(lengths)
            if len(outs) != len(lengths):
                raise ProtocolError("batched GET reply has the wrong number of lengths")
        else:
            if header.body_len > max(self.limits.max_value_size, MAX_LIST_BODY):
                raise ProtocolError(f"reply body of {header.body_len} bytes")
            lengths, outs = [header.body_len], entry.into or [None]
        targets = []
        for n, out in zip(lengths, outs, strict=True):
            if n <= 0:
                continue
            if out is None:
                targets.append(memoryview(new_buffer(n)))
            elif n <= len(out):
                targets.append(out[:n])
            else:
                # Too big for the caller's buffer (a foreign value, say): read it into a throwaway
                # buffer so the other values of the batch still arrive; the caller sees n > len(out).
                targets.append(memoryview(new_buffer(n)))
        return targets

    def frame_received(self, header: Header, meta: bytes, body: list[memoryview]) -> None:
        entry = self.pending.pop(header.request_id, None)
        if entry is not None and not entry.future.done():
            entry.future.set_result(Reply(Status(header.code), meta, body))
