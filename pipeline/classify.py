"""Stage two: classifiers on a feature store. Reads the store, never an image.

Each (tap, classifier) pair becomes a model folder ``models/<run>/<tap>-<classifier>/``
with the fitted classifier, ``manifest.json`` (what it needs to run on new images and
the sha256 of every file), ``metrics.json``, ``report.md`` and ``confusion.png``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import LayertapError
from pipeline.classifiers import BUILTIN, DenseHeadClassifier, describe, make_classifier, parse_spec, \
    split_specs, trainable_params
from pipeline.extract import split_names
from pipeline.images import SPLITS
from pipeline.store import FeatureStore

MANIFEST = "manifest.json"
# The model file of each format: the Dense head, a fine-tuned model (pixels in), anything else.
MODEL_FILES = {"keras": "head.keras", "keras-images": "model.keras", "joblib": "model.joblib"}


@dataclass(frozen=True)
class ClassifySettings:
    """What stage two trains and where it writes.

    Args:
        store: The feature store.
        classifiers: Specs (``logreg``, ``linsvm``, ``knn``, ``dense`` or an import path,
            each optionally ``:{json params}``).
        layers: Taps to train on; empty means every tap of the store.
        out_dir: Folder of the runs.
        run: Run folder name; default: the store's name.
        seed: Seed of every random choice (splits, cross-validation folds, the Dense head).
        test_fraction, val_fraction: Shares used when the store records no split.
    """

    store: str
    classifiers: tuple[str, ...] = ("logreg",)
    layers: tuple[str, ...] = ()
    out_dir: str = "models"
    run: str | None = None
    seed: int = 0
    test_fraction: float = 0.25
    val_fraction: float = 0.15

    def __post_init__(self):
        specs = split_specs(self.classifiers) if isinstance(self.classifiers, str) else list(self.classifiers)
        layers = split_names(self.layers) if isinstance(self.layers, str) else self.layers
        object.__setattr__(self, "classifiers", tuple(specs) or ("logreg",))
        object.__setattr__(self, "layers", tuple(layers))
        for spec in self.classifiers:
            make_classifier(spec)  # validates names and parameters now, not after an hour of training
        for name in ("test_fraction", "val_fraction"):
            if not 0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name}={getattr(self, name)!r} must be between 0 and 0.5")


def resolve_splits(store: FeatureStore, seed: int = 0, test_fraction: float = 0.25,
                   val_fraction: float = 0.15) -> tuple[np.ndarray, str]:
    """Each row's split: the one recorded in the store, else a seeded stratified split.

    Stage three calls this with the same arguments, so both stages test on the same images.

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


def test_rows_sha256(store: FeatureStore, splits: np.ndarray) -> str:
    """A fingerprint of which images are the test images, to check two stages used the same."""
    paths = [p for p, s in zip(store.rows.paths, splits) if s == "test"]
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def classifier_name(spec: str) -> str:
    name, params = parse_spec(spec)
    short = name if name in BUILTIN else name.rpartition(".")[2].lower()
    if params:
        short += "-" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", short)


