# The poll loop (Netpoll's poll_default_linux.go). See poller.pxd for the
# operator contract and the descriptor ownership rule.
#
# One iteration, all without the GIL:
#   run deferred work (sends that inline handlers flushed in the last batch)
#   -> poll_wait (timeout from the timer heap) -> for each ready operator,
#   its kind's `ready` (recv, send, accept...) -> queued tasks -> expired
#   timers.
# Operators that need Python are linked into the GIL list; the GIL is taken
# once for the whole list (Poller._run).
#
# Locking: np_op_t.lock guards an operator's flags and poll-set mask; it is
# never held while taking the GIL or across a blocking syscall. epoll_ctl may
# be called from any thread under the operator's lock (the kernel serialises
# it). p.qlock guards the task list, p.all_lock the list of operators in the
# poll set; neither is held while taking an operator's lock.

import logging
import os
import threading
import time

from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memset

from netpoll._core.includes.system cimport (
    close, errno, EINTR, ENOENT, ENOMEM, EBADF, EINVAL, np_event_t, NP_EV_READ, NP_POLL_MAX,
    NP_CTL_ADD, NP_CTL_MOD, NP_CTL_DEL, NP_POLL_NEEDS_REBUILD,
    pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_self, pthread_mutex_t, pthread_cond_t, pthread_cond_signal,
    np_cond_init_monotonic, np_cond_wait_until, ETIMEDOUT,
    np_atomic_load_int, np_atomic_store_int, np_atomic_load_size,
    np_atomic_cas_int, np_atomic_xchg_int, np_monotonic_ns,
    np_poll_create, np_poll_ctl, np_poll_wait, np_poll_replace, np_fd_identity,
    np_wakeup_create, np_wakeup_signal, np_wakeup_drain, np_wakeup_close,
)
from netpoll._core.timer cimport (
    np_timer_t, timer_heap_init, timer_heap_free, timer_heap_push,
    timer_heap_pop_expired, timer_heap_timeout_ms,
)

log = logging.getLogger("netpoll")

cdef extern from "<unistd.h>" nogil:
    int usleep(unsigned int usec)

# Bytes read before the GIL phase runs (and the replies are sent) even if
# ready events remain: the bytes are then still in the core's cache when the
# handler touches them and when send() copies them out. Measured on echo
# 16 KiB x 256 connections: without a cut, one batch read up to 4 MiB and
# send()'s copy (_copy_from_iter) took twice the time (see bench/README.md).
cdef enum:
    DEFAULT_SLICE_BYTES = 262144

# A hook the worker pool installs (runner.pyx): called every iteration, it
# returns a cap on the next wait in ms (-1: none), so that queued pool work
# is watched for stalled workers. One per process, like the pool.
cdef np_tick_fn g_tick = NULL
cdef void *g_tick_arg = NULL

