"""Which layers? Single taps against taps side by side (``a+b``) on flowers17 (issue 30, item 3).

Extracts (or reuses) flowers17's store of ``--layers`` with ``--weights`` (hed-bsds500 offline), runs
``layertap sweep`` (logreg on each tap, then the pairs of the three best on val and all taps together), then
``classify`` with ``--classifiers`` on the same taps and combinations, and prints one table: every (taps,
classifier) with its val accuracy (which chooses) and its test accuracy with the 95% interval. Writes
``bench/results/multitap-latest.{md,json}``.

    python -m bench.multitap                      # make bench-multitap; about 7 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import FLOWERS, RESULTS, SPLIT, flowers17_store, machine, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(FLOWERS))
    parser.add_argument("--split-file", default=str(SPLIT))
    parser.add_argument("--weights", default="hed-bsds500")
    parser.add_argument("--layers", default="block3_pool,block4_pool,block5_pool")
    parser.add_argument("--classifiers", default="probe,linsvm", help="besides the sweep's logreg")
    parser.add_argument("--work", default=str(RESULTS / "work" / "multitap"))
    args = parser.parse_args()

    from pipeline.classification.classify import ClassifySettings, classify, sweep
    from pipeline.runs.summary import collect_rows

    started = time.perf_counter()
    extracted = flowers17_store(args.layers, args.weights, args.data, args.split_file, Path(args.work))
    run_dir, swept = sweep(ClassifySettings(store=str(extracted.store_path), out_dir=f"{args.work}/m", run="flowers17"))
    classify(ClassifySettings(store=str(extracted.store_path), classifiers=tuple(args.classifiers.split(",")),
                              layers=tuple(r["tap"] for r in swept), out_dir=f"{args.work}/m", run="flowers17"))
    summary = collect_rows(run_dir)
    rows = [{k: r[k] for k in ("tap", "classifier", "val_accuracy", "test_accuracy", "test_low", "test_high")}
            for r in summary.rows]
    m = extracted.store.manifest
    lines = [f"# Single taps and taps side by side: flowers17, {m.backbone} ({m.weights} weights), {m.image_size} "
             f"px, {m.pooling} pooling, {m.precision}",
             "", f"Machine: {machine().get('cpu', '?')}; {time.perf_counter() - started:.0f} s in all. Rows best on "
             "val first; test is scored once.", "",
             "| taps | classifier | val acc (chooses) | test acc | test 95% CI |", "| --- | --- | ---: | ---: | --- |"]
    lines += [f"| {r['tap']} | {r['classifier']} | {r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} | "
              f"{r['test_low']:.3f}-{r['test_high']:.3f} |" for r in rows]
    publish("multitap", {"store": str(extracted.store_path), "rows": rows, "sweep": swept,
                         "recommended": summary.recommended}, "\n".join(lines))


if __name__ == "__main__":
    main()
