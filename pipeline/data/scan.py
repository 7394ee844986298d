"""The scan: every image's content hash and header, and a stat cache so that an unchanged file is not read again.

The cache key of a store covers each image's content hash, so every run must know every file's
hash. Reading and hashing every file on every run makes a cache-hit rerun over ten million images
read the whole data set; Git's index and DVC's state database answer the same question with the
file's stat. So does this: ``(size, mtime_ns, ctime_ns, inode)`` of each file, with the content hash
and header facts read from those bytes, in a snapshot of columns per data root beside the stores
(``<out>/.layertap-stat-cache/<root hash>.npz``). A rerun stats each file and reads only those whose
stat changed; a changed file is hashed again, so new bytes give a new key and are recomputed, never
silently reused. ``--verify`` ignores the cache and reads every file.

As in Git, an entry is trusted only if the file was last modified well before the entry was
written (:data:`RACY_NS`): a file rewritten within the same timestamp tick as its scan, keeping its
size, would otherwise look unchanged. The cache is an optimisation only: when it cannot be read or
written, the scan reads every file, says so once, and the results are the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
import time
import zipfile
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.core.errors import LayertapError
from pipeline.core.evaluation import check_two_classes
from pipeline.core.parallel import default_workers, ordered_map, progress_bar
from pipeline.core.runtime import collector_paused
from pipeline.core.text import plural
from pipeline.data.headers import bomb_reason, gpu_jpeg, jpeg_header, not_an_image, sniff_format
from pipeline.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageList,
    ImageRecord,
    Skipped,
    drop_empty_classes,
    fingerprint,
    or_reason,
    read_file,
)

log = logging.getLogger(__name__)
FOLDER_NAME = ".layertap-stat-cache"  # in the --out folder: one snapshot file per data root
LEGACY_FILE_NAME = ".layertap-stat-cache.sqlite"  # the cache of earlier versions, a row per file: deleted
VERSION = 3  # of the snapshot's layout
STALE_PARTIAL_S = 3600  # a snapshot being written this long ago was left by a killed run (writing takes seconds)
# An entry whose file changed less than this before the entry was written is rehashed (coarse
# timestamps: 2 s on FAT, 1 s on some network filesystems).
RACY_NS = 2_000_000_000
STAT_CHUNK = 2048  # files a scan thread stats at once
# The first files are stat'ed in the calling thread; only if that took longer than this a file (a disk or
# network filesystem answering, not the page cache) are the rest spread over threads.
SLOW_STAT_S = 20e-6


class Probe(NamedTuple):
    """What a file's bytes say: its hash, format and size in pixels, or why it is not an image; and, for a JPEG a
    GPU decoder takes, ``(width, height, EXIF orientation)`` (:func:`pipeline.data.headers.gpu_jpeg`). A tuple: a
    cache hit makes one a file, and a tuple is made in a third of a frozen dataclass's time (0.25 against 0.74 us)."""

    fingerprint: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    reason: str | None = None
    jpeg: tuple[int, int, int] | None = None


