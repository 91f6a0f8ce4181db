"""The fully connected layer: neurons with inputs, weights with a bias, and an activation (lecture §1.1).

Notation follows the lecture: node i in the layer below feeds node j through weight w_ij, so
``W[i, j]`` is w_ij and ``W`` has shape (n_in, n_out). For a minibatch X of shape (batch, n_in):

    z = X·W + b,   y = f(z)                                  (forward)
    δ = f′(z) ⊙ ∂E/∂y                                        (eqs 10–11)
    ∂E/∂W = Xᵀ·δ   i.e. ∂E/∂w_ij = Σ_batch y_i δ_j           (eq 8)
    ∂E/∂b = Σ_batch δ
    ∂E/∂y_i = Σ_j w_ij δ_j,  i.e. δ·Wᵀ, for the layer below   (eq 7)

so the layer below computes δ_j = f′(z_j) Σ_k w_jk δ_k, eq (14), from what ``backward`` returns.
Buffers are made once per batch size and written with ``out=``: a step allocates nothing.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy

from . import activations
from . import init as initializers
from .errors import ConfigError
from .kernels import MAX_BATCH_SIZES  # batch sizes whose training buffers a layer keeps
from .ops import BINDINGS, XpOps
from .scalars import integer
from .types import Array, ArrayModule
from .validation import as_model_array

__all__ = ["Dense", "Buffers", "BoundStep"]




class Buffers:
    """Work arrays of one layer for one batch size: z, y and (for training) δ, ∂E/∂x and scratch."""

    __slots__ = ("z", "y", "delta", "dx", "scratch", "rowstats")

    def __init__(self, xp: ArrayModule, batch: int, n_in: int, n_out: int, dtype: numpy.dtype,
                 act: activations.Activation, input_grad: bool, training: bool = True):
        self.z = xp.empty((batch, n_out), dtype)
        self.y = self.z if act.name == "identity" else xp.empty((batch, n_out), dtype)
        self.rowstats = xp.empty((2, batch), dtype) if act.rowwise else None
        self.delta = xp.empty((batch, n_out), dtype) if training else None
        self.dx = xp.empty((batch, n_in), dtype) if training and input_grad else None
        self.scratch = xp.empty((batch, n_out), dtype) if training and act.needs_scratch else None

    def rows(self, n: int) -> tuple[Array, Array, Array | None]:
        """(z, y, rowstats) views of the first ``n`` rows (C-contiguous, like the whole arrays: rowstats's
        first 2n values as (2, n))."""
        stats = None if self.rowstats is None else self.rowstats.reshape(-1)[:2 * n].reshape(2, n)
        return self.z[:n], self.y[:n], stats


class BoundStep:
    """A layer's part of one training step, bound to its buffers (:meth:`Dense.bound_step`): the forward
    calls, the calls making δ from ∂E/∂y, and the calls making the gradients and ∂E/∂x from δ."""

    __slots__ = ("bufs", "forward", "make_delta", "grads")

    def __init__(self, bufs: Buffers, forward: list, make_delta: list, grads: list):
        self.bufs, self.forward, self.make_delta, self.grads = bufs, forward, make_delta, grads


class _Fixed:
    """A layer attribute set once, by the constructor: its buffers, its place in the network's parameters and
    the network's checks (chaining, softmax last) were made for that value, so a later assignment is refused."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else obj.__dict__[self.name]

    def __set__(self, obj: Any, value: Any) -> None:
        if self.name in obj.__dict__:
            raise ConfigError(f"a Dense layer's {self.name} is fixed when it is made; build a new gpunn.Dense "
                              "(and a new network) instead")
        obj.__dict__[self.name] = value


