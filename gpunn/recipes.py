"""Training recipes: the settings ``gpunn train`` uses when it is not told otherwise, and the run itself.

Defaults depend on the data set, and the learning rate also on the activation and the loss
(measured with ``--seed 0``; the table of test accuracies is in the README):

| data set | hidden layers | activation | epochs | batch | SGD learning rate (momentum 0.9) |
| --- | --- | --- | --- | --- | --- |
| digits (64 features, 10 classes) | 32 | sigmoid | 40 | 32 | 0.1; 0.03 for squared error after unbounded f |
| moons, spirals, xor (2 features, 2 classes) | 64, 64 | relu | 300 | 32 (xor: 4) | 0.05 |

Adam's default learning rate is 0.01. The data are split into a test set (25 %, reported once, at the
end), and a validation set carved from the rest (15 % of it; used for the per-epoch validation figures
and for early stopping with ``patience``); xor's four points are its training, validation and test set.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy

from . import datasets, optim
from .callbacks import Callback
from .distributed import Communicator
from .network import Sequential, mlp

__all__ = ["DATASETS", "Split", "defaults", "default_lr", "split", "train"]

#: dataset → (hidden layer sizes, hidden activation, epochs, batch size)
DATASETS: dict[str, tuple[list[int], str, int, int]] = {
    "digits": ([32], "sigmoid", 40, 32),
    "moons": ([64, 64], "relu", 300, 32),
    "spirals": ([64, 64], "relu", 300, 32),
    "xor": ([64, 64], "relu", 300, 4),
}
_BOUNDED = {"sigmoid", "tanh"}


def defaults(dataset: str) -> tuple[list[int], str, int, int]:
    """(hidden sizes, activation, epochs, batch size) for ``dataset``."""
    return DATASETS[dataset]


def default_lr(optimizer: str, activation: str, loss: str, dataset: str) -> float:
    """The learning rate used when none is given (see the module's table)."""
    if optimizer == "adam":
        return 0.01
    if dataset != "digits":
        return 0.05
    return 0.03 if loss == "squared_error" and activation not in _BOUNDED else 0.1


@dataclass
class Split:
    """A data set prepared for one loss: training, validation and test parts, and the layer sizes."""

    x_train: numpy.ndarray
    y_train: numpy.ndarray
    x_val: numpy.ndarray
    y_val: numpy.ndarray
    x_test: numpy.ndarray
    y_test: numpy.ndarray
    n_features: int
    n_outputs: int


def split(dataset: str, loss: str, seed: int) -> Split:
    """Load ``dataset``, shape its targets for ``loss`` (labels for cross-entropy; one sigmoid unit for two
    classes otherwise; one-hot rows beyond) and split it; synthetic sets are standardised with the
    training part's statistics only."""
    X, y = datasets.load(dataset, seed=seed)
    n_classes = int(y.max()) + 1
    n_out = 1 if loss != "cross_entropy" and n_classes == 2 else n_classes
    Y = y if loss == "cross_entropy" else (y.reshape(-1, 1).astype(float) if n_out == 1
                                           else datasets.one_hot(y, n_classes))
    if dataset == "xor":
        return Split(X, Y, X, Y, X, Y, X.shape[1], n_out)
    Xtr, Xte, Ytr, Yte = datasets.train_test_split(X, Y, test_size=0.25, seed=seed)
    if dataset != "digits":
        Xtr, Xte = datasets.standardize(Xtr, Xte)
    Xfit, Xval, Yfit, Yval = datasets.train_test_split(Xtr, Ytr, test_size=0.15, seed=seed)
    return Split(Xfit, Yfit, Xval, Yval, Xte, Yte, X.shape[1], n_out)


def train(dataset: str = "digits", sizes: list[int] | None = None, activation: str | None = None,
          loss: str = "cross_entropy", optimizer: str = "sgd", lr: float | None = None, momentum: float = 0.9,
          epochs: int | None = None, batch_size: int | None = None, patience: int | None = None,
          device: Any = None, dtype: str = "float32", seed: int = 0, checkpoint: Any = None,
          progress: Any = False, callbacks: list[Callback] | None = None,
          comm: Communicator | None = None, data: Split | None = None,
          output: str | None = None) -> tuple[Sequential, dict]:
    """Train as ``gpunn train`` does; returns the network and the run's summary (test figures included).

    ``data`` (already split) replaces the named data set, which then only chooses the defaults; ``output``
    the output activation (default: softmax for cross-entropy, else sigmoid).
    """
    hidden, default_act, default_epochs, default_batch = defaults(dataset)
    activation = activation or default_act
    data = data if data is not None else split(dataset, loss, seed)
    sizes = sizes or [data.n_features, *hidden, data.n_outputs]
    out_act = output or ("softmax" if loss == "cross_entropy" else "sigmoid")
    net = mlp(sizes, activation=activation, output=out_act, device=device, dtype=dtype, seed=seed)
    lr = default_lr(optimizer, activation, loss, dataset) if lr is None else lr
    opt = optim.SGD(lr=lr, momentum=momentum) if optimizer == "sgd" else optim.Adam(lr=lr)
    epochs = default_epochs if epochs is None else epochs
    batch_size = default_batch if batch_size is None else batch_size
    t0 = time.perf_counter()
    history = net.fit(data.x_train, data.y_train, loss=loss, optimizer=opt, epochs=epochs, batch_size=batch_size,
                      validation_data=(data.x_val, data.y_val), patience=patience, progress=progress,
                      callbacks=callbacks, checkpoint=checkpoint, comm=comm)
    seconds = time.perf_counter() - t0
    test = net.evaluate(data.x_test, data.y_test)
    summary = {"dataset": dataset, "layers": sizes, "activation": activation, "loss": loss,
               "optimizer": opt.config(), "epochs": len(history), "best_epoch": history.best_epoch,
               "batch_size": batch_size, "patience": patience, "device": str(net.device), "dtype": dtype,
               "seed": seed, "seconds": seconds, "test_loss": test.loss, "test_accuracy": test.accuracy,
               "ranks": comm.size if comm is not None else 1, "history": history.epochs}
    return net, summary
