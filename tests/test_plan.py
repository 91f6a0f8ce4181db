"""The training step as bound calls (gpunn.backprop.StepPlan) against the step done operation by operation.

A plan binds, once per batch size and loss, the same operations that ``forward`` and ``backward`` make,
so ``train_step`` must leave the very bits that ``forward`` + ``backward`` + ``step`` leave on a twin
network, on every backend and ops (reference, numba kernels, the CUDA path on the fake CuPy), and must
be made again whenever what it bound changes: the CPU kernels loading mid-run, a layer's buffers freed
by other batch sizes, new parameters. NumPy's ``dot`` (the plan's and the layers' product on the CPU) is
checked bit for bit against NumPy's ``matmul`` it replaced, at the shapes a step uses.
"""
from __future__ import annotations

import copy

import numpy
import pytest

import gpunn
from gpunn import cpukernels, ops
from gpunn.layers import MAX_BATCH_SIZES
from helpers import rng


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Twins alternate steps: their BLAS threads must not change between them (the auto policy follows
    the load, and OpenBLAS's last bits follow the threads)."""
    from gpunn import threads
    threads.set_threads(1)
    yield
    threads.set_threads(None)


def same_bits(a, b) -> bool:
    a, b = numpy.ascontiguousarray(gpunn.to_host(a)), numpy.ascontiguousarray(gpunn.to_host(b))
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def batch(n, n_in, n_out, seed, dtype, classes=False):
    g = rng(seed)
    x = g.normal(size=(n, n_in)).astype(dtype)
    if classes:
        return x, numpy.eye(n_out, dtype=dtype)[g.integers(0, n_out, size=n)]
    return x, g.uniform(size=(n, n_out)).astype(dtype)


def step_by_operations(net, x, t, loss, opt):
    """The step as the lecture writes it, one public method per step (forward, backward, update)."""
    net.forward(x)
    value = net.backward(t, loss)
    net.update(opt)
    return value


NETS = [([4, 8, 1], "sigmoid", "sigmoid", "squared_error"),
        ([6, 9, 7, 3], "tanh", "softmax", "cross_entropy"),
        ([5, 11, 4], "relu", "identity", "squared_error"),
        ([3, 10, 2], "softplus", "sigmoid", "binary_cross_entropy"),
        ([5, 7, 6, 4], {"name": "elu", "a": 0.5}, "softmax", "squared_error")]


@pytest.mark.parametrize("sizes, hidden, output, loss", NETS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("fused", [False, True])
def test_train_step_equals_forward_backward_update(sizes, hidden, output, loss, dtype, fused):
    if fused and not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    a = gpunn.mlp(sizes, activation=hidden, output=output, dtype=dtype, seed=2, fused=fused, device="cpu")
    b = copy.deepcopy(a)
    opt_a, opt_b = gpunn.SGD(lr=0.05, momentum=0.5), gpunn.SGD(lr=0.05, momentum=0.5)
    for k, n in enumerate([1, 5, 5, 33, 1, 5]):
        x, t = batch(n, sizes[0], sizes[-1], k, dtype, classes=output == "softmax")
        out = numpy.empty(1, dtype) if k % 2 else None      # the loss written into a buffer, as fit does
        va = a.train_step(x, t, loss, opt_a, out=out)
        assert va is out or out is None
        va = va[0] if out is not None else va
        vb = step_by_operations(b, x, t, loss, opt_b)
        assert same_bits(numpy.asarray(va), numpy.asarray(vb, dtype=dtype)), (k, va, vb)
        assert same_bits(a.flat_parameters(), b.flat_parameters()), k
        assert same_bits(a.flat_gradients(), b.flat_gradients()), k
        for la, lb in zip(a.layers, b.layers):          # what a reader sees after the step
            for name in ("x", "z", "y", "delta"):
                assert same_bits(getattr(la, name), getattr(lb, name)), (k, name)


SGD_SETTINGS = [{}, {"momentum": 0.5}, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.5, "weight_decay": 0.01},
                {"weight_decay": 0.02}]


@pytest.mark.parametrize("sizes, hidden, output, loss", NETS)
@pytest.mark.parametrize("settings", SGD_SETTINGS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_update_made_layer_by_layer_has_the_whole_updates_bits(sizes, hidden, output, loss, settings, dtype,
                                                                  monkeypatch):
    """Above SPLIT_UPDATE_BYTES a CPU step with the kernels updates each layer in the backward pass, as soon as
    its weights were last read: the same bits as the step done operation by operation (one update at the end),
    in parameters, gradients, velocity and the step count; every layer updated once per step."""
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    from gpunn.backprop import StepPlan
    monkeypatch.setattr(StepPlan, "SPLIT_UPDATE_BYTES", 0)
    a = gpunn.mlp(sizes, activation=hidden, output=output, dtype=dtype, seed=4, fused=True, device="cpu")
    b = copy.deepcopy(a)
    opt_a, opt_b = gpunn.SGD(lr=0.05, **settings), gpunn.SGD(lr=0.05, **settings)
    parts = []
    split = opt_a.split_update

    def counted(*args):
        part = split(*args)
        return lambda start, stop: (parts.append((start, stop)), part(start, stop))
    opt_a.split_update = counted
    for k, n in enumerate([1, 5, 33, 5]):
        x, t = batch(n, sizes[0], sizes[-1], k, dtype, classes=output == "softmax")
        va = a.train_step(x, t, loss, opt_a)
        vb = step_by_operations(b, x, t, loss, opt_b)
        assert same_bits(numpy.asarray(va), numpy.asarray(vb, dtype=dtype)), k
        assert same_bits(a.flat_parameters(), b.flat_parameters()), k
        assert same_bits(a.flat_gradients(), b.flat_gradients()), k
        assert opt_a.t == opt_b.t == k + 1
        for name in opt_b.state:
            assert same_bits(opt_a.state[name], opt_b.state[name]), (k, name)
        for la, lb in zip(a.layers, b.layers):
            assert same_bits(la.delta, lb.delta), k
    layers = [(w.start, bias.stop) for w, bias in a._backprop.store.layout]
    assert sorted(parts) == sorted(layers * 4)          # each layer once per step, nothing else


@pytest.mark.parametrize("split", [False, True])
def test_sgd_settings_given_as_numpy_float64_give_the_same_bits_fused_and_unfused(split, monkeypatch):
    """An SGD subclass whose momentum, weight decay and learning rate come from its own property and current_lr
    as NumPy float64 scalars: the kernels and the NumPy path use the same float (NumPy would compute a float32
    network's update in float64 with such a scalar; the kernels round it to float32 first)."""
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    from gpunn.backprop import StepPlan
    if split:
        monkeypatch.setattr(StepPlan, "SPLIT_UPDATE_BYTES", 0)

    class Float64Settings(gpunn.SGD):
        momentum = property(lambda self: numpy.float64(0.9), lambda self, v: None)
        weight_decay = property(lambda self: numpy.float64(0.003), lambda self, v: None)

        def current_lr(self):
            return numpy.float64(0.07) / (1 + self.t)
    nets = [gpunn.mlp([5, 7, 6, 4], activation="sigmoid", output="softmax", seed=1, device="cpu", fused=f)
            for f in (True, False)]
    opts = [Float64Settings(lr=0.07), Float64Settings(lr=0.07)]
    x, t = batch(9, 5, 4, 0, "float32", classes=True)
    for _ in range(3):
        for net, opt in zip(nets, opts):
            net.train_step(x, t, "cross_entropy", opt)
    assert same_bits(nets[0].flat_parameters(), nets[1].flat_parameters())
    assert same_bits(opts[0].state["velocity"], opts[1].state["velocity"])


@pytest.mark.parametrize("fused", [False, True])
def test_adam_on_a_net_above_the_split_size_updates_once_at_the_end(fused, monkeypatch):
    """Adam has no update in parts (Optimizer.split_update: None): a step above SPLIT_UPDATE_BYTES runs its update
    whole, the same bits as the step done operation by operation."""
    if fused and not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    from gpunn.backprop import StepPlan
    monkeypatch.setattr(StepPlan, "SPLIT_UPDATE_BYTES", 0)
    a = gpunn.mlp([5, 7, 6, 4], activation="relu", output="softmax", dtype="float32", seed=3, fused=fused,
                  device="cpu")
    b = copy.deepcopy(a)
    opt_a, opt_b = gpunn.Adam(lr=0.01, weight_decay=0.01), gpunn.Adam(lr=0.01, weight_decay=0.01)
    for k, n in enumerate([4, 9, 4]):
        x, t = batch(n, 5, 4, k, "float32", classes=True)
        a.train_step(x, t, "cross_entropy", opt_a)
        step_by_operations(b, x, t, "cross_entropy", opt_b)
        assert same_bits(a.flat_parameters(), b.flat_parameters()) and opt_a.t == opt_b.t == k + 1, k


def test_the_split_starts_at_split_update_bytes_and_plans_with_tuned_activations_are_kept(monkeypatch):
    """A parameter buffer of exactly SPLIT_UPDATE_BYTES is updated layer by layer, one byte short of it is not;
    a plan binding an activation's parameter (leaky ReLU's α) is taken again while α stays, made again when it
    changes."""
    from gpunn.backprop import StepPlan
    net = gpunn.mlp([5, 7, 6, 4], activation="leaky_relu", output="softmax", seed=1, device="cpu", fused=True)
    x, t = batch(6, 5, 4, 0, "float32", classes=True)
    opt = gpunn.SGD(lr=0.1)
    nbytes = net.flat_parameters().nbytes
    for limit, split in ((nbytes, True), (nbytes + 1, False)):
        monkeypatch.setattr(StepPlan, "SPLIT_UPDATE_BYTES", limit)
        net._backprop._plans.clear()
        net.train_step(x, t, "cross_entropy", opt)
        assert (net._backprop._last.ranges is not None) is split, limit
    first = net._backprop._last
    net.train_step(x, t, "cross_entropy", opt)
    assert net._backprop._last is first
    net.layers[0].activation.alpha = 0.02
    net.train_step(x, t, "cross_entropy", opt)
    assert net._backprop._last is not first


def test_fit_interrupted_after_some_layers_were_updated_rolls_back_to_the_last_epoch(monkeypatch):
    """A KeyboardInterrupt in the backward pass of a step updating layer by layer (the layers above already
    updated, this one not): fit leaves the weights, the velocity and the step count of the last finished epoch,
    as README says."""
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    from gpunn.backprop import StepPlan
    monkeypatch.setattr(StepPlan, "SPLIT_UPDATE_BYTES", 0)
    net = gpunn.mlp([5, 7, 6, 4], activation="sigmoid", output="softmax", seed=2, fused=True, device="cpu")
    x, t = batch(20, 5, 4, 1, "float32", classes=True)
    opt = gpunn.SGD(lr=0.1, momentum=0.9)
    ends, at_raise = [], []

    def progress(record):
        ends.append((net.flat_parameters().copy(), opt.state["velocity"].copy(), opt.t))
    act, calls, starts = net.layers[0].activation, [0], []
    real, real_forward = act.backward, act.forward

    def forward(*args):                     # the first call of a step: the weights the step starts from
        starts.append(net.flat_parameters().copy())
        return real_forward(*args)

    def backward(*args):
        calls[0] += 1
        if calls[0] == 13:                  # the third epoch's third step (5 steps an epoch)
            at_raise.append(net.flat_parameters().copy())
            raise KeyboardInterrupt
        return real(*args)
    act.backward, act.forward = backward, forward
    with pytest.raises(KeyboardInterrupt):
        net.fit(x, t, loss="cross_entropy", optimizer=opt, epochs=5, batch_size=4, progress=progress, shuffle=False)
    params, velocity, steps = ends[-1]
    assert len(ends) == 2 and steps == 10 and net._backprop._last.ranges is not None
    (first, _), (top, _) = net._backprop.store.layout[0], net._backprop.store.layout[-1]
    assert not numpy.array_equal(at_raise[0][top], starts[-1][top])     # in that step the top layer was updated,
    assert numpy.array_equal(at_raise[0][first], starts[-1][first])     # the first layer not yet
    assert same_bits(net.flat_parameters(), params) and same_bits(opt.state["velocity"], velocity)
    assert opt.t == steps


def test_an_optimiser_with_its_own_update_is_not_split(monkeypatch):
    """A subclass's own ``update`` runs once per step, as written: the plan does not split what it cannot see."""
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    from gpunn.backprop import StepPlan
    monkeypatch.setattr(StepPlan, "SPLIT_UPDATE_BYTES", 0)
    calls = []

    class Halved(gpunn.SGD):
        def update(self, params, grads, decay_mask, ops):
            calls.append(1)
            super().update(params, grads * 0.5, decay_mask, ops)
    net = gpunn.mlp([5, 7, 6, 4], activation="sigmoid", output="softmax", dtype="float64", seed=1, fused=True,
                    device="cpu")
    ref = copy.deepcopy(net)
    x, t = batch(9, 5, 4, 3, "float64", classes=True)
    net.train_step(x, t, "cross_entropy", Halved(lr=0.1))
    ref.train_step(x, t, "cross_entropy", gpunn.SGD(lr=0.05))
    assert calls == [1]
    assert numpy.allclose(net.flat_parameters(), ref.flat_parameters(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("fused", [False, None, True])
def test_the_learning_rate_is_asked_once_per_step_where_the_update_is_not_split(fused, monkeypatch):
    """A step that cannot split the update (the reference, or the kernels not loaded yet) asks η once, as
    the step done operation by operation does: a subclass's current_lr may count, or decay, at each call."""
    if fused and not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    from gpunn.backprop import StepPlan
    monkeypatch.setattr(StepPlan, "SPLIT_UPDATE_BYTES", 0)

    class Halving(gpunn.SGD):
        def current_lr(self):
            self.lr = self.lr * 0.5
            return self.lr
    a = gpunn.mlp([5, 7, 6, 4], activation="relu", output="softmax", dtype="float64", seed=1, fused=fused,
                  device="cpu")
    b = copy.deepcopy(a)
    opt_a, opt_b = Halving(lr=0.4, momentum=0.5), Halving(lr=0.4, momentum=0.5)
    for k, n in enumerate([9, 3, 9]):
        x, t = batch(n, 5, 4, k, "float64", classes=True)
        a.train_step(x, t, "cross_entropy", opt_a)
        step_by_operations(b, x, t, "cross_entropy", opt_b)
    assert opt_a.lr == opt_b.lr == 0.4 / 8 and opt_a.t == opt_b.t == 3
    assert same_bits(a.flat_parameters(), b.flat_parameters())


def test_an_update_assigned_to_the_optimiser_instance_runs_unsplit(monkeypatch):
    """``opt.update = wrapper`` (logging, clipping) is what the step runs, as it ran before the split: the plan
    honours methods of an instance's own, as it does an activation's and a loss's."""
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    from gpunn.backprop import StepPlan
    monkeypatch.setattr(StepPlan, "SPLIT_UPDATE_BYTES", 0)
    net = gpunn.mlp([5, 7, 6, 4], activation="sigmoid", output="softmax", dtype="float64", seed=1, fused=True,
                    device="cpu")
    ref = copy.deepcopy(net)
    opt, calls = gpunn.SGD(lr=0.1, momentum=0.5), []
    update = opt.update
    opt.update = lambda params, grads, mask, ops: (calls.append(1), update(params, grads * 0.5, mask, ops))
    ref_opt = gpunn.SGD(lr=0.05, momentum=0.5)
    for k in range(2):
        x, t = batch(9, 5, 4, k, "float64", classes=True)
        net.train_step(x, t, "cross_entropy", opt)
        ref.train_step(x, t, "cross_entropy", ref_opt)
    assert calls == [1, 1] and opt.t == 2
    assert numpy.allclose(net.flat_parameters(), ref.flat_parameters(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("weight_decay", [None, 0.01])
def test_an_sgd_subclass_leaving_hyperparameters_unset_steps_split_as_the_reference(weight_decay, monkeypatch):
    """An SGD subclass whose __init__ leaves momentum (and nesterov, weight_decay) at the descriptors' None,
    read as off (tests/test_plan_hostile.py), updates layer by layer with the kernels as the reference does."""
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    from gpunn.backprop import StepPlan
    monkeypatch.setattr(StepPlan, "SPLIT_UPDATE_BYTES", 0)

    class Unset(gpunn.SGD):
        name = "test_plan.unset_sgd"

        def __init__(self, lr, weight_decay):
            gpunn.optim.Optimizer.__init__(self)
            self.lr = lr
            if weight_decay is not None:
                self.weight_decay = weight_decay
    nets = [gpunn.mlp([5, 7, 6, 4], activation="tanh", output="softmax", dtype="float32", seed=2, fused=fused,
                      device="cpu") for fused in (True, False)]
    opts = [Unset(0.1, weight_decay) for _ in nets]
    for k in range(3):
        x, t = batch(7, 5, 4, k, "float32", classes=True)
        for net, opt in zip(nets, opts):
            net.train_step(x, t, "cross_entropy", opt)
    assert same_bits(nets[0].flat_parameters(), nets[1].flat_parameters())
    assert opts[0].t == opts[1].t == 3


def test_hidden_deltas_are_made_in_place_over_the_products_output():
    """With the kernels, ∂E/∂x of the layer above goes straight into the δ buffer of a hidden layer whose δ
    kernel reads each value before writing it (sigmoid, tanh, ReLU, leaky ReLU, ELU), never softplus's."""
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    for hidden, in_place in [("sigmoid", True), ("relu", True), ("softplus", False)]:
        net = gpunn.mlp([5, 7, 6, 4], activation=hidden, output="softmax", dtype="float32", seed=1, fused=True,
                        device="cpu")
        x, t = batch(9, 5, 4, 3, "float32", classes=True)
        net.train_step(x, t, "cross_entropy", gpunn.SGD(lr=0.1))
        plan = net._backprop._last
        for k in (1, 2):            # the layer above writes ∂E/∂x with its last product
            target = plan.steps[k].grads[-1].args[2]
            assert (target is plan.steps[k - 1].bufs.delta) is in_place, (hidden, k)


def test_plan_is_made_again_when_the_cpu_kernels_load():
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    net = gpunn.mlp([4, 8, 1], output="sigmoid", dtype="float32", seed=1, device="cpu")
    assert type(net.ops) is ops.CpuFusedOps
    net.ops.kernels = None                  # as a lazy CpuFusedOps runs before LAZY_SECONDS of training
    ref = gpunn.mlp([4, 8, 1], output="sigmoid", dtype="float32", seed=1, device="cpu", fused=False)
    x, t = batch(3, 4, 1, 0, "float32")
    opt, opt_ref = gpunn.SGD(lr=0.1), gpunn.SGD(lr=0.1)
    net.train_step(x, t, "squared_error", opt)
    before = dict(net._backprop._plans)
    net.ops.warm_up()                       # what the lazy ops does after LAZY_SECONDS of training
    net.train_step(x, t, "squared_error", opt)
    after = net._backprop._plans
    assert set(before) == set(after) and all(after[k] is not before[k] for k in after)
    assert any(getattr(c.func, "__name__", "") == "sigmoid_bwd" for p in after.values() for c in p.backward)
    assert not any(getattr(c.func, "__name__", "") == "sigmoid_bwd" for p in before.values() for c in p.backward)
    for _ in range(2):
        ref.train_step(x, t, "squared_error", opt_ref)
    assert same_bits(net.flat_parameters(), ref.flat_parameters())


def test_plans_follow_the_layers_buffers_through_many_batch_sizes():
    """More batch sizes than a layer keeps buffers for, in an order that frees the ones in use: every step
    still equals its twin's, and the plans stay as bounded as the buffers."""
    a = gpunn.mlp([5, 6, 3], activation="tanh", output="softmax", seed=4, device="cpu")
    b = copy.deepcopy(a)
    opt_a, opt_b = gpunn.SGD(lr=0.1), gpunn.SGD(lr=0.1)
    sizes = [1, 2, 3, 4, 5, 6, 1, 6, 2, 5, 3, 4, 7, 1]
    for k, n in enumerate(sizes):
        if k == 7:                          # readers' forwards of other sizes free the step's buffers
            for m in (8, 9, 10, 11):
                a.forward(numpy.zeros((m, 5)))
                b.forward(numpy.zeros((m, 5)))
        x, t = batch(n, 5, 3, k, "float64", classes=True)
        a.train_step(x, t, "cross_entropy", opt_a)
        step_by_operations(b, x, t, "cross_entropy", opt_b)
        assert same_bits(a.flat_parameters(), b.flat_parameters()), k
        a.backward(t, "cross_entropy")      # the layers' own backward on the step's arrays: still theirs
        b.backward(t, "cross_entropy")
        assert same_bits(a.flat_gradients(), b.flat_gradients()), k
        assert len(a._backprop._plans) <= MAX_BATCH_SIZES
        for layer in a.layers:
            assert len(layer._bufs) <= MAX_BATCH_SIZES


def test_plans_of_several_losses_and_a_moved_network():
    a = gpunn.mlp([4, 8, 2], output="sigmoid", seed=5, device="cpu")
    b = copy.deepcopy(a)
    opt_a, opt_b = gpunn.SGD(lr=0.1), gpunn.SGD(lr=0.1)
    x, t = batch(6, 4, 2, 0, "float64")
    for k, loss in enumerate(["squared_error", "binary_cross_entropy", "squared_error"]):
        a.train_step(x, t, loss, opt_a)
        step_by_operations(b, x, t, loss, opt_b)
        assert same_bits(a.flat_parameters(), b.flat_parameters()), k
    a.to("cpu", fused=not a.fused)          # new ops and parameter store: new plans
    b.to("cpu", fused=not b.fused)
    opt_a, opt_b = gpunn.SGD(lr=0.1), gpunn.SGD(lr=0.1)
    for k in range(2):
        a.train_step(x, t, "squared_error", opt_a)
        step_by_operations(b, x, t, "squared_error", opt_b)
        assert same_bits(a.flat_parameters(), b.flat_parameters()), k


def test_forward_between_steps_shows_its_own_arrays():
    """A reader's forward between two steps shows its batch; the next step shows the step's batch again."""
    net = gpunn.mlp([3, 4, 2], seed=6, device="cpu")
    opt = gpunn.SGD(lr=0.1)
    x, t = batch(5, 3, 2, 0, "float32")
    x2, _ = batch(2, 3, 2, 1, "float32")
    net.train_step(x, t, "squared_error", opt)
    net.forward(x2)
    assert net.layers[0].x.shape == (2, 3) and net.layers[1].y.shape == (2, 2)
    net.train_step(x, t, "squared_error", opt)
    assert net.layers[0].x is x and net.layers[1].y.shape == (5, 2) and net.layers[1].delta.shape == (5, 2)


def test_layer_state_after_train_step_is_the_step_of_the_lecture():
    """Independent reference: after train_step on the lecture's 4-8-1 net, each layer's z, y and δ are
    the lecture's formulas written here with NumPy (eqs 11-14, sigmoid and squared error)."""
    net = gpunn.mlp([4, 8, 1], output="sigmoid", seed=7, device="cpu", dtype="float64")
    W1, b1, W2, b2 = (p.copy() for p in net.parameters())
    x, t = batch(3, 4, 1, 2, "float64")
    net.train_step(x, t, "squared_error", gpunn.SGD(lr=0.1))
    s = lambda v: 1.0 / (1.0 + numpy.exp(-v))  # noqa: E731
    z1 = x @ W1 + b1
    y1 = s(z1)
    z2 = y1 @ W2 + b2
    y2 = s(z2)
    d2 = (y2 - t) * y2 * (1 - y2) / 3
    d1 = (d2 @ W2.T) * y1 * (1 - y1)
    for got, want in [(net.layers[0].z, z1), (net.layers[0].y, y1), (net.layers[1].y, y2),
                      (net.layers[1].delta, d2), (net.layers[0].delta, d1)]:
        numpy.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_dot_is_numpy_matmul_bit_for_bit(dtype):
    """The shapes of a step: x·W, xᵀ·δ (a transposed view), δ·Wᵀ, with one row, one column and many."""
    g = rng(0)
    for m, k, n in [(1, 4, 8), (1, 8, 1), (3, 4, 8), (32, 784, 64), (1, 784, 64), (7, 1, 5), (300, 64, 10),
                    (5, 3, 1), (1, 1, 1), (16, 4, 8)]:
        a, w, d = (g.normal(size=s).astype(dtype) for s in [(m, k), (k, n), (m, n)])
        for left, right, shape in [(a, w, (m, n)), (a.T, d, (k, n)), (d, w.T, (m, k))]:
            by_dot, by_matmul = numpy.empty(shape, dtype), numpy.empty(shape, dtype)
            numpy.dot(left, right, by_dot)
            numpy.matmul(left, right, out=by_matmul)
            assert same_bits(by_dot, by_matmul), (m, k, n, shape)


def test_ops_bind_the_reference_where_kernels_do_not_cover():
    """A softmax wider than the kernels take, with the kernels loaded: the bound calls are the reference's."""
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    a = gpunn.mlp([4, 200], output="softmax", seed=8, device="cpu", fused=True)
    b = gpunn.mlp([4, 200], output="softmax", seed=8, device="cpu", fused=False)
    assert type(a.ops) is ops.CpuFusedOps
    x, t = batch(3, 4, 200, 0, "float64", classes=True)
    opt_a, opt_b = gpunn.SGD(lr=0.1), gpunn.SGD(lr=0.1)
    for _ in range(2):
        a.train_step(x, t, "cross_entropy", opt_a)
        b.train_step(x, t, "cross_entropy", opt_b)
    assert same_bits(a.flat_parameters(), b.flat_parameters())