# The poller this thread leads (any poller, EventLoop's or a Reactor's), or
# NULL: a thread that serves other connections must never wait on another
# poller. With hand-offs a thread may stop leading: np_on_any_poller() also
# checks that it still leads. The 64-bit atomics are for busy_since.
cdef extern from *:
    """
    static __thread void *np__lead = 0;
    static inline long long np__load64(long long *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void np__store64(long long *p, long long v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    void *np__lead
    long long np__load64(long long *p) nogil
    void np__store64(long long *p, long long v) nogil


cdef void np_poller_set_tick(np_tick_fn fn, void *arg) noexcept nogil:
    global g_tick_arg, g_tick
    g_tick_arg = arg
    g_tick = fn


cdef bint np_on_any_poller() noexcept nogil:
    return np__lead != NULL and np_on_poller_thread(<np_poller_t *>np__lead)

# ---------------------------------------------------------------- operators

cdef void np_op_init(np_op_t *op, const np_op_kind_t *kind, int fd) noexcept nogil:
    op.kind = kind
    op.fd = fd
    op.refcnt = 1
    pthread_mutex_init(&op.lock, NULL)


cdef int np_op_own_fd(np_op_t *op) noexcept nogil:
    return np_fd_identity(op.fd, &op.dev, &op.ino)


cdef void _all_link(np_poller_t *p, np_op_t *op) noexcept nogil:
    pthread_mutex_lock(&p.all_lock)
    if not op.in_all:
        op.in_all = 1
        op.all_prev = NULL
        op.all_next = p.all_head
        if p.all_head != NULL:
            p.all_head.all_prev = op
        p.all_head = op
    pthread_mutex_unlock(&p.all_lock)


cdef void _all_unlink(np_poller_t *p, np_op_t *op) noexcept nogil:
    pthread_mutex_lock(&p.all_lock)
    if op.in_all:
        op.in_all = 0
        if op.all_prev != NULL:
            op.all_prev.all_next = op.all_next
        else:
            p.all_head = op.all_next
        if op.all_next != NULL:
            op.all_next.all_prev = op.all_prev
        op.all_prev = op.all_next = NULL
    pthread_mutex_unlock(&p.all_lock)


cdef bint _poll_set_intact(np_poller_t *p) noexcept nogil:
    """Does p.pfd still name the poll set p created?"""
    cdef uint64_t dev = 0, ino = 0
    return np_fd_identity(p.pfd, &dev, &ino) == 0 and dev == p.pfd_dev and ino == p.pfd_ino


cdef int np_op_set_interest_locked(np_op_t *op, uint32_t want) noexcept nogil:
    cdef np_poller_t *p = op.poller
    cdef int ctl, e
    if want == op.events:
        return 0
    if p == NULL or op.fd < 0 or (op.flags & OF_FD_CLOSED):
        return 0 if want == 0 else ENOENT
    # Out of the set when nothing is wanted: a hung-up socket would otherwise
    # report EPOLLHUP on every wait and spin the poller.
    ctl = NP_CTL_ADD if op.events == 0 else (NP_CTL_DEL if want == 0 else NP_CTL_MOD)
    if np_poll_ctl(p.pfd, ctl, op.fd, want, op.events, op) < 0:
        e = errno
        if (e != EBADF and e != EINVAL) or _poll_set_intact(p):
            return e
        # The poll set itself is gone (its number closed or reused behind our
        # back): record the interest and let the poller rebuild its set, which
        # re-applies every recorded interest (see _rebuild_poll_set).
        np_atomic_store_int(&p.rebuild, 1)
        np_poller_kick(p)
    if ctl == NP_CTL_ADD:
        _all_link(p, op)
    elif ctl == NP_CTL_DEL:
        _all_unlink(p, op)
    op.events = want
    return 0


cdef void _rebuild_poll_set(np_poller_t *p) noexcept nogil:
    """Replace p's poll set by a fresh one holding the same interests.

    Called when an operator's fd was closed behind our back while it was in
    the set: its registration may live on (a dup keeps the file open) and
    keep reporting events for an operator about to be freed, and it cannot
    be deleted through a number that no longer names it. The new set is
    installed at the same fd number, so concurrent epoll_ctl calls by other
    threads (under operator locks) land in one set or the other; a second
    pass under each operator's lock re-applies every mask to the new set."""
    cdef int nfd, i, n = 0, cap = 0
    cdef uint64_t dev = 0, ino = 0
    cdef np_op_t *op
    cdef np_op_t **ops = NULL
    if not NP_POLL_NEEDS_REBUILD:
        return
    nfd = np_poll_create()
    if nfd < 0:
        p.errors += 1
        p.last_error = errno
        return
    pthread_mutex_lock(&p.all_lock)
    op = p.all_head
    while op != NULL:
        cap += 1
        op = op.all_next
    ops = <np_op_t **>PyMem_RawMalloc((cap + 1) * sizeof(np_op_t *))
    if ops != NULL:
        op = p.all_head
        while op != NULL:
            np_op_incref(op)
            ops[n] = op
            n += 1
            op = op.all_next
    pthread_mutex_unlock(&p.all_lock)
    if ops == NULL:
        close(nfd)
        p.errors += 1
        p.last_error = ENOMEM
        return
    np_poll_ctl(nfd, NP_CTL_ADD, p.wake_r, NP_EV_READ, 0, &p.wake_op)
    for i in range(n):
        op = ops[i]
        pthread_mutex_lock(&op.lock)
        if op.events and op.fd >= 0 and not (op.flags & OF_FD_CLOSED):
            np_poll_ctl(nfd, NP_CTL_ADD, op.fd, op.events, 0, op)
        pthread_mutex_unlock(&op.lock)
    if np_fd_identity(p.pfd, &dev, &ino) == 0 and not _poll_set_intact(p):
        # The number no longer names our set (someone dup2()ed another file
        # over it): leave their file alone and move to the new number.
        np_atomic_store_int(&p.pfd, nfd)
    elif np_poll_replace(nfd, p.pfd) < 0:
        p.errors += 1
        p.last_error = errno
    for i in range(n):
        op = ops[i]
        pthread_mutex_lock(&op.lock)
        if op.events and op.fd >= 0 and not (op.flags & OF_FD_CLOSED):
            if np_poll_ctl(p.pfd, NP_CTL_MOD, op.fd, op.events, op.events, op) < 0 \
                    and errno == ENOENT:
                np_poll_ctl(p.pfd, NP_CTL_ADD, op.fd, op.events, 0, op)
        pthread_mutex_unlock(&op.lock)
        np_op_decref(op)
    PyMem_RawFree(ops)


