"""The training loop (lecture §2: "return to 2 unless you are satisfied") around a network's public step.

:func:`fit` repeats :meth:`gpunn.Sequential.train_step` over shuffled minibatches, epoch after epoch,
with validation, early stopping, divergence roll-back and progress reports. It is written against that
public step and a few other public methods, so it knows nothing of how a step computes: this module
sits below :mod:`gpunn.network` and never imports it.

Per-step losses and correct counts stay on the device and are read back once per epoch.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy

from .backend import Device, HostToDevice, device_of, to_host
from .checkpoint import Checkpoint, run_config
from .distributed import Communicator, shard
from .errors import ConfigError, DataError, DivergenceError
from .io import check_writable
from .losses import Loss
from .ops import XpOps
from .optim import Optimizer
from .types import Array, ArrayModule
from .validation import features, streamed_features, targets

__all__ = ["History", "Evaluation", "Accuracy", "is_classification", "fit"]


class Evaluation(NamedTuple):
    """Mean loss and, for classification targets, accuracy (a fraction in [0, 1]; else None)."""

    loss: float
    accuracy: float | None


class History:
    """Per-epoch records of a :meth:`Sequential.fit` run."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.stopped_early = False
        self.best_epoch: int | None = None

    def append(self, record: dict) -> None:
        self.epochs.append(record)

    def __getitem__(self, key: str) -> list:
        return [r.get(key) for r in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def loss(self) -> list[float]:
        return self["loss"]

    @property
    def accuracy(self) -> list:
        return self["accuracy"]

    @property
    def val_loss(self) -> list:
        return self["val_loss"]

    @property
    def val_accuracy(self) -> list:
        return self["val_accuracy"]

    def __repr__(self) -> str:
        last = self.epochs[-1] if self.epochs else {}
        return f"History({len(self)} epochs, last={last})"


def is_classification(t: Array) -> bool:
    """True when targets t are 0/1 valued and each row is a class indicator (so accuracy is meaningful)."""
    if not bool(((t == 0) | (t == 1)).all()):
        return False
    return t.shape[1] == 1 or bool((t.sum(axis=1) == 1).all())


class Accuracy:
    """Counts correct predictions per batch into device buffers, without allocating per step."""

    def __init__(self, xp: ArrayModule, n_out: int):
        self.xp, self.binary = xp, n_out == 1
        self._bufs: dict[int, tuple] = {}

    def labels(self, t: Array) -> Array:
        """Class labels of target rows: argmax, or t > 0.5 for one output."""
        return t[:, 0] > 0.5 if self.binary else self.xp.argmax(t, axis=1)

    def count(self, y: Array, labels: Array) -> Array:
        """Number of rows of outputs y whose predicted class is ``labels`` (a device scalar)."""
        xp, b = self.xp, y.shape[0]
        bufs = self._bufs.get(b)
        if bufs is None:
            pred = xp.empty(b, bool if self.binary else labels.dtype)
            bufs = self._bufs[b] = (pred, xp.empty(b, bool))
        pred, same = bufs
        if self.binary:
            xp.greater(y[:, 0], 0.5, out=pred)
        else:
            xp.argmax(y, axis=1, out=pred)
        xp.equal(pred, labels, out=same)
        return xp.count_nonzero(same)


@dataclass
class _Data:
    """A training set, the epoch's order of its rows, and its minibatches.

    In memory, the set is on the device and each epoch's order is gathered into shuffle buffers once.
    A NumPy memmap (``numpy.load(path, mmap_mode="r")``) is streamed instead: each batch's rows are
    gathered from the file in the same order, checked and moved to the device, so memory holds a few
    batches, never the set (the targets, one row of n_out numbers per sample, are held in memory).
    """

    x: Array                      # on the device, or the memmap when streamed
    t: Array
    labels: Array | None          # class labels when the targets are classes (for accuracy), else None
    starts: list[int]
    batch_size: int
    sizes: numpy.ndarray          # samples per minibatch (float64, to weight the step losses)
    step_loss: Array              # per-step losses and correct counts, on the device
    step_correct: Array
    ops: XpOps
    dtype: numpy.dtype
    comm: Communicator | None = None  # data-parallel: each rank takes its share of every batch
    streamed: bool = False
    perm: numpy.ndarray | None = None     # the epoch's order (None: as stored)
    _buffers: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def batches(self) -> list[tuple[int, slice]]:
        return [(k, slice(s, s + self.batch_size)) for k, s in enumerate(self.starts)]

    def local(self, sl: slice) -> slice:
        """The rows of the batch ``sl`` that this rank trains on (all of them without a communicator)."""
        if self.comm is None or self.comm.size == 1:
            return sl
        return shard(sl.start, min(sl.stop, self.n), self.comm.rank, self.comm.size)

    def order(self, perm: numpy.ndarray | None) -> None:
        """Use the rows in the order ``perm`` (a permutation; None: as stored) until the next call."""
        self.perm = perm
        if perm is None or self.streamed:
            return
        idx = self.ops.device.asarray(perm)
        for name, src in (("xs", self.x), ("ts", self.t), ("ls", self.labels)):
            if src is not None:
                self.ops.gather_rows(src, idx, self._buffer(name, src.shape, src.dtype))

    def batch(self, rows: slice) -> tuple[Array, Array, Array | None]:
        """(x, t, labels) of the rows ``rows`` of this epoch's order."""
        if not self.streamed:
            if self.perm is None:
                x, t, lab = self.x, self.t, self.labels
            else:
                x, t, lab = self._buffers["xs"], self._buffers["ts"], self._buffers.get("ls")
            return x[rows], t[rows], None if lab is None else lab[rows]
        return self._streamed_batch(rows)

    def _streamed_batch(self, rows: slice) -> tuple[Array, Array, Array | None]:
        index = numpy.arange(rows.start, min(rows.stop, self.n)) if self.perm is None else self.perm[rows]
        m = index.size
        stage = self._buffers.get("stage")
        if stage is None:
            stage = self._buffers["stage"] = HostToDevice(self.ops.device, (self.batch_size, self.x.shape[1]),
                                                          self.dtype)
        host = stage.slot()[:m]
        if self.x.dtype == self.dtype:
            numpy.take(self.x, index, axis=0, out=host, mode="clip")
        else:                                           # read in the file's dtype, then cast
            raw = self._buffer("raw", (self.batch_size, self.x.shape[1]), self.x.dtype)[:m]
            numpy.copyto(host, numpy.take(self.x, index, axis=0, out=raw, mode="clip"), casting="unsafe")
        if not numpy.isfinite(host).all():
            raise DataError(f"X contains NaN or infinite values (in the rows of a batch read from {_file(self.x)}); "
                            "clean them first")
        x = stage.send(m)
        idx = self.ops.device.asarray(index)
        t = self.ops.gather_rows(self.t, idx, self._buffer("t", (self.batch_size, *self.t.shape[1:]),
                                                           self.t.dtype)[:m])
        lab = None
        if self.labels is not None:
            lab = self.ops.gather_rows(self.labels, idx, self._buffer("l", (self.batch_size,), self.labels.dtype)[:m])
        return x, t, lab

    def _buffer(self, name: str, shape: tuple, dtype: Any) -> Array:
        buf = self._buffers.get(name)
        if buf is None:
            xp = numpy if name == "raw" else self.ops.xp
            buf = self._buffers[name] = xp.empty(shape, dtype)
        return buf


def _file(a: Any) -> str:
    return str(getattr(a, "filename", None) or "the memmap")


def is_streamed(X: Any) -> bool:
    """Whether ``X`` is read batch by batch from a file (a NumPy memmap) rather than held in memory."""
    return isinstance(X, numpy.memmap)


def _prepare(net: Any, X: Any, Y: Any, loss: Loss, batch_size: int, shuffle: bool,
             comm: Communicator | None = None) -> _Data:
    dev: Device = net.device
    xp = dev.xp
    streamed = is_streamed(X)
    x = streamed_features(X, net.n_in) if streamed else features(X, dev, net.dtype, net.n_in)
    n = x.shape[0]
    t = targets(Y, dev, net.dtype, loss, net.n_out, n)
    labels = Accuracy(xp, net.n_out).labels(t) if is_classification(t) else None
    batch_size = min(batch_size, n)
    starts = list(range(0, n, batch_size))
    sizes = numpy.array([min(batch_size, n - s) for s in starts], dtype=numpy.float64)
    return _Data(x, t, labels, starts, batch_size, sizes, xp.zeros(len(starts), dtype=net.dtype),
                 xp.zeros(len(starts), dtype=numpy.int64), net.ops, net.dtype, comm, streamed)


def _validation(net: Any, validation_data: Any, loss: Loss) -> tuple[Array, Array] | None:
    if validation_data is None:
        return None
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        raise ConfigError("validation_data must be a pair (X_val, Y_val)")
    device_of(*validation_data)       # raises on NumPy/CuPy mixing or two GPUs
    X_val = validation_data[0]
    xv = (streamed_features(X_val, net.n_in, "X_val") if is_streamed(X_val)
          else features(X_val, net.device, net.dtype, net.n_in, "X_val"))
    tv = targets(validation_data[1], net.device, net.dtype, loss, net.n_out, xv.shape[0], "Y_val")
    return xv, tv


@dataclass
class _Start:
    """What an epoch started from: parameters, optimiser state and batch order (to roll back or replay)."""

    params: Array
    optimizer: tuple
    perm: numpy.ndarray | None


def _step(net: Any, data: _Data, k: int, sl: slice, loss: Loss, optimizer: Optimizer) -> tuple[int, Array | None]:
    """Train on batch ``k`` (rows ``sl``; this rank's share of them); returns how many rows it trained on
    and their class labels (None without classes)."""
    mine = data.local(sl)
    x, t, labels = data.batch(mine)
    net.train_step(x, t, loss, optimizer, out=data.step_loss[k:k + 1], comm=data.comm,
                   global_batch=min(sl.stop, data.n) - sl.start)
    return mine.stop - mine.start, labels


def _run_epoch(net: Any, data: _Data, loss: Loss, optimizer: Optimizer,
               acc: Accuracy) -> tuple[numpy.ndarray, bool, int]:
    """One pass over the minibatches; returns the step losses (float64), whether the parameters are
    finite afterwards and the number of correct predictions, read back together once (and, with a
    communicator, summed over the ranks in one small allreduce)."""
    for k, sl in data.batches():
        rows, labels = _step(net, data, k, sl, loss, optimizer)
        if rows and labels is not None:
            data.step_correct[k] = acc.count(net.layers[-1].y, labels)
    nonfinite = 0.0 if bool(net.xp.isfinite(net.flat_parameters()).all()) else 1.0
    stats = numpy.concatenate([to_host(data.step_loss).astype(numpy.float64),
                               [float(to_host(data.step_correct).sum()), nonfinite]])
    if data.comm is not None:
        data.comm.allreduce_sum(stats)
    return stats[:-2], stats[-1] == 0.0, int(stats[-2])


def _replay(net: Any, data: _Data, start: _Start, steps: int, loss: Loss, optimizer: Optimizer) -> None:
    """Go back to ``start`` and redo its epoch's first ``steps`` steps (same batches, same arithmetic)."""
    net.flat_parameters()[...] = start.params
    optimizer.restore(start.optimizer)
    data.order(start.perm)
    for k, sl in data.batches()[:steps]:
        _step(net, data, k, sl, loss, optimizer)


def _diverged(net: Any, data: _Data, losses: numpy.ndarray, epoch: int, starts: tuple[_Start, _Start | None],
              loss: Loss, optimizer: Optimizer) -> DivergenceError:
    """Roll back to the last parameters whose loss was finite; return the DivergenceError to raise.

    Step k's loss is that of the parameters before its update. With the first non-finite loss at step k
    of this epoch, the last finite one was step k − 1's: this epoch's start plus k − 1 updates. At k = 0
    it was the previous epoch's last step (its start plus n − 1 updates); in the first epoch the initial
    weights stay. Non-finite weights after the last update count as a non-finite loss at step n.
    """
    this, previous = starts
    bad = numpy.flatnonzero(~numpy.isfinite(losses))
    k = int(bad[0]) if bad.size else len(losses)
    if k > 0:
        _replay(net, data, this, k - 1, loss, optimizer)
    elif previous is not None:
        _replay(net, data, previous, len(losses) - 1, loss, optimizer)
    else:
        _replay(net, data, this, 0, loss, optimizer)
    if k == len(losses):
        what = f"the weights became non-finite in the update of epoch {epoch + 1}, step {k}"
    else:
        kind = "NaN" if numpy.isnan(losses[k]) else "infinite"
        what = f"the loss became {kind} at epoch {epoch + 1}, step {k + 1}"
    return DivergenceError(
        f"{what}; training stopped and the weights were left at the last state whose loss was finite. "
        "Lower the learning rate, standardise the inputs, or use a loss that suits the output activation")


def _epoch(net: Any, data: _Data, loss: Loss, optimizer: Optimizer, epoch: int, shuffle: bool,
           val: tuple | None, acc: Accuracy, previous: _Start | None) -> tuple[dict, _Start]:
    """Train one epoch; return its record and what it started from. On divergence the parameters are
    those of the last finite loss (DivergenceError); on any other exception (Ctrl-C, bad data in a
    streamed batch) those of the epoch's start."""
    t0 = time.perf_counter()
    start = _Start(net.flat_parameters().copy(), optimizer.snapshot(),
                   net.shuffle_rng.permutation(data.n) if shuffle else None)
    try:
        data.order(start.perm)
        losses_host, finite, correct = _run_epoch(net, data, loss, optimizer, acc)
        if not (finite and numpy.all(numpy.isfinite(losses_host))):
            raise _diverged(net, data, losses_host, epoch, (start, previous), loss, optimizer)
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": float(losses_host @ data.sizes / data.n)}
        record["accuracy"] = correct / data.n if data.labels is not None else None
        if val is not None:
            ev = net.evaluate_prepared(val[0], val[1], loss)
            if not math.isfinite(ev.loss):
                _replay(net, data, start, 0, loss, optimizer)
                raise DivergenceError(
                    f"the validation loss became {'NaN' if math.isnan(ev.loss) else 'infinite'} at epoch "
                    f"{epoch + 1}; the weights were rolled back to that epoch's start, whose training loss was "
                    "finite. Lower the learning rate or standardise the inputs")
            record["val_loss"], record["val_accuracy"] = ev.loss, ev.accuracy
        record["seconds"] = time.perf_counter() - t0
    except DivergenceError:
        raise                                             # the weights are already those of the last finite loss
    except BaseException:
        # Ctrl-C, or bad data found in a streamed batch: back to the last finished epoch, as in the history
        _replay(net, data, start, 0, loss, optimizer)
        raise
    return record, start


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


def fit(net: Any, X: Any, Y: Any, loss: Loss, optimizer: Optimizer, epochs: int, batch_size: int,
        shuffle: bool, validation_data: Any, patience: int | None, progress: bool | Callable[[dict], None],
        callbacks: list | None = None, checkpoint: Any = None, comm: Communicator | None = None) -> History:
    """The loop behind :meth:`gpunn.Sequential.fit` (arguments already checked there)."""
    data = _prepare(net, X, Y, loss, batch_size, shuffle, comm)
    root = comm is None or comm.is_root
    if comm is not None:                  # every rank starts from rank 0's weights and batch order
        comm.broadcast(net.flat_parameters())
        net.shuffle_rng.bit_generator.state = comm.bcast_object(net.shuffle_rng.bit_generator.state)
    val = _validation(net, validation_data, loss)
    run = None
    if checkpoint is not None:
        check_writable(checkpoint)
        run = run_config(net, loss, optimizer, batch_size, shuffle, patience, (data.x, data.t), val)
    net.loss, net.optimizer = loss, optimizer      # recorded once the data passed its checks
    history = net.history = History()
    stopping = _EarlyStopping(patience)
    saved = Checkpoint.load(checkpoint, run) if run is not None else None
    first = _resume(net, saved, optimizer, history, stopping) if saved is not None else 0
    acc = Accuracy(net.xp, net.n_out)
    previous = None
    for epoch in range(first, epochs if not history.stopped_early else first):
        record, previous = _epoch(net, data, loss, optimizer, epoch, shuffle, val, acc, previous)
        history.append(record)
        if root:
            report(progress, record)
        stop = stopping.should_stop(record, net.flat_parameters())
        stop = any([bool(c.on_epoch_end(record)) for c in callbacks or []]) or stop
        stop = comm.any(stop) if comm is not None else stop     # a rank that stopped alone would hang
        history.stopped_early = stop
        if run is not None and root:
            _checkpoint(net, run, epoch + 1, optimizer, history, stopping).save(checkpoint)
        if stop:
            break
    stopping.restore_best(net.flat_parameters(), history)
    return history


def _checkpoint(net: Any, run: dict, epochs_done: int, optimizer: Optimizer, history: History,
                stopping: _EarlyStopping) -> Checkpoint:
    t, state = optimizer.host_state()
    best = {"loss": stopping.best if math.isfinite(stopping.best) else None, "epoch": stopping.epoch,
            "bad": stopping.bad}
    return Checkpoint(run, epochs_done, numpy.array(to_host(net.flat_parameters()), copy=True), t, state,
                      net.shuffle_rng.bit_generator.state, history.epochs, history.stopped_early, best,
                      None if stopping.weights is None else numpy.array(to_host(stopping.weights), copy=True))


def _resume(net: Any, saved: Checkpoint, optimizer: Optimizer, history: History, stopping: _EarlyStopping) -> int:
    """Put the run back where the checkpoint left it; returns the number of finished epochs."""
    net.flat_parameters()[...] = net.device.asarray(saved.params)
    optimizer.load_state(saved.optimizer_t, saved.optimizer_state)
    net.shuffle_rng.bit_generator.state = saved.shuffle_rng
    history.epochs = list(saved.history)
    history.stopped_early = saved.stopped_early
    best = saved.best
    stopping.best = math.inf if best.get("loss") is None else float(best["loss"])
    stopping.epoch, stopping.bad = best.get("epoch"), int(best.get("bad", 0))
    if saved.best_weights is not None:
        stopping.weights = net.device.asarray(saved.best_weights)
    return saved.epoch


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
