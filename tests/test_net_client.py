"""Client side (issue "Core I/O"): dialing, dial errors, socket-like read and
write, writes from several threads, half-close, addresses, errors, config."""
from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

import netpoll
from netutil import (  # noqa: F401  (make_server is a fixture)
    NETWORKS, make_server, recv_exact, recv_until_eof, stream_echo, wait_until,
)


def _read_exact(conn, n, deadline=10.0):
    out = bytearray()
    end = time.monotonic() + deadline
    while len(out) < n:
        assert time.monotonic() < end, f"got {len(out)} of {n} bytes"
        chunk = conn.read(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


# ======================================================================
# dialing
# ======================================================================

@pytest.mark.timeout(30)
@pytest.mark.parametrize("form", ["tuple", "string", "dialer"])
@pytest.mark.parametrize("network", NETWORKS)
def test_dial_and_talk(make_server, network, form):
    srv = make_server(stream_echo, network)
    if network == "unix":
        addr = srv.addr
    elif form == "string":
        addr = "%s:%d" % tuple(srv.addr)[:2]
    else:
        addr = tuple(srv.addr)[:2]
    if form == "dialer":
        conn = netpoll.Dialer().dial_connection(network, addr, timeout=1.0)
    else:
        conn = netpoll.dial_connection(network, addr, timeout=1.0)
    try:
        assert conn.is_active()
        assert conn.fileno() >= 0
        for size in (1, 1000, 300_000):
            data = os.urandom(size)
            assert conn.write(data) == size
            assert _read_exact(conn, size) == data
    finally:
        conn.close()
    assert not conn.is_active()
    assert wait_until(lambda: conn.fileno() == -1, 5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("network", NETWORKS)
def test_local_and_remote_addr(make_server, network):
    seen = {}
    got = threading.Event()

    def handler(ctx, conn):
        seen["remote"] = conn.remote_addr
        seen["local"] = conn.local_addr
        stream_echo(ctx, conn)
        got.set()

    srv = make_server(handler, network)
    conn = srv.dial()
    conn.write(b"x")
    assert _read_exact(conn, 1) == b"x"
    assert got.wait(5)
    if network == "unix":
        assert conn.remote_addr == srv.addr
        assert seen["local"] == srv.addr
    else:
        assert tuple(conn.remote_addr)[:2] == tuple(srv.addr)[:2]
        assert tuple(seen["local"])[:2] == tuple(srv.addr)[:2]
        assert tuple(seen["remote"])[:2] == tuple(conn.local_addr)[:2]
        assert conn.local_addr[1] > 0


@pytest.mark.timeout(30)
def test_dial_refused_tcp():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                             # nobody listens there now
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as ei:
        netpoll.dial_connection("tcp", ("127.0.0.1", port), timeout=1.0)
    assert isinstance(ei.value, ConnectionRefusedError), repr(ei.value)
    assert time.monotonic() - t0 < 0.5


@pytest.mark.timeout(30)
def test_dial_unix_missing_path_fails_fast():
    d = tempfile.mkdtemp(prefix="npt-", dir="/tmp")
    try:
        t0 = time.monotonic()
        with pytest.raises(FileNotFoundError):
            netpoll.Dialer().dial_connection("unix", os.path.join(d, "nobody.sock"),
                                             timeout=1.0)
        assert time.monotonic() - t0 < 0.2
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(30)
def test_dial_unix_stale_socket_file_refused():
    d = tempfile.mkdtemp(prefix="npt-", dir="/tmp")
    path = os.path.join(d, "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()                             # the file stays, nobody listens
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            netpoll.Dialer().dial_connection("unix", path, timeout=1.0)
        assert time.monotonic() - t0 < 0.2
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ======================================================================
# read / write semantics
# ======================================================================

@pytest.mark.timeout(30)
def test_read_returns_at_most_n_at_least_one_and_empty_at_eof():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    try:
        conn = netpoll.dial_connection("tcp", lst.getsockname(), timeout=1.0)
        peer, _ = lst.accept()
        with peer:
            peer.sendall(b"0123456789")
            first = conn.read(4)
            assert 1 <= len(first) <= 4
            rest = _read_exact(conn, 10 - len(first))
            assert first + rest == b"0123456789"
            with pytest.raises(ValueError):
                conn.read(0)
            with pytest.raises(TypeError):
                conn.write("text is not bytes")
            peer.sendall(b"tail")
        # peer closed after sending "tail"
        assert _read_exact(conn, 4) == b"tail"
        for _ in range(3):
            assert conn.read(100) == b""
        assert wait_until(lambda: not conn.is_active(), 3)
        conn.close()
        conn.close()
    finally:
        lst.close()


@pytest.mark.timeout(30)
def test_reads_after_own_close_raise_connection_closed(make_server):
    srv = make_server(stream_echo)
    conn = srv.dial()
    conn.write(b"abc")
    assert _read_exact(conn, 3) == b"abc"
    conn.close()
    for op in (lambda: conn.reader.next(1), lambda: conn.read(1)):
        with pytest.raises(netpoll.ConnectionClosedError) as ei:
            op()
        assert not isinstance(ei.value, netpoll.PeerClosedError)
    with pytest.raises(netpoll.ConnectionClosedError):
        conn.write(b"more")


@pytest.mark.timeout(30)
def test_close_wakes_a_blocked_client_read(make_server):
    srv = make_server(lambda ctx, conn: conn.reader.skip(len(conn.reader)))
    conn = srv.dial()
    out = {}

    def reader():
        try:
            out["data"] = conn.read(10)
        except Exception as e:
            out["exc"] = e

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.2)
    assert th.is_alive()
    conn.close()
    th.join(2)
    assert not th.is_alive(), "close() did not wake a blocked read"
    assert isinstance(out.get("exc"), netpoll.ConnectionClosedError), out


@pytest.mark.timeout(60)
def test_concurrent_writes_from_8_threads_never_interleave(make_server):
    THREADS, RECORDS = 8, 40
    rec_hdr = struct.Struct("!HHI")       # thread, seq, body length
    srv = make_server(stream_echo, runner="inline")
    conn = srv.dial(timeout=2.0)
    rng = random.Random(1234)
    plan = {t: [rng.randrange(2048, 65536) for _ in range(RECORDS)] for t in range(THREADS)}
    total = sum(rec_hdr.size + n for sizes in plan.values() for n in sizes)

    def body(t, i, n):
        return bytes([(t * 37 + i) % 251 + 1]) * n

    errors = []
    start = threading.Barrier(THREADS)

    def writer(t):
        try:
            start.wait(5)
            for i, n in enumerate(plan[t]):
                assert conn.write(rec_hdr.pack(t, i, n) + body(t, i, n)) == rec_hdr.size + n
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    data = _read_exact(conn, total, deadline=40)
    for th in threads:
        th.join(10)
    assert not errors, errors
    pos = 0
    next_seq = {t: 0 for t in range(THREADS)}
    while pos < total:
        t, i, n = rec_hdr.unpack_from(data, pos)
        assert t in next_seq and i == next_seq[t], f"bad record header at {pos}: {(t, i, n)}"
        assert n == plan[t][i]
        pos += rec_hdr.size
        assert data[pos:pos + n] == body(t, i, n), f"record {t}/{i} is not contiguous"
        pos += n
        next_seq[t] += 1
    assert all(v == RECORDS for v in next_seq.values())
    conn.close()


@pytest.mark.timeout(60)
def test_conn_write_from_an_inline_handler_while_another_thread_writes(make_server):
    """conn.write() is safe from several threads; one of them may be the
    poller itself (an inline handler replying with conn.write). Here another
    thread's large write is waiting for the poller to drain it when the inline
    handler calls conn.write: both must be delivered, whole, in order."""
    BIG = 32 * 1024 * 1024
    holder = {}
    ready = threading.Event()

    def on_connect(ctx, conn):
        holder["conn"] = conn
        ready.set()
        return ctx

    def on_request(ctx, conn):
        conn.write(b"R" + conn.reader.next(len(conn.reader)).tobytes())

    srv = make_server(on_request, runner="inline", on_connect=on_connect)
    s = srv.connect(timeout=10)
    assert ready.wait(5)
    conn = holder["conn"]
    pusher = threading.Thread(target=conn.write, args=(b"P" * BIG,), daemon=True)
    pusher.start()
    try:
        time.sleep(0.3)                   # the push fills the socket; the poller drains the rest
        s.sendall(b"x")
        time.sleep(0.3)
        data = recv_exact(s, BIG + 2)
        assert data[:BIG] == b"P" * BIG and data[BIG:] == b"Rx"
    finally:
        conn.close()                      # frees the poller if it is stuck
        pusher.join(5)


# ======================================================================
# half-close from the client
# ======================================================================

@pytest.mark.timeout(30)
@pytest.mark.parametrize("network", NETWORKS)
def test_shutdown_write_plain_peer_sees_eof_and_we_still_read(network):
    d = tempfile.mkdtemp(prefix="npt-", dir="/tmp")
    if network == "unix":
        addr = os.path.join(d, "peer.sock")
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(addr)
    else:
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        addr = lst.getsockname()
    lst.listen(1)
    lst.settimeout(5)
    out = {}

    def peer():
        c, _ = lst.accept()
        with c:
            c.settimeout(5)
            data = recv_until_eof(c)      # returns at our FIN
            out["got"] = data
            c.sendall(b"you sent %d bytes" % len(data))

    th = threading.Thread(target=peer)
    th.start()
    try:
        conn = netpoll.Dialer().dial_connection(network, addr, timeout=1.0)
        payload = os.urandom(200_000)
        conn.write(payload)
        conn.shutdown_write()
        reply = b""
        while True:
            chunk = conn.read(1000)
            if not chunk:
                break
            reply += chunk
        assert reply == b"you sent 200000 bytes"
        assert out["got"] == payload
        conn.close()
    finally:
        th.join(5)
        lst.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(30)
def test_shutdown_write_against_a_netpoll_server(make_server):
    N = 100_000

    def handler(ctx, conn):
        data = conn.reader.next(N).tobytes()
        try:
            conn.reader.next(1)
            eof = False
        except netpoll.PeerClosedError:
            eof = True
        conn.writer.write_binary(b"eof=%d sum=%d" % (eof, sum(data) % 65521))
        conn.writer.flush()

    srv = make_server(handler, runner="pool", read_timeout=5.0)
    conn = srv.dial()
    payload = os.urandom(N)
    conn.write(payload)
    conn.shutdown_write()
    reply = b""
    while True:
        chunk = conn.read(1000)
        if not chunk:
            break
        reply += chunk
    assert reply == b"eof=1 sum=%d" % (sum(payload) % 65521)
    conn.close()


# ======================================================================
# on_request on a dialed connection
# ======================================================================

@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["dialer", "set_on_request"])
def test_on_request_on_a_dialed_connection(how):
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    got = []
    done = threading.Event()

    def handler(ctx, conn):
        got.append(conn.reader.next(len(conn.reader)).tobytes())
        if b"".join(got) == b"hello world":
            done.set()

    try:
        if how == "dialer":
            conn = netpoll.Dialer().dial_connection("tcp", lst.getsockname(), timeout=1.0,
                                                    on_request=handler)
        else:
            conn = netpoll.dial_connection("tcp", lst.getsockname(), timeout=1.0)
        peer, _ = lst.accept()
        with peer:
            peer.sendall(b"hello")
            if how == "set_on_request":
                time.sleep(0.1)           # bytes buffered before the handler is set
                conn.set_on_request(handler)
            peer.sendall(b" world")
            assert done.wait(5), got
        conn.close()
    finally:
        lst.close()


# ======================================================================
# errors and configuration
# ======================================================================

def test_error_hierarchy():
    assert issubclass(netpoll.ConnectionClosedError, netpoll.NetpollError)
    assert issubclass(netpoll.ConnectionClosedError, ConnectionError)
    assert issubclass(netpoll.PeerClosedError, netpoll.ConnectionClosedError)
    assert issubclass(netpoll.PeerClosedError, EOFError)
    for cls in (netpoll.ReadTimeoutError, netpoll.WriteTimeoutError, netpoll.DialTimeoutError):
        assert issubclass(cls, netpoll.NetpollError)
        assert issubclass(cls, TimeoutError)
    assert not issubclass(netpoll.ReadTimeoutError, ConnectionError)


def test_configuration_validation():
    for bad in (0, -1):
        with pytest.raises(ValueError):
            netpoll.set_num_loops(bad)
        with pytest.raises(ValueError):
            netpoll.configure(num_loops=bad)
    with pytest.raises(TypeError):
        netpoll.set_num_loops("2")
    with pytest.raises(TypeError):
        netpoll.set_load_balance("random")
    assert {lb.name for lb in netpoll.LoadBalance} >= {"ROUND_ROBIN", "RANDOM"}
    netpoll.set_load_balance(netpoll.LoadBalance.RANDOM)
    netpoll.configure(load_balance=netpoll.LoadBalance.ROUND_ROBIN)
    st = netpoll.stats()
    assert isinstance(st, dict) and st["num_loops"] >= 1
    with pytest.raises(ValueError):
        netpoll.EventLoop(stream_echo, runner="threads")
    with pytest.raises(TypeError):
        netpoll.EventLoop(None)
    with pytest.raises(ValueError):
        netpoll.EventLoop(stream_echo, read_timeout=-1)


@pytest.mark.timeout(30)
def test_connections_still_work_with_random_load_balance(make_server):
    netpoll.set_load_balance(netpoll.LoadBalance.RANDOM)
    try:
        srv = make_server(stream_echo)
        for _ in range(5):
            c = srv.dial()
            c.write(b"rnd")
            assert _read_exact(c, 3) == b"rnd"
            c.close()
    finally:
        netpoll.set_load_balance(netpoll.LoadBalance.ROUND_ROBIN)


MULTI_LOOP = textwrap.dedent(r'''
    import socket, sys, threading
    import netpoll
    netpoll.configure(num_loops=3, load_balance=netpoll.LoadBalance.RANDOM, buffer_size=4096)
    def echo(ctx, conn):
        r = conn.reader
        conn.writer.write_binary(r.next(len(r)))
        conn.writer.flush()
    lst = netpoll.create_listener("tcp", "127.0.0.1:0")
    loop = netpoll.EventLoop(echo)
    th = threading.Thread(target=loop.serve, args=(lst,), daemon=True)
    th.start()
    socks = [socket.create_connection(lst.addr, timeout=5) for _ in range(60)]
    for i, s in enumerate(socks):
        s.sendall(b"m%03d" % i)
    for i, s in enumerate(socks):
        got = b""
        while len(got) < 4:
            got += s.recv(4 - len(got))
        assert got == b"m%03d" % i, got
    conns = [netpoll.dial_connection("tcp", lst.addr, timeout=1) for _ in range(10)]
    for c in conns:
        c.write(b"dial")
        assert c.read(4) == b"dial"
        c.close()
    for s in socks:
        s.close()
    st = netpoll.stats()
    print("loops", st["num_loops"], len(st["pollers"]))
    loop.shutdown(5)
    th.join(5)
    assert not th.is_alive()
    print("OK")
''')


@pytest.mark.timeout(60)
def test_configure_several_loops_in_a_fresh_process():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", MULTI_LOOP], capture_output=True, timeout=50,
                       cwd=repo, env=env)
    assert r.returncode == 0, r.stderr.decode()
    assert b"loops 3 3" in r.stdout and b"OK" in r.stdout, (r.stdout, r.stderr)
