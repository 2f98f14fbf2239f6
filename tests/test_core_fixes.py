"""Pins for three core defects found in review:

- a TLS connection's on_prepare (on a poller, before the handshake, before the
  connection is even registered) that flushed more than the output limit
  waited forever for a handshake only its own thread could drive; a blocking
  read there either hung (runner "auto", another poller) or ran the handshake
  outside its state machine;
- (the TLS read path locking the session once per read is a hot-path change
  kept identical in behaviour: tests/test_tls.py covers it);
- a cancel_timer() for a timer that had already finished left its id in the
  handler's cancelled set for ever.

Scenarios that hung run in a subprocess with a timeout, so a regression fails
the test instead of freezing the suite."""
from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import threading
from typing import Any, List

import pytest

import netpoll
from reactorutil import running, wait_until  # noqa: F401  (running is a fixture)
from tlsutil import certs  # noqa: F401  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, *args: str, timeout: float = 30.0) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                           text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the scenario hung (killed after {timeout} s); output: {e.stdout!r}")
    assert p.returncode == 0, f"rc={p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr[-3000:]}"
    return p.stdout


# ------------------------------------------------ TLS: on_prepare before the handshake

TLS_SERVER = r"""
import logging, os, socket, ssl, sys, threading
import netpoll
cert, key, ca, runner, loops = sys.argv[1:6]
if int(loops) > 1:
    netpoll.configure(num_loops=int(loops))
sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
sctx.load_cert_chain(cert, key)
cctx = ssl.create_default_context(cafile=ca)

def echo(ctx, conn):
    r = conn.reader
    conn.writer.write_binary(bytes(r.next(len(r))))
    conn.writer.flush()

def serve(**kw):
    ln = netpoll.create_listener("tcp", "127.0.0.1:0", ssl=sctx)
    loop = netpoll.EventLoop(echo, runner=runner, **kw)
    threading.Thread(target=loop.serve, args=(ln,), daemon=True).start()
    return ln, loop

def connect(ln):
    s = socket.create_connection(ln.addr[:2], timeout=10)
    return cctx.wrap_socket(s, server_hostname="127.0.0.1")
"""

FLUSH_IN_ON_PREPARE = TLS_SERVER + r"""
# 300 kB (far above the socket buffers and the 1 KiB output limit) in three
# flushes: below the limit, far above it, and one more after it.
payload = os.urandom(300_000)
cuts = [0, 500, 290_000, len(payload)]
results = []

def on_prepare(conn):
    for a, b in zip(cuts, cuts[1:]):
        conn.writer.write_binary(payload[a:b])
        conn.writer.flush()
    results.append("returned")

ln, loop = serve(on_prepare=on_prepare, output_limit=1024)
s = connect(ln)
got = bytearray()
while len(got) < len(payload):
    b = s.recv(65536)
    assert b, f"EOF after {len(got)} bytes"
    got += b
assert bytes(got) == payload, "the bytes flushed before the handshake arrived changed"
assert results == ["returned"]
s.sendall(b"ping")                      # and the connection works on as usual
assert s.recv(4) == b"ping"
s.close()
loop.shutdown()
print("OK")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("runner,loops", [("inline", 1), ("pool", 1), ("auto", 1),
                                          ("inline", 2)])
def test_tls_on_prepare_flush_above_output_limit_arrives_after_handshake(
        certs, runner, loops):
    """on_prepare runs on a poller before the TLS handshake, which that
    poller drives only once on_prepare returns: a flush above the output
    limit used to spin in _write_direct for ever. Now it leaves the bytes
    queued and returns; the handshake's end sends them, whole and in order,
    before anything written later."""
    out = run_script(FLUSH_IN_ON_PREPARE, certs.server_cert_pem, certs.server_key_pem,
                     certs.ca_pem, runner, str(loops))
    assert out.strip() == "OK"


READ_IN_ON_PREPARE = TLS_SERVER + r"""
seen = []
done = threading.Event()

def on_prepare(conn):
    try:
        seen.append(bytes(conn.reader.next(4)))
    except BaseException as e:
        seen.append(e)
        raise
    finally:
        done.set()

logging.getLogger("netpoll").setLevel(logging.CRITICAL)   # on_prepare raises on purpose
ln, loop = serve(on_prepare=on_prepare)
raw = socket.create_connection(ln.addr[:2], timeout=10)
try:
    s = cctx.wrap_socket(raw, server_hostname="127.0.0.1")
    s.sendall(b"abcd")
    closed = s.recv(10) == b""
except (OSError, ssl.SSLError):
    closed = True                       # reset or torn down mid-handshake: closed too
