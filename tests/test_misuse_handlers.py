"""Handlers that misuse the library by mistake must not freeze anything
(issue 15): cross-poller writes from inline handlers, a peer trickling bytes
at a blocking read, shutdown() called from a handler, a custom runner that
raises. Scenarios that hung on the old code run in a subprocess with a
deadline, so a regression fails the test instead of hanging the suite."""
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
from netutil import RUNNERS, make_server, sees_eof, thread_runner  # noqa: F401

# The scripts import the same netpoll as these tests, wherever it lives.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (os.path.dirname(os.path.dirname(os.path.abspath(netpoll.__file__))),
                os.environ.get("PYTHONPATH")) if p))


def run_script(script: str, *args: str, timeout: float = 60) -> str:
    """Run `script` in a fresh interpreter; a hang fails as TimeoutExpired,
    a crash or a non-zero exit as an assertion. Returns its stdout."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                       capture_output=True, text=True, timeout=timeout, env=ENV)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


# ------------------------------------- item 3: inline writes across pollers

CROSS_POLLER = r"""
import os, socket, sys, threading, time
import netpoll

netpoll.configure(num_loops=2)
NCLIENTS, ROUNDS, PAYLOAD = 4, 12, 256 * 1024
limit = sys.argv[1]
kw = {} if limit == "default" else {"output_limit": int(limit)}
conns, lock, errors = [], threading.Lock(), []
blob = b"z" * PAYLOAD

def on_connect(ctx, conn):
    with lock:
        conns.append(conn)

def on_request(ctx, conn):
    # Every command byte: send a payload to every other client, most of them
    # owned by the other poller, which runs the same handler at the same time.
    n = len(conn.reader.next(len(conn.reader)))
    with lock:
        others = [c for c in conns if c is not conn]
    try:
        for _ in range(n):
            for other in others:
                other.write(blob)
    except Exception as e:
        errors.append(repr(e))
        raise

lst = netpoll.create_listener("unix", "/tmp/npt-cross-%d.sock" % os.getpid())
loop = netpoll.EventLoop(on_request, on_connect=on_connect, runner="inline", **kw)
threading.Thread(target=loop.serve, args=(lst,), daemon=True).start()

socks = []
for _ in range(NCLIENTS):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(lst.addr)
    socks.append(s)
t0 = time.monotonic()
while len(conns) < NCLIENTS:
    if time.monotonic() - t0 > 10:
        print("on_connect did not run"); os._exit(2)
    time.sleep(0.005)

want = ROUNDS * (NCLIENTS - 1) * PAYLOAD
got = [0] * NCLIENTS

def drain(i):
    s = socks[i]
    s.settimeout(20)
    try:
        while got[i] < want:
            k = len(s.recv(1 << 20))
            if k == 0:
                return
            got[i] += k
    except OSError:
        return

readers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(NCLIENTS)]
for r in readers:
    r.start()
# Both directions at once, in many rounds: every client asks in every round.
for _ in range(ROUNDS):
    for s in socks:
        s.sendall(b"g")
for r in readers:
    r.join(30)
if any(g != want for g in got) or errors:
    print("STUCK", got, want, errors, flush=True)
    os._exit(3)
for s in socks:
    s.close()