cdef int np_op_close_fd(np_op_t *op, void (*before_close)(int fd) noexcept nogil) noexcept nogil:
    cdef int fd
    cdef uint64_t dev = 0, ino = 0
    cdef bint ours, zombie = False
    cdef np_poller_t *p
    pthread_mutex_lock(&op.lock)
    if op.flags & OF_FD_CLOSED:
        pthread_mutex_unlock(&op.lock)
        return 0
    fd = op.fd
    p = op.poller
    op.fd = -1
    op.flags |= OF_FD_CLOSED
    ours = fd >= 0 and np_fd_identity(fd, &dev, &ino) == 0 and dev == op.dev and ino == op.ino
    if op.events != 0:
        if not ours or np_poll_ctl(p.pfd, NP_CTL_DEL, fd, 0, op.events, op) < 0:
            zombie = True       # the registration may outlive the number
        op.events = 0
        if p != NULL:
            _all_unlink(p, op)
    pthread_mutex_unlock(&op.lock)
    if ours:
        if before_close != NULL:
            before_close(fd)
        close(fd)
    if zombie and p != NULL:
        if np_on_poller_thread(p):
            _rebuild_poll_set(p)
        else:
            # Only the poller may swap its set (it does before its next wait).
            np_atomic_store_int(&p.rebuild, 1)
            np_poller_kick(p)
    # Not ours any more: the user closed it (the number may name another
    # file now), so the number was left alone; the owner logs it.
    return 1 if ours or fd < 0 else 2


cdef int np_poller_timer_push(np_poller_t *p, np_timer_t *t) noexcept nogil:
    if timer_heap_push(&p.timers, t) == 0:
        return 0
    p.errors += 1
    p.last_error = errno
    return -1

# ---------------------------------------------------------------- tasks

cdef int np_op_submit(np_op_t *op, unsigned int tasks) noexcept nogil:
    cdef np_poller_t *p = op.poller
    if p == NULL:
        return -1
    pthread_mutex_lock(&p.qlock)
    if op.task_bits == 0:
        np_op_incref(op)
        op.next_task = NULL
        if p.task_tail != NULL:
            p.task_tail.next_task = op
        else:
            p.task_head = op
        p.task_tail = op
        p.ntasks += 1
    op.task_bits |= tasks
    pthread_mutex_unlock(&p.qlock)
    if not np_on_poller_thread(p) and np_atomic_cas_int(&p.wake_pending, 0, 1):
        np_wakeup_signal(p.wake_w)
    return 0


cdef void _run_tasks(np_poller_t *p, int64_t now) noexcept nogil:
    """Run the queued tasks. The list is taken whole; each operator's bits
    are taken under the lock as it is reached, so bits submitted meanwhile
    for an operator still in the taken list are run with it, and an
    operator submitted again after that is queued anew."""
    cdef np_op_t *op
    cdef np_op_t *nxt
    cdef unsigned int bits
    pthread_mutex_lock(&p.qlock)
    op = p.task_head
    p.task_head = p.task_tail = NULL
    p.ntasks = 0
    pthread_mutex_unlock(&p.qlock)
    while op != NULL:
        pthread_mutex_lock(&p.qlock)
        nxt = op.next_task
        op.next_task = NULL
        bits = op.task_bits
        op.task_bits = 0
        pthread_mutex_unlock(&p.qlock)
        if bits and op.kind.task != NULL:
            op.kind.task(p, op, bits, now)
        np_op_decref(op)
        op = nxt

# ------------------------------------------------------------- the loop

cdef void np_poller_wake_ack(np_poller_t *p) noexcept nogil:
    """Consume a wake-up. Drain first, then clear the flag: a signal sent after
    the clear is never drained unseen (it wakes the next wait), and a sender
    that still saw the flag set skipped its signal only while a wake-up was
    in flight. The exchange is a full barrier, so the p.ntasks read that
    follows cannot pass it."""
    np_wakeup_drain(p.wake_r)
    np_atomic_xchg_int(&p.wake_pending, 0)


cdef void np_poller_kick(np_poller_t *p) noexcept nogil:
    if p != NULL and not np_on_poller_thread(p) and np_atomic_cas_int(&p.wake_pending, 0, 1):
        np_wakeup_signal(p.wake_w)


cdef void _release_held(np_poller_t *p) noexcept nogil:
    """Drop the references that the unhandled rest of a cut batch holds."""
    cdef int i
    if p.ev_held:
        for i in range(p.ev_i, p.ev_n):
            if <np_op_t *>p.evs[i].ptr != &p.wake_op:
                np_op_decref(<np_op_t *>p.evs[i].ptr)
    p.ev_held = 0
    p.ev_i = p.ev_n = 0


cdef void _run_deferred(np_poller_t *p) noexcept nogil:
    cdef np_op_t *op = p.defer_head
    cdef np_op_t *nxt
    p.defer_head = NULL
    while op != NULL:
        nxt = op.next_defer
        op.deferred = 0
        op.kind.deferred(p, op)
        np_op_decref(op)
        op = nxt


