"""The fused CUDA kernels, checked without a GPU where possible.

1. ``nvcc`` compiles every kernel for sm_90 and sm_80 without register spills (catches syntax and type
   errors on CPU CI), and, where cuobjdump is installed, the column sum's SASS orders its memory accesses.
2. The same source, compiled as plain C++ with a tiny CUDA emulation (tests/emulation.py: the launch
   walks the whole grid, thread by thread, after checking every argument against the kernel's
   signature), must compute what the NumPy path computes: this checks indexing, formulas and
   operation order of every kernel. The whole fused network path runs on that emulation in the
   ``fakecupy`` backend of every device-parametrised test (tests/conftest.py).
3. On a GPU: fused against unfused results for every activation and loss.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy
import pytest

import emulation
import gpunn
from gpunn import activations, kernels, optim
from gpunn.backend import Device
from gpunn.ops import XpOps
from helpers import host, rng

NVCC = shutil.which("nvcc")


def _cuda_tool(name: str) -> str | None:
    """A CUDA binary tool: on PATH, beside nvcc, or from NVIDIA's pip wheel (nvidia-cuda-cuobjdump and
    nvidia-cuda-nvdisasm put them under nvidia/cu13/bin)."""
    import sysconfig
    from pathlib import Path
    dirs = [Path(NVCC).resolve().parent] if NVCC else []
    dirs += [Path(sysconfig.get_paths()["purelib"]) / "nvidia" / cu / "bin" for cu in ("cu13", "cu12")]
    found = shutil.which(name) or next((str(d / name) for d in dirs if (d / name).is_file()), None)
    return found


def _nvcc(tmp_path, arch: str, *extra: str) -> subprocess.CompletedProcess:
    src = tmp_path / "gpunn_kernels.cu"
    src.write_text(kernels.instantiation_source())
    return subprocess.run([NVCC, f"-arch={arch}", "--std=c++17", *kernels.OPTIONS, "-ftz=true", *extra, str(src)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_every_kernel_compiles_without_spills(tmp_path, arch):
    """Every exported instance compiles for Hopper and Ampere, and ptxas reports no register spills."""
    r = _nvcc(tmp_path, arch, "-c", "-o", "k.o", "-Xptxas", "-v")
    assert r.returncode == 0, r.stderr[-3000:]
    compiled = re.findall(r"Compiling entry function '(\w+)'", r.stderr)
    assert len(compiled) == len(kernels.name_expressions()), compiled
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    assert len(spills) == len(compiled) and all(a == b == "0" for a, b in spills), r.stderr[-3000:]


def _sass_function(sass: str, mangled: str) -> list[str]:
    """The instruction lines of one function in ``cuobjdump -sass`` output."""
    body = sass.split(f"Function : {mangled}", 1)[1].split("Function : ", 1)[0]
    return [line.split("*/", 1)[1].split(";")[0].strip() for line in body.splitlines()
            if re.match(r"\s*/\*[0-9a-f]{4}\*/", line)]


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("ctype,mangled", [("float", "_Z6colsumIfEvPKT_PS0_S3_Piiii"),
                                           ("double", "_Z6colsumIdEvPKT_PS0_S3_Piiii")])
def test_colsum_orders_its_ticket_before_the_partials_in_sass(tmp_path, ctype, mangled):
    """What the card executes (sm_90 SASS): the writing warp's fence (MEMBAR) before the ticket ATOMG,
    another MEMBAR after it, and only strong (L2-coherent) loads of the other blocks' partials after it,
    never a weak LDG.E that a stale L1 line could serve."""
    cuobjdump, nvdisasm = _cuda_tool("cuobjdump"), _cuda_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        pytest.skip("cuobjdump/nvdisasm not installed (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    r = _nvcc(tmp_path, "sm_90", "-cubin", "-o", "k.cubin")
    assert r.returncode == 0, r.stderr[-3000:]
    import os
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    d = subprocess.run([cuobjdump, "-sass", str(tmp_path / "k.cubin")], capture_output=True, text=True, timeout=120,
                       env=env)
    assert d.returncode == 0, d.stderr[-2000:]
    code = _sass_function(d.stdout, mangled)
    (atom,) = [i for i, op in enumerate(code) if op.startswith("ATOMG")]
    assert any(op.startswith("MEMBAR") for op in code[:atom]), "no release fence before the ticket"
    loads = [i for i, op in enumerate(code) if op.startswith("LDG") and i > atom]
    assert loads, "no loads of the partials after the ticket"
    assert any(op.startswith("MEMBAR") for op in code[atom:loads[0]]), "no acquire fence between ticket and loads"
    weak = [code[i] for i in loads if ".STRONG.GPU" not in code[i] and ".STRONG.SYS" not in code[i]]
    assert not weak, weak


def test_kernels_compile_with_cupys_nvrtc(monkeypatch):
    """CuPy's own NVRTC route, with the options it adds for a RawModule (``-ftz=true``, default execution
    space), accepts the source and maps every name expression to a kernel. Runs wherever CuPy and NVRTC
    are installed, GPU or not (the target is fixed to sm_90 so no device is asked)."""
    pytest.importorskip("cupy", reason="CuPy not installed")
    from cupy.cuda import compiler
    if not all(hasattr(compiler, f) for f in ("_get_arch_for_options_for_nvrtc", "_compile_using_nvrtc_no_warning",
                                               "_get_nvrtc_version")):
        pytest.skip(f"this CuPy ({compiler.__name__}) has another internal compile route")
    try:
        compiler._get_nvrtc_version()
    except Exception as exc:
        pytest.skip(f"NVRTC cannot be loaded: {exc}")
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: ("-arch=sm_90", "cubin"))
    cubin, mapping = compiler._compile_using_nvrtc_no_warning(
        kernels.SOURCE, options=kernels.OPTIONS + ("-ftz=true",), arch="90",
        name_expressions=kernels.name_expressions())
    assert len(cubin) > 1000
    assert set(mapping) == set(kernels.name_expressions())


def test_cupy_signatures_take_the_out_arguments_gpunn_passes():
    """Where CuPy is installed (GPU or not): the routines gpunn calls with ``out=`` accept it, and
    RawModule takes gpunn's options and name expressions."""
    import inspect
    cupy = pytest.importorskip("cupy", reason="CuPy not installed")
    for name in ("take", "argmax", "sum", "max", "matmul"):
        assert "out" in inspect.signature(getattr(cupy, name)).parameters, name
    # what the streamed batches (backend.HostToDevice) and gpu_check's blocker use
    for name in ("alloc_pinned_memory", "Stream", "get_current_stream", "Event"):
        assert hasattr(cupy.cuda, name), name
    assert all(hasattr(cupy.cuda.Stream, m) for m in ("record", "wait_event")) and cupy.cuda.Stream.null.ptr == 0
    assert hasattr(cupy.cuda.runtime, "getDeviceProperties")    # the SM count sizes the column sum's grid
    assert all(hasattr(cupy.cuda.Event, m) for m in ("done", "synchronize"))
    assert hasattr(cupy.ndarray, "set") and hasattr(cupy, "RawKernel")
    mod = cupy.RawModule(code=kernels.SOURCE, options=kernels.OPTIONS, name_expressions=kernels.name_expressions())
    assert mod.options == kernels.OPTIONS and len(mod.name_expressions) == len(kernels.name_expressions())


