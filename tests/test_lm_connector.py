"""LMConnector against the real lm server process (tests/fixtures/lm_server.py)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import threading
import time

import numpy as np
import pytest

from testbed.processes import LOOPBACK, free_port
from vllm_kvcache_plugin.config import KVCacheConfig
from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.connectors.lm import LMConnector
from vllm_kvcache_plugin.errors import ConnectorError, URLError
from vllm_kvcache_plugin.lm_protocol import LMServerError, Status

CHUNK_BYTES = 5_898_240  # one 256-token SmolLM2-135M chunk in bf16
# A time-out long enough that "did not wait for it" holds on a loaded machine (no sub-second bars).
LONG_TIMEOUT = 30.0


def run(coro):
    return asyncio.run(coro)


def make(url: str, **config) -> LMConnector:
    connector = create_connector(url, KVCacheConfig(**config) if config else None)
    assert isinstance(connector, LMConnector)
    return connector


def test_round_trips(lm_url: str) -> None:
    rng = random.Random(1)
    values = {f"rt/{n}": rng.randbytes(n) for n in (1, 7, 4096, 65_535, 65_536, 300_001)}
    values["rt/empty"] = b""
    values["rt/chunk"] = os.urandom(CHUNK_BYTES)

    async def body() -> None:
        c = make(lm_url)
        for key, value in values.items():
            await c.put(key, value)
        for key, value in values.items():
            got = await c.get(key)
            assert got is not None and bytes(got) == value, key
        assert await c.get("rt/absent") is None
        assert await c.exists("rt/chunk") and not await c.exists("rt/absent")
        await c.close()

    run(body())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_pipelined_big_values_on_each_server_loop(lm_server_factory, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is optional; the server falls back to asyncio")
    server = lm_server_factory("--max-size-gb", "0.2", "--loop", loop)
    values = {f"big/{i}": os.urandom(CHUNK_BYTES // (1 + i % 3)) for i in range(12)}

    async def body() -> None:
        c = make(server.url)
        await asyncio.gather(*(c.put(k, v) for k, v in values.items()))
        got = await asyncio.gather(*(c.get(k) for k in values), c.batched_get(list(values)))
        for value, expected in zip(got[:-1], values.values(), strict=True):
            assert bytes(value) == expected
        assert [bytes(v) for v in got[-1]] == list(values.values())
        await c.close()

    run(body())


def test_buffer_inputs_and_overwrite(lm_url: str) -> None:
    array = np.arange(50_000, dtype=np.float32).reshape(100, 500)

    async def body() -> None:
        c = make(lm_url)
        await c.put("buf/np", array)
        await c.put("buf/view", memoryview(b"abcdef")[2:])
        got = await c.get("buf/np")
        assert np.array_equal(np.frombuffer(got, dtype=np.float32).reshape(100, 500), array)
        assert bytes(await c.get("buf/view")) == b"cdef"
        await c.put("buf/view", b"replaced")
        assert bytes(await c.get("buf/view")) == b"replaced"
        with pytest.raises(TypeError, match="bytes-like"):
            await c.put("buf/bad", 12345)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="str"):
            await c.get(b"bytes-key")  # type: ignore[arg-type]
        await c.close()

    run(body())


def test_pipelined_concurrent_requests_share_one_connection(lm_url: str) -> None:
    rng = random.Random(2)
    values = {f"pipe/{i}": rng.randbytes(rng.choice([0, 10, 5000, 200_000, 1_000_000])) for i in range(120)}

    async def body() -> None:
        c = make(lm_url)
        before = (await c.stats())["connections_total"]
        await asyncio.gather(*(c.put(k, v) for k, v in values.items()))
        keys = list(values)
        rng.shuffle(keys)
        got = await asyncio.gather(*(c.get(k) for k in keys), *(c.exists(k) for k in keys))
        for key, value in zip(keys, got[: len(keys)], strict=True):
            assert bytes(value) == values[key]
        assert all(got[len(keys) :])
        assert (await c.stats())["connections_total"] == before  # no new connection was needed
        await c.close()

    run(body())


def test_batched_exists_and_get_are_one_request_each(lm_url: str) -> None:
    present = {f"batch/{i}": os.urandom(i * 1000) for i in range(0, 40, 3)}
    keys = [f"batch/{i}" for i in range(40)]

    async def body() -> None:
        c = make(lm_url)
        await c.batched_put(list(present.items()))
        before = (await c.stats())["requests"]
        flags = await c.batched_exists(keys)
        values = await c.batched_get(keys)
        after = (await c.stats())["requests"]
        assert flags == [k in present for k in keys]
        for key, value in zip(keys, values, strict=True):
            if key in present:
                assert value is not None and bytes(value) == present[key], key
            else:
                assert value is None
        assert after.get("BATCH_EXISTS", 0) - before.get("BATCH_EXISTS", 0) == 1
        assert after.get("BATCH_GET", 0) - before.get("BATCH_GET", 0) == 1
        assert after.get("EXISTS", 0) == before.get("EXISTS", 0)
        assert after.get("GET", 0) == before.get("GET", 0)
        assert await c.batched_exists([]) == [] and await c.batched_get([]) == []
        await c.close()

    run(body())


def test_batch_larger_than_server_limit_is_split(lm_url: str) -> None:
    async def body() -> None:
        c = make(lm_url)
        await c.connect()
        n = c.limits.max_batch + 5
        keys = [f"many/{i}" for i in range(n)]
        await c.batched_put([(k, b"x") for k in keys[::2]])
        flags = await c.batched_exists(keys)
        assert flags == [i % 2 == 0 for i in range(n)]
        await c.close()

    run(body())


def test_get_into_caller_buffers(lm_url: str) -> None:
    a, b = os.urandom(100_000), os.urandom(CHUNK_BYTES)

    async def body() -> None:
        c = make(lm_url)
        await c.batched_put([("into/a", a), ("into/b", b)])
        out = bytearray(CHUNK_BYTES)
        assert await c.get_into("into/a", out) == len(a) and out[: len(a)] == a
        assert await c.get_into("into/missing", out) is None
        outs = [np.zeros(CHUNK_BYTES, np.uint8) for _ in range(3)]
        assert await c.batched_get_into(["into/b", "into/missing", "into/a"], outs) == [len(b), None, len(a)]
        assert outs[0].tobytes() == b and outs[2][: len(a)].tobytes() == a
        small = bytearray(10)
        assert await c.get_into("into/b", small) == len(b) and small == bytearray(10)  # did not fit: dropped
        outs = [np.zeros(10, np.uint8), np.zeros(len(a), np.uint8)]
        assert await c.batched_get_into(["into/b", "into/a"], outs) == [len(b), len(a)]
        assert outs[1].tobytes() == a  # the value after the dropped one still arrived
        assert bytes(await c.get("into/a")) == a  # and the connection is fine
        await c.close()

    run(body())


def test_delete_and_list_by_prefix(lm_url: str) -> None:
    async def body() -> None:
        c = make(lm_url)
        await c.batched_put([("vllm@m@1@0@aa", b"1"), ("vllm@m@1@0@bb", b"2"), ("other/ü", b"3")])
        assert sorted(await c.list("vllm@m@")) == ["vllm@m@1@0@aa", "vllm@m@1@0@bb"]
        assert sorted(await c.list()) == ["other/ü", "vllm@m@1@0@aa", "vllm@m@1@0@bb"]
        assert await c.delete("vllm@m@1@0@aa") is True
        assert await c.delete("vllm@m@1@0@aa") is False
        assert await c.get("vllm@m@1@0@aa") is None
        assert await c.batched_delete(["other/ü", "nope"]) == [True, False]
        assert await c.list() == ["vllm@m@1@0@bb"]
        await c.close()

    run(body())


def test_key_limits_and_url_errors(lm_url: str) -> None:
    async def body() -> None:
        c = make(lm_url)
        with pytest.raises(LMServerError) as info:
            await c.put("k" * (c.limits.max_key_len + 1), b"v")
        assert info.value.status == Status.KEY_TOO_LONG
        with pytest.raises(LMServerError, match="empty key"):
            await c.get("")
        assert await c.ping()
        await c.close()

    run(body())
    with pytest.raises(URLError, match="host:port") as info:
        create_connector("lm://127.0.0.1?token=hunter2")
    assert "hunter2" not in str(info.value)
    with pytest.raises(URLError, match="unknown option"):
        create_connector("lm://127.0.0.1:1?tokn=x")
    with pytest.raises(URLError, match="request_timeout_secs"):
        make("lm://127.0.0.1:1", remote_options={"request_timeout_secs": "soon"})
    secret = create_connector("lm://127.0.0.1:1?token=hunter2")
    assert "hunter2" not in repr(secret)


def test_token(lm_server_factory) -> None:
    server = lm_server_factory("--token", "s3cret", "--max-size-gb", "0.01")

    async def body() -> None:
        for url in (server.url, server.url + "?token=wrong"):
            c = make(url)
            with pytest.raises(LMServerError) as info:
                await c.put("k", b"v")
            assert info.value.status == Status.UNAUTHORIZED
            assert "s3cret" not in str(info.value) and "wrong" not in str(info.value)
            await c.close()
        good = make(server.url + "?token=s3cret")
        await good.put("k", b"v")
        assert bytes(await good.get("k")) == b"v"
        await good.close()

    run(body())


def test_unreachable_server_is_a_connector_error_quickly() -> None:
    async def body() -> None:
        # A refused connection fails at once, without waiting out the (long) connect time-out.
        c = make(f"lm://{LOOPBACK}:{free_port()}", blocking_timeout_secs=LONG_TIMEOUT)
        start = time.monotonic()
        with pytest.raises(ConnectorError, match="cannot connect"):
            await c.exists("k")
        assert time.monotonic() - start < LONG_TIMEOUT / 3
        assert await c.ping() is False

    run(body())


def test_silent_peer_times_out_at_connect() -> None:
    """A peer that accepts but never answers HELLO: ConnectorError within blocking_timeout_secs, and
    callers queued behind one connection attempt share its failure instead of each making its own."""
    accepted: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(32)
        port = listener.getsockname()[1]

        def accept_silently() -> None:
            while True:
                try:
                    accepted.append(listener.accept()[0])
                except OSError:
                    return

        threading.Thread(target=accept_silently, daemon=True).start()

        async def body() -> None:
            c = make(f"lm://{LOOPBACK}:{port}", blocking_timeout_secs=0.5)
            with pytest.raises(ConnectorError, match="no HELLO reply"):
                await c.get("k")
            assert len(accepted) == 1
            results = await asyncio.gather(*(c.exists(f"k{i}") for i in range(10)), return_exceptions=True)
            assert all(isinstance(r, ConnectorError) for r in results)
            assert len(accepted) == 2, "ten queued callers must share one connection attempt"

        try:
            run(body())
        finally:
            for sock in accepted:
                sock.close()
            listener.shutdown(socket.SHUT_RDWR)


def test_killed_server_then_restart(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.05")

    async def body() -> None:
        c = make(server.url, blocking_timeout_secs=LONG_TIMEOUT)
        await c.put("k", b"before")
        server.kill()
        start = time.monotonic()
        with pytest.raises(ConnectorError):
            await c.get("k")
        with pytest.raises(ConnectorError):
            await c.get("k")  # the next call tries again and fails fast too (refused, no time-out)
        assert time.monotonic() - start < LONG_TIMEOUT / 3
        await asyncio.to_thread(server.start)
        assert await c.get("k") is None  # a fresh server: reconnected, empty store
        await c.put("k", b"after")
        assert bytes(await c.get("k")) == b"after"
        await c.close()

    run(body())


def test_stopped_server_hits_request_timeout_not_a_hang(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.05")

    async def body() -> None:
        c = make(server.url, remote_options={"request_timeout_secs": 0.5})
        await c.put("k", b"v")
        os.kill(server.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(ConnectorError, match="no reply"):
                await c.get("k")
            assert time.monotonic() - start < 10.0, "the request time-out (0.5 s) bounds a stopped server"
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert bytes(await c.get("k")) == b"v"  # reconnected once the server runs again
        await c.close()

    run(body())


def test_cancelled_request_leaves_connection_usable(lm_url: str) -> None:
    big = os.urandom(CHUNK_BYTES)

    async def body() -> None:
        c = make(lm_url)
        await c.put("cancel/big", big)
        tasks = [asyncio.ensure_future(c.get("cancel/big")) for _ in range(4)]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await c.put("cancel/small", b"ok")
        assert bytes(await c.get("cancel/small")) == b"ok"
        assert bytes(await c.get("cancel/big")) == big
        await c.close()

    run(body())


def test_one_event_loop_per_connector(lm_url: str) -> None:
    c = make(lm_url)
    run(c.put("loop/k", b"v"))
    assert bytes(run(c.get("loop/k"))) == b"v"  # a new loop after the first one closed is fine

    errors: list[BaseException] = []
    ready, release = threading.Event(), threading.Event()

    async def hold_loop_open() -> None:
        await c.get("loop/k")
        ready.set()
        await asyncio.to_thread(release.wait, 10)

    thread = threading.Thread(target=lambda: run(hold_loop_open()))
    thread.start()
    try:
        assert ready.wait(10)
        try:
            run(c.get("loop/k"))
        except ConnectorError as exc:
            errors.append(exc)
    finally:
        release.set()
        thread.join(10)
    assert errors and "second event loop" in str(errors[0])
