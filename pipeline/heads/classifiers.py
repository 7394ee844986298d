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
import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.core.errors import LayertapError
from pipeline.core.evaluation import check_two_classes, log_loss, score_predictions
from pipeline.core.runtime import import_keras

BUILTIN = ("logreg", "linsvm", "knn", "dense")
# C grids searched by cross-validation. A linear SVM past C=0.1 takes minutes to converge on
# standardised CNN features and scores no better (measured on flowers17, block4_pool).
DEFAULT_CS = {"logreg": (0.001, 0.01, 0.1, 1.0, 10.0), "linsvm": (0.0001, 0.001, 0.01, 0.1)}


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
        import_keras()  # loaded here, once, so that a fit time measures fitting and not TensorFlow's start-up
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


def train_one(store, X: np.ndarray, spec: str, splits: np.ndarray, seed: int = 0):
    """Fit one classifier on the train rows of one tap's features ``X``; score it on val (to choose) and test.

    Stage two runs this for every (tap, classifier); stage three for its probe where stage two has not
    run. Hyperparameters are chosen inside the train rows (C by stratified cross-validation); a
    classifier whose ``fit`` takes ``validation_data`` stops early on val. Val accuracy is what
    choices between models use; test accuracy is reported, never chosen on.

    Args:
        store: The :class:`pipeline.store.feature_store.FeatureStore` (labels, class names).
        splits: Each row's split (:func:`pipeline.store.splits.resolve_splits`).

    Returns:
        ``(estimator, metrics)``.
    """
    check_two_classes(store.class_names, str(store.path))
    y = store.labels
    train, val, test = (splits == "train"), (splits == "val"), (splits == "test")
    counts = np.bincount(y[train], minlength=len(store.class_names))
    if counts.min() == 0:
        missing = [store.class_names[i] for i in np.flatnonzero(counts == 0)]
        raise LayertapError(f"class {', '.join(missing)} has no training image in {store.path.name}")
    if not val.any():  # pipeline.store.splits.resolve_splits always gives val rows
        raise LayertapError(f"{store.path.name}: no val rows to choose on; split it with "
                            "pipeline.store.splits.resolve_splits")
    estimator = make_classifier(spec, cv_splits=int(min(3, counts.min())), seed=seed)
    started = time.perf_counter()
    if takes_validation_data(estimator):
        estimator.fit(X[train], y[train], validation_data=(X[val], y[val]))
    else:
        estimator.fit(X[train], y[train])
    fit_seconds = time.perf_counter() - started
    val_predicted = estimator.predict(X[val])
    probabilities = class_scores(estimator, X[test])
    metrics = {
        **score_predictions(y[test], estimator.predict(X[test]), store.class_names, probabilities),
        "val_accuracy": float((val_predicted == y[val]).mean()),
        "val_predictions": val_predicted.tolist(),
        "n_train": int(train.sum()), "n_val": int(val.sum()), "n_test": int(test.sum()),
        "fit_seconds": fit_seconds, "trainable_params": trainable_params(estimator),
        "chosen": describe(estimator),
    }
    return estimator, metrics


def class_scores(estimator, X) -> np.ndarray:
    """Class probabilities, or a softmax of decision scores for classifiers without them."""
    if hasattr(estimator, "predict_proba"):  # GridSearchCV and Pipeline hide it when the model lacks it
        return np.asarray(estimator.predict_proba(X))
    scores = np.asarray(estimator.decision_function(X), dtype=np.float64)
    if scores.ndim == 1:  # a binary classifier's one score z: softmax([-z/2, z/2]) = sigmoid(z)
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return scores / scores.sum(axis=1, keepdims=True)


def trainable_params(estimator) -> int:
    """Learned parameters of a fitted classifier (weights and biases; 0 for nearest neighbours).

    An estimator that counts its own parameters says so in ``trainable_params_``.
    """
    if hasattr(estimator, "trainable_params_"):
        return int(estimator.trainable_params_)
    if isinstance(estimator, GridSearchCV):
        return trainable_params(estimator.best_estimator_)
    if isinstance(estimator, Pipeline):
        return trainable_params(estimator.steps[-1][1])
    return int(sum(np.size(getattr(estimator, a)) for a in ("coef_", "intercept_") if hasattr(estimator, a)))


