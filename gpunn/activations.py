"""Activation functions (lecture §1.1, Figure 1, eqs 1–5) and their derivatives.

Each activation is one class holding both f(z) and its backward pass, so the two cannot drift apart.
The derivative f′ is written the way the lecture writes it, from the output y = f(z) where that is
natural (sigmoid y(1−y), eq 6; tanh 1−y²) and from z for the piecewise ones.

All methods take the array namespace from their arguments (NumPy or CuPy) and write into ``out``
buffers, so the training loop allocates nothing. Every formula is overflow-free: no warning, inf or
NaN for |z| up to 1e4 in float32 and float64.

    >>> import numpy as np, gpunn
    >>> gpunn.activations.get("sigmoid")(np.array([0.0]))
    array([0.5])
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy

from .backend import xp_of
from .errors import ConfigError, ShapeError
from .registry import Registry
from .scalars import Checked, real
from .types import Array, DTypeLike

__all__ = ["Activation", "Sigmoid", "Tanh", "ReLU", "LeakyReLU", "Softplus", "ELU", "Identity", "Softmax",
           "ActivationSpec", "FORWARD", "BACKWARD", "exp_cap", "get", "names", "own_methods", "watch_methods"]

#: What a fused kernel runs in an activation's place (gpunn.ops): its ``forward`` (z + b → y), and its
#: ``backward`` with the ``derivative`` that the base class's backward calls (δ = f′ ⊙ ∂E/∂y).
FORWARD = frozenset({"forward"})
BACKWARD = frozenset({"backward", "derivative"})
_METHODS = FORWARD | BACKWARD
#: Called when an activation instance is given a method of its own or loses it (:func:`watch_methods`).
_WATCHERS: list[Callable[[], None]] = []


def own_methods(act: Activation, methods: frozenset[str] = _METHODS) -> frozenset[str]:
    """Those of ``methods`` that ``act`` has as instance attributes of its own (``act.forward = f``): a fused
    kernel, which is its class's method, must not run in their place. (A subclass has another key
    (:mod:`gpunn.registry`), which no kernel is for: only the instance's own need this check.)"""
    own = vars(act)
    return methods.intersection(own) if own else frozenset()


def watch_methods(call: Callable[[], None]) -> None:
    """Have ``call()`` made whenever an activation instance is given, or loses, a method of its own among
    :data:`FORWARD` and :data:`BACKWARD` (gpunn.ops notes it, so a step bound to a kernel is made again)."""
    _WATCHERS.append(call)


@functools.cache
def exp_cap(dtype: DTypeLike) -> float:
    """Largest argument whose exp is finite in ``dtype`` (less a margin); cached per dtype."""
    return float(numpy.log(numpy.finfo(dtype).max)) - 1.0


class Activation:
    """Base class: ``forward`` computes y = f(z); ``backward`` computes δ = f′(z) ⊙ ∂E/∂y (eq 11).

    Subclasses set ``name`` and, when parameterised, ``param`` (leaky ReLU's α, ELU's a).
    """

    name = ""
    param = 0.0
    #: True when ``backward`` needs a scratch array of z's shape (it is then passed as ``scratch``).
    needs_scratch = False
    #: True for activations whose output couples a row (softmax): f′ is a Jacobian, not elementwise.
    rowwise = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY.add(cls)       # model files name activations by key (gpunn.registry): every subclass joins

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in _METHODS:        # a method of the instance's own: kernels bound in its place must go
            for call in _WATCHERS:
                call()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if name in _METHODS:
            for call in _WATCHERS:
                call()

    # -- the vectorised, in-place interface used by layers --------------------------------------
    def forward(self, z: Array, out: Array, rowstats: Array | None = None) -> Array:  # pragma: no cover - abstract
        """Write f(z) into ``out`` (same shape as z); ``rowstats`` is a (2, batch) C-contiguous scratch array."""
        raise NotImplementedError

    def derivative(self, z: Array, y: Array, out: Array) -> Array:  # pragma: no cover - abstract
        """Write f′(z) into ``out``, using z and/or y = f(z)."""
        raise NotImplementedError

    def backward(self, z: Array, y: Array, grad: Array, out: Array, scratch: Array | None = None,
                 rowstats: Array | None = None) -> Array:
        """Write δ = f′(z) ⊙ grad into ``out`` (eq 11: δ_j = f′(z_j) ∂E/∂y_j); ``out`` is not ``grad``."""
        self.derivative(z, y, out)
        out *= grad
        return out

    # -- convenience for people and plots (allocates) ----------------------------------------------
    def __call__(self, z: Array) -> Array:
        """f(z) for an array of any shape (row-wise activations: a 1-D array is one row)."""
        xp = xp_of(z)
        z = xp.asarray(z, dtype=float) if xp.asarray(z).dtype.kind != "f" else xp.asarray(z)
        if self.rowwise and z.ndim != 2:
            if z.ndim != 1:
                raise ShapeError(f"{self.name} works on rows: pass a 1-D row or a 2-D (rows, classes) array; "
                                 f"got shape {tuple(z.shape)}")
            return self(z.reshape(1, -1)).reshape(-1)
        out = xp.empty_like(z)
        rowstats = xp.empty((2, z.shape[0]), z.dtype) if self.rowwise else None
        return self.forward(z, out, rowstats)

    def grad(self, z: Array) -> Array:
        """f′(z), elementwise (for plotting and tests)."""
        xp = xp_of(z)
        z = xp.asarray(z, dtype=float) if xp.asarray(z).dtype.kind != "f" else xp.asarray(z)
        y = self(z)
        out = xp.empty_like(z)
        return self.derivative(z, y, out)

    def config(self) -> dict:
        """JSON-able description: ``{"name": key, **parameters}`` (key: :mod:`gpunn.registry`)."""
        return {"name": Registry.key_of(type(self))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Activation) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config().items())))


