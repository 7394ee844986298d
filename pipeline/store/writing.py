"""Writing feature stores: shards committed atomically, merged into a store, and the lock of one writer.

Reading is :class:`pipeline.store.feature_store.FeatureStore`; the layout both follow is described there.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.core.evaluation import check_two_classes
from pipeline.core.text import size_text
from pipeline.data.images import EMPTY_CLASS
from pipeline.store import virtual as virtual_store
from pipeline.store.feature_store import (
    _COLUMNS,
    _FLAT_ATTRS,
    _STR,
    FORMAT,
    FORMAT_VERSION,
    FeatureStore,
    Rows,
    _encoded,
    column_sha256,
)


class StoreLockedError(LayertapError):
    """Another process is writing the same store."""


class DiskFullError(LayertapError):
    """The disk has no room for a file: nothing half-written is left, committed shards are kept."""


def _disk_full(path: Path, needed: int) -> DiskFullError:
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(f"no space left on the disk of {path.parent}: {path.name} needs about {size_text(needed)} and "
                         f"{size_text(free)} are free. Work already committed is kept: free some space (or write "
                         "elsewhere with --out) and run the same command again")


def _chunk_rows(n: int, dims: int, itemsize: int) -> int:
    """Rows per HDF5 chunk: about 1 MiB per chunk, at least one row."""
    return max(1, min(n, (1 << 20) // max(1, dims * itemsize)))


def _as_columns(rows: Rows) -> dict[str, np.ndarray]:
    return {"paths": _encoded(rows.paths), "labels": np.asarray(rows.labels, dtype=np.int32),
            "split": _encoded(rows.splits), "fingerprints": _encoded(rows.fingerprints)}


def _write_columns(fh: h5py.File, columns: dict[str, np.ndarray], class_names: Sequence[str],
                   skipped: Sequence[tuple[str, str]]) -> None:
    for name in _COLUMNS:
        fh.create_dataset(name, data=columns[name], dtype=np.int32 if name == "labels" else _STR)
    # Checked on every read (FeatureStore.columns): a labels column shifted by a few rows would otherwise train.
    fh.attrs["columns_sha256"] = json.dumps({name: column_sha256(columns[name]) for name in _COLUMNS})
    fh.create_dataset("class_names", data=_encoded(class_names), dtype=_STR)
    group = fh.create_group("skipped")
    group.create_dataset("path", data=_encoded([p for p, _ in skipped]), dtype=_STR)
    group.create_dataset("reason", data=_encoded([r for _, r in skipped]), dtype=_STR)


def _create_tap(fh: h5py.File, tap: str, n: int, dims: int, dtype: str, compression: str,
                map_shape, pooling: str) -> h5py.Dataset:
    # Fletcher-32 per chunk: damage inside the data is found when it is read, not used silently.
    kwargs = {"fletcher32": True} if n else {}
    if compression != "none":
        kwargs.update(compression=compression, shuffle=True)
    dataset = fh.require_group("features").create_dataset(
        tap, shape=(n, dims), dtype=dtype, chunks=(_chunk_rows(n, dims, np.dtype(dtype).itemsize), dims)
        if n else None, **kwargs)
    return _tap_attrs(dataset, map_shape, pooling)


def _tap_attrs(dataset: h5py.Dataset, map_shape, pooling: str) -> h5py.Dataset:
    dataset.attrs["map_shape"] = np.asarray(map_shape, dtype=np.int64)
    dataset.attrs["pooling"] = pooling
    return dataset


def _set_attrs(fh: h5py.File, kind: str, manifest: dict) -> None:
    fh.attrs["format"] = FORMAT
    fh.attrs["format_version"] = FORMAT_VERSION
    fh.attrs["kind"] = kind
    fh.attrs["manifest"] = json.dumps(manifest, sort_keys=True, default=str)
    for name in _FLAT_ATTRS:
        if name in manifest:
            fh.attrs[name] = manifest[name]


@contextmanager
def _atomic(path: Path):
    """Yield a temporary path beside ``path``; rename it into place if the block succeeds."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(path: Path, *, rows: Rows, features: dict[str, np.ndarray], class_names: Sequence[str],
                skipped: Sequence[tuple[str, str]], manifest: dict, map_shapes: dict, dtype: str) -> Path:
    """Write one slice of the image list as a complete shard file, atomically.

    The HDF5 file is built in memory and written with one plain write: a full disk then fails that
    write cleanly (:class:`DiskFullError`) instead of failing inside HDF5, which leaves its objects
    in a state that crashes the interpreter when they are freed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as fh:
        _write_columns(fh, _as_columns(rows), class_names, skipped)
        for tap, values in features.items():
            dataset = _create_tap(fh, tap, len(rows), values.shape[1], dtype, "none", map_shapes[tap],
                                  manifest["pooling"])
            dataset[...] = values
        _set_attrs(fh, "shard", manifest)
        fh.attrs["complete"] = True
    with _atomic(path) as tmp:
        try:
            with open(tmp, "wb") as out:
                out.write(buffer.getbuffer())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(path, buffer.getbuffer().nbytes) from None
            raise
    return path


def merge_shards(shards: Sequence[Path], dest: Path, *, manifest: dict, base: FeatureStore | None = None,
                 skipped: Sequence[tuple[str, str]] = (), dtype: str = "float32",
                 compression: str = "none", virtual: bool = False, labelled: bool = True) -> FeatureStore:
    """Join shards (in image-list order) into a store at ``dest``, atomically.

    Args:
        shards: Shard files covering the whole image list, in order, all of ``manifest['key']``.
        dest: The store to write (replaced if it exists).
        manifest: The store's manifest; ``manifest['key']`` must match every shard's.
        base: An existing store of the same key whose taps are carried over unchanged.
        skipped: Files skipped before extraction (the shards add the ones that failed to decode).
        virtual: Map the shards' features instead of copying them (:mod:`pipeline.store.virtual`); the
            shards must then stay where they are, in ``<dest>.shards/``.
        labelled: False for a prediction job's images (one label for all): one class is then no error.

    Raises:
        LayertapError: a shard belongs to another key, or the rows do not line up with ``base``.
    """
    # The columns go from shard to store as stored (bytes arrays), never as one Python string per row.
    opened, parts, all_skipped = [], {name: [] for name in _COLUMNS}, list(skipped)
    for path in shards:
        shard = FeatureStore(path, kind="shard")
        if shard.key != manifest["key"]:
            raise LayertapError(f"shard {shard.path} belongs to store key {shard.key[:12]}, "
                                f"not {manifest['key'][:12]}")
        for name, values in shard.columns().items():
            parts[name].append(values)
        all_skipped += shard.skipped
        opened.append(shard)
    columns = {name: np.concatenate(values) if values else np.zeros(0, np.int32 if name == "labels" else object)
               for name, values in parts.items()}
    if base is not None and not np.array_equal(base.columns()["paths"], columns["paths"]):
        raise LayertapError(f"{base.path} and the new extraction disagree on which images decode; "
                            "delete the store and extract all layers again")
    columns["labels"], class_names = _drop_empty_classes(columns["labels"], list(manifest["class_names"]),
                                                         all_skipped)
    if labelled:  # headers fine, pixels not
        check_two_classes(class_names, f"{dest} (after decoding)", all_skipped)
    new_taps = opened[0].taps if opened else ()
    # Check the room first: HDF5 failing on a full disk leaves objects that crash the interpreter later.
    copied = [] if virtual else list(map(Path, shards))
    needed = int(1.05 * sum(p.stat().st_size for p in [*copied, *([base.path] if base else [])])) + (1 << 20)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(dest.parent).free < needed:
        raise _disk_full(dest, needed)
    with _atomic(dest) as tmp, h5py.File(tmp, "w") as fh:
        _write_columns(fh, columns, class_names, all_skipped)
        if base is not None:
            with h5py.File(base.path, "r") as src:
                for tap in base.taps:
                    if tap not in new_taps:
                        src.copy(src["features"][tap], fh.require_group("features"), name=tap)
        for tap in new_taps:
            if virtual:
                mapped = [(shard.path, len(shard)) for shard in opened]
                dataset = virtual_store.create(fh.require_group("features"), tap, dest, mapped, opened[0].dims[tap],
                                               opened[0].dtype)
                _tap_attrs(dataset, opened[0].map_shapes[tap], manifest["pooling"])
                continue
            dataset = _create_tap(fh, tap, len(columns["labels"]), opened[0].dims[tap], dtype, compression,
                                  opened[0].map_shapes[tap], manifest["pooling"])
            start = 0
            for shard in opened:
                stop = start + len(shard)
                if stop > start:
                    dataset[start:stop] = shard.features(tap)
                start = stop
        _set_attrs(fh, "store", manifest)
        fh.attrs["complete"] = True
    return FeatureStore(dest)


def _drop_empty_classes(labels: np.ndarray, class_names: list[str], skipped: list) -> tuple[np.ndarray, list[str]]:
    """Leave out classes none of whose images decoded (labels renumbered, each class named in ``skipped``)."""
    counts = np.bincount(labels.astype(np.int64), minlength=len(class_names))
    kept = [i for i, count in enumerate(counts) if count]
    if len(kept) == len(class_names):
        return labels, class_names
    renumber = np.full(len(class_names), -1, np.int32)
    renumber[kept] = np.arange(len(kept), dtype=np.int32)
    skipped += [(f"{class_names[i]}/", EMPTY_CLASS) for i, count in enumerate(counts) if not count]
    return renumber[labels], [class_names[i] for i in kept]


@contextmanager
def store_lock(store_path: Path):
    """Hold an exclusive lock on ``store_path`` while writing it.

    Raises:
        StoreLockedError: another process holds it; the message says what to do.
    """
    from filelock import FileLock, Timeout

    # Hidden, and left in place: deleting a lock file on release lets a third process lock a new file while a
    # second still holds the old one (filelock's documented caveat).
    lock_path = store_path.with_name(f".{store_path.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StoreLockedError(f"another process is extracting into {store_path} (lock {lock_path}); wait for it "
                               "to finish, then rerun: what it extracted will be reused") from None
    try:
        yield
    finally:
        lock.release()
