"""NumPy's float32 exp transcribed for the CPU kernels (gpunn.cpuexp), against ``numpy.exp`` itself.

NumPy runs its SIMD exp (``simd_exp_FLOAT``) for float32 on x86 CPUs with AVX2 + FMA3 or AVX-512F; there
the transcription must give its bits for every input (about 23.5 million checked here, all 2³² by
``python scripts/check_exp.py --all``) and the kernels must use it. Elsewhere NumPy calls the C library's
expf: the kernels must notice and keep NumPy's exp between their calls, still bitwise equal.
"""
from __future__ import annotations

import numpy
import pytest

import gpunn
from gpunn import activations, cpukernels, ops
from helpers import rng

pytestmark = pytest.mark.skipif(not cpukernels.available(),
                                reason=f"fused CPU kernels: {cpukernels.unavailable_reason()}")


def numpy_runs_simd_exp() -> bool:
    """Whether this NumPy build dispatches float32 exp to its AVX2+FMA3 or AVX-512F loop on this CPU (the
    transcribed algorithm), read from NumPy's own CPU-feature and dispatch tables."""
    try:
        from numpy._core import _multiarray_umath as umath  # NumPy 2
    except ImportError:                                         # NumPy 1.26
        from numpy.core import _multiarray_umath as umath
    built = set(umath.__cpu_baseline__) | set(umath.__cpu_dispatch__)
    has = {k for k, v in umath.__cpu_features__.items() if v}
    avx2 = {"AVX2", "FMA3"} <= has and bool(built & {"AVX2", "FMA3", "X86_V3", "X86_V4", "AVX512F", "AVX512_SKX"})
    avx512 = "AVX512F" in has and bool(built & {"AVX512F", "X86_V4", "AVX512_SKX"})
    return avx2 or avx512


SIMD = numpy_runs_simd_exp()
needs_simd = pytest.mark.skipif(not SIMD, reason="this NumPy runs the C library's expf here, not its SIMD exp")


def bits(a):
    return numpy.ascontiguousarray(a).view(numpy.uint32)


def inputs():
    """Chunks of float32 inputs: random bit patterns; every bit pattern from −88 down to −105 (the subnormal
    results and the underflow edge), from 88 to 89 (the overflow edge) and from −85 to −88 (where blocks
    stop taking the exp's plain stages: gpunn.cpuexp.PLAIN_LOW); a stride of 257 through all 2³²."""
    f = numpy.float32
    yield rng(7).integers(0, 1 << 32, size=4_000_000, dtype=numpy.uint64).astype(numpy.uint32)
    yield numpy.arange(bits(f(-88.0)).item(), bits(f(-105.0)).item(), dtype=numpy.uint32)
    yield numpy.arange(bits(f(88.0)).item(), bits(f(89.0)).item(), dtype=numpy.uint32)
    yield numpy.arange(bits(f(-85.0)).item(), bits(f(-88.0)).item(), dtype=numpy.uint32)     # PLAIN_LOW's edge
    for start in range(0, 1 << 32, 1 << 30):
        yield numpy.arange(start, start + (1 << 30), 257, dtype=numpy.uint64).astype(numpy.uint32)


@needs_simd
def test_the_transcription_gives_numpys_bits():
    from gpunn import cpuexp
    checked = 0
    for chunk in inputs():
        x = chunk.view(numpy.float32)
        with numpy.errstate(all="ignore"):
            ref = numpy.exp(x)
        got = numpy.empty_like(x)
        cpuexp.exp_f32_array(x, got)
        wrong = numpy.flatnonzero(bits(ref) != bits(got))
        assert wrong.size == 0, [(hex(bits(x)[i]), ref[i], got[i]) for i in wrong[:5]]
        checked += x.size
    assert checked == 23_464_448


@needs_simd
def test_the_probe_passes_and_the_kernels_run_the_exp_inside():
    from numba.core.caching import FunctionCache

    from gpunn import cpuexp
    assert cpuexp.matches_numpy()
    k = cpukernels.CpuKernels()
    assert k.k.exp_inside and k.k.exp_inside_reason is None
    assert all(isinstance(f._cache, FunctionCache) for f in (k.k.bias_sigmoid, k.k.softmax_pre_exp))
    z, b = numpy.zeros((2, 3), numpy.float32), numpy.zeros(3, numpy.float32)
    sig = activations.get("sigmoid")
    assert len(k.forward(sig, "float32")(z, b, z.copy(), None)) == 1            # one pass, exp inside
    assert len(k.forward(sig, "float64")(z.astype("f8"), b.astype("f8"), z.astype("f8"), None)) == 3


