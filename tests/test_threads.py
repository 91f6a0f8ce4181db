"""gpunn's choice of BLAS threads (gpunn.threads): the rule, what it reads, and that it is applied once."""
from __future__ import annotations

import importlib.util
import pathlib
import threading
import time

import numpy
import pytest

import gpunn
from gpunn import cpukernels, threads
from gpunn.errors import ConfigError
from helpers import race


@pytest.fixture
def quiet_env(monkeypatch):
    """No user BLAS variables, no GPUNN_THREADS, no launcher's rank count; the policy reset afterwards."""
    for name in threads.USER_BLAS_VARIABLES + threads.LOCAL_RANK_VARIABLES + ("GPUNN_THREADS",):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    threads.set_threads(None)
    threads.set_local_ranks(None)


#: Tests that read the threads back (threads.current()): gpunn sets BLAS threads through threadpoolctl, and runs on
#: without it (a dependency an install can lack), the threads then left as they are.
needs_threadpoolctl = pytest.mark.skipif(importlib.util.find_spec("threadpoolctl") is None,
                                         reason="threadpoolctl is not installed: gpunn leaves the BLAS threads alone")


M = threads.MIN_WORK


@pytest.mark.parametrize("work,cores,ranks,busy,setting,user,expected", [
    (32, 2, 1, 0.0, "auto", None, 1),           # the lecture's 4-8-1 step at batch 1: one thread
    (M - 1, 8, 1, 0.0, "auto", None, 1),        # below MIN_WORK: one thread whatever the cores
    (M, 2, 1, 0.0, "auto", None, 2),            # from MIN_WORK: the usable cores
    (8 * M, 8, 2, 0.0, "auto", None, 4),        # shared among the local ranks
    (8 * M, 2, 4, 0.0, "auto", None, 1),        # more ranks than cores: one each
    (M, 2, 1, 1.0, "auto", None, 1),            # another process spins on one of 2 cores
    (M, 2, 1, 0.6, "auto", None, 1),            # ... while it shares a core with us
    (M, 2, 1, 0.2, "auto", None, 2),            # background noise below the margin
    (M, 8, 1, 3.0, "auto", None, 5),
    (M, 2, 1, 5.0, "auto", None, 1),            # never fewer than one
    (M, 2, 1, 1.0, "steady", None, 2),          # steady: the load does not count
    (M // 3, 8, 1, 1.0, "steady", None, 1),
    (8 * M, 8, 2, 0.0, "steady", None, 4),
    (32, 2, 1, 0.0, 3, None, 3),                # the user's number, even for small steps
    (16 * M, 2, 1, 0.0, "off", None, None),     # off: left alone
    (16 * M, 2, 1, 0.0, 3, "OMP_NUM_THREADS=1", None),   # a user BLAS variable wins over everything
])
def test_the_rule(work, cores, ranks, busy, setting, user, expected):
    assert threads.choose(work, cores, ranks, busy, setting, user) == expected


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("", "auto"), (" AUTO ", "auto"), ("off", "off"),
                                            ("steady", "steady"),
                                            ("none", "off"), ("4", 4), (2, 2), (" 3 ", 3)])
def test_settings_parse(value, expected):
    assert threads.parse_setting(value, "x") == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", 2.5, True, "1.0", 0, None])
def test_bad_settings_say_what_is_expected(value):
    with pytest.raises(ConfigError, match="positive number of threads, 'auto', 'steady' or 'off'"):
        threads.parse_setting(value, "GPUNN_THREADS")


@pytest.mark.parametrize("value", [2**31, "2147483648", "4294967299", numpy.int64(2**40), 10**30])
def test_more_threads_than_a_c_int_holds_are_refused(quiet_env, value):
    """A thread count reaches the BLAS library as a C int: 2**32 + 3 became 3 threads there, 2**64 an
    OverflowError inside threadpoolctl. Above MAX_THREADS a setting is a ConfigError that says the bound."""
    with pytest.raises(ConfigError, match=f"at most {threads.MAX_THREADS}"):
        threads.set_threads(value)
    quiet_env.setenv("GPUNN_THREADS", str(value))
    net = gpunn.mlp([3, 5, 2], seed=0, device="cpu")
    with pytest.raises(ConfigError, match=f"GPUNN_THREADS must be at most {threads.MAX_THREADS}"):
        net.train_step(numpy.ones((4, 3), "float32"), numpy.zeros((4, 2), "float32"), "squared_error", gpunn.SGD())
    assert threads.parse_setting(2**31 - 1, "x") == threads.MAX_THREADS == 2**31 - 1


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_thread_counts_are_a_config_error(value):
    with pytest.raises(ConfigError, match="positive number of threads"):
        threads.set_threads(value)