cdef int _poll_once(np_poller_t *p) noexcept nogil:
    """One iteration without the GIL. Returns -1 when the poller must stop.

    A batch of ready events is cut into slices of about p.slice_bytes read:
    the GIL phase runs after each slice, and the rest of the batch is handled
    in the next iteration without a new poll_wait. Operators of the rest hold
    a reference meanwhile (the GIL phase may tear them down; their kinds skip
    a closed fd, whose number may already be reused)."""
    cdef int n, i, timeout, cap
    cdef int64_t now
    cdef np_op_t *op
    cdef np_timer_t *t
    cdef size_t nread = 0
    if p.defer_head != NULL:
        _run_deferred(p)
    if p.ev_i < p.ev_n:
        if np_atomic_load_int(&p.stop):
            _release_held(p)
            return -1
        n = p.ev_n - p.ev_i
    else:
        now = np_monotonic_ns()
        timeout = timer_heap_timeout_ms(&p.timers, now, -1)
        if np_atomic_load_size(&p.ntasks) or p.gil_head != NULL or p.last_error:
            timeout = 0       # tasks, GIL work, or an error to log
        elif g_tick != NULL:
            cap = g_tick(g_tick_arg, now)
            if cap >= 0 and (timeout < 0 or timeout > cap):
                timeout = cap
        if np_atomic_load_int(&p.rebuild):
            np_atomic_store_int(&p.rebuild, 0)
            _rebuild_poll_set(p)
        n = np_poll_wait(p.pfd, p.evs, NP_POLL_MAX, timeout)
        if np_atomic_load_int(&p.stop):
            return -1
        if n < 0:
            if errno != EINTR:
                # Logged in the GIL phase. EBADF/EINVAL: our poll set's number
                # was closed or reused behind our back; a fresh set holding
                # every interest replaces it before the next wait.
                p.errors += 1
                p.last_error = errno
                if errno == EBADF or errno == EINVAL:
                    np_atomic_store_int(&p.rebuild, 1)
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
        op = <np_op_t *>p.evs[i].ptr
        if op == &p.wake_op:
            np_poller_wake_ack(p)
        else:
            nread += op.kind.ready(p, op, p.evs[i].events, now)
        if p.ev_held:
            if op != &p.wake_op:
                np_op_decref(op)
        elif p.slice_bytes and nread >= p.slice_bytes and p.gil_head != NULL \
                and p.ev_i < p.ev_n:
            for i in range(p.ev_i, p.ev_n):
                if <np_op_t *>p.evs[i].ptr != &p.wake_op:
                    np_op_incref(<np_op_t *>p.evs[i].ptr)
            p.ev_held = 1
            p.slices += 1
        if p.ev_held and nread >= p.slice_bytes and p.gil_head != NULL:
            break
    if p.ev_i >= p.ev_n:
        p.ev_i = p.ev_n = 0
        p.ev_held = 0
    if np_atomic_load_size(&p.ntasks):
        _run_tasks(p, now)
    while True:
        t = timer_heap_pop_expired(&p.timers, now)
        if t == NULL:
            break
        op = <np_op_t *>t.data
        op.kind.timer(p, op, t, now)
    return n

# ------------------------------------------------- leaders and standbys
#
# runner="auto" (Go's hand-off of a P when its M blocks, with sysmon): the
# leader of a poller runs auto handlers inline, in its GIL phase. Polling
# passes to a standby thread
#   - at once when a handler is about to wait in netpoll (a read waiting for
#     bytes, a flush waiting for room: np_poller_abdicate), or before a
#     handler that blocked last time (connection.pyx);
#   - when the monitor sees the leader inside one handler longer than the
#     threshold (foreign blocking: time.sleep, a database driver, CPU work;
#     the monitor wakes at the threshold, so within 2 thresholds).
# The switch itself (p.thread, and the rest of the GIL phase's batch,
# p.batch) is decided under g_sb.lock, not by the GIL (free-threaded builds
# have none): a standby takes p only while the leader is inside a handler
# (busy_since != 0) or has given p up (thread_set == 0), and the leader
# ends a handler (busy_end) and gives p up (abdicate) under the same lock.
# So the old leader is never between "am I the leader?" and a write to its
# poller's own lists while a standby takes p; once its handler returns it
# sees that it lost p (the batch is not its any more) and becomes a standby.
#
# Standbys are Python threads waiting in C without the GIL. The pool keeps
# MIN_SPARE of them idle, grows up to `cap` threads and shrinks when they
# stay idle for IDLE_EXIT_NS (keeping MIN_KEEP). With no idle standby (the
# cap reached) no hand-off happens: the poller stalls as with runner="inline"
# (logged once).

cdef enum:
    MIN_SPARE = 2
    MIN_KEEP = 2
    MAX_HANDOFF_POLLERS = 1024

cdef struct np_standby_t:
    pthread_mutex_t lock
    pthread_cond_t cond          # standbys wait here for a poller to lead
    pthread_cond_t mon_cond      # the monitor sleeps here when no handler ran for 1 s
    np_poller_t *need_head       # pollers waiting for a standby (FIFO)
    np_poller_t *need_tail
    int nneed
    int idle                     # standbys waiting on cond
    int total                    # standby threads alive (leading or waiting)
    int spawning                 # started, not yet counted in total
    int cap
    int mon_sleeping
    int mon_started
    int missed                   # a hand-off found no standby, at the cap (logged once)
    int short                    # hand-offs that found no standby since the last tick
    int logged
    long long threshold_ns
    long long idle_exit_ns
    int npollers
    np_poller_t *pollers[MAX_HANDOFF_POLLERS]

cdef np_standby_t g_sb
memset(&g_sb, 0, sizeof(np_standby_t))
pthread_mutex_init(&g_sb.lock, NULL)
np_cond_init_monotonic(&g_sb.cond)
np_cond_init_monotonic(&g_sb.mon_cond)
g_sb.cap = 256
g_sb.threshold_ns = 2000000
g_sb.idle_exit_ns = 10000000000
cdef list _handoff_pollers = []     # keeps p.pyobj alive for standbys


