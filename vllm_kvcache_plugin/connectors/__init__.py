"""Remote connectors, chosen by URL scheme.

``create_connector("redis://127.0.0.1:6379")`` returns an unconnected connector; see
:class:`~vllm_kvcache_plugin.connectors.base.RemoteConnector` for the methods.
"""

from __future__ import annotations

from ..config import KVCacheConfig
from ..errors import URLError
from .base import Buffer, RemoteConnector
from .registry import CONNECTORS
from .url import RemoteURL, parse_remote_url


def create_connector(url: str, config: KVCacheConfig | None = None) -> RemoteConnector:
    """Build the connector for ``url`` (no I/O happens here)."""
    parsed = parse_remote_url(url)
    try:
        cls = CONNECTORS.load(parsed.scheme)
    except KeyError:
        raise URLError(
            f"remote URL {parsed.redacted()!r}: unknown scheme {parsed.scheme!r}; "
            f"known: {', '.join(CONNECTORS.names())}"
        ) from None
    return cls(parsed, config)


def check_settings(config: KVCacheConfig) -> None:
    """Start-up check of the settings this package owns: a remote URL that parses, with a known scheme."""
    if config.remote_url:
        try:
            parse_remote_url(config.remote_url, require_known_scheme=True)
        except URLError as exc:
            raise config.invalid("remote_url", str(exc)) from None


def describe_remote(url: str | None) -> str:
    """The remote URL as logs may show it: secrets redacted, "none" when unset."""
    if not url:
        return "none"
    try:
        return parse_remote_url(url).redacted()
    except URLError:
        return "<invalid>"


__all__ = ["CONNECTORS", "Buffer", "RemoteConnector", "RemoteURL", "check_settings", "create_connector",
           "describe_remote", "parse_remote_url"]
