"""The training loop (lecture §2: "return to 2 unless you are satisfied") around a model's public step.

:class:`Trainer` holds a run's settings; :meth:`Trainer.start` checks the data and returns a :class:`Run`,
whose :meth:`Run.train` repeats the model's step over shuffled minibatches, epoch after epoch, with
validation, early stopping, divergence roll-back, callbacks, checkpoints and progress reports, and
returns the :class:`~gpunn.history.History` it filled. The trainer reads and drives the model through
the :class:`Trainable` protocol only, and never assigns a model's attributes: the model stores what
the run gives it. How the step's gradients are combined, how ranks agree and who writes and reports is
the run's strategy (:mod:`gpunn.strategy`).

Per-step losses and correct counts stay on the device and are read back once per epoch.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy

from . import data as data_mod
from .backend import Device, device_of, to_host
from .checkpoint import Checkpoint, EpochStart, HistoryLog, fingerprint, run_config
from .distributed import agreed
from .errors import ConfigError, DivergenceError
from .history import Evaluation, History
from .io import check_writable
from .losses import Loss
from .ops import XpOps
from .optim import Optimizer
from .strategy import Local, Steppable
from .types import Array, ArrayModule
from .validation import features, streamed_features, targets

__all__ = ["Trainable", "Trainer", "Run", "report"]


class Trainable(Steppable, Protocol):
    """What the trainer needs of a model (:class:`gpunn.Sequential` is one; mypy checks it)."""

    device: Device
    dtype: numpy.dtype

    @property
    def n_in(self) -> int: ...
    @property
    def n_out(self) -> int: ...
    @property
    def ops(self) -> XpOps: ...
    @property
    def xp(self) -> ArrayModule: ...
    def output(self) -> Array: ...
    def evaluate_prepared(self, x: Array, t: Array, loss: Loss) -> Evaluation: ...
    def config(self) -> dict: ...


@dataclass
class Trainer:
    """The settings of a run (checked by :meth:`gpunn.Sequential.fit`, which documents them)."""

    epochs: int
    batch_size: int
    shuffle: bool = True
    patience: int | None = None
    progress: bool | Callable[[dict], None] = False
    callbacks: list | None = None
    checkpoint: Any = None
    strategy: Local = Local()

    def start(self, model: Trainable, X: Any, Y: Any, loss: Loss, optimizer: Optimizer, validation_data: Any,
              order: numpy.random.Generator) -> Run:
        """Check the data and make the run (nothing trained yet); ``order`` draws the batch order."""
        with self.strategy.together():              # a bad X on one rank is the same error on every rank
            source = data_mod.source(X, Y, loss, self.batch_size, model.ops, model.dtype, model.n_in, model.n_out)
            val = _validation(model, validation_data, loss)
        if self.strategy.size > 1:                  # the ranks agree on the whole run before any work
            self.strategy.agree(self._description(model, source, loss, optimizer, val))
        self.strategy.begin(model, order)           # every rank starts from the same weights and order
        config = None
        if self.checkpoint is not None:
            path = self.checkpoint
            self.strategy.on_root(lambda: check_writable(path))     # only the root writes it
            config = run_config(model, loss, optimizer, self.batch_size, self.shuffle, self.patience,
                                (source.x, source.t), val)
        return Run(self, model, self.strategy.shard(source), loss, optimizer, val, order, config)

    def _description(self, model: Trainable, source: data_mod.Source, loss: Loss, optimizer: Optimizer,
                     val: tuple | None) -> dict:
        """What every rank of a data-parallel run must have the same (see :meth:`gpunn.strategy.DataParallel.agree`)."""
        try:
            opt: Any = optimizer.config()
        except Exception:                           # a custom optimiser without a config: its repr
            opt = repr(optimizer)
        t, state = optimizer.host_state()
        return {"network": model.config(), "device kind": model.device.kind, "loss": loss.name,
                "optimizer": (type(optimizer).__name__, _plain(opt)), "optimizer steps taken": t,
                "optimizer state": {k: fingerprint(v) for k, v in sorted(state.items())},
                "epochs": self.epochs, "batch_size": self.batch_size, "shuffle": bool(self.shuffle),
                "patience": self.patience, "callbacks": [type(c).__name__ for c in self.callbacks or []],
                "checkpoint given": self.checkpoint is not None,
                "data shapes": (tuple(source.x.shape), tuple(source.t.shape)),
                "data": fingerprint(source.x, source.t),
                "validation data": None if val is None else (tuple(val[0].shape), fingerprint(*val))}


def _plain(value: Any) -> Any:
    """``value`` as JSON data that compares alike on every rank (a function in a custom part's configuration
    becomes its qualified name, not its repr, whose address differs between processes)."""
    return json.loads(json.dumps(value, sort_keys=True, default=lambda o: getattr(o, "__qualname__", type(o).__name__)))


def _validation(model: Trainable, validation_data: Any, loss: Loss) -> tuple[Array, Array] | None:
    if validation_data is None:
        return None
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        raise ConfigError("validation_data must be a pair (X_val, Y_val)")
    device_of(*validation_data)       # raises on NumPy/CuPy mixing or two GPUs
    X_val = validation_data[0]
    xv = (streamed_features(X_val, model.n_in, "X_val") if data_mod.is_streamed(X_val)
          else features(X_val, model.device, model.dtype, model.n_in, "X_val"))
    tv = targets(validation_data[1], model.device, model.dtype, loss, model.n_out, xv.shape[0], "Y_val")
    return xv, tv


@dataclass
class _Start:
    """What an epoch started from: parameters, optimiser state and batch order (to roll back or replay)."""

    params: Array
    optimizer: tuple
    perm: numpy.ndarray | None
    rng: dict | None = None         # the shuffling generator's state before ``perm`` was drawn


class _EarlyStopping:
    """Stop when the monitored loss has not improved for ``patience`` epochs; keep the best weights."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.best, self.weights, self.epoch, self.bad = math.inf, None, None, 0

    def should_stop(self, record: dict, params: Array) -> bool:
        if self.patience is None:
            return False
        monitored = record.get("val_loss", record["loss"])
        if monitored < self.best:
            self.best, self.weights, self.epoch, self.bad = monitored, params.copy(), record["epoch"], 0
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore_best(self, params: Array, history: History) -> None:
        if self.weights is not None:
            params[...] = self.weights
            history.best_epoch = self.epoch

    def state(self) -> dict:
        return {"loss": self.best if math.isfinite(self.best) else None, "epoch": self.epoch, "bad": self.bad}

    def load(self, best: dict, weights: Array | None) -> None:
        self.best = math.inf if best.get("loss") is None else float(best["loss"])
        self.epoch, self.bad = best.get("epoch"), int(best.get("bad", 0))
        self.weights = weights


