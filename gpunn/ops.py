"""The elementwise and update operations of a training step, for one device.

:class:`XpOps` writes them with the array namespace ``xp`` and ``out=`` buffers; it serves NumPy and
CuPy alike. On CUDA devices with fused kernels on, :class:`gpunn.kernels.FusedOps` overrides the same
methods with single-kernel versions, so layers and optimisers never ask which backend they run on.
"""
from __future__ import annotations

import math
from typing import Any


class XpOps:
    """Reference implementation over any array namespace."""

    fused = False

    def __init__(self, device: Any):
        self.device = device
        self.xp = device.xp

    # -- layers ---------------------------------------------------------------------------------
    def bias_activation(self, act: Any, z: Any, b: Any, y: Any, col: Any) -> Any:
        """z ← z + b (bias, lecture §1) in place, then y = f(z)."""
        z += b
        return act.forward(z, y, col)

    def activation_backward(self, act: Any, z: Any, y: Any, grad: Any, out: Any, scratch: Any, col: Any) -> Any:
        """δ = f′(z) ⊙ ∂E/∂y (eqs 11, 14) into ``out``."""
        return act.backward(z, y, grad, out, scratch, col)

    def column_sum(self, delta: Any, out: Any) -> Any:
        """grad_b = Σ over the batch of δ."""
        return self.xp.sum(delta, axis=0, out=out)

    # -- optimisers -----------------------------------------------------------------------------
    def _decayed(self, p: Any, g: Any, s: Any, weight_decay: float, mask: Any) -> Any:
        if not weight_decay:
            return g
        self.xp.multiply(p, mask, out=s)   # decay the weights W, not the biases b
        s *= weight_decay
        s += g
        return s

    def sgd_update(self, p: Any, g: Any, state: dict, lr: float, momentum: float, nesterov: bool,
                   weight_decay: float, mask: Any) -> None:
        """Eq (15), w ← w − η ∂E/∂w, with optional momentum (PyTorch's convention) and L2 decay."""
        xp, s = self.xp, state["scratch"]
        g = self._decayed(p, g, s, weight_decay, mask)
        if momentum:
            v = state["velocity"]
            v *= momentum
            v += g
            if nesterov:  # step along g + μv
                xp.multiply(g, lr, out=s)
                p -= s
                xp.multiply(v, lr * momentum, out=s)
            else:
                xp.multiply(v, lr, out=s)
        else:
            xp.multiply(g, lr, out=s)
        p -= s

    def adam_update(self, p: Any, g: Any, state: dict, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, mask: Any, t: int) -> None:
        """Adam (Kingma & Ba) with bias correction, as PyTorch writes it."""
        xp, s, s2 = self.xp, state["scratch"], state["scratch2"]
        g = self._decayed(p, g, s2, weight_decay, mask)
        m, v = state["m"], state["v"]
        m *= beta1
        xp.multiply(g, 1.0 - beta1, out=s)
        m += s
        v *= beta2
        xp.multiply(g, g, out=s)
        s *= 1.0 - beta2
        v += s
        xp.sqrt(v, out=s)
        s *= 1.0 / math.sqrt(1.0 - beta2 ** t)
        s += eps
        xp.divide(m, s, out=s)
        s *= lr / (1.0 - beta1 ** t)
        p -= s


def ops_for(device: Any) -> XpOps:
    """The operations for ``device``: fused CUDA kernels when enabled, else the ``xp`` reference."""
    if device.fused:
        from .kernels import FusedOps  # noqa: PLC0415 - needs CuPy
        return FusedOps(device)
    return XpOps(device)
