"""The ``vllm.general_plugins`` entry point: registers ``LMCacheConnector`` with vLLM.

vLLM loads general plugins in every process it starts (API server, engine core, workers), so
registration is idempotent. Without the entry point, the same class loads with
``"kv_connector_module_path": "vllm_kvcache_plugin.integration.vllm.connector"``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

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


def _cli_transfer_config(argv: Sequence[str]) -> dict | None:
    """The --kv-transfer-config JSON of a `vllm serve` / api_server command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--kv-transfer-config" and i + 1 < len(argv):
            raw = argv[i + 1]
        elif arg.startswith("--kv-transfer-config="):
            raw = arg.split("=", 1)[1]
        else:
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            return None  # vLLM reports malformed JSON itself
        return value if isinstance(value, dict) else None
    return None


def validate_early(argv: Sequence[str] | None = None) -> None:
    """Fail a server start-up with one line when our settings are bad, before vLLM loads the model.

    Runs when vLLM loads its plugins in the API server process; the connector checks again in the
    engine processes (for the Python API, which has no command line)."""
    transfer = _cli_transfer_config(sys.argv if argv is None else argv)
    if not transfer or transfer.get("kv_connector") != CONNECTOR_NAME:
        return
    from ...errors import ConfigError
    from ...settings import load_settings

    try:
        load_settings(transfer.get("kv_connector_extra_config") or {})
    except ConfigError as exc:
        raise SystemExit(f"vllm-kvcache-plugin: invalid configuration: {exc}") from None


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    _configure_logging()
    validate_early()
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, MODULE_PATH, CLASS_NAME)
