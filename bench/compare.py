"""gpunn against the tools people would otherwise use, same workloads, weights and batches.

Contenders: gpunn (NumPy backend), a hand-written NumPy loop (preallocated arrays, ``out=``: the
tightest code we could write), PyTorch eager on the CPU (if importable), JAX's jitted step (``jax.jit``
of the whole forward, backward and SGD update, if importable) and scikit-learn's MLPClassifier (if
importable; `mlp`-style classification workloads only). Before timing, every
contender trains a few steps from the same initial weights on the same batches and must agree with
gpunn.

Timing (default, ``--isolate``): each contender runs alone in a process of its own, one after the
other, so no contender's threads are alive while another is timed (OpenBLAS workers spin for a while
after a call and would take a core from the next contender). Each reports the BLAS it used and its
thread count. The speed-up is the ratio of medians. ``--interleaved`` instead times the contenders in
one process, A/B/A/B with the order rotated every round (ratios per round): the way to see how much
the contenders disturb each other.

    python bench/compare.py --workload mlp --batch-size 32,256,2048 --rounds 7 --markdown
    python bench/compare.py --check-only            # agreement only (the test suite runs this)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy

import gpunn
from gpunn import losses
from gpunn.activations import exp_cap
from gpunn.bench import WORKLOADS, build, calls_for, environment, format_table, step_flops, timed


# -- contenders: make(net, X, T, lr, loss_name) -> (step, params, sync) --------------------------------
# ``net`` is a gpunn network already on the benchmark's device; the others copy its initial weights.
def gpunn_contender(net, X, T, lr, loss_name):
    net.ops.warm_up()               # the fused CPU kernels now, not after the first seconds of stepping
    x = net.device.asarray(X, dtype=net.dtype)
    t = net.device.asarray(T, dtype=net.dtype)
    loss = losses.get(loss_name)
    opt = gpunn.SGD(lr=lr)

    def step():
        net.train_step(x, t, loss, opt)

    def params():
        return [gpunn.to_host(p).astype(numpy.float64) for p in net.parameters()]
    return step, params, net.device.synchronize


def numpy_contender(net, X, T, lr, loss_name):
    """Hand-written: the same maths as gpunn, written out for this one network shape."""
    if net.device.is_cuda:
        raise ValueError("the hand-written loop is NumPy code: CPU only")
    dt = net.dtype
    Ws = [numpy.array(layer.W, dtype=dt) for layer in net.layers]
    bs = [numpy.array(layer.b, dtype=dt) for layer in net.layers]
    acts = [layer.activation.name for layer in net.layers]
    x = numpy.ascontiguousarray(X, dtype=dt)
    t = numpy.ascontiguousarray(T, dtype=dt)
    B = x.shape[0]
    zs = [numpy.empty((B, W.shape[1]), dt) for W in Ws]
    ys = [numpy.empty((B, W.shape[1]), dt) for W in Ws]
    ds = [numpy.empty((B, W.shape[1]), dt) for W in Ws]
    dxs = [None] + [numpy.empty((B, W.shape[0]), dt) for W in Ws[1:]]
    gW = [numpy.empty_like(W) for W in Ws]
    gb = [numpy.empty_like(b) for b in bs]
    col = numpy.empty((B, 1), dt)
    inv_b = 1.0 / B
    cap = exp_cap(dt)                   # the same exponent cap as gpunn's sigmoid

    def step():
        a = x
        for W, b, z, y, act in zip(Ws, bs, zs, ys, acts):
            numpy.matmul(a, W, out=z)
            z += b
            if act == "sigmoid":
                numpy.negative(z, out=y)
                numpy.minimum(y, cap, out=y)
                numpy.exp(y, out=y)
                y += 1.0
                numpy.reciprocal(y, out=y)
            elif act == "relu":
                numpy.maximum(z, 0.0, out=y)
            elif act == "softmax":
                numpy.max(z, axis=1, keepdims=True, out=col)
                numpy.subtract(z, col, out=y)
                numpy.exp(y, out=y)
                numpy.sum(y, axis=1, keepdims=True, out=col)
                y /= col
            a = y
        L = len(Ws)
        d = ds[-1]
        numpy.subtract(ys[-1], t, out=d)
        if loss_name == "squared_error":          # sigmoid output: eq (13), δ = (y − y*) y (1 − y)
            numpy.subtract(1.0, ys[-1], out=zs[-1])   # the output's z is no longer needed
            zs[-1] *= ys[-1]
            d *= zs[-1]
        d *= inv_b
        for k in range(L - 1, -1, -1):
            a_in = x if k == 0 else ys[k - 1]
            numpy.matmul(a_in.T, ds[k], out=gW[k])
            numpy.sum(ds[k], axis=0, out=gb[k])
            if k > 0:
                numpy.matmul(ds[k], Ws[k].T, out=dxs[k])
                dprev = ds[k - 1]
                if acts[k - 1] == "sigmoid":
                    numpy.subtract(1.0, ys[k - 1], out=dprev)
                    dprev *= ys[k - 1]
                    dprev *= dxs[k]
                else:   # relu
                    numpy.greater(zs[k - 1], 0.0, out=dprev)
                    dprev *= dxs[k]
        for W, b, g, h in zip(Ws, bs, gW, gb):
            g *= lr
            W -= g
            h *= lr
            b -= h

    def params():
        return [numpy.array(p, dtype=numpy.float64) for pair in zip(Ws, bs) for p in pair]
    return step, params, _no_sync


def _no_sync():
    pass


def torch_contender(net, X, T, lr, loss_name):
    import torch
    torch.set_float32_matmul_precision("highest")          # no TF32, as gpunn
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cpu" if not net.device.is_cuda else f"cuda:{net.device.index}"
    dt = {"float32": torch.float32, "float64": torch.float64}[net.dtype.name]
    mods = []
    for layer in net.layers:
        lin = torch.nn.Linear(layer.n_in, layer.n_out, dtype=dt)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(gpunn.to_host(layer.W).T.copy()))
            lin.bias.copy_(torch.from_numpy(gpunn.to_host(layer.b)))
        mods.append(lin)
        act = layer.activation.name
        if act == "sigmoid":
            mods.append(torch.nn.Sigmoid())
        elif act == "relu":
            mods.append(torch.nn.ReLU())
        elif act != "softmax":
            raise ValueError(act)
    if net.layers[-1].activation.name == "softmax" or loss_name == "cross_entropy":
        if mods and isinstance(mods[-1], torch.nn.Sigmoid):
            raise ValueError("cross-entropy after sigmoid")
    model = torch.nn.Sequential(*mods).to(dev)
    x = torch.from_numpy(numpy.ascontiguousarray(X, dtype=net.dtype)).to(dev)
    t = torch.from_numpy(numpy.ascontiguousarray(T, dtype=net.dtype)).to(dev)
    labels = t.argmax(dim=1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, foreach=True)
    ce = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        if loss_name == "cross_entropy":
            loss = ce(out, labels)
        else:
            loss = 0.5 * ((out - t) ** 2).sum(dim=1).mean()
        loss.backward()
        opt.step()

    def params():
        out = []
        for m in mods:
            if isinstance(m, torch.nn.Linear):
                out += [m.weight.detach().cpu().numpy().T.astype(numpy.float64),
                        m.bias.detach().cpu().numpy().astype(numpy.float64)]
        return out
    sync = torch.cuda.synchronize if dev != "cpu" else _no_sync
    return step, params, sync


def jax_contender(net, X, T, lr, loss_name):
    """JAX's jitted step: forward, loss, gradient (jax.grad) and the SGD update as one XLA program, the
    parameters donated so that XLA updates them in place."""
    import jax
    import jax.numpy as jnp
    if net.device.is_cuda:
        raise ValueError("the JAX contender runs on the CPU here")
    if net.dtype == numpy.float64:
        jax.config.update("jax_enable_x64", True)
    cpu = jax.devices("cpu")[0]
    acts = [layer.activation.name for layer in net.layers]
    if any(a not in ("sigmoid", "relu", "softmax") for a in acts):
        raise ValueError(f"activations {acts}: the JAX contender knows sigmoid, relu and softmax")
    params = [(jax.device_put(numpy.array(layer.W, dtype=net.dtype), cpu),
               jax.device_put(numpy.array(layer.b, dtype=net.dtype), cpu)) for layer in net.layers]
    x = jax.device_put(numpy.ascontiguousarray(X, dtype=net.dtype), cpu)
    t = jax.device_put(numpy.ascontiguousarray(T, dtype=net.dtype), cpu)

    def loss_fn(ps, x, t):
        a = x
        for (W, b), act in zip(ps[:-1], acts[:-1]):
            a = jax.nn.sigmoid(a @ W + b) if act == "sigmoid" else jax.nn.relu(a @ W + b)
        z = a @ ps[-1][0] + ps[-1][1]
        if loss_name == "cross_entropy":       # softmax output: −Σ t log softmax(z), batch mean
            return -jnp.mean(jnp.sum(t * jax.nn.log_softmax(z, axis=1), axis=1))
        y = jax.nn.sigmoid(z) if acts[-1] == "sigmoid" else z
        return 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=1))

    @functools.partial(jax.jit, donate_argnums=0)
    def update(ps, x, t):
        grads = jax.grad(loss_fn)(ps, x, t)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, ps, grads)

    state = [params]

    def step():
        state[0] = update(state[0], x, t)

    def sync():
        jax.block_until_ready(state[0])

    def params_host():
        return [numpy.asarray(p, dtype=numpy.float64) for pair in state[0] for p in pair]
    return step, params_host, sync


def sklearn_contender(net, X, T, lr, loss_name):
    from sklearn.neural_network import MLPClassifier
    if net.device.is_cuda:
        raise ValueError("scikit-learn runs on the CPU only")
    if loss_name != "cross_entropy" or any(layer.activation.name not in ("sigmoid", "softmax") for layer in net.layers):
        raise ValueError("scikit-learn's MLPClassifier here: sigmoid hidden layers, softmax + cross-entropy")
    hidden = tuple(layer.n_out for layer in net.layers[:-1])
    x = numpy.ascontiguousarray(X, dtype=net.dtype)
    y = T.argmax(axis=1)
    clf = MLPClassifier(hidden_layer_sizes=hidden, activation="logistic", solver="sgd", learning_rate_init=lr,
                        momentum=0.0, alpha=0.0, batch_size=x.shape[0], shuffle=False)
    clf.partial_fit(x, y, classes=numpy.arange(T.shape[1]))
    clf.coefs_ = [numpy.array(layer.W, dtype=x.dtype) for layer in net.layers]
    clf.intercepts_ = [numpy.array(layer.b, dtype=x.dtype) for layer in net.layers]
    clf._optimizer.params = clf.coefs_ + clf.intercepts_   # the solver updates these arrays in place

    def step():
        clf.partial_fit(x, y)

    def params():
        return [numpy.array(p, dtype=numpy.float64) for pair in zip(clf.coefs_, clf.intercepts_) for p in pair]
    return step, params, _no_sync


CONTENDERS: dict[str, Callable] = {"gpunn": gpunn_contender, "gpunn-unfused": gpunn_contender,
                                   "numpy": numpy_contender, "torch": torch_contender, "jax": jax_contender,
                                   "sklearn": sklearn_contender}
DEFAULTS = {"cpu": "gpunn,numpy,torch,jax,sklearn", "cuda": "gpunn,gpunn-unfused,torch"}


def available(names: list[str], device: str = "cpu") -> tuple[list[str], dict[str, str]]:
    """The contenders that can run on ``device``, and why each other one cannot."""
    ok, skipped = [], {}
    for name in names:
        mod = {"torch": "torch", "sklearn": "sklearn", "jax": "jax"}.get(name)
        if mod:
            try:
                m = __import__(mod)
            except ImportError:
                skipped[name] = f"{mod} is not installed"
                continue
            if name == "torch" and device.startswith("cuda") and not m.cuda.is_available():
                skipped[name] = f"torch {m.__version__} cannot use CUDA here (a CPU build, or no driver)"
                continue
            if name == "jax" and device.startswith("cuda"):
                skipped[name] = "the JAX contender runs on the CPU only"
                continue
        ok.append(name)
    return ok, skipped


def setup(workload: str, batch: int, names: list[str], dtype: str = "float32", lr: float = 0.01,
          device: str = "cpu"):
    """Fresh contenders with gpunn's initial weights and one shared batch."""
    loss_name = WORKLOADS[workload][3]
    made, skipped = {}, {}
    for name in names:
        net, X, T, _, _ = build(workload, device, dtype, batch, seed=0,
                                fused=False if name == "gpunn-unfused" else None)
        try:
            made[name] = CONTENDERS[name](net, X, T, lr, loss_name)
        except ValueError as exc:
            skipped[name] = str(exc)
    return made, skipped


