"""netpoll.serve(): N worker processes under a supervisor (issue 13, prefork).

The supervisor always runs in a subprocess (a small script written by the
fixture), never in the pytest process; every test finds the workers by their
parent PID in /proc, stops whatever is left by PID, and checks at the end that
no process it started is still running.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

import netpoll

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)"),
    pytest.mark.timeout(60),
]

APP = r'''
import logging, os, sys, time
sys.path.insert(0, sys.argv[1])
import netpoll

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(process)d %(levelname)s %(message)s")
network, address, processes = sys.argv[2], sys.argv[3], int(sys.argv[4])
shutdown_timeout = float(sys.argv[5])


def on_request(ctx, conn):
    # One command per line: "pid" answers the worker's PID; "slow" says
    # "started", works 0.5 s, then answers the PID.
    line = bytes(conn.reader.until(b"\n")).strip()
    conn.reader.release()
    if line == b"slow":
        conn.writer.write_binary(b"started\n")
        conn.writer.flush()
        time.sleep(0.5)
    conn.writer.write_binary(b"%d\n" % os.getpid())
    conn.writer.flush()


def on_ready(addr):
    print("READY", addr if isinstance(addr, str) else addr[1], flush=True)


netpoll.serve(on_request, address, processes=processes, network=network,
              on_ready=on_ready, shutdown_timeout=shutdown_timeout, runner="pool")
print("RETURNED", flush=True)
'''

DEADLINE = 15.0


def _state_of(proc_dir: str) -> Optional[str]:
    try:
        with open(f"{proc_dir}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _state(pid: int) -> Optional[str]:
    """The process state letter, or None when it no longer exists."""
    return _state_of(f"/proc/{pid}")


def _running(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _children(ppid: int) -> Set[int]:
    out = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid and fields[0] not in ("Z", "X"):
            out.add(int(name))
    return out


def _until(cond, what: str, timeout: float = DEADLINE):
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Server:
    """The supervisor script, its output, and every worker PID it was seen with."""

    def __init__(self, tmp: Path, network: str, processes: int,
                 shutdown_timeout: float = 5.0) -> None:
        script = tmp / "prefork_app.py"
        script.write_text(APP)
        if network == "unix":
            address = str(tmp / "s.sock")
        else:
            address = "127.0.0.1:0"
        self.network = network
        self.err_path = tmp / "stderr.txt"
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(ROOT), network, address, str(processes),
             str(shutdown_timeout)],
            stdout=subprocess.PIPE, stderr=self.err, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.seen: Set[int] = set()
        self.lines: List[str] = []
        line = self.readline()
        assert line.startswith("READY "), (line, self.stderr())
        where = line.split(" ", 1)[1]
        self.target = where if network == "unix" else ("127.0.0.1", int(where))
        self.workers()

    def readline(self, timeout: float = DEADLINE) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            raise AssertionError(f"no output from the supervisor; stderr: {self.stderr()}")
        line = self.proc.stdout.readline().decode().strip()
        self.lines.append(line)
        return line

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text(errors="replace")[-3000:]

    def workers(self) -> Set[int]:
        now = _children(self.pid)
        self.seen |= now
        return now

    def connect(self) -> socket.socket:
        if self.network == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        s.connect(self.target)
        return s

    def ask(self, cmd: bytes = b"pid") -> int:
        with self.connect() as s:
            s.sendall(cmd + b"\n")
            f = s.makefile("rb")
            return int(f.readline())

    def ask_past_a_kill(self) -> int:
        """ask(), but a connection reset is retried: around a SIGKILL the
        kernel may queue a connect on the dying worker's SO_REUSEPORT socket
        and reset it when that socket closes (not a supervisor failure)."""
        for _ in range(20):
            try:
                return self.ask()
            except ConnectionResetError:
                time.sleep(0.01)
        return self.ask()

    def stop(self) -> None:
        """Whatever the test did: nothing it started stays running."""
        for pid in [self.pid] + sorted(self.seen):
            if _running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.proc.wait(10)
        finally:
            self.err.close()


@pytest.fixture
def start(tmp_path):
    servers: List[Server] = []

    def _start(network: str = "tcp", processes: int = 2, shutdown_timeout: float = 5.0) -> Server:
        srv = Server(tmp_path, network, processes, shutdown_timeout)
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.stop()
    for srv in servers:
        # Orphans would be re-parented: look for them by PID, not as children.
        _until(lambda: not any(_running(p) for p in srv.seen | {srv.pid}),
               "every process to be gone")


def _spread(srv: Server, want: Set[int], limit: int = 400) -> Dict[int, int]:
    """Connect again and again until every PID in `want` has answered."""
    counts: Dict[int, int] = {}
    for _ in range(limit):
        pid = srv.ask_past_a_kill()
        counts[pid] = counts.get(pid, 0) + 1
        if want <= set(counts):
            break
    return counts


def _terminate(srv: Server, sig: int = signal.SIGTERM) -> None:
    workers = srv.workers()
    os.kill(srv.pid, sig)
    assert srv.proc.wait(DEADLINE) == 0, srv.stderr()
    assert srv.readline() == "RETURNED"
    assert not any(_running(p) for p in workers), srv.stderr()


def test_two_workers_serve_one_port(start):
    srv = start("tcp", 2)
    workers = srv.workers()
    assert len(workers) == 2
    # SO_REUSEPORT: the kernel spreads connections over both workers' sockets.
    counts = _spread(srv, workers)
    # Every answer comes from a worker, never from the supervisor, and both answer.
    assert set(counts) == workers, counts
    assert srv.pid not in counts
    _terminate(srv)


def test_two_workers_share_one_unix_listener(start):
    srv = start("unix", 2)
    workers = srv.workers()
    assert len(workers) == 2
    # One inherited socket: whichever worker wakes first accepts, so stop the
    # one that answered and the other must take the next connections.
    first = srv.ask()
    assert first in workers
    os.kill(first, signal.SIGSTOP)
    try:
        # SIGSTOP takes effect asynchronously: wait until every thread is stopped.
        _until(lambda: all(_state_of(f"/proc/{first}/task/{t}") == "T"
                           for t in os.listdir(f"/proc/{first}/task")), "SIGSTOP")
        (other,) = workers - {first}
        assert {srv.ask() for _ in range(5)} == {other}
    finally:
        os.kill(first, signal.SIGCONT)
    assert srv.ask() in workers
    _terminate(srv)
    assert not os.path.exists(srv.target)     # the supervisor removed its socket file


def test_sigkill_worker_is_replaced(start):
    srv = start("tcp", 2)
    workers = srv.workers()
    victim, survivor = sorted(workers)
    os.kill(victim, signal.SIGKILL)
    # Once it is no longer running its socket is closed: a connect made
    # before that could land in its backlog and be reset.
    _until(lambda: not _running(victim), "the victim to die")
    # The other worker keeps serving while the victim is down and replaced.
    end = time.monotonic() + DEADLINE
    while True:
        now = srv.workers()
        if victim not in now and len(now) == 2:
            break
        assert srv.ask_past_a_kill() != victim
        assert time.monotonic() < end, srv.stderr()
    (replacement,) = now - {survivor}
    assert replacement not in workers
    assert _state(victim) is None          # reaped by the supervisor
    counts = _spread(srv, {survivor, replacement})
    assert set(counts) == {survivor, replacement}, counts
    assert "restarting" in srv.stderr()     # logged through the netpoll logger
    _terminate(srv)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_requests(start, sig):
    srv = start("tcp", 2)
    workers = srv.workers()
    with srv.connect() as s:
        s.sendall(b"slow\n")
        f = s.makefile("rb")
        assert f.readline() == b"started\n"
        # The handler is now running: the shutdown must let it finish.
        t0 = time.monotonic()
        os.kill(srv.pid, sig)
        answer = f.readline()
    assert int(answer) in workers
    assert srv.proc.wait(DEADLINE) == 0, srv.stderr()
    # Well before shutdown_timeout (5 s), after which workers would be killed.
    assert time.monotonic() - t0 < 4.0
    assert srv.readline() == "RETURNED"
    _until(lambda: not any(_running(p) for p in workers), "the workers to exit")
    with pytest.raises(OSError):
        srv.connect()


def test_stuck_worker_is_killed_at_the_deadline(start):
    srv = start("tcp", 2, shutdown_timeout=0.5)
    workers = srv.workers()
    stuck = min(workers)
    os.kill(stuck, signal.SIGSTOP)         # it cannot shut down by itself
    t0 = time.monotonic()
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.proc.wait(DEADLINE) == 0, srv.stderr()
    # Killed shutdown_timeout + 3 s after the signal, not before.
    assert 3.4 <= time.monotonic() - t0 < 10
    assert srv.readline() == "RETURNED"
    assert not any(_running(p) for p in workers)
    assert "SIGKILL" in srv.stderr()


def test_supervisor_killed_workers_exit(start):
    srv = start("tcp", 2)
    workers = srv.workers()
    with srv.connect() as s:
        s.sendall(b"slow\n")
        f = s.makefile("rb")
        assert f.readline() == b"started\n"
        os.kill(srv.pid, signal.SIGKILL)
        srv.proc.wait(DEADLINE)
        # The orphaned worker still finishes what it was doing, then exits.
        assert int(f.readline()) in workers
    _until(lambda: not any(_running(p) for p in workers), "orphaned workers to exit")


def test_arguments_are_checked_before_anything_starts(monkeypatch):
    def h(ctx, conn):
        pass

    def must_not_run(self):
        raise AssertionError("serve() accepted bad arguments and was about to fork")

    # A check that let bad arguments through must fail here, not fork pytest.
    import netpoll.prefork
    monkeypatch.setattr(netpoll.prefork._Supervisor, "run", must_not_run)

    with pytest.raises(ValueError):
        netpoll.serve(h, "127.0.0.1:0", processes=0)
    with pytest.raises(TypeError):
        netpoll.serve(h, "127.0.0.1:0", processes="2")
    with pytest.raises(TypeError):
        netpoll.serve(None, "127.0.0.1:0")
    with pytest.raises(ValueError):
        netpoll.serve(h, "127.0.0.1:0", runner="nope")
    with pytest.raises(TypeError):
        netpoll.serve(h, "127.0.0.1:0", no_such_option=1)
    with pytest.raises(ValueError):
        netpoll.serve(h, "127.0.0.1:0", network="udp")
    with pytest.raises(TypeError):
        netpoll.serve(h, "127.0.0.1:0", on_ready=1)
    with pytest.raises(ValueError):
        netpoll.serve(h, "127.0.0.1:0", shutdown_timeout=-1)
    with pytest.raises(TypeError):
        netpoll.serve(h, "127.0.0.1:0", reuse_port=1)


def test_not_from_another_thread():
    # Refused before any fork: safe to try inside the pytest process.
    errors: List[BaseException] = []

    def run() -> None:
        try:
            netpoll.serve(lambda ctx, conn: None, "127.0.0.1:0", processes=1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert "main thread" in str(errors[0])


def test_refused_once_pollers_run(tmp_path):
    script = tmp_path / "late.py"
    script.write_text(
        "import sys\nsys.path.insert(0, sys.argv[1])\nimport netpoll\n"
        "netpoll.dial_connection\n"
        "from netpoll.config import runtime\nruntime().ensure_started()\n"
        "try:\n    netpoll.serve(lambda c, x: None, '127.0.0.1:0', processes=1)\n"
        "except RuntimeError as e:\n    print('REFUSED', e)\n")
    out = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True,
                         timeout=30, stdin=subprocess.DEVNULL)
    assert out.stdout.startswith(b"REFUSED"), out
    assert b"netpoll-poller" in out.stdout


@pytest.mark.parametrize("mode", [[], ["--reactor"]], ids=["eventloop", "reactor"])
def test_example(tmp_path, mode):
    err = open(tmp_path / "stderr.txt", "w+b")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "prefork_server.py"), "--port", "0", *mode],
        stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(Path(netpoll.__file__).resolve().parent.parent)))
    workers: Set[int] = set()
    try:
        assert proc.stdout is not None
        r, _, _ = select.select([proc.stdout], [], [], DEADLINE)
        line = proc.stdout.readline().decode()
        assert line.startswith("listening on 127.0.0.1:"), (line, err.seek(0), err.read())
        port = int(line.rsplit(":", 1)[1])
        workers = _children(proc.pid)
        assert len(workers) == 2
        seen = set()
        for i in range(400):
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
                s.sendall(b"hello %d" % i)
                who, _, data = s.recv(100).partition(b":")
            assert data == b"hello %d" % i
            seen.add(int(who))
            if seen == workers:
                break
        assert seen == workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    finally:
        for pid in [proc.pid, *workers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        err.close()
    _until(lambda: not any(_running(p) for p in workers), "the workers to exit")
