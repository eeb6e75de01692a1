"""The redis-family connectors against real servers (standalone, unix socket, valkey alias, TLS,
sentinel, cluster) started on 127.0.0.1 by tests/fixtures/redis_servers.py."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from testbed.redis_servers import start_redis, start_redis_cluster, start_sentinel_set
from vllm_kvcache_plugin.config import KVCacheConfig
from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.connectors.redis import RedisConnector, ZeroCopyPacker
from vllm_kvcache_plugin.errors import ConnectorError, URLError

CHUNK_256 = 2 * 30 * 256 * 3 * 64 * 2  # one 256-token SmolLM2 chunk in bf16: 5,898,240 bytes
CHUNK_16 = 2 * 30 * 16 * 3 * 64 * 2
SIZES = [1, CHUNK_16, CHUNK_256]

# (fixture, attribute with the URL): every scheme this module owns.
TARGETS = [
    ("fresh_redis", "url"),
    ("fresh_redis", "unix_url"),
    ("fresh_redis", "valkey_url"),
    ("fresh_redis_tls", "url"),
    ("fresh_redis_tls", "mutual_tls_url"),
    ("fresh_redis_sentinel", "url"),
    ("fresh_redis_cluster", "url"),
]
TARGET_IDS = ["redis", "unix", "valkey", "rediss", "rediss-mtls", "sentinel", "cluster"]


def run(coro: Awaitable):
    return asyncio.run(coro)


def key(i: int, model: str = "/models/SmolLM2-135M/") -> str:
    return f"vllm@{model.replace('@', '%40')}@1@0@{i:064x}"


async def with_connector(url: str, body: Callable, config: KVCacheConfig | None = None):
    conn = create_connector(url, config)
    await conn.connect()
    try:
        return await body(conn)
    finally:
        await conn.close()


@pytest.fixture(params=TARGETS, ids=TARGET_IDS)
def target_url(request) -> str:
    fixture, attr = request.param
    return getattr(request.getfixturevalue(fixture), attr)


@pytest.mark.timeout(120)
def test_round_trip_every_scheme_and_size(target_url: str) -> None:
    values = {key(i): os.urandom(size) for i, size in enumerate(SIZES)}

    async def body(conn):
        for k, v in values.items():
            assert await conn.exists(k) is False
            assert await conn.get(k) is None
            await conn.put(k, v)
        for k, v in values.items():
            assert await conn.exists(k) is True
            got = await conn.get(k)
            assert bytes(got) == v, f"{len(v)}-byte value changed on the way"
        assert await conn.batched_get(list(values)) == list(values.values())
        assert await conn.delete(key(0)) is True
        assert await conn.delete(key(0)) is False
        assert await conn.get(key(0)) is None
        assert await conn.ping() is True

    run(with_connector(target_url, body))


@pytest.mark.timeout(120)
def test_batched_operations_keep_order_and_mix_hits(target_url: str) -> None:
    keys = [key(i) for i in range(32)]
    stored = {k: os.urandom(1000 + i) for i, k in enumerate(keys) if i % 3 != 1}

    async def body(conn):
        assert await conn.batched_exists([]) == []
        assert await conn.batched_get([]) == []
        await conn.batched_put([])
        await conn.batched_put(list(stored.items()))
        assert await conn.batched_exists(keys) == [k in stored for k in keys]
        got = await conn.batched_get(keys)
        assert [None if g is None else bytes(g) for g in got] == [stored.get(k) for k in keys]

    run(with_connector(target_url, body))


@pytest.mark.timeout(120)
def test_list_by_prefix_returns_original_keys(target_url: str) -> None:
    mine = [key(i, model="/m/one@x") for i in range(5)]
    other = [key(i, model="/m/two") for i in range(3)]
    glob_like = ["a*b[1]?\\z", "a*b[1]?\\zz"]

    async def body(conn):
        await conn.batched_put([(k, b"v") for k in [*mine, *other, *glob_like, "a-b[1]?\\z"]])
        assert sorted(await conn.list("vllm@/m/one%40x@")) == sorted(mine)
        assert sorted(await conn.list("vllm@/m/two@")) == sorted(other)
        assert sorted(await conn.list("a*b[1]?\\")) == sorted(glob_like), "glob characters must match literally"
        assert await conn.list("nothing-here") == []
        assert set(await conn.list()) >= {*mine, *other}

    run(with_connector(target_url, body))


def test_values_of_every_buffer_kind(fresh_redis) -> None:
    base = os.urandom(CHUNK_16)
    kinds = {
        "bytes": base,
        "bytearray": bytearray(base),
        "memoryview": memoryview(base),
        "numpy-uint16": np.frombuffer(base, dtype=np.uint16),
        "memoryview-2d": memoryview(bytearray(base)).cast("B", (2, CHUNK_16 // 2)),
    }

    async def body(conn):
        for name, value in kinds.items():
            await conn.put(f"kind:{name}", value)
            assert bytes(await conn.get(f"kind:{name}")) == base, name
        with pytest.raises(TypeError, match="bytes-like"):
            await conn.put("kind:bad", 12345)
        with pytest.raises(TypeError, match="non-empty str"):
            await conn.get(b"bytes-key")

    run(with_connector(fresh_redis.url, body))


def _reads_processed(client) -> int:
    return int(client.info("stats")["total_reads_processed"])


def _info_pair_cost(client) -> int:
    first = _reads_processed(client)
    return _reads_processed(client) - first


def _round_trips(client, action: Callable[[], None], trials: int = 5) -> int:
    """Fewest read events the server processed for ``action`` over a few trials, the INFO calls'
    own reads subtracted. Other sockets (a client freed by GC; on a sentinel-watched master the
    sentinels' PINGs and the replicas' REPLCONF ACKs, several a second) only ever add reads, so
    the INFO cost is the fewest seen over several bare INFO pairs and the action's cost the
    fewest over the trials; gc runs first."""
    gc.collect()
    info_cost = min(_info_pair_cost(client) for _ in range(5))
    counts = []
    for _ in range(trials):
        gc.collect()
        start = _reads_processed(client)
        action()
        counts.append(_reads_processed(client) - start - info_cost)
    return min(counts)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fixture", ["fresh_redis", "fresh_redis_sentinel"])
def test_batched_exists_of_32_keys_is_one_round_trip(fixture: str, request) -> None:
    server = request.getfixturevalue(fixture)
    node = server.node if fixture == "fresh_redis" else server.master_node()
    keys = [key(i) for i in range(32)]
    loop = asyncio.new_event_loop()
    conn = create_connector(server.url)
    answers = []
    try:
        loop.run_until_complete(conn.connect())
        loop.run_until_complete(conn.batched_put([(k, b"x") for k in keys[::2]]))
        loop.run_until_complete(conn.batched_exists(keys))  # warm: connection open, handshake done
        with node.client() as admin:
            batched = _round_trips(admin, lambda: answers.append(loop.run_until_complete(conn.batched_exists(keys))))
            single = _round_trips(admin, lambda: [loop.run_until_complete(conn.exists(k)) for k in keys])
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
    assert answers == [[i % 2 == 0 for i in range(32)]] * 5
    assert single >= 32, "the server counter must see a read per single EXISTS (else the proof is void)"
    assert batched == 1, f"{batched} reads for one batched_exists (single EXISTS calls took {single})"


@pytest.mark.timeout(60)
def test_cluster_batched_exists_is_one_round_trip_per_node(fresh_redis_cluster) -> None:
    keys = [key(i) for i in range(32)]
    admins = [node.client() for node in fresh_redis_cluster.nodes]
    loop = asyncio.new_event_loop()
    conn = create_connector(fresh_redis_cluster.url)
    per_node = []
    try:
        loop.run_until_complete(conn.batched_put([(k, b"x") for k in keys]))
        assert all(a.dbsize() > 0 for a in admins), "32 keys should land on every node of the cluster"
        loop.run_until_complete(conn.batched_exists(keys))
        for _ in range(3):  # fewest reads over a few trials: see _round_trips
            gc.collect()
            before = [_reads_processed(a) for a in admins]
            assert loop.run_until_complete(conn.batched_exists(keys)) == [True] * 32
            after = [_reads_processed(a) for a in admins]
            per_node.append([b - a for a, b in zip(before, after, strict=True)])
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
        for admin in admins:
            admin.close()
    # Each node: 1 read for its share of the pipeline + 1 for the second INFO.
    assert [min(col) for col in zip(*per_node, strict=True)] == [2, 2, 2], per_node


@pytest.mark.timeout(90)
def test_cluster_batched_exists_follows_a_moved_slot() -> None:
    cluster = start_redis_cluster()
    loop = asyncio.new_event_loop()
    conn = create_connector(cluster.url)
    try:
        keys = [key(i) for i in range(32)]
        loop.run_until_complete(conn.batched_put([(k, b"x") for k in keys[1:]]))  # keys[0] absent
        assert loop.run_until_complete(conn.batched_exists(keys)) == [False] + [True] * 31  # slot map cached
        slot = cluster.nodes[0].call(lambda c: c.cluster("keyslot", keys[0]))
        ids = {n.port: n.call(lambda c: c.cluster("myid")) for n in cluster.nodes}
        owner_port = _slot_owner(cluster.nodes[0].call(lambda c: c.execute_command("CLUSTER SLOTS")), slot)
        owner = next(n for n in cluster.nodes if n.port == owner_port)
        target = next(n for n in cluster.nodes if n is not owner)
        assert owner.call(lambda c: c.cluster("countkeysinslot", slot)) == 0
        target.call(lambda c: c.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[owner.port]))
        owner.call(lambda c: c.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target.port]))
        for node in cluster.nodes:
            node.call(lambda c: c.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target.port]))
        # The connector still maps the slot to the old owner: its fast path meets MOVED and falls back.
        assert loop.run_until_complete(conn.batched_exists(keys)) == [False] + [True] * 31
        loop.run_until_complete(conn.put(keys[0], b"moved"))
        assert target.call(lambda c: c.get(keys[0])) == b"moved"
        assert loop.run_until_complete(conn.batched_exists(keys)) == [True] * 32
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
        cluster.stop()


def _slot_owner(slots_reply, slot: int) -> int:
    """Port of the master serving ``slot``, from CLUSTER SLOTS ([lo, hi, [host, port, id], ...])."""
    return next(int(primary[1]) for lo, hi, primary, *_ in slots_reply if lo <= slot <= hi)


@pytest.mark.timeout(90)
def test_stopped_or_hung_redis_fails_fast_and_recovers_after_restart() -> None:
    timeout = 1.0
    config = KVCacheConfig(blocking_timeout_secs=timeout)
    server = start_redis("redis-restart")
    loop = asyncio.new_event_loop()
    conn = create_connector(server.url, config)

    def op_fails_in_time(make: Callable[[], Awaitable], what: str) -> None:
        started = time.monotonic()
        with pytest.raises(ConnectorError) as err:
            loop.run_until_complete(make())
        elapsed = time.monotonic() - started
        # Bounded by the time-out, not a hang (a generous margin: no sub-second bar on a loaded machine).
        assert elapsed < timeout + 5, f"{what} took {elapsed:.2f}s with a {timeout}s time-out"
        assert "\n" not in str(err.value) and what in str(err.value)

    ops = {
        "get": lambda: conn.get(key(1)),
        "exists": lambda: conn.exists(key(1)),
        "batched_exists": lambda: conn.batched_exists([key(1), key(2)]),
        "batched_get": lambda: conn.batched_get([key(1)]),
        "put": lambda: conn.put(key(3), b"v"),
        "batched_put": lambda: conn.batched_put([(key(3), b"v")]),
        "delete": lambda: conn.delete(key(1)),
        "list": lambda: conn.list("vllm@"),
    }
    try:
        loop.run_until_complete(conn.put(key(1), b"before"))
        server.node.pause()  # hung: the port accepts, nothing answers
        try:
            for what in ("get", "batched_exists", "put"):
                op_fails_in_time(ops[what], what)
        finally:
            server.node.resume()
        assert loop.run_until_complete(conn.get(key(1))) == b"before"

        server.node.kill()  # stopped: connections refused
        for what, make in ops.items():
            op_fails_in_time(make, what)
        assert loop.run_until_complete(conn.ping()) is False

        server.node.restart()  # same port, empty (no persistence)
        assert loop.run_until_complete(conn.get(key(1))) is None
        loop.run_until_complete(conn.put(key(1), b"after"))
        assert loop.run_until_complete(conn.get(key(1))) == b"after"
        assert loop.run_until_complete(conn.ping()) is True
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
        server.stop()


@pytest.mark.timeout(120)
def test_sentinel_failover_keeps_gets_working() -> None:
    group = start_sentinel_set("failover")
    loop = asyncio.new_event_loop()
    conn = create_connector(group.url, KVCacheConfig(blocking_timeout_secs=2.0))
    values = {key(i): os.urandom(CHUNK_16) for i in range(8)}
    try:
        loop.run_until_complete(conn.batched_put(list(values.items())))
        group.wait_replicated()
        group.wait_ready_for_failover()
        old_port = group.master_port()
        new_port = group.kill_master_and_wait_failover()
        assert new_port != old_port
        # The connector's pooled connection points at the dead master: it must follow the sentinels.
        for k, v in values.items():
            assert loop.run_until_complete(conn.get(k)) == v
        loop.run_until_complete(conn.put(key(100), b"written after failover"))
        assert group.master_node().call(lambda c: c.get(key(100))) == b"written after failover"
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
        group.stop()


def test_tls_without_the_ca_is_refused(fresh_redis_tls) -> None:
    url = f"rediss://127.0.0.1:{fresh_redis_tls.node.port}"
    with pytest.raises(ConnectorError, match="certificate verify failed"):
        run(with_connector(url, lambda conn: conn.get("k")))
    insecure = f"{url}?ssl_cert_reqs=none"
    assert run(with_connector(insecure, lambda conn: conn.exists("k"))) is False


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_password_never_leaks(redis_server, form: str) -> None:
    # userinfo: the server rejects the credentials; query: nothing listens on port 1 (refused).
    url = (f"redis://user:s3cret-pw@127.0.0.1:{redis_server.node.port}/0" if form == "userinfo"
           else "redis://127.0.0.1:1/0?password=s3cret-pw&threads=2")
    conn = create_connector(url)
    assert conn.options.password == "s3cret-pw"
    assert "s3cret-pw" not in repr(conn) and "s3cret-pw" not in conn.url.redacted()
    with pytest.raises(ConnectorError) as err:
        run(conn.connect())
    assert "s3cret-pw" not in str(err.value) and "***" in str(err.value)
    run(conn.close())
    sentinel = create_connector("redis-sentinel://127.0.0.1:1/m?password=s3cret-pw&sentinel_password=other-pw")
    assert "s3cret-pw" not in sentinel.url.redacted() and "other-pw" not in sentinel.url.redacted()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/x", "database 'x' is not an integer"),
        ("redis://127.0.0.1:6379/1?db=2", "database given twice"),
        ("redis://127.0.0.1:6379?colour=red", "unknown option(s) colour"),
        ("redis://127.0.0.1:1,127.0.0.1:2", "exactly one host:port"),
        ("valkey://", "exactly one host:port"),
        ("unix://127.0.0.1:6379", "unix:///path/to/redis.sock"),
        ("rediss://127.0.0.1:6380?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
        ("redis-sentinel:///mymaster", "redis-sentinel://h1:p1"),
        ("redis-cluster://127.0.0.1:7000/3", "only database 0"),
        ("redis://127.0.0.1:6379?threads=0", "threads '0'"),
    ],
)
def test_bad_urls_get_one_line_errors(url: str, message: str) -> None:
    with pytest.raises(URLError) as err:
        create_connector(url)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_url_forms_parse_to_the_right_options() -> None:
    conn = create_connector("redis://u:p@127.0.0.1:6400/3?threads=2")
    assert isinstance(conn, RedisConnector)
    assert (conn.options.db, conn.options.username, conn.options.password, conn.blocking_threads) == (3, "u", "p", 2)
    assert create_connector("unix:///run/redis.sock?db=5").options.db == 5
    assert create_connector("redis-sentinel://127.0.0.1:1,127.0.0.1:2/svc").options.service_name == "svc"
    assert create_connector("redis-sentinel://127.0.0.1:1").options.service_name == "mymaster"
    tls = create_connector("rediss://127.0.0.1:1?ssl_ca_certs=/ca.pem&ssl_cert_reqs=optional").options.ssl
    assert tls == {"ssl_cert_reqs": "optional", "ssl_ca_certs": "/ca.pem", "ssl_check_hostname": True}


def test_zero_copy_packer_passes_large_values_through() -> None:
    packer = ZeroCopyPacker()
    big = bytearray(os.urandom(packer.cutoff + 1))
    parts = packer.pack("SET", "k", memoryview(big))
    head = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % len(big)
    assert b"".join(bytes(p) for p in parts) == head + bytes(big) + b"\r\n"
    assert any(isinstance(p, memoryview) and p.obj is big for p in parts), "the value must not be copied"
    expected = b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$1\r\nx\r\n$1\r\n7\r\n"
    assert b"".join(packer.pack("CLIENT SETNAME", "x", 7)) == expected


CONFIGS = ["redis", "redis-cachegen", "redis-sentinel", "redis-cluster", "valkey", "rediss", "fs", "blackhole"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load_and_build_their_connector(name: str) -> None:
    from pathlib import Path

    from vllm_kvcache_plugin.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    config = load_config(env={"LMCACHE_CONFIG_FILE": str(path)})
    conn = create_connector(config.remote_url, config)
    assert conn.url.scheme == config.remote_url.split(":", 1)[0]
    assert all(host in ("127.0.0.1", None) for host, _ in conn.url.hosts), "configs point at loopback only"