def agreement(workload: str, batch: int, names: list[str], steps: int = 3, dtype: str = "float32",
              device: str = "cpu", lr: float = 0.1) -> dict:
    """Max |p − p_gpunn| / max|p_gpunn| over all parameters after ``steps`` steps, per contender."""
    made, skipped = setup(workload, batch, names, dtype, lr=lr, device=device)
    for step, _, _ in made.values():
        for _ in range(steps):
            step()
    ref = made["gpunn"][1]()
    out = {}
    for name, (_, params, _) in made.items():
        if name == "gpunn":
            continue
        got = params()
        out[name] = max(float(numpy.max(numpy.abs(g - r)) / (numpy.max(numpy.abs(r)) or 1.0))
                        for g, r in zip(got, ref))
    return {"diffs": out, "skipped": skipped}


def time_alone(workload: str, batch: int, name: str, rounds: int, min_time: float, dtype: str,
               device: str = "cpu") -> dict:
    """One contender's seconds per step, ``rounds`` times, in this process (run it in a fresh one)."""
    made, skipped = setup(workload, batch, [name], dtype, device=device)
    if name not in made:
        return {"skipped": skipped.get(name, "could not be set up")}
    step, _, sync = made[name]
    return {"seconds": timed(step, sync, rounds, min_time)["per"], "threads": _threads(name)}


