"""Exports by extension: ONNX checked by onnxruntime, safetensors by the safetensors package's own loader."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy
import pytest

import gpunn
from gpunn import exports
from gpunn.errors import ModelFileError, SaveError
from helpers import host, rng

ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "softplus", {"name": "elu", "a": 0.5},
               {"name": "elu", "a": 2.0}, "identity"]


def _net(act, dtype="float32", out="softmax"):
    return gpunn.Sequential([gpunn.Dense(5, 7, act), gpunn.Dense(7, 4, act), gpunn.Dense(4, 3, out)],
                            device="cpu", dtype=dtype, seed=1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a if isinstance(a, str) else f"elu{a['a']}")
def test_onnxruntime_runs_the_export_as_predict_does(tmp_path, act, dtype):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'gpunn[onnx]')")
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'gpunn[onnx]')")
    net = _net(act, dtype)
    path = tmp_path / "m.onnx"
    net.save(path)
    X = (rng(0).normal(size=(33, 5)) * 20).astype(dtype)     # far into every activation's tails
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"X": X})
    assert got.dtype == numpy.dtype(dtype) and got.shape == (33, 3)
    numpy.testing.assert_allclose(got, host(net.predict(X)), rtol=0, atol=1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("out", ["sigmoid", "identity"])
def test_onnx_outputs_other_than_softmax_and_the_metadata(tmp_path, out):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'gpunn[onnx]')")
    onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'gpunn[onnx]')")
    net = _net("relu", out=out)
    net.save(tmp_path / "m.ONNX")                 # the extension's case does not matter
    X = rng(1).normal(size=(4, 5)).astype("float32")
    (got,) = ort.InferenceSession(str(tmp_path / "m.ONNX"), providers=["CPUExecutionProvider"]).run(None, {"X": X})
    numpy.testing.assert_allclose(got, host(net.predict(X)), atol=1e-5)
    model = onnx.load(str(tmp_path / "m.ONNX"))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["gpunn_config"]) == net.config() and model.producer_name == "gpunn"
    assert {n.op_type for n in model.graph.node} <= {"Gemm", "Relu", "Sigmoid", "Identity"}


def test_safetensors_is_read_by_its_own_loader_and_gpunn_load_restores_exactly(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors not installed (pip install 'gpunn[safetensors]')")
    g = rng(2)
    X, y = g.normal(size=(40, 5)), g.integers(0, 3, 40)
    for dtype in ("float32", "float64"):
        net = _net({"name": "elu", "a": 0.7}, dtype)
        net.fit(X, y, loss="cross_entropy", optimizer=gpunn.Adam(lr=0.01), epochs=2, batch_size=8)
        path = tmp_path / f"m{dtype}.safetensors"
        net.save(path)
        tensors = st.load_file(str(path))              # the package's own reader
        assert sorted(tensors) == ["layers.0.W", "layers.0.b", "layers.1.W", "layers.1.b", "layers.2.W",
                                   "layers.2.b"]
        for k, layer in enumerate(net.layers):
            numpy.testing.assert_array_equal(tensors[f"layers.{k}.W"], host(layer.W))
            numpy.testing.assert_array_equal(tensors[f"layers.{k}.b"], host(layer.b))
            assert tensors[f"layers.{k}.W"].dtype == numpy.dtype(dtype)
        back = gpunn.load(path, device="cpu")
        numpy.testing.assert_array_equal(host(back.flat_parameters()), host(net.flat_parameters()))
        assert back.config() == net.config() and back.loss.name == "cross_entropy"
        assert back.optimizer.config() == net.optimizer.config()
        numpy.testing.assert_array_equal(host(back.predict(X)), host(net.predict(X)))


def test_a_safetensors_file_from_elsewhere_or_changed_is_a_model_file_error(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors not installed (pip install 'gpunn[safetensors]')")
    foreign = tmp_path / "foreign.safetensors"
    st.save_file({"weight": numpy.ones((2, 2), "float32")}, str(foreign))
    with pytest.raises(ModelFileError, match="without gpunn's configuration"):
        gpunn.load(foreign)
    net = _net("relu")
    path = tmp_path / "m.safetensors"
    net.save(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40                                   # one bit of the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        gpunn.load(path)
    for junk in (b"", b"\xff" * 8 + b"{}", b"12345678{not json"):
        path.write_bytes(junk)
        with pytest.raises(ModelFileError):
            gpunn.load(path)


@pytest.mark.parametrize("name", ["m.bin", "m", "m.pt", "m.npz.tmp"])
def test_an_unknown_extension_is_a_save_error_and_nothing_is_written(tmp_path, name):
    with pytest.raises(SaveError, match=r"end the name with \.npz, \.onnx, \.safetensors"):
        _net("relu").save(tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_onnx_is_not_read_back(tmp_path):
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'gpunn[onnx]')")
    _net("relu").save(tmp_path / "m.onnx")
    with pytest.raises(ModelFileError, match="ONNX export"):
        gpunn.load(tmp_path / "m.onnx")


def test_model_format_is_one_rule():
    assert [exports.model_format(p) for p in ("a.npz", "b.ONNX", "c.SafeTensors")] == ["npz", "onnx", "safetensors"]


def test_a_network_on_a_gpu_exports_from_host_copies(fake_gpu_unfused, tmp_path):
    """gpunn's CUDA path (tests/fakecupy.py): the exporters copy the weights to the host first."""
    pytest.importorskip("safetensors", reason="safetensors not installed (pip install 'gpunn[safetensors]')")
    net = _net("tanh").to("cuda:0")
    assert isinstance(net.layers[0].W, fake_gpu_unfused.ndarray)
    net.save(tmp_path / "m.safetensors")
    back = gpunn.load(tmp_path / "m.safetensors", device="cpu")
    numpy.testing.assert_array_equal(host(back.flat_parameters()), host(net.flat_parameters()))
    if importlib.util.find_spec("onnx") is not None:
        net.save(tmp_path / "m.onnx")
        assert (tmp_path / "m.onnx").stat().st_size > 0


def test_mutated_safetensors_files_load_the_same_weights_or_are_refused(tmp_path):
    """Byte mutations anywhere in the file: the same network, or a ModelFileError; nothing else escapes."""
    pytest.importorskip("safetensors", reason="safetensors not installed (pip install 'gpunn[safetensors]')")
    net = _net("relu")
    good = tmp_path / "m.safetensors"
    net.save(good)
    data, g = good.read_bytes(), rng(7)
    bad = tmp_path / "bad.safetensors"
    refused = 0
    for _ in range(300):
        mutated = bytearray(data)
        for i in g.integers(0, len(data), g.integers(1, 4)):
            mutated[i] = int(g.integers(0, 256))
        if g.random() < 0.2:
            mutated = mutated[:int(g.integers(0, len(data)))]
        bad.write_bytes(bytes(mutated))
        try:
            back = gpunn.load(bad, device="cpu")
        except ModelFileError:
            refused += 1
            continue
        numpy.testing.assert_array_equal(host(back.flat_parameters()), host(net.flat_parameters()))
    assert refused > 200
