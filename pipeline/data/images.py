"""Finding images: the image list, content fingerprints, skip reasons (headers: :mod:`pipeline.data.headers`;
decoding: :mod:`pipeline.data.decoding`).

An image list comes from a folder of class folders, a folder of ``train/`` ``val/``
``test/`` folders of class folders, or a CSV of ``path,label[,split]``. Files are
recognised by their first bytes, not their extension. Nothing here raises on a bad
image: it is reported as a :class:`Skipped` record with the reason.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.core.errors import LayertapError
from pipeline.core.runtime import collector_paused
from pipeline.data.headers import sniff_format

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RESIZE_MODES = ("squash", "crop")
# Pillow's own limit (about 89 megapixels); larger images are treated as decompression bombs.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# We check the pixel count ourselves before decoding and skip with a reason, so Pillow's
# warning for the same images would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

@dataclass(frozen=True)
class ImageRecord:
    """One image of the list: its path relative to the data root, label and split."""

    path: str
    label: str
    split: str = ""
    fingerprint: str = ""
    format: str = ""
    # (size, mtime_ns) when the scan read or stat'ed it: decoding checks the file still has them.
    stat: tuple[int, int] | None = field(default=None, compare=False)
    # (width, height, EXIF orientation) of a JPEG the GPU decoders take (pipeline.data.headers.gpu_jpeg), from
    # the scan: DALI then reads the file itself, with no Python per file.
    jpeg: tuple[int, int, int] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Skipped:
    """A file that was left out, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ImageList:
    """The images of a data set, sorted by path, with the class names they use."""

    root: Path
    records: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    skipped: tuple[Skipped, ...] = ()
    name: str = "data"

    def __len__(self) -> int:
        return len(self.records)

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.class_names, 0)
        for record in self.records:
            counts[record.label] += 1
        return counts


class BadImageError(Exception):
    """An image that cannot be used; the message is the reason recorded for it."""


