"""The tutorials' head, input -> Normalization -> Dense -> ReLU -> Dropout -> softmax, as a scikit-learn
classifier (stage two's ``dense``) and as the Keras model stage three can start from."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.core.evaluation import log_loss
from pipeline.core.runtime import import_keras


class DenseHeadClassifier(ClassifierMixin, BaseEstimator):
    """The tutorials' head, input -> Dense -> ReLU -> Dropout -> softmax, as a scikit-learn classifier.

    Features are standardised inside the Keras model (a Normalization layer), so the
    saved ``.keras`` file is the whole classifier. Training stops early on the
    validation loss and keeps the best weights.

    Args:
        hidden_units: Width of the hidden layer; 0 gives a softmax regression.
        dropout: Dropout rate after the hidden layer.
        learning_rate: Adam learning rate.
        epochs: Most epochs to train.
        batch_size: Rows per step.
        patience: Epochs without a better validation loss before stopping.
        validation_fraction: Share of the training rows held out for early stopping when
            ``fit`` gets no ``validation_data``; 0 trains for ``epochs`` on all rows.
        random_state: Seed for initialisation, dropout, shuffling and the hold-out split.
        verbose: Print each epoch's train and validation loss.
    """

    def __init__(self, hidden_units=256, dropout=0.5, learning_rate=1e-3, epochs=200, batch_size=32,
                 patience=10, validation_fraction=0.15, random_state=0, verbose=0):
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y, validation_data=None):
        """Train on ``X, y``; stop early on ``validation_data=(X_val, y_val)`` or a held-out share."""
        keras = import_keras()

        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"DenseHeadClassifier needs at least 2 classes, got 1 class: {self.classes_[0]!r}")
        keras.utils.set_random_seed(int(self.random_state))
        val = self._validation(X, y_index, validation_data)
        if val is not None and validation_data is None:
            X, y_index = val[2], val[3]
        self.model_ = build_dense_head(X.shape[1], len(self.classes_), X.mean(axis=0), X.var(axis=0),
                                       self.hidden_units, self.dropout)
        from pipeline.backbones.layers import crossentropy

        self.model_.compile(optimizer=keras.optimizers.Adam(self.learning_rate), loss=crossentropy)
        self.history_ = self._train(X, y_index.astype(np.int32), val)
        self.n_iter_ = len(self.history_["loss"])
        losses = self.history_.get("val_loss") or self.history_["loss"]
        self.best_epoch_ = int(np.argmin(losses)) + 1
        self.trainable_params_ = _count_trainable(self.model_)
        self.fit_summary_ = {"epochs_run": self.n_iter_, "best_epoch": self.best_epoch_}
        return self

    def _train(self, X, y, val) -> dict[str, list[float]]:
        """Mini-batch epochs with ``train_on_batch`` (one compiled step), early stopping on the val loss.

        Keras's ``fit`` costs about 0.2 s of set-up and callbacks per epoch, which on a few hundred
        rows is nearly all of the time (20-45 s for the demo's head); this loop does the same
        training (shuffled mini-batches, the best weights on val kept) in a fraction of it.
        """
        rng = np.random.default_rng(self.random_state)
        history: dict[str, list[float]] = {"loss": []}
        best, best_weights, waited = np.inf, None, 0
        for _ in range(self.epochs):
            order = rng.permutation(len(X))
            losses = [float(np.asarray(self.model_.train_on_batch(X[b], y[b])).ravel()[0]) * len(b)
                      for b in np.array_split(order, max(1, -(-len(X) // self.batch_size)))]
            history["loss"].append(sum(losses) / len(X))
            if val is None:
                continue
            loss = log_loss(self._probabilities(val[0]), val[1])
            history.setdefault("val_loss", []).append(loss)
            if self.verbose:
                print(f"epoch {len(history['loss'])}: loss {history['loss'][-1]:.4f}, val_loss {loss:.4f}")
            if loss < best:
                best, best_weights, waited = loss, self.model_.get_weights(), 0
            elif self.patience:
                waited += 1
                if waited >= self.patience:
                    break
        if best_weights is not None:
            self.model_.set_weights(best_weights)
        return history

    def _validation(self, X, y_index, validation_data):
        if validation_data is not None:
            X_val, y_val = validation_data
            X_val = validate_data(self, X_val, reset=False, dtype=np.float32)
            unknown = set(np.asarray(y_val).tolist()) - set(self.classes_.tolist())
            if unknown:
                raise ValueError(f"validation labels {sorted(unknown)} do not occur in the training labels")
            return X_val, np.searchsorted(self.classes_, y_val), X, y_index
        counts = np.bincount(y_index)
        if not self.validation_fraction or counts.min() < 2 or len(y_index) < 10:
            return None
        from sklearn.model_selection import train_test_split

        train, held = train_test_split(np.arange(len(y_index)), test_size=self.validation_fraction,
                                       stratify=y_index, random_state=self.random_state)
        return X[held], y_index[held], X[train], y_index[train]

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        return self._probabilities(X)

    def _probabilities(self, X) -> np.ndarray:
        # A direct call per chunk: Keras's predict() would trace a new function for each head and size.
        ops = import_keras().ops
        chunks = [ops.convert_to_numpy(self.model_(X[i:i + 4096], training=False)) for i in range(0, len(X), 4096)]
        return np.concatenate(chunks).astype(np.float64) if chunks else np.zeros((0, len(self.classes_)))

    def predict(self, X):
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def save_artifact(self, folder) -> tuple[str, str, dict]:
        """Save the Keras head as ``head.keras`` (loaded back in safe mode; no pickle)."""
        check_is_fitted(self)
        self.model_.save(folder / "head.keras")
        return "keras", "head.keras", {"params": self.get_params()}

    @classmethod
    def from_keras(cls, model, classes, params: dict) -> DenseHeadClassifier:
        """A fitted classifier around a loaded ``.keras`` head."""
        head = cls(**params)
        head.model_ = model
        head.classes_ = np.asarray(classes)
        head.n_features_in_ = int(model.input_shape[-1])
        head.trainable_params_ = _count_trainable(model)
        return head


def _count_trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def build_dense_head(n_features: int, n_classes: int, mean, variance, hidden_units: int = 256,
                     dropout: float = 0.5):
    """input -> Normalization -> Dense(hidden, relu) -> Dropout -> Dense(n_classes, softmax)."""
    keras = import_keras()
    inputs = keras.Input((n_features,), name="features")
    # A feature (nearly) constant in training would be scaled up enormously on a new image where
    # it fires (seen with dead-in-train ReLU channels): floor the variances at 1% of the median one.
    variance = np.asarray(variance, dtype=np.float64)
    floor = max(0.01 * float(np.median(variance)), 1e-12)
    x = keras.layers.Normalization(mean=mean, variance=np.maximum(variance, floor), name="standardise")(inputs)
    if hidden_units:
        x = keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="softmax")(x)
    return keras.Model(inputs, outputs, name="dense_head")
