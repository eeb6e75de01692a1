"""``vllm-kvcache check | inspect | purge`` against real stores: lm, redis, redis-cluster, fs, Mooncake.

``check`` runs as the installed console script (exit status and the one line on stderr are what an
operator sees); ``inspect`` and ``purge`` run in-process through ``cli.main`` with ``--json``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.mooncake_servers import MooncakeDeployment
from testbed.processes import free_port
from vllm_kvcache_plugin import cli
from vllm_kvcache_plugin.config import load_config
from vllm_kvcache_plugin.connectors import create_connector
from vllm_kvcache_plugin.keys import ChunkKey

SCRIPT = shutil.which("vllm-kvcache", path=str(Path(sys.executable).parent))
MODEL_A = "team/smol"  # the one purged
MODEL_B = "team/smol-2"  # starts with MODEL_A's name: a purge of MODEL_A must leave it alone
OTHER_KEY = "someone-else:not-a-chunk"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    assert SCRIPT, "the vllm-kvcache console script is not installed next to this Python"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "MOONCAKE_"))}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=120, env={**clean, **env})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vllm-kvcache check: "), result.stderr
    return lines[0]


# -- check --------------------------------------------------------------------------------------
def test_check_a_good_config_prints_each_setting_and_source_and_measures_the_store(fresh_redis, tmp_path):
    conf = tmp_path / "conf.yaml"
    conf.write_text("chunk_size: 128\nlocal_disk: " + str(tmp_path / "disk") + "\n")
    result = run_script("check", "--extra-config", '{"blocking_timeout_secs": 3}',
                        LMCACHE_CONFIG_FILE=str(conf), LMCACHE_REMOTE_URL=fresh_redis.url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    settings = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "128" in settings["chunk_size"] and str(conf) in settings["chunk_size"]
    assert "env LMCACHE_REMOTE_URL" in settings["remote_url"]
    assert "3.0" in settings["blocking_timeout_secs"] and "--extra-config" in settings["blocking_timeout_secs"]
    assert "[default]" in settings["max_local_cpu_size"]
    assert f"Local disk: {tmp_path / 'disk'}: writable" in out
    assert "read back intact" in out and out.rstrip().endswith("OK")
    assert not [k for k in fresh_redis.client().keys("*")], "check left its throwaway keys behind"


def test_check_a_bad_key_fails_with_the_start_up_line():
    line = one_error_line(run_script("check", LMCACHE_CHUNK_SIZEE="128"))
    assert "LMCACHE_CHUNK_SIZEE" in line and "did you mean 'chunk_size'" in line
    line = one_error_line(run_script("check", "--extra-config", '{"chunk_size": 0}'))
    assert "chunk_size (from --extra-config)" in line
    line = one_error_line(run_script("check", LMCACHE_REMOTE_URL="nosuch://host:1"))
    assert "remote_url" in line and "unknown scheme 'nosuch'" in line


def test_check_an_unreachable_store_fails_in_one_line():
    port = free_port()  # nothing listens there
    line = one_error_line(run_script("check", LMCACHE_REMOTE_URL=f"redis://127.0.0.1:{port}",
                                     LMCACHE_BLOCKING_TIMEOUT_SECS="1"))
    assert f"127.0.0.1:{port}" in line and "refused" in line.lower()


def test_check_a_wrong_lm_token_fails_and_no_token_is_ever_printed(lm_server_factory):
    server = lm_server_factory("--token", "right-secret")
    line = one_error_line(run_script("check", LMCACHE_REMOTE_URL=f"{server.url}?token=wrong-secret"))
    assert "bad token" in line and "wrong-secret" not in line
    good = run_script("check", "--extra-config", '{"remote_options": {"password": "also-secret", "db": 1}}',
                      LMCACHE_REMOTE_URL=f"{server.url}?token=right-secret")
    assert good.returncode == 0, good.stderr
    assert "right-secret" not in good.stdout + good.stderr and "also-secret" not in good.stdout
    assert "token=***" in good.stdout and "'db': 1" in good.stdout


def test_check_an_unwritable_disk_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_error_line(run_script("check", LMCACHE_LOCAL_DISK=str(blocker / "sub")))
    assert "local_disk" in line and "LMCACHE_LOCAL_DISK" in line


def test_help_of_each_command():
    for args in (("--help",), ("check", "--help"), ("inspect", "--help"), ("purge", "--help")):
        result = run_script(*args)
        assert result.returncode == 0 and "usage: vllm-kvcache" in result.stdout, result.stderr
    assert "one reply" in run_script("inspect", "--help").stdout  # Mooncake's key dump, said plainly
    assert run_script("purge", "http://x").returncode == 2  # --model or --all is required


# -- inspect and purge ----------------------------------------------------------------------------
def chunks() -> dict[str, bytes]:
    """MODEL_A: 9 chunks at world size 2 (ranks 0 and 1); MODEL_B: 4 chunks; all sizes differ."""
    out = {}
    for i in range(9):
        out[str(ChunkKey("vllm", MODEL_A, 2, i % 2, f"{i:064x}"))] = os.urandom(1000 + i)
    for i in range(4):
        out[str(ChunkKey("vllm", MODEL_B, 1, 0, f"{100 + i:064x}"))] = os.urandom(2000 + i)
    out[OTHER_KEY] = b"x" * 10
    return out


def totals(data: dict[str, bytes], model: str) -> dict[tuple[int, int], tuple[int, int]]:
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for key, value in data.items():
        if key == OTHER_KEY:
            continue
        chunk = ChunkKey.from_string(key)
        if chunk.model == model:
            n, size = out.get((chunk.world_size, chunk.rank), (0, 0))
            out[(chunk.world_size, chunk.rank)] = (n + 1, size + len(value))
    return out


def as_totals(doc: dict, model: str) -> dict[tuple[int, int], tuple[int, int]]:
    return {(g["world_size"], g["rank"]): (g["chunks"], g["bytes"]) for g in doc["models"].get(model, [])}


def call(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict | None, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        code = cli.main(list(args), out=out, err=err)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text = out.getvalue()
    return code, json.loads(text) if text.startswith("{") else None, err.getvalue()


class Store:
    def __init__(self, url: str, options: dict | None = None, env: dict[str, str] | None = None) -> None:
        self.url, self.options, self.env = url, options or {}, env or {}

    def extra(self) -> tuple[str, ...]:
        return ("--extra-config", json.dumps({"remote_options": self.options})) if self.options else ()

    def put(self, data: dict[str, bytes]) -> None:
        asyncio.run(self._connected(lambda c: c.batched_put(list(data.items()))))

    def keys(self) -> set[str]:
        async def listing(c):
            return {k for page in [p async for p in c.scan("", 100)] for k in page.keys}
        return asyncio.run(self._connected(listing))

    async def _connected(self, work):
        config = load_config(extra_config={"remote_options": self.options}, env={})
        connector = create_connector(self.url, config)
        await connector.connect()
        try:
            return await work(connector)
        finally:
            await connector.close()


@pytest.fixture(params=["lm", "redis", "redis-cluster", "fs", "mooncake"])
def store(request, tmp_path, lm_server_factory) -> Iterator[Store]:
    kind = request.param
    if kind == "lm":
        yield Store(lm_server_factory().url)
    elif kind == "redis":
        yield Store(request.getfixturevalue("fresh_redis").url)
    elif kind == "redis-cluster":
        yield Store(request.getfixturevalue("fresh_redis_cluster").url)
    elif kind == "fs":
        yield Store(f"fs://{tmp_path / 'fs-store'}")
    else:
        deployment = MooncakeDeployment(tmp_path)  # a master and a mooncake_client that owns the memory
        try:
            yield Store(deployment.master.url, deployment.cluster.options(global_segment_size=0))
        finally:
            deployment.stop()


def test_inspect_then_purge_one_model_leaves_the_other(store):
    data = chunks()
    store.put(data)
    code, doc, _ = call("inspect", store.url, "--json", "--page-size", "3", *store.extra())
    assert code == 0
    assert set(doc["models"]) == {MODEL_A, MODEL_B}
    sized = doc["sizes_known"]
    for model in (MODEL_A, MODEL_B):
        want = totals(data, model)
        got = as_totals(doc, model)
        assert {g: n for g, (n, _) in got.items()} == {g: n for g, (n, _) in want.items()}
        if sized:
            assert got == want
    assert doc["other_keys"]["keys"] == 1

    code, doc, _ = call("inspect", store.url, "--model", MODEL_B, "--json", *store.extra())
    assert code == 0 and set(doc["models"]) == {MODEL_B} and doc["other_keys"]["keys"] == 0

    code, doc, _ = call("purge", store.url, "--model", MODEL_A, "--dry-run", "--json", *store.extra())
    assert code == 0 and doc["dry_run"] and sum(g["chunks"] for g in doc["models"][MODEL_A]) == 9
    assert store.keys() == set(data), "a dry run deleted something"

    code, doc, _ = call("purge", store.url, "--model", MODEL_A, "--json", "--page-size", "2", *store.extra())
    assert code == 0 and not doc["dry_run"] and doc["remaining"] == 0
    assert set(doc["models"]) == {MODEL_A} and sum(g["chunks"] for g in doc["models"][MODEL_A]) == 9
    left = {k for k in data if k == OTHER_KEY or ChunkKey.from_string(k).model == MODEL_B}
    assert store.keys() == left

    code, doc, _ = call("purge", store.url, "--all", "--json", *store.extra())
    assert code == 0 and set(doc["models"]) == {MODEL_B} and store.keys() == {OTHER_KEY}


def test_inspect_prints_a_table_and_a_progress_line(lm_server_factory, monkeypatch):
    store = Store(lm_server_factory().url)
    store.put(chunks())
    monkeypatch.setattr(cli, "PROGRESS_EVERY_SECS", 0.0)
    code, _, err = call("inspect", store.url, "--page-size", "2")
    assert code == 0
    assert "keys listed" in err
    out = io.StringIO()
    assert cli.main(["inspect", store.url], out=out, err=io.StringIO()) == 0
    table = out.getvalue()
    assert "13 chunks" in table and "of 2 models" in table and MODEL_A in table and "1 other keys" in table


def test_inspect_a_store_that_cannot_list_says_so():
    code, _, err = call("inspect", "blackhole://")
    assert code == 1 and "keeps no values" in err


def test_inspect_mooncake_without_metrics_address_says_what_is_missing(tmp_path):
    deployment = MooncakeDeployment(tmp_path)
    try:
        options = {k: v for k, v in deployment.cluster.options(global_segment_size=0).items()
                   if k != "metrics_address"}
        code, _, err = call("inspect", deployment.master.url, "--extra-config",
                            json.dumps({"remote_options": options}))
        assert code == 1 and "metrics_address" in err
    finally:
        deployment.stop()


def test_inspect_without_a_url_uses_the_configured_store_or_says_to_give_one(fresh_redis):
    Store(fresh_redis.url).put(chunks())
    code, doc, _ = call("inspect", "--json", env={"LMCACHE_REMOTE_URL": fresh_redis.url})
    assert code == 0 and set(doc["models"]) == {MODEL_A, MODEL_B}
    code, _, err = call("inspect")
    assert code == 1 and "give a URL" in err
