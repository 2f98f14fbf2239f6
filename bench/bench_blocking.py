#!/usr/bin/env python3
"""Blocking-handler benchmark (issue 12): every request's handler makes a
blocking call of 1 ms, then echoes the request.

    python bench/bench_blocking.py                       # 64 and 256 connections, pinned
    python bench/bench_blocking.py --conns 256 --duration 5 --repeat 3
    python bench/bench_blocking.py --servers netpoll-auto,threaded --no-pin
    python bench/bench_blocking.py --call downstream     # a real downstream server
    python bench/bench_blocking.py --call sleep --json a.json; ... b.json
    python bench/bench_blocking.py --merge a.json b.json # one table from both

Servers (each its own process; this file serves them with --serve KIND):
  netpoll-auto   EventLoop(runner="auto")
  netpoll-pool   EventLoop(runner="pool") (16 workers unless NETPOLL_POOL_SIZE)
  threaded       a thread per connection: recv, the call, sendall
  asyncio        asyncio streams: await reader.read(), await the call
  uvloop         the same on uvloop
  gevent         gevent.server.StreamServer, everything monkey-patched
The call (--call):
  sleep          (default) time.sleep(0.001); asyncio.sleep / gevent.sleep
  downstream     a round trip to a downstream server that answers each message
                 after 1 ms (uvloop, call_later; its own process, started
                 once and used by every server under test, pinned beside the
                 load generator). Each client connection gets its own
                 downstream connection: netpoll dials it with a netpoll
                 Dialer(runner=<the server's runner>) in on_connect and uses a
                 blocking flush() + reader.next(); threaded and gevent use a
                 (patched) blocking socket; asyncio/uvloop await an asyncio
                 stream.
Environment, netpoll servers: NETPOLL_POOL_SIZE, NETPOLL_HANDOFF_THRESHOLD
(seconds, configure(handoff_threshold=)), NETPOLL_DIALER_RUNNER ("default":
a plain Dialer(), or a runner name for the downstream connections).
The native load generator and the measurement (server CPU from /proc, the
load generator's window marks) are those of ``python -m netpoll.bench``
(netpoll/bench/driver.py, ``measure``). Reports req/s, p50/p99 latency and
server CPU per request; 64 B echo, one request in flight per connection.
"""
# ruff: noqa: T201 - a command-line benchmark: its report is printed
import sys


def _serving(kind, argv):
    return any(a == "--serve" and b == kind for a, b in zip(argv, argv[1:]))


if __name__ == "__main__" and _serving("gevent", sys.argv):
    # gevent must patch before socket, threading and time are imported.
    from gevent import monkey
    monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DELAY = 0.001


def _ready(where):
    sys.stdout.write(f"READY {where}\n")
    sys.stdout.flush()


def _listen_addr(args):
    return args.host, args.port


def _downstream(args):
    """(host, port) of the downstream server, or None for the sleep variant."""
    if args.call == "sleep":
        return None
    host, _, port = args.downstream.rpartition(":")
    return host, int(port)


def _recv_exactly(sock, n):
    parts = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("downstream closed")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


# ------------------------------------------------------------------ servers

