"""The multi-layer network (lecture §1.2) and its training step (backpropagation, lecture §2).

:class:`Sequential` keeps all weights and biases in one flat buffer on its device (each layer's W and
b are views into it), and all gradients in another, so an optimiser step is a few whole-buffer
operations. The lecture's loop is available one step at a time::

    net.forward(X)                       # step 2: y of every layer, layer by layer
    net.backward(Y, "squared_error")     # steps 3–4: δ of the output (eq 13) and hidden nodes (eq 14)
    net.step(gpunn.SGD(lr=0.5))          # step 5: w ← w − η δ y (eq 15)

:meth:`Sequential.train_step` does all three on one batch without a host sync, and
:meth:`Sequential.fit` repeats it over shuffled minibatches. The model hands the rest to units of
their own: the flat buffers to :mod:`gpunn.params`, the epoch loop to :mod:`gpunn.trainer` (with a
strategy from :mod:`gpunn.strategy`), chunked inference to :mod:`gpunn.inference` and the file to
:mod:`gpunn.modelfile`.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy

from . import losses as losses_mod
from . import modelfile, optim
from .activations import Activation, ActivationSpec
from .admission import Admission
from .backend import Device, device_of, get_device
from .backprop import Backprop
from .callbacks import checked as checked_callbacks
from .distributed import Communicator
from .distributed import check as checked_comm
from .errors import (
    ConfigError,
    OutOfMemoryError,
    ShapeError,
)
from .history import Evaluation, History
from .inference import CHUNK, Inference
from .layers import Dense
from .ops import ops_for
from .params import ParameterStore
from .scalars import flag, integer, shown
from .strategy import for_communicator
from .trainer import Trainer
from .types import Array, ArrayLike, DTypeLike, PathLike
from .validation import StepArrays, check_dtype, features, positive_int, targets

__all__ = ["Sequential", "Summary", "mlp", "load", "History", "Evaluation"]

#: Rows per chunk in predict/evaluate: bounds the inference buffers' memory.
INFER_CHUNK = CHUNK


class Summary(str):
    """The text of :meth:`Sequential.summary`; at a Python prompt it shows as the table itself."""

    def __repr__(self) -> str:
        return str(self)


class Sequential:
    """A feed-forward network: a list of :class:`~gpunn.Dense` layers applied in order.

    layers : list of Dense, chaining: ``layers[k].n_out == layers[k+1].n_in``.
    device : ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a Device; default ``GPUNN_DEVICE``, else auto.
    dtype : {"float32", "float64"}, default "float32".
    seed : int; seeds the host generators (PCG64) of the initial weights and of the minibatch order
        (``shuffle_rng``, drawn from by the trainer): the same start and batches on every device.
    fused : bool; fused kernels, CUDA on a GPU, numba on the CPU (default: on unless ``GPUNN_FUSED=0``).

    ``predict`` and ``evaluate`` may be called from several threads at once; the training methods
    (``forward``, ``backward``, ``step``, ``train_step``, ``fit``) must not run concurrently on one network.
    The run's state (``loss``, ``optimizer``, ``history``) is that of the last fit.
    """

    def __init__(self, layers: list[Dense], device: str | Device | None = None, dtype: DTypeLike = "float32",
                 seed: int | None = None, fused: bool | None = None):
        self.layers = _checked_layers(layers)
        for k, layer in enumerate(self.layers):
            layer.attach(self)
            layer.input_grad = k > 0      # the first layer computes no input gradient
        self.dtype = check_dtype(dtype)
        self.device = get_device(device)
        self._fused_choice = None if fused is None else flag("fused", fused)
        self.seed = None if seed is None else integer("seed", seed, low=0, limit=None)
        init_seq, shuffle_seq = numpy.random.SeedSequence(self.seed).spawn(2)
        #: the seeded host generator of the minibatch order (the trainer draws each epoch's order from it)
        self.shuffle_rng = numpy.random.Generator(numpy.random.PCG64(shuffle_seq))
        store = ParameterStore.initial(self.layers, self.device, self.dtype,
                                       numpy.random.Generator(numpy.random.PCG64(init_seq)))
        self._admission = Admission()
        self._ref = weakref.ref(self)       # the optimiser's owner_ref once attached (Optimizer.attach)
        self._inference = Inference(self)
        self._use(store)
        self.optimizer: optim.Optimizer | None = None
        self.loss: losses_mod.Loss | None = None
        self.history: History | None = None

    # -- parameters -------------------------------------------------------------------------------
    def _use(self, store: ParameterStore) -> None:
        self._store, self._ops = store, ops_for(store.device, self._fused_choice)
        self._backprop = Backprop(self.layers, store, self._ops)
        self._step_arrays = StepArrays(store.device, store.dtype, self.layers[0].n_in, self.layers[-1].n_out,
                                       lambda loss: _loss_for(loss, self.layers[-1].activation))

    ops = property(lambda self: self._ops, doc="The compute operations of the network's device (gpunn.ops.ops_for).")
    fused = property(lambda self: self._ops.fused, doc="Whether the network runs fused kernels (CUDA or numba).")
    xp = property(lambda self: self.device.xp, doc="The array module of the network's device.")
    n_in = property(lambda self: self.layers[0].n_in, doc="Inputs of the first layer.")
    n_out = property(lambda self: self.layers[-1].n_out, doc="Outputs of the last layer.")
    n_parameters = property(lambda self: self._store.size, doc="Weights and biases in all.")

    def parameters(self) -> list[Array]:
        """[W₁, b₁, W₂, b₂, ...]: views of the live parameters on the model's device."""
        return [p for layer in self.layers for p in (layer.W, layer.b)]

    def flat_parameters(self) -> Array:
        """All parameters as one flat array (a view; W then b, layer by layer)."""
        return self._store.params

    def flat_gradients(self) -> Array:
        """All gradients ∂E/∂w of the last backward pass as one flat array, laid out as
        :meth:`flat_parameters` (a view: what the optimiser reads, and what data-parallel training sums)."""
        return self._store.grads

    def decay_mask(self) -> Array:
        """1 for weights, 0 for biases, as a flat array (used by weight decay)."""
        return self._store.decay_mask()

    def output(self) -> Array:
        """The output layer's y from the last forward pass (of training, not of inference)."""
        return self.layers[-1].y

    def to(self, device: str | Device, fused: bool | None = None) -> Sequential:
        """Move the network to ``device`` (in place); returns self. Optimiser state starts afresh."""
        new, fused = get_device(device), None if fused is None else flag("fused", fused)
        if new == self.device and fused == self._fused_choice:
            return self
        with self._admission:       # like a training method: never under another thread's training or reading
            self.device, self._fused_choice = new, fused
            self._use(self._store.moved(new))
        return self

    # -- the lecture's step (gpunn.backprop) ------------------------------------------------------------
    def gradients(self, X: ArrayLike, Y: ArrayLike, loss: str | losses_mod.Loss, out: Array | None = None) -> Array:
        """Steps 2–4 on one batch, without the update: every layer's δ and ∂E/∂w (:meth:`flat_gradients`).
        Returns the batch's mean loss as :meth:`train_step` does (into ``out`` when given); no host sync."""
        x, t, checked = self._step_arrays(X, Y, loss, out)
        return self._admission.run(self._backprop.gradients, x, t, checked, out)    # the device made current there

    def update(self, optimizer: optim.Optimizer) -> None:
        """Step 5: the optimiser's update of every weight from the current gradients (eq 15 for SGD)."""
        _check_optimizer(optimizer)
        with self._admission, self.device.activate():
            optimizer.attach(self)
            self._backprop.update(optimizer)

    def train_step(self, X: ArrayLike, Y: ArrayLike, loss: str | losses_mod.Loss,
                   optimizer: optim.Optimizer, out: Array | None = None) -> Array:
        """One forward, backward and update on one batch (lecture §2 steps 2–5); returns the batch's mean
        loss on the model's device (a NumPy scalar on the CPU, a 0-d CuPy array on a GPU), without waiting for
        it (written into ``out``, a one-element device array, when given: then nothing is allocated). X and Y
        that are already arrays of the model's device, dtype and shapes are used as they are
        (:class:`gpunn.validation.StepArrays`), anything else is checked as :meth:`fit` checks it. Data-parallel
        steps: :mod:`gpunn.strategy`."""
        if not isinstance(optimizer, optim.Optimizer):
            _check_optimizer(optimizer)
        x, t, checked = self._step_arrays(X, Y, loss, out)
        # one trainer at a time (gpunn.admission); the step attaches the optimiser to this network first
        return self._admission.run(self._backprop.step, x, t, checked, optimizer, out, self._ref)

    def forward(self, X: ArrayLike) -> Array:
        """Forward pass (lecture §2 step 2) on a batch; returns the output y (a copy, on the model's device).
        Each layer's ``x, z, y`` stay readable until the next forward of the same batch size."""
        device_of(X)
        x = features(X, self.device, self.dtype, self.n_in)
        with self._admission, self.device.activate():
            return self._backprop.forward(x).copy()

    def backward(self, Y: ArrayLike, loss: str | losses_mod.Loss = "squared_error") -> float:
        """Backward pass for targets Y of the last forward (steps 3–4, eqs 13–14); returns the mean loss.
        Each layer's ``delta``, ``grad_W`` and ``grad_b`` hold the results afterwards."""
        loss = _loss_for(loss, self.layers[-1].activation)
        if self.layers[-1].y is None:
            raise ConfigError("call forward(X) before backward(Y)")
        t = targets(Y, self.device, self.dtype, loss, self.n_out, self.layers[-1].y.shape[0])
        with self._admission, self.device.activate():
            return float(self._backprop.backward(t, loss))

    def step(self, optimizer: optim.Optimizer | None = None) -> None:
        """Update the weights from the last backward pass (step 5, eq 15); default ``SGD(lr=0.1)``."""
        optimizer = optimizer or self.optimizer or optim.SGD(lr=0.1)
        self.update(optimizer)
        self.optimizer = optimizer

    # -- inference (gpunn.inference) ----------------------------------------------------------------
    def reading(self, what: str) -> contextlib.AbstractContextManager[None]:
        return self._admission.reading(what)        # holds training off (gpunn.admission)

    def predict(self, X: ArrayLike, batch_size: int = INFER_CHUNK) -> Array:
        """Outputs for X, shape (n_samples, n_out), as an array of the same library (and GPU) as X, computed
        ``batch_size`` rows at a time (a memmap is read from its file a chunk at a time)."""
        return self._inference.predict(X, batch_size)

    def evaluate(self, X: ArrayLike, Y: ArrayLike, loss: str | losses_mod.Loss | None = None) -> Evaluation:
        """Mean loss (the one used in :meth:`fit`, else :meth:`fit`'s default) and accuracy on (X, Y)."""
        loss = _loss_for(loss if loss is not None else (self.loss or _default_loss(self)), self.layers[-1].activation)
        return self._inference.evaluate(X, Y, loss)

    def evaluate_prepared(self, x: Array, t: Array, loss: losses_mod.Loss) -> Evaluation:
        """:meth:`evaluate` for arrays already checked and on the device (as :meth:`fit` holds them)."""
        return self._inference.evaluate_prepared(x, t, loss)

    # -- training (gpunn.trainer) ---------------------------------------------------------------------
    def fit(self, X: ArrayLike, Y: ArrayLike, loss: str | losses_mod.Loss | None = None,
            optimizer: optim.Optimizer | str | None = None, epochs: int = 10, batch_size: int = 32,
            shuffle: bool = True, validation_data: tuple | None = None, patience: int | None = None,
            progress: bool | Callable[[dict], None] = False, callbacks: list | None = None,
            checkpoint: PathLike | None = None, comm: Communicator | None = None) -> History:
        """Train with minibatch backpropagation (:mod:`gpunn.trainer`); returns a :class:`History`, also
        kept as ``self.history``, with ``self.loss`` and ``self.optimizer`` (the run's state).

        X : array of shape (n_samples, n_in), or a NumPy memmap (read a batch at a time).
        Y : array of shape (n_samples, n_out), or integer labels (n_samples,) for cross-entropy.
        loss : {"squared_error", "binary_cross_entropy", "cross_entropy"} or Loss; default: the last fit's
            (or the loaded model file's), else cross-entropy after a softmax output and squared error otherwise.
        optimizer : Optimizer or name; default: the last fit's (it continues with its state) or the loaded
            file's, else SGD(lr=0.1).
        epochs : int >= 0. batch_size : int >= 1 (above n_samples: the whole set at once).
        shuffle : reshuffle the samples every epoch (from the seeded ``shuffle_rng``).
        validation_data : (X_val, Y_val), evaluated after every epoch.
        patience : stop when the validation loss (training loss without validation data) has not improved
            for this many epochs, and restore the best weights.
        progress : True prints one line per epoch to stderr; a callable gets each record.
        callbacks : objects with ``on_epoch_end(record)`` (:mod:`gpunn.callbacks`); True from one stops.
        checkpoint : path written atomically after every epoch; a run started again with the same path and
            settings resumes from it, bitwise the same as an uninterrupted run (:mod:`gpunn.checkpoint`).
        comm : :class:`gpunn.distributed.Communicator`: data-parallel over its ranks
            (:class:`gpunn.strategy.DataParallel`); ``batch_size`` is then the global batch, and only rank 0
            reports and writes the checkpoint.

        A NaN or infinite loss raises :class:`~gpunn.errors.DivergenceError` naming the epoch and step, the
        weights left at the last state whose loss was finite. On KeyboardInterrupt the weights and
        ``self.history`` are those of the last finished epoch.
        """
        loss = _loss_for(loss if loss is not None else (self.loss or _default_loss(self)), self.layers[-1].activation)
        optimizer = optim.get(optimizer if optimizer is not None else (self.optimizer or optim.SGD(lr=0.1)))
        trainer = Trainer(positive_int("epochs", epochs, allow_zero=True), positive_int("batch_size", batch_size),
                          flag("shuffle", shuffle), None if patience is None else positive_int("patience", patience),
                          progress if callable(progress) else flag("progress", progress),
                          checked_callbacks(callbacks), checkpoint, for_communicator(checked_comm(comm)))
        device_of(X, Y)
        # Divergence is detected from the loss once per epoch (DivergenceError), so NumPy's
        # per-operation overflow warnings would only be noise on the way there.
        with _out_of_memory_said(self.device, batch_size, X), trainer.strategy.guard(), self._admission, \
                self.device.activate(), numpy.errstate(over="ignore", invalid="ignore"):
            run = trainer.start(self, X, Y, loss, optimizer, validation_data, self.shuffle_rng)
            try:
                self.loss, self.optimizer, self.history = loss, optimizer, run.history   # once the data passed
                return run.train()
            finally:        # this run's state, even after a callback's own fit; free the run's copy of X
                self.loss, self.optimizer, self.history = loss, optimizer, run.history
                self.layers[0].keep_own_input()

    # -- persistence (gpunn.modelfile) --------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write the network to ``path`` atomically, in its extension's format: ``.npz`` (gpunn's), ``.onnx``
        or ``.safetensors`` (:mod:`gpunn.exports`); any other extension is a SaveError."""
        with self._admission.reading("save"):
            modelfile.write(path, self, self.loss, self.optimizer)

    @classmethod
    def load(cls, path: PathLike, device: str | Device | None = None) -> Sequential:
        """Read a network saved by :meth:`save` (``.npz`` or ``.safetensors``) onto ``device`` (default: the
        default device). Every malformed file is a :class:`~gpunn.errors.ModelFileError`, found with time and
        memory bounded by the file's size (see :mod:`gpunn.modelfile`)."""
        saved = modelfile.read(path)
        net = cls(saved.layers, device=device, dtype=saved.dtype, seed=0)
        net._store.assign(saved.params)
        net.loss, net.optimizer = saved.loss, saved.optimizer
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
        return _summary(self)

    # -- pickle and copy.deepcopy: through host arrays, onto the same device ----------------------
    def __getstate__(self) -> dict:
        return _pickled(self)

    def __setstate__(self, state: dict) -> None:
        _unpickled(self, state)

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Sequential([{inner}], device='{self.device}', dtype='{self.dtype.name}')"


