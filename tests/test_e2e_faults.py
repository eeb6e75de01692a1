"""The store dies under load and comes back, while one vLLM keeps serving (float32, real redis).

vLLM's own prefix caching is off, so a repeated prompt can only be a hit from our store: that is
how the test sees hits resume after the store returns, without restarting vLLM.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from testbed import prompts
from testbed.events import hits_for
from testbed.redis_servers import start_redis
from testbed.vllm_process import VLLMServer, clean_env
from tests.e2e_scenario import FAMILY, MAX_TOKENS, UNSEEN

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_store_killed_under_load_then_back(tmp_path, reference):
    (tmp_path / "redis").mkdir()
    redis = start_redis("redis-fault", str(tmp_path / "redis"))
    env = clean_env(LMCACHE_REMOTE_URL=redis.url, LMCACHE_LOCAL_CPU="False", LMCACHE_BLOCKING_TIMEOUT_SECS="1")
    server = VLLMServer(env, dtype="float32", name="vllm-faults", log_dir=str(tmp_path),
                        extra_args=("--no-enable-prefix-caching",))
    try:
        server.start()
        # In-flight requests while the store is killed.
        killer = threading.Timer(1.0, redis.node.kill)
        killer.start()
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda p: server.text(p, MAX_TOKENS), FAMILY[:8]))
        killer.join()
        assert texts == [reference[p] for p in FAMILY[:8]]
        # Following requests, store still down: a miss each, same answers, no long stall.
        start = time.monotonic()
        assert server.text(UNSEEN, MAX_TOKENS) == reference[UNSEEN]
        assert server.text(FAMILY[9], MAX_TOKENS) == reference[FAMILY[9]]
        assert time.monotonic() - start < 60

        redis.node.start()  # back, empty, on the same port
        deadline = time.monotonic() + 120
        attempt = 0
        while True:
            probe = prompts.text(300, offset=20000 + 500 * attempt)
            first = server.complete(probe, 4)
            second = server.complete(probe, 4)
            if hits_for(server.log(), second["id"]):
                assert second["choices"][0]["text"] == first["choices"][0]["text"]
                break
            attempt += 1
            assert time.monotonic() < deadline, "saves and hits did not resume after the store came back"
            time.sleep(3)
    finally:
        server.stop()
        redis.stop()
