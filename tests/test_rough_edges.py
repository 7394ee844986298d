"""The console, plots and flags a user meets first: each fixed at its root, each pinned here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, make_split_folder, tiny_settings
from pipeline.classification.settings import DEFAULT_CLASSIFIERS, ClassifySettings
from pipeline.cli import main
from pipeline.core.parallel import progress_bar
from pipeline.core.text import plural
from pipeline.extraction.extract import extract_features
from pipeline.runs import reports


def test_no_progress_bar_with_nothing_to_count_or_no_terminal(monkeypatch):
    items = [1, 2]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress_bar(items, total=0, desc="scan", enabled=True) is items  # a cache hit: nothing to scan
    assert progress_bar(items, total=2, desc="scan", enabled=True) is not items
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a pipe or a log: no carriage-return remnants
    assert progress_bar(items, total=2, desc="scan", enabled=True) is items


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    return extract_features(tiny_settings(make_split_folder(root / "data", 3, 2, 2), root / "f")).store_path


def test_piped_output_is_line_buffered_and_has_no_bar_remnants(store, tmp_path):
    script = ("import sys\nfrom pipeline.cli import main\ncode = main(sys.argv[1:])\n"
              "print('line_buffering', sys.stdout.line_buffering, file=sys.stderr)\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "classify", "--store", str(store), "--models",
                           str(tmp_path), "--classifiers", "logreg", "--layers", "block2_pool"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "line_buffering True" in done.stderr
    assert "\r" not in done.stdout + done.stderr and "img/s" not in done.stderr


def test_counts_are_said_in_the_singular_and_the_plural():
    assert [plural(1, "layer"), plural(2, "layer"), plural(1_000, "class", "classes")] == \
        ["1 layer", "2 layers", "1,000 classes"]


@pytest.mark.parametrize("flag, value", [("--backbone", "resnet50"), ("--size", "64"), ("--pool", "max"),
                                         ("--weights", "hed-bsds500")])
def test_a_flag_that_contradicts_the_store_is_refused(store, tmp_path, capsys, flag, value):
    assert main(["classify", "--store", str(store), flag, value, "--models", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value} contradicts --store {store}" in err and err.count("\n") == 1


def test_flags_that_agree_with_the_store_are_accepted(store, tmp_path):
    assert main(["classify", "--store", str(store), "--size=32", "--weights", "random", "--classifiers", "logreg",
                 "--layers", "block1_pool", "--models", str(tmp_path), "-q"]) == 0


def test_the_cli_and_make_train_the_same_default_classifiers():
    assert ClassifySettings(store="s.h5").classifiers == DEFAULT_CLASSIFIERS == ("logreg", "linsvm", "knn", "dense")
    dry = subprocess.run(["make", "-n", "--no-print-directory", "classify", "STORE=s.h5"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    line = next(line for line in dry.splitlines() if "layertap classify" in line)
    assert "--classifiers" not in line


WORKER_SIGINT = textwrap.dedent("""
    import multiprocessing, signal
    from pipeline.data.decoding import ProcessDecoder

    def report(queue):
        queue.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)

    if __name__ == "__main__":
        decoder = ProcessDecoder(8, 2, 1)  # starts the forkserver its workers come from
        queue = multiprocessing.get_context("forkserver").Queue()
        child = multiprocessing.get_context("forkserver").Process(target=report, args=(queue,))
        child.start()
        print("ignored" if queue.get(timeout=60) else "not ignored")
        child.join()
        decoder.close()
