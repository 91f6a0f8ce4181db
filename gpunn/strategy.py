"""How a training run is spread over processes: :class:`Local` (one process) or :class:`DataParallel`.

The trainer asks its strategy three things: how one step's gradients are combined (:meth:`Local.step`),
how the ranks agree on the run (the starting weights and batch order, each epoch's figures, every stop
decision), and who writes checkpoints and reports (``is_root``). A strategy never changes how a step
computes: that is the model's :meth:`~gpunn.Sequential.train_step`, or its ``gradients`` and ``update``
halves with the gradient exchange between them.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy

from .data import Sharded, Source
from .distributed import Communicator
from .losses import Loss
from .optim import Optimizer
from .types import Array

__all__ = ["Steppable", "Local", "DataParallel", "for_communicator"]


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

    def begin(self, model: Steppable, order: numpy.random.Generator) -> None:
        """Make every rank start from the same weights and batch order (nothing to do alone)."""

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

    def begin(self, model: Steppable, order: numpy.random.Generator) -> None:
        """Rank 0's weights and batch-order generator on every rank."""
        self.comm.broadcast(model.flat_parameters())
        order.bit_generator.state = self.comm.bcast_object(order.bit_generator.state)

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


def for_communicator(comm: Communicator | None) -> Local:
    """:class:`DataParallel` over ``comm`` when it has several ranks, else :class:`Local`."""
    return DataParallel(comm) if comm is not None and comm.size > 1 else Local()
