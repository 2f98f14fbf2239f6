"""EventLoop server behaviour (issue "Core I/O"): when on_request runs, blocking
reads, large flushes, callback order and ctx, close callbacks, graceful
shutdown, half-close and read backpressure."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import threading
import time
import zlib

import pytest

import netpoll
from netutil import (  # noqa: F401  (make_server is a fixture)
    HAS_IPV6, HDR, NETWORKS, RUNNERS, blocking_frame_echo, cpu_seconds_over, frame,
    frame_echo, make_server, read_frame, recv_exact, sees_eof, stream_echo, thread_runner,
    wait_until,
)

ALL_RUNNERS = [pytest.param("pool", id="pool"), pytest.param("inline", id="inline"),
               pytest.param(thread_runner, id="thread-per-task")]


class Recorder:
    """Thread-safe event list."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items = []

    def add(self, *item):
        with self.lock:
            self.items.append(item if len(item) > 1 else item[0])

    def snapshot(self):
        with self.lock:
            return list(self.items)

    def names(self):
        return [i[0] if isinstance(i, tuple) else i for i in self.snapshot()]


# ======================================================================
# on_request: basic service over every network and runner
# ======================================================================

NETS_ALL = ["tcp", "tcp4", pytest.param("tcp6", marks=pytest.mark.skipif(
    not HAS_IPV6, reason="no IPv6 loopback")), "unix"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("network", NETS_ALL)
@pytest.mark.parametrize("runner", ALL_RUNNERS)
def test_echo_round_trips(make_server, network, runner):
    srv = make_server(frame_echo, network, runner=runner)
    if network != "unix":
        assert isinstance(srv.addr, tuple) and srv.addr[1] > 0
    else:
        assert isinstance(srv.addr, str) and os.path.exists(srv.addr)
    s = srv.connect()
    for size in (1, 100, 5000, 200_000):
        body = os.urandom(size)
        s.sendall(frame(body))
        assert read_frame(s) == body


# ======================================================================
# on_request: partial frames, re-calls, no spinning, never two at once
# ======================================================================

@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_blocking_handler_gets_rest_of_half_frame(make_server, runner):
    """A handler blocked in next(n) on half a frame receives the rest when it
    arrives (on inline it reads the socket itself)."""
    calls = []
    entered = threading.Event()

    def handler(ctx, conn):
        calls.append(len(conn.reader))
        entered.set()
        blocking_frame_echo(ctx, conn)

    srv = make_server(handler, runner=runner, read_timeout=10.0)
    s = srv.connect()
    body = os.urandom(3000)
    f = frame(body)
    s.sendall(f[:1000])
    assert entered.wait(5)
    time.sleep(0.1)                       # let the handler block in next()
    s.sendall(f[1000:])
    assert read_frame(s) == body
    assert calls == [1000], calls


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", ALL_RUNNERS)
def test_parse_and_return_handler_called_again_with_rest(make_server, runner):
    """A handler that finds half a frame and returns is not called again until
    new bytes arrive; then it is called with the rest."""
    calls = Recorder()
    returned = threading.Event()

    def handler(ctx, conn):
        calls.add(len(conn.reader))
        frame_echo(ctx, conn)
        returned.set()

    srv = make_server(handler, runner=runner)
    s = srv.connect()
    body = os.urandom(1000)
    f = frame(body)
    s.sendall(f[:500])
    assert returned.wait(5)
    time.sleep(0.2)                       # no new bytes: no new call
    assert calls.snapshot() == [500]
    s.sendall(f[500:])
    assert read_frame(s) == body
    seen = calls.snapshot()
    assert seen[0] == 500 and seen[-1] == len(f), seen


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", ALL_RUNNERS)
def test_called_again_at_once_after_consuming_with_data_left(make_server, runner):
    """A handler that consumes one frame per call is called again (without new
    bytes arriving) while complete frames remain."""
    seen = Recorder()

    def one_frame(ctx, conn):
        r = conn.reader
        seen.add(len(r))
        if len(r) >= 4:
            (n,) = HDR.unpack(r.peek(4))
            if len(r) >= 4 + n:
                conn.writer.write_binary(r.next(4 + n))
                conn.writer.flush()

    srv = make_server(one_frame, runner=runner)
    s = srv.connect()
    bodies = [b"first", b"second!", b"third..."]
    data = b"".join(frame(b) for b in bodies)
    s.sendall(data)                       # one small segment: one recv
    for b in bodies:
        assert read_frame(s) == b
    total = len(data)
    expect = [total, total - 9, total - 9 - 11]
    assert seen.snapshot() == expect


@pytest.mark.timeout(60)
@pytest.mark.parametrize("handler", [frame_echo, blocking_frame_echo], ids=["parse", "blocking"])
@pytest.mark.parametrize("runner", ALL_RUNNERS)
def test_pipelined_requests_all_answered_in_order(make_server, runner, handler):
    """20,000 frames sent in one go before reading any reply."""
    srv = make_server(handler, runner=runner, read_timeout=20.0)
    s = srv.connect(timeout=30)
    bodies = [b"%06d" % i * (1 + i % 7) for i in range(20_000)]
    data = b"".join(frame(b) for b in bodies)
    th = threading.Thread(target=s.sendall, args=(data,))
    th.start()
    got = recv_exact(s, len(data))
    th.join(10)
    assert got == data


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", ALL_RUNNERS)
def test_handler_consuming_nothing_does_not_spin(make_server, runner):
    calls = Recorder()
    called = threading.Event()
    holder = {}

    def lazy(ctx, conn):
        holder["conn"] = conn
        calls.add(len(conn.reader))
        called.set()

    srv = make_server(lazy, runner=runner)
    s = srv.connect()
    s.sendall(b"partial")
    assert called.wait(5)
    cpu = cpu_seconds_over(1.0)
    print(f"CPU while a handler leaves 7 bytes unread: {cpu:.3f} s per 1 s")
    assert cpu < 0.3, f"process used {cpu:.2f} s CPU in 1 s: spinning?"
    assert calls.snapshot() == [7]
    called.clear()
    s.sendall(b"+more")
    assert called.wait(5)
    assert calls.snapshot() == [7, 12]
    assert len(holder["conn"].reader) == 12


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", [pytest.param("pool", id="pool"),
                                    pytest.param(thread_runner, id="thread-per-task")])
