"""Checkpoints of a :meth:`gpunn.Sequential.fit` run: everything needed to continue after a crash.

After every finished epoch ``fit(..., checkpoint=PATH)`` writes, atomically (:func:`gpunn.io.atomic_write`):
the parameters, the optimiser's state (momentum or moments, step count), the shuffling generator's
state, the history, the early-stopping state, the number of finished epochs, and the run's
configuration (architecture, dtype, loss, optimiser, batch size, shuffling, patience, and SHA-256
fingerprints of the training and validation data). Called again with the same PATH, ``fit`` resumes
from there: the final model is bitwise identical to an uninterrupted run's. A checkpoint of another
configuration is refused with a ConfigError naming what differs; ``epochs`` may differ (train longer).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy

from . import io
from .backend import to_host
from .errors import ConfigError
from .types import Array

__all__ = ["FORMAT", "Checkpoint", "fingerprint", "run_config"]

FORMAT = "gpunn-checkpoint"


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
    """What must be equal for a checkpoint to continue this run."""
    return {"network": net.config(), "loss": loss.name, "optimizer": optimizer.config(), "batch_size": batch_size,
            "shuffle": bool(shuffle), "patience": patience, "data": fingerprint(*data),
            "validation_data": fingerprint(*validation) if validation is not None else None}


@dataclass
class Checkpoint:
    """The state of a fit after ``epoch`` finished epochs."""

    config: dict
    epoch: int
    params: numpy.ndarray
    optimizer_t: int
    optimizer_state: dict[str, numpy.ndarray]
    shuffle_rng: dict
    history: list[dict]
    stopped_early: bool
    best: dict                      # early stopping: {"loss", "epoch", "bad"} and best weights below
    best_weights: numpy.ndarray | None

    def save(self, path: Any) -> None:
        arrays = {"params": self.params, **{f"optimizer_{k}": v for k, v in self.optimizer_state.items()}}
        if self.best_weights is not None:
            arrays["best_weights"] = self.best_weights
        header = {"dtype": self.params.dtype.name, "config": self.config, "epoch": self.epoch,
                  "optimizer_t": self.optimizer_t, "shuffle_rng": self.shuffle_rng, "history": self.history,
                  "stopped_early": self.stopped_early, "best": self.best}
        io.write_archive(path, FORMAT, header, arrays)

    @classmethod
    def load(cls, path: Any, config: dict) -> Checkpoint | None:
        """The checkpoint at ``path`` (None if there is none), refused unless it was made by ``config``."""
        if not os.path.exists(os.fspath(path)):     # a dangling symbolic link too: saves write through links,
            return None                             # so the first save creates its target
        optional = {"best_weights", "optimizer_velocity", "optimizer_m", "optimizer_v"}
        header, arrays = io.read_archive(path, FORMAT, {"params"}, optional, what="gpunn checkpoint")
        saved = header.get("config")
        if saved != config:
            differs = sorted(k for k in set(config) | set(saved or {}) if (saved or {}).get(k) != config.get(k))
            raise ConfigError(f"the checkpoint {path} was made by another run (different {', '.join(differs)}); "
                              "use another checkpoint path, delete it, or run with the same settings and data")
        return cls(config, int(header["epoch"]), arrays["params"], int(header["optimizer_t"]),
                   {k.removeprefix("optimizer_"): v for k, v in arrays.items() if k.startswith("optimizer_")},
                   header["shuffle_rng"], header["history"], bool(header["stopped_early"]), header["best"],
                   arrays.get("best_weights"))
