#!/usr/bin/env python3
"""TLS echo side by side, with the plain-TCP figures of the same session beside it.

    python bench/bench_tls.py                         # runs the matrix below, then prints the tables
    python bench/bench_tls.py --from results.json     # only the tables, from an earlier run
    python bench/bench_tls.py --profile inline        # where a TLS server's CPU goes (perf)

The run is ``python -m netpoll.bench --tls --also-plain`` (echo, 1 KiB and
16 KiB x 16 and 256 connections, pinned, 3 repeats, the five servers
alternated in each cell): every server speaks TLS 1.3 to the native load
generator, which runs one OpenSSL client session per connection and opens its
measured window once every handshake is done; then the same matrix over plain
TCP. The tables (markdown) give per cell and server: TLS req/s, the server's
CPU time per request, req/s as a multiple of uvloop's, the load generator's
CPU use, then the same ratio over plain TCP, and what TLS costs the server
(TLS CPU per request over plain CPU per request).

``--profile SERVER`` (inline, pool, uvloop, asyncio; ``--plain`` for plain
TCP) runs that echo server pinned to the first core, the load generator on
the last, and ``perf record -e cpu-clock`` on the server once the handshakes
are done; it prints where the server's CPU went by shared object (kernel,
libcrypto, libssl, the interpreter, netpoll's or uvloop's extension) and by
function. Every process started here is ended by its PID.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SERVERS = ["netpoll-inline", "netpoll-pool", "uvloop", "asyncio", "threaded"]


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def size_label(size):
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def best(c):
    """The fastest run's req/s: the least disturbed one on a shared machine."""
    rps = [r["rps"] for r in c.get("raw", []) if r.get("ok")]
    return max(rps) if rps else None


