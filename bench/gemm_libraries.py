"""The training step's matrix products alone, with NumPy's BLAS (gpunn's) and with PyTorch's, each in its own process.

    python bench/gemm_libraries.py                       # mlp 784-512-512-10, batch 32, 256, 2048; 1 and 2 threads
    python bench/gemm_libraries.py --batches 2048 --threads 1 --rounds 9

The products of one mlp step (per layer x·W, xᵀ·δ and, above the first layer, δ·Wᵀ: ``gpunn.bench.gemm_sequence``'s
workload), float32, timed back to back: with ``numpy.matmul`` (OpenBLAS in NumPy's wheels, what gpunn's CPU step
runs) and ``torch.mm`` (MKL in PyTorch's x86 wheels) into preallocated outputs, and as one ``jax.jit`` function
returning all of them (XLA's CPU dot; where JAX is installed). A library's GEMM sets the floor under a step that
is mostly products: where another library's products alone beat NumPy's, its step can beat gpunn's whatever
gpunn's elementwise kernels do. Each (library, threads, batch) runs alone in a fresh process, the libraries
alternated over ``--passes``; medians of ``--rounds`` samples of about ``--min-time`` s. Threads: NumPy's BLAS
through threadpoolctl, PyTorch's ``set_num_threads``; JAX on one thread is its process held to one core
(:func:`one_core`), on more left as XLA chooses. Each row also gives each process's CPU seconds per wall second
while timed (about 1 on one thread), to show what each library really used.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

from gpunn.bench import step_flops, timed

SIZES = [784, 512, 512, 10]
#: the libraries compared, NumPy (gpunn's) first
LIBRARIES = ("numpy", "torch", "jax")


def shapes(batch: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of each product of one step at ``batch``, in gemm_sequence's order."""
    out = []
    for k, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        out += [(batch, n_in, n_out), (n_in, batch, n_out)]
        if k:
            out.append((batch, n_out, n_in))
    return out


def measure(library: str, batch: int, threads: int, rounds: int, min_time: float) -> dict:
    """µs per sequence and GFLOP/s of the step's products with ``library`` on ``threads`` threads
    (``gpunn.bench.timed``: median of ``rounds`` blocks of about ``min_time`` s); the library's threads are
    put back as they were afterwards. The script runs it in a child process per measurement."""
    import numpy
    rng = numpy.random.default_rng(0)
    ops = [(rng.standard_normal((m, k), dtype=numpy.float32), rng.standard_normal((k, n), dtype=numpy.float32),
            numpy.empty((m, n), numpy.float32)) for m, k, n in shapes(batch)]
    if library == "jax":
        cores = os.sched_getaffinity(0)
        if threads == 1:
            one_core()
        import jax
        cpu = jax.devices("cpu")[0]
        pairs = [(jax.device_put(a, cpu), jax.device_put(b, cpu)) for a, b, _ in ops]
        products = jax.jit(lambda ps: [a @ b for a, b in ps])
        calls = [lambda: jax.block_until_ready(products(pairs))]
        restore = partial(os.sched_setaffinity, 0, cores)
        version = f"jax {jax.__version__} (XLA CPU)"
    elif library == "torch":
        import torch
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        restore = partial(torch.set_num_threads, before)
        calls = [partial(torch.mm, *map(torch.from_numpy, (a, b)), out=torch.from_numpy(c)) for a, b, c in ops]
        version = f"torch {torch.__version__}"
    else:
        from threadpoolctl import threadpool_info, threadpool_limits
        restore = threadpool_limits(threads, user_api="blas").restore_original_limits
        calls = [partial(numpy.matmul, a, b, out=c) for a, b, c in ops]
        blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        version = f"numpy {numpy.__version__}, " + ", ".join(f"{i['internal_api']} {i['version']} "
                                                             f"({i.get('architecture')})" for i in blas)
    def run() -> None:
        for call in calls:
            call()
    try:
        wall, cpu_s = time.perf_counter(), time.process_time()
        us = timed(run, lambda: None, rounds, min_time)["median"] * 1e6
        cpu_per_wall = (time.process_time() - cpu_s) / (time.perf_counter() - wall)
    finally:
        restore()
    return {"library": library, "batch": batch, "threads": threads, "us": us,
            "gflops": step_flops(SIZES, batch) / us / 1e3, "version": version, "cpu_per_wall": cpu_per_wall}


def one_core() -> None:
    """Keep this process on one of the cores it may use (before JAX loads): XLA's CPU runtime in JAX 0.10 kept
    about 1.8 cores busy here with ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``
    (CPU seconds per wall second, 2-core VM), so its one-thread row is one core, whatever threads XLA starts."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,256,2048")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("LIBRARY", "BATCH", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        lib, b, t = args.child
        print(json.dumps(measure(lib, int(b), int(t), args.rounds, args.min_time)))
        return 0
    rows: dict[tuple, list[dict]] = {}
    for p in range(args.passes):
        for t in (int(v) for v in args.threads.split(",")):
            for b in (int(v) for v in args.batches.split(",")):
                for lib in (LIBRARIES if p % 2 == 0 else LIBRARIES[::-1]):
                    run = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--min-time",
                                          str(args.min_time), "--child", lib, str(b), str(t)],
                                         capture_output=True, text=True, check=False)
                    if run.returncode:      # PyTorch or JAX not installed, say: its cells stay "-"
                        print(f"{lib} b{b} t{t} not measured: {(run.stderr.strip().splitlines() or ['failed'])[-1]}",
                              file=sys.stderr)
                        continue
                    r = json.loads(run.stdout.strip().splitlines()[-1])
                    rows.setdefault((t, b), []).append(r)
    versions = sorted({r["version"] for rs in rows.values() for r in rs})
    print("libraries: " + "; ".join(versions))
    names = {"numpy": "NumPy", "torch": "PyTorch", "jax": "JAX"}
    others = LIBRARIES[1:]
    print("| threads | batch | " + " | ".join(f"{names[lib]} µs" for lib in LIBRARIES) + " | "
          + " | ".join(f"{names[lib]} GFLOP/s" for lib in LIBRARIES) + " | "
          + " | ".join(f"NumPy / {names[lib]} time" for lib in others) + " | CPU s per wall s |")
    print("|---|---|" + "---|" * (2 * len(LIBRARIES) + len(others) + 1))
    for (t, b), rs in sorted(rows.items()):
        us = {lib: statistics.median(r["us"] for r in rs if r["library"] == lib) for lib in LIBRARIES
              if any(r["library"] == lib for r in rs)}
        load = {lib: statistics.median(r["cpu_per_wall"] for r in rs if r["library"] == lib) for lib in us}
        flops = step_flops(SIZES, b)
        cells = [f"{us[lib]:.1f}" if lib in us else "-" for lib in LIBRARIES]
        cells += [f"{flops / us[lib] / 1e3:.1f}" if lib in us else "-" for lib in LIBRARIES]
        cells += [f"{us['numpy'] / us[lib]:.2f}" if "numpy" in us and lib in us else "-" for lib in others]
        cells.append(" / ".join(f"{load[lib]:.2f}" for lib in LIBRARIES if lib in load))
        print(f"| {t} | {b} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
