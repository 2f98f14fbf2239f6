"""Shared helpers for tests/test_reactor*.py: a running Reactor that is always
stopped, a recording echo handler, blocking client sockets."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Iterator, List

import pytest

import netpoll


def wait_until(pred: Callable[[], Any], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return bool(pred())
        time.sleep(0.002)
    return True


class Running:
    """A Reactor whose run() is on a thread; stop() joins it."""

    def __init__(self, poll_num: int = 1, **kw: Any):
        self.reactor = netpoll.Reactor(poll_num=poll_num, **kw)
        self.thread = threading.Thread(target=self.reactor.run, name="test-reactor-run",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.reactor.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "run() did not return after stop()"


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    made: List[Running] = []

    def make(poll_num: int = 1, **kw: Any) -> Running:
        r = Running(poll_num, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


class Recorder(netpoll.EvHandler):
    """Echo handler that records every callback (thread-safe list + events)."""

    def __init__(self) -> None:
        self.calls: List[Any] = []
        self.opened = threading.Event()
        self.closed_ev = threading.Event()
        self.failed = threading.Event()
        self.error: Any = None
        self.threads: set = set()

    def on_open(self) -> bool:
        self.calls.append("open")
        self.threads.add(threading.get_ident())
        self.get_reactor().add_ev_handler(self, self.fd(), netpoll.EV_IN)
        self.opened.set()
        return True

    def on_read(self) -> bool:
        self.threads.add(threading.get_ident())
        data = self.read()
        self.calls.append(("read", bytes(data)))
        if not data:
            return False
        self.write(data)
        return True

    def on_connect_fail(self, err: Any) -> None:
        self.calls.append("fail")
        self.error = err
        self.failed.set()

    def on_close(self) -> None:
        self.calls.append("close")
        self.closed_ev.set()


def client(addr: Any, timeout: float = 5.0) -> socket.socket:
    if isinstance(addr, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(addr)
        return s
    return socket.create_connection(addr, timeout=timeout)


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            break
        out += b
    return bytes(out)
