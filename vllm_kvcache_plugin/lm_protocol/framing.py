"""Framing over an asyncio ``BufferedProtocol``: receive frames into their own buffers
(:class:`FrameReader`) and send them as fast as the socket takes them (:class:`FrameWriter`).
Both are plain objects driven by the protocol's callbacks; neither knows the commands."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

from ..errors import ProtocolError
from .wire import HEADER_SIZE, Header, unpack_header

# -- frame writer ------------------------------------------------------------------------------


class WriteTransport(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


class FrameWriter:
    """Feeds frames to a transport as fast as the socket takes them, never faster.

    asyncio's transport copies whatever the socket does not accept at once into its own buffer;
    written whole, a reply of forty 5.9 MB values would be copied (and the buffer grown) in full.
    This queue holds views of the values instead and hands the transport one part (at most one
    slice) at a time, only when its buffer is empty: at most one slice's tail is ever copied. The
    owning protocol forwards ``pause_writing``/``resume_writing`` here. Slices are large on
    purpose: measured on loopback, each extra pause/resume round costs more CPU than copying the
    tail of a 5.9 MB value.
    """

    SLICE = 8 << 20
    SMALL = 16 * 1024  # header + body up to this size go out as one write

    def __init__(self, transport: WriteTransport) -> None:
        self._transport = transport
        self._queue: deque[memoryview | bytes] = deque()
        self.queued = 0  # bytes not yet handed to the transport
        self._paused = False
        transport.set_write_buffer_limits(high=0)  # pause as soon as anything is buffered

    def write_frame(self, head: bytes, parts: Sequence[bytes | bytearray | memoryview] = ()) -> None:
        body_len = sum(len(p) for p in parts)
        if body_len <= self.SMALL:
            self._queue.append(head + b"".join(parts) if parts else head)
            self.queued += len(head) + body_len
        else:
            self._queue.append(head)
            self._queue.extend(memoryview(p) for p in parts if len(p))
            self.queued += len(head) + body_len
        self._pump()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._pump()

    def clear(self) -> None:
        self._queue.clear()
        self.queued = 0

    @property
    def idle(self) -> bool:
        """Everything queued was handed to the transport and the transport holds none of it (it
        pauses us whenever it buffers anything): the parts' memory may be reused."""
        return not self._queue and not self._paused

    def _pump(self) -> None:
        queue = self._queue
        while queue and not self._paused:
            part = queue[0]
            if len(part) > self.SLICE:
                queue[0] = part[self.SLICE :]
                part = part[: self.SLICE]
            else:
                queue.popleft()
            self.queued -= len(part)
            self._transport.write(part)  # may call pause_writing -> pause() synchronously


# -- incremental frame reader ------------------------------------------------------------------


class FrameHandler(Protocol):
    """What a :class:`FrameReader` calls as a frame arrives (all synchronous, in the loop thread)."""

    def frame_started(self, header: Header) -> bool:
        """Header parsed. False: skip the frame's meta and body. Raise ProtocolError to close."""

    def body_targets(self, header: Header, meta: bytes) -> list[memoryview] | None:
        """Buffers the body is received into, in order (their sizes add up to body_len), or None
        to discard the body."""

    def frame_received(self, header: Header, meta: bytes, body: list[memoryview]) -> None:
        """The whole frame is in."""


class ScratchPool:
    """Reusable receive buffers: a connection holds one only while it has unparsed bytes, so
    thousands of idle connections hold none."""

    def __init__(self, size: int = 64 * 1024, keep: int = 8) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.size)

    def give(self, buf: bytearray) -> None:
        if len(buf) == self.size and len(self._free) < self._keep:
            self._free.append(buf)


_HEADER, _META, _BODY, _SKIP = range(4)
DIRECT_RECEIVE_MIN = 32 * 1024  # body bytes left before recv_into goes straight into the target


