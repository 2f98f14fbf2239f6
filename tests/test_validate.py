"""One rule for every time, size and count (netpoll/_validate.py), and every
public entry point of the Python layer using it: a bad value raises TypeError
(wrong type) or ValueError (negative, NaN, absurd: the message names the
bound) before anything changes; inf, like None, means no limit.

The global configuration is process-wide, so the configure() checks run in a
subprocess: a failure there cannot leak settings into other tests.
"""
from __future__ import annotations

import math
import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import netpoll
from netpoll import _validate
from netutil import stream_echo
from reactorutil import Recorder, running, wait_until  # noqa: F401  (running is a fixture)

MAX_S = _validate.MAX_SECONDS
HOSTILE_INTS = [0, 1, -1, 10**9, 10**9 + 1, 2**31 - 1, 2**31, 2**32, 2**40, 2**40 + 1,
                2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1, 2**64, 2**64 + 1,
                -(2**63), -(2**63) - 1, -(2**64), 10**400]
ints = st.one_of(st.integers(), st.sampled_from(HOSTILE_INTS),
                 st.integers(min_value=2**63 - 2**12, max_value=2**64 + 2**12))
floats = st.floats(allow_nan=True, allow_infinity=True)   # -0.0 and subnormals included
fractions = st.fractions(max_denominator=10**6)
not_numbers = st.one_of(st.text(max_size=5), st.binary(max_size=5),
                        st.lists(st.integers(), max_size=2), st.just(1j), st.just(object()))


def _expect_seconds(v, *, inf_ok=True, zero_ok=True):
    """'none', 'ok' or 'value' (ValueError) for a real number v, from the rule."""
    if isinstance(v, float) and math.isnan(v):
        return "value"
    if v == math.inf:
        return "none" if inf_ok else "value"
    if v < 0 or (v == 0 and not zero_ok) or v > MAX_S:
        return "value"
    return "ok"


@settings(max_examples=400, deadline=None)
@given(v=st.one_of(floats, ints, fractions), inf_ok=st.booleans(), zero_ok=st.booleans())
def test_seconds_rule(v, inf_ok, zero_ok):
    want = _expect_seconds(v, inf_ok=inf_ok, zero_ok=zero_ok)
    if want == "value":
        with pytest.raises(ValueError) as ei:
            _validate.seconds(v, "t", inf_ok=inf_ok, zero_ok=zero_ok)
        with pytest.raises(ValueError):
            _validate.seconds_ns(v, "t", inf_ok=inf_ok, zero_ok=zero_ok)
        msg = str(ei.value)
        assert msg.startswith("t ")
        if v == v and v > MAX_S:
            assert "MAX_SECONDS" in msg and "1e+09" in msg, msg       # names the bound
        return
    got = _validate.seconds(v, "t", inf_ok=inf_ok, zero_ok=zero_ok)
    ns = _validate.seconds_ns(v, "t", inf_ok=inf_ok, zero_ok=zero_ok)
    if want == "none":
        assert got is None and ns == -1
        return
    assert type(got) is float and got == float(v)
    assert math.copysign(1.0, got) == 1.0                   # -0.0 is 0
    assert type(ns) is int and 0 <= ns <= 10**18
    if isinstance(v, float):
        assert ns == math.ceil(v * 1e9) or (v > 0 and ns == 1)
    else:
        assert ns == math.ceil(Fraction(v) * 10**9)          # exact, never early
    if v > 0:
        assert ns >= 1


@settings(max_examples=100, deadline=None)
@given(v=st.one_of(st.booleans(), not_numbers))
def test_seconds_wrong_types_raise_type_error(v):
    for fn in (_validate.seconds, _validate.seconds_ns):
        with pytest.raises(TypeError):
            fn(v, "t")


def test_seconds_none_and_inf_mean_no_limit_unless_refused():
    assert _validate.seconds(None, "t") is None and _validate.seconds_ns(None, "t") == -1
    assert _validate.seconds(math.inf, "t") is None and _validate.seconds_ns(math.inf, "t") == -1
    with pytest.raises(TypeError, match="number of seconds"):
        _validate.seconds(None, "t", none_ok=False)
    with pytest.raises(ValueError, match="MAX_SECONDS"):
        _validate.seconds(math.inf, "t", inf_ok=False)
    for zero in (0, 0.0, -0.0, Fraction(0)):
        assert _validate.seconds_ns(zero, "t") == 0
        with pytest.raises(ValueError, match="> 0"):
            _validate.seconds(zero, "t", zero_ok=False)
    assert _validate.seconds_ns(5e-324, "t", zero_ok=False) == 1      # positive stays positive
    assert _validate.seconds(MAX_S, "t") == MAX_S
    assert _validate.seconds_ns(MAX_S, "t") == 10**18                 # fits int64
    assert _validate.seconds_ns(0.1, "t") == 100_000_000
    assert _validate.seconds_ns(Fraction(1, 3), "t") == 333_333_334


