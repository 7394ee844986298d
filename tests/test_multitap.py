"""Multi-tap probes (issue 30, item 3): ``a+b`` trains one model on several taps' features side by side."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import make_split_folder, tiny_settings
from pipeline.classification.classify import ClassifySettings, classify, sweep, tap_combinations
from pipeline.core.errors import LayertapError
from pipeline.extraction.extract import extract_features
from pipeline.finetuning.finetune import choose_tap
from pipeline.runs.artifacts import load_model
from pipeline.runs.per_image import read_metrics
from pipeline.store.feature_store import FeatureStore

TAPS = ("block1_pool", "block2_pool", "block3_pool")  # 64, 128 and 256 features


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same images in a copied store and in a virtual one (features left in the shard files)."""
    root = tmp_path_factory.mktemp("multitap")
    data = make_split_folder(root / "data", train=6, val=3, test=3)
    copied = extract_features(tiny_settings(data, root / "f", layers=TAPS)).store_path
    virtual = extract_features(tiny_settings(data, root / "v", layers=TAPS, merge="virtual")).store_path
    return {"copied": copied, "virtual": virtual, "data": data, "root": root}


@pytest.mark.parametrize("kind", ["copied", "virtual"])
def test_a_multi_tap_name_reads_its_taps_side_by_side(stores, kind):
    store = FeatureStore(stores[kind])
    a, b = store.features("block1_pool"), store.features("block3_pool")
    joined = "block3_pool+block1_pool"  # the name's order, whatever the store's
    assert store.width(joined) == 256 + 64
    np.testing.assert_array_equal(store.features(joined), np.hstack([b, a]))
    rows = np.array([1, 4, 5, 20, 35])
    np.testing.assert_array_equal(store.features(joined, rows), np.hstack([b, a])[rows])
    batches = list(store.iter_batches(joined, rows, batch_size=2))
    assert [len(index) for index, _ in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([v for _, v in batches]), np.hstack([b, a])[rows])
    count, mean, variance = store.moments(joined, batch_size=7)
    assert count == len(store)
    np.testing.assert_allclose(mean, np.hstack([b, a]).mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, np.hstack([b, a]).astype(np.float64).var(axis=0), rtol=1e-4, atol=1e-6)
    assert store.batch_rows(joined, 320 * 4 * 10) == 10
    with pytest.raises(KeyError, match="no tap 'block9_pool'; it has: block1_pool, block2_pool, block3_pool"):
        store.features("block1_pool+block9_pool")


def test_classify_trains_one_model_on_the_taps_together_named_in_store_order(stores, tmp_path):
    store = FeatureStore(stores["copied"])
    result = classify(ClassifySettings(store=str(stores["copied"]), classifiers=("logreg", 'probe:{"epochs": 5}'),
                                       layers=("block2_pool+block1_pool", "block1_pool"), out_dir=str(tmp_path)))
    by_name = {r["model_dir"].rsplit("/", 1)[1].rsplit("-", 1)[0]: r for r in result.rows}  # no params' hash
    assert set(by_name) == {"block1_pool+block2_pool", "block1_pool+block2_pool-probe", "block1_pool",
                            "block1_pool-probe"}
    joined = by_name["block1_pool+block2_pool"]
    assert joined["tap"] == "block1_pool+block2_pool" and joined["dims"] == 192
    assert joined["trainable_params"] == 192 * 3 + 3
    estimator, manifest = load_model(joined["model_dir"])
    assert manifest["tap"] == "block1_pool+block2_pool"
    test = store.splits == "test"
    metrics = read_metrics(tmp_path.joinpath(joined["model_dir"]))
    np.testing.assert_array_equal(estimator.predict(store.features("block1_pool+block2_pool")[test]),
                                  metrics["predictions"])
    probe = next(r for r in result.rows if r["tap"] == joined["tap"] and r["classifier"].startswith("probe"))
    assert probe["dims"] == 192 and json.loads((tmp_path.joinpath(probe["model_dir"]) / "metrics.json")
                                               .read_text())["streamed"]


@pytest.mark.parametrize("layers, message", [
    ("block1_pool+block1_pool", "a tap is named twice"),
    ("block1_pool+block5_pool", "has no tap block5_pool.*--layers block5_pool"),
    ("block1_pool++block2_pool", "'block1_pool\\+\\+block2_pool': a layer name is empty"),
    ("block1_pool+", "a layer name is empty .*join them as block3_pool\\+block4_pool"),
])
def test_a_bad_multi_tap_name_is_one_error_before_training(stores, tmp_path, layers, message):
    with pytest.raises(LayertapError, match=message):
        classify(ClassifySettings(store=str(stores["copied"]), classifiers=("logreg",), layers=(layers,),
                                  out_dir=str(tmp_path)))
    assert not list(tmp_path.rglob("*-logreg"))


