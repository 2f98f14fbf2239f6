#!/usr/bin/env python3
"""Prefork scaling: a CPU-heavy echo handler on 1 vs 2 processes, netpoll and uvloop.

    python bench/bench_prefork.py [--duration 5] [--repeat 3] [--work-us 50] [--conns 64]

Not a test: it prints a table. The handler costs about --work-us of Python per
1 KiB request (SHA-256 chained over the payload, the count calibrated at start
so that it takes that long on this machine, GIL held throughout) and echoes
the payload, which the load generator verifies byte for byte.

Servers (each in its own processes, started afresh for every run):
- netpoll: ``netpoll.serve(on_request, "127.0.0.1:0", processes=P, runner="inline")``
  (one poller per worker, SO_REUSEPORT per worker);
- uvloop: P independent uvloop processes, each ``create_server(..., reuse_port=True)``
  on one port reserved beforehand (a bound, never listening SO_REUSEPORT socket).

Load: ``python -m netpoll.bench client 127.0.0.1:PORT --conns 64 --size 1024
--duration D`` (echo mode), unpinned, like the servers: on a 2-core machine
the load generator shares the cores with the servers. Runs alternate between
the servers and process counts; the table shows medians. "server cores" is
the CPU the server's processes used during the measured window (utime + stime
from /proc, over wall time): on a shared machine it tells a server that had
no second core from one that could not use it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZE = 1024


def work(data, rounds):
    """About work_us of Python: chained SHA-256 (1 KiB and 32-byte inputs hold the GIL)."""
    d = hashlib.sha256(data).digest()
    for _ in range(rounds):
        d = hashlib.sha256(d).digest()
    return d


def calibrate(work_us):
    """Rounds of work() that cost work_us of CPU (thread CPU time, not wall
    time: the machine may be shared while this runs)."""
    data = os.urandom(SIZE)
    rounds = 100
    while True:
        t = time.thread_time()
        for _ in range(200):
            work(data, rounds)
        per = (time.thread_time() - t) / 200
        if per > 200e-6 or rounds > 10 ** 6:
            break
        rounds *= 2
    rounds = max(1, int(rounds * work_us * 1e-6 / per))
    t = time.thread_time()
    for _ in range(500):
        work(data, rounds)
    return rounds, (time.thread_time() - t) / 500 * 1e6


# -- servers (this file run with --server ...) -------------------------------

def netpoll_server(processes, rounds):
    sys.path.insert(0, ROOT)
    import netpoll

    def on_connect(ctx, conn):
        return [0]      # bytes received so far on this connection

    def on_request(ctx, conn):
        reader = conn.reader
        n = len(reader)
        if not n:
            return
        data = reader.next(n)
        before = ctx[0]
        ctx[0] = before + n
        # One unit of work per complete request, however the bytes arrive.
        for _ in range(ctx[0] // SIZE - before // SIZE):
            work(data, rounds)
        conn.writer.write_binary(data)
        conn.writer.flush()
        reader.release()

    netpoll.serve(on_request, "127.0.0.1:0", processes=processes, runner="inline",
                  on_connect=on_connect,
                  on_ready=lambda addr: print(f"READY {addr[1]}", flush=True))


def uvloop_server(port, rounds):
    import asyncio
    import uvloop

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.got = 0

        def data_received(self, data):
            before = self.got
            self.got += len(data)
            for _ in range(self.got // SIZE - before // SIZE):
                work(data, rounds)
            self.transport.write(data)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", port, reuse_port=True,
                                          backlog=4096)
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        print(f"READY {port}", flush=True)
        async with server:
            await stop

    uvloop.run(main())


# -- the driver ----------------------------------------------------------------

def wait_ready(proc, timeout=20.0):
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode() if r else ""
    if not line.startswith("READY "):
        raise RuntimeError(f"server did not start: {line!r}")
    return int(line.split()[1])


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def start(kind, processes, rounds):
    me = [sys.executable, os.path.abspath(__file__), "--rounds", str(rounds)]
    if kind == "netpoll":
        p = subprocess.Popen(me + ["--server", "netpoll", "--processes", str(processes)],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            return [p], wait_ready(p)
        except BaseException:
            stop([p])
            raise
    hold = socket.socket()
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    hold.bind(("127.0.0.1", 0))
    port = hold.getsockname()[1]
    procs = []
    try:
        for _ in range(processes):
            p = subprocess.Popen(me + ["--server", "uvloop", "--port", str(port)],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            procs.append(p)
            wait_ready(p)
    except BaseException:
        stop(procs)
        raise
    finally:
        hold.close()
    return procs, port


def server_cpu(pids):
    """utime + stime, seconds, of these processes and their children (the
    netpoll workers are children of the supervisor)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                total += server_cpu([int(k) for k in f.read().split()])
        except OSError:
            pass
    return total


