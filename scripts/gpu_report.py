"""Turn the files scripts/gpu-check.sh wrote under $OUT into a record for bench/results/.

    python scripts/gpu_report.py OUT_DIR --commit $(git rev-parse --short HEAD)   # writes bench/results/...
    python scripts/gpu_report.py OUT_DIR --print                                   # to stdout only

The record names the card, date and commit, keeps the script's own output (tests, agreement, benchmark)
and judges the targets of the CuPy path against the measured figures: gpunn fused ≥ 1.0× PyTorch eager
on `mlp` at batch 256 and 2048, `wide`'s GFLOP/s ≥ 80 % of the cuBLAS GEMM rate measured in the same
run, no sync inside a step, and every column-sum ticket counter back at zero.
It only reads what the card produced; a figure missing from the run is reported as not measured.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [("mlp", 256), ("mlp", 2048)]
CEILING_SHARE = 0.80


def _read(out: Path, name: str) -> str:
    p = out / name
    return p.read_text(errors="replace") if p.exists() else ""


def card(env_text: str) -> str:
    """The GPU name from nvidia-smi's CSV line in env.txt ('NVIDIA H200, 143771 MiB, ...')."""
    for line in env_text.splitlines():
        if re.match(r"^(NVIDIA|Tesla|Quadro|GeForce)\b", line.strip()):
            return line.split(",")[0].strip()
    return "unknown GPU"


def _field(text: str, key: str) -> str | None:
    """The value of a 'key: value' line that scripts/gpu-check.sh writes at the top of env.txt."""
    m = re.search(rf"^{key}: (\S+)", text, re.M)
    return m.group(1) if m else None


def targets(bench: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows from gpu-bench.json."""
    rows = []
    by_config = {(r["workload"], r["batch"]): r for r in bench.get("rows", [])}
    for w, b in TARGETS:
        r = by_config.get((w, b))
        sp = r and r["speedup_gpunn_vs"].get("torch")
        if sp is None:
            rows.append((f"fused ≥ 1.0× PyTorch eager, {w} b{b}", "not measured", "unknown"))
        else:
            rows.append((f"fused ≥ 1.0× PyTorch eager, {w} b{b}", f"{sp:.2f}×", "met" if sp >= 1.0 else "NOT met"))
    shares = {(s["workload"], s["batch"]): s for s in bench.get("shares", [])}
    wide = [s for (w, _), s in shares.items() if w == "wide"]
    rate = (bench.get("ceiling") or {}).get("cupy_tflops")
    if wide and rate:
        # the target: wide's training GFLOP/s against the cuBLAS fp32 GEMM rate measured in the same run
        s, share = wide[0], wide[0]["gflops"] / (rate * 1e3)
        rows.append((f"≥ {CEILING_SHARE:.0%} of the measured cuBLAS GEMM rate, wide b{s['batch']}",
                     f"{share:.0%} ({s['gflops']:.0f} of {rate * 1e3:.0f} GFLOP/s)",
                     "met" if share >= CEILING_SHARE else "NOT met"))
    else:
        rows.append((f"≥ {CEILING_SHARE:.0%} of the measured cuBLAS GEMM rate, wide", "not measured", "unknown"))
    syncs = bench.get("sync_evidence", [])
    if syncs:
        desc = "; ".join(f"{s['workload']} b{s['batch']}: enqueue {s['host_enqueue_ms']:.1f} ms, done "
                         f"{s['gpu_done_ms']:.1f} ms, blocker pending: {s.get('blocker_pending_when_host_done')}"
                         for s in syncs)
        rows.append(("no host–device sync inside a step", desc,
                     "met" if all(s["host_ran_ahead"] for s in syncs) else "NOT met"))
    else:
        rows.append(("no host–device sync inside a step", "not measured", "unknown"))
    stale = bench.get("colsum_stale_counters")
    rows.append(("column-sum ticket counters at zero after the benchmark",
                 "not measured" if stale is None else f"{stale} non-zero",
                 "unknown" if stale is None else "met" if stale == 0 else "NOT met"))
    return rows


def report(out: Path, commit: str | None = None) -> tuple[str, str]:
    """(suggested file name, markdown) for the gpu-check output in ``out``."""
    env_text = _read(out, "env.txt")
    bench_path = out / "gpu-bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.exists() else {}
    name = card(env_text)
    date = _field(env_text, "date") or "unknown date"
    commit = commit or _field(env_text, "commit") or bench.get("environment", {}).get("commit") or "unknown"
    stamp = date[:10] if re.match(r"\d{4}-\d\d-\d\d", date) else "undated"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    md = [f"# GPU check on {name}, {stamp}", "",
          f"- card: {name}; run (UTC): {date}",
          f"- commit: {commit}; command: `OUT=... bash scripts/gpu-check.sh` (from the source tree)",
          "- raw files: `env.txt`, `pytest-gpu.txt`, `check.txt`, `sanitizer.txt`, `bench.txt`, `gpu-bench.json` "
          "from $OUT", "",
          "## Targets of the CuPy path (same run, same card, float32)", "",
          "| target | measured | verdict |", "|---|---|---|"]
    md += [f"| {t} | {m} | {v} |" for t, m, v in targets(bench)]
    split = [(r["workload"], r["batch"], n, v) for r in bench.get("rows", []) for n, v in r.get("host_gpu", {}).items()]
    if split:        # where host time per step is close to GPU time, the step is launch-bound
        md += ["", "## Host and GPU time per step (µs; GPU time between CUDA events)", "",
               "| workload | batch | contender | host | GPU |", "|---|---|---|---|---|"]
        md += [f"| {w} | {b} | {n} | {v['host_us_per_step']:.0f} | {v['gpu_us_per_step']:.0f} |"
               for w, b, n, v in split]
    for title, fname in [("Versions and card", "env.txt"), ("GPU tests", "pytest-gpu.txt"),
                         ("Agreement check", "check.txt"), ("compute-sanitizer", "sanitizer.txt"),
                         ("Benchmark", "bench.txt")]:
        text = _read(out, fname).strip()
        md += ["", f"## {title} (`{fname}`)", ""]
        if not text:
            md.append("(missing: this step wrote nothing)")
            continue
        tail = text.splitlines()
        if fname == "pytest-gpu.txt" and len(tail) > 60:     # keep failures and the summary, not every dot
            tail = [ln for ln in tail if re.search(r"FAILED|ERROR|Error|passed|failed|skipped", ln)][-60:]
        table = [ln for ln in tail if ln.startswith("|")]
        rest = [ln for ln in tail if not ln.startswith("|")]
        md += ["```", *rest, "```"]
        if table:
            md += ["", *table]
    return f"{stamp}-gpu-{slug}.md", "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the folder scripts/gpu-check.sh wrote ($OUT)")
    ap.add_argument("--commit", default=None,
                    help="the commit the card ran (default: env.txt's, else gpu-bench.json's)")
    ap.add_argument("--print", dest="to_stdout", action="store_true", help="print instead of writing a file")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if not (args.out / "env.txt").exists():
        print(f"gpu_report: {args.out} has no env.txt: is it the $OUT of scripts/gpu-check.sh?", file=sys.stderr)
        return 2
    fname, md = report(args.out, args.commit)
    if args.to_stdout:
        sys.stdout.write(md)
        return 0
    sys.path.insert(0, str(ROOT))
    from gpunn.io import write_text_atomic
    target = args.results / fname
    write_text_atomic(target, md)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
