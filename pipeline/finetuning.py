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
:func:`pipeline.splits.resolve_splits` and its fingerprint is checked against stage two's.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import LayertapError, import_keras
from pipeline.artifacts import KerasImageModel, model_manifest, run_folder, save_model
from pipeline.backbones import cut_trunk, get_backbone
from pipeline.classifiers import train_one
from pipeline.compose import build_augmentation, build_finetune_model, check_composition, check_unfreeze_from, \
    default_unfreeze_from, param_counts, parse_augmentation, predict_batched, set_trainable, train_phase
from pipeline.decoding import iter_decoded
from pipeline.evaluation import bootstrap_gain, score_predictions
from pipeline.images import BadImageError, default_workers, fingerprint, progress_bar, read_file
from pipeline.splits import fit_rows, resolve_splits, test_rows_sha256
from pipeline.settings import check_choice, check_int, option
from pipeline.store import FeatureStore

log = logging.getLogger(__name__)
PHASE1_DATA = ("store", "images")
# Decoded uint8 images are held in memory; past this, ask for a smaller size or fewer images.
MAX_IMAGE_BYTES = 8 << 30


@dataclass(frozen=True)
class FinetuneSettings:
    """What stage three trains and where it writes; validated when built. Each field's ``help`` says
    what it does.

    The split (``seed``, ``test_fraction``, ``val_fraction``) must match stage two's, so both stages
    test on the same images; the report checks it.
    """

    store: str = option("", "the feature store whose images, split, backbone, weights and pooling are used",
                        cli=False)
    layer: str | None = option(None, "tap to fine-tune at (default: the best tap of the stage-two run, else the "
                                     "store's deepest)", group="fine-tuning")
    unfreeze_from: str | None = option(None, "first layer trained in phase 2 (default: block5_conv1 for vgg16, "
                                             "conv5_block1_1_conv for resnet50, or the first layer of the tap's "
                                             "block when the tap is lower)", metavar="LAYER", group="fine-tuning")
    epochs: int = option(50, "most epochs of phase 1, head only", group="fine-tuning")
    fine_tune_epochs: int = option(10, "most epochs of phase 2; 0 stops after phase 1", group="fine-tuning")
    learning_rate: float = option(1e-3, "Adam learning rate of phase 1", flag="--lr", group="fine-tuning")
    fine_tune_learning_rate: float = option(1e-5, "Adam learning rate of phase 2, typically 100x lower",
                                            flag="--fine-tune-lr", group="fine-tuning")
    batch_size: int = option(32, "images (or feature rows) per training step", flag="--train-batch-size",
                             group="fine-tuning")
    patience: int = option(5, "epochs without a lower validation loss before a phase stops", group="fine-tuning")
    fine_tune_minutes: float | None = option(
        None, "wall-clock budget of phase 2: it stops after the batch that spends it (that epoch is still "
              "validated, the best weights kept); for CPUs where an epoch takes minutes (default: no limit)",
        metavar="M", group="fine-tuning")
    augment: str = option("flip,rotation,zoom", "none, or comma list of flip[=horizontal|vertical|"
                                                "horizontal_and_vertical], rotation[=0.1], zoom[=0.1], "
                                                "contrast[=0.1]", metavar="SPEC", group="fine-tuning")
    hidden_units: int = option(256, "head's hidden layer, 0 for none", group="fine-tuning")
    dropout: float = option(0.5, "dropout in the head", group="fine-tuning")
    phase1: str = option("store", "train the phase-1 head on the stored features (seconds, no augmentation) or "
                                  "on augmented images through the frozen backbone", choices=PHASE1_DATA,
                         group="fine-tuning")
    data_root: str | None = option(None, "the store's images, if they moved since extraction", metavar="DIR",
                                   group="fine-tuning")
    out_dir: str = option("models", "folder of the runs", flag="--models", group="stage two")
    run: str | None = option(None, "run folder name (default: the store's name)", group="stage two")
    seed: int = option(0, "seed of every random choice; also the split seed, so it must match stage two's")
    test_fraction: float = option(0.25, "share of test images where the store records no split")
    val_fraction: float = option(0.15, "share of validation images where the store records no split")
    workers: int = option(0, "decoding threads; 0: one per core")
    progress: bool = option(True, "progress bars and a line per epoch", flag="--quiet")

    def __post_init__(self):
        parse_augmentation(self.augment)
        check_choice("phase1", self.phase1, PHASE1_DATA)
        check_int(self, (("epochs", 1), ("fine_tune_epochs", 0), ("batch_size", 1), ("patience", 1),
                         ("hidden_units", 0), ("workers", 0)))
        for name in ("learning_rate", "fine_tune_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be positive")
        if self.fine_tune_minutes is not None and not self.fine_tune_minutes >= 0:
            raise ValueError(f"fine_tune_minutes={self.fine_tune_minutes!r} must be >= 0 (or None: no limit)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        for name in ("test_fraction", "val_fraction"):
            if not 0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name}={getattr(self, name)!r} must be between 0 and 0.5")


