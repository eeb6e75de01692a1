"""Prometheus text exposition of the lm server's STATS, served at ``/metrics`` by a tiny asyncio
HTTP handler (one request per connection, bounded request size and time; no extra dependency)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

PREFIX = "lm_server_"
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_SECS = 5.0

# (snapshot key, metric name, type, help)
_SCALARS = [
    ("keys", "keys", "gauge", "Keys stored (memory and disk)."),
    ("memory_keys", "memory_keys", "gauge", "Keys held in memory."),
    ("bytes_used", "memory_bytes_used", "gauge", "Bytes charged to the memory budget by stored values."),
    ("bytes_reserved", "memory_bytes_reserved", "gauge", "Bytes reserved for values still arriving."),
    ("budget", "memory_budget_bytes", "gauge", "Memory budget in bytes."),
    ("hits", "hits_total", "counter", "GETs that found their key."),
    ("misses", "misses_total", "counter", "GETs that did not find their key."),
    ("disk_hits", "disk_hits_total", "counter", "GETs served from the disk spill."),
    ("evictions", "evictions_total", "counter", "Values evicted from memory."),
    ("spills", "spills_total", "counter", "Evicted values written to disk."),
    ("rejected_no_space", "rejected_no_space_total", "counter", "PUTs refused: memory held by arriving values."),
    ("connections", "connections", "gauge", "Open client connections."),
    ("connections_total", "connections_total", "counter", "Client connections accepted."),
    ("protocol_errors", "protocol_errors_total", "counter", "Connections closed for breaking the protocol."),
    ("bytes_received", "received_bytes_total", "counter", "Bytes received from clients."),
    ("bytes_sent", "sent_bytes_total", "counter", "Bytes sent to clients."),
    ("uptime_secs", "uptime_seconds", "gauge", "Seconds since start."),
]
_DISK = [
    ("keys", "disk_keys", "gauge", "Values in the disk spill."),
    ("bytes_used", "disk_bytes_used", "gauge", "Bytes in the disk spill."),
    ("budget", "disk_budget_bytes", "gauge", "Disk spill budget in bytes."),
    ("write_failures", "disk_write_failures_total", "counter", "Spill writes that failed."),
]
_SHM = [
    ("arena_bytes", "shm_arena_bytes", "gauge", "Size of the shared-memory arena."),
    ("free_bytes", "shm_free_bytes", "gauge", "Arena bytes in free regions."),
    ("held_bytes", "shm_held_bytes", "gauge", "Arena bytes of values gone from the store that leases still hold."),
    ("leases_active", "shm_leases_active", "gauge", "Read leases not yet released or expired."),
    ("leases_granted", "shm_leases_granted_total", "counter", "Read leases granted."),
    ("leases_expired", "shm_leases_expired_total", "counter", "Read leases that expired before release."),
    ("attaches", "shm_attaches_total", "counter", "Clients given the arena's fd."),
]


def render_prometheus(snapshot: dict) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        lines.extend(f"{PREFIX}{name}{labels} {value}" for labels, value in samples)

    for key, name, kind, help_text in _SCALARS:
        metric(name, kind, help_text, [("", snapshot[key])])
    if snapshot.get("disk"):
        for key, name, kind, help_text in _DISK:
            metric(name, kind, help_text, [("", snapshot["disk"][key])])
    if snapshot.get("shm"):
        for key, name, kind, help_text in _SHM:
            metric(name, kind, help_text, [("", snapshot["shm"][key])])
    metric("requests_total", "counter", "Requests by command.",
           [(f'{{command="{cmd}"}}', n) for cmd, n in sorted(snapshot["requests"].items())])
    metric("errors_total", "counter", "Error replies by status.",
           [(f'{{status="{status}"}}', n) for status, n in sorted(snapshot["errors"].items())])
    return "\n".join(lines) + "\n"


async def serve_metrics(host: str, port: int, snapshot: Callable[[], dict]) -> asyncio.AbstractServer:
    """Serve ``GET /metrics`` on ``host:port``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_SECS)
            method, path, *_ = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""]
            if method == b"GET" and path.split(b"?")[0] == b"/metrics":
                status, body = "200 OK", render_prometheus(snapshot()).encode()
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            else:
                status, body, ctype = "404 Not Found", b"only GET /metrics is served\n", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode() + body
            )
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_SECS)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_BYTES)
