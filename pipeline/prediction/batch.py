"""``layertap predict ... --out FILE``: prediction as a batch job, on stage one's machinery.

A stage-two model is a tap of a store and a classifier, so predicting images is extracting that tap for
them and applying the classifier. The job does exactly that:

1. The images are listed (sorted, as a store orders them) into ``<out>.parts/<name>.csv``.
2. :func:`pipeline.extraction.extract.extract_features` computes the model's tap for them with the model's
   recipe (backbone, weights checked by sha256, size, resize, decoder, pooling, precision) into a store
   beside the model's own store. So the job gets what extraction has: shards committed as they are
   computed (a killed run resumes from them), constant memory, the decoders (``--decoder``), the engines
   (``--engine ray``), and reuse by content: an image that already has a row in a store of the same
   settings there (the model's training store among them) is read from it, not decoded.
3. The store is read back a batch at a time through the classifier, and the rows are written to
   ``<out>`` (CSV, or Parquet where pyarrow is installed) beside it, renamed into place when whole.

A fine-tuned model is its own network (the weights differ from the store's), so its images are decoded and
run here, a batch at a time, and written as they come; a killed run starts again.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.core.parallel import default_workers
from pipeline.core.taps import tap_parts
from pipeline.data.decoding import iter_decoded
from pipeline.extraction.extract import ExtractSettings, extract_features
from pipeline.runs import atomic
from pipeline.runs.artifacts import load_model
from pipeline.runs.reports import spreadsheet_safe
from pipeline.store.manifest import StoreManifest

FORMATS = (".csv", ".parquet")
UNLABELLED = "unlabelled"  # the one class of a prediction job's image list

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What a prediction job did."""

    out: Path
    n_images: int
    n_failed: int
    n_decoded: int  # images decoded and run through the backbone (0 where every one had a row already)
    n_reused: int  # images whose features came from an earlier store
    store_path: Path | None = None  # the store of the images' features (None for a fine-tuned model)


def header(top_k: int) -> list[str]:
    return ["path", "error"] + [f"{k}{i + 1}" for i in range(top_k) for k in ("class", "prob")]


def top_rows(paths, probabilities: np.ndarray, class_names, top_k: int):
    """Output rows: path, no error, then the top-k classes and their probabilities (4 decimals)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    for path, row, top in zip(paths, probabilities, order):
        yield [path, ""] + [v for j in top for v in (class_names[j], f"{row[j]:.4f}")]


class RowWriter:
    """Rows into ``<out>`` as CSV or Parquet, written beside it and renamed into place by :meth:`commit`."""

    def __init__(self, out: Path, top_k: int):
        if out.suffix.lower() not in FORMATS:
            raise LayertapError(f"--out {out}: write .csv or .parquet (pyarrow), not {out.suffix or 'no suffix'}")
        self.out, self.columns = out, header(top_k)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = atomic.temporary_name(out)
        if out.suffix.lower() == ".parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise LayertapError(f"--out {out}: Parquet needs pyarrow (pip install pyarrow); or write "
                                    f"{out.with_suffix('.csv')}") from None
            self._pa = pa
            self._parquet = pq.ParquetWriter(self.tmp, pa.schema([(c, pa.string()) for c in self.columns]))
            self._fh = None
        else:
            self._parquet = None
            self._fh = open(self.tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")
            self._csv = csv.writer(self._fh)
            self._csv.writerow(self.columns)

    def write(self, rows: list[list[str]]) -> None:
        rows = [row + [""] * (len(self.columns) - len(row)) for row in rows]
        if self._parquet is not None:
            if rows:
                self._parquet.write_table(self._pa.table(dict(zip(self.columns, map(list, zip(*rows))))))
        else:
            self._csv.writerows([list(map(spreadsheet_safe, row)) for row in rows])

    def commit(self) -> None:
        self.close()
        os.replace(self.tmp, self.out)

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        elif not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close()
        if kind is not None:
            self.tmp.unlink(missing_ok=True)


def predict_to_file(model_dir, files: list[Path], out, *, top_k: int = 3, batch_size: int = 32, workers: int = 0,
                    shard_size: int = 512, engine: str = "local", engine_options=None, decoder: str | None = None,
                    features_dir: str | None = None, reuse: bool = True, trust: bool = False,
                    progress: bool = True) -> BatchResult:
    """Predict ``files`` with a model folder into ``out`` (.csv or .parquet): one row per file, in path order,
    with the top-k classes or the reason it was skipped.

    Args:
        decoder: Stage one's ``--decoder`` (default: the one the model's store was made with, so that
            its rows can be reused and the pixels are the ones the model was trained on).
        features_dir: Where the images' store goes and earlier stores are looked for (default: the folder of
            the model's store, or ``features`` where that folder is not on this machine).
    """
    out = Path(out)
    if out.is_dir():
        raise LayertapError(f"--out {out} is a folder; name the file to write (e.g. {out / 'predictions.csv'})")
    atomic.check_replaceable(out, "--out")
    estimator, m = load_model(model_dir, trust=trust)
    recipe = StoreManifest.from_dict(m)
    top_k = min(top_k, len(m["class_names"]))  # --top-k 100 of 17 classes: 17 pairs, not 83 empty ones
    with RowWriter(out, top_k) as writer:
        if m["format"] == "keras-images":
            result = _run_network(estimator, recipe, m, files, writer, top_k, batch_size, workers)
        else:
            result = _run_extraction(estimator, recipe, m, files, writer, top_k, dict(
                batch_size=batch_size, workers=workers, shard_size=shard_size, engine=engine,
                engine_options=engine_options,
                decoder=decoder or recipe.decoder_name, reuse=reuse, progress=progress,
                out_dir=features_dir or _features_dir(m)), out)
        writer.commit()
    shutil.rmtree(parts_folder(out), ignore_errors=True)
    return dataclasses.replace(result, out=out)


def _features_dir(m: dict) -> str:
    """The folder of the model's store; where it is not here (a model copied from another machine), stage one's
    default folder, rather than a path of that machine made here."""
    folder = Path(m["store"]).parent
    if folder.is_dir():
        return str(folder)
    log.info("the model's store folder %s is not here: the images' features go to %s/ (--features to choose)",
             folder, ExtractSettings.out_dir)
    return ExtractSettings.out_dir  # the field's default


def parts_folder(out: Path) -> Path:
    """Where a job keeps its image list (and nothing else: the store is a cache of its own) until it is done."""
    return out.with_name(out.name + ".parts")


def _relative_list(files: list[Path]) -> tuple[Path, str, list[str]]:
    """The folder all ``files`` are under; that folder as the output names it (relative to the working folder
    where every file was given so); and the files' paths below it (sorted, '/'-separated, each once)."""
    absolute = [Path(os.path.abspath(f)) for f in files]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    shown = str(root) if any(Path(f).is_absolute() for f in files) else os.path.relpath(root)
    return root, shown, sorted({p.relative_to(root).as_posix() for p in absolute})


