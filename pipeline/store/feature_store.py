"""HDF5 feature stores: one file per cache key, one dataset per tap.

Layout of a store (and of a shard, which is a store of one slice of the image list)::

    /features/<tap>      (n, dims) float32 or float16, attrs: map_shape, pooling
    /labels              (n,) int32, index into /class_names
    /class_names         (k,) str
    /paths               (n,) str, relative to the data root
    /split               (n,) str: train, val, test or ""
    /fingerprints        (n,) str: blake2b-128 of each file's bytes
    /skipped/path, /skipped/reason   files left out, and why
    attrs: manifest (JSON: key, provenance, versions, timings), a few of its fields
           flat for h5dump users, and complete=True written last.

Every file is written to a temporary name and renamed into place, so a killed writer
leaves either the old file or the new one, never half of one. Shards make the same
mechanism resumable and distributable: each slice of the image list is a shard file,
and :func:`merge_shards` joins them into the store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.core.taps import tap_parts
from pipeline.data.images import SPLITS
from pipeline.store import virtual as virtual_store
from pipeline.store.manifest import StoreManifest
from pipeline.store.splits import Splits

FORMAT = "layertap-feature-store"
FORMAT_VERSION = 1
STORE_DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "gzip", "lzf")
_FLAT_ATTRS = ("key", "backbone", "weights", "weights_sha256", "image_size", "pooling")
_STR = h5py.string_dtype()
_COLUMNS = ("paths", "labels", "split", "fingerprints")
REPLACE = "run the same `layertap extract` again to replace it"
COLUMN_SLICE = 1 << 18  # rows of a per-image column read at once when it is streamed (FeatureStore.column_slices)
BATCH_BYTES = 16 << 20  # of features a streamed batch holds by default (FeatureStore.iter_batches)


@dataclass
class Rows:
    """Per-image columns of a store or shard, in row order."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    fingerprints: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def extend(self, other: Rows) -> None:
        self.paths += other.paths
        self.labels += other.labels
        self.splits += other.splits
        self.fingerprints += other.fingerprints


def _check_lengths(fh, path: Path) -> None:
    """Every per-image column and every tap has one row per label (a store cut short or spliced is refused)."""
    n = int(fh["labels"].shape[0])
    lengths = {name: int(fh[name].shape[0]) for name in _COLUMNS}
    lengths.update({f"features/{tap}": int(fh["features"][tap].shape[0]) for tap in fh["features"]})
    wrong = {name: length for name, length in lengths.items() if length != n}
    if wrong:
        found = ", ".join(f"{name} {length:,}" for name, length in wrong.items())
        raise LayertapError(f"{path}: {n:,} labels but {found} rows; the store is damaged: {REPLACE}")


