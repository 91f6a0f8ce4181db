"""Data-parallel training over MPI (mpi4py) and, for CuPy arrays, NCCL: one process per device.

    comm = gpunn.distributed.init()          # mpiexec -n 4 python train.py   (or python -m mpi4py ...)
    net = gpunn.mlp([784, 512, 10], device=comm.device, seed=0)
    net.fit(X, y, ..., batch_size=256, comm=comm)   # 256 is the global batch; every rank gets a slice

:func:`init` returns a :class:`Communicator` with ``rank``, ``size``, ``local_rank``, ``local_size`` and
``device`` (``cuda:<local_rank>`` when that GPU is usable, else ``cpu``). Not launched under MPI it is a
single-process communicator whose collectives do nothing (its device: ``cuda:0`` when usable, as
``auto``), so the same script runs alone. Launched by ``mpiexec`` with several ranks but without a
working mpi4py, it raises instead of letting every rank train alone. ``fit(..., comm=comm)`` trains
with :class:`gpunn.strategy.DataParallel`: the ranks agree on the whole run first, then each trains its
share of every global batch and the gradients are summed in one allreduce per step.

What ends the job (``MPI_Abort``, non-zero, within seconds) instead of leaving ranks waiting:
an uncaught exception on any rank; any exception or ``sys.exit`` escaping a data-parallel ``fit`` on one
rank (unless every rank raised it together, as a disagreement or a divergence is); a rank that leaves
(exits normally or not) while its peers wait for it in a collective; and a collective that waits longer
than ``timeout`` seconds (``GPUNN_COLLECTIVE_TIMEOUT``, default 600). Every collective of this module is
non-blocking MPI polled by the waiting rank, which is how it notices.

Reduction routes for CuPy arrays, chosen by all ranks together (a route that fails on any rank moves
every rank to the next): NCCL (``cupy.cuda.nccl``, enqueued on the current stream, no host sync), else a
CUDA-aware MPI (``MPIX_Query_cuda_support``), else through page-locked host buffers over MPI. NumPy
arrays go over MPI.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import pickle
import sys
import time
from typing import Any

import numpy

from . import threads
from .backend import Device, cuda_unavailable_reason, get_device, is_cupy_array
from .errors import ConfigError, DistributedError
from .scalars import real
from .types import Array

__all__ = ["Communicator", "init", "shard", "launcher_size", "agreed", "ALL_RANKS"]

#: Set on an exception that every rank raised at the same point (it needs no abort).
ALL_RANKS = "gpunn_all_ranks"

#: Environment variables in which launchers give the number of ranks (and this rank), in order of trust.
LAUNCHER_VARIABLES = [("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                      ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"), ("PMIX_SIZE", "PMIX_RANK")]

_LEAVE_TAG = 7201


def shard(start: int, stop: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s contiguous share of rows [start, stop): sizes differ by at most one row."""
    n = stop - start
    lo = start + rank * n // size
    hi = start + (rank + 1) * n // size
    return slice(lo, hi)


def launcher_size(environ: Any = None) -> tuple[int, str | None]:
    """(number of ranks, the variable that says so) from a launcher's environment; (1, None) when none does."""
    env = os.environ if environ is None else environ
    for size_var, _ in LAUNCHER_VARIABLES:
        try:
            size = int(env.get(size_var, ""))
        except ValueError:
            continue
        if size >= 1:
            return size, size_var
    return 1, None


