"""`probe`: the linear probe of every C at once, C chosen on val, saved as arrays, run by predict and export."""

from __future__ import annotations

import numpy as np

from pipeline.heads import probe as probe_module
from pipeline.heads.classifiers import make_classifier
from pipeline.heads.probe import StreamedProbe

GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def _blobs(seed=0, n=1500, d=64, classes=4):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    X = (centers[y] * 0.3 + rng.normal(size=(n, d)) * rng.uniform(0.5, 20, d) + 50).astype(np.float32)
    return X, y


def test_the_probe_scores_as_scikit_learns_logistic_regression_and_chooses_c_on_val():
    X, y = _blobs()
    train, val, test = slice(0, 1000), slice(1000, 1250), slice(1250, None)
    probe = make_classifier("probe:{\"epochs\": 20}").fit(X[train], y[train], validation_data=(X[val], y[val]))
    logreg = make_classifier('logreg:{"Cs": %s}' % list(GRID)).fit(X[train], y[train])
    ours, theirs = (probe.predict(X[test]) == y[test]).mean(), (logreg.predict(X[test]) == y[test]).mean()
    assert abs(ours - theirs) <= 0.03, (ours, theirs)
    chosen, summary = GRID.index(probe.fit_summary_["C"]), probe.fit_summary_
    assert chosen == probe_module.best_c(list(zip(summary["val_accuracy_by_C"], summary["val_loss_by_C"])), 250)
    np.testing.assert_allclose(probe.predict_proba(X[:5]).sum(axis=1), 1, atol=1e-6)


def test_c_is_the_lowest_val_cross_entropy_among_the_cs_val_accuracy_cannot_tell_apart():
    """bench/NOTES.md, "Which rule chooses the probe's C": within a standard error of the best val accuracy the
    cross-entropy decides; beyond it, accuracy does."""
    scores = [(0.70, 0.90), (0.70, 0.80), (0.72, 0.95)]
    assert probe_module.best_c(scores, 204) == 1  # 204 images: 3.1 points of standard error, all three tie
    assert probe_module.best_c(scores, 40_000) == 2  # 40,000 rows: 0.2 points, 0.72 is better


def test_every_c_trains_in_one_read_of_the_data_per_epoch(monkeypatch):
    X, y = _blobs(n=300)
    epochs = []
    original = probe_module.train_all_cs

    def counting(batches, *args, **kwargs):
        def counted():
            epochs.append(1)
            return batches()
        return original(counted, *args, **kwargs)

    monkeypatch.setattr(probe_module, "train_all_cs", counting)
    StreamedProbe(epochs=3, batch_size=128).fit(X, y, validation_data=(X, y))
    assert len(epochs) == 3  # eight Cs, three passes


def test_the_probe_is_seeded_and_saved_as_arrays_only(tmp_path):
    X, y = _blobs(n=400)
    first = StreamedProbe(epochs=3).fit(X, y)
    second = StreamedProbe(epochs=3).fit(X, y)
    np.testing.assert_array_equal(first.kernel_, second.kernel_)
    fmt, name, _ = first.save_artifact(tmp_path)
    assert (fmt, name) == ("probe", "probe.npz")
    with np.load(tmp_path / name, allow_pickle=False) as arrays:  # no object arrays: nothing to unpickle
        assert {k: arrays[k].dtype.kind for k in arrays.files}.keys() >= {"kernel", "bias", "classes"}
    loaded = StreamedProbe.load_artifact((tmp_path / name).read_bytes())
    np.testing.assert_array_equal(loaded.predict_proba(X), first.predict_proba(X))


def test_classify_trains_it_and_predict_runs_it(tmp_path):
    from conftest import make_split_folder, tiny_settings
    from pipeline.classification.classify import classify
    from pipeline.classification.settings import ClassifySettings
    from pipeline.extraction.extract import extract_features
    from pipeline.heads.classifiers import probe_weights
    from pipeline.prediction.predict import predict
    from pipeline.runs.artifacts import load_model

    data = make_split_folder(tmp_path / "data", train=4, val=2, test=2)
    store = extract_features(tiny_settings(data, tmp_path / "f")).store_path
    result = classify(ClassifySettings(store=str(store), classifiers=('probe:{"epochs": 5}',),
                                       layers=("block2_pool",), out_dir=str(tmp_path / "m")))
    model_dir = next(result.run_dir.glob("block2_pool-probe*"))
    assert (model_dir / "probe.npz").is_file() and "C" in result.best["chosen"]
    estimator, _ = load_model(model_dir)
    kernel, bias = probe_weights(estimator)  # what stage three and export fold
    assert kernel.shape == (128, 3) and bias.shape == (3,)
    rows = predict(model_dir, sorted((data / "test").rglob("*.jpg")), top_k=1)
    assert all(row["top"][0][0] in ("red", "green", "blue") for row in rows)


