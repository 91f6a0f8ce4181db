"""NumPy's float32 ``exp``, compiled by numba, for the fused CPU kernels (:mod:`gpunn.cpukernels`).

Where NumPy runs its SIMD exp for float32 (x86 with AVX2 + FMA3 or AVX-512F: ``simd_exp_FLOAT`` in NumPy's
``numpy/_core/src/umath/loops_exponent_log.dispatch.c.src``, which NumPy uses for every float32 exp on
those CPUs, contiguous or not), :func:`exp_f32` is the same algorithm, one value at a time, operation for
operation: NaN, x ≥ 88.7228… and x ≤ −103.972… set aside; k = rint(x·log₂e) by the 1.5·2²³ trick;
r = x + k·c₁ + k·c₂ (+ k·0) as fused multiply-adds (Cody–Waite); P₅(r)/Q₂(r) by FMA Horner steps; then
2ᵏ added into the exponent bits, or for k ≤ −125 (a subnormal result) 2⁻¹²⁵ added and the rest a product
by 2^(k+125): the same real number NumPy divides by 2^(−125−k), so the same rounding, without a division.
The constants are NumPy's ``NPY_*_EXPf`` ones, rounded to float32 as NumPy's C compiler rounds them.

It lets a kernel run the sigmoid's or the softmax's exp inside its own loop: one pass and one call
instead of three, bitwise equal to the NumPy path. Equality is a fact about the NumPy build and CPU in
use, so it is checked, not assumed: :func:`matches_numpy` compares both on a probe of 131,088 inputs
(every special case, the subnormal range, a stride through all 2³² bit patterns) when the kernels load,
and the kernels keep NumPy's own exp between two calls wherever it fails. tests/test_cpuexp.py checks
about 23 million inputs; ``python scripts/check_exp.py --all`` checks all 2³² float32 inputs (64 s here:
none differed, NumPy 2.4.6, AMD EPYC Zen 3 with AVX2 + FMA3). float64 keeps NumPy's exp (the C library's,
or an AVX-512 one): there is no transcription of it here.

This module imports numba; only :mod:`gpunn.cpukernels` imports it, once numba has imported.
"""
from __future__ import annotations

from typing import Any

import numpy
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

__all__ = ["bias_sigmoid", "exp_f32", "exp_f32_array", "matches_numpy", "probe", "softmax_pre_exp"]

_f = numpy.float32
LOG2E = _f(1.442695040888963407359924681001892137)       # NPY_LOG2Ef
CODY_WAITE_HI, CODY_WAITE_LO = _f(-6.93145752e-1), _f(-1.42860677e-6)
P0, P1, P2 = _f(9.999999999980870924916e-01), _f(7.257664613233124478488e-01), _f(2.473615434895520810817e-01)
P3, P4, P5 = _f(5.114512081637298353406e-02), _f(6.757896990527504603057e-03), _f(5.082762527590693718096e-04)
Q0, Q1, Q2 = _f(1.0), _f(-2.742335390411667452936e-01), _f(2.159509375685829852307e-02)
RINT_MAGIC = _f(12582912.0)                               # 0x1.8p23: adding then subtracting it rounds to even
XMAX, XMIN = _f(88.72283935546875), _f(-103.97208404541015625)
ZERO, MIN_QUADRANT = _f(0.0), _f(-125.0)
NAN_BITS = 0x7FC00000                                     # NPY_NANF, whatever NaN came in
INF = _f(numpy.inf)


def _fma_typed(typingctx, a, b, c):
    """a·b + c rounded once (LLVM's fma: the FMA3 instruction NumPy's _mm256_fmadd_ps is)."""
    if not (a == b == c == types.float32):
        return None
    return types.float32(a, b, c), lambda context, builder, sig, args: builder.fma(*args)


def _bits_typed(typingctx, a):
    """The IEEE bits of a float32, as an int32."""
    if a != types.float32:
        return None
    return types.int32(a), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


def _from_bits_typed(typingctx, a):
    """The float32 whose bits are the low 32 of an integer (a 32-bit integer add wraps as NumPy's does)."""
    if a not in (types.int32, types.int64):
        return None

    def codegen(context, builder, sig, args):
        value = builder.trunc(args[0], ir.IntType(32)) if a == types.int64 else args[0]
        return builder.bitcast(value, ir.FloatType())
    return types.float32(a), codegen


def _njit(**options: Any) -> Any:
    """``njit(cache=True, **options)``, or ``njit(**options)`` where numba has nowhere to write its cache and
    refuses ``cache=True`` (a read-only install without a writable home: :func:`gpunn.cpukernels.cached_njit`,
    which this module, below it, cannot import)."""
    def decorate(fn: Any) -> Any:
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError as exc:
            if "cannot cache" not in str(exc):
                raise
            return njit(**options)(fn)
    return decorate


_fma: Any = intrinsic(_fma_typed)
_bits: Any = intrinsic(_bits_typed)
_from_bits: Any = intrinsic(_from_bits_typed)