def serve_netpoll(args, runner):
    sys.path.insert(0, ROOT)
    import netpoll
    if os.environ.get("NETPOLL_POOL_SIZE"):
        netpoll.configure(pool_size=int(os.environ["NETPOLL_POOL_SIZE"]))
    if os.environ.get("NETPOLL_HANDOFF_THRESHOLD"):     # seconds, runner "auto"
        netpoll.configure(handoff_threshold=float(os.environ["NETPOLL_HANDOFF_THRESHOLD"]))
    ds_addr = _downstream(args)

    def handler(ctx, conn):
        reader = conn.reader
        n = len(reader)
        if n:
            data = reader.next(n)
            time.sleep(DELAY)          # the blocking call (a DB driver, an RPC...)
            conn.writer.write_binary(data)
            conn.writer.flush()
            reader.release()

    def on_connect(ctx, conn):
        # One downstream connection per client connection, so that at most
        # one request is in flight on each (on_request is never re-entered).
        return dialer.dial_connection("tcp", f"{ds_addr[0]}:{ds_addr[1]}", timeout=5.0)

    def on_disconnect(ds, conn):
        if ds is not None:
            ds.close()

    def handler_downstream(ds, conn):
        reader = conn.reader
        n = len(reader)
        if n:
            data = reader.next(n)
            ds.writer.write_binary(data)
            ds.writer.flush()            # blocking until sent
            reply = ds.reader.next(n)    # blocking until the downstream answers
            conn.writer.write_binary(reply)
            conn.writer.flush()
            ds.reader.release()
            reader.release()

    lst = netpoll.create_listener("tcp", f"{args.host}:{args.port}")
    if ds_addr is None:
        loop = netpoll.EventLoop(handler, runner=runner)
    else:
        # The Dialer's runner is the server's: a blocking read or flush on a
        # connection hands polling off (runner "auto") only when that
        # connection is itself "auto"; a default Dialer() (runner "pool")
        # read from an auto handler blocks its poller until the monitor
        # notices. NETPOLL_DIALER_RUNNER=default measures that Dialer().
        ds_runner = os.environ.get("NETPOLL_DIALER_RUNNER", runner)
        dialer = netpoll.Dialer(runner=None if ds_runner == "default" else ds_runner)
        loop = netpoll.EventLoop(handler_downstream, on_connect=on_connect,
                                 on_disconnect=on_disconnect, runner=runner)
    threading.Timer(0.2, _ready, (lst.addr[1],)).start()
    loop.serve(lst)