def test_never_two_handlers_at_once_per_connection(make_server, runner):
    lock = threading.Lock()
    st = {"active": 0, "max": 0, "calls": 0}

    def slow_echo(ctx, conn):
        with lock:
            st["active"] += 1
            st["calls"] += 1
            st["max"] = max(st["max"], st["active"])
        try:
            time.sleep(0.02)              # the client sends more meanwhile
            stream_echo(ctx, conn)
        finally:
            with lock:
                st["active"] -= 1

    srv = make_server(slow_echo, runner=runner)
    s = srv.connect()
    sent = b""
    for i in range(40):
        msg = b"<%03d>" % i
        s.sendall(msg)
        sent += msg
        time.sleep(0.003)
    assert recv_exact(s, len(sent)) == sent
    assert st["max"] == 1, st
    assert st["calls"] >= 2, st


@pytest.mark.timeout(30)
def test_pool_runs_handlers_of_different_connections_concurrently(make_server):
    barrier = threading.Barrier(2, timeout=5)

    def meet(ctx, conn):
        conn.reader.skip(len(conn.reader))
        barrier.wait()                    # both connections' handlers at once
        conn.writer.write_binary(b"ok")
        conn.writer.flush()

    srv = make_server(meet, runner="pool")
    a, b = srv.connect(), srv.connect()
    a.sendall(b"a")
    b.sendall(b"b")
    assert recv_exact(a, 2) == b"ok"
    assert recv_exact(b, 2) == b"ok"


# ======================================================================
# blocking reads
# ======================================================================

@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_next_blocks_until_n_bytes(make_server, runner):
    out = {}

    def handler(ctx, conn):
        out["entry_len"] = len(conn.reader)
        t0 = time.monotonic()
        data = conn.reader.next(10).tobytes()
        out["waited"] = time.monotonic() - t0
        conn.writer.write_binary(data)
        conn.writer.flush()

    srv = make_server(handler, runner=runner, read_timeout=10.0)
    s = srv.connect()
    s.sendall(b"01234")
    time.sleep(0.3)
    s.sendall(b"56789")
    assert recv_exact(s, 10) == b"0123456789"
    assert out["entry_len"] == 5
    assert out["waited"] >= 0.2, out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_reader_methods_on_a_connection(make_server, runner):
    """read_byte, read_string, skip, peek, next, until, slice (outliving
    release), read_binary and len(reader), with the input split in two."""
    def handler(ctx, conn):
        r = conn.reader
        res = {}
        res["byte"] = r.read_byte()
        (n,) = HDR.unpack(r.next(4))
        res["string"] = r.read_string(n)
        r.skip(4)
        res["peek"] = r.peek(5).tobytes().decode()
        res["next"] = r.next(5).tobytes().decode()
        res["line"] = r.until(b"\n").tobytes().decode()
        sl = r.slice(6)
        r.release()
        res["slice"] = sl.read_binary(6).decode()
        res["binary"] = r.read_binary(3).decode()
        res["left"] = len(r)
        reply = json.dumps(res).encode()
        conn.writer.write_binary(HDR.pack(len(reply)) + reply)
        conn.writer.flush()

    srv = make_server(handler, runner=runner, read_timeout=10.0)
    s = srv.connect()
    text = "héllo wörld"
    payload = (b"\x07" + frame(text.encode()) + b"SKIP" + b"PEEK!" + b"line one\n"
               + b"SLICE1" + b"end")
    cut = payload.index(b"one")           # in the middle of the line
    s.sendall(payload[:cut])
    time.sleep(0.1)
    s.sendall(payload[cut:])
    res = json.loads(read_frame(s))
    assert res == {"byte": 7, "string": text, "peek": "PEEK!", "next": "PEEK!",
                   "line": "line one\n", "slice": "SLICE1", "binary": "end", "left": 0}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_peer_closed_with_fewer_than_n_bytes(make_server, runner):
    out = {}
    done = threading.Event()

    def handler(ctx, conn):
        r = conn.reader
        try:
            r.next(100)
        except Exception as e:
            out["exc"] = e
            out["buffered"] = len(r)
            out["peek"] = r.peek(len(r)).tobytes()
        done.set()

    srv = make_server(handler, runner=runner, read_timeout=10.0)
    s = srv.connect()
    s.sendall(b"0123456789")
    s.close()
    assert done.wait(5)
    e = out["exc"]
    assert isinstance(e, netpoll.PeerClosedError), repr(e)
    assert isinstance(e, netpoll.ConnectionClosedError)
    assert isinstance(e, EOFError) and isinstance(e, netpoll.NetpollError)
    assert out["buffered"] == 10            # the failed read consumed nothing
    assert out["peek"] == b"0123456789"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("style", ["blocking", "streaming"])
