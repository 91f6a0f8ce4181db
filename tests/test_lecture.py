"""The lecture's network: gradients, a literal eqs (13)–(15) reference, learning, determinism,
backend agreement and numerical stability."""
from __future__ import annotations

import math
import warnings

import numpy
import pytest

import gpunn
from gpunn import activations
from helpers import gradients, host, rng

HIDDEN = ["sigmoid", "tanh", "relu", "leaky_relu", "softplus", "elu", "identity",
          {"name": "leaky_relu", "alpha": 0.2}, {"name": "elu", "a": 0.5}, {"name": "elu", "a": 1.7}]
PAIRS = [("squared_error", out) for out in ["sigmoid", "tanh", "identity", "softmax", "softplus", "elu"]] + [
    ("binary_cross_entropy", "sigmoid"), ("cross_entropy", "softmax")]


def _targets(loss, n, n_out, g):
    if loss == "cross_entropy":
        return g.integers(0, n_out, size=n)
    if loss == "binary_cross_entropy":
        return g.integers(0, 2, size=(n, n_out)).astype(float)
    return g.normal(size=(n, n_out))


def _net(sizes, hidden, out, device="cpu", dtype="float64", seed=0):
    layers = [gpunn.Dense(i, o, hidden if k < len(sizes) - 2 else out)
              for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))]
    return gpunn.Sequential(layers, device=device, dtype=dtype, seed=seed)


def _act_id(a):
    return a if isinstance(a, str) else f"{a['name']}-{list(a.values())[1]}"


# depth 1 has no hidden layer, so its hidden activation does not matter: one case per loss pair
GRAD_CASES = [pytest.param(h, loss, out, depth, id=f"{_act_id(h)}-{loss}-{out}-depth{depth}")
              for depth in (1, 2, 3) for h in (HIDDEN if depth > 1 else HIDDEN[:1]) for loss, out in PAIRS]


@pytest.mark.parametrize("hidden,loss,out,depth", GRAD_CASES)
def test_gradient_check_float64(device, hidden, loss, out, depth):
    g = rng(depth)
    sizes = [5, 7, 6, 4][: depth] + [3]
    net = _net(sizes, hidden, out, device=device, seed=depth)
    X = g.normal(size=(6, sizes[0]))
    Y = _targets(loss, 6, sizes[-1], g)
    analytic, numeric = gradients(net, X, Y, loss)
    err = numpy.linalg.norm(numeric - analytic) / max(numpy.linalg.norm(numeric) + numpy.linalg.norm(analytic),
                                                      1e-300)
    assert err <= 1e-6, f"relative gradient error {err:.2e}"


# -- a reference written as literally as the lecture: scalar loops over nodes i, j, k ----------------
def _lecture_reference(Ws, bs, X, Y, eta, steps):
    """Sigmoid network, E = ½Σ(y − y*)² averaged over the batch, eqs (13)–(15) with explicit loops."""
    Ws = [W.copy() for W in Ws]
    bs = [b.copy() for b in bs]
    sig = lambda s: 1.0 / (1.0 + math.exp(-s))  # noqa: E731
    L = len(Ws)
    B = X.shape[0]
    for _ in range(steps):
        gW = [numpy.zeros_like(W) for W in Ws]
        gb = [numpy.zeros_like(b) for b in bs]
        for n in range(B):
            ys = [list(X[n])]                                  # step 2: forward, layer by layer
            for layer in range(L):
                W, b = Ws[layer], bs[layer]
                y_in = ys[-1]
                ys.append([sig(sum(W[i][j] * y_in[i] for i in range(len(y_in))) + b[j]) for j in range(len(b))])
            deltas = [None] * L
            y_out = ys[-1]
            deltas[L - 1] = [-y_out[t] * (1 - y_out[t]) * (Y[n][t] - y_out[t]) for t in range(len(y_out))]  # (13)
            for layer in range(L - 2, -1, -1):                 # (14)
                y_j = ys[layer + 1]
                W_next = Ws[layer + 1]
                deltas[layer] = [y_j[j] * (1 - y_j[j]) * sum(W_next[j][k] * deltas[layer + 1][k]
                                                              for k in range(len(deltas[layer + 1])))
                                 for j in range(len(y_j))]
            for layer in range(L):
                for i in range(len(ys[layer])):
                    for j in range(len(deltas[layer])):
                        gW[layer][i][j] += deltas[layer][j] * ys[layer][i]
                for j in range(len(deltas[layer])):
                    gb[layer][j] += deltas[layer][j]
        for layer in range(L):                                 # (15): w_ij ← w_ij − η δ_j y_i
            for i in range(Ws[layer].shape[0]):
                for j in range(Ws[layer].shape[1]):
                    Ws[layer][i][j] -= eta * gW[layer][i][j] / B
            for j in range(len(bs[layer])):
                bs[layer][j] -= eta * gb[layer][j] / B
    return Ws, bs


