"""The run's answer: the recommendation across stages (on val), its page, and `layertap report`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_split_folder, tiny_settings
from pipeline.classification.classify import classify
from pipeline.classification.settings import ClassifySettings
from pipeline.cli import main
from pipeline.extraction.extract import extract_features
from pipeline.runs.per_image import read_metrics
from pipeline.runs.summary import collect_rows


def _model(run: Path, name: str, val: float, test: float, *, stage: str = "two", sha: str = "t1", n: int = 100,
           params: int = 10) -> Path:
    tap, _, clf = name.partition("-")
    folder = run / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"tap": tap, "classifier": "finetune" if stage == "three"
                                                      else clf, "store_key": "k"}))
    (folder / "metrics.json").write_text(json.dumps({
        "val_accuracy": val, "accuracy": test, "n_test": n, "test_rows_sha256": sha, "trainable_params": params,
        "fit_seconds": 1.0, "report": {"macro avg": {"f1-score": test}}}))
    return folder


def test_the_recommendation_is_best_on_val_across_stages_never_on_test(tmp_path):
    _model(tmp_path, "b3-logreg", val=0.70, test=0.90)  # best on test: not chosen
    _model(tmp_path, "b4-dense", val=0.80, test=0.70, params=1000)
    _model(tmp_path, "b4-finetune", val=0.81, test=0.60, stage="three", params=10**6)
    _model(tmp_path, "b5-logreg", val=0.99, test=0.99, sha="other")  # tested on other images: set aside
    (tmp_path / "gallery").mkdir()  # not a model folder
    summary = collect_rows(tmp_path)
    assert summary.recommended["model_dir"] == str(tmp_path / "b4-finetune")
    assert [Path(r["model_dir"]).name for r in summary.set_aside] == ["b5-logreg"]
    low, high = summary.recommended["test_low"], summary.recommended["test_high"]
    assert low < 0.60 < high and high - low < 0.25  # the Wilson interval of 60/100


def test_equal_val_accuracy_goes_to_the_simpler_model(tmp_path):
    _model(tmp_path, "b4-finetune", val=0.8, test=0.9, stage="three")
    _model(tmp_path, "b4-dense", val=0.8, test=0.9)
    _model(tmp_path, "b4-linsvm", val=0.8, test=0.9)
    _model(tmp_path, "b3-logreg", val=0.8, test=0.5)
    names = [Path(r["model_dir"]).name for r in collect_rows(tmp_path).rows]
    assert names == ["b3-logreg", "b4-linsvm", "b4-dense", "b4-finetune"]


@pytest.mark.parametrize("low, high, three_wins, words", [
    (-0.03, 0.04, False, "no measurable gain: +0.005 on test (95% CI -0.030 to +0.040) over stage two's best on "
                         "val (b4 + logreg); use the stage-two model."),
    (-0.03, 0.04, True, "Val chose the fine-tuned model; within the test's noise b4 + logreg is as good"),
    (0.01, 0.04, True, "fine-tuning gained +0.005 on test"),
    (-0.09, -0.01, False, "fine-tuning lost +0.005 on test"),
    (-0.09, -0.01, True, "Val chose the fine-tuned model all the same (test does not choose)"),
    (0.01, 0.04, False, "use the stage-two model (val chose it; test does not choose)."),
])
def test_what_fine_tuning_bought_is_said_in_words(tmp_path, low, high, three_wins, words):
    _model(tmp_path, "b4-logreg", val=0.8, test=0.9)
    _model(tmp_path, "b4-finetune", val=0.9 if three_wins else 0.7, test=0.9, stage="three")
    metrics = json.loads((tmp_path / "b4-finetune" / "metrics.json").read_text())
    metrics |= {"gain": {"gain": 0.005, "low": low, "high": high}, "stage_two": {"classifier": "b4 + logreg"}}
    (tmp_path / "b4-finetune" / "metrics.json").write_text(json.dumps(metrics))
    verdict = collect_rows(tmp_path).finetune_verdict()
    assert words in verdict
    assert ("use the stage-two model" in verdict) == (not three_wins)  # the advice follows val, never test


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    data = make_split_folder(root / "data", train=4, val=2, test=3)
    store = extract_features(tiny_settings(data, root / "f")).store_path
    result = classify(ClassifySettings(store=str(store), classifiers=("logreg", "knn"), out_dir=str(root / "m")))
    return result


def test_classify_writes_the_page_with_every_picture_beside_it(run):
    page = (run.run_dir / "index.html").read_text()
    comparison = json.loads((run.run_dir / "comparison.json").read_text())
    best = max(comparison["rows"], key=lambda r: r["val_accuracy"])
    assert comparison["recommended"] == comparison["rows"][0]["model_dir"] == run.summary.recommended["model_dir"]
    assert best["val_accuracy"] == comparison["rows"][0]["val_accuracy"]
    assert re.search(r'<p id=recommended>Use <b>(\S+) \+ (\S+)</b>', page).groups() == (best["tap"],
                                                                                       best["classifier"])
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert f"{Path(best['model_dir']).name}/confusion.png" in sources
    assert all((run.run_dir / s).is_file() for s in sources), sources
    assert "http://" not in page and "https://" not in page and "<script" not in page  # offline, as files
    predictions = read_metrics(best["model_dir"])["predictions"]
    wrong = sum(p != t for p, t in zip(predictions, _test_labels(best["model_dir"])))
    assert len([s for s in sources if s.startswith("gallery/")]) == min(wrong, 12)


def _test_labels(model_dir):
    from pipeline.store.feature_store import FeatureStore
    from pipeline.store.splits import resolve_splits

    store = FeatureStore(json.loads((Path(model_dir) / "manifest.json").read_text())["store"])
    splits, _ = resolve_splits(store)
    return store.labels[splits == "test"].tolist()


def test_json_floats_are_rounded(run):
    text = (Path(run.summary.recommended["model_dir"]) / "metrics.json").read_text()
    digits = [len(m.replace(".", "").lstrip("0")) for m in re.findall(r"\d+\.\d+", text)]
    assert digits and max(digits) <= 6


def test_report_rewrites_the_page_from_the_model_folders(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run.run_dir, copy)
    for name in ("index.html", "comparison.json"):
        (copy / name).unlink()
    assert main(["report", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "recommended: " in out and f"{copy / 'index.html'}" in out and (copy / "index.html").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no model folder" in capsys.readouterr().err
    model = Path(run.summary.recommended["model_dir"])
    assert main(["report", str(model)]) == 2
    assert f"{model} is a model folder; a page is of its run, all its models compared: layertap report " \
           f"{model.parent}" in capsys.readouterr().err


CHECK = """<script>window.addEventListener('load', () => { document.body.setAttribute('data-images',
JSON.stringify([...document.images].map(i => [i.getAttribute('src'), i.naturalWidth]))); });</script>"""


def test_the_page_opens_in_a_browser_with_every_image_and_no_error(run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        pytest.skip("no headless Chromium here (make test installs Debian's chromium where apt-get works)")
    page = run.run_dir / "index.html"
    probe = run.run_dir / ".browser-check.html"  # beside the page, so that its relative paths resolve
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    try:
        done = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                               "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                               "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    images = json.loads(re.search(r'data-images="([^"]*)"', done.stdout).group(1).replace("&quot;", '"'))
    assert images and all(width > 0 for _, width in images), images
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    rows = json.loads((run.run_dir / "comparison.json").read_text())["rows"]
    best = max(rows, key=lambda r: r["val_accuracy"])  # as rendered, not as written
    shown = re.search(r'<p id="recommended">Use <b>(\S+) \+ (\S+)</b>', done.stdout)
    assert shown and shown.groups() == (best["tap"], best["classifier"]) and best is rows[0]


def test_results_show_themselves_in_a_notebook(run):
    from pipeline.store.feature_store import FeatureStore

    rec = run.summary.recommended
    assert repr(run.summary).endswith(f"recommended {rec['tap']} + {rec['classifier']} (stage two: val "
                                      f"{rec['val_accuracy']:.3f}, test {rec['test_accuracy']:.3f})>")
    assert run.best["val_accuracy"] >= max(r["val_accuracy"] for r in run.rows) and "test_accuracy" in run.best
    html = run._repr_html_()
    assert html.count("<tr") == len(run.summary.rows) + 1 and "data:image/png;base64," in html
    store = FeatureStore(json.loads((Path(rec["model_dir"]) / "manifest.json").read_text())["store"])
    assert repr(store).endswith("taps block1_pool (64), block2_pool (128); 27 rows in 3 classes "
                                "(train 12, val 6, test 9)>") and "vgg16 (random" in repr(store)
    pytest.importorskip("pandas")
    frame = run.summary.to_frame()
    assert list(frame["model_dir"]) == [r["model_dir"] for r in run.summary.rows]


def test_images_the_gallery_cannot_read_are_one_line_not_one_each(tmp_path, caplog):
    """A store used where its images are not (moved, or made on another machine): one line names the count,
    the missing folder and an example; the page is still written."""
    import numpy as np

    from pipeline.runs.page import _gallery
    from pipeline.store.feature_store import FeatureStore
    from pipeline.store.splits import resolve_splits, test_rows_sha256

    data = make_split_folder(tmp_path / "data", train=2, val=1, test=3)
    store = FeatureStore(extract_features(tiny_settings(data, tmp_path / "f", layers=("block1_pool",))).store_path)
    splits, _ = resolve_splits(store)
    y = store.labels[splits == "test"]
    metrics = {"predictions": (y + 1) % 3, "true_probability": np.linspace(0.1, 0.2, len(y)),
               "confidence": np.full(len(y), 0.9), "test_rows_sha256": test_rows_sha256(store, splits)}
    manifest = {"store": str(store.path)}
    assert len(_gallery(tmp_path, manifest, metrics)) == 9  # every test image is wrong, and shown
    shutil.rmtree(data)
    with caplog.at_level("INFO", logger="pipeline"):
        assert _gallery(tmp_path, manifest, metrics) == []
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gallery")]
    assert len(lines) == 1 and lines[0].startswith(f"gallery: 9 of its 9 images cannot be read, {data} is not here (")
    assert lines[0].endswith("; 8 more); the page shows the others")
