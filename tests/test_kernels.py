"""The fused CUDA kernels, checked without a GPU where possible.

1. ``nvcc`` compiles the kernel source for sm_90 (catches syntax and type errors on CPU CI).
2. The same source, compiled as plain C++ with a tiny CUDA emulation (one thread walks each
   grid-stride loop; colsum's threads run so that the block's row 0 goes last), must compute what the
   NumPy path computes: this checks indexing, formulas and operation order of every kernel.
3. On a GPU: fused against unfused results for every activation and loss.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy
import pytest

import gpunn
from conftest import host, rng
from gpunn import activations, kernels
from gpunn.backend import Device
from gpunn.ops import XpOps

NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_kernels_compile_for_sm90(tmp_path):
    src = tmp_path / "gpunn_kernels.cu"
    src.write_text(kernels.instantiation_source())
    r = subprocess.run([NVCC, "-arch=sm_90", "--std=c++17", *kernels.OPTIONS, "-ftz=true", "-c", str(src), "-o",
                        str(tmp_path / "k.o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


EMULATION = r"""
#include <math.h>
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __syncthreads()
"""


def _emulation_source() -> str:
    lines = [EMULATION, kernels.SOURCE]
    for ctype in kernels.CTYPES.values():
        for a in sorted(set(kernels.ACTIVATION_IDS.values())):
            lines.append(f"""
extern "C" void fwd_{ctype}_{a}({ctype}* z, const {ctype}* b, {ctype}* y, long long n, int ncol, {ctype} p,
                                 {ctype} cap) {{
    gridDim = {{1, 1, 1}}; blockDim = {{1, 1, 1}}; blockIdx = {{0, 0, 0}}; threadIdx = {{0, 0, 0}};
    bias_act_fwd<{ctype}, {a}>(z, b, y, n, ncol, p, cap);
}}
extern "C" void bwd_{ctype}_{a}(const {ctype}* z, const {ctype}* y, const {ctype}* g, {ctype}* d, long long n,
                                 {ctype} p, {ctype} q) {{
    gridDim = {{1, 1, 1}}; blockDim = {{1, 1, 1}}; blockIdx = {{0, 0, 0}}; threadIdx = {{0, 0, 0}};
    act_bwd<{ctype}, {a}>(z, y, g, d, n, p, q);
}}""")
        lines.append(f"""
