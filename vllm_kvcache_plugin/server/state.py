"""What every connection of the lm server shares: its settings, the store, the counters, the set of
open connections and the receive scratch pool. The server (app.py) builds one; each connection
and the command handlers read it, so neither needs the other or the server object."""

from __future__ import annotations

import hmac
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..lm_protocol import PROTOCOL_VERSION, Limits, ScratchPool
from .store import MemoryStore


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
    shm: bool = True
    """Keep values in a shared-memory arena and offer it to clients on the same host."""
    lease_secs: float = 10.0
    """How long a shared-memory read lease keeps a value's region from being reused."""


@dataclass
class ServerStats:
    connections: int = 0
    connections_total: int = 0
    protocol_errors: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    requests: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)


class ServerState:
    """Single-threaded: the server's event loop is the only user."""

    def __init__(self, config: ServerConfig, store: MemoryStore, fd_server: Any = None) -> None:
        self.config = config
        self.store = store
        self.fd_server = fd_server  # shm.FdServer when shared memory is on
        self.stats = ServerStats()
        self.pool = ScratchPool()
        self.connections: set[Any] = set()  # the open ServerConnections
        self.started_at = time.monotonic()
        self._token = config.token.encode() if config.token else None

    def token_ok(self, presented: bytes) -> bool:
        return self._token is None or hmac.compare_digest(presented, self._token)

    def snapshot(self) -> dict:
        """Everything STATS and /metrics report."""
        store, disk, stats = self.store, self.store.disk, self.stats
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
            "shm": None if store.arena is None else {
                **store.arena.stats(), "attaches": getattr(self.fd_server, "attaches", 0),
                "attaches_refused": getattr(self.fd_server, "refused", 0),
            },
            "connections": stats.connections,
            "connections_total": stats.connections_total,
            "protocol_errors": stats.protocol_errors,
            "bytes_received": stats.bytes_received,
            "bytes_sent": stats.bytes_sent,
            "requests": dict(stats.requests),
            "errors": dict(stats.errors),
        }
