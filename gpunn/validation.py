"""Checks at the API edge: every array that enters gpunn passes through here once.

Integer and boolean inputs are cast to the model's float dtype; object, string and complex inputs are
refused. Shapes, lengths, NaN/inf and class labels are checked with messages that say what to do.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import numpy

from .backend import Device, device_of, is_cupy_array
from .errors import ConfigError, DataError, DataTypeError, DeviceError, ShapeError
from .scalars import integer
from .types import Array, ArrayLike, ArrayModule, DTypeLike

if TYPE_CHECKING:
    from .losses import Loss

FLOAT_DTYPES = ("float32", "float64")


def check_dtype(dtype: DTypeLike) -> numpy.dtype:
    """The model dtype: float32 or float64."""
    try:
        dt = numpy.dtype(dtype)
    except TypeError:
        raise ConfigError(f"dtype must be 'float32' or 'float64'; got {dtype!r}") from None
    if dt.name not in FLOAT_DTYPES:
        raise ConfigError(f"dtype must be 'float32' or 'float64'; got {dt.name!r}")
    return dt


def _read_array(a: ArrayLike, name: str) -> numpy.ndarray:
    """A list, scalar or array-like (pandas, a CPU tensor of another library...) as a NumPy array, or
    DataTypeError when it cannot be read as one: not rectangular, or an object that refuses the conversion
    (a PyTorch tensor that requires grad, one on a GPU), whose own message says how to convert it."""
    if isinstance(a, numpy.ma.MaskedArray) and numpy.ma.is_masked(a):
        raise DataTypeError(f"{name} is a masked array with masked entries; fill them first "
                            f"({name}.filled(value)) or drop those rows")
    try:
        arr = numpy.asarray(a)
    except Exception as exc:       # anything a foreign __array__ raises (RuntimeError from torch, ...)
        kind = f"{type(a).__module__}.{type(a).__qualname__}"
        raise DataTypeError(f"{name} ({kind}) cannot be read as an array ({str(exc)[:200]}); pass a rectangular "
                            "numeric NumPy array (from PyTorch: tensor.detach().cpu().numpy())") from None
    if arr.dtype.kind == "O" and arr.ndim == 0 and hasattr(a, "toarray"):
        raise DataTypeError(f"{name} is a sparse matrix; gpunn takes dense arrays: pass {name}.toarray()")
    return arr


def to_device_array(a: ArrayLike, dev: Device, dtype: numpy.dtype, name: str) -> Array:
    """``a`` (NumPy, CuPy, nested list) as a ``dtype`` array on ``dev``, refusing unusable types."""
    if a is None:
        raise DataError(f"{name} is None; pass an array")
    if is_cupy_array(a):
        if dev.is_cuda and a.device.id != dev.index:
            raise DeviceError(f"{name} is on cuda:{a.device.id} but the model is on {dev}; "
                              f"move it with gpunn.get_device('{dev}').asarray({name}) or net.to(...)")
        src = a
    else:
        src = _read_array(a, name)
    kind = src.dtype.kind
    if kind in "OUSV" or kind == "M" or kind == "m":
        raise DataTypeError(f"{name} has dtype {src.dtype} ({'strings' if kind in 'US' else 'objects'} "
                            "are not numbers); convert it to a numeric array first")
    if kind == "c":
        raise DataTypeError(f"{name} is complex ({src.dtype}); gpunn works on real numbers: pass "
                            f"{name}.real or abs({name}) explicitly")
    return dev.asarray(src, dtype=dtype)


#: Elements per chunk of the NaN/inf check: its mask is this big, never the size of the data.
FINITE_CHUNK = 1 << 20


def check_finite(xp: ArrayModule, a: Array, name: str) -> None:
    """DataError if ``a`` holds NaN or inf; checked a chunk of rows at a time, with one host sync."""
    rows = max(1, FINITE_CHUNK // max(1, a[:1].size)) if a.ndim else 1
    ok = xp.ones((), dtype=bool)
    for s in range(0, a.shape[0] if a.ndim else 1, rows):
        ok &= xp.isfinite(a[s:s + rows] if a.ndim else a).all()
    if not bool(ok):
        bad = sum(int(xp.count_nonzero(~xp.isfinite(a[s:s + rows] if a.ndim else a)))
                  for s in range(0, a.shape[0] if a.ndim else 1, rows))
        raise DataError(f"{name} contains {bad} NaN or infinite value(s); clean or impute them first")


def features(X: ArrayLike, dev: Device, dtype: numpy.dtype, n_in: int, name: str = "X") -> Array:
    """Validate inputs X of shape (n_samples, n_in) and place them on ``dev``."""
    x = to_device_array(X, dev, dtype, name)
    if x.ndim != 2:
        hint = (f" (for one sample use {name}.reshape(1, -1); for one feature {name}.reshape(-1, 1))"
                if x.ndim == 1 else "")
        raise ShapeError(f"{name} must be 2-D (n_samples, n_features); got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (0 samples)")
    if x.shape[1] != n_in:
        raise ShapeError(f"{name} has {x.shape[1]} features but the first layer expects n_in={n_in}")
    check_finite(dev.xp, x, name)
    return x


def streamed_features(X: numpy.ndarray, n_in: int, name: str = "X") -> numpy.ndarray:
    """Check a memmapped X of shape (n_samples, n_in) without reading it: its values are checked batch by
    batch as training reads them."""
    kind = X.dtype.kind
    if kind not in "fiub":
        raise DataTypeError(f"{name} has dtype {X.dtype}; a memmapped {name} must hold real numbers")
    if X.ndim != 2:
        raise ShapeError(f"{name} must be 2-D (n_samples, n_features); got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise DataError(f"{name} is empty (0 samples)")
    if X.shape[1] != n_in:
        raise ShapeError(f"{name} has {X.shape[1]} features but the first layer expects n_in={n_in}")
    return X


def targets(Y: ArrayLike, dev: Device, dtype: numpy.dtype, loss: Loss, n_out: int, n: int,
            name: str = "Y") -> Array:
    """Validate targets for ``loss`` and return them as (n, n_out) ``dtype`` rows on ``dev``.

    Cross-entropy takes integer class labels (shape (n,)) or one-hot / probability rows (n, n_out);
    the other losses take (n, n_out), or (n,) when n_out == 1.
    """
    raw = Y if is_cupy_array(Y) or isinstance(Y, numpy.ndarray) else _read_array(Y, name)
    if loss.name == "cross_entropy" and raw.ndim == 1:
        return _labels_to_one_hot(raw, dev, dtype, n_out, n, name)
    t = to_device_array(Y, dev, dtype, name)
    if t.ndim == 1 and n_out == 1:
        t = t.reshape(-1, 1)
    if t.ndim != 2 or t.shape[1] != n_out:
        extra = (" or integer class labels of shape (n_samples,)" if loss.name == "cross_entropy" else "")
        raise ShapeError(f"{name} has shape {tuple(t.shape)}; {loss.name} needs (n_samples, {n_out}) "
                         f"to match the last layer's n_out={n_out}{extra}")
    if t.shape[0] != n:
        raise ShapeError(f"X has {n} samples but {name} has {t.shape[0]}; they must match")
    check_finite(dev.xp, t, name)
    xp = dev.xp
    if loss.name in ("cross_entropy", "binary_cross_entropy"):
        if bool(((t < 0) | (t > 1)).any()):
            raise DataError(f"{name} for {loss.name} must hold probabilities in [0, 1] (one-hot rows or "
                            "0/1 labels)")
    if loss.name == "cross_entropy" and bool((xp.abs(t.sum(axis=1) - 1) > 1e-3).any()):
        raise DataError(f"each row of {name} must sum to 1 for cross_entropy (one-hot or probabilities)")
    return t


def _labels_to_one_hot(raw: Array, dev: Device, dtype: numpy.dtype, n_out: int, n: int, name: str) -> Array:
    lab = raw.get() if is_cupy_array(raw) else numpy.asarray(raw)
    if lab.dtype.kind not in "iub":
        if lab.dtype.kind != "f":
            raise DataTypeError(f"class labels {name} must be integers; got dtype {lab.dtype}")
        if not numpy.all(numpy.isfinite(lab)) or numpy.any(lab != numpy.round(lab)):
            raise DataError(f"class labels {name} must be whole numbers 0..{n_out - 1}; found non-integer "
                            "values")
    if lab.shape[0] != n:
        raise ShapeError(f"X has {n} samples but {name} has {lab.shape[0]}; they must match")
    out_of_range = (lab < 0) | (lab >= n_out)            # checked before any cast, which could wrap
    if out_of_range.any():
        bad = lab[out_of_range][0]
        shown = int(bad) if lab.dtype.kind in "iub" or abs(float(bad)) < 2**53 else f"{float(bad):g}"
        raise DataError(f"class label {shown} in {name} is out of range: the last layer has n_out={n_out}, "
                        f"so labels must be in 0..{n_out - 1}")
    return dev.asarray(one_hot_host(lab.astype(numpy.int64), n_out), dtype=dtype)


def one_hot_host(labels: numpy.ndarray, n_classes: int) -> numpy.ndarray:
    """Integer labels (n,), already checked to lie in 0..n_classes − 1, as one-hot float64 rows (n, n_classes)."""
    out = numpy.zeros((labels.shape[0], n_classes))
    out[numpy.arange(labels.shape[0]), labels] = 1.0
    return out


def as_model_array(value: ArrayLike, target: Array, name: str) -> Array:
    """``value`` checked against the shape of parameter ``target``, on its device and dtype."""
    dev = device_of(target)
    arr = to_device_array(value, dev, target.dtype, name)
    if tuple(arr.shape) != tuple(target.shape):
        raise ShapeError(f"{name} must have shape {tuple(target.shape)}; got {tuple(arr.shape)}")
    check_finite(dev.xp, arr, name)
    return arr


def positive_int(name: str, value: Any, allow_zero: bool = False) -> int:
    """``value`` as an int >= 1 (>= 0 with ``allow_zero``): :func:`gpunn.scalars.integer`'s rule."""
    return integer(name, value, low=0 if allow_zero else 1)


