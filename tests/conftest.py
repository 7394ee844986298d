"""Shared fixtures: generated image folders (good and bad files) and tiny extraction settings."""

from __future__ import annotations

import os
import signal
import struct
import zlib
from pathlib import Path

from pipeline import set_backend_defaults

# Before any test imports Keras: the tests compute with the kernels the layertap command uses, so a
# result from a CLI subprocess and one from this process agree bit for bit.
set_backend_defaults()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data.decoding import SEGMENT_PREFIX  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def photo(colour, size=(48, 40), seed=0) -> Image.Image:
    """A small noisy image of one dominant colour, different for each seed."""
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float64)
    noise = rng.normal(0, 30, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but holds no image data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def make_class_folder(root: Path, per_class: int = 4, fmt: str = "JPEG") -> Path:
    """``root/<colour>/img_<i>.<ext>`` for three colour classes."""
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for c, (name, colour) in enumerate(COLOURS.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(colour, seed=100 * c + i).save(folder / f"img_{i}.{ext}", fmt)
    return root


def make_split_folder(root: Path, train: int, val: int, test: int) -> Path:
    """``root/<split>/<colour>/img_<i>.jpg`` with the given images per class in each split."""
    for split, n in (("train", train), ("val", val), ("test", test)):
        make_class_folder(root / split, per_class=n)
    return root


def add_bad_files(root: Path, label: str = "red") -> dict[str, str]:
    """Add one bad file of each kind to a class folder; return name -> expected reason fragment."""
    folder = root / label
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image\n")
    good = folder / "img_0.jpg"
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    return {"empty.jpg": "empty file", "notes.jpg": "not an image", "truncated.jpg": "cannot decode",
            "bomb.png": "decompression bomb"}


@pytest.fixture
def class_folder(tmp_path) -> Path:
    return make_class_folder(tmp_path / "data")


@pytest.fixture
def split_folder(tmp_path) -> Path:
    return make_split_folder(tmp_path / "splits", train=3, val=1, test=2)


def tiny_settings(data, out, **overrides):
    """Settings for a fast extraction: random VGG16 weights, 32 px images, tiny shards."""
    from pipeline.extraction.extract import ExtractSettings

    values = dict(data=str(data), out_dir=str(out), weights="random", image_size=32,
                  layers=("block1_pool", "block2_pool"), batch_size=4, shard_size=4, workers=2,
                  progress=False)
    values.update(overrides)
    return ExtractSettings(**values)


def backend_interpreter(backend: str) -> Path:
    """The Python of the virtual environment ``make test`` builds for a Keras backend without TensorFlow
    (``.venv-jax``, ``.venv-torch``), or ``LAYERTAP_<BACKEND>_PYTHON``; the test is skipped where there is none."""
    path = Path(os.environ.get(f"LAYERTAP_{backend.upper()}_PYTHON", ROOT / f".venv-{backend}" / "bin" / "python"))
    if not path.exists():
        pytest.skip(f"no {backend} interpreter at {path} (make test builds .venv-{backend}; set "
                    f"LAYERTAP_{backend.upper()}_PYTHON to another one)")
    return path


@pytest.fixture
def flowers17() -> Path:
    folder = SHARED_DATA / "flowers17"
    if not (folder.is_dir() and (SHARED_DATA / "flowers17-split.csv").is_file()):
        pytest.skip("../shared/data/flowers17 is not present on this machine")
    return folder


def processes_marked(mark: str) -> list[int]:
    """Processes whose environment holds ``mark`` (a run and every process it started, workers included)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if mark.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def leaked_segments(pids) -> set[str]:
    """The decoding segments in /dev/shm that processes ``pids`` made and did not free. Exact: a segment is
    named after the process that made it (:data:`pipeline.data.decoding.SEGMENT_PREFIX`), so another test's or
    another program's segments are never blamed on these processes."""
    if not os.path.isdir("/dev/shm"):
        return set()
    owners = {f"{SEGMENT_PREFIX}{pid}-" for pid in pids}
    return {name for name in os.listdir("/dev/shm") if name.startswith(tuple(owners))} if owners else set()


def interruptible() -> None:
    """``preexec_fn`` of a child that a test sends Ctrl-C: the default SIGINT. A shell starts background jobs
    with SIGINT ignored and the child would inherit that (`make test &`), so the test would fail there."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
