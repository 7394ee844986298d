"""Facts about the running Keras and machine: backend, versions, precision, accelerators.

Answered without importing Keras where possible (the backend from ``KERAS_BACKEND`` or
``keras.json``, versions from package metadata, a GPU from the device nodes), so that commands
that run no network (``inspect``, a cache hit, stage two with scikit-learn classifiers) never
load TensorFlow.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import platform
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from pipeline.core.settings import check_choice

__version__ = "0.1.0"  # layertap's; setup.cfg says the same

# Compute precision of the backbone -> Keras dtype policy (variables stay float32).
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
PRECISION_CHOICES = ("auto", *PRECISIONS)


def keras_home() -> Path:
    """Keras's folder (``$KERAS_HOME``, else ``~/.keras``, else ``/tmp/.keras``), found as Keras finds it."""
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"])
    home = os.path.expanduser("~")
    return Path(home if os.access(home, os.W_OK) else "/tmp") / ".keras"


def keras_backend() -> str:
    """The Keras backend that ``import keras`` selects (or has selected), without importing Keras.

    Keras reads ``KERAS_BACKEND``, else ``backend`` in ``keras.json``, else uses tensorflow.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"].config.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    try:
        return json.loads((keras_home() / "keras.json").read_text()).get("backend") or "tensorflow"
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def keras_version() -> str:
    if "keras" in sys.modules:
        return sys.modules["keras"].__version__
    return metadata.version("keras")


# The backends whose CPU convolutions run bfloat16 on the CPU's bfloat16 units (oneDNN under TensorFlow and
# torch). XLA's CPU backend (JAX) does not: there bfloat16 measured no faster than float32 (bench/NOTES.md).
CPU_BFLOAT16_BACKENDS = ("tensorflow", "torch")


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bfloat16`` on a GPU, or on a CPU with bfloat16 matrix units where the Keras backend uses
    them (:data:`CPU_BFLOAT16_BACKENDS`); else ``float32``.

    bfloat16 on a CPU with AMX or AVX512-BF16 runs VGG16 several times faster than float32 on TensorFlow and
    torch and gives the same linear-probe accuracy within one test image on flowers17 (bench/README.md).
    On JAX's CPU backend it is no faster, so ``auto`` keeps float32 there.

    Raises:
        ValueError: an unknown precision.
    """
    check_choice("precision", precision, PRECISION_CHOICES)
    if precision != "auto":
        return precision
    cpu_bfloat16 = keras_backend() in CPU_BFLOAT16_BACKENDS and _cpu_has_bf16()
    return "bfloat16" if cpu_bfloat16 or on_gpu() else "float32"


def on_gpu() -> bool:
    """Whether the Keras backend computes on an accelerator.

    On Linux with no accelerator device node (NVIDIA, AMD, TPU) the answer is no without loading
    Keras, so a cache hit on a CPU machine never imports the backend.
    """
    if not _accelerator_device_nodes():
        return False
    keras = import_keras()
    if keras.config.backend() == "torch":  # keras.distribution has no device list on torch
        import torch
        return bool(torch.cuda.is_available())
    devices = keras.distribution.list_devices() or []
    return any(not device.lower().startswith("cpu") for device in devices)


def _accelerator_device_nodes() -> bool:
    """False only where an accelerator is surely absent: Linux without NVIDIA, AMD or TPU device nodes."""
    if not sys.platform.startswith("linux"):
        return True
    patterns = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel*", "/dev/vfio/[0-9]*")
    return any(glob.glob(pattern) for pattern in patterns)


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:  # not Linux: stay exact
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def versions() -> dict[str, str]:
    """Versions of layertap, Python and the packages that change the numbers, for manifests."""
    found = {"layertap": __version__, "python": platform.python_version()}
    for package in ("keras", "tensorflow", "jax", "torch", "numpy", "h5py", "pillow", "scikit-learn"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


@contextmanager
def collector_paused():
    """Python's cycle collector off for the block (a decorator too): for listing and a cache hit's scan, which
    make objects a file and no reference cycles. Its passes over the growing heap made a cache-hit scan
    slower, the more so the more files (bench/NOTES.md)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def set_backend_defaults() -> None:
    """Environment defaults read when Keras loads TensorFlow; call before the first ``import keras``.

    An explicit setting always wins. ``python -m pipeline`` and the ``layertap`` command call this.

    - TensorFlow's C++ start-up messages are hidden (they bury our summary; real failures still raise).
    - TensorFlow turns its oneDNN kernels on by default only on x86 CPUs with AVX-512 VNNI, BF16 or AMX.
      On an AVX2-only CPU (a 2-core AMD EPYC) they ran VGG16 in float32 faster than the Eigen kernels
      TensorFlow otherwise uses (bench/NOTES.md), so they are on for every x86-64 CPU.
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


def stop_on_sigterm():
    """SIGTERM (``kill``, a scheduler's stop) stops the command as Ctrl-C does: the same clean-up, committed work
    kept. Installed only where SIGTERM has its default action (a host program's own handler is left alone).

    Returns:
        A function that says whether SIGTERM was received.
    """
    received = []

    def stop(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)
    return lambda: bool(received)
