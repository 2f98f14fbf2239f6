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
Prints req/s, each server's ratio to uvloop and its CPU time per request
(utime+stime from /proc over the wrk run, handshakes included: a few per run).

HTTPS: `--tls` makes a certificate for 127.0.0.1 at run time (trustme, else
`openssl req`; netpoll/bench/tlscerts.py), starts every server with
`--tls CERT KEY` and points wrk at https:// (wrk does not verify). eventloop
and example pass an ssl.SSLContext to create_listener; uvloop passes it to
create_server (asyncio's sslproto). The reactor has no TLS here (no `ssl=` on
Acceptor yet) and is left out; so is the example when its file has no `--tls`
(`--example PATH` runs another copy of it).

    python bench/bench_http.py --tls --servers eventloop,example,uvloop --conns 16,256
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
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = b"Hello, World!"
RESP = (b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


def tls_context(files):
    """The server's ssl.SSLContext for --tls CERT KEY (None without)."""
    if not files:
        return None
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files[0], files[1])
    return ctx


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


def serve_eventloop(port: int, ctx=None) -> None:
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

    listener = netpoll.create_listener("tcp", f"127.0.0.1:{port}", ssl=ctx)
    loop = netpoll.EventLoop(on_request, on_prepare=lambda conn: Conn(), runner="inline")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("ready", flush=True)
    loop.serve(listener)


def serve_uvloop(port: int, ctx=None) -> None:
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
        srv = await loop.create_server(Proto, "127.0.0.1", port, backlog=1024, ssl=ctx)
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


EXAMPLE = os.path.join(ROOT, "examples", "http_server.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_once(kind: str, conns: int, duration: int, tls_files=None,
             example: str = EXAMPLE) -> tuple[float, float]:
    """(req/s, server CPU us per request) of one wrk run."""
    port = free_port()
    if kind == "example":
        cmd = [sys.executable, example, "--port", str(port)]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", kind, "--port", str(port)]
    if tls_files:
        cmd += ["--tls", tls_files[0], tls_files[1]]
    srv = subprocess.Popen(["taskset", "-c", "0"] + cmd, stdout=subprocess.PIPE)
    try:
        line = srv.stdout.readline().strip()
        assert line == b"ready" or line.startswith(b"listening on"), line
        scheme = "https" if tls_files else "http"
        cpu0 = cpu_seconds(srv.pid)
        out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}s",
                              f"{scheme}://127.0.0.1:{port}/plaintext"],
                             capture_output=True, text=True, timeout=duration + 30).stdout
        cpu = cpu_seconds(srv.pid) - cpu0
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m or "Non-2xx" in out or "Socket errors" in out:
            print(out, file=sys.stderr)
        rps = float(m.group(1)) if m else 0.0
        return rps, (cpu * 1e6 / (rps * duration) if rps else 0.0)
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
    ap.add_argument("--servers", default=None,
                    help="default reactor,eventloop,example,uvloop (--tls: eventloop,example,uvloop)")
    ap.add_argument("--tls", nargs="*", metavar=("CERT", "KEY"), default=None,
                    help="HTTPS; alone: a certificate made at run time; --serve: CERT KEY")
    ap.add_argument("--example", default=EXAMPLE, help="the HTTP example to run (default: this tree's)")
    args = ap.parse_args()
    if args.tls is not None and len(args.tls) not in (0, 2):
        ap.error("--tls takes no argument, or CERT KEY")
    if args.serve == "reactor":
        if args.tls:
            ap.error("the reactor server has no TLS here")
        return serve_reactor(args.port)
    if args.serve == "uvloop":
        return serve_uvloop(args.port, tls_context(args.tls))
    if args.serve == "eventloop":
        return serve_eventloop(args.port, tls_context(args.tls))
    tls = args.tls is not None
    kinds = [k for k in (args.servers or ("eventloop,example,uvloop" if tls else
                                          "reactor,eventloop,example,uvloop")).split(",") if k]
    if tls and "reactor" in kinds:
        ap.error("the reactor server has no TLS here")
    if tls and "example" in kinds:
        with open(args.example) as f:
            if "--tls" not in f.read():
                print(f"{args.example} has no --tls: left out", file=sys.stderr)
                kinds.remove("example")
    tmp = tempfile.TemporaryDirectory(prefix="bench-http-tls-") if tls else None
    tls_files = None
    if tmp is not None:
        sys.path.insert(0, ROOT)
        from netpoll.bench.tlscerts import make_cert
        tls_files = make_cert(tmp.name)
    try:
        for conns in [int(c) for c in args.conns.split(",")]:
            res = {k: [] for k in kinds}
            for rep in range(args.reps):
                order = kinds if rep % 2 == 0 else kinds[::-1]      # alternate
                for kind in order:
                    res[kind].append(run_once(kind, conns, args.duration, tls_files, args.example))
                    time.sleep(0.5)
            med = {k: statistics.median(r for r, _ in v) for k, v in res.items()}
            cpu = {k: statistics.median(c for _, c in v) for k, v in res.items()}
            base = med.get("uvloop")
            parts = []
            for k in kinds:
                ratio = f" ({med[k] / base:.2f}x uvloop)" if base and k != "uvloop" else ""
                parts.append(f"{k} {med[k]:.0f} req/s {cpu[k]:.1f} us/req "
                             f"{[round(r) for r, _ in res[k]]}{ratio}")
            print(f"wrk -t1 -c{conns} -d{args.duration}s{' https' if tls else ''}: "
                  + "; ".join(parts), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
