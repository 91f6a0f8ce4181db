"""Fused CPU kernels (numba) for the NumPy backend: the CPU member of the fused-ops family.

The NumPy path (:class:`gpunn.ops.XpOps`) runs each layer's elementwise chain as several NumPy calls,
each a full pass over the batch: the sigmoid alone is five, its derivative three, the SGD update two
per block. Here each chain between two transcendental functions is one serial loop, compiled by
numba (``@njit(cache=True)``, ``error_model="numpy"``, no fastmath):

- ``bias_<f>``: z ← z + b in place on the matmul output, then f(z) (or the part of f before its exp)
- ``<f>_bwd``: δ = f′(z, y) ⊙ ∂E/∂y                                               (eqs 11, 14)
- ``colsum``: ∂E/∂b = Σ over the batch of δ, row after row
  (for a hidden layer, whose δ every step makes, in the δ kernel's own pass: ``out`` given)
- ``softmax_pre`` / ``softmax_post``: the softmax around NumPy's exp and log, rows summed as NumPy sums them
- ``xent_delta``: the cross-entropy's output δ = (y − y*) / B
- ``sgd_update``: eq (15) with momentum / Nesterov / weight decay over the flat parameter buffer

**Bitwise equal to the NumPy path.** Every kernel does the NumPy path's arithmetic operation for
operation, in the same order and in the array's dtype (constants are passed as scalars of that dtype,
never as Python floats, which numba would widen to float64). NumPy's own ``expm1``, ``tanh``, ``log``,
``log1p``, ``matmul`` and float64 ``exp`` stay outside the kernels: numba's would be the C library's
scalar ones, which differ from NumPy's SIMD ones in the last bit (and are slower). NumPy's float32 ``exp``
is transcribed (:mod:`gpunn.cpuexp`), so the sigmoid (``bias_sigmoid``) and the softmax's exp
(``softmax_pre_exp``) run inside one kernel pass, where a probe at loading finds the transcription equal
to NumPy's exp on this machine (``exp_inside``); elsewhere NumPy's exp runs between two kernels.
Where NumPy's result depends on how it reduces, the kernel reduces the same way (a softmax row pairwise,
a column sum row after row from 0); where that would need NumPy's recursive pairwise sum (a softmax
wider than 128 classes, a one-column sum of 8 rows or more), the NumPy code runs. The one exception is
a NaN's sign bit: where two NaNs of opposite sign meet in one sum, product or maximum, the compiled
code may keep the other operand's NaN than NumPy's loops (the same places are NaN, with the same payload).
tests/test_cpukernels.py checks every kernel, activation, loss, optimiser setting and dtype against the
NumPy path bit for bit; tests/test_cpuexp.py the float32 exp against NumPy's.

The kernels are serial: at the batch sizes where rows are many, numba's ``parallel=True`` was measured
no faster and would start a second thread pool beside OpenBLAS's; the BLAS threads are what
:mod:`gpunn.threads` chooses.

numba is optional (``pip install gpunn[fast]``). It is imported on first use; where it is missing or
fails to import, :func:`available` is False, :func:`unavailable_reason` says why, and
:func:`gpunn.ops.ops_for` keeps the NumPy path. Compiled code is cached on disk by numba (next to this
file, or in numba's user cache directory where that is read-only; where neither can be written, compiled
in each process; a cache file numba cannot read is a miss: :func:`gpunn.numbacache.cached_njit`).
"""
from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy

from .activations import Activation, exp_cap
from .numbacache import cached_njit
from .registry import Registry
from .types import Array

# -- the kernels, as plain Python (compiled by numba on first use) ---------------------------------
# z is (rows, cols) C-contiguous in training; b is (cols,). Comparisons select the operand NumPy's
# maximum/minimum return: the second one on a tie (so max(-0.0, 0.0) is +0.0, as NumPy gives).

def bias_add(z, b):
    """z ← z + b (for the activations whose f is one NumPy call; also spares NumPy's broadcast buffer)."""
    rows, cols = z.shape
    for i in range(rows):
        for j in range(cols):
            z[i, j] = z[i, j] + b[j]


