"""Loss functions, averaged over the minibatch, and the output-layer δ they start backprop with.

- ``squared_error``: E = ½ Σ_t ‖y_t − y*_t‖² per sample (eq 12). With a sigmoid output the output δ
  is eq (13), δ_t = −y_t(1 − y_t)(y*_t − y_t), exactly (divided by the batch size, as the mean is).
- ``binary_cross_entropy``: −Σ_t [y*_t log y_t + (1 − y*_t) log(1 − y_t)] for sigmoid outputs;
  computed from z (log(1 + e^z) − y* z) so it never takes log 0, with δ = y − y*.
- ``cross_entropy``: −Σ_t y*_t log y_t for softmax outputs, from the log-partition; δ = y − y*.
  Targets are integer class labels or one-hot (probability) rows.
"""
from __future__ import annotations

from typing import Any

from .activations import Activation
from .backend import xp_of
from .errors import ConfigError
from .registry import Registry, round_trip
from .types import Array, OutputLayer

__all__ = ["Loss", "SquaredError", "BinaryCrossEntropy", "CrossEntropy", "REGISTRY", "from_config", "get", "key",
           "names", "portable"]


class Loss:
    """A loss: ``backward`` (the training path) returns the batch-mean value and writes δ or ∂E/∂y."""

    name = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY.add(cls)       # files name losses by key (gpunn.registry): every subclass joins

    def check_activation(self, act: Activation) -> None:
        """Raise ConfigError if this loss cannot be used after ``act``."""

    def fused_backward(self, kernels: Any, layer: OutputLayer, t: Array, delta: Array, out: Array) -> bool:
        """:meth:`backward`'s value and output δ as one fused kernel of ``kernels`` (a fused ops' kernel set),
        the mean loss written into ``out`` (one element); False, doing nothing, where there is none."""
        return False

    def backward(self, layer: OutputLayer, t: Array, grad_y: Array,
                 delta: Array) -> tuple[Array, bool]:  # pragma: no cover
        """Return (mean loss, direct): if direct, ``delta`` holds the output δ, else ``grad_y`` holds ∂E/∂y."""
        raise NotImplementedError

    def value(self, z: Array, y: Array, t: Array) -> Array:  # pragma: no cover
        """Mean loss of outputs y (pre-activations z) against targets t (allocating; for evaluation)."""
        raise NotImplementedError

    def config(self) -> dict:
        """``{"name": key, **attributes}``: what a file stores of a loss with parameters (:mod:`gpunn.registry`)."""
        return {"name": Registry.key_of(type(self)), **vars(self)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: Every Loss subclass by its key (gpunn.registry): the built-in ones below and any defined since.
REGISTRY = Registry("loss")


class SquaredError(Loss):
    """E = ½ Σ_t ‖y_t − y*_t‖² (eq 12), averaged over the batch; ∂E/∂y = (y − y*) / B."""

    name = "squared_error"

    def backward(self, layer, t, grad_y, delta):
        y, n = layer.y, t.shape[0]
        xp = xp_of(y)
        xp.subtract(y, t, grad_y)                      # y − y*
        value = xp.vdot(grad_y, grad_y) * (0.5 / n)
        xp.multiply(grad_y, 1.0 / n, grad_y)
        return value, False                            # the layer applies f′: eq (13) for sigmoid

    def value(self, z, y, t):
        d = y - t
        return xp_of(y).vdot(d, d) * (0.5 / t.shape[0])


class BinaryCrossEntropy(Loss):
    """Binary cross-entropy for sigmoid outputs (independent 0/1 targets per output node)."""

    name = "binary_cross_entropy"

    def check_activation(self, act):
        if act.name != "sigmoid":
            raise ConfigError(f"binary_cross_entropy needs a sigmoid output layer, not {act.name!r}; "
                              "use activation='sigmoid' on the last layer, or loss='squared_error'")

    def backward(self, layer, t, grad_y, delta):
        xp = xp_of(layer.y)
        xp.logaddexp(0.0, layer.z, out=delta)          # log(1 + e^z) = −log(1 − y)
        value = (xp.sum(delta) - xp.vdot(t, layer.z)) * (1.0 / t.shape[0])
        xp.subtract(layer.y, t, out=delta)
        delta *= 1.0 / t.shape[0]
        return value, True

    def value(self, z, y, t):
        xp = xp_of(z)
        return (xp.sum(xp.logaddexp(0.0, z)) - xp.vdot(t, z)) * (1.0 / t.shape[0])


class CrossEntropy(Loss):
    """Cross-entropy of softmax outputs against one-hot (or probability) targets."""

    name = "cross_entropy"

    def check_activation(self, act):
        if act.name != "softmax":
            raise ConfigError(f"cross_entropy needs a softmax output layer, not {act.name!r}; "
                              "use activation='softmax' on the last layer (or sigmoid with "
                              "binary_cross_entropy)")

    def backward(self, layer, t, grad_y, delta):
        xp = xp_of(layer.y)
        # −Σ_t y*_t log y_t = Σ_t y*_t (lse − z_t) = lse − y*·z for rows of t summing to 1
        value = (xp.sum(layer.rowstats[0]) - xp.vdot(t, layer.z)) * (1.0 / t.shape[0])
        xp.subtract(layer.y, t, out=delta)
        delta *= 1.0 / t.shape[0]
        return value, True

    def fused_backward(self, kernels, layer, t, delta, out):
        """The softmax output's log-partition (``layer.rowstats``) gives value and δ in one pass: the kernels
        compute :meth:`backward` above, so a subclass's or the instance's own backward declines them."""
        if "backward" in vars(self) or type(self).backward is not CrossEntropy.backward:
            return False
        return layer.rowstats is not None and kernels.cross_entropy(layer.z, layer.y, layer.rowstats, t, delta, out)

    def value(self, z, y, t):
        # the training formula (backward above): rows of t sum to 1 (checked to 1e-3), so Σ_t y*_t lse = lse
        xp = xp_of(z)
        m = xp.max(z, axis=1, keepdims=True)
        lse = m[:, 0] + xp.log(xp.sum(xp.exp(z - m), axis=1))
        return (xp.sum(lse) - xp.vdot(t, z)) * (1.0 / t.shape[0])


_ALIASES = {"mse": "squared_error", "bce": "binary_cross_entropy", "ce": "cross_entropy",
            "categorical_cross_entropy": "cross_entropy"}


def names() -> list[str]:
    return REGISTRY.names()


def key(loss: Loss) -> str:
    """The key of ``loss``'s class (:mod:`gpunn.registry`): its own name, else module.QualName."""
    return Registry.key_of(type(loss))


def portable(loss: Loss) -> str | dict:
    """What a file stores for ``loss``: its key, or (a loss with parameters) its configuration, proven to load
    back as an equal one; SaveError naming the fix otherwise (:mod:`gpunn.registry`)."""
    if not vars(loss):
        return key(loss)
    return round_trip(loss.config(), from_config, lambda made: made.config(), f"the loss {loss!r}")


def from_config(spec: Any) -> Loss:
    """A loss from what :func:`portable` stored: a key (or name) or a configuration dict."""
    if not isinstance(spec, dict):
        return get(spec)
    return REGISTRY.build(spec)


def get(spec: str | Loss) -> Loss:
    """A loss from its name or an instance."""
    if isinstance(spec, Loss):
        return spec
    return REGISTRY.find(spec, _ALIASES)()
