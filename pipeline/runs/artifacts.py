"""Model folders: what stages two and three write and ``predict`` reads, saved and loaded safely.

A model folder ``models/<run>/<tap>-<classifier>/`` holds the model file, ``manifest.json``
(the store's recipe for computing features from new images, the sha256 of every file it
lists), ``metrics.json``, ``per_image.npz``, ``report.md`` and plots. Folders are written to a temporary name and
renamed into place, and a file whose sha256 differs from the manifest is refused before it is
deserialised.

How a model is written is the estimator's own business, through one protocol: an object with
``save_artifact(folder) -> (format, file name, extra manifest fields)`` saves itself (the Keras
Dense head, a fine-tuned network); anything else is a scikit-learn estimator, saved with skops.

Threat model: a model folder is data, and loading it must not run code its author put in it.
Keras files load in safe mode (no lambdas), scikit-learn models through skops with a list of
trusted types (anything else is refused and named), and a pickle (``model.joblib``: older
folders, or an estimator skops cannot save) only with ``trust=True`` (``layertap predict
--trust``). The sha256 of each file in ``manifest.json`` finds accidental changes and damage; it
does not stop an author who rewrites it too, which is why the formats themselves are safe.
"""

from __future__ import annotations

import importlib.abc
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

from pipeline.backbones.weights import sha256_file
from pipeline.core.errors import LayertapError
from pipeline.core.runtime import import_keras, versions
from pipeline.runs.atomic import folder_lock, replace_folder, restore_aside, temporary_beside
from pipeline.runs.reports import write_model_report

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
READ_ATTEMPTS = 5  # a model folder replaced while it is read (by another run's save) is read again
# The model file of each format: the Dense head, a fine-tuned model (pixels in), a scikit-learn estimator,
# a pickle (only with trust).
MODEL_FILES = {"keras": "head.keras", "keras-images": "model.keras", "skops": "model.skops", "joblib": "model.joblib",
               "probe": "probe.npz"}
# scikit-learn internals that the built-in classifiers (and common scikit-learn ones) carry, beyond what skops
# trusts by default: data, not code.
TRUSTED_TYPES = ("sklearn.metrics._scorer._PassthroughScorer", "sklearn.model_selection._split.StratifiedKFold",
                 "sklearn.metrics._dist_metrics.EuclideanDistance64", "sklearn.neighbors._kd_tree.KDTree",
                 "sklearn.neighbors._ball_tree.BallTree", "sklearn.tree._tree.Tree")


def run_folder(out_dir: str | os.PathLike, run: str | None, store, create: bool = False) -> Path:
    """``<out_dir>/<run>``; the run defaults to the store's name, so stages two and three share a folder.

    ``create``: made now, before any training, so that an ``--models`` that cannot hold it (a file, no
    permission) fails in the first second, not after the training it would have kept.
    """
    folder = Path(out_dir) / (run or store.path.stem)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


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


def save_classifier(estimator, model_dir: Path, store, tap: str, spec: str, metrics: dict, settings) -> None:
    """A stage-two classifier's model folder: the model and its manifest (:func:`save_model`), ``metrics.json``,
    ``per_image.npz``, ``report.md`` and ``confusion.png``; what ``classify`` writes, and ``finetune`` for the
    probe it measures its gain against."""
    save_model(estimator, model_dir, model_manifest(store, tap, spec, settings))
    write_model_report(model_dir, metrics, store.class_names, title=f"{tap} + {spec}")