def bias_sigmoid_pre(z, b, y, cap):
    """z ← z + b; y = min(−z, cap): the sigmoid up to its exp."""
    rows, cols = z.shape
    for i in range(rows):
        for j in range(cols):
            v = z[i, j] + b[j]
            z[i, j] = v
            m = -v
            y[i, j] = m if (m < cap or m != m) else cap


def sigmoid_post(y, one):
    """y ← 1 / (y + 1), y holding e^min(−z, cap)."""
    rows, cols = y.shape
    for i in range(rows):
        for j in range(cols):
            y[i, j] = one / (y[i, j] + one)


def bias_relu(z, b, y, zero):
    """z ← z + b; y = max(z, 0)."""
    rows, cols = z.shape
    for i in range(rows):
        for j in range(cols):
            v = z[i, j] + b[j]
            z[i, j] = v
            y[i, j] = v if (v > zero or v != v) else zero


def bias_leaky(z, b, y, alpha):
    """z ← z + b; y = max(z, αz)."""
    rows, cols = z.shape
    for i in range(rows):
        for j in range(cols):
            v = z[i, j] + b[j]
            z[i, j] = v
            a = v * alpha
            y[i, j] = v if (v > a or v != v) else a


def bias_elu_pre(z, b, y, zero):
    """z ← z + b; y = min(z, 0): the ELU up to its expm1."""
    rows, cols = z.shape
    for i in range(rows):
        for j in range(cols):
            v = z[i, j] + b[j]
            z[i, j] = v
            y[i, j] = v if (v < zero or v != v) else zero


def elu_post(z, y, a, small, zero):
    """y ← a·y, then max(y, z) where ``small`` (a ≤ 1), else z where z > 0; y holds expm1(min(z, 0))."""
    rows, cols = z.shape
    for i in range(rows):
        for j in range(cols):
            e = y[i, j] * a
            v = z[i, j]
            if small:
                y[i, j] = e if (e > v or e != e) else v
            else:
                y[i, j] = v if v > zero else e


def sigmoid_bwd(y, g, d, one, out, zero):
    """δ = (1 − y)·y·g (eq 6)."""
    rows, cols = y.shape
    summing = out.shape[0] > 0
    for i in range(rows):
        for j in range(cols):
            o = one - y[i, j]
            o = o * y[i, j]
            v = o * g[i, j]
            d[i, j] = v
            if summing:                 # ∂E/∂b = Σ over the rows of δ, as colsum adds them
                out[j] = zero + v if i == 0 else out[j] + v


def tanh_bwd(y, g, d, one, out, zero):
    """δ = (1 − y²)·g."""
    rows, cols = y.shape
    summing = out.shape[0] > 0
    for i in range(rows):
        for j in range(cols):
            o = y[i, j] * y[i, j]
            o = one - o
            v = o * g[i, j]
            d[i, j] = v
            if summing:                 # ∂E/∂b = Σ over the rows of δ, as colsum adds them
                out[j] = zero + v if i == 0 else out[j] + v


def relu_bwd(z, g, d, one, zero, out):
    """δ = [z > 0]·g (a product, as NumPy's: 0·g is −0 for g < 0, 0·inf NaN)."""
    rows, cols = z.shape
    summing = out.shape[0] > 0
    for i in range(rows):
        for j in range(cols):
            o = one if z[i, j] > zero else zero
            v = o * g[i, j]
            d[i, j] = v
            if summing:                 # ∂E/∂b = Σ over the rows of δ, as colsum adds them
                out[j] = zero + v if i == 0 else out[j] + v


def leaky_bwd(z, g, d, p, q, one, zero, out):
    """δ = ([z > 0]·(1 − α) + α)·g."""
    rows, cols = z.shape
    summing = out.shape[0] > 0
    for i in range(rows):
        for j in range(cols):
            o = one if z[i, j] > zero else zero
            o = o * q
            o = o + p
            v = o * g[i, j]
            d[i, j] = v
            if summing:                 # ∂E/∂b = Σ over the rows of δ, as colsum adds them
                out[j] = zero + v if i == 0 else out[j] + v


def neg_mul(d, g, out, zero):
    """δ ← (−δ)·g: the softplus derivative's tail, δ holding expm1(−y)."""
    rows, cols = d.shape
    summing = out.shape[0] > 0
    for i in range(rows):
        for j in range(cols):
            v = (-d[i, j]) * g[i, j]
            d[i, j] = v
            if summing:                 # ∂E/∂b = Σ over the rows of δ, as colsum adds them
                out[j] = zero + v if i == 0 else out[j] + v


