"""What one sigmoid layer's forward pass costs alone and warm, against its parts (float32, 2048 × 512).

    python bench/sigmoid_pass.py

Times (best and median of 15 calls, nothing else running): the fused kernel ``bias_sigmoid`` (z ← z + b,
y = 1/(e^min(−z, cap) + 1), exp transcribed from NumPy: gpunn/cpuexp.py), the transcribed exp alone, NumPy's
exp alone, and ``sigmoid_bwd`` (δ = y(1 − y)·g: three arrays, no exp) as the cost of a pass that only moves
the same amount of memory. The step's other calls: ``bench/step_inside.py``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy


def best_and_median(fn: Callable[[], object], before: Callable[[], object], calls: int = 15) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(calls):
        before()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def main() -> None:
    from gpunn import activations, cpuexp, cpukernels  # numba: imported after --help
    k = cpukernels.CpuKernels().k
    g = numpy.random.default_rng(0)
    z0 = (g.normal(size=(2048, 512)) * 4).astype(numpy.float32)
    b = g.normal(size=512).astype(numpy.float32)
    z, y, d = z0.copy(), numpy.empty_like(z0), numpy.empty_like(z0)
    zero, one, cap = numpy.float32(0.0), numpy.float32(1.0), numpy.float32(activations.exp_cap(numpy.float32))
    x, e = numpy.minimum(-z0, cap).ravel(), numpy.empty(z0.size, numpy.float32)
    reset = lambda: numpy.copyto(z, z0)      # noqa: E731 - bias_sigmoid adds b into z in place
    nothing = lambda: None                   # noqa: E731
    scratch, no_sum = numpy.empty((2, cpuexp.BLOCK), numpy.float32), numpy.empty(0, numpy.float32)
    rows = {"bias_sigmoid (the layer's pass)": (cpukernels.bind(k.bias_sigmoid, z, b, y, cap, one, scratch), reset),
            "transcribed exp alone": (lambda: cpuexp.exp_f32_array(x, e), nothing),
            "NumPy's exp alone": (lambda: numpy.exp(x, out=e), nothing),
            "sigmoid_bwd (no exp)": (cpukernels.bind(k.sigmoid_bwd, y, z0, d, one, no_sum, zero), nothing)}
    print(f"exp inside the kernels: {cpukernels.exp_inside()}")
    for name, (fn, before) in rows.items():
        lo, mid = best_and_median(fn, before)
        print(f"{name:34s} best {lo * 1e3:6.3f} ms  median {mid * 1e3:6.3f} ms")



if __name__ == "__main__":      # --help: the docstring; no other argument
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
