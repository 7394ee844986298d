"""Decoding images to fixed-size uint8 RGB arrays: one image, threads ahead of a consumer, or worker processes.

Every stage decodes through :func:`decode_image` with the settings a store records
(:meth:`pipeline.manifest.StoreManifest.decoder`), so stage three and prediction see the pixels
stage one saw.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline import LayertapError
from pipeline.images import DEFAULT_MAX_PIXELS, BadImageError, default_workers, fingerprint, or_reason, ordered_map, \
    progress_bar, read_file

# Decoded uint8 images held in memory at once (fine-tuning); past this, ask for a smaller size or fewer images.
MAX_IMAGE_BYTES = 8 << 30


def decode_image(path: str | os.PathLike, size: int, resize: str = "squash", draft: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image to a ``(size, size, 3)`` uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, alpha, CMYK and 16-bit images are
    converted to 8-bit RGB (transparent areas become white). JPEGs decode at the smallest
    DCT scale that still covers ``size`` when ``draft`` is set.

    Raises:
        BadImageError: the image cannot be decoded; the message says why.
    """
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise BadImageError(f"decompression bomb: {im.width}x{im.height} pixels")
            if draft and im.format == "JPEG":
                im.draft(None, (size, size))
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            if resize == "crop":
                im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR)
            else:
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"decompression bomb: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a bad image is reported, never fatal
        raise BadImageError(f"cannot decode: {type(exc).__name__}: {exc}") from exc


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit and float images: scale to 8 bits (a plain convert("L") would clip at 255).
        a = np.asarray(im, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        scale = 255.0 / 65535.0 if (im.mode.startswith("I;16") or top > 255.0) else 1.0
        if im.mode == "F" and top <= 1.0:
            scale = 255.0
        im = Image.fromarray(np.clip(a * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def iter_decoded(paths: Iterable[Path], decode: Callable[[Path], np.ndarray], workers: int,
                 prefetch: int) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Decode images in worker threads, ahead of the consumer, in input order.

    Yields:
        ``(index, array, None)`` for a decoded image, ``(index, None, reason)`` for a bad one.
    """
    for index, (array, reason) in enumerate(ordered_map(partial(or_reason, decode), paths, workers, prefetch)):
        yield index, array, reason


class ProcessDecoder:
    """Decode images in worker processes straight into shared-memory batches.

    Pillow holds Python's GIL for part of every image (header parsing, EXIF, mode conversion), so
    decoding threads stop scaling at a few cores: measured on a 16-core host, 16 threads decoded
    about 600 images/s where 16 processes decode several thousand (bench/NOTES.md). Each batch
    is decoded into one of ``depth`` slots of a shared buffer, so no pixels are pickled.

    Args:
        size: Output side in pixels.
        batch_size: Images per batch (rows of a slot).
        workers: Worker processes.
        depth: Batches in flight, decoding ahead of the consumer (six: bench/NOTES.md).
        **decode_kwargs: Passed to :func:`decode_image` (``resize``, ``draft``, ``max_pixels``).
    """

    def __init__(self, size: int, batch_size: int, workers: int, depth: int = 6, **decode_kwargs):
        import multiprocessing
        from multiprocessing import shared_memory

        self.shape = (depth, batch_size, size, size, 3)
        self._shm = shared_memory.SharedMemory(create=True, size=int(np.prod(self.shape)))
        self._slots = np.ndarray(self.shape, np.uint8, self._shm.buf)
        self.workers = workers
        # forkserver: never fork a process that runs a framework's threads.
        context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
        self._pool = context.Pool(workers, initializer=_attach_slots,
                                  initargs=(self._shm.name, self.shape, {"size": size, **decode_kwargs}))

    def batches(self, paths: list[Path], chunks: list[tuple[int, int]]):
        """Yield ``((a, b), pixels, reasons)`` for each chunk of ``paths``, in order.

        ``pixels`` is a view of a shared slot: valid until the generator is resumed.
        """
        depth = self.shape[0]
        pending = deque()

        def submit(j: int) -> None:
            a, b = chunks[j]
            rows = [(j % depth, i - a, str(paths[i])) for i in range(a, b)]
            piece = max(1, -(-len(rows) // (2 * self.workers)))  # two tasks a worker
            pending.append(self._pool.map_async(_decode_rows, [rows[k:k + piece] for k in range(0, len(rows), piece)]))

        for j in range(min(depth, len(chunks))):
            submit(j)
        for j, (a, b) in enumerate(chunks):
            reasons = [reason for part in pending.popleft().get() for reason in part]
            slot = self._slots[j % depth, :b - a]
            ok = [row for row, reason in enumerate(reasons) if reason is None]
            yield (a, b), (slot if len(ok) == b - a else slot[ok]), reasons
            if j + depth < len(chunks):
                submit(j + depth)

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()
        self._slots = None
        self._shm.close()
        self._shm.unlink()


_SLOTS: dict = {}


def _attach_slots(name: str, shape: tuple, decode_kwargs: dict) -> None:
    from multiprocessing import shared_memory

    # Workers share the creating process's resource tracker, which unlinks the segment if that
    # process dies without closing the decoder; the workers themselves end when their task pipe
    # closes (tests/test_extract.py kills an extraction and checks both).
    shm = shared_memory.SharedMemory(name=name)
    # Below the process that runs the forward passes, which must not wait for a time slice when
    # every core decodes (a precaution: not measured apart, see bench/NOTES.md).
    os.nice(5)
    _SLOTS.update(shm=shm, slots=np.ndarray(shape, np.uint8, shm.buf), kwargs=decode_kwargs)


def _decode_rows(tasks: list[tuple[int, int, str]]) -> list[str | None]:
    """In a worker: decode each ``(slot, row, path)`` into the shared slots; ``None`` or the skip reason."""
    reasons = []
    for slot, row, path in tasks:
        array, reason = or_reason(partial(decode_image, **_SLOTS["kwargs"]), path)
        if reason is None:
            _SLOTS["slots"][slot, row] = array
        reasons.append(reason)
    return reasons


def decode_store_rows(store, rows: np.ndarray, data_root: Path, workers: int = 0,
                      progress: bool = False) -> np.ndarray:
    """Decode the images of the given rows of a :class:`pipeline.store.FeatureStore` exactly as stage one did,
    as one uint8 array (what fine-tuning trains on).

    Each file must still have the content the store fingerprinted.

    Raises:
        LayertapError: an image is missing, changed since extraction or no longer decodes.
    """
    size = store.manifest.image_size
    if len(rows) * size * size * 3 > MAX_IMAGE_BYTES:
        raise LayertapError(f"{len(rows):,} images at {size} px need {len(rows) * size * size * 3 / 2**30:.1f} GiB "
                            f"in memory; fine-tune at a smaller --size or on fewer images")
    fingerprints = store.rows.fingerprints
    decode = store.manifest.decoder()

    def checked(row: int) -> np.ndarray:
        data = read_file(data_root / store.rows.paths[row])
        if fingerprint(data) != fingerprints[row]:
            raise BadImageError("the file changed since the store was extracted")
        return decode(io.BytesIO(data))

    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    bad = []
    decoded = iter_decoded(rows, checked, workers or default_workers(), 64)
    for i, array, reason in progress_bar(decoded, len(rows), "decode", progress):
        if array is None:
            bad.append(f"{store.rows.paths[rows[i]]} ({reason})")
        else:
            images[i] = array
    if bad:
        raise LayertapError(f"{len(bad)} images of {store.path.name} under {data_root} cannot be used for "
                            f"fine-tuning, first: {bad[0]}. Both stages must see the same images: extract "
                            "again (a new store) or restore the files")
    return images
