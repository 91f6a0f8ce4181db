"""A stand-in for CuPy on machines without a GPU: NumPy arrays that *look* like CuPy arrays.

It lets CPU CI run gpunn's CUDA-side wiring (device checks, transfers, the ``cuda:N`` branches of
the network, save/load, predict's return type) and count every host read-back of a device value
(``get``, ``float``, ``bool``, ``int``, ``item``) — the operations that would synchronise a real GPU.
``RawModule`` runs gpunn's fused kernels on the host emulation (tests/emulation.py), which checks
every launch argument against the kernel's signature, so the fused path's wiring runs on CI too.
``random``, ``cuda.Event`` and ``cuda.get_elapsed_time`` are enough for bench/gpu_check.py to run.
Streams, events, copies and kernel launches are logged in order (``LOG``), so tests can prove what a
card would have to finish before what (tests/test_gpu_streams.py).
It checks gpunn's logic, not CuPy's API: that needs a card (scripts/gpu-check.sh).
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
import types

import numpy

#: The SM count the fake GPU reports (an H100/H200's), which sizes the column sum's grid.
SMS = 132


class _Dev:
    def __init__(self, i: int):
        self.id = i


class ndarray(numpy.ndarray):
    reads = 0      # host read-backs since the last reset
    calls = 0      # CuPy calls that would launch work on the device (ufuncs, functions, kernels)
    allocations = 0  # device arrays those calls created (results not written to an ``out=``)

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

    def get(self, stream=None, order="C", out=None):
        """Device-to-host copy, as CuPy's ``ndarray.get``: into ``out`` (a host array of the same shape) if given."""
        if out is None:
            return self._read().copy()
        if type(out) is not numpy.ndarray or out.shape != self.shape:
            raise ValueError(f"fakecupy: get(out=) takes a host array of shape {self.shape}")
        out[...] = self._read()
        return out

    def set(self, arr, stream=None):
        """Host-to-device copy into this array, as CuPy's ``ndarray.set``: a host array of the same shape."""
        if type(arr) is not numpy.ndarray or arr.shape != self.shape:
            raise ValueError(f"fakecupy: set() takes a host array of shape {self.shape}; got {type(arr).__name__} "
                             f"{getattr(arr, 'shape', None)}")
        if not self.flags.c_contiguous:
            raise ValueError("fakecupy: set() needs a C-contiguous destination")
        ndarray.calls += 1
        LOG.append(("copy", get_current_stream().id, self.__array_interface__["data"][0]))
        self.view(numpy.ndarray)[...] = arr

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

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        with _counted(kwargs):
            return self._ufunc(ufunc, method, *inputs, **kwargs)

    def _ufunc(self, ufunc, method, *inputs, **kwargs):
        # CuPy's ufuncs take device arrays and scalars only: a host array or a list is a TypeError there
        for x in inputs + tuple(kwargs.get("out", ())):
            if not isinstance(x, (ndarray, numpy.generic, int, float, bool)):
                raise TypeError(f"fakecupy: {ufunc.__name__} got a {type(x).__name__} operand; CuPy takes "
                                "device arrays and scalars only (Unsupported type)")
        base = tuple(x.view(numpy.ndarray) if isinstance(x, ndarray) else x for x in inputs)
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(o.view(numpy.ndarray) for o in out)
        result = getattr(ufunc, method)(*base, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        if isinstance(result, tuple):
            return tuple(_wrap(r) for r in result)
        return _wrap(result)


ndarray.__module__ = "cupy._core.core"


_depth = [0]


@contextlib.contextmanager
def _counted(kwargs: dict):
    """Count one device call (and an allocation when no ``out=`` is given), not the calls it makes inside."""
    outer = _depth[0] == 0
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
    if outer:
        ndarray.calls += 1
        if kwargs.get("out") is None:
            ndarray.allocations += 1


def _wrap(r):
    if type(r) is numpy.ndarray:
        return r.view(ndarray)
    if isinstance(r, numpy.generic):   # CuPy returns 0-d device arrays where NumPy returns scalars
        return numpy.asarray(r).view(ndarray)
    return r


_TAKES_HOST_DATA = {"array"}   # cupy.array copies host data to the device (asarray is defined below)


def _fn(f):
    name = getattr(f, "__name__", "")

    def wrapped(*a, **k):
        if name not in _TAKES_HOST_DATA:
            for x in a + tuple(k.values()):
                if type(x) is numpy.ndarray:   # a host array where CuPy wants a device array
                    raise TypeError(f"fakecupy: cupy.{name} got a numpy.ndarray; CuPy refuses host arrays here")
        with _counted(k):
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


class RawModule:
    """CuPy's RawModule for gpunn's kernel source, backed by the host emulation."""

    def __init__(self, code=None, *, options=(), name_expressions=None, **kwargs):
        from gpunn import kernels
        if code != kernels.SOURCE:
            raise ValueError("the fake RawModule only knows gpunn.kernels.SOURCE")
        if not isinstance(options, tuple) or not all(isinstance(o, str) for o in options):
            raise TypeError(f"options must be a tuple of str; got {options!r}")
        self.options = options
        self.name_expressions = tuple(name_expressions or ())
        self.launches: dict[str, int] = {}

    def compile(self, log_stream=None):
        import emulation
        emulation.library()

    def get_function(self, name):
        if name not in self.name_expressions:   # CuPy cannot look up a template instance it was not told of
            raise KeyError(f"{name!r} is not among the module's name_expressions")
        import emulation

        def kernel(grid, block, args, **kw):
            emulation.launch(name, grid, block, args)
            LOG.append(("kernel", get_current_stream().id, name))
            self.launches[name] = self.launches.get(name, 0) + 1
            ndarray.calls += 1
        return kernel


cupy.RawModule = RawModule


class _Random:
    def __init__(self):
        self._g = numpy.random.default_rng(0)

    def standard_normal(self, size=None, dtype=float):
        return self._g.standard_normal(size, dtype=dtype).view(ndarray)


cupy.random = _Random()


#: What the fake GPU was asked to do, in order: ("record", stream, event), ("wait", stream, event),
#: ("copy", stream, destination buffer) and ("kernel", stream, name), where stream and event are the
#: serial numbers of the fake's objects (stream 0 is the null stream) and a buffer is its base address.
#: tests/test_gpu_streams.py derives from it which operations a card must finish before which.
LOG: list[tuple[str, int, object]] = []


class _Event:
    """Everything on the fake runs at once, in order: an event is done as soon as it is recorded."""

    made = 0

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        _Event.made += 1
        self.id = _Event.made
        self.t = None
        self.disable_timing = disable_timing

    def record(self, stream=None):
        stream = stream or get_current_stream()
        self.t = time.perf_counter()
        LOG.append(("record", stream.id, self.id))

    def synchronize(self):
        pass

    @property
    def done(self):
        return self.t is not None


class RawKernel:
    """CuPy's RawKernel, for bench/gpu_check.py's spin kernel only: it returns at once on the fake."""

    def __init__(self, code, name, **kwargs):
        if name != "gpunn_spin":
            raise ValueError("the fake RawKernel only knows gpu_check's spin kernel")

    def __call__(self, grid, block, args, **kw):
        if not isinstance(args[0], numpy.int64):
            raise TypeError("gpunn_spin takes one long long")


cupy.RawKernel = RawKernel


def _elapsed_ms(start, end):
    if start.disable_timing or end.disable_timing:     # CUDA: cudaErrorInvalidResourceHandle
        raise ValueError("fakecupy: get_elapsed_time of an Event made with disable_timing=True")
    return (end.t - start.t) * 1e3


class _Stream(contextlib.AbstractContextManager):
    """A CUDA stream: everything on the fake runs at once, so streams only record what waited on what
    (in ``LOG``). ``with stream:`` makes it the current stream, as in CuPy."""

    made = 0

    def __init__(self, non_blocking=False, null=False):
        self.id = 0 if null else _Stream.made + 1
        if not null:
            _Stream.made += 1
        self.ptr = self.id
        self.waited = 0

    def __enter__(self):
        _CURRENT.append(self)
        return self

    def __exit__(self, *exc):
        _CURRENT.pop()
        return False

    def record(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def wait_event(self, event):
        if not isinstance(event, _Event) or event.t is None:
            raise ValueError("fakecupy: wait_event needs a recorded Event")
        self.waited += 1
        LOG.append(("wait", self.id, event.id))


_NULL_STREAM = _Stream(null=True)
_CURRENT: list[_Stream] = []


def get_current_stream():
    return _CURRENT[-1] if _CURRENT else _NULL_STREAM


cupy.cuda = types.SimpleNamespace(
    Device=_CudaDevice,
    Event=_Event,
    Stream=_Stream,
    get_current_stream=get_current_stream,
    alloc_pinned_memory=lambda nbytes: bytearray(nbytes),
    get_elapsed_time=_elapsed_ms,
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, memGetInfo=lambda: (8 << 30, 16 << 30),
                                  getDeviceProperties=lambda i: {"name": b"Fake GPU", "multiProcessorCount": SMS},
                                  runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0))


def real_cupy_loaded() -> bool:
    return "cupy" in sys.modules and not isinstance(sys.modules["cupy"], _Module)


def is_fake(device) -> bool:
    """Whether ``device`` (a gpunn.Device) runs on this fake."""
    return device.is_cuda and isinstance(device.xp, _Module)


def install(monkeypatch, fused: bool = True) -> types.ModuleType:
    """Make gpunn see this fake as CuPy with one 'GPU', until the test ends (``monkeypatch`` undoes it).

    Fused kernels run on the host emulation where g++ is there (off otherwise, or with ``fused=False``).
    """
    from gpunn import backend, kernels
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(backend, "_cupy_module", cupy)
    monkeypatch.setattr(backend, "_cupy_tried", True)
    monkeypatch.setattr(backend, "_cupy_import_error", None)
    monkeypatch.setattr(kernels, "_MODULES", {})
    if fused is False or shutil.which("g++") is None:
        monkeypatch.setenv("GPUNN_FUSED", "0")
    else:
        monkeypatch.delenv("GPUNN_FUSED", raising=False)
    monkeypatch.setattr(kernels, "_SCRATCH", {})
    monkeypatch.setattr(kernels, "_USERS", {})
    ndarray.reads = ndarray.calls = ndarray.allocations = 0
    LOG.clear()
    _CURRENT.clear()
    return cupy
