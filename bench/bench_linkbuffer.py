"""LinkBuffer vs bytearray+memoryview vs io.BytesIO (pytest-benchmark).

Not collected by the normal test run (testpaths = tests). Run with:

    python -m pytest bench/bench_linkbuffer.py -q --benchmark-only

Workloads
  framed-parse: a 16 MiB stream of frames (4-byte big-endian length + body of 16..2000
      random bytes) arrives in 1 KiB chunks; after each chunk every complete
      frame is parsed (length, then a view/bytes of the body).
  bulk-copy: 64 MiB written in 64 KiB chunks, then read back in 16 KiB reads.
  small-messages: 100k request-sized messages (32..1024 bytes) each written
      (write_binary, or malloc + fill), flushed, read back with next() and
      released: the per-request path of a connection's buffers.
"""
import io
import random
import zlib

import pytest

from netpoll._core.linkbuffer import LinkBuffer

# ----------------------------------------------------------------- data

FRAMED_STREAM_BYTES = 16 * 1024 * 1024
CHUNK = 1024


def _make_frames():
    rng = random.Random(0)
    body_pool = rng.randbytes(4096)
    parts = []
    total = 0
    count = 0
    body_bytes = 0
    while total < FRAMED_STREAM_BYTES:
        n = rng.randint(16, 2000)
        off = rng.randrange(0, len(body_pool) - n)
        parts.append(n.to_bytes(4, "big"))
        parts.append(body_pool[off:off + n])
        total += 4 + n
        count += 1
        body_bytes += n
    stream = b"".join(parts)
    chunks = [stream[i:i + CHUNK] for i in range(0, len(stream), CHUNK)]
    return chunks, count, body_bytes


FRAME_CHUNKS, FRAME_COUNT, FRAME_BODY_BYTES = _make_frames()

BULK_TOTAL = 64 * 1024 * 1024
BULK_WRITE = 64 * 1024
BULK_READ = 16 * 1024
BULK_CHUNK = random.Random(1).randbytes(BULK_WRITE)
BULK_CRC_LAST = zlib.crc32(BULK_CHUNK[-BULK_READ:])  # crc of the last 16 KiB read

ROUNDS = 15


def _run(benchmark, fn, group):
    benchmark.group = group
    result = benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    return result


# ----------------------------------------------------------------- framed parse

def framed_linkbuffer():
    buf = LinkBuffer()
    frames = 0
    body_bytes = 0
    need = -1
    for chunk in FRAME_CHUNKS:
        buf.write_binary(chunk)
        buf.flush()
        while True:
            if need < 0:
                if len(buf) < 4:
                    break
                need = int.from_bytes(buf.next(4), "big")
            if len(buf) < need:
                break
            body = buf.next(need)
            body_bytes += len(body)
            frames += 1
            need = -1
        buf.release()
    buf.close()
    return frames, body_bytes


def framed_bytearray():
    ba = bytearray()
    pos = 0
    frames = 0
    body_bytes = 0
    for chunk in FRAME_CHUNKS:
        ba += chunk
        end = len(ba)
        with memoryview(ba) as mv:
            while end - pos >= 4:
                n = int.from_bytes(mv[pos:pos + 4], "big")
                if end - pos - 4 < n:
                    break
                body = mv[pos + 4:pos + 4 + n]
                body_bytes += len(body)
                frames += 1
                pos += 4 + n
                body.release()
        if pos >= 65536:
            del ba[:pos]
            pos = 0
    return frames, body_bytes


def framed_bytesio():
    bio = io.BytesIO()
    rpos = 0
    frames = 0
    body_bytes = 0
    for chunk in FRAME_CHUNKS:
        bio.seek(0, io.SEEK_END)
        bio.write(chunk)
        end = bio.tell()
        bio.seek(rpos)
        while end - rpos >= 4:
            n = int.from_bytes(bio.read(4), "big")
            if end - rpos - 4 < n:
                bio.seek(rpos)
                break
            body = bio.read(n)
            body_bytes += len(body)
            frames += 1
            rpos += 4 + n
        if rpos >= 65536:
            bio.seek(rpos)
            bio = io.BytesIO(bio.read())
            rpos = 0
    return frames, body_bytes