@pytest.mark.parametrize("batch", [1, 5])
def test_vectorised_matches_literal_lecture_loops(device, batch):
    g = rng(3)
    sizes = [4, 5, 3, 2]
    net = _net(sizes, "sigmoid", "sigmoid", device=device, seed=11)
    for layer in net.layers:   # non-zero biases so they are exercised too
        layer.b = g.normal(size=layer.n_out) * 0.1
    Ws0 = [host(layer.W).copy() for layer in net.layers]
    bs0 = [host(layer.b).copy() for layer in net.layers]
    X = g.normal(size=(batch, 4))
    Y = g.uniform(size=(batch, 2))
    opt = gpunn.SGD(lr=0.7)
    for _ in range(4):
        net.forward(X)
        net.backward(Y, "squared_error")
        net.step(opt)
    Ws, bs = _lecture_reference(Ws0, bs0, X, Y, 0.7, 4)
    for layer, W, b in zip(net.layers, Ws, bs):
        numpy.testing.assert_allclose(host(layer.W), W, rtol=1e-12, atol=1e-14)
        numpy.testing.assert_allclose(host(layer.b), b, rtol=1e-12, atol=1e-14)


def test_output_delta_is_eq13(device):
    net = _net([3, 2], "sigmoid", "sigmoid", device=device)
    X, Y = rng(1).normal(size=(4, 3)), rng(2).uniform(size=(4, 2))
    y = host(net.forward(X))
    net.backward(Y, "squared_error")
    numpy.testing.assert_allclose(host(net.layers[-1].delta), -y * (1 - y) * (Y - y) / 4, rtol=1e-12)


def test_layer_exposes_lecture_names(device):
    net = _net([3, 4, 2], "tanh", "sigmoid", device=device, dtype="float32")
    net.forward(numpy.ones((5, 3)))
    net.backward(numpy.zeros((5, 2)))
    for layer in net.layers:
        for name in ("W", "b", "z", "y", "delta", "grad_W", "grad_b"):
            assert getattr(layer, name) is not None, name
        assert layer.W.shape == (layer.n_in, layer.n_out) and layer.b.shape == (layer.n_out,)
        assert layer.z.shape == layer.y.shape == layer.delta.shape == (5, layer.n_out)
        assert layer.grad_W.shape == layer.W.shape and layer.W.dtype == numpy.float32
    assert net.layers[0].input_grad is False    # the first layer computes no input gradient


def test_logistic_regression_d4(device):
    """Lecture §1: one sigmoid neuron over d = 4 inputs plus a bias learns a separable problem."""
    g = rng(5)
    X = g.normal(size=(200, 4))
    theta, theta0 = numpy.array([1.5, -2.0, 0.5, 1.0]), 0.3
    y = (X @ theta + theta0 > 0).astype(float).reshape(-1, 1)
    net = gpunn.Sequential([gpunn.Dense(4, 1, "sigmoid")], device=device, seed=0)
    net.fit(X, y, loss="binary_cross_entropy", optimizer=gpunn.SGD(lr=1.0), epochs=60, batch_size=20)
    assert net.evaluate(X, y).accuracy >= 0.98


def test_xor_with_squared_error(device):
    from gpunn.datasets import xor
    X, Y = xor()
    net = _net([2, 4, 1], "sigmoid", "sigmoid", device=device, dtype="float32", seed=0)
    net.fit(X, Y, loss="squared_error", optimizer=gpunn.SGD(lr=2.0, momentum=0.9), epochs=1500, batch_size=4)
    pred = host(net.predict(X)).ravel()
    assert numpy.all((pred > 0.5) == (Y.ravel() > 0.5)), pred


