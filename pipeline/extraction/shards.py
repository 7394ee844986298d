"""The seam between a feature store and the engines that fill it: plan, run, merge.

:func:`plan_shards` cuts the image list into fixed slices (shards) and says which are not yet
committed; :func:`run_shard` computes one shard from its decoded batches and commits it
atomically, a pure function of (image slice, settings); :func:`pipeline.store.writing.merge_shards`
joins the shards into the store. An engine is a short driver of these three:

- the local engine (:mod:`pipeline.extraction.engines.local`) decodes in worker processes on this
  host, ahead of the forward passes in this process;
- the Ray engine (:mod:`pipeline.extraction.engines.ray`) decodes in Ray tasks and runs the model in an
  actor pool, on one machine or a cluster.

Before an engine runs, :mod:`pipeline.extraction.reuse` writes what earlier stores of the same model settings
already hold (by content hash), so an engine gets only images no store has computed.

Both chunk a shard into the same batches and pad them the same way, so they write identical
shards; a shard committed by either is reused by both, which is what makes a killed run
resumable whatever engine it ran on. A third engine (Spark, Dask) would be a third driver
(:mod:`pipeline.extraction.engines`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.core.parallel import default_workers, on_terminal, ordered_map
from pipeline.core.runtime import keras_backend, on_gpu
from pipeline.data.dali_decode import DaliDecoder
from pipeline.data.decoding import ProcessDecoder
from pipeline.data.gpu_decode import NvjpegDecoder, to_backend
from pipeline.data.images import ImageList, ImageRecord
from pipeline.store.feature_store import FeatureStore, Rows
from pipeline.store.writing import write_shard

# Forward passes started and not yet collected while the next batch is fetched (on JAX they run asynchronously).
# One: on a CPU a forward pass already takes every core. ``make bench-gpu``'s ``-ahead2`` rows measure two on a GPU
# (bench/NOTES.md: not yet run there).
IN_FLIGHT = 1

Batch = tuple[tuple[int, int], object, list]  # ((a, b), pixels of the decoded images, reason or None per image)


@dataclass(frozen=True)
class ShardJob:
    """One shard to compute: images ``start:stop`` of the list, committed to ``path``.

    Self-contained (absolute paths, its own records), so it can be sent to another process or machine.
    """

    start: int
    stop: int
    path: Path
    root: Path
    records: tuple[ImageRecord, ...]

    def files(self) -> list[Path]:
        return [self.root / record.path for record in self.records]

    def chunks(self, batch_size: int) -> list[tuple[int, int]]:
        """The forward batches of this shard, ``(a, b)`` in list positions; the same on every engine."""
        return [(a, min(a + batch_size, self.stop)) for a in range(self.start, self.stop, batch_size)]


def parts_dir(store_path: Path, taps: Iterable[str]) -> Path:
    """Where the shards of ``taps`` for ``store_path`` are committed until they are merged."""
    return store_path.with_name(store_path.stem + ".parts") / "-".join(sorted(taps))


def plan_shards(images: ImageList, store_path: Path, taps: tuple[str, ...], key: str,
                shard_size: int) -> tuple[list[ShardJob], list[ShardJob]]:
    """Cut the image list into shards of ``shard_size`` images.

    Returns:
        Every shard, in list order (what is merged), and those not yet committed for this key and
        these taps (what an engine runs).
    """
    parts, root = parts_dir(store_path, taps).resolve(), Path(images.root).resolve()
    shards = [ShardJob(start, min(start + shard_size, len(images)),
                       parts / f"shard-{start:09d}-{min(start + shard_size, len(images)):09d}.h5", root,
                       images.records[start:start + shard_size])
              for start in range(0, len(images), shard_size)]
    return shards, [job for job in shards if not is_committed(job.path, key, taps)]


def is_committed(path: Path, key: str, taps) -> bool:
    """Whether ``path`` is a complete shard of this key with exactly these taps."""
    if not path.exists():
        return False
    try:
        shard = FeatureStore(path, kind="shard")
    except LayertapError:
        return False
    return shard.key == key and set(shard.taps) == set(taps)


def run_shard(job: ShardJob, batches: Iterable[Batch], extractor, manifest: dict, class_names, dtype: str,
              pad_to: int | None, progress: Callable[[int], object] | None = None) -> int:
    """Compute one shard from its decoded batches (``job.chunks(batch_size)``, in order) and commit it.

    Args:
        extractor: The :class:`pipeline.backbones.build.Extractor` of the taps to compute.
        manifest: The store's manifest; the shard's records its slice and taps on top.
        pad_to: Pad short batches to this many images (:func:`pads_short_batches`), or None.
        progress: Called with the number of images of each batch done.

    Returns:
        The number of images decoded (the shard's size, bad images included).
    """
    class_index = {name: i for i, name in enumerate(class_names)}
    rows, skipped, outputs = Rows(), [], {tap: [] for tap in extractor.taps}
    in_flight = deque()  # IN_FLIGHT batches' forward passes run while the next batch is fetched (on JAX)
    for (a, b), pixels, reasons in batches:
        records = job.records[a - job.start:b - job.start]
        rows.extend(rows_of([r for r, reason in zip(records, reasons) if reason is None], class_index))
        skipped += [(r.path, reason) for r, reason in zip(records, reasons) if reason is not None]
        if len(pixels):
            in_flight.append(forward(extractor, pixels, pad_to))
            if len(in_flight) > IN_FLIGHT:
                collect(extractor, in_flight.popleft(), outputs)
        if progress:
            progress(b - a)
    while in_flight:
        collect(extractor, in_flight.popleft(), outputs)
    features = {tap: (np.concatenate(v) if v else np.zeros((0, extractor.dims(tap)), np.float32))
                for tap, v in outputs.items()}
    write_shard(job.path, rows=rows, features=features, class_names=class_names, skipped=skipped,
                manifest={**manifest, "shard": [job.start, job.stop], "shard_taps": list(extractor.taps)},
                map_shapes=extractor.map_shapes, dtype=dtype)
    return job.stop - job.start


def rows_of(records: list[ImageRecord], class_index: dict[str, int]) -> Rows:
    """A store's per-image columns for ``records``, each label by its class's index."""
    return Rows([r.path for r in records], [class_index[r.label] for r in records], [r.split for r in records],
                [r.fingerprint for r in records])


def pads_short_batches() -> bool:
    """Whether a short batch (the last one, or one with skipped images) is padded to the full batch size.

    Yes where a new input shape means a compile that costs more than the padding images' compute: JAX
    and torch (XLA, inductor) and any GPU. TensorFlow on a CPU retraces once, in about 0.5 s for VGG16,
    and then takes any batch size, while 18 padding images cost about 4 s of float32 forward on two
    cores (bench/NOTES.md).
    """
    return keras_backend() != "tensorflow" or on_gpu()


def forward(extractor, pixels, pad_to: int | None):
    """Start one batch's forward pass (:meth:`pipeline.backbones.build.Extractor.dispatch`), a short batch padded to
    ``pad_to`` images so the model keeps one input shape; ``(n, handle)`` for :func:`collect`."""
    n = len(pixels)
    if isinstance(pixels, np.ndarray):
        x = pixels
        if pad_to and n < pad_to:
            x = np.concatenate([x, np.zeros((pad_to - n,) + x.shape[1:], x.dtype)])
    else:
        x = to_backend(pixels, pad_to or len(pixels))
    return n, extractor.dispatch(x)


def collect(extractor, started, outputs: dict) -> None:
    """Append the features of a :func:`forward` to ``outputs`` (``{tap: [arrays]}``), padding rows dropped."""
    n, handle = started
    for tap, values in extractor.collect(handle).items():
        if tap in outputs:
            outputs[tap].append(values[:n])


def decoding_inputs(jobs: list[ShardJob]) -> tuple[dict, dict, dict]:
    """What :func:`decoded_batches` takes for ``jobs``: ``(paths, stats, jpegs)`` by list position."""
    files, stats, jpegs = {}, {}, {}
    for job in jobs:
        for i, path, record in zip(range(job.start, job.stop), job.files(), job.records):
            files[i], stats[i], jpegs[i] = path, record.stat, record.jpeg
    return files, stats, jpegs


def open_decoder(settings, device: str | None = None, workers: int | None = None):
    """The decoder ``settings.decoder`` names, for :func:`decoded_batches` (close it when done): Pillow in
    worker processes, or a GPU decoder on ``device`` (default :data:`pipeline.data.gpu_decode.DEVICE`), with
    ``workers`` processes or threads (default: ``settings.workers``, else one per core, at most 16)."""
    workers = workers or settings.workers or default_workers()
    if settings.decoder == "dali":
        try:
            return DaliDecoder(settings.image_size, settings.resize, settings.max_pixels, settings.batch_size,
                               device=device, workers=workers)
        except Exception as exc:  # noqa: BLE001 - DALI imported and saw a GPU, yet cannot run a pipeline
            first = (str(exc).strip().splitlines() or [""])[0][:300]  # DALI's errors go on with a C++ stack
            raise LayertapError(f"NVIDIA DALI could not start a decoder ({type(exc).__name__}: {first}); use "
                                "--decoder pillow to decode on the CPU cores (--decoder auto, the default, takes "
                                "DALI wherever it imports and sees a GPU)") from exc
    if settings.decoder == "nvjpeg":
        return NvjpegDecoder(settings.image_size, settings.resize, settings.max_pixels, device=device, workers=workers)
    return ProcessDecoder(settings.image_size, settings.batch_size, workers, resize=settings.resize,
                          draft=settings.draft, max_pixels=settings.max_pixels)


def decoded_batches(paths, stats, jpegs, chunks: list[tuple[int, int]], settings, decoder=None) -> Iterator[Batch]:
    """Decode ``paths[a:b]`` for each chunk ``(a, b)``, in order, ahead of the consumer.

    Args:
        paths, stats, jpegs: By list position (lists, or dicts of the chunks' positions; :func:`decoding_inputs`):
            the files; the ``(size, mtime_ns)`` the scan saw (a file that no longer has them is skipped,
            :data:`pipeline.data.decoding.CHANGED`, never stored under its old content's hash), or None; the scan's
            JPEG facts (``ImageRecord.jpeg``), which tell ``dali`` what it reads and decodes itself, or None
            (it then reads each file once more to find out).
        decoder: An :func:`open_decoder` of these settings to use (and leave open), else one is opened and closed.

    Yields:
        ``((a, b), pixels, reasons)``: the decoded images of the chunk as one ``(n, size, size, 3)``
        uint8 batch (NumPy, or a device array for ``nvjpeg`` and ``dali``) and, per path, ``None`` or why it
        was skipped.
    """
    own = decoder is None
    decoder = open_decoder(settings) if own else decoder
    try:
        if settings.decoder == "dali":
            stream = decoder.batches(paths, chunks, stats, jpegs)
            try:
                # In a thread of its own, ahead of the forward passes: handing a batch over waits on the GPU.
                yield from ordered_map(lambda _: next(stream), chunks, 1, prefetch=2)
            finally:
                stream.close()
        elif settings.decoder == "nvjpeg":
            def decode(chunk):
                return decoder([paths[i] for i in range(*chunk)], [stats[i] for i in range(*chunk)] if stats else None)
            for chunk, (pixels, reasons) in zip(chunks, ordered_map(decode, chunks, 1, prefetch=2)):
                yield chunk, pixels, reasons
        else:
            yield from decoder.batches(paths, chunks, stats)
    finally:
        if own:
            decoder.close()


def extraction_bar(jobs: list[ShardJob], done: int, enabled: bool):
    """The bar of images extracted, updated by hand (per batch here, per shard on Ray); it stays on screen,
    unlike the transient per-step bars of :func:`pipeline.core.parallel.progress_bar`."""
    from tqdm.auto import tqdm
    return tqdm(total=done + sum(job.stop - job.start for job in jobs), initial=done, desc="extract", unit="img",
                disable=not (enabled and on_terminal()), dynamic_ncols=True, smoothing=0.1)
