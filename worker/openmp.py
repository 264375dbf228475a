"""The OpenMP runtime under torch's CPU kernels: one team of worker threads per stepping thread.

libgomp (torch's OpenMP on Linux) keeps a team of worker threads for every thread that ever ran a
parallel region, and counts all of them. When it manages more threads than the machine has cores, it
stops spinning between parallel regions (its "throttled" wait: a few hundred iterations, then sleep on a
futex), so every kernel starts by waking its workers and ends with them waiting for each other.

That happens whenever the model is loaded on one thread and stepped on another: the engine loop thread
of a server, a tensor-parallel rank's step channel. Served on the 2-core development machine the
stepping thread slept ~1,500 times a second and its worker ~2,600 times; after the hand-over, under 25
(docs/BENCHMARKS.md, "Engine speed under serving load").
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache

log = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # OpenMP 5.0's omp_pause_soft: threads may exit; state is rebuilt on next use
_RUNTIMES = ("libgomp", "libiomp", "libomp")


@cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP library loaded in this process (found in /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if any(name in line for name in _RUNTIMES)}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)  # the copy already loaded: dlopen returns its handle
        except OSError:
            continue
        if hasattr(library, "omp_pause_resource_all"):
            return library
    return None


def release_openmp_team() -> bool:
    """Let the calling thread's OpenMP worker threads exit (`omp_pause_resource_all`). Its next parallel
    kernel, if any, starts a fresh team. Call it on a thread that is done with parallel work while
    another thread runs the steps. Returns False when no OpenMP runtime with that call is loaded."""
    runtime = _runtime()
    if runtime is None:
        return False
    if runtime.omp_pause_resource_all(_OMP_PAUSE_SOFT) != 0:
        log.warning("the OpenMP runtime refused to release this thread's workers")
        return False
    return True
