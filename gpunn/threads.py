"""How many BLAS threads gpunn's own CPU work runs with: a policy, applied once per change.

On a small CPU a second BLAS thread pays only for large batches, and costs a great deal when another
process holds a core: an OpenBLAS call waits for its slowest thread, so a step with 2 threads on a
2-core machine with one busy core was measured 3–62× slower than on a quiet one (CPU-NOTES). gpunn
therefore chooses the threads itself, before every step, from

1. the user's BLAS settings: ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set in
   the environment win, and gpunn never touches the threads;
2. the user's explicit choice: :func:`set_threads` (``gpunn bench --threads``), else the environment
   variable ``GPUNN_THREADS`` — a number, ``auto`` (the default), ``steady`` or ``off`` (leave the threads
   alone);
3. otherwise (``auto``): 1 thread for steps whose largest matrix product is below :data:`MIN_WORK`
   multiply-adds (batch rows × the widest layer's weights: more threads cannot pay there); above,
   the cores this process may use (its CPU affinity and its cgroup's CPU quota) divided among the MPI
   ranks on this machine (:func:`set_local_ranks`, else the launcher's environment), less the cores that
   other processes kept busy during the last :data:`LOOK_EVERY` seconds. ``steady`` is the same rule
   without that last term.

OpenBLAS's GEMM results differ in the last bits between thread counts (it blocks the sums differently).
Below :data:`MIN_WORK` every mode but a fixed number gives one thread, so results do not depend on
the machine's load; above it, ``auto`` follows the load and a run's last bits may differ between a quiet
and a busy machine: ``steady`` or a number make them depend on the machine and batch size only.

The choice is applied through threadpoolctl's ``ThreadpoolController`` (made once; a switch costs
~8 µs) and kept: nothing is done while it does not change. Per step the cost is one comparison (and,
for steps of :data:`MIN_WORK` or more, one clock read); below :data:`MIN_WORK` the caller may make
that comparison itself (:attr:`ThreadPolicy.settled`) and skip the call.
"""
from __future__ import annotations

import math
import os
import re
import threading
import time
from typing import Any

from .errors import ConfigError

__all__ = ["MIN_WORK", "LOOK_EVERY", "USER_BLAS_VARIABLES", "apply", "set_threads", "set_local_ranks",
           "local_ranks", "usable_cores", "current", "describe", "summary", "choose", "policy"]

#: Steps whose largest matrix product has fewer multiply-adds run on one BLAS thread. A second thread
#: pays from about here on a quiet 2-core machine (bench/results/2026-12-01-cpu-threads-by-work.md);
#: on a busy one the load term of the rule takes it away again (it lost up to 62× there, CPU-NOTES).
MIN_WORK = 8_000_000
#: Seconds between two looks at how busy the other processes keep this process's cores.
LOOK_EVERY = 0.5
#: Cores that other processes keep busy count from this fraction of a core up.
BUSY_MARGIN = 0.25
#: The most BLAS threads a setting may ask for: the largest C int, the type in which threadpoolctl hands
#: the count to the BLAS library (a larger one wraps around there: 2**32 + 3 became 3 threads, and from
#: 2**64 ctypes raises OverflowError). Up to it the count is passed on, and the library caps it at its own
#: build's maximum (NumPy's OpenBLAS here: 64); a count beyond the machine's cores is the user's to ask for.
MAX_THREADS = 2**31 - 1
#: Environment variables by which a user sets BLAS threads; any of them set: gpunn leaves threads alone.
USER_BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Environment variables by which MPI launchers tell a rank how many ranks share its machine.
LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")

_COUNT = re.compile(r"[0-9]{1,18}")


def read_count(text: str) -> int | None:
    """A positive count written as ASCII decimal digits (as the kernel's cgroup files and the MPI launchers
    write them), else None: signs, NaN, inf, exponents, other scripts' digits (``²``, ``٣``), empty text and
    more than 18 digits (no count of cores, microseconds or ranks has as many) are no count."""
    text = text.strip()
    if not _COUNT.fullmatch(text) or int(text) < 1:
        return None
    return int(text)


