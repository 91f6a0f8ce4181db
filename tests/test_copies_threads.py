"""Copies, pickles and threads: a copied optimiser or network trains as the original would, an optimiser
outlives its first network, and another thread's save/copy/pickle/predict gets ConcurrencyError or a
consistent snapshot, never a corrupt file or torn weights (real threads, ordered by events)."""
from __future__ import annotations

import copy
import gc
import pickle
import threading

import numpy
import pytest

import gpunn
from gpunn.errors import ConcurrencyError, DivergenceError
from helpers import host, rng

X, Y = rng(0).normal(size=(32, 3)), rng(1).normal(size=(32, 2))
COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o))}
OPTIMISERS = {"adam": lambda: gpunn.Adam(lr=0.01), "momentum": lambda: gpunn.SGD(lr=0.05, momentum=0.9),
              "nesterov": lambda: gpunn.SGD(lr=0.05, momentum=0.9, nesterov=True)}


def _net(seed=0, hidden=5):
    return gpunn.mlp([3, hidden, 2], activation="tanh", output="identity", device="cpu", dtype="float64", seed=seed)


def _steps(net, opt, n=3):
    for _ in range(n):
        net.train_step(X, Y, "squared_error", opt)
    return host(net.flat_parameters())


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("make", list(OPTIMISERS))
def test_a_copy_of_an_unused_optimiser_steps_as_a_fresh_one(make, how):
    copied = COPIES[how](OPTIMISERS[make]())
    numpy.testing.assert_array_equal(_steps(_net(), copied), _steps(_net(), OPTIMISERS[make]()))


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("make", list(OPTIMISERS))
def test_a_copy_of_a_loaded_network_trains_as_the_loaded_one(tmp_path, make, how):
    net = _net()
    net.fit(X, Y, optimizer=OPTIMISERS[make](), epochs=2, batch_size=8)
    net.save(tmp_path / "m.npz")
    a, b = gpunn.load(tmp_path / "m.npz", device="cpu"), COPIES[how](gpunn.load(tmp_path / "m.npz", device="cpu"))
    a.fit(X, Y, epochs=2, batch_size=8)
    b.fit(X, Y, epochs=2, batch_size=8)
    numpy.testing.assert_array_equal(host(b.flat_parameters()), host(a.flat_parameters()))


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_of_a_used_optimiser_continues_its_state(how):
    net, opt = _net(), OPTIMISERS["adam"]()
    _steps(net, opt)
    twin = COPIES[how](net)
    numpy.testing.assert_array_equal(_steps(twin, twin.optimizer or COPIES[how](opt)) if twin.optimizer else
                                     _steps(twin, COPIES[how](opt)), _steps(net, opt))


@pytest.mark.parametrize("make", list(OPTIMISERS))
def test_an_optimiser_whose_first_network_is_gone_rolls_back_cleanly(make):
    """A first-epoch roll-back with an optimiser reused from a network now gone: DivergenceError (not a raw
    ValueError), and exactly the roll-back of a fresh optimiser."""
    reused = OPTIMISERS[make]()
    first = _net(hidden=7)
    first.fit(X, Y, optimizer=reused, epochs=1, batch_size=8)
    del first
    gc.collect()
    reused.lr = 1e200
    fresh = OPTIMISERS[make]()
    fresh.lr = 1e200
    results = []
    for opt in (reused, fresh):
        net = gpunn.Sequential([gpunn.Dense(3, 6, "identity"), gpunn.Dense(6, 2, "identity")], device="cpu",
                               dtype="float64", seed=0)
        with pytest.raises(DivergenceError, match="epoch 1,") as exc:
            net.fit(X, Y, optimizer=opt, epochs=3, batch_size=8)
        results.append((str(exc.value), host(net.flat_parameters())))
    assert results[0][0] == results[1][0]
    numpy.testing.assert_array_equal(results[0][1], results[1][1])


