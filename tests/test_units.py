"""The units behind Sequential (issue 20): parameter store, history, data sources, strategy, model file."""
from __future__ import annotations

import numpy
import pytest

import gpunn
from gpunn.data import InMemory, Sharded
from gpunn.history import History
from gpunn.ops import ops_for
from gpunn.params import ParameterStore
from gpunn.strategy import DataParallel, Local, for_communicator
from helpers import host


def test_the_store_lays_out_W_then_b_layer_by_layer_and_binds_views(device):
    layers = [gpunn.Dense(3, 2, "tanh"), gpunn.Dense(2, 4, "sigmoid")]
    values = numpy.arange(3 * 2 + 2 + 2 * 4 + 4, dtype="float64")
    store = ParameterStore(layers, gpunn.get_device(device), "float64", values)
    numpy.testing.assert_array_equal(host(layers[0].W), values[:6].reshape(3, 2))
    numpy.testing.assert_array_equal(host(layers[0].b), values[6:8])
    numpy.testing.assert_array_equal(host(layers[1].W), values[8:16].reshape(2, 4))
    numpy.testing.assert_array_equal(host(layers[1].b), values[16:])
    layers[1].b[...] = -1.0                     # a view: writing the layer writes the store
    assert host(store.params)[16:].tolist() == [-1.0] * 4
    numpy.testing.assert_array_equal(host(store.decay_mask()), [1] * 6 + [0] * 2 + [1] * 8 + [0] * 4)


def test_the_store_refuses_parameters_of_another_shape_instead_of_broadcasting():
    layers = [gpunn.Dense(2, 2)]
    store = ParameterStore(layers, gpunn.get_device("cpu"), "float32", numpy.zeros(6))
    for bad in (numpy.ones(1), numpy.ones(5), numpy.ones((6, 1)), 3.0):
        with pytest.raises(gpunn.ShapeError):
            store.assign(bad)
    assert host(store.params).tolist() == [0.0] * 6


def test_a_moved_store_keeps_the_values_and_rebinds_the_layers():
    layers = [gpunn.Dense(2, 3)]
    store = ParameterStore(layers, gpunn.get_device("cpu"), "float64", numpy.linspace(0, 1, 9))
    moved = store.moved(gpunn.get_device("cpu"))
    assert moved.params is not store.params
    numpy.testing.assert_array_equal(moved.params, store.params)
    assert numpy.shares_memory(layers[0].W, moved.params)


def test_history_iterates_indexes_and_converts_like_keras():
    h = History([{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "val_loss": 0.3}])
    assert list(h) == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "val_loss": 0.3}]
    assert h[-1]["loss"] == 0.25 and h[0]["epoch"] == 1
    assert h["loss"] == [0.5, 0.25] and h["val_loss"] == [None, 0.3]
    assert "loss" in h and "accuracy" not in h
    with pytest.raises(KeyError, match="accuracy"):
        h["accuracy"]
    with pytest.raises(IndexError):
        h[2]
    assert h.history == {"epoch": [1, 2], "loss": [0.5, 0.25], "val_loss": [None, 0.3]}
    pandas = pytest.importorskip("pandas")
    assert pandas.DataFrame(h.history)["loss"].tolist() == [0.5, 0.25]


def test_an_in_memory_source_reads_the_epochs_order_and_shards_cover_each_batch_once():
    ops = ops_for(gpunn.get_device("cpu"))
    X = numpy.arange(30, dtype="float32").reshape(10, 3)
    T = numpy.arange(10, dtype="float32").reshape(10, 1)
    src = InMemory(X, T, None, 4, ops, numpy.dtype("float32"))
    perm = numpy.random.default_rng(0).permutation(10)
    src.order(perm)
    assert [sl for _, sl in src.batches()] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    for _, sl in src.batches():
        numpy.testing.assert_array_equal(src.batch(sl)[0], X[perm][sl])
    for size in (2, 3, 5):
        for _, sl in src.batches():
            parts = [Sharded(src, r, size).batch(sl)[1] for r in range(size)]
            numpy.testing.assert_array_equal(numpy.concatenate(parts), T[perm][sl])


def test_a_communicator_of_one_process_trains_locally():
    assert type(for_communicator(None)) is Local
    assert type(for_communicator(gpunn.distributed.init(device="cpu"))) is Local


class _TwoRanksInOne:
    """A stand-in communicator: rank 0 of two, whose peer's gradient share is given."""

    rank, size, is_root = 0, 2, True

    def __init__(self, peer: numpy.ndarray):
        self.peer = peer

    def allreduce_sum(self, a):
        a += self.peer
        return a


def test_a_data_parallel_step_sums_the_shares_as_one_full_batch_step():
    X = numpy.random.default_rng(1).normal(size=(5, 3))
    Y = numpy.random.default_rng(2).normal(size=(5, 2))
    ref = gpunn.mlp([3, 4, 2], output="identity", dtype="float64", seed=0, device="cpu")
    ref.train_step(X, Y, "squared_error", gpunn.SGD(lr=0.5))         # one process, the whole batch
    peer = gpunn.mlp([3, 4, 2], output="identity", dtype="float64", seed=0, device="cpu")
    peer.gradients(X[3:], Y[3:], "squared_error")
    net = gpunn.mlp([3, 4, 2], output="identity", dtype="float64", seed=0, device="cpu")
    out = numpy.zeros(1)
    DataParallel(_TwoRanksInOne(host(peer.flat_gradients()) * 2 / 5)).step(
        net, X[:3], Y[:3], gpunn.losses.get("squared_error"), gpunn.SGD(lr=0.5), out, 5)
    numpy.testing.assert_allclose(net.flat_parameters(), ref.flat_parameters(), rtol=1e-13, atol=1e-15)


def test_train_step_takes_no_communicator():
    net = gpunn.mlp([2, 2], output="identity", seed=0, device="cpu")
    with pytest.raises(TypeError):
        net.train_step([[0.0, 1.0]], [[1.0, 0.0]], "squared_error", gpunn.SGD(), comm=None)
