"""Fused CUDA kernels for the CuPy backend (one RawModule, compiled once per process and device).

Each unfused step launches several small kernels per layer (bias add, activation, derivative,
multiply, column sum, update). Here each of those chains is one kernel:

- ``bias_act_fwd<T, A>``: z ← z + b in place on the matmul output, then y = f(z)   (lecture §1.1)
- ``act_bwd<T, A>``: δ = f′(z, y) ⊙ ∂E/∂y                                        (eqs 11, 14)
- ``colsum<T>``: grad_b = Σ over the batch of δ on a 2-D grid, with a fixed reduction order (deterministic)
- ``softmax_fwd<T>``, ``xent_bwd<T>``, ``sum_scaled<T>``: the softmax output layer and its cross-entropy
  (loss and δ), a warp per row with a fixed-order shuffle reduction, and the loss's mean in a fixed order
- ``sgd_update<T>``: eq (15) with momentum / Nesterov / weight decay over the network's one flat
  parameter buffer (every W and b are views of it)

The arithmetic is the NumPy path's, operation for operation: the same overflow-safe formulas and
the same order, compiled with ``--fmad=false`` (no fused multiply-add contraction) and without
fast-math, so fused and unfused results should agree to rounding of the transcendental functions.
Two differences: the softmax's row sums and the cross-entropy's Σ t·z are added in a warp's fixed
order (lanes over strided columns, then a butterfly), and CuPy compiles every RawModule with
``-ftz=true``, so float32 subnormals (|x| < 1.2e-38) are flushed to zero on the GPU where NumPy keeps
them. A host emulation (tests/emulation.py) checks all of it on CPU CI, kernel by kernel and, through the
``fakecupy`` test backend, in whole training steps; on a card test_fused_matches_unfused_on_gpu does.
This module holds the kernels and their launches only; :class:`gpunn.ops.FusedOps` decides when to
use them (Adam stays plain ``xp`` code). ``GPUNN_FUSED=0`` or
``Sequential(..., fused=False)`` switches all of this off.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy

from .activations import Activation, exp_cap
from .backend import Device
from .registry import Registry
from .types import Array, DTypeLike

#: The activation template argument A of the kernels: the one place that numbers the activations.
ACTIVATION_IDS = {"identity": 0, "sigmoid": 1, "tanh": 2, "relu": 3, "leaky_relu": 4, "softplus": 5, "elu": 6}
CTYPES = {"float32": "float", "float64": "double"}
OPTIONS = ("--fmad=false",)   # CuPy adds -ftz=true and its default C++ standard itself
BLOCK = 256
#: Blocks the column sum aims for per SM of the device (``colsum_blocks``), so that a batch fills the card.
COLSUM_BLOCKS_PER_SM = 2
#: The column sum's aim where the device does not say its SM count: 2 per SM of an H100/H200 (132 SMs).
COLSUM_BLOCKS = 264
#: Widest softmax layer the warp-per-row kernels take (32 columns per lane; wider ones use the xp code).
MAX_SOFTMAX_COLS = 1024
#: Rows (warps) per block of the softmax and cross-entropy kernels: block (32, SOFTMAX_ROWS).
SOFTMAX_ROWS = 4
#: bias_act_fwd indexes with 32 bits, the softmax and cross-entropy kernels count rows and columns with them:
#: larger buffers take the xp code. (act_bwd and sgd_update count with 64 bits; colsum takes rows and columns
#: up to MAX_INT32 // 2, so that its ends of a chunk and of a tile stay in an int.)
MAX_INT32 = 2**31 - 1

SOURCE = r"""
// gpunn fused kernels. T is float or double; A is the activation id (see ACTIVATION_IDS).
__device__ __forceinline__ float  g_exp(float x)    { return expf(x); }
__device__ __forceinline__ double g_exp(double x)   { return exp(x); }
__device__ __forceinline__ float  g_expm1(float x)  { return expm1f(x); }
__device__ __forceinline__ double g_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float  g_log1p(float x)  { return log1pf(x); }
__device__ __forceinline__ double g_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float  g_log(float x)    { return logf(x); }
__device__ __forceinline__ double g_log(double x)   { return log(x); }
__device__ __forceinline__ float  g_tanh(float x)   { return tanhf(x); }
__device__ __forceinline__ double g_tanh(double x)  { return tanh(x); }
// +infinity without math.h's INFINITY, which NVRTC (CuPy's compiler) does not define
__device__ __forceinline__ float  g_inf(float)      { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double g_inf(double)     { return __longlong_as_double(0x7ff0000000000000LL); }

// f(z), written exactly as gpunn/activations.py computes it with NumPy (NaN propagates like NumPy).
template<typename T, int A>
__device__ __forceinline__ T act_f(T z, T p, T cap) {
    if (A == 1) {                                   // sigmoid: 1 / (1 + e^min(-z, cap))
        T m = -z;
        m = (m > cap) ? cap : m;
        T e = g_exp(m);
        e = e + T(1);
        return T(1) / e;
    }
    if (A == 2) return g_tanh(z);                   // tanh
    if (A == 3) return (z > T(0) || z != z) ? z : T(0);              // relu = maximum(z, 0)
    if (A == 4) { T a = z * p; return (z >= a || z != z) ? z : a; }  // leaky = maximum(z, αz)
    if (A == 5) {                                   // softplus = logaddexp(0, z)
        if (z == T(0)) return T(0.693147180559945309417232121458176568);
        if (-z > T(0)) return g_log1p(g_exp(z));    // 0 + log1p(e^(z - 0))
        if (-z <= T(0)) return z + g_log1p(g_exp(-z));
        return z;                                   // NaN
    }
    if (A == 6) {                                   // elu: a·expm1(min(z, 0)), then z where z > 0
        T m = (z > T(0)) ? T(0) : z;
        T e = g_expm1(m) * p;
        if (p <= T(1)) return (e >= z || e != e) ? e : z;            // maximum(e, z)
        return (z > T(0)) ? z : e;
    }
    return z;                                       // identity
}

// δ = f'(z, y) · g, in the NumPy path's order of operations.
// q = 1 - p, rounded once on the host as NumPy rounds the Python float (1 - α) to T.
template<typename T, int A>
__device__ __forceinline__ T act_d(T z, T y, T g, T p, T q) {
    if (A == 1) { T o = T(1) - y; o = o * y; return o * g; }          // y(1 - y)      (eq 6)
    if (A == 2) { T o = y * y; o = T(1) - o; return o * g; }          // 1 - y²
    if (A == 3) { T o = (z > T(0)) ? T(1) : T(0); return o * g; }
    if (A == 4) { T o = (z > T(0)) ? T(1) : T(0); o = o * q; o = o + p; return o * g; }
    if (A == 5) { T o = g_expm1(-y); o = -o; return o * g; }          // σ(z) = 1 - e^(-y)
    if (A == 6) {                                                     // min(y,0) + a + (1-a)[y>0]
        T o = (y > T(0)) ? T(0) : y;
        o = o + p;
        T s = (y > T(0)) ? T(1) : T(0);
        s = s * q;
        o = o + s;
        return o * g;
    }
    return g;
}

// 32-bit indexing (the launcher takes the xp code at 2^31 elements or more): the column of element i is
// a 32-bit unsigned remainder, not a 64-bit one (a long division routine per element). i + stride stays
// below 2^32 since the grid has at most 2^20 blocks of 256 threads.
template<typename T, int A>
__global__ void bias_act_fwd(T* z, const T* __restrict__ b, T* y, int n, int ncol, T p, T cap) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)n; i += gridDim.x * blockDim.x) {
        T v = z[i] + b[i % (unsigned)ncol];
        z[i] = v;
        y[i] = act_f<T, A>(v, p, cap);
    }
}

