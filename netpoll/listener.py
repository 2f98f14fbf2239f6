"""Listening sockets: ``create_listener(network, address)``."""
from __future__ import annotations

import os
import socket
import stat
from typing import Any, Optional, Tuple, Union

__all__ = ["Listener", "create_listener", "parse_address"]

Address = Union[Tuple[str, int], str]

_FAMILIES = {
    "tcp": socket.AF_UNSPEC,
    "tcp4": socket.AF_INET,
    "tcp6": socket.AF_INET6,
    "unix": socket.AF_UNIX,
}


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
        try:
            port = int(port_s)
        except ValueError:
            raise ValueError(f"invalid port in {address!r}") from None
    else:
        raise TypeError("address must be 'host:port' or a (host, port) tuple")
    if not isinstance(host, str):
        raise TypeError("host must be a str")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"invalid port {port!r}")
    return _FAMILIES[network], (host, port)


class Listener:
    """A bound, listening socket. Hand it to ``EventLoop.serve``.

    ``addr`` is the bound address: (host, port) for TCP (port 0 at creation
    lets the OS pick), the path for Unix sockets."""

    def __init__(self, sock: socket.socket, network: str, unix_path: Optional[str] = None):
        self._sock = sock
        self.network = network
        self._unix_path = unix_path
        addr = sock.getsockname()
        self.addr: Address = unix_path if unix_path is not None else (addr[0], addr[1])

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (and remove a Unix socket file we created). Idempotent."""
        if self._sock.fileno() >= 0:
            self._sock.close()
            if self._unix_path is not None:
                try:
                    if stat.S_ISSOCK(os.lstat(self._unix_path).st_mode):
                        os.unlink(self._unix_path)
                except OSError:
                    pass

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


def create_listener(network: str, address: Any, *, backlog: int = 1024,
                    reuse_port: bool = False, mode: int = 0o600) -> Listener:
    """Bind and listen on `address`.

    network: "tcp" (IPv4 or IPv6 per the host), "tcp4", "tcp6" or "unix".
    For "unix" a stale socket file at the path is removed first (never
    following a symlink; any other kind of file is an error) and the new
    socket file gets permissions `mode` (default 0o600: owner only).
    """
    family, addr = parse_address(network, address)
    if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 0:
        raise ValueError("backlog must be an int >= 0")
    if family == socket.AF_UNIX:
        path = addr
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
        return Listener(sock, network, path)
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
        return Listener(sock, network)
    raise last if last is not None else OSError(f"cannot listen on {address!r}")
