"""``make bench-stage2``: stage two at stage one's scale, the streamed probe against scikit-learn.

Two synthetic virtual stores (:func:`synthetic_store`): ``--small`` and ``--big`` rows (default 400k and 4M) of
``--dims`` (1,024) float32 features, 10 classes, split 80/10/10. The features are low-rank, rectified and noisy,
like a CNN's pooled activations, so that a linear probe is neither trivial (val ~0.84) nor hopeless, and
scikit-learn's L-BFGS needs tens of iterations per C, as on real features.

- **Memory:** ``layertap classify --store S --classifiers probe`` in a fresh process on each store; the ratio of
  the peak RSS (big / small). The big tap is over 16 GB, more than half this machine's memory (the default
  ``--memory-budget``), so only the streamed probe may train on it.
- **Speed:** on the small store, rows/s of the whole sweep: the probe (every C of its grid in the same passes,
  C chosen on val) against scikit-learn's ``LogisticRegression`` fit once per C of the same grid on the
  standardised train rows held in memory, C chosen on val (what ``logreg`` does, without its 3-fold CV: that
  would be 3x the work again). Both report their val accuracy at their chosen C.

With ``--gpu`` (issue 30's GPU target, ``make bench-stage2-gpu``; on a lent machine ``bench/gpu_stage2.sh``):
one store of ``--gpu-rows`` (1.28M, ImageNet's size) x 2,048 features, 1,000 classes; the shard files read once
cold (``O_DIRECT``, else after dropping them from the page cache) for the disk's rate, dropped again, then the
probe's whole ``classify`` (8 Cs, C on val, test scored) timed, and the rate at which it read its features
against the disk's. No scikit-learn row: at this size it takes hours a C.

Writes ``bench/results/stage2[-gpu]-<time>.json``, ``-latest.json`` and ``-latest.md``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import time
from pathlib import Path

from bench.common import RESULTS, SYNTHETIC_MANIFEST, emit, parse_or_run_child, publish, run_child
from pipeline.runs.reports import format_table

CHILDREN = ("build", "probe", "sklearn")
CLASSES, RANK, SHARD_ROWS = 10, 64, 65_536


def synthetic_store(path: Path, rows: int, dims: int, classes: int = CLASSES, seed: int = 0) -> Path:
    """A virtual store of ``rows`` x ``dims`` float32 features (tap ``t``) in shards of :data:`SHARD_ROWS`:
    ``relu((class centre + noise) @ mix) + noise`` of rank :data:`RANK`, labels uniform, split 80/10/10."""
    import numpy as np

    from pipeline.store.feature_store import Rows
    from pipeline.store.virtual import shards_dir
    from pipeline.store.writing import merge_shards, write_shard

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, RANK)).astype(np.float32) * 0.35
    mix = rng.standard_normal((RANK, dims)).astype(np.float32) / np.sqrt(RANK)
    names = [f"c{i}" for i in range(classes)]
    manifest = {**SYNTHETIC_MANIFEST, "key": f"stage2-{rows}-{dims}-{seed}", "class_names": names}
    folder, shards = shards_dir(path), []
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, rows, SHARD_ROWS):
        n = min(SHARD_ROWS, rows - start)
        labels = rng.integers(0, classes, n)
        latent = centres[labels] + rng.standard_normal((n, RANK), dtype=np.float32)
        features = np.maximum(latent @ mix, 0) + 0.5 * rng.standard_normal((n, dims), dtype=np.float32)
        split = np.array(["train", "val", "test"])[np.searchsorted([0.8, 0.9], rng.random(n))]
        shards.append(write_shard(
            folder / f"shard-{start // SHARD_ROWS:06d}.h5", rows=Rows(
                [f"c{y}/{start + i}.jpg" for i, y in enumerate(labels)], labels.tolist(), split.tolist(),
                ["0" * 32] * n), features={"t": features}, class_names=names, skipped=[], manifest=manifest,
            map_shapes={"t": (1, 1, dims)}, dtype="float32"))
    return merge_shards(shards, path, manifest=manifest, virtual=True).path


def drop_cached(files) -> None:
    """Drop ``files`` from the page cache (written out first), so that their next read comes from the disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_read(files, block: int = 64 << 20) -> dict:
    """Read ``files`` whole from the disk, past the page cache: ``O_DIRECT`` into an aligned buffer where the
    file system takes it, else a plain read after :func:`drop_cached`. Returns the bytes, seconds and method."""
    buffer, total, methods = mmap.mmap(-1, block), 0, set()
    started = time.perf_counter()
    for path in files:
        done = 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                while (n := os.readv(fd, [buffer])) > 0:
                    done += n
            finally:
                os.close(fd)
            methods.add("O_DIRECT")
        except OSError:  # no O_DIRECT here (at the open or a read): the page cache, dropped first, from the start
            done = 0
            drop_cached([path])
            with open(path, "rb", buffering=0) as fh:
                while (n := fh.readinto(buffer)) > 0:
                    done += n
            methods.add("fadvise")
        total += done
    seconds = time.perf_counter() - started
    return {"bytes": total, "seconds": seconds, "gb_s": total / seconds / 1e9, "method": "+".join(sorted(methods))}


