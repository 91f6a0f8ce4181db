"""Model files other than gpunn's own: ONNX (for inference elsewhere) and safetensors (weights + config).

The format is chosen by the file's extension, one rule for :meth:`gpunn.Sequential.save` and
:func:`gpunn.load` (:func:`model_format`):

- ``.npz``: gpunn's own model file (:mod:`gpunn.io`); what the CLI and checkpoints use.
- ``.onnx``: an ONNX graph (opset 17) of ``Gemm`` + the activation op per layer (``Sigmoid``, ``Tanh``,
  ``Relu``, ``LeakyRelu`` α, ``Softplus``, ``Elu`` a, ``Softmax`` on axis 1; identity adds none), the
  weights as initializers in the network's dtype, input ``X`` of shape (N, n_in), output ``Y`` of shape
  (N, n_out), the gpunn configuration in the model's metadata. It is an export: onnxruntime and other ONNX
  runtimes run it, gpunn does not read it back. Needs ``pip install 'gpunn[onnx]'``.
- ``.safetensors``: the tensors ``layers.{k}.W`` (n_in, n_out) and ``layers.{k}.b`` (n_out,) in the
  network's dtype, and in the metadata the header gpunn's own file has (format, versions, layers,
  dtype, loss, optimiser; a SHA-256 of header and weights), so :func:`gpunn.load` restores the network
  bit for bit. Needs ``pip install 'gpunn[safetensors]'``.

Any other extension is a :class:`~gpunn.errors.SaveError` when saving (nothing is written). This module
knows networks only through what they expose (``layers``, ``config()``, ``flat_parameters()``), so it
sits below :mod:`gpunn.network`.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy

from . import io
from .backend import to_host
from .errors import ModelFileError, SaveError
from .types import PathLike
from .version import __version__

__all__ = ["FORMATS", "ONNX_OPSET", "model_format", "read_model_file", "read_safetensors", "write_onnx",
           "write_safetensors"]

#: File extension → model format.
FORMATS = {".npz": "npz", ".onnx": "onnx", ".safetensors": "safetensors"}
#: The ONNX operator set written (onnxruntime ≥ 1.13 runs it).
ONNX_OPSET = 17
_ONNX_IR_VERSION = 8
#: Largest safetensors JSON header read (a real one is a few hundred bytes per layer).
_MAX_SAFETENSORS_HEADER = 1 << 20


def model_format(path: PathLike) -> str:
    """``"npz"``, ``"onnx"`` or ``"safetensors"`` by ``path``'s extension (case-insensitive).

    Raises SaveError for a path that cannot be written (see :func:`gpunn.io.check_writable`) or whose
    extension names no model format.
    """
    io.check_writable(path)
    shown = os.fsdecode(os.fspath(path))
    ext = os.path.splitext(shown)[1].lower()
    if ext not in FORMATS:
        raise SaveError(f"cannot tell the model format of {shown!r}: end the name with "
                        f"{', '.join(FORMATS)} (gpunn's own file, an ONNX export, safetensors weights)")
    return FORMATS[ext]


def _require(module: str, extra: str, error: type[Exception]) -> Any:
    """Import ``module`` (an optional dependency), or ``error`` naming the extra that installs it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise error(f"this needs the {module.split('.')[0]} package: pip install 'gpunn[{extra}]'") from None


def _layers(net: Any) -> list[tuple[dict, numpy.ndarray, numpy.ndarray]]:
    """(activation config, W, b) of each layer, as host arrays."""
    return [(layer.activation.config(), numpy.ascontiguousarray(to_host(layer.W)),
             numpy.ascontiguousarray(to_host(layer.b))) for layer in net.layers]