def parse_setting(value: Any, where: str) -> int | str:
    """A thread setting as ``"auto"``, ``"steady"``, ``"off"`` or an int from 1 to :data:`MAX_THREADS`;
    ConfigError otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "auto"):
            return "auto"
        if text in ("off", "none", "system"):
            return "off"
        if text == "steady":
            return "steady"
        value = text
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):     # OverflowError: an infinite float
        n = 0
    if isinstance(value, bool) or n < 1 or str(n) != str(value).strip():
        raise ConfigError(f"{where} must be a positive number of threads, 'auto', 'steady' or 'off'; got {value!r}")
    if n > MAX_THREADS:
        raise ConfigError(f"{where} must be at most {MAX_THREADS} threads (what a BLAS library takes); got {value!r}")
    return n


def user_blas_setting(environ: Any = None) -> str | None:
    """``NAME=value`` of the first BLAS thread variable the user set, or None."""
    env = os.environ if environ is None else environ
    for name in USER_BLAS_VARIABLES:
        if env.get(name, "").strip():
            return f"{name}={env[name].strip()}"
    return None


def cgroup_quota(proc_path: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``),
    the smallest along the path to the root; None when there is none. A quota or period that is not a
    positive decimal count (:func:`read_count`) is no quota, and so are lines of ``proc_path`` that are not
    ``hierarchy:controllers:path`` with a path below ``root``."""
    quotas = []
    try:     # bytes to text as the file system names them, so that a path read back opens the same files
        with open(proc_path, "rb") as fh:
            lines = os.fsdecode(fh.read()).split("\n")
    except OSError:
        return None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3 or "\0" in fields[2] or ".." in fields[2].split("/"):
            continue         # not hierarchy:controllers:path below the cgroup root: unknown
        _, controllers, path = fields
        if controllers == "":
            quotas += _quotas(root, path, "cpu.max", None)
        elif "cpu" in controllers.split(","):
            quotas += _quotas(os.path.join(root, "cpu"), path, "cpu.cfs_quota_us", "cpu.cfs_period_us")
    return min(quotas) if quotas else None


def _quotas(root: str, path: str, quota_file: str, period_file: str | None) -> list[float]:
    found = []
    parts = [p for p in path.split("/") if p]
    for k in range(len(parts), -1, -1):
        where = os.path.join(root, *parts[:k])
        try:     # undecodable bytes become U+FFFD, which no count has
            with open(os.path.join(where, quota_file), encoding="ascii", errors="replace") as fh:
                fields = fh.read().split()
            if period_file is not None:
                with open(os.path.join(where, period_file), encoding="ascii", errors="replace") as fh:
                    fields.append(fh.read().strip())
        except OSError:
            continue
        if len(fields) == 2:        # quota and period; "max" or "-1" (no quota) is no count
            quota, period = read_count(fields[0]), read_count(fields[1])
            if quota is not None and period is not None:
                found.append(quota / period)
    return found


def affinity() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # pragma: no cover - not Linux
        return set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by its cgroup's quota (rounded up)."""
    n = len(affinity())
    quota = cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def choose(work: int, cores: int, ranks: int = 1, others_busy: float = 0.0, setting: int | str = "auto",
           user_blas: str | None = None) -> int | None:
    """The BLAS threads for a step whose largest matrix product is ``work`` multiply-adds (None: leave the
    threads as they are).

    ``cores``: usable cores; ``ranks``: processes of this job on the machine; ``others_busy``: cores
    other processes kept busy lately (ignored by ``"steady"``); ``setting``: the user's (``"auto"``,
    ``"steady"``, ``"off"`` or a number);
    ``user_blas``: a BLAS thread variable the user set (it wins).
    """
    if user_blas is not None or setting == "off":
        return None
    if isinstance(setting, int):
        return setting
    if work < MIN_WORK:
        return 1
    share = max(1, cores // max(1, ranks))
    if setting == "steady":
        return share
    free = cores - max(0, math.ceil(others_busy - BUSY_MARGIN))
    return max(1, min(share, free))


class LoadMeter:
    """How many of this process's CPUs other processes kept busy between two looks: the busy time of
    those CPUs in ``/proc/stat`` less this process's own CPU time (its BLAS workers' spinning included)."""

    def __init__(self, cpus: set[int], stat_path: str = "/proc/stat", clock: Any = time.monotonic,
                 cpu_clock: Any = time.process_time):
        self.cpus = {f"cpu{c}" for c in cpus}
        self.stat_path = stat_path
        self.clock, self.cpu_clock = clock, cpu_clock
        self.tick = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
        self.last: tuple[float, float, float] | None = None

    def sample(self) -> tuple[float, float, float] | None:
        """(wall seconds, busy CPU seconds of our CPUs, our own CPU seconds), or None without /proc/stat."""
        busy = 0.0
        try:
            with open(self.stat_path) as fh:
                for line in fh:
                    fields = line.split()
                    if fields and fields[0] in self.cpus:
                        ticks = [int(v) for v in fields[1:9]]
                        busy += sum(ticks) - ticks[3] - ticks[4]          # all but idle and iowait
        except (OSError, ValueError, IndexError, OverflowError):    # unreadable, short or absurd lines
            return None
        return self.clock(), busy * self.tick, self.cpu_clock()

    def others_busy(self) -> float | None:
        """Cores others kept busy since the previous call (None at the first call, or without /proc): from
        0 to the number of this process's CPUs, however far the counters jump between two looks."""
        now = self.sample()
        last, self.last = self.last, now
        if now is None or last is None or now[0] - last[0] < 1e-3:
            return None
        wall = now[0] - last[0]
        return min(float(len(self.cpus)), max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / wall))


