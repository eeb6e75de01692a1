"""The ``vllm.general_plugins`` entry point: registers ``LMCacheConnector`` with vLLM.

vLLM loads general plugins in every process it starts (API server, engine core, workers), so
registration is idempotent. Without the entry point, the same class loads with
``"kv_connector_module_path": "vllm_kvcache_plugin.integration.vllm.connector"``.
"""

from __future__ import annotations

import logging
import sys

CONNECTOR_NAME = "LMCacheConnector"
MODULE_PATH = "vllm_kvcache_plugin.integration.vllm.connector"
CLASS_NAME = "LMCacheConnector"


def _configure_logging() -> None:
    """Give the package's loggers a handler in vLLM's processes (vLLM configures only its own)."""
    root = logging.getLogger("vllm_kvcache_plugin")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvcache %(filename)s:%(lineno)d] %(message)s",
                                           "%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    _configure_logging()
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, MODULE_PATH, CLASS_NAME)
