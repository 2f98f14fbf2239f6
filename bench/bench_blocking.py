#!/usr/bin/env python3
"""Blocking-handler benchmark (issue 12): every request's handler makes a
blocking call of 1 ms, then echoes the request.

    python bench/bench_blocking.py                       # 64 and 256 connections, pinned
    python bench/bench_blocking.py --conns 256 --duration 5 --repeat 3
    python bench/bench_blocking.py --servers netpoll-auto,threaded --no-pin

Servers (each its own process; this file serves them with --serve KIND):
  netpoll-auto   EventLoop(runner="auto"), handler: time.sleep(0.001)
  netpoll-pool   EventLoop(runner="pool") (16 workers unless NETPOLL_POOL_SIZE)
  threaded       a thread per connection: recv, time.sleep(0.001), sendall
  asyncio        asyncio streams: await reader.read(), await asyncio.sleep(0.001)
  uvloop         the same on uvloop
The native load generator and the measurement (server CPU from /proc, the
load generator's window marks) are those of ``python -m netpoll.bench``
(netpoll/bench/driver.py, ``measure``). Reports req/s, p50/p99 latency and
server CPU per request; 64 B echo, one request in flight per connection.
"""
import argparse
import os
import signal
import socket
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DELAY = 0.001


def _ready(where):
    sys.stdout.write(f"READY {where}\n")
    sys.stdout.flush()


def _listen_addr(args):
    return args.host, args.port


# ------------------------------------------------------------------ servers

def serve_netpoll(args, runner):
    sys.path.insert(0, ROOT)
    import netpoll
    if os.environ.get("NETPOLL_POOL_SIZE"):
        netpoll.configure(pool_size=int(os.environ["NETPOLL_POOL_SIZE"]))

    def handler(ctx, conn):
        reader = conn.reader
        n = len(reader)
        if n:
            data = reader.next(n)
            time.sleep(DELAY)          # the blocking call (a DB driver, an RPC...)
            conn.writer.write_binary(data)
            conn.writer.flush()
            reader.release()

    lst = netpoll.create_listener("tcp", f"{args.host}:{args.port}")
    loop = netpoll.EventLoop(handler, runner=runner)
    threading.Timer(0.2, _ready, (lst.addr[1],)).start()
    loop.serve(lst)


def serve_threaded(args):
    srv = socket.create_server(_listen_addr(args), backlog=1024)

    def handle(sock):
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                time.sleep(DELAY)
                sock.sendall(data)
        except OSError:
            pass
        finally:
            sock.close()

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

    async def handle(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await asyncio.sleep(DELAY)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def main():
        srv = await asyncio.start_server(handle, args.host, args.port, backlog=1024)
        _ready(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(main())


def serve(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", required=True)
    ap.add_argument("--mode", default="echo")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    kind = args.serve
    if kind in ("netpoll-auto", "netpoll-pool", "netpoll-inline"):
        serve_netpoll(args, kind.split("-", 1)[1])
    elif kind == "threaded":
        serve_threaded(args)
    elif kind in ("asyncio", "uvloop"):
        serve_asyncio(args, kind == "uvloop")
    else:
        sys.stdout.write(f"FAILED unknown server {kind}\n")
        sys.exit(1)

# ------------------------------------------------------------------ driver

KINDS = ["netpoll-auto", "netpoll-pool", "threaded", "asyncio", "uvloop"]


def main(argv=None):
    sys.path.insert(0, ROOT)
    from netpoll.bench import driver

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default=",".join(KINDS))
    ap.add_argument("--conns", default="64,256")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--lg-cpu", type=int, default=1)
    args = ap.parse_args(argv)
    args.idle_conns = 0
    args.pipeline = 1
    args.lg_threads = 1
    args.lg_spin = False
    if args.pin and not driver.shutil.which("taskset"):
        print("taskset not found: running unpinned", file=sys.stderr)
        args.pin = False
    servers = [s for s in args.servers.split(",") if s]
    for name in servers:
        driver.SERVERS["blk-" + name] = (os.path.abspath(__file__), ["--serve", name])
    conns_list = [int(c) for c in args.conns.split(",")]
    rows = []
    try:
        for conns in conns_list:
            results = {name: [] for name in servers}
            for _ in range(args.repeat):
                for name in servers:          # alternating servers, run by run
                    r = driver.measure("blk-" + name, "echo", 64, conns, args, args.pin)
                    if not r.get("ok"):
                        print(f"{name} x{conns}: FAILED {r.get('reason')}", file=sys.stderr)
                        continue
                    results[name].append(r)
            for name in servers:
                runs = results[name]
                if not runs:
                    rows.append((conns, name, None, None, None, None))
                    continue
                runs.sort(key=lambda r: r["rps"])
                med = runs[len(runs) // 2]
                rows.append((conns, name, med["rps"], med["p50_us"], med["p99_us"],
                             med.get("cpu_us_per_req")))
    finally:
        driver.terminate_all()
    print(f"\nblocking handler: time.sleep({DELAY}) per request, 64 B echo, "
          f"{'pinned' if args.pin else 'unpinned'}, {args.duration:g} s x {args.repeat}")
    print("| conns | server | req/s | p50 µs | p99 µs | server CPU µs/req |")
    print("|---:|---|---:|---:|---:|---:|")
    for conns, name, rps, p50, p99, cpu in rows:
        if rps is None:
            print(f"| {conns} | {name} | failed | | | |")
        else:
            print(f"| {conns} | {name} | {rps:,.0f} | {p50:,.0f} | {p99:,.0f} | "
                  f"{cpu:.1f} |" if cpu is not None else "| - |")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve(sys.argv[1:])
    else:
        main()