loop.shutdown(5)
lst.close()
print("OK", flush=True)
"""


@pytest.mark.parametrize("output_limit", ["default", "0"])
def test_inline_handlers_writing_across_two_pollers_do_not_deadlock(output_limit):
    # Each poller's handler flushes to connections of the other poller while
    # that one does the same; before the fix each waited for the other to
    # send and both froze forever.
    assert run_script(CROSS_POLLER, output_limit, timeout=60).strip() == "OK"


# ------------------------------------ item 4: one read timeout per call

TRICKLE_TIMEOUT = 0.5


def _trickle(sock: socket.socket, stop: threading.Event, byte: bytes = b"a",
             every: float = 0.1, for_s: float = 4.0) -> threading.Thread:
    """Send one byte every `every` seconds until `stop` or `for_s` pass."""
    def run() -> None:
        end = time.monotonic() + for_s
        while not stop.is_set() and time.monotonic() < end:
            try:
                sock.send(byte)
            except OSError:
                return
            stop.wait(every)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


READS = {
    "until": lambda r: r.until(b"\n"),
    "until_int": lambda r: r.until(10),
    "next": lambda r: r.next(1000),
    "peek": lambda r: r.peek(1000),
    "read_binary": lambda r: r.read_binary(1000),
    "read_string": lambda r: r.read_string(1000),
    "slice": lambda r: r.slice(1000),
    "skip": lambda r: r.skip(1000),
}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("method", sorted(READS))
def test_read_timeout_bounds_the_whole_call_on_a_trickle(make_server, runner, method):
    # A peer sends one byte per 100 ms and never what the read waits for:
    # the read must fail once the read timeout has passed since the call,
    # not since the last byte (it used to wait as long as the trickle lasted,
    # freezing an inline poller with it).
    outcome: dict = {}
    done = threading.Event()

    def on_request(ctx, conn):
        if done.is_set():
            return
        t0 = time.monotonic()
        try:
            READS[method](conn.reader)
            outcome["result"] = "returned"
        except Exception as e:
            outcome["result"] = type(e).__name__
        outcome["elapsed"] = time.monotonic() - t0
        done.set()

    srv = make_server(on_request, runner=runner, read_timeout=TRICKLE_TIMEOUT)
    c = srv.connect()
    stop = threading.Event()
    t = _trickle(c, stop)
    try:
        assert done.wait(10), "the read never ended"
    finally:
        stop.set()
        t.join(5)
    assert outcome["result"] == "ReadTimeoutError", outcome
    # Bounded by the timeout, with slack for a loaded machine; the old code
    # took the whole 4 s trickle plus the timeout.
    assert TRICKLE_TIMEOUT * 0.9 <= outcome["elapsed"] < TRICKLE_TIMEOUT + 1.2, outcome


@pytest.mark.parametrize("runner", RUNNERS)
def test_until_still_finds_a_delimiter_that_arrives_in_time(make_server, runner):
    # The deadline is per call: bytes trickling in within it are all kept.
    got: list = []
    done = threading.Event()

    def on_request(ctx, conn):
        if not done.is_set():
            got.append(bytes(conn.reader.until(b"\n")))
            done.set()

    srv = make_server(on_request, runner=runner, read_timeout=2.0)
    c = srv.connect()
    for b in b"abc\n":
        c.send(bytes([b]))
        time.sleep(0.05)
    assert done.wait(5)
    assert got == [b"abc\n"]


def test_until_on_a_dialed_connection_is_bounded(make_server):
    # A client connection read from an ordinary thread (the condition-wait
    # path); the server trickles to it.
    stop = threading.Event()

    def on_connect(ctx, conn):
        def trickle() -> None:
            end = time.monotonic() + 4.0     # bounded even if the read is not
            while not stop.is_set() and time.monotonic() < end:
                try:
                    conn.write(b"a")
                except Exception:        # closed at teardown
                    return
                stop.wait(0.1)
        threading.Thread(target=trickle, daemon=True).start()
        return ctx

    srv = make_server(lambda ctx, conn: None, on_connect=on_connect)
    conn = srv.dial(read_timeout=TRICKLE_TIMEOUT)
    t0 = time.monotonic()
    try:
        with pytest.raises(netpoll.ReadTimeoutError):
            conn.reader.until(b"\n")
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
    assert elapsed < TRICKLE_TIMEOUT + 1.2, elapsed
    assert len(conn.reader) >= 2           # what trickled in stays buffered


# ------------------------------------------- item 5: shutdown from a handler

SHUTDOWN_FROM_HANDLER = r"""
import os, socket, sys, threading, time
import netpoll

runner_name, hook = sys.argv[1], sys.argv[2]

def thread_runner(task):
    threading.Thread(target=task, daemon=True).start()

runner = thread_runner if runner_name == "thread" else runner_name
state = {"n": 0}
called = threading.Event()
after = {}

def call_shutdown(conn):
    t0 = time.monotonic()
    loop.shutdown(timeout=None)         # used to wait for this very handler
    after["elapsed"] = time.monotonic() - t0
    # The caller's connection stays usable until its handler returns.
    try:
        conn.write(b"after")
        after["write"] = "ok"
    except Exception as e:
        after["write"] = repr(e)
    called.set()

def on_prepare(conn):
    if hook == "on_prepare" and state["n"] == 1:
        call_shutdown(conn)
    return None

def on_connect(ctx, conn):
    state["n"] += 1
    if hook == "on_connect" and state["n"] == 2:
        call_shutdown(conn)
    return ctx

def on_request(ctx, conn):
    data = conn.reader.next(len(conn.reader))
    if hook == "on_request" and bytes(data) == b"stop":
        call_shutdown(conn)

def on_disconnect(ctx, conn):
    if hook == "on_disconnect":
        call_shutdown(conn)

lst = netpoll.create_listener("tcp", "127.0.0.1:0")
loop = netpoll.EventLoop(on_request, on_prepare=on_prepare, on_connect=on_connect,
                         on_disconnect=on_disconnect, runner=runner)
served = threading.Event()
def serve():
    loop.serve(lst)
    served.set()
