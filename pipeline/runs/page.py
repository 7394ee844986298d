"""``models/<run>/index.html``: one page that answers, written after every stage and by ``layertap report RUN``.

The answer first (the model to use, its test accuracy with a 95% interval, the layer and why, what fine-tuning
bought), then the evidence: the comparison (val chooses, test beside it), the layer sweep, the recommended
model's confusion matrix and per-class table, learning curves, and the test images it gets most wrong. Plots
are the PNG files beside the page and gallery thumbnails are written to ``gallery/``: the page opens offline from
the folder, with no server and no script.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.core.errors import LayertapError
from pipeline.core.text import plural
from pipeline.data.images import BadImageError, open_regular
from pipeline.runs import atomic
from pipeline.runs.artifacts import MANIFEST
from pipeline.runs.per_image import read_metrics
from pipeline.runs.reports import SWEEP_HEADERS, format_table, html_table, sweep_cells, write_json
from pipeline.runs.summary import RUN_HEADERS, RunSummary, collect_rows, run_cells
from pipeline.store.feature_store import FeatureStore
from pipeline.store.splits import resolve_splits, test_rows_sha256

log = logging.getLogger(__name__)
GALLERY = 12  # test images shown, most wrong first
THUMBNAIL = 160
STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ddd}table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}td:first-child,th:first-child,.l{text-align:left}
tr.rec{background:#e8f4e8;font-weight:600}.answer{background:#f4f8fc;border-left:4px solid #3a7bd5;padding:.6em 1em}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;width:160px;font-size:12px}
.gallery img{width:160px;height:160px;object-fit:contain;background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}
img.plot{max-width:100%}.muted{color:#666}"""


