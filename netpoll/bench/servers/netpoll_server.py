#!/usr/bin/env python3
"""netpoll echo and length-prefixed RPC servers for python -m netpoll.bench.

    python netpoll/bench/servers/netpoll_server.py --mode echo --runner inline --port 0
    python netpoll/bench/servers/netpoll_server.py --mode framed --runner pool --unix /tmp/x.sock
    python netpoll/bench/servers/netpoll_server.py --mode echo --runner inline --tls CERT KEY

Written against the public API of shared/DESIGN.md: ``create_listener`` +
``EventLoop(on_request, runner=...)`` + ``serve``; with ``--tls`` the listener
gets ``ssl=`` (an ``ssl.SSLContext``) and the handlers, unchanged, see plaintext. Both handlers are in the
parse-what-is-there style, so they work on every runner: they consume what is
complete and return; the loop calls them again when more bytes arrive.

Prints ``READY <port>`` (or ``READY <path>``) once listening. If netpoll cannot
be imported or the server cannot start, prints ``FAILED <reason>`` and exits
with status 1 (the driver then reports the cells as failed). SIGTERM/SIGINT
end the process.
"""
import os
import signal
import sys
import threading
import traceback

from common import base_parser, raise_nofile, server_context

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))   # above netpoll/


def fail(reason):
    sys.stdout.write("FAILED " + " ".join(str(reason).split()) + "\n")
    sys.stdout.flush()
    sys.exit(1)


def import_netpoll():
    try:
        import netpoll  # installed, or the checkout when run from its root
        return netpoll
    except ImportError:
        pass
    sys.path.insert(0, ROOT)       # a checkout built in place
    import netpoll
    return netpoll


def on_request_echo(ctx, conn):
    reader = conn.reader
    n = len(reader)
    if n:
        data = reader.next(n)
        writer = conn.writer
        writer.write_binary(data)
        writer.flush()
        # data is a zero-copy view: release() lets the buffer recycle the bytes
        reader.release()


def on_request_framed(ctx, conn):
    reader = conn.reader
    writer = conn.writer
    wrote = False
    while len(reader) >= 4:
        length = int.from_bytes(reader.peek(4), "big")
        if len(reader) < 4 + length:
            break                    # called again when more arrives
        writer.write_binary(reader.next(4 + length))
        wrote = True
    if wrote:
        writer.flush()
        reader.release()


def main(argv=None):
    ap = base_parser(__doc__)
    ap.add_argument("--runner", choices=("inline", "pool", "auto"), default="pool")
    ap.add_argument("--loops", type=int, default=None, help="netpoll.set_num_loops(N) (default: library default)")
    args = ap.parse_args(argv)
    raise_nofile()

    try:
        netpoll = import_netpoll()
        if os.environ.get("NETPOLL_SPIN_NS"):
            from netpoll._core.runner import _set_spin
            _set_spin(int(os.environ["NETPOLL_SPIN_NS"]))
        if os.environ.get("NETPOLL_POOL_SIZE"):
            netpoll.configure(pool_size=int(os.environ["NETPOLL_POOL_SIZE"]))
        if args.loops is not None:
            netpoll.set_num_loops(args.loops)
        if os.environ.get("NETPOLL_SLICE_BYTES"):
            from netpoll.config import runtime
            runtime().ensure_started()
            for poller in runtime().pollers:
                poller._set_slice_bytes(int(os.environ["NETPOLL_SLICE_BYTES"]))
        if args.unix:
            try:
                os.unlink(args.unix)
            except FileNotFoundError:
                pass
            listener = netpoll.create_listener("unix", args.unix, ssl=server_context(args))
        else:
            host = f"[{args.host}]" if ":" in args.host else args.host
            listener = netpoll.create_listener("tcp", f"{host}:{args.port}", ssl=server_context(args))
        handler = on_request_echo if args.mode == "echo" else on_request_framed
        loop = netpoll.EventLoop(handler, runner=args.runner)
        addr = listener.addr
        where = addr if isinstance(addr, str) else addr[1]
    except BaseException as exc:  # noqa: BLE001 - any failure to start is reported, not raised
        traceback.print_exc(file=sys.stderr)
        fail(f"{type(exc).__name__}: {exc}")

    # SIGTERM keeps its default action (the process ends at once: nothing to save in a
    # benchmark server, and a Python-level handler would only run when serve() returns
    # to the interpreter); SIGINT does the same instead of raising KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    # READY is printed from a thread once serve() has had a moment to start, so the
    # driver never connects before the loop is up; serve() raising reports FAILED.
    ready = threading.Event()
    errors = []

    def announce():
        if not ready.wait(0.05) and not errors:
            sys.stdout.write(f"READY {where}\n")
            sys.stdout.flush()

    threading.Thread(target=announce, daemon=True).start()
    try:
        loop.serve(listener)
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)
        ready.set()
        traceback.print_exc(file=sys.stderr)
        fail(f"serve: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