@pytest.fixture(scope="module")
def emulated():
    if emulation.GXX is None:
        pytest.skip("g++ not installed")
    return emulation.library()


def _launch(expr, n, *args):
    """A grid-stride kernel launched as gpunn.kernels.FusedOps launches it."""
    emulation.launch(expr, kernels._grid(n), (kernels.BLOCK,), args)


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
        _launch(f"bias_act_fwd<{ctype}, {a}>", z0.size, z_k, b, y_k, numpy.int32(z0.size), numpy.int32(45),
                dtype(act.param), dtype(activations.exp_cap(dtype)))
        numpy.testing.assert_array_equal(z_k, z_ref)
        numpy.testing.assert_allclose(y_k, y_ref, equal_nan=True, **TOL[dtype])
        # backward: δ = f'(z, y) · g
        g = rng(3).normal(size=z0.shape).astype(dtype)
        d_ref = numpy.empty_like(z0)
        ops.activation_backward(act, z_ref, y_ref, g, d_ref, numpy.empty_like(z0), None)
        d_k = numpy.empty_like(z0)
        _launch(f"act_bwd<{ctype}, {a}>", z0.size, z_ref, y_ref, g, d_k, numpy.int64(z0.size), dtype(act.param),
                dtype(1.0 - act.param))
        numpy.testing.assert_allclose(d_k, d_ref, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,chunk", [((1, 1), 1), ((33, 5), 64), ((4096, 70), 100), ((7, 129), 2),
                                         ((2048, 512), 121)])
