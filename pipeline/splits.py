"""Which images train, validate and test: one split function for every stage, and its fingerprint.

Stages two and three call :func:`resolve_splits` with the same arguments, so they test on the
same images; :func:`test_rows_sha256` lets a later stage check that.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline import LayertapError
from pipeline.images import SPLITS


def resolve_splits(store, seed: int = 0, test_fraction: float = 0.25,
                   val_fraction: float = 0.15) -> tuple[np.ndarray, str]:
    """Each row's split: the one recorded in the store, else a seeded stratified split.

    Args:
        store: A :class:`pipeline.store.FeatureStore`.

    Returns:
        ``(splits, source)``: an array of ``train``/``val``/``test`` and where it came from.

    Raises:
        LayertapError: some rows have a split and others do not, or there is no test row.
    """
    recorded = store.splits
    has = np.isin(recorded, SPLITS)
    if has.all():
        if not (recorded == "test").any() or not (recorded == "train").any():
            raise LayertapError(f"{store.path.name}: the recorded split needs train and test rows")
        return recorded.astype(str), "recorded in the store"
    if has.any():
        raise LayertapError(f"{store.path.name}: {int(has.sum())} rows have a split and {int((~has).sum())} "
                            "do not; give every image a split or none")
    from sklearn.model_selection import train_test_split

    rows, labels = np.arange(len(store)), store.labels
    try:
        rest, test = train_test_split(rows, test_size=test_fraction, stratify=labels, random_state=seed)
        train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                      stratify=labels[rest], random_state=seed)
    except ValueError as exc:
        raise LayertapError(f"{store.path.name}: too few images per class for a stratified "
                            f"train/val/test split ({exc}); add images or give a split") from None
    splits = np.empty(len(store), dtype=object)
    splits[train], splits[val], splits[test] = "train", "val", "test"
    return splits.astype(str), f"stratified, seed {seed}, test {test_fraction}, val {val_fraction}"


def fit_rows(splits: np.ndarray, labels: np.ndarray, seed: int, val_fraction: float):
    """Train and validation row indices; a split without val rows gets a stratified share of train.

    Returns:
        ``(train, val, source)``, ``source`` saying where the val rows came from.
    """
    train, val = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
    if len(val):
        return train, val, "the split's val rows"
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(train, test_size=val_fraction, stratify=labels[train], random_state=seed)
    return np.sort(train), np.sort(val), f"{val_fraction:.0%} of train, stratified, seed {seed}"


def test_rows_sha256(store, splits: np.ndarray) -> str:
    """A fingerprint of which images are the test images, to check two stages used the same."""
    paths = [p for p, s in zip(store.rows.paths, splits) if s == "test"]
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()
