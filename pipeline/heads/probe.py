"""``probe``: the linear probe for every C at once, trained in minibatches on the Keras backend (a GPU where
there is one), features streamed rather than held.

Softmax regression on standardised features, the objective scikit-learn's ``LogisticRegression`` minimises
divided by the number of rows: mean cross-entropy + ``||W||^2 / (2 C n)``. All the Cs of the grid train
together: one ``(K, D, classes)`` weight tensor, so an epoch reads the data once for all of them. Adam with a
cosine decay over the epochs, gradients written out (the problem is convex and its gradient is two matrix
products), seeded shuffles. C is chosen on the val rows (:func:`best_c`: the lowest val cross-entropy of the Cs
within a standard error of the best val accuracy); the chosen probe is kept folded into one ``(D, classes)``
kernel, standardisation included, so ``predict``, ``export`` and stage three's fold use it as they use ``logreg``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.core.evaluation import softmax
from pipeline.core.parallel import progress_bar
from pipeline.core.runtime import import_keras

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 3, 8))  # 8 log-spaced, as the sweep's grids
# Adam steps at least (epochs grow on small data). Chosen on val, flowers17 (816 train rows, hed-bsds500): 30
# steps of 1,024 rows gave val 0.520/0.632/0.505 on block3/4/5_pool; of three schedules with more steps
# (100 epochs of 256 at lr 0.01, 100 of 128 at 0.003, 200 of 128 at 0.01), 200 x 128 at 0.01 (1,400 steps)
# was best or tied on val on each tap: 0.569/0.672/0.569.
MIN_STEPS = 1500
MIN_EPOCHS = 5
# Rows per step when batch_size is None: 128 (the schedule above), growing with the training rows to
# 300 steps an epoch, at most 4,096: a step has a fixed cost on an eager backend, which bigger steps spread.
# Chosen on val, a synthetic store of 320k train rows x 1,024 (bench/NOTES.md, "Stage two at scale"): 5 epochs
# of 300 steps were as good on val as 8 of 200, in 30 s instead of 43.
SMALL_BATCH, BIG_BATCH, STEPS_PER_EPOCH = 128, 4096, 300
MODEL_FILE = "probe.npz"


class StreamedProbe(ClassifierMixin, BaseEstimator):
    """A scikit-learn classifier: the linear probe of every C in ``Cs`` trained at once, C chosen on val.

    Args:
        Cs: Inverse regularisation strengths, as scikit-learn's ``C``.
        epochs: Passes over the training rows; None: enough for :data:`MIN_STEPS` steps, at least
            :data:`MIN_EPOCHS`.
        batch_size: Rows per step; None: :data:`SMALL_BATCH`, growing with the training rows to
            :data:`STEPS_PER_EPOCH` steps an epoch, at most :data:`BIG_BATCH` (:meth:`rows_per_step`).
        learning_rate: Adam's peak step (cosine decay to zero over the epochs).
        random_state: Seed of the shuffles.
    """

    def __init__(self, Cs=DEFAULT_CS, epochs=None, batch_size=None, learning_rate=0.01, random_state=0):
        self.Cs = Cs
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.random_state = random_state

    def fit(self, X, y, validation_data=None):
        """Fit every C on ``X, y``; choose C on ``validation_data`` (else on the training rows)."""
        weights = self.every_c(X, y)
        X_val, y_val = validation_data if validation_data is not None else (X, y)
        y_val = np.searchsorted(self.classes_, np.asarray(y_val))
        scores, _ = val_scores(weights, [(np.asarray(X_val, np.float32), y_val)])
        self.keep_best(weights, scores, len(X), len(y_val))
        return self

    def every_c(self, X, y) -> list[tuple[np.ndarray, np.ndarray]]:
        """Train the probe of every C on ``X, y`` held in memory (sets ``classes_``): each C's ``(kernel,
        bias)``, as :func:`train_all_cs` gives them, before any is chosen."""
        X, y = np.asarray(X, np.float32), np.asarray(y)
        self.classes_, index = np.unique(y, return_inverse=True)
        mean, variance = X.mean(axis=0, dtype=np.float64), X.var(axis=0, dtype=np.float64)
        shift, inverse = standardiser(mean, variance)
        rng = np.random.default_rng(self.random_state)

        size = self.rows_per_step(len(X))

        def batches():
            order = rng.permutation(len(X))
            for start in range(0, len(X), size):
                rows = np.sort(order[start:start + size])
                yield (X[rows] - shift) * inverse, index[rows]

        return train_all_cs(batches, self.steps(len(X)), len(X), mean, variance, len(self.classes_), self.Cs,
                            self.learning_rate)

    def rows_per_step(self, n: int) -> int:
        """The batch size for ``n`` training rows."""
        return self.batch_size or int(np.clip(n // STEPS_PER_EPOCH, SMALL_BATCH, BIG_BATCH))

    def steps(self, n: int) -> int:
        """Adam steps for ``n`` training rows: ``epochs`` passes, or enough for :data:`MIN_STEPS`."""
        per_epoch = -(-n // self.rows_per_step(n))
        return per_epoch * (self.epochs or max(MIN_EPOCHS, -(-MIN_STEPS // per_epoch)))

    def keep_best(self, weights, scores, n: int, n_val: int) -> int:
        """Keep the C best on val (:func:`best_c`): ``weights`` and ``scores`` by C, as :func:`train_all_cs`
        and :func:`val_scores` give them, for ``n`` training and ``n_val`` val rows. Returns its index in ``Cs``."""
        best = best_c(scores, n_val)
        self.kernel_, self.bias_ = weights[best]
        self.fit_summary_ = {"C": float(self.Cs[best]), "steps": self.steps(n), "batch_size": self.rows_per_step(n),
                             "val_accuracy_by_C": [round(s[0], 4) for s in scores],
                             "val_loss_by_C": [round(s[1], 4) for s in scores]}
        self.trainable_params_ = int(self.kernel_.size + self.bias_.size)
        return best

    def predict_proba(self, X):
        return softmax(np.asarray(X, np.float32) @ self.kernel_ + self.bias_)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def save_artifact(self, folder: Path) -> tuple[str, str, dict]:
        """Arrays only (``np.load`` without pickles reads them back): no code in the model file."""
        buffer = io.BytesIO()
        np.savez(buffer, kernel=self.kernel_, bias=self.bias_, classes=self.classes_,
                 Cs=np.asarray(self.Cs, np.float64), chosen_C=np.float64(self.fit_summary_["C"]))
        (folder / MODEL_FILE).write_bytes(buffer.getvalue())
        return "probe", MODEL_FILE, {}

    @classmethod
    def load_artifact(cls, data: bytes) -> StreamedProbe:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            probe = cls(Cs=tuple(arrays["Cs"].tolist()))
            probe.kernel_, probe.bias_, probe.classes_ = arrays["kernel"], arrays["bias"], arrays["classes"]
            probe.fit_summary_ = {"C": float(arrays["chosen_C"])}
        probe.trainable_params_ = int(probe.kernel_.size + probe.bias_.size)
        return probe


def standardiser(mean, variance) -> tuple[np.ndarray, np.ndarray]:
    """``(shift, inverse scale)`` in float32: standardised features are ``(x - shift) * inverse``."""
    return np.asarray(mean, np.float32), (1.0 / feature_scale(variance)).astype(np.float32)


def feature_scale(variance) -> np.ndarray:
    """Each feature's standard deviation in float64, floored so that a constant feature divides by 1e-6: what
    :func:`standardiser` divides by and :func:`train_all_cs` folds back into the kernels."""
    return np.sqrt(np.maximum(np.asarray(variance, np.float64), 1e-12))


def train_all_cs(batches, steps: int, n: int, mean, variance, n_classes: int, Cs,
                 learning_rate: float, progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train the probe of each C on standardised features, all together, for ``steps`` Adam steps; each call
    of ``batches()`` yields one epoch of ``(standardised features, class indices)`` over the ``n`` training rows
    (:func:`standardiser` with ``mean`` and ``variance``; from memory, or from a store by
    :class:`pipeline.classification.streamed.ShuffledEpochs`, which standardises them where it reads them).

    Returns:
        Each C's ``(kernel (D, classes), bias (classes,))``, folded back to raw features.
    """
    keras = import_keras()
    ops = keras.ops
    scale = feature_scale(variance)
    k, dims = len(Cs), len(scale)
    # Every C's kernel side by side, (D, K * classes): a step is two plain matrix products over the batch
    # (an einsum over a (K, D, classes) tensor broadcast the batch K times on TensorFlow). The features' gradient
    # x^T @ error is computed as (error^T @ x)^T: only the small matrices are transposed, never the batch.
    decay = ops.convert_to_tensor(np.repeat(1.0 / (np.asarray(Cs, np.float64) * n), n_classes), "float32")
    params = [ops.zeros((dims, k * n_classes)), ops.zeros((k * n_classes,))]
    moments = [[ops.zeros_like(p), ops.zeros_like(p)] for p in params]
    step, beta1, beta2, eps = 0, 0.9, 0.999, 1e-8
    ticks = iter(progress_bar(range(steps), steps, f"probe, {k} Cs", progress, unit="step"))
    while step < steps:
        for features, labels in batches():
            if step == steps:
                break
            x = ops.convert_to_tensor(features, "float32")
            onehot = ops.one_hot(ops.convert_to_tensor(labels, "int32"), n_classes)[:, None, :]
            logits = ops.reshape(ops.matmul(x, params[0]) + params[1], (-1, k, n_classes))
            error = ops.reshape((ops.softmax(logits, axis=-1) - onehot) / len(features), (-1, k * n_classes))
            grads = [ops.transpose(ops.matmul(ops.transpose(error), x)) + decay * params[0], ops.sum(error, axis=0)]
            step += 1
            next(ticks)
            rate = learning_rate * 0.5 * (1 + np.cos(np.pi * (step - 1) / steps))
            for p, g, m in zip(range(2), grads, moments):
                m[0] = beta1 * m[0] + (1 - beta1) * g
                m[1] = beta2 * m[1] + (1 - beta2) * g * g
                update = (m[0] / (1 - beta1 ** step)) / (ops.sqrt(m[1] / (1 - beta2 ** step)) + eps)
                params[p] = params[p] - rate * update
    next(ticks, None)  # the bar's end: it closes
    kernels = np.asarray(ops.convert_to_numpy(params[0]), np.float64).reshape(dims, k, n_classes).transpose(1, 0, 2)
    kernels = kernels / scale[None, :, None]
    biases = np.asarray(ops.convert_to_numpy(params[1]), np.float64).reshape(k, n_classes)
    biases = biases - np.einsum("d,kdc->kc", mean, kernels)
    return [(kernels[i].astype(np.float32), biases[i].astype(np.float32)) for i in range(k)]


