"""Timing of training steps: workloads, method, environment header, and the matmul ceiling.

Method: build the workload's network on the device, warm up, then time blocks of steps repeatedly
(synchronising the device before every clock read) until each repeat lasts ``min_time``; report the
median and the spread (min–max) of µs/step over the repeats. The ceiling is the same step's matrix
products alone (the forward and backward GEMMs with the same shapes and ``out=`` buffers), timed the
same way in the same run, so "share of ceiling" says how much of the step is overhead.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy

from . import cpukernels, losses, threads
from .backend import Device, available_devices, cuda_unavailable_reason, cupy_module, tf32_enabled
from .network import Sequential, mlp
from .optim import SGD
from .scalars import integer, real
from .types import Array
from .version import __version__

#: name → (layer sizes, hidden activation, output activation, loss, batch sizes)
WORKLOADS: dict[str, tuple] = {
    "lecture": ([4, 8, 1], "sigmoid", "sigmoid", "squared_error", [1, 16]),
    "mlp": ([784, 512, 512, 10], "sigmoid", "softmax", "cross_entropy", [32, 256, 2048]),
    "wide": ([4096, 4096, 4096, 10], "relu", "softmax", "cross_entropy", [4096]),
}


def step_flops(sizes: list[int], batch: int) -> int:
    """Floating-point operations of the matrix products of one step: forward x·W, backward Xᵀ·δ and
    δ·Wᵀ for every layer but the first (which needs no input gradient), 2 flops per multiply-add."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    fwd = sum(i * o for i, o in pairs)
    return 2 * batch * (3 * fwd - pairs[0][0] * pairs[0][1])


def build(workload: str, device: Any, dtype: str, batch: int, seed: int = 0,
          fused: bool | None = None) -> tuple[Sequential, numpy.ndarray, numpy.ndarray, losses.Loss, SGD]:
    """(net, X, T, loss, optimizer) for one workload: random host data made on the spot."""
    sizes, hidden, out_act, loss, _ = WORKLOADS[workload]
    net = mlp(sizes, activation=hidden, output=out_act, device=device, dtype=dtype, seed=seed, fused=fused)
    rng = numpy.random.Generator(numpy.random.PCG64(seed + 7))
    X = rng.normal(size=(batch, sizes[0]))
    if loss == "cross_entropy":
        T = numpy.eye(sizes[-1])[rng.integers(0, sizes[-1], size=batch)]
    else:
        T = rng.uniform(size=(batch, sizes[-1]))
    return net, X, T, losses.get(loss), SGD(lr=1e-3)


def timed(fn: Callable[[], None], sync: Callable[[], None], repeats: int, min_time: float,
          warmup: int = 3) -> dict:
    """Median/min/max seconds per call of ``fn`` over ``repeats`` blocks of at least ``min_time`` each."""
    for _ in range(warmup):
        fn()
    sync()
    n = calls_for(fn, sync, min_time)
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        per.append((time.perf_counter() - t0) / n)
    return {"median": statistics.median(per), "min": min(per), "max": max(per), "calls": n, "per": per}


def format_table(head: list[str], rows: list[list], markdown: bool = False) -> str:
    """A results table as Markdown, or as right-aligned plain columns (every benchmark prints through here)."""
    cells = [[str(c) for c in row] for row in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [head, *cells])


