"""The fused kernels as FusedKernels launches them on a device: the card run's first tests.

Parametrised over the backends present: on a card (``cupy``) each case is launched ~1000 times; on the
fake GPU (``fakecupy``: the host emulation) a few times, which checks the same launches and arguments;
numpy has no kernels and skips. Every result is compared with a NumPy/CuPy float64 formula written here.
"""
from __future__ import annotations

import numpy
import pytest

import fakecupy
from gpunn import kernels
from helpers import host, rng

MULTI_CHUNK = [(4099, 100), (2048, 300), (65, 33), (3, 1000)]
DTYPES = ["float32", "float64"]


def _kernels(device) -> kernels.FusedKernels:
    if not device.is_cuda:
        pytest.skip("fused kernels run on CUDA devices only")
    return kernels.FusedKernels(device)


def _launches(device) -> int:
    return 3 if fakecupy.is_fake(device) else 1000


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MULTI_CHUNK, ids=str)
def test_column_sum_over_several_chunks_is_bitwise_repeatable(device, dtype, shape):
    """Tile boundaries inside a 32-byte sector (cols % 8 != 0) and several row chunks per tile, launched
    many times on one stream: every result bitwise equal to the first and to a float64 sum within rounding,
    every ticket counter back at zero."""
    fk = _kernels(device)
    xp = device.xp
    rows, cols = shape
    _, chunks, _ = kernels.colsum_plan(rows, cols, fk.colsum_blocks)
    assert (chunks > 1) == (rows > 64)
    d = device.asarray(rng(11).normal(size=shape), dtype=dtype)
    n = _launches(device)
    outs = xp.full((n, cols), numpy.nan, dtype)
    for k in range(n):
        assert fk.column_sum(d, outs[k])
    got = host(outs)
    assert (got == got[0]).all(), f"{int((got != got[0]).any(axis=1).sum())} of {n} launches differ"
    ref = host(xp.sum(d.astype(numpy.float64), axis=0))
    eps = numpy.finfo(dtype).eps
    bound = 4 * eps * numpy.sqrt(rows) * float(numpy.abs(host(d)).sum(axis=0).max())
    numpy.testing.assert_allclose(got[0], ref, rtol=0, atol=bound)
    assert kernels.stale_counters(device) == 0


def test_each_stream_has_its_own_column_sum_counters(device):
    """Two streams summing matrices of one shape at once never share a ticket counter."""
    fk = _kernels(device)
    xp = device.xp
    ds = [device.asarray(rng(12 + i).normal(size=(2048, 300)), dtype="float32") for i in range(2)]
    streams = [xp.cuda.Stream(non_blocking=True) for _ in range(2)]
    device.synchronize()                  # the inputs were written on the null stream, which these skip
    n = _launches(device)
    outs = [xp.empty((n, 300), "float32") for _ in range(2)]
    for k in range(n):
        for s, d, out in zip(streams, ds, outs):
            with s:
                fk.column_sum(d, out[k])
    device.synchronize()
    assert len({id(v[3]) for v in fk._colsum.values()}) == 2            # one counter buffer per stream
    for d, out in zip(ds, outs):
        got = host(out)
        assert (got == got[0]).all()
        numpy.testing.assert_allclose(got[0], host(d).astype(numpy.float64).sum(axis=0), rtol=0, atol=1e-3)
    assert kernels.stale_counters(device) == 0


def test_networks_on_one_stream_share_the_column_sum_scratch(device):
    """Scratch grows with shapes × streams, not with the number of networks (each has its own FusedKernels)."""
    a, b = _kernels(device), kernels.FusedKernels(device)
    d = device.asarray(rng(14).normal(size=(300, 70)), dtype="float32")
    outs = device.xp.empty((2, 70), "float32")
    assert a.column_sum(d, outs[0]) and b.column_sum(d, outs[1])
    (ha,), (hb,) = a._colsum.values(), b._colsum.values()
    assert ha[2] is hb[2] and ha[3] is hb[3]
    assert (host(outs[0]) == host(outs[1])).all() and kernels.stale_counters(device) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(256, 10), (33, 5), (7, 100), (5, 1000)])
