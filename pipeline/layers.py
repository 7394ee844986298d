"""The Keras layers layertap adds around a backbone: its preprocessing and the tap pooling.

Registered under the ``layertap`` package name, so a saved fine-tuned model (``model.keras``)
loads in safe mode wherever this module has been imported (:func:`pipeline.artifacts.load_model`).
"""

from __future__ import annotations

from pipeline import import_keras
from pipeline.pooling import parse_pooling, pool_tensor

keras = import_keras()


@keras.saving.register_keras_serializable(package="layertap")
class BackbonePreprocess(keras.layers.Layer):
    """The backbone's own ``preprocess_input`` on uint8 or float RGB pixels, in float32."""

    def __init__(self, backbone: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, x):
        from pipeline.backbones import get_backbone

        return get_backbone(self.backbone).preprocess(keras.ops.cast(x, "float32"))

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
        return pool_tensor(keras.ops.cast(x, "float32"), self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