def train_one(store: FeatureStore, X: np.ndarray, spec: str, splits: np.ndarray, seed: int = 0):
    """Fit one classifier on one tap's features ``X`` (all rows of the store) and evaluate it on the test rows.

    Returns:
        ``(estimator, metrics)``.
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    y = store.labels
    train, val, test = (splits == "train"), (splits == "val"), (splits == "test")
    fit_rows = train | val  # the Dense head early-stops on val instead of training on it
    counts = np.bincount(y[fit_rows], minlength=len(store.class_names))
    if counts.min() == 0:
        missing = [store.class_names[i] for i in np.flatnonzero(counts == 0)]
        raise LayertapError(f"class {', '.join(missing)} has no training image in {store.path.name}")
    estimator = make_classifier(spec, cv_splits=int(min(3, counts.min())), seed=seed)
    started = time.perf_counter()
    if isinstance(estimator, DenseHeadClassifier) and val.any():
        estimator.fit(X[train], y[train], validation_data=(X[val], y[val]))
    else:
        estimator.fit(X[fit_rows], y[fit_rows])
    fit_seconds = time.perf_counter() - started
    predicted = estimator.predict(X[test])
    labels = list(range(len(store.class_names)))
    metrics = {
        "accuracy": float(accuracy_score(y[test], predicted)),
        "n_train": int(train.sum()), "n_val": int(val.sum()), "n_test": int(test.sum()),
        "fit_seconds": fit_seconds, "trainable_params": trainable_params(estimator),
        "chosen": describe(estimator),
        "report": classification_report(y[test], predicted, labels=labels, target_names=store.class_names,
                                         output_dict=True, zero_division=0),
        "confusion": confusion_matrix(y[test], predicted, labels=labels).tolist(),
        "predictions": predicted.tolist(),
    }
    return estimator, metrics


def classify(settings: ClassifySettings, progress=None) -> tuple[Path, list[dict]]:
    """Train every classifier on every tap of the store and write the model folders and reports.

    Returns:
        ``(run folder, rows of the comparison table, best first)``.
    """
    from pipeline.reports import write_comparison, write_model_report

    store = FeatureStore(settings.store)
    taps = settings.layers or store.taps
    unknown = [t for t in taps if t not in store.taps]
    if unknown:
        raise LayertapError(f"{store.path.name} has no tap {', '.join(unknown)}; it has {', '.join(store.taps)}. "
                            "Extract it first: layertap extract ... --layers " + ",".join(unknown))
    splits, source = resolve_splits(store, settings.seed, settings.test_fraction, settings.val_fraction)
    split_info = {"split_source": source, "test_rows_sha256": test_rows_sha256(store, splits)}
    run_dir = Path(settings.out_dir) / (settings.run or store.path.stem)
    rows = []
    for tap in taps:
        X = store.features(tap).astype(np.float32)  # one HDF5 read per tap, shared by every classifier
        for spec in settings.classifiers:
            estimator, metrics = train_one(store, X, spec, splits, settings.seed)
            metrics |= split_info
            name = classifier_name(spec)
            model_dir = run_dir / f"{tap}-{name}"
            save_model(estimator, model_dir, model_manifest(store, tap, spec, settings))
            write_model_report(model_dir, metrics, store.class_names, title=f"{tap} + {spec}")
            rows.append({"tap": tap, "classifier": name, "spec": spec,
                         "accuracy": metrics["accuracy"], "macro_f1": metrics["report"]["macro avg"]["f1-score"],
                         "fit_seconds": metrics["fit_seconds"], "trainable_params": metrics["trainable_params"],
                         "dims": store.dims[tap], "chosen": metrics["chosen"], "model_dir": str(model_dir)})
            if progress:
                progress(rows[-1])
    rows.sort(key=lambda r: (-r["accuracy"], r["fit_seconds"]))
    write_comparison(run_dir, rows, store, source)
    return run_dir, rows


def model_manifest(store: FeatureStore, tap: str, spec: str, settings: ClassifySettings) -> dict:
    from pipeline.extract import versions

    m = store.manifest
    return {
        "classifier": spec, "tap": tap, "class_names": list(store.class_names),
        "backbone": m["backbone"], "weights": m["weights"], "weights_sha256": m["weights_sha256"],
        "weights_arg": m["settings"]["weights"], "seed": m["settings"]["seed"], "pooling": m["pooling"],
        "image_size": m["image_size"], "resize": m["resize"], "draft": m["draft"],
        "precision": m["precision"], "preprocessing": m["preprocessing"],
        "store": str(store.path), "store_key": store.key, "settings": asdict(settings),
        "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _sha256(path: Path) -> str:
    from pipeline.backbones import sha256_file
    return sha256_file(path)


def save_model(estimator, model_dir: Path, manifest: dict) -> Path:
    """Write a fitted classifier (or a fine-tuned Keras model) and its manifest into ``model_dir``.

    The folder is replaced as a whole.
    """
    import joblib
    import keras

    tmp = model_dir.with_name(model_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if isinstance(estimator, DenseHeadClassifier):
        manifest = {**manifest, "format": "keras", "params": estimator.get_params()}
        estimator.model_.save(tmp / MODEL_FILES["keras"])
    elif isinstance(estimator, keras.Model):  # a fine-tuned model: pixels in, probabilities out
        manifest = {**manifest, "format": "keras-images"}
        estimator.save(tmp / MODEL_FILES["keras-images"])
    else:
        manifest = {**manifest, "format": "joblib"}
        joblib.dump(estimator, tmp / MODEL_FILES["joblib"])
    name = MODEL_FILES[manifest["format"]]
    manifest["files"] = {name: _sha256(tmp / name)}
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
        LayertapError: a file was changed after training (checked before it is deserialised).
    """
    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{model_dir} is not a layertap model folder (no {MANIFEST}); "
                                "train one with `layertap classify`")
    manifest = json.loads((model_dir / MANIFEST).read_text())
    for name, expected in manifest.get("files", {}).items():
        path = model_dir / name
        actual = _sha256(path) if path.is_file() else "missing"
        if actual != expected:
            raise LayertapError(f"{path} does not match its manifest (sha256 {actual[:16]}, expected "
                                f"{expected[:16]}); it was changed after training. Refusing to load it: "
                                "retrain with `layertap classify`")
    path = model_dir / MODEL_FILES[manifest["format"]]
    if manifest["format"] == "joblib":
        import joblib

        return joblib.load(path), manifest
    import keras

    import pipeline.backbones  # noqa: F401 - registers the custom layers a fine-tuned model uses

    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    if manifest["format"] == "keras":
        model = DenseHeadClassifier.from_keras(model, list(range(len(manifest["class_names"]))), manifest["params"])
    return model, manifest


