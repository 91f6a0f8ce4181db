"""Data sets: the embedded 8×8 handwritten digits, synthetic sets, splitting and scaling helpers,
and a reader for MNIST-style IDX files a user already has.

All functions return NumPy arrays on the host; models move them to their device once.
"""
from __future__ import annotations

import gzip
import importlib.resources
import math
import numbers
import os
import struct
import zlib
from typing import IO, Any

import numpy

from .errors import ConfigError, DataError, ShapeError, unknown_name
from .io import open_regular
from .scalars import flag, integer, is_number, real, shown
from .validation import one_hot_host

__all__ = ["load_digits", "xor", "two_spirals", "two_moons", "train_test_split", "standardize", "one_hot",
           "read_idx", "names", "load"]


def load_digits(scaled: bool = True) -> tuple[numpy.ndarray, numpy.ndarray]:
    """The UCI optical handwritten digits, 8×8 (1,797 samples, 64 features, 10 classes).

    Returns ``(X, y)``: X float64 of shape (1797, 64), pixel counts 0..16 divided by 16 when
    ``scaled``; y int64 labels 0..9. Source: UCI ML repository (E. Alpaydin, C. Kaynak), the
    subset scikit-learn ships; licence CC BY 4.0.
    """
    scaled = flag("scaled", scaled)
    ref = importlib.resources.files("gpunn") / "data" / "digits.npz"
    with ref.open("rb") as fh, numpy.load(fh, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    X = images.astype(numpy.float64)
    return (X / 16.0 if scaled else X), labels.astype(numpy.int64)


def xor() -> tuple[numpy.ndarray, numpy.ndarray]:
    """The four XOR points and their targets, shapes (4, 2) and (4, 1)."""
    X = numpy.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=numpy.float64)
    return X, numpy.array([[0], [1], [1], [0]], dtype=numpy.float64)


def _rng(seed: int | None) -> numpy.random.Generator:
    seed = None if seed is None else integer("seed", seed, low=0, limit=None)     # SeedSequence takes any size
    return numpy.random.Generator(numpy.random.PCG64(seed))


def _sizes(n: Any, noise: Any) -> tuple[int, float]:
    return integer("n", n, low=2), real("noise", noise, 0.0)


def two_spirals(n: int = 400, noise: float = 0.1, seed: int | None = 0) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Two interleaved spirals in 2-D: X (n, 2), labels y (n,) in {0, 1}."""
    n, noise = _sizes(n, noise)
    rng = _rng(seed)
    m = n // 2
    theta = numpy.sqrt(rng.uniform(0, 1, size=n)) * 3 * numpy.pi
    r = theta / (3 * numpy.pi) * 2
    sign = numpy.where(numpy.arange(n) < m, 1.0, -1.0)
    X = numpy.stack([sign * r * numpy.cos(theta), sign * r * numpy.sin(theta)], axis=1)
    X += rng.normal(0, noise, size=X.shape)
    return X, (numpy.arange(n) >= m).astype(numpy.int64)


def two_moons(n: int = 400, noise: float = 0.1, seed: int | None = 0) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Two interleaving half circles in 2-D: X (n, 2), labels y (n,) in {0, 1}."""
    n, noise = _sizes(n, noise)
    rng = _rng(seed)
    m = n // 2
    t_out = numpy.linspace(0, numpy.pi, m)
    t_in = numpy.linspace(0, numpy.pi, n - m)
    X = numpy.concatenate([numpy.stack([numpy.cos(t_out), numpy.sin(t_out)], 1),
                           numpy.stack([1 - numpy.cos(t_in), 0.5 - numpy.sin(t_in)], 1)])
    X += rng.normal(0, noise, size=X.shape)
    return X, numpy.concatenate([numpy.zeros(m, numpy.int64), numpy.ones(n - m, numpy.int64)])


def train_test_split(X: Any, y: Any, test_size: float = 0.25, seed: int | None = 0):
    """Shuffle and split into ``(X_train, X_test, y_train, y_test)``; ``test_size`` a fraction or a count."""
    X, y = numpy.asarray(X), numpy.asarray(y)
    n = X.shape[0]
    if y.shape[0] != n:
        raise ShapeError(f"X has {n} samples but y has {y.shape[0]}")
    if not is_number(test_size):
        raise ConfigError(f"test_size must be a fraction in (0, 1) or a whole number of samples; got "
                          f"{shown(test_size)}")
    if isinstance(test_size, numbers.Integral):
        n_test = integer("test_size", test_size, low=1)
    else:
        n_test = int(round(real("test_size as a fraction", test_size, 0.0, 1.0, low_open=True, high_open=True) * n))
    if not 0 < n_test < n:
        raise ConfigError(f"test_size gives {n_test} test samples out of {n}; it must leave both parts non-empty")
    perm = _rng(seed).permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    return X[train], X[test], y[train], y[test]


