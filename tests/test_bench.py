"""The benchmark compares like with like: the three recipes compute the same features."""

from __future__ import annotations

import numpy as np
import pytest

from bench.common import subset
from bench.recipes import RECIPES
from conftest import COLOURS, make_class_folder, photo
from pipeline.core.runtime import keras_backend
from pipeline.store.feature_store import FeatureStore


@pytest.mark.skipif(keras_backend() != "tensorflow", reason="the peer recipes are TensorFlow-backend Keras code")
@pytest.mark.parametrize("backbone, tap, dims", [("vgg16", "block3_pool", 256), ("resnet50", "conv2_block3_out", 256)])
def test_peer_recipes_and_ours_give_the_same_features(backbone, tap, dims, tmp_path):
    """ResNet50 included: ours folds its BatchNormalization, the peers run Keras's network as built."""
    pytest.importorskip("tensorflow", reason="the peer recipes are TensorFlow-backend Keras code")
    data = tmp_path / "data"
    for c, (name, colour) in enumerate(COLOURS.items()):
        (data / name).mkdir(parents=True)
        for i in range(2):  # PNG at the model's size: no resize and no JPEG decoder differences
            photo(colour, size=(32, 32), seed=10 * c + i).save(data / name / f"img_{i}.png")
    features = {}
    for name, recipe in RECIPES.items():
        out = tmp_path / name
        out.mkdir()
        kwargs = {"precision": "float32"} if name == "ours" else {}
        assert recipe(data, 32, tap, "random", 4, out, backbone, **kwargs)["images"] == 6
        if name == "ours":
            features[name] = FeatureStore(next(out.glob("*.h5"))).features(tap)
        else:
            features[name] = np.load(out / "features.npz")["features"]
    scale = np.abs(features["ours"]).max()
    for name in ("datagen", "dataset"):
        assert features[name].shape == (6, dims)
        np.testing.assert_allclose(features[name], features["ours"], atol=1e-4 * scale, err_msg=name)


def test_speed_subset_takes_the_same_first_images_of_every_class(tmp_path):
    source = tmp_path / "all"
    for name in ("b", "a"):
        (source / name).mkdir(parents=True)
        for i in (3, 1, 2):
            (source / name / f"img_{i}.jpg").write_bytes(b"%d" % i)
    linked = subset(tmp_path / "subset", sorted(source.iterdir()), 2)
    assert sorted(str(p.relative_to(linked)) for p in linked.rglob("*.jpg")) == [
        "a/img_1.jpg", "a/img_2.jpg", "b/img_1.jpg", "b/img_2.jpg"]
    assert (linked / "a" / "img_2.jpg").read_bytes() == b"2"


@pytest.mark.parametrize("decoder", ["pillow", "dali"])
def test_gpu_bench_times_a_decoder_alone_like_the_pipelines(decoder, tmp_path, monkeypatch):
    """``make bench-gpu``'s decoder rows, run here on the CPU device (a GPU session has no time to lose to a crash)."""
    import argparse

    import bench.gpu as gpu
    import pipeline.data.gpu_decode as gd

    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    monkeypatch.setattr(gd, "DEVICE", "cpu")
    monkeypatch.setattr(gpu, "SIZE", 32)
    monkeypatch.setattr(gpu, "BATCH", 4)
    data = make_class_folder(tmp_path / "data", per_class=4)
    import pipeline.data.dali_decode as dali_decode

    made = dali_decode.DaliDecoder
    result = gpu.child_decode(argparse.Namespace(data=str(data), decoder=decoder, hw_decoder_load=0.9))
    # three batches of 4: the second half is timed from the second batch's end to the third's
    assert result["images"] == 12 and result["steady_images"] == 4
    assert result["images_per_s"] > 0 and result["after_first_per_s"] > 0
    assert dali_decode.DaliDecoder is made  # the bench's decoder knob does not outlive the call (later tests use it)


