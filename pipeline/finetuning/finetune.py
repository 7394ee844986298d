"""Stage three: fine-tune the backbone end to end, starting from stage two's linear probe (LP-FT).

The model composes the registered backbone, never re-types it::

    pixels -> augmentation (training only) -> the backbone's preprocess_input
           -> trunk up to the tap (BatchNorm frozen: inference mode) -> pooling -> head

Phase 1 is the head on the frozen trunk. By default (``head="probe"``) it *is* stage two's linear
probe: the standardised logistic regression, fit on the train rows by the same code as stage two,
folded exactly into one softmax layer (Kumar et al., ICLR 2022: fine-tuning from a fitted probe
distorts the pretrained features less than from a random head). So phase 1 starts at the probe's
accuracy by construction. ``head="dense"`` trains the tutorials' Dense head from scratch instead.

Phase 2 unfreezes the trunk from a named layer (BatchNorm stays frozen), and trains on augmented
images with a low learning rate (warm-up, then cosine decay). Every choice is made on the val
rows: the epoch kept is the one with the best val accuracy (then val loss), over both phases, so
the result is never below the probe on val. The test rows are scored once, for the report: the
gain over stage two's probe and over stage two's val-chosen best, each with a paired bootstrap
interval over the same test images (the split comes from :func:`pipeline.store.splits.resolve_splits`
and its fingerprint is checked against stage two's).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from pipeline.backbones.build import build_backbone, compose_classifier, cut_trunk
from pipeline.backbones.registry import get_backbone
from pipeline.core.errors import LayertapError
from pipeline.core.evaluation import best_on_val, bootstrap_gain, epoch_rank, log_loss, score_predictions
from pipeline.core.runtime import import_keras
from pipeline.core.taps import is_multi_tap, tap_parts
from pipeline.core.text import plural
from pipeline.data.decoding import decode_store_rows
from pipeline.finetuning.compose import (
    build_augmentation,
    check_composition,
    check_unfreeze_from,
    default_unfreeze_from,
    learning_rate_schedule,
    param_counts,
    parse_augmentation,
    predict_batched,
    set_trainable,
    train_phase,
)
from pipeline.finetuning.settings import FinetuneSettings
from pipeline.heads.classifiers import build_probe_head, probe_weights, train_one
from pipeline.heads.dense import build_dense_head
from pipeline.runs.artifacts import KerasImageModel, model_manifest, run_folder, save_classifier, save_model
from pipeline.runs.page import write_run_page
from pipeline.runs.per_image import read_metrics
from pipeline.runs.reports import write_finetune_report
from pipeline.store.feature_store import FeatureStore
from pipeline.store.splits import resolve_splits, test_rows_sha256

log = logging.getLogger(__name__)
def stage_two_rows(store: FeatureStore, run_dir: Path, test_sha: str) -> list[dict]:
    """Stage two's table rows for this store, best on val first, each with its ``metrics``; only models
    tested on exactly these test images, and only tables ranked on val (older ones ranked on test). Stage
    three's rows of the table (an earlier fine-tuning) are not a baseline."""
    path = run_dir / "comparison.json"
    if not path.is_file():
        return []
    comparison = json.loads(path.read_text())
    if comparison.get("store_key") != store.key or comparison.get("chosen_by") != "val accuracy":
        return []
    rows = []
    for row in comparison["rows"]:
        if row.get("stage", "two") != "two":
            continue
        metrics_path = run_dir / Path(row["model_dir"]).name / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}  # no per-image arrays
        if metrics.get("test_rows_sha256") != test_sha:
            log.warning("stage-two model %s was tested on other images (another seed?); not compared",
                        metrics_path.parent)
            continue
        rows.append({**row, "metrics": metrics})
    return rows