#: Every Activation subclass by its key (gpunn.registry): the built-in ones below and any defined since.
REGISTRY = Registry("activation")


class Sigmoid(Activation):
    """Logistic function σ(z) = 1 / (1 + e^(−z)) (lecture §1); f′ = y(1 − y) (eq 6)."""

    name = "sigmoid"

    def forward(self, z, out, rowstats=None):
        xp = xp_of(z)
        # e^(−z) overflows only where σ(z) underflows anyway: cap the exponent instead of warning.
        xp.negative(z, out=out)
        xp.minimum(out, exp_cap(z.dtype), out=out)
        xp.exp(out, out=out)
        out += 1.0
        return xp.reciprocal(out, out=out)

    def derivative(self, z, y, out):
        xp = xp_of(y)
        xp.subtract(1.0, y, out=out)
        out *= y
        return out


class Tanh(Activation):
    """Hyperbolic tangent (eq 1); f′ = 1 − y²."""

    name = "tanh"

    def forward(self, z, out, rowstats=None):
        return xp_of(z).tanh(z, out=out)

    def derivative(self, z, y, out):
        xp = xp_of(y)
        xp.multiply(y, y, out=out)
        return xp.subtract(1.0, out, out=out)


class ReLU(Activation):
    """Rectifier max(0, z) (eq 2); f′ = 1 where z > 0, else 0."""

    name = "relu"

    def forward(self, z, out, rowstats=None):
        return xp_of(z).maximum(z, 0.0, out=out)

    def derivative(self, z, y, out):
        return xp_of(z).greater(z, 0.0, out=out)


class LeakyReLU(Activation):
    """Leaky rectifier: z where z > 0, else αz (eq 3, α = 0.01); f′ = 1 or α."""

    name = "leaky_relu"
    alpha = Checked(lambda name, value: real("leaky_relu alpha", value, 0.0, 1.0, high_open=True))
    param = property(lambda self: self.alpha, doc="α (what the fused kernels take)")

    def __init__(self, alpha: float = 0.01):
        self.alpha = alpha

    def forward(self, z, out, rowstats=None):
        xp = xp_of(z)
        xp.multiply(z, self.alpha, out=out)
        return xp.maximum(z, out, out=out)  # max(z, αz) is the leaky ReLU for 0 ≤ α < 1

    def derivative(self, z, y, out):
        xp = xp_of(z)
        xp.greater(z, 0.0, out=out)
        out *= 1.0 - self.alpha
        out += self.alpha
        return out

    def config(self):
        return {"name": Registry.key_of(type(self)), "alpha": self.alpha}


class Softplus(Activation):
    """Smooth rectifier log(1 + e^z) (eq 4); f′ = σ(z) = 1 − e^(−y)."""

    name = "softplus"

    def forward(self, z, out, rowstats=None):
        # logaddexp(0, z) = max(z, 0) + log1p(e^(−|z|)): never overflows.
        return xp_of(z).logaddexp(0.0, z, out=out)

    def derivative(self, z, y, out):
        xp = xp_of(y)
        # σ(z) = 1 − e^(−y); −expm1(−y) keeps it accurate where σ(z) is tiny.
        xp.negative(y, out=out)
        xp.expm1(out, out=out)
        return xp.negative(out, out=out)