""")


def test_decoding_workers_ignore_ctrl_c_from_their_first_instruction(tmp_path):
    """Ctrl-C reaches the whole process group; a worker still importing would print its own traceback."""
    script = tmp_path / "probe.py"
    script.write_text(WORKER_SIGINT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == "ignored", done.stderr[-2000:]


class _Keep:
    """``reports._pyplot`` that keeps the figures instead of closing them."""

    def __init__(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.figures = plt, []

    def __getattr__(self, name):
        return getattr(self.plt, name)

    def subplots(self, *args, **kwargs):
        fig, axes = self.plt.subplots(*args, **kwargs)
        self.figures.append(fig)
        return fig, axes

    def close(self, fig):
        pass


def test_learning_curves_count_whole_epochs_from_the_probe_and_mark_the_kept_one(monkeypatch, tmp_path):
    keep = _Keep()
    monkeypatch.setattr(reports, "_pyplot", lambda: keep)
    history = [{"phase": 1, "accuracy": None, "loss": None, "val_accuracy": 0.78, "val_loss": 0.6}] + [
        {"phase": 2, "accuracy": 0.8 + 0.01 * i, "loss": 0.5, "val_accuracy": v, "val_loss": 0.5}
        for i, v in enumerate([0.79, 0.83, 0.81])]
    reports.plot_learning_curves(tmp_path / "lc.png", history, "t", kept="phase 2")
    accuracy = keep.figures[0].axes[0]
    validation = next(line for line in accuracy.lines if line.get_label() == "validation accuracy")
    assert list(validation.get_xdata()) == [0, 1, 2, 3]  # the probe is the start, epoch 0
    star = next(line for line in accuracy.lines if line.get_label().startswith("kept"))
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([2], [0.83])
    assert all(float(t).is_integer() for t in accuracy.get_xticks())
    low, high = accuracy.get_ylim()
    assert low > 0.7 and high < 0.9  # not a 0-1 axis that flattens 0.78-0.84


def test_a_long_confusion_title_is_wrapped_not_cut(monkeypatch, tmp_path):
    keep = _Keep()
    monkeypatch.setattr(reports, "_pyplot", lambda: keep)
    title = "vgg16 fine-tuned at block4_pool (hed-bsds500 weights, 224 px)"
    reports.plot_confusion(tmp_path / "c.png", [[1, 0], [0, 1]], ["a", "b"], title)
    shown = keep.figures[0].axes[0].get_title()
    assert "\n" in shown and shown.replace("\n", " ") == title


def test_many_classes_draw_a_confusion_picture_of_fixed_size(tmp_path):
    """100 classes: one picture of the matrix at a fixed size, classes by index (a label and a count per cell
    made the figure grow with the classes: 1,000 classes asked for a 9.5 GB canvas)."""
    from PIL import Image

    matrix = np.eye(100, dtype=int) * 3 + np.roll(np.eye(100, dtype=int), 1, axis=1)
    reports.plot_confusion(tmp_path / "c.png", matrix.tolist(), [f"class{i}" for i in range(100)], "a probe")
    with Image.open(tmp_path / "c.png") as image:
        assert max(image.size) <= 10 * 120
    reports.plot_confusion(tmp_path / "few.png", [[1, 0], [0, 1]], ["a", "b"], "two classes")
    with Image.open(tmp_path / "few.png") as image:
        assert max(image.size) <= 4 * 120  # few classes keep their labelled size


def test_fine_tuning_prints_each_gain_once(monkeypatch, tmp_path, capsys):
    from pipeline.cli import commands

    run = tmp_path / "run"
    for name, val in (("b4-logreg", 0.8), ("b4-finetune", 0.7)):
        (run / name).mkdir(parents=True)
        (run / name / "manifest.json").write_text(json.dumps({"tap": "b4", "classifier": name[3:], "store_key": "k"}))
        metrics = {"val_accuracy": val, "accuracy": 0.9, "n_test": 10, "test_rows_sha256": "t", "trainable_params": 1,
                   "fit_seconds": 1.0, "report": {}}
        (run / name / "metrics.json").write_text(json.dumps(metrics))
    gain = {"gain": 0.01, "low": -0.02, "high": 0.03, "p_not_better": 0.3, "resamples": 10}
    finetuned = json.loads((run / "b4-finetune" / "metrics.json").read_text()) | {
        "gain": gain, "gain_over_probe": gain | {"gain": 0.02}, "stage_two": {"classifier": "b4 + logreg"},
        "tap": "b4", "store_key": "k", "test_rows_sha256": "t"}
    (run / "b4-finetune" / "metrics.json").write_text(json.dumps(finetuned))
    monkeypatch.setattr(commands, "stage_table", lambda metrics: "TABLE")
    monkeypatch.setattr(commands, "_store_for", lambda args: "s.h5")
    monkeypatch.setattr(commands, "settings_from_args", lambda *a, **k: None)
    import pipeline.finetuning.finetune as stage

    monkeypatch.setattr(stage, "finetune", lambda settings: (run / "b4-finetune", finetuned))
    assert commands.cmd_finetune(None) == 0
    out = capsys.readouterr().out
    assert out.count("+0.010") == 1 and out.count("+0.020") == 1, out  # over stage two's best; over the probe
