"""goev's Reactor model: the thin Python pieces around ``netpoll._core.reactor``.

``Reactor``, ``EvHandler`` and the event masks live in Cython (the per-event
work); this module holds what runs once per connection or per listener:
``Acceptor`` (listening sockets, one per poller with ``reuse_port``),
``Connector`` (non-blocking connect with a timeout) and ``ConnectPool``.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Set, Tuple

from netpoll import _validate
from netpoll._core.reactor import (  # noqa: F401  (re-exported)
    EV_ET,
    EV_IN,
    EV_IN_ET,
    EV_OUT,
    EV_OUT_ET,
    EvHandler,
    Reactor,
    conn_error,
)
from netpoll._core.server import ListenerOperator
from netpoll._tlsargs import client_hostname, server_handshake_timeout
from netpoll.listener import (
    _bind_unix,
    _unlink_unix_socket,
    parse_address,
)

if TYPE_CHECKING:
    import ssl as _ssl

__all__ = [
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
]

log = logging.getLogger("netpoll")

# setsockopt(2) and listen(2) take a C int.
_INT_MAX = 2 ** 31 - 1
# Bounds of a ConnectPool: more handlers than a process has descriptors is absurd.
_MAX_POOL = 1 << 20


def _split(address: Any) -> Tuple[int, Any]:
    """("unix", path) for "unix:/path", else (AF_UNSPEC, (host, port)) for
    "host:port", "[v6]:port", ":port" or a (host, port) tuple (parsed as
    create_listener parses a "tcp" address)."""
    if isinstance(address, str) and address.startswith("unix:"):
        return parse_address("unix", address[5:])
    return parse_address("tcp", address)


def _check_reactor(reactor: Any) -> None:
    if not isinstance(reactor, Reactor):
        raise TypeError(f"reactor must be a netpoll.Reactor, not {type(reactor).__name__}")


class _Sink:
    """What the internal listener operator calls for every accepted fd (on
    the poller thread that accepted it)."""

    __slots__ = ("acceptor", "index")

    def __init__(self, acceptor: "Acceptor", index: int):
        self.acceptor = acceptor
        self.index = index

    def _accept(self, fd: int) -> None:
        self.acceptor._accepted(fd, self.index)


class Acceptor:
    """Listen on `address` and give every accepted connection to a new
    handler from ``factory()`` (called with no arguments), whose ``on_open``
    then runs on the handler's poller.

    address: "host:port" (IPv4 or IPv6, "[::1]:0"), a (host, port) tuple, or
    "unix:/path". ``addr`` is the bound address ((host, port), or the path).

    With ``reuse_port=True`` (TCP), one SO_REUSEPORT socket per poller, each
    watched by its own poller (explicitly, not by fd number); connections
    stay on the poller that accepted them unless on_open moves them
    (``add_ev_handler(..., poller=i)``). Without it, one listening socket on
    poller 0 and the accepted connections are spread round-robin over the
    pollers. Accept runs without the GIL; when the process is out of file
    descriptors the listener pauses ~50 ms instead of spinning. A Unix
    socket file is created as by ``create_listener`` (a stale socket file
    is replaced, never a symlink or another file; permissions 0o600).
    backlog and rcvbuf (0: the system's) are ints in 0..2**31-1.

    ssl: a server ``ssl.SSLContext``: every accepted connection completes a
    TLS handshake (driven by its poller, without the GIL) before the
    handler's ``on_open``; ``read()`` then gives plaintext, ``write()`` and
    ``async_write()`` take plaintext, and ``handler.tls`` describes the
    session. A peer that fails the handshake, or does not finish it within
    `ssl_handshake_timeout` seconds (> 0; default 10; ``float("inf")``: no limit), is
    closed: its handler gets no callback at all (logged at debug level).
    """

    def __init__(self, reactor: Reactor, address: Any, factory: Callable[[], EvHandler],
                 reuse_port: bool = False, reuse_addr: bool = True, backlog: int = 512,
                 rcvbuf: int = 0, *, ssl: Optional["_ssl.SSLContext"] = None,
                 ssl_handshake_timeout: Optional[float] = None):
        _check_reactor(reactor)
        if not callable(factory):
            raise TypeError("factory must be callable (called with no arguments)")
        self.ssl = ssl
        self.ssl_handshake_timeout = server_handshake_timeout(ssl, ssl_handshake_timeout)
        for name, v in (("reuse_port", reuse_port), ("reuse_addr", reuse_addr)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool")
        backlog = _validate.size(backlog, "backlog", maximum=_INT_MAX)
        rcvbuf = _validate.size(rcvbuf, "rcvbuf", maximum=_INT_MAX)
        family, addr = _split(address)
        self._reactor = reactor
        self._factory = factory
        self._ops: List[ListenerOperator] = []
        self._unix_path: Optional[str] = None
        self._rr = 0
        self._lock = threading.Lock()
        self.closed = False
        socks = self._listen(family, addr, reuse_port, reuse_addr, backlog, rcvbuf,
                             reactor.poll_num)
        try:
            reactor._register_acceptor(self)
        except BaseException:
            for s in socks:
                s.close()
            raise
        self._spread = len(socks) == 1 and reactor.poll_num > 1
        for i, s in enumerate(socks):
            fd = s.detach()
            self._ops.append(ListenerOperator(fd, reactor._poller(i), _Sink(self, i)))

    def _listen(self, family: int, addr: Any, reuse_port: bool, reuse_addr: bool,
                backlog: int, rcvbuf: int, n: int) -> List[socket.socket]:
        if family == socket.AF_UNIX:
            s = _bind_unix(addr, backlog, rcvbuf=rcvbuf)
            self._unix_path = addr
            self.addr: Any = addr
            return [s]
        host, port = addr
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_PASSIVE)
        if not infos:
            raise OSError(f"cannot resolve {host!r}")
        sockaddr: Any
        fam, stype, proto, _, sockaddr = infos[0]
        count = n if reuse_port else 1
        if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("reuse_port is not supported on this platform")
        socks: List[socket.socket] = []
        try:
            for _ in range(count):
                s = socket.socket(fam, stype, proto)
                socks.append(s)
                if reuse_addr:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if rcvbuf:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                s.bind(sockaddr)
                if sockaddr[1] == 0:
                    # Port 0: the first socket picks, the others join it.
                    sockaddr = (sockaddr[0], s.getsockname()[1]) + tuple(sockaddr[2:])
                s.listen(backlog)
                s.setblocking(False)
        except BaseException:
            for s in socks:
                s.close()
            raise
        name = socks[0].getsockname()
        self.addr = (name[0], name[1])
        return socks

    def _accepted(self, fd: int, index: int) -> None:
        if self.closed:
            os.close(fd)
            return
        if self._spread:
            self._rr += 1
            index = self._rr % self._reactor.poll_num
        try:
            handler = self._factory()
        except BaseException:
            log.exception("netpoll: Acceptor factory raised; closing the connection")
            os.close(fd)
            return
        if not isinstance(handler, EvHandler):
            log.error("netpoll: Acceptor factory returned %r, not an EvHandler", handler)
            os.close(fd)
            return
        try:
            self._reactor._attach(handler, fd, index, self.ssl, self.ssl_handshake_timeout)
        except BaseException:
            log.exception("netpoll: cannot attach an accepted connection")

    def close(self) -> None:
        """Stop listening (idempotent); open connections are not affected."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        # On one of the reactor's pollers, do not wait for the teardown: that
        # poller is the one that performs it, after this callback returns.
        wait = 0 if self._reactor._current_index() >= 0 else 1.0
        for op in self._ops:
            op.close(wait)
        self._reactor._unregister_acceptor(self)
        if self._unix_path is not None:
            _unlink_unix_socket(self._unix_path)

    @property
    def num_listeners(self) -> int:
        return len(self._ops)

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<Acceptor {self.addr!r} listeners={len(self._ops)}{state}>"


class Connector:
    """Non-blocking connects whose outcome is always reported to the handler:
    ``on_open()`` on success, else ``on_connect_fail(err)`` exactly once with
    a ``ConnectionError`` (``ConnectionRefusedError`` for a refusal),
    ``netpoll.DialTimeoutError``, or over TLS ``ssl.SSLCertVerificationError``
    or ``netpoll.TLSError`` — never both, never neither."""

    def __init__(self, reactor: Reactor):
        _check_reactor(reactor)
        self._reactor = reactor

    @property
    def reactor(self) -> Reactor:
        return self._reactor

    def connect(self, address: Any, handler: EvHandler, timeout: Optional[float] = None,
                *, ssl: Optional["_ssl.SSLContext"] = None,
                server_hostname: Optional[str] = None) -> None:
        """Start connecting `handler` to `address` ("host:port", (host, port)
        or "unix:/path"); returns at once. `timeout` in seconds, > 0 (None or
        ``float("inf")``: the kernel's). Name resolution, if the host is not
        numeric, blocks.

        ssl: a client ``ssl.SSLContext``: a TLS handshake follows the
        connect (driven by the poller, without the GIL) and ``on_open`` runs
        after it, within `timeout` too (None: the handshake gets 10 s).
        `server_hostname` (SNI and the name the certificate must match when
        ``ssl.check_hostname``) defaults to the host of a TCP address; ""
        sends none. A certificate that does not verify fails the connect
        with ``ssl.SSLCertVerificationError``, another handshake failure
        with ``netpoll.TLSError``."""
        if not isinstance(handler, EvHandler):
            raise TypeError(f"handler must be an EvHandler, not {type(handler).__name__}")
        timeout = _validate.seconds(timeout, "timeout", zero_ok=False)
        family, addr = _split(address)
        hostname = client_hostname(ssl, server_hostname, family, addr)
        if family == socket.AF_UNIX:
            fam, sockaddr = socket.AF_UNIX, addr
        else:
            infos = socket.getaddrinfo(addr[0] or "127.0.0.1", addr[1], socket.AF_UNSPEC,
                                       socket.SOCK_STREAM)
            if not infos:
                raise OSError(f"cannot resolve {addr[0]!r}")
            fam, _, _, _, sockaddr = infos[0]
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            if fam != socket.AF_UNIX:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = s.connect_ex(sockaddr)
        except BaseException:
            s.close()
            raise
        fd = s.detach()
        self._reactor._connect(handler, fd, err, timeout, address, ssl, hostname)

    def __repr__(self) -> str:
        return f"<Connector of {self._reactor!r}>"


class ConnectPool:
    """goev's connection pool over a Connector.

    Keeps at least `min_idle` open, idle handlers (made by ``factory()``)
    connected to `address` and at most `max_live` in all (idle, lent out and
    connecting). ``acquire()`` lends an idle handler (or returns None when
    none is idle: the pool refills in the background); ``release(h)`` gives
    it back. A handler that closes leaves the pool and is replaced; failed
    connects are retried after `retry_interval` seconds (> 0, finite);
    `timeout` is each connect's, as for ``Connector.connect``.
    """

    def __init__(self, connector: Connector, address: Any, factory: Callable[[], EvHandler],
                 min_idle: int = 4, max_live: int = 64, refill_batch: int = 4,
                 timeout: Optional[float] = 1.0, retry_interval: float = 0.1):
        if not isinstance(connector, Connector):
            raise TypeError("connector must be a netpoll.Connector")
        if not callable(factory):
            raise TypeError("factory must be callable")
        min_idle = _validate.size(min_idle, "min_idle", maximum=_MAX_POOL)
        max_live = _validate.size(max_live, "max_live", minimum=1, maximum=_MAX_POOL)
        refill_batch = _validate.size(refill_batch, "refill_batch", minimum=1,
                                      maximum=_MAX_POOL)
        if min_idle > max_live:
            raise ValueError(f"min_idle ({min_idle}) must be <= max_live ({max_live})")
        timeout = _validate.seconds(timeout, "timeout", zero_ok=False)
        retry_interval = _validate.seconds(retry_interval, "retry_interval", none_ok=False,
                                           inf_ok=False, zero_ok=False)
        _split(address)
        self._connector = connector
        self._address = address
        self._factory = factory
        self.min_idle = min_idle
        self.max_live = max_live
        self.refill_batch = refill_batch
        self._timeout = timeout
        self._retry = retry_interval
        self._lock = threading.Lock()
        self._idle: List[EvHandler] = []
        self._live: Set[int] = set()          # ids of open handlers (idle or lent)
        self._connecting = 0
        self._retry_timer: Optional[threading.Timer] = None
        self.closed = False
        self.failures = 0
        self._refill()

    @property
    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)

    @property
    def live_count(self) -> int:
        with self._lock:
            return len(self._live)

    def acquire(self) -> Optional[EvHandler]:
        """An open idle handler, now lent to the caller, or None."""
        with self._lock:
            h = None
            while self._idle:
                cand = self._idle.pop()
                if not cand.closed:
                    h = cand
                    break
        self._refill()
        return h

    def release(self, handler: EvHandler) -> None:
        """Give a lent handler back (a closed one is simply forgotten)."""
        if not isinstance(handler, EvHandler):
            raise TypeError("handler must be an EvHandler")
        with self._lock:
            if handler._pool is not self:
                raise ValueError("handler does not belong to this pool")
            if not handler.closed and not self.closed and handler not in self._idle:
                self._idle.append(handler)
                return
        if self.closed:
            handler.destroy()

    def close(self) -> None:
        """Stop refilling and destroy the idle handlers (lent ones stay)."""
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
            t, self._retry_timer = self._retry_timer, None
        if t is not None:
            t.cancel()
        for h in idle:
            h.destroy()

    def _refill(self) -> None:
        with self._lock:
            if self.closed or self._retry_timer is not None:
                return
            n = min(self.refill_batch,
                    self.min_idle - len(self._idle) - self._connecting,
                    self.max_live - len(self._live) - self._connecting)
            if n <= 0:
                return
            self._connecting += n
        for _ in range(n):
            try:
                h = self._factory()
                if not isinstance(h, EvHandler):
                    raise TypeError("ConnectPool factory must return an EvHandler")
                h._pool = self
                self._connector.connect(self._address, h, self._timeout)
            except BaseException:
                log.exception("netpoll: ConnectPool could not start a connect")
                with self._lock:
                    self._connecting -= 1

    def _schedule_retry(self) -> None:
        with self._lock:
            if self.closed or self._retry_timer is not None:
                return
            t = threading.Timer(self._retry, self._retry_fire)
            t.daemon = True
            self._retry_timer = t
        t.start()

    def _retry_fire(self) -> None:
        with self._lock:
            self._retry_timer = None
        self._refill()

    def _handler_event(self, h: EvHandler, what: str) -> None:
        """Called by the core on h's poller: "open", "fail" or "close"."""
        with self._lock:
            if what == "open":
                self._connecting -= 1
                self._live.add(id(h))
                if self.closed:
                    pass
                else:
                    self._idle.append(h)
            elif what == "fail":
                self._connecting -= 1
                self.failures += 1
            else:
                if id(h) in self._live:
                    self._live.discard(id(h))
                else:
                    self._connecting -= 1      # on_open returned False
                if h in self._idle:
                    self._idle.remove(h)
        if what == "open" and self.closed:
            h.destroy()
        elif what == "fail":
            self._schedule_retry()
        else:
            self._refill()

    def __repr__(self) -> str:
        return (f"<ConnectPool {self._address!r} idle={len(self._idle)} "
                f"live={len(self._live)} connecting={self._connecting}>")