def test_a_tap_over_the_memory_budget_trains_the_streamed_probe_alone(tmp_path, caplog):
    from conftest import make_split_folder, tiny_settings
    from pipeline.classification.classify import classify
    from pipeline.classification.settings import ClassifySettings
    from pipeline.extraction.extract import extract_features
    from pipeline.store.feature_store import FeatureStore

    data = make_split_folder(tmp_path / "data", train=4, val=2, test=2)
    store = extract_features(tiny_settings(data, tmp_path / "f")).store_path
    with caplog.at_level("WARNING"):
        result = classify(ClassifySettings(store=str(store), classifiers=("logreg", "knn"), layers=("block2_pool",),
                                           memory_budget=1e-6, out_dir=str(tmp_path / "m")))
    size = FeatureStore(store).features("block2_pool").nbytes  # 24 images x 128 features: 12 KiB in float32
    assert f"block2_pool: its features take {size / 1024:.0f} KiB, more than the memory budget of 1 KiB" in caplog.text
    assert "logreg, knn need them whole and are skipped for it" in caplog.text
    assert [r["classifier"] for r in result.rows] == ["probe"] and result.rows[0]["chosen"]["C"] > 0
    from pipeline.runs.per_image import read_metrics

    metrics = read_metrics(result.run_dir / "block2_pool-probe")
    assert metrics["streamed"] and metrics["n_test"] == len(metrics["true_probability"]) == 6


def _store(folder, n: int, dims: int, features=None, labels=None, shards: int = 1, virtual: bool = False):
    """A store of ``n`` rows of tap ``t`` (two classes, random splits), written as ``shards`` shards."""
    from pipeline.store.feature_store import FeatureStore, Rows
    from pipeline.store.writing import merge_shards, write_shard

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n) if labels is None else labels
    features = (rng.normal(size=(n, dims)) + labels[:, None]).astype(np.float32) if features is None else features
    splits = np.array(["train", "val", "test"])[rng.integers(0, 3, n)]
    manifest = {"key": "k" * 64, "pooling": "avg", "class_names": ["a", "b"], "backbone": "vgg16",
                "weights": "random-seed0", "weights_sha256": "0" * 64, "weights_arg": "random", "seed": 0,
                "image_size": 32}
    written = []
    for i, part in enumerate(np.array_split(np.arange(n), shards)):
        rows = Rows([f"img{j}.jpg" for j in part], labels[part].tolist(), splits[part].tolist(), ["f"] * len(part))
        written.append(write_shard(folder / f"s{i}.h5", rows=rows, features={"t": features[part]},
                                   class_names=["a", "b"], skipped=[], manifest=manifest,
                                   map_shapes={"t": (1, 1, dims)}, dtype="float32"))
    store = FeatureStore(merge_shards(written, folder / "store.h5", manifest=manifest, skipped=[], dtype="float32",
                                      virtual=virtual).path)
    return store, store.splits


def test_the_streamed_probe_holds_a_few_chunks_not_the_tap(tmp_path, monkeypatch):
    """Training, choosing C and testing read the tap in chunks: traced memory stays a fraction of the tap."""
    import tracemalloc

    from pipeline.classification import streamed

    n, dims = 40_000, 256  # 41 MB of float32
    store, splits = _store(tmp_path, n, dims)  # its labels not read yet
    monkeypatch.setattr(streamed, "CHUNK_BYTES", 2 << 20)
    from pipeline.core.runtime import import_keras

    import_keras().ops.zeros((1,))  # the framework's import is no part of what is measured
    tracemalloc.start()
    probe, metrics = streamed.fit_streamed_probe(store, "t", splits, params={"epochs": 1, "batch_size": 512})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert metrics["accuracy"] > 0.9 and metrics["streamed"]
    assert peak < (n * dims * 4) / 3, f"{peak:,} bytes at most at once; the tap is {n * dims * 4:,}"


def test_the_streamed_probe_reads_its_val_rows_once_and_its_outputs_are_predicts(tmp_path, monkeypatch):
    """Choosing C and the val predictions come from one read of the val rows; the scores computed on the backend
    are what the saved probe's ``predict`` gives on the same rows."""
    from pipeline.classification import streamed

    store, splits = _store(tmp_path, 3000, 16)
    val, test = np.flatnonzero(splits == "val"), np.flatnonzero(splits == "test")
    reads, original = [], type(store).iter_batches

    def counting(self, tap, rows=None, *args, **kwargs):
        reads.append(np.asarray(rows).tolist())
        return original(self, tap, rows, *args, **kwargs)

    monkeypatch.setattr(type(store), "iter_batches", counting)
    probe, metrics = streamed.fit_streamed_probe(store, "t", splits, params={"epochs": 1})
    assert reads.count(val.tolist()) == 1 and reads.count(test.tolist()) == 1
    np.testing.assert_array_equal(metrics["val_predictions"], probe.predict(store.features("t", val)))
    np.testing.assert_array_equal(metrics["predictions"], probe.predict(store.features("t", test)))
    np.testing.assert_allclose(metrics["confidence"], probe.predict_proba(store.features("t", test)).max(axis=1),
                               atol=1e-4)
    chosen = probe.Cs.index(probe.fit_summary_["C"])
    assert round(metrics["val_accuracy"], 4) == metrics["chosen"]["val_accuracy_by_C"][chosen]


