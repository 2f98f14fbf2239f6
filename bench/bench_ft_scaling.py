#!/usr/bin/env python3
"""Free-threaded scaling: a CPU-heavy echo handler on num_loops=1 vs 2, GIL off.

    python bench/bench_ft_scaling.py --ft-python /opt/netpoll-py313t/bin/python3.13t \\
        --ft-tree /tmp/ftcopy [--duration 5] [--repeat 3] [--work-us 50] [--conns 64]

Not a test: it prints a table. The driver and the load generator run on the
interpreter that runs this file (its netpoll, with its built load generator);
each server runs on --ft-python with PYTHON_GIL=0 and PYTHONPATH=--ft-tree, a
copy of the tree built with that interpreter (docs/freethreading.md, or the
work directory .ci/ft leaves behind). The server checks that the GIL is off.

The handler is bench_prefork.py's (about --work-us of Python per 1 KiB
request, SHA-256 chained, calibrated once on the free-threaded interpreter;
the payload echoed and verified byte for byte), with one change: SHA-256 from
CPython's own ``_sha2`` module, not OpenSSL's through ``hashlib``. On 3.13t
``hashlib.sha256`` does not scale across threads (two threads doing nothing
else each took twice the CPU per call: OpenSSL's shared EVP state), which
would measure OpenSSL rather than netpoll. The "ceiling" line runs the same
work in 1 and 2 plain threads (no server, no sockets): what the machine and
the interpreter give at that moment. Servers: one process,
``netpoll.configure(num_loops=N)``, ``EventLoop(on_request, runner=R)`` on
127.0.0.1, R = "inline" (handlers on the pollers: 1 poller is 1 core of
Python) or "pool" (handlers on the worker pool, whose threads run in
parallel whatever num_loops is), the server process confined to N CPUs
(``os.sched_setaffinity``) for N pollers, so that "1" means one core for
both runners. Runs alternate between the cells; the table
shows medians and, as bench_prefork.py does, the server's CPU (cores, and
microseconds per request) over the measured window.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_prefork as bp  # noqa: E402

CELLS = [("inline", 1), ("inline", 2), ("pool", 1), ("pool", 2)]


def work(data, rounds):
    """bench_prefork.work with CPython's SHA-256 (see the module's doc)."""
    try:
        from _sha2 import sha256
    except ImportError:             # CPython < 3.12
        from hashlib import sha256
    d = sha256(data).digest()
    for _ in range(rounds):
        d = sha256(d).digest()
    return d


def ceiling(rounds, seconds=2.0):
    """Units of work per second (wall) and CPU us per unit, 1 then 2 threads."""
    data = os.urandom(bp.SIZE)
    for nt in (1, 2):
        counts, cpu = [0] * nt, [0.0] * nt
        end = time.monotonic() + seconds

        def job(i):
            t = time.thread_time()
            while time.monotonic() < end:
                for _ in range(20):
                    work(data, rounds)
                counts[i] += 20
            cpu[i] = time.thread_time() - t
        ts = [threading.Thread(target=job, args=(i,)) for i in range(nt)]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.monotonic() - t0
        print(f"{nt} {sum(counts) / wall:.0f} {sum(cpu) / sum(counts) * 1e6:.1f}")


def ft_server(runner, loops, rounds):
    """Runs on the free-threaded interpreter (PYTHONPATH: the 3.13t tree).
    The server may run on `loops` CPUs and has as many pollers: the pool
    runner's workers would otherwise use every core whatever num_loops is."""
    import netpoll
    if getattr(sys, "_is_gil_enabled", lambda: True)():
        raise SystemExit("bench_ft_scaling: the GIL is on in the server")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < loops:
        raise SystemExit(f"bench_ft_scaling: {loops} CPUs asked, {len(cpus)} allowed")
    os.sched_setaffinity(0, cpus[:loops])       # threads started later inherit it
    netpoll.configure(num_loops=loops)

    def on_connect(ctx, conn):
        return [0]

    def on_request(ctx, conn):
        reader = conn.reader
        n = len(reader)
        if not n:
            return
        data = reader.next(n)
        before = ctx[0]
        ctx[0] = before + n
        for _ in range(ctx[0] // bp.SIZE - before // bp.SIZE):
            work(data, rounds)
        conn.writer.write_binary(data)
        conn.writer.flush()
        reader.release()

    lst = netpoll.create_listener("tcp", "127.0.0.1:0", backlog=4096)
    loop = netpoll.EventLoop(on_request, on_connect=on_connect, runner=runner)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=loop.shutdown).start())
    print(f"READY {lst.addr[1]}", flush=True)
    loop.serve(lst)


