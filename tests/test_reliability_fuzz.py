"""Reliability: fuzzing.

* hypothesis draws per-thread sequences of API calls run at once from
  several threads against one LinkBuffer and against one live Connection:
  close, flush, reads, release interleaved. They must never crash, hang past
  the timeout, or corrupt data: the single reader thread checks every byte it
  gets against the stream the single writer thread produced (README: one
  reader and one writer thread at a time; other threads only close, probe,
  flush or release here, which must stay memory-safe and must not alter data).
* the atheris harness fuzz/fuzz_linkbuffer.py, driven by its plain-Python
  fallback (random inputs), so it runs in CI without atheris.
"""
from __future__ import annotations

import os
import sys
import threading
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netpoll
from netpoll import LinkBuffer
from netutil import HDR, make_server, wait_until  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OK_ERRORS = (netpoll.NetpollError, ConnectionError, TimeoutError)


def _pattern(offset, n):
    return bytes((offset + i) % 251 for i in range(n))


SIZES = st.integers(min_value=0, max_value=70000)

writer_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), SIZES),
    st.tuples(st.just("malloc"), SIZES),
    st.tuples(st.just("flush"), st.just(0)),
), min_size=1, max_size=30)

reader_ops = st.lists(st.one_of(
    st.tuples(st.just("next"), SIZES),
    st.tuples(st.just("peek"), SIZES),
    st.tuples(st.just("skip"), SIZES),
    st.tuples(st.just("slice"), SIZES),
    st.tuples(st.just("release"), st.just(0)),
    st.tuples(st.just("read_binary"), SIZES),
), min_size=1, max_size=30)

chaos_ops = st.lists(st.one_of(
    st.tuples(st.just("len"), st.just(0)),
    st.tuples(st.just("empty"), st.just(0)),
    st.tuples(st.just("malloc_len"), st.just(0)),
    st.tuples(st.just("close"), st.just(0)),
    st.tuples(st.just("yield"), st.just(0)),
), min_size=0, max_size=10)


def _join_all(threads, timeout):
    for th in threads:
        th.join(timeout)
    hung = [th.name for th in threads if th.is_alive()]
    assert not hung, f"threads hung: {hung}"


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(w=writer_ops, r=reader_ops, chaos=st.lists(chaos_ops, min_size=1, max_size=3))
def test_linkbuffer_random_calls_from_several_threads(w, r, chaos):
    buf = LinkBuffer()
    errors = []
    state = {"written": 0, "read": 0}
    kept = []                              # (view, expected): must stay valid

    def writer():
        try:
            for op, n in w:
                off = state["written"]
                if op == "write":
                    buf.write_binary(_pattern(off, n))
                    state["written"] += n
                elif op == "malloc":
                    m = buf.malloc(n)
                    m[:] = _pattern(off, n)
                    state["written"] += n
                else:
                    buf.flush()
            buf.flush()
        except OK_ERRORS:
            pass
        except BaseException as e:
            errors.append(("writer", e))

    def reader():
        try:
            for op, n in r:
                off = state["read"]
                try:
                    if op == "next":
                        v = buf.next(n)
                        assert bytes(v) == _pattern(off, n), "corrupt next()"
                        kept.append((v, _pattern(off, n)))
                        state["read"] += n
                    elif op == "peek":
                        assert bytes(buf.peek(n)) == _pattern(off, n), "corrupt peek()"
                    elif op == "skip":
                        buf.skip(n)
                        state["read"] += n
                    elif op == "slice":
                        s = buf.slice(n)
                        kept.append((s, _pattern(off, n)))
                        state["read"] += n
                    elif op == "read_binary":
                        assert buf.read_binary(n) == _pattern(off, n), "corrupt read_binary()"
                        state["read"] += n
                    else:
                        buf.release()
                except netpoll.BufferUnderflowError:
                    pass                   # not written yet: consumed nothing
        except netpoll.BufferClosedError:
            pass
        except BaseException as e:
            errors.append(("reader", e))

    def chaotic(ops):
        try:
            for op, _ in ops:
                if op == "len":
                    len(buf)
                elif op == "empty":
                    buf.is_empty()
                elif op == "malloc_len":
                    buf.malloc_len()
                elif op == "close":
                    buf.close()
        except OK_ERRORS:
            pass
        except BaseException as e:
            errors.append(("chaos", e))

    threads = [threading.Thread(target=writer, name="writer"),
               threading.Thread(target=reader, name="reader")]
    threads += [threading.Thread(target=chaotic, args=(ops,), name=f"chaos{i}")
                for i, ops in enumerate(chaos)]
    for th in threads:
        th.start()
    _join_all(threads, 30)
    assert not errors, errors
    for obj, exp in kept:                  # views and slices outlive close()
        got = bytes(obj) if isinstance(obj, memoryview) else obj.bytes()
        assert got == exp
    buf.close()


