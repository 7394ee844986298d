"""Scoring on held-out images, the same way for every stage: choosing on val, test metrics, a gain with its interval.

Choices are made on the val rows (:func:`best_on_val`, :func:`rank_on_val`, :func:`epoch_rank`); the test rows
are scored once, for the report (:func:`score_predictions`, :func:`bootstrap_gain`).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.core.text import plural


def best_on_val(rows: list[dict]) -> dict:
    """The row with the highest ``val_accuracy``; of equals, the first (the order given: taps low to high)."""
    return max(rows, key=lambda r: r["val_accuracy"])


def epoch_rank(val: dict) -> tuple[float, float]:
    """How training epochs (or a phase's start) compare on val: higher ``val_accuracy``, then lower ``val_loss``;
    the larger the better. The one rule both the weights kept and the epoch reported follow."""
    return val["val_accuracy"], -val["val_loss"]


def rank_on_val(rows: list[dict]) -> list[dict]:
    """Sort rows best first by ``val_accuracy``, in place; equals keep the order given. Never by test."""
    rows.sort(key=lambda r: -r["val_accuracy"])
    return rows


# float32's smallest normal number: the floor under a probability whose log is taken, here and in training's loss
# (:func:`pipeline.backbones.layers.crossentropy`), so the two measure the same thing.
TINY = float(np.finfo(np.float32).tiny)


def softmax(scores) -> np.ndarray:
    """Row-wise softmax in float64, shifted by each row's maximum (no overflow at scores of 1000)."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return scores / scores.sum(axis=1, keepdims=True)


def log_loss(probabilities: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of class ``probabilities`` (n, k) on integer labels ``y`` (floored at :data:`TINY`)."""
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y)), y], TINY, 1.0))))


def score_predictions(y_true: np.ndarray, predicted: np.ndarray, class_names, probabilities=None) -> dict:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix as JSON values; the predictions as an
    array (a model folder keeps them in ``per_image.npz``: :mod:`pipeline.runs.per_image`).

    Args:
        probabilities: ``(n, classes)`` class probabilities (column j: class j); then each image's
            ``confidence`` (the probability of its predicted class) and ``true_probability`` (of its true
            class) are kept too, as arrays: the report's gallery of the images it gets most wrong.
    """
    from sklearn.metrics import classification_report, confusion_matrix

    y_true, predicted = np.asarray(y_true), np.asarray(predicted)
    labels = list(range(len(class_names)))
    return {
        "accuracy": float((predicted == y_true).mean()) if len(y_true) else 0.0,
        "report": classification_report(y_true, predicted, labels=labels, target_names=list(class_names),
                                        output_dict=True, zero_division=0),
        "confusion": confusion_matrix(y_true, predicted, labels=labels).tolist(),
        "predictions": predicted,
    } | ({} if probabilities is None else {
        "confidence": np.asarray(probabilities)[np.arange(len(predicted)), predicted],
        "true_probability": np.asarray(probabilities)[np.arange(len(y_true)), y_true]})


def accuracy_interval(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of ``correct`` out of ``n`` test images (exact enough at the
    ends, where the normal approximation leaves [0, 1]); ``(0, 1)`` for no images."""
    if n <= 0:
        return 0.0, 1.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_gain(correct_new: np.ndarray, correct_old: np.ndarray, resamples: int = 10_000,
                   seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Accuracy gain ``new - old`` on the same test images and its paired bootstrap interval.

    Args:
        correct_new, correct_old: Per test image, whether each model got it right (same order).

    Returns:
        ``{"gain", "low", "high", "p_not_better"}``: the gain, the interval's ends, and the share
        of resamples where the new model is not better.
    """
    a, b = np.asarray(correct_new, dtype=np.float64), np.asarray(correct_old, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"need two equal-length 1-d arrays of test results, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    diff = a - b
    gains = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory for large test sets
        idx = rng.integers(0, len(a), size=(min(1000, resamples - start), len(a)))
        gains[start:start + len(idx)] = diff[idx].mean(axis=1)
    tail = (1 - level) / 2
    return {"gain": float(diff.mean()), "low": float(np.quantile(gains, tail)),
            "high": float(np.quantile(gains, 1 - tail)), "p_not_better": float((gains <= 0).mean()),
            "resamples": resamples, "level": level}


def check_two_classes(class_names, where: str, skipped=()) -> None:
    """A classifier tells classes apart: fewer than two with usable images is an error (one line, the first
    skip reasons), at extraction and at classification.

    Raises:
        LayertapError: naming ``where`` and what was found.
    """
    if len(class_names) >= 2:
        return
    first = (f"; {plural(len(skipped), 'file')} skipped, first: {skipped[0][0]} ({skipped[0][1]})"
             if len(skipped) else "")
    found = f"only class {class_names[0]!r} has" if class_names else "no class has"
    raise LayertapError(f"{where}: {found} usable images, and a classifier needs two classes or more{first}")
