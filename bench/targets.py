"""Every CPU target of issue 23 in one command: a record under bench/results/ with machine, date, commit.

    python bench/targets.py                      # writes bench/results/<date>-cpu-targets-<cpu>.md and .json
    python bench/targets.py --passes 3 --rounds 5   # 3 passes over the contenders, order alternated (default 3)
    python bench/targets.py --quick              # fewer rounds (a sanity run, not a record)

Measured, each contender alone in a process of its own (bench/compare.py's isolated method), float32:

1. gpunn's training step against PyTorch eager and JAX's jitted step (``jax.jit`` of forward, backward
   and SGD update): ratios contender time / gpunn time at mlp (784-512-512-10) batch 32, 256, 2048 and
   at lecture (4-8-1) batch 1. A contender that is not installed is reported as not measured.
2. The share of the GEMM ceiling at mlp batch 2048 on one BLAS thread (``GPUNN_THREADS=1``): the step's
   matrix products alone, timed in alternation with the step (``gpunn bench``'s method), over the step:
   the median of 41 pairs of about 0.02 s a side (one step, then one sequence of its products, at batch
   2048). With pairs of 0.3 s a side, on the 2-core VM one pair's ratio ranged over 0.76–1.15 within a run
   and medians of 5 pairs over 0.89–0.97 within an hour (2026-12-01); with 41 short pairs, three medians
   of the same code within 10 minutes spanned 94.0–95.2 % while the step's own time moved by 10 %. The
   shares at 32 and 256 are recorded beside it.
3. The busy machine: gpunn and PyTorch at mlp batch 32 and 256 on the quiet machine and with another
   process spinning on one of this process's CPUs (pinned there), each alone; slowdown = busy / quiet.
4. Where gpunn's step goes, one BLAS thread: each operation (GEMMs, bias + activation, derivative,
   column sums, loss, update) timed alone on the step's buffers, at every configuration of 1.

Targets (issue 23): vs PyTorch ≥ 1.30 / 1.15 / 1.12 at mlp 32 / 256 / 2048 and ≥ 15 at lecture; vs JAX
≥ 1.0 at every batch size; GEMM share ≥ 95 % at 2048 on one thread; gpunn's busy slowdown ≤ 2 at 32
and 256. Run it on a quiet machine: nothing else should be running (other than the spinner it starts).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compare  # noqa: E402  (bench/compare.py, beside this file)
from gpunn.bench import environment, format_table  # noqa: E402

VS_TORCH = {("mlp", 32): 1.30, ("mlp", 256): 1.15, ("mlp", 2048): 1.12, ("lecture", 1): 15.0}
CONFIGS = [("mlp", 32), ("mlp", 256), ("mlp", 2048), ("lecture", 1)]
SHARE_TARGET = 0.95
#: The GEMM share's pairs: many short ones (one step and one GEMM sequence each at batch 2048), so that both
#: halves of a pair see the same machine state (below)
SHARE_PAIRS, SHARE_TIME = 41, 0.02
BUSY_TARGET = 2.0
BUSY_BATCHES = [32, 256]


def contenders_alone(configs: list[tuple[str, int]], names: list[str], rounds: int, min_time: float,
                     passes: int = 1) -> list[dict]:
    """compare.py's isolated measurement of ``names`` at each (workload, batch), in ``passes`` alternated passes."""
    out = []
    for workload, batch in configs:
        print(f"timing {workload} batch {batch}: {', '.join(names)} ...", file=sys.stderr)
        out.append(compare.measure_isolated(workload, batch, names, rounds, min_time, "float32", passes=passes))
    return out


def gemm_share(batch: int, rounds: int, min_time: float) -> dict:
    """``gpunn bench``'s row for mlp at ``batch`` on one BLAS thread, in a fresh process."""
    row = on_one_thread(f"import json, gpunn.bench as b; r = b.time_workload('mlp', 'cpu', 'float32', {batch}, "
                        f"repeats={rounds}, min_time={min_time!r}); print(json.dumps(r))")
    if "error" in row:
        return row
    return {k: row[k] for k in ("batch", "us_per_step", "gflops", "ceiling_gflops", "share_of_ceiling",
                                "share_spread", "threads")}