def test_the_probe_notices_an_exp_that_differs_in_one_bit(monkeypatch):
    from gpunn import cpuexp
    numpy_exp = numpy.exp
    monkeypatch.setattr(numpy, "exp", lambda x: numpy.nextafter(numpy_exp(x), numpy.float32(numpy.inf)))
    assert not cpuexp.matches_numpy()
    loaded = cpukernels._exp_kernels()                  # what the kernels' loading decides from it
    assert loaded["exp_inside"] is False and "differs" in loaded["exp_inside_reason"]
    edges = cpuexp.probe()
    assert edges.dtype == numpy.float32 and numpy.isnan(edges).any() and (bits(edges) > 0x80000000).any()


@pytest.mark.parametrize("act", ["sigmoid", "softmax"])
@pytest.mark.parametrize("inside", [True, False], ids=["exp-inside", "numpy-exp-between"])
def test_either_way_the_kernels_equal_the_numpy_path(act, inside, monkeypatch):
    """With the exp inside the kernel and with NumPy's exp between two kernels (where the probe fails),
    bias + f on edge values (NaN, ±inf, signed zeros, overflow candidates) and after training steps."""
    if inside and not SIMD:
        pytest.skip("this NumPy runs the C library's expf here")
    k = cpukernels.CpuKernels().k
    monkeypatch.setattr(k, "exp_inside", inside)
    a = activations.get(act)
    special = [0.0, -0.0, 1e-30, -1e-30, 80.0, -80.0, 88.5, -88.5, 104.0, -104.0, 700.0, -700.0,
               numpy.inf, -numpy.inf, numpy.nan, -numpy.nan]
    z0 = numpy.concatenate([special, rng(3).normal(size=48) * 30]).astype(numpy.float32).reshape(-1, 8)
    b = (rng(4).normal(size=8) * 3).astype(numpy.float32)
    out = []
    with numpy.errstate(all="ignore"):
        for o in (ops.XpOps(gpunn.Device("cpu")), ops.CpuFusedOps(gpunn.Device("cpu"))):
            z, y = z0.copy(), numpy.empty_like(z0)
            rowstats = numpy.empty((2, z.shape[0]), numpy.float32) if a.rowwise else None
            o.bias_activation(a, z, b, y, rowstats)
            out.append([z, y] + ([rowstats] if a.rowwise else []))
    for ref, got in zip(*out):
        assert numpy.array_equal(bits(ref), bits(got))
    nets = [gpunn.mlp([6, 9, 4], activation="sigmoid", output=act, seed=2, fused=f, device="cpu")
            for f in (False, True)]
    nets[1].ops.warm_up()                   # the kernels from the first step, not after LAZY_SECONDS
    x = (rng(5).normal(size=(33, 6)) * 4).astype(numpy.float32)
    t = numpy.eye(4, dtype=numpy.float32)[rng(6).integers(0, 4, 33)]
    loss = "cross_entropy" if act == "softmax" else "squared_error"
    values = [[float(n.train_step(x, t, loss, gpunn.SGD(lr=0.5))) for _ in range(5)] for n in nets]
    assert values[0] == values[1]
    assert numpy.array_equal(bits(nets[0].flat_parameters()), bits(nets[1].flat_parameters()))


NO_CACHE_FOLDER = """
import numba.core.caching as caching
caching.CacheImpl._locator_classes = []         # numba finds no folder to write its cache in
import numpy, gpunn
from gpunn import cpukernels, threads
threads.set_threads(1)
assert cpukernels.available(), cpukernels.unavailable_reason()
print("exp inside:", cpukernels.exp_inside()[0])
nets = [gpunn.mlp([3, 5, 2], activation="sigmoid", output="sigmoid", seed=0, fused=f, device="cpu")
        for f in (False, True)]
nets[1].ops.warm_up()
assert nets[1].fused and nets[1].ops.kernels is not None
x = numpy.linspace(-40, 40, 21, dtype=numpy.float32).reshape(7, 3)
t = numpy.linspace(0, 1, 14, dtype=numpy.float32).reshape(7, 2)
values = [[float(n.train_step(x * 3, t, "squared_error", o)) for _ in range(3)]
          for n, o in zip(nets, (gpunn.SGD(lr=0.5), gpunn.SGD(lr=0.5)))]
assert values[0] == values[1], values
assert nets[0].flat_parameters().tobytes() == nets[1].flat_parameters().tobytes()
print("same bits")
"""


