"""Where one training step's time goes, timed inside the step itself (not each operation alone in a loop).

    GPUNN_THREADS=1 python bench/step_inside.py                 # mlp at batch 2048, fused CPU kernels
    GPUNN_THREADS=1 python bench/step_inside.py --batch 256 --steps 40

Each bound call of the step's plan (gpunn/backprop.py ``StepPlan``: the matrix products, the kernels,
the loss, the optimiser's update) is wrapped in a clock read, the step is run ``--steps`` times, and the
time per call kind is printed beside the step's own time and the GEMM ceiling (the same products back to
back, ``gpunn bench``'s ceiling). An operation inside the step reads what earlier ones wrote long before,
from memory rather than cache: this is what it costs there (bench/targets.py's profile times each
operation alone, warm).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy

from gpunn.bench import build, gemm_sequence


def timed_calls(plan: Any, optimizer: Any) -> dict[str, float]:
    """Wrap every call of ``plan`` (and ``optimizer.update``) so that its seconds add up per name."""
    spent: dict[str, float] = {}

    def wrap(name: str, fn: Callable) -> Callable:
        def call(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
            return out
        return call

    def name_of(call: Any) -> str:
        fn = getattr(call, "func", call)
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "py_func", None), "__name__", None)
        return "matrix product" if name in ("dot", "matmul") else (name or type(fn).__name__)
    plan.forward = [wrap(name_of(c), c) for c in plan.forward]
    plan.backward = [wrap(name_of(c), c) for c in plan.backward]
    if getattr(plan, "backward_updating", None) is not None:    # the update layer by layer: its parts as "update"
        plan.backward_updating = [c if name_of(c) == "_update" else wrap(name_of(c), c) for c in plan.backward_updating]
        split = optimizer.split_update
        optimizer.split_update = lambda *a: (lambda part: None if part is None else wrap("update", part))(split(*a))
    plan.output_delta = [wrap(name_of(c), c) for c in plan.output_delta]
    plan.loss_backward = wrap("loss", plan.loss_backward)
    plan.matmul = wrap("matrix product", plan.matmul)
    optimizer.update = wrap("update", optimizer.update)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mlp")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    net, X, T, loss, opt = build(args.workload, "cpu", "float32", args.batch, fused=True)
    net.ops.warm_up()
    x, t = numpy.asarray(X, numpy.float32), numpy.asarray(T, numpy.float32)
    for _ in range(3):
        net.train_step(x, t, loss, opt)
    spent = timed_calls(net._backprop._last, opt)       # the plan the steps below take again
    t0 = time.perf_counter()
    for _ in range(args.steps):
        net.train_step(x, t, loss, opt)
    step = (time.perf_counter() - t0) / args.steps
    gemm = gemm_sequence(net, x)
    gemm()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        gemm()
    ceiling = (time.perf_counter() - t0) / args.steps
    print(f"{args.workload} batch {args.batch}, {args.steps} steps: step {step * 1e3:.2f} ms, GEMM ceiling "
          f"{ceiling * 1e3:.2f} ms (share {ceiling / step:.1%})")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24s} {s / args.steps * 1e3:9.3f} ms  {s / args.steps / step:6.1%}")


if __name__ == "__main__":
    main()
