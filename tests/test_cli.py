"""The command line: help that teaches, summaries, inspect, clean errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, backend_interpreter, make_class_folder
from pipeline.cli import main
from pipeline.core.runtime import keras_backend

TINY = ["--weights", "random", "--size", "32", "--layers", "block1_pool,block2_pool", "--batch-size", "4", "-q"]


def test_module_help_runs_in_a_subprocess():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--help"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0
    for text in ("--layers", "--pool", "gridN", "hed-bsds500", "examples:", "--split-file", "resumes"):
        assert text in run.stdout


def test_help_loads_no_framework_and_lists_each_section_once():
    """``layertap --help`` and a stage's help build every flag from the settings classes without importing
    scikit-learn or Keras (they are imported when a stage runs), and --store joins the stage's own section."""
    code = ("import sys, contextlib, io\nfrom pipeline.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n    main(['classify', '--help'])\n"
            "print(out.getvalue().count('stage two:'), [m for m in ('sklearn', 'keras') if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.split("\n")[-2] == "1 []", run.stdout[-500:] + run.stderr[-2000:]


def test_extract_prints_a_summary_then_a_cache_hit(split_folder, tmp_path, capsys):
    out = str(tmp_path / "f")
    assert main(["extract", "--data", str(split_folder), "--out", out, *TINY]) == 0
    first = capsys.readouterr().out
    assert "block1_pool" in first and "computed" in first and "images/s" in first
    assert "18 in 3 classes (train 9, val 3, test 6)" in first
    assert main(["extract", "--data", str(split_folder), "--out", out, *TINY]) == 0
    second = capsys.readouterr().out
    assert "cache hit: no image decoded" in second and "cached" in second


def test_inspect_shows_provenance_and_skipped(class_folder, tmp_path, capsys):
    (class_folder / "red" / "empty.png").write_bytes(b"")
    assert main(["extract", "--data", str(class_folder), "--out", str(tmp_path / "f"), *TINY]) == 0
    capsys.readouterr()
    store = next((tmp_path / "f").glob("*.h5"))
    assert main(["inspect", str(store)]) == 0
    shown = capsys.readouterr().out
    for text in ("random-seed0", "sha256", "caffe", "block2_pool", "12 images, 3 classes", "red/empty.png: empty file"):
        assert text in shown


def test_layers_lists_taps_and_flatten_cost(capsys):
    assert main(["layers", "vgg16", "--size", "224"]) == 0
    shown = capsys.readouterr().out
    assert "block4_pool *" in shown and "block1_conv2" in shown
    assert "3,211,264" in shown  # flatten features of block1_conv2 at 224 px


def test_user_errors_exit_2_with_the_fix(class_folder, tmp_path, capsys):
    args = ["extract", "--data", str(class_folder), "--out", str(tmp_path / "f"), "--weights", "random",
            "--size", "32", "-q"]
    assert main([*args, "--layers", "block9_pool"]) == 2
    assert "layer 'block9_pool' is not in vgg16; recommended taps" in capsys.readouterr().err
    assert main([*args, "--pool", "flat"]) == 2
    assert "use one of: avg, max, avgmax" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "absent.h5")]) == 2
    assert "run `layertap extract` first" in capsys.readouterr().err


