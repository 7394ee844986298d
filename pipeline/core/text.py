"""Words for counts in what layertap prints."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 layer``, ``2 layers``, ``1,000 images``; ``many`` where the plural is not ``word + "s"``."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def size_text(n: float) -> str:
    """Bytes for a person, in the binary units of ``--memory-budget`` and ``df -h``: ``12 KiB``, ``4.2 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**10:,.0f} KiB"
