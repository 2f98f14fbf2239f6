# goev's Reactor model on netpoll's pollers.
#
# A Reactor owns `poll_num` Poller threads of its own (separate from the
# EventLoop's). An EvHandler is an operator of kind HANDLER_KIND: the poller
# records its ready events without the GIL and queues it for the GIL phase of
# the batch, where `_dispatch` calls on_read/on_write per the mask (one GIL
# acquisition per batch, as for the EventLoop). Reads happen inside on_read,
# as in goev, into the poller's shared read buffer with the GIL released.
#
# Every callback of a handler runs on the poller thread it is bound to, so a
# handler's Python state needs no lock. Other threads reach a poller through
# its control operator: they append a request to `xq` and submit T_CALL,
# which puts the control operator in the next GIL phase. A request
# runs on the poller that owns its handler when it runs: one queued before
# the handler moved (add_ev_handler(..., poller=j) in on_open) is re-posted
# to the new owner, never executed on the old poller's thread.
#
# Fd ownership: a handler owns its fd from a successful add_ev_handler(),
# _attach() or _connect() until _fd_close() closes it (see there); a failed
# add_ev_handler() takes nothing. fdstate (under op.lock) says whether writes
# are accepted; a close flips it and takes the async_write callbacks in the
# same critical section, so each accepted write is reported exactly once.
#
# Timers are np_utimer_t in the poller's own 4-ary heap (kind TM_USER); they
# are created, fired and freed on the poller thread only, so a cancel from
# another thread never touches timer memory (it is a request, see above).
#
# Output: write() sends directly when nothing is queued; the rest is copied to
# the connection's output LinkBuffer and sent by the poller with sendmsg
# (many iovecs) on EPOLLOUT. The connection lock orders writers of any thread
# and is only ever taken without the GIL (a thread holding it never waits
# for the GIL), and never across a blocking call (add_ev_handler sets
# O_NONBLOCK; accepted and connecting sockets are non-blocking already).
#
# TLS (Acceptor(ssl=), Connector.connect(ssl=)): np_handler_t.tls is an
# OpenSSL session over the handler's fd (tls.pxd). `connecting` stays set
# until the handshake ends, so everything that waits for a connect (writes
# queue, no on_open, destroy()/stop() abort it, the connect timer) waits for
# the handshake too. The ready callback steps the handshake without the GIL;
# its end (or failure) reaches the GIL phase through `_finish_connect`. Then
# read() decrypts into the shared read buffer, write() and the flushes encrypt
# from the output LinkBuffer (write() copies there first: a retried SSL_write
# must see the same bytes, and the caller's buffer is gone by then). OpenSSL
# may hold input the socket no longer announces: read() posts a "tls_read"
# request that re-delivers on_read when it stopped with input left.

import collections
import errno as _errno
import logging
import os
import threading

cimport cython
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from netpoll._core.includes.system cimport (
    close, errno, EAGAIN, EWOULDBLOCK, EINPROGRESS,
    pthread_mutex_lock, pthread_mutex_unlock, pthread_mutex_destroy, np_atomic_load_uint,
    NP_EV_READ, NP_EV_WRITE, NP_EV_HUP, NP_EV_ERR, NP_EV_RDHUP, NP_EV_ET,
    np_atomic_cas_int, np_atomic_store_int, np_atomic_load_int, np_monotonic_ns,
)
from netpoll._core.poller cimport (
    Operator, Poller, np_op_t, np_op_kind_t, np_kind_init, np_poller_t, np_op_init, np_op_own_fd,
    np_op_decref, np_op_submit, np_op_set_interest_locked, np_op_close_fd, np_op_gil,
    np_on_poller_thread, OF_FD_CLOSED, T_CALL, GR_EVENT,
)
from netpoll._core.sockio cimport np_recv, np_send, np_send_lb
from netpoll._core.tls cimport (
    np_tls_t, np_tls_handshake, np_tls_recv, np_tls_send_lb, np_tls_close_notify,
    np_tls_pending, np_tls_free, np_tls_open, np_tls_info, np_tls_error,
    TLS_DONE, TLS_WANT_READ, TLS_FAILED,
)
from netpoll._core.timer cimport (np_timer_t, np_timer_heap_t, timer_init, timer_heap_push,
                                  timer_heap_remove)
from netpoll._core.linkbuffer cimport (
    np_chunk_t, np_chunk_alloc, np_chunk_incref, np_chunk_decref, np_export_chunk, np_lb_new, np_lb_readable,
    np_lb_reserve, np_lb_commit, np_lb_clear, np_lb_free,
)

from netpoll._validate import seconds, seconds_ns, size
from netpoll.errors import ConnectionClosedError, DialTimeoutError

log = logging.getLogger("netpoll")

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    int SOL_SOCKET, SO_ERROR

cdef extern from "<errno.h>" nogil:
    int EALREADY, ECONNREFUSED, ETIMEDOUT, EBADF, EPERM, EEXIST

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    int F_GETFL, F_SETFL, O_NONBLOCK

# Event masks (goev's EvIn, EvOut, EvInET, EvOutET).
EV_IN = NP_EV_READ
EV_OUT = NP_EV_WRITE
EV_ET = NP_EV_ET
EV_IN_ET = NP_EV_READ | NP_EV_ET
EV_OUT_ET = NP_EV_WRITE | NP_EV_ET
cdef uint32_t EV_ALL = NP_EV_READ | NP_EV_WRITE | NP_EV_ET

cdef enum:
    TM_USER = 4                # np_timer_t.kind of handler timers
    OUT_CHUNK = 16384
    MAX_READ_BUFFER = 64 << 20
    FD_MAX = 0x7fffffff

# A TLS handshake's limit where no connect timer bounds it (asyncio's
# ssl_handshake_timeout; DESIGN.md: at most 10 s by default).
cdef int64_t DEFAULT_HS_NS = 10 * 1000000000

cdef uint64_t ALL_WCBS = 0xffffffffffffffffULL   # _wcb_take: every callback

cdef extern from *:
    """
    static inline uint64_t np_rx_tid_next(uint64_t *p) { return __atomic_add_fetch(p, 1, __ATOMIC_RELAXED); }
    static inline uint64_t np_rx_tid_last(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    """
    uint64_t np_rx_tid_next(uint64_t *p) nogil
    uint64_t np_rx_tid_last(uint64_t *p) nogil

# Timer ids: distinct for the whole process. Taken from any thread, so an
# atomic counter (without the GIL two threads could draw the same id).
cdef uint64_t g_next_tid = 0

# Reactors whose pollers run. Their threads use memory the Reactor owns
# (timers, control blocks), so a reactor that was not stopped must never be
# collected: it stays here until its shutdown completes.
cdef set g_live_reactors = set()


cdef inline uint64_t _new_tid():
    return np_rx_tid_next(&g_next_tid)


cdef object _call_on_timeout(object on_timeout, uint64_t tid, int64_t now):
    try:
        return on_timeout(tid, now / 1e9)
    except BaseException:
        log.exception("netpoll: on_timeout raised")
        return False


cdef int _check_events(object events) except -1:
    if isinstance(events, bool) or not isinstance(events, int):
        raise TypeError(f"events must be an int mask of EV_* flags, not {type(events).__name__}")
    if events & ~EV_ALL or not (events & (NP_EV_READ | NP_EV_WRITE)):
        raise ValueError(f"invalid event mask {events!r}: use EV_IN, EV_OUT (| EV_ET)")
    return 0


def conn_error(int e, object addr):
    """The exception on_connect_fail receives for errno `e`: a ConnectionError
    (ConnectionRefusedError for a refusal) or DialTimeoutError."""
    if e == ETIMEDOUT:
        return DialTimeoutError(f"connect to {addr!r} timed out")
    msg = f"{os.strerror(e)} (connecting to {addr!r})"
    exc = OSError(e, msg)
    if not isinstance(exc, ConnectionError):
        exc = ConnectionError(e, msg)
    return exc

# ------------------------------------------------------------ nogil helpers

cdef void _fd_close(np_handler_t *c, int fd) noexcept nogil:
    """Close a descriptor the Reactor owns: the only close() of this module.

    Ownership rule: an EvHandler owns its fd from a successful
    add_ev_handler(), _attach() (an accepted fd) or _connect() (a connecting
    socket) until this function closes it, once: at the end of _close() or
    _connect_failed(), or in __dealloc__ for a handler that never closed. A
    failed add_ev_handler() takes nothing: the caller keeps its fd. An fd
    given to _attach()/_connect() that no handler adopts (reactor stopping,
    handler in use) is the Reactor's, and is closed here at once (c NULL).

    With c (fd is then ignored) the operator's fd goes through np_op_close_fd
    (poller.pxd has the library-wide rule: identity check, poll-set removal,
    OF_FD_CLOSED before the number can be reused)."""
    if c != NULL:
        np_op_close_fd(&c.op, NULL)
    elif fd >= 0:
        close(fd)       # adopted by no operator: in no poll set


cdef int _set_nonblock(int fd) noexcept nogil:
    """O_NONBLOCK on fd: 0 or errno."""
    cdef int fl = fcntl(fd, F_GETFL, 0)
    if fl < 0:
        return errno
    if not (fl & O_NONBLOCK) and fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0:
        return errno
    return 0


