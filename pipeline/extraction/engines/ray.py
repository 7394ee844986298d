"""The Ray engine: stage one's shards on a Ray cluster (``layertap extract --engine ray``).

Ray Data's batch-inference pattern over :mod:`pipeline.extraction.shards`: a dataset of shard jobs;
``map_batches`` of :func:`decode_shard` decodes each shard in a Ray task on a CPU worker;
``map_batches`` of :class:`ShardWriter` runs the model in an actor pool (one model build per
actor, one GPU each where the cluster has GPUs, else one CPU actor) and commits the shard with
:func:`pipeline.extraction.shards.run_shard` into the store's ``.parts/`` folder. With a GPU decoder
(``--decoder dali`` or ``nvjpeg``) there are no decoding tasks: each actor decodes its shards on its
own GPU, as the local engine does, and no pixels pass through Ray's object store. This process only
plans, shows progress and merges, so the store, its key and its numbers are the local engine's.

Every worker must reach the images, the weights file and the ``--out`` folder at the same
absolute paths (a shared filesystem), and run the same layertap. Ray retries a decoding task
whose worker dies, and restarts an actor that dies (rerunning its constructor) and gives it the
shard again; shards are written atomically, so nothing half-written is ever merged. A driver
killed mid-run leaves the committed shards, which the next run (either engine) resumes from.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass
from functools import partial

import numpy as np

from pipeline.backbones.batchnorm import folded
from pipeline.backbones.build import architecture_shapes, create_extractor
from pipeline.backbones.registry import get_backbone
from pipeline.backbones.weights import resolve_weights
from pipeline.core.errors import LayertapError
from pipeline.core.runtime import keras_backend, set_backend_defaults
from pipeline.core.settings import option
from pipeline.data import gpu_decode
from pipeline.data.decoding import available_memory, decode_image
from pipeline.data.images import or_reason
from pipeline.data.scan import probe_file
from pipeline.extraction.engines.base import Engine
from pipeline.extraction.shards import (
    ShardJob,
    decoded_batches,
    decoding_inputs,
    extraction_bar,
    open_decoder,
    pads_short_batches,
    run_shard,
)

log = logging.getLogger(__name__)
INSTALL = "pip install 'layertap[ray]'"
# A local Ray's object store: decoded shards (shard_size x size^2 x 3 bytes each, 77 MB at 512 images of
# 224 px) pass through it on their way to the actors; Ray Data holds back decoding when it fills.
LOCAL_OBJECT_STORE = 2 << 30
# Asked for per actor (a framework runtime, the model and one decoded shard). A resource request that the
# decoding tasks do not make also keeps Ray Data from fusing the decoding into the actor.
ACTOR_MEMORY = 2 << 30
# Below this many files to hash, the scan's threads here are quicker than starting Ray for them.
RAY_SCAN_MIN_FILES = 20_000
PROBE_CHUNK = 2048  # files a scan task hashes


@dataclass(frozen=True)
class RayOptions:
    """The Ray engine's settings."""

    address: str | None = option(None, "with --engine ray: the cluster to join (head:6379, auto, ray://head:10001); "
                                       "default: $RAY_ADDRESS, else a local Ray for this run",
                                 flag="--ray-address", metavar="ADDRESS", group="speed (not part of the cache key)")

    def __post_init__(self):
        if self.address and self.address not in ("auto", "local"):
            _host_port(self.address)  # a malformed address is refused now, not after the scan


class RayEngine(Engine):
    """Ray tasks decode and an actor pool runs the model; this process only checks the taps (on the
    architecture, without weights) and merges. The GPUs that decode are the cluster's, not this host's."""

    name = "ray"
    Options = RayOptions
    decodes_here = False
    summary = " on Ray (its start and the actors' model builds included)"

    def session(self, options: RayOptions) -> RaySession:
        return RaySession(options.address)

    def start(self, settings, weights, taps: tuple[str, ...], manifest: dict, session: RaySession):
        shapes = architecture_shapes(settings.backbone, taps, settings.image_size)

        def run(jobs, manifest, class_names, done):
            return run_ray(jobs, settings, weights, taps, manifest, class_names, done, session)
        return shapes, run


