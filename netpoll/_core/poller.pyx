# The poller loop (Netpoll's poll_default_linux.go + fd_operator.go).
#
# One iteration, all without the GIL:
#   send what inline handlers flushed in the last batch -> epoll_wait (timeout
#   from the timer heap) -> for each ready fd: recv into its input LinkBuffer,
#   sendmsg from its output LinkBuffer, accept4 on listeners -> cross-thread
#   tasks -> expired timers.
# Connections that need Python (inline handlers, accepted fds, closes) are
# linked into a list; the GIL is taken once for the whole list. Pool handlers
# are queued to the worker pool without taking the GIL at all.
#
# Locking: np_conn_t.lock guards flags/events/waiters; it is never held while
# taking the GIL and never held across a blocking syscall. epoll_ctl may be
# called from any thread under the connection lock (the kernel serialises it).

import logging
import threading

from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree, PyMem_RawRealloc
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memset

from netpoll._core.includes.system cimport (
    iovec, msghdr, recv, send, sendmsg, writev, shutdown, SHUT_WR, close, poll, pollfd, POLLIN,
    MSG_DONTWAIT,
    errno, EAGAIN, EWOULDBLOCK, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED,
    ETIMEDOUT, EBADF,
    pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_cond_destroy, pthread_cond_broadcast, pthread_self, pthread_equal,
    np_cond_init_monotonic, np_event_t, NP_EV_READ, NP_EV_WRITE, NP_EV_HUP, NP_EV_ERR,
    NP_EV_RDHUP, NP_POLL_MAX, NP_MSG_NOSIGNAL,
    np_atomic_inc_int, np_atomic_dec_int, np_atomic_load_int, np_atomic_store_int,
    np_atomic_load_size,
    np_atomic_cas_int, np_atomic_xchg_int, np_atomic_load_uint, np_monotonic_ns, np_accept,
    np_poll_create, np_poll_ctl, np_poll_wait, np_wakeup_create, np_wakeup_signal,
    np_wakeup_drain, np_wakeup_close,
)
from netpoll._core.linkbuffer cimport (
    np_lb_new, np_lb_free, np_lb_readable, np_lb_reserve, np_lb_commit,
    np_lb_iovecs, np_lb_consume, np_lb_release,
)
from netpoll._core.timer cimport (
    np_timer_t, timer_init, timer_heap_init, timer_heap_free, timer_heap_push,
    timer_heap_remove, timer_heap_pop_expired, timer_heap_timeout_ms,
)
from netpoll._core.runner cimport np_taskq_t, np_taskq_push, np_taskq_check_stall, WorkerPool

cdef extern from "<unistd.h>" nogil:
    ssize_t c_write "write"(int fd, const void *buf, size_t n)

cdef extern from "<errno.h>" nogil:
    int ENOTSOCK

log = logging.getLogger("netpoll")

# The worker pool the pollers feed; they also watch it for stalls (see runner).
cdef np_taskq_t *g_pool = NULL

# Bytes read before the GIL phase runs (and the replies are sent) even if
# ready events remain: the bytes are then still in the core's cache when the
# handler touches them and when send() copies them out. Measured on echo
# 16 KiB x 256 connections: without a cut, one batch read up to 4 MiB and
# send()'s copy (_copy_from_iter) took twice the time (see bench/README.md).
cdef size_t slice_bytes = 256 * 1024


def set_slice_bytes(Py_ssize_t n):
    """Bytes a poller reads from one batch of ready connections before it
    runs their handlers (0: the whole batch first). A tuning knob for
    benchmarks; the default suits caches of 1 MiB and more."""
    global slice_bytes
    if n < 0:
        raise ValueError("slice size must be >= 0")
    slice_bytes = <size_t>n

cdef enum:
    READ_BUDGET = 8             # recv calls per connection per wake (fairness)
    MAX_IOV = 64                # iovecs per sendmsg
    ACCEPT_BATCH = 64           # fds accepted per listener per wake
    BACKOFF_NS = 50000000       # 50 ms pause of a listener after EMFILE/ENFILE
    DEFAULT_DRAIN_NS = 5000000000  # output drain limit at close without a write timeout
    RECV_HINT = 4096            # minimum room offered to recv()
    RX_CHUNK_MIN = 8192         # adaptive input chunk size: bounds
    RX_CHUNK_MAX = 65536         # larger chunks fall outside the pool cache into mmap
    DISCARD_MAX = 262144        # unread input dropped at close so that close() sends a FIN

# ---------------------------------------------------------------- operators

cdef np_conn_t *np_conn_new(int fd, int kind) noexcept nogil:
    cdef np_conn_t *c = <np_conn_t *>PyMem_RawMalloc(sizeof(np_conn_t))
    if c == NULL:
        return NULL
    memset(c, 0, sizeof(np_conn_t))
    c.kind = kind
    c.fd = fd
    c.refcnt = 1
    c.read_timeout_ns = -1
    c.write_timeout_ns = -1
    c.idle_timeout_ns = -1
    pthread_mutex_init(&c.lock, NULL)
    np_cond_init_monotonic(&c.cond)
    timer_init(&c.idle_timer)
    c.idle_timer.kind = TM_IDLE
    c.idle_timer.data = c
    timer_init(&c.drain_timer)
    c.drain_timer.kind = TM_DRAIN if kind == OP_CONN else TM_BACKOFF
    c.drain_timer.data = c
    if kind == OP_CONN:
        c.inbuf = np_lb_new(0)
        c.outbuf = np_lb_new(0)
        if c.inbuf == NULL or c.outbuf == NULL:
            np_conn_decref(c)
            return NULL
    elif kind == OP_LISTENER:
        c.accepted = <int *>PyMem_RawMalloc(ACCEPT_BATCH * sizeof(int))
        if c.accepted == NULL:
            np_conn_decref(c)
            return NULL
    c.last_active_ns = np_monotonic_ns()
    return c


