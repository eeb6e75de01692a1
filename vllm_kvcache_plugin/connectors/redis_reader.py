"""GET replies received straight into the caller's buffers (``batched_get_into``).

redis-py + hiredis builds a fresh ``bytes`` per value, which the storage layer then copies into a
pooled buffer. Here redis-py still opens the connection (auth, TLS, db, sentinel master, cluster
node, reconnects) and writes the GETs; this module reads the replies off ``conn._sock`` itself:
the ``$<len>\\r\\n`` header through a small stash (at most :data:`_STASH` bytes of a value pass
through it), then ``recv_into`` a view of the caller's buffer, then the ``\\r\\n``. ``$-1`` is a
miss, an error reply comes back as :class:`ReplyError`, a value larger than its buffer is read
into a scratch area and reported by its length.

Why this is safe:
* redis-py's parser holds nothing of our replies: the pool hands out a connection only after
  checking that neither the parser nor the socket has pending data, we check the parser again
  after sending (hiredis ``Reader.has_data()``, the Python parser's ``unread_bytes()``), and we
  consume exactly our replies, so redis-py finds the connection as it left it.
* any failure part-way (time-out, EOF, protocol error, cancellation) disconnects the connection
  before it goes back to the pool: no half-read reply is ever reused.
* no write into a buffer after the call has returned or raised: the connector does not return
  until the worker thread has finished. A cancelled call sets :attr:`CallState.cancelled`, checked
  before every ``recv_into``, and shuts the sockets down so a blocked ``recv_into`` returns at
  once; each ``recv_into`` is bounded anyway by redis-py's socket time-out (half the connector's
  time-out). Receiving into a private buffer and copying would be simpler, but that copy is what
  this module removes.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import ssl
import struct
import termios
import threading
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import redis
from redis.exceptions import InvalidResponse

T = TypeVar("T")

_STASH = 1024  # header bytes read at a time; a value's first bytes may come with them (copied)
_MAX_LINE = 1 << 16  # longest error line accepted
_DRAIN = 1 << 20  # scratch for values too big for their buffer
_AHEAD = 2  # GETs outstanding on a connection, whatever their size ...
_WINDOW = 1 << 20  # ... or more while their buffers add up to no more than this
_LOWAT = 1 << 20  # SO_RCVLOWAT while receiving a value (plain sockets): fewer, larger recv_into


class Cancelled(Exception):
    """The caller gave up (its time-out ran out): stop, write nothing more."""


class ReplyError(str):
    """A server error reply to one GET (``WRONGTYPE ...``, ``MOVED 12 h:p``); the connection is clean."""


class CallState:
    """Shared by the event loop and the worker thread of one call: the cancel flag and the sockets
    in use (shut down on cancel; the lock keeps a socket from closing while it is shut down)."""

    def __init__(self) -> None:
        self.cancelled = self.started = False
        self._lock = threading.Lock()
        self._socks: list[Any] = []

    def begin(self) -> None:
        """The worker's first step: a call cancelled before it started never touches a buffer."""
        with self._lock:
            if self.cancelled:
                raise Cancelled
            self.started = True

    def cancel(self) -> bool:
        """Stop the worker; False when it had not started (then it never will)."""
        with self._lock:
            self.cancelled = True
            for sock in self._socks:
                try:  # socket.socket's own method: SSLSocket.shutdown would drop its SSL state
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass
            return self.started

    def attach(self, sock: Any) -> None:
        with self._lock:
            if self.cancelled:
                raise Cancelled
            self._socks.append(sock)

    def release(self, pool: Any, conn: Any, broken: bool) -> None:
        with self._lock:
            if conn._sock in self._socks:
                self._socks.remove(conn._sock)
            if broken:
                conn.disconnect()
        pool.release(conn)


async def until_stopped(work: Awaitable[T], state: CallState) -> T:
    """Await the worker's call; if the caller is cancelled, stop the worker and, when it had
    started, wait until it has stopped: only then may the cancellation go on to the caller."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if state.cancel():
            while not task.done():
                try:
                    await asyncio.shield(task)
                except BaseException:  # a second cancellation, or the worker's Cancelled: still wait
                    continue
        raise


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # a worker stopped by a cancellation: no "exception never retrieved" warning


def parser_holds_data(conn: Any) -> bool:
    """True when redis-py's parser has buffered bytes (or is a kind we cannot inspect)."""
    parser = conn._parser
    reader = getattr(parser, "_reader", None)  # hiredis
    if reader is not None and hasattr(reader, "has_data"):
        return bool(reader.has_data())
    buffer = getattr(parser, "_buffer", None)  # the pure-Python parser's SocketBuffer
    if buffer is not None and hasattr(buffer, "unread_bytes"):
        return buffer.unread_bytes() > 0
    return True