def accelerator() -> str:
    """The Keras backend and the device its ops run on."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return f"jax, {jax.devices()[0].device_kind}"
    if backend == "torch":
        import torch

        return f"torch, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}"
    return backend


def _has_rows(store: Path, rows: int, dims: int, classes: int) -> bool:
    from pipeline.store.feature_store import FeatureStore

    if not store.exists():
        return False
    found = FeatureStore(store)
    return len(found) == rows and found.dims["t"] == dims and len(found.class_names) == classes


def child(args) -> None:
    if args.child == "build":
        started = time.perf_counter()
        path = synthetic_store(Path(args.store), args.rows, args.dims, args.classes)
        emit({"store": str(path), "seconds": time.perf_counter() - started})
        return
    from pipeline.store.feature_store import FeatureStore

    store = FeatureStore(args.store)
    if args.child == "probe":
        from pipeline.cli import main as layertap

        started = time.perf_counter()
        code = layertap(["classify", "--store", args.store, "--classifiers", "probe", "--models", args.out])
        wall = time.perf_counter() - started
        metrics = json.loads(next(Path(args.out).glob("*/t-probe/metrics.json")).read_text())
        emit({"code": code, "rows": len(store), "train_rows": metrics["n_train"], "wall_s": wall,
              "fit_s": metrics["fit_seconds"], "val_accuracy": metrics["val_accuracy"],
              "test_accuracy": metrics["accuracy"], "chosen": metrics["chosen"], "n_val": metrics["n_val"],
              "device": accelerator()})
        return
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.heads.probe import DEFAULT_CS

    splits = store.splits
    train, val = splits.rows("train"), splits.rows("val")
    labels = store.labels
    X, X_val = store.features("t", train), store.features("t", val)
    started = time.perf_counter()
    scaler = StandardScaler().fit(X)
    X, X_val = scaler.transform(X), scaler.transform(X_val)
    by_c = []
    for c in DEFAULT_CS:
        model = LogisticRegression(C=c, max_iter=2000).fit(X, labels[train])
        by_c.append({"C": c, "iterations": int(model.n_iter_[0]),
                     "val_accuracy": float(model.score(X_val, labels[val]))})
        print(json.dumps(by_c[-1]), flush=True)
    best = max(by_c, key=lambda r: r["val_accuracy"])
    emit({"rows": len(store), "train_rows": len(train), "fit_s": time.perf_counter() - started,
          "val_accuracy": best["val_accuracy"], "chosen": {"C": best["C"]}, "by_C": by_c})


def built(store: Path, rows: int, dims: int, classes: int, keep: bool) -> Path:
    """The synthetic store at ``store``, built in a child process unless ``keep`` and it is there already."""
    if not (keep and _has_rows(store, rows, dims, classes)):
        made = run_child(["-m", "bench.stage2", "--child", "build", "--store", str(store), "--rows", str(rows),
                          "--dims", str(dims), "--classes", str(classes)], timeout=3600)
        print(f"  {store.stem}: {rows:,} x {dims} float32 ({rows * dims * 4 / 1e9:.1f} GB), {classes} classes, "
              f"written in {made['seconds']:.0f} s", flush=True)
    return store


def probed(store: Path, out: Path) -> dict:
    """``layertap classify --classifiers probe`` on ``store`` in a fresh process: its child's answer."""
    run = run_child(["-m", "bench.stage2", "--child", "probe", "--store", str(store), "--out", str(out)],
                    timeout=3600)
    print(f"  {store.stem}: probe {run['fit_s']:.0f} s, peak RSS {run['peak_rss_mb']:,.0f} MB", flush=True)
    return run


