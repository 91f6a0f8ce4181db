"""Optimisers that update a network's parameters in place, on their device.

:class:`SGD` is the lecture's update rule, eq (15): w_ij ← w_ij − η δ_j y_i, i.e. w ← w − η ∂E/∂w
with ∂E/∂w from eq (8), here averaged over the minibatch, plus optional momentum, Nesterov momentum
and L2 weight decay (on weights, not biases). :class:`Adam` is Kingma & Ba's method.
Hyper-parameters stay Python floats so float32 parameters stay float32 (NumPy 2 / NEP 50 promotion).
Each optimiser works on the network's single flat parameter buffer. The update formula is written
once, with ``xp``, in the optimiser; on a GPU with fused kernels :class:`SGD` runs the same formula as
one fused kernel through the ops' hook (:meth:`gpunn.ops.XpOps.sgd_update`).

On the CPU the formula is applied block by block (:data:`BLOCK` elements at a time) with small
scratch arrays, so the temporaries stay in the cache: at 784-512-512-10 (670k parameters, float32)
that makes a plain SGD step 285 µs instead of 400 µs, and a momentum step 525 µs instead of 670 µs.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy

from .backend import to_host
from .errors import ConfigError
from .ops import XpOps
from .registry import Registry, round_trip
from .scalars import Checked, flag, is_number, real, shown
from .schedules import Schedule
from .schedules import from_config as schedule_from_config
from .types import Array, ArrayModule

__all__ = ["Optimizer", "SGD", "Adam", "REGISTRY", "from_config", "get", "names", "portable_config"]


def _learning_rate(name: str, value: Any) -> float | Schedule:
    """A learning rate: a positive finite number, or a schedule (a function of the global step)."""
    if isinstance(value, Schedule):
        return value
    if not is_number(value):
        raise ConfigError(f"{name} must be a positive finite number or a gpunn.schedules.Schedule; got "
                          f"{shown(value)} ({type(value).__name__})")
    return real(name, value, 0.0, low_open=True)


def _positive_float(name: str, value: Any) -> float:
    return real(name, value, 0.0, low_open=True)


def _unit_interval(name: str, value: Any) -> float:
    return real(name, value, 0.0, 1.0, high_open=True)


def _non_negative(name: str, value: Any) -> float:
    return real(name, value, 0.0)


def _nesterov_needs_momentum(opt: Any, name: str, value: Any) -> None:
    """Nesterov's update needs momentum: refuse a setting that would make nesterov on with μ = 0. The other
    setting is read as the update reads it: the attribute (a subclass's property too), None for unset as 0."""
    momentum = value if name == "momentum" else getattr(opt, "momentum", 0.0)
    nesterov = value if name == "nesterov" else getattr(opt, "nesterov", False)
    if nesterov and not momentum:
        raise ConfigError("nesterov=True needs momentum > 0" + (" (set nesterov = False first)"
                                                                 if name == "momentum" else ""))


def scheduled_lr(schedule: Schedule, step: int) -> float:
    """η from ``schedule`` at ``step``, checked: a finite real number >= 0 (a host number, so the check costs
    no device sync), else a ConfigError naming the schedule and the step."""
    value = schedule(step)
    if is_number(value):
        try:
            v = float(value)
        except OverflowError:
            v = math.inf
        if math.isfinite(v) and v >= 0.0:
            return v
    raise ConfigError(f"the learning-rate schedule {shown(schedule)} returned {shown(value)} "
                      f"({type(value).__name__}) at step {step}; a schedule must return a finite real number "
                      ">= 0 (a Python or NumPy float)")


def _hyper(value: Any) -> float:
    """A hyperparameter as the update uses it: a Python float (0.0 for None, a setting a subclass left unset, read
    as off). A subclass's own property or ``current_lr`` may give a NumPy float64 scalar, which NumPy would not
    round to a float32 network's dtype as it rounds a Python float, and the kernels would: so both paths get the
    same float, and the same bits."""
    return 0.0 if value is None else float(value)


#: Elements per block of the CPU update (1 MiB of float32); on a GPU the whole buffer is one block.
BLOCK = 1 << 18


class Optimizer:
    """Base class: ``update(params, grads, decay_mask, ops)`` applies one step to the flat buffers.

    State arrays (``_state_names``) are made the first time a parameter buffer is seen, and made
    afresh when a different buffer arrives (another network, or one moved to another device).
    """

    _state_names: tuple[str, ...] = ()
    name = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY.add(cls)       # files name optimisers by key (gpunn.registry): every subclass joins

    def __init__(self) -> None:
        self.state: dict[str, Array] = {}
        self.t = 0
        self._bound: Array = None
        self._scratch: list[Array] = []
        #: a weak reference to the network this optimiser trains (None while it trains none): :meth:`attach`
        self.owner_ref: weakref.ref | None = None
        self._pending: tuple[int, dict] | None = None

    def host_state(self) -> tuple[int, dict[str, numpy.ndarray]]:
        """(steps taken, state arrays as host copies): what a checkpoint or a pickle keeps."""
        if self._pending is not None:
            return self._pending
        return self.t, {k: numpy.array(to_host(v), copy=True) for k, v in self.state.items()}

    def load_state(self, t: int, arrays: dict[str, numpy.ndarray]) -> None:
        """Take this state (from :meth:`host_state`) for the network trained next: it replaces the state at
        the first update, moved to that network's device."""
        self.reset()
        self._pending = (int(t), {k: numpy.array(v) for k, v in arrays.items()})
        self.t = int(t)

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("state", "_bound", "_scratch", "owner_ref",
                                                                       "_pending")}
        state["_pending"] = self.host_state()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.state, self._bound, self._scratch, self.owner_ref = {}, None, [], None

    def attach(self, owner: object) -> None:
        """Record that ``owner`` (a network) is trained by this optimiser.

        Its state (momentum, moments, step count) belongs to one network: another live network gets a
        ConfigError instead of silently sharing or resetting it. :meth:`reset` frees the optimiser. A caller
        whose own weak reference is :attr:`owner_ref` already may skip the call (``weakref.ref`` of one
        object is one reference object while it lives, in CPython: gpunn's networks do).
        """
        current = self.owner_ref() if self.owner_ref is not None else None
        if current is owner:
            return
        if current is not None:
            raise ConfigError("this optimiser already trains another network and holds its state (momentum, "
                              "moments); create one optimiser per network, or call optimizer.reset() first")
        self.owner_ref = weakref.ref(owner)

    def _prepare(self, params: Array, ops: XpOps, scratch: int) -> None:
        """Make the state for ``params`` (if new) and ``scratch`` scratch arrays: one CPU block each, or
        the whole buffer on a GPU, where blocks would only add kernel launches."""
        xp = ops.xp
        if self._bound is not params:   # a new network (or one moved to another device)
            pending, self._pending = self._pending, None
            if pending is not None and all(getattr(pending[1].get(k), "shape", None) == params.shape
                                           for k in self._state_names):
                self.t = pending[0]      # state loaded from a pickle or a checkpoint: moved to this device
                self.state = {k: ops.device.asarray(pending[1][k], dtype=params.dtype) for k in self._state_names}
            else:
                self.state = {name: xp.zeros_like(params) for name in self._state_names}
                self.t = 0
            self._bound = params
            self._scratch = []
        for name in self._state_names:  # momentum switched on between steps: its velocity starts at zero
            if name not in self.state:
                self.state[name] = xp.zeros_like(params)
        for name in [k for k in self.state if k not in self._state_names]:
            del self.state[name]        # momentum switched off: no velocity steers (or waits for) later steps
        if len(self._scratch) < scratch:
            size = params.size if ops.device.is_cuda else min(BLOCK, params.size)
            self._scratch += [xp.empty(size, params.dtype) for _ in range(scratch - len(self._scratch))]

    def _blocks(self, params: Array, *others: Array | None) -> Iterator[tuple]:
        """``params`` and the flat ``others`` (None stays None) cut into matching blocks, each followed by
        the scratch arrays cut to the block's size."""
        arrays = (params, *others)
        n = params.size
        size = self._scratch[0].size if self._scratch else n
        if size >= n:               # one block (small networks, GPUs): no slicing
            yield arrays + tuple(self._scratch)
            return
        for start in range(0, n, size):
            stop = min(start + size, n)
            yield tuple(None if a is None else a[start:stop] for a in arrays) + \
                tuple(s[:stop - start] for s in self._scratch)

    #: η: a positive number or a Schedule, checked on every assignment (also ``opt.lr = ...`` in a callback).
    lr = Checked(_learning_rate, default=0.0)

    def current_lr(self) -> float:
        """η for the next step: the number, or the schedule at the number of steps taken so far (checked)."""
        lr = self.__dict__.get("lr")        # where Checked keeps it (no descriptor call at every step)
        if lr is None:
            lr = self.lr
        return scheduled_lr(lr, self.t) if isinstance(lr, Schedule) else lr

    def _lr_config(self) -> float | dict:
        return self.lr.config() if isinstance(self.lr, Schedule) else self.lr

    def update(self, params: Array, grads: Array, decay_mask: Array | None, ops: XpOps) -> None:
        """Apply one step to ``params`` from ``grads`` (flat buffers of the same size)."""
        raise NotImplementedError  # pragma: no cover

    def split_update(self, params: Array, grads: Array, decay_mask: Array | None,
                     ops: XpOps) -> Callable[[int, int], None] | None:
        """This step's :meth:`update` in parts, where the optimiser can: the step's own bookkeeping (state, η, the
        step count) now, then a function ``part(start, stop)`` applying the update to ``params[start:stop]`` from
        ``grads[start:stop]``, to be called once for each range of a partition of the buffers, in any order: each
        value gets the same arithmetic as in one :meth:`update`, so a training step can update each layer as
        soon as its gradients are made and its weights used, while they are still in the cache. None, with
        nothing done, where it cannot (here: the caller runs :meth:`update`); an override of :meth:`update`
        (a subclass's, or the instance's) needs one of this too, or None from it.

        :class:`gpunn.backprop.StepPlan` asks it after the step's loss, before its backward pass, and calls
        ``part`` on a layer's range once that layer's gradients are final and nothing later in the step reads
        its parameters; an exception in between (a ``KeyboardInterrupt``) leaves the ranges not yet called as
        they were, the step already counted (``fit`` rolls back to the epoch's start)."""
        return None

    def snapshot(self) -> tuple:
        """A copy of the state (to roll back a diverged epoch): the step count, the state arrays, the buffer
        they belong to, and any state loaded but not yet used (a checkpoint's or a pickle's)."""
        return self.t, {k: v.copy() for k, v in self.state.items()}, self._bound, self._pending

    @property
    def state_names(self) -> tuple[str, ...]:
        """The state arrays this optimiser keeps (velocity; m and v; none)."""
        return self._state_names

    def host_snapshot(self, snap: tuple, params: Array) -> tuple[int, dict[str, numpy.ndarray]]:
        """A :meth:`snapshot` of the optimiser of ``params`` as host arrays (what a checkpoint keeps): (steps,
        arrays), empty before the first update (what a fresh optimiser starts from)."""
        t, arrays, bound, pending = snap
        if bound is not None and bound is params:
            return t, {k: numpy.array(to_host(v), copy=True) for k, v in arrays.items()}
        return pending if pending is not None else (0, {})

    @staticmethod
    def snapshot_of_host(t: int, arrays: dict[str, numpy.ndarray]) -> tuple:
        """The :meth:`snapshot` that :meth:`restore` takes for a :meth:`host_snapshot`: state taken at the
        next update, as a checkpoint's is."""
        return int(t), {}, None, (int(t), dict(arrays))

    def restore(self, snap: tuple) -> None:
        """Go back to a :meth:`snapshot`, exactly: state of the same buffer is copied back; a snapshot taken
        before this buffer's first update (a new optimiser, one whose earlier network is gone, a loaded
        checkpoint's state not used yet) puts the optimiser back before that update, so the next update
        starts as the first one did (from the loaded state, else from zero)."""
        t, arrays, bound, pending = snap
        if bound is not None and bound is self._bound:
            for k in [k for k in self.state if k not in arrays]:
                del self.state[k]           # made since the snapshot (momentum switched on): from zero again
            for k, v in arrays.items():
                if k in self.state:
                    self.state[k][...] = v
                else:                       # dropped since (momentum switched off): the snapshot's again
                    self.state[k] = v.copy()
        else:
            self._bound, self.state, self._scratch, self._pending = None, {}, [], pending
        self.t = t

    def reset(self) -> None:
        """Forget all state (momentum, moments, step count)."""
        self._bound = None
        self.state = {}
        self.t = 0
        self._scratch = []
        self.owner_ref = None
        self._pending = None

    def config(self) -> dict:
        raise NotImplementedError  # pragma: no cover


