#!/usr/bin/env python3
"""Side-by-side benchmark: netpoll (inline and pool runners) vs asyncio, uvloop, a
thread per connection and a plain C epoll server, driven by the native load
generator.

    python -m netpoll.bench                                   # about a minute
    python -m netpoll.bench --full                            # the whole matrix, 3 runs per cell
    python -m netpoll.bench --modes framed --sizes 1024 --conns 100 --duration 5
    python -m netpoll.bench --json results.json --plot results.png
    python -m netpoll.bench --idle-rss 10000                  # memory per idle connection
    python -m netpoll.bench --tls --also-plain --modes echo   # TLS echo, then the same matrix in plain TCP
    python -m netpoll.bench client 127.0.0.1:9000 --conns 16  # the load generator alone

Every measurement starts a fresh server process (``taskset -c SERVER_CPU`` when
pinned, the default on machines with two cores or more), waits for its
``READY`` line, runs the load generator (``taskset -c LG_CPU``) and samples the
server's utime+stime from /proc/PID/stat exactly at the start and the end of
the generator's measured window (it writes a byte to a pipe at both moments).
Servers are alternated within each cell, repeated ``--repeat`` times, and the
median is reported. Every process started here is ended by PID (SIGTERM, then
SIGKILL) whatever happens. Linux only (/proc).

``--tls``: every server serves TLS (a certificate for 127.0.0.1 made at run
time into a temporary directory, see tlscerts.py) and the load generator runs
an OpenSSL client session per connection; its measured window opens once every
handshake is done, so the figures are the record layer's alone. The C
reference server has no TLS and is left out.

Columns: req/s; p50 and p99 latency; the server's CPU time per request (the
fairest figure on a shared machine); the server's and the load generator's
CPU use (a generator near 100% with a server below 90% means the generator
was the limit); and req/s as a multiple of uvloop's in the same cell.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS_DIR = os.path.join(HERE, "servers")
LOADGEN_CLI = os.path.join(HERE, "client.py")

SERVERS = {
    "netpoll-inline": ("netpoll_server.py", ["--runner", "inline"]),
    "netpoll-pool": ("netpoll_server.py", ["--runner", "pool"]),
    "netpoll-auto": ("netpoll_server.py", ["--runner", "auto"]),
    "asyncio": ("asyncio_server.py", []),
    "uvloop": ("asyncio_server.py", ["--uvloop"]),
    "threaded": ("threaded_server.py", []),
    "c-epoll": ("c_epoll_server.py", []),   # reference ceiling: no Python at all
}
BASELINE = "uvloop"
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 20.0

_live = {}   # pid -> Popen: everything started here and not yet reaped


class ServerFailed(Exception):
    pass


# ------------------------------------------------------------------ processes

def terminate(proc, timeout=3.0):
    """SIGTERM, then SIGKILL after timeout; always by PID; reaps the process."""
    if proc is None:
        return
    try:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5.0)
    finally:
        _live.pop(proc.pid, None)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def terminate_all():
    for proc in list(_live.values()):
        try:
            terminate(proc, timeout=2.0)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def pin_prefix(cpu):
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def raise_nofile(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))   # root only
            return needed
        except (ValueError, OSError):
            pass
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Server:
    """One server process: started, READY read, CPU and RSS sampled, terminated."""

    def __init__(self, name, mode, cpu, tls_files=None):
        script, extra = SERVERS[name][:2]
        tree = SERVERS[name][2] if len(SERVERS[name]) > 2 else None
        self.name = name
        self.env = None
        sdir = SERVERS_DIR
        if tree is not None:
            # --baseline: the same server script from another checkout, built
            # in place, imported from there.
            sdir = os.path.join(tree, "netpoll", "bench", "servers")
            self.env = dict(os.environ, PYTHONPATH=tree)
        self.cmd = pin_prefix(cpu) + [sys.executable, os.path.join(sdir, script),
                                      "--mode", mode, "--port", "0"] + extra
        if tls_files is not None:
            self.cmd += ["--tls", tls_files[0], tls_files[1]]
        self.proc = None
        self.port = None
        self.stderr = tempfile.TemporaryFile()

    def start(self):
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=self.env)
        _live[self.proc.pid] = self.proc
        deadline = time.monotonic() + READY_TIMEOUT
        buf = b""
        fd = self.proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerFailed(f"no READY within {READY_TIMEOUT:.0f}s" + self.tail())
            r, _, _ = select.select([fd], [], [], min(left, 0.5))
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(2.0)
                    raise ServerFailed(f"exited with {self.proc.returncode} before READY" + self.tail())
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    words = line.decode(errors="replace").split()
                    if words and words[0] == "READY" and len(words) > 1:
                        self.port = int(words[1])
                        return self
                    if words and words[0] == "FAILED":
                        raise ServerFailed(" ".join(words[1:]))
            elif self.proc.poll() is not None:
                raise ServerFailed(f"exited with {self.proc.returncode} before READY" + self.tail())

    def tail(self, n=300):
        try:
            self.stderr.seek(0)
            text = self.stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return (": " + " ".join(text[-n:].split())) if text else ""

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self):
        """utime + stime of the whole process (all threads, live and exited)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_bytes(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def num_fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self):
        try:
            terminate(self.proc)
        finally:
            self.stderr.close()