def test_same_seed_gives_bitwise_identical_training():
    from gpunn.datasets import two_moons
    X, y = two_moons(120, seed=1)

    def train():
        net = _net([2, 8, 8, 2], "tanh", "softmax", dtype="float32", seed=42)
        net.fit(X, y, loss="cross_entropy", optimizer=gpunn.Adam(lr=0.01), epochs=5, batch_size=16)
        return host(net.flat_parameters())
    a, b = train(), train()
    assert a.tobytes() == b.tobytes()
    c = host(_net([2, 8, 8, 2], "tanh", "softmax", dtype="float32", seed=43).flat_parameters())
    assert c.tobytes() != a.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_backend_agreement_with_numpy_float64(device, dtype):
    """Forward, loss, every grad and the weights after a few SGD steps match a NumPy float64 reference."""
    g = rng(9)
    X = g.normal(size=(17, 6))
    y = g.integers(0, 3, size=17)
    rtol = {"float32": 1e-5, "float64": 1e-10}[dtype]

    def run(dev, dt):
        net = gpunn.Sequential([gpunn.Dense(6, 9, "tanh"), gpunn.Dense(9, 7, "softplus"),
                                gpunn.Dense(7, 3, "softmax")], device=dev, dtype=dt, seed=4)
        out = {"y": host(net.forward(X)), "loss": numpy.array(net.backward(y, "cross_entropy"))}
        for i, layer in enumerate(net.layers):
            out[f"gW{i}"], out[f"gb{i}"] = host(layer.grad_W), host(layer.grad_b)
        opt = gpunn.SGD(lr=0.1, momentum=0.5)
        net.step(opt)
        for _ in range(3):
            net.forward(X)
            net.backward(y, "cross_entropy")
            net.step(opt)
        out["params"] = host(net.flat_parameters())
        return out
    ref, got = run("cpu", "float64"), run(device, dtype)
    for key in ref:
        scale = numpy.max(numpy.abs(ref[key]))
        numpy.testing.assert_allclose(got[key], ref[key], rtol=rtol, atol=rtol * scale, err_msg=key)


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


# each activation's f(z) and f′(z) as the lecture writes them (eqs 1–6), one Python float at a time
FORMULAS = {
    "sigmoid": (_sig, lambda z: _sig(z) * (1.0 - _sig(z))),
    "tanh": (math.tanh, lambda z: 1.0 - math.tanh(z) ** 2),
    "relu": (lambda z: max(z, 0.0), lambda z: 1.0 if z > 0 else 0.0),
    "leaky_relu": (lambda z: z if z > 0 else 0.01 * z, lambda z: 1.0 if z > 0 else 0.01),
    "leaky_relu-0.2": (lambda z: z if z > 0 else 0.2 * z, lambda z: 1.0 if z > 0 else 0.2),
    "softplus": (lambda z: math.log1p(math.exp(z)), _sig),
    "elu": (lambda z: z if z >= 0 else math.expm1(z), lambda z: 1.0 if z > 0 else math.exp(z)),
    "elu-0.5": (lambda z: z if z >= 0 else 0.5 * math.expm1(z), lambda z: 1.0 if z > 0 else 0.5 * math.exp(z)),
    "elu-1.7": (lambda z: z if z >= 0 else 1.7 * math.expm1(z), lambda z: 1.0 if z > 0 else 1.7 * math.exp(z)),
    "identity": (lambda z: z, lambda z: 1.0),
}
SPECS = {"leaky_relu-0.2": {"name": "leaky_relu", "alpha": 0.2}, "elu-0.5": {"name": "elu", "a": 0.5},
         "elu-1.7": {"name": "elu", "a": 1.7}}
