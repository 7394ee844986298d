"""Virtual stores (``--merge virtual``): a store whose features stay in its shard files.

A merge copies every feature into the store; at 10^8 images that is hundreds of GB written through
one process with HDF5's Fletcher-32 (its rate: bench/NOTES.md). A virtual store writes the
per-image columns as usual and, for each tap, an HDF5 virtual dataset that maps the shard files
kept in ``<store>.shards/`` (by paths relative to the store, so the store and that folder move
together). External HDF5 tools read it as one dataset.

HDF5 fills the rows of a source file it cannot open with the fill value, silently. layertap never
reads through the mapping: :class:`TapReader` opens each shard itself, so a missing or damaged shard is
an error that names it (and Fletcher-32 checks every chunk, as in a copied store).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.taps import tap_parts


def shards_dir(store_path: Path) -> Path:
    """The folder that keeps a virtual store's shard files, beside it."""
    return store_path.with_name(store_path.stem + ".shards")


def create(group: h5py.Group, tap: str, store_path: Path, shards: list[tuple[Path, int]], dims: int,
           dtype: str) -> h5py.Dataset:
    """A virtual dataset ``group[tap]`` of ``(sum of rows, dims)`` over each ``(shard file, rows)``'s tap."""
    layout = h5py.VirtualLayout(shape=(sum(n for _, n in shards), dims), dtype=dtype)
    start = 0
    for path, n in shards:
        if n:
            source = Path(path).resolve().relative_to(store_path.parent.resolve())
            layout[start:start + n] = h5py.VirtualSource(str(source), f"features/{tap}", shape=(n, dims))
        start += n
    return group.create_virtual_dataset(tap, layout, fillvalue=np.nan)