def test_emulated_colsum(emulated, dtype, shape, chunk):
    """The 2-D grid column sum: several row chunks per column tile, combined by the tile's last block;
    launched twice, so the ticket counters must have been left at zero."""
    d = rng(4).normal(size=shape).astype(dtype)
    tiles, chunks = (shape[1] + 31) // 32, -(-shape[0] // chunk)
    part, count = numpy.full((chunks, shape[1]), numpy.nan, dtype), numpy.zeros(tiles, numpy.int32)
    ref = d.astype(numpy.float64).sum(axis=0)
    for _ in range(2):
        out = numpy.full(shape[1], numpy.nan, dtype)
        emulation.launch(f"colsum<{kernels.CTYPES[numpy.dtype(dtype).name]}>", (tiles, chunks), (32, 8),
                         (d, out, part, count, numpy.int32(shape[0]), numpy.int32(shape[1]), numpy.int32(chunk)))
        numpy.testing.assert_allclose(out, ref, rtol=1e-4 if dtype == numpy.float32 else 1e-12, atol=1e-5)
        assert not count.any()


#: Shapes whose tile boundaries fall inside a 32-byte sector (cols % 8 != 0) and that take several row chunks
MULTI_CHUNK = [(4099, 100), (2048, 300), (65, 33), (3, 1000)]


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", MULTI_CHUNK, ids=str)
def test_emulated_colsum_as_launched_on_an_h100(emulated, dtype, shape):
    """The grid FusedKernels plans for 132 SMs: several chunks per tile where the rows allow it; three
    launches bitwise equal, equal to a float64 sum, the counters back at zero."""
    rows, cols = shape
    tiles, chunks, chunk = kernels.colsum_plan(rows, cols, kernels.COLSUM_BLOCKS)
    assert tiles * chunks >= min(kernels.COLSUM_BLOCKS, tiles * -(-rows // 64)) and (chunks > 1) == (rows > 64)
    d = rng(4).normal(size=shape).astype(dtype)
    part, count = numpy.full((chunks, cols), numpy.nan, dtype), numpy.zeros(tiles, numpy.int32)
    outs = numpy.full((3, cols), numpy.nan, dtype)
    for out in outs:
        emulation.launch(f"colsum<{kernels.CTYPES[numpy.dtype(dtype).name]}>", (tiles, chunks), (32, 8),
                         (d, out, part, count, numpy.int32(rows), numpy.int32(cols), numpy.int32(chunk)))
        assert not count.any()
    assert (outs == outs[0]).all()
    eps = numpy.finfo(dtype).eps
    numpy.testing.assert_allclose(outs[0], d.astype(numpy.float64).sum(axis=0), rtol=0,
                                  atol=float(4 * eps * numpy.sqrt(rows) * numpy.abs(d).sum(axis=0).max()))


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.0),
                                                  (0.0, False, 1e-2), (0.5, True, 1e-3)])
