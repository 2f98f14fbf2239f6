"""The checks of the ``ssl=`` arguments, shared by every entry point
(create_listener, serve, Acceptor: the server side; Dialer, Connector: the
client side)."""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Optional

from netpoll import _validate
from netpoll._core.tls import check_context

if TYPE_CHECKING:
    import ssl as _ssl

# What a TLS client gets to finish its handshake (DESIGN.md: at most 10 s).
DEFAULT_SSL_HANDSHAKE_TIMEOUT = 10.0


def server_handshake_timeout(ssl: Optional["_ssl.SSLContext"],
                             ssl_handshake_timeout: Any) -> Optional[float]:
    """Check a server context and its handshake timeout (> 0, default 10 s,
    ``float("inf")``: None, no limit); None without ssl."""
    if ssl is None:
        if ssl_handshake_timeout is not None:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        return None
    check_context(ssl, True)
    if ssl_handshake_timeout is None:
        ssl_handshake_timeout = DEFAULT_SSL_HANDSHAKE_TIMEOUT
    return _validate.seconds(ssl_handshake_timeout, "ssl_handshake_timeout", zero_ok=False)


def client_hostname(ssl: Optional["_ssl.SSLContext"], server_hostname: Any, family: int,
                    addr: Any) -> Optional[str]:
    """Check a client context and pick the name for SNI and certificate
    matching: `server_hostname`, else the host of a TCP address; "" means
    none (then ``ssl.check_hostname`` must be off)."""
    if ssl is None:
        if server_hostname is not None:
            raise ValueError("server_hostname is only meaningful with ssl")
        return None
    check_context(ssl, False)
    if server_hostname is not None and not isinstance(server_hostname, str):
        raise TypeError("server_hostname must be a str")
    hostname = server_hostname
    if hostname is None and family != socket.AF_UNIX:
        hostname = addr[0] or "localhost"
    hostname = hostname or None
    if hostname is None and ssl.check_hostname:
        raise ValueError("ssl.check_hostname needs a server_hostname")
    return hostname
