"""The lm server process: CLI, limits, LRU budget, disk spill, hostile clients, metrics.

Raw sockets speak the wire protocol directly where a well-behaved client cannot misbehave enough.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from testbed.processes import LOOPBACK, cpu_seconds, free_port, rss_bytes, wait_for
from vllm_kvcache_plugin.atomic_files import TEMP_PREFIX
from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.errors import ConnectorError
from vllm_kvcache_plugin.lm_protocol import (
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    LMServerError,
    Op,
    Status,
    pack_header,
    unpack_header,
)
from vllm_kvcache_plugin.server.__main__ import main as server_main

MB = 10**6


def run(coro):
    return asyncio.run(coro)


def stats(url: str) -> dict:
    async def body() -> dict:
        c = create_connector(url)
        try:
            return await c.stats()
        finally:
            await c.close()

    return run(body())


def charged(s: dict) -> int:
    return s["bytes_used"] + s["bytes_reserved"] + s["bytes_pooled"]


IDLE_GETS = 50


# -- raw protocol helpers --------------------------------------------------------------------
def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def read_reply(sock: socket.socket) -> tuple[int, int, bytes, bytes]:
    header = unpack_header(recv_exact(sock, HEADER_SIZE))
    meta = recv_exact(sock, header.meta_len)
    return header.code, header.request_id, meta, recv_exact(sock, header.body_len)


def raw_client(port: int, token: bytes = b"") -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    sock.sendall(pack_header(Op.HELLO, 1, len(token)) + token)
    status, request_id, _meta, _body = read_reply(sock)
    assert (status, request_id) == (Status.OK, 1)
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the server closes the connection (after any replies) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


# -- CLI -------------------------------------------------------------------------------------
def test_cli_help_and_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    script = Path(sys.executable).with_name("vllm-kvcache-server")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "vllm_kvcache_plugin.server"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--max-size-gb", "--disk", "--max-disk-gb", "--token", "--metrics-port",
                 "--log-level"):
        assert flag in out.stdout
    for bad, message in ((["--max-size-gb", "-1"], "must be positive"), (["--port", "70000"], "0..65535"),
                         (["--max-disk-gb", "2"], "needs --disk"), (["--log-level", "LOUD"], "invalid choice")):
        with pytest.raises(SystemExit) as info:
            server_main(bad)
        assert info.value.code != 0
        err = capsys.readouterr().err + str(info.value.code)
        assert message in err and "Traceback" not in err


def test_default_bind_is_loopback_and_start_line(lm_server_factory) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vllm_kvcache_plugin.server", "--port", str(port),
                             "--max-size-gb", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert f"listening on 127.0.0.1:{port}" in line and "memory budget 0.5 GB" in line
        listening = [row.split() for row in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        local = [r[1] for r in listening if r[3] == "0A" and int(r[1].split(":")[1], 16) == port]
        assert local == [f"0100007F:{port:04X}"]  # 127.0.0.1 only
        taken = subprocess.run([sys.executable, "-m", "vllm_kvcache_plugin.server", "--port", str(port)],
                               capture_output=True, text=True, timeout=60)
        assert taken.returncode == 1 and "address already in use" in taken.stderr
    finally:
        proc.terminate()
        proc.wait(10)


# -- memory budget ---------------------------------------------------------------------------
def test_lru_eviction_stays_within_budget(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.02", "--loop", "asyncio")  # 20 MB; the stdlib loop
    value_size = 3 * MB

    async def body() -> None:
        c = create_connector(server.url)
        for i in range(12):
            await c.put(f"lru/{i}", bytes([i]) * value_size)
            if i == 3:
                assert await c.get("lru/0") is not None  # touch: lru/0 is now more recent than 1..3
            if i == 8:
                present = await c.batched_exists([f"lru/{j}" for j in range(9)])
                assert present == [True, False, False, False, True, True, True, True, True]
            s = await c.stats()
            assert charged(s) <= s["budget"]
        present = await c.batched_exists([f"lru/{i}" for i in range(12)])
        kept = [i for i, ok in enumerate(present) if ok]
        assert kept == list(range(12 - len(kept), 12))
        assert len(kept) == 20 * MB // (value_size + 100)
        s = await c.stats()
        assert s["evictions"] == 12 - len(kept) and s["keys"] == len(kept)
        assert bytes(await c.get("lru/11")) == bytes([11]) * value_size
        await c.delete("lru/11")
        assert (await c.stats())["bytes_used"] == s["bytes_used"] - (value_size + len("lru/11") + 64)
        await c.close()

    run(body())


def test_oversize_values_rejected(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.006", "--max-value-mb", "8")

    async def body() -> None:
        c = create_connector(server.url)
        for size, why in ((7 * MB, "memory budget"), (9 * MB, "over 8000000")):  # server refuses; client refuses
            with pytest.raises(LMServerError, match=why) as info:
                await c.put("big", b"x" * size)
            assert info.value.status == Status.VALUE_TOO_LARGE
        await c.put("ok", b"y" * (3 * MB))  # the same connection still serves
        assert len(await c.get("ok")) == 3 * MB
        assert await c.get("big") is None
        s = await c.stats()
        assert s["errors"] == {"VALUE_TOO_LARGE": 1} and charged(s) <= s["budget"]
        await c.close()

    run(body())
    sock = raw_client(server.port)  # over --max-value-mb on the wire: refused, body skipped, still serving
    sock.sendall(pack_header(Op.PUT, 7, 3, 9 * MB) + b"big")
    status, request_id, _, message = read_reply(sock)
    assert (status, request_id) == (Status.VALUE_TOO_LARGE, 7) and b"limit" in message
    sock.sendall(b"\0" * (9 * MB) + pack_header(Op.EXISTS, 8, 2) + b"ok")
    assert read_reply(sock)[:2] == (Status.OK, 8)
    sock.close()


def test_half_sent_values_count_against_the_budget(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.01", "--frame-timeout", "1", "--loop", "asyncio")  # 10 MB
    stalled = []
    for i in range(2):  # 2 x 4 MB announced, 1 MB sent each
        sock = raw_client(server.port)
        sock.sendall(pack_header(Op.PUT, 2, 2, 4 * MB) + f"h{i}".encode() + b"\0" * MB)
        stalled.append(sock)
    wait_for(lambda: stats(server.url)["bytes_reserved"] >= 8 * MB, 10, "reservations")
    big_meta = raw_client(server.port)  # a large meta is a buffer too: it is charged while it arrives
    big_meta.sendall(pack_header(Op.BATCH_EXISTS, 4, 1_000_000) + b"\0" * 1000)
    wait_for(lambda: stats(server.url)["bytes_reserved"] >= 9 * MB, 10, "meta reservation")
    sock = raw_client(server.port)
    sock.sendall(pack_header(Op.PUT, 3, 2, 4 * MB) + b"h3")
    assert read_reply(sock)[:2] == (Status.NO_SPACE, 3)  # would exceed the budget
    sock.sendall(b"\0" * (4 * MB) + pack_header(Op.BATCH_EXISTS, 5, 1_000_000))  # the refused body is skipped
    assert read_reply(sock)[:2] == (Status.NO_SPACE, 5)
    s = stats(server.url)
    assert charged(s) <= s["budget"] and s["rejected_no_space"] == 2
    big_meta.close()
    stalled[0].close()  # a client gone mid-frame: its reservation is released
    wait_for(lambda: stats(server.url)["bytes_reserved"] < 8 * MB, 10, "release on close")
    assert all(closed_by_peer(s, timeout=10) for s in stalled[1:])  # the frame timeout closes the other
    wait_for(lambda: stats(server.url)["bytes_reserved"] == 0, 10, "release on frame timeout")
    assert stats(server.url)["keys"] == 0
    sock.close()


# -- hostile clients -------------------------------------------------------------------------
def test_protocol_violations_get_an_error_and_a_close(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.01")
    cases = [
        (pack_header(Op.GET, 5, 1) + b"k", Status.UNAUTHORIZED, False),  # no HELLO first
        (struct.pack("<2sBBIIQ", MAGIC, PROTOCOL_VERSION + 1, Op.HELLO, 5, 0, 0), Status.UNSUPPORTED_VERSION, False),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Status.BAD_REQUEST, False),
        (pack_header(Op.EXISTS, 5, 1, 10) + b"k" + b"\0" * 10, Status.BAD_REQUEST, True),  # body on EXISTS
        (pack_header(Op.GET, 5, 1 << 30), Status.BAD_REQUEST, True),  # meta over the limit
    ]
    for frame, status, after_hello in cases:
        sock = raw_client(server.port) if after_hello else socket.create_connection((LOOPBACK, server.port))
        sock.sendall(frame)
        assert read_reply(sock)[0] == status
        assert closed_by_peer(sock)
        sock.close()
    sock = raw_client(server.port)  # an unknown command is answered and the connection stays usable
    sock.sendall(pack_header(200, 9, 3) + b"abc" + pack_header(Op.HEALTH, 10))
    assert read_reply(sock)[:2] == (Status.UNKNOWN_COMMAND, 9)
    assert read_reply(sock)[:2] == (Status.OK, 10)
    sock.close()


def test_bad_token_on_the_wire(lm_server_factory) -> None:
    server = lm_server_factory("--token", "s3cret")
    sock = socket.create_connection((LOOPBACK, server.port), timeout=10)
    sock.sendall(pack_header(Op.HELLO, 1, 5) + b"guess" + pack_header(Op.GET, 2, 1) + b"k")
    assert read_reply(sock)[:2] == (Status.UNAUTHORIZED, 1)
    assert closed_by_peer(sock)
    sock.close()
    raw_client(server.port, b"s3cret").close()
    assert "bad token" in server.log()


def test_ten_thousand_random_frames_then_a_round_trip(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.02", "--max-value-mb", "8", "--frame-timeout", "2")
    rss_start = rss_bytes(server.pid)
    rng = random.Random(1234)
    ops = [int(op) for op in Op] + [0, 99, 255]

    def random_frame() -> bytes:
        kind = rng.randrange(6)
        if kind == 0:
            return rng.randbytes(rng.randrange(1, 64))  # noise
        meta_len = rng.choice([0, 1, 5, 64, rng.randrange(0, 1 << 32)])
        body_len = rng.choice([0, 3, 1000, rng.randrange(0, 1 << 64)])
        header = struct.pack("<2sBBIIQ", MAGIC if kind > 1 else rng.randbytes(2),
                             PROTOCOL_VERSION if kind > 2 else rng.randrange(256), rng.choice(ops),
                             rng.randrange(1 << 32), meta_len, body_len)
        return header + rng.randbytes(min(meta_len, 64) + min(body_len, 64))

    sent = connections = 0
    while sent < 10_000:  # bounded: every pass sends at least one frame
        connections += 1
        with socket.create_connection((LOOPBACK, server.port), timeout=5) as sock:
            if rng.random() < 0.7:
                sock.sendall(pack_header(Op.HELLO, 1))
            try:
                for _ in range(rng.randrange(1, 40)):
                    sock.sendall(random_frame())
                    sent += 1
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server hung up on us: expected
    s = stats(server.url)
    assert charged(s) <= s["budget"] and s["protocol_errors"] > 0
    rss_growth = rss_bytes(server.pid) - rss_start
    assert rss_growth < s["budget"] + 16 * MB, f"RSS grew {rss_growth / MB:.0f} MB with a 20 MB budget"
    value = os.urandom(3 * MB)

    async def body() -> None:
        c = create_connector(server.url)
        await c.put("after-fuzz", value)
        assert bytes(await c.get("after-fuzz")) == value
        await c.close()

    run(body())
    assert server.process.alive() and connections > 100


def test_client_killed_mid_value(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.05")
    code = (
        "import socket, os, sys\n"
        "from vllm_kvcache_plugin.lm_protocol import pack_header, Op\n"
        f"s = socket.create_connection(('127.0.0.1', {server.port}))\n"
        "s.sendall(pack_header(Op.HELLO, 1)); s.recv(100)\n"
        "s.sendall(pack_header(Op.PUT, 2, 4, 20_000_000) + b'dead' + b'x' * 5_000_000)\n"
        "print('sent', flush=True); sys.stdin.readline()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "sent"
    wait_for(lambda: stats(server.url)["bytes_reserved"] >= 20_000_000, 10, "reservation")
    child.kill()  # SIGKILL mid-frame
    child.wait(10)
    wait_for(lambda: stats(server.url)["bytes_reserved"] == 0, 10, "reservation released")
    wait_for(lambda: stats(server.url)["connections"] == 1, 10, "only the stats connection left")
    assert stats(server.url)["keys"] == 0

    async def body() -> None:
        c = create_connector(server.url)
        assert await c.get("dead") is None
        await c.put("alive", b"yes")
        assert bytes(await c.get("alive")) == b"yes"
        await c.close()

    run(body())


def test_thousands_of_idle_connections(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.05", "--handshake-timeout", "120")
    rss_before = rss_bytes(server.pid)
    idle = []
    try:
        for i in range(2000):
            sock = socket.create_connection((LOOPBACK, server.port), timeout=10)
            if i % 2:
                sock.sendall(pack_header(Op.HELLO, 1))  # half of them complete the handshake
            idle.append(sock)
        wait_for(lambda: stats(server.url)["connections"] >= 2001, 30, "2000 connections")

        async def body() -> float:
            c = create_connector(server.url)
            await c.put("k", b"v" * 1000)
            start = cpu_seconds(server.pid)
            for _ in range(IDLE_GETS):
                assert len(await c.get("k")) == 1000
            await c.close()
            return cpu_seconds(server.pid) - start

        server_cpu = run(body())
        # Idle connections cost nothing per request: the server's CPU time (not wall-clock time, which
        # other load inflates) for 50 GETs stays far below what a pass over 2000 connections per
        # request would take (a GET costs ~0.1 ms of CPU; the bound allows 5 ms each).
        assert server_cpu < IDLE_GETS * 0.005, f"{IDLE_GETS} GETs cost the server {server_cpu:.2f} s of CPU"
        growth = rss_bytes(server.pid) - rss_before
        print(f"server RSS grew {growth / MB:.1f} MB for 2000 idle connections; {IDLE_GETS} GETs took "
              f"{server_cpu * 1e3:.0f} ms of server CPU")
        assert growth < 60 * MB, f"RSS grew {growth / MB:.0f} MB for 2000 idle connections"
    finally:
        for sock in idle:
            sock.close()


# -- disk spill, stats, metrics --------------------------------------------------------------
def test_disk_spill_survives_eviction_and_restart(lm_server_factory, tmp_path: Path) -> None:
    disk = tmp_path / "spill"
    server = lm_server_factory("--max-size-gb", "0.01", "--disk", str(disk), "--max-disk-gb", "0.02")
    values = {f"spill/{i}": os.urandom(2 * MB) for i in range(8)}

    async def fill_and_check(fill: bool) -> dict:
        c = create_connector(server.url)
        if fill:
            for key, value in values.items():
                await c.put(key, value)
        for key, value in values.items():
            assert bytes(await c.get(key)) == value, key
        s = await c.stats()
        await c.close()
        return s

    s = run(fill_and_check(fill=True))
    assert s["spills"] >= 4 and s["disk_hits"] >= 4 and charged(s) <= s["budget"]
    assert s["disk"]["bytes_used"] <= s["disk"]["budget"] and s["keys"] == 8
    (disk / f"{TEMP_PREFIX}leftover-1").write_bytes(b"half a value")  # as if a writer died mid-file
    server.restart()
    s = run(fill_and_check(fill=False))  # what was on disk is indexed again
    assert s["disk_hits"] >= 1 and not list(disk.glob(f"{TEMP_PREFIX}*"))


def test_disk_budget_is_lru(lm_server_factory, tmp_path: Path) -> None:
    server = lm_server_factory("--max-size-gb", "0.005", "--disk", str(tmp_path), "--max-disk-gb", "0.007")

    async def body() -> None:
        c = create_connector(server.url)
        for i in range(8):
            await c.put(f"d/{i}", bytes([i]) * (2 * MB))
        s = await c.stats()
        assert s["disk"]["bytes_used"] <= s["disk"]["budget"]
        assert await c.get("d/0") is None  # evicted from memory, then from disk
        assert bytes(await c.get("d/7")) == bytes([7]) * (2 * MB)
        await c.close()

    run(body())
    files = sum(p.stat().st_size for p in tmp_path.glob("*.kv"))
    assert files <= 7 * MB


def test_stats_and_prometheus_metrics(lm_server_factory) -> None:
    metrics_port = free_port()
    server = lm_server_factory("--max-size-gb", "0.01", "--metrics-port", str(metrics_port))

    async def body() -> dict:
        c = create_connector(server.url)
        await c.put("m/1", b"abc")
        await c.get("m/1")
        await c.get("m/absent")
        s = await c.stats()
        await c.close()
        return s

    s = run(body())
    assert (s["keys"], s["hits"], s["misses"], s["budget"]) == (1, 1, 1, 10 * MB)
    assert s["requests"]["PUT"] == 1 and s["requests"]["GET"] == 2 and s["connections"] == 1
    wait_for(lambda: urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=2), 10, "metrics")
    text = urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=5).read().decode()
    assert "lm_server_keys 1\n" in text and "lm_server_hits_total 1\n" in text
    assert 'lm_server_requests_total{command="GET"} 2' in text
    assert f"lm_server_memory_budget_bytes {10 * MB}" in text
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/other", timeout=5)
    assert info.value.code == 404


def test_server_stop_fails_clients_cleanly(lm_server_factory) -> None:
    server = lm_server_factory("--max-size-gb", "0.01")

    async def body() -> None:
        c = create_connector(server.url)
        await c.put("k", b"v")
        await asyncio.to_thread(server.stop)  # SIGTERM: graceful stop closes every connection
        with pytest.raises(ConnectorError):
            await c.get("k")

    run(body())
    assert "lm server stopping" in server.log()


# -- in-process units: the frame reader and the store ---------------------------------------
class _Collect:
    """A FrameHandler that records frames, receiving bodies into fresh buffers."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, int, bytes, bytes]] = []

    def frame_started(self, header) -> bool:
        return header.code != 99  # frames with code 99 are skipped unread

    def body_targets(self, header, meta):
        cut = min(header.body_len, 3)  # two targets, to cross a target boundary too
        return [memoryview(bytearray(cut)), memoryview(bytearray(header.body_len - cut))]

    def frame_received(self, header, meta, body) -> None:
        self.frames.append((header.code, header.request_id, meta, b"".join(bytes(b) for b in body)))


