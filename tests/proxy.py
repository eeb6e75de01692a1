"""A loopback TCP proxy that delays every byte it forwards: a real slow network for fault tests.

It listens on 127.0.0.1 (free port) and forwards to a target on 127.0.0.1, sleeping ``delay``
seconds before forwarding each piece it reads. ``delay`` can change while it runs. It can also
stall the server's replies part-way (:meth:`DelayProxy.stall_replies_after`): the rest of the
bytes wait until :meth:`DelayProxy.release`, like a store that freezes in the middle of a value.
"""

from __future__ import annotations

import asyncio
import threading

from testbed.processes import LOOPBACK, free_port


class DelayProxy:
    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._stall_budget: int | None = None  # reply bytes still let through before the stall
        self._released = asyncio.Event()
        self.stalled = threading.Event()  # set when a reply has been cut at the stall point
        self.drained = threading.Event()  # set when the held bytes were sent (or the client was gone)

    def stall_replies_after(self, nbytes: int) -> None:
        """Let ``nbytes`` more bytes of server replies through, then hold the rest until release()."""
        self._loop.call_soon_threadsafe(self._released.clear)
        self.stalled.clear()
        self.drained.clear()
        self._stall_budget = nbytes

    def release(self) -> None:
        self._stall_budget = None
        self._loop.call_soon_threadsafe(self._released.set)

    def start(self) -> DelayProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, LOOPBACK, self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool = False) -> None:
        try:
            while data := await reader.read(1 << 16):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if replies and self._stall_budget is not None:
                    await self._forward_with_stall(data, writer)
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _forward_with_stall(self, data: bytes, writer: asyncio.StreamWriter) -> None:
        budget = self._stall_budget or 0
        head, rest = data[:budget], data[budget:]
        self._stall_budget = budget - len(head)
        if head:
            writer.write(head)
            await writer.drain()
        if not rest:
            return
        self.stalled.set()
        await self._released.wait()
        try:
            writer.write(rest)
            await writer.drain()
        finally:
            self.drained.set()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, upstream_writer),
                             self._pipe(upstream_reader, client_writer, replies=True))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
