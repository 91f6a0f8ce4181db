"""Where a second BLAS thread starts to pay: gpunn's step on 1 and on 2 threads, alternated in one process.

    python bench/threads_by_work.py             # nets [784, H, (H,) 10], float32, cross-entropy, SGD

For each net and batch it prints the multiply-adds of the step's largest matrix product (batch rows × the
widest layer's weights: what gpunn.threads.MIN_WORK is compared with) and the median µs per step on each
thread count, the two timed in alternating blocks (order swapped every round, a pause before each) so both see the same
machine and neither is timed while the other's idle BLAS worker still spins.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy

import gpunn
from gpunn import threads

#: Seconds between blocks: OpenBLAS's idle workers spin for a while after a call (about 0.1 s here).
SETTLE = 0.3
CASES = [(4, [784, 512, 512, 10]), (8, [784, 512, 512, 10]), (16, [784, 512, 512, 10]), (32, [784, 512, 512, 10]),
         (16, [784, 128, 10]), (32, [784, 64, 10]), (32, [784, 256, 10]), (64, [784, 64, 10]), (64, [784, 256, 10]),
         (128, [784, 64, 10]), (256, [784, 64, 10]), (256, [784, 32, 10])]


def measure(batch: int, sizes: list[int], rounds: int, min_time: float) -> dict:
    g = numpy.random.default_rng(0)
    net = gpunn.mlp(sizes, activation="sigmoid", output="softmax", seed=0, device="cpu")
    net.ops.warm_up()
    x = g.normal(size=(batch, sizes[0])).astype("float32")
    t = numpy.eye(sizes[-1], dtype="float32")[g.integers(0, sizes[-1], batch)]
    opt = gpunn.SGD(lr=0.01)
    per: dict[int, list[float]] = {1: [], 2: []}
    calls = None
    for r in range(rounds):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            threads.set_threads(n)
            time.sleep(SETTLE)          # the other block's idle OpenBLAS worker stops spinning before timing
            for _ in range(3):
                net.train_step(x, t, "cross_entropy", opt)
            if calls is None:
                t0 = time.perf_counter()
                net.train_step(x, t, "cross_entropy", opt)
                calls = max(5, int(min_time / max(time.perf_counter() - t0, 1e-6)))
            t0 = time.perf_counter()
            for _ in range(calls):
                net.train_step(x, t, "cross_entropy", opt)
            per[n].append((time.perf_counter() - t0) / calls)
    threads.set_threads(None)
    one, two = statistics.median(per[1]), statistics.median(per[2])
    work = batch * max(a * b for a, b in zip(sizes, sizes[1:]))
    return {"batch": batch, "sizes": sizes, "work": work, "one_us": one * 1e6, "two_us": two * 1e6, "gain": one / two}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=0.15)
    args = ap.parse_args()
    print(f"MIN_WORK = {threads.MIN_WORK:,}")
    print("| net | batch | largest product (M multiply-adds) | 1 thread µs | 2 threads µs | 1 thread / 2 threads |")
    print("|---|---|---|---|---|---|")
    for batch, sizes in sorted(CASES, key=lambda c: c[0] * max(a * b for a, b in zip(c[1], c[1][1:]))):
        r = measure(batch, sizes, args.rounds, args.min_time)
        print(f"| {'-'.join(map(str, sizes))} | {batch} | {r['work'] / 1e6:.2f} | {r['one_us']:.0f} | "
              f"{r['two_us']:.0f} | {r['gain']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
