"""The benchmark compares like with like: the three recipes compute the same features."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import COLOURS, photo

from bench.recipes import RECIPES
from pipeline.store import FeatureStore

pytest.importorskip("tensorflow", reason="the peer recipes are TensorFlow-backend Keras code")


def test_peer_recipes_and_ours_give_the_same_features(tmp_path):
    data = tmp_path / "data"
    for c, (name, colour) in enumerate(COLOURS.items()):
        (data / name).mkdir(parents=True)
        for i in range(2):  # PNG at the model's size: no resize and no JPEG decoder differences
            photo(colour, size=(32, 32), seed=10 * c + i).save(data / name / f"img_{i}.png")
    features = {}
    for name, recipe in RECIPES.items():
        out = tmp_path / name
        out.mkdir()
        kwargs = {"precision": "float32"} if name == "ours" else {}
        assert recipe(data, 32, "block3_pool", "random", 4, out, **kwargs) == 6
        if name == "ours":
            features[name] = FeatureStore(next(out.glob("*.h5"))).features("block3_pool")
        else:
            features[name] = np.load(out / "features.npz")["features"]
    scale = np.abs(features["ours"]).max()
    for name in ("datagen", "dataset"):
        assert features[name].shape == (6, 256)
        np.testing.assert_allclose(features[name], features["ours"], atol=1e-4 * scale, err_msg=name)
