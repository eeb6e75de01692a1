"""Where a restart hit's time goes, read from the connector's events (docs/events.md).

For one request: the lookup (``request`` event: ``lookup_ms``, from the first question to the
answer), the load (``loads_done``: waiting for chunks the scatter was ready for, the scatter, the
whole load), and what is left of the TTFT beyond vLLM's own prefix-cache hit of the same prompt
("other": the step an asynchronous load adds, scheduling, the HTTP round trip).
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.events import events


@dataclass(frozen=True)
class StageSplit:
    ttft_ms: float
    vllm_hit_ms: float
    lookup_ms: float
    load_ms: float
    fetch_wait_ms: float
    scatter_ms: float
    asynchronous: bool
    loaded_mb: float

    @property
    def other_ms(self) -> float:
        return self.ttft_ms - self.vllm_hit_ms - self.lookup_ms - self.load_ms

    def row(self, store: str, tokens: int) -> list[object]:
        return [store, tokens, "async" if self.asynchronous else "sync", f"{self.ttft_ms:.0f}",
                f"{self.vllm_hit_ms:.0f}", f"{self.lookup_ms:.1f}", f"{self.load_ms:.1f}",
                f"{self.fetch_wait_ms:.1f}", f"{self.scatter_ms:.1f}", f"{self.other_ms:.0f}",
                f"{self.loaded_mb / max(self.load_ms, 1e-9):.2f}"]


HEADERS = ["store", "tokens", "load", "restart hit ms", "vLLM hit ms", "lookup ms", "load ms",
           "of it: fetch wait ms", "of it: scatter ms", "other ms", "load GB/s"]


def stage_split(log: str, completion_id: str, ttft_s: float, vllm_hit_s: float) -> StageSplit | None:
    """The split of the request ``completion_id`` (None when the log has no load for it)."""
    request = next((e for e in events(log, "request")
                    if e["request_id"].startswith(completion_id) and e["loaded_tokens"]), None)
    if request is None:
        return None
    load = next((e for e in events(log, "loads_done") if request["request_id"] in e["requests"]), None)
    if load is None:
        return None
    return StageSplit(ttft_ms=1e3 * ttft_s, vllm_hit_ms=1e3 * vllm_hit_s, lookup_ms=request.get("lookup_ms", 0.0),
                      load_ms=load["total_ms"], fetch_wait_ms=load["fetch_wait_ms"], scatter_ms=load["scatter_ms"],
                      asynchronous=load["asynchronous"], loaded_mb=load["bytes"] / 1e6)