@pytest.mark.parametrize("runner", RUNNERS)
def test_bytes_sent_just_before_peer_close_are_delivered(make_server, runner, style, network):
    N = 1_000_000
    data = os.urandom(N)
    out = {}
    done = threading.Event()
    h = hashlib.sha256()
    count = [0]

    def blocking(ctx, conn):
        if "digest" in out:
            out["extra"] = len(conn.reader)
            return
        out["digest"] = hashlib.sha256(conn.reader.next(N)).hexdigest()
        out["count"] = N
        done.set()

    def streaming(ctx, conn):
        r = conn.reader
        n = len(r)
        h.update(r.next(n))
        count[0] += n

    def on_disconnect(ctx, conn):
        if style == "streaming":
            out["digest"] = h.hexdigest()
            out["count"] = count[0]
            done.set()

    srv = make_server(blocking if style == "blocking" else streaming, network,
                      runner=runner, read_timeout=20.0, on_disconnect=on_disconnect)
    s = srv.connect()
    s.sendall(data)
    s.close()
    assert done.wait(20), out
    assert out["count"] == N
    assert out["digest"] == hashlib.sha256(data).hexdigest()
    assert "extra" not in out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_reads_and_writes_after_own_close_raise_connection_closed(make_server, runner):
    out = {}
    done = threading.Event()

    def handler(ctx, conn):
        conn.close()
        for name, op in [("next", lambda: conn.reader.next(1)),
                         ("next_more", lambda: conn.reader.next(1000)),
                         ("write", lambda: (conn.writer.write_binary(b"x"), conn.writer.flush()))]:
            try:
                op()
                out[name] = "no error"
            except Exception as e:
                out[name] = e
        out["active"] = conn.is_active()
        done.set()

    srv = make_server(handler, runner=runner, read_timeout=5.0)
    s = srv.connect()
    s.sendall(b"hello")
    assert done.wait(5)
    for name in ("next", "next_more", "write"):
        e = out[name]
        assert isinstance(e, netpoll.ConnectionClosedError), (name, e)
        assert not isinstance(e, netpoll.PeerClosedError), (name, e)
    assert out["active"] is False
    assert sees_eof(s)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_close_from_another_thread_wakes_a_blocked_read(make_server, runner):
    """close(): "Blocked reads and flushes wake with ConnectionClosedError" --
    on inline too (there the handler polls the socket itself; the read timeout
    of 3 s only bounds the damage if it is not woken)."""
    out = {}
    entered = threading.Event()
    done = threading.Event()
    holder = {}

    def handler(ctx, conn):
        holder["conn"] = conn
        entered.set()
        try:
            conn.reader.next(100)
        except Exception as e:
            out["exc"] = e
            out["t"] = time.monotonic()
        done.set()

    srv = make_server(handler, runner=runner, read_timeout=3.0)
    s = srv.connect()
    s.sendall(b"short")
    assert entered.wait(5)
    time.sleep(0.1)
    t0 = time.monotonic()
    holder["conn"].close()
    assert done.wait(5)
    assert isinstance(out["exc"], netpoll.ConnectionClosedError), out
    assert not isinstance(out["exc"], netpoll.PeerClosedError)
    assert out["t"] - t0 < 1.0, f"the blocked read woke {out['t'] - t0:.2f} s after close()"
    assert sees_eof(s)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_peer_reset_while_a_handler_waits_raises_peer_closed(make_server, runner):
    out = {}
    done = threading.Event()

    def handler(ctx, conn):
        try:
            conn.reader.next(100)
        except Exception as e:
            out["exc"] = e
        done.set()

    srv = make_server(handler, runner=runner, read_timeout=5.0)
    s = srv.connect()
    s.sendall(b"0123456789")
    time.sleep(0.1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()                             # RST
    assert done.wait(5)
    assert isinstance(out["exc"], netpoll.PeerClosedError), out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["on_request", "on_connect"])
