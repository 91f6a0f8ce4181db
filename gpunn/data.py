"""Training data as the trainer reads it: a source of minibatches in an epoch's order, in memory or streamed.

:class:`InMemory` holds the set on the device and gathers each epoch's order into shuffle buffers once.
:class:`Memmap` streams a NumPy memmap (``numpy.load(path, mmap_mode="r")``): each batch's rows are
gathered from the file in the same order, checked and moved to the device, so memory holds a few
batches, never the set (the targets, one row of n_out numbers per sample, are held in memory).
:class:`Sharded` wraps either for data-parallel training: each rank reads its share of every batch.
"""
from __future__ import annotations

from typing import Any

import numpy

from .backend import HostToDevice
from .distributed import shard
from .errors import DataError
from .losses import Loss
from .ops import XpOps
from .types import Array, ArrayModule
from .validation import features, streamed_features, targets

__all__ = ["Accuracy", "InMemory", "Memmap", "Sharded", "Source", "is_classification", "is_streamed", "source"]


def is_streamed(X: Any) -> bool:
    """Whether ``X`` is read batch by batch from a file (a NumPy memmap) rather than held in memory."""
    return isinstance(X, numpy.memmap)


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


class Source:
    """A training set cut into minibatches of ``batch_size`` rows, read in the order set by :meth:`order`.

    ``t`` (targets) and ``labels`` (class labels when the targets are classes, else None) are on the device;
    ``sizes`` are the rows of each minibatch (float64, to weight the step losses).
    """

    def __init__(self, x: Any, t: Array, labels: Array | None, batch_size: int, ops: XpOps, dtype: numpy.dtype):
        self.x, self.t, self.labels, self.ops, self.dtype = x, t, labels, ops, dtype
        self.n = int(x.shape[0])
        self.batch_size = min(batch_size, self.n)
        self.starts = list(range(0, self.n, self.batch_size))
        self.sizes = numpy.array([min(self.batch_size, self.n - s) for s in self.starts], dtype=numpy.float64)
        self.perm: numpy.ndarray | None = None      # this epoch's order (None: as stored)
        self._buffers: dict[str, Array] = {}

    def batches(self) -> list[tuple[int, slice]]:
        """(index, rows of the epoch's order) of every minibatch."""
        return [(k, slice(s, s + self.batch_size)) for k, s in enumerate(self.starts)]

    def order(self, perm: numpy.ndarray | None) -> None:
        """Read the rows in the order ``perm`` (a permutation; None: as stored) until the next call."""
        self.perm = perm

    def batch(self, rows: slice) -> tuple[Array, Array, Array | None]:  # pragma: no cover - abstract
        """(x, t, labels) of the rows ``rows`` of this epoch's order, on the device."""
        raise NotImplementedError

    def _buffer(self, name: str, shape: tuple, dtype: Any, xp: Any = None) -> Array:
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = (xp or self.ops.xp).empty(shape, dtype)
        return buf


class InMemory(Source):
    """A set held on the device; a shuffled epoch is gathered into buffers once, then sliced per batch."""

    def order(self, perm: numpy.ndarray | None) -> None:
        super().order(perm)
        if perm is None:
            return
        idx = self.ops.device.asarray(perm)
        for name, src in (("x", self.x), ("t", self.t), ("labels", self.labels)):
            if src is not None:
                self.ops.gather_rows(src, idx, self._buffer(name, src.shape, src.dtype))

    def batch(self, rows: slice) -> tuple[Array, Array, Array | None]:
        if self.perm is None:
            x, t, lab = self.x, self.t, self.labels
        else:
            x, t, lab = self._buffers["x"], self._buffers["t"], self._buffers.get("labels")
        return x[rows], t[rows], None if lab is None else lab[rows]


class Memmap(Source):
    """A set read from a NumPy memmap a batch at a time, through two pinned host buffers on a GPU."""

    def batch(self, rows: slice) -> tuple[Array, Array, Array | None]:
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
            raw = self._buffer("raw", (self.batch_size, self.x.shape[1]), self.x.dtype, numpy)[:m]
            numpy.copyto(host, numpy.take(self.x, index, axis=0, out=raw, mode="clip"), casting="unsafe")
        if not numpy.isfinite(host).all():
            raise DataError(f"X contains NaN or infinite values (in the rows of a batch read from "
                            f"{getattr(self.x, 'filename', None) or 'the memmap'}); clean them first")
        x = stage.send(m)
        idx = self.ops.device.asarray(index)
        t = self.ops.gather_rows(self.t, idx, self._buffer("t", (self.batch_size, *self.t.shape[1:]),
                                                           self.t.dtype)[:m])
        lab = None
        if self.labels is not None:
            lab = self.ops.gather_rows(self.labels, idx,
                                       self._buffer("labels", (self.batch_size,), self.labels.dtype)[:m])
        return x, t, lab


class Sharded:
    """Rank ``rank`` of ``size``'s view of a source: its contiguous share of every minibatch (possibly empty;
    shares differ by at most one row), in the order every rank agrees on."""

    def __init__(self, inner: Source, rank: int, size: int):
        self.inner, self.rank, self.size = inner, rank, size
        self.n, self.sizes, self.labels = inner.n, inner.sizes, inner.labels

    def batches(self) -> list[tuple[int, slice]]:
        return self.inner.batches()

    def order(self, perm: numpy.ndarray | None) -> None:
        self.inner.order(perm)

    def batch(self, rows: slice) -> tuple[Array, Array, Array | None]:
        return self.inner.batch(shard(rows.start, min(rows.stop, self.n), self.rank, self.size))


def source(X: Any, Y: Any, loss: Loss, batch_size: int, ops: XpOps, dtype: numpy.dtype, n_in: int,
           n_out: int) -> Source:
    """The checked training set (X, Y) as a source: streamed for a memmap, else on the ops' device."""
    dev = ops.device
    streamed = is_streamed(X)
    x = streamed_features(X, n_in) if streamed else features(X, dev, dtype, n_in)
    t = targets(Y, dev, dtype, loss, n_out, x.shape[0])
    labels = Accuracy(dev.xp, n_out).labels(t) if is_classification(t) else None
    return (Memmap if streamed else InMemory)(x, t, labels, batch_size, ops, dtype)
