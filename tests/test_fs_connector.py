"""``fs://`` connector: round trips, key <-> file name mapping, list by prefix, atomic writes
(a writer SIGKILLed mid-write leaves nothing readable) and its errors."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from testbed.processes import wait_for
from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.connectors.fs import (
    LOCAL_FS_TYPES,
    FSConnector,
    escape_key,
    filesystem_type,
    key_to_relpath,
    relpath_to_key,
)
from vllm_kvcache_plugin.errors import ConnectorError, URLError

CHUNK_256 = 2 * 30 * 256 * 3 * 64 * 2
CHUNK_16 = 2 * 30 * 16 * 3 * 64 * 2
REPO = Path(__file__).resolve().parents[1]


def run(coro):
    return asyncio.run(coro)


def key(i: int, model: str = "/models/SmolLM2-135M/") -> str:
    return f"vllm@{model}@1@0@{i:064x}"


@pytest.fixture()
def store(tmp_path: Path) -> FSConnector:
    conn = create_connector(f"fs://{tmp_path}/store")
    assert isinstance(conn, FSConnector)
    run(conn.connect())
    yield conn
    run(conn.close())


@pytest.mark.parametrize("size", [1, CHUNK_16, CHUNK_256])
def test_round_trip(store: FSConnector, size: int) -> None:
    value = os.urandom(size)

    async def body():
        assert await store.get(key(1)) is None and await store.exists(key(1)) is False
        await store.put(key(1), value)
        assert bytes(await store.get(key(1))) == value and await store.exists(key(1)) is True
        await store.put(key(1), value[::-1])  # overwrite
        assert bytes(await store.get(key(1))) == value[::-1]
        assert await store.delete(key(1)) is True
        assert await store.delete(key(1)) is False
        assert await store.get(key(1)) is None

    run(body())


def test_batched_operations_and_buffer_kinds(store: FSConnector) -> None:
    keys = [key(i) for i in range(32)]
    base = os.urandom(4096)
    values = [base, bytearray(base), memoryview(base), np.frombuffer(base, dtype=np.uint16)] * 8

    async def body():
        await store.batched_put([(k, v) for i, (k, v) in enumerate(zip(keys, values, strict=True)) if i % 2 == 0])
        assert await store.batched_exists(keys) == [i % 2 == 0 for i in range(32)]
        got = await store.batched_get(keys)
        assert [None if g is None else bytes(g) for g in got] == [base if i % 2 == 0 else None for i in range(32)]
        assert await store.batched_get([]) == [] and await store.batched_exists([]) == []
        with pytest.raises(TypeError, match="bytes-like"):
            await store.put(key(99), 42)

    run(body())


KEYS_HARD = [
    key(1),
    key(2, model="/models/with@at/"),
    ".starts-with-dot",
    "unicode-é-ключ",
    "tilde~and%percent and space",
    "x" * 450 + "/long/" + "y" * 90,  # escaped name > 200 chars: nested folders
    "x" * 450,  # its prefix: must not collide with the one above
]


def test_key_names_are_safe_and_reversible() -> None:
    for k in KEYS_HARD:
        rel = key_to_relpath(k)
        assert relpath_to_key(rel) == k
        parts = rel.split(os.sep)
        assert all(0 < len(p) <= 201 for p in parts), "every path component must stay under NAME_MAX"
        assert not parts[-1].startswith(".") and not parts[-1].endswith("~")
        assert "/" not in escape_key(k)


def test_list_by_prefix_returns_original_keys(store: FSConnector) -> None:
    async def body():
        await store.batched_put([(k, k.encode()) for k in KEYS_HARD])
        assert sorted(await store.list()) == sorted(KEYS_HARD)
        assert sorted(await store.list("vllm@/models/")) == sorted(KEYS_HARD[:2])
        assert await store.list("vllm@/models/with@") == [KEYS_HARD[1]]
        assert sorted(await store.list("x" * 300)) == sorted(KEYS_HARD[-2:])
        assert await store.list("x" * 450 + "/") == [KEYS_HARD[-2]]
        assert await store.list(".st") == [".starts-with-dot"]
        assert await store.list("nope") == []
        for k in KEYS_HARD:
            assert bytes(await store.get(k)) == k.encode()

    run(body())


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from vllm_kvcache_plugin.connectors import create_connector

    async def main():
        conn = create_connector(sys.argv[1])
        await conn.connect()
        value = b"N" * int(sys.argv[2])
        print("writing", flush=True)
        for _ in range(1000):  # bounded; the test kills us long before
            await conn.put("the-key", value)

    asyncio.run(main())
    """
)


