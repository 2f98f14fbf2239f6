"""netpoll: RPC-style network servers and clients on non-blocking I/O.

CloudWeGo Netpoll's model (an epoll/kqueue poller, zero-copy LinkBuffer,
an EventLoop calling ``on_request(ctx, conn)``, a Dialer) and goev's Reactor,
with the poll loop, socket I/O, buffering and timers in Cython without the GIL.
"""
from netpoll._core.linkbuffer import LinkBuffer
from netpoll.errors import (
    BufferClosedError,
    BufferUnderflowError,
    ConnectionClosedError,
    DialTimeoutError,
    NetpollError,
    PeerClosedError,
    ReadTimeoutError,
    WriteTimeoutError,
)

__version__ = "0.1.0"

__all__ = [
    "LinkBuffer",
    "NetpollError",
    "BufferClosedError",
    "BufferUnderflowError",
    "ConnectionClosedError",
    "PeerClosedError",
    "ReadTimeoutError",
    "WriteTimeoutError",
    "DialTimeoutError",
    "__version__",
]
