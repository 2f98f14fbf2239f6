"""Stateful test: netpoll.LinkBuffer against a bytearray model.

The model is two bytearrays: the readable (flushed) part and the unflushed
part. Every view and slice handed out is kept (the last KEEP of them) with the
bytes it must show, and all of them are re-checked after every step: a view
must never change, whatever happens to the buffer afterwards (reads, release,
writes that reuse pool memory, close).
"""
import random
from collections import deque

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

import pytest

import netpoll.errors as _errors
from netpoll._core import linkbuffer as _lbmod

LinkBuffer = _lbmod.LinkBuffer
BufferUnderflowError = _errors.BufferUnderflowError
BufferClosedError = getattr(_errors, "BufferClosedError", None) or _lbmod.BufferClosedError

KEEP = 50

# Write sizes: mostly small, sometimes a few nodes' worth (nodes are ~4-8 KiB).
write_sizes = st.one_of(
    st.integers(0, 64),
    st.integers(0, 5000),
    st.integers(4000, 9000),
    st.integers(9000, 20000),
)
seeds = st.integers(0, 2**32 - 1)
texts = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
    st.text(max_size=50).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
    st.builds(lambda s, k: s * k, st.sampled_from(["ascii ", "é€", "𝄞x"]), st.integers(1, 3000)),
)


def gen(seed, n):
    return random.Random(seed).randbytes(n)


def draw_read_size(data, avail):
    """A size in [0, avail], biased to small sizes and to exactly `avail`."""
    if avail == 0:
        return 0
    return data.draw(st.one_of(
        st.integers(0, min(avail, 64)),
        st.integers(0, avail),
        st.just(avail),
    ))


