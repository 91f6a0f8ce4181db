"""gpunn.admission: one training thread (re-entrant for it), readers refused or waited for, through both
ways in: ``with admission:`` (fit, forward, ...) and ``admission.run(work, *args)`` (train_step, gradients).
Each test runs its scenario on both, and on the two nested in each other."""
from __future__ import annotations

import threading

import numpy
import pytest

import gpunn
from gpunn.admission import Admission
from gpunn.errors import ConcurrencyError


def enter_with(adm, work, *args):
    with adm:
        return work(*args)


ENTRIES = {"with": enter_with, "run": lambda adm, work, *args: adm.run(work, *args)}


def in_thread(target):
    """Run ``target`` in a thread; returns (thread, dict with its 'result' or 'error')."""
    out: dict = {}

    def go():
        try:
            out["result"] = target()
        except BaseException as exc:        # handed to the test, whatever it is
            out["error"] = exc
    worker = threading.Thread(target=go)
    worker.start()
    return worker, out


def reader_inside(adm):
    """A reader in another thread, inside ``adm.reading`` until ``release`` is set: (thread, its out, release)."""
    inside, release = threading.Event(), threading.Event()

    def read():
        with adm.reading("predict"):
            inside.set()
            assert release.wait(10)
    reader, out = in_thread(read)
    assert inside.wait(10)
    return reader, out, release


def wait_until(condition, seconds=10.0):
    stop = threading.Event()
    for _ in range(int(seconds / 0.001)):
        if condition():
            return True
        stop.wait(0.001)
    return condition()


@pytest.mark.parametrize("outer", ENTRIES)
@pytest.mark.parametrize("inner", ENTRIES)
def test_the_trainer_reenters_and_leaves_once_the_outer_entry_ends(outer, inner):
    adm = Admission()
    seen = []

    def nested():
        seen.append(("inner", adm.busy_elsewhere()))
        return 7

    def body():
        assert ENTRIES[inner](adm, nested) == 7
        assert ENTRIES[inner](adm, nested) == 7           # twice: the inner exit leaves the outer entry in
        worker, out = in_thread(lambda: ENTRIES["run"](adm, lambda: None))
        worker.join(10)
        assert isinstance(out.get("error"), ConcurrencyError)
        return 3

    assert ENTRIES[outer](adm, body) == 3
    assert seen == [("inner", False), ("inner", False)]
    worker, out = in_thread(lambda: ENTRIES[inner](adm, lambda: 5))       # free for another thread now
    worker.join(10)
    assert out == {"result": 5}


@pytest.mark.parametrize("holder", ENTRIES)
@pytest.mark.parametrize("other", ENTRIES)
def test_another_thread_is_refused_while_one_trains_and_readers_too(holder, other):
    adm = Admission()
    inside, release = threading.Event(), threading.Event()

    def hold():
        inside.set()
        assert release.wait(10)
    worker, out = in_thread(lambda: ENTRIES[holder](adm, hold))
    try:
        assert inside.wait(10)
        assert adm.busy_elsewhere()
        ran = []
        with pytest.raises(ConcurrencyError, match="another thread"):
            ENTRIES[other](adm, lambda: ran.append(1))
        assert ran == []
        with pytest.raises(ConcurrencyError, match="predict"):
            with adm.reading("predict"):
                pass
    finally:
        release.set()
        worker.join(10)
    assert "error" not in out and not adm.busy_elsewhere()


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_trainer_waits_for_readers_in_and_new_readers_are_refused_meanwhile(entry):
    adm = Admission()
    reader, reader_out, release = reader_inside(adm)
    trained = threading.Event()
    trainer, trainer_out = in_thread(lambda: ENTRIES[entry](adm, trained.set))
    try:
        assert wait_until(adm.busy_elsewhere)           # the trainer has arrived ...
        assert not trained.wait(0.2)                    # ... and waits for the reader
        with pytest.raises(ConcurrencyError):           # a new reader is refused meanwhile
            with adm.reading("save"):
                pass
    finally:
        release.set()
        reader.join(10)
        trainer.join(10)
    assert trained.is_set() and "error" not in trainer_out and "error" not in reader_out
    with adm.reading("save"):                           # and all free afterwards
        pass


