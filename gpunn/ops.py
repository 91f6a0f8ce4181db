"""The elementwise operations of a layer's pass, for one device: the compute layer.

:class:`XpOps` writes them with the array namespace ``xp`` and ``out=`` buffers; it serves NumPy and
CuPy alike and is the reference. With fused kernels on, the same operations run as single kernels,
falling back to the reference where no kernel covers a case: on a CUDA device :class:`FusedOps` with the
CUDA kernels of :mod:`gpunn.kernels`; on the CPU :class:`CpuFusedOps` with the numba kernels of
:mod:`gpunn.cpukernels`, bitwise equal to the reference, where numba is installed. :func:`ops_for`
chooses for a device: layers and optimisers receive an ops object and never ask which backend they
run on. Each step starts with :meth:`XpOps.begin_step`, which on the CPU applies gpunn's choice of BLAS
threads for the step's work (:mod:`gpunn.threads`).
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from . import cpukernels, threads
from .activations import BACKWARD, FORWARD, Activation, own_methods, watch_methods
from .backend import Device
from .kernels import FusedKernels
from .losses import CrossEntropy, Loss, SquaredError
from .registry import Registry
from .scalars import env_flag, flag
from .types import Array, OutputBuffers, OutputLayer

__all__ = ["XpOps", "FusedOps", "CpuFusedOps", "ops_for", "fused_enabled", "Changes", "BINDINGS"]


def fused_enabled() -> bool:
    """Whether gpunn's fused kernels are used by default, CUDA ones on a GPU and numba ones on the CPU
    (``GPUNN_FUSED=0`` turns both off; a value that is not a switch, such as ``maybe``, is a ConfigError:
    :func:`gpunn.scalars.parse_flag`)."""
    return env_flag("GPUNN_FUSED", True)


class Changes:
    """A record of changes to what bound calls hold (:class:`gpunn.backprop.StepPlan`): a layer's buffers
    made, freed or dropped with new parameters (``Dense.buffer_epoch``), an ops' calls changed (the CPU
    kernels loaded: ``generation``). Each change draws a new number from one count into :attr:`value`, so a
    value once replaced never comes back (two threads may store their draws out of order, never an old
    one again): a plan that read ``value`` and reads the same number later knows that nothing it holds
    has changed in between, in one comparison."""

    __slots__ = ("value", "_draw")

    def __init__(self) -> None:
        self._draw = itertools.count(1).__next__       # next() of a count: one atomic C call
        self.value = 0

    def note(self) -> None:
        """Record a change."""
        self.value = self._draw()


#: The process's one record of changes to what bound calls hold (every network's layers and ops, and an
#: activation instance given or losing a method of its own, which a kernel bound in its place must follow).
BINDINGS = Changes()
watch_methods(BINDINGS.note)


#: the squared error's own backward and the cross-entropy's own backward and fused form, which the numba
#: path's bound calls replace (only those)
_SQUARED_BACKWARD = SquaredError.backward
_CROSS_ENTROPY_BACKWARD = CrossEntropy.backward
_CROSS_ENTROPY_FUSED = CrossEntropy.fused_backward


class XpOps:
    """Reference implementation over any array namespace."""

    #: True where the operations run as fused kernels (CUDA, or numba on the CPU).
    fused = False

    def __init__(self, device: Device):
        self.device = device
        self.xp = device.xp
        #: called at the start of every step with the multiply-adds of its largest matrix product (batch rows
        #: × the widest layer's weights): the CPU's BLAS thread choice
        self.begin_step = _nothing if device.is_cuda else threads.policy().apply
        #: the thread policy whose ``apply`` :attr:`begin_step` is (None where it is not only that): a step
        #: whose work is its ``settled`` work may skip begin_step (:attr:`gpunn.threads.ThreadPolicy.settled`)
        self.threads: threads.ThreadPolicy | None = None if device.is_cuda else threads.policy()
        # NumPy's ndarray.sum is a Python wrapper around add.reduce: one call fewer per layer and step
        self._column_sum = (lambda d, axis, out: d.sum(axis=axis, out=out)) if device.is_cuda else self.xp.add.reduce
        # NumPy's take in its default mode ('raise') gathers into a temporary and copies it to ``out``;
        # the rows gathered here are a permutation, always in range, so 'clip' gives the same rows
        # without the copy. CuPy's take has no mode and writes ``out`` directly.
        self._take_mode = {} if device.is_cuda else {"mode": "clip"}
        #: matmul(a, b, out): out = a·b. NumPy's dot is its matmul's BLAS call (bitwise the same result,
        #: tests/test_plan.py) at less than half the call's cost (bench/lecture_floor.py), which counts in
        #: the lecture's Python-bound step;
        #: its C function itself (``_implementation``, where NumPy has one) skips the __array_function__
        #: dispatch, which only ndarray subclasses and duck arrays need: gpunn passes its own ndarrays.
        self.matmul = _cupy_matmul(self.xp) if device.is_cuda else getattr(self.xp.dot, "_implementation",
                                                                            self.xp.dot)
        #: changes whenever the calls this ops would bind change (the CPU kernels loaded), noted in
        #: :data:`BINDINGS`: a step's bound calls (gpunn.backprop.StepPlan) made before are then made again.
        self.generation = 0

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
        return self._column_sum(delta, axis=0, out=out)

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

    # -- the same operations bound to their arrays: calls taking no argument, made once per batch size
    def bind_matmul(self, a: Array, b: Array, out: Array) -> Callable[[], Any]:
        """out = a·b, as a call."""
        return partial(self.matmul, a, b, out)

    def bind_forward(self, act: Activation, z: Array, b: Array, y: Array,
                     rowstats: Array | None) -> list[Callable[[], Any]]:
        """:meth:`bias_activation` on these arrays, as calls to make in order."""
        return [partial(self.bias_activation, act, z, b, y, rowstats)]

    def bind_backward(self, act: Activation, z: Array, y: Array, grad: Array, out: Array, scratch: Array | None,
                      rowstats: Array | None) -> list[Callable[[], Any]]:
        """:meth:`activation_backward` on these arrays, as calls to make in order."""
        return [partial(self.activation_backward, act, z, y, grad, out, scratch, rowstats)]

    def bind_backward_and_sum(self, act: Activation, z: Array, y: Array, grad: Array, out: Array,
                              sums: Array) -> list[Callable[[], Any]] | None:
        """:meth:`bind_backward` and :meth:`bind_column_sum` of ``out`` into ``sums`` in one pass, where this
        ops has such calls; None (bind them apart) here."""
        return None

    def delta_in_place(self, act: Activation, dtype: Any) -> bool:
        """Whether :meth:`bind_backward` (and :meth:`bind_backward_and_sum`) for ``act`` in ``dtype`` may be given
        one array as ``grad`` and ``out``: δ made over ∂E/∂y in place, each value read before its own is written
        and no other. Not here: the reference's chains write ``out`` before they are done reading ``grad``."""
        return False

    def bind_column_sum(self, delta: Array, out: Array) -> list[Callable[[], Any]]:
        """:meth:`column_sum` on these arrays, as calls to make in order."""
        if self.device.is_cuda:
            return [partial(self.column_sum, delta, out)]
        return [partial(self.xp.add.reduce, delta, 0, None, out)]     # NumPy's add.reduce(d, axis, dtype, out)

    def bind_loss_backward(self, loss: Loss, layer: OutputLayer, bufs: OutputBuffers,
                           grad_y: Array) -> Callable[[Array, Array | None], tuple[Array, bool]]:
        """:meth:`loss_backward` of ``layer`` (its training buffers ``bufs``: z, y, rowstats, δ) into δ or
        ``grad_y``, as a call taking the targets and the value's ``out``."""
        delta = bufs.delta

        def backward(t: Array, out: Array | None) -> tuple[Array, bool]:
            return self.loss_backward(loss, layer, t, grad_y, delta, out)
        return backward

    def warm_up(self) -> None:
        """Load now whatever this ops would load lazily (nothing here; see :class:`CpuFusedOps`)."""

    def sgd_update(self, params: Array, grads: Array, velocity: Array | None, mask: Array | None, lr: float,
                   momentum: float, nesterov: bool, weight_decay: float) -> bool:
        """:meth:`gpunn.optim.SGD.update`'s whole formula as one fused operation, where this ops has one;
        returns False (nothing done) where the optimiser must run its own ``xp`` formula."""
        return False

    def sgd_update_parts(self) -> bool:
        """Whether :meth:`sgd_update_part` gives a function (for any buffers and settings): asked before an
        optimiser does a step's bookkeeping for it (η, the step count), which its own update would do again
        where it does not. False here."""
        return False

    def sgd_update_part(self, params: Array, grads: Array, velocity: Array | None, mask: Array | None, lr: float,
                        momentum: float, nesterov: bool, weight_decay: float) -> Callable[[int, int], None] | None:
        """:meth:`sgd_update` as a function ``part(start, stop)`` doing it on ``[start:stop]`` of the flat
        buffers (the same arithmetic on each value), where this ops has one (:meth:`sgd_update_parts`); None
        here."""
        return None


