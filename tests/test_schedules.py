"""Learning-rate schedules against formulas written here, and optimisers that follow them."""
from __future__ import annotations

import math

import numpy
import pytest

import fakecupy
import gpunn
from gpunn.ops import ops_for
from gpunn.schedules import CosineDecay, ExponentialDecay, StepDecay
from helpers import host, rng


def test_the_issue_s_example():
    s = CosineDecay(0.5, total_steps=100)
    assert (s(0), s(50), s(100), s(150)) == (0.5, 0.25, 0.0, 0.0)


@pytest.mark.parametrize("step", [0, 1, 99, 100, 101, 250, 1000])
def test_schedules_match_their_formulas(step):
    assert StepDecay(0.3, 0.5, 100)(step) == pytest.approx(0.3 * 0.5 ** (step // 100), rel=1e-15)
    assert ExponentialDecay(0.3, 0.9, 100)(step) == pytest.approx(0.3 * 0.9 ** (step / 100), rel=1e-15)
    t = min(step, 200) / 200
    assert CosineDecay(0.3, 200, final=0.01)(step) == pytest.approx(0.01 + 0.29 * (1 + math.cos(math.pi * t)) / 2)


@pytest.mark.parametrize("bad", [
    lambda: StepDecay(0.1, factor=0), lambda: StepDecay(-1), lambda: StepDecay(0.1, every=0),
    lambda: ExponentialDecay(0.1, rate=1.5), lambda: CosineDecay(0.1, total_steps=2.5),
    lambda: CosineDecay(0.1, 10, final=0.2), lambda: gpunn.SGD(lr="0.1")])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(gpunn.ConfigError):
        bad()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimisers_follow_the_schedule_step_by_step(device, kind):
    sched = StepDecay(0.1, 0.5, every=2)
    opt = gpunn.SGD(lr=sched, momentum=0.9) if kind == "sgd" else gpunn.Adam(lr=sched)
    g = rng(3)
    w0, grads = g.normal(size=50), [g.normal(size=50) for _ in range(5)]
    dev = gpunn.get_device(device)
    p = dev.asarray(w0.copy(), dtype="float64")
    for grad in grads:
        opt.update(p, dev.asarray(grad, dtype="float64"), None, ops_for(dev))
    ref, v, m = w0.copy(), numpy.zeros(50), numpy.zeros(50)
    for t, grad in enumerate(grads):                       # η of step t is the schedule at t (from 0)
        lr = 0.1 * 0.5 ** (t // 2)
        if kind == "sgd":
            v = 0.9 * v + grad
            ref = ref - lr * v
        else:
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad * grad
            ref = ref - lr * (m / (1 - 0.9 ** (t + 1))) / (numpy.sqrt(v / (1 - 0.999 ** (t + 1))) + 1e-8)
    numpy.testing.assert_allclose(host(p), ref, rtol=1e-12)
    assert opt.current_lr() == 0.1 * 0.5 ** 2


def test_a_schedule_on_the_gpu_neither_recompiles_nor_syncs(fake_gpu):
    net = gpunn.mlp([6, 8, 3], activation="tanh", device="cuda:0", seed=0)
    module = net.ops.kernels.module
    x = net.device.asarray(rng(0).normal(size=(8, 6)), dtype=net.dtype)
    t = net.device.asarray(numpy.eye(3)[rng(1).integers(0, 3, 8)], dtype=net.dtype)
    opt = gpunn.SGD(lr=CosineDecay(0.5, total_steps=4), momentum=0.9)
    fakecupy.ndarray.reads = 0
    for _ in range(5):
        net.train_step(x, t, "cross_entropy", opt)
    assert fakecupy.ndarray.reads == 0 and net.ops.kernels.module is module
    assert module.launches["sgd_update<float>"] == 5


def test_schedules_are_equal_when_their_kind_and_every_setting_are():
    assert StepDecay(0.1, 0.5, 10) == StepDecay(0.1, 0.5, 10)
    assert StepDecay(0.1, 0.5, 10) != StepDecay(0.2, 0.5, 10)
    assert CosineDecay(0.1, 10) != CosineDecay(0.1, 20)
    assert len({StepDecay(0.1), StepDecay(0.1), ExponentialDecay(0.1)}) == 2


def test_optimiser_configs_round_trip():
    for opt in (gpunn.SGD(lr=CosineDecay(0.5, 100, final=0.1), momentum=0.5, nesterov=True, weight_decay=1e-4),
                gpunn.Adam(lr=ExponentialDecay(1e-3, 0.9, 10), betas=(0.8, 0.99)), gpunn.SGD(lr=0.2)):
        back = gpunn.optim.from_config(opt.config())
        assert type(back) is type(opt) and back.config() == opt.config()
