"""Helpers shared by the tests (fixtures live in conftest.py): host copies, seeded generators,
finite-difference gradients, and a stand-in for a CuPy array."""
from __future__ import annotations

import os
import sys

import numpy

import gpunn


def host(a):
    """A NumPy copy of ``a``: never a view of a CPU network's buffers, which later steps overwrite."""
    return numpy.array(gpunn.to_host(a), copy=True)


def pythonpath(*first) -> str:
    """A PYTHONPATH under which a child Python imports the gpunn under test (installed, or this source tree),
    with ``first`` before it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(gpunn.__file__)))
    return os.pathsep.join(p for p in [*map(str, first), root, os.environ.get("PYTHONPATH", "")] if p)


def child_env(*first, **variables) -> dict:
    """This process's environment for a child Python that imports the gpunn under test (see :func:`pythonpath`)."""
    return {**os.environ, **variables, "PYTHONPATH": pythonpath(*first)}


def rng(seed: int = 0) -> numpy.random.Generator:
    return numpy.random.Generator(numpy.random.PCG64(seed))


def gradients(net, X, Y, loss: str, h: float = 1e-6):
    """(analytic, numeric) gradients of the mean loss over the flat parameters, by central differences."""
    net.forward(X)
    net.backward(Y, loss)
    analytic = host(net.flat_gradients())
    p = net.flat_parameters()
    p0 = host(p).copy()
    numeric = numpy.empty_like(p0)
    for i in range(p0.size):
        vals = []
        for s in (h, -h):
            q = p0.copy()
            q[i] += s
            p[...] = net.device.asarray(q)
            net.forward(X)
            vals.append(net.backward(Y, loss))
        numeric[i] = (vals[0] - vals[1]) / (2 * h)
    p[...] = net.device.asarray(p0)
    return analytic, numeric


class FakeCupyArray:
    """Looks like a CuPy array to the module-name check, without CuPy."""

    def __init__(self, dev_id):
        self.device = type("D", (), {"id": dev_id})()


FakeCupyArray.__module__ = "cupy._core.core"


def race(threads) -> None:
    """Start ``threads`` and wait for them all, the interpreter switching between threads as often as it can
    meanwhile (so that races show up); the switch interval is restored afterwards."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
