"""Type names used across gpunn's annotations.

gpunn runs the same code on NumPy and CuPy arrays, and CuPy is an optional import, so an array is
typed by what it means rather than by one library's class.
"""
from __future__ import annotations

import os
from typing import Any, Protocol, TypeAlias

#: A NumPy or CuPy ``ndarray`` on the model's device.
Array: TypeAlias = Any
#: The array namespace of a device: the ``numpy`` or ``cupy`` module.
ArrayModule: TypeAlias = Any
#: Anything gpunn accepts as data and converts at the API edge: an array of either library, a nested list.
ArrayLike: TypeAlias = Any
#: A NumPy dtype, or a name such as ``"float32"``.
DTypeLike: TypeAlias = Any

#: A file path as gpunn's file functions accept it.
PathLike: TypeAlias = "str | os.PathLike[str]"


class OutputLayer(Protocol):
    """What a loss reads from the output layer after a forward pass: z, y = f(z), and (softmax) its
    log-partition in ``rowstats[0]``."""

    z: Array
    y: Array
    rowstats: Array | None


class OutputBuffers(OutputLayer, Protocol):
    """The output layer's training buffers of one batch size (:class:`gpunn.layers.Buffers`): what a loss
    reads, and δ, where the loss may write the output δ itself."""

    delta: Array


__all__ = ["Array", "ArrayLike", "ArrayModule", "DTypeLike", "OutputBuffers", "OutputLayer", "PathLike"]
