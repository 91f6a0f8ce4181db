"""Bad input, faults and numerical trouble: a specific error every time, a model left usable."""
from __future__ import annotations

import re

import numpy
import pytest

import fakecupy
import gpunn
from gpunn import network
from gpunn.errors import (
    ConfigError,
    DataError,
    DataTypeError,
    DeviceError,
    DivergenceError,
    GpunnError,
    OutOfMemoryError,
    ShapeError,
)
from helpers import host, rng


def make(device="cpu", out="softmax", n_out=3, dtype="float32"):
    return gpunn.Sequential([gpunn.Dense(4, 5, "tanh"), gpunn.Dense(5, n_out, out)], device=device,
                            dtype=dtype, seed=0)


X = rng(0).normal(size=(10, 4))
LABELS = rng(1).integers(0, 3, size=10)


def usable(net, device):
    """The model still predicts finite values and can train one more epoch."""
    p = host(net.predict(X))
    assert numpy.all(numpy.isfinite(p))
    net.fit(X, LABELS, loss="cross_entropy", epochs=1, batch_size=5)


# -- data ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,err,match", [
    (numpy.zeros(4), ShapeError, "2-D"),
    (numpy.zeros((2, 4, 1)), ShapeError, "2-D"),
    (numpy.zeros((10, 3)), ShapeError, "3 features but the first layer expects n_in=4"),
    (numpy.zeros((0, 4)), DataError, "empty"),
    (numpy.full((10, 4), numpy.nan), DataError, "NaN"),
    (numpy.full((10, 4), numpy.inf), DataError, "infinite"),
    (numpy.array([["a"] * 4] * 10), DataTypeError, "strings"),
    (numpy.array([[object()] * 4] * 10), DataTypeError, "objects"),
    (numpy.ones((10, 4), complex), DataTypeError, "complex"),
    ([[1, 2], [3]], DataTypeError, "cannot be read"),
])
def test_bad_inputs(device, bad, err, match):
    net = make(device)
    with pytest.raises(err, match=match):
        net.fit(bad, LABELS, loss="cross_entropy", epochs=1)
    with pytest.raises(GpunnError):
        net.predict(bad)
    usable(net, device)


def test_integer_and_bool_inputs_are_cast(device):
    net = make(device)
    a = host(net.predict(X.astype(int)))
    b = host(net.predict(X.astype(int).astype(float)))
    numpy.testing.assert_array_equal(a, b)
    assert host(net.predict(X > 0)).dtype == numpy.float32
    net.fit((X > 0), LABELS.astype(numpy.uint8), loss="cross_entropy", epochs=1)


@pytest.mark.parametrize("Y,err,match", [
    (LABELS[:7], ShapeError, "10 samples but Y has 7"),
    (numpy.array([0, 1, 2, 3, 0, 1, 2, 0, 1, 2]), DataError, "out of range"),
    (numpy.array([0, 1, 2, -1, 0, 1, 2, 0, 1, 2]), DataError, "out of range"),
    (LABELS + 0.5, DataError, "whole numbers"),
    (numpy.array(["a"] * 10), DataTypeError, "integers"),
    (numpy.eye(4)[LABELS], ShapeError, "n_out=3"),
    (numpy.zeros((10, 3, 1)), ShapeError, "needs"),
    (numpy.full((10, 3), numpy.nan), DataError, "NaN"),
    (numpy.full((10, 3), 0.5), DataError, "sum to 1"),
    ([[1, 2], [3]] * 5, DataTypeError, "cannot be read"),
    (None, DataError, "None"),
])
def test_bad_targets_cross_entropy(device, Y, err, match):
    net = make(device)
    with pytest.raises(err, match=match):
        net.fit(X, Y, loss="cross_entropy", epochs=1)
    usable(net, device)


def test_bad_targets_other_losses(device):
    net = make(device, out="sigmoid", n_out=1)
    with pytest.raises(DataError, match="probabilities"):
        net.fit(X, numpy.full(10, 2.0), loss="binary_cross_entropy", epochs=1)
    with pytest.raises(ShapeError):
        net.fit(X, numpy.zeros((10, 2)), loss="squared_error", epochs=1)
    net.fit(X, numpy.ones(10), loss="squared_error", epochs=1)   # (n,) accepted when n_out == 1


