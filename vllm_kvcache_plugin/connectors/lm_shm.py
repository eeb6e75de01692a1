"""Shared memory for ``lm://`` on the same host: values reach the caller as views of the server's
arena, mapped read-only once per connection, instead of being copied through a socket.

After HELLO, :meth:`ShmClient.negotiate` asks SHM_ATTACH (only when the server offers it, the URL
allows it and the server's address is this host's), fetches the arena's fd over the server's
abstract unix socket with the one-time nonce it was given, maps it and checks the arena id at its
start. Any failure leaves the connection on TCP, exactly as before; the path taken is logged
once. :meth:`ShmClient.get_leased` then asks BATCH_GET_LEASE and returns :class:`Leased` views.

A lease is void after its ``deadline``, computed from the time *before* the request was sent, so
it can only end before the server's own expiry, never after: a caller that checks it after
reading knows the server could not have reused the region meanwhile. Releases are batched: any
thread queues them, one LEASE_RELEASE frame carries all ids queued within RELEASE_DELAY_SECS (or
before the next leased read), and nobody waits for its reply (which says per lease whether it was
still valid: counted, logged).
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import logging
import mmap
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConnectorError, ProtocolError
from ..lm_protocol import MISSING, SHM_MAGIC, Op, Status, decode_leases, encode_ids, encode_keys
from ..memory import MADV_POPULATE_READ
from ..threads import start_thread

logger = logging.getLogger("vllm_kvcache_plugin.connectors.lm")

MODES = ("auto", "on", "off")
RELEASE_DELAY_SECS = 0.005  # releases queued within this window share one frame (a scatter group's chunks)
POPULATE_SLICE = 256 << 20  # bytes examined per mincore / madvise round of the background walk


@dataclass(frozen=True)
class Leased:
    view: memoryview  # the value, read-only, in the mapping
    address: int  # of view[0], to tell whether a decoded tensor still points into the mapping
    lease_id: int
    deadline: float  # time.monotonic() after which the view may hold another value
    lease_secs: float
    release: Callable[[], None]  # give the lease back (any thread, at most once)


class ShmMapping:
    """The server's arena, mapped read-only."""

    def __init__(self, info: dict, fd: int) -> None:
        self.size = int(info["size"])
        self.lease_secs = float(info["lease_secs"])
        if os.fstat(fd).st_size < self.size:
            raise ConnectorError("the shared-memory fd is smaller than the arena the server announced")
        self._map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.view = memoryview(self._map)
        if bytes(self.view[: len(SHM_MAGIC) + 16]) != SHM_MAGIC + bytes.fromhex(info["arena_id"]):
            raise ConnectorError("the mapped memory is not the server's arena")
        self.address = int(np.frombuffer(self.view, dtype=np.uint8, count=1).ctypes.data)
        self.populated = 0  # bytes of stored values mapped ahead of the first read
        start_thread(self._populate, "kvcache-shm-populate")

    def holds(self, address: int) -> bool:
        return self.address <= address < self.address + self.size

    def _populate(self) -> None:
        """Map the arena's stored values into this process's page tables in the background.

        A fresh mapping costs a page fault per 4 KiB on the first read of each value: after a
        restart, ~8 ms per 90 MB of the first loads (measured for issue 14), paid while a request
        waits. This walk asks the kernel which pages hold data (``mincore``: a page the server never
        wrote is not touched, since mapping it would allocate it) and maps those runs with
        ``MADV_POPULATE_READ``, at low priority. Values stored later fault in on their first read."""
        if not sys.platform.startswith("linux"):
            return
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # this thread only (Linux)
        except OSError:
            pass
        started = time.perf_counter()
        try:
            self.populated = populate_resident(self.address, self.size)
        except OSError as exc:
            logger.debug("shared-memory arena: mapping stored values ahead failed (%s); they fault in on first read",
                         exc)
            return
        if self.populated:
            logger.info("shared-memory arena: %.2f GB of stored values mapped ahead of the first load in %.0f ms",
                        self.populated / 1e9, 1e3 * (time.perf_counter() - started))


