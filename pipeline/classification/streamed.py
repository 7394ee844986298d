"""Stage two at stage one's scale: the ``probe`` trained on a tap streamed from its store, never held whole.

The training rows are read in shuffled chunks by a reading process (:class:`ShuffledEpochs`), the
standardisation comes from one streamed pass (:meth:`pipeline.store.feature_store.FeatureStore.moments`), every
C trains in the same passes (:func:`pipeline.heads.probe.train_all_cs`), C is chosen on the val rows in one more
pass, and the test rows are scored once, in one pass. Memory: a few chunks of features, and a label per row.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.core.evaluation import check_two_classes, score_predictions
from pipeline.core.parallel import follow_owner, kill_pool, worker_context
from pipeline.data.decoding import SEGMENT_PREFIX
from pipeline.store import virtual as virtual_store
from pipeline.store.feature_store import REPLACE
from pipeline.store.splits import Splits

CHUNK_BYTES = 64 << 20  # features read together (consecutive rows of the store), then shuffled with another chunk


def tap_bytes(store, tap: str) -> int:
    """What holding a tap in memory as float32 takes."""
    return len(store) * store.width(tap) * 4


def pair_plan(chunks: list[np.ndarray], rng):
    """Endless: for each epoch, the chunks in a random order taken two at a time, each pair as ``(its rows,
    sorted; a permutation of them; whether it is the epoch's last)``. Stores are often ordered by class: a chunk
    alone would hold few classes."""
    while True:
        order = rng.permutation(len(chunks))
        for pair in range(0, len(order), 2):
            picked = np.sort(np.concatenate([chunks[i] for i in order[pair:pair + 2]]))
            yield picked, rng.permutation(len(picked)), pair + 2 >= len(order)


class ShuffledEpochs:
    """Epochs of ``(features, class indices)`` over a tap's ``rows``, in batches: chunks of :data:`CHUNK_BYTES` of
    consecutive rows mixed two at a time (:func:`pair_plan`). Each call gives one epoch; :meth:`close` at the end.

    A reading process reads the next pair and writes its rows, shuffled, into shared memory while the step trains
    on this one: h5py holds Python's GIL while it reads, so a thread could not overlap the step (bench/NOTES.md,
    "Stage two at scale"). Memory: that slot and this pair's copy, whatever the store's size.

    Raises:
        LayertapError: the store's data is damaged, or the reading process died (named, with what to do).
    """

    def __init__(self, store, tap: str, rows: np.ndarray, labels: np.ndarray, batch_size: int, rng,
                 standardise: tuple[np.ndarray, np.ndarray] | None = None):
        import secrets
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import shared_memory

        self.store, self.labels, self.batch_size = store, labels, batch_size
        per_chunk = max(batch_size, CHUNK_BYTES // (4 * store.width(tap)))
        self._plan = pair_plan([rows[i:i + per_chunk] for i in range(0, len(rows), per_chunk)], rng)
        shape = (min(2 * per_chunk, len(rows)), store.width(tap))
        self._shm = shared_memory.SharedMemory(create=True, size=max(1, shape[0] * shape[1] * 4),
                                               name=f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
        self._slot = np.ndarray(shape, np.float32, self._shm.buf)
        self._pool = ProcessPoolExecutor(1, mp_context=worker_context(), initializer=_attach_reader,
                                         initargs=(self._shm.name, shape, str(store.path), tap, os.getpid(),
                                                   standardise))
        self._next = self._submit()

    def _submit(self):
        """The next pair's read, started: ``(rows, permutation, last of its epoch, future)``."""
        picked, mix, last = next(self._plan)
        return picked, mix, last, self._pool.submit(_read_pair, picked, mix)

    def __call__(self):
        last = False
        while not last:
            picked, mix, last, future = self._next
            with self._reader_errors():
                future.result()
                features = self._slot[:len(picked)].copy()  # the slot is the reader's again: the next pair goes there
                self._next = self._submit()  # read while this pair trains; after an epoch's last, the next's first
            y = self.labels[picked[mix]]
            for start in range(0, len(mix), self.batch_size):
                yield features[start:start + self.batch_size], y[start:start + self.batch_size]

    @contextlib.contextmanager
    def _reader_errors(self):
        from concurrent.futures.process import BrokenProcessPool

        try:
            yield
        except BrokenProcessPool:
            raise LayertapError(f"{self.store.path}: the process reading its features died (out of memory, or "
                                "killed); run again") from None
        except OSError as exc:  # a missing shard file, a chunk failing its checksum: named by the reader
            raise LayertapError(f"{self.store.path}: its features are damaged ({exc}); {REPLACE}") from None

    def close(self) -> None:
        kill_pool(self._pool)
        self._slot = None
        self._shm.close()
        self._shm.unlink()

    def __enter__(self) -> ShuffledEpochs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_READER: dict = {}


