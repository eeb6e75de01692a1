"""``mooncakestore://host:port/?device=<rdma nic>``: Mooncake Store, a pool of memory segments
behind one master (host:port). Other settings come from the JSON file named by
``MOONCAKE_CONFIG_PATH`` and from ``remote_options`` (which wins); the URL wins over both.

Values move through two registered staging areas (one for puts, one for gets) with
``batch_put_from`` / ``batch_get_into``, so a batch is one call and no per-call registration;
values larger than a staging area use plain ``put`` / ``get``. Mooncake's data calls may run
concurrently from several threads (its own ``mooncake.async_store`` does that); each staging area
has a lock because it is our memory. ``setup`` runs in a background thread, retried with back-off,
so an unreachable master never blocks start-up for Mooncake's minute of retries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import KVCacheConfig
from ..errors import ConnectorError, MissingDependencyError
from .base import Buffer, RemoteConnector
from .mooncake_settings import MooncakeSettings
from .url import RemoteURL

logger = logging.getLogger(__name__)

_ALIGN = 4096
_EVICTION_PAUSES = (0.005, 0.01, 0.02, 0.05, 0.1)
# Mooncake return codes (mooncake-store ErrorCode).
NO_SPACE, INVALID_PARAMS, OBJECT_ALREADY_EXISTS = -200, -600, -705
_MISSING = {-703: "replica not ready", -704: "object not found", -712: "replica gone"}
_CODE_NAMES = {-1: "internal error", NO_SPACE: "no space left in the segments",
               INVALID_PARAMS: "invalid parameters, or a value over local_buffer_size",
               -706: "object has a lease", -707: "lease expired during transfer", -800: "transfer failed",
               -900: "RPC to the master failed", -901: "RPC timed out", **_MISSING}


def code_name(code: int) -> str:
    return f"{code} ({_CODE_NAMES.get(code, 'error')})"


def _import_mooncake() -> Any:
    """The ``mooncake.store`` module, or a MissingDependencyError naming the extra to install."""
    try:
        import mooncake.store as store_module
    except ImportError as exc:
        if "libibverbs" in str(exc):
            raise MissingDependencyError(f"mooncakestore: {exc}; apt-get install libibverbs1") from None
        import torch

        extra = "mooncake" if torch.cuda.is_available() else "mooncake-cpu"
        raise MissingDependencyError(
            f"mooncakestore:// needs Mooncake; pip install 'vllm-kvcache-plugin[{extra}]'") from None
    return store_module


class _Staging:
    """A registered buffer values are copied through; one transfer at a time uses it."""

    def __init__(self, size: int) -> None:
        self.array = np.empty(size, dtype=np.uint8)
        self.array.fill(0)  # fault the pages in now, not during the first transfer
        self.view = memoryview(self.array)
        self.ptr = int(self.array.ctypes.data)
        self.capacity = size
        self.lock = threading.Lock()


def _fresh_copy(source: np.ndarray) -> memoryview:
    """A copy the caller owns. numpy asks the kernel for huge pages for arrays this large, which
    makes fresh memory about twice as fast to fault in as a bytearray's."""
    out = np.empty(source.nbytes, dtype=np.uint8)
    out[:] = source
    return memoryview(out)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class MooncakeStoreConnector(RemoteConnector):
    schemes = ("mooncakestore",)
    blocking_threads = 4

    def __init__(self, url: RemoteURL, config: KVCacheConfig | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(url, config)
        self.settings = MooncakeSettings.load(url, self.config.remote_options, os.environ if env is None else env)
        self._mooncake = _import_mooncake()
        self._store: Any = None
        self._replicate: Any = None
        # put semantics: Mooncake's (first write wins) or, with overwrite, its upsert family
        names = ("batch_upsert_from", "upsert_from", "upsert") if self.settings.overwrite else \
            ("batch_put_from", "put_from", "put")
        self._put_many_from, self._put_from, self._put_plain = names
        self._put_stage: _Staging | None = None
        self._get_stage: _Staging | None = None
        self._slot_hint = 0  # largest value seen, aligned: the slot size of batched gets
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._setup_thread: threading.Thread | None = None
        self._last_error = "setup not started"

    # -- lifecycle --------------------------------------------------------------------------
    async def connect(self) -> None:
        """Wait up to blocking_timeout_secs for setup; on time-out raise, but keep retrying behind."""
        self._start_setup()
        timeout = self.config.blocking_timeout_secs
        if not await asyncio.to_thread(self._ready.wait, timeout):
            raise ConnectorError(f"{self.url.redacted()}: Mooncake setup did not finish within {timeout:g}s "
                                 f"({self._last_error}); retrying in the background")

    def _start_setup(self) -> None:
        if self._setup_thread is None and not self._closed.is_set():
            # One attempt per setup() call (Mooncake's default is ~20 x 4 s); we retry with back-off.
            os.environ.setdefault("MC_STORE_CLIENT_SETUP_RETRIES", "1")
            self._setup_thread = threading.Thread(target=self._setup_loop, name="kv-mooncake-setup", daemon=True)
            self._setup_thread.start()

    def _setup_loop(self) -> None:
        delay = 0.5
        while not self._closed.is_set():
            try:
                store = self._setup_once()
            except Exception as exc:  # a failed attempt only delays readiness
                self._last_error = str(exc)
                logger.warning("Mooncake setup failed (%s); retrying in %.1fs", exc, delay)
                if self._closed.wait(delay):
                    return
                delay = min(delay * 2, 30.0)
                continue
            if self._closed.is_set():
                self._release(store)
                return
            self._store = store
            self._last_error = ""
            self._ready.set()
            logger.info("Mooncake store ready: master %s", self.settings.master_server_address)
            return

    def _setup_once(self) -> Any:
        s = self.settings
        # setup() holds the GIL for its whole run (4 s per try against a dead master, 10 s against a
        # dead etcd), stalling every Python thread: only call it once its servers accept connections.
        for host, port in s.servers():
            try:
                socket.create_connection((host, port), timeout=1.0).close()
            except OSError as exc:
                raise ConnectorError(f"{host}:{port} is unreachable ({exc.strerror or exc})") from None
        store = self._mooncake.MooncakeDistributedStore()
        rc = store.setup(s.local_hostname, s.metadata_server, s.global_segment_size, s.local_buffer_size,
                         s.protocol, s.device_name, s.master_server_address, tenant_id=s.tenant_id)
        if rc != 0:
            store.close()
            raise ConnectorError(f"setup against master {s.master_server_address} returned {rc}")
        self._replicate = self._mooncake.ReplicateConfig()
        self._replicate.replica_num = s.replica_num
        if s.staging_buffer_size >= _ALIGN:
            try:
                stages = [_Staging(s.staging_buffer_size) for _ in range(2)]
            except MemoryError:
                stages = []
            codes = [store.register_buffer(st.ptr, st.capacity) for st in stages]
            if stages and codes == [0, 0]:
                self._put_stage, self._get_stage = stages
            else:  # zero-copy where memory allows; plain put/get otherwise
                logger.warning("Mooncake staging areas unavailable (register_buffer: %s); using plain put/get", codes)
                for stage, code in zip(stages, codes, strict=True):
                    if code == 0:
                        store.unregister_buffer(stage.ptr)
        return store

    def _release(self, store: Any) -> None:
        for stage in (self._put_stage, self._get_stage):
            if stage is not None:
                store.unregister_buffer(stage.ptr)
        self._put_stage = self._get_stage = None
        store.close()

    async def close(self) -> None:
        """Drain running calls, then unregister the staging areas and close the client."""
        self._closed.set()
        store, self._store = self._store, None
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)
        if store is not None:
            await asyncio.to_thread(self._release, store)

    # -- calls ------------------------------------------------------------------------------
    def _client(self) -> Any:
        """The ready client, or a ConnectorError at once (never wait on a master known to be down)."""
        if self._closed.is_set():
            raise ConnectorError(f"{self.url.redacted()}: connector is closed")
        store = self._store
        if store is None:
            self._start_setup()
            raise ConnectorError(f"{self.url.redacted()}: not connected yet ({self._last_error}); "
                                 "setup is retrying in the background")
        if store.health_check() != 0:  # a flag kept by Mooncake's ping thread; no I/O
            raise ConnectorError(f"{self.url.redacted()}: master unreachable; the client is reconnecting")
        return store

    async def _call(self, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the pool, bounded by ``timeout``; every failure becomes a ConnectorError."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.blocking_threads, thread_name_prefix="kv-mooncake")
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.wait_for(future, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise ConnectorError(f"{self.url.redacted()}: no answer within {timeout:g}s") from None
        except asyncio.CancelledError:
            if self._closed.is_set():
                raise ConnectorError(f"{self.url.redacted()}: connector closed during the call") from None
            raise
        except ConnectorError:
            raise
        except Exception as exc:  # pybind11 turns C++ exceptions into RuntimeError and friends
            raise ConnectorError(f"{self.url.redacted()}: {type(exc).__name__}: {exc}") from None

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
            if code < 0 and code not in _MISSING:
                raise self._fail("exists", key, code)
        return [code == 1 for code in codes]

    # -- reads ------------------------------------------------------------------------------
    async def get(self, key: str) -> Buffer | None:
        return (await self.batched_get([key]))[0]

    async def batched_get(self, keys: Sequence[str]) -> list[Buffer | None]:
        if not keys:
            return []
        store = self._client()
        return await self._call(self.settings.transfer_timeout, self._get_many, store, list(keys))

    def _get_many(self, store: Any, keys: list[str]) -> list[Buffer | None]:
        out: list[Buffer | None] = [None] * len(keys)
        unstaged = list(range(len(keys)))
        stage = self._get_stage
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
                            out[start + i] = _fresh_copy(stage.array[i * slot:i * slot + code])
                        elif code == INVALID_PARAMS:  # larger than a slot
                            unstaged.append(start + i)
                        elif code not in _MISSING:
                            raise self._fail("get", key, code)
        for i in unstaged:
            out[i] = self._plain_get(store, keys[i])
        return out

    def _slot_size(self, store: Any, first_key: str, stage: _Staging | None) -> int:
        if self._slot_hint or stage is None:
            return self._slot_hint or _ALIGN
        size = store.get_size(first_key)  # learn the value size once (no put seen yet)
        return _aligned(size) if size > 0 else max(_ALIGN, stage.capacity // 8)

    def _plain_get(self, store: Any, key: str) -> Buffer | None:
        size = store.get_size(key)
        if size in _MISSING:
            return None
        if size < 0:
            raise self._fail("get", key, size)
        data = store.get(key)
        if len(data) != size:  # get() answers b"" for every failure
            raise ConnectorError(f"{self.url.redacted()}: get {key!r} returned {len(data)} of {size} bytes "
                                 "(value larger than staging_buffer_size and local_buffer_size?)")
        self._slot_hint = max(self._slot_hint, _aligned(size))
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
        stage = self._put_stage
        unstaged: list[tuple[str, memoryview]] = []
        views = [(key, memoryview(value).cast("B")) for key, value in items]
        for key, view in views:
            if view.nbytes == 0:
                raise ConnectorError(f"{self.url.redacted()}: put {key!r}: Mooncake cannot store an empty value")
            self._slot_hint = max(self._slot_hint, _aligned(view.nbytes))
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
                    offset += _aligned(view.nbytes)
                self._flush(store, stage, group)
        put = getattr(store, self._put_plain)
        for key, view in unstaged:
            self._check_put(key, put(key, view, self._replicate), lambda k=key, v=view: put(k, v, self._replicate))

    def _flush(self, store: Any, stage: _Staging, group: list[tuple[str, int, int]]) -> None:
        if not group:
            return
        keys = [key for key, _, _ in group]
        codes = getattr(store, self._put_many_from)(keys, [stage.ptr + off for _, off, _ in group],
                                                    [n for _, _, n in group], self._replicate)
        put_from = getattr(store, self._put_from)
        for (key, off, n), code in zip(group, codes, strict=True):
            self._check_put(key, code, lambda k=key, o=off, n=n: put_from(k, stage.ptr + o, n, self._replicate))

    def _check_put(self, key: str, code: int, retry: Callable[[], int]) -> None:
        for pause in _EVICTION_PAUSES:  # the failed allocation started an eviction (~5-10 ms)
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
        if code in _MISSING:
            return False
        if code != 0:
            raise self._fail("delete", key, code)
        return True

    async def list(self, prefix: str = "") -> list[str]:
        """Keys from the master's admin HTTP server (``metrics_address``: its --metrics_port)."""
        address = self.settings.metrics_address
        if not address:
            raise ConnectorError(f"{self.url.redacted()}: list needs metrics_address (the master's "
                                 "--metrics_host:--metrics_port) in remote_options or mooncake.json")
        self._client()
        timeout = self.config.blocking_timeout_secs
        text = await self._call(timeout, _http_get, f"http://{address}/get_all_keys", timeout)
        return [key for key in text.splitlines() if key and key.startswith(prefix)]


def _http_get(url: str, timeout: float) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode("utf-8", "replace")