# -- ONNX -----------------------------------------------------------------------------------------
def _activation_nodes(helper: Any, act: dict, z: str, y: str, dtype: numpy.dtype) -> tuple[list, list]:
    """(nodes, constants) computing activation ``act`` (a gpunn config) from ``z`` into ``y``.

    float32 graphs use ONNX's own activation ops. onnxruntime has no float64 kernels for ``Softplus`` and
    ``Elu``, and ``LeakyRelu``'s α is a float32 attribute, so float64 graphs write those three from
    elementwise ops, as gpunn computes them: max(z, αz), relu(z) + log(1 + e^(−|z|)), relu(z) + a(e^min(z,0) − 1).
    """
    name, node = act["name"], helper.make_node
    simple = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "softplus": "Softplus"}
    if name == "identity":
        return [node("Identity", [z], [y])], []
    if name == "softmax":
        return [node("Softmax", [z], [y], axis=1)], []
    if dtype == numpy.float32 or name not in ("leaky_relu", "softplus", "elu"):
        if name in simple:
            return [node(simple[name], [z], [y])], []
        if name == "leaky_relu":
            return [node("LeakyRelu", [z], [y], alpha=float(act["alpha"]))], []
        return [node("Elu", [z], [y], alpha=float(act["a"]))], []
    t = f"{z}.t"
    consts = {f"{t}.one": 1.0, f"{t}.zero": 0.0, f"{t}.param": float(act.get("alpha", act.get("a", 0.0)))}
    inits = [helper.make_tensor(k, helper.np_dtype_to_tensor_dtype(dtype), [], [v]) for k, v in consts.items()]
    if name == "leaky_relu":
        nodes = [node("Mul", [z, f"{t}.param"], [f"{t}.az"]), node("Max", [z, f"{t}.az"], [y])]
    elif name == "softplus":
        nodes = [node("Abs", [z], [f"{t}.abs"]), node("Neg", [f"{t}.abs"], [f"{t}.neg"]),
                 node("Exp", [f"{t}.neg"], [f"{t}.exp"]), node("Add", [f"{t}.exp", f"{t}.one"], [f"{t}.sum"]),
                 node("Log", [f"{t}.sum"], [f"{t}.log"]), node("Relu", [z], [f"{t}.relu"]),
                 node("Add", [f"{t}.relu", f"{t}.log"], [y])]
    else:
        nodes = [node("Min", [z, f"{t}.zero"], [f"{t}.min"]), node("Exp", [f"{t}.min"], [f"{t}.exp"]),
                 node("Sub", [f"{t}.exp", f"{t}.one"], [f"{t}.em1"]), node("Mul", [f"{t}.em1", f"{t}.param"],
                                                                          [f"{t}.neg"]),
                 node("Relu", [z], [f"{t}.relu"]), node("Add", [f"{t}.relu", f"{t}.neg"], [y])]
    used = {i for n in nodes for i in n.input}
    return nodes, [c for c in inits if c.name in used]


