# The server side of an EventLoop: turns accepted fds into Connections.

import logging
import os
import threading

from netpoll._core.includes.system cimport close, EMFILE, ENFILE, EINVAL
from netpoll._core.poller cimport (
    Operator, Poller, np_conn_t, np_conn_new, np_conn_decref, np_poller_submit,
    np_schedule_process, OP_LISTENER, TASK_TEARDOWN, CF_RUNNING,
    CF_CLOSING, CF_FD_CLOSED,
)
from netpoll._core.connection cimport (Connection, new_connection, register_connection,
                                       setup_connection)

log = logging.getLogger("netpoll")


cdef class Acceptor(Operator):
    """Watches one listening socket on one poller and hands every accepted
    connection to its server (an EventLoop) in the poller's GIL phase."""

    def __init__(self, int fd, Poller poller not None, server not None):
        if self.op != NULL:
            raise RuntimeError("Acceptor already initialised")
        if fd < 0:
            raise ValueError("fd must be >= 0")
        self.op = np_conn_new(fd, OP_LISTENER)
        if self.op == NULL:
            raise MemoryError()
        self.op.pyobj = <void *>self
        self.poller = poller
        self.server = server
        self.closed = False
        self.torn_down = threading.Event()
        poller._register(self)

    cdef int _on_poller_event(self) except -1:
        cdef np_conn_t *l = self.op
        cdef int i, n = l.naccepted
        cdef int err = l.accept_errno
        fds = [l.accepted[i] for i in range(n)]
        l.naccepted = 0
        l.accept_errno = 0
        if err and not self.closed:
            if err in (EMFILE, ENFILE):
                log.warning("netpoll: accept paused for 50 ms: %s", os.strerror(err))
            elif err == EINVAL:
                # The listening socket was shut down (EventLoop.shutdown).
                log.debug("netpoll: listener stopped: %s", os.strerror(err))
            else:
                log.warning("netpoll: accept failed: %s", os.strerror(err))
        server = self.server
        for i in range(n):
            fd = fds[i]
            if self.closed:
                close(fd)
                continue
            try:
                server._accept(fd)
            except BaseException:
                log.exception("netpoll: error setting up an accepted connection")
        return 0

    cdef int _on_teardown(self) except -1:
        self.poller.unregister(self)
        self.torn_down.set()
        return 0

    def close(self, timeout=1.0):
        """Stop accepting; the poller closes the listening fd. Waits up to
        `timeout` seconds for that to happen."""
        if self.op == NULL:
            return
        if not self.closed:
            self.closed = True
            np_poller_submit(self.op.poller, TASK_TEARDOWN, self.op, <void *>1)
        self.torn_down.wait(timeout)

    def __dealloc__(self):
        if self.op != NULL:
            if not (self.op.flags & CF_FD_CLOSED) and self.op.fd >= 0:
                close(self.op.fd)       # never registered (constructor failed)
            self.op.pyobj = NULL
            np_conn_decref(self.op)
            self.op = NULL


def accept_connection(int fd, Poller poller not None, pool, runner, server,
                      on_request, on_prepare, on_connect, on_disconnect,
                      read_timeout, write_timeout, idle_timeout, input_limit):
    """Set up one accepted fd: Connection, on_prepare, registration, and the
    first process() when on_connect must run before any on_request."""
    cdef Connection conn = new_connection(fd, poller, pool, runner, server)
    cdef np_conn_t *c = conn.op
    if not server._track(conn):
        conn.close()             # the server is shutting down: refuse politely
        return None
    setup_connection(conn, on_request, read_timeout, write_timeout, idle_timeout, input_limit)
    conn._on_connect = on_connect
    conn._on_disconnect = on_disconnect
    if on_prepare is not None:
        try:
            conn._ctx = on_prepare(conn)
        except BaseException:
            log.exception("netpoll: on_prepare raised; closing the connection")
            conn.close()
            return None
        if c.flags & CF_CLOSING:
            return None          # on_prepare closed it: nothing else runs
    if on_connect is None:
        conn._connected = True
    else:
        c.flags |= CF_RUNNING    # on_connect runs before the first on_request
    register_connection(conn)
    if on_connect is not None:
        np_schedule_process(c)
    return conn
