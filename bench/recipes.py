"""The extraction recipes compared, each run in its own process: ``python -m bench.recipes RECIPE ...``.

All three compute the same thing: the global-average-pooled ``tap`` activations of the backbone
(``--backbone``, VGG16 by default) with the same weights for every image of a folder of class folders,
written to disk. The clock starts after the imports and stops when the features are on disk, so model
building and weight loading count.

- ``datagen``: the Keras transfer-learning tutorials' recipe, ``ImageDataGenerator().flow_from_directory``
  and ``conv_base.predict(batch)`` in a loop (TensorFlow backend; ``tf.keras``).
- ``dataset``: the current Keras guide's recipe, ``keras.utils.image_dataset_from_directory`` (tf.data,
  prefetched) and ``model.predict(dataset)``.
- ``ours``: ``pipeline.extraction.extract.extract_features`` into a fresh feature store, at ``--precision auto``
  (bfloat16 where the CPU has bfloat16 units) or ``float32`` (the peers' arithmetic), with the
  backend settings the ``layertap`` command makes (:func:`pipeline.set_backend_defaults`: oneDNN
  kernels on every x86-64 CPU). The peers run with TensorFlow's defaults, as users run them.

Each prints one JSON line; ``ours`` adds ``extract_images_per_s``, its rate after start-up (scan,
model build), which ``make bench`` uses to size the image set of the speed rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import emit
from pipeline import set_backend_defaults


def conv_base(backbone: str, size: int, tap: str, weights: str):
    """The backbone as Keras builds it, with our weights, up to ``tap``, global average pooled (peers use
    keras's own layers), and its ``preprocess_input``."""
    import keras

    from pipeline.backbones.build import create_extractor
    from pipeline.backbones.registry import get_backbone

    base = create_extractor(backbone, weights, tap, image_size=size).base
    pooled = keras.layers.GlobalAveragePooling2D()(base.get_layer(tap).output)
    return keras.Model(base.inputs, pooled), get_backbone(backbone).preprocess


def datagen(data: Path, size: int, tap: str, weights: str, batch_size: int, out: Path,
            backbone: str = "vgg16") -> dict:
    import tensorflow as tf

    model, preprocess_input = conv_base(backbone, size, tap, weights)
    generator = tf.keras.preprocessing.image.ImageDataGenerator(preprocessing_function=preprocess_input)
    flow = generator.flow_from_directory(str(data), target_size=(size, size), batch_size=batch_size,
                                         class_mode="sparse", shuffle=False)
    features = np.zeros((flow.samples, model.output_shape[-1]), dtype=np.float32)
    labels = np.zeros(flow.samples, dtype=np.int32)
    done = 0
    for x, y in flow:
        features[done:done + len(x)] = model.predict(x, verbose=0)
        labels[done:done + len(x)] = y
        done += len(x)
        if done >= flow.samples:
            break
    np.savez(out / "features.npz", features=features, labels=labels)
    return {"images": done}


def dataset(data: Path, size: int, tap: str, weights: str, batch_size: int, out: Path,
            backbone: str = "vgg16") -> dict:
    import keras
    import tensorflow as tf

    model, preprocess_input = conv_base(backbone, size, tap, weights)
    ds = keras.utils.image_dataset_from_directory(str(data), image_size=(size, size), batch_size=batch_size,
                                                  shuffle=False, label_mode="int", verbose=False)
    ds = ds.map(lambda x, y: preprocess_input(x), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    features = model.predict(ds, verbose=0)
    np.savez(out / "features.npz", features=features)
    return {"images": len(features)}


def ours(data: Path, size: int, tap: str, weights: str, batch_size: int, out: Path, backbone: str = "vgg16",
         split_file=None, precision: str = "auto") -> dict:
    from pipeline.extraction.extract import ExtractSettings, extract_features

    result = extract_features(ExtractSettings(data=str(data), split_file=split_file, backbone=backbone,
                                              layers=(tap,), weights=weights,
                                              image_size=size, batch_size=batch_size, out_dir=str(out),
                                              precision=precision, progress=False))
    assert not result.cache_hit, "the benchmark needs a fresh output folder"
    return {"images": result.n_decoded, "extract_images_per_s": result.images_per_s}


RECIPES = {"datagen": datagen, "dataset": dataset, "ours": ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=RECIPES)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split-file")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--tap", default="block5_pool")
    parser.add_argument("--weights", default="hed-bsds500")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", required=True)
    parser.add_argument("--precision", default="auto", help="ours only: float32, bfloat16 or auto (default)")
    args = parser.parse_args()
    if args.recipe == "ours":
        set_backend_defaults()  # before Keras loads TensorFlow, as the layertap command does
    import keras  # noqa: F401 - imports are not timed
    if args.recipe != "ours":
        import tensorflow  # noqa: F401
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    kwargs = {"split_file": args.split_file, "precision": args.precision} if args.recipe == "ours" else {}
    done = RECIPES[args.recipe](Path(args.data), args.size, args.tap, args.weights, args.batch_size, out,
                                args.backbone, **kwargs)
    seconds = time.perf_counter() - started
    precision = "float32"
    if args.recipe == "ours":
        from pipeline.core.runtime import resolve_precision
        precision = resolve_precision(args.precision)
    emit({"recipe": args.recipe, "backbone": args.backbone, "weights": args.weights, "size": args.size,
          "tap": args.tap, "precision": precision, **done,
          "seconds": seconds, "images_per_s": done["images"] / seconds})


if __name__ == "__main__":
    main()
