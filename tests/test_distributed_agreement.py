"""Data parallel off the happy path, on real ranks: the ranks agree on the run before any work, a rank
that ends early ends the job within seconds, collectives time out, a launcher without MPI is refused, and
the reduction route is chosen by all ranks together. Every launch has a time limit."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy
import pytest

import gpunn
from helpers import host
from test_distributed import _launch, assert_two_ranks_trained_as_one_process, pytestmark  # noqa: F401  (the same skip: no mpi4py, no mpiexec)

DIFFER = """
import sys, numpy, gpunn
from gpunn.distributed import init
comm = init(device="cpu")
what = sys.argv[1]
odd = comm.rank == 1
g = numpy.random.default_rng(0)
X, y = g.normal(size=(40, 5)), g.integers(0, 3, 40)
kw = dict(loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1), epochs=2, batch_size=8)
act = "tanh"
if odd:
    if what == "lr": kw["optimizer"] = gpunn.SGD(lr=0.2)
    if what == "momentum": kw["optimizer"] = gpunn.SGD(lr=0.1, momentum=0.5)
    if what == "optimizer": kw["optimizer"] = gpunn.Adam(lr=0.1)
    if what == "epochs": kw["epochs"] = 3
    if what == "patience": kw["patience"] = 2
    if what == "shuffle": kw["shuffle"] = False
    if what == "activation": act = "relu"
    if what == "data": X = X.copy(); X[7, 2] += 1e-3
    if what == "length": X, y = X[:37], y[:37]
    if what == "validation": kw["validation_data"] = (X[:5], y[:5])
    if what == "nan": X = X.copy(); X[3, 1] = float("nan")
net = gpunn.mlp([5, 6, 3], activation=act, device="cpu", seed=0)
if what == "optimizer-state":                       # each rank warmed the same optimiser up on its own data
    kw["optimizer"] = gpunn.SGD(lr=0.1, momentum=0.9)
    part = slice(8 * comm.rank, 8 * comm.rank + 8)
    net.fit(X[part], y[part], loss="cross_entropy", optimizer=kw["optimizer"], epochs=1, batch_size=8)
try:
    net.fit(X, y, **kw, comm=comm)
except gpunn.ConfigError as exc:
    open(f"{sys.argv[2]}.{comm.rank}", "w").write(f"rank {comm.rank} refused: {exc}")
    sys.exit(0)
open(f"{sys.argv[2]}.{comm.rank}", "w").write(f"rank {comm.rank} trained")
"""


@pytest.mark.parametrize("what,field", [
    ("lr", "optimizer"), ("momentum", "optimizer"), ("optimizer", "optimizer"), ("epochs", "epochs"),
    ("patience", "patience"), ("shuffle", "shuffle"), ("activation", "network"), ("data", "data"),
    ("length", "data shapes"), ("validation", "validation data"), ("optimizer-state", "optimizer state")])
def test_ranks_that_describe_different_runs_are_all_refused_before_any_work(tmp_path, what, field):
    run, seconds = _launch(2, DIFFER, tmp_path, what, str(tmp_path / "said"), timeout=30)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [(tmp_path / f"said.{r}").read_text() for r in range(2)]
    assert [line.split(" refused: ")[0] for line in lines] == ["rank 0", "rank 1"], run.stdout
    messages = {line.split(" refused: ")[1] for line in lines}
    assert len(messages) == 1                                  # the same error on every rank
    message = messages.pop()
    assert f"{field} (rank 0: " in message and "rank 1: " in message, message
    assert seconds < 20


def test_data_refused_on_one_rank_is_the_same_error_on_every_rank(tmp_path):
    run, seconds = _launch(2, DIFFER, tmp_path, "nan", str(tmp_path / "said"), timeout=30)
    assert run.returncode == 0, run.stderr[-2000:]
    said = [(tmp_path / f"said.{r}").read_text() for r in range(2)]
    assert said[0].split(" refused: ")[1] == said[1].split(" refused: ")[1]
    assert "rank 1: DataError" in said[0] and "NaN" in said[0] and "rank 0:" not in said[0].split("refused: ")[1]


def test_a_rank_that_fails_inside_init_ends_the_job_within_seconds(tmp_path):
    script = ("import gpunn, os\n"
              "comm = gpunn.distributed.init(device='cuda:0' if os.environ.get('PMI_RANK') == '1' else 'cpu')\n"
              "net = gpunn.mlp([4, 3], device='cpu', seed=0)\n"
              "import numpy\n"
              "net.fit(numpy.zeros((8, 4)), numpy.zeros(8, int), loss='cross_entropy', epochs=100, comm=comm)\n")
    run, seconds = _launch(2, script, tmp_path, timeout=60)
    assert run.returncode != 0 and seconds < 15, (seconds, run.stderr[-1000:])


CKPT_ROOT = """
import sys, numpy, gpunn
from gpunn.distributed import init
comm = init(device="cpu")
path = sys.argv[1] if comm.rank == 0 else sys.argv[1] + ".missing-folder/c"    # rank 1 could not write it
g = numpy.random.default_rng(0)
X, y = g.normal(size=(30, 4)), g.integers(0, 2, 30)
net = gpunn.mlp([4, 6, 2], device="cpu", dtype="float64", seed=5)
net.fit(X, y, loss="cross_entropy", epochs=2, batch_size=8, checkpoint=path, comm=comm)
"""


def test_a_checkpoint_only_rank_0_can_write_is_written_there(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    run, _ = _launch(2, CKPT_ROOT, tmp_path, str(ckpt), timeout=30)
    assert run.returncode == 0, run.stderr[-2000:]
    assert ckpt.exists()


def test_ranks_that_agree_train(tmp_path):
    run, _ = _launch(2, DIFFER, tmp_path, "nothing", str(tmp_path / "said"), timeout=30)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [(tmp_path / f"said.{r}").read_text() for r in range(2)] == ["rank 0 trained", "rank 1 trained"]


LEAVE = """
import os, sys, time, numpy, gpunn
from gpunn.distributed import init
how = sys.argv[1]
comm = init(device="cpu", timeout=float(sys.argv[2]) if len(sys.argv) > 2 else None)
net = gpunn.mlp([4, 5, 3], device="cpu", seed=0)
X, y = numpy.zeros((16, 4)), numpy.zeros(16, int)
other = comm.rank == 1

