"""The elementwise operations of a layer's pass, for one device: the compute layer.

:class:`XpOps` writes them with the array namespace ``xp`` and ``out=`` buffers; it serves NumPy and
CuPy alike and is the reference. With fused kernels on, :class:`FusedOps` runs the same operations as
single kernels, falling back to the reference where no kernel covers a case: on a CUDA device the CUDA
kernels of :mod:`gpunn.kernels`; on the CPU (:class:`CpuFusedOps`) the numba kernels of
:mod:`gpunn.cpukernels`, bitwise equal to the reference, where numba is installed. :func:`ops_for`
chooses for a device: layers and optimisers receive an ops object and never ask which backend they
run on. Each step starts with :meth:`XpOps.begin_step`, which on the CPU applies gpunn's choice of BLAS
threads for the batch (:mod:`gpunn.threads`).
"""
from __future__ import annotations

import os
from typing import Any

from . import cpukernels, threads
from .activations import Activation
from .backend import Device
from .kernels import FusedKernels
from .losses import Loss
from .types import Array, OutputLayer

__all__ = ["XpOps", "FusedOps", "CpuFusedOps", "ops_for", "fused_enabled"]


def fused_enabled() -> bool:
    """Whether gpunn's fused kernels are used by default, CUDA ones on a GPU and numba ones on the CPU
    (``GPUNN_FUSED=0`` turns both off)."""
    return os.environ.get("GPUNN_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


class XpOps:
    """Reference implementation over any array namespace."""

    #: True where the operations run as fused kernels (CUDA, or numba on the CPU).
    fused = False

    def __init__(self, device: Device):
        self.device = device
        self.xp = device.xp
        #: called with the batch's rows at the start of every step: the CPU's BLAS thread choice
        self.begin_step = _nothing if device.is_cuda else threads.apply
        # NumPy's take in its default mode ('raise') gathers into a temporary and copies it to ``out``;
        # the rows gathered here are a permutation, always in range, so 'clip' gives the same rows
        # without the copy. CuPy's take has no mode and writes ``out`` directly.
        self._take_mode = {} if device.is_cuda else {"mode": "clip"}

    def gather_rows(self, src: Array, index: Array, out: Array) -> Array:
        """out[k] = src[index[k]] for indices that are all in range (a permutation of the rows)."""
        return self.xp.take(src, index, axis=0, out=out, **self._take_mode)

    def bias_activation(self, act: Activation, z: Array, b: Array, y: Array, rowstats: Array | None) -> Array:
        """z ← z + b (the bias, lecture §1.1) in place, then y = f(z)."""
        z += b
        return act.forward(z, y, rowstats)

    def activation_backward(self, act: Activation, z: Array, y: Array, grad: Array, out: Array,
                            scratch: Array | None, rowstats: Array | None) -> Array:
        """δ = f′(z) ⊙ ∂E/∂y (eqs 11, 14) into ``out``."""
        return act.backward(z, y, grad, out, scratch, rowstats)

    def column_sum(self, delta: Array, out: Array) -> Array:
        """∂E/∂b = Σ over the batch of δ."""
        return delta.sum(axis=0, out=out)

    def loss_backward(self, loss: Loss, layer: OutputLayer, t: Array, grad_y: Array, delta: Array,
                      out: Array | None) -> tuple[Array, bool]:
        """The loss's mean value and the start of backpropagation (:meth:`gpunn.losses.Loss.backward`):
        (value, direct), where direct means ``delta`` holds the output δ, else ``grad_y`` holds ∂E/∂y.
        The value is written into ``out`` when one is given (a device array of one element)."""
        value, direct = loss.backward(layer, t, grad_y, delta)
        if out is None:
            return value, direct
        out[...] = value
        return out, direct

    def sgd_update(self, params: Array, grads: Array, velocity: Array | None, mask: Array | None, lr: float,
                   momentum: float, nesterov: bool, weight_decay: float) -> bool:
        """:meth:`gpunn.optim.SGD.update`'s whole formula as one fused operation, where this ops has one;
        returns False (nothing done) where the optimiser must run its own ``xp`` formula."""
        return False


def _nothing(rows: int) -> None:
    """A GPU's step needs no thread choice."""


class FusedOps(XpOps):
    """:class:`XpOps` with each elementwise chain as one kernel: by default the CUDA ones
    (:class:`gpunn.kernels.FusedKernels`); ``kernels`` may be another set with the same methods."""

    fused = True

    def __init__(self, device: Device, kernels: Any = None):
        super().__init__(device)
        self.kernels = kernels if kernels is not None else FusedKernels(device)

    def bias_activation(self, act, z, b, y, rowstats):
        done = self.kernels.softmax(z, b, y, rowstats) if act.rowwise else self.kernels.bias_activation(act, z, b, y)
        return y if done else super().bias_activation(act, z, b, y, rowstats)

    def activation_backward(self, act, z, y, grad, out, scratch, rowstats):
        if self.kernels.activation_backward(act, z, y, grad, out):
            return out
        return super().activation_backward(act, z, y, grad, out, scratch, rowstats)

    def column_sum(self, delta, out):
        if self.kernels.column_sum(delta, out):
            return out
        return super().column_sum(delta, out)

    def loss_backward(self, loss, layer, t, grad_y, delta, out):
        value = out if out is not None else self.xp.empty(1, t.dtype)
        if loss.fused_backward(self.kernels, layer, t, delta, value):
            return (value if out is not None else value.reshape(())), True
        return super().loss_backward(loss, layer, t, grad_y, delta, out)

    def sgd_update(self, params, grads, velocity, mask, lr, momentum, nesterov, weight_decay):
        self.kernels.sgd_update(params, grads, velocity, mask, lr, momentum, nesterov, weight_decay)
        return True


class CpuFusedOps(FusedOps):
    """:class:`FusedOps` on the CPU: the numba kernels of :class:`gpunn.cpukernels.CpuKernels`, bitwise
    equal to :class:`XpOps` on NumPy (tests/test_cpukernels.py)."""

    def __init__(self, device: Device):
        super().__init__(device, cpukernels.CpuKernels())


def ops_for(device: Device, fused: bool | None = None) -> XpOps:
    """The operations for ``device``: with ``fused`` (default: :func:`fused_enabled`) on, the fused
    CUDA kernels on a GPU and the numba kernels on the CPU where numba imports; else the ``xp``
    reference."""
    if not (fused_enabled() if fused is None else bool(fused)):
        return XpOps(device)
    if device.is_cuda:
        return FusedOps(device)
    return CpuFusedOps(device) if cpukernels.available() else XpOps(device)