def test_softmax_and_cross_entropy_a_warp_per_row(device, dtype, rows, cols):
    """softmax (z += b, y, log-partition), δ = (y − t)/B and the mean loss, repeated: bitwise the same
    every time, and equal to the formulas in float64."""
    fk = _kernels(device)
    xp = device.xp
    g = rng(13)
    z0 = g.normal(size=(rows, cols)) * 6
    b, t = g.normal(size=cols), numpy.eye(cols)[g.integers(0, cols, rows)]
    zr = z0 + b
    e = numpy.exp(zr - zr.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    loss = -numpy.mean(numpy.log(p[t.astype(bool)]))
    dev = {k: device.asarray(v, dtype=dtype) for k, v in (("b", b), ("t", t))}
    results = []
    for _ in range(3 if fakecupy.is_fake(device) else 100):
        z = device.asarray(z0, dtype=dtype)
        y, col = xp.empty_like(z), xp.empty((2, rows), dtype)
        delta, out = xp.empty_like(z), xp.empty(1, dtype)
        assert fk.softmax(z, dev["b"], y, col) and fk.cross_entropy(z, y, col, dev["t"], delta, out)
        results.append(numpy.concatenate([host(a).ravel() for a in (z, y, col, delta, out)]))
    assert all((r == results[0]).all() for r in results)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == "float32" else dict(rtol=1e-13, atol=1e-15)
    numpy.testing.assert_allclose(host(y), p, **tol)
    numpy.testing.assert_allclose(host(delta), (p - t) / rows, **tol)
    numpy.testing.assert_allclose(host(out)[0], loss, **tol)


def test_the_softmax_launchers_refuse_row_statistics_of_another_shape(device):
    """The softmax's log-partitions are the first row of a (2, rows) array (col[r], col[rows + r]): a col of
    the old (rows, 2) layout, of the same size, or one of other rows, is refused before launching (the
    caller's xp code then reads rowstats[0], which such a col would not hold)."""
    fk = _kernels(device)
    xp = device.xp
    rows, cols = 37, 5
    z = device.asarray(rng(14).normal(size=(rows, cols)), dtype="float32")
    b, t = xp.zeros(cols, "float32"), device.asarray(numpy.eye(cols)[rng(15).integers(0, cols, rows)], dtype="float32")
    y, delta, out = xp.empty_like(z), xp.empty_like(z), xp.empty(1, "float32")
    for shape in ((rows, 2), (2, rows + 1)):
        col = xp.full(shape, numpy.nan, "float32")
        assert not fk.softmax(z, b, y, col) and not fk.cross_entropy(z, y, col, t, delta, out)
        assert numpy.isnan(host(col)).all()
    col = xp.empty((2, rows), "float32")
    assert fk.softmax(z, b, y, col) and fk.cross_entropy(z, y, col, t, delta, out)


def test_a_bias_add_past_two_to_the_31_takes_the_xp_code(device):
    """bias_act_fwd indexes with 32 bits: the launcher refuses larger buffers (the caller runs xp code)."""
    fk = _kernels(device)
    assert fk._size((2**16, 2**15 - 1))[4] == 2**31 - 2**16
    assert fk._size((2**16, 2**15))[4] is None


class Huge:
    """What a launcher reads of a C-contiguous float32 buffer of ``shape`` before launching, without its memory."""

    def __init__(self, *shape):
        self.shape, self.dtype = shape, numpy.dtype("float32")
        self.flags = type("Flags", (), {"c_contiguous": True})()


def test_buffers_past_what_a_kernels_int_counts_take_64_bit_counts_or_the_xp_code(device):
    """A flat parameter buffer of 2^31 values or more (a model of that many weights fits on an H200) is one
    sgd_update launch with its int64 count; a batch whose rows or elements pass the int arguments of the
    softmax, cross-entropy and column-sum kernels takes the xp code. numpy.int32 of such a count raised
    OverflowError out of the step."""
    fk = _kernels(device)
    grid, n, cols, rows, n32 = fk._size((1, 2**31))
    assert n == 2**31 and n.dtype == numpy.int64 and grid == (1 << 20,) and cols is None and n32 is None
    z, rowstats, out = Huge(2**30, 2), Huge(2, 2**30), Huge(1)
    assert not fk.softmax(z, Huge(2), z, rowstats) and not fk.cross_entropy(z, z, rowstats, z, z, out)
    assert not fk.column_sum(Huge(2**30 + 1, 2), Huge(2)) and not fk.column_sum(Huge(2, 2**30 + 1), Huge(2**30 + 1))


def test_the_column_sum_kernel_refuses_arrays_that_are_not_c_contiguous(device):
    """The column-sum kernel indexes rows × cols from the data pointer: a strided δ or a strided output (either
    alone) takes the xp code (False), a C-contiguous pair the kernel."""
    fk = _kernels(device)
    xp = device.xp
    d = device.asarray(rng(3).normal(size=(40, 12)), dtype="float32")
    out = xp.zeros(12, "float32")
    wide = xp.zeros(24, "float32")
    assert not fk.column_sum(d[:, ::2], out[:6])            # δ strided
    assert not fk.column_sum(d, wide[::2])                  # the output strided
    assert fk.column_sum(d, out)


def test_the_agreement_check_takes_the_multi_chunk_path():
    """gpunn check (and so scripts/gpu-check.sh) trains at a batch that the fused column sum cuts into
    several row chunks for every layer, on an H100/H200's grid as on the fake GPU's."""
    from gpunn import check
    for _, width, _ in check.ARCH:
        assert kernels.colsum_plan(check.BATCH, width, kernels.COLSUM_BLOCKS)[1] > 1, width
    assert any(width % 8 for _, width, _ in check.ARCH)       # a tile boundary inside a 32-byte sector
