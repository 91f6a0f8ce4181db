"""What fit and evaluate report, against formulas written here; divergence roll-back at every kind of
step (first of the run, first of an epoch, second of an epoch, after the last)."""
from __future__ import annotations

import re
import tracemalloc

import numpy
import pytest

import gpunn
import gpunn.trainer
from gpunn.ops import ops_for
from helpers import host, rng

X = rng(0).normal(size=(24, 5))
LABELS = rng(1).integers(0, 3, size=24)


def _forward(net, X):
    """The network's output by a formula written here (sigmoid hidden layer, any output)."""
    W1, b1, W2, b2 = (host(p).astype(numpy.float64) for p in net.parameters())
    h = 1 / (1 + numpy.exp(-(X @ W1 + b1)))
    return h @ W2 + b2


def test_evaluate_squared_error_and_binary_cross_entropy_match_their_formulas(device):
    Y = rng(2).normal(size=(24, 2))
    net = gpunn.mlp([5, 7, 2], activation="sigmoid", output="identity", device=device, dtype="float64", seed=1)
    z = _forward(net, X)
    assert net.evaluate(X, Y, "squared_error").loss == pytest.approx(0.5 * ((z - Y) ** 2).sum() / 24, rel=1e-12)
    T = (rng(3).uniform(size=(24, 2)) > 0.5).astype(float)
    net = gpunn.mlp([5, 7, 2], activation="sigmoid", output="sigmoid", device=device, dtype="float64", seed=1)
    z = _forward(net, X)
    p = 1 / (1 + numpy.exp(-z))
    bce = -(T * numpy.log(p) + (1 - T) * numpy.log(1 - p)).sum() / 24
    ev = net.evaluate(X, T, "binary_cross_entropy")
    assert ev.loss == pytest.approx(bce, rel=1e-12)
    assert ev.accuracy is None                      # two independent outputs per row: not classes


def test_history_records_the_loss_and_accuracy_of_each_step_s_weights(device):
    """One step per epoch, no shuffling: the epoch's record is the loss and accuracy of the weights the
    step started from."""
    net = gpunn.mlp([5, 7, 3], activation="sigmoid", output="softmax", device=device, dtype="float64", seed=1)
    z = _forward(net, X)
    p = numpy.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    h = net.fit(X, LABELS, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1), epochs=1, batch_size=24,
                shuffle=False)
    assert h.loss[0] == pytest.approx(-numpy.log(p[numpy.arange(24), LABELS]).mean(), rel=1e-12)
    assert h.accuracy[0] == pytest.approx(numpy.mean(p.argmax(axis=1) == LABELS))
    # with several steps the record is their mean weighted by the batch sizes (24 = 10 + 10 + 4)
    net2 = gpunn.mlp([5, 7, 3], activation="sigmoid", output="softmax", device=device, dtype="float64", seed=1)
    ref = gpunn.mlp([5, 7, 3], activation="sigmoid", output="softmax", device=device, dtype="float64", seed=1)
    h2 = net2.fit(X, LABELS, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1), epochs=1, batch_size=10,
                  shuffle=False)
    opt = gpunn.SGD(lr=0.1)
    steps = [float(ref.train_step(X[s:s + 10], LABELS[s:s + 10], "cross_entropy", opt)) for s in (0, 10, 20)]
    assert h2.loss[0] == pytest.approx((10 * steps[0] + 10 * steps[1] + 4 * steps[2]) / 24, rel=1e-12)


class _NaNAt:
    """Makes the loss of the ``at``-th train_step call (0-based) NaN, once; the update itself still runs."""

    def __init__(self, net, at):
        self.real, self.at, self.calls = net.train_step, at, 0

    def __call__(self, *args, **kwargs):
        value = self.real(*args, **kwargs)
        self.calls += 1
        if self.calls - 1 == self.at:
            value[...] = numpy.nan
        return value


@pytest.mark.parametrize("at", [0, 1, 3, 4, 5], ids=["first-of-run", "second-of-epoch-1", "first-of-epoch-2",
                                                        "second-of-epoch-2", "third-of-epoch-2"])
def test_the_weights_left_after_divergence_are_those_of_the_last_finite_loss(device, at, monkeypatch):
    """3 steps per epoch; the loss of global step ``at`` is NaN: the weights must be the initial ones
    plus ``at - 1`` updates (the state whose loss was the last finite one), or the initial ones at 0."""
    net = gpunn.mlp([5, 7, 3], activation="sigmoid", output="softmax", device=device, dtype="float64", seed=2)
    monkeypatch.setattr(net, "train_step", _NaNAt(net, at))
    with pytest.raises(gpunn.DivergenceError) as exc:
        net.fit(X, LABELS, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1, momentum=0.9), epochs=5,
                batch_size=8, shuffle=False)
    epoch, step = map(int, re.search(r"epoch (\d+), step (\d+)", str(exc.value)).groups())
    assert (epoch - 1) * 3 + step - 1 == at
    ref = gpunn.mlp([5, 7, 3], activation="sigmoid", output="softmax", device=device, dtype="float64", seed=2)
    opt = gpunn.SGD(lr=0.1, momentum=0.9)
    for g in range(max(at - 1, 0)):
        s = (g % 3) * 8
        ref.train_step(X[s:s + 8], LABELS[s:s + 8], "cross_entropy", opt)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), host(ref.flat_parameters()))