def lg_us(c):
    """The load generator's CPU time per request (median over the runs)."""
    v = sorted(r["client_cpu_s"] * 1e6 / r["requests"] for r in c.get("raw", [])
               if r.get("ok") and r.get("requests"))
    return v[len(v) // 2] if v else None


def ratio(a, b):
    return a / b if a and b else None


def tables(data):
    """Markdown: one row per (cell, server); TLS figures, then plain TCP's beside them.

    req/s and x uvloop: median of the repeats, then (in brackets) the best run's,
    which on a shared machine is the run least disturbed by other processes."""
    cells = {}
    for c in data["cells"]:
        key = (c["mode"], c["size"], c["conns"], c["pinned"])
        cells.setdefault(key, {})[(c["server"], bool(c.get("tls")))] = c
    out = ["| cell | server | TLS req/s median (best) | TLS x uvloop median (best) | "
           "TLS CPU us/req | lg CPU % (us/req) | plain req/s median (best) | plain x uvloop median (best) "
           "| plain CPU us/req | TLS CPU / plain CPU |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (mode, size, conns, pinned), rows in cells.items():
        servers = []
        for server, _ in rows:
            if server not in servers:
                servers.append(server)
        for server in servers:
            t = rows.get((server, True), {})
            p = rows.get((server, False), {})
            tb, pb = rows.get(("uvloop", True), {}), rows.get(("uvloop", False), {})
            cost = ratio(t.get("cpu_us_per_req"), p.get("cpu_us_per_req"))
            lg = t.get("client_cpu_util")
            cell = f"{mode} {size_label(size)} x {conns}" + ("" if pinned else " unpinned")
            out.append(
                f"| {cell} | {server} | {fmt(t.get('rps'), ',.0f')} ({fmt(best(t), ',.0f')}) | "
                f"{fmt(t.get('ratio_uvloop'), '.2f')} ({fmt(ratio(best(t), best(tb)), '.2f')}) | "
                f"{fmt(t.get('cpu_us_per_req'), '.1f')} | {fmt(lg and lg * 100, '.0f')}% ({fmt(lg_us(t), '.1f')}) | "
                f"{fmt(p.get('rps'), ',.0f')} ({fmt(best(p), ',.0f')}) | "
                f"{fmt(p.get('ratio_uvloop'), '.2f')} ({fmt(ratio(best(p), best(pb)), '.2f')}) | "
                f"{fmt(p.get('cpu_us_per_req'), '.1f')} | {fmt(cost, '.2f')}x |"
                + (" failed: " + t["failed"][:60] if t.get("failed") else ""))
    return "\n".join(out)


def cpu_table(data):
    """Server CPU per request as a multiple of uvloop's (lower is better), TLS and plain."""
    out = ["| cell | server | TLS CPU/req vs uvloop | plain CPU/req vs uvloop |", "|---|---|---:|---:|"]
    cells = {}
    for c in data["cells"]:
        cells.setdefault((c["mode"], c["size"], c["conns"]), {})[(c["server"], bool(c.get("tls")))] = c
    for (mode, size, conns), rows in cells.items():
        for server in [s for s, tls in rows if tls]:
            vals = []
            for tls in (True, False):
                mine = rows.get((server, tls), {}).get("cpu_us_per_req")
                base = rows.get(("uvloop", tls), {}).get("cpu_us_per_req")
                vals.append(mine / base if mine and base else None)
            out.append(f"| {mode} {size_label(size)} x {conns} | {server} | "
                       f"{fmt(vals[0], '.2f')}x | {fmt(vals[1], '.2f')}x |")
    return "\n".join(out)


# ------------------------------------------------------------------ profile

PROFILE_SERVERS = {
    "inline": ("netpoll_server.py", ["--runner", "inline"]),
    "pool": ("netpoll_server.py", ["--runner", "pool"]),
    "uvloop": ("asyncio_server.py", ["--uvloop"]),
    "asyncio": ("asyncio_server.py", []),
}


def start_server(kind, tls_files, cpu):
    script, extra = PROFILE_SERVERS[kind]
    cmd = ["taskset", "-c", str(cpu), sys.executable,
           os.path.join(ROOT, "netpoll", "bench", "servers", script),
           "--mode", "echo", "--port", "0"] + (["--tls", *tls_files] if tls_files else []) + extra
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.monotonic() + 30
    buf = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 1.0)
        if r:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            m = re.search(rb"READY (\d+)", buf)
            if m:
                return proc, int(m.group(1))
        elif proc.poll() is not None:
            break
    stop(proc)
    raise RuntimeError(f"{kind} did not start: {buf[-300:]!r}")


def stop(proc):
    if proc.poll() is None:
        os.kill(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait()
    proc.stdout.close()


def profile(kind, conns, size, duration, tls):
    """perf record (cpu-clock, the only event these guests have) of one pinned server."""
    if not shutil.which("perf"):
        raise SystemExit("perf is not installed")
    sys.path.insert(0, ROOT)
    from netpoll.bench.tlscerts import make_cert
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench-tls-prof-") as tmp:
        tls_files = make_cert(tmp) if tls else None
        data = os.path.join(tmp, "perf.data")
        proc, port = start_server(kind, tls_files, cpus[0])
        perf = None
        try:
            lg = subprocess.Popen(
                ["taskset", "-c", str(cpus[-1]), sys.executable, "-m", "netpoll.bench", "client",
                 f"127.0.0.1:{port}", "--conns", str(conns), "--size", str(size),
                 "--duration", str(duration), "--warmup", "1"] + (["--tls"] if tls else []),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=ROOT))
            time.sleep(1.5)        # handshakes done, echoes going
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999",
                                     "-p", str(proc.pid), "-o", data, "--", "sleep",
                                     str(max(duration - 1.0, 1.0))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            perf.wait(duration + 60)
            out, err = lg.communicate(timeout=duration + 60)
            res = json.loads(out)
        finally:
            if perf is not None and perf.poll() is None:
                os.kill(perf.pid, 9)
                perf.wait()
            stop(proc)
        print(f"{kind}{' TLS' if tls else ''} echo {size} B x {conns} conns: "
              f"{res['rps']:,.0f} req/s (while profiled)")
        for sort in ("dso", "dso,sym"):
            rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", sort,
                                  "--percent-limit", "1.5" if sort == "dso" else "0.7"],
                                 capture_output=True, text=True, timeout=300).stdout
            lines = [ln for ln in rep.splitlines() if ln.strip() and not ln.startswith("#")]
            print(f"  by {sort}:")
            for ln in lines[:40]:
                print("   " + ln.rstrip()[:120])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", metavar="JSON", help="print the tables of an earlier run")
    ap.add_argument("--json", default="tls-results.json", help="where the run writes its results")
    ap.add_argument("--duration", default="3")
    ap.add_argument("--repeat", default="3")
    ap.add_argument("--profile", choices=sorted(PROFILE_SERVERS), help="perf-profile one server")
    ap.add_argument("--plain", action="store_true", help="--profile: without TLS")
    ap.add_argument("--conns", type=int, default=16, help="--profile: connections")
    ap.add_argument("--size", type=int, default=1024, help="--profile: message bytes")
    args = ap.parse_args(argv)
    if args.profile:
        profile(args.profile, args.conns, args.size, float(args.duration) + 2, not args.plain)
        return 0
    src = args.src
    if src is None:
        cmd = [sys.executable, "-m", "netpoll.bench", "--tls", "--also-plain",
               "--servers", ",".join(SERVERS), "--modes", "echo", "--sizes", "1024,16384",
               "--conns", "16,256", "--repeat", args.repeat, "--duration", args.duration,
               "--json", args.json]
        print("$ " + " ".join(cmd[1:]), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc != 0:
            return rc
        src = args.json
    with open(src) as f:
        data = json.load(f)
    meta = data["meta"]
    print(f"\n{meta['date']}, {meta.get('cpu_model')}, Python {meta['python']}, "
          f"{meta.get('openssl')}, uvloop {meta.get('uvloop')}, loadavg {meta['loadavg_start']}, "
          f"busy before {fmt(meta.get('cpu_busy_before') and meta['cpu_busy_before'] * 100, '.0f')}%\n")
    print(tables(data))
    print()
    print(cpu_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
