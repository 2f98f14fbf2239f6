# The listener operator and the server side of an EventLoop: accepted fds
# become Connections.

import logging
import os
import threading

from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree
from libc.stdint cimport int64_t, uint32_t
from libc.string cimport memset

from netpoll._core.includes.system cimport (
    errno, EAGAIN, EWOULDBLOCK, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED, EINVAL,
    NP_EV_READ, pthread_mutex_lock, pthread_mutex_unlock, pthread_mutex_destroy,
    np_accept, np_atomic_load_uint,
)
from netpoll._core.poller cimport (
    Operator, Poller, np_op_t, np_op_kind_t, np_kind_init, np_poller_t, np_op_init, np_op_own_fd,
    np_op_decref, np_op_submit, np_op_set_interest_locked, np_op_close_fd, np_op_gil,
    np_poller_timer_push, OF_REGISTERED, OF_FD_CLOSED, T_REGISTER, T_TEARDOWN,
    GR_EVENT, GR_TEARDOWN,
)
from netpoll._core.timer cimport np_timer_t, timer_init, timer_heap_remove
from netpoll._core.connection cimport (Connection, new_connection, register_connection,
                                       setup_connection, start_server_tls, np_conn_schedule,
                                       CF_RUNNING, CF_CLOSING, CF_NEED_CONNECT)

log = logging.getLogger("netpoll")

cdef enum:
    ACCEPT_BATCH = 64           # fds accepted per listener per wake
    BACKOFF_NS = 50000000       # 50 ms pause of a listener after EMFILE/ENFILE

# ------------------------------------------------------------ the operator

cdef np_op_kind_t LISTENER_KIND
np_kind_init(&LISTENER_KIND, "listener", _listener_ready, _listener_timer, _listener_task, NULL, _listener_free)


cdef void _listener_free(np_op_t *op) noexcept nogil:
    cdef np_listener_t *l = <np_listener_t *>op
    PyMem_RawFree(l.accepted)
    pthread_mutex_destroy(&l.op.lock)
    PyMem_RawFree(l)


cdef size_t _listener_ready(np_poller_t *p, np_op_t *op, uint32_t ev, int64_t now) noexcept nogil:
    cdef np_listener_t *l = <np_listener_t *>op
    cdef int fd, e
    if np_atomic_load_uint(&l.op.flags) & OF_FD_CLOSED:
        return 0
    while l.naccepted < ACCEPT_BATCH:
        fd = np_accept(l.op.fd)
        if fd >= 0:
            l.accepted[l.naccepted] = fd
            l.naccepted += 1
            continue
        e = errno
        if e == EINTR or e == ECONNABORTED:
            continue
        if e == EAGAIN or e == EWOULDBLOCK:
            break
        if e == EMFILE or e == ENFILE or e == ENOBUFS or e == ENOMEM:
            # Out of descriptors or memory: stop watching the listener for a
            # while instead of spinning on a readiness we cannot serve. If the
            # timer cannot be armed, stay in the set (retrying beats never).
            l.accept_errno = e
            l.backoff.when = now + BACKOFF_NS
            if np_poller_timer_push(p, &l.backoff) == 0:
                pthread_mutex_lock(&l.op.lock)
                np_op_set_interest_locked(&l.op, 0)
                pthread_mutex_unlock(&l.op.lock)
            break
        l.accept_errno = e
        break
    if l.naccepted or l.accept_errno:
        np_op_gil(p, &l.op, GR_EVENT)
    return 0


cdef void _listener_timer(np_poller_t *p, np_op_t *op, np_timer_t *t, int64_t now) noexcept nogil:
    """The back-off is over: watch the listener again."""
    cdef np_listener_t *l = <np_listener_t *>op
    pthread_mutex_lock(&l.op.lock)
    if np_op_set_interest_locked(&l.op, NP_EV_READ) != 0 and not (l.op.flags & OF_FD_CLOSED):
        l.backoff.when = now + BACKOFF_NS       # try again later rather than never
        np_poller_timer_push(p, &l.backoff)
    pthread_mutex_unlock(&l.op.lock)


