"""The embedded sample set: a small texture data set built offline on first use.

Four classes (brick, grass, gravel, moon surface) of random crops of the photographs
that scikit-image ships, split into ``train/``, ``val/`` and ``test/`` folders. Crops of
one photograph differ in position, scale, flip and rotation, so a classifier must
recognise the texture, not memorise an image. It exists so that ``make demo`` runs the
whole pipeline on a fresh machine without a network.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import LayertapError

SAMPLE_VERSION = 1
CLASSES = ("brick", "grass", "gravel", "moon")
PER_SPLIT = {"train": 12, "val": 4, "test": 4}


def default_sample_dir() -> Path:
    """``$LAYERTAP_SAMPLE_DIR``, else ``~/.cache/layertap/sample-v<N>``."""
    if os.environ.get("LAYERTAP_SAMPLE_DIR"):
        return Path(os.environ["LAYERTAP_SAMPLE_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "layertap" / f"sample-v{SAMPLE_VERSION}"


def ensure_sample(dest: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Build the sample set at ``dest`` unless it is already there; return its folder.

    Raises:
        LayertapError: scikit-image (which ships the photographs) is not installed.
    """
    dest = Path(dest) if dest else default_sample_dir()
    if (dest / ".complete").exists():
        return dest
    try:
        from skimage import data as photos
    except ImportError as exc:
        raise LayertapError("the sample set is built from scikit-image's photographs: "
                            "pip install 'layertap[offline]' (or scikit-image)") from exc
    rng = np.random.default_rng(seed)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in CLASSES:
        source = np.asarray(getattr(photos, name)())
        for split, count in PER_SPLIT.items():
            folder = tmp / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _crop(source, rng).save(folder / f"{name}_{i:02d}.jpg", quality=92)
    (tmp / ".complete").write_text(f"layertap sample v{SAMPLE_VERSION}, seed {seed}\n")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def _crop(source: np.ndarray, rng: np.random.Generator) -> Image.Image:
    height, width = source.shape[:2]
    side = int(rng.integers(min(height, width) // 4, min(height, width) * 5 // 8))
    top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
    patch = source[top:top + side, left:left + side]
    patch = np.rot90(patch, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(patch)).convert("RGB")
