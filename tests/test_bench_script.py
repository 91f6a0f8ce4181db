"""Smoke tests for bench/compare.py and bench/gpu_check.py: agreement checks and tiny timed runs (no timing
assertions); gpu_check runs on the fake GPU of tests/fakecupy.py."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from helpers import child_env

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import compare
from gpunn.bench import step_flops


def test_contenders_agree_with_gpunn():
    names, _ = compare.available(["gpunn", "numpy", "torch", "jax", "sklearn"])
    for workload in ("lecture", "mlp"):
        res = compare.agreement(workload, 5, names)
        assert "numpy" in res["diffs"]
        for name, d in res["diffs"].items():
            assert d <= 1e-4, (workload, name, d)


def test_hand_written_loop_is_a_real_check():
    """A wrong hand-written loop (here: a different learning rate) must fail the agreement."""
    made, _ = compare.setup("mlp", 4, ["gpunn", "numpy"], lr=0.5)
    net_step, ref_params, _ = made["gpunn"]
    net_step()
    net, X, T, _, _ = compare.build("mlp", "cpu", "float32", 4, seed=0)
    step, params, _ = compare.numpy_contender(net, X, T, 0.4, "cross_entropy")
    step()
    diff = max(float(abs(a - b).max() / abs(b).max()) for a, b in zip(params(), ref_params()))
    assert diff > 1e-4


def test_check_only_cli_and_tiny_timing(tmp_path, capsys):
    assert compare.main(["--check-only", "--workload", "lecture", "--batch-size", "3"]) == 0
    out = tmp_path / "r.json"
    rc = compare.main(["--workload", "lecture", "--batch-size", "2", "--rounds", "2", "--min-time", "0.01",
                       "--contenders", "gpunn,numpy", "--json", str(out), "--markdown"])
    assert rc == 0
    data = json.loads(out.read_text())
    row = data["results"][0]
    assert set(row["us_per_step"]) == {"gpunn", "numpy"} and row["speedup_gpunn_vs"]["numpy"] > 0
    assert "commit" in data["environment"] and "| workload |" in capsys.readouterr().out


def test_flop_count_skips_first_layer_input_gradient():
    # 4-8-1, batch 2: forward 2·2·(32+8); backward weights the same; input gradient only for layer 2
    assert step_flops([4, 8, 1], 2) == 2 * 2 * (3 * (32 + 8) - 32)




def test_gpu_check_runs_end_to_end_on_the_fake_gpu(fake_gpu, tmp_path, capsys):
    """bench/gpu_check.py, as scripts/gpu-check.sh runs it, on fakecupy: a crash here would waste card time."""
    import gpu_check
    out = tmp_path / "gpu-bench.json"
    rc = gpu_check.main(["--configs", "lecture:16,mlp:32", "--ceiling-n", "64", "--rounds", "1",
                         "--min-time", "0.001", "--json", str(out)])
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["errors"] == [] and [r["workload"] for r in data["rows"]] == ["lecture", "mlp"]
    assert len(data["shares"]) == 2 and data["ceiling"]["cupy_tflops"] > 0
    assert {a["contender"] for a in data["agreement"]} >= {"gpunn-unfused"}
    assert all(a["diff"] <= 1e-4 for a in data["agreement"])
    assert [s["workload"] for s in data["sync_evidence"]] == ["mlp", "lecture"]   # the heavier first
    assert "| mlp | 32 |" in text and "# fp32 GEMM 64^3" in text
    assert set(data["rows"][1]["host_gpu"]) == {"gpunn", "gpunn-unfused"} and "# host/GPU µs per step mlp b32" in text
    # the fake runs each step synchronously, so the host cannot run ahead: the script must say so
    assert "HOST WAITED" in text and rc == 1
    # and the record for bench/results/ is made from that output as it would be from the card's
    (tmp_path / "env.txt").write_text("date: 2026-11-28T18:00:00Z\ncommit: abc1234\nFake GPU, 16 MiB\n")
    (tmp_path / "bench.txt").write_text(text)
    import gpu_report
    name, md = gpu_report.report(tmp_path)
    assert name == "2026-11-28-gpu-unknown-gpu.md"          # nvidia-smi's line is not there: no card name
    assert "- commit: abc1234;" in md and "| mlp | 32 |" in md and "## GPU tests (`pytest-gpu.txt`)" in md
    assert "| fused ≥ 1.0× PyTorch eager, mlp b256 | not measured | unknown |" in md
    assert "| ≥ 80% of the measured cuBLAS GEMM rate, wide | not measured | unknown |" in md
    assert "| no host–device sync inside a step | " in md and "| NOT met |" in md
    assert "| mlp | 32 | gpunn |" in md                    # the host/GPU split per contender


def test_gpu_check_says_why_it_cannot_run(capsys):
    import gpu_check

    from gpunn import cuda_unavailable_reason
    if cuda_unavailable_reason(0) is None:
        pytest.skip("a GPU is usable here")
    assert gpu_check.main(["--configs", "mlp:32"]) == 2
    assert "gpu_check: needs a usable cuda:0 (" in capsys.readouterr().err


def test_gpu_check_refuses_unknown_configs():
    import gpu_check
    with pytest.raises(SystemExit, match="bad config 'mlpp:3'"):
        gpu_check.parse_configs("mlp:32,mlpp:3")
    assert gpu_check.parse_configs(gpu_check.CONFIGS)[-1] == ("wide", 4096)


def test_gpu_report_judges_the_targets():
    import gpu_report
    bench = {"rows": [{"workload": "mlp", "batch": 256, "speedup_gpunn_vs": {"torch": 1.23}},
                      {"workload": "mlp", "batch": 2048, "speedup_gpunn_vs": {"torch": 0.91}}],
             "shares": [{"workload": "wide", "batch": 4096, "share_of_ceiling": 0.86, "gflops": 43000,
                         "ceiling_gflops": 50000}],
             "ceiling": {"cupy_tflops": 50.0},
             "sync_evidence": [{"workload": "wide", "batch": 4096, "host_enqueue_ms": 1.0, "gpu_done_ms": 90.0,
                                "host_ran_ahead": True}]}
    verdicts = {t: (m, v) for t, m, v in gpu_report.targets(bench)}
    assert verdicts["fused ≥ 1.0× PyTorch eager, mlp b256"] == ("1.23×", "met")
    assert verdicts["fused ≥ 1.0× PyTorch eager, mlp b2048"] == ("0.91×", "NOT met")
    assert verdicts["≥ 80% of the measured cuBLAS GEMM rate, wide b4096"] == ("86% (43000 of 50000 GFLOP/s)", "met")
    assert verdicts["no host–device sync inside a step"][1] == "met"
    assert gpu_report.card("date: x\nNVIDIA H200, 143771 MiB, 1980 MHz\n") == "NVIDIA H200"


def test_gpu_report_refuses_a_folder_that_is_not_gpu_check_output(tmp_path, capsys):
    import gpu_report
    assert gpu_report.main([str(tmp_path)]) == 2
    assert "no env.txt" in capsys.readouterr().err


def test_the_share_of_the_ceiling_is_never_above_100_percent(monkeypatch):
    """A product sequence timed slower than the whole step (noise) gives no share, not 122 %."""
    from gpunn import bench
    real = bench.timed_pair

    def slow_gemm(step, gemm, sync, repeats, min_time, warmup=3):
        r, g, shares = real(step, gemm, sync, repeats, min_time, warmup)
        return r, {**g, "median": r["median"] * 1.22}, [1.22 for _ in shares]
    monkeypatch.setattr(bench, "timed_pair", slow_gemm)
    row = bench.time_workload("lecture", "cpu", "float32", 2, repeats=2, min_time=0.01)
    assert row["share_of_ceiling"] is None
    monkeypatch.undo()
    row = bench.time_workload("lecture", "cpu", "float32", 2, repeats=2, min_time=0.01)
    assert 0.0 < row["share_of_ceiling"] <= 1.0


def test_isolated_timing_runs_each_contender_in_its_own_process():
    r = compare.measure_isolated("lecture", 2, ["gpunn", "numpy"], rounds=2, min_time=0.01, dtype="float32")
    assert r["method"] == "isolated" and set(r["us_per_step"]) == {"gpunn", "numpy"}
    assert r["speedup_gpunn_vs"]["numpy"] == pytest.approx(r["us_per_step"]["numpy"] / r["us_per_step"]["gpunn"])
    assert all(r["threads"][n]["pools"] for n in ("gpunn", "numpy"))


def test_isolated_timing_pools_alternated_passes():
    r = compare.measure_isolated("lecture", 2, ["gpunn", "numpy"], rounds=2, min_time=0.01, dtype="float32",
                                 passes=2)
    assert r["passes"] == 2 and len(r["pass_ratios"]["numpy"]) == 2
    assert r["speedup_gpunn_vs"]["numpy"] == pytest.approx(r["us_per_step"]["numpy"] / r["us_per_step"]["gpunn"])
    assert sum(1 for _ in r["spread_us"]["gpunn"]) == 2      # min and max over the pooled samples


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_the_blocker_kernel_compiles_for_sm90(tmp_path):
    import gpu_check
    src = tmp_path / "spin.cu"
    src.write_text(gpu_check.SPIN)
    r = subprocess.run([shutil.which("nvcc"), "-arch=sm_90", "-c", str(src), "-o", str(tmp_path / "s.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_jax_contender_is_skipped_cleanly_without_jax(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)          # import jax raises ImportError
    names, skipped = compare.available(["gpunn", "jax"])
    assert names == ["gpunn"] and skipped == {"jax": "jax is not installed"}


def test_the_jax_contender_agrees_where_jax_is_installed():
    pytest.importorskip("jax")
    res = compare.agreement("mlp", 5, ["gpunn", "jax"])
    assert res["diffs"]["jax"] <= 1e-4


def test_the_targets_record_judges_every_target():
    import targets
    ratios = [{"workload": w, "batch": b, "us_per_step": {"gpunn": 10.0, "torch": 20.0},
               "speedup_gpunn_vs": {"torch": 2.0}, "skipped": {"jax": "jax is not installed"},
               "threads": {}} for w, b in targets.CONFIGS]
    shares = {2048: {"us_per_step": 1.0, "gflops": 1.0, "ceiling_gflops": 1.0, "share_of_ceiling": 0.96,
                     "share_spread": [0.95, 0.97]}}
    busy = [{"contender": "gpunn", "batch": 32, "quiet_us": 1.0, "busy_us": 1.5, "slowdown": 1.5},
            {"contender": "torch", "batch": 32, "quiet_us": 1.0, "busy_us": 9.0, "slowdown": 9.0},
            {"contender": "gpunn", "batch": 256, "quiet_us": 1.0, "busy_us": 3.0, "slowdown": 3.0}]
    got = {t: (m, v) for t, m, v in targets.verdicts(ratios, shares, busy)}
    assert got["vs PyTorch eager, lecture b1 ≥ 15"] == ("2.00×", "NOT met")
    assert got["vs PyTorch eager, mlp b32 ≥ 1.3"] == ("2.00×", "met")
    assert got["vs JAX jitted step, mlp b256 ≥ 1.0"] == ("not measured", "unknown")
    assert got["GEMM share, mlp b2048, 1 thread ≥ 95 %"] == ("96.0 %", "met")
    assert got["busy machine slowdown, gpunn mlp b32 ≤ 2×"] == ("1.50× (PyTorch 9.00×)", "met")
    assert got["busy machine slowdown, gpunn mlp b256 ≤ 2×"] == ("3.00× (PyTorch not measured)", "NOT met")
    env = {"cpu": "Test CPU", "date": "2026-12-01", "commit": "abc", "machine": "m", "cores": 2, "python": "3",
           "numpy": "2", "blas": "b", "numba": "0", "threads_summary": "auto"}
    text = targets.markdown(env, ratios, shares, busy, ["gpunn", "torch"])
    assert "| vs PyTorch eager, mlp b2048 ≥ 1.12 | 2.00× | met |" in text and "jax not measured" in text
    ratios[0]["pass_ratios"] = {"torch": [1.5, 2.5]}
    assert "| 2.00 (1.50, 2.50) |" in targets.markdown(env, ratios, shares, busy, ["gpunn", "torch"])


def test_the_step_profile_names_every_operation():
    import targets
    p = targets.op_profile("lecture", 1, 1, 0.005)
    parts = p["parts_us"]
    assert {"gemm L0 x·W", "L1 bias + sigmoid", "gemm L1 δ·Wᵀ", "L0 δ = f′·g (sigmoid)", "loss squared_error",
            "update"} <= set(parts) and p["step_us"] > 0 and p["gemm_us"] > 0
    assert "| gemm L0 x·W |" in "\n".join(targets.profile_tables([p, {"workload": "mlp", "batch": 2, "error": "x"}]))
    assert set(p["exp_us"]) == {"L0", "L1"}         # the lecture's two sigmoid layers: NumPy's exp timed alone
    text = "\n".join(targets.profile_tables([p]))
    assert "NumPy's exp alone on the same inputs as the bias + activation rows: L0" in text
    assert ("transcription of it inside" in text) == p["exp_inside"]


def test_the_gemm_share_worker_runs_on_one_thread():
    import targets
    row = targets.gemm_share(8, 1, 0.01)
    assert row["threads"] in (1, None) and row["us_per_step"] > 0


@pytest.mark.parametrize("split", [False, True])
def test_step_inside_times_every_call_of_the_step_and_changes_nothing(split, monkeypatch):
    """bench/step_inside.py wraps the step's bound calls in clock reads: every kind of call is counted and
    the wrapped step computes what an unwrapped twin computes, bit for bit; with the update made layer by
    layer (StepPlan.SPLIT_UPDATE_BYTES), its parts are counted as the update."""
    import numpy
    import step_inside

    import gpunn
    from gpunn.backprop import StepPlan
    if split:
        if not gpunn.cpukernels.available():
            pytest.skip(f"fused CPU kernels: {gpunn.cpukernels.unavailable_reason()}")
        monkeypatch.setattr(StepPlan, "SPLIT_UPDATE_BYTES", 0)
    nets = [gpunn.mlp([6, 5, 3], activation="sigmoid", output="softmax", seed=4, device="cpu") for _ in range(2)]
    opts = [gpunn.SGD(lr=0.1), gpunn.SGD(lr=0.1)]
    x = numpy.random.default_rng(0).normal(size=(7, 6)).astype("float32")
    t = numpy.eye(3, dtype="float32")[[0, 1, 2, 0, 1, 2, 0]]
    for net, opt in zip(nets, opts):
        net.train_step(x, t, "cross_entropy", opt)
    assert (nets[0]._backprop._last.backward_updating is not None) is split
    spent = step_inside.timed_calls(nets[0]._backprop._last, opts[0])
    for net, opt in zip(nets, opts):
        for _ in range(3):
            net.train_step(x, t, "cross_entropy", opt)
    assert {"matrix product", "loss", "update"} <= set(spent) and all(v > 0 for v in spent.values())
    assert "_update" not in spent
    assert numpy.array_equal(nets[0].flat_parameters(), nets[1].flat_parameters())


def test_gemm_libraries_times_the_steps_products():
    """bench/gemm_libraries.py: the products of one mlp step (8 of them: the first layer has no δ·Wᵀ), timed
    with NumPy's BLAS on the threads asked for (threadpoolctl sets them), which are put back afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="bench/gemm_libraries.py sets NumPy's BLAS threads "
                                        "with threadpoolctl")
    import gemm_libraries
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info()]
    assert gemm_libraries.shapes(5) == [(5, 784, 512), (784, 5, 512),                     # x·W, xᵀ·δ
                                        (5, 512, 512), (512, 5, 512), (5, 512, 512),      # and δ·Wᵀ
                                        (5, 512, 10), (512, 5, 10), (5, 10, 512)]
    row = gemm_libraries.measure("numpy", 5, 1, 1, 0.001)
    flops = 2 * 5 * (784 * 512 * 2 + 512 * 512 * 3 + 512 * 10 * 3)
    assert row["threads"] == 1 and row["us"] > 0
    assert abs(row["gflops"] - flops / row["us"] / 1e3) < 1e-9 * row["gflops"]
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info()] == before