def on_one_thread(code: str) -> dict:
    """The JSON that ``code`` prints last, run in a fresh Python with one BLAS thread (GPUNN_THREADS=1, the
    user's BLAS thread variables removed); {"error": its last stderr line} where it fails."""
    env = dict(os.environ, GPUNN_THREADS="1")
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def op_profile(workload: str, batch: int, rounds: int, min_time: float) -> dict:
    """µs of each operation of gpunn's step (fused CPU kernels, this process's BLAS threads), each timed
    alone on the step's own buffers: the GEMMs, every layer's bias + activation and derivative, the
    column sums, the loss and the update; "the rest" is the step less their sum (Python, and the cache
    misses that operations timed alone in a loop do not have)."""
    import numpy

    from gpunn.bench import build, timed
    net, X, T, loss, opt = build(workload, "cpu", "float32", batch)
    net.ops.warm_up()
    x, t = numpy.asarray(X, numpy.float32), numpy.asarray(T, numpy.float32)
    ops, xp = net.ops, numpy
    for _ in range(3):
        net.train_step(x, t, loss, opt)
    parts, a, exps = {}, x, {}
    for k, L in enumerate(net.layers):
        b = L.buffers(xp, batch)
        if L.activation.name in ("sigmoid", "softmax"):     # NumPy's exp inside their chain, timed alone too,
            # on what it takes in the step (min(−z, cap), z − max): the timed operations below change z
            inputs = xp.minimum(-b.z, 88.0) if L.activation.name == "sigmoid" else b.z - b.z.max(axis=1, keepdims=True)
            exps[f"L{k}"] = functools.partial(xp.exp, inputs.astype(numpy.float32), xp.empty_like(b.y))
        parts[f"gemm L{k} x·W"] = lambda a=a, L=L, b=b: xp.matmul(a, L.W, out=b.z)
        parts[f"L{k} bias + {L.activation.name}"] = \
            lambda L=L, b=b: ops.bias_activation(L.activation, b.z, L.b, b.y, b.rowstats)
        parts[f"gemm L{k} xᵀ·δ"] = lambda a=a, L=L, b=b: xp.matmul(a.T, b.delta, out=L.grad_W)
        parts[f"L{k} column sum"] = lambda L=L, b=b: ops.column_sum(b.delta, L.grad_b)
        if b.dx is not None:
            below = net.layers[k - 1]
            bb = below.buffers(xp, batch)
            parts[f"gemm L{k} δ·Wᵀ"] = lambda L=L, b=b: xp.matmul(b.delta, L.W.T, out=b.dx)
            parts[f"L{k - 1} δ = f′·g ({below.activation.name})"] = lambda below=below, bb=bb, b=b: \
                ops.activation_backward(below.activation, bb.z, bb.y, b.dx, bb.delta, bb.scratch, bb.rowstats)
        a = b.y
    out, gy = net.layers[-1], xp.empty((batch, net.n_out), numpy.float32)
    bound_loss = ops.bind_loss_backward(loss, out, out.buffers(xp, batch), gy)      # the call the step makes
    parts[f"loss {loss.name}"] = lambda: bound_loss(t, None)
    parts["update"] = lambda: opt.update(net.flat_parameters(), net.flat_gradients(), None, ops)
    with numpy.errstate(all="ignore"):
        us = {name: statistics.median(timed(fn, lambda: None, rounds, min_time)["per"]) * 1e6
              for name, fn in parts.items()}
        step = statistics.median(timed(lambda: net.train_step(x, t, loss, opt), lambda: None, rounds,
                                       min_time)["per"]) * 1e6
        exp_us = {k: statistics.median(timed(fn, lambda: None, rounds, min_time)["per"]) * 1e6
                  for k, fn in exps.items()}
    gemm = sum(v for n, v in us.items() if n.startswith("gemm"))
    us["the rest (Python, cache misses between operations)"] = max(0.0, step - sum(us.values()))
    inside = getattr(ops, "kernels", None) is not None and ops.kernels.k.exp_inside
    return {"workload": workload, "batch": batch, "step_us": step, "gemm_us": gemm, "parts_us": us, "exp_us": exp_us,
            "exp_inside": inside}


def profiles(configs: list[tuple[str, int]], rounds: int, min_time: float) -> list[dict]:
    """:func:`op_profile` of each configuration on one BLAS thread, each in a fresh process."""
    out = []
    for w, b in configs:
        got = on_one_thread(f"import json, sys; sys.path.insert(0, {HERE!r}); import targets; "
                            f"print(json.dumps(targets.op_profile({w!r}, {b}, {rounds}, {min_time!r})))")
        out.append({"workload": w, "batch": b, **got} if "error" in got else got)
    return out


def spinner() -> subprocess.Popen:
    """A process spinning on the last CPU this process may use."""
    cpu = max(os.sched_getaffinity(0))
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)
    return proc


