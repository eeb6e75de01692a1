"""Serializers, chosen by name through a registry extended by the entry-point group
``vllm_kvcache_plugin.serdes``."""

from __future__ import annotations

from ..errors import ConfigError
from ..registry import Registry
from .base import Serde

SERDES: Registry[type[Serde]] = Registry(
    "serde",
    "vllm_kvcache_plugin.serdes",
    builtins={
        "naive": "vllm_kvcache_plugin.serde.naive:NaiveSerde",
        "cachegen": "vllm_kvcache_plugin.serde.cachegen:CacheGenSerde",
    },
)


def available_serdes() -> list[str]:
    return SERDES.names()


def create_serde(name: str, **options) -> Serde:
    try:
        cls = SERDES.load(name)
    except KeyError:
        raise ConfigError(f"remote_serde: {name!r} is not one of {', '.join(available_serdes())}") from None
    return cls(**options)


__all__ = ["SERDES", "Serde", "available_serdes", "create_serde"]