@_njit(inline="always", error_model="numpy")
def exp_f32(x):
    """e^x for a float32 x, bitwise NumPy's float32 exp where :func:`matches_numpy` (module docstring)."""
    nan = x != x
    high = x >= XMAX
    low = x <= XMIN
    if nan or high or low:
        x = ZERO
    k = x * LOG2E
    k = k + RINT_MAGIC
    k = k - RINT_MAGIC
    r = _fma(k, CODY_WAITE_HI, x)
    r = _fma(k, CODY_WAITE_LO, r)
    r = _fma(k, ZERO, r)
    num = _fma(P5, r, P4)
    num = _fma(num, r, P3)
    num = _fma(num, r, P2)
    num = _fma(num, r, P1)
    num = _fma(num, r, P0)
    den = _fma(Q2, r, Q1)
    den = _fma(den, r, Q0)
    poly = num / den
    # Compiled for 8 values at once, both branches below run and one is selected: low_k ≤ −125 keeps the
    # other lanes' unused product from underflowing (an underflow is a slow microcode assist on x86).
    low_k = k if k < MIN_QUADRANT else MIN_QUADRANT
    if k <= MIN_QUADRANT:          # the result is subnormal: 2^-125 into the exponent, then × 2^(k+125), which
        # rounds the same real number NumPy's division by 2^(-125-k) rounds, once, as IEEE rounds both
        poly = _from_bits(_bits(poly) + numpy.int32(-125 << 23)) * _from_bits((numpy.int32(low_k) + 252) << 23)
    else:
        poly = _from_bits(_bits(poly) + (numpy.int32(k) << 23))
    if nan:
        return _from_bits(numpy.int32(NAN_BITS))
    if high:
        return INF
    if low:
        return ZERO
    return poly


@_njit(error_model="numpy")
def exp_f32_array(x, out):
    """out = e^x elementwise for flat float32 arrays, through :func:`exp_f32`."""
    for i in range(x.size):
        out[i] = exp_f32(x[i])


def probe() -> numpy.ndarray:
    """The inputs :func:`matches_numpy` compares: the special values and both ends of the range (NaNs of
    both signs, ±inf, ±0, the subnormals, xmax and xmin and their neighbours, the start of subnormal results),
    every bit pattern around them, and a stride of 65,537 through all 2³² bit patterns."""
    edges = numpy.array([0.0, -0.0, numpy.inf, -numpy.inf, numpy.nan, -numpy.nan, XMAX, XMIN, 88.0, -87.33654,
                         -88.0, -100.0, 1e-38, -1e-38, 1e-45, -1e-45], numpy.float32).view(numpy.uint32)
    near = (edges[:, None].astype(numpy.int64) + numpy.arange(-2048, 2049)[None, :]) % (1 << 32)
    stride = numpy.arange(0, 1 << 32, 65537, dtype=numpy.int64)
    return numpy.concatenate([near.ravel(), stride]).astype(numpy.uint32).view(numpy.float32)


def matches_numpy(x: numpy.ndarray | None = None) -> bool:
    """Whether :func:`exp_f32` gives NumPy's float32 exp bit for bit on ``x`` (default :func:`probe`)."""
    x = probe() if x is None else numpy.ascontiguousarray(x, numpy.float32).ravel()
    with numpy.errstate(all="ignore"):
        ref = numpy.exp(x)
    out = numpy.empty_like(x)
    exp_f32_array(x, out)
    return bool(numpy.array_equal(ref.view(numpy.uint32), out.view(numpy.uint32)))


# -- the kernels with the exp inside (gpunn.cpukernels binds them where matches_numpy() holds) --------------
@_njit(error_model="numpy", nogil=True)
def bias_sigmoid(z, b, y, cap, one):
    """z ← z + b; y = 1 / (e^min(−z, cap) + 1): cpukernels' ``bias_sigmoid_pre``, NumPy's exp and
    ``sigmoid_post`` in one pass (the NumPy path's sigmoid, operation for operation)."""
    rows, cols = z.shape
    for i in range(rows):
        for j in range(cols):
            v = z[i, j] + b[j]
            z[i, j] = v
            m = -v
            m = m if (m < cap or m != m) else cap
            y[i, j] = one / (exp_f32(m) + one)


@_njit(error_model="numpy", nogil=True)
def softmax_pre_exp(z, b, y, rowstats):
    """z ← z + b; m = max of each row (NaN wins); y = e^(z − m); rowstats[:, 0] = m: cpukernels'
    ``softmax_pre`` and NumPy's exp in one call."""
    rows, cols = z.shape
    for i in range(rows):
        m = z[i, 0] + b[0]
        for j in range(cols):
            v = z[i, j] + b[j]
            z[i, j] = v
            if m == m and (v > m or v != v):      # NaN, once met, stays the maximum
                m = v
        for j in range(cols):
            y[i, j] = exp_f32(z[i, j] - m)
        rowstats[i, 0] = m
