"""What a training run returns: the per-epoch :class:`History`, and the :class:`Evaluation` of a data set."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple, overload

__all__ = ["History", "Evaluation"]


class Evaluation(NamedTuple):
    """Mean loss and, for classification targets, accuracy (a fraction in [0, 1]; else None)."""

    loss: float
    accuracy: float | None


class History:
    """Per-epoch records of a :meth:`Sequential.fit` run.

    ``history.epochs`` (or iterating) gives the records, one dict per epoch; ``history[k]`` is record k
    (negative k counts from the end); ``history["loss"]`` is one value per epoch, for a key that some
    record has (KeyError otherwise); ``history.history`` is Keras's dict of lists, so
    ``pandas.DataFrame(history.history)`` is a table of the run.
    """

    def __init__(self, epochs: list[dict] | None = None) -> None:
        self.epochs: list[dict] = list(epochs or [])
        self.stopped_early = False
        self.best_epoch: int | None = None

    def append(self, record: dict) -> None:
        self.epochs.append(record)

    def keys(self) -> list[str]:
        """The record fields present in any epoch, in first-seen order."""
        return list(dict.fromkeys(k for r in self.epochs for k in r))

    @overload
    def __getitem__(self, key: int) -> dict: ...
    @overload
    def __getitem__(self, key: str) -> list: ...

    def __getitem__(self, key: int | str) -> dict | list:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"no epoch record has {key!r}; the records have {self.keys()}")
            return [r.get(key) for r in self.epochs]
        return self.epochs[key]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.epochs)

    def __contains__(self, key: Any) -> bool:
        return key in self.keys()

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def history(self) -> dict[str, list]:
        """Keras's form: {field: [value per epoch]} for every field a record has."""
        return {k: [r.get(k) for r in self.epochs] for k in self.keys()}

    def _column(self, key: str) -> list:
        return [r.get(key) for r in self.epochs]

    @property
    def loss(self) -> list[float]:
        return self._column("loss")

    @property
    def accuracy(self) -> list:
        return self._column("accuracy")

    @property
    def val_loss(self) -> list:
        return self._column("val_loss")

    @property
    def val_accuracy(self) -> list:
        return self._column("val_accuracy")

    def __repr__(self) -> str:
        last = self.epochs[-1] if self.epochs else {}
        return f"History({len(self)} epochs, last={last})"
