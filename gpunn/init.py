"""Weight initialisers, drawn on the host so a seed gives the same weights on every device.

The lecture's backpropagation starts by "randomly initialise the weights (with small non-zero
values)" (§2, step 1): that is ``"small"``. ``"xavier"`` (Glorot uniform) suits sigmoid/tanh/softmax
and ``"he"`` (normal, std √(2/n_in)) the ReLU family; those are the defaults. Biases start at zero.
Values are drawn in float64 from a ``numpy.random.Generator`` (PCG64) and only then cast and moved.
"""
from __future__ import annotations

import numpy

from .errors import unknown_name

__all__ = ["small", "xavier", "he", "get", "names", "default_for"]

SMALL_STD = 0.01


def small(rng: numpy.random.Generator, n_in: int, n_out: int) -> numpy.ndarray:
    """Small non-zero values (lecture §2 step 1): normal with standard deviation 0.01."""
    return rng.normal(0.0, SMALL_STD, size=(n_in, n_out))


def xavier(rng: numpy.random.Generator, n_in: int, n_out: int) -> numpy.ndarray:
    """Glorot/Xavier uniform: U(−l, l) with l = √(6 / (n_in + n_out))."""
    limit = numpy.sqrt(6.0 / (n_in + n_out))
    return rng.uniform(-limit, limit, size=(n_in, n_out))


def he(rng: numpy.random.Generator, n_in: int, n_out: int) -> numpy.ndarray:
    """He/Kaiming normal: N(0, 2 / n_in)."""
    return rng.normal(0.0, numpy.sqrt(2.0 / n_in), size=(n_in, n_out))


_REGISTRY = {"small": small, "xavier": xavier, "he": he}
_RELU_FAMILY = {"relu", "leaky_relu", "elu", "softplus"}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str):
    """The initialiser called ``name``."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise unknown_name("initialiser", name, names())
    return _REGISTRY[key]


def default_for(activation_name: str) -> str:
    """He for the ReLU family, Xavier otherwise."""
    return "he" if activation_name in _RELU_FAMILY else "xavier"