def _threads(name: str) -> dict:
    """The BLAS libraries and thread counts this process used (threadpoolctl), and torch's own."""
    out: dict = {}
    try:
        from threadpoolctl import threadpool_info
        out["pools"] = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
                        f"{i.get('num_threads')} threads" for i in threadpool_info()]
    except ImportError:
        out["pools"] = ["threadpoolctl not installed"]
    if name == "torch":
        import torch
        out["torch_threads"] = torch.get_num_threads()
    return out


def measure_isolated(workload: str, batch: int, names: list[str], rounds: int, min_time: float, dtype: str,
                     device: str = "cpu", passes: int = 1) -> dict:
    """Each contender in a fresh process, one after the other; speed-ups are ratios of medians. With
    ``passes`` > 1 the sequence runs that many times, its order reversed every other pass, and the
    samples of all passes are pooled: a shared machine's slow spells, which last seconds, then fall on
    every contender rather than on whichever ran during them. ``pass_ratios`` keeps each pass's ratios."""
    per: dict[str, list[float]] = {}
    threads, skipped = {}, {}
    pass_ratios: dict[str, list[float]] = {}
    for p in range(passes):
        this: dict[str, list[float]] = {}
        for name in (names if p % 2 == 0 else names[::-1]):
            if name in skipped:
                continue
            got = _isolated_worker(name, workload, batch, rounds, min_time, dtype, device)
            if "skipped" in got:
                skipped[name] = got["skipped"]
                continue
            this[name], threads[name] = got["seconds"], got["threads"]
            per.setdefault(name, []).extend(got["seconds"])
        if "gpunn" in this:
            for n, v in this.items():
                if n != "gpunn":
                    pass_ratios.setdefault(n, []).append(statistics.median(v) / statistics.median(this["gpunn"]))
    base = statistics.median(per["gpunn"]) if "gpunn" in per else None
    ratios = {n: statistics.median(v) / base for n, v in per.items() if n != "gpunn" and base}
    out = _summary(workload, batch, dtype, device, per, skipped, "isolated", ratios, threads)
    out["passes"], out["pass_ratios"] = passes, pass_ratios
    return out