class TapReader:
    """The rows of one tap of a store (virtual or copied), read as often as asked: the file stays open and a
    virtual tap's shard map is listed once (``virtual_sources`` builds an object per shard file).

    Calling it with ``rows`` (as :func:`as_rows` takes them; None: all) returns those rows, in that order; a
    virtual tap reads each shard file that holds some of them itself, so nothing missing is filled in.

    Raises:
        OSError: the store or a shard file is missing or cannot be read (a chunk failing its Fletcher-32
            checksum too); the message names the file.
        IndexError: a row outside the tap (:func:`as_rows`).
    """

    def __init__(self, store_path: Path, tap: str):
        self.path = Path(store_path)
        self._file = h5py.File(self.path, "r")
        self._dataset = self._file["features"][tap]
        self._map = None
        if self._dataset.is_virtual:
            bounds = [(m.vspace.get_select_bounds(), m.file_name, m.dset_name) for m in self._dataset.virtual_sources()]
            self._map = sorted((first, last + 1, name, dset) for ((first, _), (last, _)), name, dset in bounds)
            self._starts = np.array([first for first, *_ in self._map])

    def __len__(self) -> int:
        return int(self._dataset.shape[0])

    def range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as one slice of each file that holds them (no index list: a slice is what HDF5
        reads fastest)."""
        if self._map is None:
            return self._dataset[start:stop]
        out = np.empty((stop - start,) + self._dataset.shape[1:], self._dataset.dtype)
        for first, last, name, dset in self._map:
            a, b = max(first, start), min(last, stop)
            if a < b:
                out[a - start:b - start] = self._read_shard(name, dset, slice(a - first, b - first))
        return out

    def _read_shard(self, name: str, dset: str, where):
        path = self.path.parent / name
        try:
            with h5py.File(path, "r") as fh:
                return fh[dset][where] if isinstance(where, slice) else read_rows(fh[dset], where)
        except (OSError, KeyError) as exc:  # FeatureStore.features says which store and what to do
            raise OSError(f"shard file {path} is missing" if not path.exists() else
                          f"shard file {path} cannot be read: {exc}") from None

    def __call__(self, rows: np.ndarray | None = None) -> np.ndarray:
        if rows is None:
            return self._increasing(None)
        return in_order(self._increasing, as_rows(rows, len(self), self.path.name))

    def _increasing(self, wanted: np.ndarray | None) -> np.ndarray:
        if self._map is None:
            return self._dataset[()] if wanted is None else read_rows(self._dataset, wanted)
        dataset = self._dataset
        out = np.empty((dataset.shape[0] if wanted is None else len(wanted),) + dataset.shape[1:], dataset.dtype)
        if wanted is None or not len(wanted):
            first = 0
        else:
            first = max(0, np.searchsorted(self._starts, wanted[0], "right") - 1)
        for start, stop, name, dset in self._map[first:]:
            a, b = (start, stop) if wanted is None else np.searchsorted(wanted, [start, stop])
            if wanted is not None and a == len(wanted):
                break
            if a == b:
                continue
            out[a:b] = self._read_shard(name, dset, slice(None) if wanted is None else wanted[a:b] - start)
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TapReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JoinedReader:
    """Several taps' rows side by side, as :class:`TapReader` reads one: the features of a multi-tap name."""

    def __init__(self, store_path: Path, taps):
        self._readers: list[TapReader] = []
        try:
            for tap in taps:
                self._readers.append(TapReader(store_path, tap))
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self._readers[0])

    def range(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([reader.range(start, stop) for reader in self._readers], axis=1)

    def __call__(self, rows: np.ndarray | None = None) -> np.ndarray:
        return np.concatenate([reader(rows) for reader in self._readers], axis=1)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> JoinedReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_tap(store_path: Path, tap: str) -> TapReader | JoinedReader:
    """The reader of a tap, or of a multi-tap name (:mod:`pipeline.core.taps`)."""
    parts = tap_parts(tap)
    return TapReader(store_path, tap) if len(parts) == 1 else JoinedReader(store_path, parts)


def as_rows(rows, n: int, name: str) -> np.ndarray:
    """Indices into ``name``'s ``n`` rows from what a caller may pass: integer indices in any order (repeats
    allowed; int32 kept int32) or a boolean mask of the ``n`` rows (``store.splits == "val"``).

    Raises:
        IndexError: an index outside ``0 .. n - 1`` (no counting from the end: a -1 is a mistake more often
            than a wish), or a mask of another length; the message says which and the store's size.
    """
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n,):
            raise IndexError(f"{name}: a row mask must have one entry per row ({n}), not shape {rows.shape}")
        return np.flatnonzero(rows)
    if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
        raise IndexError(f"{name}: rows must be a 1-D array of integer indices or a boolean mask, not "
                         f"{rows.dtype} of shape {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        bad = rows[(rows < 0) | (rows >= n)]
        raise IndexError(f"{name} has {n} rows (0 .. {n - 1}); asked for row {bad[0]} ({len(bad)} outside)")
    return rows if rows.size else rows.astype(np.int64)


def in_order(read, rows: np.ndarray):
    """``read(rows)`` for ``rows`` in any order, where ``read`` takes increasing rows (HDF5 reads a slice fastest):
    the rows sorted, read, and put back in the order asked for. Increasing rows go straight through."""
    if len(rows) < 2 or not (rows[1:] < rows[:-1]).any():
        return read(rows)
    order = np.argsort(rows, kind="stable")
    values = read(rows[order])
    out = np.empty_like(values)
    out[order] = values
    return out


def read_rows(dataset: h5py.Dataset, rows: np.ndarray, window_bytes: int = 16 << 20) -> np.ndarray:
    """``dataset[rows]`` for increasing ``rows``, read as slices (each at most ``window_bytes``, and at most as
    many rows as asked for) and picked from in memory. h5py reads a list of rows as one point selection,
    hundreds of times slower than the slice around them (bench/NOTES.md, "Stage two at scale"), and HDF5
    reads whole chunks either way.
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows),) + dataset.shape[1:], dataset.dtype)
    window = max(1, min(window_bytes // max(1, out[:1].nbytes), len(rows)))
    i = 0
    while i < len(rows):
        first = rows[i]
        j = i + int(np.searchsorted(rows[i:], first + window))
        out[i:j] = dataset[first:rows[j - 1] + 1][rows[i:j] - first]
        i = j
    return out


def shard_files(store_path: Path, tap: str) -> list[Path]:
    """The shard files a virtual tap maps, in row order (none for a tap stored in the file itself)."""
    with h5py.File(store_path, "r") as fh:
        dataset = fh["features"][tap]
        return [store_path.parent / m.file_name for m in dataset.virtual_sources()] if dataset.is_virtual else []


def referenced(fh: h5py.File) -> set[Path]:
    """The shard folders the store's virtual taps map, relative to the store's folder."""
    return {Path(mapping.file_name).parent for tap in fh["features"].values() if tap.is_virtual
            for mapping in tap.virtual_sources()}


def prune(store_path: Path) -> None:
    """Delete the folders of ``<store>.shards/`` that the store no longer maps (replaced or re-extracted taps)."""
    folder = shards_dir(store_path)
    if not folder.is_dir():
        return
    keep = set()
    if store_path.exists():
        with h5py.File(store_path, "r") as fh:
            keep = {(store_path.parent / p).resolve() for p in referenced(fh)}
    for child in folder.iterdir():
        if child.resolve() not in keep:
            shutil.rmtree(child, ignore_errors=True)
    if not any(folder.iterdir()):
        folder.rmdir()
