"""vllm-kvcache-plugin: keep vLLM's prompt KV cache outside the engine.

Importing this package never imports vLLM: the vLLM adapter lives in
``vllm_kvcache_plugin.integration.vllm`` and is loaded by vLLM's plugin system.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
