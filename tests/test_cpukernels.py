"""The fused CPU kernels (numba) against the NumPy reference path, bit for bit.

Every activation, loss, optimiser setting and dtype, at batch sizes 1, a non-multiple of 8 and of the
kernels' loops, and a few hundred rows: two networks from the same seed, one on :class:`XpOps` and one on
:class:`CpuFusedOps`, must hold identical bits after several training steps (weights, every layer's z,
y and δ, the loss). Without numba these tests skip with the reason; the NumPy path is tested everywhere.
"""
from __future__ import annotations

from functools import partial

import numpy
import pytest

import gpunn
from gpunn import cpukernels, ops
from helpers import rng

pytestmark = pytest.mark.skipif(not cpukernels.available(),
                                reason=f"fused CPU kernels: {cpukernels.unavailable_reason()}")

DTYPES = ["float32", "float64"]


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """The two networks of a comparison alternate steps: the BLAS threads must not change between them
    (OpenBLAS's GEMM gives other last bits on other thread counts, and the auto policy follows the load)."""
    from gpunn import threads
    threads.set_threads(1)
    yield
    threads.set_threads(None)
BATCHES = [1, 5, 37, 300]
HIDDEN = ["sigmoid", "tanh", "relu", {"name": "leaky_relu", "alpha": 0.1}, "softplus", "elu",
          {"name": "elu", "a": 0.5}, {"name": "elu", "a": 1.7}, "identity"]
OUTPUTS = [("sigmoid", "squared_error"), ("identity", "squared_error"), ("tanh", "squared_error"),
           ("sigmoid", "binary_cross_entropy"), ("softmax", "cross_entropy"), ("softmax", "squared_error"),
           ("relu", "squared_error"), ("elu", "squared_error")]
OPTIMISERS = [dict(), dict(momentum=0.9), dict(momentum=0.8, nesterov=True), dict(weight_decay=0.01),
              dict(momentum=0.9, weight_decay=1e-3), dict(momentum=0.5, nesterov=True, weight_decay=0.1)]


def bits(a) -> numpy.ndarray:
    a = numpy.ascontiguousarray(a)
    return a.view(f"u{a.itemsize}")


def same_bits(a, b) -> bool:
    """Bit for bit, but for the sign of a value NaN in both: where two NaNs of opposite sign meet in one
    operation, a kernel may keep the other one's sign than NumPy (README; test_nan_of_both_signs...). Every
    finite value, infinity, signed zero, NaN payload and the places of the NaNs are compared exactly."""
    a, b = numpy.asarray(a), numpy.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ab, bb = bits(a), bits(b)
    if a.dtype.kind == "f":
        both = (numpy.isnan(a) & numpy.isnan(b)).reshape(ab.shape)
        sign = ab.dtype.type(1 << (8 * a.itemsize - 1))
        ab, bb = numpy.where(both, ab | sign, ab), numpy.where(both, bb | sign, bb)
    return numpy.array_equal(ab, bb)


def pair(sizes, hidden, output, dtype, seed=3):
    nets = [gpunn.mlp(sizes, activation=hidden, output=output, dtype=dtype, seed=seed, fused=f,
                      device="cpu") for f in (False, True)]
    assert type(nets[0].ops) is ops.XpOps and type(nets[1].ops) is ops.CpuFusedOps
    return nets


def data(batch, n_in, n_out, loss, dtype, seed=0):
    g = rng(seed)
    x = (g.normal(size=(batch, n_in)) * 2).astype(dtype)
    if loss == "cross_entropy":
        t = numpy.eye(n_out, dtype=dtype)[g.integers(0, n_out, size=batch)]
    else:
        t = g.uniform(size=(batch, n_out)).astype(dtype)
    return x, t


