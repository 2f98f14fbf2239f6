"""One request/response round trip through a poller (pytest-benchmark).

    python -m pytest bench/bench_poller.py -q --benchmark-only

A blocking client socket sends 64 bytes to an in-process netpoll echo server
and waits for them back; the same against an asyncio/uvloop echo server on its
own thread. Both servers and the client share this process (and the GIL), so
this measures the latency of one hand-off through each loop, not throughput:
that is `python -m netpoll.bench`'s job.
"""
import asyncio
import socket
import threading

import pytest

import netpoll

MSG = b"x" * 64


def echo(ctx, conn):
    r = conn.reader
    n = len(r)
    if n:
        conn.writer.write_binary(r.next(n))
        conn.writer.flush()


def netpoll_server(runner):
    listener = netpoll.create_listener("tcp", "127.0.0.1:0")
    loop = netpoll.EventLoop(echo, runner=runner)
    t = threading.Thread(target=loop.serve, args=(listener,), daemon=True)
    t.start()
    return tuple(listener.addr)[:2], lambda: (loop.shutdown(5), t.join(5))


def asyncio_server(use_uvloop):
    if use_uvloop:
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport

        def data_received(self, data):
            self.t.write(data)

    ready = threading.Event()
    box = {}

    def run():
        asyncio.set_event_loop(loop)
        srv = loop.run_until_complete(loop.create_server(Echo, "127.0.0.1", 0))
        box["addr"] = srv.sockets[0].getsockname()[:2]
        ready.set()
        loop.run_forever()
        srv.close()
        loop.run_until_complete(srv.wait_closed())
        loop.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(10)
    return box["addr"], lambda: (loop.call_soon_threadsafe(loop.stop), t.join(5))


SERVERS = {
    "netpoll-inline": lambda: netpoll_server("inline"),
    "netpoll-pool": lambda: netpoll_server("pool"),
    "asyncio": lambda: asyncio_server(False),
    "uvloop": lambda: asyncio_server(True),
}


@pytest.mark.parametrize("name", list(SERVERS))
def test_round_trip_64b(benchmark, name):
    addr, stop = SERVERS[name]()
    sock = socket.create_connection(addr, timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trip():
        sock.sendall(MSG)
        got = 0
        while got < len(MSG):
            got += len(sock.recv(4096))

    try:
        benchmark.group = "round trip 64 B"
        benchmark(round_trip)
    finally:
        sock.close()
        stop()
