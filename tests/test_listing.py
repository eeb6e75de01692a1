"""``scan`` / ``batched_size`` / ``batched_delete`` (what ``vllm-kvcache inspect`` and ``purge`` use)
against real stores: redis standalone, sentinel and cluster, fs:// and a Mooncake master."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis

from testbed.processes import LOOPBACK, wait_for
from testbed.redis_servers import RedisNode, free_ports, start_redis_cluster
from vllm_kvcache_plugin.config import load_config
from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.connectors.base import KeyPage, RemoteConnector
from vllm_kvcache_plugin.connectors.fs import escape_key
from vllm_kvcache_plugin.errors import ConnectorError


def key(model: str, i: int) -> str:
    return f"vllm@{model}@1@0@{i:064x}"


def values(model: str, count: int) -> dict[str, bytes]:
    """``count`` keys of ``model`` with values of different sizes (never empty: a chunk has a header)."""
    return {key(model, i): os.urandom(1 + (i * 37) % 300) for i in range(count)}


async def scan_all(conn: RemoteConnector, prefix: str, page_size: int) -> list[KeyPage]:
    return [page async for page in conn.scan(prefix, page_size)]


def sizes_of(pages: list[KeyPage]) -> dict[str, int]:
    seen: dict[str, int] = {}
    for page in pages:
        assert page.keys and page.sizes is not None, "an empty page, or one without sizes"
        seen.update(zip(page.keys, page.sizes, strict=True))
    return seen


async def check_listing(conn: RemoteConnector, model_a: str, model_b: str, count: int, page_size: int,
                        most_per_page: int | None) -> None:
    """Two models' keys put; scan, sizes and delete seen per model. ``most_per_page``: the store's bound
    on a page (None where it is only a hint, as redis's COUNT)."""
    a, b = values(model_a, count), values(model_b, count // 3)
    await conn.batched_put([*a.items(), *b.items()])

    pages = await scan_all(conn, f"vllm@{model_a}@", page_size)
    assert sizes_of(pages) == {k: len(v) for k, v in a.items()}
    assert len(pages) > 1, "more keys than a page came in one page"
    if most_per_page is not None:
        assert max(len(p.keys) for p in pages) <= most_per_page

    missing = key(model_a, count + 1)
    first, second = list(a)[:2]
    assert await conn.batched_size([first, missing, second]) == [len(a[first]), None, len(a[second])]
    assert await conn.batched_size([]) == []
    assert await conn.batched_delete([first, missing, second]) == [True, False, True]
    assert await conn.batched_delete([]) == []
    assert await conn.batched_size([first, second]) == [None, None]

    left = sizes_of(await scan_all(conn, f"vllm@{model_a}@", page_size))
    assert left == {k: len(v) for k, v in a.items() if k not in (first, second)}
    assert sizes_of(await scan_all(conn, f"vllm@{model_b}@", page_size)) == {k: len(v) for k, v in b.items()}
    assert await scan_all(conn, "vllm@no-such-model@", page_size) == []


async def with_connector(conn: RemoteConnector, body: Callable[[RemoteConnector], Awaitable[None]]) -> None:
    await conn.connect()
    try:
        await body(conn)
    finally:
        await conn.close()


# -- redis family -----------------------------------------------------------------------------------
REDIS_TARGETS = ["fresh_redis", "fresh_redis_sentinel", "fresh_redis_cluster"]


@pytest.fixture(params=REDIS_TARGETS, ids=["redis", "sentinel", "cluster"])
def redis_url(request) -> str:
    return request.getfixturevalue(request.param).url


@pytest.mark.timeout(60)
def test_redis_scan_sizes_and_delete(redis_url: str) -> None:
    conn = create_connector(redis_url)
    assert conn.listing == "paged"
    asyncio.run(with_connector(conn, lambda c: check_listing(c, "model-a", "model-b", 500, 50, None)))


@pytest.mark.timeout(60)
def test_redis_scan_matches_glob_characters_literally(redis_url: str) -> None:
    literal, lookalike = "mo*del[1]?\\", "moXdel1Z\\"  # the second would match the first as a glob

    async def body(conn: RemoteConnector) -> None:
        a, b = values(literal, 20), values(lookalike, 20)
        await conn.batched_put([*a.items(), *b.items()])
        for prefix in (f"vllm@{literal}@", "vllm@mo*", "vllm@mo*del[1]?"):
            assert sizes_of(await scan_all(conn, prefix, 7)) == {k: len(v) for k, v in a.items()}, prefix
        assert sizes_of(await scan_all(conn, "vllm@moX", 7)) == {k: len(v) for k, v in b.items()}

    asyncio.run(with_connector(create_connector(redis_url), body))


@pytest.mark.timeout(60)
def test_redis_scan_skips_keys_of_other_types(fresh_redis) -> None:
    async def body(conn: RemoteConnector) -> None:
        await conn.put(key("m", 1), b"value")
        fresh_redis.client().rpush(key("m", 2), b"a list, not a value")
        assert sizes_of(await scan_all(conn, "vllm@m@", 10)) == {key("m", 1): 5}
        assert await conn.batched_size([key("m", 2)]) == [None]

    asyncio.run(with_connector(create_connector(fresh_redis.url), body))


@pytest.mark.timeout(90)
def test_redis_cluster_scan_counts_replicated_keys_once() -> None:
    """A replica holds its primary's keys too: only primaries are scanned."""
    cluster = start_redis_cluster()
    primary = cluster.nodes[0]
    port, bus_port = free_ports(2)
    replica = RedisNode("cluster-replica", port, str(Path(primary.workdir).parent / "replica"),
                        ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", "3000", "--cluster-port", str(bus_port)])
    os.makedirs(replica.workdir)
    try:
        primary_id = primary.call(lambda c: c.cluster("myid"))
        primary_bus_port = primary.args[list(primary.args).index("--cluster-port") + 1]
        replica.start()
        replica.call(lambda c: c.execute_command("CLUSTER MEET", LOOPBACK, primary.port, primary_bus_port))

        def replicate() -> bool:  # refused ("Unknown node") until the meeting has gone round
            try:
                return bool(replica.call(lambda c: c.execute_command("CLUSTER REPLICATE", primary_id)))
            except redis.ResponseError:
                return False

        wait_for(replicate, 20, "the new node to become a replica", interval=0.1)
        wait_for(lambda: replica.call(lambda c: c.info("replication")).get("master_link_status") == "up", 20,
                 "the replica to sync", interval=0.1)

        def slot_map_names_replica(node: RedisNode) -> bool:  # what the connector's client reads at start
            slots = node.call(lambda c: c.execute_command("CLUSTER SLOTS"))
            return any(int(r[1]) == replica.port for _lo, _hi, _primary, *replicas in slots for r in replicas)

        wait_for(lambda: all(slot_map_names_replica(n) for n in cluster.nodes), 20, "the slot map to name the "
                 "replica", interval=0.1)
        items = values("model-a", 300)

        async def body(conn: RemoteConnector) -> None:
            await conn.batched_put(list(items.items()))
            held = primary.call(lambda c: c.dbsize())
            wait_for(lambda: replica.call(lambda c: c.dbsize()) == held, 20, "the replica to copy", interval=0.1)
            assert held > 0
            pages = await scan_all(conn, "vllm@model-a@", 50)
            listed = [k for page in pages for k in page.keys]
            assert sorted(listed) == sorted(items), "a key missed or counted twice"

        asyncio.run(with_connector(create_connector(cluster.url), body))
    finally:
        replica.stop()
        cluster.stop()


# -- fs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_a", ["model-a", "a" * 250], ids=["short", "long-name-folders"])
def test_fs_scan_sizes_and_delete(tmp_path: Path, model_a: str) -> None:
    conn = create_connector(f"fs://{tmp_path}/store")
    assert conn.listing == "paged"
    asyncio.run(with_connector(conn, lambda c: check_listing(c, model_a, "model-b", 30, 7, 7)))


def test_fs_scan_skips_temporary_files(tmp_path: Path) -> None:
    async def body(conn: RemoteConnector) -> None:
        await conn.put(key("m", 1), b"value")
        (tmp_path / f".{escape_key(key('m', 2))}.tmp").write_bytes(b"half a val")  # a writer killed mid-write
        assert sizes_of(await scan_all(conn, "vllm@m@", 10)) == {key("m", 1): 5}

    asyncio.run(with_connector(create_connector(f"fs://{tmp_path}"), body))


# -- mooncake ---------------------------------------------------------------------------------------
def mooncake_connector(cluster, without: tuple[str, ...] = ()) -> RemoteConnector:
    options = {k: v for k, v in cluster.options().items() if k not in without}
    config = load_config(extra_config={"remote_options": options, "blocking_timeout_secs": 5}, env={})
    return create_connector(cluster.master.url, config)


@pytest.fixture()
def mooncake(monkeypatch, mooncake_p2p):
    pytest.importorskip("mooncake.store", reason="mooncake-transfer-engine(-non-cuda) is not installed")
    monkeypatch.delenv("MOONCAKE_CONFIG_PATH", raising=False)
    return mooncake_p2p


@pytest.mark.timeout(60)
def test_mooncake_scan_sizes_and_delete(mooncake) -> None:
    conn = mooncake_connector(mooncake)
    assert conn.listing == "one reply"
    tag = uuid.uuid4().hex[:8]  # the master is shared by the session
    asyncio.run(with_connector(conn, lambda c: check_listing(c, f"model-a-{tag}", f"model-b-{tag}", 60, 25, 25)))


def test_mooncake_scan_without_metrics_address_says_what_is_missing(mooncake) -> None:
    conn = mooncake_connector(mooncake, without=("metrics_address",))

    async def body() -> None:
        with pytest.raises(ConnectorError, match="scan needs metrics_address"):
            await scan_all(conn, "vllm@", 10)
        await conn.close()

    asyncio.run(body())