def busy_machine(names: list[str], rounds: int, min_time: float, passes: int = 1) -> list[dict]:
    """Quiet and busy timings of each contender at BUSY_BATCHES; the spinner runs only for the busy ones."""
    configs = [("mlp", b) for b in BUSY_BATCHES]
    quiet = contenders_alone(configs, names, rounds, min_time, passes)
    proc = spinner()
    try:
        busy = contenders_alone(configs, names, rounds, min_time, passes)
    finally:
        proc.kill()
        proc.wait()
    rows = []
    for q, b in zip(quiet, busy):
        for name in names:
            if name in q["us_per_step"] and name in b["us_per_step"]:
                rows.append({"contender": name, "batch": q["batch"], "quiet_us": q["us_per_step"][name],
                             "busy_us": b["us_per_step"][name],
                             "slowdown": b["us_per_step"][name] / q["us_per_step"][name],
                             "threads_busy": b["threads"].get(name)})
    return rows


def verdicts(ratios: list[dict], shares: dict, busy: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, met / NOT met / not measured) for every target of the issue."""
    out = []
    by = {(r["workload"], r["batch"]): r for r in ratios}
    for (w, b), goal in VS_TORCH.items():
        got = by.get((w, b), {}).get("speedup_gpunn_vs", {}).get("torch")
        out.append((f"vs PyTorch eager, {w} b{b} ≥ {goal:g}", *_judge(got, goal)))
    for w, b in CONFIGS:
        got = by.get((w, b), {}).get("speedup_gpunn_vs", {}).get("jax")
        out.append((f"vs JAX jitted step, {w} b{b} ≥ 1.0", *_judge(got, 1.0)))
    share = shares.get(2048, {}).get("share_of_ceiling")
    out.append(("GEMM share, mlp b2048, 1 thread ≥ 95 %",
                f"{100 * share:.1f} %" if share else "not measured",
                ("met" if share >= SHARE_TARGET else "NOT met") if share else "unknown"))
    for b in BUSY_BATCHES:
        got = next((r["slowdown"] for r in busy if r["contender"] == "gpunn" and r["batch"] == b), None)
        text, verdict = _judge(got, BUSY_TARGET, at_most=True)
        torch_got = next((r["slowdown"] for r in busy if r["contender"] == "torch" and r["batch"] == b), None)
        text += f" (PyTorch {torch_got:.2f}×)" if torch_got is not None else " (PyTorch not measured)"
        out.append((f"busy machine slowdown, gpunn mlp b{b} ≤ {BUSY_TARGET:g}×", text, verdict))
    return out


def _judge(got: float | None, goal: float, at_most: bool = False) -> tuple[str, str]:
    if got is None:
        return "not measured", "unknown"
    ok = got <= goal if at_most else got >= goal
    return f"{got:.2f}×", "met" if ok else "NOT met"


def profile_tables(profs: list[dict]) -> list[str]:
    """Markdown lines: per configuration, the step's operations (µs, share of the step)."""
    lines = ["", "## Where the step goes (fused CPU kernels, one BLAS thread, each operation timed alone)", ""]
    for p in profs:
        if "error" in p:
            lines += [f"{p['workload']} b{p['batch']}: not profiled ({p['error']})", ""]
            continue
        lines += [f"{p['workload']} b{p['batch']}: step {p['step_us']:.1f} µs, GEMMs {p['gemm_us']:.1f} µs "
                  f"({100 * p['gemm_us'] / p['step_us']:.1f} %)", ""]
        rows = [[name, f"{v:.1f}", f"{100 * v / p['step_us']:.1f} %"] for name, v in p["parts_us"].items()]
        lines += [format_table(["operation", "µs", "share of step"], rows, markdown=True), ""]
        if p.get("exp_us"):
            total = sum(p["exp_us"].values())
            where = ("the kernels run gpunn.cpuexp's transcription of it inside their pass" if p.get("exp_inside")
                     else "the kernels call NumPy's exp between two of theirs")
            lines += ["NumPy's exp alone on the same inputs as the bias + activation rows: " + ", ".join(
                f"{k} {v:.1f} µs" for k, v in p["exp_us"].items()) + f" ({100 * total / p['step_us']:.1f} % of the "
                f"step; {where}, bitwise equal to the NumPy path).", ""]
    return lines


def _ratio_cell(r: dict, name: str) -> str:
    """The pooled ratio, with each pass's ratio in brackets when there were several passes."""
    if name not in r["speedup_gpunn_vs"]:
        return "-"
    each = r.get("pass_ratios", {}).get(name, [])
    tail = f" ({', '.join(f'{v:.2f}' for v in each)})" if len(each) > 1 else ""
    return f"{r['speedup_gpunn_vs'][name]:.2f}{tail}"