def save_model(estimator, model_dir: Path, manifest: dict) -> Path:
    """Write a fitted estimator (or a :class:`KerasImageModel`) and its manifest into ``model_dir``.

    The folder is replaced as a whole (:mod:`pipeline.runs.atomic`): a reader, or a process killed at any
    moment, finds the old folder or the new one; two writers of one folder take turns.
    """
    model_dir = Path(model_dir)
    tmp = temporary_beside(model_dir)
    try:
        if hasattr(estimator, "save_artifact"):
            fmt, name, extra = estimator.save_artifact(tmp)
        else:
            fmt, name, extra = _save_estimator(estimator, tmp)
        manifest = {**manifest, **extra, "format": fmt, "files": {name: sha256_file(tmp / name)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        with folder_lock(model_dir):
            replace_folder(tmp, model_dir)
    except BaseException:  # a full disk, an interrupt: no half-written folder is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir


class _NoArrayLibraries(importlib.abc.MetaPathFinder):
    """Refuses scikit-learn's adapters for other array libraries (``sklearn.externals.array_api_compat.torch``,
    ``.cupy``, ``.dask``), each of which imports its library."""

    PREFIX = "sklearn.externals.array_api_compat."

    def find_spec(self, name, path=None, target=None):
        if name.startswith(self.PREFIX) and name[len(self.PREFIX):].split(".")[0] in ("torch", "cupy", "dask"):
            raise ModuleNotFoundError(f"{name} is not imported while skops lists scikit-learn's estimators")
        return None


def skops_io():
    """``skops.io``, imported without importing torch, CuPy or Dask.

    On import skops lists scikit-learn's estimators, and scikit-learn does that by importing every one of its
    packages, its array-library adapters too; the torch adapter imports torch, a second or more of start-up
    (and the GPU libraries of a CUDA build) for commands that run no network, wherever torch is installed.
    The adapters hold no estimators; a later import of one (scikit-learn's array API support) works as usual.
    """
    if "skops.io" not in sys.modules:
        finder = _NoArrayLibraries()
        sys.meta_path.insert(0, finder)
        try:
            import skops.io  # noqa: F401
        finally:
            sys.meta_path.remove(finder)
    return sys.modules["skops.io"]


def _save_estimator(estimator, folder: Path) -> tuple[str, str, dict]:
    skops = skops_io()
    try:
        data = skops.dumps(estimator)
    except Exception as exc:  # noqa: BLE001 - an estimator skops cannot describe: a pickle, loaded only with trust
        import joblib

        log.warning("%s cannot be saved with skops (%s); saved as a pickle, which `layertap predict` loads only "
                    "with --trust", type(estimator).__name__, exc)
        joblib.dump(estimator, folder / MODEL_FILES["joblib"])
        return "joblib", MODEL_FILES["joblib"], {}
    (folder / MODEL_FILES["skops"]).write_bytes(data)
    return "skops", MODEL_FILES["skops"], {}


def load_model(model_dir: str | os.PathLike, trust: bool = False):
    """Load a model folder without running code from it (see the module docstring).

    Args:
        trust: Also load a pickle (``model.joblib``), and scikit-learn types outside the trusted list.

    Returns:
        ``(estimator, manifest)``; for a fine-tuned model (format ``keras-images``) the estimator
        is the ``keras.Model`` that maps uint8 pixels to class probabilities.

    Raises:
        FileNotFoundError: not a model folder.
        LayertapError: the model file is not the one the manifest lists (its sha256 differs, or it is
            not listed), the format is unknown, or loading it would need trust that was not given.
    """
    model_dir = Path(model_dir)
    restore_aside(model_dir)  # a writer killed mid-swap (where the system cannot exchange folders)
    for _ in range(READ_ATTEMPTS):  # a folder replaced while it was read is read again, whole
        before = _identity(model_dir)
        try:
            manifest, fmt, name, data = _read_folder(model_dir)
        except (OSError, LayertapError):
            if _identity(model_dir) in (before, None):
                raise
            continue
        if _identity(model_dir) == before:
            break
    else:
        raise LayertapError(f"{model_dir} was replaced {READ_ATTEMPTS} times while it was read (another run is "
                            "saving it); load it again when that run is done")
    if fmt == "joblib":
        if not trust:
            raise LayertapError(f"{model_dir / name} is a pickle: loading it runs any code its author put in it. "
                                "If you trust where this folder comes from, pass --trust (trust=True); else "
                                "retrain it with `layertap classify` (models are now saved with skops)")
        import joblib

        model = joblib.load(io.BytesIO(data))
    elif fmt == "skops":
        model = _load_skops(model_dir / name, data, trust)
    elif fmt == "probe":  # arrays only, read without pickles
        from pipeline.heads.probe import StreamedProbe

        model = StreamedProbe.load_artifact(data)
    else:
        model = _load_keras(name, data)
    _check_classes(model, manifest, model_dir / MANIFEST)
    if fmt == "keras":
        from pipeline.heads.dense import DenseHeadClassifier

        model = DenseHeadClassifier.from_keras(model, list(range(len(manifest["class_names"]))), manifest["params"])
    return model, manifest


def _load_keras(name: str, data: bytes):
    """A ``.keras`` file's model from its checked bytes, in safe mode, with layertap's layers registered."""
    keras = import_keras()
    import pipeline.backbones.layers  # noqa: F401 - registers the custom layers a fine-tuned model uses

    with tempfile.TemporaryDirectory() as tmp:  # load the bytes that were checked, not the file again
        checked = Path(tmp) / name
        checked.write_bytes(data)
        return keras.saving.load_model(checked, safe_mode=True, compile=False)


def _read_folder(model_dir: Path) -> tuple[dict, str, str, bytes]:
    """The manifest, format, model file name and the model file's checked bytes of a model folder."""
    if not model_dir.exists():
        raise FileNotFoundError(f"{model_dir} does not exist; {_models_in(model_dir.parent, model_dir.parent)}")
    if not (model_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{model_dir} is not a layertap model folder (no {MANIFEST}); {_models_in(model_dir)}")
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except ValueError as exc:
        raise LayertapError(f"{model_dir / MANIFEST} is not valid JSON ({exc}); retrain the model") from None
    _check_manifest(manifest, model_dir / MANIFEST)
    fmt = manifest.get("format")
    if fmt not in MODEL_FILES:
        raise LayertapError(f"{model_dir / MANIFEST}: format {fmt!r} is not known; use one of: "
                            f"{', '.join(MODEL_FILES)}")
    name = MODEL_FILES[fmt]
    if name not in manifest["files"]:
        raise LayertapError(f"{model_dir / MANIFEST} does not list {name}, the file its format {fmt!r} loads; "
                            "refusing to load a file without a checksum: retrain the model")
    return manifest, fmt, name, _verified_bytes(model_dir / name, manifest["files"][name])


def _check_manifest(manifest, path: Path) -> None:
    """Refuse a model manifest whose shape is not what layertap writes, before anything in it is used."""
    def wrong(what: str):
        raise LayertapError(f"{path}: {what}; it is damaged or was edited by hand: retrain the model")

    if not isinstance(manifest, dict):
        wrong(f"a JSON {type(manifest).__name__}, not an object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        wrong("'files' is not an object of file names to sha256 digests")
    names = manifest.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        wrong("'class_names' is not a list of two or more class names")
    if len(set(names)) != len(names):
        wrong("'class_names' names a class twice")


def _check_classes(model, manifest: dict, path: Path) -> None:
    """The model's number of classes must be the manifest's, or predictions would be named after other classes."""
    if hasattr(model, "classes_"):
        n = len(model.classes_)
    elif getattr(model, "output_shape", None) is not None:
        n = int(model.output_shape[-1])
    else:
        return
    if n != len(manifest["class_names"]):
        raise LayertapError(f"{path}: the model has {n} classes and the manifest names {len(manifest['class_names'])}"
                            "; it is damaged or was edited by hand: retrain the model")


def _identity(folder: Path) -> tuple[int, int] | None:
    """Which folder is at ``folder`` now (device and inode): a replaced folder is another one."""
    try:
        stat = folder.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _models_in(folder: Path, name: str | Path = "it") -> str:
    """What to give instead of ``folder`` (``name`` in the sentence): one of its model folders if it is a run folder
    (the best on val first)."""
    models = sorted(p.parent.name for p in folder.glob(f"*/{MANIFEST}")
                    if not p.parent.name.startswith(".") and ".tmp-" not in p.parent.name)  # writers' leftovers
    if not models:
        return "train one with `layertap classify`"
    try:
        best = Path(json.loads((folder / "comparison.json").read_text())["rows"][0]["model_dir"]).name
    except (OSError, ValueError, LookupError, TypeError):
        best = None
    first, why = (best, " (best on val)") if best in models else (models[0], "")
    return (f"{name} is a run folder: give one of its {len(models)} model folders, such as {folder / first}{why}; "
            f"it has {', '.join(models)}")


def _verified_bytes(path: Path, expected: str) -> bytes:
    """The file's bytes if their sha256 is ``expected``. Hashed in blocks first, so a wrong file (a 3 GB
    stranger) is refused without being read into memory whole; the bytes are then read from the same open
    file, so what is loaded is what was hashed."""
    actual, data = "missing", None
    if path.is_file():
        with open(path, "rb") as fh:
            actual = sha256_file(fh)
            if actual == expected:
                fh.seek(0)
                data = fh.read()
    if actual != expected:
        raise LayertapError(f"{path} does not match its manifest (sha256 {actual[:16]}, expected "
                            f"{expected[:16]}); it was changed after training. Refusing to load it: "
                            "retrain with `layertap classify`")
    return data


def _load_skops(path: Path, data: bytes, trust: bool):
    skops = skops_io()
    unknown = [t for t in skops.get_untrusted_types(data=data) if t not in TRUSTED_TYPES]
    if unknown and not trust:
        raise LayertapError(f"{path} holds types layertap does not trust to load: {', '.join(unknown)}. If you "
                            "trust where this folder comes from, pass --trust (trust=True)")
    return skops.loads(data, trusted=[*TRUSTED_TYPES, *unknown])
