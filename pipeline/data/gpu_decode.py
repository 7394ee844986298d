"""JPEG decoding on the GPU: nvJPEG through torchvision, or NVIDIA DALI; resized on the device.

Both decoders move decoding and resizing onto the GPU and hand the batch to the Keras backend
without a trip through host memory (DLPack). ``nvjpeg`` (torchvision) is for hosts with few cores
per GPU: its decoder (one lock, Huffman decoding on one thread) was slower than 16 Pillow worker
processes on an H100 host (bench/README.md), so it is not the default. ``dali`` (``fn.decoders.image`` on
the ``mixed`` device) decodes on the GPU's hardware
JPEG engines where it has them (an H100 has seven) and with nvJPEG's CUDA decoder otherwise. DALI
reads the files itself, routed by what the scan found in each (:attr:`pipeline.data.images.ImageRecord.jpeg`),
with two batches queued ahead. On an H100 host it extracted VGG16 and ResNet50 features faster than
``pillow`` (bench/README.md, "GPU"), so ``--decoder auto`` (the default) is ``dali`` where it can be
(:func:`resolve_decoder`).

What they decode matches :func:`pipeline.data.decoding.decode_image` in meaning (EXIF orientation
applied, RGB, squash or centre-crop resize with antialiased bilinear interpolation) but not bit for
bit (another IDCT, chroma upsampling and resize kernel), so the decoder is part of a store's cache
key. Files they cannot take (PNG and the other formats, CMYK JPEGs, cut-off JPEGs, images whose GPU
decode fails) are decoded by Pillow on the host and copied up; bad files are skipped with Pillow's
reason.

``nvjpeg`` needs ``torch`` and ``torchvision`` with CUDA, ``dali`` the ``nvidia-dali-cuda120`` or
``-cuda130`` wheel (``pip install 'layertap[dali]'`` or ``'layertap[dali-cuda13]'``). Both run the
same code on the CPU device (libjpeg-turbo), which the tests use.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from pipeline.core.errors import LayertapError
from pipeline.core.runtime import import_keras, keras_backend, on_gpu
from pipeline.core.settings import check_choice
from pipeline.data.decoding import CHANGED, decode_image
from pipeline.data.headers import gpu_jpeg
from pipeline.data.images import DEFAULT_MAX_PIXELS, or_reason, read_file
from pipeline.data.scan import file_stat

DECODERS = ("pillow", "nvjpeg", "dali")
DECODER_CHOICES = ("auto", *DECODERS)
# Keras backends that DALI hands batches to on the GPU (DLPack); on TensorFlow they would go through host memory.
DALI_BACKENDS = ("jax", "torch")
DEVICE = "cuda"  # where the GPU decoders decode by default (the tests set "cpu")


def resolve_decoder(decoder: str, here: bool = True) -> str:
    """``auto`` -> ``dali`` where decoding runs on this host (``here``: the engine decodes here) and the Keras
    backend (JAX or torch) computes on a GPU that DALI sees; else ``pillow``.

    DALI extracted faster than 16 Pillow processes on an H100 host (bench/README.md, "GPU"). Where the engine
    does not decode here (``--engine ray``) the GPUs are the cluster's, not this host's, so ``auto`` is
    ``pillow`` there (a cache key must not depend on which host started the run); name ``--decoder dali``
    to decode in the GPU actors. Checked without importing Keras
    or DALI on a machine without an accelerator.

    Raises:
        ValueError: an unknown decoder.
    """
    check_choice("decoder", decoder, DECODER_CHOICES)
    if decoder != "auto":
        return decoder
    if here and keras_backend() in DALI_BACKENDS and on_gpu() and dali_available():
        return "dali"
    return "pillow"


def nvjpeg_available(device: str | None = None) -> bool:
    """Whether torchvision can decode JPEGs on ``device`` here (default :data:`DEVICE`; ``cuda`` needs a CUDA GPU)."""
    try:
        import torch
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not available
        return False
    return (device or DEVICE) == "cpu" or bool(torch.cuda.is_available())


def dali_available(device: str | None = None) -> bool:
    """Whether NVIDIA DALI imports and can decode on ``device`` here (default :data:`DEVICE`; ``cuda`` needs a GPU)."""
    try:
        from nvidia.dali import backend
        return (device or DEVICE) == "cpu" or backend.GetCUDADeviceCount() > 0
    except Exception:  # noqa: BLE001 - a failed import or CUDA driver query means: not available
        return False


def check_decoder(decoder: str, device: str | None = None) -> str:
    """Validate a decoder name; ``nvjpeg`` only where torchvision has CUDA, ``dali`` only where DALI sees a GPU
    (on ``device``, default :data:`DEVICE`).

    Raises:
        ValueError: an unknown decoder.
        LayertapError: a GPU decoder asked for where its package or a CUDA GPU is missing.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r} is not known; use one of: {', '.join(DECODERS)}")
    if decoder == "nvjpeg" and not nvjpeg_available(device):
        raise LayertapError("decoder=nvjpeg needs torch and torchvision with a CUDA GPU (pip install torch "
                            "torchvision); use --decoder pillow to decode on the CPU")
    if decoder == "dali" and not dali_available(device):
        raise LayertapError("decoder=dali needs NVIDIA DALI and a CUDA GPU (pip install 'layertap[dali]', or "
                            "'layertap[dali-cuda13]' beside CUDA 13 builds of JAX or PyTorch); use --decoder "
                            "pillow to decode on the CPU")
    return decoder


