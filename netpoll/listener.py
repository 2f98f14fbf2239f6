"""Listening sockets: ``create_listener(network, address)``."""
from __future__ import annotations

import os
import re
import socket
import stat
import sys
from typing import TYPE_CHECKING, Any, Optional, Tuple, Union

from netpoll import _validate
from netpoll._tlsargs import server_handshake_timeout

if TYPE_CHECKING:
    import ssl as _ssl

__all__ = ["Listener", "create_listener", "parse_address"]

Address = Union[Tuple[str, int], str]

# listen(2) takes a C int (the kernel then caps it at net.core.somaxconn).
_MAX_BACKLOG = 2 ** 31 - 1
# A port written in an address string: plain ASCII decimal digits, nothing
# int() would also forgive (" 80", "+80", "8_0", "٨٠").
_PORT_DIGITS = re.compile(r"[0-9]{1,5}")

_FAMILIES = {
    "tcp": socket.AF_UNSPEC,
    "tcp4": socket.AF_INET,
    "tcp6": socket.AF_INET6,
    "unix": socket.AF_UNIX,
}


# sockaddr_un.sun_path holds 108 bytes on Linux and 104 on macOS/BSD, with
# the terminating NUL.
_MAX_UNIX_PATH = 107 if sys.platform.startswith("linux") else 103


def parse_address(network: str, address: Any) -> Tuple[int, Any]:
    """Split a Go-style address ("host:port", "[v6]:port", ":port", a Unix
    path) or a (host, port) tuple into (family, host_or_path, port)."""
    if not isinstance(network, str):
        raise TypeError("network must be a str")
    if network not in _FAMILIES:
        raise ValueError(f"unsupported network {network!r}: use tcp, tcp4, tcp6 or unix")
    if network == "unix":
        if isinstance(address, bytes):
            address = os.fsdecode(address)
        if not isinstance(address, (str, os.PathLike)):
            raise TypeError("a unix address is a filesystem path")
        path = os.fspath(address)
        if not path or "\0" in path:
            raise ValueError(f"invalid unix socket path {path!r}")
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise ValueError(f"unix socket path too long: {len(os.fsencode(path))} bytes, "
                             f"at most {_MAX_UNIX_PATH} (sun_path)")
        return socket.AF_UNIX, path
    if isinstance(address, tuple):
        if len(address) < 2:
            raise ValueError("address tuple must be (host, port)")
        host, port = address[0], address[1]
    elif isinstance(address, str):
        host, sep, port_s = address.rpartition(":")
        if not sep:
            raise ValueError(f"address {address!r} lacks a port (host:port)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not _PORT_DIGITS.fullmatch(port_s):
            raise ValueError(f"invalid port in {address!r}: decimal digits 0..65535 expected")
        port = int(port_s)
    else:
        raise TypeError("address must be 'host:port' or a (host, port) tuple")
    if not isinstance(host, str):
        raise TypeError("host must be a str")
    port = _validate.size(port, "port", maximum=65535)
    return _FAMILIES[network], (host, port)


class Listener:
    """A bound, listening socket. Hand it to ``EventLoop.serve``.

    ``addr`` is the bound address: (host, port) for TCP (port 0 at creation
    lets the OS pick), the path for Unix sockets. ``ssl`` is the server
    ``ssl.SSLContext`` its connections handshake with, or None."""

    def __init__(self, sock: socket.socket, network: str, unix_path: Optional[str] = None,
                 *, ssl: Optional["_ssl.SSLContext"] = None,
                 ssl_handshake_timeout: Optional[float] = None):
        self._sock = sock
        self.network = network
        self._unix_path = unix_path
        self.ssl = ssl
        self.ssl_handshake_timeout = ssl_handshake_timeout
        addr = sock.getsockname()
        if unix_path is not None:
            self.addr: Address = unix_path
        elif isinstance(addr, (str, bytes)):        # a Unix socket handed in as is
            self.addr = os.fsdecode(addr)
        else:
            self.addr = (addr[0], addr[1])

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (and remove a Unix socket file we created). Idempotent."""
        if self._sock.fileno() >= 0:
            self._sock.close()
            if self._unix_path is not None:
                _unlink_unix_socket(self._unix_path)

    def _stop_listening(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass          # not supported for this family: closing will do

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Listener {self.network} {self.addr!r}{' closed' if self.closed else ''}>"


def _bind_unix(path: str, backlog: int, mode: int = 0o600, rcvbuf: int = 0) -> socket.socket:
    """A listening, non-blocking Unix stream socket bound to `path`: the one
    Unix binder of the library (create_listener and the Reactor's Acceptor).

    A stale socket file at `path` is removed first, never following a
    symlink; any other kind of file there is an error (FileExistsError). The
    socket file is created with permissions `mode` (the umask is narrowed
    around bind() so it is never more open than that, then chmod sets it
    exactly). `rcvbuf` > 0 sets SO_RCVBUF. Arguments are checked by the
    callers."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path!r} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _unlink_unix_socket(path: str) -> None:
    """Remove the socket file of a closed Unix listener, if a socket is still
    there (never a symlink or another kind of file); errors are ignored."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def create_listener(network: str, address: Any, *, backlog: int = 1024,
                    reuse_port: bool = False, mode: int = 0o600,
                    ssl: Optional["_ssl.SSLContext"] = None,
                    ssl_handshake_timeout: Optional[float] = None) -> Listener:
    """Bind and listen on `address`.

    network: "tcp" (IPv4 or IPv6 per the host), "tcp4", "tcp6" or "unix".
    For "unix" a stale socket file at the path is removed first (never
    following a symlink; any other kind of file is an error) and the new
    socket file gets permissions `mode` (default 0o600: owner only).
    A port in an address string is plain decimal digits; backlog is an int
    in 0..2**31-1, mode in 0..0o777 (else TypeError or ValueError).

    ssl: a server ``ssl.SSLContext``: every accepted connection completes a
    TLS handshake before ``on_connect``, within `ssl_handshake_timeout`
    seconds (> 0; default 10; ``float("inf")``: no limit); one that fails
    or times out is closed without calling a handler. Contexts with
    ``sni_callback`` or ``keylog_filename`` are refused (ValueError).
    """
    family, addr = parse_address(network, address)
    backlog = _validate.size(backlog, "backlog", maximum=_MAX_BACKLOG)
    mode = _validate.size(mode, "mode", maximum=0o777)
    ssl_handshake_timeout = server_handshake_timeout(ssl, ssl_handshake_timeout)
    if family == socket.AF_UNIX:
        return Listener(_bind_unix(addr, backlog, mode), network, addr, ssl=ssl,
                        ssl_handshake_timeout=ssl_handshake_timeout)
    host, port = addr
    infos = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0,
                               socket.AI_PASSIVE)
    last: Optional[OSError] = None
    for fam, stype, proto, _, sockaddr in infos:
        sock = socket.socket(fam, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if fam == socket.AF_INET6 and network == "tcp6":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            last = e
            continue
        return Listener(sock, network, ssl=ssl, ssl_handshake_timeout=ssl_handshake_timeout)
    raise last if last is not None else OSError(f"cannot listen on {address!r}")
