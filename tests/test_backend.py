"""Device specs, errors, the environment default, auto fallback, mixing detection, transfers."""
from __future__ import annotations

import os

import numpy
import pytest

import gpunn
from gpunn import backend, cpukernels, ops
from gpunn.errors import DeviceError, DeviceSpecError, GpunnError
from helpers import FakeCupyArray


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "cpu:0", "cuda:", "", "CUDA 0", "auto:1"])
def test_malformed_specs_name_the_accepted_forms(spec):
    with pytest.raises(DeviceSpecError, match="accepted forms"):
        gpunn.get_device(spec)


def test_spec_of_wrong_type():
    with pytest.raises(DeviceSpecError):
        gpunn.Device(3)


def test_errors_are_also_builtins():
    assert issubclass(DeviceError, RuntimeError) and issubclass(DeviceError, GpunnError)
    assert issubclass(DeviceSpecError, ValueError)
    assert issubclass(gpunn.ShapeError, ValueError) and issubclass(gpunn.DataTypeError, TypeError)


def test_cpu_device_value():
    d = gpunn.get_device("cpu")
    assert d.kind == "cpu" and d.index == 0 and d.xp is numpy and str(d) == "cpu"
    assert repr(d) == "Device('cpu')"
    assert d == gpunn.Device("CPU") and d == "cpu" and hash(d) == hash(gpunn.Device("cpu"))
    with pytest.raises(AttributeError):
        d.kind = "cuda"


@pytest.mark.skipif(backend.cuda_unavailable_reason() is None, reason="a GPU is usable here")
class TestWithoutCuda:
    def test_explicit_cuda_raises_with_reason(self):
        with pytest.raises(DeviceError) as exc:
            gpunn.get_device("cuda")
        msg = str(exc.value)
        assert "cuda:0" in msg and backend.cuda_unavailable_reason() in msg and "\n" not in msg

    def test_cuda_index_raises(self):
        with pytest.raises(DeviceError):
            gpunn.Device("cuda:3")

    def test_available_devices_is_cpu_only(self):
        assert gpunn.available_devices() == ["cpu"]

    def test_reason_is_one_line_and_names_the_fix(self):
        reason = gpunn.cuda_unavailable_reason()
        assert reason and "\n" not in reason
        if "not installed" in reason:
            assert "gpunn[cuda12]" in reason

    def test_auto_falls_back_to_cpu_with_one_log_record_and_no_warning(self, monkeypatch, caplog):
        """A notice on the gpunn logger, not a warning: ``-W error`` must not break CPU-only scripts."""
        import logging
        import warnings
        monkeypatch.setattr(backend, "_warned_fallback", False)
        monkeypatch.delenv("GPUNN_DEVICE", raising=False)
        with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="gpunn"):
            warnings.simplefilter("error")
            assert gpunn.get_device() == "cpu"
            assert gpunn.get_device("auto") == "cpu"   # second time: no second notice
        notes = [r for r in caplog.records if "falls back to cpu" in r.getMessage()]
        assert len(notes) == 1 and notes[0].name == "gpunn" and notes[0].levelno == logging.WARNING

    def test_env_variable_is_the_default(self, monkeypatch):
        monkeypatch.setenv("GPUNN_DEVICE", "cuda:0")
        with pytest.raises(DeviceError):
            gpunn.get_device()
        monkeypatch.setenv("GPUNN_DEVICE", "cpu")
        assert gpunn.get_device() == "cpu"
        monkeypatch.setenv("GPUNN_DEVICE", "gpu")
        with pytest.raises(DeviceSpecError):
            gpunn.get_device()


def test_use_device_sets_and_restores_default(monkeypatch):
    monkeypatch.setenv("GPUNN_DEVICE", "cpu")
    with gpunn.use_device("cpu") as d:
        assert d == "cpu" and gpunn.get_device() == "cpu"
        net = gpunn.Sequential([gpunn.Dense(2, 1)], seed=0)
        assert net.device == "cpu"
    assert gpunn.get_device() == "cpu"


def test_use_device_unusable_cuda_raises():
    if backend.cuda_unavailable_reason(7) is None:
        pytest.skip("eight GPUs present")
    with pytest.raises(DeviceError):
        with gpunn.use_device("cuda:7"):
            pass


def test_round_trip_on_every_backend(device):
    a = numpy.arange(12, dtype=numpy.float64).reshape(3, 4)
    d = device.asarray(a, dtype="float32")
    assert gpunn.device_of(d) == device
    assert gpunn.array_module(d) is device.xp
    back = device.to_host(d)
    assert isinstance(back, numpy.ndarray) and back.dtype == numpy.float32
    numpy.testing.assert_array_equal(back, a)
    device.synchronize()
    assert device.asarray([[1, 2]]).shape == (1, 2)


