"""CacheGen's bins setting: "32:10,16" = 32 quantisation bins for the first 10 layers, then 16."""

from __future__ import annotations


def parse_bins_spec(spec: str) -> list[tuple[int, int | None]]:
    """Parse "32:10,16" into [(32, 10), (16, None)]: 32 bins for 10 layers, then 16 for the rest."""
    groups: list[tuple[int, int | None]] = []
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{spec!r} is empty; write e.g. '32:10,16'")
    for i, part in enumerate(parts):
        bins_text, _, count_text = part.partition(":")
        try:
            bins = int(bins_text)
            count = int(count_text) if count_text else None
        except ValueError:
            raise ValueError(f"{spec!r}: {part!r} is not BINS[:LAYERS]; write e.g. '32:10,16'") from None
        if not 2 <= bins <= 256:
            raise ValueError(f"{spec!r}: {bins} bins is outside 2..256")
        if count is None and i != len(parts) - 1:
            raise ValueError(f"{spec!r}: only the last group may omit its layer count")
        if count is not None and count <= 0:
            raise ValueError(f"{spec!r}: layer count {count} must be positive")
        groups.append((bins, count))
    return groups
