"""Words for counts in what layertap prints."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 layer``, ``2 layers``, ``1,000 images``; ``many`` where the plural is not ``word + "s"``."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"