class Fail(gpunn.callbacks.Callback):
    def on_epoch_end(self, record):
        if other and record["epoch"] == 2:
            if how == "exit-in-fit":
                sys.exit(0)
            raise ValueError("a callback fails on rank 1")

if how == "exit-before-fit" and other:
    sys.exit(0)
if how == "sleep" and other:
    time.sleep(60)
try:
    net.fit(X, y, loss="cross_entropy", epochs=200, batch_size=4, callbacks=[Fail()], comm=comm)
except ValueError:
    pass                                   # caught on rank 1, which then exits normally
if how == "extra-fit" and not other:
    net.fit(X, y, loss="cross_entropy", epochs=2, batch_size=4, comm=comm)    # rank 1 never joins
"""


@pytest.mark.parametrize("how", ["exit-before-fit", "exit-in-fit", "caught-error-in-fit", "extra-fit"])
def test_a_rank_that_ends_early_ends_the_job_within_seconds(tmp_path, how):
    run, seconds = _launch(2, LEAVE, tmp_path, how, timeout=60)
    assert run.returncode != 0, (run.stdout[-1000:], run.stderr[-2000:])
    assert seconds < 15, f"the job took {seconds:.1f} s to end"


def test_a_collective_that_waits_past_the_timeout_ends_the_job(tmp_path):
    run, seconds = _launch(2, LEAVE, tmp_path, "sleep", "2", timeout=60)
    assert run.returncode != 0
    assert seconds < 20, f"the job took {seconds:.1f} s to end"
    assert "timeout" in run.stderr or seconds < 20


CHECKPOINT = """
import sys, numpy, gpunn
from gpunn.distributed import init
comm = init(device="cpu")
path, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if comm.rank == 1:
    path = path + ".elsewhere"             # rank 1 cannot see rank 0's checkpoint (a node-local disk)
g = numpy.random.default_rng(0)
X, y = g.normal(size=(30, 4)), g.integers(0, 2, 30)
net = gpunn.mlp([4, 6, 2], device="cpu", dtype="float64", seed=5)
net.fit(X, y, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.2, momentum=0.9), epochs=epochs, batch_size=8,
        checkpoint=path, comm=comm)
numpy.save(f"{out}.{comm.rank}.npy", gpunn.to_host(net.flat_parameters()))
"""


def test_a_checkpoint_only_rank_0_sees_is_read_there_and_broadcast(tmp_path):
    ckpt = str(tmp_path / "run.ckpt")
    first, _ = _launch(2, CHECKPOINT, tmp_path, ckpt, "2", str(tmp_path / "a"), timeout=60)
    assert first.returncode == 0, first.stderr[-2000:]
    assert os.path.exists(ckpt) and not os.path.exists(ckpt + ".elsewhere")
    second, _ = _launch(2, CHECKPOINT, tmp_path, ckpt, "4", str(tmp_path / "b"), timeout=60)
    assert second.returncode == 0, second.stderr[-2000:]
    g = numpy.random.default_rng(0)
    X, y = g.normal(size=(30, 4)), g.integers(0, 2, 30)
    ref = gpunn.mlp([4, 6, 2], device="cpu", dtype="float64", seed=5)
    ref.fit(X, y, loss="cross_entropy", optimizer=gpunn.SGD(lr=0.2, momentum=0.9), epochs=4, batch_size=8)
    got = [numpy.load(tmp_path / f"b.{r}.npy") for r in range(2)]
    numpy.testing.assert_array_equal(got[0], got[1])
    numpy.testing.assert_allclose(got[0], host(ref.flat_parameters()), rtol=1e-12, atol=1e-14)


MIXED = """
import sys, numpy
sys.path.insert(0, sys.argv[1])
import fakecupy
from _pytest.monkeypatch import MonkeyPatch
fakecupy.install(MonkeyPatch(), fused=False)
import gpunn
from gpunn.distributed import init
comm = init()
comm = init(device="cuda:0" if comm.rank == 0 else "cpu")    # rank 0 on the 'GPU', rank 1 on the CPU
net = gpunn.mlp([4, 3], device=comm.device, seed=0)
try:
    net.fit(numpy.zeros((8, 4)), numpy.zeros(8, int), loss="cross_entropy", epochs=1, comm=comm)
