"""Stage one: pooled activations of named layers of a frozen CNN, into a feature store.

The store is a cache. Its key covers everything that changes the numbers (the image
list with content fingerprints, labels and splits; backbone; weights sha256; image
size, resizing and preprocessing; pooling; precision; Keras backend and version) and
nothing that does not (batch size, workers, shard size). Taps are datasets inside the
store, so asking for another tap computes only that tap.

Work is done in shards, fixed slices of the image list: each is computed by
:func:`extract_slices`, a pure function of (image list slice, settings), and written
atomically; a killed run resumes from the shards already on disk, and a distributed
run can write shards on many workers and merge them with :func:`pipeline.store.merge_shards`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline import LayertapError, __version__
from pipeline.images import (DEFAULT_MAX_PIXELS, RESIZE_MODES, ImageList, ProcessDecoder, default_workers,
                             find_images, ordered_map, scan_images)
from pipeline.pooling import flatten_warning, parse_pooling
from pipeline.store import COMPRESSIONS, STORE_DTYPES, FeatureStore, Rows, merge_shards, store_lock, write_shard

log = logging.getLogger(__name__)
SAMPLE = "sample"


@dataclass(frozen=True)
class ExtractSettings:
    """Everything stage one needs; validated when built.

    Args:
        data: Image folder or CSV (see :func:`pipeline.images.find_images`), or ``sample``
            for the embedded sample set.
        split_file: CSV of ``path,label,split`` for the images of the ``data`` folder.
        root: Folder a CSV's paths are relative to (default: the CSV's folder).
        backbone: ``vgg16`` or ``resnet50``.
        layers: Layer names to tap; empty means the backbone's recommended taps.
        pooling: ``avg``, ``max``, ``avgmax``, ``gridN`` or ``flatten``.
        weights: ``imagenet``, ``hed-bsds500``, ``random`` or a weights file.
        seed: Seed for ``random`` weights.
        image_size: Images are resized to ``image_size`` x ``image_size``.
        resize: ``squash`` (whole image, aspect not kept) or ``crop`` (centre crop).
        draft: Decode JPEGs at reduced DCT scale when that still covers ``image_size`` (Pillow only).
        decoder: ``pillow`` (worker processes on the CPU cores) or ``nvjpeg`` (JPEGs decoded and
            resized on the GPU; needs torchvision with CUDA, see :mod:`pipeline.gpu_decode`). Part
            of the cache key: the two decoders' pixels differ slightly.
        precision: ``float32``, ``bfloat16``/``float16`` mixed precision, or ``auto``: bfloat16 on
            GPUs and on CPUs with bfloat16 units (AMX, AVX512-BF16), else float32. The resolved
            value is part of the cache key.
        store_dtype: ``float32`` or ``float16`` for the stored features.
        compression: ``none``, ``gzip`` or ``lzf`` for the stored features.
        out_dir: Folder of the stores.
        batch_size: Images per forward pass (not part of the cache key).
        workers: Decoding worker processes; 0 means one per core.
        shard_size: Images per committed shard (not part of the cache key).
        max_pixels: Larger images are skipped as decompression bombs.
        progress: Show progress bars.
    """

    data: str = SAMPLE
    split_file: str | None = None
    root: str | None = None
    backbone: str = "vgg16"
    layers: tuple[str, ...] = ()
    pooling: str = "avg"
    weights: str = "imagenet"
    seed: int = 0
    image_size: int = 224
    resize: str = "squash"
    draft: bool = True
    decoder: str = "pillow"
    precision: str = "auto"
    store_dtype: str = "float32"
    compression: str = "none"
    out_dir: str = "features"
    batch_size: int = 32
    workers: int = 0
    shard_size: int = 512
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True

    def __post_init__(self):
        from pipeline.backbones import get_backbone, resolve_precision
        from pipeline.gpu_decode import check_decoder

        backbone = get_backbone(self.backbone)
        object.__setattr__(self, "backbone", backbone.name)
        object.__setattr__(self, "pooling", parse_pooling(self.pooling))
        layers = tuple(self.layers) if not isinstance(self.layers, str) else split_names(self.layers)
        object.__setattr__(self, "layers", tuple(dict.fromkeys(layers)) or backbone.taps)
        _check_choice("resize", self.resize, RESIZE_MODES)
        object.__setattr__(self, "precision", resolve_precision(self.precision))
        check_decoder(self.decoder)
        _check_choice("store_dtype", self.store_dtype, STORE_DTYPES)
        _check_choice("compression", self.compression, COMPRESSIONS)
        for name, low in (("image_size", 32), ("batch_size", 1), ("shard_size", 1), ("workers", 0),
                          ("max_pixels", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is not valid; it must be an integer >= {low}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_names(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not known; use one of: {', '.join(choices)}")


@dataclass
class ExtractResult:
    """What an extraction did, for the summary table and for tests."""

    store_path: Path
    n_images: int
    skipped: list[tuple[str, str]]
    dims: dict[str, int]
    computed_taps: tuple[str, ...]
    n_decoded: int
    seconds: float
    extract_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cache_hit(self) -> bool:
        return not self.computed_taps

    @property
    def images_per_s(self) -> float | None:
        return self.n_decoded / self.extract_seconds if self.extract_seconds > 0 else None


def load_images(settings: ExtractSettings) -> ImageList:
    """Find and scan the images the settings name (building the sample set if asked)."""
    data = settings.data
    if data == SAMPLE:
        from pipeline.sample import ensure_sample
        data = str(ensure_sample())
    found = find_images(data, settings.split_file, settings.root)
    return scan_images(found, settings.max_pixels, settings.workers or default_workers(), settings.progress)


def keras_info() -> dict[str, str]:
    import keras
    return {"keras_backend": keras.config.backend(), "keras_version": keras.__version__}


def cache_key(images: ImageList, settings: ExtractSettings, weights) -> tuple[str, dict]:
    """The store's key and the material it hashes (which goes into the manifest)."""
    from pipeline.backbones import get_backbone

    listing = hashlib.sha256()
    for record in images.records:
        listing.update(f"{record.path}\t{record.label}\t{record.split}\t{record.fingerprint}\n".encode())
    material = {
        "images_sha256": listing.hexdigest(), "n_images_listed": len(images),
        "class_names": list(images.class_names),
        "backbone": settings.backbone, "weights": weights.id, "weights_sha256": weights.sha256,
        "image_size": settings.image_size, "resize": settings.resize, "interpolation": "bilinear",
        "draft": settings.draft and settings.decoder == "pillow", "decoder": settings.decoder,
        "preprocessing": get_backbone(settings.backbone).preprocessing,
        "pooling": settings.pooling, "precision": settings.precision, "store_dtype": settings.store_dtype,
        **keras_info(),
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return key, material


def store_path_for(images: ImageList, settings: ExtractSettings, weights, key: str) -> Path:
    name = f"{images.name}-{settings.backbone}-{weights.id}-{settings.image_size}px-{settings.pooling}-{key[:12]}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path(settings.out_dir) / f"{safe}.h5"


def versions() -> dict[str, str]:
    found = {"layertap": __version__, "python": platform.python_version()}
    for package in ("keras", "tensorflow", "jax", "torch", "numpy", "h5py", "pillow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def extract_features(settings: ExtractSettings) -> ExtractResult:
    """Extract the settings' taps into their feature store, reusing whatever is cached.

    Returns:
        What was done; ``n_decoded`` is 0 on a full cache hit.

    Raises:
        LayertapError: unusable data or weights, or a store another process is writing.
        ValueError: a layer the backbone does not have (the message lists valid names).
    """
    from pipeline.backbones import get_backbone, resolve_weights

    started = time.perf_counter()
    images = load_images(settings)
    scanned = time.perf_counter()
    backbone = get_backbone(settings.backbone)
    weights = resolve_weights(backbone, settings.weights, settings.seed)
    key, material = cache_key(images, settings, weights)
    store_path = store_path_for(images, settings, weights, key)
    with store_lock(store_path):
        # Holding the lock, any temporary file of this store is an orphan of a killed writer.
        for orphan in store_path.parent.glob(f".{store_path.name}.tmp-*"):
            orphan.unlink()
        existing = _open_existing(store_path, key)
        missing = tuple(t for t in settings.layers if existing is None or t not in existing.taps)
        timings = {"scan": scanned - started}
        if not missing:
            return ExtractResult(store_path, len(existing), existing.skipped, dict(existing.dims), (), 0,
                                 time.perf_counter() - started, timings=timings)
        manifest = _manifest(key, material, images, settings, weights, existing)
        store, n_decoded, timings = _compute_taps(images, settings, weights, missing, store_path, manifest,
                                                  existing, timings)
    return ExtractResult(store_path, len(store), store.skipped, dict(store.dims), missing, n_decoded,
                         time.perf_counter() - started, timings["extract"], timings)


def _open_existing(store_path: Path, key: str) -> FeatureStore | None:
    if not store_path.exists():
        return None
    try:
        store = FeatureStore(store_path)
    except LayertapError as exc:
        log.warning("%s; it will be replaced", exc)
        return None
    return store if store.key == key else None


def _manifest(key: str, material: dict, images: ImageList, settings: ExtractSettings, weights,
              existing: FeatureStore | None) -> dict:
    return {
        "key": key, **material,
        "weights_kind": weights.kind, "weights_path": str(weights.path) if weights.path else None,
        "seed": weights.seed,
        "data": {"name": images.name, "root": str(Path(images.root).resolve()),
                 "split_file": settings.split_file},
        "settings": settings.to_dict(), "versions": versions(),
        "taps": dict(existing.manifest.get("taps", {})) if existing else {},
    }


def _compute_taps(images: ImageList, settings: ExtractSettings, weights, taps: tuple[str, ...],
                  store_path: Path, manifest: dict, existing: FeatureStore | None, timings: dict):
    from pipeline.backbones import build_backbone, build_extractor, get_backbone, tap_shapes

    backbone = get_backbone(settings.backbone)
    t0 = time.perf_counter()
    base = build_backbone(backbone, weights, settings.image_size, settings.precision)
    extractor = build_extractor(base, backbone, taps, settings.pooling)
    shapes = tap_shapes(base, taps)
    for tap in taps:
        warning = flatten_warning(tap, shapes[tap], settings.pooling)
        if warning:
            log.warning(warning)
    timings["build_model"] = time.perf_counter() - t0
    parts = store_path.with_name(store_path.stem + ".parts") / "-".join(sorted(taps))
    slices = [(start, min(start + settings.shard_size, len(images)))
              for start in range(0, len(images), settings.shard_size)]
    shard_paths = [parts / f"shard-{start:09d}-{stop:09d}.h5" for start, stop in slices]
    todo = [(s, p) for s, p in zip(slices, shard_paths) if not _is_committed(p, manifest["key"], taps)]
    if len(todo) < len(slices):
        log.info("resuming %s: %d of %d shards already committed", store_path.name,
                 len(slices) - len(todo), len(slices))
    t0 = time.perf_counter()
    n_decoded = extract_slices(images, todo, settings, extractor, shapes, manifest,
                               done=sum(b - a for (a, b) in slices) - sum(b - a for (a, b), _ in todo))
    timings["extract"] = time.perf_counter() - t0
    for tap in taps:
        manifest["taps"][tap] = {"map_shape": list(shapes[tap]), "seconds": timings["extract"],
                                 "computed_with": list(taps), "images": n_decoded}
    t0 = time.perf_counter()
    manifest["timings"] = timings
    store = merge_shards(shard_paths, store_path, manifest=manifest, base=existing, skipped=[
        (s.path, s.reason) for s in images.skipped], dtype=settings.store_dtype,
        compression=settings.compression)
    timings["merge"] = time.perf_counter() - t0
    shutil.rmtree(parts, ignore_errors=True)
    if parts.parent.exists() and not any(parts.parent.iterdir()):
        parts.parent.rmdir()
    return store, n_decoded, timings


def _is_committed(path: Path, key: str, taps) -> bool:
    if not path.exists():
        return False
    try:
        shard = FeatureStore(path, kind="shard")
    except LayertapError:
        return False
    return shard.key == key and set(shard.taps) == set(taps)


def extract_slices(images: ImageList, todo: list[tuple[tuple[int, int], Path]], settings: ExtractSettings,
                   extractor, shapes: dict, manifest: dict, done: int = 0) -> int:
    """Compute and commit shards: each ``((start, stop), path)`` covers ``images.records[start:stop]``.

    One decoding stream runs across all the slices, ahead of the forward passes.
    A pure function of the slices and the settings: the same inputs give the same shard files,
    whichever machine computes them.

    Returns:
        The number of images decoded.
    """
    records = images.records
    chunks = [(a, min(a + settings.batch_size, stop)) for (start, stop), _ in todo
              for a in range(start, stop, settings.batch_size)]
    class_index = {name: i for i, name in enumerate(images.class_names)}
    bar = _bar(total=done + sum(b - a for a, b in chunks), initial=done, enabled=settings.progress)
    batches = decoded_batches([Path(images.root) / r.path for r in records], chunks, settings)
    pad_to = settings.batch_size if _pads_short_batches() else None
    n_decoded = 0
    try:
        for (start, stop), shard_path in todo:
            rows, skipped, outputs = Rows(), [], {tap: [] for tap in shapes}
            position = start
            while position < stop:
                (a, b), pixels, reasons = next(batches)
                for record, reason in zip(records[a:b], reasons):
                    if reason is None:
                        rows.extend(Rows([record.path], [class_index[record.label]], [record.split],
                                         [record.fingerprint]))
                    else:
                        skipped.append((record.path, reason))
                if len(pixels):
                    _forward(extractor, pixels, pad_to, outputs)
                n_decoded += b - a
                bar.update(b - a)
                position = b
            features = {tap: (np.concatenate(v) if v else np.zeros((0, _dims(extractor, tap)), np.float32))
                        for tap, v in outputs.items()}
            shard_manifest = {**manifest, "shard": [start, stop], "shard_taps": list(shapes)}
            write_shard(shard_path, rows=rows, features=features, class_names=images.class_names,
                        skipped=skipped, manifest=shard_manifest, map_shapes=shapes, dtype=settings.store_dtype)
    finally:
        batches.close()
        bar.close()
    return n_decoded


def decoded_batches(paths: list[Path], chunks: list[tuple[int, int]], settings: ExtractSettings):
    """Decode ``paths[a:b]`` for each chunk ``(a, b)``, in order, ahead of the consumer.

    Yields:
        ``((a, b), pixels, reasons)``: the decoded images of the chunk as one ``(n, size, size, 3)``
        uint8 batch (NumPy, or a device tensor for ``nvjpeg``) and, per path, ``None`` or why it
        was skipped.
    """
    workers = settings.workers or default_workers()
    if settings.decoder == "nvjpeg":
        from pipeline.gpu_decode import NvjpegDecoder

        decoder = NvjpegDecoder(settings.image_size, settings.resize, settings.max_pixels, workers=workers)
        try:
            # One thread decodes the next batch on the GPU while this one runs the forward pass.
            for chunk, (pixels, reasons) in zip(chunks, ordered_map(lambda c: decoder(paths[c[0]:c[1]]),
                                                                     chunks, workers=1, prefetch=2)):
                yield chunk, pixels, reasons
        finally:
            decoder.close()
        return
    decoder = ProcessDecoder(settings.image_size, settings.batch_size, workers, resize=settings.resize,
                             draft=settings.draft, max_pixels=settings.max_pixels)
    try:
        yield from decoder.batches(paths, chunks)
    finally:
        decoder.close()


def _pads_short_batches() -> bool:
    """Whether a short batch (the last one, or one with skipped images) is padded to the full batch size.

    Yes where a new input shape means a compile that costs more than the padding images' compute: JAX
    and torch (XLA, inductor) and any GPU. TensorFlow on a CPU retraces once, in about 0.5 s for VGG16,
    and then takes any batch size, while 18 padding images cost about 4 s of float32 forward on two
    cores (bench/NOTES.md).
    """
    import keras

    from pipeline.backbones import on_gpu

    return keras.backend.backend() != "tensorflow" or on_gpu()


def _forward(extractor, pixels, pad_to: int | None, outputs: dict) -> None:
    """One forward pass; a short batch is padded to ``pad_to`` images so the model keeps one input shape."""
    n = len(pixels)
    if isinstance(pixels, np.ndarray):
        x = pixels
        if pad_to and n < pad_to:
            x = np.concatenate([x, np.zeros((pad_to - n,) + x.shape[1:], x.dtype)])
    else:
        from pipeline.gpu_decode import to_backend
        x = to_backend(pixels, pad_to or len(pixels))
    result = extractor.predict_on_batch(x)
    for tap in outputs:
        outputs[tap].append(np.asarray(result[tap], dtype=np.float32)[:n])


def _dims(extractor, tap: str) -> int:
    return int(extractor.output[tap].shape[-1])


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="extract", unit="img", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)
