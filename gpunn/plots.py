"""Pictures: the lecture's Figure 1 (activations and derivatives) and training curves. Needs matplotlib."""
from __future__ import annotations

import os
from typing import Any

import numpy

from . import activations
from .errors import ConfigError
from .io import atomic_write


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


#: The picture formats a plot path may name by its extension.
FORMATS = ("png", "svg", "pdf")


def format_of(path: str) -> str:
    """The picture format ``path``'s extension names; ConfigError for any other extension."""
    ext = os.path.splitext(str(path))[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise ConfigError(f"cannot tell the picture format of {path!r}: end the name with "
                          f"{', '.join('.' + f for f in FORMATS)}")
    return ext


def _save(fig: Any, path: str) -> None:
    fmt = format_of(path)
    atomic_write(path, lambda fh: fig.savefig(fh, dpi=110, format=fmt))


def plot_activations(path: str) -> None:
    """Figure 1 of the lecture: sigmoid, tanh, ReLU, leaky ReLU, softplus, ELU, each with f′."""
    plt = _pyplot()
    z = numpy.linspace(-5, 5, 1001)
    items = [("sigmoid", "sigmoid  σ(z)"), ("tanh", "tanh (eq 1)"), ("relu", "ReLU (eq 2)"),
             ("leaky_relu", "leaky ReLU, α=0.01 (eq 3)"), ("softplus", "softplus (eq 4)"),
             ("elu", "ELU, a=1 (eq 5)")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    for ax, (name, title) in zip(axes.ravel(), items):
        act = activations.get(name)
        ax.plot(z, act(z), label="f(z)", lw=2)
        ax.plot(z, act.grad(z), label="f′(z)", lw=1.5, ls="--")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(title)
        ax.set_xlabel("z")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle("Activation functions and their derivatives (lecture Figure 1)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_history(history: Any, path: str, title: str | None = None) -> None:
    """Loss (and accuracy, when there is one) per epoch, training and validation; ``title`` on top."""
    plt = _pyplot()
    epochs = history["epoch"]
    has_acc = any(a is not None for a in history["accuracy"] + history["val_accuracy"])
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4))
    axes = numpy.atleast_1d(axes)
    axes[0].plot(epochs, history["loss"], label="training")
    if any(v is not None for v in history["val_loss"]):
        axes[0].plot(epochs, history["val_loss"], label="validation")
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    if has_acc:
        axes[1].plot(epochs, history["accuracy"], label="training")
        if any(v is not None for v in history["val_accuracy"]):
            axes[1].plot(epochs, history["val_accuracy"], label="validation")
        axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
