"""Model folders: what stages two and three write and ``predict`` reads, saved and loaded safely.

A model folder ``models/<run>/<tap>-<classifier>/`` holds the model file, ``manifest.json``
(the store's recipe for computing features from new images, the sha256 of every file it
lists), ``metrics.json``, ``report.md`` and plots. Folders are written to a temporary name and
renamed into place, and a file whose sha256 differs from the manifest is refused before it is
deserialised.

How a model is written is the estimator's own business, through one protocol: an object with
``save_artifact(folder) -> (format, file name, extra manifest fields)`` saves itself (the Keras
Dense head, a fine-tuned network); anything else is a scikit-learn estimator, saved with joblib.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

from pipeline import LayertapError, import_keras
from pipeline.runtime import versions
from pipeline.weights import sha256_file

MANIFEST = "manifest.json"
# The model file of each format: the Dense head, a fine-tuned model (pixels in), any other estimator.
MODEL_FILES = {"keras": "head.keras", "keras-images": "model.keras", "joblib": "model.joblib"}


def run_folder(out_dir: str | os.PathLike, run: str | None, store) -> Path:
    """``<out_dir>/<run>``; the run defaults to the store's name, so stages two and three share a folder."""
    return Path(out_dir) / (run or store.path.stem)


def model_manifest(store, tap: str, classifier: str, settings) -> dict:
    """The manifest of a model trained on ``tap`` of ``store``: the store's recipe and what was trained."""
    return {
        **store.manifest.recipe(), "classifier": classifier, "tap": tap, "class_names": list(store.class_names),
        "store": str(store.path), "store_key": store.key,
        "settings": asdict(settings) if is_dataclass(settings) else dict(settings),
        "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class KerasImageModel:
    """A fine-tuned network (uint8 pixels in, class probabilities out) as a model-folder artifact."""

    def __init__(self, model):
        self.model = model

    def save_artifact(self, folder: Path) -> tuple[str, str, dict]:
        self.model.save(folder / MODEL_FILES["keras-images"])
        return "keras-images", MODEL_FILES["keras-images"], {}


def save_model(estimator, model_dir: Path, manifest: dict) -> Path:
    """Write a fitted estimator (or a :class:`KerasImageModel`) and its manifest into ``model_dir``.

    The folder is replaced as a whole.
    """
    model_dir = Path(model_dir)
    tmp = model_dir.with_name(model_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if hasattr(estimator, "save_artifact"):
        fmt, name, extra = estimator.save_artifact(tmp)
    else:
        import joblib

        fmt, name, extra = "joblib", MODEL_FILES["joblib"], {}
        joblib.dump(estimator, tmp / name)
    manifest = {**manifest, **extra, "format": fmt, "files": {name: sha256_file(tmp / name)}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)
    return model_dir


def load_model(model_dir: str | os.PathLike):
    """Load a model folder, refusing any file whose sha256 differs from its manifest.

    Returns:
        ``(estimator, manifest)``; for a fine-tuned model (format ``keras-images``) the estimator
        is the ``keras.Model`` that maps uint8 pixels to class probabilities.

    Raises:
        FileNotFoundError: not a model folder.
        LayertapError: a file was changed after training (checked before it is deserialised), or
            the format is unknown.
    """
    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{model_dir} is not a layertap model folder (no {MANIFEST}); "
                                "train one with `layertap classify`")
    manifest = json.loads((model_dir / MANIFEST).read_text())
    for name, expected in manifest.get("files", {}).items():
        path = model_dir / name
        actual = sha256_file(path) if path.is_file() else "missing"
        if actual != expected:
            raise LayertapError(f"{path} does not match its manifest (sha256 {actual[:16]}, expected "
                                f"{expected[:16]}); it was changed after training. Refusing to load it: "
                                "retrain with `layertap classify`")
    fmt = manifest.get("format")
    if fmt not in MODEL_FILES:
        raise LayertapError(f"{model_dir / MANIFEST}: format {fmt!r} is not known; use one of: {', '.join(MODEL_FILES)}")
    path = model_dir / MODEL_FILES[fmt]
    if fmt == "joblib":
        import joblib

        return joblib.load(path), manifest
    keras = import_keras()
    import pipeline.layers  # noqa: F401 - registers the custom layers a fine-tuned model uses

    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    if fmt == "keras":
        from pipeline.classifiers import DenseHeadClassifier

        model = DenseHeadClassifier.from_keras(model, list(range(len(manifest["class_names"]))), manifest["params"])
    return model, manifest