def test_gemm_libraries_prints_numpys_rows_whatever_pytorch_does():
    """A library that cannot be measured (PyTorch not installed, as on CI) leaves its cells "-": NumPy's rows
    are printed all the same. The CPU seconds per wall second are the whole child process's over its timing:
    timed for a few ms (--min-time 0.001), 1 fresh child in 10 read 1.5-1.78 on one thread (a fresh process
    that sleeps 50 ms right after importing NumPy uses 0.2-0.6 CPU s per wall s: another thread busy from
    start-up); timed for 0.25 s, 12 of 12 read 0.99-1.01."""
    pytest.importorskip("threadpoolctl", reason="bench/gemm_libraries.py sets NumPy's BLAS threads with threadpoolctl")
    bench = pathlib.Path(__file__).resolve().parents[1] / "bench"
    run = subprocess.run([sys.executable, str(bench / "gemm_libraries.py"), "--batches", "4", "--threads", "1",
                          "--rounds", "1", "--min-time", "0.25", "--passes", "1"],
                         capture_output=True, text=True, check=False, timeout=300, env=child_env())
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| threads")).strip("|").split("|")]
    row = dict(zip(header, (c.strip() for c in next(line for line in lines
                                                      if line.startswith("| 1 | 4 |")).strip("|").split("|"))))
    assert float(row["NumPy µs"]) > 0 and float(row["NumPy GFLOP/s"]) > 0
    assert 0.5 < float(row["CPU s per wall s"].split(" / ")[0]) < 1.5         # NumPy's, on one thread
    for module, name in (("torch", "PyTorch"), ("jax", "JAX")):
        have = importlib.util.find_spec(module) is not None
        assert all((row[cell] != "-") is have for cell in (f"{name} µs", f"{name} GFLOP/s", f"NumPy / {name} time"))


