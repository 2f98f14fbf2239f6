# Connection (Netpoll's connection_impl.go): the connection operator.
#
# The C half (the kind table CONN_KIND and everything it calls) runs on the
# owning poller's thread without the GIL: recv into the input LinkBuffer,
# sends of pending output, the idle and drain timers, teardown. The Python
# half (Connection, ConnReader, ConnWriter) gives blocking reads that wait
# for the poller, flushes that send from the calling thread, close
# callbacks, and process(): the rule for calling on_request.
#
# Locking: c.op.lock guards the flags, the poll-set mask and `want`/`waiters`;
# it is never held while taking the GIL or across a blocking syscall.

import logging
import os
import socket as _socket

cimport cython
from cpython.ref cimport PyObject
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memset
from posix.unistd cimport dup

from netpoll._core.includes.system cimport (
    shutdown, SHUT_WR, ETIMEDOUT, ENOMEM, EBADF, MSG_DONTWAIT, errno, EINTR, EAGAIN,
    EWOULDBLOCK, poll, pollfd, POLLIN, POLLOUT, recv,
    pthread_mutex_lock, pthread_mutex_unlock, pthread_mutex_destroy, pthread_cond_broadcast,
    pthread_cond_destroy,
    np_cond_init_monotonic, np_cond_wait_until, np_monotonic_ns, np_set_nodelay, np_is_inet,
    np_atomic_load_uint, NP_EV_READ, NP_EV_WRITE, NP_EV_HUP, NP_EV_ERR, NP_EV_RDHUP,
)
from netpoll._core.linkbuffer cimport (
    LinkBuffer, LB_READ, LB_WRITE, np_delim_byte, np_lb_new, np_lb_free, np_lb_readable,
    np_lb_reserve, np_lb_commit, np_lb_release, np_lb_clear,
)
from netpoll._core.poller cimport (
    Operator, Poller, np_op_t, np_op_kind_t, np_kind_init, np_poller_t, np_op_init, np_op_own_fd,
    np_op_incref, np_op_decref, np_op_submit, np_op_set_interest_locked, np_op_close_fd,
    np_op_gil, np_op_defer, np_poller_timer_push, np_on_poller_thread, np_on_any_poller,
    np_poller_kick, np_poller_wake_ack, np_poller_set_tick,
    np_poller_abdicate, np_poller_abdicate_busy, np_poller_busy_begin, np_poller_busy_end,
    np_poller_busy_pause, np_poller_busy_resume,
    OF_REGISTERED, OF_FD_CLOSED, T_REGISTER, T_TEARDOWN, T_FORCE, T_ARM_IDLE, T_RESUME,
    T_PROCESS, GR_EVENT, GR_TEARDOWN,
)
from netpoll._core.runner cimport (WorkerPool, np_taskq_t, np_taskq_push,
                                   np_taskq_check_stall)
from netpoll._core.sockio cimport np_recv, np_send_lb
from netpoll._core.timer cimport np_timer_t, timer_init, timer_heap_remove
from netpoll._core.tls cimport (
    TLSSession, np_tls_handshake, np_tls_recv_more, np_tls_send_lb, np_tls_close_notify,
    np_tls_pending, np_tls_free, np_tls_open, np_tls_info, np_tls_error, np_tls_take,
    TLS_DONE, TLS_WANT_READ, TLS_WANT_WRITE,
)

from netpoll._validate import seconds_ns as _seconds_ns, size as _size
from netpoll.errors import (
    ConnectionClosedError, PeerClosedError, ReadTimeoutError, WriteTimeoutError,
)

log = logging.getLogger("netpoll")

cdef extern from "<errno.h>" nogil:
    int EPROTO

cdef enum:
    READ_BUDGET = 8             # recv calls per connection per wake (fairness)
    DEFAULT_DRAIN_NS = 5000000000  # output drain limit at close without a write timeout
    RECV_HINT = 4096            # minimum room offered to recv()
    RX_CHUNK_MIN = 8192         # adaptive input chunk size: bounds
    RX_CHUNK_MAX = 65536        # larger chunks fall outside the pool cache into mmap
    DISCARD_MAX = 262144        # unread input dropped at close so that close() sends a FIN
    TM_IDLE = 1                 # np_timer_t.kind of the three timers
    TM_DRAIN = 2
    TM_HANDSHAKE = 3
    CF_DISOWNED = 1 << 16       # the user closed our fd: it was not closed by us
    BLOCKY_NS = 500000          # RUN_AUTO: two runs this long hand polling off before the next

cdef size_t _chunk_hint = 8192

cdef extern from *:
    """
    /* Handlers (on_connect, on_request, on_disconnect) running on this
       thread: set around a pool task and a custom runner's task; inline
       handlers run on a poller thread, which in_handler() counts anyway. */
    static __thread int np_handler_depth = 0;
    """
    int np_handler_depth


def in_handler():
    """True on a thread that runs a connection handler (on_connect,
    on_request, on_disconnect, any runner) or on a poller thread (inline
    handlers, on_prepare): such a thread must not wait for handlers to end."""
    return np_handler_depth > 0 or np_on_any_poller()

# What an inline flush may leave queued by default (EventLoop, Dialer).
DEFAULT_OUTPUT_LIMIT = 4 << 20


cdef size_t _output_limit(object nbytes) except? 1:
    """An output limit in bytes; None means no limit (SIZE_MAX)."""
    if nbytes is None:
        return <size_t>-1
    return _size(nbytes, "output limit")


def set_buffer_size(size_t n):
    """Preferred chunk size of the buffers of connections made from now on."""
    global _chunk_hint
    _chunk_hint = n if n > 0 else 8192

# ------------------------------------------------------------ the operator

cdef np_op_kind_t CONN_KIND
np_kind_init(&CONN_KIND, "connection", _conn_ready, _conn_timer, _conn_task, _conn_deferred, _conn_free)


cdef np_conn_t *_conn_new(int fd) noexcept nogil:
    cdef np_conn_t *c = <np_conn_t *>PyMem_RawMalloc(sizeof(np_conn_t))
    if c == NULL:
        return NULL
    memset(c, 0, sizeof(np_conn_t))
    np_op_init(&c.op, &CONN_KIND, fd)
    np_op_own_fd(&c.op)
    c.read_timeout_ns = -1
    c.write_timeout_ns = -1
    c.idle_timeout_ns = -1
    np_cond_init_monotonic(&c.cond)
    timer_init(&c.idle_timer)
    c.idle_timer.kind = TM_IDLE
    c.idle_timer.data = c
    timer_init(&c.drain_timer)
    c.drain_timer.kind = TM_DRAIN
    c.drain_timer.data = c
    timer_init(&c.hs_timer)
    c.hs_timer.kind = TM_HANDSHAKE
    c.hs_timer.data = c
    c.hs_timeout_ns = -1
    c.inbuf = np_lb_new(0)
    c.outbuf = np_lb_new(0)
    c.last_active_ns = np_monotonic_ns()
    if c.inbuf == NULL or c.outbuf == NULL:
        c.op.fd = -1            # the caller still owns fd
        np_op_decref(&c.op)
        return NULL
    return c


cdef void _conn_free(np_op_t *op) noexcept nogil:
    cdef np_conn_t *c = <np_conn_t *>op
    np_lb_free(c.inbuf)
    np_lb_free(c.outbuf)
    np_tls_free(c.tls)             # the fd is closed: no thread can be inside it
    pthread_cond_destroy(&c.cond)
    pthread_mutex_destroy(&c.op.lock)
    PyMem_RawFree(c)


cdef void _update_mask_locked(np_conn_t *c) noexcept nogil:
    """Bring the poll-set interest in line with the flags (lock held)."""
    cdef unsigned int f = c.op.flags
    cdef uint32_t want = 0
    if not (f & OF_REGISTERED) or (f & OF_FD_CLOSED):
        return
    if not (f & (CF_PEER_EOF | CF_ERROR | CF_PAUSED | CF_LIMITED | CF_CLOSING)):
        want |= NP_EV_READ
    if (f & CF_WANT_WRITE) and not (f & CF_ERROR):
        want |= NP_EV_WRITE
    if want != c.op.events:
        np_op_set_interest_locked(&c.op, want)


cdef inline void _wake_waiters_locked(np_conn_t *c) noexcept nogil:
    if c.waiters:
        pthread_cond_broadcast(&c.cond)


cdef void _set_error_locked(np_conn_t *c, int e) noexcept nogil:
    c.op.flags |= CF_ERROR
    c.op.flags &= ~CF_WANT_WRITE
    if c.err == 0:
        c.err = e

# ----------------------------------------------------------------- sending

