"""The network's public surface: mlp(), train_step(), flat_gradients(), and the inference path."""
from __future__ import annotations

import math
import threading

import numpy
import pytest

import fakecupy
import gpunn
from helpers import host, race, rng

X = rng(0).normal(size=(50, 6))
LABELS = rng(1).integers(0, 3, size=50)


def test_mlp_builds_the_layers_it_is_asked_for(device):
    net = gpunn.mlp([6, 9, 7, 3], activation="tanh", output="softmax", init="small", device=device, seed=0)
    assert [(layer.n_in, layer.n_out, layer.activation.name, layer.init) for layer in net.layers] == [
        (6, 9, "tanh", "small"), (9, 7, "tanh", "small"), (7, 3, "softmax", "small")]
    assert net.device == device and net.n_parameters == 6 * 9 + 9 + 9 * 7 + 7 + 7 * 3 + 3
    with pytest.raises(gpunn.ConfigError, match="two sizes"):
        gpunn.mlp([4])


@pytest.mark.parametrize("name,draw", [
    ("small", lambda g, n_in, n_out: g.normal(0.0, 0.01, size=(n_in, n_out))),            # lecture §2 step 1
    ("xavier", lambda g, n_in, n_out: g.uniform(-math.sqrt(6 / (n_in + n_out)), math.sqrt(6 / (n_in + n_out)),
                                                size=(n_in, n_out))),                     # Glorot uniform
    ("he", lambda g, n_in, n_out: g.normal(0.0, math.sqrt(2 / n_in), size=(n_in, n_out))),  # He normal
])
def test_initialisers_draw_the_written_distributions(name, draw):
    """Each initialiser is its one-line draw from the seeded generator, written here."""
    numpy.testing.assert_array_equal(gpunn.init.get(name)(rng(5), 7, 3), draw(rng(5), 7, 3))


def test_the_default_initialiser_is_he_for_the_relu_family_and_xavier_otherwise():
    for act in ("relu", "leaky_relu", "elu", "softplus"):
        assert gpunn.Dense(3, 2, act).init == "he", act
    for act in ("sigmoid", "tanh", "identity", "softmax"):
        assert gpunn.Dense(3, 2, act).init == "xavier", act


def test_softmax_over_one_output_is_refused():
    with pytest.raises(gpunn.ConfigError, match="single output"):
        gpunn.mlp([3, 1], output="softmax")


def _prepared(net, n=16):
    x = net.device.asarray(X[:n], dtype=net.dtype)
    t = net.device.asarray(numpy.eye(3)[LABELS[:n]], dtype=net.dtype)
    return x, t


def test_train_step_is_forward_backward_update(device):
    a = gpunn.mlp([6, 8, 3], activation="relu", device=device, dtype="float64", seed=2)
    b = gpunn.mlp([6, 8, 3], activation="relu", device=device, dtype="float64", seed=2)
    x, t = _prepared(a)
    opt_a, opt_b = gpunn.SGD(lr=0.2, momentum=0.9), gpunn.SGD(lr=0.2, momentum=0.9)
    for _ in range(3):
        loss = a.train_step(x, t, "cross_entropy", opt_a)
        b.forward(X[:16])
        expected = b.backward(LABELS[:16], "cross_entropy")
        b.step(opt_b)
        assert getattr(loss, "ndim", 0) == 0 and float(loss) == pytest.approx(expected, rel=1e-12)
    numpy.testing.assert_array_equal(host(a.flat_parameters()), host(b.flat_parameters()))
    numpy.testing.assert_array_equal(host(a.flat_gradients()), host(b.flat_gradients()))


