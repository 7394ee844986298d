"""The typed manifest of a feature store: how its features were made, and how to make them again.

Every later stage learns how a store was made from a :class:`StoreManifest`, never by reading
dict keys: prediction decodes new images with :meth:`StoreManifest.decoder` and runs the backbone
from :meth:`StoreManifest.create_extractor`; fine-tuning starts from the same backbone and weights
(:meth:`StoreManifest.resolve_weights`), BatchNormalization as built. A model
folder's manifest carries the same fields (:meth:`StoreManifest.recipe`), so a model finds its
backbone without its store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from pipeline.backbones.batchnorm import FOLDED
from pipeline.backbones.build import create_extractor
from pipeline.backbones.registry import get_backbone
from pipeline.backbones.weights import resolve_weights
from pipeline.core.errors import LayertapError
from pipeline.data.decoding import decode_image
from pipeline.data.images import DEFAULT_MAX_PIXELS

# The fields a model folder needs to turn new images into this store's features.
_RECIPE = ("backbone", "weights", "weights_sha256", "weights_arg", "seed", "image_size", "resize",
           "interpolation", "draft", "decoder", "max_pixels", "preprocessing", "pooling", "precision",
           "batchnorm")


@dataclass(frozen=True)
class StoreManifest:
    """What a store's features were computed from (the JSON in its ``manifest`` attribute, typed).

    Attributes:
        key: The store's cache key.
        backbone: Registered backbone name.
        weights: Weights id (``imagenet``, ``hed-bsds500``, ``random-seed0``, a file name).
        weights_sha256: The sha256 of the weights used.
        weights_arg: What was passed as ``weights`` (``imagenet``, ``random``, a path), to resolve them again.
        seed: Seed of ``random`` weights.
        image_size, resize, interpolation, draft, decoder_name, max_pixels: How images became pixels
            (``decoder_name`` is the manifest's ``decoder``: ``pillow``, ``nvjpeg`` or ``dali``).
        preprocessing: What the backbone's ``preprocess_input`` does.
        pooling, precision: How taps were pooled, and the compute precision.
        batchnorm: ``folded`` where BatchNormalization was folded into the convolutions
            (:mod:`pipeline.backbones.batchnorm`), else empty.
        store_dtype: The stored features' type.
        keras_backend, keras_version: What computed them.
        class_names: The classes, in label order.
        data_name, data_root, split_file: Where the images were.
        taps: Per tap: map shape, seconds, the taps computed with it.
        versions: Package versions.
        raw: The whole JSON object as read (fields not typed here, such as timings).
    """

    key: str
    backbone: str
    weights: str
    weights_sha256: str
    weights_arg: str
    seed: int
    image_size: int
    resize: str = "squash"
    interpolation: str = "bilinear"
    draft: bool = True
    decoder_name: str = "pillow"
    max_pixels: int = DEFAULT_MAX_PIXELS
    preprocessing: str = ""
    pooling: str = "avg"
    precision: str = "float32"
    batchnorm: str = ""
    store_dtype: str = "float32"
    keras_backend: str = ""
    keras_version: str = ""
    class_names: tuple[str, ...] = ()
    data_name: str = ""
    data_root: str = ""
    split_file: str | None = None
    taps: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict) -> StoreManifest:
        """Read a store's manifest, or the recipe part of a model folder's manifest, of any layertap version.

        Raises:
            LayertapError: a field every manifest has is missing.
        """
        settings = d.get("settings") or {}
        try:
            if "weights_arg" in d:  # written since the recipe was typed, and every model manifest
                weights_arg, seed = d["weights_arg"], d.get("seed") or 0
            else:  # a store written before: the arguments are in its settings
                weights_arg, seed = settings["weights"], settings.get("seed", 0)
            data = d.get("data") or {}
            return cls(
                key=d.get("key") or d["store_key"], backbone=d["backbone"], weights=d["weights"],
                weights_sha256=d["weights_sha256"], weights_arg=weights_arg, seed=int(seed or 0),
                image_size=int(d["image_size"]), resize=d.get("resize", "squash"),
                interpolation=d.get("interpolation", "bilinear"), draft=bool(d.get("draft", True)),
                decoder_name=d.get("decoder", "pillow"),
                max_pixels=int(d.get("max_pixels") or settings.get("max_pixels") or DEFAULT_MAX_PIXELS),
                preprocessing=d.get("preprocessing", ""), pooling=d["pooling"],
                precision=d.get("precision", "float32"), batchnorm=d.get("batchnorm", ""),
                store_dtype=d.get("store_dtype", "float32"),
                keras_backend=d.get("keras_backend", ""), keras_version=d.get("keras_version", ""),
                class_names=tuple(d.get("class_names", ())), data_name=data.get("name", ""),
                data_root=data.get("root", ""), split_file=data.get("split_file"),
                taps=dict(d.get("taps") or {}), versions=dict(d.get("versions") or {}), raw=d)
        except KeyError as exc:
            raise LayertapError(f"the manifest has no {exc.args[0]!r} field; it was not written by layertap, "
                                "or it was edited") from None

    def recipe(self) -> dict:
        """The fields a model folder keeps to compute these features from new images."""
        return {name: getattr(self, "decoder_name" if name == "decoder" else name) for name in _RECIPE}

    def decoder(self):
        """``decode(path_or_file) -> (size, size, 3) uint8``: images decoded exactly as stage one did.

        The GPU decoders' pixels differ slightly from Pillow's; where the store was made with one,
        new images are decoded with Pillow on the CPU and the difference is the decoders' (about one
        grey level, bench/NOTES.md).
        """

        return partial(decode_image, size=self.image_size, resize=self.resize,
                       draft=self.draft, max_pixels=self.max_pixels)

    def resolve_weights(self):
        """The weights the store was extracted with, found again and checked by their sha256.

        Raises:
            LayertapError: the weights here are not the same file.
        """

        weights = resolve_weights(get_backbone(self.backbone), self.weights_arg, seed=self.seed)
        if weights.sha256 != self.weights_sha256:
            raise LayertapError(f"the {self.weights} weights here (sha256 {weights.sha256[:16]}) are not the ones "
                                f"these features were computed with ({self.weights_sha256[:16]}); "
                                f"give the same --weights file as at extraction")
        return weights

    def create_extractor(self, taps=None):
        """The network that computed the store: backbone, weights (checked), precision, taps and pooling.

        Args:
            taps: Taps to compute (default: every tap of the store).
        """

        return create_extractor(self.backbone, self.resolve_weights(), taps or tuple(self.taps),
                                self.pooling, self.image_size, self.precision, fold=self.batchnorm == FOLDED)
