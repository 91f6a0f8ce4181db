"""Would splitting the elementwise work across two threads pay? NumPy's float32 exp over a (2048, 512)
batch (the mlp's sigmoid at B = 2048) on one thread and split by rows over two (a second Python thread;
exp releases the GIL), alone and right after a 2-thread OpenBLAS GEMM of the step's first layer, whose
idle worker then spins on the other core. Also checks that the split gives the same bits.

    python bench/split_elementwise.py
"""
from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time

import numpy


def main(rounds: int = 9, calls: int = 10) -> None:
    from threadpoolctl import ThreadpoolController  # imported after --help
    ThreadpoolController().limit(limits=2, user_api="blas")
    g = numpy.random.default_rng(0)
    z = g.normal(size=(2048, 512)).astype(numpy.float32)
    y = numpy.empty_like(z)
    x = g.normal(size=(2048, 784)).astype(numpy.float32)
    w = (g.normal(size=(784, 512)) * 0.01).astype(numpy.float32)
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()

    def worker() -> None:
        while True:
            jobs.get()()
            done.put(None)

    threading.Thread(target=worker, daemon=True).start()
    half = z.shape[0] // 2

    def one() -> None:
        numpy.exp(z, out=y)

    def two() -> None:
        jobs.put(lambda: numpy.exp(z[half:], out=y[half:]))
        numpy.exp(z[:half], out=y[:half])
        done.get()

    def gemm() -> None:
        numpy.dot(x, w, z)

    cases = {"exp, 1 thread": [one], "exp, 2 threads": [two], "GEMM then exp, 1 thread": [gemm, one],
             "GEMM then exp, 2 threads": [gemm, two], "GEMM alone": [gemm]}
    per: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fns in cases.items():          # alternated: every case sees the same machine
            t0 = time.perf_counter()
            for _ in range(calls):
                for fn in fns:
                    fn()
            per[name].append((time.perf_counter() - t0) / calls * 1e6)
    for name, ts in per.items():
        print(f"{name:26s} {statistics.median(ts):9.1f} µs (min {min(ts):.1f})")
    ref = numpy.exp(z)
    two()
    print("split gives the same bits:", bool(numpy.array_equal(ref.view(numpy.uint32), y.view(numpy.uint32))))



if __name__ == "__main__":      # --help: the docstring; no other argument
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
