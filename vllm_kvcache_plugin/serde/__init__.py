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


def check_settings(config) -> None:
    """Start-up check of the serde settings: ``remote_serde`` names a registered serde, and every
    serde that has settings of its own (``check_settings`` classmethod, e.g. CacheGen's bins)
    checks them."""
    names = available_serdes()
    if config.remote_serde not in names:
        raise config.invalid("remote_serde", f"{config.remote_serde!r} is not one of {', '.join(names)}")
    for name in names:
        check = getattr(SERDES.load(name), "check_settings", None)
        if check is not None:
            check(config)


def create_serde(name: str, allocator=None, config=None, **options) -> Serde:
    """The serde ``name``; a serde with a ``from_config`` classmethod reads its settings from
    ``config`` (a KVCacheConfig), e.g. CacheGen's bins."""
    try:
        cls = SERDES.load(name)
    except KeyError:
        raise ConfigError(f"remote_serde: {name!r} is not one of {', '.join(available_serdes())}") from None
    if config is not None and hasattr(cls, "from_config"):
        return cls.from_config(config, allocator, **options)
    return cls(allocator, **options)


__all__ = ["SERDES", "Serde", "available_serdes", "check_settings", "create_serde"]
