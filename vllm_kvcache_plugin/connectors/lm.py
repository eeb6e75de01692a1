"""``lm://host:port[?token=SECRET]``: the client of our own lm server (``python -m vllm_kvcache_plugin.server``).

One TCP connection carries every request, pipelined: each request gets an id, replies are matched by
id, so many coroutines can wait on one connection at once. Replies are received straight into
their own buffers (``asyncio.BufferedProtocol``), and a value is written after its header without
being joined to it. A batched exists or get is one frame and one round trip.

A connector instance belongs to the event loop it first connects on (the storage layer runs one
loop in a background thread); calling it from another running loop raises :class:`ConnectorError`.
Any transport or protocol failure, or a time-out, raises :class:`ConnectorError` and drops the
connection; the next call connects again. Settings (``remote_options``): ``request_timeout_secs``
(default 30, per request) and ``token`` (if not in the URL); connecting (TCP + HELLO) is bounded by
``blocking_timeout_secs``. ``?shm=auto|on|off`` (default auto): read values through the server's
shared memory when it runs on this host (lm_shm.py), else over TCP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import fields

from ..config import KVCacheConfig
from ..errors import ConnectorError, URLError
from ..lm_protocol import (
    MISSING,
    Limits,
    LMServerError,
    Op,
    Status,
    as_byte_view,
    decode_key_page,
    decode_keys,
    decode_lengths,
    encode_keys,
    encode_page_request,
    encode_put_meta,
)
from .base import DEFAULT_PAGE_SIZE, Buffer, KeyPage, RemoteConnector
from .lm_client import ClientConnection, Reply
from .lm_shm import MODES, Leased, ShmClient
from .url import RemoteURL

logger = logging.getLogger(__name__)
MAX_LISTED_KEYS = 1 << 31


class LMConnector(RemoteConnector):
    schemes = ("lm",)
    supports_get_into = True
    listing = "paged"

    def __init__(self, url: RemoteURL, config: KVCacheConfig | None = None) -> None:
        super().__init__(url, config)
        shown = url.redacted().split("?", 1)[0]  # the token lives in the query: never in a message
        if len(url.hosts) != 1 or url.port is None:
            raise URLError(f"remote URL {shown!r}: lm:// needs one host:port, e.g. lm://127.0.0.1:65432")
        if url.path not in ("", "/"):
            raise URLError(f"remote URL {shown!r}: lm:// takes no path")
        unknown = sorted(set(url.query) - {"token", "shm"})
        if unknown:
            raise URLError(f"remote URL {shown!r}: unknown option(s) {', '.join(unknown)}; allowed: token, shm")
        options = self.config.remote_options
        shm_mode = str(url.query.get("shm") or options.get("shm") or "auto").lower()
        if shm_mode not in MODES:
            raise URLError(f"remote URL {shown!r}: shm={shm_mode!r}; allowed: {', '.join(MODES)}")
        self.host, self.port = url.host, url.port
        self.where = f"lm://{self.host}:{self.port}"  # never includes the token
        self._token = str(url.query.get("token") or options.get("token") or "").encode()
        self._connect_timeout = self.config.blocking_timeout_secs
        self._request_timeout = _positive_option(options, "request_timeout_secs", 30.0)
        self.limits = Limits()
        self.server_info: dict = {}
        self._proto: ClientConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._last_failure: tuple[float, ConnectorError] | None = None
        self._shm = ShmClient(self.where, shm_mode)
        self._told_old_server = False

    def __repr__(self) -> str:
        return f"LMConnector({self.where!r})"

    # -- lifecycle ---------------------------------------------------------------------------
    async def connect(self) -> None:
        await self._connection()

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None and self._loop is asyncio.get_running_loop():
            proto.transport.close()
        await super().close()

    async def ping(self) -> bool:
        try:
            await self._call(Op.HEALTH)
            return True
        except ConnectorError:
            return False

    async def stats(self) -> dict:
        """The server's STATS (keys, bytes, budget, hits, misses, evictions, connections, requests)."""
        reply = await self._call(Op.STATS)
        return json.loads(_joined(reply.body))

    # -- shared memory (lm_shm.py) -------------------------------------------------------------
    @property
    def shm_active(self) -> bool:
        """True while the connection reads values through the server's shared memory."""
        proto = self._proto
        return proto is not None and proto.usable and proto.shm is not None

    @property
    def shm_stats(self) -> dict:
        return dict(self._shm.stats)

    async def batched_get_leased(self, keys: Sequence[str]) -> list[Leased | None]:
        """Each value as a read-only view of the shared mapping under a lease (None: a miss). The
        caller must check ``deadline`` after reading and call ``release`` when done (batched)."""
        return await self._shm.get_leased(self, keys)

    # -- single keys -------------------------------------------------------------------------
    async def exists(self, key: str) -> bool:
        return (await self._call(Op.EXISTS, self._key(key))).status == Status.OK

    async def get(self, key: str) -> Buffer | None:
        reply = await self._call(Op.GET, self._key(key))
        if reply.status == Status.NOT_FOUND:
            return None
        return reply.body[0].obj if reply.body else bytearray()  # type: ignore[return-value]

    async def get_into(self, key: str, out: Buffer) -> int | None:
        """Receive the value of ``key`` straight into ``out`` (a writable buffer, e.g. a pooled
        tensor's memory, so no new pages are touched); returns its length, or None for a miss.
        A value larger than ``out`` is read and dropped: its length (> ``len(out)``) says so."""
        reply = await self._call(Op.GET, self._key(key), into=[_writable_view(out)])
        return None if reply.status == Status.NOT_FOUND else sum(len(b) for b in reply.body)

    async def put(self, key: str, value: Buffer) -> None:
        view = self._value(value)
        await self._call(Op.PUT, self._key(key), [view], view.nbytes)

    async def delete(self, key: str) -> bool:
        return (await self._call(Op.DELETE, self._key(key))).status == Status.OK

    async def list(self, prefix: str = "") -> list[str]:
        reply = await self._call(Op.LIST, prefix.encode("utf-8"))
        return _decoded(decode_keys(_joined(reply.body), MAX_LISTED_KEYS))

    async def scan(self, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[KeyPage]:
        """LIST_PAGE pages with their values' sizes (the server caps ``page_size`` at ``max_batch``,
        so this does too); a server without LIST_PAGE lists in one LIST reply instead, sizes unknown."""
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        raw = prefix.encode("utf-8")
        await self._connection()  # the server's limits
        page_size = min(page_size, self.limits.max_batch)
        cursor = 0
        while True:
            try:
                reply = await self._call(Op.LIST_PAGE, encode_page_request(page_size, cursor, raw))
            except LMServerError as exc:
                if exc.status != Status.UNKNOWN_COMMAND or cursor:  # mid-listing: LIST would repeat keys
                    raise
                if not self._told_old_server:
                    self._told_old_server = True
                    logger.info("%s: the server has no LIST_PAGE (an older version): it lists every key in one "
                                "reply", self.where)
                keys = await self.list(prefix)
                if keys:
                    yield KeyPage(tuple(keys))
                return
            cursor, keys, sizes = decode_key_page(reply.meta, _joined(reply.body), MAX_LISTED_KEYS)
            if keys:
                yield KeyPage(tuple(_decoded(keys)), tuple(sizes))
            if cursor == 0:
                return

    # -- batches: one frame per max_batch keys, all sent before any reply is awaited ---------
    async def batched_exists(self, keys: Sequence[str]) -> list[bool]:
        replies = await self._call_many(Op.BATCH_EXISTS, [encode_keys(g) for g in self._key_groups(keys)])
        return [flag == 1 for reply in replies for flag in _joined(reply.body)]

    async def batched_get(self, keys: Sequence[str]) -> list[Buffer | None]:
        replies = await self._call_many(Op.BATCH_GET, [encode_keys(g) for g in self._key_groups(keys)])
        values: list[Buffer | None] = []
        for reply in replies:
            bodies = iter(reply.body)
            for n in decode_lengths(reply.meta, self.limits.max_batch):
                values.append(None if n == MISSING else next(bodies).obj if n else bytearray())
        return values

    async def batched_get_into(self, keys: Sequence[str], outs: Sequence[Buffer]) -> list[int | None]:
        """:meth:`batched_get` into the caller's buffers, one per key: each value's length or None
        (a length above its buffer's size: the value did not fit and was dropped)."""
        if len(keys) != len(outs):
            raise ValueError(f"batched_get_into: {len(keys)} keys but {len(outs)} buffers")
        views = [_writable_view(o) for o in outs]
        groups = list(self._key_groups(keys))
        frames, into, start = [], [], 0
        for group in groups:
            frames.append(encode_keys(group))
            into.append(views[start : start + len(group)])
            start += len(group)
        replies = await self._call_many(Op.BATCH_GET, frames, into)
        return [None if n == MISSING else n for reply in replies
                for n in decode_lengths(reply.meta, self.limits.max_batch)]

    async def batched_put(self, items: Sequence[tuple[str, Buffer]]) -> None:
        frames = []
        for group in self._put_groups([(self._key(k), self._value(v)) for k, v in items]):
            keys, views = [k for k, _v in group], [v for _k, v in group]
            meta = encode_put_meta(keys, [v.nbytes for v in views])
            frames.append((meta, views, sum(v.nbytes for v in views)))
        await self._call_many(Op.BATCH_PUT, frames)

    async def batched_delete(self, keys: Sequence[str]) -> list[bool]:
        replies = await self._call_many(Op.BATCH_DELETE, [encode_keys(g) for g in self._key_groups(keys)])
        return [flag == 1 for reply in replies for flag in _joined(reply.body)]

    # -- request plumbing --------------------------------------------------------------------
    async def _call(self, op: Op, meta: bytes = b"", parts: Sequence[memoryview] = (), body_len: int = 0,
                    into: Sequence[memoryview | None] | None = None) -> Reply:
        proto = self._proto
        if proto is None or not proto.usable or self._loop is not asyncio.get_running_loop():
            proto = await self._connection()
        future = proto.send(op, meta, parts, body_len, into)
        try:
            if proto.needs_drain:
                await proto.drain()
            reply = await future  # the connection's watchdog bounds the wait
        except BaseException:
            proto.forget([future])  # a cancelled receive must not write into `into` afterwards
            raise
        return self._checked(op, reply)

    async def _call_many(self, op: Op, frames: Sequence, into: Sequence | None = None,
                         proto: ClientConnection | None = None) -> list[Reply]:
        """Send every frame, then collect the replies: one round trip however many frames."""
        if not frames:
            return []
        proto = proto or await self._connection()
        futures = []
        try:
            for i, frame in enumerate(frames):
                meta, parts, body_len = frame if isinstance(frame, tuple) else (frame, (), 0)
                futures.append(proto.send(op, meta, parts, body_len, into[i] if into else None))
                if proto.needs_drain:
                    await proto.drain()
            replies = [await f for f in futures]
        except BaseException:
            proto.forget(futures)  # no reply of this call may land in the caller's buffers later
            raise
        return [self._checked(op, reply) for reply in replies]

    def _checked(self, op: Op, reply: Reply) -> Reply:
        if reply.status >= Status.BAD_REQUEST:
            message = _joined(reply.body).decode("utf-8", errors="replace")
            raise LMServerError(reply.status, f"{self.where} refused {op.name}: {message}")
        return reply

    async def _connection(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        proto = self._proto
        if proto is not None and proto.usable and self._loop is loop:
            return proto
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed() and self._loop.is_running():
                raise ConnectorError(f"{self.where}: connector used from a second event loop; "
                                     "use one connector per loop")
            self._loop, self._proto, self._connect_lock = loop, None, asyncio.Lock()
        assert self._connect_lock is not None
        waiting_since = time.monotonic()
        async with self._connect_lock:
            if self._proto is not None and self._proto.usable:
                return self._proto
            failure = self._last_failure
            if failure is not None and failure[0] >= waiting_since:
                raise ConnectorError(str(failure[1]))  # callers that queued behind one attempt share its result
            try:
                self._proto = await self._open()
            except ConnectorError as exc:
                self._last_failure = (time.monotonic(), exc)
                raise
            return self._proto

    async def _open(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        timeout = self._connect_timeout
        try:
            _transport, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: ClientConnection(self.where, self.limits, self._request_timeout), self.host, self.port
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            raise ConnectorError(f"{self.where}: connect timed out after {timeout:g}s") from None
        except OSError as exc:
            raise ConnectorError(f"{self.where}: cannot connect: {exc.strerror or exc}") from None
        try:
            reply = await asyncio.wait_for(proto.send(Op.HELLO, self._token), timeout)
            self._checked(Op.HELLO, reply)
            info = json.loads(_joined(reply.body))
            names = {f.name for f in fields(Limits)}
            limits = Limits(**{k: int(v) for k, v in info.items() if k in names})
        except asyncio.TimeoutError:
            error = ConnectorError(f"{self.where}: no HELLO reply within {timeout:g}s")
        except ConnectorError as exc:
            error = exc
        except (ValueError, TypeError, AttributeError) as exc:
            error = ConnectorError(f"{self.where}: bad HELLO reply: {exc}")
        except BaseException:  # cancelled: do not leave the socket open
            proto.abort(ConnectorError(f"{self.where}: connect cancelled"))
            raise
        else:
            self.limits = proto.limits = limits
            self.server_info = info
            try:
                await self._shm.negotiate(self, proto, info, timeout)
            except BaseException:  # cancelled
                proto.abort(ConnectorError(f"{self.where}: connect cancelled"))
                raise
            return proto
        proto.abort(error)
        raise error

    def _key(self, key: str) -> bytes:
        if not isinstance(key, str):
            raise TypeError(f"a key must be a str, not {type(key).__name__}")
        raw = key.encode("utf-8")
        if not raw:
            raise LMServerError(Status.BAD_REQUEST, f"{self.where}: empty key")
        if len(raw) > self.limits.max_key_len:
            raise LMServerError(Status.KEY_TOO_LONG,
                                f"{self.where}: key of {len(raw)} bytes is over {self.limits.max_key_len}")
        return raw

    def _value(self, value: Buffer) -> memoryview:
        view = as_byte_view(value)
        if view.nbytes > self.limits.max_value_size:
            raise LMServerError(Status.VALUE_TOO_LARGE, f"{self.where}: value of {view.nbytes} bytes is over "
                                f"{self.limits.max_value_size}")
        return view

    def _key_groups(self, keys: Sequence[str]) -> Iterator[list[bytes]]:
        encoded = [self._key(k) for k in keys]
        step = self.limits.max_batch
        for i in range(0, len(encoded), step):
            yield encoded[i : i + step]

    def _put_groups(self, items: list[tuple[bytes, memoryview]]) -> Iterator[list[tuple[bytes, memoryview]]]:
        group: list[tuple[bytes, memoryview]] = []
        size = 0
        for item in items:
            if group and (len(group) == self.limits.max_batch or size + item[1].nbytes > self.limits.max_value_size):
                yield group
                group, size = [], 0
            group.append(item)
            size += item[1].nbytes
        if group:
            yield group


def _writable_view(out: Buffer) -> memoryview:
    view = as_byte_view(out)
    if view.readonly:
        raise TypeError("the output buffer is read-only")
    return view


def _decoded(keys: list[bytes]) -> list[str]:
    return [k.decode("utf-8", errors="replace") for k in keys]


def _joined(parts: list[memoryview]) -> bytes:
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


def _positive_option(options: dict, name: str, default: float) -> float:
    raw = options.get(name, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise URLError(f"remote_options.{name}: {raw!r} is not a number of seconds") from None
    if value <= 0:
        raise URLError(f"remote_options.{name}: {raw!r} must be > 0")
    return value
