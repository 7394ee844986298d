"""Decoding images to fixed-size uint8 RGB arrays: one image, threads ahead of a consumer, or worker processes.

Every stage decodes through :func:`decode_image` with the settings a store records
(:meth:`pipeline.store.manifest.StoreManifest.decoder`), so stage three and prediction see the pixels
stage one saw.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.core.errors import LayertapError
from pipeline.core.parallel import default_workers, follow_owner, kill_pool, ordered_map, progress_bar, worker_context
from pipeline.data.headers import bomb_reason, not_an_image, sniff_format
from pipeline.data.images import (
    DEFAULT_MAX_PIXELS,
    BadImageError,
    fingerprint,
    open_regular,
    or_reason,
    read_file,
)

log = logging.getLogger(__name__)
# Decoded uint8 images held in memory at once (fine-tuning); past this, ask for a smaller size or fewer images.
MAX_IMAGE_BYTES = 8 << 30
# Batches the decoding workers fill ahead of the forward passes (bench/NOTES.md: six kept the model busy).
SLOTS = 6
# Shared-memory segments of the decoding workers: /dev/shm/layertap-<pid of the process that made it>-<random>.
SEGMENT_PREFIX = "layertap-"


def decode_image(path: str | os.PathLike, size: int, resize: str = "squash", draft: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, budget=None, expected: tuple[int, int] | None = None
                 ) -> np.ndarray:
    """Decode one image to a ``(size, size, 3)`` uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, alpha, CMYK and 16-bit images are
    converted to 8-bit RGB (transparent areas become white). JPEGs decode at the smallest
    DCT scale that still covers ``size`` when ``draft`` is set.

    Args:
        budget: ``budget(pixels)`` gives a context manager held while the pixels are decoded and
            converted (the pixels Pillow will hold, after the draft scale): a limit on huge decodes
            at once (:class:`ProcessDecoder`).
        expected: The ``(size, mtime_ns)`` the scan saw when it hashed the file: the file decoded
            must still have them, so one changed since the scan is never stored under the old
            content's hash (a check of the open file's stat, not a second hash: microseconds).

    Raises:
        BadImageError: the image cannot be decoded; the message says why.
    """
    try:
        with _opened(path, expected) as source, _open_image(source) as im:
            if im.width * im.height > max_pixels:
                raise BadImageError(bomb_reason(im.width, im.height, max_pixels))
            if draft and im.format == "JPEG":
                im.draft(None, (size, size))
            with budget(im.width * im.height) if budget else nullcontext():
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
        raise BadImageError(f"decompression bomb: over Pillow's own limit ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - a bad image is reported, never fatal
        raise BadImageError(f"cannot decode: {type(exc).__name__}: {exc}") from exc


def _open_image(source):
    """Pillow's image of the open file ``source``; one Pillow cannot identify says what its first bytes are, not
    "cannot identify image file <_io.BufferedReader name=3>"."""
    try:
        return Image.open(source)
    except Image.UnidentifiedImageError:
        source.seek(0)
        head = source.read(16)
        reason = ("empty file" if not head else not_an_image(head) or
                  f"cannot decode: a {sniff_format(head)} file whose header Pillow cannot read (damaged or truncated)")
        raise BadImageError(reason) from None


@contextmanager
def _opened(path, expected: tuple[int, int] | None):
    """The open file (a regular file only: :func:`pipeline.data.images.open_regular`), its stat checked against
    ``expected`` where given; bytes already read (a file object) as they are."""
    if hasattr(path, "read"):
        yield path
        return
    fh, st = open_regular(path)
    with fh:
        if expected is not None and (st.st_size, st.st_mtime_ns) != tuple(expected):
            raise BadImageError(CHANGED)
        yield fh


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


CHANGED = ("changed since the scan (new size or modification time: the store's key holds the old content's "
           "hash); run the same command again to extract it")
WORKER_DIED = "the decoding process died on it (killed; probably out of memory)"


class ProcessDecoder:
    """Decode images in worker processes straight into shared-memory batches, surviving dead workers.

    Pillow holds Python's GIL for part of every image (header parsing, EXIF, mode conversion), so
    decoding threads stop scaling at a few cores, where processes go on (bench/NOTES.md). Each batch
    is decoded into one of ``depth`` slots of a shared buffer, so no pixels are pickled.

    A worker that dies (the kernel's OOM killer on a huge image, a crash in a codec) breaks the
    pool and every task in flight: the pool is replaced and the batch decoded again with nothing else
    in flight; if that dies too, each of its images is decoded alone, and an image that kills its
    worker alone is skipped with :data:`WORKER_DIED` as the reason. The other batches are decoded
    afterwards, so an image is never blamed for a neighbour's crash. The run never waits on a dead
    process.

    Args:
        size: Output side in pixels.
        batch_size: Images per batch (rows of a slot).
        workers: Worker processes.
        depth: Batches in flight, decoding ahead of the consumer (six: bench/NOTES.md).
        **decode_kwargs: Passed to :func:`decode_image` (``resize``, ``draft``, ``max_pixels``).
    """

    def __init__(self, size: int, batch_size: int, workers: int, depth: int = SLOTS, **decode_kwargs):
        from multiprocessing import shared_memory

        self.shape = (depth, batch_size, size, size, 3)
        # Named after this process, so that whoever looks at /dev/shm (a test, an operator) can tell whose it is.
        self._shm = shared_memory.SharedMemory(create=True, size=int(np.prod(self.shape)),
                                               name=f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
        self._slots = np.ndarray(self.shape, np.uint8, self._shm.buf)
        self.workers = workers
        self._initargs = (self._shm.name, self.shape, {"size": size, **decode_kwargs}, os.getpid())
        self._huge_slots = huge_decode_slots(decode_kwargs.get("max_pixels", DEFAULT_MAX_PIXELS), workers)
        self._pool = self._start()

    def _start(self):
        from concurrent.futures import ProcessPoolExecutor

        context = worker_context()
        # A fresh semaphore with every pool: a worker killed while holding it must not take a slot with it.
        huge = context.BoundedSemaphore(self._huge_slots)
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_attach_slots,
                                   initargs=(*self._initargs, huge))

    def _restart(self) -> None:
        self._stop()
        self._pool = self._start()

    def batches(self, paths: list[Path], chunks: list[tuple[int, int]], stats=None):
        """Yield ``((a, b), pixels, reasons)`` for each chunk of ``paths``, in order.

        ``pixels`` is a view of a shared slot: valid until the generator is resumed. ``stats`` (by the
        same positions as ``paths``) are the ``(size, mtime_ns)`` each file must still have
        (:func:`decode_image`'s ``expected``).
        """
        depth = self.shape[0]
        pending: dict[int, list] = {}

        def rows(j: int) -> list[tuple[int, int, str, tuple | None]]:
            a, b = chunks[j]
            return [(j % depth, i - a, str(paths[i]), stats[i] if stats else None) for i in range(a, b)]

        def submit(j: int) -> None:
            tasks = rows(j)
            piece = max(1, -(-len(tasks) // (2 * self.workers)))  # two tasks a worker
            pending[j] = [self._pool.submit(_decode_rows, tasks[k:k + piece]) for k in range(0, len(tasks), piece)]

        for j in range(min(depth, len(chunks))):
            submit(j)
        for j, (a, b) in enumerate(chunks):
            reasons = self._collect(j, pending, submit, rows)
            slot = self._slots[j % depth, :b - a]
            ok = [row for row, reason in enumerate(reasons) if reason is None]
            yield (a, b), (slot if len(ok) == b - a else slot[ok]), reasons
            if j + depth < len(chunks):
                submit(j + depth)

    def _collect(self, j: int, pending: dict, submit, rows) -> list[str | None]:
        """Chunk ``j``'s skip reasons. A broken pool is restarted and the chunk decoded again with nothing else in
        flight, then, if it breaks the pool alone, image by image: only a task that runs alone can be blamed."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            return [reason for future in pending.pop(j) for reason in future.result()]
        except BrokenProcessPool:
            log.warning("a decoding process died; decoding the batch again")
        self._restart()  # every task in flight died with the pool, other chunks' too
        try:
            submit(j)
            reasons = [reason for future in pending.pop(j) for reason in future.result()]
        except BrokenProcessPool:
            log.warning("a decoding process died on this batch; decoding its images one by one to find the one")
            pending.pop(j, None)
            self._restart()
            reasons = []
            for task in rows(j):
                try:
                    reasons += self._pool.submit(_decode_rows, [task]).result()
                except BrokenProcessPool:
                    log.warning("skipped %s: %s", task[2], WORKER_DIED)
                    reasons.append(WORKER_DIED)
                    self._restart()
        for k in sorted(pending):
            submit(k)
        return reasons

    def _stop(self) -> None:
        kill_pool(self._pool)

    def close(self) -> None:
        self._stop()
        self._slots = None
        self._shm.close()
        self._shm.unlink()


_SLOTS: dict = {}


# Images that decode to more pixels than this (after JPEG's draft scale) do so under a budget
# (:func:`huge_decode_slots`); below it, any number at once.
HUGE_PIXELS = 16_000_000
# Peak bytes per pixel while Pillow decodes and converts an image (RGBA plus a converted copy).
DECODE_BYTES_PER_PIXEL = 8


def huge_decode_slots(max_pixels: int, workers: int) -> int:
    """How many images over :data:`HUGE_PIXELS` may decode at once: what half the available memory holds at
    the largest allowed size, at least one and at most ``workers``.

    An 81-megapixel PNG takes about 680 MB while it decodes; sixteen of them at once would be 11 GB.
    """
    available = available_memory()
    if available is None:
        return workers
    return max(1, min(workers, int(available // 2 // (max_pixels * DECODE_BYTES_PER_PIXEL))))


def check_slots_fit(size: int, batch_size: int) -> None:
    """Refuse, before anything runs, a ``size`` and ``batch_size`` whose decoding slots (:class:`ProcessDecoder`:
    :data:`SLOTS` batches of ``size`` x ``size`` x 3 bytes in shared memory) need more memory than is available.

    Raises:
        ValueError: naming both settings, the memory needed and the memory available.
    """
    needed, available = SLOTS * batch_size * size * size * 3, available_memory()
    if available is not None and needed > available:
        raise ValueError(f"image_size={size} with batch_size={batch_size} needs {needed / 2**30:,.1f} GiB of "
                         f"shared memory to decode {SLOTS} batches ahead, and {available / 2**30:,.1f} GiB is "
                         "available; use a smaller --size or --batch-size")


def available_memory() -> int | None:
    """The kernel's MemAvailable in bytes, or None where there is no /proc/meminfo."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _attach_slots(name: str, shape: tuple, decode_kwargs: dict, owner: int, huge) -> None:
    import signal
    from multiprocessing import shared_memory

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the extraction handles it

    # The creating process's resource tracker unlinks the segment if that process dies without closing
    # the decoder (tests/test_extract.py kills an extraction and checks).
    shm = shared_memory.SharedMemory(name=name)
    # Below the process that runs the forward passes, which must not wait for a time slice when
    # every core decodes (a precaution: not measured apart, see bench/NOTES.md).
    os.nice(5)
    _SLOTS.update(shm=shm, slots=np.ndarray(shape, np.uint8, shm.buf), kwargs=decode_kwargs, huge=huge)
    follow_owner(owner)  # a killed extraction must not leave its decoding processes behind


def _decode_rows(tasks: list[tuple[int, int, str, tuple | None]]) -> list[str | None]:
    """In a worker: decode each ``(slot, row, path, expected stat)`` into the shared slots; ``None`` or the skip
    reason."""
    reasons = []
    for slot, row, path, expected in tasks:
        array, reason = or_reason(partial(decode_image, **_SLOTS["kwargs"], budget=_huge_budget, expected=expected),
                                  path)
        if reason is None:
            _SLOTS["slots"][slot, row] = array
        reasons.append(reason)
    return reasons


def _huge_budget(pixels: int):
    """In a worker: the shared semaphore for a decode over :data:`HUGE_PIXELS`, so that huge decodes at once
    fit in memory together; nothing for the others."""
    return _SLOTS["huge"] if pixels > HUGE_PIXELS else nullcontext()


def decode_store_rows(store, rows: np.ndarray, data_root: Path, workers: int = 0,
                      progress: bool = False) -> np.ndarray:
    """Decode the images of the given rows of a :class:`pipeline.store.feature_store.FeatureStore` exactly as stage one
    did,
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
