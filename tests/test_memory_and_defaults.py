"""Memory a fit or predict leaves behind or needs (traced), a memmap shortened during fit (a second
process: a SIGBUS would kill it), the default loss of a softmax output, one cross-entropy formula, the
history of a fit whose callback fits, and History as a sequence (Keras's dict, pandas)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy
import pytest

import gpunn
from helpers import child_env, host, rng

LABELS = rng(1).integers(0, 2, size=20_000)


def _traced(fn):
    """(memory still held after ``fn``, peak during it), in bytes above the start."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        fn()
        gc.collect()
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return now - start, peak - start


@pytest.mark.parametrize("dtype,shuffle", [("float64", True), ("float32", True), ("float32", False)])
def test_fit_keeps_no_copy_of_x_once_it_returns(dtype, shuffle):
    X = rng(0).normal(size=(20_000, 50))                  # 8 MB; float32 fits convert it (another copy)
    net = gpunn.mlp([50, 8, 2], activation="tanh", device="cpu", dtype=dtype, seed=0)
    net.fit(X[:100], LABELS[:100], epochs=1, batch_size=500)      # the optimiser's state, made once
    held, _ = _traced(lambda: net.fit(X, LABELS, epochs=1, batch_size=500, shuffle=shuffle))
    assert held < X.nbytes / 8, held
    assert net.layers[0].x.shape == (500, 50) and net.layers[0].x.base is None


def test_predicts_nan_check_needs_no_mask_of_the_whole_input():
    X = numpy.ones((400_000, 10), dtype=numpy.float32)      # a whole-input mask would be 4 MB
    net = gpunn.mlp([10, 4, 1], output="sigmoid", device="cpu", seed=0)
    net.predict(X[:10])
    _, peak = _traced(lambda: net.predict(X))
    assert peak < 400_000 * 4 + 1_400_000, peak              # the output (1.6 MB) and a chunk's work (1 MB)


def test_training_buffers_of_many_batch_sizes_stay_bounded():
    X, Y = rng(0).normal(size=(1000, 50)), rng(1).normal(size=(1000, 2))
    net = gpunn.mlp([50, 100, 2], activation="tanh", output="identity", device="cpu", dtype="float64", seed=0)
    opt = gpunn.SGD(lr=0.01)
    net.train_step(X, Y, "squared_error", opt)
    one, _ = _traced(lambda: net.train_step(X[:999], Y[:999], "squared_error", opt))
    many, _ = _traced(lambda: [net.train_step(X[:n], Y[:n], "squared_error", opt) for n in range(900, 960)])
    assert many < 6 * one, (many, one)