def read_and_route(paths: list, stats, max_pixels: int):
    """Read ``paths`` and sort them for the ``nvjpeg`` decoder (DALI reads the files itself).

    The files are read in the calling thread, one after another: from the page cache that was faster
    than handing them to threads (bench/NOTES.md), since each read is mostly Python holding the GIL.

    Returns:
        ``(blobs, reasons, jpegs, host)``: the files' bytes (``None`` where unreadable or changed since the
        scan, with the reason), ``(position, (width, height, orientation))`` of the JPEGs a GPU decoder takes
        (:func:`pipeline.data.headers.gpu_jpeg`), and the positions Pillow decodes on the host (other formats,
        CMYK, cut-off JPEGs, over ``max_pixels``: Pillow gives the reason).
    """
    blobs, reasons, jpegs, host = [], [], [], []
    for i, (path, expected) in enumerate(zip(paths, stats or [None] * len(paths))):
        blob, reason = or_reason(read_file, path)
        if blob is not None and expected and not unchanged(path, expected):
            blob, reason = None, CHANGED
        blobs.append(blob)
        reasons.append(reason)
        if blob is None:
            continue
        jpeg = gpu_jpeg(blob)
        if takes(jpeg, max_pixels):
            jpegs.append((i, jpeg))
        else:
            host.append(i)
    return blobs, reasons, jpegs, host


def takes(jpeg: tuple | None, max_pixels: int) -> bool:
    """Whether a GPU decoder takes a file with these :func:`pipeline.data.headers.gpu_jpeg` facts."""
    return jpeg is not None and jpeg[0] * jpeg[1] <= max_pixels


def unchanged(path, expected) -> bool:
    """Whether ``path`` still has the ``(size, mtime_ns)`` the scan saw."""
    return (file_stat(path) or ())[:2] == tuple(expected)


def decode_on_host(pool, paths: list, size: int, resize: str, max_pixels: int):
    """``(array, reason)`` per path, by Pillow on ``pool``'s threads (at full resolution, as the GPU decoders)."""
    pillow = partial(or_reason, partial(decode_image, size=size, resize=resize, draft=False, max_pixels=max_pixels))
    return pool.map(pillow, paths)


# EXIF orientation -> (transpose H and W, flip rows, flip columns), applied in that order.
_ORIENTATIONS = {2: (False, False, True), 3: (False, True, True), 4: (False, True, False),
                 5: (True, False, False), 6: (True, False, True), 7: (True, True, True), 8: (True, True, False)}