template<typename T, int A>
__global__ void act_bwd(const T* __restrict__ z, const T* __restrict__ y, const T* __restrict__ g,
                        T* __restrict__ d, long long n, T p, T q) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        d[i] = act_d<T, A>(z[i], y[i], g[i], p, q);
}

// Column sums of a (rows, cols) C-contiguous matrix over a 2-D grid that fills the GPU: blockIdx.x
// picks 32 columns, blockIdx.y a chunk of ``chunk`` rows. Block (32, 8): each thread sums a strided set
// of its chunk's rows in order, warp 0 (threadIdx.y == 0) adds the 8 partial sums in order and writes the
// chunk's sums to part[blockIdx.y, :]. The block that finishes a column tile last (a ticket counter per
// tile) adds the chunks' sums in chunk order and resets the counter: deterministic, whatever the order
// in which blocks finish.
// Memory order (as PyTorch's Reduce.cuh): the writing warp fences (release) before the ticket; the last
// block fences again once it knows it is last (acquire) and reads the partials with __ldcg (L2, never a
// stale L1 line: a tile boundary can fall inside a 32-byte sector another block wrote, cols % 8 != 0).
template<typename T>
__global__ void colsum(const T* __restrict__ d, T* __restrict__ out, T* part, int* count, int rows, int cols,
                       int chunk) {
    __shared__ T tile[8][33];
    __shared__ int last;
    int c = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * chunk;
    int r1 = (r0 + chunk < rows) ? r0 + chunk : rows;
    T acc = T(0);
    if (c < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) acc += d[(long long)r * cols + c];
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0) {
        if (c < cols) {
            T s = tile[0][threadIdx.x];
            for (int k = 1; k < 8; ++k) s += tile[k][threadIdx.x];
            part[(long long)blockIdx.y * cols + c] = s;
        }
        __threadfence();                                   // release: the partials before the ticket
        if (threadIdx.x == 0) last = (atomicAdd(&count[blockIdx.x], 1) == (int)gridDim.y - 1);
    }
    __syncthreads();
    if (last && threadIdx.y == 0) {
        __threadfence();                                   // acquire: the ticket before the partials
        if (c < cols) {
            T s = __ldcg(part + c);
            for (int k = 1; k < (int)gridDim.y; ++k) s += __ldcg(part + (long long)k * cols + c);
            out[c] = s;
        }
        if (threadIdx.x == 0) count[blockIdx.x] = 0;       // ready for the next launch on this stream
    }
}