def elu_bwd(y, g, d, a, q, one, zero, out):
    """δ = (min(y, 0) + a + [y > 0]·(1 − a))·g."""
    rows, cols = y.shape
    summing = out.shape[0] > 0
    for i in range(rows):
        for j in range(cols):
            v = y[i, j]
            o = v if (v < zero or v != v) else zero
            o = o + a
            s = one if v > zero else zero
            s = s * q
            o = o + s
            v = o * g[i, j]
            d[i, j] = v
            if summing:                 # ∂E/∂b = Σ over the rows of δ, as colsum adds them
                out[j] = zero + v if i == 0 else out[j] + v


def colsum(d, out, zero):
    """out = 0 + Σ over the rows of d, in row order (as NumPy sums a (rows, cols ≥ 2) array over axis 0,
    from its identity: a column of −0 sums to +0)."""
    rows, cols = d.shape
    for j in range(cols):
        out[j] = zero + d[0, j]
    for i in range(1, rows):
        for j in range(cols):
            out[j] = out[j] + d[i, j]


def softmax_pre(z, b, y, rowstats):
    """z ← z + b; m = max of each row (NaN wins); y = z − m; rowstats[0, row] = m."""
    rows, cols = z.shape
    for i in range(rows):
        m = z[i, 0] + b[0]
        for j in range(cols):
            v = z[i, j] + b[j]
            z[i, j] = v
            if m == m and (v > m or v != v):      # NaN, once met, stays the maximum
                m = v
        for j in range(cols):
            y[i, j] = z[i, j] - m
        rowstats[0, i] = m


def softmax_post(y, rowstats, zero):
    """s = Σ of each row of y, rowstats[1, row] = s, y ← y / s. The sum is NumPy's pairwise summation for
    rows of at most 128 (wider softmax layers stay on the NumPy path): below 8 in order, else 8
    accumulators over blocks of 8, combined ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)), then the
    remainder in order; the reduction starts from 0."""
    rows, n = y.shape
    for i in range(rows):
        if n < 8:
            s = zero
            for j in range(n):
                s = s + y[i, j]
        else:
            r0, r1, r2, r3 = y[i, 0], y[i, 1], y[i, 2], y[i, 3]
            r4, r5, r6, r7 = y[i, 4], y[i, 5], y[i, 6], y[i, 7]
            j = 8
            while j < n - (n % 8):
                r0 = r0 + y[i, j]
                r1 = r1 + y[i, j + 1]
                r2 = r2 + y[i, j + 2]
                r3 = r3 + y[i, j + 3]
                r4 = r4 + y[i, j + 4]
                r5 = r5 + y[i, j + 5]
                r6 = r6 + y[i, j + 6]
                r7 = r7 + y[i, j + 7]
                j += 8
            s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
            while j < n:
                s = s + y[i, j]
                j += 1
        s = zero + s
        rowstats[1, i] = s
        for j in range(n):
            y[i, j] = y[i, j] / s


def scale(g, s):
    """g ← g·s (the squared error's ∂E/∂y = (y − y*)·(1/B), NumPy's multiply by a scalar of g's dtype)."""
    rows, cols = g.shape
    for i in range(rows):
        for j in range(cols):
            g[i, j] = g[i, j] * s


def xent_delta(y, t, d, inv_b):
    """δ = (y − y*)·(1/B): the output δ of cross-entropy after softmax."""
    rows, cols = y.shape
    for i in range(rows):
        for j in range(cols):
            v = y[i, j] - t[i, j]
            d[i, j] = v * inv_b


def sgd_plain(w, g, lr):
    """w ← w − η·g (eq 15)."""
    for i in range(w.size):
        w[i] = w[i] - g[i] * lr