def test_the_cli_help_and_the_readme_name_every_thread_setting():
    """``--threads`` takes what GPUNN_THREADS takes: its help and the README's usage say all of it."""
    click_testing = pytest.importorskip("click.testing")
    from gpunn.cli import main
    result = click_testing.CliRunner().invoke(main, ["bench", "--help"])
    help_text = " ".join(result.output.split())             # as click wrapped it
    assert result.exit_code == 0 and all(f"'{s}'" in help_text for s in ("auto", "steady", "off"))
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "[--threads N|auto|steady|off]" in readme


def test_user_blas_variables_are_found():
    assert threads.user_blas_setting({}) is None
    assert threads.user_blas_setting({"OMP_NUM_THREADS": " "}) is None
    assert threads.user_blas_setting({"MKL_NUM_THREADS": "2"}) == "MKL_NUM_THREADS=2"


def test_cgroup_quotas_are_read_along_the_path(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "a" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "a" / "b" / "cpu.max").write_text("300000 100000\n")
    assert threads._quotas(str(tmp_path), "/a/b", "cpu.max", None) == [3.0, 1.5]
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "a" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "a" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._quotas(str(tmp_path), "/a", "cpu.cfs_quota_us", "cpu.cfs_period_us") == [0.5]


@pytest.mark.parametrize("content", ["nan 100000", "inf 100000", "-inf 100000", "NaN NaN", "50000 inf",
                                     "0 100000", "-50000 100000", "50000 0", "50000 -100000", "1e5 100000",
                                     "", "garbage", "max", "50000 100000 7", "\u00b2 1", "\u0663 1", "9" * 5000 + " 1",
                                     b"\xff\xfe 100000", b"50000 \xff"])
def test_a_bad_cgroup_quota_is_no_quota(tmp_path, content):
    """What a cgroup quota file holds is the kernel's, or anyone's who mounts a file there: a quota or
    period that is not a positive ASCII decimal count is no quota, never NaN, 0 or infinite cores."""
    (tmp_path / "a").mkdir()
    write = (lambda f, c: f.write_bytes(c)) if isinstance(content, bytes) else (lambda f, c: f.write_text(c))
    write(tmp_path / "a" / "cpu.max", content)
    assert threads._quotas(str(tmp_path), "/a", "cpu.max", None) == []
    quota, _, period = content.partition(b" " if isinstance(content, bytes) else " ")
    write(tmp_path / "a" / "cpu.cfs_quota_us", quota)
    write(tmp_path / "a" / "cpu.cfs_period_us", period or "100000")
    assert threads._quotas(str(tmp_path), "/a", "cpu.cfs_quota_us", "cpu.cfs_period_us") == []


def test_malformed_proc_self_cgroup_lines_are_unknown(tmp_path):
    """/proc/self/cgroup lines that are not ``id:controllers:path`` below the cgroup root (no colons, a
    path with ``..`` out of the mount, a NUL byte, undecodable bytes) are skipped, never a ValueError;
    the good lines still count."""
    (tmp_path / "sys" / "a").mkdir(parents=True)
    (tmp_path / "sys" / "a" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "cpu.max").write_text("10000 100000\n")        # outside the mount: must not count
    proc = tmp_path / "cgroup"
    bad = b"garbage\n1:cpu\n\n0::/../x\n0::/a\x00b\n0::/\xff\xfe\n"
    proc.write_bytes(bad + b"0::/a\n")
    assert threads.cgroup_quota(str(proc), str(tmp_path / "sys")) == 1.5
    proc.write_bytes(bad)
    assert threads.cgroup_quota(str(proc), str(tmp_path / "sys")) is None
    assert threads.cgroup_quota(str(tmp_path / "missing"), str(tmp_path / "sys")) is None


def test_usable_cores_take_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(threads, "affinity", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert threads.usable_cores() == 4
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 1.5)
    assert threads.usable_cores() == 2
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 0.2)
    assert threads.usable_cores() == 1
    assert threads.usable_cores() >= 1 and threads.cgroup_quota() is not None or True   # readable here


