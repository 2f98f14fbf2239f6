"""The misuse fuzzer (issue 15), run as a script by tests/test_misuse_fuzz.py:

    python tests/misuse_fuzz.py SEED SECONDS

Several threads call the public API at random with hostile values (sizes
near 2**63 and 2**64, NaN, inf, -0.0, bools, bytes subclasses, released
views, closed objects, wrong types) on LinkBuffers, connections (reader,
writer, setters, close, read, write), EventLoops, Dialers, configure() and a
Reactor's handlers. Every call must succeed or raise a documented exception
class; the process must neither crash nor hang.

Exit status: 0 clean; 1 a call raised something else (one line per distinct
(call, exception) on stdout) or the process froze so hard that only
faulthandler's timer could report it ("Timeout", stacks on stderr); 3 a call
or the final shutdown hung (stacks on stderr). A crash is a signal.

Every wait the fuzzer can start is bounded by a timeout it keeps set
(connections always have a read and a write timeout; hostile timeouts that
would lift them go only to connections nobody reads from), so a call that
blocks for long is a bug, not the fuzzer's own doing.
"""
from __future__ import annotations

import array
import decimal
import faulthandler
import fractions
import logging
import os
import random
import resource
import socket
import sys
import threading
import time
import traceback

import netpoll

try:
    from netpoll._validate import seconds as _seconds
except ImportError:                 # an older netpoll: a rough stand-in
    def _seconds(value: object, what: str) -> object:
        if value is None or value == float("inf"):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                value != value or value < 0 or value > 1e9:
            raise ValueError(what)
        return value

class EvilError(Exception):
    """Raised by Evil's protocol methods: user code's own error, which may
    propagate through any call."""


ALLOWED = (TypeError, ValueError, netpoll.NetpollError, ConnectionError, TimeoutError,
           BufferError, RuntimeError, EvilError)
# Exceptions some calls document beyond ALLOWED.
EXTRA = {
    "Dialer.dial_connection": (FileNotFoundError,),   # a Unix path that does not exist
    "Reactor.add_ev_handler": (OSError,),             # "OSError says why" (EBADF...)
}
# Findings in files this fuzzer's author does not own, reported to their
# owners: printed, not failed on (set NETPOLL_FUZZ_STRICT=1 to fail on them
# too). Remove an entry once it is fixed.
KNOWN: dict = {}    # (call, exception) -> why it is tolerated for now; empty: none are
AS_LIMIT = 3 << 29          # address space it may grow by: 1.5 GiB
HUGE = 1 << 28              # MemoryError is fair only for an allocation this big
HANG_S = 15.0               # no single call may take this long
READ_TIMEOUT = 0.2
WRITE_TIMEOUT = 0.5


class Bytes(bytes):
    pass


class ByteArray(bytearray):
    pass


class Int(int):
    pass


class Evil:
    """An object whose every protocol raises."""

    def __index__(self) -> int:
        raise EvilError("__index__")

    def __float__(self) -> float:
        raise EvilError("__float__")

    def __len__(self) -> int:
        raise EvilError("__len__")


def _released() -> memoryview:
    m = memoryview(b"abc")
    m.release()
    return m


NAN, INF = float("nan"), float("inf")
SIZES = [0, 1, 2, 7, 100, 4096, 70000, -1, -2**63, 2**31 - 1, 2**31, 2**32, 2**40,
         2**40 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, 2**100, -2**64,
         True, False, 1.0, 0.5, NAN, INF, -0.0, "3", b"3", None, Int(3), Int(2**64),
         fractions.Fraction(1, 2), decimal.Decimal("NaN"), Evil()]
TIMES = [0, -0.0, 0.001, 0.01, 0.05, 0.2, 1e-12, -1, -1e-9, NAN, INF, -INF, 1e308, 2**63,
         2**64, 1e9 + 1, 30, True, False, "1", b"1", None, Int(0), fractions.Fraction(1, 10),
         decimal.Decimal("Infinity"), decimal.Decimal("sNaN"), decimal.Decimal("1e400"),
         Evil()]
DATA = [b"", b"x", b"hello\n", b"y" * 70000, bytearray(b"ab\n"), memoryview(b"abcdef")[::2],
        memoryview(b"q" * 10), Bytes(b"sub\n"), ByteArray(b"ba"), array.array("i", [1, 2, 3]),
        _released(), "str", 5, None, 2**64, object(), [b"x"], Evil()]
