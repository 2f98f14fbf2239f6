"""HTTP/1.1 server: keep-alive and pipelining, parsed by httptools.

Answers ``GET /plaintext`` with "Hello, World!", ``GET /json`` with
{"message": "Hello, World!"} and anything else with 404 (the TechEmpower
shapes, so ``wrk`` can load it).

Shows per-connection state as the loop's ctx (``on_prepare`` returns it), an
incremental parser fed straight from the connection's input view (no copy
into ``bytes``), and pipelining for free: every request that is complete in
the buffer is answered, in order, with one ``flush()``. The handler never
blocks, so it runs inline on the poller thread (the fastest runner).

HTTPS: ``--tls CERT KEY`` (PEM files: the certificate chain, then its private
key) builds a server ``ssl.SSLContext`` and passes it to ``create_listener``;
every connection is handshaken on the poller before the handler sees it, and
the handler reads and writes plaintext exactly as without TLS.

Run:
    pip install httptools        # or: pip install "netpoll[examples]"
    python examples/http_server.py --port 8080
    curl http://127.0.0.1:8080/json
    wrk -t1 -c32 -d5 http://127.0.0.1:8080/plaintext
    python examples/http_server.py --port 8443 --tls server.pem server.key
    curl --cacert ca.pem https://localhost:8443/json
"""
from __future__ import annotations

import argparse
import json
import signal
import ssl
import threading
import time
from email.utils import formatdate
from typing import Any, Callable, Dict, List, Optional, Tuple

import httptools

import netpoll

ROUTES: Dict[bytes, Tuple[bytes, Callable[[], bytes]]] = {
    b"/plaintext": (b"text/plain", lambda: b"Hello, World!"),
    b"/json": (b"application/json",
               lambda: json.dumps({"message": "Hello, World!"}).encode()),
}

_date = (0, b"")


def http_date() -> bytes:
    """The Date header value, formatted once per second rather than per response."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True).encode())
    return _date[1]


def response(status: bytes, content_type: bytes, body: bytes, keep_alive: bool) -> bytes:
    return b"".join((
        b"HTTP/1.1 ", status, b"\r\nServer: netpoll\r\nDate: ", http_date(),
        b"\r\nContent-Type: ", content_type,
        b"\r\nContent-Length: ", str(len(body)).encode(),
        b"\r\n" if keep_alive else b"\r\nConnection: close\r\n",
        b"\r\n", body))


def answer(url: bytes, keep_alive: bool) -> bytes:
    route = ROUTES.get(url.partition(b"?")[0])
    if route is None:
        return response(b"404 Not Found", b"text/plain", b"Not Found", keep_alive)
    content_type, body = route
    return response(b"200 OK", content_type, body(), keep_alive)


class HttpConnection:
    """One connection's parser, and the requests it has completed so far.
    httptools calls the on_* methods while we feed it bytes."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.complete: List[Tuple[bytes, bool]] = []   # (url, keep_alive) in arrival order

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url          # a URL split across reads arrives in pieces

    def on_message_complete(self) -> None:
        self.complete.append((self.url, self.parser.should_keep_alive()))


def on_prepare(conn: netpoll.Connection) -> HttpConnection:
    return HttpConnection()      # becomes the ctx of every on_request for this conn


def on_request(http: HttpConnection, conn: netpoll.Connection) -> None:
    reader, writer = conn.reader, conn.writer
    bad = False
    try:
        # The parser keeps what it needs (e.g. half a request) between calls,
        # so we hand it everything buffered and never wait for more here.
        http.parser.feed_data(reader.next(len(reader)))
    except httptools.HttpParserError:
        bad = True               # malformed, or bytes after a "Connection: close" request
    close = False
    for url, keep_alive in http.complete:
        writer.write_binary(answer(url, keep_alive))
        if not keep_alive:
            close = True
            break                # anything pipelined after "Connection: close" is ignored
    http.complete.clear()
    if bad and not close:
        writer.write_binary(response(b"400 Bad Request", b"text/plain", b"Bad Request", False))
        close = True
    writer.flush()               # all pipelined responses go out together
    if close:
        conn.close()             # output already flushed is still delivered


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context from PEM files, offering HTTP/1.1 by ALPN."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080, help="0 lets the OS choose")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                    help="serve HTTPS with this certificate chain and private key (PEM)")
    args = ap.parse_args()

    ssl_ctx: Optional[ssl.SSLContext] = tls_context(*args.tls) if args.tls else None
    listener = netpoll.create_listener("tcp", (args.host, args.port), ssl=ssl_ctx)
    loop = netpoll.EventLoop(on_request, on_prepare=on_prepare, runner="inline",
                             idle_timeout=60.0)   # drop keep-alive connections left idle

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
