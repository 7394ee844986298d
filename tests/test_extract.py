"""Stage one end to end: stores, the cache, missing taps, bad images, kill-and-resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import pipeline.extraction.engines.local as local_engine
import pipeline.extraction.shards as shards_module
from conftest import ROOT, SHARED_DATA, add_bad_files, leaked_segments, processes_marked, tiny_settings
from pipeline import LayertapError
from pipeline.extraction.extract import ExtractSettings, extract_features
from pipeline.store.feature_store import FeatureStore


def test_store_holds_features_labels_and_provenance(split_folder, tmp_path):
    result = extract_features(tiny_settings(split_folder, tmp_path / "f"))
    store = FeatureStore(result.store_path)
    assert result.n_decoded == len(store) == 18 and result.computed_taps == ("block1_pool", "block2_pool")
    assert store.dims == {"block1_pool": 64, "block2_pool": 128}
    assert store.class_names == ("blue", "green", "red")
    assert store.features("block1_pool").shape == (18, 64) and store.features("block1_pool").dtype == np.float32
    assert sorted(set(store.rows.splits)) == ["test", "train", "val"]
    m = store.manifest
    assert (m.backbone, m.weights, m.image_size, m.pooling) == ("vgg16", "random-seed0", 32, "avg")
    assert len(m.weights_sha256) == 64 and m.keras_version and m.versions["h5py"]
    assert m.raw["settings"]["batch_size"] == 4 and store.key == m.key
    assert result.store_path.name.startswith("splits-vgg16-random-seed0-32px-avg-")
    assert not list((tmp_path / "f").glob("*.parts"))


def test_second_run_decodes_no_image(split_folder, tmp_path, monkeypatch):
    settings = tiny_settings(split_folder, tmp_path / "f")
    first = extract_features(settings)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started on a cache hit")

    monkeypatch.setattr(local_engine, "decoded_batches", no_decoding)
    second = extract_features(tiny_settings(split_folder, tmp_path / "f", batch_size=2, workers=1))
    assert second.cache_hit and second.n_decoded == 0
    assert second.store_path == first.store_path


def test_another_tap_computes_only_that_tap(split_folder, tmp_path):
    first = extract_features(tiny_settings(split_folder, tmp_path / "f", layers=("block2_pool",)))
    before = FeatureStore(first.store_path).features("block2_pool")
    more = extract_features(tiny_settings(split_folder, tmp_path / "f", layers=("block1_pool", "block2_pool")))
    assert more.store_path == first.store_path and more.computed_taps == ("block1_pool",)
    store = FeatureStore(more.store_path)
    assert set(store.taps) == {"block1_pool", "block2_pool"}
    np.testing.assert_array_equal(store.features("block2_pool"), before)
    assert set(store.manifest.taps) == {"block1_pool", "block2_pool"}


def test_key_changes_with_what_changes_the_numbers(split_folder, tmp_path):
    base = extract_features(tiny_settings(split_folder, tmp_path / "f")).store_path
    assert extract_features(tiny_settings(split_folder, tmp_path / "f", pooling="max")).store_path != base
    assert extract_features(tiny_settings(split_folder, tmp_path / "f", seed=1)).store_path != base
    (split_folder / "train" / "red" / "img_0.jpg").write_bytes(
        (split_folder / "train" / "red" / "img_1.jpg").read_bytes())  # same name, new content
    assert extract_features(tiny_settings(split_folder, tmp_path / "f")).store_path != base


def test_a_changed_split_file_gives_a_store_with_the_new_splits(class_folder, tmp_path):
    """Same files, same labels, one image moved from train to test: a new key (never the old splits), and
    every feature is taken from the first store by content."""
    rows = [f"{p.parent.name}/{p.name},{p.parent.name},{'test' if p.name == 'img_0.jpg' else 'train'}"
            for p in sorted(class_folder.glob("*/*.jpg"))]
    split_file = tmp_path / "split.csv"
    split_file.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    first = extract_features(tiny_settings(class_folder, tmp_path / "f", split_file=str(split_file)))
    split_file.write_text(split_file.read_text().replace("red/img_1.jpg,red,train", "red/img_1.jpg,red,test"))
    second = extract_features(tiny_settings(class_folder, tmp_path / "f", split_file=str(split_file)))
    assert second.store_path != first.store_path and (second.n_decoded, second.n_reused) == (0, len(rows))
    rows = FeatureStore(second.store_path).rows
    assert rows.splits[rows.paths.index("red/img_1.jpg")] == "test"
    assert FeatureStore(first.store_path).rows.splits.count("test") + 1 == rows.splits.count("test")


def test_bad_images_are_skipped_and_recorded(class_folder, tmp_path):
    expected = add_bad_files(class_folder)
    result = extract_features(tiny_settings(class_folder, tmp_path / "f"))
    store = FeatureStore(result.store_path)
    reasons = dict(store.skipped)
    assert set(reasons) == {f"red/{name}" for name in expected}
    for name, fragment in expected.items():
        assert fragment in reasons[f"red/{name}"]
    assert len(store) == 12 and "red/truncated.jpg" not in store.rows.paths


def test_settings_are_validated():
    with pytest.raises(ValueError, match="pooling='flat' is not known"):
        ExtractSettings(pooling="flat")
    with pytest.raises(ValueError, match="image_size=8 is not valid; it must be an integer >= 32"):
        ExtractSettings(image_size=8)
    with pytest.raises(ValueError, match="backbone='alexnet' is not known"):
        ExtractSettings(backbone="alexnet")
    assert ExtractSettings(layers=("block5_pool", "block4_pool")).layers == ("block5_pool", "block4_pool")
    assert ExtractSettings(layers="block4_pool").layers == ("block4_pool",)  # one string is one layer


def test_no_usable_images_fails_before_any_model_is_built(class_folder, tmp_path, monkeypatch):
    for path in class_folder.rglob("*.jpg"):
        path.write_text("not an image")
    import pipeline.backbones.build as backbones

    monkeypatch.setattr(backbones, "build_backbone", lambda *a, **k: pytest.fail("model was built"))
    with pytest.raises(LayertapError, match="no usable images in .*first: blue/img_0.jpg \\(not an image"):
        extract_features(tiny_settings(class_folder, tmp_path / "f"))


KILLER = textwrap.dedent("""
    import os, signal, sys
    import pipeline.store.writing as store
    from pipeline.cli import main
    commits = []
    real_replace = os.replace

    def replace_then_die(src, dst):
        # Commit two shards, then die while the third is written but not yet renamed (other files, such as
        # the stat cache's snapshot, are renamed into place too).
        if os.path.basename(dst).startswith("shard-"):
            if len(commits) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            commits.append(dst)
        real_replace(src, dst)

    store.os.replace = replace_then_die
    sys.exit(main(sys.argv[1:]))
