"""Who may use a network now: one training thread at a time, readers only between training calls.

A network's training methods (forward, backward, step, train_step, fit) enter its :class:`Admission` as
the one trainer (re-entrant for that thread); any other thread gets a ConcurrencyError instead of mixing
its steps with the first one's. Readers (predict, evaluate, save, copy, pickle) enter :meth:`reading`:
refused with ConcurrencyError while another thread trains, and a trainer that arrives while they read
waits for them to finish, so a reader never sees weights in the middle of an update and a trainer never
changes weights a reader is reading. The trainer's own thread may read at any time (a callback that
saves or predicts at an epoch's end sees that epoch's weights).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .errors import ConcurrencyError

__all__ = ["Admission"]

T = TypeVar("T")
get_ident = threading.get_ident


class Admission:
    """One trainer or any number of readers of one network (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()        # taken directly where nobody waits (a C call, not Condition's)
        self._cond = threading.Condition(self._lock)
        self._owner: int | None = None
        self._depth = 0
        self._readers = 0

    def busy_elsewhere(self) -> bool:
        """Whether another thread is training right now."""
        owner = self._owner
        return owner is not None and owner != get_ident()

    def __enter__(self) -> None:
        me = get_ident()
        if self._owner == me:               # re-entry: only this thread changes _owner from me, or _depth
            self._depth += 1
            return
        with self._lock:
            if self._owner is not None or self._readers:
                self._admit(me)
            self._owner, self._depth = me, 1

    def __exit__(self, *exc: object) -> None:
        if self._depth > 1:                 # leaving a re-entry: this thread still trains
            self._depth -= 1
            return
        with self._lock:                    # nobody waits for a trainer: readers and other trainers are refused
            self._owner, self._depth = None, 0

    def run(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` as the trainer: what ``with self: return work(*args)`` does (the same refusal,
        the same wait for readers, re-entrant for this thread), in one call instead of two."""
        me = get_ident()
        if self._owner == me:               # re-entry: the outer entry leaves
            return work(*args)
        with self._lock:
            if self._owner is not None or self._readers:
                self._admit(me)
            self._owner, self._depth = me, 1
        try:
            return work(*args)
        finally:
            with self._lock:
                self._owner, self._depth = None, 0

    def _admit(self, me: int) -> None:
        """With the lock held and a trainer or readers in: ConcurrencyError if another thread trains, else
        become the trainer (new readers are refused from here) and wait for the readers in to finish."""
        if self._owner is not None:
            raise ConcurrencyError("this network is being trained in another thread; its training methods "
                                   "(forward, backward, step, train_step, fit) take one thread at a time")
        self._owner = me
        try:
            while self._readers:            # readers already in finish first; new ones are refused meanwhile
                self._cond.wait()
        except BaseException:               # interrupted while waiting (Ctrl-C): never became the trainer
            self._owner = None
            raise

    @contextlib.contextmanager
    def reading(self, what: str) -> Iterator[None]:
        """Hold off training while ``what`` reads the network; ConcurrencyError if another thread trains."""
        me = get_ident()
        with self._cond:
            if self._owner is not None and self._owner != me:
                raise ConcurrencyError(f"this network is being trained in another thread; {what} would see weights "
                                       "in the middle of an update: wait for training to finish (or do it from a "
                                       "callback, at an epoch's end)")
            counted = self._owner != me
            if counted:
                self._readers += 1
        try:
            yield
        finally:
            if counted:
                with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()
