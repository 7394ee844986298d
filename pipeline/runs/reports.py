"""Tables and summaries a user reads at the end of each stage."""

from __future__ import annotations

import json
import math
import string
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.taps import is_multi_tap
from pipeline.core.text import plural
from pipeline.runs import atomic, per_image
from pipeline.store import virtual


def spreadsheet_safe(cell) -> str:
    """A CSV cell a spreadsheet shows as text: one that starts like a formula (``=``, ``+``, ``-``, ``@``, a tab
    or a carriage return) gets a leading ``'``, as OWASP recommends against CSV injection. Numbers pass as
    they are (a probability is never negative)."""
    text = str(cell)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def rounded(value, digits: int = 6):
    """``value`` with every float rounded to ``digits`` significant digits (JSON that reads 0.018025, not
    0.018024999999999635); non-finite floats become None, which JSON can hold."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def write_json(path: Path, value) -> None:
    """``value`` as indented JSON with rounded floats (:func:`rounded`)."""
    atomic.write_text(path, json.dumps(rounded(value), indent=2) + "\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> str:
    """A plain-text table; numbers are right-aligned, floats shown with 3 decimals."""
    cells = [[cell_text(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                                  for r in rows if r[i] is not None) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def extract_summary(result, settings) -> str:
    """What stage one did: the store, its taps (computed or cached), images, speed and skipped files."""
    store = result.store
    made = " + ".join(word for word, n in (("computed", result.n_decoded), ("reused", result.n_reused)) if n)
    rows = [[tap, "x".join(map(str, store.map_shapes[tap])), settings.pooling, store.dims[tap],
             (made or "computed") if tap in result.computed_taps else "cached"] for tap in settings.layers]
    lines = [format_table(["tap", "map", "pooling", "dims", "this run"], rows,
                          title=f"\nfeature store {result.store_path}")]
    counts = split_counts(store)
    lines.append(f"images: {len(store):,} in {plural(len(store.class_names), 'class', 'classes')} ({counts}); "
                 f"skipped: {len(result.skipped)}")
    if result.n_reused:
        lines.append(f"reused the features of {plural(result.n_reused, 'image')} from earlier stores in "
                     f"{settings.out_dir} (same model settings, same file contents; --no-reuse computes them)")
    if result.cache_hit:
        lines.append(f"cache hit: no image decoded; {result.seconds:.1f} s")
    elif not result.n_decoded:
        lines.append(f"no image decoded; {result.seconds:.1f} s")
    else:
        lines.append(f"decoded {result.n_decoded:,} images{result.where} in {result.extract_seconds:.1f} s "
                     f"({result.images_per_s or 0:.1f} images/s); total {result.seconds:.1f} s "
                     f"with scan {result.timings.get('scan', 0):.1f} s, model build "
                     f"{result.timings.get('build_model', 0):.1f} s, merge {result.timings.get('merge', 0):.1f} s")
    for path, reason in result.skipped[:10]:
        lines.append(f"  skipped {path}: {reason}")
    if len(result.skipped) > 10:
        lines.append(f"  ... and {len(result.skipped) - 10} more (layertap inspect {result.store_path})")
    return "\n".join(lines)


def split_counts(store) -> str:
    return ", ".join(f"{name or 'no split'} {n:,}" for name, n in store.split_counts().items())


def store_summary(store) -> str:
    """``layertap inspect``: a store's provenance, taps, classes and skipped files."""

    m = store.manifest
    lines = [f"{store.path}  ({store.path.stat().st_size / 1e6:.1f} MB, key {store.key[:12]})"]
    fields = [("data", f"{m.data_name} at {m.data_root}"), ("backbone", m.backbone),
              ("weights", f"{m.weights} (sha256 {m.weights_sha256[:16]}...)"),
              ("image size", f"{m.image_size} px, {m.resize}, {m.interpolation}"
                             f"{', JPEG draft' if m.draft else ''}, {m.decoder_name} decoder"),
              ("preprocessing", m.preprocessing), ("pooling", m.pooling),
              ("precision", f"{m.precision} compute, {store.dtype} stored"
                            f"{', BatchNormalization folded' if m.batchnorm else ''}"),
              ("keras", f"{m.keras_version} on {m.keras_backend}"),
              ("versions", ", ".join(f"{k} {v}" for k, v in sorted(m.versions.items())))]
    lines += [f"  {name:<14} {value}" for name, value in fields]
    rows = []
    for tap in store.taps:
        shards = virtual.shard_files(store.path, tap)
        where = (f"{len(shards)} shard file{'s' * (len(shards) > 1)} in <store>.shards/{shards[0].parent.name}/"
                 if shards else "this file")
        info = m.taps.get(tap, {})
        rows.append([tap, "x".join(map(str, store.map_shapes[tap])), store.dims[tap], info.get("engine", "local"),
                     info.get("images"), info.get("reused", 0), where])
    lines += ["", format_table(["tap", "map", "dims", "engine", "computed", "reused", "features in"], rows,
                               title="(computed: images the run that made the tap decoded; reused: rows it took "
                                     "from earlier stores)")]
    lines.append(f"\n{plural(len(store), 'image')}, {plural(len(store.class_names), 'class', 'classes')} "
                 f"({split_counts(store)})")
    counts = np.bincount(store.labels, minlength=len(store.class_names))
    lines.append("  " + ", ".join(f"{k} {v}" for k, v in zip(store.class_names, counts.tolist())))
    if store.skipped:
        lines.append(f"\n{len(store.skipped)} skipped:")
        lines += [f"  {path}: {reason}" for path, reason in store.skipped]
    return "\n".join(lines)