def _run_extraction(estimator, recipe: StoreManifest, m: dict, files, writer: RowWriter, top_k: int,
                    options: dict, out: Path) -> BatchResult:
    from pipeline.heads.classifiers import class_scores  # scikit-learn

    recipe.resolve_weights()  # the weights at hand are the model's, before any image is listed
    root, shown, names = _relative_list(files)
    listing = parts_folder(out) / f"{out.stem}.csv"
    settings = ExtractSettings(  # checked before the list is written: a wrong --features leaves nothing behind
        data=str(listing), root=str(root), backbone=recipe.backbone, layers=tap_parts(m["tap"]), pooling=recipe.pooling,
        weights=recipe.weights_arg, seed=recipe.seed, image_size=recipe.image_size, resize=recipe.resize,
        draft=recipe.draft, precision=recipe.precision, store_dtype=recipe.store_dtype,
        max_pixels=recipe.max_pixels, labelled=False, **options)
    listing.parent.mkdir(parents=True, exist_ok=True)
    # The same list gives the same store key: a job killed and run again resumes from its committed shards.
    text = io.StringIO(newline="")
    csv.writer(text, lineterminator="\n").writerows([("path", "label"), *((n, UNLABELLED) for n in names)])
    atomic.write_text(listing, text.getvalue())
    result = extract_features(settings)
    store = result.store
    reasons = dict(store.skipped)

    def show(name: str) -> str:
        return os.path.normpath(os.path.join(shown, name))

    stored = (path for _, paths in store.column_slices("paths") for path in paths)
    features = store.iter_batches(m["tap"])
    batch, pending, done = store.batch_rows(m["tap"]), [], 0  # pending: (name, skip reason or None), in order
    for i, name in enumerate(names):  # the store's rows are the listed images in this order, less the skipped
        pending.append((name, reasons.get(name)))
        done += name not in reasons
        if not (done % batch == 0 and name not in reasons or i == len(names) - 1):
            continue
        computed = [n for n, reason in pending if reason is None]
        scores = iter(())
        if computed:
            rows, values = next(features)
            if [next(stored).decode("utf-8", "surrogateescape") for _ in rows] != computed:
                raise LayertapError(f"{store.path}: its rows are not the listed images in order; delete it and "
                                    "predict again")
            scores = top_rows(computed, class_scores(estimator, values), m["class_names"], top_k)
        writer.write([[show(n), reason] if reason is not None else [show(n)] + next(scores)[1:]
                      for n, reason in pending])
        pending = []
    return BatchResult(Path(), len(names), len(names) - done, result.n_decoded, result.n_reused, store.path)


def _run_network(model, recipe: StoreManifest, m: dict, files, writer: RowWriter, top_k: int, batch_size: int,
                 workers: int) -> BatchResult:
    batch: list[tuple[Path, np.ndarray]] = []
    failed = decoded = 0

    def flush():
        probabilities = np.asarray(model.predict_on_batch(np.stack([a for _, a in batch])), np.float64)
        writer.write(list(top_rows([str(p) for p, _ in batch], probabilities, m["class_names"], top_k)))
        batch.clear()

    files = sorted(files, key=lambda p: Path(os.path.abspath(p)).as_posix())
    for i, array, reason in iter_decoded(files, recipe.decoder(), workers or default_workers(), 2 * batch_size):
        if array is None:
            if batch:
                flush()
            writer.write([[str(files[i]), reason]])
            failed += 1
            continue
        decoded += 1
        batch.append((files[i], array))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return BatchResult(Path(), len(files), failed, decoded, 0)
