"""Stage two: splits, training from a store only, saved models, the sweep, prediction."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import pipeline.data.images
from conftest import make_class_folder, make_split_folder, tiny_settings
from pipeline import LayertapError
from pipeline.classification.classify import ClassifySettings, classify, sweep
from pipeline.extraction.extract import extract_features
from pipeline.prediction.predict import predict
from pipeline.runs.artifacts import load_model
from pipeline.runs.per_image import read_metrics
from pipeline.store.feature_store import FeatureStore
from pipeline.store.splits import resolve_splits
from pipeline.store.splits import test_rows_sha256 as rows_sha256  # not collected as a test


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores of the same three colour classes: one with a recorded split, one without."""
    root = tmp_path_factory.mktemp("stage2")
    split_root = make_split_folder(root / "splits", train=6, val=3, test=3)
    flat = make_class_folder(root / "flat", per_class=12)
    split_store = extract_features(tiny_settings(split_root, root / "f", layers=("block1_pool", "block2_pool")))
    flat_store = extract_features(tiny_settings(flat, root / "f", layers=("block1_pool",)))
    return {"split": split_store.store_path, "flat": flat_store.store_path, "flat_data": flat, "root": root}


def test_recorded_split_is_used(stores):
    splits, source = resolve_splits(FeatureStore(stores["split"]))
    assert source == "recorded in the store"
    assert [int((splits == s).sum()) for s in ("train", "val", "test")] == [18, 9, 9]


def test_made_split_is_stratified_and_deterministic(stores):
    store = FeatureStore(stores["flat"])
    a, source = resolve_splits(store, seed=3)
    b, _ = resolve_splits(store, seed=3)
    c, _ = resolve_splits(store, seed=4)
    assert source.startswith("stratified, seed 3")
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, c.codes)
    for label in range(3):
        assert ((a == "test") & (store.labels == label)).sum() == 3


def test_classify_reads_no_image_and_writes_reports(stores, tmp_path, monkeypatch):
    def no_images(*args, **kwargs):
        raise AssertionError("stage two opened an image")

    monkeypatch.setattr(pipeline.data.images.Image, "open", no_images)
    result = classify(ClassifySettings(store=str(stores["split"]), classifiers=("logreg", "knn", "dense"),
                                       out_dir=str(tmp_path)))
    run_dir, rows = result.run_dir, result.rows
    assert len(rows) == 6 and rows == sorted(rows, key=lambda r: -r["val_accuracy"])  # chosen on val
    assert {r["classifier"] for r in rows} == {"logreg", "knn", "dense"}
    model_dir = run_dir / "block2_pool-logreg"
    for name in ("manifest.json", "metrics.json", "report.md", "confusion.png", "model.skops"):
        assert (model_dir / name).is_file(), name
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["n_test"] == 9 and "macro avg" in metrics["report"] and "C" in metrics["chosen"]
    assert metrics["trainable_params"] == 128 * 3 + 3
    assert (run_dir / "block1_pool-dense" / "head.keras").is_file()
    assert "test acc" in (run_dir / "comparison.md").read_text()


@pytest.mark.parametrize("spec", ["logreg", "linsvm", "knn", "dense"])
def test_saved_model_predicts_identically(stores, tmp_path, spec):
    result = classify(ClassifySettings(store=str(stores["split"]), classifiers=(spec,), layers=("block1_pool",),
                                       out_dir=str(tmp_path)))
    run_dir, rows = result.run_dir, result.rows
    estimator, manifest = load_model(rows[0]["model_dir"])
    store = FeatureStore(stores["split"])
    test = store.splits == "test"
    metrics = read_metrics(run_dir / f"block1_pool-{spec}")
    np.testing.assert_array_equal(estimator.predict(store.features("block1_pool")[test]), metrics["predictions"])
    assert manifest["tap"] == "block1_pool" and manifest["store_key"] == store.key


def test_each_images_outcome_is_kept_as_arrays_beside_a_metrics_json_a_person_reads(stores, tmp_path):
    """The per-image predictions and probabilities grow with the store: they go to per_image.npz, not into
    metrics.json; a damaged per_image.npz is named, with what to do."""
    from pipeline.runs.per_image import FILE

    result = classify(ClassifySettings(store=str(stores["split"]), classifiers=("logreg",), layers=("block1_pool",),
                                       out_dir=str(tmp_path)))
    folder = result.run_dir / "block1_pool-logreg"
    written = json.loads((folder / "metrics.json").read_text())
    assert not {"predictions", "val_predictions", "confidence", "true_probability"} & written.keys()
    metrics = read_metrics(folder)
    assert metrics["predictions"].dtype == np.int32 and len(metrics["predictions"]) == written["n_test"] == 9
    assert len(metrics["val_predictions"]) == written["n_val"]
    assert ((metrics["confidence"] >= metrics["true_probability"]) & (metrics["confidence"] <= 1)).all()
    store = FeatureStore(stores["split"])
    test = resolve_splits(store)[0] == "test"
    assert written["accuracy"] == pytest.approx(float(np.mean(metrics["predictions"] == store.labels[test])))
    (folder / FILE).write_bytes(b"not a zip")
    with pytest.raises(LayertapError, match=f"{FILE} cannot be read .*run the command that wrote"):
        read_metrics(folder)


