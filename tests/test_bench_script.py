"""Smoke tests for bench/compare.py: the agreement check and a tiny timed run (no timing assertions)."""
from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import compare  # noqa: E402

from gpunn.bench import step_flops  # noqa: E402


def test_contenders_agree_with_gpunn():
    names, _ = compare.available(["gpunn", "numpy", "torch", "sklearn"])
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


