"""runner="auto": handlers run inline on the poller's leader; when one blocks,
polling passes to a standby thread (issue 12).

* a handler that never blocks runs on the thread that leads its poller;
* a handler blocked for ~200 ms (time.sleep, a blocking socket recv, a
  reader.next() waiting for a slow peer) does not stall other connections;
* nothing is lost or reordered when polling changes hands mid-batch;
* shutdown with handlers blocked in every thread honours its deadline.
"""
from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import pytest

import netpoll
from netpoll.config import runtime
from netutil import make_server, recv_exact  # noqa: F401

# Other connections' round trips while one handler blocks for ~200 ms: 99%
# under 20 ms, and none near the blocking time (a stalled poller shows one
# round trip of ~200 ms). The tail bound leaves room for a machine shared
# with other jobs, where even the pool runner sees 30-60 ms hiccups.
RTT_BOUND = 0.020
RTT_WORST = 0.100


def _poller_of(conn):
    for p in runtime().pollers:
        if conn in p.operators():
            return p
    raise AssertionError("connection not on any poller")


def _handoffs() -> int:
    return sum(p.stats()["handoffs"] for p in runtime().pollers)


def test_nonblocking_handler_runs_on_the_leader(make_server):
    seen = []

    def on_connect(ctx, conn):
        return {"connect_thread": threading.get_ident()}

    def echo(ctx, conn):
        seen.append((threading.get_ident(), _poller_of(conn)._leader_ident(),
                     ctx["connect_thread"]))
        data = conn.reader.next(len(conn.reader))
        conn.writer.write_binary(data)
        conn.writer.flush()

    srv = make_server(echo, runner="auto", on_connect=on_connect)
    s = srv.connect()
    for i in range(50):
        s.sendall(b"ping%d" % i)
        assert recv_exact(s, len(b"ping%d" % i)) == b"ping%d" % i
    assert len(seen) == 50
    for handler_thread, leader, connect_thread in seen:
        # No thread switch: the handler runs on the thread that polls (and
        # read its bytes), which also ran on_connect.
        assert handler_thread == leader
        assert handler_thread == connect_thread


def _rtt_probe(sock: socket.socket, until: threading.Event, limit: float = 3.0):
    """Round trips on `sock` until `until` is set; returns their durations."""
    rtts = []
    end = time.monotonic() + limit
    i = 0
    while not until.is_set() and time.monotonic() < end:
        msg = b"p%07d" % i
        t0 = time.monotonic()
        sock.sendall(msg)
        assert recv_exact(sock, len(msg)) == msg
        rtts.append(time.monotonic() - t0)
        i += 1
    return rtts


def _downstream(release: threading.Event):
    """A server that answers one b"q" with b"!" once `release` is set."""
    lst = socket.create_server(("127.0.0.1", 0))

    def serve():
        c, _ = lst.accept()
        with c:
            c.settimeout(10.0)
            assert c.recv(1) == b"q"
            release.wait(10.0)
            c.sendall(b"!")
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return lst, t


@pytest.mark.parametrize("how", ["sleep", "socket", "next", "dialer"])
def test_blocking_handler_does_not_stall_others(make_server, how):
    started = threading.Event()
    finished = threading.Event()
    side_a, side_b = socket.socketpair()
    side_a.settimeout(5.0)
    release = threading.Event()
    downstream, served = _downstream(release) if how == "dialer" else (None, None)

    def handler(ctx, conn):
        head = bytes(conn.reader.next(1))
        if head == b"B":
            started.set()
            if how == "sleep":
                time.sleep(0.2)
            elif how == "socket":
                assert side_a.recv(1) == b"!"        # blocks until the test writes
            elif how == "dialer":
                # A blocking call over a plain Dialer connection (runner
                # "pool", on this same poller): the auto handler must give
                # its poller up, not read the downstream socket itself.
                d = netpoll.dial_connection("tcp", downstream.getsockname(), timeout=5.0)
                d.write(b"q")
                assert d.reader.next(1) == b"!"
                d.close()
            else:
                conn.reader.next(4)                 # the slow peer's next bytes
            finished.set()
            conn.writer.write_binary(b"done")
            conn.writer.flush()
            return
        rest = bytes(conn.reader.next(len(conn.reader)))
        conn.writer.write_binary(head + rest)
        conn.writer.flush()

    srv = make_server(handler, runner="auto")
    a = srv.connect()
    b = srv.connect()
    b.sendall(b"warm")
    assert recv_exact(b, 4) == b"warm"
    a.sendall(b"B")
    assert started.wait(5.0)
    t_start = time.monotonic()
    if how == "sleep":
        rtts = _rtt_probe(b, finished)
    else:
        # The handler stays blocked until we release it: probe for 200 ms.
        stop = threading.Event()
        timer = threading.Timer(0.2, stop.set)
        timer.start()
        rtts = _rtt_probe(b, stop)
        timer.join()
        assert not finished.is_set()
        if how == "socket":
            side_b.sendall(b"!")
        elif how == "dialer":
            release.set()
        else:
            a.sendall(b"slow")
    blocked_for = time.monotonic() - t_start
    assert recv_exact(a, 4) == b"done"
    side_a.close()
    side_b.close()
    if downstream is not None:
        served.join(5.0)
        downstream.close()
    assert blocked_for >= 0.15
    # Served throughout, not once the handler returned.
    assert len(rtts) >= 10, (len(rtts), blocked_for)
    worst = max(rtts)
    p99 = sorted(rtts)[int(len(rtts) * 0.99)]
    info = (f"worst round trip {worst * 1000:.1f} ms (#{rtts.index(worst)} of {len(rtts)}), "
            f"p99 {p99 * 1000:.1f} ms, {netpoll.stats()['handoff']}, hand-offs {_handoffs()}")
    assert p99 < RTT_BOUND, info
    assert worst < RTT_WORST, info


