"""Hyper-parameters and switches: one rule for numbers and booleans, used everywhere gpunn takes one.

A number is a Python or NumPy real number (``int``, ``float``, ``numpy.float32``, ``numpy.int64``,
``fractions.Fraction``...), never a bool, a string, ``None`` or an array (not even a 0-d one, which
on a GPU would need a device sync to read); it must be finite and, as a float, representable
(``10**400`` is refused, not an OverflowError). A switch is a real ``bool`` (or ``numpy.bool_``):
``"no"`` and ``0`` are refused rather than read as true or false. Text switches (environment
variables, command-line values) go through :func:`parse_flag`, the one parser of ``1/0``,
``true/false``, ``yes/no``, ``on/off``.

:class:`Checked` makes an attribute validate every assignment (``opt.lr = -0.1`` in a callback is a
ConfigError, as it is in the constructor), keeping the value in the instance's ``__dict__`` under
its own name so ``vars()``, pickles and configs see plain attributes.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from typing import Any

import numpy

from .errors import ConfigError

__all__ = ["Checked", "env_flag", "flag", "integer", "is_number", "parse_flag", "real", "shown"]

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
#: Largest integer hyper-parameter: counts and sizes become int64 (NumPy shapes, C longs).
INT_MAX = 2**63 - 1


def shown(value: Any) -> str:
    """``repr(value)`` for a message: at most 60 characters, and never an error (huge ints, odd objects)."""
    try:
        text = repr(value)
    except Exception:                      # ints beyond str()'s digit limit, a broken __repr__
        text = f"<{type(value).__name__} that cannot be shown>"
    return text if len(text) <= 60 else text[:57] + "..."


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number by gpunn's rule (not a bool, a string or an array)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, numpy.bool_))


def _as_float(name: str, value: Any) -> float:
    if not is_number(value):
        raise ConfigError(f"{name} must be a number (a Python or NumPy real number, not a bool, string or "
                          f"array); got {shown(value)} ({type(value).__name__})")
    try:
        v = float(value)
    except OverflowError:
        raise ConfigError(f"{name} is too large to be a float; got {shown(value)}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number; got {shown(value)}")
    return v


def real(name: str, value: Any, low: float | None = None, high: float | None = None, *,
         low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the range (``low``/``high`` None: unbounded; ``*_open``: excluded),
    else a ConfigError that names ``name``, the range and the value."""
    v = _as_float(name, value)
    if (low is not None and (v < low or (low_open and v == low))) or \
            (high is not None and (v > high or (high_open and v == high))):
        raise ConfigError(f"{name} must be {_range_text(low, high, low_open, high_open)}; got {shown(value)}")
    return v


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low == 0 and low_open:
        return "a positive finite number"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"  # pragma: no cover - no caller leaves both open


def integer(name: str, value: Any, low: int | None = 1, high: int | None = None, *,
            limit: int | None = INT_MAX) -> int:
    """``value`` (a Python or NumPy integer, not a bool or a float) as an int in [low, high], and at most
    ``limit`` in size (None for seeds, which NumPy's SeedSequence takes at any size)."""
    kind = ("a positive integer" if low == 1 and high is None else
            f"an integer in [{low}, {high}]" if low is not None and high is not None else
            f"an integer >= {low}" if low is not None else
            f"an integer <= {high}" if high is not None else "an integer")
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, numpy.bool_)):
        raise ConfigError(f"{name} must be {kind}; got {shown(value)} ({type(value).__name__})")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ConfigError(f"{name} must be {kind}; got {shown(value)}")
    if limit is not None and abs(v) > limit:
        raise ConfigError(f"{name} is too large (more than 2**63 - 1, what counts and sizes are held in); got "
                          f"{shown(value)}")
    return v


def flag(name: str, value: Any) -> bool:
    """``value`` as a bool: only ``True``/``False`` (or NumPy's); anything else is a ConfigError."""
    if not isinstance(value, (bool, numpy.bool_)):
        raise ConfigError(f"{name} must be True or False; got {shown(value)} ({type(value).__name__})")
    return bool(value)


def parse_flag(name: str, text: str) -> bool:
    """A switch written as text: ``1/true/yes/on`` or ``0/false/no/off`` (any case, spaces ignored)."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{name} must be one of {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}; got "
                      f"{shown(text)}")


def env_flag(var: str, default: bool) -> bool:
    """The environment variable ``var`` as a switch (:func:`parse_flag`); ``default`` when unset or empty."""
    text = os.environ.get(var, "")
    return default if not text.strip() else parse_flag(var, text)


class Checked:
    """An attribute whose every assignment goes through ``check(name, value)``; ``relation(obj, name,
    value)``, when given, then checks the new value against the object's other attributes.

    The checked value is stored in the instance's ``__dict__`` under the attribute's own name (this
    descriptor defines ``__set__``, so it still sees every read and write); an instance that never set
    it reads ``default``.
    """

    def __init__(self, check: Callable[[str, Any], Any], relation: Callable[[Any, str, Any], None] | None = None,
                 default: Any = None):
        self.check, self.relation, self.default = check, relation, default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get(self.name, self.default)

    def __set__(self, obj: Any, value: Any) -> None:
        value = self.check(self.name, value)
        if self.relation is not None:
            self.relation(obj, self.name, value)
        obj.__dict__[self.name] = value