def ft_env(args):
    env = dict(os.environ, PYTHON_GIL="0", PYTHONPATH=os.path.abspath(args.ft_tree))
    return env


def calibrate_ft(args):
    out = subprocess.run([args.ft_python, os.path.abspath(__file__), "--calibrate",
                          str(args.work_us)], env=ft_env(args), check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), float(out[1])


def run_ceiling(args, rounds):
    out = subprocess.run([args.ft_python, os.path.abspath(__file__), "--ceiling",
                          "--rounds", str(rounds)], env=ft_env(args), check=True,
                         capture_output=True, text=True).stdout.split("\n")
    return [tuple(float(x) for x in line.split()[1:]) for line in out if line.strip()]


def start(args, runner, loops, rounds):
    p = subprocess.Popen([args.ft_python, os.path.abspath(__file__), "--server", runner,
                          "--loops", str(loops), "--rounds", str(rounds)],
                         env=ft_env(args), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        return [p], bp.wait_ready(p)
    except BaseException:
        bp.stop([p])
        raise


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=("inline", "pool"), help=argparse.SUPPRESS)
    ap.add_argument("--loops", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--calibrate", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--ceiling", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ft-python", default="/opt/netpoll-py313t/bin/python3.13t")
    ap.add_argument("--ft-tree", help="the tree built with --ft-python (required)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell (median shown)")
    ap.add_argument("--work-us", type=float, default=50.0, help="handler CPU per request")
    ap.add_argument("--conns", type=int, default=64)
    args = ap.parse_args()
    if args.calibrate is not None:
        bp.work = work              # calibrate the work the server does
        rounds, us = bp.calibrate(args.calibrate)
        print(rounds, us)
        return 0
    if args.ceiling:
        return ceiling(args.rounds)
    if args.server:
        return ft_server(args.server, args.loops, args.rounds)
    if not args.ft_tree:
        ap.error("--ft-tree is required")

    rounds, us = calibrate_ft(args)
    print(f"handler work: {rounds} chained SHA-256 = {us:.1f} us per request on "
          f"{args.ft_python} (GIL off); {os.cpu_count()} CPUs; load generator unpinned",
          flush=True)
    results = {c: [] for c in CELLS}
    ceilings = []
    for rep in range(args.repeat):
        ceilings.append(run_ceiling(args, rounds))
        order = CELLS if rep % 2 == 0 else CELLS[::-1]
        for runner, loops in order:
            procs, port = start(args, runner, loops, rounds)
            res = bp.run_load(procs, port, args, f"{runner} num_loops={loops}")
            results[(runner, loops)].append(res)
            bp.print_run(rep, f"{runner} num_loops={loops}", res)
    ceilings.append(run_ceiling(args, rounds))
    print()
    for i, c in enumerate(ceilings):
        print(f"ceiling {i + 1} (plain threads, no server): 1 thread {c[0][0]:.0f}/s "
              f"({c[0][1]:.1f} us CPU each), 2 threads {c[1][0]:.0f}/s ({c[1][1]:.1f} us CPU "
              f"each): {c[1][0] / c[0][0]:.2f}x")
    print()
    bp.print_table("num_loops", [(f"netpoll 3.13t {r}", [(n, (r, n)) for n in (1, 2)])
                                 for r in ("inline", "pool")], results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
