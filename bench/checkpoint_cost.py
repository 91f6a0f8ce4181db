"""The cost of a checkpoint per epoch over a long run (issue 22): XOR, 2-4-1, full batch, SGD, with and
without ``checkpoint=``, milliseconds per epoch in blocks of 1,000 epochs, then a resume that reads the
whole history back. The figure to watch is the trend across blocks (before the history left the JSON
header it grew from 4 ms to 38 ms by epoch 4,000); the level is mostly the fsync of each write.

    PYTHONPATH=$PWD python bench/checkpoint_cost.py --epochs 7000
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy

import gpunn


def run(epochs: int, checkpoint: str | None) -> tuple[float, list[float], gpunn.Sequential]:
    X, Y = gpunn.datasets.xor()
    net = gpunn.mlp([2, 4, 1], output="sigmoid", device="cpu", seed=0)
    marks: list[float] = []

    class Tick(gpunn.callbacks.Callback):
        def on_epoch_end(self, record: dict) -> None:
            if record["epoch"] % 1000 == 0:
                marks.append(time.perf_counter())
    tick = Tick()
    t0 = time.perf_counter()
    net.fit(X, Y, loss="squared_error", optimizer=gpunn.SGD(lr=0.5), epochs=epochs, batch_size=4,
            checkpoint=checkpoint, callbacks=[tick])
    blocks = list(numpy.diff([t0, *marks]) / 1000 * 1e3)
    return time.perf_counter() - t0, blocks, net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=7000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "run.ckpt")
        for ck in (None, path):
            seconds, blocks, net = run(args.epochs, ck)
            size = os.path.getsize(ck) if ck else 0
            print(f"checkpoint={'yes' if ck else 'no '}  {args.epochs} epochs  {seconds:7.2f} s  ms/epoch per 1000: "
                  f"{' '.join(f'{b:.2f}' for b in blocks)}  file {size:,} B")
        t0 = time.perf_counter()
        _, _, again = run(args.epochs, path)
        print(f"resume with nothing left to train: {time.perf_counter() - t0:.2f} s; weights equal: "
              f"{numpy.array_equal(again.flat_parameters(), net.flat_parameters())}")


if __name__ == "__main__":
    main()
