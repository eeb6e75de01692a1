"""vLLM's own in-tree ``MooncakeStoreConnector`` against a ``MooncakeDeployment``: the peer our
connector's Mooncake numbers are compared with (benchmarks/bench_ttft.py, store ``peer``).

The peer reads no URL and none of our settings: only the JSON file named by ``MOONCAKE_CONFIG_PATH``
(vllm/distributed/mooncake_store.py). ``"mode": "standalone-store"`` with ``global_segment_size`` 0
is its name for our layout (vLLM's client adds no memory; the deployment's ``mooncake_client`` owns
the segment), so the KV outlives a vLLM restart; its default, ``embedded``, puts the segment in the
vLLM worker, and a restarted vLLM finds nothing. A hit shows in vLLM's own metrics:
``vllm:external_prefix_cache_hits_total`` and ``vllm:mooncake_store_operation_bytes_total`` with
``operation="load_get"`` (and the log line's "External prefix cache hit rate").
"""

from __future__ import annotations

import json
from pathlib import Path

from testbed.mooncake_servers import MooncakeDeployment
from testbed.processes import LOOPBACK

# No extra config needed: lookups and loads are synchronous / asynchronous as vLLM defaults them.
PEER_CONNECTOR = {"kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both"}


def write_peer_config(store: MooncakeDeployment, config_dir: Path) -> Path:
    """The peer's mooncake.json, a file of its own: it needs ``mode``, a key our connector's
    strict parser of the same file rejects. ``local_buffer_size`` must be > 0 (vLLM's check); 64MB,
    as our client's, instead of vLLM's 4 GiB default, since the peer transfers straight from the
    registered KV cache."""
    config = {"metadata_server": store.cluster.metadata_server, "master_server_address": store.master.address,
              "protocol": "tcp", "device_name": "", "mode": "standalone-store", "global_segment_size": 0,
              "local_buffer_size": "64MB"}
    path = config_dir / "peer-mooncake.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def peer_env(store: MooncakeDeployment, config_dir: Path) -> dict[str, str]:
    """What vLLM's environment needs for the peer. MOONCAKE_REQUESTER_LOCAL_HOSTNAME: else the
    peer registers its transfer engine under vLLM's get_ip(), the machine's outward address, while
    the master and the segment owner are on loopback (and testbed keeps all traffic there).
    VLLM_RPC_BASE_PATH moves its scheduler-to-worker lookup socket
    (``ipc://<base>/lookup_rpc_port_0_host_<hostname>_dp_rank0``, the same path for every vLLM on
    the machine) out of the shared /tmp, so two peers on one machine do not collide."""
    return {"MOONCAKE_CONFIG_PATH": str(write_peer_config(store, config_dir)),
            "MOONCAKE_REQUESTER_LOCAL_HOSTNAME": LOOPBACK, "VLLM_RPC_BASE_PATH": str(config_dir)}