def sweep(store_path: str | os.PathLike, out_dir: str = "models", run: str | None = None, seed: int = 0,
          progress=None) -> tuple[Path, list[dict]]:
    """Linear-probe accuracy for every tap of a store, low to high, with what each tap costs.

    Returns:
        ``(run folder, one row per tap)``; ``sweep.md``, ``sweep.json`` and ``sweep.png`` are written there.
    """
    from pipeline.backbones import get_backbone, tap_costs
    from pipeline.pooling import dense_params, pooled_dims
    from pipeline.reports import write_sweep

    store = FeatureStore(store_path)
    backbone = get_backbone(store.manifest["backbone"])
    model = backbone.build(store.manifest["image_size"])
    depth = {layer.name: i for i, layer in enumerate(model.layers)}
    taps = sorted(store.taps, key=lambda t: depth.get(t, len(depth)))
    costs = tap_costs(model, [*taps, model.layers[-1].name])
    full = costs[model.layers[-1].name]["gflops"]
    splits, _ = resolve_splits(store, seed)
    rows = []
    for tap in taps:
        _, metrics = train_one(store, store.features(tap).astype(np.float32), "logreg", splits, seed)
        shape = store.map_shapes[tap]
        flat = pooled_dims("flatten", shape)
        rows.append({"tap": tap, "layer_index": depth.get(tap), "map": "x".join(map(str, shape)),
                     "dims": store.dims[tap], "accuracy": metrics["accuracy"],
                     "C": metrics["chosen"].get("C"), "cv_accuracy": metrics["chosen"].get("cv_accuracy"),
                     "gflops": costs[tap]["gflops"], "flops_share": costs[tap]["gflops"] / full,
                     "params_to_tap": costs[tap]["params"], "flatten_dims": flat,
                     "dense_flatten": dense_params(flat), "dense_avg": dense_params(shape[-1]),
                     "fit_seconds": metrics["fit_seconds"]})
        if progress:
            progress(rows[-1])
    run_dir = Path(out_dir) / (run or store.path.stem)
    write_sweep(run_dir, rows, store)
    return run_dir, rows
