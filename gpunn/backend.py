"""Devices and array namespaces: the one module that knows about CuPy.

Everything else in gpunn is written once against an array namespace ``xp`` (``numpy`` or ``cupy``)
that it gets from a :class:`Device` or from the arrays at hand (:func:`array_module`). CuPy is
imported lazily, on the first CUDA request, so ``import gpunn`` never pulls it in.

Device specs: ``"cpu"``, ``"cuda"`` (= ``"cuda:0"``), ``"cuda:N"`` and ``"auto"``. The default spec comes
from the environment variable ``GPUNN_DEVICE``, else ``"auto"``: ``cuda:0`` when CuPy imports and a
device is usable, else ``cpu`` with a one-time notice on the ``gpunn`` logger naming the reason (a log
record, not a warning, so ``-W error`` does not break CPU-only scripts). An explicit CUDA request that cannot be
met raises :class:`~gpunn.errors.DeviceError`; it never falls back silently.
N indexes the devices *visible* to the process: set ``CUDA_VISIBLE_DEVICES`` before the first CUDA use.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy

from .errors import DeviceError, DeviceSpecError
from .types import Array, ArrayModule

__all__ = [
    "Device", "get_device", "use_device", "available_devices", "cuda_unavailable_reason", "cupy_module",
    "device_of", "array_module", "is_cupy_array", "xp_of", "parse_spec", "tf32_enabled", "tf32_problem", "to_host",
    "HostToDevice",
]

_SPEC_RE = re.compile(r"^(cpu|cuda|auto)(?::(\d+))?$")
_ACCEPTED = "'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'auto'"

_cupy_module: Any = None
_cupy_import_error: str | None = None
_cupy_tried = False
_lock = threading.Lock()
_warned_fallback = False
#: gpunn's logger: notices such as the auto device's fallback to the CPU.
LOGGER = logging.getLogger("gpunn")
_default_spec: contextvars.ContextVar[str | None] = contextvars.ContextVar("gpunn_device", default=None)


def cupy_module() -> ArrayModule | None:
    """Import CuPy once; return the module, or None (the reason is kept for messages)."""
    global _cupy_module, _cupy_import_error, _cupy_tried
    with _lock:
        if not _cupy_tried:
            _cupy_tried = True
            try:
                import cupy  # lazy on purpose: CuPy is an optional extra
                _cupy_module = cupy
            except Exception as exc:  # ImportError, or a broken install raising anything
                _cupy_import_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return _cupy_module


def _cuda_device_count() -> tuple[int, str | None]:
    """(number of usable CUDA devices, reason when there are none)."""
    cp = cupy_module()
    if cp is None:
        if _cupy_import_error and "No module named 'cupy'" in _cupy_import_error:
            return 0, ("CuPy is not installed; install a CUDA extra: pip install 'gpunn[cuda12]' "
                       "(or 'gpunn[cuda13]')")
        return 0, f"CuPy is installed but failed to import ({_cupy_import_error})"
    try:
        if not cp.is_available():
            return 0, "CuPy is installed but no usable CUDA driver or device was found"
        return int(cp.cuda.runtime.getDeviceCount()), None
    except Exception as exc:  # driver errors surface as CUDARuntimeError
        return 0, f"CuPy is installed but CUDA is unusable ({type(exc).__name__}: {exc})".splitlines()[0]


def cuda_unavailable_reason(index: int = 0) -> str | None:
    """Why ``cuda:index`` cannot be used, in one line; ``None`` when it can. A ``CUPY_TF32`` that CuPy cannot
    read makes every device unusable (:func:`tf32_problem`)."""
    count, reason = _cuda_device_count()
    if reason is not None:
        return reason
    if index >= count:
        return f"CUDA device index {index} is out of range: {count} device(s) visible"
    return tf32_problem()


def available_devices() -> list[str]:
    """Devices usable now: ``['cpu', 'cuda:0', ...]``."""
    count, _ = _cuda_device_count()
    return ["cpu"] + ([] if tf32_problem() else [f"cuda:{i}" for i in range(count)])


def tf32_enabled() -> bool:
    """Whether CuPy uses TF32 for float32 matrix products, read as CuPy reads ``CUPY_TF32``: an integer above 0
    (``int(os.getenv('CUPY_TF32', '0')) > 0`` in CuPy 14's ``get_compute_type``; off where unset, and False
    where CuPy cannot read it: :func:`tf32_problem`)."""
    try:
        return int(os.environ.get("CUPY_TF32", "0")) > 0
    except ValueError:
        return False


def tf32_problem() -> str | None:
    """Why CuPy cannot read ``CUPY_TF32`` (set, but not an integer: '', 'false', 'on'), or None. CuPy reads
    it with ``int()`` at its first float32 matrix product and raises ValueError there, in the middle of a
    step; gpunn refuses the device up front instead (:func:`cuda_unavailable_reason`)."""
    value = os.environ.get("CUPY_TF32")
    if value is None:
        return None
    try:
        int(value)
    except ValueError:
        return (f"CUPY_TF32={value!r} is not an integer: CuPy reads it with int() at its first float32 matrix "
                "product and fails there; set 0 (off, the default) or 1 (TF32 on), or unset it")
    return None


def parse_spec(spec: str) -> tuple[str, int]:
    """(kind, index) of a device spec; raises DeviceSpecError naming the accepted forms."""
    if not isinstance(spec, str):
        raise DeviceSpecError(f"a device spec must be a string such as {_ACCEPTED}; got {spec!r}")
    m = _SPEC_RE.match(spec.strip().lower())
    if m is None or (m.group(1) in ("cpu", "auto") and m.group(2) is not None):
        raise DeviceSpecError(f"malformed device spec {spec!r}; accepted forms: {_ACCEPTED}")
    return m.group(1), int(m.group(2) or 0)


class Device:
    """An immutable device value: ``kind`` ('cpu' or 'cuda'), ``index`` and its array namespace ``xp``.

    ``Device("cuda:1")`` parses and validates (raising :class:`DeviceError` when CUDA is unusable);
    ``Device("auto")`` resolves to ``cuda:0`` or ``cpu``. Two devices are equal when kind and index are.
    A device is a place (arrays, transfers, synchronisation); how layers compute on it is chosen by
    :func:`gpunn.ops.ops_for`.
    """

    __slots__ = ("_kind", "_index")
    _kind: str
    _index: int

    def __init__(self, spec: str | Device = "cpu"):
        if isinstance(spec, Device):
            kind, index = spec.kind, spec.index
        else:
            kind, index = parse_spec(spec)
        if kind == "auto":
            reason = cuda_unavailable_reason(0)
            if reason is None:
                kind, index = "cuda", 0
            else:
                _warn_fallback(reason)
                kind, index = "cpu", 0
        elif kind == "cuda":
            reason = cuda_unavailable_reason(index)
            if reason is not None:
                raise DeviceError(f"cannot use cuda:{index}: {reason}")
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_index", index)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Device is immutable")

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def index(self) -> int:
        return self._index

    @property
    def is_cuda(self) -> bool:
        return self._kind == "cuda"

    @property
    def xp(self) -> ArrayModule:
        """The array namespace: ``numpy`` for cpu, ``cupy`` for cuda."""
        return cupy_module() if self.is_cuda else numpy

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            try:
                other = Device(other)
            except (DeviceError, DeviceSpecError):
                return False
        return isinstance(other, Device) and (self.kind, self.index) == (other.kind, other.index)

    def __hash__(self) -> int:
        return hash((self.kind, self.index))

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def __repr__(self) -> str:
        return f"Device('{self}')"

    def activate(self) -> contextlib.AbstractContextManager:
        """A context manager making this CUDA device current (a no-op on cpu)."""
        if self.is_cuda:
            return self.xp.cuda.Device(self.index)
        return _NO_CONTEXT

    def asarray(self, a: Any, dtype: Any = None) -> Array:
        """``a`` (NumPy, CuPy, list, scalar) as an array of this device, copying only when needed."""
        if not self.is_cuda:
            if is_cupy_array(a):
                a = a.get()
            return numpy.asarray(a, dtype=dtype)
        cp = self.xp
        if is_cupy_array(a) and a.device.id != self.index:
            a = a.get()  # through the host: always correct, and cross-GPU moves are rare here
        with cp.cuda.Device(self.index):
            return cp.asarray(a, dtype=dtype)

    def to_host(self, a: Array) -> numpy.ndarray:
        """``a`` as a NumPy array on the host."""
        return to_host(a)

    def pinned_empty(self, shape: tuple, dtype: Any) -> numpy.ndarray:
        """A host array in page-locked memory on a CUDA device (copies from it can run asynchronously);
        a plain array on cpu."""
        if not self.is_cuda:
            return numpy.empty(shape, dtype)
        count = int(numpy.prod(shape))
        mem = self.xp.cuda.alloc_pinned_memory(max(count * numpy.dtype(dtype).itemsize, 1))
        return numpy.frombuffer(mem, dtype, count).reshape(shape)    # the array keeps ``mem`` alive

    def synchronize(self) -> None:
        """Wait until all work queued on this device is done (a no-op on cpu)."""
        if self.is_cuda:
            self.xp.cuda.Device(self.index).synchronize()


class HostToDevice:
    """Batches of rows sent from the host to a device through two page-locked buffers and a copy stream.

    ``slot()`` gives the host buffer to fill next; ``send(m)`` copies its first ``m`` rows to the device
    on the copy stream and makes the compute stream wait for that copy, so on a GPU the host fills and
    sends batch k + 1 while batch k computes, and device memory holds two batches. On cpu the host
    buffer is the batch itself: no copy.

    Order on a GPU, for batch k in buffer i = k mod 2: the device array ``send`` returns may be read by
    work queued until the next ``send``. So that next call records buffer i's *release* event on the
    compute stream (after step k, its last reader), and copy k + 2, into the same buffer, waits for it;
    copy k + 1 waits only for step k − 1 and so overlaps step k. The host refills buffer i after copy k
    has read it (its *copied* event). The four events are made once, without timing, and re-recorded.
    """

    def __init__(self, device: Device, shape: tuple, dtype: Any):
        self.device = device
        self.host = [device.pinned_empty(shape, dtype) for _ in range(2)]
        self.k = 0
        if device.is_cuda:
            cp = device.xp
            with device.activate():
                self.dev = [cp.empty(shape, dtype) for _ in range(2)]
                self.stream = cp.cuda.Stream(non_blocking=True)
                self.copied = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
                self.released = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
            self.recorded = [False, False]        # whether released[i] has been recorded yet

    def slot(self) -> numpy.ndarray:
        """The host buffer to fill for the next batch (waits, if need be, for the copy that last read it)."""
        i = self.k % 2
        if self.device.is_cuda and self.k >= 2:
            self.copied[i].synchronize()
        return self.host[i]

    def send(self, m: int) -> Array:
        """The first ``m`` rows of the buffer just filled, on the device (ready for the compute stream).

        The returned array may be read by work queued on the current stream until the next ``send``."""
        i = self.k % 2
        self.k += 1
        if not self.device.is_cuda:
            return self.host[i][:m]
        compute = self.device.xp.cuda.get_current_stream()
        if self.k >= 2:                                  # the previous batch's readers are all queued now
            compute.record(self.released[1 - i])
            self.recorded[1 - i] = True
        if self.recorded[i]:
            self.stream.wait_event(self.released[i])    # the step that last read dev[i] has finished
        with self.stream:
            self.dev[i][:m].set(self.host[i][:m])
        self.stream.record(self.copied[i])
        compute.wait_event(self.copied[i])
        return self.dev[i][:m]


class Handoff:
    """Orders the use of shared device buffers by work queued on different CUDA streams.

    A lock orders threads on the host, but each thread's work runs on its own current stream (CuPy's
    per-thread default stream, or a user's ``with stream:``), so the next holder could overwrite buffers
    the last holder's kernels are still reading. :meth:`acquire` makes the current stream wait for the
    event :meth:`release` recorded after the last holder's work; on cpu both do nothing. Call both under
    the host lock. The event is made once, without timing.
    """

    def __init__(self, device: Device):
        self.device = device
        self._event: Any = None

    def acquire(self) -> None:
        if self._event is not None:
            self.device.xp.cuda.get_current_stream().wait_event(self._event)

    def release(self) -> None:
        if not self.device.is_cuda:
            return
        if self._event is None:
            self._event = self.device.xp.cuda.Event(disable_timing=True)
        self.device.xp.cuda.get_current_stream().record(self._event)


_CPU = Device("cpu")
_NO_CONTEXT = contextlib.nullcontext()   # reusable: entering it does nothing


def to_host(a: Array) -> numpy.ndarray:
    """Any array (NumPy or CuPy) as a NumPy array."""
    return a.get() if is_cupy_array(a) else numpy.asarray(a)


def _warn_fallback(reason: str) -> None:
    """Say once, on the ``gpunn`` logger (WARNING), that 'auto' fell back to the CPU.

    A log record, not a Python warning: ``python -W error`` or a test suite's ``filterwarnings = error`` would
    turn a warning into an exception in every CPU-only script, for a notice. Without logging configured the
    line goes to stderr (Python's last-resort handler); ``logging.getLogger("gpunn").setLevel(logging.ERROR)``
    silences it.
    """
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        LOGGER.warning("gpunn: device 'auto' falls back to cpu: %s", reason)


def get_device(spec: str | Device | None = None) -> Device:
    """The device for ``spec``; with ``None``, the default: :func:`use_device`'s, else ``GPUNN_DEVICE``, else auto."""
    if isinstance(spec, Device):
        return spec
    if spec is None:
        spec = _default_spec.get() or os.environ.get("GPUNN_DEVICE") or "auto"
    return Device(spec)


@contextlib.contextmanager
def use_device(spec: str | Device) -> Iterator[Device]:
    """Make ``spec`` the default device inside a ``with`` block (and the current CUDA device)."""
    dev = get_device(spec)
    token = _default_spec.set(str(dev))
    try:
        with dev.activate():
            yield dev
    finally:
        _default_spec.reset(token)


def is_cupy_array(a: Any) -> bool:
    """Whether ``a`` is a CuPy array."""
    # Recognise CuPy arrays without importing CuPy: only a module already imported can have made one.
    return "cupy" in sys.modules and type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "device")


