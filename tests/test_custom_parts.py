"""Saved work loads back (gpunn.registry): custom Schedule, Optimizer and Loss subclasses join a registry when
defined and load by key; a configuration that would not load back is refused before anything is written."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy
import pytest

import gpunn
from gpunn.errors import ConfigError, ModelFileError, SaveError
from gpunn.schedules import Schedule
from helpers import child_env, host

X = numpy.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
Y = numpy.array([[0], [1], [1], [0]], dtype=float)


class HalvingSchedule(Schedule):
    name = "test_halving"

    def __init__(self, initial=0.5, steps=(2, 4)):
        self.initial, self.steps = float(initial), tuple(steps)     # a tuple attribute: stored as a list

    def __call__(self, step):
        return self.initial * 0.5 ** sum(step >= s for s in self.steps)


class UnnamedDecay(gpunn.schedules.StepDecay):
    """A subclass without a name of its own: must not pass for StepDecay."""

    def __call__(self, step):
        return super().__call__(step) * 0.5


class ClippedSGD(gpunn.SGD):
    pass


def net():
    return gpunn.mlp([2, 3, 1], output="sigmoid", seed=0)


@pytest.mark.parametrize("lr", [HalvingSchedule(), UnnamedDecay(0.4, every=2)], ids=["named", "unnamed"])
def test_a_custom_schedule_saves_and_loads_as_itself(tmp_path, lr):
    a = net()
    a.fit(X, Y, optimizer=gpunn.SGD(lr=lr), epochs=2)
    a.save(tmp_path / "m.npz")
    b = gpunn.load(tmp_path / "m.npz")
    assert type(b.optimizer.lr) is type(lr) and b.optimizer.lr == lr
    assert [b.optimizer.lr(s) for s in range(6)] == [lr(s) for s in range(6)]


def test_a_custom_optimizer_loads_as_its_class_not_its_parent(tmp_path):
    a = net()
    a.fit(X, Y, optimizer=ClippedSGD(lr=0.3, momentum=0.5), epochs=2)
    a.save(tmp_path / "m.npz")
    assert type(gpunn.load(tmp_path / "m.npz").optimizer) is ClippedSGD


def test_a_checkpoint_with_a_tuple_attribute_resumes_as_an_uninterrupted_run(tmp_path):
    whole = net()
    whole.fit(X, Y, optimizer=gpunn.SGD(lr=HalvingSchedule(), momentum=0.5), epochs=4, batch_size=2)
    first = net()
    first.fit(X, Y, optimizer=gpunn.SGD(lr=HalvingSchedule(), momentum=0.5), epochs=2, batch_size=2,
              checkpoint=tmp_path / "c")
    resumed = net()
    resumed.fit(X, Y, optimizer=gpunn.SGD(lr=HalvingSchedule(), momentum=0.5), epochs=4, batch_size=2,
                checkpoint=tmp_path / "c")
    numpy.testing.assert_array_equal(host(resumed.flat_parameters()), host(whole.flat_parameters()))


class OpaqueSchedule(Schedule):
    name = "test_opaque"

    def __init__(self):
        self.table = object()            # not JSON data

    def __call__(self, step):
        return 0.1


class ForgetfulSchedule(Schedule):
    name = "test_forgetful"

    def __init__(self, initial=0.1, scale=1.0):
        self.initial = initial * scale   # config() (its attributes) has "factor", which __init__ does not take
        self.factor = scale

    def __call__(self, step):
        return self.initial


@pytest.mark.parametrize("lr", [OpaqueSchedule(), ForgetfulSchedule(0.1, 3.0)], ids=["not-json", "no-round-trip"])
def test_what_would_not_load_back_is_refused_before_writing(tmp_path, lr):
    a = net()
    a.fit(X, Y, optimizer=gpunn.SGD(lr=lr), epochs=1)
    with pytest.raises(SaveError, match="cannot save the optimiser"):
        a.save(tmp_path / "m.npz")
    assert not os.path.exists(tmp_path / "m.npz")
    before = host(a.flat_parameters())
    with pytest.raises(SaveError, match="cannot save the optimiser"):      # before the first epoch
        a.fit(X, Y, optimizer=gpunn.SGD(lr=lr), epochs=3, checkpoint=tmp_path / "c")
    assert not os.path.exists(tmp_path / "c")
    numpy.testing.assert_array_equal(host(a.flat_parameters()), before)


def test_two_classes_cannot_claim_one_name():
    with pytest.raises(ConfigError, match="taken by"):
        class Impostor(Schedule):
            name = "step_decay"


def test_a_second_process_loads_a_custom_class_once_its_module_is_imported(tmp_path):
    (tmp_path / "myparts.py").write_text(textwrap.dedent("""
        import gpunn
        class Warmup(gpunn.schedules.Schedule):
            def __init__(self, peak=0.2, steps=3):
                self.peak, self.steps = peak, steps
            def __call__(self, step):
                return self.peak * min(1.0, (step + 1) / self.steps)
    """))
    save = "import gpunn, numpy, myparts\n" \
           "n = gpunn.mlp([2, 3, 1], output='sigmoid', seed=0)\n" \
           "n.fit(numpy.eye(2), numpy.eye(2)[:, :1], optimizer=gpunn.SGD(lr=myparts.Warmup()), epochs=1)\n" \
           "n.save('m.npz')\n"
    load = "import gpunn, sys\n" \
           "if sys.argv[1] == 'import': import myparts\n" \
           "try:\n    print(type(gpunn.load('m.npz').optimizer.lr).__qualname__)\n" \
           "except gpunn.errors.ModelFileError as e:\n    print('refused', e)\n"
    env = child_env(tmp_path)
    subprocess.run([sys.executable, "-c", save], cwd=tmp_path, env=env, check=True)
    out = [subprocess.run([sys.executable, "-c", load, arg], cwd=tmp_path, env=env, check=True,
                          capture_output=True, text=True).stdout for arg in ("import", "no")]
    assert out[0].strip() == "Warmup"
    assert out[1].startswith("refused") and "myparts.Warmup" in out[1] and "import the module" in out[1]


def test_a_loss_subclass_is_saved_by_its_own_key(tmp_path):
    class TestHalfSquared(gpunn.losses.SquaredError):
        pass
    a = net()
    a.fit(X, Y, loss=TestHalfSquared(), epochs=1)
    a.save(tmp_path / "m.npz")
    assert type(gpunn.load(tmp_path / "m.npz").loss) is TestHalfSquared
    assert ModelFileError   # (an unknown key is a ModelFileError: see the subprocess test)


class ScaledTanh(gpunn.activations.Tanh):
    """A subclass of a built-in activation, with a parameter and no name of its own."""

    def __init__(self, scale=2.0):
        self.scale = float(scale)

    def forward(self, z, out, rowstats=None):
        super().forward(z * self.scale, out)
        return out

    def derivative(self, z, y, out):
        out[...] = self.scale * (1 - y * y)
        return out

    def config(self):
        return {**super().config(), "scale": self.scale}


class WeightedSquared(gpunn.losses.SquaredError):
    def __init__(self, weight=1.0):
        self.weight = weight


def test_a_custom_activation_and_a_loss_with_parameters_load_back(tmp_path):
    a = gpunn.Sequential([gpunn.Dense(2, 3, ScaledTanh(3.0)), gpunn.Dense(3, 1, "sigmoid")], device="cpu", seed=0)
    a.fit(X, Y, loss=WeightedSquared(0.5), epochs=2)
    a.save(tmp_path / "m.npz")
    b = gpunn.load(tmp_path / "m.npz")
    assert type(b.layers[0].activation) is ScaledTanh and b.layers[0].activation.scale == 3.0
    assert type(b.loss) is WeightedSquared and b.loss.weight == 0.5
    numpy.testing.assert_array_equal(host(b.predict(X)), host(a.predict(X)))


def test_a_layer_whose_activation_would_not_load_back_is_refused_before_writing(tmp_path):
    class Forgetful(gpunn.activations.Sigmoid):
        def __init__(self, slope=2.0):
            self.slope = slope                   # config() (the parent's) does not store it
    a = gpunn.Sequential([gpunn.Dense(2, 3, Forgetful(5.0)), gpunn.Dense(3, 1, "sigmoid")], device="cpu", seed=0)
    assert Forgetful(5.0).config() != {"name": "sigmoid"}        # never stored as its parent
    with pytest.raises(SaveError, match="other attributes"):
        a.save(tmp_path / "m.npz")
    assert not os.path.exists(tmp_path / "m.npz")


def test_a_dense_subclass_is_refused_at_save_not_loaded_as_a_plain_dense(tmp_path):
    class NoisyDense(gpunn.Dense):
        pass
    a = gpunn.Sequential([NoisyDense(2, 3), gpunn.Dense(3, 1, "sigmoid")], device="cpu", seed=0)
    with pytest.raises(SaveError, match="subclass of Dense"):
        a.save(tmp_path / "m.npz")
    assert not os.path.exists(tmp_path / "m.npz")


def test_a_custom_activation_never_runs_as_its_parents_fused_kernel(fake_gpu):
    """On the (fake) GPU with fused kernels, a Tanh subclass runs its own forward, not the tanh kernel."""
    def net(device):
        return gpunn.Sequential([gpunn.Dense(2, 3, ScaledTanh(3.0)), gpunn.Dense(3, 1, "sigmoid")], device=device,
                                dtype="float64", seed=0)
    gpu = net("cuda:0")
    assert gpu.fused
    numpy.testing.assert_allclose(host(gpu.predict(X)), host(net("cpu").predict(X)), rtol=1e-10)


def test_a_custom_activation_never_runs_as_its_parents_fused_cpu_kernel():
    """On the CPU with the fused (numba) kernels, a Tanh subclass runs its own forward and derivative."""
    pytest.importorskip("numba", reason="the fused CPU kernels need numba (pip install 'gpunn[fast]')")

    def net(fused):
        return gpunn.Sequential([gpunn.Dense(2, 3, ScaledTanh(3.0)), gpunn.Dense(3, 1, "sigmoid")], device="cpu",
                                dtype="float64", seed=0, fused=fused)
    fast, plain = net(True), net(False)
    assert fast.fused and not plain.fused
    numpy.testing.assert_array_equal(fast.predict(X), plain.predict(X))
    for n in (fast, plain):
        n.train_step(X, numpy.ones((len(X), 1)), "squared_error", gpunn.SGD(lr=0.1))
    numpy.testing.assert_array_equal(fast.flat_parameters(), plain.flat_parameters())