def best_c(scores, n_val: int) -> int:
    """The index of the C best on val, from ``scores`` (``(accuracy, mean cross-entropy)`` by C) over ``n_val``
    rows: of the Cs whose val accuracy is within one binomial standard error of the best, the lowest
    cross-entropy. Accuracy decides where the val rows resolve it (40k rows: 0.2 points); where they cannot (204
    images: 3 points, and accuracy moves in steps of 0.5) the cross-entropy, a proper score that every image
    moves, does. Chosen against "accuracy, then loss" and "loss" by ``make bench-c-rule`` on train and val rows
    only (bench/NOTES.md, "Which rule chooses the probe's C")."""
    best = max(accuracy for accuracy, _ in scores)
    band = [k for k, (accuracy, _) in enumerate(scores) if accuracy >= best - np.sqrt(best * (1 - best) / n_val)]
    return min(band, key=lambda k: scores[k][1])


class LinearOutputs:
    """Each C's outputs on a batch, from one matrix product for all of ``weights`` (each C's ``(kernel, bias)``)
    on the Keras backend (a GPU where there is one); only the small results come back to the host."""

    def __init__(self, weights):
        ops = self.ops = import_keras().ops
        self.k, self.n_classes = len(weights), len(weights[0][1])
        self.kernel = ops.convert_to_tensor(np.concatenate([w for w, _ in weights], axis=1), "float32")
        self.bias = ops.convert_to_tensor(np.concatenate([b for _, b in weights]), "float32")

    def __call__(self, X, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(predicted class, its log-probability, the true class's log-probability)``, each ``(rows, K)``, for
        ``X`` and its class indices ``y``."""
        ops = self.ops
        logits = ops.matmul(ops.convert_to_tensor(X, "float32"), self.kernel) + self.bias
        log_p = ops.log_softmax(ops.reshape(logits, (-1, self.k, self.n_classes)), axis=-1)
        onehot = ops.one_hot(ops.convert_to_tensor(y, "int32"), self.n_classes)[:, None, :]
        return tuple(np.asarray(ops.convert_to_numpy(a)) for a in (
            ops.argmax(log_p, axis=-1), ops.max(log_p, axis=-1), ops.sum(log_p * onehot, axis=-1)))


def val_scores(weights, batches) -> tuple[list[tuple[float, float]], np.ndarray]:
    """Each C's ``(accuracy, mean cross-entropy)`` over ``batches`` of ``(features, class indices)``, read once,
    and each C's predicted classes, ``(rows, K)``."""
    outputs = LinearOutputs(weights)
    correct, loss, predicted = np.zeros(len(weights)), np.zeros(len(weights)), []
    for X, y in batches:
        classes, _, true_log_p = outputs(X, y)
        correct += (classes == np.asarray(y)[:, None]).sum(axis=0)
        loss -= true_log_p.astype(np.float64).sum(axis=0)
        predicted.append(classes.astype(np.int32, copy=False))  # half of int64's bytes: 400k val rows x 8 Cs
    n = sum(len(p) for p in predicted)
    predicted = np.concatenate(predicted) if predicted else np.zeros((0, len(weights)), np.int32)
    return [(float(c / max(n, 1)), float(v / max(n, 1))) for c, v in zip(correct, loss)], predicted
