"""End to end on vLLM's CPU build with only the local disk tier, configured by LMCACHE_CONFIG_FILE."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e_scenario import *  # noqa: F403 - the shared scenario's tests run against this backend
from tests.e2e_scenario import Backend
from vllm_kvcache_plugin.storage.disk import file_name


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    folder = tmp_path_factory.mktemp("disk-tier")
    conf = tmp_path_factory.mktemp("conf") / "disk.yaml"
    conf.write_text(f"chunk_size: 256\nlocal_cpu: false\nlocal_disk: file://{folder}\nmax_local_disk_size: 2\n")

    def read_value(key):
        path = folder / file_name(key)
        return path.read_bytes() if path.exists() else None

    def break_store():
        # Files vanish underneath the worker: its index still claims them, so the load fails and
        # vLLM must recompute the blocks (the load-error path), never produce a wrong token.
        shutil.rmtree(folder)
        folder.mkdir()

    yield Backend("disk", {"LMCACHE_CONFIG_FILE": str(conf)}, None, read_value, break_store,
                  sees_later_writes=False)
