# The listener operator (Netpoll's netpoll_server.go): a listening fd on a
# poller; accept4 runs without the GIL, the accepted fds become Connections
# (or Reactor handlers) in the GIL phase.

from netpoll._core.poller cimport Operator, Poller, np_op_t
from netpoll._core.timer cimport np_timer_t

cdef struct np_listener_t:
    np_op_t op                 # the header first
    int *accepted              # fds accepted without the GIL (poller thread only)
    int naccepted
    int accept_errno
    np_timer_t backoff         # pause after EMFILE/ENFILE/ENOBUFS/ENOMEM


cdef class ListenerOperator(Operator):
    cdef np_listener_t *l
    cdef Poller poller
    cdef object server        # has _accept(fd): an EventLoop, or a Reactor acceptor's sink
    cdef readonly bint closed
    cdef readonly object torn_down   # threading.Event: the poller closed the fd
