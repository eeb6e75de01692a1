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


@pytest.fixture(scope="session")
def cpp_lib():
    """The CacheGen C++ coder, built (or found built) once; without a C++ compiler its tests skip."""
    rans_cpp = pytest.importorskip("vllm_kvcache_plugin.serde.cachegen.rans_cpp")
    lib = rans_cpp.load_library()
    if lib is None:
        pytest.skip("no C++ compiler here: the C++ coder cannot be built")
    return lib
