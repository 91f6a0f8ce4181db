"""Checkpoints and callbacks: a run stopped at any moment and started again ends bitwise where an
uninterrupted run ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy
import pytest

import gpunn
from helpers import host, rng

X = rng(0).normal(size=(60, 6))
LABELS = rng(1).integers(0, 3, size=60)
XV, LV = rng(2).normal(size=(20, 6)), rng(3).integers(0, 3, size=20)


def _net(device):
    return gpunn.mlp([6, 10, 3], activation="tanh", device=device, seed=5)


def _fit(net, epochs, **kw):
    opt = kw.pop("optimizer", None) or gpunn.SGD(lr=0.1, momentum=0.9)
    return net.fit(X, LABELS, loss="cross_entropy", optimizer=opt, epochs=epochs, batch_size=16,
                   validation_data=(XV, LV), **kw)


class Crash(Exception):
    pass


class CrashAfter(gpunn.callbacks.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, record):
        if record["epoch"] == self.epoch:
            raise Crash


@pytest.mark.parametrize("optimizer", [lambda: gpunn.SGD(lr=0.1, momentum=0.9),
                                       lambda: gpunn.Adam(lr=gpunn.schedules.CosineDecay(0.01, 20))],
                         ids=["sgd-momentum", "adam-cosine"])
def test_a_crashed_run_resumes_bitwise(device, tmp_path, optimizer):
    ref = _net(device)
    ref_hist = _fit(ref, 6, optimizer=optimizer())
    ck = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        _fit(_net(device), 6, optimizer=optimizer(), checkpoint=ck, callbacks=[CrashAfter(2)])
    again = _net(device)                                   # a new process would start from scratch like this
    ran = []
    hist = _fit(again, 6, optimizer=optimizer(), checkpoint=ck,
                callbacks=[gpunn.callbacks.LambdaCallback(lambda r: ran.append(r["epoch"]))])
    assert ran == [2, 3, 4, 5, 6]    # resumed after epoch 1, the last checkpoint (the crash came before epoch 2's)
    numpy.testing.assert_array_equal(host(again.flat_parameters()), host(ref.flat_parameters()))
    assert [r["loss"] for r in hist.epochs] == [r["loss"] for r in ref_hist.epochs]
    assert again.optimizer.t == ref.optimizer.t


def test_training_longer_continues_the_same_run(tmp_path):
    ref = _net("cpu")
    _fit(ref, 5)
    net = _net("cpu")
    _fit(net, 3, checkpoint=tmp_path / "c")
    _fit(_net("cpu"), 5, checkpoint=tmp_path / "c")         # a fresh network picks the run up at epoch 3
    resumed = gpunn.mlp([6, 10, 3], activation="tanh", device="cpu", seed=5)
    h = _fit(resumed, 5, checkpoint=tmp_path / "c")         # already finished: nothing more to do
    assert len(h) == 5
    numpy.testing.assert_array_equal(host(resumed.flat_parameters()), host(ref.flat_parameters()))


def test_early_stopping_state_survives_a_crash(tmp_path):
    ref = _net("cpu")
    ref_hist = _fit(ref, 40, optimizer=gpunn.Adam(lr=0.05), patience=2)
    assert ref_hist.stopped_early
    crash_at = ref_hist.best_epoch + 1
    with pytest.raises(Crash):
        _fit(_net("cpu"), 40, optimizer=gpunn.Adam(lr=0.05), patience=2, checkpoint=tmp_path / "c",
             callbacks=[CrashAfter(crash_at)])
    net = _net("cpu")
    hist = _fit(net, 40, optimizer=gpunn.Adam(lr=0.05), patience=2, checkpoint=tmp_path / "c")
    assert (len(hist), hist.best_epoch, hist.stopped_early) == (len(ref_hist), ref_hist.best_epoch, True)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), host(ref.flat_parameters()))


@pytest.mark.parametrize("change,what", [
    (dict(optimizer=gpunn.SGD(lr=0.2, momentum=0.9)), "optimizer"),
    (dict(batch_size=8), "batch_size"),
    (dict(X=X + 1e-3), "data"),
])
def test_a_checkpoint_of_another_run_is_refused(tmp_path, change, what):
    _fit(_net("cpu"), 1, checkpoint=tmp_path / "c")
    kw = dict(loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1, momentum=0.9), epochs=2, batch_size=16,
              validation_data=(XV, LV), checkpoint=tmp_path / "c")
    data = change.pop("X", X)
    kw.update(change)
    with pytest.raises(gpunn.ConfigError, match=f"another run.*{what}"):
        _net("cpu").fit(data, LABELS, **kw)


def test_callbacks_can_stop_training_and_bad_ones_are_refused():
    seen = []
    stop = gpunn.callbacks.LambdaCallback(lambda r: seen.append(r["epoch"]) or r["epoch"] == 3)
    h = _fit(_net("cpu"), 10, callbacks=[stop])
    assert seen == [1, 2, 3] and len(h) == 3 and h.stopped_early
    with pytest.raises(gpunn.ConfigError, match="on_epoch_end"):
        _fit(_net("cpu"), 1, callbacks=[object()])


CLI = [sys.executable, "-m", "gpunn.cli", "train", "--device", "cpu", "--epochs", "400", "--seed", "1"]


def test_cli_runs_killed_at_random_moments_resume_to_the_same_model(tmp_path):
    """`gpunn train --checkpoint PATH` killed with SIGKILL, then run again until it finishes: the saved
    model is bitwise the uninterrupted run's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(CLI + ["--save", str(tmp_path / "ref.npz")], check=True, env=env, capture_output=True)
    ck, out = tmp_path / "run.ckpt", tmp_path / "out.npz"
    g = numpy.random.default_rng(7)
    killed = 0
    for _ in range(12):
        proc = subprocess.Popen(CLI + ["--checkpoint", str(ck), "--save", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=float(g.uniform(0.4, 1.2)))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
        if proc.returncode == 0:
            break
    else:
        proc = subprocess.run(CLI + ["--checkpoint", str(ck), "--save", str(out)], env=env, capture_output=True)
        assert proc.returncode == 0, proc.stderr
    ref = gpunn.load(tmp_path / "ref.npz", device="cpu")
    got = gpunn.load(out, device="cpu")
    numpy.testing.assert_array_equal(host(got.flat_parameters()), host(ref.flat_parameters()))
    assert killed > 0, "never killed: the test did not test resuming"


def test_a_run_that_stopped_early_stays_stopped(tmp_path):
    first = _net("cpu")
    h1 = _fit(first, 40, optimizer=gpunn.Adam(lr=0.05), patience=2, checkpoint=tmp_path / "c")
    assert h1.stopped_early
    again = _net("cpu")
    h2 = _fit(again, 40, optimizer=gpunn.Adam(lr=0.05), patience=2, checkpoint=tmp_path / "c")
    assert h2.stopped_early and len(h2) == len(h1) and h2.best_epoch == h1.best_epoch
    numpy.testing.assert_array_equal(host(again.flat_parameters()), host(first.flat_parameters()))
