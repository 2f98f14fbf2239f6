# goev's Reactor on netpoll's pollers: EvHandler objects whose callbacks run
# on the poller thread that owns them (see reactor.pyx for the guarantees).

from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint32_t, uint64_t
from netpoll._core.poller cimport Operator, Poller, np_op_t
from netpoll._core.timer cimport np_timer_t
from netpoll._core.linkbuffer cimport np_chunk_t, np_lb_t
from netpoll._core.tls cimport np_tls_t


# A handler timer. `t` comes first: the heap holds &t and the expiry hook
# casts it back. Created, fired, re-armed and freed on the poller thread only.
cdef struct np_utimer_t:
    np_timer_t t
    np_utimer_t *next          # fired list (poller thread)
    int64_t interval_ns        # 0: one-shot
    uint64_t tid
    void *handler              # EvHandler (a strong reference); NULL once it closed (orphan)
    int internal               # 1: a Connector's connect timeout (no on_timeout)


# A completion callback of async_write: called once with None when the bytes
# up to `target` (a queued_total) were sent, else with the close's error.
# Linked under the handler's op.lock in the same critical section that
# accepts the data, so a close (which unlinks the whole list under that lock)
# sees every callback of every write it did not refuse.
cdef struct np_wcb_t:
    np_wcb_t *next
    uint64_t target
    PyObject *cb               # strong reference, dropped (GIL) after the call


# EvHandler.fdstate, changed under op.lock.
cdef enum:
    FD_NONE = 0                # no fd owned yet: writes refused (RuntimeError)
    FD_OWNED = 1               # owns op.fd: writes accepted
    FD_DONE = 2                # closing or closed: writes refused (ConnectionClosedError)


# Per-poller control block: an operator without an fd (CTL_KIND) whose
# timers are the handlers' timers and whose task is "requests are queued".
cdef struct rp_ctl_t:
    np_op_t op                 # the header first
    np_utimer_t *fired_head
    np_utimer_t *fired_tail
    int wake_pending           # atomic: a T_CALL is queued


# np_handler_t.hs: where a TLS handshake is (poller thread only).
cdef enum:
    HS_NONE = 0                # none running (plain, not started, or done)
    HS_RUN = 1                 # running: the ready callback steps it without the GIL
    HS_DONE = 2                # finished: the GIL phase calls on_open
    HS_FAILED = 3              # failed: the GIL phase closes (on_connect_fail for a Connector)


# An EvHandler's operator (HANDLER_KIND).
cdef struct np_handler_t:
    np_op_t op                 # the header first
    np_lb_t *outbuf            # output the socket did not take yet
    uint32_t hready            # events seen since the last GIL phase (poller thread only)
    np_tls_t *tls              # TLS session, or NULL (set before the fd is watched; freed with h)
    int hs                     # HS_* (poller thread only)
    uint32_t hs_want           # NP_EV_READ or NP_EV_WRITE while HS_RUN (op.lock)


cdef class _ReactorPoller(Operator):
    cdef readonly Poller poller
    cdef readonly int index
    cdef rp_ctl_t *ctl
    cdef object reactor_ref    # weakref to the Reactor
    cdef object xq             # deque of cross-thread requests, drained on the poller
    cdef dict handlers         # id -> EvHandler bound here (strong refs until closed)
    cdef dict pcache           # poller-local cache (poll_sync / pcached_get)
    cdef np_chunk_t *rchunk    # the shared read buffer (refcounted: views keep it)
    cdef size_t rbuf_size
    cdef bint stopping

    cdef int _post(self, object item) except -1
    cdef bint _is_current(self) noexcept
    cdef int _drain_fired(self, int64_t now) except -1
    cdef int _handle(self, object item) except -1


cdef class EvHandler(Operator):
    cdef np_handler_t *h
    cdef _ReactorPoller rp
    cdef object _reactor
    cdef uint32_t umask        # EV_* the user asked for
    cdef bint registered       # add_ev_handler succeeded
    # A Connector's connect (and TLS handshake), or an Acceptor's TLS
    # handshake, is in progress: no on_open yet.
    cdef bint connecting
    cdef bint accepting        # that handshake is an Acceptor's (a failure closes quietly)
    cdef bint tls_more         # read() stopped with TLS input left (or unreported end)
    cdef bint tls_posted       # a "tls_read" request is queued
    cdef int64_t hs_timeout_ns # TLS handshake limit when no connect timer runs (0: none)
    cdef bint closed
    cdef bint eof_seen         # read() saw EOF or an error: stop asking for EV_IN
    cdef bint flush_posted     # a "flush" request is queued on the poller
    cdef bint above_high
    cdef dict _timers          # tid -> np_utimer_t address (poller thread only)
    cdef set _cancelled        # tids cancelled (any thread), pending the poller
    cdef int fdstate           # FD_* (op.lock)
    cdef np_wcb_t *wcb_head    # async_write callbacks in target order (op.lock)
    cdef np_wcb_t *wcb_tail
    cdef uint64_t queued_total # bytes ever accepted by write/async_write
    cdef uint64_t sent_total   # bytes ever sent
    cdef Py_ssize_t high_wm
    cdef Py_ssize_t low_wm
    cdef int err               # errno of a failed write
    cdef uint64_t connect_tid
    cdef object connect_addr
    cdef object connect_timeout
    cdef public object _pool   # ConnectPool bookkeeping (netpoll.reactor)

    cdef int _bind(self, _ReactorPoller rp) except -1
    cdef int _unbind(self) except -1
    cdef void _adopt(self, int fd) noexcept
    cdef int _watch(self, int fd, bint new_fd) noexcept
    cdef int _call_wcbs(self, np_wcb_t *lst, object err, uint64_t sent) except -1
    cdef int _sync_mask(self) except -1
    cdef int _dispatch(self, uint32_t ev) except -1
    cdef int _flush(self) except -1
    cdef int _check_high(self) except -1
    cdef int _after_progress(self, np_wcb_t *done) except -1
    cdef int _close(self, object err) except -1
    cdef int _callback(self, object cb, str name, bint blocking_ok) except -1
    cdef int _connect_failed(self, object exc) except -1
    cdef int _finish_connect(self, uint32_t ev) except -1
    cdef int _start_handshake(self) except -1
    cdef int _finish_handshake(self) except -1
    cdef int _tls_read_again(self) except -1
    cdef int _post_tls_read(self) except -1
    cdef object _read_tls(self, np_chunk_t *ck, size_t cap)
    cdef object _write_tls(self, const char *p, size_t n)
    cdef object _write_result(self, int st, int e, size_t sent, size_t n)
    cdef uint64_t _add_timer(self, int64_t when, int64_t interval_ns, int internal,
                             uint64_t tid) except 0
    cdef int _timer_fired(self, np_utimer_t *u, int64_t now) except -1
    cdef int _cancel_local(self, uint64_t tid) except -1
    cdef int _drop_timers(self) except -1
