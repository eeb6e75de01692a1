"""Typed errors. Each layer raises its own kind so the layer above can decide what a fault means
(a config error stops start-up; a corrupt value or an unreachable store is a cache miss)."""

from __future__ import annotations


class KVCacheError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(KVCacheError, ValueError):
    """A bad setting. The message is one line: key, source, what is allowed."""


class URLError(ConfigError):
    """A remote URL that cannot be parsed or names an unknown scheme."""


class MissingDependencyError(ConfigError):
    """An optional package (an extra) needed by the configured feature is not installed."""


class CorruptValueError(KVCacheError):
    """A stored value failed its header, length or checksum check: treat it as a miss."""


class ConnectorError(KVCacheError):
    """The remote store failed (unreachable, timed out, protocol error): treat it as a miss."""


class ConnectorTimeout(ConnectorError, TimeoutError):
    """The store did not answer in time. It may be busy (serving other loads on a loaded host) or
    frozen: the call is a miss, and pings decide whether the store is down."""


class ProtocolError(ConnectorError):
    """A peer sent a malformed frame on the lm:// protocol."""
