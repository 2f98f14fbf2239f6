"""Fuzz harness for netpoll.LinkBuffer: byte strings become sequences of API
calls, checked against a plain bytes model.

With atheris (pip install atheris; wheels exist for CPython 3.11 on x86-64
Linux, otherwise it needs clang/libFuzzer):

    python fuzz/fuzz_linkbuffer.py -atheris_runs=200000          # or -max_total_time=60
    python fuzz/fuzz_linkbuffer.py fuzz/corpus/ -max_total_time=300

Without atheris, the same entry point is driven by random inputs:

    python fuzz/fuzz_linkbuffer.py --fallback 20000 [--seed N]

(tests/test_reliability_fuzz.py runs the fallback driver in CI.) Any
exception other than the documented ones, or a model mismatch, is a bug.
"""
from __future__ import annotations

import os
import random
import sys

import netpoll
from netpoll import LinkBuffer

EXPECTED = (netpoll.NetpollError,)


class Reader:
    """Consumes the fuzz input like atheris.FuzzedDataProvider, but plain."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def size(self) -> int:
        """A size, mostly small, sometimes around chunk boundaries."""
        b = self.byte()
        if b < 200:
            return b
        if b < 250:
            return self.byte() << 8 | self.byte()
        return (self.byte() << 16 | self.byte() << 8 | self.byte()) & 0x3FFFF

    def take(self, n: int) -> bytes:
        """n payload bytes: a pattern picked by one input byte, so that the
        input is spent on the call sequence, not on contents."""
        seed = self.byte()
        unit = bytes((seed + 7 * i) & 0xFF for i in range(251))
        return (unit * (n // 251 + 1))[:n]


def TestOneInput(data: bytes) -> None:
    rd = Reader(data)
    buf = LinkBuffer(rd.size())
    readable = bytearray()        # model: flushed, unread
    pending = bytearray()         # model: written, not flushed
    views = []                    # (memoryview, expected bytes): must stay valid
    slices = []                   # (LinkBuffer, expected bytes)
    handles = []                  # slices of malloc views not yet flushed or acked
    stale = []                    # ...and of those flushed/acked: writing must change nothing
    closed = False
    ops = 0
    while rd.left() and ops < 400:
        ops += 1
        op = rd.byte() % 16
        try:
            if op == 0:
                payload = rd.take(rd.size())
                assert buf.write_binary(payload) == len(payload)
                pending += payload
            elif op == 1:
                n = rd.size()
                m = buf.malloc(n)
                fill = rd.take(n)
                m[:] = fill
                pending += fill
                if n and rd.byte() & 1:
                    handles.append(m[rd.byte() % n:])
            elif op == 2:
                buf.flush()
                readable += pending
                pending.clear()
                stale += handles
                handles.clear()
            elif op == 3:
                n = rd.size()
                ok = n <= len(readable)
                try:
                    v = buf.next(n)
                except EXPECTED:
                    assert not ok or closed
                    continue
                assert ok and bytes(v) == readable[:n]
                views.append((v, bytes(readable[:n])))
                del readable[:n]
            elif op == 4:
                n = rd.size()
                try:
                    v = buf.peek(n)
                except EXPECTED:
                    assert n > len(readable) or closed
                    continue
                assert bytes(v) == readable[:n]
            elif op == 5:
                n = rd.size()
                try:
                    buf.skip(n)
                except EXPECTED:
                    assert n > len(readable) or closed
                    continue
                del readable[:n]
            elif op == 6:
                buf.release()
            elif op == 7:
                n = rd.size()
                try:
                    s = buf.slice(n)
                except EXPECTED:
                    assert n > len(readable) or closed
                    continue
                slices.append((s, bytes(readable[:n])))
                del readable[:n]
            elif op == 8:
                d = rd.byte()
                try:
                    v = buf.until(d)
                except EXPECTED:
                    assert d not in readable or closed
                    continue
                k = readable.index(d) + 1
                assert bytes(v) == readable[:k]
                del readable[:k]
            elif op == 9:
                n = rd.size()
                try:
                    b = buf.read_binary(n)
                except EXPECTED:
                    assert n > len(readable) or closed
                    continue
                assert b == readable[:n]
                del readable[:n]
            elif op == 10:
                k = rd.byte()
                buf.write_byte(k)
                pending.append(k)
            elif op == 11:
                other = LinkBuffer()
                payload = rd.take(rd.size())
                other.write_binary(payload)
                if rd.byte() & 1:
                    other.flush()
                buf.append(other)        # moves readable and unflushed data: flushes
                pending += payload
            elif op == 12:
                n = rd.size()
                fill = rd.take(n)
                buf.malloc(n)[:] = fill
                pending += fill
                k = rd.size() % (len(pending) + 1)
                buf.malloc_ack(k)        # keeps the first k unflushed bytes
                del pending[k:]
                stale += handles
                handles.clear()
            elif op == 13:
                for h in stale:          # flush/malloc_ack took write access back
                    try:
                        h[:] = b"\xEE" * len(h)
                    except ValueError:
                        pass             # released
                assert len(buf) == len(readable)
                assert buf.malloc_len() == len(pending)
            elif op == 14:
                if rd.byte() < 16:
                    buf.close()
                    closed = True
                    break
            else:
                if slices:
                    s, exp = slices[rd.byte() % len(slices)]
                    assert s.bytes() == exp
        except EXPECTED:
            if not closed:
                raise
    if not closed:
        assert buf.bytes() == readable
        buf.close()
    for v, exp in views:           # views outlive release() and close()
        assert bytes(v) == exp
    for s, exp in slices:
        assert s.bytes() == exp
        s.close()


def fallback(runs: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(runs):
        n = rng.choice((8, 32, 128, 512, 2048))
        data = rng.randbytes(rng.randrange(n))
        try:
            TestOneInput(data)
        except BaseException:
            sys.stderr.write(f"failing input (run {i}, seed {seed}): {data.hex()}\n")
            raise


def main(argv):
    if len(argv) > 1 and argv[1] == "--fallback":
        runs = int(argv[2]) if len(argv) > 2 else 10000
        seed = (int(argv[argv.index("--seed") + 1]) if "--seed" in argv
                else int.from_bytes(os.urandom(4), "big"))
        print(f"fallback driver: {runs} random inputs, seed {seed}")
        fallback(runs, seed)
        return
    import atheris
    # The extension is C (not instrumented unless built with clang's
    # -fsanitize=fuzzer-no-link); instrumenting this harness's Python gives
    # libFuzzer coverage of the call sequences explored.
    atheris.instrument_all()
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
