"""Paged listing (LIST_PAGE) and batched delete: the key index on its own and inside the store,
then the real server process through the connector and raw sockets, and an old server without
LIST_PAGE (a real process whose dispatch table lacks it)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from testbed.processes import LOOPBACK, ManagedProcess, free_port, port_open
from tests.test_lm_server import raw_client, read_reply
from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.connectors.base import KeyPage
from vllm_kvcache_plugin.lm_protocol import (
    LMServerError,
    Op,
    Status,
    decode_key_page,
    encode_page_request,
    pack_header,
)
from vllm_kvcache_plugin.server.arena import Arena
from vllm_kvcache_plugin.server.disk import DiskSpill
from vllm_kvcache_plugin.server.key_index import EXAMINE_FACTOR, NBUCKETS, KeyIndex
from vllm_kvcache_plugin.server.store import MemoryStore

MB = 10**6


def run(coro):
    return asyncio.run(coro)


def walk(index: KeyIndex, prefix: bytes, page_size: int) -> list[list[tuple[bytes, int]]]:
    pages, cursor = [], 0
    while True:
        items, cursor = index.page(prefix, cursor, page_size)
        pages.append(items)
        if cursor == 0:
            return pages


async def scan_all(connector, prefix: str = "", page_size: int = 100) -> list[KeyPage]:
    return [page async for page in connector.scan(prefix, page_size)]


def listed(pages: list[KeyPage]) -> dict[str, int | None]:
    """key -> size over all pages, checking that no key came twice."""
    keys = [k for page in pages for k in page.keys]
    twice = [k for k, n in Counter(keys).items() if n > 1]
    assert not twice, f"listed more than once: {twice[:5]}"
    return {k: None if page.sizes is None else page.sizes[i] for page in pages for i, k in enumerate(page.keys)}


# -- the key index ---------------------------------------------------------------------------
def test_key_index_pages_whole_buckets_in_order() -> None:
    index = KeyIndex(nbuckets=8)
    assert index.page(b"", 0, 10) == ([], 0)
    keys = {f"k/{i}".encode(): i for i in range(200)}
    for key, size in keys.items():
        index.add(key, size)
    index.add(b"k/0", 7)  # a new size, not a second key
    keys[b"k/0"] = 7
    assert len(index) == 200 and set(index) == set(keys)

    for page_size in (1, 10, 25, 200, 1000):
        pages = walk(index, b"", page_size)
        got = [item for page in pages for item in page]
        assert sorted(got) == sorted(keys.items())  # each key once, with its size
        for page in pages:  # whole buckets, each sorted, buckets in index order
            buckets = [index.bucket_of(k) for k, _ in page]
            assert buckets == sorted(buckets)
            for b in set(buckets):
                in_page = [k for k, _ in page if index.bucket_of(k) == b]
                assert in_page == sorted(k for k in keys if index.bucket_of(k) == b)
    assert len(walk(index, b"", 1)) == 8  # one bucket a page
    assert len(walk(index, b"", 1000)) == 1

    cursor = index.page(b"", 0, 1)[1]
    assert cursor == index.bucket_of(walk(index, b"", 1)[1][0][0])  # the next bucket with keys
    assert index.page(b"", index.nbuckets - 1, 1)[1] == 0  # nothing after the last bucket

    subset = [item for page in walk(index, b"k/1", 5) for item in page]
    assert sorted(subset) == sorted((k, s) for k, s in keys.items() if k.startswith(b"k/1"))

    for key in keys:
        index.discard(key)
    index.discard(b"never added")
    assert len(index) == 0 and index.page(b"", 0, 10) == ([], 0) and not index._buckets


def test_key_index_page_work_is_bounded() -> None:
    """A rare prefix: each page stops after examining 8 x page_size keys (plus the rest of the
    bucket it is in), so the listing takes many, mostly empty, pages."""
    index = KeyIndex()
    keys = [f"miss/{i}".encode() for i in range(20_000)] + [b"hit"]
    for key in keys:
        index.add(key, 1)
    per_bucket = Counter(map(index.bucket_of, keys))
    start, found, pages = 0, [], 0
    while True:
        items, cursor = index.page(b"hit", start, 10)
        examined = sum(n for b, n in per_bucket.items() if start <= b < (cursor or NBUCKETS))
        assert examined < EXAMINE_FACTOR * 10 + max(per_bucket.values())
        found += items
        pages += 1
        if cursor == 0:
            break
        start = cursor
    assert found == [(b"hit", 1)] and pages >= len(keys) // (EXAMINE_FACTOR * 10 + max(per_bucket.values()))


@pytest.mark.parametrize("disk", [True, False], ids=["disk", "memory-only"])
@pytest.mark.parametrize("arena", [False, True], ids=["heap", "arena"])
def test_store_index_follows_memory_and_disk(tmp_path: Path, arena: bool, disk: bool) -> None:
    """Random puts, replacements, deletes and reads on a small store (with a disk, evictions spill
    and a few values are promoted, evicted from disk or found unreadable); the index always equals
    memory plus disk, with each value's size, and a restart indexes what the disk kept."""
    budget = 64 * 1024 * 12
    spill = DiskSpill(tmp_path, budget * 2) if disk else None
    store = MemoryStore(budget, spill, Arena(budget, 10.0) if arena else None)
    rng = random.Random(3)

    def truth() -> dict[bytes, int]:
        found = dict(spill.value_sizes()) if spill else {}
        found.update((k, len(v)) for k, (v, _) in store._entries._entries.items())
        return found

    for step in range(3000):
        key = f"k/{rng.randrange(80)}".encode()
        action = rng.random()
        if action < 0.5:
            buffer = store.allocate(len(key), rng.choice([100, 70_000, 140_000]))
            store.commit(key, buffer)
        elif action < 0.65:
            store.delete(key)
        elif action < 0.99:
            store.get(key)
        elif spill and key in spill:  # damage its file: the next read drops it
            spill._path(key).write_bytes(b"junk")
        assert {k: s for p in walk(store.index, b"", 50) for k, s in p} == truth(), step
        assert len(store.index) == store.key_count() == len(truth())
    assert store.counters.evictions and (not disk or (store.counters.spills and store.counters.disk_hits))
    if not disk:
        return

    on_disk = dict(spill.value_sizes())
    restarted = MemoryStore(budget, DiskSpill(tmp_path, budget * 2))
    reloaded = dict(restarted.disk.value_sizes())  # less the damaged files
    assert reloaded and reloaded.items() <= on_disk.items()
    assert {k: s for p in walk(restarted.index, b"", 50) for k, s in p} == reloaded


