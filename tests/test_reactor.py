"""Reactor/EvHandler: callback return values, on_close exactly once on every
path, writes (direct, queued, async from threads), read() views, the poller
cache, watermarks and argument checking."""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

import netpoll
from reactorutil import Recorder, recv_exactly, running, wait_until  # noqa: F401


def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    return a, b


def attach(r, handler, events=netpoll.EV_IN):
    a, b = pair()
    r.add_ev_handler(handler, a.detach(), events)
    return b


class Once(netpoll.EvHandler):
    def __init__(self):
        self.closes = 0
        self.closed_ev = threading.Event()
        self.reads = []

    def on_close(self):
        self.closes += 1
        self.closed_ev.set()


def assert_closed_once(h, peer):
    assert h.closed_ev.wait(5)
    time.sleep(0.05)          # a second on_close would show up now
    assert h.closes == 1
    assert h.fd() == -1
    peer.settimeout(5)
    assert peer.recv(10) == b""      # our side was closed


# ---------------------------------------------------------------- returns

def test_on_read_true_keeps_false_closes(running):
    r = running().reactor

    class H(Once):
        def on_read(self):
            d = bytes(self.read())
            self.reads.append(d)
            return d != b"quit"

    h = H()
    peer = attach(r, h)
    peer.sendall(b"one")
    assert wait_until(lambda: h.reads == [b"one"])
    assert not h.closed
    peer.sendall(b"quit")
    assert_closed_once(h, peer)


def test_on_read_exception_closes_once(running):
    r = running().reactor

    class H(Once):
        def on_read(self):
            self.read()
            raise RuntimeError("boom")

    h = H()
    peer = attach(r, h)
    peer.sendall(b"x")
    assert_closed_once(h, peer)


def test_on_read_none_is_false(running):
    r = running().reactor

    class H(Once):
        def on_read(self):
            self.read()

    h = H()
    peer = attach(r, h)
    peer.sendall(b"x")
    assert_closed_once(h, peer)


def test_on_write_true_repeats_false_closes(running):
    r = running().reactor

    class H(Once):
        def __init__(self):
            super().__init__()
            self.writes = 0

        def on_write(self):
            self.writes += 1
            return self.writes < 5

    h = H()
    peer = attach(r, h, netpoll.EV_OUT)
    assert_closed_once(h, peer)
    assert h.writes == 5


def test_on_open_false_closes_once(running):
    r = running().reactor

    class H(Once):
        def on_open(self):
            return False

    hs = []

    def factory():
        hs.append(H())
        return hs[-1]

    acc = netpoll.Acceptor(r, "127.0.0.1:0", factory)
    c = socket.create_connection(acc.addr, timeout=5)
    assert wait_until(lambda: hs and hs[0].closed_ev.is_set())
    assert_closed_once(hs[0], c)


def test_on_timeout_false_does_not_close(running):
    r = running().reactor

    class H(Once):
        fired = 0

        def on_timeout(self, tid, now):
            self.fired += 1
            return False

    h = H()
    peer = attach(r, h)
    h.schedule_timer(0.01)          # one-shot: return value ignored
    h.schedule_timer(0.01, 0.01)    # interval: False stops it
    assert wait_until(lambda: h.fired == 2)
    time.sleep(0.1)
    assert h.fired == 2
    assert not h.closed and h.closes == 0
    peer.sendall(b"still alive")
    peer.close()
    assert h.closed_ev.wait(5)       # default on_read: drains, closes at EOF
    assert h.closes == 1


# ------------------------------------------------------- on_close paths

def test_peer_close_calls_on_close_once(running):
    r = running().reactor
    h = Recorder()
    peer = attach(r, h)
    peer.sendall(b"abc")
    assert recv_exactly(peer, 3) == b"abc"
    peer.close()
    assert h.closed_ev.wait(5)
    time.sleep(0.05)
    assert h.calls.count("close") == 1
    assert h.calls[-2:] == [("read", b""), "close"]


def test_reset_calls_on_close_once(running):
    r = running().reactor
    acc_h = []

    def factory():
        acc_h.append(Recorder())
        return acc_h[-1]

    acc = netpoll.Acceptor(r, "127.0.0.1:0", factory)
    c = socket.create_connection(acc.addr, timeout=5)
    c.sendall(b"hi")
    assert recv_exactly(c, 2) == b"hi"
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()                                # RST
    h = acc_h[0]
    assert h.closed_ev.wait(5)
    time.sleep(0.05)
    assert h.calls.count("close") == 1


