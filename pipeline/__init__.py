"""layertap: transfer learning from the layers you choose.

Stage one extracts pooled activations of named layers of a frozen pretrained CNN into
HDF5 feature stores (:mod:`pipeline.extract`, :mod:`pipeline.store`); later stages train
classifiers on those stores without touching an image again.
"""

import os
import platform

__version__ = "0.1.0"


def set_backend_defaults() -> None:
    """Environment defaults read when Keras loads TensorFlow; call before the first ``import keras``.

    An explicit setting always wins. ``python -m pipeline`` and the ``layertap`` command call this.

    - TensorFlow's C++ start-up messages are hidden (they bury our summary; real failures still raise).
    - TensorFlow turns its oneDNN kernels on by default only on x86 CPUs with AVX-512 VNNI, BF16 or AMX.
      On an AVX2-only CPU (a 2-core AMD EPYC) they run VGG16 in float32 about 1.2x faster than the Eigen
      kernels TensorFlow otherwise uses (bench/NOTES.md), so they are on for every x86-64 CPU.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


class LayertapError(Exception):
    """An error a user can act on: its message names the input and the fix."""
