"""Each optimiser's update against a formula written in the test (shares no code with gpunn.optim),
and against PyTorch's optimisers when PyTorch is installed."""
from __future__ import annotations

import numpy
import pytest

import gpunn
from gpunn.ops import ops_for
from helpers import host, rng

N = 300_003        # more than one CPU block (gpunn.optim.BLOCK), and not a multiple of it
STEPS = 4


def _problem(device, n=N):
    g = rng(11)
    w = g.normal(size=n)
    grads = [g.normal(size=n) for _ in range(STEPS)]
    mask = (g.uniform(size=n) > 0.25).astype(float)    # 1 = weight, 0 = bias
    return w, grads, mask


def _run(device, opt, w, grads, mask):
    """gpunn's update, STEPS times, on flat float64 buffers of ``device``."""
    dev = gpunn.get_device(device)
    p = dev.asarray(w, dtype="float64")
    m = dev.asarray(mask, dtype="float64") if getattr(opt, "weight_decay", 0.0) else None
    ops = ops_for(dev)
    for g in grads:
        opt.update(p, dev.asarray(g, dtype="float64"), m, ops)
    return host(p)


SGD_CASES = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True),
             dict(lr=0.1, weight_decay=0.01), dict(lr=0.02, momentum=0.5, nesterov=True, weight_decay=0.003)]


@pytest.mark.parametrize("kw", SGD_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_sgd_matches_the_written_formula(device, kw):
    w, grads, mask = _problem(device)
    lr, mu, wd, nesterov = kw["lr"], kw.get("momentum", 0.0), kw.get("weight_decay", 0.0), kw.get("nesterov", False)
    ref, v = w.copy(), numpy.zeros_like(w)
    for g in grads:
        g = g + wd * mask * ref                     # L2 decay on weights only
        v = mu * v + g                              # velocity (PyTorch's convention)
        ref = ref - lr * ((g + mu * v) if nesterov else v)  # eq (15) when mu = 0: w ← w − η ∂E/∂w
    got = _run(device, gpunn.SGD(**kw), w, grads, mask)
    numpy.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)


ADAM_CASES = [dict(lr=0.01), dict(lr=0.003, betas=(0.8, 0.99), eps=1e-6), dict(lr=0.01, weight_decay=0.05)]


@pytest.mark.parametrize("kw", ADAM_CASES, ids=["defaults", "betas-eps", "weight-decay"])
def test_adam_matches_the_paper(device, kw):
    w, grads, mask = _problem(device)
    lr, (b1, b2), eps, wd = kw["lr"], kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8), kw.get("weight_decay", 0.0)
    ref, m, v = w.copy(), numpy.zeros_like(w), numpy.zeros_like(w)
    for t, g in enumerate(grads, start=1):           # Kingma & Ba, Algorithm 1
        g = g + wd * mask * ref
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        ref = ref - lr * m_hat / (numpy.sqrt(v_hat) + eps)
    got = _run(device, gpunn.Adam(**kw), w, grads, mask)
    numpy.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)


