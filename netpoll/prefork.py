"""Prefork: one address served by N processes (``netpoll.serve``).

On a GIL build one process runs Python handlers on one core at a time;
``serve()`` forks N worker processes, each with its own pollers, worker pool
and listening socket, under a supervisor process that restarts workers that
die and turns SIGTERM/SIGINT into a graceful shutdown of all of them.

How workers start: with ``os.fork()`` from a supervisor that has started no
thread of its own (it refuses to run once netpoll's pollers or worker pool
run in the calling process), so nothing a worker inherits is a lock held by
a thread that does not exist in the child; ``on_request`` may be any
callable, a lambda or a closure included (nothing is pickled). Every worker
then builds its pollers on first use, as any netpoll process does. fork()
makes this POSIX-only.

How the address is shared:

- TCP on Linux (``reuse_port=None`` or ``True``): the supervisor binds the
  address with ``SO_REUSEPORT`` and does not listen on it (so it takes no
  connections, but port 0 is resolved once and the port stays reserved
  while workers come and go); each worker binds its own ``SO_REUSEPORT``
  socket to that exact address and listens: the kernel spreads new
  connections over the workers' sockets.
- Unix sockets, ``reuse_port=False``, or systems without ``SO_REUSEPORT``:
  the supervisor creates one listening socket and the workers inherit it and
  all accept from it. A worker that stops only stops accepting; the shared
  socket keeps listening for the others.

The supervisor is a plain loop over ``select()`` on a signal pipe and never
runs netpoll code itself. A worker that exits or dies while the server is not
shutting down is replaced (logged through the ``netpoll`` logger, at
``WARNING``), after a back-off: 0.1 s, doubled for every further worker of
that slot that lived less than 10 s, at most 5 s. SIGTERM or SIGINT to the
supervisor (Ctrl-C reaches the workers too: they treat SIGINT as SIGTERM)
starts the graceful shutdown:

1. the supervisor sends SIGTERM to every worker; each worker calls
   ``EventLoop.shutdown(shutdown_timeout)``: it stops accepting, lets running
   handlers finish, closes its connections, and exits;
2. a worker still alive ``shutdown_timeout + 3`` seconds after the signal
   (``shutdown_timeout`` for the handlers, 3 s for the exit itself) is killed
   with SIGKILL; ``shutdown_timeout=None`` waits for ever;
3. a second SIGTERM/SIGINT during the shutdown kills the workers at once;
4. ``serve()`` returns ``None`` once every worker has exited (and been
   reaped), after the supervisor's listening socket is closed.

A worker whose supervisor disappears without that shutdown (SIGKILL to the
supervisor) shuts itself down the same way: on Linux it asks for SIGTERM on
its parent's death (``prctl(PR_SET_PDEATHSIG)``), and everywhere it watches a
pipe that only the supervisor holds open.

Workers end with ``os._exit()``: atexit handlers registered by the program
before ``serve()`` run in the supervisor only, not once per worker.

The Reactor: :func:`supervise` runs any worker, for instance a
:class:`netpoll.Reactor` with ``Acceptor(..., reuse_port=True)`` in each
process (see ``examples/prefork_server.py`` and :func:`supervise`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from netpoll import _validate
from netpoll.eventloop import EventLoop
from netpoll._tlsargs import server_handshake_timeout
from netpoll.listener import (
    Listener, create_listener, parse_address,
)

__all__ = ["serve", "supervise", "Worker"]

log = logging.getLogger("netpoll")

_MAX_PROCESSES = 1024
_RESTART_MIN = 0.1        # first back-off of a slot, seconds
_RESTART_MAX = 5.0        # back-off ceiling
_HEALTHY = 10.0           # a worker that lived this long resets its slot's back-off
_KILL_GRACE = 3.0         # after shutdown_timeout, for the worker's own exit
_PR_SET_PDEATHSIG = 1     # <linux/prctl.h>
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_ALL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


class Worker(Protocol):
    """What the ``setup()`` given to :func:`supervise` returns, in each worker."""

    def run(self) -> None:
        """Serve; block until stop() has finished (called in the worker's main thread)."""

    def stop(self, timeout: Optional[float]) -> None:
        """Shut down gracefully within `timeout` seconds (from another thread;
        possibly before run() was reached)."""


def _noop(signum: int, frame: Any) -> None:
    """A Python-level handler, so that the C handler writes the wakeup fd."""


def _set_parent_death_signal(sig: int) -> None:
    """Linux: deliver `sig` to this process when its parent dies (best effort:
    the pipe watched by every worker covers the other systems)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _netpoll_threads() -> List[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("netpoll-")]


class _Slot:
    __slots__ = ("index", "pid", "started", "fails", "restart_at")

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.started = 0.0
        self.fails = 0
        self.restart_at: Optional[float] = 0.0     # spawn now


class _Supervisor:
    def __init__(self, setup: Callable[[], Worker], processes: int,
                 shutdown_timeout: Optional[float],
                 on_ready: Optional[Callable[[], Any]]) -> None:
        self.setup = setup
        self.processes = processes
        self.shutdown_timeout = shutdown_timeout
        self.on_ready = on_ready
        self.slots = [_Slot(i) for i in range(processes)]
        self.by_pid: Dict[int, _Slot] = {}
        self.pid = os.getpid()
        self.stopping = False
        self.kill_at: Optional[float] = None
        self.ready = 0
        self.announced = False

    # -- the supervisor ----------------------------------------------------

    def run(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("serve()/supervise() must be called from the main thread "
                               "(it handles SIGTERM and SIGINT)")
        running = _netpoll_threads()
        if running:
            raise RuntimeError(
                "serve()/supervise() forks its workers, so it must run before this process "
                f"starts any netpoll poller or worker pool (running: {', '.join(running)})")
        if threading.active_count() > 1:
            warnings.warn("serve()/supervise() forks worker processes while other threads run: "
                          "locks they hold stay locked in the workers", RuntimeWarning,
                          stacklevel=3)
        self.sig_r, self.sig_w = os.pipe()
        self.ready_r, self.ready_w = os.pipe()
        # The workers hold the read end; only the supervisor holds the write
        # end, so the workers read EOF when the supervisor is gone.
        self.death_r, self.death_w = os.pipe()
        for fd in (self.sig_r, self.sig_w, self.ready_r):
            os.set_blocking(fd, False)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
        old_handlers = {s: signal.getsignal(s) for s in _ALL_SIGNALS}
        old_wakeup = -1
        try:
            for s in _ALL_SIGNALS:
                signal.signal(s, _noop)
            old_wakeup = signal.set_wakeup_fd(self.sig_w)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            self._loop()
        finally:
            try:
                self._kill_all()
            finally:
                # Wakeup fd first: a signal arriving now meets _noop and no closed fd.
                signal.set_wakeup_fd(old_wakeup)
                for s, h in old_handlers.items():
                    signal.signal(s, h if h is not None else signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                for fd in (self.sig_r, self.sig_w, self.ready_r, self.ready_w,
                           self.death_r, self.death_w):
                    os.close(fd)

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            if not self.stopping:
                for slot in self.slots:
                    if slot.pid == 0 and slot.restart_at is not None and slot.restart_at <= now:
                        self._spawn(slot)
            elif not self.by_pid:
                return
            elif self.kill_at is not None and now >= self.kill_at:
                log.warning("prefork: %d worker(s) still running %.1f s after shutdown began: "
                            "SIGKILL", len(self.by_pid),
                            (self.shutdown_timeout or 0.0) + _KILL_GRACE)
                self._signal_all(signal.SIGKILL)
                self.kill_at = None
            readable, _, _ = select.select([self.sig_r, self.ready_r], [], [], self._timeout())
            if self.sig_r in readable:
                self._on_signals()
            if self.ready_r in readable:
                self._on_ready()
            self._reap()

    def _timeout(self) -> Optional[float]:
        times = [s.restart_at for s in self.slots
                 if not self.stopping and s.pid == 0 and s.restart_at is not None]
        if self.stopping and self.kill_at is not None:
            times.append(self.kill_at)
        if not times:
            # SIGCHLD wakes the loop; the period only bounds a lost wake-up.
            return 1.0
        return max(0.0, min(min(times) - time.monotonic(), 1.0))

    def _on_signals(self) -> None:
        try:
            data = os.read(self.sig_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in _STOP_SIGNALS:
                if not self.stopping:
                    log.info("prefork: %s: shutting down %d worker(s)",
                             signal.Signals(signum).name, len(self.by_pid))
                    self.stopping = True
                    if self.shutdown_timeout is not None:
                        self.kill_at = time.monotonic() + self.shutdown_timeout + _KILL_GRACE
                    self._signal_all(signal.SIGTERM)
                else:
                    log.warning("prefork: %s during shutdown: killing the workers",
                                signal.Signals(signum).name)
                    self._signal_all(signal.SIGKILL)

    def _on_ready(self) -> None:
        try:
            data = os.read(self.ready_r, 512)
        except BlockingIOError:
            return
        self.ready += len(data)
        if not self.announced and not self.stopping and self.ready >= self.processes:
            self.announced = True
            if self.on_ready is not None:
                self.on_ready()

    def _reap(self) -> None:
        for pid, slot in list(self.by_pid.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:        # reaped elsewhere (a SIGCHLD=SIG_IGN caller...)
                done, status = pid, 0
            if done == 0:
                continue
            del self.by_pid[pid]
            slot.pid = 0
            lived = time.monotonic() - slot.started
            how = (f"killed by {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
                   if os.WIFSIGNALED(status) else
                   f"exit status {os.waitstatus_to_exitcode(status)}")
            if self.stopping:
                log.info("prefork: worker %d (pid %d) exited: %s", slot.index, pid, how)
                continue
            slot.fails = 0 if lived >= _HEALTHY else slot.fails + 1
            delay = min(_RESTART_MIN * 2 ** max(slot.fails - 1, 0), _RESTART_MAX)
            slot.restart_at = time.monotonic() + delay
            log.warning("prefork: worker %d (pid %d) %s after %.1f s; restarting in %.1f s",
                        slot.index, pid, how, lived, delay)

    def _signal_all(self, sig: int) -> None:
        for pid in self.by_pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _kill_all(self) -> None:
        """Leave no worker behind (an exception in the supervisor's loop)."""
        if not self.by_pid:
            return
        self._signal_all(signal.SIGKILL)
        for pid in list(self.by_pid):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            del self.by_pid[pid]

    def _spawn(self, slot: _Slot) -> None:
        # Signals stay blocked across fork() until the child has its own handlers:
        # a SIGTERM sent to a brand-new worker is then handled by the worker.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(slot, old_mask)      # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        slot.pid = pid
        slot.started = time.monotonic()
        slot.restart_at = None
        self.by_pid[pid] = slot
        log.info("prefork: worker %d started (pid %d)", slot.index, pid)

    # -- a worker (after fork) ---------------------------------------------

    def _child(self, slot: _Slot, mask: Any) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for fd in (self.sig_r, self.sig_w, self.ready_r, self.death_w):
                os.close(fd)
            sig_r, sig_w = os.pipe()
            os.set_blocking(sig_w, False)
            for s in _STOP_SIGNALS:
                signal.signal(s, _noop)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.set_wakeup_fd(sig_w)
            _set_parent_death_signal(signal.SIGTERM)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if os.getppid() != self.pid:
                os._exit(0)                # the supervisor died before prctl()
            worker = self.setup()
            os.write(self.ready_w, b"R")
            os.close(self.ready_w)
            stopper = threading.Thread(target=self._stop_when_told,
                                       args=(worker, sig_r, self.death_r),
                                       name="prefork-stop", daemon=True)
            stopper.start()
            worker.run()
            # run() may return before stop() has returned (or raised TimeoutError).
            stopper.join(None if self.shutdown_timeout is None else self.shutdown_timeout + 1)
            code = 0
        except BaseException:     # noqa: BLE001 - a worker reports and exits, never unwinds
            log.exception("prefork: worker %d failed", slot.index)
        finally:
            try:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _stop_when_told(self, worker: Worker, sig_r: int, death_r: int) -> None:
        # Other signals the program handles also write the wakeup fd: skip them.
        while True:
            readable, _, _ = select.select([sig_r, death_r], [], [])
            if death_r in readable:
                break                      # EOF: the supervisor is gone
            if any(b in _STOP_SIGNALS for b in os.read(sig_r, 512)):
                break
        try:
            worker.stop(self.shutdown_timeout)
        except TimeoutError as e:
            log.warning("prefork: worker pid %d: %s", os.getpid(), e)
        except Exception:  # noqa: BLE001
            log.exception("prefork: worker pid %d: stop failed", os.getpid())


def supervise(setup: Callable[[], Worker], processes: Optional[int] = None, *,
              shutdown_timeout: Optional[float] = 5.0,
              on_ready: Optional[Callable[[], Any]] = None) -> None:
    """Run ``setup()`` in `processes` forked workers and supervise them; blocks.

    In each worker, ``setup()`` returns a :class:`Worker`: an object with
    ``run()`` (serves, blocking, in the worker's main thread) and
    ``stop(timeout)`` (called from another thread of the worker on SIGTERM,
    SIGINT or the supervisor's death; it makes run() return). Workers that
    die are restarted, SIGTERM/SIGINT shut all down gracefully within
    `shutdown_timeout` seconds (see the module's documentation).
    ``on_ready()`` runs in the supervisor once every first worker's
    ``setup()`` has returned. processes=None: the cores this process may
    run on (``os.sched_getaffinity``). Call it from the main thread, before
    anything in this process has started netpoll's pollers.

    The Reactor recipe (each worker its own SO_REUSEPORT sockets; the port is
    reserved first so that every worker binds the same one)::

        hold = socket.socket()
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        hold.bind(("127.0.0.1", 0))          # bound, never listening
        port = hold.getsockname()[1]

        class ReactorWorker:
            def __init__(self):
                self.reactor = netpoll.Reactor(poll_num=1)
                netpoll.Acceptor(self.reactor, ("127.0.0.1", port), Echo,
                                 reuse_port=True)
            def run(self):
                self.reactor.run()
            def stop(self, timeout):
                self.reactor.stop()

        netpoll.prefork.supervise(ReactorWorker, processes=2)
    """
    if not callable(setup):
        raise TypeError("setup must be callable (it returns the worker)")
    _supervisor(setup, processes, shutdown_timeout, on_ready).run()


def _supervisor(setup: Callable[[], Worker], processes: Optional[int],
                shutdown_timeout: Any, on_ready: Any) -> _Supervisor:
    if processes is None:
        processes = _cores()
    processes = _validate.size(processes, "processes", minimum=1, maximum=_MAX_PROCESSES)
    shutdown_timeout = _validate.seconds(shutdown_timeout, "shutdown_timeout")
    if on_ready is not None and not callable(on_ready):
        raise TypeError("on_ready must be callable")
    if not hasattr(os, "fork"):
        raise RuntimeError("prefork needs os.fork() (POSIX)")
    return _Supervisor(setup, processes, shutdown_timeout, on_ready)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _SharedListener(Listener):
    """A listening socket inherited by every worker: stopping one worker must
    not stop the others, nor remove a Unix socket file the supervisor owns."""

    def _stop_listening(self) -> None:
        pass

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._sock.close()


class _LoopWorker:
    def __init__(self, loop: EventLoop, listener: Listener) -> None:
        self.loop = loop
        self.listener = listener
        self.stopping = False

    def run(self) -> None:
        try:
            self.loop.serve(self.listener)
        except RuntimeError:
            if not self.stopping:          # else stop() came before serve() started
                raise

    def stop(self, timeout: Optional[float]) -> None:
        self.stopping = True
        self.loop.shutdown(timeout)


def _tcp_socket(family: int, network: str, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and network == "tcp6":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _reserve(network: str, host: str, port: int) -> socket.socket:
    """A SO_REUSEPORT socket bound (not listening) to the address: it resolves
    port 0 once and keeps the port while workers come and go."""
    family = parse_address(network, (host, port))[0]
    last: Optional[OSError] = None
    for fam, _, _, _, sockaddr in socket.getaddrinfo(host or None, port, family,
                                                     socket.SOCK_STREAM, 0, socket.AI_PASSIVE):
        sock = _tcp_socket(fam, network, True)
        try:
            sock.bind(sockaddr)
        except OSError as e:
            sock.close()
            last = e
            continue
        return sock
    raise last if last is not None else OSError(f"cannot bind {host!r}:{port}")


def serve(on_request: Callable[[Any, Any], None], address: Any,
          processes: Optional[int] = None, network: str = "tcp", *,
          on_ready: Optional[Callable[[Any], Any]] = None,
          shutdown_timeout: Optional[float] = 5.0,
          reuse_port: Optional[bool] = None, backlog: int = 1024,
          ssl: Any = None, ssl_handshake_timeout: Optional[float] = None,
          **eventloop_options: Any) -> None:
    """Serve `address` from `processes` worker processes; blocks until shutdown.

    Each worker runs ``EventLoop(on_request, **eventloop_options)`` with its
    own pollers on its own listening socket: with ``SO_REUSEPORT`` on Linux
    for TCP (``reuse_port=None``, the default, or True), else one listening
    socket created here and inherited by all (Unix sockets,
    ``reuse_port=False``, other systems). processes=None: one per core this
    process may run on (``os.sched_getaffinity``); processes=1 still runs one
    supervised worker process (restarted if it dies), never the server in
    the calling process. network: "tcp", "tcp4", "tcp6" or "unix", as for
    :func:`create_listener`; backlog, ssl and ssl_handshake_timeout likewise
    (TLS: every worker serves with the same context).

    Workers are forked (``os.fork()``) from this process, which must be the
    main thread and must not have started netpoll's pollers yet
    (RuntimeError); ``on_request`` may be any callable, and settings made
    with :func:`configure` before ``serve()`` apply in every worker.

    on_ready(addr) runs in this process once every worker listens; addr is
    the bound (host, port) (the port the OS chose for port 0) or the Unix
    socket path. SIGTERM or SIGINT to this process shuts the server down:
    every worker calls ``EventLoop.shutdown(shutdown_timeout)`` (running
    handlers finish; default 5 s, None: no limit) and a worker still alive
    ``shutdown_timeout`` + 3 s after the signal is killed. A worker that
    dies is restarted after a back-off (0.1 s doubling to 5 s while workers
    keep dying young), logged on the ``netpoll`` logger; workers whose
    supervisor is killed shut down by themselves. Returns None once every
    worker has exited. POSIX only. See ``netpoll.prefork`` for details and
    :func:`netpoll.prefork.supervise` for the Reactor.
    """
    loop = EventLoop(on_request, **eventloop_options)   # checks the options, starts nothing
    if reuse_port is not None and not isinstance(reuse_port, bool):
        raise TypeError("reuse_port must be a bool or None")
    backlog = _validate.size(backlog, "backlog", maximum=2 ** 31 - 1)
    family, addr = parse_address(network, address)
    if on_ready is not None and not callable(on_ready):
        raise TypeError("on_ready must be callable")
    tls: Dict[str, Any] = {"ssl": ssl, "ssl_handshake_timeout":
                           server_handshake_timeout(ssl, ssl_handshake_timeout)}
    shared: Optional[Listener] = None
    hold: Optional[socket.socket] = None
    bound: Tuple[Any, ...] = ()
    where: Any = None

    def setup() -> Worker:
        if hold is not None:
            sock = _tcp_socket(hold.family, network, True)
            # The port stays reserved by the supervisor's socket, not this copy.
            hold.close()
            try:
                sock.bind(bound)
                sock.listen(backlog)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return _LoopWorker(loop, Listener(sock, network, **tls))
        assert shared is not None
        # The inherited copy of `shared` stays open (closing it through
        # Listener.close() would remove the supervisor's Unix socket file).
        dup = socket.socket(fileno=os.dup(shared.fileno()))
        path = shared.addr if isinstance(shared.addr, str) else None
        return _LoopWorker(loop, _SharedListener(dup, network, path, **tls))

    def ready() -> None:
        if on_ready is not None:
            on_ready(where)

    # Every argument is checked before a socket exists.
    sup = _supervisor(setup, processes, shutdown_timeout, ready)
    if reuse_port is None:
        reuse_port = sys.platform.startswith("linux")
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port=True: this system has no SO_REUSEPORT")
    per_worker = reuse_port and family != socket.AF_UNIX

    if per_worker:
        hold = _reserve(network, addr[0], addr[1])
        bound = hold.getsockname()
        where = (bound[0], bound[1])
    else:
        shared = create_listener(network, address, backlog=backlog)
        where = shared.addr

    log.info("prefork: serving %s %r with %d worker(s)", network, where, sup.processes)
    try:
        sup.run()
    finally:
        if hold is not None:
            hold.close()
        if shared is not None:
            shared.close()
