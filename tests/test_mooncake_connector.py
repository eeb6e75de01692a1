"""mooncakestore:// against a real mooncake_master on 127.0.0.1 (P2PHANDSHAKE and etcd metadata)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from testbed.mooncake_servers import MooncakeCluster, start_standalone_client
from testbed.processes import free_port
from vllm_kvcache_plugin.config import load_config
from vllm_kvcache_plugin.connectors import create_connector, parse_remote_url
from vllm_kvcache_plugin.connectors.mooncake import MooncakeStoreConnector
from vllm_kvcache_plugin.connectors.mooncake_settings import CONFIG_PATH_ENV, MiB, MooncakeSettings, parse_size
from vllm_kvcache_plugin.errors import ConfigError, ConnectorError, CorruptValueError, MissingDependencyError
from vllm_kvcache_plugin.memory import Allocator
from vllm_kvcache_plugin.serde.naive import NaiveSerde

pytest.importorskip("mooncake.store", reason="mooncake-transfer-engine(-non-cuda) is not installed")

CHUNK_BYTES = 5_898_304  # one 256-token SmolLM2 chunk in bf16 (+ the serde header below)


def run(coro):
    return asyncio.run(coro)


def unique(tag: str) -> str:
    return f"test-{tag}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch):
    monkeypatch.delenv(CONFIG_PATH_ENV, raising=False)


@pytest.fixture(scope="module", params=["p2p", "etcd"])
def cluster(request) -> MooncakeCluster:
    return request.getfixturevalue(f"mooncake_{request.param}")


@pytest.fixture(scope="module")
def conn(cluster) -> Iterator[MooncakeStoreConnector]:
    """One connected client per cluster for the plain data tests (closing one takes Mooncake 2 s)."""
    shared = connector(cluster)
    run(shared.connect())
    yield shared
    run(shared.close())


def connector(cluster: MooncakeCluster, url: str | None = None, blocking: float = 2.0,
              **options) -> MooncakeStoreConnector:
    config = load_config(extra_config={"remote_options": cluster.options(**options),
                                       "blocking_timeout_secs": blocking}, env={})
    conn = create_connector(url or cluster.master.url, config)
    assert isinstance(conn, MooncakeStoreConnector)
    return conn


def settings(url: str = "mooncakestore://127.0.0.1:50051/", env: dict | None = None, **options) -> MooncakeSettings:
    return MooncakeSettings.load(parse_remote_url(url), options, env or {})


# -- configuration (no server) -------------------------------------------------------------------
def test_settings_precedence_file_then_options_then_url(tmp_path):
    path = tmp_path / "mooncake.json"
    path.write_text(json.dumps({"local_hostname": "10.0.0.1", "metadata_server": "etcd://10.0.0.9:2379",
                                "protocol": "rdma", "device_name": "mlx5_0", "master_server_address": "10.0.0.9:1",
                                "global_segment_size": "1GB", "replica_num": 2}))
    got = settings("mooncakestore://127.0.0.1:50052/?device=mlx5_1", {CONFIG_PATH_ENV: str(path)},
                   protocol="tcp", global_segment_size=256 * MiB, transfer_timeout="3.5")
    assert got.local_hostname == "10.0.0.1" and got.metadata_server == "etcd://10.0.0.9:2379"
    assert got.protocol == "tcp" and got.global_segment_size == 256 * MiB  # remote_options beat the file
    assert got.master_server_address == "127.0.0.1:50052" and got.device_name == "mlx5_1"  # the URL beats both
    assert got.replica_num == 2 and got.transfer_timeout == 3.5


def test_settings_defaults():
    got = settings(local_hostname="127.0.0.1", metadata_server="P2PHANDSHAKE")
    assert (got.global_segment_size, got.local_buffer_size, got.replica_num) == (512 * MiB, 128 * MiB, 1)
    assert got.protocol == "tcp" and got.device_name == "" and got.master_server_address == "127.0.0.1:50051"


@pytest.mark.parametrize(("yaml_name", "json_name", "metadata", "serde"), [
    ("mooncake.yaml", "mooncake.json", "etcd://127.0.0.1:2379", "naive"),
    ("mooncake-cachegen.yaml", "mooncake-p2p.json", "P2PHANDSHAKE", "cachegen"),
])
def test_repository_configs(monkeypatch, yaml_name, json_name, metadata, serde):
    configs = Path(__file__).resolve().parent.parent / "configs"
    config = load_config(env={"LMCACHE_CONFIG_FILE": str(configs / yaml_name)})
    monkeypatch.setenv(CONFIG_PATH_ENV, str(configs / json_name))
    conn = create_connector(config.remote_url, config)  # offline: nothing connects yet
    assert config.remote_serde == serde and conn.settings.metadata_server == metadata
    assert conn.settings.master_server_address == "127.0.0.1:50051" and conn.settings.local_hostname == "127.0.0.1"


@pytest.mark.parametrize(("file_text", "options", "expected"), [
    (None, {"local_hostname": "h"}, "metadata_server: not set; add it to a JSON file named by MOONCAKE_CONFIG_PATH"),
    ("missing", {}, "does not exist"),
    ('{"local_hostname": "h",\n "protocol": }', {}, "not valid JSON at line 2"),
    ('["a list"]', {}, "must be a JSON object"),
    ('{"local_hostname": "h", "metadata_server": "P2PHANDSHAKE", "global_segment_size": "lots"}', {},
     "global_segment_size (from MOONCAKE_CONFIG_PATH="),
    (None, {"local_hostname": "h", "metadata_server": "zk://x"}, "metadata_server (from remote_options)"),
    (None, {"local_hostname": "h", "metadata_server": "P2PHANDSHAKE", "protocol": "udp"}, "is not tcp or rdma"),
    (None, {"local_hostname": "h", "metadata_server": "P2PHANDSHAKE", "replica_num": 0}, "positive integer"),
    (None, {"local_hostname": "h", "metadata_server": "P2PHANDSHAKE", "replica_nun": 2}, "did you mean 'replica_num'"),
    (None, {"local_hostname": "h", "metadata_server": "P2PHANDSHAKE", "metrics_address": "nohost"}, "not host:port"),
    (None, {"local_hostname": "h", "metadata_server": "P2PHANDSHAKE", "overwrite": "maybe"}, "not true or false"),
])
def test_config_errors_are_one_line(tmp_path, file_text, options, expected):
    env = {}
    if file_text is not None:
        path = tmp_path / "mooncake.json"
        if file_text != "missing":
            path.write_text(file_text)
        env[CONFIG_PATH_ENV] = str(path)
    with pytest.raises(ConfigError) as err:
        settings(env=env, **options)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_parse_size():
    assert parse_size("512MB") == 512 * MiB and parse_size("4 GiB") == 4 << 30 and parse_size(1024) == 1024
    assert parse_size("1.5k") == 1536
    for bad in ("lots", "-1", "12 parsecs", True, None):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mooncake.store", None)  # import now raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = load_config(extra_config={"remote_options": {"local_hostname": "h", "metadata_server": "P2PHANDSHAKE"}},
                         env={})
    with pytest.raises(MissingDependencyError, match=r"pip install 'vllm-kvcache-plugin\[mooncake-cpu\]'"):
        create_connector("mooncakestore://127.0.0.1:50051/", config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(MissingDependencyError, match=r"\[mooncake\]'"):
        create_connector("mooncakestore://127.0.0.1:50051/", config)


# -- a real master -------------------------------------------------------------------------------
def test_round_trip_and_exists(conn):
    async def scenario():
        big = os.urandom(CHUNK_BYTES)
        k1, k2, k3, missing = (unique("rt") for _ in range(4))
        await conn.put(k1, big)
        await conn.batched_put([(k2, b"two" * 1000), (k3, memoryview(os.urandom(100_000)))])
        assert bytes(await conn.get(k1)) == big
        got = await conn.batched_get([k2, missing, k1])
        assert bytes(got[0]) == b"two" * 1000 and got[1] is None and bytes(got[2]) == big
        assert await conn.exists(k1) and not await conn.exists(missing)
        assert await conn.batched_exists([missing, k3, k2]) == [False, True, True]
        assert await conn.delete(k1) is True and await conn.delete(k1) is False
        assert await conn.get(k1) is None and not await conn.exists(k1)
        assert await conn.ping()
    run(scenario())


def test_put_of_existing_key_keeps_first_value(conn):
    async def scenario():
        key = unique("dup")
        await conn.put(key, b"first" * 100)
        await conn.put(key, b"second" * 100)  # no error, no overwrite (content-addressed keys)
        assert bytes(await conn.get(key)) == b"first" * 100
        assert await conn.delete(key)
        await conn.put(key, b"second" * 100)
        assert bytes(await conn.get(key)) == b"second" * 100
    run(scenario())


def test_overwrite_option_replaces_values(mooncake_p2p):
    async def scenario():
        conn = connector(mooncake_p2p, url=mooncake_p2p.master.url + "?overwrite=true")
        await conn.connect()
        try:
            key, big = unique("upsert"), os.urandom(CHUNK_BYTES)
            await conn.put(key, b"first" * 100)
            await conn.batched_put([(key, big)])
            assert bytes(await conn.get(key)) == big
        finally:
            await conn.close()
    run(scenario())


def test_corrupt_values_fail_the_serde_check(conn):
    async def scenario():
        serde, allocator = NaiveSerde(), Allocator()
        chunk = allocator.wrap(torch.randn(2, 4, 16, 3, 64).to(torch.bfloat16))
        data = serde.serialize(chunk)
        good, flipped, truncated = unique("good"), unique("flip"), unique("trunc")
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0x40
        await conn.batched_put([(good, data), (flipped, bad), (truncated, data[:-100])])
        values = await conn.batched_get([good, flipped, truncated])
        assert torch.equal(serde.deserialize(values[0]).tensor, chunk.tensor)
        for value in values[1:]:
            with pytest.raises(CorruptValueError):
                serde.deserialize(value)
    run(scenario())


def test_list_through_the_master_admin_port(conn):
    async def scenario():
        prefix = unique("list")
        await conn.batched_put([(f"{prefix}/a", b"a"), (f"{prefix}/b", b"b")])
        assert sorted(await conn.list(prefix)) == [f"{prefix}/a", f"{prefix}/b"]
    run(scenario())


def test_values_larger_than_staging_and_no_staging(mooncake_p2p):
    async def scenario():
        value = os.urandom(CHUNK_BYTES)
        for staging in ("4MB", 0):
            conn = connector(mooncake_p2p, staging_buffer_size=staging)
            await conn.connect()
            try:
                keys = [unique("plain") for _ in range(3)]
                await conn.batched_put([(k, value) for k in keys[:2]])
                got = await conn.batched_get(keys)
                assert bytes(got[0]) == value and bytes(got[1]) == value and got[2] is None
            finally:
                await conn.close()
        conn = connector(mooncake_p2p, staging_buffer_size=0, local_buffer_size="4MB")
        await conn.connect()
        try:  # too big for both paths: a ConnectorError that says what to raise
            with pytest.raises(ConnectorError, match=r"put .* failed: -600 .*local_buffer_size"):
                await conn.put(unique("huge"), value)
        finally:
            await conn.close()
    run(scenario())


def test_concurrent_calls_share_the_client(mooncake_p2p):
    async def one(conn, i):
        items = [(unique(f"c{i}"), os.urandom(1_000_000 + i)) for _ in range(3)]
        await conn.batched_put(items)
        got = await conn.batched_get([k for k, _ in items])
        return [bytes(g) for g in got] == [v for _, v in items]

    async def scenario():
        conn = connector(mooncake_p2p, staging_buffer_size="4MB")
        await conn.connect()
        try:
            assert all(await asyncio.gather(*(one(conn, i) for i in range(8))))
        finally:
            await conn.close()
    run(scenario())


def test_eviction_when_the_segment_is_full(mooncake_p2p):
    async def scenario():
        conn = connector(mooncake_p2p, global_segment_size="32MB")
        await conn.connect()
        keys = [unique("evict") for _ in range(14)]  # 14 x 5.9 MB into a 32 MB segment
        values = [os.urandom(CHUNK_BYTES) for _ in keys]
        try:
            for key, value in zip(keys, values, strict=True):
                await conn.put(key, value)  # never fails: a full segment evicts
            assert bytes(await conn.get(keys[-1])) == values[-1]
            present = await conn.batched_exists(keys)
            assert not all(present[:5]), "the oldest values should have been evicted"
            assert sum(present) <= 5
            got = await conn.batched_get(keys)
            for value, stored, there in zip(values, got, present, strict=True):
                assert (stored is None) if not there else bytes(stored) == value
        finally:
            await conn.close()
    run(scenario())


def test_master_killed_then_restarted(mooncake_master_factory, tmp_path):
    master = mooncake_master_factory()
    cluster = MooncakeCluster(master, "P2PHANDSHAKE", tmp_path)

    async def scenario():
        conn = connector(cluster, blocking=1.0, transfer_timeout=3)
        await conn.connect()
        try:
            old = unique("old")
            await conn.put(old, b"old" * 1000)
            os.kill(master.process.pid, signal.SIGSTOP)  # a hung master: calls end at the time-out
            start = time.monotonic()
            with pytest.raises(ConnectorError, match="no answer within 1s"):
                await conn.exists(old)
            assert time.monotonic() - start < 10, "the 1 s time-out bounds a hung master"
            os.kill(master.process.pid, signal.SIGCONT)
            assert await conn.exists(old)
            master.kill()
            deadline = time.monotonic() + 30
            while True:  # each failure is bounded; soon the client knows the master is down
                with pytest.raises(ConnectorError) as failure:
                    await conn.batched_get([old])
                if "master unreachable" in str(failure.value) or time.monotonic() > deadline:
                    break
            # From then on an op fails at once, without a call to the master (no wall-clock bar here).
            assert "master unreachable" in str(failure.value), f"ops should fail fast, master down: {failure.value}"
            with pytest.raises(ConnectorError):
                await conn.put(unique("down"), b"x")
            master.restart()
            new = unique("new")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the same connector recovers by itself
                try:
                    await conn.put(new, b"new" * 1000)
                    break
                except ConnectorError:
                    await asyncio.sleep(0.5)
            assert bytes(await conn.get(new)) == b"new" * 1000
            assert await conn.get(old) is None  # a restarted master starts empty
        finally:
            await conn.close()
    run(scenario())


def test_unreachable_master_at_connect_then_it_comes_up(mooncake_master_factory, tmp_path):
    port = free_port()
    cluster = MooncakeCluster(type("NotYet", (), {"address": f"127.0.0.1:{port}",
                                                  "metrics_address": f"127.0.0.1:{port}",
                                                  "url": f"mooncakestore://127.0.0.1:{port}/"})(),
                              "P2PHANDSHAKE", tmp_path)

    async def scenario():
        conn = connector(cluster, blocking=1.0)
        start = time.monotonic()
        with pytest.raises(ConnectorError, match="retrying in the background"):
            await conn.connect()
        # Bounded by the 1 s time-out; Mooncake's own setup retries for over 60 s.
        assert time.monotonic() - start < 20
        with pytest.raises(ConnectorError, match="not connected yet"):  # at once: no call is made
            await conn.exists("k")
        mooncake_master_factory(rpc_port=port)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                await conn.put("late", b"late")
                break
            except ConnectorError:
                await asyncio.sleep(0.5)
        assert bytes(await conn.get("late")) == b"late"
        await conn.close()
        with pytest.raises(ConnectorError, match="closed"):
            await conn.get("late")
    run(scenario())


def test_values_outlive_the_connector_with_a_standalone_client(mooncake_p2p):
    """With global_segment_size 0 the connector owns no memory; mooncake_client does, so a new
    connector (a restarted vLLM) still finds what the old one stored."""
    owner = start_standalone_client(mooncake_p2p.master, "P2PHANDSHAKE")

    async def scenario():
        key, value = unique("restart"), os.urandom(CHUNK_BYTES)
        first = connector(mooncake_p2p, global_segment_size=0)
        await first.connect()
        await first.put(key, value)
        await first.close()
        second = connector(mooncake_p2p, global_segment_size=0)
        await second.connect()
        try:
            assert bytes(await second.get(key)) == value
        finally:
            await second.close()
    try:
        run(scenario())
    finally:
        owner.stop()


# -- gets straight into caller buffers (the storage layer's pooled receive buffers) -----------------
def test_get_into_pooled_buffers_is_byte_exact_and_registers_each_buffer_once(conn):
    async def scenario():
        allocator = Allocator()
        sizes = [1, 4095, 4096, 100_003, CHUNK_BYTES]
        keys = [unique("into") for _ in sizes]
        values = [os.urandom(n) for n in sizes]
        await conn.batched_put(list(zip(keys, values, strict=True)))
        big_key, missing = unique("big"), unique("none")
        await conn.put(big_key, os.urandom(50_000))
        capacity = CHUNK_BYTES + 64
        blocks = [allocator.buffer(capacity) for _ in range(len(keys) + 1)]
        small = allocator.buffer(10_000)
        for block in (*blocks, small):
            block.fill_(0xAB)
        registry = conn.client.registry
        before = registry.registrations
        for _ in range(2):  # the second round reuses the registrations
            got = await conn.batched_get_into([*keys, missing, big_key],
                                              [b.numpy() for b in blocks] + [small.numpy()])
            assert got[:len(keys)] == sizes and got[len(keys)] is None
            assert got[-1] == 50_000, "a value larger than its buffer reports its length"
            for block, value in zip(blocks[:len(keys)], values, strict=True):
                assert bytes(block.numpy()[:len(value)]) == value
            assert bytes(small.numpy()) == b"\xab" * 10_000, "nothing written into a buffer it did not fit"
        assert registry.registrations - before == len(blocks) + 1
    run(scenario())


def test_get_into_forgets_buffers_the_allocator_drops(conn):
    async def scenario():
        key, value = unique("drop"), os.urandom(200_000)
        await conn.put(key, value)
        allocator = Allocator(max_pool_bytes=0)  # every recycled buffer is dropped (and freed)
        registry, dropped = conn.client.registry, []
        for _ in range(5):
            block = allocator.buffer(300_000)
            assert await conn.batched_get_into([key], [block.numpy()]) == [len(value)]
            assert bytes(block.numpy()[:len(value)]) == value
            ptr = block.data_ptr()
            allocator.recycle(block)
            del block
            assert (ptr, 300_000) in registry._dropped
            dropped.append(ptr)
        # the next call unregisters the dropped ones before it registers its own buffer
        block = allocator.buffer(300_000)
        assert await conn.batched_get_into([key], [block.numpy()]) == [len(value)]
        assert registry._dropped == [] and registry._sizes.get(block.data_ptr()) == 300_000
        assert all(p == block.data_ptr() or p not in registry._sizes for p in dropped)
    run(scenario())


def test_get_into_returns_only_after_the_native_call_ends(conn, monkeypatch):
    """A cancelled get (the storage layer's deadline) keeps the buffers until Mooncake's call is
    over, then re-raises: nothing may write into buffers the caller has reused."""
    async def scenario():
        key, value = unique("slow"), os.urandom(100_000)
        await conn.put(key, value)
        real, ended = conn._get_many_into, []

        def slow(store, keys, views):
            time.sleep(1.0)
            try:
                return real(store, keys, views)
            finally:
                ended.append(time.monotonic())

        monkeypatch.setattr(conn, "_get_many_into", slow)
        block = Allocator().buffer(200_000)
        task = asyncio.ensure_future(conn.batched_get_into([key], [block.numpy()]))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.sleep(0.3)
        assert not task.done(), "returned while Mooncake could still write into the buffer"
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended and time.monotonic() >= ended[0]
        assert bytes(block.numpy()[:len(value)]) == value  # the call did finish writing
    run(scenario())


def test_storage_layer_loads_mooncake_values_into_pooled_buffers(mooncake_p2p):
    from vllm_kvcache_plugin.memory import ChunkMeta, KVFormat
    from vllm_kvcache_plugin.storage.loop import EventLoopThread
    from vllm_kvcache_plugin.storage.remote import RemoteTier

    conn = connector(mooncake_p2p)
    loop = EventLoopThread()
    allocator = Allocator()
    serde = NaiveSerde(allocator)
    tier = RemoteTier(conn, serde, conn.config, loop)
    tier.start()
    try:
        full = ChunkMeta(KVFormat.KV, torch.bfloat16, (2, 4, 16, 3, 64))
        chunks = [allocator.wrap(torch.randn(2, 4, t, 3, 64).to(torch.bfloat16)) for t in (16, 5)]
        keys = [unique("tier") for _ in chunks]
        # Stored through the connector: right after an earlier test closed its client, the master may
        # still offer that client's segment for a moment (a put there fails: TRANSFER_FAIL).
        deadline = time.monotonic() + 20
        while True:
            try:
                run(conn.batched_put([(k, bytes(serde.serialize(c))) for k, c in zip(keys, chunks, strict=True)]))
                break
            except ConnectorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        got = tier.get_many([*keys, unique("absent")], full)
        assert got[-1] is None
        for chunk, back in zip(chunks, got[:-1], strict=True):
            assert back is not None and torch.equal(back.tensor, chunk.tensor)
            assert back._block.numel() == serde.max_value_size(full)  # received in place
            back.ref_down()
        assert conn.client.registry._sizes, "the pooled buffers were registered"
    finally:
        tier.close()
        loop.stop()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_gets_of_an_exclusive_load_wait_at_idle_priority_other_calls_do_not(conn, monkeypatch):
    """Mooncake's wheel polls for a transfer's end on the calling thread. Within ``idle_waits``
    (a load before vLLM's forward) the gets run on idle-priority threads; outside it on normal
    ones, which a running forward cannot starve."""
    from vllm_kvcache_plugin.threads import idle_waits

    policies: dict[str, list[int]] = {"into": [], "get": []}

    def spy(name, real):
        def call(*args):
            policies[name].append(os.sched_getscheduler(0))
            return real(*args)
        return call

    monkeypatch.setattr(conn, "_get_many_into", spy("into", conn._get_many_into))
    monkeypatch.setattr(conn, "_get_many", spy("get", conn._get_many))

    async def scenario():
        key, value = unique("idle"), os.urandom(300_000)
        await conn.put(key, value)
        block = Allocator().buffer(400_000)
        with idle_waits():
            assert await conn.batched_get_into([key], [block.numpy()]) == [len(value)]
            assert bytes(block.numpy()[:len(value)]) == value
            assert bytes((await conn.batched_get([key]))[0]) == value
            assert await conn.batched_exists([key]) == [True]  # a lookup: on the normal threads
        block.fill_(0)
        assert await conn.batched_get_into([key], [block.numpy()]) == [len(value)]
        assert bytes(block.numpy()[:len(value)]) == value
        assert bytes((await conn.batched_get([key]))[0]) == value

    run(scenario())
    assert policies["into"] == [os.SCHED_IDLE, os.SCHED_OTHER]
    assert policies["get"] == [os.SCHED_IDLE, os.SCHED_OTHER]
