#!/usr/bin/env python
"""A restart hit's load outside vLLM, split into its stages: where the load path itself spends its time.

Inside vLLM a restart hit's load is one figure per request (``bench_ttft.py``'s split: fetch wait,
scatter). This runs the same load through the real engine, tiers and worker (``WorkerSide.load``:
the fetch threads, the verify-and-scatter pass), into a zeroed paged cache laid out as vLLM's CPU
attention lays out SmolLM2-135M's (30 layers, 3 KV heads, head 64, bf16, block 128, ``cpu_vec``
packing, LBHNC), in a fresh process each time, as after a restart. Then it times the stages one
after another on the same chunks: fetch (``engine.retrieve``, checksum deferred), verify (the xxh3
checksum), scatter (into the blocks), so a slow stage shows even where the load overlaps them.

``--device cuda`` loads into a GPU cache instead: vLLM's GPU layout (plain packing, LBNHC, block 16),
through the CUDA copier, with the worker's chunk buffers pinned as the worker pins them for a GPU
cache (``--host-memory pageable`` leaves them pageable: the copier then stages each chunk, as it does
a view of lm://'s shared memory or of a mapped file). Beside it, the floor: one host-to-device copy of
the same bytes from pinned and from pageable memory. ``--shape llama8b`` moves Llama-3-8B's KV (32
layers, 8 KV heads of 128) instead of SmolLM2-135M's. The GPU machines lent here have no vLLM: the
worker needs only vLLM's connector metadata and stats base classes, so where vLLM is absent the
child process gives it empty stand-ins (``_stand_in_for_vllm``); everything measured is this
package's code. After the loads the blocks are read back and compared with the stored chunks.

Stores: ``disk`` (the disk tier, files mapped: the default), ``disk-read`` (read into pooled buffers,
``VLLM_KVCACHE_DISK_MMAP=0``, the path before), ``lm`` (lm:// on this host: shared memory),
``lm-tcp`` (lm:// with ``?shm=off``), ``redis`` (a real redis-server over loopback TCP) and
``redis-unix`` (the same server over its unix socket, ``unix://``) and ``mooncake``
(mooncakestore:// through a master and a standalone ``mooncake_client`` that owns the segment, as in
``bench_ttft.py``); ``redis+cachegen`` is ``redis`` with the CacheGen serde (its "verify" stage is the
decode into a chunk, which a load does straight into the blocks instead). The chunks are random bf16,
stored once by another process.

Beside the times it counts CPU: the loading process's own (every thread) and the store's server
processes' (redis-server; the lm server; mooncake_client and the master), per load, from
``/proc/<pid>/stat`` (10 ms ticks, so averaged over every load of the run). On a host whose cores
the store shares, the two together bound the load: it cannot take less than their sum divided by
the cores.
Prints a table (and writes it with a PNG plot to ``--out``).

    python benchmarks/bench_load.py [--tokens 4096] [--stores disk,lm,redis,mooncake,...] [--runs 3] [--out DIR]
    python benchmarks/bench_load.py --device cuda --stores lm,lm-tcp,disk [--host-memory both] [--shape llama8b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment_line, markdown_table, save_bar_plot

from testbed.processes import cpu_seconds

STORES = ("disk", "disk-read", "lm", "lm-tcp", "redis", "redis-unix", "mooncake", "redis+cachegen")
CACHEGEN_SUFFIX = "+cachegen"
CHUNK = 256
SHAPES = {"smollm2": (30, 3, 64), "llama8b": (32, 8, 128)}  # layers, KV heads, head size
CPU_BLOCK, CPU_CACHE_BLOCKS = 128, 1300  # ~3.8 GB for SmolLM2, about what VLLM_CPU_KVCACHE_SPACE=4 gives
GPU_BLOCK = 16  # vLLM's default block on a GPU
LOADS = 4  # whole loads per fresh process; the first is the restart's own
HOST_MEMORY = ("pinned", "pageable")


def _stand_in_for_vllm() -> None:
    """Empty stand-ins for the three vLLM base classes the worker's modules subclass, for a machine
    without vLLM (the lent GPU machines): the load path measured here never calls into them."""
    import types
    from dataclasses import dataclass, field

    @dataclass
    class KVConnectorStats:
        data: dict = field(default_factory=dict)

    class KVConnectorMetadata:
        pass

    class KVConnectorPromMetrics:
        pass

    names = ["vllm", "vllm.distributed", "vllm.distributed.kv_transfer", "vllm.distributed.kv_transfer.kv_connector",
             "vllm.distributed.kv_transfer.kv_connector.v1"]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    base = sys.modules[names[-1] + ".base"] = types.ModuleType(names[-1] + ".base")
    base.KVConnectorMetadata = KVConnectorMetadata
    metrics = sys.modules[names[-1] + ".metrics"] = types.ModuleType(names[-1] + ".metrics")
    metrics.KVConnectorStats, metrics.KVConnectorPromMetrics = KVConnectorStats, KVConnectorPromMetrics


def _geometry(device: str) -> tuple[str, str, int, int]:
    """packing, layout, block size and cache blocks of the paged cache vLLM makes on ``device``."""
    if device == "cuda":
        return "plain", "LBNHC", GPU_BLOCK, 4096  # 65k tokens: SmolLM2 1.5 GB, Llama-3-8B 8.6 GB
    return "cpu_vec", "LBHNC", CPU_BLOCK, CPU_CACHE_BLOCKS


def _copy_floor(nbytes: int) -> dict[str, float]:
    """GB/s of one host-to-device copy of ``nbytes`` from pinned and from pageable memory (best of 5)."""
    import torch

    target = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, pinned in (("pinned", True), ("pageable", False)):
        source = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
        best = float("inf")
        for _ in range(6):
            torch.cuda.synchronize()
            start = time.perf_counter()
            target.copy_(source)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        out[name] = nbytes / best / 1e9
    return out


def _child(args: argparse.Namespace) -> None:
    """One process: store the chunks (``--child store``) or load them (``--child load``), printing JSON."""
    import uuid

    try:
        import vllm  # noqa: F401
    except ImportError:
        _stand_in_for_vllm()
    import torch

    from vllm_kvcache_plugin.config import load_config
    from vllm_kvcache_plugin.engine import KVCacheEngine
    from vllm_kvcache_plugin.integration.vllm.metadata import LoadSpec, StepMetadata
    from vllm_kvcache_plugin.integration.vllm.worker import WorkerSide, build_registered_cache, slots_for
    from vllm_kvcache_plugin.kernels import PagedKVSpec, allocate_paged_layers
    from vllm_kvcache_plugin.keys import ChunkRef

    num_layers, heads, head_size = SHAPES[args.shape]
    packing, layout, block, cache_blocks = _geometry(args.device)
    spec = PagedKVSpec(kind="mha", block_size=block, num_kv_heads=heads, head_size=head_size, dtype=torch.bfloat16,
                       packing=packing)
    settings = {"chunk_size": CHUNK, "local_cpu": False, "remote_serde": args.serde}
    if args.url:
        settings["remote_url"] = args.url
    else:
        settings.update(local_disk=args.dir, max_local_disk_size=10)
    engine = KVCacheEngine(load_config(settings, env={}), "bench-load-model")
    worker = WorkerSide(engine, block, None)
    layers = allocate_paged_layers(spec, layout, num_layers, num_blocks=cache_blocks if args.child == "load" else 64,
                                   device=args.device)
    for layer in layers:
        layer.zero_()  # as vLLM's torch.zeros: every destination page touched before the first load
    cache = build_registered_cache([f"layers.{i}.attn" for i in range(num_layers)], layers, spec)
    worker.register([cache])  # pre-warms the chunk buffers (pinned for a GPU cache), as at vLLM's start
    if args.host_memory == "pageable" and engine.allocator.pin_memory:
        # The path before pinning: a fresh pool of pageable buffers (same allocator object, which
        # the tiers hold), pre-warmed the same way.
        engine.allocator.__init__(engine.allocator.max_pool_bytes, pin_memory=False)
        engine.prewarm(cache.shape, cache.part.max_tokens(engine.config.chunk_size, block))
    refs = tuple(ChunkRef(i, min(i + CHUNK, args.tokens), f"{i:064x}") for i in range(0, args.tokens, CHUNK))
    blocks = tuple(range(1, 1 + -(-args.tokens // block)))  # block 0 is vLLM's null block
    out: dict[str, object] = {}
    if args.child == "store":
        generator = torch.Generator().manual_seed(0)
        for ref in refs:
            obj = engine.allocate(cache.shape, ref.num_tokens)
            obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=generator).to(torch.bfloat16))
            engine.store([ref], [obj])
            obj.ref_down()
        out["stored"] = engine.storage.flush(60)
    else:
        loads = []
        server_pids = [int(p) for p in args.server_pids.split(",") if p]
        worker.lookup([ref.chunk_hash for ref in refs])  # as in vLLM: the scheduler asks before it loads
        own_cpu, server_cpu = time.process_time(), sum(map(cpu_seconds, server_pids))
        for _ in range(LOADS):
            load = LoadSpec(uuid.uuid4().hex, 0, args.tokens, refs, (blocks,))
            start = time.perf_counter()
            worker.load(StepMetadata(loads=[load]))
            if args.device == "cuda":
                torch.cuda.synchronize()  # a staged chunk's kernel may still run when the load returns
            loads.append(time.perf_counter() - start)
            if worker.take_load_errors():
                raise SystemExit("a load reported failed blocks: the chunks did not all load")
        out["loads_ms"] = [1e3 * s for s in loads]
        out["cpu_ms"] = {"loader": 1e3 * (time.process_time() - own_cpu) / LOADS,
                         "store": 1e3 * (sum(map(cpu_seconds, server_pids)) - server_cpu) / LOADS}
        stages = {"fetch": [], "verify": [], "scatter": []}
        for _ in range(3):
            start = time.perf_counter()
            objs = engine.retrieve(refs, cache.shape, defer_check=True)
            fetched = time.perf_counter()
            intact = all(obj is not None and obj.check() for obj in objs)
            verified = time.perf_counter()
            for ref, obj in zip(refs, objs, strict=True):
                cache.copier.scatter(layers, spec, slots_for(blocks, block, ref.start, ref.end), obj.tensor)
            if args.device == "cuda":
                torch.cuda.synchronize()
            scattered = time.perf_counter()
            # What the blocks now hold must be the chunks, byte for byte: read them back.
            for ref, obj in zip(refs, objs, strict=True):
                back = torch.empty_like(obj.tensor)
                cache.copier.gather(layers, spec, slots_for(blocks, block, ref.start, ref.end), back)
                intact = intact and torch.equal(back.view(torch.int16), obj.tensor.view(torch.int16))
            for obj in objs:
                obj.ref_down()
            if not intact:
                raise SystemExit("a stored chunk came back missing or corrupt, or the blocks do not hold it")
            stages["fetch"].append(fetched - start)
            stages["verify"].append(verified - fetched)
            stages["scatter"].append(scattered - verified)
        out["stages_ms"] = {name: 1e3 * min(values) for name, values in stages.items()}
        out["bytes"] = sum(cache.shape.meta(ref.num_tokens).nbytes for ref in refs)
        out["pinned"] = bool(engine.allocator.pin_memory)
        if args.device == "cuda":
            out["floor_gbps"] = _copy_floor(out["bytes"])
    worker.close()
    engine.close()
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(role: str, store: str, where: str, url: str | None, args: argparse.Namespace,
               server_pids: Sequence[int] = (), extra_env: dict[str, str] | None = None,
               host_memory: str = "pinned") -> dict:
    env = {**os.environ, **(extra_env or {})}
    env["VLLM_KVCACHE_DISK_MMAP"] = "0" if store == "disk-read" else "1"
    argv = [sys.executable, __file__, "--child", role, "--tokens", str(args.tokens), "--dir", where,
            "--server-pids", ",".join(str(p) for p in server_pids),
            "--serde", "cachegen" if store.endswith(CACHEGEN_SUFFIX) else "naive",
            "--device", args.device, "--shape", args.shape, "--host-memory", host_memory]
    if url:
        argv += ["--url", url]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{store} {role} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _measure(store: str, args: argparse.Namespace, scratch: str, host_memories: Sequence[str]) -> dict[str, dict]:
    """Store once, then ``args.runs`` fresh load processes per host memory; each figure the best of the runs."""
    server = None
    url = None
    pids: list[int | None] = []
    env: dict[str, str] = {}
    try:
        if store.startswith("lm"):
            from testbed.lm_server import LMServerProcess
            from testbed.processes import free_port

            server = LMServerProcess(free_port()).start()
            url = server.url + ("?shm=off" if store == "lm-tcp" else "")
            pids = [server.pid]
        elif store.startswith("redis"):
            from testbed.redis_servers import start_redis

            os.makedirs(home := os.path.join(scratch, store + "-server"), exist_ok=True)
            server = start_redis("redis-bench-load", home)
            url = server.unix_url if store == "redis-unix" else server.url
            pids = [server.node.pid]
        elif store == "mooncake":
            from testbed.mooncake_servers import MooncakeDeployment

            os.makedirs(home := os.path.join(scratch, "mooncake-config"), exist_ok=True)
            server = MooncakeDeployment(Path(home), segment="1GB")  # a master + a standalone segment owner
            url, env = server.master.url, {"MOONCAKE_CONFIG_PATH": str(server.config_path)}
            pids = [server.owner.pid, server.master.process.pid]
        where = os.path.join(scratch, store)
        server_pids = [p for p in pids if p is not None]
        _run_child("store", store, where, url, args, server_pids, env)
        measured = {memory: _summary([_run_child("load", store, where, url, args, server_pids, env, memory)
                                      for _ in range(args.runs)]) for memory in host_memories}
    finally:
        if server is not None:
            server.stop()
    return measured


def _summary(results: list[dict]) -> dict:
    return {
        "first_ms": min(r["loads_ms"][0] for r in results),
        "best_ms": min(min(r["loads_ms"]) for r in results),
        "stages_ms": {k: min(r["stages_ms"][k] for r in results) for k in ("fetch", "verify", "scatter")},
        "cpu_ms": {k: sum(r["cpu_ms"][k] for r in results) / len(results) for k in ("loader", "store")},
        "bytes": results[0]["bytes"],
        "pinned": results[0]["pinned"],
        "floor_gbps": {k: max(r["floor_gbps"][k] for r in results) for k in results[0].get("floor_gbps", {})},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens a load brings (default 4096)")
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated subset of: " + ", ".join(STORES))
    parser.add_argument("--runs", type=int, default=3, help="fresh load processes per store (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="folder for load.md and load.png")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where vLLM's paged cache lives (default cpu; cuda: plain LBNHC, block 16)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="smollm2",
                        help="whose KV: SmolLM2-135M's (default) or Llama-3-8B's")
    parser.add_argument("--host-memory", choices=(*HOST_MEMORY, "both"), default="pinned",
                        help="cuda only: the chunk buffers pinned (as the worker makes them), pageable, or both")
    parser.add_argument("--child", choices=("store", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--server-pids", default="", help=argparse.SUPPRESS)
    parser.add_argument("--serde", default="naive", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = sorted(set(stores) - set(STORES))
    if unknown:
        parser.error(f"unknown store(s) {', '.join(unknown)}; choose from {', '.join(STORES)}")
    if args.tokens < CHUNK:
        parser.error(f"--tokens must be at least one chunk ({CHUNK})")
    if args.device == "cpu" and args.host_memory != "pinned":
        parser.error("--host-memory is for --device cuda (a CPU cache's chunk buffers are never pinned)")
    host_memories = HOST_MEMORY if args.host_memory == "both" else (args.host_memory,)
    header = environment_line()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here")
        header += f"\nGPU: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    print(header, flush=True)
    measured: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as scratch:
        for store in stores:
            for memory, m in _measure(store, args, scratch, host_memories).items():
                name = store if args.device == "cpu" else f"{store} ({memory})"
                measured[name] = m
                print(f"  {name}: first load {m['first_ms']:.1f} ms, best {m['best_ms']:.1f} ms; stages "
                      + ", ".join(f"{k} {v:.1f} ms" for k, v in m["stages_ms"].items())
                      + f"; CPU a load: loader {m['cpu_ms']['loader']:.0f} ms, store {m['cpu_ms']['store']:.0f} ms",
                      flush=True)
    rows = []
    for name, m in measured.items():
        stages = m["stages_ms"]
        rows.append([name, f"{m['bytes'] / 1e6:.0f}", f"{m['first_ms']:.1f}", f"{m['best_ms']:.1f}",
                     f"{m['bytes'] / 1e6 / m['best_ms']:.2f}", f"{stages['fetch']:.1f}", f"{stages['verify']:.1f}",
                     f"{stages['scatter']:.1f}", f"{sum(stages.values()):.1f}", f"{m['cpu_ms']['loader']:.0f}",
                     f"{m['cpu_ms']['store']:.0f}",
                     f"{(m['cpu_ms']['loader'] + m['cpu_ms']['store']) / (os.cpu_count() or 1):.0f}"])
    floors = {}
    for m in measured.values():
        for kind, gbps in m["floor_gbps"].items():
            floors[kind] = max(floors.get(kind, 0.0), gbps)
    nbytes = next(iter(measured.values()))["bytes"]
    for kind, gbps in floors.items():  # the baseline: the same bytes, one plain copy to the GPU
        ms = nbytes / 1e6 / gbps
        rows.append([f"floor: one H2D copy ({kind})", f"{nbytes / 1e6:.0f}", "", f"{ms:.1f}", f"{gbps:.2f}",
                     "", "", "", "", "", "", ""])
    table = markdown_table(["store", "MB", "first load ms", "best load ms", "load GB/s", "stage: fetch ms",
                            "stage: verify (cachegen: decode) ms", "stage: scatter ms", "stages one after another ms",
                            "CPU a load: loader ms", "CPU a load: store's servers ms",
                            f"CPU floor on {os.cpu_count()} cores ms"], rows)
    packing, layout, block, _ = _geometry(args.device)
    cache = "a GPU" if args.device == "cuda" else "a"
    notes = (f"{args.tokens} tokens of {args.shape}'s KV (bf16) into {cache} {packing}, {layout}, block-{block} "
             "cache; a load is WorkerSide.load before a forward (fetch threads, one verify-and-scatter pass); first "
             f"load: the first in a fresh process, best: of {LOADS} loads x {args.runs} processes; the stages run one "
             "after another on the same chunks (best of 3 x the processes). CPU a load: the mean over every load "
             "of the run (the loads only, not the stages), for the loading process (all its threads) and the "
             "store's server processes; the CPU floor is their sum over the cores: no load on this host can "
             "be shorter while the store shares its cores.")
    if args.device == "cuda":
        notes += (" GPU: (pinned) is the worker's own path, chunk buffers page-locked, the CUDA copier reading "
                  "them directly; (pageable) leaves them pageable, so the copier stages each chunk, as it stages "
                  "a view of lm://'s shared memory (lm) or of a mapped file (disk) in either row. The floor rows "
                  "are one host-to-device copy of all the load's bytes at once (best of 5).")
    print("\n" + table + "\n\n" + notes)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load.md").write_text(f"{header}\n\n{table}\n\n{notes}\n", encoding="utf-8")
        names = list(measured)
        series = {"best load": [measured[s]["best_ms"] for s in names],
                  **{f"stage: {k}": [measured[s]["stages_ms"][k] for s in names] for k in ("fetch", "verify",
                                                                                          "scatter")}}
        plot = save_bar_plot(args.out / "load.png", f"A {args.tokens}-token restart load outside vLLM", names,
                             series, "ms")
        print(f"wrote {args.out / 'load.md'} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
