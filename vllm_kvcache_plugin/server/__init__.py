"""The lm:// server: an asyncio key-value store for KV-cache chunks.

Run it with ``python -m vllm_kvcache_plugin.server`` (or ``vllm-kvcache-server``); clients use
``lm://host:port`` through :class:`vllm_kvcache_plugin.connectors.lm.LMConnector`. The wire protocol
is in :mod:`vllm_kvcache_plugin.lm_protocol` and docs/lm-protocol.md.
"""

from .app import LMServer, ServerConfig
from .store import MemoryStore

__all__ = ["LMServer", "MemoryStore", "ServerConfig"]
