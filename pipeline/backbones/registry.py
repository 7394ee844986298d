"""The backbone registry: what each backbone is (constructor, preprocessing, layer names, taps, ImageNet file).

Plain Python, no Keras: a cache hit, ``--help`` and ``--layers`` checks answer from here without loading a
framework. Networks are built by :mod:`pipeline.backbones.build`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipeline.core.runtime import import_keras


@dataclass(frozen=True)
class Backbone:
    """A registered backbone: everything layertap asks of a network, in the manner of timm's ``feature_info``.

    A new ``keras.applications`` network is one entry in :data:`BACKBONES`; what is derived from the built
    network (layer names when not listed, output shapes, tap costs for every layer type, which
    BatchNormalizations fold, the default unfreeze point) is computed by :mod:`pipeline.backbones.build`,
    :mod:`pipeline.backbones.costs` and :mod:`pipeline.backbones.batchnorm`, never declared here.
    """

    name: str
    constructor: str            # attribute of keras.applications
    module: str                 # keras.applications submodule that has preprocess_input
    preprocessing: str          # what preprocess_input (and the network's own first layers) do, for manifests
    taps: tuple[str, ...]       # recommended taps, low to high: the end of each stage
    imagenet_file: str          # Keras's no-top ImageNet weights: file name, URL, hash (md5 or sha256, as Keras
    imagenet_url: str           # gives it; its get_file tells them apart by length)
    imagenet_hash: str
    batchnorm: bool = False     # BatchNormalization after its convolutions (pipeline.backbones.batchnorm folds it)
    kind: str = "maps"          # what its layers output: maps (B, H, W, C), pooled by pipeline.backbones.pooling

    def build(self, image_size: int):
        """The convolutional base (a ``keras.Model``) without weights, for ``image_size`` x ``image_size`` RGB."""
        constructor = getattr(import_keras().applications, self.constructor)
        return constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3))

    def layer_names(self) -> tuple[str, ...] | None:
        """Every layer name of the convolutional base but its input, without Keras (so that a wrong ``--layers``
        is refused before the scan and the weights; a test holds the names to the built network), or None
        for a backbone without such a list (its taps are checked when the network is built)."""
        names = _LAYER_NAMES.get(self.name)
        return names() if names else None

    def preprocess(self, x):
        import_keras()
        module = importlib.import_module(f"keras.applications.{self.module}")
        return module.preprocess_input(x)


def _vgg16_names() -> tuple[str, ...]:
    return tuple(name for block, convs in enumerate((2, 2, 3, 3, 3), start=1)
                 for name in (*(f"block{block}_conv{i}" for i in range(1, convs + 1)), f"block{block}_pool"))


def _resnet50_names() -> tuple[str, ...]:
    names = ["conv1_pad", "conv1_conv", "conv1_bn", "conv1_relu", "pool1_pad", "pool1_pool"]
    for stage, blocks in enumerate((3, 4, 6, 3), start=2):
        for block in range(1, blocks + 1):
            prefix = f"conv{stage}_block{block}"
            shortcut = ("0_conv", "0_bn") if block == 1 else ()
            names += [f"{prefix}_{part}" for part in (*shortcut, "1_conv", "1_bn", "1_relu", "2_conv", "2_bn",
                                                      "2_relu", "3_conv", "3_bn", "add", "out")]
    return tuple(names)


_LAYER_NAMES = {"vgg16": _vgg16_names, "resnet50": _resnet50_names}
_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"
BACKBONES: dict[str, Backbone] = {
    "vgg16": Backbone(
        name="vgg16", constructor="VGG16", module="vgg16",
        preprocessing="caffe: RGB to BGR, minus the ImageNet channel means (keras vgg16.preprocess_input)",
        taps=("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"),
        imagenet_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_url=_KERAS_WEIGHTS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_hash="6d6bbae143d832006294945121d1f1fc"),
    "resnet50": Backbone(
        name="resnet50", constructor="ResNet50", module="resnet50",
        preprocessing="caffe: RGB to BGR, minus the ImageNet channel means (keras resnet50.preprocess_input)",
        taps=("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
        imagenet_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_url=_KERAS_WEIGHTS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_hash="4d473c1dd8becc155b73f8504c6f6626", batchnorm=True),
    # Modern backbones: normalisation is inside the network (include_preprocessing), so preprocess_input is the
    # identity and the network takes 0-255 RGB. ConvNeXt uses LayerNormalization (nothing to fold) and
    # depthwise convolutions written as grouped Conv2D; EfficientNetV2 BatchNormalization after Conv2D and
    # DepthwiseConv2D, and squeeze-and-excitation blocks.
    "convnext_tiny": Backbone(
        name="convnext_tiny", constructor="ConvNeXtTiny", module="convnext",
        preprocessing="in the network: 0-255 RGB, normalised by the ImageNet mean and std (keras convnext)",
        taps=("convnext_tiny_stage_0_block_2_identity", "convnext_tiny_stage_1_block_2_identity",
              "convnext_tiny_stage_2_block_8_identity", "convnext_tiny_stage_3_block_2_identity"),
        imagenet_file="convnext_tiny_notop.h5", imagenet_url=_KERAS_WEIGHTS + "convnext/convnext_tiny_notop.h5",
        imagenet_hash="d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
    "efficientnetv2_b0": Backbone(
        name="efficientnetv2_b0", constructor="EfficientNetV2B0", module="efficientnet_v2",
        preprocessing="in the network: 0-255 RGB rescaled to [-1, 1] (keras efficientnet_v2)",
        taps=("block2b_add", "block3b_add", "block5e_add", "block6h_add", "top_activation"),
        imagenet_file="efficientnetv2-b0_notop.h5",
        imagenet_url=_KERAS_WEIGHTS + "efficientnet_v2/efficientnetv2-b0_notop.h5",
        imagenet_hash="893217f2bb855e2983157299931e43ff", batchnorm=True),
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