def file_stat(path: Path) -> tuple[int, int, int, int] | None:
    """The stat a cache entry is checked against, or None if the file cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def stat_files(paths: list[str], workers: int) -> list[tuple | None]:
    """:func:`file_stat` of each path, in order.

    From the page cache a stat is microseconds, most of it Python holding the GIL, so threads only contend
    and take longer than one (bench/NOTES.md). Where the first
    :data:`STAT_CHUNK` files took over :data:`SLOW_STAT_S` each (a cold disk, a network filesystem),
    the rest are stat'ed on ``workers`` threads, which wait on the filesystem in parallel.
    """
    started = time.perf_counter()
    stats = [file_stat(path) for path in paths[:STAT_CHUNK]]
    if time.perf_counter() - started <= SLOW_STAT_S * len(stats):
        return stats + [file_stat(path) for path in paths[STAT_CHUNK:]]
    chunks = ordered_map(lambda start: [file_stat(path) for path in paths[start:start + STAT_CHUNK]],
                         range(STAT_CHUNK, len(paths), STAT_CHUNK), workers)
    return stats + [stat for chunk in chunks for stat in chunk]


class StatCache:
    """The stat cache of one data root: a snapshot of columns, in one ``.npz`` file per root in ``folder``.

    Kept as columns, not a row per file: at ten million files a row per file was ~6.8 GB of Python
    objects to load (676 bytes a file, measured at 16,384); the columns are ~120 bytes a file, load
    in one read, and are checked against the stats in a few array operations. The snapshot lists the
    files in the order of the last scan, so a rerun over the same listing matches them by position.
    A scan writes a new snapshot (to a temporary file, then renamed over the old one) only when it
    read a file or the listing changed.

    Args:
        folder: Where the cache folder lives (the stores' ``--out`` folder).
        root: The data root; the snapshot is of it (absolute) and its paths are relative to it.
    """

    def __init__(self, folder: str | os.PathLike, root: str | os.PathLike):
        self.root = str(Path(root).resolve())
        self.path = Path(folder) / FOLDER_NAME / (hashlib.blake2b(os.fsencode(self.root), digest_size=8).hexdigest()
                                                  + ".npz")
        self._old: dict[str, np.ndarray] = _EMPTY
        self._looked: tuple[list[str], np.ndarray] | None = None  # the paths last looked up, and their rows
        self._new: dict[str, tuple[tuple, Probe]] = {}
        self._broken = False
        self.started_ns = time.time_ns()
        try:
            if self.path.exists():
                with np.load(self.path, allow_pickle=False) as npz:
                    old = {name: npz[name] for name in _COLUMNS}
                if int(old["version"][0]) == VERSION and _split(old["root"]) == [self.root]:
                    rows = {int(np.count_nonzero(old["paths"] == 0)), len(old["fingerprints"]), len(old["formats"])}
                    if rows != {len(old["numbers"])} or old["numbers"].shape[1:] != (8,):
                        raise ValueError("its columns have different lengths")
                    self._old = old  # an earlier layout's snapshot is not read: its files are read once more
        except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as exc:  # a damaged file
            self._unusable(exc)

    def __len__(self) -> int:
        return len(self._old["numbers"])

    def lookup(self, rels: list[str], stats: list[tuple | None]) -> list[Probe | None]:
        """The cached probe of each file of the listing ``rels`` (paths relative to the root, with their stats now)
        whose stat is the recorded one and whose entry is not racy, else None. :meth:`save` then keeps what
        this found, so ``rels`` is the whole listing."""
        old, n = self._old, len(rels)
        paths = _join(rels)
        if np.array_equal(paths, old["paths"][:len(paths)]):  # the snapshot's listing (first): file i is row i
            rows = np.arange(n)
        else:
            index = {rel: row for row, rel in enumerate(_split(old["paths"]))}
            rows = np.fromiter((index.get(rel, -1) for rel in rels), np.int64, n)
        now = np.array([stat or (-1, -1, -1, -1) for stat in stats], np.int64).reshape(n, 4)
        numbers = old["numbers"][np.maximum(rows, 0)] if len(old["numbers"]) else np.zeros((n, 8), np.int64)
        hit = (rows >= 0) & (numbers[:, :4] == now).all(axis=1) & (now[:, 1] < numbers[:, 4] - RACY_NS)
        rows = np.where(hit, rows, -1)
        self._looked = (rels, rows)
        found = rows[hit]
        hashes, chars = old["fingerprints"][found].tobytes().decode("ascii"), old["fingerprints"].itemsize
        formats, reasons = _split(old["format_names"]), _reasons(old)
        probes: list[Probe | None] = [None] * n
        for k, (i, row, (width, height, orientation), code) in enumerate(zip(
                np.flatnonzero(hit).tolist(), found.tolist(), old["numbers"][found, 5:].tolist(),
                old["formats"][found].tolist())):
            reason = reasons.get(row)
            probes[i] = Probe("" if reason else hashes[chars * k:chars * (k + 1)], formats[code], width, height, reason,
                              (width, height, orientation) if orientation else None)
        return probes

    def remember(self, rel: str, stat: tuple | None, probe: Probe) -> None:
        """Record a probe made from the file's bytes (read after ``stat`` was taken)."""
        if stat is not None:
            self._new[rel] = (stat, probe)

    def save(self) -> None:
        """Write the snapshot: the files of the listing last looked up, in that order, that were found unchanged
        or remembered since; then the files of the root's other listings (another CSV over the same root) that
        are unchanged on disk, so alternating listings stay cache hits (a file gone from the disk is left out).
        Nothing is written when the listing leads the snapshot already (a gone file's row then waits for the
        next write; its stat no longer matches, so it is never used); a failure costs only the next run's
        reads."""
        if self._broken:
            return
        if self._looked is None:
            raise RuntimeError("StatCache.save() writes what lookup() found: look the listing up first")
        old, new, (rels, rows) = self._old, self._new, self._looked
        if not new and len(rows) <= len(old["numbers"]) and (rows == np.arange(len(rows))).all():
            return
        fresh = np.fromiter((rel in new for rel in rels), bool, len(rels))
        keep = fresh | (rows >= 0)
        others = self._other_listings(set(rels))
        rels = [rel for rel, k in zip(rels, keep) if k] + [rel for rel, _ in others]
        rows = np.concatenate([rows[keep], np.array([row for _, row in others], np.int64)])
        fresh = np.concatenate([fresh[keep], np.zeros(len(others), bool)])
        added = [new[rel] for rel, f in zip(rels, fresh) if f]
        names = sorted(set(_split(old["format_names"])) | {probe.format for _, probe in added})
        recode = np.array([names.index(name) for name in _split(old["format_names"])] or [0], np.uint8)
        columns = {"version": np.array([VERSION]), "root": _join([self.root]), "paths": _join(rels),
                   "format_names": _join(names), "numbers": np.zeros((len(rels), 8), np.int64),
                   "fingerprints": np.zeros(len(rels), _HASH), "formats": np.zeros(len(rels), np.uint8)}
        kept = rows[~fresh]
        columns["numbers"][~fresh] = old["numbers"][kept]
        columns["fingerprints"][~fresh] = old["fingerprints"][kept]
        columns["formats"][~fresh] = recode[old["formats"][kept]] if len(kept) else 0
        if added:
            columns["numbers"][fresh] = [(*stat, self.started_ns, probe.width, probe.height,
                                          probe.jpeg[2] if probe.jpeg else 0) for stat, probe in added]
            columns["fingerprints"][fresh] = [probe.fingerprint.encode("ascii") for _, probe in added]
            columns["formats"][fresh] = [names.index(probe.format) for _, probe in added]
        old_reasons = _reasons(old)
        reasons = {i: reason for i, (rel, is_fresh, row) in enumerate(zip(rels, fresh.tolist(), rows.tolist()))
                   if (reason := new[rel][1].reason if is_fresh else old_reasons.get(row))}
        columns["reason_rows"], columns["reasons"] = np.array(list(reasons), np.int64), _join(list(reasons.values()))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(".partial", self.path.name + ".", self.path.parent)
            try:
                with open(handle, "wb") as file:
                    np.savez(file, **columns)
                os.replace(partial, self.path)  # whole or not at all: another run reads the old snapshot or this
            finally:
                Path(partial).unlink(missing_ok=True)
            (self.path.parent.parent / LEGACY_FILE_NAME).unlink(missing_ok=True)
            for stale in self.path.parent.glob(self.path.name + ".*.partial"):  # a killed run's, not a live one's
                with contextlib.suppress(OSError):  # gone already: another run removed it
                    if time.time() - stale.stat().st_mtime > STALE_PARTIAL_S:
                        stale.unlink()
        except OSError as exc:
            self._unusable(exc)
            return
        self._old, self._new, self._looked = columns, {}, (rels, np.arange(len(rels)))  # the listing is the snapshot

    def _other_listings(self, listed: set[str]) -> list[tuple[str, int]]:
        """``(path, row)`` of the snapshot's files outside ``listed`` whose stat is still the recorded one."""
        old = self._old
        if not len(old["numbers"]):
            return []
        others = [(rel, row) for row, rel in enumerate(_split(old["paths"])) if rel not in listed]
        root = Path(self.root)
        return [(rel, row) for rel, row in others
                if file_stat(root / rel) == tuple(old["numbers"][row, :4].tolist())]

    def _unusable(self, exc: Exception) -> None:
        if not self._broken:
            log.warning("the stat cache %s cannot be used (%s): every file is read and hashed, with the same "
                        "results. Delete the file to start a new cache", self.path, exc)
        self._old, self._new, self._broken = _EMPTY, {}, True


def _join(strings: list[str]) -> np.ndarray:
    """Strings (file names: any bytes but NUL) as one array of bytes, NUL between them."""
    return np.frombuffer(os.fsencode("".join(f"{s}\0" for s in strings)), np.uint8)


def _split(joined: np.ndarray) -> list[str]:
    return [os.fsdecode(s) for s in joined.tobytes().split(b"\0")[:-1]]


def _reasons(columns: dict[str, np.ndarray]) -> dict[int, str]:
    """Row -> why that file is not an image, for the rows that have a reason."""
    return dict(zip(columns["reason_rows"].tolist(), _split(columns["reasons"])))


_COLUMNS = ("version", "root", "paths", "numbers", "fingerprints", "formats", "format_names", "reason_rows",
            "reasons")
_HASH = "S32"  # pipeline.data.images.fingerprint: blake2b-128 in hex
# numbers: size, mtime_ns, ctime_ns, inode, the time the entry was made (scanned_ns), width, height, orientation
_EMPTY = {"version": np.array([VERSION]), "root": _join([]), "paths": _join([]), "numbers": np.zeros((0, 8), np.int64),
          "fingerprints": np.zeros(0, _HASH), "formats": np.zeros(0, np.uint8), "format_names": _join([]),
          "reason_rows": np.zeros(0, np.int64), "reasons": _join([])}


def scan_images(images: ImageList, max_pixels: int = DEFAULT_MAX_PIXELS,
                workers: int | None = None, progress: bool = False, cache: StatCache | None = None,
                remote=None, labelled: bool = True) -> ImageList:
    """Fingerprint every file and read its header; keep the usable ones.

    Reads each file once (for its content hash) and its header, but decodes no pixels; with a
    stat cache, only the files whose stat it has not recorded.
    Empty files, files that are not images, unreadable headers and images over
    ``max_pixels`` are moved to ``skipped`` with the reason.

    Args:
        cache: A :class:`StatCache`: files whose stat it has recorded are not
            read again; what is read is recorded.
        remote: ``remote(root, paths)`` probes the files elsewhere (a Ray cluster:
            :meth:`pipeline.extraction.engines.ray.RaySession.probe`) and gives ``[(probe, lasting)]`` in order,
            or None to leave them to this process's threads.
        labelled: False for a prediction job's images (one label for all): one class is then no error.

    Raises:
        LayertapError: no usable image is left, or (``labelled``) fewer than two classes have one.
    """
    records, root, workers = images.records, str(images.root).rstrip(os.sep), workers or default_workers()
    probes: list[Probe | None] = [None] * len(records)
    stats: list[tuple | None] = [None] * len(records)
    if cache is not None:
        with collector_paused():  # objects a file, no cycles; not while reading, where Ray's or threads' may be
            stats = stat_files([root + os.sep + record.path for record in records], workers)
            probes = cache.lookup([record.path for record in records], stats)
    todo = [i for i, probe in enumerate(probes) if probe is None]

    def read(i: int) -> Probe:
        if stats[i] is None:
            stats[i] = file_stat(root + os.sep + records[i].path)
        probe, lasting = probe_file(images.root / records[i].path)
        if cache is not None and lasting:
            cache.remember(records[i].path, stats[i], probe)
        return probe

    probed = remote(root, [records[i].path for i in todo]) if remote and todo else None
    if probed is not None:
        for i, (probe, lasting) in zip(todo, probed):
            probes[i] = probe
            if cache is not None and lasting:
                cache.remember(records[i].path, stats[i], probe)
    else:
        for i, probe in zip(todo, progress_bar(ordered_map(read, todo, workers), total=len(todo), desc="scan",
                                               enabled=progress)):
            probes[i] = probe
    with collector_paused():
        results = [_checked(record, probe, max_pixels, stat) for record, probe, stat in zip(records, probes, stats)]
    if cache is not None:
        cache.save()
    kept = tuple(r for r in results if isinstance(r, ImageRecord))
    skipped = images.skipped + tuple(r for r in results if isinstance(r, Skipped))
    if not kept:
        detail = (f"; {plural(len(skipped), 'file')} skipped, first: {skipped[0].path} ({skipped[0].reason})"
                  if skipped else "")
        if records and all(stat is None for stat in stats):
            detail += (f". No listed file is in {images.root}: a CSV's paths are relative to --root (default: the "
                       "CSV's folder), a --split-file's to --data")
        raise LayertapError(f"no usable images in {images.root}{detail}")
    found = drop_empty_classes(ImageList(images.root, kept, images.class_names, skipped, images.name))
    if labelled:  # a prediction job's images have one label for all
        check_two_classes(found.class_names, str(images.root), [(s.path, s.reason) for s in found.skipped])
    return found


def _checked(record: ImageRecord, probe: Probe, max_pixels: int, stat: tuple | None) -> ImageRecord | Skipped:
    if probe.reason:
        return Skipped(record.path, probe.reason)
    if probe.width * probe.height > max_pixels:
        return Skipped(record.path, bomb_reason(probe.width, probe.height, max_pixels))
    return ImageRecord(record.path, record.label, record.split, probe.fingerprint, probe.format,
                       stat[:2] if stat else None, probe.jpeg)


def probe_file(path: Path):
    """Read a file once: its content hash, format and size in pixels, or why it is not an image.

    Returns:
        The :class:`Probe` and whether it lasts as long as the bytes do (a file that could not be
        read is probed again next time).
    """
    data, reason = or_reason(partial(read_file, head_reason=not_an_image), path)
    if reason:  # what the bytes or the kind of file say lasts; a failed read (permissions, I/O) is tried again
        return Probe(reason=reason), not reason.startswith("cannot read")
    fmt = sniff_format(data[:16])
    header = jpeg_header(data) if fmt == "JPEG" else None
    try:
        if header:  # the common case, without Pillow's header parser (which holds the GIL)
            width, height = header[:2]
        else:
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:
        return Probe(reason=f"decompression bomb: {exc}"), True  # over Pillow's own limit, whatever --max-pixels
    except Exception as exc:  # noqa: BLE001 - any unreadable header is a skip, never a crash
        return Probe(reason=f"unreadable {fmt} header: {exc}"), True
    return Probe(fingerprint(data), fmt, width, height, jpeg=gpu_jpeg(data, header)), True
