"""The model file: what :meth:`gpunn.Sequential.save` writes and :func:`gpunn.load` reads.

The format is the extension's (:func:`gpunn.exports.model_format`): ``.onnx`` and ``.safetensors`` go to
:mod:`gpunn.exports` (safetensors is read back; ONNX is an export only); ``.npz`` is gpunn's own file, a
``.npz`` archive (:mod:`gpunn.io`: atomic write, no pickles, SHA-256, bounded reads) holding the flat
parameters and a JSON header: the layers, the dtype, and the loss and optimiser of the last fit. Reading
checks the layer list against the number of parameters before anything is allocated from the header,
and parses the loss and optimiser, so every malformed file is a :class:`~gpunn.errors.ModelFileError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy

from . import exports, io, optim
from . import losses as losses_mod
from .backend import to_host
from .errors import ModelFileError
from .layers import Dense
from .types import PathLike
from .validation import check_dtype

__all__ = ["ModelFile", "read", "write"]


@dataclass
class ModelFile:
    """A model file's contents: fresh layers of its architecture, its dtype, the flat parameters (host),
    and the loss and optimiser (without state) of the last fit, if any."""

    layers: list[Dense]
    dtype: numpy.dtype
    params: numpy.ndarray
    loss: losses_mod.Loss | None
    optimizer: optim.Optimizer | None
    header: dict                     # the whole header, for what others keep there (gpunn.userdata's data)


def write(path: PathLike, model: Any, loss: losses_mod.Loss | None, optimizer: optim.Optimizer | None,
          extra: dict | None = None) -> None:
    """Write ``model`` (its ``config()``, ``flat_parameters()`` and layers) atomically, in the format of the
    path's extension; ``extra`` (JSON-able) joins the header. SaveError, writing nothing, for any other
    extension or a path that cannot be written."""
    more = {"loss": loss.name if loss else None, "optimizer": optimizer.config() if optimizer else None,
            **(extra or {})}
    fmt = exports.model_format(path)
    if fmt != "npz":
        exports.write(fmt, model, path, more)
        return
    io.write_model(path, {**model.config(), **more}, numpy.array(to_host(model.flat_parameters()), copy=True))


def read(path: PathLike) -> ModelFile:
    """Read and check a model file (ModelFileError for anything malformed)."""
    header, params = exports.read_model_file(path)     # .npz, or .safetensors by its extension
    _check_layer_sizes(header, params.size, path)      # before anything is allocated from the header
    try:
        layers = [Dense.from_config(c) for c in header["layers"]]
        dtype = check_dtype(header["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path} has an invalid layer description: {exc}") from None
    try:
        loss = losses_mod.get(header["loss"]) if header.get("loss") else None
        optimizer = optim.from_config(header["optimizer"]) if header.get("optimizer") else None
        if loss is not None:
            loss.check_activation(layers[-1].activation)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path} has an invalid loss or optimiser description: {exc}") from None
    return ModelFile(layers, dtype, params, loss, optimizer, header)


def _check_layer_sizes(header: dict, n_params: int, path: Any) -> None:
    """ModelFileError unless the header's layers are Dense layers that chain and hold exactly ``n_params``
    parameters (so nothing larger than the file's own parameters is ever allocated)."""
    layers = header.get("layers")
    if not isinstance(layers, list) or not layers or len(layers) > n_params:
        raise ModelFileError(f"{path} has no valid layer list in its header")
    total, previous = 0, None
    for k, c in enumerate(layers):
        n_in, n_out = (c.get("n_in"), c.get("n_out")) if isinstance(c, dict) else (None, None)
        if not (isinstance(c, dict) and c.get("type") == "Dense" and _size(n_in) and _size(n_out)):
            raise ModelFileError(f"{path}: layer {k} is not a Dense layer with positive sizes "
                                 f"({str(c)[:120]}); this gpunn knows Dense layers only")
        if previous is not None and n_in != previous:
            raise ModelFileError(f"{path}: layer {k} has n_in={n_in} but the layer before has n_out={previous}")
        total += n_in * n_out + n_out
        previous = n_out
    if total != n_params:
        raise ModelFileError(f"{path}: the layers need {total} parameters but the file holds {n_params}")


def _size(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1