def gpu_target(args, work: Path) -> None:
    """The GPU target: the probe's whole sweep at ImageNet's size, and its read rate against the disk's."""
    classes, dims = args.classes or 1000, args.dims or 2048
    store = built(work / "stores" / f"gpu-{args.gpu_rows}-{dims}-{classes}.h5", args.gpu_rows, dims, classes,
                  args.keep_stores)
    shards = sorted(store.with_name(store.stem + ".shards").glob("*.h5"))
    disk = cold_read(shards)
    drop_cached(shards)  # the probe's first pass reads from the disk too
    run = probed(store, work / "models-gpu")
    row_bytes, chosen = dims * 4, run["chosen"]
    epochs = chosen["steps"] * chosen["batch_size"] / run["train_rows"]
    # what the fit read: the moments' pass over the train rows, the epochs, the val rows
    read = row_bytes * (run["train_rows"] * (1 + epochs) + run["n_val"])
    rate = read / run["fit_s"] / 1e9
    rows = [[f"disk, the shards read cold ({disk['method']})", f"{disk['seconds']:.1f}", "", f"{disk['gb_s']:.2f}",
             "", "", ""],
            [f"probe, fit ({epochs:.1f} epochs, 8 Cs, C on val)", f"{run['fit_s']:.1f}",
             f"{run['train_rows'] * epochs / run['fit_s']:,.0f}", f"{rate:.2f}", f"{run['val_accuracy']:.3f}",
             f"{chosen['C']:g}", f"{run['peak_rss_mb']:,.0f}"],
            ["probe, the whole classify (+ test, model folder)", f"{run['wall_s']:.1f}", "", "",
             f"{run['test_accuracy']:.3f} test", "", ""]]
    table = format_table(["step", "s", "train rows/s", "GB/s read", "accuracy", "C", "peak RSS MB"], rows,
                         title=f"\n{run['device']}: {run['rows']:,} rows x {dims} float32, {classes} classes, "
                               f"80/10/10")
    table += (f"\nthe whole sweep: {run['wall_s']:.0f} s (target <= 120 s on one H100/H200); the probe read "
              f"{rate:.2f} GB/s, {rate / disk['gb_s']:.0%} of the disk's {disk['gb_s']:.2f} GB/s cold")
    publish("stage2-gpu", {"run": run, "disk": disk, "epochs": epochs, "read_gb_s": rate}, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=400_000, help="rows of the small store (default: %(default)s)")
    parser.add_argument("--big", type=int, default=4_000_000, help="rows of the big store (default: %(default)s)")
    parser.add_argument("--dims", type=int, help="features per row (default: 1,024; 2,048 with --gpu)")
    parser.add_argument("--classes", type=int, help=f"classes (default: {CLASSES}; 1,000 with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="the GPU target instead (above): one store of "
                                                           "--gpu-rows, the probe's sweep and the disk's rate")
    parser.add_argument("--gpu-rows", type=int, default=1_280_000, help="rows with --gpu (default: %(default)s)")
    parser.add_argument("--keep-stores", action="store_true", help="use the synthetic stores of an earlier run where "
                                                                     "they are there (they are seeded: the same)")
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parse_or_run_child(parser, CHILDREN, "child", child)
    if args is None:
        return
    work, runs = RESULTS / "work" / "stage2", {}
    for old in work.glob("models-*"):
        shutil.rmtree(old)
    if args.gpu:
        return gpu_target(args, work)
    dims, classes = args.dims or 1024, args.classes or CLASSES
    for name, rows in (("small", args.small), ("big", args.big)):
        runs[name] = probed(built(work / "stores" / f"{name}.h5", rows, dims, classes, args.keep_stores),
                            work / f"models-{name}")
    runs["sklearn"] = run_child(["-m", "bench.stage2", "--child", "sklearn", "--store", str(work / "stores/small.h5"),
                                 "--out", str(work)], timeout=7200)
    small, big, sk = runs["small"], runs["big"], runs["sklearn"]
    rss_ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    speed_ratio = sk["fit_s"] / small["fit_s"]
    rows = [[f"probe, {small['rows']:,} rows", f"{small['fit_s']:.1f}", f"{small['train_rows'] / small['fit_s']:,.0f}",
             f"{small['val_accuracy']:.3f}", f"{small['chosen']['C']:g}", f"{small['peak_rss_mb']:,.0f}"],
            [f"probe, {big['rows']:,} rows", f"{big['fit_s']:.1f}", f"{big['train_rows'] / big['fit_s']:,.0f}",
             f"{big['val_accuracy']:.3f}", f"{big['chosen']['C']:g}", f"{big['peak_rss_mb']:,.0f}"],
            [f"scikit-learn, {sk['rows']:,} rows", f"{sk['fit_s']:.1f}", f"{sk['train_rows'] / sk['fit_s']:,.0f}",
             f"{sk['val_accuracy']:.3f}", f"{sk['chosen']['C']:g}", f"{sk['peak_rss_mb']:,.0f}"]]
    table = format_table(["fit (8 Cs, C on val)", "s", "train rows/s", "val acc", "C", "peak RSS MB"], rows,
                         title=f"\nsynthetic stores, {dims} float32 features, {classes} classes, 80/10/10")
    table += (f"\npeak RSS big / small: {rss_ratio:.3f} (target <= 1.1); speed probe / scikit-learn on "
              f"{sk['rows']:,} rows: {speed_ratio:.1f}x (target >= 5x)")
    publish("stage2", {"runs": runs, "rss_ratio": rss_ratio, "speed_ratio": speed_ratio}, table)

if __name__ == "__main__":
    main()
