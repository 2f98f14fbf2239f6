"""netpoll: RPC-style network servers and clients on non-blocking I/O.

CloudWeGo Netpoll's model (an epoll/kqueue poller, zero-copy LinkBuffer,
an EventLoop calling ``on_request(ctx, conn)``, a Dialer) with the poll
loop, socket I/O, buffering and timers in Cython without the GIL.
"""
from netpoll._core.connection import Connection, ConnReader, ConnWriter
from netpoll._core.linkbuffer import LinkBuffer
from netpoll.config import LoadBalance, configure, set_load_balance, set_num_loops, stats
from netpoll.dialer import Dialer, dial_connection
from netpoll.errors import (
    BufferClosedError,
    BufferUnderflowError,
    ConnectionClosedError,
    DialTimeoutError,
    NetpollError,
    PeerClosedError,
    ReadTimeoutError,
    TLSError,
    WriteTimeoutError,
)
from netpoll.eventloop import EventLoop
from netpoll.listener import Listener, create_listener
from netpoll.prefork import serve
from netpoll.reactor import (
    EV_ET,
    EV_IN,
    EV_IN_ET,
    EV_OUT,
    EV_OUT_ET,
    Acceptor,
    ConnectPool,
    Connector,
    EvHandler,
    Reactor,
)

__version__ = "0.1.0"

__all__ = [
    "LinkBuffer",
    "Connection",
    "ConnReader",
    "ConnWriter",
    "EventLoop",
    "Listener",
    "create_listener",
    "serve",
    "Dialer",
    "dial_connection",
    "LoadBalance",
    "configure",
    "set_num_loops",
    "set_load_balance",
    "stats",
    "NetpollError",
    "BufferClosedError",
    "BufferUnderflowError",
    "ConnectionClosedError",
    "PeerClosedError",
    "ReadTimeoutError",
    "WriteTimeoutError",
    "DialTimeoutError",
    "TLSError",
    "Reactor",
    "EvHandler",
    "Acceptor",
    "Connector",
    "ConnectPool",
    "EV_IN",
    "EV_OUT",
    "EV_ET",
    "EV_IN_ET",
    "EV_OUT_ET",
    "__version__",
]