""")


def test_short_batches_are_padded_only_where_a_new_shape_costs_a_compile(split_folder, tmp_path, monkeypatch):
    import keras

    from pipeline.backbones.build import Extractor

    sizes, dispatch = [], Extractor.dispatch
    monkeypatch.setattr(Extractor, "dispatch", lambda self, x: sizes.append(len(x)) or dispatch(self, x))
    settings = dict(batch_size=5, shard_size=100)  # 18 images: batches of 5, 5, 5 and 3
    unpadded = extract_features(tiny_settings(split_folder, tmp_path / "a", **settings))
    assert sizes == ([5, 5, 5, 3] if keras.backend.backend() == "tensorflow" else [5, 5, 5, 5])
    sizes.clear()
    monkeypatch.setattr(local_engine, "pads_short_batches", lambda: True)
    padded = extract_features(tiny_settings(split_folder, tmp_path / "b", **settings))
    assert sizes == [5, 5, 5, 5]
    a, b = FeatureStore(unpadded.store_path), FeatureStore(padded.store_path)
    assert len(a) == len(b) == 18
    for tap in ("block1_pool", "block2_pool"):
        np.testing.assert_allclose(a.features(tap), b.features(tap), rtol=1e-5, atol=1e-6)


def test_more_forward_passes_in_flight_give_the_same_store(class_folder, tmp_path, monkeypatch):
    """Batches collected oldest first, whatever the number in flight (the GPU bench's -ahead2 rows)."""
    from pipeline.backbones.build import Extractor

    add_bad_files(class_folder)  # skipped images inside batches: short batches between full ones
    settings = dict(batch_size=3, shard_size=7)
    one = FeatureStore(extract_features(tiny_settings(class_folder, tmp_path / "one", **settings)).store_path)
    collected, collect = [], Extractor.collect
    monkeypatch.setattr(Extractor, "collect", staticmethod(lambda handle: collected.append(1) or collect(handle)))
    monkeypatch.setattr(shards_module, "IN_FLIGHT", 3)
    three = FeatureStore(extract_features(tiny_settings(class_folder, tmp_path / "three", **settings)).store_path)
    assert len(collected) >= 4 and list(three.rows.paths) == list(one.rows.paths) and len(one) == 12
    for tap in ("block1_pool", "block2_pool"):
        np.testing.assert_array_equal(three.features(tap), one.features(tap))


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_file_changed_after_the_scan_is_skipped_never_stored_under_its_old_hash(engine, split_folder, tmp_path,
                                                                                   monkeypatch):
    import pipeline.extraction.extract as extract_module
    from conftest import photo
    from pipeline.data.decoding import CHANGED

    if engine == "ray":
        pytest.importorskip("ray", reason="the Ray engine needs pip install 'layertap[ray]'")
    edited, scan = split_folder / "train" / "red" / "img_0.jpg", extract_module.load_images

    def scan_then_edit(settings, session=None):
        images = scan(settings, session)
        photo((0, 0, 0), seed=9).save(edited, "JPEG")  # new bytes between the scan and the decoding
        return images

    monkeypatch.setattr(extract_module, "load_images", scan_then_edit)
    store = FeatureStore(extract_features(tiny_settings(split_folder, tmp_path, engine=engine)).store_path)
    assert dict(store.skipped)["train/red/img_0.jpg"] == CHANGED and len(store) == 17
    monkeypatch.undo()
    again = extract_features(tiny_settings(split_folder, tmp_path))
    assert not again.cache_hit and len(FeatureStore(again.store_path)) == 18, "the next run stores the new bytes"


def test_killed_run_resumes_to_identical_features(split_folder, tmp_path):
    out = tmp_path / "killed"
    args = ["extract", "--data", str(split_folder), "--weights", "random", "--size", "32", "--layers",
            "block1_pool,block2_pool", "--batch-size", "2", "--shard-size", "4", "--workers", "2", "-q",
            "--out", str(out)]
    mark = f"layertap-test-{os.getpid()}-{time.time()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LAYERTAP_TEST_MARK": mark}
    run = subprocess.Popen([sys.executable, "-c", KILLER, *args], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == -signal.SIGKILL, stderr[-2000:]
    deadline = time.time() + 10
    while (processes_marked(mark) or leaked_segments({run.pid})) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_marked(mark), "decoding workers must end with the killed extraction"
    assert not leaked_segments({run.pid}), "the killed extraction's shared memory must be freed"
    assert not list(out.glob("*.h5")), "a killed run must leave no store that later stages accept"
    committed = sorted(out.glob("*.parts/*/shard-*.h5"))
    leftovers = list(out.glob("*.parts/*/.shard-*.tmp-*"))
    assert len(committed) == 2 and len(leftovers) == 1

    resumed = extract_features(tiny_settings(split_folder, out, batch_size=2))
    assert resumed.n_decoded == 18 - 8, "the rerun must resume after the two committed shards"
    assert not list(out.glob("*.parts"))
    fresh = extract_features(tiny_settings(split_folder, tmp_path / "fresh", batch_size=2))
    a, b = FeatureStore(resumed.store_path), FeatureStore(fresh.store_path)
    assert a.rows.paths == b.rows.paths
    for tap in ("block1_pool", "block2_pool"):
        np.testing.assert_array_equal(a.features(tap), b.features(tap))


def test_a_few_flowers17_images(flowers17, tmp_path):
    csv = tmp_path / "few.csv"
    lines = ["path,label,split"]
    for label in ("daffodil", "sunflower", "pansy"):
        for i, name in enumerate(sorted(os.listdir(flowers17 / label))[:3]):
            lines.append(f"{label}/{name},{label},{'test' if i == 2 else 'train'}")
    csv.write_text("\n".join(lines) + "\n")
    result = extract_features(tiny_settings(flowers17, tmp_path / "f", split_file=str(csv), image_size=64))
    store = FeatureStore(result.store_path)
    assert len(store) == 9 and not store.skipped and store.class_names == ("daffodil", "pansy", "sunflower")
    assert np.isfinite(store.features("block2_pool")).all() and store.features("block2_pool").std() > 0
    assert store.manifest.data_root == str(SHARED_DATA.resolve() / "flowers17")


def test_extraction_refuses_a_store_another_process_writes(split_folder, tmp_path):
    settings = tiny_settings(split_folder, tmp_path / "f")
    store = extract_features(settings).store_path
    orphan = store.with_name(f".{store.name}.tmp-99999")
    orphan.write_bytes(b"left by a writer killed during the merge")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path\n"
         "from pipeline.store.writing import store_lock\n"
         "with store_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)", str(store)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LayertapError, match="another process is extracting into .*wait for it to finish"):
            extract_features(settings)
        assert orphan.exists(), "nothing may be touched without the lock"
    finally:
        holder.kill()
        holder.wait()
    assert extract_features(settings).cache_hit
    assert not orphan.exists()


