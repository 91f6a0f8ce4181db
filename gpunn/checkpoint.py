"""Checkpoints of a :meth:`gpunn.Sequential.fit` run: everything needed to continue after a crash.

After every finished epoch ``fit(..., checkpoint=PATH)`` writes, atomically (:func:`gpunn.io.atomic_write`):
the parameters, the optimiser's state (momentum or moments, step count), the shuffling generator's
state, the history, the early-stopping state, the number of finished epochs, and the run's
configuration (architecture, dtype, loss, optimiser, batch size, shuffling, patience, and SHA-256
fingerprints of the training and validation data). Called again with the same PATH, ``fit`` resumes
from there: the final model is bitwise identical to an uninterrupted run's. A checkpoint of another
configuration is refused with a ConfigError naming what differs; ``epochs`` may differ (train longer).

A checkpoint also holds the start of its last epoch (parameters, optimiser state, shuffling state), so a
resumed run that diverges at its first step rolls back exactly as the uninterrupted run would. The
history is a log (:class:`HistoryLog`) kept in a file beside the checkpoint (``PATH.history``), to which each
epoch appends its record as one line of JSON: an epoch's checkpoint costs the same at epoch 10 and at epoch
100,000, whatever the records hold, and every record reads back exactly as it was recorded. The checkpoint's
header holds the number of records, their bytes and a SHA-256 chained over them, so the history read back
is exactly the one written (bytes a crash appended after the last checkpoint are ignored, then
overwritten). Every field read back
is checked (sizes against the run's
network, types, ranges): a checkpoint edited with its SHA-256 recomputed is a ModelFileError, never a
broadcast, a silent zero or a raw exception.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import stat
from dataclasses import dataclass
from typing import Any

import numpy

from . import io, losses, optim
from .backend import to_host
from .errors import ConfigError, ModelFileError, SaveError
from .registry import json_data
from .scalars import shown
from .types import Array

__all__ = ["FORMAT", "VERSION", "Checkpoint", "EpochStart", "HistoryLog", "fingerprint", "history_path", "line_chain",
           "run_config"]

FORMAT = "gpunn-checkpoint"
#: The checkpoint layout (4: the history appended to PATH.history as a line of JSON per epoch, the last epoch's
#: start kept); other layouts are refused.
VERSION = 4


def history_path(path: Any) -> str:
    """The file beside the checkpoint ``path`` that holds its history records: ``PATH.history``, or, where that
    name would pass the file system's 255 bytes, the name cut and a SHA-256 of it in its place."""
    folder, name = os.path.split(os.fsdecode(os.fspath(path)))
    side = name + ".history"
    if len(os.fsencode(side)) > 255:
        raw = os.fsencode(name)
        side = (raw[:200].decode("utf-8", "ignore") + "." + hashlib.sha256(raw).hexdigest()[:16] + ".history")
    return os.path.join(folder, side)


