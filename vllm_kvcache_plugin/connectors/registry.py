"""Scheme -> connector class. Other packages add schemes with the entry-point group
``vllm_kvcache_plugin.connectors`` (name = scheme, value = ``module:Class``)."""

from __future__ import annotations

from ..registry import Registry

_PKG = "vllm_kvcache_plugin.connectors"

CONNECTORS: Registry[type] = Registry(
    "connector",
    "vllm_kvcache_plugin.connectors",
    builtins={
        "lm": f"{_PKG}.lm:LMConnector",
        "redis": f"{_PKG}.redis:RedisConnector",
        "rediss": f"{_PKG}.redis:RedisConnector",
        "unix": f"{_PKG}.redis:RedisConnector",
        "valkey": f"{_PKG}.redis:RedisConnector",
        "redis-sentinel": f"{_PKG}.redis:RedisSentinelConnector",
        "redis-cluster": f"{_PKG}.redis:RedisClusterConnector",
        "mooncakestore": f"{_PKG}.mooncake:MooncakeStoreConnector",
        "fs": f"{_PKG}.fs:FSConnector",
        "blackhole": f"{_PKG}.blackhole:BlackholeConnector",
    },
)