def test_gemm_libraries_holds_jax_to_one_core_on_one_thread(monkeypatch):
    """JAX measured on one thread runs in a process held to one core (XLA ignored the thread flags here); the
    affinity is set before JAX loads, to the first core the process may use."""
    import gemm_libraries
    calls = []
    monkeypatch.setattr(gemm_libraries.os, "sched_getaffinity", lambda pid: {3, 5, 9})
    monkeypatch.setattr(gemm_libraries.os, "sched_setaffinity", lambda pid, cores: calls.append((pid, cores)))
    gemm_libraries.one_core()
    assert calls == [(0, {3})]


def test_gemm_libraries_times_jax_products_where_jax_is_installed():
    """JAX's row: the same products as one jitted function, the µs and GFLOP/s consistent."""
    pytest.importorskip("jax", reason="JAX not installed: bench/gemm_libraries.py leaves its cells '-'")
    import gemm_libraries
    cores = os.sched_getaffinity(0)
    row = gemm_libraries.measure("jax", 3, 1, 1, 0.001)
    assert os.sched_getaffinity(0) == cores                 # held to one core while measuring only
    assert row["library"] == "jax" and row["us"] > 0 and row["version"].startswith("jax ")
    flops = gemm_libraries.step_flops(gemm_libraries.SIZES, 3)
    assert abs(row["gflops"] - flops / row["us"] / 1e3) < 1e-9 * row["gflops"]


ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("bench", "scripts") for p in (ROOT / folder).glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_and_does_nothing_else(script):
    """`--help` prints a usage and exits 0 without running the script's work (scripts/build_digits.py used to
    rewrite gpunn/data/digits.npz; bench/scaleout.py took an unknown word for its stream measurement)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    digits = root / "gpunn" / "data" / "digits.npz"
    before = digits.stat().st_mtime_ns
    run = subprocess.run([sys.executable, str(root / script), "--help"], capture_output=True, text=True,
                         check=False, timeout=120, cwd=root, env=child_env())
    assert run.returncode == 0 and "usage" in run.stdout.lower(), (script, run.stdout[-500:], run.stderr[-500:])
    assert digits.stat().st_mtime_ns == before


def test_scaleout_refuses_a_measurement_it_does_not_know():
    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "bench" / "scaleout.py"), "allreduced"], capture_output=True,
                         text=True, check=False, timeout=120, env=child_env())
    assert run.returncode == 2 and "invalid choice" in run.stderr