def calls_for(fn: Callable[[], None], sync: Callable[[], None], min_time: float) -> int:
    """How many calls of ``fn`` (device synchronised at the end) take about ``min_time`` seconds."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        dt = time.perf_counter() - t0
        if dt >= min_time / 4 or n >= 1 << 20:
            break
        n *= 2
    return max(1, int(n * min_time / max(dt, 1e-9)))


def gemm_sequence(net: Sequential, x: Array) -> Callable[[], None]:
    """The step's matrix products alone, on the net's own buffers (the ceiling's workload)."""
    xp = net.xp
    ops = []
    a = x
    for layer in net.layers:
        bufs = layer.buffers(xp, x.shape[0])
        ops.append((a, layer.W, bufs.z, bufs.delta, layer.grad_W, bufs.dx))
        a = bufs.y

    def run() -> None:
        for a_in, W, z, d, gW, dx in ops:
            xp.matmul(a_in, W, out=z)
            xp.matmul(a_in.T, d, out=gW)
            if dx is not None:
                xp.matmul(d, W.T, out=dx)
    return run


def time_workload(workload: str, device: Any, dtype: str, batch: int, repeats: int = 5,
                  min_time: float = 0.2, fused: bool | None = None) -> dict:
    """One benchmark row: µs/step (median, spread), samples/s, GFLOP/s and share of the GEMM ceiling."""
    repeats, min_time = integer("repeats", repeats, low=1), real("min_time", min_time, 0.0, low_open=True)
    dev = Device(device) if not isinstance(device, Device) else device
    with dev.activate():
        net, X, T, loss, opt = build(workload, dev, dtype, batch, fused=fused)
        net.ops.warm_up()           # the fused CPU kernels now, not after the first seconds of stepping
        t0 = time.perf_counter()
        x = dev.asarray(X, dtype=net.dtype)
        t = dev.asarray(T, dtype=net.dtype)
        dev.synchronize()
        h2d = time.perf_counter() - t0

        def step() -> None:
            net.train_step(x, t, loss, opt)
        step()
        r, g, shares = timed_pair(step, gemm_sequence(net, x), dev.synchronize, repeats, min_time)
    sizes = WORKLOADS[workload][0]
    flops = step_flops(sizes, batch)
    share = statistics.median(shares)
    return {"workload": workload, "device": str(dev), "fused": net.fused, "dtype": dtype, "batch": batch,
            "us_per_step": r["median"] * 1e6, "us_min": r["min"] * 1e6, "us_max": r["max"] * 1e6,
            "samples_per_s": batch / r["median"], "gflops": flops / r["median"] / 1e9,
            "ceiling_gflops": flops / g["median"] / 1e9,
            # the step contains the products: a share above 100 % is noise, never a figure to print
            "share_of_ceiling": share if share <= 1.0 else None, "share_spread": [min(shares), max(shares)],
            "h2d_ms": h2d * 1e3, "steps_timed": r["calls"] * repeats,
            "threads": None if dev.is_cuda else threads.current()}


def timed_pair(step: Callable[[], None], gemm: Callable[[], None], sync: Callable[[], None], repeats: int,
               min_time: float, warmup: int = 3) -> tuple[dict, dict, list[float]]:
    """Time ``step`` and its matrix products ``gemm`` in alternating blocks of the same number of calls,
    so both see the same machine state; returns both timings and each pair's ratio gemm/step."""
    for _ in range(warmup):
        step()
        gemm()
    sync()
    n = calls_for(step, sync, min_time)
    per_step: list[float] = []
    per_gemm: list[float] = []
    for _ in range(repeats):
        for fn, out in ((step, per_step), (gemm, per_gemm)):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            out.append((time.perf_counter() - t0) / n)

    def stats(v: list[float]) -> dict:
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "calls": n}
    return stats(per_step), stats(per_gemm), [g / s for g, s in zip(per_gemm, per_step)]


def environment(dtype: str | None = None) -> dict:
    """Versions and hardware for benchmark headers and ``gpunn info``."""
    env: dict[str, Any] = {"gpunn": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
                           "cpu": _cpu_model(), "cores": os.cpu_count(), "blas": _blas(),
                           "tf32": tf32_enabled(), "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
                           "threads": threads.describe(), "numba": cpukernels.numba_version(),
                           "cpu_kernels_unavailable_reason": cpukernels.unavailable_reason(),
                           "float32_exp_inside_kernels": cpukernels.exp_inside()[0]}
    if dtype:
        env["dtype"] = dtype
    reason = cuda_unavailable_reason()
    env["cuda_unavailable_reason"] = reason
    cp = cupy_module() if reason is None else None
    env["cupy"] = getattr(cp, "__version__", None) if cp is not None else None
    env["gpus"] = []
    if cp is not None:
        try:
            env["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
            env["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
        except Exception:  # pragma: no cover - depends on the driver
            pass
        for spec in available_devices()[1:]:
            i = int(spec.split(":")[1])
            props = cp.cuda.runtime.getDeviceProperties(i)
            with cp.cuda.Device(i):
                free, total = cp.cuda.runtime.memGetInfo()
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            env["gpus"].append({"device": spec, "name": name, "memory_total_gib": total / 2**30,
                                "memory_free_gib": free / 2**30, "sm_count": props.get("multiProcessorCount"),
                                "clock_mhz": (props.get("clockRate") or 0) / 1000})
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas() -> str | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not blas:
        return None
    info = min(blas, key=lambda i: "numpy" not in str(i.get("filepath", "")))   # NumPy's own BLAS first
    return (f"{info.get('internal_api')} {info.get('version')} ({info.get('architecture')}, "
            f"{info.get('num_threads')} threads)")
