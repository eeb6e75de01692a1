"""End to end on vLLM's CPU build with mooncakestore:// as the store (float32, no hot cache): a
master plus a standalone mooncake_client that owns the memory, so the cache outlives vLLM."""

from __future__ import annotations

import pytest

from testbed.mooncake_servers import MooncakeDeployment
from tests.e2e_scenario import *  # noqa: F403 - the shared scenario's tests run against this backend
from tests.e2e_scenario import Backend


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    store = MooncakeDeployment(tmp_path_factory.mktemp("mooncake-e2e"))
    try:
        yield Backend(
            name="mooncake",
            env={**store.env, "LMCACHE_LOCAL_CPU": "False", "LMCACHE_BLOCKING_TIMEOUT_SECS": "1"},
            list_keys=lambda: [k for k in store.keys() if k.startswith("vllm@")],  # noqa: SIM118 - a method
            read_value=store.read,
            break_store=store.master.stop,
        )
    finally:
        store.stop()