def test_the_load_meter_subtracts_our_own_cpu_time(tmp_path):
    stat = tmp_path / "stat"
    clock = {"wall": 0.0, "cpu": 0.0}
    meter = threads.LoadMeter({0, 1}, str(stat), clock=lambda: clock["wall"], cpu_clock=lambda: clock["cpu"])
    meter.tick = 0.01

    def write(busy0, busy1, other):
        stat.write_text(f"cpu  1 1 1 1 1 1 1 1 0 0\ncpu0 {busy0} 0 0 500 7 0 0 0 0 0\n"
                        f"cpu1 {busy1} 0 0 500 9 0 0 0 0 0\ncpu2 {other} 0 0 0 0 0 0 0 0 0\n")
    write(100, 100, 0)
    assert meter.others_busy() is None                 # the first look has nothing to compare with
    write(150, 200, 10_000)                            # 1.5 CPU-seconds busy on our CPUs in 1 s (cpu2 not ours)
    clock.update(wall=1.0, cpu=0.5)                    # of which 0.5 s were ours
    assert meter.others_busy() == pytest.approx(1.0)
    assert threads.LoadMeter({0}, str(tmp_path / "missing")).others_busy() is None


def test_a_load_meter_reading_nonsense_says_nothing_or_at_most_its_cpus(tmp_path):
    """A /proc/stat line too short, a count too large for a float or undecodable: no look (None), never an
    IndexError or OverflowError at a step; a jump of the counters: at most all of its CPUs busy, never an
    infinite load (math.ceil of which raised in choose)."""
    stat = tmp_path / "stat"
    clock = {"wall": 0.0}
    meter = threads.LoadMeter({0, 1}, str(stat), clock=lambda: clock["wall"], cpu_clock=lambda: 0.0)
    meter.tick = 0.01
    for text in [b"cpu0 1 2 3 4\n", b"cpu0 " + b"9" * 400 + b" 0 0 0 0 0 0 0\n", b"cpu0 1 \xff 0 0 0 0 0 0\n"]:
        stat.write_bytes(text)
        assert meter.sample() is None
    stat.write_text("cpu0 0 0 0 0 0 0 0 0\n")
    assert meter.others_busy() is None
    stat.write_text("cpu0 " + "9" * 308 + " 0 0 0 0 0 0 0\n")
    clock["wall"] = 0.002
    busy = meter.others_busy()
    assert busy == 2.0 and threads.choose(M, 2, 1, busy) == 1


class FakeController:
    def __init__(self):
        self.calls = []

    def limit(self, limits, user_api):
        self.calls.append((limits, user_api))