def _pickled(net: Sequential) -> dict:
    """A network's pickle: host arrays and copies taken together, while no other thread trains it."""
    with net.reading("a copy or pickle"):
        return {"config": net.config(), "params": net._store.host(), "device": str(net.device),
                "fused": net._fused_choice, "seed": net.seed, "loss": net.loss,
                "shuffle_rng": net.shuffle_rng.bit_generator.state,
                "optimizer": copy.deepcopy(net.optimizer), "history": copy.deepcopy(net.history)}


def _unpickled(net: Sequential, state: dict) -> None:
    """Make ``net`` (a bare instance) the network of a :func:`_pickled` state, on the same device."""
    net.__init__([Dense.from_config(c) for c in state["config"]["layers"]],  # type: ignore[misc]
                 device=state["device"], dtype=state["config"]["dtype"], seed=state["seed"], fused=state["fused"])
    net._store.assign(state["params"])
    net.shuffle_rng.bit_generator.state = state["shuffle_rng"]
    net.loss, net.optimizer, net.history = state["loss"], state["optimizer"], state["history"]


def _summary(net: Sequential) -> Summary:
    head = ["#", "layer", "inputs -> outputs", "activation", "weights", "biases", "parameters"]
    rows = [[str(k), "Dense", f"{layer.n_in} -> {layer.n_out}", repr(layer.activation),
             f"{layer.n_in * layer.n_out:,}", f"{layer.n_out:,}", f"{layer.n_in * layer.n_out + layer.n_out:,}"]
            for k, layer in enumerate(net.layers)]
    rows.append(["", "total", "", "", "", "", f"{net.n_parameters:,}"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    kernels = ", fused CUDA kernels" if net.device.is_cuda else ", fused CPU kernels"
    lines = [f"Sequential on {net.device}, {net.dtype.name}" + (kernels if net.fused else "")]
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return Summary("\n".join(lines))


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
    if isinstance(layers, Dense):
        raise ConfigError("layers must be a list of gpunn.Dense; got one Dense: pass [layer]")
    if layers is None or isinstance(layers, (str, bytes, dict, set, frozenset)) or not hasattr(layers, "__iter__"):
        raise ConfigError(f"layers must be a list (or tuple) of gpunn.Dense; got {shown(layers)} "
                          f"({type(layers).__name__})")
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


def _default_loss(net: Sequential) -> str:
    """The loss of a fit or evaluate given none (and none from an earlier fit or file): cross-entropy after a
    softmax output (squared error there would train a classifier slowly and score it oddly), else squared error."""
    return "cross_entropy" if net.layers[-1].activation.rowwise else "squared_error"


def _loss_for(loss: str | losses_mod.Loss, activation: Activation) -> losses_mod.Loss:
    """The loss named ``loss``, refused (ConfigError) when it does not suit the output activation."""
    loss = losses_mod.get(loss)
    loss.check_activation(activation)
    return loss


def _check_optimizer(optimizer: Any) -> None:
    """ConfigError unless ``optimizer`` is a gpunn optimiser."""
    if not isinstance(optimizer, optim.Optimizer):
        raise ConfigError(f"optimizer must be a gpunn optimiser such as gpunn.SGD(lr=0.1); got {optimizer!r}")


@contextlib.contextmanager
def _out_of_memory_said(device: Device, batch_size: int, X: Any) -> Iterator[None]:
    """CuPy's out-of-memory error inside as an OutOfMemoryError that says what to change."""
    try:
        yield
    except Exception as exc:
        if _is_cupy_oom(exc):
            raise OutOfMemoryError(
                f"{device} ran out of memory training with batch_size={batch_size} and {_n_samples(X)} samples "
                f"({exc}); use a smaller batch size, fewer or narrower layers, or float32") from None
        raise


def _is_cupy_oom(exc: BaseException) -> bool:
    """CuPy's out-of-memory errors (cupy.cuda.memory.OutOfMemoryError), recognised without importing CuPy."""
    return type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.split(".")[0] == "cupy"


def _n_samples(X: Any) -> int:
    """len(X), or 0 where X has none (the figure is only for the out-of-memory message)."""
    try:
        return len(X)
    except TypeError:
        return 0