DELIMS = [10, 0, 255, 256, -1, 2**64, b"\n", b"", b"ab", "\n", True, None, bytearray(b"\n"),
          Bytes(b"\n"), memoryview(b"\n"), 10.0, Evil()]
STRINGS = ["", "abc", "\ud800", "é" * 1000, b"bytes", None, 5]
NETWORKS = ["tcp", "tcp4", "tcp6", "unix", "udp", "", None, 5, b"tcp"]
EVENTS = [netpoll.EV_IN, netpoll.EV_OUT, netpoll.EV_IN | netpoll.EV_OUT, 0, -1, 2**32, 2**64,
          True, None, "in"]


def _bounded(t: object) -> bool:
    """True if setting timeout `t` keeps waits short (or the call raises)."""
    try:
        s = _seconds(t, "t")
    except Exception:
        return True
    return s is not None and s <= 1.0


BOUNDED_TIMES = [t for t in TIMES if _bounded(t)]


def _huge(args: tuple, kw: dict) -> bool:
    for a in list(args) + list(kw.values()):
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            try:
                if a == a and abs(a) >= HUGE:
                    return True
            except Exception:
                pass
    return False


def _show(v: object) -> str:
    try:
        r = repr(v)
    except Exception:
        r = f"<{type(v).__name__}>"
    return r if len(r) <= 60 else r[:57] + "..."


