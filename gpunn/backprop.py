"""Backpropagation over a list of layers on one device (lecture §2, steps 2–5), allocating nothing per step.

:class:`Backprop` is what a model's training methods run: the forward pass (step 2), the output δ from
the loss (eq 13) and each hidden layer's δ (eq 14) with their gradients (eq 8), and the optimiser's
update of the flat parameter buffer (eq 15 for SGD). The model adds the checks, the device context and
the admission of one training thread around it.
"""
from __future__ import annotations

from .layers import MAX_BATCH_SIZES, Dense
from .losses import Loss
from .ops import XpOps
from .optim import Optimizer
from .params import ParameterStore
from .types import Array

__all__ = ["Backprop"]


class Backprop:
    """The steps of backpropagation for ``layers`` bound to ``store``, computed with ``ops``."""

    def __init__(self, layers: list[Dense], store: ParameterStore, ops: XpOps):
        self.layers, self.store, self.ops = layers, store, ops
        self._grad_y: dict[int, Array] = {}         # ∂E/∂y of the output, per batch size

    def forward(self, x: Array) -> Array:
        """Step 2: each layer's y = f(x·W + b) from the layer below's y; returns the output layer's y."""
        self.ops.begin_step(x.shape[0])      # the CPU's BLAS threads for this batch (gpunn.threads)
        for layer in self.layers:
            x = layer.forward(x, self.ops)
        return x

    def backward(self, t: Array, loss: Loss, value_out: Array | None = None) -> Array:
        """Steps 3–4 for targets t of the last forward: the output δ from the loss (eq 13), then each hidden
        layer's δ (eq 14) and every ∂E/∂w (eq 8); returns the batch's mean loss (into ``value_out`` if given)."""
        out, xp = self.layers[-1], self.ops.xp
        b = t.shape[0]
        gy = self._grad_y.get(b)
        if gy is None:
            if len(self._grad_y) >= MAX_BATCH_SIZES:      # bounded like the layers' buffers
                self._grad_y.clear()
            gy = self._grad_y[b] = xp.empty((b, out.n_out), self.store.dtype)
        value, direct = self.ops.loss_backward(loss, out, t, gy, out.buffers(xp, b).delta, value_out)
        grad = out.backward(gy, self.ops, delta_ready=direct)
        for layer in reversed(self.layers[:-1]):
            grad = layer.backward(grad, self.ops)
        return value

    def gradients(self, x: Array, t: Array, loss: Loss, value_out: Array | None = None) -> Array:
        """Steps 2–4: :meth:`forward` of x, then :meth:`backward` for targets t; returns the mean loss."""
        self.forward(x)
        return self.backward(t, loss, value_out)

    def update(self, optimizer: Optimizer) -> None:
        """Step 5: the optimiser's update of every parameter from the gradients (eq 15 for SGD)."""
        mask = self.store.decay_mask() if getattr(optimizer, "weight_decay", 0.0) else None
        optimizer.update(self.store.params, self.store.grads, mask, self.ops)
