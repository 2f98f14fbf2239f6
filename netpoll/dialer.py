"""Clients: ``dial_connection`` and ``Dialer``."""
from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from netpoll import _validate
from netpoll._core.connection import DEFAULT_OUTPUT_LIMIT, Connection, wrap_socket_fd
from netpoll._core.tls import client_handshake
from netpoll._tlsargs import client_hostname
from netpoll.config import _check_runner, runtime
from netpoll.errors import DialTimeoutError

if TYPE_CHECKING:
    import ssl as _ssl
from netpoll.listener import parse_address

__all__ = ["Dialer", "dial_connection"]


class Dialer:
    """Makes client connections served by the shared pollers.

    runner: how an ``on_request`` set later with ``conn.set_on_request`` is run
    ("auto" by default, "pool", "inline", or a callable). Timeouts in seconds apply
    to every connection it makes (None or ``float("inf")``: no limit);
    output_limit as for EventLoop."""

    def __init__(self, *, runner: Any = None, read_timeout: Optional[float] = None,
                 write_timeout: Optional[float] = None,
                 idle_timeout: Optional[float] = None,
                 output_limit: Optional[int] = DEFAULT_OUTPUT_LIMIT) -> None:
        self.runner = _check_runner(runner) if runner is not None else None
        self.read_timeout = _validate.seconds(read_timeout, "read_timeout")
        self.write_timeout = _validate.seconds(write_timeout, "write_timeout")
        self.idle_timeout = _validate.seconds(idle_timeout, "idle_timeout")
        self.output_limit = _validate.size(output_limit, "output_limit", none_ok=True)

    def dial_connection(self, network: str, address: Any,
                        timeout: Optional[float] = None,
                        on_request: Optional[Callable[[Any, Connection], None]] = None,
                        *, ssl: Optional["_ssl.SSLContext"] = None,
                        server_hostname: Optional[str] = None) -> Connection:
        """Connect to `address` within `timeout` seconds (None or
        ``float("inf")``: the OS limit).

        Raises DialTimeoutError when the time runs out, ConnectionRefusedError
        (a ConnectionError) when nobody listens, FileNotFoundError for a
        missing Unix socket path.

        ssl: a client ``ssl.SSLContext``: the TLS handshake completes within
        `timeout` too. `server_hostname` (SNI and the name the certificate
        must match when ``ssl.check_hostname``) defaults to the host of a
        TCP address; "" sends none. A certificate that does not verify raises
        ``ssl.SSLCertVerificationError``, another handshake failure
        ``netpoll.TLSError``."""
        timeout = _validate.seconds(timeout, "timeout")
        family, addr = parse_address(network, address)
        hostname = client_hostname(ssl, server_hostname, family, addr)
        deadline = None if timeout is None else time.monotonic() + timeout
        if family == socket.AF_UNIX:
            targets = [(socket.AF_UNIX, socket.SOCK_STREAM, 0, addr)]
        else:
            host, port = addr
            try:
                infos = socket.getaddrinfo(host or "localhost", port, family, socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise ConnectionError(f"cannot resolve {host!r}: {e}") from e
            targets = [(fam, st, proto, sa) for fam, st, proto, _, sa in infos]
        last: Optional[BaseException] = None
        for fam, st, proto, sa in targets:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            sock = socket.socket(fam, st, proto)
            try:
                sock.settimeout(left)
                self._connect(sock, sa, deadline)
            except socket.timeout:
                sock.close()
                last = DialTimeoutError(f"dial {network} {address!r}: timed out after {timeout} s")
                continue
            except OSError as e:
                sock.close()
                last = e
                continue
            sock.setblocking(False)
            session = None
            if ssl is not None:
                # The handshake runs here, without the GIL, before the fd
                # becomes a connection: a failure closes a plain socket.
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    session = client_handshake(ssl, sock.fileno(), hostname, left)
                except TimeoutError:
                    sock.close()
                    raise DialTimeoutError(f"dial {network} {address!r}: TLS handshake "
                                           f"timed out after {timeout} s") from None
                except BaseException:
                    sock.close()
                    raise
            fd = sock.detach()
            rt = runtime()
            poller = rt.pick()
            runner = self.runner if self.runner is not None else rt.runner
            pool = rt.get_pool() if runner == "pool" else None
            return wrap_socket_fd(fd, poller, pool, runner, None, on_request,
                                  self.read_timeout, self.write_timeout, self.idle_timeout,
                                  self.output_limit, session)
        if last is None:
            last = DialTimeoutError(f"dial {network} {address!r}: timed out after {timeout} s")
        raise last

    @staticmethod
    def _connect(sock: socket.socket, sa: Any, deadline: Optional[float]) -> None:
        # A Unix connect to a full backlog fails with EAGAIN instead of
        # waiting; retry until the deadline so the timeout is honoured.
        delay = 0.0005
        while True:
            try:
                sock.connect(sa)
                return
            except BlockingIOError:
                if sock.family != socket.AF_UNIX:
                    raise
                pause = delay
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout("timed out") from None
                    pause = min(pause, left)
                time.sleep(pause)
                delay = min(delay * 2, 0.05)

    def __repr__(self) -> str:
        return f"<Dialer runner={self.runner!r}>"


def dial_connection(network: str, address: Any, timeout: Optional[float] = None, *,
                    ssl: Optional["_ssl.SSLContext"] = None,
                    server_hostname: Optional[str] = None) -> Connection:
    """``Dialer().dial_connection(network, address, timeout, ssl=...,
    server_hostname=...)``."""
    return Dialer().dial_connection(network, address, timeout, ssl=ssl,
                                    server_hostname=server_hostname)
