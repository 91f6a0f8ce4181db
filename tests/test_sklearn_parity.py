"""gpunn.sklearn against scikit-learn's own MLPClassifier/MLPRegressor on the same settings."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy
import pytest

sklearn = pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install 'gpunn[sklearn]')")
from sklearn import neural_network as sk  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.utils import check_random_state  # noqa: E402
from sklearn.utils.validation import has_fit_parameter  # noqa: E402

import gpunn  # noqa: E402
from gpunn.sklearn import MLPClassifier, MLPRegressor  # noqa: E402
from helpers import child_env, host, rng  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    X, y = gpunn.datasets.load_digits()
    return X[:400], y[:400]


def _both(cls_sk, cls_gn, X, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cls_sk(**kw).fit(X, y), cls_gn(**kw).fit(X, y)


def _squares(est):
    return sum(float((w ** 2).sum()) for w in est.coefs_)


@pytest.mark.parametrize("alpha", [1.0, 10.0])
def test_alpha_is_scikit_learns_l2_term_weights_and_loss(digits, alpha):
    """With a large alpha the weights' size is set by the penalty, not by the start: the two must agree (the
    old alpha/n_samples scaling left gpunn's weights 8x too free here)."""
    X, y = digits
    a, b = _both(sk.MLPClassifier, MLPClassifier, X, y, hidden_layer_sizes=(16,), alpha=alpha, solver="sgd",
                 learning_rate_init=0.05, momentum=0.9, batch_size=50, max_iter=60, tol=0.0,
                 n_iter_no_change=1000, random_state=0)
    assert _squares(b) == pytest.approx(_squares(a), rel=0.1)
    assert b.loss_ == pytest.approx(a.loss_, rel=0.1)            # loss_curve_ includes the L2 term
    assert [w.shape for w in b.coefs_] == [w.shape for w in a.coefs_]
    assert [c.shape for c in b.intercepts_] == [c.shape for c in a.intercepts_]
    assert all(type(w) is numpy.ndarray for w in b.coefs_ + b.intercepts_)


def test_multi_output_regression_loss_is_scikit_learns():
    """scikit-learn reports ½·mean over outputs but steps along the gradient of ½·sum (gpunn's eq 12): the
    loss curves must agree for three outputs as they do for one (the starting weights differ, so loosely)."""
    g = rng(0)
    X = g.normal(size=(300, 5))
    Y = numpy.stack([X[:, 0] - X[:, 1], 0.5 * X[:, 2] * X[:, 3], X[:, 4]], axis=1)
    for k in (1, 3):
        a, b = _both(sk.MLPRegressor, MLPRegressor, X, Y[:, :k], hidden_layer_sizes=(32,), solver="sgd",
                     learning_rate_init=0.01, alpha=0.01, max_iter=150, tol=0.0, n_iter_no_change=1000,
                     random_state=0)
        assert 0.5 < b.loss_ / a.loss_ < 2.0, (k, a.loss_, b.loss_)


@pytest.mark.parametrize("early_stopping", [False, True])
def test_the_stopping_rule_is_scikit_learns_greater_than(digits, early_stopping):
    """tol so large that nothing after the first epoch improves: stop when the count exceeds n_iter_no_change,
    i.e. after 1 + (n_iter_no_change + 1) epochs, exactly as scikit-learn."""
    X, y = digits
    a, b = _both(sk.MLPClassifier, MLPClassifier, X, y, hidden_layer_sizes=(8,), early_stopping=early_stopping,
                 tol=50.0, n_iter_no_change=3, max_iter=100, random_state=0)
    assert a.n_iter_ == b.n_iter_ == 5


def test_adaptive_learning_rate_divides_by_five_until_1e_6_as_scikit_learn(digits):
    X, y = digits
    a, b = _both(sk.MLPClassifier, MLPClassifier, X, y, hidden_layer_sizes=(8,), solver="sgd",
                 learning_rate="adaptive", learning_rate_init=0.1, tol=100.0, n_iter_no_change=1, max_iter=100,
                 random_state=0)
    assert a.n_iter_ == b.n_iter_ == 19


def test_early_stopping_iterations_are_scikit_learns_order(digits):
    X, y = digits
    for seed in range(2):
        a, b = _both(sk.MLPClassifier, MLPClassifier, X, y, hidden_layer_sizes=(32,), early_stopping=True,
                     n_iter_no_change=5, learning_rate_init=0.01, max_iter=300, random_state=seed)
        assert b.n_iter_ < 300 and 0.5 * a.n_iter_ <= b.n_iter_ <= 2 * a.n_iter_, (a.n_iter_, b.n_iter_)
        assert abs(b.best_validation_score_ - a.best_validation_score_) <= 0.1