# ---------------------------------------------------------------- Connection

conn_writer_ops = st.lists(st.integers(min_value=0, max_value=40000), min_size=1, max_size=15)
conn_reader_ops = st.lists(st.sampled_from(["frame", "release", "len", "peek0"]),
                           min_size=1, max_size=20)
conn_chaos_ops = st.lists(st.sampled_from(["flush", "is_active", "len", "close", "yield"]),
                          min_size=0, max_size=6)


@pytest.fixture(scope="module")
def echo_server():
    from netutil import Server, stream_echo
    srv = Server(stream_echo, "tcp", runner="pool")
    yield srv
    srv.shutdown()


@pytest.mark.timeout(180)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(sizes=st.lists(conn_writer_ops, min_size=1, max_size=3), r=conn_reader_ops,
       chaos=st.lists(conn_chaos_ops, min_size=0, max_size=2))
def test_connection_random_calls_from_several_threads(echo_server, sizes, r, chaos):
    """Several writer threads send whole frames with conn.write() (thread
    safe, never interleaved); one reader thread reads frames back from the
    echo server and checks each one (tag, length, crc); chaos threads flush,
    probe, release and close at random. Nothing may crash or hang, and every
    frame read back must be intact."""
    conn = netpoll.dial_connection("tcp", echo_server.addr, timeout=5)
    conn.set_read_timeout(5.0)
    conn.set_write_timeout(5.0)
    errors = []
    total = sum(len(s) for s in sizes)
    got = [0]

    def writer(k, ops):
        try:
            for n in ops:
                body = bytes([k]) * n
                conn.write(HDR.pack(n + 8) + k.to_bytes(4, "big")
                           + zlib.crc32(body).to_bytes(4, "big") + body)
        except OK_ERRORS:
            pass
        except BaseException as e:
            errors.append(("writer", e))

    def reader():
        rd = conn.reader
        try:
            ops = list(r) + ["frame"] * total
            for op in ops:
                if got[0] == total:
                    return
                if op == "frame":
                    (n,) = HDR.unpack(rd.next(4))
                    k = int.from_bytes(rd.next(4), "big")
                    crc = int.from_bytes(rd.next(4), "big")
                    body = rd.next(n - 8)
                    assert zlib.crc32(body) == crc and body.tobytes() == bytes([k]) * (n - 8), \
                        "corrupt or interleaved frame"
                    got[0] += 1
                elif op == "release":
                    rd.release()
                elif op == "len":
                    len(rd)
                else:
                    rd.peek(0)
        except OK_ERRORS:
            pass
        except BaseException as e:
            errors.append(("reader", e))

    def chaotic(ops):
        try:
            for op in ops:
                if op == "flush":
                    conn.writer.flush()
                elif op == "is_active":
                    conn.is_active()
                elif op == "len":
                    len(conn.reader)
                elif op == "close":
                    conn.close()
        except OK_ERRORS:
            pass
        except BaseException as e:
            errors.append(("chaos", e))

    threads = [threading.Thread(target=writer, args=(k + 1, ops), name=f"writer{k}")
               for k, ops in enumerate(sizes)]
    threads.append(threading.Thread(target=reader, name="reader"))
    threads += [threading.Thread(target=chaotic, args=(ops,), name=f"chaos{i}")
                for i, ops in enumerate(chaos)]
    try:
        for th in threads:
            th.start()
        _join_all(threads, 30)
    finally:
        conn.close()
    assert not errors, errors
    if not any("close" in ops for ops in chaos):
        assert got[0] == total, (got[0], total)


@pytest.mark.timeout(120)
def test_atheris_harness_fallback_driver():
    sys.path.insert(0, os.path.join(REPO, "fuzz"))
    try:
        import fuzz_linkbuffer
    finally:
        sys.path.pop(0)
    runs = int(os.environ.get("NETPOLL_FUZZ_RUNS", "5000"))
    fuzz_linkbuffer.fallback(runs, seed=int.from_bytes(os.urandom(4), "big"))
