"""The user's own data files, as ``gpunn train --data``, ``gpunn evaluate`` and ``gpunn predict`` read them.

Three forms, told apart by the name:

- ``data.npz``: arrays ``X`` (n_samples, n_features) and ``y`` (n_samples,) or (n_samples, n_targets);
  ``--target NAME`` names another array for y. Read with ``allow_pickle=False``.
- ``X.npy,y.npy``: a pair of ``.npy`` files, comma-separated (``X.npy`` alone where no target is needed).
- ``data.csv``: a header row, then one sample a row; the target is the column ``--target`` names, by
  default the last one, and every other column is a numeric feature. Labels may be strings.

Classification (cross-entropy losses) maps the target's distinct values, sorted (numerically when they are
all numbers), to classes 0..K−1; regression (squared error) takes the numeric target as it is. Features are
standardised with the training part's mean and standard deviation, and regression targets too; after
training the scaling is folded into the first (and, for regression, the last) layer, so the saved network
takes raw features and gives targets in their own units, also as an ONNX export. The model file keeps, under
``data`` in its header, the feature names, the target's name, the task and the labels, so ``evaluate`` and
``predict`` read the same columns and give labels in their original form.

Every unreadable file or value is a :class:`~gpunn.errors.DataError` (or ``ModelFileError`` for the model)
whose message names the file, and for a CSV the column and row.
"""
from __future__ import annotations

import csv
import io as pyio
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy

from . import datasets, io, modelfile
from .backend import to_host
from .errors import ConfigError, DataError, ModelFileError
from .network import Sequential
from .network import load as load_network
from .types import PathLike

__all__ = ["Prepared", "Table", "fold_scaling", "labels_of", "load_model", "prepare", "read_table",
           "save_model", "targets_for", "write_predictions"]

#: Largest CSV file read (1 GiB): a bigger table belongs in .npy files, which are read without parsing.
MAX_CSV_BYTES = 1 << 30
_CLASSIFY = ("cross_entropy", "binary_cross_entropy")


@dataclass
class Table:
    """Features and (maybe) targets read from the user's files."""

    X: numpy.ndarray                        #: float64, (n_samples, n_features)
    y: numpy.ndarray | None                 #: the raw target values (numbers or strings), or None
    features: list[str]                     #: feature names (CSV header; x0, x1, ... otherwise)
    target: str | None                      #: the target's name (CSV column or npz array)
    source: str = ""


@dataclass
class Prepared:
    """A table made ready for one loss: the split parts (standardised), sizes, the scaling and the model info."""

    parts: tuple[numpy.ndarray, ...]        #: x_train, y_train, x_val, y_val, x_test, y_test
    n_features: int
    n_outputs: int
    output: str                             #: the output activation: softmax, sigmoid or identity
    scaling: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


# -- reading ----------------------------------------------------------------------------------------
def read_table(spec: str, target: str | None = None, need_target: bool = True,
               model_info: dict | None = None) -> Table:
    """Read the data ``spec`` names (see the module docstring). With ``model_info`` (what a model file keeps)
    a CSV's feature columns are those the model was trained on, and its target that column when present."""
    names = [s.strip() for s in str(spec).split(",")]
    ext = os.path.splitext(names[0])[1].lower()
    if len(names) == 1 and ext == ".npz":
        table = _read_npz(names[0], target or (model_info or {}).get("target") or "y", need_target)
    elif ext == ".npy" and len(names) <= 2 and all(n.lower().endswith(".npy") for n in names):
        table = _read_npy_pair(names, need_target)
    elif len(names) == 1 and ext == ".csv":
        table = _read_csv(names[0], target, need_target, model_info)
    else:
        raise DataError(f"cannot tell the data format of {spec!r}: give a .csv file (header row), an .npz file "
                        "(arrays X and y) or a pair X.npy,y.npy")
    _check_features(table)
    if model_info and model_info.get("features") and ext != ".csv" and len(model_info["features"]) != table.X.shape[1]:
        raise DataError(f"{spec} has {table.X.shape[1]} features but the model was trained on "
                        f"{len(model_info['features'])}")
    return table


def _read_bytes(path: str, limit: int | None = None) -> bytes:
    with io.open_regular(path, DataError, "data file") as fh:
        size = os.fstat(fh.fileno()).st_size
        if limit is not None and size > limit:
            raise DataError(f"{path} is {size / 2**30:.1f} GiB; gpunn reads CSV files up to "
                            f"{limit / 2**30:.0f} GiB (save larger tables as .npy files)")
        return fh.read()


