"""The remote connector interface: bytes in, bytes out, keyed by strings.

A connector knows nothing of tiers, serde or vLLM. It raises :class:`ConnectorError` when the store
fails; the storage layer above turns that (and time-outs) into misses, health flags and retries.
All I/O methods are coroutines run on the storage layer's event loop; a connector built on a
blocking client runs it in a thread (see :meth:`RemoteConnector.run_blocking`).
"""

from __future__ import annotations

import asyncio
import functools
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..config import KVCacheConfig
from ..threads import thread_pool
from .url import RemoteURL

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")

#: Keys a listing asks the store for at a time (one round trip each).
DEFAULT_PAGE_SIZE = 1000


@dataclass(frozen=True)
class KeyPage:
    """One page of a listing: keys, and their values' sizes in bytes when the store gave them in
    the same round trip (``None``: ask :meth:`RemoteConnector.batched_size` if they matter)."""

    keys: tuple[str, ...]
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.sizes is not None and len(self.sizes) != len(self.keys):
            raise ValueError(f"a key page has {len(self.keys)} keys but {len(self.sizes)} sizes")


class RemoteConnector(ABC):
    """Subclass, implement the abstract coroutines, register the scheme (entry point
    ``vllm_kvcache_plugin.connectors``). Batched methods default to concurrent single calls;
    override them where the store can batch in one round trip."""

    schemes: ClassVar[tuple[str, ...]] = ()
    #: Number of threads for :meth:`run_blocking` (0: no pool needed).
    blocking_threads: ClassVar[int] = 0
    #: True when :meth:`batched_get_into` receives straight into the caller's buffers (the storage
    #: layer then hands it pooled, already-touched memory instead of taking fresh buffers).
    supports_get_into: ClassVar[bool] = False
    #: How :meth:`scan` lists: "paged" (bounded pages, a cursor kept by the store or a lazy walk),
    #: "one reply" (the store sends every key at once by its design), or "none" (it cannot list).
    listing: ClassVar[str] = "one reply"
    #: False for a sink that keeps nothing (blackhole): a value put cannot be read back.
    stores_values: ClassVar[bool] = True

    def __init__(self, url: RemoteURL, config: KVCacheConfig | None = None) -> None:
        """Cheap and offline: connect lazily or in :meth:`connect`."""
        self.url = url
        self.config = config or KVCacheConfig()
        self._executor: ThreadPoolExecutor | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def connect(self) -> None:  # noqa: B027 - optional hook
        """Open connections eagerly (called once at start-up, bounded by a time-out)."""

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def ping(self) -> bool:
        """True when the store answers; never raises."""
        try:
            await self.exists("__vllm_kvcache_plugin_ping__")
            return True
        except Exception:
            return False

    # -- single-key operations --------------------------------------------------------------
    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    async def get(self, key: str) -> Buffer | None: ...

    @abstractmethod
    async def put(self, key: str, value: Buffer) -> None: ...

    @abstractmethod
    async def delete(self, key: str) -> bool: ...

    @abstractmethod
    async def list(self, prefix: str = "") -> list[str]: ...

    # -- listing (operator tools: inspect, purge) -------------------------------------------
    async def scan(self, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[KeyPage]:
        """The keys starting with ``prefix``, a page at a time: a store that can page never has to
        hold (or send) all its keys at once. Every key stored for the whole scan is seen once; keys
        added or deleted meanwhile may or may not be. Default: one page of :meth:`list`."""
        yield KeyPage(tuple(await self.list(prefix)))

    async def batched_size(self, keys: Sequence[str]) -> list[int | None]:
        """Each value's size in bytes (None: not stored). Default: fetches the values (override)."""
        return [None if v is None else memoryview(v).nbytes for v in await self.batched_get(keys)]

    async def batched_delete(self, keys: Sequence[str]) -> list[bool]:
        """Delete each key; True where it was stored."""
        return list(await asyncio.gather(*(self.delete(k) for k in keys)))

    # -- batched operations (override for one round trip) -----------------------------------
    async def batched_exists(self, keys: Sequence[str]) -> list[bool]:
        return list(await asyncio.gather(*(self.exists(k) for k in keys)))

    async def batched_get(self, keys: Sequence[str]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k) for k in keys)))

    async def batched_put(self, items: Sequence[tuple[str, Buffer]]) -> None:
        await asyncio.gather(*(self.put(k, v) for k, v in items))

    async def batched_get_into(self, keys: Sequence[str], outs: Sequence[Buffer]) -> list[int | None]:
        """Receive each value into its buffer: its length, None for a miss, or a length above the
        buffer's size when the value did not fit (it is dropped). Only if ``supports_get_into``.

        Once this returns or raises (a cancellation included), nothing may write into ``outs``
        any more: the caller hands them to other users at once."""
        raise NotImplementedError(f"{type(self).__name__} does not receive into caller buffers")

    # -- helpers -----------------------------------------------------------------------------
    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking client call on this connector's thread pool."""
        if self._executor is None:
            self._executor = thread_pool(max(1, self.blocking_threads), f"kv-{self.url.scheme}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted()!r})"
