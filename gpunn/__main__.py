"""``python -m gpunn``: the ``gpunn`` command line (:mod:`gpunn.cli`)."""
from __future__ import annotations

from .cli import main

if __name__ == "__main__":  # pragma: no cover - run as a program
    main(prog_name="gpunn")
