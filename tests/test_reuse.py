"""A new store reuses, by content hash, the features an earlier store of the same model settings computed."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import COLOURS, make_class_folder, photo, tiny_settings
from pipeline.extraction.extract import cache_key, extract_features, load_images
from pipeline.extraction.reuse import DATA_FIELDS, MODEL_FIELDS
from pipeline.store.feature_store import FeatureStore

TAPS = ("block1_pool", "block2_pool")


def rows_by_fingerprint(store: FeatureStore) -> dict[str, dict[str, np.ndarray]]:
    features = {tap: store.features(tap) for tap in TAPS}
    return {fp: {tap: features[tap][i] for tap in TAPS} for i, fp in enumerate(store.rows.fingerprints)}


def damage(store: FeatureStore, row: int = 5) -> None:
    """Zero 64 bytes of one row's block2_pool features inside the file (its chunk then fails its checksum)."""
    raw = bytearray(store.path.read_bytes())
    at = raw.find(store.features("block2_pool")[row].tobytes()[:64])
    assert at > 0
    raw[at:at + 64] = bytes(64)
    store.path.write_bytes(bytes(raw))


@pytest.mark.parametrize("merge", ["copy", "virtual"])
def test_added_images_alone_are_computed_and_every_other_row_is_the_earlier_stores_bit_for_bit(tmp_path, merge):
    data = make_class_folder(tmp_path / "data")  # 12 images, shards of 4
    first = extract_features(tiny_settings(data, tmp_path / "f", merge=merge))
    for c, colour in enumerate(COLOURS):  # one new photo in each class: in every shard of the new store
        photo(COLOURS[colour], seed=900 + c).save(data / colour / "img_00.jpg")
    second = extract_features(tiny_settings(data, tmp_path / "f"))
    assert second.store_path != first.store_path and len(second.store) == 15
    assert second.n_decoded == 3 and second.n_reused == 12
    assert second.store.manifest.taps["block1_pool"]["reused"] == 12
    assert not any(tmp_path.joinpath("f").glob("*.parts")), "the computed shards are cleaned up with the parts"
    before, after = rows_by_fingerprint(first.store), rows_by_fingerprint(second.store)
    assert sum(fp in before for fp in after) == 12
    assert all(np.array_equal(row[tap], before[fp][tap]) for fp, row in after.items() if fp in before for tap in TAPS)
    fresh = extract_features(tiny_settings(data, tmp_path / "fresh", reuse=False))
    assert fresh.n_reused == 0 and fresh.n_decoded == 15
    assert list(fresh.store.rows.paths) == list(second.store.rows.paths)
    assert list(fresh.store.labels) == list(second.store.labels)
    for tap in TAPS:
        np.testing.assert_allclose(second.store.features(tap), fresh.store.features(tap), rtol=1e-5, atol=1e-6)


def test_rows_reused_in_another_order_each_keep_their_own_images_features(tmp_path):
    """Renamed so that every class's order is reversed: each shard's rows come from the earlier store's rows
    in decreasing order, and each image must still get its own row."""
    data = make_class_folder(tmp_path / "data")  # img_0 ... img_3 a class, shards of 4
    first = extract_features(tiny_settings(data, tmp_path / "f"))
    for colour in COLOURS:
        for i in range(4):
            (data / colour / f"img_{i}.jpg").rename(data / colour / f"new_{3 - i}.jpg")
    second = extract_features(tiny_settings(data, tmp_path / "f"))
    assert second.store_path != first.store_path and (second.n_decoded, second.n_reused) == (0, 12)
    before, after = rows_by_fingerprint(first.store), rows_by_fingerprint(second.store)
    assert before.keys() == after.keys()
    assert all(np.array_equal(after[fp][tap], before[fp][tap]) for fp in before for tap in TAPS)


