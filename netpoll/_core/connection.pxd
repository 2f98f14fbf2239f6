# Connection: the Python face of an np_conn_t (Netpoll's connection_impl.go).

from netpoll._core.linkbuffer cimport LinkBuffer
from netpoll._core.poller cimport Operator, Poller, np_conn_t
from netpoll._core.runner cimport WorkerPool


cdef class ConnReader(LinkBuffer):
    cdef Connection conn


cdef class ConnWriter(LinkBuffer):
    cdef Connection conn


cdef class Connection(Operator):
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

    cdef int _close(self, bint user) except -1
    cdef int _peer_gone(self) except -1
    cdef int _call_handler(self) except -1
    cdef int _schedule_from_python(self) except -1
    cdef object _addr(self, bint peer)
    cdef np_conn_t *_live(self) except NULL


cdef Connection new_connection(int fd, Poller poller, WorkerPool pool, object runner,
                               object owner)
cdef int setup_connection(Connection conn, object on_request, object read_timeout,
                          object write_timeout, object idle_timeout,
                          size_t input_limit) except -1
cdef int register_connection(Connection conn) except -1