def assert_steps_agree(nets, x, t, loss, make_opt, steps=3):
    opts = [make_opt() for _ in nets]
    for step in range(steps):
        values = [net.train_step(x, t, loss, opt) for net, opt in zip(nets, opts)]
        assert same_bits(values[0], values[1]), f"loss differs at step {step}: {values}"
        for k, (a, b) in enumerate(zip(nets[0].layers, nets[1].layers)):
            for name in ("z", "y", "delta", "grad_W", "grad_b"):
                assert same_bits(getattr(a, name), getattr(b, name)), f"layer {k} {name} differs at step {step}"
        assert same_bits(nets[0].flat_parameters(), nets[1].flat_parameters()), f"weights differ at step {step}"
    for a, b in zip(opts[0].state.values(), opts[1].state.values()):
        assert same_bits(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
def test_every_hidden_activation_is_bitwise_equal_to_numpy(hidden, batch, dtype):
    nets = pair([6, 9, 17, 3], hidden, "sigmoid", dtype)
    x, t = data(batch, 6, 3, "squared_error", dtype)
    assert_steps_agree(nets, x, t, "squared_error", lambda: gpunn.SGD(lr=0.3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("output,loss", OUTPUTS)
def test_every_output_and_loss_is_bitwise_equal_to_numpy(output, loss, batch, dtype):
    nets = pair([5, 11, 10], "tanh", output, dtype)
    x, t = data(batch, 5, 10, loss, dtype)
    assert_steps_agree(nets, x, t, loss, lambda: gpunn.SGD(lr=0.2, momentum=0.9))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("settings", OPTIMISERS, ids=str)
def test_every_sgd_setting_is_bitwise_equal_to_numpy(settings, dtype):
    nets = pair([8, 13, 4], "relu", "softmax", dtype)
    x, t = data(33, 8, 4, "cross_entropy", dtype)
    assert_steps_agree(nets, x, t, "cross_entropy", lambda: gpunn.SGD(lr=0.05, **settings), steps=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_and_a_learning_rate_schedule_agree_too(dtype):
    nets = pair([8, 13, 4], "sigmoid", "softmax", dtype)
    x, t = data(9, 8, 4, "cross_entropy", dtype)
    assert_steps_agree(nets, x, t, "cross_entropy", lambda: gpunn.Adam(lr=0.01, weight_decay=0.01))
    schedule = gpunn.schedules.StepDecay(0.5, factor=0.5, every=2)
    assert_steps_agree(nets, x, t, "cross_entropy", lambda: gpunn.SGD(lr=schedule, momentum=0.5), steps=5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_mlp_benchmark_workload_agrees_at_its_batch_sizes(dtype):
    """784-512-512-10 sigmoid/softmax/cross-entropy, as `gpunn bench` times it (2048 rows: float32 only)."""
    for batch in ([32, 256, 2048] if dtype == "float32" else [32]):
        nets = pair([784, 512, 512, 10], "sigmoid", "softmax", dtype)
        x, t = data(batch, 784, 10, "cross_entropy", dtype)
        assert_steps_agree(nets, x, t, "cross_entropy", lambda: gpunn.SGD(lr=1e-3), steps=2)


def test_fit_and_predict_agree():
    """Shuffled minibatches with a short last batch, validation, evaluate and predict."""
    x, t = data(103, 6, 3, "cross_entropy", "float32", seed=4)
    nets = pair([6, 12, 3], "elu", "softmax", "float32")
    histories = [net.fit(x, t, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1, momentum=0.9), epochs=3,
                         batch_size=16, validation_data=(x[:20], t[:20])) for net in nets]
    assert histories[0].loss == histories[1].loss and histories[0].val_loss == histories[1].val_loss
    assert same_bits(nets[0].flat_parameters(), nets[1].flat_parameters())
    assert same_bits(nets[0].predict(x), nets[1].predict(x))


# -- kernel by kernel, at the edges ---------------------------------------------------------------
def edge_values(dtype, n=45):
    """Finite values of every scale, signed zeros, ±inf and NaN, plus overflow candidates."""
    special = [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 80.0, -80.0, 700.0, -700.0, 1e4, -1e4, numpy.inf, -numpy.inf,
               numpy.nan]
    vals = numpy.concatenate([special, rng(5).normal(size=n) * 20])
    return vals.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", HIDDEN + ["softmax"], ids=str)
def test_each_activation_kernel_at_signed_zeros_infinities_and_nan(act, dtype):
    """bias + f and δ = f′·g on edge values, against the NumPy path's ops (x·W is left out: z is given)."""
    a = gpunn.activations.get(act)
    vals = edge_values(dtype)
    z0 = vals.reshape(-1, 4) if not a.rowwise else vals[:40].reshape(-1, 8)
    b = numpy.resize(numpy.array([0.0, -0.0, 0.5, -2.0], dtype), z0.shape[1]).astype(dtype)
    g = numpy.resize(edge_values(dtype)[::-1], z0.shape).astype(dtype)
    results = []
    with numpy.errstate(all="ignore"):
        for o in (ops.XpOps(gpunn.Device("cpu")), ops.CpuFusedOps(gpunn.Device("cpu"))):
            z = z0.copy()
            y = z if a.name == "identity" else numpy.empty_like(z0)
            rowstats = numpy.empty((2, z.shape[0]), dtype) if a.rowwise else None
            o.bias_activation(a, z, b, y, rowstats)
            d = numpy.empty_like(z)
            o.activation_backward(a, z, y, g, d, numpy.empty_like(z), rowstats)
            results.append((z, y, d, rowstats))
    for ref, got in zip(*results):
        assert ref is None and got is None or same_bits(ref, got)


def with_nans(g, shape, dtype, share=0.25):
    """Normal values with NaNs of both signs in about ``share`` of the places."""
    a = g.normal(size=shape)
    u = g.uniform(size=shape)
    a[u < share / 2] = numpy.nan
    a[(u >= share / 2) & (u < share)] = numpy.copysign(numpy.nan, -1.0)
    return a.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", HIDDEN + ["softmax"], ids=str)
def test_nan_of_both_signs_differs_from_numpy_in_nan_sign_bits_only(act, dtype):
    """z, b and ∂E/∂y holding NaNs of both signs: z + b and f, δ = f′·g (apart, and with the bias sum in δ's
    pass), and the column sums, against the NumPy path. Where two NaNs of opposite sign meet, the kernels may
    keep the other one's sign (numba's code may take the operands of an add or a multiply in the other
    order than NumPy's loops do; measured here: in every kernel above, float32 and float64): the same places
    are NaN, with the same payload, and every other bit is equal (:func:`same_bits`)."""
    a, g = gpunn.activations.get(act), rng(7)
    for rows, cols in [(1, 4), (7, 1), (37, 9), (300, 17)]:
        z0, b, grad = (with_nans(g, (rows, cols), dtype), with_nans(g, cols, dtype),
                       with_nans(g, (rows, cols), dtype))
        results = []
        with numpy.errstate(all="ignore"):
            for o in (ops.XpOps(gpunn.Device("cpu")), ops.CpuFusedOps(gpunn.Device("cpu"))):
                z = z0.copy()
                y = z if a.name == "identity" else numpy.empty_like(z)
                rowstats = numpy.empty((2, rows), dtype) if a.rowwise else None
                o.bias_activation(a, z, b, y, rowstats)
                d, d2 = numpy.empty_like(z), numpy.empty_like(z)
                s, s2 = numpy.empty(cols, dtype), numpy.empty(cols, dtype)
                o.activation_backward(a, z, y, grad, d, numpy.empty_like(z), rowstats)
                o.column_sum(d, s)
                calls = o.bind_backward_and_sum(a, z, y, grad, d2, s2)      # a hidden layer's δ and ∂E/∂b
                for call in calls or [partial(o.activation_backward, a, z, y, grad, d2, numpy.empty_like(z),
                                              rowstats), partial(o.column_sum, d2, s2)]:
                    call()
                results.append((z, y, rowstats, d, s, d2, s2))
        for k, (ref, got) in enumerate(zip(*results)):
            assert ref is None and got is None or same_bits(ref, got), (rows, cols, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 64, 100, 127, 128, 129, 300])
def test_softmax_rows_sum_as_numpy_sums_them(cols, dtype):
    """NumPy adds a row pairwise (8 accumulators, blocks of 128): every width around the block edges."""
    z0 = (rng(cols).normal(size=(6, cols)) * 5).astype(dtype)
    b = rng(1).normal(size=cols).astype(dtype)
    out = []
    for o in (ops.XpOps(gpunn.Device("cpu")), ops.CpuFusedOps(gpunn.Device("cpu"))):
        z, y, rs = z0.copy(), numpy.empty_like(z0), numpy.empty((2, 6), dtype)
        o.bias_activation(gpunn.activations.Softmax(), z, b, y, rs)
        out.append((z, y, rs))
    for ref, got in zip(*out):
        assert same_bits(ref, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (2, 1), (9, 1), (300, 1), (7, 2), (2048, 10), (33, 129), (0, 4)])
def test_column_sums_match_numpy(shape, dtype):
    d = (rng(2).normal(size=shape) * 3).astype(dtype)
    ref, got = numpy.full(shape[1], 7, dtype), numpy.full(shape[1], 7, dtype)
    ops.XpOps(gpunn.Device("cpu")).column_sum(d, ref)
    ops.CpuFusedOps(gpunn.Device("cpu")).column_sum(d, got)
    assert same_bits(ref, got)


def test_non_contiguous_targets_agree():
    """Targets that are a strided view (train_step takes arrays as they are) give the same bits."""
    x, t = data(12, 5, 8, "cross_entropy", "float64")
    wide = numpy.zeros((12, 16))
    wide[:, ::2] = t
    nets = pair([5, 7, 8], "relu", "softmax", "float64")
    assert_steps_agree(nets, x, wide[:, ::2], "cross_entropy", lambda: gpunn.SGD(lr=0.1), steps=2)


# -- the switch and the fallback -------------------------------------------------------------------
def test_the_fused_switch_covers_the_cpu(monkeypatch):
    cpu = gpunn.Device("cpu")
    assert type(ops.ops_for(cpu)) is ops.CpuFusedOps and ops.ops_for(cpu).fused
    assert ops.ops_for(cpu, fused=True).kernels is not None      # asked for: loaded at once
    assert type(ops.ops_for(cpu, fused=False)) is ops.XpOps
    monkeypatch.setenv("GPUNN_FUSED", "0")
    assert type(ops.ops_for(cpu)) is ops.XpOps
    assert gpunn.mlp([2, 3, 1], output="sigmoid", device="cpu", seed=0).fused is False
    assert type(ops.ops_for(cpu, fused=True)) is ops.CpuFusedOps


def test_by_default_the_kernels_load_after_the_first_seconds_of_training(monkeypatch):
    """A default network steps on the reference until LAZY_SECONDS have passed, then on the kernels: the
    switch in the middle of a run changes no bit."""
    monkeypatch.setattr(cpukernels, "loaded", lambda: False)
    monkeypatch.setattr(ops.CpuFusedOps, "LAZY_SECONDS", 0.0)
    lazy = gpunn.mlp([6, 9, 4], activation="elu", device="cpu", seed=3)
    ref = gpunn.mlp([6, 9, 4], activation="elu", device="cpu", seed=3, fused=False)
    assert type(lazy.ops) is ops.CpuFusedOps and lazy.ops.kernels is None and lazy.fused
    x, t = data(11, 6, 4, "cross_entropy", "float32")
    assert_steps_agree([ref, lazy], x, t, "cross_entropy", lambda: gpunn.SGD(lr=0.1, momentum=0.9), steps=3)
    assert lazy.ops.kernels is not None         # the first step started the clock, the second loaded them


def test_warm_up_loads_at_once_and_falls_back_where_numba_fails(monkeypatch):
    monkeypatch.setattr(cpukernels, "loaded", lambda: False)
    o = ops.CpuFusedOps(gpunn.Device("cpu"), lazy=True)
    assert o.kernels is None
    o.warm_up()
    assert o.kernels is not None and o.fused
    monkeypatch.setattr(cpukernels, "available", lambda: False)
    broken = ops.CpuFusedOps(gpunn.Device("cpu"), lazy=True)
    broken.warm_up()
    assert broken.kernels is None and broken.fused is False
    z = numpy.ones((2, 3), "float32")
    assert broken.sgd_update(z, z, None, None, 0.1, 0.0, False, 0.0) is False   # the optimiser's own formula


def test_the_compiled_kernels_are_cached_on_disk():
    """Every kernel has numba's on-disk cache (gpunn.numbacache's, whose unreadable files are a miss)."""
    from numba.core.caching import FunctionCache
    k = cpukernels.CpuKernels().k
    kernels = [getattr(k, name) for name in [fn.__name__ for fn in cpukernels.KERNELS] + ["bias_sigmoid",
                                                                                      "softmax_pre_exp"]
               if hasattr(k, name)]     # cpuexp's two where it imports
    assert all(isinstance(f._cache, FunctionCache) and type(f._cache).__name__ == "MissOnUnreadable" for f in kernels)
    assert cpukernels.numba_version()


@pytest.mark.parametrize("fused", [False, True])
def test_the_softmax_row_statistics_are_contiguous_rows(fused):
    """A softmax layer's log-partitions and log-sums are the two rows of a (2, batch) C-contiguous array, in
    training and inference buffers, on both paths: NumPy's log of a strided column runs its scalar loop
    (about 25× slower than on a contiguous row here), so the layout is part of the step's speed."""
    net = gpunn.mlp([5, 7, 3], activation="sigmoid", output="softmax", seed=0, fused=fused, device="cpu")
    x, t = data(33, 5, 3, "cross_entropy", "float32")
    net.train_step(x.astype(net.dtype), t.astype(net.dtype), "cross_entropy", gpunn.SGD(lr=0.1))
    stats = net.layers[-1].rowstats
    assert stats.shape == (2, 33) and stats.flags.c_contiguous
    z = net.layers[-1].z.astype(numpy.float64)
    lse = numpy.log(numpy.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
    numpy.testing.assert_allclose(stats[0], lse, rtol=1e-5)
    net.predict(x[:20])
    bufs = net.layers[-1]._infer_bufs
    assert bufs is not None and bufs.rowstats.shape == (2, 20)
    _, _, part = bufs.rows(7)
    assert part.shape == (2, 7) and part.flags.c_contiguous and part.base is not None


def test_the_cross_entropy_after_a_softmax_is_one_bound_call_unless_the_loss_has_its_own():
    """The step binds the cross-entropy's value and δ (CpuKernels.bound_cross_entropy), bitwise the loss's
    own formulas written here; a loss instance given its own fused form or backward keeps it."""
    net = gpunn.mlp([5, 7, 3], activation="sigmoid", output="softmax", seed=0, fused=True, device="cpu")
    x, t = data(9, 5, 3, "cross_entropy", "float32")
    x, t = x.astype(net.dtype), t.astype(net.dtype)
    loss = gpunn.losses.get("cross_entropy")
    value = net.train_step(x, t, loss, gpunn.SGD(lr=0.1))
    assert "bound_cross_entropy" in net._backprop._last.loss_backward.__qualname__
    out = net.layers[-1]
    f = numpy.dtype(net.dtype).type
    want = (numpy.sum(out.rowstats[0]) - numpy.vdot(t, out.z)) * f(1.0 / 9)
    assert same_bits(numpy.asarray(value, net.dtype), numpy.asarray(want, net.dtype))
    assert same_bits(out.delta, (out.y - t) * f(1.0 / 9))
    calls = []
    own = gpunn.losses.get("cross_entropy")
    own.fused_backward = lambda *a: calls.append(a) or False
    net.train_step(x, t, own, gpunn.SGD(lr=0.1))
    assert calls and "bound_cross_entropy" not in net._backprop._last.loss_backward.__qualname__


CACHED_KERNELS = """
import json, numpy, gpunn
from gpunn import cpuexp, cpukernels, ops
inside = cpukernels.exp_inside()                  # loading ran cpuexp's exp_f32_array (its probe)
o = ops.CpuFusedOps(gpunn.Device("cpu"))
d = numpy.linspace(-3, 3, 12, dtype=numpy.float32).reshape(4, 3)
got, want = numpy.empty(3, numpy.float32), numpy.add.reduce(d, 0)
o.column_sum(d, got)
stats = {name: [len(f.stats.cache_hits), len(f.stats.cache_misses)]
         for name, f in (("colsum", o.kernels.k.colsum), ("exp_f32_array", cpuexp.exp_f32_array))}
print(json.dumps({"inside": inside[0], "why": inside[1], "same": got.tobytes() == want.tobytes(), "stats": stats}))
"""


def test_a_corrupt_numba_cache_is_a_miss(tmp_path):
    """Garbage in numba's cache files of the kernels (cpukernels' colsum's index, cpuexp's exp_f32_array's
    data file; numba reads both with pickle) is a cache miss: the kernels compile again and give NumPy's bits,
    the float32 exp still runs inside them, and the cache is written afresh for the next process (hits). numba
    alone raises the pickle error out of the first call, and the exp's probe fails (exp_inside off)."""
    import json
    import subprocess
    import sys

    from helpers import child_env

    def run():
        done = subprocess.run([sys.executable, "-c", CACHED_KERNELS], capture_output=True, text=True, timeout=300,
                              env=child_env(NUMBA_CACHE_DIR=str(tmp_path)))
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.splitlines()[-1])

    inside = cpukernels.exp_inside()[0]
    first = run()
    assert first["same"] and first["inside"] is inside
    files = {f.name: f for f in tmp_path.rglob("*.nb[ic]")}
    index = [f for name, f in files.items() if name.startswith("cpukernels.colsum-") and name.endswith(".nbi")]
    data = [f for name, f in files.items() if name.startswith("cpuexp.exp_f32_array-") and name.endswith(".nbc")]
    assert len(index) == 1 and len(data) == 1, sorted(files)
    index[0].write_bytes(rng(1).bytes(300))
    data[0].write_bytes(b"garbage")
    again = run()
    assert again["same"] and again["inside"] is inside, again
    assert again["stats"] == {"colsum": [0, 1], "exp_f32_array": [0, 1]}, again
    assert run()["stats"] == {"colsum": [1, 0], "exp_f32_array": [1, 0]}


def test_cached_njit_falls_back_only_where_numba_cannot_cache():
    """numbacache.cached_njit: numba's "cannot cache" refusal gives the dispatcher without a cache; any other
    error of numba's is not hidden."""
    from gpunn import numbacache
    made = []

    def njit(cache=False, **options):
        def decorate(fn):
            if cache:
                raise RuntimeError(reason)
            made.append(options)
            return ("plain", fn)
        return decorate
    reason = "cannot cache function 'f': no locator available for file 'f.py'"
    assert numbacache.cached_njit(njit, len, nogil=True) == ("plain", len) and made == [{"nogil": True}]
    reason = "something else went wrong"
    with pytest.raises(RuntimeError, match="something else"):
        numbacache.cached_njit(njit, len)
