"""What gpunn train and friends tell the user: resuming, early stopping, Ctrl-C, GPU-sized work, examples."""
from __future__ import annotations

import json

from click.testing import CliRunner

from gpunn import recipes
from gpunn.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_train_says_it_resumed_from_the_checkpoint(tmp_path):
    ckpt = str(tmp_path / "run.ckpt")
    r = run("train", "--epochs", "2", "--device", "cpu", "--checkpoint", ckpt)
    assert r.exit_code == 0 and "resumed" not in r.output, r.output
    r = run("train", "--epochs", "4", "--device", "cpu", "--checkpoint", ckpt)
    assert r.exit_code == 0, r.output
    assert f"gpunn: note: resumed from {ckpt} after epoch 2" in r.output
    assert "epoch 1/4" not in r.output and "epoch 3/4" in r.output
    r = run("train", "--epochs", "4", "--device", "cpu", "--checkpoint", ckpt)
    assert r.exit_code == 0 and "holds a finished run; nothing left to train" in r.output, r.output
    r = run("train", "--epochs", "6", "--device", "cpu", "--checkpoint", ckpt, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["resumed_after_epoch"] == 4, r.output


def test_train_says_which_epoch_early_stopping_restored():
    r = run("train", "--dataset", "xor", "--epochs", "300", "--patience", "1", "--device", "cpu", "--lr", "5")
    assert r.exit_code == 0, r.output
    line = [s for s in r.output.splitlines() if s.startswith("early stopping restored the weights of epoch ")]
    assert len(line) == 1, r.output


def test_ctrl_c_suggests_a_checkpoint_unless_one_is_given(monkeypatch, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(recipes, "train", interrupted)
    r = run("train", "--device", "cpu")
    assert r.exit_code == 130 and "interrupted; run it with --checkpoint FILE" in r.output, r.output
    r = run("train", "--device", "cpu", "--checkpoint", str(tmp_path / "c.ckpt"))
    assert r.exit_code == 130 and "--checkpoint" not in r.output, r.output


def test_adam_with_momentum_is_refused_and_sgd_momentum_still_works():
    r = run("train", "--optimizer", "adam", "--momentum", "0.5", "--epochs", "1")
    assert r.exit_code == 2 and "--momentum is SGD's; adam has none" in r.output, r.output
    r = run("train", "--optimizer", "sgd", "--momentum", "0.5", "--epochs", "1", "--device", "cpu", "--json")
    assert r.exit_code == 0 and '"momentum": 0.5' in r.output, r.output


def test_plot_help_has_its_example():
    r = run("plot", "--help")
    assert r.exit_code == 0 and "gpunn plot activations activations.png" in r.output


def test_bench_wide_on_a_cpu_says_it_is_gpu_sized(monkeypatch):
    import gpunn.cli as cli
    monkeypatch.setattr(cli, "time_workload", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    r = run("bench", "--workload", "wide", "--device", "cpu")
    assert "the wide workload" in r.output and "GPU-sized" in r.output, r.output


def test_the_data_commands_have_help_with_examples():
    for cmd in ("evaluate", "predict"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Examples:" in r.output and f"gpunn {cmd} m.npz" in r.output, r.output