# -- the server ------------------------------------------------------------------------------
def test_paged_listing_of_more_keys_than_a_page(lm_url: str) -> None:
    rng = random.Random(5)
    values = {f"a/{i}": rng.randbytes(rng.randrange(0, 300)) for i in range(2500)}
    values |= {f"b/{i}": rng.randbytes(3) for i in range(400)}

    async def body() -> None:
        c = create_connector(lm_url)
        try:
            await c.batched_put(list(values.items()))
            for prefix in ("a/", "b/", ""):
                pages = await scan_all(c, prefix, page_size=100)
                assert len(pages) > 1 and all(page.keys for page in pages)
                assert listed(pages) == {k: len(v) for k, v in values.items() if k.startswith(prefix)}
            assert await c.list() == sorted(values)  # LIST (6) is unchanged
            assert await scan_all(c, "c/") == []
        finally:
            await c.close()

    run(body())


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "no-shm"])
def test_spilled_keys_are_listed_with_their_sizes(lm_server_factory, tmp_path: Path, shm: bool) -> None:
    server = lm_server_factory("--max-size-gb", "0.01", "--disk", str(tmp_path), "--max-disk-gb", "0.1",
                               *(() if shm else ("--no-shm",)))
    values = {f"spill/{i}": os.urandom(MB + i) for i in range(30)}
    deleted = [f"spill/{i}" for i in (0, 1, 2, 28, 29)]  # on disk, and still in memory

    async def check(expected: dict[str, bytes]) -> dict:
        c = create_connector(server.url)
        try:
            assert listed(await scan_all(c, "spill/", page_size=7)) == {k: len(v) for k, v in expected.items()}
            return await c.stats()
        finally:
            await c.close()

    async def fill() -> None:
        c = create_connector(server.url)
        try:
            for key, value in values.items():
                await c.put(key, value)
            assert await c.batched_delete(deleted) == [True] * len(deleted)
        finally:
            await c.close()

    run(fill())
    kept = {k: v for k, v in values.items() if k not in deleted}
    s = run(check(kept))
    assert s["spills"] >= 15 and s["disk"]["keys"] >= 15
    server.restart()  # memory is gone; the disk is indexed again
    on_disk = {k: v for k, v in kept.items() if int(k.split("/")[1]) < 20}  # the oldest were spilled
    c = create_connector(server.url)
    try:
        survivors = run(c.list("spill/"))
    finally:
        run(c.close())
    assert set(on_disk) <= set(survivors)
    run(check({k: kept[k] for k in survivors}))