class StepArrays:
    """(x, t, loss) for a model's training steps on ``dev``: X and Y themselves when they are already
    arrays of ``dev`` and ``dtype`` shaped (batch, n_in) and (batch, n_out) (no checks that would read
    values back from a GPU), else checked copies (:func:`features`, :func:`targets`); the loss (a name or
    a Loss) checked against the output activation ``output`` (``check``: the model's rule) once per
    object or name. What these tests compare against is read once, here: they run at every step of a
    Python-bound network."""

    def __init__(self, dev: Device, dtype: numpy.dtype, n_in: int, n_out: int, check: Callable[[Any], Loss]):
        self.dev, self.dtype, self.n_in, self.n_out, self.check = dev, dtype, n_in, n_out, check
        self.array_type, self.cuda, self.index = dev.xp.ndarray, dev.is_cuda, dev.index
        self.given: Any = None
        self.loss: Loss | None = None

    def __call__(self, X: ArrayLike, Y: ArrayLike, loss: Any, out: Any = None) -> tuple[Array, Array, Loss]:
        """(x, t, loss); ``out``, where given, must be where the step can write its loss: a one-element
        array of the model's dtype on its device (DataTypeError, ShapeError otherwise)."""
        if out is not None and (type(out) is not self.array_type or out.dtype != self.dtype or out.shape != (1,)
                                or (out.device.id != self.index if self.cuda else not out.flags.writeable)):
            self.refuse_out(out)
        checked = self.loss
        if checked is None or (loss is not self.given and not (type(loss) is str and loss == self.given)):
            checked = self.loss = self.check(loss)
            self.given = loss
        kind, dtype = self.array_type, self.dtype
        if (type(X) is kind and type(Y) is kind and X.dtype == dtype and Y.dtype == dtype and X.ndim == 2
                and (rows := X.shape[0]) and X.shape[1] == self.n_in and Y.shape == (rows, self.n_out)
                and (not self.cuda or X.device.id == Y.device.id == self.index)):
            return X, Y, checked
        device_of(X, Y)
        x = features(X, self.dev, dtype, self.n_in)
        return x, targets(Y, self.dev, dtype, checked, self.n_out, x.shape[0]), checked

    def refuse_out(self, out: Any) -> NoReturn:
        """The error for an ``out`` that is not a writeable one-element array of the model's dtype on its device:
        DataTypeError for another type, dtype or device, ShapeError for another shape, else DataError (a
        read-only array); the message made only here."""
        where = f"a one-element {self.dtype.name} array on {self.dev}"
        if type(out) is not self.array_type or out.dtype != self.dtype or (self.cuda and out.device.id != self.index):
            kind = f"{type(out).__name__} of {out.dtype}" if hasattr(out, "dtype") else type(out).__name__
            raise DataTypeError(f"out must be {where} (the step writes its loss there); got a {kind}")
        if out.shape != (1,):
            raise ShapeError(f"out must be {where}, shape (1,); got shape {tuple(out.shape)}")
        raise DataError(f"out must be a writeable array (the step writes its loss there); got a read-only {where}")
