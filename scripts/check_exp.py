"""Whether gpunn's transcription of NumPy's float32 exp (gpunn.cpuexp) gives NumPy's bits on this machine.

    python scripts/check_exp.py          # the probe the kernels run when they load, and 4 M random inputs
    python scripts/check_exp.py --all    # every one of the 2³² float32 inputs (about a minute)

Prints NumPy's version and CPU dispatch, the inputs checked and the first ones that differ; exits 1 if any do.
"""
from __future__ import annotations

import sys
import time

import click
import numpy


@click.command()
@click.option("--all", "everything", is_flag=True, help="Check all 2³² float32 bit patterns.")
def main(everything: bool) -> None:
    try:
        from numpy._core import _multiarray_umath as umath  # NumPy 2
    except ImportError:                                         # NumPy 1.26
        from numpy.core import _multiarray_umath as umath

    from gpunn import cpuexp
    on = [k for k, v in umath.__cpu_features__.items() if v and k in ("AVX2", "FMA3", "AVX512F", "AVX512_SKX")]
    click.echo(f"NumPy {numpy.__version__}; dispatch targets {', '.join(umath.__cpu_dispatch__)}; "
               f"CPU has {', '.join(on)}")
    t0, checked, wrong = time.perf_counter(), 0, []
    chunks = ((numpy.arange(s, s + (1 << 26), dtype=numpy.uint64) for s in range(0, 1 << 32, 1 << 26))
              if everything else [cpuexp.probe().view(numpy.uint32),
                                  numpy.random.default_rng(0).integers(0, 1 << 32, size=1 << 22, dtype=numpy.uint64)])
    for chunk in chunks:
        x = numpy.asarray(chunk).astype(numpy.uint32).view(numpy.float32)
        with numpy.errstate(all="ignore"):
            ref = numpy.exp(x)
        got = numpy.empty_like(x)
        cpuexp.exp_f32_array(x, got)
        bad = numpy.flatnonzero(ref.view(numpy.uint32) != got.view(numpy.uint32))
        wrong += [(x[i], ref[i], got[i]) for i in bad[:max(0, 10 - len(wrong))]]
        checked += x.size
    click.echo(f"{checked:,} inputs checked in {time.perf_counter() - t0:.0f} s; {len(wrong) and 'some' or 'none'} "
               f"differ" + "".join(f"\n  exp({v!r}): NumPy {r!r}, gpunn {g!r}" for v, r, g in wrong))
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
