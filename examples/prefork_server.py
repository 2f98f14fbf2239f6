"""Prefork echo server: one port served by several processes.

    python examples/prefork_server.py --port 8083 [--processes 2] [--reactor]

Every reply is "<pid>:" + data, so a client sees which worker answered.

Default: ``netpoll.serve(on_request, address, processes=N)``: N forked
workers, each with its own pollers and its own SO_REUSEPORT listening socket
(Linux), under a supervisor that restarts a worker that dies. SIGTERM or
SIGINT (Ctrl-C) to the supervisor: every worker stops accepting, lets running
handlers finish (at most --shutdown-timeout seconds), and exits; then the
supervisor exits with status 0.

--reactor: the same with goev's Reactor, the recipe for
``netpoll.prefork.supervise()``: the supervisor reserves the port (a socket
bound with SO_REUSEPORT that never listens, so port 0 is resolved once and
every worker binds the same port) and each worker runs a Reactor with
``Acceptor(..., reuse_port=True)``.
"""
from __future__ import annotations

import argparse
import os
import socket
from typing import Any, Optional

import netpoll
import netpoll.prefork



def prefix() -> bytes:
    return b"%d:" % os.getpid()


def on_request(ctx: Any, conn: netpoll.Connection) -> None:
    # Parse what is there and return: works on every runner.
    reader = conn.reader
    n = len(reader)
    if n:
        conn.writer.write_binary(prefix() + bytes(reader.next(n)))
        conn.writer.flush()
        reader.release()


class Echo(netpoll.EvHandler):
    def on_open(self) -> bool:
        self.prefix = prefix()
        reactor = self.get_reactor()
        assert reactor is not None
        reactor.add_ev_handler(self, self.fd(), netpoll.EV_IN)
        return True

    def on_read(self) -> bool:
        data = self.read()
        if not data:
            return False
        self.write(self.prefix + bytes(data))
        return True


class ReactorWorker:
    """What supervise() runs in each worker: run() serves, stop() ends run()."""

    def __init__(self, host: str, port: int) -> None:
        self.reactor = netpoll.Reactor(poll_num=1)
        netpoll.Acceptor(self.reactor, (host, port), Echo, reuse_port=True)

    def run(self) -> None:
        self.reactor.run()

    def stop(self, timeout: Optional[float]) -> None:
        self.reactor.stop()


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) a SO_REUSEPORT socket: it fixes the port for every
    worker and keeps it while workers restart. Keep it open while serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    hold = socket.socket(family, socket.SOCK_STREAM)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    hold.bind((host, port))
    return hold


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8083)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--shutdown-timeout", type=float, default=5.0)
    ap.add_argument("--reactor", action="store_true", help="Reactor workers (the recipe)")
    args = ap.parse_args()
    host = f"[{args.host}]" if ":" in args.host else args.host

    if not args.reactor:
        def ready(addr: Any) -> None:
            print(f"listening on {host}:{addr[1]}", flush=True)

        netpoll.serve(on_request, (args.host, args.port), processes=args.processes,
                      on_ready=ready, shutdown_timeout=args.shutdown_timeout,
                      runner="inline")
        return

    with reserve_port(args.host, args.port) as hold:
        port = hold.getsockname()[1]
        netpoll.prefork.supervise(
            lambda: ReactorWorker(args.host, port), processes=args.processes,
            shutdown_timeout=args.shutdown_timeout,
            on_ready=lambda: print(f"listening on {host}:{port}", flush=True))


if __name__ == "__main__":
    main()
