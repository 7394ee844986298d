"""Stage three: freezing by name, BatchNorm in inference mode, same test images, save -> predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

import pipeline.data.decoding
import pipeline.finetuning.finetune
import pipeline.store.manifest
from conftest import make_split_folder, tiny_settings
from pipeline import LayertapError
from pipeline.backbones.build import build_backbone, compose_classifier
from pipeline.backbones.layers import BackbonePreprocess, crossentropy
from pipeline.backbones.registry import get_backbone
from pipeline.backbones.weights import resolve_weights
from pipeline.classification.classify import ClassifySettings, classify
from pipeline.cli import main
from pipeline.core.evaluation import bootstrap_gain, log_loss
from pipeline.data.decoding import decode_image
from pipeline.extraction.extract import extract_features
from pipeline.finetuning.compose import (
    build_augmentation,
    default_unfreeze_from,
    keep_best_on_val,
    parse_augmentation,
    set_trainable,
)
from pipeline.finetuning.finetune import FinetuneSettings, finetune
from pipeline.heads.dense import build_dense_head
from pipeline.prediction.predict import predict
from pipeline.runs.artifacts import load_model
from pipeline.runs.per_image import read_metrics
from pipeline.store.feature_store import FeatureStore

QUICK = dict(layer="block2_pool", unfreeze_from="block2_conv2", epochs=3, fine_tune_epochs=2, batch_size=8,
             learning_rate=1e-2, fine_tune_learning_rate=1e-3, hidden_units=8, workers=2, progress=False)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A tiny store with a recorded split, stage two run on it, then stage three through the CLI."""
    root = tmp_path_factory.mktemp("stage3")
    data = make_split_folder(root / "data", train=6, val=3, test=3)
    store = extract_features(tiny_settings(data, root / "f")).store_path
    models = root / "models"
    classify(ClassifySettings(store=str(store), classifiers=("logreg", "knn"), out_dir=str(models)))
    args = ["finetune", "--store", str(store), "--models", str(models), "--layer", "block2_pool",
            "--unfreeze-from", "block2_conv2", "--epochs", "3", "--fine-tune-epochs", "2", "--train-batch-size", "8",
            "--lr", "0.01", "--fine-tune-lr", "0.001", "--hidden-units", "8", "--workers", "2", "-q"]
    return {"root": root, "data": data, "store": store, "models": models, "args": args}


@pytest.fixture(scope="module")
def finetuned(staged):
    assert main(staged["args"]) == 0
    model_dir = staged["models"] / staged["store"].stem / "block2_pool-finetune"
    return model_dir, read_metrics(model_dir)


def _trunk(backbone_name: str, tap: str, size: int = 32):
    backbone = get_backbone(backbone_name)
    base = build_backbone(backbone, resolve_weights(backbone, "random"), size)
    return backbone, keras.Model(base.input, base.get_layer(tap).output, name="trunk")


@pytest.mark.parametrize("backbone_name, tap, unfreeze_from", [
    ("vgg16", "block3_pool", "block3_conv2"),
    ("resnet50", "conv3_block4_out", "conv3_block4_1_conv"),
])
def test_phase_two_changes_only_unfrozen_weights_and_batchnorm_stays_in_inference(backbone_name, tap,
                                                                                  unfreeze_from):
    backbone, trunk = _trunk(backbone_name, tap)
    unfrozen = set_trainable(trunk, unfreeze_from)
    assert unfrozen[0] == unfreeze_from
    bn = [layer for layer in trunk.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(not layer.trainable for layer in bn)
    dims = trunk.output.shape[-1]
    head = build_dense_head(dims, 3, np.zeros(dims), np.ones(dims), hidden_units=0)
    model, _ = compose_classifier(trunk, backbone.name, tap, "avg", head, build_augmentation({"flip": "horizontal"}))
    before = {w.path: keras.ops.convert_to_numpy(w) for w in trunk.weights}
    # Keras's own loss would pass no gradient on JAX and torch from an image the random network is sure about.
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=crossentropy)
    rng = np.random.default_rng(0)
    model.fit(rng.integers(0, 255, (8, 32, 32, 3)).astype(np.uint8), rng.integers(0, 3, 8), batch_size=4,
              epochs=1, verbose=0)
    names = [layer.name for layer in trunk.layers]
    start = names.index(unfreeze_from)
    for index, layer in enumerate(trunk.layers):
        for weight in layer.weights:
            changed = not np.array_equal(before[weight.path], keras.ops.convert_to_numpy(weight))
            should_change = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
            assert changed == should_change, (layer.name, weight.path)
    # every BatchNorm statistic is untouched: the layers ran in inference mode under fit()
    assert all(np.array_equal(before[w.path], keras.ops.convert_to_numpy(w)) for layer in bn for w in layer.weights)