def test_gpu_bench_rate_is_not_credited_with_images_decoded_ahead_during_start_up():
    """A loader that decoded 8 batches while the first forward pass was set up, then decodes a batch every 40 ms
    for a network that takes 20 ms: the rate is the decoding rate, 6,400 images/s, not what the backlog adds."""
    from bench.gpu import Timeline

    timeline, ready, done = Timeline(), 1.0, 1.0
    for i in range(64):
        ready = 1.0 if i < 8 else ready + 0.04
        done = max(ready, done) + 0.02
        timeline.marks.append((done, 256 * (i + 1)))
    rates = timeline.rates()
    assert rates["images"] == 16384 and rates["steady_images"] == 8192
    assert rates["images_per_s"] == pytest.approx(6400)
    assert rates["after_first_per_s"] > 1.1 * 6400  # the old reading: from the first batch


def test_gpu_bench_table_gives_ratios_to_the_same_backbones_peer_and_ceiling_only():
    from bench.gpu import table

    rows = [{"backbone": "all", "name": "dali@0.9", "images_per_s": 9000.0},
            {"backbone": "vgg16", "name": "ceiling", "images_per_s": 8000.0},
            {"backbone": "vgg16", "name": "torch-draft", "images_per_s": 6000.0},
            {"backbone": "vgg16", "name": "ours-dali", "images_per_s": 7500.0},
            {"backbone": "vgg16", "name": "ours-nvjpeg", "error": "no GPU"}]
    lines = {line.split(" | ")[1]: line for line in table(rows, {}, 224, 256).splitlines() if line.count("|") > 5}
    assert "| 9,000 |  |  |" in lines["dali@0.9"]  # a decoder alone: nothing to compare with
    assert "| 7,500 | 1.25x | 94% |" in lines["ours-dali"] and "failed: no GPU" in lines["ours-nvjpeg"]


def test_cpu_bench_table_compares_each_row_with_the_faster_peer_on_its_own_backbone_and_size():
    from bench.run import tables

    def row(recipe, rate, backbone="vgg16", size=224, tap="block5_pool", precision="float32"):
        return {"recipe": recipe, "backbone": backbone, "size": size, "tap": tap, "precision": precision,
                "images": 100, "seconds": 100 / rate, "images_per_s": rate, "peak_rss_mb": 1000.0}

    speed = {"datagen-224": row("datagen", 5.0), "dataset-224": row("dataset", 4.0),
             "ours-224": row("ours", 15.0, precision="bfloat16"),
             "ours-224-block3_pool": row("ours", 30.0, tap="block3_pool"),
             "datagen-224-resnet50": row("datagen", 10.0, "resnet50", tap="conv5_block3_out"),
             "dataset-224-resnet50": row("dataset", 20.0, "resnet50", tap="conv5_block3_out"),
             "ours-224-resnet50": row("ours", 50.0, "resnet50", tap="conv5_block3_out")}
    results = {"speed": speed, "speed_data": "subset", "cache": {"first_extract_s": 10.0, "second_extract_s": 1.0,
                                                                 "classify_4_s": 5.0},
               "memory": {"n": 1, "rows": {"1": {"seconds": 1.0, "peak_rss_mb": 1.0}}, "ratio": 1.0}}
    lines = tables(results).splitlines()
    ratio = {(line.split()[-9], line.split()[-7]): line.split()[-2]
             for line in lines if line.startswith("layertap extract")}
    assert ratio == {("vgg16", "block5_pool"): "3.000", ("vgg16", "block3_pool"): "6.000",
                     ("resnet50", "conv5_block3_out"): "2.500"}


def test_scan_comparison_runs_both_scans_over_the_same_files(tmp_path):
    """What ``make bench-scan`` and ``make bench-gpu`` run: one priming scan, then full and stat scans alternating."""
    from bench.scan import compare

    data = make_class_folder(tmp_path / "data", per_class=3)
    result = compare(data, tmp_path / "cache", rounds=1)
    assert [run["mode"] for run in result["runs"]] == ["full", "stat"]
    assert {run["images"] for run in [result["primed"], *result["runs"]]} == {9}
    assert "9 files" in result["table"] and set(result["medians"]) == {"full", "stat"}


def test_reuse_bench_reads_a_virtual_store_both_ways(tmp_path):
    """``make bench-reuse``'s last line: one shard's rows at a time, one open reader against one per read."""
    from bench.reuse import reader_reads

    result = reader_reads(tmp_path, shards=5)
    assert result["shards"] == 5 and result["kept_open_s"] > 0 and result["per_read_s"] > 0


