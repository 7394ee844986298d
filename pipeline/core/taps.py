"""Multi-tap names: ``block3_pool+block4_pool`` is the concatenation of those taps' pooled features, one model
trained on several layers at once (the linear evaluation of DINO concatenates its last blocks' outputs so)."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.core.errors import LayertapError

JOIN = "+"


def tap_parts(tap: str) -> tuple[str, ...]:
    """``"block3_pool+block4_pool"`` -> ``("block3_pool", "block4_pool")``; a single tap is one part.

    Raises:
        LayertapError: a part is empty (``a++b``, ``a+``, ``""``): said so, not "no tap ''" further on.
    """
    parts = tuple(tap.split(JOIN))
    if not all(parts):
        raise LayertapError(f"{tap!r}: a layer name is empty (a '{JOIN}' with nothing on one side?); name taps as "
                            f"block3_pool, or join them as block3_pool{JOIN}block4_pool")
    return parts


def is_multi_tap(tap: str) -> bool:
    return JOIN in tap


def canonical_tap(tap: str, taps: Sequence[str], where: str) -> str:
    """``tap`` with its parts in the order of ``taps`` (a store's, low to high), so that ``b+a`` and ``a+b`` are
    one model.

    Raises:
        LayertapError: a part is not in ``taps`` (named, with the extraction that adds it), or is given twice (or
            is empty: :func:`tap_parts`).
    """
    parts = tap_parts(tap)
    unknown = [part for part in parts if part not in taps]
    if unknown:
        raise LayertapError(f"{where} has no tap {', '.join(unknown)}; it has {', '.join(taps)}. "
                            f"Extract it first: layertap extract ... --layers {','.join(unknown)}")
    if len(set(parts)) < len(parts):
        raise LayertapError(f"{tap}: a tap is named twice; join different taps, e.g. {JOIN.join(taps[:2])}")
    return JOIN.join(sorted(parts, key=list(taps).index))