def test_unfreeze_default_and_unknown_name():
    backbone, trunk = _trunk("vgg16", "block4_pool")
    assert default_unfreeze_from(trunk) == "block4_conv3"  # the tap's last convolution
    _, resnet = _trunk("resnet50", "conv4_block6_out")
    assert default_unfreeze_from(resnet) == "conv4_block6_3_conv"  # not its BatchNorm
    with pytest.raises(ValueError, match="'block5_conv1' is not a layer at or below the tap block4_pool.*block4_conv3"):
        set_trainable(trunk, "block5_conv1")


def test_augmentation_specs():
    assert parse_augmentation("flip,rotation=0.2") == {"flip": "horizontal", "rotation": 0.2}
    assert parse_augmentation("none") == {} and build_augmentation({}) is None
    with pytest.raises(ValueError, match="'blur' is not known; use none, or a comma list of: flip"):
        parse_augmentation("blur")
    with pytest.raises(ValueError, match="between 0 and 1"):
        parse_augmentation("zoom=2")
    layer = build_augmentation({"flip": "horizontal", "zoom": 0.1})
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    assert np.array_equal(np.asarray(layer(x, training=False)), x)  # off at inference


def test_training_loss_is_the_cross_entropy_keras_computes_and_log_loss_reports():
    """``pipeline.backbones.layers.crossentropy`` (training) against Keras's own loss and ``log_loss`` (choosing on
    val), on
    probabilities none of them clips; where the true class's probability is below Keras's 1e-7, it keeps counting
    (tests/backend_probe.py checks that such an image still trains on JAX and torch)."""
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(np.random.default_rng(0).normal(size=(6, 4)) * 2))
    y = np.array([0, 1, 2, 3, 0, 1])
    ours = keras.ops.convert_to_numpy(crossentropy(y, probs))
    np.testing.assert_allclose(ours, keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(y, probs)),
                               rtol=1e-5)
    assert log_loss(probs, y) == pytest.approx(ours.mean(), rel=1e-5)
    sure = np.array([[1 - 1e-12, 1e-12]], np.float32)  # sure of class 0, wrongly
    assert float(keras.ops.convert_to_numpy(crossentropy(np.array([1]), sure))[0]) == pytest.approx(-np.log(1e-12),
                                                                                                   rel=1e-3)
    assert log_loss(sure, np.array([1])) == pytest.approx(-np.log(1e-12), rel=1e-3)


def test_bootstrap_gain_interval():
    rng = np.random.default_rng(0)
    old = rng.random(400) < 0.6
    assert bootstrap_gain(old, old) == pytest.approx({"gain": 0, "low": 0, "high": 0, "p_not_better": 1,
                                                      "resamples": 10_000, "level": 0.95})
    better = old | (rng.random(400) < 0.5)
    gain = bootstrap_gain(better, old)
    assert gain["gain"] == pytest.approx(better.mean() - old.mean())
    assert 0 < gain["low"] < gain["gain"] < gain["high"] and gain["p_not_better"] == 0
    se = np.std(better.astype(float) - old) / np.sqrt(len(old))  # the interval's ends near gain -/+ z se
    for level, z in ((0.95, 1.960), (0.5, 0.674)):
        ends = bootstrap_gain(better, old, level=level)
        assert ends["level"] == level and (ends["gain"] - ends["low"]) / se == pytest.approx(z, abs=0.15)
        assert (ends["high"] - ends["gain"]) / se == pytest.approx(z, abs=0.15)
    with pytest.raises(ValueError, match="equal-length"):
        bootstrap_gain(old, old[:10])


def test_report_compares_with_stage_two_on_the_same_test_images(staged, finetuned, capsys):
    model_dir, metrics = finetuned
    run_dir = model_dir.parent
    logreg = json.loads((run_dir / "block2_pool-logreg" / "metrics.json").read_text())
    assert metrics["test_rows_sha256"] == logreg["test_rows_sha256"] and metrics["n_test"] == 9
    # phase 1 is stage two's probe: same code, same train rows, so the same predictions on test and val
    assert metrics["probe"]["accuracy"] == metrics["phase1_accuracy"] == logreg["accuracy"]
    assert metrics["probe"]["val_accuracy"] == metrics["phases"][0]["val_accuracy"] == logreg["val_accuracy"]
    best_row = json.loads((run_dir / "comparison.json").read_text())["rows"][0]  # best on val
    assert metrics["stage_two"]["classifier"] == f"{best_row['tap']} + {best_row['classifier']}"
    assert metrics["stage_two"]["val_accuracy"] == best_row["val_accuracy"]
    assert metrics["gain"]["gain"] == pytest.approx(metrics["accuracy"] - best_row["test_accuracy"])
    assert metrics["gain_over_probe"]["gain"] == pytest.approx(metrics["accuracy"] - logreg["accuracy"])
    assert metrics["gain"]["low"] <= metrics["gain"]["gain"] <= metrics["gain"]["high"]
    assert [p["unfrozen_from"] for p in metrics["phases"]] == [None, "block2_conv2"]
    assert metrics["phases"][1]["trainable"] > metrics["phases"][0]["trainable"]
    assert {e["phase"] for e in metrics["history"]} == {1, 2}
    assert metrics["composition_error"] < (1e-3 if metrics["precision"] == "float32" else 2e-2)
    # what was kept is never worse on val than the probe it started from
    assert metrics["val_accuracy"] >= metrics["probe"]["val_accuracy"]
    for name in ("model.keras", "manifest.json", "report.md", "learning_curves.png", "confusion.png"):
        assert (model_dir / name).is_file(), name
    report = (model_dir / "report.md").read_text()
    assert "Gain over stage two's best on val" in report and "made on val" in report


