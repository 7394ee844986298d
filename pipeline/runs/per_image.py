"""Each test and val image's outcome in a model folder: ``per_image.npz``, beside ``metrics.json``.

The predicted class of every test and val image, and the probabilities the page's gallery ranks by, grow with
the store: as JSON lists in ``metrics.json`` they were 15 MB for the 400k test images of a 4 M-row store, and a
Python object per number in every process that wrote or read them. They are arrays here; ``metrics.json``
keeps what a person reads. Folders written before keep them as lists in ``metrics.json``, and
:func:`read_metrics` reads both.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.runs import atomic

FILE = "per_image.npz"
PER_IMAGE = {"predictions": np.int32, "val_predictions": np.int32, "confidence": np.float32,
             "true_probability": np.float32}


def set_apart(model_dir, metrics: dict) -> dict:
    """The per-image arrays of ``metrics`` written to ``model_dir``'s :data:`FILE` (replaced whole); returns the
    rest, for ``metrics.json``."""
    arrays = {name: np.asarray(metrics[name], dtype) for name, dtype in PER_IMAGE.items() if name in metrics}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic.write_bytes(Path(model_dir) / FILE, buffer.getvalue())
    return {name: value for name, value in metrics.items() if name not in PER_IMAGE}


def read_metrics(model_dir) -> dict:
    """A model folder's ``metrics.json`` with its per-image arrays.

    Raises:
        LayertapError: :data:`FILE` cannot be read (named, with what to do). A missing or damaged
            ``metrics.json`` raises as ``json`` and the file system do (callers check for it).
    """
    folder = Path(model_dir)
    metrics = json.loads((folder / "metrics.json").read_text())
    path = folder / FILE
    if path.is_file():
        try:
            with np.load(path) as data:  # no pickles: arrays of numbers only
                metrics.update({name: data[name] for name in data.files if name in PER_IMAGE})
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise LayertapError(f"{path} cannot be read ({exc}); run the command that wrote {folder.name} again "
                                "to write it anew") from None
    return metrics
