"""NumPy's float32 ``exp``, compiled by numba, for the fused CPU kernels (:mod:`gpunn.cpukernels`).

Where NumPy runs its SIMD exp for float32 (x86 with AVX2 + FMA3 or AVX-512F: ``simd_exp_FLOAT`` in NumPy's
``numpy/_core/src/umath/loops_exponent_log.dispatch.c.src``, which NumPy uses for every float32 exp on
those CPUs, contiguous or not), :func:`exp_row` is the same algorithm, value for value, operation for
operation: NaN, x ≥ 88.7228… and x ≤ −103.972… set aside; k = rint(x·log₂e) by the 1.5·2²³ trick;
r = x + k·c₁ + k·c₂ (+ k·0) as fused multiply-adds (Cody–Waite); P₅(r)/Q₂(r) by FMA Horner steps; then
2ᵏ added into the exponent bits, or for k ≤ −125 (a subnormal result) 2⁻¹²⁵ added and the rest a product
by 2^(k+125): the same real number NumPy divides by 2^(−125−k), so the same rounding, without a division.
The constants are NumPy's ``NPY_*_EXPf`` ones, rounded to float32 as NumPy's C compiler rounds them.

It lets a kernel run the sigmoid's or the softmax's exp inside its own call, bitwise equal to the NumPy
path. The kernels run it a block of a row at a time (:func:`exp_row`): one loop per stage of the algorithm,
and without the special branches where no value of the block needs one (:func:`plain`); per value the same
operations, in less time (``python bench/sigmoid_pass.py``).

Equality is a fact about the NumPy build and CPU in use, so it is checked, not assumed: :func:`matches_numpy`
compares both on a probe of 131,088 inputs (every special case, the subnormal range, a stride through all 2³²
bit patterns) when the kernels load, and the kernels keep NumPy's own exp between two calls wherever it fails.
tests/test_cpuexp.py checks about 23.5 million inputs; ``python scripts/check_exp.py --all`` checks all 2³²
float32 inputs (none differed, NumPy 2.4.6: AMD EPYC Zen 3 with AVX2 + FMA3, about a minute; AMD EPYC Zen 4 with
AVX-512F, where NumPy runs the X86_V4 (AVX-512) build of its float32 exp, 34 s). float64 keeps NumPy's
exp (the C library's, or an AVX-512 one): there is no transcription of it here.

This module imports numba; only :mod:`gpunn.cpukernels` imports it, once numba has imported.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import numpy
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

from .numbacache import cached_njit

__all__ = ["BLOCK", "PLAIN_LOW", "bias_sigmoid", "exp_f32_array", "exp_row", "matches_numpy", "plain",
           "probe", "softmax_pre_exp"]

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
    """``njit(cache=True, **options)`` as :func:`gpunn.numbacache.cached_njit` makes it: a cache file numba cannot
    read is a miss, and where numba has nowhere to write its cache, ``njit(**options)``."""
    return partial(cached_njit, njit, **options)


_fma: Any = intrinsic(_fma_typed)
_bits: Any = intrinsic(_bits_typed)
_from_bits: Any = intrinsic(_from_bits_typed)


@_njit(inline="always", error_model="numpy")
def _reduce_plain(x):
    """NumPy's first stage for one value: (r, k) with k = rint(x·log₂e) by the 1.5·2²³ trick and
    r = x − k·ln 2 (Cody–Waite, as fused multiply-adds)."""
    k = x * LOG2E
    k = k + RINT_MAGIC
    k = k - RINT_MAGIC
    r = _fma(k, CODY_WAITE_HI, x)
    r = _fma(k, CODY_WAITE_LO, r)
    return _fma(k, ZERO, r), k


@_njit(inline="always", error_model="numpy")
def _reduce(x):
    """:func:`_reduce_plain` of x, or of 0 where x is NaN, ≥ xmax or ≤ xmin (:func:`_scale` sets those
    results aside), as NumPy does."""
    if x != x or x >= XMAX or x <= XMIN:
        x = ZERO
    return _reduce_plain(x)


@_njit(inline="always", error_model="numpy")
def _rational(r):
    """NumPy's second stage: P₅(r) / Q₂(r), both by FMA Horner steps, then one IEEE division."""
    num = _fma(P5, r, P4)
    num = _fma(num, r, P3)
    num = _fma(num, r, P2)
    num = _fma(num, r, P1)
    num = _fma(num, r, P0)
    den = _fma(Q2, r, Q1)
    den = _fma(den, r, Q0)
    return num / den


@_njit(inline="always", error_model="numpy")
def _scale_plain(poly, k):
    """NumPy's last stage for a normal result (k > −125): poly · 2ᵏ, k added into the exponent bits."""
    return _from_bits(_bits(poly) + (numpy.int32(k) << 23))


@_njit(inline="always", error_model="numpy")
def _scale(x, poly, k):
    """NumPy's last stage: :func:`_scale_plain`, or for k ≤ −125, a subnormal result, 2⁻¹²⁵ added into the
    exponent and the rest a product by 2^(k+125): the same real number NumPy divides by 2^(−125−k), so the
    same rounding, without a division; then NaN, +inf and 0 for the inputs set aside."""
    # Compiled for 8 values at once, both branches below run and one is selected: low_k ≤ −125 keeps the
    # other lanes' unused product from underflowing (an underflow is a slow microcode assist on x86).
    low_k = k if k < MIN_QUADRANT else MIN_QUADRANT
    if k <= MIN_QUADRANT:
        poly = _from_bits(_bits(poly) + numpy.int32(-125 << 23)) * _from_bits((numpy.int32(low_k) + 252) << 23)
    else:
        poly = _scale_plain(poly, k)
    if x != x:
        return _from_bits(numpy.int32(NAN_BITS))
    if x >= XMAX:
        return INF
    if x <= XMIN:
        return ZERO
    return poly


