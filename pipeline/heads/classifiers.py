"""Stage-two classifiers, all scikit-learn estimators.

Built in: ``logreg`` (the linear probe: standardised or L2-normalised features, C chosen
by stratified cross-validation on the training rows), ``linsvm`` (the same for a linear
SVM), ``knn`` (cosine k-nearest neighbours on standardised features), ``dense`` (the tutorials' small Keras
head, :class:`pipeline.heads.dense.DenseHeadClassifier`) and ``probe`` (the linear probe of 8 Cs at once in minibatches
on the Keras backend, C chosen on val: :mod:`pipeline.heads.probe`). Any other classifier can be named by its
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

from pipeline.core.errors import LayertapError
from pipeline.core.evaluation import check_two_classes, score_predictions, softmax
from pipeline.core.runtime import import_keras
from pipeline.heads.dense import DenseHeadClassifier

BUILTIN = ("logreg", "linsvm", "knn", "dense", "probe")
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
    if name == "probe":
        from pipeline.heads.probe import StreamedProbe

        return StreamedProbe(**{"random_state": seed, **params})
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


def train_one(store, X: np.ndarray, spec: str, splits, seed: int = 0):
    """Fit one classifier on the train rows of one tap's features ``X``; score it on val (to choose) and test.

    Stage two runs this for every (tap, classifier); stage three for its probe where stage two has not
    run. Hyperparameters are chosen inside the train rows (C by stratified cross-validation); a
    classifier whose ``fit`` takes ``validation_data`` stops early on val. Val accuracy is what
    choices between models use; test accuracy is reported, never chosen on.

    Args:
        store: The :class:`pipeline.store.feature_store.FeatureStore` (labels, class names).
        splits: Each row's split, as :func:`pipeline.store.splits.resolve_splits` gives it (a
            :class:`pipeline.store.splits.Splits`): ``splits == "train"`` is the mask of the train rows.

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
    name = parse_spec(spec)[0]  # a fix below is a spec of the same classifier
    if isinstance(estimator, GridSearchCV) and counts.min() < 2:
        few = [store.class_names[i] for i in np.flatnonzero(counts < 2)]
        raise LayertapError(f"{spec} chooses C by cross-validation on the train rows, which takes 2 train images a "
                            f"class; {store.path.name} has 1 of {', '.join(few)}: add images, give a split (or a "
                            f"smaller --test-fraction / --val-fraction) with more train images, fix C "
                            f"({name}:{{\"C\": 1}}), or use probe (C chosen on val)")
    neighbours = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    if getattr(neighbours, "n_neighbors", 0) > train.sum():
        raise LayertapError(f"{spec} votes among the {neighbours.n_neighbors} nearest train images; "
                            f"{store.path.name} has {int(train.sum())}: add images, give a split with more train "
                            f"images, or fewer neighbours ({name}:{{\"n_neighbors\": {int(train.sum())}}})")
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
        "val_predictions": val_predicted,
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
    return softmax(scores)


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

    if hasattr(estimator, "kernel_") and hasattr(estimator, "bias_"):  # the streamed probe: kept folded
        return np.asarray(estimator.kernel_, np.float32), np.asarray(estimator.bias_, np.float32)
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
