"""The scan: every image's content hash and header, and a stat cache so that an unchanged file is not read again.

The cache key of a store covers each image's content hash, so every run must know every file's
hash. Reading and hashing every file on every run makes a cache-hit rerun over ten million images
read the whole data set; Git's index and DVC's state database answer the same question with the
file's stat. So does this: ``(size, mtime_ns, ctime_ns, inode)`` of each file, with the content hash
and header facts read from those bytes, in one SQLite file beside the stores
(``<out>/.layertap-stat-cache.sqlite``). A rerun stats each file and reads only those whose stat
changed; a changed file is hashed again, so new bytes give a new key and are recomputed, never
silently reused. ``--verify`` ignores the cache and reads every file.

As in Git, an entry is trusted only if the file was last modified well before the entry was
written (:data:`RACY_NS`): a file rewritten within the same timestamp tick as its scan, keeping its
size, would otherwise look unchanged. The cache is an optimisation only: when it cannot be read or
written, the scan reads every file, says so once, and the results are the same.
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline import LayertapError
from pipeline.images import (DEFAULT_MAX_PIXELS, ImageList, ImageRecord, Skipped, bomb_reason, default_workers,
                             drop_empty_classes, fingerprint, gpu_jpeg, jpeg_header, or_reason, ordered_map,
                             progress_bar, read_file, sniff_format)

log = logging.getLogger(__name__)
FILE_NAME = ".layertap-stat-cache.sqlite"
# An entry whose file changed less than this before the entry was written is rehashed (coarse
# timestamps: 2 s on FAT, 1 s on some network filesystems).
RACY_NS = 2_000_000_000
STAT_CHUNK = 2048  # files a scan thread stats at once
# The first files are stat'ed in the calling thread; only if that took longer than this a file (a disk or
# network filesystem answering, not the page cache) are the rest spread over threads.
SLOW_STAT_S = 20e-6
# ``orientation`` is set for the JPEGs a GPU decoder takes (:func:`pipeline.images.gpu_jpeg`), NULL otherwise.
# The table of earlier versions (``files``, without it) is dropped: its files are read once more.
_SCHEMA = """CREATE TABLE IF NOT EXISTS probes (
    root TEXT NOT NULL, path BLOB NOT NULL, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER,
    scanned_ns INTEGER, fingerprint TEXT, format TEXT, width INTEGER, height INTEGER, orientation INTEGER,
    reason TEXT, PRIMARY KEY (root, path))"""


@dataclass(frozen=True)
class Probe:
    """What a file's bytes say: its hash, format and size in pixels, or why it is not an image; and, for a JPEG a
    GPU decoder takes, ``(width, height, EXIF orientation)`` (:func:`pipeline.images.gpu_jpeg`)."""

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

    From the page cache a stat takes ~2 us, most of it Python holding the GIL, so threads only contend:
    16 threads took 1.9-2.9x as long as one on 16,384 files (2-core Zen 4; bench/NOTES.md). Where the first
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
    """The stat cache of one data root, in ``folder``'s cache file.

    Args:
        folder: Where the cache file lives (the stores' ``--out`` folder).
        root: The data root; entries are keyed by it (absolute) and the path relative to it.
    """

    def __init__(self, folder: str | os.PathLike, root: str | os.PathLike):
        self.path = Path(folder) / FILE_NAME
        self.root = str(Path(root).resolve())
        self._entries: dict[str, tuple] = {}
        self._new: list[tuple] = []
        self._broken = False
        self.started_ns = time.time_ns()
        try:
            if self.path.exists():
                with self._connect() as db:
                    rows = db.execute("SELECT path, size, mtime_ns, ctime_ns, inode, scanned_ns, fingerprint, format,"
                                      " width, height, reason, orientation FROM probes WHERE root = ?", (self.root,))
                    self._entries = {os.fsdecode(row[0]): (row[1:5], row[5], row[6:]) for row in rows}
        except sqlite3.Error as exc:
            self._unusable(exc)

    def lookup(self, rel: str, stat: tuple | None) -> Probe | None:
        """The cached probe of ``rel`` if its stat is the recorded one and the entry is not racy."""
        entry = self._entries.get(rel)
        if entry is None or entry[0] != stat or stat[1] >= entry[1] - RACY_NS:
            return None
        fingerprint, fmt, width, height, reason, orientation = entry[2]
        return Probe(fingerprint or "", fmt or "", width or 0, height or 0, reason,
                     (width, height, orientation) if orientation else None)

    def remember(self, rel: str, stat: tuple | None, probe: Probe) -> None:
        """Record a probe made from the file's bytes (read after ``stat`` was taken)."""
        if stat is not None:
            self._new.append((self.root, os.fsencode(rel), *stat, self.started_ns, probe.fingerprint, probe.format,
                              probe.width, probe.height, probe.jpeg[2] if probe.jpeg else None, probe.reason))

    def save(self, present=None) -> None:
        """Write the new entries, and forget files of this root not in ``present`` (the paths listed now), in
        one transaction (a failure costs only the next run's reads)."""
        gone = [] if present is None else [p for p in self._entries if p not in present]
        if not (self._new or gone) or self._broken:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executemany("DELETE FROM probes WHERE root = ? AND path = ?",
                               [(self.root, os.fsencode(p)) for p in gone])
                db.executemany("INSERT OR REPLACE INTO probes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               self._new)
            self._new = []
            for path in gone:
                del self._entries[path]
        except (sqlite3.Error, OSError) as exc:
            self._unusable(exc)

    @contextmanager
    def _connect(self):
        """A connection, committed when the block succeeds and closed either way."""
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("DROP TABLE IF EXISTS files")
            db.execute(_SCHEMA)
            with db:
                yield db
        finally:
            db.close()

    def _unusable(self, exc: Exception) -> None:
        if not self._broken:
            log.warning("the stat cache %s cannot be used (%s): every file is read and hashed, with the same "
                        "results. Delete the file to start a new cache", self.path, exc)
        self._entries, self._new, self._broken = {}, [], True


def scan_images(images: ImageList, max_pixels: int = DEFAULT_MAX_PIXELS,
                workers: int | None = None, progress: bool = False, cache: StatCache | None = None,
                remote=None) -> ImageList:
    """Fingerprint every file and read its header; keep the usable ones.

    Reads each file once (for its content hash) and its header, but decodes no pixels; with a
    stat cache, only the files whose stat it has not recorded.
    Empty files, files that are not images, unreadable headers and images over
    ``max_pixels`` are moved to ``skipped`` with the reason.

    Args:
        cache: A :class:`StatCache`: files whose stat it has recorded are not
            read again; what is read is recorded.
        remote: ``remote(root, paths)`` probes the files elsewhere (a Ray cluster:
            :meth:`pipeline.ray_engine.RaySession.probe`) and gives ``[(probe, lasting)]`` in order,
            or None to leave them to this process's threads.

    Raises:
        LayertapError: no usable image is left, or a class has none.
    """
    records, root, workers = images.records, str(images.root).rstrip(os.sep), workers or default_workers()
    probes: list[Probe | None] = [None] * len(records)
    stats: list[tuple | None] = [None] * len(records)
    if cache:
        stats = stat_files([root + os.sep + record.path for record in records], workers)
        probes = [cache.lookup(record.path, stat) for record, stat in zip(records, stats)]
    todo = [i for i, probe in enumerate(probes) if probe is None]

    def read(i: int) -> Probe:
        if stats[i] is None:
            stats[i] = file_stat(root + os.sep + records[i].path)
        probe, lasting = probe_file(images.root / records[i].path)
        if cache and lasting:
            cache.remember(records[i].path, stats[i], probe)
        return probe

    probed = remote(root, [records[i].path for i in todo]) if remote and todo else None
    if probed is not None:
        for i, (probe, lasting) in zip(todo, probed):
            probes[i] = probe
            if cache and lasting:
                cache.remember(records[i].path, stats[i], probe)
    else:
        for i, probe in zip(todo, progress_bar(ordered_map(read, todo, workers), total=len(todo), desc="scan",
                                               enabled=progress)):
            probes[i] = probe
    results = [_checked(record, probe, max_pixels, stat) for record, probe, stat in zip(records, probes, stats)]
    if cache:
        cache.save(present={record.path for record in records})
    kept = tuple(r for r in results if isinstance(r, ImageRecord))
    skipped = images.skipped + tuple(r for r in results if isinstance(r, Skipped))
    if not kept:
        detail = f"; {len(skipped)} files were skipped, first: {skipped[0].path} ({skipped[0].reason})" if skipped else ""
        if records and all(stat is None for stat in stats):
            detail += (f". No listed file is in {images.root}: a CSV's paths are relative to --root (default: the "
                       "CSV's folder), a --split-file's to --data")
        raise LayertapError(f"no usable images in {images.root}{detail}")
    return drop_empty_classes(ImageList(images.root, kept, images.class_names, skipped, images.name))


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
    data, reason = or_reason(read_file, path)
    if reason:
        return Probe(reason=reason), reason == "empty file"
    fmt = sniff_format(data[:16])
    if fmt is None:
        return Probe(reason=f"not an image (first bytes {data[:8]!r}; JPEG, PNG, BMP, GIF, WebP and TIFF are "
                            "read)"), True
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