def _load_npy(path: str, data: Any) -> Any:
    """numpy.load of a .npy or .npz file's bytes (``data``, a BytesIO), pickles refused; a DataError that says what
    the file is where it is not that (NumPy's own message for a file of neither kind speaks of pickled data)."""
    head = data.getvalue()[:8]
    if not head.startswith((b"\x93NUMPY", b"PK\x03\x04", b"PK\x05\x06")):
        raise DataError(f"{path} is not a NumPy file: a .npy file starts with \\x93NUMPY and an .npz file is a zip "
                        f"archive; this one starts with {head!r}")
    try:
        return numpy.load(data, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        why = str(exc)[:150] or type(exc).__name__
        if "pickle" in why:
            why = "it holds Python objects (an object array), which gpunn does not unpickle: save numbers"
        raise DataError(f"{path} is not a readable NumPy file ({why})") from None


def _read_npz(path: str, target: str, need_target: bool) -> Table:
    archive = _load_npy(path, pyio.BytesIO(_read_bytes(path)))
    if not isinstance(archive, numpy.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive of X and y")
    with archive:
        try:
            if "X" not in archive.files:
                raise DataError(f"{path} has no array X (it holds {', '.join(archive.files[:10]) or 'nothing'}); "
                                "save it with numpy.savez(path, X=features, y=targets)")
            X = archive["X"]
            y = archive[target] if target in archive.files else None
        except ValueError as exc:
            raise DataError(f"{path}: {str(exc)[:150]}") from None
    if y is None and need_target:
        raise DataError(f"{path} has no target array {target!r} (it holds {', '.join(archive.files[:10])})")
    return Table(_matrix(X, path), _column(y, path), _default_names(X), target if y is not None else None, path)


def _read_npy_pair(names: list[str], need_target: bool) -> Table:
    if need_target and len(names) != 2:
        raise DataError(f"{names[0]} holds the features only; give the targets too: --data {names[0]},y.npy")
    X = _load_npy(names[0], pyio.BytesIO(_read_bytes(names[0])))
    y = _load_npy(names[1], pyio.BytesIO(_read_bytes(names[1]))) if len(names) == 2 else None
    for name, a in zip(names, (X, y)):
        if a is not None and not isinstance(a, numpy.ndarray):
            raise DataError(f"{name} is an .npz archive, not a single .npy array")
    return Table(_matrix(X, names[0]), _column(y, names[-1]), _default_names(X), "y" if y is not None else None,
                 ",".join(names))


def _default_names(X: Any) -> list[str]:
    return [f"x{i}" for i in range(X.shape[1] if getattr(X, "ndim", 0) == 2 else 0)]


def _matrix(X: Any, path: str) -> numpy.ndarray:
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{path}: X has shape {X.shape}; it must be (n_samples, n_features), both at least 1")
    if X.dtype.kind not in "biuf":
        raise DataError(f"{path}: X is of dtype {X.dtype}; features must be numbers")
    return X.astype(numpy.float64)


def _column(y: Any, path: str) -> numpy.ndarray | None:
    if y is None:
        return None
    if y.ndim not in (1, 2) or y.dtype.kind not in "biufUS":
        raise DataError(f"{path}: y has shape {y.shape} and dtype {y.dtype}; targets must be a column of numbers "
                        "or strings, or a (n_samples, n_targets) array of numbers")
    return y.astype(str) if y.dtype.kind == "S" else y


def _read_csv(path: str, target: str | None, need_target: bool, model_info: dict | None) -> Table:
    try:
        text = _read_bytes(path, MAX_CSV_BYTES).decode("utf-8-sig")
        rows = list(csv.reader(pyio.StringIO(text)))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not a UTF-8 CSV file ({str(exc)[:120]})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DataError(f"{path} needs a header row and at least one row of data")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header) or not all(header):
        raise DataError(f"{path}: the header row must name every column once; got {header[:20]}")
    for k, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise DataError(f"{path}, row {k}: {len(r)} values but the header names {len(header)} columns")
    cols = {name: [r[i].strip() for r in rows[1:]] for i, name in enumerate(header)}
    known = model_info or {}
    if target is None:
        if known.get("target") in cols:
            target = known["target"]
        elif need_target:
            target = known.get("target") or header[-1]
    if target is not None and target not in cols:
        raise DataError(f"{path} has no column {target!r}; its columns are {', '.join(header[:20])}")
    features = [h for h in header if h != target]
    wanted = known.get("features")
    if wanted and all(f in cols for f in wanted):
        features = list(wanted)
    elif wanted and (wanted != [f"x{i}" for i in range(len(wanted))] or len(features) != len(wanted)):
        missing = [f for f in wanted if f not in cols]
        raise DataError(f"{path} lacks the feature column(s) {', '.join(missing[:10])} the model was trained on")
    X = numpy.column_stack([_numbers(cols[f], path, f) for f in features]) if features else numpy.empty((0, 0))
    y = _labels_column(cols[target], path, target) if target is not None else None
    return Table(X, y, list(features), target, path)


def _numbers(values: list[str], path: str, name: str) -> numpy.ndarray:
    try:
        return numpy.array([float(v) for v in values], dtype=numpy.float64)
    except ValueError:
        k, v = next((k, v) for k, v in enumerate(values) if not _is_number(v))
        what = "an empty cell" if not v else f"{v[:40]!r}, not a number"
        raise DataError(f"{path}, column {name!r}, row {k + 2}: {what}; features must be numeric") from None


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _labels_column(values: list[str], path: str, name: str) -> numpy.ndarray:
    """A CSV target column: numbers where every cell is one (integers where all are whole), else strings."""
    if "" in values:
        raise DataError(f"{path}, column {name!r}, row {values.index('') + 2}: an empty cell")
    if all(_is_number(v) for v in values):
        y = numpy.array([float(v) for v in values])
        whole = numpy.isfinite(y).all() and (y == numpy.round(y)).all() and numpy.abs(y).max() < 2**53
        return y.astype(numpy.int64) if whole else y
    return numpy.array(values)


def _check_features(table: Table) -> None:
    bad = ~numpy.isfinite(table.X)
    if bad.any():
        row, col = (int(i) for i in numpy.argwhere(bad)[0])
        raise DataError(f"{table.source}: {int(bad.sum())} feature value(s) are NaN or infinite (first: row "
                        f"{row + 1}, feature {table.features[col] if col < len(table.features) else col}); "
                        "remove or impute them first")
    if table.y is not None and table.y.shape[0] != table.X.shape[0]:
        raise DataError(f"{table.source}: {table.X.shape[0]} rows of features but {table.y.shape[0]} targets")


# -- targets ----------------------------------------------------------------------------------------
def labels_of(y: numpy.ndarray) -> list:
    """The distinct labels, sorted (numerically when numbers), as JSON-able values."""
    if y.ndim != 1:
        raise DataError(f"classification needs one label per sample; the target has shape {y.shape}")
    return [v.item() if isinstance(v, numpy.generic) else v for v in numpy.unique(y)]


def targets_for(y: numpy.ndarray, loss: str, labels: list | None, source: str, n_out: int) -> numpy.ndarray:
    """The network's targets for raw ``y`` under ``loss``: class codes (via ``labels``), one sigmoid column, or
    the numbers themselves (regression)."""
    one_hot_labels = loss == "squared_error" and n_out > 1 and y.ndim == 1 and (labels is not None
                                                                                 or y.dtype.kind in "iu")
    if loss in _CLASSIFY or one_hot_labels:     # (a built-in set's squared-error model: one-hot rows of labels)
        labels = labels if labels is not None else list(range(n_out if n_out > 1 else 2))
        index = {str(v): k for k, v in enumerate(labels)}
        keys = [str(v.item() if isinstance(v, numpy.generic) else v) for v in y.reshape(-1)]
        unknown = sorted({k for k in keys if k not in index})
        if unknown or y.ndim != 1:
            raise DataError(f"{source}: label(s) {', '.join(unknown[:5]) or y.shape} not among the model's "
                            f"classes {labels[:10]}")
        codes = numpy.array([index[k] for k in keys])
        if loss == "cross_entropy":
            return codes
        return codes.reshape(-1, 1).astype(float) if n_out == 1 else datasets.one_hot(codes, n_out)
    if y.dtype.kind not in "biuf":
        raise DataError(f"{source}: squared error fits numeric targets; this target holds text (use "
                        "--loss cross_entropy to classify)")
    return y.reshape(y.shape[0], -1).astype(numpy.float64)


def prepare(table: Table, loss: str, seed: int) -> Prepared:
    """Targets for ``loss``, the split (test 25 %, then validation 15 % of the rest, as the built-in sets),
    and the features (and regression targets) standardised with the training part's statistics."""
    assert table.y is not None
    labels = labels_of(table.y) if loss in _CLASSIFY else None
    if labels is not None and len(labels) < 2:
        raise DataError(f"{table.source}: the target {table.target!r} holds one class ({labels[0]!r}); "
                        "classification needs two or more")
    if loss == "binary_cross_entropy" and labels is not None and len(labels) != 2:
        raise ConfigError(f"binary_cross_entropy needs exactly 2 classes; {table.target!r} has {len(labels)}: "
                          "use --loss cross_entropy")
    n_out = (1 if len(labels) == 2 and loss == "binary_cross_entropy" else len(labels)) if labels else (
        table.y.reshape(table.y.shape[0], -1).shape[1])
    Y = targets_for(table.y, loss, labels, table.source, n_out)
    try:
        Xtr, Xte, Ytr, Yte = datasets.train_test_split(table.X, Y, test_size=0.25, seed=seed)
        Xfit, Xval, Yfit, Yval = datasets.train_test_split(Xtr, Ytr, test_size=0.15, seed=seed)
    except ConfigError:
        raise DataError(f"{table.source} has {table.X.shape[0]} samples; training needs at least 8 (a quarter is "
                        "the test set, 15 % of the rest the validation set)") from None
    mean, scale = _stats(Xfit)
    scaling = {"x_mean": mean, "x_scale": scale}
    parts = [(Xfit - mean) / scale, Yfit, (Xval - mean) / scale, Yval, (Xte - mean) / scale, Yte]
    if labels is None:
        ym, ys = _stats(Yfit)
        scaling.update(y_mean=ym, y_scale=ys)
        parts[1], parts[3], parts[5] = (Yfit - ym) / ys, (Yval - ym) / ys, (Yte - ym) / ys
    output = {"cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}.get(loss, "identity")
    info = {"source": os.path.basename(table.source), "features": table.features, "target": table.target,
            "task": "classification" if labels is not None else "regression", "labels": labels}
    return Prepared(tuple(parts), table.X.shape[1], n_out, output, scaling, info)


def _stats(a: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
    mean, std = a.mean(axis=0), a.std(axis=0)
    return mean, numpy.where(std > 0, std, 1.0)


def fold_scaling(net: Sequential, scaling: dict) -> None:
    """Fold the standardisation into the weights: the first layer then takes raw features,
    z = x·(W/σ) + (b − (μ/σ)·W), and a regression's identity output gives targets in their units."""
    first, last = net.layers[0], net.layers[-1]
    W, b = to_host(first.W).astype(numpy.float64), to_host(first.b).astype(numpy.float64)
    mean, scale = scaling["x_mean"], scaling["x_scale"]
    first.W, first.b = W / scale[:, None], b - (mean / scale) @ W
    if "y_mean" in scaling and last.activation.name == "identity":
        W, b = to_host(last.W).astype(numpy.float64), to_host(last.b).astype(numpy.float64)
        last.W, last.b = W * scaling["y_scale"][None, :], b * scaling["y_scale"] + scaling["y_mean"]


# -- the model file with the data's description -----------------------------------------------------
def save_model(net: Sequential, path: PathLike, info: dict | None) -> None:
    """Save ``net`` as :meth:`Sequential.save` does (format by extension), with ``info`` under ``data``."""
    with net.reading("save"):
        modelfile.write(path, net, net.loss, net.optimizer, None if info is None else {"data": info})


def load_model(path: PathLike, device: Any = None) -> tuple[Sequential, dict | None]:
    """(network, the ``data`` description saved with it, or None) from a model file."""
    net = load_network(path, device=device)
    info = modelfile.read(path).header.get("data")
    if info is None:
        return net, None
    ok = (isinstance(info, dict) and isinstance(info.get("features"), list)
          and all(isinstance(f, str) for f in info["features"]) and len(info["features"]) == net.n_in
          and (info.get("labels") is None or isinstance(info["labels"], list)))
    if not ok:
        raise ModelFileError(f"{path} has an invalid data description in its header")
    return net, info


def write_predictions(path: str, values: numpy.ndarray, column: str) -> None:
    """Write predictions to ``path``: ``.npy`` (an array), or ``.csv`` (a header row, one value a row)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        io.atomic_write(path, lambda fh: numpy.save(fh, values, allow_pickle=False))
        return
    if ext != ".csv":
        raise ConfigError(f"cannot tell the output format of {path!r}: end the name with .npy or .csv")
    buf = pyio.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    rows = values.reshape(values.shape[0], -1)
    out.writerow([column] if rows.shape[1] == 1 else [f"{column}{j}" for j in range(rows.shape[1])])
    out.writerows([[_cell(v) for v in row] for row in rows])
    io.write_text_atomic(path, buf.getvalue())


def _cell(v: Any) -> str:
    """A CSV cell: the shortest text that reads back as the same number in its own dtype."""
    return str(v)
