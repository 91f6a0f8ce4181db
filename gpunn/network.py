"""The multi-layer network (lecture §1.2) and its training step (backpropagation, lecture §2).

:class:`Sequential` keeps all weights and biases in one flat buffer on its device (each layer's W and
b are views into it), and all gradients in another, so an optimiser step is a few whole-buffer
operations. The lecture's loop is available one step at a time::

    net.forward(X)                       # step 2: y of every layer, layer by layer
    net.backward(Y, "squared_error")     # steps 3–4: δ of the output (eq 13) and hidden nodes (eq 14)
    net.step(gpunn.SGD(lr=0.5))          # step 5: w ← w − η δ y (eq 15)

:meth:`Sequential.train_step` does all three on one batch without a host sync, and
:meth:`Sequential.fit` repeats it over shuffled minibatches (:mod:`gpunn.training`).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeGuard

import numpy

from . import io, optim, training
from . import losses as losses_mod
from .activations import Activation, ActivationSpec
from .backend import Device, device_of, get_device, is_cupy_array, to_host
from .callbacks import checked as checked_callbacks
from .distributed import Communicator
from .distributed import check as checked_comm
from .errors import (
    ConcurrencyError,
    ConfigError,
    DeviceError,
    DeviceSpecError,
    ModelFileError,
    OutOfMemoryError,
    ShapeError,
)
from .layers import Dense
from .ops import XpOps, ops_for
from .training import Evaluation, History
from .types import Array, ArrayLike, ArrayModule, DTypeLike, PathLike
from .validation import check_dtype, features, positive_int, streamed_features, targets

__all__ = ["Sequential", "Summary", "mlp", "load", "History", "Evaluation"]

#: Rows per chunk in predict/evaluate: bounds the inference buffers' memory.
INFER_CHUNK = 8192


class Summary(str):
    """The text of :meth:`Sequential.summary`; at a Python prompt it shows as the table itself."""

    def __repr__(self) -> str:
        return str(self)


class _OneTrainer:
    """Admits one thread at a time to a network's training methods (re-entrant for that thread); any
    other thread gets a ConcurrencyError instead of silently mixing its steps with the first one's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0

    def busy_elsewhere(self) -> bool:
        """Whether another thread is training right now."""
        owner = self._owner
        return owner is not None and owner != threading.get_ident()

    def __enter__(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
            return
        if not self._lock.acquire(blocking=False):
            raise ConcurrencyError("this network is being trained in another thread; its training methods "
                                   "(forward, backward, step, train_step, fit) take one thread at a time")
        self._owner, self._depth = me, 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()


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
        Use fused kernels: CUDA ones on a GPU, numba ones on the CPU where numba is installed (bitwise
        equal to the NumPy path); default: on unless ``GPUNN_FUSED=0``.

    ``predict`` and ``evaluate`` may be called from several threads at once; the training methods
    (``forward``, ``backward``, ``step``, ``train_step``, ``fit``) must not run concurrently on one network.
    """

    def __init__(self, layers: list[Dense], device: str | Device | None = None, dtype: DTypeLike = "float32",
                 seed: int | None = None, fused: bool | None = None):
        self.layers = _checked_layers(layers)
        for layer in self.layers:
            layer.attach(self)
        self.dtype = check_dtype(dtype)
        self.device = get_device(device)
        self._fused_choice = fused
        self.seed = None if seed is None else positive_int("seed", seed, allow_zero=True)
        init_seq, shuffle_seq = numpy.random.SeedSequence(self.seed).spawn(2)
        #: the seeded host generator of the minibatch order (used by :meth:`fit`)
        self.shuffle_rng = numpy.random.Generator(numpy.random.PCG64(shuffle_seq))
        rng = numpy.random.Generator(numpy.random.PCG64(init_seq))
        host = numpy.zeros(sum(layer.n_in * layer.n_out + layer.n_out for layer in self.layers))
        for layer, (w, _) in zip(self.layers, _layout(self.layers)):
            host[w] = layer.initial_weights(rng).ravel()     # biases start at zero
        for k, layer in enumerate(self.layers):
            layer.input_grad = k > 0      # the first layer computes no input gradient
        self._infer_lock = threading.Lock()
        self._trainer = _OneTrainer()
        self._bind(host)
        self.optimizer: optim.Optimizer | None = None
        self.loss: losses_mod.Loss | None = None
        self.history: History | None = None
        self._step_loss: losses_mod.Loss | None = None

    # -- parameters -------------------------------------------------------------------------------
    def _bind(self, host_params: numpy.ndarray) -> None:
        dev = self.device
        self._ops: XpOps = ops_for(dev, self._fused_choice)
        with dev.activate():
            self._params = dev.asarray(host_params, dtype=self.dtype)
            self._grads = dev.xp.zeros_like(self._params)
        self._decay_mask: Array = None
        self._grad_y: dict[int, Array] = {}
        for layer, (w, b) in zip(self.layers, _layout(self.layers)):
            shape = (layer.n_in, layer.n_out)
            layer.bind(self._params[w].reshape(shape), self._params[b], self._grads[w].reshape(shape), self._grads[b])

    @property
    def ops(self) -> XpOps:
        """The compute operations this network runs with (:func:`gpunn.ops.ops_for` of its device)."""
        return self._ops

    @property
    def fused(self) -> bool:
        """Whether the network runs gpunn's fused kernels (CUDA on a GPU, numba on the CPU)."""
        return self._ops.fused

    @property
    def xp(self) -> ArrayModule:
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

    def parameters(self) -> list[Array]:
        """[W₁, b₁, W₂, b₂, ...]: views of the live parameters on the model's device."""
        return [p for layer in self.layers for p in (layer.W, layer.b)]

    def flat_parameters(self) -> Array:
        """All parameters as one flat array (a view; W then b, layer by layer)."""
        return self._params

    def flat_gradients(self) -> Array:
        """All gradients ∂E/∂w of the last backward pass as one flat array, laid out as
        :meth:`flat_parameters` (a view: what the optimiser reads, and what data-parallel training sums)."""
        return self._grads

    def decay_mask(self) -> Array:
        """1 for weights, 0 for biases, as a flat array (used by weight decay)."""
        if self._decay_mask is None:
            host = numpy.zeros(self.n_parameters)
            for w, _ in _layout(self.layers):
                host[w] = 1.0
            self._decay_mask = self.device.asarray(host, dtype=self.dtype)
        return self._decay_mask

    def to(self, device: str | Device, fused: bool | None = None) -> Sequential:
        """Move the network to ``device`` (in place); returns self. Optimiser state starts afresh."""
        new = get_device(device)
        if new == self.device and fused == self._fused_choice:
            return self
        host = to_host(self._params)
        self.device, self._fused_choice = new, fused
        self._bind(host)
        return self

    # -- the lecture's step ----------------------------------------------------------------------
    def _forward(self, x: Array) -> Array:
        """Step 2: each layer's y = f(x·W + b) from the layer below's y."""
        self._ops.begin_step(x.shape[0])     # the CPU's BLAS threads for this batch (gpunn.threads)
        for layer in self.layers:
            x = layer.forward(x, self._ops)
        return x

    def _backward(self, t: Array, loss: losses_mod.Loss, value_out: Array | None = None) -> Array:
        """Steps 3–4: the output δ from the loss (eq 13), then each hidden layer's δ (eq 14)."""
        out, xp = self.layers[-1], self._ops.xp
        b = t.shape[0]
        gy = self._grad_y.get(b)
        if gy is None:
            gy = self._grad_y[b] = xp.empty((b, self.n_out), self.dtype)
        value, direct = self._ops.loss_backward(loss, out, t, gy, out.buffers(xp, b).delta, value_out)
        grad = out.backward(gy, self._ops, delta_ready=direct)
        for layer in reversed(self.layers[:-1]):
            grad = layer.backward(grad, self._ops)
        return value

    def _update(self, optimizer: optim.Optimizer) -> None:
        """Step 5: the optimiser's update of every weight (eq 15 for SGD)."""
        optimizer.attach(self)
        mask = self.decay_mask() if getattr(optimizer, "weight_decay", 0.0) else None
        optimizer.update(self._params, self._grads, mask, self._ops)

    def train_step(self, X: ArrayLike, Y: ArrayLike, loss: str | losses_mod.Loss,
                   optimizer: optim.Optimizer, out: Array | None = None, comm: Communicator | None = None,
                   global_batch: int | None = None) -> Array:
        """One forward, backward and update on one batch (lecture §2 steps 2–5); returns the batch's
        mean loss as a 0-d array on the model's device, without waiting for the device. With ``out`` (a
        one-element array of the model's device and dtype) the loss is written there instead, and no
        array is allocated: what :meth:`fit` does with its per-step loss buffer.

        With ``comm`` (:mod:`gpunn.distributed`), X and Y are this rank's share (possibly empty) of a
        batch of ``global_batch`` rows over all ranks: the gradient of the whole batch is summed from every
        rank's share, weighted by its rows, and every rank makes the same update. The loss returned is this
        rank's part of the batch's mean loss (the sum over ranks is the batch's mean loss).

        X and Y that are already arrays of the model's device and dtype, shaped (batch, n_in) and
        (batch, n_out), are used as they are (no checks that would read values back from a GPU);
        anything else goes through the full checks of :meth:`fit` first.
        """
        if loss is not self._step_loss:     # checked once per loss object, not every step
            loss = _loss_for(loss, self.layers[-1].activation)
            self._step_loss = loss
        if not isinstance(optimizer, optim.Optimizer):
            raise ConfigError(f"optimizer must be a gpunn optimiser such as gpunn.SGD(lr=0.1); got {optimizer!r}")
        if comm is not None and comm.size > 1:
            return self._shared_step(X, Y, loss, optimizer, out, comm, global_batch)
        x, t = self._batch(X, Y, loss)
        with self._trainer, self.device.activate():
            self._forward(x)
            value = self._backward(t, loss, out)
            self._update(optimizer)
        return value

    def _shared_step(self, X: Any, Y: Any, loss: losses_mod.Loss, optimizer: optim.Optimizer, out: Array | None,
                     comm: Communicator, global_batch: int | None) -> Array:
        """One data-parallel step: this rank's share of the gradient, one allreduce, the same update."""
        n_local = int(X.shape[0])
        if global_batch is None or not 0 <= n_local <= global_batch:
            raise ConfigError(f"a data-parallel step needs global_batch >= this rank's {n_local} rows; got "
                              f"{global_batch!r}")
        share = n_local / global_batch
        with self._trainer, self.device.activate():
            if n_local:
                x, t = self._batch(X, Y, loss)
                self._forward(x)
                value = self._backward(t, loss, out)
                self._grads *= share                  # this rank's rows' part of the batch mean
                value *= share
            else:                                      # a short last batch left this rank no rows
                self._grads.fill(0)
                value = out if out is not None else self.xp.zeros((), self.dtype)
                value[...] = 0
            comm.allreduce_sum(self._grads)
            self._update(optimizer)
        return value

    def _batch(self, X: ArrayLike, Y: ArrayLike, loss: losses_mod.Loss) -> tuple[Array, Array]:
        """(x, t) ready for a step: the arrays themselves when they already fit, else checked copies."""
        dev, array_type = self.device, self.xp.ndarray
        if (type(X) is array_type and type(Y) is array_type and X.dtype == self.dtype and Y.dtype == self.dtype
                and X.ndim == 2 and X.shape[1] == self.n_in and Y.shape == (X.shape[0], self.n_out)
                and (not dev.is_cuda or X.device.id == Y.device.id == dev.index)):
            return X, Y
        device_of(X, Y)
        x = features(X, dev, self.dtype, self.n_in)
        return x, targets(Y, dev, self.dtype, loss, self.n_out, x.shape[0])

    def forward(self, X: ArrayLike) -> Array:
        """Forward pass (lecture §2 step 2) on a batch; returns the output y (a copy, on the model's device).

        Each layer's ``x, z, y`` stay readable until the next forward of the same batch size.
        """
        device_of(X)
        x = features(X, self.device, self.dtype, self.n_in)
        with self._trainer, self.device.activate():
            return self._forward(x).copy()

    def backward(self, Y: ArrayLike, loss: str | losses_mod.Loss = "squared_error") -> float:
        """Backward pass for targets Y of the last forward (steps 3–4, eqs 13–14); returns the mean loss.

        Each layer's ``delta``, ``grad_W`` and ``grad_b`` hold the results afterwards.
        """
        loss = _loss_for(loss, self.layers[-1].activation)
        if self.layers[-1].y is None:
            raise ConfigError("call forward(X) before backward(Y)")
        n = self.layers[-1].y.shape[0]
        t = targets(Y, self.device, self.dtype, loss, self.n_out, n)
        with self._trainer, self.device.activate():
            return float(self._backward(t, loss))

    def step(self, optimizer: optim.Optimizer | None = None) -> None:
        """Update the weights from the last backward pass (step 5, eq 15); default ``SGD(lr=0.1)``."""
        if optimizer is None:
            optimizer = self.optimizer or optim.SGD(lr=0.1)
        with self._trainer, self.device.activate():
            self._update(optimizer)
        self.optimizer = optimizer

    # -- inference: the same ops as training, in chunks, in the layers' inference buffers ----------
    def _infer_chunks(self, x: Array, chunk: int, use: Callable[[slice, Array, Array], None]) -> None:
        """Call ``use(rows, z, y)`` with the last layer's z and y for each chunk of x (under the lock)."""
        if self._trainer.busy_elsewhere():
            raise ConcurrencyError("this network is being trained in another thread; predict and evaluate "
                                   "would see weights in the middle of an update; wait for training to finish")
        streamed = training.is_streamed(x)
        with self._infer_lock, self.device.activate():
            for start in range(0, x.shape[0], chunk):
                a = x[start:start + chunk]
                if streamed:                            # read from the file, checked, moved: one chunk at a time
                    a = features(a, self.device, self.dtype, self.n_in)
                z = a
                for layer in self.layers:
                    z, a = layer.infer(a, self._ops)
                use(slice(start, start + a.shape[0]), z, a)

    def predict(self, X: ArrayLike, batch_size: int = INFER_CHUNK) -> Array:
        """Outputs for X, shape (n_samples, n_out), as an array of the same library (and GPU) as X.

        Computed ``batch_size`` rows at a time (this bounds the working memory); a NumPy memmap is read from
        its file a chunk at a time.
        """
        batch_size = positive_int("batch_size", batch_size)
        device_of(X)
        x = self._inputs(X)
        out = self.xp.empty((x.shape[0], self.n_out), self.dtype)

        def keep(rows: slice, z: Array, y: Array) -> None:
            out[rows] = y
        self._infer_chunks(x, batch_size, keep)
        return device_of(X).asarray(out) if is_cupy_array(X) else to_host(out)

    def evaluate(self, X: ArrayLike, Y: ArrayLike, loss: str | losses_mod.Loss | None = None) -> Evaluation:
        """Mean loss (the one used in :meth:`fit`, else squared error) and accuracy on (X, Y)."""
        loss = _loss_for(loss if loss is not None else (self.loss or "squared_error"), self.layers[-1].activation)
        device_of(X, Y)
        x = self._inputs(X)
        t = targets(Y, self.device, self.dtype, loss, self.n_out, x.shape[0])
        return self.evaluate_prepared(x, t, loss)

    def _inputs(self, X: ArrayLike) -> Array:
        """X checked and on the device; a memmap stays on disk (read a chunk at a time by inference)."""
        if training.is_streamed(X):
            return streamed_features(X, self.n_in)
        return features(X, self.device, self.dtype, self.n_in)

    def evaluate_prepared(self, x: Array, t: Array, loss: losses_mod.Loss) -> Evaluation:
        """:meth:`evaluate` for arrays already checked and on the device (as :meth:`fit` holds them)."""
        total, correct = [0.0], [0]
        classify = training.is_classification(t)
        acc = training.Accuracy(self.xp, self.n_out)

        def score(rows: slice, z: Array, y: Array) -> None:
            total[0] += float(loss.value(z, y, t[rows])) * y.shape[0]
            if classify:
                correct[0] += int(acc.count(y, acc.labels(t[rows])))
        self._infer_chunks(x, INFER_CHUNK, score)
        n = x.shape[0]
        return Evaluation(total[0] / n, correct[0] / n if classify else None)

    # -- training ---------------------------------------------------------------------------------
    def fit(self, X: ArrayLike, Y: ArrayLike, loss: str | losses_mod.Loss | None = None,
            optimizer: optim.Optimizer | str | None = None, epochs: int = 10, batch_size: int = 32,
            shuffle: bool = True, validation_data: tuple | None = None, patience: int | None = None,
            progress: bool | Callable[[dict], None] = False, callbacks: list | None = None,
            checkpoint: PathLike | None = None, comm: Communicator | None = None) -> History:
        """Train with minibatch backpropagation; returns a :class:`History` (also kept as ``self.history``).

        Parameters
        ----------
        X : array of shape (n_samples, n_in)
        Y : array of shape (n_samples, n_out), or integer labels (n_samples,) for cross-entropy
        loss : {"squared_error", "binary_cross_entropy", "cross_entropy"} or Loss
            Default: the loss of the last fit (or of the loaded model file), else squared error.
        optimizer : Optimizer or name
            Default: the optimiser of the last fit (it continues with its state) or of the loaded model
            file, else SGD(lr=0.1).
        epochs : int >= 0
        batch_size : int >= 1; a batch size above n_samples trains on the whole set at once.
        shuffle : bool, reshuffle the samples every epoch (from the seeded host generator).
        validation_data : (X_val, Y_val), evaluated after every epoch.
        patience : int, stop when the validation loss (training loss without validation data) has not
            improved for this many epochs, and restore the best weights.
        progress : bool or callable; True prints one line per epoch to stderr, a callable gets each record.
        callbacks : list of objects with ``on_epoch_end(record)`` (:mod:`gpunn.callbacks`); one returning
            True stops training after that epoch.
        checkpoint : path; after every epoch everything needed to continue is written there atomically,
            and a run started again with the same path and settings resumes from it
            (:mod:`gpunn.checkpoint`): the result is bitwise the same as an uninterrupted run's.
        comm : :class:`gpunn.distributed.Communicator`; data-parallel training over its ranks, every rank
            calling fit with the same data and settings. ``batch_size`` is then the global batch; only
            rank 0 reports progress and writes the checkpoint.

        A NaN or infinite loss stops training with :class:`~gpunn.errors.DivergenceError` naming the
        epoch and step; the weights are left at the last state that gave a finite loss. On
        KeyboardInterrupt the weights and ``self.history`` are those of the last finished epoch.
        """
        loss = _loss_for(loss if loss is not None else (self.loss or "squared_error"), self.layers[-1].activation)
        if optimizer is None:
            optimizer = self.optimizer or optim.SGD(lr=0.1)
        optimizer = optim.get(optimizer)
        epochs = positive_int("epochs", epochs, allow_zero=True)
        batch_size = positive_int("batch_size", batch_size)
        if patience is not None:
            patience = positive_int("patience", patience)
        callbacks = checked_callbacks(callbacks)
        comm = checked_comm(comm)
        device_of(X, Y)
        try:
            # Divergence is detected from the loss once per epoch (DivergenceError), so NumPy's
            # per-operation overflow warnings would only be noise on the way there.
            with self._trainer, self.device.activate(), numpy.errstate(over="ignore", invalid="ignore"):
                return training.fit(self, X, Y, loss, optimizer, epochs, batch_size, shuffle, validation_data,
                                    patience, progress, callbacks, checkpoint, comm)
        except Exception as exc:
            if _is_cupy_oom(exc):
                raise OutOfMemoryError(
                    f"{self.device} ran out of memory training with batch_size={batch_size} and "
                    f"{_n_samples(X)} samples ({exc}); use a smaller batch size, fewer or narrower layers, "
                    "or float32") from None
            raise

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write the network to ``path`` (.npz arrays + JSON header), atomically; see :func:`load`."""
        extra = {"loss": self.loss.name if self.loss else None,
                 "optimizer": self.optimizer.config() if self.optimizer else None}
        io.write_model(path, {**self.config(), **extra}, to_host(self._params))

    @classmethod
    def load(cls, path: PathLike, device: str | Device | None = None) -> Sequential:
        """Read a network saved by :meth:`save` onto ``device`` (default: the default device).

        Every malformed file is a :class:`~gpunn.errors.ModelFileError`, found with time and memory bounded
        by the file's size (see :mod:`gpunn.io`).
        """
        header, params = io.read_model(path)
        _check_layer_sizes(header, params.size, path)      # before anything is allocated from the header
        try:
            net = cls.from_config(header, device=device)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, (DeviceError, DeviceSpecError)):
                raise
            raise ModelFileError(f"{path} has an invalid layer description: {exc}") from None
        net._params[...] = net.device.asarray(params)
        try:
            net.loss = losses_mod.get(header["loss"]) if header.get("loss") else None
            net.optimizer = optim.from_config(header["optimizer"]) if header.get("optimizer") else None
            if net.loss is not None:
                net.loss.check_activation(net.layers[-1].activation)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ModelFileError(f"{path} has an invalid loss or optimiser description: {exc}") from None
        return net

    @classmethod
    def from_config(cls, config: dict, device: str | Device | None = None, seed: int | None = 0) -> Sequential:
        """A network of the layers and dtype in ``config`` (as :meth:`config` returns it), freshly initialised."""
        return cls([Dense.from_config(c) for c in config["layers"]], device=device, dtype=config["dtype"], seed=seed)

    def config(self) -> dict:
        """The architecture: each layer's configuration and the dtype (what :meth:`from_config` takes)."""
        return {"layers": [layer.config() for layer in self.layers], "dtype": self.dtype.name}

    def summary(self) -> Summary:
        """A table of the layers: sizes, activations, parameter counts and the total (shows itself at a prompt)."""
        head = ["#", "layer", "inputs -> outputs", "activation", "weights", "biases", "parameters"]
        rows = [[str(k), "Dense", f"{layer.n_in} -> {layer.n_out}", repr(layer.activation),
                 f"{layer.n_in * layer.n_out:,}", f"{layer.n_out:,}", f"{layer.n_in * layer.n_out + layer.n_out:,}"]
                for k, layer in enumerate(self.layers)]
        rows.append(["", "total", "", "", "", "", f"{self.n_parameters:,}"])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        kernels = ", fused CUDA kernels" if self.device.is_cuda else ", fused CPU kernels"
        lines = [f"Sequential on {self.device}, {self.dtype.name}" + (kernels if self.fused else "")]
        for r in [head, *rows]:
            lines.append("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        return Summary("\n".join(lines))

    # -- pickle and copy.deepcopy: through host arrays, onto the same device ----------------------
    def __getstate__(self) -> dict:
        return {"config": self.config(), "params": numpy.array(to_host(self._params), copy=True),
                "device": str(self.device), "fused": self._fused_choice, "seed": self.seed,
                "shuffle_rng": self.shuffle_rng.bit_generator.state, "loss": self.loss.name if self.loss else None,
                "optimizer": self.optimizer, "history": self.history}

    def __setstate__(self, state: dict) -> None:
        self.__init__([Dense.from_config(c) for c in state["config"]["layers"]],  # type: ignore[misc]
                      device=state["device"], dtype=state["config"]["dtype"], seed=state["seed"],
                      fused=state["fused"])
        self._params[...] = self.device.asarray(state["params"])
        self.shuffle_rng.bit_generator.state = state["shuffle_rng"]
        self.loss = losses_mod.get(state["loss"]) if state["loss"] else None
        self.optimizer, self.history = state["optimizer"], state["history"]

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Sequential([{inner}], device='{self.device}', dtype='{self.dtype.name}')"


def mlp(sizes: list[int], activation: ActivationSpec = "sigmoid", output: ActivationSpec = "softmax",
        init: str | None = None,
        **sequential_kwargs: Any) -> Sequential:
    """A multi-layer perceptron: ``Dense`` layers of the given sizes, input to output.

    ``mlp([784, 512, 512, 10], activation="relu", output="softmax", device="cuda:0", seed=0)`` has two
    hidden ReLU layers of 512 and a softmax output of 10; other keywords go to :class:`Sequential`.
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ConfigError(f"mlp needs at least two sizes (inputs and outputs); got {sizes!r}")
    layers = [Dense(n_in, n_out, activation if k < len(sizes) - 2 else output, init=init)
              for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))]
    return Sequential(layers, **sequential_kwargs)


def load(path: PathLike, device: str | Device | None = None) -> Sequential:
    """Load a network saved with :meth:`Sequential.save` onto ``device``."""
    return Sequential.load(path, device=device)


def _checked_layers(layers: Any) -> list[Dense]:
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
    if layers[-1].activation.rowwise and layers[-1].n_out == 1:
        raise ConfigError("softmax over a single output is always 1; use activation='sigmoid' for one "
                          "output unit (with binary_cross_entropy), or give the last layer two or more outputs")
    return layers


def _check_layer_sizes(header: dict, n_params: int, path: Any) -> None:
    """ModelFileError unless the header's layers are Dense layers that chain and hold exactly ``n_params``
    parameters (so nothing larger than the file's own parameters is ever allocated)."""
    layers = header.get("layers")
    if not isinstance(layers, list) or not layers or len(layers) > n_params:
        raise ModelFileError(f"{path} has no valid layer list in its header")
    total, previous = 0, None
    for k, c in enumerate(layers):
        n_in, n_out = (c.get("n_in"), c.get("n_out")) if isinstance(c, dict) else (None, None)
        if not (isinstance(c, dict) and c.get("type") == "Dense" and _size(n_in) and _size(n_out)):
            raise ModelFileError(f"{path}: layer {k} is not a Dense layer with positive sizes "
                                 f"({str(c)[:120]}); this gpunn knows Dense layers only")
        if previous is not None and n_in != previous:
            raise ModelFileError(f"{path}: layer {k} has n_in={n_in} but the layer before has n_out={previous}")
        total += n_in * n_out + n_out
        previous = n_out
    if total != n_params:
        raise ModelFileError(f"{path}: the layers need {total} parameters but the file holds {n_params}")


def _size(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _loss_for(loss: str | losses_mod.Loss, activation: Activation) -> losses_mod.Loss:
    """The loss named ``loss``, refused (ConfigError) when it does not suit the output activation."""
    loss = losses_mod.get(loss)
    loss.check_activation(activation)
    return loss


def _layout(layers: list[Dense]) -> list[tuple[slice, slice]]:
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