def _isolated_worker(name: str, workload: str, batch: int, rounds: int, min_time: float, dtype: str,
                     device: str) -> dict:
    """One contender's ``time_alone`` in a fresh process: {"seconds", "threads"} or {"skipped": why}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--workload", workload,
           "--batch-size", str(batch), "--rounds", str(rounds), "--min-time", str(min_time),
           "--dtype", dtype, "--device", device]
    # the worker imports the gpunn this process runs (an uninstalled source tree too)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if run.returncode != 0:
        return {"skipped": f"worker failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else '?'}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _summary(workload: str, batch: int, dtype: str, device: str, per: dict, skipped: dict, method: str,
             ratios: dict, threads: dict | None = None) -> dict:
    med = {name: statistics.median(v) for name, v in per.items()}
    sizes = WORKLOADS[workload][0]
    return {"workload": workload, "batch": batch, "dtype": dtype, "device": device, "method": method,
            "us_per_step": {k: v * 1e6 for k, v in med.items()},
            "spread_us": {k: [min(v) * 1e6, max(v) * 1e6] for k, v in per.items()},
            "gflops": {k: step_flops(sizes, batch) / v / 1e9 for k, v in med.items()},
            "speedup_gpunn_vs": ratios, "skipped": skipped, "threads": threads or {}}


def measure(workload: str, batch: int, names: list[str], rounds: int, min_time: float, dtype: str,
            device: str = "cpu") -> dict:
    """All contenders in this process, interleaved round by round (they can disturb each other)."""
    made, skipped = setup(workload, batch, names, dtype, device=device)
    for step, _, sync in made.values():      # warm-up
        for _ in range(3):
            step()
        sync()
    counts = {name: calls_for(step, sync, min_time) for name, (step, _, sync) in made.items()}
    order = list(made)
    per: dict[str, list[float]] = {name: [] for name in order}
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            step, _, sync = made[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(counts[name]):
                step()
            sync()           # the clock stops when the device is done
            per[name].append((time.perf_counter() - t0) / counts[name])
    ratios = {name: statistics.median([o / g for g, o in zip(per["gpunn"], per[name])])
              for name in order if name != "gpunn"}
    return _summary(workload, batch, dtype, device, per, skipped, "interleaved", ratios)


def commit() -> str:
    """The commit being measured: $GPUNN_COMMIT (for copies without .git, as on the GPU machine), else git's."""
    if os.environ.get("GPUNN_COMMIT"):
        return os.environ["GPUNN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="lecture,mlp")
    ap.add_argument("--batch-size", default=None, help="comma-separated; default: the workload's")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (PyTorch then runs on the same card)")
    ap.add_argument("--contenders", default=None,
                    help="default: " + "; ".join(f"{k}: {v}" for k, v in DEFAULTS.items()))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--check-only", action="store_true", help="run the agreement check and stop")
    ap.add_argument("--interleaved", action="store_true",
                    help="time all contenders in one process, A/B/A/B (default: each alone in its own process)")
    ap.add_argument("--passes", type=int, default=1,
                    help="isolated timing: passes over the contenders, order reversed every other pass (pooled)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:        # one contender alone, for measure_isolated: JSON on the last line
        print(json.dumps(time_alone(args.workload, int(args.batch_size), args.worker, args.rounds, args.min_time,
                                    args.dtype, args.device)))
        return 0
    contenders = args.contenders or DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    names, skipped = available([n.strip() for n in contenders.split(",")], args.device)
    if "gpunn" not in names:
        names.insert(0, "gpunn")
    env = environment(args.dtype)
    env.update({"commit": commit(), "date": time.strftime("%Y-%m-%d"), "machine": platform.node()})
    try:
        import torch
        env["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        env["torch"] = None
    try:
        import sklearn
        env["sklearn"] = sklearn.__version__
    except ImportError:
        env["sklearn"] = None
    try:
        import jax
        env["jax"] = jax.__version__
    except ImportError:
        env["jax"] = None
    print(f"# {json.dumps(env)}")
    for name, why in skipped.items():
        print(f"# {name} skipped: {why}")
    results, failed = [], False
    for w in [s.strip() for s in args.workload.split(",")]:
        batches = [int(b) for b in args.batch_size.split(",")] if args.batch_size else WORKLOADS[w][4]
        check = agreement(w, min(batches), names, dtype=args.dtype, device=args.device)
        tol = 1e-4 if args.dtype == "float32" else 1e-9
        for name, d in check["diffs"].items():
            ok = d <= tol
            failed |= not ok
            print(f"agreement {w} batch {min(batches)}: {name:8s} max rel diff {d:.2e} "
                  f"{'ok' if ok else 'FAIL'} (tol {tol:g})")
        for name, why in check["skipped"].items():
            print(f"agreement {w}: {name} skipped: {why}")
        if args.check_only:
            continue
        for b in batches:
            print(f"timing {w} batch {b} ...", file=sys.stderr)
            if args.interleaved:
                results.append(measure(w, b, names, args.rounds, args.min_time, args.dtype, args.device))
            else:
                results.append(measure_isolated(w, b, names, args.rounds, args.min_time, args.dtype, args.device,
                                                passes=max(1, args.passes)))
    if not args.check_only:
        _table(results, names, args.markdown)
    if args.json:
        from gpunn.io import write_text_atomic
        write_text_atomic(args.json, json.dumps({"environment": env, "results": results}, indent=2))
    return 1 if failed else 0


def _table(results: list[dict], names: list[str], markdown: bool) -> None:
    head = (["workload", "batch", "device"] + [f"{n} µs/step" for n in names]
            + [f"gpunn speed-up vs {n}" for n in names[1:]])
    rows = []
    for r in results:
        cells = [r["workload"], str(r["batch"]), r["device"]]
        cells += [f"{r['us_per_step'][n]:.1f}" if n in r["us_per_step"] else "-" for n in names]
        cells += [f"{r['speedup_gpunn_vs'][n]:.2f}x" if n in r["speedup_gpunn_vs"] else "-" for n in names[1:]]
        rows.append(cells)
    print(format_table(head, rows, markdown))


if __name__ == "__main__":
    sys.exit(main())
