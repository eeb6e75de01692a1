"""Deterministic natural-language prompts, built from text every Debian machine has.

The licence texts in /usr/share/common-licenses are long, natural English and identical on every
machine of this image; a fixed word list is the fallback elsewhere.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

_SOURCES = ("GPL-3", "GFDL-1.3", "Apache-2.0", "LGPL-3", "MPL-2.0")
_FALLBACK = ("the river carried small boats past the old mill while children watched from the bridge "
             "and their parents talked about the harvest the weather and the price of bread").split(" ")


@lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    words: list[str] = []
    for name in _SOURCES:
        path = Path("/usr/share/common-licenses") / name
        if path.exists():
            words.extend(path.read_text(errors="replace").split())
    if len(words) < 5000:
        rng = random.Random(0)
        words.extend(rng.choice(_FALLBACK) for _ in range(20000))
    return tuple(words)


def text(num_words: int, offset: int = 0) -> str:
    """``num_words`` consecutive words of the corpus starting at ``offset`` (wrapping around)."""
    words = corpus_words()
    return " ".join(words[(offset + i) % len(words)] for i in range(num_words))


def shared_prefix_family(num: int, prefix_words: int, tail_words: int, offset: int = 0) -> list[str]:
    """``num`` prompts that share one prefix and differ in their tails (like users of one system prompt)."""
    prefix = text(prefix_words, offset)
    return [f"{prefix}\n\nQuestion {i}: {text(tail_words, offset + 5000 + 97 * i)}" for i in range(num)]