// Eq (15) over the flat parameter buffer, with the NumPy path's operation order:
// g' = g + wd·(p·mask);  v = μv + g';  p -= lr·v  (Nesterov: p -= lr·g'; p -= (lr·μ)·v)
template<typename T>
__global__ void sgd_update(T* p, const T* __restrict__ g, T* v, const T* __restrict__ mask, long long n,
                           T lr, T mu, T lr_mu, T wd, int has_v, int nesterov, int has_wd) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        T gd = g[i];
        if (has_wd) { T s = p[i] * mask[i]; s = s * wd; gd = s + gd; }
        T w = p[i];
        if (has_v) {
            T vv = v[i] * mu;
            vv = vv + gd;
            v[i] = vv;
            if (nesterov) { T s = gd * lr; w = w - s; s = vv * lr_mu; w = w - s; }
            else { T s = vv * lr; w = w - s; }
        } else {
            T s = gd * lr;
            w = w - s;
        }
        p[i] = w;
    }
}

// Sums and maxima over the 32 lanes of a warp by an XOR butterfly (offsets 16, 8, 4, 2, 1): a fixed
// order, and since a + b == b + a exactly, every lane ends with the same bits. Deterministic.
template<typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) { T w = __shfl_xor_sync(0xffffffffu, v, o); v = v + w; }
    return v;
}

template<typename T>
__device__ __forceinline__ T warp_max(T v) {               // NaN propagates, as in NumPy's max
    for (int o = 16; o > 0; o >>= 1) { T w = __shfl_xor_sync(0xffffffffu, v, o); v = (w > v || w != w) ? w : v; }
    return v;
}