threading.Thread(target=serve, daemon=True).start()

def connect():
    s = socket.create_connection(lst.addr[:2], timeout=10)
    return s

other = connect()                       # an idle connection shutdown must close
while state["n"] < 1:
    time.sleep(0.005)
me = connect()
if hook == "on_request":
    me.sendall(b"stop")
elif hook == "on_disconnect":
    while state["n"] < 2:
        time.sleep(0.005)
    me.close()
if not called.wait(10):
    print("handler's shutdown() did not return"); os._exit(3)
if after["elapsed"] > 1.0:
    print("shutdown() from a handler waited", after); os._exit(4)
if not served.wait(10):
    print("serve() did not return"); os._exit(5)
other.settimeout(5)
if other.recv(100) != b"":
    print("the other connection was not closed"); os._exit(6)
if hook == "on_disconnect":
    pass                                # the client closed `me` itself
elif hook == "on_prepare":
    me.settimeout(5)
    try:
        while me.recv(100):             # on_prepare: closed before it was served
            pass
    except OSError:
        pass
else:
    me.settimeout(5)
    data = b""
    while True:
        chunk = me.recv(100)
        if not chunk:
            break
        data += chunk
    if after["write"] != "ok" or data != b"after":
        print("the caller's connection", after, data); os._exit(7)
lst.close()
print("OK", flush=True)
"""


@pytest.mark.parametrize("runner", ["pool", "inline", "thread"])
@pytest.mark.parametrize("hook", ["on_prepare", "on_request", "on_connect", "on_disconnect"])
def test_shutdown_from_a_handler_returns_at_once(runner, hook):
    assert run_script(SHUTDOWN_FROM_HANDLER, runner, hook, timeout=40).strip() == "OK"


@pytest.mark.parametrize("runner", ["pool", thread_runner])
def test_shutdown_from_a_handler_still_bounds_the_other_handlers(make_server, runner):
    # shutdown(timeout) from a handler returns at once; a busy handler of
    # another connection is still cut off at the timeout, and serve() returns.
    release = threading.Event()
    busy = threading.Event()
    returned: dict = {}

    def on_request(ctx, conn):
        data = bytes(conn.reader.next(len(conn.reader)))
        if data == b"busy":
            busy.set()
            release.wait(10)
        elif data == b"stop":
            t0 = time.monotonic()
            srv.loop.shutdown(timeout=0.3)
            returned["elapsed"] = time.monotonic() - t0

    srv = make_server(on_request, runner=runner)
    a = srv.connect()
    a.sendall(b"busy")
    assert busy.wait(5)
    b = srv.connect()
    b.sendall(b"stop")
    try:
        assert srv.serve_returned(5), "serve() did not return"
        assert returned.get("elapsed", 99) < 1.0, returned
        assert sees_eof(a) and sees_eof(b)
    finally:
        release.set()


# -------------------------------------------- item 6: a runner that raises

def test_a_runner_that_raises_closes_the_connection(make_server):
    calls: list = []

    def bad_runner(task):
        calls.append(task)
        raise RuntimeError("runner is broken")

    srv = make_server(lambda ctx, conn: None, runner=bad_runner, idle_timeout=5.0)
    c = srv.connect()
    c.sendall(b"hello")
    # The task never ran: the connection used to stay marked running forever.
    assert sees_eof(c, 5.0), "the connection was left open"
    assert calls
    t0 = time.monotonic()
    srv.loop.shutdown(timeout=2.0)          # nothing left busy: returns at once
    assert time.monotonic() - t0 < 1.5
    assert srv.loop.connections == 0


# ----------------------- Python code re-entering the EventLoop's lock

REENTER = r"""
import os, socket, threading, time
import netpoll

lst = netpoll.create_listener("tcp", "127.0.0.1:0")
loop = netpoll.EventLoop(lambda ctx, conn: None)
threading.Thread(target=loop.serve, args=(lst,), daemon=True).start()
s = socket.create_connection(lst.addr[:2], timeout=5)
t0 = time.monotonic()
while loop.connections < 1:
    if time.monotonic() - t0 > 5:
        os._exit(2)
    time.sleep(0.005)
conn = next(iter(loop._conns))

class Conns(set):
    # Stands for a finalizer that the GC runs inside shutdown()'s locked
    # region (list(self._conns) allocates) and that closes a connection.
    def __iter__(self):
        conn.close()
        return iter(list(set.__iter__(self)))

loop._conns = Conns(loop._conns)
loop.shutdown(5)
lst.close()
print("OK", flush=True)
"""


def test_a_finalizer_closing_a_connection_inside_shutdown_does_not_deadlock():
    assert run_script(REENTER, timeout=30).strip() == "OK"