def markdown(env: dict, ratios: list[dict], shares: dict, busy: list[dict], names: list[str],
             profs: list[dict] | None = None) -> str:
    lines = [f"# CPU targets of issue 23 — {env['cpu']}, {env['date']}, commit {env['commit']}", "",
             f"Machine `{env['machine']}`: {env['cpu']}, {env['cores']} cores; Python {env['python']}, NumPy "
             f"{env['numpy']}, BLAS {env['blas']}; numba {env['numba']}; torch {env.get('torch')}; jax "
             f"{env.get('jax')}. BLAS threads: {env['threads_summary']}.",
             "Each contender alone in a process of its own; µs per step are medians of the samples of "
             f"{ratios[0].get('passes', 1) if ratios else 1} pass(es) over the contenders, in alternating order; "
             "ratios are contender / gpunn (in brackets: each pass's own ratio).",
             "Command: `python bench/targets.py`.", "", "## Verdicts", ""]
    lines.append(format_table(["target", "measured", "verdict"], [list(v) for v in verdicts(ratios, shares, busy)],
                              markdown=True))
    lines += ["", "## Training step, each contender alone", ""]
    head = ["workload", "batch"] + [f"{n} µs" for n in names] + [f"{n} / gpunn" for n in names[1:]]
    rows = [[r["workload"], str(r["batch"])]
            + [f"{r['us_per_step'][n]:.1f}" if n in r["us_per_step"] else "-" for n in names]
            + [_ratio_cell(r, n) for n in names[1:]]
            for r in ratios]
    lines.append(format_table(head, rows, markdown=True))
    lines += ["", "## Share of the GEMM ceiling, mlp, one BLAS thread", ""]
    lines.append(format_table(["batch", "µs/step", "GFLOP/s", "ceiling GFLOP/s", "share", "spread"],
                              [[str(b), f"{s['us_per_step']:.1f}", f"{s['gflops']:.1f}", f"{s['ceiling_gflops']:.1f}",
                                f"{100 * s['share_of_ceiling']:.1f} %" if s.get("share_of_ceiling") else "noisy",
                                "–".join(f"{100 * v:.0f} %" for v in s["share_spread"])]
                               for b, s in shares.items() if "error" not in s], markdown=True))
    lines += ["", "## Busy machine (another process spinning on one CPU)", ""]
    lines.append(format_table(["contender", "batch", "quiet µs", "busy µs", "slowdown"],
                              [[r["contender"], str(r["batch"]), f"{r['quiet_us']:.1f}", f"{r['busy_us']:.1f}",
                                f"{r['slowdown']:.2f}×"] for r in busy], markdown=True))
    lines += profile_tables(profs or [])
    skipped = {k: v for r in ratios for k, v in r["skipped"].items()}
    if skipped:
        lines += [""] + [f"- {k} not measured: {v}" for k, v in skipped.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 0.05 s: a sanity run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the record")
    ap.add_argument("--contenders", default="gpunn,torch,jax")
    ap.add_argument("--passes", type=int, default=3,
                    help="passes over the contenders, alternating their order (pooled; 1 with --quick)")
    args = ap.parse_args(argv)
    rounds, min_time = (3, 0.05) if args.quick else (args.rounds, args.min_time)
    passes = 1 if args.quick else max(1, args.passes)
    names, skipped = compare.available([n.strip() for n in args.contenders.split(",")])
    if "gpunn" not in names:
        names.insert(0, "gpunn")
    env = _environment()
    ratios = contenders_alone(CONFIGS, names, rounds, min_time, passes)
    for r in ratios:
        r["skipped"].update(skipped)
    share_pairs, share_time = (3, 0.05) if args.quick else (SHARE_PAIRS, SHARE_TIME)
    shares = {b: gemm_share(b, share_pairs, share_time) for b in (32, 256, 2048)}
    busy = busy_machine([n for n in names if n in ("gpunn", "torch")], rounds, min_time, passes)
    profs = profiles(CONFIGS, rounds, min(min_time, 0.1))
    text = markdown(env, ratios, shares, busy, names, profs)
    print(text)
    stem = f"{env['date']}-cpu-targets-{re.sub(r'[^a-z0-9]+', '-', env['cpu'].lower()).strip('-')[:40]}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump({"environment": env, "ratios": ratios, "gemm_share_one_thread": shares, "busy": busy,
                   "profiles": profs, "verdicts": verdicts(ratios, shares, busy)}, fh, indent=2, default=str)
    print(f"wrote {os.path.join(args.out, stem)}.md and .json", file=sys.stderr)
    return 0


def _environment() -> dict:
    from gpunn import threads
    env = environment("float32")
    env.update({"commit": compare.commit(), "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                "threads_summary": threads.summary(), "load_before": os.getloadavg()})
    for mod in ("torch", "jax"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


if __name__ == "__main__":
    sys.exit(main())
