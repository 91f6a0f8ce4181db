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
history is a float64 table (:class:`HistoryTable`), not JSON, kept in a file beside the checkpoint
(``PATH.history``) to which each epoch appends its row: an epoch's checkpoint costs the same at epoch 10
and at epoch 100,000 (the table is rewritten only when a new field appears). The checkpoint's header holds
the number of rows and a SHA-256 chained over them, so the history read back is exactly the one written
(rows a crash appended after the last checkpoint are ignored, then overwritten). Every field read back
is checked (sizes against the run's
network, types, ranges): a checkpoint edited with its SHA-256 recomputed is a ModelFileError, never a
broadcast, a silent zero or a raw exception.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy

from . import io, losses, optim
from .backend import to_host
from .errors import ConfigError, ModelFileError
from .registry import json_data
from .types import Array

__all__ = ["FORMAT", "VERSION", "Checkpoint", "EpochStart", "HistoryTable", "fingerprint", "history_path", "row_chain",
           "run_config"]

FORMAT = "gpunn-checkpoint"
#: The checkpoint layout (3: the history appended to PATH.history, the last epoch's start kept); other
#: layouts are refused.
VERSION = 3


def history_path(path: Any) -> str:
    """The file beside the checkpoint ``path`` that holds its history rows: ``PATH.history``, or, where that
    name would pass the file system's 255 bytes, the name cut and a SHA-256 of it in its place."""
    folder, name = os.path.split(os.fsdecode(os.fspath(path)))
    side = name + ".history"
    if len(os.fsencode(side)) > 255:
        raw = os.fsencode(name)
        side = (raw[:200].decode("utf-8", "ignore") + "." + hashlib.sha256(raw).hexdigest()[:16] + ".history")
    return os.path.join(folder, side)


def row_chain(digest: str, rows: numpy.ndarray) -> str:
    """The SHA-256 chain ``digest`` continued over each row of ``rows`` (its bytes, little-endian float64)."""
    for row in rows:
        digest = hashlib.sha256(digest.encode() + row.astype("<f8").tobytes()).hexdigest()
    return digest


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



