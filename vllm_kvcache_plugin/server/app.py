"""The lm:// server: an asyncio listener, one :class:`ServerConnection` per client, one shared
:class:`MemoryStore`, a sweeper that closes connections stuck before HELLO or mid-frame, and the
optional Prometheus endpoint."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from .. import __version__
from ..lm_protocol import PROTOCOL_VERSION, Limits, ScratchPool
from .connection import CLOSE_GRACE_SECS, ServerConnection
from .disk import DiskSpill
from .store import MemoryStore

logger = logging.getLogger("vllm_kvcache_plugin.server")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 65432
    max_bytes: int = 4 * 10**9
    disk_path: str | None = None
    max_disk_bytes: int = 10 * 10**9
    token: str | None = None
    metrics_port: int | None = None
    limits: Limits = field(default_factory=Limits)
    handshake_timeout_secs: float = 10.0
    """A connection that has not completed HELLO by then is closed."""
    frame_timeout_secs: float = 60.0
    """A connection that stops sending in the middle of a frame for this long is closed."""
    max_connections: int = 10_000


@dataclass
class ServerStats:
    connections: int = 0
    connections_total: int = 0
    protocol_errors: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    requests: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)


class LMServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        disk = DiskSpill(config.disk_path, config.max_disk_bytes) if config.disk_path else None
        self.store = MemoryStore(config.max_bytes, disk)
        self.stats = ServerStats()
        self.pool = ScratchPool()
        self.connections: set[ServerConnection] = set()
        self.started_at = time.monotonic()
        self._token = config.token.encode() if config.token else None
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
            lambda: ServerConnection(self), self.config.host, self.config.port, backlog=1024
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

    def token_ok(self, presented: bytes) -> bool:
        return self._token is None or hmac.compare_digest(presented, self._token)

    def snapshot(self) -> dict:
        """Everything STATS and /metrics report."""
        store, disk = self.store, self.store.disk
        return {
            "server": f"vllm-kvcache-plugin {__version__}",
            "protocol_version": PROTOCOL_VERSION,
            "uptime_secs": round(time.monotonic() - self.started_at, 3),
            "keys": store.key_count(),
            "memory_keys": len(store),
            "bytes_used": store.used,
            "bytes_reserved": store.reserved,
            "bytes_pooled": store.pooled,
            "budget": store.budget,
            **vars(store.counters),
            "disk": None if disk is None else {
                "keys": len(disk), "bytes_used": disk.used, "budget": disk.budget,
                "write_failures": disk.write_failures,
            },
            "connections": self.stats.connections,
            "connections_total": self.stats.connections_total,
            "protocol_errors": self.stats.protocol_errors,
            "bytes_received": self.stats.bytes_received,
            "bytes_sent": self.stats.bytes_sent,
            "requests": dict(self.stats.requests),
            "errors": dict(self.stats.errors),
        }

    async def _sweep_stuck_connections(self) -> None:
        period = max(0.05, min(self.config.handshake_timeout_secs, self.config.frame_timeout_secs) / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.close_if_stuck(now)