def test_host_data_is_cpu():
    assert gpunn.device_of(numpy.zeros(2), [1, 2], 3.0, None) == "cpu"
    assert gpunn.array_module(numpy.zeros(2)) is numpy


def test_mixing_numpy_and_cupy_is_refused(monkeypatch):
    import sys
    import types
    monkeypatch.setitem(sys.modules, "cupy", sys.modules.get("cupy") or types.ModuleType("cupy"))
    with pytest.raises(DeviceError, match="mixed"):
        gpunn.device_of(numpy.zeros(2), FakeCupyArray(0))
    with pytest.raises(DeviceError, match="several GPUs"):
        gpunn.device_of(FakeCupyArray(0), FakeCupyArray(1))


def test_fused_switch(monkeypatch):
    monkeypatch.setenv("GPUNN_FUSED", "0")
    assert ops.fused_enabled() is False
    monkeypatch.setenv("GPUNN_FUSED", "1")
    assert ops.fused_enabled() is True
    # on the CPU the fused kernels are numba's, where numba imports (tests/test_cpukernels.py)
    assert ops.ops_for(gpunn.Device("cpu"), fused=True).fused is cpukernels.available()
    assert ops.ops_for(gpunn.Device("cpu"), fused=False).fused is False


def test_without_numba_the_cpu_runs_the_numpy_path(monkeypatch):
    """Where numba is missing or fails to import, fused CPU ops fall back to the NumPy reference."""
    monkeypatch.setattr(cpukernels, "available", lambda: False)
    assert type(ops.ops_for(gpunn.Device("cpu"), fused=True)) is ops.XpOps    # asked for: imported, refused
    net = gpunn.mlp([2, 3, 1], output="sigmoid", device="cpu", seed=0)        # default: loaded lazily
    net.ops.warm_up()
    assert net.fused is False
    net.fit(numpy.zeros((4, 2)), numpy.ones((4, 1)), epochs=1)
    monkeypatch.setattr(cpukernels, "installed", lambda: False)
    assert type(ops.ops_for(gpunn.Device("cpu"))) is ops.XpOps


@pytest.mark.parametrize("value", [None, "0", "1", " 2 ", "-1", "+1", "007", "1_0", "", "false", "true", "on", "1.0"])
def test_tf32_is_read_as_cupy_reads_it(value, monkeypatch):
    """CuPy 14's get_compute_type: TF32 for float32 products where int(os.getenv('CUPY_TF32', '0')) > 0, and a
    ValueError at the first float32 product where int() refuses the value. gpunn says the same: on/off as
    CuPy decides it, and a value CuPy cannot read is a problem named up front."""
    if value is None:
        monkeypatch.delenv("CUPY_TF32", raising=False)
    else:
        monkeypatch.setenv("CUPY_TF32", value)
    try:
        cupy_on, cupy_fails = int(os.getenv("CUPY_TF32", "0")) > 0, False      # CuPy's own line
    except ValueError:
        cupy_on, cupy_fails = False, True
    assert backend.tf32_enabled() is cupy_on
    problem = backend.tf32_problem()
    assert (problem is not None) is cupy_fails
    if cupy_fails:
        assert f"CUPY_TF32={value!r}" in problem and "not an integer" in problem


@pytest.mark.parametrize("value", ["false", ""])
def test_a_cupy_tf32_cupy_cannot_read_makes_cuda_unusable_up_front(value, fake_gpu, monkeypatch, caplog):
    """Not a ValueError from inside CuPy at the first float32 product of a step: cuda:0 is refused with the
    reason, 'auto' falls back to the CPU saying why, the device list has no GPU, gpunn info shows the reason."""
    assert backend.cuda_unavailable_reason(0) is None and "cuda:0" in backend.available_devices()
    monkeypatch.setenv("CUPY_TF32", value)
    with pytest.raises(DeviceError, match=r"cannot use cuda:0: CUPY_TF32=.* is not an integer"):
        gpunn.Device("cuda:0")
    assert backend.available_devices() == ["cpu"]
    monkeypatch.setattr(backend, "_warned_fallback", False)
    with caplog.at_level("WARNING", logger="gpunn"):
        assert gpunn.Device("auto") == "cpu"
    assert "CUPY_TF32" in caplog.text
    from click.testing import CliRunner

    from gpunn.cli import main
    out = CliRunner().invoke(main, ["info"]).output
    assert "CUDA unusable: CUPY_TF32=" in out and "TF32: off" in out
    monkeypatch.setenv("CUPY_TF32", "1")
    assert gpunn.Device("cuda:0") == "cuda:0" and backend.tf32_enabled()