def test_saved_model_round_trips_through_predict(staged, finetuned):
    model_dir, metrics = finetuned
    store = FeatureStore(staged["store"])
    test_paths = [p for p, s in zip(store.rows.paths, store.rows.splits) if s == "test"]
    results = predict(model_dir, [staged["data"] / p for p in test_paths], top_k=1)
    assert [r["top"][0][0] for r in results] == [store.class_names[i] for i in metrics["predictions"]]
    model, manifest = load_model(model_dir)
    assert manifest["format"] == "keras-images" and manifest["tap"] == "block2_pool"
    assert isinstance(model, keras.Model)


@pytest.mark.parametrize("head, phase1", [("probe", "store"), ("linsvm", "store"), ("dense", "images")])
def test_without_a_stage_two_run_the_probe_is_the_baseline(staged, tmp_path, head, phase1, monkeypatch):
    decoded = []

    def counting_decode(*args, **kwargs):
        decoded.append(1)
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(pipeline.data.decoding, "decode_image", counting_decode)
    monkeypatch.setattr(pipeline.store.manifest, "decode_image", counting_decode)  # StoreManifest.decoder's
    fits = []
    real_train_one = pipeline.finetuning.finetune.train_one
    monkeypatch.setattr(pipeline.finetuning.finetune, "train_one",
                        lambda *a, **k: fits.append(a[2]) or real_train_one(*a, **k))
    # the tap: the probes' best on val
    settings = {**QUICK, "fine_tune_epochs": 0, "layer": None, "unfreeze_from": None}
    model_dir, metrics = finetune(FinetuneSettings(store=str(staged["store"]), out_dir=str(tmp_path), head=head,
                                                   phase1=phase1, **settings))
    assert metrics["tap_reason"].startswith("best linear probe on val")
    # one logreg a tap chooses the tap and is the probe: none is fit twice (the linsvm head fits its SVM)
    assert fits == ["logreg"] * 2 + (["linsvm"] if head == "linsvm" else [])
    assert metrics["stage_two"]["source"] == "no stage-two run: the probe"
    assert metrics["stage_two"]["accuracy"] == metrics["probe"]["accuracy"]
    assert len(metrics["phases"]) == 1 and metrics["kept"] == "phase 1"
    assert metrics["phases"][0]["head"] == head
    assert (metrics["phases"][0]["epochs_run"] > 0) == (head == "dense")  # the probe is not trained again
    assert metrics["accuracy"] == metrics["phase1_accuracy"]
    if head == "probe":
        assert metrics["accuracy"] == metrics["probe"]["accuracy"]
    # without phase 2, phase 1 is tested on the stored features: only the 8 test images that check the
    # composition are decoded, plus train and val where phase 1 trains on images
    assert len(decoded) == {"store": 8, "images": 8 + 18 + 9}[phase1]
    # the probe is kept as stage two's model folder, as classify writes it: the page compares both stages, and
    # "use the stage-two model" names a folder that predicts
    probe_dir = model_dir.parent / f"{metrics['tap']}-logreg"
    kept = json.loads((model_dir.parent / "comparison.json").read_text())["rows"]
    assert sorted(Path(row["model_dir"]).name for row in kept) == sorted([probe_dir.name, model_dir.name])
    probe = json.loads((probe_dir / "metrics.json").read_text())
    assert probe["accuracy"] == metrics["probe"]["accuracy"]
    assert probe["test_rows_sha256"] == metrics["test_rows_sha256"]
    assert predict(probe_dir, [staged["data"]])


def test_wrong_preprocessing_is_caught_before_training(staged, tmp_path, monkeypatch):
    monkeypatch.setattr(BackbonePreprocess, "call", lambda self, x: keras.ops.cast(x, "float32"))
    with pytest.raises(LayertapError, match="does not reproduce the store's features"):
        finetune(FinetuneSettings(store=str(staged["store"]), out_dir=str(tmp_path), **QUICK))


