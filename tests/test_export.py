"""`layertap export`: one file from uint8 pixels to probabilities, equal to `layertap predict`'s, run without
TensorFlow or Keras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import make_split_folder, tiny_settings
from pipeline.classification.classify import classify
from pipeline.classification.settings import ClassifySettings
from pipeline.cli import main
from pipeline.core.errors import LayertapError
from pipeline.extraction.extract import extract_features
from pipeline.finetuning.finetune import finetune
from pipeline.finetuning.settings import FinetuneSettings
from pipeline.prediction.export import export_model
from pipeline.prediction.predict import predict
from pipeline.store.manifest import StoreManifest

pytest.importorskip("onnx", reason="export needs layertap[export] (onnx, tf2onnx, onnxruntime): make install")
pytest.importorskip("onnxruntime", reason="the round trip runs the file in onnxruntime: make install")

RUN_ONNX = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort
    session = ort.InferenceSession(sys.argv[1])
    meta = session.get_modelmeta().custom_metadata_map
    probabilities = session.run(None, {"pixels": np.load(sys.argv[2])})[0]
    np.save(sys.argv[3], probabilities)
    print(json.dumps({"classes": json.loads(meta["class_names"]), "size": int(meta["image_size"]),
                      "frameworks": sorted(m for m in ("tensorflow", "keras", "jax", "torch") if m in sys.modules)}))
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage two's four classifiers, a fine-tuned model and two multi-tap probes on a tiny float32 store (random
    weights)."""
    root = tmp_path_factory.mktemp("export")
    data = make_split_folder(root / "data", train=5, val=2, test=2)
    store = extract_features(tiny_settings(data, root / "f", precision="float32")).store_path
    result = classify(ClassifySettings(store=str(store), classifiers=("logreg", "linsvm", "knn", "dense:"
                                       '{"hidden_units": 8, "epochs": 5}', 'probe:{"epochs": 5}'),
                                       layers=("block2_pool",),
                                       out_dir=str(root / "m")))
    classify(ClassifySettings(store=str(store), classifiers=("logreg", 'probe:{"epochs": 5}'),
                              layers=("block1_pool+block2_pool",), out_dir=str(root / "m")))
    finetune(FinetuneSettings(store=str(store), out_dir=str(root / "m"), layer="block2_pool", epochs=1,
                              fine_tune_epochs=1, batch_size=8, workers=2, progress=False))
    images = sorted((data / "test").rglob("*.jpg"))
    return result.run_dir, images


@pytest.mark.parametrize("model", ["block2_pool-logreg", "block2_pool-linsvm", "block2_pool-dense-*",
                                   "block2_pool-probe-*", "block2_pool-finetune",
                                   "block1_pool+block2_pool-logreg", "block1_pool+block2_pool-probe-*"])
def test_the_onnx_file_gives_predicts_probabilities_without_tensorflow(trained, tmp_path, model):
    run_dir, images = trained
    model_dir = next(run_dir.glob(model))
    out = export_model(model_dir, "onnx", tmp_path / "model.onnx")
    recipe = StoreManifest.from_dict(json.loads((model_dir / "manifest.json").read_text()))
    pixels = np.stack([recipe.decoder()(path) for path in images])
    np.save(tmp_path / "pixels.npy", pixels)
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run([sys.executable, "-c", RUN_ONNX, str(out), str(tmp_path / "pixels.npy"),
                           str(tmp_path / "probs.npy")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout)
    assert info["frameworks"] == [] and info["size"] == 32
    exported = np.load(tmp_path / "probs.npy")
    expected = np.zeros_like(exported)
    for i, row in enumerate(predict(model_dir, images, top_k=len(info["classes"]))):
        for name, p in row["top"]:
            expected[i, info["classes"].index(name)] = p
    np.testing.assert_allclose(exported, expected, atol=1e-4)
    assert json.loads(out.with_name("model.onnx.json").read_text())["source"] == str(model_dir)


def test_a_knn_is_refused_in_one_line_that_names_the_alternative(trained, tmp_path, capsys):
    run_dir, _ = trained
    with pytest.raises(LayertapError, match=r"a knn model is not one network.*block2_pool-logreg.*layertap predict"):
        export_model(run_dir / "block2_pool-knn", "onnx", tmp_path / "knn.onnx")
    assert not (tmp_path / "knn.onnx").exists() and not list(tmp_path.iterdir())


def test_a_named_pipe_as_out_is_refused_and_left_as_it_is(trained, tmp_path):
    """Renamed over, the pipe would be replaced by a regular file rather than written into."""
    run_dir, _ = trained
    os.mkfifo(tmp_path / "model.onnx")
    with pytest.raises(LayertapError, match=r"--out .*model.onnx is a named pipe; name a regular file"):
        export_model(run_dir / "block2_pool-logreg", "onnx", tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").is_fifo() and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_run_folder_exports_its_recommended_model_and_keras_files_load(trained, tmp_path, capsys):
    from pipeline.core.runtime import import_keras

    run_dir, images = trained
    recommended = json.loads((run_dir / "comparison.json").read_text())["recommended"]
    out = tmp_path / "best.keras"
    assert main(["export", str(run_dir), "--format", "keras", "--out", str(out)]) == 0
    assert f"exported {recommended}" in capsys.readouterr().out
    import pipeline.backbones.layers  # noqa: F401  (its custom layers, registered)

    network = import_keras().saving.load_model(out)
    pixels = np.zeros((1, 32, 32, 3), np.uint8)
    assert network.predict_on_batch(pixels).shape == (1, 3)
    assert main(["export", str(tmp_path), "--models", str(tmp_path)]) == 2
    assert "neither a model folder nor a run folder" in capsys.readouterr().err


def test_the_readmes_ten_lines_run_the_file_with_pillow_and_onnxruntime(trained, tmp_path):
    from conftest import ROOT

    run_dir, images = trained
    out = export_model(run_dir / "block2_pool-logreg", "onnx", tmp_path / "model.onnx")
    readme = (ROOT / "README.md").read_text()
    snippet = next(block for block in readme.split("```python")[1:] if "onnxruntime" in block).split("```")[0]
    assert len(snippet.strip().splitlines()) <= 10
    script = snippet.replace("models/<run>/block3_pool-dense.onnx", str(out)).replace("photo.jpg", str(images[0]))
    script += "\nimport sys\nassert not {'tensorflow', 'keras'} & set(sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    name, probability = done.stdout.split()
    assert name in ("red", "green", "blue") and 1 / 3 <= float(probability) <= 1
