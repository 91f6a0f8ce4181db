"""The multi-layer network (lecture §1.2) and its training loop (backpropagation, lecture §2).

:class:`Sequential` keeps all weights and biases in one flat buffer on its device (each layer's W and
b are views into it), and all gradients in another, so an optimiser step is a few whole-buffer
operations. The lecture's loop is available one step at a time::

    net.forward(X)                       # step 2: y of every layer, layer by layer
    net.backward(Y, "squared_error")     # steps 3–4: δ of the output (eq 13) and hidden nodes (eq 14)
    net.step(gpunn.SGD(lr=0.5))          # step 5: w ← w − η δ y (eq 15)

and :meth:`Sequential.fit` repeats it over shuffled minibatches ("return to 2 unless you are satisfied").
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy

from . import losses as losses_mod
from . import optim
from .backend import _is_cupy_array, device_of, get_device, to_host
from .errors import ConfigError, DivergenceError, OutOfMemoryError, ShapeError
from .layers import Dense
from .validation import check_dtype, features, positive_int, targets

__all__ = ["Sequential", "History", "Evaluation"]


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


def _one_hot_rows(t: Any) -> bool:
    """True when t is 0/1 valued and each row is a class indicator (so accuracy is meaningful)."""
    if not bool(((t == 0) | (t == 1)).all()):
        return False
    return t.shape[1] == 1 or bool((t.sum(axis=1) == 1).all())


class _Accuracy:
    """Counts correct predictions per step into device buffers, without allocating."""

    def __init__(self, xp: Any, n_out: int):
        self.xp, self.binary = xp, n_out == 1
        self._bufs: dict[int, tuple] = {}

    def labels(self, t: Any) -> Any:
        return t[:, 0] > 0.5 if self.binary else self.xp.argmax(t, axis=1)

    def count(self, y: Any, labels: Any) -> Any:
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


class Sequential:
    """A feed-forward network: a list of :class:`~gpunn.Dense` layers applied in order.

    Parameters
    ----------
    layers : list of Dense
        Consecutive layers must chain: ``layers[k].n_out == layers[k+1].n_in``.
    device : str or Device, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; default from ``GPUNN_DEVICE``, else auto.
    dtype : {"float32", "float64"}, default "float32"
    seed : int, optional
        Seeds the host generator (PCG64) that draws the initial weights and the minibatch order, so
        a seed gives the same start and the same batches on every device.
    fused : bool, optional
        Use fused CUDA kernels on a GPU (default: on unless ``GPUNN_FUSED=0``).
    """

    def __init__(self, layers: list, device: Any = None, dtype: Any = "float32", seed: int | None = None,
                 fused: bool | None = None):
        layers = list(layers)
        if not layers:
            raise ConfigError("a Sequential network needs at least one layer")
        for k, layer in enumerate(layers):
            if not isinstance(layer, Dense):
                raise ConfigError(f"layer {k} is a {type(layer).__name__}, not a gpunn.Dense")
        for k in range(len(layers) - 1):
            if layers[k].n_out != layers[k + 1].n_in:
                raise ShapeError(f"layer {k} has n_out={layers[k].n_out} but layer {k + 1} has "
                                 f"n_in={layers[k + 1].n_in}; consecutive sizes must chain")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ConfigError("the same Dense object appears twice; create one per position")
        for layer in layers[:-1]:
            if layer.activation.rowwise:
                raise ConfigError("softmax can only be the activation of the last layer")
        self.layers = layers
        self.dtype = check_dtype(dtype)
        dev = get_device(device)
        self.device = dev if fused is None else dev.with_fused(fused)
        if seed is not None:
            seed = positive_int("seed", seed, allow_zero=True)
        self.seed = seed
        init_seq, shuffle_seq = numpy.random.SeedSequence(seed).spawn(2)
        self._shuffle_rng = numpy.random.Generator(numpy.random.PCG64(shuffle_seq))
        rng = numpy.random.Generator(numpy.random.PCG64(init_seq))
        host = numpy.zeros(sum(layer.n_in * layer.n_out + layer.n_out for layer in layers))
        for layer, (w, _) in zip(layers, _layout(layers)):
            host[w] = layer.initial_weights(rng).ravel()     # biases start at zero
        for layer in layers:
            layer.input_grad = True
        layers[0].input_grad = False     # the first layer computes no input gradient
        self._bind(host)
        self.optimizer: optim.Optimizer | None = None
        self.loss: losses_mod.Loss | None = None
        self.history: History | None = None
        self._grad_y: dict[int, Any] = {}

    # -- parameters -------------------------------------------------------------------------------
    def _bind(self, host_params: Any) -> None:
        dev = self.device
        with dev.activate():
            self._params = dev.asarray(host_params, dtype=self.dtype)
            self._grads = dev.xp.zeros_like(self._params)
        self._decay_mask = None
        self._grad_y = {}
        for layer, (w, b) in zip(self.layers, _layout(self.layers)):
            shape = (layer.n_in, layer.n_out)
            layer.bind(self._params[w].reshape(shape), self._params[b], self._grads[w].reshape(shape), self._grads[b])

    @property
    def ops(self) -> Any:
        return self.device.ops

    @property
    def xp(self) -> Any:
        return self.device.xp

    @property
    def n_in(self) -> int:
        return self.layers[0].n_in

    @property
    def n_out(self) -> int:
        return self.layers[-1].n_out

    @property
    def n_parameters(self) -> int:
        return int(self._params.size)

    def parameters(self) -> list:
        """[W₁, b₁, W₂, b₂, ...]: views of the live parameters on the model's device."""
        return [p for layer in self.layers for p in (layer.W, layer.b)]

    def flat_parameters(self) -> Any:
        """All parameters as one flat array (a view; W then b, layer by layer)."""
        return self._params

    def decay_mask(self) -> Any:
        """1 for weights, 0 for biases, as a flat array (used by weight decay)."""
        if self._decay_mask is None:
            host = numpy.zeros(self.n_parameters)
            for w, _ in _layout(self.layers):
                host[w] = 1.0
            self._decay_mask = self.device.asarray(host, dtype=self.dtype)
        return self._decay_mask

    def to(self, device: Any) -> Sequential:
        """Move the network to ``device`` (in place); returns self. Optimiser state starts afresh."""
        new = get_device(device)
        if new == self.device and new.fused == self.device.fused:
            return self
        host = to_host(self._params)
        self.device = new
        self._bind(host)
        return self

    # -- the lecture's step ----------------------------------------------------------------------
    def _forward(self, x: Any) -> Any:
        ops = self.ops
        for layer in self.layers:
            x = layer.forward(x, ops)
        return x

    def _backward(self, t: Any, loss: losses_mod.Loss) -> Any:
        out = self.layers[-1]
        b = t.shape[0]
        gy = self._grad_y.get(b)
        if gy is None:
            gy = self._grad_y[b] = self.xp.empty((b, self.n_out), self.dtype)
        bufs = out.buffers(self.xp, b)
        value, direct = loss.backward(out, t, gy, bufs.delta)
        ops = self.ops
        grad = out.backward(gy, ops, delta_ready=direct)
        for layer in reversed(self.layers[:-1]):
            grad = layer.backward(grad, ops)
        return value

    def _update(self, optimizer: optim.Optimizer) -> None:
        mask = self.decay_mask() if getattr(optimizer, "weight_decay", 0.0) else None
        optimizer.update(self._params, self._grads, mask, self.ops)

    def forward(self, X: Any) -> Any:
        """Forward pass (lecture §2 step 2) on a batch; returns the output y (a copy, on the model's device).

        Each layer's ``x, z, y`` stay readable until the next forward of the same batch size.
        """
        self._check_input_device(X)
        x = features(X, self.device, self.dtype, self.n_in)
        with self.device.activate():
            return self._forward(x).copy()

    def backward(self, Y: Any, loss: Any = "squared_error") -> float:
        """Backward pass for targets Y of the last forward (steps 3–4, eqs 13–14); returns the mean loss.

        Each layer's ``delta``, ``grad_W`` and ``grad_b`` hold the results afterwards.
        """
        loss = losses_mod.get(loss)
        loss.check_activation(self.layers[-1].activation)
        if self.layers[-1].y is None:
            raise ConfigError("call forward(X) before backward(Y)")
        n = self.layers[-1].y.shape[0]
        t = targets(Y, self.device, self.dtype, loss, self.n_out, n)
        with self.device.activate():
            return float(self._backward(t, loss))

    def step(self, optimizer: optim.Optimizer | None = None) -> None:
        """Update the weights from the last backward pass (step 5, eq 15); default ``SGD(lr=0.1)``."""
        if optimizer is None:
            optimizer = self.optimizer or optim.SGD(lr=0.1)
        self.optimizer = optimizer
        with self.device.activate():
            self._update(optimizer)

    # -- conveniences -----------------------------------------------------------------------------
    def _check_input_device(self, *arrays: Any) -> None:
        device_of(*arrays)  # raises on NumPy/CuPy mixing or two GPUs

    def predict(self, X: Any, batch_size: int = 8192) -> Any:
        """Outputs for X, shape (n_samples, n_out), as an array of the same library (and GPU) as X."""
        self._check_input_device(X)
        x = features(X, self.device, self.dtype, self.n_in)
        with self.device.activate():
            y = self._infer(x, batch_size)
        return device_of(X).asarray(y) if _is_cupy_array(X) else to_host(y)

    def _infer(self, x: Any, batch_size: int = 8192) -> Any:
        """Forward pass in chunks, without the training buffers (allocates; leaves layer state alone)."""
        outs = [self._infer_with_z(x[s:s + batch_size])[1] for s in range(0, x.shape[0], batch_size)]
        return outs[0] if len(outs) == 1 else self.xp.concatenate(outs)

    def _infer_with_z(self, x: Any) -> tuple[Any, Any]:
        """(z, y) of the last layer for a batch x, allocating fresh arrays."""
        xp = self.xp
        a, z = x, None
        for layer in self.layers:
            z = a @ layer.W
            z += layer.b
            col = xp.empty((z.shape[0], 2), z.dtype) if layer.activation.rowwise else None
            a = layer.activation.forward(z, xp.empty_like(z), col)
        return z, a

    def evaluate(self, X: Any, Y: Any, loss: Any = None) -> Evaluation:
        """Mean loss (the one used in :meth:`fit`, else squared error) and accuracy on (X, Y)."""
        loss = losses_mod.get(loss if loss is not None else (self.loss or "squared_error"))
        loss.check_activation(self.layers[-1].activation)
        self._check_input_device(X, Y)
        x = features(X, self.device, self.dtype, self.n_in)
        t = targets(Y, self.device, self.dtype, loss, self.n_out, x.shape[0])
        with self.device.activate():
            return self._evaluate(x, t, loss)

    def _evaluate(self, x: Any, t: Any, loss: losses_mod.Loss) -> Evaluation:
        xp = self.xp
        total, correct = 0.0, 0
        classify = _one_hot_rows(t)
        acc = _Accuracy(xp, self.n_out)
        for start in range(0, x.shape[0], 8192):
            xb, tb = x[start:start + 8192], t[start:start + 8192]
            z, y = self._infer_with_z(xb)
            total += float(loss.value(z, y, tb)) * xb.shape[0]
            if classify:
                correct += int(acc.count(y, acc.labels(tb)))
        n = x.shape[0]
        return Evaluation(total / n, correct / n if classify else None)

    # -- training ---------------------------------------------------------------------------------
    def fit(self, X: Any, Y: Any, loss: Any = "squared_error", optimizer: Any = None, epochs: int = 10,
            batch_size: int = 32, shuffle: bool = True, validation_data: tuple | None = None,
            patience: int | None = None, progress: bool | Callable[[dict], None] = False) -> History:
        """Train with minibatch backpropagation; returns a :class:`History` (also kept as ``self.history``).

        Parameters
        ----------
        X : array of shape (n_samples, n_in)
        Y : array of shape (n_samples, n_out), or integer labels (n_samples,) for cross-entropy
        loss : {"squared_error", "binary_cross_entropy", "cross_entropy"} or Loss
        optimizer : Optimizer or name, default SGD(lr=0.1)
        epochs : int >= 0
        batch_size : int >= 1; a batch size above n_samples trains on the whole set at once.
        shuffle : bool, reshuffle the samples every epoch (from the seeded host generator).
        validation_data : (X_val, Y_val), evaluated after every epoch.
        patience : int, stop when the validation loss (training loss without validation data) has not
            improved for this many epochs, and restore the best weights.
        progress : bool or callable; True prints one line per epoch to stderr, a callable gets each record.

        A NaN or infinite loss stops training with :class:`~gpunn.errors.DivergenceError` naming the
        epoch and step; the weights are left at the last state that gave a finite loss. On
        KeyboardInterrupt the weights and ``self.history`` are those of the last finished epoch.
        """
        loss = losses_mod.get(loss)
        loss.check_activation(self.layers[-1].activation)
        optimizer = optim.get(optimizer, **({} if optimizer is not None else {"lr": 0.1}))
        epochs = positive_int("epochs", epochs, allow_zero=True)
        batch_size = positive_int("batch_size", batch_size)
        if patience is not None:
            patience = positive_int("patience", patience)
        self._check_input_device(X, Y)
        dev = self.device
        self.loss, self.optimizer = loss, optimizer
        try:
            # Divergence is detected from the loss once per epoch (DivergenceError), so NumPy's
            # per-operation overflow warnings would only be noise on the way there.
            with dev.activate(), numpy.errstate(over="ignore", invalid="ignore"):
                return self._fit(X, Y, loss, optimizer, epochs, batch_size, shuffle, validation_data,
                                 patience, progress)
        except Exception as exc:
            if _is_cupy_oom(exc):
                raise OutOfMemoryError(
                    f"{dev} ran out of memory training with batch_size={batch_size} and "
                    f"{_n_samples(X)} samples ({exc}); use a smaller batch size, fewer or narrower layers, "
                    "or float32") from None
            raise

    def _fit(self, X, Y, loss, optimizer, epochs, batch_size, shuffle, validation_data, patience, progress):
        dev, xp = self.device, self.xp
        x_all = features(X, dev, self.dtype, self.n_in)
        n = x_all.shape[0]
        t_all = targets(Y, dev, self.dtype, loss, self.n_out, n)
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ConfigError("validation_data must be a pair (X_val, Y_val)")
            self._check_input_device(*validation_data)
            xv = features(validation_data[0], dev, self.dtype, self.n_in, "X_val")
            val = (xv, targets(validation_data[1], dev, self.dtype, loss, self.n_out, xv.shape[0], "Y_val"))
        batch_size = min(batch_size, n)
        starts = list(range(0, n, batch_size))
        sizes = numpy.array([min(batch_size, n - s) for s in starts], dtype=numpy.float64)
        classify = _one_hot_rows(t_all)
        acc = _Accuracy(xp, self.n_out)
        l_all = acc.labels(t_all) if classify else None
        if shuffle:
            xs, ts = xp.empty_like(x_all), xp.empty_like(t_all)
            ls = xp.empty_like(l_all) if classify else None
        else:
            xs, ts, ls = x_all, t_all, l_all
        step_loss = xp.empty(len(starts), dtype=self.dtype)
        step_correct = xp.zeros(len(starts), dtype=numpy.int64)
        history = History()
        self.history = history
        best = (math.inf, None, None)
        bad_epochs = 0
        for epoch in range(epochs):
            t0 = time.perf_counter()
            snap = (self._params.copy(), optimizer.snapshot())
            if shuffle:
                idx = dev.asarray(self._shuffle_rng.permutation(n))
                xp.take(x_all, idx, axis=0, out=xs)
                xp.take(t_all, idx, axis=0, out=ts)
                if classify:
                    xp.take(l_all, idx, axis=0, out=ls)
            try:
                for k, s in enumerate(starts):
                    x, t = xs[s:s + batch_size], ts[s:s + batch_size]
                    y = self._forward(x)
                    step_loss[k] = self._backward(t, loss)
                    if classify:
                        step_correct[k] = acc.count(y, ls[s:s + batch_size])
                    self._update(optimizer)
                losses_host = to_host(step_loss).astype(numpy.float64)    # read back once per epoch, not per step
                if not numpy.all(numpy.isfinite(losses_host)):
                    self._diverged(epoch, losses_host, snap, optimizer, xs, ts, starts, batch_size, loss)
                record = {"epoch": epoch + 1, "loss": float(losses_host @ sizes / n)}
                record["accuracy"] = float(to_host(step_correct).sum() / n) if classify else None
                if val is not None:
                    ev = self._evaluate(val[0], val[1], loss)
                    record["val_loss"], record["val_accuracy"] = ev.loss, ev.accuracy
                record["seconds"] = time.perf_counter() - t0
            except KeyboardInterrupt:
                self._restore(snap, optimizer)   # weights of the last finished epoch, as in the history
                raise
            history.append(record)
            _report(progress, record)
            if patience is not None:
                monitored = record.get("val_loss", record["loss"])
                if monitored < best[0]:
                    best, bad_epochs = (monitored, self._params.copy(), epoch + 1), 0
                else:
                    bad_epochs += 1
                    if bad_epochs >= patience:
                        history.stopped_early = True
                        break
        if patience is not None and best[1] is not None:
            self._params[...] = best[1]
            history.best_epoch = best[2]
        return history

    def _restore(self, snap: tuple, optimizer: optim.Optimizer) -> None:
        self._params[...] = snap[0]
        optimizer.restore(snap[1])

    def _diverged(self, epoch, losses_host, snap, optimizer, xs, ts, starts, batch_size, loss) -> None:
        """Roll back to the last parameters that gave a finite loss, then raise DivergenceError."""
        k = int(numpy.flatnonzero(~numpy.isfinite(losses_host))[0])
        # Replay the epoch's first k − 1 steps from its start (same batches, same arithmetic): the
        # parameters are then those that gave step k − 1 its finite loss. A first step that fails
        # leaves the parameters as the epoch began.
        self._restore(snap, optimizer)
        for s in starts[:max(k - 1, 0)]:
            self._forward(xs[s:s + batch_size])
            self._backward(ts[s:s + batch_size], loss)
            self._update(optimizer)
        what = "NaN" if numpy.isnan(losses_host[k]) else "infinite"
        raise DivergenceError(
            f"the loss became {what} at epoch {epoch + 1}, step {k + 1}; training stopped and the weights "
            "were left at the last finite state. Lower the learning rate, standardise the inputs, or use "
            "a loss that suits the output activation")

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: Any) -> None:
        """Write the network to ``path`` (.npz arrays + JSON header), atomically; see :func:`gpunn.load`."""
        from .io import save  # noqa: PLC0415
        save(self, path)

    def config(self) -> dict:
        return {"layers": [layer.config() for layer in self.layers], "dtype": self.dtype.name}

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Sequential([{inner}], device='{self.device}', dtype='{self.dtype.name}')"


def _layout(layers: list) -> list[tuple[slice, slice]]:
    """Where each layer's W and b live in the flat parameter (and gradient) buffer: W₁, b₁, W₂, b₂, ..."""
    out, off = [], 0
    for layer in layers:
        nw = layer.n_in * layer.n_out
        out.append((slice(off, off + nw), slice(off + nw, off + nw + layer.n_out)))
        off += nw + layer.n_out
    return out


def _is_cupy_oom(exc: BaseException) -> bool:
    """CuPy's out-of-memory errors (cupy.cuda.memory.OutOfMemoryError), recognised without importing CuPy."""
    return type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.split(".")[0] == "cupy"


def _n_samples(X: Any) -> int:
    """len(X), or 0 where X has none (the figure is only for the out-of-memory message)."""
    try:
        return len(X)
    except TypeError:
        return 0


def _report(progress: Any, record: dict) -> None:
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