def test_train_step_checks_what_it_is_given(device):
    net = gpunn.mlp([6, 8, 3], device=device, seed=0)
    opt = gpunn.SGD(lr=0.1)
    loss = net.train_step(X[:5].tolist(), LABELS[:5], "cross_entropy", opt)   # lists and labels: checked copies
    assert numpy.isfinite(float(loss))
    with pytest.raises(gpunn.ShapeError):
        net.train_step(X[:5, :4], LABELS[:5], "cross_entropy", opt)
    with pytest.raises(gpunn.DataError, match="NaN"):
        net.train_step(numpy.full((2, 6), numpy.nan), LABELS[:2], "cross_entropy", opt)
    with pytest.raises(gpunn.ConfigError, match="optimiser"):
        net.train_step(X[:5], LABELS[:5], "cross_entropy", "sgd")
    with pytest.raises(gpunn.ConfigError, match="softmax"):
        net.train_step(X[:5], LABELS[:5], "binary_cross_entropy", opt)


def test_flat_gradients_lay_out_as_the_parameters(device):
    net = gpunn.mlp([6, 5, 3], device=device, dtype="float64", seed=0)
    net.forward(X[:10])
    net.backward(LABELS[:10], "cross_entropy")
    per_layer = numpy.concatenate([host(a).ravel() for layer in net.layers for a in (layer.grad_W, layer.grad_b)])
    numpy.testing.assert_array_equal(host(net.flat_gradients()), per_layer)


def test_predict_and_evaluate_leave_the_training_pass_alone(device):
    net = gpunn.mlp([6, 8, 3], activation="elu", device=device, dtype="float64", seed=0)
    net.forward(X[:16])
    net.backward(LABELS[:16], "cross_entropy")
    seen = [{k: host(getattr(layer, k)) for k in ("x", "z", "y", "delta", "grad_W")} for layer in net.layers]
    net.predict(X)                     # 50 rows: another batch size
    net.predict(X[:16])                # the training pass's batch size
    net.evaluate(X, LABELS, "cross_entropy")
    for layer, before in zip(net.layers, seen):
        for k, v in before.items():
            numpy.testing.assert_array_equal(host(getattr(layer, k)), v, err_msg=k)


def test_predict_matches_a_formula_written_here(device):
    net = gpunn.mlp([6, 8, 3], activation="tanh", device=device, dtype="float64", seed=3)
    W1, b1, W2, b2 = (host(p) for p in net.parameters())
    z = numpy.tanh(X @ W1 + b1) @ W2 + b2
    expected = numpy.exp(z) / numpy.exp(z).sum(axis=1, keepdims=True)
    for batch_size in (50, 7, 1):      # whole, chunks with a remainder, one row at a time
        numpy.testing.assert_allclose(host(net.predict(X, batch_size=batch_size)), expected, rtol=1e-12)
    ev = net.evaluate(X, LABELS, "cross_entropy")
    assert ev.loss == pytest.approx(-numpy.mean(numpy.log(expected[numpy.arange(50), LABELS])), rel=1e-12)
    assert ev.accuracy == pytest.approx(numpy.mean(expected.argmax(axis=1) == LABELS))


def test_predict_from_several_threads_gives_each_caller_its_own_result():
    net = gpunn.mlp([6, 32, 3], activation="relu", device="cpu", dtype="float64", seed=0)
    inputs = [rng(10 + k).normal(size=(200 + k, 6)) for k in range(8)]
    expected = [net.predict(x, batch_size=64) for x in inputs]
    got = [None] * len(inputs)

    def work(k):
        for _ in range(20):
            got[k] = net.predict(inputs[k], batch_size=64)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    race(threads)
    for g, e in zip(got, expected):
        numpy.testing.assert_array_equal(g, e)


def test_inference_runs_the_fused_kernels(fake_gpu):
    net = gpunn.mlp([6, 9, 3], activation="tanh", device="cuda:0", seed=0)
    assert net.fused
    launches = net.ops.kernels.module.launches
    launches.clear()
    fakecupy.ndarray.reads = 0
    net.predict(fake_gpu.asarray(X))
    assert launches == {"bias_act_fwd<float, 2>": 1, "softmax_fwd<float>": 1}, launches   # both layers fused