def test_no_loss_or_reorder_when_polling_changes_hands(make_server):
    """200 connections pipeline framed messages; some handlers run past the
    hand-off threshold (the monitor moves polling mid-batch) and bodies
    arrive split (next() hands off at once). Every reply must come back
    whole and in order."""
    nconn, nmsg = 200, 12
    hdr = struct.Struct("!III")     # seq, length, crc

    def handler(ctx, conn):
        seq, n, crc = hdr.unpack(bytes(conn.reader.next(hdr.size)))
        body = bytes(conn.reader.next(n))
        assert zlib.crc32(body) == crc
        if seq % 5 == 0:
            time.sleep(0.004)        # past the 2 ms threshold
        conn.writer.write_binary(hdr.pack(seq, n, crc) + body)
        conn.writer.flush()

    srv = make_server(handler, runner="auto")
    before = _handoffs()
    rng = random.Random(12)
    socks = [srv.connect(timeout=30.0) for _ in range(nconn)]
    sent = []
    for s in socks:
        msgs = []
        for seq in range(nmsg):
            body = os.urandom(rng.randrange(1, 600))
            msgs.append(hdr.pack(seq, len(body), zlib.crc32(body)) + body)
        sent.append(msgs)
        wire = b"".join(msgs)
        cut = len(wire) - rng.randrange(1, 20)   # the tail of the last body comes later
        s.sendall(wire[:cut])
        sent[-1] = (msgs, wire[cut:])
    for s, (_, tail) in zip(socks, sent):
        s.sendall(tail)
    for s, (msgs, _) in zip(socks, sent):
        for m in msgs:
            assert recv_exact(s, len(m)) == m
    assert _handoffs() > before          # polling did change hands


SHUTDOWN_SCRIPT = textwrap.dedent("""
    import socket, sys, threading, time
    import netpoll
    netpoll.configure(max_threads=4, handoff_threshold=0.002)
    entered = []
    lock = threading.Lock()

    def handler(ctx, conn):
        conn.reader.next(1)
        with lock:
            entered.append(threading.get_ident())
        time.sleep(30)

    lst = netpoll.create_listener("tcp", "127.0.0.1:0")
    loop = netpoll.EventLoop(handler, runner="auto")
    threading.Thread(target=loop.serve, args=(lst,), daemon=True).start()
    socks = [socket.create_connection(tuple(lst.addr)[:2]) for _ in range(8)]
    for s in socks:
        s.sendall(b"x")
    end = time.monotonic() + 5
    while len(entered) < 4 and time.monotonic() < end:
        time.sleep(0.01)
    assert len(entered) >= 4, entered          # every thread the cap allows is blocked
    t0 = time.monotonic()
    try:
        loop.shutdown(timeout=0.5)
    except TimeoutError:
        pass
    else:
        sys.exit("shutdown did not time out")
    took = time.monotonic() - t0
    print("SHUTDOWN_TOOK", took, len(set(entered)), flush=True)
    sys.exit(0 if took < 1.5 else 3)
""")


def test_shutdown_with_handlers_blocked_in_every_thread():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", SHUTDOWN_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "SHUTDOWN_TOOK" in r.stdout
    # Handlers were blocked on more than one thread: polling had moved.
    assert int(r.stdout.split()[-1]) >= 2


def test_configure_validates_handoff_options():
    with pytest.raises(ValueError):
        netpoll.configure(handoff_threshold=0)
    with pytest.raises(ValueError):
        netpoll.configure(max_threads=1)
    with pytest.raises(TypeError):
        netpoll.configure(handoff_threshold="1")
    with pytest.raises(ValueError):
        netpoll.EventLoop(lambda c, x: None, runner="automatic")
    assert netpoll.EventLoop(lambda c, x: None, runner="auto").runner == "auto"
