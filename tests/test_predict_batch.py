"""``layertap predict ... --out FILE``: prediction as a batch job on stage one's machinery (issue 30, item 4)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_extract import KILLER

from conftest import ROOT, add_bad_files, make_class_folder, tiny_settings


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A logreg model folder on a tiny store (block1_pool, random weights), the images, and a fresh batch."""
    from pipeline.classification.classify import ClassifySettings, classify
    from pipeline.extraction.extract import extract_features

    root = tmp_path_factory.mktemp("batch")
    data = make_class_folder(root / "data", per_class=6)
    for path in data.rglob("*.jpg"):  # older than the scan by more than the stat cache's racy window
        os.utime(path, (time.time() - 3600,) * 2)
    store = extract_features(tiny_settings(data, root / "features", layers=("block1_pool",))).store_path
    result = classify(ClassifySettings(store=str(store), out_dir=str(root / "models"), classifiers=("logreg",)))
    fresh = make_class_folder(root / "new", per_class=5)  # not in any store: other seeds below
    for i, path in enumerate(sorted(fresh.rglob("*.jpg"))):
        from conftest import photo

        photo((i * 20 % 255, 90, 200 - i * 9), seed=1000 + i).save(path, "JPEG")
    return root, data, fresh, next(r["model_dir"] for r in result.rows if r["classifier"] == "logreg")


def read(path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_the_batch_file_has_predict_s_answers_in_path_order_with_reasons(trained, tmp_path, capsys):
    """Every image once, in path order; unreadable ones with their reason in place; the probabilities those
    of the in-memory predict (one code path for the features: stage one's)."""
    from pipeline.cli import main
    from pipeline.prediction.predict import predict

    root, _, fresh, model = trained
    fresh = Path(shutil.copytree(fresh, tmp_path / "new"))  # the module's folder stays as it is
    reasons = add_bad_files(fresh)
    out = tmp_path / "new-folder" / "p.csv"  # its folder is made
    assert main(["predict", model, str(fresh), "--out", str(out), "--top-k", "2", "--features",
                 str(tmp_path / "f"), "-q"]) == 0
    # the truncated JPEG passes the header scan and fails at decoding: 16 sent to the decoder
    assert "15 images classified, 4 not readable (16 decoded, 0 read from earlier stores)" in capsys.readouterr().out
    rows = read(out)
    assert rows[0] == ["path", "error", "class1", "prob1", "class2", "prob2"]
    files = sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file())
    assert [os.path.relpath(r[0], fresh) for r in rows[1:]] == files
    expected = {r["path"]: r for r in predict(model, [fresh], top_k=2)}
    for row in rows[1:]:
        name = os.path.basename(row[0])
        if name in reasons:
            assert reasons[name] in row[1] and not any(row[2:])
            continue
        top = expected[str(fresh / os.path.relpath(row[0], fresh))]["top"]
        assert row[1] == "" and [row[2], row[4]] == [c for c, _ in top]
        np.testing.assert_allclose([float(row[3]), float(row[5])], [p for _, p in top], atol=2e-4)
    assert not (out.parent / "p.csv.parts").exists() and not list(out.parent.glob(".p.csv.tmp-*"))


OPENS = """
import sys
from pipeline.cli import main
folder, opened = sys.argv[1], []
sys.addaudithook(lambda event, args: event == "open" and str(args[0]).startswith(folder) and opened.append(args[0]))
code = main(sys.argv[2:])
print("opened", len(opened))
sys.exit(code)
"""


