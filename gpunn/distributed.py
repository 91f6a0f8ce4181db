"""Data-parallel training over MPI (mpi4py) and, for CuPy arrays, NCCL: one process per device.

    comm = gpunn.distributed.init()          # mpiexec -n 4 python train.py   (or python -m mpi4py ...)
    net = gpunn.mlp([784, 512, 10], device=comm.device, seed=0)
    net.fit(X, y, ..., batch_size=256, comm=comm)   # 256 is the global batch; every rank gets a slice

:func:`init` returns a :class:`Communicator` with ``rank``, ``size``, ``local_rank`` and ``device``
(``cuda:<local_rank>`` when that GPU is usable, else ``cpu``). Not launched under MPI, or without
mpi4py, it is a single-process communicator whose collectives do nothing, so the same script runs
alone. ``fit(..., comm=comm)`` broadcasts the parameters and the shuffling state from rank 0, has every
rank draw the same batch order and take its share of each global batch, sums the gradients (each
scaled by its share of the batch) in one allreduce of the network's flat gradient buffer per step, and
reduces each epoch's losses, correct counts and stop decisions in one small allreduce, so every rank
holds the same weights and takes the same decisions; only rank 0 prints and writes files.

CuPy arrays go straight to MPI when the MPI library reports CUDA-aware support
(``MPIX_Query_cuda_support``), else through NCCL where ``cupy.cuda.nccl`` is available, else through
host memory over MPI (the PyPI MPI wheels are not CUDA-aware). When ``size > 1`` an uncaught exception on
any rank aborts the whole job (``MPI_Abort``), also under plain ``python script.py``, instead of leaving the other ranks
waiting in a collective.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Any

import numpy

from .backend import Device, cuda_unavailable_reason, get_device, is_cupy_array, to_host
from .errors import ConfigError
from .types import Array

__all__ = ["Communicator", "init", "shard"]


def shard(start: int, stop: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s contiguous share of rows [start, stop): sizes differ by at most one row."""
    n = stop - start
    lo = start + rank * n // size
    hi = start + (rank + 1) * n // size
    return slice(lo, hi)


class Communicator:
    """A group of ranks training one network together (see the module docstring)."""

    def __init__(self, mpi_comm: Any = None, device: Device | None = None, local_rank: int = 0):
        self._comm = mpi_comm
        self.rank = mpi_comm.Get_rank() if mpi_comm is not None else 0
        self.size = mpi_comm.Get_size() if mpi_comm is not None else 1
        self.local_rank = local_rank
        self.device = device if device is not None else get_device("cpu")
        self._nccl: Any = None
        #: Whether the MPI library says it is CUDA-aware (then CuPy arrays are passed to it directly).
        self.cuda_aware = mpi_cuda_aware() if mpi_comm is not None and self.device.is_cuda else False

    @property
    def is_root(self) -> bool:
        """Whether this is rank 0, the one that prints and writes files."""
        return self.rank == 0

    def allreduce_sum(self, a: Array) -> Array:
        """Sum ``a`` over the ranks, in place (every rank ends with the same sum)."""
        if self.size == 1:
            return a
        if is_cupy_array(a):
            return self._allreduce_device(a)
        from mpi4py import MPI
        self._comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        return a

    def broadcast(self, a: Array, root: int = 0) -> Array:
        """Rank ``root``'s ``a`` on every rank, in place."""
        if self.size == 1:
            return a
        if is_cupy_array(a):
            host = numpy.ascontiguousarray(to_host(a))
            self._comm.Bcast(host, root=root)
            a[...] = self.device.asarray(host)
            return a
        self._comm.Bcast(a, root=root)
        return a

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """A small picklable value of rank ``root`` on every rank."""
        return obj if self.size == 1 else self._comm.bcast(obj, root=root)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective decision)."""
        if self.size == 1:
            return bool(flag)
        from mpi4py import MPI
        return bool(self._comm.allreduce(bool(flag), op=MPI.LOR))

    def _allreduce_device(self, a: Array) -> Array:
        if self.cuda_aware:                              # the MPI takes device buffers itself
            from mpi4py import MPI
            self.device.synchronize()                    # MPI does not know CuPy's stream
            self._comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
            return a
        nccl = self._nccl_comm()
        if nccl is not None:
            cp = self.device.xp
            dtype = {numpy.dtype("float32"): 7, numpy.dtype("float64"): 8}[a.dtype]   # ncclFloat32, ncclFloat64
            nccl.allReduce(a.data.ptr, a.data.ptr, a.size, dtype, 0, cp.cuda.get_current_stream().ptr)  # 0: sum
            return a
        from mpi4py import MPI
        host = numpy.ascontiguousarray(to_host(a))     # host-staged: the PyPI MPI wheels are not CUDA-aware
        self._comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        a[...] = self.device.asarray(host)
        return a

    def _nccl_comm(self) -> Any:
        if self._nccl is None:
            self._nccl = False
            try:
                from cupy.cuda import nccl
                uid = nccl.get_unique_id() if self.rank == 0 else None
                uid = self._comm.bcast(uid, root=0)
                with self.device.activate():
                    self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
            except Exception:          # no NCCL in this CuPy or on this machine: stage through the host
                self._nccl = False
        return self._nccl or None

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now."""
        if self.size > 1:
            self._comm.Abort(code)

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, device='{self.device}')"


def mpi_cuda_aware() -> bool:
    """Whether the MPI library loaded in this process reports CUDA-aware support
    (``MPIX_Query_cuda_support() == 1``, an extension of Open MPI and others; absent means no)."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libmpi" in line and line.split()[-1].startswith("/")}
    except OSError:
        return False
    for path in sorted(paths):
        try:
            query = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return query() == 1
    return False


def init(device: str | Device | None = None) -> Communicator:
    """The communicator of this job: MPI's COMM_WORLD when launched with several ranks, else one process.

    ``device`` overrides the choice of ``cuda:<local_rank>`` (when that GPU is usable) or ``cpu``.
    """
    try:
        from mpi4py import MPI
    except ImportError:
        return Communicator(None, get_device(device) if device is not None else get_device("cpu"))
    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        return Communicator(None, get_device(device) if device is not None else get_device("cpu"))
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = local.Get_rank()
    local.Free()
    if device is None:
        device = f"cuda:{local_rank}" if cuda_unavailable_reason(local_rank) is None else "cpu"
    comm = Communicator(world, get_device(device), local_rank)
    _abort_on_uncaught(comm)
    return comm


def _abort_on_uncaught(comm: Communicator) -> None:
    """An uncaught exception on one rank ends the whole job (the others would wait in a collective)."""
    previous = sys.excepthook

    def hook(kind: Any, value: Any, tb: Any) -> None:
        previous(kind, value, tb)
        sys.stderr.flush()
        comm.abort(1)
    sys.excepthook = hook


def check(comm: Any) -> Communicator | None:
    """``comm`` when it is a Communicator or None; ConfigError otherwise."""
    if comm is not None and not isinstance(comm, Communicator):
        raise ConfigError(f"comm must be a gpunn.distributed.Communicator (from gpunn.distributed.init()); got "
                          f"{comm!r}")
    return comm
