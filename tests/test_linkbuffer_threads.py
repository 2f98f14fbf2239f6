"""LinkBuffer under concurrency (one writer thread, one reader thread) and a
leak test over a million mixed operations."""
import gc
import random
import threading
import time
import tracemalloc
import zlib

import pytest

from netpoll._core import linkbuffer as _lbmod

LinkBuffer = _lbmod.LinkBuffer
pool_stats = _lbmod.pool_stats
pool_trim = _lbmod.pool_trim

STREAM_BYTES = 128 * 1024 * 1024
MAX_BACKLOG = 2 * 1024 * 1024
# mostly small reads (many interleavings with the writer), some big ones
READ_SIZES = (1, 7, 100, 512, 1000, 4096, 4097, 8192, 10_000, 65_536, 300_000)
THREAD_DEADLINE = 240.0


@pytest.mark.stress
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed,profile", [(1, "mixed"), (2, "mixed"), (3, "mixed"), (4, "small")])
def test_one_writer_one_reader_stream(seed, profile):
    """'mixed': 128 MiB in chunks of 1 B..600 KiB; 'small': 16 MiB in chunks of
    1..2000 B, for many more writer/reader interleavings."""
    total = STREAM_BYTES if profile == "mixed" else 16 * 1024 * 1024
    read_sizes = READ_SIZES if profile == "mixed" else (1, 3, 50, 200, 999, 2000)
    rng0 = random.Random(1234 + seed)
    pool = rng0.randbytes(1 << 20)
    pool_mv = memoryview(pool)
    buf = LinkBuffer()
    errors = []
    done_writing = threading.Event()
    stop = threading.Event()
    result = {}

    def chunk_size(rng):
        if profile == "small":
            return rng.randint(1, 2000)
        r = rng.random()
        if r < 0.15:
            return rng.randint(1, 64)
        if r < 0.5:
            return rng.randint(65, 8192)
        if r < 0.9:
            return rng.randint(8193, 100_000)
        return rng.randint(100_001, 600_000)

    def writer():
        # `pending` mirrors the unflushed bytes (write_direct inserts into the
        # middle of them, malloc_ack cuts them), so the checksum covers the
        # bytes in the order they must come out.
        try:
            rng = random.Random(seed)
            crc = 0
            written = 0
            pending = bytearray()
            while written < total and not stop.is_set():
                while len(buf) > MAX_BACKLOG and not stop.is_set():
                    time.sleep(0.0005)
                n = min(chunk_size(rng), total - written)
                off = rng.randrange(0, len(pool) - n + 1)
                piece = pool_mv[off:off + n]
                kind = rng.random()
                if kind < 0.4:
                    assert buf.write_binary(piece) == n
                    pending += piece
                elif kind < 0.75:
                    m = buf.malloc(n)
                    m[:] = piece
                    pending += piece
                elif kind < 0.85:
                    # malloc too much, fill a prefix, give the rest back
                    m = buf.malloc(n + 100)
                    m[:n] = piece
                    buf.malloc_ack(buf.malloc_len() - 100)
                    pending += piece
                elif kind < 0.93:
                    r = rng.randint(0, len(pending))
                    buf.write_direct(piece, r)
                    pending[len(pending) - r:len(pending) - r] = piece
                elif kind < 0.97:
                    other = LinkBuffer()
                    other.write_binary(piece)
                    buf.append(other)
                    other.close()
                    pending += piece
                else:
                    k = min(n, 200)
                    for b in piece[:k]:
                        buf.write_byte(b)
                    pending += piece[:k]
                    n = k
                assert buf.malloc_len() == len(pending)
                written += n
                if rng.random() < 0.7:
                    buf.flush()
                    crc = zlib.crc32(pending, crc)
                    pending.clear()
            buf.flush()
            crc = zlib.crc32(pending, crc)
            result["w"] = (written, crc)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(("writer", e))
            stop.set()
        finally:
            done_writing.set()

    def reader():
        try:
            rng = random.Random(seed + 100)
            crc = 0
            got = 0
            recent = []  # (view, crc) of views handed out earlier: must never change
            reads = 0
            overlapped = 0  # reads done while the writer was still writing
            while not stop.is_set():
                avail = len(buf)
                if avail == 0:
                    if done_writing.is_set() and len(buf) == 0:
                        break
                    time.sleep(0)
                    continue
                n = min(avail, rng.choice(read_sizes))
                kind = rng.random()
                if kind < 0.4:
                    v = buf.next(n)
                    crc = zlib.crc32(v, crc)
                    if rng.random() < 0.05:
                        recent.append((v, zlib.crc32(v)))
                elif kind < 0.7:
                    b = buf.read_binary(n)
                    assert len(b) == n
                    crc = zlib.crc32(b, crc)
                elif kind < 0.75:
                    try:
                        v = buf.until(rng.randrange(256))
                    except IndexError:  # not buffered yet: nothing consumed
                        continue
                    n = len(v)
                    crc = zlib.crc32(v, crc)
                elif kind < 0.87:
                    p = buf.peek(n)
                    c = zlib.crc32(p)
                    buf.skip(n)
                    crc = zlib.crc32(p, crc)
                    assert zlib.crc32(p) == c
                else:
                    s = buf.slice(n)
                    assert len(s) == n
                    crc = zlib.crc32(s.bytes(), crc)
                    s.close()
                got += n
                reads += 1
                if not done_writing.is_set():
                    overlapped += 1
                if reads % 8 == 0:
                    buf.release()
                    for v, c in recent:
                        assert zlib.crc32(v) == c, "a view changed after release"
                    del recent[:-16]
            result["r"] = (got, crc, reads, overlapped)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(("reader", e))
            stop.set()

    tw = threading.Thread(target=writer, name="lb-writer", daemon=True)
    tr = threading.Thread(target=reader, name="lb-reader", daemon=True)
    t0 = time.monotonic()
    tr.start()
    tw.start()
    tw.join(THREAD_DEADLINE)
    tr.join(max(1.0, THREAD_DEADLINE - (time.monotonic() - t0)))
    alive = tw.is_alive() or tr.is_alive()
    stop.set()
    tw.join(5)
    tr.join(5)
    if errors:
        who, err = errors[0]
        raise AssertionError(f"{who} thread failed: {err!r}") from err
    assert not alive, "writer/reader did not finish in time"
    written, wcrc = result["w"]
    got, rcrc, reads, overlapped = result["r"]
    print(f"stream: {written} bytes, {reads} reads, {overlapped} while writing")
    assert written == total
    assert got == written
    assert rcrc == wcrc
    assert reads > 1000
    assert overlapped > 100, "reader and writer did not actually run concurrently"
    assert len(buf) == 0 and buf.malloc_len() == 0
    buf.close()


