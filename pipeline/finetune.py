"""Stage three: fine-tune the backbone end to end and measure what that buys over stage two.

The model composes the registered backbone, never re-types it::

    pixels -> augmentation (training only) -> the backbone's preprocess_input
           -> trunk up to the tap (BatchNorm frozen: inference mode) -> pooling -> Dense head

Phase 1 trains the head with the trunk frozen: by default on the store's own features of
the train rows (the numbers the frozen trunk computes anyway, so seconds instead of a
forward pass over every image per epoch; no augmentation), or with ``phase1="images"`` on
augmented images. Phase 2 unfreezes the trunk from a named layer (BatchNorm layers stay
frozen), recompiles with a much lower learning rate and trains on augmented images, stopping
early on the validation loss and keeping the best weights of both phases.

Both stages are tested on the same images: the split comes from
:func:`pipeline.classify.resolve_splits` and its fingerprint is checked against stage two's.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from pipeline import LayertapError
from pipeline.compose import build_augmentation, build_finetune_model, check_unfreeze_from, default_unfreeze_from, \
    param_counts, parse_augmentation, set_trainable
from pipeline.images import BadImageError, decode_image, default_workers, fingerprint, iter_decoded, progress_bar, \
    read_file
from pipeline.store import FeatureStore

log = logging.getLogger(__name__)
PHASE1_DATA = ("store", "images")
# Decoded uint8 images are held in memory; past this, ask for a smaller size or fewer images.
MAX_IMAGE_BYTES = 8 << 30


@dataclass(frozen=True)
class FinetuneSettings:
    """What stage three trains and where it writes.

    Args:
        store: The feature store whose images, split, backbone, weights and pooling are used.
        layer: The tap to fine-tune at; default: the best tap of the stage-two run, else the store's deepest.
        unfreeze_from: First layer to unfreeze in phase 2; default: the backbone's (``block5_conv1``,
            ``conv5_block1_1_conv``) or, when the tap is below it, the first layer of the tap's block.
        epochs: Most epochs of phase 1 (head only).
        fine_tune_epochs: Most epochs of phase 2 (unfrozen top); 0 skips phase 2.
        learning_rate: Adam learning rate of phase 1.
        fine_tune_learning_rate: Adam learning rate of phase 2, typically 100x lower.
        batch_size: Images per step.
        patience: Epochs without a lower validation loss before a phase stops.
        fine_tune_minutes: Wall-clock budget of phase 2's training: it stops after the batch that
            spends it (that epoch's validation still runs, the best weights are kept); 0 skips
            phase 2; None: no limit. For slow machines, where one epoch of phase 2 takes minutes.
        augment: ``none`` or a comma list of ``flip[=horizontal|vertical|horizontal_and_vertical]``,
            ``rotation[=0.1]``, ``zoom[=0.1]``, ``contrast[=0.1]`` (factors as in Keras's Random* layers).
        hidden_units: Width of the head's hidden layer (0: softmax regression on the pooled features).
        dropout: Dropout after the hidden layer.
        phase1: ``store`` (train the head on the stored features) or ``images`` (augmented images).
        data_root: Folder of the images, when they moved since extraction.
        out_dir, run: The model folder is ``<out_dir>/<run>/<tap>-finetune``; run defaults to the
            store's name, the folder stage two writes to.
        seed: Seed of every random choice; also the split seed, so it must match stage two's.
        test_fraction, val_fraction: Shares used when the store records no split (as in stage two).
        workers: Decoding threads; 0 means one per core.
        progress: Progress bars and Keras's per-epoch lines.
    """

    store: str
    layer: str | None = None
    unfreeze_from: str | None = None
    epochs: int = 50
    fine_tune_epochs: int = 10
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    batch_size: int = 32
    patience: int = 5
    fine_tune_minutes: float | None = None
    augment: str = "flip,rotation,zoom"
    hidden_units: int = 256
    dropout: float = 0.5
    phase1: str = "store"
    data_root: str | None = None
    out_dir: str = "models"
    run: str | None = None
    seed: int = 0
    test_fraction: float = 0.25
    val_fraction: float = 0.15
    workers: int = 0
    progress: bool = True

    def __post_init__(self):
        parse_augmentation(self.augment)
        if self.phase1 not in PHASE1_DATA:
            raise ValueError(f"phase1={self.phase1!r} is not known; use one of: {', '.join(PHASE1_DATA)}")
        for name, low in (("epochs", 1), ("fine_tune_epochs", 0), ("batch_size", 1), ("patience", 1),
                          ("hidden_units", 0), ("workers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is not valid; it must be an integer >= {low}")
        for name in ("learning_rate", "fine_tune_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be positive")
        if self.fine_tune_minutes is not None and not self.fine_tune_minutes >= 0:
            raise ValueError(f"fine_tune_minutes={self.fine_tune_minutes!r} must be >= 0 (or None: no limit)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")


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


def load_images(store: FeatureStore, rows: np.ndarray, data_root: Path, workers: int = 0,
                progress: bool = False) -> np.ndarray:
    """Decode the images of the given store rows exactly as stage one did, as one uint8 array.

    Each file must still have the content the store fingerprinted.

    Raises:
        LayertapError: an image is missing, changed since extraction or no longer decodes.
    """
    m = store.manifest
    size = m["image_size"]
    if len(rows) * size * size * 3 > MAX_IMAGE_BYTES:
        raise LayertapError(f"{len(rows):,} images at {size} px need {len(rows) * size * size * 3 / 2**30:.1f} GiB "
                            f"in memory; fine-tune at a smaller --size or on fewer images")
    fingerprints = store.rows.fingerprints
    decode = partial(decode_image, size=size, resize=m["resize"], draft=m["draft"])

    def checked(row: int) -> np.ndarray:
        data = read_file(data_root / store.rows.paths[row])
        if fingerprint(data) != fingerprints[row]:
            raise BadImageError("the file changed since the store was extracted")
        return decode(io.BytesIO(data))

    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    bad = []
    decoded = iter_decoded(rows, checked, workers or default_workers(), 64)
    for i, array, reason in progress_bar(decoded, len(rows), "decode", progress):
        if array is None:
            bad.append(f"{store.rows.paths[rows[i]]} ({reason})")
        else:
            images[i] = array
    if bad:
        raise LayertapError(f"{len(bad)} images of {store.path.name} under {data_root} cannot be used for "
                            f"fine-tuning, first: {bad[0]}. Both stages must see the same images: extract "
                            "again (a new store) or restore the files")
    return images


def choose_tap(store: FeatureStore, run_dir: Path, layer: str | None, base) -> str:
    """The named tap, else the best tap of stage two's run on this store, else the store's deepest tap.

    Args:
        base: The store's backbone model, for the depth of each layer.
    """
    if layer:
        if layer not in store.taps:
            raise LayertapError(f"{store.path.name} has no tap {layer}; it has {', '.join(store.taps)}. "
                                f"Extract it first: layertap extract ... --layers {layer}")
        return layer
    comparison = _stage_two_comparison(store, run_dir)
    if comparison:
        return comparison["rows"][0]["tap"]
    depth = {lyr.name: i for i, lyr in enumerate(base.layers)}
    return max(store.taps, key=lambda t: depth.get(t, -1))


def _stage_two_comparison(store: FeatureStore, run_dir: Path) -> dict | None:
    path = run_dir / "comparison.json"
    if not path.is_file():
        return None
    comparison = json.loads(path.read_text())
    return comparison if comparison.get("store_key") == store.key and comparison.get("rows") else None


def stage_two_baseline(store: FeatureStore, X: np.ndarray, run_dir: Path, tap: str, splits: np.ndarray,
                       seed: int) -> dict:
    """The best stage-two classifier on ``tap`` that was tested on exactly these test images.

    Read from the stage-two run in ``run_dir``; where there is none, a logistic-regression probe
    is trained now on ``X``, the tap's stored features (seconds).

    Returns:
        ``{"classifier", "accuracy", "predictions", "fit_seconds", "trainable_params", "source"}``.
    """
    from pipeline.classify import test_rows_sha256, train_one

    test_sha = test_rows_sha256(store, splits)
    comparison = _stage_two_comparison(store, run_dir) or {"rows": []}
    for row in comparison["rows"]:  # best first
        metrics_path = run_dir / Path(row["model_dir"]).name / "metrics.json"
        if row["tap"] != tap or not metrics_path.is_file():
            continue
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("test_rows_sha256") != test_sha:
            log.warning("stage-two model %s was tested on other images (another seed?); not compared",
                        metrics_path.parent)
            continue
        return _baseline(row["classifier"], metrics, str(metrics_path.parent))
    _, metrics = train_one(store, X, "logreg", splits, seed)
    return _baseline("logreg", metrics, "trained now (no stage-two run on this tap with these test images)")


def _baseline(classifier: str, metrics: dict, source: str) -> dict:
    keys = ("accuracy", "predictions", "fit_seconds", "trainable_params")
    return {"classifier": classifier, **{k: metrics[k] for k in keys}, "source": source}


def _fit_rows(splits: np.ndarray, labels: np.ndarray, seed: int, val_fraction: float):
    """Train and validation rows; a split without val rows gets a stratified share of train."""
    train, val = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
    if len(val):
        return train, val, "the split's val rows"
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(train, test_size=val_fraction, stratify=labels[train], random_state=seed)
    return np.sort(train), np.sort(val), f"{val_fraction:.0%} of train, stratified, seed {seed}"


def _check_composition(features_model, images: np.ndarray, stored: np.ndarray, exact: bool) -> float:
    """The composed model must reproduce the stored features: else preprocessing or weights differ.

    ``exact``: float32 compute and storage; else (bfloat16/float16 somewhere) rounding allows 2%.
    """
    computed = np.asarray(features_model.predict_on_batch(images), dtype=np.float32)
    error = float(np.abs(computed - stored).max() / max(float(np.abs(stored).max()), 1e-6))
    tolerance = 1e-3 if exact else 2e-2
    if error > tolerance:
        raise LayertapError(f"the fine-tuning model does not reproduce the store's features (relative error "
                            f"{error:.2g} > {tolerance}); the weights or preprocessing differ from extraction")
    return error


def _history(history, phase: int) -> list[dict]:
    keys = list(history.history)
    return [{"phase": phase, **{k: float(history.history[k][i]) for k in keys}} for i in range(len(history.epoch))]


def _phase_summary(history: list[dict], seconds: float, counts: dict, **extra) -> dict:
    best = int(np.argmin([e["val_loss"] for e in history])) if history else 0
    return {"epochs_run": len(history), "best_epoch": best + 1, "seconds": seconds,
            "best_val_loss": history[best]["val_loss"] if history else None,
            "best_val_accuracy": history[best]["val_accuracy"] if history else None, **counts, **extra}


def _time_limit(minutes: float):
    """A callback that stops training after the batch that ends past ``minutes`` from the start of training."""
    import keras

    class TimeLimit(keras.callbacks.Callback):
        stopped = False

        def on_train_begin(self, logs=None):
            self.deadline = time.monotonic() + 60 * minutes

        def on_train_batch_end(self, batch, logs=None):
            if time.monotonic() > self.deadline:
                self.model.stop_training = self.stopped = True

    return TimeLimit()


def _optimizer(learning_rate: float, precision: str):
    import keras

    optimizer = keras.optimizers.Adam(learning_rate)
    # float16 gradients underflow without loss scaling; Keras adds it only for a model whose own policy is mixed.
    return keras.optimizers.LossScaleOptimizer(optimizer) if precision == "float16" else optimizer


def _predict(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    chunks = [np.asarray(model.predict_on_batch(images[i:i + batch_size]), dtype=np.float64)
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks)


def finetune(settings: FinetuneSettings) -> tuple[Path, dict]:
    """Run both phases, test on stage two's test images and write the model folder and its report.

    Returns:
        ``(model folder, metrics)``; the folder holds ``model.keras`` (pixels in, class
        probabilities out; ``layertap predict`` runs it), ``manifest.json``, ``metrics.json``,
        ``report.md``, ``learning_curves.png`` and ``confusion.png``.

    Raises:
        LayertapError: the weights or images differ from the ones the store was extracted with.
    """
    import keras
    from sklearn.metrics import classification_report, confusion_matrix

    from pipeline.backbones import build_backbone, get_backbone, resolve_weights
    from pipeline.classifiers import build_dense_head
    from pipeline.classify import model_manifest, resolve_splits, save_model, test_rows_sha256
    from pipeline.reports import write_finetune_report

    store = FeatureStore(settings.store)
    m = store.manifest
    run_dir = Path(settings.out_dir) / (settings.run or store.path.stem)
    backbone = get_backbone(m["backbone"])
    weights = resolve_weights(backbone, m["settings"]["weights"], seed=m["settings"]["seed"])
    if weights.sha256 != m["weights_sha256"]:
        raise LayertapError(f"the {m['weights']} weights here (sha256 {weights.sha256[:16]}) are not the ones "
                            f"{store.path.name} was extracted with ({m['weights_sha256'][:16]})")
    data_root = Path(settings.data_root or m["data"]["root"])
    if not data_root.is_dir():
        raise LayertapError(f"the images of {store.path.name} were in {data_root}, which does not exist; "
                            "pass --data-root with their new folder")
    precision = m["precision"]
    keras.utils.set_random_seed(settings.seed)
    base = build_backbone(backbone, weights, m["image_size"], precision)
    tap = choose_tap(store, run_dir, settings.layer, base)
    trunk = keras.Model(base.inputs, base.get_layer(tap).output, name=f"{backbone.name}_to_{tap}")
    unfreeze_from = settings.unfreeze_from or default_unfreeze_from(trunk, backbone)
    check_unfreeze_from(trunk, unfreeze_from)  # now, not after phase 1
    set_trainable(trunk, None)

    splits, split_source = resolve_splits(store, settings.seed, settings.test_fraction, settings.val_fraction)
    labels = store.labels
    train, val, val_source = _fit_rows(splits, labels, settings.seed, settings.val_fraction)
    test = np.flatnonzero(splits == "test")
    X = store.features(tap).astype(np.float32)  # one HDF5 read for the baseline and phase 1
    baseline = stage_two_baseline(store, X, run_dir, tap, splits, settings.seed)
    n_classes = len(store.class_names)
    head = build_dense_head(X.shape[1], n_classes, X[train].mean(axis=0), X[train].var(axis=0),
                            settings.hidden_units, settings.dropout)
    augmentation = parse_augmentation(settings.augment)
    model, features_model = build_finetune_model(trunk, backbone.name, tap, m["pooling"], head,
                                                 build_augmentation(augmentation, settings.seed))

    # One decoding pass, of what is used: train and val images where a phase trains on images; all test
    # images where phase 2 runs (phase 1 is tested on the stored features), else the 8 the check below uses.
    phase2 = settings.fine_tune_epochs > 0 and settings.fine_tune_minutes != 0
    fit_rows = [train, val] if settings.phase1 == "images" or phase2 else []
    test_images = test if phase2 else test[:8]
    started = time.perf_counter()
    decoded = load_images(store, np.concatenate([test_images, *fit_rows]), data_root, settings.workers,
                          settings.progress)
    decode_seconds = time.perf_counter() - started
    images = {"test": decoded[:len(test_images)], "train": decoded[len(test_images):len(test_images) + len(train)],
              "val": decoded[len(test_images) + len(train):]}
    composition_error = _check_composition(features_model, images["test"][:8], X[test[:8]],
                                           exact=precision == "float32" and store.dtype == "float32")
    y = {"train": labels[train], "val": labels[val], "test": labels[test]}

    def fit(net, inputs, val_inputs, epochs, learning_rate, minutes=None):
        """Train ``net`` for at most ``epochs`` and ``minutes``; returns its history and whether time ran out."""
        verbose = 2 if settings.progress and net is model else 0  # a line per epoch where epochs take long
        net.compile(optimizer=_optimizer(learning_rate, precision), loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"])
        callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience,
                                                   restore_best_weights=True)]
        if minutes is not None:
            callbacks.append(_time_limit(minutes))
        history = net.fit(inputs, y["train"], validation_data=(val_inputs, y["val"]), epochs=epochs,
                          batch_size=settings.batch_size, shuffle=True, callbacks=callbacks, verbose=verbose)
        time_limited = minutes is not None and callbacks[-1].stopped
        if time_limited:
            log.info("stopped in epoch %d: the %g-minute budget is spent", len(history.history["loss"]), minutes)
        return history, time_limited

    # Phase 1: the trunk is frozen, the head learns.
    counts = param_counts(model)
    log.info("phase 1: head only on %s; %s trainable, %s frozen parameters",
             "stored features" if settings.phase1 == "store" else "augmented images",
             f"{counts['trainable']:,}", f"{counts['frozen']:,}")
    keras.utils.set_random_seed(settings.seed)
    started = time.perf_counter()
    if settings.phase1 == "store":
        history, _ = fit(head, X[train], X[val], settings.epochs, settings.learning_rate)
    else:
        history, _ = fit(model, images["train"], images["val"], settings.epochs, settings.learning_rate)
    curves = _history(history, 1)
    phases = [_phase_summary(curves, time.perf_counter() - started, counts, learning_rate=settings.learning_rate,
                             data="stored features" if settings.phase1 == "store" else "augmented images",
                             unfrozen_from=None)]
    # The frozen trunk computes the stored features (checked above), so the head on them is phase 1's model.
    phase1_probs = _predict(head, X[test], settings.batch_size)
    kept = "phase 1"

    # Phase 2: unfreeze from the named layer, recompile, train slowly on augmented images.
    if phase2:
        phase1_weights = model.get_weights()
        unfrozen = set_trainable(trunk, unfreeze_from)
        counts = param_counts(model)
        log.info("phase 2: unfrozen from %s (%d layers with weights; BatchNorm stays frozen); "
                 "%s trainable, %s frozen parameters", unfreeze_from, len(unfrozen),
                 f"{counts['trainable']:,}", f"{counts['frozen']:,}")
        keras.utils.set_random_seed(settings.seed + 1)
        started = time.perf_counter()
        history, time_limited = fit(model, images["train"], images["val"], settings.fine_tune_epochs,
                                    settings.fine_tune_learning_rate, settings.fine_tune_minutes)
        phase2_curves = _history(history, 2)
        curves += phase2_curves
        phases.append(_phase_summary(phase2_curves, time.perf_counter() - started, counts,
                                     learning_rate=settings.fine_tune_learning_rate, data="augmented images",
                                     unfrozen_from=unfreeze_from, unfrozen_layers=unfrozen,
                                     time_limited=time_limited))
        if phases[1]["best_val_loss"] <= phases[0]["best_val_loss"]:
            kept = "phase 2"
        else:  # the best weights of both phases are kept
            model.set_weights(phase1_weights)
        set_trainable(trunk, None)

    probs = phase1_probs if kept == "phase 1" else _predict(model, images["test"], settings.batch_size)
    predicted, phase1_predicted = probs.argmax(axis=1), phase1_probs.argmax(axis=1)
    baseline_correct = np.asarray(baseline["predictions"]) == y["test"]
    class_ids = list(range(n_classes))
    metrics = {
        "accuracy": float((predicted == y["test"]).mean()),
        "phase1_accuracy": float((phase1_predicted == y["test"]).mean()),
        "stage_two": {k: v for k, v in baseline.items() if k != "predictions"},
        "gain": bootstrap_gain(predicted == y["test"], baseline_correct, seed=settings.seed),
        "gain_over_phase1": bootstrap_gain(predicted == y["test"], phase1_predicted == y["test"], seed=settings.seed),
        "kept": kept, "tap": tap, "unfreeze_from": unfreeze_from, "phases": phases, "history": curves,
        "augmentation": augmentation, "precision": precision, "decode_seconds": decode_seconds,
        "composition_error": composition_error,
        "n_train": len(train), "n_val": len(val), "n_test": len(test), "val_source": val_source,
        "split_source": split_source, "test_rows_sha256": test_rows_sha256(store, splits),
        "fit_seconds": sum(p["seconds"] for p in phases), "trainable_params": phases[-1]["trainable"],
        "chosen": {"kept": kept, "unfreeze_from": unfreeze_from},
        "report": classification_report(y["test"], predicted, labels=class_ids, target_names=store.class_names,
                                        output_dict=True, zero_division=0),
        "confusion": confusion_matrix(y["test"], predicted, labels=class_ids).tolist(),
        "predictions": predicted.tolist(),
    }
    model_dir = run_dir / f"{tap}-finetune"
    save_model(model, model_dir, model_manifest(store, tap, "finetune", settings))
    write_finetune_report(model_dir, metrics, store)
    return model_dir, metrics
