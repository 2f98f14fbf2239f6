# Accepting (Netpoll's netpoll_server.go): a listener fd on a poller; accept4
# runs without the GIL, the accepted fds become Connections in the GIL phase.

from netpoll._core.poller cimport Operator, Poller


cdef class Acceptor(Operator):
    cdef Poller poller
    cdef object server        # netpoll.EventLoop: callbacks, config, bookkeeping
    cdef readonly bint closed
    cdef readonly object torn_down   # threading.Event: the poller closed the fd