def device_of(*arrays: Any) -> Device:
    """The device holding ``arrays``; raises DeviceError when NumPy and CuPy arrays, or two GPUs, are mixed.

    Objects that are not CuPy arrays (NumPy arrays, lists, scalars) count as host data.
    """
    cuda_ids = set()
    host = False
    for a in arrays:
        if a is None:
            continue
        if is_cupy_array(a):
            cuda_ids.add(int(a.device.id))
        else:
            host = True
    if len(cuda_ids) > 1:
        raise DeviceError(f"arrays live on several GPUs ({', '.join(f'cuda:{i}' for i in sorted(cuda_ids))}); "
                          "move them to one device first (Device.asarray)")
    if cuda_ids and host:
        raise DeviceError("NumPy (host) and CuPy (GPU) arrays are mixed in one call; move them to one "
                          "device first (Device.asarray / Device.to_host)")
    if cuda_ids:
        return Device(f"cuda:{cuda_ids.pop()}")
    return _CPU


def array_module(*arrays: Any) -> ArrayModule:
    """The array namespace (``numpy`` or ``cupy``) of ``arrays``; see :func:`device_of`."""
    return device_of(*arrays).xp


def xp_of(a: Array) -> ArrayModule:
    """``numpy`` or ``cupy`` for one array, without mixing checks: the training step's fast path."""
    cp = _cupy_module
    return cp if cp is not None and isinstance(a, cp.ndarray) else numpy