cdef int _send_locked(np_conn_t *c) noexcept nogil:
    """Send pending output from this thread (lock held on entry and exit).

    Only one thread sends at a time (CF_SENDING); what the socket does not take
    is left to the poller with EPOLLOUT. Returns 0 all sent, 1 left pending,
    -errno on error, -EBADF when this thread may not send now."""
    cdef int st
    if c.op.flags & (CF_SENDING | OF_FD_CLOSED | CF_ERROR):
        return -EBADF
    if c.op.flags & CF_HANDSHAKE:
        return 1                   # the handshake's end sends what waits
    c.op.flags |= CF_SENDING
    pthread_mutex_unlock(&c.op.lock)
    if c.tls != NULL:
        st = np_tls_send_lb(c.tls, c.outbuf)
        if st == 0 and (c.op.flags & CF_SHUT_WR_PENDING):
            st = np_tls_close_notify(c.tls)   # shutdown_write(): close_notify, then FIN
    else:
        st = np_send_lb(c.op.fd, c.outbuf, NULL)
    pthread_mutex_lock(&c.op.lock)
    c.op.flags &= ~CF_SENDING
    if c.idle_timeout_ns > 0:      # the clock read is only needed for idleness
        c.last_active_ns = np_monotonic_ns()
    if st < 0:
        _set_error_locked(c, -st)
    elif st == 1:
        c.op.flags |= CF_WANT_WRITE
    elif (c.op.flags & CF_SHUT_WR_PENDING) and c.tls != NULL and not c.tls.notify_sent:
        c.op.flags |= CF_WANT_WRITE    # shutdown_write() came during the send: one more round
    else:
        c.op.flags &= ~CF_WANT_WRITE
        if c.op.flags & CF_SHUT_WR_PENDING:
            c.op.flags &= ~CF_SHUT_WR_PENDING
            c.op.flags |= CF_SHUT_WR
            shutdown(c.op.fd, SHUT_WR)
    _update_mask_locked(c)
    _wake_waiters_locked(c)
    if c.op.flags & CF_TEARDOWN_WAIT:
        c.op.flags &= ~CF_TEARDOWN_WAIT
        np_op_submit(&c.op, T_TEARDOWN)
    return st


cdef void _arm_drain_locked(np_poller_t *p, np_conn_t *c, int64_t limit_ns) noexcept nogil:
    """Bound the time output may stay unsent (poller thread, lock held)."""
    if not (c.op.flags & CF_DRAIN_ARMED):
        c.op.flags |= CF_DRAIN_ARMED
        c.drain_timer.when = np_monotonic_ns() + limit_ns
        if np_poller_timer_push(p, &c.drain_timer) < 0:
            c.op.flags &= ~CF_DRAIN_ARMED


cdef void _conn_deferred(np_poller_t *p, np_op_t *op) noexcept nogil:
    """An inline handler flushed: send now, at the start of the poller's next
    iteration, batched with every other connection of the last batch."""
    cdef np_conn_t *c = <np_conn_t *>op
    cdef int st
    cdef bint sched = False
    pthread_mutex_lock(&c.op.lock)
    if not (c.op.flags & (CF_SENDING | CF_WANT_WRITE | OF_FD_CLOSED | CF_ERROR)):
        st = _send_locked(c)
        if st == 1 and c.write_timeout_ns >= 0:
            _arm_drain_locked(p, c, c.write_timeout_ns)   # the peer does not read fast enough
        elif st < 0 and st != -EBADF:
            sched = _wants_process_locked(c)
    pthread_mutex_unlock(&c.op.lock)
    if sched:
        _schedule(p, c)


