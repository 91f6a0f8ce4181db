"""The CLI on the user's own files: gpunn train --data, evaluate, predict; bad files are one line, exit 1 or 2."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy
import pytest
from click.testing import CliRunner

import gpunn
from gpunn import userdata
from gpunn.cli import main
from helpers import child_env, host, rng


def run(*args):
    return CliRunner().invoke(main, list(args))


def _blobs(n=240, seed=0):
    """Three classes with string labels, features on very different scales (standardisation matters)."""
    g = rng(seed)
    labels = numpy.array(["setosa", "versicolor", "virginica"])
    k = g.integers(0, 3, n)
    X = g.normal(size=(n, 4)) * 0.4 + numpy.eye(3, 4)[k] * 2
    return X * [1.0, 100.0, 0.01, 5.0] + [0.0, -300.0, 7.0, 0.0], labels[k]


def _write_csv(path, X, y, names=("a", "b", "c", "d"), target="species", target_first=False):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([target, *names] if target_first else [*names, target])
        for row, label in zip(X, y):
            w.writerow([label, *row] if target_first else [*row, label])


def test_train_on_a_csv_then_evaluate_and_predict_with_string_labels(tmp_path):
    X, y = _blobs()
    data, model = tmp_path / "flowers.csv", tmp_path / "m.npz"
    _write_csv(data, X, y, target_first=True)
    r = run("train", "--data", str(data), "--target", "species", "--epochs", "30", "--device", "cpu",
            "--save", str(model), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["dataset"] == "flowers.csv" and summary["layers"] == [4, 32, 3]
    assert summary["test_accuracy"] > 0.9 and summary["data"]["labels"] == ["setosa", "versicolor", "virginica"]
    net, info = userdata.load_model(model, "cpu")
    assert info["features"] == ["a", "b", "c", "d"] and info["target"] == "species"
    # the scaling is folded into the weights: the saved network takes the raw features
    codes = numpy.searchsorted(info["labels"], y)
    assert (host(net.predict(X)).argmax(axis=1) == codes).mean() > 0.9
    r = run("evaluate", str(model), str(data), "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["samples"] == 240 and ev["accuracy"] > 0.9 and ev["loss_function"] == "cross_entropy"
    # predict on a file without the target column and with the columns in another order
    new = tmp_path / "new.csv"
    with open(new, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["d", "c", "b", "a"])
        w.writerows([[r[3], r[2], r[1], r[0]] for r in X])
    for out in ("p.csv", "p.npy"):
        r = run("predict", str(model), str(new), "--output", str(tmp_path / out), "--device", "cpu")
        assert r.exit_code == 0, r.output
    with open(tmp_path / "p.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["species"] and len(rows) == 241
    got = numpy.load(tmp_path / "p.npy", allow_pickle=False)
    assert got.dtype.kind == "U" and [r[0] for r in rows[1:]] == list(got) and (got == y).mean() > 0.9


def test_train_default_target_is_the_last_column_and_numbers_stay_numbers(tmp_path):
    X, y = _blobs(seed=1)
    numeric = numpy.searchsorted(["setosa", "versicolor", "virginica"], y) * 10 + 5   # labels 5, 15, 25
    data = tmp_path / "d.csv"
    _write_csv(data, X, numeric)
    r = run("train", "--data", str(data), "--epochs", "20", "--device", "cpu", "--save", str(tmp_path / "m.npz"))
    assert r.exit_code == 0, r.output
    r = run("predict", str(tmp_path / "m.npz"), str(data), "-o", str(tmp_path / "p.csv"), "--device", "cpu")
    assert r.exit_code == 0, r.output
    with open(tmp_path / "p.csv") as fh:
        values = {row[0] for row in list(csv.reader(fh))[1:]}
    assert values <= {"5", "15", "25"}                 # in their original form, not "5.0"


def test_npz_and_npy_pairs_and_regression_in_the_targets_units(tmp_path):
    pytest.importorskip("safetensors", reason="the model is saved as .safetensors (pip install 'gpunn[safetensors]')")
    g = rng(3)
    X = g.normal(size=(300, 3)) * [1.0, 50.0, 0.1]
    y = 1000.0 + 30.0 * X[:, 0] - 0.4 * X[:, 1] + 200 * X[:, 2]
    numpy.savez(tmp_path / "d.npz", X=X, y=y)
    numpy.save(tmp_path / "X.npy", X)
    numpy.save(tmp_path / "y.npy", y)
    r = run("train", "--data", str(tmp_path / "d.npz"), "--loss", "squared_error", "--epochs", "40",
            "--device", "cpu", "--dtype", "float64", "--save", str(tmp_path / "r.safetensors"))
    assert r.exit_code == 0, r.output
    pair = f"{tmp_path / 'X.npy'},{tmp_path / 'y.npy'}"
    r = run("predict", str(tmp_path / "r.safetensors"), str(tmp_path / "X.npy"), "-o", str(tmp_path / "p.npy"),
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    pred = numpy.load(tmp_path / "p.npy")
    assert pred.shape == (300, 1) and numpy.corrcoef(pred[:, 0], y)[0, 1] > 0.99
    assert abs(pred.mean() - y.mean()) < 0.05 * y.std()             # targets in their own units
    r = run("evaluate", str(tmp_path / "r.safetensors"), pair, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["accuracy"] is None


def test_an_onnx_export_of_a_csv_model_takes_raw_features(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'gpunn[onnxruntime]')")
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'gpunn[onnx]')")
    X, y = _blobs(seed=4)
    _write_csv(tmp_path / "d.csv", X, y)
    r = run("train", "--data", str(tmp_path / "d.csv"), "--epochs", "20", "--device", "cpu", "--save",
            str(tmp_path / "m.onnx"))
    assert r.exit_code == 0, r.output
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (p,) = session.run(None, {"X": X.astype("float32")})
    meta = json.loads(session.get_modelmeta().custom_metadata_map["gpunn_data"])
    assert (numpy.asarray(meta["labels"])[p.argmax(axis=1)] == y).mean() > 0.9


@pytest.mark.parametrize("content,match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a UTF-8 CSV"),
    (b"a,b,label\n1,2,x\n3\n", "row 3: 1 values but the header names 3"),
    (b"a,b,label\n1,two,x\n3,4,y\n", "column 'b', row 2: 'two', not a number"),
    (b"a,b,label\n1,,x\n3,4,y\n", "column 'b', row 2: an empty cell"),
    (b"a,b,label\n1,nan,x\n3,4,y\n", "NaN or infinite"),
    (b"a,a,label\n1,2,x\n", "name every column once"),
    (b"a,b,label\n", "header row and at least one row"),
    (b"a,b,label\n1,2,x\n3,4,x\n5,6,x\n7,8,x\n1,2,x\n3,4,x\n5,6,x\n7,8,x\n", "one class"),
    (b"a,b,label\n1,2,x\n3,4,y\n", "at least 8"),
])
def test_bad_csv_files_are_one_line_and_exit_1(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    r = run("train", "--data", str(path), "--epochs", "1", "--device", "cpu")
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpunn: error: ") and match in lines[0], r.output
    assert "Traceback" not in r.output


def test_bad_files_and_names_never_show_a_traceback(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    numpy.savez(tmp_path / "noX.npz", features=numpy.ones((4, 2)))
    numpy.save(tmp_path / "obj.npy", numpy.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "m.npz").write_bytes(b"not a model")
    (tmp_path / "text.npy").write_bytes(b"a,b\n1,2\n")
    numpy.save(tmp_path / "y.npy", numpy.arange(10.0))
    cases = [
        (["train", "--data", str(tmp_path / "missing.csv")], 1, "no data file at"),
        (["train", "--data", str(tmp_path)], 1, "cannot tell the data format"),
        (["train", "--data", str(tmp_path / "junk.npz")], 1, "not a readable NumPy file"),
        (["train", "--data", str(tmp_path / "noX.npz")], 1, "has no array X"),
        (["train", "--data", f"{tmp_path / 'obj.npy'},{tmp_path / 'obj.npy'}"], 1, "holds Python objects"),
        (["train", "--data", f"{tmp_path / 'text.npy'},{tmp_path / 'y.npy'}"], 1,
         "is not a NumPy file: a .npy file starts with \\x93NUMPY"),
        (["train", "--data", f"{tmp_path / 'y.npy'},{tmp_path / 'text.npy'}"], 1, "text.npy is not a NumPy file"),
        (["train", "--data", "data.txt"], 1, "cannot tell the data format"),
        (["train", "--target", "label"], 2, "give --data too"),
        (["train", "--dataset", "moons", "--data", "x.csv"], 2, "give --dataset or --data, not both"),
        (["train", "--optimizer", "adam", "--momentum", "0.5"], 2, "--momentum is SGD's"),
        (["train", "--save", str(tmp_path / "m.pt")], 2, "cannot tell the model format"),
        (["evaluate", str(tmp_path / "m.npz"), str(tmp_path / "noX.npz")], 1, "not a gpunn model"),
        (["evaluate", str(tmp_path / "nothing.npz"), "x.csv"], 1, "no gpunn model file at"),
        (["predict", str(tmp_path / "m.npz"), "x.csv", "-o", str(tmp_path / "p.txt")], 2, "end the name with .npy"),
    ]
    for args, code, match in cases:
        r = run(*args)
        assert r.exit_code == code, (args, r.output)
        assert match in r.output and "Traceback" not in r.output, (args, r.output)


def test_evaluate_refuses_labels_the_model_never_saw(tmp_path):
    X, y = _blobs(seed=5)
    _write_csv(tmp_path / "d.csv", X, y)
    assert run("train", "--data", str(tmp_path / "d.csv"), "--epochs", "2", "--device", "cpu", "--save",
               str(tmp_path / "m.npz")).exit_code == 0
    y2 = y.copy()
    y2[3] = "rosa"
    _write_csv(tmp_path / "e.csv", X, y2)
    r = run("evaluate", str(tmp_path / "m.npz"), str(tmp_path / "e.csv"), "--device", "cpu")
    assert r.exit_code == 1 and "rosa not among the model's classes" in r.output, r.output


def test_a_model_from_the_python_api_evaluates_on_an_npz(tmp_path):
    X, y = gpunn.datasets.load_digits()
    net = gpunn.mlp([64, 16, 10], device="cpu", seed=0)
    net.fit(X, y, loss="cross_entropy", epochs=3)
    net.save(tmp_path / "m.npz")
    numpy.savez(tmp_path / "d.npz", X=X, y=y)
    r = run("evaluate", str(tmp_path / "m.npz"), str(tmp_path / "d.npz"), "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["accuracy"] == pytest.approx(net.evaluate(X, y).accuracy)
    r = run("predict", str(tmp_path / "m.npz"), str(tmp_path / "d.npz"), "-o", str(tmp_path / "p.npy"),
            "--device", "cpu")
    assert r.exit_code == 0 and (numpy.load(tmp_path / "p.npy") == host(net.predict(X)).argmax(1)).all()


def test_python_dash_m_gpunn_works():
    env = child_env(GPUNN_DEVICE="cpu")
    r = subprocess.run([sys.executable, "-m", "gpunn", "--help"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and "Usage: gpunn" in r.stdout and "evaluate" in r.stdout


def test_python_dash_w_error_does_not_break_a_cpu_only_script():
    code = "import gpunn; print(gpunn.mlp([2, 3, 2]).device)"
    env = {k: v for k, v in child_env().items() if k != "GPUNN_DEVICE"}
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("cpu", "cuda:0")


def test_a_squared_error_model_of_a_built_in_set_evaluates_on_integer_labels(tmp_path):
    r = run("train", "--loss", "squared_error", "--epochs", "3", "--device", "cpu", "--save", str(tmp_path / "m.npz"))
    assert r.exit_code == 0, r.output
    X, y = gpunn.datasets.load_digits()
    numpy.savez(tmp_path / "d.npz", X=X, y=y)
    r = run("evaluate", str(tmp_path / "m.npz"), str(tmp_path / "d.npz"), "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    net = gpunn.load(tmp_path / "m.npz", device="cpu")
    expected = net.evaluate(X, gpunn.datasets.one_hot(y, 10))
    got = json.loads(r.output)
    assert got["accuracy"] == pytest.approx(expected.accuracy) and got["loss"] == pytest.approx(expected.loss)
