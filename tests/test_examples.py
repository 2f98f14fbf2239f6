"""The runnable examples in examples/: each server is started as a subprocess
(``--port 0``; its first stdout line says where it listens) and driven by a
real client: the matching example client, http.client, a raw socket, the
redis package, and, when installed, wrk and redis-benchmark. Every server
must exit with status 0 on SIGTERM (graceful shutdown)."""
from __future__ import annotations

import hashlib
import http.client
import importlib.util
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

import netpoll
from netutil import read_frame, recv_exact, sees_eof, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# The examples import the same netpoll as these tests, wherever it lives.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (str(Path(netpoll.__file__).resolve().parent.parent),
                os.environ.get("PYTHONPATH")) if p))
LISTENING = re.compile(r"listening on (?:unix:(?P<path>.+)|(?P<host>.+):(?P<port>\d+))")


def needs(module: str) -> None:
    pytest.importorskip(module, reason=f"{module} is missing: pip install -e '.[test]'")


class Example:
    """An example server running as a subprocess."""

    def __init__(self, name: str, args: List[str], logdir: Path, timeout: float = 30.0) -> None:
        self.name = name
        self.stderr = open(logdir / f"{name}.stderr", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=ENV, text=True,
            stdout=subprocess.PIPE, stderr=self.stderr)
        line = self._first_line(timeout)
        m = LISTENING.fullmatch(line.strip())
        if m is None:
            self.stop()
            pytest.fail(f"{name}: expected 'listening on ...', got {line!r}\n{self.errors()}")
        self.path: Optional[str] = m["path"]
        self.host: Optional[str] = m["host"]
        self.port: Optional[int] = int(m["port"]) if m["port"] else None

    def _first_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.stop()
                pytest.fail(f"{self.name}: no output within {timeout} s\n{self.errors()}")
        return self.proc.stdout.readline()   # the server prints whole lines, flushed

    @property
    def addr(self) -> Any:
        return self.path if self.path else (self.host, self.port)

    def errors(self) -> str:
        self.stderr.seek(0)
        return f"--- {self.name} stderr ---\n{self.stderr.read()}"

    def stop(self) -> int:
        """SIGTERM, then wait: the examples shut down gracefully and exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def start_example(tmp_path):
    """start_example("echo_server.py", "--runner", "inline") -> Example, listening
    on 127.0.0.1 with an OS-chosen port (or on --unix PATH)."""
    running: List[Example] = []

    def start(name: str, *args: str) -> Example:
        if "--unix" not in args:
            args = ("--port", "0") + args
        ex = Example(name, list(args), tmp_path)
        running.append(ex)
        return ex

    yield start
    failures = []
    for ex in running:
        rc = ex.stop()
        if rc != 0:
            failures.append(f"{ex.name} exited with {rc} after SIGTERM\n{ex.errors()}")
        ex.stderr.close()
    assert not failures, "\n".join(failures)


def run_client(name: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def connect(ex: Example, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(ex.addr, timeout=timeout)


# ======================================================================
# echo
# ======================================================================

@pytest.mark.timeout(60)
@pytest.mark.parametrize("network", ["tcp", "unix"])
@pytest.mark.parametrize("runner", ["pool", "inline"])
def test_echo_server_and_client(start_example, runner, network):
    args = ["--runner", runner]
    tmpdir = None
    if network == "unix":
        tmpdir = tempfile.mkdtemp(prefix="npx-", dir="/tmp")   # short path: sun_path limit
        args += ["--unix", os.path.join(tmpdir, "echo.sock")]
    try:
        ex = start_example("echo_server.py", *args)
        where = ["--unix", ex.path] if ex.path else ["--port", str(ex.port)]
        out = run_client("echo_client.py", *where, "-n", "500", "--size", "3000")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "500 messages of 3000 bytes, all echoes correct" in out.stdout, out.stdout
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.mark.timeout(30)
def test_echo_server_echoes_a_large_write(start_example):
    ex = start_example("echo_server.py", "--runner", "inline")
    data = os.urandom(1 << 20)
    with connect(ex) as s:
        s.sendall(data[:100])
        assert recv_exact(s, 100) == data[:100]
        s.sendall(data)   # 1 MiB: bigger than the socket buffers, so echoed while sent
        assert recv_exact(s, len(data)) == data


# ======================================================================
# rpc
# ======================================================================

def load_rpc_client():
    spec = importlib.util.spec_from_file_location("rpc_client", EXAMPLES / "rpc_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
def test_rpc_client_pool_against_rpc_server(start_example):
    ex = start_example("rpc_server.py")
    out = run_client("rpc_client.py", "--port", str(ex.port), "-n", "400",
                     "--threads", "4", "--pool", "2", "--size", "5000")
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"400 calls from 4 threads over (\d+) connection\(s\) \(pool 2\): "
                  r"all replies correct", out.stdout)
    assert m, out.stdout
    assert 1 <= int(m[1]) <= 2, out.stdout


@pytest.mark.timeout(30)
def test_rpc_server_frames_from_a_raw_socket(start_example):
    ex = start_example("rpc_server.py")
    bodies = [b"", b"x", os.urandom(300_000)]
    with connect(ex) as s:
        # All three requests in one write, the last split across reads.
        s.sendall(b"".join(struct.pack(">I", len(b)) + b for b in bodies))
        for b in bodies:
            assert read_frame(s) == hashlib.sha256(b).digest()
    with connect(ex) as s:
        s.sendall(struct.pack(">I", (16 << 20) + 1))   # over the server's frame limit
        assert sees_eof(s, 5.0)


@pytest.mark.timeout(30)
def test_rpc_client_drops_connections_closed_while_idle(start_example):
    """The pool checks is_active(): after the server's idle timeout closed the
    pooled connection, the next call dials a new one and succeeds."""
    ex = start_example("rpc_server.py", "--idle-timeout", "0.3")
    rpc = load_rpc_client()
    client = rpc.RpcClient((ex.host, ex.port), pool_size=1)
    try:
        assert client.sha256(b"one") == hashlib.sha256(b"one").digest()
        (conn,) = client._idle
        assert wait_until(lambda: not conn.is_active(), timeout=10.0)
        assert client.sha256(b"two") == hashlib.sha256(b"two").digest()
        assert client.dialed == 2
    finally:
        client.close()


# ======================================================================
# http
# ======================================================================

def parse_responses(data: bytes) -> List[Dict[str, Any]]:
    """Split a byte stream into HTTP responses with httptools (no hand parsing)."""
    import httptools

    class Collector:
        def __init__(self) -> None:
            self.done: List[Dict[str, Any]] = []
            self.headers: Dict[bytes, bytes] = {}
            self.body = b""

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.lower()] = value

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.done.append({"status": parser.get_status_code(), "headers": self.headers,
                              "body": self.body})
            self.headers, self.body = {}, b""

    collector = Collector()
    parser = httptools.HttpResponseParser(collector)
    parser.feed_data(data)
    return collector.done


@pytest.mark.timeout(30)
def test_http_keep_alive_with_http_client(start_example):
    needs("httptools")
    ex = start_example("http_server.py")
    c = http.client.HTTPConnection(ex.host, ex.port, timeout=10)
    try:
        c.connect()
        first_socket = c.sock
        seen = []
        for path in ["/plaintext", "/json", "/missing", "/json?x=1", "/plaintext"]:
            c.request("GET", path)
            r = c.getresponse()
            seen.append((path, r.status, r.getheader("Content-Type"), r.read()))
            assert not r.will_close, path
        assert c.sock is first_socket     # every request went over one connection
    finally:
        c.close()
    assert seen == [
        ("/plaintext", 200, "text/plain", b"Hello, World!"),
        ("/json", 200, "application/json", b'{"message": "Hello, World!"}'),
        ("/missing", 404, "text/plain", b"Not Found"),
        ("/json?x=1", 200, "application/json", b'{"message": "Hello, World!"}'),
        ("/plaintext", 200, "text/plain", b"Hello, World!"),
    ]


@pytest.mark.timeout(30)
def test_http_pipelined_requests_answered_in_order(start_example):
    needs("httptools")
    ex = start_example("http_server.py")
    requests = b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p
                        for p in (b"/json", b"/nope", b"/plaintext"))
    with connect(ex) as s:
        s.sendall(requests)                  # three requests in one write
        data = b""
        while len(parse_responses(data)) < 3:
            chunk = s.recv(65536)
            assert chunk, f"server closed early after {data!r}"
            data += chunk
        got = parse_responses(data)
        assert [(r["status"], r["body"]) for r in got] == [
            (200, b'{"message": "Hello, World!"}'), (404, b"Not Found"),
            (200, b"Hello, World!")]
        # Keep-alive: the same connection still serves.
        s.sendall(b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not parse_responses(data):
            data += s.recv(65536)
        assert parse_responses(data)[0]["body"] == b"Hello, World!"


@pytest.mark.timeout(30)
def test_http_connection_close_and_bad_request(start_example):
    needs("httptools")
    ex = start_example("http_server.py")
    with connect(ex) as s:
        s.sendall(b"GET /plaintext HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                  b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")   # after close: ignored
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        got = parse_responses(data)
        assert [(r["status"], r["headers"].get(b"connection")) for r in got] == [(200, b"close")]
    with connect(ex) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ["/plaintext", "/json"])
def test_http_under_wrk(start_example, path):
    needs("httptools")
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.skip("wrk is not installed (apt-get install wrk); skipping the HTTP load test")
    ex = start_example("http_server.py")
    out = subprocess.run([wrk, "-t1", "-c16", "-d1", f"http://{ex.host}:{ex.port}{path}"],
                         capture_output=True, text=True, timeout=30)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"(\d+) requests in", out.stdout)
    assert m and int(m[1]) > 0, out.stdout
    assert "Socket errors" not in out.stdout, out.stdout
    assert "Non-2xx" not in out.stdout, out.stdout
    assert re.search(r"Requests/sec:\s+[\d.]+", out.stdout), out.stdout


# ======================================================================
# resp (Redis protocol)
# ======================================================================

@pytest.mark.timeout(60)
def test_resp_server_with_redis_client(start_example):
    needs("hiredis")
    redis = pytest.importorskip("redis", reason="redis is missing: pip install -e '.[test]'")
    ex = start_example("resp_server.py")
    # protocol=2: the server speaks RESP2 (redis-py >= 8 asks for RESP3 by default).
    r = redis.Redis(host=ex.host, port=ex.port, protocol=2, socket_timeout=10)
    try:
        assert r.ping() is True
        assert r.echo(b"hi") == b"hi"
        assert r.set("k", "v") is True and r.get("k") == b"v"
        assert r.get("absent") is None
        assert r.set("k", "other", nx=True) is None and r.get("k") == b"v"
        assert r.set("absent", "x", xx=True) is None and r.exists("absent") == 0
        assert r.set("k", "v2", xx=True) is True and r.get("k") == b"v2"
        assert r.incr("n") == 1 and r.incr("n") == 2 and r.incr("n", 10) == 12
        with pytest.raises(redis.ResponseError, match="not an integer"):
            r.incr("k")
        assert r.ttl("n") == -1 and r.ttl("absent") == -2
        assert r.expire("n", 100) is True and 99 <= r.ttl("n") <= 100
        assert r.incr("n") == 13 and r.ttl("n") > 0          # INCR keeps the TTL
        assert r.expire("absent", 100) is False
        assert r.set("e", "1", ex=50) is True and 49 <= r.ttl("e") <= 50
        assert r.set("gone", "1", px=1) is True
        assert wait_until(lambda: r.get("gone") is None, timeout=5.0)
        assert r.ttl("gone") == -2
        assert r.mset({"a": "1", "b": "2"}) is True
        assert r.mget("a", "b", "absent") == [b"1", b"2", None]
        assert r.exists("a", "b", "absent", "a") == 3
        assert r.delete("a", "a", "absent") == 1 and r.exists("a") == 0
        assert r.config_get("save") == {"save": ""}
        with pytest.raises(redis.ResponseError, match="unknown command"):
            r.execute_command("NOSUCHCOMMAND")

        pipe = r.pipeline(transaction=False)                 # pipelined, no MULTI
        for _ in range(200):
            pipe.incr("counter")
        assert pipe.execute() == list(range(1, 201))
        pipe = r.pipeline()                                  # MULTI/EXEC
        pipe.set("t", "1").incr("t").get("t").mget("t", "absent")
        assert pipe.execute() == [True, 2, b"2", [b"2", None]]
    finally:
        r.close()


@pytest.mark.timeout(30)
def test_resp_server_partial_and_inline_commands(start_example):
    needs("hiredis")
    ex = start_example("resp_server.py")
    with connect(ex) as s:
        cmd = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n"
        for i in range(0, len(cmd), 7):                      # dribbled in 7-byte pieces
            s.sendall(cmd[i:i + 7])
        assert recv_exact(s, len(b"+OK\r\n$5\r\nvalue\r\n")) == b"+OK\r\n$5\r\nvalue\r\n"
    with connect(ex) as s:
        s.sendall(b"PING\r\nECHO hel")                       # inline, the second half-sent
        assert recv_exact(s, 7) == b"+PONG\r\n"
        s.sendall(b"lo\r\n")
        assert recv_exact(s, 11) == b"$5\r\nhello\r\n"
    with connect(ex) as s:
        s.sendall(b"*1\r\n:5\r\n")                           # not a command: error, then close
        assert s.recv(100).startswith(b"-ERR Protocol error")
        assert sees_eof(s, 5.0)


REDIS_TESTS = ("PING_INLINE", "PING_MBULK", "SET", "GET", "INCR")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pipeline", [None, "16"], ids=["no-pipeline", "P16"])
def test_resp_server_under_redis_benchmark(start_example, pipeline):
    needs("hiredis")
    bench = shutil.which("redis-benchmark")
    if bench is None:
        pytest.skip("redis-benchmark is not installed (apt-get install redis-tools); "
                    "skipping the Redis load test")
    ex = start_example("resp_server.py")
    cmd = [bench, "-h", ex.host, "-p", str(ex.port), "-t", "ping,set,get,incr",
           "-n", "20000", "-q"]
    if pipeline:
        cmd += ["-P", pipeline]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
    # -q rewrites a progress line with \r; the last version of each line is the result.
    lines = [part.split("\r")[-1].strip() for part in out.stdout.splitlines()]
    results = dict(re.findall(r"^(\w+): ([\d.]+) requests per second", "\n".join(lines), re.M))
    print("\n".join(line for line in lines if line))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ERROR" not in out.stdout + out.stderr and "WARNING" not in out.stderr, out.stderr
    assert set(results) == set(REDIS_TESTS), out.stdout
    assert all(float(v) > 0 for v in results.values()), results


# ======================================================================
# linkbuffer_demo (no server)
# ======================================================================

@pytest.mark.timeout(30)
def test_linkbuffer_demo_runs():
    out = run_client("linkbuffer_demo.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "chunks still referenced after dropping the frames: 0" in out.stdout, out.stdout