cdef int _write_direct(np_conn_t *c, size_t limit, int64_t deadline) noexcept nogil:
    """Send from this thread until at most `limit` bytes stay queued: a flush
    above the output limit on a poller thread, which must not wait for a
    poller (its own is blocked in this handler, another one may be waiting
    for us). poll()s the socket, stalling this poller's other connections,
    until the output drains, the connection fails or closes, or `deadline`.
    Returns W_OK, W_CLOSED, W_ERROR or W_TIMEOUT."""
    cdef pollfd pfd
    cdef int64_t now
    cdef int ms
    pthread_mutex_lock(&c.op.lock)
    while np_lb_readable(c.outbuf) > limit:
        if c.op.flags & (CF_USER_CLOSED | OF_FD_CLOSED):
            pthread_mutex_unlock(&c.op.lock)
            return W_CLOSED
        if c.op.flags & CF_ERROR:
            pthread_mutex_unlock(&c.op.lock)
            return W_ERROR
        if c.op.flags & CF_HANDSHAKE:
            # Nothing can be sent before the TLS handshake ends, and the
            # connection's poller drives it: maybe this very thread, running
            # on_prepare before the connection is even registered; a poller
            # never waits for another one anyway. Leave the bytes queued:
            # the handshake's end sends them (_handshake_step).
            pthread_mutex_unlock(&c.op.lock)
            return W_OK
        if not (c.op.flags & CF_SENDING):
            _send_locked(c)
            if np_lb_readable(c.outbuf) <= limit or c.op.flags & CF_ERROR:
                continue
        pthread_mutex_unlock(&c.op.lock)
        ms = 1                   # another thread is sending: look again soon
        if deadline >= 0:
            now = np_monotonic_ns()
            if now >= deadline:
                return W_TIMEOUT
            if not (c.op.flags & CF_SENDING):
                ms = <int>((deadline - now + 999999) // 1000000)
        elif not (c.op.flags & CF_SENDING):
            ms = 100             # re-check closes from other threads now and then
        pfd.fd = c.op.fd
        pfd.events = POLLOUT
        pfd.revents = 0
        if pfd.fd >= 0:
            poll(&pfd, 1, ms)
        pthread_mutex_lock(&c.op.lock)
    pthread_mutex_unlock(&c.op.lock)
    return W_OK

# ----------------------------------------------------------------- reading

cdef int _read_socket(np_conn_t *c, size_t *got) noexcept nogil:
    """recv into the input buffer until EAGAIN or the budget; called only by
    the thread that owns the input side (the poller, or an inline handler on
    it). Returns 0, 1 at EOF, or errno (ENOMEM when no buffer memory).

    Memory grows with the bytes that arrive, never with what a reader asks
    for: a blocked next(n) (c.want) enlarges the room offered to recv() only
    up to what is already buffered (so a huge n declared by a hostile length
    prefix costs nothing until the bytes really come), and never past the
    input limit."""
    cdef char *p
    cdef size_t cap, want, have, room, hint
    cdef ssize_t r
    cdef int budget = READ_BUDGET
    cdef int e
    cdef bint more = False      # OpenSSL holds more input (after a TLS read)
    got[0] = 0
    if c.rx_chunk == 0:
        c.rx_chunk = RX_CHUNK_MIN
    # Ask for contiguous room for a burst like the last one: a request/response
    # peer sends messages of similar size, and one that lands whole in a
    # chunk is handed out as a view instead of being copied together.
    hint = c.rx_last if c.rx_last < RX_CHUNK_MAX else RX_CHUNK_MAX
    if hint < RECV_HINT:
        hint = RECV_HINT
    while budget > 0:
        have = np_lb_readable(c.inbuf)
        want = c.want - have if c.want > have else 0
        if want > RX_CHUNK_MAX and want > have:
            want = RX_CHUNK_MAX if have < RX_CHUNK_MAX else have
        p = np_lb_reserve(c.inbuf, want if want > hint else hint, c.rx_chunk, &cap)
        if p == NULL:
            return ENOMEM
        if c.input_limit:
            # Backpressure: read no further than the limit, so one wake-up
            # cannot overshoot it.
            room = c.input_limit - have if c.input_limit > have else 0
            if room == 0:
                np_lb_commit(c.inbuf, 0)
                return 0
            if room < cap:
                cap = room
        if c.tls != NULL:
            r = np_tls_recv_more(c.tls, p, cap, &more)
        else:
            r = np_recv(c.op.fd, p, cap)
        if r > 0:
            np_lb_commit(c.inbuf, <size_t>r)
            got[0] += <size_t>r
            # (A TLS session returns a record at a time: a short read means
            # nothing only if OpenSSL holds nothing more.)
            if <size_t>r < cap and not more:
                c.rx_last = got[0]
                # The socket is very likely drained. Shrink the chunk size
                # slowly when reads stay small (idle memory matters).
                if got[0] * 8 < c.rx_chunk and c.rx_chunk > RX_CHUNK_MIN:
                    c.rx_chunk >>= 1
                return 0
            # recv filled the room: bigger chunks mean fewer recv() calls and
            # messages that stay contiguous (zero-copy views).
            if c.rx_chunk < RX_CHUNK_MAX:
                c.rx_chunk <<= 1
            budget -= 1
            continue
        e = errno
        np_lb_commit(c.inbuf, 0)
        if r == 0:
            return 1
        if e == EAGAIN or e == EWOULDBLOCK:
            return 0
        return e
    if more:
        # Out of budget with records inside OpenSSL (as of the last read:
        # only this thread reads them): the socket may be drained, so no
        # event would come for them. Read again soon.
        np_op_submit(&c.op, T_RESUME)
    return 0


cdef inline bint _in_handshake(np_conn_t *c) noexcept nogil:
    cdef bint r
    pthread_mutex_lock(&c.op.lock)
    r = (c.op.flags & CF_HANDSHAKE) != 0
    pthread_mutex_unlock(&c.op.lock)
    return r


cdef inline bint _wants_process_locked(np_conn_t *c) noexcept nogil:
    """Set RUNNING if a process() should be scheduled now (lock held)."""
    cdef unsigned int f = c.op.flags
    if f & (CF_RUNNING | CF_CLOSING | OF_FD_CLOSED):
        return False
    if (f & (CF_PEER_EOF | CF_ERROR)) or ((f & CF_HAS_HANDLER) and np_lb_readable(c.inbuf) > 0):
        c.op.flags |= CF_RUNNING
        return True
    return False


cdef void _after_read_locked(np_conn_t *c, int st, size_t got, int64_t now) noexcept nogil:
    """Fold a read's outcome into the flags; wake readers (lock held)."""
    if got:
        c.rx_seq += 1
        c.last_active_ns = now
    if st == 1:
        c.op.flags |= CF_PEER_EOF
    elif st != 0:
        _set_error_locked(c, st)
    elif c.tls != NULL and c.tls.read_wants_write:
        c.op.flags |= CF_WANT_WRITE      # _conn_ready reads again once writable
    if c.input_limit and np_lb_readable(c.inbuf) >= c.input_limit:
        c.op.flags |= CF_LIMITED
    _update_mask_locked(c)
    if c.waiters and (np_lb_readable(c.inbuf) >= c.want or st != 0):
        pthread_cond_broadcast(&c.cond)


cdef void _relieve_limit_locked(np_conn_t *c) noexcept nogil:
    """Resume reading a connection stopped by its input limit once the
    buffer fell below the limit or the limit was lifted. Lock held."""
    if not (c.op.flags & CF_LIMITED):
        return
    if c.input_limit == 0 or np_lb_readable(c.inbuf) < c.input_limit:
        c.op.flags &= ~CF_LIMITED
        _update_mask_locked(c)
        if c.tls != NULL and np_tls_pending(c.tls):
            np_op_submit(&c.op, T_RESUME)    # decrypted input no event will announce


cdef int _read_direct(np_conn_t *c, int64_t deadline) noexcept nogil:
    """Blocking read on the poller thread itself (an inline handler waiting for
    c.want bytes): poll() this one socket, stalling the poller's other
    connections until the bytes arrive, the peer leaves, the connection is
    closed from another thread (the wake-up fd is polled too) or `deadline`
    passes. Returns W_OK when c.want bytes are readable, W_PEER (peer closed
    or socket error, in c.err), W_CLOSED (closed by us) or W_TIMEOUT."""
    cdef pollfd pfds[2]
    cdef np_poller_t *p = c.op.poller
    cdef int64_t now
    cdef int ms, st, r
    cdef size_t got
    pthread_mutex_lock(&c.op.lock)
    # Send what this handler flushed so far: the peer may wait for it.
    if np_lb_readable(c.outbuf) and not (c.op.flags & (CF_SENDING | CF_WANT_WRITE)):
        _send_locked(c)
    while np_lb_readable(c.inbuf) < c.want:
        if c.op.flags & CF_USER_CLOSED:
            pthread_mutex_unlock(&c.op.lock)
            return W_CLOSED
        if c.op.flags & (CF_PEER_EOF | CF_ERROR | OF_FD_CLOSED | CF_CLOSING):
            pthread_mutex_unlock(&c.op.lock)
            return W_PEER
        pthread_mutex_unlock(&c.op.lock)
        now = np_monotonic_ns()
        if deadline >= 0:
            if now >= deadline:
                return W_TIMEOUT
            ms = <int>((deadline - now + 999999) // 1000000)
        else:
            ms = -1
        pfds[0].fd = c.op.fd
        pfds[0].events = POLLIN
        pfds[0].revents = 0
        pfds[1].fd = p.wake_r
        pfds[1].events = POLLIN
        pfds[1].revents = 0
        if c.tls != NULL and np_tls_pending(c.tls):
            ms = 0                 # OpenSSL holds input: read it without waiting
        r = poll(pfds, 2, ms)
        if r < 0 and errno != EINTR:
            pthread_mutex_lock(&c.op.lock)
            _after_read_locked(c, errno, 0, np_monotonic_ns())
            pthread_mutex_unlock(&c.op.lock)
            return W_PEER
        if pfds[1].revents:
            # Another thread wants this poller (a close, a task): the tasks
            # stay queued for the loop, which checks them after this handler.
            np_poller_wake_ack(p)
        if pfds[0].revents or (c.tls != NULL and np_tls_pending(c.tls)):
            st = _read_socket(c, &got)
            pthread_mutex_lock(&c.op.lock)
            _after_read_locked(c, st, got, np_monotonic_ns())
        else:
            pthread_mutex_lock(&c.op.lock)
    pthread_mutex_unlock(&c.op.lock)
    return W_OK

# -------------------------------------------------------------- scheduling

cdef extern from *:
    """
    static inline int np__sc_add(int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
    static inline int np__sc_load(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void np__sc_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    """
    int np__sc_add(int *p, int v) nogil
    int np__sc_load(int *p) nogil
    void np__sc_store(int *p, int v) nogil


cdef inline bint _pool_push(np_conn_t *c) noexcept nogil:
    # pool_pending is raised before the push: a worker may run the task (and
    # lower it) before np_taskq_push returns.
    np_op_incref(&c.op)
    np__sc_add(&c.pool_pending, 1)
    if np_taskq_push(c.pool, c) == 0:
        return True
    np__sc_add(&c.pool_pending, -1)   # the GIL phase that runs it instead forgets
    np_op_decref(&c.op)
    return False


cdef void _schedule(np_poller_t *p, np_conn_t *c) noexcept nogil:
    """Run process() for c (RUNNING already set), from its poller: on the
    pool without the GIL, or in this batch's GIL phase."""
    if c.run_mode == RUN_POOL and c.pool != NULL:
        if _pool_push(c):
            return
    np_op_gil(p, &c.op, GR_EVENT)


cdef void np_conn_schedule(np_conn_t *c) noexcept nogil:
    """From any thread: run process() for c, whose RUNNING flag the caller set."""
    if c.run_mode == RUN_POOL and c.pool != NULL:
        if _pool_push(c):
            return
    np_op_submit(&c.op, T_PROCESS)


cdef void _pool_item(void *item) noexcept:
    """Worker-pool entry point (GIL held): run process() of the connection."""
    cdef np_conn_t *c = <np_conn_t *>item
    cdef Connection conn
    global np_handler_depth
    # op.pyobj is borrowed: it is safe to take only because the registry still
    # holds the owner while pool_pending > 0. Without the GIL, a teardown that
    # dropped it earlier would let another thread free the owner between this
    # read and the INCREF.
    if c.op.pyobj != NULL:
        conn = <Connection><PyObject *>c.op.pyobj
        np_handler_depth += 1         # in_handler() while the handlers run
        try:
            conn._process()
        except BaseException:
            log.exception("netpoll: unexpected error in a connection task")
        np_handler_depth -= 1
        np__sc_add(&c.pool_pending, -1)
        try:
            conn._forget_if_done()
        except BaseException:
            log.exception("netpoll: unexpected error in a connection task")
    else:
        np__sc_add(&c.pool_pending, -1)
    np_op_decref(&c.op)


cdef int _pool_tick(void *arg, int64_t now) noexcept nogil:
    """The pollers' watch on the pool (see runner.pyx): wake a worker when
    queued work waits behind blocked ones; poll at least every 1 ms then."""
    cdef np_taskq_t *q = <np_taskq_t *>arg
    if q.count == 0:
        return -1
    np_taskq_check_stall(q, now)
    return 1


def bind_pool(WorkerPool pool not None):
    """Make `pool` run connection tasks queued by the pollers (one pool per
    process: the pollers watch it for stalled workers)."""
    pool.q.handler = _pool_item
    np_poller_set_tick(_pool_tick, pool.q)

# ------------------------------------------------------------ poller side

cdef size_t _conn_ready(np_poller_t *p, np_op_t *op, uint32_t ev, int64_t now) noexcept nogil:
    cdef np_conn_t *c = <np_conn_t *>op
    cdef size_t got = 0
    if c.tls != NULL:
        if np_atomic_load_uint(&c.op.flags) & CF_HANDSHAKE:
            if not _handshake_step(p, c):
                return 0
            ev |= NP_EV_READ | NP_EV_WRITE   # the last flight may carry data; output may wait
        elif c.tls.read_wants_write and (ev & NP_EV_WRITE):
            c.tls.read_wants_write = 0
            ev |= NP_EV_READ
    if ev & NP_EV_WRITE:
        _on_writable(p, c)
    if ev & (NP_EV_READ | NP_EV_HUP | NP_EV_ERR | NP_EV_RDHUP):
        got = _on_readable(p, c, now)
    return got


cdef bint _handshake_step(np_poller_t *p, np_conn_t *c) noexcept nogil:
    """Advance a server-side TLS handshake; True once it is done (the
    caller then reads and sends as usual). A failure is an error like a
    reset: process() closes the connection without calling on_connect."""
    cdef int r = np_tls_handshake(c.tls)
    cdef bint sched = False
    pthread_mutex_lock(&c.op.lock)
    if c.op.flags & (OF_FD_CLOSED | CF_CLOSING | CF_ERROR) or not (c.op.flags & CF_HANDSHAKE):
        pthread_mutex_unlock(&c.op.lock)
        return False
    if r == TLS_DONE:
        c.op.flags &= ~(CF_HANDSHAKE | CF_WANT_WRITE)
        if np_lb_readable(c.outbuf):
            c.op.flags |= CF_WANT_WRITE      # written before the end (on_prepare)
        if c.op.flags & CF_NEED_CONNECT:
            c.op.flags &= ~CF_NEED_CONNECT
            if not (c.op.flags & CF_RUNNING):
                c.op.flags |= CF_RUNNING      # on_connect, before any on_request
                sched = True
        _update_mask_locked(c)
        pthread_mutex_unlock(&c.op.lock)
        timer_heap_remove(&p.timers, &c.hs_timer)
        if sched:
            _schedule(p, c)
        return True
    if r == TLS_WANT_WRITE:
        c.op.flags |= CF_WANT_WRITE
    elif r == TLS_WANT_READ:
        c.op.flags &= ~CF_WANT_WRITE
    else:
        _set_error_locked(c, EPROTO)
        sched = _wants_process_locked(c)
    _update_mask_locked(c)
    pthread_mutex_unlock(&c.op.lock)
    if sched:
        _schedule(p, c)
    return False


cdef size_t _on_readable(np_poller_t *p, np_conn_t *c, int64_t now) noexcept nogil:
    """Read what c has (within the budget); returns the bytes read."""
    cdef int st
    cdef size_t got
    cdef bint sched
    # OF_FD_CLOSED is only set on this thread; the other bits are hints here
    # and re-checked under the lock below, so a relaxed read is enough.
    if np_atomic_load_uint(&c.op.flags) & (OF_FD_CLOSED | CF_PEER_EOF | CF_ERROR | CF_PAUSED
                                           | CF_LIMITED | CF_CLOSING):
        pthread_mutex_lock(&c.op.lock)
        # Reading is off; a hang-up is reported regardless of the mask. Leave
        # the set unless output is pending; resume/teardown re-register.
        if not (c.op.flags & (CF_WANT_WRITE | OF_FD_CLOSED)):
            np_op_set_interest_locked(&c.op, 0)
        pthread_mutex_unlock(&c.op.lock)
        return 0
    st = _read_socket(c, &got)
    pthread_mutex_lock(&c.op.lock)
    _after_read_locked(c, st, got, now)
    sched = _wants_process_locked(c)
    pthread_mutex_unlock(&c.op.lock)
    if sched:
        _schedule(p, c)
    return got


cdef void _on_writable(np_poller_t *p, np_conn_t *c) noexcept nogil:
    cdef int st
    cdef bint sched = False
    cdef bint finish = False
    pthread_mutex_lock(&c.op.lock)
    if c.op.flags & (CF_SENDING | OF_FD_CLOSED):
        pthread_mutex_unlock(&c.op.lock)
        return
    st = _send_locked(c)
    if st == 0:
        if c.op.flags & CF_DRAIN_ARMED:
            c.op.flags &= ~CF_DRAIN_ARMED
            timer_heap_remove(&p.timers, &c.drain_timer)
        finish = (c.op.flags & CF_TEARDOWN) != 0
    elif st < 0 and st != -EBADF:
        finish = (c.op.flags & CF_TEARDOWN) != 0
        sched = _wants_process_locked(c)
    pthread_mutex_unlock(&c.op.lock)
    if finish:
        _teardown(p, c, True)
    elif sched:
        _schedule(p, c)


cdef void _discard_input(int fd) noexcept nogil:
    """Read and drop what the peer sent that nobody will read (bounded).

    close() on a socket with unread input sends a RST instead of a FIN: the
    peer sees a reset rather than a clean close, and may drop the reply we
    just sent before reading it. Past DISCARD_MAX (a peer still flooding)
    the RST is what it gets."""
    cdef char junk[16384]
    cdef size_t total = 0
    cdef ssize_t r
    while total < DISCARD_MAX:
        r = recv(fd, junk, sizeof(junk), MSG_DONTWAIT)
        if r <= 0:
            if r < 0 and errno == EINTR:
                continue
            return
        total += <size_t>r


cdef void _teardown(np_poller_t *p, np_conn_t *c, bint forced) noexcept nogil:
    """Close c's fd on its poller once pending output is sent (or the drain
    limit passes), then let Python drop its references."""
    cdef int closed
    pthread_mutex_lock(&c.op.lock)
    if c.op.flags & OF_FD_CLOSED:
        pthread_mutex_unlock(&c.op.lock)
        return
    c.op.flags |= CF_TEARDOWN
    if c.op.flags & CF_SENDING:
        c.op.flags |= CF_TEARDOWN_WAIT       # the sender resubmits when done
        pthread_mutex_unlock(&c.op.lock)
        return
    if not forced and not (c.op.flags & CF_ERROR) and np_lb_readable(c.outbuf) > 0:
        # Deliver what was flushed before the close, bounded in time.
        _arm_drain_locked(p, c, c.write_timeout_ns if c.write_timeout_ns >= 0
                          else DEFAULT_DRAIN_NS)
        c.op.flags |= CF_WANT_WRITE
        _update_mask_locked(c)
        pthread_mutex_unlock(&c.op.lock)
        return
    c.op.flags &= ~CF_WANT_WRITE
    pthread_mutex_unlock(&c.op.lock)
    timer_heap_remove(&p.timers, &c.idle_timer)
    timer_heap_remove(&p.timers, &c.drain_timer)
    timer_heap_remove(&p.timers, &c.hs_timer)
    if c.tls != NULL and not (c.op.flags & (CF_ERROR | CF_HANDSHAKE)):
        np_tls_close_notify(c.tls)   # best effort: the peer learns the end was meant
    if c.op.flags & CF_ERROR:
        closed = np_op_close_fd(&c.op, NULL)
    else:
        closed = np_op_close_fd(&c.op, _discard_input)
    pthread_mutex_lock(&c.op.lock)
    if closed == 2:
        c.op.flags |= CF_DISOWNED
    _wake_waiters_locked(c)
    pthread_mutex_unlock(&c.op.lock)
    np_op_gil(p, &c.op, GR_TEARDOWN)


cdef inline bint _idle_unwatchable_locked(np_conn_t *c) noexcept nogil:
    """The idle timer cannot be armed (no memory for the heap; the poller
    counts and logs it): close the connection rather than let it live for
    ever. A running process() closes it when it ends; otherwise one is to
    be scheduled (True). Lock held."""
    cdef unsigned int f = c.op.flags
    c.op.flags |= CF_IDLE_FIRED
    if f & (CF_RUNNING | CF_CLOSING | OF_FD_CLOSED):
        return False
    c.op.flags |= CF_RUNNING
    return True


cdef void _arm_idle(np_poller_t *p, np_conn_t *c, int64_t now) noexcept nogil:
    cdef bint sched
    timer_heap_remove(&p.timers, &c.idle_timer)
    c.last_active_ns = now         # sends do not stamp activity without a timeout
    if c.idle_timeout_ns > 0 and not (c.op.flags & (CF_CLOSING | OF_FD_CLOSED)):
        c.idle_timer.when = c.last_active_ns + c.idle_timeout_ns
        if c.idle_timer.when < now:
            c.idle_timer.when = now
        if np_poller_timer_push(p, &c.idle_timer) < 0:
            pthread_mutex_lock(&c.op.lock)
            sched = _idle_unwatchable_locked(c)
            pthread_mutex_unlock(&c.op.lock)
            if sched:
                _schedule(p, c)


cdef void _conn_timer(np_poller_t *p, np_op_t *op, np_timer_t *t, int64_t now) noexcept nogil:
    cdef np_conn_t *c = <np_conn_t *>op
    cdef bint sched = False
    if t.kind == TM_IDLE:
        pthread_mutex_lock(&c.op.lock)
        if c.op.flags & (CF_CLOSING | OF_FD_CLOSED):
            pthread_mutex_unlock(&c.op.lock)
            return
        if c.op.flags & CF_RUNNING or c.last_active_ns + c.idle_timeout_ns > now:
            # Busy, or traffic since the timer was set: look again later.
            c.idle_timer.when = c.last_active_ns + c.idle_timeout_ns
            if c.idle_timer.when <= now:
                c.idle_timer.when = now + c.idle_timeout_ns
            if np_poller_timer_push(p, &c.idle_timer) < 0:
                sched = _idle_unwatchable_locked(c)
        else:
            c.op.flags |= CF_IDLE_FIRED | CF_RUNNING
            sched = True
        pthread_mutex_unlock(&c.op.lock)
        if sched:
            _schedule(p, c)
        return
    if t.kind == TM_HANDSHAKE:
        pthread_mutex_lock(&c.op.lock)
        if (c.op.flags & CF_HANDSHAKE) and not (c.op.flags & (CF_CLOSING | OF_FD_CLOSED)):
            _set_error_locked(c, ETIMEDOUT)     # process() closes it, quietly
            _update_mask_locked(c)
            sched = _wants_process_locked(c)
        pthread_mutex_unlock(&c.op.lock)
        if sched:
            _schedule(p, c)
        return
    # TM_DRAIN
    pthread_mutex_lock(&c.op.lock)
    c.op.flags &= ~CF_DRAIN_ARMED
    if c.op.flags & CF_TEARDOWN:
        pthread_mutex_unlock(&c.op.lock)
        _teardown(p, c, True)       # the drain limit passed: drop the rest
        return
    if np_lb_readable(c.outbuf) > 0:
        # An inline flush could not complete within the write timeout.
        _set_error_locked(c, ETIMEDOUT)
        _update_mask_locked(c)
        sched = _wants_process_locked(c)
    pthread_mutex_unlock(&c.op.lock)
    if sched:
        _schedule(p, c)


cdef void _conn_task(np_poller_t *p, np_op_t *op, unsigned int tasks, int64_t now) noexcept nogil:
    cdef np_conn_t *c = <np_conn_t *>op
    cdef bint sched = False
    if tasks & T_REGISTER:
        pthread_mutex_lock(&c.op.lock)
        if not (c.op.flags & (OF_FD_CLOSED | OF_REGISTERED)):
            c.op.flags |= OF_REGISTERED
            _update_mask_locked(c)
            # Input that arrived before registration (or a client's pre-read)
            # would otherwise wait for more bytes.
            sched = _wants_process_locked(c)
        pthread_mutex_unlock(&c.op.lock)
        if sched:
            _schedule(p, c)
        if ((c.op.flags & (CF_HANDSHAKE | CF_CLOSING | OF_FD_CLOSED)) == CF_HANDSHAKE
                and c.hs_timeout_ns >= 0):
            c.hs_timer.when = now + c.hs_timeout_ns
            if np_poller_timer_push(p, &c.hs_timer) < 0:
                pthread_mutex_lock(&c.op.lock)
                _set_error_locked(c, ENOMEM)   # cannot bound the handshake: refuse it
                sched = _wants_process_locked(c)
                pthread_mutex_unlock(&c.op.lock)
                if sched:
                    _schedule(p, c)
        tasks |= T_ARM_IDLE
    if tasks & T_ARM_IDLE:
        _arm_idle(p, c, now)
    if tasks & T_RESUME:
        pthread_mutex_lock(&c.op.lock)
        _update_mask_locked(c)
        sched = _wants_process_locked(c)
        pthread_mutex_unlock(&c.op.lock)
        if sched:
            _schedule(p, c)
    if c.tls != NULL and (tasks & (T_REGISTER | T_RESUME)) and np_tls_pending(c.tls):
        # Input OpenSSL read ahead (a dialled session's handshake, a read
        # stopped by its budget or limit) that no socket event will announce.
        _on_readable(p, c, now)
    if tasks & T_PROCESS:
        np_op_gil(p, &c.op, GR_EVENT)
    if tasks & T_TEARDOWN:
        _teardown(p, c, (tasks & T_FORCE) != 0)

# ------------------------------------------------------------- Python half

cdef enum:
    W_OK = 0
    W_PEER = 1
    W_CLOSED = 2
    W_TIMEOUT = 3
    W_ERROR = 4


cdef inline int64_t _deadline(int64_t timeout_ns) noexcept nogil:
    return -1 if timeout_ns < 0 else np_monotonic_ns() + timeout_ns


cdef str _fmt_addr(object a):
    if a is None:
        return "?"
    if isinstance(a, tuple) and len(a) >= 2:
        return f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}"
    if isinstance(a, bytes):
        a = a.decode("utf-8", "replace")
    return f"unix:{a}" if a else "unix:(unnamed)"


cdef str _describe(object conn):
    """The connection's repr for error and log messages."""
    if conn is None:
        return "<Connection (none)>"
    try:
        return repr(conn)
    except Exception:
        return "<Connection>"


cdef str _error_text(np_conn_t *c):
    return os.strerror(c.err) if c.err else "socket error"


cdef class ConnReader(LinkBuffer):
    """The connection's input: LinkBuffer's reader methods, blocking until the
    bytes arrive (bounded by the read timeout). Writer methods raise TypeError."""

    cdef int _check(self, int need) except -1:
        cdef np_conn_t *c
        if self.conn is None or self.conn.c == NULL:
            raise ConnectionClosedError(f"read on {_describe(self.conn)}: connection is not open")
        c = self.conn.c
        if c.op.flags & CF_USER_CLOSED:
            raise ConnectionClosedError(f"read on {_describe(self.conn)}: connection closed")
        if not (self.mode & need):
            raise TypeError(f"write on the reader of {_describe(self.conn)}: "
                            "a connection's reader cannot be written to")
        return 0

    cdef int _need(self, size_t n) except -1:
        # One wait, one deadline: next(n), read_binary(n), slice(n)... call
        # this once per call; until() calls _need_by() with its own deadline.
        # Bytes already buffered (the common case) need no clock read.
        if np_lb_readable(self.conn.c.inbuf) >= n:
            return 0
        return self._need_by(n, _deadline(self.conn.c.read_timeout_ns))

    cdef int _need_by(self, size_t n, int64_t deadline) except -1:
        """Wait until n bytes are readable, at the latest until `deadline`
        (monotonic ns, < 0: none)."""
        cdef np_conn_t *c = self.conn.c
        cdef int rc = W_OK
        cdef int r
        cdef long long busy
        if np_lb_readable(c.inbuf) >= n:
            return 0
        if c.input_limit and n > c.input_limit:
            # It could never arrive: the poller stops reading at the limit.
            raise ValueError(
                f"read on {_describe(self.conn)}: {n} bytes exceed the input limit "
                f"({c.input_limit} bytes)")
        if c.tls != NULL and np_on_any_poller() and _in_handshake(c):
            # on_prepare, before the TLS handshake: no plaintext can come
            # until the handshake ends, which waits for this very thread (the
            # connection is registered once on_prepare returns), and reading
            # the socket here would run the handshake outside its state
            # machine. Refuse rather than hang. (A flush queues instead.)
            raise RuntimeError(
                f"read on {_describe(self.conn)}: the TLS handshake has not completed "
                "(on_prepare runs before it); read in on_connect or on_request")
        if c.run_mode == RUN_AUTO and np_on_poller_thread(c.op.poller):
            # Polling passes to a standby, which reads the socket for us.
            np_poller_abdicate(c.op.poller)
        elif c.run_mode != RUN_AUTO:
            # A runner="auto" handler waiting on another kind of connection
            # (a Dialer's) gives its poller up all the same.
            np_poller_abdicate_busy()
        if np_on_poller_thread(c.op.poller):
            # Inline handler: nobody else will read this socket, so read it here.
            busy = np_poller_busy_pause(c.op.poller)
            with nogil:
                pthread_mutex_lock(&c.op.lock)
                c.want = n
                pthread_mutex_unlock(&c.op.lock)
                rc = _read_direct(c, deadline)
                pthread_mutex_lock(&c.op.lock)
                c.want = 0
                pthread_mutex_unlock(&c.op.lock)
            np_poller_busy_resume(c.op.poller, busy)
        else:
            with nogil:
                pthread_mutex_lock(&c.op.lock)
                c.want = n
                while np_lb_readable(c.inbuf) < n:
                    if c.op.flags & CF_USER_CLOSED:
                        rc = W_CLOSED
                        break
                    if c.op.flags & (CF_PEER_EOF | CF_ERROR | OF_FD_CLOSED):
                        rc = W_PEER
                        break
                    c.waiters += 1
                    r = np_cond_wait_until(&c.cond, &c.op.lock, deadline)
                    c.waiters -= 1
                    if r == ETIMEDOUT and np_lb_readable(c.inbuf) < n:
                        rc = W_TIMEOUT
                        break
                c.want = 0
                pthread_mutex_unlock(&c.op.lock)
        if rc == W_OK or np_lb_readable(c.inbuf) >= n:
            return 0
        if rc == W_CLOSED:
            raise ConnectionClosedError(f"read on {_describe(self.conn)}: connection closed")
        if rc == W_TIMEOUT:
            raise ReadTimeoutError(
                f"read on {_describe(self.conn)}: no {n} bytes within the read timeout "
                f"({np_lb_readable(c.inbuf)} buffered)")
        if c.err == ENOMEM:
            raise MemoryError(f"read on {_describe(self.conn)}: out of buffer memory")
        raise PeerClosedError(
            f"read on {_describe(self.conn)}: peer closed with {np_lb_readable(c.inbuf)} "
            f"of {n} bytes buffered")

    def until(self, delim):
        """Consume and return the bytes up to and including the first `delim`
        (one byte: an int in 0..255 or a bytes-like object of length 1),
        waiting for more input as needed. The read timeout bounds the whole
        call, not each wait: a peer trickling bytes without the delimiter
        gets ReadTimeoutError once it has passed."""
        cdef Py_ssize_t idx
        cdef unsigned char d
        cdef int64_t deadline
        self._check(LB_READ)
        d = np_delim_byte(delim)
        deadline = _deadline(self.conn.c.read_timeout_ns)    # once per call
        while True:
            idx = self._find(d)
            if idx >= 0:
                return self._view(<size_t>idx + 1, True)
            self._need_by(np_lb_readable(self.lb) + 1, deadline)
            self._check(LB_READ)

    def release(self):
        """Free the memory of bytes already read (views stay valid)."""
        cdef np_conn_t *c
        self._check(LB_READ)
        c = self.conn.c
        np_lb_release(c.inbuf)
        if c.op.flags & CF_LIMITED:
            pthread_mutex_lock(&c.op.lock)
            _relieve_limit_locked(c)
            pthread_mutex_unlock(&c.op.lock)

    def __repr__(self):
        return f"<ConnReader of {self.conn!r} buffered={len(self)}>"


cdef class ConnWriter(LinkBuffer):
    """The connection's output: LinkBuffer's writer methods; flush() sends.

    From a worker or any other thread flush() writes directly and blocks until
    everything flushed is sent (or the write timeout passes). From a poller
    thread (an inline handler) it never waits for a poller: up to the output
    limit it queues the bytes and returns (its own poller sends them right
    after the batch, bounded by the write timeout); above it, it sends from
    this thread until no more than the limit is queued, bounded by the write
    timeout. Reader methods raise TypeError."""

    cdef int _check(self, int need) except -1:
        cdef np_conn_t *c
        if self.conn is None or self.conn.c == NULL:
            raise ConnectionClosedError(f"write on {_describe(self.conn)}: connection is not open")
        c = self.conn.c
        if c.op.flags & (CF_CLOSING | OF_FD_CLOSED):
            raise ConnectionClosedError(f"write on {_describe(self.conn)}: connection closed")
        if c.op.flags & CF_ERROR:
            raise ConnectionClosedError(f"write on {_describe(self.conn)}: {_error_text(c)}")
        if not (self.mode & need):
            raise TypeError(f"read on the writer of {_describe(self.conn)}: "
                            "a connection's writer cannot be read from")
        return 0

    cdef int _after_flush(self) except -1:
        cdef np_conn_t *c = self.conn.c
        cdef int rc = W_OK
        cdef int r
        cdef long long busy
        cdef int64_t deadline
        cdef uint64_t target
        cdef size_t limit = c.output_limit
        if np_lb_readable(c.outbuf) == 0:
            return 0
        if np_on_poller_thread(c.op.poller):
            if np_lb_readable(c.outbuf) <= limit:
                np_op_defer(c.op.poller, &c.op)
                return 0
            if c.run_mode != RUN_AUTO and not np_poller_abdicate_busy():
                deadline = _deadline(c.write_timeout_ns)
                # (An auto handler of this poller may be the caller: no
                # hand-off while this thread still acts as the poller.)
                busy = np_poller_busy_pause(c.op.poller)
                with nogil:
                    rc = _write_direct(c, limit, deadline)
                np_poller_busy_resume(c.op.poller, busy)
                if rc == W_OK and np_lb_readable(c.outbuf):
                    np_op_defer(c.op.poller, &c.op)
                return self._flush_result(rc)
            # runner="auto": send as a worker does; polling passes to a
            # standby below if the flush has to wait.
        deadline = _deadline(c.write_timeout_ns)
        # First attempt with the GIL held: the socket is non-blocking, so the
        # send cannot block, and keeping the GIL avoids handing it to another
        # thread and queueing to get it back for every reply.
        pthread_mutex_lock(&c.op.lock)
        target = c.outbuf.total_in
        if not (c.op.flags & (CF_SENDING | CF_WANT_WRITE | CF_USER_CLOSED | OF_FD_CLOSED
                              | CF_ERROR)):
            _send_locked(c)
        if c.outbuf.total_out >= target or (c.op.flags & CF_HANDSHAKE):
            # Sent; or queued before the TLS handshake's end, which sends it.
            # A flush never waits for the handshake: on_prepare's thread (a
            # poller, or the thread it handed its loop to) is what the
            # handshake waits for, the connection being registered only
            # after on_prepare returns.
            pthread_mutex_unlock(&c.op.lock)
            return 0
        pthread_mutex_unlock(&c.op.lock)
        if c.run_mode == RUN_AUTO and np_on_poller_thread(c.op.poller):
            np_poller_abdicate(c.op.poller)
        elif c.run_mode != RUN_AUTO:
            np_poller_abdicate_busy()      # see _need_by
        if np_on_any_poller():
            # Another poller's inline handler: never wait for this
            # connection's poller (it may be waiting for ours). Leave up to
            # the limit queued; send the rest from here.
            busy = np_poller_busy_pause(c.op.poller) if c.run_mode == RUN_AUTO else 0
            with nogil:
                rc = _write_direct(c, limit, deadline)
            if c.run_mode == RUN_AUTO:
                np_poller_busy_resume(c.op.poller, busy)
            return self._flush_result(rc)
        with nogil:
            pthread_mutex_lock(&c.op.lock)
            while c.outbuf.total_out < target:
                if c.op.flags & (CF_USER_CLOSED | OF_FD_CLOSED):
                    rc = W_CLOSED
                    break
                if c.op.flags & CF_ERROR:
                    rc = W_ERROR
                    break
                if not (c.op.flags & (CF_SENDING | CF_WANT_WRITE)):
                    _send_locked(c)
                    continue
                c.waiters += 1
                r = np_cond_wait_until(&c.cond, &c.op.lock, deadline)
                c.waiters -= 1
                if r == ETIMEDOUT and c.outbuf.total_out < target:
                    rc = W_TIMEOUT
                    break
            pthread_mutex_unlock(&c.op.lock)
        return self._flush_result(rc)

    cdef int _flush_result(self, int rc) except -1:
        cdef np_conn_t *c = self.conn.c
        if rc == W_OK:
            return 0
        if rc == W_TIMEOUT:
            raise WriteTimeoutError(
                f"flush on {_describe(self.conn)}: not sent within the write timeout "
                f"({np_lb_readable(c.outbuf)} bytes queued)")
        if rc == W_ERROR:
            raise ConnectionClosedError(f"flush on {_describe(self.conn)}: {_error_text(c)}")
        raise ConnectionClosedError(f"flush on {_describe(self.conn)}: connection closed")

    def __repr__(self):
        return f"<ConnWriter of {self.conn!r} unflushed={self.lb.unflushed}>"


cdef class Connection(Operator):
    """A TCP or Unix stream connection served by a netpoll poller.

    Reads go through `reader` (blocking until the bytes arrive) and writes
    through `writer` (sent at flush()). `read()`/`write()` are socket-like
    shortcuts; `write()` is safe from several threads (whole writes never
    interleave). Created by EventLoop (server side) or dial_connection()."""

    def __init__(self, *args, **kwargs):
        raise TypeError("Connection objects are made by EventLoop and dial_connection()")

    def __cinit__(self):
        self.c = NULL
        self.reader = None
        self.writer = None
        self._close_callbacks = []

    def __dealloc__(self):
        cdef np_conn_t *c = self.c
        if c == NULL:
            return
        self.c = NULL
        self.op = NULL
        c.op.pyobj = NULL
        if not (c.op.flags & OF_REGISTERED):
            np_op_close_fd(&c.op, NULL)    # never handed to a poller: ours to close
        np_op_decref(&c.op)

    cdef inline np_conn_t *_live(self) except NULL:
        if self.c == NULL or self.reader is None or self.writer is None:
            raise ConnectionClosedError("connection is not initialised")
        return self.c

    # ---------------------------------------------------------- dispatch

    cdef int _on_poller_event(self) except -1:
        if self._runner is not None and self.c.run_mode == RUN_CUSTOM:
            try:
                self._runner(self._run_task)
            except BaseException:
                # The task never ran: nothing else would clear RUNNING.
                log.exception("netpoll: the runner raised for %s; closing it", _describe(self))
                self._close(False)
        elif self.c.run_mode == RUN_AUTO:
            self._run_auto()
        else:
            self._process()
        self._forget_if_done()      # a pool push that failed ran here instead
        return 0

    cdef int _run_auto(self) except -1:
        """runner="auto": run process() here, on the poller's leader, and let
        the monitor hand the poller to a standby if it runs past the
        threshold. A connection whose last two runs blocked hands polling
        off first: its handler will very likely block again. (Two: one long
        run may be this thread being preempted, not the handler blocking.)"""
        cdef np_poller_t *p = self.c.op.poller
        cdef int64_t t0
        if self._long_runs >= 2:
            np_poller_abdicate(p)
        if np_on_poller_thread(p):
            t0 = np_poller_busy_begin(p)
            try:
                self._process()
            finally:
                np_poller_busy_end(p)
        else:
            t0 = np_monotonic_ns()
            self._process()
        if np_monotonic_ns() - t0 > BLOCKY_NS:
            if self._long_runs < 2:
                self._long_runs += 1
        else:
            self._long_runs = 0
        return 0

    def _run_task(self):
        # A custom runner's thread: in_handler() while the handlers run.
        global np_handler_depth
        np_handler_depth += 1
        try:
            self._process()
        finally:
            np_handler_depth -= 1

    cdef int _call_handler(self) except -1:
        # set_on_request() may replace the handler from another thread: on a
        # free-threaded build the field is read (and INCREF'd) under the lock
        # its writer holds, or the old handler could be freed under us.
        with cython.critical_section(self):
            handler = self._on_request
        if handler is None:
            return 0
        try:
            handler(self._ctx, self)
        except (ConnectionClosedError, ReadTimeoutError, WriteTimeoutError) as e:
            log.debug("netpoll: handler for %s ended: %s", _describe(self), e)
            if isinstance(e, PeerClosedError):
                self._peer_gone()
            else:
                self._close(False)
            return 1
        except BaseException:
            log.exception("netpoll: on_request raised for %s; closing it", _describe(self))
            self._close(False)
            return 1
        return 0

    cdef int _process(self) except -1:
        """Run on_connect once, then on_request while it makes progress.

        Called with CF_RUNNING set (so never twice at once for one connection).
        After a call returns with unread input, on_request is called again at
        once if it consumed something or new bytes arrived meanwhile; otherwise
        the poller calls it when new bytes arrive. It never spins."""
        cdef np_conn_t *c = self.c
        cdef uint64_t rx0 = 0, out0 = 0
        cdef bint ran
        cdef unsigned int f
        if c == NULL:
            return 0
        if c.op.flags & CF_HANDSHAKE:
            # Only a failure (or a timeout) runs process() before the TLS
            # handshake ends: close without calling any handler.
            if not (c.op.flags & CF_CLOSING):
                log.debug("netpoll: TLS handshake with %s failed: %s", _describe(self),
                          "timed out" if c.err == ETIMEDOUT else np_tls_error(c.tls))
                self._close(False)
            return 0
        while True:
            if c.op.flags & CF_CLOSING:
                return 0
            if not self._connected:
                self._connected = True
                if self._on_connect is not None:
                    try:
                        self._ctx = self._on_connect(self._ctx, self)
                    except BaseException:
                        log.exception("netpoll: on_connect raised for %s; closing it",
                                      _describe(self))
                        self._close(False)
                        return 0
            ran = False
            if (self._on_request is not None and np_lb_readable(c.inbuf) > 0
                    and not (c.op.flags & (CF_CLOSING | CF_IDLE_FIRED))):
                ran = True
                rx0 = c.rx_seq
                out0 = c.inbuf.total_out
                if self._call_handler():
                    return 0
                np_lb_release(c.inbuf)
            pthread_mutex_lock(&c.op.lock)
            _relieve_limit_locked(c)
            f = c.op.flags
            if f & CF_CLOSING:
                pthread_mutex_unlock(&c.op.lock)
                return 0
            if (f & CF_IDLE_FIRED) or self._close_when_idle:
                pthread_mutex_unlock(&c.op.lock)
                self._close(False)
                return 0
            if self._on_request is not None and np_lb_readable(c.inbuf) > 0:
                if not ran or c.inbuf.total_out != out0 or c.rx_seq != rx0:
                    pthread_mutex_unlock(&c.op.lock)
                    continue
            if f & (CF_PEER_EOF | CF_ERROR):
                pthread_mutex_unlock(&c.op.lock)
                self._peer_gone()
                return 0
            c.op.flags &= ~CF_RUNNING
            pthread_mutex_unlock(&c.op.lock)
            return 0

    cdef int _peer_gone(self) except -1:
        """The peer closed (or reset): on_disconnect once, then close."""
        if self._connected and not self._disconnected:
            self._disconnected = True
            if self._on_disconnect is not None:
                try:
                    self._on_disconnect(self._ctx, self)
                except BaseException:
                    log.exception("netpoll: on_disconnect raised for %s", _describe(self))
        self._close(False)
        return 0

    cdef int _schedule_from_python(self) except -1:
        """Start a process() if one is due and none is running (any thread)."""
        cdef np_conn_t *c = self.c
        cdef bint go = False
        pthread_mutex_lock(&c.op.lock)
        if not (c.op.flags & (CF_RUNNING | CF_CLOSING | OF_FD_CLOSED)) and (
                (c.op.flags & (CF_PEER_EOF | CF_ERROR)) or
                (self._on_request is not None and np_lb_readable(c.inbuf) > 0)):
            c.op.flags |= CF_RUNNING
            go = True
        pthread_mutex_unlock(&c.op.lock)
        if go:
            np_conn_schedule(c)
        return 0

    cdef int _on_teardown(self) except -1:
        cdef np_conn_t *c = self.c
        if c.op.flags & CF_DISOWNED:
            log.warning("netpoll: the fd of %s was closed by someone else; netpoll left "
                        "the number alone (close connections with conn.close())",
                        _describe(self))
        # The fd is closed. Give buffer memory back now rather than when the
        # cyclic GC collects this object (it and its reader/writer refer to
        # each other). Unread input stays for a handler-less client that the
        # peer closed: it may still read what arrived.
        np_lb_clear(c.outbuf)
        if (c.op.flags & CF_USER_CLOSED) or self._on_request is not None:
            np_lb_clear(c.inbuf)
        np__sc_store(&c.torn_down, 1)
        self._forget_if_done()
        return 0

    cdef int _forget_if_done(self) except -1:
        """Drop the registry's reference once the teardown ran and no pool task
        is queued or running (from the poller's teardown or the last task;
        both may see it: unregister is idempotent)."""
        cdef np_conn_t *c = self.c
        if c != NULL and np__sc_load(&c.torn_down) and np__sc_load(&c.pool_pending) == 0:
            if self._poller is not None:
                self._poller.unregister(self)
        return 0

    # ---------------------------------------------------------- closing

    cdef int _close(self, bint user) except -1:
        cdef np_conn_t *c = self.c
        if c == NULL:
            return 0
        pthread_mutex_lock(&c.op.lock)
        if c.op.flags & CF_CLOSING:
            if user and not (c.op.flags & CF_USER_CLOSED):
                c.op.flags |= CF_USER_CLOSED
                pthread_cond_broadcast(&c.cond)
                pthread_mutex_unlock(&c.op.lock)
                np_poller_kick(c.op.poller)
                return 0
            pthread_mutex_unlock(&c.op.lock)
            return 0
        c.op.flags |= CF_CLOSING
        if user:
            c.op.flags |= CF_USER_CLOSED
        _update_mask_locked(c)
        _wake_waiters_locked(c)
        pthread_mutex_unlock(&c.op.lock)
        np_poller_kick(c.op.poller)     # an inline handler may be blocked reading
        # Under the object's lock (free-threaded builds): add_close_callback()
        # from another thread appends to this list or sees CF_CLOSING, never both.
        with cython.critical_section(self):
            callbacks = self._close_callbacks
            self._close_callbacks = []
        for cb in reversed(callbacks):
            try:
                cb(self)
            except BaseException:
                log.exception("netpoll: close callback %r raised for %s", cb, _describe(self))
        owner = self._owner
        if owner is not None:
            try:
                owner._connection_closed(self)
            except BaseException:
                log.exception("netpoll: error while forgetting %s", _describe(self))
        if c.op.poller != NULL:
            np_op_submit(&c.op, T_TEARDOWN)
        else:
            np_op_close_fd(&c.op, NULL)
        return 0

    def _close_when_done(self):
        """Graceful shutdown: close now if no handler runs, else when it returns."""
        cdef np_conn_t *c = self.c
        cdef bint idle
        if c == NULL:
            return
        self._close_when_idle = True
        pthread_mutex_lock(&c.op.lock)
        idle = not (c.op.flags & CF_RUNNING)
        if idle:
            c.op.flags |= CF_RUNNING
        pthread_mutex_unlock(&c.op.lock)
        if idle:
            self._close(False)

    def close(self):
        """Close the connection. Idempotent.

        Blocked reads and flushes wake with ConnectionClosedError; close
        callbacks run once, newest first, in this call; the fd is closed after
        them, once output already flushed has been sent (bounded by the write
        timeout, 5 s without one)."""
        if self._remote_addr is None and self.c != NULL and not (self.c.op.flags & OF_FD_CLOSED):
            self.local_addr, self.remote_addr   # remembered for repr() and messages after close
        self._close(True)

    def is_active(self):
        """False once the connection is closed or the peer has gone."""
        cdef np_conn_t *c = self.c
        if c == NULL:
            return False
        return not (c.op.flags & (CF_CLOSING | OF_FD_CLOSED | CF_PEER_EOF | CF_ERROR))

    def add_close_callback(self, callback):
        """Call `callback(conn)` once when the connection closes (newest first).
        On an already closed connection it is called at once."""
        if not callable(callback):
            raise TypeError("close callback must be callable")
        with cython.critical_section(self):    # see _close()
            if not (self.c == NULL or self.c.op.flags & CF_CLOSING):
                self._close_callbacks.append(callback)
                return
        callback(self)

    def set_on_request(self, handler):
        """Set the on_request(ctx, conn) handler (None removes it)."""
        if handler is not None and not callable(handler):
            raise TypeError("on_request must be callable or None")
        cdef np_conn_t *c = self._live()
        with cython.critical_section(self):    # see _call_handler()
            self._on_request = handler
        pthread_mutex_lock(&c.op.lock)
        if handler is None:
            c.op.flags &= ~CF_HAS_HANDLER
        else:
            c.op.flags |= CF_HAS_HANDLER
        pthread_mutex_unlock(&c.op.lock)
        if handler is not None:
            self._schedule_from_python()

    def set_read_timeout(self, seconds):
        """Limit blocking reads to `seconds` (None or inf: no limit)."""
        cdef np_conn_t *c = self._live()
        c.read_timeout_ns = _seconds_ns(seconds, "read timeout")

    def set_write_timeout(self, seconds):
        """Limit flushes to `seconds` (None or inf: no limit)."""
        cdef np_conn_t *c = self._live()
        c.write_timeout_ns = _seconds_ns(seconds, "write timeout")

    def set_idle_timeout(self, seconds):
        """Close the connection after `seconds` without traffic in either
        direction while no handler runs (None or inf: never)."""
        cdef np_conn_t *c = self._live()
        c.idle_timeout_ns = _seconds_ns(seconds, "idle timeout")
        if c.op.poller != NULL:
            np_op_submit(&c.op, T_ARM_IDLE)

    def set_input_limit(self, nbytes):
        """Stop reading the socket while `nbytes` or more are buffered (None or
        0: no limit). TCP then pushes back on the peer. A read that asks for
        more than the limit raises ValueError."""
        cdef np_conn_t *c = self._live()
        cdef size_t n = _size(nbytes, "input limit", none_ok=True) or 0
        pthread_mutex_lock(&c.op.lock)
        c.input_limit = n
        _relieve_limit_locked(c)
        pthread_mutex_unlock(&c.op.lock)

    def set_output_limit(self, nbytes):
        """Bytes a flush() on a poller thread (an inline handler) may leave
        queued and return; above it the flush sends from the calling thread
        and waits (bounded by the write timeout). None: no limit; 0: every
        such flush sends at once. Flushes from other threads always wait
        until everything is sent."""
        cdef np_conn_t *c = self._live()
        c.output_limit = _output_limit(nbytes)

    def output_buffered(self):
        """Bytes flushed and not yet sent."""
        if self.c == NULL:
            return 0
        return np_lb_readable(self.c.outbuf)

    def pause_read(self):
        """Stop reading from the socket until resume_read(); buffered input
        stays readable."""
        cdef np_conn_t *c = self._live()
        pthread_mutex_lock(&c.op.lock)
        c.op.flags |= CF_PAUSED
        _update_mask_locked(c)
        pthread_mutex_unlock(&c.op.lock)

    def resume_read(self):
        """Undo pause_read()."""
        cdef np_conn_t *c = self._live()
        pthread_mutex_lock(&c.op.lock)
        c.op.flags &= ~CF_PAUSED
        pthread_mutex_unlock(&c.op.lock)
        if c.op.poller != NULL:
            np_op_submit(&c.op, T_RESUME)

    def shutdown_write(self):
        """Send our FIN after the output already flushed; keep reading.
        Over TLS, close_notify goes first."""
        cdef np_conn_t *c = self._live()
        self.writer._check(LB_WRITE)
        pthread_mutex_lock(&c.op.lock)
        if not (c.op.flags & (CF_SHUT_WR | CF_SHUT_WR_PENDING | OF_FD_CLOSED)):
            if c.tls != NULL:
                # close_notify is a record: whoever sends next sends it.
                c.op.flags |= CF_SHUT_WR_PENDING
                if not (c.op.flags & (CF_SENDING | CF_WANT_WRITE | CF_ERROR | CF_HANDSHAKE)):
                    _send_locked(c)
            elif np_lb_readable(c.outbuf) == 0 and not (c.op.flags & (CF_SENDING | CF_WANT_WRITE)):
                c.op.flags |= CF_SHUT_WR
                shutdown(c.op.fd, SHUT_WR)
            else:
                c.op.flags |= CF_SHUT_WR_PENDING
        pthread_mutex_unlock(&c.op.lock)

    @property
    def tls(self):
        """None on a plain connection; else what its TLS session negotiated
        (version(), cipher(), selected_alpn_protocol(), getpeercert(),
        server_hostname: the names of ssl.SSLObject)."""
        if self.c == NULL or self.c.tls == NULL:
            return None
        return np_tls_info(self, self.c.tls)

    # ---------------------------------------------------------- socket-like

    def read(self, n=65536):
        """Up to n (>= 1) bytes, waiting for at least one; b"" at EOF."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError("n must be an int")
        self._live()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        try:
            self.reader._need(1)
        except PeerClosedError:
            return b""
        self.reader._check(LB_READ)
        k = len(self.reader)
        return self.reader.read_binary(k if k < n else n)

    def write(self, data):
        """Send all of `data` (bytes-like) and return len(data). Thread-safe:
        concurrent writes are sent whole, one after another.

        No lock is needed for that: write_binary appends the whole object in
        one critical section of the output buffer, and flush() sends
        everything appended so far. (A lock here would also deadlock an inline
        handler against a thread waiting for that poller to drain.)"""
        if isinstance(data, str):
            raise TypeError("write takes bytes-like data, not str")
        self._live()
        n = self.writer.write_binary(data)
        self.writer.flush()
        return n

    def fileno(self):
        """The socket's fd, or -1 once closed."""
        if self.c == NULL or self.c.op.flags & OF_FD_CLOSED:
            return -1
        return self.c.op.fd

    cdef object _addr(self, bint peer):
        cdef np_conn_t *c = self.c
        cdef int fd = -1
        if c == NULL:
            return None
        # dup under the lock the fd is closed under: never another socket's fd.
        pthread_mutex_lock(&c.op.lock)
        if not (c.op.flags & OF_FD_CLOSED) and c.op.fd >= 0:
            fd = dup(c.op.fd)
        pthread_mutex_unlock(&c.op.lock)
        if fd < 0:
            return None
        s = _socket.socket(fileno=fd)
        try:
            return s.getpeername() if peer else s.getsockname()
        except OSError:
            return None
        finally:
            s.close()

    cdef object _cached_addr(self, bint peer):
        # Set once, under the object's lock: two threads storing at once on a
        # free-threaded build would free the first value while it is returned.
        cdef object a = self._remote_addr if peer else self._local_addr
        if a is not None:
            return a
        a = self._addr(peer)
        with cython.critical_section(self):
            if peer:
                if self._remote_addr is None:
                    self._remote_addr = a
                a = self._remote_addr
            else:
                if self._local_addr is None:
                    self._local_addr = a
                a = self._local_addr
        return a

    @property
    def local_addr(self):
        """The local address (host, port) or Unix path."""
        return self._cached_addr(False)

    @property
    def remote_addr(self):
        """The peer's address (host, port) or Unix path ('' for an unnamed peer)."""
        return self._cached_addr(True)

    def __repr__(self):
        """<Connection fd=N LOCAL->REMOTE STATE> (addresses are remembered
        from the first repr or close(); '?' when the fd closed before)."""
        cdef np_conn_t *c = self.c
        if c == NULL:
            return "<Connection (uninitialised)>"
        state = ("closed" if c.op.flags & OF_FD_CLOSED else "closing" if c.op.flags & CF_CLOSING
                 else "peer-closed" if c.op.flags & (CF_PEER_EOF | CF_ERROR) else "open")
        return (f"<Connection fd={c.op.fd} {_fmt_addr(self.local_addr)}->"
                f"{_fmt_addr(self.remote_addr)} {state}>")


cdef Connection new_connection(int fd, Poller poller, WorkerPool pool, object runner,
                               object owner):
    """Wrap a connected non-blocking socket fd (ownership passes to the
    connection, even when this raises); not yet registered."""
    cdef Connection conn = Connection.__new__(Connection)
    cdef np_conn_t *c = _conn_new(fd)
    if c == NULL:
        os.close(fd)
        raise MemoryError()
    conn.c = c
    conn.op = &c.op
    c.op.pyobj = <void *>conn
    c.inbuf.size_hint = _chunk_hint
    c.outbuf.size_hint = _chunk_hint
    conn._poller = poller
    conn._pool = pool
    conn._owner = owner
    c.op.poller = poller.p if poller is not None else NULL
    if runner == "inline":
        c.run_mode = RUN_INLINE
    elif runner == "auto":
        c.run_mode = RUN_AUTO
        if poller is not None and not poller.p.handoff:
            poller._enable_handoff()
    elif runner == "pool" or runner is None:
        c.run_mode = RUN_POOL
        c.pool = pool.q if pool is not None else NULL
        if c.pool == NULL:
            c.run_mode = RUN_INLINE
    else:
        c.run_mode = RUN_CUSTOM
        conn._runner = runner
    cdef ConnReader r = ConnReader.__new__(ConnReader)
    r.lb = c.inbuf
    r.owns = False
    r.mode = LB_READ
    r.conn = conn
    cdef ConnWriter w = ConnWriter.__new__(ConnWriter)
    w.lb = c.outbuf
    w.owns = False
    w.mode = LB_WRITE
    w.conn = conn
    conn.reader = r
    conn.writer = w
    if np_is_inet(fd):
        np_set_nodelay(fd)
    return conn


cdef int setup_connection(Connection conn, object on_request, object read_timeout,
                          object write_timeout, object idle_timeout,
                          object input_limit, object output_limit) except -1:
    """Handler, timeouts and limits of a connection not yet registered:
    plain field stores (the register task arms the idle timer), so the
    accept path queues no extra task per connection. The values were
    validated by the caller (EventLoop, Dialer); this converts them."""
    cdef np_conn_t *c = conn.c
    c.read_timeout_ns = _seconds_ns(read_timeout, "read timeout")
    c.write_timeout_ns = _seconds_ns(write_timeout, "write timeout")
    c.idle_timeout_ns = _seconds_ns(idle_timeout, "idle timeout")
    c.input_limit = input_limit or 0
    c.output_limit = _output_limit(output_limit)
    conn._on_request = on_request
    if on_request is not None:
        c.op.flags |= CF_HAS_HANDLER
    return 0


cdef int start_server_tls(Connection conn, object sslctx, object handshake_timeout) except -1:
    """Make an accepted, not yet registered connection handshake as a TLS
    server before anything else: the poller drives the handshake; on_connect
    (if any) is scheduled when it ends (CF_NEED_CONNECT, set by the caller)."""
    cdef np_conn_t *c = conn.c
    c.tls = np_tls_open(sslctx, c.op.fd, True, None)
    c.hs_timeout_ns = _seconds_ns(handshake_timeout, "ssl_handshake_timeout")
    c.op.flags |= CF_HANDSHAKE
    return 0


cdef int register_connection(Connection conn) except -1:
    conn._poller._register(conn)
    return 0


def wrap_socket_fd(int fd, Poller poller, WorkerPool pool=None, runner="pool", owner=None,
                   on_request=None, read_timeout=None, write_timeout=None, idle_timeout=None,
                   output_limit=DEFAULT_OUTPUT_LIMIT, TLSSession tls=None):
    """Wrap a connected, non-blocking socket fd (ownership passes to the
    connection) and register it with `poller`. Used by the Dialer; `tls` is
    the session of a client handshake already done on fd (taken over)."""
    cdef Connection conn = new_connection(fd, poller, pool, runner, owner)
    if tls is not None:
        if tls.t == NULL or tls.t.fd != fd:
            raise ValueError("the TLS session is not this fd's")
        conn.c.tls = np_tls_take(tls)
    setup_connection(conn, on_request, read_timeout, write_timeout, idle_timeout, 0,
                     output_limit)
    conn._connected = True
    register_connection(conn)
    return conn
