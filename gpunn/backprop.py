"""Backpropagation over a list of layers on one device (lecture §2, steps 2–5), allocating nothing per step.

:class:`Backprop` is what a model's training methods run: the forward pass (step 2), the output δ from
the loss (eq 13) and each hidden layer's δ (eq 14) with their gradients (eq 8), and the optimiser's
update of the flat parameter buffer (eq 15 for SGD), with the device current. The model adds the checks
and the admission of one training thread around it, and names itself as the optimiser's network.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial

from .activations import Activation, own_methods
from .layers import MAX_BATCH_SIZES, BoundStep, Dense
from .losses import Loss
from .ops import BINDINGS, XpOps
from .optim import Optimizer
from .params import ParameterStore
from .types import Array

__all__ = ["Backprop", "StepPlan"]


class Backprop:
    """The steps of backpropagation for ``layers`` bound to ``store``, computed with ``ops``."""

    def __init__(self, layers: list[Dense], store: ParameterStore, ops: XpOps):
        self.layers, self.store, self.ops = layers, store, ops
        self._grad_y: dict[int, Array] = {}         # ∂E/∂y of the output, per batch size
        self._plans: dict[tuple[int, int], StepPlan] = {}     # (rows, id(loss)) -> the step's bound calls
        self._last: StepPlan | None = None          # the plan of the last step (most steps take it again)
        self.is_cuda = ops.device.is_cuda
        self.shown: StepPlan | None = None          # the plan whose arrays the layers expose
        #: weights of the widest layer: × the batch's rows, the multiply-adds of the step's largest product
        self.widest = max(layer.n_in * layer.n_out for layer in layers)

    def forward(self, x: Array) -> Array:
        """Step 2: each layer's y = f(x·W + b) from the layer below's y; returns the output layer's y."""
        self.ops.begin_step(x.shape[0] * self.widest)     # the CPU's BLAS threads for this work (gpunn.threads)
        self.shown = None                    # the layers show this pass's arrays now
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
        """Steps 2–4: :meth:`forward` of x, then :meth:`backward` for targets t, with the model's device current
        (a GPU's); returns the mean loss. Run as the :class:`StepPlan` of this batch size and loss (the same
        operations, bound once)."""
        return self.step(x, t, loss, None, value_out)

    def step(self, x: Array, t: Array, loss: Loss, optimizer: Optimizer | None, value_out: Array | None = None,
             owner: weakref.ref | None = None) -> Array:
        """Steps 2–5: :meth:`gradients`, then :meth:`update` (none without an ``optimizer``), with the model's
        device current (a GPU's); returns the mean loss. Where ``owner`` (a weak reference to the network) is
        given, the optimiser is attached to that network first (:meth:`gpunn.optim.Optimizer.attach`, skipped
        while its ``owner_ref`` is ``owner`` already).

        On the CPU the plan of the last step is taken again while it is for this batch size and loss, nothing
        noted in :data:`gpunn.ops.BINDINGS` has changed since it was checked, the loss has no ``backward`` of
        its own (an instance attribute), has a ``fused_backward`` of its own where the plan's had one and only
        then, and the plan needs no full check at every step (``recheck``);
        otherwise :meth:`plan` checks all of :class:`StepPlan`'s conditions. The thread policy's ``apply`` is
        skipped for its settled work (:attr:`gpunn.threads.ThreadPolicy.settled`)."""
        if owner is not None and optimizer.owner_ref is not owner:       # type: ignore[union-attr]
            optimizer.attach(owner())           # type: ignore[union-attr]
        rows = x.shape[0]
        if self.is_cuda:
            with self.ops.device.activate():
                self.ops.begin_step(rows * self.widest)
                return self.plan(rows, loss).run(x, t, value_out, optimizer)
        work, policy = rows * self.widest, self.ops.threads
        if policy is None or policy.settled != work:
            self.ops.begin_step(work)           # the CPU's BLAS threads for this work (gpunn.threads)
        plan = self._last
        if (plan is None or plan.loss is not loss or plan.rows != rows or plan.seen != BINDINGS.value
                or plan.recheck or "backward" in plan.loss_attributes
                or ("fused_backward" in plan.loss_attributes) is not plan.own_fused):
            plan = self.plan(rows, loss)
        return plan.run(x, t, value_out, optimizer)

    def plan(self, rows: int, loss: Loss) -> StepPlan:
        """The current :class:`StepPlan` for ``rows`` and ``loss``: the one made before while it is current,
        else a new one; it becomes the plan of the last step."""
        seen = BINDINGS.value                   # read first: a change noted from here on is not missed
        plan = self._plans.get((rows, id(loss)))
        if plan is not None and plan.current(loss):
            plan.seen = seen
        else:
            plan = self._plan(rows, loss)
        self._last = plan
        return plan

    def _plan(self, rows: int, loss: Loss) -> StepPlan:
        """A new plan for ``rows`` and ``loss``; plans whose buffers a layer has since freed go (bounded
        like the layers' buffers)."""
        self._plans = {k: p for k, p in self._plans.items() if p.current(p.loss)}
        while len(self._plans) >= MAX_BATCH_SIZES:
            self._plans.pop(next(iter(self._plans)))
        gy = self._grad_y.get(rows)
        if gy is None:
            if len(self._grad_y) >= MAX_BATCH_SIZES:
                self._grad_y.clear()
            gy = self._grad_y[rows] = self.ops.xp.empty((rows, self.layers[-1].n_out), self.store.dtype)
        plan = self._plans[(rows, id(loss))] = StepPlan(self, rows, loss, gy)
        return plan

    def update(self, optimizer: Optimizer) -> None:
        """Step 5: the optimiser's update of every parameter from the gradients (eq 15 for SGD)."""
        optimizer.update(self.store.params, self.store.grads, self.decay_mask(optimizer), self.ops)

    def decay_mask(self, optimizer: Optimizer) -> Array | None:
        """The store's decay mask where ``optimizer`` has a weight decay, else None (what its update takes)."""
        return self.store.decay_mask() if _weight_decay(optimizer) else None