#: Values :func:`exp_row` takes per round of its loops (scratch of 2 × BLOCK float32, in L1 cache).
BLOCK = 512
#: Above it (and below xmax) NumPy's exp takes none of its special branches: k = rint(x·log₂e) ≥ −124,
#: so the result is normal (x·log₂e > −124.08 here; a subnormal result needs k ≤ −125).
PLAIN_LOW = _f(-86.0)


@_njit(inline="always", error_model="numpy")
def plain(x):
    """1 where NumPy's exp takes none of its special branches for x (no NaN, no overflow, a normal result:
    PLAIN_LOW < x < xmax), else 0; summed over a block as the kernels write it, 0 lets :func:`exp_row` run
    the plain stages."""
    return 1 if (x > PLAIN_LOW and x < XMAX) else 0


@_njit(inline="always", error_model="numpy")
def exp_row(x, out, scratch, all_plain):
    """out = e^x for 1-D contiguous x and out of at most BLOCK values (``out`` may be ``x``), NumPy's stages
    (:func:`_reduce`, :func:`_rational`, :func:`_scale`) one loop each over the values, the intermediate r and k
    kept in ``scratch`` (2, BLOCK), each stage's special branches left out where ``all_plain`` (every x
    :func:`plain`). The same operations on each value as NumPy's one pass; three short chains of dependent
    instructions instead of one long one, which the CPU overlaps across values far better (``python
    bench/sigmoid_pass.py``). The loops index views from 0, which numba compiles to 8-wide vector code (an index
    with an offset, which might be negative, kept some of them scalar)."""
    rs, ks = scratch[0], scratch[1]
    n = x.shape[0]
    if all_plain:
        for j in range(n):
            r, k = _reduce_plain(x[j])
            rs[j] = r
            ks[j] = k
    else:
        for j in range(n):
            r, k = _reduce(x[j])
            rs[j] = r
            ks[j] = k
    for j in range(n):
        rs[j] = _rational(rs[j])
    if all_plain:
        for j in range(n):
            out[j] = _scale_plain(rs[j], ks[j])
    else:
        for j in range(n):
            out[j] = _scale(x[j], rs[j], ks[j])


@_njit(error_model="numpy")
def exp_f32_array(x, out):
    """out = e^x elementwise for flat float32 arrays, block by block through :func:`exp_row` (the kernels'
    code, plain stages where a block allows them)."""
    scratch = numpy.empty((2, BLOCK), numpy.float32)
    for j0 in range(0, x.size, BLOCK):
        j1 = min(j0 + BLOCK, x.size)
        xb = x[j0:j1]
        plain_values = 0
        for j in range(j1 - j0):
            plain_values += plain(xb[j])
        exp_row(xb, out[j0:j1], scratch, plain_values == j1 - j0)


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
    """Whether the transcription gives NumPy's float32 exp bit for bit on ``x`` (default :func:`probe`), run as
    the kernels run it: :func:`exp_row` block by block (:func:`exp_f32_array`)."""
    x = probe() if x is None else numpy.ascontiguousarray(x, numpy.float32).ravel()
    with numpy.errstate(all="ignore"):
        ref = numpy.exp(x)
    out = numpy.empty_like(x)
    exp_f32_array(x, out)
    return bool(numpy.array_equal(ref.view(numpy.uint32), out.view(numpy.uint32)))


# -- the kernels with the exp inside (gpunn.cpukernels binds them where matches_numpy() holds) --------------
@_njit(error_model="numpy", nogil=True)
def bias_sigmoid(z, b, y, cap, one, scratch):
    """z ← z + b; y = 1 / (e^min(−z, cap) + 1): cpukernels' ``bias_sigmoid_pre``, NumPy's exp and
    ``sigmoid_post`` in one call, block by block of each row (the NumPy path's sigmoid, operation for
    operation; ``scratch``: :func:`exp_row`'s)."""
    rows, cols = z.shape
    for i in range(rows):
        for j0 in range(0, cols, BLOCK):
            j1 = min(j0 + BLOCK, cols)
            zr, yr, br = z[i, j0:j1], y[i, j0:j1], b[j0:j1]
            plain_values = 0
            for j in range(j1 - j0):
                v = zr[j] + br[j]
                zr[j] = v
                m = -v
                m = m if (m < cap or m != m) else cap
                yr[j] = m
                plain_values += plain(m)
            exp_row(yr, yr, scratch, plain_values == j1 - j0)
            for j in range(j1 - j0):
                yr[j] = one / (yr[j] + one)


@_njit(error_model="numpy", nogil=True)
def softmax_pre_exp(z, b, y, rowstats, scratch):
    """z ← z + b; m = max of each row (NaN wins); y = e^(z − m); rowstats[0, row] = m: cpukernels'
    ``softmax_pre`` and NumPy's exp in one call (``scratch``: :func:`exp_row`'s)."""
    rows, cols = z.shape
    for i in range(rows):
        m = z[i, 0] + b[0]
        for j in range(cols):
            v = z[i, j] + b[j]
            z[i, j] = v
            if m == m and (v > m or v != v):      # NaN, once met, stays the maximum
                m = v
        for j0 in range(0, cols, BLOCK):
            j1 = min(j0 + BLOCK, cols)
            zr, yr = z[i, j0:j1], y[i, j0:j1]
            plain_values = 0
            for j in range(j1 - j0):
                v = zr[j] - m
                yr[j] = v
                plain_values += plain(v)
            exp_row(yr, yr, scratch, plain_values == j1 - j0)
        rowstats[0, i] = m