def test_tampered_model_is_refused_before_loading(stores, tmp_path):
    rows = classify(ClassifySettings(store=str(stores["split"]), layers=("block1_pool",), out_dir=str(tmp_path))).rows
    model_file = tmp_path.joinpath(rows[0]["model_dir"], "model.skops")
    model_file.write_bytes(model_file.read_bytes() + b"\x00")
    with pytest.raises(LayertapError, match="does not match its manifest .* Refusing to load it"):
        load_model(rows[0]["model_dir"])


def test_sweep_has_a_row_per_tap_low_to_high_and_a_plot(stores, tmp_path):
    run_dir, rows = sweep(ClassifySettings(store=str(stores["split"]), out_dir=str(tmp_path)))
    assert [r["tap"] for r in rows] == ["block1_pool", "block2_pool", "block1_pool+block2_pool"]  # then together
    assert rows[0]["gflops"] < rows[1]["gflops"] and 0 < rows[1]["flops_share"] < 1
    assert rows[0]["flatten_dims"] == 16 * 16 * 64 and rows[0]["dense_avg"] == 64 * 256 + 256
    assert (run_dir / "sweep.png").stat().st_size > 1000 and "block2_pool" in (run_dir / "sweep.md").read_text()


@pytest.mark.parametrize("spec, says", [
    ("logreg", r"logreg chooses C by cross-validation .* takes 2 train images a class; .* has 1 of blue, green, red"),
    ("linsvm", r"linsvm chooses C by cross-validation"),
    ("knn", r"knn votes among the 5 nearest train images; .* has 3"),
])
def test_too_few_train_images_for_a_classifier_is_one_line_whose_fix_trains(tmp_path, spec, says):
    """One train image a class: scikit-learn's "n_splits=2 cannot be greater than the number of members in each
    class" (or "Expected n_neighbors <= n_samples_fit") named neither the store nor a way out."""
    data = make_split_folder(tmp_path / "data", train=1, val=2, test=2)
    store = str(extract_features(tiny_settings(data, tmp_path / "f", layers=("block1_pool",))).store_path)
    with pytest.raises(LayertapError, match=says) as caught:
        classify(ClassifySettings(store=store, classifiers=(spec,), out_dir=str(tmp_path / "m")))
    fix = re.search(r"\((\w+:\{.*?\})\)", str(caught.value)).group(1)  # the spec the message suggests
    assert classify(ClassifySettings(store=store, classifiers=(fix,), out_dir=str(tmp_path / "m"))).rows


def test_missing_tap_says_how_to_extract_it(stores, tmp_path):
    with pytest.raises(LayertapError, match="has no tap block3_pool.*--layers block3_pool"):
        classify(ClassifySettings(store=str(stores["flat"]), layers=("block3_pool",), out_dir=str(tmp_path)))


def test_predict_on_a_folder_with_a_corrupt_image(stores, tmp_path):
    rows = classify(ClassifySettings(store=str(stores["flat"]), out_dir=str(tmp_path))).rows
    folder = tmp_path / "new"
    folder.mkdir()
    for name in ("red", "blue"):
        src = stores["flat_data"] / name / "img_11.jpg"
        (folder / f"{name}.jpg").write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    results = {r["path"].rsplit("/", 1)[-1]: r for r in predict(rows[0]["model_dir"], [folder], top_k=2)}
    assert "error" in results["broken.jpg"]
    assert len(results["red.jpg"]["top"]) == 2
    assert abs(sum(p for _, p in results["red.jpg"]["top"])) <= 1.0 + 1e-6
    assert results["red.jpg"]["top"][0][0] == "red" and results["blue.jpg"]["top"][0][0] == "blue"


