"""A run folder's answer: every model folder as one comparison row (stage two and three), and the recommended one.

A run folder (``models/<run>/``) gathers what stages two and three trained on one store. Its model folders are
the record: :func:`collect_rows` reads their ``manifest.json`` and ``metrics.json``, so a table written after
``classify``, ``sweep``, ``finetune`` or ``layertap report`` says the same thing however the folder grew.

The recommendation is the row best on **val**, across stages; equal val accuracies go to the simpler model
(stage two before stage three; then logreg, linsvm, dense, knn, others). Test accuracy is shown beside it with
a 95% interval, never chosen on. Only models tested on the same images are compared: rows tested on others
(another seed or store) are set aside and named.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.evaluation import accuracy_interval
from pipeline.runs.artifacts import MANIFEST
from pipeline.runs.reports import COMPARISON_HEADERS, html_table

log = logging.getLogger(__name__)
SIMPLER_FIRST = ("logreg", "probe", "linsvm", "dense", "knn")
RUN_HEADERS = ["stage", *COMPARISON_HEADERS[:4], "test 95% CI", *COMPARISON_HEADERS[4:-1]]


def run_cells(r: dict) -> list:
    """A comparison row as the cells of :data:`RUN_HEADERS`."""
    return [r["stage"], r["tap"], r["classifier"], r["val_accuracy"], r["test_accuracy"],
            f"{r['test_low']:.3f}-{r['test_high']:.3f}", r["macro_f1"], r["fit_seconds"], r["trainable_params"]]


@dataclass
class RunSummary:
    """What a run folder holds, compared: ``rows`` best on val first (``rows[0]`` is recommended), the rows
    ``set_aside`` (tested on other images), the sweep's rows and the fine-tuning metrics where they exist."""

    run_dir: Path
    rows: list[dict]
    set_aside: list[dict] = field(default_factory=list)
    sweep: dict | None = None
    finetune: dict | None = None

    @property
    def recommended(self) -> dict | None:
        return self.rows[0] if self.rows else None

    def __repr__(self) -> str:
        r = self.recommended
        best = (f"recommended {r['tap']} + {r['classifier']} (stage {r['stage']}: val {r['val_accuracy']:.3f}, "
                f"test {r['test_accuracy']:.3f})" if r else "no models")
        return f"<RunSummary {self.run_dir}: {len(self.rows)} models compared; {best}>"

    def _repr_html_(self) -> str:
        """In a notebook: the answer, the comparison table, and the sweep and confusion plots inline."""
        import base64
        import html

        r = self.recommended
        if not r:
            return f"<p>{html.escape(repr(self))}</p>"
        verdict = self.finetune_verdict()
        images = [p for p in (self.run_dir / "sweep.png", Path(r["model_dir"]) / "confusion.png") if p.is_file()]
        inline = "".join(f'<img style="max-width:48%" src="data:image/png;base64,'
                         f'{base64.b64encode(p.read_bytes()).decode()}">' for p in images)
        return (f"<p><b>{html.escape(r['tap'])} + {html.escape(r['classifier'])}</b> (stage {r['stage']}): best on "
                f"val ({r['val_accuracy']:.3f}); test {r['test_accuracy']:.3f} (95% CI {r['test_low']:.3f} to "
                f"{r['test_high']:.3f}). {html.escape(verdict or '')} The page: "
                f"<code>{html.escape(str(self.run_dir / 'index.html'))}</code></p>"
                + html_table(RUN_HEADERS, [run_cells(row) for row in self.rows], highlight=0) + inline)

    def to_frame(self):
        """The comparison rows as a pandas DataFrame (pandas is not a dependency of layertap)."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def finetune_verdict(self) -> str | None:
        """What fine-tuning bought, in words, from the test gain over stage two's val-chosen best. The advice
        follows the recommendation, which val made; the test gain is reported, never turned into a choice."""
        if not self.finetune:
            return None
        gain, two = self.finetune["gain"], self.finetune["stage_two"]["classifier"]
        interval = f"{gain['gain']:+.3f} on test (95% CI {gain['low']:+.3f} to {gain['high']:+.3f})"
        three_chosen = self.recommended is not None and self.recommended["stage"] == "three"
        if gain["low"] > 0:
            said = f"fine-tuning gained {interval} over stage two's best on val ({two})"
        elif gain["high"] < 0:
            said = f"fine-tuning lost {interval} against stage two's best on val ({two})"
        else:
            said = f"no measurable gain: {interval} over stage two's best on val ({two})"
        if not three_chosen:
            return said + "; use the stage-two model" + (" (val chose it; test does not choose)."
                                                          if gain["low"] > 0 else ".")
        if gain["high"] < 0:
            return said + (". Val chose the fine-tuned model all the same (test does not choose); val and test "
                           "disagree here, so more val images would tell them apart better.")
        if gain["low"] > 0:
            return said + "; the fine-tuned model is the one to use."
        return said + (". Val chose the fine-tuned model; within the test's noise " + two +
                       " is as good and cheaper to run and to retrain.")


def _row(folder: Path, manifest: dict, metrics: dict) -> dict:
    stage = "three" if manifest.get("classifier") == "finetune" else "two"
    correct = round(metrics["accuracy"] * metrics["n_test"])
    low, high = accuracy_interval(correct, metrics["n_test"])
    report = metrics.get("report", {}).get("macro avg", {})
    return {"stage": stage, "tap": manifest["tap"], "classifier": folder.name.removeprefix(manifest["tap"] + "-"),
            "spec": manifest.get("classifier"), "val_accuracy": metrics["val_accuracy"],
            "test_accuracy": metrics["accuracy"], "test_low": low, "test_high": high,
            "macro_f1": report.get("f1-score"), "fit_seconds": metrics.get("fit_seconds"),
            "trainable_params": metrics.get("trainable_params"), "n_test": metrics["n_test"],
            "test_rows_sha256": metrics.get("test_rows_sha256"), "store_key": manifest.get("store_key"),
            "model_dir": str(folder)}


def _simplicity(row: dict) -> tuple:
    name = row["classifier"].split("-")[0]
    return (row["stage"] != "two", SIMPLER_FIRST.index(name) if name in SIMPLER_FIRST else len(SIMPLER_FIRST),
            row["trainable_params"] or 0, row["tap"])


def rank_rows(rows: list[dict]) -> list[dict]:
    """Best on val first; equal val accuracies: the simpler model first (see the module docstring)."""
    return sorted(rows, key=lambda r: (-r["val_accuracy"], *_simplicity(r)))


def collect_rows(run_dir: Path, store_key: str | None = None, test_sha: str | None = None) -> RunSummary:
    """Every model folder of ``run_dir`` as a row, ranked (:func:`rank_rows`).

    Args:
        store_key, test_sha: Compare only models of this store, tested on these test rows; by default those of
            the most models in the folder.
    """
    run_dir = Path(run_dir)
    rows, finetunes = [], {}
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            metrics = json.loads((folder / "metrics.json").read_text())
            rows.append(_row(folder, manifest, metrics))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # not a model folder, or one being written
            log.debug("%s is not compared: %s", folder, exc)
            continue
        if rows[-1]["stage"] == "three":
            finetunes[str(folder)] = metrics
    if rows and (store_key is None or test_sha is None):
        store_key, test_sha = Counter((r["store_key"], r["test_rows_sha256"]) for r in rows).most_common(1)[0][0]
    same = [r for r in rows if (r["store_key"], r["test_rows_sha256"]) == (store_key, test_sha)]
    ranked = rank_rows(same)
    kept_three = next((r for r in ranked if r["stage"] == "three"), None)
    sweep_path = run_dir / "sweep.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.is_file() else None
    if sweep and sweep.get("store_key", store_key) != store_key:
        sweep = None
    return RunSummary(run_dir, ranked, [r for r in rows if r not in same], sweep,
                      finetunes.get(kept_three["model_dir"]) if kept_three else None)
