"""``mooncakestore://host:port/?device=<rdma nic>``: Mooncake Store, a pool of memory segments
behind one master (host:port). Other settings come from the JSON file named by
``MOONCAKE_CONFIG_PATH`` and from ``remote_options`` (which wins); the URL wins over both.

Puts move through a registered staging area with ``batch_put_from``. Gets land straight in the
caller's buffers (``batched_get_into``: the storage layer's pooled receive buffers, each
registered once and unregistered when the allocator lets it go) with one ``batch_get_into``;
``batched_get`` (serdes without a receive size) goes through a second staging area and copies out.
Mooncake's wheel waits for a transfer's end by polling in a tight loop (it is built without
event-driven completion), so the calling thread keeps a core busy for the whole transfer, taking it
from the transfer itself on a small host. Gets made while nothing else computes
(``threads.idle_waits``: a load before vLLM's forward) therefore run on idle-priority threads, which
poll only on CPU nobody else wants; other calls keep normal threads, which a running forward cannot
starve (benchmarks/RESULTS.md, twelfth round).
Values larger than a staging area use plain ``put`` / ``get``. Mooncake's data calls may run
concurrently from several threads (its own ``mooncake.async_store`` does that); each staging area
has a lock because it is our memory. ``setup`` runs in a background thread, retried with back-off,
so an unreachable master never blocks start-up for Mooncake's minute of retries.

Listing: the master sends every key in one reply by its design (``/get_all_keys`` on its metrics
port); :meth:`scan` cuts that into pages. Sizes come from ``batch_get_replica_desc``, one RPC per
page (measured here: 2.4 ms for 1000 keys, against 91 ms for 1000 ``get_size`` calls); deletes from
``batch_remove`` (1.1 ms for 500 keys, against 57 ms for 500 ``remove`` calls).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import KVCacheConfig
from ..errors import ConnectorError, ConnectorTimeout
from ..threads import idle_waits_allowed, thread_pool
from .base import DEFAULT_PAGE_SIZE, Buffer, KeyPage, RemoteConnector
from .mooncake_client import (
    ALIGN,
    EVICTION_PAUSES,
    INVALID_PARAMS,
    MISSING_CODES,
    NO_SPACE,
    OBJECT_ALREADY_EXISTS,
    MooncakeClient,
    StagingArea,
    aligned,
    code_name,
    fresh_copy,
)
from .mooncake_settings import MooncakeSettings
from .url import RemoteURL

logger = logging.getLogger(__name__)

__all__ = ["MooncakeStoreConnector", "code_name"]


class MooncakeStoreConnector(RemoteConnector):
    schemes = ("mooncakestore",)
    blocking_threads = 4
    supports_get_into = True
    listing = "one reply"

    def __init__(self, url: RemoteURL, config: KVCacheConfig | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(url, config)
        self.settings = MooncakeSettings.load(url, self.config.remote_options, os.environ if env is None else env)
        self.client = MooncakeClient(self.settings, url.redacted())
        # put semantics: Mooncake's (first write wins) or, with overwrite, its upsert family
        names = ("batch_upsert_from", "upsert_from", "upsert") if self.settings.overwrite else \
            ("batch_put_from", "put_from", "put")
        self._put_many_from, self._put_from, self._put_plain = names
        self._slot_hint = 0  # largest value seen, aligned: the slot size of batched gets
        self._idle_executor: ThreadPoolExecutor | None = None  # gets of exclusive loads, at idle priority

    # -- lifecycle --------------------------------------------------------------------------
    async def connect(self) -> None:
        """Wait up to blocking_timeout_secs for setup; on time-out raise, but keep retrying behind."""
        self.client.start_setup()
        timeout = self.config.blocking_timeout_secs
        if not await asyncio.to_thread(self.client.ready.wait, timeout):
            raise ConnectorError(f"{self.url.redacted()}: Mooncake setup did not finish within {timeout:g}s "
                                 f"({self.client.last_error}); retrying in the background")

    async def close(self) -> None:
        """Drain running calls, then unregister the staging areas and close the client."""
        self.client.closed.set()
        for executor in (self._executor, self._idle_executor):
            if executor is not None:
                await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)
        self._executor = self._idle_executor = None
        await asyncio.to_thread(self.client.close)

    # -- calls ------------------------------------------------------------------------------
    def _client(self) -> Any:
        return self.client.ready_store()

    def _pool(self, transfer: bool = False) -> ThreadPoolExecutor:
        """The threads for a blocking call: a transfer's wait goes to the idle-priority ones when
        ``threads.idle_waits`` allows it."""
        if transfer and idle_waits_allowed():
            if self._idle_executor is None:
                self._idle_executor = thread_pool(self.blocking_threads, "kv-mc-idle", idle=True)
            return self._idle_executor
        if self._executor is None:
            self._executor = thread_pool(self.blocking_threads, "kv-mooncake")
        return self._executor

    async def _call(self, timeout: float, fn: Callable[..., Any], *args: Any, transfer: bool = False) -> Any:
        """``fn(*args)`` on the pool, bounded by ``timeout``; every failure becomes a ConnectorError."""
        future = asyncio.get_running_loop().run_in_executor(self._pool(transfer), fn, *args)
        try:
            return await asyncio.wait_for(future, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise ConnectorTimeout(f"{self.url.redacted()}: no answer within {timeout:g}s") from None
        except asyncio.CancelledError:
            if self.client.closed.is_set():
                raise ConnectorError(f"{self.url.redacted()}: connector closed during the call") from None
            raise
        except ConnectorError:
            raise
        except Exception as exc:  # pybind11 turns C++ exceptions into RuntimeError and friends
            raise ConnectorError(f"{self.url.redacted()}: {type(exc).__name__}: {exc}") from None

    async def _call_to_the_end(self, fn: Callable[..., Any], *args: Any, transfer: bool = False) -> Any:
        """``fn(*args)`` on the pool, returning or raising only once it has ended: a Mooncake call
        cannot be stopped, and one that writes into caller buffers must be over before the caller
        reuses them. A cancellation (the storage layer's deadline) is re-raised after the call
        ends; until then the caller's wait is bounded by that layer, not by this coroutine."""
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool(transfer), fn, *args)
        except RuntimeError:  # the pool is shut down: close() ran
            raise ConnectorError(f"{self.url.redacted()}: connector is closed") from None
        interrupted = False
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                if not future.cancelled():
                    interrupted = True  # ours: keep waiting for the native call
            except Exception:  # the call's own failure: read below
                pass
        if interrupted:
            raise asyncio.CancelledError
        if future.cancelled():  # never started: close() cancelled the queued call
            raise ConnectorError(f"{self.url.redacted()}: connector closed during the call")
        exc = future.exception()
        if isinstance(exc, ConnectorError):
            raise exc
        if exc is not None:
            raise ConnectorError(f"{self.url.redacted()}: {type(exc).__name__}: {exc}") from None
        return future.result()

    def _fail(self, what: str, key: str, code: int) -> ConnectorError:
        return ConnectorError(f"{self.url.redacted()}: {what} {key!r} failed: {code_name(code)}")

    # -- lookups ----------------------------------------------------------------------------
    async def exists(self, key: str) -> bool:
        return (await self.batched_exists([key]))[0]

    async def batched_exists(self, keys: Sequence[str]) -> list[bool]:
        """One round trip. Mooncake answers 1/0 per key or a negative code (-1, -900, ...) when it
        could not ask: any negative raises ConnectorError, which the storage layer counts as a miss."""
        if not keys:
            return []
        codes = await self._call(self.config.blocking_timeout_secs, self._client().batch_is_exist, list(keys))
        for key, code in zip(keys, codes, strict=True):
            if code < 0 and code not in MISSING_CODES:
                raise self._fail("exists", key, code)
        return [code == 1 for code in codes]

    # -- reads ------------------------------------------------------------------------------
    async def get(self, key: str) -> Buffer | None:
        return (await self.batched_get([key]))[0]

    async def batched_get(self, keys: Sequence[str]) -> list[Buffer | None]:
        if not keys:
            return []
        store = self._client()
        return await self._call(self.settings.transfer_timeout, self._get_many, store, list(keys), transfer=True)

    def _get_many(self, store: Any, keys: list[str]) -> list[Buffer | None]:
        out: list[Buffer | None] = [None] * len(keys)
        unstaged = list(range(len(keys)))
        stage = self.client.get_stage
        slot = self._slot_size(store, keys[0], stage)
        if stage is not None and slot <= stage.capacity:
            unstaged = []
            per_group = stage.capacity // slot
            with stage.lock:
                for start in range(0, len(keys), per_group):
                    group = keys[start:start + per_group]
                    ptrs = [stage.ptr + i * slot for i in range(len(group))]
                    codes = store.batch_get_into(group, ptrs, [slot] * len(group))
                    for i, (key, code) in enumerate(zip(group, codes, strict=True)):
                        if code >= 0:
                            out[start + i] = fresh_copy(stage.array[i * slot:i * slot + code])
                        elif code == INVALID_PARAMS:  # larger than a slot
                            unstaged.append(start + i)
                        elif code not in MISSING_CODES:
                            raise self._fail("get", key, code)
        for i in unstaged:
            out[i] = self._plain_get(store, keys[i])
        return out

    async def batched_get_into(self, keys: Sequence[str], outs: Sequence[Buffer]) -> list[int | None]:
        """One ``batch_get_into`` straight into ``outs`` (registered once each, see BufferRegistry):
        each value's length, None for a miss, or its length (> the buffer) when it did not fit.

        Returns or raises only after Mooncake's call has ended (a cancellation too), so nothing
        writes into ``outs`` afterwards; there is no transfer_timeout here: the storage layer's
        load deadline bounds the caller's wait, and a late call hands the buffers back when it ends."""
        if len(keys) != len(outs):
            raise ValueError(f"batched_get_into: {len(keys)} keys but {len(outs)} buffers")
        if not keys:
            return []
        views = [memoryview(out).cast("B") for out in outs]
        for view in views:
            if view.readonly:
                raise ValueError("batched_get_into needs writable buffers")
        store = self._client()
        return await self._call_to_the_end(self._get_many_into, store, list(keys), views, transfer=True)

    def _get_many_into(self, store: Any, keys: list[str], views: list[memoryview]) -> list[int | None]:
        registry = self.client.registry
        out: list[int | None] = [None] * len(keys)
        direct, copied = [], []
        for i, view in enumerate(views):
            ptr = _address(view)
            if registry is not None and ptr and registry.ensure(ptr, view.nbytes):
                direct.append((i, ptr))
            else:  # empty, or registration refused: through the staging area, and copied
                copied.append(i)
        if direct:
            codes = store.batch_get_into([keys[i] for i, _ in direct], [ptr for _, ptr in direct],
                                         [views[i].nbytes for i, _ in direct])
            for (i, _), code in zip(direct, codes, strict=True):
                if code >= 0:
                    out[i] = code
                elif code == INVALID_PARAMS:  # larger than the buffer (nothing was written)
                    out[i] = self._oversize(store, keys[i], views[i].nbytes, code)
                elif code not in MISSING_CODES:
                    raise self._fail("get", keys[i], code)
        if copied:
            for i, value in zip(copied, self._get_many(store, [keys[i] for i in copied]), strict=True):
                if value is not None:
                    n = memoryview(value).nbytes
                    if n <= views[i].nbytes:
                        views[i][:n] = value
                    out[i] = n
        return out

    def _oversize(self, store: Any, key: str, capacity: int, code: int) -> int | None:
        size = store.get_size(key)
        if size in MISSING_CODES:
            return None  # removed in between
        if size <= capacity:
            raise self._fail("get", key, code)
        return size

    def _slot_size(self, store: Any, first_key: str, stage: StagingArea | None) -> int:
        if self._slot_hint or stage is None:
            return self._slot_hint or ALIGN
        size = store.get_size(first_key)  # learn the value size once (no put seen yet)
        return aligned(size) if size > 0 else max(ALIGN, stage.capacity // 8)

    def _plain_get(self, store: Any, key: str) -> Buffer | None:
        size = store.get_size(key)
        if size in MISSING_CODES:
            return None
        if size < 0:
            raise self._fail("get", key, size)
        data = store.get(key)
        if len(data) != size:  # get() answers b"" for every failure
            raise ConnectorError(f"{self.url.redacted()}: get {key!r} returned {len(data)} of {size} bytes "
                                 "(value larger than staging_buffer_size and local_buffer_size?)")
        self._slot_hint = max(self._slot_hint, aligned(size))
        return data

    # -- writes -----------------------------------------------------------------------------
    async def put(self, key: str, value: Buffer) -> None:
        await self.batched_put([(key, value)])

    async def batched_put(self, items: Sequence[tuple[str, Buffer]]) -> None:
        """First write wins: Mooncake keeps an existing key's value (content-addressed keys make that
        safe); delete first to replace one, or set ``overwrite`` (Mooncake's upsert). A put that
        finds the segments full starts an eviction in the master, so it is retried a few times (at
        most ~0.2 s) before it fails."""
        if not items:
            return
        store = self._client()
        await self._call(self.settings.transfer_timeout, self._put_many, store, list(items))

    def _put_many(self, store: Any, items: list[tuple[str, Buffer]]) -> None:
        stage = self.client.put_stage
        unstaged: list[tuple[str, memoryview]] = []
        views = [(key, memoryview(value).cast("B")) for key, value in items]
        for key, view in views:
            if view.nbytes == 0:
                raise ConnectorError(f"{self.url.redacted()}: put {key!r}: Mooncake cannot store an empty value")
            self._slot_hint = max(self._slot_hint, aligned(view.nbytes))
        if stage is None:
            unstaged = views
        else:
            with stage.lock:
                group: list[tuple[str, int, int]] = []
                offset = 0
                for key, view in views:
                    if view.nbytes > stage.capacity:
                        unstaged.append((key, view))
                        continue
                    if offset + view.nbytes > stage.capacity:
                        self._flush(store, stage, group)
                        group, offset = [], 0
                    stage.view[offset:offset + view.nbytes] = view
                    group.append((key, offset, view.nbytes))
                    offset += aligned(view.nbytes)
                self._flush(store, stage, group)
        put, replicate = getattr(store, self._put_plain), self.client.replicate
        for key, view in unstaged:
            self._check_put(key, put(key, view, replicate), lambda k=key, v=view: put(k, v, replicate))

    def _flush(self, store: Any, stage: StagingArea, group: list[tuple[str, int, int]]) -> None:
        if not group:
            return
        keys = [key for key, _, _ in group]
        codes = getattr(store, self._put_many_from)(keys, [stage.ptr + off for _, off, _ in group],
                                                    [n for _, _, n in group], self.client.replicate)
        put_from = getattr(store, self._put_from)
        for (key, off, n), code in zip(group, codes, strict=True):
            self._check_put(key, code, lambda k=key, o=off, n=n: put_from(k, stage.ptr + o, n, self.client.replicate))

    def _check_put(self, key: str, code: int, retry: Callable[[], int]) -> None:
        for pause in EVICTION_PAUSES:  # the failed allocation started an eviction (~5-10 ms)
            if code != NO_SPACE:
                break
            time.sleep(pause)
            code = retry()
        if code not in (0, OBJECT_ALREADY_EXISTS):
            raise self._fail("put", key, code)

    # -- maintenance ------------------------------------------------------------------------
    async def delete(self, key: str) -> bool:
        """Forced: a lease only guards an in-flight read, whose checksum catches a removed value."""
        code = await self._call(self.config.blocking_timeout_secs, self._client().remove, key, True)
        if code in MISSING_CODES:
            return False
        if code != 0:
            raise self._fail("delete", key, code)
        return True

    async def batched_delete(self, keys: Sequence[str]) -> list[bool]:
        """One forced ``batch_remove`` (see :meth:`delete`)."""
        if not keys:
            return []
        codes = await self._call(self.config.blocking_timeout_secs, self._client().batch_remove, list(keys), True)
        for key, code in zip(keys, codes, strict=True):
            if code != 0 and code not in MISSING_CODES:
                raise self._fail("delete", key, code)
        return [code == 0 for code in codes]

    async def batched_size(self, keys: Sequence[str]) -> list[int | None]:
        if not keys:
            return []
        store = self._client()
        return await self._call(self.config.blocking_timeout_secs, self._sizes, store, list(keys))

    def _sizes(self, store: Any, keys: list[str]) -> list[int | None]:
        """Sizes from the master's replica descriptors in one RPC. A key it gave none for (not
        stored, still being written, or the RPC failed, which this call cannot tell apart) is asked
        again with ``get_size``, whose code says which."""
        replicas = store.batch_get_replica_desc(keys)
        sizes = [self._replica_size(replicas.get(key)) for key in keys]
        for i, size in enumerate(sizes):
            if size is None:
                code = store.get_size(keys[i])
                if code < 0 and code not in MISSING_CODES:
                    raise self._fail("size of", keys[i], code)
                sizes[i] = code if code > 0 else None
        return sizes

    def _replica_size(self, replicas: Any) -> int | None:
        complete = self.client.module.ReplicaStatus.COMPLETE
        for replica in replicas or ():
            if replica.status != complete:
                continue
            if replica.is_memory_replica():
                return replica.get_memory_descriptor().buffer_descriptor.size
            if replica.is_disk_replica():
                return replica.get_disk_descriptor().object_size
        return None

    async def list(self, prefix: str = "") -> list[str]:
        """Keys from the master's admin HTTP server (``metrics_address``: its --metrics_port)."""
        return await self._all_keys("list", prefix)

    async def scan(self, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[KeyPage]:
        """The one reply of :meth:`list`, ``page_size`` keys a page with their sizes (one RPC each);
        keys removed since the reply are left out."""
        if page_size < 1:
            raise ValueError(f"scan page_size must be >= 1, got {page_size}")
        keys = await self._all_keys("scan", prefix)
        for start in range(0, len(keys), page_size):
            page = keys[start:start + page_size]
            found = [(k, n) for k, n in zip(page, await self.batched_size(page), strict=True) if n is not None]
            if found:
                yield KeyPage(tuple(k for k, _ in found), tuple(n for _, n in found))

    async def _all_keys(self, op: str, prefix: str) -> list[str]:
        if not isinstance(prefix, str):
            raise TypeError(f"{op} prefix must be a str, got {type(prefix).__name__}")
        address = self.settings.metrics_address
        if not address:
            raise ConnectorError(f"{self.url.redacted()}: {op} needs metrics_address (the master's "
                                 "--metrics_host:--metrics_port) in remote_options or mooncake.json")
        self._client()
        timeout = self.config.blocking_timeout_secs
        text = await self._call(timeout, _http_get, f"http://{address}/get_all_keys", timeout)
        return [key for key in text.splitlines() if key and key.startswith(prefix)]


def _address(view: memoryview) -> int:
    """The address of a writable, non-empty buffer (0 for an empty one)."""
    if view.nbytes == 0:
        return 0
    return ctypes.addressof((ctypes.c_ubyte * view.nbytes).from_buffer(view))


def _http_get(url: str, timeout: float) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode("utf-8", "replace")
