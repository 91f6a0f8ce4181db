"""Shared fixtures: every backend present, one test id each; CuPy ones skip with the reason."""
from __future__ import annotations

import shutil

import pytest

import fakecupy
import gpunn
from gpunn.backend import cuda_unavailable_reason

_REASON = cuda_unavailable_reason(0)

BACKENDS = [
    pytest.param("cpu", id="numpy"),
    pytest.param("cuda:0", id="cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(_REASON is not None,
                                                                            reason=f"cupy: {_REASON}")]),
    # gpunn's CUDA code path on CPU: NumPy dressed as CuPy, fused kernels on the host emulation
    # (tests/fakecupy.py, tests/emulation.py). Where a real CuPy is there, the real one is tested instead.
    pytest.param("fake:cuda:0", id="fakecupy", marks=pytest.mark.skipif(
        fakecupy.real_cupy_loaded(), reason="fakecupy: a real CuPy is loaded and the fake would shadow it")),
]
DTYPE_TOL = {"float32": 1e-5, "float64": 1e-10}


@pytest.fixture(params=BACKENDS)
def device(request) -> gpunn.Device:
    """A gpunn.Device for each backend present (numpy always; cupy when a GPU is usable; fakecupy on CPU)."""
    if request.param.startswith("fake:"):
        fakecupy.install(request.getfixturevalue("monkeypatch"))
        return gpunn.get_device(request.param.removeprefix("fake:"))
    return gpunn.get_device(request.param)


@pytest.fixture
def fake_gpu(monkeypatch):
    """gpunn's CUDA path on the fake CuPy, with the fused kernels on the host emulation."""
    if fakecupy.real_cupy_loaded():
        pytest.skip("real CuPy is imported here: the fake would shadow it")
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed: no kernel emulation for the fused kernels")
    return fakecupy.install(monkeypatch)


@pytest.fixture
def fake_gpu_unfused(monkeypatch):
    """The fake CuPy with the fused kernels off (plain xp code only)."""
    if fakecupy.real_cupy_loaded():
        pytest.skip("real CuPy is imported here: the fake would shadow it")
    return fakecupy.install(monkeypatch, fused=False)


@pytest.fixture(params=[pytest.param(True, id="fused"), pytest.param(False, id="unfused")])
def fused(request) -> bool:
    return request.param


@pytest.fixture(autouse=True)
def _reset_fallback_warning(monkeypatch):
    # The auto-fallback warning is once per process; tests that look for it reset the flag.
    yield
