"""Virtual stores (--merge virtual): the features stay in the shard files, mapped, read and checked shard by shard."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

from conftest import make_split_folder, tiny_settings
from pipeline import LayertapError
from pipeline.extraction.extract import extract_features
from pipeline.store.feature_store import FeatureStore
from pipeline.store.virtual import shards_dir

TAPS = ("block1_pool", "block2_pool")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_split_folder(tmp_path_factory.mktemp("virtual") / "splits", train=3, val=1, test=2)


@pytest.fixture(scope="module")
def copied(data, tmp_path_factory) -> FeatureStore:
    return FeatureStore(extract_features(tiny_settings(data, tmp_path_factory.mktemp("copy"))).store_path)


def test_a_virtual_store_has_the_same_features_without_copying_them_and_moves_with_its_folder(data, copied,
                                                                                              tmp_path):
    made = extract_features(tiny_settings(data, tmp_path / "a", merge="virtual"))
    assert made.store_path.name == copied.path.name, "the merge is not part of the key"
    store = FeatureStore(made.store_path)
    shards = list(shards_dir(made.store_path).rglob("shard-*.h5"))
    assert len(shards) == 5 and not list((tmp_path / "a").glob("*.parts"))
    for tap in TAPS:
        np.testing.assert_array_equal(store.features(tap), copied.features(tap))
        np.testing.assert_array_equal(store.features(tap, np.array([0, 5])), copied.features(tap)[[0, 5]])
    import h5py

    with h5py.File(made.store_path) as fh:  # what another HDF5 tool sees: one dataset per tap
        assert fh["features/block2_pool"].is_virtual
        np.testing.assert_array_equal(fh["features/block2_pool"][()], copied.features("block2_pool"))

    from pipeline.runs.reports import store_summary

    assert "5 shard files in <store>.shards/block1_pool-block2_pool-" in store_summary(store)  # layertap inspect
    assert "this file" in store_summary(copied)

    os.rename(tmp_path / "a", tmp_path / "moved")  # the mapping is relative to the store
    moved = FeatureStore(tmp_path / "moved" / made.store_path.name)
    np.testing.assert_array_equal(moved.features("block1_pool"), copied.features("block1_pool"))
    assert extract_features(tiny_settings(data, tmp_path / "moved", merge="virtual")).cache_hit


def test_another_tap_keeps_the_first_taps_shards_and_a_lost_shard_is_named_then_replaced(data, copied, tmp_path):
    first = extract_features(tiny_settings(data, tmp_path, merge="virtual", layers=("block1_pool",)))
    more = extract_features(tiny_settings(data, tmp_path, merge="virtual"))
    assert more.computed_taps == ("block2_pool",)
    folders = sorted(p.name for p in shards_dir(first.store_path).iterdir())
    assert len(folders) == 2 and folders[0].startswith("block1_pool-") and folders[1].startswith("block2_pool-")

    lost = sorted(shards_dir(first.store_path).glob("block1_pool-*/shard-*.h5"))[1]
    lost.unlink()
    with pytest.raises(LayertapError, match=rf"block1_pool are damaged \(shard file {re.escape(str(lost))} is missing\)"
                                            r".*extract` again"):
        FeatureStore(more.store_path).features("block1_pool")  # HDF5 alone would fill the rows with NaN

    again = extract_features(tiny_settings(data, tmp_path, merge="virtual"))
    assert again.computed_taps == TAPS, "a store that fails its check is extracted again"
    for tap in TAPS:
        np.testing.assert_array_equal(FeatureStore(again.store_path).features(tap), copied.features(tap))
    assert len(list(shards_dir(first.store_path).iterdir())) == 1, "folders no tap maps any more are removed"

    shutil.rmtree(shards_dir(first.store_path) / next(shards_dir(first.store_path).iterdir()).name)
    copy = extract_features(tiny_settings(data, tmp_path))  # back to a copied store: the folder goes
    assert copy.computed_taps == TAPS and not shards_dir(first.store_path).exists()


def test_a_damaged_chunk_in_a_shard_is_one_line_naming_the_shard(data, tmp_path):
    import h5py

    made = extract_features(tiny_settings(data, tmp_path, merge="virtual"))
    shard = sorted(shards_dir(made.store_path).rglob("shard-*.h5"))[0]
    with h5py.File(shard, "r") as fh:
        offset = fh["features/block2_pool"].id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as fh:
        fh.seek(offset + 16)
        fh.write(os.urandom(64))
    damaged = rf"block2_pool are damaged \(shard file {re.escape(str(shard))} cannot be read"
    with pytest.raises(LayertapError, match=damaged):
        FeatureStore(made.store_path).verify()