class HistoryTable:
    """The epoch records as a float64 table, one row per epoch, grown by doubling: what a checkpoint writes.

    Numbers, booleans and None (NaN) go in the table; a field's kind (int, float, bool) brings its values
    back as they were. Anything else a callback put in a record is kept in the header (``other``).
    """

    def __init__(self) -> None:
        self.fields: list[str] = []
        self.kinds: dict[str, str] = {}
        self.absent: dict[str, list[list[int]]] = {}   # [start, stop) row ranges whose records lack the field
        self.other: dict[str, dict[str, Any]] = {}     # field -> {row: value} for values that are not numbers
        self.table = numpy.empty((0, 0))
        self.n = 0
        self.synced: tuple[str, int, int, str] | None = None  # (file, rows, width, digest) written there last

    def append(self, record: dict) -> None:
        record = {str(k): v for k, v in record.items()}       # JSON names fields by strings
        for key in record:
            if key not in self.kinds:
                self.fields.append(key)
                self.kinds[key] = "none"
                self.absent[key] = [[0, self.n]] if self.n else []
                self.table = numpy.concatenate([self.table, numpy.full((self.table.shape[0], 1), numpy.nan)], 1)
        if self.n == self.table.shape[0]:
            grown = numpy.full((max(8, 2 * self.n), len(self.fields)), numpy.nan)
            grown[:self.n] = self.table[:self.n]
            self.table = grown
        for j, key in enumerate(self.fields):
            if key not in record:
                ranges = self.absent[key]
                if ranges and ranges[-1][1] == self.n:
                    ranges[-1][1] += 1
                else:
                    ranges.append([self.n, self.n + 1])
                continue
            self.table[self.n, j] = self._number(key, record[key])
        self.n += 1

    def _number(self, key: str, v: Any) -> float:
        kind = self.kinds[key]
        if v is None:
            return math.nan
        if isinstance(v, bool):
            new = "bool" if kind in ("none", "bool") else "other"
        elif isinstance(v, numbers.Integral):
            new = "int" if kind in ("none", "int") else ("float" if kind == "float" else "other")
        elif isinstance(v, numbers.Real) and math.isfinite(float(v)):
            new = "float" if kind in ("none", "int", "float") else "other"
        else:
            new = "other"
        if new == "other":
            self.other.setdefault(key, {})[str(self.n)] = v if isinstance(v, (str, int, float)) else repr(v)
            return math.nan
        self.kinds[key] = new
        return float(v)

    def array(self) -> numpy.ndarray:
        """The filled rows, flat (a view: nothing copied)."""
        return self.table[:self.n].reshape(-1)

    def header(self) -> dict:
        return {"fields": self.fields, "kinds": self.kinds, "absent": {k: v for k, v in self.absent.items() if v},
                "other": self.other, "epochs": self.n}

    def sync(self, path: str) -> dict:
        """Make the file ``path`` hold exactly this table's rows: append the rows since the last sync (cost
        independent of the rows before), or write it whole when it is new to this table or a field was added.
        Returns what the checkpoint's header records of it: rows, width and the SHA-256 chain."""
        width, rows = len(self.fields), self.table[:self.n]
        last = self.synced
        if last is not None and last[0] == path and last[2] == width and os.path.isfile(path):
            start, digest = last[1], last[3]
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.lseek(fd, start * width * 8, os.SEEK_SET)
                os.write(fd, numpy.ascontiguousarray(rows[start:], dtype="<f8").tobytes())
                os.ftruncate(fd, self.n * width * 8)     # rows a crash left after the last checkpoint
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            start, digest = 0, ""
            data = numpy.ascontiguousarray(rows, dtype="<f8").tobytes()
            io.atomic_write(path, lambda fh: fh.write(data))
        digest = row_chain(digest, rows[start:])
        self.synced = (path, self.n, width, digest)
        return {"rows": self.n, "width": width, "sha256": digest}

    @staticmethod
    def read(path: str, info: Any, shown: str) -> tuple[numpy.ndarray, tuple[str, int, int, str]]:
        """The rows the checkpoint's header ``info`` describes, read from ``path`` and checked against its
        SHA-256 chain (ModelFileError otherwise); rows after them are ignored. Returns them flat, and the
        sync state to continue appending from."""
        ok = isinstance(info, dict) and all(isinstance(info.get(k), int) and not isinstance(info.get(k), bool)
                                            and info[k] >= 0 for k in ("rows", "width")) \
            and isinstance(info.get("sha256"), str)
        if not ok:
            raise ModelFileError(f"{shown}: the history's description is malformed; the checkpoint is corrupt or "
                                 "was edited")
        rows, width = info["rows"], info["width"]
        with io.open_regular(path, ModelFileError, "checkpoint history file") as fh:
            if os.fstat(fh.fileno()).st_size < rows * width * 8:
                raise ModelFileError(f"{path} holds fewer history rows than its checkpoint {shown} recorded; "
                                     "it was truncated or replaced: delete both to start afresh")
            data = fh.read(rows * width * 8)
        table = numpy.frombuffer(data, dtype="<f8").astype(numpy.float64).reshape(rows, width)
        digest = row_chain("", table)
        if digest != info["sha256"]:
            raise ModelFileError(f"{path} is not the history its checkpoint {shown} recorded (SHA-256 differs); "
                                 "it was edited or replaced: delete both to start afresh")
        return table.reshape(-1), (path, rows, width, digest)

    @classmethod
    def records(cls, header: Any, flat: numpy.ndarray, epochs: int, shown: str) -> list[dict]:
        """The records of a checkpoint's history (header part and array), checked: ModelFileError if malformed."""
        try:
            fields, kinds, absent, other = header["fields"], header["kinds"], header["absent"], header["other"]
            ok = (isinstance(fields, list) and all(isinstance(f, str) for f in fields)
                  and len(set(fields)) == len(fields) and isinstance(kinds, dict) and set(kinds) == set(fields)
                  and all(k in ("none", "int", "float", "bool") for k in kinds.values())
                  and isinstance(absent, dict) and isinstance(other, dict) and header["epochs"] == epochs
                  and flat.size == epochs * len(fields))
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise ModelFileError(f"{shown}: the history does not describe {epochs} epoch(s) of records; the "
                                 "checkpoint is corrupt or was edited")
        table = flat.reshape(epochs, len(fields)) if fields else numpy.empty((epochs, 0))
        cast = {"int": int, "float": float, "bool": bool, "none": float}
        try:
            gone = {f: {r for a, b in absent.get(f, ()) for r in range(max(int(a), 0), min(int(b), epochs))}
                    for f in fields}
            out = [{f: (None if math.isnan(v) else cast[kinds[f]](v)) for f, v in zip(fields, row) if r not in gone[f]}
                   for r, row in enumerate(table.tolist())]
            for f, values in other.items():
                for r, v in values.items():
                    out[int(r)][f] = v
        except (TypeError, ValueError, IndexError, OverflowError, AttributeError) as exc:
            raise ModelFileError(f"{shown}: the history is malformed ({exc}); the checkpoint is corrupt or was "
                                 "edited") from None
        if [r.get("epoch") for r in out] != list(range(1, epochs + 1)):
            raise ModelFileError(f"{shown}: the history's epochs are not 1..{epochs}; the checkpoint is corrupt or "
                                 "was edited")
        return out

    @classmethod
    def of(cls, records: list[dict]) -> HistoryTable:
        table = cls()
        for r in records:
            table.append(r)
        return table


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
    history: HistoryTable
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
                  "history": {**self.history.header(), "file": self.history.sync(history_path(path))},
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
        arrays["history"], synced = HistoryTable.read(history_path(path), header["history"].get("file"), str(path))
        saved = _Reader(str(path), header, arrays, _n_parameters(config), state_names).checkpoint(config)
        saved.history.synced = synced             # the next save appends after these rows
        return saved


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

    def checkpoint(self, config: dict) -> Checkpoint:
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
        history = HistoryTable.of(HistoryTable.records(h.get("history"), self.arrays["history"], epoch, self.shown))
        best, weights = self.best(epoch)
        return Checkpoint(config, epoch, self.vector("params"), t, self.state("", t),
                          self.rng(h.get("shuffle_rng"), "shuffle_rng"), history, h["stopped_early"], best, weights,
                          self.last_start(epoch))
