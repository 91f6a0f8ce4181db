"""gpunn's CUDA-side wiring, run on CPU CI against tests/fakecupy.py (NumPy dressed as CuPy)."""
from __future__ import annotations

import numpy
import pytest

import fakecupy
import gpunn
from gpunn import check, losses
from helpers import host, rng


@pytest.fixture
def fake(fake_gpu_unfused):
    """The fake CuPy (one visible 'GPU'), fused kernels off: these tests are about the xp path's wiring."""
    return fake_gpu_unfused


def make(device, seed=0):
    return gpunn.Sequential([gpunn.Dense(6, 9, "tanh"), gpunn.Dense(9, 7, "elu"), gpunn.Dense(7, 3, "softmax")],
                            device=device, seed=seed)


X = rng(0).normal(size=(40, 6))
Y = rng(1).integers(0, 3, size=40)


def test_cuda_device_resolves(fake):
    assert gpunn.available_devices() == ["cpu", "cuda:0"]
    assert gpunn.cuda_unavailable_reason() is None
    assert "out of range" in gpunn.cuda_unavailable_reason(1)
    d = gpunn.get_device("cuda")
    assert d == "cuda:0" and d.xp is fake and str(d) == "cuda:0"
    a = d.asarray([[1.0, 2.0]])
    assert isinstance(a, fake.ndarray) and gpunn.device_of(a) == d
    assert isinstance(d.to_host(a), numpy.ndarray) and not isinstance(d.to_host(a), fake.ndarray)
    with pytest.raises(gpunn.DeviceError, match="mixed"):
        gpunn.device_of(a, numpy.zeros(1))


def _train_steps(net, opt, steps: int) -> int:
    """``steps`` training steps on 16 device-resident samples; returns the host read-backs they made."""
    x = net.device.asarray(X[:16], dtype=net.dtype)
    t = net.device.asarray(numpy.eye(3)[Y[:16]], dtype=net.dtype)
    fakecupy.ndarray.reads = 0
    for _ in range(steps):
        net.train_step(x, t, losses.get("cross_entropy"), opt)
    return fakecupy.ndarray.reads


def test_training_step_never_reads_back(fake):
    """No host read-back of a device value inside forward/backward/update (each would be a GPU sync)."""
    net = make("cuda:0")
    for opt in (gpunn.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), gpunn.Adam()):
        assert _train_steps(net, opt, 5) == 0


def test_fit_reads_back_per_epoch_not_per_step(fake):
    """Read-backs during fit depend on the number of epochs, never on the number of steps."""
    counts = {}
    for batch in (20, 4):          # 2 and 10 steps per epoch
        net = make("cuda:0")
        fake.ndarray.reads = 0
        net.fit(X, Y, loss="cross_entropy", epochs=3, batch_size=batch, validation_data=(X[:8], Y[:8]))
        counts[batch] = fake.ndarray.reads
    assert counts[20] == counts[4], counts


def test_gpu_results_equal_cpu_results(fake):
    """The fake 'GPU' is NumPy underneath, so the two paths must agree bitwise."""
    a, b = make("cpu"), make("cuda:0")
    for net in (a, b):
        net.fit(X, Y, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1, momentum=0.9), epochs=3, batch_size=8)
    assert host(b.flat_parameters()).tobytes() == host(a.flat_parameters()).tobytes()
    assert isinstance(b.flat_parameters(), fake.ndarray)
    assert a.history.epochs[-1]["loss"] == b.history.epochs[-1]["loss"]


def test_predict_returns_the_input_library(fake):
    net = make("cuda:0")
    out_np = net.predict(X)
    assert type(out_np) is numpy.ndarray
    out_dev = net.predict(fake.asarray(X))
    assert isinstance(out_dev, fake.ndarray)
    numpy.testing.assert_array_equal(host(out_dev), out_np)
    cpu_net = make("cpu")
    assert isinstance(cpu_net.predict(fake.asarray(X)), fake.ndarray)


def test_move_save_load(fake, tmp_path):
    net = make("cpu")
    ref = net.predict(X)
    net.to("cuda:0")
    assert net.device == "cuda:0" and isinstance(net.layers[0].W, fake.ndarray)
    numpy.testing.assert_array_equal(net.predict(X), ref)
    net.save(tmp_path / "m.npz")
    back = gpunn.load(tmp_path / "m.npz", device="cuda:0")
    assert isinstance(back.flat_parameters(), fake.ndarray)
    numpy.testing.assert_array_equal(back.predict(X), ref)