def test_fit_step_is_eq15_on_the_biases_too(device):
    """One full-batch step of fit moves every parameter by exactly −η·∂E/∂w (weights and biases)."""
    g = rng(3)
    X, y = g.normal(size=(12, 4)), g.integers(0, 3, 12)
    net = gpunn.mlp([4, 5, 3], activation="tanh", device=device, dtype="float64", seed=1)
    net.forward(X)
    net.backward(y, "cross_entropy")
    before, grad = host(net.flat_parameters()), host(net.flat_gradients())
    net.fit(X, y, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.3), epochs=1, batch_size=12, shuffle=False)
    numpy.testing.assert_allclose(host(net.flat_parameters()), before - 0.3 * grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind,kw", [("sgd", SGD_CASES[2]), ("sgd", SGD_CASES[4]), ("adam", ADAM_CASES[0])])
def test_optimisers_match_pytorch(kind, kw):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: the PyTorch cross-check is skipped")
    w, grads, mask = _problem("cpu", n=1000)
    tw = torch.tensor(w, requires_grad=True)
    wd = kw.get("weight_decay", 0.0)
    cls = torch.optim.SGD if kind == "sgd" else torch.optim.Adam
    topt = cls([tw], **{k: v for k, v in kw.items() if k != "weight_decay"})
    for g in grads:
        tw.grad = torch.tensor(g) + wd * torch.tensor(mask) * tw.detach()
        topt.step()
    ours = gpunn.SGD(**kw) if kind == "sgd" else gpunn.Adam(**kw)
    numpy.testing.assert_allclose(_run("cpu", ours, w, grads, mask), tw.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fused", [False, True])
def test_weight_decay_switched_between_train_steps_is_the_written_formula(fused):
    """opt.weight_decay (and lr) assigned between steps of one batch size (the step's plan taken again):
    each step is w ← w − η(∂E/∂w + λ·mask·w), mask 1 on weights and 0 on biases, with that step's λ and η."""
    net = gpunn.mlp([4, 6, 2], output="sigmoid", device="cpu", dtype="float64", seed=0, fused=fused)
    g = rng(5)
    x, t = g.normal(size=(5, 4)), g.uniform(size=(5, 2))
    mask = host(net.decay_mask())
    opt = gpunn.SGD(lr=0.1)
    for k, (wd, lr) in enumerate([(0.0, 0.1), (0.0, 0.1), (0.5, 0.1), (0.5, 0.2), (0.0, 0.2), (0.25, 0.05)]):
        opt.weight_decay, opt.lr = wd, lr
        w = host(net.flat_parameters())
        net.train_step(x, t, "squared_error", opt)
        want = w - lr * (host(net.flat_gradients()) + wd * mask * w)
        numpy.testing.assert_allclose(host(net.flat_parameters()), want, rtol=1e-12, atol=1e-15, err_msg=str(k))


def test_an_optimiser_whose_settings_are_properties_is_read_through_them():
    """A custom optimiser whose weight_decay and lr are properties (not gpunn's checked attributes): the step
    reads them as attributes, the decay mask given exactly when its weight decay is not zero."""
    seen = []

    class Recording(gpunn.SGD):
        name = "test_optim.recording"
        decay = 0.0

        def __init__(self):
            gpunn.optim.Optimizer.__init__(self)

        weight_decay = property(lambda self: self.decay)
        momentum = nesterov = property(lambda self: 0.0)
        lr = property(lambda self: 0.5)

        def update(self, params, grads, decay_mask, ops):
            seen.append((decay_mask is not None, self.current_lr()))

    class Bare(gpunn.optim.Optimizer):             # no weight_decay at all
        name = "test_optim.bare"

        def update(self, params, grads, decay_mask, ops):
            seen.append((decay_mask is not None, None))

        def config(self):
            return {"name": self.name}

    net = gpunn.mlp([4, 6, 2], device="cpu", seed=0)
    x, t = numpy.zeros((3, 4), "float32"), numpy.zeros((3, 2), "float32")
    opt = Recording()
    for decay in (0.0, 0.3, 0.0):
        opt.decay = decay
        net.train_step(x, t, "squared_error", opt)
        net.update(opt)
    opt.reset()
    net.train_step(x, t, "squared_error", Bare())
    assert seen == [(False, 0.5), (False, 0.5), (True, 0.5), (True, 0.5), (False, 0.5), (False, 0.5), (False, None)]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_another_buffer_starts_from_fresh_state(device, kind):
    """State belongs to one parameter buffer: another one (another network's, or one moved to another device)
    starts again from zero velocity or moments and step 1, here one step written out."""
    g = rng(8)
    w0, g1, g2 = (g.normal(size=40) for _ in range(3))
    dev = gpunn.get_device(device)
    ops = ops_for(dev)
    opt = gpunn.SGD(lr=0.1, momentum=0.9) if kind == "sgd" else gpunn.Adam(lr=0.1)
    first = dev.asarray(w0.copy(), dtype="float64")
    for _ in range(2):
        opt.update(first, dev.asarray(g1, dtype="float64"), None, ops)
    w = dev.asarray(w0.copy(), dtype="float64")
    opt.update(w, dev.asarray(g2, dtype="float64"), None, ops)
    if kind == "sgd":
        want = w0 - 0.1 * g2                                            # v = g
    else:
        want = w0 - 0.1 * g2 / (numpy.sqrt(g2 * g2) + 1e-8)             # m̂ = g, v̂ = g² at t = 1
    numpy.testing.assert_allclose(host(w), want, rtol=1e-12)


def test_a_subclass_that_leaves_lr_unset_steps_with_lr_0():
    """A setting a subclass leaves unset is off (gpunn.optim._hyper), η included: the weights stay."""
    class NoLr(gpunn.SGD):
        name = "test_optim.no_lr"

        def __init__(self):
            gpunn.optim.Optimizer.__init__(self)

    opt, w = NoLr(), rng(9).normal(size=10)
    before = w.copy()
    opt.update(w, rng(10).normal(size=10), None, ops_for(gpunn.get_device("cpu")))
    assert opt.current_lr() == 0.0 and opt.t == 1
    numpy.testing.assert_array_equal(w, before)
