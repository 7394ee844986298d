"""The embedded sample set: a small texture data set built offline on first use.

Four classes (brick, grass, gravel, moon surface) of crops of the photographs that
scikit-image ships, split into ``train/``, ``val/`` and ``test/`` folders. It exists so
that ``make demo`` runs the whole pipeline on a fresh machine without a network, and it is
made hard enough that the answer to "which layer?" shows in the demo's tables:

- **No leakage.** Each photograph is cut into a 4x4 grid of tiles and every tile belongs
  to one split (10 train, 3 val, 3 test), so no test pixel was ever in a training crop.
- **Scale.** A crop is 35-100% of a tile's side (45-128 px of a 512 px photograph),
  scaled up to the model's input size: fine grain for one crop, coarse for the next.
- **Nuisances.** Rotation by quarter turns, mirroring, contrast and brightness changes,
  sometimes a blur, JPEG qualities from 70 to 94.

Version 1 (random overlapping crops, no photometric change) scored 1.000 at every layer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from pipeline.core.errors import LayertapError

SAMPLE_VERSION = 2
CLASSES = ("brick", "grass", "gravel", "moon")
PER_SPLIT = {"train": 16, "val": 8, "test": 16}
GRID = 4
TILES = {"test": 3, "val": 3}  # the rest of the GRID x GRID tiles are train's


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
        for split, tiles in split_tiles(source.shape[:2], rng).items():
            folder = tmp / split / name
            folder.mkdir(parents=True)
            for i in range(PER_SPLIT[split]):
                image = _crop(source, tiles[int(rng.integers(len(tiles)))], rng)
                image.save(folder / f"{name}_{i:02d}.jpg", quality=int(rng.integers(70, 95)))
    (tmp / ".complete").write_text(f"layertap sample v{SAMPLE_VERSION}, seed {seed}\n")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def split_tiles(shape: tuple[int, int], rng: np.random.Generator) -> dict[str, list[tuple[int, int, int, int]]]:
    """Each split's tiles of a photograph of ``shape``, as (top, left, height, width); no tile in two splits."""
    height, width = shape[0] // GRID, shape[1] // GRID
    tiles = [(row * height, col * width, height, width) for row in range(GRID) for col in range(GRID)]
    order = [tiles[i] for i in rng.permutation(len(tiles))]
    test, val = TILES["test"], TILES["val"]
    return {"train": order[test + val:], "val": order[test:test + val], "test": order[:test]}


def _crop(source: np.ndarray, tile: tuple[int, int, int, int], rng: np.random.Generator) -> Image.Image:
    top, left, height, width = tile
    side = int(rng.uniform(0.35, 1.0) * min(height, width))
    top += int(rng.integers(0, height - side + 1))
    left += int(rng.integers(0, width - side + 1))
    patch = np.rot90(source[top:top + side, left:left + side], int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    image = Image.fromarray(np.ascontiguousarray(patch)).convert("RGB")
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return image
