"""The gpunn error hierarchy.

Every error gpunn raises on purpose is a :class:`GpunnError`, and each specific class is also the
builtin exception a caller would expect (``ShapeError`` is a ``ValueError``, ``DeviceError`` a
``RuntimeError``...), so ``except ValueError`` keeps working for code that does not know gpunn.
Messages say what was wrong and what to do about it.
"""
from __future__ import annotations

import difflib


class GpunnError(Exception):
    """Base class of every error raised by gpunn on purpose."""


class DeviceError(GpunnError, RuntimeError):
    """A device cannot be used: CuPy missing, no driver, index out of range, mixed devices."""


class DeviceSpecError(GpunnError, ValueError):
    """A device string is not one of the accepted forms."""


class ShapeError(GpunnError, ValueError):
    """Arrays whose shapes do not fit the model or each other."""


class DataError(GpunnError, ValueError):
    """Input values that cannot be used: NaN/inf, empty data, labels out of range."""


class DataTypeError(GpunnError, TypeError):
    """Input of a type that cannot be cast to a floating-point array (object, string, complex)."""


class ConfigError(GpunnError, ValueError):
    """An invalid hyper-parameter or an unknown name (activation, loss, optimiser, initialiser)."""


class DivergenceError(GpunnError, FloatingPointError):
    """Training produced a NaN or infinite loss; the weights are left at the last finite state."""


class ConcurrencyError(GpunnError, RuntimeError):
    """A network is used from another thread while one thread is training it."""


class OutOfMemoryError(GpunnError, MemoryError):
    """The device ran out of memory; the message names the batch size and the bytes asked for."""


class ModelFileError(GpunnError, ValueError):
    """A model file is missing, truncated, tampered with, of another format or of another version."""


class SaveError(GpunnError, OSError):
    """A model could not be written; any earlier file of the same name is left intact."""


def unknown_name(kind: str, name: object, valid: list[str]) -> ConfigError:
    """Build the error for an unknown ``kind`` name, listing the valid names and the closest one."""
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}.{hint}")


class DistributedError(GpunnError, RuntimeError):
    """Data-parallel ranks cannot go on together: a rank left the job, or a collective call timed out."""