def _mixed_ops(n_iters, seed):
    """Run about 10 * n_iters buffer operations; return the number performed."""
    rng = random.Random(seed)
    payloads = [rng.randbytes(k) for k in (1, 10, 100, 1000, 5000, 9000)]
    sizes = [rng.randrange(0, 200) for _ in range(1024)]
    ops = 0
    buf = LinkBuffer()
    keep = []
    for i in range(n_iters):
        p = payloads[i % 6]
        buf.write_binary(p)
        buf.write_string("hello\n")
        buf.write_byte(i & 0xFF)
        m = buf.malloc(64)
        m[:8] = b"\x00" * 8
        buf.malloc_ack(buf.malloc_len() - 56)
        if i % 5 == 0:
            buf.write_direct(b"DD", 3)
            ops += 1
        buf.flush()
        ops += 7
        n = sizes[i & 1023]
        avail = len(buf)
        if n > avail:
            n = avail
        v = buf.next(n)
        buf.peek(min(10, avail - n))
        buf.skip(min(5, len(buf)))
        try:
            buf.until(10)
        except IndexError:
            pass
        ops += 4
        if i % 3 == 0:
            s = buf.slice(min(50, len(buf)))
            if i % 6 == 0:
                keep.append(s)
            else:
                s.close()
            ops += 2
        if i % 7 == 0:
            other = LinkBuffer()
            other.write_binary(p)
            buf.append(other)
            other.close()
            ops += 4
        if i % 4 == 0:
            keep.append(v)
        buf.read_binary(min(3, len(buf)))
        buf.release()
        ops += 2
        if len(keep) > 64:
            keep.clear()
            ops += 1
        if i % 1000 == 999:
            buf.close()
            buf = LinkBuffer()
            ops += 2
    buf.close()
    keep.clear()
    return ops


@pytest.mark.stress
@pytest.mark.timeout(300)
def test_no_leak_after_a_million_ops():
    _mixed_ops(2000, seed=0)  # warm up: pool classes, interned objects, freelists
    gc.collect()
    pool_trim()
    base = pool_stats()
    assert base["bytes_cached"] == 0
    tracemalloc.start()
    try:
        gc.collect()
        snap0 = tracemalloc.take_snapshot()
        t0 = time.monotonic()
        ops = _mixed_ops(70_000, seed=1)
        elapsed = time.monotonic() - t0
        gc.collect()
        mid = pool_stats()
        pool_trim()
        gc.collect()
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    end = pool_stats()
    assert ops >= 1_000_000, ops
    # the pool actually cached something during the run, and trim freed it
    assert end["bytes_cached"] == 0
    assert all(c["cached"] == 0 for c in end["classes"].values())
    assert mid["bytes_in_use"] == base["bytes_in_use"]
    assert end["bytes_in_use"] == base["bytes_in_use"], (base, end)
    assert end["chunks_in_use"] == base["chunks_in_use"], (base, end)
    for size, cls in end["classes"].items():
        assert cls["in_use"] == base["classes"][size]["in_use"], (size, base, end)
    stats = snap1.compare_to(snap0, "filename")
    growth = sum(s.size_diff for s in stats)
    top = "\n".join(str(s) for s in snap1.compare_to(snap0, "lineno")[:5])
    assert growth < 100 * 1024, f"grew by {growth} bytes in {ops} ops ({elapsed:.1f}s):\n{top}"
