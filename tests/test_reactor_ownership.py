"""Who owns a handler's fd: a failed add_ev_handler takes nothing (EPERM,
EEXIST, EBADF), the fd a caller keeps is never closed behind its back even
when its number is reused, on_close runs only for handlers that were added,
and a registered fd is switched to non-blocking (only once registered)."""
from __future__ import annotations

import errno
import os
import socket
import tempfile
import textwrap
import threading

import pytest

import netpoll
from reactorutil import running, wait_until  # noqa: F401
from test_reactor_races import run_script


class Tracked(netpoll.EvHandler):
    def __init__(self) -> None:
        self.closes = 0
        self.closed_ev = threading.Event()

    def on_close(self) -> None:
        self.closes += 1
        self.closed_ev.set()


def assert_untouched(h: netpoll.EvHandler) -> None:
    assert h.fd() == -1
    assert h.poller_index == -1
    assert h.get_reactor() is None
    assert not h.closed


def socket_at(fd: int) -> "tuple[socket.socket, socket.socket]":
    """A connected socket pair whose first socket has the number `fd` (a
    descriptor number the test closed: the kernel may hand it out again at
    any time, dup2 just makes that certain)."""
    a, b = socket.socketpair()
    if b.fileno() == fd:
        a, b = b, a
    if a.fileno() != fd:
        os.dup2(a.fileno(), fd)
        a.close()
        a = socket.socket(fileno=fd)
    b.settimeout(5)
    return a, b


def assert_socket_alive(a: socket.socket, b: socket.socket) -> None:
    os.fstat(a.fileno())
    a.sendall(b"still mine")
    assert b.recv(100) == b"still mine"


def stop(run) -> None:
    run.stop()
    assert run.reactor.stopped


def test_eperm_regular_file_takes_nothing(running):
    run = running()
    r = run.reactor
    h = Tracked()
    with tempfile.TemporaryFile() as f:
        fd = os.dup(f.fileno())
    flags = os.get_blocking(fd)
    with pytest.raises(OSError) as ei:
        r.add_ev_handler(h, fd, netpoll.EV_IN)
    assert ei.value.errno == errno.EPERM
    assert f"fd {fd}" in str(ei.value)
    assert_untouched(h)
    assert os.get_blocking(fd) == flags          # not switched to non-blocking
    os.fstat(fd)                                 # still open, still the caller's
    # The caller closes its fd; a new socket gets the number; stopping the
    # reactor must not close that socket, nor call on_close.
    os.close(fd)
    a, b = socket_at(fd)
    stop(run)
    assert_socket_alive(a, b)
    assert h.closes == 0
    a.close()
    b.close()


def test_ebadf_closed_fd_takes_nothing(running):
    run = running(poll_num=2)
    r = run.reactor
    h = Tracked()
    fd = os.dup(0)
    os.close(fd)
    with pytest.raises(OSError) as ei:
        r.add_ev_handler(h, fd, netpoll.EV_IN, poller=1)
    assert ei.value.errno == errno.EBADF
    assert f"fd {fd}" in str(ei.value)
    assert_untouched(h)
    a, b = socket_at(fd)
    assert r.stats()[1]["handlers"] == 0          # unbound from poller 1 again
    stop(run)
    assert_socket_alive(a, b)
    assert h.closes == 0
    a.close()
    b.close()


def test_eexist_second_handler_takes_nothing(running):
    run = running()
    r = run.reactor
    first, second = Tracked(), Tracked()
    a, b = socket.socketpair()
    fd = a.detach()
    r.add_ev_handler(first, fd, netpoll.EV_IN)
    with pytest.raises(OSError) as ei:
        r.add_ev_handler(second, fd, netpoll.EV_IN)
    assert ei.value.errno == errno.EEXIST
    assert f"fd {fd}" in str(ei.value)
    assert_untouched(second)
    assert first.fd() == fd
    stop(run)
    assert first.closes == 1 and second.closes == 0
    assert first.fd() == -1
    b.settimeout(5)
    assert b.recv(10) == b""                      # closed once, by its owner
    b.close()


def test_failed_handler_can_be_added_afterwards(running):
    r = running().reactor
    h = Tracked()
    with tempfile.TemporaryFile() as f:
        with pytest.raises(PermissionError):
            r.add_ev_handler(h, f.fileno(), netpoll.EV_IN)
        a, b = socket.socketpair()           # another number: f is still open
        r.add_ev_handler(h, a.detach(), netpoll.EV_IN)
        os.fstat(f.fileno())
    assert h.fd() >= 0 and h.poller_index == 0
    h.write(b"ok")
    b.settimeout(5)
    assert b.recv(10) == b"ok"
    h.destroy()
    assert h.closed_ev.wait(5) and h.closes == 1
    b.close()


def test_fd_out_of_range_is_a_value_error(running):
    r = running().reactor
    h = Tracked()
    with pytest.raises(ValueError):
        r.add_ev_handler(h, 2 ** 31, netpoll.EV_IN)
    with pytest.raises(ValueError):
        r.add_ev_handler(h, 2 ** 64, netpoll.EV_IN)
    assert_untouched(h)


def test_add_sets_o_nonblock(running):
    r = running().reactor
    h = Tracked()
    a, b = socket.socketpair()
    a.setblocking(True)
    fd = a.detach()
    assert os.get_blocking(fd)
    r.add_ev_handler(h, fd, netpoll.EV_IN)
    assert not os.get_blocking(fd)
    h.destroy()
    assert h.closed_ev.wait(5)
    b.close()


# A blocking fd used to stall the poller in send(): every async_write caller
# waited on the handler lock and stop() gave up after 15 s. The scenario runs
# in a subprocess so that a hang fails the test instead of freezing pytest.
BLOCKING_SCRIPT = textwrap.dedent("""
    import socket, sys, threading, time
    import netpoll

    r = netpoll.Reactor()
    t = threading.Thread(target=r.run, daemon=True)
    t.start()
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.setblocking(True)

    class H(netpoll.EvHandler):
        def on_read(self):
            self.read()
            self.write(b"z" * (8 << 20))     # the peer never reads
            return True

    h = H()
    r.add_ev_handler(h, a.detach(), netpoll.EV_IN)
    b.sendall(b"go")
    time.sleep(0.2)
    t0 = time.monotonic()
    h.async_write(b"more")                 # must not wait for the poller's send
    t1 = time.monotonic()
    r.stop()
    t.join(20)
    t2 = time.monotonic()
    print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
""")


def test_blocking_fd_does_not_stall_writers_or_stop():
    out = run_script(BLOCKING_SCRIPT, timeout=20)
    write_s, stop_s = map(float, out.split())
    assert write_s < 1.0
    assert stop_s < 5.0
