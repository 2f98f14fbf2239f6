"""Native load generator for netpoll's side-by-side benchmarks (see bench/README.md)."""

from typing import Literal, Optional, TypedDict, Union
import os

class LoadgenResult(TypedDict):
    requests: int            # verified replies completed in the measured window
    seconds: float           # length of the measured window
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    mean_us: float
    errors: int              # verify_errors + io_errors + connect_errors, whole run
    verify_errors: int       # replies whose bytes differ from the request, or excess bytes
    io_errors: int           # resets, EOFs and send/recv failures
    connect_errors: int      # failed connects (refused, backlog full, ...)
    bytes: int               # request bytes echoed back in the window (frame headers included)
    client_cpu_s: float      # the generator's own CPU time in the window, all threads
    client_busy_s: float     # client_cpu_s less the time spent in empty polls (spin=True)
    connects: int            # successful connects, re-dials included
    starved_connections: int # connections that completed no request in the window
    connections: int
    threads: int
    size: int
    mode: str
    pipeline: int
    tls: bool
    tls_handshakes: int            # TLS handshakes completed, re-dials included
    tls_handshakes_in_window: int  # of those, completed inside the measured window
    tls_errors: int                # failed TLS handshakes

def run(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    unix_path: Optional[Union[str, bytes, os.PathLike[str]]] = None,
    connections: int = 1,
    size: int = 64,
    duration: float = 1.0,
    mode: Literal["echo", "framed"] = "echo",
    pipeline: int = 1,
    threads: int = 1,
    warmup: float = 0.5,
    notify_fd: int = -1,
    spin: bool = False,
    seed: int = ...,
    tls: bool = False,
) -> LoadgenResult: ...
