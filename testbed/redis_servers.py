"""Real Redis servers for the tests and benchmarks: standalone (TCP + unix socket), a sentinel set, a 3-master
cluster and a TLS server, each on 127.0.0.1 free ports, started with Debian's redis-server /
redis-sentinel and stopped by PID.

Each ``start_*`` function returns an object with ``.url`` (for ``create_connector``) and ``stop()``;
tests/fixtures/redis_servers.py wraps them in pytest fixtures. A missing binary raises
:class:`testbed.Unavailable` (a skip in the tests).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from testbed import Unavailable
from testbed.processes import LOOPBACK, ManagedProcess, free_port, port_open, wait_for

START_TIMEOUT = 20.0
T = TypeVar("T")


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise Unavailable(f"{binary} is not installed "
                          "(make test installs it: apt-get install redis-server redis-sentinel)")
    return path


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports."""
    ports: list[int] = []
    for _ in range(count * 20):  # bounded: free_port() may repeat a port just released
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"could not find {count} distinct free ports")


@dataclass
class RedisNode:
    """One redis-server process we started; restartable on the same port and folder."""

    name: str
    port: int
    workdir: str
    args: Sequence[str] = ()
    tls_client_kwargs: dict[str, Any] | None = None
    proc: ManagedProcess | None = None

    def argv(self) -> list[str]:
        base = [_require("redis-server"), "--bind", LOOPBACK, "--save", "", "--appendonly", "no", "--dir", self.workdir]
        if self.tls_client_kwargs is None:
            base += ["--port", str(self.port)]
        return base + list(self.args)

    def start(self) -> RedisNode:
        self.proc = ManagedProcess(self.name, self.argv(), log_dir=self.workdir).start()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:  # bounded wait; a crashed server fails at once
            if not self.proc.alive():
                break
            if port_open(self.port) and self._ping():
                return self
            time.sleep(0.05)
        tail = self.proc.log_tail()
        self.stop()
        raise RuntimeError(f"{self.name} did not start on 127.0.0.1:{self.port}:\n{tail}")

    def _ping(self) -> bool:
        try:
            return bool(self.call(lambda c: c.ping(), socket_timeout=1))
        except (redis.RedisError, OSError):
            return False

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 5)
        return redis.Redis(host=LOOPBACK, port=self.port, **(self.tls_client_kwargs or {}), **kwargs)

    def call(self, fn: Callable[[redis.Redis], T], **kwargs: Any) -> T:
        """``fn(client)`` on a client closed right after (no stray sockets closing later in GC)."""
        with self.client(**kwargs) as client:
            return fn(client)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung server)."""
        assert self.proc is not None and self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None and self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> RedisNode:
        self.stop()
        wait_for(lambda: not port_open(self.port), 10, f"port {self.port} to close")
        return self.start()


@dataclass
class _OneNode:
    """A server of one redis-server process: its client, flush and stop."""

    node: RedisNode

    def client(self, **kwargs: Any) -> redis.Redis:
        return self.node.client(**kwargs)

    def flush(self) -> None:
        self.node.call(lambda c: c.flushall())

    def stop(self) -> None:
        self.node.stop()


@dataclass
class StandaloneRedis(_OneNode):
    socket_path: str

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.node.port}"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def valkey_url(self) -> str:
        return f"valkey://{LOOPBACK}:{self.node.port}"


def start_redis(name: str = "redis", workdir: str | None = None) -> StandaloneRedis:
    workdir = workdir or tempfile.mkdtemp(prefix=f"kvtest-{name}-")
    sock = os.path.join(workdir, "redis.sock")
    node = RedisNode(name, free_port(), workdir, ["--unixsocket", sock, "--unixsocketperm", "700"])
    node.start()
    return StandaloneRedis(node, sock)


@dataclass
class SentinelSet:
    """1 master, 1 replica, 3 sentinels (quorum 2) watching ``service``."""

    service: str
    master: RedisNode
    replica: RedisNode
    sentinels: list[ManagedProcess]
    sentinel_ports: list[int]
    workdir: str

    @property
    def url(self) -> str:
        hosts = ",".join(f"{LOOPBACK}:{p}" for p in self.sentinel_ports)
        return f"redis-sentinel://{hosts}/{self.service}"

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.sentinel_ports[index], socket_timeout=2, decode_responses=True)

    def master_port(self) -> int:
        """The master's port as the sentinels see it now."""
        with self.sentinel_client() as client:
            _host, port = client.execute_command("SENTINEL", "get-master-addr-by-name", self.service)
        return int(port)

    def master_node(self) -> RedisNode:
        port = self.master_port()
        return self.master if self.master.port == port else self.replica

    def flush(self) -> None:
        self.master_node().call(lambda c: c.flushall())

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Block until the replica has every write the master has taken (WAIT 1)."""
        acked = self.master_node().call(lambda c: c.execute_command("WAIT", 1, int(timeout * 1000)))
        if acked < 1:
            raise TimeoutError("the replica did not acknowledge the writes")

    def wait_ready_for_failover(self, timeout: float = START_TIMEOUT) -> None:
        """Every sentinel knows the replica and the two other sentinels."""

        def ready() -> bool:
            for i in range(len(self.sentinel_ports)):
                with self.sentinel_client(i) as client:
                    if len(client.execute_command("SENTINEL", "replicas", self.service)) < 1:
                        return False
                    others = client.execute_command("SENTINEL", "sentinels", self.service)
                    if len(others) < len(self.sentinel_ports) - 1:
                        return False
            return True

        wait_for(ready, timeout, "the sentinels to discover the replica and each other", interval=0.2)

    def kill_master_and_wait_failover(self, timeout: float = 30.0) -> int:
        """SIGKILL the master; return the new master's port once a sentinel reports the promotion."""
        old = self.master_node()
        old.kill()
        wait_for(lambda: self.master_port() != old.port, timeout, "a sentinel failover", interval=0.2)
        new = self.master_node()
        wait_for(lambda: new.call(lambda c: c.info("replication")["role"], socket_timeout=1) == "master", timeout,
                 "the promoted replica to act as master", interval=0.1)
        return new.port

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.stop()
        self.replica.stop()
        self.master.stop()


