"""layertap: transfer learning from the layers you choose.

The public API, for notebooks and scripts (the ``layertap`` command calls the same functions)::

    from pipeline import ExtractSettings, extract_features, ClassifySettings, classify, \\
        FinetuneSettings, finetune, predict, FeatureStore

    store = extract_features(ExtractSettings(data="photos/", weights="imagenet")).store_path
    run_dir, rows, models = classify(ClassifySettings(store=str(store), classifiers=("logreg",)))
    model_dir, metrics = finetune(FinetuneSettings(store=str(store)))
    predict(model_dir, ["new.jpg"])

The stages stand side by side on shared ground (README, "Layout"): :mod:`pipeline.extract`,
:mod:`pipeline.classification`, :mod:`pipeline.finetuning` and :mod:`pipeline.prediction` import
:mod:`pipeline.backbones`, :mod:`pipeline.store`, :mod:`pipeline.manifest`, :mod:`pipeline.splits`,
:mod:`pipeline.artifacts` and :mod:`pipeline.evaluation`, never each other. Names are imported on
first use, so ``import pipeline`` loads neither Keras nor scikit-learn.
"""

import importlib
import os
import platform
import sys
import tempfile
from contextlib import contextmanager

__version__ = "0.1.0"

# name -> module of the public API, imported when first asked for.
_API = {
    "ExtractSettings": "pipeline.extract", "extract_features": "pipeline.extract",
    "ClassifySettings": "pipeline.classification", "classify": "pipeline.classification",
    "sweep": "pipeline.classification",
    "FinetuneSettings": "pipeline.finetuning", "finetune": "pipeline.finetuning",
    "predict": "pipeline.prediction",
    "FeatureStore": "pipeline.store", "StoreManifest": "pipeline.manifest",
    "load_model": "pipeline.artifacts",
}
__all__ = ["LayertapError", "set_backend_defaults", "import_keras", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


class LayertapError(Exception):
    """An error a user can act on: its message names the input and the fix."""


def set_backend_defaults() -> None:
    """Environment defaults read when Keras loads TensorFlow; call before the first ``import keras``.

    An explicit setting always wins. ``python -m pipeline`` and the ``layertap`` command call this.

    - TensorFlow's C++ start-up messages are hidden (they bury our summary; real failures still raise).
    - TensorFlow turns its oneDNN kernels on by default only on x86 CPUs with AVX-512 VNNI, BF16 or AMX.
      On an AVX2-only CPU (a 2-core AMD EPYC) they run VGG16 in float32 about 1.2x faster than the Eigen
      kernels TensorFlow otherwise uses (bench/NOTES.md), so they are on for every x86-64 CPU.
    - On a GPU, TensorFlow takes its memory as it needs it instead of nearly all of it at the first op,
      which would leave none to a GPU decoder in the same process (``--decoder dali`` or ``nvjpeg``).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    if platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def import_keras():
    """``import keras``, with the backend's C++ start-up lines kept off the console.

    TensorFlow 2.21 writes absl lines ("All log messages before absl::InitializeLog() ...",
    "oneDNN custom operations are on ...", "Could not find cuda drivers ...") straight to file
    descriptor 2 while it loads, whatever ``TF_CPP_MIN_LOG_LEVEL`` says. They are captured while
    Keras imports and shown only if the import fails. ``LAYERTAP_VERBOSE=1`` (``layertap -v``)
    shows them as they come.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    if os.environ.get("LAYERTAP_VERBOSE"):
        import keras
        return keras
    with _stderr_captured() as captured:
        try:
            import keras
        except BaseException:
            captured.replay = True
            raise
    return keras


@contextmanager
def _stderr_captured():
    """Send file descriptor 2 to a temporary file for the block; replay it if ``.replay`` is set."""
    class Captured:
        replay = False

    captured = Captured()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (an embedded interpreter)
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if captured.replay:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))
