"""Where extraction time goes on this machine: ``python -m bench.profile [--size 224] [--n 256]``.

Times each part alone on the same flowers17 images: JPEG decode + resize (with and without draft
mode, on the decoding threads), the forward pass to ``block5_pool`` from ready arrays (``--forward``:
float32, XLA-compiled float32, mixed bfloat16), and writing the features to HDF5. Prints a table and
one JSON line. TensorFlow runs as the environment says (``TF_ENABLE_ONEDNN_OPTS=0`` or ``1`` compares
its two CPU kernel libraries); this script does not apply :func:`pipeline.set_backend_defaults`.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np

from bench.common import FLOWERS, emit

FORWARD = {"float32": ("float32", False), "float32-xla": ("float32", True), "bfloat16": ("bfloat16", False)}


def _rate(fn, n: int, repeat: int = 2) -> float:
    """Images per second of ``fn()`` over ``n`` images: the best of ``repeat`` runs after one warm-up."""
    fn()
    best = min(_timed(fn) for _ in range(repeat))
    return n / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--forward", default=",".join(FORWARD),
                        help="comma list of forward variants to time (default: %(default)s; bfloat16 is "
                             "emulated and slow on CPUs without bfloat16 units)")
    args = parser.parse_args()
    variants = args.forward.split(",")
    unknown = set(variants) - set(FORWARD)
    if unknown:
        parser.error(f"--forward: unknown {', '.join(sorted(unknown))}; use {', '.join(FORWARD)}")

    import h5py
    import keras

    from pipeline.backbones.build import create_extractor
    from pipeline.core.parallel import default_workers
    from pipeline.data.decoding import decode_image, iter_decoded

    paths = sorted(FLOWERS.rglob("*.jpg"))[: args.n]
    rows = {}
    for draft in (True, False):
        decode = partial(decode_image, size=args.size, draft=draft)
        rows[f"decode+resize, {'draft' if draft else 'full'} JPEG, {default_workers()} threads"] = _rate(
            lambda: list(iter_decoded(paths, decode, default_workers(), 64)), len(paths))  # noqa: B023 - run at once
    images = np.stack([decode_image(p, args.size) for p in paths])
    for precision, jit in (FORWARD[v] for v in variants):
        extractor = create_extractor("vgg16", "hed-bsds500", "block5_pool", "avg", args.size, precision).model
        extractor.jit_compile = jit
        batches = [images[i:i + args.batch_size] for i in range(0, len(images) - args.batch_size + 1, args.batch_size)]
        label = f"forward to block5_pool, {precision}{', XLA' if jit else ''}, batch {args.batch_size}"
        rows[label] = _rate(lambda: [extractor.predict_on_batch(b) for b in batches],  # noqa: B023 - run at once
                            len(batches) * args.batch_size)
        keras.backend.clear_session()
    features = np.random.default_rng(0).random((len(paths), 512), dtype=np.float32)

    def write():
        with h5py.File(f"/tmp/layertap-profile-{args.size}.h5", "w") as fh:
            fh.create_dataset("f", data=features)
    rows["HDF5 write of the features"] = _rate(write, len(paths))
    width = max(map(len, rows))
    for name, rate in rows.items():
        print(f"{name:<{width}}  {rate:10.1f} images/s")
    emit({"size": args.size, "n": len(paths), "images_per_s": rows})


if __name__ == "__main__":
    main()
