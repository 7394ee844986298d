"""Pooling a tapped feature map ``(H, W, C)`` into one vector per image.

``avg`` and ``max`` give C features, ``avgmax`` 2C, ``gridN`` averages over an N x N
grid of cells (N*N*C features, the linear-evaluation protocol's way of keeping early
layers affordable) and ``flatten`` keeps every activation (H*W*C: the tutorials'
choice, and the source of billion-parameter Dense heads on early layers).
"""

from __future__ import annotations

import math
import re

from pipeline.core.runtime import import_keras

POOLING_MODES = ("avg", "max", "avgmax", "gridN", "flatten")
# Above this many features per image, flatten gets a warning with the cost it implies.
FLATTEN_WARN_FEATURES = 65_536
REFERENCE_HEAD_UNITS = 256


def parse_pooling(mode: str) -> str:
    """Validate a pooling name and return it normalised (``grid2``, ``avg`` ...).

    Raises:
        ValueError: the name is not one of :data:`POOLING_MODES`.
    """
    normalised = str(mode).strip().lower()
    if normalised in ("avg", "max", "avgmax", "flatten"):
        return normalised
    match = re.fullmatch(r"grid([1-9][0-9]?)", normalised)
    if match:
        return f"grid{int(match.group(1))}"
    raise ValueError(f"pooling={mode!r} is not known; use one of: avg, max, avgmax, "
                     "gridN (N = 1..99, e.g. grid2), flatten")


def grid_cells(mode: str) -> int:
    """N of ``gridN``; 0 for the other modes."""
    return int(mode[4:]) if mode.startswith("grid") else 0


def pooled_dims(mode: str, shape: tuple[int, int, int]) -> int:
    """Features per image that ``mode`` makes of a ``(H, W, C)`` map."""
    height, width, channels = shape
    if mode in ("avg", "max"):
        return channels
    if mode == "avgmax":
        return 2 * channels
    if mode == "flatten":
        return height * width * channels
    cells = grid_cells(mode)
    return cells * cells * channels


def dense_params(features: int, units: int = REFERENCE_HEAD_UNITS) -> int:
    """Parameters of a ``Dense(units)`` layer on ``features`` inputs (weights and biases)."""
    return features * units + units


def grid_bounds(length: int, cells: int) -> list[tuple[int, int]]:
    """Cell boundaries along one axis, as adaptive average pooling draws them."""
    return [(math.floor(i * length / cells), math.ceil((i + 1) * length / cells)) for i in range(cells)]


def flatten_warning(tap: str, shape: tuple[int, int, int], mode: str) -> str | None:
    """A warning that states what ``mode`` costs on this tap, or None when it is cheap."""
    features = pooled_dims(mode, shape)
    if mode != "flatten" or features <= FLATTEN_WARN_FEATURES:
        return None
    height, width, channels = shape
    return (f"pooling=flatten on {tap} ({height}x{width}x{channels}) gives {features:,} features per "
            f"image ({features * 4 / 1e6:.1f} MB in float32); a Dense({REFERENCE_HEAD_UNITS}) head on "
            f"it has {dense_params(features):,} parameters. pooling=avg gives {channels:,} features "
            f"and pooling=grid2 {4 * channels:,}.")


def pool_tensor(x, mode: str):
    """Pool a ``(B, H, W, C)`` tensor with Keras ops (any backend)."""

    ops = import_keras().ops

    if mode == "avg":
        return ops.mean(x, axis=(1, 2))
    if mode == "max":
        return ops.max(x, axis=(1, 2))
    if mode == "avgmax":
        return ops.concatenate([ops.mean(x, axis=(1, 2)), ops.max(x, axis=(1, 2))], axis=-1)
    if mode == "flatten":
        return ops.reshape(x, (-1, math.prod(x.shape[1:])))
    cells = grid_cells(mode)
    height, width = x.shape[1], x.shape[2]
    pooled = [ops.mean(x[:, h0:h1, w0:w1, :], axis=(1, 2))
              for h0, h1 in grid_bounds(height, cells) for w0, w1 in grid_bounds(width, cells)]
    return ops.concatenate(pooled, axis=-1)