def test_training_epochs_come_from_a_reading_process_each_row_once_in_a_seeded_order(tmp_path, monkeypatch):
    """Every row of the training rows once an epoch with its own label, chunks mixed (not in store order), the
    order a function of the seed; and this process never opens the tap to train (the reader does)."""
    from pipeline.classification import streamed
    from pipeline.store import virtual

    n = 3000
    features = np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1)  # a row's features are its index
    labels = np.random.default_rng(1).integers(0, 2, n)
    store, _ = _store(tmp_path, n, 4, features=features, labels=labels, shards=3, virtual=True)
    rows = np.arange(0, n, 3, dtype=np.int32)
    monkeypatch.setattr(streamed, "CHUNK_BYTES", 4 * 4 * 200)  # chunks of 200 rows: 5 pairs an epoch

    def nowhere(*args):
        raise AssertionError("the training process opened the tap")

    monkeypatch.setattr(virtual, "open_tap", nowhere)
    orders = []
    for _ in range(2):
        with streamed.ShuffledEpochs(store, "t", rows, labels, 64, np.random.default_rng(7)) as epochs:
            seen = []
            for _ in range(2):
                batches = list(epochs())
                assert max(len(x) for x, _ in batches) == 64
                index = np.concatenate([x[:, 0] for x, _ in batches]).astype(int)
                np.testing.assert_array_equal(np.sort(index), rows)  # each row once
                np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels[index])
                seen.append(index)
        assert not np.array_equal(seen[0], seen[1])  # each epoch its own order
        assert len(np.unique(seen[0][:400] // 600)) == 2 and np.any(np.diff(seen[0][:64]) < 0)  # 2 chunks, mixed
        orders.append(seen)
    np.testing.assert_array_equal(orders[0], orders[1])  # the same seed, the same batches
    shift, inverse = np.float32([1, 2, 3, 4]), np.float32([0.5, 0.25, 2, 1])
    with streamed.ShuffledEpochs(store, "t", rows, labels, 64, np.random.default_rng(7), (shift, inverse)) as epochs:
        x = np.concatenate([x for x, _ in epochs()])  # standardised by the reader, ready for the step
    np.testing.assert_allclose(x, (orders[0][0][:, None] - shift) * inverse)


def test_a_missing_shard_or_a_dead_reader_is_one_error_and_frees_the_shared_memory(tmp_path):
    import os
    import signal

    import pytest

    from conftest import leaked_segments
    from pipeline.classification.streamed import ShuffledEpochs
    from pipeline.core.errors import LayertapError

    store, _ = _store(tmp_path, 600, 4, shards=2, virtual=True)
    rows = np.arange(600, dtype=np.int32)
    with ShuffledEpochs(store, "t", rows, store.labels, 32, np.random.default_rng(0)) as epochs:
        for process in epochs._pool._processes.values():
            os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(LayertapError, match="the process reading its features died"):
            list(epochs())
    from pipeline.store.virtual import shard_files

    shard_files(store.path, "t")[-1].unlink()
    with ShuffledEpochs(store, "t", rows, store.labels, 32, np.random.default_rng(0)) as epochs:
        with pytest.raises(LayertapError, match=r"store.h5: its features are damaged \(shard file .* is missing"):
            list(epochs())
    assert not leaked_segments([os.getpid()])


def test_steps_grow_with_the_training_rows_and_small_data_keeps_its_schedule():
    """816 rows (flowers17's train split) keep the schedule MIN_STEPS was chosen with on val (128 rows a step);
    at scale a step takes more rows, so an epoch is a few hundred steps, not tens of thousands."""
    from pipeline.heads.probe import BIG_BATCH, MIN_STEPS, SMALL_BATCH, StreamedProbe

    probe = StreamedProbe()
    assert probe.rows_per_step(816) == SMALL_BATCH == 128 and probe.steps(816) >= MIN_STEPS
    assert probe.rows_per_step(400_000) == 1333 and probe.steps(400_000) == 5 * 301
    assert probe.rows_per_step(3_200_000) == BIG_BATCH and probe.steps(3_200_000) == 5 * 782
    assert StreamedProbe(batch_size=64).rows_per_step(3_200_000) == 64


def test_the_probe_s_steps_are_a_progress_bar_on_a_terminal_only(monkeypatch, capsys):
    import pipeline.core.parallel as parallel

    X, y = _blobs(n=300, d=8)
    mean, variance = X.mean(axis=0), X.var(axis=0)

    def batches():
        standardised = (X - mean) / np.sqrt(variance)
        return ((standardised[i:i + 100], y[i:i + 100]) for i in range(0, len(X), 100))

    def train(progress):
        weights = probe_module.train_all_cs(batches, 7, len(X), mean, variance, 4, GRID, 0.01, progress=progress)
        return capsys.readouterr().err, weights

    quiet, weights = train(False)
    piped, _ = train(True)  # stderr is no terminal under pytest
    monkeypatch.setattr(parallel, "on_terminal", lambda: True)
    shown, same = train(True)
    assert quiet == piped == "" and "probe, 8 Cs" in shown and "/7 " in shown
    for (a, b), (c, d) in zip(weights, same):  # the bar changes nothing it counts
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
