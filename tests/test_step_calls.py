"""bench/step_calls.py: the Python calls of one steady-state lecture train_step, counted (not timed).

The lecture's 4-8-1 step is bound by Python's calls (README, Performance): a frame added to the step
shows here. The bound is the count when it was last lowered; raise it only for a call that must be
there, and say why in the commit."""
from __future__ import annotations

import pathlib
import sys

import numpy
import pytest

from gpunn import cpukernels

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import step_calls

#: Python calls per step with the numba kernels: train_step, the step's checks, the admission, the step,
#: its plan, the squared error's kernel call (gpunn/cpukernels.py, calling NumPy's vdot C function),
#: SGD.update, its learning rate, the fused SGD kernel's call.
MOST_CALLS = 9


@pytest.mark.parametrize("out", [False, True], ids=["value", "out"])
def test_a_steady_lecture_step_makes_few_python_calls_and_the_same_each_time(out):
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    net, x, t, loss, opt = step_calls.lecture_net()
    value = numpy.empty(1, numpy.float32) if out else None

    def step():
        net.train_step(x, t, loss, opt, out=value)
    first, c_first, order = step_calls.count(step)
    again, c_again, _ = step_calls.count(step)
    assert (first, c_first) == (again, c_again)
    calls = sum(first.values()) - 1                     # less step() itself
    assert calls <= MOST_CALLS, "\n".join(order)
    assert sum(step_calls.bytecodes(step).values()) > 0