class FrameReader:
    """Turns the byte stream of an ``asyncio.BufferedProtocol`` into frames.

    Headers and meta land in a small scratch buffer; a body is received straight into the buffers
    the handler provides (no intermediate copy for large values). Use it from the protocol's
    ``get_buffer``/``buffer_updated``; a :class:`ProtocolError` from either means: close.
    """

    def __init__(self, handler: FrameHandler, max_meta_len: int, pool: ScratchPool | None = None) -> None:
        self._handler = handler
        self._max_meta_len = max_meta_len
        self._pool = pool or ScratchPool(keep=1)
        self._buf: bytearray | None = None
        self._start = 0
        self._end = 0
        self._state = _HEADER
        self._header: Header | None = None
        self._meta = b""
        self._targets: list[memoryview] = []
        self._target_index = 0
        self._target_offset = 0
        self._skip_left = 0
        self._direct = False

    @property
    def mid_frame(self) -> bool:
        """True while part of a frame has arrived (a peer that stops here is stuck or gone)."""
        return self._state != _HEADER or self._start != self._end

    @property
    def body_request_id(self) -> int | None:
        """The request whose reply body is being received into its buffers right now, if any."""
        if self._state == _BODY and self._header is not None:
            return self._header.request_id
        return None

    def get_buffer(self) -> memoryview:
        self._direct = False  # a recv that found nothing leaves no buffer_updated call behind
        if self._state == _BODY:
            target = self._targets[self._target_index]
            if len(target) - self._target_offset >= DIRECT_RECEIVE_MIN:
                self._direct = True
                return target[self._target_offset :]
        if self._state == _HEADER:
            need = HEADER_SIZE
        elif self._state == _META and self._header is not None:
            need = max(1, self._header.meta_len)
        else:
            need = 1
        return self._room_for(need)

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct:
            self._direct = False
            self._target_offset += nbytes
            self._advance_body()
            return
        self._end += nbytes
        try:
            self._parse()
        finally:
            if self._start == self._end and self._buf is not None:
                self._pool.give(self._buf)
                self._buf = None
                self._start = self._end = 0

    def release(self) -> None:
        """Drop the buffers (the connection is gone)."""
        self._buf = None
        self._targets = []
        self._start = self._end = 0

    # -- internals ---------------------------------------------------------------------------
    def _room_for(self, need: int) -> memoryview:
        """A writable view after the unparsed bytes, with ``need`` bytes of the current item
        fitting contiguously from ``_start``."""
        buf = self._buf
        if buf is None:
            buf = self._buf = self._pool.take() if need <= self._pool.size else bytearray(need)
            self._start = self._end = 0
        if len(buf) - self._start < need or self._end == len(buf):
            pending = buf[self._start : self._end]
            if len(buf) < need:
                buf = self._buf = bytearray(max(need, self._pool.size))
            buf[: len(pending)] = pending
            self._start, self._end = 0, len(pending)
        return memoryview(buf)[self._end :]

    def _parse(self) -> None:
        buf = self._buf
        assert buf is not None
        while True:
            available = self._end - self._start
            if self._state == _HEADER:
                if available < HEADER_SIZE:
                    return
                header = unpack_header(buf, self._start)
                self._start += HEADER_SIZE
                if header.meta_len > self._max_meta_len:
                    raise ProtocolError(f"meta of {header.meta_len} bytes is over the limit of {self._max_meta_len}")
                self._header = header
                if self._handler.frame_started(header):
                    self._state = _META
                else:
                    self._state, self._skip_left = _SKIP, header.meta_len + header.body_len
            elif self._state == _META:
                header = self._header
                assert header is not None
                if available < header.meta_len:
                    return
                meta = bytes(memoryview(buf)[self._start : self._start + header.meta_len])
                self._start += header.meta_len
                targets = self._handler.body_targets(header, meta)
                if targets is None:
                    self._state, self._skip_left = _SKIP, header.body_len
                    continue
                if sum(len(t) for t in targets) != header.body_len:
                    raise ProtocolError("body buffers do not add up to the body length")
                self._meta, self._targets = meta, [t for t in targets if len(t)]
                self._target_index = self._target_offset = 0
                self._state = _BODY
                self._advance_body()
            elif self._state == _BODY:
                if available == 0:
                    return
                target = self._targets[self._target_index]
                n = min(available, len(target) - self._target_offset)
                target[self._target_offset : self._target_offset + n] = memoryview(buf)[self._start : self._start + n]
                self._start += n
                self._target_offset += n
                self._advance_body()
            else:  # _SKIP
                n = min(available, self._skip_left)
                self._start += n
                self._skip_left -= n
                if self._skip_left:
                    return
                self._state = _HEADER

    def _advance_body(self) -> None:
        while self._target_index < len(self._targets) and self._target_offset == len(
            self._targets[self._target_index]
        ):
            self._target_index += 1
            self._target_offset = 0
        if self._target_index < len(self._targets):
            return
        header, meta, body = self._header, self._meta, self._targets
        assert header is not None
        self._state, self._header, self._meta, self._targets = _HEADER, None, b"", []
        self._handler.frame_received(header, meta, body)
