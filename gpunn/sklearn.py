"""scikit-learn estimators over :class:`gpunn.Sequential`: :class:`MLPClassifier` and :class:`MLPRegressor`.

They take scikit-learn's parameter names where they mean the same thing (``hidden_layer_sizes``,
``activation``, ``solver``, ``alpha``, ``batch_size``, ``learning_rate_init``, ``max_iter``, ``shuffle``,
``random_state``, ``tol``, ``momentum``, ``nesterovs_momentum``, ``early_stopping``,
``validation_fraction``, ``beta_1``, ``beta_2``, ``epsilon``, ``n_iter_no_change``, ``verbose``), plus
``device`` and ``dtype``, and pass :func:`sklearn.utils.estimator_checks.check_estimator`, so they work in
``Pipeline``, ``cross_val_score`` and ``GridSearchCV``. Needs the extra: ``pip install 'gpunn[sklearn]'``.

Differences from scikit-learn's own MLP: the solvers are ``"sgd"`` (constant learning rate) and
``"adam"`` (no ``"lbfgs"``); ``alpha`` is applied as weight decay ``alpha / n_samples`` on the weights, as
scikit-learn's L2 term is; a two-class classifier has one sigmoid output with binary cross-entropy, more
classes a softmax with cross-entropy; ``activation`` also takes gpunn's names (``"leaky_relu"``,
``"elu"``, ``"softplus"``, ``"sigmoid"``).
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from . import activations, datasets, optim
from .callbacks import Callback
from .errors import ConfigError
from .network import mlp
from .scalars import flag, integer, real
from .validation import check_dtype

__all__ = ["MLPClassifier", "MLPRegressor"]

_ACTIVATION_NAMES = {"logistic": "sigmoid"}


class _NoImprovement(Callback):
    """scikit-learn's stopping rule: stop when the monitored loss has not improved by ``tol`` for
    ``n_iter_no_change`` epochs in a row."""

    def __init__(self, key: str, tol: float, n_iter_no_change: int):
        self.key, self.tol, self.patience = key, tol, n_iter_no_change
        self.best, self.bad = numpy.inf, 0

    def on_epoch_end(self, record: dict) -> bool:
        value = record[self.key]
        self.bad = 0 if value < self.best - self.tol else self.bad + 1
        self.best = min(self.best, value)
        return self.bad >= self.patience


class _BaseMLP(BaseEstimator):
    def __init__(self, hidden_layer_sizes: Any = (100,), activation: str = "relu", *, solver: str = "adam",
                 alpha: float = 0.0001, batch_size: Any = "auto", learning_rate_init: float = 0.001,
                 max_iter: int = 200, shuffle: bool = True, random_state: Any = None, tol: float = 1e-4,
                 verbose: bool = False, momentum: float = 0.9, nesterovs_momentum: bool = True,
                 early_stopping: bool = False, validation_fraction: float = 0.1, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-8, n_iter_no_change: int = 10, device: str = "cpu",
                 dtype: str = "float64"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
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

    def _targets(self, y: numpy.ndarray) -> numpy.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- fit -------------------------------------------------------------------------------------
    def _check_params(self) -> tuple[list[int], str]:
        given = self.hidden_layer_sizes
        if isinstance(given, numbers.Integral):
            given = [given]
        if isinstance(given, (str, bytes, dict, set)) or not hasattr(given, "__iter__"):
            raise ConfigError(f"hidden_layer_sizes must be a positive integer or a sequence of them; got "
                              f"{self.hidden_layer_sizes!r}")
        sizes = [integer("hidden_layer_sizes entries", s, low=1) for s in given]
        if self.solver not in ("sgd", "adam"):
            raise ValueError(f"solver must be 'sgd' or 'adam'; got {self.solver!r}")
        self._check_numbers()
        if not isinstance(self.activation, str):
            raise ConfigError(f"activation must be a name such as 'relu' or 'logistic'; got {self.activation!r}")
        check_dtype(self.dtype)
        name = _ACTIVATION_NAMES.get(self.activation, self.activation)
        activations.get(name)          # an unknown name is a ConfigError (a ValueError) naming the valid ones
        return [int(s) for s in sizes], name

    def _check_numbers(self) -> None:
        """Every numeric and boolean hyper-parameter by gpunn's one rule (:mod:`gpunn.scalars`): finite, in
        range, real bools; a ConfigError (a ValueError) naming the parameter otherwise."""
        for name in ("max_iter", "n_iter_no_change"):
            integer(name, getattr(self, name), low=1)
        if not self._auto_batch:
            integer("batch_size ('auto' or an integer)", self.batch_size, low=1)
        real("tol", self.tol, 0.0)
        real("alpha", self.alpha, 0.0)
        real("learning_rate_init", self.learning_rate_init, 0.0, low_open=True)
        real("epsilon", self.epsilon, 0.0, low_open=True)
        real("validation_fraction", self.validation_fraction, 0.0, 1.0, low_open=True, high_open=True)
        for name in ("momentum", "beta_1", "beta_2"):
            real(name, getattr(self, name), 0.0, 1.0, high_open=True)
        for name in ("shuffle", "nesterovs_momentum", "early_stopping"):
            flag(name, getattr(self, name))
        if not isinstance(self.verbose, (bool, numpy.bool_)):
            integer("verbose (a bool or an integer >= 0)", self.verbose, low=0)

    def _optimizer(self, n_samples: int) -> optim.Optimizer:
        decay = self.alpha / n_samples
        if self.solver == "sgd":
            return optim.SGD(lr=self.learning_rate_init, momentum=self.momentum,
                             nesterov=bool(self.nesterovs_momentum and self.momentum > 0), weight_decay=decay)
        return optim.Adam(lr=self.learning_rate_init, betas=(self.beta_1, self.beta_2), eps=self.epsilon,
                          weight_decay=decay)

    def fit(self, X: Any, y: Any) -> _BaseMLP:
        """Train a new network on (X, y); returns the estimator."""
        hidden, act = self._check_params()
        X, y = validate_data(self, X, y, dtype=numpy.dtype(self.dtype), multi_output=self._multi_output,
                             y_numeric=not isinstance(self, ClassifierMixin))
        T = self._targets(y)
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        self.model_ = mlp([X.shape[1], *hidden, T.shape[1]], activation=act, output=self._output,
                          device=self.device, dtype=self.dtype, seed=seed)
        Xfit, Tfit, val = X, T, None
        if self.early_stopping:
            Xfit, Xval, Tfit, Tval = datasets.train_test_split(X, T, test_size=self.validation_fraction, seed=seed)
            val = (Xval, Tval)
        batch = min(200, Xfit.shape[0]) if self._auto_batch else int(self.batch_size)
        stop = _NoImprovement("val_loss" if val is not None else "loss", self.tol, self.n_iter_no_change)
        history = self.model_.fit(Xfit, Tfit, loss=self._loss, optimizer=self._optimizer(Xfit.shape[0]),
                                  epochs=self.max_iter, batch_size=batch, shuffle=self.shuffle,
                                  validation_data=val, progress=bool(self.verbose), callbacks=[stop])
        self.n_iter_ = len(history)
        self.loss_curve_ = list(history.loss)
        self.loss_ = self.loss_curve_[-1]
        self.best_loss_ = min(self.loss_curve_)
        return self

    def _outputs(self, X: Any) -> numpy.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=numpy.dtype(self.dtype), reset=False)
        return numpy.asarray(self.model_.predict(X), dtype=numpy.float64)

    @property
    def _auto_batch(self) -> bool:
        return isinstance(self.batch_size, str) and self.batch_size == "auto"

    @property
    def _multi_output(self) -> bool:
        return not isinstance(self, ClassifierMixin)


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multi-layer perceptron classifier trained with gpunn (see the module docstring).

    Attributes after ``fit``: ``classes_``, ``model_`` (the :class:`gpunn.Sequential`), ``n_iter_``,
    ``loss_``, ``loss_curve_``, ``best_loss_``, ``n_features_in_``.
    """

    _loss = "cross_entropy"
    _output = "softmax"

    def _targets(self, y: numpy.ndarray) -> numpy.ndarray:
        check_classification_targets(y)
        self._encoder = LabelEncoder().fit(y)
        self.classes_ = self._encoder.classes_
        if len(self.classes_) < 2:
            raise ValueError(f"MLPClassifier needs samples of at least 2 classes in the data; got 1 class "
                             f"({self.classes_[0]!r})")
        codes = self._encoder.transform(y)
        if len(self.classes_) == 2:             # one logistic output, as the lecture's neuron
            self._loss, self._output = "binary_cross_entropy", "sigmoid"
            return codes.reshape(-1, 1).astype(self.dtype)
        self._loss, self._output = "cross_entropy", "softmax"
        return datasets.one_hot(codes, len(self.classes_)).astype(self.dtype)

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

    def _targets(self, y: numpy.ndarray) -> numpy.ndarray:
        self._y_1d = y.ndim == 1
        return (y.reshape(-1, 1) if y.ndim == 1 else y).astype(self.dtype)

    def predict(self, X: Any) -> numpy.ndarray:
        """Predicted targets, shape (n_samples,) or (n_samples, n_outputs) as y had in fit."""
        out = self._outputs(X)
        return out.ravel() if self._y_1d else out

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags
