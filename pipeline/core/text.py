"""Words for counts in what layertap prints."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 layer``, ``2 layers``, ``1,000 images``; ``many`` where the plural is not ``word + "s"``."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def size_text(n: float) -> str:
    """Bytes for a person: ``4.2 MB``, ``21.5 GB``, ``12 kB`` (decimal units, as ``df -H`` and a file manager)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.0f} kB"
