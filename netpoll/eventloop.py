"""The server: ``EventLoop(on_request, ...).serve(listener)``."""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, List, Optional, Set

from netpoll._core.connection import Connection
from netpoll import _validate
from netpoll._core.connection import DEFAULT_OUTPUT_LIMIT, in_handler
from netpoll._core.server import ListenerOperator, accept_connection
from netpoll.config import _check_runner, runtime
from netpoll.listener import Listener

__all__ = ["EventLoop"]

log = logging.getLogger("netpoll")

OnRequest = Callable[[Any, Connection], None]


def _callback(name: str, fn: Any, required: bool = False) -> Any:
    if fn is None and not required:
        return None
    if not callable(fn):
        raise TypeError(f"{name} must be callable")
    return fn


class EventLoop:
    """Serves connections: calls ``on_request(ctx, conn)`` when data arrives.

    on_prepare(conn) -> ctx runs on the accept path before the connection is
    registered (it may close it: then nothing else runs); on_connect(ctx,
    conn) -> ctx runs before the first on_request; on_disconnect(ctx, conn)
    runs at most once, after on_connect, when the peer closes.

    on_request is called when data arrives into an empty input buffer, never
    twice at once for one connection, and again after it returns while unread
    data remains: at once if it consumed something, otherwise when new bytes
    arrive. runner: "auto" (default: inline on the poller thread, and when a
    handler blocks the poller's loop passes to a standby thread: at once when
    it waits in netpoll, after ``configure(handoff_threshold=...)`` seconds
    otherwise; see ``configure``), "pool" (a bounded worker pool, handlers
    may block; every request pays a thread switch), "inline" (on the poller
    thread; handlers must not block: a blocking read there stalls that
    poller's other connections until its bytes arrive or the read timeout
    passes), or a callable run(task).

    input_limit: while this many bytes are buffered unread, the socket is not
    read (TCP pushes back on the peer); a read asking for more raises
    ValueError. None or 0: no limit. output_limit (default 4 MiB): what a
    flush() from an inline handler may leave queued and return at once;
    above it the flush sends from the handler and waits for the peer
    (bounded by write_timeout). None: no limit. Flushes from worker threads
    always wait until everything is sent.
    """

    def __init__(self, on_request: OnRequest,
                 on_prepare: Optional[Callable[[Connection], Any]] = None,
                 on_connect: Optional[Callable[[Any, Connection], Any]] = None,
                 on_disconnect: Optional[Callable[[Any, Connection], Any]] = None,
                 read_timeout: Optional[float] = None, write_timeout: Optional[float] = None,
                 idle_timeout: Optional[float] = None, runner: Any = None,
                 input_limit: Optional[int] = None,
                 output_limit: Optional[int] = DEFAULT_OUTPUT_LIMIT) -> None:
        self.on_request = _callback("on_request", on_request, required=True)
        self.on_prepare = _callback("on_prepare", on_prepare)
        self.on_connect = _callback("on_connect", on_connect)
        self.on_disconnect = _callback("on_disconnect", on_disconnect)
        self.read_timeout = _validate.seconds(read_timeout, "read_timeout")
        self.write_timeout = _validate.seconds(write_timeout, "write_timeout")
        self.idle_timeout = _validate.seconds(idle_timeout, "idle_timeout")
        self.runner = _check_runner(runner) if runner is not None else None
        # 0 and None: no limit.
        self.input_limit = _validate.size(input_limit, "input_limit", none_ok=True) or 0
        self.output_limit = _validate.size(output_limit, "output_limit", none_ok=True)
        # Re-entrant: a finalizer run by the GC while it is held (an
        # allocation in shutdown(), say) may close a connection, which
        # takes it again in _connection_closed.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._conns: Set[Connection] = set()
        self._acceptors: List[ListenerOperator] = []
        self._listeners: List[Listener] = []
        self._stopped = threading.Event()
        self._shutting_down = False

    # -- called by the core, on a poller thread with the GIL --------------

    def _accept(self, fd: int, ssl: Any = None, ssl_handshake_timeout: Any = None) -> None:
        rt = runtime()
        runner = self.runner if self.runner is not None else rt.runner
        pool = rt.get_pool() if runner == "pool" else None
        accept_connection(fd, rt.pick(), pool, runner, self, self.on_request,
                          self.on_prepare, self.on_connect, self.on_disconnect,
                          self.read_timeout, self.write_timeout, self.idle_timeout,
                          self.input_limit, self.output_limit, ssl, ssl_handshake_timeout)

    def _track(self, conn: Connection) -> bool:
        # Called before the connection is registered, so it cannot close
        # first; decided under the lock, so shutdown() sees it or refuses it.
        with self._lock:
            if self._shutting_down:
                return False
            self._conns.add(conn)
            return True

    def _connection_closed(self, conn: Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            if not self._conns:
                self._idle.notify_all()

    # -- public ------------------------------------------------------------

    def serve(self, listener: Listener) -> None:
        """Accept and serve connections on `listener` until shutdown()."""
        if not isinstance(listener, Listener):
            raise TypeError("serve() takes a netpoll Listener (see create_listener)")
        if listener.closed:
            raise ValueError("listener is closed")
        if self._shutting_down:
            raise RuntimeError("EventLoop was shut down")
        rt = runtime()
        rt.ensure_started()
        if (self.runner or rt.runner) == "pool":
            rt.get_pool()
        fd = os.dup(listener.fileno())
        target: Any = self if listener.ssl is None else _TLSAccept(self, listener)
        acceptor = ListenerOperator(fd, rt.pick(), target)
        with self._lock:
            self._acceptors.append(acceptor)
            self._listeners.append(listener)
        # Timed, like Reactor.run(): the main thread must come back to the
        # interpreter to run a Python signal handler (the examples' SIGTERM
        # calls shutdown()). CPython 3.13.5 free-threaded was seen to leave
        # a SIGTERM unhandled while the main thread sat in an untimed
        # Event.wait() and other threads ran Python.
        while not self._stopped.wait(0.25):
            pass

    def shutdown(self, timeout: Optional[float] = 5.0) -> None:
        """Stop accepting, let running handlers finish, close every connection.

        Returns once every connection is closed; if `timeout` seconds pass
        first, the remaining connections are closed at once and TimeoutError
        is raised. serve() returns None after this.

        Called from a handler (on_prepare, on_connect, on_request,
        on_disconnect, on any runner) it cannot wait, since the handlers it
        would wait for include its caller: it starts the shutdown and
        returns at once. The calling connection is closed when its handler
        returns; the rest (the timeout, then serve() returning) goes on in
        the background, and a timeout is logged instead of raised."""
        timeout = _validate.seconds(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        from_handler = in_handler()
        with self._lock:
            self._shutting_down = True
            acceptors, self._acceptors = self._acceptors, []
            listeners, self._listeners = self._listeners, []
            conns = list(self._conns)
        # Refuse new connects at once (Linux: a listening socket shut down for
        # reading stops taking SYNs), then let each poller close its copy
        # (not waited for from a handler: its poller may be the caller's).
        for lst in listeners:
            lst._stop_listening()
        for a in acceptors:
            a.close(0 if from_handler else 1.0)
        for lst in listeners:
            lst.close()
        for conn in conns:
            conn._close_when_done()
        if from_handler:
            threading.Thread(target=self._finish_shutdown, args=(deadline, timeout, False),
                             name="netpoll-shutdown", daemon=True).start()
            return
        self._finish_shutdown(deadline, timeout, True)

    def _finish_shutdown(self, deadline: Optional[float], timeout: Optional[float],
                         raise_timeout: bool) -> None:
        """Wait for the connections to close (until `deadline`), close the
        rest, and let serve() return."""
        timed_out = False
        with self._lock:
            while self._conns:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    timed_out = True
                    break
                self._idle.wait(left)
            rest = list(self._conns)
        for conn in rest:
            conn.close()
        self._stopped.set()
        if timed_out:
            msg = f"shutdown: {len(rest)} connection(s) still busy after {timeout} s"
            if raise_timeout:
                raise TimeoutError(msg)
            log.warning("netpoll: %s; closed them", msg)

    @property
    def connections(self) -> int:
        """Open connections served by this loop."""
        with self._lock:
            return len(self._conns)

    def __repr__(self) -> str:
        runner = self.runner if self.runner is not None else runtime().runner
        state = " shut down" if self._shutting_down else ""
        return f"<EventLoop runner={runner!r} connections={self.connections}{state}>"


class _TLSAccept:
    """What a TLS listener's ListenerOperator hands accepted fds to: the
    EventLoop, with that listener's context and handshake timeout."""

    __slots__ = ("loop", "ssl", "timeout")

    def __init__(self, loop: EventLoop, listener: Listener) -> None:
        self.loop = loop
        self.ssl = listener.ssl
        self.timeout = listener.ssl_handshake_timeout

    def _accept(self, fd: int) -> None:
        self.loop._accept(fd, self.ssl, self.timeout)