def start_sentinel_set(service: str = "mymaster") -> SentinelSet:
    sentinel_bin = _require("redis-sentinel")
    workdir = tempfile.mkdtemp(prefix="kvtest-sentinel-")
    master_port, replica_port, *sentinel_ports = free_ports(5)
    master = RedisNode("master", master_port, _subdir(workdir, "master"))
    replica = RedisNode("replica", replica_port, _subdir(workdir, "replica"),
                        ["--replicaof", LOOPBACK, str(master_port)])
    sentinels: list[ManagedProcess] = []
    group = SentinelSet(service, master, replica, sentinels, sentinel_ports, workdir)
    try:
        master.start()
        replica.start()
        # Sentinels find replicas through the master's INFO: start them once the link is up.
        wait_for(lambda: master.call(lambda c: c.info("replication")["connected_slaves"]) >= 1, START_TIMEOUT,
                 "the replica to connect")
        for i, port in enumerate(sentinel_ports):
            conf = Path(_subdir(workdir, f"sentinel{i}")) / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind {LOOPBACK}\ndir {conf.parent}\n"
                f"sentinel monitor {service} {LOOPBACK} {master_port} 2\n"
                f"sentinel down-after-milliseconds {service} 1000\n"
                f"sentinel failover-timeout {service} 5000\n"
                f"sentinel parallel-syncs {service} 1\n"
            )
            proc = ManagedProcess(f"sentinel{i}", [sentinel_bin, str(conf)], log_dir=str(conf.parent)).start()
            sentinels.append(proc)
        for i in range(len(sentinel_ports)):
            wait_for(lambda i=i: _closing_ping(group.sentinel_client(i)), START_TIMEOUT, f"sentinel {i}")
        wait_for(lambda: group.master_port() == master_port, START_TIMEOUT, "the sentinels to see the master")
    except BaseException:
        group.stop()
        raise
    return group


@dataclass
class RedisClusterSet:
    """Three masters, no replicas, slots spread by ``redis-cli --cluster create``."""

    nodes: list[RedisNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"{LOOPBACK}:{n.port}" for n in self.nodes)

    def flush(self) -> None:
        for node in self.nodes:
            node.call(lambda c: c.flushall())

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_redis_cluster(masters: int = 3) -> RedisClusterSet:
    cli = _require("redis-cli")
    workdir = tempfile.mkdtemp(prefix="kvtest-cluster-")
    ports = free_ports(2 * masters)
    cluster = RedisClusterSet()
    try:
        for i in range(masters):
            port, bus_port = ports[2 * i], ports[2 * i + 1]
            node = RedisNode(f"cluster{i}", port, _subdir(workdir, f"node{i}"), [
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "3000", "--cluster-port", str(bus_port),
            ])
            cluster.nodes.append(node.start())
        create = [cli, "--cluster", "create", *(f"{LOOPBACK}:{n.port}" for n in cluster.nodes), "--cluster-yes"]
        result = subprocess.run(create, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
        for node in cluster.nodes:
            wait_for(lambda n=node: n.call(lambda c: c.cluster("info")["cluster_state"]) == "ok", START_TIMEOUT,
                     f"cluster node {node.port} to report cluster_state:ok", interval=0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class TLSRedis(_OneNode):
    ca_cert: str
    client_cert: str
    client_key: str

    @property
    def url(self) -> str:
        return f"rediss://{LOOPBACK}:{self.node.port}?ssl_ca_certs={self.ca_cert}"

    @property
    def mutual_tls_url(self) -> str:
        return f"{self.url}&ssl_certfile={self.client_cert}&ssl_keyfile={self.client_key}"


def make_test_certificates(folder: str) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (EC keys: fast)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise Unavailable("openssl is not installed: cannot make the TLS test certificates")
    d = Path(folder)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2", "-subj", "/CN=kvtest-ca", "-out", "ca.crt")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for who in ("server", "client"):
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{who}.key")
        run("req", "-new", "-key", f"{who}.key", "-subj", f"/CN={LOOPBACK}", "-out", f"{who}.csr")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-sha256", "-extfile", "san.ext", "-out", f"{who}.crt")
    return {name: str(d / name) for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def start_tls_redis() -> TLSRedis:
    workdir = tempfile.mkdtemp(prefix="kvtest-tls-")
    certs = make_test_certificates(workdir)
    port = free_port()
    node = RedisNode("redis-tls", port, workdir, [
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", certs["server.crt"],
        "--tls-key-file", certs["server.key"], "--tls-ca-cert-file", certs["ca.crt"], "--tls-auth-clients", "optional",
    ], tls_client_kwargs={"ssl": True, "ssl_ca_certs": certs["ca.crt"]})
    try:
        node.start()
    except RuntimeError as exc:
        text = str(exc).lower()
        if "tls" in text and any(m in text for m in ("bad directive", "not supported", "not available", "failed")):
            raise Unavailable(f"this redis-server was built without TLS: {str(exc).splitlines()[-1]}") from None
        raise
    return TLSRedis(node, certs["ca.crt"], certs["client.crt"], certs["client.key"])


def _closing_ping(client: redis.Redis) -> bool:
    with client:
        return bool(client.ping())


def _subdir(parent: str, name: str) -> str:
    path = os.path.join(parent, name)
    os.makedirs(path, exist_ok=True)
    return path


# -- fixtures --------------------------------------------------------------------------------
