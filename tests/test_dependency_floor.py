"""The lowest redis-py that pyproject.toml allows really works: the redis connector tests run once
against it (installed into a scratch folder that shadows the newer one). The code needs >= 5.3:
``ConnectionPool.get_connection()`` without arguments arrived there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def pinned_floor(package: str) -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(rf'"{package}(?:\[[^\]]*\])?>=([0-9.]+)"', text)
    assert match, f"pyproject.toml does not pin a lowest {package}"
    return match.group(1)


def test_redis_connector_works_on_the_lowest_pinned_redis_py(tmp_path):
    floor = pinned_floor("redis")
    assert tuple(map(int, floor.split("."))) >= (5, 3), "the connector calls get_connection() with no arguments"
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              f"redis=={floor}"], capture_output=True, text=True, timeout=300)
    if install.returncode != 0:
        pytest.skip(f"cannot install redis=={floor} here: {install.stderr.strip().splitlines()[-1:]}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    probe = subprocess.run([sys.executable, "-c", "import redis; print(redis.__version__)"], env=env,
                           capture_output=True, text=True, check=True)
    assert tuple(map(int, probe.stdout.strip().split("."))) == (*map(int, floor.split(".")), 0)[:3], probe.stdout
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "test_redis_connector.py")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
