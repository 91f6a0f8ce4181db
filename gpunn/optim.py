"""Optimisers that update a network's parameters in place, on their device.

:class:`SGD` is the lecture's update rule, eq (15): w_ij ← w_ij − η δ_j y_i, i.e. w ← w − η ∂E/∂w
with ∂E/∂w from eq (8), here averaged over the minibatch, plus optional momentum, Nesterov momentum
and L2 weight decay (on weights, not biases). :class:`Adam` is Kingma & Ba's method.
Hyper-parameters stay Python floats so float32 parameters stay float32 (NumPy 2 / NEP 50 promotion).
Each optimiser works on the network's single flat parameter buffer, so one update is a handful of
array operations, or one fused kernel on a GPU.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError, unknown_name

__all__ = ["Optimizer", "SGD", "Adam", "get", "names"]


def _checked(name: str, value: Any, ok: Any, requirement: str) -> float:
    """``value`` as a float satisfying ``ok``, else a ConfigError saying what is required."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not ok(v):
        raise ConfigError(f"{name} must be {requirement}; got {value!r}")
    return v


def _positive_float(name: str, value: Any) -> float:
    return _checked(name, value, lambda v: math.isfinite(v) and v > 0.0, "a positive finite number")


def _unit_interval(name: str, value: Any) -> float:
    return _checked(name, value, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def _non_negative(name: str, value: Any) -> float:
    return _checked(name, value, lambda v: math.isfinite(v) and v >= 0.0, "a finite number >= 0")


class Optimizer:
    """Base class. ``update(params, grads, decay_mask, ops)`` applies one step to flat buffers."""

    _state_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.t = 0
        self._bound: Any = None

    def _ensure_state(self, params: Any, xp: Any) -> None:
        if self._bound is not params:   # a new network (or one moved to another device)
            self.state = {name: xp.zeros_like(params) for name in self._state_names}
            self.t = 0
            self._bound = params

    def update(self, params: Any, grads: Any, decay_mask: Any, ops: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    def snapshot(self) -> tuple[int, dict]:
        """A copy of the state (to roll back a diverged epoch)."""
        return self.t, {k: v.copy() for k, v in self.state.items() if "scratch" not in k}

    def restore(self, snap: tuple[int, dict]) -> None:
        self.t = snap[0]
        for k, v in snap[1].items():
            self.state[k][...] = v

    def reset(self) -> None:
        """Forget all state (momentum, moments, step count)."""
        self._bound = None
        self.state = {}
        self.t = 0


class SGD(Optimizer):
    """Stochastic gradient descent, eq (15): w ← w − η ∂E/∂w.

    Parameters
    ----------
    lr : float
        Learning rate η > 0.
    momentum : float in [0, 1), default 0
        Velocity v ← μv + g, step w ← w − ηv (PyTorch's convention).
    nesterov : bool, default False
        Step along g + μv instead (needs momentum > 0).
    weight_decay : float >= 0, default 0
        L2 penalty added to the weights' gradient (biases are not decayed).
    """

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__()
        self.lr = _positive_float("lr", lr)
        self.momentum = _unit_interval("momentum", momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = _non_negative("weight_decay", weight_decay)
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError("nesterov=True needs momentum > 0")
        self._state_names = ("velocity",) if self.momentum else ()

    def update(self, params, grads, decay_mask, ops):
        self._ensure_state(params, ops.xp)
        self.t += 1
        ops.sgd_update(params, grads, self.state, self.lr, self.momentum, self.nesterov,
                       self.weight_decay, decay_mask)

    def config(self) -> dict:
        return {"name": "sgd", "lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def __repr__(self) -> str:
        return f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, " \
               f"weight_decay={self.weight_decay})"


class Adam(Optimizer):
    """Adam: bias-corrected first and second moment estimates (defaults as in the paper)."""

    _state_names = ("m", "v")

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__()
        self.lr = _positive_float("lr", lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"betas must be a pair (beta1, beta2); got {betas!r}")
        self.beta1 = _unit_interval("beta1", betas[0])
        self.beta2 = _unit_interval("beta2", betas[1])
        self.eps = _positive_float("eps", eps)
        self.weight_decay = _non_negative("weight_decay", weight_decay)

    def update(self, params, grads, decay_mask, ops):
        self._ensure_state(params, ops.xp)
        self.t += 1
        ops.adam_update(params, grads, self.state, self.lr, self.beta1, self.beta2, self.eps,
                        self.weight_decay, decay_mask, self.t)

    def config(self) -> dict:
        return {"name": "adam", "lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps,
                "weight_decay": self.weight_decay}

    def __repr__(self) -> str:
        return f"Adam(lr={self.lr}, betas=({self.beta1}, {self.beta2}), eps={self.eps})"


_REGISTRY = {"sgd": SGD, "adam": Adam}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(spec: str | Optimizer | None, **kwargs: Any) -> Optimizer:
    """An optimiser from an instance or a name (``"sgd"``, ``"adam"``) plus keyword hyper-parameters."""
    if isinstance(spec, Optimizer):
        return spec
    if spec is None:
        spec = "sgd"
    key = str(spec).strip().lower()
    if key not in _REGISTRY:
        raise unknown_name("optimiser", spec, names())
    return _REGISTRY[key](**kwargs)