def test_the_policy_switches_only_when_its_choice_changes(quiet_env, monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    policy = threads.ThreadPolicy()
    policy.controller = FakeController()
    policy.meter = threads.LoadMeter(set(), "/nonexistent")     # no load information: nobody else busy
    for _ in range(5):
        policy.apply(32)
    policy.apply(M // 2)
    assert policy.controller.calls == [(1, "blas")] and policy.applied == 1
    policy.apply(8 * M)
    policy.apply(8 * M)
    assert policy.controller.calls[-1] == (2, "blas") and len(policy.controller.calls) == 2
    policy.ranks = 2
    policy.invalidate()
    policy.apply(8 * M)
    assert policy.controller.calls[-1] == (1, "blas") and len(policy.controller.calls) == 3
    quiet_env.setenv("OPENBLAS_NUM_THREADS", "2")
    policy.invalidate()
    policy.apply(16 * M)
    assert len(policy.controller.calls) == 3            # the user's variable: nothing touched


def test_the_load_is_looked_at_only_under_auto_from_min_work(quiet_env, monkeypatch):
    """apply asks the load meter (made at its first use) only for work from MIN_WORK on under "auto" with no user
    BLAS variable, and what it says counts: one of 2 cores busy gives one thread; under "steady", below MIN_WORK
    or with OPENBLAS_NUM_THREADS set, the meter is never asked."""
    asked = []

    class Meter:
        def __init__(self, cpus):
            pass

        def others_busy(self):
            asked.append(1)
            return 1.0
    monkeypatch.setattr(threads, "LoadMeter", Meter)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    policy = threads.ThreadPolicy()
    policy.controller = FakeController()
    policy.apply(M - 1)
    assert policy.meter is None and asked == [] and policy.applied == 1
    policy.apply(M)
    assert isinstance(policy.meter, Meter) and asked == [1] and policy.applied == 1    # the busy core counted
    quiet_env.setenv("GPUNN_THREADS", "steady")
    policy.invalidate()
    policy.apply(M)
    assert asked == [1] and policy.applied == 2
    quiet_env.setenv("GPUNN_THREADS", "auto")
    quiet_env.setenv("OPENBLAS_NUM_THREADS", "2")
    policy.invalidate()
    policy.apply(4 * M)
    assert asked == [1] and policy.controller.calls == [(1, "blas"), (2, "blas")]


class YieldingController(FakeController):
    """A controller whose switch lets other threads run in the middle of it, as a ctypes call can."""

    def __init__(self):
        super().__init__()
        self.inside = self.most_inside = 0

    def limit(self, limits, user_api):
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        self.calls.append((limits, user_api))
        time.sleep(0)
        self.inside -= 1


@pytest.fixture
def global_policy(quiet_env, monkeypatch):
    """The process's policy with a fake controller and no load information, restored afterwards."""
    policy = threads.policy()
    for name, value in [("controller", YieldingController()), ("meter", threads.LoadMeter(set(), "/nonexistent")),
                        ("applied", policy.applied), ("error", policy.error), ("next_look", policy.next_look)]:
        monkeypatch.setattr(policy, name, value)
    yield policy
    policy.invalidate()


def test_a_setting_changed_while_another_thread_chooses_is_not_lost(global_policy, monkeypatch):
    """set_threads in one thread while a step in another is between reading the setting and recording its
    choice: the change waits for the choice (a lock), so the next step applies it instead of skipping
    with the old setting marked settled."""
    policy = global_policy
    reading, go = threading.Event(), threading.Event()
    read_setting = threads.ThreadPolicy.user_setting

    def slow_user_setting(self):
        setting = read_setting(self)
        if threading.current_thread().name == "stepper":
            reading.set()
            go.wait(5)
        return setting
    monkeypatch.setattr(threads.ThreadPolicy, "user_setting", slow_user_setting)
    threads.set_threads(1)
    stepper = threading.Thread(target=threads.apply, args=(32,), name="stepper")
    stepper.start()
    assert reading.wait(5)
    setter = threading.Thread(target=threads.set_threads, args=(2,))
    setter.start()
    setter.join(0.2)        # without the lock it is done by now; with it, it waits for the step
    go.set()
    stepper.join(5)
    setter.join(5)
    threads.apply(32)
    assert policy.applied == 2 and policy.controller.calls[-1] == (2, "blas")


def test_steps_and_setting_changes_from_many_threads_keep_the_policy_consistent(global_policy):
    """Threads that change the setting and run steps at once: one chooses and switches at a time, what
    gpunn says it applied is what it last gave the library, and the next step applies the last setting."""
    policy = global_policy

    def hammer(t):
        for i in range(300):
            threads.set_threads(1 + (i + t) % 3)
            threads.apply(32 if i % 2 else M)
            policy.invalidate()
            threads.apply(32)
    workers = [threading.Thread(target=hammer, args=(t,)) for t in range(4)]
    race(workers)
    assert policy.controller.most_inside == 1           # one switch at a time
    assert policy.applied == policy.controller.calls[-1][0]
    threads.apply(32)
    assert policy.applied == policy.setting == policy.controller.calls[-1][0]


def test_a_training_step_sets_the_blas_threads(quiet_env):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    net = gpunn.mlp([4, 8, 1], output="sigmoid", device="cpu", seed=0)
    net.train_step(numpy.zeros((1, 4), "float32"), numpy.zeros((1, 1), "float32"), "squared_error", gpunn.SGD())
    assert threads.current() == 1
    # NumPy's own BLAS (the one gpunn's matmuls run on; SciPy's, loaded later, is not gpunn's)
    blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]]
    assert blas and all(i["num_threads"] == 1 for i in blas)
    threads.set_threads(2)
    net.train_step(numpy.zeros((1, 4), "float32"), numpy.zeros((1, 1), "float32"), "squared_error", gpunn.SGD())
    assert threads.current() == 2


