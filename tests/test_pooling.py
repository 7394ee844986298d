"""Pooling arithmetic and the Keras pooling ops against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.backbones.pooling import dense_params, flatten_warning, parse_pooling, pool_tensor, pooled_dims


def test_unknown_pooling_names_the_choices():
    with pytest.raises(ValueError, match=r"pooling='flat' is not known; use one of: avg, max, avgmax, gridN"):
        parse_pooling("flat")
    assert parse_pooling(" GRID2 ") == "grid2"


@pytest.mark.parametrize("mode,dims", [("avg", 8), ("max", 8), ("avgmax", 16), ("grid2", 32),
                                       ("grid3", 72), ("flatten", 5 * 7 * 8)])
def test_pool_tensor_matches_numpy(mode, dims):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 7, 8)).astype("float32")
    out = np.asarray(pool_tensor(x, mode))
    assert out.shape == (2, dims) == (2, pooled_dims(mode, (5, 7, 8)))
    if mode == "avg":
        np.testing.assert_allclose(out, x.mean(axis=(1, 2)), rtol=1e-5)
    if mode == "avgmax":
        np.testing.assert_allclose(out[:, 8:], x.max(axis=(1, 2)), rtol=1e-5)
    if mode == "grid2":  # first cell: rows 0..2 (ceil(5/2)=3), columns 0..3 (ceil(7/2)=4)
        np.testing.assert_allclose(out[:, :8], x[:, :3, :4].mean(axis=(1, 2)), rtol=1e-5)
    if mode == "flatten":
        np.testing.assert_allclose(out, x.reshape(2, -1), rtol=1e-6)


def test_flatten_warning_states_features_and_parameters():
    message = flatten_warning("block1_pool", (112, 112, 64), "flatten")
    assert "802,816 features" in message
    assert f"{dense_params(802_816):,} parameters" in message
    assert flatten_warning("block5_pool", (7, 7, 512), "flatten") is None
    assert flatten_warning("block1_pool", (112, 112, 64), "avg") is None