def test_changed_image_is_refused(staged, tmp_path):
    data = tmp_path / "moved"
    shutil.copytree(staged["data"], data)
    changed = data / "test" / "red" / "img_1.jpg"
    changed.write_bytes(changed.read_bytes() + b"\x00")
    with pytest.raises(LayertapError, match=r"test/red/img_1.jpg \(the file changed since the store was extracted"):
        finetune(FinetuneSettings(store=str(staged["store"]), out_dir=str(tmp_path), data_root=str(data), **QUICK))


def _epochs_through_best_on_val(scores, start=None, patience=3):
    """Run the callback train_phase keeps weights with over ``scores`` (val accuracy, val loss), the model's
    weights set to the epoch's number before each epoch ends; return the restored number, when it
    stopped and whether an epoch beat ``start``."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    callback = keep_best_on_val(patience, start)
    callback.set_model(model)
    model.set_weights([np.full(w.shape, -1.0, w.dtype) for w in model.get_weights()])
    model.stop_training, stopped = False, None  # as fit() starts
    callback.on_train_begin()
    for epoch, (accuracy, loss) in enumerate(scores):
        model.set_weights([np.full(w.shape, float(epoch), w.dtype) for w in model.get_weights()])
        callback.on_epoch_end(epoch, {"val_accuracy": accuracy, "val_loss": loss})
        if model.stop_training:
            stopped = epoch
            break
    callback.on_train_end()
    return float(model.get_weights()[0].flat[0]), stopped, callback.improved


def test_the_weights_kept_are_the_best_epochs_on_val_accuracy_then_loss():
    scores = [(0.5, 1.0), (0.9, 0.6), (0.9, 0.4), (0.8, 0.1), (0.9, 0.5)]
    assert _epochs_through_best_on_val(scores) == (2.0, None, True)
    assert _epochs_through_best_on_val(scores, patience=2) == (2.0, 4, True)  # two epochs without a better one
    assert _epochs_through_best_on_val(scores, start=(0.9, 0.45)) == (2.0, None, True)
    assert _epochs_through_best_on_val(scores, start=(0.9, 0.4)) == (-1.0, 2, False)  # a tie does not beat it
    # none beats the start: its weights
    assert _epochs_through_best_on_val(scores, start=(0.9, 0.3)) == (-1.0, 2, False)


def test_phase_two_reports_its_best_epoch_on_val_not_its_last(staged, tmp_path, monkeypatch):
    """Best is the highest val accuracy, then the lowest val loss: epoch 2 here (train_phase is stood in for, so
    no weights move; the callback test above checks that the weights kept follow the same rule)."""
    epochs = [(0.5, 1.0), (0.9, 0.4), (0.9, 0.6), (0.7, 0.3)]
    curves = [{"loss": 0.1, "accuracy": 1.0, "val_accuracy": a, "val_loss": v} for a, v in epochs]
    monkeypatch.setattr(pipeline.finetuning.finetune, "train_phase", lambda *a, **k: (curves, False, True))
    _, metrics = finetune(FinetuneSettings(store=str(staged["store"]), out_dir=str(tmp_path), **QUICK))
    phase2 = metrics["phases"][1]
    assert (phase2["val_accuracy"], phase2["val_loss"], phase2["epochs_run"]) == (0.9, 0.4, 4)
    assert metrics["kept"] == "phase 2" and metrics["val_accuracy"] == 0.9


def test_time_budget_stops_phase_two_in_its_first_epoch_and_says_so(staged, finetuned, tmp_path):
    _, unlimited = finetuned
    assert unlimited["phases"][1]["epochs_run"] == 2 and not unlimited["phases"][1]["time_limited"]
    model_dir, metrics = finetune(FinetuneSettings(store=str(staged["store"]), out_dir=str(tmp_path),
                                                   fine_tune_minutes=1e-6, **QUICK))
    phase1, phase2 = metrics["phases"]
    assert "time_limited" not in phase1  # the budget is phase 2's alone
    assert phase2["epochs_run"] == 1 and phase2["time_limited"]  # validated after its first batch
    assert phase2["val_loss"] is not None
    assert " 1 (time limit) " in (model_dir / "report.md").read_text()
    _, skipped = finetune(FinetuneSettings(store=str(staged["store"]), out_dir=str(tmp_path / "none"),
                                           fine_tune_minutes=0, **QUICK))
    assert len(skipped["phases"]) == 1 and skipped["kept"] == "phase 1"
    with pytest.raises(ValueError, match="fine_tune_minutes"):
        FinetuneSettings(store=str(staged["store"]), fine_tune_minutes=-1)
