"""HTTP plaintext with wrk: the Reactor, the EventLoop example and uvloop + httptools.

    python bench/bench_http.py [--duration 5] [--reps 3] [--conns 2,64] [--servers reactor,eventloop,example,uvloop]

- reactor: like goev's techempower example, a fixed response to every request,
  keep-alive, pipelining-tolerant (requests are counted by their blank line,
  not parsed: goev's shape).
- eventloop: the same work as the uvloop server (httptools, one fixed
  response per request) on EventLoop with the inline runner.
- example: examples/http_server.py (EventLoop, inline runner, httptools,
  routes, Date header, keep-alive handling: more work per request).
- uvloop: an asyncio Protocol on uvloop, parsed with httptools.

Each server runs in its own process pinned to CPU 0 (`taskset -c 0`), wrk
(`-t1`) to CPU 1; the servers alternate, each figure is the median of `--reps`.
Prints req/s and each server's ratio to uvloop.

    python bench/bench_http.py --serve reactor --port P   # one server
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

BODY = b"Hello, World!"
RESP = (b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


def serve_reactor(port: int) -> None:
    import netpoll

    class Http(netpoll.EvHandler):
        def on_open(self) -> bool:
            self.tail = b""
            self.get_reactor().add_ev_handler(self, self.fd(), netpoll.EV_IN)
            return True

        def on_read(self) -> bool:
            data = self.read()
            if not data:
                return False
            buf = self.tail + bytes(data) if self.tail else bytes(data)
            n = buf.count(b"\r\n\r\n")
            if n:
                self.write(RESP if n == 1 else RESP * n)
                self.tail = buf[buf.rfind(b"\r\n\r\n") + 4:]
            else:
                self.tail = buf
                if len(buf) > 65536:
                    return False
            return True

    reactor = netpoll.Reactor(poll_num=1)
    netpoll.Acceptor(reactor, ("127.0.0.1", port), Http)
    signal.signal(signal.SIGTERM, lambda *_: reactor.stop())
    print("ready", flush=True)
    reactor.run()


def serve_eventloop(port: int) -> None:
    """The same work as serve_uvloop (httptools, a fixed response per
    request), on netpoll's EventLoop with the inline runner."""
    import httptools

    import netpoll

    class Conn:
        def __init__(self):
            self.n = 0
            self.p = httptools.HttpRequestParser(self)

        def on_message_complete(self):
            self.n += 1

    def on_request(ctx, conn):
        r = conn.reader
        try:
            ctx.p.feed_data(r.next(len(r)))
        except httptools.HttpParserError:
            conn.close()
            return
        if ctx.n:
            conn.writer.write_binary(RESP if ctx.n == 1 else RESP * ctx.n)
            ctx.n = 0
            conn.writer.flush()

    listener = netpoll.create_listener("tcp", f"127.0.0.1:{port}")
    loop = netpoll.EventLoop(on_request, on_prepare=lambda conn: Conn(), runner="inline")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("ready", flush=True)
    loop.serve(listener)


def serve_uvloop(port: int) -> None:
    import asyncio

    import httptools
    import uvloop

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.p = httptools.HttpRequestParser(self)

        def data_received(self, data):
            try:
                self.p.feed_data(data)
            except httptools.HttpParserError:
                self.t.close()

        def on_message_complete(self):
            self.t.write(RESP)

    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Proto, "127.0.0.1", port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        srv.close()

    uvloop.install()
    asyncio.run(main())


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "http_server.py")


def run_once(kind: str, conns: int, duration: int) -> float:
    port = free_port()
    if kind == "example":
        cmd = [sys.executable, EXAMPLE, "--port", str(port)]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", kind, "--port", str(port)]
    srv = subprocess.Popen(["taskset", "-c", "0"] + cmd, stdout=subprocess.PIPE)
    try:
        line = srv.stdout.readline().strip()
        assert line == b"ready" or line.startswith(b"listening on"), line
        out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}s",
                              f"http://127.0.0.1:{port}/plaintext"],
                             capture_output=True, text=True, timeout=duration + 30).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m or "Non-2xx" in out or "Socket errors" in out:
            print(out, file=sys.stderr)
        return float(m.group(1)) if m else 0.0
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        srv.stdout.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", choices=["reactor", "eventloop", "uvloop"])
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--conns", default="2,64")
    ap.add_argument("--servers", default="reactor,eventloop,example,uvloop")
    args = ap.parse_args()
    if args.serve == "reactor":
        return serve_reactor(args.port)
    if args.serve == "uvloop":
        return serve_uvloop(args.port)
    if args.serve == "eventloop":
        return serve_eventloop(args.port)
    kinds = [k for k in args.servers.split(",") if k]
    for conns in [int(c) for c in args.conns.split(",")]:
        res = {k: [] for k in kinds}
        for rep in range(args.reps):
            order = kinds if rep % 2 == 0 else kinds[::-1]      # alternate
            for kind in order:
                res[kind].append(run_once(kind, conns, args.duration))
                time.sleep(0.5)
        med = {k: statistics.median(v) for k, v in res.items()}
        base = med.get("uvloop")
        parts = []
        for k in kinds:
            ratio = f" ({med[k] / base:.2f}x uvloop)" if base and k != "uvloop" else ""
            parts.append(f"{k} {med[k]:.0f} req/s {[round(x) for x in res[k]]}{ratio}")
        print(f"wrk -t1 -c{conns} -d{args.duration}s: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
