"""The seed's own example, started the way the seed starts it: etcd, a Mooncake master, vLLM with
``LMCacheConnector`` and Mooncake Store as the remote, CacheGen serde, chunk size 16, the seed's
environment verbatim (only ports are free ones on 127.0.0.1) and its ``mooncake.json`` keys; then
the seed's two identical requests. vLLM V1 would answer the second from its own prefix cache, so
that is turned off: the second answer must come from Mooncake, as it did in the seed (vLLM V0).
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from testbed.events import hits_for, requests
from testbed.mooncake_servers import start_etcd, start_mooncake_master
from testbed.vllm_process import VLLMServer, clean_env, ensure_model
from tests.e2e_scenario import greedy_margins

pytest.importorskip("mooncake.store", reason="mooncake-transfer-engine(-non-cuda) is not installed")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SEED_PROMPT = "San Francisco is a 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"


def test_seed_example_mooncake_cachegen(tmp_path):
    etcd = start_etcd()
    master = start_mooncake_master()
    try:
        port = master.address.rsplit(":", 1)[1]
        config = tmp_path / "mooncake.json"  # the seed's file, pointing at this test's servers
        config.write_text(json.dumps({
            "local_hostname": "localhost",
            "metadata_server": etcd.url.replace("127.0.0.1", "localhost"),
            "protocol": "tcp",
            "device_name": "",
            "master_server_address": f"localhost:{port}",
        }, indent=4))
        env = clean_env(
            VLLM_USE_V1="0", MOONCAKE_CONFIG_PATH=str(config),
            LMCACHE_USE_EXPERIMENTAL="True", LMCACHE_TRACK_USAGE="false",
            LMCACHE_CHUNK_SIZE="16", LMCACHE_LOCAL_CPU="False", LMCACHE_MAX_LOCAL_CPU_SIZE="5.0",
            LMCACHE_REMOTE_URL=f"mooncakestore://localhost:{port}/",
            LMCACHE_REMOTE_SERDE="cachegen",
        )
        model = str(ensure_model())
        server = VLLMServer(env, name="vllm-seed", log_dir=str(tmp_path), extra_args=(
            "--served-model-name", "facebook/opt-125m", "--trust-remote-code", "--no-enable-prefix-caching"))
        with server:
            server.model = "facebook/opt-125m"
            first = server.complete(SEED_PROMPT, max_tokens=10, logprobs=2)
            second = server.complete(SEED_PROMPT, max_tokens=10, logprobs=2)
            log = server.log()
            # Listed while vLLM runs: in the seed's set-up vLLM's own client owns the Mooncake segment,
            # and a graceful shutdown (--shutdown-timeout) unmounts it, taking its values along.
            with urllib.request.urlopen(f"http://{master.metrics_address}/get_all_keys", timeout=5) as reply:
                keys = [k for k in reply.read().decode().splitlines() if k]
        # bf16 and a lossy serde: comparing texts is fair only because counting on is no near-tie.
        # Every step's margin was 2.9 nats or more (float32 and bf16 alike); CacheGen moves a
        # logprob by ~0.2 (benchmarks/bench_cachegen_float32.py), bf16 noise by < 0.1.
        assert min(greedy_margins(first)) > 1.0, "the seed's prompt no longer has a clear continuation"
        assert first["choices"][0]["text"] == second["choices"][0]["text"]
        assert first["choices"][0]["text"].startswith(" 16 17 18")
        miss = requests(log, first["id"])[0]
        assert miss["loaded_tokens"] == 0
        assert hits_for(log, second["id"]) == [first["usage"]["prompt_tokens"] - 1]
        # The seed's key format: the model's path (not its served name), world size 1, rank 0.
        assert keys and all(re.fullmatch(rf"vllm@{re.escape(model)}@1@0@[0-9a-f]{{64}}", k) for k in keys)
        assert len(keys) == -(-first["usage"]["prompt_tokens"] // 16)  # chunks of 16, the last one partial
    finally:
        master.stop()
        etcd.stop()
