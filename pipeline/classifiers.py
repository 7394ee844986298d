"""Stage-two classifiers, all scikit-learn estimators.

Built in: ``logreg`` (the linear probe: standardised or L2-normalised features, C chosen
by stratified cross-validation on the training rows), ``linsvm`` (the same for a linear
SVM), ``knn`` (cosine k-nearest neighbours on standardised features) and ``dense`` (the tutorials' small Keras
head, wrapped by :class:`DenseHeadClassifier`). Any other classifier can be named by its
import path: ``sklearn.ensemble.RandomForestClassifier:{"n_estimators": 300}``.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

BUILTIN = ("logreg", "linsvm", "knn", "dense")
# C grids searched by cross-validation. A linear SVM past C=0.1 takes minutes to converge on
# standardised CNN features and scores no better (measured on flowers17, block4_pool).
DEFAULT_CS = {"logreg": (0.001, 0.01, 0.1, 1.0, 10.0), "linsvm": (0.0001, 0.001, 0.01, 0.1)}


def split_specs(text: str) -> list[str]:
    """Split ``a,b:{"x": 1, "y": 2},c`` on the commas outside JSON braces."""
    specs, depth, current = [], 0, ""
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            specs.append(current.strip())
            current = ""
        else:
            current += char
    specs.append(current.strip())
    return [s for s in specs if s]


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name[:{json params}]`` -> (name, params).

    Raises:
        ValueError: the parameters are not a JSON object.
    """
    name, _, params = spec.partition(":")
    try:
        parsed = json.loads(params) if params.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"classifier {spec!r}: parameters after ':' must be a JSON object ({exc})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"classifier {spec!r}: parameters after ':' must be a JSON object")
    return name.strip(), parsed


def make_classifier(spec: str, cv_splits: int = 3, seed: int = 0) -> BaseEstimator:
    """Build an unfitted classifier from a spec (see the module docstring).

    Args:
        spec: A builtin name or an import path, each optionally with ``:{json params}``.
        cv_splits: Folds of the stratified cross-validation that picks C.
        seed: Random state of every random choice.

    Raises:
        ValueError: an unknown name, bad parameters, or a class that is not a classifier.
    """
    name, params = parse_spec(spec)
    folds = StratifiedKFold(n_splits=max(2, cv_splits), shuffle=True, random_state=seed)
    if name in ("logreg", "linsvm"):
        from sklearn.linear_model import LogisticRegression

        normalize = params.pop("normalize", "standard")
        if normalize not in ("standard", "l2"):
            raise ValueError(f"classifier {name}: normalize={normalize!r} is not known; use standard or l2")
        cs = params.pop("Cs", DEFAULT_CS[name])
        scaler = StandardScaler() if normalize == "standard" else Normalizer()
        model = (LogisticRegression(max_iter=2000, **params) if name == "logreg"
                 else LinearSVC(dual="auto", max_iter=5000, random_state=seed, **params))
        pipeline = Pipeline([("scale", scaler), ("clf", model)])
        if "C" in params:
            return pipeline
        return GridSearchCV(pipeline, {"clf__C": list(cs)}, cv=folds, n_jobs=1)
    if name == "knn":
        return make_pipeline(StandardScaler(), Normalizer(), KNeighborsClassifier(**{"n_neighbors": 5, **params}))
    if name == "dense":
        return DenseHeadClassifier(**{"random_state": seed, **params})
    if "." not in name:
        raise ValueError(f"classifier {name!r} is not known; use one of: {', '.join(BUILTIN)}, or an import "
                         "path such as sklearn.ensemble.RandomForestClassifier[:{json params}]")
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"classifier {name!r} cannot be imported: {exc}") from None
    estimator = cls(**params)
    if not hasattr(estimator, "fit") or getattr(estimator, "_estimator_type", None) != "classifier" and \
            not isinstance(estimator, ClassifierMixin):
        raise ValueError(f"{name} is not a scikit-learn classifier")
    return estimator


def trainable_params(estimator) -> int:
    """Learned parameters of a fitted classifier (weights and biases; 0 for nearest neighbours)."""
    if isinstance(estimator, DenseHeadClassifier):
        return estimator.trainable_params_
    if isinstance(estimator, GridSearchCV):
        return trainable_params(estimator.best_estimator_)
    if isinstance(estimator, Pipeline):
        return trainable_params(estimator.steps[-1][1])
    return int(sum(np.size(getattr(estimator, a)) for a in ("coef_", "intercept_") if hasattr(estimator, a)))


def describe(estimator) -> dict:
    """What was chosen while fitting (the C picked by cross-validation, epochs run)."""
    if isinstance(estimator, GridSearchCV):
        return {k.split("__")[-1]: v for k, v in estimator.best_params_.items()} | {
            "cv_accuracy": float(estimator.best_score_)}
    if isinstance(estimator, DenseHeadClassifier):
        return {"epochs_run": estimator.n_iter_, "best_epoch": estimator.best_epoch_}
    return {}


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
        verbose: Keras's verbosity.
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
        import keras

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
        self.model_.compile(optimizer=keras.optimizers.Adam(self.learning_rate),
                            loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        callbacks = []
        if val is not None and self.patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.patience,
                                                           restore_best_weights=True))
        history = self.model_.fit(X, y_index, validation_data=val[:2] if val is not None else None,
                                  epochs=self.epochs, batch_size=self.batch_size, shuffle=True,
                                  callbacks=callbacks, verbose=self.verbose)
        self.history_ = {k: [float(v) for v in vs] for k, vs in history.history.items()}
        self.n_iter_ = len(history.epoch)
        losses = self.history_.get("val_loss") or self.history_["loss"]
        self.best_epoch_ = int(np.argmin(losses)) + 1
        self.trainable_params_ = _count_trainable(self.model_)
        return self

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
        # A direct call per chunk: Keras's predict() would trace a new function for each head and size.
        from keras import ops

        chunks = [ops.convert_to_numpy(self.model_(X[i:i + 4096], training=False)) for i in range(0, len(X), 4096)]
        return np.concatenate(chunks).astype(np.float64) if chunks else np.zeros((0, len(self.classes_)))

    def predict(self, X):
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

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
    import keras

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
