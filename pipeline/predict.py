"""Classify new images with a trained model folder: the backbone runs as its manifest says."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np

from pipeline import LayertapError
from pipeline.classify import load_model
from pipeline.images import decode_image, default_workers, iter_decoded


def list_image_files(inputs) -> list[Path]:
    """Files as given, and every non-hidden file under the given folders (sorted)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif item.exists():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist")
    return files


def class_scores(estimator, X) -> np.ndarray:
    """Class probabilities, or a softmax of decision scores for classifiers without them."""
    if hasattr(estimator, "predict_proba"):  # GridSearchCV and Pipeline hide it when the model lacks it
        return np.asarray(estimator.predict_proba(X))
    scores = np.asarray(estimator.decision_function(X), dtype=np.float64)
    if scores.ndim == 1:
        scores = np.stack([-scores, scores], axis=1)
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return scores / scores.sum(axis=1, keepdims=True)


def predict_images(model_dir: str | os.PathLike, inputs, top_k: int = 3, batch_size: int = 32,
                   workers: int = 0) -> list[dict]:
    """Top-k classes for each image; a bad image gets an ``error`` instead.

    Raises:
        LayertapError: the weights at hand differ from the ones the model was trained on.
    """
    from pipeline.backbones import build_backbone, build_extractor, get_backbone, resolve_weights

    estimator, m = load_model(model_dir)
    if m["format"] == "keras-images":  # fine-tuned: the whole network is in the model file
        def scores(x):
            return np.asarray(estimator.predict_on_batch(x), dtype=np.float64)
    else:
        backbone = get_backbone(m["backbone"])
        weights = resolve_weights(backbone, m["weights_arg"], seed=m["seed"])
        if weights.sha256 != m["weights_sha256"]:
            raise LayertapError(f"the {m['weights']} weights here (sha256 {weights.sha256[:16]}) are not the "
                                f"ones {model_dir} was trained on ({m['weights_sha256'][:16]}); its features "
                                "would not match")
        base = build_backbone(backbone, weights, m["image_size"], m["precision"])
        extractor = build_extractor(base, backbone, [m["tap"]], m["pooling"])

        def scores(x):
            return class_scores(estimator, np.asarray(extractor.predict_on_batch(x)[m["tap"]]))

    files = list_image_files(inputs)
    decode = partial(decode_image, size=m["image_size"], resize=m["resize"], draft=m["draft"])
    results: list[dict] = [{} for _ in files]
    batch: list[tuple[int, np.ndarray]] = []

    def flush():
        for (i, _), row in zip(batch, scores(np.stack([a for _, a in batch]))):
            order = np.argsort(row)[::-1][:top_k]
            results[i] = {"path": str(files[i]), "top": [(m["class_names"][j], float(row[j])) for j in order]}
        batch.clear()

    for i, array, reason in iter_decoded(files, decode, workers or default_workers(), 2 * batch_size):
        if array is None:
            results[i] = {"path": str(files[i]), "error": reason}
            continue
        batch.append((i, array))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return results