def choose_tap(store: FeatureStore, layer: str | None, stage_two: list[dict], probe) -> tuple[str, str]:
    """The named tap; else the tap of stage two's best single-tap model on val (a multi-tap model cannot be cut
    from one network); else the tap whose linear probe is best on val. Never chosen on test.

    Args:
        probe: ``probe(tap) -> (estimator, metrics)``, stage two's logreg on a tap (fit only where no
            stage-two run says which tap is best; the caller keeps the one it fits for the chosen tap).

    Returns:
        ``(tap, why)``.
    """
    if layer:
        if is_multi_tap(layer):
            raise LayertapError(f"--layer {layer}: stage three fine-tunes from one tap (the network is cut there); "
                                f"name one of {', '.join(tap_parts(layer))}, or compare the multi-tap probe from "
                                "stage two with layertap classify --layers " + layer)
        if layer not in store.taps:
            raise LayertapError(f"{store.path.name} has no tap {layer}; it has {', '.join(store.taps)}. "
                                f"Extract it first: layertap extract ... --layers {layer}")
        return layer, "given"
    single = [row for row in stage_two if not is_multi_tap(row["tap"])]  # a network is cut at one tap
    if single:
        first = f"stage two's best on val ({single[0]['classifier']})"
        if single[0] is not stage_two[0]:
            first = (f"stage two's best single tap on val ({single[0]['classifier']}); the multi-tap "
                     f"{stage_two[0]['tap']} did better, but stage three starts from one tap")
        return single[0]["tap"], first
    best = best_on_val([{"tap": tap, "val_accuracy": probe(tap)[1]["val_accuracy"]} for tap in store.taps])
    return best["tap"], f"best linear probe on val ({best['val_accuracy']:.3f}; no stage-two run)"


def _baseline(name: str, metrics: dict, source: str) -> dict:
    keys = ("accuracy", "val_accuracy", "predictions", "fit_seconds", "trainable_params")
    return {"classifier": name, **{k: metrics.get(k) for k in keys}, "source": source}


def finetune(settings: FinetuneSettings) -> tuple[Path, dict]:
    """Fit the probe, fold it into the network, fine-tune, and write the model folder and its report.

    Returns:
        ``(model folder, metrics)``; the folder holds ``model.keras`` (pixels in, class
        probabilities out; ``layertap predict`` runs it), ``manifest.json``, ``metrics.json``,
        ``report.md``, ``learning_curves.png`` and ``confusion.png``.

    Raises:
        LayertapError: the weights or images differ from the ones the store was extracted with.
    """

    store = FeatureStore(settings.store)
    run_dir = run_folder(settings.out_dir, settings.run, store, create=True)
    job = _Job(settings, store, run_dir)
    job.choose_rows_and_tap()
    job.fit_baselines()
    if not job.stage_two:
        job.keep_probe()
    job.build_network()
    images, decode_seconds = job.decode(_data_root(store, settings.data_root))
    # Exact where nothing rounds and the images are decoded as at extraction: a store a GPU decoder made is
    # decoded here by Pillow (Manifest.decoder), whose pixels differ from the GPU's by about a grey level.
    composition_error = check_composition(job.features_model, images["test"][:8], job.X[job.test[:8]],
                                          exact=job.precision == "float32" and store.dtype == "float32"
                                          and store.manifest.decoder_name == "pillow")
    job.phase_one(images)
    job.phase_two(images)
    metrics = job.metrics(images, decode_seconds=decode_seconds, composition_error=composition_error)
    model_dir = run_dir / f"{job.tap}-finetune"
    save_model(KerasImageModel(job.model), model_dir, model_manifest(store, job.tap, "finetune", settings))
    write_finetune_report(model_dir, metrics, store)
    write_run_page(run_dir, store.key, metrics["test_rows_sha256"])
    return model_dir, metrics


def _data_root(store: FeatureStore, data_root: str | None) -> Path:
    root = Path(data_root or store.manifest.data_root)
    if not root.is_dir():
        raise LayertapError(f"the images of {store.path.name} were in {root}, which does not exist; "
                            "pass --data-root with their new folder")
    return root