def test_flatten_on_a_large_map_warns_with_the_numbers(class_folder, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert main(["extract", "--data", str(class_folder), "--out", str(tmp_path / "f"), "--weights", "random",
                     "--size", "64", "--layers", "block1_conv2", "--pool", "flatten", "-q"]) == 0
    assert "262,144 features per image" in caplog.text and "Dense(256) head" in caplog.text


def test_sample_set_is_built_offline(tmp_path, capsys):
    pytest.importorskip("skimage")
    assert main(["sample", "--dest", str(tmp_path / "sample")]) == 0
    folder = tmp_path / "sample"
    assert capsys.readouterr().out.strip() == str(folder)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["test", "train", "val"]
    assert len(list(folder.glob("*/*/*.jpg"))) == 160
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["brick", "grass", "gravel", "moon"]


def test_sample_splits_share_no_pixels():
    from pipeline.data.sample import GRID, split_tiles
    tiles = split_tiles((512, 512), np.random.default_rng(3))
    covered = np.zeros((512, 512), int)
    for top, left, height, width in (tile for split in tiles.values() for tile in split):
        covered[top:top + height, left:left + width] += 1
    assert (covered == 1).all() and [len(tiles[s]) for s in ("train", "val", "test")] == [GRID * GRID - 6, 3, 3]


def test_classify_then_predict_to_csv(split_folder, tmp_path, capsys):
    models = tmp_path / "models"
    assert main(["classify", "--data", str(split_folder), "--out", str(tmp_path / "f"), "--models", str(models),
                 "--classifiers", "logreg,knn", *TINY]) == 0
    shown = capsys.readouterr().out
    assert "val acc (chooses)" in shown and "test acc" in shown and "recommended: " in shown
    assert f"{models}/" in shown and "index.html" in shown
    model = next(models.glob("*/block2_pool-logreg"))
    best = json.loads((model.parent / "comparison.json").read_text())["rows"][0]["model_dir"]
    assert main(["predict", str(model.parent), str(split_folder / "test")]) != 0
    assert f"it is a run folder: give one of its 4 model folders, such as {best} (best on val); it has " \
           f"block1_pool-knn, block1_pool-logreg, block2_pool-knn" in capsys.readouterr().err
    assert main(["predict", str(model.parent / "block9_pool-logreg"), str(split_folder / "test")]) != 0
    assert f"block9_pool-logreg does not exist; {model.parent} is a run folder: give one of its 4 model folders" \
        in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(model), str(split_folder / "test"), str(tmp_path / "bad.png"), "--output",
                 str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("path,error,class1,prob1") and len(lines) == 1 + 6 + 1
    assert "6 images classified, 1 not readable" in capsys.readouterr().out


NO_FRAMEWORK = textwrap.dedent("""
    import sys
    from pipeline.cli import main
    code = main(sys.argv[1:])
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"keras", "tensorflow", "jax", "torch"})
    print("frameworks loaded:", ",".join(loaded) or "none")
    sys.exit(code)
""")


@pytest.mark.parametrize("python", ["this", "torch"])
def test_cache_hit_inspect_and_scikit_learn_classify_load_no_framework(python, split_folder, tmp_path):
    """Commands that run no network do not pay for loading a framework (seconds of start-up): not TensorFlow,
    and not torch where it is installed (skops would load it through scikit-learn; the torch case runs
    ``inspect`` and ``classify`` in ``.venv-torch``, as a torch user would)."""
    out = str(tmp_path / "f")
    extract = ["extract", "--data", str(split_folder), "--out", out, *TINY]
    assert main(extract) == 0  # computes: the network runs here
    store = str(next((tmp_path / "f").glob("*.h5")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    commands = [["inspect", store],
                ["classify", "--store", store, "--models", str(tmp_path / "m"), "--classifiers", "logreg,knn", "-q"]]
    if python == "this":
        interpreter, commands = sys.executable, [extract, *commands]
    else:
        interpreter, env["KERAS_BACKEND"] = backend_interpreter(python), python
    for args in commands:
        run = subprocess.run([str(interpreter), "-c", NO_FRAMEWORK, *args], env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "frameworks loaded: none" in run.stdout, (args[0], run.stdout)
        assert args[0] != "extract" or "cache hit: no image decoded" in run.stdout


TF_CPP_LINES = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub", "cpu_feature_guard")


def test_backend_defaults_leave_gpu_memory_to_a_gpu_decoder_and_explicit_settings_win(monkeypatch):
    from pipeline import set_backend_defaults

    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    set_backend_defaults()
    assert os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


def test_console_has_no_backend_start_up_lines_unless_verbose(class_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LAYERTAP_VERBOSE", None)
    args = [sys.executable, "-m", "pipeline", "extract", "--data", str(class_folder), "--out", str(tmp_path / "f"),
            "--weights", "random", "--size", "32", "--layers", "block1_pool", "-q"]
    quiet = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    assert quiet.returncode == 0, quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if any(t in line for t in TF_CPP_LINES)], quiet.stderr
    assert "feature store" in quiet.stdout
    if keras_backend() == "tensorflow":  # the lines are TensorFlow's
        verbose = subprocess.run([*args[:3], "-v", *args[3:], "--pool", "max"], env=env, capture_output=True,
                                 text=True, timeout=180)
        assert verbose.returncode == 0 and any(t in verbose.stderr for t in TF_CPP_LINES), verbose.stderr


def test_a_reader_that_leaves_early_gets_no_traceback():
    """``layertap layers vgg16 | head -1``: the command's output goes nowhere once its reader left, quietly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "layers", "vgg16"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the network is built and anything printed
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in stderr and "Error" not in stderr, stderr


def test_a_broken_pipe_that_is_not_our_output_is_still_an_error(monkeypatch):
    import pipeline.cli.commands

    def worker_gone(args):
        raise BrokenPipeError(32, "Broken pipe")  # as from a pipe to a process that died

    monkeypatch.setattr(pipeline.cli.commands, "cmd_layers", worker_gone)
    with pytest.raises(BrokenPipeError):
        main(["layers", "vgg16"])


def test_sweep_takes_the_taps_the_probe_and_the_split_it_is_given(tmp_path, capsys):
    """``sweep --layers``, ``--classifiers`` and ``--test-fraction`` were parsed and then dropped: every tap of
    the store was swept with ``logreg`` on the default split, whatever was asked."""
    data = make_class_folder(tmp_path / "data", per_class=8)
    assert main(["extract", "--data", str(data), "--out", str(tmp_path / "f"), *TINY]) == 0
    store, models = str(next((tmp_path / "f").glob("*.h5"))), tmp_path / "m"
    sweep = ["sweep", "--store", store, "--models", str(models), "--test-fraction", "0.4", "-q"]
    assert main([*sweep, "--layers", "block2_pool", "--classifiers", 'probe:{"epochs": 5}']) == 0
    (run,) = models.iterdir()
    report = json.loads((run / "sweep.json").read_text())
    assert [(r["tap"], r["classifier"]) for r in report["rows"]] == [("block2_pool", 'probe:{"epochs": 5}')]
    (model,) = run.glob("block2_pool-probe*")
    assert json.loads((model / "metrics.json").read_text())["n_test"] == 10  # the default 0.25: 6 of 24
    capsys.readouterr()
    assert main([*sweep, "--layers", "block1_pool,block9_pool"]) == 2
    assert "has no tap block9_pool" in capsys.readouterr().err
    for wrong in ("knn", "logreg,probe"):
        assert main([*sweep, "--classifiers", wrong]) == 2
        assert f"sweep fits one linear probe per tap, not {wrong}" in capsys.readouterr().err
    assert main([*sweep, "--layers", "block1_pool+block2_pool,block1_pool"]) == 0
    (run,) = models.iterdir()
    rows = json.loads((run / "sweep.json").read_text())["rows"]
    assert [(r["tap"], r["classifier"]) for r in rows] == [("block1_pool", "logreg"), ("block1_pool+block2_pool",
                                                                                       "logreg")]
