"""gpunn's CUDA kernels run on the host: ``kernels.SOURCE`` compiled as plain C++ with a tiny CUDA emulation.

``launch(name, grid, block, args)`` has CuPy's ``RawKernel`` calling convention. Before it runs a
kernel it checks every argument against the kernel's own signature, parsed from the source: arrays
must have the kernel's element type and be C-contiguous, ``long long`` needs ``numpy.int64``, ``int``
needs ``numpy.int32``, ``T`` needs the scalar type of ``T``. A real GPU would take a wrong-sized scalar
silently and compute garbage; here it is an error naming the argument.

The launch then walks the whole grid, block by block. A kernel without warp shuffles runs every thread
of a block in turn, thread rows in descending ``threadIdx.y`` so that row 0 (which reads what the others
wrote to shared memory before ``__syncthreads()``) goes last: one legal schedule of those kernels (they
never wait on another block), so a wrong grid size or a kernel that misses an element shows up in the
results. A kernel with ``__shfl_xor_sync`` runs warp by warp, its 32 lanes as fibers (each on its own
stack) in lockstep from shuffle to shuffle: every lane publishes its value and yields, and once all 32
have, each reads its partner's. A lane that skips a shuffle another lane takes (a real GPU would hang or read
garbage) is reported as an error. ``__ldcg`` is a plain load and ``__threadfence()`` nothing: memory
order is what the SASS test in tests/test_kernels.py checks.
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
#include <string.h>
#include <setjmp.h>
#include <ucontext.h>
#include <functional>
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __syncthreads()
#define __threadfence()
#define __ldcg(p) (*(p))
static inline int atomicAdd(int* p, int v) { int old = *p; *p += v; return old; }   // blocks run one at a time
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, sizeof f); return f; }
static inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, sizeof d); return d; }

// The lanes of one warp as fibers, for kernels that shuffle (one warp at a time; they have no __syncthreads).
// Each lane's fiber is made once (makecontext) and runs warp after warp; switches are _setjmp/_longjmp
// between the stacks (no system call, unlike swapcontext), built without _FORTIFY_SOURCE's longjmp check.
static ucontext_t g_sched_uc, g_lane_uc[32];
static jmp_buf g_sched_jb, g_lane_jb[32];
static char g_lane_stack[32][1 << 16];
static unsigned long long g_lane_val[2][32];          // by the parity of the shuffle: a lane that runs ahead
static int g_lane, g_round[32], g_done[32], g_started[32], g_error;   // never overwrites an unread value
static Dim3 g_lane_idx[32];
static std::function<void()> g_body;

static void lane_yield(int lane) { if (!_setjmp(g_lane_jb[lane])) _longjmp(g_sched_jb, 1); }

template<typename T>
static T __shfl_xor_sync(unsigned, T v, int offset) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "a lane's value is at most 8 bytes");
    int lane = g_lane, parity = g_round[lane] & 1;
    memcpy(&g_lane_val[parity][lane], &v, sizeof(T));
    g_round[lane]++;
    lane_yield(lane);                                  // until every lane has reached this shuffle
    T r;
    memcpy(&r, &g_lane_val[parity][lane ^ offset], sizeof(T));
    return r;
}

static void lane_entry() {
    for (;;) {                                         // one warp per turn
        g_body();
        g_done[g_lane] = 1;
        lane_yield(g_lane);
    }
}

static void resume(int l) {
    g_lane = l;
    threadIdx = g_lane_idx[l];
    if (_setjmp(g_sched_jb)) return;                   // the lane yielded
    if (g_started[l]) _longjmp(g_lane_jb[l], 1);
    g_started[l] = 1;
    getcontext(&g_lane_uc[l]);
    g_lane_uc[l].uc_stack.ss_sp = g_lane_stack[l];
    g_lane_uc[l].uc_stack.ss_size = sizeof g_lane_stack[l];
    g_lane_uc[l].uc_link = nullptr;
    makecontext(&g_lane_uc[l], lane_entry, 0);
    swapcontext(&g_sched_uc, &g_lane_uc[l]);
}

// Runs g_body for the 32 lanes whose indices are in g_lane_idx, in lockstep from shuffle to shuffle.
static void run_warp() {
    for (int l = 0; l < 32; ++l) g_round[l] = g_done[l] = 0;
    for (;;) {
        for (int l = 0; l < 32; ++l)
            if (!g_done[l]) resume(l);
        int done = 0, r = -1, same = 1;
        for (int l = 0; l < 32; ++l) {
            done += g_done[l];
            if (!g_done[l]) { same &= (r < 0 || g_round[l] == r); r = g_round[l]; }
        }
        if (done == 32) return;
        if (done || !same) {                           // a lane skipped a shuffle the others took
            g_error = 1;
            for (int l = 0; l < 32; ++l) g_started[l] = 0;    // fresh fibers next time
            return;
        }
    }
}

extern "C" int emulation_error() { int e = g_error; g_error = 0; return e; }
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


def _body(name: str) -> str:
    """The text of kernel ``name``'s body in SOURCE."""
    src = kernels.SOURCE
    m = re.search(rf"__global__\s+void\s+{name}\s*\(", src)
    if m is None:
        raise KeyError(f"no kernel {name!r} in gpunn.kernels.SOURCE")
    i = j = src.index("{", m.end())
    depth = 0
    while depth or j == i:
        depth += {"{": 1, "}": -1}.get(src[j], 0)
        j += 1
    return src[i:j]