# ------------------------------------------------------------------ one measurement

def wait_byte(fd, timeout):
    r, _, _ = select.select([fd], [], [], max(timeout, 0.0))
    if not r:
        return None
    return os.read(fd, 1)


def measure(name, mode, size, conns, args, pinned, tls=False):
    """Run one server against the load generator once. Returns a dict (``ok`` False on failure)."""
    server_cpu = args.server_cpu if pinned else None
    lg_cpu = args.lg_cpu if pinned else None
    srv = Server(name, mode, server_cpu, args.tls_files if tls else None)
    lg = None
    rfd = wfd = -1
    idle = []
    try:
        try:
            srv.start()
        except ServerFailed as exc:
            return {"ok": False, "start_failed": True, "reason": f"failed to start: {exc}"}
        if args.idle_conns:
            # Netpoll's scenario of mostly idle connections: held open (connected,
            # silent) by this process for the whole run, beside the busy ones.
            idle = open_idle(srv, args.idle_conns)
        rfd, wfd = os.pipe()
        cmd = pin_prefix(lg_cpu) + [
            sys.executable, LOADGEN_CLI, f"127.0.0.1:{srv.port}", "--conns", str(conns),
            "--size", str(size), "--duration", str(args.duration), "--warmup", str(args.warmup),
            "--mode", mode, "--pipeline", str(args.pipeline), "--threads", str(args.lg_threads),
            "--notify-fd", str(wfd)] + (["--spin"] if args.lg_spin else []) + (["--tls"] if tls else [])
        lg = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, pass_fds=(wfd,))
        _live[lg.pid] = lg
        os.close(wfd)
        wfd = -1
        budget = args.warmup + args.duration + 30.0
        t_start = time.monotonic()
        # (TLS: the generator opens its window up to 10 s late, once every handshake is done)
        mark = wait_byte(rfd, args.warmup + 30.0)
        if mark != b"S":
            raise ServerFailed("load generator did not start its window" + lg_tail(lg))
        cpu0 = srv.cpu_seconds() if srv.alive() else None
        mark = wait_byte(rfd, budget - (time.monotonic() - t_start))
        server_alive = srv.alive()
        cpu1 = srv.cpu_seconds() if server_alive and cpu0 is not None else None
        if mark != b"E":
            raise ServerFailed("load generator did not finish its window" + lg_tail(lg))
        out, err = lg.communicate(timeout=30.0)
        _live.pop(lg.pid, None)
        if lg.returncode != 0:
            raise ServerFailed(f"load generator exited {lg.returncode}: "
                               + " ".join(err.decode(errors="replace").split())[-300:])
        res = json.loads(out)
        res["ok"] = True
        res["server_cpu_s"] = (cpu1 - cpu0) if cpu1 is not None else None
        res["cpu_us_per_req"] = (res["server_cpu_s"] * 1e6 / res["requests"]
                                 if res["server_cpu_s"] is not None and res["requests"] else None)
        res["server_cpu_util"] = (res["server_cpu_s"] / res["seconds"]
                                  if res["server_cpu_s"] is not None and res["seconds"] else None)
        busy = res.get("client_busy_s", res["client_cpu_s"])   # spin mode: empty polls excluded
        res["client_cpu_util"] = busy / res["seconds"] if res["seconds"] else None
        if not server_alive:
            res["ok"] = False
            res["reason"] = "server died during the run" + srv.tail()
        elif res["requests"] == 0:
            res["ok"] = False
            res["reason"] = f"no request completed (errors={res['errors']})" + srv.tail()
        return res
    except ServerFailed as exc:
        return {"ok": False, "reason": str(exc)}
    except (subprocess.TimeoutExpired, ValueError, OSError) as exc:
        return {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        if wfd >= 0:
            os.close(wfd)
        if rfd >= 0:
            os.close(rfd)
        if lg is not None:
            terminate(lg)
        for sock in idle:
            sock.close()
        srv.stop()


def open_idle(srv, n):
    """n connected, silent sockets to srv; waits until the server holds them."""
    fds0 = srv.num_fds()
    socks = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10.0)
            socks.append(sock)
        deadline = time.monotonic() + 10.0
        while srv.num_fds() < fds0 + n and time.monotonic() < deadline:
            time.sleep(0.01)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def lg_tail(lg):
    try:
        lg.wait(2.0)            # it may have closed the pipe while exiting: let it finish
    except subprocess.TimeoutExpired:
        return ""
    try:
        err = lg.stderr.read().decode(errors="replace")
    except (OSError, ValueError):
        return ""
    return (": " + " ".join(err.split())[-300:]) if err.strip() else ""


