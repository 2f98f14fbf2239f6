#!/usr/bin/env python3
"""The plain C epoll server (c_epoll_server.c), compiled on first use with the
system C compiler, then exec'd with the same options as the other servers:

    python netpoll/bench/servers/c_epoll_server.py --mode echo --port 0

It is the reference ceiling of the comparison: one core answering with no
Python at all. Prints ``FAILED <reason>`` if it cannot be built.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from common import base_parser

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "c_epoll_server.c")


def build():
    """Path of the compiled server, built once per source version."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    out_dir = os.path.join(tempfile.gettempdir(), f"netpoll-bench-{os.getuid()}")
    os.makedirs(out_dir, exist_ok=True)
    binary = os.path.join(out_dir, f"c_epoll_server-{digest}")
    if not os.path.exists(binary):
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler (cc/gcc) found")
        tmp = binary + f".{os.getpid()}"
        subprocess.run([cc, "-O2", "-o", tmp, SOURCE], check=True, capture_output=True)
        os.replace(tmp, binary)      # atomic: concurrent builds cannot half-write it
    return binary


def main(argv=None):
    ap = base_parser(__doc__)
    args = ap.parse_args(argv)
    if args.unix:
        print("FAILED the C reference server listens on TCP only", flush=True)
        return 1
    if args.tls:
        print("FAILED the C reference server has no TLS", flush=True)
        return 1
    try:
        binary = build()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        print(f"FAILED cannot build {SOURCE}: {exc} {err.decode(errors='replace')[:200]}",
              flush=True)
        return 1
    os.execv(binary, [binary, "--mode", args.mode, "--port", str(args.port),
                      "--host", args.host])


if __name__ == "__main__":
    sys.exit(main())