cdef void np_conn_incref(np_conn_t *c) noexcept nogil:
    np_atomic_inc_int(&c.refcnt)


cdef void np_conn_decref(np_conn_t *c) noexcept nogil:
    if np_atomic_dec_int(&c.refcnt) != 0:
        return
    np_lb_free(c.inbuf)
    np_lb_free(c.outbuf)
    PyMem_RawFree(c.accepted)
    pthread_cond_destroy(&c.cond)
    pthread_mutex_destroy(&c.lock)
    PyMem_RawFree(c)


cdef bint np_on_poller_thread(np_poller_t *p) noexcept nogil:
    return p != NULL and p.thread_set and pthread_equal(p.thread, pthread_self())


cdef void np_update_mask_locked(np_conn_t *c) noexcept nogil:
    """Bring the poll-set registration in line with the flags (lock held)."""
    cdef unsigned int f = c.flags
    cdef uint32_t want = 0
    cdef int op
    if not (f & CF_REGISTERED) or (f & CF_FD_CLOSED) or c.poller == NULL:
        return
    if not (f & (CF_PEER_EOF | CF_ERROR | CF_PAUSED | CF_LIMITED | CF_CLOSING)):
        want |= NP_EV_READ
    if (f & CF_WANT_WRITE) and not (f & CF_ERROR):
        want |= NP_EV_WRITE
    if want == c.events:
        return
    # Out of the set when nothing is wanted: a hung-up socket would otherwise
    # report EPOLLHUP on every wait and spin the poller.
    op = 0 if c.events == 0 else (2 if want == 0 else 1)
    if np_poll_ctl(c.poller.pfd, op, c.fd, want, c.events, c) == 0:
        c.events = want


cdef int np_send_output(np_conn_t *c, uint64_t *sent) noexcept nogil:
    """sendmsg the readable output until done (0), EAGAIN (1) or error
    (-errno); adds the bytes sent to *sent unless it is NULL. Non-socket fds
    (a Reactor handler on a pipe) fall back to write/writev."""
    cdef iovec iov[MAX_IOV]
    cdef msghdr msg
    cdef size_t total
    cdef ssize_t r
    cdef int cnt
    memset(&msg, 0, sizeof(msg))
    while True:
        cnt = np_lb_iovecs(c.outbuf, iov, MAX_IOV, &total)
        if cnt == 0:
            np_lb_release(c.outbuf)
            return 0
        if cnt == 1:
            # One region (the common reply): send() skips msghdr/iovec import.
            r = send(c.fd, iov[0].iov_base, iov[0].iov_len, NP_MSG_NOSIGNAL)
        else:
            msg.msg_iov = iov
            msg.msg_iovlen = cnt
            r = sendmsg(c.fd, &msg, NP_MSG_NOSIGNAL)
        if r < 0 and errno == ENOTSOCK:
            r = c_write(c.fd, iov[0].iov_base, iov[0].iov_len) if cnt == 1 \
                else writev(c.fd, iov, cnt)
        if r >= 0:
            if sent != NULL:
                sent[0] += <uint64_t>r
            if <size_t>r == total and cnt < MAX_IOV:
                # Everything readable was sent: done without another look.
                # (A concurrent flusher waits for CF_SENDING and sends itself.)
                np_lb_consume(c.outbuf, <size_t>r, True)
                return 0
            np_lb_consume(c.outbuf, <size_t>r, False)
            continue
        if errno == EINTR:
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            return 1
        return -errno


cdef int np_send_locked(np_conn_t *c) noexcept nogil:
    """Send pending output from this thread (lock held on entry and exit).

    Only one thread sends at a time (CF_SENDING); what the socket does not take
    is left to the poller with EPOLLOUT. Returns 0 all sent, 1 left pending,
    -errno on error, -EBADF when this thread may not send now."""
    cdef int st
    if c.flags & (CF_SENDING | CF_FD_CLOSED | CF_ERROR):
        return -EBADF
    c.flags |= CF_SENDING
    pthread_mutex_unlock(&c.lock)
    st = np_send_output(c, NULL)
    pthread_mutex_lock(&c.lock)
    c.flags &= ~CF_SENDING
    if c.idle_timeout_ns > 0:      # the clock read is only needed for idleness
        c.last_active_ns = np_monotonic_ns()
    if st < 0:
        c.flags |= CF_ERROR
        c.flags &= ~CF_WANT_WRITE
        if c.err == 0:
            c.err = -st
    elif st == 1:
        c.flags |= CF_WANT_WRITE
    else:
        c.flags &= ~CF_WANT_WRITE
        if c.flags & CF_SHUT_WR_PENDING:
            c.flags &= ~CF_SHUT_WR_PENDING
            c.flags |= CF_SHUT_WR
            shutdown(c.fd, SHUT_WR)
    np_update_mask_locked(c)
    if c.waiters:
        pthread_cond_broadcast(&c.cond)
    if c.flags & CF_TEARDOWN_WAIT:
        c.flags &= ~CF_TEARDOWN_WAIT
        np_poller_submit(c.poller, TASK_TEARDOWN, c, NULL)
    return st