FRAMED = {"linkbuffer": framed_linkbuffer, "bytearray": framed_bytearray, "bytesio": framed_bytesio}


@pytest.mark.parametrize("impl", list(FRAMED))
def test_framed_parse(benchmark, impl):
    frames, body_bytes = _run(benchmark, FRAMED[impl], "framed-parse (16 MiB in 1 KiB chunks)")
    assert frames == FRAME_COUNT
    assert body_bytes == FRAME_BODY_BYTES


# ----------------------------------------------------------------- bulk copy

def bulk_linkbuffer():
    buf = LinkBuffer()
    for _ in range(BULK_TOTAL // BULK_WRITE):
        buf.write_binary(BULK_CHUNK)
    buf.flush()
    reads = 0
    last = None
    while len(buf) >= BULK_READ:
        last = buf.next(BULK_READ)
        reads += 1
        if reads % 64 == 0:
            buf.release()
    buf.close()
    return reads, zlib.crc32(last)


def bulk_bytearray():
    ba = bytearray()
    for _ in range(BULK_TOTAL // BULK_WRITE):
        ba += BULK_CHUNK
    reads = 0
    pos = 0
    end = len(ba)
    with memoryview(ba) as mv:
        while end - pos >= BULK_READ:
            last = mv[pos:pos + BULK_READ]
            pos += BULK_READ
            reads += 1
        crc = zlib.crc32(last)
        last.release()
    del ba[:pos]
    return reads, crc


def bulk_bytesio():
    bio = io.BytesIO()
    for _ in range(BULK_TOTAL // BULK_WRITE):
        bio.write(BULK_CHUNK)
    bio.seek(0)
    reads = 0
    last = None
    while True:
        b = bio.read(BULK_READ)
        if len(b) < BULK_READ:
            break
        last = b
        reads += 1
    return reads, zlib.crc32(last)


BULK = {"linkbuffer": bulk_linkbuffer, "bytearray": bulk_bytearray, "bytesio": bulk_bytesio}


@pytest.mark.parametrize("impl", list(BULK))
def test_bulk_copy(benchmark, impl):
    reads, crc = _run(benchmark, BULK[impl], "bulk-copy (64 MiB: 64 KiB writes, 16 KiB reads)")
    assert reads == BULK_TOTAL // BULK_READ
    assert crc == BULK_CRC_LAST


# ----------------------------------------------------------------- small messages

SMALL_COUNT = 100_000
_small_rng = random.Random(2)
SMALL_POOL = _small_rng.randbytes(2048)
SMALL_SIZES = [_small_rng.randint(32, 1024) for _ in range(SMALL_COUNT)]
SMALL_MSGS = [SMALL_POOL[:n] for n in SMALL_SIZES]
SMALL_BYTES = sum(SMALL_SIZES)


def small_write_binary():
    buf = LinkBuffer()
    total = 0
    for msg in SMALL_MSGS:
        buf.write_binary(msg)
        buf.flush()
        total += len(buf.next(len(msg)))
        buf.release()
    buf.close()
    return total


def small_malloc():
    buf = LinkBuffer()
    total = 0
    for msg in SMALL_MSGS:
        n = len(msg)
        buf.malloc(n)[:] = msg
        buf.flush()
        total += len(buf.next(n))
        buf.release()
    buf.close()
    return total


SMALL = {"write_binary": small_write_binary, "malloc": small_malloc}


@pytest.mark.parametrize("impl", list(SMALL))
def test_small_messages(benchmark, impl):
    total = _run(benchmark, SMALL[impl], "small-messages (100k of 32..1024 B)")
    assert total == SMALL_BYTES
