"""gpunn.sklearn: scikit-learn's own estimator checks, and the tools scikit-learn users combine them with."""
from __future__ import annotations

import numpy
import pytest

sklearn = pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install 'gpunn[sklearn]')")
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import gpunn  # noqa: E402
from gpunn.sklearn import MLPClassifier, MLPRegressor  # noqa: E402
from helpers import host, rng  # noqa: E402


@parametrize_with_checks([MLPClassifier(), MLPRegressor()])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def _digits():
    X, y = gpunn.datasets.load_digits()
    names = numpy.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    return X[:600], names[y[:600]]


def test_pipeline_cross_validation_and_grid_search_with_string_labels():
    X, y = _digits()
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,), max_iter=80,
                                                                  learning_rate_init=0.01, random_state=0))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.min() > 0.8, scores          # scikit-learn's own MLPClassifier: 0.84-0.90 here
    grid = GridSearchCV(MLPClassifier(max_iter=20, learning_rate_init=0.01, random_state=0),
                        {"hidden_layer_sizes": [(16,), (32,)], "activation": ["relu", "logistic"]}, cv=2)
    grid.fit(X, y)
    assert grid.best_score_ > 0.8 and set(grid.best_estimator_.classes_) == set(y)
    proba = grid.predict_proba(X[:5])
    numpy.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    assert list(grid.predict(X[:3])) == list(grid.classes_[proba[:3].argmax(axis=1)])


def test_the_estimator_trains_the_network_gpunn_would():
    """Same settings, same seed: the estimator's network is the one gpunn.fit produces directly."""
    X, y = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(20,), activation="tanh", solver="sgd", learning_rate_init=0.05,
                        momentum=0.5, nesterovs_momentum=False, alpha=0.0, batch_size=50, max_iter=3,
                        random_state=7).fit(X, y)
    seed = int(numpy.random.RandomState(7).randint(0, 2**31 - 1))
    net = gpunn.mlp([64, 20, 10], activation="tanh", output="softmax", device="cpu", dtype="float64", seed=seed)
    codes = numpy.searchsorted(clf.classes_, y)
    net.fit(X, codes, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.05, momentum=0.5), epochs=3, batch_size=50)
    numpy.testing.assert_array_equal(host(clf.model_.flat_parameters()), host(net.flat_parameters()))
    assert clf.n_iter_ == 3 and len(clf.loss_curve_) == 3


def test_binary_and_regression_outputs():
    g = rng(0)
    X = g.normal(size=(200, 3))
    y = numpy.where(X[:, 0] + X[:, 1] > 0, "yes", "no")
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=200, learning_rate_init=0.01, random_state=0).fit(X, y)
    assert clf.model_.layers[-1].n_out == 1 and clf.predict_proba(X).shape == (200, 2)
    assert clf.score(X, y) > 0.95
    Y = numpy.stack([X[:, 0] - 2 * X[:, 1], X[:, 2] ** 2], axis=1)
    reg = MLPRegressor(hidden_layer_sizes=(32,), max_iter=300, learning_rate_init=0.01, random_state=0).fit(X, Y)
    assert reg.predict(X).shape == (200, 2) and reg.score(X, Y) > 0.9
    assert MLPRegressor(max_iter=5, random_state=0).fit(X, Y[:, 0]).predict(X).shape == (200,)


@pytest.mark.parametrize("bad,match", [(dict(solver="lbfgs"), "solver"), (dict(hidden_layer_sizes=(0,)), "hidden"),
                                       (dict(activation="swish"), "activation"), (dict(max_iter=0), "max_iter")])
def test_bad_parameters_are_refused_at_fit(bad, match):
    X, y = _digits()
    with pytest.raises(ValueError, match=match):
        MLPClassifier(**bad).fit(X[:20], y[:20])
