"""Instructions per request of a netpoll server, counted by callgrind.

Wall-clock figures on a shared 2-core machine move by several per cent from
run to run; instruction counts do not. This runs the bench server under
``valgrind --tool=callgrind`` twice per tree, with two load durations, drives
it with the native load generator (which runs natively, outside valgrind) and
reports the slope: extra instructions per extra request, so start-up and
shutdown cancel out. Compare a checkout with another (``--baseline``) to see
what a change to the hot path costs per request.

    python bench/bench_instructions.py --baseline ../old-tree --mode echo --size 1024 --conns 16
    python bench/bench_instructions.py --runner pool --reps 2

Both trees must be built in place (``python setup.py build_ext --inplace``).
Needs valgrind. Every process started here is ended by PID.
"""
import argparse
import glob
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def start_server(tree, mode, runner, outfile):
    script = os.path.join(tree, "netpoll", "bench", "servers", "netpoll_server.py")
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={outfile}",
           sys.executable, script, "--mode", mode, "--runner", runner, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
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
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server under valgrind did not start: {buf[-300:]!r}")


def run_load(port, mode, size, conns, duration):
    cmd = [sys.executable, "-m", "netpoll.bench", "client", f"127.0.0.1:{port}",
           "--conns", str(conns), "--size", str(size), "--mode", mode,
           "--duration", str(duration), "--warmup", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120,
                         cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-300:]}")
    res = json.loads(out.stdout)
    if res.get("errors") or res.get("verify_errors"):
        raise RuntimeError(f"load generator saw errors: {res}")
    return res["requests"]


def instructions(outfile):
    with open(outfile) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {outfile}")


def measure(tree, mode, size, conns, runner, duration, tmp):
    out = os.path.join(tmp, f"cg.{os.getpid()}.{time.monotonic_ns()}")
    proc, port = start_server(tree, mode, runner, out)
    try:
        reqs = run_load(port, mode, size, conns, duration)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    files = glob.glob(out + "*")
    total = sum(instructions(f) for f in files)
    for f in files:
        os.unlink(f)
    return reqs, total


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=ROOT, help="the checkout to measure (default: this one)")
    ap.add_argument("--baseline", default=None, help="another checkout, measured alternately")
    ap.add_argument("--mode", default="echo", choices=("echo", "framed"))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--runner", default="inline", choices=("inline", "pool"))
    ap.add_argument("--short", type=float, default=2.0, help="seconds of load, first run")
    ap.add_argument("--long", type=float, default=6.0, help="seconds of load, second run")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    trees = [("tree", os.path.abspath(args.tree))]
    if args.baseline:
        trees.append(("baseline", os.path.abspath(args.baseline)))
    results = {name: [] for name, _ in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, tree in (trees if rep % 2 == 0 else trees[::-1]):
                r1, i1 = measure(tree, args.mode, args.size, args.conns, args.runner,
                                 args.short, tmp)
                r2, i2 = measure(tree, args.mode, args.size, args.conns, args.runner,
                                 args.long, tmp)
                per = (i2 - i1) / max(1, r2 - r1)
                results[name].append(per)
                print(f"{name:9} {tree}: {r1} and {r2} requests, "
                      f"{per:,.0f} instructions per request", flush=True)
    cell = f"{args.mode}/{args.size}B/{args.conns}c/{args.runner}"
    for name, vals in results.items():
        print(f"{cell} {name}: " + " ".join(f"{v:,.0f}" for v in vals))
    if args.baseline:
        a = sum(results["tree"]) / len(results["tree"])
        b = sum(results["baseline"]) / len(results["baseline"])
        print(f"{cell}: tree / baseline = {a / b:.3f}")


if __name__ == "__main__":
    main()