def test_fit_shuffles_each_epoch_in_the_seeded_order(device):
    """fit(shuffle=True) = train_step over each epoch's permutation, drawn from the seed's second stream."""
    net = gpunn.mlp([6, 8, 3], activation="tanh", device=device, dtype="float64", seed=7)
    ref = gpunn.mlp([6, 8, 3], activation="tanh", device=device, dtype="float64", seed=7)
    net.fit(X, LABELS, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1), epochs=2, batch_size=16)
    order = numpy.random.Generator(numpy.random.PCG64(numpy.random.SeedSequence(7).spawn(2)[1]))
    opt = gpunn.SGD(lr=0.1)
    for _ in range(2):
        perm = order.permutation(len(X))
        for s in range(0, len(X), 16):
            ref.train_step(X[perm[s:s + 16]], LABELS[perm[s:s + 16]], "cross_entropy", opt)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), host(ref.flat_parameters()))
    unshuffled = gpunn.mlp([6, 8, 3], activation="tanh", device=device, dtype="float64", seed=7)
    unshuffled.fit(X, LABELS, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1), epochs=2, batch_size=16,
                   shuffle=False)
    assert not numpy.array_equal(host(unshuffled.flat_parameters()), host(net.flat_parameters()))


# -- ownership and threads: refused, never silently mixed -------------------------------------------------
def test_one_optimiser_trains_one_network(device):
    a, b = (gpunn.mlp([6, 8, 3], device=device, seed=s) for s in (0, 1))
    opt = gpunn.SGD(lr=0.1, momentum=0.9)
    a.fit(X, LABELS, loss="cross_entropy", optimizer=opt, epochs=1)
    with pytest.raises(gpunn.ConfigError, match="one optimiser per network"):
        b.fit(X, LABELS, loss="cross_entropy", optimizer=opt, epochs=1)
    with pytest.raises(gpunn.ConfigError, match="one optimiser per network"):
        b.train_step(X[:4], LABELS[:4], "cross_entropy", opt)
    opt.reset()                               # an explicit reset frees it, momentum and all
    b.fit(X, LABELS, loss="cross_entropy", optimizer=opt, epochs=1)
    assert opt.t == 2                         # 50 samples, batch 32: two steps, counted from zero again


def test_a_layer_belongs_to_one_network():
    layer = gpunn.Dense(6, 3, "softmax")
    first = gpunn.Sequential([layer], device="cpu", seed=0)
    with pytest.raises(gpunn.ConfigError, match="already belongs to another network"):
        gpunn.Sequential([layer], device="cpu", seed=1)
    assert first.layers[0].W is not None
    del first
    import gc
    gc.collect()
    gpunn.Sequential([layer], device="cpu", seed=1)     # the first network is gone: the layer is free


def test_a_fit_refused_for_its_data_changes_nothing(device):
    net = gpunn.mlp([6, 8, 3], device=device, seed=0)
    net.fit(X, LABELS, loss="cross_entropy", epochs=1)
    before = (net.loss, net.optimizer, net.history, host(net.flat_parameters()))
    with pytest.raises(gpunn.DataError):
        net.fit(X, numpy.full(50, 7), loss="cross_entropy", optimizer=gpunn.Adam(), epochs=1)
    assert (net.loss, net.optimizer, net.history) == before[:3]
    numpy.testing.assert_array_equal(host(net.flat_parameters()), before[3])


def test_training_from_a_second_thread_is_refused():
    net = gpunn.mlp([6, 8, 3], device="cpu", seed=0)
    inside, release = threading.Event(), threading.Event()

    def progress(record):
        inside.set()
        release.wait(10)
    worker = threading.Thread(target=net.fit, args=(X, LABELS),
                              kwargs=dict(loss="cross_entropy", epochs=2, progress=progress))
    worker.start()
    try:
        assert inside.wait(10)
        with pytest.raises(gpunn.ConcurrencyError, match="another thread"):
            net.train_step(X[:4], LABELS[:4], "cross_entropy", gpunn.SGD())
        with pytest.raises(gpunn.ConcurrencyError):
            net.forward(X)
        with pytest.raises(gpunn.ConcurrencyError, match="predict and evaluate"):
            net.predict(X)
    finally:
        release.set()
        worker.join(10)
    assert len(net.history) == 2
    net.predict(X)                             # free again once the fit is over


