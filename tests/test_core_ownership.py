"""Descriptor ownership and bounded memory in the connection core (issue 11):

- an fd the user closed behind our back is never closed by us when its number
  names another file, and a registration that outlives it (a dup keeps the
  file open) neither spins the poller nor reaches freed memory;
- input memory grows with the bytes that arrived, not with what a read asks
  for (a hostile length prefix), and never past the input limit;
- an inline flush above the output limit sends and waits (bounded by the
  write timeout) instead of queueing without bound.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import netpoll
from netutil import HDR, make_server, recv_exact, wait_until  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(script: str, timeout: float = 60.0, args=()) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE),
                                         env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------- ownership

def test_fd_number_reused_after_user_close_is_not_closed_by_us(make_server):
    """The user closes our fd, a new socket gets the same number, then
    conn.close(): the new socket must survive (it is not ours)."""
    srv = make_server(lambda ctx, conn: None, runner="inline")
    conn = srv.dial()
    fd = conn.fileno()
    os.close(fd)
    other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if other.fileno() != fd:
            # The kernel hands out the lowest free number; make it ours.
            os.dup2(other.fileno(), fd)
            other.close()
            other = socket.socket(fileno=fd)
        assert other.fileno() == fd
        conn.close()
        # The teardown runs on the poller: wait for it, then check that the
        # number still names our new socket.
        assert wait_until(lambda: conn.fileno() == -1, 5)
        time.sleep(0.05)
        other.bind(("127.0.0.1", 0))          # EBADF if it had been closed
        assert other.getsockname()[0] == "127.0.0.1"
        os.fstat(fd)
    finally:
        other.close()


def test_dup_keeps_registration_alive_after_close_no_spin_no_crash():
    """d = dup(fd); close(fd); conn.close(): epoll keeps the registration
    (it is keyed on the open file); events for it must neither reach freed
    memory nor spin the poller. In a subprocess: a crash fails the test."""
    r = _run("""
        import os, socket, threading, time
        import netpoll
        from netutil import wait_until

        def echo(ctx, conn):
            conn.write(bytes(conn.reader.next(len(conn.reader))))

        listener = netpoll.create_listener("tcp", "127.0.0.1:0")
        loop = netpoll.EventLoop(echo, runner="inline")
        threading.Thread(target=loop.serve, args=(listener,), daemon=True).start()
        victims = []
        for i in range(20):
            conn = netpoll.dial_connection("tcp", listener.addr, timeout=2)
            conn.write(b"hi")
            assert conn.read(2) == b"hi"
            d = os.dup(conn.fileno())
            os.close(conn.fileno())
            conn.close()
            victims.append(d)
        assert wait_until(lambda: netpoll.stats()["connections"] <= 20, 5)
        # The peers of the dup'ed sockets now send: their registrations (if
        # they still existed) would report EPOLLIN for freed operators.
        for d in victims:
            s = socket.socket(fileno=os.dup(d))
            peer = s.getpeername()
            s.close()
        import gc; gc.collect()
        # Make the dup'ed sockets readable: the server echoes nothing to them
        # (their server side sees data from nobody); instead shut them down
        # from our side so that the zombie registrations turn readable (EOF).
        for d in victims:
            s = socket.socket(fileno=os.dup(d))
            s.shutdown(socket.SHUT_RDWR)
            s.close()
        time.sleep(0.2)
        t0 = time.process_time()
        time.sleep(1.0)
        busy = time.process_time() - t0
        # The poller still serves.
        conn = netpoll.dial_connection("tcp", listener.addr, timeout=2)
        conn.write(b"ok")
        assert conn.read(2) == b"ok"
        conn.close()
        loop.shutdown(5)
        print("BUSY", busy)
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    busy = float(r.stdout.split("BUSY")[1])
    assert busy < 0.5, f"the process spun at {busy:.2f} s CPU per second: a zombie registration"


# ------------------------------------------------------------ input memory

def test_hostile_length_prefix_costs_no_memory(make_server):
    """next(n) for a declared 1 GiB frame must not reserve 1 GiB: memory grows
    with the bytes that arrived."""
    entered = threading.Event()
    outcome = {}

    def handler(ctx, conn):
        n = HDR.unpack(conn.reader.next(4))[0]
        entered.set()
        try:
            conn.reader.next(n)
        except BaseException as e:
            outcome["exc"] = e
            raise

    before = netpoll.stats()["buffers"]["bytes_in_use"]
    srv = make_server(handler, runner="pool", read_timeout=2.0)
    s = srv.connect()
    s.sendall(HDR.pack(1 << 30) + b"x" * 100)
    assert entered.wait(5)
    peak = 0
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        s.sendall(b"y" * 10)             # reads happen while the handler waits for 1 GiB
        time.sleep(0.02)
        peak = max(peak, netpoll.stats()["buffers"]["bytes_in_use"] - before)
    assert peak < 8 << 20, f"{peak} bytes of buffer memory for 104 bytes received"
    assert wait_until(lambda: "exc" in outcome, 5)
    assert isinstance(outcome["exc"], netpoll.ReadTimeoutError), outcome


