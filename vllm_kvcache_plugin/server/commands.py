"""The lm server's commands: what each request does to the shared store, and what it answers.

One :class:`Commands` per connection (it holds that client's HELLO state and the buffers of values
it is sending). Every handler is synchronous (the store is in memory) and returns
``(status, reply meta, reply body parts)``; the connection (connection.py) does the framing, flow
control and time-outs around it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from .. import __version__
from ..errors import ProtocolError
from ..lm_protocol import (
    MISSING,
    PROTOCOL_VERSION,
    Op,
    Status,
    decode_ids,
    decode_keys,
    decode_page_request,
    decode_put_meta,
    encode_key_page,
    encode_keys,
    encode_leases,
    encode_lengths,
)
from .arena import Region
from .state import ServerState
from .store import entry_cost

logger = logging.getLogger("vllm_kvcache_plugin.server")

Answer = tuple[Status, bytes, list]


class RequestError(Exception):
    """Answer this request with an error status; the connection stays open."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class Disconnect(Exception):
    """Answer with an error status, then close the connection."""

    def __init__(self, status: Status, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class Commands:
    def __init__(self, state: ServerState, peer: Callable[[], object]) -> None:
        self.state = state
        self.limits = state.config.limits
        self.peer = peer  # the client's address, for the log
        self.authenticated = False
        self.incoming: list[tuple[bytes, bytearray]] = []  # values of the request being received
        self.sending: list[Region] = []  # arena regions that replies still being sent read from

    def run(self, op: int, meta: bytes) -> Answer:
        return self._HANDLERS[op](self, meta)

    @classmethod
    def handles(cls, op: int) -> bool:
        """Whether this server knows ``op`` (the rest are answered UNKNOWN_COMMAND)."""
        return op in cls._HANDLERS

    # -- receiving values ----------------------------------------------------------------------
    def body_buffers(self, op: int, meta: bytes, body_len: int, request_id: int) -> list[memoryview]:
        """Buffers for a PUT / BATCH_PUT body, charged to the memory budget (RequestError if not)."""
        if op == Op.PUT:
            keys, lengths = [self.check_key(meta)], [body_len]
        else:
            keys, lengths = decode_put_meta(meta, self.limits.max_batch)
            for key in keys:
                self.check_key(key)
            if sum(lengths) != body_len:
                raise Disconnect(Status.BAD_REQUEST, "value lengths do not add up to the body", request_id)
        self._allocate(keys, lengths)
        return [memoryview(value) for _key, value in self.incoming]

    def _allocate(self, keys: list[bytes], lengths: list[int]) -> None:
        store = self.state.store
        if any(n > self.limits.max_value_size for n in lengths):
            raise RequestError(Status.VALUE_TOO_LARGE, f"a value is over the limit of {self.limits.max_value_size}")
        cost = sum(entry_cost(len(k), n) for k, n in zip(keys, lengths, strict=True))
        if cost > store.budget:
            raise RequestError(Status.VALUE_TOO_LARGE, f"{cost} bytes is over the memory budget of {store.budget}")
        for key, n in zip(keys, lengths, strict=True):
            buffer = store.allocate(len(key), n)
            if buffer is None:
                self.drop_incoming()
                raise RequestError(Status.NO_SPACE, "memory is held by values still arriving; retry later")
            self.incoming.append((key, buffer))

    def drop_incoming(self) -> None:
        incoming, self.incoming = self.incoming, []
        for key, buffer in incoming:
            self.state.store.release(len(key), buffer)

    def _sent(self, values: list) -> list:
        """Pin the arena regions of values a reply sends (their memory must not be reused until
        the reply has left: :meth:`unpin`, called once the connection's writer is idle)."""
        store = self.state.store
        if store.arena is not None:
            for value in values:
                region = store.region_of(value)
                if region is not None:
                    store.arena.ref(region)
                    self.sending.append(region)
        return values

    def unpin(self) -> None:
        sending, self.sending = self.sending, []
        for region in sending:
            self.state.store.arena.unref(region)

    # -- commands ------------------------------------------------------------------------------
    def _hello(self, meta: bytes) -> Answer:
        if not self.state.token_ok(meta):
            logger.warning("bad token from %s", self.peer())
            raise Disconnect(Status.UNAUTHORIZED, "bad token")
        self.authenticated = True
        info = {"server": f"vllm-kvcache-plugin {__version__}", "protocol_version": PROTOCOL_VERSION,
                **vars(self.limits), "shm": self.state.fd_server is not None}
        return Status.OK, b"", [json.dumps(info).encode()]

    def _put(self, meta: bytes) -> Answer:
        store = self.state.store
        for key, value in self.incoming:
            store.commit(key, value)
        self.incoming = []
        return Status.OK, b"", []

    def _get(self, meta: bytes) -> Answer:
        value = self.state.store.get(self.check_key(meta))
        return (Status.NOT_FOUND, b"", []) if value is None else (Status.OK, b"", self._sent([value]))

    def _exists(self, meta: bytes) -> Answer:
        found = self.state.store.contains(self.check_key(meta))
        return Status.OK if found else Status.NOT_FOUND, b"", []

    def _delete(self, meta: bytes) -> Answer:
        found = self.state.store.delete(self.check_key(meta))
        return Status.OK if found else Status.NOT_FOUND, b"", []

    def _list(self, meta: bytes) -> Answer:
        if len(meta) > self.limits.max_key_len:
            raise RequestError(Status.KEY_TOO_LONG, "prefix is longer than the longest key")
        return Status.OK, b"", [encode_keys(self.state.store.keys(meta))]

    def _list_page(self, meta: bytes) -> Answer:
        try:
            page_size, cursor, prefix = decode_page_request(meta)
        except ProtocolError as exc:
            raise RequestError(Status.BAD_REQUEST, str(exc)) from None
        if not 0 < page_size <= self.limits.max_batch:
            raise RequestError(Status.BAD_REQUEST, f"page size {page_size} is not in 1..{self.limits.max_batch}")
        if len(prefix) > self.limits.max_key_len:
            raise RequestError(Status.KEY_TOO_LONG, "prefix is longer than the longest key")
        index = self.state.store.index
        if cursor >= index.nbuckets:
            raise RequestError(Status.BAD_REQUEST, f"cursor {cursor} is not one this server gave out")
        items, next_cursor = index.page(prefix, cursor, page_size)
        meta, body = encode_key_page(next_cursor, [k for k, _ in items], [size for _, size in items])
        return Status.OK, meta, [body]

    def _health(self, meta: bytes) -> Answer:
        return Status.OK, b"", []

    def _stats(self, meta: bytes) -> Answer:
        return Status.OK, b"", [json.dumps(self.state.snapshot()).encode()]

    def _batch_exists(self, meta: bytes) -> Answer:
        store = self.state.store
        return Status.OK, b"", [bytes(store.contains(k) for k in self._decode_keys(meta))]

    def _batch_get(self, meta: bytes) -> Answer:
        values = [self.state.store.get(k) for k in self._decode_keys(meta)]
        lengths = [-1 if v is None else len(v) for v in values]
        return Status.OK, encode_lengths(lengths), self._sent([v for v in values if v])

    def _batch_delete(self, meta: bytes) -> Answer:
        store = self.state.store
        return Status.OK, b"", [bytes(store.delete(k) for k in self._decode_keys(meta))]

    # -- shared memory (docs/lm-protocol.md#shared-memory) -----------------------------------------
    def _shm_store(self):
        if self.state.fd_server is None or self.state.store.arena is None:
            raise RequestError(Status.BAD_REQUEST, "shared memory is off on this server")
        return self.state.store

    def _shm_attach(self, meta: bytes) -> Answer:
        store = self._shm_store()
        arena, fd_server = store.arena, self.state.fd_server
        peer = self.peer()
        info = {"socket": fd_server.name, "nonce": fd_server.issue_nonce().hex(), "arena_id": arena.id.hex(),
                "size": arena.size, "lease_secs": arena.leases.ttl, "uid": os.getuid(),
                "peer": list(peer[:2]) if isinstance(peer, tuple) else None}  # a proxy between us shows here
        return Status.OK, b"", [json.dumps(info).encode()]

    def _batch_get_lease(self, meta: bytes) -> Answer:
        store = self._shm_store()
        leases, now = store.arena.leases, time.monotonic()
        entries = []
        for key in self._decode_keys(meta):
            value = store.get(key)
            region = None if value is None else store.region_of(value)
            if region is None:  # not stored, or a spilled value memory had no room for: a miss here
                entries.append((MISSING, 0, 0))
            else:
                entries.append((region.length, region.offset, leases.grant(region, now)))
        return Status.OK, encode_leases(entries), []

    def _lease_release(self, meta: bytes) -> Answer:
        store = self._shm_store()
        try:
            ids = decode_ids(meta, self.limits.max_batch)
        except ProtocolError as exc:
            raise RequestError(Status.BAD_REQUEST, str(exc)) from None
        return Status.OK, b"", [bytes(store.arena.leases.release(ids))]

    _HANDLERS = {
        Op.HELLO: _hello, Op.PUT: _put, Op.BATCH_PUT: _put, Op.GET: _get, Op.EXISTS: _exists,
        Op.DELETE: _delete, Op.LIST: _list, Op.HEALTH: _health, Op.STATS: _stats,
        Op.BATCH_EXISTS: _batch_exists, Op.BATCH_GET: _batch_get, Op.BATCH_DELETE: _batch_delete,
        Op.SHM_ATTACH: _shm_attach, Op.BATCH_GET_LEASE: _batch_get_lease, Op.LEASE_RELEASE: _lease_release,
        Op.LIST_PAGE: _list_page,
    }

    # -- checks --------------------------------------------------------------------------------
    def check_key(self, key: bytes) -> bytes:
        if not key:
            raise RequestError(Status.BAD_REQUEST, "empty key")
        if len(key) > self.limits.max_key_len:
            raise RequestError(Status.KEY_TOO_LONG, f"key of {len(key)} bytes is over {self.limits.max_key_len}")
        return key

    def _decode_keys(self, meta: bytes) -> list[bytes]:
        try:
            keys = decode_keys(meta, self.limits.max_batch)
        except ProtocolError as exc:
            raise RequestError(Status.BAD_REQUEST, str(exc)) from None
        for key in keys:
            self.check_key(key)
        return keys