class Run:
    """One :meth:`Trainer.start`-ed run: its data, history and state; :meth:`train` runs it."""

    def __init__(self, trainer: Trainer, model: Trainable, data: data_mod.Source | data_mod.Sharded, loss: Loss,
                 optimizer: Optimizer, val: tuple | None, order: numpy.random.Generator, config: dict | None):
        self.trainer, self.model, self.data, self.loss, self.optimizer = trainer, model, data, loss, optimizer
        self.val, self.order, self.config = val, order, config
        self.strategy = trainer.strategy
        self.history = History()
        self.table = HistoryLog()                       # the history as a checkpoint writes it, a line per epoch
        self.stopping = _EarlyStopping(trainer.patience)
        self.acc = data_mod.Accuracy(model.xp, model.n_out)
        self.rows = [int(s) for s in data.sizes]
        self.step_loss = model.xp.zeros(len(self.rows), dtype=model.dtype)
        self.step_correct = model.xp.zeros(len(self.rows), dtype=numpy.int64)

    def train(self) -> History:
        """Train the remaining epochs (all, or those after a checkpoint's); returns the history."""
        t = self.trainer
        config = self.config
        saved = (self.strategy.on_root(lambda: Checkpoint.load(t.checkpoint, config, self.optimizer.state_names))
                 if config is not None else None)
        first, previous = self._resume(saved) if saved is not None else (0, None)
        params = self.model.flat_parameters()
        for epoch in range(first, t.epochs if not self.history.stopped_early else first):
            record, previous = self._epoch(epoch, previous)
            self.history.append(record)
            if self.strategy.is_root:
                report(t.progress, record)
            stop = self.stopping.should_stop(record, params)
            stop = any([bool(c.on_epoch_end(record)) for c in t.callbacks or []]) or stop
            stop = self.strategy.any(stop)              # a rank that stopped alone would hang the others
            self.history.stopped_early = stop
            if self.config is not None:
                self.table.append(record)               # as the callbacks left it
            if self.config is not None and self.strategy.is_root:
                self._checkpoint(epoch + 1, previous).save(t.checkpoint)
            if stop:
                break
        self.stopping.restore_best(params, self.history)
        return self.history

    # -- one epoch --------------------------------------------------------------------------------
    def _train_batch(self, k: int, rows: slice) -> tuple[int, Array | None]:
        """Train on minibatch ``k`` (this process's share of it); returns its rows here and their labels."""
        x, t, labels = self.data.batch(rows)
        self.strategy.step(self.model, x, t, self.loss, self.optimizer, self.step_loss[k:k + 1], self.rows[k])
        return int(x.shape[0]), labels

    def _run_epoch(self) -> tuple[numpy.ndarray, bool, int]:
        """One pass over the minibatches; returns the step losses (float64), whether the parameters are
        finite afterwards and the number of correct predictions, read back together once (and summed over
        the ranks in one small reduction)."""
        for k, sl in self.data.batches():
            n, labels = self._train_batch(k, sl)
            if n and labels is not None:
                self.step_correct[k] = self.acc.count(self.model.output(), labels)
        nonfinite = 0.0 if bool(self.model.xp.isfinite(self.model.flat_parameters()).all()) else 1.0
        stats = numpy.concatenate([to_host(self.step_loss).astype(numpy.float64),
                                   [float(to_host(self.step_correct).sum()), nonfinite]])
        self.strategy.reduce(stats)
        return stats[:-2], stats[-1] == 0.0, int(stats[-2])

    def _replay(self, start: _Start, steps: int) -> None:
        """Go back to ``start`` and redo its epoch's first ``steps`` steps (same batches, same arithmetic)."""
        self.model.flat_parameters()[...] = start.params
        self.optimizer.restore(start.optimizer)
        self.data.order(start.perm)
        for k, sl in self.data.batches()[:steps]:
            self._train_batch(k, sl)

    def _diverged(self, losses: numpy.ndarray, epoch: int, this: _Start, previous: _Start | None) -> DivergenceError:
        """Roll back to the last parameters whose loss was finite; return the DivergenceError to raise.

        Step k's loss is that of the parameters before its update. With the first non-finite loss at step k
        of this epoch, the last finite one was step k − 1's: this epoch's start plus k − 1 updates. At k = 0
        it was the previous epoch's last step (its start plus n − 1 updates); in the first epoch the initial
        weights stay. Non-finite weights after the last update count as a non-finite loss at step n.
        """
        bad = numpy.flatnonzero(~numpy.isfinite(losses))
        k = int(bad[0]) if bad.size else len(losses)
        if k > 0:
            self._replay(this, k - 1)
        elif previous is not None:
            self._replay(previous, len(losses) - 1)
        else:
            self._replay(this, 0)
        left = "the weights were left at the last state whose loss was finite"
        if k == len(losses):
            what = f"the weights became non-finite in the update of epoch {epoch + 1}, step {k}"
        else:
            kind = "NaN" if numpy.isnan(losses[k]) else "infinite"
            what = f"the loss became {kind} at epoch {epoch + 1}, step {k + 1}"
            if k == 0 and previous is None:     # no state of this run (or its checkpoint) had a finite loss
                what += ", already for the weights this fit started from"
                left = "the weights were left as the fit found them: no state of this run had a finite loss"
        return DivergenceError(
            f"{what}; training stopped and {left}. "
            "Lower the learning rate, standardise the inputs, or use a loss that suits the output activation")

    def _epoch(self, epoch: int, previous: _Start | None) -> tuple[dict, _Start]:
        """Train one epoch; return its record and what it started from. On divergence the parameters are
        those of the last finite loss (DivergenceError); on any other exception (Ctrl-C, bad data in a
        streamed batch) those of the epoch's start."""
        t0 = time.perf_counter()
        rng = dict(self.order.bit_generator.state) if self.trainer.shuffle else None
        start = _Start(self.model.flat_parameters().copy(), self.optimizer.snapshot(),
                       self.order.permutation(self.data.n) if self.trainer.shuffle else None, rng)
        try:
            self.data.order(start.perm)
            losses_host, finite, correct = self._run_epoch()
            if not (finite and numpy.all(numpy.isfinite(losses_host))):    # the same figures on every rank
                raise agreed(self._diverged(losses_host, epoch, start, previous))
            n = self.data.n
            record: dict[str, Any] = {"epoch": epoch + 1, "loss": float(losses_host @ self.data.sizes / n)}
            record["accuracy"] = correct / n if self.data.labels is not None else None
            if self.val is not None:
                self._validate(record, start)
            record["seconds"] = time.perf_counter() - t0
        except DivergenceError:
            raise                                  # the weights are already those of the last finite loss
        except BaseException:
            # Ctrl-C, or bad data found in a streamed batch: back to the last finished epoch, as in the history
            self._replay(start, 0)
            raise
        return record, start

    def _validate(self, record: dict, start: _Start) -> None:
        assert self.val is not None
        ev = self.model.evaluate_prepared(self.val[0], self.val[1], self.loss)
        if self.strategy.any(not math.isfinite(ev.loss)):
            self._replay(start, 0)
            raise agreed(DivergenceError(
                f"the validation loss became {'NaN' if math.isnan(ev.loss) else 'infinite'} at epoch "
                f"{record['epoch']}; the weights were rolled back to that epoch's start, whose training loss "
                "was finite. Lower the learning rate or standardise the inputs"))
        record["val_loss"], record["val_accuracy"] = ev.loss, ev.accuracy

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self, epochs_done: int, last: _Start) -> Checkpoint:
        """The checkpoint after ``epochs_done`` epochs, the last of which started from ``last``."""
        assert self.config is not None
        t, state = self.optimizer.host_state()
        weights = self.stopping.weights
        params = self.model.flat_parameters()
        last_t, last_state = self.optimizer.host_snapshot(last.optimizer, params)
        return Checkpoint(self.config, epochs_done, numpy.array(to_host(params), copy=True),
                          t, state, dict(self.order.bit_generator.state), self.table,
                          self.history.stopped_early, self.stopping.state(),
                          None if weights is None else numpy.array(to_host(weights), copy=True),
                          EpochStart(numpy.array(to_host(last.params), copy=True), last_t, last_state, last.rng))

    def _resume(self, saved: Checkpoint) -> tuple[int, _Start | None]:
        """Put the run back where the checkpoint left it; returns the number of finished epochs and the start
        of the last of them (to roll back to, as the uninterrupted run would, if the next one diverges at once)."""
        device = self.model.device
        self.model.flat_parameters()[...] = device.asarray(saved.params)
        self.optimizer.load_state(saved.optimizer_t, saved.optimizer_state)
        self.order.bit_generator.state = saved.shuffle_rng
        self.table = saved.history
        self.history.epochs = saved.history.records()
        self.history.stopped_early = saved.stopped_early
        best = None if saved.best_weights is None else device.asarray(saved.best_weights)
        self.stopping.load(saved.best, best)
        last = saved.last_start
        if last is None:
            return saved.epoch, None
        perm = None
        if last.shuffle_rng is not None:
            order = numpy.random.Generator(numpy.random.PCG64())
            order.bit_generator.state = last.shuffle_rng
            perm = order.permutation(self.data.n)
        return saved.epoch, _Start(device.asarray(last.params), self.optimizer.snapshot_of_host(
            last.optimizer_t, last.optimizer_state), perm, last.shuffle_rng)


def report(progress: bool | Callable[[dict], None], record: dict) -> None:
    """Hand an epoch's record to ``progress``: a callable gets it, True prints one line to stderr."""
    if callable(progress):
        progress(record)
    elif progress:
        parts = [f"epoch {record['epoch']}", f"loss {record['loss']:.5f}"]
        if record.get("accuracy") is not None:
            parts.append(f"acc {record['accuracy']:.4f}")
        if record.get("val_loss") is not None:
            parts.append(f"val_loss {record['val_loss']:.5f}")
        if record.get("val_accuracy") is not None:
            parts.append(f"val_acc {record['val_accuracy']:.4f}")
        parts.append(f"{record['seconds']:.2f}s")
        print("  ".join(parts), file=sys.stderr)
