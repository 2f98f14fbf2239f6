"""Global configuration and the shared poller runtime.

Like Netpoll, all EventLoops and Dialers of a process share one set of
pollers (``num_loops`` threads) and one worker pool. They start on first use;
:func:`configure` sets them up before that.
"""
from __future__ import annotations

import atexit
import enum
import os
import random
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Union

from netpoll import _validate
from netpoll._core.connection import set_buffer_size as _set_buffer_size
from netpoll._core.connection import bind_pool
from netpoll._core.poller import Poller, handoff_stats, set_handoff
from netpoll._core.runner import WorkerPool

__all__ = ["LoadBalance", "configure", "set_num_loops", "set_load_balance", "stats"]

Runner = Union[str, Callable[[Callable[[], None]], Any]]

# Bounds of the global settings: beyond them a value is a mistake, not a
# configuration (a poller is a thread; a chunk is allocated per buffer).
_MAX_LOOPS = 1024
_MAX_BUFFER_SIZE = 64 << 20
_MAX_POOL_SIZE = 4096
_MAX_THREADS = 65536


class LoadBalance(enum.Enum):
    """How new connections are spread over the pollers."""

    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


def _check_runner(runner: Runner) -> Runner:
    if runner in ("pool", "inline", "auto") or callable(runner):
        return runner
    raise ValueError(f"runner must be 'pool', 'inline', 'auto' or a callable, got {runner!r}")


def _default_num_loops() -> int:
    """1 poller with the GIL (one poller saturates the core Python runs on);
    on a free-threaded interpreter with the GIL off, one per usable core."""
    gil_enabled = getattr(sys, "_is_gil_enabled", None)
    if gil_enabled is None or gil_enabled():
        return 1
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, _MAX_LOOPS))


class _Runtime:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.num_loops = _default_num_loops()
        self.load_balance = LoadBalance.ROUND_ROBIN
        self.buffer_size = 8192
        self.runner: Runner = "auto"
        self.pool_size = 16
        self.pollers: List[Poller] = []
        self.pool: Optional[WorkerPool] = None
        self.started = False
        self._rr = 0

    def ensure_started(self) -> None:
        if self.started:
            return
        with self.lock:
            if self.started:
                return
            self._grow(self.num_loops)
            self.started = True

    def _grow(self, n: int) -> None:
        while len(self.pollers) < n:
            p = Poller(len(self.pollers))
            p.start()
            self.pollers.append(p)

    def get_pool(self) -> WorkerPool:
        if self.pool is None:
            with self.lock:
                if self.pool is None:
                    pool = WorkerPool(self.pool_size)
                    bind_pool(pool)
                    self.pool = pool
        return self.pool

    def pick(self) -> Poller:
        self.ensure_started()
        n = self.num_loops
        if self.load_balance is LoadBalance.RANDOM:
            return self.pollers[random.randrange(n)]
        self._rr = (self._rr + 1) % n
        return self.pollers[self._rr]

    def shutdown(self) -> None:
        for p in self.pollers:
            p.stop(1.0)
        if self.pool is not None:
            self.pool.stop(1.0)


_runtime = _Runtime()
atexit.register(_runtime.shutdown)


