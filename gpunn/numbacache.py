"""numba's on-disk cache of gpunn's CPU kernels (:mod:`gpunn.cpukernels`, :mod:`gpunn.cpuexp`), where a file
it cannot read is a cache miss.

numba keeps a function's compiled code in an index file (``.nbi``) and one data file per signature (``.nbc``),
next to the source or in its user cache folder (``NUMBA_CACHE_DIR``), and reads them back with pickle. Garbage
in either (a disk or copy fault, a truncated file, an edit) raises out of the function's first call
(``UnpicklingError``, ``EOFError``, ...) in this process and in every later one: numba catches none of it
and keeps the unreadable index. :func:`cached_njit` gives each dispatcher a cache that takes any failure to
read as a miss: the index is emptied, the function compiled as without a cache, and the cache written
afresh, so the next process reads it again. What a cache holds is numba's own format: the only check of
its contents is numba's (its version, the source file's time stamp and size).

Imported by the kernels' modules once numba has imported; it imports numba only when called.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["cached_njit"]


def cached_njit(njit: Callable[..., Any], fn: Any, **options: Any) -> Any:
    """``njit(cache=True, **options)(fn)``: numba's dispatcher of ``fn``, its compiled code cached on disk, a
    cache file it cannot read being a miss (:func:`_miss_on_unreadable`). Where numba finds nowhere to write
    that cache (the package's folder read-only and no writable user cache folder, as for a system-wide install
    used from a container without a home), numba refuses ``cache=True`` at once ("cannot cache function ...:
    no locator available"): then the dispatcher without the cache, compiling in each process, the same code."""
    try:
        dispatcher = njit(cache=True, **options)(fn)
    except RuntimeError as exc:
        if "cannot cache" not in str(exc):
            raise
        return njit(**options)(fn)
    plain, tolerant = _miss_on_unreadable()
    if type(getattr(dispatcher, "_cache", None)) is plain:      # numba's own cache class, as this numba has it
        dispatcher._cache.__class__ = tolerant
    return dispatcher


@functools.cache
def _miss_on_unreadable() -> tuple[type, type]:
    """(numba's FunctionCache, its subclass whose unreadable files are a miss)."""
    from numba.core.caching import FunctionCache

    class MissOnUnreadable(FunctionCache):
        """numba's cache of one function, a file it cannot read being a miss: the index emptied, so that the
        compiled code is saved into a fresh one."""

        def load_overload(self, sig: Any, target_context: Any) -> Any:
            try:
                return super().load_overload(sig, target_context)
            except Exception:               # garbage in the index or a data file: pickle's or numba's error
                try:
                    self.flush()            # an empty index: the save after the compile starts afresh
                except OSError:
                    pass
                return None

        def save_overload(self, sig: Any, data: Any) -> None:
            try:
                super().save_overload(sig, data)
            except Exception:               # an index still unreadable (not emptied above): nothing saved, the
                pass                        # code compiled in this process is the same; the next one compiles
    return FunctionCache, MissOnUnreadable
