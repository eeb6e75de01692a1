"""Reading the connector's structured events (docs/events.md) out of a vLLM log: what the tests
and benchmarks assert on, instead of log prose (rewording a log line breaks nothing)."""

from __future__ import annotations

import json
from typing import Any

from vllm_kvcache_plugin.events import MARKER


def events(log: str, kind: str | None = None) -> list[dict[str, Any]]:
    """Every event in ``log`` (or those of one ``kind``), in order."""
    out = []
    for line in log.splitlines():
        at = line.find(MARKER + " {")
        if at < 0:
            continue
        event = json.loads(line[at + len(MARKER) + 1:])
        if kind is None or event["event"] == kind:
            out.append(event)
    return out


def requests(log: str, completion_id: str) -> list[dict[str, Any]]:
    """The ``request`` events of one completion (vLLM's request id starts with the completion's
    id), one per time vLLM scheduled it from its start."""
    return [e for e in events(log, "request") if e["request_id"].startswith(completion_id)]


def hits_for(log: str, completion_id: str) -> list[int]:
    """Tokens the connector loaded for a request, one entry per scheduling that loaded any."""
    return [e["loaded_tokens"] for e in requests(log, completion_id) if e["loaded_tokens"]]


def local_hits_for(log: str, completion_id: str) -> list[int]:
    """Tokens vLLM's own prefix cache had, for each scheduling the connector also loaded for."""
    return [e["local_tokens"] for e in requests(log, completion_id) if e["loaded_tokens"]]


def all_loaded_tokens(log: str) -> list[int]:
    """Tokens loaded by every hit in the log."""
    return [e["loaded_tokens"] for e in events(log, "request") if e["loaded_tokens"]]


def chunk_checksums(log: str, kind: str) -> dict[str, str]:
    """key -> xxh3 of every chunk ``saved`` or ``loaded`` (DEBUG events)."""
    return {e["key"]: e["xxh3"] for e in events(log, f"chunk_{kind}")}


def chunk_events(log: str, kind: str) -> list[dict[str, Any]]:
    return events(log, f"chunk_{kind}")