def test_progress_lines_say_what_the_record_holds(capsys):
    gpunn.trainer.report(True, {"epoch": 3, "loss": 0.123456, "accuracy": 0.5, "val_loss": 0.25,
                                 "val_accuracy": 0.75, "seconds": 1.5})
    assert capsys.readouterr().err == "epoch 3  loss 0.12346  acc 0.5000  val_loss 0.25000  val_acc 0.7500  1.50s\n"
    gpunn.trainer.report(True, {"epoch": 1, "loss": 2.0, "accuracy": None, "seconds": 0.25})
    assert capsys.readouterr().err == "epoch 1  loss 2.00000  0.25s\n"
    seen = []
    gpunn.trainer.report(seen.append, {"epoch": 1})
    gpunn.trainer.report(False, {"epoch": 2})
    assert seen == [{"epoch": 1}] and capsys.readouterr().err == ""


@pytest.mark.parametrize("opt", [gpunn.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                 gpunn.Adam(lr=1e-3, weight_decay=1e-3)], ids=["sgd", "adam"])
def test_optimiser_updates_allocate_nothing_in_the_steady_state(opt):
    n = 300_003                                   # more than one CPU block
    p, g, mask = numpy.zeros(n), numpy.ones(n), numpy.ones(n)
    ops = ops_for(gpunn.get_device("cpu"))
    for _ in range(2):
        opt.update(p, g, mask, ops)
    tracemalloc.start()
    try:
        for _ in range(3):
            opt.update(p, g, mask, ops)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4096, peak


def test_adam_betas_must_be_a_pair():
    with pytest.raises(gpunn.ConfigError, match="pair"):
        gpunn.Adam(betas=(0.9,))


@pytest.mark.parametrize("value,word", [(numpy.nan, "NaN"), (numpy.inf, "infinite")])
def test_divergence_says_which_non_finite_value(device, value, word, monkeypatch):
    net = gpunn.mlp([5, 7, 3], activation="sigmoid", output="softmax", device=device, dtype="float64", seed=2)
    real = net.train_step

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        out[...] = value
        return out
    monkeypatch.setattr(net, "train_step", step)
    with pytest.raises(gpunn.DivergenceError, match=f"the loss became {word} at epoch 1, step 1"):
        net.fit(X, LABELS, loss="cross_entropy", epochs=1, batch_size=8)


def test_early_stopping_counts_epochs_without_improvement():
    """Patience 2 on the training loss (no validation data): stop at the 2nd epoch that does not improve
    on the best; a tie is no improvement; the best epoch's weights are restored."""
    stopping = gpunn.trainer._EarlyStopping(2)
    params = numpy.zeros(3)
    losses = [5.0, 4.0, 4.0, 3.0, 3.5, 3.0]             # epoch 4 is the best; 5 and 6 do not improve
    stops = []
    for epoch, loss in enumerate(losses, start=1):
        params[:] = epoch
        stops.append(stopping.should_stop({"epoch": epoch, "loss": loss}, params))
    assert stops == [False, False, False, False, False, True]
    history = gpunn.History()
    stopping.restore_best(params, history)
    assert history.best_epoch == 4 and (params == 4).all()
    watched = gpunn.trainer._EarlyStopping(1)        # with validation data, val_loss is what counts
    assert not watched.should_stop({"epoch": 1, "loss": 9.0, "val_loss": 1.0}, params)
    assert watched.should_stop({"epoch": 2, "loss": 0.1, "val_loss": 2.0}, params)


def test_step_without_an_optimiser_is_sgd_at_0_1_and_keeps_it(device):
    net = gpunn.mlp([5, 7, 3], activation="sigmoid", output="softmax", device=device, dtype="float64", seed=1)
    for _ in range(2):
        net.forward(X)
        net.backward(LABELS, "cross_entropy")
        before, grad = host(net.flat_parameters()), host(net.flat_gradients())
        net.step()
        numpy.testing.assert_allclose(host(net.flat_parameters()), before - 0.1 * grad, rtol=1e-12, atol=1e-15)
    assert isinstance(net.optimizer, gpunn.SGD) and net.optimizer.t == 2


def test_cross_entropy_of_rows_at_very_different_scales(device):
    """Each row is shifted by its own maximum: a shared shift would make the small rows' e^z vanish."""
    net = gpunn.mlp([2, 3], output="softmax", device=device, dtype="float64", seed=0)
    W, b = net.parameters()
    W[...] = net.device.asarray(numpy.eye(2, 3))
    x = numpy.array([[1000.0, 0.0], [0.0, 1.0]])
    z = x @ numpy.eye(2, 3)
    lse = numpy.array([numpy.log(numpy.exp(r - r.max()).sum()) + r.max() for r in z])
    want = numpy.mean(lse - z[numpy.arange(2), [0, 1]])
    assert net.evaluate(x, [0, 1], "cross_entropy").loss == pytest.approx(want, rel=1e-12)