@pytest.mark.timeout(120)
def test_writer_killed_mid_write_leaves_no_half_value(tmp_path: Path) -> None:
    url = f"fs://{tmp_path}/store"
    store = create_connector(url)
    old = b"O" * 1000
    run(store.connect())
    run(store.put("the-key", old))
    size = 64 * 1024 * 1024  # big enough that most of the writer's time is spent inside a write
    killed_mid_write = False
    for attempt in range(5):  # bounded; a kill between two writes proves nothing, so retry
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, url, str(size)], cwd=REPO, stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        try:
            assert writer.stdout.readline().strip() == "writing"
            wait_for(lambda: any(p.name.startswith(".tmp-") for p in (tmp_path / "store").iterdir()), 20,
                     "the writer's temp file")
            time.sleep(0.02 * attempt)
            os.kill(writer.pid, signal.SIGKILL)
        finally:
            writer.kill()
            writer.wait(timeout=10)
        temp_files = [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".tmp-")]
        got = run(store.get("the-key"))
        assert got is not None
        whole = bytes(got) in (old, b"N" * size)
        assert whole, f"read {len(got)} bytes: a torn value"
        assert run(store.list()) == ["the-key"], "temp files must never show up as keys"
        if any(0 < p.stat().st_size < size for p in temp_files):
            killed_mid_write = True
            break
        for p in temp_files:
            p.unlink()
    assert killed_mid_write, "never managed to kill the writer inside a write (test proves nothing)"
    run(store.close())


def test_stale_temp_files_are_cleaned_at_connect(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    stale, fresh = folder / ".tmp-stale", folder / ".tmp-fresh"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    run(create_connector(f"fs://{folder}").connect())
    assert not stale.exists() and fresh.exists(), "only temp files older than an hour are removed"


def test_store_failures_are_connector_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    conn = create_connector(f"fs://{blocker}/store")  # the root's parent is a file
    with pytest.raises(ConnectorError) as err:
        run(conn.connect())
    assert "\n" not in str(err.value) and "connect failed" in str(err.value)
    with pytest.raises(ConnectorError, match="put failed"):
        run(conn.put("k", b"v"))
    assert run(conn.ping()) is False


@pytest.mark.parametrize("mode", ["auto", "true", "false"])
def test_exists_inline_or_on_the_pool_agree(tmp_path: Path, mode: str) -> None:
    conn = create_connector(f"fs://{tmp_path}/s?inline_exists={mode}")
    run(conn.connect())
    if mode == "auto":  # pytest's tmp_path is on a local file system here
        assert filesystem_type(str(tmp_path)) in LOCAL_FS_TYPES and conn.inline_exists is True
    else:
        assert conn.inline_exists is (mode == "true")
    run(conn.batched_put([(key(i), b"v") for i in range(0, 8, 2)]))
    assert run(conn.batched_exists([key(i) for i in range(8)])) == [i % 2 == 0 for i in range(8)]
    assert run(conn.exists(key(0))) is True and run(conn.exists(key(1))) is False


def test_fsync_option_round_trips(tmp_path: Path) -> None:
    conn = create_connector(f"fs://{tmp_path}/s?fsync=true")
    assert conn.fsync is True
    run(conn.put("k", b"durable"))
    assert run(conn.get("k")) == b"durable"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("fs://relative/path", "three slashes"),
        ("fs://", "absolute folder"),
        ("fs:///tmp/x?colour=red", "unknown option(s) colour"),
        ("fs:///tmp/x?fsync=maybe", "fsync must be"),
        ("fs:///tmp/x?threads=none", "threads 'none'"),
        ("fs:///tmp/x?inline_exists=sometimes", "inline_exists must be"),
    ],
)
def test_bad_urls_get_one_line_errors(url: str, message: str) -> None:
    with pytest.raises(URLError) as err:
        create_connector(url)
    assert message in str(err.value) and "\n" not in str(err.value)