def populate_resident(address: int, size: int, slice_bytes: int = POPULATE_SLICE) -> int:
    """Map the pages of ``[address, address + size)`` (page-aligned, a shared mapping) that already
    hold data, a slice at a time; the bytes mapped. Raises OSError where the kernel refuses
    (``MADV_POPULATE_READ`` needs Linux 5.14)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    done = 0
    for start in range(0, size, slice_bytes):
        length = min(slice_bytes, size - start)
        pages = (length + page - 1) // page
        vec = np.zeros(pages, dtype=np.uint8)
        if libc.mincore(ctypes.c_void_p(address + start), ctypes.c_size_t(length),
                        vec.ctypes.data_as(ctypes.c_void_p)) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        resident = np.concatenate(([0], vec & 1, [0])).astype(np.int8)
        edges = np.flatnonzero(np.diff(resident))
        for first, last in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            if libc.madvise(ctypes.c_void_p(address + start + first * page), ctypes.c_size_t((last - first) * page),
                            MADV_POPULATE_READ) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_READ) failed")
            done += (last - first) * page
    return done


class ShmClient:
    """The shared-memory side of one :class:`~.lm.LMConnector` (its mapping lives on the connection)."""

    def __init__(self, where: str, mode: str) -> None:
        self.where = where
        self.mode = mode
        self.stats = {"leases": 0, "released": 0, "expired_at_release": 0, "release_frames": 0}
        self._logged: str | None = None
        self._lock = threading.Lock()
        self._queued: list[tuple[object, int]] = []  # (mapping, lease id) to release
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connector = None

    # -- negotiation -------------------------------------------------------------------------
    async def negotiate(self, connector, proto, info: dict, timeout: float) -> None:
        """Attach ``proto`` to the server's arena if possible (``proto.shm``), else leave it on TCP."""
        self._connector, self._loop = connector, asyncio.get_running_loop()
        reason = self._why_not(proto, info)
        if reason is None:
            try:
                proto.shm = await asyncio.wait_for(self._attach(proto, timeout), timeout)
            except (ConnectorError, OSError, ValueError, KeyError, asyncio.TimeoutError) as exc:
                reason = f"attach failed: {exc or type(exc).__name__}"
        if reason is None:
            path = f"shared memory (arena {proto.shm.size / 1e9:.2f} GB, leases {proto.shm.lease_secs:g} s)"
        else:
            path = f"TCP ({reason})"
        if path != self._logged:
            self._logged = path
            (logger.warning if self.mode == "on" and reason else logger.info)("%s: loads over %s", self.where, path)

    def _why_not(self, proto, info: dict) -> str | None:
        if self.mode == "off":
            return "shm=off"
        if not info.get("shm"):
            return "the server offers no shared memory"
        if self.mode == "auto" and not _same_host(proto):
            return "the server is on another host"
        return None

    async def _attach(self, proto, timeout: float) -> ShmMapping:
        reply = await proto.send(Op.SHM_ATTACH)
        if reply.status != Status.OK:
            raise ConnectorError(bytes(b"".join(reply.body)).decode("utf-8", errors="replace"))
        info = json.loads(b"".join(reply.body))
        if int(info.get("uid", -1)) != os.getuid():
            raise ConnectorError("the server runs as another user")
        if self.mode == "auto" and info.get("peer") != list(proto.transport.get_extra_info("sockname")[:2]):
            # Something (a proxy, a tunnel) relays this connection: keep the data on its path.
            raise ConnectorError(f"the server sees this connection from {info.get('peer')}, not from this socket")
        loop = asyncio.get_running_loop()
        fd = await loop.run_in_executor(None, _fetch_fd, str(info["socket"]), bytes.fromhex(info["nonce"]), timeout)
        try:
            return ShmMapping(info, fd)
        finally:
            os.close(fd)

    # -- leased reads ------------------------------------------------------------------------
    async def get_leased(self, connector, keys: Sequence[str]) -> list[Leased | None]:
        proto = await connector._connection()
        mapping = getattr(proto, "shm", None)
        if mapping is None:
            raise ConnectorError(f"{self.where}: this connection has no shared memory")
        self._flush()  # releases still queued go first, in the same write
        deadline = time.monotonic() + mapping.lease_secs  # before sending: never later than the server's
        frames = [encode_keys(g) for g in connector._key_groups(keys)]
        replies = await connector._call_many(Op.BATCH_GET_LEASE, frames, proto=proto)
        out: list[Leased | None] = []
        for reply in replies:
            for length, offset, lease_id in decode_leases(reply.meta, connector.limits.max_batch):
                if length == MISSING:
                    out.append(None)
                    continue
                if offset + length > mapping.size:
                    raise ProtocolError(f"lease at {offset}+{length} is outside the arena")
                self.stats["leases"] += 1
                out.append(Leased(mapping.view[offset : offset + length], mapping.address + offset, lease_id,
                                  deadline, mapping.lease_secs, _once(self._queue_release, mapping, lease_id)))
        return out

    # -- batched releases --------------------------------------------------------------------
    def _queue_release(self, mapping: ShmMapping, lease_id: int) -> None:
        with self._lock:
            self._queued.append((mapping, lease_id))
            if self._flush_scheduled or self._loop is None:
                return
            self._flush_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._loop.call_later, RELEASE_DELAY_SECS, self._flush)
        except RuntimeError:  # the loop is closed: the leases expire on their own
            pass

    def _flush(self) -> None:
        with self._lock:
            queued, self._queued, self._flush_scheduled = self._queued, [], False
        proto = getattr(self._connector, "_proto", None)
        mapping = getattr(proto, "shm", None)
        ids = [lease_id for m, lease_id in queued if m is mapping]  # others: a past server's, expiring there
        if not ids or proto is None or not proto.usable:
            return
        step = self._connector.limits.max_batch
        for i in range(0, len(ids), step):
            group = ids[i : i + step]
            self.stats["release_frames"] += 1
            proto.send(Op.LEASE_RELEASE, encode_ids(group)).add_done_callback(self._released)

    def _released(self, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        reply = future.result()
        if reply.status != Status.OK:
            return
        flags = b"".join(reply.body)
        expired = flags.count(0)
        self.stats["released"] += len(flags) - expired
        if expired:
            self.stats["expired_at_release"] += expired
            logger.warning("%s: %d read lease(s) expired before their chunks were released (a load slower than "
                           "the server's --lease-secs)", self.where, expired)


def _once(fn: Callable, *args) -> Callable[[], None]:
    done = []

    def call() -> None:
        if not done:
            done.append(True)
            fn(*args)

    return call


def _same_host(proto) -> bool:
    """The TCP peer is this host: loopback, or the very address this end has."""
    transport = getattr(proto, "transport", None)
    try:
        peer = transport.get_extra_info("peername")[0]
        local = transport.get_extra_info("sockname")[0]
        return ipaddress.ip_address(peer).is_loopback or peer == local
    except (AttributeError, TypeError, IndexError, ValueError):
        return False


def _fetch_fd(name: str, nonce: bytes, timeout: float) -> int:
    """Blocking (run on a thread): present the nonce on the server's abstract socket, receive the fd."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect("\0" + name)
        sock.sendall(nonce)
        message, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
    if message != b"OK" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ConnectorError(f"the server refused the fd ({message.decode(errors='replace') or 'closed'})")
    return fds[0]