def _attach_reader(name: str, shape: tuple, store_path: str, tap: str, owner: int, standardise) -> None:
    """In the reading process: the shared slot, the tap's reader (kept open for every pair) and the
    standardisation ``(shift, inverse scale)`` or None."""
    import signal
    from multiprocessing import shared_memory

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the probe's process handles it
    shm = shared_memory.SharedMemory(name=name)
    _READER.update(shm=shm, slot=np.ndarray(shape, np.float32, shm.buf),
                   read=virtual_store.open_tap(Path(store_path), tap), standardise=standardise)
    follow_owner(owner)


def _read_pair(picked: np.ndarray, mix: np.ndarray) -> None:
    """In the reading process: the features of ``picked`` (increasing rows), in the order ``mix``, into the slot,
    standardised there (in place: the training process gets them ready for the step)."""
    out = _READER["slot"][:len(picked)]
    np.take(_READER["read"](picked).astype(np.float32, copy=False), mix, axis=0, out=out)
    if _READER["standardise"] is not None:
        shift, inverse = _READER["standardise"]
        out -= shift
        out *= inverse


def fit_streamed_probe(store, tap: str, splits: Splits, seed: int = 0, params: dict | None = None,
                       progress: bool = False):
    """``(estimator, metrics)`` as :func:`pipeline.heads.classifiers.train_one` returns them, for ``probe`` on a
    tap streamed from ``store`` (``progress``: a bar over its steps, on a terminal)."""
    from pipeline.heads.probe import LinearOutputs, StreamedProbe, standardiser, train_all_cs, val_scores

    check_two_classes(store.class_names, str(store.path))
    labels = store.labels  # read once per store (not store.rows: a Python string per row of its other columns)
    train, val, test = (splits.rows(name) for name in ("train", "val", "test"))
    if not len(val):
        raise LayertapError(f"{store.path.name}: no val rows to choose C on; split it with "
                            "pipeline.store.splits.resolve_splits")
    probe = StreamedProbe(**{"random_state": seed, **(params or {})})
    probe.classes_ = np.arange(len(store.class_names))
    missing = np.setdiff1d(probe.classes_, labels[train])
    if len(missing):
        raise LayertapError(f"class {', '.join(store.class_names[i] for i in missing)} has no training image in "
                            f"{store.path.name}")
    started = time.perf_counter()
    batch = store.batch_rows(tap, CHUNK_BYTES // 4)  # val and test batches, and the moments' (in float64)
    _, mean, variance = store.moments(tap, train, batch)
    rng = np.random.default_rng(seed)
    with ShuffledEpochs(store, tap, train, labels, probe.rows_per_step(len(train)), rng,
                        standardiser(mean, variance)) as epochs:
        weights = train_all_cs(epochs, probe.steps(len(train)), len(train), mean, variance, len(probe.classes_),
                               probe.Cs, probe.learning_rate, progress=progress)
    scores, val_predicted = val_scores(weights, ((v, labels[r]) for r, v in store.iter_batches(tap, val, batch)))
    val_predicted = val_predicted[:, probe.keep_best(weights, scores, len(train), len(val))]
    fit_seconds = time.perf_counter() - started
    chosen = LinearOutputs([(probe.kernel_, probe.bias_)])
    predicted, confidence, true_probability = [], [], []
    for rows, values in store.iter_batches(tap, test, batch):
        classes, log_p, true_log_p = (a[:, 0] for a in chosen(values, labels[rows]))
        predicted.append(classes)
        confidence.append(np.exp(log_p))
        true_probability.append(np.exp(true_log_p))
    predicted = np.concatenate(predicted) if predicted else np.zeros(0, int)
    metrics = {
        **score_predictions(labels[test], predicted, store.class_names),
        "confidence": np.concatenate(confidence or [np.zeros(0)]),
        "true_probability": np.concatenate(true_probability or [np.zeros(0)]),
        "val_accuracy": float((val_predicted == labels[val]).mean()), "val_predictions": val_predicted,
        "n_train": len(train), "n_val": len(val), "n_test": len(test), "fit_seconds": fit_seconds,
        "trainable_params": probe.trainable_params_, "chosen": dict(probe.fit_summary_), "streamed": True,
    }
    return probe, metrics