def test_extracting_a_multi_tap_name_extracts_its_taps():
    settings = tiny_settings("unused", "unused", layers=("block1_pool+block3_pool", "block3_pool", "block2_pool"))
    assert settings.layers == ("block1_pool", "block3_pool", "block2_pool")


def test_the_sweep_adds_the_best_pairs_and_all_taps_and_chooses_on_val(stores, tmp_path):
    run_dir, rows = sweep(ClassifySettings(store=str(stores["copied"]), out_dir=str(tmp_path)))
    assert [r["tap"] for r in rows] == [*TAPS, "block1_pool+block2_pool", "block1_pool+block3_pool",
                                        "block2_pool+block3_pool", "block1_pool+block2_pool+block3_pool"]
    by_tap = {r["tap"]: r for r in rows}
    every = by_tap["block1_pool+block2_pool+block3_pool"]
    assert every["dims"] == 64 + 128 + 256 and every["gflops"] == by_tap["block3_pool"]["gflops"]
    assert every["flatten_dims"] == sum(by_tap[t]["flatten_dims"] for t in TAPS)
    assert every["map"] == "+".join(by_tap[t]["map"] for t in TAPS)
    report = json.loads((run_dir / "sweep.json").read_text())
    assert report["best_on_val"] == max(rows, key=lambda r: r["val_accuracy"])["tap"]  # the first of equals
    for r in rows:  # each row a model folder, compared on the run's page like any other
        assert (run_dir / f"{r['tap']}-logreg" / "metrics.json").is_file()
    assert (run_dir / "sweep.png").stat().st_size > 1000 and "side by side" in (run_dir / "sweep.md").read_text()


def test_combinations_are_pairs_of_the_three_best_on_val_then_all():
    rows = [{"tap": t, "val_accuracy": v} for t, v in zip("abcd", (0.5, 0.9, 0.7, 0.8))]
    assert tap_combinations(rows) == ["b+c", "b+d", "c+d", "a+b+c+d"]
    assert tap_combinations(rows[:2]) == ["a+b"]  # two taps: the pair is all of them
    assert tap_combinations(rows[:1]) == []


def test_stage_three_starts_from_one_tap_and_says_so(stores):
    store = FeatureStore(stores["copied"])
    with pytest.raises(LayertapError, match="stage three fine-tunes from one tap.*block1_pool, block2_pool"):
        choose_tap(store, "block1_pool+block2_pool", [], probe=None)
    stage_two = [{"tap": "block1_pool+block2_pool", "classifier": "logreg"}, {"tap": "block2_pool",
                                                                             "classifier": "dense"}]
    tap, why = choose_tap(store, None, stage_two, probe=None)
    assert tap == "block2_pool" and "best single tap on val (dense)" in why and "block1_pool+block2_pool" in why


def test_a_multi_tap_model_predicts_in_memory_and_as_a_batch_job_alike(stores, tmp_path):
    """Both prediction paths compute the taps from the images and join them as stage two did: the store's own
    test images get the store's predictions."""
    from pipeline.prediction.batch import predict_to_file
    from pipeline.prediction.predict import predict

    result = classify(ClassifySettings(store=str(stores["copied"]), classifiers=("logreg",),
                                       layers=("block1_pool+block3_pool",), out_dir=str(tmp_path / "m")))
    model_dir = result.rows[0]["model_dir"]
    metrics = read_metrics(tmp_path.joinpath(model_dir))
    images = sorted((stores["data"] / "test").rglob("*.jpg"))
    names = json.loads((tmp_path.joinpath(model_dir) / "manifest.json").read_text())["class_names"]
    in_memory = predict(model_dir, images, top_k=1)
    # the store's test rows are in path order, as these images are
    assert [names.index(r["top"][0][0]) for r in in_memory] == metrics["predictions"].tolist()
    out = tmp_path / "p.csv"
    predict_to_file(model_dir, images, out, top_k=1, features_dir=str(tmp_path / "f"), progress=False)
    with open(out, newline="") as fh:
        batch = list(csv.DictReader(fh))
    assert [row["class1"] for row in batch] == [r["top"][0][0] for r in in_memory]
    np.testing.assert_allclose([float(row["prob1"]) for row in batch], [r["top"][0][1] for r in in_memory],
                               atol=2e-4)


def test_a_sweep_past_the_memory_budget_probes_each_row_by_streaming(stores, tmp_path, caplog):
    """A store too big for memory is swept with the streamed probe (C on val), never read whole: same rows."""
    run_dir, rows = sweep(ClassifySettings(store=str(stores["virtual"]), out_dir=str(tmp_path), memory_budget=1e-6))
    assert len(rows) == 7 and {r["classifier"] for r in rows} == {"probe"}
    for r in rows:
        metrics = json.loads((run_dir / f"{r['tap']}-probe" / "metrics.json").read_text())
        assert metrics["streamed"] and r["C"] == metrics["chosen"]["C"]
    assert not list(run_dir.glob("*-logreg")) and "the streamed probe" in (run_dir / "sweep.md").read_text()