def test_a_step_in_any_thread_sets_the_blas_threads(quiet_env):
    """threadpoolctl (3.8) lets only the first thread that sets OpenBLAS's (pthreads) threads set them
    again while it lives, and silently ignores the others: a step in a worker thread after one in the main
    thread said it set 2 threads and left 1. Every step's switch now reaches the library, whichever
    thread runs it, also while a thread that switched earlier still lives."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    net = gpunn.mlp([4, 8, 1], output="sigmoid", device="cpu", seed=0)
    x, t = numpy.zeros((1, 4), "float32"), numpy.zeros((1, 1), "float32")

    def step(n, seen):      # the threads NumPy's BLAS reports in the stepping thread (OpenMP's are per thread)
        threads.set_threads(n)
        net.train_step(x, t, "squared_error", gpunn.SGD())
        seen += [(threads.current(), i["num_threads"]) for i in threadpoolctl.threadpool_info()
                 if i["user_api"] == "blas" and "numpy" in i["filepath"]]

    def in_thread(n, stay):
        """Step in a new thread that then lives on until ``stay`` is set."""
        seen, done = [], threading.Event()

        def run():
            step(n, seen)
            done.set()
            stay.wait(5)
        worker = threading.Thread(target=run)
        worker.start()
        assert done.wait(5)
        return worker, seen
    main: list = []
    step(1, main)
    assert main == [(1, 1)]
    gone = threading.Event()
    gone.set()
    worker, seen = in_thread(2, gone)               # a worker after the main thread
    worker.join(5)
    assert seen == [(2, 2)]
    step(1, main)
    assert main[-1] == (1, 1)
    stay = threading.Event()
    worker, seen = in_thread(2, stay)               # a worker that switched, and lives on
    step(1, main)
    stay.set()
    worker.join(5)
    assert seen == [(2, 2)] and main[-1] == (1, 1)


def test_settled_work_is_the_work_whose_choice_stands_until_the_policy_changes(quiet_env):
    """ThreadPolicy.settled, what a step compares its work with before calling apply: a work below MIN_WORK
    once applied (its choice depends on nothing that changes by itself), never a larger one (the load is
    looked at again every LOOK_EVERY), and nothing once the user's setting or the ranks change."""
    policy = threads.ThreadPolicy()
    policy.controller = FakeController()
    policy.meter = threads.LoadMeter(set(), "/nonexistent")
    assert policy.settled is None
    policy.apply(32)
    assert policy.settled == 32
    policy.apply(M)
    assert policy.settled is None
    policy.apply(M - 1)
    assert policy.settled == M - 1
    policy.invalidate()
    assert policy.settled is None


@needs_threadpoolctl
def test_a_step_above_min_work_applies_the_policy_at_every_step(quiet_env):
    """Above MIN_WORK a step calls apply every time (the load term is looked at every LOOK_EVERY); below
    it the step skips apply for the settled work, and a new setting still takes effect at the next step."""
    policy = threads.policy()
    threads.set_threads("steady")
    net = gpunn.mlp([1000, 1000, 1], output="sigmoid", device="cpu", seed=0)
    x, t = numpy.zeros((M // 1_000_000, 1000), "float32"), numpy.zeros((M // 1_000_000, 1), "float32")
    net.train_step(x, t, "squared_error", gpunn.SGD())
    assert policy.work == M and policy.settled is None
    policy.next_look = 0.0                      # time to look again: only apply itself knows
    net.train_step(x, t, "squared_error", gpunn.SGD())
    assert policy.next_look > 0.0
    small = gpunn.mlp([4, 8, 1], output="sigmoid", device="cpu", seed=0)
    for n_threads in (1, 2, 1):
        threads.set_threads(n_threads)
        for _ in range(2):
            small.train_step(x[:1, :4], t[:1], "squared_error", gpunn.SGD())
            assert threads.current() == n_threads and policy.settled == 32


def test_setters_check_their_values(quiet_env):
    with pytest.raises(ConfigError):
        threads.set_local_ranks(0)
    with pytest.raises(ConfigError):
        threads.set_threads("many")
    threads.set_local_ranks(3)
    assert threads.local_ranks() == 3
    threads.set_local_ranks(None)
    quiet_env.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert threads.local_ranks() == 4


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "\uff14", "4.0", "+4", "-4", "0", "4 ranks", "1e3", "nan",
                                   "9" * 5000, ""])