def test_a_memmap_shortened_during_fit_is_a_data_error_not_sigbus(tmp_path):
    script = textwrap.dedent("""
        import os, numpy, gpunn
        X = numpy.lib.format.open_memmap("x.npy", mode="w+", dtype=numpy.float32, shape=(4000, 8))
        X[:] = 1.0
        X.flush()
        X = numpy.load("x.npy", mmap_mode="r")
        net = gpunn.mlp([8, 4, 1], output="sigmoid", device="cpu", seed=0)
        cut = gpunn.callbacks.LambdaCallback(lambda r: os.truncate("x.npy", 4096))
        try:
            net.fit(X, numpy.zeros(4000), epochs=3, batch_size=256, callbacks=[cut])
        except gpunn.errors.DataError as e:
            print("DataError:", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=child_env(GPUNN_DEVICE="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DataError:" in done.stdout and "shortened" in done.stdout
    assert os.path.getsize(tmp_path / "x.npy") == 4096


# -- defaults and formulas ----------------------------------------------------------------------------------
def test_a_softmax_output_defaults_to_cross_entropy():
    X = rng(0).normal(size=(40, 3))
    a, b = (gpunn.mlp([3, 5, 3], device="cpu", dtype="float64", seed=0) for _ in range(2))
    a.fit(X, LABELS[:40] + 1, epochs=2, batch_size=8)
    b.fit(X, LABELS[:40] + 1, loss="cross_entropy", epochs=2, batch_size=8)
    assert a.loss.name == "cross_entropy"
    numpy.testing.assert_array_equal(host(a.flat_parameters()), host(b.flat_parameters()))
    fresh = gpunn.mlp([3, 5, 3], device="cpu", dtype="float64", seed=0)
    assert fresh.evaluate(X, LABELS[:40]).loss == fresh.evaluate(X, LABELS[:40], loss="cross_entropy").loss


def test_cross_entropy_on_soft_targets_is_one_formula_in_training_and_evaluate():
    X = rng(0).normal(size=(30, 4))
    T = rng(1).dirichlet(numpy.ones(3), size=30) * (1 + 4e-4)        # rows sum to 1.0004: within the 1e-3 allowed
    net = gpunn.mlp([4, 6, 3], device="cpu", dtype="float64", seed=0)
    trained = float(net.gradients(X, T, "cross_entropy"))              # the training path's value
    assert net.evaluate(X, T, loss="cross_entropy").loss == pytest.approx(trained, rel=1e-12)


def test_a_callback_that_fits_leaves_the_outer_runs_history():
    X = rng(0).normal(size=(16, 3))
    net = gpunn.mlp([3, 4, 2], device="cpu", seed=0)
    inner = []
    tune = gpunn.callbacks.LambdaCallback(lambda r: inner.append(net.fit(X, LABELS[:16], epochs=1)) and False)
    outer = net.fit(X, LABELS[:16], epochs=3, callbacks=[tune])
    assert net.history is outer and len(outer) == 3 and len(inner) == 3
    assert net.optimizer is not None and net.loss.name == "cross_entropy"


# -- History --------------------------------------------------------------------------------------------
def test_history_iterates_indexes_and_tabulates():
    pandas = pytest.importorskip("pandas")
    X = rng(0).normal(size=(16, 3))
    net = gpunn.mlp([3, 4, 2], device="cpu", seed=0)
    h = net.fit(X, LABELS[:16], epochs=4, validation_data=(X, LABELS[:16]))
    assert list(h) == h.epochs and [r["epoch"] for r in h] == [1, 2, 3, 4]
    assert "loss" in h and "nope" not in h and h[-1] is h.epochs[3] and h[-1]["epoch"] == 4
    with pytest.raises(IndexError):
        h[4]
    with pytest.raises(KeyError):
        h["nope"]
    assert h.history["val_loss"] == [r["val_loss"] for r in h.epochs] and h["loss"] == h.history["loss"]
    table = pandas.DataFrame(h.history)
    assert table.shape == (4, len(h.keys())) and list(pandas.DataFrame(list(h))["epoch"]) == [1, 2, 3, 4]


def test_gpu_kernel_scratch_of_many_batch_sizes_stays_bounded(fake_gpu):
    """The fused kernels' per-shape scratch on a GPU (the column sum's partial sums and ticket counters, the
    per-row losses, the launch sizes) is kept for the last MAX_BATCH_SIZES batch sizes, as the layers'
    buffers are: a run that meets ever new batch sizes (partial_fit on chunks of any size) does not grow."""
    from gpunn import kernels
    from gpunn.layers import MAX_BATCH_SIZES
    net = gpunn.mlp([6, 8, 3], activation="tanh", device="cuda:0", seed=0)
    opt = gpunn.SGD(lr=0.01)
    X, L = rng(0).normal(size=(80, 6)), rng(1).integers(0, 3, 80)
    for n in range(40, 80):
        x = net.device.asarray(X[:n], dtype=net.dtype)
        t = net.device.asarray(numpy.eye(3)[L[:n]], dtype=net.dtype)
        net.train_step(x, t, "cross_entropy", opt)
    k = net.ops.kernels
    assert len({key[0][0] for key in k._colsum}) <= MAX_BATCH_SIZES
    assert len({key[2][0] for key in kernels._SCRATCH}) <= MAX_BATCH_SIZES
    assert len(k._rowloss) <= MAX_BATCH_SIZES
    assert len(k._sizes) <= kernels.MAX_SHAPES                  # launch sizes: host numbers, any row count
    assert kernels.stale_counters(net.device) == 0               # every set in use is still checked, left at zero


def test_gpu_kernel_scratch_goes_with_the_networks_that_used_it(fake_gpu):
    """Networks made and dropped one after another (a search over batch sizes) leave no column-sum scratch:
    a FusedKernels that is collected gives up its shares; one still alive keeps its own."""
    import gc

    from gpunn import kernels
    X, L = rng(0).normal(size=(80, 6)), rng(1).integers(0, 3, 80)

    def trained(n):
        net = gpunn.mlp([6, 8, 3], activation="tanh", device="cuda:0", seed=0)
        x = net.device.asarray(X[:n], dtype=net.dtype)
        net.train_step(x, net.device.asarray(numpy.eye(3)[L[:n]], dtype=net.dtype), "cross_entropy",
                       gpunn.SGD(lr=0.01))
        return net
    kept = trained(7)
    held = set(kernels._SCRATCH)
    for n in range(20, 40):
        trained(n)
        gc.collect()
    assert set(kernels._SCRATCH) == held and held
    assert sum(kernels._USERS.values()) == len(held)
    del kept
    gc.collect()
    assert kernels._SCRATCH == {} and kernels._USERS == {}