@collector_paused()
def find_images(data: str | os.PathLike, split_file: str | os.PathLike | None = None,
                root: str | os.PathLike | None = None) -> ImageList:
    """List the images of a data set without opening them.

    Args:
        data: A folder of class folders, a folder of ``train``/``val``/``test`` folders
            of class folders, or a CSV file with a ``path,label[,split]`` header.
        split_file: A CSV with the same header listing the images of ``data`` (a folder)
            with their labels and splits, such as ``flowers17-split.csv``.
        root: The folder that a CSV's paths are relative to (default: the CSV's folder).

    Returns:
        The image list; files that are not in a class folder are listed as skipped.

    Raises:
        FileNotFoundError: ``data`` or ``split_file`` does not exist.
        LayertapError: the layout is not one of the above, or the CSV is malformed.
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"data {str(data)!r} does not exist; give a folder of class "
                                "folders or a CSV of path,label[,split]")
    if split_file is not None:
        if not data.is_dir():
            raise LayertapError(f"--split-file needs --data to be the image folder, got file {data}")
        return _from_csv(Path(split_file), data, name=data.name)
    if data.is_file():
        return _from_csv(data, Path(root) if root else data.parent, name=data.stem)
    return _from_folder(data)


def _from_folder(root: Path) -> ImageList:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise LayertapError(f"{root} has no class folders; put each class's images in a folder "
                            "named after the class (or give a CSV of path,label[,split])")
    split_dirs = [p for p in subdirs if p.name.lower() in SPLITS]
    entries: list[tuple[Path, str, str]] = []  # (file, label, split)
    skipped: list[Skipped] = []
    if split_dirs:
        other = [p.name for p in subdirs if p not in split_dirs]
        if other:
            raise LayertapError(f"{root} mixes split folders ({', '.join(p.name for p in split_dirs)}) "
                                f"with other folders ({', '.join(other)}); use one layout")
        groups = [(p, p.name.lower()) for p in split_dirs]
    else:
        groups = [(root, "")]
    for group_dir, split in groups:
        for item in sorted(group_dir.iterdir()):
            if item.name.startswith("."):
                continue
            if item.is_file():
                skipped.append(Skipped(_rel(item, root), "not in a class folder"))
                continue
            if not item.is_dir():  # a link that leads nowhere
                skipped.append(Skipped(_rel(item, root), _link_problem(item)))
                continue
            found = 0
            for path, is_file in sorted(_files_under(str(item))):
                if is_file:
                    entries.append((path, item.name, split))
                    found += 1
                else:
                    skipped.append(Skipped(_rel(Path(path), root), _link_problem(Path(path))))
            if not found:
                skipped.append(Skipped(_rel(item, root) + "/", "empty class folder: the class is left out"))
    prefix = len(str(root).rstrip(os.sep)) + 1
    records = tuple(sorted((ImageRecord(p[prefix:].replace(os.sep, "/"), label, split) for p, label, split in entries),
                           key=lambda r: r.path))
    return ImageList(root, records, tuple(sorted({r.label for r in records})), tuple(skipped), root.name)


def _from_csv(csv_path: Path, root: Path, name: str) -> ImageList:
    if not csv_path.is_file():
        raise FileNotFoundError(f"split file {str(csv_path)!r} does not exist")
    with open(csv_path, "rb") as fh:
        fmt = sniff_format(fh.read(16))
    if fmt:
        raise LayertapError(f"{csv_path} is a {fmt} image, not a CSV of path,label[,split]; --data takes a folder "
                            "of class folders, a folder of train/val/test folders, or such a CSV")
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "path" not in fields or "label" not in fields:
            raise LayertapError(f"{csv_path}: header is {','.join(fields) or '(empty)'}; "
                                "it must be path,label or path,label,split")
        records: dict[str, ImageRecord] = {}
        for line, row in enumerate(reader, start=2):
            path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            split = (row.get("split") or "").strip().lower()
            if not path or not label:
                raise LayertapError(f"{csv_path}:{line}: empty path or label")
            if split and split not in SPLITS:
                raise LayertapError(f"{csv_path}:{line}: split {split!r} is not one of {', '.join(SPLITS)}")
            if path in records:
                raise LayertapError(f"{csv_path}:{line}: {path} is listed twice")
            records[path] = ImageRecord(Path(path).as_posix(), label, split)
    ordered = tuple(sorted(records.values(), key=lambda r: r.path))
    return ImageList(root, ordered, tuple(sorted({r.label for r in ordered})), (), name)


def _files_under(folder: str):
    """``(path, True)`` for each file below ``folder`` and ``(path, False)`` for each link that gives none.

    Hidden names are left out at any depth; links to folders are followed (as ``Path.rglob`` does).
    ``os.scandir`` reads the entry types with the listing, so a file costs no stat of its own.
    """
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    kind = "dir" if entry.is_dir() else "file" if entry.is_file() else "other"
                except OSError:  # a link loop
                    kind = "other"
                if kind == "dir":
                    stack.append(entry.path)
                elif kind == "file":
                    yield entry.path, True
                elif entry.is_symlink():
                    yield entry.path, False


def _link_problem(path: Path) -> str:
    """Why a symbolic link gives no file: it loops, or its target is missing."""
    import errno

    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
    return "not a file"


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def fingerprint(data: bytes) -> str:
    """The content hash a store records for each image file (blake2b-128, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_file(path: os.PathLike) -> bytes:
    """A file's bytes.

    Raises:
        BadImageError: it cannot be read, or it is empty.
    """
    try:
        with open(path, "rb") as file:  # not Path(path).read_bytes(): building the Path cost a third of a small read
            data = file.read()
    except OSError as exc:
        raise BadImageError(f"cannot read: {exc.strerror or exc}") from None
    if not data:
        raise BadImageError("empty file")
    return data


def or_reason(fn: Callable, item) -> tuple[object | None, str | None]:
    """``(fn(item), None)``, or ``(None, why)`` where ``fn`` raises :class:`BadImageError`."""
    try:
        return fn(item), None
    except BadImageError as exc:
        return None, str(exc)


EMPTY_CLASS = "class left without images: none of its images could be used; the class is left out"


def drop_empty_classes(images: ImageList) -> ImageList:
    """The list without classes that have no usable image; each is named in ``skipped`` (as ``class/``)."""
    empty = [name for name, count in images.class_counts().items() if count == 0]
    if not empty:
        return images
    for name in empty:
        log.warning("class %s of %s has no usable image; it is left out", name, images.root)
    return ImageList(images.root, images.records, tuple(c for c in images.class_names if c not in empty),
                     images.skipped + tuple(Skipped(f"{name}/", EMPTY_CLASS) for name in empty), images.name)