class ThreadPolicy:
    """The process's thread choice: what the user set, what was applied, when to look again. Steps may
    run in several threads: one chooses and applies at a time, under :attr:`lock`."""

    def __init__(self) -> None:
        self.work: int | None = None       # work of the step the choice was made for (None: choose again)
        #: the work (below MIN_WORK) for which the choice stands until the policy changes (set_threads,
        #: set_local_ranks): :meth:`apply` of exactly this work does nothing, and a caller may skip it
        self.settled: int | None = None
        self.applied: int | None = None    # threads last set through the controller
        self.setting: int | str | None = None      # set_threads(); None: GPUNN_THREADS decides
        self.ranks: int | None = None              # set_local_ranks(); None: the launcher's environment
        self.next_look = 0.0
        self.meter: LoadMeter | None = None
        self.controller: Any = None
        self.release: Any = None        # threadpoolctl's OpenBLASController.clear_controlling_thread, if any
        self.error: str | None = None
        #: held while one thread chooses and applies, or changes what the choice depends on
        self.lock = threading.RLock()

    def user_setting(self) -> int | str:
        if self.setting is not None:
            return self.setting
        return parse_setting(os.environ.get("GPUNN_THREADS", "auto"), "GPUNN_THREADS")

    def local_ranks(self) -> int:
        if self.ranks is not None:
            return self.ranks
        for name in LOCAL_RANK_VARIABLES:      # a value that is no count (read_count): the next variable
            n = read_count(os.environ.get(name, ""))
            if n is not None:
                return n
        return 1

    def apply(self, work: int) -> None:
        """Make the BLAS threads this policy's choice for a step whose largest product is ``work``
        multiply-adds."""
        if work == self.work and (work < MIN_WORK or time.monotonic() < self.next_look):
            return
        with self.lock:     # steps in several threads: one chooses at a time, and no change is lost meanwhile
            if work == self.work and (work < MIN_WORK or time.monotonic() < self.next_look):
                return      # another thread chose for this work while this one waited
            setting, user_blas = self.user_setting(), user_blas_setting()   # a bad GPUNN_THREADS raises at every step
            self.work = work
            self.settled = work if work < MIN_WORK else None     # below MIN_WORK nothing else counts
            self.next_look = time.monotonic() + LOOK_EVERY
            busy = 0.0
            if work >= MIN_WORK and setting == "auto" and user_blas is None:
                if self.meter is None:
                    self.meter = LoadMeter(affinity())
                busy = self.meter.others_busy() or 0.0
            cores = usable_cores() if work >= MIN_WORK else 1       # below MIN_WORK the cores do not count
            n = choose(work, cores, self.local_ranks(), busy, setting, user_blas)
            if n is not None and n != self.applied:
                self.set_blas_threads(n)

    def set_blas_threads(self, n: int) -> None:
        """Set every BLAS library's threads to ``n`` (the controller is made at the first switch), from
        whichever thread runs the step. threadpoolctl (3.8) lets only one thread set the threads of a
        process-wide pool (OpenBLAS on pthreads): the first to set them, until it ends; others it ignores
        without a word. So a switch takes that role, overriding a ``threadpool_limits`` another thread
        holds as it overrides one in its own thread, and gives it up after."""
        try:
            if self.controller is None:
                import threadpoolctl
                self.controller = threadpoolctl.ThreadpoolController()
                self.release = getattr(getattr(threadpoolctl, "OpenBLASController", None),
                                       "clear_controlling_thread", None)
            if self.release is not None:
                self.release(force=True)
            try:
                self.controller.limit(limits=n, user_api="blas")
            finally:
                if self.release is not None:
                    self.release()
            self.applied = n
        except Exception as exc:   # threadpoolctl missing or refusing: run on with the threads as they are
            self.error = f"{type(exc).__name__}: {exc}"
            self.next_look = math.inf

    def invalidate(self) -> None:
        """Choose again at the next :meth:`apply` (the user's setting or the ranks changed)."""
        with self.lock:
            self.work = self.settled = None


