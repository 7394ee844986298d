"""Features reused by content: images an earlier store computed with the same model settings are not computed again.

A store's key covers its whole image list, so one added, removed or edited photo gives a new key and a
new store. The features of an image, though, are a function of its bytes and the model settings alone
(extraction is a pure function of an image slice and the settings). So before an engine runs, each
shard of the new store is looked up, image by image (by content hash), in the earlier stores of the same
settings (same backbone, weights, size, resize, decoder, preprocessing, pooling, precision, BatchNormalization
folding, stored type, Keras backend and version) in ``--out``:

- a shard whose every image is there is written from those rows;
- a shard with none of its images there is computed as usual;
- the images of the other shards that are not there are computed together, as shards of their own in
  ``<parts>/computed/`` (committed, so a killed run resumes), and then each such shard of the store is
  written from the earlier rows and the computed ones.

The committed shards of a run that did not finish, under another key (killed, then its image list changed),
are looked up too, after the complete stores: hours of a stopped extraction are not computed again because a
photo was added.

A reused row is the earlier store's row, bit for bit; a fresh extraction could differ from it by the
batch-composition tolerance (bench/README.md). ``--no-reuse`` computes everything.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.extraction.shards import ShardJob, rows_of
from pipeline.store.feature_store import FeatureStore
from pipeline.store.virtual import TapReader
from pipeline.store.writing import StoreLockedError, store_lock, write_shard

log = logging.getLogger(__name__)

# The cache key's material is these two lists: how features are computed from an image (a donor must match
# every one of them), and which images with which labels (what reuse looks past).
MODEL_FIELDS = ("backbone", "weights", "weights_sha256", "image_size", "resize", "interpolation", "draft", "decoder",
                "preprocessing", "pooling", "precision", "batchnorm", "store_dtype", "keras_backend", "keras_version")
DATA_FIELDS = ("images_sha256", "n_images_listed", "class_names")


@dataclass
class Donors:
    """Earlier stores (and shards) of the same model settings, and where each content hash has a row in them.

    The fingerprints of the sources added together are held as one sorted array of bytes, beside each one's
    source and row (44 bytes a row: 4.4 GB for 10^8 rows, where a dict of Python strings would take several
    times that), and looked up by bisection: one search for a shard's images however many sources there
    are (an unfinished run's thousands of shards among them). Each source's taps are read through one open
    :class:`pipeline.store.virtual.TapReader` (:meth:`close` closes them): a shard's rows are one read per
    source, not one open, and a virtual store's map is listed once.
    """

    stores: list[FeatureStore] = field(default_factory=list)  # the sources; an index into it names one
    segments: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # keys, source, row
    earlier: int = 0  # the first this many sources are earlier work; after them come this run's computed shards
    reused: int = 0  # rows written from earlier sources so far
    used: set[int] = field(default_factory=set)  # the sources a lookup found a row in
    dropped: set[int] = field(default_factory=set)  # the sources found damaged
    readers: dict[tuple[Path, str], TapReader] = field(default_factory=dict)

    @property
    def map_shapes(self) -> dict:
        return self.stores[0].map_shapes

    def add(self, stores: list[FeatureStore], earlier: bool = True) -> None:
        """Look up rows in ``stores`` too: after the sources already added, and among them in their order."""
        keys, sources, rows = [], [], []
        for store in stores:
            try:
                fingerprints = store.columns(["fingerprints"])["fingerprints"].astype(bytes)
            except (LayertapError, OSError):
                continue  # damaged: nothing to reuse from it
            if len(fingerprints):
                keys.append(fingerprints)
                sources.append(np.full(len(fingerprints), len(self.stores), np.int32))
                rows.append(np.arange(len(fingerprints), dtype=np.int64))
                self.stores.append(store)
                self.earlier += earlier
        if keys:
            # one store's column as it is: a copy of 10^8 fingerprints would be 3.2 GB more at the peak
            keys, sources, rows = (np.concatenate(c) if len(c) > 1 else c[0] for c in (keys, sources, rows))
            order = np.argsort(keys, kind="stable")  # equal contents stay in source order: a search finds the first
            self.segments.append((keys[order], sources[order], rows[order]))

    def drop(self, source: int) -> None:
        """Look up nothing more in one source (found damaged); the others keep their numbers."""
        self.dropped.add(source)
        self.segments = [tuple(column[keep] for column in segment)
                         for segment in self.segments for keep in [segment[1] != source]]

    def keys_of(self, sources) -> np.ndarray:
        """The fingerprints of ``sources`` (indices), as bytes."""
        return np.concatenate([keys[np.isin(source, list(sources))] for keys, source, _ in self.segments])

    def names(self) -> list[str]:
        """The earlier sources rows were found in, as a person finds them: a store's file name, or the
        unfinished run a shard is of."""
        return list(dict.fromkeys((_parts_of(store.path) or store.path).name
                                  for i, store in enumerate(self.stores[:self.earlier]) if i in self.used))

    def lookup(self, fingerprints: list[str]) -> list[tuple[int, int] | None]:
        """``(source, row)`` for each fingerprint, from the first source that has it, else None."""
        wanted = np.array([f.encode("utf-8", "surrogateescape") for f in fingerprints], dtype=bytes)
        found: list[tuple[int, int] | None] = [None] * len(fingerprints)
        for keys, sources, rows in self.segments:
            if not len(keys):
                continue
            at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
            for i in np.flatnonzero(keys[at] == wanted):
                found[i] = found[i] or (int(sources[at[i]]), int(rows[at[i]]))
        self.used.update(hit[0] for hit in found if hit)
        return found

    def write_covered(self, jobs: list[ShardJob], manifest: dict, class_names, taps: tuple[str, ...],
                      dtype: str, skipped: dict[str, str] | None = None) -> list[tuple[ShardJob, list]]:
        """Commit each job whose every image has a row here (or a reason in ``skipped``) from those rows.

        Returns:
            The other jobs, each with its images' :meth:`lookup`. A store whose features cannot be read is
            dropped, with a warning, and its rows looked up elsewhere.
        """
        skipped, left = skipped or {}, []
        class_index = {name: i for i, name in enumerate(class_names)}
        for job in jobs:
            while True:
                hits = self.lookup([record.fingerprint for record in job.records])
                if not all(hit or record.path in skipped for hit, record in zip(hits, job.records)):
                    left.append((job, hits))
                    break
                try:
                    self._write(job, hits, skipped, manifest, class_names, class_index, taps, dtype)
                    break
                except _Unreadable as exc:
                    log.warning("not reusing features from %s: %s", self.stores[exc.store].path.name, exc)
                    self.drop(exc.store)
        return left

    def _write(self, job: ShardJob, hits, skipped: dict[str, str], manifest: dict, class_names, class_index,
               taps, dtype) -> None:
        kept = [(hit, record) for hit, record in zip(hits, job.records) if hit]
        features = {tap: self._gather([hit for hit, _ in kept], tap) for tap in taps}
        write_shard(job.path, rows=rows_of([record for _, record in kept], class_index), features=features,
                    class_names=class_names,
                    skipped=[(r.path, skipped[r.path]) for hit, r in zip(hits, job.records) if not hit],
                    manifest={**manifest, "shard": [job.start, job.stop], "shard_taps": list(taps)},
                    map_shapes=self.map_shapes, dtype=dtype)
        self.reused += sum(hit[0] < self.earlier for hit, _ in kept)

    def _gather(self, hits: list[tuple[int, int]], tap: str) -> np.ndarray:
        """The rows ``hits`` of one tap, in that order (each store read once: :class:`TapReader` reads any order)."""
        out = np.zeros((len(hits), self.stores[0].dims[tap]), self.stores[0].dtype)
        by_store: dict[int, list[int]] = {}
        for position, (store, _) in enumerate(hits):
            by_store.setdefault(store, []).append(position)
        for store, positions in by_store.items():
            path = self.stores[store].path
            try:
                if (path, tap) not in self.readers:
                    self.readers[path, tap] = TapReader(path, tap)
                out[positions] = self.readers[path, tap](np.array([hits[p][1] for p in positions]))
            except (OSError, KeyError) as exc:
                raise _Unreadable(store, f"the features of {tap} are damaged ({exc})") from None
        return out

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()


class _Unreadable(Exception):
    def __init__(self, store: int, message: str):
        super().__init__(message)
        self.store = store


def find_donors(out_dir: str | Path, store_path: Path, manifest: dict, taps: tuple[str, ...]) -> Donors | None:
    """The sources in ``out_dir`` made with the :data:`MODEL_FIELDS` of ``manifest`` that hold every tap of
    ``taps``; None if there are none. First the complete stores (other than ``store_path``), newest first;
    then the committed shards of unfinished runs of other keys (a run killed before its image list changed:
    its work is not lost), newest first."""
    wanted = {k: manifest.get(k) for k in MODEL_FIELDS}  # batchnorm: absent where not folded
    out_dir, own = Path(out_dir), store_path.resolve().with_name(store_path.stem + ".parts")
    stores = [p for p in out_dir.glob("*.h5") if p.resolve() != store_path.resolve()]
    shards = [p for pattern in ("*.parts/*/shard-*.h5", "*.parts/*/computed/shard-*.h5")
              for p in out_dir.glob(pattern) if _parts_of(p.resolve()) != own]
    donors = Donors()
    for paths, kind in ((stores, "store"), (shards, "shard")):
        found = []
        for path in sorted(paths, key=_mtime, reverse=True):
            try:
                store = FeatureStore(path, kind=kind)
            except (LayertapError, OSError):
                continue  # not a complete layertap store or shard (a shard's file is renamed in whole)
            if all(store.manifest.raw.get(k) == v for k, v in wanted.items()) and set(taps) <= set(store.taps):
                found.append(store)
        donors.add(found)
    return donors if donors.stores else None


def retire_stopped(donors: Donors | None, store: FeatureStore) -> list[Path]:
    """Remove each stopped run's folder of shards that this run took rows from, once ``store`` (complete) holds
    every row of it, for every tap of it, and no process holds that run's lock: going back to that image list
    then takes all its rows from ``store`` by content, so nothing is lost, and stopped work does not pile up in
    ``--out``. A folder with a row or a tap ``store`` lacks, or a shard that is not a source of ``donors`` (one
    that could not be read, or was found damaged), is left. The shards are not opened again: ``donors`` holds
    their taps and fingerprints.

    Returns:
        The folders removed (``<store>.parts/<taps>``).
    """
    if donors is None:
        return []
    by_folder: dict[Path, list[int]] = {}
    for i, source in enumerate(donors.stores[:donors.earlier]):
        if _parts_of(source.path):
            by_folder.setdefault(_taps_folder(source.path), []).append(i)
    removed = []
    for folder, sources in by_folder.items():
        if donors.used.isdisjoint(sources):
            continue  # nothing was taken from it: not this run's to judge
        parts = folder.parent
        try:
            with store_lock(parts.with_suffix(".h5")):
                if not _covered(folder, sources, donors, store):
                    continue
                shutil.rmtree(folder)
                if not any(parts.iterdir()):
                    parts.rmdir()
                removed.append(folder)
        except (StoreLockedError, OSError):
            continue  # being resumed, or not ours to remove: left as it is
        log.info("removed %s, a stopped run's shards: every row of them is in %s", folder, store.path.name)
    return removed


def _covered(folder: Path, sources: list[int], donors: Donors, store: FeatureStore) -> bool:
    """Whether the shards in ``folder`` are exactly the ``sources`` of ``donors``, undamaged, with only taps and
    rows ``store`` has (``store``'s fingerprints streamed)."""
    listed = {*folder.glob("shard-*.h5"), *folder.glob("computed/shard-*.h5")}
    if (listed != {donors.stores[i].path for i in sources} or not donors.dropped.isdisjoint(sources)
            or any(not set(donors.stores[i].taps) <= set(store.taps) for i in sources)):
        return False
    stopped = np.unique(donors.keys_of(sources))
    found = np.zeros(len(stopped), bool)
    try:
        for _, values in store.column_slices("fingerprints"):
            values = values.astype(bytes)
            at = np.minimum(np.searchsorted(stopped, values), len(stopped) - 1)
            found[at[stopped[at] == values]] = True
    except LayertapError:
        return False
    return bool(found.all())


def _taps_folder(shard: Path) -> Path:
    """The ``<store>.parts/<taps>`` folder a shard file is in (its ``computed/`` shards included)."""
    parts = _parts_of(shard)
    return parts / shard.relative_to(parts).parts[0]


def _parts_of(path: Path) -> Path | None:
    """The ``<store>.parts`` folder a shard file is in (None for a store)."""
    return next((parent for parent in path.parents if parent.suffix == ".parts"), None)


@dataclass
class Reuse:
    """What :func:`plan` decided: the jobs an engine runs, and the shards :meth:`finish` then writes."""

    donors: Donors | None = None
    run: list[ShardJob] = field(default_factory=list)  # shards computed as usual, and pending computed/ shards
    mixed: list[ShardJob] = field(default_factory=list)  # shards written from earlier and computed rows
    computed: list[ShardJob] = field(default_factory=list)  # the images of ``mixed`` no earlier store has
    planned: int = 0  # images of the shards to make whose rows are to come from earlier stores

    @property
    def reused(self) -> int:
        """Images whose rows this run took from earlier stores."""
        return self.donors.reused if self.donors else 0

    def finish(self, manifest: dict, class_names, taps: tuple[str, ...], dtype: str) -> list[ShardJob]:
        """Write the mixed shards once the computed ones are committed, and remove those.

        Returns:
            Shards that could not be written after all (an earlier store found damaged): to compute.
        """
        if not self.mixed:
            return []
        skipped = {}
        shards = [FeatureStore(job.path, kind="shard") for job in self.computed]
        self.donors.add(shards, earlier=False)
        for shard in shards:
            skipped.update(shard.skipped)
        try:
            left = self.donors.write_covered(self.mixed, manifest, class_names, taps, dtype, skipped)
        finally:
            self.donors.close()
        shutil.rmtree(self.computed[0].path.parent, ignore_errors=True)
        return [job for job, _ in left]


def plan(todo: list[ShardJob], out_dir, store_path: Path, manifest: dict, class_names, taps: tuple[str, ...],
         dtype: str, first_free: int, shard_size: int, committed) -> Reuse:
    """Write the shards of ``todo`` that earlier stores cover, and say what is left to run.

    Args:
        first_free: A list position past every image's (the computed shards' positions start there).
        committed: ``committed(path)``: whether a shard file is complete for this key and these taps.
    """
    donors = find_donors(out_dir, store_path, manifest, taps)
    if donors is None:
        return Reuse(run=todo)
    reuse = Reuse(donors)
    missing = []
    try:
        left = donors.write_covered(todo, manifest, class_names, taps, dtype)
    finally:
        donors.close()
    for job, hits in left:
        if any(hits):
            reuse.mixed.append(job)
            missing += [record for hit, record in zip(hits, job.records) if not hit]
        else:
            reuse.run.append(job)
    reuse.planned = sum(len(job.records) for job in todo) - sum(len(job.records) for job in reuse.run) - len(missing)
    for start in range(0, len(missing), shard_size):
        records = tuple(missing[start:start + shard_size])
        # Named by content too: a shard a stopped run committed is reused only for the same images.
        digest = hashlib.sha256("".join(r.fingerprint for r in records).encode()).hexdigest()[:16]
        path = todo[0].path.parent / "computed" / f"shard-{start:09d}-{digest}.h5"
        reuse.computed.append(ShardJob(first_free + start, first_free + start + len(records), path, todo[0].root,
                                       records))
    reuse.run += [job for job in reuse.computed if not committed(job.path)]
    return reuse


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # gone since it was listed: opening it fails next, and it is passed over
        return 0.0