def load_store_images(store: FeatureStore, rows: np.ndarray, data_root: Path, workers: int = 0,
                progress: bool = False) -> np.ndarray:
    """Decode the images of the given store rows exactly as stage one did, as one uint8 array.

    Each file must still have the content the store fingerprinted.

    Raises:
        LayertapError: an image is missing, changed since extraction or no longer decodes.
    """
    size = store.manifest.image_size
    if len(rows) * size * size * 3 > MAX_IMAGE_BYTES:
        raise LayertapError(f"{len(rows):,} images at {size} px need {len(rows) * size * size * 3 / 2**30:.1f} GiB "
                            f"in memory; fine-tune at a smaller --size or on fewer images")
    fingerprints = store.rows.fingerprints
    decode = store.manifest.decoder()

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


def finetune(settings: FinetuneSettings) -> tuple[Path, dict]:
    """Run both phases, test on stage two's test images and write the model folder and its report.

    Returns:
        ``(model folder, metrics)``; the folder holds ``model.keras`` (pixels in, class
        probabilities out; ``layertap predict`` runs it), ``manifest.json``, ``metrics.json``,
        ``report.md``, ``learning_curves.png`` and ``confusion.png``.

    Raises:
        LayertapError: the weights or images differ from the ones the store was extracted with.
    """
    from pipeline.reports import write_finetune_report

    store = FeatureStore(settings.store)
    run_dir = run_folder(settings.out_dir, settings.run, store)
    data_root = _data_root(store, settings.data_root)
    job = _Job(settings, store, run_dir)
    job.build_network()
    job.choose_rows()
    images, decode_seconds = job.decode(data_root)
    composition_error = check_composition(job.features_model, images["test"][:8], job.X[job.test[:8]],
                                          exact=job.precision == "float32" and store.dtype == "float32")
    phase1_probs = job.phase_one(images)
    kept = job.phase_two(images)
    probs = phase1_probs if kept == "phase 1" else predict_batched(job.model, images["test"], settings.batch_size)
    metrics = job.metrics(probs, phase1_probs, kept, decode_seconds=decode_seconds,
                          composition_error=composition_error)
    model_dir = run_dir / f"{job.tap}-finetune"
    save_model(KerasImageModel(job.model), model_dir, model_manifest(store, job.tap, "finetune", settings))
    write_finetune_report(model_dir, metrics, store)
    return model_dir, metrics


def _data_root(store: FeatureStore, data_root: str | None) -> Path:
    root = Path(data_root or store.manifest.data_root)
    if not root.is_dir():
        raise LayertapError(f"the images of {store.path.name} were in {root}, which does not exist; "
                            "pass --data-root with their new folder")
    return root