def sgd_update(w, g, v, mask, lr, mu, lr_mu, wd, has_v, nesterov, has_wd):
    """Eq (15) with weight decay g' = g + λ·(w·mask), velocity v ← μv + g', then w −= η·v, or for
    Nesterov w −= η·g', w −= (ημ)·v: :meth:`gpunn.optim.SGD._step`'s order of operations."""
    for i in range(w.size):
        gd = g[i]
        if has_wd:
            s = w[i] * mask[i]
            s = s * wd
            gd = s + gd
        if has_v:
            vv = v[i] * mu
            vv = vv + gd
            v[i] = vv
            if nesterov:
                x = w[i] - gd * lr
                w[i] = x - vv * lr_mu
            else:
                w[i] = w[i] - vv * lr
        else:
            w[i] = w[i] - gd * lr


KERNELS = (bias_add, bias_sigmoid_pre, sigmoid_post, bias_relu, bias_leaky, bias_elu_pre, elu_post, sigmoid_bwd,
           tanh_bwd, relu_bwd, leaky_bwd, neg_mul, elu_bwd, colsum, softmax_pre, softmax_post, scale, xent_delta,
           sgd_plain, sgd_update)


def compiled_for(kernel: Any, *args: Any) -> Callable[..., Any]:
    """numba's compiled code of ``kernel`` for the types of ``args`` (``typeof`` of each: exactly the code
    its dispatcher would run for them, compiled or loaded from the cache), callable without the
    dispatcher's type resolution at every call (about half of a small kernel call's cost:
    bench/lecture_floor.py). Only for arguments of
    those very types: arrays bound for good (a step's buffers) and scalars of a fixed dtype."""
    try:
        return kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    except Exception:   # pragma: no cover - numba refusing: its dispatcher decides at each call instead
        return kernel


def bind(kernel: Any, *args: Any) -> Callable[[], Any]:
    """``kernel(*args)`` as a call taking no argument, through :func:`compiled_for` those arguments."""
    return partial(compiled_for(kernel, *args), *args)


# -- loading numba ---------------------------------------------------------------------------------
@functools.cache
def _compiled() -> tuple[Any, str | None]:
    """(namespace of numba dispatchers, None), or (None, why numba cannot be used)."""
    try:
        import numba
    except Exception as exc:      # ImportError, or numba refusing this NumPy / Python version
        return None, f"numba not usable: {type(exc).__name__}: {exc}".strip()
    compiled = {fn.__name__: cached_njit(numba.njit, fn, error_model="numpy", nogil=True) for fn in KERNELS}
    return SimpleNamespace(**compiled, **_exp_kernels(), version=numba.__version__), None


def _exp_kernels() -> dict[str, Any]:
    """The kernels with NumPy's float32 exp inside (:mod:`gpunn.cpuexp`) and ``exp_inside``: whether they
    give NumPy's bits on this machine (``exp_inside_reason`` says why not)."""
    try:
        from . import cpuexp
        same = cpuexp.matches_numpy()
    except Exception as exc:      # pragma: no cover - an llvmlite without what the transcription needs
        return {"exp_inside": False, "exp_block": 0, "exp_inside_reason": f"{type(exc).__name__}: {exc}"}
    return {"exp_inside": same, "bias_sigmoid": cpuexp.bias_sigmoid, "softmax_pre_exp": cpuexp.softmax_pre_exp,
            "exp_block": cpuexp.BLOCK,
            "exp_inside_reason": None if same else "NumPy's float32 exp differs from its transcription here "
                                                   "(another algorithm in this NumPy build or CPU)"}


def installed() -> bool:
    """Whether numba is installed (found without importing it)."""
    return importlib.util.find_spec("numba") is not None


def loaded() -> bool:
    """Whether numba has been imported and the kernels made in this process (loading them again is cheap)."""
    return _compiled.cache_info().currsize > 0 and _compiled()[0] is not None


def available() -> bool:
    """Whether numba imports here (the fused CPU kernels can run)."""
    return _compiled()[0] is not None


def unavailable_reason() -> str | None:
    """Why the fused CPU kernels cannot run (None when they can)."""
    return _compiled()[1]


def exp_inside() -> tuple[bool, str | None]:
    """(whether the kernels run NumPy's float32 exp inside their pass (:mod:`gpunn.cpuexp`), why not)."""
    ns = _compiled()[0]
    return (False, unavailable_reason()) if ns is None else (ns.exp_inside, ns.exp_inside_reason)


def numba_version() -> str | None:
    ns = _compiled()[0]
    return None if ns is None else ns.version


