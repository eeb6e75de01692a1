"""Shared pytest set-up. Server fixtures live in tests/fixtures/ (one module per kind of server), over
the launchers in testbed/ (shared with the benchmarks and the demo)."""

from __future__ import annotations

import os

import pytest

from testbed import Unavailable

# Keep tests deterministic and quiet about threads on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = [
    "tests.fixtures.redis_servers",
    "tests.fixtures.lm_server",
    "tests.fixtures.mooncake_servers",
    "tests.fixtures.vllm_server",
]


def _skip_when_unavailable(item):
    """A server or tool this machine lacks (testbed.Unavailable) skips the test, saying which:
    while fixtures start servers (setup) and while the test starts its own (call)."""
    try:
        return (yield)
    except Unavailable as exc:
        pytest.skip(str(exc))


pytest_runtest_setup = pytest_runtest_call = pytest.hookimpl(wrapper=True)(_skip_when_unavailable)
