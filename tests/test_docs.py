"""Docs that are generated from code stay in step with it, and nothing unpickles."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_config_table_is_current():
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "config_table.py")], capture_output=True,
                           text=True, check=True).stdout.strip()
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- config-table:start", 1)[1].split("-->", 1)[1].split("<!-- config-table:end -->")[0]
    assert block.strip() == table, "README config table is stale: run scripts/config_table.py"


def test_readme_starts_with_the_two_commands():
    head = (REPO / "README.md").read_text().split("\n## ", 1)[0]
    assert "make demo" in head and "make test" in head


def test_no_pickle_on_any_wire_or_disk_path():
    pattern = re.compile(r"^\s*(import (c?pickle|cloudpickle|dill|marshal|shelve)\b|from (c?pickle|cloudpickle|dill|"
                         r"marshal|shelve) import)|\b(c?pickle|marshal|dill)\.loads?\(|torch\.load\(", re.M)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "vllm_kvcache_plugin").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert not offenders, f"pickle-like deserialisation in {offenders}"


def test_grafana_dashboard_uses_only_exported_metrics():
    """Every series the dashboard plots is one vLLM's /metrics (the connector's) or the lm server's
    /metrics exports, and the dashboard shows what an operator asked for."""
    import json

    from vllm_kvcache_plugin.integration.vllm import stats
    from vllm_kvcache_plugin.server import metrics as server_metrics

    exported = {f"{stats.PREFIX}{k}_total" for k in stats._PROM_COUNTERS}
    exported |= {f"{stats.PREFIX}{k}_bucket" for k in stats._PROM_HISTOGRAMS}
    exported |= {f"{stats.PREFIX}store_{k}_total" for k in stats._PROM_SNAPSHOT_COUNTERS}
    exported |= {f"{stats.PREFIX}store_{k}" for k in stats._PROM_GAUGES}
    server_rendered = server_metrics.render_prometheus(_server_snapshot())
    exported |= set(re.findall(r"^(lm_server_\w+?)(?:\{| )", server_rendered, re.M))
    dashboard = json.loads((REPO / "configs" / "grafana-dashboard.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"vllm:kvcache_plugin_\w+|lm_server_\w+", target["expr"]))
    assert used and used <= exported, sorted(used - exported)
    wanted = {"lm_server_memory_bytes_used", "lm_server_memory_budget_bytes", "lm_server_evictions_total",
              "lm_server_spills_total", "lm_server_connections", f"{stats.PREFIX}store_remote_reconnects_total"}
    assert wanted <= used, sorted(wanted - used)


def _server_snapshot() -> dict:
    """A STATS snapshot of a running lm server with a disk spill and shared memory (every section)."""
    from testbed.lm_server import LMServerProcess
    from testbed.processes import free_port
    from vllm_kvcache_plugin.connectors import create_connector

    async def stats(url: str) -> dict:
        connector = create_connector(url)
        try:
            return await connector.stats()
        finally:
            await connector.close()

    with tempfile.TemporaryDirectory() as disk:
        server = LMServerProcess(free_port(), ("--disk", disk)).start()
        try:
            return asyncio.run(stats(server.url))
        finally:
            server.stop()
