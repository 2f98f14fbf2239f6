# The poller: one thread, one epoll (kqueue) set, one wake-up fd, one timer
# heap, and the fd operators (connections and listeners) it owns.
#
# All socket I/O of a registered connection happens here without the GIL:
# reads into the input LinkBuffer, sends from the output LinkBuffer, accepts.
# The GIL is taken once per batch of ready events to run what needs Python
# (inline handlers, new connections, closes). Pool handlers are queued
# without the GIL at all.

from libc.stdint cimport int64_t, uint32_t, uint64_t
from netpoll._core.includes.system cimport (pthread_mutex_t, pthread_cond_t,
                                            pthread_t, np_event_t)
from netpoll._core.linkbuffer cimport np_lb_t
from netpoll._core.timer cimport np_timer_t, np_timer_heap_t
from netpoll._core.runner cimport np_taskq_t

cdef enum:
    OP_CONN = 1
    OP_LISTENER = 2
    OP_WAKEUP = 3
    OP_HANDLER = 4    # a Reactor EvHandler (or a reactor poller's control op): see reactor.pyx

# Connection flags (np_conn_t.flags, changed under np_conn_t.lock).
cdef enum:
    CF_REGISTERED = 1 << 0    # in the poll set
    CF_CLOSING = 1 << 1       # close started (by us or by the library)
    CF_USER_CLOSED = 1 << 2   # close() called: reads raise ConnectionClosedError at once
    CF_PEER_EOF = 1 << 3      # peer's FIN seen
    CF_ERROR = 1 << 4         # socket error (reset...); conn.err has errno
    CF_RUNNING = 1 << 5       # a process() task is queued or running
    CF_SENDING = 1 << 6       # a thread is inside sendmsg for this connection
    CF_WANT_WRITE = 1 << 7    # EPOLLOUT armed: the poller owns sending
    CF_PAUSED = 1 << 8        # pause_read()
    CF_LIMITED = 1 << 9       # input limit reached
    CF_FD_CLOSED = 1 << 10    # the fd is closed; never touch it again
    CF_SHUT_WR = 1 << 11      # we sent our FIN
    CF_TEARDOWN = 1 << 12     # the poller has been asked to close the fd
    CF_IDLE_FIRED = 1 << 13   # idle timeout expired: process() closes
    CF_HAS_HANDLER = 1 << 14  # on_request is set: dispatch on data
    CF_CONNECTING = 1 << 15   # on_connect still to run (first process())
    CF_TEARDOWN_WAIT = 1 << 16  # teardown waits for a sender to finish
    CF_SHUT_WR_PENDING = 1 << 17  # shutdown_write() once output is drained
    CF_DRAIN_ARMED = 1 << 18  # drain_timer is scheduled (poller thread only)

# Why an operator is in the GIL list (np_conn_t.gil_reasons, poller thread only).
cdef enum:
    GR_PROCESS = 1
    GR_TEARDOWN = 2
    GR_ACCEPT = 4
    GR_HANDLER = 8    # OP_HANDLER: ready events in hready, or a reactor hook fired

# How a connection's process() is run.
cdef enum:
    RUN_POOL = 0      # queued to the WorkerPool without the GIL
    RUN_INLINE = 1    # called on the poller thread in the GIL phase
    RUN_CUSTOM = 2    # handed to a user callable in the GIL phase

# Timer kinds.
cdef enum:
    TM_IDLE = 1
    TM_DRAIN = 2
    TM_BACKOFF = 3
    TM_USER = 4

# Cross-thread tasks.
cdef enum:
    TASK_REGISTER = 1
    TASK_TEARDOWN = 2
    TASK_ARM_IDLE = 3
    TASK_RESUME = 4
    TASK_PROCESS = 5  # schedule process() (RUNNING already set by the submitter)
    TASK_CALL = 6     # arg is an np_hook_t: call its fn on the poller thread (t = NULL)

cdef struct np_task_t:
    int kind
    void *op
    void *arg

cdef struct np_poller_t

# Extension hook for the Reactor (reactor.pyx), so that the poller needs no
# knowledge of it: a TM_USER timer's `data` and a TASK_CALL task's `arg`
# point to an np_hook_t (as the first member of the owner's struct); the
# poller calls fn on its own thread without the GIL (t: the expired timer,
# or NULL for a task).
cdef struct np_hook_t
ctypedef void (*np_hook_fn)(np_poller_t *p, np_hook_t *h, np_timer_t *t,
                            int64_t now) noexcept nogil
cdef struct np_hook_t:
    np_hook_fn fn