#: Widest softmax layer the kernels take (their row sum is NumPy's pairwise sum up to one block).
MAX_SOFTMAX_COLS = 128


class CpuKernels:
    """The kernels' calls for the NumPy backend.

    :meth:`forward` and :meth:`backward` return, once per activation and dtype, one function running
    that activation's whole chain (kernels and the NumPy transcendental between them), or None where
    no kernel would save a pass (identity and softmax backward): the caller then runs the NumPy code.
    The constants the kernels take (0, 1, α, 1 − α, the exponent cap) are bound into those functions,
    rounded to the dtype as NumPy rounds a Python float it multiplies an array with.
    """

    def __init__(self) -> None:
        k, reason = _compiled()
        if k is None:
            raise RuntimeError(reason)
        self.k = k
        self._sgd_last: tuple = (None, None)
        self._dummy: dict[Any, Array] = {}

    @staticmethod
    def constants(act: Activation, dtype: Any) -> tuple:
        """(0, 1, p, 1 − p, exponent cap) in ``dtype``, plus whether p ≤ 1 (ELU's branch, decided on
        the Python float as the NumPy path decides it); p is α or a (0 where there is none)."""
        t = numpy.dtype(dtype).type
        p = act.param
        return t(0.0), t(1.0), t(p), t(1.0 - p), t(exp_cap(dtype)), p <= 1.0

    def forward(self, act: Activation, dtype: Any) -> Callable[[Array, Array, Array, Any], list | None] | None:
        """A binder for ``act`` in ``dtype``: binder(z, b, y, rowstats, call=bind) gives the calls (each
        taking no argument) that make z ← z + b, y = f(z) on those arrays, or None where no kernel covers
        them (a softmax wider than MAX_SOFTMAX_COLS); ``call`` binds a kernel to its arguments (:func:`bind`
        for calls made many times, ``functools.partial`` for one). None: no kernel for this activation."""
        k, (zero, one, p, _, cap, small) = self.k, self.constants(act, dtype)
        exp, expm1, log, tanh, logaddexp = numpy.exp, numpy.expm1, numpy.log, numpy.tanh, numpy.logaddexp
        exp_inside = k.exp_inside and numpy.dtype(dtype) == numpy.float32    # gpunn.cpuexp: float32 only
        exp_scratch = partial(numpy.empty, (2, k.exp_block), numpy.float32)  # each bound call its own

        def sigmoid(z, b, y, rowstats, call=bind):
            if exp_inside:
                return [call(k.bias_sigmoid, z, b, y, cap, one, exp_scratch())]
            return [call(k.bias_sigmoid_pre, z, b, y, cap), partial(exp, y, y), call(k.sigmoid_post, y, one)]

        def elu(z, b, y, rowstats, call=bind):
            return [call(k.bias_elu_pre, z, b, y, zero), partial(expm1, y, y),
                    call(k.elu_post, z, y, p, small, zero)]

        def softmax(z, b, y, rowstats, call=bind):
            if z.shape[1] > MAX_SOFTMAX_COLS:
                return None
            total, top = rowstats[1], rowstats[0]
            exps = ([call(k.softmax_pre_exp, z, b, y, rowstats, exp_scratch())] if exp_inside
                    else [call(k.softmax_pre, z, b, y, rowstats), partial(exp, y, y)])
            return [*exps, call(k.softmax_post, y, rowstats, zero), partial(log, total, total),
                    partial(numpy.add, top, total, top)]            # rowstats[0] = m + log Σ e^(z−m)

        def identity(z, b, y, rowstats, call=bind):
            return [call(k.bias_add, z, b)] + ([] if y is z else [partial(numpy.copyto, y, z)])

        fns = {"sigmoid": sigmoid, "elu": elu, "softmax": softmax, "identity": identity,
               "tanh": lambda z, b, y, rowstats, call=bind: [call(k.bias_add, z, b), partial(tanh, z, y)],
               "softplus": lambda z, b, y, rowstats, call=bind: [call(k.bias_add, z, b), partial(logaddexp, 0.0, z, y)],
               "relu": lambda z, b, y, rowstats, call=bind: [call(k.bias_relu, z, b, y, zero)],
               "leaky_relu": lambda z, b, y, rowstats, call=bind: [call(k.bias_leaky, z, b, y, p)]}
        return fns.get(Registry.key_of(type(act)))      # a subclass (another key) is not its parent's kernel

    def backward(self, act: Activation, dtype: Any) -> Callable[..., list] | None:
        """A binder for ``act`` in ``dtype``: binder(z, y, g, d, call=bind, sums=None) gives the calls that make
        δ = f′(z) ⊙ g into d and, where ``sums`` (the bias gradient) is given, ∂E/∂b = Σ over the rows of δ
        into it in the same pass, added as :func:`colsum` adds them (the caller checks that NumPy adds them so:
        ``CpuFusedOps.bind_backward_and_sum``); None for identity and softmax (no kernel would save a pass)."""
        k, (zero, one, p, q, _, _) = self.k, self.constants(act, dtype)
        negative, expm1 = numpy.negative, numpy.expm1
        nothing = numpy.empty(0, dtype)         # sums=None: the kernels' sum is off (out.shape[0] == 0)

        def softplus(z, y, g, d, call, s):
            return [partial(negative, y, d), partial(expm1, d, d), call(k.neg_mul, d, g, s, zero)]

        kernels = {"sigmoid": lambda z, y, g, d, call, s: [call(k.sigmoid_bwd, y, g, d, one, s, zero)],
                   "tanh": lambda z, y, g, d, call, s: [call(k.tanh_bwd, y, g, d, one, s, zero)],
                   "relu": lambda z, y, g, d, call, s: [call(k.relu_bwd, z, g, d, one, zero, s)],
                   "leaky_relu": lambda z, y, g, d, call, s: [call(k.leaky_bwd, z, g, d, p, q, one, zero, s)],
                   "softplus": softplus,
                   "elu": lambda z, y, g, d, call, s: [call(k.elu_bwd, y, g, d, p, q, one, zero, s)]}
        calls = kernels.get(Registry.key_of(type(act)))     # a subclass (another key) is not its parent's kernel
        if calls is None:
            return None

        def binder(z, y, g, d, call=bind, sums=None):
            return calls(z, y, g, d, call, nothing if sums is None else sums)
        return binder

    #: The activations whose :meth:`backward` is one kernel reading g[i, j] then writing d[i, j] and nothing
    #: else of either: d may be g (δ made over ∂E/∂y in place; softplus's chain writes d before it reads g).
    IN_PLACE = frozenset({"sigmoid", "tanh", "relu", "leaky_relu", "elu"})

    def in_place(self, act: Activation) -> bool:
        """Whether :meth:`backward`'s calls for ``act`` may be given one array as g and d (:attr:`IN_PLACE`)."""
        return Registry.key_of(type(act)) in self.IN_PLACE

    def squared_error(self, y: Array, grad_y: Array) -> Callable[[Array, Array | None], tuple[Any, bool]]:
        """:meth:`gpunn.losses.SquaredError.backward` for outputs ``y`` into ``grad_y`` (a step's buffers), as
        a call taking the targets t and the value's ``out`` (or None): ∂E/∂y = y − y* (NumPy's subtract),
        the value ½ Σ (y − y*)² / B (NumPy's vdot, as the loss computes it), then ∂E/∂y · (1/B) in a
        kernel; returns (value or ``out`` holding it, False)."""
        subtract, vdot = numpy.subtract, getattr(numpy.vdot, "_implementation", numpy.vdot)   # its C function
        half = 0.5 / y.shape[0]
        scaled = bind(self.k.scale, grad_y, grad_y.dtype.type(1.0 / y.shape[0]))

        def backward(t: Array, out: Array | None) -> tuple[Any, bool]:
            subtract(y, t, grad_y)
            value = vdot(grad_y, grad_y) * half
            scaled()
            if out is None:
                return value, False
            out[...] = value
            return out, False
        return backward

    def bound_cross_entropy(self, z: Array, y: Array, rowstats: Array,
                            delta: Array) -> Callable[[Array, Array | None], tuple[Any, bool]]:
        """:meth:`cross_entropy` for a step's buffers, as a call taking the targets t and the value's ``out``
        (or None): the mean cross-entropy (NumPy's add.reduce, the sum's own reduction, and vdot's C function,
        as :meth:`gpunn.losses.CrossEntropy.backward` computes it), δ = y − t (NumPy's subtract), then δ · (1/B)
        in a bound kernel: fewer distinct calls than :meth:`cross_entropy` (each first call of a step reads
        its code from memory, after the step's arrays went through the caches); returns (value or ``out``
        holding it, True)."""
        add_reduce, subtract = numpy.add.reduce, numpy.subtract
        vdot = getattr(numpy.vdot, "_implementation", numpy.vdot)      # its C function
        log_partitions, inv_b = rowstats[0], 1.0 / z.shape[0]
        scaled = bind(self.k.scale, delta, delta.dtype.type(inv_b))

        def backward(t: Array, out: Array | None) -> tuple[Any, bool]:
            value = (add_reduce(log_partitions) - vdot(t, z)) * inv_b
            subtract(y, t, delta)
            scaled()
            if out is None:
                return value, True
            out[...] = value
            return out, True
        return backward

    def cross_entropy(self, z: Array, y: Array, rowstats: Array, t: Array, delta: Array, out: Array) -> bool:
        """out[0] = the mean cross-entropy (NumPy's sum and dot, as the NumPy path) and δ = (y − t)/B."""
        inv_b = 1.0 / t.shape[0]
        out[...] = (numpy.sum(rowstats[0]) - numpy.vdot(t, z)) * inv_b
        self.k.xent_delta(y, t, delta, delta.dtype.type(inv_b))
        return True

    def sgd_update(self, p: Array, g: Array, velocity: Array | None, mask: Array | None, lr: float,
                   momentum: float, nesterov: bool, weight_decay: float) -> None:
        """:meth:`gpunn.optim.SGD.update`'s formula over the whole flat buffer, in one pass."""
        lr_t, mu, lr_mu, wd = self._sgd_constants(p.dtype, lr, momentum, weight_decay)
        if velocity is None and not weight_decay:
            self.k.sgd_plain(p, g, lr_t)
            return
        dummy = self._sgd_dummy(p.dtype)
        self.k.sgd_update(p, g, velocity if velocity is not None else dummy,
                          mask if mask is not None and weight_decay else dummy, lr_t, mu, lr_mu, wd,
                          velocity is not None, bool(nesterov), bool(weight_decay))

    def sgd_part(self, p: Array, g: Array, velocity: Array | None, mask: Array | None, lr: float,
                 momentum: float, nesterov: bool, weight_decay: float) -> Callable[[int, int], None]:
        """:meth:`sgd_update` as a function ``part(start, stop)`` making it on ``[start:stop]`` of the flat
        buffers: the kernels do each value's arithmetic alone, so any partition gives the same bits."""
        lr_t, mu, lr_mu, wd = self._sgd_constants(p.dtype, lr, momentum, weight_decay)
        if velocity is None and not weight_decay:
            plain = self.k.sgd_plain
            return lambda start, stop: plain(p[start:stop], g[start:stop], lr_t)
        dummy = self._sgd_dummy(p.dtype)
        v, m = velocity, (mask if weight_decay else None)
        flags, update = (velocity is not None, bool(nesterov), bool(weight_decay)), self.k.sgd_update

        def part(start: int, stop: int) -> None:
            update(p[start:stop], g[start:stop], dummy if v is None else v[start:stop],
                   dummy if m is None else m[start:stop], lr_t, mu, lr_mu, wd, *flags)
        return part

    def _sgd_constants(self, dt: Any, lr: float, momentum: float, weight_decay: float) -> tuple:
        """(η, μ, ημ, λ) in the buffers' dtype, as NumPy rounds a Python float it multiplies them with (the last
        settings' kept: they change at most with a schedule)."""
        key = (dt, lr, momentum, weight_decay)
        if self._sgd_last[0] != key:
            t = dt.type
            self._sgd_last = key, (t(lr), t(momentum), t(lr * momentum), t(weight_decay))
        return self._sgd_last[1]

    def _sgd_dummy(self, dt: Any) -> Array:
        """A one-value array standing in for the velocity or mask a kernel call does not read."""
        dummy = self._dummy.get(dt)
        if dummy is None:
            dummy = self._dummy[dt] = numpy.zeros(1, dt)
        return dummy
