"""Checks of the command line's values, shared by its commands: parsed before any work, a bad value exits 2
with click's usage message, as click's own types do.

:class:`Number` is a click type for float options by the one rule of :mod:`gpunn.scalars` (finite, in
range: ``--min-time nan``, ``--lr -1`` and ``--momentum 1.5`` exit 2); :class:`Count` for integer options
(``--epochs 10**30`` exits 2 rather than failing later). :func:`distinct_outputs` refuses
two outputs naming one file (after resolving relative paths and symbolic links, and hard links of files
that exist), so no output overwrites another or the run's own checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

import click

from .errors import ConfigError
from .scalars import integer, real

__all__ = ["Count", "Number", "distinct_outputs"]


class Number(click.ParamType):
    """A float option, finite and within [low, high] (``low_open``/``high_open`` exclude the bound)."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                self.fail(f"{value!r} is not a number", param, ctx)
        try:
            return real("value", number, self.low, self.high, low_open=self.low_open, high_open=self.high_open)
        except ConfigError as exc:
            self.fail(str(exc).removeprefix("value "), param, ctx)


class Count(click.ParamType):
    """An integer option >= ``low`` that gpunn can hold (at most 2**63 - 1: :func:`gpunn.scalars.integer`)."""

    name = "integer"

    def __init__(self, low: int = 1):
        self.low = low

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = value
        if isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                self.fail(f"{value!r} is not an integer", param, ctx)
        try:
            return integer("value", number, low=self.low)
        except ConfigError as exc:
            self.fail(str(exc).removeprefix("value "), param, ctx)


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)           # hard links of one existing file
    except OSError:
        return False


def distinct_outputs(*outputs: tuple[str | None, str], inputs: tuple[tuple[str | None, str], ...] = ()) -> None:
    """UsageError (exit 2) if two of the (path, option) outputs given (path not None) name the same file, or an
    output names one of the ``inputs`` (a command would overwrite what it reads)."""
    given = [(path, option) for path, option in outputs if path is not None]
    read = [(path, option) for path, option in inputs if path is not None]
    for i, (path, option) in enumerate(given):
        for other, other_option in given[:i] + read:
            if _same_file(path, other):
                raise click.UsageError(f"{other_option} {other} and {option} {path} name the same file "
                                       f"({os.path.realpath(path)}); give each output its own path")