def test_seconds_accepts_other_reals():
    from decimal import Decimal
    assert _validate.seconds(Decimal("0.25"), "t") == 0.25
    with pytest.raises(ValueError, match="MAX_SECONDS"):
        _validate.seconds(Decimal("1e400"), "t")        # finite, beyond float range: absurd
    with pytest.raises(ValueError):
        _validate.seconds(Decimal("NaN"), "t")
    np = pytest.importorskip("numpy")
    assert _validate.seconds(np.float32(0.5), "t") == 0.5
    assert _validate.seconds(np.int64(3), "t") == 3.0
    assert _validate.seconds_ns(np.float64("inf"), "t") == -1
    with pytest.raises(ValueError):
        _validate.seconds(np.float64("nan"), "t")
    with pytest.raises(TypeError):
        _validate.seconds(np.bool_(True), "t")


@settings(max_examples=400, deadline=None)
@given(v=ints, lo=st.integers(-5, 5), hi=st.sampled_from([0, 10, 2**31 - 1, 2**63 - 1, None]))
def test_size_rule(v, lo, hi):
    maximum = _validate.MAX_SIZE if hi is None else hi
    if v < lo or v > maximum:
        with pytest.raises(ValueError) as ei:
            _validate.size(v, "n", minimum=lo, maximum=maximum)
        bound = lo if v < lo else maximum
        assert str(bound) in str(ei.value)                       # names the bound
        assert len(str(ei.value)) < 200                          # 10**400 is not printed
    else:
        got = _validate.size(v, "n", minimum=lo, maximum=maximum)
        assert type(got) is int and got == v


@settings(max_examples=100, deadline=None)
@given(v=st.one_of(st.booleans(), floats, fractions, not_numbers))
def test_size_wrong_types_raise_type_error(v):
    with pytest.raises(TypeError):
        _validate.size(v, "n")


def test_size_none_and_int_likes():
    assert _validate.size(None, "n", none_ok=True) is None
    with pytest.raises(TypeError, match="int"):
        _validate.size(None, "n")

    class MyInt(int):
        pass

    got = _validate.size(MyInt(7), "n")
    assert got == 7 and type(got) is int
    np = pytest.importorskip("numpy")
    assert _validate.size(np.int64(9), "n") == 9


# ------------------------------------------------------- public entry points


def test_event_loop_checks_times_and_input_limit():
    on_request = stream_echo
    bad = [({"input_limit": 2**64}, ValueError), ({"input_limit": 2**40 + 1}, ValueError),
           ({"input_limit": -1}, ValueError), ({"input_limit": 1.5}, TypeError),
           ({"input_limit": True}, TypeError), ({"read_timeout": 2**64}, ValueError),
           ({"write_timeout": 1e10}, ValueError), ({"idle_timeout": float("nan")}, ValueError),
           ({"idle_timeout": -0.5}, ValueError), ({"read_timeout": True}, TypeError),
           ({"read_timeout": "1"}, TypeError)]
    for kw, exc in bad:
        with pytest.raises(exc):
            netpoll.EventLoop(on_request, **kw)
    loop = netpoll.EventLoop(on_request, read_timeout=float("inf"), write_timeout=Fraction(1, 2),
                             idle_timeout=-0.0, input_limit=2**40)
    assert loop.read_timeout is None                    # inf: no limit, as None
    assert loop.write_timeout == 0.5 and loop.idle_timeout == 0.0
    assert loop.input_limit == 2**40


def test_event_loop_shutdown_checks_timeout_first():
    loop = netpoll.EventLoop(stream_echo)
    for bad, exc in ((2**64, ValueError), (float("nan"), ValueError), (-1, ValueError),
                     ("5", TypeError), (True, TypeError)):
        with pytest.raises(exc):
            loop.shutdown(bad)
        assert "shut down" not in repr(loop)            # nothing changed
    loop.shutdown(float("inf"))                         # no connections: returns at once
    assert "shut down" in repr(loop)


def test_dialer_checks_times_and_inf_means_no_limit():
    for kw, exc in (({"read_timeout": 1e10}, ValueError), ({"idle_timeout": 2**63}, ValueError),
                    ({"write_timeout": True}, TypeError), ({"write_timeout": -1}, ValueError)):
        with pytest.raises(exc):
            netpoll.Dialer(**kw)
    d = netpoll.Dialer(read_timeout=float("inf"), write_timeout=Fraction(3, 2))
    assert d.read_timeout is None and d.write_timeout == 1.5


