"""Inference: a network's outputs and scores for a data set, a chunk of rows at a time.

The same operations as training (fused kernels on a GPU), written into each layer's inference buffers
(so a training step's ``x, z, y`` stay as they were), :data:`CHUNK` rows at a time: the working memory
is bounded whatever the number of rows, and a NumPy memmap is read from its file a chunk at a time.
Several threads may predict at once; a lock orders their use of the shared inference buffers, and on a
GPU each holder's work waits for the last holder's on the device too (:class:`gpunn.backend.Handoff`), so
threads predicting on different CUDA streams never overwrite buffers still being read.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy

from .backend import Device, Handoff, device_of, is_cupy_array, to_host
from .data import Accuracy, is_classification, is_streamed
from .errors import ConcurrencyError
from .history import Evaluation
from .layers import Dense
from .losses import Loss
from .ops import XpOps
from .types import Array, ArrayLike
from .validation import features, positive_int, streamed_features, targets

__all__ = ["CHUNK", "Inference", "InferenceModel"]

#: Rows per chunk in predict/evaluate: bounds the inference buffers' memory.
CHUNK = 8192


class InferenceModel(Protocol):
    """What inference reads of a model."""

    layers: list[Dense]
    device: Device
    dtype: numpy.dtype

    @property
    def ops(self) -> XpOps: ...
    @property
    def n_in(self) -> int: ...
    @property
    def n_out(self) -> int: ...
    def training_elsewhere(self) -> bool: ...


class Inference:
    """Chunked forward passes of one model (held by the model; see the module docstring)."""

    def __init__(self, model: InferenceModel):
        self.model = model
        self._lock = threading.Lock()
        self._handoff: Handoff | None = None

    def inputs(self, X: ArrayLike) -> Any:
        """X checked and on the device; a memmap stays on disk (read a chunk at a time)."""
        m = self.model
        if is_streamed(X):
            return streamed_features(X, m.n_in)
        return features(X, m.device, m.dtype, m.n_in)

    def chunks(self, x: Any, chunk: int, use: Callable[[slice, Array, Array], None]) -> None:
        """Call ``use(rows, z, y)`` with the last layer's z and y for each chunk of x (under the lock)."""
        m = self.model
        if m.training_elsewhere():
            raise ConcurrencyError("this network is being trained in another thread; predict and evaluate "
                                   "would see weights in the middle of an update; wait for training to finish")
        streamed, ops = is_streamed(x), m.ops
        with self._lock, m.device.activate():
            if self._handoff is None or self._handoff.device != m.device:
                self._handoff = Handoff(m.device)
            self._handoff.acquire()                     # after the last holder's work, on any stream
            try:
                self._run(x, chunk, use, streamed, ops)
            finally:
                self._handoff.release()

    def _run(self, x: Any, chunk: int, use: Callable[[slice, Array, Array], None], streamed: bool,
             ops: XpOps) -> None:
        m = self.model
        for start in range(0, x.shape[0], chunk):
            a = x[start:start + chunk]
            if streamed:                                # read from the file, checked, moved: one chunk at a time
                a = features(a, m.device, m.dtype, m.n_in)
            z = a
            for layer in m.layers:
                z, a = layer.infer(a, ops)
            use(slice(start, start + a.shape[0]), z, a)

    def predict(self, X: ArrayLike, batch_size: int = CHUNK) -> Array:
        """Outputs for X, shape (n_samples, n_out), as an array of the same library (and GPU) as X."""
        batch_size = positive_int("batch_size", batch_size)
        device_of(X)
        x = self.inputs(X)
        m = self.model
        out = m.device.xp.empty((x.shape[0], m.n_out), m.dtype)

        def keep(rows: slice, z: Array, y: Array) -> None:
            out[rows] = y
        self.chunks(x, batch_size, keep)
        return device_of(X).asarray(out) if is_cupy_array(X) else to_host(out)

    def evaluate(self, X: ArrayLike, Y: ArrayLike, loss: Loss) -> Evaluation:
        """Mean loss and accuracy on (X, Y)."""
        device_of(X, Y)
        m = self.model
        x = self.inputs(X)
        t = targets(Y, m.device, m.dtype, loss, m.n_out, x.shape[0])
        return self.evaluate_prepared(x, t, loss)

    def evaluate_prepared(self, x: Any, t: Array, loss: Loss) -> Evaluation:
        """:meth:`evaluate` for arrays already checked and on the device (as training holds them)."""
        total, correct = [0.0], [0]
        classify = is_classification(t)
        acc = Accuracy(self.model.device.xp, self.model.n_out)

        def score(rows: slice, z: Array, y: Array) -> None:
            total[0] += float(loss.value(z, y, t[rows])) * y.shape[0]
            if classify:
                correct[0] += int(acc.count(y, acc.labels(t[rows])))
        self.chunks(x, CHUNK, score)
        n = x.shape[0]
        return Evaluation(total[0] / n, correct[0] / n if classify else None)
