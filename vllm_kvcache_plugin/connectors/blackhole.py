"""``blackhole://``: drops every write and misses every read (the ceiling of the remote path)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Buffer, RemoteConnector


class BlackholeConnector(RemoteConnector):
    schemes = ("blackhole",)
    listing = "none"
    stores_values = False

    async def exists(self, key: str) -> bool:
        return False

    async def batched_exists(self, keys: Sequence[str]) -> list[bool]:
        return [False] * len(keys)

    async def get(self, key: str) -> Buffer | None:
        return None

    async def batched_get(self, keys: Sequence[str]) -> list[Buffer | None]:
        return [None] * len(keys)

    async def put(self, key: str, value: Buffer) -> None:
        return None

    async def batched_put(self, items: Sequence[tuple[str, Buffer]]) -> None:
        return None

    async def delete(self, key: str) -> bool:
        return False

    async def list(self, prefix: str = "") -> list[str]:
        return []

    async def ping(self) -> bool:
        return True
