"""What the lecture's 4-8-1 step (batch 1) costs, and what its calls alone cost, in one process.

    python bench/lecture_floor.py

Times, in alternating blocks (nothing else running; one BLAS thread, the policy's choice at this size):
gpunn's ``train_step``; the same C calls that step makes (the step plan's bound calls, the squared error's
subtract/vdot/scale, the SGD kernel) with no gpunn code between them; and the per-call costs behind two
choices of gpunn/ops.py and gpunn/cpukernels.py: NumPy's ``matmul`` against ``dot`` (and dot's C function)
on the step's shapes, and a numba kernel through its dispatcher against its compiled entry point.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy
import step_calls  # bench/: the lecture net both scripts measure

from gpunn import cpukernels


def blocks(fns: dict[str, Callable[[], object]], rounds: int = 7, calls: int = 20000) -> dict[str, float]:
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {k: statistics.median(v) for k, v in per.items()}


def main() -> None:
    net, x, t, loss, opt = step_calls.lecture_net(warm=1000)
    bp = net._backprop                                   # the step's own plan and buffers
    plan = next(iter(bp._plans.values()))
    first = plan.steps[0].bufs
    y, gy = plan.steps[-1].bufs.y, bp._grad_y[1]
    k = cpukernels.CpuKernels().k
    scale = cpukernels.bind(k.scale, gy, numpy.float32(1.0))
    lr = numpy.float32(0.01)
    sgd = cpukernels.compiled_for(k.sgd_plain, bp.store.params, bp.store.grads, lr)
    mm, sub, vdot = bp.ops.matmul, numpy.subtract, numpy.vdot

    def calls_alone() -> None:
        mm(x, plan.first_W, first.z)
        for c in plan.forward:
            c()
        sub(y, t, gy)
        vdot(gy, gy)
        scale()
        for c in plan.output_delta:
            c()
        for c in plan.backward:
            c()
        mm(x.T, plan.first_delta, plan.first_gW)
        sgd(bp.store.params, bp.store.grads, lr)

    step = blocks({"train_step": lambda: net.train_step(x, t, loss, opt), "its calls alone": calls_alone})
    w, z = net.layers[0].W, numpy.empty((1, 8), numpy.float32)
    prod = blocks({"numpy.matmul(x, W, out=z)": partial(numpy.matmul, x, w, out=z),
                   "numpy.dot(x, W, z)": partial(numpy.dot, x, w, z),
                   "numpy.dot._implementation": partial(getattr(numpy.dot, "_implementation", numpy.dot), x, w, z)})
    yy, one = numpy.full((1, 8), 0.5, numpy.float32), numpy.float32(1.0)
    k.sigmoid_post(yy, one)
    kern = blocks({"numba dispatcher (sigmoid_post)": partial(k.sigmoid_post, yy, one),
                   "compiled entry point": cpukernels.bind(k.sigmoid_post, yy, one)})
    for name, us in {**step, **prod, **kern}.items():
        print(f"{name:34s} {us:7.2f} µs")



if __name__ == "__main__":      # --help: the docstring; no other argument
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