def test_engines_bench_merges_synthetic_shards_both_ways_into_identical_stores(tmp_path):
    """``make bench-ray``'s merge lines, and the store comparison every engine bench prints."""
    from bench.common import SYNTHETIC_MANIFEST, identical_stores, synthetic_shards
    from bench.engines import merge_rate
    from pipeline.store.writing import merge_shards

    result = merge_rate(tmp_path, shards=3, rows=4, dims=8)
    assert result["rows"] == 12 and result["seconds"] > 0 and result["virtual_seconds"] > 0
    copy, virtual = tmp_path / "merge" / "copy.h5", tmp_path / "merge" / "virtual.h5"
    assert identical_stores([str(copy), str(virtual)])
    fewer = merge_shards(synthetic_shards(tmp_path / "other", 2, 4, 8), tmp_path / "fewer.h5",
                         manifest=SYNTHETIC_MANIFEST)
    assert not identical_stores([str(copy), str(fewer.path)])


def test_dali_profile_times_the_host_work_of_a_batch_on_the_cpu_device():
    """``python -m bench.dali_profile --host-overhead``: the figure bench/NOTES.md judges the decoder's host work by."""
    pytest.importorskip("nvidia.dali")
    from bench.dali_profile import host_overhead

    result = host_overhead(batches=2)
    assert result["images"] == 256 and result["host_ms_per_batch"] > 0 and 0 < result["thread_ms_per_batch"]


def test_forward_bench_folds_each_batchnorm_into_its_convolution_without_changing_the_features():
    """``python -m bench.forward``: the folded network is the same function (float32), with no BatchNormalization
    left in the path; ResNet50 up to conv2_block3_out has 11 (conv1 and 3 blocks), each after its convolution."""
    from bench.forward import measure

    result = measure("resnet50", "conv2_block3_out", size=32, batch=2, precision="float32", rounds=1)
    assert result["batchnorms_folded"] == 11 and result["max_rel_diff"] < 1e-5 and result["folded_vs_float32"] < 1e-5
    assert result["plain_img_s"] > 0 and result["folded_img_s"] > 0


def test_stage2_gpu_mode_reads_the_shards_past_the_cache_then_times_the_probes_whole_sweep(tmp_path, monkeypatch):
    """``make bench-stage2-gpu`` at a tiny size, as a lent machine runs it: every byte of the shards read for the
    disk's rate, the probe's classify in a child process, and the table's figures written."""
    import argparse
    import json

    from bench import common, stage2

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    stage2.gpu_target(argparse.Namespace(classes=3, dims=8, gpu_rows=3000, keep_stores=False), tmp_path / "work")
    result = json.loads((tmp_path / "results" / "stage2-gpu-latest.json").read_text())
    shards = sorted((tmp_path / "work" / "stores").glob("*.shards/*.h5"))
    assert len(shards) == 1 and result["disk"]["bytes"] == shards[0].stat().st_size
    assert result["run"]["code"] == 0 and result["run"]["rows"] == 3000 and result["run"]["n_val"] > 0
    assert result["epochs"] >= 5 and result["read_gb_s"] > 0
    assert "the whole sweep" in (tmp_path / "results" / "stage2-gpu-latest.md").read_text()


def test_probe_fit_bench_measures_the_probe_against_scikit_learns_minimum_of_the_same_objective(tmp_path):
    """``make bench-probe-fit``: the gap is taken on the objective both minimise. scikit-learn's minimum is never
    beaten, the probe as it is comes close on an easy problem, and a probe stopped early is seen to be further."""
    from bench.probe_fit import tap_rows
    from bench.stage2 import synthetic_store

    store = FeatureStore(synthetic_store(tmp_path / "s.h5", 3000, 16, classes=3))
    rows = tap_rows(store, "t", [{}, {"epochs": 1, "batch_size": 3000}])
    assert [r["C"] for r in rows] == [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0]
    for r in rows:
        assert r["gap@as is"] > -1e-6 and r["gap@epochs 1, batch_size 3000"] > -1e-6
        assert r["gap@epochs 1, batch_size 3000"] > r["gap@as is"] + 1e-3
        assert 0 <= r["sklearn_val"] <= 1
    assert max(r["gap@as is"] for r in rows if r["C"] <= 1) < 0.01