# ------------------------------------------------------------------ matrix

def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs):
    ok = [r for r in runs if r.get("ok")]
    summary = {
        "ok_runs": len(ok),
        "runs": len(runs),
        "rps": median_or_none([r["rps"] for r in ok]),
        "p50_us": median_or_none([r["p50_us"] for r in ok]),
        "p99_us": median_or_none([r["p99_us"] for r in ok]),
        "cpu_us_per_req": median_or_none([r.get("cpu_us_per_req") for r in ok]),
        "server_cpu_util": median_or_none([r.get("server_cpu_util") for r in ok]),
        "client_cpu_util": median_or_none([r.get("client_cpu_util") for r in ok]),
        "errors": sum(r.get("errors", 0) for r in runs),
        "starved_connections": max((r.get("starved_connections", 0) for r in ok), default=0),
    }
    if not ok:
        reasons = [r.get("reason", "?") for r in runs]
        summary["failed"] = reasons[-1] if reasons else "not run"
    return summary


class Progress:
    """One self-rewriting status line on stderr while runs go (only on a terminal)."""

    def __init__(self, total):
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()

    def show(self, text):
        if self.tty:
            sys.stderr.write(f"\r\033[K[{self.done + 1:3d}/{self.total}] {text}")
            sys.stderr.flush()

    def step(self):
        self.done += 1

    def clear(self):
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def run_matrix(args, pinned, results, out_rows, progress, tls=False):
    servers = args.servers
    start_failures = {}      # (server, mode) -> consecutive start failures
    for mode in args.modes:
        for size in args.sizes:
            for conns in args.conns:
                cell = {"pinned": pinned, "mode": mode, "size": size, "conns": conns,
                        "idle": args.idle_conns, "tls": tls}
                runs = {name: [] for name in servers}
                for rep in range(args.repeat):
                    k = rep % len(servers)
                    order = servers[k:] + servers[:k]
                    if rep % 2:
                        order = order[::-1]
                    for name in order:
                        key = (name, mode)
                        if start_failures.get(key, 0) >= 2:
                            runs[name].append({"ok": False, "reason": "skipped: failed to start twice"
                                               + (f" ({results['start_errors'][key]})"
                                                  if key in results["start_errors"] else "")})
                            continue
                        progress.show(f"{label(cell)} {name} (run {rep + 1} of {args.repeat})")
                        res = measure(name, mode, size, conns, args, pinned, tls)
                        progress.step()
                        reason = res.get("reason", "")
                        if res.get("start_failed"):
                            start_failures[key] = start_failures.get(key, 0) + 1
                            results["start_errors"][key] = reason
                        elif res.get("ok"):
                            start_failures[key] = 0
                        runs[name].append(res)
                        if args.verbose:
                            progress.clear()
                            print(f"  {label(cell)} {name:15s} rep {rep}: " + (
                                f"{res['rps']:.0f} req/s p99 {res['p99_us']:.0f} us"
                                if res.get("ok") else "failed: " + reason[:120]), flush=True)
                summaries = {name: summarize(runs[name]) for name in servers}
                base = summaries.get(BASELINE, {}).get("rps")
                for name in servers:
                    s = summaries[name]
                    s["ratio_uvloop"] = (s["rps"] / base) if (s["rps"] and base) else None
                    s["lg_bound"] = lg_bound(s)
                    row = dict(cell, server=name, **s)
                    out_rows.append(row)
                    results["cells"].append(dict(row, raw=runs[name]))
                progress.clear()
                print_cell(cell, [dict(cell, server=n, **summaries[n]) for n in servers])