cdef int _read_socket(np_conn_t *c, int64_t now, size_t *got) noexcept nogil:
    """recv into the input buffer until EAGAIN or the budget; called only by
    the thread that owns the input side (the poller, or an inline handler on
    it). Returns 0, 1 at EOF, or errno."""
    cdef char *p
    cdef size_t cap, want, have, room, hint
    cdef ssize_t r
    cdef int budget = READ_BUDGET
    cdef int e
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
        want = c.want - np_lb_readable(c.inbuf) if c.want > np_lb_readable(c.inbuf) else 0
        p = np_lb_reserve(c.inbuf, want if want > hint else hint, c.rx_chunk, &cap)
        if p == NULL:
            return ENOMEM
        if c.input_limit:
            # Backpressure: read no further than the limit (or what a blocked
            # reader waits for), so one wake-up cannot overshoot it.
            have = np_lb_readable(c.inbuf)
            room = c.input_limit if c.input_limit > c.want else c.want
            room = room - have if room > have else 0
            if room == 0:
                np_lb_commit(c.inbuf, 0)
                return 0
            if room < cap:
                cap = room
        r = recv(c.fd, p, cap, 0)
        if r > 0:
            np_lb_commit(c.inbuf, <size_t>r)
            got[0] += <size_t>r
            if <size_t>r < cap:
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
        if e == EINTR:
            continue
        if e == EAGAIN or e == EWOULDBLOCK:
            return 0
        return e
    return 0


cdef inline bint _wants_process_locked(np_conn_t *c) noexcept nogil:
    """Set RUNNING if a process() should be scheduled now (lock held)."""
    cdef unsigned int f = c.flags
    if f & (CF_RUNNING | CF_CLOSING | CF_FD_CLOSED):
        return False
    if (f & (CF_PEER_EOF | CF_ERROR)) or ((f & CF_HAS_HANDLER) and np_lb_readable(c.inbuf) > 0):
        c.flags |= CF_RUNNING
        return True
    return False


cdef int _after_read_locked(np_conn_t *c, int st, size_t got, int64_t now) noexcept nogil:
    """Fold a read's outcome into the flags; wake readers (lock held)."""
    if got:
        c.rx_seq += 1
        c.last_active_ns = now
    if st == 1:
        c.flags |= CF_PEER_EOF
    elif st != 0:
        c.flags |= CF_ERROR
        if c.err == 0:
            c.err = st
    if c.input_limit and np_lb_readable(c.inbuf) >= c.input_limit \
            and np_lb_readable(c.inbuf) >= c.want:
        c.flags |= CF_LIMITED
    np_update_mask_locked(c)
    if c.waiters and (np_lb_readable(c.inbuf) >= c.want or st != 0):
        pthread_cond_broadcast(&c.cond)
    return 0


cdef void np_relieve_limit_locked(np_conn_t *c) noexcept nogil:
    """Resume reading a connection stopped by its input limit once the rule
    that stopped it (set in _after_read_locked) no longer holds: the buffer
    fell below the limit, the limit was lifted, or a blocked reader wants
    more than is buffered. Lock held."""
    cdef size_t have
    if not (c.flags & CF_LIMITED):
        return
    have = np_lb_readable(c.inbuf)
    if c.input_limit == 0 or have < c.input_limit or have < c.want:
        c.flags &= ~CF_LIMITED
        np_update_mask_locked(c)