class FeatureStore:
    """Read access to a complete feature store.

    Attributes:
        manifest: How the features were made (:class:`pipeline.store.manifest.StoreManifest`).
        taps, dims, map_shapes, dtype, class_names, rows, skipped: What the store holds.

    Args:
        path: The ``.h5`` file.
        kind: ``store`` (default) or ``shard``.

    Raises:
        FileNotFoundError: no such file.
        LayertapError: not a layertap store, or an unfinished one.
    """

    def __init__(self, path: str | os.PathLike, kind: str = "store"):
        self.path = Path(path)
        if self.path.is_dir():
            inside = sorted(p.name for p in self.path.glob("*.h5"))
            raise FileNotFoundError(f"{self.path} is a folder, not a feature store; " + (
                f"give one of its .h5 files ({', '.join(inside[:5])}{', ...' if inside[5:] else ''})" if inside
                else "it holds no .h5 file: run `layertap extract` first"))
        if not self.path.is_file():
            raise FileNotFoundError(f"feature store {self.path} does not exist; run `layertap extract` first")
        try:
            with h5py.File(self.path, "r") as fh:
                attrs = dict(fh.attrs)
                if attrs.get("format") != FORMAT or attrs.get("kind") != kind:
                    raise LayertapError(f"{self.path} is not a layertap {kind} (format="
                                        f"{attrs.get('format')!r}, kind={attrs.get('kind')!r})")
                if not attrs.get("complete"):
                    raise LayertapError(f"{self.path} is incomplete; rerun the extraction that made it")
                version = attrs.get("format_version", FORMAT_VERSION)
                if not isinstance(version, (int, np.integer)) or not 1 <= version <= FORMAT_VERSION:
                    shown = int(version) if isinstance(version, (int, np.integer)) else repr(version)
                    raise LayertapError(f"{self.path} has format_version {shown}; this layertap reads 1 to "
                                        f"{FORMAT_VERSION}: upgrade layertap, or extract the store again")
                _check_lengths(fh, self.path)
                self.manifest = StoreManifest.from_dict(json.loads(attrs["manifest"]))
                self.taps: tuple[str, ...] = tuple(fh["features"].keys())
                self.dims = {tap: int(fh["features"][tap].shape[1]) for tap in self.taps}
                self.map_shapes = {tap: tuple(int(d) for d in fh["features"][tap].attrs["map_shape"])
                                   for tap in self.taps}
                self.dtype = str(fh["features"][self.taps[0]].dtype) if self.taps else "float32"
                self.class_names: tuple[str, ...] = tuple(_decoded(fh["class_names"][()]))
                self._n = int(fh["labels"].shape[0])
                self._column_sums = json.loads(attrs.get("columns_sha256", "{}"))  # none in older stores
                self.skipped = list(zip(_decoded(fh["skipped/path"][()]), _decoded(fh["skipped/reason"][()])))
        except OSError as exc:
            raise LayertapError(f"{self.path} cannot be read as HDF5 ({exc}); {REPLACE}") from exc
        self._rows: Rows | None = None
        self._labels: np.ndarray | None = None

    @property
    def rows(self) -> Rows:
        """The per-image columns, read when first asked for (a store of 10^8 rows opens without them)."""
        if self._rows is None:
            columns = self.columns()
            self._rows = Rows(_decoded(columns["paths"]), columns["labels"].tolist(), _decoded(columns["split"]),
                              _decoded(columns["fingerprints"]))
        return self._rows

    def columns(self, names: Sequence[str] = _COLUMNS) -> dict[str, np.ndarray]:
        """The per-image columns as stored (``paths``, ``split``, ``fingerprints``: arrays of UTF-8 bytes;
        ``labels``: int32), without a Python string per row; all of them, or ``names``."""
        try:
            with h5py.File(self.path, "r") as fh:
                columns = {name: fh[name][()] for name in names}
        except OSError as exc:
            raise LayertapError(f"{self.path} cannot be read as HDF5 ({exc}); {REPLACE}") from exc
        for name, values in columns.items():
            expected = self._column_sums.get(name)
            if expected and column_sha256(values) != expected:
                raise LayertapError(f"{self.path}: its {name} column is not what was written (its sha256 differs "
                                    f"from the store's record: changed or shifted since); the store is damaged: "
                                    f"{REPLACE}")
        labels = columns.get("labels")
        if labels is not None and len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(
                self.class_names):
            raise LayertapError(f"{self.path}: its labels run from {int(labels.min())} to {int(labels.max())} and it "
                                f"names {len(self.class_names)} classes; the store is damaged: {REPLACE}")
        return columns

    def column_slices(self, name: str, size: int = COLUMN_SLICE):
        """Yield ``(start, values)`` of a per-image column, ``size`` rows at a time, as :meth:`columns` gives them:
        a string column of 10^7 rows read whole is gigabytes of Python ``bytes``, a slice a few MB. The column is
        checked against its sha256 as it streams; a mismatch raises after the last slice, before a caller that
        consumes them all has returned.

        Raises:
            LayertapError: the store cannot be read, or the column is not what was written.
        """
        import hashlib

        digest, expected = hashlib.sha256(), self._column_sums.get(name)
        try:
            with h5py.File(self.path, "r") as fh:
                dataset = fh[name]
                for start in range(0, len(dataset), size):
                    values = dataset[start:start + size]
                    if expected:
                        digest.update(_column_bytes(values, first=start == 0))
                    yield start, values
        except OSError as exc:
            raise LayertapError(f"{self.path} cannot be read as HDF5 ({exc}); {REPLACE}") from exc
        if expected and digest.hexdigest() != expected:
            raise LayertapError(f"{self.path}: its {name} column is not what was written (its sha256 differs from "
                                f"the store's record: changed or shifted since); the store is damaged: {REPLACE}")

    def column_at(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The values of a per-image column at ``rows`` (indices in any order, or a mask: as :meth:`features`),
        the column streamed (:meth:`column_slices`)."""
        def increasing(rows: np.ndarray) -> np.ndarray:
            parts = []
            for start, values in self.column_slices(name):
                inside = rows[(rows >= start) & (rows < start + len(values))]
                parts.append(values[inside - start])
            return np.concatenate(parts) if parts else np.zeros(0, object)

        return virtual_store.in_order(increasing, virtual_store.as_rows(rows, len(self), self.path.name))

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def labels(self) -> np.ndarray:
        """Each row's class index, as the column (a store of 10^8 rows needs no Python object per row for it)."""
        if self._rows is not None:
            return np.asarray(self._rows.labels, dtype=np.int32)
        if self._labels is None:  # read (and checked against its sha256) once: stage two asks per classifier
            self._labels = self.columns(("labels",))["labels"].astype(np.int32, copy=False)
        return self._labels

    def _split_codes(self) -> np.ndarray:
        """Each row's recorded split as its :class:`pipeline.store.splits.Splits` code, the column streamed and
        checked (:meth:`column_slices`)."""
        codes = np.zeros(len(self), np.int8)
        for start, column in self.column_slices("split"):
            part = codes[start:start + len(column)]
            for name in SPLITS:
                part[(column == name.encode()) | (column == name)] = Splits.code(name)
        return codes

    @property
    def splits(self) -> Splits:
        """Each row's recorded split, ``train``/``val``/``test`` or ``""`` (none), one byte a row: ``splits == "val"``
        is its mask."""
        return Splits(self._split_codes())

    def split_counts(self) -> dict[str, int]:
        """Rows per recorded split, train, val, test then ``""`` (none), those with rows."""
        counts = np.bincount(self._split_codes(), minlength=len(SPLITS) + 1)
        return {name: int(counts[Splits.code(name)]) for name in (*SPLITS, "") if counts[Splits.code(name)]}

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        m = self.manifest
        splits = ", ".join(f"{name or 'no split'} {n:,}" for name, n in self.split_counts().items())
        taps = ", ".join(f"{tap} ({self.dims[tap]})" for tap in self.taps)
        return (f"<FeatureStore {self.path.name}: {m.backbone} ({m.weights}), {m.image_size} px, {m.pooling} pooling; "
                f"taps {taps}; {len(self):,} rows in {len(self.class_names)} classes ({splits})>")

    def width(self, tap: str) -> int:
        """Features per row of a tap, or of a multi-tap name (the sum of its taps')."""
        self._check_tap(tap)
        return sum(self.dims[part] for part in tap_parts(tap))

    def _check_tap(self, tap: str) -> None:
        missing = [part for part in tap_parts(tap) if part not in self.taps]
        if missing:
            raise KeyError(f"{self.path.name} has no tap {', '.join(map(repr, missing))}; it has: "
                           f"{', '.join(self.taps)}")

    def features(self, tap: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The ``(n, dims)`` features of one tap: all rows, or ``rows``: indices in any order (read in store order,
        returned in theirs) or a boolean mask (``store.splits == "val"``). A multi-tap name
        (``block3_pool+block4_pool``) gives its taps' features side by side, in its order.

        Raises:
            KeyError: the store has no such tap; the message lists the ones it has.
            IndexError: a row outside the store, or a mask of another length (named).
            LayertapError: its data is damaged (a chunk fails its checksum, a shard file is missing).
        """
        self._check_tap(tap)
        try:
            with virtual_store.open_tap(self.path, tap) as read:
                return read(rows)
        except OSError as exc:  # a chunk whose Fletcher-32 checksum fails, a truncated file, a lost shard file
            raise LayertapError(f"{self.path}: the features of {tap} are damaged ({exc}); {REPLACE}") from None

    def iter_batches(self, tap: str, rows: np.ndarray | None = None, batch_size: int | None = None,
                     read_ahead: int = 2):
        """Yield ``(row indices, features)`` of one tap, ``batch_size`` rows at a time (default: about
        :data:`BATCH_BYTES` of features): all rows in store order, or ``rows`` in the order given (as
        :meth:`features` takes them: indices or a mask). Copied and virtual stores alike.

        Memory stays bounded whatever the store's size: a thread reads at most ``read_ahead`` batches ahead
        of the consumer (so reading overlaps the consumer's work), and each batch of all rows is one slice.

        Raises:
            KeyError: no such tap. IndexError: a row outside the store. LayertapError: its data is damaged (as
            :meth:`features`).
        """
        import queue
        import threading

        self._check_tap(tap)
        batch_size = self.batch_rows(tap) if batch_size is None else batch_size
        if batch_size < 1 or read_ahead < 1:
            raise ValueError(f"batch_size={batch_size} and read_ahead={read_ahead} must be at least 1")
        # int32 indices stay int32: a copy in int64 is 25 MB more for 3.2 M training rows, and the allocator kept
        # it after the pass
        wanted = None if rows is None else virtual_store.as_rows(rows, len(self), self.path.name)
        n = len(self) if wanted is None else len(wanted)
        ready: queue.Queue = queue.Queue(read_ahead)
        stop = threading.Event()

        def read() -> None:
            try:
                with virtual_store.open_tap(self.path, tap) as reader:
                    for start in range(0, n, batch_size):
                        end = min(start + batch_size, n)
                        index = np.arange(start, end) if wanted is None else wanted[start:end]
                        values = reader.range(start, end) if wanted is None else reader(index)
                        while not stop.is_set():
                            try:
                                ready.put((index, values), timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
            except OSError as exc:
                ready.put(LayertapError(f"{self.path}: the features of {tap} are damaged ({exc}); {REPLACE}"))
                return
            ready.put(None)

        reader = threading.Thread(target=read, name=f"layertap-read-{tap}", daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()
            reader.join()

    def batch_rows(self, tap: str, size: int = 0) -> int:
        """Rows of ``tap`` in about ``size`` bytes of stored features (default :data:`BATCH_BYTES`)."""
        itemsize = np.dtype(self.dtype).itemsize
        return max(1, (size or BATCH_BYTES) // (self.width(tap) * itemsize))

    def moments(self, tap: str, rows: np.ndarray | None = None, batch_size: int | None = None):
        """``(count, mean, variance)`` of each feature of a tap over ``rows`` (default: all), in one streamed pass
        in float64; batches are merged by Chan et al.'s pairwise update, which stays exact where the mean is
        large against the spread (a running sum of squares would lose it)."""
        count, mean, m2 = 0, np.zeros(self.width(tap)), np.zeros(self.width(tap))
        for _, values in self.iter_batches(tap, rows, batch_size):
            values = values.astype(np.float64)
            k, batch_mean = len(values), values.mean(axis=0)
            batch_m2 = ((values - batch_mean) ** 2).sum(axis=0)
            delta, total = batch_mean - mean, count + k
            mean = mean + delta * (k / total)
            m2 = m2 + batch_m2 + delta ** 2 * (count * k / total)
            count = total
        return count, mean, m2 / max(count, 1)

    def verify(self, taps=None) -> None:
        """Read the per-image columns (each checked against its sha256) and every feature chunk of ``taps``
        (default: all), so that HDF5 checks each one's Fletcher-32 checksum.

        Stores written before checksums were added have none; they are read, which still finds
        truncation and unreadable chunks.

        Raises:
            LayertapError: a column or chunk is damaged; the message names the store and what to do.
        """
        self.columns()
        for tap in self.taps if taps is None else taps:
            self.features(tap)


def column_sha256(values: np.ndarray) -> str:
    """The sha256 of a per-image column's content (its rows' bytes; strings NUL-separated), as stored in the
    store's ``columns_sha256`` attribute and checked on every read of the column."""
    import hashlib

    return hashlib.sha256(_column_bytes(values)).hexdigest()


def _column_bytes(values, first: bool = True) -> bytes:
    """What :func:`column_sha256` hashes of ``values``; of a slice after the first (``first=False``), what
    continues the whole column's bytes (strings are NUL-separated across slices too)."""
    values = np.asarray(values)
    if values.dtype == object:
        data = b"\0".join(v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogateescape") for v in values)
        return data if first or not len(values) else b"\0" + data
    return np.ascontiguousarray(values, dtype="<i4").tobytes()


def _decoded(values) -> list[str]:
    return [s.decode("utf-8", "surrogateescape") if isinstance(s, bytes) else str(s) for s in values]


def _encoded(strings) -> np.ndarray:
    """Strings as UTF-8 bytes for HDF5; a file name that is not UTF-8 keeps its own bytes (surrogateescape)."""
    return np.array([s.encode("utf-8", "surrogateescape") for s in strings], dtype=object)