def test_keys_added_and_deleted_during_a_listing(lm_url: str) -> None:
    async def body() -> None:
        c = create_connector(lm_url)
        try:
            await c.batched_put([(f"stay/{i}", b"s") for i in range(1500)] + [(f"go/{i}", b"g") for i in range(600)])
            seen: Counter[str] = Counter()
            added = 0
            async for page in c.scan("", page_size=50):
                seen.update(page.keys)
                await c.batched_delete([f"go/{added + i}" for i in range(10)])
                await c.batched_put([(f"new/{added + i}", b"n") for i in range(10)])
                added += 10
            assert 200 < added < 600  # many pages, each followed by changes
            assert all(seen[f"stay/{i}"] == 1 for i in range(1500))
            assert max(seen.values()) == 1
            assert {k for k in seen if k.startswith("go/")} >= {f"go/{i}" for i in range(added, 600)}
        finally:
            await c.close()

    run(body())


def test_bad_list_page_requests_keep_the_connection(lm_server, lm_url: str) -> None:
    sock = raw_client(lm_server.port)
    try:
        bad = [
            (encode_page_request(0, 0, b""), Status.BAD_REQUEST),
            (encode_page_request(4097, 0, b""), Status.BAD_REQUEST),
            (encode_page_request(10, NBUCKETS, b""), Status.BAD_REQUEST),
            (encode_page_request(10, 0, b"p" * 4097), Status.KEY_TOO_LONG),
            (struct.pack("<I", 10), Status.BAD_REQUEST),  # no cursor
        ]
        for request_id, (meta, status) in enumerate(bad, start=2):
            sock.sendall(pack_header(Op.LIST_PAGE, request_id, len(meta)) + meta)
            assert read_reply(sock)[:2] == (status, request_id)
        meta = encode_page_request(4096, 0, b"")
        sock.sendall(pack_header(Op.LIST_PAGE, 99, len(meta)) + meta)
        code, request_id, reply_meta, reply_body = read_reply(sock)
        assert (code, request_id) == (Status.OK, 99)
        assert decode_key_page(reply_meta, reply_body, 4096) == (0, [], [])  # an empty store
    finally:
        sock.close()

    async def body() -> None:
        c = create_connector(lm_url)
        try:
            with pytest.raises(ValueError):
                await scan_all(c, page_size=0)
            with pytest.raises(LMServerError) as info:
                await scan_all(c, "p" * 5000)
            assert info.value.status == Status.KEY_TOO_LONG
            await c.put("after/1", b"x")
            assert listed(await scan_all(c, "after/", page_size=10**6)) == {"after/1": 1}  # capped at max_batch
            await c.delete("after/1")
        finally:
            await c.close()

    run(body())


OLD_SERVER = """
import sys
from vllm_kvcache_plugin.lm_protocol import Op
from vllm_kvcache_plugin.server.__main__ import main
from vllm_kvcache_plugin.server.commands import Commands
del Commands._HANDLERS[Op.LIST_PAGE]
sys.exit(main(sys.argv[1:]))
"""


def test_old_server_without_list_page_lists_in_one_reply(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    process = ManagedProcess(f"lm-old-server-{port}", [sys.executable, "-c", OLD_SERVER, "--host", LOOPBACK,
                                                       "--port", str(port), "--max-size-gb", "0.05"]).start()
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert process.alive() and time.monotonic() < deadline, process.log_tail()
            time.sleep(0.05)
        keys = [f"old/{i}" for i in range(300)]

        async def body() -> list[list[KeyPage]]:
            c = create_connector(f"lm://{LOOPBACK}:{port}")
            try:
                await c.batched_put([(k, b"v") for k in keys])
                return [await scan_all(c, "old/", page_size=10) for _ in range(2)]
            finally:
                await c.close()

        with caplog.at_level(logging.INFO, logger="vllm_kvcache_plugin.connectors.lm"):
            scans = run(body())
    finally:
        process.stop()
    for pages in scans:
        assert len(pages) == 1 and pages[0].sizes is None and sorted(pages[0].keys) == sorted(keys)
    assert sum("no LIST_PAGE" in r.getMessage() for r in caplog.records) == 1


def test_batched_delete_flags_and_split(lm_url: str) -> None:
    keys = [f"del/{i}" for i in range(5000)]  # more than one max_batch frame

    async def body() -> None:
        c = create_connector(lm_url)
        try:
            await c.batched_put([(k, b"x") for k in keys[::2]])
            flags = await c.batched_delete(keys)
            assert flags == [i % 2 == 0 for i in range(len(keys))]
            assert await c.list("del/") == [] and await c.batched_delete(keys[:3]) == [False] * 3
            assert await c.batched_delete([]) == []
        finally:
            await c.close()

    run(body())
