"""scikit-learn estimators over :class:`gpunn.Sequential`: :class:`MLPClassifier` and :class:`MLPRegressor`.

They take scikit-learn's MLP parameters (``hidden_layer_sizes``, ``activation``, ``solver``, ``alpha``,
``batch_size``, ``learning_rate``, ``learning_rate_init``, ``power_t``, ``max_iter``, ``shuffle``,
``random_state``, ``tol``, ``verbose``, ``warm_start``, ``momentum``, ``nesterovs_momentum``,
``early_stopping``, ``validation_fraction``, ``beta_1``, ``beta_2``, ``epsilon``, ``n_iter_no_change``),
validated by scikit-learn's own machinery (so a bad value is its ``InvalidParameterError``, a ``ValueError``),
plus ``device`` and ``dtype``; they pass :func:`sklearn.utils.estimator_checks.check_estimator`, so they work
in ``Pipeline``, ``cross_val_score`` and ``GridSearchCV``. Needs the extra: ``pip install 'gpunn[sklearn]'``.

What matches scikit-learn's ``MLPClassifier``/``MLPRegressor`` (``sklearn/neural_network``):

- ``alpha`` is its L2 term: ``alpha/2·Σ‖W‖²`` per batch divided by the batch size, i.e. weight decay
  ``alpha / batch_size`` on the weights (not the biases) at every step; ``loss_curve_`` includes the term.
- Stopping: a loss that is not below ``best_loss_ − tol`` (or, with ``early_stopping=True``, a validation
  score not above ``best_validation_score_ + tol``) counts as no improvement; training stops once the
  count *exceeds* ``n_iter_no_change``. ``early_stopping`` holds out ``validation_fraction`` of the data
  (stratified for classifiers), scores it (accuracy, R²) after every epoch into ``validation_scores_`` and
  restores the weights of ``best_validation_score_``. Reaching ``max_iter`` warns ``ConvergenceWarning``.
- ``learning_rate`` (``"sgd"`` only, as there): ``"constant"``, ``"invscaling"`` (η = η₀ / (t + 1)^power_t
  after each epoch, t the samples seen) and ``"adaptive"`` (η / 5 instead of stopping, until η ≤ 1e-6).
- ``partial_fit`` (one epoch; the classifier needs ``classes=`` on the first call) and ``warm_start``
  (``fit`` goes on from the current weights, with a fresh optimiser, as there).
- Fitted state in trailing-underscore attributes: ``coefs_``/``intercepts_`` (host NumPy copies, W of shape
  (n_in, n_out)), ``n_iter_``, ``t_``, ``loss_``, ``loss_curve_``, ``best_loss_``, ``validation_scores_``,
  ``best_validation_score_``, ``n_layers_``, ``n_outputs_``, ``out_activation_``, ``classes_``, and
  ``model_`` (the :class:`gpunn.Sequential`).

Differences: no ``"lbfgs"`` solver; no ``sample_weight`` (gpunn's losses are unweighted, so ``fit`` has no such
parameter and scikit-learn's tools see that, as for any estimator without it); weights start from gpunn's
initialisers, not Glorot-uniform; the last, shorter batch of an epoch gets the same decay ``alpha/batch_size``
as the others; Adam adds ε to √v̂ (PyTorch's convention) where scikit-learn adds it to √v; ``activation`` also
takes gpunn's names (``"leaky_relu"``, ``"elu"``, ``"softplus"``, ``"sigmoid"``). A regressor's ``loss_curve_``
is scikit-learn's: gpunn's squared error (eq 12, ½Σ over the outputs) divided by the number of outputs, while
the gradient, in both, is that of the sum.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import LabelEncoder
    from sklearn.utils import check_random_state
    from sklearn.utils._param_validation import Interval, Options, StrOptions
    from sklearn.utils.multiclass import check_classification_targets, unique_labels
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:                              # pragma: no cover - exercised in a subprocess
    raise ImportError("gpunn.sklearn needs scikit-learn: pip install 'gpunn[sklearn]' "
                      f"({exc})") from exc

import numpy

from . import activations, datasets, optim
from .backend import to_host
from .network import mlp
from .scalars import integer, real

__all__ = ["MLPClassifier", "MLPRegressor"]

_ACTIVATION_NAMES = {"logistic": "sigmoid"}
_OUT_NAMES = {"sigmoid": "logistic", "softmax": "softmax", "identity": "identity"}


class _BaseMLP(BaseEstimator):
    _parameter_constraints: dict = {
        "hidden_layer_sizes": ["array-like", Interval(numbers.Integral, 1, None, closed="left")],
        "activation": [StrOptions({"identity", "logistic", "tanh", "relu", *activations.names()} - {"softmax"})],
        "solver": [StrOptions({"sgd", "adam"})],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"constant", "invscaling", "adaptive"})],
        "learning_rate_init": [Interval(numbers.Real, 0, None, closed="neither")],
        "power_t": [Interval(numbers.Real, 0, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "momentum": [Interval(numbers.Real, 0, 1, closed="left")],
        "nesterovs_momentum": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "beta_1": [Interval(numbers.Real, 0, 1, closed="left")],
        "beta_2": [Interval(numbers.Real, 0, 1, closed="left")],
        "epsilon": [Interval(numbers.Real, 0, None, closed="neither")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left"), Options(numbers.Real, {numpy.inf})],
        "device": [str],
        "dtype": [StrOptions({"float32", "float64"})],
    }

    def __init__(self, hidden_layer_sizes: Any = (100,), activation: str = "relu", *, solver: str = "adam",
                 alpha: float = 0.0001, batch_size: Any = "auto", learning_rate: str = "constant",
                 learning_rate_init: float = 0.001, power_t: float = 0.5, max_iter: int = 200, shuffle: bool = True,
                 random_state: Any = None, tol: float = 1e-4, verbose: bool = False, warm_start: bool = False,
                 momentum: float = 0.9, nesterovs_momentum: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 n_iter_no_change: int = 10, device: str = "cpu", dtype: str = "float64"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.dtype = dtype

    # -- what the two estimators differ in -------------------------------------------------------
    _output: str
    _loss: str

    def _targets(self, y: numpy.ndarray, first: bool) -> numpy.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _score_for_stopping(self, X: numpy.ndarray, y: numpy.ndarray) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- fit -------------------------------------------------------------------------------------
    def _hidden(self) -> list[int]:
        given = self.hidden_layer_sizes
        sizes: list[Any] = [given] if isinstance(given, numbers.Integral) else list(given)
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, numpy.bool_)) and int(s) >= 1
                   for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {self.hidden_layer_sizes!r}.")
        return [int(s) for s in sizes]

    def fit(self, X: Any, y: Any) -> _BaseMLP:
        """Train on (X, y) for up to ``max_iter`` epochs (from the current weights with ``warm_start``)."""
        self._validate_params()
        return self._fit(X, y, incremental=False)

    def _gpunn_rule(self) -> None:
        """What scikit-learn's parameter validation lets through and gpunn's one rule (:mod:`gpunn.scalars`)
        refuses: bools as numbers, non-finite or oversized numbers (``alpha=10**400``); a ConfigError (a
        ValueError) naming the parameter. ``n_iter_no_change=numpy.inf`` stays allowed, as in scikit-learn."""
        for name in ("alpha", "learning_rate_init", "power_t", "tol", "momentum", "validation_fraction", "beta_1",
                     "beta_2", "epsilon"):
            real(name, getattr(self, name))
        integer("max_iter", self.max_iter)
        if not isinstance(self.batch_size, str):
            integer("batch_size", self.batch_size)
        if self.n_iter_no_change != numpy.inf:
            integer("n_iter_no_change", self.n_iter_no_change)

    def _fit(self, X: Any, y: Any, incremental: bool) -> _BaseMLP:
        self._gpunn_rule()
        hidden = self._hidden()
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        first = not hasattr(self, "model_") or not (self.warm_start or incremental)
        X, y = validate_data(self, X, y, dtype=numpy.dtype(self.dtype), multi_output=self._multi_output,
                             y_numeric=not isinstance(self, ClassifierMixin), reset=first)
        self._incremental = incremental
        T = self._targets(y, first)
        if first:
            self._initialize(X.shape[1], hidden, T.shape[1])
        elif T.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {T.shape[1]} outputs but the fitted network has {self.n_outputs_}")
        Xfit, Tfit, Xval, yval = self._split(X, T, y)
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer = self._new_optimizer(Xfit.shape[0])
        self._epochs(Xfit, Tfit, Xval, yval, incremental)
        self._publish()
        return self

    def _initialize(self, n_in: int, hidden: list[int], n_out: int) -> None:
        rs = check_random_state(self.random_state)
        seed = int(rs.randint(0, 2**31 - 1))
        self._random_state = rs
        act = _ACTIVATION_NAMES.get(self.activation, self.activation)
        self.model_ = mlp([n_in, *hidden, n_out], activation=act, output=self._output, device=self.device,
                          dtype=self.dtype, seed=seed)
        self.n_iter_, self.t_, self._no_improvement_count = 0, 0, 0
        self.loss_curve_: list[float] = []
        self.n_layers_, self.n_outputs_ = len(hidden) + 2, n_out
        self.out_activation_ = _OUT_NAMES[self._output]
        if self.early_stopping:
            self.validation_scores_: list[float] | None = []
            self.best_validation_score_: float | None = -numpy.inf
            self.best_loss_: float | None = None
        else:
            self.validation_scores_, self.best_validation_score_, self.best_loss_ = None, None, numpy.inf
        self._best_params: numpy.ndarray | None = None

    def _batch(self, n: int) -> int:
        return min(200, n) if self.batch_size == "auto" else int(min(max(self.batch_size, 1), n))

    def _new_optimizer(self, n_samples: int) -> optim.Optimizer:
        """scikit-learn's update as a gpunn optimiser: its gradient (δ = y − t at the output, so for a regressor
        the gradient of gpunn's ½Σ over outputs, eq 12) plus the decay alpha/batch on the weights."""
        decay = self.alpha / self._batch(n_samples)
        self._lr = float(self.learning_rate_init)
        if self.solver == "sgd":
            return optim.SGD(lr=self._lr, momentum=self.momentum,
                             nesterov=bool(self.nesterovs_momentum and self.momentum > 0), weight_decay=decay)
        return optim.Adam(lr=self._lr, betas=(self.beta_1, self.beta_2), eps=self.epsilon, weight_decay=decay)

    def _loss_scale(self) -> int:
        """scikit-learn reports a regressor's squared error averaged over the outputs too (its gradient is
        that of the sum, as gpunn's): the divisor from gpunn's loss to its ``loss_curve_``."""
        return 1 if isinstance(self, ClassifierMixin) else int(self.n_outputs_)

    def _split(self, X: numpy.ndarray, T: numpy.ndarray, y: numpy.ndarray) -> tuple:
        """(X_fit, T_fit, X_val, y_val): scikit-learn's hold-out with early stopping (stratified for classifiers
        where every class has two samples), else everything and no validation set."""
        if not self.early_stopping:
            return X, T, None, None
        stratify = None
        if isinstance(self, ClassifierMixin):
            _, counts = numpy.unique(y, return_counts=True)
            n_val = math.ceil(self.validation_fraction * len(y))
            stratify = y if counts.min() >= 2 and len(counts) <= min(n_val, len(y) - n_val) else None
        Xfit, Xval, Tfit, _, _, yval = train_test_split(X, T, y, test_size=self.validation_fraction,
                                                        random_state=self._random_state, stratify=stratify)
        if Xval.shape[0] < 2:
            raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size of your "
                             "dataset.")
        return Xfit, Tfit, Xval, yval

    def _epochs(self, X: numpy.ndarray, T: numpy.ndarray, Xval: Any, yval: Any, incremental: bool) -> None:
        """scikit-learn's loop (``_fit_stochastic``): one gpunn epoch at a time, its stopping rules around it."""
        n, batch = X.shape[0], self._batch(X.shape[0])
        self.n_iter_ = 0
        for _ in range(1 if incremental else self.max_iter):
            history = self.model_.fit(X, T, loss=self._loss, optimizer=self._optimizer, epochs=1, batch_size=batch,
                                      shuffle=self.shuffle)
            self.n_iter_ += 1
            self.t_ += n
            self.loss_ = history.loss[-1] / self._loss_scale() + self._penalty(math.ceil(n / batch), n)
            self.loss_curve_.append(self.loss_)
            if self.verbose:
                print(f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}")
            self._update_no_improvement_count(Xval, yval)
            if self.solver == "sgd" and self.learning_rate == "invscaling":
                self._set_lr(float(self.learning_rate_init) / (self.t_ + 1) ** self.power_t)
            if self._no_improvement_count > self.n_iter_no_change:
                if self.solver == "sgd" and self.learning_rate == "adaptive" and self._lr > 1e-6:
                    self._set_lr(self._lr / 5.0)
                    self._no_improvement_count = 0
                else:
                    break
            if incremental:
                break
            if self.n_iter_ == self.max_iter:
                warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                              "optimization hasn't converged yet.", ConvergenceWarning, stacklevel=4)
        if self.early_stopping and self._best_params is not None:
            params = self.model_.flat_parameters()
            params[...] = self.model_.device.asarray(self._best_params)

    def _set_lr(self, lr: float) -> None:
        self._lr = lr
        self._optimizer.lr = lr

    def _penalty(self, n_batches: int, n: int) -> float:
        """The L2 term scikit-learn adds to each batch's loss, averaged over the epoch's samples."""
        weights = (to_host(layer.W).ravel() for layer in self.model_.layers)
        squares = sum(float(numpy.dot(w, w)) for w in weights)
        return 0.5 * self.alpha * squares * n_batches / n

    def _update_no_improvement_count(self, Xval: Any, yval: Any) -> None:
        """scikit-learn's rule, verbatim: no improvement unless better than the best by more than ``tol``."""
        if self.early_stopping:
            score = self._score_for_stopping(Xval, yval)
            assert self.validation_scores_ is not None and self.best_validation_score_ is not None
            self.validation_scores_.append(score)
            if self.verbose:
                print(f"Validation score: {score:f}")
            self._no_improvement_count = (self._no_improvement_count + 1
                                          if score < self.best_validation_score_ + self.tol else 0)
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_params = numpy.array(to_host(self.model_.flat_parameters()), copy=True)
        else:
            assert self.best_loss_ is not None
            last = self.loss_curve_[-1]
            self._no_improvement_count = self._no_improvement_count + 1 if last > self.best_loss_ - self.tol else 0
            self.best_loss_ = min(self.best_loss_, last)

    def _publish(self) -> None:
        self.coefs_ = [numpy.array(to_host(layer.W), copy=True) for layer in self.model_.layers]
        self.intercepts_ = [numpy.array(to_host(layer.b), copy=True) for layer in self.model_.layers]

    def _outputs(self, X: Any) -> numpy.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=numpy.dtype(self.dtype), reset=False)
        return numpy.asarray(self.model_.predict(X), dtype=numpy.float64)

    @property
    def _multi_output(self) -> bool:
        return not isinstance(self, ClassifierMixin)


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multi-layer perceptron classifier trained with gpunn (see the module docstring for what matches
    scikit-learn's ``MLPClassifier`` and what differs). A two-class problem has one logistic output with
    binary cross-entropy, more classes a softmax with cross-entropy."""

    _loss = "cross_entropy"
    _output = "softmax"

    def _targets(self, y: numpy.ndarray, first: bool) -> numpy.ndarray:
        check_classification_targets(y)
        if first and not self._incremental:      # partial_fit has set classes_ from its classes=
            self.classes_ = unique_labels(y)
        self._encoder = LabelEncoder().fit(self.classes_)
        if len(self.classes_) < 2:
            raise ValueError(f"MLPClassifier needs samples of at least 2 classes in the data; got 1 class "
                             f"({self.classes_[0]!r})")
        unseen = numpy.setdiff1d(y, self.classes_)
        if unseen.size:
            raise ValueError(f"y contains labels not in classes_ {list(self.classes_)}: {list(unseen[:5])}")
        codes = self._encoder.transform(y)
        if len(self.classes_) == 2:             # one logistic output, as the lecture's neuron
            self._loss, self._output = "binary_cross_entropy", "sigmoid"
            return codes.reshape(-1, 1).astype(self.dtype)
        self._loss, self._output = "cross_entropy", "softmax"
        return datasets.one_hot(codes, len(self.classes_)).astype(self.dtype)

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> MLPClassifier:
        """One epoch over (X, y) from the current weights; ``classes`` (every label there will be) is needed on
        the first call, as in scikit-learn."""
        self._validate_params()
        fitted = hasattr(self, "model_")
        if not fitted and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        if classes is not None:
            given = unique_labels(classes)
            if fitted and not numpy.array_equal(self.classes_, given):
                raise ValueError(f"`classes={classes!r}` is not the same as on last call to partial_fit, was: "
                                 f"{self.classes_!r}")
            self.classes_ = given
        return self._fit(X, y, incremental=True)

    def _score_for_stopping(self, X: numpy.ndarray, y: numpy.ndarray) -> float:
        return float(numpy.mean(self.predict(X) == y))

    def predict_proba(self, X: Any) -> numpy.ndarray:
        """Class probabilities, shape (n_samples, n_classes), columns in the order of ``classes_``."""
        p = self._outputs(X)
        return numpy.hstack([1.0 - p, p]) if p.shape[1] == 1 else p

    def predict_log_proba(self, X: Any) -> numpy.ndarray:
        with numpy.errstate(divide="ignore"):
            return numpy.log(self.predict_proba(X))

    def predict(self, X: Any) -> numpy.ndarray:
        """The most probable class of each sample."""
        proba = self.predict_proba(X)
        return self.classes_[numpy.argmax(proba, axis=1)]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """A multi-layer perceptron regressor trained with gpunn: identity outputs, squared error (eq 12)."""

    _loss = "squared_error"
    _output = "identity"

    def _targets(self, y: numpy.ndarray, first: bool) -> numpy.ndarray:
        if first:
            self._y_1d = y.ndim == 1
        return (y.reshape(-1, 1) if y.ndim == 1 else y).astype(self.dtype)

    def partial_fit(self, X: Any, y: Any) -> MLPRegressor:
        """One epoch over (X, y) from the current weights."""
        self._validate_params()
        return self._fit(X, y, incremental=True)

    def _score_for_stopping(self, X: numpy.ndarray, y: numpy.ndarray) -> float:
        return float(self.score(X, y))

    def predict(self, X: Any) -> numpy.ndarray:
        """Predicted targets, shape (n_samples,) or (n_samples, n_outputs) as y had in fit."""
        out = self._outputs(X)
        return out.ravel() if self._y_1d else out

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags
