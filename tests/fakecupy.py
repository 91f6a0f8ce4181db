"""A stand-in for CuPy on machines without a GPU: NumPy arrays that *look* like CuPy arrays.

It lets CPU CI run gpunn's CUDA-side wiring (device checks, transfers, the ``cuda:N`` branches of
the network, save/load, predict's return type) and count every host read-back of a device value
(``get``, ``float``, ``bool``, ``int``, ``item``) — the operations that would synchronise a real GPU.
It checks gpunn's logic, not CuPy's API: that needs a card (scripts/gpu-check.sh).
"""
from __future__ import annotations

import contextlib
import types

import numpy


class _Dev:
    def __init__(self, i: int):
        self.id = i


class ndarray(numpy.ndarray):  # noqa: N801 - CuPy's name
    reads = 0      # host read-backs since the last reset

    @property
    def device(self):
        return _Dev(0)

    def _read(self):
        ndarray.reads += 1
        return self.view(numpy.ndarray)

    def __setitem__(self, key, value):
        # device-to-device copy in CuPy: not a read-back (NumPy would call __float__ on a 0-d value)
        if isinstance(value, ndarray):
            value = value.view(numpy.ndarray)
        super().__setitem__(key, value)

    def get(self, *a, **k):
        return self._read().copy()

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    def __bool__(self):
        return bool(self._read())

    def item(self, *a):
        return self._read().item(*a)

    def tolist(self):
        return self._read().tolist()


ndarray.__module__ = "cupy._core.core"


def _wrap(r):
    return r.view(ndarray) if type(r) is numpy.ndarray else r


def _fn(f):
    def wrapped(*a, **k):
        return _wrap(f(*a, **k))
    return wrapped


class _Module(types.ModuleType):
    def __getattr__(self, name):
        f = getattr(numpy, name)
        if callable(f) and not isinstance(f, type):
            return _fn(f)
        return f


cupy = _Module("cupy")
cupy.__version__ = "0.0-fake"
cupy.ndarray = ndarray


def _asarray(a, dtype=None):
    if isinstance(a, ndarray) and (dtype is None or a.dtype == dtype):
        return a
    return numpy.array(a, dtype=dtype).view(ndarray)    # a "device copy"


cupy.asarray = _asarray
cupy.is_available = lambda: True


class _CudaDevice(contextlib.AbstractContextManager):
    def __init__(self, i=0):
        self.id = i

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


cupy.cuda = types.SimpleNamespace(
    Device=_CudaDevice,
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, memGetInfo=lambda: (8 << 30, 16 << 30),
                                  getDeviceProperties=lambda i: {"name": b"Fake GPU", "multiProcessorCount": 1},
                                  runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0))