assert done.wait(10), "on_prepare never returned"
assert len(seen) == 1 and isinstance(seen[0], RuntimeError), seen
assert "handshake" in str(seen[0]), seen
assert closed, "the connection stayed open after on_prepare raised"
loop.shutdown()
print("OK")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("runner,loops", [("inline", 1), ("auto", 1), ("inline", 2)])
def test_tls_blocking_read_in_on_prepare_raises_instead_of_hanging(certs, runner, loops):
    """A read that must wait, in on_prepare before the TLS handshake, can
    get nothing until the handshake ends, which waits for this thread: it
    raises RuntimeError at once (on_prepare raising closes the connection).
    It used to hang (runner "auto", or the connection on another poller), or
    to run the handshake inside SSL_read, behind the connection's back."""
    out = run_script(READ_IN_ON_PREPARE, certs.server_cert_pem, certs.server_key_pem,
                     certs.ca_pem, runner, str(loops))
    assert out.strip() == "OK"


# ------------------------------------------------ Reactor: late cancel_timer()

def cancelled_set(h: netpoll.EvHandler) -> set:
    """EvHandler._cancelled (a cdef attribute): the one set the handler
    itself refers to (its Python attributes live in its __dict__)."""
    sets = [o for o in gc.get_referents(h) if type(o) is set]
    assert len(sets) == 1, sets
    return sets[0]


class Timers(netpoll.EvHandler):
    def __init__(self) -> None:
        self.fired: List[int] = []
        self.lock = threading.Lock()
        self.on_poller: Any = None        # run by on_read, on the poller thread

    def on_timeout(self, tid: int, now: int) -> bool:
        with self.lock:
            self.fired.append(tid)
        return False

    def on_read(self) -> bool:
        self.read()
        job, self.on_poller = self.on_poller, None
        if job is not None:
            job(self)
        return True


def on_poller(h: Timers, peer: socket.socket, job: Any) -> None:
    """Run job(h) on h's poller thread (from on_read) and wait for it."""
    done = threading.Event()

    def run(hh: Timers) -> None:
        try:
            job(hh)
        finally:
            done.set()

    h.on_poller = run
    peer.send(b"x")
    assert done.wait(10)


def barrier(h: Timers) -> None:
    """Every request posted to h's poller so far has run (requests run in
    order: a timer scheduled from here fires after them)."""
    tid = h.schedule_timer(0)
    assert wait_until(lambda: tid in h.fired, 10)


@pytest.mark.timeout(60)
def test_late_cancels_leave_nothing_behind(running):
    """cancel_timer() for timers that already fired, from another thread and
    from the poller itself, used to leave every id in the handler's
    cancelled set (memory growing with each late cancel)."""
    r = running().reactor
    a, peer = socket.socketpair()
    h = Timers()
    r.add_ev_handler(h, a.detach(), netpoll.EV_IN)
    n = 3000
    ids = [h.schedule_timer(0) for _ in range(n)]
    assert wait_until(lambda: len(h.fired) == n, 20)
    assert cancelled_set(h) == set()

    def cancel_all() -> None:
        for tid in ids:
            h.cancel_timer(tid)

    threads = [threading.Thread(target=cancel_all) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    barrier(h)
    assert len(cancelled_set(h)) == 0, f"{len(cancelled_set(h))} ids kept after late cancels"

    on_poller(h, peer, lambda hh: [hh.cancel_timer(tid) for tid in ids])
    assert len(cancelled_set(h)) == 0, "late cancels on the poller kept their ids"
    assert sorted(h.fired[:n]) == sorted(ids)
    peer.close()


@pytest.mark.timeout(60)
def test_cancel_on_the_poller_before_a_queued_creation_still_wins(running):
    """The case the cancelled set exists for: a timer scheduled from another
    thread whose creation request is still queued when the poller cancels
    it must never fire; and nothing is left behind once it has been
    skipped."""
    r = running().reactor
    a, peer = socket.socketpair()
    h = Timers()
    r.add_ev_handler(h, a.detach(), netpoll.EV_IN)
    tids: List[int] = []

    def job(hh: Timers) -> None:
        # The poller is busy here, so the creation requests posted by this
        # other thread wait in its queue until the cancels below are done.
        t = threading.Thread(target=lambda: tids.extend(hh.schedule_timer(0)
                                                         for _ in range(50)))
        t.start()
        t.join()
        for tid in tids:
            hh.cancel_timer(tid)

    on_poller(h, peer, job)
    barrier(h)
    assert len(tids) == 50
    assert not set(tids) & set(h.fired), "a timer cancelled before its creation fired"
    assert cancelled_set(h) == set()
    peer.close()