cdef np_wcb_t *_wcb_take(np_wcb_t **head, np_wcb_t **tail, uint64_t upto) noexcept nogil:
    """Unlink the callbacks whose target <= upto (op.lock held); the list is
    in target order, so they are a prefix. Returns them, NULL-terminated."""
    cdef np_wcb_t *first = head[0]
    cdef np_wcb_t *last = NULL
    cdef np_wcb_t *n = first
    while n != NULL and n.target <= upto:
        last = n
        n = n.next
    if last == NULL:
        return NULL
    head[0] = n
    if n == NULL:
        tail[0] = NULL
    last.next = NULL
    return first


cdef int _lb_append(np_handler_t *c, const char *p, size_t n) noexcept nogil:
    """Copy n bytes to the output buffer (lock held): 0 or -1 (ENOMEM)."""
    cdef char *dst
    cdef size_t cap, k
    while n > 0:
        dst = np_lb_reserve(c.outbuf, n, n if n > OUT_CHUNK else OUT_CHUNK, &cap)
        if dst == NULL:
            return -1
        k = cap if cap < n else n
        memcpy(dst, p, k)
        np_lb_commit(c.outbuf, k)
        p += k
        n -= k
    return 0


cdef uint32_t _want(np_handler_t *c, uint32_t umask, bint connecting, bint eof_seen,
                    bint closed) noexcept nogil:
    """The poll-set mask for a handler: what the user asked for, plus EPOLLOUT
    while output is pending or a connect is in progress."""
    cdef uint32_t want = 0
    if closed:
        return 0
    if c.tls != NULL:
        if c.hs == HS_RUN:
            return c.hs_want           # the handshake's, level-triggered
        if c.tls.read_wants_write:
            want = NP_EV_WRITE         # SSL_read waits to send (a TLS 1.3 key update)
    if (umask & NP_EV_READ) and not eof_seen:
        want |= NP_EV_READ
    if (umask & NP_EV_WRITE) or connecting or np_lb_readable(c.outbuf) > 0:
        want |= NP_EV_WRITE
    if want and (umask & NP_EV_ET):
        want |= NP_EV_ET
    return want


cdef int _apply_locked(np_handler_t *c, uint32_t want) noexcept nogil:
    """Bring the poll set in line with `want` (lock held): 0 or errno."""
    if c.op.fd < 0 or c.op.poller == NULL:
        return 0
    return np_op_set_interest_locked(&c.op, want)


cdef inline np_timer_heap_t *_heap_of(np_utimer_t *u) noexcept nogil:
    """The heap u was pushed into: its poller's (u.t.data is that poller's
    control block). Only that poller's thread may touch it."""
    return &(<rp_ctl_t *>u.t.data).op.poller.timers


cdef np_op_kind_t CTL_KIND
np_kind_init(&CTL_KIND, "reactor control", NULL, _ctl_timer, _ctl_task, NULL, _ctl_free)

cdef np_op_kind_t HANDLER_KIND
np_kind_init(&HANDLER_KIND, "reactor handler", _handler_ready, NULL, NULL, NULL, _handler_free)


cdef void _ctl_timer(np_poller_t *p, np_op_t *op, np_timer_t *t, int64_t now) noexcept nogil:
    """Poller thread, no GIL: a handler timer expired. The control operator
    runs in this batch's GIL phase; fired timers keep their expiry order."""
    cdef rp_ctl_t *ctl = <rp_ctl_t *>op
    cdef np_utimer_t *u = <np_utimer_t *>t
    u.next = NULL
    if ctl.fired_tail != NULL:
        ctl.fired_tail.next = u
    else:
        ctl.fired_head = u
    ctl.fired_tail = u
    np_op_gil(p, op, GR_EVENT)


cdef void _ctl_task(np_poller_t *p, np_op_t *op, unsigned int tasks, int64_t now) noexcept nogil:
    """Another thread posted requests (T_CALL): drain them in the GIL phase."""
    np_op_gil(p, op, GR_EVENT)


cdef void _ctl_free(np_op_t *op) noexcept nogil:
    cdef rp_ctl_t *ctl = <rp_ctl_t *>op
    cdef np_utimer_t *u = ctl.fired_head
    cdef np_utimer_t *nxt
    while u != NULL:
        # Fired, never drained: the poller stopped. A reference it holds to
        # its handler is leaked (no GIL here) rather than dropped unsafely.
        nxt = u.next
        PyMem_RawFree(u)
        u = nxt
    pthread_mutex_destroy(&ctl.op.lock)
    PyMem_RawFree(ctl)


cdef size_t _handler_ready(np_poller_t *p, np_op_t *op, uint32_t ev, int64_t now) noexcept nogil:
    """Record what is ready; the callbacks run in the GIL phase (reads
    happen there, in on_read, as in goev)."""
    cdef np_handler_t *h = <np_handler_t *>op
    if not (np_atomic_load_uint(&op.flags) & OF_FD_CLOSED):
        if h.tls != NULL and h.hs == HS_RUN and not _hs_step(h):
            return 0               # handshake flights need no GIL
        h.hready |= ev
        np_op_gil(p, op, GR_EVENT)
    return 0


cdef bint _hs_step(np_handler_t *h) noexcept nogil:
    """Advance h's TLS handshake (poller thread): True when it ended (h.hs
    HS_DONE or HS_FAILED; the GIL phase takes over), else the poll set waits
    for what OpenSSL needs."""
    cdef int r = np_tls_handshake(h.tls)
    cdef bint ended = True
    pthread_mutex_lock(&h.op.lock)
    if (h.op.flags & OF_FD_CLOSED) or h.hs != HS_RUN:
        ended = False
    elif r == TLS_DONE:
        h.hs = HS_DONE
    elif r == TLS_FAILED:
        h.hs = HS_FAILED
    else:
        h.hs_want = NP_EV_READ if r == TLS_WANT_READ else NP_EV_WRITE
        if _apply_locked(h, h.hs_want) != 0:
            h.hs = HS_FAILED       # cannot wait for the socket: give up now
        else:
            ended = False
    pthread_mutex_unlock(&h.op.lock)
    return ended


cdef inline int _tls_send_locked(np_handler_t *c, uint64_t *sent) noexcept nogil:
    """np_send_lb over TLS (op.lock held): the same result; *sent bytes of
    plaintext (the output only grows while the lock is held elsewhere)."""
    cdef size_t before = np_lb_readable(c.outbuf)
    cdef int st = np_tls_send_lb(c.tls, c.outbuf)
    sent[0] = before - np_lb_readable(c.outbuf)
    return st


cdef void _tls_detach(np_tls_t *t) noexcept nogil:
    """No more socket I/O through t (its fd is about to be closed, and its
    number may be reused): the session stays for handler.tls."""
    pthread_mutex_lock(&t.lock)
    t.failed = 1
    t.fd = -1
    pthread_mutex_unlock(&t.lock)


cdef void _handler_free(np_op_t *op) noexcept nogil:
    cdef np_handler_t *h = <np_handler_t *>op
    np_lb_free(h.outbuf)
    np_tls_free(h.tls)             # the fd is closed: nothing is inside the session
    pthread_mutex_destroy(&h.op.lock)
    PyMem_RawFree(h)


# ---------------------------------------------------------- the poller side


