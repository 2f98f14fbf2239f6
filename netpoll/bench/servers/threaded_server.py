#!/usr/bin/env python3
"""Thread-per-connection echo and length-prefixed RPC servers for python -m netpoll.bench.

    python netpoll/bench/servers/threaded_server.py --mode echo --port 0
    python netpoll/bench/servers/threaded_server.py --mode framed --unix /tmp/x.sock
    python netpoll/bench/servers/threaded_server.py --mode echo --tls CERT KEY

Blocking sockets: ``recv`` + ``sendall`` for echo; for ``framed`` (4-byte
big-endian length + body) exact reads with ``recv_into`` into one reusable
buffer, and the whole frame sent back with one ``sendall``. ``--tls``: each
connection's thread wraps its socket with ``SSLContext.wrap_socket`` (the
handshake runs in that thread, not in the accept loop). Prints
``READY <port>`` (or ``READY <path>``) once listening. SIGTERM/SIGINT stop it.
"""
import os
import signal
import socket
import sys
import threading

from common import base_parser, raise_nofile, server_context


def handle_echo(sock):
    recv = sock.recv
    sendall = sock.sendall
    try:
        while True:
            data = recv(262144)
            if not data:
                return
            sendall(data)
    except OSError:
        pass
    finally:
        sock.close()


def recv_exact(recv_into, view):
    """Fill view completely; False at EOF."""
    got = 0
    n = len(view)
    while got < n:
        k = recv_into(view[got:])
        if k == 0:
            return False
        got += k
    return True


def handle_framed(sock):
    recv_into = sock.recv_into
    sendall = sock.sendall
    buf = bytearray(4 + 65536)
    view = memoryview(buf)
    try:
        while True:
            if not recv_exact(recv_into, view[:4]):
                return
            length = int.from_bytes(view[:4], "big")
            if 4 + length > len(buf):
                view.release()
                grown = bytearray(4 + length)
                grown[:4] = buf[:4]
                buf = grown
                view = memoryview(buf)
            if length and not recv_exact(recv_into, view[4:4 + length]):
                return
            sendall(view[:4 + length])
    except OSError:
        pass
    finally:
        sock.close()


def tls_handler(ctx, handler):
    """handler, run on the TLS session of the socket (handshake in the connection's thread)."""
    def run(sock):
        try:
            tls = ctx.wrap_socket(sock, server_side=True)
        except OSError:             # ssl.SSLError is one: a failed handshake ends this connection
            sock.close()
            return
        handler(tls)
    return run


def main(argv=None):
    ap = base_parser(__doc__)
    ap.add_argument("--backlog", type=int, default=4096)
    args = ap.parse_args(argv)
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    if args.unix:
        try:
            os.unlink(args.unix)
        except FileNotFoundError:
            pass
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(args.unix)
        where = args.unix
    else:
        lsock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((args.host, args.port))
        where = lsock.getsockname()[1]
    lsock.listen(args.backlog)
    handler = handle_echo if args.mode == "echo" else handle_framed
    ctx = server_context(args)
    if ctx is not None:
        handler = tls_handler(ctx, handler)
    tcp = lsock.family != socket.AF_UNIX
    sys.stdout.write(f"READY {where}\n")
    sys.stdout.flush()
    try:
        while True:
            try:
                sock, _ = lsock.accept()
            except OSError:          # EMFILE and friends: keep serving the others
                threading.Event().wait(0.01)
                continue
            if tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handler, args=(sock,), daemon=True).start()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