#: Every Optimizer subclass by its key (gpunn.registry): the built-in ones below and any defined since.
REGISTRY = Registry("optimiser")


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
        L2 penalty λ: g = ∂E/∂w + λw for the weights (biases are not decayed).
    """

    name = "sgd"
    momentum = Checked(_unit_interval, _nesterov_needs_momentum)
    nesterov = Checked(flag, _nesterov_needs_momentum)
    weight_decay = Checked(_non_negative)

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay

    @property
    def _state_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("velocity",) if self.momentum else ()

    def _settings(self, params: Array, ops: XpOps) -> tuple[float, bool, float, Array | None]:
        """(μ, nesterov, λ, velocity) for a step on ``params``, the state made where it is not yet."""
        # the checked values, read where Checked keeps them (three descriptor calls fewer in a hot path)
        d = self.__dict__
        try:
            mu, nesterov, wd = d["momentum"], d["nesterov"], d["weight_decay"]
        except KeyError:    # a subclass's own attribute (a property), or a default its __init__ never set
            mu, nesterov, wd = _hyper(self.momentum), bool(self.nesterov), _hyper(self.weight_decay)
        velocity = self.state.get("velocity")       # kept exactly while momentum is on
        if self._bound is not params or (velocity is None) is not (not mu) or len(self._scratch) < (2 if wd else 1):
            self._prepare(params, ops, scratch=2 if wd else 1)         # made once, not at every step
            velocity = self.state.get("velocity")
        return mu, nesterov, wd, velocity

    def update(self, params, grads, decay_mask, ops):
        d = self.__dict__                   # _settings, written out: the lecture's step is bound by Python's calls
        try:
            mu, nesterov, wd = d["momentum"], d["nesterov"], d["weight_decay"]
        except KeyError:
            mu, nesterov, wd = _hyper(self.momentum), bool(self.nesterov), _hyper(self.weight_decay)
        velocity = self.state.get("velocity")
        if self._bound is not params or (velocity is None) is not (not mu) or len(self._scratch) < (2 if wd else 1):
            mu, nesterov, wd, velocity = self._settings(params, ops)
        lr = self.current_lr()
        if type(lr) is not float:           # a subclass's own current_lr (the base class's gives a float)
            lr = _hyper(lr)
        self.t += 1
        if ops.sgd_update(params, grads, velocity, decay_mask, lr, mu, nesterov, wd):
            return      # the formula below as one fused kernel (on a GPU: gpunn/kernels.py, sgd_update)
        for w, g, v, mask, s, *s2 in self._blocks(params, grads, velocity, decay_mask):
            self._update_block(ops.xp, lr, w, g, v, mask, s, s2[0] if s2 else None)

    def split_update(self, params, grads, decay_mask, ops):
        """:meth:`Optimizer.split_update`: where the ops have the fused update over a range of the buffers
        (:meth:`gpunn.ops.XpOps.sgd_update_parts`) and :meth:`update` is this class's own, none of a subclass's
        or of the instance's (``opt.update = ...``: a step runs it, whole)."""
        if type(self).update is not SGD.update or "update" in self.__dict__ or not ops.sgd_update_parts():
            return None         # asked first: η (a subclass's current_lr may count its calls) is asked once a step
        mu, nesterov, wd, velocity = self._settings(params, ops)
        part = ops.sgd_update_part(params, grads, velocity, decay_mask, _hyper(self.current_lr()), mu, nesterov, wd)
        if part is not None:
            self.t += 1
        return part

    def _update_block(self, xp: ArrayModule, lr: float, w: Array, g: Array, v: Array, mask: Array, s: Array,
              s2: Array) -> None:
        """One block of the update, in place: weights w, gradients g, velocity v (None without momentum),
        decay mask (None without weight decay); ``s``, ``s2`` are scratch arrays of the block's size."""
        mu, wd = _hyper(self.momentum), _hyper(self.weight_decay)
        if wd:                                # g ← g + λ·w on weights (mask 1), not biases (mask 0)
            xp.multiply(w, mask, out=s2)
            s2 *= wd
            g = xp.add(s2, g, out=s2)
        if mu:                                # v ← μv + g
            v *= mu
            v += g
        if mu and self.nesterov:              # w ← w − η(g + μv)
            w -= xp.multiply(g, lr, out=s)
            w -= xp.multiply(v, lr * mu, out=s)
        else:                                 # w ← w − η·v, or eq (15) w ← w − η·∂E/∂w
            w -= xp.multiply(v if mu else g, lr, out=s)

    def config(self) -> dict:
        return {"name": Registry.key_of(type(self)), "lr": self._lr_config(), "momentum": self.momentum,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def __repr__(self) -> str:
        return f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, " \
               f"weight_decay={self.weight_decay})"


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015, Algorithm 1), with PyTorch's conventions for ε and weight decay.

    m ← β₁m + (1 − β₁)g,  v ← β₂v + (1 − β₂)g²,  w ← w − η·m̂ / (√v̂ + ε)
    with the bias corrections m̂ = m / (1 − β₁ᵗ), v̂ = v / (1 − β₂ᵗ); weight decay adds λw to g.
    """

    _state_names = ("m", "v")
    name = "adam"

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__()
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay

    beta1 = Checked(_unit_interval)
    beta2 = Checked(_unit_interval)

    @property
    def betas(self) -> tuple[float, float]:
        """(β₁, β₂); assigning a pair checks both before changing either."""
        return self.beta1, self.beta2

    @betas.setter
    def betas(self, pair: Any) -> None:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ConfigError(f"betas must be a pair (beta1, beta2); got {shown(pair)}")
        b1, b2 = _unit_interval("beta1", pair[0]), _unit_interval("beta2", pair[1])
        self.beta1, self.beta2 = b1, b2
    eps = Checked(_positive_float)
    weight_decay = Checked(_non_negative)

    def update(self, params, grads, decay_mask, ops):
        self._prepare(params, ops, scratch=2)
        lr = self.current_lr()
        self.t += 1
        for block in self._blocks(params, grads, self.state["m"], self.state["v"], decay_mask):
            self._update_block(ops.xp, lr, *block)

    def _update_block(self, xp: ArrayModule, lr: float, w: Array, g: Array, m: Array, v: Array, mask: Array | None,
              s: Array, s2: Array) -> None:
        """One block of the update, in place; ``s``, ``s2`` are scratch arrays of the block's size."""
        b1, b2, t = self.beta1, self.beta2, self.t
        if self.weight_decay:                 # g ← g + λ·w on weights, not biases
            xp.multiply(w, mask, out=s2)
            s2 *= self.weight_decay
            g = xp.add(s2, g, out=s2)
        m *= b1                               # m ← β₁m + (1 − β₁)g
        m += xp.multiply(g, 1.0 - b1, out=s)
        v *= b2                               # v ← β₂v + (1 − β₂)g²
        xp.multiply(g, g, out=s)
        s *= 1.0 - b2
        v += s
        xp.sqrt(v, out=s)                     # √v̂ + ε = √v / √(1 − β₂ᵗ) + ε
        s *= 1.0 / math.sqrt(1.0 - b2 ** t)
        s += self.eps
        xp.divide(m, s, out=s)                # w ← w − η/(1 − β₁ᵗ) · m / (√v̂ + ε)
        s *= lr / (1.0 - b1 ** t)
        w -= s

    def config(self) -> dict:
        return {"name": Registry.key_of(type(self)), "lr": self._lr_config(), "betas": [self.beta1, self.beta2],
                "eps": self.eps, "weight_decay": self.weight_decay}

    def __repr__(self) -> str:
        return f"Adam(lr={self.lr}, betas=({self.beta1}, {self.beta2}), eps={self.eps})"