def test_the_kernels_run_where_numba_has_nowhere_to_write_its_cache():
    """A read-only install used without a writable home: numba refuses ``cache=True`` at once ("cannot cache
    function ...: no locator available"). The kernels must still load (compiled in the process, the float32
    exp inside where it matches) and equal the NumPy path, not fail the step that loads them."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", NO_CACHE_FOLDER], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"exp inside: {SIMD}" in run.stdout and "same bits" in run.stdout


def test_every_kernel_that_inlines_the_exp_is_in_its_file():
    """numba keys a function's on-disk cache on its own source file's time stamp and size: code inlined from
    another file (``exp_row`` and its stages, ``inline="always"``, and the LLVM intrinsics) would stay in that
    cache after the other file changed. Every kernel running the exp is therefore in cpuexp.py, where an edit to the
    exp recompiles it (tried: ``return poly`` edited, bias_sigmoid's next load missed the cache and gave the
    edited values)."""
    import inspect

    from gpunn import cpuexp
    home = inspect.getfile(cpuexp.exp_f32_array.py_func)
    inlined = {"exp_row", "plain", "_reduce", "_reduce_plain", "_rational", "_scale", "_scale_plain",
               "_fma", "_bits", "_from_bits"}
    users = set()
    for name, kernel in vars(cpukernels.CpuKernels().k).items():
        fn = getattr(kernel, "py_func", None)
        names = set() if fn is None else inlined & set(fn.__code__.co_names)
        if any(fn.__globals__.get(n) is getattr(cpuexp, n) for n in names):
            users.add(name)
            assert inspect.getfile(fn) == home, f"{name} inlines cpuexp's exp from another file"
    assert users >= {"bias_sigmoid", "softmax_pre_exp"}


@pytest.mark.parametrize("cols", [1, 9, 511, 512, 513, 1031])
def test_the_sigmoid_kernel_is_bitwise_numpys_across_exp_blocks(cols):
    """The exp runs block by block of a row (gpunn.cpuexp.BLOCK values, one loop per stage, the special
    branches left out of a block with none of them): rows shorter than a block, exactly one, one more, and
    several with a ragged end give the bits of NumPy's own 1 / (1 + e^min(−z, cap)), written out here, for
    rows of every kind: edge values (NaN, ±inf, overflow, underflow to 0) at several positions, values
    needing no special branch, values straddling where that stops (e^−86), subnormal results."""
    from gpunn import cpuexp
    f = numpy.float32
    edges = numpy.array([0.0, -0.0, 1.0, -1.0, 87.5, 90.0, 103.9, 104.0, 200.0, -88.8, -200.0, numpy.inf,
                         -numpy.inf, numpy.nan], f)
    mixed = numpy.concatenate([edges, (rng(11).normal(size=cols) * 40).astype(f)])[:cols]
    z0 = numpy.stack([numpy.roll(mixed, 5 % cols), rng(12).uniform(-80.0, 85.9, size=cols),
                      rng(13).uniform(85.5, 86.5, size=cols), rng(14).uniform(86.0, 105.0, size=cols)]).astype(f)
    b = (rng(15).normal(size=cols) * 0.01).astype(f)
    cap = f(activations.exp_cap(f))
    with numpy.errstate(all="ignore"):
        zb = z0 + b
        want = f(1.0) / (numpy.exp(numpy.minimum(-zb, cap)) + f(1.0))
        z, y = z0.copy(), numpy.empty_like(z0)
        ops.CpuFusedOps(gpunn.Device("cpu")).bias_activation(activations.get("sigmoid"), z, b, y, None)
    assert numpy.array_equal(bits(z), bits(zb))
    wrong = numpy.flatnonzero(bits(y) != bits(want))
    assert wrong.size == 0, [(z0.ravel()[i], y.ravel()[i], want.ravel()[i]) for i in wrong[:5]]
    assert cpuexp.BLOCK == 512          # the widths above straddle it
    assert cpukernels.exp_inside()[0] == SIMD     # the kernel above ran the transcription where it can


@pytest.mark.parametrize("cols", [1, 3, 10, 128, 600])
def test_the_softmax_exp_kernel_is_numpys_block_by_block(cols):
    """softmax_pre_exp runs the exp a block of a row at a time, into a contiguous y or a strided one: NumPy's
    own e^(z + b − max of the row), written out here, for rows shorter and longer than a block, with rows
    needing the exp's special branches (differences below −86, NaN, ±inf) among rows that need none."""
    from gpunn import cpuexp
    f = numpy.float32
    z0 = (rng(21).normal(size=(203, cols)) * numpy.where(numpy.arange(203) % 7 == 0, 60.0, 3.0)[:, None]).astype(f)
    z0[5, 0], z0[9, -1], z0[11, 0] = numpy.nan, numpy.inf, -numpy.inf
    b = rng(22).normal(size=cols).astype(f)
    with numpy.errstate(all="ignore"):
        zb = z0 + b
        m = numpy.array([numpy.nan if numpy.isnan(r).any() else r.max() for r in zb], f)
        want = numpy.exp(zb - m[:, None])
    scratch = numpy.empty((2, cpuexp.BLOCK), f)
    for y in (numpy.empty_like(z0), numpy.empty((203, 2 * cols), f)[:, ::2]):
        z, stats = z0.copy(), numpy.empty((2, 203), f)
        with numpy.errstate(all="ignore"):
            cpuexp.softmax_pre_exp(z, b, y, stats, scratch)
        assert numpy.array_equal(bits(z), bits(zb)) and numpy.array_equal(bits(stats[0]), bits(m))
        if SIMD:
            wrong = numpy.flatnonzero(bits(y) != bits(want))
            assert wrong.size == 0, [(zb.ravel()[i], y.ravel()[i], want.ravel()[i]) for i in wrong[:5]]