class Dense:
    """A fully connected layer of ``n_out`` neurons over ``n_in`` inputs.

    Parameters
    ----------
    n_in, n_out : int
        Number of inputs and of neurons.
    activation : str, dict or Activation, default "sigmoid"
        One of :func:`gpunn.activations.names`, e.g. ``"relu"`` or ``gpunn.activations.ELU(a=0.5)``.
    init : {"small", "xavier", "he"}, optional
        Weight initialiser; Xavier for sigmoid/tanh/softmax/identity, He for the ReLU family.

    After a forward and backward pass the layer exposes ``W, b, z, y, delta, grad_W, grad_b``.
    """

    n_in, n_out, activation, init = _Fixed(), _Fixed(), _Fixed(), _Fixed()

    def __init__(self, n_in: int, n_out: int, activation: activations.ActivationSpec = "sigmoid",
                 init: str | None = None):
        self.n_in, self.n_out = integer("Dense n_in", n_in, low=1), integer("Dense n_out", n_out, low=1)
        self.activation = activations.get(activation)
        self.init = init if init is not None else initializers.default_for(self.activation.name)
        initializers.get(self.init)  # validate the name now, not at the first fit
        self._W: Array = None
        self._b: Array = None
        self._gW: Array = None
        self._gb: Array = None
        self._bufs: dict[int, Buffers] = {}
        self._infer_bufs: Buffers | None = None
        #: counts the changes of the training buffers (made, freed, or dropped with new parameters), each
        #: also noted in gpunn.ops.BINDINGS: calls bound to older ones (gpunn.backprop.StepPlan) are made again.
        self.buffer_epoch = 0
        self._network: weakref.ref | None = None
        self.input_grad = True      # the network turns it off for the first layer
        self.x: Array = None
        self.z: Array = None
        self.y: Array = None
        self.delta: Array = None
        self.rowstats: Array = None

    # -- parameters (views into the network's flat buffers) ---------------------------------------
    def attach(self, network: object) -> None:
        """Make this layer part of ``network``; a layer already in another live network is refused, since
        its W and b are views of that network's parameters (sharing would silently rebind them)."""
        current = self._network() if self._network is not None else None
        if current is not None and current is not network:
            raise ConfigError(f"{self!r} already belongs to another network (its W and b are views of that "
                              "network's parameters); create new layers, or copy.deepcopy the network")
        self._network = weakref.ref(network)

    def bind(self, W: Array, b: Array, grad_W: Array, grad_b: Array) -> None:
        """Use these arrays (views of the network's flat parameter/gradient buffers) as W, b and grads."""
        self._W, self._b, self._gW, self._gb = W, b, grad_W, grad_b
        self._bufs.clear()
        self.buffer_epoch += 1
        BINDINGS.note()
        self._infer_bufs = None

    def initial_weights(self, rng: numpy.random.Generator) -> numpy.ndarray:
        """Draw this layer's initial W on the host (float64)."""
        return initializers.get(self.init)(rng, self.n_in, self.n_out)

    W = property(lambda self: self._W, lambda self, v: self._assign(self._W, v, "W"),
                 doc="weights, shape (n_in, n_out): W[i, j] = w_ij")
    b = property(lambda self: self._b, lambda self, v: self._assign(self._b, v, "b"), doc="biases, shape (n_out,)")
    grad_W = property(lambda self: self._gW, doc="∂E/∂W after backward (eq 8)")
    grad_b = property(lambda self: self._gb, doc="∂E/∂b after backward")

    def _assign(self, target: Array, value: Any, name: str) -> None:
        if target is None:
            raise ConfigError("this layer is not part of a network yet; build a gpunn.Sequential first")
        arr = as_model_array(value, target, name)
        target[...] = arr

    # -- the pass ---------------------------------------------------------------------------------
    def buffers(self, xp: ArrayModule, batch: int) -> Buffers:
        """The training buffers for ``batch`` rows (made on first use, then reused)."""
        bufs = self._bufs.pop(batch, None)
        if bufs is None:
            bufs = Buffers(xp, batch, self.n_in, self.n_out, self._W.dtype, self.activation, self.input_grad)
            while len(self._bufs) >= MAX_BATCH_SIZES:       # bounded: the least recently used size goes
                self._bufs.pop(next(iter(self._bufs)))
            self.buffer_epoch += 1
            BINDINGS.note()
        self._bufs[batch] = bufs                            # most recently used last
        return bufs

    def bound_step(self, ops: XpOps, rows: int, x: Array | None, grad_y: Array,
                   delta_always: bool = False, dx: Array | None = None) -> BoundStep:
        """This layer's part of a training step of ``rows`` rows as calls bound to its buffers (made once per
        batch size, then run by :class:`gpunn.backprop.StepPlan`): the same operations, in the same order, as
        :meth:`forward` and :meth:`backward`. ``x`` is the layer below's y buffer, or None for the first
        layer, whose input is the step's batch (the plan multiplies it itself); ``grad_y`` is the
        ∂E/∂y buffer this layer's δ is made from (the layer above's ∂E/∂x, or the loss's). Where the step
        always runs this layer's ``make_delta`` (``delta_always``: a hidden layer) and the ops can, δ's
        column sum ∂E/∂b is made in δ's own pass (:meth:`gpunn.ops.XpOps.bind_backward_and_sum`). ``dx``: where
        ∂E/∂x goes (default this layer's ``dx`` buffer; the plan may give the layer below's δ buffer, for that
        layer to make its δ over it in place); ``grad_y`` may be this layer's own δ buffer, where the ops can
        make δ in place (:meth:`gpunn.ops.XpOps.delta_in_place`)."""
        bufs = self.buffers(ops.xp, rows)
        act, z, y, delta = self.activation, bufs.z, bufs.y, bufs.delta
        forward = [] if x is None else [ops.bind_matmul(x, self._W, z)]                # z = x·W
        forward += ops.bind_forward(act, z, self._b, y, bufs.rowstats)                    # + b, y = f(z)
        both = ops.bind_backward_and_sum(act, z, y, grad_y, delta, self._gb) if delta_always else None
        make_delta = (ops.bind_backward(act, z, y, grad_y, delta, bufs.scratch, bufs.rowstats)    # eq (11)
                      if both is None else both)                                      # eq (11) and ∂E/∂b
        grads = [] if x is None else [ops.bind_matmul(x.T, delta, self._gW)]           # eq (8)
        grads += ops.bind_column_sum(delta, self._gb) if both is None else []
        if self.input_grad:
            grads.append(ops.bind_matmul(delta, self._W.T, bufs.dx if dx is None else dx))    # eq (7)
        return BoundStep(bufs, forward, make_delta, grads)

    def show(self, x: Array, bufs: Buffers) -> None:
        """Expose a bound step's arrays as :meth:`forward` and :meth:`backward` do (``x, z, y, delta``)."""
        self.x, self.z, self.y, self.rowstats, self.delta = x, bufs.z, bufs.y, bufs.rowstats, bufs.delta

    def keep_own_input(self) -> None:
        """Hold a copy of the last training batch's x instead of a view: the array it viewed (a shuffled copy
        of a whole training set) can then be freed once training ends."""
        if self.x is not None:
            self.x = self.x.copy()

    def _pre_activation(self, x: Array, z: Array, y: Array, rowstats: Array | None, ops: XpOps) -> Array:
        """z = x·W + b, y = f(z): a neuron's weighted inputs plus bias, then its activation (§1.1)."""
        ops.matmul(x, self._W, z)                                  # z_j = Σ_i w_ij y_i
        return ops.bias_activation(self.activation, z, self._b, y, rowstats)

    def forward(self, x: Array, ops: XpOps) -> Array:
        """y = f(x·W + b) for a batch x of shape (batch, n_in); returns the layer's y buffer.

        The layer keeps ``x, z, y`` for :meth:`backward` (and for a reader: lecture §2 step 2).
        """
        bufs = self._bufs.get(x.shape[0]) or self.buffers(ops.xp, x.shape[0])
        z, y = bufs.z, bufs.y
        ops.matmul(x, self._W, z)                                  # z_j = Σ_i w_ij y_i
        ops.bias_activation(self.activation, z, self._b, y, bufs.rowstats)
        self.x, self.z, self.y, self.rowstats = x, z, y, bufs.rowstats
        return y

    def infer(self, x: Array, ops: XpOps) -> tuple[Array, Array]:
        """(z, y) for a batch x, in inference buffers: the training buffers and ``x, z, y`` stay as they were.

        The same operations as :meth:`forward` (fused kernels on a GPU). The buffers grow to the largest
        batch seen and are reused; the result is overwritten by the next call.
        """
        n = x.shape[0]
        bufs = self._infer_bufs
        if bufs is None or bufs.z.shape[0] < n:
            bufs = self._infer_bufs = Buffers(ops.xp, n, self.n_in, self.n_out, self._W.dtype, self.activation,
                                              input_grad=False, training=False)
        z, y, rowstats = bufs.rows(n)
        self._pre_activation(x, z, y, rowstats, ops)
        return z, y

    def backward(self, grad_y: Array, ops: XpOps, delta_ready: bool = False) -> Array | None:
        """From ∂E/∂y of this layer's outputs, compute δ, grad_W, grad_b; return ∂E/∂x (or None).

        With ``delta_ready`` the loss has already written this layer's δ (y − y* forms).
        """
        bufs = self._bufs[self.x.shape[0]]
        if not delta_ready:
            ops.activation_backward(self.activation, bufs.z, bufs.y, grad_y, bufs.delta, bufs.scratch,
                                    bufs.rowstats)                     # δ_j = f′(z_j) ∂E/∂y_j (eq 11)
        self.delta = bufs.delta
        ops.matmul(self.x.T, bufs.delta, self._gW)               # ∂E/∂w_ij = y_i δ_j (eq 8)
        ops.column_sum(bufs.delta, self._gb)
        if not self.input_grad:
            return None
        return ops.matmul(bufs.delta, self._W.T, bufs.dx)        # ∂E/∂y_i = Σ_j w_ij δ_j (eq 7)

    def config(self) -> dict:
        return {"type": "Dense", "n_in": self.n_in, "n_out": self.n_out,
                "activation": self.activation.config(), "init": self.init}

    @classmethod
    def from_config(cls, config: dict) -> Dense:
        """A fresh layer from :meth:`config`'s dict."""
        return cls(config["n_in"], config["n_out"], activation=config["activation"], init=config.get("init"))

    def __getstate__(self) -> dict:
        # The weights belong to the network (views of its flat buffer); a layer pickles as its configuration.
        return self.config()

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["n_in"], state["n_out"], activation=state["activation"],  # type: ignore[misc]
                      init=state.get("init"))

    def __repr__(self) -> str:
        return f"Dense({self.n_in}, {self.n_out}, activation={self.activation!r})"
