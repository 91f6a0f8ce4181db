"""Model files and save paths as an attacker would craft them: every bad file is a ModelFileError found
quickly with bounded memory; every bad save target a SaveError that leaves the target as it was."""
from __future__ import annotations

import io as _io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile

import numpy
import pytest

import gpunn
from gpunn import io as gio
from gpunn.errors import ModelFileError, SaveError
from helpers import child_env, host

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed (pip install -e \".[test]\")")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def make():
    return gpunn.mlp([3, 5, 2], activation="tanh", device="cpu", seed=3)


def _npy(a: numpy.ndarray) -> bytes:
    buf = _io.BytesIO()
    numpy.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _archive(path, header: dict | bytes, params: numpy.ndarray | bytes, compress=zipfile.ZIP_STORED):
    """A model-shaped archive with exactly these members (the header's checksum is made valid)."""
    if isinstance(header, dict):
        if isinstance(params, numpy.ndarray):
            header = {**header, "sha256": gio.digest(header, params)}
        header = json.dumps(header).encode()
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("header.npy", _npy(numpy.frombuffer(header, dtype=numpy.uint8)))
        z.writestr("params.npy", params if isinstance(params, bytes) else _npy(params))


def _header(layers, dtype="float32"):
    return {"format": "gpunn-model", "format_version": 1, "gpunn_version": gpunn.__version__, "dtype": dtype,
            "layers": layers, "n_parameters": 0}


def _dense(n_in, n_out, activation="tanh"):
    return {"type": "Dense", "n_in": n_in, "n_out": n_out, "activation": {"name": activation}, "init": "xavier"}


