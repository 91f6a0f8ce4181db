"""Data-parallel training on real MPI ranks (the venv's own mpiexec): N ranks = one process on the full
batch, failures end the whole job, and the single-process fallback. Every launch has a time limit."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy
import pytest

import gpunn
from gpunn.distributed import init, shard
from helpers import host, rng

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
def _has_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(MPIEXEC is None or not _has_mpi4py(),
                                reason="mpi4py or the venv's mpiexec missing (pip install -e '.[mpi]')")


def _launch(n: int, script: str, tmp_path, *args: str, module: bool = False, timeout: int = 60):
    path = tmp_path / "job.py"
    path.write_text(script)
    cmd = [MPIEXEC, "-n", str(n), sys.executable] + (["-m", "mpi4py"] if module else []) + [str(path), *args]
    env = {**os.environ, "MPIEXEC_TIMEOUT": str(timeout), "PYTHONPATH": os.pathsep.join(sys.path),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, env=env)
    return run, time.perf_counter() - t0


TRAIN = """
import sys, numpy, gpunn
from gpunn.distributed import init
comm = init(device="cpu")
dtype, out = sys.argv[1], sys.argv[2]
g = numpy.random.default_rng(0)
X, y = g.normal(size=(50, 6)), g.integers(0, 3, 50)
net = gpunn.mlp([6, 9, 3], activation="tanh", device="cpu", dtype=dtype, seed=3)
h = net.fit(X, y, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1, momentum=0.9), epochs=3, batch_size=16,
            validation_data=(X[:10], y[:10]), comm=comm)
numpy.save(f"{out}.{comm.rank}.npy", gpunn.to_host(net.flat_parameters()))
numpy.save(f"{out}.{comm.rank}.hist.npy", numpy.array([h.loss, h.accuracy, h.val_loss]))
"""


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_n_ranks_train_exactly_as_one_process(tmp_path, ranks, dtype, tol):
    """50 samples, global batch 16: uneven shards, and a last batch of 2 rows that leaves a rank empty."""
    run, _ = _launch(ranks, TRAIN, tmp_path, dtype, str(tmp_path / "p"))
    assert run.returncode == 0, run.stderr[-2000:]
    g = numpy.random.default_rng(0)
    X, y = g.normal(size=(50, 6)), g.integers(0, 3, 50)
    ref = gpunn.mlp([6, 9, 3], activation="tanh", device="cpu", dtype=dtype, seed=3)
    h = ref.fit(X, y, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1, momentum=0.9), epochs=3, batch_size=16,
                validation_data=(X[:10], y[:10]))
    want = host(ref.flat_parameters())
    got = [numpy.load(tmp_path / f"p.{r}.npy") for r in range(ranks)]
    for r in range(1, ranks):
        numpy.testing.assert_array_equal(got[r], got[0])             # every rank holds the same weights
    assert numpy.max(numpy.abs(got[0] - want)) / numpy.max(numpy.abs(want)) <= tol
    hist = numpy.load(tmp_path / "p.0.hist.npy")
    numpy.testing.assert_allclose(hist, [h.loss, h.accuracy, h.val_loss], rtol=tol * 10)


FAIL = """
import os, sys, time, numpy, gpunn
from gpunn.distributed import init
comm = init(device="cpu")
how = sys.argv[1]
if comm.rank == 1:
    if how == "raise":
        raise RuntimeError("rank 1 fails")
    os.kill(os.getpid(), 9)