cdef class _ReactorPoller(Operator):
    """One of a Reactor's pollers: its thread, control operator, shared read
    buffer, poller-local cache and the handlers bound to it."""

    def __cinit__(self, reactor, int index, size_t rbuf_size):
        self.ctl = <rp_ctl_t *>PyMem_RawMalloc(sizeof(rp_ctl_t))
        if self.ctl == NULL:
            raise MemoryError()
        memset(self.ctl, 0, sizeof(rp_ctl_t))
        np_op_init(&self.ctl.op, &CTL_KIND, -1)
        self.ctl.op.pyobj = <void *>self
        self.op = &self.ctl.op
        self.index = index
        self.poller = Poller(index)
        self.ctl.op.poller = self.poller.p
        self.reactor_ref = reactor
        self.xq = collections.deque()
        self.handlers = {}
        self.pcache = {}
        self.rchunk = NULL
        self.rbuf_size = rbuf_size
        self.stopping = False

    cdef bint _is_current(self) noexcept:
        return np_on_poller_thread(self.poller.p)

    cdef int _post(self, object item) except -1:
        """Hand `item` to this poller's thread (any thread, GIL held)."""
        self.xq.append(item)
        if np_atomic_cas_int(&self.ctl.wake_pending, 0, 1):
            np_op_submit(&self.ctl.op, T_CALL)
        return 0

    cdef int _on_poller_event(self) except -1:
        cdef int64_t now = np_monotonic_ns()
        cdef Py_ssize_t n
        # Clear before draining: a request appended after this store queues
        # a new task, one appended before it is drained below.
        np_atomic_store_int(&self.ctl.wake_pending, 0)
        self._drain_fired(now)
        n = len(self.xq)
        while n > 0 and self.xq:
            n -= 1
            item = self.xq.popleft()
            try:
                self._handle(item)
            except BaseException:
                log.exception("netpoll: error in a reactor request %r", item[0])
        return 0

    cdef int _drain_fired(self, int64_t now) except -1:
        # Timers live in this poller's heap and a handler with timers cannot
        # move (add_ev_handler refuses), so each fired one is this poller's.
        cdef np_utimer_t *u = self.ctl.fired_head
        cdef np_utimer_t *nxt
        cdef EvHandler h
        self.ctl.fired_head = NULL
        self.ctl.fired_tail = NULL
        while u != NULL:
            nxt = u.next
            u.next = NULL
            if u.handler == NULL:
                _free_timer(u)             # its handler closed meanwhile
            else:
                h = <EvHandler><PyObject *>u.handler
                try:
                    h._timer_fired(u, now)
                except BaseException:
                    log.exception("netpoll: error in a timer")
                h = None
            u = nxt
        return 0

    cdef int _handle(self, object item) except -1:
        cdef EvHandler h
        kind = item[0]
        if kind in _HANDLER_REQUESTS:
            h = item[1]
            if h.rp is not self:
                # Queued before the handler moved to another poller (or before
                # a failed add_ev_handler unbound it). Only its owner's thread
                # may touch its timers and state: hand the request over.
                if h.rp is not None:
                    h.rp._post(item)
                elif kind == "flush":
                    h.flush_posted = False     # the next flush must be posted again
                elif kind == "tls_read":
                    h.tls_posted = False
                elif kind == "timer":
                    h._cancelled.discard(item[2])
                    h._cancelled.discard(_queued(item[2]))
                return 0
        if kind == "flush":
            h.flush_posted = False
            if not h.closed:
                h._flush()
        elif kind == "timer":
            tid = item[2]
            h._cancelled.discard(_queued(tid))
            if h.closed or tid in h._cancelled or (item[5] and not h.connecting):
                h._cancelled.discard(tid)
            else:
                h._add_timer(item[3], item[4], item[5], tid)
        elif kind == "cancel":
            h._cancel_local(item[2])
        elif kind == "close":
            h._close(item[2])
        elif kind == "open":
            _open(h)
        elif kind == "handshake":
            h._start_handshake()
        elif kind == "tls_read":
            h._tls_read_again()
        elif kind == "connected":
            if h.connecting and not h.closed:
                h._finish_connect(NP_EV_WRITE)
        elif kind == "connect_fail":
            h._connect_failed(item[2])
        elif kind == "sync":
            self.pcache[item[1]] = item[2]
            state = item[3]
            with state[0]:
                state[1] -= 1
                done = state[1] == 0
            if done:
                state[2].set()
        elif kind == "shutdown":
            self.stopping = True
            for h in list(self.handlers.values()):
                if h.rp is not self:
                    continue
                try:
                    h._close(None)
                except BaseException:
                    log.exception("netpoll: error closing a handler at stop")
            item[1].set()
        elif kind == "call":
            item[1]()
        return 0

    def __dealloc__(self):
        if self.ctl != NULL:
            self.ctl.op.pyobj = NULL
            np_op_decref(&self.ctl.op)      # frees the fired list with it
            self.ctl = NULL
        self.op = NULL
        if self.rchunk != NULL:
            np_chunk_decref(self.rchunk)
            self.rchunk = NULL


# Requests that name a handler (item[1]): run on the handler's owner only.
_HANDLER_REQUESTS = frozenset(("flush", "timer", "cancel", "close", "open", "connected",
                               "connect_fail", "handshake", "tls_read"))


cdef inline object _queued(uint64_t tid):
    """The mark in EvHandler._cancelled of a timer whose creation request
    (from another thread) has not run yet: -tid, never a timer id. Added
    before the request is posted, removed when it runs on the handler's
    owner; _cancel_local() tells "not created yet" (keep the cancel for the
    creation to see) from "finished" (keep nothing) by it."""
    return -<object>tid


cdef void _orphan_timer(np_utimer_t *u) noexcept:
    """Drop u's reference to its handler (GIL held); u stays allocated."""
    cdef void *h = u.handler
    u.handler = NULL
    if h != NULL:
        Py_DECREF(<object>h)


cdef void _free_timer(np_utimer_t *u) noexcept:
    """Free a timer that is in no heap and no fired list (GIL held)."""
    _orphan_timer(u)
    PyMem_RawFree(u)


cdef int _open(EvHandler h) except -1:
    """Call on_open on h's poller; a falsy return (or an exception) closes it."""
    if h.closed:
        return 0
    if not h._callback(h.on_open, "on_open", False):
        return 0
    if h._pool is not None:
        h._pool._handler_event(h, "open")
    # Output written before or in on_open; if on_open moved the handler, its
    # new poller sends it (the registration asks for EPOLLOUT while pending).
    if np_lb_readable(h.h.outbuf) > 0 and h.rp is not None and h.rp._is_current():
        h._flush()
    return 0

# ------------------------------------------------------------- the handler


