"""Shared helpers for tests/test_net_*.py: a server fixture that always shuts
its EventLoop down, blocking client sockets, framing and handler helpers.

Import the fixtures into a test module with
``from netutil import make_server  # noqa: F401``.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from typing import Any, Callable, List, Optional

import pytest

import netpoll

RUNNERS = ["pool", "inline", "auto"]
NETWORKS = ["tcp", "unix"]

HDR = struct.Struct("!I")


def _has_ipv6_loopback() -> bool:
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


HAS_IPV6 = _has_ipv6_loopback()


def thread_runner(task: Callable[[], None]) -> None:
    """A custom runner with no serialisation of its own: a thread per task."""
    threading.Thread(target=task, name="np-test-task", daemon=True).start()


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.002) -> bool:
    """Poll `pred` until it is true or `timeout` passes; returns its last truth."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return bool(pred())
        time.sleep(interval)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ----------------------------------------------------------------- sockets

def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes; EOFError if the peer closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"peer closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    out = bytearray()
    while len(out) < limit:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def sees_eof(sock: socket.socket, timeout: float = 3.0) -> bool:
    """True if the peer closed (EOF or reset) within `timeout`, draining any data."""
    old = sock.gettimeout()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not data:
                return True
    finally:
        try:
            sock.settimeout(old)
        except OSError:
            pass


def frame(payload: bytes) -> bytes:
    return HDR.pack(len(payload)) + payload


def read_frame(sock: socket.socket) -> bytes:
    (n,) = HDR.unpack(recv_exact(sock, 4))
    return recv_exact(sock, n)


# ---------------------------------------------------------------- handlers

def stream_echo(ctx, conn) -> None:
    """Echo whatever is buffered (parse-and-return style, any runner)."""
    r = conn.reader
    n = len(r)
    if n:
        conn.writer.write_binary(r.next(n))
        conn.writer.flush()


def frame_echo(ctx, conn) -> None:
    """Echo complete length-prefixed frames; leave a partial one buffered."""
    r, w = conn.reader, conn.writer
    sent = False
    while len(r) >= 4:
        (n,) = HDR.unpack(r.peek(4))
        if len(r) < 4 + n:
            break
        w.write_binary(r.next(4 + n))
        sent = True
    if sent:
        w.flush()


def blocking_frame_echo(ctx, conn) -> None:
    """Read one frame with blocking next() calls and echo it."""
    r, w = conn.reader, conn.writer
    (n,) = HDR.unpack(r.next(4))
    body = r.next(n)
    w.write_binary(HDR.pack(n))
    w.write_binary(body)
    w.flush()


# ------------------------------------------------------------------ server

class Server:
    """An EventLoop serving a fresh listener on a background thread."""

    def __init__(self, on_request, network: str = "tcp", **loop_kw: Any) -> None:
        self.network = network
        self._dir: Optional[str] = None
        if network == "unix":
            self._dir = tempfile.mkdtemp(prefix="npt-", dir="/tmp")
            address: Any = os.path.join(self._dir, "s.sock")
        elif network == "tcp6":
            address = "[::1]:0"
        else:
            address = "127.0.0.1:0"
        self.listener = netpoll.create_listener(network, address)
        self.addr = self.listener.addr
        self.loop = netpoll.EventLoop(on_request, **loop_kw)
        self.serve_result: Any = "not returned"
        self.serve_error: Optional[BaseException] = None
        self._socks: List[socket.socket] = []
        self._dialed: List[Any] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="np-serve", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.serve_result = self.loop.serve(self.listener)
        except BaseException as e:  # pragma: no cover - reported by tests
            self.serve_error = e

    @property
    def family(self) -> int:
        if self.network == "unix":
            return socket.AF_UNIX
        if self.network == "tcp6":
            return socket.AF_INET6
        return socket.AF_INET

    @property
    def sockaddr(self) -> Any:
        return self.addr if self.network == "unix" else tuple(self.addr)[:2]

    def connect(self, timeout: float = 10.0) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.sockaddr)
        except BaseException:
            s.close()
            raise
        self._socks.append(s)
        return s

    def dial(self, timeout: float = 2.0, **dialer_kw: Any):
        conn = netpoll.Dialer(**dialer_kw).dial_connection(self.network, self.addr,
                                                           timeout=timeout)
        self._dialed.append(conn)
        return conn

    def serve_returned(self, timeout: float = 5.0) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close_clients(self) -> None:
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
        self._socks.clear()
        for c in self._dialed:
            try:
                c.close()
            except Exception:
                pass
        self._dialed.clear()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Close our clients, shut the loop down, join serve(). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.close_clients()
        try:
            self.loop.shutdown(timeout=timeout)
        finally:
            self._thread.join(10.0)
            self.listener.close()
            if self._dir:
                shutil.rmtree(self._dir, ignore_errors=True)
        assert not self._thread.is_alive(), "serve() did not return after shutdown()"


@pytest.fixture
def make_server():
    """make_server(on_request, network="tcp", **EventLoop kwargs) -> Server;
    every server is shut down at teardown (a teardown error means a handler
    was still running 5 s into shutdown)."""
    servers: List[Server] = []

    def make(on_request, network: str = "tcp", **kw: Any) -> Server:
        srv = Server(on_request, network, **kw)
        servers.append(srv)
        return srv

    yield make
    errors = []
    for srv in servers:
        try:
            srv.shutdown()
        except BaseException as e:
            errors.append(e)
    if errors:
        raise errors[0]


def cpu_seconds_over(wall: float) -> float:
    """Process CPU time (all threads) spent while `wall` seconds pass."""
    t0 = time.process_time()
    time.sleep(wall)
    return time.process_time() - t0