# -- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_bad,match", [
    (lambda: gpunn.Dense(4, 5, "sigmod"), "Did you mean 'sigmoid'"),
    (lambda: gpunn.Dense(4, 5, "relu", init="xavir"), "Did you mean 'xavier'"),
    (lambda: gpunn.Dense(0, 5), "positive integer"),
    (lambda: gpunn.Dense(4, 2.5), "positive integer"),
    (lambda: gpunn.activations.LeakyReLU(alpha=-1), "alpha"),
    (lambda: gpunn.activations.ELU(a=0), "positive"),
    (lambda: gpunn.Sequential([gpunn.Dense(4, 5), gpunn.Dense(6, 2)]), "chain"),
    (lambda: gpunn.Sequential([]), "at least one layer"),
    (lambda: gpunn.Sequential([gpunn.Dense(4, 5, "softmax"), gpunn.Dense(5, 2)], device="cpu"), "last layer"),
    (lambda: gpunn.Sequential([gpunn.Dense(4, 5)], device="cpu", dtype="float16"), "float32"),
    (lambda: gpunn.Sequential([gpunn.Dense(4, 5)], device="cpu", dtype="int64"), "float32"),
    (lambda: gpunn.SGD(lr=0), "lr"), (lambda: gpunn.SGD(lr=-1), "lr"), (lambda: gpunn.SGD(lr=float("nan")), "lr"),
    (lambda: gpunn.SGD(lr=float("inf")), "lr"), (lambda: gpunn.SGD(lr=0.1, momentum=1.0), "momentum"),
    (lambda: gpunn.SGD(lr=0.1, momentum=-0.1), "momentum"), (lambda: gpunn.SGD(lr=0.1, nesterov=True), "nesterov"),
    (lambda: gpunn.Adam(lr=0.1, betas=(0.9, 1.0)), "beta2"), (lambda: gpunn.optim.get("adma"), "Did you mean 'adam'"),
    (lambda: gpunn.losses.get("cross_entropi"), "Did you mean 'cross_entropy'"),
])
def test_configuration_errors(make_bad, match):
    with pytest.raises(ConfigError if match != "chain" else ShapeError, match=match):
        make_bad()


def test_loss_must_suit_the_output_activation(device):
    net = gpunn.Sequential([gpunn.Dense(4, 3, "relu")], device=device, seed=0)
    with pytest.raises(ConfigError, match="softmax"):
        net.fit(X, LABELS, loss="cross_entropy", epochs=1)
    with pytest.raises(ConfigError, match="sigmoid"):
        net.fit(X, numpy.zeros((10, 3)), loss="binary_cross_entropy", epochs=1)


@pytest.mark.parametrize("kw,match", [({"batch_size": 0}, "batch_size"), ({"batch_size": -3}, "batch_size"),
                                      ({"epochs": -1}, "epochs"), ({"epochs": 2.5}, "epochs"),
                                      ({"patience": 0}, "patience"), ({"validation_data": (X,)}, "pair")])
def test_fit_argument_errors(device, kw, match):
    net = make(device)
    with pytest.raises(ConfigError, match=match):
        net.fit(X, LABELS, loss="cross_entropy", **{"epochs": 1, **kw})


def test_backward_before_forward_and_wrong_batch(device):
    net = make(device)
    with pytest.raises(ConfigError, match="forward"):
        net.backward(LABELS, "cross_entropy")
    net.forward(X)
    with pytest.raises(ShapeError, match="10 samples"):
        net.backward(LABELS[:4], "cross_entropy")
    net.backward(LABELS, "cross_entropy")


def test_batch_larger_than_data_trains_full_batch(device):
    net = make(device)
    h = net.fit(X, LABELS, loss="cross_entropy", epochs=2, batch_size=1000)
    assert len(h) == 2


def test_zero_epochs_is_a_no_op(device):
    net = make(device)
    before = host(net.flat_parameters()).copy()
    assert len(net.fit(X, LABELS, loss="cross_entropy", epochs=0)) == 0
    numpy.testing.assert_array_equal(before, host(net.flat_parameters()))


