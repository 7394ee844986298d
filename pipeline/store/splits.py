"""Which images train, validate and test: one split function for every stage, and its fingerprint.

Stages two and three call :func:`resolve_splits` with the same arguments, so they test on the
same images; :func:`test_rows_sha256` lets a later stage check that.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.core.errors import LayertapError


def resolve_splits(store, seed: int = 0, test_fraction: float = 0.25,
                   val_fraction: float = 0.15) -> tuple[np.ndarray, str]:
    """Each row's split, always with train, val and test rows: every choice is made on val, test scored once.

    The split recorded in the store is used; where it has no val rows, a stratified share of the
    train rows (``val_fraction`` of all rows, seeded) becomes val. A store with no split at all gets
    a seeded stratified train/val/test split.

    Args:
        store: A :class:`pipeline.store.feature_store.FeatureStore`.

    Returns:
        ``(splits, source)``: an array of ``train``/``val``/``test`` (objects: the three strings shared) and where
        it came from.

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
        train = np.flatnonzero(splits == "train")
        share = min(0.5, val_fraction * len(splits) / len(train))
        try:
            _, val = train_test_split(train, test_size=share, stratify=labels[train], random_state=seed)
        except ValueError as exc:
            raise LayertapError(f"{store.path.name}: the recorded split has no val rows and too few train images "
                                f"per class to carve them ({exc}); add images or give val rows") from None
        splits[val] = "val"
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
    splits = np.empty(len(store), dtype=object)  # three shared strings, as FeatureStore.splits
    splits[train], splits[val], splits[test] = "train", "val", "test"
    return splits, f"stratified, seed {seed}, test {test_fraction}, val {val_fraction}"


def test_rows_sha256(store, splits: np.ndarray) -> str:
    """A fingerprint of which images are the test images, to check two stages used the same: the sha256 of their
    paths (UTF-8, as stored), one a line."""
    test, digest, lines = np.asarray(splits) == "test", hashlib.sha256(), 0
    for start, paths in store.column_slices("paths"):  # streamed: the column whole is a Python bytes per row
        for path in paths[test[start:start + len(paths)]]:
            digest.update(b"\n" * (lines > 0) + _as_bytes(path))
            lines += 1
    return digest.hexdigest()


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