def label(cell):
    size = cell["size"]
    size_s = f"{size // 1024}KiB" if size >= 1024 and size % 1024 == 0 else f"{size}B"
    pin = "pinned" if cell["pinned"] else "unpinned"
    idle = f"+{cell['idle']}idle" if cell.get("idle") else ""
    tls = "tls-" if cell.get("tls") else ""
    return f"{tls}{cell['mode']}/{size_s}/{cell['conns']}c{idle}/{pin}"


def fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


HEADER = (f"{'cell':28s} {'server':15s} {'req/s':>10s} {'p50 us':>8s} {'p99 us':>9s} {'CPU us/req':>10s} "
          f"{'srv CPU':>7s} {'lg CPU':>6s} {'x uvloop':>8s} {'errors':>6s}")


def lg_bound(row):
    """The load generator, not the server, limited this cell."""
    lg, srv = row.get("client_cpu_util"), row.get("server_cpu_util")
    return lg is not None and srv is not None and lg > 0.95 and srv < 0.90


def print_cell(cell, rows):
    for row in rows:
        if row.get("failed"):
            print(f"{label(cell):28s} {row['server']:15s} failed: {row['failed'][:100]}", flush=True)
            continue
        print(f"{label(cell):28s} {row['server']:15s} {fmt(row['rps'], '10.0f')} "
              f"{fmt(row['p50_us'], '8.0f')} {fmt(row['p99_us'], '9.0f')} {fmt(row['cpu_us_per_req'], '10.1f')} "
              f"{fmt(row['server_cpu_util'] and row['server_cpu_util'] * 100, '6.0f')}% "
              f"{fmt(row['client_cpu_util'] and row['client_cpu_util'] * 100, '5.0f')}% "
              f"{fmt(row['ratio_uvloop'], '8.2f')} {row['errors']:6d}"
              + (f"  ({row['ok_runs']}/{row['runs']} runs ok)" if row['ok_runs'] < row['runs'] else "")
              + (f"  ({row['starved_connections']} conns starved)" if row['starved_connections'] else "")
              + ("  (load generator bound)" if lg_bound(row) else ""),
              flush=True)


# ------------------------------------------------------------------ idle RSS