def serve_threaded(args):
    srv = socket.create_server(_listen_addr(args), backlog=1024)
    ds_addr = _downstream(args)

    def handle(sock):
        ds = None
        try:
            if ds_addr is not None:
                ds = socket.create_connection(ds_addr)
                ds.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                if ds is None:
                    time.sleep(DELAY)
                else:
                    ds.sendall(data)
                    data = _recv_exactly(ds, len(data))
                sock.sendall(data)
        except OSError:
            pass
        finally:
            sock.close()
            if ds is not None:
                ds.close()

    _ready(srv.getsockname()[1])
    while True:
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def serve_asyncio(args, use_uvloop):
    import asyncio
    if use_uvloop:
        import uvloop
        uvloop.install()
    ds_addr = _downstream(args)

    async def handle(reader, writer):
        dw = None
        try:
            if ds_addr is not None:
                dr, dw = await asyncio.open_connection(*ds_addr)
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if dw is None:
                    await asyncio.sleep(DELAY)
                else:
                    dw.write(data)
                    await dw.drain()
                    data = await dr.readexactly(len(data))
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            if dw is not None:
                dw.close()

    async def main():
        srv = await asyncio.start_server(handle, args.host, args.port, backlog=1024)
        _ready(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(main())


def serve_gevent(args):
    # monkey.patch_all() ran at import (see the top of this file): socket and
    # time.sleep below are gevent's cooperative versions.
    import gevent
    from gevent import monkey
    if not monkey.is_module_patched("socket"):
        raise RuntimeError("gevent server without monkey-patching")
    from gevent.server import StreamServer
    ds_addr = _downstream(args)

    def handle(sock, _addr):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ds = None
        try:
            if ds_addr is not None:
                ds = socket.create_connection(ds_addr)
                ds.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                if ds is None:
                    gevent.sleep(DELAY)
                else:
                    ds.sendall(data)
                    data = _recv_exactly(ds, len(data))
                sock.sendall(data)
        except OSError:
            pass
        finally:
            sock.close()
            if ds is not None:
                ds.close()

    srv = StreamServer(_listen_addr(args), handle, backlog=1024)
    srv.start()
    _ready(srv.address[1])
    srv.serve_forever()


def serve_downstream(args):
    """The downstream server: answers every message with itself after DELAY.

    Protocol-based with call_later (no task per request), on uvloop when it is
    installed, so that it costs as little as it can of the core it shares
    with the load generator."""
    import asyncio
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    class Delayed(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.later = asyncio.get_running_loop().call_later

        def data_received(self, data):
            self.later(DELAY, self.reply, data)

        def reply(self, data):
            if not self.transport.is_closing():
                self.transport.write(data)

    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Delayed, args.host, args.port, backlog=4096)
        _ready(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(main())


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", required=True)
    ap.add_argument("--mode", default="echo")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--call", choices=("sleep", "downstream"), default="sleep")
    ap.add_argument("--downstream", default=None, help="HOST:PORT, with --call downstream")
    args = ap.parse_args(argv)
    if args.call == "downstream" and not args.downstream:
        ap.error("--call downstream needs --downstream HOST:PORT")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _raise_nofile()
    kind = args.serve
    if kind in ("netpoll-auto", "netpoll-pool", "netpoll-inline"):
        serve_netpoll(args, kind.split("-", 1)[1])
    elif kind == "threaded":
        serve_threaded(args)
    elif kind in ("asyncio", "uvloop"):
        serve_asyncio(args, kind == "uvloop")
    elif kind == "gevent":
        serve_gevent(args)
    elif kind == "downstream":
        serve_downstream(args)
    else:
        sys.stdout.write(f"FAILED unknown server {kind}\n")
        sys.exit(1)

# ------------------------------------------------------------------ driver

KINDS = ["netpoll-auto", "netpoll-pool", "threaded", "asyncio", "uvloop", "gevent"]


def start_downstream(driver, cpu):
    """Start the downstream server (pinned to cpu unless None); returns (proc, port)."""
    cmd = driver.pin_prefix(cpu) + [sys.executable, os.path.abspath(__file__),
                                    "--serve", "downstream", "--port", "0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    driver._live[proc.pid] = proc       # so that driver.terminate_all() ends it too
    line = b""
    if driver.select.select([proc.stdout], [], [], driver.READY_TIMEOUT)[0]:
        line = proc.stdout.readline()
    words = line.decode(errors="replace").split()
    if len(words) != 2 or words[0] != "READY":
        driver.terminate(proc)
        raise SystemExit(f"the downstream server did not start: {line!r}")
    return proc, int(words[1])


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None):
    sys.path.insert(0, ROOT)
    from netpoll.bench import driver

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default=",".join(KINDS))
    ap.add_argument("--conns", default="64,256")
    ap.add_argument("--call", choices=("sleep", "downstream"), default="sleep")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", metavar="PATH", default=None,
                    help="also write every run (not only the medians) to PATH")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--lg-cpu", type=int, default=1,
                    help="the load generator's core (and the downstream server's)")
    args = ap.parse_args(argv)
    args.idle_conns = 0
    args.pipeline = 1
    args.lg_threads = 1
    args.lg_spin = False
    if args.pin and not driver.shutil.which("taskset"):
        print("taskset not found: running unpinned", file=sys.stderr)
        args.pin = False
    servers = [s for s in args.servers.split(",") if s]
    unknown = [s for s in servers if s not in KINDS + ["netpoll-inline"]]
    if unknown:
        ap.error(f"unknown server(s) {unknown}; choose from {KINDS + ['netpoll-inline']}")
    for name in ("uvloop", "gevent"):
        if name in servers and driver.module_version(name) is None:
            print(f"{name} is not installed (the [bench] extra): left out", file=sys.stderr)
            servers.remove(name)
    conns_list = [int(c) for c in args.conns.split(",")]
    driver.raise_nofile(2 * max(conns_list) + 256)
    load_start = os.getloadavg()
    print(f"load average at the start: {load_start}", file=sys.stderr)
    rows = []
    ds_proc = None
    ds_marks = []
    try:
        extra = []
        if args.call == "downstream":
            ds_proc, ds_port = start_downstream(driver, args.lg_cpu if args.pin else None)
            extra = ["--call", "downstream", "--downstream", f"127.0.0.1:{ds_port}"]
            # measure() samples the server's CPU exactly at the load generator's
            # window marks; the downstream server's is sampled at the same moments.
            server_cpu = driver.Server.cpu_seconds

            def cpu_seconds(srv):
                ds_marks.append(proc_cpu_seconds(ds_proc.pid))
                return server_cpu(srv)
            driver.Server.cpu_seconds = cpu_seconds
        for name in servers:
            driver.SERVERS["blk-" + name] = (os.path.abspath(__file__), ["--serve", name] + extra)
        for conns in conns_list:
            results = {name: [] for name in servers}
            for _ in range(args.repeat):
                for name in servers:          # alternating servers, run by run
                    del ds_marks[:]
                    r = driver.measure("blk-" + name, "echo", 64, conns, args, args.pin)
                    if not r.get("ok"):
                        print(f"{name} x{conns}: FAILED {r.get('reason')}", file=sys.stderr)
                        continue
                    if len(ds_marks) == 2 and r.get("seconds"):
                        r["ds_util"] = (ds_marks[1] - ds_marks[0]) / r["seconds"]
                    print(f"  {name} x{conns}: {r['rps']:,.0f} req/s, "
                          f"{r.get('cpu_us_per_req') or 0:.1f} µs/req, "
                          f"server {100 * (r.get('server_cpu_util') or 0):.0f}%, "
                          f"lg {100 * (r.get('client_cpu_util') or 0):.0f}%"
                          + (f", downstream {100 * r['ds_util']:.0f}%" if "ds_util" in r else ""),
                          file=sys.stderr)
                    results[name].append(r)
            for name in servers:
                runs = results[name]
                if not runs:
                    rows.append((conns, name, None))
                    continue
                runs.sort(key=lambda r: r["rps"])
                rows.append((conns, name, runs))
    finally:
        if ds_proc is not None:
            driver.terminate(ds_proc)
        driver.terminate_all()
    load_end = os.getloadavg()
    print(f"load average at the end: {load_end}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "call": args.call, "load_start": load_start,
                       "load_end": load_end,
                       "runs": [{"conns": c, "server": n, "runs": runs or []}
                                for c, n, runs in rows]}, f, indent=1)
    print_table(rows, args.call, f"{'pinned' if args.pin else 'unpinned'}, "
                f"{args.duration:g} s x {args.repeat}")


