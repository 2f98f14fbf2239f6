"""Timeouts (issue "Core I/O"): read and write timeouts, the idle timeout, dial
timeouts and the shutdown deadline. Bounds allow for a loaded 2-core machine:
a timeout must not fire early and must fire within 0.2 s (0.5 s for the
coarser ones) of its deadline; the measured lateness is printed and recorded."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

import netpoll
from netutil import (  # noqa: F401  (make_server is a fixture)
    NETWORKS, RUNNERS, make_server, recv_exact, sees_eof, stream_echo, wait_until,
)

EARLY = 0.005        # clock granularity we tolerate on the early side


def _lateness(record_property, name, elapsed, timeout, slack):
    late = elapsed - timeout
    record_property(f"{name}_lateness_ms", round(late * 1000, 2))
    print(f"{name}: timeout {timeout:.3f} s fired after {elapsed:.4f} s "
          f"(late by {late * 1000:.1f} ms)")
    assert elapsed >= timeout - EARLY, f"{name} fired {-late * 1000:.1f} ms early"
    assert elapsed < timeout + slack, f"{name} fired {late * 1000:.1f} ms late"


# ======================================================================
# read timeout
# ======================================================================

@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["loop", "conn"])
@pytest.mark.parametrize("runner", RUNNERS)
def test_read_timeout_raises_on_time_and_consumes_nothing(make_server, record_property,
                                                          runner, how):
    T = 0.25
    out = {}
    done = threading.Event()

    def handler(ctx, conn):
        r = conn.reader
        t0 = time.monotonic()
        try:
            r.next(100)
        except Exception as e:
            out["elapsed"] = time.monotonic() - t0
            out["exc"] = e
            out["left"] = len(r)
            out["peek"] = r.peek(len(r)).tobytes()
        done.set()

    kw = {"read_timeout": T} if how == "loop" else {
        "on_connect": lambda ctx, c: c.set_read_timeout(T)}
    srv = make_server(handler, runner=runner, **kw)
    s = srv.connect()
    s.sendall(b"0123456789")
    assert done.wait(5)
    e = out["exc"]
    assert isinstance(e, netpoll.ReadTimeoutError), repr(e)
    assert isinstance(e, TimeoutError) and isinstance(e, netpoll.NetpollError)
    _lateness(record_property, f"read_timeout[{runner}]", out["elapsed"], T, 0.2)
    assert out["left"] == 10 and out["peek"] == b"0123456789"


@pytest.mark.timeout(30)
def test_read_timeout_on_a_dialed_connection(make_server, record_property):
    T = 0.2
    srv = make_server(lambda ctx, conn: conn.reader.skip(len(conn.reader)))   # never replies
    conn = srv.dial(read_timeout=T)
    conn.write(b"hello")
    t0 = time.monotonic()
    with pytest.raises(netpoll.ReadTimeoutError):
        conn.reader.next(1)
    _lateness(record_property, "dialed next()", time.monotonic() - t0, T, 0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.read(10)
    _lateness(record_property, "dialed read()", time.monotonic() - t0, T, 0.2)
    assert conn.is_active()
    conn.close()


# ======================================================================
# write timeout
# ======================================================================

BIG = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def big_payload():
    return os.urandom(1024 * 1024) * (BIG // (1024 * 1024))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("network", NETWORKS)
def test_write_timeout_raises_when_the_peer_never_reads(make_server, record_property,
                                                       network, big_payload):
    T = 0.3
    out = {}
    done = threading.Event()

    def handler(ctx, conn):
        conn.reader.skip(len(conn.reader))
        conn.writer.write_binary(big_payload)
        t0 = time.monotonic()
        try:
            conn.writer.flush()
            out["exc"] = None
        except Exception as e:
            out["exc"] = e
        out["elapsed"] = time.monotonic() - t0
        done.set()

    srv = make_server(handler, network, runner="pool", write_timeout=T)
    s = srv.connect()
    s.sendall(b"go")                      # and never read
    assert done.wait(5)
    e = out["exc"]
    assert isinstance(e, netpoll.WriteTimeoutError), repr(e)
    assert isinstance(e, TimeoutError) and isinstance(e, netpoll.NetpollError)
    _lateness(record_property, f"write_timeout[{network}]", out["elapsed"], T, 0.2)


@pytest.mark.timeout(30)
def test_inline_flush_to_a_stuck_peer_is_bounded_by_the_write_timeout(make_server,
                                                                      big_payload):
    """Without an output limit an inline flush returns at once; when the peer
    does not take the bytes within the write timeout the connection is
    closed. (Above an output limit the flush itself waits and raises
    WriteTimeoutError: tests/test_core_ownership.py.)"""
    T = 0.3
    out = {}
    closed = threading.Event()

    def handler(ctx, conn):
        conn.reader.skip(len(conn.reader))
        conn.add_close_callback(lambda c: closed.set())
        conn.writer.write_binary(big_payload)
        out["t0"] = time.monotonic()
        conn.writer.flush()
        out["returned"] = time.monotonic() - out["t0"]

    srv = make_server(handler, runner="inline", write_timeout=T, output_limit=None)
    s = srv.connect()
    s.sendall(b"go")                      # and never read
    assert closed.wait(5), "the connection was never closed"
    elapsed = time.monotonic() - out["t0"]
    print(f"inline flush returned after {out['returned'] * 1000:.1f} ms; "
          f"closed after {elapsed:.3f} s")
    assert out["returned"] < 0.1
    assert T - EARLY <= elapsed < T + 0.5


# ======================================================================
# idle timeout
# ======================================================================

@pytest.mark.timeout(30)
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("runner", RUNNERS)
def test_idle_timeout_closes_an_idle_connection_not_a_busy_one(make_server, record_property,
                                                              runner, network):
    T = 0.3
    disc = []
    srv = make_server(stream_echo, network, runner=runner, idle_timeout=T,
                      on_connect=lambda ctx, c: "c",
                      on_disconnect=lambda ctx, c: disc.append(c))
    res = {}
    t_idle = time.monotonic()
    idle = srv.connect()

    def watch():
        res["eof"] = sees_eof(idle, 5)
        res["t"] = time.monotonic() - t_idle

    w = threading.Thread(target=watch)
    w.start()
    busy = srv.connect()
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < 1.2:    # four idle timeouts' worth of traffic
        msg = b"ping%04d" % i
        busy.sendall(msg)
        assert recv_exact(busy, len(msg)) == msg, "busy connection closed"
        i += 1
        time.sleep(0.1)
    w.join(10)
    assert res["eof"], "the idle connection was not closed"
    _lateness(record_property, f"idle_timeout[{runner},{network}]", res["t"], T, 0.5)
    busy.sendall(b"still")
    assert recv_exact(busy, 5) == b"still"
    assert disc == [], "on_disconnect ran for a connection we closed"


@pytest.mark.timeout(30)
def test_idle_timeout_waits_for_a_running_handler(make_server):
    T = 0.2

    def slow(ctx, conn):
        conn.reader.skip(len(conn.reader))
        time.sleep(0.6)                   # three idle timeouts, no traffic
        conn.writer.write_binary(b"late reply")
        conn.writer.flush()

    srv = make_server(slow, runner="pool", idle_timeout=T)
    s = srv.connect()
    s.sendall(b"go")
    assert recv_exact(s, 10) == b"late reply"
    t0 = time.monotonic()
    assert sees_eof(s, 3), "not closed after going idle"
    assert time.monotonic() - t0 < T + 0.5


@pytest.mark.timeout(30)
def test_set_idle_timeout_on_a_connection(make_server):
    T = 0.2
    srv = make_server(stream_echo, on_connect=lambda ctx, c: c.set_idle_timeout(T))
    s = srv.connect()
    s.sendall(b"x")
    assert recv_exact(s, 1) == b"x"
    t0 = time.monotonic()
    assert sees_eof(s, 3)
    assert T - 0.05 <= time.monotonic() - t0 < T + 0.5


@pytest.mark.timeout(30)
def test_idle_timeout_counts_outgoing_traffic(make_server):
    """Traffic in our direction only (the server pushes) keeps a connection busy."""
    T = 0.3
    holder = {}
    ready = threading.Event()

    def on_connect(ctx, conn):
        holder["conn"] = conn
        ready.set()
        return ctx

    srv = make_server(stream_echo, idle_timeout=T, on_connect=on_connect)
    s = srv.connect()
    assert ready.wait(5)
    conn = holder["conn"]
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.2:
        conn.write(b"tick")
        assert recv_exact(s, 4) == b"tick", "closed although the server kept sending"
        time.sleep(0.1)
    assert sees_eof(s, 3)                 # once the server stops, it goes idle


@pytest.mark.timeout(30)
def test_idle_timeout_on_a_dialed_connection(make_server, record_property):
    T = 0.3
    srv = make_server(stream_echo)
    conn = srv.dial(idle_timeout=T)
    closed = threading.Event()
    conn.add_close_callback(lambda c: closed.set())
    t0 = time.monotonic()
    assert closed.wait(3), "the idle dialed connection was not closed"
    _lateness(record_property, "dialed idle timeout", time.monotonic() - t0, T, 0.5)
    assert not conn.is_active()


@pytest.mark.timeout(30)
def test_write_timeout_on_a_dialed_connection(record_property, big_payload):
    T = 0.3
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    try:
        conn = netpoll.Dialer(write_timeout=T).dial_connection("tcp", lst.getsockname(),
                                                               timeout=1.0)
        peer, _ = lst.accept()            # and never read
        with peer:
            # The timeout governs flush(): start the clock there, not before
            # write_binary's copy of 64 MiB (~40 ms here, much more under load).
            conn.writer.write_binary(big_payload)
            t0 = time.monotonic()
            with pytest.raises(netpoll.WriteTimeoutError):
                conn.writer.flush()
            _lateness(record_property, "dialed write timeout", time.monotonic() - t0, T, 0.2)
            # conn.write() is bounded the same way (the output is still stuck).
            with pytest.raises(netpoll.WriteTimeoutError):
                conn.write(b"x")
            conn.close()
    finally:
        lst.close()


# ======================================================================
# dial timeout
# ======================================================================

@pytest.mark.timeout(30)
def test_dial_timeout_tcp_full_accept_queue(record_property):
    T = 0.5
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fillers = []
    try:
        for _ in range(4):                # fill the accept queue; never accept
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(lst.getsockname())
            except BlockingIOError:
                pass
            fillers.append(c)
        time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(netpoll.DialTimeoutError) as ei:
            netpoll.dial_connection("tcp", lst.getsockname(), timeout=T)
        elapsed = time.monotonic() - t0
        assert isinstance(ei.value, TimeoutError) and isinstance(ei.value, netpoll.NetpollError)
        _lateness(record_property, "dial_timeout[tcp]", elapsed, T, 0.2)
    finally:
        for c in fillers:
            c.close()
        lst.close()


@pytest.mark.timeout(30)
def test_dial_timeout_unix_full_backlog(record_property):
    T = 0.5
    d = tempfile.mkdtemp(prefix="npt-", dir="/tmp")
    path = os.path.join(d, "full.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(0)
    fillers = []
    try:
        for _ in range(64):               # until the backlog is full
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            fillers.append(c)
            try:
                c.connect(path)
            except BlockingIOError:
                break
        else:
            pytest.fail("could not fill the Unix socket backlog")
        t0 = time.monotonic()
        with pytest.raises(netpoll.DialTimeoutError):
            netpoll.Dialer().dial_connection("unix", path, timeout=T)
        _lateness(record_property, "dial_timeout[unix]", time.monotonic() - t0, T, 0.2)
    finally:
        for c in fillers:
            c.close()
        lst.close()
        shutil.rmtree(d, ignore_errors=True)


# ======================================================================
# shutdown deadline
# ======================================================================

@pytest.mark.timeout(30)
def test_shutdown_deadline_shorter_than_a_running_handler(make_server, record_property):
    T = 0.3
    entered = threading.Event()
    release = threading.Event()
    out = {}

    def stuck(ctx, conn):
        conn.reader.skip(len(conn.reader))
        entered.set()
        release.wait(10)
        try:
            conn.writer.write_binary(b"too late")
            conn.writer.flush()
            out["write"] = "sent"
        except Exception as e:
            out["write"] = e

    srv = make_server(stuck, runner="pool")
    s = srv.connect()
    s.sendall(b"go")
    assert entered.wait(5)
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            srv.loop.shutdown(timeout=T)
        _lateness(record_property, "shutdown deadline", time.monotonic() - t0, T, 0.2)
        assert srv.serve_returned(5)
        assert srv.serve_result is None and srv.serve_error is None
        assert sees_eof(s, 3), "the busy connection was not force-closed"
    finally:
        release.set()
    assert wait_until(lambda: "write" in out, 5)
    assert isinstance(out["write"], netpoll.ConnectionClosedError), out