def test_destroy_from_other_thread_and_twice(running):
    r = running().reactor
    h = Once()
    peer = attach(r, h)
    threads = [threading.Thread(target=h.destroy) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h.destroy()
    assert_closed_once(h, peer)


def test_destroy_inside_on_close_is_harmless(running):
    r = running().reactor

    class H(Once):
        def on_close(self):
            self.destroy()              # as in goev's examples
            super().on_close()

    h = H()
    peer = attach(r, h)
    peer.close()
    assert h.closed_ev.wait(5)
    time.sleep(0.05)
    assert h.closes == 1


def test_stop_closes_every_handler_once_and_run_returns(running):
    rr = running(poll_num=2)
    hs = [Once() for _ in range(10)]
    peers = [attach(rr.reactor, h) for h in hs]
    rr.stop()
    assert all(h.closes == 1 for h in hs)
    assert rr.reactor.stopped
    for p in peers:
        assert p.recv(1) == b""
    rr.reactor.run()              # stopped already: returns at once (a reactor runs once)
    with pytest.raises(RuntimeError):
        rr.reactor.add_ev_handler(Once(), peers[0].fileno(), netpoll.EV_IN)


def test_stop_from_a_callback(running):
    rr = running()
    r = rr.reactor

    class H(Once):
        def on_read(self):
            self.read()
            r.stop()
            return True

    h = H()
    peer = attach(r, h)
    peer.sendall(b"stop")
    rr.thread.join(10)
    assert not rr.thread.is_alive()
    assert h.closes == 1


def test_stop_without_run():
    r = netpoll.Reactor(poll_num=2)
    h = Once()
    a, b = pair()
    r.add_ev_handler(h, a.detach(), netpoll.EV_IN)
    r.stop()
    assert h.closes == 1
    assert r.stopped
    r.run()                       # a stop before run (an early signal): run returns


def test_stop_before_run_from_another_thread_makes_run_return():
    r = netpoll.Reactor(poll_num=1)
    t = threading.Thread(target=r.stop)
    t.start()
    t.join(10)
    done = threading.Event()
    threading.Thread(target=lambda: (r.run(), done.set()), daemon=True).start()
    assert done.wait(10)


# ------------------------------------------------------------- writes

def test_write_queues_what_the_socket_does_not_take(running):
    r = running().reactor
    big = bytes(range(256)) * 40000       # ~10 MB: more than socket buffers hold
    state = {}

    class H(Once):
        def on_timeout(self, tid, now):
            n = self.write(big)
            state["n"] = n
            state["pending"] = self.pending_output_size()
            return False

    h = H()
    peer = attach(r, h)
    h.schedule_timer(0)
    assert wait_until(lambda: "n" in state)
    assert state["n"] == len(big)
    assert state["pending"] > 0
    got = recv_exactly(peer, len(big))
    assert got == big
    assert wait_until(lambda: h.pending_output_size() == 0)


def test_write_copies_mutable_input(running):
    r = running().reactor
    done = threading.Event()

    class H(Once):
        def on_timeout(self, tid, now):
            buf = bytearray(b"A" * 4_000_000)
            self.write(buf)
            buf[:] = b"B" * len(buf)        # must not alter what is sent
            done.set()
            return False

    h = H()
    peer = attach(r, h)
    h.schedule_timer(0)
    assert done.wait(5)
    assert recv_exactly(peer, 4_000_000) == b"A" * 4_000_000


def test_async_write_ordering_from_threads_with_callbacks(running):
    r = running(poll_num=2).reactor
    h = Once()
    peer = attach(r, h)
    nthreads, per = 4, 300
    calls = {}
    lock = threading.Lock()
    poller_threads = set()

    def cb_for(key):
        def cb(err):
            with lock:
                calls[key] = calls.get(key, 0) + 1
                poller_threads.add(threading.current_thread().name)
            assert err is None
        return cb

    def worker(t):
        for i in range(per):
            rec = struct.pack("!HH", t, i) + bytes([t]) * 60
            if i % 3 == 0:
                h.write(rec)                      # off-thread write: queued in order
            else:
                h.async_write(rec, cb_for((t, i)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = recv_exactly(peer, nthreads * per * 64)
    last = [-1] * nthreads
    for off in range(0, len(data), 64):
        t, i = struct.unpack_from("!HH", data, off)
        assert data[off + 4:off + 64] == bytes([t]) * 60
        assert i == last[t] + 1, "records of one thread out of order"
        last[t] = i
    assert wait_until(lambda: len(calls) == nthreads * (per - per // 3))
    time.sleep(0.05)
    assert set(calls.values()) == {1}
    assert all(n.startswith("netpoll-poller") for n in poller_threads)


def test_async_write_callback_gets_error_when_closed_first(running):
    r = running().reactor
    h = Once()
    peer = attach(r, h)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    results = []
    got = threading.Event()

    def cb(err):
        results.append(err)
        got.set()

    gate = threading.Event()

    class Closer(netpoll.EvHandler):
        pass

    # Fill the socket so the data stays queued, then destroy.
    h.async_write(b"x" * 20_000_000, cb)
    assert wait_until(lambda: h.pending_output_size() > 0)
    h.destroy()
    assert got.wait(5)
    assert len(results) == 1
    assert isinstance(results[0], netpoll.ConnectionClosedError)
    with pytest.raises(netpoll.ConnectionClosedError):
        h.async_write(b"late", cb)
    time.sleep(0.05)
    assert len(results) == 1
    gate.set()


def test_watermarks(running):
    r = running().reactor
    events = []

    class H(Once):
        def on_high_watermark(self, pending):
            events.append(("high", pending))

        def on_low_watermark(self, pending):
            events.append(("low", pending))

        def on_timeout(self, tid, now):
            self.write(b"z" * 8_000_000)
            return False

    h = H()
    peer = attach(r, h)
    h.set_watermarks(1_000_000, 1000)
    h.schedule_timer(0)
    assert wait_until(lambda: events)
    assert events[0][0] == "high" and events[0][1] >= 1_000_000
    recv_exactly(peer, 8_000_000)
    assert wait_until(lambda: len(events) == 2)
    assert events[1][0] == "low" and events[1][1] <= 1000


# ---------------------------------------------------------------- read

def test_read_view_kept_past_next_read_is_unchanged(running):
    r = running().reactor
    kept = []

    class H(Once):
        def on_read(self):
            v = self.read()
            if not v:
                return False
            kept.append((v, bytes(v)))
            return True

    h = H()
    peer = attach(r, h)
    for i in range(20):
        msg = bytes([65 + i]) * 1000
        peer.sendall(msg)
        assert wait_until(lambda: len(kept) >= i + 1 and
                          sum(len(b) for _, b in kept) >= 1000 * (i + 1))
    for v, b in kept:
        assert v.readonly
        assert bytes(v) == b
    with pytest.raises(TypeError):
        kept[0][0][0] = 1


def test_read_view_reuses_buffer_when_released(running):
    r = running(read_buffer_size=4096).reactor
    addrs = []

    class H(Once):
        def on_read(self):
            v = self.read()
            if not v:
                return False
            with memoryview(v) as mv:
                addrs.append(bytes(mv))
            v.release()
            return True

    h = H()
    peer = attach(r, h)
    for i in range(5):
        peer.sendall(b"%d" % i)
        assert wait_until(lambda: len(addrs) == i + 1)
    assert addrs == [b"0", b"1", b"2", b"3", b"4"]


def test_read_off_thread_raises(running):
    r = running().reactor
    h = Once()
    peer = attach(r, h)
    with pytest.raises(RuntimeError):
        h.read()
    peer.close()


def test_edge_triggered_read_loop(running):
    r = running().reactor
    got = []

    class H(Once):
        def on_read(self):
            while True:
                d = self.read()           # raises BlockingIOError when drained
                if not d:
                    return False
                got.append(bytes(d))

    h = H()
    peer = attach(r, h, netpoll.EV_IN_ET)
    peer.sendall(b"a" * 100_000)
    assert wait_until(lambda: sum(map(len, got)) == 100_000)
    peer.sendall(b"more")
    assert wait_until(lambda: sum(map(len, got)) == 100_004)
    peer.close()
    assert h.closed_ev.wait(5)


# ------------------------------------------------------ events, cache

def test_append_and_remove_event(running):
    r = running().reactor

    class H(Once):
        writes = 0

        def on_write(self):
            self.writes += 1
            r.remove_event(self, netpoll.EV_OUT)
            return True

    h = H()
    peer = attach(r, h)
    time.sleep(0.05)
    assert h.writes == 0
    r.append_event(h, netpoll.EV_OUT)
    assert wait_until(lambda: h.writes == 1)
    time.sleep(0.05)
    assert h.writes == 1
    peer.close()


def test_poll_sync_reaches_every_poller(running):
    r = running(poll_num=3).reactor
    seen = {}

    class H(Once):
        def on_read(self):
            self.read()
            seen[self.poller_index] = self.pcached_get("cfg")
            return True

    hs = [H() for _ in range(3)]
    peers = []
    for i, h in enumerate(hs):
        a, b = pair()
        r.add_ev_handler(h, a.detach(), netpoll.EV_IN, poller=i)
        peers.append(b)
    assert r.poll_sync("cfg", {"v": 42}).wait(5)
    for p in peers:
        p.sendall(b"?")
    assert wait_until(lambda: len(seen) == 3)
    assert seen == {0: {"v": 42}, 1: {"v": 42}, 2: {"v": 42}}
    assert hs[0].pcached_get("missing", 7) == 7


# -------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kw, exc", [
    ({"poll_num": 0}, ValueError), ({"poll_num": "2"}, TypeError),
    ({"poll_num": 1.5}, TypeError), ({"poll_num": True}, TypeError),
    ({"read_buffer_size": 0}, ValueError), ({"read_buffer_size": None}, TypeError),
    ({"read_buffer_size": 1 << 40}, ValueError),
])
def test_reactor_bad_args(kw, exc):
    with pytest.raises(exc):
        netpoll.Reactor(**kw)


def test_method_bad_args(running):
    r = running().reactor
    h = Once()
    a, b = pair()
    fd = a.detach()
    with pytest.raises(TypeError):
        r.add_ev_handler(object(), fd, netpoll.EV_IN)
    with pytest.raises(TypeError):
        r.add_ev_handler(None, fd, netpoll.EV_IN)
    with pytest.raises(TypeError):
        r.add_ev_handler(h, "3", netpoll.EV_IN)
    with pytest.raises(ValueError):
        r.add_ev_handler(h, -1, netpoll.EV_IN)
    with pytest.raises(ValueError):
        r.add_ev_handler(h, fd, 0)
    with pytest.raises(ValueError):
        r.add_ev_handler(h, fd, 0x400)
    with pytest.raises(TypeError):
        r.add_ev_handler(h, fd, "in")
    with pytest.raises(ValueError):
        r.add_ev_handler(h, fd, netpoll.EV_IN, poller=5)
    with pytest.raises(ValueError):
        r.append_event(h, netpoll.EV_OUT)         # not added yet
    r.add_ev_handler(h, fd, netpoll.EV_IN)
    with pytest.raises(ValueError):
        r.add_ev_handler(h, fd, netpoll.EV_IN)    # twice
    with pytest.raises(TypeError):
        h.write("str")
    with pytest.raises(TypeError):
        h.write(None)
    with pytest.raises(TypeError):
        h.async_write(123)
    with pytest.raises(TypeError):
        h.async_write(b"x", callback=5)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            h.schedule_timer(bad)
        with pytest.raises(ValueError):
            h.schedule_timer(1, bad)
    for bad in ("1", None, [1]):
        with pytest.raises(TypeError):
            h.schedule_timer(bad)
    with pytest.raises(TypeError):
        h.cancel_timer("x")
    h.cancel_timer(10 ** 30)          # unknown: ignored
    with pytest.raises(ValueError):
        h.set_watermarks(10, 20)
    with pytest.raises(TypeError):
        h.set_watermarks("10")
    with pytest.raises(TypeError):
        h.pcached_get([])             # unhashable key
    with pytest.raises(TypeError):
        r.poll_sync([], 1)


def test_unattached_handler_methods():
    h = netpoll.EvHandler()
    assert h.fd() == -1 and h.get_reactor() is None and h.poller_index == -1
    assert h.pending_output_size() == 0
    with pytest.raises(RuntimeError):
        h.write(b"x")
    with pytest.raises(RuntimeError):
        h.schedule_timer(1)
    with pytest.raises(netpoll.ConnectionClosedError):
        h.read()
    h.destroy()                       # harmless
    h.cancel_timer(1)


def test_subclass_without_super_init(running):
    r = running().reactor

    class Bare(netpoll.EvHandler):
        def __init__(self, x):
            self.x = x

    h = Bare(1)
    peer = attach(r, h)
    peer.sendall(b"x")
    peer.close()
    assert wait_until(lambda: h.closed)
