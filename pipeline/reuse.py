"""Features reused by content: images an earlier store computed with the same model settings are not computed again.

A store's key covers its whole image list, so one added, removed or edited photo gives a new key and a
new store. The features of an image, though, are a function of its bytes and the model settings alone
(extraction is a pure function of an image slice and the settings), so a new store's shard whose every
image has a row in an earlier store of the same settings (same backbone, weights, size, resize, decoder,
preprocessing, pooling, precision, stored type, Keras backend and version; matched by each file's
content hash) is written from that store's rows, and only the shards holding new or changed images are
decoded and computed. A reused row is the earlier store's row, bit for bit; a fresh extraction could
differ from it by the batch-composition tolerance (README: Measured here).

Donors are the complete stores in the same ``--out`` folder; ``--no-reuse`` computes everything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import LayertapError
from pipeline.shards import ShardJob
from pipeline.store import FeatureStore, Rows, write_shard

log = logging.getLogger(__name__)

# The cache key's material is these two lists: how features are computed from an image (a donor must match
# every one of them), and which images with which labels (what reuse looks past).
MODEL_FIELDS = ("backbone", "weights", "weights_sha256", "image_size", "resize", "interpolation", "draft", "decoder",
                "preprocessing", "pooling", "precision", "store_dtype", "keras_backend", "keras_version")
DATA_FIELDS = ("images_sha256", "n_images_listed", "class_names")


@dataclass
class Donors:
    """Earlier stores of the same model settings, and where each content hash has a row in them.

    Each store's fingerprints are held as one sorted array of bytes (32 bytes a row: 3.2 GB for 10^8
    rows, where a dict of Python strings would take several times that) and looked up by bisection.
    """

    stores: list[FeatureStore]
    keys: list[np.ndarray]  # each store's fingerprints, sorted
    rows: list[np.ndarray]  # the row of each of them

    @property
    def map_shapes(self) -> dict:
        return self.stores[0].map_shapes

    def lookup(self, fingerprints: list[str]) -> list[tuple[int, int] | None]:
        """``(store, row)`` for each fingerprint, from the newest store that has it, else None."""
        wanted = np.array([f.encode("utf-8", "surrogateescape") for f in fingerprints], dtype=bytes)
        found: list[tuple[int, int] | None] = [None] * len(fingerprints)
        for store, (keys, rows) in enumerate(zip(self.keys, self.rows)):
            at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
            for i in np.flatnonzero(keys[at] == wanted):
                found[i] = found[i] or (store, int(rows[at[i]]))
        return found

    def write_covered(self, jobs: list[ShardJob], manifest: dict, class_names, taps: tuple[str, ...],
                      dtype: str) -> tuple[list[ShardJob], int]:
        """Commit each job whose every image has a row here, from those rows; return the others and the
        number of images reused. A donor whose features cannot be read leaves its jobs to be computed."""
        class_index = {name: i for i, name in enumerate(class_names)}
        left, reused = [], 0
        for job in jobs:
            hits = self.lookup([record.fingerprint for record in job.records])
            if not hits or not all(hits):
                left.append(job)
                continue
            try:
                features = {tap: self._gather(hits, tap) for tap in taps}
            except LayertapError as exc:
                log.warning("not reusing features: %s", exc)
                left.append(job)
                continue
            records = job.records
            rows = Rows([r.path for r in records], [class_index[r.label] for r in records],
                        [r.split for r in records], [r.fingerprint for r in records])
            write_shard(job.path, rows=rows, features=features, class_names=class_names, skipped=[],
                        manifest={**manifest, "shard": [job.start, job.stop], "shard_taps": list(taps),
                                  "reused": True},
                        map_shapes=self.map_shapes, dtype=dtype)
            reused += len(records)
        return left, reused

    def _gather(self, hits: list[tuple[int, int]], tap: str) -> np.ndarray:
        """The rows ``hits`` of one tap, in that order (each donor read once, at increasing rows, as h5py asks)."""
        out = None
        by_store: dict[int, list[int]] = {}
        for position, (store, _) in enumerate(hits):
            by_store.setdefault(store, []).append(position)
        for store, positions in by_store.items():
            wanted = np.array([hits[p][1] for p in positions])
            unique, inverse = np.unique(wanted, return_inverse=True)
            values = self.stores[store].features(tap, unique)[inverse]
            if out is None:
                out = np.empty((len(hits), values.shape[1]), values.dtype)
            out[positions] = values
        return out


def find_donors(out_dir: str | Path, store_path: Path, manifest: dict, taps: tuple[str, ...]) -> Donors | None:
    """The complete stores in ``out_dir`` (other than ``store_path``) made with the :data:`MODEL_FIELDS` of
    ``manifest`` that hold every tap of ``taps``, newest first; None if there are none."""
    wanted = {k: manifest[k] for k in MODEL_FIELDS}
    stores = []
    candidates = [p for p in Path(out_dir).glob("*.h5") if p.resolve() != store_path.resolve()]
    for path in sorted(candidates, key=_mtime, reverse=True):
        try:
            store = FeatureStore(path)
        except (LayertapError, OSError):
            continue  # not a complete layertap store: nothing to reuse
        raw = store.manifest.raw
        if all(raw.get(k) == v for k, v in wanted.items()) and set(taps) <= set(store.taps):
            stores.append(store)
    donors = Donors([], [], [])
    for store in stores:
        try:
            fingerprints = store.columns()["fingerprints"].astype(bytes)
        except LayertapError:
            continue
        if len(fingerprints):
            order = np.argsort(fingerprints, kind="stable")
            donors.stores.append(store)
            donors.keys.append(fingerprints[order])
            donors.rows.append(order)
    return donors if donors.stores else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # gone since it was listed: opening it fails next, and it is passed over
        return 0.0
