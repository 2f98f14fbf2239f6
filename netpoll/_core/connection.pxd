# Connection: the connection operator (Netpoll's connection_impl.go). Its C
# half (reads, sends, teardown, timers, scheduling) runs on the poller
# without the GIL; its Python half is Connection and its reader and writer.

from libc.stdint cimport int64_t, uint64_t
from netpoll._core.includes.system cimport pthread_cond_t
from netpoll._core.linkbuffer cimport LinkBuffer, np_lb_t
from netpoll._core.poller cimport Operator, Poller, np_op_t
from netpoll._core.timer cimport np_timer_t
from netpoll._core.runner cimport WorkerPool, np_taskq_t
from netpoll._core.tls cimport np_tls_t

# Connection flags (np_op_t.flags below OF_KIND_MAX, under np_op_t.lock).
cdef enum:
    CF_CLOSING = 1 << 0       # close started (by us or by the library)
    CF_USER_CLOSED = 1 << 1   # close() called: reads raise ConnectionClosedError at once
    CF_PEER_EOF = 1 << 2      # peer's FIN seen
    CF_ERROR = 1 << 3         # socket error (reset...) or ENOMEM; conn.err has errno
    CF_RUNNING = 1 << 4       # a process() task is queued or running
    CF_SENDING = 1 << 5       # a thread is inside a send for this connection
    CF_WANT_WRITE = 1 << 6    # EPOLLOUT armed: the poller owns sending
    CF_PAUSED = 1 << 7        # pause_read()
    CF_LIMITED = 1 << 8       # input limit reached
    CF_SHUT_WR = 1 << 9       # we sent our FIN
    CF_TEARDOWN = 1 << 10     # the poller has been asked to close the fd
    CF_IDLE_FIRED = 1 << 11   # idle timeout expired: process() closes
    CF_HAS_HANDLER = 1 << 12  # on_request is set: dispatch on data
    CF_TEARDOWN_WAIT = 1 << 13  # teardown waits for a sender to finish
    CF_SHUT_WR_PENDING = 1 << 14  # shutdown_write() once output is drained
    CF_DRAIN_ARMED = 1 << 15  # drain_timer is scheduled (poller thread only)
    # (1 << 16 is connection.pyx's CF_DISOWNED)
    CF_HANDSHAKE = 1 << 17    # TLS handshake in progress: no reads, sends or handlers yet
    CF_NEED_CONNECT = 1 << 18  # TLS server side: on_connect runs when the handshake ends

# How a connection's process() is run.
cdef enum:
    RUN_POOL = 0      # queued to the WorkerPool without the GIL
    RUN_INLINE = 1    # called on the poller thread in the GIL phase
    RUN_CUSTOM = 2    # handed to a user callable in the GIL phase
    RUN_AUTO = 3      # inline on the poller's leader; polling moves when it blocks

cdef struct np_conn_t:
    np_op_t op                 # the header first: an np_conn_t * is an np_op_t *
    int err                    # errno of CF_ERROR
    int run_mode               # RUN_*
    int waiters                # threads waiting on cond
    # Pool tasks queued or running, and "the teardown reached Python" (both
    # seq_cst atomics): the registry keeps the Python owner until both say
    # no pool worker can still read op.pyobj (Connection._forget_if_done).
    int pool_pending
    int torn_down
    np_lb_t *inbuf
    np_lb_t *outbuf
    np_taskq_t *pool           # RUN_POOL target
    size_t want                # bytes a blocked reader waits for
    size_t rx_chunk            # adaptive size of new input chunks (poller thread only)
    size_t rx_last             # bytes of the last burst read (poller thread only)
    size_t input_limit         # 0: none
    size_t output_limit        # SIZE_MAX: none (see ConnWriter._after_flush)
    uint64_t rx_seq            # bumps on every commit of new input
    int64_t read_timeout_ns    # < 0: none
    int64_t write_timeout_ns
    int64_t idle_timeout_ns
    int64_t last_active_ns
    np_timer_t idle_timer
    np_timer_t drain_timer     # output still to send at close, or after an inline flush
    np_tls_t *tls              # TLS session, or NULL (set before registration, freed with c)
    int64_t hs_timeout_ns      # TLS handshake limit (server side), < 0: none
    np_timer_t hs_timer
    pthread_cond_t cond        # readers waiting for bytes, flushers for drain (cold: last)


cdef class ConnReader(LinkBuffer):
    cdef Connection conn
    cdef int _need_by(self, size_t n, int64_t deadline) except -1


cdef class ConnWriter(LinkBuffer):
    cdef Connection conn
    cdef int _flush_result(self, int rc) except -1


cdef class Connection(Operator):
    cdef np_conn_t *c
    cdef readonly ConnReader reader
    cdef readonly ConnWriter writer
    cdef object _ctx
    cdef object _on_request
    cdef object _on_connect
    cdef object _on_disconnect
    cdef object _runner             # RUN_CUSTOM: callable(task)
    cdef object _owner              # EventLoop or None; told when the connection closes
    cdef list _close_callbacks
    cdef Poller _poller
    cdef WorkerPool _pool
    cdef object _local_addr
    cdef object _remote_addr
    cdef bint _connected            # on_connect ran (or there is none)
    cdef bint _disconnected
    cdef bint _close_when_idle      # graceful shutdown: close once the handler returns
    cdef int _long_runs             # RUN_AUTO: consecutive runs that blocked (or ran long)

    cdef int _process(self) except -1
    cdef int _run_auto(self) except -1
    cdef int _close(self, bint user) except -1
    cdef int _peer_gone(self) except -1
    cdef int _call_handler(self) except -1
    cdef int _forget_if_done(self) except -1
    cdef int _schedule_from_python(self) except -1
    cdef object _addr(self, bint peer)
    cdef object _cached_addr(self, bint peer)
    cdef np_conn_t *_live(self) except NULL


cdef Connection new_connection(int fd, Poller poller, WorkerPool pool, object runner,
                               object owner)
cdef int setup_connection(Connection conn, object on_request, object read_timeout,
                          object write_timeout, object idle_timeout,
                          object input_limit, object output_limit) except -1
cdef int start_server_tls(Connection conn, object sslctx, object handshake_timeout) except -1
cdef int register_connection(Connection conn) except -1
cdef void np_conn_schedule(np_conn_t *c) noexcept nogil   # RUNNING set by the caller
