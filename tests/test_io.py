"""Save and load: round trips on every backend, atomic writes, and a specific error per bad file."""
from __future__ import annotations

import io as _io
import json
import os
import zipfile

import numpy
import pytest

import gpunn
from gpunn import io as gio
from gpunn.errors import ModelFileError, SaveError
from helpers import host, rng

DTYPE_TOL = {"float32": 1e-5, "float64": 1e-12}

X = rng(0).normal(size=(7, 3))


def make(device="cpu", dtype="float32"):
    return gpunn.Sequential([gpunn.Dense(3, 5, gpunn.activations.LeakyReLU(alpha=0.1)),
                             gpunn.Dense(5, 4, {"name": "elu", "a": 0.5}), gpunn.Dense(4, 2, "softmax")],
                            device=device, dtype=dtype, seed=3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_every_backend(device, tmp_path, dtype):
    net = make(device, dtype)
    net.fit(X, [0, 1, 0, 1, 1, 0, 1], loss="cross_entropy", epochs=2, batch_size=3)
    p = tmp_path / "m.npz"
    net.save(p)
    for target in ("cpu", device):
        back = gpunn.load(p, device=target)
        assert back.dtype == net.dtype and back.device == target
        assert [layer.config() for layer in back.layers] == [layer.config() for layer in net.layers]
        if target == device:
            numpy.testing.assert_array_equal(host(back.predict(X)), host(net.predict(X)))
        else:   # another backend: the same weights, its own rounding (a fused softmax sums in another order)
            numpy.testing.assert_allclose(host(back.predict(X)), host(net.predict(X)), rtol=DTYPE_TOL[dtype])
            numpy.testing.assert_array_equal(host(back.flat_parameters()), host(net.flat_parameters()))


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(SaveError, match="does not exist"):
        make().save(tmp_path / "no" / "m.npz")


def test_save_into_read_only_folder(tmp_path, monkeypatch):
    # Root ignores permission bits, so simulate what the OS says for a read-only folder.
    real_open = os.open

    def denied(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(SaveError, match="writable") as exc:
        make().save(tmp_path / "m.npz")
    assert isinstance(exc.value, OSError)


def test_failure_midway_leaves_earlier_file_intact(tmp_path, monkeypatch):
    p = tmp_path / "m.npz"
    first = make()
    first.save(p)
    before = p.read_bytes()

    def half_then_fail(fh, *arrays):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gio, "_write_npz", half_then_fail)
    other = make()
    other.layers[0].W = numpy.zeros((3, 5))
    with pytest.raises(SaveError, match="unchanged"):
        other.save(p)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]          # no temporary file left behind
    monkeypatch.undo()
    numpy.testing.assert_array_equal(host(gpunn.load(p, device="cpu").predict(X)), host(first.predict(X)))


def test_interrupt_midway_leaves_no_temp(tmp_path, monkeypatch):
    def interrupted(fh, *arrays):
        raise KeyboardInterrupt
    monkeypatch.setattr(gio, "_write_npz", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make().save(tmp_path / "m.npz")
    assert os.listdir(tmp_path) == []


def _saved(tmp_path):
    p = tmp_path / "m.npz"
    make().save(p)
    with numpy.load(p) as d:
        return p, json.loads(bytes(d["header"]).decode()), d["params"].copy()


def _write(path, header, params, **extra):
    head = numpy.frombuffer(json.dumps(header).encode(), dtype=numpy.uint8)
    numpy.savez(path, header=head, params=params, **extra)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no gpunn model file"):
        gpunn.load(tmp_path / "nope.npz")


def test_truncated_file(tmp_path):
    p, _, _ = _saved(tmp_path)
    data = p.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        p.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="truncated|corrupt|not a gpunn"):
            gpunn.load(p)


def test_tampered_weights(tmp_path):
    p, header, params = _saved(tmp_path)
    params[0] += 1.0
    _write(p, header, params)
    with pytest.raises(ModelFileError, match="checksum"):
        gpunn.load(p)


def test_tampered_header(tmp_path):
    p, header, params = _saved(tmp_path)
    header["layers"][0]["activation"] = {"name": "relu"}
    _write(p, header, params)
    with pytest.raises(ModelFileError, match="checksum"):
        gpunn.load(p)


def test_wrong_version(tmp_path):
    p, header, params = _saved(tmp_path)
    header["format_version"] = 99
    header["sha256"] = gio.digest(header, params)
    _write(p, header, params)
    with pytest.raises(ModelFileError, match="version 99"):
        gpunn.load(p)


def test_foreign_files(tmp_path):
    p = tmp_path / "text.npz"
    p.write_text("hello, not a model")
    with pytest.raises(ModelFileError, match="not an .npz"):
        gpunn.load(p)
    q = tmp_path / "other.npz"
    numpy.savez(q, a=numpy.zeros(3))
    with pytest.raises(ModelFileError, match=r"expected \['header.npy', 'params.npy'\]"):
        gpunn.load(q)
    r = tmp_path / "fmt.npz"
    _write(r, {"format": "keras"}, numpy.zeros(3))
    with pytest.raises(ModelFileError, match="not a gpunn model"):
        gpunn.load(r)
    s = tmp_path / "bad.npz"
    numpy.savez(s, header=numpy.frombuffer(b"\xff\xfe{", dtype=numpy.uint8), params=numpy.zeros(3))
    with pytest.raises(ModelFileError, match="unreadable header"):
        gpunn.load(s)


class Exploit:
    """Unpickling this would create a file: proof that something was executed."""

    marker = None

    def __reduce__(self):
        return (open, (str(Exploit.marker), "w"))


def test_pickle_bearing_file_is_refused_and_never_unpickled(tmp_path):
    p = tmp_path / "evil.npz"
    Exploit.marker = tmp_path / "PWNED"
    payload = numpy.empty(1, dtype=object)
    payload[0] = Exploit()
    numpy.savez(p, header=payload, params=payload)
    with pytest.raises(ModelFileError, match="pickle"):
        gpunn.load(p)
    assert not Exploit.marker.exists()


def test_pickle_inside_a_valid_looking_archive(tmp_path):
    p, header, params = _saved(tmp_path)
    buf = _io.BytesIO()
    numpy.save(buf, numpy.array([Exploit()], dtype=object), allow_pickle=True)
    Exploit.marker = tmp_path / "PWNED2"
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("extra.npy", buf.getvalue())
    with pytest.raises(ModelFileError, match="not a gpunn model"):
        gpunn.load(p, device="cpu")  # an archive with more than gpunn writes is refused, nothing read
    assert not Exploit.marker.exists()