except gpunn.ConfigError as exc:
    open(f"{sys.argv[2]}.{comm.rank}", "w").write(str("device kind" in str(exc)))
"""


def test_mixed_cpu_and_gpu_ranks_are_refused_before_any_reduction(tmp_path):
    run, seconds = _launch(2, MIXED, tmp_path, os.path.dirname(__file__), str(tmp_path / "said"), timeout=30)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [(tmp_path / f"said.{r}").read_text() for r in range(2)] == ["True", "True"]
    assert seconds < 20


NCCL = """
import sys, types, numpy
sys.path.insert(0, sys.argv[2])
import fakecupy
from _pytest.monkeypatch import MonkeyPatch
cupy = fakecupy.install(MonkeyPatch(), fused=False)
case = sys.argv[3]
nccl = types.ModuleType("cupy.cuda.nccl")                 # shaped like CuPy 14's binding
nccl.available = case != "missing"
nccl.get_unique_id = lambda: (1, 2, 3)

class Comm:
    def __init__(self, size, uid, rank):
        if case == "fails-on-rank-1" and rank == 1:
            raise RuntimeError("NCCL error: unhandled system error")
        self.destroyed = False
    def destroy(self):
        self.destroyed = True
nccl.NcclCommunicator = Comm
cuda_mod = types.ModuleType("cupy.cuda")
cuda_mod.__dict__.update(vars(cupy.cuda))
cuda_mod.nccl = nccl
cupy.__path__ = []
sys.modules["cupy.cuda"], sys.modules["cupy.cuda.nccl"] = cuda_mod, nccl
import gpunn
from gpunn.distributed import init
comm = init(device="cuda:0")
g = numpy.random.default_rng(0)
X, y = g.normal(size=(40, 5)), g.integers(0, 3, 40)
net = gpunn.mlp([5, 7, 3], activation="relu", device=comm.device, dtype="float64", seed=1)
net.fit(X, y, loss="cross_entropy", optimizer=gpunn.Adam(lr=0.01), epochs=2, batch_size=12, comm=comm)
numpy.save(f"{sys.argv[1]}.{comm.rank}.npy", gpunn.to_host(net.flat_parameters()))
open(f"{sys.argv[1]}.{comm.rank}.route", "w").write(comm.route)
"""


@pytest.mark.parametrize("case", ["missing", "fails-on-rank-1"])
def test_without_a_working_nccl_every_rank_takes_the_host_route_together(tmp_path, case):
    run, seconds = _launch(2, NCCL, tmp_path, str(tmp_path / "p"), os.path.dirname(__file__), case, timeout=40)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [(tmp_path / f"p.{r}.route").read_text() for r in range(2)] == ["host", "host"]
    assert_two_ranks_trained_as_one_process(tmp_path / "p")


NO_MPI4PY = "import sys; sys.modules['mpi4py'] = None\n"


@pytest.mark.parametrize("variable", ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_a_launcher_without_mpi4py_is_refused_by_init_and_the_cli(variable):
    env = {**os.environ, variable: "2", "PYTHONPATH": os.pathsep.join(sys.path)}
    code = NO_MPI4PY + ("import gpunn\nimport gpunn.distributed as d\ntry:\n    d.init()\n"
                        "except gpunn.DistributedError as e:\n    print('refused', e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert run.stdout.startswith("refused") and "pip install 'gpunn[mpi]'" in run.stdout, run.stderr
    cli = NO_MPI4PY + "from gpunn.cli import main; sys.exit(main())"
    run = subprocess.run([sys.executable, "-c", cli, "train", "--distributed", "--epochs", "1"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "gpunn[mpi]" in run.stderr and "Traceback" not in run.stderr


def test_alone_init_picks_the_gpu_when_one_is_usable(fake_gpu):
    assert str(gpunn.distributed.init().device) == "cuda:0"
    assert str(gpunn.distributed.init(device="cpu").device) == "cpu"


def test_the_launcher_size_is_read_from_its_variables():
    from gpunn.distributed import launcher_size
    assert launcher_size({}) == (1, None)
    assert launcher_size({"PMI_SIZE": "3"}) == (3, "PMI_SIZE")
    assert launcher_size({"OMPI_COMM_WORLD_SIZE": "4", "PMI_SIZE": "x"}) == (4, "OMPI_COMM_WORLD_SIZE")
