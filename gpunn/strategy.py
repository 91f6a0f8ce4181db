"""How a training run is spread over processes: :class:`Local` (one process) or :class:`DataParallel`.

The trainer asks its strategy three things: how one step's gradients are combined (:meth:`Local.step`),
how the ranks agree on the run (the starting weights and batch order, each epoch's figures, every stop
decision), and who writes checkpoints and reports (``is_root``). A strategy never changes how a step
computes: that is the model's :meth:`~gpunn.Sequential.train_step`, or its ``gradients`` and ``update``
halves with the gradient exchange between them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import numpy

from .backend import is_cupy_array
from .data import Sharded, Source
from .distributed import ALL_RANKS, Communicator, agreed
from .errors import ConfigError, GpunnError
from .losses import Loss
from .optim import Optimizer
from .types import Array

__all__ = ["Steppable", "Local", "DataParallel", "for_communicator"]

R = TypeVar("R")


class Steppable(Protocol):
    """What a strategy needs of a model: one whole step, or its two halves."""

    def train_step(self, X: Any, Y: Any, loss: Any, optimizer: Optimizer, out: Array | None = None) -> Array: ...
    def gradients(self, X: Any, Y: Any, loss: Any, out: Array | None = None) -> Array: ...
    def update(self, optimizer: Optimizer) -> None: ...
    def flat_parameters(self) -> Array: ...
    def flat_gradients(self) -> Array: ...


class Local:
    """Training in this process alone."""

    #: whether this process reports progress and writes checkpoints
    is_root = True
    size = 1

    def agree(self, description: dict) -> None:
        """Check that every rank describes the same run (nothing to compare alone)."""

    def begin(self, model: Steppable, order: numpy.random.Generator) -> None:
        """Make every rank start from the same weights and batch order (nothing to do alone)."""

    def on_root(self, read: Callable[[], R]) -> R:
        """``read()`` done by the root, its result (or its gpunn error) on every rank."""
        return read()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around a run: what to do when an exception leaves it on this process (alone: let it go)."""
        yield

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Around checks each rank makes of its own arguments: alone, their errors are raised as they are."""
        yield

    def shard(self, data: Source) -> Source | Sharded:
        """The part of ``data`` this process trains on: all of it."""
        return data

    def step(self, model: Steppable, x: Array, t: Array, loss: Loss, optimizer: Optimizer, out: Array,
             batch_rows: int) -> None:
        """One step on this process's rows ``x, t`` of a minibatch of ``batch_rows`` rows in all."""
        model.train_step(x, t, loss, optimizer, out=out)

    def reduce(self, stats: numpy.ndarray) -> numpy.ndarray:
        """Per-epoch figures summed over the ranks, in place."""
        return stats

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank: a decision every rank takes together."""
        return bool(flag)


class DataParallel(Local):
    """Data-parallel training over ``comm``'s ranks: each trains its share of every global minibatch, the
    gradients (each scaled by its share of the rows) are summed in one allreduce of the flat gradient
    buffer, and every rank makes the same update (:mod:`gpunn.distributed`)."""

    def __init__(self, comm: Communicator):
        self.comm = comm
        self.is_root, self.size = comm.is_root, comm.size

    def agree(self, description: dict) -> None:
        """Every rank's description of the run (settings, model, data fingerprints, devices) against rank 0's:
        any difference is the same ConfigError on every rank, naming the fields and the ranks, before any
        work (a rank that trained otherwise would silently diverge, or hang its peers)."""
        everyone = self.comm.allgather_object(description)
        first = everyone[0]
        differ = []
        for key in sorted(set().union(*everyone), key=str):
            ranks = [r for r, d in enumerate(everyone) if d.get(key) != first.get(key)]
            if ranks:
                shown = "; ".join(f"rank {r}: {_short(everyone[r].get(key))}" for r in [0, *ranks])
                differ.append(f"{key} ({shown})")
        if differ:
            raise agreed(ConfigError(
                "the ranks describe different runs, so none started: " + ", ".join(differ) + ". Every rank must "
                "call fit with the same model, data, settings and kind of device"))

    def begin(self, model: Steppable, order: numpy.random.Generator) -> None:
        """Rank 0's weights and batch-order generator on every rank; the reduction route agreed by all."""
        if is_cupy_array(model.flat_gradients()):
            self.comm.agree_route()
        self.comm.broadcast(model.flat_parameters())
        order.bit_generator.state = self.comm.bcast_object(order.bit_generator.state)

    def on_root(self, read: Callable[[], R]) -> R:
        """Rank 0 reads (a checkpoint only it may see) and broadcasts the result, or its gpunn error, which
        every rank then raises together."""
        result: tuple[bool, Any] = (True, None)
        if self.comm.is_root:
            try:
                result = (True, read())
            except GpunnError as exc:
                result = (False, exc)
        ok, value = self.comm.bcast_object(result)
        if not ok:
            raise agreed(value)
        return value

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Each rank's checks of its own data and arguments, then one exchange: an error on any rank is the
        same ConfigError on every rank, naming the ranks and their errors (not one rank leaving alone)."""
        failure: GpunnError | None = None
        try:
            yield
        except GpunnError as exc:
            failure = exc
        said = self.comm.allgather_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        bad = [f"rank {r}: {text}" for r, text in enumerate(said) if text is not None]
        if bad:
            raise agreed(ConfigError("a rank's data or settings were refused, so no rank started: " + "; ".join(bad)))

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """An exception that leaves the run on this rank alone (an error, Ctrl-C, ``sys.exit``) leaves the
        other ranks waiting in a collective: it ends the job, after printing what happened."""
        try:
            yield
        except BaseException as exc:
            if getattr(exc, ALL_RANKS, False):
                raise
            self.comm.abort(1, f"{type(exc).__name__} in a data-parallel fit: {exc}; the other ranks cannot go "
                               "on without this one")
            raise

    def shard(self, data: Source) -> Source | Sharded:
        return Sharded(data, self.comm.rank, self.comm.size)

    def step(self, model: Steppable, x: Array, t: Array, loss: Loss, optimizer: Optimizer, out: Array,
             batch_rows: int) -> None:
        rows = int(x.shape[0])
        share = rows / batch_rows               # this rank's rows' part of the batch mean
        grads = model.flat_gradients()
        if rows:
            model.gradients(x, t, loss, out=out)
            grads *= share
            out *= share
        else:                                   # a short last batch left this rank no rows
            grads.fill(0)
            out.fill(0)
        self.comm.allreduce_sum(grads)
        model.update(optimizer)

    def reduce(self, stats: numpy.ndarray) -> numpy.ndarray:
        return self.comm.allreduce_sum(stats)

    def any(self, flag: bool) -> bool:
        return self.comm.any(flag)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def for_communicator(comm: Communicator | None) -> Local:
    """:class:`DataParallel` over ``comm`` when it has several ranks, else :class:`Local`."""
    return DataParallel(comm) if comm is not None and comm.size > 1 else Local()