# -- devices ------------------------------------------------------------------------------------------
def test_cuda_where_there_is_none():
    if gpunn.cuda_unavailable_reason() is None:
        pytest.skip("a GPU is usable here")
    with pytest.raises(DeviceError, match="cuda:0"):
        make("cuda")


def test_mixed_numpy_and_cupy_in_one_call(monkeypatch):
    import sys
    import types

    from helpers import FakeCupyArray
    monkeypatch.setitem(sys.modules, "cupy", sys.modules.get("cupy") or types.ModuleType("cupy"))
    net = make()
    with pytest.raises(DeviceError, match="mixed"):
        net.fit(X, FakeCupyArray(0), loss="cross_entropy")
    with pytest.raises(DeviceError, match="mixed"):
        net.evaluate(X, FakeCupyArray(0))


@pytest.mark.gpu
def test_array_on_another_gpu_than_the_model():
    if len(gpunn.available_devices()) < 3:
        pytest.skip("needs two GPUs")
    net = make("cuda:0")
    x1 = gpunn.get_device("cuda:1").asarray(X)
    with pytest.raises(DeviceError, match="cuda:1"):
        net.predict(x1)


def test_cupy_out_of_memory_becomes_a_clear_error(monkeypatch):
    class OutOfMemoryError(Exception):   # the shape of cupy.cuda.memory.OutOfMemoryError
        pass
    OutOfMemoryError.__module__ = "cupy.cuda.memory"
    net = make()

    def boom(*a, **k):
        raise OutOfMemoryError("Out of memory allocating 4,294,967,296 bytes (allocated so far: 0 bytes).")
    monkeypatch.setattr(net, "train_step", boom)
    with pytest.raises(gpunn.OutOfMemoryError, match="batch_size=64.*4,294,967,296 bytes") as exc:
        net.fit(X, LABELS, loss="cross_entropy", batch_size=64)
    assert isinstance(exc.value, MemoryError) and issubclass(OutOfMemoryError, Exception)


