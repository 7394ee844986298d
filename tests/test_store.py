"""Feature store files: atomic shards, merging, refusing foreign or unfinished files, locking."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline import LayertapError
from pipeline.store.feature_store import FeatureStore, Rows
from pipeline.store.writing import StoreLockedError, merge_shards, store_lock, write_shard

MANIFEST = {"key": "k" * 64, "pooling": "avg", "class_names": ["a", "b"], "backbone": "vgg16",
            "weights": "random-seed0", "weights_sha256": "0" * 64, "weights_arg": "random", "seed": 0,
            "image_size": 32}


def _shard(path, start, n, taps=("t1",), key=MANIFEST["key"]):
    rows = Rows([f"img{i}.jpg" for i in range(start, start + n)], [i % 2 for i in range(n)], ["train"] * n,
                ["f"] * n)
    features = {tap: np.full((n, 3), start + j, np.float32) + np.arange(n)[:, None] for j, tap in enumerate(taps)}
    return write_shard(path, rows=rows, features=features, class_names=["a", "b"], skipped=[("bad.jpg", "empty")],
                       manifest={**MANIFEST, "key": key}, map_shapes={t: (1, 1, 3) for t in taps},
                       dtype="float32")


def test_merge_joins_shards_in_order(tmp_path):
    shards = [_shard(tmp_path / "s0.h5", 0, 3), _shard(tmp_path / "s1.h5", 3, 2)]
    store = merge_shards(shards, tmp_path / "store.h5", manifest=MANIFEST, skipped=[("x.gif", "not an image")],
                         dtype="float16", compression="gzip")
    assert len(store) == 5 and store.taps == ("t1",) and store.dtype == "float16"
    assert store.rows.paths == [f"img{i}.jpg" for i in range(5)]
    np.testing.assert_array_equal(store.features("t1")[:, 0], [0, 1, 2, 3, 4])
    assert store.skipped == [("x.gif", "not an image"), ("bad.jpg", "empty"), ("bad.jpg", "empty")]
    with h5py.File(store.path) as fh:
        assert fh.attrs["complete"] and fh.attrs["backbone"] == "vgg16"
        assert fh["features/t1"].compression == "gzip"
    with pytest.raises(KeyError, match="has no tap 'nope'; it has: t1"):
        store.features("nope")


def test_merge_carries_over_base_taps(tmp_path):
    base = merge_shards([_shard(tmp_path / "a.h5", 0, 4, taps=("t1",))], tmp_path / "store.h5", manifest=MANIFEST)
    before = base.features("t1")
    extra = _shard(tmp_path / "b.h5", 0, 4, taps=("t2",))
    store = merge_shards([extra], tmp_path / "store.h5", manifest=MANIFEST, base=base)
    assert set(store.taps) == {"t1", "t2"}
    np.testing.assert_array_equal(store.features("t1"), before)


def test_shard_of_another_key_is_refused(tmp_path):
    shard = _shard(tmp_path / "s.h5", 0, 2, key="z" * 64)
    with pytest.raises(LayertapError, match="belongs to store key zzzzzzzzzzzz, not kkkkkkkkkkkk"):
        merge_shards([shard], tmp_path / "store.h5", manifest=MANIFEST)


def test_unfinished_and_foreign_files_are_refused(tmp_path):
    shard = _shard(tmp_path / "s.h5", 0, 2)
    with pytest.raises(LayertapError, match="is not a layertap store .*kind='shard'"):
        FeatureStore(shard)
    with h5py.File(shard, "r+") as fh:
        fh.attrs["complete"] = False
    with pytest.raises(LayertapError, match="is incomplete"):
        FeatureStore(shard, kind="shard")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(LayertapError, match="cannot be read as HDF5"):
        FeatureStore(tmp_path / "junk.h5")
    with pytest.raises(FileNotFoundError, match="run `layertap extract` first"):
        FeatureStore(tmp_path / "absent.h5")
    with pytest.raises(FileNotFoundError, match=r"is a folder, not a feature store; give one of its .h5 files "
                                                r"\(junk.h5, s.h5\)"):
        FeatureStore(tmp_path)


def test_a_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "s.h5"
    with pytest.raises(KeyError):
        write_shard(target, rows=Rows(["a"], [0], [""], ["f"]), features={"t": np.zeros((1, 2))},
                    class_names=["a"], skipped=[], manifest=MANIFEST, map_shapes={}, dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_second_writer_gets_a_clear_error(tmp_path):
    store = tmp_path / "x.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path\n"
         "from pipeline.store.writing import store_lock\n"
         "with store_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)", str(store)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match="another process is extracting into .*x.h5"):
            with store_lock(store):
                pass
    finally:
        holder.kill()
        holder.wait()
    with store_lock(store):  # the lock dies with its holder, even when killed
        pass


@pytest.mark.parametrize("merge", ["copy", "virtual"])
def test_batches_stream_a_tap_in_store_order_all_rows_or_some(tmp_path, merge):
    import numpy as np

    from conftest import make_class_folder, tiny_settings
    from pipeline.extraction.extract import extract_features
    from pipeline.store.feature_store import FeatureStore

    data = make_class_folder(tmp_path / "data", per_class=6)
    store = FeatureStore(extract_features(tiny_settings(data, tmp_path / "f", merge=merge)).store_path)
    whole = store.features("block2_pool")
    batches = list(store.iter_batches("block2_pool", batch_size=5, read_ahead=1))
    assert [len(rows) for rows, _ in batches] == [5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate([v for _, v in batches]), whole)
    np.testing.assert_array_equal(np.concatenate([r for r, _ in batches]), np.arange(18))
    some = np.array([0, 3, 4, 11, 17])
    rows, values = zip(*store.iter_batches("block2_pool", rows=some, batch_size=2))
    np.testing.assert_array_equal(np.concatenate(values), whole[some])
    np.testing.assert_array_equal(np.concatenate(rows), some)
    first = next(iter(store.iter_batches("block2_pool", batch_size=4)))  # left early: the reader stops
    assert len(first[0]) == 4
    with pytest.raises(ValueError, match="batch_size=0"):  # not the default size in disguise
        next(store.iter_batches("block2_pool", batch_size=0))
    count, mean, variance = store.moments("block2_pool", batch_size=4)
    assert count == 18
    np.testing.assert_allclose(mean, whole.astype(np.float64).mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(variance, whole.astype(np.float64).var(axis=0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("merge", ["copy", "virtual"])
def test_rows_in_any_order_or_a_mask_come_back_as_asked_and_a_row_outside_is_named(tmp_path, merge):
    """HDF5 reads increasing rows; a caller's rows in another order were read wrong or failed in NumPy's words."""
    from conftest import make_class_folder, tiny_settings
    from pipeline.extraction.extract import extract_features

    data = make_class_folder(tmp_path / "data", per_class=6)
    store = FeatureStore(extract_features(tiny_settings(data, tmp_path / "f", merge=merge)).store_path)
    whole, paths = store.features("block2_pool"), store.columns(["paths"])["paths"]
    for rows in (np.array([17, 0, 9, 9, 3]), np.arange(5, -1, -1, dtype=np.int32)):
        np.testing.assert_array_equal(store.features("block2_pool", rows), whole[rows])
        joined = store.features("block1_pool+block2_pool", rows)
        np.testing.assert_array_equal(joined[:, -whole.shape[1]:], whole[rows])
        batch_rows, values = zip(*store.iter_batches("block2_pool", rows=rows, batch_size=2))
        np.testing.assert_array_equal(np.concatenate(batch_rows), rows)
        np.testing.assert_array_equal(np.concatenate(values), whole[rows])
        np.testing.assert_array_equal(store.column_at("paths", rows), paths[rows])
    mask = np.arange(18) % 3 == 1
    np.testing.assert_array_equal(store.features("block2_pool", mask), whole[mask])
    np.testing.assert_array_equal(np.concatenate([r for r, _ in store.iter_batches("block2_pool", rows=mask)]),
                                  np.flatnonzero(mask))
    for bad, says in ((np.array([3, 18]), "has 18 rows .*row 18"), (np.array([-1]), "row -1"),
                      (np.ones(17, bool), "one entry per row"), (np.array([0.0, 2.0]), "integer indices")):
        with pytest.raises(IndexError, match=f"{store.path.name}.*{says}"):
            store.features("block2_pool", bad)
    with pytest.raises(IndexError, match="row 18"):
        next(store.iter_batches("block2_pool", rows=np.array([0, 18])))


def test_streamed_moments_stay_exact_where_the_mean_dwarfs_the_spread(tmp_path, monkeypatch):
    """A running sum of squares loses the variance of features near 1e6 with a spread of 1e-2 entirely."""
    import numpy as np

    from pipeline.store.feature_store import FeatureStore

    rng = np.random.default_rng(0)
    values = (1e6 + rng.normal(0, 1e-2, size=(10_000, 3))).astype(np.float64)

    class Fake(FeatureStore):
        def __init__(self):
            self.dims, self.taps = {"t": 3}, ("t",)

        def iter_batches(self, tap, rows=None, batch_size=65_536, read_ahead=2):
            for start in range(0, len(values), batch_size):
                yield np.arange(start, start + batch_size), values[start:start + batch_size]

    count, mean, variance = Fake().moments("t", batch_size=333)
    np.testing.assert_allclose(variance, values.var(axis=0), rtol=1e-6)
    naive = (values ** 2).mean(axis=0) - values.mean(axis=0) ** 2
    assert not np.allclose(naive, values.var(axis=0), rtol=0.5, atol=0)  # what the pairwise update avoids


def test_streaming_a_tap_holds_a_few_batches_not_the_tap(tmp_path):
    import tracemalloc

    n, dims = 20_000, 256  # 20 MB of float32
    rows = Rows([f"img{i}.jpg" for i in range(n)], [i % 2 for i in range(n)], ["train"] * n, ["f"] * n)
    shard = write_shard(tmp_path / "s.h5", rows=rows, features={"t": np.ones((n, dims), np.float32)},
                        class_names=["a", "b"], skipped=[], manifest=MANIFEST, map_shapes={"t": (1, 1, dims)},
                        dtype="float32")
    store = merge_shards([shard], tmp_path / "store.h5", manifest=MANIFEST, skipped=[], dtype="float32")
    tracemalloc.start()
    total = sum(float(values.sum()) for _, values in store.iter_batches("t", batch_size=1_000, read_ahead=2))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total == n * dims
    assert peak < 6 * 1_000 * dims * 4, f"{peak:,} bytes at most at once; the tap is {n * dims * 4:,}"


def test_splits_labels_and_the_test_fingerprint_come_from_columns_not_rows(tmp_path):
    """At 10^8 rows, Rows is a Python string per row and column: the split, the labels and the fingerprint of
    the test images are read as columns, and the fingerprint is the one older model folders carry."""
    import hashlib

    from pipeline.store.splits import resolve_splits, test_rows_sha256

    shards = [_shard(tmp_path / "s0.h5", 0, 6), _shard(tmp_path / "s1.h5", 6, 6)]
    store = merge_shards(shards, tmp_path / "store.h5", manifest=MANIFEST, skipped=[], dtype="float32")
    with h5py.File(store.path, "r+") as fh:  # a recorded split, train and test only: val is carved
        del fh.attrs["columns_sha256"]
        fh["split"][...] = np.array([b"train", b"test"] * 6, dtype=object)
    store = FeatureStore(store.path)
    splits, source = resolve_splits(store, seed=0, val_fraction=0.3)
    fingerprint, labels = test_rows_sha256(store, splits), store.labels
    assert store._rows is None, "no Rows were built"
    assert sorted(set(splits.names())) == ["test", "train", "val"] and "val carved from train" in source
    old = hashlib.sha256("\n".join(p for p, s in zip(store.rows.paths, splits.names()) if s == "test")
                         .encode("utf-8", "surrogateescape")).hexdigest()
    assert fingerprint == old and labels.tolist() == store.rows.labels


def test_a_split_is_a_byte_a_row_and_a_wrong_name_is_refused_not_matched_by_no_row(tmp_path):
    """The split held through training is one int8 code a row; compared with a name it is that split's mask, as
    the recorded strings would be, and a misspelt name raises instead of selecting nothing."""
    from pipeline.store.splits import Splits

    rows = Rows([f"img{i}.jpg" for i in range(6)], [0, 1] * 3, ["train", "val", "test", "", "train", "test"],
                ["f"] * 6)
    shard = write_shard(tmp_path / "s0.h5", rows=rows, features={"t1": np.zeros((6, 3), np.float32)},
                        class_names=["a", "b"], skipped=[], manifest=MANIFEST, map_shapes={"t1": (1, 1, 3)},
                        dtype="float32")
    store = FeatureStore(merge_shards([shard], tmp_path / "store.h5", manifest=MANIFEST, skipped=[],
                                      dtype="float32").path)
    splits, recorded = store.splits, np.array(store.rows.splits, dtype=object)
    assert splits.codes.dtype == np.int8 and splits.codes.nbytes == len(store)
    np.testing.assert_array_equal(splits.names(), recorded)
    for name in ("train", "val", "test", ""):
        np.testing.assert_array_equal(splits == name, recorded == name)
        np.testing.assert_array_equal(splits != name, recorded != name)
        np.testing.assert_array_equal(splits.rows(name), np.flatnonzero(recorded == name))
    with pytest.raises(ValueError, match="'tset' is not a split"):
        splits.rows("tset")
    made = Splits(np.zeros(4, np.int8))
    made.assign(np.array([1, 3]), "val")
    assert made.names().tolist() == ["", "val", "", "val"]


def test_a_string_column_streams_in_slices_checked_whole(tmp_path):
    """column_slices gives what columns() gives, a slice at a time, and its sha256 over the slices is the
    column's; a column changed since it was written is refused after the last slice, as columns() refuses it."""
    shards = [_shard(tmp_path / "s0.h5", 0, 6), _shard(tmp_path / "s1.h5", 6, 7)]
    store = merge_shards(shards, tmp_path / "store.h5", manifest=MANIFEST, skipped=[], dtype="float32")
    whole = store.columns(("paths",))["paths"]
    starts, parts = zip(*store.column_slices("paths", size=4))
    assert starts == (0, 4, 8, 12) and np.concatenate(parts).tolist() == whole.tolist()
    assert store.column_at("paths", np.array([1, 5, 12])).tolist() == whole[[1, 5, 12]].tolist()
    with h5py.File(store.path, "r+") as fh:
        fh["paths"][9] = b"swapped.jpg"
    with pytest.raises(LayertapError, match="its paths column is not what was written"):
        list(FeatureStore(store.path).column_slices("paths", size=4))