class LinkBufferMachine(RuleBasedStateMachine):
    @initialize(hint=st.one_of(st.just(0), st.integers(0, 20000)))
    def init(self, hint):
        self.buf = LinkBuffer(hint)
        self.readable = bytearray()
        self.unflushed = bytearray()
        # entries: ["view", memoryview, bytes] or ["slice", LinkBuffer, bytearray]
        self.kept = deque(maxlen=KEEP)

    # ------------------------------------------------------------ helpers

    def keep_view(self, view, expected):
        assert isinstance(view, memoryview)
        assert view.readonly
        assert bytes(view) == expected
        self.kept.append(["view", view, bytes(expected)])

    def consume(self, n):
        out = bytes(self.readable[:n])
        del self.readable[:n]
        return out

    def assert_unchanged(self, before):
        assert len(self.buf) == before[0]
        assert self.buf.malloc_len() == before[1]

    # ------------------------------------------------------------ readers

    @rule(data=st.data())
    def next(self, data):
        n = draw_read_size(data, len(self.readable))
        v = self.buf.next(n)
        self.keep_view(v, self.consume(n))

    @rule(data=st.data())
    def peek(self, data):
        n = draw_read_size(data, len(self.readable))
        v = self.buf.peek(n)
        self.keep_view(v, bytes(self.readable[:n]))

    @rule(data=st.data())
    def skip(self, data):
        n = draw_read_size(data, len(self.readable))
        assert self.buf.skip(n) is None
        self.consume(n)

    @rule(data=st.data())
    def read_binary(self, data):
        n = draw_read_size(data, len(self.readable))
        b = self.buf.read_binary(n)
        assert type(b) is bytes
        assert b == self.consume(n)

    @rule()
    def read_byte(self):
        if not self.readable:
            with pytest.raises(BufferUnderflowError):
                self.buf.read_byte()
            return
        assert self.buf.read_byte() == self.consume(1)[0]

    @rule(data=st.data())
    def read_string(self, data):
        n = draw_read_size(data, len(self.readable))
        try:
            expected = bytes(self.readable[:n]).decode("utf-8")
        except UnicodeDecodeError:
            before = (len(self.buf), self.buf.malloc_len())
            with pytest.raises(UnicodeDecodeError):
                self.buf.read_string(n)
            self.assert_unchanged(before)
            return
        s = self.buf.read_string(n)
        assert type(s) is str and s == expected
        self.consume(n)

    @rule(data=st.data(), as_int=st.booleans())
    def until(self, data, as_int):
        if self.readable and data.draw(st.integers(0, 3)) > 0:
            # a delimiter that is present
            delim = self.readable[data.draw(st.integers(0, len(self.readable) - 1))]
        else:
            delim = data.draw(st.integers(0, 255))
        arg = delim if as_int else bytes([delim])
        idx = self.readable.find(bytes([delim]))
        if idx < 0:
            before = (len(self.buf), self.buf.malloc_len())
            with pytest.raises(BufferUnderflowError):
                self.buf.until(arg)
            self.assert_unchanged(before)
            return
        v = self.buf.until(arg)
        self.keep_view(v, self.consume(idx + 1))

    @rule(data=st.data())
    def slice(self, data):
        n = draw_read_size(data, len(self.readable))
        s = self.buf.slice(n)
        assert isinstance(s, LinkBuffer)
        expected = bytearray(self.consume(n))
        assert len(s) == n and s.malloc_len() == 0
        assert s.bytes() == expected
        self.kept.append(["slice", s, expected])

    @precondition(lambda self: any(k[0] == "slice" and not k[1].is_empty() for k in self.kept))
    @rule(data=st.data())
    def read_from_kept_slice(self, data):
        slices = [k for k in self.kept if k[0] == "slice" and k[2]]
        entry = data.draw(st.sampled_from(slices))
        s, expected = entry[1], entry[2]
        n = draw_read_size(data, len(expected))
        v = s.next(n)
        assert bytes(v) == expected[:n]
        self.kept.append(["view", v, bytes(expected[:n])])
        del expected[:n]
        if data.draw(st.booleans()):
            s.release()

    @rule()
    def release(self):
        assert self.buf.release() is None

    @rule()
    def bytes_(self):
        b = self.buf.bytes()
        assert type(b) is bytes
        assert b == self.readable

    @rule(extra=st.integers(1, 20000), method=st.sampled_from(
        ["next", "peek", "skip", "read_string", "read_binary", "slice"]))
    def read_past_end(self, extra, method):
        before = (len(self.buf), self.buf.malloc_len())
        with pytest.raises(BufferUnderflowError):
            getattr(self.buf, method)(len(self.readable) + extra)
        self.assert_unchanged(before)

    @rule(bad=st.sampled_from([-1, -100]), method=st.sampled_from(
        ["next", "peek", "skip", "read_string", "read_binary", "slice", "malloc"]))
    def negative_size(self, bad, method):
        before = (len(self.buf), self.buf.malloc_len())
        with pytest.raises(ValueError):
            getattr(self.buf, method)(bad)
        self.assert_unchanged(before)

    # ------------------------------------------------------------ writers

    @rule(n=write_sizes, seed=seeds)
    def malloc(self, n, seed):
        m = self.buf.malloc(n)
        assert isinstance(m, memoryview) and not m.readonly and m.nbytes == n
        payload = gen(seed, n)
        m[:] = payload
        self.unflushed += payload

    @rule(data=st.data())
    def malloc_ack(self, data):
        n = data.draw(st.integers(0, len(self.unflushed)))
        assert self.buf.malloc_ack(n) is None
        del self.unflushed[n:]

    @rule(extra=st.integers(1, 5000))
    def malloc_ack_too_big(self, extra):
        before = (len(self.buf), self.buf.malloc_len())
        with pytest.raises(ValueError):
            self.buf.malloc_ack(len(self.unflushed) + extra)
        self.assert_unchanged(before)

    @rule(n=write_sizes, seed=seeds, kind=st.sampled_from(["bytes", "bytearray", "memoryview"]))
    def write_binary(self, n, seed, kind):
        payload = gen(seed, n)
        if kind == "bytes":
            arg = payload
        elif kind == "bytearray":
            arg = bytearray(payload)
        else:
            arg = memoryview(b"##" + payload + b"##")[2:2 + n]
        assert self.buf.write_binary(arg) == n
        if kind == "bytearray" and n:
            arg[0] ^= 0xFF  # the buffer made a copy
        self.unflushed += payload

    @rule(s=texts)
    def write_string(self, s):
        enc = s.encode("utf-8")
        assert self.buf.write_string(s) == len(enc)
        self.unflushed += enc

    @rule(b=st.integers(0, 255))
    def write_byte(self, b):
        self.buf.write_byte(b)
        self.unflushed.append(b)

    @rule(data=st.data(), n=write_sizes, seed=seeds)
    def write_direct(self, data, n, seed):
        L = len(self.unflushed)
        r = data.draw(st.one_of(st.integers(0, L), st.just(L), st.just(0)))
        payload = gen(seed, n)
        self.buf.write_direct(payload, r)
        self.unflushed[L - r:L - r] = payload

    @rule(extra=st.integers(1, 5000))
    def write_direct_too_far(self, extra):
        before = (len(self.buf), self.buf.malloc_len())
        with pytest.raises(ValueError):
            self.buf.write_direct(b"x", len(self.unflushed) + extra)
        self.assert_unchanged(before)

    @rule(sizes=st.lists(write_sizes, max_size=4), seed=seeds, data=st.data())
    def append(self, sizes, seed, data):
        other = LinkBuffer()
        rng = random.Random(seed)
        content = bytearray()
        for n in sizes:
            payload = rng.randbytes(n)
            other.write_binary(payload)
            content += payload
            if rng.random() < 0.5:
                other.flush()
        # sometimes consume a prefix of other first: only the rest moves
        other.flush()
        k = draw_read_size(data, len(content)) if data.draw(st.booleans()) else 0
        other.skip(k)
        del content[:k]
        if data.draw(st.booleans()):
            other.release()
        if data.draw(st.booleans()) and len(content):
            # leave some of other's data unflushed
            other_tail = rng.randbytes(rng.randrange(1, 100))
            other.write_binary(other_tail)
            content += other_tail
        self.buf.append(other)
        self.unflushed += content
        assert other.is_empty() and len(other) == 0 and other.malloc_len() == 0
        # other stays usable and independent
        other.write_binary(b"still usable")
        other.flush()
        assert other.read_binary(12) == b"still usable"
        other.close()

    @precondition(lambda self: any(k[0] == "slice" for k in self.kept))
    @rule(data=st.data())
    def append_kept_slice(self, data):
        idx = data.draw(st.sampled_from([i for i, k in enumerate(self.kept) if k[0] == "slice"]))
        _, s, expected = self.kept[idx]
        del self.kept[idx]
        self.buf.append(s)
        self.unflushed += expected
        assert s.is_empty() and s.malloc_len() == 0

    @rule()
    def flush(self):
        self.buf.flush()
        self.readable += self.unflushed
        self.unflushed.clear()

    # ------------------------------------------------------------ checks

    @invariant()
    def sizes_match(self):
        assert len(self.buf) == len(self.readable)
        assert self.buf.malloc_len() == len(self.unflushed)
        assert self.buf.is_empty() == (len(self.readable) == 0)

    @invariant()
    def kept_unchanged(self):
        for kind, obj, expected in self.kept:
            if kind == "view":
                assert bytes(obj) == expected
            else:
                assert len(obj) == len(expected)
                assert obj.bytes() == expected

    def teardown(self):
        if not hasattr(self, "buf"):
            return
        assert self.buf.bytes() == self.readable
        self.buf.flush()
        assert self.buf.bytes() == self.readable + self.unflushed
        self.buf.close()
        self.buf.close()
        with pytest.raises(BufferClosedError):
            self.buf.next(0)
        with pytest.raises(BufferClosedError):
            self.buf.write_binary(b"x")
        # churn the pool so freed memory is reused, then re-check everything
        junk = LinkBuffer()
        junk.write_binary(b"\xA5" * 65536)
        junk.flush()
        self.kept_unchanged()
        junk.close()
        for kind, obj, _expected in self.kept:
            if kind == "slice":
                obj.close()
        self.kept_unchanged_views_only()

    def kept_unchanged_views_only(self):
        for kind, obj, expected in self.kept:
            if kind == "view":
                assert bytes(obj) == expected


LinkBufferMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
TestLinkBufferModel = LinkBufferMachine.TestCase
