"""Streamed batches (backend.HostToDevice) on the fake GPU's log: what a card must finish before what.

The fake runs everything at once, so order is proven on what it was asked to do (``fakecupy.LOG``): work
queued on one stream runs in order, and a stream's ``wait_event`` waits for the latest ``record`` of that
event before it. From that, vector clocks say whether one operation must have finished before another.
"""
from __future__ import annotations

import numpy
import pytest

import fakecupy
import gpunn
from gpunn.backend import HostToDevice
from helpers import rng


def happens_before(log: list[tuple]) -> list[dict[int, int]]:
    """For each operation in ``log``, a vector clock: stream -> how many of that stream's operations must
    have finished before it starts, itself included."""
    stream_clock: dict[int, dict[int, int]] = {}
    event_clock: dict[int, dict[int, int]] = {}
    clocks = []
    for kind, stream, x in log:
        vc = dict(stream_clock.get(stream, {}))
        if kind == "wait":
            for s, n in event_clock.get(x, {}).items():
                vc[s] = max(vc.get(s, 0), n)
        vc[stream] = vc.get(stream, 0) + 1
        if kind == "record":
            event_clock[x] = vc
        stream_clock[stream] = vc
        clocks.append(vc)
    return clocks


def after(clocks: list[dict[int, int]], log: list[tuple], a: int, b: int) -> bool:
    """Whether operation ``b`` must wait for operation ``a`` to finish."""
    return clocks[b].get(log[a][1], 0) >= clocks[a][log[a][1]]


def _positions(log: list[tuple], kind: str) -> list[int]:
    return [i for i, op in enumerate(log) if op[0] == kind]


def test_copy_k_plus_1_overlaps_step_k_and_copy_k_plus_2_waits_for_it(fake_gpu):
    """Batch k + 1's copy waits only for step k − 1 (the last reader of its buffer), so it can run while
    step k computes; batch k + 2's copy, into step k's buffer, waits for step k; step k waits for its copy."""
    dev = gpunn.Device("cuda:0")
    stage = HostToDevice(dev, (8, 3), numpy.float32)
    fakecupy.LOG.clear()
    for k in range(6):
        stage.slot()[:] = k
        x = stage.send(8)
        assert float(x[0, 0]) == k
        fakecupy.LOG.append(("kernel", 0, f"step {k}"))          # the step, queued on the compute stream
    log = fakecupy.LOG
    clocks = happens_before(log)
    copies, steps = _positions(log, "copy"), _positions(log, "kernel")
    assert len(copies) == len(steps) == 6 and all(log[c][1] != 0 for c in copies)   # copies on their own stream
    for k in range(6):
        assert after(clocks, log, copies[k], steps[k]), f"step {k} does not wait for its copy"
        if k + 1 < 6:
            assert not after(clocks, log, steps[k], copies[k + 1]), f"copy {k + 1} waits for step {k}"
        if k + 2 < 6:
            assert after(clocks, log, steps[k], copies[k + 2]), f"copy {k + 2} overwrites step {k}'s batch"


def test_no_event_is_made_per_batch_and_none_times(fake_gpu):
    dev = gpunn.Device("cuda:0")
    stage = HostToDevice(dev, (4, 2), numpy.float32)
    made = fakecupy._Event.made
    for _ in range(10):
        stage.slot()[:] = 1.0
        stage.send(4)
    assert fakecupy._Event.made == made
    assert all(e.disable_timing for e in stage.copied + stage.released)


def test_a_streamed_fit_overlaps_each_copy_with_the_previous_step(fake_gpu, tmp_path):
    """In a fused fit over a memmap, no batch's copy waits for the kernels of the step before it, and
    every copy after the second waits for all kernels of the step two batches back."""
    X = rng(0).normal(size=(64, 6)).astype("float32")
    path = tmp_path / "x.npy"
    numpy.save(path, X)
    mm = numpy.load(path, mmap_mode="r")
    net = gpunn.mlp([6, 9, 3], activation="tanh", device="cuda:0", seed=2)
    assert net.ops.fused
    fakecupy.LOG.clear()
    net.fit(mm, rng(1).integers(0, 3, 64), loss="cross_entropy", epochs=1, batch_size=8, shuffle=False)
    log = fakecupy.LOG
    clocks = happens_before(log)
    copies = _positions(log, "copy")
    assert len(copies) == 8
    steps = [[i for i in _positions(log, "kernel") if a < i < b] for a, b in zip(copies, copies[1:] + [len(log)])]
    assert all(steps)
    for k in range(len(copies)):
        if k + 1 < len(copies):
            assert not any(after(clocks, log, i, copies[k + 1]) for i in steps[k]), k
        if k + 2 < len(copies):
            assert all(after(clocks, log, i, copies[k + 2]) for i in steps[k]), k


@pytest.mark.parametrize("kind", ["record", "wait"])
def test_the_vector_clocks_see_a_missing_wait(kind):
    """The checker itself: without the wait (or without the record it waits on) no order is implied."""
    log = [("kernel", 0, "a"), ("record", 0, 1), ("wait", 1, 1), ("copy", 1, 7)]
    assert after(happens_before(log), log, 0, 3)
    cut = [op for op in log if op[0] != kind]
    assert not after(happens_before(cut), cut, 0, len(cut) - 1)


def test_predict_on_another_stream_waits_for_the_last_holders_work(fake_gpu):
    """Two threads' predictions share the inference buffers; each runs on its own stream. Every kernel of
    the second must be queued after (wait for) the last kernel of the first."""
    net = gpunn.mlp([5, 9, 3], device="cuda:0", seed=0)
    X = rng(0).normal(size=(40, 5)).astype("float32")
    first, second = fake_gpu.cuda.Stream(non_blocking=True), fake_gpu.cuda.Stream(non_blocking=True)
    fakecupy.LOG.clear()
    with first:
        a = net.predict(X)
    with second:
        b = net.predict(X)
    numpy.testing.assert_array_equal(a, b)
    log = fakecupy.LOG
    clocks = happens_before(log)
    on = {s.id: [i for i, op in enumerate(log) if op[0] == "kernel" and op[1] == s.id] for s in (first, second)}
    if not on[first.id]:
        pytest.skip("the fused kernels are off on this fake GPU (no g++): no kernel to order")
    assert on[second.id]
    assert all(after(clocks, log, on[first.id][-1], k) for k in on[second.id])


def test_without_the_handoff_the_second_stream_would_not_wait(fake_gpu, monkeypatch):
    """The check above can fail: with the handoff doing nothing, the second stream's kernels do not wait."""
    monkeypatch.setattr(gpunn.backend.Handoff, "acquire", lambda self: None)
    net = gpunn.mlp([5, 9, 3], device="cuda:0", seed=0)
    X = rng(0).normal(size=(40, 5)).astype("float32")
    first, second = fake_gpu.cuda.Stream(non_blocking=True), fake_gpu.cuda.Stream(non_blocking=True)
    fakecupy.LOG.clear()
    with first:
        net.predict(X)
    with second:
        net.predict(X)
    log = fakecupy.LOG
    clocks = happens_before(log)
    k1 = [i for i, op in enumerate(log) if op[0] == "kernel" and op[1] == first.id]
    k2 = [i for i, op in enumerate(log) if op[0] == "kernel" and op[1] == second.id]
    if not k1:
        pytest.skip("the fused kernels are off on this fake GPU (no g++): no kernel to order")
    assert not any(after(clocks, log, k1[-1], k) for k in k2)
