"""Storage tiers (hot CPU cache, local disk, remote) behind one manager."""

from .manager import LookupResult, StorageManager

__all__ = ["LookupResult", "StorageManager"]
