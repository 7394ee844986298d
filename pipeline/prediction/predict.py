"""Classify new images with a trained model folder: the backbone runs as its manifest says.

A model folder (:mod:`pipeline.runs.artifacts`) carries its store's recipe, so new images are decoded
and turned into features exactly as stage one did (:class:`pipeline.store.manifest.StoreManifest`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.core.parallel import default_workers
from pipeline.core.taps import tap_parts
from pipeline.data.decoding import iter_decoded
from pipeline.runs.artifacts import load_model
from pipeline.store.manifest import StoreManifest


def list_image_files(inputs) -> list[Path]:
    """Files as given, and every non-hidden entry but folders under the given folders (sorted): a named pipe or
    device among them is reported with its reason when it is read, never read."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if not p.is_dir() and not p.name.startswith("."))
        elif item.exists():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist")
    return files


def predict(model_dir: str | os.PathLike, inputs, top_k: int = 3, batch_size: int = 32,
            workers: int = 0, trust: bool = False) -> list[dict]:
    """Top-k classes for each image; a bad image gets an ``error`` instead.

    Args:
        model_dir: A model folder written by stage two or three.
        inputs: Image files and folders (every non-hidden file under a folder).
        trust: Load a pickled model (see :func:`pipeline.runs.artifacts.load_model`); only for folders you trust.

    Returns:
        Per file, in order: ``{"path", "top": [(class, probability), ...]}`` or ``{"path", "error"}``.

    Raises:
        LayertapError: the weights at hand differ from the ones the model was trained on.
    """
    estimator, m = load_model(model_dir, trust=trust)
    recipe = StoreManifest.from_dict(m)
    if m["format"] == "keras-images":  # fine-tuned: the whole network is in the model file
        def scores(x):
            return np.asarray(estimator.predict_on_batch(x), dtype=np.float64)
    else:
        from pipeline.heads.classifiers import class_scores  # scikit-learn

        parts = tap_parts(m["tap"])  # a multi-tap model's features are its taps' side by side
        extractor = recipe.create_extractor(parts)

        def scores(x):
            pooled = extractor(x)
            return class_scores(estimator, np.concatenate([np.asarray(pooled[part]) for part in parts], axis=1))

    files = list_image_files(inputs)
    decode = recipe.decoder()
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
