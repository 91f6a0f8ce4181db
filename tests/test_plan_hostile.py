"""The bound training step (gpunn.backprop.StepPlan) and its neighbours against hostile use: parts changed
between steps (an activation's parameter, a loss instance's method, the optimiser's momentum), custom
subclasses, and degenerate batches. Each test compares the numba kernels with the NumPy reference
(``fused=False``), or ``train_step`` with the step done operation by operation, bit for bit."""
from __future__ import annotations

import copy

import numpy
import pytest

import gpunn
from gpunn import cpukernels, losses, ops, optim
from gpunn.errors import GpunnError
from helpers import host, rng


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


PARAMETERISED = [({"name": "leaky_relu", "alpha": 0.1}, "alpha", 0.6), ({"name": "elu", "a": 0.5}, "a", 2.0)]


@pytest.mark.parametrize("sizes, change_at", [([5, 5, 3, 5], 1), ([5] * 5, 3)], ids=["sizes-vary", "steady"])
@pytest.mark.parametrize("act, attr, value", PARAMETERISED)
def test_activation_parameter_changed_between_steps_reaches_the_kernels(act, attr, value, sizes, change_at):
    """α of leaky ReLU and a of ELU are assignable (Checked): a step after the change must use the new
    value on the numba kernels as the reference does, not the constants bound at the first step. In
    steady steps of one batch size (every buffer made beforehand) nothing is noted in gpunn.ops.BINDINGS
    between the step before the change and the one after: only the plan's own check of α, a can see it."""
    needs_kernels()
    nets = [gpunn.mlp([4, 6, 2], activation=act, output="identity", seed=1, fused=f, device="cpu")
            for f in (True, False)]
    opts = [gpunn.SGD(lr=0.05), gpunn.SGD(lr=0.05)]
    for k, (x, t) in enumerate(data(sizes, 4, 2)):
        if k == change_at:
            for net in nets:
                setattr(net.layers[0].activation, attr, value)
        for net, opt in zip(nets, opts):
            net.train_step(x, t, "squared_error", opt)
        assert bits(nets[0].flat_parameters()) == bits(nets[1].flat_parameters()), k
    for net in nets:            # and the step made operation by operation (no plan) sees it too
        net.forward(x)
    assert bits(nets[0].layers[0].y) == bits(nets[1].layers[0].y)


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


def test_a_read_only_out_is_refused_before_the_step():
    net = gpunn.mlp([4, 3, 2], output="sigmoid", seed=0, device="cpu", dtype="float32")
    before = net.flat_parameters().copy()
    x, t = numpy.zeros((2, 4), "float32"), numpy.zeros((2, 2), "float32")
    out = numpy.zeros(1, "float32")
    out.flags.writeable = False
    for call in (lambda: net.train_step(x, t, "squared_error", gpunn.SGD(lr=0.1), out=out),
                 lambda: net.gradients(x, t, "squared_error", out=out)):
        with pytest.raises(gpunn.errors.DataError, match="out must be a writeable array"):
            call()
    assert numpy.array_equal(net.flat_parameters(), before)
    out.flags.writeable = True
    assert net.train_step(x, t, "squared_error", gpunn.SGD(lr=0.1), out=out) is out and out[0] > 0


# -- the plan of the last step, taken again without the full check (gpunn.ops.BINDINGS) --------------------------
def test_a_loss_given_its_own_backward_in_steady_steps_is_honoured_and_let_go():
    """The kernel bound for SquaredError's own backward, then the instance's backward assigned between two
    steps of the same batch size (nothing noted in BINDINGS in between), then deleted again."""
    needs_kernels()
    net = gpunn.mlp([4, 6, 2], seed=1, fused=True, device="cpu")
    (x, t), = data([5], 4, 2)
    loss = losses.SquaredError()
    plain = [float(net.gradients(x, t, loss)) for _ in range(2)]
    loss.backward = lambda layer, t, grad_y, delta: (lambda v, d: (v * 3.0, d))(
        *losses.SquaredError.backward(loss, layer, t, grad_y, delta))
    assert float(net.gradients(x, t, loss)) == pytest.approx(3 * plain[1], rel=1e-6)
    del loss.backward
    assert float(net.gradients(x, t, loss)) == plain[1] == plain[0]
    bound = net._backprop._last.loss_backward                 # the kernel's call again
    assert bound.__qualname__.startswith("CpuKernels.squared_error"), bound.__qualname__


