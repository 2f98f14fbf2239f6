"""RPC client: a small connection pool over ``netpoll.Dialer``, shared by threads.

Talks to examples/rpc_server.py (a request is a 4-byte big-endian length and
a body; the reply is a frame with the SHA-256 of the body). Shows a
``Dialer`` with read/write timeouts, a pool that hands each call its own
connection, ``conn.is_active()`` to drop connections the server closed while
they sat idle (its idle timeout), and one retry on a fresh connection
(safe here because the call is idempotent).

Run:
    python examples/rpc_client.py --port 9000 -n 1000 --threads 8 --pool 4

Prints one summary line; exits with status 1 if a reply is wrong.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional

import netpoll

HEADER = struct.Struct(">I")


class RpcClient:
    """At most `pool_size` connections to one server; safe to share between threads."""

    def __init__(self, address: Any, pool_size: int = 4, timeout: float = 5.0) -> None:
        self.address = address
        self.dialer = netpoll.Dialer(read_timeout=timeout, write_timeout=timeout)
        self.dial_timeout = timeout
        self.dialed = 0                                  # connections made so far
        self._idle: List[netpoll.Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(pool_size)

    @contextmanager
    def connection(self) -> Iterator[netpoll.Connection]:
        """Lend a connection for one call: an idle one that is still open, or a new one."""
        with self._slots:                                # wait while pool_size calls run
            conn = self._take_idle()
            if conn is None:
                conn = self.dialer.dial_connection("tcp", self.address,
                                                   timeout=self.dial_timeout)
                with self._lock:
                    self.dialed += 1
            try:
                yield conn
            except BaseException:
                # A failed call may leave half a reply in the stream: never reuse it.
                conn.close()
                raise
            with self._lock:
                self._idle.append(conn)

    def _take_idle(self) -> Optional[netpoll.Connection]:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()                  # most recently used: warmest
                if conn.is_active():
                    return conn
                conn.close()                             # closed by the server while idle
        return None

    def sha256(self, data: bytes) -> bytes:
        """Ask the server for the SHA-256 of `data`."""
        try:
            return self._call(data)
        except netpoll.ConnectionClosedError:
            # The server may close an idle connection just after is_active()
            # said yes; sha256 is idempotent, so retry once on a new one.
            return self._call(data)

    def _call(self, data: bytes) -> bytes:
        with self.connection() as conn:
            conn.writer.write_binary(HEADER.pack(len(data)))
            conn.writer.write_binary(data)
            conn.writer.flush()                          # blocks until sent
            (length,) = HEADER.unpack(conn.reader.next(HEADER.size))
            reply = conn.reader.read_binary(length)      # blocks until the reply is in
            conn.reader.release()
            return reply

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("-n", "--count", type=int, default=1000, help="calls in total")
    ap.add_argument("--threads", type=int, default=8, help="threads making calls")
    ap.add_argument("--pool", type=int, default=4, help="connections at most")
    ap.add_argument("--size", type=int, default=4096, help="bytes per request body")
    args = ap.parse_args()
    if min(args.count, args.threads, args.pool) < 1:
        ap.error("-n, --threads and --pool must be at least 1")

    client = RpcClient((args.host, args.port), pool_size=args.pool)
    wrong: List[int] = []
    errors: List[BaseException] = []

    def worker(calls: range) -> None:
        try:
            for i in calls:
                body = os.urandom(args.size)
                if client.sha256(body) != hashlib.sha256(body).digest():
                    wrong.append(i)
        except BaseException as e:  # reported below, with the summary
            errors.append(e)

    per = -(-args.count // args.threads)                 # ceiling division
    threads = [threading.Thread(target=worker, args=(range(i, min(i + per, args.count)),))
               for i in range(0, args.count, per)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    client.close()

    print(f"rpc_client: {args.count} calls from {len(threads)} threads over "
          f"{client.dialed} connection(s) (pool {args.pool}): "
          f"{'all replies correct' if not wrong and not errors else 'FAILED'}, "
          f"{elapsed:.3f} s ({args.count / elapsed:.0f} calls/s)")
    for e in errors:
        print(f"rpc_client: error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1 if wrong or errors else 0


if __name__ == "__main__":
    sys.exit(main())