def agreed(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised by every rank at the same point (so leaving ``fit`` with it ends no job)."""
    setattr(exc, ALL_RANKS, True)
    return exc


def _timeout(value: float | None) -> float:
    if value is None:
        text = os.environ.get("GPUNN_COLLECTIVE_TIMEOUT", "600")
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"GPUNN_COLLECTIVE_TIMEOUT must be a number of seconds; got {text!r}") from None
    return real("the collective timeout (seconds)", value, 0.0, low_open=True)


class Communicator:
    """A group of ranks training one network together (see the module docstring)."""

    def __init__(self, mpi_comm: Any = None, device: Device | None = None, local_rank: int = 0,
                 local_size: int = 1, timeout: float | None = None):
        self._comm = mpi_comm
        self.rank = mpi_comm.Get_rank() if mpi_comm is not None else 0
        self.size = mpi_comm.Get_size() if mpi_comm is not None else 1
        self.local_rank, self.local_size = local_rank, local_size
        self.device = device if device is not None else get_device("cpu")
        self.timeout = _timeout(timeout)
        #: how CuPy arrays are summed: "nccl", "cuda-aware-mpi" or "host" (set by :meth:`agree_route`)
        self.route: str | None = None if self.device.is_cuda else "host"
        self._nccl: Any = None
        self._stage: dict[tuple, numpy.ndarray] = {}
        self._ops = 0                                 # collectives this rank has completed
        self._left: dict[int, int] = {}               # rank -> collectives it had completed when it left
        self._side: Any = None
        self._closed = False
        if mpi_comm is not None:
            from mpi4py import MPI
            self._side = mpi_comm.Dup()               # where leaving ranks say so, apart from the collectives
            self._side.Set_errhandler(MPI.ERRORS_RETURN)

    @property
    def is_root(self) -> bool:
        """Whether this is rank 0, the one that prints and writes files."""
        return self.rank == 0

    # -- collectives --------------------------------------------------------------------------------
    def allreduce_sum(self, a: Array) -> Array:
        """Sum ``a`` over the ranks, in place (every rank ends with the same sum)."""
        if self.size == 1:
            return a
        if is_cupy_array(a):
            return self._allreduce_device(a)
        from mpi4py import MPI
        self._wait(self._comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM), "a sum of gradients or epoch figures")
        return a

    def broadcast(self, a: Array, root: int = 0) -> Array:
        """Rank ``root``'s ``a`` on every rank, in place."""
        if self.size == 1:
            return a
        if is_cupy_array(a):
            host = self._staged(a)
            self._wait(self._comm.Ibcast(host, root=root), "a broadcast of parameters")
            a.set(host)
            return a
        self._wait(self._comm.Ibcast(a, root=root), "a broadcast of parameters")
        return a

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """A small picklable value of rank ``root`` on every rank."""
        if self.size == 1:
            return obj
        data = pickle.dumps(obj) if self.rank == root else b""
        n = numpy.array([len(data)], dtype=numpy.int64)
        self._wait(self._comm.Ibcast(n, root=root), "a broadcast")
        buf = numpy.frombuffer(data, dtype=numpy.uint8).copy() if self.rank == root else numpy.empty(n[0], numpy.uint8)
        self._wait(self._comm.Ibcast(buf, root=root), "a broadcast")
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    def allgather_object(self, obj: Any) -> list:
        """Every rank's small picklable value, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        data = numpy.frombuffer(pickle.dumps(obj), dtype=numpy.uint8)
        sizes = numpy.zeros(self.size, dtype=numpy.int64)
        self._wait(self._comm.Iallgather(numpy.array([data.size], dtype=numpy.int64), sizes), "an agreement")
        out = numpy.empty(int(sizes.sum()), dtype=numpy.uint8)
        offsets = numpy.concatenate([[0], numpy.cumsum(sizes)[:-1]])
        self._wait(self._comm.Iallgatherv(data, [out, sizes, offsets, MPI_BYTE()]), "an agreement")
        return [pickle.loads(out[o:o + s].tobytes()) for o, s in zip(offsets, sizes)]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective decision)."""
        if self.size == 1:
            return bool(flag)
        a = numpy.array([1.0 if flag else 0.0])
        return bool(self.allreduce_sum(a)[0] > 0)

    # -- waiting: a peer that left, a timeout ---------------------------------------------------------
    def _wait(self, request: Any, what: str) -> None:
        """Complete ``request``, polling: end the job if a rank it needs has left, or after the timeout."""
        if not request.Test():
            start = checked = time.monotonic()
            while not request.Test():
                now = time.monotonic()
                if now - checked > 0.001:
                    checked = now
                    self._check_peers(what)
                    if now - start > self.timeout:
                        self.abort(1, f"waited {self.timeout:g} s in {what} for the other ranks (collective "
                                      "timeout, GPUNN_COLLECTIVE_TIMEOUT); a rank is stuck or runs another program")
                time.sleep(0 if now - start < 0.05 else 0.001)
        self._ops += 1

    def _check_peers(self, what: str) -> None:
        from mpi4py import MPI
        status = MPI.Status()
        while self._side.Iprobe(source=MPI.ANY_SOURCE, tag=_LEAVE_TAG, status=status):
            done = numpy.zeros(1, dtype=numpy.int64)
            self._side.Recv(done, source=status.Get_source(), tag=_LEAVE_TAG)
            self._left[status.Get_source()] = int(done[0])
        gone = sorted(r for r, done in self._left.items() if done <= self._ops)
        if gone:
            self.abort(1, f"rank(s) {', '.join(map(str, gone))} left the job while rank {self.rank} waits in {what}; "
                          "every rank must make the same data-parallel calls (fit with comm=) and none may exit "
                          "early")

    def leave(self) -> None:
        """Tell the other ranks this rank is leaving (at exit), so none waits for it in vain."""
        if self._side is None or self._closed:
            return
        self._closed = True
        done = numpy.array([self._ops], dtype=numpy.int64)
        try:
            requests = [self._side.Isend(done, dest=r, tag=_LEAVE_TAG) for r in range(self.size) if r != self.rank]
            deadline = time.monotonic() + 1.0
            while not all(r.Test() for r in requests) and time.monotonic() < deadline:
                time.sleep(0.001)
        except Exception:             # a peer already gone: nobody left to tell
            pass
        self._close_nccl()

    def abort(self, code: int = 1, message: str | None = None) -> None:
        """End every rank of the job now (after printing ``message`` on this rank's stderr)."""
        if message:
            print(f"gpunn: rank {self.rank}: {message}; ending the job", file=sys.stderr)
            sys.stderr.flush()
        if self.size > 1:
            self._comm.Abort(code)

    # -- CuPy arrays: the route all ranks agreed on ---------------------------------------------------
    def agree_route(self) -> str:
        """Choose, with every rank, how CuPy arrays are summed: the first of NCCL, CUDA-aware MPI and host
        staging that works on every rank (all ranks' devices must be GPUs: checked before, in the run's
        agreement)."""
        if self.route is not None:
            return self.route
        usable = self.allgather_object(_nccl_module() is not None)
        if all(usable):
            ok = self._init_nccl()
            if all(self.allgather_object(ok)):
                self.route = "nccl"
                return self.route
            self._close_nccl()
        aware = self.allgather_object(mpi_cuda_aware())
        self.route = "cuda-aware-mpi" if all(aware) else "host"
        return self.route

    def _allreduce_device(self, a: Array) -> Array:
        route = self.agree_route()
        if route == "nccl":
            nccl = _nccl_module()
            kind = {numpy.dtype("float16"): "NCCL_FLOAT16", numpy.dtype("float32"): "NCCL_FLOAT32",
                    numpy.dtype("float64"): "NCCL_FLOAT64"}.get(numpy.dtype(a.dtype))
            if kind is None:
                raise ConfigError(f"NCCL sums float16/32/64 arrays here; got {a.dtype}")
            stream = self.device.xp.cuda.get_current_stream().ptr
            self._nccl.allReduce(a.data.ptr, a.data.ptr, a.size, getattr(nccl, kind), nccl.NCCL_SUM, stream)
            return a
        from mpi4py import MPI
        if route == "cuda-aware-mpi":
            self.device.synchronize()                    # MPI does not know CuPy's stream
            self._wait(self._comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM), "a sum of gradients")
            return a
        host = self._staged(a)                           # page-locked, made once per shape
        self._wait(self._comm.Iallreduce(MPI.IN_PLACE, host, op=MPI.SUM), "a sum of gradients")
        a.set(host)
        return a

    def _staged(self, a: Array) -> numpy.ndarray:
        """``a`` copied into this communicator's host buffer of its shape and dtype (allocated once)."""
        key = (a.shape, numpy.dtype(a.dtype).str)
        host = self._stage.get(key)
        if host is None:
            host = self._stage[key] = self.device.pinned_empty(a.shape, a.dtype)
        a.get(out=host)
        return host

    def _init_nccl(self) -> bool:
        nccl = _nccl_module()
        try:
            uid = self.bcast_object(nccl.get_unique_id() if self.rank == 0 else None)
            with self.device.activate():
                self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
            return True
        except Exception:
            self._nccl = None
            return False

    def _close_nccl(self) -> None:
        if self._nccl is not None:
            try:
                self._nccl.destroy()
            except Exception:
                pass
            self._nccl = None

    def __repr__(self) -> str:
        return (f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"device='{self.device}', route={self.route!r})")