cdef class EvHandler(Operator):
    """goev's EvHandler with IOHandle's methods. Subclass it and override the
    callbacks you need; every callback runs on the poller thread that owns the
    handler, one at a time.

    Callbacks (defaults are harmless no-ops):

    - ``on_open() -> bool``: after accept/connect. Register yourself here with
      ``reactor.add_ev_handler(self, self.fd(), EV_IN)``. Falsy closes.
    - ``on_read() -> bool`` / ``on_write() -> bool``: the fd is readable /
      writable (per the mask). Falsy (or an exception) removes the handler
      and calls ``on_close`` once. The default on_read drains and closes at EOF.
    - ``on_timeout(timer_id, now) -> bool``: a timer fired (``now`` is
      ``time.monotonic()`` seconds). True re-arms an interval timer; the
      return value is ignored for one-shot timers and never closes the handler.
    - ``on_connect_fail(err)``: a Connector's connect failed (never followed
      by on_open or on_close).
    - ``on_close()``: exactly once per opened handler, whatever the path
      (a callback returned False, peer close, reset, destroy(), reactor stop).
      The library closes the fd after it returns.
    - ``on_high_watermark(pending)`` / ``on_low_watermark(pending)``: the
      pending output crossed the marks set with ``set_watermarks``.
    """

    def __cinit__(self, *args, **kwargs):
        cdef np_handler_t *h = <np_handler_t *>PyMem_RawMalloc(sizeof(np_handler_t))
        if h == NULL:
            raise MemoryError()
        memset(h, 0, sizeof(np_handler_t))
        np_op_init(&h.op, &HANDLER_KIND, -1)
        self.h = h
        self.op = &h.op
        h.outbuf = np_lb_new(0)
        if h.outbuf == NULL:
            raise MemoryError()
        h.op.pyobj = <void *>self
        self.rp = None
        self._reactor = None
        self._timers = {}
        self._cancelled = set()
        self._pool = None
        self.fdstate = FD_NONE
        self.wcb_head = NULL
        self.wcb_tail = NULL

    def __dealloc__(self):
        cdef np_wcb_t *w
        cdef np_wcb_t *nxt
        if self.op != NULL:
            # Every timer holds a reference to its handler (_add_timer), so
            # none is left here.
            w = self.wcb_head           # never closed: nobody can be told any more
            self.wcb_head = self.wcb_tail = NULL
            while w != NULL:
                nxt = w.next
                Py_DECREF(<object>w.cb)
                PyMem_RawFree(w)
                w = nxt
            if self.fdstate == FD_OWNED:
                # An open handler is referenced by its poller until it closes,
                # so its poller (and the poll set) is gone by now: only close.
                self.op.events = 0
                self.op.poller = NULL
                _fd_close(self.h, -1)
            self.op.pyobj = NULL
            np_op_decref(self.op)
            self.op = NULL
            self.h = NULL

    # ---- callbacks (override) ----

    def on_open(self):
        return True

    def on_read(self):
        return len(self.read()) > 0

    def on_write(self):
        return True

    def on_timeout(self, timer_id, now):
        return True

    def on_connect_fail(self, err):
        pass

    def on_close(self):
        pass

    def on_high_watermark(self, pending):
        pass

    def on_low_watermark(self, pending):
        pass

    # ---- IOHandle ----

    def fd(self):
        """The handler's fd, or -1 before it has one and after close."""
        return self.op.fd

    def get_reactor(self):
        """The Reactor this handler is attached to (None before)."""
        return self._reactor

    @property
    def poller_index(self):
        """Index of the poller that runs this handler's callbacks (-1 if unbound)."""
        return self.rp.index if self.rp is not None else -1

    @property
    def closed(self):
        return self.closed

    def pending_output_size(self):
        """Bytes accepted by write/async_write and not yet sent."""
        return np_lb_readable(self.h.outbuf)

    @property
    def tls(self):
        """None on a plain handler; else what its TLS session negotiated
        (version(), cipher(), selected_alpn_protocol(), getpeercert(),
        server_hostname: the names of ssl.SSLObject). Complete from on_open."""
        return np_tls_info(self, self.h.tls)

    def read(self):
        """Read what the socket has into the poller's shared read buffer.

        Returns a read-only memoryview; an empty one at EOF or on a socket
        error (the connection is then done: return False). Raises
        BlockingIOError when nothing is available (edge-triggered loops stop
        there; from on_read it is treated as "keep the handler").

        The bytes are not copied. The next read on this poller reuses the
        buffer only if no view of it is alive; a view kept longer keeps its
        own memory, so it always shows the bytes it showed. Only on the
        handler's poller thread (inside callbacks).

        Over TLS the bytes are plaintext. OpenSSL may keep decrypted input
        that no socket event announces: when read() returns with some left
        (its buffer was full), on_read is called again after the current
        callback, level- or edge-triggered alike. A readable socket may
        carry only protocol records (a session ticket, say): read() then
        raises BlockingIOError, which on_read may let through."""
        cdef _ReactorPoller rp = self.rp
        cdef np_chunk_t *c
        cdef ssize_t r
        cdef int e = 0
        cdef int fd = self.op.fd
        cdef size_t cap
        if rp is None or fd < 0:
            raise ConnectionClosedError("netpoll: the handler has no open fd")
        if not rp._is_current():
            raise RuntimeError("netpoll: read() is only allowed on the handler's poller thread")
        c = rp.rchunk
        if c == NULL or np_atomic_load_int(&c.refcnt) > 1:
            # Somebody keeps a view of the last read: leave it its memory.
            if c != NULL:
                np_chunk_decref(c)
                rp.rchunk = NULL
            c = np_chunk_alloc(rp.rbuf_size)
            if c == NULL:
                raise MemoryError()
            rp.rchunk = c
        cap = rp.rbuf_size
        if self.h.tls != NULL:
            return self._read_tls(c, cap)
        with nogil:
            r = np_recv(fd, c.data, cap)
            if r < 0:
                e = errno
        if r > 0:
            np_chunk_incref(c)
            return np_export_chunk(c, c.data, <size_t>r, True)
        if r < 0 and (e == EAGAIN or e == EWOULDBLOCK):
            raise BlockingIOError(e, "netpoll: no data available")
        if r < 0:
            self.err = e
        self.eof_seen = True
        return memoryview(b"")

    def write(self, data):
        """Send `data` (any bytes-like object) now; what the socket does not
        take is copied to the output queue and sent in order as the peer
        reads (EPOLLOUT while pending). From another thread this is
        async_write(data). Returns len(data); raises ConnectionClosedError
        after close. A socket error closes the handler (on_close follows)."""
        cdef Py_buffer pb
        cdef np_handler_t *c = self.h
        cdef size_t off = 0, n
        cdef ssize_t r
        cdef int e = 0, st = 0
        cdef uint32_t want
        cdef uint64_t *qt = &self.queued_total
        cdef uint64_t *stt = &self.sent_total
        if self.closed:
            raise ConnectionClosedError("netpoll: the handler is closed")
        if self.rp is None:
            raise RuntimeError("netpoll: the handler is not attached to a reactor")
        if not self.rp._is_current():
            return self.async_write(data)
        PyObject_GetBuffer(data, &pb, PyBUF_SIMPLE)
        n = <size_t>pb.len
        try:
            if c.tls != NULL:
                return self._write_tls(<const char *>pb.buf, n)
            with nogil:
                pthread_mutex_lock(&c.op.lock)
                if self.fdstate != FD_OWNED:
                    st = 1                     # closing (or not added yet)
                elif np_lb_readable(c.outbuf) == 0 and c.op.fd >= 0 and not self.connecting:
                    while off < n:
                        r = np_send(c.op.fd, <char *>pb.buf + off, n - off)
                        if r >= 0:
                            off += <size_t>r
                            continue
                        if errno != EAGAIN and errno != EWOULDBLOCK:
                            e = errno
                        break
                if st == 0 and e == 0 and off < n:
                    st = _lb_append(c, <char *>pb.buf + off, n - off)
                    if st == 0:
                        want = _want(c, self.umask, self.connecting, self.eof_seen, False)
                        _apply_locked(c, want)
                if st <= 0:
                    qt[0] += (off if (e or st) else n)
                    stt[0] += off
                pthread_mutex_unlock(&c.op.lock)
        finally:
            PyBuffer_Release(&pb)
        return self._write_result(st, e, off, n)

    def async_write(self, data, callback=None):
        """Queue `data` (copied now) from any thread, in order with write()
        and other async_writes; the poller sends it batched with sendmsg.

        `callback(err)`, if given, is called exactly once, on the poller
        thread: with None when all of `data` was sent, with the exception
        when the connection closed first. Raises ConnectionClosedError (and
        never calls the callback) when the handler is closed or closing, so
        the data was not accepted."""
        cdef Py_buffer pb
        cdef np_handler_t *c = self.h
        cdef int st = FD_NONE
        cdef int ok = 0
        cdef np_wcb_t *w = NULL
        cdef uint64_t *qt = &self.queued_total
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable or None")
        PyObject_GetBuffer(data, &pb, PyBUF_SIMPLE)
        try:
            if callback is not None:
                w = <np_wcb_t *>PyMem_RawMalloc(sizeof(np_wcb_t))
                if w == NULL:
                    raise MemoryError()
                w.next = NULL
                w.target = 0
                w.cb = <PyObject *>callback
                Py_INCREF(callback)
            with nogil:
                pthread_mutex_lock(&c.op.lock)
                # Accepting the bytes and linking the callback happen in one
                # critical section, and a close flips fdstate and takes the
                # list in one too: either the close sees this callback, or
                # this write sees the close (and is refused).
                st = self.fdstate
                if st == FD_OWNED and _lb_append(c, <char *>pb.buf, <size_t>pb.len) == 0:
                    ok = 1
                    qt[0] += <uint64_t>pb.len
                    if w != NULL:
                        w.target = qt[0]
                        if self.wcb_tail != NULL:
                            self.wcb_tail.next = w
                        else:
                            self.wcb_head = w
                        self.wcb_tail = w
                        w = NULL
                pthread_mutex_unlock(&c.op.lock)
        finally:
            PyBuffer_Release(&pb)
            if w != NULL:                  # not accepted: never called
                Py_DECREF(<object>w.cb)
                PyMem_RawFree(w)
        if not ok:
            if st == FD_DONE:
                raise ConnectionClosedError("netpoll: the handler is closed")
            if st == FD_NONE:
                raise RuntimeError("netpoll: the handler is not attached to a reactor")
            raise MemoryError()
        rp = self.rp
        if rp is not None and not self.flush_posted:
            self.flush_posted = True
            try:
                (<_ReactorPoller>rp)._post(("flush", self))
            except BaseException:
                self.flush_posted = False
                raise

    def destroy(self):
        """Remove the handler and close its fd (any thread; idempotent).
        on_close runs once, on the poller thread (now, if called there). On a
        handler still connecting, on_connect_fail gets ConnectionAbortedError."""
        if self.closed or self.rp is None:
            return
        if self.rp._is_current():
            self._close(None)
        else:
            self.rp._post(("close", self, None))

    def schedule_timer(self, delay, interval=0):
        """Call on_timeout(timer_id, now) after `delay` seconds, then every
        `interval` seconds (if > 0) while on_timeout returns True. Any thread;
        several timers per handler; returns the timer id (distinct across
        the process). Never fires early; fires in deadline order. Both are
        finite, 0 <= seconds <= 1e9 (interval 0: one-shot)."""
        cdef int64_t d = seconds_ns(delay, "delay", none_ok=False, inf_ok=False)
        cdef int64_t iv = seconds_ns(interval, "interval", none_ok=False, inf_ok=False)
        cdef uint64_t tid
        if self.closed:
            raise ConnectionClosedError("netpoll: the handler is closed")
        if self.rp is None:
            raise RuntimeError("netpoll: the handler is not attached to a reactor")
        tid = _new_tid()
        if self.rp._is_current():
            self._add_timer(np_monotonic_ns() + d, iv, 0, tid)
        else:
            self._cancelled.add(_queued(tid))    # before the request: see _cancel_local
            self.rp._post(("timer", self, tid, np_monotonic_ns() + d, iv, 0))
        return tid

    def cancel_timer(self, timer_id):
        """Cancel a timer (any thread; unknown or finished ids are ignored).
        Once this returns, no on_timeout for it starts (one already running
        on the poller finishes, and is not re-armed)."""
        if isinstance(timer_id, bool) or not isinstance(timer_id, int):
            raise TypeError("timer_id must be an int returned by schedule_timer")
        if timer_id <= 0 or timer_id > np_rx_tid_last(&g_next_tid) or self.rp is None \
                or self.closed:
            return None
        if self.rp._is_current():
            self._cancel_local(timer_id)
        else:
            # Under the lock _timer_fired() holds from its check to the call:
            # once this returns no on_timeout for the id starts (free-threaded).
            with cython.critical_section(self):
                self._cancelled.add(timer_id)
            self.rp._post(("cancel", self, timer_id))
        return None

    def set_watermarks(self, high, low=None):
        """Call on_high_watermark(pending) when pending output reaches `high`
        bytes, then on_low_watermark(pending) once it drains to `low` (default
        high // 2). Both on the poller thread. high=None or 0 disables."""
        high = size(high, "high", none_ok=True)
        if not high:
            self.high_wm = 0
            self.low_wm = 0
            return
        low = high // 2 if low is None else size(low, "low")
        if low >= high:
            raise ValueError("need 0 <= low < high")
        self.high_wm = high
        self.low_wm = low

    def pcached_get(self, key, default=None):
        """Read the poller-local cache of this handler's poller (no lock:
        written only on that poller's thread; see Reactor.poll_sync)."""
        if self.rp is None:
            raise RuntimeError("netpoll: the handler is not attached to a reactor")
        return self.rp.pcache.get(key, default)

    def pcached_set(self, key, value):
        """Set a value in this poller's local cache (on the poller thread)."""
        if self.rp is None:
            raise RuntimeError("netpoll: the handler is not attached to a reactor")
        if not self.rp._is_current():
            raise RuntimeError("netpoll: pcached_set is only allowed on the handler's poller")
        self.rp.pcache[key] = value

    def __repr__(self):
        return (f"<{type(self).__name__} fd={self.op.fd} poller={self.poller_index}"
                f"{' closed' if self.closed else ''}>")

    # ---- internals (poller thread unless noted) ----

    cdef int _bind(self, _ReactorPoller rp) except -1:
        """Attach to rp (GIL, any thread): callbacks run on its thread, and
        rp keeps the handler alive until it closes."""
        cdef np_handler_t *c = self.h
        cdef np_poller_t *p = rp.poller.p
        if self.rp is not None:
            self.rp.handlers.pop(id(self), None)
        # Under the handler's critical section (free-threaded builds): binds from
        # two threads (two reactors, an acceptor) must not DECREF one old value
        # twice. Readers elsewhere may go unlocked: every value these fields
        # held is also referenced by its reactor (_rps, reactor_ref).
        with cython.critical_section(self):
            self.rp = rp
            self._reactor = rp.reactor_ref
        if self.fdstate == FD_NONE:
            c.op.poller = p       # no fd, in no poll set: no locked path reads it
        else:
            with nogil:        # a move: writers may be in _apply_locked
                pthread_mutex_lock(&c.op.lock)
                c.op.poller = p
                pthread_mutex_unlock(&c.op.lock)
        if not self.closed:    # a failed move rolled back after a close
            rp.handlers[id(self)] = self
        return 0

    cdef int _unbind(self) except -1:
        """Undo _bind of a handler that owns nothing (a failed add)."""
        cdef np_handler_t *c = self.h
        if self.rp is not None:
            self.rp.handlers.pop(id(self), None)
        with cython.critical_section(self):    # see _bind
            self.rp = None
            self._reactor = None
        c.op.poller = NULL        # fdstate is FD_NONE again: see _bind
        return 0

    cdef void _adopt(self, int fd) noexcept:
        """Own fd from now on (an accepted or connecting socket that is not
        in the poll set yet): the owner's identity is recorded, and from here
        only _fd_close closes it."""
        cdef np_handler_t *c = self.h
        with nogil:
            pthread_mutex_lock(&c.op.lock)
            c.op.fd = fd
            np_op_own_fd(&c.op)
            self.fdstate = FD_OWNED
            pthread_mutex_unlock(&c.op.lock)

    cdef int _watch(self, int fd, bint new_fd) noexcept:
        """Put fd in the poll set of the bound poller with the handler's mask
        (GIL, any thread). Success: 0, the handler owns fd (fdstate FD_OWNED)
        and a new fd is switched to O_NONBLOCK. Failure: errno (-1: the
        handler closed meanwhile), and op.fd, the poll set and the fd's flags
        are as they were."""
        cdef np_handler_t *c = self.h
        cdef uint32_t umask = self.umask
        cdef bint connecting = self.connecting, eof = self.eof_seen
        cdef int e = 0, old
        with nogil:
            pthread_mutex_lock(&c.op.lock)
            if self.fdstate == FD_DONE or (c.op.flags & OF_FD_CLOSED):
                e = -1
            else:
                old = c.op.fd
                c.op.fd = fd
                e = _apply_locked(c, _want(c, umask, connecting, eof, False))
                if e == 0 and new_fd:
                    # Only now: a failed add must leave the caller's fd as it was.
                    e = _set_nonblock(fd)
                    if e != 0:
                        np_op_set_interest_locked(&c.op, 0)
                if e != 0:
                    c.op.fd = old
                else:
                    self.fdstate = FD_OWNED
                    np_op_own_fd(&c.op)
            pthread_mutex_unlock(&c.op.lock)
        return e

    cdef int _sync_mask(self) except -1:
        cdef np_handler_t *c = self.h
        cdef uint32_t umask = self.umask
        cdef bint connecting = self.connecting, eof = self.eof_seen, closed = self.closed
        cdef int e
        with nogil:
            pthread_mutex_lock(&c.op.lock)
            e = _apply_locked(c, _want(c, umask, connecting, eof, closed))
            pthread_mutex_unlock(&c.op.lock)
        if e:
            raise OSError(e, f"netpoll: cannot update the poll set: {os.strerror(e)}")
        return 0

    cdef int _on_poller_event(self) except -1:
        cdef uint32_t ev = self.h.hready
        self.h.hready = 0
        # Only the owner's poller dispatches (a registration rolled back by a
        # failed add may leave one stale event queued).
        if ev and not self.closed and self.rp is not None and self.rp._is_current():
            self._dispatch(ev)
        return 0

    cdef int _dispatch(self, uint32_t ev) except -1:
        cdef bint hup = (ev & (NP_EV_HUP | NP_EV_ERR)) != 0
        if self.connecting:
            return self._finish_connect(ev)
        if self.h.tls != NULL and (ev & NP_EV_WRITE) and self.h.tls.read_wants_write:
            # SSL_read could not send its reply (read() asked for EPOLLOUT):
            # the socket has room now, so read again.
            self.h.tls.read_wants_write = 0
            self._sync_mask()
            ev |= NP_EV_READ
        if ev & NP_EV_WRITE:
            if np_lb_readable(self.h.outbuf) > 0:
                self._flush()
                if self.closed:
                    return 0
            if self.umask & NP_EV_WRITE:
                if not self._callback(self.on_write, "on_write", False):
                    return 0
        if ev & (NP_EV_READ | NP_EV_HUP | NP_EV_ERR | NP_EV_RDHUP):
            if (self.umask & NP_EV_READ) and not self.eof_seen:
                if not self._callback(self.on_read, "on_read", True):
                    return 0
                if self.eof_seen:
                    # EOF seen and the handler stays (half-close): stop
                    # asking for input, or the level-triggered EOF would spin.
                    self._sync_mask()
            elif hup:
                # Hung up and nobody reads: nothing will ever make progress.
                return self._close(None)
        return 0

    cdef int _check_high(self) except -1:
        cdef size_t pending
        if self.high_wm <= 0 or self.above_high:
            return 0
        pending = np_lb_readable(self.h.outbuf)
        if pending >= <size_t>self.high_wm:
            self.above_high = True
            try:
                self.on_high_watermark(pending)
            except BaseException:
                log.exception("netpoll: on_high_watermark raised")
        return 0

    cdef int _flush(self) except -1:
        cdef np_handler_t *c = self.h
        cdef int st = 0
        cdef uint32_t umask = self.umask
        cdef bint connecting = self.connecting, eof = self.eof_seen
        cdef uint64_t sent = 0
        cdef np_wcb_t *done = NULL
        if self.closed or c.op.fd < 0:
            return 0
        self._check_high()
        with nogil:
            pthread_mutex_lock(&c.op.lock)
            if connecting:
                pass
            elif c.tls != NULL:
                st = _tls_send_locked(c, &sent)
            else:
                st = np_send_lb(c.op.fd, c.outbuf, &sent)
            _apply_locked(c, _want(c, umask, connecting, eof, False))
            self.sent_total += sent
            if st >= 0:
                done = _wcb_take(&self.wcb_head, &self.wcb_tail, self.sent_total)
            pthread_mutex_unlock(&c.op.lock)
        if st < 0:
            self.err = -st
            return self._close(OSError(-st, os.strerror(-st)))
        return self._after_progress(done)

    cdef int _call_wcbs(self, np_wcb_t *lst, object err, uint64_t sent) except -1:
        """Call (and free) unlinked async_write callbacks: None for those whose
        bytes were all sent, else err. Poller thread."""
        cdef np_wcb_t *nxt
        while lst != NULL:
            nxt = lst.next
            cb = <object>lst.cb
            Py_DECREF(cb)                  # the list's reference; `cb` holds its own
            res = None if lst.target <= sent else err
            PyMem_RawFree(lst)
            lst = nxt
            try:
                cb(res)
            except BaseException:
                log.exception("netpoll: async_write callback raised")
        return 0

    cdef int _after_progress(self, np_wcb_t *done) except -1:
        """Completion callbacks of what was sent; the low watermark."""
        cdef size_t pending
        if done != NULL:
            self._call_wcbs(done, None, self.sent_total)
        if self.above_high:
            pending = np_lb_readable(self.h.outbuf)
            if pending <= <size_t>self.low_wm:
                self.above_high = False
                try:
                    self.on_low_watermark(pending)
                except BaseException:
                    log.exception("netpoll: on_low_watermark raised")
        return 0

    cdef int _callback(self, object cb, str name, bint blocking_ok) except -1:
        """Call a user callback whose falsy return (or exception) removes the
        handler; 1 if the handler is still open afterwards. With blocking_ok,
        BlockingIOError means "nothing more to read now" and keeps it."""
        try:
            ok = cb()
        except BaseException as e:
            if blocking_ok and isinstance(e, BlockingIOError):
                ok = True          # drained (edge-triggered) or spurious
            else:
                log.exception("netpoll: %s raised; closing the handler", name)
                ok = False
        if self.closed:
            return 0
        if not ok:
            self._close(None)
            return 0
        return 1

    cdef int _close(self, object err) except -1:
        """Remove the handler: last attempt to send pending output, failed
        completion callbacks, on_close once, then the fd is closed."""
        cdef np_handler_t *c = self.h
        cdef uint64_t sent = 0
        cdef np_wcb_t *cbs = NULL
        cdef bint try_send = err is None
        if self.closed:
            return 0
        if self.connecting:
            return self._connect_failed(ConnectionAbortedError(
                "netpoll: the connect was aborted (handler destroyed or reactor stopped)"))
        self.closed = True
        self._drop_timers()
        with nogil:
            pthread_mutex_lock(&c.op.lock)
            if c.tls != NULL:
                if c.op.fd >= 0 and try_send and (np_lb_readable(c.outbuf) == 0
                                                  or _tls_send_locked(c, &sent) == 0):
                    np_tls_close_notify(c.tls)   # best effort: the end was meant
            elif c.op.fd >= 0 and np_lb_readable(c.outbuf) > 0 and try_send:
                np_send_lb(c.op.fd, c.outbuf, &sent)
            _apply_locked(c, 0)
            self.sent_total += sent
            # From here on writes are refused, so these are all the callbacks
            # there will ever be.
            self.fdstate = FD_DONE
            cbs = _wcb_take(&self.wcb_head, &self.wcb_tail, ALL_WCBS)
            pthread_mutex_unlock(&c.op.lock)
        exc = err if err is not None else ConnectionClosedError(
            "netpoll: the connection closed before the data was sent")
        self._call_wcbs(cbs, exc, self.sent_total)
        try:
            self.on_close()
        except BaseException:
            log.exception("netpoll: on_close raised")
        with nogil:
            if c.tls != NULL:
                _tls_detach(c.tls)
            _fd_close(c, -1)
            pthread_mutex_lock(&c.op.lock)
            np_lb_clear(c.outbuf)
            pthread_mutex_unlock(&c.op.lock)
        if self.rp is not None:
            self.rp.handlers.pop(id(self), None)
        if self._pool is not None:
            self._pool._handler_event(self, "close")
        return 0

    cdef int _connect_failed(self, object exc) except -1:
        cdef np_handler_t *c = self.h
        cdef np_wcb_t *cbs = NULL
        if self.closed:
            return 0
        self.closed = True
        self.connecting = False
        self._drop_timers()
        with nogil:
            pthread_mutex_lock(&c.op.lock)
            _apply_locked(c, 0)
            self.fdstate = FD_DONE
            cbs = _wcb_take(&self.wcb_head, &self.wcb_tail, ALL_WCBS)
            np_lb_clear(c.outbuf)
            pthread_mutex_unlock(&c.op.lock)
            if c.tls != NULL:
                _tls_detach(c.tls)
            _fd_close(c, -1)
        # Nothing was sent before the connection existed: every callback fails.
        self._call_wcbs(cbs, exc, 0)
        if self.accepting:
            # An accepted peer that did not complete the TLS handshake: the
            # handler never opened, so nothing is called (as create_listener).
            log.debug("netpoll: TLS handshake of an accepted connection failed: %s", exc)
        else:
            try:
                self.on_connect_fail(exc)
            except BaseException:
                log.exception("netpoll: on_connect_fail raised")
        if self.rp is not None:
            self.rp.handlers.pop(id(self), None)
        if self._pool is not None:
            self._pool._handler_event(self, "fail")
        return 0

    cdef int _finish_connect(self, uint32_t ev) except -1:
        cdef int e = 0
        cdef socklen_t n = sizeof(int)
        if self.op.fd < 0:
            return 0
        if self.h.tls != NULL and self.h.hs != HS_NONE:
            return self._finish_handshake()
        if getsockopt(self.op.fd, SOL_SOCKET, SO_ERROR, &e, &n) < 0:
            e = errno
        if e == 0 and not (ev & NP_EV_WRITE):
            return 0                         # not yet
        if e:
            return self._connect_failed(conn_error(e, self.connect_addr))
        if self.h.tls != NULL:
            return self._start_handshake()  # connected: on_open after the handshake
        self.connecting = False
        if self.connect_tid:
            self._cancel_local(self.connect_tid)
            self.connect_tid = 0
        self._sync_mask()
        return _open(self)

    cdef int _start_handshake(self) except -1:
        """Begin the TLS handshake of a connected (or accepted) fd, on its
        poller: the first flight now, the rest from the ready callback. Its
        limit: the connect timer if one runs, else hs_timeout_ns."""
        cdef np_handler_t *c = self.h
        cdef bint ended
        if self.closed or not self.connecting or c.tls == NULL or c.hs != HS_NONE:
            return 0
        if self.connect_tid == 0 and self.hs_timeout_ns > 0:
            self.connect_tid = _new_tid()
            self._add_timer(np_monotonic_ns() + self.hs_timeout_ns, 0, 1, self.connect_tid)
        c.hs = HS_RUN
        with nogil:
            ended = _hs_step(c)
        if ended:
            return self._finish_handshake()
        return 0

    cdef int _finish_handshake(self) except -1:
        """The handshake ended (GIL phase): on_open, or a failed open."""
        cdef np_handler_t *c = self.h
        if c.hs == HS_RUN or c.hs == HS_NONE:
            return 0                         # still running (a stale event)
        if c.hs == HS_FAILED:
            c.hs = HS_NONE
            return self._connect_failed(np_tls_error(c.tls))
        c.hs = HS_NONE
        self.connecting = False
        self.accepting = False
        if self.connect_tid:
            self._cancel_local(self.connect_tid)
            self.connect_tid = 0
        self._sync_mask()
        _open(self)
        if not self.closed:
            # The last flight may have carried application data, decrypted
            # or buffered by now: no socket event will announce it (input
            # still in the socket is reported when on_open registers EV_IN).
            self._post_tls_read()
        return 0

    cdef int _post_tls_read(self) except -1:
        if not self.tls_posted:
            self.tls_posted = True
            self.rp._post(("tls_read", self))
        return 0

    cdef int _tls_read_again(self) except -1:
        """A "tls_read" request: re-deliver on_read if input waits inside
        OpenSSL (the socket will not say so)."""
        self.tls_posted = False
        if self.closed or self.connecting or self.eof_seen or self.h.tls == NULL \
                or not (self.umask & NP_EV_READ):
            return 0
        if not self.tls_more and not np_tls_pending(self.h.tls):
            return 0
        self.tls_more = False
        return self._dispatch(NP_EV_READ)

    cdef object _read_tls(self, np_chunk_t *ck, size_t cap):
        """read() over TLS: plaintext into ck, several records while OpenSSL
        holds more and there is room."""
        cdef np_tls_t *t = self.h.tls
        cdef size_t got = 0
        cdef ssize_t r = 0
        cdef int e = 0
        cdef bint more = False
        if self.connecting:
            # SSL_read would drive the handshake behind the poller's back.
            raise BlockingIOError(EAGAIN, "netpoll: the TLS handshake is not done")
        with nogil:
            while True:
                r = np_tls_recv(t, ck.data + got, cap - got)
                if r <= 0:
                    if r < 0:
                        e = errno
                    break
                got += <size_t>r
                if got == cap:
                    more = np_tls_pending(t)
                    break
                if not np_tls_pending(t):
                    break
        if r < 0 and t.read_wants_write:
            self._sync_mask()                # EPOLLOUT until SSL_read's reply fits
        if got > 0:
            if r == 0 or (r < 0 and e != EAGAIN and e != EWOULDBLOCK):
                more = True                  # the end is still to be reported
            self.tls_more = more
            if more:
                self._post_tls_read()
            np_chunk_incref(ck)
            return np_export_chunk(ck, ck.data, got, True)
        self.tls_more = False
        if r < 0 and (e == EAGAIN or e == EWOULDBLOCK):
            raise BlockingIOError(e, "netpoll: no data available")
        if r < 0:
            self.err = e
        self.eof_seen = True
        return memoryview(b"")

    cdef object _write_tls(self, const char *p, size_t n):
        """write() over TLS, on the poller: the bytes are copied to the
        output first (a retried SSL_write must be offered the same bytes,
        and the caller may reuse its buffer once write() returns), then
        encrypted and sent from there if nothing was queued before."""
        cdef np_handler_t *c = self.h
        cdef size_t before = 0
        cdef uint64_t sent = 0
        cdef int st = 0, e = 0, r
        cdef bint connecting = self.connecting
        cdef uint64_t *qt = &self.queued_total
        cdef uint64_t *stt = &self.sent_total
        with nogil:
            pthread_mutex_lock(&c.op.lock)
            if self.fdstate != FD_OWNED:
                st = 1
            else:
                before = np_lb_readable(c.outbuf)
                st = _lb_append(c, p, n)
                if st == 0:
                    qt[0] += n
                    if before == 0 and not connecting:
                        r = _tls_send_locked(c, &sent)
                        stt[0] += sent
                        if r < 0:
                            e = -r
                    if e == 0:
                        _apply_locked(c, _want(c, self.umask, connecting, self.eof_seen, False))
            pthread_mutex_unlock(&c.op.lock)
        return self._write_result(st, e, sent, n)

    cdef object _write_result(self, int st, int e, size_t sent, size_t n):
        """What write() returns (or raises) after a send attempt: st > 0 the
        handler is closed, st < 0 out of memory; an errno closes the handler
        (the bytes sent so far are returned); else n, with the high watermark
        checked when not all of it went out."""
        if st > 0:
            raise ConnectionClosedError("netpoll: the handler is closed")
        if st < 0:
            raise MemoryError()
        if e:
            self.err = e
            self.rp._post(("close", self, OSError(e, os.strerror(e))))
            return sent
        if sent < n:
            self._check_high()
        return n

    cdef uint64_t _add_timer(self, int64_t when, int64_t interval_ns, int internal,
                             uint64_t tid) except 0:
        """A timer in the heap of the handler's poller: on that poller's
        thread only (schedule_timer there, or a request it runs)."""
        cdef np_utimer_t *u = <np_utimer_t *>PyMem_RawMalloc(sizeof(np_utimer_t))
        if u == NULL:
            raise MemoryError()
        memset(u, 0, sizeof(np_utimer_t))
        timer_init(&u.t)
        u.t.kind = TM_USER
        u.t.data = <void *>self.rp.ctl
        u.t.when = when
        u.interval_ns = interval_ns
        u.tid = tid
        u.internal = internal
        if timer_heap_push(&self.rp.poller.p.timers, &u.t) < 0:
            PyMem_RawFree(u)
            raise MemoryError()
        # A real reference (uvloop's rule): the expiry path hands u.handler
        # to Python, so the handler must outlive every timer that names it.
        Py_INCREF(self)
        u.handler = <void *>self
        self._timers[tid] = <size_t>u
        return tid

    cdef int _timer_fired(self, np_utimer_t *u, int64_t now) except -1:
        cdef uint64_t tid = u.tid
        cdef int64_t nxt
        if u.internal:
            self._timers.pop(tid, None)
            _free_timer(u)
            if self.connecting and tid == self.connect_tid and not self.closed:
                self.connect_tid = 0
                if self.accepting:
                    msg = f"netpoll: TLS handshake timed out after {self.hs_timeout_ns / 1e9}s"
                elif self.h.hs != HS_NONE and self.connect_timeout is None:
                    msg = (f"netpoll: TLS handshake with {self.connect_addr!r} timed out "
                           f"after {self.hs_timeout_ns / 1e9}s")
                elif self.h.hs != HS_NONE:
                    msg = (f"netpoll: connect to {self.connect_addr!r} timed out after "
                           f"{self.connect_timeout}s (in the TLS handshake)")
                else:
                    msg = (f"netpoll: connect to {self.connect_addr!r} timed out after "
                           f"{self.connect_timeout}s")
                self._connect_failed(DialTimeoutError(msg))
            return 0
        # The check and the start of the call are one step for cancel_timer()
        # from another thread (it adds under the same lock): on a free-threaded
        # build, without it, a cancel that returned could still see the call.
        on_timeout = self.on_timeout
        with cython.critical_section(self):
            if self.closed or tid in self._cancelled:
                self._cancelled.discard(tid)
                self._timers.pop(tid, None)
                _free_timer(u)
                return 0
            again = _call_on_timeout(on_timeout, tid, now)
        if u.handler == NULL:
            _free_timer(u)                   # the handler closed in the callback
            return 0
        if u.interval_ns > 0 and again and tid not in self._cancelled:
            nxt = u.t.when + u.interval_ns
            if nxt <= now:
                nxt = now + u.interval_ns     # we fell behind: no burst of catch-ups
            u.t.when = nxt
            if timer_heap_push(_heap_of(u), &u.t) == 0:
                return 0
            # Out of memory for the heap: the interval cannot go on. Say so
            # rather than let it stop without a trace.
            log.error("netpoll: interval timer %d of %r stopped: no memory to re-arm it",
                      tid, self)
        self._cancelled.discard(tid)
        self._timers.pop(tid, None)
        _free_timer(u)
        return 0

    cdef int _cancel_local(self, uint64_t tid) except -1:
        cdef np_utimer_t *u
        addr = self._timers.get(tid)
        if addr is None:
            if not self.closed and _queued(tid) in self._cancelled:
                # Not created yet (a request from another thread is queued,
                # maybe re-posted after a move): the creation checks this set.
                self._cancelled.add(tid)
            else:
                # Finished (or never this handler's): nothing can fire any
                # more, so keep nothing, and drop what a cross-thread
                # cancel_timer() recorded. Ids are never reused, and a timer
                # only goes queued -> live -> finished, so this is final.
                self._cancelled.discard(tid)
            return 0
        u = <np_utimer_t *><size_t>addr
        if u.t.index >= 0:
            timer_heap_remove(_heap_of(u), &u.t)
            del self._timers[tid]
            self._cancelled.discard(tid)
            _free_timer(u)
        else:
            self._cancelled.add(tid)         # fired, waiting in this batch
        return 0

    cdef int _drop_timers(self) except -1:
        cdef np_utimer_t *u
        for addr in self._timers.values():
            u = <np_utimer_t *><size_t>addr
            if u.t.index >= 0:
                timer_heap_remove(_heap_of(u), &u.t)
                _free_timer(u)
            else:
                _orphan_timer(u)             # in the fired list: freed there
        self._timers.clear()
        self._cancelled.clear()
        return 0

