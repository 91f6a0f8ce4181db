"""How many Python and C calls (and bytecode instructions) one steady ``train_step`` of the 4-8-1 net makes.

    python bench/step_calls.py            # the counts
    python bench/step_calls.py --list     # and each call, in order
    python bench/step_calls.py --out      # the loss written into a one-element array (as fit's steps do)

A count, not a clock: the same on a busy machine as on a quiet one. After warm-up (the numba kernels
loaded, the step's plan bound) one ``net.train_step(x, t, loss, opt)`` runs under :func:`sys.setprofile`,
and the profiler's ``call`` events (Python frames: gpunn's glue) and ``c_call`` events (C functions
called from Python: the arithmetic, and builtins the glue calls) are counted. Calls that Python code
does not make to a builtin function (a ufunc such as ``numpy.subtract``, a ``functools.partial`` of a
step plan's bound calls, a numba compiled entry point) are not ``c_call`` events: the C count is of the
builtins the glue calls plus the few arithmetic calls made directly. A third count, under
:func:`sys.settrace` with opcode events, is of the bytecode instructions the Python frames execute.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

import numpy

import gpunn
from gpunn import losses


def lecture_net(warm: int = 200) -> tuple[Any, ...]:
    """The lecture's net, batch, loss and optimiser after ``warm`` steps: (net, x, t, loss, opt)."""
    net = gpunn.mlp([4, 8, 1], activation="sigmoid", output="sigmoid", seed=0, device="cpu", fused=True)
    g = numpy.random.default_rng(0)
    x, t = g.normal(size=(1, 4)).astype("float32"), g.uniform(size=(1, 1)).astype("float32")
    loss, opt = losses.get("squared_error"), gpunn.SGD(lr=0.01)
    for _ in range(warm):
        net.train_step(x, t, loss, opt)
    return net, x, t, loss, opt


def count(fn: Any) -> tuple[Counter, Counter, list[str]]:
    """(Python calls by name, C calls by name, every call in order) made by ``fn()``."""
    py: Counter = Counter()
    c: Counter = Counter()
    order: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            name = f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno} {code.co_qualname}"
            py[name] += 1
            order.append("py " + name)
        elif event == "c_call":
            name = f"{getattr(arg, '__module__', None) or ''}.{getattr(arg, '__qualname__', repr(arg))}"
            c[name] += 1
            order.append("c  " + name)

    before = sys.getprofile()       # a profiler already running (restored afterwards)
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(before)
    # the profiler sees its own sys.setprofile(...) as a C call: not part of fn
    c["sys.setprofile"] -= 1
    if order and order[-1] == "c  sys.setprofile":
        order.pop()
    return +py, +c, order


def bytecodes(fn: Any) -> Counter:
    """Bytecode instructions executed by ``fn()``, by function: the Python work between the C calls."""
    done: Counter = Counter()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            code = frame.f_code
            done[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno} {code.co_qualname}"] += 1
        return trace

    def warm(frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
        return warm

    before = sys.gettrace()         # a tracer already running (coverage: restored afterwards)
    try:
        # CPython 3.12.1 reports no opcode event in the first traced call of a process (seen: 0 counted,
        # then the same count as 3.11 from the second call on): a throwaway traced call first
        sys.settrace(warm)
        _traced_once()
        sys.settrace(trace)
        fn()
    finally:
        sys.settrace(before)
    return done


def _traced_once() -> int:
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print every call in order")
    parser.add_argument("--out", action="store_true", help="train_step(..., out=a one-element array)")
    args = parser.parse_args()
    net, x, t, loss, opt = lecture_net()
    out = numpy.empty(1, numpy.float32) if args.out else None

    def step() -> None:
        net.train_step(x, t, loss, opt, out=out)
    py, c, order = count(step)
    py_again, c_again, _ = count(step)
    if (py, c) != (py_again, c_again):     # a steady state makes the same calls every step
        print("warning: two steps made different calls", file=sys.stderr)
    if args.list:
        print("\n".join(order))
        print()
    py.pop(next(k for k in py if k.endswith("main.<locals>.step")), None)     # the wrapper above
    print(f"Python calls per train_step: {sum(py.values())}")
    for name, n in py.most_common():
        print(f"  {n:3d}  {name}")
    print(f"C calls per train_step: {sum(c.values())}")
    for name, n in c.most_common():
        print(f"  {n:3d}  {name}")
    ops = bytecodes(step)
    ops.pop(next(k for k in ops if k.endswith("main.<locals>.step")), None)
    print(f"bytecode instructions per train_step: {sum(ops.values())}")
    for name, n in ops.most_common():
        print(f"  {n:3d}  {name}")


if __name__ == "__main__":
    main()