def _weight_decay(optimizer: Optimizer) -> object:
    """``optimizer.weight_decay`` (0.0 where it has none), read where a Checked attribute keeps it (the
    instance's ``__dict__``: :class:`gpunn.scalars.Checked`) without the descriptor's call."""
    wd = optimizer.__dict__.get("weight_decay")
    return getattr(optimizer, "weight_decay", 0.0) if wd is None else wd


class StepPlan:
    """Steps 2–5 for one batch size and loss, as calls bound once to the layers' buffers
    (:meth:`gpunn.layers.Dense.bound_step`): the operations of :meth:`Backprop.forward`,
    :meth:`Backprop.backward` and :meth:`Backprop.update` in the same order, without looking anything up
    again: the lecture's 4-8-1 step is bound by Python's calls, not by arithmetic, and between two bound
    calls only a list loop runs.

    A plan is current while its ops bind the same calls (``ops.generation``: the CPU kernels loaded since
    would change them), every layer's buffers are the ones it bound (``buffer_epoch``: made, freed, or
    dropped with new parameters), every activation's parameter (α, a) is the one it bound, every activation
    has the methods of its own (assigned to the instance: ``forward``, ``backward``, ``derivative``) it had,
    and the loss is the same object, with a ``backward`` and a ``fused_backward`` of its own (assigned to the
    instance) where it had one and only then; otherwise it is made again. ``seen`` is the value of
    :data:`gpunn.ops.BINDINGS` when it was last found current: while that value stays, neither buffers nor
    calls have changed. An activation given or losing a method of its own is noted there
    (:func:`gpunn.activations.watch_methods`); activations' parameters and a loss's own ``backward`` are
    not: a plan with a parameterised
    activation or bound to an instance's own backward is checked in full at every step (``recheck``), and a
    step checks that the loss has not been given one since, nor given or lost its own ``fused_backward``
    (:meth:`Backprop.step`).
    """

    #: The smallest flat parameter buffer (bytes) that a CPU step updates layer by layer, as each layer's
    #: gradients are made (:meth:`gpunn.optim.Optimizer.split_update`): below it, all of it fits in the caches
    #: anyway and a call per layer would only add Python's time (the lecture's 4-8-1 step).
    SPLIT_UPDATE_BYTES = 1 << 20

    def __init__(self, backprop: Backprop, rows: int, loss: Loss, grad_y: Array):
        self.backprop, self.ops, self.layers, self.loss = backprop, backprop.ops, backprop.layers, loss
        self.rows, self.store = rows, backprop.store
        self.generation = self.ops.generation
        steps: list[BoundStep] = []
        grad = grad_y
        for k in range(len(self.layers) - 1, -1, -1):       # top down: each δ reads the layer above's ∂E/∂x
            below = self.layers[k - 1].buffers(self.ops.xp, rows) if k else None
            hidden = k < len(self.layers) - 1       # δ made at every step (the output's: not where the loss makes it)
            # ∂E/∂x straight into the δ buffer of the layer below where its δ can be made over it in place: one
            # array fewer through the caches in the backward pass, the same values (ops.delta_in_place)
            dx = (below.delta if below is not None and self.ops.delta_in_place(self.layers[k - 1].activation,
                                                                                below.z.dtype) else None)
            steps.insert(0, self.layers[k].bound_step(self.ops, rows, None if below is None else below.y, grad,
                                                      delta_always=hidden, dx=dx))
            grad = steps[0].bufs.dx if dx is None else dx
        self.epochs = [layer.buffer_epoch for layer in self.layers]
        #: the activations with a parameter (α, a: assignable between steps; bound calls hold it as a constant)
        self.tuned = [(layer.activation, layer.activation.param) for layer in self.layers
                      if type(layer.activation).param is not Activation.param]
        #: each activation with the methods it has of its own (gpunn.activations.own_methods), which the calls
        #: were bound for: a kernel, or the activation's own method (an assignment is noted in BINDINGS)
        self.act_methods = [(layer.activation, own_methods(layer.activation)) for layer in self.layers]
        self.loss_attributes = vars(loss)
        self.own_backward = "backward" in self.loss_attributes
        #: whether the instance has its own fused_backward (the CPU kernels' bound cross-entropy is for the class's)
        self.own_fused = "fused_backward" in self.loss_attributes
        self.recheck = bool(self.tuned) or self.own_backward
        self.steps = steps
        self.first, self.matmul = self.layers[0], self.ops.matmul
        self.first_W, self.first_gW = self.first.W, self.first.grad_W
        self.first_z, self.first_delta = steps[0].bufs.z, steps[0].bufs.delta
        self.params, self.grads = self.store.params, self.store.grads
        self.forward = [call for s in steps for call in s.forward]
        self.output_delta = steps[-1].make_delta
        self.backward = steps[-1].grads + [c for s in reversed(steps[:-1]) for c in (*s.make_delta, *s.grads)]
        #: each layer's range [start, stop) of the flat buffers (W then b), where the update is made layer by
        #: layer (a buffer of SPLIT_UPDATE_BYTES or more on the CPU), else None
        self.ranges = ([(w.start, b.stop) for w, b in self.store.layout]
                       if not self.ops.device.is_cuda and self.store.params.nbytes >= self.SPLIT_UPDATE_BYTES else None)
        #: :attr:`backward` with each layer's update (``_part``) right after the last call that reads its weights
        #: (the product making ∂E/∂x): its W, ∂E/∂W and state are still in the cache then
        self.backward_updating = None if self.ranges is None else (
            [*steps[-1].grads, *self._update_of(len(steps) - 1)]
            + [c for k in range(len(steps) - 2, -1, -1) for c in (*steps[k].make_delta, *steps[k].grads,
                                                                  *self._update_of(k))])
        self._part: Callable[[int, int], None] | None = None
        out = steps[-1].bufs
        self.loss_backward = self.ops.bind_loss_backward(loss, self.layers[-1], out, grad_y)
        self.seen = BINDINGS.value              # after the buffers above: what they noted is seen

    def _update_of(self, k: int) -> list[Callable[[], None]]:
        """The call updating layer k in :attr:`backward_updating` (none for the first layer: :meth:`run` updates
        it after its ∂E/∂W, the last product of the step)."""
        return [partial(self._update, *self.ranges[k])] if k else []       # type: ignore[index]

    def _update(self, start: int, stop: int) -> None:
        self._part(start, stop)          # type: ignore[misc]

    def current(self, loss: Loss) -> bool:
        """Whether this plan still binds what a step would use (see the class docstring)."""
        return (loss is self.loss and self.generation == self.ops.generation
                and [layer.buffer_epoch for layer in self.layers] == self.epochs
                and ("backward" in self.loss_attributes) == self.own_backward
                and ("fused_backward" in self.loss_attributes) == self.own_fused
                and (not self.tuned or all(act.param == p for act, p in self.tuned))
                and all(own_methods(act) == own for act, own in self.act_methods))

    def run(self, x: Array, t: Array, value_out: Array | None, optimizer: Optimizer | None = None) -> Array:
        """One step's forward and backward on batch x (shaped (rows, n_in)) for targets t, then the update by
        ``optimizer`` where one is given; returns the loss."""
        if self.backprop.shown is not self:
            below = x
            for layer, step in zip(self.layers, self.steps):
                layer.show(below, step.bufs)
                below = step.bufs.y
            self.backprop.shown = self
        else:
            self.first.x = x
        matmul = self.matmul
        matmul(x, self.first_W, self.first_z)                  # z = x·W of the first layer
        for call in self.forward:
            call()
        value, direct = self.loss_backward(t, value_out)
        if not direct:
            for call in self.output_delta:
                call()
        part, mask = None, None
        if optimizer is not None:                              # step 5, as Backprop.update
            wd = optimizer.__dict__.get("weight_decay")        # as _weight_decay reads it
            mask = self.store.decay_mask() if wd or (wd is None and getattr(optimizer, "weight_decay", 0.0)) else None
            if self.ranges is not None:                        # layer by layer, in the backward pass, where it can
                part = self._part = optimizer.split_update(self.params, self.grads, mask, self.ops)
        for call in (self.backward if part is None else self.backward_updating):     # type: ignore[union-attr]
            call()
        matmul(x.T, self.first_delta, self.first_gW)           # ∂E/∂W of the first layer (eq 8)
        if part is not None:
            self._part = None
            part(*self.ranges[0])                              # type: ignore[index]
        elif optimizer is not None:
            optimizer.update(self.params, self.grads, mask, self.ops)
        return value