def onnx_model(net: Any, extra: dict | None = None) -> Any:
    """The ONNX ``ModelProto`` of ``net`` (checked by ``onnx.checker``), as :func:`write_onnx` writes it; the
    ``data`` entry of ``extra`` (what ``gpunn train --data`` knows of the data: feature names, labels) goes
    into the metadata as ``gpunn_data``."""
    onnx = _require("onnx", "onnx", SaveError)
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    elem = helper.np_dtype_to_tensor_dtype(net.dtype)
    nodes, inits, x = [], [], "X"
    layers = _layers(net)
    for k, (act, W, b) in enumerate(layers):
        inits += [numpy_helper.from_array(W, f"layers.{k}.W"), numpy_helper.from_array(b, f"layers.{k}.b")]
        z, y = f"layers.{k}.z", "Y" if k == len(layers) - 1 else f"layers.{k}.y"
        nodes.append(helper.make_node("Gemm", [x, f"layers.{k}.W", f"layers.{k}.b"], [z], name=f"layers.{k}.gemm"))
        more, consts = _activation_nodes(helper, act, z, y, numpy.dtype(net.dtype))
        nodes += more
        inits += consts
        x = y
    graph = helper.make_graph(nodes, "gpunn.Sequential", [helper.make_tensor_value_info("X", elem, ["N", net.n_in])],
                              [helper.make_tensor_value_info("Y", elem, ["N", net.n_out])], initializer=inits)
    model = helper.make_model(graph, producer_name="gpunn", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = _ONNX_IR_VERSION
    props = {"gpunn_config": json.dumps(net.config(), sort_keys=True)}
    if (extra or {}).get("data") is not None:
        props["gpunn_data"] = json.dumps(extra["data"], sort_keys=True)  # type: ignore[index]
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model


def write_onnx(net: Any, path: PathLike, extra: dict | None = None) -> None:
    """Write ``net`` as an ONNX graph to ``path``, atomically (see the module docstring)."""
    data = onnx_model(net, extra).SerializeToString()
    io.atomic_write(path, lambda fh: fh.write(data))


# -- safetensors ------------------------------------------------------------------------------------
def write_safetensors(net: Any, path: PathLike, extra: dict | None = None) -> None:
    """Write ``net``'s weights and biases as safetensors, with gpunn's header (its configuration and
    ``extra``, e.g. the loss and optimiser) in the metadata, atomically."""
    st = _require("safetensors.numpy", "safetensors", SaveError)
    tensors = {}
    for k, (_, W, b) in enumerate(_layers(net)):
        tensors[f"layers.{k}.W"], tensors[f"layers.{k}.b"] = W, b
    params = numpy.asarray(to_host(net.flat_parameters()))
    header = {"format": io.FORMAT, "format_version": io.FORMAT_VERSION, "gpunn_version": __version__,
              **net.config(), **(extra or {}), "n_parameters": int(params.size)}
    header["sha256"] = io.digest(header, params)
    data = st.save(tensors, metadata={"gpunn": json.dumps(header, sort_keys=True)})
    io.atomic_write(path, lambda fh: fh.write(data))


def read_safetensors(path: PathLike) -> tuple[dict, numpy.ndarray]:
    """(header, flat parameters) of a safetensors file written by :func:`write_safetensors`, checked as
    gpunn's own files are (format, version, checksum, finite values); ModelFileError otherwise."""
    st = _require("safetensors.numpy", "safetensors", ModelFileError)
    shown = os.fsdecode(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    with io.open_regular(path, what="safetensors file") as fh:
        data = fh.read()
    header = _safetensors_header(data, shown)
    try:
        tensors = st.load(data)
    except Exception as exc:  # the Rust reader's SafetensorError is not a subclass of anything stable
        raise ModelFileError(f"{shown} is not a valid safetensors file ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    layers = header.get("layers")
    n = len(layers) if isinstance(layers, list) else 0
    names = [f"layers.{k}.{p}" for k in range(n) for p in ("W", "b")]
    if not n or sorted(tensors) != sorted(names):
        raise ModelFileError(f"{shown}: tensors {sorted(tensors)[:8]} do not match the {n} layer(s) in its header")
    params = numpy.concatenate([tensors[name].ravel() for name in names])
    if params.dtype.kind != "f" or params.dtype.name != header.get("dtype"):
        raise ModelFileError(f"{shown}: the tensors are {params.dtype}, but the header says "
                             f"{str(header.get('dtype'))[:20]}")
    _check(header, params, shown)
    return header, params


def _check(header: dict, params: numpy.ndarray, shown: str) -> None:
    """The checks gpunn's own model file gets: format, version, checksum, finite values."""
    if header.get("format") != io.FORMAT or header.get("format_version") != io.FORMAT_VERSION:
        raise ModelFileError(f"{shown}: its metadata says format {str(header.get('format'))[:50]!r} version "
                             f"{str(header.get('format_version'))[:20]}; this gpunn reads {io.FORMAT!r} version "
                             f"{io.FORMAT_VERSION}")
    if header.get("sha256") != io.digest(header, params):
        raise ModelFileError(f"{shown} failed its checksum: the metadata or the weights were changed after saving")
    if not numpy.all(numpy.isfinite(params)):
        raise ModelFileError(f"{shown} holds NaN or infinite weights; a trained gpunn network never has them")


def _safetensors_header(data: bytes, shown: str) -> dict:
    """gpunn's header from the safetensors file's metadata (read with bounds before anything else)."""
    if len(data) < 8:
        raise ModelFileError(f"{shown} is not a safetensors file (only {len(data)} bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_SAFETENSORS_HEADER, len(data) - 8):
        raise ModelFileError(f"{shown} is not a safetensors file, or is truncated (header of {size} bytes)")
    try:
        meta = json.loads(data[8:8 + size].decode("utf-8")).get("__metadata__") or {}
        header = json.loads(meta["gpunn"])
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UnicodeDecodeError):
        raise ModelFileError(f"{shown} is a safetensors file without gpunn's configuration in its metadata; "
                             "gpunn loads the safetensors files it wrote (the layers and activations are "
                             "not in the tensors)") from None
    return header


# -- dispatch -------------------------------------------------------------------------------------
def write(fmt: str, net: Any, path: PathLike, extra: dict) -> None:
    """Write ``net`` to ``path`` in an export format (``"onnx"`` or ``"safetensors"``)."""
    if fmt == "onnx":
        write_onnx(net, path, extra)
    else:
        write_safetensors(net, path, extra)


def read_model_file(path: PathLike) -> tuple[dict, numpy.ndarray]:
    """(header, flat parameters) of a model file: ``.safetensors`` by its reader, ``.onnx`` refused (an
    export, not read back), anything else as gpunn's own ``.npz``."""
    ext = os.path.splitext(os.fsdecode(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike))
                           else "")[1].lower()
    if ext == ".safetensors":
        return read_safetensors(path)
    if ext == ".onnx":
        raise ModelFileError(f"{os.fsdecode(os.fspath(path))} is an ONNX export; gpunn does not read ONNX back. "
                             "Load the model from its .npz or .safetensors file")
    return io.read_model(path)
