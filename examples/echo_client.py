"""Echo client: dial a server with netpoll, send N messages, verify every echo.

Shows ``netpoll.Dialer`` / ``dial_connection`` with timeouts, writing through
``conn.writer`` and reading exactly n bytes back with the blocking
``conn.reader.next(n)`` (no on_request needed on a client connection).

Run (against examples/echo_server.py):
    python examples/echo_client.py --port 8888 -n 1000 --size 64
    python examples/echo_client.py --unix /tmp/echo.sock

Prints one summary line; exits with status 1 if an echo differs.
"""
from __future__ import annotations

import argparse
import sys
import time

import netpoll


def run(conn: netpoll.Connection, count: int, size: int) -> int:
    """Ping-pong `count` messages of `size` bytes; returns how many came back wrong."""
    reader, writer = conn.reader, conn.writer
    bad = 0
    for i in range(count):
        # A different payload each time, so a stale or misordered echo is caught.
        msg = (b"%08d" % i * (size // 8 + 1))[:size]
        writer.write_binary(msg)
        writer.flush()                        # blocks until sent (write timeout applies)
        if reader.next(len(msg)) != msg:      # blocks until len(msg) bytes arrived
            bad += 1
        reader.release()                      # the echo is checked: recycle its memory
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8888)
    ap.add_argument("--unix", metavar="PATH", help="dial a Unix socket instead")
    ap.add_argument("-n", "--count", type=int, default=1000, help="messages to send")
    ap.add_argument("--size", type=int, default=64, help="bytes per message (>= 1)")
    args = ap.parse_args()
    if args.size < 1:
        ap.error("--size must be at least 1")

    # Timeouts turn a dead server into an exception instead of a hang.
    dialer = netpoll.Dialer(read_timeout=5.0, write_timeout=5.0)
    if args.unix:
        conn = dialer.dial_connection("unix", args.unix, timeout=2.0)
    else:
        conn = dialer.dial_connection("tcp", (args.host, args.port), timeout=2.0)
    start = time.perf_counter()
    try:
        bad = run(conn, args.count, args.size)
    finally:
        conn.close()
    elapsed = time.perf_counter() - start

    rate = args.count / elapsed if elapsed > 0 else float("inf")
    status = "all echoes correct" if bad == 0 else f"{bad} WRONG"
    print(f"echo_client: {args.count} messages of {args.size} bytes, {status}, "
          f"{elapsed:.3f} s ({rate:.0f} round trips/s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
