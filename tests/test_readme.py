"""Every ```python block of the README runs alone, as written, in a fresh interpreter."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from helpers import pythonpath

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{k}" for k in range(len(BLOCKS))])
def test_readme_block_runs_alone(code, tmp_path):
    for extra in ("sklearn", "matplotlib", "onnxruntime", "safetensors"):   # a block that needs an extra imports it
        if f"import {extra}" in code or f"from {extra}" in code:
            pytest.importorskip(extra, reason=f"{extra} not installed: this README block needs the extra")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"GPUNN_DEVICE": "cpu", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": pythonpath()})
    assert run.returncode == 0, run.stderr[-2000:]
