"""Data-parallel and streaming costs on this machine (CPU): the numbers issue 15 asks to record.

    mpiexec -n 2 python bench/scaleout.py allreduce      # one allreduce of the mlp's flat gradients
    mpiexec -n 2 python bench/scaleout.py step           # a data-parallel step at global batch 2048
    python bench/scaleout.py step                        # the same step in one process (the baseline)
    python bench/scaleout.py stream                      # one epoch from a memmap vs from memory

Each prints one JSON line (rank 0). Set OPENBLAS_NUM_THREADS to fix the BLAS threads per process.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import numpy

import gpunn
from gpunn.distributed import init, shard
from gpunn.strategy import for_communicator

SIZES = [784, 512, 512, 10]
BATCH = 2048


def _allreduce(comm) -> dict:
    net = gpunn.mlp(SIZES, activation="sigmoid", device="cpu", seed=0)
    g = net.flat_gradients()
    g[...] = 1.0
    for _ in range(5):
        comm.allreduce_sum(g)
    times = []
    for _ in range(50):
        comm._comm.Barrier() if comm.size > 1 else None
        t0 = time.perf_counter()
        comm.allreduce_sum(g)
        times.append(time.perf_counter() - t0)
    return {"what": "allreduce", "ranks": comm.size, "elements": int(g.size), "dtype": str(g.dtype),
            "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}


def _step(comm) -> dict:
    g = numpy.random.default_rng(0)
    X = g.normal(size=(BATCH, SIZES[0])).astype("float32")
    T = numpy.eye(SIZES[-1], dtype="float32")[g.integers(0, SIZES[-1], BATCH)]
    mine = shard(0, BATCH, comm.rank, comm.size)
    x, t = X[mine], T[mine]
    net = gpunn.mlp(SIZES, activation="sigmoid", device="cpu", seed=0)
    opt, loss = gpunn.SGD(lr=1e-3), gpunn.losses.get("cross_entropy")
    strategy, out = for_communicator(comm), numpy.zeros(1, "float32")
    for _ in range(3):
        strategy.step(net, x, t, loss, opt, out, BATCH)
    times = []
    for _ in range(20):
        if comm.size > 1:
            comm._comm.Barrier()
        t0 = time.perf_counter()
        strategy.step(net, x, t, loss, opt, out, BATCH)
        times.append(time.perf_counter() - t0)
    return {"what": "step", "ranks": comm.size, "global_batch": BATCH, "median_ms": statistics.median(times) * 1e3,
            "blas_threads_per_rank": os.environ.get("OPENBLAS_NUM_THREADS", "default")}


def _stream() -> dict:
    g = numpy.random.default_rng(0)
    X = g.normal(size=(20_000, SIZES[0])).astype("float32")
    y = g.integers(0, SIZES[-1], 20_000)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.npy")
        numpy.save(path, X)
        mm = numpy.load(path, mmap_mode="r")
        out = {}
        for name, data in (("memory", X), ("memmap", mm), ("memory", X), ("memmap", mm)):
            net = gpunn.mlp(SIZES, activation="sigmoid", device="cpu", seed=0)
            t0 = time.perf_counter()
            net.fit(data, y, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.01), epochs=1, batch_size=256)
            out.setdefault(name, []).append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in out.items()}
    return {"what": "stream", "samples": 20_000, "features": SIZES[0], "batch": 256,
            "epoch_s_memory": best["memory"], "epoch_s_memmap": best["memmap"],
            "overhead": best["memmap"] / best["memory"] - 1}


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else "step"
    comm = init(device="cpu")
    result = {"allreduce": _allreduce, "step": _step}.get(what, lambda c: _stream())(comm)
    if comm.is_root:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