def write_run_page(run_dir, store_key: str | None = None, test_sha: str | None = None) -> RunSummary:
    """``comparison.json``, ``comparison.md`` and ``index.html`` of a run folder, from its model folders.

    Raises:
        LayertapError: the folder holds no model folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LayertapError(f"{run_dir} is not a run folder; runs are the folders in models/ (classify --models)")
    if (run_dir / "manifest.json").is_file():
        raise LayertapError(f"{run_dir} is a model folder; a page is of its run, all its models compared: "
                            f"layertap report {run_dir.parent}")
    summary = collect_rows(run_dir, store_key, test_sha)
    if not summary.rows:
        raise LayertapError(f"{run_dir} holds no model folder to report on; train some first: "
                            "layertap classify --store features/<store>.h5")
    rec = summary.recommended
    write_json(run_dir / "comparison.json", {
        "chosen_by": "val accuracy", "store_key": rec["store_key"], "test_rows_sha256": rec["test_rows_sha256"],
        "recommended": rec["model_dir"], "rows": summary.rows, "set_aside": summary.set_aside})
    atomic.write_text(run_dir / "comparison.md",
        f"# Models in {run_dir.name}\n\nEach model was fit on the train rows; best first by **val** accuracy (equal: "
        f"the simpler first); test accuracy (95% Wilson interval) is scored once, for this report.\n\n"
        f"```\n{comparison_text(summary.rows)}\n```\n\nRecommended: {rec['tap']} + {rec['classifier']} "
        f"({rec['model_dir']}). The page: index.html\n")
    folder = run_dir / Path(rec["model_dir"]).name  # the recommended model's files, read once for the page
    manifest, metrics = json.loads((folder / MANIFEST).read_text()), read_metrics(folder)
    atomic.write_text(run_dir / "index.html", _page(summary, manifest, metrics, _gallery(run_dir, manifest, metrics)))
    return summary


def comparison_text(rows) -> str:
    return format_table(RUN_HEADERS, [run_cells(r) for r in rows])


def recommendation_line(summary: RunSummary) -> str:
    """The answer in one line, for the console."""
    r = summary.recommended
    return (f"recommended: {r['tap']} + {r['classifier']} (stage {r['stage']}), best on val of "
            f"{plural(len(summary.rows), 'model')} ({r['val_accuracy']:.3f}); test accuracy {r['test_accuracy']:.3f} "
            f"(95% CI {r['test_low']:.3f}-{r['test_high']:.3f}, {plural(r['n_test'], 'image')})")


def _img(src: str, alt: str) -> str:
    return f'<img class="plot" src="{html.escape(src)}" alt="{html.escape(alt)}">'


def _page(summary: RunSummary, manifest: dict, metrics: dict, gallery: list[dict]) -> str:
    rec, run_dir = summary.recommended, summary.run_dir
    folder = Path(rec["model_dir"]).name
    e = html.escape
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>layertap: {e(run_dir.name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{e(run_dir.name)}</h1><p class=muted>{e(manifest['backbone'])} with {e(manifest['weights'])} "
             f"weights, {manifest['image_size']} px, {e(manifest['pooling'])} pooling; store "
             f"<code>{e(manifest.get('store', '?'))}</code></p>",
             "<div class=answer><h2 style='margin-top:.3em;border:0'>The answer</h2>",
             f"<p id=recommended>Use <b>{e(rec['tap'])} + {e(rec['classifier'])}</b> (stage {rec['stage']}, "
             f"<code>{e(rec['model_dir'])}</code>): test accuracy <b>{rec['test_accuracy']:.3f}</b> (95% CI "
             f"{rec['test_low']:.3f} to {rec['test_high']:.3f}, {rec['n_test']} images). It is the best on val "
             f"({rec['val_accuracy']:.3f}) of the {len(summary.rows)} models below; test was not used to choose.</p>"]
    sweep = summary.sweep
    if sweep:
        best = next((r for r in sweep["rows"] if r["tap"] == sweep["best_on_val"]), None)
        if best:
            parts.append(f"<p>Which layer: <b>{e(best['tap'])}</b> has the best linear probe on val "
                         f"({best['val_accuracy']:.3f}); reaching it costs {best['gflops']:.1f} GFLOPs an image, "
                         f"{100 * best['flops_share']:.0f}% of the network (the sweep below).</p>")
    verdict = summary.finetune_verdict()
    parts.append(f"<p>Fine-tuning: {e(verdict)}</p>" if verdict else
                 "<p>Fine-tuning: not run (<code>layertap finetune</code> trains it and adds it here).</p>")
    parts.append(f"<p>Run it: <code>layertap predict {e(rec['model_dir'])} IMAGES...</code>; take it away as one "
                 f"file: <code>layertap export {e(rec['model_dir'])}</code>.</p></div>")
    parts += ["<h2>All models</h2><p>Val accuracy chooses; test accuracy is shown beside it with its 95% interval.</p>",
              html_table(RUN_HEADERS, [run_cells(r) for r in summary.rows], highlight=0)]
    if summary.set_aside:
        parts.append(f"<p class=muted>Not compared (tested on other images: another seed or store): "
                     f"{e(', '.join(Path(r['model_dir']).name for r in summary.set_aside))}</p>")
    if sweep:
        parts += ["<h2>Which layer</h2>", _img("sweep.png", "accuracy per tap against its cost"),
                  html_table(SWEEP_HEADERS, [sweep_cells(r) for r in sweep["rows"]])]
    parts += [f"<h2>{e(rec['tap'])} + {e(rec['classifier'])}: per class</h2>",
              _img(f"{folder}/confusion.png", "confusion matrix"),
              html_table(["class", "precision", "recall", "f1", "support"],
                     [[name, v["precision"], v["recall"], v["f1-score"], int(v["support"])]
                      for name, v in metrics["report"].items() if isinstance(v, dict)])]
    if summary.finetune:
        three = Path(next(r["model_dir"] for r in summary.rows if r["stage"] == "three")).name
        parts += ["<h2>Fine-tuning</h2>", _img(f"{three}/learning_curves.png", "learning curves")]
    parts.append("<h2>The test images it gets most wrong</h2>")
    if gallery:
        parts.append("<div class=gallery>" + "".join(
            f"<figure><img src=\"{e(g['src'])}\" alt=\"{e(g['path'])}\"><figcaption>true <b>{e(g['true'])}</b><br>"
            f"predicted {e(g['predicted'])} ({g['confidence']:.0%})<br><span class=muted>{e(g['path'])}</span>"
            "</figcaption></figure>" for g in gallery) + "</div>")
    else:
        parts.append("<p class=muted>None to show: every test image is right, or the images or the store are not "
                     "where the model's manifest says.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _gallery(run_dir: Path, manifest: dict, metrics: dict) -> list[dict]:
    """Thumbnails of the recommended model's wrong test images, most confident first, in ``gallery/``."""
    if "true_probability" not in metrics:
        return []
    try:
        store = FeatureStore(manifest["store"])
        s = manifest.get("settings", {})
        splits, _ = resolve_splits(store, s.get("seed", 0), s.get("test_fraction", 0.25), s.get("val_fraction", 0.15))
    except (OSError, LayertapError, KeyError) as exc:
        log.info("no gallery: %s", exc)
        return []
    if test_rows_sha256(store, splits) != metrics.get("test_rows_sha256"):
        return []
    test = splits.rows("test")
    y, predicted = store.labels[test], np.asarray(metrics["predictions"])
    wrong = np.flatnonzero(predicted != y)
    wrong = wrong[np.argsort(np.asarray(metrics["true_probability"])[wrong], kind="stable")][:GALLERY]
    out = run_dir / "gallery"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.jpg"):
        old.unlink()
    root, shown, unread = Path(store.manifest.data_root), [], []
    for n, (i, path) in enumerate(zip(wrong, store.column_at("paths", test[wrong]))):
        path = path.decode("utf-8", "surrogateescape")
        try:
            _thumbnail(root / path, out / f"{n:02d}.jpg")
        except (OSError, BadImageError) as exc:  # gone, or a FIFO or device now (never read)
            unread.append(f"{path}: {exc}")
            continue
        shown.append({"src": f"gallery/{n:02d}.jpg", "path": path, "true": store.class_names[y[i]],
                      "predicted": store.class_names[predicted[i]], "confidence": metrics["confidence"][i]})
    if unread:  # one line: the images moved, or the store came from another machine
        log.info("gallery: %d of its %s cannot be read%s (%s%s); the page shows the others", len(unread),
                 plural(len(wrong), "image"), "" if root.is_dir() else f", {root} is not here",
                 unread[0], f"; {len(unread) - 1} more" if unread[1:] else "")
    return shown


def _thumbnail(source: Path, target: Path) -> None:
    with open_regular(source)[0] as fh, Image.open(fh) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        image.save(target, quality=85)