def test_ctrl_c_in_the_first_epoch_with_a_reused_optimiser_restores_the_start():
    reused = gpunn.SGD(lr=0.05, momentum=0.9)
    first = _net(hidden=7)
    first.fit(X, Y, optimizer=reused, epochs=1, batch_size=8)
    del first
    gc.collect()
    net = _net()
    start = host(net.flat_parameters())
    calls = {"n": 0}
    real = net.train_step

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    net.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, Y, optimizer=reused, epochs=2, batch_size=8)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), start)


# -- threads --------------------------------------------------------------------------------------------
class Paused(gpunn.callbacks.Callback):
    """Holds the training thread at the end of epoch 1 until ``go`` is set."""

    def __init__(self):
        self.inside, self.go = threading.Event(), threading.Event()

    def on_epoch_end(self, record):
        if record["epoch"] == 1:
            self.inside.set()
            assert self.go.wait(30)


def test_readers_in_another_thread_get_concurrency_error_while_training(tmp_path):
    net = _net()
    net.save(tmp_path / "m.npz")
    good = (tmp_path / "m.npz").read_bytes()
    pause = Paused()
    trainer = threading.Thread(target=net.fit, args=(X, Y), kwargs=dict(epochs=3, batch_size=8, callbacks=[pause]))
    trainer.start()
    try:
        assert pause.inside.wait(30)
        for what, call in [("save", lambda: net.save(tmp_path / "m.npz")), ("deepcopy", lambda: copy.deepcopy(net)),
                           ("pickle", lambda: pickle.dumps(net)), ("predict", lambda: net.predict(X)),
                           ("evaluate", lambda: net.evaluate(X, Y)), ("to", lambda: net.to("cpu", fused=False)),
                           ("train_step", lambda: net.train_step(X, Y, "squared_error", gpunn.SGD()))]:
            with pytest.raises(ConcurrencyError, match="another thread"):
                call()
            assert what
        assert (tmp_path / "m.npz").read_bytes() == good          # the earlier file, untouched
    finally:
        pause.go.set()
        trainer.join(30)
    assert len(net.history) == 3
    net.save(tmp_path / "m.npz")                                  # after training: saved and read back
    numpy.testing.assert_array_equal(host(gpunn.load(tmp_path / "m.npz").flat_parameters()),
                                     host(net.flat_parameters()))


def test_the_training_thread_itself_saves_and_copies_at_an_epoch_boundary(tmp_path):
    net = _net()
    seen = []

    class SaveEach(gpunn.callbacks.Callback):
        def on_epoch_end(self, record):
            net.save(tmp_path / f"e{record['epoch']}.npz")
            seen.append((host(net.flat_parameters()), copy.deepcopy(net)))
    net.fit(X, Y, epochs=2, batch_size=8, callbacks=[SaveEach()])
    for k, (params, twin) in enumerate(seen, 1):
        numpy.testing.assert_array_equal(host(gpunn.load(tmp_path / f"e{k}.npz").flat_parameters()), params)
        numpy.testing.assert_array_equal(host(twin.flat_parameters()), params)


def test_training_waits_for_a_predict_already_running():
    """predict checked for a trainer, then computed: a fit starting in between must wait, not change the
    weights under it (the check-then-lock race)."""
    net = _net()
    expected = host(net.predict(X, batch_size=4))
    inside, go = threading.Event(), threading.Event()
    layer = net.layers[0]
    real = layer.infer

    def slow_infer(x, ops):
        inside.set()
        assert go.wait(30)
        return real(x, ops)
    layer.infer = slow_infer
    out = {}
    reader = threading.Thread(target=lambda: out.setdefault("y", host(net.predict(X, batch_size=4))))
    reader.start()
    assert inside.wait(30)
    trainer = threading.Thread(target=net.fit, args=(X, Y), kwargs=dict(epochs=2, batch_size=8))
    trainer.start()
    while not net._admission.busy_elsewhere():      # the trainer has arrived and waits for the reader
        threading.Event().wait(0.001)
    trainer.join(0.5)                               # time enough to train, were it not waiting
    assert trainer.is_alive()
    before = host(net.flat_parameters())
    go.set()
    reader.join(30)
    trainer.join(30)
    layer.infer = real
    numpy.testing.assert_array_equal(out["y"], expected)
    assert not numpy.array_equal(host(net.flat_parameters()), before)       # and then it trained