def test_emulated_sgd_is_bitwise_the_numpy_update(emulated, dtype, momentum, nesterov, wd):
    g0 = rng(5)
    n = 40_000      # several of the CPU update's cache blocks
    p = g0.normal(size=n).astype(dtype)
    grads = [g0.normal(size=n).astype(dtype) for _ in range(2)]
    mask = (g0.uniform(size=n) > 0.3).astype(dtype)
    opt = optim.SGD(lr=0.037, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    p_ref = p.copy()
    p_k, v_k = p.copy(), numpy.zeros_like(p)
    for grad in grads:          # two steps, so the second starts from a non-zero velocity
        opt.update(p_ref, grad, mask, XpOps(Device("cpu")))
        _launch(f"sgd_update<{kernels.CTYPES[numpy.dtype(dtype).name]}>", n, p_k, grad, v_k, mask,
                numpy.int64(n), dtype(0.037), dtype(momentum), dtype(0.037 * momentum), dtype(wd),
                numpy.int32(bool(momentum)), numpy.int32(nesterov), numpy.int32(bool(wd)))
        numpy.testing.assert_array_equal(p_k, p_ref)
        if momentum:
            numpy.testing.assert_array_equal(v_k, opt.state["velocity"])


def test_the_source_uses_no_host_header_macro():
    """nvcc includes the CUDA runtime headers (and math.h's INFINITY, NAN, ...), NVRTC, CuPy's compiler,
    does not: a macro from them compiles in the nvcc test and fails on the card. (Checked with NVRTC 13.5:
    ``-T(INFINITY)`` in softmax_fwd does not compile there.)"""
    code = re.sub(r"//[^\n]*", "", kernels.SOURCE)
    assert not re.findall(r"\b(INFINITY|NAN|HUGE_VALF?|M_PI\w*|FLT_\w+|DBL_\w+|INT_MAX)\b", code)


def test_every_activation_but_softmax_has_a_kernel():
    assert set(kernels.ACTIVATION_IDS) == set(activations.names()) - {"softmax"}
    assert len(set(kernels.ACTIVATION_IDS.values())) == len(kernels.ACTIVATION_IDS)    # one number each


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


# -- the launch checker itself (what a real GPU would not report) -----------------------------------------
def test_signatures_are_parsed_from_the_source():
    sigs = emulation.signatures()
    assert set(sigs) == {"bias_act_fwd", "act_bwd", "colsum", "sgd_update", "softmax_fwd", "xent_bwd", "sum_scaled"}
    _, targs, params = emulation.instance("act_bwd<double, 5>")
    assert targs == ["double", "5"]
    assert params[0] == ("double", "z", True) and params[4] == ("long long", "n", False)
    assert params[-1] == ("double", "q", False)


@pytest.mark.parametrize("bad,match", [
    (dict(n=3), "n is long long in the kernel, so it must be passed as numpy.int64; got int"),
    (dict(n=numpy.int32(3)), "must be passed as numpy.int64; got int32"),
    (dict(p=numpy.float64(0.5)), "p is float in the kernel"),
    (dict(d=numpy.zeros(3, numpy.float64)), "argument d must be a C-contiguous float array; got float64"),
    (dict(d=numpy.zeros(6, numpy.float32)[::2]), "c_contiguous=False"),
    (dict(d=[0.0, 0.0, 0.0]), "argument d must be a device array; got list"),
])
def test_launch_checker_rejects_what_a_gpu_would_misread(emulated, bad, match):
    a = {k: numpy.ones(3, numpy.float32) for k in "zygd"}
    a.update(n=numpy.int64(3), p=numpy.float32(0.5), q=numpy.float32(0.5))
    a.update(bad)
    args = tuple(a[k] for k in ("z", "y", "g", "d", "n", "p", "q"))
    with pytest.raises(TypeError, match=match):
        emulation.launch("act_bwd<float, 1>", (1,), (256,), args)


def test_launch_checker_rejects_bad_launches(emulated):
    args = (numpy.zeros((2, 2), numpy.float32), numpy.zeros(2, numpy.float32), numpy.zeros((1, 2), numpy.float32),
            numpy.zeros(1, numpy.int32), numpy.int32(2), numpy.int32(2), numpy.int32(2))
    with pytest.raises(ValueError, match="more than 1024 threads"):
        emulation.launch("colsum<float>", (1,), (64, 32), args)
    with pytest.raises(TypeError, match="takes 7 arguments"):
        emulation.launch("colsum<float>", (1,), (32, 8), args[:3])
    with pytest.raises(KeyError, match="no kernel"):
        emulation.launch("colsum<half>x", (1,), (32, 8), args)
    f = numpy.zeros((2, 2), numpy.float32)
    with pytest.raises(ValueError, match="not whole warps"):     # a shuffle needs all 32 lanes of each warp
        emulation.launch("softmax_fwd<float>", (1,), (16, 3), (f, f[0].copy(), f.copy(), f.copy(), numpy.int32(2),
                                                               numpy.int32(2)))
    # block (8, 4) puts 4 rows in one warp: with 3 rows, the fourth row's lanes skip the shuffles
    z = numpy.zeros((3, 2), numpy.float32)
    with pytest.raises(RuntimeError, match="did not all take the same shuffles"):
        emulation.launch("softmax_fwd<float>", (1,), (8, 4), (z, z[0].copy(), z.copy(), z.copy(), numpy.int32(3),
                                                              numpy.int32(2)))
    y = numpy.empty_like(z)                                   # and the next launch runs on fresh lanes
    emulation.launch("softmax_fwd<float>", (1,), (32, 4), (z, z[0].copy(), y, z.copy(), numpy.int32(3), numpy.int32(2)))
    assert (y == 0.5).all()


def test_too_small_a_colsum_grid_leaves_columns_unwritten(emulated):
    """The emulation runs exactly the grid it is given, so a launch bug shows up in the results."""
    d = numpy.ones((5, 70), numpy.float32)
    out = numpy.full(70, numpy.nan, numpy.float32)
    part, count = numpy.zeros((1, 70), numpy.float32), numpy.zeros(3, numpy.int32)
    emulation.launch("colsum<float>", (2, 1), (32, 8),
                     (d, out, part, count, numpy.int32(5), numpy.int32(70), numpy.int32(5)))
    assert (out[:64] == 5).all() and numpy.isnan(out[64:]).all()


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rows,cols", [(1, 2), (37, 10), (300, 3), (5, 33), (9, 100), (3, 1000), (6, 1024)])
def test_emulated_softmax_and_cross_entropy_match_their_formulas(emulated, dtype, rows, cols):
    """softmax_fwd, xent_bwd and sum_scaled against formulas written here (float64 references)."""
    g = rng(9)
    z0 = (g.normal(size=(rows, cols)) * 5).astype(dtype)
    z0[0, 0] = 80 if rows > 1 else z0[0, 0]                      # large logits: the max shift must hold
    b = g.normal(size=cols).astype(dtype)
    t = numpy.eye(cols, dtype=dtype)[g.integers(0, cols, rows)]
    ct = kernels.CTYPES[numpy.dtype(dtype).name]
    z, y, col = z0.copy(), numpy.empty_like(z0), numpy.empty((2, rows), dtype)
    warps = kernels._row_grid(rows), (32, kernels.SOFTMAX_ROWS)        # as FusedKernels launches them
    emulation.launch(f"softmax_fwd<{ct}>", *warps, (z, b, y, col, numpy.int32(rows), numpy.int32(cols)))
    zr = z0.astype(numpy.float64) + b
    p = numpy.exp(zr - zr.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    lse = numpy.log(numpy.exp(zr - zr.max(axis=1, keepdims=True)).sum(axis=1)) + zr.max(axis=1)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == numpy.float32 else dict(rtol=1e-13, atol=1e-15)
    numpy.testing.assert_allclose(z, zr, **tol)
    numpy.testing.assert_allclose(y, p, **tol)
    numpy.testing.assert_allclose(col[0], lse, **tol)
    delta, rowloss, out = numpy.empty_like(z0), numpy.empty(rows, dtype), numpy.full(1, numpy.nan, dtype)
    emulation.launch(f"xent_bwd<{ct}>", *warps,
                     (z, y, col, t, delta, rowloss, numpy.int32(rows), numpy.int32(cols), dtype(1.0 / rows)))
    emulation.launch(f"sum_scaled<{ct}>", (1,), (1, 256), (rowloss, out, numpy.int32(rows), dtype(1.0 / rows)))
    numpy.testing.assert_allclose(delta, (p - t) / rows, **tol)
    numpy.testing.assert_allclose(out[0], -numpy.mean(numpy.log(p[t.astype(bool)])), **tol)
