"""Agreement check: the same seeded network trained on each backend against a NumPy float64 reference.

For each backend (device × dtype × fused) it records the output, loss and every layer's gradients of
the first and of the last of N SGD steps, and the parameters after the N steps, and reports the
largest difference relative to the reference's scale, max|a − ref| / max|ref|, against a per-dtype
tolerance (tighter for the first step; looser once N steps have let rounding differences grow). The
NumPy float64 row runs the reference a second time: a determinism check. A device asked for that
cannot be used is reported and fails the check: a check that checked nothing does not pass. Each fused
GPU row also checks that the column sums left every ticket counter at zero (:func:`stale_counters`).
"""
from __future__ import annotations

from typing import Any

import numpy

from .activations import ActivationSpec
from .backend import Device, cuda_unavailable_reason, parse_spec, tf32_enabled, to_host
from .kernels import stale_counters
from .layers import Dense
from .network import Sequential
from .optim import SGD
from .scalars import integer

ARCH: list[tuple[int, int, ActivationSpec]] = [
    (37, 64, "tanh"), (64, 44, "sigmoid"), (44, 32, {"name": "elu", "a": 0.7}), (32, 5, "softmax")]
#: Odd sizes catch indexing bugs; 131 rows take the fused column sum's multi-chunk path (3 chunks of at most
#: 44 rows per column tile, combined by the tile's last block), and widths 44 and 5 put tile boundaries
#: inside 32-byte sectors.
BATCH = 131
#: tolerances on max|a − ref| / max|ref|: the first step, and the last step and weights after N steps
TOLERANCES = {"float32": {"step": 1e-5, "trained": 1e-4}, "float64": {"step": 1e-10, "trained": 1e-9}}


def _data(seed: int, n: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    rng = numpy.random.Generator(numpy.random.PCG64(seed + 1))
    X = rng.normal(size=(n, ARCH[0][0]))
    y = rng.integers(0, ARCH[-1][1], size=n)
    return X, y


def trace(device: Any, dtype: str, steps: int, seed: int = 0, fused: bool | None = None) -> dict:
    """Train the check network for ``steps`` SGD steps; return host float64 arrays of what to compare."""
    net = Sequential([Dense(i, o, a) for i, o, a in ARCH], device=device, dtype=dtype, seed=seed, fused=fused)
    X, y = _data(seed, BATCH * 4)
    out: dict[str, numpy.ndarray] = {}
    opt = SGD(lr=0.05, momentum=0.9)
    for k in range(steps):
        s = (k % 4) * BATCH
        yhat = net.forward(X[s:s + BATCH])
        loss = net.backward(y[s:s + BATCH], "cross_entropy")
        if k in (0, steps - 1):
            step = f"step {k + 1}"
            out[f"{step} output"] = to_host(yhat).astype(numpy.float64)
            out[f"{step} loss"] = numpy.array([loss])
            for i, layer in enumerate(net.layers):
                out[f"{step} grad_W[{i}]"] = to_host(layer.grad_W).astype(numpy.float64)
                out[f"{step} grad_b[{i}]"] = to_host(layer.grad_b).astype(numpy.float64)
        net.step(opt)
    out[f"weights after {steps} steps"] = to_host(net.flat_parameters()).astype(numpy.float64)
    return out


def rel_diff(a: numpy.ndarray, ref: numpy.ndarray) -> float:
    scale = float(numpy.max(numpy.abs(ref))) or 1.0
    return float(numpy.max(numpy.abs(a - ref))) / scale


def backends(devices: list[str], dtypes: list[str]) -> tuple[list[tuple], list[str], list[str]]:
    """(device, dtype, fused, label) to check, notes, and the devices asked for that cannot be checked."""
    todo: list[tuple[str, str, bool | None, str]] = []
    notes: list[str] = []
    skipped: list[str] = []
    for spec in devices:
        kind, index = parse_spec(spec)
        if kind == "cuda":
            spec = f"cuda:{index}"
            reason = cuda_unavailable_reason(index)
            if reason is not None:
                notes.append(f"{spec} was not checked: {reason}")
                skipped.append(spec)
                continue
            if tf32_enabled():
                notes.append("CUPY_TF32 is on: float32 GPU products use TF32, expect ~1e-3 differences")
        for dt in dtypes:
            if kind != "cuda":   # the float64 row re-runs the reference: a determinism check
                todo.append(("cpu", dt, None, f"numpy {dt}" + (" (2nd run)" if dt == "float64" else "")))
            else:
                for fused in (True, False):
                    todo.append((spec, dt, fused, f"cupy {spec} {dt} {'fused' if fused else 'unfused'}"))
    return todo, notes, skipped


def run_check(devices: list[str], dtypes: list[str], steps: int = 20, seed: int = 0) -> dict:
    """Compare each backend to the NumPy float64 reference. Returns rows, notes and an overall pass flag."""
    steps, seed = integer("steps", steps, low=1), integer("seed", seed, low=0, limit=None)
    ref = trace("cpu", "float64", steps, seed)
    todo, notes, skipped = backends(devices, dtypes)
    rows = []
    for spec, dt, fused, label in todo:
        got = trace(Device(spec), dt, steps, seed, fused=fused)
        tol = TOLERANCES[dt]
        for key, ref_arr in ref.items():
            tol_k = tol["step"] if key.startswith("step 1 ") else tol["trained"]
            d = rel_diff(got[key], ref_arr)
            rows.append({"backend": label, "quantity": key, "max_rel_diff": d, "tolerance": tol_k,
                         "passed": bool(d <= tol_k)})
        if fused:       # every fused column sum must have left its ticket counters at zero
            stale = stale_counters(Device(spec))
            rows.append({"backend": label, "quantity": "colsum counters non-zero", "max_rel_diff": stale,
                         "tolerance": 0, "passed": stale == 0})
    return {"steps": steps, "seed": seed, "rows": rows, "notes": notes, "skipped": skipped,
            "passed": bool(rows) and not skipped and all(r["passed"] for r in rows)}