def _store_where_val_and_test_disagree(path):
    """Two taps: ``a`` carries the label on train and val rows only, ``b`` on train and test rows only."""
    from pipeline.store.feature_store import Rows
    from pipeline.store.writing import merge_shards, write_shard

    rng = np.random.default_rng(0)
    splits = ["train"] * 40 + ["val"] * 20 + ["test"] * 20
    labels = np.array([i % 2 for i in range(80)])
    signal = np.where(labels[:, None] == 1, 2.0, -2.0) + rng.normal(0, 0.5, (80, 4))
    noise = rng.normal(0, 2.0, (80, 4))
    is_val, is_test = np.array(splits) == "val", np.array(splits) == "test"
    features = {"a": np.where(is_test[:, None], noise, signal).astype(np.float32),
                "b": np.where(is_val[:, None], noise, signal).astype(np.float32)}
    manifest = {"key": "v" * 64, "pooling": "avg", "class_names": ["no", "yes"], "backbone": "vgg16",
                "weights": "random-seed0", "weights_sha256": "0" * 64, "weights_arg": "random", "seed": 0,
                "image_size": 32}
    rows = Rows([f"img{i:02d}.png" for i in range(80)], labels.tolist(), splits, ["f"] * 80)
    shard = write_shard(path.with_suffix(".shard.h5"), rows=rows, features=features, class_names=["no", "yes"],
                        skipped=[], manifest=manifest, map_shapes={"a": (1, 1, 4), "b": (1, 1, 4)}, dtype="float32")
    return merge_shards([shard], path, manifest=manifest)


def test_the_best_model_and_finetunes_tap_are_chosen_on_val_never_on_test(tmp_path):
    from pipeline.finetuning.finetune import choose_tap, stage_two_rows
    from pipeline.heads.classifiers import train_one

    store = _store_where_val_and_test_disagree(tmp_path / "store.h5")
    result = classify(ClassifySettings(store=str(store.path), classifiers=("logreg",), out_dir=str(tmp_path / "m")))
    by_tap = {r["tap"]: r for r in result.rows}
    assert by_tap["a"]["val_accuracy"] > by_tap["b"]["val_accuracy"]
    assert by_tap["b"]["test_accuracy"] > by_tap["a"]["test_accuracy"]  # b would win on test
    assert result.best["tap"] == "a"
    splits, _ = resolve_splits(store)

    def probe(tap):
        return train_one(store, store.features(tap), "logreg", splits)

    stage_two = stage_two_rows(store, result.run_dir, rows_sha256(store, splits))
    assert choose_tap(store, None, stage_two, probe)[0] == "a"
    assert choose_tap(store, None, [], probe)[0] == "a"  # no stage-two run: the probes, on val


def test_classifiers_learn_from_the_train_rows_alone_and_stop_early_on_val(tmp_path, monkeypatch):
    import pipeline.heads.classifiers as classifiers

    store = _store_where_val_and_test_disagree(tmp_path / "store.h5")
    splits, _ = resolve_splits(store)
    X, y, fits, make = store.features("a"), store.labels, {}, classifiers.make_classifier

    def recording(spec, **kwargs):
        estimator = make(spec, **kwargs)
        fit = estimator.fit
        if classifiers.takes_validation_data(estimator):
            def spy(X, y, validation_data):
                fits[spec] = (X, y, validation_data)
                return fit(X, y, validation_data=validation_data)
        else:
            def spy(X, y):
                fits[spec] = (X, y, None)
                return fit(X, y)
        estimator.fit = spy
        return estimator

    monkeypatch.setattr(classifiers, "make_classifier", recording)
    for spec in ("logreg", "dense"):
        classifiers.train_one(store, X, spec, splits)
    train, val = splits == "train", splits == "val"
    assert sorted(fits) == ["dense", "logreg"]
    for X_fit, y_fit, _ in fits.values():
        np.testing.assert_array_equal(X_fit, X[train])
        np.testing.assert_array_equal(y_fit, y[train])
    assert fits["logreg"][2] is None
    np.testing.assert_array_equal(fits["dense"][2][0], X[val])
    np.testing.assert_array_equal(fits["dense"][2][1], y[val])


def test_a_recorded_split_without_val_rows_gets_val_carved_from_train(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 8), ("test", 2)):
        make_class_folder(root / split, per_class=n)
    store = FeatureStore(extract_features(tiny_settings(root, tmp_path / "f", layers=("block1_pool",))).store_path)
    assert set(store.rows.splits) == {"train", "test"}
    splits, source = resolve_splits(store, seed=0)
    assert source.startswith("recorded in the store (train/test); val carved from train")
    assert [int((splits == s).sum()) for s in ("train", "val", "test")] == [19, 5, 6]  # 15% of 30, rounded up
    assert (splits.names()[np.array(store.rows.splits) == "test"] == "test").all()  # the test rows stay as recorded
    for label in range(3):  # stratified
        assert ((splits == "val") & (store.labels == label)).sum() in (1, 2)
    np.testing.assert_array_equal(splits.codes, resolve_splits(store, seed=0)[0].codes)
