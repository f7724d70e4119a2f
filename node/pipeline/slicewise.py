"""Per-slice work on (k, r, c) volumes spread over the CPUs.

The work runs in forked child processes, which see the parent's arrays as they are at the call (copy on
write) and send back only their results through a pipe. Threads would share the interpreter lock: the
per-slice steps are many numpy and scipy calls of a millisecond or less each, and threads spend their time
waiting for the lock (no gain measured on 16 cores). ``os.fork`` is called directly, not through
``multiprocessing``, which forbids children to the node's (daemonic) worker process. The result is that of
one loop: every slice's result depends on that slice alone. Where fork is not available, or there is one
CPU, the loop runs in this process.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

MAX_WORKERS = 16        # more processes than this gain little on a 300-slice series
SLICES_PER_SLAB = 8     # by_slabs: fewer slices per slab give no parallelism worth a process


def workers() -> int:
    """Processes for per-slice work: the CPUs this process may run on, at most ``MAX_WORKERS``; 1 where
    processes cannot be forked."""
    if not hasattr(os, "fork"):
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _child(fn: Callable[[Any], Any], share: list[Any], write_fd: int) -> None:
    """In a forked child: ``fn`` of every item of ``share``, pickled to ``write_fd``; never returns."""
    status = 0
    try:
        try:
            message: tuple[str, Any] = ("ok", [fn(item) for item in share])
        except BaseException as exc:  # sent to the parent, which raises it
            message = ("error", exc)
        with os.fdopen(write_fd, "wb") as out:
            pickle.dump(message, out, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _parallel(fn: Callable[[Any], T], items: list[Any], n: int) -> list[T]:
    """``[fn(item) for item in items]`` in ``n`` forked children, each with every n-th item."""
    shares = [items[i::n] for i in range(n)]
    children = []
    for share in shares:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(fn, share, write_fd)
        os.close(write_fd)
        children.append((pid, read_fd))
    outputs = []
    for pid, read_fd in children:  # every child read and reaped before anything is raised
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        outputs.append((os.waitpid(pid, 0)[1], data))
    messages = []
    for status, data in outputs:
        if status != 0 or not data:
            raise RuntimeError(f"a per-slice child process ended with status {status}")
        messages.append(pickle.loads(data))
    results: list[Any] = [None] * len(items)
    for i, (kind, payload) in enumerate(messages):
        if kind == "error":
            raise payload
        results[i::n] = payload
    return results


def map_slices(fn: Callable[[int], T], ks: Iterable[int]) -> list[T]:
    """``[fn(k) for k in ks]``, computed in child processes: ``fn`` sees the arrays as they are now, and
    what it writes to them stays in its process (return the results)."""
    ks = [int(k) for k in ks]
    n = min(workers(), len(ks))
    if n < 2:
        return [fn(k) for k in ks]
    return _parallel(fn, ks, n)


def by_slabs(fn: Callable[..., np.ndarray], *volumes: np.ndarray) -> np.ndarray:
    """``fn(*volumes)`` for an ``fn`` whose result on a slice depends on that slice alone, computed on slabs
    of consecutive slices in child processes and stacked again."""
    depth = volumes[0].shape[0]
    n = min(workers(), max(depth // SLICES_PER_SLAB, 1))
    if n < 2:
        return fn(*volumes)
    bounds = np.linspace(0, depth, n + 1).astype(int)
    parts = _parallel(lambda i: fn(*(v[bounds[i]:bounds[i + 1]] for v in volumes)), list(range(n)), n)
    return np.concatenate(parts, axis=0)