cdef int _sb_assign(np_poller_t *p) noexcept nogil:
    """Send an idle standby to lead p (g_sb.lock held): 0 if none is idle, 1
    if one is already on its way, 2 if the caller must signal g_sb.cond once
    it dropped the lock (the woken standby then does not block on it)."""
    if p.claim_pending:
        return 1
    if g_sb.idle - g_sb.nneed <= 0:
        g_sb.short += 1              # the monitor starts more
        if g_sb.total + g_sb.spawning >= g_sb.cap:
            g_sb.missed = 1
        return False
    p.claim_pending = 1
    p.in_need = 1
    p.next_need = NULL
    if g_sb.need_tail != NULL:
        g_sb.need_tail.next_need = p
    else:
        g_sb.need_head = p
    g_sb.need_tail = p
    g_sb.nneed += 1
    return 2


cdef np_poller_t *_sb_wait() noexcept nogil:
    """A standby's wait: the next poller to lead, or NULL when this thread
    should exit (idle too long beyond MIN_KEEP threads)."""
    cdef np_poller_t *p
    cdef int r
    pthread_mutex_lock(&g_sb.lock)
    while True:
        p = g_sb.need_head
        if p != NULL:
            g_sb.need_head = p.next_need
            if g_sb.need_head == NULL:
                g_sb.need_tail = NULL
            p.next_need = NULL
            p.in_need = 0
            g_sb.nneed -= 1
            pthread_mutex_unlock(&g_sb.lock)
            return p
        g_sb.idle += 1
        r = np_cond_wait_until(&g_sb.cond, &g_sb.lock, np_monotonic_ns() + g_sb.idle_exit_ns)
        g_sb.idle -= 1
        if r == ETIMEDOUT and g_sb.need_head == NULL and g_sb.total > MIN_KEEP:
            g_sb.total -= 1
            pthread_mutex_unlock(&g_sb.lock)
            return NULL


cdef int _sb_top_up() except -1:
    """Start standbys so that MIN_SPARE wait idle, within the cap (GIL held);
    more when hand-offs found none lately (handlers blocking in bulk)."""
    cdef int n
    pthread_mutex_lock(&g_sb.lock)
    n = MIN_SPARE - (g_sb.idle + g_sb.spawning - g_sb.nneed) + 4 * g_sb.short
    g_sb.short = 0
    if n > g_sb.cap - g_sb.total - g_sb.spawning:
        n = g_sb.cap - g_sb.total - g_sb.spawning
    if n > 0:
        g_sb.spawning += n
    pthread_mutex_unlock(&g_sb.lock)
    for _ in range(n):
        try:
            threading.Thread(target=_standby_main, name="netpoll-standby", daemon=True).start()
        except BaseException:
            pthread_mutex_lock(&g_sb.lock)
            g_sb.spawning -= 1
            pthread_mutex_unlock(&g_sb.lock)
            log.exception("netpoll: cannot start a standby thread")
            return 0
    return 0


def _standby_main():
    pthread_mutex_lock(&g_sb.lock)
    g_sb.spawning -= 1
    g_sb.total += 1
    pthread_mutex_unlock(&g_sb.lock)
    _standby_loop()


cdef int _standby_loop() except -1:
    """Wait for pollers to lead until idle for too long (this thread is
    counted in g_sb.total)."""
    cdef np_poller_t *p
    cdef Poller poller
    while True:
        with nogil:
            p = _sb_wait()
        if p == NULL:
            return 0
        poller = <Poller>p.pyobj
        try:
            poller._claim()
        except BaseException:
            log.exception("netpoll: unexpected error in a standby thread")
        poller = None


cdef void _wake_monitor() noexcept nogil:
    pthread_mutex_lock(&g_sb.lock)
    g_sb.mon_sleeping = 0
    pthread_cond_signal(&g_sb.mon_cond)
    pthread_mutex_unlock(&g_sb.lock)