@pytest.mark.parametrize("entry", ENTRIES)
def test_the_trainers_own_thread_reads_at_any_time(entry):
    adm = Admission()

    def body():
        with adm.reading("save"):
            return ENTRIES[entry](adm, lambda: 4)      # and trains again inside its own read
    assert ENTRIES[entry](adm, body) == 4
    assert not adm.busy_elsewhere()


@pytest.mark.parametrize("entry", ENTRIES)
def test_an_error_in_training_leaves_the_network_free(entry):
    adm = Admission()

    def fail():
        raise ValueError("inside")
    with pytest.raises(ValueError, match="inside"):
        ENTRIES[entry](adm, fail)
    worker, out = in_thread(lambda: ENTRIES[entry](adm, lambda: 1))
    worker.join(10)
    assert out == {"result": 1}


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_trainer_interrupted_while_waiting_for_readers_leaves_no_trainer(entry):
    """Ctrl-C (or any error) while a trainer waits for readers: it never trained, and the network is free
    for readers and trainers again."""
    adm = Admission()
    reader, _, release = reader_inside(adm)

    class Interrupted(BaseException):
        pass

    class Condition:                        # the admission's condition, whose wait is interrupted
        def __init__(self, real):
            self.real = real

        def wait(self):
            raise Interrupted

        def __getattr__(self, name):
            return getattr(self.real, name)
    adm._cond = Condition(adm._cond)
    with pytest.raises(Interrupted):
        ENTRIES[entry](adm, lambda: None)
    adm._cond = adm._cond.real
    assert not adm.busy_elsewhere()
    release.set()
    reader.join(10)
    worker, out = in_thread(lambda: ENTRIES[entry](adm, lambda: 2))
    worker.join(10)
    assert out == {"result": 2}


def test_a_refused_train_step_attaches_no_optimiser():
    """train_step from a second thread while a fit runs is refused before anything of it is done: its
    optimiser stays free for another network."""
    net = gpunn.mlp([4, 6, 2], output="sigmoid", device="cpu", seed=0)
    x, t = numpy.zeros((8, 4), "float32"), numpy.zeros((8, 2), "float32")
    inside, release = threading.Event(), threading.Event()

    def progress(record):
        inside.set()
        assert release.wait(10)
    worker, out = in_thread(lambda: net.fit(x, t, loss="squared_error", epochs=1, progress=progress))
    try:
        assert inside.wait(30)
        opt = gpunn.SGD(lr=0.1)
        with pytest.raises(ConcurrencyError):
            net.train_step(x, t, "squared_error", opt)
        with pytest.raises(ConcurrencyError):
            net.gradients(x, t, "squared_error")
    finally:
        release.set()
        worker.join(30)
    assert "error" not in out
    other = gpunn.mlp([4, 6, 2], output="sigmoid", device="cpu", seed=1)
    other.train_step(x, t, "squared_error", opt)        # not attached to net: free for this one


def test_an_optimiser_reset_and_used_on_another_network_is_refused_on_the_first_again():
    """One optimiser per network through train_step alone: after reset() it may train another network, and
    then the first one's train_step is refused (a step does not skip the check for an optimiser it used)."""
    a, b = (gpunn.mlp([4, 6, 2], device="cpu", seed=s) for s in (0, 1))
    x, t = numpy.zeros((3, 4), "float32"), numpy.zeros((3, 2), "float32")
    opt = gpunn.SGD(lr=0.1, momentum=0.9)
    a.train_step(x, t, "squared_error", opt)
    a.train_step(x, t, "squared_error", opt)
    opt.reset()
    b.train_step(x, t, "squared_error", opt)
    with pytest.raises(gpunn.ConfigError, match="one optimiser per network"):
        a.train_step(x, t, "squared_error", opt)
    opt.reset()
    a.train_step(x, t, "squared_error", opt)
    assert opt.owner_ref() is a
