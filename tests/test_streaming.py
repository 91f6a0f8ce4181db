"""Training and inference on NumPy memmaps: the same results as in memory, memory bounded by batches."""
from __future__ import annotations

import tracemalloc

import numpy
import pytest

import gpunn
from helpers import host, rng


def _memmap(tmp_path, name, a):
    path = tmp_path / f"{name}.npy"
    numpy.save(path, a)
    return numpy.load(path, mmap_mode="r")


@pytest.mark.parametrize("file_dtype", ["float32", "float64"])
def test_fit_on_a_memmap_equals_fit_in_memory(device, tmp_path, file_dtype):
    X = rng(0).normal(size=(70, 6)).astype(file_dtype)
    y = rng(1).integers(0, 3, 70)
    mm = _memmap(tmp_path, "x", X)
    nets = [gpunn.mlp([6, 9, 3], activation="tanh", device=device, seed=2) for _ in range(2)]
    hists = [net.fit(data, y, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1, momentum=0.9), epochs=3,
                     batch_size=16, validation_data=(data[:20], y[:20]))
             for net, data in zip(nets, (X, mm))]
    numpy.testing.assert_array_equal(host(nets[1].flat_parameters()), host(nets[0].flat_parameters()))
    assert hists[1].epochs[-1]["loss"] == hists[0].epochs[-1]["loss"]
    assert hists[1].accuracy == hists[0].accuracy and hists[1].val_loss == hists[0].val_loss
    numpy.testing.assert_array_equal(host(nets[1].predict(mm, batch_size=7)), host(nets[0].predict(X)))
    assert nets[1].evaluate(mm, y) == nets[0].evaluate(X, y)


def _peak_fit(tmp_path, n):
    g = rng(3)
    mm = _memmap(tmp_path, f"x{n}", g.normal(size=(n, 64)).astype("float32"))
    y = g.integers(0, 2, n).astype(float)
    net = gpunn.mlp([64, 16, 1], activation="relu", output="sigmoid", device="cpu", seed=0)
    tracemalloc.start()
    try:
        net.fit(mm, y, loss="binary_cross_entropy", epochs=1, batch_size=256)
        net.predict(mm)
        return tracemalloc.get_traced_memory()[1], mm.nbytes
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_a_streamed_data_set(tmp_path):
    small, _ = _peak_fit(tmp_path, 20_000)
    big, size = _peak_fit(tmp_path, 160_000)          # 41 MB of features on disk
    # what may grow with n: the permutation (8 B/sample), targets and labels (~17 B), predict's output (4 B)
    assert big - small < 140_000 * 40, (small, big)
    assert big < size / 4, (big, size)


def test_a_nan_in_the_file_is_found_while_training(tmp_path):
    X = rng(0).normal(size=(40, 6))
    X[33, 2] = numpy.nan
    mm = _memmap(tmp_path, "bad", X)
    net = gpunn.mlp([6, 4, 3], device="cpu", seed=0)
    start = host(net.flat_parameters())
    with pytest.raises(gpunn.DataError, match="NaN.*bad.npy"):
        net.fit(mm, rng(1).integers(0, 3, 40), loss="cross_entropy", epochs=1, batch_size=8)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), start)   # back to the epoch's start


def test_on_a_gpu_batches_go_through_two_pinned_buffers_and_a_copy_stream(fake_gpu, tmp_path):
    """The compute stream waits for each batch's copy, and nothing is read back per step."""
    import fakecupy
    X = rng(0).normal(size=(96, 6)).astype("float32")
    mm = _memmap(tmp_path, "x", X)
    y = rng(1).integers(0, 3, 96)
    reads = {}
    for batch in (32, 8):                            # 3 and 12 batches per epoch
        net = gpunn.mlp([6, 9, 3], activation="tanh", device="cuda:0", seed=2)
        waited = fakecupy._NULL_STREAM.waited
        fakecupy.ndarray.reads = 0
        net.fit(mm, y, loss="cross_entropy", epochs=2, batch_size=batch)
        assert fakecupy._NULL_STREAM.waited - waited == 2 * 96 // batch
        reads[batch] = fakecupy.ndarray.reads
    assert reads[8] == reads[32], reads              # read-backs per epoch, not per batch
    ref = gpunn.mlp([6, 9, 3], activation="tanh", device="cuda:0", seed=2)
    ref.fit(X, y, loss="cross_entropy", epochs=2, batch_size=8)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), host(ref.flat_parameters()))


def test_an_unshuffled_memmap_fit_reads_the_rows_in_order(tmp_path):
    X = rng(0).normal(size=(50, 6))
    y = rng(1).integers(0, 3, 50)
    mm = _memmap(tmp_path, "x", X)
    a, b = (gpunn.mlp([6, 9, 3], device="cpu", dtype="float64", seed=2) for _ in range(2))
    a.fit(X, y, loss="cross_entropy", epochs=2, batch_size=16, shuffle=False)
    b.fit(mm, y, loss="cross_entropy", epochs=2, batch_size=16, shuffle=False)
    numpy.testing.assert_array_equal(host(b.flat_parameters()), host(a.flat_parameters()))
