"""RPC server: length-prefixed frames served on the worker pool, zero-copy.

Protocol (one method): a request is a frame, a 4-byte big-endian length and
that many bytes of body; the reply is a frame holding the 32-byte SHA-256
of the body. Replies on one connection come back in request order.

Shows the pool runner: ``on_request`` runs on a worker thread
from netpoll's bounded pool, so it may block in ``reader.next(n)`` until a
whole frame is in, and slow work does not stall the poller or other
connections. ``reader.slice(n)`` hands the frame body to the service function
as an independent LinkBuffer sharing the input memory (no copy); it stays
valid after the reader moves on. Read and idle timeouts bound what a slow or
silent client can hold.

Run:
    python examples/rpc_server.py --port 9000
    python examples/rpc_client.py --port 9000 -n 1000
"""
from __future__ import annotations

import argparse
import hashlib
import signal
import struct
import threading
from typing import Any

import netpoll

HEADER = struct.Struct(">I")
MAX_BODY = 16 << 20  # refuse frames a client could use to make us buffer gigabytes


def sha256(body: netpoll.LinkBuffer) -> bytes:
    """The service: any function of a request frame. Its argument is a
    LinkBuffer, so it can parse the body piecewise if the protocol has fields."""
    # next() views the body in place (hashlib drops the GIL on large inputs,
    # so several workers hash in parallel).
    return hashlib.sha256(body.next(len(body))).digest()


def on_request(ctx: Any, conn: netpoll.Connection) -> None:
    reader, writer = conn.reader, conn.writer
    # Blocking reads are fine on a pool worker: next(n) waits for the bytes
    # (or raises ReadTimeoutError / PeerClosedError, which the loop handles by
    # closing the connection). We serve one frame per call; the loop calls us
    # again at once while more bytes are buffered.
    (length,) = HEADER.unpack(reader.next(HEADER.size))
    if length > MAX_BODY:
        conn.close()
        return
    body = reader.slice(length)  # zero-copy: shares the input chunks
    reply = sha256(body)
    writer.write_binary(HEADER.pack(len(reply)))
    writer.write_binary(reply)
    writer.flush()  # from a worker: sends now, blocks until sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000, help="0 lets the OS choose")
    ap.add_argument("--idle-timeout", type=float, default=60.0,
                    help="close connections idle this many seconds")
    args = ap.parse_args()

    listener = netpoll.create_listener("tcp", (args.host, args.port))
    loop = netpoll.EventLoop(on_request, runner="pool",
                             read_timeout=10.0,   # a half-sent frame frees its worker
                             write_timeout=10.0,  # so does a client that stops reading
                             idle_timeout=args.idle_timeout)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=loop.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    assert isinstance(listener.addr, tuple)     # TCP: (host, port)
    host, port = listener.addr
    print(f"listening on {host}:{port}", flush=True)
    loop.serve(listener)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