def test_a_launcher_rank_count_is_ascii_decimal_digits_only(quiet_env, value):
    """OMPI_COMM_WORLD_LOCAL_SIZE=² (which isdigit() accepts and int() refuses), =٣ (which int() reads as
    3) or 5000 nines (past int()'s digit limit) is no count: the next launcher variable, else 1 rank."""
    quiet_env.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", value)
    assert threads.local_ranks() == 1
    quiet_env.setenv("MPI_LOCALNRANKS", " 3\n")
    assert threads.local_ranks() == 3
    assert threads.describe()["local_ranks"] == 3


def test_describe_and_summary_say_what_was_chosen(quiet_env):
    d = threads.describe()
    assert d["mode"] == "auto" and d["usable_cores"] >= 1 and d["min_work"] == threads.MIN_WORK
    assert threads.summary().startswith(f"auto: 1 below {threads.MIN_WORK:,} multiply-adds per product")
    threads.set_threads(3)
    assert threads.summary().startswith("3 (set by the user)")
    threads.set_threads("off")
    assert threads.summary().startswith("left alone (GPUNN_THREADS=off)")
    quiet_env.setenv("OMP_NUM_THREADS", "1")
    assert threads.summary().startswith("left alone (OMP_NUM_THREADS=1 is set)")
    quiet_env.setenv("GPUNN_THREADS", "zero")
    threads.set_threads(None)
    assert "invalid" in threads.describe()["setting"]


def _train(n_threads, fused, rows=512):
    threads.set_threads(n_threads)
    net = gpunn.mlp([300, 64, 10], activation="sigmoid", device="cpu", seed=1, fused=fused)
    g = numpy.random.Generator(numpy.random.PCG64(2))
    x = g.normal(size=(rows, 300)).astype("float32")
    t = numpy.eye(10, dtype="float32")[g.integers(0, 10, rows)]
    opt = gpunn.SGD(lr=0.1, momentum=0.9)
    for _ in range(3):
        net.train_step(x, t, "cross_entropy", opt)
    assert threads.current() == (1 if n_threads == "auto" and rows * 300 * 64 < threads.MIN_WORK else n_threads)
    return numpy.array(net.flat_parameters()).view("u4")


@needs_threadpoolctl
def test_the_fused_kernels_add_no_dependence_on_the_thread_count(quiet_env):
    """The fused CPU kernels are serial: at a given BLAS thread count they give the NumPy path's bits."""
    if not cpukernels.available():
        pytest.skip(f"fused CPU kernels: {cpukernels.unavailable_reason()}")
    for n in (1, 2):
        assert numpy.array_equal(_train(n, fused=False), _train(n, fused=True))


@needs_threadpoolctl
def test_below_min_work_the_result_does_not_depend_on_the_load(quiet_env, monkeypatch):
    """OpenBLAS's GEMM gives other last bits on 2 threads than on 1 (why 'steady' exists); below MIN_WORK
    the policy picks one thread whatever the machine's load, so results are the same busy or quiet."""
    rows = threads.MIN_WORK // (300 * 64) - 1           # _train's widest layer is 300 x 64
    quiet = _train("auto", fused=None, rows=rows)
    monkeypatch.setattr(threads.LoadMeter, "others_busy", lambda self: 5.0)
    assert numpy.array_equal(quiet, _train("auto", fused=None, rows=rows))


@needs_threadpoolctl
def test_a_bad_gpunn_threads_is_refused_at_every_step_not_only_the_first(quiet_env):
    """GPUNN_THREADS=bogus: every training step says what is wrong (ConfigError), not only the first one
    while the later ones run on silently with threads nobody chose."""
    quiet_env.setenv("GPUNN_THREADS", "bogus")
    threads.set_threads(None)
    net = gpunn.mlp([3, 5, 2], seed=0, device="cpu")
    x, t = numpy.ones((4, 3), "float32"), numpy.zeros((4, 2), "float32")
    opt = gpunn.SGD(lr=0.1)
    for _ in range(3):
        with pytest.raises(ConfigError, match="GPUNN_THREADS"):
            net.train_step(x, t, "squared_error", opt)
    with pytest.raises(ConfigError, match="GPUNN_THREADS"):
        net.fit(x, t, loss="squared_error", epochs=1, progress=False)
    quiet_env.setenv("GPUNN_THREADS", "1")
    net.train_step(x, t, "squared_error", opt)
    assert threads.current() == 1