class ELU(Activation):
    """Exponential linear unit: z where z ≥ 0, else a(e^z − 1) (eq 5); f′ = 1 or y + a."""

    name = "elu"
    needs_scratch = True

    a = Checked(lambda name, value: real("elu parameter a", value, 0.0, low_open=True))
    param = property(lambda self: self.a, doc="a (what the fused kernels take)")

    def __init__(self, a: float = 1.0):
        self.a = a

    def forward(self, z, out, rowstats=None):
        xp = xp_of(z)
        xp.minimum(z, 0.0, out=out)  # e^z only where z ≤ 0: no overflow
        xp.expm1(out, out=out)
        out *= self.a
        if self.a <= 1.0:
            # for a ≤ 1, a(e^z − 1) ≥ z when z ≤ 0 and equals 0 when z > 0, so max() picks the branch
            return xp.maximum(out, z, out=out)
        xp.copyto(out, z, where=z > 0)
        return out

    def derivative(self, z, y, out):
        # For a > 0, y > 0 exactly where z > 0, so f′ can be read from y: 1 there, y + a = a·e^z elsewhere.
        xp = xp_of(y)
        xp.minimum(y, 0.0, out=out)
        out += self.a
        xp.copyto(out, 1.0, where=y > 0)
        return out

    def backward(self, z, y, grad, out, scratch=None, rowstats=None):
        # Allocation-free form of the above: f′ = (min(y, 0) + a) + (1 − a)·[y > 0].
        xp = xp_of(y)
        xp.minimum(y, 0.0, out=out)
        out += self.a
        xp.greater(y, 0.0, out=scratch)
        scratch *= 1.0 - self.a
        out += scratch
        out *= grad
        return out

    def config(self):
        return {"name": Registry.key_of(type(self)), "a": self.a}


class Identity(Activation):
    """No activation, y = z (linear output units); f′ = 1."""

    name = "identity"

    def forward(self, z, out, rowstats=None):
        if out is not z:
            xp_of(z).copyto(out, z)
        return out

    def derivative(self, z, y, out):
        out.fill(1.0)
        return out

    def backward(self, z, y, grad, out, scratch=None, rowstats=None):
        if out is not grad:
            xp_of(grad).copyto(out, grad)
        return out


class Softmax(Activation):
    """Row-wise softmax y_t = e^(z_t) / Σ_s e^(z_s), for class probabilities at the output.

    Its derivative couples the outputs of a row, so ``backward`` applies the Jacobian:
    δ = y ⊙ (g − Σ_t g_t y_t). With cross-entropy the loss supplies δ = y − y* directly instead.
    ``forward`` leaves log Σ e^z (the log-partition, used by the loss) in ``rowstats[0]``.
    """

    name = "softmax"
    rowwise = True

    def forward(self, z, out, rowstats=None):
        xp = xp_of(z)
        shift, total = rowstats[0][:, None], rowstats[1][:, None]     # each row of rowstats contiguous
        xp.max(z, axis=1, keepdims=True, out=shift)
        xp.subtract(z, shift, out=out)    # shift by the row max: no overflow
        xp.exp(out, out=out)
        xp.sum(out, axis=1, keepdims=True, out=total)
        out /= total
        xp.log(total, out=total)
        shift += total                    # rowstats[0] = log Σ e^z, the log-partition
        return out

    def derivative(self, z, y, out):
        raise ConfigError("softmax has no elementwise derivative; use backward() (a Jacobian product)")

    def backward(self, z, y, grad, out, scratch=None, rowstats=None):
        xp = xp_of(y)
        dot = rowstats[1][:, None]
        xp.multiply(grad, y, out=out)
        xp.sum(out, axis=1, keepdims=True, out=dot)
        xp.subtract(grad, dot, out=out)
        out *= y
        return out


_ALIASES = {"linear": "identity", "logistic": "sigmoid", "leakyrelu": "leaky_relu", "leaky-relu": "leaky_relu"}


def names() -> list[str]:
    """Names of the registered activations."""
    return REGISTRY.names()


#: What names an activation: a name, a config dict, a class, an instance (None: identity).
ActivationSpec = str | dict | type[Activation] | Activation | None


def get(spec: ActivationSpec) -> Activation:
    """An activation from a name (``"relu"``), a config dict, a class or an instance."""
    if spec is None:
        return Identity()
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, type) and issubclass(spec, Activation):
        return spec()
    if isinstance(spec, dict):
        return REGISTRY.build(spec, _lookup)
    if isinstance(spec, str):
        return _lookup(spec)()
    raise ConfigError(f"an activation must be a name, a dict or an Activation; got {type(spec).__name__}")


def _lookup(name: object) -> type[Activation]:
    return REGISTRY.find(name, _ALIASES)
