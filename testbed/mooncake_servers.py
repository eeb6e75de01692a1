"""A real ``mooncake_master`` from the installed wheel, Debian's ``etcd`` and Mooncake's standalone
``mooncake_client``, each on 127.0.0.1 and free ports, stopped by PID (tests/fixtures/mooncake_servers.py
wraps them in fixtures). Mooncake's transfer listeners bind every interface whatever host they are given
(see docs/mooncake.md); the tests only ever send traffic to 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import Unavailable
from testbed.processes import LOOPBACK, ManagedProcess, free_port, port_open, wait_for

# Small sizes keep each test client cheap; tests that need others pass overrides.
TEST_CLIENT_OPTIONS = {
    "local_hostname": LOOPBACK,
    "global_segment_size": "64MB",
    "local_buffer_size": "16MB",
    "staging_buffer_size": "32MB",
}


def mooncake_binary(name: str) -> str:
    """Path of a binary shipped inside the ``mooncake`` package (Unavailable if absent)."""
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("mooncake is not installed: pip install 'vllm-kvcache-plugin[mooncake-cpu]'")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise Unavailable(f"{name} is not shipped by the installed mooncake package ({path})")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@dataclass
class MooncakeMaster:
    """A ``mooncake_master`` on 127.0.0.1: RPC port (the URL's port) and admin/metrics port."""

    rpc_port: int
    metrics_port: int
    flags: tuple[str, ...] = ()
    log_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="kvtest-mooncake-"))
    process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.rpc_port}"

    @property
    def metrics_address(self) -> str:
        return f"{LOOPBACK}:{self.metrics_port}"

    @property
    def url(self) -> str:
        return f"mooncakestore://{self.address}/"

    def start(self) -> MooncakeMaster:
        argv = [mooncake_binary("mooncake_master"), f"--rpc_address={LOOPBACK}", f"--rpc_port={self.rpc_port}",
                f"--metrics_host={LOOPBACK}", f"--metrics_port={self.metrics_port}", "--rpc_thread_num=2",
                *self.flags]
        self.process = ManagedProcess("mooncake_master", argv, log_dir=self.log_dir).start()
        try:
            wait_for(lambda: port_open(self.rpc_port) and port_open(self.metrics_port), 20, "mooncake_master")
        except TimeoutError:
            tail = self.process.log_tail()
            self.stop()
            raise RuntimeError(f"mooncake_master did not start:\n{tail}") from None
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def restart(self) -> MooncakeMaster:
        """A fresh master on the same ports (it starts empty: the old one's metadata is gone)."""
        self.stop()
        return self.start()


def start_mooncake_master(*flags: str, rpc_port: int | None = None) -> MooncakeMaster:
    return MooncakeMaster(rpc_port or free_port(), free_port(), tuple(flags)).start()


@dataclass
class EtcdServer:
    """Debian's etcd 3.4, a one-member cluster on 127.0.0.1 with a temporary data dir."""

    client_port: int
    peer_port: int
    data_dir: str
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"etcd://{LOOPBACK}:{self.client_port}"

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_etcd() -> EtcdServer:
    binary = shutil.which("etcd")
    if binary is None:
        raise Unavailable("etcd is not installed (apt-get install etcd-server)")
    client, peer = free_port(), free_port()
    data_dir = tempfile.mkdtemp(prefix="kvtest-etcd-")
    client_url, peer_url = f"http://{LOOPBACK}:{client}", f"http://{LOOPBACK}:{peer}"
    argv = [binary, "--name", "kvtest", "--data-dir", data_dir,
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"kvtest={peer_url}"]
    process = ManagedProcess("etcd", argv).start()
    server = EtcdServer(client, peer, data_dir, process)
    try:
        wait_for(lambda: port_open(client), 20, "etcd")
    except TimeoutError:
        tail = process.log_tail()
        server.stop()
        raise RuntimeError(f"etcd did not start:\n{tail}") from None
    return server


@dataclass
class MooncakeCluster:
    """What a test needs to point a connector at a running master."""

    master: MooncakeMaster
    metadata_server: str
    config_dir: Path

    def options(self, **overrides: Any) -> dict[str, Any]:
        """remote_options for a small test client of this cluster."""
        return {**TEST_CLIENT_OPTIONS, "metadata_server": self.metadata_server,
                "metrics_address": self.master.metrics_address, **overrides}

    def write_config(self, name: str = "mooncake.json", **overrides: Any) -> Path:
        """A mooncake.json (for MOONCAKE_CONFIG_PATH) in the seed's form, plus ``overrides``."""
        data = {"local_hostname": LOOPBACK, "metadata_server": self.metadata_server, "protocol": "tcp",
                "device_name": "", "master_server_address": self.master.address, **overrides}
        path = self.config_dir / name
        path.write_text(json.dumps(data, indent=2))
        return path


def start_standalone_client(master: MooncakeMaster, metadata_server: str, segment: str = "128MB") -> ManagedProcess:
    """Mooncake's ``mooncake_client``: a separate process that owns a segment, so stored values
    outlive the connector's process (the restart case)."""
    port = free_port()
    argv = [mooncake_binary("mooncake_client"), f"--host={LOOPBACK}", f"--port={port}",
            f"--global_segment_size={segment}", "--local_buffer_size=16MB", "--protocol=tcp",
            f"--master_server_address={master.address}", f"--metadata_server={metadata_server}"]
    process = ManagedProcess("mooncake_client", argv, log_dir=master.log_dir).start()
    try:
        wait_for(lambda: "Mounting segment" in process.log_path.read_text(errors="replace"), 20,
                 "mooncake_client to mount its segment", interval=0.1)
    except TimeoutError:
        tail = process.log_tail()
        process.stop()
        raise RuntimeError(f"mooncake_client did not start:\n{tail}") from None
    return process


class MooncakeDeployment:
    """The restart-surviving layout for end-to-end runs: a master, a ``mooncake_client`` that owns
    the memory, and a mooncake.json whose client adds none. ``env`` is what vLLM needs; ``keys`` and
    ``read`` look into the store from the test process."""

    def __init__(self, config_dir: Path, segment: str = "1GB") -> None:
        self.master = start_mooncake_master()
        try:
            self.owner = start_standalone_client(self.master, "P2PHANDSHAKE", segment)
        except BaseException:
            self.master.stop()
            raise
        self.cluster = MooncakeCluster(self.master, "P2PHANDSHAKE", config_dir)
        self.config_path = self.cluster.write_config(global_segment_size=0, local_buffer_size="64MB",
                                                     metrics_address=self.master.metrics_address)
        self._reader: Any = None

    @property
    def env(self) -> dict[str, str]:
        return {"LMCACHE_REMOTE_URL": self.master.url, "MOONCAKE_CONFIG_PATH": str(self.config_path)}

    def keys(self) -> list[str]:
        import urllib.request

        with urllib.request.urlopen(f"http://{self.master.metrics_address}/get_all_keys", timeout=5) as reply:
            return sorted(k for k in reply.read().decode().splitlines() if k)

    def read(self, key: str) -> bytes | None:
        if self._reader is None:
            from mooncake.store import MooncakeDistributedStore

            self._reader = MooncakeDistributedStore()
            rc = self._reader.setup(LOOPBACK, "P2PHANDSHAKE", 0, 64 << 20, "tcp", "", self.master.address)
            assert rc == 0, f"reader setup returned {rc}"
        return self._reader.get(key) or None

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.owner.stop()
        self.master.stop()
