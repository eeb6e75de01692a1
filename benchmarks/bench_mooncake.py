#!/usr/bin/env python
"""mooncakestore:// against raw MooncakeDistributedStore calls on the same client, same bytes, same run.

A real mooncake_master on 127.0.0.1; two layouts of the memory:

    embedded     the connector's client owns the segment (values are memcpy'd inside the process)
    standalone   a separate mooncake_client process owns it and the connector's client has
                 global_segment_size 0 (values cross loopback TCP; this layout survives a vLLM restart)

Operations, for chunks of 256 and 16 tokens of SmolLM2-135M in bf16 (5.9 MB and 368 KB):

    put / get             one key per call, awaited one after another  (raw: store.put / store.get)
    batched_put / _get    8 keys per call                               (raw: put_batch / get_batch)
    exists                one key per call                              (raw: is_exist)
    exists32              32 keys per call, half stored                 (raw: batch_is_exist)

The raw side calls the connector's own MooncakeDistributedStore from the benchmark's thread, right
before the connector in each pass; every pass writes fresh keys (Mooncake never overwrites a key)
and deletes them after. Throughput is the best of --reps passes. Bar: connector >= 0.9x raw.

    python benchmarks/bench_mooncake.py [--quick] [--layouts embedded,standalone] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.mooncake_servers import start_mooncake_master, start_standalone_client  # noqa: E402
from vllm_kvcache_plugin.config import load_config  # noqa: E402
from vllm_kvcache_plugin.connectors import create_connector  # noqa: E402

GB = 1e9
CHUNK_BYTES = {tokens: 2 * 30 * tokens * 3 * 64 * 2 for tokens in (256, 16)}
BATCH, EXISTS_KEYS, RATIO_BAR = 8, 32, 0.9


@dataclass
class Row:
    layout: str
    tokens: int
    op: str
    unit: str
    conn: float
    raw: float

    @property
    def ratio(self) -> float:
        return self.conn / self.raw if self.raw else float("nan")


class MooncakeRaw:
    """The same operations straight on a MooncakeDistributedStore (return codes checked)."""

    label = "MooncakeDistributedStore put/get"

    def __init__(self, store: Any) -> None:
        self.store = store

    def put(self, key: str, value: bytes) -> None:
        assert self.store.put(key, value) == 0

    def get(self, key: str) -> bytes:
        return self.store.get(key)

    def put_batch(self, keys: list[str], values: list[bytes]) -> None:
        assert self.store.put_batch(keys, values) == 0

    def get_batch(self, keys: list[str]) -> list[bytes]:
        return self.store.get_batch(keys)

    def exists(self, key: str) -> bool:
        return self.store.is_exist(key) == 1

    def exists_batch(self, keys: list[str]) -> list[bool]:
        return [code == 1 for code in self.store.batch_is_exist(keys)]

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.store.remove(key, True)


def start_layout(stack: ExitStack, layout: str) -> tuple[str, dict[str, Any]]:
    """Start a master (and, for standalone, a mooncake_client); return the URL and remote_options."""
    master = start_mooncake_master()
    stack.callback(master.stop)
    options: dict[str, Any] = {"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
                               "local_buffer_size": "256MB", "staging_buffer_size": "64MB"}
    if layout == "standalone":
        owner = start_standalone_client(master, "P2PHANDSHAKE", segment="1GB")
        stack.callback(owner.stop)
        options["global_segment_size"] = 0
    else:
        options["global_segment_size"] = "1GB"
    return master.url, options


async def seconds(fn: Callable[[Any], Any], items: list[Any]) -> float:
    """Total time of ``fn(item)`` over ``items``, one call after another (coroutines awaited)."""
    total = 0.0
    for item in items:
        start = time.perf_counter()
        result = fn(item)
        if asyncio.iscoroutine(result):
            await result
        total += time.perf_counter() - start
    return total


def operations(side: str, conn: Any, raw: MooncakeRaw, value: bytes) -> dict[str, Callable[[Any], Any]]:
    """op name -> one call of it, for the raw client or the connector."""
    if side == "raw":
        return {"put": lambda k: raw.put(k, value), "get": raw.get,
                "batched_put": lambda b: raw.put_batch(b, [value] * len(b)), "batched_get": raw.get_batch,
                "exists": raw.exists, "exists32": raw.exists_batch}
    return {"put": lambda k: conn.put(k, value), "get": conn.get,
            "batched_put": lambda b: conn.batched_put([(k, value) for k in b]), "batched_get": conn.batched_get,
            "exists": conn.exists, "exists32": conn.batched_exists}


async def measure(layout: str, conn: Any, raw: MooncakeRaw, tokens: int, count: int, reps: int,
                  exists_calls: int) -> list[Row]:
    value = os.urandom(CHUNK_BYTES[tokens])
    size = len(value)
    best: dict[tuple[str, str], float] = {}
    for rep in range(reps):
        for side in ("raw", "conn"):
            ops = operations(side, conn, raw, value)
            keys = [f"vllm@bench-{side}-{tokens}-{rep}@1@0@{i:064x}" for i in range(count)]
            batches = [[f"{k}-b" for k in keys[i:i + BATCH]] for i in range(0, count, BATCH)]
            probe = [keys[i % count] if i % 2 == 0 else f"absent-{i}" for i in range(EXISTS_KEYS)]
            probes = [probe] * max(1, exists_calls // 4)
            rates = {
                "put": size * count / await seconds(ops["put"], keys),
                "get": size * count / await seconds(ops["get"], keys),
                "batched_put": size * count / await seconds(ops["batched_put"], batches),
                "batched_get": size * count / await seconds(ops["batched_get"], batches),
                "exists": exists_calls / await seconds(ops["exists"], [probe[i % EXISTS_KEYS]
                                                                      for i in range(exists_calls)]),
                "exists32": EXISTS_KEYS * len(probes) / await seconds(ops["exists32"], probes),
            }
            got = await conn.get(keys[0]) if side == "conn" else raw.get(keys[0])
            assert got is not None and bytes(got) == value, f"{side}: value changed on the way"
            for op, rate in rates.items():
                best[(op, side)] = max(best.get((op, side), 0.0), rate)
            raw.delete(keys + [k for b in batches for k in b])
    rows = []
    for op in ("put", "get", "batched_put", "batched_get", "exists", "exists32"):
        scale, unit = (1 / GB, "GB/s") if "exists" not in op else (1.0, "keys/s")
        rows.append(Row(layout, tokens, op, unit, best[(op, "conn")] * scale, best[(op, "raw")] * scale))
    return rows


async def run_layout(layout: str, plan: dict[int, int], reps: int, exists_calls: int) -> list[Row]:
    with ExitStack() as stack:
        url, options = start_layout(stack, layout)
        config = load_config(extra_config={"remote_options": options, "blocking_timeout_secs": 30}, env={})
        conn = create_connector(url, config)
        await conn.connect()
        try:
            raw = MooncakeRaw(conn._store)  # the connector's own client: same segment, same transport
            rows = []
            for tokens, count in plan.items():
                rows += await measure(layout, conn, raw, tokens, count, reps, exists_calls)
            return rows
        finally:
            await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer chunks and passes")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--layouts", default="embedded,standalone")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args()
    plan = {256: 16, 16: 64} if args.quick else {256: 40, 16: 160}
    reps = args.reps or (2 if args.quick else 3)
    exists_calls = 100 if args.quick else 400
    rows: list[Row] = []
    for layout in args.layouts.split(","):
        rows += asyncio.run(run_layout(layout.strip(), plan, reps, exists_calls))
    print(f"\n{platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; best of {reps} passes")
    print("| layout | tokens | op | connector | raw | ratio | bar |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        digits = 0 if r.unit == "keys/s" else 2
        verdict = "PASS" if r.ratio >= RATIO_BAR else "FAIL"
        print(f"| {r.layout} | {r.tokens} | {r.op} | {r.conn:.{digits}f} {r.unit} | {r.raw:.{digits}f} | "
              f"{r.ratio:.2f} | {verdict} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
