"""Integrations with inference engines (only vLLM today). Nothing here is imported by the core."""