def test_a_bad_new_file_among_reused_images_is_skipped_and_named(tmp_path):
    data = make_class_folder(tmp_path / "data")
    extract_features(tiny_settings(data, tmp_path / "f"))
    good = (data / "green" / "img_0.jpg").read_bytes()
    (data / "green" / "img_00.jpg").write_bytes(good[: len(good) // 2])  # a whole header, half the pixels
    second = extract_features(tiny_settings(data, tmp_path / "f"))
    assert second.n_decoded == 1 and second.n_reused == 12 and len(second.store) == 12
    assert [(path, "truncated" in reason) for path, reason in second.store.skipped] == [("green/img_00.jpg", True)]


def test_an_edited_image_is_computed_again_never_taken_from_the_earlier_store(tmp_path):
    data = make_class_folder(tmp_path / "data")
    first = extract_features(tiny_settings(data, tmp_path / "f"))
    edited = data / "red" / "img_1.jpg"
    photo((0, 0, 0), seed=5).save(edited)
    second = extract_features(tiny_settings(data, tmp_path / "f"))
    assert second.n_decoded == 1 and second.n_reused == 11
    row = list(second.store.rows.paths).index(str(edited.relative_to(data)))
    old = list(first.store.rows.paths).index(str(edited.relative_to(data)))
    assert second.store.rows.fingerprints[row] != first.store.rows.fingerprints[old]
    assert not np.allclose(second.store.features("block2_pool")[row], first.store.features("block2_pool")[old])


def test_a_removed_image_writes_the_new_store_from_the_earlier_one_without_building_the_model(tmp_path, capsys):
    from pipeline.cli import main

    data = make_class_folder(tmp_path / "data")
    first = extract_features(tiny_settings(data, tmp_path / "f"))
    (data / "green" / "img_2.jpg").unlink()
    second = extract_features(tiny_settings(data, tmp_path / "f"))
    assert second.n_decoded == 0 and second.n_reused == 11 and "build_model" not in second.timings
    before = rows_by_fingerprint(first.store)
    for fingerprint, row in rows_by_fingerprint(second.store).items():
        assert all(np.array_equal(row[tap], before[fingerprint][tap]) for tap in TAPS)
    (data / "green" / "img_3.jpg").unlink()
    assert main(["extract", "--data", str(data), "--out", str(tmp_path / "f"), "--weights", "random", "--size", "32",
                 "--layers", ",".join(TAPS), "--shard-size", "4", "-q"]) == 0
    out = capsys.readouterr().out
    assert "reused the features of 10 images" in out and "no image decoded" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("block")] == ["reused", "reused"]
    assert main(["inspect", str(sorted((tmp_path / "f").glob("*.h5"), key=lambda p: p.stat().st_mtime)[-1])]) == 0
    assert [line.split()[4:6] for line in capsys.readouterr().out.splitlines() if line.startswith("block")] == [
        ["0", "10"], ["0", "10"]]  # computed, reused
    photo(COLOURS["green"], seed=999).save(data / "green" / "new.jpg")
    assert main(["extract", "--data", str(data), "--out", str(tmp_path / "f"), "--weights", "random", "--size", "32",
                 "--layers", ",".join(TAPS), "--shard-size", "4", "-q"]) == 0
    assert [line.split()[-3:] for line in capsys.readouterr().out.splitlines() if line.startswith("block")] == [
        ["computed", "+", "reused"]] * 2


def test_other_model_settings_or_no_reuse_compute_everything(tmp_path, caplog):
    data = make_class_folder(tmp_path / "data")
    extract_features(tiny_settings(data, tmp_path / "f"))
    photo(COLOURS["red"], seed=77).save(data / "red" / "img_9.jpg")
    bigger = extract_features(tiny_settings(data, tmp_path / "f", image_size=40))
    assert bigger.n_reused == 0 and bigger.n_decoded == 13
    fewer_taps = extract_features(tiny_settings(data, tmp_path / "g", layers=("block1_pool",)))
    (data / "red" / "img_8.jpg").write_bytes((data / "red" / "img_0.jpg").read_bytes())  # same bytes, other name
    with caplog.at_level(logging.INFO, logger="pipeline.extraction.extract"):
        more_taps = extract_features(tiny_settings(data, tmp_path / "g"))  # the donor lacks block2_pool
    assert fewer_taps.n_decoded == 13 and more_taps.n_reused == 0 and more_taps.n_decoded == 14
    assert "reusing" not in caplog.text
    again = extract_features(tiny_settings(data, tmp_path / "f", reuse=False, shard_size=5))
    assert again.n_reused == 0 and again.n_decoded == 14


def test_a_damaged_earlier_store_is_passed_over_with_a_warning(tmp_path, caplog):
    data = make_class_folder(tmp_path / "data")
    first = extract_features(tiny_settings(data, tmp_path / "f", shard_size=12))
    damage(first.store)
    (data / "red" / "img_3.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        second = extract_features(tiny_settings(data, tmp_path / "f", shard_size=12))
    assert second.n_reused == 0 and second.n_decoded == 11
    assert "not reusing features" in caplog.text and first.store_path.name in caplog.text


def test_an_earlier_store_found_damaged_while_mixing_rows_leaves_those_shards_to_be_computed(tmp_path, caplog):
    data = make_class_folder(tmp_path / "data")
    first = extract_features(tiny_settings(data, tmp_path / "f"))
    for c, colour in enumerate(COLOURS):  # a new image in every shard: no shard is covered whole
        photo(COLOURS[colour], seed=900 + c).save(data / colour / "img_00.jpg")
    damage(first.store)
    with caplog.at_level(logging.WARNING):
        second = extract_features(tiny_settings(data, tmp_path / "f"))
    assert "not reusing features from " + first.store_path.name in caplog.text
    assert second.n_reused == 0 and len(second.store) == 15
    fresh = extract_features(tiny_settings(data, tmp_path / "fresh", reuse=False))
    for tap in TAPS:
        np.testing.assert_allclose(second.store.features(tap), fresh.store.features(tap), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_the_cache_keys_material_is_the_model_fields_and_the_data_fields(backbone, tmp_path):
    """``batchnorm`` only where it is folded (ResNet50 on TensorFlow): the keys of other stores are as before."""
    from pipeline.backbones.batchnorm import folds_batchnorm
    from pipeline.backbones.registry import get_backbone
    from pipeline.backbones.weights import resolve_weights

    taps = get_backbone(backbone).taps[:1]  # the settings refuse a layer the backbone has not
    settings = tiny_settings(make_class_folder(tmp_path / "data", per_class=1), tmp_path / "f", backbone=backbone,
                             layers=taps)
    weights = resolve_weights(get_backbone(backbone), "random", 0)
    _, material = cache_key(load_images(settings), settings, weights)
    unfolded = set() if folds_batchnorm(get_backbone(backbone)) else {"batchnorm"}
    assert sorted(material) == sorted(set(MODEL_FIELDS + DATA_FIELDS) - unfolded)


def test_a_run_stopped_while_computing_the_new_images_resumes_from_what_it_committed(tmp_path, monkeypatch):
    import pipeline.extraction.engines.local as local_engine

    data = make_class_folder(tmp_path / "data")
    extract_features(tiny_settings(data, tmp_path / "f", shard_size=2))
    for c, colour in enumerate(COLOURS):
        photo(COLOURS[colour], seed=900 + c).save(data / colour / "img_00.jpg")
    run_shard, calls = local_engine.run_shard, []

    def stop_after_one(job, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(job.path)
        return run_shard(job, *args, **kwargs)

    monkeypatch.setattr(local_engine, "run_shard", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny_settings(data, tmp_path / "f", shard_size=2))
    assert calls[0].parent.name == "computed" and calls[0].exists()  # two of the three new images
    monkeypatch.setattr(local_engine, "run_shard", run_shard)
    resumed = extract_features(tiny_settings(data, tmp_path / "f", shard_size=2))
    # The shards written from the earlier store were committed by the stopped run; this one reuses the old
    # image beside each new one, and computes the one new image left.
    assert resumed.n_decoded == 1 and resumed.n_reused == 3 and len(resumed.store) == 15
    fresh = extract_features(tiny_settings(data, tmp_path / "fresh", shard_size=2, reuse=False))
    for tap in TAPS:
        np.testing.assert_allclose(resumed.store.features(tap), fresh.store.features(tap), rtol=1e-5, atol=1e-6)


def stop_after_two_shards(settings, monkeypatch) -> list:
    """Run an extraction that is stopped (KeyboardInterrupt) after committing two shards; their paths."""
    import pipeline.extraction.engines.local as local_engine

    run_shard, calls = local_engine.run_shard, []

    def stop_after_two(job, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job.path)
        return run_shard(job, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(local_engine, "run_shard", stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            extract_features(settings)
    return calls


def test_a_stopped_run_s_committed_shards_serve_the_next_run_after_its_image_list_changed(tmp_path, monkeypatch,
                                                                                        caplog):
    """Stopped after two of three shards, then a photo added: a new key, but the 8 images of the two committed
    shards are not computed again; their rows are the stopped run's, bit for bit, and the log names it (and
    not a store of the same settings that has none of the images). The new store then holds every row of the
    stopped run's, so its folder is removed; going back to the old image list computes nothing."""
    data = make_class_folder(tmp_path / "data")  # 12 images, shards of 4
    calls = stop_after_two_shards(tiny_settings(data, tmp_path / "f"), monkeypatch)
    stopped = {}
    for path in calls:
        stopped.update(rows_by_fingerprint(FeatureStore(path, kind="shard")))
    for c, colour in enumerate(COLOURS):  # a store of the same settings with none of the images
        folder = tmp_path / "other" / colour
        folder.mkdir(parents=True)
        photo(COLOURS[colour], seed=700 + c).save(folder / "x.jpg")
    extract_features(tiny_settings(tmp_path / "other", tmp_path / "f"))
    photo(COLOURS["red"], seed=900).save(data / "red" / "img_00.jpg")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        second = extract_features(tiny_settings(data, tmp_path / "f"))
    assert second.n_reused == 8 and second.n_decoded == 5 and len(second.store) == 13
    assert f"from {calls[0].parent.parent.name}; " in caplog.text
    after = rows_by_fingerprint(second.store)
    assert all(np.array_equal(after[fp][tap], row[tap]) for fp, row in stopped.items() for tap in TAPS)
    assert not calls[0].parent.parent.exists(), "the stopped run's folder, every row of it in the new store"
    assert f"removed {calls[0].parent}, a stopped run's shards" in caplog.text
    fresh = extract_features(tiny_settings(data, tmp_path / "fresh", reuse=False))
    for tap in TAPS:
        np.testing.assert_allclose(second.store.features(tap), fresh.store.features(tap), rtol=1e-5, atol=1e-6)
    (data / "red" / "img_00.jpg").unlink()
    back = extract_features(tiny_settings(data, tmp_path / "f"))
    assert back.n_decoded == 0 and back.n_reused == 12
    assert all(np.array_equal(rows_by_fingerprint(back.store)[fp][tap], row[tap])
               for fp, row in stopped.items() for tap in TAPS)


@pytest.mark.parametrize("change", ["an image of its shards removed", "its lock held", "fewer taps",
                                    "a shard found damaged"])
def test_a_stopped_run_s_folder_is_kept_while_the_new_store_lacks_a_row_or_a_tap_of_it_or_a_process_holds_it(
        tmp_path, monkeypatch, change):
    import subprocess
    import sys

    data = make_class_folder(tmp_path / "data")  # 12 images, shards of 4
    calls = stop_after_two_shards(tiny_settings(data, tmp_path / "f"), monkeypatch)
    parts, holder, taps = calls[0].parent.parent, None, TAPS
    if change == "an image of its shards removed":
        (data / FeatureStore(calls[0], kind="shard").rows.paths[0]).unlink()
    else:
        photo(COLOURS["red"], seed=900).save(data / "red" / "img_00.jpg")
    if change == "its lock held":
        lock = parts.with_name(f".{parts.stem}.h5.lock")
        holder = subprocess.Popen([sys.executable, "-c", "import time; from filelock import FileLock; "
                                   f"held = FileLock({str(lock)!r}); held.acquire(); print('held', flush=True); "
                                   "time.sleep(120)"],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
    if change == "fewer taps":
        taps = TAPS[:1]
    if change == "a shard found damaged":  # its rows are computed again; the shard is not the new store's to judge
        damage(FeatureStore(calls[1], kind="shard"), row=1)
    try:
        second = extract_features(tiny_settings(data, tmp_path / "f", layers=taps))
    finally:
        if holder:
            holder.kill()
            holder.wait()
    assert second.n_reused >= (4 if change == "a shard found damaged" else 7), "its rows were reused all the same"
    assert sorted(parts.rglob("shard-*.h5")) == sorted(calls), "the stopped run's folder is left as it was"
