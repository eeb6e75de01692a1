"""Structured events: one JSON object per log line, for operators' tools and for the tests, so
nothing has to parse log prose (the schema is docs/events.md).

Off by default (``log_events``): when on, each event is logged by the ``vllm_kvcache_plugin.events``
logger as ``kvcache-event {"event": ..., ...}``, the JSON on one line after the marker. Request
events are INFO; per-chunk events (with the chunk's checksum) are DEBUG, so they need
``log_level: DEBUG`` too.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

MARKER = "kvcache-event"
SCHEMA_VERSION = 1

logger = logging.getLogger("vllm_kvcache_plugin.events")
_enabled = False


def configure(enabled: bool) -> None:
    """Turn event logging on or off for this process (the connector does, from its config)."""
    global _enabled
    _enabled = enabled


def enabled(level: int = logging.INFO) -> bool:
    """Whether an event at ``level`` would be logged (check before computing costly fields)."""
    return _enabled and logger.isEnabledFor(level)


def emit(event: str, level: int = logging.INFO, **fields: Any) -> None:
    if enabled(level):
        logger.log(level, "%s %s", MARKER, json.dumps({"event": event, "v": SCHEMA_VERSION,
                                                      "t": round(time.time(), 4), **fields},
                                                      separators=(",", ":"), default=str))