def test_check_and_bench_on_cuda_wiring(fake):
    ref = check.trace("cpu", "float64", 3)
    got = check.trace(gpunn.Device("cuda:0"), "float32", 3, fused=False)
    assert all(check.rel_diff(got[k], ref[k]) < 1e-4 for k in ref)
    from gpunn.bench import environment, time_workload
    row = time_workload("lecture", gpunn.Device("cuda:0"), "float32", 4, repeats=1, min_time=0.01)
    assert row["device"] == "cuda:0" and row["fused"] is False and row["us_per_step"] > 0
    env = environment("float32")
    assert env["gpus"][0]["name"] == "Fake GPU" and env["cupy"] == "0.0-fake"


def test_inputs_on_another_gpu_are_refused(fake, monkeypatch):
    net = make("cuda:0")
    x = fake.asarray(X)
    monkeypatch.setattr(fake.ndarray, "device", property(lambda self: fakecupy._Dev(1)))
    with pytest.raises(gpunn.DeviceError, match="cuda:1"):
        net.predict(x)


def test_fused_step_launches_every_kernel_and_never_reads_back(fake_gpu):
    """The fused path really runs its kernels (no silent fallback to the xp code) and never syncs."""
    net = make("cuda:0")
    assert net.ops.fused
    assert _train_steps(net, gpunn.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), 3) == 0
    launched = net.ops.kernels.module.launches
    # tanh and elu layers, the softmax output and its cross-entropy (loss and δ) fused; every layer's bias
    # gradient; one update per step
    assert launched == {"bias_act_fwd<float, 2>": 3, "bias_act_fwd<float, 6>": 3, "act_bwd<float, 2>": 3,
                        "act_bwd<float, 6>": 3, "colsum<float>": 9, "sgd_update<float>": 3,
                        "softmax_fwd<float>": 3, "xent_bwd<float>": 3, "sum_scaled<float>": 3}, launched


def test_the_fake_refuses_host_arrays_like_cupy(fake):
    """So that a NumPy array slipped into device code fails on CI, as it would on a card."""
    a = fake.asarray(numpy.ones(3))
    h = numpy.ones(3)
    for bad in (lambda: a * h, lambda: fake.multiply(a, h), lambda: fake.add(a, [1.0, 2.0, 3.0]),
                lambda: fake.take(h, fake.asarray(numpy.array([0, 1]))), lambda: fake.multiply(a, 2.0, out=h)):
        with pytest.raises(TypeError, match="fakecupy"):
            bad()
    assert isinstance(a * 2.0, fake.ndarray) and isinstance(fake.sum(a), fake.ndarray)   # 0-d, as CuPy
    assert float(fake.sum(a)) == 3.0 and fake.ndarray.reads == 1


def test_agreement_check_passes_on_the_fake_gpu_fused_and_unfused(fake_gpu):
    """`gpunn check --device cpu,cuda:0` as scripts/gpu-check.sh runs it: rows for fused and unfused."""
    result = check.run_check(["cpu", "cuda:0"], ["float32", "float64"], steps=5)
    labels = {r["backend"] for r in result["rows"]}
    assert {"cupy cuda:0 float32 fused", "cupy cuda:0 float64 unfused"} <= labels
    assert result["passed"], [r for r in result["rows"] if not r["passed"]]


