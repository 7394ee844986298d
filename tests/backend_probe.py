"""Run by tests/test_backends.py under another Keras backend (``KERAS_BACKEND=jax`` or ``torch``, an interpreter
without TensorFlow): extract features, and take one fine-tuning step with part of the trunk unfrozen.

    python tests/backend_probe.py OUT.npz RESNET_WEIGHTS.weights.h5

Writes the features of fixed images (VGG16 with hed-bsds500 weights; ResNet50 with the weights file that the
calling test saved), per backbone which weights one ``fit`` step changed, and, where DALI is installed, a batch
``--decoder dali`` hands to the backend.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

IMAGES = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
CASES = {"vgg16": ("hed-bsds500", ("block2_pool", "block3_pool"), "block3_pool", "block3_conv2"),
         "resnet50": (None, ("conv2_block3_out", "conv3_block4_out"), "conv3_block4_out", "conv3_block4_1_conv")}


def on_device(pixels: np.ndarray):
    """A batch as a GPU decoder hands it over (``pipeline.data.dali_decode.DaliDecoder``): the backend's own array."""
    from pipeline import import_keras

    backend = import_keras().config.backend()
    if backend == "jax":
        import jax
        return jax.device_put(pixels)
    if backend == "torch":
        import torch
        return torch.from_numpy(pixels)
    return pixels


def features(backbone: str, weights: str, fold: bool = False) -> dict:
    """The features of IMAGES as stage one computes them: two batches, the second started before the first is
    collected (on JAX both run asynchronously), the last one padded and handed over as a device array (as the GPU
    decoders do); checked against one synchronous call. ``fold``: with BatchNormalization folded, as extraction runs
    it where :func:`pipeline.backbones.batchnorm.folds_batchnorm` says so (keys ``folded/...``)."""
    from pipeline.backbones.build import create_extractor
    from pipeline.extraction.shards import collect, forward

    taps = CASES[backbone][1]
    extractor = create_extractor(backbone, weights, taps, "avg", 32, "float32", fold=fold)
    outputs = {tap: [] for tap in taps}
    first, second = forward(extractor, IMAGES[:3], 3), forward(extractor, on_device(IMAGES[3:]), 3)
    collect(extractor, first, outputs)
    collect(extractor, second, outputs)
    direct = extractor(IMAGES)
    for tap in taps:
        np.testing.assert_allclose(np.concatenate(outputs[tap]), direct[tap], rtol=1e-5, atol=1e-6, err_msg=tap)
    return {f"{'folded/' if fold else ''}{backbone}/{tap}": np.concatenate(outputs[tap]) for tap in taps}


def changed_by_one_step(backbone: str) -> dict:
    """``{layer: changed}`` for every trunk layer with weights, after one Adam step with the top unfrozen.

    Seeded random weights: hed-bsds500's edge filters leave block 3 silent on these noise images, so no
    gradient would reach it whatever the backend does.
    """
    from pipeline import import_keras
    from pipeline.backbones.build import compose_classifier, create_extractor, cut_trunk
    from pipeline.backbones.layers import crossentropy
    from pipeline.finetuning.compose import build_augmentation, set_trainable
    from pipeline.heads.dense import build_dense_head

    keras = import_keras()
    keras.utils.set_random_seed(0)
    _, _, tap, unfreeze_from = CASES[backbone]
    trunk = cut_trunk(create_extractor(backbone, "random", tap, "avg", 32, "float32").base, tap)
    set_trainable(trunk, unfreeze_from)
    dims = trunk.output.shape[-1]
    head = build_dense_head(dims, 3, np.zeros(dims), np.ones(dims), hidden_units=0)
    model, _ = compose_classifier(trunk, backbone, tap, "avg", head, build_augmentation({"flip": "horizontal"}))
    before = [keras.ops.convert_to_numpy(w).copy() for w in trunk.weights]
    # Adam moves every weight with a non-zero gradient by about its learning rate, however small the gradient.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=crossentropy)  # fine-tuning's loss
    model.fit(np.concatenate([IMAGES, IMAGES]), np.array([0, 1, 2, 0, 1, 2, 0, 1]), batch_size=8, epochs=1, verbose=0)
    changed: dict[str, bool] = {}
    for w, old in zip(trunk.weights, before):
        layer = w.path.split("/")[-2]
        changed[layer] = changed.get(layer, False) or not np.array_equal(old, keras.ops.convert_to_numpy(w))
    return changed


def confident_mistakes_train() -> bool:
    """Whether fine-tuning's training (``train_phase``) moves a softmax layer that is sure of the wrong class for
    every image (the true class's probability about 4e-18): Keras's own loss gives no gradient there on JAX and
    torch (:func:`pipeline.backbones.layers.crossentropy`)."""
    from pipeline import import_keras
    from pipeline.finetuning.compose import train_phase

    keras = import_keras()
    x = np.eye(3, dtype=np.float32)
    y = np.array([1, 2, 0])  # image i is class i + 1, and the layer is sure it is class i
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])
    net.layers[0].set_weights([40 * np.eye(3, dtype=np.float32), np.zeros(3, np.float32)])
    before = net.layers[0].get_weights()[0].copy()
    train_phase(net, x, y, x, y, epochs=1, learning_rate=1e-2, precision="float32", batch_size=3, patience=1)
    return not np.array_equal(before, net.layers[0].get_weights()[0])


def dali_batch(folder: Path) -> dict:
    """Where DALI is installed: a batch of two JPEGs (DALI's) and a PNG (Pillow's) as ``DaliDecoder`` hands it to
    this backend (DLPack, on DALI's CPU device here), with Pillow's pixels of the same files to compare."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return {}
    from PIL import Image

    import pipeline.data.gpu_decode as gpu_decode
    from pipeline.data.dali_decode import DaliDecoder
    from pipeline.data.decoding import decode_image

    gpu_decode.DEVICE = "cpu"
    ramp = np.linspace(0, 255, 48 * 40 * 3).reshape(40, 48, 3)
    paths = []
    for i, fmt in enumerate(("JPEG", "PNG", "JPEG")):
        paths.append(folder / f"{i}.{fmt.lower()}")
        Image.fromarray(np.roll(ramp, 40 * i).astype(np.uint8)).save(paths[-1], fmt, quality=95)
    decoder = DaliDecoder(24, device="cpu")
    batch, reasons = decoder(paths)
    decoder.close()
    assert reasons == [None] * 3, reasons
    return {"dali/pixels": np.asarray(batch),
            "dali/pillow": np.stack([decode_image(p, 24, draft=False) for p in paths]),
            "dali/type": np.array(type(batch).__module__)}


def main(out: str, resnet_weights: str) -> None:
    from pipeline import import_keras

    keras = import_keras()
    weights = {"vgg16": "hed-bsds500", "resnet50": resnet_weights}
    arrays = {}
    steps = {}
    for backbone, w in weights.items():
        arrays.update(features(backbone, w))
        steps[backbone] = changed_by_one_step(backbone)
    arrays.update(features("resnet50", resnet_weights, fold=True))
    with tempfile.TemporaryDirectory() as folder:
        arrays.update(dali_batch(Path(folder)))
    meta = {"backend": keras.config.backend(), "steps": steps, "confident_mistakes_train": confident_mistakes_train()}
    np.savez(out, **arrays, meta=np.array(json.dumps(meta)))


if __name__ == "__main__":
    main(*sys.argv[1:])
