"""Scoring on held-out images, the same way for every stage: test metrics, and a gain with its interval."""

from __future__ import annotations

import numpy as np


def score_predictions(y_true: np.ndarray, predicted: np.ndarray, class_names) -> dict:
    """Accuracy, per-class precision/recall/F1, the confusion matrix and the predictions, as JSON values."""
    from sklearn.metrics import classification_report, confusion_matrix

    y_true, predicted = np.asarray(y_true), np.asarray(predicted)
    labels = list(range(len(class_names)))
    return {
        "accuracy": float((predicted == y_true).mean()) if len(y_true) else 0.0,
        "report": classification_report(y_true, predicted, labels=labels, target_names=list(class_names),
                                        output_dict=True, zero_division=0),
        "confusion": confusion_matrix(y_true, predicted, labels=labels).tolist(),
        "predictions": predicted.tolist(),
    }


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
