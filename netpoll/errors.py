"""The exceptions netpoll raises.

Every error is a :class:`NetpollError`; each also subclasses the built-in
exception a user would catch without knowing netpoll (``ConnectionError``,
``EOFError``, ``TimeoutError``), so generic code keeps working.
"""
from __future__ import annotations

import ssl

__all__ = [
    "NetpollError",
    "ConnectionClosedError",
    "PeerClosedError",
    "ReadTimeoutError",
    "WriteTimeoutError",
    "DialTimeoutError",
    "BufferUnderflowError",
    "BufferClosedError",
    "TLSError",
]


class NetpollError(Exception):
    """Base class of every error raised by netpoll."""


class BufferUnderflowError(NetpollError, IndexError):
    """A read asked a LinkBuffer for more bytes than it holds; nothing was consumed."""


class BufferClosedError(NetpollError):
    """The LinkBuffer was closed; only ``close()`` may be called on it now."""


class ConnectionClosedError(NetpollError, ConnectionError):
    """The connection was closed (by us, or by the library after the peer left)."""


class PeerClosedError(ConnectionClosedError, EOFError):
    """The peer closed its side before the bytes a read asked for arrived."""


class ReadTimeoutError(NetpollError, TimeoutError):
    """A blocking read waited longer than the connection's read timeout."""


class WriteTimeoutError(NetpollError, TimeoutError):
    """A flush waited longer than the connection's write timeout."""


class DialTimeoutError(NetpollError, TimeoutError):
    """A dial did not complete within its timeout."""


class TLSError(NetpollError, ssl.SSLError):
    """A TLS handshake or record failed (a certificate that does not verify
    raises ``ssl.SSLCertVerificationError`` instead, as the ssl module does)."""
