"""BatchNormalization folded into the convolutions: the same function, where it is done, and how stores say so."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline.backbones.build
from bench.forward import trained_like_batchnorm
from conftest import tiny_settings
from pipeline import import_keras
from pipeline.backbones.batchnorm import FOLDED, fold_batchnorm, folds_batchnorm
from pipeline.backbones.build import build_backbone, cut_trunk
from pipeline.backbones.registry import get_backbone
from pipeline.backbones.weights import resolve_weights
from pipeline.core.runtime import keras_backend
from pipeline.extraction.extract import extract_features
from pipeline.extraction.reuse import find_donors
from pipeline.runs.reports import store_summary
from pipeline.store.feature_store import FeatureStore


def _batchnorms(model) -> list[str]:
    keras = import_keras()
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


@pytest.fixture(scope="module")
def resnet():
    """ResNet50 at 32 px with its BatchNormalization statistics drawn away from (0, 1), as trained ones are."""
    entry = get_backbone("resnet50")
    return trained_like_batchnorm(build_backbone(entry, resolve_weights(entry, "random"), 32))


def test_the_folded_network_computes_the_same_taps_under_the_same_names(resnet):
    """Up to conv2_block3_out ResNet50 has 11 BatchNormalizations, each after its convolution; a tap on a
    convolution's own output keeps the BatchNormalization after it (folding it would change that tap)."""
    taps = ["conv2_block3_out", "conv2_block2_1_conv", "conv2_block1_0_bn"]
    trunk = cut_trunk(resnet, taps)
    kernel_before = resnet.get_layer("conv1_conv").get_weights()[0].copy()
    folded, n = fold_batchnorm(trunk)
    assert n == 10 and _batchnorms(folded) == ["conv2_block2_1_bn"]
    assert [layer.name for layer in folded.layers[1:]] == [layer.name for layer in trunk.layers[1:]]  # but the input
    assert len(_batchnorms(trunk)) == 11  # the original is untouched
    np.testing.assert_array_equal(resnet.get_layer("conv1_conv").get_weights()[0], kernel_before)
    x = np.random.default_rng(1).uniform(-120, 120, (3, 32, 32, 3)).astype(np.float32)
    for want, got in zip(trunk.predict_on_batch(x), folded.predict_on_batch(x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_batchnorm_after_a_depthwise_convolution_folds_too():
    """EfficientNetV2's MBConv blocks put a BatchNormalization after a DepthwiseConv2D (kernel (kh, kw, in, 1)):
    its scale goes to the kernel's input axis. Every BatchNormalization of the trunk folds, features unchanged."""
    keras = import_keras()
    entry = get_backbone("efficientnetv2_b0")
    base = trained_like_batchnorm(build_backbone(entry, resolve_weights(entry, "random"), 32))
    trunk = cut_trunk(base, ["block4a_project_bn"])  # a tap on a BatchNormalization's output folds it too
    depthwise_bns = [layer for layer in trunk.layers if isinstance(layer, keras.layers.BatchNormalization)
                     and isinstance(trunk.get_layer(layer.input._keras_history[0].name),
                                    keras.layers.DepthwiseConv2D)]
    folded, n = fold_batchnorm(trunk)
    assert depthwise_bns and n == len(_batchnorms(trunk)) and not _batchnorms(folded)
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    want, got = trunk.predict_on_batch(x), folded.predict_on_batch(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_extraction_folds_where_it_measured_faster():
    resnet50, vgg16 = get_backbone("resnet50"), get_backbone("vgg16")
    assert folds_batchnorm(resnet50, "tensorflow") and folds_batchnorm(resnet50, "torch")
    assert not folds_batchnorm(resnet50, "jax")
    assert not folds_batchnorm(vgg16, "tensorflow")


@pytest.mark.skipif(not folds_batchnorm(get_backbone("resnet50"), keras_backend()),
                    reason=f"ResNet50 is not folded on {keras_backend()}")
def test_a_folded_store_says_so_and_prediction_folds_too(split_folder, tmp_path, monkeypatch):
    """The key and manifest of a ResNet50 store record the folding (a VGG16 store's keys are as before), the
    engine and the manifest's extractor (prediction's) both fold, and only stores folded alike share rows."""
    calls = []
    real = fold_batchnorm
    monkeypatch.setattr(pipeline.backbones.build, "fold_batchnorm",
                        lambda model: calls.append(model.name) or real(model))
    settings = tiny_settings(split_folder, tmp_path / "f", backbone="resnet50", layers=("conv2_block3_out",))
    store = FeatureStore(extract_features(settings).store_path)
    assert store.manifest.batchnorm == FOLDED == store.manifest.raw["batchnorm"] and len(calls) == 1
    assert "BatchNormalization folded" in store_summary(store)
    extractor = store.manifest.create_extractor()
    assert len(calls) == 2 and not _batchnorms(extractor.model.get_layer("resnet50_trunk"))
    assert len(_batchnorms(extractor.base)) == 53  # fine-tuning's base is the network as built
    unfolded = {k: v for k, v in store.manifest.raw.items() if k != "batchnorm"}
    other = tmp_path / "f" / "other.h5"
    assert find_donors(tmp_path / "f", other, store.manifest.raw, ("conv2_block3_out",)).stores[0].path == store.path
    assert find_donors(tmp_path / "f", other, unfolded, ("conv2_block3_out",)) is None
    vgg = FeatureStore(extract_features(tiny_settings(split_folder, tmp_path / "f")).store_path)
    assert "batchnorm" not in vgg.manifest.raw and not vgg.manifest.batchnorm
