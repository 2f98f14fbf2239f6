"""Reactor Acceptor (IPv4, IPv6, Unix, REUSEPORT), Connector (success,
refusal, timeout) and ConnectPool."""
from __future__ import annotations

import os
import resource
import socket
import tempfile
import threading
import time

import pytest

import netpoll
from netutil import HAS_IPV6
from reactorutil import Recorder, client, recv_exactly, running, wait_until  # noqa: F401


def echo_roundtrip(addr, payload=b"hello reactor"):
    with client(addr) as c:
        c.sendall(payload)
        assert recv_exactly(c, len(payload)) == payload


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "unix"])
def test_acceptor_echo(running, family):
    r = running(poll_num=2).reactor
    if family == "ipv4":
        address = "127.0.0.1:0"
    elif family == "ipv6":
        if not HAS_IPV6:
            pytest.skip("no IPv6 loopback in this sandbox")
        address = "[::1]:0"
    else:
        d = tempfile.mkdtemp()
        address = "unix:" + os.path.join(d, "r.sock")
    hs = []

    def factory():
        hs.append(Recorder())
        return hs[-1]

    acc = netpoll.Acceptor(r, address, factory)
    if family == "unix":
        assert acc.addr == address[5:]
    else:
        assert acc.addr[1] > 0
    for i in range(6):
        echo_roundtrip(acc.addr, b"msg %d" % i)
    assert wait_until(lambda: len(hs) == 6 and all(h.closed_ev.is_set() for h in hs))
    for h in hs:
        assert h.calls[0] == "open" and h.calls.count("close") == 1
    # Without reuse_port, accepted connections are spread over the pollers.
    assert {h.poller_index for h in hs} == {0, 1}
    acc.close()
    if family == "unix":
        assert not os.path.exists(acc.addr)


def test_reuse_port_spreads_over_all_pollers(running):
    if not hasattr(socket, "SO_REUSEPORT"):
        pytest.skip("no SO_REUSEPORT")
    n = 3
    r = running(poll_num=n).reactor
    hs = []
    lock = threading.Lock()

    class H(Recorder):
        def on_open(self):
            # The accepting poller runs on_open: record where we are.
            with lock:
                hs.append((self, r._current_index()))
            return super().on_open()

    acc = netpoll.Acceptor(r, "127.0.0.1:0", H, reuse_port=True)
    assert acc.num_listeners == n
    socks = [client(acc.addr) for _ in range(60)]
    for s in socks:
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
    assert wait_until(lambda: len(hs) == 60)
    for h, idx in hs:
        assert h.poller_index == idx                # stayed on its accepting poller
        assert len(h.threads) == 1
    assert {idx for _, idx in hs} == set(range(n))
    for s in socks:
        s.close()


def test_on_open_can_move_to_another_poller(running):
    r = running(poll_num=2).reactor

    class H(Recorder):
        def on_open(self):
            target = 1 - r._current_index()
            self.moved_to = target
            r.add_ev_handler(self, self.fd(), netpoll.EV_IN, poller=target)
            self.opened.set()
            return True

    hs = []
    acc = netpoll.Acceptor(r, "127.0.0.1:0", lambda: hs.append(H()) or hs[-1], reuse_port=True)
    echo_roundtrip(acc.addr)
    assert hs[0].poller_index == hs[0].moved_to


def test_acceptor_bad_args(running):
    r = running().reactor
    with pytest.raises(TypeError):
        netpoll.Acceptor(object(), "127.0.0.1:0", Recorder)
    with pytest.raises(TypeError):
        netpoll.Acceptor(r, "127.0.0.1:0", None)
    with pytest.raises(ValueError):
        netpoll.Acceptor(r, "127.0.0.1", Recorder)
    with pytest.raises(ValueError):
        netpoll.Acceptor(r, "127.0.0.1:99999", Recorder)
    with pytest.raises(TypeError):
        netpoll.Acceptor(r, 8080, Recorder)
    with pytest.raises(ValueError):
        netpoll.Acceptor(r, "127.0.0.1:0", Recorder, backlog=-1)
    with pytest.raises(TypeError):
        netpoll.Acceptor(r, "127.0.0.1:0", Recorder, reuse_port="yes")
    with pytest.raises(TypeError):
        netpoll.Acceptor(r, "127.0.0.1:0", Recorder, rcvbuf=1.5)
    with pytest.raises(ValueError):
        netpoll.Acceptor(r, "unix:", Recorder)


