"""The Mooncake client's lifecycle: ``setup`` on a background thread, retried with back-off (an
unreachable master never blocks start-up for Mooncake's minute of retries), the two registered
staging areas values move through, the registry of caller buffers gets land in directly, and the
ready-or-fail-at-once check every call starts with."""

from __future__ import annotations

import bisect
import logging
import os
import socket
import threading
from typing import Any

import numpy as np

from .. import memory
from ..errors import ConnectorError, MissingDependencyError
from ..threads import start_thread
from .mooncake_settings import MooncakeSettings

logger = logging.getLogger("vllm_kvcache_plugin.connectors.mooncake")

ALIGN = 4096
EVICTION_PAUSES = (0.005, 0.01, 0.02, 0.05, 0.1)
# Mooncake return codes (mooncake-store ErrorCode).
NO_SPACE, INVALID_PARAMS, OBJECT_ALREADY_EXISTS = -200, -600, -705
MISSING_CODES = {-703: "replica not ready", -704: "object not found", -712: "replica gone"}
_CODE_NAMES = {-1: "internal error", NO_SPACE: "no space left in the segments",
               INVALID_PARAMS: "invalid parameters, or a value over local_buffer_size",
               -706: "object has a lease", -707: "lease expired during transfer", -800: "transfer failed",
               -900: "RPC to the master failed", -901: "RPC timed out", **MISSING_CODES}


def code_name(code: int) -> str:
    return f"{code} ({_CODE_NAMES.get(code, 'error')})"


def import_mooncake() -> Any:
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


class StagingArea:
    """A registered buffer values are copied through; one transfer at a time uses it."""

    def __init__(self, size: int) -> None:
        self.array = np.empty(size, dtype=np.uint8)
        self.array.fill(0)  # fault the pages in now, not during the first transfer
        self.view = memoryview(self.array)
        self.ptr = int(self.array.ctypes.data)
        self.capacity = size
        self.lock = threading.Lock()


def fresh_copy(source: np.ndarray) -> memoryview:
    """A copy the caller owns. numpy asks the kernel for huge pages for arrays this large, which
    makes fresh memory about twice as fast to fault in as a bytearray's."""
    out = np.empty(source.nbytes, dtype=np.uint8)
    out[:] = source
    return memoryview(out)


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class BufferRegistry:
    """Caller buffers (the allocator's pooled receive buffers) registered with Mooncake once each,
    by address and size, so ``batch_get_into`` writes values straight into them.

    A registration must end before its memory is freed and reused (with RDMA it pins the pages it
    was made for). The allocator says when it lets a buffer go (``memory.add_drop_listener``):
    :meth:`dropped` only notes it (it runs on whatever thread freed a chunk, so it makes no
    Mooncake call), and the next :meth:`ensure` (on a data thread, under this lock) unregisters
    it before any buffer is registered or trusted. Two live buffers never overlap, so a
    registration that overlaps a live buffer handed to :meth:`ensure` is stale (its memory was
    freed without a word) and is unregistered too. Thread-safe."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}  # address -> size, non-overlapping
        self._starts: list[int] = []  # the same addresses, sorted
        self._dropped: list[tuple[int, int]] = []
        self.registrations = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def dropped(self, ptr: int, size: int) -> None:
        """memory's drop listener: ``ptr`` is about to be freed (never blocks, never raises)."""
        with self._lock:
            if self._sizes.get(ptr) == size:
                self._dropped.append((ptr, size))

    def ensure(self, ptr: int, size: int) -> bool:
        """Register ``[ptr, ptr + size)`` unless it already is; False if Mooncake refused."""
        with self._lock:
            self._flush_dropped()
            if self._sizes.get(ptr) == size:
                return True
            i = bisect.bisect_left(self._starts, ptr + size)
            while i > 0 and self._starts[i - 1] + self._sizes[self._starts[i - 1]] > ptr:
                self._unregister(self._starts[i - 1])  # stale: that memory is this live buffer now
                i -= 1
            if size <= 0 or self.store.register_buffer(ptr, size) != 0:
                return False
            self._sizes[ptr] = size
            bisect.insort(self._starts, ptr)
            self.registrations += 1
            return True

    def clear(self) -> None:
        """Unregister everything (before the store closes; no data call may be running)."""
        with self._lock:
            self._dropped.clear()
            for ptr in list(self._starts):
                self._unregister(ptr)

    def _flush_dropped(self) -> None:
        dropped, self._dropped = self._dropped, []
        for ptr, size in dropped:
            if self._sizes.get(ptr) == size:
                self._unregister(ptr)

    def _unregister(self, ptr: int) -> None:
        del self._sizes[ptr]
        self._starts.pop(bisect.bisect_left(self._starts, ptr))
        code = self.store.unregister_buffer(ptr)
        if code != 0:
            logger.debug("Mooncake unregister_buffer(%#x) returned %s", ptr, code)



