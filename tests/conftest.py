"""Shared pytest set-up. Server fixtures live in tests/fixtures/ (one module per kind of server)."""

from __future__ import annotations

import os

# Keep tests deterministic and quiet about threads on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = [
    "tests.fixtures.redis_servers",
    "tests.fixtures.lm_server",
    "tests.fixtures.mooncake_servers",
    "tests.fixtures.vllm_server",
]
