"""The Keras forward pass alone: as built, and with each BatchNormalization folded into the convolution before it.

A lead for issue 13's ResNet50 gap (bench/NOTES.md, "DALI on an H100"): our Keras forward on JAX ran
8,200 images/s on an H100 where torchvision's ran 13,000, so no decoder gets ResNet50 extraction to
9,500. Folding each BatchNormalization into its convolution (kernel times gamma / sqrt(var + eps),
bias (bias - mean) times that plus beta) leaves the same function for inference (float32: the
features agree to ~1e-6 relative) with one elementwise pass over the activations fewer per
BatchNormalization: 53 in ResNet50, none in VGG16. Extraction folds where this measured faster
(:mod:`pipeline.backbones.batchnorm`: on TensorFlow), with the store's key saying so.

Both networks run in this process, alternating rounds, on the same random uint8 batches (a cut at
``--tap``, seeded random weights with BatchNormalization statistics drawn away from (0, 1), the Keras
backend of the environment); images/s are medians. ``plain_vs_float32`` / ``folded_vs_float32``: each
one's average-pooled features against the float32 network's, so a lower precision's cost with and
without the folding.

    python -m bench.forward [--backbone resnet50] [--size 224] [--batch 16] [--precision float32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def trained_like_batchnorm(model, seed: int = 0):
    """Draw ``model``'s BatchNormalization statistics away from the fresh (0, 1), as trained ones are (in place), so
    that folding them changes every number it touches; returns the model."""
    from pipeline import import_keras

    keras = import_keras()
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, variance.shape)])
    return model


def measure(backbone: str, tap: str, size: int, batch: int, precision: str, rounds: int) -> dict:
    from pipeline.backbones.batchnorm import fold_batchnorm
    from pipeline.backbones.build import build_backbone, cut_trunk
    from pipeline.backbones.registry import get_backbone
    from pipeline.backbones.weights import resolve_weights
    from pipeline.core.runtime import keras_backend

    entry = get_backbone(backbone)

    def network(precision: str):
        return cut_trunk(trained_like_batchnorm(build_backbone(entry, resolve_weights(entry, "random"), size,
                                                               precision)), tap)

    plain = network(precision)
    folded, n_folded = fold_batchnorm(plain)
    x = np.random.default_rng(1).integers(0, 256, (batch, size, size, 3)).astype("float32")
    a, b = (np.asarray(model.predict_on_batch(x), np.float32) for model in (plain, folded))
    exact = a if precision == "float32" else np.asarray(network("float32").predict_on_batch(x), np.float32)
    seconds = {"plain": [], "folded": []}
    for _ in range(rounds):
        for name, model in (("plain", plain), ("folded", folded)):
            started = time.perf_counter()
            for _ in range(3):
                model.predict_on_batch(x)
            seconds[name].append((time.perf_counter() - started) / 3)
    rate = {name: batch / float(np.median(s)) for name, s in seconds.items()}
    return {"backbone": backbone, "tap": tap, "size": size, "batch": batch, "precision": precision,
            "keras_backend": keras_backend(), "batchnorms_folded": n_folded, "plain_img_s": rate["plain"],
            "folded_img_s": rate["folded"], "folded_vs_plain": rate["folded"] / rate["plain"],
            "max_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()), "weights": "random",
            # Each network's average-pooled features against the float32 network's (relative L2, mean over images):
            # what a lower precision costs, with and without the folding.
            "plain_vs_float32": _pooled_error(a, exact), "folded_vs_float32": _pooled_error(b, exact)}


def _pooled_error(maps: np.ndarray, exact: np.ndarray) -> float:
    pooled, reference = maps.mean(axis=(1, 2)), exact.mean(axis=(1, 2))
    return float(np.mean(np.linalg.norm(pooled - reference, axis=1) / np.linalg.norm(reference, axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--tap", help="the layer to cut at (default: the backbone's deepest recommended tap)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from pipeline.backbones.registry import get_backbone

    tap = args.tap or get_backbone(args.backbone).taps[-1]
    print(json.dumps(measure(args.backbone, tap, args.size, args.batch, args.precision, args.rounds)))


if __name__ == "__main__":
    main()