def cell_text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def html_table(headers, rows, highlight: int | None = None) -> str:
    """An HTML table (escaped; text left-aligned, numbers as :func:`cell_text` shows them), row ``highlight``
    marked with ``class=rec``."""
    import html

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td{' class=l' if isinstance(v, str) else ''}>{html.escape(cell_text(v))}</td>" for v in row)
        body.append(f"<tr{' class=rec' if i == highlight else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# Above this many classes the confusion matrix is drawn at a fixed size, classes by index, without the counts: a
# label and a number per cell would make 1,000 classes a 450-inch figure (a 9.5 GB canvas).
LABELLED_CLASSES = 40


def plot_confusion(path, confusion, class_names, title: str) -> None:
    plt = _pyplot()
    matrix = np.asarray(confusion)
    labelled = len(class_names) <= LABELLED_CLASSES
    size = max(4.0, 0.45 * len(class_names) + 2) if labelled else 10.0
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    ax.set_title(textwrap.fill(title, width=max(30, int(size * 9))), fontsize=10)  # whole, however long
    ax.set_xlabel("predicted" if labelled else f"predicted (class index, of {len(class_names):,})")
    ax.set_ylabel("true" if labelled else "true (class index)")
    if labelled:
        ax.set_xticks(range(len(class_names)), class_names, rotation=90)
        ax.set_yticks(range(len(class_names)), class_names)
        for (i, j), value in np.ndenumerate(matrix):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="white" if value > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def classification_table(report: dict, class_names) -> str:
    rows = [[name, report[name]["precision"], report[name]["recall"], report[name]["f1-score"],
             int(report[name]["support"])] for name in (*class_names, "macro avg", "weighted avg")]
    return format_table(["class", "precision", "recall", "f1", "support"], rows)


def _write_metrics(model_dir, metrics: dict, class_names, title: str) -> Path:
    """``metrics.json``, ``per_image.npz`` and ``confusion.png``, which every model folder has."""
    model_dir = Path(model_dir)
    write_json(model_dir / "metrics.json", per_image.set_apart(model_dir, metrics))
    plot_confusion(model_dir / "confusion.png", metrics["confusion"], class_names, title)
    return model_dir


def write_model_report(model_dir, metrics: dict, class_names, title: str) -> None:
    """``metrics.json``, ``report.md`` and ``confusion.png`` in a model folder."""
    model_dir = _write_metrics(model_dir, metrics, class_names, title)
    chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics["chosen"].items())
    text = [f"# {title}", "",
            f"val accuracy {metrics['val_accuracy']:.3f} "
            f"(what choices between models use); test accuracy **{metrics['accuracy']:.3f}** "
            f"on {metrics['n_test']} images "
            f"(train {metrics['n_train']}, val {metrics['n_val']}; split {metrics.get('split_source', '?')})", "",
            f"fit time {metrics['fit_seconds']:.2f} s; trainable parameters {metrics['trainable_params']:,}"
            + (f"; chosen: {chosen}" if chosen else ""), "", "```",
            classification_table(metrics["report"], class_names), "```", "", "![confusion matrix](confusion.png)", ""]
    (model_dir / "report.md").write_text("\n".join(text))