class NvjpegDecoder:
    """Decode a list of image files into one ``(n, size, size, 3)`` uint8 tensor on ``device``.

    Args:
        size: Output side in pixels.
        resize: ``squash`` or ``crop`` (see :func:`pipeline.data.decoding.decode_image`).
        max_pixels: Larger images are skipped as decompression bombs.
        device: ``cuda`` (nvJPEG; the default, :data:`DEVICE`) or ``cpu`` (libjpeg-turbo; for tests).
        workers: Threads that run Pillow for the files nvJPEG does not take.
    """

    def __init__(self, size: int, resize: str = "squash", max_pixels: int | None = None, device: str | None = None,
                 workers: int = 4):
        import torch


        self.size, self.resize, self.device = size, resize, torch.device(device or DEVICE)
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layertap-read")
        # Its own stream, so decoding overlaps the forward pass that the backend runs on another.
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __call__(self, paths: list[os.PathLike], stats=None) -> tuple[object, list[str | None]]:
        """Decode ``paths``; returns the decoded images in order and, per path, ``None`` or why it was skipped.

        ``stats``: the ``(size, mtime_ns)`` each file must still have (else it is skipped as changed).

        The batch is complete on the device when this returns (its stream is synchronised), so any
        stream of any framework may read it.
        """
        import torch

        if self._stream is None:
            return self._decode(paths, stats)
        with torch.cuda.stream(self._stream):
            result = self._decode(paths, stats)
        self._stream.synchronize()
        return result

    def _decode(self, paths: list[os.PathLike], stats=None) -> tuple[object, list[str | None]]:
        import torch

        blobs, reasons, gpu, host = read_and_route(paths, stats, self.max_pixels)
        images: list = [None] * len(paths)
        if gpu:
            for (i, jpeg), image in zip(gpu, self._decode_jpegs([blobs[i] for i, _ in gpu])):
                if image is None:
                    host.append(i)
                else:
                    images[i] = self._finish(_orient(image, jpeg[2]))
        for i, (array, reason) in zip(host, decode_on_host(self._pool, [paths[i] for i in host], self.size,
                                                           self.resize, self.max_pixels)):
            reasons[i] = reason
            if array is not None:
                images[i] = torch.from_numpy(array.copy()).to(self.device, non_blocking=True)
        kept = [image for image in images if image is not None]
        batch = torch.stack(kept) if kept else torch.zeros((0, self.size, self.size, 3), dtype=torch.uint8,
                                                           device=self.device)
        return batch, reasons

    def _decode_jpegs(self, blobs: list[bytes]) -> list:
        """Batched decode; if the batch fails, one by one, with ``None`` where an image fails."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            decoded = []
            for tensor in tensors:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
            return decoded

    def _finish(self, image):
        """``(3, H, W)`` uint8 -> ``(size, size, 3)`` uint8, resized with antialiased bilinear."""
        import torch
        import torch.nn.functional as F

        if self.resize == "crop":
            height, width = image.shape[1:]
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            image = image[:, top:top + side, left:left + side]
        x = image.unsqueeze(0).float()
        if tuple(x.shape[2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x.squeeze(0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def _orient(image, orientation: int):
    """Apply an EXIF orientation to a ``(3, H, W)`` tensor (as ``ImageOps.exif_transpose`` does)."""
    if orientation not in _ORIENTATIONS:
        return image
    transpose, flip_rows, flip_cols = _ORIENTATIONS[orientation]
    if transpose:
        image = image.transpose(1, 2)
    dims = [d for d, flip in ((1, flip_rows), (2, flip_cols)) if flip]
    return image.flip(dims) if dims else image


def to_backend(batch, batch_size: int):
    """A device batch from :class:`NvjpegDecoder` (a torch tensor) or :class:`pipeline.data.dali_decode.DaliDecoder`
    (a JAX array or torch tensor), zero-padded to ``batch_size`` rows (one input shape, one compiled
    function), as an input the Keras backend takes without a host copy."""

    backend = import_keras().config.backend()
    if type(batch).__module__.startswith("jax"):
        import jax.numpy as jnp

        if len(batch) < batch_size:
            batch = jnp.concatenate([batch, jnp.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)])
        return batch
    import torch

    if len(batch) < batch_size:
        batch = torch.cat([batch, batch.new_zeros((batch_size - len(batch),) + tuple(batch.shape[1:]))])
    if backend == "torch":
        return batch
    if backend == "jax":
        import jax.dlpack

        return jax.dlpack.from_dlpack(batch.contiguous())
    return batch.cpu().numpy()
