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
# which puts the control operator in the next GIL phase.
#
# Timers are np_utimer_t in the poller's own 4-ary heap (kind TM_USER); they
# are created, fired and freed on the poller thread only, so a cancel from
# another thread never touches timer memory (it is a request, see above).
#
# Output: write() sends directly when nothing is queued; the rest is copied to
# the connection's output LinkBuffer and sent by the poller with sendmsg
# (many iovecs) on EPOLLOUT. The connection lock orders writers of any thread
# and is only ever taken without the GIL (a thread holding it never waits
# for the GIL), and never across a blocking call (sockets are non-blocking).

import collections
import errno as _errno
import logging
import math
import os
import threading

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBuffer_FillInfo, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from netpoll._core.includes.system cimport (
    pthread_mutex_destroy, np_atomic_load_uint,
    errno, EAGAIN, EWOULDBLOCK, EINTR,
    EINPROGRESS,
    pthread_mutex_lock, pthread_mutex_unlock,
    NP_EV_READ, NP_EV_WRITE, NP_EV_HUP, NP_EV_ERR, NP_EV_RDHUP, NP_EV_ET, NP_MSG_NOSIGNAL,
    np_atomic_cas_int, np_atomic_store_int, np_atomic_load_int, np_monotonic_ns,
)
from netpoll._core.poller cimport (
    Operator, Poller, np_op_t, np_op_kind_t, np_poller_t, np_op_init, np_op_own_fd,
    np_op_decref, np_op_submit, np_op_set_interest_locked, np_op_close_fd, np_op_gil,
    np_poller_timer_push, np_on_poller_thread, OF_FD_CLOSED, T_CALL, GR_EVENT,
)
from netpoll._core.sockio cimport np_recv, np_send, np_send_lb
from netpoll._core.timer cimport np_timer_t, timer_init, timer_heap_push, timer_heap_remove
from netpoll._core.linkbuffer cimport (
    np_chunk_t, np_chunk_alloc, np_chunk_incref, np_chunk_decref, np_lb_new, np_lb_readable,
    np_lb_reserve, np_lb_commit, np_lb_clear, np_lb_free,
)

from netpoll.errors import ConnectionClosedError, DialTimeoutError

log = logging.getLogger("netpoll")

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    int SOL_SOCKET, SO_ERROR

cdef extern from "<errno.h>" nogil:
    int EALREADY, ECONNREFUSED, ETIMEDOUT

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

cdef uint64_t g_next_tid = 0     # timer ids: distinct for the whole process (GIL)

# Reactors whose pollers run. Their threads use memory the Reactor owns
# (timers, control blocks), so a reactor that was not stopped must never be
# collected: it stays here until its shutdown completes.
cdef set g_live_reactors = set()


cdef inline uint64_t _new_tid():
    global g_next_tid
    g_next_tid += 1
    return g_next_tid


