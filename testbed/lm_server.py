"""The lm:// server as a real process on 127.0.0.1 (a free port), stopped by PID: for the tests
(tests/fixtures/lm_server.py wraps it in fixtures), the benchmarks and the demo."""

from __future__ import annotations

import asyncio
import sys
import time

from testbed.processes import LOOPBACK, ManagedProcess, port_open


class LMServerProcess:
    """A running ``python -m vllm_kvcache_plugin.server`` and how to reach it."""

    def __init__(self, port: int, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port
        self.extra_args = extra_args
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"lm://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 30.0) -> LMServerProcess:
        argv = [sys.executable, "-m", "vllm_kvcache_plugin.server", "--host", LOOPBACK, "--port", str(self.port),
                *self.extra_args]
        self.process = ManagedProcess(f"lm-server-{self.port}", argv).start()
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if not self.process.alive():
                raise RuntimeError(f"lm server exited at start:\n{self.process.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"lm server on port {self.port} not listening after {timeout:.0f}s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def restart(self) -> LMServerProcess:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.process.log_tail(200) if self.process else ""


def clear_store(url: str) -> None:
    """Delete every key on the server at ``url`` (with the project's own connector)."""
    from vllm_kvcache_plugin.connectors import create_connector

    async def run() -> None:
        connector = create_connector(url)
        try:
            keys = await connector.list("")
            if keys:
                await connector.batched_delete(keys)
        finally:
            await connector.close()

    asyncio.run(run())