def step_by_operations(net, x, t, loss, opt):
    net.forward(x)
    value = net.backward(t, loss)
    net.update(opt)
    return value


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_of_the_same_size_after_its_buffers_were_freed_binds_new_ones(fused):
    """A reader's forwards of other batch sizes free the buffers of the last step's size; the next step, of
    that same size, must bind the layers' new buffers (noted in BINDINGS), not run on the freed ones: the
    layers' own backward, which reads their current buffers, then sees the step's arrays."""
    if fused:
        needs_kernels()
    a = gpunn.mlp([5, 6, 3], activation="tanh", output="softmax", seed=4, fused=fused, device="cpu")
    b = copy.deepcopy(a)
    opt_a, opt_b = gpunn.SGD(lr=0.1), gpunn.SGD(lr=0.1)
    g = rng(3)
    x, t = g.normal(size=(5, 5)), numpy.eye(3)[g.integers(0, 3, size=5)]
    for k in range(3):
        a.train_step(x, t, "cross_entropy", opt_a)
        step_by_operations(b, x, t, "cross_entropy", opt_b)
        assert bits(a.flat_parameters()) == bits(b.flat_parameters()), k
        a.backward(t, "cross_entropy")
        b.backward(t, "cross_entropy")
        assert bits(a.flat_gradients()) == bits(b.flat_gradients()), k
        for m in (8, 9, 10, 11):            # more sizes than a layer keeps: the step's buffers go
            a.forward(numpy.zeros((m, 5)))
            b.forward(numpy.zeros((m, 5)))


def test_every_change_of_a_layers_buffers_or_an_ops_calls_is_noted():
    """What StepPlan's one comparison relies on: each change of ``buffer_epoch`` (buffers made, or all dropped
    with new parameters) and of ``ops.generation`` draws a new BINDINGS value; reusing buffers draws none."""
    from gpunn.ops import BINDINGS
    net = gpunn.mlp([4, 6, 2], seed=1, fused=False, device="cpu")
    layer, seen = net.layers[0], set()

    def changed(action):
        before, epoch = BINDINGS.value, layer.buffer_epoch
        action()
        assert (BINDINGS.value != before) == (layer.buffer_epoch != epoch)
        assert BINDINGS.value not in seen or BINDINGS.value == before
        seen.add(BINDINGS.value)
        return BINDINGS.value != before

    assert changed(lambda: layer.buffers(net.xp, 7))                  # made
    assert not changed(lambda: layer.buffers(net.xp, 7))              # the same ones again
    assert changed(lambda: layer.bind(layer.W, layer.b, layer.grad_W, layer.grad_b))     # all dropped
    assert changed(lambda: layer.buffers(net.xp, 7))
    if cpukernels.available():
        lazy = ops.CpuFusedOps(gpunn.Device("cpu"), lazy=True)
        lazy.kernels = None
        before, generation = BINDINGS.value, lazy.generation
        lazy.warm_up()
        assert lazy.generation != generation and BINDINGS.value != before