# -------------------------------------------------------------- the reactor


cdef class Reactor:
    """goev's Reactor: `poll_num` poller threads running EvHandlers.

    The pollers start at construction (so acceptors and connectors work at
    once); ``run()`` blocks the calling thread until ``stop()``. ``stop()``
    (any thread, also from a callback) closes every listener of the
    reactor's Acceptors, calls ``on_close`` once for every open handler
    (``on_connect_fail`` for connects in progress) on its poller, stops the
    pollers and makes ``run()`` return. A Reactor runs once."""
    cdef readonly int poll_num
    cdef readonly size_t read_buffer_size
    cdef list _rps
    cdef object _lock
    cdef object _stop_event
    cdef object _done_event
    cdef bint _running
    cdef bint _stopping
    cdef bint _shut
    cdef list _acceptors
    cdef unsigned int _rr
    cdef object __weakref__

    def __init__(self, poll_num=1, read_buffer_size=65536):
        if isinstance(poll_num, bool) or not isinstance(poll_num, int):
            raise TypeError("poll_num must be an int")
        if not 1 <= poll_num <= 1024:
            raise ValueError(f"poll_num must be in 1..1024, got {poll_num}")
        if isinstance(read_buffer_size, bool) or not isinstance(read_buffer_size, int):
            raise TypeError("read_buffer_size must be an int")
        if not 1 <= read_buffer_size <= MAX_READ_BUFFER:
            raise ValueError(f"read_buffer_size must be in 1..{MAX_READ_BUFFER}")
        if self._rps is not None:
            raise RuntimeError("Reactor already initialised")
        self.poll_num = poll_num
        self.read_buffer_size = read_buffer_size
        # Re-entrant: add_ev_handler holds it across its registration, and a
        # finalizer run by the GC there may call stop().
        self._lock = threading.RLock()
        self._stop_event = threading.Event()
        self._done_event = threading.Event()
        self._acceptors = []
        self._rps = [_ReactorPoller(self, i, read_buffer_size) for i in range(poll_num)]
        for rp in self._rps:
            (<_ReactorPoller>rp).poller.start()
        g_live_reactors.add(self)

    # ---- handlers ----

    cdef _ReactorPoller _current(self):
        for rp in self._rps:
            if (<_ReactorPoller>rp)._is_current():
                return rp
        return None

    cdef _ReactorPoller _pick(self, object index):
        cdef _ReactorPoller rp
        if index is not None:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError("poller must be an int index")
            if not 0 <= index < self.poll_num:
                raise ValueError(f"poller must be in 0..{self.poll_num - 1}")
            return self._rps[index]
        rp = self._current()
        if rp is not None:
            return rp
        self._rr += 1
        return self._rps[self._rr % self.poll_num]

    cdef int _check_open(self) except -1:
        if self._stopping or self._shut:
            raise RuntimeError("netpoll: the reactor is stopping")
        return 0

    def add_ev_handler(self, EvHandler handler not None, fd, events, *, poller=None):
        """Watch `fd` for `events` (EV_IN, EV_OUT, | EV_ET) and call the
        handler's callbacks on its poller. A handler that is not bound yet goes
        to `poller` (an index), else the calling poller (an accepted or
        connected handler stays where it was opened), else round-robin.
        `poller` given for a bound handler moves it (only before it has
        events, timers or pending output, and not while connecting).

        On success the handler owns `fd`: it is switched to non-blocking
        (O_NONBLOCK: a blocking send would stall the poller) and closed after
        on_close. On failure nothing changes: the caller keeps its fd (flags
        untouched), the handler is not added (and unbound again if this call
        bound it; no on_close will follow), and OSError says why, with its
        errno: EPERM (a regular file or directory cannot be polled), EEXIST
        (the fd is already in this poller's set), EBADF (not an open fd)."""
        cdef _ReactorPoller rp
        cdef _ReactorPoller old_rp
        cdef int cfd, e = 0
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise TypeError("fd must be an int")
        if not 0 <= fd <= FD_MAX:
            raise ValueError(f"fd must be a descriptor number in 0..{FD_MAX}, got {fd}")
        _check_events(events)
        # Under the reactor lock: a stop() that starts meanwhile waits, so its
        # shutdown then finds the handler among its poller's handlers.
        with self._lock:
            self._check_open()
            if handler.closed:
                raise ConnectionClosedError("netpoll: the handler is closed")
            if handler.registered:
                raise ValueError("handler already added; use append_event/remove_event")
            cfd = handler.op.fd
            if cfd >= 0 and cfd != fd:
                raise ValueError(f"handler already owns fd {cfd}")
            old_rp = handler.rp
            if old_rp is None:
                rp = self._pick(poller)
            else:
                if handler._reactor is not self:
                    raise ValueError("handler belongs to another reactor")
                rp = old_rp if poller is None else self._pick(poller)
                if rp is not old_rp and (handler.connecting or handler.op.events
                                         or handler._timers
                                         or np_lb_readable(handler.h.outbuf)):
                    raise RuntimeError(
                        "cannot move a handler with events, timers or output, or connecting")
            if rp.stopping:
                raise RuntimeError("netpoll: the reactor is stopping")
            old_umask = handler.umask
            if rp is not old_rp:
                handler._bind(rp)
            handler.umask = events
            handler.registered = True
            e = handler._watch(fd, cfd < 0)
            if e == 0:
                if handler.h.tls != NULL:
                    # Input OpenSSL holds already is announced by no event.
                    handler.rp._post(("tls_read", handler))
                return None
            handler.registered = False
            handler.umask = old_umask
            if rp is not old_rp:
                if old_rp is None:
                    handler._unbind()
                else:
                    handler._bind(old_rp)
        if e < 0:
            raise ConnectionClosedError("netpoll: the handler is closed")
        hint = ""
        if e == EPERM:
            hint = " (regular files and directories cannot be polled)"
        elif e == EEXIST:
            hint = " (it is already in this poller's set, e.g. added to another handler)"
        elif e == EBADF:
            hint = " (not an open file descriptor)"
        raise OSError(e, f"netpoll: cannot watch fd {fd}: {os.strerror(e)}{hint}")

    def append_event(self, EvHandler handler not None, events):
        """Also watch for `events`."""
        _check_events(events)
        if not handler.registered or handler.closed:
            raise ValueError("handler is not added to this reactor")
        handler.umask |= events
        handler._sync_mask()
        if handler.h.tls != NULL and (events & NP_EV_READ):
            handler.rp._post(("tls_read", handler))   # see add_ev_handler

    def remove_event(self, EvHandler handler not None, events):
        """Stop watching for `events` (the handler stays; see destroy())."""
        _check_events(events)
        if not handler.registered or handler.closed:
            raise ValueError("handler is not added to this reactor")
        handler.umask &= ~(<uint32_t>events)
        if not (handler.umask & (NP_EV_READ | NP_EV_WRITE)):
            handler.umask = 0
        handler._sync_mask()

    # ---- used by netpoll.reactor (Acceptor, Connector) ----

    def _attach(self, EvHandler handler not None, int fd, int index, sslctx=None,
                hs_timeout=None):
        """An accepted fd, owned by the reactor from this call: the handler
        adopts it on poller `index` and on_open runs there. False (the fd is
        closed) when the reactor is stopping or the handler is in use. With
        `sslctx` (a server ssl.SSLContext) a TLS handshake runs first, within
        `hs_timeout` seconds (None: no limit); a failed one closes the fd and
        calls nothing."""
        cdef _ReactorPoller rp
        cdef np_handler_t *c = handler.h
        cdef int64_t hs_ns = 0
        try:
            if not 0 <= index < self.poll_num:
                raise ValueError(f"poller index {index} out of range")
            if sslctx is not None:
                hs_ns = seconds_ns(hs_timeout, "ssl_handshake_timeout")
        except BaseException:
            _fd_close(NULL, fd)
            raise
        rp = self._rps[index]
        if self._stopping or self._shut or rp.stopping or handler.rp is not None \
                or handler.closed or c.op.fd >= 0 or c.tls != NULL:
            _fd_close(NULL, fd)
            return False
        if sslctx is not None:
            try:
                c.tls = np_tls_open(sslctx, fd, True, None)
            except BaseException:
                _fd_close(NULL, fd)
                raise
            handler.connecting = True
            handler.accepting = True
            handler.hs_timeout_ns = hs_ns if hs_ns > 0 else 0
        handler._bind(rp)
        handler._adopt(fd)
        if c.tls != NULL:
            if rp._is_current():
                handler._start_handshake()
            else:
                rp._post(("handshake", handler))
        elif rp._is_current():
            _open(handler)
        else:
            rp._post(("open", handler))
        return True

    def _connect(self, EvHandler handler not None, int fd, int err, timeout, addr,
                 sslctx=None, server_hostname=None):
        """A socket whose non-blocking connect returned `err`, owned by the
        reactor from this call: the handler adopts it (on_open or
        on_connect_fail follows), else it is closed and the error raised.
        With `sslctx` (a client ssl.SSLContext) a TLS handshake follows the
        connect, within `timeout` too (None: 10 s for the handshake)."""
        cdef _ReactorPoller rp
        cdef np_handler_t *c = handler.h
        cdef int64_t tns = 0
        try:
            if timeout is not None:
                tns = seconds_ns(timeout, "connect timeout", none_ok=False, inf_ok=False,
                                 zero_ok=False)
            if self._stopping or self._shut:
                raise RuntimeError("netpoll: the reactor is stopping")
            if handler.rp is not None or handler.closed or c.op.fd >= 0 or c.tls != NULL:
                raise ValueError("handler is already in use")
            if sslctx is not None:
                c.tls = np_tls_open(sslctx, fd, False, server_hostname)
                handler.hs_timeout_ns = tns if tns else DEFAULT_HS_NS
        except BaseException:
            _fd_close(NULL, fd)
            raise
        rp = self._pick(None)
        handler._bind(rp)
        handler.connecting = True
        handler.connect_addr = addr
        handler.connect_timeout = timeout
        handler._adopt(fd)
        if err == 0:
            rp._post(("connected", handler))
        elif err == EINPROGRESS or err == EAGAIN or err == EALREADY:
            if tns:
                handler.connect_tid = _new_tid()
                handler._cancelled.add(_queued(handler.connect_tid))
                rp._post(("timer", handler, handler.connect_tid, np_monotonic_ns() + tns, 0, 1))
            try:
                handler._sync_mask()
            except OSError as e:
                rp._post(("connect_fail", handler, conn_error(e.errno or _errno.EIO, addr)))
        else:
            rp._post(("connect_fail", handler, conn_error(err, addr)))
        return None

    def _register_acceptor(self, acc):
        with self._lock:
            self._check_open()
            self._acceptors.append(acc)

    def _unregister_acceptor(self, acc):
        with self._lock:
            if acc in self._acceptors:
                self._acceptors.remove(acc)

    def _poller(self, int index):
        return (<_ReactorPoller>self._rps[index]).poller

    def _current_index(self):
        rp = self._current()
        return -1 if rp is None else (<_ReactorPoller>rp).index

    # ---- poller cache ----

    def poll_sync(self, key, value):
        """Set `key` to `value` in every poller's local cache, each on its own
        thread (handlers then read it lock-free with pcached_get). Returns a
        threading.Event set once every poller has applied it."""
        hash(key)
        self._check_open()
        done = threading.Event()
        state = [threading.Lock(), self.poll_num, done]
        for rp in self._rps:
            (<_ReactorPoller>rp)._post(("sync", key, value, state))
        return done

    # ---- lifecycle ----

    def run(self):
        """Block until stop(); then every handler is closed and the pollers
        have stopped. A reactor runs once: if stop() came first (a signal
        before run() was reached, say), run() returns as soon as the
        shutdown is complete."""
        with self._lock:
            stopped = self._shut or self._stopping
            if not stopped and self._running:
                raise RuntimeError("netpoll: the reactor is already running")
            if self._current() is not None:
                raise RuntimeError("netpoll: run() called from the reactor's own poller")
            if not stopped:
                self._running = True
        if stopped:
            self._done_event.wait()
            return
        try:
            while not self._stop_event.wait(0.5):
                pass
        finally:
            self._shutdown()

    def stop(self):
        """Stop the reactor (any thread, idempotent). Without a running run(),
        this call does the shutdown itself (in a helper thread when called
        from one of the reactor's pollers)."""
        with self._lock:
            self._stopping = True
            running = self._running
        self._stop_event.set()
        if not running:
            if self._current() is not None:
                threading.Thread(target=self._shutdown, name="netpoll-reactor-stop",
                                 daemon=True).start()
            else:
                self._shutdown()

    def _shutdown(self):
        with self._lock:
            self._stopping = True
            if self._shut:
                first = False
            else:
                self._shut = True
                first = True
            acceptors = list(self._acceptors)
            self._acceptors = []
        if not first:
            self._done_event.wait(10)
            return
        for acc in acceptors:
            try:
                acc.close()
            except BaseException:
                log.exception("netpoll: error closing an acceptor")
        events = []
        for rp in self._rps:
            ev = threading.Event()
            (<_ReactorPoller>rp)._post(("shutdown", ev))
            events.append(ev)
        for ev in events:
            if not ev.wait(10):
                log.warning("netpoll: a reactor poller did not shut down in time")
        alive = False
        for rp in self._rps:
            (<_ReactorPoller>rp).poller.stop(5)
            alive = alive or (<_ReactorPoller>rp).poller.is_alive()
        if not alive:
            g_live_reactors.discard(self)
        self._done_event.set()

    def wait_stopped(self, timeout=None):
        """Wait until the shutdown finished (at most `timeout` seconds; None
        or inf: no limit); True if it has."""
        return self._done_event.wait(seconds(timeout, "timeout"))

    @property
    def stopped(self):
        return self._done_event.is_set()

    def stats(self):
        """Per poller: handlers bound, queued requests, poller counters."""
        out = []
        for rp in self._rps:
            s = (<_ReactorPoller>rp).poller.stats()
            s["handlers"] = len((<_ReactorPoller>rp).handlers)
            s["requests"] = len((<_ReactorPoller>rp).xq)
            out.append(s)
        return out

    def __repr__(self):
        state = "stopped" if self._shut else ("running" if self._running else "ready")
        return f"<Reactor poll_num={self.poll_num} {state}>"