Z = [-30.0, -4.0, -1.5, -0.3, -1e-3, 0.0, 1e-3, 0.3, 1.5, 4.0, 30.0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_activations_and_their_derivatives_match_the_formulas(device, name, dtype):
    """f, f′ (grad) and δ = f′ ⊙ g (backward, which ELU writes out on its own) against the formulas above;
    at z = 0 f′ is the left-hand one for the rectifiers and ELU. f′ read from y (y(1 − y), 1 − y², y + a) is
    accurate to the dtype's epsilon absolutely, not relatively: hence ``atol`` there."""
    act = activations.get(SPECS.get(name, name))
    f, df = FORMULAS[name]
    xp, rtol = device.xp, {"float32": 2e-6, "float64": 1e-13}[dtype]
    atol = 1e-6 if dtype == "float32" else 1e-15
    z = device.asarray(numpy.array([Z, Z[::-1]]), dtype=dtype)
    zz = host(z).astype(float)              # the formulas' inputs: z as rounded to dtype
    g = rng(4).normal(size=zz.shape)
    y = act(z)
    assert y.dtype == z.dtype
    numpy.testing.assert_allclose(host(y), [[f(v) for v in row] for row in zz], rtol=rtol, atol=1e-300)
    want = numpy.array([[df(v) for v in row] for row in zz])
    grad = act.grad(z)
    assert grad.dtype == z.dtype
    numpy.testing.assert_allclose(host(grad), want, rtol=rtol, atol=atol)
    out = xp.full_like(z, numpy.nan)        # derivative and backward write every element of out
    numpy.testing.assert_allclose(host(act.derivative(z, y, out)), want, rtol=rtol, atol=atol)
    numpy.testing.assert_array_equal(host(act(z.reshape(2, 11, 1))), host(y).reshape(2, 11, 1))  # any shape
    out = xp.full_like(z, numpy.nan)
    act.backward(z, y, device.asarray(g, dtype=dtype), out, xp.full_like(z, numpy.nan))
    numpy.testing.assert_allclose(host(out), want * host(device.asarray(g, dtype=dtype)), rtol=rtol, atol=3 * atol)


def test_softmax_and_its_jacobian_product_match_the_formulas(device):
    """y_t = e^(z_t) / Σ_s e^(z_s); backward gives δ_t = Σ_s g_s ∂y_s/∂z_t = y_t (g_t − Σ_s g_s y_s)."""
    act = activations.get("softmax")
    zz = rng(6).normal(size=(3, 4)) * 3.0
    g = rng(7).normal(size=(3, 4))
    want = numpy.array([[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in zz])
    z = device.asarray(zz, dtype="float64")
    y, rowstats = device.xp.empty_like(z), device.xp.empty((2, 3), "float64")
    act.forward(z, y, rowstats)
    numpy.testing.assert_allclose(host(y), want, rtol=1e-13)
    numpy.testing.assert_allclose(host(rowstats[0]), [math.log(sum(math.exp(u) for u in row)) for row in zz],
                                  rtol=1e-13)      # log Σ e^z: the cross-entropy reads it
    numpy.testing.assert_allclose(host(act(z)), want, rtol=1e-13)                  # the allocating call
    numpy.testing.assert_allclose(host(act(z[1])), want[1], rtol=1e-13)            # a 1-D array is one row
    jac = [numpy.diag(p) - numpy.outer(p, p) for p in want]       # ∂y_s/∂z_t = y_s([s = t] − y_t)
    out = device.xp.empty_like(z)
    act.backward(z, y, device.asarray(g, dtype="float64"), out, None, rowstats)
    numpy.testing.assert_allclose(host(out), [j.T @ gr for j, gr in zip(jac, g)], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_is_accurate_down_to_the_smallest_normal_number(device, dtype):
    """The exponent e^(−z) is capped (so that it never overflows) only where σ(z) is below the dtype's smallest
    normal number: above it σ(z) ≈ e^z keeps its relative accuracy."""
    low = math.log(numpy.finfo(dtype).tiny)
    z = device.asarray(numpy.linspace(low + 0.02, low + 3.0, 7), dtype=dtype)
    want = [_sig(v) for v in host(z).astype(float)]
    numpy.testing.assert_allclose(host(activations.get("sigmoid")(z)), want, rtol=1e-5 if dtype == "float32" else 1e-12)


EXTREME = [-1e4, -1000.0, -100.0, -30.0, -1e-8, 0.0, 1e-8, 30.0, 100.0, 1000.0, 1e4]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", activations.names())
def test_activation_stability_at_extreme_z(device, name, dtype):
    act = activations.get(name)
    xp = device.xp
    z = device.asarray(numpy.array([EXTREME, EXTREME[::-1]]), dtype=dtype)
    y = xp.empty_like(z)
    rowstats = xp.empty((2, 2), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with numpy.errstate(over="raise", invalid="raise", divide="raise"):
            act.forward(z, y, rowstats)
            g = xp.ones_like(z)
            d = xp.empty_like(z)
            act.backward(z, y, g, d, xp.empty_like(z), rowstats)
    yh, dh = host(y), host(d)
    assert numpy.all(numpy.isfinite(yh)) and numpy.all(numpy.isfinite(dh)), (yh, dh)
    zz = numpy.array(EXTREME)
    if name == "sigmoid":
        assert 0.0 <= yh[0, 0] < 1e-30 and yh[0, -1] == 1.0 and abs(yh[0, 5] - 0.5) < 1e-7
    if name == "softplus":
        numpy.testing.assert_allclose(yh[0, -3:], zz[-3:], rtol=1e-6)
        assert yh[0, 0] == 0.0
    if name == "elu":
        assert yh[0, 0] == -1.0 and dh[0, -1] == 1.0
    if name == "softmax":
        numpy.testing.assert_allclose(yh.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("loss,out", [("squared_error", "sigmoid"), ("binary_cross_entropy", "sigmoid"),
                                      ("cross_entropy", "softmax")])
def test_loss_stability_at_extreme_z(device, loss, out):
    net = _net([2, 3], "sigmoid", out, device=device, dtype="float32")
    net.layers[0].W = numpy.array([[1e4, -1e4, 0.0], [0.0, 0.0, 1e4]])
    X = numpy.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    Y = numpy.array([1, 0, 2]) if loss == "cross_entropy" else numpy.array([[0, 1, 0], [1, 0, 0], [1, 1, 1.0]])
    with numpy.errstate(over="raise", invalid="raise", divide="raise"):
        net.forward(X)
        value = net.backward(Y, loss)
    assert math.isfinite(value)
    for layer in net.layers:
        assert numpy.all(numpy.isfinite(host(layer.grad_W)))
    if loss != "squared_error":   # large but finite: confident wrong answers cost about |z|
        assert value > 100
