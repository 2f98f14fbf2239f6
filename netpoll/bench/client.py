#!/usr/bin/env python3
"""The native load generator against any echo (or length-prefixed echo) server.

    python -m netpoll.bench client 127.0.0.1:9000 --conns 16 --size 1024 --duration 5 --mode framed
    python -m netpoll.bench client unix:/tmp/echo.sock --conns 1 --size 64 --duration 2 --pipeline 8
    python -m netpoll.bench client 127.0.0.1:9443 --tls --conns 16 --size 1024

Every connection does ping-pong (or keeps ``--pipeline`` requests in flight),
every echoed byte is verified, latencies go into a histogram. Prints the result
as one JSON object on stdout (``--pretty`` to indent it). The measurement runs
in C with the GIL released (netpoll/bench/_loadgen.pyx); the driver
(``python -m netpoll.bench``) runs this file as a script.
"""
import argparse
import importlib.machinery
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))   # netpoll/bench/


def _built_with_asan(path):
    try:
        with open(path, "rb") as f:
            return b"libasan.so" in f.read()
    except OSError:
        return False


BUILD_HINT = ("`python setup.py build_ext --inplace` (or `cythonize -i -3 "
              "netpoll/bench/_loadgen.pyx`) in the repository root, or pip install the project")


def load_loadgen():
    """Load netpoll.bench._loadgen from the package this file belongs to.

    The extension file is loaded directly, without importing the ``netpoll``
    package: its ``__init__`` imports the whole core, which may be mid-edit or
    built with a sanitizer, and the load generator needs none of it. Falls
    back to a normal import.
    """
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(HERE, "_loadgen" + suffix)
        if not os.path.exists(path):
            continue
        if _built_with_asan(path) and "asan" not in os.environ.get("LD_PRELOAD", ""):
            raise SystemExit(
                f"{path} was built with AddressSanitizer (NETPOLL_SANITIZE): preload the ASan "
                "runtime (LD_PRELOAD, as .ci/asan does) or rebuild it without: " + BUILD_HINT)
        loader = importlib.machinery.ExtensionFileLoader("netpoll.bench._loadgen", path)
        spec = importlib.util.spec_from_file_location("netpoll.bench._loadgen", path,
                                                      loader=loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        return mod
    try:
        from netpoll.bench import _loadgen  # type: ignore
        return _loadgen
    except ImportError:
        pass
    raise SystemExit("netpoll.bench._loadgen is not built: run " + BUILD_HINT)


def parse_target(target):
    if target.startswith("unix:"):
        return None, 0, target[len("unix:"):]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"target must be HOST:PORT or unix:PATH, got {target!r}")
    return host.strip("[]") or "127.0.0.1", int(port), None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m netpoll.bench client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", default="127.0.0.1:0", help="HOST:PORT or unix:PATH")
    ap.add_argument("--conns", type=int, default=1, help="connections (default 1)")
    ap.add_argument("--size", type=int, default=64, help="payload bytes per request (default 64)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds (default 5)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first (default 0.5)")
    ap.add_argument("--mode", choices=("echo", "framed"), default="echo")
    ap.add_argument("--pipeline", type=int, default=1, help="requests in flight per connection (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="load generator threads (default 1)")
    ap.add_argument("--notify-fd", type=int, default=-1,
                    help="write b'S' at the start and b'E' at the end of the measured window to this fd")
    ap.add_argument("--spin", action="store_true",
                    help="busy-poll instead of sleeping in epoll_wait (takes the generator's wake-ups out of the latency)")
    ap.add_argument("--tls", action="store_true",
                    help="TLS on every connection (OpenSSL, no certificate verification); the window "
                         "starts once every handshake is done")
    ap.add_argument("--pretty", action="store_true", help="indent the JSON")
    ap.add_argument("--check", action="store_true", help="only load the generator and print where it is")
    args = ap.parse_args(argv)
    if args.check:
        print(load_loadgen().__file__)
        return 0

    host, port, unix_path = parse_target(args.target)
    loadgen = load_loadgen()
    result = loadgen.run(
        host or "127.0.0.1", port, unix_path=unix_path, connections=args.conns, size=args.size,
        duration=args.duration, mode=args.mode, pipeline=args.pipeline, threads=args.threads,
        warmup=args.warmup, notify_fd=args.notify_fd, spin=args.spin, tls=args.tls,
    )
    json.dump(result, sys.stdout, indent=2 if args.pretty else None)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
