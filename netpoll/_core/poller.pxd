# The poller and the contract of the operators it drives (Netpoll's
# poll_default_linux.go and fd_operator.go).
#
# An operator is anything with an fd (or none) that a poller drives: a
# connection (connection.pyx), a listener (server.pyx), a Reactor handler or
# a reactor poller's control block (reactor.pyx). Each kind puts the common
# header np_op_t first in its own struct and fills in one np_op_kind_t table;
# the poller calls the table and knows nothing else about the kind.
#
# Descriptor ownership (the one rule; np_op_close_fd in poller.pyx applies it):
#   - An operator owns its fd from the moment the library accepts, connects
#     or is handed it (the creator stores it in op.fd) until np_op_close_fd
#     closes it. Nothing else in the library calls close() on an operator's fd.
#   - The fd's identity (st_dev, st_ino) is recorded when it is handed over.
#     np_op_close_fd closes the number only if it still names that file: a
#     user who closed our fd behind our back (and whose number now names
#     another file, or nothing) never has that other file closed by us.
#   - A registration that may outlive our close (the user dup()ed the fd and
#     closed our number: epoll keys registrations on the open file, and
#     EPOLL_CTL_DEL on the closed number fails) is removed by rebuilding the
#     poll set (np_poller_forget_zombie); only then can the operator's memory
#     be freed, since the kernel hands back op pointers from registrations.
#   - Operators are reference counted: the Python owner holds one; every
#     queued task, GIL-list entry and held batch event holds one. The memory
#     is freed by the kind's `free` when the last one goes.

from libc.stdint cimport int64_t, uint32_t, uint64_t
from netpoll._core.includes.system cimport (pthread_mutex_t, pthread_t, np_event_t,
                                            pthread_equal, pthread_self,
                                            np_atomic_inc_int, np_atomic_dec_int)
from netpoll._core.timer cimport np_timer_t, np_timer_heap_t

cdef struct np_op_t
cdef struct np_poller_t

# Common operator flags (np_op_t.flags, under np_op_t.lock). Kinds use the
# bits below OF_KIND_MAX for their own flags.
cdef enum:
    OF_KIND_MAX = 1 << 24
    OF_REGISTERED = 1 << 24   # registration done (the kind's interest is in the poll set)
    OF_FD_CLOSED = 1 << 25    # the fd was closed (or disowned): never touch the number again

# Task bits (np_op_submit): coalesced per operator, handled by the kind's
# `task` on the poller thread in this order: REGISTER, the kind's own bits,
# TEARDOWN last.
cdef enum:
    T_REGISTER = 1 << 0
    T_TEARDOWN = 1 << 1
    T_FORCE = 1 << 2          # with T_TEARDOWN: do not wait for output to drain
    T_ARM_IDLE = 1 << 3
    T_RESUME = 1 << 4
    T_PROCESS = 1 << 5        # a run of the operator's Python side is due (GIL phase)
    T_CALL = 1 << 6           # kind-specific wake-up (the reactor's control block)

# Why an operator is on the GIL list (np_op_t.gil_reasons, poller thread only).
cdef enum:
    GR_EVENT = 1              # Operator._on_poller_event
    GR_TEARDOWN = 2           # Operator._on_teardown (the fd is closed)

ctypedef size_t (*np_op_ready_fn)(np_poller_t *p, np_op_t *op, uint32_t ev,
                                  int64_t now) noexcept nogil
ctypedef void (*np_op_timer_fn)(np_poller_t *p, np_op_t *op, np_timer_t *t,
                                int64_t now) noexcept nogil
ctypedef void (*np_op_task_fn)(np_poller_t *p, np_op_t *op, unsigned int tasks,
                               int64_t now) noexcept nogil
ctypedef void (*np_op_defer_fn)(np_poller_t *p, np_op_t *op) noexcept nogil
ctypedef void (*np_op_free_fn)(np_op_t *op) noexcept nogil

# One table per operator kind. Every entry runs on the owning poller's
# thread without the GIL, except `free` (any thread, last reference).
cdef struct np_op_kind_t:
    const char *name
    np_op_ready_fn ready      # readiness from poll_wait; returns bytes read
    np_op_timer_fn timer      # one of its timers (t.data == op) expired
    np_op_task_fn task        # T_* bits submitted for it
    np_op_defer_fn deferred   # queued with np_op_defer: runs before the next wait
    np_op_free_fn free        # frees the kind's fields, then the struct

