"""``make bench-scan``: a cache-hit rerun's scan with the stat cache against the full-hash scan, same files, same run.

The files: ``--files`` names (default 16,384) hard-linked round-robin to flowers17's JPEGs (copied where
links are not possible), as ``<class>/<i>.jpg``. One priming scan fills the stat cache; then the two
scans alternate in fresh processes, ``--rounds`` times each: ``full`` reads and hashes every file (what
every scan did before the stat cache, and what ``--verify`` does), ``stat`` stats every file and reads
none. Both run with the same threads (one per core, at most 16) on a warm page cache, which favours
the full scan; on a cold cache or a network filesystem its cost is larger.

Writes ``bench/results/scan-<time>.json``, ``scan-latest.json`` and ``scan-latest.md``, and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.common import FLOWERS, emit, fresh_work, link, machine, parse_or_run_child, run_child, write_results
from pipeline.runs.reports import format_table

MODES = ("full", "stat")


def child(args) -> None:
    from pipeline.data.images import find_images
    from pipeline.data.scan import StatCache, scan_images

    started = time.perf_counter()
    found = find_images(args.folder)
    cache = StatCache(args.cache_dir, found.root) if args.mode == "stat" else None
    scanned = scan_images(found, cache=cache)
    emit({"mode": args.mode, "seconds": time.perf_counter() - started, "images": len(scanned.records)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=16384, help="file names to scan (default 16,384)")
    parser.add_argument("--rounds", type=int, default=3, help="scans of each kind, alternating (default 3)")
    parser.add_argument("--data", default=str(FLOWERS), help="a folder of class folders of JPEGs (default: flowers17)")
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parse_or_run_child(parser, MODES, "mode", child)
    if args is None:
        return

    work = fresh_work("scan")
    sources = sorted(Path(args.data).glob("*/*.jpg"))
    for i in range(args.files):
        source = sources[i % len(sources)]
        link(source, work / "images" / source.parent.name / f"{i:06d}.jpg")
    result = compare(work / "images", work / "cache", args.rounds)
    path = write_results("scan", {"machine": machine(), **result}, result["table"] + "\n")
    print(f"written: {path}")


def compare(folder: Path, cache_dir: Path, rounds: int) -> dict:
    """Prime the stat cache, then alternate full and stat scans of ``folder`` in fresh processes; print the table.

    Returns:
        ``{"primed", "runs", "medians", "table"}`` (also run by ``make bench-gpu`` on the GPU host's files).
    """
    time.sleep(2.5)  # past the racy window (pipeline.data.scan.RACY_NS) of files just linked

    def scan(mode: str) -> dict:
        return run_child(["-m", "bench.scan", "--child", mode, "--folder", str(folder), "--cache-dir", str(cache_dir)])

    primed = scan("stat")
    print(f"  priming scan (fills the stat cache): {primed['seconds']:.2f} s", flush=True)
    runs = []
    for i in range(rounds):
        for mode in MODES:
            runs.append(scan(mode))
            print(f"  {mode:<4} round {i + 1}: {runs[-1]['seconds']:.3f} s", flush=True)
    med = {mode: statistics.median(r["seconds"] for r in runs if r["mode"] == mode) for mode in MODES}
    files = primed["images"]
    rows = [[mode, f"{med[mode]:.3f}", f"{files / med[mode]:,.0f}", f"{med['full'] / med[mode]:.1f}x"]
            for mode in MODES]
    table = format_table(["scan", "seconds", "files/s", "x faster than full"], rows,
                         title=f"\n{files:,} files, medians of {rounds} alternating runs in fresh processes, "
                               f"warm page cache")
    print(table)
    return {"primed": primed, "runs": runs, "medians": med, "table": table}


if __name__ == "__main__":
    main()
