"""The stores bench_connectors.py measures: each started on 127.0.0.1 (testbed/ launchers) with the
raw client it is compared against (redis-py, plain files, Mooncake's own client, nothing for
blackhole) and, for redis, a counter of the reads the server processed (one round trip proof)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

LMCACHE_REF = {"get": 3.2, "put": 1.44, "exists": 0.19}  # GB/s, GB/s, ms: LMCache 0.5.6 lm://, 256 tokens


class CaseSkipped(Exception):
    """A case that cannot run here (a server missing or not ready): reported, not fatal."""


# -- raw clients: the same bytes through the store's own client --------------------------------
class RawClient(Protocol):
    label: str

    def put(self, key: str, value: bytes) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def exists(self, key: str) -> bool: ...
    def exists_batch(self, keys: list[str]) -> list[bool]: ...
    def close(self) -> None: ...


class RedisRaw:
    """redis-py (sync, hiredis), as a user would call it; a cluster client works the same way."""

    def __init__(self, client: Any, label: str, cluster: bool = False) -> None:
        self.client, self.label, self.cluster = client, label, cluster

    def put(self, key: str, value: bytes) -> None:
        self.client.set(key, value)

    def get(self, key: str) -> bytes | None:
        return self.client.get(key)

    def exists(self, key: str) -> bool:
        return bool(self.client.exists(key))

    def exists_batch(self, keys: list[str]) -> list[bool]:
        pipe = self.client.pipeline() if self.cluster else self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [bool(x) for x in pipe.execute()]

    def close(self) -> None:
        self.client.close()


class FileRaw:
    label = "plain file read/write"

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key.replace("/", "%2F"))

    def put(self, key: str, value: bytes) -> None:
        with open(self._path(key), "wb") as fh:
            fh.write(value)

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def exists_batch(self, keys: list[str]) -> list[bool]:
        return [self.exists(k) for k in keys]

    def close(self) -> None:
        pass


class MooncakeRaw:
    """MooncakeDistributedStore's own calls, on a second client of the same master and segment owner.
    Writes use upsert, as the case's connector does (``?overwrite=true``): Mooncake never replaces
    a key, so plain puts would move no bytes after the first pass over the same keys."""

    label = "MooncakeDistributedStore upsert/get"

    def __init__(self, store: Any) -> None:
        self.store = store

    def put(self, key: str, value: bytes) -> None:
        if self.store.upsert(key, value) != 0:
            raise RuntimeError(f"raw Mooncake upsert of {key} failed")

    def get(self, key: str) -> bytes | None:
        return self.store.get(key) or None

    def exists(self, key: str) -> bool:
        return self.store.is_exist(key) == 1

    def exists_batch(self, keys: list[str]) -> list[bool]:
        return [code == 1 for code in self.store.batch_is_exist(keys)]

    def close(self) -> None:
        self.store.close()


# -- cases -----------------------------------------------------------------------------------
@dataclass
class Target:
    url: str
    raw: RawClient | None = None
    reference: dict[str, float] | None = None  # another system's figures for the 256-token rows
    reference_label: str = ""
    count_round_trips: Callable[[Callable[[], None]], int] | None = None


@dataclass(frozen=True)
class Case:
    name: str
    start: Callable[[ExitStack, str], Target]  # (cleanup stack, scratch folder) -> running target


def _redis_fixtures():
    from testbed import redis_servers

    return redis_servers


def _start_guarded(start: Callable[[], Any]) -> Any:
    """A case whose server this machine lacks (testbed.Unavailable) or cannot start is skipped."""
    try:
        return start()
    except (RuntimeError, TimeoutError) as exc:  # testbed.Unavailable is a RuntimeError
        raise CaseSkipped(" ".join(str(exc).split())[:300]) from None


def _reads_counter(nodes: list[Any]) -> Callable[[Callable[[], None]], int]:
    """Read events the servers processed during an action (INFO's own reads subtracted),
    fewest over 3 trials: the proof that a batch is one round trip per node."""

    def reads(clients: list[Any]) -> list[int]:
        return [int(c.info("stats")["total_reads_processed"]) for c in clients]

    def count(action: Callable[[], None]) -> int:
        import gc

        clients = [n.client() for n in nodes]
        try:
            trials = []
            for _ in range(3):
                gc.collect()
                base = [b - a for a, b in zip(reads(clients), reads(clients), strict=True)]
                start = reads(clients)
                action()
                end = reads(clients)
                trials.append(sum(e - s - d for s, e, d in zip(start, end, base, strict=True)))
            return min(trials)
        finally:
            for c in clients:
                c.close()

    return count


def start_lm(stack: ExitStack, scratch: str) -> Target:
    from testbed.processes import ManagedProcess, free_port, port_open, wait_for

    port = free_port()
    argv = [sys.executable, "-m", "vllm_kvcache_plugin.server", "--host", "127.0.0.1", "--port", str(port),
            "--max-size-gb", "4"]
    proc = ManagedProcess("lm-server", argv, cwd=str(REPO), log_dir=scratch).start()
    stack.callback(proc.stop)
    try:
        wait_for(lambda: port_open(port) or not proc.alive(), 30, "the lm server")
    except TimeoutError:
        pass
    if not proc.alive() or not port_open(port):
        tail = " | ".join(proc.log_tail(5).splitlines())
        raise CaseSkipped(f"the lm server did not start (python -m vllm_kvcache_plugin.server): {tail[:300]}")
    return Target(f"lm://127.0.0.1:{port}", reference=LMCACHE_REF,
                  reference_label="LMCache 0.5.6 lm:// (measured here before)")


def start_redis(stack: ExitStack, scratch: str) -> Target:
    fixtures = _redis_fixtures()
    server = _start_guarded(lambda: fixtures.start_redis("bench-redis", workdir=scratch))
    stack.callback(server.stop)
    raw = RedisRaw(server.client(socket_timeout=30), "redis-py GET/SET")
    stack.callback(raw.close)
    return Target(server.url, raw, count_round_trips=_reads_counter([server.node]))


def start_redis_cluster(stack: ExitStack, scratch: str) -> Target:
    from redis.cluster import ClusterNode, RedisCluster

    fixtures = _redis_fixtures()
    cluster = _start_guarded(fixtures.start_redis_cluster)
    stack.callback(cluster.stop)
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in cluster.nodes], socket_timeout=30)
    raw = RedisRaw(client, "redis-py cluster GET/SET", cluster=True)
    stack.callback(raw.close)
    return Target(cluster.url, raw, count_round_trips=_reads_counter(cluster.nodes))


def start_fs(stack: ExitStack, scratch: str) -> Target:
    return Target(f"fs://{scratch}/connector", FileRaw(os.path.join(scratch, "raw")))


def start_blackhole(stack: ExitStack, scratch: str) -> Target:
    return Target("blackhole://")


def start_mooncake(stack: ExitStack, scratch: str) -> Target:
    """A master and a mooncake_client that owns the memory (the layout that survives a vLLM
    restart); the connector and the raw client add no segment, so both cross loopback TCP."""
    try:
        from mooncake.store import MooncakeDistributedStore

        from testbed import mooncake_servers as mc
    except ImportError as exc:
        raise CaseSkipped(f"{exc}: pip install 'vllm-kvcache-plugin[mooncake-cpu]'") from None
    master = _start_guarded(mc.start_mooncake_master)
    stack.callback(master.stop)
    owner = _start_guarded(lambda: mc.start_standalone_client(master, "P2PHANDSHAKE", segment="2GB"))
    stack.callback(owner.stop)
    config = mc.MooncakeCluster(master, "P2PHANDSHAKE", Path(scratch)).write_config(
        global_segment_size=0, local_buffer_size="256MB")
    os.environ["MOONCAKE_CONFIG_PATH"] = str(config)  # read by the connector run_case creates
    stack.callback(os.environ.pop, "MOONCAKE_CONFIG_PATH", None)
    store = MooncakeDistributedStore()
    if store.setup("127.0.0.1", "P2PHANDSHAKE", 0, 256 << 20, "tcp", "", master.address) != 0:
        raise CaseSkipped("the raw Mooncake client could not set up")
    raw = MooncakeRaw(store)
    stack.callback(raw.close)
    return Target(f"{master.url}?overwrite=true", raw)


CASES: list[Case] = [
    Case("lm", start_lm),
    Case("redis", start_redis),
    Case("redis-cluster", start_redis_cluster),
    Case("fs", start_fs),
    Case("blackhole", start_blackhole),
    Case("mooncake", start_mooncake),
]


# -- measurement -----------------------------------------------------------------------------
