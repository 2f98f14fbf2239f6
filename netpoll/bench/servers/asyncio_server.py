#!/usr/bin/env python3
"""asyncio (or uvloop) echo and length-prefixed RPC servers for python -m netpoll.bench.

    python netpoll/bench/servers/asyncio_server.py --mode echo --port 0 [--uvloop]
    python netpoll/bench/servers/asyncio_server.py --mode framed --unix /tmp/x.sock
    python netpoll/bench/servers/asyncio_server.py --mode echo --uvloop --tls CERT KEY

Protocol-based, the fast asyncio style: ``data_received`` + ``transport.write``.
``framed``: 4-byte big-endian length + body; each complete frame is answered
with the same frame. ``--tls``: ``create_server(ssl=ctx)`` (the loop's own TLS:
asyncio's sslproto, which uvloop uses too). Prints ``READY <port>`` (or ``READY <path>``) once listening.
SIGTERM/SIGINT stop it.
"""
import asyncio
import os
import signal
import sys

from common import base_parser, raise_nofile, server_context


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        self.transport = None


class FramedProtocol(asyncio.Protocol):
    """Parse 4-byte big-endian length-prefixed frames and answer each with itself."""

    __slots__ = ("transport", "buf")

    def connection_made(self, transport):
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data):
        buf = self.buf
        if buf:
            buf += data
            data = buf
        n = len(data)
        pos = 0
        write = self.transport.write
        while n - pos >= 4:
            end = pos + 4 + int.from_bytes(data[pos:pos + 4], "big")
            if end > n:
                break
            if pos == 0 and end == n and data is not buf:
                write(data)                 # the common case: exactly one frame
            else:
                write(data[pos:end])        # a copy, so later edits of buf cannot alter it
            pos = end
        if data is buf:
            del buf[:pos]
        elif pos < n:
            buf += data[pos:]

    def connection_lost(self, exc):
        self.transport = None


async def serve(args):
    loop = asyncio.get_running_loop()
    factory = EchoProtocol if args.mode == "echo" else FramedProtocol
    ctx = server_context(args)
    if args.unix:
        try:
            os.unlink(args.unix)
        except FileNotFoundError:
            pass
        server = await loop.create_unix_server(factory, args.unix, backlog=args.backlog, ssl=ctx)
        where = args.unix
    else:
        server = await loop.create_server(factory, args.host, args.port, backlog=args.backlog,
                                          reuse_address=True, ssl=ctx)
        where = server.sockets[0].getsockname()[1]
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    sys.stdout.write(f"READY {where}\n")
    sys.stdout.flush()
    async with server:
        await stop
    server.close()


def main(argv=None):
    ap = base_parser(__doc__)
    ap.add_argument("--backlog", type=int, default=4096)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (uvloop.install())")
    args = ap.parse_args(argv)
    raise_nofile()
    if args.uvloop:
        import uvloop
        if hasattr(uvloop, "run"):      # uvloop >= 0.18: same as install() + asyncio.run(),
            uvloop.run(serve(args))     # without install()'s deprecation warning on 3.12+
            return 0
        uvloop.install()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