@functools.cache
def shuffles(name: str) -> bool:
    """Whether kernel ``name`` shuffles between lanes (itself or through SOURCE's ``warp_*`` helpers), and so
    runs warp by warp with its lanes as fibers. Such a kernel must not use ``__syncthreads()``: the fibers
    run one warp at a time."""
    body = _body(name)
    found = "__shfl" in body or "warp_" in body
    if found and "__syncthreads" in body:
        raise NotImplementedError(f"{name}: the emulation cannot run a kernel with both shuffles and __syncthreads")
    return found


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


_SEQUENTIAL = """
    for (unsigned k = 0; k < gz; ++k) for (unsigned j = 0; j < gy; ++j) for (unsigned i = 0; i < gx; ++i)
        for (unsigned tz = 0; tz < bz; ++tz) for (int ty = (int)by - 1; ty >= 0; --ty)
            for (unsigned tx = 0; tx < bx; ++tx) {{
            blockIdx = {{i, j, k}}; threadIdx = {{tx, (unsigned)ty, tz}};
            {expr}({call});
        }}"""

_WARPS = """
    g_body = [&]() {{ {expr}({call}); }};
    unsigned nt = bx * by * bz;
    for (unsigned k = 0; k < gz; ++k) for (unsigned j = 0; j < gy; ++j) for (unsigned i = 0; i < gx; ++i)
        for (unsigned w = 0; w < nt && !g_error; w += 32) {{
            blockIdx = {{i, j, k}};
            for (unsigned l = 0; l < 32; ++l) {{
                unsigned t = w + l;
                g_lane_idx[l] = {{t % bx, (t / bx) % by, t / (bx * by)}};
            }}
            run_warp();
        }}"""


def source() -> str:
    """The kernels plus one ``extern "C"`` launcher per exported instance (walks the whole grid)."""
    lines = [PRELUDE, kernels.SOURCE]
    for expr in kernels.name_expressions():
        name, _, params = instance(expr)
        decl = ", ".join(f"{t}{'*' if ptr else ''} {n}" for t, n, ptr in params)
        call = ", ".join(n for _, n, _ in params)
        walk = (_WARPS if shuffles(name) else _SEQUENTIAL).format(expr=expr, call=call)
        lines.append(f"""
extern "C" void {_symbol(expr)}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                                {decl}) {{
    gridDim = {{gx, gy, gz}}; blockDim = {{bx, by, bz}};{walk}
}}""")
    return "\n".join(lines)


@functools.cache
def library() -> ctypes.CDLL:
    """The emulation, compiled once per process (g++, no FMA contraction, like ``--fmad=false``)."""
    if GXX is None:
        raise RuntimeError("g++ is not installed: the kernel emulation cannot be built")
    d = Path(tempfile.mkdtemp(prefix="gpunn-emulation-"))
    (d / "emulated.cpp").write_text(source())
    r = subprocess.run([GXX, "-std=c++17", "-O1", "-ffp-contract=off", "-U_FORTIFY_SOURCE", "-fPIC", "-shared",
                        str(d / "emulated.cpp"), "-o", str(d / "libemulated.so")], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        raise RuntimeError("the kernel emulation did not compile:\n" + r.stderr[-3000:])
    lib = ctypes.CDLL(str(d / "libemulated.so"))
    for expr in kernels.name_expressions():
        _, _, params = instance(expr)
        fn = getattr(lib, _symbol(expr))
        fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p if p else _CTYPES[t] for t, _, p in params]
        fn.restype = None
    lib.emulation_error.restype = ctypes.c_int
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
    if shuffles(instance(expr)[0]) and (b[0] * b[1] * b[2]) % 32:
        raise ValueError(f"{expr}: block {block} is not whole warps, and the kernel shuffles over 32 lanes")
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
    lib = library()
    getattr(lib, _symbol(expr))(*values)
    if lib.emulation_error():
        raise RuntimeError(f"{expr}: the lanes of a warp did not all take the same shuffles (a GPU would hang)")
