"""API behaviour and error cases of netpoll.LinkBuffer.

The state machine in test_linkbuffer_model.py covers random operation
sequences; this file pins each method's contract, error cases and edge cases
one at a time, so a failure names the broken behaviour directly.
"""
import array
import gc
import random
import subprocess
import sys
import textwrap

import pytest

import netpoll.errors as _errors
from netpoll._core import linkbuffer as _lbmod

LinkBuffer = _lbmod.LinkBuffer
NetpollError = _errors.NetpollError
BufferUnderflowError = _errors.BufferUnderflowError
BufferClosedError = getattr(_errors, "BufferClosedError", None) or _lbmod.BufferClosedError
pool_stats = _lbmod.pool_stats
pool_trim = _lbmod.pool_trim

# Bigger than any internal node (nodes are ~4-8 KiB), so data of this size
# always spans several nodes.
MULTI_NODE = 20000


def rbytes(n, seed=0):
    return random.Random(seed).randbytes(n)


def filled(data=b"", unflushed=b""):
    buf = LinkBuffer()
    if data:
        buf.write_binary(data)
    buf.flush()
    if unflushed:
        buf.write_binary(unflushed)
    return buf


def state(buf):
    """Everything observable about a buffer without changing it."""
    return (len(buf), buf.malloc_len(), buf.bytes(), buf.is_empty())


def drain(buf):
    """Flush and read everything, returning the bytes (consumes the buffer)."""
    buf.flush()
    return buf.read_binary(len(buf))


# ---------------------------------------------------------------------------
# exports and exception hierarchy
# ---------------------------------------------------------------------------

def test_public_exports():
    import netpoll

    assert netpoll.LinkBuffer is LinkBuffer
    assert netpoll.NetpollError is NetpollError


def test_exception_hierarchy():
    assert issubclass(BufferUnderflowError, NetpollError)
    assert issubclass(BufferUnderflowError, IndexError)
    assert issubclass(BufferClosedError, NetpollError)
    assert BufferClosedError is _errors.BufferClosedError


# ---------------------------------------------------------------------------
# constructor
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("hint", [0, 1, 4096, 100000])
def test_constructor_size_hint(hint):
    buf = LinkBuffer(hint)
    assert len(buf) == 0 and buf.is_empty() and buf.malloc_len() == 0
    data = rbytes(hint + 10, seed=hint)
    assert buf.write_binary(data) == len(data)
    assert len(buf) == 0  # not flushed yet
    buf.flush()
    assert buf.bytes() == data


def test_constructor_default():
    buf = LinkBuffer()
    assert len(buf) == 0 and buf.is_empty() and buf.malloc_len() == 0


@pytest.mark.parametrize("bad", [None, "1", 1.5, [], b"1", object()])
def test_constructor_type_errors(bad):
    with pytest.raises(TypeError):
        LinkBuffer(bad)


@pytest.mark.parametrize("bad", [-1, -4096])
def test_constructor_negative(bad):
    with pytest.raises(ValueError):
        LinkBuffer(bad)


@pytest.mark.parametrize("bad", [2**70, -(2**70)])
def test_constructor_huge(bad):
    with pytest.raises((OverflowError, ValueError)):
        LinkBuffer(bad)


# ---------------------------------------------------------------------------
# flush / len / is_empty
# ---------------------------------------------------------------------------

def test_unflushed_data_is_not_readable():
    buf = LinkBuffer()
    buf.write_binary(b"hello")
    assert len(buf) == 0 and buf.is_empty()
    assert buf.malloc_len() == 5
    assert buf.bytes() == b""
    with pytest.raises(BufferUnderflowError):
        buf.next(1)
    buf.flush()
    assert len(buf) == 5 and not buf.is_empty() and buf.malloc_len() == 0
    assert buf.bytes() == b"hello"
    buf.flush()  # flushing nothing is a no-op
    assert state(buf) == (5, 0, b"hello", False)


def test_bytes_does_not_consume():
    buf = filled(b"abc")
    assert buf.bytes() == b"abc"
    assert buf.bytes() == b"abc"
    assert type(buf.bytes()) is bytes
    assert len(buf) == 3


# ---------------------------------------------------------------------------
# reads
# ---------------------------------------------------------------------------

def test_next_and_peek_basic():
    buf = filled(b"hello world")
    p = buf.peek(5)
    assert isinstance(p, memoryview) and bytes(p) == b"hello"
    assert len(buf) == 11
    v = buf.next(6)
    assert isinstance(v, memoryview) and bytes(v) == b"hello "
    assert len(buf) == 5
    assert buf.bytes() == b"world"
    assert bytes(p) == b"hello"  # the peeked view is unaffected by the read


def test_views_are_read_only():
    buf = filled(b"x" * 10 + rbytes(MULTI_NODE))
    views = [buf.peek(3), buf.next(3), buf.until(b"x")]
    buf.skip(len(buf) - MULTI_NODE)
    views.append(buf.peek(MULTI_NODE))  # multi-node: may be a copy, still read-only
    views.append(buf.next(MULTI_NODE))
    for v in views:
        assert v.readonly
        with pytest.raises(TypeError):
            v[0] = 1
        with pytest.raises(TypeError):
            v[:1] = b"z"


