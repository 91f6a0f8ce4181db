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
        self._slice_cache: dict[int, list] = {}
        if device.is_cuda:
            self.block = None

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
    #: On the CPU the update walks the flat buffers in cache-sized blocks with one small scratch
    #: array, so the temporaries never leave the cache (same arithmetic, element by element).
    #: On a GPU the blocks would only add kernel launches, so each term is one whole-buffer operation.
    block: int | None = 1 << 18

    def _slices(self, n: int) -> list:
        """The blocks of a flat buffer of ``n`` elements (computed once per size)."""
        slices = self._slice_cache.get(n)
        if slices is None:
            size = self.block or n
            slices = self._slice_cache[n] = [slice(i, min(i + size, n)) for i in range(0, n, size)]
        return slices

    def _scratch(self, state: dict, name: str, like: Any) -> Any:
        s = state.get(name)
        if s is None:
            s = state[name] = self.xp.empty(min(self.block or like.size, like.size), like.dtype)
        return s

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
        s_all = self._scratch(state, "block_scratch", p)
        s2_all = self._scratch(state, "block_scratch2", p) if weight_decay else None
        vel = state.get("velocity")
        slices = self._slices(p.size)
        if len(slices) == 1:   # small networks: no slicing overhead
            self._sgd(p, g, vel, s_all, s2_all, lr, momentum, nesterov, weight_decay, mask)
            return
        for sl in slices:
            n = sl.stop - sl.start
            self._sgd(p[sl], g[sl], None if vel is None else vel[sl], s_all[:n],
                      None if s2_all is None else s2_all[:n], lr, momentum, nesterov, weight_decay,
                      None if mask is None else mask[sl])

    def _sgd(self, p, g, v, s, s2, lr, momentum, nesterov, weight_decay, mask) -> None:
        xp = self.xp
        g = self._decayed(p, g, s2, weight_decay, mask)
        if momentum:
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
        s_all = self._scratch(state, "block_scratch", p)
        s2_all = self._scratch(state, "block_scratch2", p)
        m_all, v_all = state["m"], state["v"]
        for sl in self._slices(p.size):
            n = sl.stop - sl.start
            self._adam(p[sl], g[sl], m_all[sl], v_all[sl], s_all[:n], s2_all[:n], lr, beta1, beta2, eps,
                       weight_decay, None if mask is None else mask[sl], t)

    def _adam(self, p, g, m, v, s, s2, lr, beta1, beta2, eps, weight_decay, mask, t) -> None:
        xp = self.xp
        g = self._decayed(p, g, s2, weight_decay, mask)
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
