"""Reliability: resource faults, scale and leaks.

* out of file descriptors while dialling (and accepting, in the same process),
  in a subprocess with a low RLIMIT_NOFILE; recovery when fds return
  (accept-only exhaustion is tests/test_net_stress.py::test_accept_backs_off...);
* handlers that raise: closed and logged, everything else keeps working;
* shutdown with 500 requests in flight: a reply or a clean close for each, no
  thread left behind;
* 10,000 concurrent idle connections on one server;
* a long run (NETPOLL_LEAK_REQUESTS, default 100,000 requests) over churning
  connections with fds, threads, RSS and chunk-pool figures sampled.
"""
from __future__ import annotations

import gc
import logging
import os
import random
import resource
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from netpoll._core.linkbuffer import pool_stats
from netutil import (  # noqa: F401
    HDR, RUNNERS, blocking_frame_echo, fd_count, frame, frame_echo, make_server, read_frame,
    recv_exact, sees_eof, stream_echo, wait_until,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ======================================================================
# out of fds while dialling and accepting
# ======================================================================

EMFILE_DIAL = textwrap.dedent(r"""
    import errno, os, resource, socket, sys, threading, time
    import netpoll

    def echo(ctx, conn):
        r = conn.reader
        n = len(r)
        if n:
            conn.writer.write_binary(r.next(n)); conn.writer.flush()

    runner = sys.argv[1]
    lst = netpoll.create_listener("tcp", "127.0.0.1:0")
    loop = netpoll.EventLoop(echo, runner=runner)
    threading.Thread(target=loop.serve, args=(lst,), daemon=True).start()
    addr = lst.addr
    # warm up: pollers, pool, one dial
    c = netpoll.dial_connection("tcp", addr, timeout=2); c.write(b"hi")
    assert c.reader.next(2) == b"hi"; c.close()
    time.sleep(0.2)
    HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nfd = len(os.listdir("/proc/self/fd"))
    LOW = nfd + 8
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, HARD))

    def count_fds():        # counting needs an fd of its own: lift the limit briefly
        resource.setrlimit(resource.RLIMIT_NOFILE, (LOW + 16, HARD))
        try:
            return len(os.listdir("/proc/self/fd"))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, HARD))

    conns, failures = [], []
    while len(failures) < 20:
        try:
            c = netpoll.dial_connection("tcp", addr, timeout=2)
            conns.append(c)
        except OSError as e:        # the dial's socket() or the server's accept
            failures.append(e)
            before, served = count_fds(), loop.connections
            resource.setrlimit(resource.RLIMIT_NOFILE, (LOW + 16, HARD))
            snap = {f: os.readlink("/proc/self/fd/" + f) for f in os.listdir("/proc/self/fd")
                    if os.path.exists("/proc/self/fd/" + f)}
            resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, HARD))
            try:
                conns.append(netpoll.dial_connection("tcp", addr, timeout=0.5))
                made = 1
            except OSError:
                made = 0
            # The fds that may legitimately appear meanwhile: this dial's if it
            # succeeded, and server sides accepted from the backlog after the
            # listener's EMFILE back-off (they are the loop's connections).
            for _ in range(200):
                if count_fds() <= before + made + max(0, loop.connections - served):
                    break
                time.sleep(0.01)
            else:
                resource.setrlimit(resource.RLIMIT_NOFILE, (LOW + 16, HARD))
                now = {f: os.readlink("/proc/self/fd/" + f) for f in os.listdir("/proc/self/fd")
                       if os.path.exists("/proc/self/fd/" + f)}
                new = set(now.items()) - set(snap.items())
                raise AssertionError(f"a failed dial leaked an fd: new {new}, made={made}, "
                                     f"served={served}->{loop.connections}")
        if len(conns) > 100:
            raise SystemExit("never ran out of fds")
    assert any(getattr(e, "errno", None) == errno.EMFILE or "Too many open files" in str(e)
               for e in failures), failures[:3]
    # connections made before the exhaustion still work
    for i, c in enumerate(conns):
        if not c.is_active():
            continue          # accept failed on the server side: it closes or never reads
        c.write(b"x%d" % i)
    print("EXHAUSTED", len(conns), type(failures[0]).__name__, failures[0], flush=True)
    # give fds back: dial and accept work again
    for c in conns:
        c.close()
    time.sleep(0.3)
    ok = 0
    for i in range(5):
        c = netpoll.dial_connection("tcp", addr, timeout=5)
        c.write(b"again%d" % i)
        assert c.reader.next(6) == b"again%d" % i
        c.close(); ok += 1
    print("RECOVERED", ok, flush=True)
    loop.shutdown(timeout=5)
    print("BYE", flush=True)
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("runner", RUNNERS)
def test_out_of_fds_while_dialling_and_accepting_then_recovers(runner):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", EMFILE_DIAL, runner], capture_output=True,
                       text=True, timeout=80, cwd=REPO, env=env)
    print(p.stdout, p.stderr[-2000:])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "EXHAUSTED" in p.stdout and "RECOVERED 5" in p.stdout and "BYE" in p.stdout


# ======================================================================
# handlers that raise
# ======================================================================

@pytest.mark.timeout(60)
@pytest.mark.parametrize("runner", RUNNERS)
def test_raising_handlers_closed_and_logged_others_unaffected(make_server, runner, caplog):
    BAD, GOOD, ROUNDS = 40, 20, 20

    def handler(ctx, conn):
        r = conn.reader
        while len(r) >= 4:
            (n,) = HDR.unpack(r.peek(4))
            if len(r) < 4 + n:
                return
            r.skip(4)
            msg = r.read_binary(n)
            if msg.startswith(b"boom"):
                raise RuntimeError("handler failure (expected by the test): " + msg.decode())
            conn.writer.write_binary(frame(msg))
            conn.writer.flush()

    caplog.set_level(logging.ERROR, logger="netpoll")
    srv = make_server(handler, runner=runner)
    good = [srv.connect() for _ in range(GOOD)]
    bad = [srv.connect() for _ in range(BAD)]
    errors = []

    def talk(k, s):
        try:
            for i in range(ROUNDS):
                msg = b"ok-%d-%d" % (k, i)
                s.sendall(frame(msg))
                assert read_frame(s) == msg
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=talk, args=(k, s)) for k, s in enumerate(good)]
    for th in threads:
        th.start()
    for k, s in enumerate(bad):
        s.sendall(frame(b"boom-%d" % k))
    for th in threads:
        th.join(30)
    assert not errors, errors[:3]
    for s in bad:
        assert sees_eof(s, 5), "a connection whose handler raised was not closed"
    assert wait_until(lambda: srv.loop.connections == GOOD, 5), srv.loop.connections
    msgs = [r.getMessage() for r in caplog.records if r.name == "netpoll"]
    raised = [m for m in msgs if "on_request raised" in m]
    assert len(raised) == BAD, msgs[:5]
    assert all(r.exc_info and "handler failure" in str(r.exc_info[1])
               for r in caplog.records if "on_request raised" in r.getMessage())
    for s in good:                        # still fine afterwards
        s.sendall(frame(b"after"))
        assert read_frame(s) == b"after"


# ======================================================================
# shutdown with 500 requests in flight
# ======================================================================

@pytest.mark.timeout(90)
@pytest.mark.parametrize("runner", RUNNERS)
def test_shutdown_with_500_requests_in_flight(make_server, runner):
    N = 500
    received = [0]
    lock = threading.Lock()
    all_in = threading.Event()

    def handler(ctx, conn):
        r = conn.reader
        if len(r) < 8:
            return
        data = r.read_binary(8)
        with lock:
            received[0] += 1
            if received[0] == N:
                all_in.set()
        if runner == "pool":
            time.sleep(random.uniform(0.0, 0.05))   # a slow service
        conn.writer.write_binary(data)
        conn.writer.flush()

    srv = make_server(handler, runner=runner)
    w = srv.connect()                      # warm up the runtime, then count threads
    w.sendall(b"warmup!!")
    assert recv_exact(w, 8) == b"warmup!!"
    with lock:
        received[0] = 0
    socks = [srv.connect() for _ in range(N)]
    assert wait_until(lambda: srv.loop.connections == N + 1, 20), srv.loop.connections
    threads0 = {t.ident for t in threading.enumerate()}
    for i, s in enumerate(socks):
        s.sendall(b"%08d" % i)
    if runner == "pool":
        assert all_in.wait(20) or received[0] > 0
    shut = {}

    def do_shutdown():
        try:
            srv.loop.shutdown(timeout=30)
            shut["ok"] = True
        except BaseException as e:
            shut["err"] = e

    t_sd = threading.Thread(target=do_shutdown)
    t_sd.start()
    replied = closed = 0
    for i, s in enumerate(socks):
        s.settimeout(30)
        try:
            data = recv_exact(s, 8)
        except EOFError:
            closed += 1                    # closed cleanly (FIN) before the reply
            continue
        assert data == b"%08d" % i
        replied += 1
        assert s.recv(1) == b"", "connection not closed after the reply"
    t_sd.join(40)
    print(f"runner={runner}: {received[0]} requests taken, {replied} replied, {closed} closed")
    assert shut.get("ok"), shut
    assert replied + closed == N
    assert replied >= received[0] - 1 if runner == "pool" else True
    assert srv.serve_returned(10)
    # no thread of this loop left behind (the runtime's pollers and pool are shared)
    assert wait_until(lambda: {t.ident for t in threading.enumerate()} <= threads0 | {
        t.ident for t in threading.enumerate() if t.name.startswith(("netpoll-", "np-"))}, 5)
    # runner="auto": a hand-off during the shutdown may make the monitor start
    # a standby to keep two spare; standbys belong to the runtime like its
    # pollers (shared by every loop, retired after 10 s idle), not to this loop.
    leftover = [t.name for t in threading.enumerate()
                if t.ident not in threads0 and t is not threading.current_thread()
                and t.name != "netpoll-standby"]
    assert not leftover, leftover


# ======================================================================
# 10,000 idle connections
# ======================================================================

IDLE = int(os.environ.get("NETPOLL_IDLE_CONNS", "10000"))

IDLE_CLIENT = textwrap.dedent(r"""
    import random, resource, socket, sys
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n + 256), hard))
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect((host, port))
        socks.append(s)
    print("CONNECTED", flush=True)
    sys.stdin.readline()                  # the server has counted them
    for s in random.Random(1).sample(socks, 200):   # all served
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            chunk = s.recv(4 - len(got))
            if not chunk:
                raise SystemExit("closed")
            got += chunk
        assert got == b"ping"
    print("PINGED", flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()
    print("CLOSED", flush=True)
""")


@pytest.mark.stress
@pytest.mark.timeout(120)
@pytest.mark.parametrize("runner", RUNNERS)
def test_10000_concurrent_idle_connections(make_server, runner):
    """The clients live in a subprocess (so each process needs ~10,000 fds,
    not 20,000); the server's RSS growth per connection is reported."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE + 512
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need} needed for {IDLE} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    p = None
    try:
        srv = make_server(stream_echo, runner=runner, idle_timeout=None)
        w = srv.connect()
        w.sendall(b"w")
        recv_exact(w, 1)
        gc.collect()
        rss0 = _rss()
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-c", IDLE_CLIENT, srv.addr[0], str(srv.addr[1]),
                              str(IDLE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "CONNECTED", p.stderr.read() if p.poll() else ""
        assert wait_until(lambda: srv.loop.connections == IDLE + 1, 30), srv.loop.connections
        dt = time.monotonic() - t0
        time.sleep(0.5)
        rss = _rss() - rss0
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "PINGED"
        assert srv.loop.connections == IDLE + 1
        print(f"runner={runner}: {IDLE} idle connections in {dt:.1f} s; server RSS "
              f"+{rss / 2**20:.1f} MiB ({rss / IDLE:.0f} B per connection)")
        p.stdin.write("quit\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "CLOSED"
        assert p.wait(20) == 0
        assert wait_until(lambda: srv.loop.connections == 1, 30), srv.loop.connections
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ======================================================================
# leaks over a long run
# ======================================================================

LEAK_REQUESTS = int(os.environ.get("NETPOLL_LEAK_REQUESTS", "100000"))


@pytest.mark.stress
@pytest.mark.timeout(180)
@pytest.mark.parametrize("runner", RUNNERS)
def test_no_growth_over_100000_requests_on_churning_connections(make_server, runner):
    """Connections live for 1..100 requests (some end with RST, some with a
    frame half sent); fds, threads, RSS and the chunk pool are sampled every
    tenth of the run; after a warm-up tenth none may grow beyond a small bound."""
    srv = make_server(frame_echo, runner=runner)
    addr = tuple(srv.addr)
    THREADS = 4
    per_thread = LEAK_REQUESTS // THREADS
    progress = [0] * THREADS
    errors = []
    samples = []

    def worker(k):
        rng = random.Random(k)
        done = 0
        try:
            while done < per_thread:
                s = socket.create_connection(addr, timeout=10)
                try:
                    for _ in range(min(rng.randint(1, 100), per_thread - done)):
                        msg = rng.randbytes(rng.choice((8, 100, 1000, 20000)))
                        s.sendall(frame(msg))
                        if read_frame(s) != msg:
                            raise AssertionError("bad echo")
                        done += 1
                        progress[k] = done
                    end = rng.randrange(3)
                    if end == 1:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    elif end == 2:
                        s.sendall(HDR.pack(5000) + b"half")
                finally:
                    s.close()
        except BaseException as e:
            errors.append(e)

    def sample():
        gc.collect()
        st = pool_stats()
        samples.append({"requests": sum(progress), "fds": fd_count(),
                        "threads": threading.active_count(), "rss": _rss(),
                        "chunks": st["chunks_in_use"], "bytes": st["bytes_in_use"],
                        "cached": st["bytes_cached"]})

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    step = LEAK_REQUESTS // 10
    nxt = step
    while any(th.is_alive() for th in threads):
        if sum(progress) >= nxt:
            sample()
            nxt += step
        time.sleep(0.02)
    for th in threads:
        th.join()
    dt = time.monotonic() - t0
    assert not errors, errors[:3]
    assert wait_until(lambda: srv.loop.connections == 0, 10), srv.loop.connections
    sample()
    print(f"runner={runner}: {sum(progress)} requests in {dt:.1f} s ({sum(progress) / dt:.0f}/s)")
    for s in samples:
        print("   ", s)
    base, last = samples[1], samples[-1]     # samples[0]: warm-up tenth
    assert sum(progress) == per_thread * THREADS
    # while running, at most THREADS client and THREADS server sockets more
    assert all(s["fds"] <= base["fds"] + 2 * THREADS + 2 for s in samples[1:]), samples
    assert last["fds"] <= base["fds"]
    assert last["threads"] <= base["threads"]
    assert last["chunks"] <= max(base["chunks"], 4)
    assert last["rss"] - base["rss"] < 16 * 2**20, (base["rss"], last["rss"])
    assert last["cached"] <= max(base["cached"], 1 << 20) * 2