// Softmax output layer, one warp per row (block (32, ROWS): ROWS rows per block), columns strided over the
// lanes so that a warp reads consecutive addresses: z += b; m = max_c z; e = e^(z - m); s = Σ_c e; y = e / s;
// col[r] = m + log s (the log-partition the cross-entropy reads), col[rows + r] = log s: col is (2, rows).
// The row loop is warp-uniform, so every lane reaches every shuffle.
template<typename T>
__global__ void softmax_fwd(T* z, const T* __restrict__ b, T* y, T* col, int rows, int cols) {
    int lane = threadIdx.x;
    for (int r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y) {
        T* zr = z + (long long)r * cols;
        T* yr = y + (long long)r * cols;
        T m = -g_inf(T(0));
        for (int c = lane; c < cols; c += 32) {
            T v = zr[c] + b[c];
            zr[c] = v;
            m = (v > m || v != v) ? v : m;
        }
        m = warp_max(m);
        T s = T(0);
        for (int c = lane; c < cols; c += 32) { T e = g_exp(zr[c] - m); yr[c] = e; s = s + e; }
        s = warp_sum(s);
        for (int c = lane; c < cols; c += 32) yr[c] = yr[c] / s;
        if (lane == 0) {
            T ls = g_log(s);
            col[r] = m + ls;
            col[rows + r] = ls;
        }
    }
}

// Cross-entropy after softmax, one warp per row: rowloss = log-partition − Σ_c t·z (= −Σ t log y for rows
// of t that sum to 1) and the output δ = (y − t) / B.
template<typename T>
__global__ void xent_bwd(const T* __restrict__ z, const T* __restrict__ y, const T* __restrict__ col,
                         const T* __restrict__ t, T* __restrict__ delta, T* __restrict__ rowloss, int rows,
                         int cols, T inv_b) {
    int lane = threadIdx.x;
    for (int r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y) {
        T tz = T(0);
        for (int c = lane; c < cols; c += 32) {
            long long i = (long long)r * cols + c;
            tz = tz + t[i] * z[i];
            T d = y[i] - t[i];
            delta[i] = d * inv_b;
        }
        tz = warp_sum(tz);
        if (lane == 0) rowloss[r] = col[r] - tz;
    }
}

// out[0] = scale · Σ v in a fixed order, one block of (1, 256) threads: thread y sums v[y], v[y + 256], ...
// in order, then thread 0 adds the 256 partial sums in order. Deterministic, no atomics.
template<typename T>
__global__ void sum_scaled(const T* __restrict__ v, T* __restrict__ out, int n, T scale) {
    __shared__ T part[256];
    int k = threadIdx.y;
    T acc = T(0);
    for (int i = k; i < n; i += 256) acc = acc + v[i];
    part[k] = acc;
    __syncthreads();
    if (k == 0) {
        T s = part[0];
        for (int j = 1; j < 256; ++j) s = s + part[j];
        out[0] = s * scale;
    }
}
"""


def name_expressions() -> list[str]:
    """Every template instance the module exports."""
    names = []
    for ctype in CTYPES.values():
        for a in sorted(set(ACTIVATION_IDS.values())):
            names += [f"bias_act_fwd<{ctype}, {a}>", f"act_bwd<{ctype}, {a}>"]
        names += [f"colsum<{ctype}>", f"sgd_update<{ctype}>", f"softmax_fwd<{ctype}>", f"xent_bwd<{ctype}>",
                  f"sum_scaled<{ctype}>"]
    return names


def instantiation_source() -> str:
    """SOURCE plus explicit instantiations, for an offline ``nvcc`` syntax/compile check."""
    lines = [SOURCE]
    for ctype in CTYPES.values():
        for a in sorted(set(ACTIVATION_IDS.values())):
            lines.append(f"template __global__ void bias_act_fwd<{ctype}, {a}>({ctype}*, const {ctype}*, "
                         f"{ctype}*, int, int, {ctype}, {ctype});")
            lines.append(f"template __global__ void act_bwd<{ctype}, {a}>(const {ctype}*, const {ctype}*, "
                         f"const {ctype}*, {ctype}*, long long, {ctype}, {ctype});")
        lines.append(f"template __global__ void colsum<{ctype}>(const {ctype}*, {ctype}*, {ctype}*, int*, int, int, "
                     "int);")
        lines.append(f"template __global__ void sgd_update<{ctype}>({ctype}*, const {ctype}*, {ctype}*, "
                     f"const {ctype}*, long long, {ctype}, {ctype}, {ctype}, {ctype}, int, int, int);")
        lines.append(f"template __global__ void softmax_fwd<{ctype}>({ctype}*, const {ctype}*, {ctype}*, {ctype}*, "
                     "int, int);")
        lines.append(f"template __global__ void xent_bwd<{ctype}>(const {ctype}*, const {ctype}*, const {ctype}*, "
                     f"const {ctype}*, {ctype}*, {ctype}*, int, int, {ctype});")
        lines.append(f"template __global__ void sum_scaled<{ctype}>(const {ctype}*, {ctype}*, int, {ctype});")
    return "\n".join(lines)


_MODULES: dict[int, Any] = {}


def module(device: Device) -> Any:
    """The compiled RawModule for ``device`` (compiled on first use, before any timing)."""
    mod = _MODULES.get(device.index)
    if mod is None:
        cp = device.xp
        with cp.cuda.Device(device.index):
            mod = cp.RawModule(code=SOURCE, options=OPTIONS, name_expressions=name_expressions())
            mod.compile()
        _MODULES[device.index] = mod
    return mod


def _int32(n: int) -> numpy.int32 | None:
    """``n`` as a kernel's int argument, or None where it does not fit (the launcher takes the xp code)."""
    return numpy.int32(n) if n <= MAX_INT32 else None


