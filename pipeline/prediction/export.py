"""``layertap export``: one file from uint8 RGB pixels to class probabilities, to run where layertap is not.

The exported network is the store's recipe made whole: the backbone trunk up to the tap (float32, the weights
checked against the store's), its preprocessing, the store's pooling, and the head: a linear probe or SVM folded
into one softmax layer (:func:`pipeline.heads.classifiers.probe_weights`, the same scores ``layertap predict``
gives), the Dense head as it is, or a fine-tuned network as it is. Decoding is not in it: an image is decoded
and resized to ``image_size`` square as the store's manifest says (``resize``, ``interpolation``), and the ONNX
file carries those in its metadata, with the class names.

Formats: ``onnx`` (onnxruntime, no TensorFlow or Keras needed; Keras's exporter, which uses tf2onnx on the
TensorFlow and JAX backends), ``saved_model`` (TensorFlow Serving, the TensorFlow backend only) and ``keras``
(a ``.keras`` file; loading it needs layertap's custom layers).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from pipeline.backbones.build import build_backbone, compose_classifier, cut_trunk
from pipeline.backbones.registry import get_backbone
from pipeline.core.errors import LayertapError
from pipeline.core.runtime import import_keras
from pipeline.runs.artifacts import load_model
from pipeline.runs.atomic import check_replaceable, folder_lock, replace_folder, temporary_beside
from pipeline.runs.summary import collect_rows
from pipeline.store.manifest import StoreManifest

FORMATS = {"onnx": ".onnx", "saved_model": "", "keras": ".keras"}


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model folder as given; a run folder gives its recommended model (best on val, every stage)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    if path.is_dir() and (path / "comparison.json").is_file():
        summary = collect_rows(path)
        if summary.recommended:
            return Path(summary.recommended["model_dir"])
    raise LayertapError(f"{path} is neither a model folder nor a run folder with models; give models/<run> (its "
                        "recommended model) or models/<run>/<tap>-<classifier>")


def pixels_model(estimator, manifest: dict, model_dir: Path | None = None):
    """The Keras model from uint8 pixels ``(n, size, size, 3)`` to class probabilities (see the module docstring).

    Raises:
        LayertapError: the classifier is not one network (a kNN, a random forest...), with what to do instead.
    """
    keras = import_keras()
    if manifest["format"] == "keras-images":
        network = estimator
    else:
        recipe = StoreManifest.from_dict(manifest)
        head = _head(estimator, manifest, model_dir)
        base = build_backbone(get_backbone(recipe.backbone), recipe.resolve_weights(), recipe.image_size, "float32")
        network, _ = compose_classifier(cut_trunk(base, manifest["tap"]), recipe.backbone, manifest["tap"],
                                          recipe.pooling, head)
    size = int(manifest["image_size"])
    pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    probabilities = _exportable(network)(keras.ops.cast(pixels, "float32"), training=False)
    return keras.Model(pixels, probabilities, name="layertap_classifier")


def _exportable(network):
    """``network`` with every ``Normalization`` (the Dense head's) as a :class:`Standardise`; other layers shared."""
    from pipeline.backbones.layers import Standardise  # Keras

    keras = import_keras()

    def swap(layer):
        return Standardise.like(layer) if isinstance(layer, keras.layers.Normalization) else layer

    if not any(isinstance(layer, keras.layers.Normalization) for layer in _all_layers(network)):
        return network
    return keras.models.clone_model(network, clone_function=swap, recursive=True)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _head(estimator, manifest: dict, model_dir: Path | None):
    from pipeline.heads.classifiers import build_probe_head, probe_weights  # scikit-learn
    from pipeline.heads.dense import DenseHeadClassifier

    if isinstance(estimator, DenseHeadClassifier):
        return estimator.model_
    try:
        return build_probe_head(*probe_weights(estimator))
    except ValueError:
        run = model_dir.parent if model_dir else Path("models") / Path(manifest.get("store", "<store>")).stem
        raise LayertapError(
            f"a {manifest['classifier']} model is not one network and cannot be exported; export the run's logreg, "
            f"linsvm or dense model instead (layertap export {run / (manifest['tap'] + '-logreg')}), or run this "
            "one with layertap predict") from None


def export_model(model: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None,
                 trust: bool = False) -> Path:
    """Export a model folder (or a run folder's recommended model) as one file; returns its path.

    Args:
        fmt: ``onnx``, ``saved_model`` or ``keras``.
        out: The file (a folder for ``saved_model``); default: beside the model folder, named after it.
        trust: As :func:`pipeline.runs.artifacts.load_model`.
    """
    if fmt not in FORMATS:
        raise LayertapError(f"--format {fmt} is not known; use one of: {', '.join(FORMATS)}")
    model_dir = resolve_model_dir(model)
    estimator, manifest = load_model(model_dir, trust=trust)
    keras = import_keras()
    if fmt == "saved_model" and keras.backend.backend() != "tensorflow":
        raise LayertapError("--format saved_model needs the TensorFlow backend (KERAS_BACKEND=tensorflow); "
                            "--format onnx runs anywhere")
    out = Path(out) if out else model_dir.parent / f"{model_dir.name}{FORMATS[fmt]}"
    check_replaceable(out, "--out")  # before the network is built
    network = pixels_model(estimator, manifest, model_dir)
    size = int(manifest["image_size"])
    network.predict_on_batch(np.zeros((1, size, size, 3), np.uint8))  # the exporters need a model that has run
    info = {"class_names": manifest["class_names"], "image_size": size, "resize": manifest.get("resize", "squash"),
            "interpolation": manifest.get("interpolation", "bilinear"), "input": "pixels: uint8 (n, size, size, 3) RGB",
            "output": "class probabilities (n, classes)", "source": str(model_dir),
            "backbone": manifest["backbone"], "weights": manifest["weights"], "tap": manifest["tap"],
            "classifier": manifest["classifier"]}
    work = temporary_beside(out)  # written whole there, then renamed into place: never half a file at `out`
    try:
        target = work / out.name
        if fmt == "onnx":
            _export_onnx(network, target, info)
        elif fmt == "saved_model":
            network.export(str(target), format="tf_saved_model", verbose=False)
        else:
            network.save(target.with_suffix(".keras"))  # Keras insists on the suffix
            target.with_suffix(".keras").rename(target)
        (work / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        if target.is_dir():
            with folder_lock(out):
                replace_folder(target, out)
        else:
            os.replace(target, out)
        os.replace(work / "info.json", f"{out}.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _export_onnx(network, path: Path, info: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise LayertapError("--format onnx needs onnx and tf2onnx: pip install 'layertap[export]'") from None
    with warnings.catch_warnings():  # Keras's tf2onnx shim asks NumPy about np.object
        warnings.simplefilter("ignore", FutureWarning)
        network.export(str(path), format="onnx", verbose=False)
    model = onnx.load(str(path))
    for key, value in info.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))
