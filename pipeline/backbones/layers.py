"""The Keras pieces layertap adds: a backbone's preprocessing, the tap pooling, and the training loss.

Registered under the ``layertap`` package name, so a saved fine-tuned model (``model.keras``)
loads in safe mode wherever this module has been imported (:func:`pipeline.runs.artifacts.load_model`).
"""

from __future__ import annotations

from pipeline.backbones.pooling import parse_pooling, pool_tensor
from pipeline.backbones.registry import get_backbone
from pipeline.core.evaluation import TINY
from pipeline.core.runtime import import_keras

keras = import_keras()


@keras.saving.register_keras_serializable(package="layertap")
class BackbonePreprocess(keras.layers.Layer):
    """The backbone's own ``preprocess_input`` on uint8 or float RGB pixels, in float32."""

    def __init__(self, backbone: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, x):
        return get_backbone(self.backbone).preprocess(keras.ops.cast(x, "float32"))

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


@keras.saving.register_keras_serializable(package="layertap")
class TapPooling(keras.layers.Layer):
    """Pool a ``(B, H, W, C)`` map with one of :data:`pipeline.backbones.pooling.POOLING_MODES`, in float32."""

    def __init__(self, mode: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mode = parse_pooling(mode)

    def call(self, x):
        return pool_tensor(keras.ops.cast(x, "float32"), self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="layertap")
class Standardise(keras.layers.Layer):
    """``(x - mean) / scale`` with ``mean`` and ``scale`` held as weights: a ``Normalization`` layer as exporters
    take it (a Normalization given its statistics holds them as tensors, which tf2onnx turns into inputs)."""

    def build(self, input_shape):
        self.mean = self.add_weight(shape=(input_shape[-1],), initializer="zeros", trainable=False, name="mean")
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", trainable=False, name="scale")

    def call(self, x):
        return (x - self.mean) / self.scale

    @classmethod
    def like(cls, normalization) -> Standardise:
        """The same function as a built ``keras.layers.Normalization`` (its epsilon floor on the scale too)."""
        import numpy as np

        mean = np.asarray(normalization.mean, np.float32).reshape(-1)
        scale = np.maximum(np.sqrt(np.asarray(normalization.variance, np.float32).reshape(-1)), keras.backend.epsilon())
        layer = cls(name=normalization.name)
        layer.build((None, mean.size))
        layer.set_weights([mean, scale.astype(np.float32)])
        return layer


@keras.saving.register_keras_serializable(package="layertap")
def crossentropy(y_true, y_pred):
    """Sparse cross-entropy of class probabilities (a softmax output), the same on every backend.

    Keras's own ``sparse_categorical_crossentropy`` takes a softmax layer's logits on TensorFlow only; on JAX
    and torch it clips the probabilities to [1e-7, 1 - 1e-7], and a clipped probability passes no gradient:
    an image the network is sure is another class (its own class below 1e-7) teaches nothing, and a network
    that is sure about every image does not move at all. Here the probabilities are floored at
    :data:`pipeline.core.evaluation.TINY` instead (as :func:`pipeline.core.evaluation.log_loss` floors them), and
    ``-log p``
    of the true class is computed from their logarithms.
    """
    log_p = keras.ops.log(keras.ops.maximum(keras.ops.cast(y_pred, "float32"), TINY))
    return keras.losses.sparse_categorical_crossentropy(y_true, log_p, from_logits=True)
