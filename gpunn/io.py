"""Files: the model file format and atomic writes. Knows bytes on disk, not networks.

A model file is one ``.npz`` holding the flat parameters and a JSON header. The header records the
format name and version, the gpunn version, the network's configuration (dtype, each layer's sizes,
activation with its parameters, initialiser) and a SHA-256 of the header and parameters, so a
truncated, corrupt or foreign file is rejected with a message naming the problem. Files are read with
``allow_pickle=False``: nothing in a model file is ever unpickled or executed. Writes go to a
temporary file in the same folder, then replace the target in one rename: a failed save leaves any
earlier file of that name intact. :meth:`gpunn.Sequential.save` and :func:`gpunn.load` build on this.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from typing import IO, Any

import numpy

from .errors import ModelFileError, SaveError
from .types import PathLike
from .version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "atomic_write", "write_text_atomic", "write_model", "read_model"]

FORMAT = "gpunn-model"
FORMAT_VERSION = 1


def digest(header: dict, params: numpy.ndarray) -> str:
    body = json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode()
    return hashlib.sha256(body + numpy.ascontiguousarray(params).tobytes()).hexdigest()


def write_model(path: PathLike, config: dict, params: numpy.ndarray) -> None:
    """Write a model file: ``config`` (JSON-able; its ``dtype`` names the parameters' dtype) and the flat
    host array ``params``, atomically (temporary file + rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SaveError(f"cannot save to {path}: folder {folder} does not exist; create it first")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "gpunn_version": __version__,
              **config, "n_parameters": int(params.size)}
    header["sha256"] = digest(header, params)
    head = numpy.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=numpy.uint8)
    try:
        atomic_write(path, lambda fh: _write_npz(fh, header=head, params=params))
    except OSError as exc:
        raise SaveError(f"cannot save to {path}: {exc.strerror or exc} (is {folder} writable?); any earlier "
                        "file there is unchanged") from None


def atomic_write(path: PathLike, write: Callable[[IO[Any]], object], mode: str = "wb") -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``: a failure at any point (an exception, Ctrl-C) leaves an earlier file intact and no
    temporary behind. Every file gpunn writes goes through here."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".gpunn-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (reports and JSON)."""
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def _write_npz(fh: IO[bytes], header: numpy.ndarray, params: numpy.ndarray) -> None:
    numpy.savez(fh, header=header, params=params)


def read_model(path: PathLike) -> tuple[dict, numpy.ndarray]:
    """(header, flat parameters) of a model file, after checking its format, version and checksum."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"no model file at {path}")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a gpunn model file (not an .npz archive); it may be truncated "
                             "or of another format")
    try:
        with numpy.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if not {"header", "params"} <= keys:
                raise ModelFileError(f"{path} is an .npz archive but not a gpunn model (arrays: "
                                     f"{sorted(keys)}; expected 'header' and 'params')")
            head = data["header"]
            params = data["params"]
    except ModelFileError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ModelFileError(f"{path} contains pickled Python objects; gpunn never unpickles, refusing "
                                 "to load it") from None
        raise ModelFileError(f"{path} is corrupt: {exc}") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as exc:
        raise ModelFileError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    try:
        header = json.loads(bytes(head.astype(numpy.uint8)).decode())
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path} has an unreadable header ({exc}); the file is corrupt or tampered") from None
    if header.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a gpunn model (format {header.get('format')!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path} has model format version {version!r}; this gpunn reads version "
                             f"{FORMAT_VERSION} (saved by gpunn {header.get('gpunn_version')}); "
                             "load it with a matching gpunn version")
    if header.get("sha256") != digest(header, params):
        raise ModelFileError(f"{path} failed its checksum: the header or the weights were changed after "
                             "saving (tampered or corrupt)")
    if params.ndim != 1 or params.dtype.name != header.get("dtype"):
        raise ModelFileError(f"{path}: parameters have shape {params.shape} and dtype {params.dtype}, but the "
                             f"header describes a flat {header.get('dtype')} array")
    return header, params