cdef inline void np_kind_init(np_op_kind_t *k, const char *name, np_op_ready_fn ready,
                              np_op_timer_fn timer, np_op_task_fn task,
                              np_op_defer_fn deferred, np_op_free_fn free) noexcept nogil:
    """Fill a kind's table (at module import; unused entries NULL)."""
    k.name = name
    k.ready = ready
    k.timer = timer
    k.task = task
    k.deferred = deferred
    k.free = free

cdef struct np_op_t:
    # Hot: touched on every event (kept together at the front).
    const np_op_kind_t *kind
    int fd
    int refcnt                # atomic
    unsigned int flags        # OF_* and the kind's bits (under lock)
    uint32_t events           # mask currently in the poll set (under lock)
    np_poller_t *poller
    pthread_mutex_t lock
    void *pyobj               # borrowed Python owner (an Operator); NULL after its death
    # poller thread only
    np_op_t *next_gil
    int gil_reasons
    int deferred
    np_op_t *next_defer
    # Cold: tasks from other threads (p.qlock), the registered list, identity.
    np_op_t *next_task
    unsigned int task_bits
    int in_all
    np_op_t *all_prev         # the poller's list of operators in its poll set (p.all_lock)
    np_op_t *all_next
    uint64_t dev              # identity of the owned fd (see the rule above)
    uint64_t ino

cdef struct np_poller_t:
    int pfd                   # the poll set (may move to a new number: _rebuild_poll_set)
    uint64_t pfd_dev          # its identity, to tell it from a file dup2()ed over it
    uint64_t pfd_ino
    int wake_r                # wake-up channel (one eventfd, or a pipe on kqueue)
    int wake_w
    int index
    int stop                  # atomic
    int wake_pending          # atomic: a wake-up is in flight
    pthread_t thread
    int thread_set
    pthread_mutex_t qlock     # the task list
    np_op_t *task_head
    np_op_t *task_tail
    size_t ntasks             # atomic read as a hint
    pthread_mutex_t all_lock  # the list of registered operators
    np_op_t *all_head
    np_timer_heap_t timers
    np_op_t wake_op
    np_event_t *evs
    int ev_n                  # events of the last poll_wait ...
    int ev_i                  # ... and the next one to handle (a batch may be cut in slices)
    int ev_held               # events from ev_i on hold a reference on their operator
    size_t slice_bytes        # bytes read before the GIL phase runs (0: whole batch)
    np_op_t *gil_head         # built without the GIL, consumed with it
    np_op_t *defer_head
    uint64_t loops            # statistics
    uint64_t events
    uint64_t gil_batches
    uint64_t slices
    uint64_t errors           # failures logged by the loop (epoll_wait, timer ENOMEM, ...)
    int last_error            # errno of the last of them, for the GIL phase to log
    int rebuild               # atomic: a registration may outlive its fd (np_op_close_fd)
    # Leadership (runner="auto", poller.pyx "Leaders and standbys"). The leader
    # is the thread running the loop; `thread` is its id. Under the GIL:
    # `thread`/`thread_set` change (a hand-off), and `batch`, the rest of the
    # GIL phase's list, is popped, so a new leader can take it over.
    void *pyobj               # borrowed Poller (hand-off pollers are kept alive)
    int handoff               # hand-offs enabled (Poller._enable_handoff)
    int claim_pending         # a standby is on its way to lead (g_sb.lock)
    int in_need               # queued in g_sb.need (g_sb.lock)
    np_poller_t *next_need
    long long busy_since      # atomic: an auto handler on the leader started then; 0: none
    np_op_t *batch
    uint64_t handoffs         # statistics: leadership passed to a standby

# ---- operator API (any thread unless noted, never needs the GIL) ----
# Initialise the header of a zeroed struct; refcnt 1 (the creator's).
cdef void np_op_init(np_op_t *op, const np_op_kind_t *kind, int fd) noexcept nogil
# Record the identity of op.fd (the fd is now owned by op); -1 if fstat failed.
cdef int np_op_own_fd(np_op_t *op) noexcept nogil

cdef inline void np_op_incref(np_op_t *op) noexcept nogil:
    np_atomic_inc_int(&op.refcnt)

cdef inline void np_op_decref(np_op_t *op) noexcept nogil:
    if np_atomic_dec_int(&op.refcnt) == 0:
        op.kind.free(op)

