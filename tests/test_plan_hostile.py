"""The bound training step (gpunn.backprop.StepPlan) and its neighbours against hostile use: parts changed
between steps (an activation's parameter, a loss instance's method, the optimiser's momentum), custom
subclasses, and degenerate batches. Each test compares the numba kernels with the NumPy reference
(``fused=False``), or ``train_step`` with the step done operation by operation, bit for bit."""
from __future__ import annotations

import copy

import numpy
import pytest

import gpunn
from gpunn import cpukernels, losses, optim
from gpunn.errors import GpunnError
from helpers import rng


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Two networks compared step by step must run their products on the same BLAS threads."""
    from gpunn import threads
    threads.set_threads(1)
    yield
    threads.set_threads(None)


def bits(a) -> bytes:
    return numpy.ascontiguousarray(gpunn.to_host(a)).tobytes()


def needs_kernels():
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")


def data(sizes, n_in, n_out, seed=0, dtype="float32"):
    g = rng(seed)
    return [(g.normal(size=(n, n_in)).astype(dtype), g.uniform(size=(n, n_out)).astype(dtype)) for n in sizes]


@pytest.mark.parametrize("act, attr, value", [({"name": "leaky_relu", "alpha": 0.1}, "alpha", 0.6),
                                              ({"name": "elu", "a": 0.5}, "a", 2.0)])
def test_activation_parameter_changed_between_steps_reaches_the_kernels(act, attr, value):
    """α of leaky ReLU and a of ELU are assignable (Checked): a step after the change must use the new
    value on the numba kernels as the reference does, not the constants bound at the first step."""
    needs_kernels()
    nets = [gpunn.mlp([4, 6, 2], activation=act, output="identity", seed=1, fused=f, device="cpu")
            for f in (True, False)]
    opts = [gpunn.SGD(lr=0.05), gpunn.SGD(lr=0.05)]
    for k, (x, t) in enumerate(data([5, 5, 3, 5], 4, 2)):
        if k == 1:
            for net in nets:
                setattr(net.layers[0].activation, attr, value)
        for net, opt in zip(nets, opts):
            net.train_step(x, t, "squared_error", opt)
        assert bits(nets[0].flat_parameters()) == bits(nets[1].flat_parameters()), k
        for net in nets:        # and the step made operation by operation (no plan) sees it too
            net.forward(x)
        assert bits(nets[0].layers[0].y) == bits(nets[1].layers[0].y), k


@pytest.mark.parametrize("fused", [False, True])
def test_empty_batch_of_model_arrays_is_a_gpunn_error(fused):
    """A (0, n_in) batch already of the model's dtype takes the fast path of the step's checks: it must
    still be refused as an empty X (DataError), not fail with Python's ZeroDivisionError."""
    net = gpunn.mlp([4, 6, 2], seed=1, fused=fused, device="cpu")
    x, t = numpy.zeros((0, 4), net.dtype), numpy.zeros((0, 2), net.dtype)
    for call in (lambda: net.train_step(x, t, "squared_error", gpunn.SGD(lr=0.1)),
                 lambda: net.gradients(x, t, "squared_error")):
        with pytest.raises(GpunnError, match="empty"):
            call()


@pytest.mark.parametrize("fused", [False, True])
def test_squared_error_instance_with_its_own_backward_is_honoured(fused):
    """A SquaredError instance whose backward was replaced (before or after its first step) is that
    backward, on the kernels as on the reference: the bound squared-error kernel is for the class's own."""
    if fused:
        needs_kernels()
    net = gpunn.mlp([4, 6, 2], seed=1, fused=fused, device="cpu")
    (x, t), = data([5], 4, 2)
    plain = float(net.gradients(x, t, losses.SquaredError()))
    early = losses.SquaredError()
    early.backward = lambda layer, t, grad_y, delta: (lambda v, d: (v * 3.0, d))(
        *losses.SquaredError.backward(early, layer, t, grad_y, delta))
    assert float(net.gradients(x, t, early)) == pytest.approx(3 * plain, rel=1e-6)
    late = losses.SquaredError()
    assert float(net.gradients(x, t, late)) == plain      # a plan is bound for this object now
    late.backward = early.backward
    assert float(net.gradients(x, t, late)) == pytest.approx(3 * plain, rel=1e-6)


def test_sgd_subclass_that_does_not_set_every_hyperparameter_still_steps():
    """An SGD subclass whose __init__ leaves momentum, nesterov and weight_decay at their defaults (the
    descriptors' None, read as off) steps as plain SGD, as it did before the update read __dict__."""
    class PlainSGD(gpunn.SGD):
        name = "test_plan_hostile.plain_sgd"

        def __init__(self, lr):
            optim.Optimizer.__init__(self)
            self.lr = lr

    a = gpunn.mlp([4, 6, 2], seed=1, device="cpu")
    b = copy.deepcopy(a)
    for x, t in data([5, 3], 4, 2):
        a.train_step(x, t, "squared_error", PlainSGD(lr=0.1))
        b.train_step(x, t, "squared_error", gpunn.SGD(lr=0.1))
    assert bits(a.flat_parameters()) == bits(b.flat_parameters())


