"""malloc() views lose their write access at flush() and malloc_ack().

Before, a view from ``writer.malloc(n)`` stayed writable after ``flush()``:
writing through it changed bytes already queued for sending and bytes a
reader held. Now flush/malloc_ack release the view (later use raises
ValueError); a view whose memory is still exported elsewhere (a slice of it,
a ctypes/numpy object over it) cannot be released, so the buffer moves those
bytes to fresh memory and the old view writes where nobody reads.
"""
import ctypes
import random

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from netpoll._core import linkbuffer as _lbmod

LinkBuffer = _lbmod.LinkBuffer


def test_view_released_at_flush():
    b = LinkBuffer()
    m = b.malloc(4)
    m[:] = b"abcd"
    b.flush()
    v = b.next(4)
    with pytest.raises(ValueError):
        m[0] = ord("X")
    assert bytes(v) == b"abcd"


def test_view_released_at_malloc_ack():
    b = LinkBuffer()
    m = b.malloc(6)
    m[:] = b"abcdef"
    b.malloc_ack(3)
    with pytest.raises(ValueError):
        m[0] = ord("X")
    b.flush()
    assert b.bytes() == b"abc"


@pytest.mark.parametrize("size", [4, 3000, 20000])
def test_slice_of_view_is_detached_at_flush(size):
    b = LinkBuffer()
    b.write_binary(b"<")
    m = b.malloc(size)
    data = random.Random(size).randbytes(size)
    m[:] = data
    tail = m[1:]                  # shares the view's memory; m.release() cannot stop it
    b.write_binary(b">")
    b.flush()
    v = b.peek(size + 2)
    r = b.next(1 + size // 2)
    tail[:] = b"X" * (size - 1)   # allowed, but changes nothing the buffer holds
    assert bytes(v) == b"<" + data + b">"
    assert bytes(r) == (b"<" + data)[:1 + size // 2]
    assert b.bytes() == (b"<" + data + b">")[1 + size // 2:]


def test_exported_view_is_detached_at_flush():
    # A ctypes array over the view holds a buffer export of the memoryview
    # itself: release() raises BufferError, so the bytes must move.
    b = LinkBuffer()
    m = b.malloc(8)
    arr = (ctypes.c_char * 8).from_buffer(m)
    arr[:] = b"12345678"
    b.flush()
    v = b.next(8)
    arr[:] = b"XXXXXXXX"
    assert bytes(v) == b"12345678"
    b.write_binary(b"after")
    b.flush()
    assert b.bytes() == b"after"


def test_exported_view_is_detached_at_malloc_ack():
    b = LinkBuffer()
    m = b.malloc(8)
    arr = (ctypes.c_char * 8).from_buffer(m)
    arr[:] = b"12345678"
    b.malloc_ack(5)
    arr[:] = b"XXXXXXXX"
    b.write_binary(b"!")
    b.flush()
    assert b.bytes() == b"12345!"


def test_detached_then_more_writes_and_split():
    # write_direct splits the malloc'd node in two; both halves move.
    b = LinkBuffer()
    m = b.malloc(6)
    keep = m[:]
    m[:] = b"AAABBB"
    b.write_direct(b"xyz", 3)
    b.write_binary(b"tail")
    b.flush()
    keep[:] = b"------"
    assert b.bytes() == b"AAAxyzBBBtail"
    b.write_binary(b"+more")
    b.flush()
    keep[:] = b"======"
    assert b.bytes() == b"AAAxyzBBBtail+more"


def test_new_export_of_retired_view_is_read_only_and_not_shared():
    b = LinkBuffer()
    m = b.malloc(2048)
    m[:] = b"a" * 2048
    exporter = m.obj
    keep = m[:]
    b.flush()
    ro = memoryview(exporter)
    assert ro.readonly
    with pytest.raises((BufferError, TypeError)):
        (ctypes.c_char * 2048).from_buffer(exporter)   # a new writable export is refused
    other = LinkBuffer()
    other.write_binary(ro)        # must be copied: `keep` can still write there
    other.flush()
    keep[:] = b"z" * 2048
    assert other.bytes() == b"a" * 2048
    assert b.bytes() == b"a" * 2048


def test_user_released_view_with_live_slice():
    b = LinkBuffer()
    m = b.malloc(4)
    m[:] = b"abcd"
    s = m[2:]
    m.release()                   # the exporter stays exported through `s`
    b.flush()
    s[:] = b"XY"
    assert b.bytes() == b"abcd"


def test_close_forgets_views():
    # close() drops the data: a malloc view may still be written (it holds
    # its chunk), nothing reads it, and a re-initialised buffer is unaffected.
    b = LinkBuffer()
    m = b.malloc(4)
    b.close()
    b.__init__()
    b.write_binary(b"new")
    b.flush()
    m[:] = b"XXXX"
    assert b.bytes() == b"new"


def test_append_settles_other_views():
    a = LinkBuffer()
    other = LinkBuffer()
    m = other.malloc(4)
    m[:] = b"abcd"
    s = m[:]
    a.append(other)               # flushes other first
    s[:] = b"XXXX"
    a.flush()
    assert a.bytes() == b"abcd"
    with pytest.raises(ValueError):
        m[0] = 1


# ------------------------------------------------------- random sequences

ops = st.lists(
    st.one_of(
        st.tuples(st.just("malloc"), st.integers(1, 12000), st.integers(0, 3)),
        st.tuples(st.just("write"), st.integers(0, 9000), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0)),
        st.tuples(st.just("ack"), st.integers(0, 100), st.just(0)),
        st.tuples(st.just("next"), st.integers(0, 100), st.just(0)),
        st.tuples(st.just("scribble"), st.integers(0, 2**16), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, seed=st.integers(0, 2**32 - 1))
def test_stale_malloc_views_change_nothing(ops, seed):
    """Random malloc/write/flush/malloc_ack/next sequences; every handle on a
    malloc view (the view, slices, a ctypes export) is kept, and after its
    flush/ack it is scribbled on: that must raise ValueError or change nothing
    (buffer contents, views read earlier)."""
    rng = random.Random(seed)
    b = LinkBuffer()
    readable = bytearray()
    unflushed = bytearray()
    current = []     # handles on malloc views not yet flushed/acked: (kind, obj)
    stale = []       # handles whose write access was taken back
    reads = []       # (view, expected)

    def retire():
        stale.extend(current)
        current.clear()

    for op, n, k in ops:
        if op == "malloc":
            m = b.malloc(n)
            payload = rng.randbytes(n)
            m[:] = payload
            unflushed += payload
            if k == 0:
                current.append(("view", m))
            elif k == 1:
                current.append(("view", m[rng.randrange(n):]))
            elif k == 2:
                current.append(("ctypes", (ctypes.c_char * n).from_buffer(m)))
            else:
                s = m[:]
                m.release()
                current.append(("view", s))
        elif op == "write":
            payload = rng.randbytes(n)
            b.write_binary(payload)
            unflushed += payload
        elif op == "flush":
            b.flush()
            readable += unflushed
            unflushed.clear()
            retire()
        elif op == "ack":
            keep = min(n, len(unflushed))
            b.malloc_ack(keep)
            del unflushed[keep:]
            retire()
        elif op == "next":
            take = min(n, len(readable))
            reads.append((b.next(take), bytes(readable[:take])))
            del readable[:take]
        elif op == "scribble":
            for kind, obj in stale:
                if kind == "view":
                    try:
                        obj[:] = bytes([n & 0xFF]) * len(obj)
                    except ValueError:
                        pass          # released: fine
                else:
                    obj[:] = bytes([n & 0xFF]) * len(obj)
        assert len(b) == len(readable)
        assert b.malloc_len() == len(unflushed)
        assert b.bytes() == readable
        for v, expected in reads:
            assert bytes(v) == expected
    b.flush()
    assert b.bytes() == readable + unflushed


def test_connection_writer_view_released_at_flush():
    """A connection's writer is a LinkBuffer: the same rule after flush()."""
    import socket

    import netpoll

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)
    conn = netpoll.dial_connection("tcp", srv.getsockname(), timeout=5.0)
    peer, _ = srv.accept()
    peer.settimeout(10)
    try:
        w = conn.writer
        m = w.malloc(4)
        m[:] = b"abcd"
        keep = m[1:]
        w.flush()
        with pytest.raises(ValueError):
            m[0] = ord("X")
        keep[:] = b"XYZ"          # detached: changes nothing queued or sent
        w.write_binary(b"!")
        w.flush()
        got = b""
        while len(got) < 5:
            chunk = peer.recv(5 - len(got))
            assert chunk
            got += chunk
        assert got == b"abcd!"
    finally:
        conn.close()
        peer.close()
        srv.close()