def _nothing(work: int) -> None:
    """A GPU's step needs no thread choice."""


def _cupy_matmul(cp: Any) -> Callable[[Array, Array, Array], Array]:
    def matmul(a: Array, b: Array, out: Array) -> Array:
        return cp.matmul(a, b, out=out)
    return matmul


class FusedOps(XpOps):
    """:class:`XpOps` with each elementwise chain as one CUDA kernel (:class:`gpunn.kernels.FusedKernels`)."""

    fused = True

    def __init__(self, device: Device):
        super().__init__(device)
        self.kernels = FusedKernels(device)

    def bias_activation(self, act, z, b, y, rowstats):
        # the kernels are the classes' own forward: a subclass (another key) or an instance's own runs itself
        if own_methods(act, FORWARD):
            done = False
        elif act.rowwise:
            done = Registry.key_of(type(act)) == "softmax" and self.kernels.softmax(z, b, y, rowstats)
        else:
            done = self.kernels.bias_activation(act, z, b, y)
        return y if done else super().bias_activation(act, z, b, y, rowstats)

    def activation_backward(self, act, z, y, grad, out, scratch, rowstats):
        if not own_methods(act, BACKWARD) and self.kernels.activation_backward(act, z, y, grad, out):
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


class CpuFusedOps(XpOps):
    """:class:`XpOps` on NumPy with each elementwise chain as numba kernels
    (:class:`gpunn.cpukernels.CpuKernels`), bitwise equal to the reference (tests/test_cpukernels.py).

    The function running an activation's chain is looked up once per activation object and dtype
    (the lecture's 4-8-1 step is bound by Python calls, so a step does no more dictionary work than
    it must).

    With ``lazy`` (a network on the default settings) the ops run the reference until the network has
    been stepping for :data:`LAZY_SECONDS`, and only then load the kernels: numba's start-up (its import,
    its code generator, the cached kernels; 0.3–2 s once per process) is never paid by a short run (a
    test, ``gpunn train`` on the digits) and is a small share of a long one. The switch cannot change a
    result, the two paths being bitwise equal. :meth:`warm_up` loads them at once (benchmarks do).
    """

    fused = True
    #: Seconds of training after which a lazy CpuFusedOps loads the kernels.
    LAZY_SECONDS = 2.0

    def __init__(self, device: Device, lazy: bool = False):
        super().__init__(device)
        self.kernels: Any = None
        self._fwd: dict[int, tuple] = {}     # id(activation) -> (activation, dtype, function or None)
        self._bwd: dict[int, tuple] = {}
        self._values: dict[Any, Array] = {}  # dtype -> one-element scratch for the loss value
        #: (params, grads, lr, lr in their dtype, the plain-SGD kernel compiled for them) of the last update
        self._sgd_plain: tuple = (None, None, None, None, None)
        self._zero = {self.xp.dtype(t): self.xp.dtype(t).type(0.0) for t in ("float32", "float64")}
        self._apply_threads, self._threads = self.begin_step, self.threads
        self._since: float | None = None
        if lazy and not cpukernels.loaded():
            self.begin_step, self.threads = self._lazy_begin_step, None     # called at every step
        else:
            self.warm_up()

    def warm_up(self) -> None:
        """Load the kernels now; where numba does not import, stay on the reference (``fused`` False)."""
        if self.kernels is None:
            if cpukernels.available():
                self.kernels = cpukernels.CpuKernels()
                self._colsum, self._plain = self.kernels.k.colsum, self.kernels.k.sgd_plain
                self.generation += 1
                BINDINGS.note()
            else:
                self.fused = False
        self.begin_step, self.threads = self._apply_threads, self._threads

    def _lazy_begin_step(self, work: int) -> None:
        self._apply_threads(work)
        now = time.perf_counter()
        if self._since is None:
            self._since = now
        elif now - self._since >= self.LAZY_SECONDS:
            self.warm_up()

    def _binder(self, cache: dict, make: Callable, act: Activation, dtype: Any) -> Callable | None:
        """The kernels' binder for ``act`` in ``dtype`` (made once per activation object, dtype and parameter:
        α or a is assignable between steps, and the binder holds it as a constant)."""
        hit, param = cache.get(id(act)), act.param
        if hit is None or hit[0] is not act or hit[1] is not dtype or hit[2] != param:
            hit = cache[id(act)] = (act, dtype, param, make(act, dtype))
        return hit[3]

    def bind_forward(self, act, z, b, y, rowstats, call=cpukernels.bind):
        binder = (None if self.kernels is None or own_methods(act, FORWARD)    # the instance's own forward: it runs
                  else self._binder(self._fwd, self.kernels.forward, act, z.dtype))
        calls = None if binder is None else binder(z, b, y, rowstats, call)
        return [partial(XpOps.bias_activation, self, act, z, b, y, rowstats)] if calls is None else calls

    def _backward_binder(self, act: Activation, dtype: Any) -> Callable | None:
        if self.kernels is None or own_methods(act, BACKWARD):     # the instance's own backward or derivative
            return None
        return self._binder(self._bwd, self.kernels.backward, act, dtype)

    def bind_backward(self, act, z, y, grad, out, scratch, rowstats, call=cpukernels.bind):
        binder = self._backward_binder(act, z.dtype)
        if binder is None:
            return [partial(XpOps.activation_backward, self, act, z, y, grad, out, scratch, rowstats)]
        return binder(z, y, grad, out, call)

    def bind_backward_and_sum(self, act, z, y, grad, out, sums):
        binder = self._backward_binder(act, z.dtype)
        if binder is None or not self._kernel_sums(out):
            return None
        return binder(z, y, grad, out, cpukernels.bind, sums)

    def delta_in_place(self, act, dtype):
        return self._backward_binder(act, dtype) is not None and self.kernels.in_place(act)

    def _kernel_sums(self, delta: Array) -> bool:
        """Whether the colsum kernel sums ``delta`` as NumPy does: NumPy sums the rows of an array of two or
        more columns one after the other, from 0; a single column it sums pairwise, which is the same order
        below 8 rows: from 8 rows the reference runs."""
        rows, cols = delta.shape
        return self.kernels is not None and rows > 0 and (cols >= 2 or rows < 8)

    def bind_column_sum(self, delta, out):
        if not self._kernel_sums(delta):
            return super().bind_column_sum(delta, out)
        return [cpukernels.bind(self._colsum, delta, out, self._zero[delta.dtype])]

    def bind_loss_backward(self, loss, layer, bufs, grad_y):
        """Bound kernels where ``loss`` runs SquaredError's own backward, or CrossEntropy's own backward and
        fused form after a softmax (its class's, none of a subclass's or the instance's: a plan holding the call
        is made again when the instance gets a backward or a fused_backward, :class:`gpunn.backprop.StepPlan`);
        the loss's backward otherwise."""
        if self.kernels is not None and "backward" not in vars(loss) and "fused_backward" not in vars(loss):
            if type(loss).backward is _SQUARED_BACKWARD:
                return self.kernels.squared_error(bufs.y, grad_y)
            if (type(loss).fused_backward is _CROSS_ENTROPY_FUSED and type(loss).backward is _CROSS_ENTROPY_BACKWARD
                    and bufs.rowstats is not None):
                return self.kernels.bound_cross_entropy(bufs.z, bufs.y, bufs.rowstats, bufs.delta)
        return super().bind_loss_backward(loss, layer, bufs, grad_y)

    def bias_activation(self, act, z, b, y, rowstats):
        if self.kernels is None:
            return super().bias_activation(act, z, b, y, rowstats)
        for step in self.bind_forward(act, z, b, y, rowstats, partial):     # calls made once: no binding
            step()
        return y

    def activation_backward(self, act, z, y, grad, out, scratch, rowstats):
        if self.kernels is None:
            return super().activation_backward(act, z, y, grad, out, scratch, rowstats)
        for step in self.bind_backward(act, z, y, grad, out, scratch, rowstats, partial):
            step()
        return out

    def column_sum(self, delta, out):
        if not self._kernel_sums(delta):
            return self._column_sum(delta, axis=0, out=out)
        self._colsum(delta, out, self._zero[delta.dtype])
        return out

    def loss_backward(self, loss, layer, t, grad_y, delta, out):
        if type(loss).fused_backward is not Loss.fused_backward and self.kernels is not None:  # a fused form
            value = out
            if value is None:
                value = self._values.get(t.dtype)
                if value is None:
                    value = self._values[t.dtype] = self.xp.empty(1, t.dtype)
            if loss.fused_backward(self.kernels, layer, t, delta, value):
                return (out if out is not None else value[0]), True   # value[0]: a NumPy scalar, as XpOps gives
        value, direct = loss.backward(layer, t, grad_y, delta)
        if out is None:
            return value, direct
        out[...] = value
        return out, direct

    def sgd_update(self, params, grads, velocity, mask, lr, momentum, nesterov, weight_decay):
        if self.kernels is None:
            return False
        if velocity is None and not weight_decay:       # plain SGD, eq (15): one kernel call
            plain = self._sgd_plain
            if plain[0] is not params or plain[1] is not grads or plain[2] != lr:
                plain = self._sgd_plain = self._plain_sgd(params, grads, lr)
            plain[4](params, grads, plain[3])
            return True
        self.kernels.sgd_update(params, grads, velocity, mask, lr, momentum, nesterov, weight_decay)
        return True

    def sgd_update_parts(self):
        return self.kernels is not None         # a plan made before they load is made again (generation)

    def sgd_update_part(self, params, grads, velocity, mask, lr, momentum, nesterov, weight_decay):
        return self.kernels.sgd_part(params, grads, velocity, mask, lr, momentum, nesterov, weight_decay)

    def _plain_sgd(self, params: Array, grads: Array, lr: float) -> tuple:
        """:attr:`_sgd_plain` for these buffers and η: the kernel compiled again only for other buffers."""
        last, rate = self._sgd_plain, params.dtype.type(lr)
        same = last[0] is params and last[1] is grads
        return params, grads, lr, rate, last[4] if same else cpukernels.compiled_for(self._plain, params, grads, rate)


def ops_for(device: Device, fused: bool | None = None) -> XpOps:
    """The operations for ``device``: with ``fused`` (default: :func:`fused_enabled`) on, the fused
    CUDA kernels on a GPU and the numba kernels on the CPU where numba is installed (by default loaded
    after :data:`CpuFusedOps.LAZY_SECONDS` of training, with ``fused=True`` at once); else the ``xp``
    reference. ``fused`` (or ``GPUNN_FUSED``) is checked on every device, so a bad value is refused on
    the CPU too rather than first on a GPU."""
    on = fused_enabled() if fused is None else flag("fused", fused)
    if not on:
        return XpOps(device)
    if device.is_cuda:
        return FusedOps(device)
    if fused is None:
        return CpuFusedOps(device, lazy=True) if cpukernels.installed() else XpOps(device)
    return CpuFusedOps(device) if cpukernels.available() else XpOps(device)
