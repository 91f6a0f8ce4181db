"""The training step's matrix products alone, with NumPy's BLAS (gpunn's) and with PyTorch's, each in its own process.

    python bench/gemm_libraries.py                       # mlp 784-512-512-10, batch 32, 256, 2048; 1 and 2 threads
    python bench/gemm_libraries.py --batches 2048 --threads 1 --rounds 9

The products of one mlp step (per layer x·W, xᵀ·δ and, above the first layer, δ·Wᵀ: ``gpunn.bench.gemm_sequence``'s
workload) into preallocated outputs, float32, timed back to back: with ``numpy.matmul`` (OpenBLAS in NumPy's
wheels, what gpunn's CPU step runs) and with ``torch.mm`` (MKL in PyTorch's x86 wheels). A library's GEMM sets
the floor under a step that is mostly products: where PyTorch's products alone beat NumPy's, PyTorch's step can
beat gpunn's whatever gpunn's elementwise kernels do. Each (library, threads, batch) runs alone in a fresh
process, the libraries alternated over ``--passes``; medians of ``--rounds`` samples of about ``--min-time`` s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from functools import partial

from gpunn.bench import step_flops, timed

SIZES = [784, 512, 512, 10]


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
    if library == "torch":
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
        us = timed(run, lambda: None, rounds, min_time)["median"] * 1e6
    finally:
        restore()
    return {"library": library, "batch": batch, "threads": threads, "us": us,
            "gflops": step_flops(SIZES, batch) / us / 1e3, "version": version}


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
                for lib in (("numpy", "torch") if p % 2 == 0 else ("torch", "numpy")):
                    run = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--min-time",
                                          str(args.min_time), "--child", lib, str(b), str(t)],
                                         capture_output=True, text=True, check=False)
                    if run.returncode:      # PyTorch not installed, say: its cells stay "-"
                        print(f"{lib} b{b} t{t} not measured: {(run.stderr.strip().splitlines() or ['failed'])[-1]}",
                              file=sys.stderr)
                        continue
                    r = json.loads(run.stdout.strip().splitlines()[-1])
                    rows.setdefault((t, b), []).append(r)
    versions = sorted({r["version"] for rs in rows.values() for r in rs})
    print("libraries: " + "; ".join(versions))
    print("| threads | batch | NumPy µs | PyTorch µs | NumPy GFLOP/s | PyTorch GFLOP/s | NumPy / PyTorch time |")
    print("|---|---|---|---|---|---|---|")
    for (t, b), rs in sorted(rows.items()):
        us = {lib: statistics.median(r["us"] for r in rs if r["library"] == lib) for lib in ("numpy", "torch")
              if any(r["library"] == lib for r in rs)}
        flops = step_flops(SIZES, b)
        cells = [f"{us[lib]:.1f}" if lib in us else "-" for lib in ("numpy", "torch")]
        cells += [f"{flops / us[lib] / 1e3:.1f}" if lib in us else "-" for lib in ("numpy", "torch")]
        cells.append(f"{us['numpy'] / us['torch']:.2f}" if len(us) == 2 else "-")
        print(f"| {t} | {b} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