def test_frame_reader_reassembles_any_split() -> None:
    from vllm_kvcache_plugin.lm_protocol import FrameReader, ScratchPool

    rng = random.Random(7)
    for chunking, body_sizes in (("bytes", [0, 2, 5, 40]), ("random", [0, 5, 40_000, 100_000]),
                                 ("whole", [0, 5, 40_000, 100_000])):
        frames = [(code, rid, rng.randbytes(rng.choice([0, 1, 30])), rng.randbytes(rng.choice(body_sizes)))
                  for rid, code in enumerate([1, 2, 99, 3, 2, 99, 4] * 3)]
        stream = b"".join(pack_header(c, r, len(m), len(b)) + m + b for c, r, m, b in frames)
        handler = _Collect()
        reader = FrameReader(handler, max_meta_len=1024, pool=ScratchPool(size=4096))
        pos = 0
        while pos < len(stream):
            view = reader.get_buffer()
            limit = {"bytes": 1, "random": rng.randrange(1, 70_000), "whole": len(view)}[chunking]
            n = min(len(view), limit, len(stream) - pos)
            view[:n] = stream[pos : pos + n]
            reader.buffer_updated(n)
            pos += n
        assert handler.frames == [f for f in frames if f[0] != 99], chunking
        assert not reader.mid_frame