class ReplyReader:
    """Reads consecutive GET replies off one socket."""

    def __init__(self, sock: Any, state: CallState) -> None:
        self.sock, self.state = sock, state
        self.stash = bytearray(_STASH)
        self.start = self.end = 0
        self.lowat_cap = 0 if isinstance(sock, ssl.SSLSocket) else _LOWAT
        self.lowat = 1

    def _recv(self, view: memoryview) -> int:
        if self.state.cancelled:
            raise Cancelled
        try:
            try:
                n = self.sock.recv_into(view)
            except TimeoutError:  # socket.timeout
                if self.lowat == 1 or not self._queued():
                    raise
                n = self.sock.recv_into(view)  # a slow link, not a stalled one: the bytes are there
        except TimeoutError:
            raise self._failed(redis.TimeoutError("Timeout reading from socket")) from None
        except OSError as exc:
            raise self._failed(redis.ConnectionError(f"Error reading from socket: {exc}")) from None
        if n == 0:
            raise self._failed(redis.ConnectionError("Connection closed by server."))
        return n

    def _failed(self, exc: Exception) -> Exception:
        return Cancelled() if self.state.cancelled else exc  # a shut-down socket fails: say why

    def _fill(self) -> None:
        """Read more bytes into the stash (compacting or growing it first when full)."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.stash):
            pending = self.stash[self.start : self.end]
            if len(pending) >= _MAX_LINE:
                raise InvalidResponse("reply line too long")
            self.stash = bytearray(max(_STASH, 2 * len(pending)))
            self.stash[: len(pending)] = pending
            self.start, self.end = 0, len(pending)
        with memoryview(self.stash) as view:
            self.end += self._recv(view[self.end :])

    def _line(self) -> bytes:
        while (i := self.stash.find(b"\r\n", self.start, self.end)) < 0:
            self._lowat(1)
            self._fill()
        line = bytes(self.stash[self.start : i])
        self.start = i + 2
        return line

    def _take(self, out: memoryview) -> None:
        """Fill ``out``: stashed bytes first, then straight from the socket."""
        pos = min(len(out), self.end - self.start)
        if pos:
            out[:pos] = self.stash[self.start : self.start + pos]
            self.start += pos
        while pos < len(out):
            if self.lowat_cap:  # wake only when this many bytes wait (or the value's rest)
                self._lowat(min(len(out) - pos, self.lowat_cap))
            pos += self._recv(out[pos:])

    def _queued(self) -> int:
        """After a time-out under a low-water mark: the bytes that did arrive. From now on this
        reader wakes for every byte, so the time-out again means "no progress"."""
        self.lowat_cap = 0
        self._lowat(1)
        return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]

    def _lowat(self, nbytes: int) -> None:
        if nbytes != self.lowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
            self.lowat = nbytes

    def read_value(self, out: memoryview) -> int | ReplyError | None:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            try:
                n = int(rest)
            except ValueError:
                raise InvalidResponse(f"bad bulk length {line[:40]!r}") from None
            if n < 0:
                return None
            if n <= len(out):
                self._take(out[:n])
            else:  # does not fit: drain it
                scratch = memoryview(bytearray(min(n, _DRAIN)))
                for left in range(n, 0, -len(scratch)):
                    self._take(scratch[: min(left, len(scratch))])
            while self.end - self.start < 2:
                self._lowat(1)
                self._fill()
            if self.stash[self.start : self.start + 2] != b"\r\n":
                raise InvalidResponse("bulk reply not ended by CRLF")
            self.start += 2
            return n
        if kind == b"_":  # RESP3 null
            return None
        if kind == b"-":
            return ReplyError(rest.decode(errors="replace"))
        raise InvalidResponse(f"unexpected reply {line[:40]!r} to GET")

    def finish(self) -> None:
        """After the last reply: nothing left over, and the socket as redis-py set it up."""
        self._lowat(1)
        if self.start != self.end:
            raise InvalidResponse(f"{self.end - self.start} unexpected bytes after the replies")


Batch = tuple[Any, Sequence[str], Sequence[memoryview]]  # (connection pool, keys, their buffers)


def receive(batches: Sequence[Batch], state: CallState) -> list[list[int | ReplyError | None]]:
    """Each batch's GETs on a connection of its pool, then each reply into its buffer. A broken
    connection (a restarted server) is retried once."""
    state.begin()
    try:
        return _receive_once(batches, state)
    except redis.ConnectionError:
        if state.cancelled:
            raise Cancelled from None
        return _receive_once(batches, state)


class _Sender:
    """Keeps a window of GETs ahead of the reader on one connection: a server given every GET of a
    batch at once copies every value into its reply buffers before it writes the first byte
    (5.9 MB values: 1.2 GB/s here); one or two ahead overlap that copy with the transfer."""

    def __init__(self, conn: Any, keys: Sequence[str], outs: Sequence[memoryview]) -> None:
        self.conn, self.keys, self.outs = conn, keys, outs
        self.sent = self.read = 0

    def send_ahead(self) -> None:
        end = self.sent
        ahead = sum(len(out) for out in self.outs[self.read : end])
        while end < len(self.keys) and (end - self.read < _AHEAD or ahead + len(self.outs[end]) <= _WINDOW):
            ahead += len(self.outs[end])
            end += 1
        if end > self.sent:  # no health check: its PING reply would be read by redis-py's parser
            packed = self.conn.pack_commands([("GET", key) for key in self.keys[self.sent : end]])
            self.conn.send_packed_command(packed, check_health=False)
            self.sent = end


def _receive_once(batches: Sequence[Batch], state: CallState) -> list[list[int | ReplyError | None]]:
    held: list[tuple[Any, Any]] = []
    broken = True
    try:
        senders = []
        for pool, keys, outs in batches:  # every connection's first GETs before any read
            conn = pool.get_connection()
            held.append((pool, conn))
            senders.append(_Sender(conn, keys, outs))
            senders[-1].send_ahead()
            if conn._sock is None or parser_holds_data(conn):
                raise redis.ConnectionError("redis-py's reader holds unread bytes")
            state.attach(conn._sock)
        results = []
        for sender in senders:
            reader = ReplyReader(sender.conn._sock, state)
            answers = []
            for out in sender.outs:
                answers.append(reader.read_value(out))
                sender.read += 1
                sender.send_ahead()
            reader.finish()
            results.append(answers)
        broken = False
        return results
    finally:
        for pool, conn in held:
            state.release(pool, conn, broken)