def idle_rss(args, results):
    n = args.idle_rss
    raise_nofile(n + 256)
    rows = []
    print(f"\nRSS per idle connection at {n} connections"
          + (" (after one 64 B echo each)" if args.idle_touch else ""))
    print(f"{'server':15s} {'RSS before':>12s} {'RSS after':>12s} {'bytes/conn':>11s} {'x uvloop':>8s}")
    for name in args.servers:
        srv = Server(name, "echo", args.server_cpu if args.pin else None)
        socks = []
        row = {"server": name, "connections": n}
        try:
            srv.start()
            time.sleep(0.3)
            fds0 = srv.num_fds()
            before = srv.rss_bytes()
            deadline = time.monotonic() + max(60.0, n / 100.0)
            for i in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(10.0)
                s.connect(("127.0.0.1", srv.port))
                socks.append(s)
                if i % 1000 == 999:      # let the server's accept catch up
                    while srv.num_fds() < fds0 + len(socks) - 2000 and time.monotonic() < deadline:
                        time.sleep(0.01)
            if args.idle_touch:
                payload = b"x" * 64
                for s in socks:
                    s.sendall(payload)
                    got = 0
                    while got < len(payload):
                        chunk = s.recv(64 - got)
                        if not chunk:
                            raise ConnectionError("server closed an idle connection")
                        got += len(chunk)
            while srv.num_fds() < fds0 + n and time.monotonic() < deadline:
                if not srv.alive():
                    raise ServerFailed("server died" + srv.tail())
                time.sleep(0.02)
            accepted = srv.num_fds() - fds0
            time.sleep(1.0)
            after = srv.rss_bytes()
            row.update(ok=True, rss_before=before, rss_after=after, accepted=accepted,
                       bytes_per_conn=(after - before) / n)
        except (ServerFailed, OSError) as exc:
            row.update(ok=False, reason=f"{type(exc).__name__}: {exc}")
        finally:
            for s in socks:
                s.close()
            srv.stop()
        rows.append(row)
    base = next((r["bytes_per_conn"] for r in rows if r["server"] == BASELINE and r.get("ok")), None)
    for r in rows:
        r["ratio_uvloop"] = (r["bytes_per_conn"] / base) if (r.get("ok") and base) else None
        if not r.get("ok"):
            print(f"{r['server']:15s} failed: {r['reason'][:100]}")
            continue
        note = "" if r["accepted"] >= n else f"  (only {r['accepted']} accepted)"
        print(f"{r['server']:15s} {r['rss_before'] / 2**20:10.1f}Mi {r['rss_after'] / 2**20:10.1f}Mi "
              f"{r['bytes_per_conn']:11.0f} {fmt(r['ratio_uvloop'], '8.2f')}{note}", flush=True)
    results["idle_rss"] = rows


# ------------------------------------------------------------------ main

