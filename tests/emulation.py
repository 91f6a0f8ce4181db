"""gpunn's CUDA kernels run on the host: ``kernels.SOURCE`` compiled as plain C++ with a tiny CUDA emulation.

``launch(name, grid, block, args)`` has CuPy's ``RawKernel`` calling convention. Before it runs a
kernel it checks every argument against the kernel's own signature, parsed from the source: arrays
must have the kernel's element type and be C-contiguous, ``long long`` needs ``numpy.int64``, ``int``
needs ``numpy.int32``, ``T`` needs the scalar type of ``T``. A real GPU would take a wrong-sized scalar
silently and compute garbage; here it is an error naming the argument.

The launch then walks the whole grid: every block, every thread, in order, with the thread rows of a
block in descending ``threadIdx.y`` so that row 0 (which reads what the others wrote to shared memory
before ``__syncthreads()``) goes last. That is one legal schedule of the kernels here (they never wait
on another block), so a wrong grid size or a kernel that misses an element shows up in the results.
"""
from __future__ import annotations

import ctypes
import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy

from gpunn import kernels

GXX = shutil.which("g++")

PRELUDE = r"""
#include <math.h>
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __syncthreads()
#define __threadfence()
static inline int atomicAdd(int* p, int v) { int old = *p; *p += v; return old; }   // blocks run one at a time
"""

_KERNEL = re.compile(r"template\s*<([^>]*)>\s*__global__\s+void\s+(\w+)\s*\(([^)]*)\)", re.S)
_CTYPES = {"float": ctypes.c_float, "double": ctypes.c_double, "int": ctypes.c_int, "long long": ctypes.c_longlong}
_SCALARS = {"float": numpy.float32, "double": numpy.float64, "int": numpy.int32, "long long": numpy.int64}


def _params(text: str) -> list[tuple[str, str, bool]]:
    """'const T* __restrict__ b, long long n' -> [('T', 'b', True), ('long long', 'n', False)]."""
    out = []
    for p in (s.strip() for s in text.split(",")):
        words = p.replace("*", " * ").split()
        pointer = "*" in words
        name = words[-1]
        base = " ".join(w for w in words[:-1] if w not in ("const", "__restrict__", "*"))
        out.append((base, name, pointer))
    return out


@functools.cache
def signatures() -> dict[str, tuple[list[str], list[tuple[str, str, bool]]]]:
    """kernel name -> (template parameter names, [(type, name, is_pointer)]) from ``kernels.SOURCE``."""
    sigs = {}
    for tparams, name, params in _KERNEL.findall(kernels.SOURCE):
        tnames = [t.split()[-1] for t in tparams.split(",")]
        sigs[name] = (tnames, _params(params))
    return sigs


def instance(expr: str) -> tuple[str, list[str], list[tuple[str, str, bool]]]:
    """'act_bwd<float, 3>' -> ('act_bwd', ['float', '3'], parameters with T replaced by float)."""
    m = re.fullmatch(r"(\w+)<(.*)>", expr.strip())
    if m is None or m.group(1) not in signatures():
        raise KeyError(f"no kernel {expr!r} in gpunn.kernels.SOURCE")
    targs = [a.strip() for a in m.group(2).split(",")]
    tnames, params = signatures()[m.group(1)]
    subst = dict(zip(tnames, targs))
    return m.group(1), targs, [(subst.get(t, t), n, ptr) for t, n, ptr in params]


def _symbol(expr: str) -> str:
    return "launch_" + re.sub(r"\W+", "_", expr).strip("_")


def source() -> str:
    """The kernels plus one ``extern "C"`` launcher per exported instance (walks the whole grid)."""
    lines = [PRELUDE, kernels.SOURCE]
    for expr in kernels.name_expressions():
        _, _, params = instance(expr)
        decl = ", ".join(f"{t}{'*' if ptr else ''} {n}" for t, n, ptr in params)
        call = ", ".join(n for _, n, _ in params)
        lines.append(f"""
extern "C" void {_symbol(expr)}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                                {decl}) {{
    gridDim = {{gx, gy, gz}}; blockDim = {{bx, by, bz}};
    for (unsigned k = 0; k < gz; ++k) for (unsigned j = 0; j < gy; ++j) for (unsigned i = 0; i < gx; ++i)
        for (unsigned tz = 0; tz < bz; ++tz) for (int ty = (int)by - 1; ty >= 0; --ty)
            for (unsigned tx = 0; tx < bx; ++tx) {{
            blockIdx = {{i, j, k}}; threadIdx = {{tx, (unsigned)ty, tz}};
            {expr}({call});
        }}
}}""")
    return "\n".join(lines)


@functools.cache
def library() -> ctypes.CDLL:
    """The emulation, compiled once per process (g++, no FMA contraction, like ``--fmad=false``)."""
    if GXX is None:
        raise RuntimeError("g++ is not installed: the kernel emulation cannot be built")
    d = Path(tempfile.mkdtemp(prefix="gpunn-emulation-"))
    (d / "emulated.cpp").write_text(source())
    r = subprocess.run([GXX, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", str(d / "emulated.cpp"),
                        "-o", str(d / "libemulated.so")], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError("the kernel emulation did not compile:\n" + r.stderr[-3000:])
    lib = ctypes.CDLL(str(d / "libemulated.so"))
    for expr in kernels.name_expressions():
        _, _, params = instance(expr)
        fn = getattr(lib, _symbol(expr))
        fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p if p else _CTYPES[t] for t, _, p in params]
        fn.restype = None
    return lib


def _dim3(v, what: str) -> tuple[int, int, int]:
    if isinstance(v, int):
        v = (v,)
    if not isinstance(v, tuple) or not 1 <= len(v) <= 3 or not all(isinstance(x, int) and x >= 1 for x in v):
        raise TypeError(f"{what} must be a tuple of 1 to 3 positive ints; got {v!r}")
    return tuple(v) + (1,) * (3 - len(v))


def check_args(expr: str, grid, block, args) -> list:
    """The ctypes values for a launch of ``expr``, after checking each argument against its signature."""
    _, _, params = instance(expr)
    g, b = _dim3(grid, "grid"), _dim3(block, "block")
    if b[0] * b[1] * b[2] > 1024:
        raise ValueError(f"{expr}: block {block} has more than 1024 threads")
    if not isinstance(args, tuple) or len(args) != len(params):
        raise TypeError(f"{expr} takes {len(params)} arguments as a tuple; got {args!r:.200}")
    values = list(g) + list(b)
    for (t, name, pointer), a in zip(params, args):
        if pointer:
            if not isinstance(a, numpy.ndarray):
                raise TypeError(f"{expr}: argument {name} must be a device array; got {type(a).__name__}")
            if a.dtype != _SCALARS[t] or not a.flags.c_contiguous:
                raise TypeError(f"{expr}: argument {name} must be a C-contiguous {t} array; got {a.dtype}, "
                                f"c_contiguous={a.flags.c_contiguous}")
            values.append(a.ctypes.data)
        else:
            if type(a) is not _SCALARS[t]:
                raise TypeError(f"{expr}: argument {name} is {t} in the kernel, so it must be passed as "
                                f"numpy.{_SCALARS[t].__name__}; got {type(a).__name__} (a GPU would misread it)")
            values.append(a.item())
    return values


def launch(expr: str, grid, block, args) -> None:
    """Run kernel instance ``expr`` on the host, as ``RawModule.get_function(expr)(grid, block, args)``."""
    values = check_args(expr, grid, block, args)
    getattr(library(), _symbol(expr))(*values)