def MPI_BYTE() -> Any:
    from mpi4py import MPI
    return MPI.BYTE


def _nccl_module() -> Any:
    """CuPy's NCCL binding when it is importable and says NCCL is available (CuPy 14 imports it with
    ``available = False`` where the NCCL library is missing), else None."""
    try:
        from cupy.cuda import nccl
    except Exception:
        return None
    return nccl if getattr(nccl, "available", True) else None


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


def _alone_device(device: str | Device | None) -> Device:
    """A single process's device: as asked, else GPUNN_DEVICE, else cuda:0 when usable (as 'auto'), else cpu."""
    if device is not None or os.environ.get("GPUNN_DEVICE"):
        return get_device(device)
    return get_device("cuda:0" if cuda_unavailable_reason(0) is None else "cpu")


def init(device: str | Device | None = None, timeout: float | None = None) -> Communicator:
    """The communicator of this job: MPI's COMM_WORLD when launched with several ranks, else one process.

    ``device`` overrides the choice of ``cuda:<local_rank>`` (when that GPU is usable) or ``cpu``;
    ``timeout`` (seconds) bounds every wait in a collective (default ``GPUNN_COLLECTIVE_TIMEOUT`` or 600).
    Raises :class:`~gpunn.errors.DistributedError` when a launcher started several ranks but MPI cannot
    join them (mpi4py missing, or built for another MPI than the launcher's).
    """
    expected, variable = launcher_size()
    try:
        from mpi4py import MPI
    except ImportError:
        if expected > 1:
            raise DistributedError(
                f"this process is one of {expected} ranks ({variable}={expected}) but mpi4py is not installed, so "
                "every rank would train alone and write the same files; pip install 'gpunn[mpi]'") from None
        return Communicator(None, _alone_device(device), timeout=timeout)
    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        if expected > 1:
            raise DistributedError(
                f"the launcher started {expected} ranks ({variable}={expected}) but MPI sees 1: mpi4py was built "
                "for another MPI than this mpiexec's; launch with the mpiexec of the environment mpi4py is "
                "installed in (pip install 'gpunn[mpi]' brings MPICH and its mpiexec)")
        return Communicator(None, _alone_device(device), timeout=timeout)
    _abort_on_uncaught(world)             # from here, an error on one rank ends the job, in init() too
    _all_arrive(world, _timeout(timeout))   # so the blocking calls below never wait for a missing rank
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    if device is None:
        device = f"cuda:{local_rank}" if cuda_unavailable_reason(local_rank) is None else "cpu"
    comm = Communicator(world, get_device(device), local_rank, local_size, timeout)
    atexit.register(comm.leave)           # a rank that exits tells the others, so none waits for it in vain
    threads.set_local_ranks(local_size)          # the BLAS thread policy divides the cores among them
    if comm.is_root:
        print(f"gpunn: {comm.size} ranks, {local_size} on this node; BLAS threads per rank: {threads.summary()}",
              file=sys.stderr, flush=True)
    return comm