def test_cli_train_save_and_bench_on_the_fake_gpu(fake_gpu, tmp_path):
    """The CLI's cuda:0 paths (training, saving a GPU model, timing) end to end on the fake GPU."""
    import json

    from click.testing import CliRunner

    from gpunn.cli import main
    model = tmp_path / "m.npz"
    r = CliRunner().invoke(main, ["train", "--device", "cuda:0", "--epochs", "3", "--json", "--save", str(model)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["device"] == "cuda:0" and out["test_accuracy"] > 0.5 and model.exists()
    back = gpunn.load(model, device="cpu")
    assert back.device == "cpu"
    r = CliRunner().invoke(main, ["bench", "--device", "cuda:0", "--workload", "lecture", "--batch-size", "4",
                                  "--repeats", "1", "--min-time", "0.001", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["environment"]["gpus"][0]["name"] == "Fake GPU"
    (row,) = data["rows"]
    assert (row["device"], row["fused"], row["batch"]) == ("cuda:0", True, 4) and row["us_per_step"] > 0


def test_fused_update_follows_a_changed_learning_rate(fake_gpu):
    """The fused update caches its scalar arguments: a new learning rate (a schedule) must still apply."""
    nets = {"cpu": make("cpu"), "cuda:0": make("cuda:0")}
    for net in nets.values():
        opt = gpunn.SGD(lr=0.1, momentum=0.9)
        for lr in (0.1, 0.02, 0.5):
            opt.lr = lr
            net.forward(X[:16])
            net.backward(Y[:16], "cross_entropy")
            net.step(opt)
    ref, got = (host(n.flat_parameters()) for n in nets.values())
    numpy.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not numpy.allclose(ref, host(make("cpu").flat_parameters()), atol=1e-3)   # the steps moved it


def test_an_mlp_training_step_makes_few_device_calls_and_allocates_nothing(fake_gpu):
    """The mlp workload's step (784-512-512-10, sigmoid, softmax + cross-entropy, SGD): ≤ 20 CuPy calls
    and no device allocation in the steady state (each call is a kernel launch; each allocation a trip
    to CuPy's memory pool)."""
    net = gpunn.mlp([784, 512, 512, 10], activation="sigmoid", output="softmax", device="cuda:0", seed=0)
    g = rng(0)
    x = net.device.asarray(g.normal(size=(16, 784)), dtype=net.dtype)
    t = net.device.asarray(numpy.eye(10)[g.integers(0, 10, 16)], dtype=net.dtype)
    opt, loss = gpunn.SGD(lr=0.01, momentum=0.9), losses.get("cross_entropy")
    slot = net.device.xp.zeros(1, net.dtype)          # fit writes each step's loss into its own buffer
    for _ in range(2):
        net.train_step(x, t, loss, opt, out=slot)
    fakecupy.ndarray.calls = fakecupy.ndarray.allocations = fakecupy.ndarray.reads = 0
    value = net.train_step(x, t, loss, opt, out=slot)
    assert value is slot and fakecupy.ndarray.reads == 0
    assert fakecupy.ndarray.calls <= 20, fakecupy.ndarray.calls
    assert fakecupy.ndarray.allocations == 0, fakecupy.ndarray.allocations
    fakecupy.ndarray.allocations = 0
    fresh = net.train_step(x, t, loss, opt)          # without out=: the returned 0-d loss is the one allocation
    assert fresh.shape == () and fakecupy.ndarray.allocations == 1


def test_the_column_sum_grid_fills_the_card(fake_gpu):
    """mlp at batch 2048: 512 columns are 16 tiles; the rows are cut into chunks so that the grid has at
    least 2 blocks per SM the device reports (the fake says 132, as an H100/H200), instead of 16."""
    from gpunn import kernels
    net = gpunn.mlp([784, 512, 512, 10], activation="sigmoid", device="cuda:0", seed=0)
    delta = net.device.asarray(rng(0).normal(size=(2048, 512)), dtype=net.dtype)
    out = net.device.xp.empty(512, net.dtype)
    net.ops.column_sum(delta, out)
    numpy.testing.assert_allclose(host(out), host(delta).astype(numpy.float64).sum(axis=0), rtol=1e-4, atol=1e-4)
    (fn, grid, part, count, sizes), = net.ops.kernels._colsum.values()
    assert net.ops.kernels.colsum_blocks == 2 * fakecupy.SMS == kernels.COLSUM_BLOCKS
    assert grid[0] == 16 and grid[0] * grid[1] >= kernels.COLSUM_BLOCKS and part.shape == (grid[1], 512)
    assert kernels.stale_counters(net.device) == 0


def test_the_column_sum_grid_follows_the_sm_count(fake_gpu, monkeypatch):
    from gpunn import kernels
    monkeypatch.setattr(fakecupy, "SMS", 16)
    fk = kernels.FusedKernels(gpunn.Device("cuda:0"))
    assert fk.colsum_blocks == 32 and kernels.colsum_plan(2048, 512, fk.colsum_blocks) == (16, 2, 1024)