def test_view_exporter_refuses_writable_buffers():
    # The object behind a read view must not hand out writable memory either
    # (ctypes.from_buffer asks for a writable buffer).
    import ctypes

    buf = filled(b"abcdef" + rbytes(MULTI_NODE))
    for v in (buf.peek(3), buf.next(3), buf.until(b"f"), buf.next(MULTI_NODE)):
        with pytest.raises((TypeError, BufferError, ValueError)):
            (ctypes.c_char * len(v)).from_buffer(v.obj)
        with pytest.raises((TypeError, BufferError, ValueError)):
            (ctypes.c_char * len(v)).from_buffer(v)


def test_zero_length_reads():
    buf = LinkBuffer()
    for b in (buf, filled(b"abc")):
        before = state(b)
        assert bytes(b.next(0)) == b""
        assert len(b.next(0)) == 0
        assert bytes(b.peek(0)) == b""
        assert b.skip(0) is None
        assert b.read_binary(0) == b""
        assert b.read_string(0) == ""
        s = b.slice(0)
        assert isinstance(s, LinkBuffer) and len(s) == 0 and s.bytes() == b""
        assert state(b) == before


def test_zero_length_views_are_independent():
    # Releasing one empty view (e.g. via `with buf.next(n) as v:` with n == 0)
    # must not affect the empty views other calls return. Run in a child
    # process: if the implementation shares one empty view, releasing it would
    # break zero-length reads for every later test in this process.
    code = textwrap.dedent("""
        from netpoll._core.linkbuffer import LinkBuffer
        a = LinkBuffer()
        with a.next(0) as v:
            assert len(v) == 0
        with a.peek(0) as v:
            pass
        b = LinkBuffer()
        b.write_binary(b"xyz")
        b.flush()
        for view in (a.next(0), a.peek(0), b.next(0), b.peek(0)):
            assert bytes(view) == b"" and len(view) == 0
        assert b.read_string(0) == ""
        assert b.bytes() == b"xyz"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_with_statement_on_views():
    buf = filled(rbytes(MULTI_NODE, seed=21))
    with buf.next(10) as v:
        first = bytes(v)
    with buf.peek(MULTI_NODE - 10) as v:
        rest = bytes(v)
    assert first + rest == rbytes(MULTI_NODE, seed=21)
    assert len(buf) == MULTI_NODE - 10


def test_skip():
    buf = filled(b"0123456789")
    assert buf.skip(3) is None
    assert buf.bytes() == b"3456789"
    buf.skip(7)
    assert buf.is_empty()


def test_read_binary_and_byte():
    buf = filled(b"\x00\x01\xffrest")
    assert buf.read_byte() == 0
    assert buf.read_byte() == 1
    b = buf.read_byte()
    assert b == 255 and type(b) is int
    r = buf.read_binary(4)
    assert r == b"rest" and type(r) is bytes
    with pytest.raises(BufferUnderflowError):
        buf.read_byte()


def test_read_string():
    text = "héllo wörld €𝄞"
    buf = LinkBuffer()
    n = buf.write_string(text)
    assert n == len(text.encode())
    buf.flush()
    s = buf.read_string(n)
    assert s == text and type(s) is str
    assert buf.is_empty()


def test_read_string_multinode():
    text = "héllo wörld € 𝄞 " * 2000  # multi-byte chars straddle node boundaries
    buf = LinkBuffer()
    n = buf.write_string(text)
    buf.flush()
    assert n == len(text.encode()) > MULTI_NODE
    assert buf.read_string(n) == text


@pytest.mark.parametrize("data,n", [
    (b"\xff\xfeabc", 5),       # invalid start byte
    (b"ab\xc3\xa9", 3),        # cuts a 2-byte char in half
    (b"\xed\xa0\x80", 3),      # encoded surrogate: not valid UTF-8
])
def test_read_string_invalid_utf8_consumes_nothing(data, n):
    buf = filled(data, unflushed=b"tail")
    before = state(buf)
    with pytest.raises(UnicodeDecodeError):
        buf.read_string(n)
    assert state(buf) == before
    with pytest.raises(UnicodeDecodeError):
        buf.read_string(n)
    assert drain(buf) == data + b"tail"


def test_until_variants():
    data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody;end"
    buf = filled(data)
    v = buf.until(b"\n")
    assert isinstance(v, memoryview) and v.readonly
    assert bytes(v) == b"GET / HTTP/1.1\r\n"
    assert bytes(buf.until(10)) == b"Host: x\r\n"
    assert bytes(buf.until(bytearray(b"\n"))) == b"\r\n"
    assert bytes(buf.until(memoryview(b";"))) == b"body;"
    assert bytes(buf.until(ord("d"))) == b"end"
    assert buf.is_empty()


def test_until_other_bytes_like_delimiters():
    # "a bytes-like of length exactly 1": not just bytes/bytearray/memoryview
    buf = filled(b"ab\ncd\nef\n")
    assert bytes(buf.until(array.array("B", b"\n"))) == b"ab\n"
    assert bytes(buf.until(memoryview(b"\n").cast("c"))) == b"cd\n"
    assert bytes(buf.until(memoryview(bytearray(b"\n")))) == b"ef\n"


@pytest.mark.parametrize("bad", [
    array.array("i", [266]),              # one item, but 4 bytes
    memoryview(array.array("i", [266])),  # len() == 1, nbytes == 4
    memoryview(array.array("H", [10])),   # len() == 1, nbytes == 2
])
def test_until_multibyte_items_are_not_one_byte(bad):
    buf = filled(b"ab\ncd")
    with pytest.raises(ValueError):
        buf.until(bad)
    assert buf.bytes() == b"ab\ncd"


def test_until_first_byte_and_zero_byte():
    buf = filled(b"\x00abc\x00")
    assert bytes(buf.until(0)) == b"\x00"
    assert bytes(buf.until(b"\x00")) == b"abc\x00"
    buf = filled(b"\xffx")
    assert bytes(buf.until(255)) == b"\xff"


def test_until_multinode():
    data = rbytes(3 * MULTI_NODE, seed=7).replace(b"\n", b"") + b"\n" + b"rest"
    buf = filled(data)
    v = buf.until(b"\n")
    assert bytes(v) == data[: data.index(b"\n") + 1]
    assert buf.bytes() == b"rest"


def test_until_not_found_consumes_nothing():
    buf = filled(b"abcdef", unflushed=b"\n")  # the delimiter is only in unflushed data
    before = state(buf)
    with pytest.raises(BufferUnderflowError):
        buf.until(b"\n")
    with pytest.raises(BufferUnderflowError):
        buf.until(10)
    assert state(buf) == before
    buf.flush()
    assert bytes(buf.until(b"\n")) == b"abcdef\n"
    with pytest.raises(BufferUnderflowError):
        LinkBuffer().until(b"\n")


@pytest.mark.parametrize("bad,exc", [
    (256, ValueError),
    (-1, ValueError),
    (2**70, (ValueError, OverflowError)),
    (-(2**70), (ValueError, OverflowError)),
    (b"", ValueError),
    (b"ab", ValueError),
    (bytearray(b"ab"), ValueError),
    ("a", TypeError),
    ("", TypeError),
    (None, TypeError),
    (1.5, TypeError),
    ([10], TypeError),
    (object(), TypeError),
])
def test_until_bad_delimiter(bad, exc):
    buf = filled(b"a\nb")
    before = state(buf)
    with pytest.raises(exc):
        buf.until(bad)
    assert state(buf) == before


READERS = ["next", "peek", "skip", "read_string", "read_binary", "slice"]


@pytest.mark.parametrize("method", READERS)
def test_read_past_end_consumes_nothing(method):
    data = b"abcdefgh"
    buf = filled(data, unflushed=b"unflushed")
    before = state(buf)
    for n in (9, 10, 100, MULTI_NODE):
        with pytest.raises(BufferUnderflowError):
            getattr(buf, method)(n)
        assert state(buf) == before
    # still fully usable
    assert drain(buf) == data + b"unflushed"


@pytest.mark.parametrize("method", READERS)
def test_read_past_end_multinode_consumes_nothing(method):
    data = rbytes(3 * MULTI_NODE, seed=3)
    buf = filled(data)
    buf.skip(100)
    buf.release()
    before = state(buf)
    with pytest.raises(BufferUnderflowError):
        getattr(buf, method)(len(data) - 99)
    assert state(buf) == before
    assert buf.read_binary(len(buf)) == data[100:]


def test_read_byte_empty():
    buf = filled(b"", unflushed=b"x")
    with pytest.raises(BufferUnderflowError):
        buf.read_byte()
    assert buf.malloc_len() == 1


GARBAGE_SIZES = [
    (None, TypeError),
    ("3", TypeError),
    (3.0, TypeError),
    (b"3", TypeError),
    ([], TypeError),
    (object(), TypeError),
    (-1, ValueError),
    (-(2**70), (ValueError, OverflowError)),
]


@pytest.mark.parametrize("method", READERS)
@pytest.mark.parametrize("bad,exc", GARBAGE_SIZES)
def test_read_garbage_sizes(method, bad, exc):
    buf = filled(b"abcdef", unflushed=b"xy")
    before = state(buf)
    with pytest.raises(exc):
        getattr(buf, method)(bad)
    assert state(buf) == before
    assert drain(buf) == b"abcdefxy"


@pytest.mark.parametrize("method", READERS)
def test_read_huge_size(method):
    buf = filled(b"abcdef")
    before = state(buf)
    with pytest.raises((OverflowError, ValueError, BufferUnderflowError)):
        getattr(buf, method)(2**70)
    with pytest.raises((OverflowError, ValueError, BufferUnderflowError)):
        getattr(buf, method)(sys.maxsize)
    assert state(buf) == before


def test_read_byte_takes_no_argument():
    buf = filled(b"ab")
    with pytest.raises(TypeError):
        buf.read_byte(1)
    assert buf.bytes() == b"ab"


# ---------------------------------------------------------------------------
# zero-copy and view lifetime
# ---------------------------------------------------------------------------

def test_next_within_one_node_is_zero_copy():
    # Views of single-node data share the buffer's chunk: no chunk is allocated.
    # (The malloc view itself is released at flush, see test_linkbuffer_views.)
    buf = LinkBuffer()
    m = buf.malloc(100)
    m[:] = b"a" * 99 + b"b"
    buf.flush()
    gc.collect()
    before = pool_stats()["chunks_in_use"]
    p = buf.peek(10)
    v = buf.next(10)
    w = buf.next(90)
    assert pool_stats()["chunks_in_use"] == before
    assert bytes(p) == bytes(v) == b"a" * 10 and bytes(w) == b"a" * 89 + b"b"
    with pytest.raises(ValueError):
        m[0] = ord("b")


def test_slice_within_one_node_is_zero_copy():
    buf = LinkBuffer()
    m = buf.malloc(100)
    m[:] = b"a" * 100
    buf.flush()
    gc.collect()
    before = pool_stats()["chunks_in_use"]
    s = buf.slice(10)
    assert pool_stats()["chunks_in_use"] == before
    with pytest.raises(ValueError):
        m[1] = ord("z")
    assert s.bytes() == b"a" * 10


def test_slice_does_not_allocate_chunks():
    buf = filled(rbytes(3 * MULTI_NODE))
    gc.collect()
    before = pool_stats()
    slices = [buf.slice(100), buf.slice(2 * MULTI_NODE)]
    after = pool_stats()
    assert after["chunks_in_use"] == before["chunks_in_use"]
    assert after["bytes_in_use"] == before["bytes_in_use"]
    del slices


def test_views_survive_release():
    data = rbytes(3 * MULTI_NODE, seed=11)
    buf = filled(data)
    views = []
    pos = 0
    for n in (1, 100, 5000, 7000, MULTI_NODE, 3):
        views.append((buf.next(n), data[pos:pos + n]))
        pos += n
    peek = buf.peek(50)
    buf.release()
    # reuse the freed memory as hard as possible
    for _ in range(20):
        buf.write_binary(b"\xAA" * 8192)
        junk = LinkBuffer()
        junk.write_binary(b"\x55" * 8192)
        junk.flush()
        junk.release()
    buf.flush()
    buf.skip(len(buf) - 20 * 8192 - 0)
    buf.release()
    for v, expected in views:
        assert bytes(v) == expected
    assert bytes(peek) == data[pos:pos + 50]


def test_views_survive_close():
    data = rbytes(2 * MULTI_NODE, seed=12)
    buf = filled(data)
    v1 = buf.next(10)
    v2 = buf.next(MULTI_NODE)
    p = buf.peek(MULTI_NODE - 10)
    u = buf.until(data[MULTI_NODE + 10 + 5])
    buf.close()
    gc.collect()
    # allocate lots of node memory elsewhere to overwrite freed chunks, if any
    others = [filled(b"\xEE" * 8192) for _ in range(50)]
    assert bytes(v1) == data[:10]
    assert bytes(v2) == data[10:MULTI_NODE + 10]
    assert bytes(p) == data[MULTI_NODE + 10:]
    assert bytes(u) == data[MULTI_NODE + 10: MULTI_NODE + 10 + len(u)]
    assert len(u) >= 1 and u[-1] == data[MULTI_NODE + 10 + 5]
    for o in others:
        o.close()


def test_views_keep_memory_alive_in_pool_stats():
    gc.collect()
    pool_trim()
    base = pool_stats()
    buf = filled(rbytes(MULTI_NODE))
    v = buf.next(100)
    buf.close()
    mid = pool_stats()
    assert mid["bytes_in_use"] > base["bytes_in_use"]
    assert mid["chunks_in_use"] > base["chunks_in_use"]
    assert bytes(v) == rbytes(MULTI_NODE)[:100]
    del v, buf
    gc.collect()
    end = pool_stats()
    assert end["bytes_in_use"] == base["bytes_in_use"]
    assert end["chunks_in_use"] == base["chunks_in_use"]


# ---------------------------------------------------------------------------
# slice
# ---------------------------------------------------------------------------

def test_slice_basic():
    buf = filled(b"0123456789", unflushed=b"AB")
    s = buf.slice(4)
    assert isinstance(s, LinkBuffer)
    assert len(s) == 4 and s.malloc_len() == 0 and s.bytes() == b"0123"
    assert buf.bytes() == b"456789" and buf.malloc_len() == 2
    assert s.read_binary(2) == b"01"
    assert s.bytes() == b"23"
    assert buf.bytes() == b"456789"


def test_slice_is_independent_buffer():
    buf = filled(b"0123456789")
    s = buf.slice(5)
    # writing to the slice must not leak into the parent and vice versa
    s.write_binary(b"XYZ")
    s.flush()
    buf.write_binary(b"abc")
    buf.flush()
    assert s.bytes() == b"01234XYZ"
    assert buf.bytes() == b"56789abc"


def test_slice_survives_parent_release_close_and_writes():
    data = rbytes(4 * MULTI_NODE, seed=5)
    buf = filled(data)
    buf.skip(7)
    s1 = buf.slice(10)                  # within one node
    s2 = buf.slice(2 * MULTI_NODE)      # across nodes
    v = buf.next(5)
    buf.release()
    assert s1.bytes() == data[7:17]
    assert s2.bytes() == data[17:17 + 2 * MULTI_NODE]
    for _ in range(10):
        buf.write_binary(b"\x11" * 10000)
        buf.flush()
        buf.skip(10000)
        buf.release()
    assert s1.bytes() == data[7:17]
    assert s2.bytes() == data[17:17 + 2 * MULTI_NODE]
    buf.close()
    filler = [filled(b"\x22" * 8192) for _ in range(40)]
    assert s1.bytes() == data[7:17]
    assert s2.bytes() == data[17:17 + 2 * MULTI_NODE]
    assert bytes(v) == data[17 + 2 * MULTI_NODE: 22 + 2 * MULTI_NODE]
    assert s2.read_binary(2 * MULTI_NODE) == data[17:17 + 2 * MULTI_NODE]
    del filler


def test_slice_of_slice_and_close_slice():
    data = rbytes(MULTI_NODE, seed=9)
    buf = filled(data)
    s = buf.slice(MULTI_NODE - 100)
    ss = s.slice(5000)
    s.close()
    assert ss.bytes() == data[:5000]
    assert buf.bytes() == data[MULTI_NODE - 100:]
    ss.close()
    assert buf.read_binary(100) == data[MULTI_NODE - 100:]


# ---------------------------------------------------------------------------
# release
# ---------------------------------------------------------------------------

def test_release_keeps_unread_and_unflushed_data():
    data = rbytes(3 * MULTI_NODE, seed=2)
    buf = filled(data, unflushed=b"pending")
    buf.skip(MULTI_NODE + 17)
    assert buf.release() is None
    assert buf.bytes() == data[MULTI_NODE + 17:]
    assert buf.malloc_len() == 7
    buf.release()
    assert drain(buf) == data[MULTI_NODE + 17:] + b"pending"
    buf.release()
    assert buf.is_empty() and buf.malloc_len() == 0
    LinkBuffer().release()


# ---------------------------------------------------------------------------
# writes
# ---------------------------------------------------------------------------

def test_write_binary_bytes_like():
    buf = LinkBuffer()
    arr = array.array("i", [1, 2, 3])
    ba = bytearray(b"ba")
    assert buf.write_binary(b"by") == 2
    assert buf.write_binary(ba) == 2
    assert buf.write_binary(memoryview(b"0123456789")[2:5]) == 3
    assert buf.write_binary(arr) == arr.itemsize * 3
    assert buf.write_binary(b"") == 0
    assert buf.malloc_len() == 7 + arr.itemsize * 3
    ba[:] = b"XX"           # the buffer holds a copy
    arr[0] = 99
    buf.flush()
    assert buf.bytes() == b"byba234" + array.array("i", [1, 2, 3]).tobytes()


def test_write_binary_large():
    data = rbytes(10 * MULTI_NODE, seed=4)
    buf = LinkBuffer()
    assert buf.write_binary(data) == len(data)
    buf.flush()
    assert buf.bytes() == data


def test_write_binary_non_contiguous():
    buf = LinkBuffer()
    src = memoryview(b"abcdef")[::2]
    try:
        n = buf.write_binary(src)
    except (BufferError, TypeError, ValueError):
        assert buf.malloc_len() == 0
    else:
        assert n == 3
        buf.flush()
        assert buf.bytes() == b"ace"


@pytest.mark.parametrize("bad", [None, "str", 1, 1.5, [1, 2], object()])
def test_write_binary_type_errors(bad):
    buf = filled(b"r", unflushed=b"u")
    with pytest.raises(TypeError):
        buf.write_binary(bad)
    assert state(buf) == (1, 1, b"r", False)
    assert drain(buf) == b"ru"


def test_write_string():
    buf = LinkBuffer()
    assert buf.write_string("abc") == 3
    assert buf.write_string("é€") == 5
    assert buf.write_string("") == 0
    assert buf.malloc_len() == 8
    assert drain(buf) == "abcé€".encode()


@pytest.mark.parametrize("bad", [None, b"x", bytearray(b"x"), 1, 1.5, object()])
def test_write_string_type_errors(bad):
    buf = filled(b"r", unflushed=b"u")
    with pytest.raises(TypeError):
        buf.write_string(bad)
    assert state(buf) == (1, 1, b"r", False)


def test_write_string_unencodable():
    buf = filled(b"r", unflushed=b"u")
    with pytest.raises(UnicodeEncodeError):
        buf.write_string("ok\ud800")
    assert state(buf) == (1, 1, b"r", False)
    assert drain(buf) == b"ru"


def test_write_byte():
    buf = LinkBuffer()
    for i in (0, 1, 127, 128, 255):
        assert buf.write_byte(i) in (None, 1)
    assert buf.malloc_len() == 5
    assert drain(buf) == bytes([0, 1, 127, 128, 255])


@pytest.mark.parametrize("bad,exc", [
    (256, ValueError),
    (-1, ValueError),
    (2**70, (ValueError, OverflowError)),
    (-(2**70), (ValueError, OverflowError)),
    (None, TypeError),
    ("a", TypeError),
    (b"a", TypeError),
    (1.0, TypeError),
    (object(), TypeError),
])
def test_write_byte_bad(bad, exc):
    buf = filled(b"r", unflushed=b"u")
    with pytest.raises(exc):
        buf.write_byte(bad)
    assert state(buf) == (1, 1, b"r", False)


# ---------------------------------------------------------------------------
# malloc / malloc_ack / malloc_len
# ---------------------------------------------------------------------------

def test_malloc_basic():
    buf = LinkBuffer()
    m = buf.malloc(5)
    assert isinstance(m, memoryview)
    assert not m.readonly and m.nbytes == 5 and len(m) == 5
    assert buf.malloc_len() == 5 and len(buf) == 0
    m[:] = b"hello"
    buf.flush()
    assert buf.malloc_len() == 0
    assert buf.read_binary(5) == b"hello"


def test_malloc_zero():
    buf = filled(b"a")
    m = buf.malloc(0)
    assert len(m) == 0
    assert buf.malloc_len() == 0 and buf.bytes() == b"a"


def test_malloc_large_and_mixed_with_writes():
    buf = LinkBuffer()
    buf.write_binary(b"head")
    m = buf.malloc(3 * MULTI_NODE)
    assert m.nbytes == 3 * MULTI_NODE and not m.readonly
    data = rbytes(3 * MULTI_NODE, seed=6)
    m[:] = data
    buf.write_string("tail")
    assert buf.malloc_len() == 8 + 3 * MULTI_NODE
    assert drain(buf) == b"head" + data + b"tail"


def test_malloc_filled_after_later_write():
    buf = LinkBuffer()
    m = buf.malloc(3)
    buf.write_binary(b"xyz")
    m[:] = b"abc"
    buf.flush()
    assert buf.bytes() == b"abcxyz"


def test_malloc_view_safe_after_flush_release_close():
    buf = LinkBuffer()
    m = buf.malloc(MULTI_NODE)
    keep = m[:]                       # outlives the release of m at flush
    m[:] = b"\x01" * MULTI_NODE
    buf.flush()
    with pytest.raises(ValueError):
        m[0] = 2
    buf.skip(MULTI_NODE)
    buf.release()
    keep[:] = b"\x02" * MULTI_NODE  # must not corrupt anything / crash
    buf.write_binary(b"after")
    buf.flush()
    assert buf.bytes() == b"after"
    buf.close()
    keep[:] = b"\x03" * MULTI_NODE
    assert bytes(keep) == b"\x03" * MULTI_NODE
    other = filled(b"\x04" * 100)
    assert other.bytes() == b"\x04" * 100


def test_malloc_ack():
    buf = LinkBuffer()
    buf.write_binary(b"hello")
    m = buf.malloc(10)
    m[:3] = b" wo"
    assert buf.malloc_len() == 15
    assert buf.malloc_ack(8) is None
    assert buf.malloc_len() == 8
    buf.malloc_ack(8)  # no-op
    assert buf.malloc_len() == 8
    buf.write_binary(b"rld")
    assert drain(buf) == b"hello wo" + b"rld"


def test_malloc_ack_cuts_written_data_and_zero():
    buf = filled(b"R")
    buf.write_binary(b"abcdef")
    buf.malloc_ack(2)
    assert buf.malloc_len() == 2
    buf.malloc_ack(0)
    assert buf.malloc_len() == 0
    buf.flush()
    assert buf.bytes() == b"R"


def test_malloc_ack_multinode():
    data = rbytes(3 * MULTI_NODE, seed=8)
    buf = LinkBuffer()
    buf.write_binary(data)
    buf.malloc_ack(MULTI_NODE + 123)
    buf.write_binary(b"end")
    assert drain(buf) == data[:MULTI_NODE + 123] + b"end"


@pytest.mark.parametrize("bad,exc", [
    (-1, ValueError),
    (4, ValueError),  # > malloc_len()
    (2**70, (ValueError, OverflowError)),
    (-(2**70), (ValueError, OverflowError)),
    (None, TypeError),
    ("1", TypeError),
    (1.0, TypeError),
])
def test_malloc_ack_bad(bad, exc):
    buf = filled(b"r", unflushed=b"uuu")
    with pytest.raises(exc):
        buf.malloc_ack(bad)
    assert state(buf) == (1, 3, b"r", False)
    assert drain(buf) == b"ruuu"


@pytest.mark.parametrize("bad,exc", GARBAGE_SIZES)
def test_malloc_bad(bad, exc):
    buf = filled(b"r", unflushed=b"u")
    with pytest.raises(exc):
        buf.malloc(bad)
    assert state(buf) == (1, 1, b"r", False)


@pytest.mark.parametrize("huge", [2**70, sys.maxsize, sys.maxsize // 2 + 1, 2**48])
def test_malloc_huge(huge):
    buf = filled(b"r", unflushed=b"u")
    with pytest.raises((OverflowError, ValueError, MemoryError)):
        buf.malloc(huge)
    assert state(buf) == (1, 1, b"r", False)
    assert drain(buf) == b"ru"


# ---------------------------------------------------------------------------
# write_direct
# ---------------------------------------------------------------------------

def test_write_direct_netpoll_semantics():
    buf = LinkBuffer()
    m = buf.malloc(6)
    m[:] = b"AAABBB"
    buf.write_direct(b"xyz", 3)
    assert buf.malloc_len() == 9
    assert drain(buf) == b"AAAxyzBBB"


@pytest.mark.parametrize("r", [0, 1, 5, 6, 11])
def test_write_direct_positions(r):
    buf = filled(b"R")
    buf.write_binary(b"hello")
    buf.write_binary(b" world")
    L = buf.malloc_len()
    unflushed = b"hello world"
    buf.write_direct(b"--", r)
    assert buf.malloc_len() == L + 2
    assert drain(buf) == b"R" + unflushed[:L - r] + b"--" + unflushed[L - r:]


def test_write_direct_multinode():
    a = rbytes(2 * MULTI_NODE, seed=1)
    b = rbytes(MULTI_NODE, seed=2)
    for r in (0, 1, 4095, 4096, 4097, MULTI_NODE, 2 * MULTI_NODE - 1, 2 * MULTI_NODE):
        buf = LinkBuffer()
        m = buf.malloc(len(a))
        m[:] = a
        buf.write_direct(b, r)
        assert drain(buf) == a[:len(a) - r] + b + a[len(a) - r:], r


def test_write_direct_bytes_like_and_empty():
    buf = LinkBuffer()
    buf.write_binary(b"ab")
    buf.write_direct(bytearray(b"1"), 1)
    buf.write_direct(memoryview(b"2"), 0)
    buf.write_direct(b"", 2)
    assert drain(buf) == b"a1b2"


@pytest.mark.parametrize("args,exc", [
    ((b"x", -1), ValueError),
    ((b"x", 4), ValueError),  # > malloc_len()
    ((b"x", 2**70), (ValueError, OverflowError)),
    ((b"x", -(2**70)), (ValueError, OverflowError)),
    ((b"x", None), TypeError),
    ((b"x", "1"), TypeError),
    ((b"x", 1.0), TypeError),
    (("x", 0), TypeError),
    ((None, 0), TypeError),
    ((1, 0), TypeError),
])
def test_write_direct_bad(args, exc):
    buf = filled(b"r", unflushed=b"uuu")
    with pytest.raises(exc):
        buf.write_direct(*args)
    assert state(buf) == (1, 3, b"r", False)
    assert drain(buf) == b"ruuu"


# ---------------------------------------------------------------------------
# append
# ---------------------------------------------------------------------------

def test_append_moves_all_readable_and_unflushed():
    buf = filled(b"R", unflushed=b"u")
    other = filled(b"xx0123", unflushed=b"456")
    other.skip(2)
    assert buf.append(other) in (None, 7)
    assert len(other) == 0 and other.malloc_len() == 0 and other.is_empty()
    assert len(buf) == 1  # appended data is unflushed here
    assert buf.malloc_len() == 1 + 7
    buf.flush()
    assert buf.bytes() == b"Ru0123456"
    # other stays usable
    other.write_binary(b"again")
    other.flush()
    assert other.read_binary(5) == b"again"
    assert buf.bytes() == b"Ru0123456"


def test_append_empty_and_multinode():
    buf = LinkBuffer()
    buf.append(LinkBuffer())
    assert buf.malloc_len() == 0
    data = rbytes(3 * MULTI_NODE, seed=13)
    other = LinkBuffer()
    for i in range(0, len(data), 5000):
        other.write_binary(data[i:i + 5000])
        if i % 10000 == 0:
            other.flush()
    buf.write_binary(b"<")
    buf.append(other)
    buf.write_binary(b">")
    assert drain(buf) == b"<" + data + b">"


def test_append_then_write_direct_and_malloc_ack():
    buf = LinkBuffer()
    buf.write_binary(b"abc")
    other = filled(b"DEF")
    buf.append(other)
    buf.write_direct(b"_", 4)  # unflushed "abcDEF" -> "ab_cDEF"
    buf.malloc_ack(5)          # -> "ab_cD"
    assert drain(buf) == b"ab_cD"


def test_append_views_of_other_stay_valid():
    other = filled(b"0123456789")
    v = other.next(3)
    p = other.peek(3)
    buf = LinkBuffer()
    buf.append(other)
    other.close()
    buf.flush()
    assert buf.read_binary(7) == b"3456789"
    buf.close()
    assert bytes(v) == b"012" and bytes(p) == b"345"


def test_append_a_slice_of_self():
    buf = filled(b"0123456789")
    s = buf.slice(4)
    buf.append(s)
    assert s.is_empty()
    buf.flush()
    assert buf.bytes() == b"4567890123"


@pytest.mark.parametrize("bad", [None, b"x", bytearray(b"x"), "x", 1, object()])
def test_append_type_errors(bad):
    buf = filled(b"r", unflushed=b"u")
    with pytest.raises(TypeError):
        buf.append(bad)
    assert state(buf) == (1, 1, b"r", False)


def test_append_self():
    buf = filled(b"r", unflushed=b"u")
    with pytest.raises(ValueError):
        buf.append(buf)
    assert state(buf) == (1, 1, b"r", False)
    assert drain(buf) == b"ru"


def test_append_closed_other():
    buf = filled(b"r", unflushed=b"u")
    other = filled(b"x")
    other.close()
    with pytest.raises((BufferClosedError, ValueError)):
        buf.append(other)
    assert state(buf) == (1, 1, b"r", False)


# ---------------------------------------------------------------------------
# close
# ---------------------------------------------------------------------------

CALLS_AFTER_CLOSE = [
    ("next", (1,)), ("next", (0,)), ("peek", (1,)), ("skip", (1,)), ("until", (b"\n",)),
    ("until", (10,)), ("read_string", (1,)), ("read_binary", (1,)), ("read_byte", ()),
    ("slice", (1,)), ("release", ()), ("bytes", ()), ("is_empty", ()),
    ("malloc", (1,)), ("malloc", (0,)), ("malloc_len", ()), ("malloc_ack", (0,)),
    ("write_binary", (b"x",)), ("write_string", ("x",)), ("write_byte", (1,)),
    ("write_direct", (b"x", 0)), ("append", (None,)), ("flush", ()),
]


@pytest.mark.parametrize("name,args", CALLS_AFTER_CLOSE)
def test_methods_after_close_raise(name, args):
    buf = filled(b"abc\n", unflushed=b"def")
    buf.close()
    if name == "append":
        args = (filled(b"zz"),)
    with pytest.raises(BufferClosedError):
        getattr(buf, name)(*args)
    # twice: the failure must not have revived anything
    with pytest.raises(BufferClosedError):
        getattr(buf, name)(*args)


def test_append_into_closed_leaves_other_intact():
    buf = LinkBuffer()
    buf.close()
    other = filled(b"keep", unflushed=b"me")
    with pytest.raises(BufferClosedError):
        buf.append(other)
    assert drain(other) == b"keepme"


def test_close_idempotent():
    buf = filled(rbytes(MULTI_NODE))
    assert buf.close() is None
    buf.close()
    buf.close()
    LinkBuffer().close()


def test_close_with_outstanding_malloc():
    buf = LinkBuffer()
    m = buf.malloc(100)
    buf.close()
    m[:] = b"x" * 100
    assert bytes(m) == b"x" * 100


# ---------------------------------------------------------------------------
# big data
# ---------------------------------------------------------------------------

def test_big_round_trip_10mb():
    rng = random.Random(42)
    data = rng.randbytes(10 * 1024 * 1024)
    buf = LinkBuffer()
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 17, 4096, 8191, 65536, 300000))
        chunk = data[pos:pos + n]
        if rng.random() < 0.5:
            buf.write_binary(chunk)
        else:
            m = buf.malloc(len(chunk))
            m[:] = chunk
        pos += len(chunk)
        if rng.random() < 0.3:
            buf.flush()
    buf.flush()
    assert len(buf) == len(data)
    assert buf.bytes() == data
    assert bytes(buf.peek(len(data))) == data
    out = []
    while len(buf):
        n = min(len(buf), rng.choice((1, 100, 4096, 10000, 1 << 20)))
        kind = rng.randrange(3)
        if kind == 0:
            out.append(bytes(buf.next(n)))
        elif kind == 1:
            out.append(buf.read_binary(n))
        else:
            s = buf.slice(n)
            out.append(s.bytes())
        if rng.random() < 0.1:
            buf.release()
    assert b"".join(out) == data
    buf.release()
    assert buf.is_empty()


def test_big_single_next_10mb():
    data = rbytes(10 * 1024 * 1024, seed=99)
    buf = LinkBuffer()
    for i in range(0, len(data), 1 << 16):
        buf.write_binary(data[i:i + (1 << 16)])
    buf.flush()
    v = buf.next(len(data))
    buf.release()
    buf.close()
    assert len(v) == len(data) and bytes(v) == data


# ---------------------------------------------------------------------------
# pool
# ---------------------------------------------------------------------------

def test_pool_stats_shape():
    st = pool_stats()
    assert isinstance(st, dict)
    for key in ("bytes_in_use", "chunks_in_use", "bytes_cached", "classes"):
        assert key in st
    for key in ("bytes_in_use", "chunks_in_use", "bytes_cached"):
        assert isinstance(st[key], int) and st[key] >= 0
    assert isinstance(st["classes"], dict) and st["classes"]
    for size, cls in st["classes"].items():
        assert isinstance(size, int) and size > 0
        assert cls["in_use"] >= 0 and cls["cached"] >= 0


def test_pool_accounting_and_trim():
    gc.collect()
    pool_trim()
    base = pool_stats()
    assert base["bytes_cached"] == 0
    assert all(c["cached"] == 0 for c in base["classes"].values())
    bufs = [filled(rbytes(MULTI_NODE, seed=i)) for i in range(5)]
    mid = pool_stats()
    assert mid["bytes_in_use"] >= base["bytes_in_use"] + 5 * MULTI_NODE
    assert mid["chunks_in_use"] > base["chunks_in_use"]
    for b in bufs:
        b.close()
    del bufs
    gc.collect()
    after = pool_stats()
    assert after["bytes_in_use"] == base["bytes_in_use"]
    assert after["chunks_in_use"] == base["chunks_in_use"]
    pool_trim()
    trimmed = pool_stats()
    assert trimmed["bytes_cached"] == 0
    assert all(c["cached"] == 0 for c in trimmed["classes"].values())
    assert trimmed["bytes_in_use"] == base["bytes_in_use"]