class RaySession:
    """Ray for one command, started or joined when first needed (a cache hit needs none).

    Uses the Ray this process already started if any; else joins ``address`` or, failing that,
    ``$RAY_ADDRESS`` (disconnecting at the end); else starts a local Ray and stops it at the end.
    """

    def __init__(self, address: str | None = None):
        self.address, self._ray, self._started = address, None, False

    def get(self):
        """The ``ray`` module, connected.

        Raises:
            LayertapError: Ray is not installed.
        """
        if self._ray is None:
            try:
                import ray
                import ray.data  # noqa: F401 - Ray Data is what the engine runs on
            except ImportError:
                raise LayertapError(f"--engine ray needs Ray: {INSTALL} (or use the default --engine local)") \
                    from None
            self._started = _connect(ray, self.address)
            self._ray = ray
        return self._ray

    def close(self) -> None:
        if self._ray is not None and self._started:
            self._ray.shutdown()
        self._ray = None

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def probe(self, root: str, paths: list[str]):
        """The scan's reads and hashes, on the cluster's CPUs: ``[(probe, lasting)]`` in ``paths``' order, or
        None when there are too few files to be worth it (:data:`RAY_SCAN_MIN_FILES`)."""
        if len(paths) < RAY_SCAN_MIN_FILES:
            return None
        ray = self.get()
        chunks = [paths[i:i + PROBE_CHUNK] for i in range(0, len(paths), PROBE_CHUNK)]
        log.info("Ray: hashing %d files in %d tasks", len(paths), len(chunks))
        dataset = ray.data.from_items([{"index": i, "job": pickle.dumps((root, chunk))} for i, chunk in
                                       enumerate(chunks)], override_num_blocks=len(chunks))
        dataset = dataset.map_batches(probe_chunk, batch_size=1, batch_format="numpy", num_cpus=1)
        results: list = [None] * len(chunks)
        try:
            for row in dataset.iter_rows():
                results[int(row["index"])] = pickle.loads(row["probes"])
        except ray.exceptions.RayError as exc:
            raise LayertapError(f"the Ray scan failed: {_first_line(exc)}") from exc
        return [probe for chunk in results for probe in chunk]


def probe_chunk(batch: dict) -> dict:
    """A Ray task: the scan's :func:`pipeline.data.scan.probe_file` for a chunk of files (``(probe, lasting)`` each)."""

    root, paths = pickle.loads(batch["job"][0])
    probes = pickle.dumps([probe_file(os.path.join(root, p)) for p in paths])
    return {"index": batch["index"], "probes": _column(probes)}


def run_ray(jobs: list[ShardJob], settings, weights, taps: tuple[str, ...], manifest: dict, class_names,
            done: int, session: RaySession) -> int:
    """Compute and commit ``jobs`` on Ray: the engine behind ``--engine ray``.

    Args:
        session: The command's :class:`RaySession` (the scan may have connected it already).

    Returns:
        The number of images decoded.

    Raises:
        LayertapError: Ray is not installed, or the run failed (the message says why).
    """
    if not jobs:
        return 0
    ray = session.get()
    try:
        return _run(ray, jobs, settings, weights, taps, manifest, class_names, done)
    except ray.exceptions.RayError as exc:
        raise LayertapError(f"the Ray run failed; shards committed so far are kept and the same command "
                            f"resumes from them: {_first_line(exc)}") from exc


CONNECT_SECONDS = 10.0  # Ray itself retries an address that does not answer for good
JOIN_HINT = ("start one there (`ray start --head` on that machine), fix the address (host:port of the head's "
             "GCS, ray://host:10001, or auto), or leave --ray-address out to run Ray on this machine")