# -- what Keras, PyTorch and scikit-learn users expect --------------------------------------------------
def _trained(device):
    net = gpunn.mlp([6, 8, 3], activation="relu", device=device, seed=4)
    net.fit(X, LABELS, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1, momentum=0.9), epochs=2, batch_size=16)
    return net


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_continue_exactly_like_the_original(device, how):
    import copy
    import pickle
    net = _trained(device)
    twin = pickle.loads(pickle.dumps(net)) if how == "pickle" else copy.deepcopy(net)
    assert twin.device == net.device and twin is not net and twin.optimizer is not net.optimizer
    numpy.testing.assert_array_equal(host(twin.predict(X)), host(net.predict(X)))
    assert twin.loss.name == "cross_entropy" and len(twin.history) == 2
    for n in (net, twin):                              # same momentum, same shuffling stream: same future
        n.fit(X, LABELS, epochs=2, batch_size=16)
    numpy.testing.assert_array_equal(host(twin.flat_parameters()), host(net.flat_parameters()))


def test_a_loaded_classifier_remembers_its_loss_and_optimiser(device, tmp_path):
    net = _trained(device)
    net.save(tmp_path / "m.npz")
    back = gpunn.load(tmp_path / "m.npz", device=device)
    assert back.evaluate(X, LABELS) == net.evaluate(X, LABELS)         # labels: cross-entropy, not squared error
    assert back.optimizer.config() == net.optimizer.config()
    back.fit(X, LABELS, epochs=1)                                       # keeps training with the same settings


def test_model_files_without_loss_or_optimiser_still_load(tmp_path):
    net = gpunn.mlp([6, 8, 3], device="cpu", seed=0)
    gpunn.io.write_model(tmp_path / "old.npz", net.config(), host(net.flat_parameters()))
    back = gpunn.load(tmp_path / "old.npz", device="cpu")
    assert back.loss is None and back.optimizer is None
    numpy.testing.assert_array_equal(host(back.predict(X)), host(net.predict(X)))


def test_summary_tables_the_layers():
    net = gpunn.mlp([64, 32, 10], activation="relu", device="cpu", seed=0)
    text = net.summary()
    assert repr(text) == str(text)
    lines = str(text).splitlines()
    assert lines[0] == "Sequential on cpu, float32" + (", fused CPU kernels" if net.fused else "")
    assert lines[2].split() == ["0", "Dense", "64", "->", "32", "ReLU()", "2,048", "32", "2,080"]
    assert lines[3].split() == ["1", "Dense", "32", "->", "10", "Softmax()", "320", "10", "330"]
    assert lines[4].split() == ["total", f"{64 * 32 + 32 + 32 * 10 + 10:,}"]


def test_pickling_keeps_seed_and_the_fused_choice(fake_gpu):
    import pickle
    net = gpunn.mlp([6, 8, 3], device="cuda:0", seed=11, fused=False)
    twin = pickle.loads(pickle.dumps(net))
    assert (twin.seed, twin.fused, str(twin.device)) == (11, False, "cuda:0")


def test_a_layer_pickles_as_its_configuration():
    import pickle
    layer = gpunn.Dense(4, 3, {"name": "elu", "a": 0.5}, init="small")
    gpunn.Sequential([layer], device="cpu", seed=0)
    back = pickle.loads(pickle.dumps(layer))
    assert back.config() == layer.config() and back.W is None       # no weights: they belong to the network
    assert repr(back) == "Dense(4, 3, activation=ELU(a=0.5))"
    gpunn.Sequential([back], device="cpu", seed=0)                 # free to join a network of its own
    assert "History(0 epochs" in repr(gpunn.History()) and repr(gpunn.losses.get("mse")) == "SquaredError()"