class _Job:
    """One fine-tuning run, step by step: network, rows, decoding, phase 1, phase 2, metrics."""

    def __init__(self, settings: FinetuneSettings, store: FeatureStore, run_dir: Path):
        self.settings, self.store, self.run_dir = settings, store, run_dir
        self.precision = store.manifest.precision
        self.phases: list[dict] = []
        self.curves: list[dict] = []

    def build_network(self) -> None:
        """The store's backbone (weights checked), cut at the tap, composed with a fresh head."""
        from pipeline.classifiers import build_dense_head

        s, store = self.settings, self.store
        import_keras().utils.set_random_seed(s.seed)
        base = store.manifest.create_extractor().base
        self.tap = choose_tap(store, self.run_dir, s.layer, base)
        self.trunk = cut_trunk(base, self.tap)
        self.unfreeze_from = s.unfreeze_from or default_unfreeze_from(self.trunk, get_backbone(store.manifest.backbone))
        check_unfreeze_from(self.trunk, self.unfreeze_from)  # now, not after phase 1
        set_trainable(self.trunk, None)
        self.X = store.features(self.tap).astype(np.float32)  # one HDF5 read for the baseline and phase 1
        self.augmentation = parse_augmentation(s.augment)
        splits, self.split_source = resolve_splits(store, s.seed, s.test_fraction, s.val_fraction)
        self.splits = splits
        train = np.flatnonzero(splits == "train")
        self.head = build_dense_head(self.X.shape[1], len(store.class_names), self.X[train].mean(axis=0),
                                     self.X[train].var(axis=0), s.hidden_units, s.dropout)
        self.model, self.features_model = build_finetune_model(
            self.trunk, store.manifest.backbone, self.tap, store.manifest.pooling, self.head,
            build_augmentation(self.augmentation, s.seed))

    def choose_rows(self) -> None:
        s, store = self.settings, self.store
        self.train, self.val, self.val_source = fit_rows(self.splits, store.labels, s.seed, s.val_fraction)
        self.test = np.flatnonzero(self.splits == "test")
        labels = store.labels
        self.y = {"train": labels[self.train], "val": labels[self.val], "test": labels[self.test]}
        self.baseline = stage_two_baseline(store, self.X, self.run_dir, self.tap, self.splits, s.seed)
        self.runs_phase2 = s.fine_tune_epochs > 0 and s.fine_tune_minutes != 0

    def decode(self, data_root: Path) -> tuple[dict, float]:
        """One decoding pass, of what is used: train and val images where a phase trains on images; all
        test images where phase 2 runs (phase 1 is tested on the stored features), else the 8 the
        composition check uses."""
        s = self.settings
        fit = [self.train, self.val] if s.phase1 == "images" or self.runs_phase2 else []
        test = self.test if self.runs_phase2 else self.test[:8]
        started = time.perf_counter()
        decoded = load_store_images(self.store, np.concatenate([test, *fit]), data_root, s.workers, s.progress)
        n_test, n_train = len(test), len(self.train)
        images = {"test": decoded[:n_test], "train": decoded[n_test:n_test + n_train],
                  "val": decoded[n_test + n_train:]}
        return images, time.perf_counter() - started

    def _train(self, net, inputs: dict, epochs: int, learning_rate: float, minutes=None):
        s = self.settings
        return train_phase(net, inputs["train"], self.y["train"], inputs["val"], self.y["val"], epochs=epochs,
                           learning_rate=learning_rate, precision=self.precision, batch_size=s.batch_size,
                           patience=s.patience, minutes=minutes, verbose=2 if s.progress and net is self.model else 0)

    def phase_one(self, images: dict) -> np.ndarray:
        """The trunk frozen, the head learns; returns phase 1's test probabilities."""
        s = self.settings
        counts = param_counts(self.model)
        on_store = s.phase1 == "store"
        log.info("phase 1: head only on %s; %s trainable, %s frozen parameters",
                 "stored features" if on_store else "augmented images", f"{counts['trainable']:,}",
                 f"{counts['frozen']:,}")
        import_keras().utils.set_random_seed(s.seed)
        started = time.perf_counter()
        features = {"train": self.X[self.train], "val": self.X[self.val]}
        curves, _ = self._train(self.head if on_store else self.model, features if on_store else images,
                                s.epochs, s.learning_rate)
        self.curves += [{"phase": 1, **e} for e in curves]
        self.phases.append(_phase_summary(curves, time.perf_counter() - started, counts,
                                          learning_rate=s.learning_rate, unfrozen_from=None,
                                          data="stored features" if on_store else "augmented images"))
        # The frozen trunk computes the stored features (checked), so the head on them is phase 1's model.
        return predict_batched(self.head, self.X[self.test], s.batch_size)

    def phase_two(self, images: dict) -> str:
        """Unfreeze from the named layer, recompile, train slowly on augmented images; returns the phase kept."""
        s = self.settings
        if not self.runs_phase2:
            return "phase 1"
        phase1_weights = self.model.get_weights()
        unfrozen = set_trainable(self.trunk, self.unfreeze_from)
        counts = param_counts(self.model)
        log.info("phase 2: unfrozen from %s (%d layers with weights; BatchNorm stays frozen); "
                 "%s trainable, %s frozen parameters", self.unfreeze_from, len(unfrozen),
                 f"{counts['trainable']:,}", f"{counts['frozen']:,}")
        import_keras().utils.set_random_seed(s.seed + 1)
        started = time.perf_counter()
        curves, time_limited = self._train(self.model, images, s.fine_tune_epochs, s.fine_tune_learning_rate,
                                           s.fine_tune_minutes)
        self.curves += [{"phase": 2, **e} for e in curves]
        self.phases.append(_phase_summary(curves, time.perf_counter() - started, counts,
                                          learning_rate=s.fine_tune_learning_rate, data="augmented images",
                                          unfrozen_from=self.unfreeze_from, unfrozen_layers=unfrozen,
                                          time_limited=time_limited))
        set_trainable(self.trunk, None)
        if self.phases[1]["best_val_loss"] <= self.phases[0]["best_val_loss"]:
            return "phase 2"
        self.model.set_weights(phase1_weights)  # the best weights of both phases are kept
        return "phase 1"

    def metrics(self, probs: np.ndarray, phase1_probs: np.ndarray, kept: str, **extra) -> dict:
        s, y_test = self.settings, self.y["test"]
        predicted, phase1_predicted = probs.argmax(axis=1), phase1_probs.argmax(axis=1)
        baseline_correct = np.asarray(self.baseline["predictions"]) == y_test
        return {
            **score_predictions(y_test, predicted, self.store.class_names),
            "phase1_accuracy": float((phase1_predicted == y_test).mean()),
            "stage_two": {k: v for k, v in self.baseline.items() if k != "predictions"},
            "gain": bootstrap_gain(predicted == y_test, baseline_correct, seed=s.seed),
            "gain_over_phase1": bootstrap_gain(predicted == y_test, phase1_predicted == y_test, seed=s.seed),
            "kept": kept, "tap": self.tap, "unfreeze_from": self.unfreeze_from, "phases": self.phases,
            "history": self.curves, "augmentation": self.augmentation, "precision": self.precision, **extra,
            "n_train": len(self.train), "n_val": len(self.val), "n_test": len(self.test),
            "val_source": self.val_source, "split_source": self.split_source,
            "test_rows_sha256": test_rows_sha256(self.store, self.splits),
            "fit_seconds": sum(p["seconds"] for p in self.phases), "trainable_params": self.phases[-1]["trainable"],
            "chosen": {"kept": kept, "unfreeze_from": self.unfreeze_from},
        }


def _phase_summary(history: list[dict], seconds: float, counts: dict, **extra) -> dict:
    best = int(np.argmin([e["val_loss"] for e in history])) if history else 0
    return {"epochs_run": len(history), "best_epoch": best + 1, "seconds": seconds,
            "best_val_loss": history[best]["val_loss"] if history else None,
            "best_val_accuracy": history[best]["val_accuracy"] if history else None, **counts, **extra}
