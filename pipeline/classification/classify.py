"""Stage two: classifiers on a feature store. Reads the store, never an image.

Each (tap, classifier) pair becomes a model folder ``models/<run>/<tap>-<classifier>/``
(:mod:`pipeline.runs.artifacts`) with the fitted classifier, ``manifest.json`` (what it needs to run
on new images and the sha256 of every file), ``metrics.json``, ``per_image.npz`` (:mod:`pipeline.runs.per_image`),
``report.md`` and ``confusion.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.backbones.costs import tap_costs
from pipeline.backbones.pooling import dense_params, pooled_dims
from pipeline.backbones.registry import get_backbone
from pipeline.classification.settings import DEFAULT_CLASSIFIERS, ClassifySettings
from pipeline.classification.streamed import fit_streamed_probe, tap_bytes
from pipeline.core.errors import LayertapError
from pipeline.core.evaluation import best_on_val, rank_on_val
from pipeline.core.taps import JOIN, canonical_tap, is_multi_tap, tap_parts
from pipeline.core.text import size_text
from pipeline.data.decoding import available_memory
from pipeline.heads.classifiers import BUILTIN, parse_spec, train_one
from pipeline.runs.artifacts import run_folder, save_classifier
from pipeline.runs.page import write_run_page
from pipeline.runs.reports import write_sweep
from pipeline.runs.summary import RunSummary
from pipeline.store.feature_store import FeatureStore
from pipeline.store.splits import resolve_splits, test_rows_sha256

log = logging.getLogger(__name__)


@dataclass
class ClassifyResult:
    """What :func:`classify` trained: the run folder, the table rows (best first) and the fitted estimators.

    Attributes:
        run_dir: Folder of the model folders, ``comparison.md`` and ``index.html``.
        rows: One dict per (tap, classifier) trained by this call, best on val first; ``val_accuracy`` chose,
            ``test_accuracy`` is reported.
        estimators: ``{model folder name: fitted estimator}``, e.g. ``estimators["block4_pool-logreg"]``.
        summary: The whole run folder compared (every stage's models); ``summary.recommended`` is the answer.
    """

    run_dir: Path
    rows: list[dict]
    estimators: dict = field(default_factory=dict)
    summary: RunSummary | None = None

    @property
    def best(self) -> dict:
        """This call's best row on val: ``best["val_accuracy"]`` chose it, ``best["test_accuracy"]`` reports it."""
        return self.rows[0]

    def __repr__(self) -> str:
        b = self.best
        return (f"<ClassifyResult {self.run_dir}: {len(self.rows)} models trained; best on val {b['tap']} + "
                f"{b['classifier']} (val {b['val_accuracy']:.3f}, test {b['test_accuracy']:.3f})>")

    def _repr_html_(self) -> str:
        return self.summary._repr_html_() if self.summary else repr(self)

    def to_frame(self):
        """This call's rows as a pandas DataFrame (pandas is not a dependency of layertap)."""
        import pandas as pd

        return pd.DataFrame(self.rows)


def classifier_name(spec: str) -> str:
    name, params = parse_spec(spec)
    short = name if name in BUILTIN else name.rpartition(".")[2].lower()
    if params:
        short += "-" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", short)


def classify(settings: ClassifySettings, progress=None, bars: bool = False) -> ClassifyResult:
    """Train every classifier on every tap of the store and write the model folders and reports.

    Args:
        progress: Called with each table row as it is done.
        bars: A progress bar (on a terminal) over the streamed probe's steps.
    """

    store = FeatureStore(settings.store)
    taps = list(dict.fromkeys(canonical_tap(t, store.taps, store.path.name) for t in settings.layers or store.taps))
    splits, source = resolve_splits(store, settings.seed, settings.test_fraction, settings.val_fraction)
    split_info = {"split_source": source, "test_rows_sha256": test_rows_sha256(store, splits)}
    run_dir = run_folder(settings.out_dir, settings.run, store, create=True)
    rows, estimators = [], {}
    budget = memory_budget(settings)
    for tap in taps:
        X = _TapInMemory(store, tap)  # one HDF5 read per tap, shared by the classifiers that need it whole
        for spec in _fitting(settings.classifiers, store, tap, budget):
            estimator, metrics, model_dir = _train_and_save(store, X, tap, spec, splits, split_info, run_dir, settings,
                                                            bars)
            estimators[model_dir.name] = estimator
            rows.append({"tap": tap, "classifier": model_dir.name.removeprefix(tap + "-"), "spec": spec,
                         "val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["accuracy"],
                         "macro_f1": metrics["report"]["macro avg"]["f1-score"],
                         "fit_seconds": metrics["fit_seconds"], "trainable_params": metrics["trainable_params"],
                         "dims": store.width(tap), "chosen": metrics["chosen"], "model_dir": str(model_dir)})
            if progress:
                progress(rows[-1])
    rank_on_val(rows)
    summary = write_run_page(run_dir, store.key, split_info["test_rows_sha256"])
    return ClassifyResult(run_dir, rows, estimators, summary)


class _TapInMemory:
    """A tap's features as float32, read on first use (the streamed probe never asks)."""

    def __init__(self, store, tap: str):
        self.store, self.tap, self.values = store, tap, None

    def __call__(self) -> np.ndarray:
        if self.values is None:
            self.values = self.store.features(self.tap).astype(np.float32)
        return self.values


def memory_budget(settings: ClassifySettings) -> int:
    """Bytes a tap may take in memory (``--memory-budget`` GiB, or half the memory available)."""
    return int(settings.memory_budget * 2**30) if settings.memory_budget else (available_memory() or 8 << 30) // 2


def _fitting(specs, store, tap: str, budget: int) -> list[str]:
    """The classifiers to fit on ``tap``: all of them, or where the tap is larger than ``budget`` bytes, only the
    streamed ``probe`` (the others hold the tap in memory), with a warning that names what is skipped."""
    size = tap_bytes(store, tap)
    if size <= budget:
        return list(specs)
    whole = [spec for spec in specs if parse_spec(spec)[0] != "probe"]
    streamed = [spec for spec in specs if parse_spec(spec)[0] == "probe"] or ["probe"]
    if whole:
        log.warning("%s: its features take %s, more than the memory budget of %s (--memory-budget); "
                    "%s need them whole and are skipped for it; the streamed probe trains instead", tap,
                    size_text(size), size_text(budget), ", ".join(whole))
    return streamed


def _train_and_save(store, X, tap: str, spec: str, splits, split_info: dict, run_dir: Path, settings,
                    bars: bool = False):
    """Fit one classifier on one tap (``X()``: its features in memory; the probe streams them instead) and write
    its model folder ``<run>/<tap>-<classifier>``."""
    name, params = parse_spec(spec)
    if name == "probe":
        estimator, metrics = fit_streamed_probe(store, tap, splits, settings.seed, params, progress=bars)
    else:
        estimator, metrics = train_one(store, X(), spec, splits, settings.seed)
    metrics |= split_info
    model_dir = run_dir / f"{tap}-{classifier_name(spec)}"
    save_classifier(estimator, model_dir, store, tap, spec, metrics, settings)
    return estimator, metrics, model_dir


SWEEP_CLASSIFIERS = ("logreg", "probe")  # a sweep row is a linear probe, with the C it chose


def sweep(settings: ClassifySettings, progress=None, bars: bool = False) -> tuple[Path, list[dict]]:
    """Linear-probe accuracy for each tap of a store (``settings.layers``, default every tap), low to high, with
    what each tap costs; then for the taps side by side: the pairs of the three best taps on val and, with three
    taps or more, all of them.

    Each row's probe is ``settings.classifiers``' one linear classifier: ``logreg`` (C by cross-validation on the
    train rows; stage two's default set stands for it) or the streamed ``probe`` (C on val), saved as its model
    folder, as ``classify`` would. The row to use is the one with the best val accuracy (``best_on_val`` in
    ``sweep.json``; of equals, a single tap); test accuracy is shown beside it, never chosen on. A multi-tap row
    costs the forward pass to its deepest tap. A tap (or combination) larger than the memory budget is probed by
    the streamed ``probe`` instead, as ``classify`` does.

    Args:
        progress: Called with each row as it is done.
        bars: A progress bar (on a terminal) over the streamed probe's steps.

    Returns:
        ``(run folder, one row per tap, then per combination)``; ``sweep.md``, ``sweep.json``, ``sweep.png`` and
        the run's ``index.html`` are written there.

    Raises:
        LayertapError: a tap the store lacks, or classifiers other than one of :data:`SWEEP_CLASSIFIERS`.
    """
    spec = _sweep_classifier(settings.classifiers)
    store = FeatureStore(settings.store)
    model = get_backbone(store.manifest.backbone).build(store.manifest.image_size)
    depth = {layer.name: i for i, layer in enumerate(model.layers)}
    asked = list(dict.fromkeys(canonical_tap(t, store.taps, store.path.name) for t in settings.layers or store.taps))
    singles = sorted((t for t in asked if not is_multi_tap(t)), key=lambda t: depth.get(t, len(depth)))
    parts = {part for tap in asked for part in tap_parts(tap)}
    costs = tap_costs(model, [*sorted(parts, key=lambda t: depth.get(t, len(depth))), model.layers[-1].name])
    full = costs[model.layers[-1].name]["gflops"]
    budget = memory_budget(settings)
    splits, source = resolve_splits(store, settings.seed, settings.test_fraction, settings.val_fraction)
    split_info = {"split_source": source, "test_rows_sha256": test_rows_sha256(store, splits)}
    run_dir = run_folder(settings.out_dir, settings.run, store, create=True)
    rows = []

    def probe(tap: str) -> None:
        fitted = _fitting((spec,), store, tap, budget)[0]  # the streamed probe where the tap is too big
        _, metrics, _ = _train_and_save(store, _TapInMemory(store, tap), tap, fitted, splits, split_info, run_dir,
                                        settings, bars)
        deepest = max(tap_parts(tap), key=lambda t: depth.get(t, len(depth)))
        shapes = [store.map_shapes[part] for part in tap_parts(tap)]
        flat = sum(pooled_dims("flatten", shape) for shape in shapes)
        rows.append({"tap": tap, "layer_index": depth.get(deepest), "map": "+".join("x".join(map(str, shape))
                                                                                     for shape in shapes),
                     "dims": store.width(tap), "val_accuracy": metrics["val_accuracy"],
                     "test_accuracy": metrics["accuracy"], "C": metrics["chosen"].get("C"),
                     "cv_accuracy": metrics["chosen"].get("cv_accuracy"),
                     "gflops": costs[deepest]["gflops"], "flops_share": costs[deepest]["gflops"] / full,
                     "params_to_tap": costs[deepest]["params"], "flatten_dims": flat,
                     "dense_flatten": dense_params(flat), "dense_avg": dense_params(sum(s[-1] for s in shapes)),
                     "fit_seconds": metrics["fit_seconds"], "classifier": fitted})
        if progress:
            progress(rows[-1])

    for tap in singles:
        probe(tap)
    named = [tap for tap in asked if is_multi_tap(tap)]
    for combination in named + [c for c in tap_combinations(rows) if c not in named]:
        probe(combination)
    write_sweep(run_dir, rows, store, best=best_on_val(rows)["tap"])
    write_run_page(run_dir, store.key, split_info["test_rows_sha256"])
    return run_dir, rows


def _sweep_classifier(specs) -> str:
    """The one linear classifier a sweep fits per tap (stage two's default set: ``logreg``)."""
    specs = ("logreg",) if tuple(specs) == DEFAULT_CLASSIFIERS else tuple(specs)
    if len(specs) != 1 or parse_spec(specs[0])[0] not in SWEEP_CLASSIFIERS:
        raise LayertapError(f"sweep fits one linear probe per tap, not {','.join(specs)}: --classifiers logreg (C by "
                            "cross-validation on train) or probe (streamed, C on val); layertap classify compares "
                            "other classifiers")
    return specs[0]


def tap_combinations(rows: list[dict], top: int = 3) -> list[str]:
    """The multi-tap names a sweep adds after its single taps (``rows``, low to high): each pair of the ``top``
    best on val, low tap first, and all the taps together where that is not one of the pairs. Chosen on val only."""
    order = [r["tap"] for r in rows]
    best = sorted(rank_on_val([dict(r) for r in rows])[:top], key=lambda r: order.index(r["tap"]))
    pairs = [JOIN.join((a["tap"], b["tap"])) for i, a in enumerate(best) for b in best[i + 1:]]
    every = JOIN.join(order)
    return pairs + ([every] if len(order) > 2 and every not in pairs else [])