def describe(estimator) -> dict:
    """What was chosen while fitting (the C picked by cross-validation, epochs run).

    An estimator that reports its own choices says so in ``fit_summary_``.
    """
    if hasattr(estimator, "fit_summary_"):
        return dict(estimator.fit_summary_)
    if isinstance(estimator, GridSearchCV):
        return {k.split("__")[-1]: v for k, v in estimator.best_params_.items()} | {
            "cv_accuracy": float(estimator.best_score_)}
    return {}


def takes_validation_data(estimator) -> bool:
    """Whether ``estimator.fit`` accepts ``validation_data=(X_val, y_val)`` (to stop early on val)."""
    import inspect

    return "validation_data" in inspect.signature(estimator.fit).parameters


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


def probe_weights(estimator, X: np.ndarray | None = None, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One softmax layer equal to a fitted linear probe: ``(kernel (d, k), bias (k,))``, in float32.

    The probe is ``StandardScaler`` + ``LogisticRegression`` (stage two's ``logreg``) or + ``LinearSVC``
    (``linsvm``), possibly inside its ``GridSearchCV``. Standardisation folds into the layer:
    ``W' = W / sigma`` and ``b' = b - W' mu``; a binary probe's single score ``z`` becomes
    ``[-z/2, +z/2]``, whose softmax is the same sigmoid. A linear SVM's scores are not log-odds: given
    ``X, y`` (the train rows), they are divided by the temperature that fits them best, which keeps
    every prediction and gives phase 2 calibrated probabilities to start from; without them the layer is
    the softmax of its scores, as :func:`class_scores` (``layertap predict``) computes them.

    Raises:
        ValueError: the estimator is not such a probe.
    """
    from sklearn.linear_model import LogisticRegression

    fitted = estimator.best_estimator_ if isinstance(estimator, GridSearchCV) else estimator
    steps = dict(fitted.steps) if isinstance(fitted, Pipeline) else {}
    scaler, clf = steps.get("scale"), steps.get("clf")
    if not isinstance(scaler, StandardScaler) or not isinstance(clf, (LogisticRegression, LinearSVC)):
        raise ValueError(f"{type(estimator).__name__} is not a StandardScaler + LogisticRegression or LinearSVC "
                         "probe (stage two's logreg or linsvm); only such a probe folds into one softmax layer")
    mean = scaler.mean_ if scaler.with_mean else np.zeros(clf.coef_.shape[1])
    scale = scaler.scale_ if scaler.with_std else np.ones(clf.coef_.shape[1])
    kernel = clf.coef_ / scale
    bias = clf.intercept_ - kernel @ mean
    if len(clf.classes_) == 2:
        kernel, bias = np.vstack([-kernel / 2, kernel / 2]), np.concatenate([-bias / 2, bias / 2])
    if isinstance(clf, LinearSVC) and X is not None and y is not None:
        temperature = _fit_temperature(np.asarray(X, np.float64) @ kernel.T + bias, np.searchsorted(clf.classes_, y))
        kernel, bias = kernel / temperature, bias / temperature
    return kernel.T.astype(np.float32), bias.astype(np.float32)


def _fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 that minimises the cross-entropy of softmax(scores / T) on ``y``."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    def loss(log_t):
        return -log_softmax(scores / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean()

    return float(np.exp(minimize_scalar(loss, bounds=(-5.0, 5.0), method="bounded").x))


def build_probe_head(kernel: np.ndarray, bias: np.ndarray):
    """input -> Dense(k, softmax) with the given weights: a folded linear probe (:func:`probe_weights`)."""
    keras = import_keras()
    inputs = keras.Input((kernel.shape[0],), name="features")
    layer = keras.layers.Dense(kernel.shape[1], activation="softmax", name="softmax")
    model = keras.Model(inputs, layer(inputs), name="probe_head")
    layer.set_weights([kernel, bias])
    return model