def measure(kind, processes, rounds, args):
    procs, port = start(kind, processes, rounds)
    return run_load(procs, port, args, f"{kind} x{processes}")


def run_load(procs, port, args, label):
    """One load run against servers already started (stopped here)."""
    notify_r, notify_w = os.pipe()
    try:
        client = subprocess.Popen(
            [sys.executable, "-m", "netpoll.bench", "client", f"127.0.0.1:{port}",
             "--conns", str(args.conns), "--size", str(SIZE), "--duration", str(args.duration),
             "--notify-fd", str(notify_w)],
            cwd=ROOT, stdout=subprocess.PIPE, pass_fds=(notify_w,))
        os.close(notify_w)
        pids = [p.pid for p in procs]
        cpu = []
        for _ in range(2):          # b"S" at the start of the window, b"E" at its end
            r, _, _ = select.select([notify_r], [], [], args.duration + 30)
            if not r or not os.read(notify_r, 1):
                break
            cpu.append((time.monotonic(), server_cpu(pids)))
        out, _ = client.communicate(timeout=args.duration + 60)
    finally:
        os.close(notify_r)
        stop(procs)
    res = json.loads(out)
    if res.get("errors"):
        raise RuntimeError(f"{label}: {res['errors']} errors")
    res["server_cores"] = ((cpu[1][1] - cpu[0][1]) / (cpu[1][0] - cpu[0][0])
                           if len(cpu) == 2 else float("nan"))
    # Server CPU per request (us): the cost side of the scaling, which a
    # neighbour taking a core changes much less than req/s.
    res["cpu_us_per_req"] = (res["server_cores"] / res["rps"] * 1e6
                             if res.get("rps") else float("nan"))
    return res


def print_run(rep, label, res):
    print(f"  run {rep + 1}: {label}: {res['rps']:.0f} req/s, "
          f"p99 {res['p99_us']:.0f} us, server {res['server_cores']:.2f} cores, "
          f"{res['cpu_us_per_req']:.1f} us CPU/req, "
          f"client cpu {res['client_cpu_s']:.2f} s", flush=True)


def print_table(first, rows, results):
    """rows: [(name, [(count, key), ...])]; the speedup is against the first count."""
    print(f"| server | {first} | req/s (median) | p99 us | server cores "
          "| server CPU us/req | speedup 1 -> 2 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, cells in rows:
        one = statistics.median(r["rps"] for r in results[cells[0][1]])
        for i, (count, key) in enumerate(cells):
            rs = results[key]
            rps = statistics.median(r["rps"] for r in rs)
            p99 = statistics.median(r["p99_us"] for r in rs)
            cores = statistics.median(r["server_cores"] for r in rs)
            cpr = statistics.median(r["cpu_us_per_req"] for r in rs)
            sp = f"{rps / one:.2f}x" if i else ""
            print(f"| {name} | {count} | {rps:.0f} | {p99:.0f} | {cores:.2f} | {cpr:.1f} | {sp} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=("netpoll", "uvloop"), help=argparse.SUPPRESS)
    ap.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell (median shown)")
    ap.add_argument("--work-us", type=float, default=50.0, help="handler CPU per request")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--servers", default="netpoll,uvloop")
    args = ap.parse_args()
    if args.server == "netpoll":
        return netpoll_server(args.processes, args.rounds)
    if args.server == "uvloop":
        return uvloop_server(args.port, args.rounds)

    rounds, us = calibrate(args.work_us)
    print(f"handler work: {rounds} chained SHA-256 = {us:.1f} us per request; "
          f"{os.cpu_count()} CPUs; load generator unpinned", flush=True)
    kinds = args.servers.split(",")
    cells = [(k, p) for k in kinds for p in (1, 2)]
    results = {c: [] for c in cells}
    for rep in range(args.repeat):
        order = cells if rep % 2 == 0 else cells[::-1]
        for kind, procs in order:
            res = measure(kind, procs, rounds, args)
            results[(kind, procs)].append(res)
            print_run(rep, f"{kind} x{procs}", res)
    print()
    print_table("processes", [(k, [(p, (k, p)) for p in (1, 2)]) for k in kinds], results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
