"""gpunn: the lecture's neural networks, matrix-vectorised on NumPy (CPU) or CuPy (NVIDIA GPU).

    >>> import gpunn as gn
    >>> net = gn.Sequential([gn.Dense(2, 4, "sigmoid"), gn.Dense(4, 1, "sigmoid")], device="cpu", seed=0)
"""
from __future__ import annotations

from . import activations, callbacks, datasets, init, losses, optim, schedules
from .backend import (
    Device,
    array_module,
    available_devices,
    cuda_unavailable_reason,
    device_of,
    get_device,
    to_host,
    use_device,
)
from .errors import (
    ConcurrencyError,
    ConfigError,
    DataError,
    DataTypeError,
    DeviceError,
    DeviceSpecError,
    DistributedError,
    DivergenceError,
    GpunnError,
    ModelFileError,
    OutOfMemoryError,
    SaveError,
    ShapeError,
)
from .layers import Dense
from .network import Evaluation, History, Sequential, load, mlp
from .optim import SGD, Adam
from .version import __version__

__all__ = [
    "Adam", "ConcurrencyError", "ConfigError", "DataError", "DataTypeError", "Dense", "Device", "DeviceError",
    "DeviceSpecError", "DistributedError",
    "DivergenceError", "Evaluation", "GpunnError", "History", "ModelFileError", "OutOfMemoryError", "SGD",
    "SaveError", "Sequential", "ShapeError", "activations", "array_module", "available_devices",
    "cuda_unavailable_reason", "datasets", "device_of", "get_device", "init", "load", "losses", "mlp", "optim",
    "callbacks", "schedules",
    "to_host",
    "use_device", "__version__",
]