def test_early_stopping_restores_the_best_weights_of_a_stratified_split(digits):
    X, y = digits
    clf = MLPClassifier(hidden_layer_sizes=(16,), early_stopping=True, validation_fraction=0.2,
                        n_iter_no_change=4, learning_rate_init=0.05, max_iter=200, random_state=3).fit(X, y)
    assert clf.best_loss_ is None and len(clf.validation_scores_) == clf.n_iter_ == len(clf.loss_curve_)
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    assert clf.validation_scores_[-1] < clf.best_validation_score_ or clf.n_iter_ == 200
    rs = check_random_state(3)
    rs.randint(0, 2**31 - 1)                       # the draw that seeds the network comes first
    _, Xval, _, yval = train_test_split(X, y, test_size=0.2, random_state=rs, stratify=y)
    assert numpy.bincount(yval, minlength=10).min() >= numpy.bincount(y).min() * 0.2 - 1   # every class there
    assert clf.score(Xval, yval) == clf.best_validation_score_
    plain = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, random_state=3)
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(3\) reached"):
        plain.fit(X, y)
    assert plain.validation_scores_ is None and plain.best_validation_score_ is None
    assert plain.best_loss_ == min(plain.loss_curve_)


def test_partial_fit_needs_classes_first_and_equals_fit_epoch_by_epoch(digits):
    X, y = digits
    kw = dict(hidden_layer_sizes=(8,), solver="sgd", learning_rate_init=0.05, batch_size=40, random_state=1)
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        MLPClassifier(**kw).partial_fit(X, y)
    inc = MLPClassifier(**kw)
    inc.partial_fit(X[:200], y[:200], classes=numpy.arange(10))
    assert inc.n_iter_ == 1 and inc.t_ == 200 and list(inc.classes_) == list(range(10))
    inc.partial_fit(X[:200], y[:200])
    with pytest.raises(ValueError, match="is not the same as on last call"):
        inc.partial_fit(X[:200], y[:200], classes=numpy.arange(9))
    with pytest.warns(ConvergenceWarning):
        full = MLPClassifier(**kw, max_iter=2).fit(X[:200], y[:200])
    for w1, w2 in zip(inc.coefs_, full.coefs_):
        numpy.testing.assert_array_equal(w1, w2)
    assert inc.t_ == full.t_ == 400
    with pytest.raises(ValueError, match="early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X, y, classes=numpy.arange(10))
    reg = MLPRegressor(hidden_layer_sizes=(8,), random_state=0).partial_fit(X, y.astype(float))
    assert reg.n_iter_ == 1 and reg.predict(X[:3]).shape == (3,)


def test_warm_start_goes_on_from_the_weights(digits):
    X, y = digits
    kw = dict(hidden_layer_sizes=(8,), learning_rate_init=0.01, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(**kw, max_iter=5, warm_start=True).fit(X, y)
        before = [w.copy() for w in clf.coefs_]
        clf.set_params(max_iter=3).fit(X, y)
        cold = MLPClassifier(**kw, max_iter=3).fit(X, y)
    assert len(clf.loss_curve_) == 8 and clf.n_iter_ == 3
    assert clf.loss_curve_[5] < clf.loss_curve_[0] and clf.loss_curve_[5] < cold.loss_curve_[0]
    assert not numpy.array_equal(before[0], clf.coefs_[0])


@pytest.mark.parametrize("bad", [dict(learning_rate="cyclic"), dict(solver="lbfgs"), dict(alpha=-1.0),
                                 dict(tol=-1.0), dict(momentum=1.5)])
def test_bad_settings_are_scikit_learns_invalid_parameter_error(digits, bad):
    from sklearn.utils._param_validation import InvalidParameterError
    X, y = digits
    with pytest.raises(InvalidParameterError):
        MLPClassifier(**bad).fit(X[:20], y[:20])


def test_invscaling_runs_and_sample_weight_is_not_a_fit_parameter(digits):
    X, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(8,), solver="sgd", learning_rate="invscaling", power_t=0.25,
                            learning_rate_init=0.5, max_iter=4, random_state=0).fit(X, y)
    assert clf.n_iter_ == 4 and numpy.isfinite(clf.loss_)
    assert not has_fit_parameter(MLPClassifier(), "sample_weight")
    with pytest.raises(TypeError, match="sample_weight"):
        MLPClassifier().fit(X, y, sample_weight=numpy.ones(len(y)))


def test_coefs_are_host_copies_of_the_network(digits):
    X, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, y)
    numpy.testing.assert_array_equal(clf.coefs_[0], host(clf.model_.layers[0].W))
    assert clf.n_layers_ == 3 and clf.n_outputs_ == 10 and clf.out_activation_ == "softmax"


def test_import_without_scikit_learn_names_the_extra():
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "try:\n    import gpunn.sklearn\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env())
    assert "pip install 'gpunn[sklearn]'" in r.stdout, r.stdout + r.stderr
