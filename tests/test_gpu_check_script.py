"""scripts/gpu-check.sh, dry: every capped command and its limit, the worst case within 9 minutes, and the
order the card time is spent in (new tests, other tests, agreement check, benchmark)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 9 * 60


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> str:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("bash and coreutils' timeout are needed")
    out = tmp_path_factory.mktemp("gpu-check-out")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, GPU_CHECK_DRY="1", OUT=str(out)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout.split("== summary", 1)[0]


def test_the_worst_case_with_each_kill_grace_fits_in_nine_minutes(dry_run):
    """Each command gets SIGINT at its limit and SIGKILL ``grace`` seconds later: the sum of limit + grace
    over the commands the script runs (the sanitizer's loop counted per tool) is at most 9 minutes, and the
    figure the script prints is that sum."""
    caps = [(int(a), int(b)) for a, b in re.findall(r"^limit (\d+) grace (\d+):", dry_run, re.M)]
    worst = sum(a + b for a, b in caps)
    assert len(caps) == 9, dry_run
    assert worst <= BUDGET_S, caps
    assert f"worst case: {worst} s" in dry_run


def test_new_tests_first_then_agreement_then_benchmark(dry_run):
    lines = [ln for ln in dry_run.splitlines() if ln.startswith("limit ")]
    where = {key: next(i for i, ln in enumerate(lines) if key in ln) for key in
             ("tests/test_gpu_kernels.py", "--ignore=tests/test_gpu_kernels.py", "gpunn.cli check",
              "bench/gpu_check.py")}
    assert list(where) == sorted(where, key=where.get), where
    assert all("python3 -m pytest" in ln or "gpunn" in ln or "bench" in ln or "nvidia-smi" in ln
               or "compute-sanitizer" in ln or "python3 -c" in ln for ln in lines)
