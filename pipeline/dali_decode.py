"""JPEG decoding with NVIDIA DALI (``--decoder dali``): the GPU's hardware JPEG engines, resized on the device.

See :mod:`pipeline.gpu_decode` for what GPU decoding matches and where files fall back to Pillow;
this module is imported only when the ``dali`` decoder runs (``pip install 'layertap[dali]'``).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline import gpu_decode
from pipeline.gpu_decode import decode_on_host, read_and_route

log = logging.getLogger(__name__)


class DaliDecoder:
    """Decode a list of image files into one ``(n, size, size, 3)`` uint8 batch with NVIDIA DALI.

    JPEGs go to ``fn.decoders.image`` on the ``mixed`` device (the hardware JPEG engines where the
    GPU has them, nvJPEG's CUDA decoder otherwise; DALI applies the EXIF orientation) and
    ``fn.resize`` (antialiased bilinear, over the centre square for ``crop``, the region
    ``ImageOps.fit`` crops). The batch comes back as the Keras backend's own array on the device
    DALI ran on (DLPack, copied off DALI's buffers, which its next run reuses): a ``jax.Array`` or a
    ``torch.Tensor``; NumPy for TensorFlow.

    Args:
        size: Output side in pixels.
        resize: ``squash`` or ``crop`` (see :func:`pipeline.decoding.decode_image`).
        max_pixels: Larger images are skipped as decompression bombs (by Pillow, which names them).
        batch_size: The most files one call gets.
        device: ``cuda`` (the default, :data:`pipeline.gpu_decode.DEVICE`) or ``cpu`` (DALI's CPU decoder; for tests).
        workers: DALI's CPU threads, and the threads that run Pillow for the files DALI does not take.
        hw_decoder_load: The share of each batch DALI gives the hardware JPEG engines, the rest going to
            nvJPEG's CUDA decoder. 1.0 (all) by default: which decoder takes an image then depends on the
            image alone, never on the other images of its batch. DALI alone ran faster so on an H100 (its
            own file reader: 20,300 against 17,400 images/s at DALI's default, 0.65; batches fed as here,
            16,000 against 12,900), the same within noise in the pipeline (bench/NOTES.md). ``None``: DALI's
            default; ``make bench-gpu --dali-hw-loads`` measures others.
    """

    def __init__(self, size: int, resize: str = "squash", max_pixels: int | None = None, batch_size: int = 32,
                 device: str | None = None, workers: int = 4, hw_decoder_load: float | None = 1.0):
        from pipeline.images import DEFAULT_MAX_PIXELS

        self.size, self.resize, self.batch_size = size, resize, batch_size
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.on_gpu = (device or gpu_decode.DEVICE) != "cpu"
        self.workers, self.hw_decoder_load = workers, hw_decoder_load
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layertap-read")
        self._pipe = self._build()
        self._lock = threading.Lock()  # one batch in DALI at a time; reading and routing the next overlap it
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
            blobs = fn.external_source(name="blobs", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.FLOAT, ndim=1)
            end = fn.external_source(name="end", dtype=types.FLOAT, ndim=1)
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

    def __call__(self, paths: list[os.PathLike], stats=None) -> tuple[object, list[str | None]]:
        """Decode ``paths``; returns the decoded images in order and, per path, ``None`` or why it was skipped.

        ``stats``: the ``(size, mtime_ns)`` each file must still have (else it is skipped as changed).
        """
        blobs, reasons, jpegs, host = read_and_route(paths, stats, self.max_pixels)
        pieces, failed = self._decode_jpegs([(i, blobs[i], header) for i, header in jpegs])
        host += failed
        arrays = []
        for i, (array, reason) in zip(host, decode_on_host(self._pool, [paths[i] for i in host], self.size,
                                                           self.resize, self.max_pixels)):
            reasons[i] = reason
            if array is not None:
                arrays.append((i, array))
        if arrays or not pieces:
            pixels = np.stack([a for _, a in arrays]) if arrays else np.zeros((0, self.size, self.size, 3), np.uint8)
            pieces.append((self._from_numpy(pixels), [i for i, _ in arrays]))
        return _in_order(pieces), reasons

    def _decode_jpegs(self, items: list[tuple[int, bytes, tuple]]) -> tuple[list, list[int]]:
        """``([(batch, positions)], failed positions)``: all in one run, or if that fails one by one."""
        if not items:
            return [], []
        try:
            return [(self._run(items), [i for i, _, _ in items])], []
        except RuntimeError as exc:  # one bad JPEG fails DALI's whole batch
            if not self._warned:  # once: were it every batch (a fault, not a bad file), the run is much slower
                self._warned = True
                log.warning("DALI failed on a batch of %d JPEGs, decoding them one at a time (said once): %s",
                            len(items), str(exc).strip().splitlines()[0][:300])
            pieces, failed = [], []
            for item in items:
                try:
                    pieces.append((self._run([item]), [item[0]]))
                except RuntimeError:
                    failed.append(item[0])  # Pillow decodes it or says why not
            return pieces, failed

    def _run(self, items: list[tuple[int, bytes, tuple]]):
        regions = np.array([self._region(header) for _, _, header in items], np.float32)  # (n, 2, 2)
        blobs = [np.frombuffer(blob, np.uint8) for _, blob, _ in items]
        with self._lock:
            self._pipe.feed_input("blobs", blobs)
            # Dense batches, one array each: a list costs DALI a conversion per image (measured, 2/3 of feeding).
            self._pipe.feed_input("start", np.ascontiguousarray(regions[:, 0]))
            self._pipe.feed_input("end", np.ascontiguousarray(regions[:, 1]))
            (out,) = self._pipe.run()
            return self._handed_over(out)

    def _handed_over(self, out):
        """DALI's output as the Keras backend's array, by DLPack on the device DALI ran on.

        A copy, finished before the next run may reuse DALI's buffers (so under the lock).
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

    def _region(self, header: tuple) -> tuple[tuple[float, float], tuple[float, float]]:
        """``((top, left), (bottom, right))`` of the upright image that is resized: all of it, or its centre
        square (``crop``)."""
        width, height, _, orientation = header
        if orientation in (5, 6, 7, 8):  # DALI turns it upright first
            width, height = height, width
        top = left = 0.0
        if self.resize == "crop":
            side = min(width, height)
            top, left, width, height = (height - side) / 2, (width - side) / 2, side, side
        return (top, left), (top + height, left + width)

    def _from_numpy(self, pixels: np.ndarray):
        """Host pixels as the same kind of array :meth:`_run` returns."""
        backend = _backend()
        if backend == "jax":
            import jax
            return jax.device_put(pixels, jax.devices("gpu" if self.on_gpu else "cpu")[0])
        if backend == "torch":
            import torch
            return torch.from_numpy(pixels).to("cuda" if self.on_gpu else "cpu")
        return pixels


def _in_order(pieces: list[tuple[object, list[int]]]):
    """One batch from ``(batch, positions)`` pieces, its rows in position order."""
    rows = [i for _, positions in pieces for i in positions]
    order = np.argsort(rows, kind="stable")
    batches = [batch for batch, _ in pieces if len(batch)] or [pieces[0][0]]
    module = type(batches[0]).__module__
    if module.startswith("torch"):
        import torch
        batch = torch.cat(batches) if len(batches) > 1 else batches[0]
        return batch if np.all(order[:-1] < order[1:]) else batch[torch.as_tensor(order, device=batch.device)]
    if module.startswith("jax"):
        import jax.numpy as jnp
        batch = jnp.concatenate(batches) if len(batches) > 1 else batches[0]
    else:
        batch = np.concatenate(batches) if len(batches) > 1 else batches[0]
    return batch if np.all(order[:-1] < order[1:]) else batch[order]


def _backend() -> str:
    from pipeline import import_keras
    return import_keras().config.backend()
