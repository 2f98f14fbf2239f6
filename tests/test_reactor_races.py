"""Cross-thread races of the Reactor: async_write completion callbacks racing
a close (exactly once, on the poller), and requests queued for a handler
that moves to another poller in on_open (they run on the new owner)."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import pytest

import netpoll
from reactorutil import running, wait_until  # noqa: F401


# The scripts import the same netpoll as these tests, wherever it lives.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (os.path.dirname(os.path.dirname(os.path.abspath(netpoll.__file__))),
                os.environ.get("PYTHONPATH")) if p))


def run_script(script: str, *args: str, timeout: float = 60) -> str:
    """Run `script` in a fresh interpreter (a crash or a hang fails the test
    instead of killing pytest); its stdout."""
    p = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                       timeout=timeout, env=ENV)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    return p.stdout


# ------------------------------------------------ async_write vs close

class Sink(netpoll.EvHandler):
    def __init__(self) -> None:
        self.closed_ev = threading.Event()

    def on_read(self) -> bool:
        return len(self.read()) > 0

    def on_close(self) -> None:
        self.closed_ev.set()


def _race_round(r: netpoll.Reactor, how: str, nthreads: int = 3) -> "tuple[int, int]":
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    h = Sink()
    r.add_ev_handler(h, a.detach(), netpoll.EV_IN)
    lock = threading.Lock()
    calls: dict = {}
    bad: list = []
    accepted: set = set()
    refused: set = set()
    start = threading.Barrier(nthreads + 1)

    def cb_for(key):
        def cb(err):
            with lock:
                calls[key] = calls.get(key, 0) + 1
            if not threading.current_thread().name.startswith("netpoll-poller"):
                bad.append(("thread", key, threading.current_thread().name))
            if err is not None and not isinstance(err, OSError):
                bad.append(("err", key, err))
        return cb

    def writer(t):
        start.wait()
        i = 0
        while True:
            key = (t, i)
            try:
                h.async_write(b"x" * (64 + 997 * (i % 7)), cb_for(key))
            except netpoll.ConnectionClosedError:
                refused.add(key)
                return
            accepted.add(key)
            i += 1

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    start.wait()
    # Let the writers get going, then close the handler under them.
    wait_until(lambda: len(accepted) > 200, 5)
    if how == "destroy":
        h.destroy()
    else:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()                                   # reset: the next send fails
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert h.closed_ev.wait(5)
    # Every accepted write's callback exactly once; refused ones never.
    assert wait_until(lambda: len(calls) >= len(accepted), 5), \
        f"{len(accepted) - len(calls)} of {len(accepted)} callbacks lost ({how})"
    assert set(calls) == accepted
    assert set(calls.values()) == {1}
    assert not (refused & set(calls))
    assert not bad, bad[:3]
    if how == "destroy":
        b.close()
    return len(accepted), len(refused)


def test_async_write_callbacks_exactly_once_racing_close(running):
    r = running(poll_num=2).reactor
    total = 0
    for i in range(40):
        n, _ = _race_round(r, "destroy" if i % 2 == 0 else "reset")
        total += n
    assert total > 40 * 200


def test_async_write_refused_after_close_never_calls_back(running):
    r = running().reactor
    h = Sink()
    a, b = socket.socketpair()
    r.add_ev_handler(h, a.detach(), netpoll.EV_IN)
    h.destroy()
    assert h.closed_ev.wait(5)
    called = []
    try:
        h.async_write(b"late", called.append)
    except netpoll.ConnectionClosedError:
        pass
    else:
        raise AssertionError("async_write on a closed handler did not raise")
    h2 = Sink()
    r.add_ev_handler(h2, socket.socketpair()[0].detach(), netpoll.EV_IN)
    h2.destroy()
    assert h2.closed_ev.wait(5)                       # a full poller round trip later
    assert called == []
    b.close()


# ------------------------------------------ timers vs a handler that moves

MOVE_ONE = textwrap.dedent("""
    import socket, threading, time
    import netpoll

    r = netpoll.Reactor(poll_num=2)
    threading.Thread(target=r.run, daemon=True).start()
    fired = threading.Event()
    info = {}

    class H(netpoll.EvHandler):
        def on_open(self):
            # Another thread schedules a timer while we are still bound here:
            # the request is queued on this poller, then we move away.
            t = threading.Thread(target=lambda: info.setdefault(
                "tid", self.schedule_timer(0.01)))
            t.start()
            t.join()
            info["from"] = r._current_index()
            r.add_ev_handler(self, self.fd(), netpoll.EV_IN, poller=1 - info["from"])
            return True

        def on_timeout(self, tid, now):
            info["thread"] = threading.current_thread().name
            info["poller"] = r._current_index()
            fired.set()
            return False

    hs = []
    acc = netpoll.Acceptor(r, "127.0.0.1:0", lambda: hs.append(H()) or hs[-1])
    c = socket.create_connection(acc.addr)
    ok = fired.wait(3)
    print(ok, info.get("from"), info.get("poller"), hs[0].poller_index)
    r.stop()