cdef void _listener_task(np_poller_t *p, np_op_t *op, unsigned int tasks, int64_t now) noexcept nogil:
    cdef np_listener_t *l = <np_listener_t *>op
    cdef int e
    if tasks & T_REGISTER:
        pthread_mutex_lock(&l.op.lock)
        if not (l.op.flags & (OF_FD_CLOSED | OF_REGISTERED)):
            l.op.flags |= OF_REGISTERED
            e = np_op_set_interest_locked(&l.op, NP_EV_READ)
            if e != 0:
                l.accept_errno = e
                np_op_gil(p, &l.op, GR_EVENT)       # reported in the GIL phase
        pthread_mutex_unlock(&l.op.lock)
    if tasks & T_TEARDOWN:
        timer_heap_remove(&p.timers, &l.backoff)
        if np_op_close_fd(&l.op, NULL):
            np_op_gil(p, &l.op, GR_TEARDOWN)

# ------------------------------------------------------------- Python half


cdef class ListenerOperator(Operator):
    """Watches one listening socket on one poller and hands every accepted
    fd to its server (an EventLoop, or a Reactor acceptor) in the poller's
    GIL phase. It owns the fd it is given (also when this raises)."""

    def __init__(self, int fd, Poller poller not None, server not None):
        cdef np_listener_t *l
        if self.op != NULL:
            raise RuntimeError("ListenerOperator already initialised")
        if fd < 0:
            raise ValueError("fd must be >= 0")
        l = <np_listener_t *>PyMem_RawMalloc(sizeof(np_listener_t))
        if l != NULL:
            memset(l, 0, sizeof(np_listener_t))
            l.accepted = <int *>PyMem_RawMalloc(ACCEPT_BATCH * sizeof(int))
            if l.accepted == NULL:
                PyMem_RawFree(l)
                l = NULL
        if l == NULL:
            os.close(fd)
            raise MemoryError()
        np_op_init(&l.op, &LISTENER_KIND, fd)
        np_op_own_fd(&l.op)
        timer_init(&l.backoff)
        l.backoff.data = l
        l.op.pyobj = <void *>self
        self.l = l
        self.op = &l.op
        self.poller = poller
        self.server = server
        self.closed = False
        self.torn_down = threading.Event()
        poller._register(self)

    cdef int _on_poller_event(self) except -1:
        cdef np_listener_t *l = self.l
        cdef int i, n = l.naccepted
        cdef int err = l.accept_errno
        fds = [l.accepted[i] for i in range(n)]
        l.naccepted = 0
        l.accept_errno = 0
        if err and not self.closed:
            if err in (EMFILE, ENFILE, ENOBUFS, ENOMEM):
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
                os.close(fd)
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
            np_op_submit(self.op, T_TEARDOWN)
        self.torn_down.wait(timeout)

    def __dealloc__(self):
        if self.op != NULL:
            if not (self.op.flags & OF_REGISTERED):
                np_op_close_fd(self.op, NULL)    # never registered
            self.op.pyobj = NULL
            np_op_decref(self.op)
            self.op = NULL
            self.l = NULL


def accept_connection(int fd, Poller poller not None, pool, runner, server,
                      on_request, on_prepare, on_connect, on_disconnect,
                      read_timeout, write_timeout, idle_timeout, input_limit,
                      output_limit, sslctx=None, handshake_timeout=None):
    """Set up one accepted fd: Connection, on_prepare, registration, and the
    first process() when on_connect must run before any on_request. With
    `sslctx` the poller first runs a TLS server handshake (bounded by
    `handshake_timeout` seconds), and on_connect waits for its end."""
    cdef Connection conn = new_connection(fd, poller, pool, runner, server)
    cdef np_op_t *op = conn.op
    if not server._track(conn):
        conn.close()             # the server is shutting down: refuse politely
        return None
    setup_connection(conn, on_request, read_timeout, write_timeout, idle_timeout,
                     input_limit, output_limit)
    if sslctx is not None:
        try:
            start_server_tls(conn, sslctx, handshake_timeout)
        except BaseException:
            conn.close()
            raise
    conn._on_connect = on_connect
    conn._on_disconnect = on_disconnect
    if on_prepare is not None:
        try:
            conn._ctx = on_prepare(conn)
        except BaseException:
            log.exception("netpoll: on_prepare raised; closing the connection")
            conn.close()
            return None
        if op.flags & CF_CLOSING:
            return None          # on_prepare closed it: nothing else runs
    if on_connect is None:
        conn._connected = True
    elif sslctx is not None:
        op.flags |= CF_NEED_CONNECT   # scheduled by the handshake's end
    else:
        op.flags |= CF_RUNNING   # on_connect runs before the first on_request
    register_connection(conn)
    if on_connect is not None and sslctx is None:
        np_conn_schedule(conn.c)
    return conn
