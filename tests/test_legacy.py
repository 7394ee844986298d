"""What earlier versions wrote still loads: a store and model folders made by the flat package (9fc8b14).

``tests/legacy/9fc8b14/`` holds a store and three model folders (logreg as skops, the Dense head and a
fine-tuned model as ``.keras``) written by commit 9fc8b14, the last one before the subpackages, and the
probabilities its ``predict`` gave on the test images (``predictions.json``). They were made with::

    git worktree add /tmp/old 9fc8b14 && cd /tmp/legacy
    # images: conftest.make_split_folder(Path("data"), 4, 2, 2)
    PYTHONPATH=/tmp/old python -m pipeline extract --data data --weights random --size 32 \\
        --layers block1_pool,block2_pool --out features
    PYTHONPATH=/tmp/old python -m pipeline classify ... --classifiers logreg,dense --models models
    PYTHONPATH=/tmp/old python -m pipeline finetune ... --layer block1_pool --fine-tune-epochs 1 --epochs 2
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import ROOT, make_split_folder
from pipeline.core.runtime import keras_backend
from pipeline.prediction.predict import predict
from pipeline.runs.artifacts import load_model
from pipeline.store.feature_store import FeatureStore

LEGACY = ROOT / "tests" / "legacy" / "9fc8b14"
MODELS = ("block1_pool-logreg", "block1_pool-dense", "block1_pool-finetune")


def test_a_store_of_the_flat_package_opens_verifies_and_reads():
    store = FeatureStore(next((LEGACY / "store").glob("*.h5")))
    store.verify()
    assert store.taps == ("block1_pool", "block2_pool") and len(store) == 24
    assert store.manifest.backbone == "vgg16" and store.manifest.weights == "random-seed0"
    assert store.features("block1_pool").shape == (24, 64) and np.isfinite(store.features("block2_pool")).all()
    assert tuple(store.class_names) == ("blue", "green", "red")


@pytest.mark.parametrize("model", MODELS)
def test_a_model_folder_of_the_flat_package_loads_and_predicts_as_it_did(model, tmp_path):
    data = make_split_folder(tmp_path / "data", 4, 2, 2)  # the same generated images as when it was made
    folder = tmp_path / model
    shutil.copytree(LEGACY / "models" / model, folder)
    estimator, manifest = load_model(folder)
    assert manifest["tap"] == "block1_pool" and estimator is not None
    expected = json.loads((LEGACY / "predictions.json").read_text())[model]
    rows = predict(folder, sorted(str(p) for p in (data / "test").rglob("*.jpg")))
    got = {row["path"].split("data/")[-1]: row["top"] for row in rows}
    assert got.keys() == expected.keys()
    if keras_backend() != "tensorflow" and model != "block1_pool-finetune":
        # The backbone's "random" weights are drawn by the backend's own generator: another backend
        # computes other features, so only a model carrying its whole network predicts alike there.
        return
    for path, top in got.items():
        assert top[0][0] == expected[path][0][0], path
        # bfloat16 on another CPU may round differently
        np.testing.assert_allclose([dict(top)[name] for name, _ in expected[path]], [p for _, p in expected[path]],
                                   atol=0.02)


@pytest.mark.parametrize("model", MODELS)
def test_a_model_folder_with_per_image_lists_in_its_metrics_json_is_read_as_before(model):
    """Folders written before per_image.npz keep each image's prediction as lists in metrics.json."""
    from pipeline.runs.per_image import FILE, read_metrics

    folder = LEGACY / "models" / model
    assert not (folder / FILE).exists()
    metrics = read_metrics(folder)
    assert metrics["predictions"] == json.loads((folder / "metrics.json").read_text())["predictions"]
    assert len(metrics["predictions"]) == metrics["n_test"]
