"""Type names used across gpunn's annotations.

gpunn runs the same code on NumPy and CuPy arrays, and CuPy is an optional import, so an array is
typed by what it means rather than by one library's class.
"""
from __future__ import annotations

from typing import Any, TypeAlias

#: A NumPy or CuPy ``ndarray`` on the model's device.
Array: TypeAlias = Any
#: The array namespace of a device: the ``numpy`` or ``cupy`` module.
ArrayModule: TypeAlias = Any
#: Anything gpunn accepts as data and converts at the API edge: an array of either library, a nested list.
ArrayLike: TypeAlias = Any
#: A NumPy dtype, or a name such as ``"float32"``.
DTypeLike: TypeAlias = Any

__all__ = ["Array", "ArrayLike", "ArrayModule", "DTypeLike"]
