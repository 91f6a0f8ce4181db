"""Learning-rate schedules: the learning rate η as a function of the global step (counted from 0).

Each schedule is a callable ``schedule(step) -> float``; an optimiser takes one wherever it takes a
number (``gpunn.SGD(lr=gpunn.schedules.CosineDecay(0.5, total_steps=1000))``) and asks it for η once per
step, on the host: on a GPU a changing η is a new kernel argument, never a recompilation or a sync.

    >>> from gpunn.schedules import CosineDecay
    >>> s = CosineDecay(0.5, total_steps=100)
    >>> s(0), s(50), s(100)
    (0.5, 0.25, 0.0)
"""
from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError
from .registry import Registry
from .scalars import Checked, integer, real

__all__ = ["Schedule", "StepDecay", "ExponentialDecay", "CosineDecay", "from_config", "names"]


def _positive(name: str, value: Any) -> float:
    return real(name, value, 0.0, low_open=True)


def _count(name: str, value: Any) -> int:
    return integer(name, value, low=1)


def _fraction(name: str, value: Any) -> float:
    return real(name, value, 0.0, 1.0, low_open=True)


def _final_within_initial(schedule: Any, name: str, value: float) -> None:
    initial = value if name == "initial" else schedule.__dict__.get("initial", math.inf)
    final = value if name == "final" else schedule.__dict__.get("final", 0.0)
    if final > initial:
        raise ConfigError(f"final must be a number in [0, initial]; got final={final:g} > initial={initial:g}")


class Schedule:
    """Base class: ``__call__(step)`` gives η for the global step ``step`` (0, 1, 2, ...)."""

    name = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY.add(cls)       # files name schedules by key (gpunn.registry): every subclass joins

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": Registry.key_of(type(self)), **{k: v for k, v in vars(self).items()}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items()))))


#: Every Schedule subclass by its key (gpunn.registry): the built-in ones below and any defined since.
REGISTRY = Registry("schedule")


class StepDecay(Schedule):
    """η = initial · factor^⌊step / every⌋: multiplied by ``factor`` every ``every`` steps."""

    name = "step_decay"
    initial = Checked(_positive)
    factor = Checked(_fraction)
    every = Checked(_count)

    def __init__(self, initial: float, factor: float = 0.5, every: int = 1000):
        self.initial, self.factor, self.every = initial, factor, every

    def __call__(self, step: int) -> float:
        return self.initial * self.factor ** (step // self.every)


class ExponentialDecay(Schedule):
    """η = initial · rate^(step / every): a smooth decay by ``rate`` every ``every`` steps (Keras's form)."""

    name = "exponential_decay"
    initial = Checked(_positive)
    rate = Checked(_fraction)
    every = Checked(_count)

    def __init__(self, initial: float, rate: float = 0.96, every: int = 1000):
        self.initial, self.rate, self.every = initial, rate, every

    def __call__(self, step: int) -> float:
        return self.initial * self.rate ** (step / self.every)


class CosineDecay(Schedule):
    """η = final + (initial − final) · ½(1 + cos(π · min(step, total_steps) / total_steps)): from ``initial``
    at step 0 down to ``final`` at ``total_steps``, then constant."""

    name = "cosine_decay"
    initial = Checked(_positive, _final_within_initial)
    total_steps = Checked(_count)
    final = Checked(lambda name, value: real(name, value, 0.0), _final_within_initial)

    def __init__(self, initial: float, total_steps: int, final: float = 0.0):
        self.initial, self.total_steps, self.final = initial, total_steps, final

    def __call__(self, step: int) -> float:
        progress = min(step, self.total_steps) / self.total_steps
        return self.final + (self.initial - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def names() -> list[str]:
    return REGISTRY.names()


def from_config(config: dict) -> Schedule:
    """A schedule from :meth:`Schedule.config`'s dict."""
    return REGISTRY.build(config)
