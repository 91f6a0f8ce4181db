"""Embedded digits, synthetic sets, helpers and the IDX reader."""
from __future__ import annotations

import gzip
import os
import struct
import tracemalloc
import zlib

import numpy
import pytest

from gpunn import datasets
from gpunn.errors import ConfigError, DataError


def test_digits_shape_and_content():
    X, y = datasets.load_digits()
    assert X.shape == (1797, 64) and y.shape == (1797,)
    assert X.min() == 0.0 and X.max() == 1.0 and set(numpy.unique(y)) == set(range(10))
    raw, _ = datasets.load_digits(scaled=False)
    assert raw.max() == 16 and numpy.all(raw == numpy.round(raw))
    assert numpy.bincount(y).min() >= 170


def test_synthetic_sets_are_seeded():
    for fn in (datasets.two_moons, datasets.two_spirals):
        a, ya = fn(100, seed=3)
        b, yb = fn(100, seed=3)
        c, _ = fn(100, seed=4)
        assert a.shape == (100, 2) and numpy.array_equal(a, b) and numpy.array_equal(ya, yb)
        assert not numpy.array_equal(a, c) and set(ya) == {0, 1}
    X, Y = datasets.xor()
    assert X.shape == (4, 2) and Y.ravel().tolist() == [0, 1, 1, 0]


def test_split_standardize_one_hot():
    X, y = datasets.load_digits()
    Xtr, Xte, ytr, yte = datasets.train_test_split(X, y, test_size=0.25, seed=1)
    assert len(Xte) == 449 and len(Xtr) == 1348 and len(ytr) == 1348
    again = datasets.train_test_split(X, y, test_size=0.25, seed=1)
    assert numpy.array_equal(again[1], Xte)
    s, t = datasets.standardize(Xtr, Xte)
    used = Xtr.std(axis=0) > 1e-8
    numpy.testing.assert_allclose(s.mean(axis=0), 0, atol=1e-12)
    numpy.testing.assert_allclose(s.std(axis=0)[used], 1, rtol=1e-12)
    assert numpy.all(numpy.isfinite(t))
    oh = datasets.one_hot(numpy.array([2, 0, 1]))
    assert oh.tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    with pytest.raises(DataError):
        datasets.one_hot(numpy.array([0.5]))
    with pytest.raises(ConfigError):
        datasets.train_test_split(X, y, test_size=0)
    with pytest.raises(ConfigError, match="Did you mean 'digits'"):
        datasets.load("digit")


def _idx(arr: numpy.ndarray, code: int) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_read_idx_raw_and_gz(tmp_path):
    images = numpy.arange(2 * 3 * 4, dtype=numpy.uint8).reshape(2, 3, 4)
    p = tmp_path / "images-idx3-ubyte"
    p.write_bytes(_idx(images, 0x08))
    assert numpy.array_equal(datasets.read_idx(p), images)
    g = tmp_path / "labels-idx1-ubyte.gz"
    labels = numpy.array([7, 2, 1], dtype=numpy.uint8)
    g.write_bytes(gzip.compress(_idx(labels, 0x08)))
    assert datasets.read_idx(g).tolist() == [7, 2, 1]
    f = tmp_path / "floats"
    vals = numpy.array([[1.5, -2.0]], dtype=">f4")
    f.write_bytes(_idx(vals, 0x0D))
    numpy.testing.assert_array_equal(datasets.read_idx(f), [[1.5, -2.0]])


def test_read_idx_rejects_bad_files(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(DataError, match="magic"):
        datasets.read_idx(p)
    arr = numpy.arange(10, dtype=numpy.uint8)
    p.write_bytes(_idx(arr, 0x08)[:-3])
    with pytest.raises(DataError, match="truncated"):
        datasets.read_idx(p)
    p.write_bytes(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(DataError, match="element type"):
        datasets.read_idx(p)


def test_read_idx_hostile_files(tmp_path):
    p = tmp_path / "f"
    # dimensions whose product is 2**64, which wraps to 0 in int64: must not pass as an empty body
    p.write_bytes(bytes([0, 0, 0x08, 4]) + struct.pack(">4I", 2**16, 2**16, 2**16, 2**16))
    with pytest.raises(DataError, match="truncated or padded"):
        datasets.read_idx(p)
    good = _idx(numpy.arange(100, dtype=numpy.uint8), 0x08)
    for bad in (gzip.compress(good)[:-9], gzip.compress(good)[:15], b"\x1f\x8b" + b"\x00" * 30):
        p.write_bytes(bad)                                        # truncated or corrupt gzip streams
        with pytest.raises(DataError, match="truncated|corrupt"):
            datasets.read_idx(p)
    # a small gzip that inflates to 256 MiB behind a header announcing 10 bytes: never inflated in full

    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = comp.compress(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10))
    zeros = bytes(1 << 20)
    for _ in range(256):
        bomb += comp.compress(zeros)
    p.write_bytes(bomb + comp.flush())
    assert p.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="more follow"):
            datasets.read_idx(p)
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DataError, match="special file"):
        datasets.read_idx(tmp_path / "fifo")
    with pytest.raises(DataError, match="no IDX file"):
        datasets.read_idx(tmp_path / "missing")