def test_momentum_switched_off_and_on_again_kernels_equal_reference():
    """Momentum on, then off (the velocity must neither move nor steer), then on again (its velocity
    starts at zero, as for momentum first switched on): the numba kernels equal the reference."""
    needs_kernels()

    def run(fused):
        net = gpunn.mlp([4, 6, 3], seed=1, fused=fused, device="cpu")
        opt = gpunn.SGD(lr=0.1)
        out = []
        for k, (x, t) in enumerate(data([5, 1, 3, 5, 2, 7, 1, 4], 4, 3)):
            opt.momentum = {2: 0.5, 4: 0.0, 6: 0.5}.get(k, opt.momentum)
            net.train_step(x, t, "squared_error", opt)
            out.append(bits(net.flat_parameters()))
        return out

    fused, reference = run(True), run(False)
    assert [a == b for a, b in zip(fused, reference)] == [True] * len(fused)


def test_momentum_switched_on_again_starts_from_zero():
    """Off then on again: from there the same steps as an optimiser whose momentum is first switched on."""
    a = gpunn.mlp([4, 6, 3], seed=1, fused=False, device="cpu")
    oa = gpunn.SGD(lr=0.1, momentum=0.5)
    batches = data([5, 5, 5, 5], 4, 3)
    a.train_step(*batches[0], "squared_error", oa)          # velocity made
    oa.momentum = 0.0
    b, ob = copy.deepcopy(a), gpunn.SGD(lr=0.1)              # b: never had a velocity
    for k, (x, t) in enumerate(batches[1:]):
        if k == 1:
            oa.momentum = ob.momentum = 0.5
        a.train_step(x, t, "squared_error", oa)
        b.train_step(x, t, "squared_error", ob)
    assert bits(a.flat_parameters()) == bits(b.flat_parameters())


def test_restore_of_a_snapshot_taken_before_momentum_was_switched_on():
    """Roll back (Optimizer.restore) to a snapshot taken while momentum was off, after it was switched on
    and stepped: the velocity made since goes (the snapshot had none), and the next steps equal those of
    an optimiser that never left the snapshot (momentum switched on there, velocity from zero)."""
    a = gpunn.mlp([4, 6, 3], seed=1, fused=False, device="cpu")
    oa = gpunn.SGD(lr=0.1)
    batches = data([5, 5, 5, 5], 4, 3)
    a.train_step(*batches[0], "squared_error", oa)
    b, ob = copy.deepcopy(a), gpunn.SGD(lr=0.1)
    b.train_step(*batches[0], "squared_error", ob)
    b.flat_parameters()[...] = a.flat_parameters()
    snap, weights = oa.snapshot(), a.flat_parameters().copy()
    oa.momentum = 0.5
    a.train_step(*batches[1], "squared_error", oa)           # velocity made, then rolled back
    a.flat_parameters()[...] = weights
    oa.restore(snap)
    ob.momentum = 0.5
    for x, t in batches[2:]:
        a.train_step(x, t, "squared_error", oa)
        b.train_step(x, t, "squared_error", ob)
    assert bits(a.flat_parameters()) == bits(b.flat_parameters())


def test_fake_gpu_step_follows_parameter_and_momentum_changes(fake_gpu):
    """The CUDA path (fake CuPy, fused kernels emulated): train_step against forward + backward + update of
    a twin, through an activation parameter change, momentum off and on, and several batch sizes."""
    a = gpunn.mlp([4, 6, 3], activation={"name": "leaky_relu", "alpha": 0.1}, seed=1, device="cuda:0")
    b = copy.deepcopy(a)
    oa, ob = gpunn.SGD(lr=0.1, momentum=0.5), gpunn.SGD(lr=0.1, momentum=0.5)
    for k, (x, t) in enumerate(data([5, 1, 3, 5, 2, 5], 4, 3)):
        if k == 2:
            a.layers[0].activation.alpha = b.layers[0].activation.alpha = 0.4
        oa.momentum = ob.momentum = {3: 0.0, 4: 0.5}.get(k, oa.momentum)
        a.train_step(x, t, "squared_error", oa)
        b.forward(x)
        b.backward(t, "squared_error")
        b.update(ob)
        assert bits(a.flat_parameters()) == bits(b.flat_parameters()), k


@pytest.mark.parametrize("bad, error", [([0.0], "DataTypeError"), (numpy.zeros(1, "float64"), "DataTypeError"),
                                        (numpy.zeros(3, "float32"), "ShapeError"),
                                        (numpy.zeros((1, 1), "float32"), "ShapeError")])
def test_a_bad_out_is_refused_before_the_step(bad, error):
    """train_step/gradients write the loss into ``out``: anything but a one-element array of the model's
    dtype is a gpunn error, and the weights are untouched."""
    net = gpunn.mlp([4, 3, 2], output="sigmoid", seed=0, device="cpu", dtype="float32")
    before = net.flat_parameters().copy()
    x, t = numpy.zeros((2, 4), "float32"), numpy.zeros((2, 2), "float32")
    for call in (lambda: net.train_step(x, t, "squared_error", gpunn.SGD(lr=0.1), out=bad),
                 lambda: net.gradients(x, t, "squared_error", out=bad)):
        with pytest.raises(getattr(gpunn.errors, error), match="out must be a one-element float32 array"):
            call()
    assert numpy.array_equal(net.flat_parameters(), before)
