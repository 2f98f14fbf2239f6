"""Frame a stream of length-prefixed messages with a LinkBuffer, zero-copy.

Run: python examples/linkbuffer_demo.py
"""
import struct

import netpoll
from netpoll._core.linkbuffer import pool_stats


def main() -> None:
    buf = netpoll.LinkBuffer()
    messages = [b"ping", b"x" * 10000, "héllo".encode(), b""]
    for body in messages:
        buf.write_binary(struct.pack(">I", len(body)))
        buf.write_binary(body)
    buf.flush()
    print(f"buffered {len(buf)} bytes in {pool_stats()['chunks_in_use']} pooled chunks")

    frames = []
    while len(buf) >= 4:
        (n,) = struct.unpack(">I", buf.peek(4))
        if len(buf) < 4 + n:
            break
        buf.skip(4)
        frames.append(buf.slice(n))   # shares memory with buf, survives release()
    buf.release()
    for f in frames:
        data = f.bytes()
        print(f"frame of {len(data):5d} bytes: {data[:16]!r}{'...' if len(data) > 16 else ''}")
    assert [f.bytes() for f in frames] == messages
    del frames
    print("chunks still referenced after dropping the frames:", pool_stats()["chunks_in_use"])


if __name__ == "__main__":
    main()
