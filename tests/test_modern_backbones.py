"""ConvNeXt-Tiny and EfficientNetV2-B0, each one registry entry, through every stage (random weights, 32 px).

They differ from VGG16 and ResNet50 where the interface must hold: normalisation inside the network,
depthwise convolutions (ConvNeXt's written as grouped Conv2D, EfficientNetV2's as DepthwiseConv2D and
followed by BatchNormalization, which extraction folds on TensorFlow and torch), Dense layers on maps,
LayerNormalization and LayerScale, squeeze-and-excitation blocks, nested Sequential stems.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_split_folder, tiny_settings
from pipeline import import_keras
from pipeline.backbones.batchnorm import FOLDED, folds_batchnorm
from pipeline.backbones.build import architecture_shapes
from pipeline.backbones.costs import multiply_adds, tap_costs
from pipeline.backbones.registry import BACKBONES, get_backbone
from pipeline.classification.classify import ClassifySettings, classify, sweep
from pipeline.extraction.extract import extract_features
from pipeline.finetuning.finetune import FinetuneSettings, finetune
from pipeline.prediction.predict import predict
from pipeline.store.feature_store import FeatureStore

# Two early taps each (cheap at 32 px); fine-tuning on the first.
TAPS = {"convnext_tiny": ("convnext_tiny_stage_0_block_2_identity", "convnext_tiny_stage_1_block_2_identity"),
        "efficientnetv2_b0": ("block2b_add", "block3b_add")}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_recommended_tap_is_a_layer_of_the_built_network(name):
    backbone = get_backbone(name)
    shapes = architecture_shapes(backbone, backbone.taps, 64)
    assert all(len(shape) == 3 for shape in shapes.values()) and backbone.kind == "maps"
    costs = tap_costs(backbone.build(64), backbone.taps)
    gflops = [costs[tap]["gflops"] for tap in backbone.taps]
    assert gflops == sorted(gflops) and gflops[0] > 0  # low to high, and every tap costs something


def test_multiply_adds_match_a_hand_count_for_each_layer_type():
    keras = import_keras()
    layers = keras.layers
    x = keras.Input((8, 8, 3))
    depthwise = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="depthwise")(x)  # 6 channels
    separable = layers.SeparableConv2D(5, 3, padding="same", name="separable")(depthwise)
    pointwise = layers.Conv2D(6, 1, name="pointwise")(separable)
    grouped = layers.Conv2D(6, 3, padding="same", groups=3, name="grouped")(pointwise)
    dense = layers.Dense(4, name="dense")(grouped)  # on a map: every position
    tokens = layers.Reshape((64, 4))(dense)
    attention = layers.MultiHeadAttention(num_heads=2, key_dim=3, name="attention")(tokens, tokens)
    model = keras.Model(x, attention)
    positions = 8 * 8
    hand = {
        "depthwise": positions * 3 * 3 * 3 * 2,                 # window x input channels x multiplier
        "separable": positions * (3 * 3 * 6 + 6 * 5),           # depthwise step, then pointwise 6 -> 5
        "pointwise": positions * 5 * 6,
        "grouped": positions * 3 * 3 * (6 // 3) * 6,            # each output sees its group's 2 channels
        "dense": positions * 6 * 4,
        # q, k, v projections (4 -> 2 heads x 3), output (2 x 3 -> 4), scores and their weighting of values
        "attention": 3 * positions * 4 * 6 + positions * 6 * 4 + 2 * positions * positions * 2 * 3,
    }
    assert {name: multiply_adds(model.get_layer(name)) for name in hand} == hand
    assert tap_costs(model, ["attention"])["attention"]["gflops"] == pytest.approx(2 * sum(hand.values()) / 1e9)


@pytest.mark.parametrize("name, gflops", [("convnext_tiny", 8.9), ("efficientnetv2_b0", 1.43)])
def test_the_network_costs_what_its_paper_says(name, gflops):
    """At 224 px: ConvNeXt-T 4.5 G multiply-adds (Liu et al. 2022), EfficientNetV2-B0 0.72 G (Tan & Le 2021),
    as GFLOPs (two per multiply-add). Counting only Conv2D and Dense, as the sweep did, gave far less for both."""
    backbone = get_backbone(name)
    model = backbone.build(224)
    assert tap_costs(model, [backbone.taps[-1]])[backbone.taps[-1]]["gflops"] == pytest.approx(gflops, rel=0.02)


@pytest.mark.parametrize("name", sorted(TAPS))
def test_every_stage_runs_on_the_backbone(name, tmp_path):
    data = make_split_folder(tmp_path / "photos", train=6, val=3, test=3)
    taps = TAPS[name]
    extracted = extract_features(tiny_settings(data, tmp_path / "features", backbone=name, layers=taps))
    store = FeatureStore(extracted.store_path)
    assert store.taps == taps and store.manifest.backbone == name and len(store) == 36
    assert all(np.isfinite(store.features(tap)).all() and store.features(tap).std() > 0 for tap in taps)
    assert store.manifest.batchnorm == (FOLDED if folds_batchnorm(get_backbone(name)) else "")

    run_dir, rows = sweep(ClassifySettings(store=str(store.path), out_dir=str(tmp_path / "models")))
    both = "+".join(taps)  # two taps: then the pair, side by side
    assert [row["tap"] for row in rows] == [*taps, both] and all(row["gflops"] > 0 for row in rows)
    assert json.loads((run_dir / "sweep.json").read_text())["best_on_val"] in (*taps, both)

    result = classify(ClassifySettings(store=str(store.path), classifiers=("logreg", "dense"),
                                       out_dir=str(tmp_path / "models")))
    assert len(result.rows) == 4

    model_dir, metrics = finetune(FinetuneSettings(store=str(store.path), out_dir=str(tmp_path / "models"),
                                                   layer=taps[0], epochs=1, fine_tune_epochs=1, batch_size=8,
                                                   workers=2, progress=False))
    assert metrics["tap"] == taps[0] and len(metrics["phases"]) == 2

    images = sorted(str(p) for p in (data / "test").rglob("*.jpg"))
    for folder in (model_dir, run_dir / f"{taps[1]}-logreg"):
        predicted = predict(folder, images)
        assert len(predicted) == len(images) and all(row["top"][0][0] in store.class_names for row in predicted)


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_a_cached_imagenet_file_is_found_by_the_hash_keras_gives(algorithm, tmp_path, monkeypatch):
    """Keras gives an md5 for the older files (VGG16, ResNet50, EfficientNetV2) and a sha256 for ConvNeXt's;
    a cached file is checked against either without a download."""
    import dataclasses
    import hashlib

    from pipeline.backbones.weights import resolve_weights

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cached = tmp_path / "models" / "convnext_tiny_notop.h5"
    cached.parent.mkdir()
    cached.write_bytes(b"weights")
    backbone = dataclasses.replace(get_backbone("convnext_tiny"),
                                   imagenet_hash=hashlib.new(algorithm, b"weights").hexdigest(),
                                   imagenet_url="http://127.0.0.1:9/nowhere.h5")
    resolved = resolve_weights(backbone, "imagenet")
    assert resolved.path == cached and resolved.sha256 == hashlib.sha256(b"weights").hexdigest()