def names() -> list[str]:
    return REGISTRY.names()


def from_config(config: dict) -> Optimizer:
    """An optimiser (without state) from :meth:`Optimizer.config`'s dict."""
    params = dict(config)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"an optimiser configuration names its class ('name'); got {str(config)[:200]}")
    if isinstance(params.get("lr"), dict):
        params["lr"] = schedule_from_config(params["lr"])
    if "betas" in params and isinstance(params["betas"], list):
        params["betas"] = tuple(params["betas"])
    try:
        return get(name, **params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters {params} for optimiser {name!r}: {exc}") from None


def get(spec: str | Optimizer | None, **kwargs: Any) -> Optimizer:
    """An optimiser from an instance or a name (``"sgd"``, ``"adam"``) plus keyword hyper-parameters."""
    if isinstance(spec, Optimizer):
        return spec
    if spec is None:
        spec = "sgd"
    return REGISTRY.find(spec)(**kwargs)


# -- what a file stores (gpunn.registry: the rule for saved schedules and optimisers) ----------------------
def portable_config(optimizer: Optimizer) -> dict:
    """The optimiser's configuration as a file stores it, proven to load back as an equal optimiser
    (schedule included); SaveError naming the fix otherwise (:mod:`gpunn.registry`)."""
    return round_trip(optimizer.config(), from_config, lambda o: o.config(), f"the optimiser {optimizer!r}")