def standardize(X_train: Any, *others: Any, eps: float = 1e-8):
    """Scale features to zero mean and unit variance using X_train's statistics.

    Returns the scaled X_train followed by each of ``others`` scaled the same way. Constant
    features (std below ``eps``) are only centred.
    """
    eps = real("eps", eps, 0.0)
    X_train = numpy.asarray(X_train, dtype=numpy.float64)
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std = numpy.where(std < eps, 1.0, std)
    out = [(X_train - mean) / std] + [(numpy.asarray(o, dtype=numpy.float64) - mean) / std for o in others]
    return out[0] if not others else tuple(out)


def one_hot(labels: Any, n_classes: int | None = None) -> numpy.ndarray:
    """Integer labels (n,) as one-hot rows (n, n_classes), float64."""
    lab = numpy.asarray(labels)
    if lab.ndim != 1 or lab.dtype.kind not in "iub":
        raise DataError(f"one_hot needs a 1-D array of integer labels; got dtype {lab.dtype}, shape {lab.shape}")
    if lab.size and lab.min() < 0:
        raise DataError("one_hot labels must be >= 0")
    k = int(lab.max()) + 1 if n_classes is None else int(n_classes)
    if lab.size and lab.max() >= k:
        raise DataError(f"label {int(lab.max())} does not fit n_classes={k}")
    return one_hot_host(lab, k)


_IDX_TYPES: dict[int, Any] = {0x08: numpy.uint8, 0x09: numpy.int8, 0x0B: numpy.dtype(">i2"), 0x0C: numpy.dtype(">i4"),
              0x0D: numpy.dtype(">f4"), 0x0E: numpy.dtype(">f8")}


def read_idx(path: Any) -> numpy.ndarray:
    """Read an MNIST-format IDX file (raw or ``.gz``) into an array of its stored shape.

    The header is checked first; then exactly the bytes it announces are read (a gzip stream is never
    inflated past them), so work and memory are bounded by the header. Any malformed file is a DataError.
    """
    with open_regular(path, DataError, "IDX file") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        fh: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw  # type: ignore[assignment]
        try:
            dtype, shape, nbytes = _idx_header(fh, path)
            if not gzipped and nbytes != os.fstat(raw.fileno()).st_size - 4 - 4 * len(shape):
                raise DataError(f"{path} is truncated or padded: its header announces {nbytes} data bytes for "
                                f"shape {shape}, the file holds {os.fstat(raw.fileno()).st_size - 4 - 4 * len(shape)}")
            body = _read_exactly(fh, nbytes, path)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return numpy.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_header(fh: IO[bytes], path: Any) -> tuple[numpy.dtype, tuple[int, ...], int]:
    """(element dtype, shape, data bytes) from an IDX header; the size is computed in Python integers."""
    magic = fh.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = magic[2], magic[3]
    if code not in _IDX_TYPES:
        raise DataError(f"{path}: unknown IDX element type 0x{code:02x}")
    dims = fh.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", dims)
    dtype = numpy.dtype(_IDX_TYPES[code])
    return dtype, shape, math.prod(shape) * dtype.itemsize


def _read_exactly(fh: IO[bytes], nbytes: int, path: Any) -> bytes:
    """The next ``nbytes`` of ``fh``, read in chunks (memory grows only with data that really arrives),
    and a DataError if the stream ends before or goes on after them."""
    chunks, have = [], 0
    while have <= nbytes:
        chunk = fh.read(min(1 << 24, nbytes + 1 - have))
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    if have != nbytes:
        raise DataError(f"{path} is truncated or padded: its header announces {nbytes} data bytes, "
                        f"{'found only ' + str(have) if have < nbytes else 'but more follow'}")
    return b"".join(chunks)


def names() -> list[str]:
    """Data sets that :func:`load` knows by name."""
    return ["digits", "moons", "spirals", "xor"]


def load(name: str, seed: int = 0) -> tuple[numpy.ndarray, numpy.ndarray]:
    """A data set by name: ``(X, y)`` with integer class labels y of shape (n,)."""
    key = str(name).lower()
    if key == "digits":
        return load_digits()
    if key == "xor":
        X, Y = xor()
        return X, Y.ravel().astype(numpy.int64)
    if key == "moons":
        return two_moons(seed=seed)
    if key == "spirals":
        return two_spirals(seed=seed)
    raise unknown_name("data set", name, names())