cdef int64_t _seconds_ns(object v, str what, bint allow_zero) except -1:
    """A non-negative finite number of seconds as nanoseconds (rounded up,
    so that a timer never fires early)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f) or f < 0 or (f == 0 and not allow_zero):
        raise ValueError(f"{what} must be a finite number of seconds "
                         f"{'>= 0' if allow_zero else '> 0'}, got {v!r}")
    if f > 1e9:
        raise ValueError(f"{what} is too large: {v!r}")
    return <int64_t>math.ceil(f * 1e9)


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


cdef np_op_kind_t CTL_KIND
CTL_KIND.name = "reactor control"
CTL_KIND.ready = NULL
CTL_KIND.timer = _ctl_timer
CTL_KIND.task = _ctl_task
CTL_KIND.deferred = NULL
CTL_KIND.free = _ctl_free

cdef np_op_kind_t HANDLER_KIND
HANDLER_KIND.name = "reactor handler"
HANDLER_KIND.ready = _handler_ready
HANDLER_KIND.timer = NULL
HANDLER_KIND.task = NULL
HANDLER_KIND.deferred = NULL
HANDLER_KIND.free = _handler_free


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
        h.hready |= ev
        np_op_gil(p, op, GR_EVENT)
    return 0


cdef void _handler_free(np_op_t *op) noexcept nogil:
    cdef np_handler_t *h = <np_handler_t *>op
    np_lb_free(h.outbuf)
    pthread_mutex_destroy(&h.op.lock)
    PyMem_RawFree(h)


cdef class _ReadView:
    """Read-only export of one read: holds a reference to the chunk, so the
    bytes stay valid (and unchanged) as long as any view of them lives."""
    cdef np_chunk_t *chunk
    cdef char *ptr
    cdef Py_ssize_t size

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("netpoll: read() views are read-only")
        PyBuffer_FillInfo(buf, self, self.ptr, self.size, 1, flags)

    def __releasebuffer__(self, Py_buffer *buf):
        pass

    def __dealloc__(self):
        if self.chunk != NULL:
            np_chunk_decref(self.chunk)
            self.chunk = NULL

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
        cdef np_utimer_t *u = self.ctl.fired_head
        cdef np_utimer_t *nxt
        cdef EvHandler h
        self.ctl.fired_head = NULL
        self.ctl.fired_tail = NULL
        while u != NULL:
            nxt = u.next
            u.next = NULL
            if u.handler == NULL:
                PyMem_RawFree(u)           # its handler closed meanwhile
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
        if kind == "flush":
            h = item[1]
            h.flush_posted = False
            if not h.closed:
                h._flush()
        elif kind == "timer":
            h = item[1]
            tid = item[2]
            if h.closed or tid in h._cancelled or (item[5] and not h.connecting):
                h._cancelled.discard(tid)
            else:
                h._add_timer(item[3], item[4], item[5], tid)
        elif kind == "cancel":
            h = item[1]
            h._cancel_local(item[2])
        elif kind == "close":
            h = item[1]
            h._close(item[2])
        elif kind == "open":
            h = item[1]
            _open(h)
        elif kind == "connected":
            h = item[1]
            if h.connecting and not h.closed:
                h._finish_connect(NP_EV_WRITE)
        elif kind == "connect_fail":
            h = item[1]
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


cdef int _open(EvHandler h) except -1:
    """Call on_open on h's poller; a falsy return (or an exception) closes it."""
    if h.closed:
        return 0
    if not h._callback(h.on_open, "on_open", False):
        return 0
    if h._pool is not None:
        h._pool._handler_event(h, "open")
    if np_lb_readable(h.h.outbuf) > 0:
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
        self._wcb = []
        self._pool = None

    def __dealloc__(self):
        cdef np_utimer_t *u
        if self.op != NULL:
            if self._timers:
                for addr in self._timers.values():
                    u = <np_utimer_t *><size_t>addr
                    if u.t.index < 0:
                        u.handler = NULL
            np_op_close_fd(self.op, NULL)
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

    def read(self):
        """Read what the socket has into the poller's shared read buffer.

        Returns a read-only memoryview; an empty one at EOF or on a socket
        error (the connection is then done: return False). Raises
        BlockingIOError when nothing is available (edge-triggered loops stop
        there; from on_read it is treated as "keep the handler").

        The bytes are not copied. The next read on this poller reuses the
        buffer only if no view of it is alive; a view kept longer keeps its
        own memory, so it always shows the bytes it showed. Only on the
        handler's poller thread (inside callbacks)."""
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
        with nogil:
            r = np_recv(fd, c.data, cap)
            if r < 0:
                e = errno
        if r > 0:
            np_chunk_incref(c)
            v = _ReadView.__new__(_ReadView)
            (<_ReadView>v).chunk = c
            (<_ReadView>v).ptr = c.data
            (<_ReadView>v).size = r
            return memoryview(v)
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
            with nogil:
                pthread_mutex_lock(&c.op.lock)
                if np_lb_readable(c.outbuf) == 0 and c.op.fd >= 0 and not self.connecting:
                    while off < n:
                        r = np_send(c.op.fd, <char *>pb.buf + off, n - off)
                        if r >= 0:
                            off += <size_t>r
                            continue
                        if errno != EAGAIN and errno != EWOULDBLOCK:
                            e = errno
                        break
                if e == 0 and off < n:
                    st = _lb_append(c, <char *>pb.buf + off, n - off)
                    if st == 0:
                        want = _want(c, self.umask, self.connecting, self.eof_seen, False)
                        _apply_locked(c, want)
                qt[0] += (off if (e or st) else n)
                stt[0] += off
                pthread_mutex_unlock(&c.op.lock)
        finally:
            PyBuffer_Release(&pb)
        if st < 0:
            raise MemoryError()
        if e:
            self.err = e
            self.rp._post(("close", self, OSError(e, os.strerror(e))))
            return off
        if off < n:
            self._check_high()
        return n

    def async_write(self, data, callback=None):
        """Queue `data` (copied now) from any thread, in order with write()
        and other async_writes; the poller sends it batched with sendmsg.

        `callback(err)`, if given, is called once on the poller thread:
        with None when all of `data` was sent, with the exception when the
        connection closed first. Raises ConnectionClosedError (and does not
        call the callback) when the handler is already closed."""
        cdef Py_buffer pb
        cdef np_handler_t *c = self.h
        cdef int st = 0
        cdef uint64_t target = 0
        cdef uint64_t *qt = &self.queued_total
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable or None")
        PyObject_GetBuffer(data, &pb, PyBUF_SIMPLE)
        try:
            if self.closed:
                raise ConnectionClosedError("netpoll: the handler is closed")
            if self.rp is None:
                raise RuntimeError("netpoll: the handler is not attached to a reactor")
            with nogil:
                pthread_mutex_lock(&c.op.lock)
                st = _lb_append(c, <char *>pb.buf, <size_t>pb.len)
                if st == 0:
                    qt[0] += <uint64_t>pb.len
                target = qt[0]
                pthread_mutex_unlock(&c.op.lock)
        finally:
            PyBuffer_Release(&pb)
        if st < 0:
            raise MemoryError()
        if callback is not None:
            self._wcb.append((target, callback))
        if not self.flush_posted:
            self.flush_posted = True
            try:
                self.rp._post(("flush", self))
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
        the process). Never fires early; fires in deadline order."""
        cdef int64_t d = _seconds_ns(delay, "delay", True)
        cdef int64_t iv = _seconds_ns(interval, "interval", True)
        cdef uint64_t tid
        if self.closed:
            raise ConnectionClosedError("netpoll: the handler is closed")
        if self.rp is None:
            raise RuntimeError("netpoll: the handler is not attached to a reactor")
        tid = _new_tid()
        if self.rp._is_current():
            self._add_timer(np_monotonic_ns() + d, iv, 0, tid)
        else:
            self.rp._post(("timer", self, tid, np_monotonic_ns() + d, iv, 0))
        return tid

    def cancel_timer(self, timer_id):
        """Cancel a timer (any thread; unknown or finished ids are ignored).
        Once this returns, no on_timeout for it starts (one already running
        on the poller finishes, and is not re-armed)."""
        if isinstance(timer_id, bool) or not isinstance(timer_id, int):
            raise TypeError("timer_id must be an int returned by schedule_timer")
        if timer_id <= 0 or timer_id > g_next_tid or self.rp is None or self.closed:
            return None
        if self.rp._is_current():
            self._cancel_local(timer_id)
        else:
            self._cancelled.add(timer_id)
            self.rp._post(("cancel", self, timer_id))
        return None

    def set_watermarks(self, high, low=None):
        """Call on_high_watermark(pending) when pending output reaches `high`
        bytes, then on_low_watermark(pending) once it drains to `low` (default
        high // 2). Both on the poller thread. high=None or 0 disables."""
        if high is None or high == 0:
            self.high_wm = 0
            self.low_wm = 0
            return
        if isinstance(high, bool) or not isinstance(high, int):
            raise TypeError("high must be an int number of bytes")
        if low is None:
            low = high // 2
        if isinstance(low, bool) or not isinstance(low, int):
            raise TypeError("low must be an int number of bytes")
        if high < 0 or low < 0 or low >= high:
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
        """Attach to rp (GIL, any thread): callbacks run on its thread."""
        self.rp = rp
        self._reactor = rp.reactor_ref
        self.op.poller = rp.poller.p
        rp.handlers[id(self)] = self
        return 0

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
        if ev and not self.closed:
            self._dispatch(ev)
        return 0

    cdef int _dispatch(self, uint32_t ev) except -1:
        cdef bint hup = (ev & (NP_EV_HUP | NP_EV_ERR)) != 0
        if self.connecting:
            return self._finish_connect(ev)
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
        if self.closed or c.op.fd < 0:
            return 0
        self._check_high()
        with nogil:
            pthread_mutex_lock(&c.op.lock)
            if not connecting:
                st = np_send_lb(c.op.fd, c.outbuf, &sent)
            _apply_locked(c, _want(c, umask, connecting, eof, False))
            self.sent_total += sent
            pthread_mutex_unlock(&c.op.lock)
        if st < 0:
            self.err = -st
            return self._close(OSError(-st, os.strerror(-st)))
        return self._after_progress()

    cdef int _after_progress(self) except -1:
        """Completion callbacks of what was sent; the low watermark."""
        cdef uint64_t sent = self.sent_total
        cdef size_t pending
        if self._wcb:
            done = [cb for target, cb in self._wcb if target <= sent]
            if done:
                self._wcb = [item for item in self._wcb if item[0] > sent]
                for cb in done:
                    try:
                        cb(None)
                    except BaseException:
                        log.exception("netpoll: async_write callback raised")
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
        cdef int fd
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
            if c.op.fd >= 0 and np_lb_readable(c.outbuf) > 0 and try_send:
                np_send_lb(c.op.fd, c.outbuf, &sent)
            _apply_locked(c, 0)
            self.sent_total += sent
            pthread_mutex_unlock(&c.op.lock)
        exc = err if err is not None else ConnectionClosedError(
            "netpoll: the connection closed before the data was sent")
        cbs = self._wcb
        self._wcb = []
        for target, cb in cbs:
            try:
                cb(None if target <= self.sent_total else exc)
            except BaseException:
                log.exception("netpoll: async_write callback raised")
        try:
            self.on_close()
        except BaseException:
            log.exception("netpoll: on_close raised")
        with nogil:
            np_lb_clear(c.outbuf)
            np_op_close_fd(&c.op, NULL)
        if self.rp is not None:
            self.rp.handlers.pop(id(self), None)
        if self._pool is not None:
            self._pool._handler_event(self, "close")
        return 0

    cdef int _connect_failed(self, object exc) except -1:
        cdef np_handler_t *c = self.h
        cdef int fd
        if self.closed:
            return 0
        self.closed = True
        self.connecting = False
        self._drop_timers()
        with nogil:
            pthread_mutex_lock(&c.op.lock)
            _apply_locked(c, 0)
            pthread_mutex_unlock(&c.op.lock)
            np_lb_clear(c.outbuf)
            np_op_close_fd(&c.op, NULL)
        cbs = self._wcb
        self._wcb = []
        for target, cb in cbs:
            try:
                cb(exc)
            except BaseException:
                log.exception("netpoll: async_write callback raised")
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
        if getsockopt(self.op.fd, SOL_SOCKET, SO_ERROR, &e, &n) < 0:
            e = errno
        if e == 0 and not (ev & NP_EV_WRITE):
            return 0                         # not yet
        if e:
            return self._connect_failed(conn_error(e, self.connect_addr))
        self.connecting = False
        if self.connect_tid:
            self._cancel_local(self.connect_tid)
            self.connect_tid = 0
        self._sync_mask()
        return _open(self)

    cdef uint64_t _add_timer(self, int64_t when, int64_t interval_ns, int internal,
                             uint64_t tid) except 0:
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
        u.handler = <void *>self
        if timer_heap_push(&self.rp.poller.p.timers, &u.t) < 0:
            PyMem_RawFree(u)
            raise MemoryError()
        self._timers[tid] = <size_t>u
        return tid

    cdef int _timer_fired(self, np_utimer_t *u, int64_t now) except -1:
        cdef uint64_t tid = u.tid
        cdef int64_t nxt
        if u.internal:
            self._timers.pop(tid, None)
            PyMem_RawFree(u)
            if self.connecting and tid == self.connect_tid and not self.closed:
                self.connect_tid = 0
                self._connect_failed(DialTimeoutError(
                    f"netpoll: connect to {self.connect_addr!r} timed out after "
                    f"{self.connect_timeout}s"))
            return 0
        if self.closed or tid in self._cancelled:
            self._cancelled.discard(tid)
            self._timers.pop(tid, None)
            PyMem_RawFree(u)
            return 0
        try:
            again = self.on_timeout(tid, now / 1e9)
        except BaseException:
            log.exception("netpoll: on_timeout raised")
            again = False
        if u.handler == NULL:
            PyMem_RawFree(u)                 # the handler closed in the callback
            return 0
        if u.interval_ns > 0 and again and tid not in self._cancelled:
            nxt = u.t.when + u.interval_ns
            if nxt <= now:
                nxt = now + u.interval_ns     # we fell behind: no burst of catch-ups
            u.t.when = nxt
            if timer_heap_push(&self.rp.poller.p.timers, &u.t) == 0:
                return 0
        self._cancelled.discard(tid)
        self._timers.pop(tid, None)
        PyMem_RawFree(u)
        return 0

    cdef int _cancel_local(self, uint64_t tid) except -1:
        cdef np_utimer_t *u
        addr = self._timers.get(tid)
        if addr is None:
            # Not created yet (a request from another thread is queued) or
            # already finished; the queued creation checks this set.
            if not self.closed:
                self._cancelled.add(tid)
            return 0
        u = <np_utimer_t *><size_t>addr
        if u.t.index >= 0:
            timer_heap_remove(&self.rp.poller.p.timers, &u.t)
            del self._timers[tid]
            self._cancelled.discard(tid)
            PyMem_RawFree(u)
        else:
            self._cancelled.add(tid)         # fired, waiting in this batch
        return 0

    cdef int _drop_timers(self) except -1:
        cdef np_utimer_t *u
        for addr in self._timers.values():
            u = <np_utimer_t *><size_t>addr
            if u.t.index >= 0:
                timer_heap_remove(&self.rp.poller.p.timers, &u.t)
                PyMem_RawFree(u)
            else:
                u.handler = NULL             # in the fired list: freed there
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
        self._lock = threading.Lock()
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
        events, timers or pending output). The handler owns `fd` from now on:
        it is closed after on_close."""
        cdef _ReactorPoller rp
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise TypeError("fd must be an int")
        if fd < 0:
            raise ValueError("fd must be >= 0")
        _check_events(events)
        self._check_open()
        if handler.closed:
            raise ConnectionClosedError("netpoll: the handler is closed")
        if handler.registered:
            raise ValueError("handler already added; use append_event/remove_event")
        if handler.op.fd >= 0 and handler.op.fd != fd:
            raise ValueError(f"handler already owns fd {handler.op.fd}")
        if handler.rp is None:
            handler._bind(self._pick(poller))
        else:
            if handler._reactor is not self:
                raise ValueError("handler belongs to another reactor")
            if poller is not None and poller != handler.rp.index:
                rp = self._pick(poller)
                if handler.op.events or handler._timers or np_lb_readable(handler.h.outbuf):
                    raise RuntimeError("cannot move a handler with events, timers or output")
                handler.rp.handlers.pop(id(handler), None)
                handler._bind(rp)
        handler.op.fd = fd
        np_op_own_fd(handler.op)
        handler.umask = events
        handler.registered = True
        try:
            handler._sync_mask()
        except BaseException:
            handler.registered = False
            handler.umask = 0
            raise
        return None

    def append_event(self, EvHandler handler not None, events):
        """Also watch for `events`."""
        _check_events(events)
        if not handler.registered or handler.closed:
            raise ValueError("handler is not added to this reactor")
        handler.umask |= events
        handler._sync_mask()

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

    def _attach(self, EvHandler handler not None, int fd, int index):
        """An accepted fd: bind to poller `index` and run on_open there."""
        cdef _ReactorPoller rp = self._rps[index]
        if self._stopping or self._shut or rp.stopping or handler.rp is not None:
            os.close(fd)
            return False
        handler._bind(rp)
        handler.op.fd = fd
        np_op_own_fd(handler.op)
        if rp._is_current():
            _open(handler)
        else:
            rp._post(("open", handler))
        return True

    def _connect(self, EvHandler handler not None, int fd, int err, timeout, addr):
        """A socket whose non-blocking connect returned `err`."""
        cdef _ReactorPoller rp
        cdef int64_t tns = 0
        if timeout is not None:
            tns = _seconds_ns(timeout, "timeout", False)
        if self._stopping or self._shut:
            os.close(fd)
            raise RuntimeError("netpoll: the reactor is stopping")
        if handler.rp is not None or handler.closed or handler.op.fd >= 0:
            os.close(fd)
            raise ValueError("handler is already in use")
        rp = self._pick(None)
        handler._bind(rp)
        handler.op.fd = fd
        np_op_own_fd(handler.op)
        handler.connecting = True
        handler.connect_addr = addr
        handler.connect_timeout = timeout
        if err == 0:
            rp._post(("connected", handler))
        elif err == EINPROGRESS or err == EAGAIN or err == EALREADY:
            if tns:
                handler.connect_tid = _new_tid()
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
        """Wait until the shutdown finished; True if it has."""
        return self._done_event.wait(timeout)

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
