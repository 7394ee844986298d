"""Classifier specs, and the Keras Dense head as a conforming scikit-learn estimator."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.core.settings import split_list
from pipeline.heads.classifiers import make_classifier, trainable_params
from pipeline.heads.dense import DenseHeadClassifier


def _float32_network(estimator) -> dict[str, str]:
    # The network computes in float32, and oneDNN's matrix kernels block rows differently for
    # another row order: probabilities then differ in the 8th digit, over this check's 1e-7.
    return {"check_methods_sample_order_invariance": "float32 matrix kernels depend on row order (~3e-8)"}


@parametrize_with_checks([DenseHeadClassifier(hidden_units=16, epochs=40, learning_rate=0.05, batch_size=32,
                                             validation_fraction=0)], expected_failed_checks=_float32_network)
def test_dense_head_is_a_scikit_learn_estimator(estimator, check):
    check(estimator)


def test_specs_split_outside_json_and_build():
    specs = split_list('logreg,knn:{"n_neighbors": 3, "weights": "distance"},sklearn.tree.DecisionTreeClassifier')
    assert specs == ("logreg", 'knn:{"n_neighbors": 3, "weights": "distance"}', "sklearn.tree.DecisionTreeClassifier")
    assert isinstance(make_classifier("logreg"), GridSearchCV)
    assert make_classifier(specs[1]).steps[-1][1].n_neighbors == 3
    assert make_classifier('sklearn.tree.DecisionTreeClassifier:{"max_depth": 2}').max_depth == 2


@pytest.mark.parametrize("spec,message", [
    ("forest", "classifier 'forest' is not known; use one of: logreg, linsvm, knn, dense"),
    ("logreg:{bad json}", "parameters after ':' must be a JSON object"),
    ("sklearn.nope.Thing", "cannot be imported"),
    ("sklearn.preprocessing.StandardScaler", "is not a scikit-learn classifier"),
    ('logreg:{"normalize": "minmax"}', "normalize='minmax' is not known; use standard or l2"),
])
def test_bad_specs_say_what_is_accepted(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_classifier(spec)


def test_dense_head_early_stops_on_validation_data_and_counts_parameters():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5)).astype("float32")
    y = np.where(X[:, 0] > 0, "yes", "no")
    head = DenseHeadClassifier(hidden_units=4, epochs=300, patience=3, learning_rate=0.05)
    head.fit(X[:40], y[:40], validation_data=(X[40:], y[40:]))
    assert head.n_iter_ < 300 and head.best_epoch_ <= head.n_iter_
    assert head.trainable_params_ == trainable_params(head) == 5 * 4 + 4 + 4 * 2 + 2
    assert (head.predict(X[40:]) == y[40:]).mean() > 0.8
    with pytest.raises(ValueError, match=r"validation labels \['maybe'\] do not occur"):
        head.fit(X[:40], y[:40], validation_data=(X[40:42], ["maybe", "yes"]))


@pytest.mark.parametrize("n_classes", [3, 2])
def test_probe_folds_into_one_softmax_layer_exactly(n_classes):
    """Stage three starts from stage two's probe: the folded Keras layer gives scikit-learn's probabilities."""
    from pipeline.heads.classifiers import build_probe_head, probe_weights

    rng = np.random.default_rng(n_classes)
    X = (rng.normal(size=(90, 12)) * rng.uniform(0.1, 30, 12) + rng.uniform(-5, 50, 12)).astype("float32")
    y = rng.integers(0, n_classes, 90)
    X[:, 0] += 3 * y  # something to learn
    probe = make_classifier("logreg").fit(X, y)
    kernel, bias = probe_weights(probe)
    assert kernel.shape == (12, n_classes) and bias.shape == (n_classes,)
    probabilities = build_probe_head(kernel, bias).predict_on_batch(X)
    np.testing.assert_allclose(probabilities, probe.predict_proba(X), atol=2e-6)
    assert (probabilities.argmax(axis=1) == probe.predict(X)).all()
    with pytest.raises(ValueError, match="only such a probe folds"):
        probe_weights(make_classifier("knn").fit(X, y))
    # a linear SVM folds with a temperature: the same predictions, probabilities fitted on the train rows
    svm = make_classifier("linsvm").fit(X, y)
    # without the train rows it folds as it is: the softmax of its scores, what predict (class_scores) gives
    from pipeline.heads.classifiers import class_scores

    np.testing.assert_allclose(build_probe_head(*probe_weights(svm)).predict_on_batch(X), class_scores(svm, X),
                               atol=2e-6)
    svm_probabilities = build_probe_head(*probe_weights(svm, X, y)).predict_on_batch(X)
    assert (svm_probabilities.argmax(axis=1) == svm.predict(X)).all()
    np.testing.assert_allclose(svm_probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_scores_of_a_classifier_without_probabilities_rank_its_own_prediction_first(n_classes):
    from pipeline.heads.classifiers import class_scores

    rng = np.random.default_rng(0)
    y = np.arange(60) % n_classes
    X = rng.normal(size=(60, 5)) + y[:, None]
    svm = make_classifier("linsvm").fit(X, y)
    assert not hasattr(svm, "predict_proba")  # predict takes its decision scores
    scores = class_scores(svm, X)
    np.testing.assert_array_equal(scores.argmax(axis=1), svm.predict(X))
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)


def test_scores_of_large_decisions_are_a_softmax_without_overflow():
    from pipeline.heads.classifiers import class_scores

    class Decisive:
        def decision_function(self, X):
            return np.array([[1000.0, 0.0, 999.0]])

    np.testing.assert_allclose(class_scores(Decisive(), None), [[1 / (1 + np.exp(-1)), 0, 1 / (1 + np.e)]], atol=1e-12)