@pytest.mark.timeout(30)
def test_dial_with_an_infinite_timeout_connects():
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(4)
        addr = lst.getsockname()
        for t in (float("inf"), MAX_S, Fraction(5)):
            conn = netpoll.dial_connection("tcp", f"{addr[0]}:{addr[1]}", timeout=t)
            peer, _ = lst.accept()
            peer.close()
            conn.close()
        for bad, exc in ((MAX_S * 2, ValueError), (float("nan"), ValueError),
                         (-1, ValueError), ("1", TypeError), (True, TypeError)):
            with pytest.raises(exc):
                netpoll.dial_connection("tcp", addr, timeout=bad)


BAD_PORTS = [" 0", "0 ", "+0", "0_0", "-1", "0x0", "0o0", "\u0660", "", "65536", "999999",
             "１"]


def test_ports_in_address_strings_are_plain_decimal_digits():
    for p in BAD_PORTS:
        with pytest.raises(ValueError, match="port"):
            netpoll.create_listener("tcp", f"127.0.0.1:{p}")
        with pytest.raises(ValueError, match="port"):
            netpoll.dial_connection("tcp", f"127.0.0.1:{p}", timeout=1)
    with netpoll.create_listener("tcp", "127.0.0.1:00") as lst:    # leading zeros are digits
        assert lst.addr[1] > 0


def test_ports_in_address_tuples_are_ints():
    for bad, exc in (((("127.0.0.1", True)), TypeError), (("127.0.0.1", "0"), TypeError),
                     (("127.0.0.1", 0.0), TypeError), (("127.0.0.1", 65536), ValueError),
                     (("127.0.0.1", 2**64), ValueError), (("127.0.0.1", -1), ValueError)):
        with pytest.raises(exc):
            netpoll.create_listener("tcp", bad)


def test_create_listener_checks_backlog_and_mode_before_binding():
    d = tempfile.mkdtemp()
    path = os.path.join(d, "l.sock")
    for kw, exc in (({"backlog": 2**64}, ValueError), ({"backlog": 2**31}, ValueError),
                    ({"backlog": -1}, ValueError), ({"backlog": True}, TypeError),
                    ({"backlog": "5"}, TypeError), ({"mode": 0o1777}, ValueError),
                    ({"mode": -1}, ValueError), ({"mode": "600"}, TypeError)):
        with pytest.raises(exc):
            netpoll.create_listener("unix", path, **kw)
        assert not os.path.lexists(path), kw             # nothing bound, no file left
    with netpoll.create_listener("unix", path, backlog=2**31 - 1, mode=0o640) as lst:
        assert stat.S_IMODE(os.lstat(lst.addr).st_mode) == 0o640
    os.rmdir(d)


CONFIGURE_SCRIPT = textwrap.dedent("""
    import netpoll
    from netpoll.config import runtime

    rt = runtime()
    def state():
        return (rt.num_loops, rt.load_balance, rt.buffer_size, rt.runner, rt.pool_size,
                rt.started, len(rt.pollers))
    before = state()
    bad = [
        (dict(num_loops=2**64), ValueError), (dict(num_loops=1025), ValueError),
        (dict(num_loops=0), ValueError), (dict(num_loops=2.0), TypeError),
        (dict(buffer_size=2**40), ValueError), (dict(buffer_size=(64 << 20) + 1), ValueError),
        (dict(buffer_size=0), ValueError), (dict(buffer_size=True), TypeError),
        (dict(pool_size=4097), ValueError), (dict(pool_size=2**63), ValueError),
        (dict(pool_size="4"), TypeError),
        # one bad argument among good ones: nothing is applied
        (dict(num_loops=2, load_balance=netpoll.LoadBalance.RANDOM, runner="inline",
              pool_size=4, buffer_size=2**64), ValueError),
        (dict(num_loops=2, load_balance=netpoll.LoadBalance.RANDOM, buffer_size=4096,
              runner="threads"), ValueError),
        (dict(num_loops=3, buffer_size=4096, load_balance="random"), TypeError),
        (dict(load_balance=netpoll.LoadBalance.RANDOM, pool_size=0), ValueError),
    ]
    for kw, exc in bad:
        try:
            netpoll.configure(**kw)
        except exc:
            pass
        else:
            raise SystemExit(f"configure({kw}) did not raise {exc.__name__}")
        assert state() == before, (kw, before, state())
    for n, exc in ((2**64, ValueError), (1025, ValueError), (True, TypeError)):
        try:
            netpoll.set_num_loops(n)
        except exc:
            pass
        else:
            raise SystemExit(f"set_num_loops({n}) did not raise {exc.__name__}")
        assert state() == before, (n, state())
    netpoll.configure(num_loops=1024, buffer_size=64 << 20, pool_size=4096,
                      load_balance=netpoll.LoadBalance.RANDOM, runner="inline")
    assert state()[:5] == (1024, netpoll.LoadBalance.RANDOM, 64 << 20, "inline", 4096), state()
    print("OK")
""")


