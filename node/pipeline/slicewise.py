"""Per-slice work on (k, r, c) volumes spread over the CPUs.

The work runs on a pool of threads: scipy.ndimage and numpy release the interpreter lock in their array
work, so the slices of the lung steps run side by side, and the threads share the arrays without copying
them. (Forked child processes did the same work, but a process holding a study's DICOM headers forks slowly
and its children copy the pages that Python's reference counts touch: the lung step of a 300-slice study
took 16.8 s inside the analysis, 8.9 s with threads; docs/performance.md.) The functions given must not
write to arrays other threads read; they return their results. The result is that of one loop: every
slice's result depends on that slice alone.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

MAX_WORKERS = 16        # more threads than this gain little on a 300-slice series
SLICES_PER_SLAB = 8     # by_slabs: fewer slices per slab give no parallelism worth a thread


def workers() -> int:
    """Threads for per-slice work: the CPUs this process may run on, at most ``MAX_WORKERS``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _parallel(fn: Callable[[Any], T], items: list[Any], n: int) -> list[T]:
    """``[fn(item) for item in items]`` on ``n`` threads (the first error is raised)."""
    with ThreadPoolExecutor(n, thread_name_prefix="slicewise") as pool:
        return list(pool.map(fn, items))


def map_slices(fn: Callable[[int], T], ks: Iterable[int]) -> list[T]:
    """``[fn(k) for k in ks]``, computed on the worker threads."""
    ks = [int(k) for k in ks]
    n = min(workers(), len(ks))
    if n < 2:
        return [fn(k) for k in ks]
    return _parallel(fn, ks, n)


def by_slabs(fn: Callable[..., np.ndarray], *volumes: np.ndarray) -> np.ndarray:
    """``fn(*volumes)`` for an ``fn`` whose result on a slice depends on that slice alone, computed on slabs
    of consecutive slices on the worker threads and stacked again."""
    depth = volumes[0].shape[0]
    n = min(workers(), max(depth // SLICES_PER_SLAB, 1))
    if n < 2:
        return fn(*volumes)
    bounds = np.linspace(0, depth, n + 1).astype(int)
    parts = _parallel(lambda i: fn(*(v[bounds[i]:bounds[i + 1]] for v in volumes)), list(range(n)), n)
    return np.concatenate(parts, axis=0)
