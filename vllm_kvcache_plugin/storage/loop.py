"""A private asyncio event loop on a daemon thread, for the connectors' coroutines.

vLLM's worker calls the storage layer synchronously from its own threads; connectors are async.
Every coroutine runs on this one loop, and callers wait with a deadline, so a stuck store can
never hold a caller longer than ``blocking_timeout_secs``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..threads import start_thread, thread_pool

T = TypeVar("T")


class EventLoopThread:
    def __init__(self, name: str = "kvcache-io") -> None:
        self.loop = asyncio.new_event_loop()
        # run_in_executor(None, ...) and asyncio.to_thread: on threads started like every other
        # (the worker's CPUs, a name of their own), asyncio's default pool size.
        self.loop.set_default_executor(thread_pool(min(32, (os.cpu_count() or 1) + 4), f"{name}-pool"))
        self._thread = start_thread(self._run, name)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the loop and wait; on time-out cancel it and raise TimeoutError."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:  # the builtin TimeoutError since Python 3.11
            if future.done():  # the coroutine's own time-out (a ConnectorTimeout), or it just finished
                return future.result()
            future.cancel()
            raise TimeoutError(f"no answer within {timeout:.2f}s") from None

    def stop(self, timeout: float = 5.0) -> None:
        if not self.loop.is_running():
            return

        async def _shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.submit(_shutdown()).result(timeout)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
