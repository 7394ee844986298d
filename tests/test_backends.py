"""The same code on the other Keras backends: features match TensorFlow's, fine-tuning trains what it unfreezes, and
``--decoder dali`` hands its batch over as the backend's own array.

Each backend runs in its own interpreter without TensorFlow (`make test` builds ``.venv-jax``: JAX on the CPU);
a backend whose interpreter is not there is skipped, and says how to get it.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from backend_probe import CASES

from conftest import ROOT, backend_interpreter
from pipeline.core.runtime import keras_backend

# float32 convolutions summed in another order (oneDNN vs XLA vs ATen): relative differences of about 1e-6.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TensorFlow's side: the ResNet50 weights every backend loads, and the features it computes."""
    if keras_backend() != "tensorflow":
        pytest.skip("the reference is computed with TensorFlow")
    from backend_probe import features

    from bench.forward import trained_like_batchnorm
    from pipeline.backbones.build import create_extractor

    folder = tmp_path_factory.mktemp("backends")
    weights = folder / "resnet50-random.weights.h5"  # BatchNormalization as trained, so folding it changes numbers
    trained_like_batchnorm(create_extractor("resnet50", "random", "conv2_block3_out", image_size=32).base
                           ).save_weights(weights)
    return weights, {**features("vgg16", "hed-bsds500"), **features("resnet50", str(weights))}


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backend_matches_tensorflow_and_fine_tunes_what_it_unfreezes(backend, reference, tmp_path):
    python = backend_interpreter(backend)
    weights, expected = reference
    out = tmp_path / "probe.npz"
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    run = subprocess.run([str(python), str(ROOT / "tests" / "backend_probe.py"), str(out), str(weights)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    probe = np.load(out)
    meta = json.loads(str(probe["meta"]))
    assert meta["backend"] == backend
    assert meta["confident_mistakes_train"], "fine-tuning's loss passes no gradient to a sure mistake on " + backend
    if "dali/pixels" in probe:  # DALI's batch came to this backend as its own array, with DALI's and Pillow's rows
        assert str(probe["dali/type"]).startswith(backend)
        assert np.abs(probe["dali/pixels"].astype(int) - probe["dali/pillow"]).mean() < 1
    for name, tf_features in expected.items():
        for computed in (name, f"folded/{name}") if name.startswith("resnet50/") else (name,):
            error = np.abs(probe[computed] - tf_features).max() / np.abs(tf_features).max()
            assert error < TOLERANCE, (computed, error)
    for backbone, changed in meta["steps"].items():
        names = list(changed)
        start = names.index(CASES[backbone][3])
        for index, (layer, did_change) in enumerate(changed.items()):
            should = index >= start and "_bn" not in layer  # BatchNorm stays frozen
            assert did_change == should, (backend, backbone, layer, did_change)