def _grid(n: int) -> tuple[int]:
    return (max(1, min((n + BLOCK - 1) // BLOCK, 1 << 20)),)


def _row_grid(rows: int) -> tuple[int]:
    """Blocks of SOFTMAX_ROWS warps, one warp per row (the kernels stride over rows past 2^20 blocks)."""
    return (max(1, min(-(-rows // SOFTMAX_ROWS), 1 << 20)),)


def colsum_blocks(device: Device) -> int:
    """The column sum's target grid size on ``device``: COLSUM_BLOCKS_PER_SM per SM it reports."""
    try:
        sms = int(device.xp.cuda.runtime.getDeviceProperties(device.index)["multiProcessorCount"])
    except Exception:          # a runtime that does not say: the H100/H200 figure
        return COLSUM_BLOCKS
    return max(1, COLSUM_BLOCKS_PER_SM * sms)


def colsum_plan(rows: int, cols: int, blocks: int) -> tuple[int, int, int]:
    """(column tiles, row chunks, rows per chunk) of a column sum: chunks of at least 64 rows, and enough of
    them that tiles × chunks ≥ ``blocks`` where the rows allow it."""
    tiles = (cols + 31) // 32
    chunks = max(1, min((rows + 63) // 64, -(-blocks // tiles)))
    chunk = -(-rows // chunks)
    return tiles, -(-rows // chunk), chunk


#: The column sum's scratch, (device index, stream pointer, shape, dtype, chunks) -> (partial sums, counters):
#: launches on one stream run one after another, so every network and layer of one shape shares one set
#: per stream, and two streams never share counters. Bounded by shapes × streams, not by networks; a set
#: goes when no FusedKernels uses it any more (``_USERS``: how many hold it; each keeps the sets of its last
#: :data:`MAX_BATCH_SIZES` batch sizes).
_SCRATCH: dict[tuple, tuple[Array, Array]] = {}
_USERS: dict[tuple, int] = {}

#: Batch sizes whose training scratch is kept (a fit uses two: the batch and the last, smaller one; a
#: data-parallel rank's share adds at most two more); the oldest size's goes when a new one comes. The
#: layers' buffers (gpunn.layers) and the GPU kernels' scratch here follow this one bound.
MAX_BATCH_SIZES = 4
#: Shapes whose launch sizes (a few host numbers) a FusedKernels keeps: inference meets any row count.
MAX_SHAPES = 64


def _make_room(cache: dict, rows: int, rows_of: Any, keep: int) -> list:
    """Before ``cache`` gets an entry of ``rows`` rows: where it holds entries of ``keep`` other row counts,
    drop those of the count that came first (first seen, first gone); returns the keys dropped."""
    counts = dict.fromkeys(rows_of(k) for k in cache)
    counts.pop(rows, None)
    dropped: list = []
    while len(counts) >= keep:
        gone = next(iter(counts))
        del counts[gone]
        keys = [k for k in cache if rows_of(k) == gone]
        for k in keys:
            del cache[k]
        dropped += keys
    return dropped


def stale_counters(device: Device) -> int:
    """Ticket counters of ``device`` that are not zero (synchronises: a check, not for a step).

    Every colsum launch leaves its counters at zero, so this is 0 unless a launch was cut short (which
    also ends the CUDA context) or two launches raced on one set of counters. gpunn check, the GPU
    tests and bench/gpu_check.py assert it.
    """
    return sum(int((count != 0).sum()) for key, (_, count) in list(_SCRATCH.items()) if key[0] == device.index)


class FusedKernels:
    """Launches of the compiled kernels on one device.

    Everything a launch needs besides its arrays (the kernel, its scalar arguments, the grid) depends
    only on the activation, the dtype and the buffer sizes, so it is built once and cached: the host
    work per launch is a few dictionary lookups. Each launch method returns False, launching nothing,
    where no kernel covers the case (a softmax wider than MAX_SOFTMAX_COLS, a non-contiguous view, a
    bias add, softmax or cross-entropy over 2^31 elements, a column sum of 2^30 rows or columns: MAX_INT32);
    the caller then runs the ``xp`` code.

    The column sum's scratch (partial sums and ticket counters) is per (device, CUDA stream, shape, dtype),
    shared by every instance (``_SCRATCH``): launches on one stream run one after the other, so layers of
    one shape share it safely, while two streams never share counters (:func:`stale_counters` checks that
    every launch left them at zero).
    """

    def __init__(self, device: Device):
        self.device = device
        self.module = module(device)
        self.colsum_blocks = colsum_blocks(device)
        self._act_args: dict[tuple, tuple] = {}     # (kernel, activation, param, dtype) -> (fn, scalars)
        self._sizes: dict[tuple, tuple] = {}        # shape -> (grid, size arguments)
        self._sgd_last: tuple = (None, None)        # (dtype, hyper-parameters), (fn, scalars): one slot,
        #                                             so a learning-rate schedule cannot grow a cache
        self._colsum: dict[tuple, tuple] = {}       # (shape, dtype, stream) -> (fn, grid, scratch, counters, sizes)
        self._colsum_keys: dict[tuple, tuple] = {}  # (shape, dtype, stream) -> its key in _SCRATCH
        self._plain: dict[tuple, Any] = {}          # (kernel, dtype) -> fn, for the non-activation kernels
        self._rowloss: dict[tuple, Array] = {}      # (rows, dtype) -> per-row loss scratch
        self.xp = device.xp
        self._dummy: dict[Any, Array] = {}          # dtype -> one-element stand-in for an absent buffer
        # an instance dropped (its network gone, or replaced by .to()) gives up its shares of the scratch
        weakref.finalize(self, _release_all, self._colsum_keys)

    def _activation(self, kernel: str, act: Activation, dtype: DTypeLike) -> tuple | None:
        """(kernel function, T p, T third) for ``act``, or None where no kernel covers it (softmax)."""
        name = Registry.key_of(type(act))       # a subclass (another key) is not its parent's kernel
        key = (kernel, name, act.param, dtype)
        hit = self._act_args.get(key)
        if hit is None:
            a = ACTIVATION_IDS.get(name)
            if a is None:
                return None
            t = numpy.dtype(dtype).type
            third = exp_cap(dtype) if kernel == "bias_act_fwd" else 1.0 - act.param   # cap, or q = 1 − p
            fn = self.module.get_function(f"{kernel}<{CTYPES[numpy.dtype(dtype).name]}, {a}>")
            hit = self._act_args[key] = (fn, t(act.param), t(third))
        return hit

    def _size(self, shape: tuple) -> tuple:
        """(grid, int64 element count, int32 column count, int32 row count, int32 element count) for a (rows,
        cols) buffer, each int32 None past MAX_INT32 (a flat parameter buffer of 2^31 or more: sgd_update
        takes the int64 count)."""
        hit = self._sizes.get(shape)
        if hit is None:
            while len(self._sizes) >= MAX_SHAPES:       # bounded: the first shape seen goes
                del self._sizes[next(iter(self._sizes))]
            n = shape[0] * shape[1]
            hit = self._sizes[shape] = (_grid(n), numpy.int64(n), _int32(shape[1]), _int32(shape[0]), _int32(n))
        return hit

    def bias_activation(self, act: Activation, z: Array, b: Array, y: Array) -> bool:
        """z ← z + b, y = f(z) in one kernel."""
        k = self._activation("bias_act_fwd", act, z.dtype)
        if k is None or not (z.flags.c_contiguous and y.flags.c_contiguous and b.flags.c_contiguous):
            return False
        fn, p, cap = k
        grid, _, ncol, _, n = self._size(z.shape)
        if n is None:
            return False
        fn(grid, (BLOCK,), (z, b, y, n, ncol, p, cap))
        return True

    def softmax(self, z: Array, b: Array, y: Array, col: Array) -> bool:
        """z ← z + b, y = softmax(z) by rows, col = (log-partitions, log Σ e^(z − max)), shape (2, rows), in
        one kernel."""
        if (z.shape[1] > MAX_SOFTMAX_COLS or col.shape != (2, z.shape[0])
                or not all(v.flags.c_contiguous for v in (z, b, y, col))):
            return False
        _, _, cols, rows, n = self._size(z.shape)
        if n is None:
            return False
        fn = self._function("softmax_fwd", z.dtype)
        fn(_row_grid(z.shape[0]), (32, SOFTMAX_ROWS), (z, b, y, col, rows, cols))
        return True

    def cross_entropy(self, z: Array, y: Array, col: Array, t: Array, delta: Array, out: Array) -> bool:
        """δ = (y − t)/B and out[0] = mean over rows of (log-partition − t·z): two kernels, fixed order."""
        if (z.shape[1] > MAX_SOFTMAX_COLS or col.shape != (2, z.shape[0])
                or not all(v.flags.c_contiguous for v in (z, y, col, t, delta, out))):
            return False
        _, _, cols, rows, n = self._size(z.shape)
        if n is None:
            return False
        rows_n = z.shape[0]
        key = (rows_n, z.dtype)
        rowloss = self._rowloss.get(key)
        if rowloss is None:
            _make_room(self._rowloss, rows_n, lambda k: k[0], MAX_BATCH_SIZES)
            rowloss = self._rowloss[key] = self.xp.empty(rows_n, z.dtype)
        inv_b = z.dtype.type(1.0 / rows_n)
        self._function("xent_bwd", z.dtype)(_row_grid(rows_n), (32, SOFTMAX_ROWS),
                                            (z, y, col, t, delta, rowloss, rows, cols, inv_b))
        self._function("sum_scaled", z.dtype)((1,), (1, 256), (rowloss, out, rows, inv_b))
        return True

    def _function(self, kernel: str, dtype: Any) -> Any:
        key = (kernel, dtype)
        fn = self._plain.get(key)
        if fn is None:
            fn = self._plain[key] = self.module.get_function(f"{kernel}<{CTYPES[numpy.dtype(dtype).name]}>")
        return fn

    def activation_backward(self, act: Activation, z: Array, y: Array, grad: Array, out: Array) -> bool:
        """δ = f′(z) ⊙ grad in one kernel."""
        k = self._activation("act_bwd", act, z.dtype)
        if k is None or not all(v.flags.c_contiguous for v in (z, y, grad, out)):
            return False
        fn, p, q = k
        grid, n, _, _, _ = self._size(z.shape)
        fn(grid, (BLOCK,), (z, y, grad, out, n, p, q))
        return True

    def column_sum(self, delta: Array, out: Array) -> bool:
        """out = Σ over the rows of delta, in a fixed order, on a grid of at least ``colsum_blocks`` blocks."""
        if (not (delta.flags.c_contiguous and out.flags.c_contiguous)
                or delta.shape[0] > MAX_INT32 // 2 or delta.shape[1] > MAX_INT32 // 2):
            return False
        key = (delta.shape, delta.dtype, self.xp.cuda.get_current_stream().ptr)
        hit = self._colsum.get(key)
        if hit is None:
            for gone in _make_room(self._colsum, delta.shape[0], lambda k: k[0][0], MAX_BATCH_SIZES):
                _release(self._colsum_keys.pop(gone))
            hit = self._colsum[key] = self._colsum_setup(delta, key[2])
        fn, grid, part, count, sizes = hit
        fn(grid, (32, 8), (delta, out, part, count) + sizes)
        return True

    def _colsum_setup(self, delta: Array, stream: int) -> tuple:
        rows, cols = delta.shape
        tiles, chunks, chunk = colsum_plan(rows, cols, self.colsum_blocks)
        fn = self.module.get_function(f"colsum<{CTYPES[delta.dtype.name]}>")
        key = (self.device.index, stream, delta.shape, delta.dtype, chunks)
        scratch = _SCRATCH.get(key)
        if scratch is None:
            with self.device.activate():
                scratch = _SCRATCH[key] = (self.xp.empty((chunks, cols), delta.dtype),
                                           self.xp.zeros(tiles, numpy.int32))   # each launch leaves it at zero
        _USERS[key] = _USERS.get(key, 0) + 1
        self._colsum_keys[(delta.shape, delta.dtype, stream)] = key
        return (fn, (tiles, chunks)) + scratch + ((numpy.int32(rows), numpy.int32(cols), numpy.int32(chunk)),)



    def sgd_update(self, p: Array, g: Array, velocity: Array | None, mask: Array | None, lr: float,
                   momentum: float, nesterov: bool, weight_decay: float) -> None:
        """:meth:`gpunn.optim.SGD.update`'s formula over the whole flat buffer, in one kernel."""
        dt = p.dtype
        key = (dt, lr, momentum, nesterov, weight_decay)
        if self._sgd_last[0] != key:
            t = dt.type
            self._sgd_last = key, (
                self.module.get_function(f"sgd_update<{CTYPES[dt.name]}>"),
                (t(lr), t(momentum), t(lr * momentum), t(weight_decay), numpy.int32(1 if momentum else 0),
                 numpy.int32(1 if nesterov else 0), numpy.int32(1 if weight_decay else 0)))
        fn, scalars = self._sgd_last[1]
        grid, n, _, _, _ = self._size((1, p.size))
        # absent buffers are a one-element dummy, never p itself: the kernel's pointers are __restrict__
        dummy = self._dummy.get(dt)
        if dummy is None:
            dummy = self._dummy[dt] = self.xp.zeros(1, dt)
        fn(grid, (BLOCK,), (p, g, velocity if velocity is not None else dummy, mask if mask is not None else dummy,
                            n) + scalars)


def _release(key: tuple) -> None:
    """One user fewer of the shared scratch ``key``; the last one frees it."""
    users = _USERS.pop(key, 1) - 1
    if users > 0:
        _USERS[key] = users
    else:
        _SCRATCH.pop(key, None)


def _release_all(keys: dict[tuple, tuple]) -> None:
    """A dropped FusedKernels' shares of the shared scratch, given up (``keys``: its ``_colsum_keys``)."""
    for key in list(keys.values()):
        _release(key)
    keys.clear()
