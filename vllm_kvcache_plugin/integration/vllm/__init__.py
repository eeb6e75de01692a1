"""The vLLM adapter (vLLM 0.32, V1 KV-connector API). Importing this package imports vLLM."""

from .plugin import CONNECTOR_NAME, register

__all__ = ["CONNECTOR_NAME", "register"]