COMPARISON_HEADERS = ["tap", "classifier", "val acc (chooses)", "test acc", "test macro F1", "fit s",
                      "trainable params", "dims"]


def comparison_table(rows) -> str:
    """Stage two's rows of one ``classify`` call (:mod:`pipeline.runs.page` tables a whole run folder)."""
    return format_table(COMPARISON_HEADERS, [[r["tap"], r["classifier"], r["val_accuracy"], r["test_accuracy"],
                                              r["macro_f1"], r["fit_seconds"], r["trainable_params"], r["dims"]]
                                             for r in rows])


SWEEP_HEADERS = ["tap", "map", "dims", "val acc", "test acc", "C", "GFLOPs to tap", "% of net", "params to tap",
                 "flatten dims", "Dense(256) params, flatten", "Dense(256) params, avg"]


def sweep_cells(r) -> list:
    return [r["tap"], r["map"], r["dims"], r["val_accuracy"], r["test_accuracy"], r["C"], r["gflops"],
            100.0 * r["flops_share"], r["params_to_tap"], r["flatten_dims"], r["dense_flatten"], r["dense_avg"]]


def sweep_table(rows) -> str:
    return format_table(SWEEP_HEADERS, [sweep_cells(r) for r in rows])


def write_sweep(run_dir, rows, store, best: str) -> Path:
    """``sweep.md``, ``sweep.json`` and ``sweep.png`` (val and test accuracy and cost against depth)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    m = store.manifest
    write_json(run_dir / "sweep.json", {"store": str(store.path), "store_key": store.key, "best_on_val": best,
                                        "rows": rows})
    (run_dir / "sweep.md").write_text(
        f"# Layer sweep: {m.backbone} ({m.weights} weights), {m.image_size} px, {m.pooling} pooling\n\n"
        "Linear probe (standardised logistic regression fit on the train rows, C by stratified 3-fold CV "
        "there) per tap, low to high; then taps side by side (a+b: their features concatenated, each "
        "feature standardised), at the cost of the deepest. "
        + "".join(f"{r['tap']} is larger than the memory budget: the streamed probe (C on val) took its place. "
                  for r in rows if r.get("classifier") == "probe")
        + f"Best on **val**: {best} (test accuracy is shown, never chosen on).\n\n```\n" + sweep_table(rows)
        + "\n```\n\n![sweep](sweep.png)\n")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5 + 0.2 * sum(is_multi_tap(r["tap"]) for r in rows)))
    single = [r for r in rows if not is_multi_tap(r["tap"])]  # a line through the taps, low to high
    joined = [r for r in rows if is_multi_tap(r["tap"])]  # at the cost of their deepest tap, apart from the line
    gflops = [r["gflops"] for r in single]
    ax.plot(gflops, [r["val_accuracy"] for r in single], "s--", color="tab:orange", label="val accuracy (chooses)")
    ax.plot(gflops, [r["test_accuracy"] for r in single], "o-", color="tab:blue", label="test accuracy")
    for r in single:
        ax.annotate(f"{r['tap']}\n{r['dims']} dims", (r["gflops"], r["val_accuracy"]), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=7, fontweight="bold" if r["tap"] == best else "normal")
    if joined:  # lettered: their names would cover each other where they share a deepest tap
        for kind, color in (("val", "tab:orange"), ("test", "tab:blue")):
            ax.plot([r["gflops"] for r in joined], [r[f"{kind}_accuracy"] for r in joined], "D", mfc="none",
                    color=color, label=f"{kind}, taps side by side (A, B, ...)")
        key = []
        for i, (letter, r) in enumerate(zip(string.ascii_uppercase, joined)):
            for kind in ("val", "test"):  # staggered sideways: rows at one cost are often close in accuracy
                ax.annotate(letter, (r["gflops"], r[f"{kind}_accuracy"]), textcoords="offset points",
                            xytext=(6 + 8 * (i % 3), -3), fontsize=7,
                            fontweight="bold" if r["tap"] == best else "normal")
            key.append(f"{letter} = {r['tap']} ({r['dims']} dims)")
        fig.text(0.01, 0.01, "\n".join(key), fontsize=7, va="bottom")
        fig.subplots_adjust(bottom=0.1 + 0.03 * len(key))
        ax.margins(x=0.12)  # room for the letters
    chosen = next(r for r in rows if r["tap"] == best)
    ax.plot(chosen["gflops"], chosen["val_accuracy"], "*", ms=14, color="tab:red", label=f"best on val: {best}")
    accuracies = [r[k] for r in rows for k in ("val_accuracy", "test_accuracy")]
    ax.set_ylim(max(0.0, min(accuracies) - 0.08), min(1.05, max(accuracies) + 0.08))
    ax.set_xlabel("GFLOPs per image to reach the tap (the forward pass it needs)")
    ax.set_ylabel("accuracy (linear probe)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{m.backbone} ({m.weights}): which layer? accuracy against cost")
    if not joined:
        fig.tight_layout()
    fig.savefig(run_dir / "sweep.png", dpi=120)
    plt.close(fig)
    return run_dir / "sweep.png"


def plot_learning_curves(path, history: list[dict], title: str, kept: str = "phase 2") -> None:
    """Train and validation accuracy and loss per epoch over both phases: the probe's start, the unfreeze point
    and the kept epoch (best on val in the kept phase) marked; whole-number epochs; accuracy on its own range.

    A phase-1 entry without training figures (the folded probe) is the start, epoch 0; trained epochs count
    from 1 across both phases.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    start = 0 if history and history[0]["accuracy"] is None else 1
    epochs = np.arange(start, start + len(history))
    kept_phase = 2 if kept == "phase 2" else 1
    in_kept = [i for i, e in enumerate(history) if e["phase"] == kept_phase]
    best = max(in_kept, key=lambda i: (history[i]["val_accuracy"], -history[i]["val_loss"])) if in_kept else None
    for ax, metric in zip(axes, ("accuracy", "loss")):
        train = [np.nan if e[metric] is None else e[metric] for e in history]
        val = [e[f"val_{metric}"] for e in history]
        ax.plot(epochs, train, "o-", ms=3, label=f"train {metric}")
        ax.plot(epochs, val, "o-", ms=3, label=f"validation {metric}")
        if start == 0:
            ax.annotate("probe (start)", (0, val[0]), textcoords="offset points", xytext=(4, 6), fontsize=8)
        phase2 = [i for i, e in enumerate(history) if e["phase"] == 2]
        if phase2:
            ax.axvline(epochs[phase2[0]] - 0.5, color="gray", ls="--", lw=1, label="unfreeze (phase 2)")
        if best is not None:
            ax.plot(epochs[best], val[best], "*", ms=14, color="tab:red", label=f"kept ({kept}, best on val)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    values = [v for e in history for v in (e["accuracy"], e["val_accuracy"]) if v is not None]
    if values:
        low, high = min(values), max(values)
        pad = max(0.02, 0.1 * (high - low))
        axes[0].set_ylim(max(0.0, low - pad), min(1.005, high + pad))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gain_text(gain: dict) -> str:
    return (f"{gain['gain']:+.3f} (95% CI {gain['low']:+.3f} to {gain['high']:+.3f}; "
            f"not better in {gain['p_not_better']:.1%} of {gain['resamples']:,} paired bootstrap resamples)")


def stage_table(metrics: dict) -> str:
    """Stage two against stage three on the same images: val (which chose) and test (scored once)."""
    probe, best, phases = metrics["probe"], metrics["stage_two"], metrics["phases"]
    folded = {"probe": "stage two's logreg, folded", "linsvm": "stage two's linsvm, folded"}
    head = folded[phases[0]["head"]] if phases[0]["head"] in folded and not phases[0]["epochs_run"] else \
        f"{phases[0]['head']} head, backbone frozen ({phases[0]['data']})"
    rows = [["two: probe", f"logreg on stored {metrics['tap']} features", probe["val_accuracy"], probe["accuracy"],
             probe["trainable_params"], probe["fit_seconds"]],
            ["two: best on val", best["classifier"], best["val_accuracy"], best["accuracy"], best["trainable_params"],
             best["fit_seconds"]],
            ["three, phase 1", head + (" (kept)" if metrics["kept"] == "phase 1" else ""), phases[0]["val_accuracy"],
             metrics["phase1_accuracy"], phases[0]["trainable"], phases[0]["seconds"]]]
    if len(phases) > 1:
        kept = metrics["kept"] == "phase 2"
        rows.append(["three, phase 2", f"unfrozen from {phases[1]['unfrozen_from']}"
                     + (" (kept)" if kept else " (not kept: not better than phase 1 on val)"),
                     phases[1]["val_accuracy"], metrics["accuracy"] if kept else None, phases[1]["trainable"],
                     phases[1]["seconds"]])
    return format_table(["stage", "model", "val acc (chooses)", "test acc", "trainable params", "train s"], rows)


def write_finetune_report(model_dir, metrics: dict, store) -> None:
    """``metrics.json``, ``report.md``, ``learning_curves.png`` and ``confusion.png`` of a fine-tuned model."""
    m = store.manifest
    title = f"{m.backbone} fine-tuned at {metrics['tap']} ({m.weights} weights, {m.image_size} px)"
    model_dir = _write_metrics(model_dir, metrics, store.class_names, title)
    plot_learning_curves(model_dir / "learning_curves.png", metrics["history"], title, metrics["kept"])
    phase_rows = [[i + 1, p["head"], p["data"], p["unfrozen_from"] or "- (frozen)",
                   f"{p['learning_rate']:g}" if p["learning_rate"] else "-", p.get("schedule", "-"),
                   f"{p['epochs_run']}{' (time limit)' if p.get('time_limited') else ''}",
                   p["val_accuracy"], p["val_loss"], p["trainable"], p["frozen"], p["seconds"]]
                  for i, p in enumerate(metrics["phases"])]
    text = [f"# {title}", "",
            f"Test images: {metrics['n_test']}, the same as stage two's (split {metrics['split_source']}; "
            f"test-row fingerprint {metrics['test_rows_sha256'][:16]}). Train {metrics['n_train']}, "
            f"val {metrics['n_val']}. Tap: {metrics['tap']} ({metrics['tap_reason']}). Every choice (tap, "
            "epoch, phase) was made on val; test was scored once, for this report.", "",
            "```", stage_table(metrics), "```", "",
            f"**Gain over stage two's best on val ({metrics['stage_two']['classifier']}): "
            f"{gain_text(metrics['gain'])}.**", "",
            f"Gain over stage two's linear probe on {metrics['tap']}: {gain_text(metrics['gain_over_probe'])}.", "",
            f"Gain of what was kept ({metrics['kept']}) over phase 1: {gain_text(metrics['gain_over_phase1'])}.", "",
            "```", format_table(["phase", "head", "data", "unfrozen from", "peak lr", "schedule", "epochs",
                                 "best val acc", "its val loss", "trainable", "frozen", "seconds"], phase_rows),
            "```", "",
            f"Augmentation: {', '.join(f'{k}={v}' for k, v in metrics['augmentation'].items()) or 'none'}; "
            f"precision {metrics['precision']}; BatchNorm layers frozen (inference mode); decoding took "
            f"{metrics['decode_seconds']:.1f} s.", "",
            "![learning curves](learning_curves.png)", "",
            "Validation figures are on unaugmented images throughout; training figures come from each phase's own "
            "data (augmented images in phase 2).", "", "```",
            classification_table(metrics["report"], store.class_names), "```", "",
            "![confusion matrix](confusion.png)", ""]
    (model_dir / "report.md").write_text("\n".join(text))
