"""Timing part of scripts/gpu-check.sh: gpunn-cupy (fused and unfused) against PyTorch eager on the
same card, the cuBLAS matmul ceiling, and evidence that a training step never waits for the GPU.

    PYTHONPATH=$PWD python3 bench/gpu_check.py --json out.json

Prints a table last and writes the JSON after every stage, so a crash or a timeout keeps what was
measured; a failing configuration is reported and the next one runs. On CPU CI the whole script runs
against tests/fakecupy.py (tests/test_bench_script.py), so its logic is checked before card time is spent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy

import compare
from gpunn import Device, cuda_unavailable_reason
from gpunn.bench import WORKLOADS, environment, format_table, step_flops, time_workload

CONFIGS = "lecture:1,lecture:16,mlp:32,mlp:256,mlp:2048,wide:4096"


def parse_configs(text: str) -> list[tuple[str, int]]:
    """'mlp:256,wide:4096' -> [('mlp', 256), ('wide', 4096)], refusing unknown workloads."""
    out = []
    for item in text.split(","):
        w, _, b = item.strip().partition(":")
        if w not in WORKLOADS or not b.isdigit() or int(b) < 1:
            raise SystemExit(f"bad config {item!r}: use WORKLOAD:BATCH with WORKLOAD in {sorted(WORKLOADS)}")
        out.append((w, int(b)))
    return out


def _tflops(n: int, timed_call) -> float:
    """n³ fp32 GEMM rate from ``timed_call()`` (seconds of one product): median of 5 after one warm-up."""
    ts = [timed_call() for _ in range(6)]
    return 2 * n**3 / float(numpy.median(ts[1:])) / 1e12


def matmul_ceiling(n: int = 8192) -> dict:
    """fp32 GEMM rate of CuPy (cuBLAS) and torch.mm at n³, TF32 off, timed with CUDA events."""
    import cupy as cp
    a = cp.random.standard_normal((n, n), dtype=cp.float32)
    b = cp.random.standard_normal((n, n), dtype=cp.float32)
    c = cp.empty((n, n), cp.float32)

    def cupy_call() -> float:
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        cp.matmul(a, b, out=c)
        e1.record()
        e1.synchronize()
        return cp.cuda.get_elapsed_time(e0, e1) / 1e3
    out = {"cupy_tflops": _tflops(n, cupy_call), "torch_tflops": None}
    try:
        import torch
    except ImportError:
        return out
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        ta, tb = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")

        def torch_call() -> float:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            torch.mm(ta, tb)
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / 1e3
        out["torch_tflops"] = _tflops(n, torch_call)
    return out


#: A kernel that holds the GPU for a number of its clock cycles (one thread, nothing else).
SPIN = r"""extern "C" __global__ void gpunn_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}"""


def _spin_cycles_per_ms(cp, kernel) -> float:
    """Calibrate the spin kernel on this card with CUDA events (clock rates vary with boost)."""
    cycles = 10_000_000
    kernel((1,), (1,), (numpy.int64(cycles),))          # warm-up (compilation)
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    e0.record()
    kernel((1,), (1,), (numpy.int64(cycles),))
    e1.record()
    e1.synchronize()
    return cycles / max(cp.cuda.get_elapsed_time(e0, e1), 1e-3)


def sync_evidence(workload: str, batch: int, steps: int = 10, block_ms: float = 300.0) -> dict:
    """Whether ``steps`` training steps can be enqueued behind a GPU that is busy for ``block_ms``.

    A kernel spins for ``block_ms`` first; then the host enqueues the steps. If any step waited for
    the GPU (``.get()``, ``float()`` or ``bool()`` of a device value, a synchronising allocation), the
    host would be stuck behind the spinning kernel, and the event recorded right after it would be
    complete when the host is done. Without a sync the host finishes while that event is still pending.
    Independent of how host and GPU time per step compare. Few steps, so the launch queue never fills.
    """
    import cupy as cp
    made, _ = compare.setup(workload, batch, ["gpunn"], device="cuda:0")
    step, _, sync = made["gpunn"]          # the same fused training step that is timed against torch
    for _ in range(3):
        step()
    sync()
    spin = cp.RawKernel(SPIN, "gpunn_spin")
    cycles = numpy.int64(block_ms * _spin_cycles_per_ms(cp, spin))
    after_block = cp.cuda.Event()
    t0 = time.perf_counter()
    spin((1,), (1,), (cycles,))
    after_block.record()
    for _ in range(steps):
        step()
    enqueue = time.perf_counter() - t0
    pending = not after_block.done
    sync()
    total = time.perf_counter() - t0
    return {"workload": workload, "batch": batch, "steps": steps, "blocker_ms": block_ms,
            "host_enqueue_ms": enqueue * 1e3, "gpu_done_ms": total * 1e3,
            "blocker_pending_when_host_done": pending, "host_ran_ahead": pending}


def host_and_gpu_time(workload: str, batch: int, names: list[str], steps: int = 20) -> dict:
    """Per contender: host µs to enqueue a step (no sync inside the loop) and GPU µs per step between two
    CUDA events (CuPy's for gpunn, PyTorch's for torch): where they are close, the step is launch-bound."""
    import cupy as cp
    made, _ = compare.setup(workload, batch, names, device="cuda:0")
    out = {}
    for name, (step, _, sync) in made.items():
        if name == "torch":
            import torch
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        else:
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        e0.record()
        for _ in range(steps):
            step()
        e1.record()
        host = time.perf_counter() - t0
        e1.synchronize()
        gpu_ms = e0.elapsed_time(e1) if name == "torch" else cp.cuda.get_elapsed_time(e0, e1)
        out[name] = {"host_us_per_step": host / steps * 1e6, "gpu_us_per_step": gpu_ms / steps * 1e3}
    return out


HEAD = ["workload", "batch", "gpunn fused µs", "gpunn unfused µs", "torch µs", "fused/torch speed-up",
        "fused/unfused", "GFLOP/s", "GEMM-only GFLOP/s", "share of ceiling", "of cuBLAS n³ rate"]


def _row(r: dict, s: dict, rate_tflops: float | None = None) -> list:
    """One table row from compare.measure's result ``r`` and time_workload's ``s`` ('-': did not run)."""
    def cell(d: dict, key: str, fmt: str, unit: str = "") -> str:
        return format(d[key], fmt) + unit if key in d else "-"
    us, sp = r["us_per_step"], r["speedup_gpunn_vs"]
    return [r["workload"], r["batch"], f"{us['gpunn']:.1f}", cell(us, "gpunn-unfused", ".1f"),
            cell(us, "torch", ".1f"), cell(sp, "torch", ".2f", "x"), cell(sp, "gpunn-unfused", ".2f", "x"),
            f"{s['gflops']:.0f}", f"{s['ceiling_gflops']:.0f}",
            f"{100 * s['share_of_ceiling']:.0f}%" if s["share_of_ceiling"] is not None else "noisy",
            f"{s['gflops'] / (rate_tflops * 1e3):.0%}" if rate_tflops else "-"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--budget", type=float, default=170.0, help="seconds; remaining configs are skipped")
    ap.add_argument("--configs", default=CONFIGS, help="WORKLOAD:BATCH,... (default: %(default)s)")
    ap.add_argument("--ceiling-n", type=int, default=8192, help="size of the square fp32 GEMM for the ceiling")
    args = ap.parse_args(argv)
    configs = parse_configs(args.configs)
    reason = cuda_unavailable_reason(0)
    if reason is not None:
        print(f"gpu_check: needs a usable cuda:0 ({reason})", file=sys.stderr)
        return 2
    start = time.perf_counter()
    env = environment("float32")
    env["commit"] = compare.commit()
    print("# " + json.dumps(env))
    report: dict = {"environment": env, "rows": [], "shares": [], "agreement": [], "errors": []}

    def save() -> None:   # after every stage: a crash or a timeout later keeps what was measured
        if args.json:
            from gpunn.io import write_text_atomic
            write_text_atomic(args.json, json.dumps(report, indent=2))

    n = args.ceiling_n
    ceiling = report["ceiling"] = matmul_ceiling(n)
    torch_rate = "not run" if ceiling["torch_tflops"] is None else f"{ceiling['torch_tflops']:.1f} TFLOP/s"
    print(f"# fp32 GEMM {n}^3: cupy {ceiling['cupy_tflops']:.1f} TFLOP/s, torch {torch_rate} (TF32 off)")
    # the no-sync evidence on the two configs with the most work per step
    heavy = sorted(configs, key=lambda c: step_flops(WORKLOADS[c[0]][0], c[1]))[-2:][::-1]
    syncs = report["sync_evidence"] = [sync_evidence(w, b, 3 if w == "wide" else 10) for w, b in heavy]
    for s in syncs:
        print(f"# no-sync evidence {s['workload']} b{s['batch']}: behind a {s['blocker_ms']:.0f} ms GPU "
              f"blocker the host enqueued {s['steps']} steps in {s['host_enqueue_ms']:.1f} ms "
              f"({1e3 * s['host_enqueue_ms'] / s['steps']:.0f} µs of host time per step), GPU done at "
              f"{s['gpu_done_ms']:.1f} ms -> "
              f"{'host ran ahead (no sync in the step)' if s['host_ran_ahead'] else 'HOST WAITED'}")
    save()
    names, skipped = compare.available(["gpunn", "gpunn-unfused", "torch"], "cuda:0")
    for name, why in skipped.items():
        print(f"# {name} skipped: {why}")
    failed = False
    for w, b in configs:
        if time.perf_counter() - start > args.budget:
            print(f"# budget spent: skipped {w} batch {b}")
            continue
        try:
            # a small learning rate keeps the 4096-wide ReLU net far from its kinks over 3 steps
            check = compare.agreement(w, min(b, 64), names, device="cuda:0", lr=0.01 if w == "wide" else 0.1)
            for name, d in check["diffs"].items():
                ok = d <= 1e-4
                failed |= not ok
                report["agreement"].append({"workload": w, "batch": min(b, 64), "contender": name, "diff": d})
                print(f"agreement {w} b{min(b, 64)} {name}: {d:.2e} {'ok' if ok else 'FAIL'}")
            row = compare.measure(w, b, names, args.rounds, args.min_time, "float32", "cuda:0")
            row["host_gpu"] = host_and_gpu_time(w, b, names)
            print(f"# host/GPU µs per step {w} b{b}: " + ", ".join(
                f"{n} {v['host_us_per_step']:.0f}/{v['gpu_us_per_step']:.0f}" for n, v in row["host_gpu"].items()))
            share = time_workload(w, Device("cuda:0"), "float32", b, repeats=3, min_time=args.min_time)
        except Exception as exc:       # report it and go on: card time is too short to stop at one failure
            failed = True
            report["errors"].append({"workload": w, "batch": b, "error": f"{type(exc).__name__}: {exc}"})
            print(f"ERROR {w} batch {b}: {type(exc).__name__}: {exc}")
            continue
        report["rows"].append(row)
        report["shares"].append(share)
        save()
    from gpunn.kernels import stale_counters
    stale = report["colsum_stale_counters"] = stale_counters(Device("cuda:0"))
    print(f"# colsum ticket counters left non-zero after every fused step here: {stale}")
    save()
    print()
    rate = report["ceiling"]["cupy_tflops"]
    print(format_table(HEAD, [_row(r, s, rate) for r, s in zip(report["rows"], report["shares"])], markdown=True))
    return 1 if failed or stale or not all(s["host_ran_ahead"] for s in syncs) else 0


if __name__ == "__main__":
    sys.exit(main())