def _refused(path, match=None):
    """load(path) raises ModelFileError, within 2 s and 8 MiB of traced memory."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ModelFileError, match=match) as exc:
            gpunn.load(path, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0 and peak < 8 << 20, (time.perf_counter() - t0, peak)
    return exc.value


def test_a_header_claiming_a_huge_layer_is_refused_before_allocating(tmp_path):
    p = tmp_path / "m.npz"
    _archive(p, _header([_dense(20000, 20000)]), numpy.zeros(12, numpy.float32))
    _refused(p, "need 400020000 parameters but the file holds 12")


def test_an_npy_header_claiming_1e12_elements(tmp_path):
    p = tmp_path / "m.npz"
    fake = _npy(numpy.zeros(3, numpy.float32)).replace(b"(3,)", b"(1000000000000,)")
    _archive(p, b"{}", fake)
    _refused(p, "claims 1000000000000 elements")


def test_a_deflate_bomb_is_never_inflated(tmp_path):
    p = tmp_path / "m.npz"
    _archive(p, _header([_dense(3, 2)]), numpy.zeros(40 << 20, numpy.uint8).view(numpy.float32),
             compress=zipfile.ZIP_DEFLATED)
    assert p.stat().st_size < 1 << 20
    _refused(p, "compressed")


def test_a_deeply_nested_json_header(tmp_path):
    p = tmp_path / "m.npz"
    _archive(p, b"[" * 200_000 + b"]" * 200_000, numpy.zeros(3, numpy.float32))
    _refused(p, "unreadable header")


@pytest.mark.parametrize("params", [numpy.zeros(3, dtype=[("a", "f4"), ("b", "i4")]), numpy.zeros((2, 3), "f4"),
                                    numpy.zeros(3, "c8"), numpy.zeros(3, "i4"), numpy.zeros(3, "f4").astype(">f4")],
                         ids=["structured", "2-D", "complex", "integer", "big-endian-but-valid"])
def test_parameter_arrays_of_the_wrong_kind(tmp_path, params):
    p = tmp_path / "m.npz"
    _archive(p, _header([_dense(1, 1)]), params.tobytes() and _npy(params))
    if params.dtype == numpy.dtype(">f4"):
        _refused(p, "header says|checksum|parameters")
    else:
        _refused(p, "flat array of plain")


@pytest.mark.parametrize("layer,match", [
    ({**_dense(3, 2), "activation": {"name": "leaky_relu", "alpha": "abc"}}, "invalid layer description"),
    ({**_dense(3, 2), "activation": {"name": "elu", "a": -1}}, "invalid layer description"),
    ({**_dense(3, 2), "activation": {"name": "nope"}}, "invalid layer description"),
    ({**_dense(3, 2), "type": "Conv2D"}, "Dense layers only"),
    ({**_dense(3, 2), "n_in": True}, "positive sizes"),
    ({**_dense(3, 2), "n_in": -3}, "positive sizes"),
    ({**_dense(3, 2), "n_in": "abc"}, "positive sizes"),
    ("Dense", "positive sizes"),
])
def test_bad_layer_descriptions_with_a_valid_checksum(tmp_path, layer, match):
    p = tmp_path / "m.npz"
    _archive(p, _header([layer]), numpy.zeros(8, numpy.float32))
    _refused(p, match)


def test_nan_weights_with_a_valid_checksum(tmp_path):
    p = tmp_path / "m.npz"
    params = numpy.zeros(8, numpy.float32)
    params[3] = numpy.nan
    _archive(p, _header([_dense(3, 2)]), params)
    _refused(p, "NaN or infinite")


@pytest.mark.parametrize("flip", ["encrypted", "method"])
def test_unusual_zip_flags(tmp_path, flip):
    p = tmp_path / "m.npz"
    make().save(p)
    data = bytearray(p.read_bytes())
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):   # local and central headers
        at = data.find(sig)
        while at >= 0:
            if flip == "encrypted":
                data[at + flag_at] |= 0x1
            else:
                data[at + method_at:at + method_at + 2] = (99).to_bytes(2, "little")
            at = data.find(sig, at + 4)
    p.write_bytes(bytes(data))
    _refused(p)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    p = tmp_path / "fifo.npz"
    os.mkfifo(p)
    result = []
    worker = threading.Thread(target=lambda: result.append(_load_error(p)), daemon=True)
    worker.start()
    worker.join(5)
    assert result and "special file (a FIFO)" in result[0]


def _load_error(p):
    try:
        gpunn.load(p)
    except ModelFileError as exc:
        return str(exc)
    return "loaded"


def test_permission_denied_is_reported_as_such(tmp_path, monkeypatch):
    p = tmp_path / "m.npz"
    make().save(p)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "open", denied)      # root ignores permission bits: simulate what the OS says
    _refused(p, "permission denied")


@pytest.mark.parametrize("path,match", [(b"\xff\xfe", "no gpunn model file"), ("bad\0name", "NUL"),
                                        (3, "must be a str"), ("", "empty")])
def test_bad_load_paths(path, match):
    with pytest.raises(ModelFileError, match=match):
        gpunn.load(path)


def test_a_folder_is_not_a_model(tmp_path):
    _refused(tmp_path, "folder")


# -- fuzz: any mutation of a real file loads the same weights or is a ModelFileError ---------------------
_ORIGINAL: dict[str, bytes] = {}


def _original_bytes(tmp_path_factory) -> tuple[bytes, numpy.ndarray]:
    if not _ORIGINAL:
        p = tmp_path_factory.mktemp("fuzz") / "m.npz"
        net = make()
        net.save(p)
        _ORIGINAL["bytes"] = p.read_bytes()
        _ORIGINAL["params"] = host(net.flat_parameters()).tobytes()
    return _ORIGINAL["bytes"], numpy.frombuffer(_ORIGINAL["params"], numpy.float32)


mutations = st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "delete"]),
                               st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations)
def test_fuzzed_files_load_identically_or_are_refused(tmp_path_factory, muts):
    data, params = _original_bytes(tmp_path_factory)
    data = bytearray(data)
    for kind, where, value in muts:
        i = int(where * len(data))
        if kind == "flip":
            data[i] ^= 1 << (value % 8)
        elif kind == "set":
            data[i] = value
        elif kind == "cut":
            del data[i:]
        elif kind == "insert":
            data[i:i] = bytes([value]) * (1 + value % 7)
        elif kind == "delete":
            del data[i:i + 1 + value % 7]
        if not data:
            data = bytearray(b"x")
    p = tmp_path_factory.mktemp("mutant") / "m.npz"
    p.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        try:
            net = gpunn.load(p, device="cpu")
        except ModelFileError:
            net = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    if net is not None:
        numpy.testing.assert_array_equal(host(net.flat_parameters()), params)


# -- saving ------------------------------------------------------------------------------------------------
def test_save_writes_through_a_symbolic_link(tmp_path):
    real = tmp_path / "real.npz"
    make().save(real)
    link = tmp_path / "link.npz"
    link.symlink_to(real)
    net = gpunn.mlp([3, 5, 2], activation="tanh", device="cpu", seed=99)
    net.save(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    numpy.testing.assert_array_equal(host(gpunn.load(real, device="cpu").flat_parameters()),
                                  host(net.flat_parameters()))


def test_save_never_replaces_a_fifo(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SaveError, match="special file"):
        make().save(fifo)
    with pytest.raises(SaveError, match="special file"):
        make().save(_link_to(tmp_path, fifo))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo", "link"]


def _link_to(folder, target):
    link = folder / "link"
    link.symlink_to(target)
    return link


def test_save_refuses_folders_and_read_only_files(tmp_path):
    with pytest.raises(SaveError, match="folder"):
        make().save(tmp_path)
    p = tmp_path / "m.npz"
    p.write_bytes(b"keep me")
    p.chmod(0o444)
    with pytest.raises(SaveError, match="read-only"):
        make().save(p)
    assert p.read_bytes() == b"keep me"


def test_new_files_follow_the_umask_and_overwrites_keep_the_mode(tmp_path):
    old = os.umask(0o027)
    try:
        make().save(tmp_path / "new.npz")
        gio.write_text_atomic(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.npz").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "report.json").st_mode) == 0o640
    existing = tmp_path / "existing.npz"
    existing.write_bytes(b"old")
    existing.chmod(0o604)
    make().save(existing)
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o604


@pytest.mark.parametrize("path,match", [("bad\0name.npz", "NUL"), (3.5, "must be a str"), ("", "empty")])
def test_bad_save_paths(path, match):
    with pytest.raises(SaveError, match=match):
        make().save(path)


def test_bytes_paths_work(tmp_path):
    p = os.fsencode(tmp_path / "b.npz")
    make().save(p)
    assert gpunn.load(p, device="cpu").n_parameters == make().n_parameters


SAVER = """
import sys, gpunn
net = gpunn.mlp([30, 400, 20], device="cpu", seed=int(sys.argv[2]))
print("ready", flush=True)
while True:
    net.save(sys.argv[1])
"""


def test_saves_killed_at_random_moments_leave_a_loadable_file_and_no_temporaries(tmp_path):
    """kill -9 a process that saves in a loop, several times: the file always loads, and the next save
    removes every temporary the killed ones left."""
    target = tmp_path / "m.npz"
    rng = numpy.random.default_rng(0)
    for k in range(5):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target), str(k)], stdout=subprocess.PIPE,
                                env=child_env())
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(float(rng.uniform(0.05, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            assert gpunn.load(target, device="cpu").n_parameters == 30 * 400 + 400 + 400 * 20 + 20
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".m.npz.gpunn-{int(dead.stdout)}-0000.tmp").write_bytes(b"half")   # surely stale: pid is gone
    left = {e for e in os.listdir(tmp_path) if e.endswith(".tmp")}
    make().save(tmp_path / "other.npz")              # another target's save leaves m.npz's temporaries alone
    assert {e for e in os.listdir(tmp_path) if e.endswith(".tmp")} == left
    gpunn.mlp([30, 400, 20], device="cpu", seed=0).save(target)
    assert sorted(os.listdir(tmp_path)) == ["m.npz", "other.npz"]