extern "C" void colsum_{ctype}(const {ctype}* d, {ctype}* out, int rows, int cols) {{
    blockDim = {{32, 8, 1}}; gridDim = {{(unsigned)((cols + 31) / 32), 1, 1}};
    for (unsigned bx = 0; bx < gridDim.x; ++bx)
        for (int ty = 7; ty >= 0; --ty)
            for (unsigned tx = 0; tx < 32; ++tx) {{
                blockIdx = {{bx, 0, 0}}; threadIdx = {{tx, (unsigned)ty, 0}};
                colsum<{ctype}>(d, out, rows, cols);
            }}
}}
extern "C" void sgd_{ctype}({ctype}* p, const {ctype}* g, {ctype}* v, const {ctype}* mask, long long n,
                             {ctype} lr, {ctype} mu, {ctype} lr_mu, {ctype} wd, int has_v, int nesterov,
                             int has_wd) {{
    gridDim = {{1, 1, 1}}; blockDim = {{1, 1, 1}}; blockIdx = {{0, 0, 0}}; threadIdx = {{0, 0, 0}};
    sgd_update<{ctype}>(p, g, v, mask, n, lr, mu, lr_mu, wd, has_v, nesterov, has_wd);
}}""")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ not installed")
    d = tmp_path_factory.mktemp("kernels")
    src = d / "emulated.cpp"
    src.write_text(_emulation_source())
    lib = d / "libemulated.so"
    r = subprocess.run([GXX, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", str(src), "-o", str(lib)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def _ptr(a):
    return ctypes.c_void_p(a.ctypes.data)


def _sc(dtype, v):
    return (ctypes.c_float if dtype == numpy.float32 else ctypes.c_double)(v)


ACTS = [activations.Sigmoid(), activations.Tanh(), activations.ReLU(), activations.LeakyReLU(0.01),
        activations.LeakyReLU(0.3), activations.Softplus(), activations.ELU(1.0), activations.ELU(0.4),
        activations.ELU(1.8), activations.Identity()]
# float32: host libm and NumPy's SIMD transcendental functions differ by an ulp or two
TOL = {numpy.float32: dict(rtol=4e-7, atol=1e-37), numpy.float64: dict(rtol=1e-15, atol=1e-300)}


def _z(dtype):
    g = rng(1)
    z = g.normal(size=(37, 45)) * 4
    z[0, :12] = [-1e4, -1000, -100, -30, -1e-8, 0.0, 1e-8, 30, 100, 1000, 1e4, -0.0]
    z[1, :3] = [numpy.nan, numpy.inf, -numpy.inf]
    return z.astype(dtype)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("act", ACTS, ids=repr)
def test_emulated_kernels_match_numpy_path(emulated, act, dtype):
    ctype = kernels.CTYPES[numpy.dtype(dtype).name]
    a = kernels.ACTIVATION_IDS[act.name]
    ops = XpOps(Device("cpu"))
    z0 = _z(dtype)
    b = rng(2).normal(size=45).astype(dtype)
    with numpy.errstate(all="ignore"):
        # forward: bias add in place, then f
        z_ref, y_ref = z0.copy(), numpy.empty_like(z0)
        ops.bias_activation(act, z_ref, b, y_ref, None)
        z_k, y_k = z0.copy(), numpy.empty_like(z0)
        if act.name == "identity":
            y_k = z_k
            y_ref = z_ref
        getattr(emulated, f"fwd_{ctype}_{a}")(_ptr(z_k), _ptr(b), _ptr(y_k), ctypes.c_longlong(z0.size),
                                              ctypes.c_int(45), _sc(dtype, act.param),
                                              _sc(dtype, activations._exp_cap(dtype)))
        numpy.testing.assert_array_equal(z_k, z_ref)
        numpy.testing.assert_allclose(y_k, y_ref, equal_nan=True, **TOL[dtype])
        # backward: δ = f'(z, y) · g
        g = rng(3).normal(size=z0.shape).astype(dtype)
        d_ref = numpy.empty_like(z0)
        ops.activation_backward(act, z_ref, y_ref, g, d_ref, numpy.empty_like(z0), None)
        d_k = numpy.empty_like(z0)
        getattr(emulated, f"bwd_{ctype}_{a}")(_ptr(z_ref), _ptr(y_ref), _ptr(g), _ptr(d_k),
                                              ctypes.c_longlong(z0.size), _sc(dtype, act.param),
                                              _sc(dtype, 1.0 - act.param))
        numpy.testing.assert_allclose(d_k, d_ref, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 1), (33, 5), (4096, 70), (7, 129)])
def test_emulated_colsum(emulated, dtype, shape):
    d = rng(4).normal(size=shape).astype(dtype)
    out = numpy.full(shape[1], numpy.nan, dtype)
    fn = getattr(emulated, f"colsum_{kernels.CTYPES[numpy.dtype(dtype).name]}")
    fn(_ptr(d), _ptr(out), ctypes.c_int(shape[0]), ctypes.c_int(shape[1]))
    ref = d.astype(numpy.float64).sum(axis=0)
    numpy.testing.assert_allclose(out, ref, rtol=1e-4 if dtype == numpy.float32 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.0),
                                                  (0.0, False, 1e-2), (0.5, True, 1e-3)])
def test_emulated_sgd_is_bitwise_the_numpy_update(emulated, dtype, momentum, nesterov, wd):
    g0 = rng(5)
    n = 40_000      # several of the CPU update's cache blocks
    p, grad = g0.normal(size=n).astype(dtype), g0.normal(size=n).astype(dtype)
    v = g0.normal(size=n).astype(dtype)
    mask = (g0.uniform(size=n) > 0.3).astype(dtype)
    ops = XpOps(Device("cpu"))
    p_ref, v_ref = p.copy(), v.copy()
    state = {"velocity": v_ref}
    ops.sgd_update(p_ref, grad, state, 0.037, momentum, nesterov, wd, mask)
    p_k, v_k = p.copy(), v.copy()
    getattr(emulated, f"sgd_{kernels.CTYPES[numpy.dtype(dtype).name]}")(
        _ptr(p_k), _ptr(grad), _ptr(v_k), _ptr(mask), ctypes.c_longlong(n), _sc(dtype, 0.037), _sc(dtype, momentum),
        _sc(dtype, 0.037 * momentum), _sc(dtype, wd), ctypes.c_int(bool(momentum)), ctypes.c_int(nesterov),
        ctypes.c_int(bool(wd)))
    numpy.testing.assert_array_equal(p_k, p_ref)
    if momentum:
        numpy.testing.assert_array_equal(v_k, v_ref)


def test_every_activation_but_softmax_has_a_kernel():
    assert set(kernels.ACTIVATION_IDS) == set(activations.names()) - {"softmax"}
    for name, k in kernels.ACTIVATION_IDS.items():
        assert activations.get(name).kernel_id == k


# -- on a GPU -----------------------------------------------------------------------------------------
HIDDEN = ["sigmoid", "tanh", "relu", "leaky_relu", "softplus", "elu", "identity"]
PAIRS = [("squared_error", "sigmoid"), ("squared_error", "identity"), ("binary_cross_entropy", "sigmoid"),
         ("cross_entropy", "softmax")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss,out", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_fused_matches_unfused_on_gpu(device, hidden, loss, out, dtype):
    if not device.is_cuda:
        pytest.skip("fused kernels run on CUDA devices only")
    g = rng(7)
    X = g.normal(size=(33, 11))
    Y = (g.integers(0, 3, size=33) if loss == "cross_entropy" else
         g.integers(0, 2, size=(33, 3)).astype(float) if loss == "binary_cross_entropy" else g.normal(size=(33, 3)))
    results = {}
    for fused in (True, False):
        net = gpunn.Sequential([gpunn.Dense(11, 16, hidden), gpunn.Dense(16, 9, hidden), gpunn.Dense(9, 3, out)],
                               device=device, dtype=dtype, seed=1, fused=fused)
        assert net.ops.fused is fused
        opt = gpunn.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
        rec = {"y": host(net.forward(X)), "loss": net.backward(Y, loss)}
        for i, layer in enumerate(net.layers):
            rec[f"gW{i}"], rec[f"gb{i}"] = host(layer.grad_W), host(layer.grad_b)
        net.step(opt)
        for _ in range(4):
            net.forward(X)
            net.backward(Y, loss)
            net.step(opt)
        rec["params"] = host(net.flat_parameters())
        results[fused] = rec
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for key, ref in results[False].items():
        scale = float(numpy.max(numpy.abs(ref)))
        numpy.testing.assert_allclose(results[True][key], ref, rtol=rtol, atol=rtol * scale, err_msg=key)