class MooncakeClient:
    """Owns one ``MooncakeDistributedStore``: sets it up in the background, hands it out when ready."""

    def __init__(self, settings: MooncakeSettings, where: str) -> None:
        self.settings = settings
        self.where = where  # the redacted URL, for messages
        self.module = import_mooncake()
        self.store: Any = None
        self.replicate: Any = None
        self.put_stage: StagingArea | None = None
        self.get_stage: StagingArea | None = None
        self.registry: BufferRegistry | None = None  # set with the store
        self.ready = threading.Event()
        self.closed = threading.Event()
        self._setup_thread: threading.Thread | None = None
        self.last_error = "setup not started"

    def start_setup(self) -> None:
        if self._setup_thread is None and not self.closed.is_set():
            # One attempt per setup() call (Mooncake's default is ~20 x 4 s); we retry with back-off.
            os.environ.setdefault("MC_STORE_CLIENT_SETUP_RETRIES", "1")
            self._setup_thread = start_thread(self._setup_loop, "kv-mooncake-setup")

    def _setup_loop(self) -> None:
        delay = 0.5
        while not self.closed.is_set():
            try:
                store = self._setup_once()
            except Exception as exc:  # a failed attempt only delays readiness
                self.last_error = str(exc)
                logger.warning("Mooncake setup failed (%s); retrying in %.1fs", exc, delay)
                if self.closed.wait(delay):
                    return
                delay = min(delay * 2, 30.0)
                continue
            if self.closed.is_set():
                self.release(store)
                return
            self.registry = BufferRegistry(store)
            memory.add_drop_listener(self.registry.dropped)
            self.store = store
            self.last_error = ""
            self.ready.set()
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
        store = self.module.MooncakeDistributedStore()
        rc = store.setup(s.local_hostname, s.metadata_server, s.global_segment_size, s.local_buffer_size,
                         s.protocol, s.device_name, s.master_server_address, tenant_id=s.tenant_id)
        if rc != 0:
            store.close()
            raise ConnectorError(f"setup against master {s.master_server_address} returned {rc}")
        self.replicate = self.module.ReplicateConfig()
        self.replicate.replica_num = s.replica_num
        if s.staging_buffer_size >= ALIGN:
            try:
                stages = [StagingArea(s.staging_buffer_size) for _ in range(2)]
            except MemoryError:
                stages = []
            codes = [store.register_buffer(st.ptr, st.capacity) for st in stages]
            if stages and codes == [0, 0]:
                self.put_stage, self.get_stage = stages
            else:  # zero-copy where memory allows; plain put/get otherwise
                logger.warning("Mooncake staging areas unavailable (register_buffer: %s); using plain put/get", codes)
                for stage, code in zip(stages, codes, strict=True):
                    if code == 0:
                        store.unregister_buffer(stage.ptr)
        return store

    def release(self, store: Any) -> None:
        registry, self.registry = self.registry, None
        if registry is not None:
            memory.remove_drop_listener(registry.dropped)
            registry.clear()
        for stage in (self.put_stage, self.get_stage):
            if stage is not None:
                store.unregister_buffer(stage.ptr)
        self.put_stage = self.get_stage = None
        store.close()

    def ready_store(self) -> Any:
        """The ready client, or a ConnectorError at once (never wait on a master known to be down)."""
        if self.closed.is_set():
            raise ConnectorError(f"{self.where}: connector is closed")
        store = self.store
        if store is None:
            self.start_setup()
            raise ConnectorError(f"{self.where}: not connected yet ({self.last_error}); "
                                 "setup is retrying in the background")
        if store.health_check() != 0:  # a flag kept by Mooncake's ping thread; no I/O
            raise ConnectorError(f"{self.where}: master unreachable; the client is reconnecting")
        return store

    def close(self) -> None:
        """After the connector's calls have drained: unregister the staging areas, close the store."""
        self.closed.set()
        store, self.store = self.store, None
        if store is not None:
            self.release(store)