""")


def test_timer_requested_before_a_move_fires_on_the_new_poller():
    out = run_script(MOVE_ONE, timeout=30).split()
    assert out[0] == "True", "the timer queued before the move never fired"
    moved_from, fired_on, now_on = map(int, out[1:])
    assert fired_on == now_on == 1 - moved_from


MOVE_STRESS = textwrap.dedent("""
    import collections, queue, socket, sys, threading, time
    import netpoll

    NPOLL, NCONN, NTHREADS, FIRES = 4, 150, 3, 3
    r = netpoll.Reactor(poll_num=NPOLL)
    threading.Thread(target=r.run, daemon=True).start()
    lock = threading.Lock()
    counts = collections.Counter()
    wrong = []
    tids = set()
    todo = queue.Queue()

    class H(netpoll.EvHandler):
        def on_open(self):
            # Other threads schedule interval timers on us while we are still
            # bound to the accepting poller: those requests are queued there,
            # then we move to the next poller.
            self.asked = threading.Event()
            todo.put(self)
            self.asked.wait(5)
            here = r._current_index()
            r.add_ev_handler(self, self.fd(), netpoll.EV_IN, poller=(here + 1) % NPOLL)
            return True

        def on_timeout(self, tid, now):
            if r._current_index() != self.poller_index:
                wrong.append(tid)
            with lock:
                counts[tid] += 1
                return counts[tid] < FIRES

    def schedule(h, n):
        for _ in range(n):
            tid = h.schedule_timer(0.001, 0.001)
            with lock:
                tids.add(tid)

    def scheduler():
        while True:
            h = todo.get()
            if h is None:
                return
            schedule(h, 2)
            for _ in range(30):        # a big heap: longer sifts on the new poller
                h.schedule_timer(100)
            h.asked.set()

    acc = netpoll.Acceptor(r, "127.0.0.1:0", H)
    ths = [threading.Thread(target=scheduler) for k in range(NTHREADS)]
    for t in ths:
        t.start()
    socks = []
    for i in range(NCONN):
        socks.append(socket.create_connection(acc.addr))
        time.sleep(0.005)      # earlier timers finish: the next poller sleeps long
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            missing = [t for t in tids if counts[t] < FIRES]
        if len(tids) == NCONN * 2 and not missing:
            break
        time.sleep(0.01)
    for t in ths:
        todo.put(None)
    print(len(tids), len(missing), len(wrong))
    sys.stdout.flush()
    r.stop()
""")


def test_interval_timers_on_handlers_moving_in_on_open():
    out = run_script(MOVE_STRESS, timeout=90).split()
    ntids, missing, wrong = map(int, out)
    assert ntids == 150 * 2
    assert missing == 0, f"{missing} of {ntids} interval timers did not fire 3 times"
    assert wrong == 0


MOVE_REQUESTS = textwrap.dedent("""
    import socket, sys, threading
    import netpoll

    KIND = sys.argv[1]
    r = netpoll.Reactor(poll_num=2)
    threading.Thread(target=r.run, daemon=True).start()
    seen = {}
    done = threading.Event()

    class H(netpoll.EvHandler):
        def on_open(self):
            def request():
                # From another thread while we are still on the accepting
                # poller: the request is queued there, then we move away.
                if KIND == "flush":
                    # No bytes: a handler with pending output may not move.
                    self.async_write(b"", self.written)
                else:
                    self.destroy()
            t = threading.Thread(target=request)
            t.start()
            t.join()
            seen["from"] = r._current_index()
            r.add_ev_handler(self, self.fd(), netpoll.EV_IN, poller=1 - seen["from"])
            return True

        def written(self, err):
            seen["cb"] = (r._current_index(), err)
            done.set()

        def on_close(self):
            seen["close"] = r._current_index()
            if KIND == "close":
                done.set()

    hs = []
    acc = netpoll.Acceptor(r, "127.0.0.1:0", lambda: hs.append(H()) or hs[-1])
    c = socket.create_connection(acc.addr, timeout=5)
    ok = done.wait(5)
    to = 1 - seen["from"]
    if KIND == "flush":
        print(ok, seen["cb"] == (to, None), hs[0].poller_index == to, not hs[0].closed)
    else:
        print(ok, c.recv(5) == b"", seen["close"] == to, hs[0].closed)
    r.stop()
""")


@pytest.mark.parametrize("kind", ["flush", "close"])
def test_requests_queued_before_a_move_run_on_the_new_poller(kind):
    out = run_script(MOVE_REQUESTS, kind, timeout=30)
    assert out.split() == ["True"] * 4, out
