"""JPEG decoding with NVIDIA DALI (``--decoder dali``): the GPU's hardware JPEG engines, resized on the device.

See :mod:`pipeline.data.gpu_decode` for what GPU decoding matches and where files fall back to Pillow;
this module is imported only when the ``dali`` decoder runs (``pip install 'layertap[dali]'``).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.core.runtime import import_keras
from pipeline.data import gpu_decode
from pipeline.data.decoding import CHANGED
from pipeline.data.gpu_decode import decode_on_host, takes, unchanged
from pipeline.data.headers import gpu_jpeg
from pipeline.data.images import DEFAULT_MAX_PIXELS, or_reason, read_file

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    """One chunk on its way through the decoder: its files, and where each is decoded."""

    span: tuple[int, int]
    files: list
    reasons: list  # why each file is skipped, or None
    stats: list | None
    dali: list[int]  # positions in the chunk of the JPEGs DALI reads and decodes
    facts: list  # their gpu_jpeg facts
    host: list[int]  # positions Pillow decodes (or names why not)
    host_results: Iterator  # (array, reason) per ``host`` position, under way on the pool
    queued: bool = False  # a DALI run of ``dali`` is scheduled and its output not yet taken
    output: object = None  # that output (or the error of that run), once taken early


class DaliDecoder:
    """Decode image files into ``(n, size, size, 3)`` uint8 batches with NVIDIA DALI.

    DALI reads the JPEGs itself (``fn.io.file.read``, on its own threads), decodes them on the
    ``mixed`` device (the hardware JPEG engines where the GPU has them, nvJPEG's CUDA decoder
    otherwise; DALI applies the EXIF orientation) and resizes them (``fn.resize``, antialiased
    bilinear, over the centre square for ``crop``, the region ``ImageOps.fit`` crops). Which files
    DALI takes, and the region, come from the scan's facts (:attr:`pipeline.data.images.ImageRecord.jpeg`),
    so no file is opened in Python on the way. Batches come back as the Keras backend's own array on
    the device DALI ran on (DLPack, copied off DALI's buffers): a ``jax.Array`` or a ``torch.Tensor``;
    NumPy for TensorFlow.

    Args:
        size: Output side in pixels.
        resize: ``squash`` or ``crop`` (see :func:`pipeline.data.decoding.decode_image`).
        max_pixels: Larger images are skipped as decompression bombs (by Pillow, which names them).
        batch_size: The most files one chunk has.
        device: ``cuda`` (the default, :data:`pipeline.data.gpu_decode.DEVICE`) or ``cpu`` (DALI's CPU decoder;
            for tests).
        workers: DALI's CPU threads (which read the files), and the threads that run Pillow for the files DALI
            does not take.
        hw_decoder_load: The share of each batch DALI gives the hardware JPEG engines, the rest going to
            nvJPEG's CUDA decoder. 1.0 (all) by default: which decoder takes an image then depends on the
            image alone, never on the other images of its batch. DALI alone ran faster so on an H100 than at
            its default, and the same within noise in the pipeline (bench/NOTES.md). ``None``: DALI's
            default; ``make bench-gpu --dali-hw-loads`` measures others.
        ahead: Chunks DALI reads and decodes while the one before them is handed over (:meth:`batches`).
    """

    def __init__(self, size: int, resize: str = "squash", max_pixels: int | None = None, batch_size: int = 32,
                 device: str | None = None, workers: int = 4, hw_decoder_load: float | None = 1.0, ahead: int = 2):

        self.size, self.resize, self.batch_size, self.ahead = size, resize, batch_size, ahead
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.on_gpu = (device or gpu_decode.DEVICE) != "cpu"
        self.workers, self.hw_decoder_load = workers, hw_decoder_load
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layertap-pillow")
        self._pipe = self._build()
        self._streaming = False
        self._warned = False

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        device_id = None
        if self.on_gpu:
            from nvidia.dali import backend
            device_id = backend.GetCUDACurrentDevice()

        @pipeline_def(batch_size=self.batch_size, num_threads=self.workers, device_id=device_id,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def decode():
            paths = fn.external_source(name="paths", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.FLOAT, ndim=1)
            end = fn.external_source(name="end", dtype=types.FLOAT, ndim=1)
            # Plain reads, not DALI's default mmap: a file cut short while mapped would kill the process (SIGBUS).
            blobs = fn.io.file.read(paths, dont_use_mmap=True)
            load = {} if self.hw_decoder_load is None else {"hw_decoder_load": self.hw_decoder_load}
            images = fn.decoders.image(blobs, device="mixed" if self.on_gpu else "cpu", output_type=types.RGB, **load)
            return fn.resize(images, size=[self.size, self.size], interp_type=types.INTERP_LINEAR, antialias=True,
                             roi_start=start, roi_end=end, dtype=types.UINT8)

        pipe = decode()
        pipe.build()
        return pipe

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._pipe = None

    def __call__(self, paths: list[os.PathLike], stats=None, jpegs=None) -> tuple[object, list[str | None]]:
        """Decode one batch: the decoded images in order and, per path, ``None`` or why it was skipped
        (the arguments as :meth:`batches` takes them)."""
        ((_, pixels, reasons),) = self.batches(paths, [(0, len(paths))], stats, jpegs)
        return pixels, reasons

    def batches(self, paths, chunks: list[tuple[int, int]], stats=None, jpegs=None):
        """Yield ``((a, b), pixels, reasons)`` for each chunk of ``paths``, in order.

        While one chunk is handed over, DALI reads and decodes the JPEGs of the next ``ahead`` chunks on its
        own threads and the GPU; the other files are decoded by Pillow on this decoder's threads.

        Args:
            paths, stats, jpegs: By list position (lists, or dicts of the chunks' positions). ``stats``: the
                ``(size, mtime_ns)`` each file must still have after it is read (else it is skipped as
                changed). ``jpegs``: each file's :func:`pipeline.data.headers.gpu_jpeg` facts from the scan
                (``ImageRecord.jpeg``), ``None`` for what Pillow decodes; without them each file is read
                here to find them out.
        """
        if self._streaming:
            raise RuntimeError("a DaliDecoder decodes one stream of chunks at a time")
        self._streaming, pending = True, deque()
        try:
            for chunk in chunks:
                pending.append(self._start(paths, chunk, stats, jpegs))
                if len(pending) > self.ahead:
                    yield self._finish(pending.popleft(), pending)
            while pending:
                yield self._finish(pending.popleft(), pending)
        finally:
            self._take_queued(pending)  # an abandoned stream leaves DALI's queue empty for the next
            self._streaming = False

    def _start(self, paths, span: tuple[int, int], stats, jpegs) -> _Chunk:
        files = [paths[i] for i in range(*span)]
        reasons = [None] * len(files)
        if jpegs is not None:
            facts = [jpegs[i] for i in range(*span)]
        else:  # no scan: each file read here to find out
            facts, reasons = map(list, zip(*(_facts_of(file) for file in files))) if files else ([], [])
        dali, host = [], []
        for k, jpeg in enumerate(facts):
            if takes(jpeg, self.max_pixels):
                dali.append(k)
            elif reasons[k] is None:
                host.append(k)
        chunk = _Chunk(span, files, reasons, [stats[i] for i in range(*span)] if stats else None, dali,
                       [facts[k] for k in dali], host, decode_on_host(self._pool, [files[k] for k in host], self.size,
                                                                      self.resize, self.max_pixels))
        if dali:
            self._schedule([files[k] for k in dali], chunk.facts)
            chunk.queued = True
        return chunk

    def _schedule(self, files: list, facts: list) -> None:
        """Queue one DALI run over ``files``."""
        names = [os.fsencode(file) for file in files]
        width = max(map(len, names))
        # One dense (n, width) array of NUL-padded paths (DALI's file reader stops at the first NUL; a one-path run,
        # the fallback below, has no padding), and dense regions: a list of per-file arrays costs DALI a
        # conversion each, several times the dense array's cost on this thread (bench/NOTES.md).
        paths = np.frombuffer(b"".join(name.ljust(width, b"\0") for name in names), np.uint8).reshape(-1, width)
        regions = np.array([self._region(jpeg) for jpeg in facts], np.float32)  # (n, 2, 2)
        self._pipe.feed_input("paths", paths)
        self._pipe.feed_input("start", np.ascontiguousarray(regions[:, 0]))
        self._pipe.feed_input("end", np.ascontiguousarray(regions[:, 1]))
        self._pipe.schedule_run()

    def _output(self):
        """The output of the oldest queued run, as the Keras backend's array; raises RuntimeError where it failed."""
        (out,) = self._pipe.outputs()
        return self._handed_over(out)

    def _take_queued(self, chunks) -> None:
        """Take the outputs of ``chunks``' queued runs now (keeping each, or its error, for later)."""
        for chunk in chunks:
            if chunk.queued:
                try:
                    chunk.output = self._output()
                except RuntimeError as exc:
                    chunk.output = exc
                chunk.queued = False

    def _finish(self, chunk: _Chunk, later) -> tuple[tuple[int, int], object, list[str | None]]:
        n, reasons = len(chunk.files), chunk.reasons
        pieces, host, host_results = [], list(chunk.host), list(chunk.host_results)
        if chunk.dali:
            self._take_queued([chunk])
            if isinstance(chunk.output, RuntimeError):  # one bad JPEG fails DALI's whole run
                self._take_queued(later)  # the runs queued behind it, so the retries below are DALI's only work
                # DALI calls its pipeline "no longer valid" after a failed run. Its CPU device runs on regardless; the
                # GPU's was never seen failing. The retries get a fresh pipeline: milliseconds, and only after a
                # failure.
                self._pipe = self._build()
                decoded, failed = self._one_by_one(chunk, chunk.output)
                pieces += decoded
                host += failed
                host_results += decode_on_host(self._pool, [chunk.files[k] for k in failed], self.size, self.resize,
                                               self.max_pixels)
            else:
                pieces.append((chunk.output, chunk.dali))
            chunk.output = None
        arrays = []
        for k, (array, reason) in zip(host, host_results):
            reasons[k] = reason
            if array is not None:
                arrays.append((k, array))
        if arrays or not pieces:
            pixels = np.stack([a for _, a in arrays]) if arrays else np.zeros((0, self.size, self.size, 3), np.uint8)
            pieces.append((self._from_numpy(pixels), [k for k, _ in arrays]))
        if chunk.stats:  # read after the scan: a file whose stat moved may have other bytes than its hash says
            for k in range(n):
                if reasons[k] is None and chunk.stats[k] and not unchanged(chunk.files[k], chunk.stats[k]):
                    reasons[k] = CHANGED
        return chunk.span, _in_order(pieces, reasons), reasons

    def _one_by_one(self, chunk: _Chunk, error: RuntimeError) -> tuple[list, list[int]]:
        """``([(batch, positions)], failed positions)`` of a chunk whose DALI run failed, each JPEG its own run."""
        if not self._warned:  # once: were it every batch (a fault, not a bad file), the run is much slower
            self._warned = True
            log.warning("DALI failed on a batch of %d JPEGs, decoding them one at a time (said once): %s",
                        len(chunk.dali), _what_failed(error))
        pieces, failed = [], []
        for k, jpeg in zip(chunk.dali, chunk.facts):
            self._schedule([chunk.files[k]], [jpeg])
            try:
                pieces.append((self._output(), [k]))
            except RuntimeError:
                failed.append(k)  # Pillow decodes it or says why not
        return pieces, failed

    def _handed_over(self, out):
        """DALI's output as the Keras backend's array, by DLPack on the device DALI ran on.

        A copy, finished before DALI may reuse its buffers for a later run.
        """
        backend = _backend()
        if backend == "jax":
            import jax.dlpack
            return jax.dlpack.from_dlpack(out.as_tensor()).copy().block_until_ready()
        if backend == "torch":
            import torch
            batch = torch.from_dlpack(out.as_tensor()).clone()
            if batch.is_cuda:
                torch.cuda.current_stream(batch.device).synchronize()
            return batch
        return np.array((out.as_cpu() if self.on_gpu else out).as_array())

    def _region(self, jpeg: tuple[int, int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
        """``((top, left), (bottom, right))`` of the upright image that is resized: all of it, or its centre
        square (``crop``)."""
        width, height, orientation = jpeg
        if orientation in (5, 6, 7, 8):  # DALI turns it upright first
            width, height = height, width
        top = left = 0.0
        if self.resize == "crop":
            side = min(width, height)
            top, left, width, height = (height - side) / 2, (width - side) / 2, side, side
        return (top, left), (top + height, left + width)

    def _from_numpy(self, pixels: np.ndarray):
        """Host pixels as the same kind of array :meth:`_output` returns."""
        backend = _backend()
        if backend == "jax":
            import jax
            return jax.device_put(pixels, jax.devices("gpu" if self.on_gpu else "cpu")[0])
        if backend == "torch":
            import torch
            return torch.from_numpy(pixels).to("cuda" if self.on_gpu else "cpu")
        return pixels


def _facts_of(path) -> tuple[tuple[int, int, int] | None, str | None]:
    """A file's :func:`pipeline.data.headers.gpu_jpeg` facts, or why it cannot be read, read here (without a scan)."""
    blob, reason = or_reason(read_file, path)
    return (None, reason) if blob is None else (gpu_jpeg(blob), None)


def _what_failed(error: RuntimeError) -> str:
    """The line of a DALI error that says what failed (after its operator's name and traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = lines.index("encountered:") + 1 if "encountered:" in lines[:-1] else 0
    return lines[said][:300] if lines else repr(error)


def _in_order(pieces: list[tuple[object, list[int]]], reasons: list[str | None]):
    """One batch from ``(batch, positions)`` pieces: the rows of the positions without a reason, in order."""
    rows = [i for _, positions in pieces for i in positions]
    order = np.array([j for j in np.argsort(rows, kind="stable") if reasons[rows[j]] is None], np.int64)
    batches = [batch for batch, _ in pieces if len(batch)] or [pieces[0][0]]
    module = type(batches[0]).__module__
    identity = len(order) == len(rows) and np.all(order[:-1] < order[1:])
    if module.startswith("torch"):
        import torch
        batch = torch.cat(batches) if len(batches) > 1 else batches[0]
        return batch if identity else batch[torch.as_tensor(order, device=batch.device)]
    if module.startswith("jax"):
        import jax.numpy as jnp
        batch = jnp.concatenate(batches) if len(batches) > 1 else batches[0]
    else:
        batch = np.concatenate(batches) if len(batches) > 1 else batches[0]
    return batch if identity else batch[order]


def _backend() -> str:
    return import_keras().config.backend()