class Fuzz:
    def __init__(self, seed: int, seconds: float) -> None:
        self.seed = seed
        self.seconds = seconds
        self.lock = threading.Lock()
        self.bad: dict = {}
        self.running: dict = {}          # thread name -> (call, args, start)
        self.slowest: dict = {}          # call -> (seconds, args) of its slowest run
        self.calls = 0
        self.buffers = [netpoll.LinkBuffer() for _ in range(4)]
        self.views: list = []            # views handed out, read after close/release
        self.conns: list = []            # connections shared by every thread
        self.no_io: list = []            # connections that take unbounded timeouts
        self.loops: list = []
        self.handlers: list = []
        self.stop = threading.Event()

    # -------------------------------------------------------------- calls

    def call(self, name: str, fn, *args, **kw):
        me = threading.current_thread().name
        with self.lock:
            self.running[me] = (name, args, time.monotonic())
            self.calls += 1
        try:
            return fn(*args, **kw)
        except ALLOWED:
            return None
        except EXTRA.get(name, ()):
            return None
        except MemoryError as e:
            if not _huge(args, kw):
                self.report(name, args, kw, e)
        except BaseException as e:
            self.report(name, args, kw, e)
        finally:
            with self.lock:
                start = self.running.pop(me, (0, 0, time.monotonic()))[2]
                took = time.monotonic() - start
                if took > self.slowest.get(name, (0,))[0]:
                    self.slowest[name] = (took, ", ".join(_show(a) for a in args))
        return None

    def report(self, name: str, args: tuple, kw: dict, e: BaseException) -> None:
        key = (name, type(e).__name__)
        with self.lock:
            if key in self.bad:
                return
            where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
            self.bad[key] = (f"{name}({', '.join(_show(a) for a in args)}"
                             f"{', ' if args and kw else ''}"
                             f"{', '.join(f'{k}={_show(v)}' for k, v in kw.items())}) raised "
                             f"{type(e).__name__}: {str(e)[:200]}"
                             f" at {where[0].filename}:{where[0].lineno}" if where else "")

    # ------------------------------------------------------------ targets

    def server(self) -> None:
        self.listener = netpoll.create_listener("tcp", "127.0.0.1:0")
        self.addr = "%s:%d" % tuple(self.listener.addr)[:2]

        def on_connect(ctx, conn):
            conn.set_read_timeout(READ_TIMEOUT)
            with self.lock:
                self.conns.append(conn)
            return ctx

        def on_request(ctx, conn):
            r = conn.reader
            if len(r) > 4096:
                r.skip(len(r) - 100)
            if len(r) and random.random() < 0.3:
                conn.write(r.next(len(r)))

        self.loop = netpoll.EventLoop(on_request, on_connect=on_connect,
                                      read_timeout=READ_TIMEOUT, write_timeout=WRITE_TIMEOUT,
                                      input_limit=1 << 20,
                                      runner=random.Random(self.seed).choice(
                                          ["pool", "inline", _thread_runner]))
        threading.Thread(target=self.loop.serve, args=(self.listener,), daemon=True,
                         name="serve").start()
        self.reactor = netpoll.Reactor(poll_num=1)
        threading.Thread(target=self.reactor.run, daemon=True, name="reactor").start()

    def dial(self, rng: random.Random) -> None:
        with self.lock:
            if len(self.conns) > 12:
                return
        runner = rng.choice(["pool", "inline", None, _thread_runner, _raise])
        d = netpoll.Dialer(runner=runner, read_timeout=READ_TIMEOUT,
                           write_timeout=WRITE_TIMEOUT)
        conn = self.call("dial_connection", d.dial_connection, "tcp", self.addr, timeout=2.0)
        if conn is not None:
            with self.lock:
                (self.no_io if rng.random() < 0.2 else self.conns).append(conn)

    # -------------------------------------------------------- operations

    def op_buffer(self, rng: random.Random, lb, kind_name: str = "LinkBuffer") -> None:
        s = rng.choice(SIZES)
        kind = rng.randrange(22)
        if kind == 0:
            v = self.call(f"{kind_name}.next", lb.next, s)
            if v is not None:
                self.views.append(v)
        elif kind == 1:
            v = self.call(f"{kind_name}.peek", lb.peek, s)
            if v is not None:
                self.views.append(v)
        elif kind == 2:
            self.call(f"{kind_name}.skip", lb.skip, s)
        elif kind == 3:
            v = self.call(f"{kind_name}.until", lb.until, rng.choice(DELIMS))
            if v is not None:
                self.views.append(v)
        elif kind == 4:
            self.call(f"{kind_name}.read_string", lb.read_string, s)
        elif kind == 5:
            self.call(f"{kind_name}.read_binary", lb.read_binary, s)
        elif kind == 6:
            self.call(f"{kind_name}.read_byte", lb.read_byte)
        elif kind == 7:
            out = self.call(f"{kind_name}.slice", lb.slice, s)
            if out is not None and rng.random() < 0.5:
                self.buffers.append(out)
        elif kind == 8:
            self.call(f"{kind_name}.bytes", lb.bytes)
        elif kind == 9:
            self.call(f"{kind_name}.release", lb.release)
        elif kind == 10:
            self.call(f"len({kind_name})", len, lb)
            self.call(f"{kind_name}.is_empty", lb.is_empty)
        elif kind == 11:
            v = self.call(f"{kind_name}.malloc", lb.malloc, s)
            if v is not None:
                self.views.append(v)
                if rng.random() < 0.5:
                    self.call(f"{kind_name}.malloc_ack", lb.malloc_ack, rng.choice(SIZES))
        elif kind == 12:
            self.call(f"{kind_name}.malloc_len", lb.malloc_len)
            self.call(f"{kind_name}.malloc_ack", lb.malloc_ack, s)
        elif kind == 13:
            self.call(f"{kind_name}.write_binary", lb.write_binary, rng.choice(DATA))
        elif kind == 14:
            self.call(f"{kind_name}.write_string", lb.write_string, rng.choice(STRINGS))
        elif kind == 15:
            self.call(f"{kind_name}.write_byte", lb.write_byte, s)
        elif kind == 16:
            self.call(f"{kind_name}.write_direct", lb.write_direct, rng.choice(DATA),
                      rng.choice(SIZES))
        elif kind == 17:
            other = rng.choice(self.buffers + [None, b"x", lb])
            self.call(f"{kind_name}.append", lb.append, other)
        elif kind == 18:
            self.call(f"{kind_name}.flush", lb.flush)
        elif kind == 19:
            if rng.random() < 0.1:
                self.call(f"{kind_name}.close", lb.close)
        elif kind == 20:
            self.call(f"repr({kind_name})", repr, lb)
        else:
            b = self.call("LinkBuffer()", netpoll.LinkBuffer, s)
            if b is not None:
                self.buffers.append(b)
        # Views stay valid whatever happened to their buffer since.
        if self.views and rng.random() < 0.3:
            v = rng.choice(self.views)
            self.call("bytes(view)", bytes, v)
            if not self.call("view.readonly", getattr, v, "readonly") and \
                    self.call("len(view)", len, v):
                self.call("view[0]=", v.__setitem__, 0, 65)
        if len(self.views) > 64:
            del self.views[:32]
        if len(self.buffers) > 16:
            del self.buffers[4:8]

    def op_conn(self, rng: random.Random) -> None:
        with self.lock:
            pool = self.conns if self.conns and rng.random() < 0.85 else self.no_io
            if not pool:
                return
            conn = rng.choice(pool)
        io = pool is self.conns
        # Connections with unbounded timeouts get no call that waits.
        kind = rng.randrange(20) if io else rng.randrange(8, 18)
        if kind < 6:
            if kind < 4:
                self.op_buffer(rng, conn.reader, "ConnReader")
            else:
                self.op_buffer(rng, conn.writer, "ConnWriter")
            if kind >= 4 and rng.random() < 0.5:
                self.call("ConnWriter.flush", conn.writer.flush)
        elif kind == 6:
            self.call("Connection.read", conn.read, rng.choice(SIZES))
        elif kind == 7:
            self.call("Connection.write", conn.write, rng.choice(DATA))
        elif kind == 8:
            # Timeouts: hostile values everywhere, unbounded ones only where
            # nobody waits; a value that raises must change nothing.
            t = rng.choice(TIMES if not io else BOUNDED_TIMES)
            self.call("Connection.set_read_timeout", conn.set_read_timeout, t)
            if io and _is_valid(t):        # a value that raised must have changed nothing
                self.call("Connection.set_read_timeout", conn.set_read_timeout, READ_TIMEOUT)
        elif kind == 9:
            t = rng.choice(TIMES if not io else BOUNDED_TIMES)
            self.call("Connection.set_write_timeout", conn.set_write_timeout, t)
            if io and _is_valid(t):
                self.call("Connection.set_write_timeout", conn.set_write_timeout,
                          WRITE_TIMEOUT)
        elif kind == 10:
            self.call("Connection.set_idle_timeout", conn.set_idle_timeout, rng.choice(TIMES))
        elif kind == 11:
            self.call("Connection.set_input_limit", conn.set_input_limit, rng.choice(SIZES))
            self.call("Connection.set_output_limit", conn.set_output_limit, rng.choice(SIZES))
        elif kind == 12:
            h = rng.choice([None, 5, "x", lambda ctx, c: None, _raise,
                            lambda ctx, c: c.reader.skip(len(c.reader))])
            self.call("Connection.set_on_request", conn.set_on_request, h)
        elif kind == 13:
            cb = rng.choice([None, 5, lambda c: None, _raise, lambda c: c.close()])
            self.call("Connection.add_close_callback", conn.add_close_callback, cb)
        elif kind == 14:
            self.call("Connection.pause_read", conn.pause_read)
            if rng.random() < 0.7:
                self.call("Connection.resume_read", conn.resume_read)
        elif kind == 15:
            self.call("Connection.resume_read", conn.resume_read)
            self.call("Connection.shutdown_write" if rng.random() < 0.1 else
                      "Connection.output_buffered",
                      conn.shutdown_write if rng.random() < 0.1 else conn.output_buffered)
        elif kind == 16:
            self.call("Connection.fileno", conn.fileno)
            self.call("Connection.is_active", conn.is_active)
            self.call("Connection.local_addr", getattr, conn, "local_addr")
            self.call("Connection.remote_addr", getattr, conn, "remote_addr")
            self.call("repr(Connection)", repr, conn)
        elif kind == 17:
            if rng.random() < 0.15:
                self.call("Connection.close", conn.close)
        else:
            self.dial(rng)

    def op_loop(self, rng: random.Random) -> None:
        kw = {}
        for k, vals in (("read_timeout", TIMES), ("write_timeout", TIMES),
                        ("idle_timeout", TIMES), ("input_limit", SIZES),
                        ("output_limit", SIZES),
                        ("runner", ["pool", "inline", "thread", None, 5, print]),
                        ("on_connect", [None, 5, print])):
            if rng.random() < 0.4:
                kw[k] = rng.choice(vals)
        on_request = rng.choice([lambda ctx, c: None, None, 5])
        loop = self.call("EventLoop()", netpoll.EventLoop, on_request, **kw)
        if loop is None:
            return
        what = rng.randrange(3)
        if what == 0:
            self.call("EventLoop.serve", loop.serve, rng.choice([None, 5, self.closed_listener]))
        elif what == 1:
            # Never served: it has nothing to wait for whatever the timeout.
            self.call("EventLoop.shutdown", loop.shutdown, rng.choice(TIMES))
            if "shut down" in repr(loop):     # else serve() would serve
                self.call("EventLoop.serve", loop.serve, self.listener)
        else:
            self.call("repr(EventLoop)", repr, loop)
            self.call("EventLoop.connections", getattr, loop, "connections")

    def op_dialer(self, rng: random.Random) -> None:
        kw = {}
        for k, vals in (("read_timeout", TIMES), ("write_timeout", TIMES),
                        ("idle_timeout", TIMES), ("output_limit", SIZES),
                        ("runner", ["pool", "inline", "bad", None, 5])):
            if rng.random() < 0.4:
                kw[k] = rng.choice(vals)
        d = self.call("Dialer()", netpoll.Dialer, **kw)
        if d is None:
            return
        host = "127.0.0.1"
        port = self.addr.rsplit(":", 1)[1]
        address = rng.choice([self.addr, f"{host}: {port}", f"{host}:+{port}",
                              f"{host}:{port[0]}_{port[1:]}", f"{host}:99999", f"{host}:-1",
                              (host, 2**64), (host, int(port)), None, b"x", 5,
                              "/nonexistent-netpoll/sock", "", ":", "[::1", "a" * 300])
        network = rng.choice(NETWORKS)
        t = rng.choice(BOUNDED_TIMES + [None, INF])
        conn = self.call("Dialer.dial_connection", d.dial_connection, network, address,
                         timeout=t)
        if conn is not None:
            self.call("Connection.close", conn.close)

    def op_global(self, rng: random.Random) -> None:
        kind = rng.randrange(4)
        if kind == 0:
            # Only values that are invalid or keep the runtime as it is: a
            # valid num_loops would start that many pollers.
            kw = rng.choice([
                {"num_loops": rng.choice([0, -1, 2**64, 1025, True, 1.5, "2", NAN, 2])},
                {"buffer_size": rng.choice([0, -1, 2**40, 2**64, True, NAN, 8192])},
                {"pool_size": rng.choice([0, 2**64, True, 16])},
                {"runner": rng.choice(["pool", "nope", 5, b"pool"])},
                {"load_balance": rng.choice(["x", 5, netpoll.LoadBalance.ROUND_ROBIN])},
            ])
            self.call("configure", netpoll.configure, **kw)
        elif kind == 1:
            self.call("stats", netpoll.stats)
        elif kind == 2:
            self.call("pool_stats", _pool_stats)
        else:
            self.call("set_num_loops", netpoll.set_num_loops,
                      rng.choice([0, -1, 2**64, True, None, 2]))

    def op_reactor(self, rng: random.Random) -> None:
        r = self.reactor
        kind = rng.randrange(10)
        if kind == 0 or not self.handlers:
            h = netpoll.EvHandler()
            self.handlers.append(h)
            if rng.random() < 0.5:
                a, b = socket.socketpair()
                b.close()
                self.call("Reactor.add_ev_handler", r.add_ev_handler, h, a.detach(),
                          rng.choice(EVENTS))
            else:
                self.call("Reactor.add_ev_handler", r.add_ev_handler, h,
                          rng.choice([-1, 2**31, 2**64, True, None, 1.5, 10**6]),
                          rng.choice(EVENTS))
            if len(self.handlers) > 32:
                for old in self.handlers[:16]:
                    self.call("EvHandler.destroy", old.destroy)
                del self.handlers[:16]
            return
        h = rng.choice(self.handlers)
        if kind == 1:
            self.call("EvHandler.write", h.write, rng.choice(DATA))
        elif kind == 2:
            self.call("EvHandler.async_write", h.async_write, rng.choice(DATA))
        elif kind == 3:
            self.call("EvHandler.schedule_timer", h.schedule_timer, rng.choice(TIMES),
                      rng.choice(TIMES))
        elif kind == 4:
            self.call("EvHandler.cancel_timer", h.cancel_timer, rng.choice(SIZES))
        elif kind == 5:
            self.call("EvHandler.set_watermarks", h.set_watermarks, rng.choice(SIZES),
                      rng.choice(SIZES))
        elif kind == 6:
            self.call("Reactor.append_event", r.append_event, h, rng.choice(EVENTS))
            self.call("Reactor.remove_event", r.remove_event, h, rng.choice(EVENTS))
        elif kind == 7:
            self.call("EvHandler.read", h.read)
            self.call("EvHandler.pending_output_size", h.pending_output_size)
            self.call("EvHandler.closed", getattr, h, "closed")
        elif kind == 8:
            # Short or invalid: a valid long timeout would wait that long.
            self.call("Reactor.wait_stopped", r.wait_stopped,
                      rng.choice([0, 0.001, -0.0, -1, NAN, -INF, 2**64, 1e308, "1", True]))
            self.call("Reactor.stats", r.stats)
        else:
            self.call("Reactor()", netpoll.Reactor, rng.choice([0, -1, 2**64, True, 1.5, None]),
                      rng.choice(SIZES))

    # --------------------------------------------------------------- run

    def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        end = time.monotonic() + self.seconds
        ops = [self.op_conn] * 6 + [self.op_loop, self.op_dialer, self.op_global] + \
            [self.op_reactor] * 2
        while time.monotonic() < end and not self.stop.is_set():
            op = rng.choice(ops + [None] * 3)
            try:
                if op is None:
                    self.op_buffer(rng, rng.choice(self.buffers))
                else:
                    op(rng)
            except Exception as e:         # the fuzzer's own bug: report it too
                self.report(f"fuzzer {op}", (), {}, e)

    def watchdog(self) -> None:
        while not self.stop.wait(0.5):
            now = time.monotonic()
            with self.lock:
                stuck = [(t, c) for t, c in self.running.items() if now - c[2] > HANG_S]
            if stuck:
                hang(f"calls running for over {HANG_S} s: " + "; ".join(
                    f"{t}: {c[0]}({', '.join(_show(a) for a in c[1])})" for t, c in stuck))

    def main(self, nthreads: int = 4) -> int:
        self.server()
        self.closed_listener = netpoll.create_listener("tcp", "127.0.0.1:0")
        self.closed_listener.close()
        for _ in range(4):
            self.dial(random.Random(self.seed))
        threading.Thread(target=self.watchdog, daemon=True, name="watchdog").start()
        threads = [threading.Thread(target=self.worker, args=(i,), name=f"fuzz-{i}")
                   for i in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + HANG_S + 5)
            if t.is_alive():
                hang(f"{t.name} did not finish")
        self.stop.set()
        # Everything closes and stops within bounds, whatever state it is in.
        t0 = time.monotonic()
        for conn in self.conns + self.no_io:
            self.call("Connection.close", conn.close)
        self.call("EventLoop.shutdown", self.loop.shutdown, 5.0)
        self.reactor.stop()
        if not self.reactor.wait_stopped(15):
            hang("Reactor.stop() did not finish")
        if time.monotonic() - t0 > 20:
            hang("the final shutdown took over 20 s")
        print(f"calls: {self.calls}; slowest:", file=sys.stderr)
        for name, (took, args) in sorted(self.slowest.items(), key=lambda kv: -kv[1][0])[:6]:
            print(f"  {took:.2f} s {name}({args})", file=sys.stderr)
        strict = os.environ.get("NETPOLL_FUZZ_STRICT") == "1"
        failed = False
        for key, line in sorted(self.bad.items()):
            known = KNOWN.get((key[0], key[1]))
            if known and not strict:
                print(f"known: {line}\n    ({known})")
            else:
                print(line)
                failed = True
        return 1 if failed else 0


