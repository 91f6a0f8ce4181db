"""The click CLI: info, train, check, plot, bench; usage errors exit 2, runtime errors exit 1."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gpunn.cli import main


def run(*args, **kw):
    return CliRunner().invoke(main, list(args), **kw)


def test_info_text_and_json():
    r = run("info")
    assert r.exit_code == 0, r.output
    assert "gpunn" in r.output and "NumPy" in r.output and "TF32" in r.output
    assert "BLAS threads: " in r.output and "fused CPU kernels: " in r.output
    r = run("info", "--json")
    env = json.loads(r.output)
    assert {"gpunn", "python", "numpy", "devices", "tf32", "gpus", "cuda_unavailable_reason", "threads",
            "numba"} <= set(env)
    assert {"mode", "usable_cores", "local_ranks", "min_work", "applied"} <= set(env["threads"])
    assert env["float32_exp_inside_kernels"] in (True, False)


def test_info_says_where_the_kernels_float32_exp_runs(monkeypatch):
    from gpunn import cpukernels
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    inside, _ = cpukernels.exp_inside()
    assert ("float32 exp: inside the kernels" in run("info").output) is inside
    monkeypatch.setattr(cpukernels, "exp_inside", lambda: (False, "a probe that failed"))
    assert "float32 exp: NumPy's, between two kernels (a probe that failed)" in run("info").output


def test_info_explains_unusable_default_device(monkeypatch):
    from gpunn.backend import cuda_unavailable_reason
    if cuda_unavailable_reason() is None:
        pytest.skip("a GPU is usable here")
    r = run("info", env={"GPUNN_DEVICE": "cuda:0"})
    assert r.exit_code == 0
    assert "unusable" in r.output and cuda_unavailable_reason() in r.output


def test_train_few_epochs_json():
    r = run("train", "--epochs", "3", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["device"] == "cpu" and out["epochs"] == 3 and 0.5 < out["test_accuracy"] <= 1.0
    assert len(out["history"]) == 3


def test_train_text_save_and_other_datasets(tmp_path):
    p = tmp_path / "m.npz"
    r = run("train", "--epochs", "2", "--device", "cpu", "--save", str(p))
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output and "on cpu" in r.output and p.exists()
    for loss in ("squared_error", "cross_entropy", "binary_cross_entropy"):
        r = run("train", "--dataset", "xor", "--loss", loss, "--epochs", "2", "--device", "cpu", "--json")
        assert r.exit_code == 0, (loss, r.output)
        assert json.loads(r.output)["layers"][-1] == (2 if loss == "cross_entropy" else 1)
    r = run("train", "--dataset", "moons", "--loss", "binary_cross_entropy", "--layers", "2,8,1",
            "--epochs", "2", "--optimizer", "adam", "--device", "cpu")
    assert r.exit_code == 0, r.output


def test_train_plot(tmp_path):
    pytest.importorskip("matplotlib")
    p = tmp_path / "curves.png"
    r = run("train", "--epochs", "2", "--device", "cpu", "--plot", str(p))
    assert r.exit_code == 0, r.output
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_activations(tmp_path):
    pytest.importorskip("matplotlib")
    p = tmp_path / "act.png"
    r = run("plot", "activations", str(p))
    assert r.exit_code == 0, r.output
    assert p.stat().st_size > 10_000


def test_check_cpu():
    r = run("check", "--steps", "3")
    assert r.exit_code == 0, r.output
    assert "numpy float32" in r.output and "all passed" in r.output and "step 3 grad_W[0]" in r.output
    from gpunn.backend import cuda_unavailable_reason
    if cuda_unavailable_reason() is not None:          # a check that checked nothing must not pass
        r = run("check", "--steps", "2", "--device", "cpu,cuda:0")
        assert r.exit_code == 1 and "cuda:0 was not checked" in r.output and "FAILED" in r.output, r.output
    r = run("check", "--steps", "2", "--device", "cpu", "--json")
    res = json.loads(r.output)
    assert res["passed"] and all(row["max_rel_diff"] <= row["tolerance"] for row in res["rows"])


@pytest.mark.parametrize("args", [
    ["train", "--epochs", "-1"], ["train", "--batch-size", "0"], ["train", "--activation", "swish"],
    ["train", "--dtype", "float16"], ["train", "--lr", "abc"], ["bench", "--workload", "huge"],
    ["check", "--dtype", "float16"], ["check", "--device", "gpu"], ["train", "--layers", "3,4,10"],
    ["train", "--nonsense"], ["train", "--layers", "64,,10"], ["train", "--layers", "64,0,10"],
    ["train", "--device", "gpu"], ["bench", "--device", "cpu,tpu"], ["bench", "--batch-size", "0"],
    ["train", "--save", "/nonexistent-folder/m.npz"], ["train", "--plot", "curves.jpg"],
    ["plot", "activations", "a.gif"],
])
def test_bad_options_exit_2_with_usage(args):
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert "Usage" in r.output and "Traceback" not in r.output


def test_runtime_errors_exit_1_one_line(tmp_path):
    r = run("train", "--epochs", "1", "--device", "cpu", env={"GPUNN_FUSED": "maybe"})
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "GPUNN_FUSED must be" in r.output
    r = run("train", "--epochs", "1", "--device", "cpu", "--layers", "64,100000000,100000,10")
    assert r.exit_code == 1 and "out of memory" in r.output and "Traceback" not in r.output


def test_debug_flag_shows_traceback():
    r = run("--debug", "train", "--epochs", "1", "--device", "cpu", env={"GPUNN_FUSED": "maybe"})
    assert r.exit_code == 1 and r.exception is not None


def test_every_command_has_help_with_example():
    for cmd in (["info"], ["train"], ["check"], ["bench"], ["plot", "activations"]):
        r = run(*cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output, cmd


def test_bench_tiny(tmp_path):
    p = tmp_path / "b.json"
    r = run("bench", "--workload", "lecture", "--batch-size", "2", "--repeats", "2", "--min-time", "0.01",
            "--json", str(p), "--markdown")
    assert r.exit_code == 0, r.output
    data = json.loads(p.read_text())
    env, rows = data["environment"], data["rows"]
    assert {"gpunn", "python", "numpy", "blas", "cpu", "tf32", "dtype", "openblas_coretype"} <= set(env)
    assert len(rows) == 1
    row = rows[0]
    for key in ("us_per_step", "samples_per_s", "gflops", "ceiling_gflops", "share_of_ceiling", "h2d_ms"):
        assert row[key] > 0, key
    assert row["batch"] == 2 and row["workload"] == "lecture"
    assert "| workload |" in r.output and "# BLAS threads: " in r.output and "| threads |" in r.output
    assert row["threads"] in (None, 1)       # None where a user BLAS variable is set


def test_bench_says_when_gpunn_fused_switches_the_cpu_kernels_off(monkeypatch):
    """`gpunn bench`'s header says the kernels are off where GPUNN_FUSED=0 (as `gpunn info` does), not only the
    numba version."""
    from gpunn import cpukernels
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    args = ("bench", "--workload", "lecture", "--batch-size", "1", "--repeats", "1", "--min-time", "0.01")
    r = run(*args)
    assert r.exit_code == 0 and "fused CPU kernels: numba" in r.output and "(off: GPUNN_FUSED)" not in r.output
    monkeypatch.setenv("GPUNN_FUSED", "0")
    r = run(*args)
    assert r.exit_code == 0 and "(off: GPUNN_FUSED)" in r.output and "unfused" in r.output, r.output


def test_bench_takes_a_thread_setting():
    from gpunn import threads
    try:
        r = run("bench", "--workload", "lecture", "--batch-size", "1", "--repeats", "1", "--min-time", "0.01",
                "--threads", "off")
        assert r.exit_code == 0 and "left alone" in r.output, r.output
        r = run("bench", "--threads", "lots")
        assert r.exit_code == 2 and "--threads" in r.output
    finally:
        threads.set_threads(None)


def test_default_train_reaches_95_percent_on_digits():
    """The README's main job: the default network on the embedded digits, ≥ 95 % test accuracy."""
    r = run("train", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["dataset"] == "digits" and out["layers"] == [64, 32, 10] and out["epochs"] == 40
    assert out["test_accuracy"] >= 0.95, out["test_accuracy"]


@pytest.mark.parametrize("ext,magic", [("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_plots_are_written_in_the_format_their_extension_names(tmp_path, ext, magic):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'gpunn[plot]')")
    p = tmp_path / f"a.{ext}"
    r = run("plot", "activations", str(p))
    assert r.exit_code == 0, r.output
    assert p.read_bytes().startswith(magic)


def test_json_output_is_strict_json(tmp_path):
    r = run("train", "--dataset", "xor", "--epochs", "2", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    json.loads(r.output, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


HIDDEN_CHOICES = ["elu", "identity", "leaky_relu", "relu", "sigmoid", "softplus", "tanh"]
LOSSES = ["binary_cross_entropy", "cross_entropy", "squared_error"]


@pytest.mark.parametrize("activation", HIDDEN_CHOICES)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_activation_and_loss_works_with_the_defaults(activation, loss):
    """No other option: every --activation × --loss reaches ≥ 90 % test accuracy on the digits."""
    r = run("train", "--device", "cpu", "--activation", activation, "--loss", loss, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["test_accuracy"] >= 0.90, (activation, loss, out["test_accuracy"])


@pytest.mark.parametrize("dataset", ["digits", "moons", "spirals", "xor"])
def test_every_dataset_works_with_the_defaults(dataset):
    r = run("train", "--device", "cpu", "--dataset", dataset, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["test_accuracy"] >= 0.95, r.output[-300:]


def test_patience_stops_on_the_validation_split_and_test_is_reported_once():
    r = run("train", "--device", "cpu", "--epochs", "300", "--patience", "3", "--json")
    out = json.loads(r.output)
    assert r.exit_code == 0 and out["epochs"] < 300 and out["best_epoch"] is not None
    assert all("val_loss" in rec and "test" not in " ".join(rec) for rec in out["history"])


def test_the_auto_fallback_notice_is_one_line_of_gpunn_output(monkeypatch):
    from gpunn import backend
    if backend.cuda_unavailable_reason() is None:
        pytest.skip("a GPU is usable here: 'auto' does not fall back")
    monkeypatch.setattr(backend, "_warned_fallback", False)
    monkeypatch.delenv("GPUNN_DEVICE", raising=False)
    r = run("train", "--epochs", "1", "--json")
    assert r.exit_code == 0
    notes = [line for line in r.output.splitlines() if "falls back to cpu" in line]
    assert len(notes) == 1 and notes[0].startswith("gpunn: note: device 'auto' falls back to cpu"), r.output
    assert "Warning" not in r.output and "click" not in r.output


def test_training_curves_carry_the_run_configuration(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'gpunn[plot]')")
    p = tmp_path / "curves.svg"
    r = run("train", "--device", "cpu", "--epochs", "2", "--plot", str(p))
    assert r.exit_code == 0, r.output
    text = p.read_text()
    assert text.startswith("<?xml") and "digits: 64-32-10 sigmoid, cross_entropy, sgd lr=0.1" in text