net = gpunn.mlp([4, 3], output="softmax", device="cpu", seed=0)
net.fit(numpy.zeros((8, 4)), numpy.zeros(8, int), loss="cross_entropy", epochs=1000, comm=comm)
"""


@pytest.mark.parametrize("how,module", [("raise", False), ("raise", True), ("kill", False)],
                         ids=["exception-plain-python", "exception-python-m-mpi4py", "killed-rank"])
def test_a_failing_rank_ends_the_whole_job(tmp_path, how, module):
    run, seconds = _launch(2, FAIL, tmp_path, how, module=module, timeout=40)
    assert run.returncode != 0
    assert seconds < 20, f"the job took {seconds:.1f} s to end"
    # (the traceback is usually in run.stderr, but an abort can cut mpiexec's forwarding of it short)


def test_alone_the_communicator_is_one_process_and_its_collectives_do_nothing():
    comm = init(device="cpu")
    assert (comm.rank, comm.size, comm.is_root, str(comm.device)) == (0, 1, True, "cpu")
    a = numpy.arange(4.0)
    assert comm.allreduce_sum(a) is a and comm.broadcast(a) is a and comm.any(True) and not comm.any(False)
    net = gpunn.mlp([6, 8, 3], device="cpu", seed=0)
    twin = gpunn.mlp([6, 8, 3], device="cpu", seed=0)
    X, y = rng(0).normal(size=(30, 6)), rng(1).integers(0, 3, 30)
    net.fit(X, y, loss="cross_entropy", epochs=2, batch_size=8, comm=comm)
    twin.fit(X, y, loss="cross_entropy", epochs=2, batch_size=8)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), host(twin.flat_parameters()))
    with pytest.raises(gpunn.ConfigError, match="Communicator"):
        net.fit(X, y, loss="cross_entropy", epochs=1, comm="world")


def test_shards_cover_each_batch_once_and_differ_by_at_most_one_row():
    for n, size in [(16, 3), (2, 3), (1, 2), (17, 4)]:
        parts = [shard(5, 5 + n, r, size) for r in range(size)]
        assert [p.start for p in parts] == sorted(p.start for p in parts) and parts[0].start == 5
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:])) and parts[-1].stop == 5 + n
        lengths = [p.stop - p.start for p in parts]
        assert max(lengths) - min(lengths) <= 1



FAKE_GPU = """
import sys, numpy
sys.path.insert(0, sys.argv[2])
import fakecupy
from _pytest.monkeypatch import MonkeyPatch
fakecupy.install(MonkeyPatch(), fused=False)
import gpunn
from gpunn.distributed import init
comm = init(device="cuda:0")                       # the fake has one 'GPU': every rank's cuda:0 here
g = numpy.random.default_rng(0)
X, y = g.normal(size=(40, 5)), g.integers(0, 3, 40)
net = gpunn.mlp([5, 7, 3], activation="relu", device=comm.device, dtype="float64", seed=1)
net.fit(X, y, loss="cross_entropy", optimizer=gpunn.Adam(lr=0.01), epochs=2, batch_size=12, comm=comm)
numpy.save(f"{sys.argv[1]}.{comm.rank}.npy", gpunn.to_host(net.flat_parameters()))
"""


def test_cupy_arrays_are_summed_through_the_host_on_the_fake_gpu(tmp_path):
    run, _ = _launch(2, FAKE_GPU, tmp_path, str(tmp_path / "p"), os.path.dirname(__file__))
    assert run.returncode == 0, run.stderr[-2000:]
    assert_two_ranks_trained_as_one_process(tmp_path / "p")


def assert_two_ranks_trained_as_one_process(prefix) -> None:
    """The weights the two ranks of FAKE_GPU-like jobs saved at ``prefix``.<rank>.npy are identical and equal
    to the same Adam run in one process on the CPU."""
    g = numpy.random.default_rng(0)
    X, y = g.normal(size=(40, 5)), g.integers(0, 3, 40)
    ref = gpunn.mlp([5, 7, 3], activation="relu", device="cpu", dtype="float64", seed=1)
    ref.fit(X, y, loss="cross_entropy", optimizer=gpunn.Adam(lr=0.01), epochs=2, batch_size=12)
    got = [numpy.load(f"{prefix}.{r}.npy") for r in range(2)]
    numpy.testing.assert_array_equal(got[0], got[1])
    numpy.testing.assert_allclose(got[0], host(ref.flat_parameters()), rtol=1e-12, atol=1e-14)


def test_the_cli_trains_on_several_ranks_and_only_rank_0_reports(tmp_path):
    script = "import sys; from gpunn.cli import main; sys.exit(main())"
    out = tmp_path / "m.npz"
    run, _ = _launch(2, script, tmp_path, "train", "--distributed", "--dataset", "moons", "--epochs", "30",
                     "--save", str(out), "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    import json
    summary = json.loads(run.stdout)                  # one JSON document: rank 1 printed nothing
    assert summary["ranks"] == 2 and summary["test_accuracy"] >= 0.9 and out.exists()


def test_the_pypi_mpich_is_not_reported_cuda_aware():
    """MPICH's PyPI wheel has no CUDA support: its CuPy arrays must take NCCL or the host route."""
    from mpi4py import MPI  # noqa: F401  (loads the MPI library whose support is queried)

    from gpunn.distributed import mpi_cuda_aware
    assert mpi_cuda_aware() is False


def test_a_cuda_aware_mpi_is_recognised(tmp_path):
    """A library named like an MPI that answers MPIX_Query_cuda_support() == 1 is taken at its word."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in library")
    src = tmp_path / "q.c"
    src.write_text("int MPIX_Query_cuda_support(void) { return 1; }\n")
    lib = tmp_path / "libmpi_cuda_standin.so"
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    run = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(lib)!r}); "
                          "from gpunn.distributed import mpi_cuda_aware; print(mpi_cuda_aware())"],
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "True", run.stderr
