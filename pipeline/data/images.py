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
import posixpath
import stat
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
# The largest file read as one image: far above any photo (an 89-megapixel 16-bit PNG is under 600 MB), and a
# bound on what one bad file (a disk image, a video) can take before it is refused.
MAX_FILE_BYTES = 1 << 30
# What read_file takes in its first read: most photos whole; of a large file, enough to see what it is.
FIRST_READ = 1 << 18
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
                root: str | os.PathLike | None = None, allow_outside_root: bool = False) -> ImageList:
    """List the images of a data set without opening them.

    Args:
        data: A folder of class folders, a folder of ``train``/``val``/``test`` folders
            of class folders, or a CSV file with a ``path,label[,split]`` header.
        split_file: A CSV with the same header listing the images of ``data`` (a folder)
            with their labels and splits, such as ``flowers17-split.csv``.
        root: The folder that a CSV's paths are relative to (default: the CSV's folder).
        allow_outside_root: Read CSV paths that lead outside the root (absolute, or up through ``..``); without
            it they are listed as skipped and never opened.

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
        return _from_csv(Path(split_file), data, data.name, allow_outside_root)
    if data.is_file():
        return _from_csv(data, Path(root) if root else data.parent, data.stem, allow_outside_root)
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


def _from_csv(csv_path: Path, root: Path, name: str, allow_outside_root: bool = False) -> ImageList:
    if not csv_path.is_file():
        raise FileNotFoundError(f"split file {str(csv_path)!r} does not exist")
    with open(csv_path, "rb") as fh:
        fmt = sniff_format(fh.read(16))
    if fmt:
        raise LayertapError(f"{csv_path} is a {fmt} image, not a CSV of path,label[,split]; --data takes a folder "
                            "of class folders, a folder of train/val/test folders, or such a CSV")
    # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "path" not in fields or "label" not in fields:
            raise LayertapError(f"{csv_path}: header is {','.join(fields) or '(empty)'}; "
                                "it must be path,label or path,label,split")
        records: dict[str, ImageRecord] = {}
        skipped: list[Skipped] = []
        for line, row in enumerate(reader, start=2):
            path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            split = (row.get("split") or "").strip().lower()
            if not path or not label:
                raise LayertapError(f"{csv_path}:{line}: empty path or label")
            if split and split not in SPLITS:
                raise LayertapError(f"{csv_path}:{line}: split {split!r} is not one of {', '.join(SPLITS)}")
            normal = posixpath.normpath(path.replace(os.sep, "/"))  # ./a/b.jpg, a//b.jpg, a/x/../b.jpg: a/b.jpg
            if normal in records:
                raise LayertapError(f"{csv_path}:{line}: {path} is listed twice (as {records[normal].path}); "
                                    "one image must have one label and one split")
            if not allow_outside_root and (posixpath.isabs(normal) or normal.split("/")[0] == ".."):
                skipped.append(Skipped(path, f"outside the root folder {root}; --allow-outside-root reads it"))
                continue
            records[normal] = ImageRecord(normal, label, split)
    ordered = tuple(sorted(records.values(), key=lambda r: r.path))
    return ImageList(root, ordered, tuple(sorted({r.label for r in ordered})), tuple(skipped), name)


def _files_under(folder: str):
    """``(path, True)`` for each file below ``folder``, ``(path, False)`` for each link that gives none and for
    each named pipe, device or socket (they are skipped with a reason, never read).

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
                else:
                    yield entry.path, False


def _link_problem(path: Path) -> str:
    """Why an entry gives no file: a link that loops or leads nowhere, or a named pipe, device or socket."""
    import errno

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
    return _not_regular(mode)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def fingerprint(data: bytes) -> str:
    """The content hash a store records for each image file (blake2b-128, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def open_regular(path: os.PathLike, buffered: bool = True):
    """``path`` opened for reading if it is a regular file, with its ``os.stat_result``: a named pipe, device or
    socket is refused before any read (a pipe with no writer would block the run for good; ``/dev/zero``
    would fill the memory).

    Opened without blocking, then checked on the open file (``fstat``), so a path swapped for a pipe after a
    ``stat`` is caught too. ``buffered=False`` gives the raw file (one system call a read).

    Raises:
        BadImageError: it cannot be opened, or it is not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadImageError(f"cannot read: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BadImageError(_not_regular(st.st_mode))
    return os.fdopen(fd, "rb", buffering=-1 if buffered else 0), st


def file_kind(mode: int) -> str:
    """What an ``st_mode`` is, in words: ``a named pipe``, ``a folder``, ``a regular file``..."""
    kinds = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
             stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder", stat.S_IFREG: "a regular file"}
    return kinds.get(stat.S_IFMT(mode), "a special file")


def _not_regular(mode: int) -> str:
    """Why a named pipe, device, socket or folder is not read as an image."""
    return f"not a regular file ({file_kind(mode)}); only files are read"


def read_file(path: os.PathLike, head_reason: Callable[[bytes], str | None] | None = None) -> bytes:
    """A regular file's bytes, at most :data:`MAX_FILE_BYTES` of them.

    Read in one system call where the file is small (the scan's hot path: one per image), else its first
    :data:`FIRST_READ` bytes and then the rest, so that ``head_reason`` can refuse a large file unread.

    Args:
        head_reason: Given the first 16 bytes, why the file is not wanted (then the rest is not read), or None.

    Raises:
        BadImageError: it cannot be read, is not a regular file, is empty or too large, or ``head_reason`` says.
    """
    file, st = open_regular(path, buffered=False)
    with file:
        if st.st_size > MAX_FILE_BYTES:
            raise BadImageError(f"{st.st_size:,} bytes: over the {MAX_FILE_BYTES:,}-byte limit of one image file")
        try:
            data = file.read(min(st.st_size, FIRST_READ) + 1)  # a small file whole, its end seen in the same call
            if data and head_reason and (reason := head_reason(data[:16])):
                raise BadImageError(reason)
            if len(data) != st.st_size:  # a larger file, a short read, or one that grew since the stat
                data += file.readall()
        except OSError as exc:
            raise BadImageError(f"cannot read: {exc.strerror or exc}") from None
    if not data:
        raise BadImageError("empty file")
    if len(data) > MAX_FILE_BYTES:  # it grew past the limit while it was read
        raise BadImageError(f"over the {MAX_FILE_BYTES:,}-byte limit of one image file")
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
