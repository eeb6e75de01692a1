"""The operator's door: check a configuration before vLLM starts, see what a store holds, purge a model.

It reads the configuration exactly as the connector does (``settings.load_settings``), talks to the
stores through the same connectors, and knows no vLLM, so ``vllm-kvcache`` (the command line above
it) answers in a second where starting vLLM to find a typo or a dead store takes a minute.
Listings go a page at a time (:meth:`RemoteConnector.scan`), so a store of millions of keys is
never held in memory at once.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import connectors
from .config import KVCacheConfig
from .connectors.base import DEFAULT_PAGE_SIZE, KeyPage, RemoteConnector
from .errors import ConnectorTimeout, KVCacheError
from .keys import ChunkKey, model_prefix

#: Throwaway values ``check`` writes, reads back and deletes (a few MB: enough for a bandwidth figure).
PROBE_VALUES = 4
PROBE_VALUE_BYTES = 2 << 20
PROBE_KEY_PREFIX = "vllm-kvcache-check@"
PINGS = 5
#: A purge lists the store again after deleting, and deletes what a listing missed, this many times.
PURGE_PASSES = 3
_SECRET_NAME = re.compile(r"pass|token|secret|credential|auth", re.I)


class CheckFailed(KVCacheError):
    """A store or folder the configuration names does not work (one line: what, and why)."""


# -- the configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    key: str
    value: str  # as it may be printed: secrets redacted
    source: str


def effective_settings(config: KVCacheConfig) -> list[Setting]:
    """Every setting with its value and where it came from; passwords and tokens never appear."""
    out = []
    for key, value in config.as_dict().items():
        if key == "remote_url":
            shown = connectors.describe_remote(value)
        elif isinstance(value, Mapping):
            shown = repr({k: "***" if _SECRET_NAME.search(str(k)) else v for k, v in value.items()})
        else:
            shown = repr(value) if isinstance(value, str) else str(value)
        out.append(Setting(key, shown, config.source(key)))
    return out


# -- check ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskReport:
    path: str
    free_bytes: int
    budget_bytes: int


@dataclass(frozen=True)
class RemoteReport:
    url: str  # redacted
    connect_ms: float
    round_trip_ms: float  # median of PINGS exists() calls
    probe_bytes: int
    put_gb_per_sec: float | None  # None: the store keeps nothing (blackhole)
    get_gb_per_sec: float | None


def check_disk(config: KVCacheConfig) -> DiskReport | None:
    """The local disk folder exists (or can be made) and takes a file; None when there is none."""
    path = config.local_disk_path
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".vllm-kvcache-check-"):
            pass
        free = shutil.disk_usage(path).free
    except OSError as exc:
        raise CheckFailed(f"local_disk {path!r} (from {config.source('local_disk')}): not writable "
                          f"({exc.strerror or exc}); point local_disk at a folder this user may write") from None
    return DiskReport(os.path.abspath(path), free, config.max_local_disk_bytes)


def check_remote(config: KVCacheConfig) -> RemoteReport | None:
    """Connect to the remote as start-up does (within ``blocking_timeout_secs``), time a round trip,
    and put / get / delete a few MB of throwaway keys; None when no remote is configured."""
    if not config.remote_url:
        return None
    return asyncio.run(_check_remote(connectors.create_connector(config.remote_url, config), config))


async def _check_remote(connector: RemoteConnector, config: KVCacheConfig) -> RemoteReport:
    where = connector.url.redacted()
    timeout = config.blocking_timeout_secs
    transfer_timeout = timeout + PROBE_VALUES * PROBE_VALUE_BYTES / (config.min_load_gb_per_sec * 1e9)

    async def bounded(what: str, awaitable: Any, limit: float = timeout) -> Any:
        try:
            return await asyncio.wait_for(awaitable, limit)
        except ConnectorTimeout as exc:  # the store's own time-out: its message says which call
            raise CheckFailed(_failure(where, what, exc)) from None
        except (TimeoutError, asyncio.TimeoutError):
            raise CheckFailed(f"remote store {where}: no answer to {what} within {limit:g} s "
                              "(blocking_timeout_secs); is it frozen or overloaded?") from None
        except CheckFailed:
            raise
        except Exception as exc:
            raise CheckFailed(_failure(where, what, exc)) from None

    keys = [f"{PROBE_KEY_PREFIX}{uuid.uuid4().hex}@{i}" for i in range(PROBE_VALUES)]
    values = [os.urandom(PROBE_VALUE_BYTES) for _ in keys]
    start = time.perf_counter()
    try:
        await bounded("connect", connector.connect())
        connect_ms = (time.perf_counter() - start) * 1e3
        trips = []
        for _ in range(PINGS):
            t0 = time.perf_counter()
            await bounded("a round trip (exists)", connector.exists(keys[0]))
            trips.append((time.perf_counter() - t0) * 1e3)
        put_rate = get_rate = None
        if connector.stores_values:
            try:
                t0 = time.perf_counter()
                await bounded("put", connector.batched_put(list(zip(keys, values, strict=True))), transfer_timeout)
                put_rate = _rate(PROBE_VALUES * PROBE_VALUE_BYTES, t0)
                t0 = time.perf_counter()
                got = await bounded("get", connector.batched_get(keys), transfer_timeout)
                get_rate = _rate(PROBE_VALUES * PROBE_VALUE_BYTES, t0)
                if any(v is None or bytes(v) != expected for v, expected in zip(got, values, strict=True)):
                    raise CheckFailed(f"remote store {where}: values put were not read back intact")
            finally:
                try:
                    await asyncio.wait_for(connector.batched_delete(keys), timeout)
                except Exception:  # the probe keys are throwaway; a dead store was reported above
                    pass
        return RemoteReport(where, connect_ms, statistics.median(trips), PROBE_VALUES * PROBE_VALUE_BYTES,
                            put_rate, get_rate)
    finally:
        await connector.close()


def _rate(nbytes: int, since: float) -> float:
    return nbytes / max(time.perf_counter() - since, 1e-9) / 1e9


# -- inspect and purge ------------------------------------------------------------------------
@dataclass
class Tally:
    chunks: int = 0
    bytes: int = 0

    def add(self, size: int | None) -> None:
        self.chunks += 1
        self.bytes += size or 0


@dataclass
class Inventory:
    """Chunks and bytes per (model, world size, rank); ``other`` counts keys that are not chunk keys."""

    url: str
    listing: str
    groups: dict[tuple[str, int, int], Tally] = field(default_factory=dict)
    other: Tally = field(default_factory=Tally)
    sizes_known: bool = True

    @property
    def keys(self) -> int:
        return sum(t.chunks for t in self.groups.values()) + self.other.chunks

    @property
    def models(self) -> list[str]:
        return sorted({model for model, _, _ in self.groups})

    def count(self, page: KeyPage, sizes: list[int | None]) -> None:
        for key, size in zip(page.keys, sizes, strict=True):
            try:
                chunk = ChunkKey.from_string(key)
            except ValueError:
                self.other.add(size)
                continue
            self.groups.setdefault((chunk.model, chunk.world_size, chunk.rank), Tally()).add(size)


@dataclass
class PurgeReport:
    deleted: Inventory  # what was deleted (or, with dry_run, would be)
    dry_run: bool
    remaining: int  # chunk keys of the purged models still listed after the last pass


Progress = Callable[[int], None]  # called with the keys seen so far, after each page


def inspect_store(config: KVCacheConfig, url: str, model: str | None = None,
                  page_size: int = DEFAULT_PAGE_SIZE, progress: Progress | None = None) -> Inventory:
    """Count what ``url`` holds, per model and rank, and the keys that are not chunk keys (only
    ``model``'s chunks when given)."""
    prefix = model_prefix(model) if model is not None else ""
    return asyncio.run(_with_connector(config, url, lambda c: _inspect(c, prefix, page_size, progress)))


def purge_store(config: KVCacheConfig, url: str, model: str | None, dry_run: bool = False,
                page_size: int = DEFAULT_PAGE_SIZE, progress: Progress | None = None) -> PurgeReport:
    """Delete ``model``'s chunks from ``url`` (every model's when None); keys that are not chunk keys
    stay. Lists again after deleting, so keys a paged listing skipped while it deleted go too."""
    prefix = model_prefix(model)

    async def run(connector: RemoteConnector) -> PurgeReport:
        deleted = _new_inventory(connector)
        if dry_run:
            return PurgeReport(await _inspect(connector, prefix, page_size, progress), True, 0)
        remaining = 0
        for _ in range(PURGE_PASSES):
            async for page, sizes in _pages(connector, prefix, page_size, progress, deleted):
                flags = await _bounded(connector, "delete", connector.batched_delete(page.keys))
                done = [(key, size) for key, size, ok in zip(page.keys, sizes, flags, strict=True) if ok]
                deleted.count(KeyPage(tuple(key for key, _ in done)), [size for _, size in done])
            remaining = (await _inspect(connector, prefix, page_size, None)).keys
            if remaining == 0:
                break
        return PurgeReport(deleted, False, remaining)

    return asyncio.run(_with_connector(config, url, run))


def _new_inventory(connector: RemoteConnector) -> Inventory:
    if connector.listing == "none":
        raise CheckFailed(f"{connector.url.redacted()} keeps no values: there is nothing to list")
    return Inventory(connector.url.redacted(), connector.listing)


async def _inspect(connector: RemoteConnector, prefix: str, page_size: int, progress: Progress | None) -> Inventory:
    inventory = _new_inventory(connector)
    async for page, sizes in _pages(connector, prefix, page_size, progress, inventory):
        inventory.count(page, sizes)
    return inventory


async def _pages(connector: RemoteConnector, prefix: str, page_size: int, progress: Progress | None,
                 inventory: Inventory) -> AsyncIterator[tuple[KeyPage, list[int | None]]]:
    """The listing's pages with each key's size (asked for when the listing gave none)."""
    seen = 0
    pages = connector.scan(prefix, page_size)
    while True:
        page = await _bounded(connector, "list", anext(pages, None))
        if page is None:
            return
        if page.sizes is not None:
            sizes: list[int | None] = list(page.sizes)
        else:
            sizes = await _bounded(connector, "size", connector.batched_size(page.keys))
            inventory.sizes_known = inventory.sizes_known and all(s is not None for s in sizes)
        seen += len(page.keys)
        if progress is not None:
            progress(seen)
        yield page, sizes


async def _bounded(connector: RemoteConnector, what: str, awaitable: Any) -> Any:
    """One page's worth of work may take the configured time-out, plus a page of values at the
    slowest rate a load is given (a listing is no hurry, but a frozen store must not hang the command)."""
    limit = connector.config.blocking_timeout_secs * 5 + 10.0
    try:
        return await asyncio.wait_for(awaitable, limit)
    except ConnectorTimeout as exc:
        raise CheckFailed(_failure(connector.url.redacted(), what, exc)) from None
    except (TimeoutError, asyncio.TimeoutError):
        raise CheckFailed(f"{connector.url.redacted()}: no answer to {what} within {limit:g} s") from None
    except CheckFailed:
        raise
    except (KVCacheError, OSError) as exc:
        raise CheckFailed(_failure(connector.url.redacted(), what, exc)) from None


def _failure(where: str, what: str, exc: BaseException) -> str:
    """One line; the store is named once (connector errors already name it)."""
    reason = str(exc) or type(exc).__name__
    return f"remote store: {reason}" if "://" in reason else f"remote store {where}: {what} failed: {reason}"


async def _with_connector(config: KVCacheConfig, url: str, work: Callable[[RemoteConnector], Any]) -> Any:
    connector = connectors.create_connector(url, config)
    try:
        await _bounded(connector, "connect", connector.connect())
        return await work(connector)
    finally:
        await connector.close()
