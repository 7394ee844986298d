"""Stage two at stage one's scale: the ``probe`` trained on a tap streamed from its store, never held whole.

The training rows are read in shuffled chunks (:func:`shuffled_batches`), the standardisation comes from one
streamed pass (:meth:`pipeline.store.feature_store.FeatureStore.moments`), every C trains in the same passes
(:func:`pipeline.heads.probe.train_all_cs`), C is chosen on the val rows in one more pass, and the test rows
are scored once, in one pass. Memory: a few batches of features, and a label per row.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.core.evaluation import check_two_classes, score_predictions

CHUNK_BYTES = 64 << 20  # features read together (consecutive rows of the store), then shuffled with another chunk


def tap_bytes(store, tap: str) -> int:
    """What holding a tap in memory as float32 takes."""
    return len(store) * store.width(tap) * 4


def shuffled_batches(store, tap: str, rows: np.ndarray, labels: np.ndarray, batch_size: int, rng):
    """One epoch of ``(features, class indices)`` over ``rows``: chunks of :data:`CHUNK_BYTES` of consecutive rows in
    a random order, two chunks mixed and shuffled at a time (stores are often ordered by class: a chunk alone
    would hold few classes)."""
    per_chunk = max(batch_size, CHUNK_BYTES // (4 * store.width(tap)))
    chunks = [rows[i:i + per_chunk] for i in range(0, len(rows), per_chunk)]
    order = rng.permutation(len(chunks))
    for pair in range(0, len(order), 2):
        picked = np.sort(np.concatenate([chunks[i] for i in order[pair:pair + 2]]))
        features = np.concatenate([v for _, v in store.iter_batches(tap, picked, batch_size=per_chunk)])
        mix = rng.permutation(len(picked))
        for start in range(0, len(mix), batch_size):
            take = mix[start:start + batch_size]
            yield features[take].astype(np.float32, copy=False), labels[picked[take]]


def fit_streamed_probe(store, tap: str, splits: np.ndarray, seed: int = 0, params: dict | None = None):
    """``(estimator, metrics)`` as :func:`pipeline.heads.classifiers.train_one` returns them, for ``probe`` on a
    tap streamed from ``store``."""
    from pipeline.heads.probe import StreamedProbe, train_all_cs, val_scores  # scikit-learn

    check_two_classes(store.class_names, str(store.path))
    labels = store.labels  # read once per store (not store.rows: a Python string per row of its other columns)
    # int32 indices where they fit: 4 bytes a row instead of 8, at 10^7 rows what the split itself takes
    index = np.int32 if len(splits) < 2**31 else np.int64
    train, val, test = (np.flatnonzero(splits == name).astype(index) for name in ("train", "val", "test"))
    if not len(val):
        raise LayertapError(f"{store.path.name}: no val rows to choose C on; split it with "
                            "pipeline.store.splits.resolve_splits")
    probe = StreamedProbe(**{"random_state": seed, **(params or {})})
    probe.classes_ = np.arange(len(store.class_names))
    missing = np.setdiff1d(probe.classes_, labels[train])
    if len(missing):
        raise LayertapError(f"class {', '.join(store.class_names[i] for i in missing)} has no training image in "
                            f"{store.path.name}")
    started = time.perf_counter()
    batch = store.batch_rows(tap, CHUNK_BYTES // 4)  # val and test batches, and the moments' (in float64)
    _, mean, variance = store.moments(tap, train, batch)
    rng = np.random.default_rng(seed)
    weights = train_all_cs(lambda: shuffled_batches(store, tap, train, labels, probe.rows_per_step(len(train)), rng),
                           probe.steps(len(train)), len(train), mean, variance, len(probe.classes_), probe.Cs,
                           probe.learning_rate)
    scores = val_scores(weights, ((v.astype(np.float32), labels[r]) for r, v in store.iter_batches(tap, val, batch)))
    probe.keep_best(weights, scores, len(train))
    fit_seconds = time.perf_counter() - started
    val_predicted = np.concatenate([probe.predict(v) for _, v in store.iter_batches(tap, val, batch)])
    predicted, confidence, true_probability = [], [], []
    for rows, values in store.iter_batches(tap, test, batch):
        probabilities = probe.predict_proba(values)
        predicted.append(probabilities.argmax(axis=1))
        confidence.append(probabilities.max(axis=1))
        true_probability.append(probabilities[np.arange(len(rows)), labels[rows]])
    predicted = np.concatenate(predicted) if predicted else np.zeros(0, int)
    metrics = {
        **score_predictions(labels[test], predicted, store.class_names),
        "confidence": np.round(np.concatenate(confidence or [np.zeros(0)]), 4).tolist(),
        "true_probability": np.round(np.concatenate(true_probability or [np.zeros(0)]), 4).tolist(),
        "val_accuracy": float((val_predicted == labels[val]).mean()), "val_predictions": val_predicted.tolist(),
        "n_train": len(train), "n_val": len(val), "n_test": len(test), "fit_seconds": fit_seconds,
        "trainable_params": probe.trainable_params_, "chosen": dict(probe.fit_summary_), "streamed": True,
    }
    return probe, metrics