@pytest.mark.timeout(60)
def test_configure_checks_every_argument_before_applying_any():
    r = subprocess.run([sys.executable, "-c", CONFIGURE_SCRIPT], capture_output=True,
                       text=True, timeout=50)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr


def test_acceptor_checks_numbers_before_binding(running):
    r = running().reactor
    d = tempfile.mkdtemp()
    path = os.path.join(d, "a.sock")
    for kw, exc in (({"backlog": 2**64}, ValueError), ({"backlog": 2**31}, ValueError),
                    ({"backlog": -1}, ValueError), ({"backlog": 1.0}, TypeError),
                    ({"rcvbuf": 2**31}, ValueError), ({"rcvbuf": True}, TypeError)):
        with pytest.raises(exc):
            netpoll.Acceptor(r, "unix:" + path, Recorder, **kw)
        assert not os.path.lexists(path), kw
    os.rmdir(d)


@pytest.mark.timeout(30)
def test_connector_timeout_inf_means_no_limit(running):
    r = running().reactor
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(4)
        addr = "127.0.0.1:%d" % lst.getsockname()[1]
        c = netpoll.Connector(r)
        for bad, exc in ((0, ValueError), (-0.0, ValueError), (2e9, ValueError),
                         (float("nan"), ValueError), (True, TypeError), ("1", TypeError)):
            h = Recorder()
            with pytest.raises(exc):
                c.connect(addr, h, timeout=bad)
            assert h.calls == []
        h = Recorder()
        c.connect(addr, h, timeout=float("inf"))
        assert h.opened.wait(5), h.calls
        h.destroy()


@pytest.mark.timeout(30)
def test_connect_pool_checks_everything_up_front(running):
    r = running().reactor
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(16)
        lst.settimeout(0.3)
        addr = "127.0.0.1:%d" % lst.getsockname()[1]
        c = netpoll.Connector(r)
        made = []

        def factory():
            made.append(Recorder())
            return made[-1]

        for kw, exc in (({"timeout": -1}, ValueError), ({"timeout": 0}, ValueError),
                        ({"timeout": "1"}, TypeError), ({"timeout": 2e9}, ValueError),
                        ({"retry_interval": float("inf")}, ValueError),
                        ({"retry_interval": None}, TypeError),
                        ({"retry_interval": 0}, ValueError),
                        ({"max_live": 2**64}, ValueError), ({"min_idle": -1}, ValueError),
                        ({"min_idle": 8, "max_live": 4}, ValueError),
                        ({"refill_batch": True}, TypeError)):
            with pytest.raises(exc):
                netpoll.ConnectPool(c, addr, factory, **kw)
        assert made == []                               # no connect was started
        with pytest.raises(socket.timeout):
            lst.accept()
        pool = netpoll.ConnectPool(c, addr, factory, min_idle=1, timeout=float("inf"))
        try:
            assert wait_until(lambda: pool.idle_count == 1, 5)
        finally:
            pool.close()


# ------------------------------------------- the one Unix binder, both users


def test_acceptor_unix_socket_is_bound_like_create_listener(running):
    r = running().reactor
    d = tempfile.mkdtemp()
    path = os.path.join(d, "a.sock")
    target = os.path.join(d, "target")
    open(target, "w").close()
    os.symlink(target, path)
    for make in (lambda: netpoll.create_listener("unix", path),
                 lambda: netpoll.Acceptor(r, "unix:" + path, Recorder)):
        with pytest.raises(FileExistsError):
            make()                                      # a symlink is never followed
        assert os.path.islink(path) and os.path.isfile(target)
    os.unlink(path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                                       # a stale socket file is replaced
    acc = netpoll.Acceptor(r, "unix:" + path, Recorder)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600     # owner only, as create_listener
        with socket.socket(socket.AF_UNIX) as cl:
            cl.connect(path)
    finally:
        acc.close()
    assert not os.path.lexists(path)
    os.unlink(target)
    os.rmdir(d)


def test_listener_close_leaves_a_replacement_file_alone():
    d = tempfile.mkdtemp()
    path = os.path.join(d, "l.sock")
    lst = netpoll.create_listener("unix", path)
    os.unlink(path)
    open(path, "w").close()                             # someone else's file now
    lst.close()
    assert os.path.isfile(path)
    os.unlink(path)
    os.rmdir(d)