@pytest.mark.parametrize("runner", RUNNERS)
def test_a_raising_callback_closes_only_its_connection(make_server, runner, where):
    def on_request(ctx, conn):
        data = conn.reader.next(len(conn.reader)).tobytes()
        if data == b"boom":
            raise ValueError("handler failure (expected by the test)")
        conn.writer.write_binary(data)
        conn.writer.flush()

    def on_connect(ctx, conn):
        if where == "on_connect" and ctx == "first":
            raise ValueError("on_connect failure (expected by the test)")
        return ctx

    n = [0]

    def on_prepare(conn):
        n[0] += 1
        return "first" if n[0] == 1 else "later"

    srv = make_server(on_request, runner=runner, on_prepare=on_prepare, on_connect=on_connect)
    bad = srv.connect()
    assert wait_until(lambda: n[0] == 1, 5)
    good = srv.connect()
    bad.sendall(b"boom" if where == "on_request" else b"hello")
    assert sees_eof(bad), "the failing connection was not closed"
    good.sendall(b"fine")
    assert recv_exact(good, 4) == b"fine"


# ======================================================================
# large flushes
# ======================================================================

BIG = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def big_payload():
    return os.urandom(1024 * 1024) * (BIG // (1024 * 1024))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("network", NETWORKS)
def test_large_flush_blocks_until_a_slow_reader_has_it(make_server, network, big_payload):
    out = {}
    flushed = threading.Event()

    def handler(ctx, conn):
        conn.reader.skip(len(conn.reader))
        conn.writer.write_binary(big_payload)
        try:
            conn.writer.flush()
            out["ok"] = True
        except Exception as e:
            out["exc"] = e
        out["t"] = time.monotonic()
        flushed.set()

    srv = make_server(handler, network, runner="pool")
    s = srv.connect(timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(b"go")
    time.sleep(0.5)
    assert not flushed.is_set(), "flush returned before the client read anything"
    t_read = time.monotonic()
    h = hashlib.sha256()
    got = 0
    buf = bytearray(256 * 1024)
    while got < BIG:
        k = s.recv_into(buf)
        assert k > 0, f"EOF after {got} bytes"
        h.update(memoryview(buf)[:k])
        got += k
    assert flushed.wait(10)
    assert out.get("ok"), out
    assert out["t"] > t_read
    assert h.digest() == hashlib.sha256(big_payload).digest()


@pytest.mark.timeout(30)
def test_close_from_another_thread_unblocks_a_blocked_flush(make_server, big_payload):
    out = {}
    entered = threading.Event()
    done = threading.Event()
    holder = {}

    def handler(ctx, conn):
        holder["conn"] = conn
        conn.reader.skip(len(conn.reader))
        conn.writer.write_binary(big_payload)
        entered.set()
        try:
            conn.writer.flush()
            out["exc"] = None
        except Exception as e:
            out["exc"] = e
        out["t"] = time.monotonic()
        done.set()

    srv = make_server(handler, runner="pool")
    s = srv.connect()
    s.sendall(b"go")                      # and never read
    assert entered.wait(5)
    time.sleep(0.3)
    assert not done.is_set(), "flush of 64 MB returned to a client that never reads"
    t0 = time.monotonic()
    holder["conn"].close()
    assert done.wait(3), "close() did not wake the blocked flush"
    assert isinstance(out["exc"], netpoll.ConnectionClosedError), out
    assert out["t"] - t0 < 1.0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_close_right_after_flush_still_delivers_the_output(make_server, runner):
    size = 8 * 1024 * 1024
    payload = os.urandom(size)

    def handler(ctx, conn):
        conn.reader.skip(len(conn.reader))
        conn.writer.write_binary(payload)
        conn.writer.flush()
        conn.close()

    srv = make_server(handler, runner=runner)
    s = srv.connect()
    s.sendall(b"go")
    time.sleep(0.2)                       # the client reads late
    assert recv_exact(s, size) == payload
    assert sees_eof(s)


@pytest.mark.timeout(30)
def test_inline_flush_queues_and_the_poller_sends_it(make_server):
    size = 16 * 1024 * 1024
    payload = os.urandom(size)
    returned = threading.Event()

    def handler(ctx, conn):
        conn.reader.skip(len(conn.reader))
        conn.writer.write_binary(payload)
        conn.writer.flush()               # inline, no output limit: queues and returns
        returned.set()

    srv = make_server(handler, runner="inline", output_limit=None)
    s = srv.connect()
    s.sendall(b"go")
    assert returned.wait(3), "an inline flush blocked until the peer read"
    assert recv_exact(s, size) == payload


# ======================================================================
# callbacks: order, ctx, on_prepare closing, on_disconnect, close callbacks
# ======================================================================

@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", ALL_RUNNERS)
def test_callback_order_and_ctx_flow(make_server, runner):
    ev = Recorder()
    disc = threading.Event()
    conns = set()

    def on_prepare(conn):
        conns.add(id(conn))
        ev.add("prepare", None)
        return "from-prepare"

    def on_connect(ctx, conn):
        conns.add(id(conn))
        ev.add("connect-start", ctx)
        time.sleep(0.15)                  # data arrives meanwhile
        ev.add("connect-end", ctx)
        return "from-connect"

    def on_request(ctx, conn):
        conns.add(id(conn))
        ev.add("request", ctx)
        stream_echo(ctx, conn)

    def on_disconnect(ctx, conn):
        conns.add(id(conn))
        ev.add("disconnect", ctx)
        disc.set()

    srv = make_server(on_request, runner=runner, on_prepare=on_prepare,
                      on_connect=on_connect, on_disconnect=on_disconnect)
    s = srv.connect()
    s.sendall(b"hi")
    assert recv_exact(s, 2) == b"hi"
    s.sendall(b"again")
    assert recv_exact(s, 5) == b"again"
    s.close()
    assert disc.wait(5)
    time.sleep(0.2)                       # nothing more may happen
    items = ev.snapshot()
    names = [n for n, _ in items]
    assert names[:3] == ["prepare", "connect-start", "connect-end"], items
    assert items[1][1] == "from-prepare" and items[2][1] == "from-prepare"
    assert names[-1] == "disconnect" and names.count("disconnect") == 1, items
    middle = items[3:-1]
    assert middle and all(n == "request" and c == "from-connect" for n, c in middle), items
    assert items[-1][1] == "from-connect"
    assert len(conns) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_ctx_is_none_without_prepare_and_connect(make_server, runner):
    seen = Recorder()
    disc = threading.Event()

    def on_request(ctx, conn):
        seen.add("request", ctx)
        stream_echo(ctx, conn)

    def on_disconnect(ctx, conn):
        seen.add("disconnect", ctx)
        disc.set()

    srv = make_server(on_request, runner=runner, on_disconnect=on_disconnect)
    s = srv.connect()
    s.sendall(b"x")
    assert recv_exact(s, 1) == b"x"
    s.close()
    assert disc.wait(5)
    assert all(c is None for _, c in seen.snapshot())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_on_prepare_may_close_the_connection(make_server, runner):
    calls = Recorder()
    prepared = threading.Event()
    cb = threading.Event()

    def on_prepare(conn):
        conn.add_close_callback(lambda c: cb.set())
        conn.close()
        prepared.set()
        return "ctx"

    srv = make_server(lambda ctx, conn: calls.add("request"), runner=runner,
                      on_prepare=on_prepare,
                      on_connect=lambda ctx, conn: calls.add("connect"),
                      on_disconnect=lambda ctx, conn: calls.add("disconnect"))
    s = srv.connect()
    s.sendall(b"hello")
    assert prepared.wait(5)
    assert sees_eof(s)
    assert cb.wait(2)
    assert wait_until(lambda: srv.loop.connections == 0, 2)
    time.sleep(0.2)
    assert calls.snapshot() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_on_disconnect_once_when_the_peer_closes(make_server, runner):
    calls = Recorder()
    disc = threading.Event()

    def on_disconnect(ctx, conn):
        calls.add("disconnect")
        disc.set()

    srv = make_server(stream_echo, runner=runner, on_connect=lambda ctx, c: "c",
                      on_disconnect=on_disconnect)
    # a peer that talked, then closed
    s = srv.connect()
    s.sendall(b"abc")
    assert recv_exact(s, 3) == b"abc"
    s.close()
    assert disc.wait(5)
    # a peer that sends only a FIN, never any data
    disc.clear()
    s2 = srv.connect()
    s2.shutdown(socket.SHUT_WR)
    assert disc.wait(5)
    assert sees_eof(s2)                   # and the library closed its side
    time.sleep(0.3)
    assert calls.snapshot() == ["disconnect", "disconnect"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_on_disconnect_not_called_when_we_close(make_server, runner):
    calls = Recorder()
    closed = threading.Event()
    holder = {}

    def on_request(ctx, conn):
        holder["conn"] = conn
        conn.add_close_callback(lambda c: closed.set())
        stream_echo(ctx, conn)
        conn.close()

    srv = make_server(on_request, runner=runner, on_connect=lambda ctx, c: "c",
                      on_disconnect=lambda ctx, conn: calls.add("disconnect"))
    s = srv.connect()
    s.sendall(b"bye")
    assert recv_exact(s, 3) == b"bye"
    assert sees_eof(s)
    s.close()
    assert closed.wait(5)
    assert wait_until(lambda: holder["conn"].fileno() == -1, 3)
    time.sleep(0.3)
    assert calls.snapshot() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_on_disconnect_only_after_on_connect_returned(make_server, runner):
    """The peer sends and leaves while on_connect is still running: on_request
    and on_disconnect wait for it; on_disconnect runs once, last."""
    ev = Recorder()
    release = threading.Event()
    started = threading.Event()
    disc = threading.Event()

    def on_connect(ctx, conn):
        ev.add("connect-start")
        started.set()
        release.wait(5)
        ev.add("connect-end")
        return "c"

    def on_disconnect(ctx, conn):
        ev.add("disconnect")
        disc.set()

    def on_request(ctx, conn):
        ev.add("request")
        conn.reader.skip(len(conn.reader))

    srv = make_server(on_request, runner=runner, on_connect=on_connect,
                      on_disconnect=on_disconnect)
    s = srv.connect()
    assert started.wait(5)
    s.sendall(b"data")
    s.close()
    time.sleep(0.2)
    assert ev.snapshot() == ["connect-start"]
    release.set()
    assert disc.wait(5)
    time.sleep(0.2)
    names = ev.snapshot()
    assert names[:2] == ["connect-start", "connect-end"], names
    assert names[-1] == "disconnect" and names.count("disconnect") == 1, names
    assert set(names[2:-1]) <= {"request"}


def _socket_inode(fd):
    try:
        return os.stat(f"/proc/self/fd/{fd}").st_ino
    except FileNotFoundError:
        return None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_close_callbacks_newest_first_once_then_fd_closed(make_server, runner):
    calls = Recorder()
    late = Recorder()
    done = threading.Event()
    info = {}

    def on_request(ctx, conn):
        fd = conn.fileno()
        info.update(conn=conn, fd=fd, ino=_socket_inode(fd))
        for name in ("a", "b", "c"):
            conn.add_close_callback(
                lambda c, name=name: calls.add(name, c is conn, c.fileno(), _socket_inode(fd)))
            if name == "b":
                conn.add_close_callback(lambda c: c.close())   # re-entrant close: no-op
        conn.writer.write_binary(b"bye")
        conn.writer.flush()
        conn.close()
        conn.close()                      # idempotent
        conn.add_close_callback(lambda c: late.add("late"))   # already closed: at once
        info["late_at_once"] = late.snapshot() == ["late"]
        done.set()

    srv = make_server(on_request, runner=runner)
    s = srv.connect()
    s.sendall(b"x")
    assert done.wait(5)
    assert recv_exact(s, 3) == b"bye"
    assert sees_eof(s)
    fd, ino, conn = info["fd"], info["ino"], info["conn"]
    got = calls.snapshot()
    assert [g[0] for g in got] == ["c", "b", "a"], got
    for _name, same, fileno, inode in got:
        assert same, "callback got another object than the connection"
        assert fileno == fd and inode == ino, "fd closed before a close callback ran"
    assert info["late_at_once"]
    assert wait_until(lambda: conn.fileno() == -1, 5), "fileno() never became -1"
    assert wait_until(lambda: _socket_inode(fd) != ino, 5), "the socket fd stayed open"
    conn.close()
    assert [g[0] for g in calls.snapshot()] == ["c", "b", "a"]
    assert late.snapshot() == ["late"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("runner", RUNNERS)
def test_close_callbacks_run_once_when_the_peer_closes(make_server, runner):
    calls = Recorder()
    holder = {}

    def on_connect(ctx, conn):
        holder["conn"] = conn
        conn.add_close_callback(lambda c: calls.add("first"))
        conn.add_close_callback(lambda c: calls.add("second"))
        return ctx

    srv = make_server(stream_echo, runner=runner, on_connect=on_connect)
    s = srv.connect()
    s.sendall(b"x")
    assert recv_exact(s, 1) == b"x"
    s.close()
    assert wait_until(lambda: len(calls.snapshot()) == 2, 5)
    assert wait_until(lambda: holder["conn"].fileno() == -1, 5)
    holder["conn"].close()
    time.sleep(0.1)
    assert calls.snapshot() == ["second", "first"]
    assert not holder["conn"].is_active()


# ======================================================================
# graceful shutdown
# ======================================================================

@pytest.mark.timeout(30)
@pytest.mark.parametrize("network", NETWORKS)
def test_graceful_shutdown(make_server, network):
    entered = threading.Event()
    times = {}

    def handler(ctx, conn):
        data = conn.reader.next(len(conn.reader)).tobytes()
        if data == b"slow":
            entered.set()
            time.sleep(0.3)
            times["handler_done"] = time.monotonic()
            data = b"done"
        conn.writer.write_binary(data)
        conn.writer.flush()

    srv = make_server(handler, network, runner="pool")
    idle = srv.connect()
    idle.sendall(b"ping")
    assert recv_exact(idle, 4) == b"ping"
    busy = srv.connect()
    busy.sendall(b"slow")
    assert entered.wait(5)
    res = {}

    def do_shutdown():
        try:
            res["ret"] = srv.loop.shutdown(timeout=5.0)
        except BaseException as e:
            res["exc"] = e
        times["shutdown_done"] = time.monotonic()

    th = threading.Thread(target=do_shutdown)
    th.start()
    assert wait_until(lambda: srv.listener.closed, 2)
    # no new connections once shutdown has started
    late = socket.socket(srv.family, socket.SOCK_STREAM)
    late.settimeout(3)
    try:
        late.connect(srv.sockaddr)
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    else:
        late.sendall(b"ping")
        assert sees_eof(late), "a connection made during shutdown was served"
    finally:
        late.close()
    # the running handler finishes and its reply arrives; then the conn closes
    assert recv_exact(busy, 4) == b"done"
    assert sees_eof(busy)
    assert sees_eof(idle)
    th.join(10)
    assert not th.is_alive()
    assert "exc" not in res, res
    assert res["ret"] is None
    assert times["shutdown_done"] >= times["handler_done"]
    assert srv.serve_returned(5)
    assert srv.serve_error is None and srv.serve_result is None
    assert srv.loop.connections == 0
    if network == "unix":
        assert not os.path.exists(srv.addr), "the Unix socket file was left behind"
    fresh = netpoll.create_listener("tcp", "127.0.0.1:0")
    try:
        with pytest.raises(RuntimeError):
            srv.loop.serve(fresh)         # a shut-down loop does not serve again
    finally:
        fresh.close()
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        c = socket.socket(srv.family, socket.SOCK_STREAM)
        try:
            c.settimeout(3)
            c.connect(srv.sockaddr)
        finally:
            c.close()


# ======================================================================
# half-close
# ======================================================================

@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [100, 8 * 1024 * 1024], ids=["small", "8MB"])
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("runner", RUNNERS)
def test_peer_half_close_while_handler_runs_reply_still_delivered(
        make_server, runner, network, size):
    reply = os.urandom(size)
    disc = threading.Event()

    def handler(ctx, conn):
        r = conn.reader
        if len(r) < 4:
            return
        (n,) = HDR.unpack(r.peek(4))
        if len(r) < 4 + n:
            return
        r.skip(4 + n)
        if runner == "pool":
            time.sleep(0.2)               # the FIN arrives while we run
        conn.writer.write_binary(frame(reply))
        conn.writer.flush()

    srv = make_server(handler, network, runner=runner,
                      on_disconnect=lambda ctx, c: disc.set())
    s = srv.connect(timeout=20)
    s.sendall(frame(b"request"))
    s.shutdown(socket.SHUT_WR)
    assert read_frame(s) == reply
    assert sees_eof(s, 5), "the library did not close after the half-closed peer's reply"
    assert disc.wait(5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runner", RUNNERS)
def test_server_shutdown_write_after_pending_output_then_keeps_reading(make_server, runner):
    """shutdown_write() right after a large flush: the FIN follows all the data
    (on inline the flush is still queued when shutdown_write() is called), and
    the server keeps reading what the client sends afterwards."""
    size = 8 * 1024 * 1024
    reply = os.urandom(size)
    got = Recorder()
    after = threading.Event()
    disc = threading.Event()

    def handler(ctx, conn):
        data = conn.reader.next(len(conn.reader)).tobytes()
        got.add(data)
        if data == b"go":
            conn.writer.write_binary(reply)
            conn.writer.flush()
            conn.shutdown_write()
            got.add("active=%s" % conn.is_active())
        elif data == b"after":
            after.set()

    srv = make_server(handler, runner=runner, on_disconnect=lambda ctx, c: disc.set())
    s = srv.connect(timeout=20)
    s.sendall(b"go")
    assert recv_exact(s, size) == reply
    assert sees_eof(s), "no FIN after shutdown_write()"
    s.sendall(b"after")
    assert after.wait(5), got.snapshot()
    assert got.snapshot()[1] == "active=True"
    s.close()
    assert disc.wait(5)


# ======================================================================
# backpressure: input limit, pause/resume
# ======================================================================

FLOOD = 32 * 1024 * 1024
CHUNK = 64 * 1024


class Flooder:
    """Sends FLOOD bytes from a thread, counting what the kernel took."""

    def __init__(self, sock):
        block = os.urandom(1024 * 1024)
        self.data = block * (FLOOD // len(block))
        self.crc = zlib.crc32(self.data)
        self.sock = sock
        self.sent = 0
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        view = memoryview(self.data)
        try:
            while self.sent < len(self.data):
                self.sock.sendall(view[self.sent:self.sent + CHUNK])
                self.sent += len(view[self.sent:self.sent + CHUNK])
        except BaseException as e:
            self.error = e


class Consumer:
    """An on_request that consumes everything, checksumming it."""

    def __init__(self, total):
        self.total = total
        self.crc = 0
        self.count = 0
        self.done = threading.Event()

    def __call__(self, ctx, conn):
        r = conn.reader
        n = len(r)
        if n:
            self.crc = zlib.crc32(r.next(n), self.crc)
            self.count += n
        if self.count >= self.total:
            self.done.set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["loop", "conn"])
@pytest.mark.parametrize("runner", RUNNERS)
def test_input_limit_stops_reading_and_bounds_memory(make_server, runner, how):
    LIMIT = 256 * 1024
    holder = {}
    got = threading.Event()

    def hoard(ctx, conn):                 # consumes nothing
        holder["conn"] = conn
        got.set()

    kw = {"input_limit": LIMIT} if how == "loop" else {
        "on_connect": lambda ctx, c: c.set_input_limit(LIMIT)}
    srv = make_server(hoard, runner=runner, **kw)
    s = srv.connect(timeout=30)
    fl = Flooder(s)
    assert got.wait(5)
    conn = holder["conn"]
    max_len = 0
    sent_mid = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.2:
        max_len = max(max_len, len(conn.reader))
        if sent_mid is None and time.monotonic() - t0 >= 0.8:
            sent_mid = fl.sent
        time.sleep(0.005)
    print(f"input limit {LIMIT}: max buffered {max_len}, client sent {fl.sent} of {FLOOD}")
    assert fl.thread.is_alive() and fl.sent < FLOOD, "the flooding client was never pushed back"
    assert fl.sent == sent_mid, "the client kept sending: the poller still reads"
    assert max_len >= LIMIT - CHUNK
    assert max_len < LIMIT + 4 * 65536, max_len
    consumer = Consumer(FLOOD)
    conn.set_on_request(consumer)
    fl.thread.join(30)
    assert fl.error is None and fl.sent == FLOOD
    assert consumer.done.wait(30), consumer.count
    assert consumer.count == FLOOD and consumer.crc == fl.crc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runner", RUNNERS)
def test_pause_read_and_resume_read(make_server, runner):
    holder = {}
    paused = threading.Event()
    consumer = Consumer(FLOOD)

    def handler(ctx, conn):
        if "conn" not in holder:
            holder["conn"] = conn
            conn.pause_read()
            holder["at_pause"] = consumer.count + len(conn.reader)
            paused.set()
        consumer(ctx, conn)

    srv = make_server(handler, runner=runner)
    s = srv.connect(timeout=30)
    fl = Flooder(s)
    assert paused.wait(5)
    conn = holder["conn"]
    time.sleep(0.5)
    c1, s1 = consumer.count, fl.sent
    time.sleep(0.5)
    print(f"paused: server consumed {consumer.count}, client sent {fl.sent} of {FLOOD}")
    assert consumer.count == c1, "bytes kept arriving while reading was paused"
    assert fl.sent == s1 and fl.thread.is_alive() and fl.sent < FLOOD
    # at most the read batch in progress when pause_read() was called
    assert consumer.count <= holder["at_pause"] + 4 * 1024 * 1024, holder["at_pause"]
    conn.resume_read()
    fl.thread.join(30)
    assert fl.error is None and fl.sent == FLOOD
    assert consumer.done.wait(30), consumer.count
    assert consumer.count == FLOOD and consumer.crc == fl.crc


def test_listener_over_a_unix_socket_made_elsewhere_reports_its_path(tmp_path) -> None:
    # Listener(sock, "unix") without unix_path: addr is the socket's path
    # (it used to be the path's first two characters, as for a (host, port)).
    path = str(tmp_path / "made-elsewhere.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    sock.setblocking(False)
    listener = netpoll.Listener(sock, "unix")
    try:
        assert listener.addr == path
        loop = netpoll.EventLoop(lambda ctx, conn: conn.write(bytes(conn.reader.next(1))))
        threading.Thread(target=loop.serve, args=(listener,), daemon=True).start()
        conn = netpoll.dial_connection("unix", listener.addr, timeout=2.0)
        conn.write(b"x")
        assert conn.reader.next(1) == b"x"
        conn.close()
        loop.shutdown(timeout=5.0)
    finally:
        listener.close()
