"""Echo server: the smallest complete netpoll server.

Shows ``create_listener`` + ``EventLoop(on_request, runner=...)`` + ``serve``,
a handler in the parse-what-is-there style (it works on every runner), the
zero-copy path from the connection's reader to its writer, and a graceful
shutdown on SIGINT/SIGTERM.

Run:
    python examples/echo_server.py --port 8888                 # runner="pool"
    python examples/echo_server.py --port 0 --runner inline    # the OS picks the port
    python examples/echo_server.py --unix /tmp/echo.sock
    python examples/echo_server.py --port 8443 --tls server.pem server.key
    openssl s_client -connect 127.0.0.1:8443 -CAfile ca.pem -quiet

With ``--tls CERT KEY`` (PEM: the certificate chain, then its private key) the
listener is given a server ``ssl.SSLContext``: connections are handshaken on
the poller before the handler runs, and the handler is unchanged: it reads
and writes plaintext, still without copies.

The first line on stdout is ``listening on HOST:PORT`` (or ``listening on
unix:PATH``); try it with ``python examples/echo_client.py --port PORT``.
"""
from __future__ import annotations

import argparse
import signal
import ssl
import threading
from typing import Any, Optional

import netpoll


def on_request(ctx: Any, conn: netpoll.Connection) -> None:
    # Called when bytes arrive; echo whatever is buffered now and return. A
    # handler that never waits for more bytes is safe on the inline runner too.
    reader, writer = conn.reader, conn.writer
    data = reader.next(len(reader))  # a read-only view of the input buffer: no copy
    writer.write_binary(data)        # a netpoll view is referenced, not copied
    writer.flush()
    # No reader.release() needed: the loop releases what was read when we return.


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8888, help="0 lets the OS choose")
    ap.add_argument("--unix", metavar="PATH", help="listen on a Unix socket instead")
    ap.add_argument("--runner", choices=("pool", "inline"), default="pool",
                    help="pool: handlers on worker threads; inline: on the poller thread")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                    help="serve TLS with this certificate chain and private key (PEM)")
    args = ap.parse_args()

    ssl_ctx: Optional[ssl.SSLContext] = None
    if args.tls:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(*args.tls)
    if args.unix:
        listener = netpoll.create_listener("unix", args.unix, ssl=ssl_ctx)
        where = f"unix:{listener.addr}"
    else:
        listener = netpoll.create_listener("tcp", (args.host, args.port), ssl=ssl_ctx)
        assert isinstance(listener.addr, tuple)     # TCP: (host, port)
        host, port = listener.addr
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # idle_timeout closes connections that go quiet, so a stuck client cannot
    # hold its socket forever.
    loop = netpoll.EventLoop(on_request, runner=args.runner, idle_timeout=300.0)

    # shutdown() waits for running handlers, so run it off the signal handler.
    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=loop.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    # The listener already accepts connections (the kernel queues them), so a
    # client may connect as soon as it reads this line.
    print(f"listening on {where}", flush=True)
    loop.serve(listener)  # returns once shutdown() has finished
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