_POLICY = ThreadPolicy()


def policy() -> ThreadPolicy:
    """The process's one policy object."""
    return _POLICY


def apply(work: int) -> None:
    """Apply the thread choice for a step whose largest matrix product is ``work`` multiply-adds (what
    :meth:`gpunn.ops.XpOps.begin_step` calls)."""
    _POLICY.apply(work)


def set_threads(n: int | str | None) -> None:
    """Set the BLAS threads of gpunn's steps: a number (1 to :data:`MAX_THREADS`), ``"auto"`` (the
    policy), ``"steady"`` (the policy without the machine's load), ``"off"`` (leave them alone) or None
    (back to ``GPUNN_THREADS``). BLAS thread variables set in the environment still win."""
    setting = None if n is None else parse_setting(n, "threads")
    with _POLICY.lock:      # not while another thread is choosing with the old setting
        _POLICY.setting = setting
        _POLICY.invalidate()


def set_local_ranks(n: int | None) -> None:
    """Tell the policy how many processes of this job share the machine (MPI ranks on this node); None:
    read the launcher's environment again."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"local ranks must be a positive integer; got {n!r}")
    with _POLICY.lock:
        _POLICY.ranks = n
        _POLICY.invalidate()


def local_ranks() -> int:
    """Processes of this job on this machine, as the policy counts them."""
    return _POLICY.local_ranks()


def current() -> int | None:
    """The BLAS threads gpunn last set (None: it has not set any)."""
    return _POLICY.applied


def describe() -> dict:
    """What the policy sees and chose, for ``gpunn info`` and benchmark records."""
    user_blas = user_blas_setting()
    try:
        setting: int | str = _POLICY.user_setting()
    except ConfigError as exc:
        setting = f"invalid: {exc}"
    cores, quota = usable_cores(), cgroup_quota()
    return {"mode": "user BLAS variable" if user_blas else setting if isinstance(setting, str) else "fixed",
            "user_blas": user_blas, "setting": setting, "usable_cores": cores, "affinity": len(affinity()),
            "cgroup_quota": quota, "local_ranks": _POLICY.local_ranks(), "min_work": MIN_WORK,
            "applied": _POLICY.applied, "error": _POLICY.error}


def summary(info: dict | None = None) -> str:
    """One line saying how gpunn chooses BLAS threads here."""
    d = describe() if info is None else info
    if d["user_blas"]:
        text = f"left alone ({d['user_blas']} is set)"
    elif d["setting"] == "off":
        text = "left alone (GPUNN_THREADS=off)"
    elif isinstance(d["setting"], int):
        text = f"{d['setting']} (set by the user)"
    elif d["setting"] in ("auto", "steady"):
        share = max(1, d["usable_cores"] // d["local_ranks"])
        busy = " less the cores others keep busy" if d["setting"] == "auto" else ""
        text = (f"{d['setting']}: 1 below {d['min_work']:,} multiply-adds per product, "
                f"else {'up to ' if busy else ''}{share}{busy} "
                f"({d['usable_cores']} usable: affinity {d['affinity']}, cgroup quota "
                f"{'none' if d['cgroup_quota'] is None else format(d['cgroup_quota'], 'g')}; "
                f"{d['local_ranks']} local rank{'s' if d['local_ranks'] != 1 else ''})")
    else:
        text = str(d["setting"])
    if d["applied"] is not None:
        text += f"; last set: {d['applied']}"
    if d["error"]:
        text += f"; not applied: {d['error']}"
    return text