def int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def available_servers():
    """The default server set: those whose dependencies are present here."""
    names = []
    for name in SERVERS:
        if name == "uvloop" and module_version("uvloop") is None:
            print("uvloop is not installed (pip install uvloop, or the [bench] extra): "
                  "left out, so the 'x uvloop' column stays empty", file=sys.stderr)
            continue
        if name == "c-epoll" and not (shutil.which("cc") or shutil.which("gcc")):
            print("no C compiler: the c-epoll reference server is left out", file=sys.stderr)
            continue
        names.append(name)
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m netpoll.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", type=str_list, default=None,
                    help=f"comma-separated, from {','.join(SERVERS)} (default: all that can run here)")
    ap.add_argument("--baseline", metavar="TREE", default=None,
                    help="also run servers base-inline and base-pool from another netpoll checkout "
                         "built in place (before/after comparisons in one run)")
    ap.add_argument("--modes", type=str_list, default=["echo", "framed"], help="echo,framed (default both)")
    ap.add_argument("--sizes", type=int_list, default=None,
                    help="message bytes (default 1024; --full: 64,1024,16384)")
    ap.add_argument("--conns", type=int_list, default=None,
                    help="connections (default 16,256; --full: 1,16,256)")
    ap.add_argument("--duration", type=float, default=None,
                    help="measured seconds per run (default 2; --full: 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each run (default 0.5)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per server and cell; the median is shown (default 1; --full: 3)")
    ap.add_argument("--full", action="store_true",
                    help="the whole matrix: 64 B/1 KiB/16 KiB x 1/16/256 connections, 3 s x 3 runs")
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)   # the default; kept for old scripts
    ap.add_argument("--pipeline", type=int, default=1, help="requests in flight per connection (default 1)")
    ap.add_argument("--idle-conns", type=int, default=0, metavar="N",
                    help="also hold N idle connections open during every run (Netpoll's scenario: "
                         "--conns 200 --idle-conns 800 is 80%% of 1,000 connections idle)")
    ap.add_argument("--lg-threads", type=int, default=1, help="load generator threads (default 1)")
    ap.add_argument("--lg-spin", action="store_true",
                    help="the load generator busy-polls instead of sleeping: its own wake-ups leave the "
                         "latency (pinned 1-connection cells); its CPU column then excludes empty polls")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                    help="pin the server and the load generator to one core each with taskset "
                         "(default when two cores or more are allowed)")
    ap.add_argument("--also-unpinned", action="store_true", help="then run the same matrix unpinned")
    ap.add_argument("--tls", action="store_true",
                    help="TLS echo/framed: every server with ssl=, the load generator with OpenSSL "
                         "(certificate made at run time); the C reference server is left out")
    ap.add_argument("--also-plain", action="store_true",
                    help="with --tls: then run the same matrix over plain TCP (the TLS/plain ratios "
                         "from one session)")
    ap.add_argument("--server-cpu", type=int, default=None, help="core for the server (default: first allowed)")
    ap.add_argument("--lg-cpu", type=int, default=None, help="core for the load generator (default: second allowed)")
    ap.add_argument("--idle-rss", type=int, default=0, metavar="N",
                    help="instead of the matrix: RSS per idle connection at N connections")
    ap.add_argument("--idle-touch", action="store_true", help="with --idle-rss: one 64 B echo per connection first")
    ap.add_argument("--json", metavar="FILE", help="write every run and the medians to FILE")
    ap.add_argument("--plot", metavar="FILE.png",
                    help="bar chart of req/s per cell (needs matplotlib: the [plot] extra)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every run")
    args = ap.parse_args(argv)
    full = args.full
    if args.sizes is None:
        args.sizes = [64, 1024, 16384] if full else [1024]
    if args.conns is None:
        args.conns = [1, 16, 256] if full else [16, 256]
    if args.duration is None:
        args.duration = 3.0 if full else 2.0
    if args.repeat is None:
        args.repeat = 3 if full else 1
    if args.baseline:
        tree = os.path.abspath(args.baseline)
        if not os.path.isfile(os.path.join(tree, "netpoll", "bench", "servers", "netpoll_server.py")):
            ap.error(f"--baseline {tree}: not a netpoll checkout with bench servers")
        SERVERS["base-inline"] = ("netpoll_server.py", ["--runner", "inline"], tree)
        SERVERS["base-pool"] = ("netpoll_server.py", ["--runner", "pool"], tree)
    if args.also_plain and not args.tls:
        ap.error("--also-plain goes with --tls")
    if args.tls and args.idle_rss:
        ap.error("--idle-rss measures plain connections: drop --tls")
    if args.servers is None:
        args.servers = [s for s in available_servers() if not (args.tls and s == "c-epoll")]
        if args.baseline:
            args.servers += ["base-inline", "base-pool"]

    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown:
        ap.error(f"unknown server(s) {unknown}; choose from {list(SERVERS)}")
    bad_modes = [m for m in args.modes if m not in ("echo", "framed")]
    if bad_modes:
        ap.error(f"unknown mode(s) {bad_modes}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.duration <= 0 or args.warmup < 0:
        ap.error("--duration must be > 0 and --warmup >= 0")
    if any(n < 1 for n in args.conns) or any(n < 1 for n in args.sizes):
        ap.error("--conns and --sizes must be >= 1")
    if args.idle_conns < 0:
        ap.error("--idle-conns must be >= 0")
    if not sys.platform.startswith("linux"):
        ap.error("the driver reads /proc: Linux only (the client subcommand runs anywhere)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib: pip install matplotlib (or the [plot] extra)")
    cpus = sorted(os.sched_getaffinity(0))
    if args.server_cpu is None:
        args.server_cpu = cpus[0]
    if args.lg_cpu is None:
        args.lg_cpu = cpus[1] if len(cpus) > 1 else cpus[0]
    if args.pin is None:
        args.pin = len(cpus) > 1
    if args.pin and not shutil.which("taskset"):
        print("taskset not found: running unpinned", file=sys.stderr)
        args.pin = False
    if args.pin and args.server_cpu == args.lg_cpu:
        print("warning: server and load generator pinned to the same core", file=sys.stderr)
    raise_nofile(max(args.conns or [0]) + args.idle_conns + 256)
    if not args.idle_rss:
        check = subprocess.run([sys.executable, LOADGEN_CLI, "--check"], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            print("the load generator cannot be loaded: " + (check.stderr or check.stdout).strip()[-500:],
                  file=sys.stderr)
            return 2

    results = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": cpu_model(), "loadavg_start": os.getloadavg(),
            "uvloop": module_version("uvloop"), "argv": sys.argv[1:],
            "duration": args.duration, "warmup": args.warmup, "repeat": args.repeat,
            "pipeline": args.pipeline, "idle_conns": args.idle_conns, "lg_threads": args.lg_threads, "lg_spin": args.lg_spin,
            "server_cpu": args.server_cpu, "lg_cpu": args.lg_cpu,
            "tls": args.tls, "also_plain": args.also_plain, "openssl": openssl_version(),
        },
        "cells": [],
        "start_errors": {},
    }
    def _interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every server and load generator is ended by PID
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGHUP, _interrupted)
    busy = machine_busy()
    results["meta"]["cpu_busy_before"] = busy
    if busy is not None and busy > 0.10:
        print(f"warning: the machine is {busy:.0%} busy before the benchmark starts: "
              "other processes will share the cores and the figures will be noisy", file=sys.stderr)
    rows = []
    certdir = None
    args.tls_files = None
    try:
        if args.tls:
            certdir = tempfile.mkdtemp(prefix="netpoll-bench-tls-")
            from netpoll.bench.tlscerts import make_cert
            args.tls_files = make_cert(certdir)
        if args.idle_rss:
            idle_rss(args, results)
        else:
            # (tls, pinned) of each pass over the matrix
            passes = [(args.tls, args.pin)]
            if args.also_unpinned and args.pin:
                passes.append((args.tls, False))
            if args.also_plain:
                passes += [(False, pin) for _, pin in passes]
            progress = Progress(len(passes) * len(args.modes) * len(args.sizes) * len(args.conns)
                                * args.repeat * len(args.servers))
            print(HEADER, flush=True)
            for tls, pinned in passes:
                run_matrix(args, pinned, results, rows, progress, tls)
    except KeyboardInterrupt:
        print("\ninterrupted: partial results", file=sys.stderr)
    finally:
        terminate_all()
        if certdir is not None:
            shutil.rmtree(certdir, ignore_errors=True)
        results["meta"]["loadavg_end"] = os.getloadavg()
        results["start_errors"] = {f"{k[0]}/{k[1]}": v for k, v in results["start_errors"].items()}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
            print(f"wrote {args.json}", file=sys.stderr)
        if args.plot and rows:
            plot(rows, args.servers, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def plot(rows, servers, path):
    """Grouped bars: req/s of each server in each cell (failed runs left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = []
    for r in rows:
        if label(r) not in cells:
            cells.append(label(r))
    width = 0.8 / max(len(servers), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cells)), 4.5))
    for k, name in enumerate(servers):
        xs, ys = [], []
        for i, cell in enumerate(cells):
            for r in rows:
                if label(r) == cell and r["server"] == name and r.get("rps"):
                    xs.append(i + (k - (len(servers) - 1) / 2) * width)
                    ys.append(r["rps"])
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(cells, rotation=20, ha="right")
    ax.set_ylabel("requests per second (median)")
    ax.set_title("netpoll side by side (python -m netpoll.bench)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_busy(seconds=1.0):
    """Fraction of all CPU time that was busy over a short sample (before we start anything)."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def openssl_version():
    try:
        import ssl
        return ssl.OPENSSL_VERSION
    except ImportError:
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def module_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