cdef void _monitor_loop() noexcept nogil:
    """Hand pollers whose leader has been inside one auto handler for longer
    than the threshold to a standby. It wakes when the oldest running
    handler reaches the threshold, and at least every `threshold` (1-20 ms):
    a handler that blocks is handed off within two thresholds, and short
    handlers cost ~500 wake-ups a second. Sleeps when no handler was seen
    running for 1 s (busy_begin wakes it)."""
    cdef int i, r, signals
    cdef bint busy, spawn
    cdef long long now, b, calm, next_ns, idle_ns = 0
    cdef long long sleep_ns = 1000000
    cdef np_poller_t *p
    while True:
        usleep(<unsigned int>(sleep_ns // 1000))
        now = np_monotonic_ns()
        busy = spawn = False
        signals = 0
        calm = g_sb.threshold_ns
        if calm < 1000000:
            calm = 1000000
        elif calm > 20000000:
            calm = 20000000
        next_ns = calm
        pthread_mutex_lock(&g_sb.lock)
        for i in range(g_sb.npollers):
            p = g_sb.pollers[i]
            if p.claim_pending:
                continue
            b = np__load64(&p.busy_since)
            if b <= 0:
                continue
            busy = True
            if now - b >= g_sb.threshold_ns:
                if p.thread_set and not np_atomic_load_int(&p.stop):
                    r = _sb_assign(p)
                    if r == 0:
                        spawn = True
                    elif r == 2:
                        signals += 1
            elif b + g_sb.threshold_ns - now < next_ns:
                next_ns = b + g_sb.threshold_ns - now
        if (g_sb.short or g_sb.idle + g_sb.spawning - g_sb.nneed < MIN_SPARE) \
                and g_sb.total + g_sb.spawning < g_sb.cap:
            spawn = True
        pthread_mutex_unlock(&g_sb.lock)
        for i in range(signals):
            pthread_cond_signal(&g_sb.cond)
        if spawn:
            with gil:
                try:
                    _sb_top_up()
                except BaseException:
                    pass
        sleep_ns = next_ns if next_ns > 100000 else 100000
        if busy:
            idle_ns = 0
            continue
        idle_ns += sleep_ns
        if idle_ns >= 1000000000:
            idle_ns = 0
            pthread_mutex_lock(&g_sb.lock)
            g_sb.mon_sleeping = 1
            # Timed (10 ms): busy_begin's unlocked look at mon_sleeping may
            # miss it; this bounds how late a hand-off can then come.
            np_cond_wait_until(&g_sb.mon_cond, &g_sb.lock, np_monotonic_ns() + 10000000)
            g_sb.mon_sleeping = 0
            pthread_mutex_unlock(&g_sb.lock)


def _monitor_main():
    with nogil:
        _monitor_loop()


cdef bint np_poller_abdicate(np_poller_t *p) noexcept:
    global np__lead
    cdef int r
    if not p.handoff or not np_on_poller_thread(p):
        return False
    pthread_mutex_lock(&g_sb.lock)
    r = _sb_assign(p)
    if r != 0:
        # Given up under the lock _claim() decides under: a standby must not
        # find thread_set still 1 with busy_since 0 ("the leader leads on")
        # and leave p with no leader.
        np__store64(&p.busy_since, 0)
        p.thread_set = 0
    pthread_mutex_unlock(&g_sb.lock)
    if r == 2:
        pthread_cond_signal(&g_sb.cond)
    if r == 0:
        _log_missed()
        return False
    np__lead = NULL
    p.handoffs += 1
    return True


cdef bint np_poller_abdicate_busy() noexcept:
    cdef np_poller_t *p = <np_poller_t *>np__lead
    if p == NULL or not p.handoff or np__load64(&p.busy_since) == 0:
        return False
    return np_poller_abdicate(p)


cdef void _log_missed() noexcept:
    if g_sb.missed and not g_sb.logged:
        g_sb.logged = 1
        try:
            log.warning("netpoll: runner='auto': no standby thread left (max_threads=%d); "
                        "a blocked handler stalls its poller", g_sb.cap)
        except BaseException:
            pass


cdef int64_t np_poller_busy_begin(np_poller_t *p) noexcept:
    cdef int64_t now = np_monotonic_ns()
    np__store64(&p.busy_since, now)
    if g_sb.mon_sleeping:
        _wake_monitor()
    return now


cdef void np_poller_busy_end(np_poller_t *p) noexcept:
    if p.handoff:
        # Under the lock _claim() decides under: either the standby took p
        # first (we are no longer the leader) or it will find busy_since 0
        # and leave p to us; never both leading.
        pthread_mutex_lock(&g_sb.lock)
        if np_on_poller_thread(p):
            np__store64(&p.busy_since, 0)
        pthread_mutex_unlock(&g_sb.lock)
    elif np_on_poller_thread(p):
        np__store64(&p.busy_since, 0)
    if g_sb.missed and not g_sb.logged:
        _log_missed()


cdef long long np_poller_busy_pause(np_poller_t *p) noexcept:
    cdef long long since = -1        # -1: not ours to pause
    # Under the lock _claim() decides under: a standby the monitor sent
    # cannot take p between our "still the leader?" and busy_since = 0.
    if p.handoff:
        pthread_mutex_lock(&g_sb.lock)
    if np_on_poller_thread(p):
        since = np__load64(&p.busy_since)
        np__store64(&p.busy_since, 0)
    if p.handoff:
        pthread_mutex_unlock(&g_sb.lock)
    return since


cdef void np_poller_busy_resume(np_poller_t *p, long long since) noexcept:
    if since > 0 and np_on_poller_thread(p):
        np__store64(&p.busy_since, since)


def set_handoff(threshold=None, max_threads=None):
    """runner="auto" settings: the time (seconds) a handler may run on a
    poller's leader before polling passes to a standby thread, and the cap
    on threads (leaders and standbys) the hand-offs may use."""
    if threshold is not None:
        if not (threshold > 0):
            raise ValueError("handoff threshold must be > 0")
        g_sb.threshold_ns = <long long>(threshold * 1e9)
    if max_threads is not None:
        if max_threads < MIN_KEEP:
            raise ValueError(f"max_threads must be >= {MIN_KEEP}")
        g_sb.cap = max_threads


def handoff_stats():
    """Standby pool figures (diagnostics)."""
    return {"threads": g_sb.total, "idle": g_sb.idle, "spawning": g_sb.spawning,
            "cap": g_sb.cap, "threshold": g_sb.threshold_ns / 1e9}


cdef class Operator:
    """Base of the Python objects that own an operator (np_op_t)."""

    def __cinit__(self):
        self.op = NULL

    cdef int _on_poller_event(self) except -1:
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
        self.p.slice_bytes = DEFAULT_SLICE_BYTES
        pthread_mutex_init(&self.p.qlock, NULL)
        pthread_mutex_init(&self.p.all_lock, NULL)
        if timer_heap_init(&self.p.timers) < 0:
            raise MemoryError()
        self.p.evs = <np_event_t *>PyMem_RawMalloc(NP_POLL_MAX * sizeof(np_event_t))
        if self.p.evs == NULL:
            raise MemoryError()
        self.p.pfd = np_poll_create()
        if self.p.pfd < 0:
            raise OSError(errno, "netpoll: cannot create the poll set")
        np_fd_identity(self.p.pfd, &self.p.pfd_dev, &self.p.pfd_ino)
        if np_wakeup_create(&self.p.wake_r, &self.p.wake_w) < 0:
            raise OSError(errno, "netpoll: cannot create the wake-up fd")
        self.p.wake_op.fd = self.p.wake_r
        self.p.wake_op.refcnt = 1
        if np_poll_ctl(self.p.pfd, NP_CTL_ADD, self.p.wake_r, NP_EV_READ, 0,
                       &self.p.wake_op) < 0:
            raise OSError(errno, "netpoll: cannot watch the wake-up fd")
        self.index = index
        self.p.index = index
        self.registry = {}
        self.thread = None
        self._last_log = -1.0
        self._done = threading.Event()
        self.p.pyobj = <void *>self

    def start(self):
        """Start the poller thread (idempotent)."""
        if self.thread is not None:
            return
        self.thread = threading.Thread(target=self._run, name=f"netpoll-poller-{self.index}",
                                       daemon=True)
        self.thread.start()

    def _run(self):
        global np__lead
        cdef np_poller_t *p = self.p
        cdef int done = 0
        p.thread = pthread_self()
        p.thread_set = 1
        np__lead = p
        try:
            done = self._loop()
        finally:
            # pthread ids are reused: a thread started after this one ends
            # must not pass for the poller (np_on_poller_thread).
            if np_on_poller_thread(p):
                p.thread_set = 0
            if np__lead == <void *>p:
                np__lead = NULL
            if not p.handoff:
                self._done.set()
        if not done:
            # Leadership passed to a standby: this thread becomes one.
            pthread_mutex_lock(&g_sb.lock)
            g_sb.total += 1
            pthread_mutex_unlock(&g_sb.lock)
            _standby_loop()

    cdef int _loop(self) except -1:
        """Lead the poller until it stops (1) or leadership passes to
        another thread (0). The GIL is held on entry and exit."""
        global np__lead
        cdef np_poller_t *p = self.p
        cdef int r = 0
        if p.batch != NULL or p.gil_head != NULL:
            if not self._gil_phase():       # the rest of a batch taken over
                return 0
        while True:
            with nogil:
                while True:
                    # (stop is also checked first: a new leader may find the
                    # wake-up already consumed by the old one)
                    r = -1 if np_atomic_load_int(&p.stop) else _poll_once(p)
                    if r < 0 or p.gil_head != NULL or p.last_error:
                        break
            if p.last_error:
                self._log_error()
            if p.gil_head != NULL:
                if not self._gil_phase():
                    return 0
            if r < 0:
                p.thread_set = 0
                np__lead = NULL
                self._done.set()
                return 1

    cdef int _claim(self) except -1:
        """A standby sent to lead this poller (the decision under g_sb.lock:
        see above)."""
        global np__lead
        cdef np_poller_t *p = self.p
        cdef bint done = self._done.is_set()
        pthread_mutex_lock(&g_sb.lock)
        p.claim_pending = 0
        if done or (p.thread_set and np__load64(&p.busy_since) == 0
                    and not np_atomic_load_int(&p.stop)):
            # The loop ended, or the leader's handler returned before we got
            # here (busy_end under this lock): it leads on.
            pthread_mutex_unlock(&g_sb.lock)
            return 0
        p.thread = pthread_self()
        p.thread_set = 1
        np__store64(&p.busy_since, 0)
        pthread_mutex_unlock(&g_sb.lock)
        np__lead = p
        p.handoffs += 1
        # (New standbys are started by the monitor, off this latency path.)
        self._loop()
        return 0

    def _enable_handoff(self):
        """Let runner="auto" connections hand this poller's loop to standby
        threads. The poller is then kept alive for good (standbys reach it by
        a borrowed pointer); the runtime's pollers live as long anyway."""
        if self.p.handoff:
            return
        pthread_mutex_lock(&g_sb.lock)
        if g_sb.npollers >= MAX_HANDOFF_POLLERS:
            pthread_mutex_unlock(&g_sb.lock)
            return
        g_sb.pollers[g_sb.npollers] = self.p
        g_sb.npollers += 1
        self.p.handoff = 1
        start_mon = not g_sb.mon_started
        g_sb.mon_started = 1
        pthread_mutex_unlock(&g_sb.lock)
        _handoff_pollers.append(self)
        if start_mon:
            threading.Thread(target=_monitor_main, name="netpoll-monitor", daemon=True).start()
        _sb_top_up()

    def _log_error(self):
        """Log a failure of the loop (at most one line a second), then pause
        10 ms: a persistent failure must neither spin nor flood the log."""
        cdef np_poller_t *p = self.p
        cdef int e = p.last_error
        p.last_error = 0
        now = time.monotonic()
        if now - self._last_log >= 1.0:
            self._last_log = now
            log.error("netpoll: poller %d: %s (%d errors so far)", self.index,
                      os.strerror(e), p.errors)
        with nogil:
            usleep(10000)

    cdef int _gil_phase(self) except -1:
        """Run everything of this batch that needs Python, GIL held once.
        Returns 0 if leadership passed to another thread meanwhile (the rest
        of the batch, p.batch, is then the new leader's), else 1."""
        cdef np_poller_t *p = self.p
        cdef np_op_t *op
        cdef Operator owner
        cdef int reasons
        p.gil_batches += 1
        while True:
            op = p.batch
            if op == NULL:
                if p.gil_head == NULL:
                    return 1
                p.batch = p.gil_head
                p.gil_head = NULL
                continue
            p.batch = op.next_gil
            reasons = op.gil_reasons
            op.gil_reasons = 0
            if op.pyobj != NULL:
                owner = <Operator><PyObject *>op.pyobj
                # Both may be due in one batch (fds accepted just before
                # the listener's teardown): events first, so nothing
                # accepted is dropped, then the teardown.
                try:
                    if reasons & GR_EVENT:
                        owner._on_poller_event()
                except BaseException:
                    log.exception("netpoll: unexpected error in the poller's dispatch")
                try:
                    if reasons & GR_TEARDOWN:
                        owner._on_teardown()
                except BaseException:
                    log.exception("netpoll: unexpected error in the poller's dispatch")
                owner = None
            np_op_decref(op)
            if p.handoff and not np_on_poller_thread(p):
                return 0

    cdef int _register(self, Operator op) except -1:
        """Hand op's fd to this poller (any thread). op stays referenced until
        its teardown."""
        op.op.poller = self.p
        self.registry[id(op)] = op
        np_op_submit(op.op, T_REGISTER)
        return 0

    def unregister(self, Operator op):
        """Drop the strong reference taken at registration (after teardown)."""
        self.registry.pop(id(op), None)

    def stop(self, timeout=None):
        """Stop the loop and wait (up to `timeout`) until it ended, on
        whichever thread leads it (runner="auto" moves the loop between
        threads). Registered fds are not closed here: callers close their
        connections first."""
        np_atomic_store_int(&self.p.stop, 1)
        np_wakeup_signal(self.p.wake_w)
        t = self.thread
        if t is None or np_on_poller_thread(self.p):
            return
        if self.p.handoff:
            # Whichever thread leads now ends the loop.
            self._done.wait(timeout)
        elif t is not threading.current_thread():
            t.join(timeout)

    def _leader_ident(self):
        """threading.get_ident() of the thread leading this poller now, or
        None (tests)."""
        if not self.p.thread_set:
            return None
        return <unsigned long>self.p.thread

    def operators(self):
        """The connections and listeners registered here (diagnostics)."""
        return list(self.registry.values())

    def is_alive(self):
        if self.thread is None or self._done.is_set():
            return False
        return bool(self.p.handoff) or self.thread.is_alive()

    def _set_slice_bytes(self, Py_ssize_t n):
        """Benchmark knob: bytes read from one batch before the handlers run
        (0: the whole batch first). The default suits caches of 1 MiB and more."""
        if n < 0:
            raise ValueError("slice size must be >= 0")
        self.p.slice_bytes = <size_t>n

    def stats(self):
        """Counters: loop iterations, events, GIL batches, batches cut into
        slices, timers, operators, errors."""
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
            "errors": self.p.errors,
            "handoffs": self.p.handoffs,
        }

    def __dealloc__(self):
        if self.p != NULL:
            if self.p.pfd >= 0:
                close(self.p.pfd)
            if self.p.wake_r >= 0:
                np_wakeup_close(self.p.wake_r, self.p.wake_w)
            timer_heap_free(&self.p.timers)
            PyMem_RawFree(self.p.evs)
            pthread_mutex_destroy(&self.p.qlock)
            pthread_mutex_destroy(&self.p.all_lock)
            PyMem_RawFree(self.p)
            self.p = NULL

    def __repr__(self):
        return f"<Poller {self.index} operators={len(self.registry)}>"