def print_table(rows, call, how):
    """rows: (conns, server, runs or None). Each column is the median over the runs."""
    import statistics
    what = (f"time.sleep({DELAY})" if call == "sleep"
            else f"a round trip to a downstream server answering after {DELAY * 1000:g} ms")
    print(f"\nblocking handler: {what} per request, 64 B echo, {how}, "
          "medians over the runs")
    ds = call == "downstream"
    print("| conns | server | req/s | req/s min-max (runs) | p50 µs | p99 µs | server CPU µs/req "
          "| server CPU % | lg CPU %" + (" | downstream CPU %" if ds else "") + " |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:" + ("|---:" if ds else "") + "|")

    def med(runs, key, fmt, scale=1):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return format(statistics.median(vals) * scale, fmt) if vals else "-"

    for conns, name, runs in rows:
        if not runs:
            print(f"| {conns} | {name} | failed | | | | | | " + ("| " if ds else "") + "|")
            continue
        rps = [r["rps"] for r in runs]
        print(f"| {conns} | {name} | {med(runs, 'rps', ',.0f')} | "
              f"{min(rps) / 1000:.1f}k-{max(rps) / 1000:.1f}k ({len(runs)}) | "
              f"{med(runs, 'p50_us', ',.0f')} | {med(runs, 'p99_us', ',.0f')} | "
              f"{med(runs, 'cpu_us_per_req', '.1f')} | "
              f"{med(runs, 'server_cpu_util', '.0f', 100)} | "
              f"{med(runs, 'client_cpu_util', '.0f', 100)} |"
              + (f" {med(runs, 'ds_util', '.0f', 100)} |" if ds else ""))


def merge(paths):
    """--merge: one table from the runs of several --json files (one --call)."""
    rows = {}
    calls = set()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        calls.add(data["call"])
        for row in data["runs"]:
            rows.setdefault((row["conns"], row["server"]), []).extend(row["runs"])
    if len(calls) != 1:
        raise SystemExit(f"--merge: the files mix calls {sorted(calls)}")
    order = KINDS + ["netpoll-inline"]
    keyed = sorted(rows, key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99))
    print_table([(c, n, rows[(c, n)]) for c, n in keyed], calls.pop(),
                f"{len(paths)} invocations merged")

if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve(sys.argv[1:])
    elif sys.argv[1:2] == ["--merge"]:
        merge(sys.argv[2:])
    else:
        main()