def test_bindings_values_never_come_back():
    """Each note draws the next number of one count, from several threads at once too: no draw is lost or
    repeated, so a value once replaced is never stored again."""
    import threading
    changes = ops.Changes()
    assert changes.value == 0
    values = []
    for _ in range(3):
        changes.note()
        values.append(changes.value)
    assert values == [1, 2, 3]

    def note_many():
        for _ in range(2000):
            changes.note()
    workers = [threading.Thread(target=note_many) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    changes.note()
    assert changes.value == 3 + 4 * 2000 + 1


def test_a_plan_found_current_after_another_networks_change_is_kept():
    """Another network's new buffers are noted in BINDINGS too: the next step checks its plan in full, keeps it
    (nothing of its own changed) and takes the new value as seen, so the steps after take it in one comparison."""
    from gpunn.ops import BINDINGS
    a, b = (gpunn.mlp([4, 6, 2], seed=s, device="cpu") for s in (1, 2))
    (x, t), = data([5], 4, 2)
    opt = gpunn.SGD(lr=0.1)
    a.train_step(x, t, "squared_error", opt)
    plan = a._backprop._last
    b.forward(x)                                # b's buffers made: a new value
    assert plan.seen != BINDINGS.value
    a.train_step(x, t, "squared_error", opt)
    assert a._backprop._last is plan and plan.seen == BINDINGS.value


def test_a_cross_entropy_given_its_own_fused_form_in_steady_steps_is_honoured_and_let_go():
    """The cross-entropy bound after a softmax (CpuKernels.bound_cross_entropy), then the instance's own
    fused_backward assigned between two steps of the same batch size: the next step calls it (as the
    unbound path, CpuFusedOps.loss_backward, does); deleted again, the bound call comes back."""
    needs_kernels()
    net = gpunn.mlp([4, 6, 3], seed=1, output="softmax", fused=True, device="cpu")
    g = rng(2)
    x, t = g.normal(size=(5, 4)).astype("float32"), numpy.eye(3, dtype="float32")[g.integers(0, 3, size=5)]
    loss = losses.CrossEntropy()
    plain = [float(net.gradients(x, t, loss)) for _ in range(2)]
    assert "bound_cross_entropy" in net._backprop._last.loss_backward.__qualname__
    calls = []
    loss.fused_backward = lambda *args: calls.append(1) or False        # declines: the loss's backward runs
    assert float(net.gradients(x, t, loss)) == plain[1] and calls == [1]
    del loss.fused_backward
    assert float(net.gradients(x, t, loss)) == plain[1] and calls == [1]
    assert "bound_cross_entropy" in net._backprop._last.loss_backward.__qualname__


# -- a user's own method where a fused kernel would run: the kernel must give way --------------------------------
class TripledCrossEntropy(losses.CrossEntropy):
    """A cross-entropy subclass with a backward of its own (value and δ tripled): the fused softmax +
    cross-entropy kernels compute CrossEntropy.backward's formula, not this one."""

    name = "test_plan_hostile.tripled_cross_entropy"

    def backward(self, layer, t, grad_y, delta):
        value, direct = super().backward(layer, t, grad_y, delta)
        delta *= 3.0
        return value * 3.0, direct


def tripled(loss, base=losses.CrossEntropy):
    """``loss`` with an instance backward of its own: base's, its value and δ tripled."""
    def backward(layer, t, grad_y, delta):
        value, direct = base.backward(loss, layer, t, grad_y, delta)
        (delta if direct else grad_y)[...] *= 3.0
        return value * 3.0, direct
    loss.backward = backward
    return loss


class HalvedSoftmax(gpunn.activations.Softmax):
    """A softmax of z/2 (z halved in place, as its forward's own choice): not the softmax kernel's. Its
    ``name`` is Softmax's (what the cross-entropy checks), its key its own (module.QualName)."""

    def forward(self, z, out, rowstats=None):
        z *= 0.5
        return super().forward(z, out, rowstats)


def agree(device, a, b):
    """The fused and the unfused run give the same numbers: bit for bit on the CPU (the numba kernels equal
    NumPy), to rounding on the CUDA path (its kernels round transcendental functions their own way)."""
    a, b = host(a), host(b)
    if device.is_cuda:
        numpy.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    else:
        assert bits(a) == bits(b)


def twins(device, output="softmax", hidden="sigmoid"):
    """The same float64 network fused and unfused on ``device`` (the numba kernels loaded at once on the CPU)."""
    if not device.is_cuda:
        needs_kernels()
    return [gpunn.mlp([4, 6, 3], activation=hidden, output=output, seed=1, fused=f, device=device, dtype="float64")
            for f in (True, False)]


def one_hot(n, classes=3, seed=2):
    g = rng(seed)
    return g.normal(size=(n, 4)), numpy.eye(classes)[g.integers(0, classes, size=n)]


def every_path(nets, loss, batches, device):
    """train_step (the bound plan), gradients, then forward + backward (the ops called one by one) on each
    net; every loss value, gradient and weight of the fused net agrees with the unfused one's."""
    opts = [gpunn.SGD(lr=0.1, momentum=0.5) for _ in nets]
    for x, t in batches:
        agree(device, *(net.train_step(x, t, loss, opt) for net, opt in zip(nets, opts)))
        agree(device, *(net.flat_parameters() for net in nets))
    x, t = batches[-1]
    agree(device, *(net.gradients(x, t, loss) for net in nets))
    agree(device, *(net.flat_gradients() for net in nets))
    for net in nets:
        net.forward(x)
    agree(device, *(net.backward(t, loss) for net in nets))
    agree(device, *(net.flat_gradients() for net in nets))


@pytest.mark.parametrize("how", ["subclass", "instance"])
def test_a_cross_entropy_with_its_own_backward_runs_it_on_every_fused_path(device, how):
    """The fused paths (the CPU's bound plan and its ops, the CUDA FusedOps) recognise the cross-entropy after a
    softmax and run its δ as a kernel: a subclass's or an instance's own backward must run instead."""
    nets = twins(device)
    loss = TripledCrossEntropy() if how == "subclass" else tripled(losses.CrossEntropy())
    batches = [one_hot(n) for n in (5, 5, 3)]
    every_path(nets, loss, batches, device)
    x, t = batches[0]
    plain = float(nets[1].gradients(x, t, losses.CrossEntropy()))
    assert float(nets[0].gradients(x, t, loss)) == pytest.approx(3 * plain, rel=1e-12)


def test_a_squared_error_instance_with_its_own_backward_runs_it_on_every_fused_path(device):
    nets = twins(device, output="sigmoid")
    every_path(nets, tripled(losses.SquaredError(), losses.SquaredError),
               [(x, t * 0.5) for x, t in (one_hot(n) for n in (5, 5, 3))], device)


def own_method(act, method):
    """``act`` given an instance ``method`` of its own, doubling what its class's gives."""
    own = getattr(type(act), method)

    def doubled(*args, **kwargs):
        result = own(act, *args, **kwargs)
        result *= 2.0
        return result
    setattr(act, method, doubled)
    return act


@pytest.mark.parametrize("method", ["forward", "backward", "derivative"])
@pytest.mark.parametrize("hidden", ["sigmoid", "relu", {"name": "elu", "a": 0.5}, "tanh"], ids=str)
def test_an_activation_instance_with_its_own_method_runs_it_on_every_fused_path(device, hidden, method):
    """A hidden activation given its own forward, backward or derivative (the base class's backward calls
    derivative) on the instance, before the first step: the fused kernels that run f or δ = f′ ⊙ g in its
    place must give way to it, on the CPU's plan and ops and on the CUDA path."""
    nets = twins(device, hidden=hidden)
    for net in nets:
        own_method(net.layers[0].activation, method)
    every_path(nets, "cross_entropy", [one_hot(n) for n in (5, 5, 3)], device)


@pytest.mark.parametrize("method", ["forward", "backward"])
def test_an_activation_method_assigned_or_deleted_between_steady_steps_is_followed(device, method):
    """An activation's own method assigned between two steps of one batch size (the plan of the last step is
    taken again while nothing noted in gpunn.ops.BINDINGS changed), then deleted again: each step runs what
    the instance has then."""
    nets = twins(device)
    opts = [gpunn.SGD(lr=0.1) for _ in nets]
    x, t = one_hot(5)
    for k in range(5):
        for net in nets:
            act = net.layers[0].activation
            if k == 2:
                own_method(act, method)
            elif k == 4:
                delattr(act, method)
        agree(device, *(net.train_step(x, t, "cross_entropy", opt) for net, opt in zip(nets, opts)))
        agree(device, *(net.flat_parameters() for net in nets))


def test_a_softmax_subclass_with_its_own_forward_runs_it_on_every_fused_path(device):
    """The softmax kernels (CUDA: any row-wise activation was taken for a softmax) compute Softmax.forward:
    a subclass's own forward must run instead, its loss and δ following from it."""
    nets = twins(device, output=HalvedSoftmax())
    every_path(nets, "cross_entropy", [one_hot(n) for n in (5, 5, 3)], device)