@pytest.mark.gpu
def test_real_gpu_out_of_memory(device):
    if not device.is_cuda or fakecupy.is_fake(device):
        pytest.skip("needs a real GPU's memory")
    cp = device.xp
    free = cp.cuda.runtime.memGetInfo()[0]
    n = int(free // (4 * 4096 * 4))     # X takes a quarter of free memory; the layer buffers cannot fit
    net = gpunn.Sequential([gpunn.Dense(4096, 4096, "relu"), gpunn.Dense(4096, 4096, "relu"),
                            gpunn.Dense(4096, 2, "softmax")], device=device, seed=0)
    try:
        x = cp.zeros((n, 4096), "float32")
        y = cp.zeros(n, "int64")
        with pytest.raises(OutOfMemoryError, match=f"batch_size={n}") as exc:
            net.fit(x, y, loss="cross_entropy", batch_size=n, epochs=1)
        assert "bytes" in str(exc.value)
    finally:
        del x, y
        cp.get_default_memory_pool().free_all_blocks()


# -- training faults ----------------------------------------------------------------------------------
def test_divergence_names_epoch_and_step_and_keeps_finite_weights(device):
    g = rng(2)
    Xd = g.normal(size=(64, 4)) * 100
    Yd = g.normal(size=(64, 2)) * 100
    net = gpunn.Sequential([gpunn.Dense(4, 8, "identity"), gpunn.Dense(8, 2, "identity")], device=device,
                           seed=0)
    with pytest.raises(DivergenceError, match=r"epoch \d+, step \d+") as exc:
        net.fit(Xd, Yd, loss="squared_error", optimizer=gpunn.SGD(lr=1.0), epochs=50, batch_size=8)
    assert isinstance(exc.value, FloatingPointError)
    p = host(net.flat_parameters())
    assert numpy.all(numpy.isfinite(p))
    assert numpy.all(numpy.isfinite(host(net.predict(Xd))))
    assert all(numpy.isfinite(r["loss"]) for r in net.history.epochs)
    # the parameters are those that gave the last finite loss: the batch before the failing step
    epoch, step = map(int, re.search(r"epoch (\d+), step (\d+)", str(exc.value)).groups())
    if step > 1:
        assert numpy.isfinite(net.evaluate(Xd, Yd).loss)


def test_keyboard_interrupt_keeps_last_finished_epoch(device, monkeypatch):
    net = make(device)
    net.fit(X, LABELS, loss="cross_entropy", epochs=1, batch_size=2)   # warm buffers
    calls = {"n": 0}
    real = net.train_step

    def train_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:        # in the third epoch (5 steps per epoch)
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    records = []
    snapshots = []

    def progress(rec):
        records.append(rec)
        snapshots.append(host(net.flat_parameters()).copy())
    with monkeypatch.context() as m:
        m.setattr(net, "train_step", train_step)
        with pytest.raises(KeyboardInterrupt):
            net.fit(X, LABELS, loss="cross_entropy", epochs=5, batch_size=2, progress=progress)
    assert len(net.history) == 2 and len(records) == 2
    numpy.testing.assert_array_equal(host(net.flat_parameters()), snapshots[-1])
    usable(net, device)


def test_patience_stops_and_restores_best(device):
    g = rng(4)
    Xt, yt = g.normal(size=(40, 4)), g.integers(0, 3, size=40)
    Xv, yv = g.normal(size=(20, 4)), g.integers(0, 3, size=20)   # noise: validation loss soon rises
    net = make(device)
    h = net.fit(Xt, yt, loss="cross_entropy", optimizer=gpunn.Adam(lr=0.05), epochs=200, batch_size=8,
                validation_data=(Xv, yv), patience=3)
    assert h.stopped_early and len(h) < 200
    best = min(h.val_loss)
    assert h.val_loss[h.best_epoch - 1] == best
    assert net.evaluate(Xv, yv).loss == pytest.approx(best, rel=1e-5)


def test_network_helpers():
    assert network._n_samples([1, 2, 3]) == 3 and network._n_samples(3) == 0


# -- divergence: the weights after fit are finite and are the last ones whose loss was finite ---------
def _replayed(device, dtype, X, Y, steps, lr, batch_size):
    """Independent replay: a fresh network, ``steps`` train_step calls over the batches in order."""
    net = gpunn.Sequential([gpunn.Dense(4, 8, "identity"), gpunn.Dense(8, 2, "identity")], device=device,
                           dtype=dtype, seed=0)
    opt = gpunn.SGD(lr=lr)
    n_batches = -(-len(X) // batch_size)
    losses = []
    for g in range(steps + 1):
        b = g % n_batches
        xb, yb = X[b * batch_size:(b + 1) * batch_size], Y[b * batch_size:(b + 1) * batch_size]
        before = host(net.flat_parameters())
        with numpy.errstate(all="ignore"):
            losses.append(float(net.train_step(xb, yb, "squared_error", opt)))
    return before, losses


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch_size", [8, 64], ids=["8-steps-per-epoch", "1-step-per-epoch"])
def test_divergence_leaves_exactly_the_last_finite_state(device, dtype, batch_size):
    g = rng(2)
    X, Y = g.normal(size=(64, 4)) * 10, g.normal(size=(64, 2)) * 10
    lr = 0.35 if batch_size == 8 else 0.3
    net = gpunn.Sequential([gpunn.Dense(4, 8, "identity"), gpunn.Dense(8, 2, "identity")], device=device,
                           dtype=dtype, seed=0)
    with pytest.raises(DivergenceError) as exc:
        net.fit(X, Y, loss="squared_error", optimizer=gpunn.SGD(lr=lr), epochs=400, batch_size=batch_size,
                shuffle=False)
    epoch, step = map(int, re.search(r"epoch (\d+), step (\d+)", str(exc.value)).groups())
    failing = (epoch - 1) * (64 // batch_size) + step - 1            # 0-based global index of the failing step
    assert "loss became" in str(exc.value) and failing >= 1
    params, losses = _replayed(device, dtype, X, Y, failing - 1, lr, batch_size)
    assert numpy.isfinite(losses[-1]), losses[-3:]                    # the state left has a finite loss ...
    numpy.testing.assert_array_equal(host(net.flat_parameters()), params)   # ... and it is exactly that state
    _, more = _replayed(device, dtype, X, Y, failing, lr, batch_size)
    assert not numpy.isfinite(more[-1])                               # and the step named is the one that failed


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_last_update_that_overflows_is_caught(device, dtype):
    """All losses finite, but the epoch's last update makes the weights infinite: fit must not return them."""
    g = rng(5)
    X, Y = g.normal(size=(16, 4)) * 10, g.normal(size=(16, 2)) * 10
    net = gpunn.Sequential([gpunn.Dense(4, 8, "identity"), gpunn.Dense(8, 2, "identity")], device=device,
                           dtype=dtype, seed=0)
    start = host(net.flat_parameters())
    lr = float(numpy.finfo(dtype).max) / 4         # η·∂E/∂w overflows wherever |∂E/∂w| > 4
    with pytest.raises(DivergenceError, match=r"weights became non-finite in the update of epoch 1, step 1"):
        net.fit(X, Y, loss="squared_error", optimizer=gpunn.SGD(lr=lr), epochs=1, batch_size=16)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), start)


def test_an_infinite_validation_loss_stops_training(device):
    g = rng(6)
    X, Y = g.normal(size=(32, 4)), g.normal(size=(32, 2))
    Xv = numpy.full((4, 4), 1e30)                                    # finite, but z·z overflows float32
    net = gpunn.Sequential([gpunn.Dense(4, 8, "identity"), gpunn.Dense(8, 2, "identity")], device=device,
                           seed=0)
    with pytest.raises(DivergenceError, match="validation loss became infinite at epoch 1"):
        net.fit(X, Y, loss="squared_error", epochs=3, batch_size=8, validation_data=(Xv, Y[:4]))
    assert numpy.all(numpy.isfinite(host(net.flat_parameters())))
    assert len(net.history) == 0


# -- API edges: gpunn errors, never raw ones ---------------------------------------------------------
@pytest.mark.parametrize("call,err,match", [
    (lambda: gpunn.activations.LeakyReLU(alpha="abc"), gpunn.ConfigError, "must be a number"),
    (lambda: gpunn.activations.ELU(a="x"), gpunn.ConfigError, "must be a number"),
    (lambda: gpunn.activations.ELU(a=True), gpunn.ConfigError, "must be a number"),
    (lambda: gpunn.Dense(True, 3), gpunn.ConfigError, "positive integer"),
    (lambda: gpunn.datasets.train_test_split(X, LABELS, test_size=float("nan")), gpunn.ConfigError, "test_size"),
    (lambda: gpunn.datasets.train_test_split(X, LABELS, test_size="0.2"), gpunn.ConfigError, "test_size"),
    (lambda: gpunn.datasets.train_test_split(X, LABELS, test_size=None), gpunn.ConfigError, "test_size"),
    (lambda: gpunn.datasets.train_test_split(X, LABELS, test_size=1.5), gpunn.ConfigError, "test_size"),
    (lambda: gpunn.activations.get("softmax")(numpy.zeros((2, 2, 2))), gpunn.ShapeError, "rows"),
])
def test_api_edges_raise_gpunn_errors(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, None, "8"])
def test_predict_batch_size_is_checked(batch_size):
    with pytest.raises(gpunn.ConfigError, match="batch_size"):
        make("cpu").predict(X, batch_size=batch_size)


def test_api_edges_that_now_work():
    layer = gpunn.Dense(numpy.int64(4), numpy.int32(3), "softmax")       # NumPy integers are integers
    assert (layer.n_in, layer.n_out) == (4, 3) and type(layer.n_in) is int
    p = gpunn.activations.get("softmax")(numpy.array([1.0, 2.0, 3.0]))   # a 1-D array is one row
    numpy.testing.assert_allclose(p, numpy.exp([1, 2, 3]) / numpy.exp([1, 2, 3]).sum())
    assert gpunn.datasets.train_test_split(X, LABELS, test_size=numpy.float32(0.5))[1].shape[0] == 5


def test_a_huge_float_label_is_reported_as_it_is():
    with pytest.raises(gpunn.DataError, match=r"class label 1e\+20 in Y is out of range"):
        make("cpu").fit(X, numpy.array([1e20] + [0.0] * 9), loss="cross_entropy", epochs=1)
