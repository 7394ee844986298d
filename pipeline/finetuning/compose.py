"""Fine-tuning's parts: augmentation, freezing by name, the learning-rate schedule and training one phase (the
network itself is :func:`pipeline.backbones.build.compose_classifier`).

Everything uses the Keras 3 API, so the model trains unchanged on the TensorFlow, JAX and PyTorch backends.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from pipeline.core.errors import LayertapError
from pipeline.core.evaluation import epoch_rank
from pipeline.core.runtime import import_keras
from pipeline.core.settings import check_choice

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
# name -> default factor; flip takes a mode instead.
AUGMENTATIONS = {"flip": "horizontal", "rotation": 0.1, "zoom": 0.1, "contrast": 0.1}
FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")


def parse_augmentation(text: str) -> dict:
    """``flip,rotation=0.2`` -> ``{"flip": "horizontal", "rotation": 0.2}``; ``none`` -> ``{}``.

    Raises:
        ValueError: an unknown augmentation or a bad value.
    """
    known = "none, or a comma list of: flip[=horizontal|vertical|horizontal_and_vertical], " \
            "rotation[=0.1], zoom[=0.1], contrast[=0.1]"
    spec = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == "none":
            continue
        name, _, value = item.partition("=")
        if name not in AUGMENTATIONS:
            raise ValueError(f"augmentation {name!r} is not known; use {known}")
        if name == "flip":
            if value and value not in FLIP_MODES:
                raise ValueError(f"augmentation flip={value!r} is not known; use one of: {', '.join(FLIP_MODES)}")
            spec[name] = value or AUGMENTATIONS[name]
            continue
        try:
            factor = float(value) if value else AUGMENTATIONS[name]
        except ValueError:
            factor = -1.0
        if not 0 < factor < 1:
            raise ValueError(f"augmentation {item!r}: the factor must be a number between 0 and 1")
        spec[name] = factor
    return spec


def build_augmentation(spec: dict, seed: int = 0):
    """A ``keras.Sequential`` of Random* layers (identity at inference), or None for no augmentation."""
    keras = import_keras()

    layers = []
    if "flip" in spec:
        layers.append(keras.layers.RandomFlip(spec["flip"], seed=seed, name="flip"))
    if "rotation" in spec:
        layers.append(keras.layers.RandomRotation(spec["rotation"], fill_mode="reflect", seed=seed + 1,
                                                  name="rotation"))
    if "zoom" in spec:
        layers.append(keras.layers.RandomZoom(spec["zoom"], fill_mode="reflect", seed=seed + 2, name="zoom"))
    if "contrast" in spec:
        layers.append(keras.layers.RandomContrast(spec["contrast"], seed=seed + 3, name="contrast"))
    return keras.Sequential(layers, name="augment") if layers else None


def default_unfreeze_from(trunk) -> str:
    """The tap's last layer with a kernel (a convolution or Dense): phase 2 trains from the top convolution up.

    Layers after it with weights train too (ConvNeXt's LayerScale after its last pointwise Dense); BatchNorm
    never does (:func:`set_trainable`).

    Chosen on val on flowers17 (bench/NOTES.md, "Stage three: the schedule search"): unfreezing only
    block4_conv3 did at least as well on val as the whole of block 4, at 40% of the trainable
    parameters and about 60% of the time an epoch ("surgical" fine-tuning, Lee et al., ICLR 2023).
    """
    return next(layer.name for layer in reversed(trunk.layers) if getattr(layer, "kernel", None) is not None)


def check_unfreeze_from(trunk, unfreeze_from: str) -> int:
    """The index in ``trunk.layers`` of the first layer to unfreeze.

    Raises:
        ValueError: the layer is not in the trunk; the message lists the layers that are.
    """
    names = [layer.name for layer in trunk.layers]
    if unfreeze_from not in names:
        weighted = [layer.name for layer in trunk.layers if layer.weights]
        raise ValueError(f"unfreeze_from={unfreeze_from!r} is not a layer at or below the tap {names[-1]}; "
                         f"use one of: {', '.join(weighted)}")
    return names.index(unfreeze_from)


def set_trainable(trunk, unfreeze_from: str | None) -> list[str]:
    """Freeze the trunk, then unfreeze from the named layer upward; BatchNorm layers stay frozen.

    Args:
        unfreeze_from: Layer name; None freezes everything.

    Returns:
        The names of the layers with weights that are now trainable.

    Raises:
        ValueError: the layer is not in the trunk (see :func:`check_unfreeze_from`).
    """
    keras = import_keras()

    start = check_unfreeze_from(trunk, unfreeze_from) if unfreeze_from is not None else len(trunk.layers)
    trunk.trainable = True  # the container's flag gates its layers' flags
    unfrozen = []
    for index, layer in enumerate(trunk.layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


def param_counts(model) -> dict[str, int]:
    """Trainable and frozen (non-trainable, including BatchNorm statistics) parameter counts."""
    count = lambda weights: int(sum(np.prod(w.shape) for w in weights))  # noqa: E731
    return {"trainable": count(model.trainable_weights), "frozen": count(model.non_trainable_weights)}


def check_composition(features_model, images: np.ndarray, stored: np.ndarray, exact: bool) -> float:
    """The composed model must reproduce the stored features: else preprocessing or weights differ.

    ``exact``: float32 compute and storage, and the images decoded as at extraction; else (bfloat16/float16
    somewhere, or a GPU decoder's pixels against Pillow's) rounding and decoding allow 2%.
    """
    computed = np.asarray(features_model.predict_on_batch(images), dtype=np.float32)
    error = float(np.abs(computed - stored).max() / max(float(np.abs(stored).max()), 1e-6))
    tolerance = 1e-3 if exact else 2e-2
    if error > tolerance:
        raise LayertapError(f"the fine-tuning model does not reproduce the store's features (relative error "
                            f"{error:.2g} > {tolerance}); the weights or preprocessing differ from extraction")
    return error


def predict_batched(model, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """``model``'s outputs for ``inputs`` in batches of ``batch_size``, as float64."""
    chunks = [np.asarray(model.predict_on_batch(inputs[i:i + batch_size]), dtype=np.float64)
              for i in range(0, len(inputs), batch_size)]
    return np.concatenate(chunks)


def learning_rate_schedule(learning_rate: float, schedule: str, steps: int, warmup_steps: int = 0):
    """``constant``, or ``cosine``: a linear warm-up over ``warmup_steps`` to ``learning_rate``, then a
    cosine decay to zero at ``steps``."""
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "constant":
        return learning_rate
    keras = import_keras()
    warmup_steps = min(warmup_steps, max(steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        learning_rate if not warmup_steps else learning_rate / 100, decay_steps=max(steps - warmup_steps, 1),
        warmup_target=learning_rate if warmup_steps else None, warmup_steps=warmup_steps)


def train_phase(net, x_train, y_train, x_val, y_val, *, epochs: int, learning_rate, precision: str,
                batch_size: int, patience: int, minutes: float | None = None, start: tuple | None = None,
                verbose: int = 0):
    """Compile ``net`` with Adam and train it, keeping the weights that do best on val.

    Best means the highest val accuracy, then the lowest val loss. Training stops after ``patience``
    epochs without a better one, or once ``minutes`` are spent (after the batch that spends them).

    Args:
        learning_rate: A number or a Keras schedule (:func:`learning_rate_schedule`).
        start: ``(val_accuracy, val_loss)`` of the weights before training (phase 2 starts from phase 1's):
            unless an epoch beats them, those weights are restored.

    Returns:
        ``(history, time_limited, improved)``: one dict of metrics per epoch, whether the budget ran
        out, and whether an epoch beat ``start``.
    """
    keras = import_keras()
    optimizer = keras.optimizers.Adam(learning_rate)
    if precision == "float16":  # float16 gradients underflow without loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    from pipeline.backbones.layers import crossentropy

    net.compile(optimizer=optimizer, loss=crossentropy, metrics=["accuracy"])
    best = keep_best_on_val(patience, start)
    callbacks = [best] + ([_time_limit(minutes)] if minutes is not None else [])
    history = net.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=epochs, batch_size=batch_size,
                      shuffle=True, callbacks=callbacks, verbose=verbose)
    time_limited = minutes is not None and callbacks[-1].stopped
    if time_limited:
        log.info("stopped in epoch %d: the %g-minute budget is spent", len(history.history["loss"]), minutes)
    keys = list(history.history)
    curves = [{k: float(history.history[k][i]) for k in keys} for i in range(len(history.epoch))]
    return curves, time_limited, best.improved


def keep_best_on_val(patience: int, start: tuple | None):
    """A callback that keeps the best weights on val (see :func:`train_phase`)."""
    keras = import_keras()

    class BestOnVal(keras.callbacks.Callback):
        """Keep the weights of the epoch best by :func:`pipeline.core.evaluation.epoch_rank`; restore them at the
        end."""

        def __init__(self, patience: int, start: tuple | None):
            super().__init__()
            self.patience = patience
            self.best = epoch_rank({"val_accuracy": start[0], "val_loss": start[1]}) if start else (-np.inf, -np.inf)
            self.best_weights, self.wait, self.improved = None, 0, False

        def on_train_begin(self, logs=None):
            self.initial = self.model.get_weights()

        def on_epoch_end(self, epoch, logs=None):
            score = epoch_rank(logs)
            if score > self.best:
                self.best, self.best_weights, self.wait, self.improved = score, self.model.get_weights(), 0, True
                return
            self.wait += 1
            if self.wait >= self.patience:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            self.model.set_weights(self.best_weights if self.best_weights is not None else self.initial)

    return BestOnVal(patience, start)


def _time_limit(minutes: float):
    """A callback that stops training after the batch that ends past ``minutes`` from the start of training."""
    keras = import_keras()

    class TimeLimit(keras.callbacks.Callback):
        stopped = False

        def on_train_begin(self, logs=None):
            self.deadline = time.monotonic() + 60 * minutes

        def on_train_batch_end(self, batch, logs=None):
            if time.monotonic() > self.deadline:
                self.model.stop_training = self.stopped = True

    return TimeLimit()
