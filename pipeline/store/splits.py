"""Which images train, validate and test: one split function for every stage, and its fingerprint.

Stages two and three call :func:`resolve_splits` with the same arguments, so they test on the
same images; :func:`test_rows_sha256` lets a later stage check that.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.data.images import SPLITS


class Splits:
    """Each row's split as one int8 code: 0 none, then :data:`pipeline.data.images.SPLITS` in order from 1. At 4 M
    rows that is 4 MB, where an array of the strings takes 32 (objects) or 80 (``<U5``), held through training.

    Compared with a split's name it gives that split's mask, as an array of the strings would
    (``splits == "val"``); a name that is not a split raises ``ValueError`` rather than matching no row.
    """

    __hash__ = None  # == gives a mask

    def __init__(self, codes: np.ndarray):
        self.codes = np.asarray(codes, dtype=np.int8)

    @staticmethod
    def code(name: str) -> int:
        """The code of ``name`` (``""``: no split)."""
        if name == "":
            return 0
        if name not in SPLITS:
            raise ValueError(f"{name!r} is not a split: {', '.join(SPLITS)} (or '' for none)")
        return SPLITS.index(name) + 1

    def __eq__(self, name: str) -> np.ndarray:
        return self.codes == self.code(name)

    def __ne__(self, name: str) -> np.ndarray:
        return self.codes != self.code(name)

    def __len__(self) -> int:
        return len(self.codes)

    def rows(self, name: str) -> np.ndarray:
        """The increasing indices of the rows of split ``name``: int32 where they fit (half of int64's bytes)."""
        return np.flatnonzero(self == name).astype(np.int32 if len(self) < 2**31 else np.int64)

    def assign(self, rows: np.ndarray, name: str) -> None:
        """Put ``rows`` in split ``name``."""
        self.codes[rows] = self.code(name)

    def names(self) -> np.ndarray:
        """Each row's split name, an object array (for small stores and for reading: 8 bytes a row)."""
        return np.array(["", *SPLITS], dtype=object)[self.codes]


def resolve_splits(store, seed: int = 0, test_fraction: float = 0.25,
                   val_fraction: float = 0.15) -> tuple[Splits, str]:
    """Each row's split, always with train, val and test rows: every choice is made on val, test scored once.

    The split recorded in the store is used; where it has no val rows, a stratified share of the
    train rows (``val_fraction`` of all rows, seeded) becomes val. A store with no split at all gets
    a seeded stratified train/val/test split.

    Args:
        store: A :class:`pipeline.store.feature_store.FeatureStore`.

    Returns:
        ``(splits, source)``: each row's ``train``/``val``/``test`` (:class:`Splits`) and where it came from.

    Raises:
        LayertapError: some rows have a split and others do not, or there is no train or test row.
    """
    from sklearn.model_selection import train_test_split

    recorded, labels = store.splits, store.labels  # streamed columns, not a Python string per row
    has = recorded != ""
    if has.all():
        splits = recorded
        if not (splits == "test").any() or not (splits == "train").any():
            raise LayertapError(f"{store.path.name}: the recorded split needs train and test rows")
        if (splits == "val").any():
            return splits, "recorded in the store"
        train = splits.rows("train")
        share = min(0.5, val_fraction * len(splits) / len(train))
        try:
            _, val = train_test_split(train, test_size=share, stratify=labels[train], random_state=seed)
        except ValueError as exc:
            raise LayertapError(f"{store.path.name}: the recorded split has no val rows and too few train images "
                                f"per class to carve them ({exc}); add images or give val rows") from None
        splits.assign(val, "val")
        return splits, (f"recorded in the store (train/test); val carved from train: {len(val)} images, "
                        f"stratified, seed {seed}")
    if has.any():
        raise LayertapError(f"{store.path.name}: {int(has.sum())} rows have a split and {int((~has).sum())} "
                            "do not; give every image a split or none")
    rows = np.arange(len(store))
    try:
        rest, test = train_test_split(rows, test_size=test_fraction, stratify=labels, random_state=seed)
        train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                      stratify=labels[rest], random_state=seed)
    except ValueError as exc:
        raise LayertapError(f"{store.path.name}: too few images per class for a stratified "
                            f"train/val/test split ({exc}); add images or give a split") from None
    splits = Splits(np.zeros(len(store), np.int8))
    for rows, name in ((train, "train"), (val, "val"), (test, "test")):
        splits.assign(rows, name)
    return splits, f"stratified, seed {seed}, test {test_fraction}, val {val_fraction}"


def test_rows_sha256(store, splits: Splits) -> str:
    """A fingerprint of which images are the test images, to check two stages used the same: the sha256 of their
    paths (UTF-8, as stored), one a line."""
    test, digest, lines = splits == "test", hashlib.sha256(), 0
    for start, paths in store.column_slices("paths"):  # streamed: the column whole is a Python bytes per row
        for path in paths[test[start:start + len(paths)]]:
            digest.update(b"\n" * (lines > 0) + _as_bytes(path))
            lines += 1
    return digest.hexdigest()


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