class _Job:
    """One fine-tuning run, step by step: rows and tap, baselines, network, decoding, phase 1, phase 2, metrics."""

    def __init__(self, settings: FinetuneSettings, store: FeatureStore, run_dir: Path):
        self.settings, self.store, self.run_dir = settings, store, run_dir
        self.precision = store.manifest.precision
        self.phases: list[dict] = []
        self.curves: list[dict] = []
        self.kept = "phase 1"
        self._probes: dict[str, tuple] = {}

    def choose_rows_and_tap(self) -> None:
        s, store = self.settings, self.store
        self.splits, source = resolve_splits(store, s.seed, s.test_fraction, s.val_fraction)
        self.split_info = {"split_source": source, "test_rows_sha256": test_rows_sha256(store, self.splits)}
        self.train, self.val, self.test = (self.splits.rows(name) for name in ("train", "val", "test"))
        labels = store.labels
        self.y = {"train": labels[self.train], "val": labels[self.val], "test": labels[self.test]}
        self.stage_two = stage_two_rows(store, self.run_dir, self.split_info["test_rows_sha256"])
        self.tap, self.tap_reason = choose_tap(store, s.layer, self.stage_two, lambda tap: self._fit_probe(tap)[1:])
        self.X = self._fit_probe(self.tap)[0]  # the probe on the chosen tap is phase 1's start: fit it now

    def _fit_probe(self, tap: str) -> tuple:
        """``(X, estimator, metrics)``: the tap's features and stage two's logreg on them, fit by stage two's
        code on the train rows; each tap read and fit at most once."""
        if tap not in self._probes:
            X = self.store.features(tap).astype(np.float32)
            self._probes[tap] = (X, *train_one(self.store, X, "logreg", self.splits, self.settings.seed))
        return self._probes[tap]

    def fit_baselines(self) -> None:
        """Stage two's probe on the tap (the same model stage two fits) and stage two's val-chosen best."""
        _, self.probe, metrics = self._fit_probe(self.tap)
        self.probe_baseline = _baseline("logreg", metrics, "stage two's logreg on this tap (fit on the train rows)")
        if self.stage_two:
            row = self.stage_two[0]  # the one stage-two model whose test predictions the gain is paired with
            metrics = read_metrics(self.run_dir / Path(row["model_dir"]).name)
            self.best_baseline = _baseline(f"{row['tap']} + {row['classifier']}", metrics, row["model_dir"])
        else:
            self.best_baseline = {**self.probe_baseline, "classifier": f"{self.tap} + logreg",
                                  "source": "no stage-two run: the probe"}

    def keep_probe(self) -> None:
        """Write the probe as stage two's model folder ``<tap>-logreg``, what ``classify --layers <tap>
        --classifiers logreg`` writes, where no stage-two run exists: the page then recommends across both stages,
        and where fine-tuning buys nothing its "use the stage-two model" names a folder to predict with and export."""
        _, probe, metrics = self._fit_probe(self.tap)
        s = self.settings
        recipe = {"store": s.store, "classifiers": ["logreg"], "layers": [self.tap], "seed": s.seed,
                  "test_fraction": s.test_fraction, "val_fraction": s.val_fraction, "by": "layertap finetune"}
        save_classifier(probe, self.run_dir / f"{self.tap}-logreg", self.store, self.tap, "logreg",
                        {**metrics, **self.split_info}, recipe)

    def build_network(self) -> None:
        """The store's backbone (weights checked), cut at the tap, composed with phase 1's head."""
        s, store = self.settings, self.store
        keras = import_keras()
        keras.utils.set_random_seed(s.seed)
        m = store.manifest  # the network as built (BatchNormalization too), the weights checked against the store
        base = build_backbone(get_backbone(m.backbone), m.resolve_weights(), m.image_size, m.precision)
        self.trunk = cut_trunk(base, self.tap)
        self.unfreeze_from = s.unfreeze_from or default_unfreeze_from(self.trunk)
        check_unfreeze_from(self.trunk, self.unfreeze_from)  # now, not after phase 1
        set_trainable(self.trunk, None)
        if s.head == "probe":
            self.head = build_probe_head(*probe_weights(self.probe))
        elif s.head == "linsvm":
            svm, _ = train_one(store, self.X, "linsvm", self.splits, s.seed)
            self.head = build_probe_head(*probe_weights(svm, self.X[self.train], store.labels[self.train]))
        else:
            X_train = self.X[self.train]
            self.head = build_dense_head(self.X.shape[1], len(store.class_names), X_train.mean(axis=0),
                                         X_train.var(axis=0), s.hidden_units, s.dropout)
        self.augmentation = parse_augmentation(s.augment)
        self.model, self.features_model = compose_classifier(
            self.trunk, store.manifest.backbone, self.tap, store.manifest.pooling, self.head,
            build_augmentation(self.augmentation, s.seed))
        self.runs_phase2 = s.fine_tune_epochs > 0 and s.fine_tune_minutes != 0

    def decode(self, data_root: Path) -> tuple[dict, float]:
        """One decoding pass, of what is used: train and val images where a phase trains on images; all
        test images where phase 2 runs (phase 1 is tested on the stored features), else the 8 the
        composition check uses."""
        s = self.settings
        fit = [self.train, self.val] if s.phase1 == "images" or self.runs_phase2 else []
        test = self.test if self.runs_phase2 else self.test[:8]
        started = time.perf_counter()
        decoded = decode_store_rows(self.store, np.concatenate([test, *fit]), data_root, s.workers, s.progress)
        n_test, n_train = len(test), len(self.train)
        images = {"test": decoded[:n_test], "train": decoded[n_test:n_test + n_train],
                  "val": decoded[n_test + n_train:]}
        return images, time.perf_counter() - started

    def _val_score(self) -> tuple[float, float]:
        """(val accuracy, val loss) of the head on the stored val features: the frozen trunk computes them."""
        probs = predict_batched(self.head, self.X[self.val], 4096)
        return float((probs.argmax(axis=1) == self.y["val"]).mean()), log_loss(probs, self.y["val"])

    def _train(self, net, inputs: dict, epochs: int, learning_rate, minutes=None, start=None):
        s = self.settings
        return train_phase(net, inputs["train"], self.y["train"], inputs["val"], self.y["val"], epochs=epochs,
                           learning_rate=learning_rate, precision=self.precision, batch_size=s.batch_size,
                           patience=s.patience, minutes=minutes, start=start,
                           verbose=2 if s.progress and net is self.model else 0)

    def phase_one(self, images: dict) -> None:
        """The trunk frozen: the folded probe as it is, or a head trained on stored features or images."""
        s = self.settings
        counts = param_counts(self.model)
        trains = s.head == "dense" or s.phase1 == "images"
        data = "augmented images" if s.phase1 == "images" else "stored features"
        log.info("phase 1: %s head%s; %s trainable, %s frozen parameters", s.head,
                 f" trained on {data}" if trains else " (stage two's, folded)", f"{counts['trainable']:,}",
                 f"{counts['frozen']:,}")
        import_keras().utils.set_random_seed(s.seed)
        started, curves = time.perf_counter(), []
        if trains:
            start = self._val_score() if s.head != "dense" else None
            inputs = images if s.phase1 == "images" else {"train": self.X[self.train], "val": self.X[self.val]}
            curves, _, _ = self._train(self.model if s.phase1 == "images" else self.head, inputs, s.epochs,
                                       s.learning_rate, start=start)
        val_accuracy, val_loss = self._val_score()
        self.curves += [{"phase": 1, **e} for e in curves] or [
            {"phase": 1, "accuracy": None, "loss": None, "val_accuracy": val_accuracy, "val_loss": val_loss}]
        self.phases.append({"head": s.head, "data": data if trains else "none (the probe's own fit)",
                            "epochs_run": len(curves), "seconds": time.perf_counter() - started,
                            "learning_rate": s.learning_rate if trains else None, "unfrozen_from": None,
                            "val_accuracy": val_accuracy, "val_loss": val_loss, **counts})
        # The frozen trunk computes the stored features (checked), so the head on them is phase 1's model.
        self.phase1_probs = predict_batched(self.head, self.X[self.test], 4096)

    def phase_two(self, images: dict) -> None:
        """Unfreeze from the named layer and train on augmented images; kept only if it beats phase 1 on val."""
        s = self.settings
        if not self.runs_phase2:
            return
        unfrozen = set_trainable(self.trunk, self.unfreeze_from)
        counts = param_counts(self.model)
        log.info("phase 2: unfrozen from %s (%s with weights; BatchNorm stays frozen); "
                 "%s trainable, %s frozen parameters", self.unfreeze_from, plural(len(unfrozen), "layer"),
                 f"{counts['trainable']:,}", f"{counts['frozen']:,}")
        import_keras().utils.set_random_seed(s.seed + 1)
        steps_per_epoch = math.ceil(len(self.train) / s.batch_size)
        schedule = learning_rate_schedule(s.fine_tune_learning_rate, s.schedule, s.fine_tune_epochs * steps_per_epoch,
                                          round(s.warmup_epochs * steps_per_epoch))
        start = (self.phases[0]["val_accuracy"], self.phases[0]["val_loss"])
        started = time.perf_counter()
        curves, time_limited, improved = self._train(self.model, images, s.fine_tune_epochs, schedule,
                                                     s.fine_tune_minutes, start=start)
        self.curves += [{"phase": 2, **e} for e in curves]
        best = max(curves, key=epoch_rank) if curves else {}
        self.phases.append({"head": s.head, "data": "augmented images", "epochs_run": len(curves),
                            "seconds": time.perf_counter() - started, "learning_rate": s.fine_tune_learning_rate,
                            "schedule": s.schedule, "warmup_epochs": s.warmup_epochs,
                            "unfrozen_from": self.unfreeze_from, "unfrozen_layers": unfrozen,
                            "val_accuracy": best.get("val_accuracy"), "val_loss": best.get("val_loss"),
                            "time_limited": time_limited, **counts})
        set_trainable(self.trunk, None)
        self.kept = "phase 2" if improved else "phase 1"  # else the callback restored phase 1's weights

    def metrics(self, images: dict, **extra) -> dict:
        s, y_test = self.settings, self.y["test"]
        probs = (self.phase1_probs if self.kept == "phase 1"
                 else predict_batched(self.model, images["test"], s.batch_size))
        correct = probs.argmax(axis=1) == y_test
        phase1_correct = self.phase1_probs.argmax(axis=1) == y_test

        def gain(baseline):
            return bootstrap_gain(correct, np.asarray(baseline["predictions"]) == y_test, seed=s.seed)

        kept = self.phases[-1] if self.kept == "phase 2" else self.phases[0]
        return {
            **score_predictions(y_test, probs.argmax(axis=1), self.store.class_names, probs),
            "val_accuracy": kept["val_accuracy"], "phase1_accuracy": float(phase1_correct.mean()),
            "probe": {k: v for k, v in self.probe_baseline.items() if k != "predictions"},
            "stage_two": {k: v for k, v in self.best_baseline.items() if k != "predictions"},
            "gain_over_probe": gain(self.probe_baseline), "gain": gain(self.best_baseline),
            "gain_over_phase1": bootstrap_gain(correct, phase1_correct, seed=s.seed),
            "kept": self.kept, "tap": self.tap, "tap_reason": self.tap_reason, "head": s.head,
            "unfreeze_from": self.unfreeze_from, "phases": self.phases, "history": self.curves,
            "augmentation": self.augmentation, "precision": self.precision, **extra,
            "n_train": len(self.train), "n_val": len(self.val), "n_test": len(self.test),
            **self.split_info,
            "store_key": self.store.key,
            "fit_seconds": sum(p["seconds"] for p in self.phases), "trainable_params": self.phases[-1]["trainable"],
            "chosen": {"kept": self.kept, "tap": self.tap, "unfreeze_from": self.unfreeze_from},
        }