def _abort_on_uncaught(world: Any) -> None:
    """An uncaught exception on one rank ends the whole job (the others would wait in a collective)."""
    previous = sys.excepthook

    def hook(kind: Any, value: Any, tb: Any) -> None:
        previous(kind, value, tb)
        sys.stderr.flush()
        world.Abort(1)
    sys.excepthook = hook


def _all_arrive(world: Any, limit: float) -> None:
    """Wait, at most ``limit`` seconds, until every rank is in :func:`init`; else end the job, saying so."""
    request, start = world.Ibarrier(), time.monotonic()
    while not request.Test():
        if time.monotonic() - start > limit:
            print(f"gpunn: rank {world.Get_rank()}: the other ranks did not reach gpunn.distributed.init() within "
                  f"{limit:g} s (GPUNN_COLLECTIVE_TIMEOUT); ending the job", file=sys.stderr, flush=True)
            world.Abort(1)
        time.sleep(0.001)


def check(comm: Any) -> Communicator | None:
    """``comm`` when it is a Communicator or None; ConfigError otherwise."""
    if comm is not None and not isinstance(comm, Communicator):
        raise ConfigError(f"comm must be a gpunn.distributed.Communicator (from gpunn.distributed.init()); got "
                          f"{comm!r}")
    return comm