def _is_valid(t: object) -> bool:
    try:
        _seconds(t, "t")
        return True
    except Exception:
        return False


def _thread_runner(task) -> None:
    threading.Thread(target=task, daemon=True).start()


def _raise(*args: object) -> None:
    raise EvilError("a callback that raises")


def _pool_stats() -> object:
    from netpoll._core.linkbuffer import pool_stats
    return pool_stats()


def _vm_size() -> int:
    """The address space this process uses now, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:                 # no /proc: cap the total instead
        pass
    return 0


def hang(why: str) -> None:
    print(f"HANG: {why}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(all_threads=True)
    os._exit(3)


def main() -> None:
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 8.0
    faulthandler.enable()
    # A hostile size that is merely large (2**32) may really be allocated
    # and then copied, starving every thread for seconds on a shared
    # machine: cap the address space so that it fails with MemoryError.
    # Growth is capped, not the total: a sanitizer reserves terabytes up front.
    limit = _vm_size() + AS_LIMIT
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The last resort, from a C thread that needs no GIL (a thread spinning
    # with the GIL held stops the Python watchdog): stacks, then exit 3.
    faulthandler.dump_traceback_later(seconds + 2 * HANG_S + 20, exit=True)
    # Handlers that raise on purpose are logged by netpoll; only its
    # "unexpected" errors (a bug in netpoll itself) are kept and reported.
    unexpected: list = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "unexpected" in record.getMessage():
                unexpected.append(record.getMessage())

    log = logging.getLogger("netpoll")
    log.addHandler(Keep())
    log.propagate = False
    netpoll.configure(num_loops=2)
    fz = Fuzz(seed, seconds)
    rc = fz.main()
    for msg in unexpected[:5]:
        print(f"netpoll logged: {msg}")
    sys.stdout.flush()
    os._exit(rc or (1 if unexpected else 0))


if __name__ == "__main__":
    main()