cdef int np_read_direct(np_conn_t *c, int64_t deadline) noexcept nogil:
    """Blocking read on the poller thread itself (an inline handler waiting for
    c.want bytes): poll() this one socket, stalling the poller's other
    connections until the bytes arrive, the peer leaves, the connection is
    closed from another thread (the wake-up fd is polled too) or `deadline`
    passes. Returns 0 when c.want bytes are readable, 1 peer closed or socket
    error (recorded in c.err), 2 closed by us, 3 timeout."""
    cdef pollfd pfds[2]
    cdef np_poller_t *p = c.poller
    cdef int64_t now
    cdef int ms, st, r
    cdef size_t got
    pthread_mutex_lock(&c.lock)
    # Send what this handler flushed so far: the peer may wait for it.
    if np_lb_readable(c.outbuf) and not (c.flags & (CF_SENDING | CF_WANT_WRITE)):
        np_send_locked(c)
    while np_lb_readable(c.inbuf) < c.want:
        if c.flags & CF_USER_CLOSED:
            pthread_mutex_unlock(&c.lock)
            return 2
        if c.flags & (CF_PEER_EOF | CF_ERROR | CF_FD_CLOSED | CF_CLOSING):
            pthread_mutex_unlock(&c.lock)
            return 1
        pthread_mutex_unlock(&c.lock)
        now = np_monotonic_ns()
        if deadline >= 0:
            if now >= deadline:
                return 3
            ms = <int>((deadline - now + 999999) // 1000000)
        else:
            ms = -1
        pfds[0].fd = c.fd
        pfds[0].events = POLLIN
        pfds[0].revents = 0
        pfds[1].fd = p.wake_r
        pfds[1].events = POLLIN
        pfds[1].revents = 0
        r = poll(pfds, 2, ms)
        if r < 0 and errno != EINTR:
            pthread_mutex_lock(&c.lock)
            _after_read_locked(c, errno, 0, np_monotonic_ns())
            pthread_mutex_unlock(&c.lock)
            return 1
        if pfds[1].revents:
            # Another thread wants this poller (a close, a task): the tasks
            # stay queued for the loop, which checks them after this handler.
            _wake_ack(p)
        if pfds[0].revents:
            st = _read_socket(c, np_monotonic_ns(), &got)
            pthread_mutex_lock(&c.lock)
            _after_read_locked(c, st, got, np_monotonic_ns())
        else:
            pthread_mutex_lock(&c.lock)
    pthread_mutex_unlock(&c.lock)
    return 0


cdef inline void _wake_ack(np_poller_t *p) noexcept nogil:
    """Consume a wake-up. Drain first, then clear the flag: a signal sent after
    the clear is never drained unseen (it wakes the next wait), and a sender
    that still saw the flag set skipped its signal only while a wake-up was
    in flight. The exchange is a full barrier, so the p.ntasks read that
    follows cannot pass it."""
    np_wakeup_drain(p.wake_r)
    np_atomic_xchg_int(&p.wake_pending, 0)


cdef void np_poller_kick(np_poller_t *p) noexcept nogil:
    """Wake p's thread from epoll_wait or a direct read (any thread)."""
    if p != NULL and not np_on_poller_thread(p) and np_atomic_cas_int(&p.wake_pending, 0, 1):
        np_wakeup_signal(p.wake_w)


cdef void np_flush_async(np_conn_t *c) noexcept nogil:
    """An inline handler flushed: send at the start of the poller's next
    iteration, batched with every other connection of this batch."""
    cdef np_poller_t *p = c.poller
    if c.in_flush:
        return
    c.in_flush = 1
    np_conn_incref(c)
    c.next_flush = p.flush_head
    p.flush_head = c


cdef void _flush_batch(np_poller_t *p) noexcept nogil:
    cdef np_conn_t *c = p.flush_head
    cdef np_conn_t *nxt
    cdef int st
    p.flush_head = NULL
    while c != NULL:
        nxt = c.next_flush
        c.in_flush = 0
        pthread_mutex_lock(&c.lock)
        if not (c.flags & (CF_SENDING | CF_WANT_WRITE | CF_FD_CLOSED | CF_ERROR)):
            st = np_send_locked(c)
            if st == 1 and c.write_timeout_ns >= 0 and not (c.flags & CF_DRAIN_ARMED):
                # The peer does not read fast enough: bound the wait.
                c.flags |= CF_DRAIN_ARMED
                c.drain_timer.when = np_monotonic_ns() + c.write_timeout_ns
                timer_heap_push(&p.timers, &c.drain_timer)
            elif st < 0 and st != -EBADF:
                if _wants_process_locked(c):
                    pthread_mutex_unlock(&c.lock)
                    _schedule(p, c)
                    pthread_mutex_lock(&c.lock)
        pthread_mutex_unlock(&c.lock)
        np_conn_decref(c)
        c = nxt

# ------------------------------------------------------------ scheduling

cdef inline void _gil_list_add(np_poller_t *p, np_conn_t *c, int reason) noexcept nogil:
    if c.gil_reasons == 0:
        np_conn_incref(c)
        c.next_gil = p.gil_head
        p.gil_head = c
    c.gil_reasons |= reason


cdef void np_gil_list_add(np_poller_t *p, np_conn_t *c, int reason) noexcept nogil:
    _gil_list_add(p, c, reason)


cdef void _schedule(np_poller_t *p, np_conn_t *c) noexcept nogil:
    """Run process() for c (RUNNING already set): on the pool without the GIL,
    or in this batch's GIL phase."""
    if c.run_mode == RUN_POOL and c.pool != NULL:
        np_conn_incref(c)
        if np_taskq_push(c.pool, c) == 0:
            return
        np_conn_decref(c)
    _gil_list_add(p, c, GR_PROCESS)


cdef void np_schedule_process(np_conn_t *c) noexcept nogil:
    """From any thread: run process() for c, whose RUNNING flag the caller set."""
    if c.run_mode == RUN_POOL and c.pool != NULL:
        np_conn_incref(c)
        if np_taskq_push(c.pool, c) == 0:
            return
        np_conn_decref(c)
    if c.poller != NULL:
        np_poller_submit(c.poller, TASK_PROCESS, c, NULL)


cdef void np_pool_item(void *item) noexcept:
    """Worker-pool entry point (GIL held): run process() of the connection."""
    cdef np_conn_t *c = <np_conn_t *>item
    cdef Operator op
    if c.pyobj != NULL:
        op = <Operator><PyObject *>c.pyobj
        try:
            op._process()
        except BaseException:
            log.exception("netpoll: unexpected error in a connection task")
    np_conn_decref(c)

# -------------------------------------------------------------- event work

cdef size_t _on_readable(np_poller_t *p, np_conn_t *c, int64_t now) noexcept nogil:
    """Read what c has (within the budget); returns the bytes read."""
    cdef int st
    cdef size_t got
    cdef bint sched
    # CF_FD_CLOSED is only set on this thread; the other bits are hints here
    # and re-checked under the lock below, so a relaxed read is enough.
    if np_atomic_load_uint(&c.flags) & (CF_FD_CLOSED | CF_PEER_EOF | CF_ERROR | CF_PAUSED
                                        | CF_LIMITED | CF_CLOSING):
        pthread_mutex_lock(&c.lock)
        # Reading is off; a hang-up is reported regardless of the mask. Leave
        # the set unless output is pending; resume/teardown re-register.
        if not (c.flags & (CF_WANT_WRITE | CF_FD_CLOSED)) and c.events != 0:
            if np_poll_ctl(p.pfd, 2, c.fd, 0, c.events, c) == 0:
                c.events = 0
        pthread_mutex_unlock(&c.lock)
        return 0
    st = _read_socket(c, now, &got)
    pthread_mutex_lock(&c.lock)
    _after_read_locked(c, st, got, now)
    sched = _wants_process_locked(c)
    pthread_mutex_unlock(&c.lock)
    if sched:
        _schedule(p, c)
    return got


cdef void _on_writable(np_poller_t *p, np_conn_t *c) noexcept nogil:
    cdef int st
    cdef bint sched = False
    cdef bint finish = False
    pthread_mutex_lock(&c.lock)
    if c.flags & (CF_SENDING | CF_FD_CLOSED):
        pthread_mutex_unlock(&c.lock)
        return
    st = np_send_locked(c)
    if st == 0:
        if c.flags & CF_DRAIN_ARMED:
            c.flags &= ~CF_DRAIN_ARMED
            timer_heap_remove(&p.timers, &c.drain_timer)
        finish = (c.flags & CF_TEARDOWN) != 0
    elif st < 0 and st != -EBADF:
        finish = (c.flags & CF_TEARDOWN) != 0
        sched = _wants_process_locked(c)
    pthread_mutex_unlock(&c.lock)
    if finish:
        _teardown(p, c, True)
    elif sched:
        _schedule(p, c)


cdef void _on_accept(np_poller_t *p, np_conn_t *l, int64_t now) noexcept nogil:
    cdef int fd, e
    while l.naccepted < ACCEPT_BATCH:
        fd = np_accept(l.fd)
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
            # Out of descriptors: stop watching the listener for a while
            # instead of spinning on a readiness we cannot serve.
            l.accept_errno = e
            pthread_mutex_lock(&l.lock)
            if l.events != 0 and np_poll_ctl(p.pfd, 2, l.fd, 0, l.events, l) == 0:
                l.events = 0
            pthread_mutex_unlock(&l.lock)
            l.drain_timer.when = now + BACKOFF_NS
            timer_heap_push(&p.timers, &l.drain_timer)
            break
        l.accept_errno = e
        break
    if l.naccepted or l.accept_errno:
        _gil_list_add(p, l, GR_ACCEPT)


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
    cdef int fd
    pthread_mutex_lock(&c.lock)
    if c.flags & CF_FD_CLOSED:
        pthread_mutex_unlock(&c.lock)
        return
    c.flags |= CF_TEARDOWN
    if c.flags & CF_SENDING:
        c.flags |= CF_TEARDOWN_WAIT       # the sender resubmits when done
        pthread_mutex_unlock(&c.lock)
        return
    if c.kind == OP_CONN and not forced and not (c.flags & CF_ERROR) \
            and np_lb_readable(c.outbuf) > 0:
        # Deliver what was flushed before the close, bounded in time.
        if not (c.flags & CF_DRAIN_ARMED):
            c.flags |= CF_DRAIN_ARMED
            c.drain_timer.when = np_monotonic_ns() + (
                c.write_timeout_ns if c.write_timeout_ns >= 0 else DEFAULT_DRAIN_NS)
            timer_heap_push(&p.timers, &c.drain_timer)
        c.flags |= CF_WANT_WRITE
        np_update_mask_locked(c)
        pthread_mutex_unlock(&c.lock)
        return
    if c.events != 0:
        np_poll_ctl(p.pfd, 2, c.fd, 0, c.events, c)
        c.events = 0
    fd = c.fd
    c.fd = -1
    c.flags |= CF_FD_CLOSED
    c.flags &= ~CF_WANT_WRITE
    if c.waiters:
        pthread_cond_broadcast(&c.cond)
    pthread_mutex_unlock(&c.lock)
    timer_heap_remove(&p.timers, &c.idle_timer)
    timer_heap_remove(&p.timers, &c.drain_timer)
    if fd >= 0:
        if c.kind == OP_CONN and not (c.flags & CF_ERROR):
            _discard_input(fd)
        close(fd)
    _gil_list_add(p, c, GR_TEARDOWN)


cdef void _arm_idle(np_poller_t *p, np_conn_t *c, int64_t now) noexcept nogil:
    timer_heap_remove(&p.timers, &c.idle_timer)
    c.last_active_ns = now         # sends do not stamp activity without a timeout
    if c.idle_timeout_ns > 0 and not (c.flags & (CF_CLOSING | CF_FD_CLOSED)):
        c.idle_timer.when = c.last_active_ns + c.idle_timeout_ns
        if c.idle_timer.when < now:
            c.idle_timer.when = now
        timer_heap_push(&p.timers, &c.idle_timer)


cdef void _on_timer(np_poller_t *p, np_timer_t *t, int64_t now) noexcept nogil:
    cdef np_conn_t *c = <np_conn_t *>t.data
    cdef bint sched = False
    if t.kind == TM_USER:
        (<np_hook_t *>t.data).fn(p, <np_hook_t *>t.data, t, now)
        return
    if t.kind == TM_BACKOFF:
        pthread_mutex_lock(&c.lock)
        if not (c.flags & (CF_FD_CLOSED | CF_CLOSING)) and c.events == 0:
            if np_poll_ctl(p.pfd, 0, c.fd, NP_EV_READ, 0, c) == 0:
                c.events = NP_EV_READ
        pthread_mutex_unlock(&c.lock)
        return
    if t.kind == TM_IDLE:
        pthread_mutex_lock(&c.lock)
        if c.flags & (CF_CLOSING | CF_FD_CLOSED):
            pthread_mutex_unlock(&c.lock)
            return
        if c.flags & CF_RUNNING or c.last_active_ns + c.idle_timeout_ns > now:
            # Busy, or traffic since the timer was set: look again later.
            c.idle_timer.when = c.last_active_ns + c.idle_timeout_ns
            if c.idle_timer.when <= now:
                c.idle_timer.when = now + c.idle_timeout_ns
            timer_heap_push(&p.timers, &c.idle_timer)
        else:
            c.flags |= CF_IDLE_FIRED | CF_RUNNING
            sched = True
        pthread_mutex_unlock(&c.lock)
        if sched:
            _schedule(p, c)
        return
    if t.kind == TM_DRAIN:
        pthread_mutex_lock(&c.lock)
        c.flags &= ~CF_DRAIN_ARMED
        if c.flags & CF_TEARDOWN:
            pthread_mutex_unlock(&c.lock)
            _teardown(p, c, True)       # the drain limit passed: drop the rest
            return
        if np_lb_readable(c.outbuf) > 0:
            # An inline flush could not complete within the write timeout.
            c.flags |= CF_ERROR
            c.err = ETIMEDOUT
            np_update_mask_locked(c)
            sched = _wants_process_locked(c)
        pthread_mutex_unlock(&c.lock)
        if sched:
            _schedule(p, c)


cdef int np_poller_submit(np_poller_t *p, int kind, void *op, void *arg) noexcept nogil:
    """Queue a task for p's thread and wake it. Holds a reference to op."""
    cdef np_task_t *grown
    cdef size_t cap
    if p == NULL:
        return -1
    pthread_mutex_lock(&p.qlock)
    if p.ntasks == p.taskcap:
        cap = p.taskcap * 2 if p.taskcap else 64
        grown = <np_task_t *>PyMem_RawRealloc(p.tasks, cap * sizeof(np_task_t))
        if grown == NULL:
            pthread_mutex_unlock(&p.qlock)
            return -1
        p.tasks = grown
        p.taskcap = cap
    if op != NULL:
        np_conn_incref(<np_conn_t *>op)
    p.tasks[p.ntasks].kind = kind
    p.tasks[p.ntasks].op = op
    p.tasks[p.ntasks].arg = arg
    p.ntasks += 1
    pthread_mutex_unlock(&p.qlock)
    if not np_on_poller_thread(p) and np_atomic_cas_int(&p.wake_pending, 0, 1):
        np_wakeup_signal(p.wake_w)
    return 0


cdef void _run_tasks(np_poller_t *p, int64_t now) noexcept nogil:
    cdef np_task_t *tasks
    cdef size_t n, i
    cdef np_conn_t *c
    cdef bint sched
    pthread_mutex_lock(&p.qlock)
    tasks = p.tasks
    n = p.ntasks
    p.tasks = NULL
    p.ntasks = 0
    p.taskcap = 0
    pthread_mutex_unlock(&p.qlock)
    for i in range(n):
        c = <np_conn_t *>tasks[i].op
        if tasks[i].kind == TASK_REGISTER:
            pthread_mutex_lock(&c.lock)
            if not (c.flags & (CF_FD_CLOSED | CF_REGISTERED)):
                c.flags |= CF_REGISTERED
                if c.kind == OP_LISTENER:
                    if np_poll_ctl(p.pfd, 0, c.fd, NP_EV_READ, 0, c) == 0:
                        c.events = NP_EV_READ
                else:
                    np_update_mask_locked(c)
                    # Input that arrived before registration (or a client's
                    # pre-read) would otherwise wait for more bytes.
                    sched = _wants_process_locked(c)
                    if sched:
                        pthread_mutex_unlock(&c.lock)
                        _schedule(p, c)
                        pthread_mutex_lock(&c.lock)
            pthread_mutex_unlock(&c.lock)
            _arm_idle(p, c, now)
        elif tasks[i].kind == TASK_TEARDOWN:
            _teardown(p, c, tasks[i].arg != NULL)
        elif tasks[i].kind == TASK_ARM_IDLE:
            _arm_idle(p, c, now)
        elif tasks[i].kind == TASK_RESUME:
            pthread_mutex_lock(&c.lock)
            np_update_mask_locked(c)
            sched = _wants_process_locked(c)
            pthread_mutex_unlock(&c.lock)
            if sched:
                _schedule(p, c)
        elif tasks[i].kind == TASK_PROCESS:
            _gil_list_add(p, c, GR_PROCESS)
        elif tasks[i].kind == TASK_CALL:
            (<np_hook_t *>tasks[i].arg).fn(p, <np_hook_t *>tasks[i].arg, NULL, now)
        if c != NULL:
            np_conn_decref(c)
    PyMem_RawFree(tasks)


cdef void _release_held(np_poller_t *p) noexcept nogil:
    """Drop the references that the unhandled rest of a cut batch holds."""
    cdef int i
    if p.ev_held:
        for i in range(p.ev_i, p.ev_n):
            np_conn_decref(<np_conn_t *>p.evs[i].ptr)
    p.ev_held = 0
    p.ev_i = p.ev_n = 0


cdef inline void _dispatch(np_poller_t *p, np_conn_t *c, uint32_t ev, int64_t now,
                           size_t *nread) noexcept nogil:
    if c.kind == OP_CONN:
        if ev & NP_EV_WRITE:
            _on_writable(p, c)
        if ev & (NP_EV_READ | NP_EV_HUP | NP_EV_ERR | NP_EV_RDHUP):
            nread[0] += _on_readable(p, c, now)
    elif c.kind == OP_LISTENER:
        if not (np_atomic_load_uint(&c.flags) & CF_FD_CLOSED):
            _on_accept(p, c, now)
    elif c.kind == OP_HANDLER:
        # Reactor handler: record what is ready, its callbacks run in the
        # GIL phase (reads happen there, in on_read, as in goev).
        if not (np_atomic_load_uint(&c.flags) & CF_FD_CLOSED):
            c.hready |= ev
            _gil_list_add(p, c, GR_HANDLER)
    else:
        _wake_ack(p)


cdef int _poll_once(np_poller_t *p) noexcept nogil:
    """One iteration without the GIL. Returns -1 when the poller must stop.

    A batch of ready events is cut into slices of about slice_bytes read: the
    GIL phase runs after each slice, and the rest of the batch is handled in
    the next iteration without a new poll_wait. Operators of the rest hold a
    reference meanwhile (the GIL phase may tear them down; a closed fd is
    skipped, its number may already be reused)."""
    cdef int n, i, timeout
    cdef int64_t now
    cdef np_conn_t *c
    cdef np_timer_t *t
    cdef size_t nread = 0
    if p.flush_head != NULL:
        _flush_batch(p)
    if p.ev_i < p.ev_n:
        if np_atomic_load_int(&p.stop):
            _release_held(p)
            return -1
        n = p.ev_n - p.ev_i
    else:
        now = np_monotonic_ns()
        timeout = timer_heap_timeout_ms(&p.timers, now, -1)
        if np_atomic_load_size(&p.ntasks) or p.gil_head != NULL:
            timeout = 0       # tasks, or GIL work scheduled by _flush_batch above
        elif g_pool != NULL and g_pool.count > 0 and (timeout < 0 or timeout > 1):
            timeout = 1       # watch queued pool work for stalled workers
        n = np_poll_wait(p.pfd, p.evs, NP_POLL_MAX, timeout)
        if np_atomic_load_int(&p.stop):
            return -1
        if n < 0:
            if errno != EINTR:
                return -1
            n = 0
        p.ev_n = n
        p.ev_i = 0
        p.ev_held = 0
        p.loops += 1
        p.events += n
    now = np_monotonic_ns()
    while p.ev_i < p.ev_n:
        i = p.ev_i
        p.ev_i += 1
        c = <np_conn_t *>p.evs[i].ptr
        _dispatch(p, c, p.evs[i].events, now, &nread)
        if p.ev_held:
            np_conn_decref(c)
        elif slice_bytes and nread >= slice_bytes and p.gil_head != NULL \
                and p.ev_i < p.ev_n:
            for i in range(p.ev_i, p.ev_n):
                np_conn_incref(<np_conn_t *>p.evs[i].ptr)
            p.ev_held = 1
            p.slices += 1
        if p.ev_held and nread >= slice_bytes and p.gil_head != NULL:
            break
    if p.ev_i >= p.ev_n:
        p.ev_i = p.ev_n = 0
        p.ev_held = 0
    if np_atomic_load_size(&p.ntasks):
        _run_tasks(p, now)
    if g_pool != NULL:
        np_taskq_check_stall(g_pool, now)
    while True:
        t = timer_heap_pop_expired(&p.timers, now)
        if t == NULL:
            break
        _on_timer(p, t, now)
    return n


cdef class Operator:
    """Base of the Python objects that own an fd operator (np_conn_t)."""

    def __cinit__(self):
        self.op = NULL

    cdef int _on_poller_event(self) except -1:
        return 0

    cdef int _process(self) except -1:
        return 0

    cdef int _on_teardown(self) except -1:
        return 0


cdef class Poller:
    """One poller thread with its own poll set, wake-up fd and timer heap.

    Created and started by the library (see netpoll.configure); users do not
    construct pollers. Registered operators are kept alive by `registry`
    until their fd is closed.
    """

    def __cinit__(self, int index=0):
        self.p = <np_poller_t *>PyMem_RawMalloc(sizeof(np_poller_t))
        if self.p == NULL:
            raise MemoryError()
        memset(self.p, 0, sizeof(np_poller_t))
        self.p.pfd = -1
        self.p.wake_r = -1
        self.p.wake_w = -1
        pthread_mutex_init(&self.p.qlock, NULL)
        timer_heap_init(&self.p.timers)
        self.p.evs = <np_event_t *>PyMem_RawMalloc(NP_POLL_MAX * sizeof(np_event_t))
        if self.p.evs == NULL:
            raise MemoryError()
        self.p.pfd = np_poll_create()
        if self.p.pfd < 0:
            raise OSError(errno, "netpoll: cannot create the poll set")
        if np_wakeup_create(&self.p.wake_r, &self.p.wake_w) < 0:
            raise OSError(errno, "netpoll: cannot create the wake-up fd")
        self.p.wake_op.kind = OP_WAKEUP
        self.p.wake_op.fd = self.p.wake_r
        self.p.wake_op.refcnt = 1
        if np_poll_ctl(self.p.pfd, 0, self.p.wake_r, NP_EV_READ, 0, &self.p.wake_op) < 0:
            raise OSError(errno, "netpoll: cannot watch the wake-up fd")
        self.index = index
        self.p.index = index
        self.registry = {}
        self.thread = None

    def start(self):
        """Start the poller thread (idempotent)."""
        if self.thread is not None:
            return
        self.thread = threading.Thread(target=self._run, name=f"netpoll-poller-{self.index}",
                                       daemon=True)
        self.thread.start()

    def _run(self):
        cdef np_poller_t *p = self.p
        cdef int r = 0
        p.thread = pthread_self()
        p.thread_set = 1
        try:
            while True:
                with nogil:
                    while True:
                        r = _poll_once(p)
                        if r < 0 or p.gil_head != NULL:
                            break
                if p.gil_head != NULL:
                    self._gil_phase()
                if r < 0:
                    break
        finally:
            # pthread ids are reused: a thread started after this one ends
            # must not pass for the poller (np_on_poller_thread).
            p.thread_set = 0

    cdef int _gil_phase(self) except -1:
        """Run everything of this batch that needs Python, GIL held once."""
        cdef np_poller_t *p = self.p
        cdef np_conn_t *c
        cdef np_conn_t *nxt
        cdef Operator op
        cdef int reasons
        p.gil_batches += 1
        while p.gil_head != NULL:
            c = p.gil_head
            p.gil_head = NULL
            while c != NULL:
                nxt = c.next_gil
                reasons = c.gil_reasons
                c.gil_reasons = 0
                if c.pyobj != NULL:
                    op = <Operator><PyObject *>c.pyobj
                    # Both may be due in one batch (fds accepted just before
                    # the listener's teardown): events first, so nothing
                    # accepted is dropped, then the teardown.
                    try:
                        if reasons & (GR_PROCESS | GR_ACCEPT | GR_HANDLER):
                            op._on_poller_event()
                    except BaseException:
                        log.exception("netpoll: unexpected error in the poller's dispatch")
                    try:
                        if reasons & GR_TEARDOWN:
                            op._on_teardown()
                    except BaseException:
                        log.exception("netpoll: unexpected error in the poller's dispatch")
                    op = None
                np_conn_decref(c)
                c = nxt
        return 0

    cdef int _register(self, Operator op) except -1:
        """Hand op's fd to this poller (any thread). op stays referenced until
        its teardown."""
        cdef np_conn_t *c = op.op
        c.poller = self.p
        self.registry[id(op)] = op
        if np_poller_submit(self.p, TASK_REGISTER, c, NULL) < 0:
            del self.registry[id(op)]
            raise MemoryError()
        return 0

    def unregister(self, Operator op):
        """Drop the strong reference taken at registration (after teardown)."""
        self.registry.pop(id(op), None)

    def stop(self, timeout=None):
        """Stop the loop and join the thread. Registered fds are not closed
        here: callers close their connections first."""
        np_atomic_store_int(&self.p.stop, 1)
        np_wakeup_signal(self.p.wake_w)
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def operators(self):
        """The connections and listeners registered here (diagnostics)."""
        return list(self.registry.values())

    def is_alive(self):
        return self.thread is not None and self.thread.is_alive()

    def stats(self):
        """Counters: loop iterations, events, GIL batches, batches cut into
        slices, timers, operators."""
        return {
            "index": self.index,
            "loops": self.p.loops,
            "events": self.p.events,
            "gil_batches": self.p.gil_batches,
            "slices": self.p.slices,
            "timers": self.p.timers.size,
            "operators": len(self.registry),
            "queued_tasks": self.p.ntasks,
            "wake_pending": self.p.wake_pending,
        }

    def __dealloc__(self):
        if self.p != NULL:
            if self.p.pfd >= 0:
                close(self.p.pfd)
            if self.p.wake_r >= 0:
                np_wakeup_close(self.p.wake_r, self.p.wake_w)
            timer_heap_free(&self.p.timers)
            PyMem_RawFree(self.p.evs)
            PyMem_RawFree(self.p.tasks)
            pthread_mutex_destroy(&self.p.qlock)
            PyMem_RawFree(self.p)
            self.p = NULL

    def __repr__(self):
        return f"<Poller {self.index} operators={len(self.registry)}>"


def bind_pool(WorkerPool pool not None):
    """Make `pool` run connection tasks queued by the pollers (one pool per
    process: the pollers watch it for stalled workers)."""
    global g_pool
    pool.q.handler = np_pool_item
    g_pool = pool.q