def test_images_a_store_of_the_model_s_settings_has_are_read_from_it_not_decoded(trained, tmp_path):
    """The training images again: every row comes from the model's store (its folder is the default
    --features) and no image file is opened at all (the stat cache vouches for their content); counted by
    an audit hook on open(). With --no-reuse in a new folder, each is read and decoded."""
    _, data, _, model = trained
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args):
        done = subprocess.run([sys.executable, "-c", OPENS, str(data), "predict", model, str(data), "--quiet",
                               "--workers", "1", *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    again = run("--out", str(tmp_path / "again.csv"))
    assert "18 images classified, 0 not readable (0 decoded, 18 read from earlier stores)" in again, again
    assert "opened 0" in again
    fresh = run("--out", str(tmp_path / "fresh.csv"), "--no-reuse", "--features", str(tmp_path / "f"))
    assert "(18 decoded, 0 read" in fresh and "opened 18" in fresh, fresh
    assert read(tmp_path / "fresh.csv") == read(tmp_path / "again.csv")


def test_a_killed_job_resumes_to_the_same_file(trained, tmp_path):
    """SIGKILL after two committed shards; the run again computes only the rest and writes the same file as a
    job never killed."""
    root, _, fresh, model = trained
    args = ["predict", model, str(fresh), "--features", str(tmp_path / "f"), "--shard-size", "3", "--batch-size",
            "2", "--workers", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args, "--out", str(tmp_path / "p.csv")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "p.csv").exists()
    again = subprocess.run([sys.executable, "-m", "pipeline", *args, "--out", str(tmp_path / "p.csv")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "15 images classified, 0 not readable (9 decoded" in again.stdout, again.stdout
    whole = subprocess.run([sys.executable, "-m", "pipeline", *args, "--features", str(tmp_path / "g"), "--out",
                            str(tmp_path / "whole.csv")], env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0 and "(15 decoded" in whole.stdout, whole.stderr[-2000:]
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_parquet_holds_the_same_rows_as_csv(trained, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet needs pyarrow (make install brings it with Ray)")
    from pipeline.prediction.batch import header, predict_to_file
    from pipeline.prediction.predict import list_image_files

    _, data, _, model = trained
    files = list_image_files([data])
    predict_to_file(model, files, tmp_path / "p.csv", progress=False, top_k=3)
    predict_to_file(model, files, tmp_path / "p.parquet", progress=False, top_k=10)  # of 3 classes: 3 pairs
    table = pq.read_table(tmp_path / "p.parquet")
    rows = read(tmp_path / "p.csv")
    assert table.column_names == rows[0] == header(3) and table.num_rows == len(rows) - 1
    assert [list(r) for r in zip(*(table.column(c).to_pylist() for c in rows[0]))] == rows[1:]


@pytest.mark.parametrize("out, message", [
    ("p.txt", "write .csv or .parquet"), ("p.json", "write .csv or .parquet"), (".", "is a folder"),
    ("fifo.csv", "--out fifo.csv is a named pipe; name a regular file: the output is written beside it"),
    ("afile/p.csv", "error: afile is a file, where `layertap predict` needs a folder; move it away"),
    ("afile/sub/p.csv", "error: afile is a file, where `layertap predict` needs a folder (for afile/sub); move"),
    ("p.csv --features afile", "error: afile is a file, where the folder of the feature stores goes")])
def test_an_output_it_cannot_write_is_one_line_before_any_work(trained, tmp_path, capsys, monkeypatch, out, message):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    os.mkfifo("fifo.csv")
    Path("afile").write_text("a file where a folder goes")
    _, data, _, model = trained
    assert main(["predict", model, str(data), "--out", *out.split()]) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert Path("fifo.csv").is_fifo() and Path("afile").read_text() == "a file where a folder goes"
    assert not list(tmp_path.glob("*.parts")) and not list(tmp_path.glob(".p.csv.tmp-*"))


def test_a_fine_tuned_model_writes_the_same_kind_of_file(trained, tmp_path):
    """A fine-tuned model is its own network: decoded and run here, rows in the same order and format."""
    import keras

    from pipeline.prediction.batch import RowWriter, _run_network
    from pipeline.prediction.predict import list_image_files
    from pipeline.runs.artifacts import load_model
    from pipeline.store.manifest import StoreManifest

    _, _, fresh, model = trained
    fresh = Path(shutil.copytree(fresh, tmp_path / "new"))
    (fresh / "red" / "notes.jpg").write_text("not an image")
    _, m = load_model(model)
    network = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(3, "softmax")])
    with RowWriter(tmp_path / "ft.csv", 1) as writer:
        result = _run_network(network, StoreManifest.from_dict(m), m, list_image_files([fresh]), writer, 1, 4, 1)
        writer.commit()
    rows = read(tmp_path / "ft.csv")
    assert [r[0] for r in rows[1:]] == sorted(r[0] for r in rows[1:]) and len(rows) == 1 + 16
    assert result.n_failed == 1 and next(r for r in rows if r[0].endswith("notes.jpg"))[1]


def test_a_model_copied_from_another_machine_stores_its_images_features_in_features_here(trained, tmp_path,
                                                                                         monkeypatch, caplog):
    """Its manifest names a store folder of that machine: the job makes no such path here, and says where the
    features went."""
    import json

    from pipeline.prediction.batch import predict_to_file
    from pipeline.prediction.predict import list_image_files

    _, _, fresh, model = trained
    copied = Path(shutil.copytree(model, tmp_path / "model"))
    manifest = json.loads((copied / "manifest.json").read_text())
    elsewhere = tmp_path / "cluster" / "features"
    manifest["store"] = str(elsewhere / Path(manifest["store"]).name)
    (copied / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="pipeline"):
        result = predict_to_file(copied, list_image_files([fresh]), tmp_path / "p.csv", progress=False)
    assert not (tmp_path / "cluster").exists() and result.store_path.parent == Path("features")
    assert f"the model's store folder {elsewhere} is not here: the images' features go to features/" in caplog.text
    assert len(read(tmp_path / "p.csv")) == 1 + 15