def test_store_never_exceeds_budget_and_recycles_free_buffers() -> None:
    from vllm_kvcache_plugin.server.store import MemoryStore, entry_cost

    budget = 5 * MB
    store = MemoryStore(budget)
    rng = random.Random(3)
    held = []  # values still "being sent": a view is held, so they must not be reused
    for i in range(3000):
        key = f"k{rng.randrange(50)}".encode()
        size = rng.choice([100_000, 100_000, 700_000, rng.randrange(0, 2 * MB)])
        buffer = store.allocate(len(key), size)
        assert buffer is not None and len(buffer) == size
        assert store.total <= budget
        assert all(buffer is not view.obj for view in held)  # never hand out a buffer in use
        if i % 3:
            store.commit(key, buffer)
        else:
            store.release(len(key), buffer)
        if rng.random() < 0.1 and store.get(key) is not None:
            held.append(memoryview(store.get(key)))
            held = held[-5:]
        if rng.random() < 0.05:
            store.delete(key)
        assert store.total <= budget and store.used >= 0 and store.reserved == 0
    assert store.counters.recycled_buffers > 100 and store.counters.evictions > 100
    assert store.allocate(1, budget) is None  # larger than the budget with its overhead
    assert store.allocate(1, budget - entry_cost(1, 0)) is not None  # exactly the budget
