"""Callbacks: code of yours that :meth:`gpunn.Sequential.fit` runs after every epoch.

A callback is any object with an ``on_epoch_end(record)`` method; ``record`` is the epoch's dict (as in
``history.epochs``: epoch, loss, accuracy, val_loss, val_accuracy, seconds). Returning True stops
training after that epoch (``history.stopped_early`` is then True). Subclass :class:`Callback` or
write your own class; :class:`LambdaCallback` wraps a function.

    >>> import gpunn
    >>> stop_when_good = gpunn.callbacks.LambdaCallback(lambda r: r["loss"] < 0.05)
"""
from __future__ import annotations

from collections.abc import Callable

from .errors import ConfigError

__all__ = ["Callback", "LambdaCallback", "checked"]


class Callback:
    """Base class: override :meth:`on_epoch_end`."""

    def on_epoch_end(self, record: dict) -> bool | None:
        """Called after each finished epoch; return True to stop training."""
        return None


class LambdaCallback(Callback):
    """A callback from a function of the epoch's record (its truthy result stops training)."""

    def __init__(self, fn: Callable[[dict], object]):
        if not callable(fn):
            raise ConfigError(f"LambdaCallback needs a function of the epoch record; got {fn!r}")
        self.fn = fn

    def on_epoch_end(self, record: dict) -> bool | None:
        return bool(self.fn(record))


def checked(callbacks: object) -> list:
    """The callbacks as a list, each with an ``on_epoch_end`` method; ConfigError otherwise."""
    if callbacks is None:
        return []
    items = [callbacks] if hasattr(callbacks, "on_epoch_end") else callbacks
    try:
        items = list(items)  # type: ignore[call-overload]
    except TypeError:
        raise ConfigError(f"callbacks must be a list of objects with an on_epoch_end(record) method; got "
                          f"{callbacks!r}") from None
    for c in items:
        if not callable(getattr(c, "on_epoch_end", None)):
            raise ConfigError(f"{c!r} has no on_epoch_end(record) method; subclass gpunn.callbacks.Callback")
    return items