def _check_reachable(address: str) -> None:
    """A TCP connection to the head within :data:`CONNECT_SECONDS`, else one line naming the address and the
    fix. ``auto`` (the cluster this machine belongs to) and ``local`` are Ray's to find."""
    import socket

    if address in ("auto", "local"):
        return
    try:
        socket.create_connection(_host_port(address), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        reason = (f"no answer within {CONNECT_SECONDS:g} s" if isinstance(exc, TimeoutError)
                  else (exc.strerror or str(exc)).lower())
        raise LayertapError(f"cannot reach a Ray cluster at --ray-address {address} ({reason}); {JOIN_HINT}") from None


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address {address} is not host:port (e.g. head:6379, ray://head:10001 or auto)")
    return host.strip("[]"), int(port)


def _connect(ray, address: str | None) -> bool:
    """Start or join Ray; whether this call did (and so must shut it down)."""
    if ray.is_initialized():
        return False
    # Ray's own chatter (its start-up notices, Ray Data's execution plan, C++ notices) only with -v.
    verbose = log.isEnabledFor(logging.DEBUG)
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
    quiet = dict(include_dashboard=False, logging_level=logging.INFO if verbose else logging.ERROR,
                 log_to_driver=True)
    address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray job (`ray job submit`)
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as exc:
            raise LayertapError(f"no Ray cluster answered at --ray-address {address} ({_first_line(exc)}); "
                                f"{JOIN_HINT}") from None
    else:
        cpus = os.cpu_count() or 1
        ray.init(address="local", num_cpus=cpus, object_store_memory=_local_object_store(), **quiet)
    return True


def _local_object_store() -> int:
    available = available_memory()
    return max(256 << 20, min(LOCAL_OBJECT_STORE, available // 4)) if available else LOCAL_OBJECT_STORE


def _run(ray, jobs, settings, weights, taps, manifest, class_names, done) -> int:
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False  # ours below counts committed images
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    memory = int(min(ACTOR_MEMORY, resources.get("memory", ACTOR_MEMORY) / 2))
    on_gpus = settings.decoder != "pillow"  # decoded in the model actors, each on its GPU
    if on_gpus and not gpus and gpu_decode.DEVICE != "cpu":
        raise LayertapError(f"--decoder {settings.decoder} with --engine ray decodes in the model actors, one on each "
                            "GPU of the Ray cluster, and this cluster has no GPU; use --decoder pillow (decoding "
                            "in Ray tasks on its CPUs)")
    # A GPU decoder's threads (reading files; on GPUs without JPEG engines, Huffman decoding too) are the
    # actor's: it reserves its node's CPUs per GPU, and runs that many (or --workers) threads.
    actor_cpus = cpus_per_gpu(ray.nodes()) if on_gpus and gpus else 1
    threads = settings.workers or actor_cpus
    dataset = ray.data.from_items([{"job": pickle.dumps(job)} for job in jobs], override_num_blocks=len(jobs))
    if not on_gpus:
        dataset = dataset.map_batches(
            decode_shard, batch_size=1, batch_format="numpy", num_cpus=1,
            fn_kwargs=dict(size=settings.image_size, resize=settings.resize, draft=settings.draft,
                           max_pixels=settings.max_pixels))
    dataset = dataset.map_batches(
        ShardWriter, batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=gpus or 1),
        num_cpus=actor_cpus, num_gpus=1 if gpus else 0, memory=memory,
        fn_constructor_kwargs=dict(settings=settings, weights=weights, taps=taps, manifest=manifest,
                                   class_names=tuple(class_names), decode_device=gpu_decode.DEVICE,
                                   decode_workers=threads),
        runtime_env={"env_vars": _backend_env()})
    where = f"one model actor on each of {gpus} GPUs" if gpus else "one model actor on a CPU (no GPU in the cluster)"
    how = f"decoding with {settings.decoder} in the actors ({threads} threads each)" if on_gpus else \
        f"{int(resources.get('CPU', 0))} CPUs to decode"
    log.info("Ray: %d shard%s to compute, %s, %s", len(jobs), "s" * (len(jobs) > 1), how, where)
    bar = extraction_bar(jobs, done, settings.progress)
    n_decoded = 0
    try:
        for row in dataset.iter_rows():
            n_decoded += int(row["images"])
            bar.update(int(row["images"]))
    finally:
        bar.close()
    return n_decoded


def cpus_per_gpu(nodes: list[dict]) -> int:
    """The CPUs a model actor that decodes on its GPU reserves: the fewest CPUs per GPU of the cluster's live
    GPU nodes (``ray.nodes()``), at least 1, so that every GPU's actor fits on its node and the actors of a
    node share its cores instead of each running a thread per core."""
    shares = [int(node["Resources"].get("CPU", 0) // node["Resources"]["GPU"]) for node in nodes
              if node.get("Alive") and node.get("Resources", {}).get("GPU")]
    return max(1, min(shares, default=1))


def _backend_env() -> dict[str, str]:
    """The driver's Keras backend (which the key records) and kernel settings, for every actor on every node."""
    env = {name: os.environ[name] for name in ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL") if name in os.environ}
    return {**env, "KERAS_BACKEND": keras_backend()}


def decode_shard(batch: dict, size: int, resize: str, draft: bool, max_pixels: int) -> dict:
    """A Ray task: decode one shard's images with the local engine's :func:`decode_image`.

    A bad image is a zero row and its reason (the local engine's words); the job passes through.
    """
    job: ShardJob = pickle.loads(batch["job"][0])
    pixels = np.zeros((job.stop - job.start, size, size, 3), np.uint8)
    decode = partial(decode_image, size=size, resize=resize, draft=draft, max_pixels=max_pixels)
    reasons = []
    for i, (path, record) in enumerate(zip(job.files(), job.records)):
        array, reason = or_reason(partial(decode, expected=record.stat), path)
        if reason is None:
            pixels[i] = array
        reasons.append(reason)
    # JSON (ASCII-escaped) carries a reason that quotes an undecodable file name intact.
    return {"job": batch["job"], "pixels": pixels[None], "reasons": _column(json.dumps(reasons))}


class ShardWriter:
    """A Ray actor: builds the extractor once, then computes and commits each shard it is given.

    The shards come decoded by the tasks before it, or, with a GPU decoder, the actor decodes them itself on
    ``decode_device`` (the driver's :data:`pipeline.data.gpu_decode.DEVICE`: ``cuda``, the GPU Ray gave it) with
    ``decode_workers`` threads.
    """

    def __init__(self, settings, weights, taps, manifest: dict, class_names, decode_device: str | None = None,
                 decode_workers: int | None = None):

        set_backend_defaults()

        # Resolved again here: the weights' path on this node may differ, their bytes may not.
        local = resolve_weights(get_backbone(settings.backbone), str(weights.path) if weights.kind == "file"
                                else settings.weights, settings.seed)
        if local.sha256 != weights.sha256:
            raise LayertapError(f"the weights on this Ray node ({local.path}) are not the ones the run was "
                                f"started with (sha256 {local.sha256[:12]}, not {weights.sha256[:12]})")
        self.extractor = create_extractor(settings.backbone, local, taps, settings.pooling, settings.image_size,
                                          settings.precision, fold=folded(manifest))
        self.settings, self.manifest, self.class_names = settings, manifest, class_names
        self.pad_to = settings.batch_size if pads_short_batches() else None
        self.decoder = None
        if settings.decoder != "pillow":  # this actor decodes its shards, on its GPU (``decode_device``)
            gpu_decode.check_decoder(settings.decoder, decode_device)
            self.decoder = open_decoder(settings, decode_device, decode_workers)

    def __call__(self, batch: dict) -> dict:
        job: ShardJob = pickle.loads(batch["job"][0])
        chunks = job.chunks(self.settings.batch_size)
        if self.decoder is None:
            batches = _batches(job, batch["pixels"][0], json.loads(batch["reasons"][0]), chunks)
        else:
            batches = decoded_batches(*decoding_inputs([job]), chunks, self.settings, self.decoder)
        n = run_shard(job, batches, self.extractor, self.manifest, self.class_names, self.settings.store_dtype,
                      self.pad_to)
        return {"images": np.array([n]), "shard": _column(str(job.path))}


def _column(value) -> np.ndarray:
    """One bytes or str value as a batch column. An object array: a fixed-width NumPy type would become a
    fixed-width Arrow type, and blocks of different widths would be cut to one width when joined."""
    column = np.empty(1, dtype=object)
    column[0] = value
    return column


def _batches(job: ShardJob, pixels: np.ndarray, reasons: list, chunks: list[tuple[int, int]]):
    """A decoded shard as the local engine's batches: the same chunks, only the decoded images of each."""
    for a, b in chunks:
        chunk = reasons[a - job.start:b - job.start]
        ok = [a - job.start + i for i, reason in enumerate(chunk) if reason is None]
        yield (a, b), pixels[ok], chunk


def _first_line(exc: BaseException) -> str:
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