def test_read_beyond_input_limit_raises_at_once(make_server):
    outcome = {}
    done = threading.Event()

    def handler(ctx, conn):
        n = HDR.unpack(conn.reader.next(4))[0]
        try:
            conn.reader.next(n)
        except BaseException as e:
            outcome["exc"] = e
            done.set()
            raise

    srv = make_server(handler, runner="pool", input_limit=64 * 1024)
    s = srv.connect()
    s.sendall(HDR.pack(1 << 30) + b"x" * 100)
    assert done.wait(5)
    assert isinstance(outcome["exc"], ValueError), outcome
    assert "input limit" in str(outcome["exc"])
    s.settimeout(5)
    assert s.recv(1) == b""               # the connection was closed


# ----------------------------------------------------------- output limit

@pytest.mark.timeout(60)
def test_inline_flush_above_output_limit_waits_for_a_slow_reader(make_server):
    """64 MiB flushed from an inline handler to a peer that reads slowly: the
    flush returns only once at most the limit is queued, and every byte
    arrives."""
    LIMIT = 1 << 20
    TOTAL = 64 << 20
    seen = {}

    def handler(ctx, conn):
        conn.reader.next(1)
        w = conn.writer
        w.write_binary(b"\x5a" * TOTAL)
        w.flush()
        seen["after_flush"] = conn.output_buffered()

    srv = make_server(handler, runner="inline", output_limit=LIMIT, write_timeout=30.0)
    s = srv.connect(timeout=30)
    s.sendall(b"!")
    time.sleep(0.3)                       # the handler fills the socket buffers and waits
    assert "after_flush" not in seen, "flush returned with 64 MiB queued"
    got = 0
    while got < TOTAL:
        chunk = s.recv(1 << 20)
        assert chunk, f"EOF after {got} bytes"
        assert chunk.count(b"\x5a") == len(chunk)
        got += len(chunk)
    assert wait_until(lambda: "after_flush" in seen, 5)
    assert seen["after_flush"] <= LIMIT


@pytest.mark.timeout(60)
def test_inline_flush_above_output_limit_times_out(make_server):
    seen = {}
    done = threading.Event()

    def handler(ctx, conn):
        conn.reader.next(1)
        conn.writer.write_binary(b"y" * (32 << 20))
        t0 = time.monotonic()
        try:
            conn.writer.flush()
        except BaseException as e:
            seen["exc"] = e
        seen["took"] = time.monotonic() - t0
        seen["buffered"] = conn.output_buffered()
        done.set()

    srv = make_server(handler, runner="inline", output_limit=1 << 20, write_timeout=0.5)
    s = srv.connect(timeout=30)
    s.sendall(b"!")                       # and never read
    assert done.wait(10)
    assert isinstance(seen.get("exc"), netpoll.WriteTimeoutError), seen
    assert 0.4 < seen["took"] < 5, seen
    assert seen["buffered"] > 1 << 20


def test_output_limit_setters_validate(make_server):
    srv = make_server(lambda ctx, conn: None)
    conn = srv.dial()
    conn.set_output_limit(1 << 20)
    conn.set_output_limit(None)
    with pytest.raises(ValueError):
        conn.set_output_limit(-1)
    with pytest.raises(ValueError):
        conn.set_output_limit(2 ** 64)
    with pytest.raises(TypeError):
        conn.set_output_limit("1")
    with pytest.raises(ValueError):
        conn.set_input_limit(2 ** 64)
    conn.close()                          # the lock was not left held
    assert conn.output_buffered() == 0
    with pytest.raises(ValueError):
        netpoll.EventLoop(lambda ctx, conn: None, output_limit=-5)


# ------------------------------------------------------- loop failures

@pytest.mark.parametrize("loops", [1, 2])
def test_poller_survives_its_poll_set_being_replaced(loops):
    """epoll_wait failing (someone dup2()ed a file over the poll set's number)
    used to end the poller thread silently. It must log, move to a fresh
    poll set with every interest, leave the foreign file alone and serve on.
    With two pollers, one may register a connection in its broken set
    before its own wait notices: the interest must survive into the new set."""
    r = _run("""
        import logging, os, sys, threading
        import netpoll
        netpoll.configure(num_loops=int(sys.argv[1]))
        logging.basicConfig(level=logging.ERROR, format="LOG %(message)s")

        def echo(ctx, conn):
            conn.write(bytes(conn.reader.next(len(conn.reader))))

        listener = netpoll.create_listener("tcp", "127.0.0.1:0")
        loop = netpoll.EventLoop(echo, runner="inline")
        threading.Thread(target=loop.serve, args=(listener,), daemon=True).start()
        d = netpoll.Dialer(read_timeout=5)
        conn = d.dial_connection("tcp", listener.addr, timeout=2)
        conn.write(b"a")
        assert conn.read(1) == b"a"
        eps = []
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]":
                    eps.append(int(name))
            except OSError:
                pass
        assert eps
        null = os.open("/dev/null", os.O_RDONLY)
        for fd in eps:
            os.dup2(null, fd)
        conn.write(b"b")                  # wakes the poller from its old set
        assert conn.read(1) == b"b"
        conn2 = d.dial_connection("tcp", listener.addr, timeout=2)
        conn2.write(b"c")                 # served only if the poller lives on
        assert conn2.read(1) == b"c"
        conn.write(b"d")
        assert conn.read(1) == b"d"
        for fd in eps:                    # the foreign file was left alone
            assert os.path.samestat(os.fstat(fd), os.fstat(null))
        print("ERRORS", sum(p["errors"] for p in netpoll.stats()["pollers"]))
        conn.close(); conn2.close()
        loop.shutdown(5)
    """, args=[str(loops)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split("ERRORS")[1]) >= 1
    assert "LOG netpoll: poller" in r.stderr