def test_factory_returning_garbage_is_survived(running):
    r = running().reactor
    acc = netpoll.Acceptor(r, "127.0.0.1:0", lambda: 42)
    c = client(acc.addr)
    assert c.recv(1) == b""              # closed, and the reactor lives on
    c.close()
    acc2 = netpoll.Acceptor(r, "127.0.0.1:0", Recorder)
    echo_roundtrip(acc2.addr)


def test_accept_backs_off_when_out_of_fds(running):
    r = running().reactor
    acc = netpoll.Acceptor(r, "127.0.0.1:0", Recorder)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hog = []
    c = None
    try:
        c = client(acc.addr)              # made before the limit bites
        c2 = socket.socket()
        c2.settimeout(5)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        try:
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        # accept() now fails with EMFILE; the listener pauses instead of spinning.
        t0 = time.process_time()
        c2.connect(acc.addr)             # lands in the backlog
        time.sleep(0.3)
        spent = time.process_time() - t0
        assert spent < 0.25, f"accept loop spun: {spent:.2f}s CPU in 0.3s"
        for fd in hog:
            os.close(fd)
        hog = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        c2.sendall(b"back")
        assert recv_exactly(c2, 4) == b"back"
        c2.close()
    finally:
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if c is not None:
            c.close()


# -------------------------------------------------------------- Connector

class Client(Recorder):
    def __init__(self, payload=b"ping"):
        super().__init__()
        self.payload = payload
        self.got = bytearray()
        self.done = threading.Event()

    def on_open(self):
        self.calls.append("open")
        self.get_reactor().add_ev_handler(self, self.fd(), netpoll.EV_IN)
        self.write(self.payload)
        self.opened.set()
        return True

    def on_read(self):
        d = self.read()
        if not d:
            return False
        self.got += d
        if len(self.got) >= len(self.payload):
            self.done.set()
        return True


def test_connect_success(running):
    r = running(poll_num=2).reactor
    acc = netpoll.Acceptor(r, "127.0.0.1:0", Recorder)
    h = Client()
    netpoll.Connector(r).connect(acc.addr, h, timeout=2.0)
    assert h.done.wait(5)
    assert bytes(h.got) == b"ping"
    assert "fail" not in h.calls
    h.destroy()
    assert h.closed_ev.wait(5)
    assert h.calls.count("close") == 1


def test_connect_unix_success(running):
    r = running().reactor
    path = os.path.join(tempfile.mkdtemp(), "c.sock")
    netpoll.Acceptor(r, "unix:" + path, Recorder)
    h = Client(b"over unix")
    netpoll.Connector(r).connect("unix:" + path, h, timeout=2.0)
    assert h.done.wait(5)


def test_connect_refused_calls_on_connect_fail_only(running):
    r = running().reactor
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                # nothing listens there now
    h = Client()
    netpoll.Connector(r).connect(("127.0.0.1", port), h, timeout=2.0)
    assert h.failed.wait(5)
    time.sleep(0.1)
    assert h.calls == ["fail"]
    assert isinstance(h.error, ConnectionRefusedError)
    assert isinstance(h.error, ConnectionError)


def test_connect_unix_missing_path_fails(running):
    r = running().reactor
    h = Client()
    netpoll.Connector(r).connect("unix:/nonexistent/netpoll.sock", h, timeout=1.0)
    assert h.failed.wait(5)
    assert isinstance(h.error, ConnectionError)
    assert h.calls == ["fail"]


