"""Storage tiers (hot CPU cache, local disk, remote) behind one manager."""

from .manager import LookupResult, StorageManager
from .tier import Tier, TierName

__all__ = ["LookupResult", "StorageManager", "Tier", "TierName"]
