"""Data-parallel and streaming costs on this machine (CPU): the numbers issue 15 asks to record.

    mpiexec -n 2 python bench/scaleout.py allreduce      # one allreduce of the mlp's flat gradients
    mpiexec -n 2 python bench/scaleout.py step           # data-parallel steps: 784-64-10 and 784-512-512-10
    python bench/scaleout.py step                        # at global batch 256 and 2048; one process = baseline
    python bench/scaleout.py stream                      # one epoch from a memmap vs from memory
    mpiexec -n 2 python bench/scaleout.py drift          # float32 weights after a long run vs one process

Each prints JSON lines (rank 0). Nothing set: gpunn.distributed.init() chooses the BLAS threads per rank;
set OPENBLAS_NUM_THREADS to fix them yourself.
"""
from __future__ import annotations

import argparse
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
NETS = {"784-64-10": [784, 64, 10], "784-512-512-10": [784, 512, 512, 10]}


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


def _step(comm, sizes: list[int], batch: int) -> dict:
    g = numpy.random.default_rng(0)
    X = g.normal(size=(batch, sizes[0])).astype("float32")
    T = numpy.eye(sizes[-1], dtype="float32")[g.integers(0, sizes[-1], batch)]
    mine = shard(0, batch, comm.rank, comm.size)
    x, t = X[mine], T[mine]
    net = gpunn.mlp(sizes, activation="sigmoid", device="cpu", seed=0)
    opt, loss = gpunn.SGD(lr=1e-3), gpunn.losses.get("cross_entropy")
    strategy, out = for_communicator(comm), numpy.zeros(1, "float32")
    for _ in range(3):
        strategy.step(net, x, t, loss, opt, out, batch)
    times = []
    for _ in range(max(10, 40960 // batch)):
        if comm.size > 1:
            comm.any(False)                        # start together
        t0 = time.perf_counter()
        strategy.step(net, x, t, loss, opt, out, batch)
        times.append(time.perf_counter() - t0)
    return {"what": "step", "net": "-".join(map(str, sizes)), "ranks": comm.size, "global_batch": batch,
            "median_ms": statistics.median(times) * 1e3, "blas": _threads()}


def _threads() -> str:
    from threadpoolctl import threadpool_info
    return ",".join(f"{i['internal_api']}:{i['num_threads']}" for i in threadpool_info())


def _drift(comm, epochs: int = 300) -> dict:
    """Weights after a long float32 run on the ranks vs the same run in one process (rank 0 trains both)."""
    X, y = gpunn.datasets.load_digits()
    out = {}
    for label, c in (("ranks", comm), ("alone", None)):
        if label == "alone" and not comm.is_root:
            break
        net = gpunn.mlp([64, 32, 10], device="cpu", seed=0)
        net.fit(X, y, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1, momentum=0.9), epochs=epochs,
                batch_size=64, comm=c)
        out[label] = gpunn.to_host(net.flat_parameters()).astype("float64")
    if not comm.is_root:
        return {}
    diff = numpy.abs(out["ranks"] - out["alone"]).max() / numpy.abs(out["alone"]).max()
    return {"what": "drift", "ranks": comm.size, "epochs": epochs, "steps": epochs * -(-len(X) // 64),
            "dtype": "float32", "max_relative_weight_difference": float(diff)}


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


def main(argv: list[str] | None = None) -> int:
    lines = __doc__.splitlines()
    ap = argparse.ArgumentParser(description=lines[0], epilog="\n".join(lines[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="step", choices=["step", "allreduce", "stream", "drift"])
    what = ap.parse_args(argv).what
    comm = init(device="cpu")
    if what == "step":
        results = [_step(comm, sizes, batch) for sizes in NETS.values() for batch in (256, 2048)]
    elif what == "drift":
        results = [_drift(comm)]
    else:
        results = [_allreduce(comm) if what == "allreduce" else _stream()]
    if comm.is_root:
        for r in results:
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