def fingerprint(*arrays: Array | None) -> str:
    """SHA-256 of arrays' dtypes, shapes and bytes: identifies a data set. Read in chunks of rows, so a
    memmapped set is hashed without being held in memory."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        h.update(f"{a.dtype.str}{tuple(a.shape)}".encode())
        rows = max(1, (1 << 24) // max(1, a[:1].nbytes)) if a.ndim else 1
        for s in range(0, max(len(a), 1) if a.ndim else 1, rows):
            h.update(numpy.ascontiguousarray(to_host(a[s:s + rows] if a.ndim else a)).tobytes())
    return h.hexdigest()


def run_config(net: Any, loss: Any, optimizer: Any, batch_size: int, shuffle: bool, patience: int | None,
               data: tuple, validation: tuple | None) -> dict:
    """What must be equal for a checkpoint to continue this run, as the checkpoint stores it (JSON data).
    SaveError now, before any training, if the optimiser (or its schedule) would not load back
    (:mod:`gpunn.registry`)."""
    return {"network": json_data(net.config(), "the network"), "loss": losses.portable(loss),
            "optimizer": optim.portable_config(optimizer),
            "batch_size": batch_size,
            "shuffle": bool(shuffle), "patience": patience, "data": fingerprint(*data),
            "validation_data": fingerprint(*validation) if validation is not None else None}



class HistoryLog:
    """The epoch records as a checkpoint writes them: one line of JSON per epoch, appended to the file beside
    the checkpoint (``PATH.history``), so an epoch's save costs that epoch's record whatever came before.

    A record reads back as it was recorded: JSON keeps integers (up to 4,300 digits, Python's default limit),
    floats to the bit (NaN and infinity too), text, None, and which fields each record has. NumPy numbers are
    kept as Python's (bool, int, float), anything else a callback put in a record (and a longer integer) as its
    ``repr``, field names as text.
    """

    def __init__(self, lines: list[bytes] | None = None) -> None:
        self.lines: list[bytes] = list(lines or [])
        #: (file, records, bytes, digest, (device, inode)) written there last
        self.synced: tuple[str, int, int, str, tuple[int, int] | None] | None = None

    @property
    def n(self) -> int:
        return len(self.lines)

    def append(self, record: dict) -> None:
        line = json.dumps({str(k): _plain(v) for k, v in record.items()}, separators=(",", ":"))
        self.lines.append(line.encode("ascii") + b"\n")        # ensure_ascii: no newline inside a line

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]

    def sync(self, path: str) -> dict:
        """Make the file ``path`` hold exactly these records: append the lines since the last sync (cost
        independent of the records before), or write it whole when it is new to this log. Returns what the
        checkpoint's header records of it: records, bytes and the SHA-256 chain over the lines."""
        last = self.synced
        fd = self._open_synced(path)
        if fd is not None:
            start, size, digest = last[1], last[2], last[3]         # type: ignore[index]
            data = b"".join(self.lines[start:])
            try:
                os.lseek(fd, size, os.SEEK_SET)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.ftruncate(fd, size + len(data))      # lines a crash left after the last checkpoint
                os.fsync(fd)
            except OSError as exc:      # the checkpoint is not written: its last one still reads back
                raise SaveError(f"cannot save the checkpoint's history to {path}: {exc.strerror or exc}; "
                                "the last checkpoint written is kept") from None
            finally:
                os.close(fd)
        else:
            start, size, digest = 0, 0, ""
            data = b"".join(self.lines)
            io.atomic_write(path, lambda fh: fh.write(data))
        digest = line_chain(digest, self.lines[start:])
        self.synced = (path, self.n, size + len(data), digest, last[4] if fd is not None else _identity(path))  # type: ignore[index]
        return {"records": self.n, "bytes": size + len(data), "sha256": digest}

    def _open_synced(self, path: str) -> int | None:
        """A descriptor for appending to ``path`` where it is still the very file the last sync left (the same
        regular file, not shorter), else None: the log is then written whole (a file deleted, replaced or cut
        since, by a callback or another process, is never appended to)."""
        last = self.synced
        if last is None or last[0] != path:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:                 # gone, a FIFO without a reader, no permission: written whole (or SaveError)
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < last[2] or (st.st_dev, st.st_ino) != last[4]:
            os.close(fd)
            return None
        return fd

    @classmethod
    def read(cls, path: str, info: Any, epochs: int, shown: str) -> HistoryLog:
        """The ``epochs`` records the checkpoint's header ``info`` describes, read from ``path`` and checked
        against its SHA-256 chain and the epochs 1..``epochs`` (ModelFileError otherwise); bytes after them
        (a crash's) are ignored. The log continues appending after them."""
        ok = isinstance(info, dict) and all(isinstance(info.get(k), int) and not isinstance(info.get(k), bool)
                                            and info[k] >= 0 for k in ("records", "bytes")) \
            and isinstance(info.get("sha256"), str) and info["records"] == epochs
        if not ok:
            raise ModelFileError(f"{shown}: the history's description is malformed or does not describe {epochs} "
                                 "epoch(s); the checkpoint is corrupt or was edited")
        size = info["bytes"]
        with io.open_regular(path, ModelFileError, "checkpoint history file") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size < size:
                raise ModelFileError(f"{path} holds fewer history records than its checkpoint {shown} recorded; "
                                     "it was truncated or replaced: delete both to start afresh")
            data = fh.read(size)
        count = data.count(b"\n")
        if count != epochs or (epochs and not data.endswith(b"\n")):       # before any split or hash
            raise ModelFileError(f"{shown}: the history holds {count} line(s) for {epochs} epoch(s); the checkpoint "
                                 "is corrupt or was edited")
        lines = [line + b"\n" for line in data.split(b"\n")[:-1]]          # as appended: split at \n only
        if line_chain("", lines) != info["sha256"]:
            raise ModelFileError(f"{path} is not the history its checkpoint {shown} recorded (SHA-256 differs); "
                                 "it was edited or replaced: delete both to start afresh")
        try:
            records = [json.loads(line) for line in lines]
        except (ValueError, RecursionError):        # not JSON, an integer past Python's digit limit, deep nesting
            records = []
        if len(records) != epochs or any(not isinstance(r, dict) or r.get("epoch") != k + 1
                                         or type(r.get("epoch")) is not int
                                         or not all(v is None or isinstance(v, (bool, int, float, str))
                                                    for v in r.values()) for k, r in enumerate(records)):
            raise ModelFileError(f"{shown}: the history's records are not those of epochs 1..{epochs} (each a "
                                 "JSON object of numbers, text, true/false or null); the checkpoint is corrupt "
                                 "or was edited")
        log = cls(lines)
        log.synced = (path, epochs, size, info["sha256"], (st.st_dev, st.st_ino))
        return log


def line_chain(digest: str, lines: list[bytes]) -> str:
    """The SHA-256 chain ``digest`` continued over each of ``lines`` (a history record's bytes)."""
    for line in lines:
        digest = hashlib.sha256(digest.encode() + line).hexdigest()
    return digest


#: The smallest integer of more than 4,300 digits (Python's default int <-> text limit)
_MAX_JSON_INT = 10 ** 4300


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path`` (None where it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _plain(value: Any) -> Any:
    """A record's value as JSON keeps it exactly: None, bool, int, float (NaN, ±inf) and text as they are (NumPy's
    as Python's), anything else as its repr."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, numpy.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):     # a broken __int__
            return shown(value)
        # past 4,300 digits, Python's default limit for int <-> text: unreadable where that limit holds, even if
        # this process has lifted it (PYTHONINTMAXSTRDIGITS=0)
        return shown(number) if abs(number) >= _MAX_JSON_INT else number
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except (OverflowError, ValueError, TypeError):
            return shown(value)
    try:
        return repr(value)
    except Exception:               # a broken __repr__
        return shown(value)


@dataclass
class EpochStart:
    """What an epoch started from, on the host: parameters, optimiser state (steps, arrays) and the state of
    the shuffling generator before the epoch's order was drawn (None without shuffling)."""

    params: numpy.ndarray
    optimizer_t: int
    optimizer_state: dict[str, numpy.ndarray]
    shuffle_rng: dict | None


@dataclass
class Checkpoint:
    """The state of a fit after ``epoch`` finished epochs, and the start of the last of them."""

    config: dict
    epoch: int
    params: numpy.ndarray
    optimizer_t: int
    optimizer_state: dict[str, numpy.ndarray]
    shuffle_rng: dict
    history: HistoryLog
    stopped_early: bool
    best: dict                      # early stopping: {"loss", "epoch", "bad"} and best weights below
    best_weights: numpy.ndarray | None
    last_start: EpochStart | None = None

    def save(self, path: Any) -> None:
        arrays = {"params": self.params, **{f"optimizer_{k}": v for k, v in self.optimizer_state.items()}}
        if self.best_weights is not None:
            arrays["best_weights"] = self.best_weights
        header = {"dtype": self.params.dtype.name, "config": self.config, "epoch": self.epoch,
                  "checkpoint_version": VERSION, "optimizer_t": self.optimizer_t, "shuffle_rng": self.shuffle_rng,
                  "history": {"file": self.history.sync(history_path(path))},
                  "stopped_early": self.stopped_early, "best": self.best}
        if self.last_start is not None:
            s = self.last_start
            arrays["last_params"] = s.params
            arrays.update({f"last_optimizer_{k}": v for k, v in s.optimizer_state.items()})
            header["last_start"] = {"optimizer_t": s.optimizer_t, "shuffle_rng": s.shuffle_rng}
        io.write_archive(path, FORMAT, header, arrays, nonfinite=_NONFINITE)

    @classmethod
    def load(cls, path: Any, config: dict, state_names: tuple[str, ...]) -> Checkpoint | None:
        """The checkpoint at ``path`` (None if there is none), refused unless it was made by ``config`` (whose
        optimiser keeps the state arrays ``state_names``), and checked field by field (ModelFileError)."""
        if not os.path.exists(os.fspath(path)):     # a dangling symbolic link too: saves write through links,
            return None                             # so the first save creates its target
        optional = {"best_weights", "last_params"} | {f"{p}optimizer_{k}" for p in ("", "last_")
                                                        for k in ("velocity", "m", "v")}
        header, arrays = io.read_archive(path, FORMAT, {"params"}, optional, what="gpunn checkpoint",
                                         nonfinite=_NONFINITE)
        saved = header.get("config")
        if saved != config:
            differs = sorted(k for k in set(config) | set(saved if isinstance(saved, dict) else {})
                             if (saved if isinstance(saved, dict) else {}).get(k) != config.get(k))
            raise ConfigError(f"the checkpoint {path} was made by another run (different {', '.join(differs)}); "
                              "use another checkpoint path, delete it, or run with the same settings and data")
        if header.get("checkpoint_version") != VERSION or not isinstance(header.get("history"), dict):
            raise ModelFileError(f"{path} is a checkpoint of another layout (version "
                                 f"{header.get('checkpoint_version')!r}, this gpunn writes {VERSION}); delete it "
                                 "(and its .history file) to start afresh")
        epoch = _Reader(str(path), header, arrays, 0, ()).count(header.get("epoch"), "epoch")
        history = HistoryLog.read(history_path(path), header["history"].get("file"), epoch, str(path))
        return _Reader(str(path), header, arrays, _n_parameters(config), state_names).checkpoint(config, history)


#: Arrays a checkpoint may hold NaN/inf in: optimiser state (Adam's v can overflow while the weights stay
#: finite; the run resumes with it exactly as it would have continued).
_NONFINITE = frozenset(f"{p}optimizer_{k}" for p in ("", "last_") for k in ("velocity", "m", "v"))


def _n_parameters(config: dict) -> int:
    return sum(c["n_in"] * c["n_out"] + c["n_out"] for c in config["network"]["layers"])


class _Reader:
    """Checks every field of a checkpoint against the run it continues (ModelFileError naming the field)."""

    def __init__(self, shown: str, header: dict, arrays: dict[str, numpy.ndarray], n: int, names: tuple[str, ...]):
        self.shown, self.header, self.arrays, self.n, self.names = shown, header, arrays, n, names

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.shown}: {what}; the checkpoint is corrupt or was edited (delete it to start "
                              "the run over)")

    def count(self, value: Any, name: str, low: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(f"{name} is {str(value)[:40]!r}, not an integer >= {low}")
        return value

    def vector(self, name: str) -> numpy.ndarray:
        a = self.arrays[name]
        if a.shape != (self.n,):
            raise self.fail(f"{name} holds {a.size} values; the network has {self.n} parameters")
        return a

    def state(self, prefix: str, t: int) -> dict[str, numpy.ndarray]:
        """The optimiser arrays ``prefix + optimizer_*``: all of the optimiser's, or none before its first step."""
        found = {k.removeprefix(f"{prefix}optimizer_") for k in self.arrays if k.startswith(f"{prefix}optimizer_")}
        if found != set(self.names) and (found or t > 0):
            raise self.fail(f"the optimiser state has {sorted(found)}; this run's optimiser keeps "
                            f"{sorted(self.names)}")
        return {k: self.vector(f"{prefix}optimizer_{k}") for k in sorted(found)}

    def rng(self, state: Any, name: str) -> dict:
        try:
            numpy.random.PCG64().state = state
        except (TypeError, ValueError, KeyError, OverflowError, AttributeError):
            raise self.fail(f"{name} is not a state of the shuffling generator (PCG64)") from None
        return state

    def best(self, epoch: int) -> tuple[dict, numpy.ndarray | None]:
        best = self.header.get("best")
        if not isinstance(best, dict) or set(best) != {"loss", "epoch", "bad"}:
            raise self.fail("best (the early-stopping state) is not {loss, epoch, bad}")
        loss, at = best["loss"], best["epoch"]
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))
                                 or not math.isfinite(loss)):
            raise self.fail(f"best loss is {str(loss)[:40]!r}")
        if at is not None and self.count(at, "best epoch", 1) > epoch:
            raise self.fail(f"the best epoch {at} is after the {epoch} finished")
        self.count(best["bad"], "best bad-epoch count")
        weights = self.arrays.get("best_weights")
        if (weights is None) != (at is None):
            raise self.fail("best weights and the best epoch must come together")
        return best, None if weights is None else self.vector("best_weights")

    def last_start(self, epoch: int) -> EpochStart | None:
        last = self.header.get("last_start")
        if last is None and "last_params" not in self.arrays and epoch == 0:
            return None
        if (not isinstance(last, dict) or set(last) != {"optimizer_t", "shuffle_rng"}
                or "last_params" not in self.arrays):
            raise self.fail("the start of the last epoch (last_start, last_params) is missing or malformed")
        t = self.count(last["optimizer_t"], "last_start optimizer_t")
        rng = None if last["shuffle_rng"] is None else self.rng(last["shuffle_rng"], "last_start shuffle_rng")
        return EpochStart(self.vector("last_params"), t, self.state("last_", t), rng)

    def checkpoint(self, config: dict, history: HistoryLog) -> Checkpoint:
        h = self.header
        if h.get("checkpoint_version") != VERSION:
            raise ModelFileError(f"{self.shown} is a checkpoint of layout {str(h.get('checkpoint_version'))[:20]}; "
                                 f"this gpunn resumes layout {VERSION} only: delete it to start the run over")
        if h.get("dtype") != config["network"]["dtype"]:
            raise self.fail(f"its arrays are {str(h.get('dtype'))[:20]}; the network is {config['network']['dtype']}")
        epoch = self.count(h.get("epoch"), "epoch")
        t = self.count(h.get("optimizer_t"), "optimizer_t")
        if not isinstance(h.get("stopped_early"), bool):
            raise self.fail(f"stopped_early is {str(h.get('stopped_early'))[:40]!r}, not true or false")
        best, weights = self.best(epoch)
        return Checkpoint(config, epoch, self.vector("params"), t, self.state("", t),
                          self.rng(h.get("shuffle_rng"), "shuffle_rng"), history, h["stopped_early"], best, weights,
                          self.last_start(epoch))
