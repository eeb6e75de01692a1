"""The whole start-up check of a configuration: types, ranges and sources (``config``), then what each
component owns, asked of its own registry (the serde and its options, the remote URL).

``config`` sits below everything and knows no component; the components know ``config``. This
module sits above both, so neither has to reach up to the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import connectors, serde
from .config import KVCacheConfig, load_config
from .threads import check_thread_cpus


def load_settings(extra_config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                  source: str = "kv_connector_extra_config") -> KVCacheConfig:
    """:func:`config.load_config`, then every component's own checks; raises ConfigError (one line)."""
    config = load_config(extra_config, env, source)
    check_settings(config)
    return config


def check_settings(config: KVCacheConfig) -> None:
    check_thread_cpus(config.thread_cpus, config.invalid)
    serde.check_settings(config)
    connectors.check_settings(config)