# Queue task bits for the operator's poller and wake it. Never fails and
# never allocates (the operator is linked into the queue); 0, or -1 when the
# operator has no poller.
cdef int np_op_submit(np_op_t *op, unsigned int tasks) noexcept nogil
# Set the poll-set interest to `want` (NP_EV_*; 0 leaves the set). Lock held.
# 0, or errno (the interest is then unchanged).
cdef int np_op_set_interest_locked(np_op_t *op, uint32_t want) noexcept nogil
# The one place an owned fd is closed: leaves the poll set, closes the number
# if it still names the file op owns, marks OF_FD_CLOSED. Lock NOT held.
# Returns 1 if this call closed the fd, 2 if it found the number no longer
# names op's file (the user closed it; it was left alone), 0 if already done.
# `before_close(fd)` may run on the fd first (e.g. drain unread input), or NULL.
cdef int np_op_close_fd(np_op_t *op, void (*before_close)(int fd) noexcept nogil) noexcept nogil
# Poller thread: an expired or re-armed timer. Returns -1 (logged) on ENOMEM.
cdef int np_poller_timer_push(np_poller_t *p, np_timer_t *t) noexcept nogil
# True on any poller thread (it must never wait on another poller).
cdef bint np_on_any_poller() noexcept nogil
# The worker pool's hook (see poller.pyx); one per process.
ctypedef int (*np_tick_fn)(void *arg, int64_t now) noexcept nogil
cdef void np_poller_set_tick(np_tick_fn fn, void *arg) noexcept nogil
# Wake p's thread from poll_wait or a direct read (any thread).
cdef void np_poller_kick(np_poller_t *p) noexcept nogil
# A wake-up was seen by a direct read on the poller thread (np_read_direct).
cdef void np_poller_wake_ack(np_poller_t *p) noexcept nogil

# The helpers below run for every request: inline, so that the modules that
# cimport them do not call through an imported function pointer.

cdef inline bint np_on_poller_thread(np_poller_t *p) noexcept nogil:
    """True on the thread that currently leads p (runs its loop)."""
    return p != NULL and p.thread_set and pthread_equal(p.thread, pthread_self())


# ---- leadership (runner="auto"; called with the GIL held on GIL builds; the
# hand-off itself is decided under the standby pool's lock, see poller.pyx) ----
# The leader gives p to a standby thread before it waits (netpoll's own
# blocking calls) or before a handler known to block. True if a standby was
# found: this thread no longer leads p (np_on_poller_thread is false).
cdef bint np_poller_abdicate(np_poller_t *p) noexcept
# The same for the poller this thread leads, if it is running a runner="auto"
# handler there now: before a wait on a connection of another runner (a
# Dialer's, say) that such a handler makes.
cdef bint np_poller_abdicate_busy() noexcept
# Around an auto handler run on the leader: lets the monitor hand p to a
# standby when the handler runs past the threshold. Returns the start time.
cdef int64_t np_poller_busy_begin(np_poller_t *p) noexcept
cdef void np_poller_busy_end(np_poller_t *p) noexcept
# Around a wait that reads or polls the socket from the leader itself (no
# standby was free): the monitor must not hand p off meanwhile, or two
# threads would read one socket. pause returns what resume restores.
cdef long long np_poller_busy_pause(np_poller_t *p) noexcept
cdef void np_poller_busy_resume(np_poller_t *p, long long since) noexcept


cdef inline void np_op_gil(np_poller_t *p, np_op_t *op, int reason) noexcept nogil:
    """Poller thread: queue op for this batch's GIL phase with a GR_* reason."""
    if op.gil_reasons == 0:
        np_op_incref(op)
        op.next_gil = p.gil_head
        p.gil_head = op
    op.gil_reasons |= reason


cdef inline void np_op_defer(np_poller_t *p, np_op_t *op) noexcept nogil:
    """Poller thread: run op.kind.deferred before the next poll_wait."""
    if op.deferred:
        return
    op.deferred = 1
    np_op_incref(op)
    op.next_defer = p.defer_head
    p.defer_head = op


cdef class Operator:
    """Python owner of an np_op_t; the poller calls back into it."""
    cdef np_op_t *op
    cdef object __weakref__
    # GIL phase of the owning poller (GR_EVENT).
    cdef int _on_poller_event(self) except -1
    # The fd was closed by the poller (GR_TEARDOWN); drop registry references.
    cdef int _on_teardown(self) except -1


cdef class Poller:
    cdef np_poller_t *p
    cdef readonly int index
    cdef dict registry         # id(op) -> Operator, strong references while registered
    cdef object thread
    cdef double _last_log      # monotonic time of the last error logged
    cdef object __weakref__
    cdef int _register(self, Operator op) except -1
    cdef object _done          # threading.Event: the loop ended (stop())
    cdef int _gil_phase(self) except -1
    cdef int _loop(self) except -1
    cdef int _claim(self) except -1
