"""BatchNormalization folded into the convolution before it, for inference (extraction and prediction).

In inference mode a BatchNormalization after a convolution is an affine map per channel, so it can
live in the convolution's kernel and bias: kernel times ``gamma / sqrt(var + eps)``, bias ``(bias -
mean)`` times that plus ``beta``. The network computes the same function (float32: the features
agree to ~1e-6 relative) with one elementwise pass over the activations fewer per BatchNormalization,
53 in ResNet50, none in VGG16. That runs ResNet50 faster on TensorFlow and torch; XLA (the JAX backend)
fuses the pass already (bench/README.md, ``python -m bench.forward``). So extraction folds where it
measured faster: :func:`folds_batchnorm`. Fine-tuning never folds: it composes the backbone as built.

A store records the folding in its key and manifest (``"batchnorm": "folded"``), since its numbers
differ in their last bits; prediction follows the manifest, on any backend.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.runtime import import_keras, keras_backend

FOLDED = "folded"
# Backends where a folded network measured faster (bench/NOTES.md, "BatchNormalization folded ...").
_FASTER_ON = ("tensorflow", "torch")


def folds_batchnorm(backbone, backend: str | None = None) -> bool:
    """Whether extraction folds ``backbone``'s BatchNormalization on ``backend`` (default: the running one).

    Answered without importing Keras, so a cache hit's key needs no network.
    """
    return backbone.batchnorm and (backend or keras_backend()) in _FASTER_ON


def folded(manifest: dict) -> bool:
    """Whether a store's features were computed with BatchNormalization folded: what its manifest says, which
    the engines that write it and prediction follow (never the running backend's :func:`folds_batchnorm`)."""
    return manifest.get("batchnorm") == FOLDED


def fold_batchnorm(model):
    """A copy of ``model`` with each foldable BatchNormalization folded into its convolution.

    Foldable: over the channels, with both a scale and an offset, after a convolution (``Conv1D/2D/3D``,
    grouped or not, or ``DepthwiseConv1D/2D``) whose output feeds nothing else and is not one of the
    model's outputs (a tap there keeps the convolution's own output). A ``SeparableConv2D`` is not folded.
    The folded convolution gets a bias; the BatchNormalization becomes a pass-through of the same name,
    so every layer name (and tap) is kept. The rest is copied as it is.

    Returns:
        ``(copy, n)``: the new ``keras.Model`` and the number of BatchNormalizations folded.
    """
    keras = import_keras()
    layers = keras.layers
    producer = {id(layer.output): layer for layer in model.layers}
    users: dict[str, int] = {}
    for layer in model.layers:
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        for tensor in inputs:
            if id(tensor) in producer:
                name = producer[id(tensor)].name
                users[name] = users.get(name, 0) + 1
    outputs = {id(tensor) for tensor in model.outputs}
    convs = {}  # conv name -> its BatchNormalization
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization) and layer.axis in (-1, 3) and layer.scale and layer.center:
            source = producer.get(id(layer.input))
            if (isinstance(source, _foldable(layers)) and users[source.name] == 1
                    and id(source.output) not in outputs):
                convs[source.name] = layer
    folded_away = {bn.name for bn in convs.values()}

    class FoldedAway(layers.Layer):
        """Where a folded BatchNormalization was: its input unchanged (takes the arguments it was called with)."""

        def call(self, x, mask=None, training=None):
            return x

    def clone(layer):
        if layer.name in folded_away:
            return FoldedAway(name=layer.name, dtype=layer.dtype_policy)
        config = layer.get_config()
        return layer.__class__.from_config({**config, "use_bias": True} if layer.name in convs else config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if not layer.weights or layer.name in folded_away:
            continue
        target = copy.get_layer(layer.name)
        if layer.name in convs:
            target.set_weights(_folded(layer, convs[layer.name]))
        else:
            target.set_weights(layer.get_weights())
    return copy, len(convs)


def _foldable(layers) -> tuple[type, ...]:
    """The convolutions whose output channels are the last axis of their kernel (depthwise: after a reshape)."""
    return (layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.DepthwiseConv1D, layers.DepthwiseConv2D)


def _folded(conv, bn) -> list[np.ndarray]:
    """The kernel and bias of ``conv`` followed by ``bn`` in inference mode (computed in float64)."""
    gamma, beta, mean, variance = (np.asarray(w, np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(variance + bn.epsilon)
    kernel, *bias = (np.asarray(w, np.float64) for w in conv.get_weights())
    shift = (bias[0] if bias else 0.0) - mean
    # A depthwise kernel is (*window, in, multiplier): output channel c * multiplier + m scales kernel[..., c, m].
    per_kernel = scale.reshape(kernel.shape[-2:]) if "Depthwise" in type(conv).__name__ else scale
    return [(kernel * per_kernel).astype(np.float32), (shift * scale + beta).astype(np.float32)]