cdef struct np_conn_t:
    int kind                   # OP_CONN / OP_LISTENER / OP_WAKEUP
    int fd
    int refcnt                 # atomic: owner object + queued tasks
    unsigned int flags
    uint32_t events            # mask currently in the poll set
    int err
    int run_mode               # RUN_POOL / RUN_INLINE / RUN_CUSTOM
    int waiters                # threads waiting on cond
    pthread_mutex_t lock
    pthread_cond_t cond        # readers waiting for bytes, flushers for drain
    np_lb_t *inbuf
    np_lb_t *outbuf
    np_poller_t *poller
    np_taskq_t *pool           # RUN_POOL target
    size_t want                # bytes a blocked reader waits for
    size_t rx_chunk            # adaptive size of new input chunks (poller thread only)
    size_t rx_last             # bytes of the last burst read (poller thread only)
    size_t input_limit         # 0: none
    uint64_t rx_seq            # bumps on every commit of new input
    int64_t read_timeout_ns    # < 0: none
    int64_t write_timeout_ns
    int64_t idle_timeout_ns
    int64_t last_active_ns
    np_timer_t idle_timer
    np_timer_t drain_timer
    void *pyobj                # borrowed Python owner (Connection / Listener); NULL after its death
    # poller-thread-only fields
    np_conn_t *next_gil        # intrusive list: GIL phase of the current batch
    np_conn_t *next_flush      # intrusive list: sends at the start of the next iteration
    int gil_reasons            # GR_* bits
    int in_flush
    # listeners: fds accepted without the GIL, handed to Python in the GIL phase
    int *accepted
    int naccepted
    int accept_errno
    # OP_HANDLER: events seen since the last GIL phase (poller thread only)
    uint32_t hready

cdef struct np_poller_t:
    int pfd
    int wake_r
    int wake_w
    int index
    int stop                   # atomic
    int in_wait                # atomic: blocked in poll_wait (a wake-up is needed)
    int wake_pending           # atomic: a wake-up byte is in flight
    pthread_t thread
    int thread_set
    pthread_mutex_t qlock
    np_task_t *tasks
    size_t ntasks
    size_t taskcap
    np_timer_heap_t timers
    np_conn_t wake_op
    np_event_t *evs
    int ev_n                   # events of the last poll_wait ...
    int ev_i                   # ... and the next one to handle (a batch may be cut in slices)
    int ev_held                # events from ev_i on hold a reference on their operator
    np_conn_t *gil_head        # built without the GIL, consumed with it
    np_conn_t *flush_head
    uint64_t loops             # statistics
    uint64_t events
    uint64_t gil_batches
    uint64_t slices            # batches cut by slice_bytes

# ---- C API used by connection/eventloop (all without the GIL) ----
cdef np_conn_t *np_conn_new(int fd, int kind) noexcept nogil
cdef void np_conn_incref(np_conn_t *c) noexcept nogil
cdef void np_conn_decref(np_conn_t *c) noexcept nogil
cdef int np_poller_submit(np_poller_t *p, int kind, void *op, void *arg) noexcept nogil
cdef bint np_on_poller_thread(np_poller_t *p) noexcept nogil
cdef void np_update_mask_locked(np_conn_t *c) noexcept nogil
cdef void np_relieve_limit_locked(np_conn_t *c) noexcept nogil
# sendmsg the output buffer until empty (0), EAGAIN (1) or error (-errno); the
# caller owns sending (lock held, or CF_SENDING). *sent += bytes sent (or NULL).
cdef int np_send_output(np_conn_t *c, uint64_t *sent) noexcept nogil
cdef int np_send_locked(np_conn_t *c) noexcept nogil
cdef int np_read_direct(np_conn_t *c, int64_t deadline) noexcept nogil
cdef void np_flush_async(np_conn_t *c) noexcept nogil
cdef void np_poller_kick(np_poller_t *p) noexcept nogil
cdef void np_schedule_process(np_conn_t *c) noexcept nogil   # RUNNING set by the caller
cdef void np_pool_item(void *item) noexcept
# Queue c for this batch's GIL phase with a GR_* reason (poller thread only).
cdef void np_gil_list_add(np_poller_t *p, np_conn_t *c, int reason) noexcept nogil


cdef class Operator:
    """Python owner of an np_conn_t; the poller calls back into it."""
    cdef np_conn_t *op
    cdef object __weakref__
    # GIL phase of the owning poller: the op was queued with CF_IN_GILLIST.
    cdef int _on_poller_event(self) except -1
    # Runs process() per the run mode; from the pool or the GIL phase.
    cdef int _process(self) except -1
    # The fd was closed by the poller; drop registry references.
    cdef int _on_teardown(self) except -1


cdef class Poller:
    cdef np_poller_t *p
    cdef readonly int index
    cdef dict registry         # id(op) -> Operator, strong references while registered
    cdef object thread
    cdef object __weakref__
    cdef int _register(self, Operator op) except -1
    cdef int _gil_phase(self) except -1
