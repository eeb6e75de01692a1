"""The lm:// server: an asyncio listener, one :class:`ServerConnection` per client over one shared
:class:`ServerState` (the store, the counters), a sweeper that closes connections stuck before
HELLO or mid-frame and expires read leases, the optional Prometheus endpoint, and (shared memory
on) the arena with the thread that hands its fd to clients on the same host."""

from __future__ import annotations

import asyncio
import logging
import time

from .arena import Arena
from .connection import CLOSE_GRACE_SECS, ServerConnection
from .disk import DiskSpill
from .shm import FdServer
from .state import ServerConfig, ServerState
from .store import MemoryStore

logger = logging.getLogger("vllm_kvcache_plugin.server")

__all__ = ["LMServer", "ServerConfig"]


class LMServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        disk = DiskSpill(config.disk_path, config.max_disk_bytes) if config.disk_path else None
        arena = fd_server = None
        if config.shm:
            try:
                arena = Arena(config.max_bytes, config.lease_secs)
                fd_server = FdServer(arena.fd)
            except (OSError, AttributeError) as exc:  # no memfd / abstract sockets (not Linux)
                logger.warning("shared memory unavailable (%s): serving over TCP only", exc)
                if arena is not None:
                    arena.close()
                arena = None
        self.arena = arena
        self.state = ServerState(config, MemoryStore(config.max_bytes, disk, arena), fd_server)
        self.store, self.stats, self.connections = self.state.store, self.state.stats, self.state.connections
        self.snapshot = self.state.snapshot
        self._server: asyncio.AbstractServer | None = None
        self._metrics_server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ServerConnection(self.state), self.config.host, self.config.port, backlog=1024
        )
        if self.config.metrics_port is not None:
            from .metrics import serve_metrics

            self._metrics_server = await serve_metrics(self.config.host, self.config.metrics_port, self.snapshot)
        self._sweeper = loop.create_task(self._sweep_stuck_connections())

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in (self._server, self._metrics_server):
            if server is not None:
                server.close()
        for conn in list(self.connections):
            conn.close()
        deadline = time.monotonic() + CLOSE_GRACE_SECS
        while self.connections and time.monotonic() < deadline:  # let queued replies go out
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()  # peers that do not read
        for server in (self._server, self._metrics_server):
            if server is not None:
                await server.wait_closed()
        if self.state.fd_server is not None:
            self.state.fd_server.close()

    async def _sweep_stuck_connections(self) -> None:
        period = max(0.05, min(self.config.handshake_timeout_secs, self.config.frame_timeout_secs,
                               self.config.lease_secs) / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.close_if_stuck(now)
            if self.arena is not None:
                self.arena.leases.sweep(now)