def test_mixed_precision_and_float16_store(split_folder, tmp_path):
    result = extract_features(tiny_settings(split_folder, tmp_path / "f", precision="bfloat16",
                                            store_dtype="float16", compression="lzf"))
    store = FeatureStore(result.store_path)
    reference = FeatureStore(extract_features(tiny_settings(split_folder, tmp_path / "g")).store_path)
    assert store.dtype == "float16" and store.manifest.precision == "bfloat16"
    low, high = store.features("block2_pool").astype(np.float32), reference.features("block2_pool")
    assert np.isfinite(low).all()
    assert np.abs(low - high).max() <= 0.05 * np.abs(high).max()


def test_batch_size_changes_features_only_within_the_stated_tolerance(split_folder, tmp_path):
    """README: batch size is not part of the cache key; float32 kernels for another batch shape sum in another
    order, so features agree to a relative 1e-5 (measured: up to about 3e-6), not bit for bit."""
    one = FeatureStore(extract_features(tiny_settings(split_folder, tmp_path / "a", batch_size=1,
                                                      precision="float32")).store_path)
    four = FeatureStore(extract_features(tiny_settings(split_folder, tmp_path / "b", batch_size=4,
                                                       precision="float32")).store_path)
    for tap in ("block1_pool", "block2_pool"):
        a, b = one.features(tap), four.features(tap)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), tap