@pytest.fixture
def full_backlog():
    """A listener whose accept queue is full: further SYNs are dropped, so a
    connect to it stays pending until its timeout."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    addr = lst.getsockname()
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(addr)
        fillers.append(f)
    time.sleep(0.05)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(addr)
        probe.close()
        for f in fillers:
            f.close()
        lst.close()
        pytest.skip("this kernel completes connects to a full backlog: no timeout to provoke")
    except (socket.timeout, OSError):
        probe.close()
    yield addr
    for f in fillers:
        f.close()
    lst.close()


def test_connect_timeout(running, full_backlog):
    r = running().reactor
    h = Client()
    t0 = time.monotonic()
    netpoll.Connector(r).connect(full_backlog, h, timeout=0.2)
    assert h.failed.wait(5)
    elapsed = time.monotonic() - t0
    assert isinstance(h.error, netpoll.DialTimeoutError)
    assert isinstance(h.error, TimeoutError)
    assert 0.19 <= elapsed < 2.0
    time.sleep(0.1)
    assert h.calls == ["fail"]


def test_destroy_and_stop_while_connecting(running, full_backlog):
    rr = running()
    r = rr.reactor
    a, b = Client(), Client()
    netpoll.Connector(r).connect(full_backlog, a, timeout=5)
    netpoll.Connector(r).connect(full_backlog, b, timeout=5)
    time.sleep(0.05)
    a.destroy()
    assert a.failed.wait(5)
    assert isinstance(a.error, ConnectionError)
    rr.stop()
    assert b.calls == ["fail"] and isinstance(b.error, ConnectionError)
    assert a.calls == ["fail"]


def test_connector_bad_args(running):
    r = running().reactor
    with pytest.raises(TypeError):
        netpoll.Connector("reactor")
    c = netpoll.Connector(r)
    with pytest.raises(TypeError):
        c.connect("127.0.0.1:1", object())
    with pytest.raises(ValueError):
        c.connect("127.0.0.1:1", Client(), timeout=-1)
    with pytest.raises(TypeError):
        c.connect("127.0.0.1:1", Client(), timeout="1")
    with pytest.raises(ValueError):
        c.connect("nonsense", Client())
    with pytest.raises(TypeError):
        c.connect(None, Client())
    h = Client()
    acc = netpoll.Acceptor(r, "127.0.0.1:0", Recorder)
    c.connect(acc.addr, h, 1.0)
    with pytest.raises(ValueError):
        c.connect(acc.addr, h, 1.0)          # the same handler twice
    assert h.done.wait(5)


# ------------------------------------------------------------ ConnectPool

def test_connect_pool_min_idle_acquire_release_refill(running):
    r = running(poll_num=2).reactor
    server_side = []
    acc = netpoll.Acceptor(r, "127.0.0.1:0", lambda: server_side.append(Recorder()) or
                           server_side[-1])
    pool = netpoll.ConnectPool(netpoll.Connector(r), acc.addr, Client,
                               min_idle=3, max_live=4, refill_batch=2)
    assert wait_until(lambda: pool.idle_count == 3)
    h = pool.acquire()
    assert isinstance(h, Client) and not h.closed
    assert wait_until(lambda: pool.idle_count == 3 and pool.live_count == 4)
    lent = [pool.acquire() for _ in range(3)]
    assert all(x is not None for x in lent)
    time.sleep(0.1)
    assert pool.live_count == 4                     # max_live caps the refill
    assert pool.acquire() is None
    pool.release(h)
    assert pool.idle_count == 1
    # A pooled connection that closes leaves the pool and is replaced.
    lent[0].destroy()
    assert wait_until(lambda: pool.live_count == 4 and pool.idle_count >= 1)
    with pytest.raises(ValueError):
        pool.release(Client())
    pool.close()


def test_connect_pool_retries_after_failures(running):
    r = running().reactor
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    pool = netpoll.ConnectPool(netpoll.Connector(r), ("127.0.0.1", port), Client,
                               min_idle=1, max_live=2, retry_interval=0.05)
    assert wait_until(lambda: pool.failures >= 3)
    assert pool.acquire() is None
    pool.close()


def test_connect_pool_bad_args(running):
    r = running().reactor
    c = netpoll.Connector(r)
    with pytest.raises(TypeError):
        netpoll.ConnectPool(r, "127.0.0.1:1", Client)
    with pytest.raises(ValueError):
        netpoll.ConnectPool(c, "127.0.0.1:1", Client, min_idle=5, max_live=2)
    with pytest.raises(TypeError):
        netpoll.ConnectPool(c, "127.0.0.1:1", Client, min_idle="1")
    with pytest.raises(TypeError):
        netpoll.ConnectPool(c, "127.0.0.1:1", 5)


def test_acceptor_close_from_a_callback_does_not_stall(running):
    r = running().reactor
    took = []

    class H(Recorder):
        def on_read(self):
            t0 = time.monotonic()
            acc.close()
            took.append(time.monotonic() - t0)
            return super().on_read()

    acc = netpoll.Acceptor(r, "127.0.0.1:0", H)
    echo_roundtrip(acc.addr)
    assert took and took[0] < 0.5
    with pytest.raises(OSError):
        for _ in range(50):          # the listener goes away promptly
            client(acc.addr, timeout=1).close()
            time.sleep(0.01)
