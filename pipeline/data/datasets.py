"""Public data sets: the Oxford 17 Category Flower Dataset, fetched from its official page."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.core.errors import LayertapError

FLOWERS17_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/17/17flowers.tgz"
FLOWERS17_MD5 = "b59a65d8d1a99cd66944d474e1289eab"
# Images 1-80 are the first class, 81-160 the second, and so on (the dataset page's order).
FLOWERS17_CLASSES = ("daffodil", "snowdrop", "lilyvalley", "bluebell", "crocus", "iris", "tigerlily",
                     "tulip", "fritillary", "sunflower", "daisy", "coltsfoot", "dandelion", "cowslip",
                     "buttercup", "windflower", "pansy")


def fetch_flowers17(dest: str | os.PathLike, archive: str | os.PathLike | None = None,
                    progress: bool = True) -> Path:
    """Download (or take a local copy of) ``17flowers.tgz``, check it, unpack it into class folders.

    Args:
        dest: Folder to create, holding one folder per class.
        archive: A local ``17flowers.tgz`` to use instead of downloading.

    Raises:
        LayertapError: no network and no archive, or a checksum mismatch.
    """
    dest = Path(dest)
    if dest.is_dir() and sum(1 for _ in dest.glob("*/*.jpg")) == 1360:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if archive is None:
        archive = dest.parent / "17flowers.tgz"
        if not archive.exists():
            _download(FLOWERS17_URL, archive, progress)
    archive = Path(archive)
    digest = hashlib.md5(archive.read_bytes(), usedforsecurity=False).hexdigest()
    if digest != FLOWERS17_MD5:
        raise LayertapError(f"{archive} has md5 {digest}, expected {FLOWERS17_MD5}: a damaged or different "
                            "file; delete it and fetch again")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if not (member.isfile() and name.startswith("image_") and name.endswith(".jpg")):
                continue
            label = FLOWERS17_CLASSES[(int(name[6:10]) - 1) // 80]
            (tmp / label).mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(tmp / label / name, "wb") as out:
                shutil.copyfileobj(src, out)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _download(url: str, target: Path, progress: bool) -> None:
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
            from tqdm.auto import tqdm
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise LayertapError(
            f"cannot download {url} ({exc}). Offline? Copy 17flowers.tgz (md5 {FLOWERS17_MD5}) from a "
            "machine with a network and run: layertap fetch flowers17 --archive PATH/17flowers.tgz. "
            "On the project's machines the photos are already in ../shared/data/flowers17.") from exc
    os.replace(part, target)