def configure(
    num_loops: Optional[int] = None,
    load_balance: Optional[LoadBalance] = None,
    buffer_size: Optional[int] = None,
    runner: Optional[Runner] = None,
    pool_size: Optional[int] = None,
    handoff_threshold: Optional[float] = None,
    max_threads: Optional[int] = None,
) -> None:
    """Set global options. Call before the first EventLoop or dial.

    num_loops: poller threads, 1..1024 (default 1 with the GIL: one poller
    saturates a core; on free-threaded CPython with the GIL off, one per
    core the process may run on, ``os.sched_getaffinity``).
    buffer_size: preferred size of new buffer chunks in bytes, 1..64 MiB.
    runner: default runner for EventLoops and dialed connections ("auto"
    unless set).
    pool_size: worker threads of the "pool" runner, 1..4096 (default 16).
    handoff_threshold: runner "auto": seconds a handler may run on a poller
    thread before the poller's loop passes to a standby thread (default
    0.002; it happens within two thresholds). netpoll's own waits, a read
    waiting for bytes or a flush waiting for the peer, hand off at once, and
    so does the next run of a connection whose handler ran longer than 0.5 ms
    twice in a row. max_threads: runner "auto": cap on the
    threads that lead pollers or wait as standbys, 2..65536 (default 256;
    the pool grows on demand and shrinks after 10 s idle). Both may be
    changed at any time.

    Every argument is checked before any is applied: a call that raises
    (TypeError, ValueError, or RuntimeError for a pool_size once the pool
    runs) changes nothing.
    """
    if num_loops is not None:
        num_loops = _validate.size(num_loops, "num_loops", minimum=1, maximum=_MAX_LOOPS)
    if load_balance is not None:
        _check_load_balance(load_balance)
    if buffer_size is not None:
        buffer_size = _validate.size(buffer_size, "buffer_size", minimum=1,
                                     maximum=_MAX_BUFFER_SIZE)
    if runner is not None:
        runner = _check_runner(runner)
    if handoff_threshold is not None:
        handoff_threshold = _validate.seconds(handoff_threshold, "handoff_threshold",
                                              none_ok=False, inf_ok=False, zero_ok=False)
    if max_threads is not None:
        max_threads = _validate.size(max_threads, "max_threads", minimum=2,
                                     maximum=_MAX_THREADS)
    if pool_size is not None:
        pool_size = _validate.size(pool_size, "pool_size", minimum=1, maximum=_MAX_POOL_SIZE)
        if _runtime.pool is not None:
            raise RuntimeError(
                "the worker pool is already running; configure() it before first use")
    # Only starting pollers can still fail (no thread for one): it goes first,
    # and set_num_loops leaves num_loops as it was when it does.
    if num_loops is not None:
        set_num_loops(num_loops)
    if load_balance is not None:
        _runtime.load_balance = load_balance
    if buffer_size is not None:
        _runtime.buffer_size = buffer_size
        _set_buffer_size(buffer_size)
    if runner is not None:
        _runtime.runner = runner
    if pool_size is not None:
        _runtime.pool_size = pool_size
    if handoff_threshold is not None or max_threads is not None:
        set_handoff(handoff_threshold, max_threads)


def set_num_loops(n: int) -> None:
    """Use n poller threads (1 <= n <= 1024). More can be added while running."""
    n = _validate.size(n, "num_loops", minimum=1, maximum=_MAX_LOOPS)
    with _runtime.lock:
        if _runtime.started:
            _runtime._grow(n)
        # After the pollers exist: pick() indexes them by num_loops.
        _runtime.num_loops = n


def set_load_balance(lb: LoadBalance) -> None:
    """Spread new connections over pollers by round robin or at random."""
    _check_load_balance(lb)
    _runtime.load_balance = lb


def _check_load_balance(lb: Any) -> None:
    if not isinstance(lb, LoadBalance):
        raise TypeError("load_balance must be a netpoll.LoadBalance")


def stats() -> Dict[str, Any]:
    """Figures of the shared runtime, for diagnostics (not Reactors: see
    ``Reactor.stats()``).

    ``connections``: open connections on the pollers (EventLoop and dialed);
    ``timers``: timers armed on the pollers' heaps (idle timeouts and the
    like); ``pollers``: each poller's counters, with its own ``connections``;
    ``pool``: the worker pool (None before first use): size, queued tasks,
    workers running a task; ``handoff``: runner "auto"'s standby threads
    (threads, idle, cap, threshold); ``buffers``: the chunk pool (chunks and bytes in
    use and cached, per size class)."""
    from netpoll._core.connection import Connection
    from netpoll._core.linkbuffer import pool_stats

    pollers = []
    for p in list(_runtime.pollers):
        s = p.stats()
        s["connections"] = sum(1 for op in p.operators() if isinstance(op, Connection))
        pollers.append(s)
    pool = _runtime.pool
    return {
        "num_loops": _runtime.num_loops,
        "connections": sum(s["connections"] for s in pollers),
        "timers": sum(s["timers"] for s in pollers),
        "pollers": pollers,
        "pool": None if pool is None else {
            "size": pool.size, "pending": pool.pending(), "active": pool.active()},
        "handoff": handoff_stats(),
        "buffers": pool_stats(),
    }


def runtime() -> _Runtime:
    return _runtime
