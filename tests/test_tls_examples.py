"""The examples with ``--tls CERT KEY`` (issue 14), driven by clients nobody
here wrote: curl and http.client against the HTTPS example, openssl s_client
and Python's ssl against the echo example, redis-py (ssl=True) and
redis-benchmark --tls against the RESP example. Certificates come from
trustme (tests/tlsutil.py); servers run as subprocesses exactly as in
tests/test_examples.py and must exit 0 on SIGTERM."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile

import pytest

import test_examples
from test_examples import needs, start_example  # noqa: F401  (start_example: a fixture)
from tlsutil import (  # noqa: F401  (certs: a fixture)
    TOOL_ENV, certs, recv_exact_tls, tls_sees_eof,
)

# The examples build their contexts with ssl.create_default_context(), which
# honours $SSLKEYLOGFILE, and netpoll refuses contexts with a key log: keep a
# developer's setting out of the example servers started here.
test_examples.ENV.pop("SSLKEYLOGFILE", None)

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")


def tls_args(certs) -> tuple:
    return ("--tls", certs.server_cert_pem, certs.server_key_pem)


def s_client_echo(cmd_tail: list, ca_pem: str, lines: list, timeout: float = 20.0) -> bytes:
    """openssl s_client -quiet: send `lines`, return what came back once all
    of them were echoed (or the timeout passed)."""
    import select
    import time
    assert OPENSSL is not None
    p = subprocess.Popen([OPENSSL, "s_client", *cmd_tail, "-CAfile", ca_pem,
                          "-verify_return_error", "-quiet"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=TOOL_ENV)
    assert p.stdin is not None and p.stdout is not None
    want = b"".join(lines)
    out = b""
    try:
        for line in lines:
            p.stdin.write(line)
            p.stdin.flush()
        deadline = time.monotonic() + timeout
        while len(out) < len(want):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
                break
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
        return out
    finally:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()


# ======================================================================
# https (http_server.py --tls)
# ======================================================================

@pytest.mark.timeout(60)
@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("version", [["--tlsv1.2", "--tls-max", "1.2"], ["--tlsv1.3"]],
                         ids=["tls1.2", "tls1.3"])
def test_https_example_with_curl(start_example, certs, version):
    needs("httptools")
    ex = start_example("http_server.py", *tls_args(certs))
    base = f"https://localhost:{ex.port}"
    # Three URLs in one curl run: curl keeps the connection alive between them.
    out = subprocess.run(
        [CURL, "-sS", "--fail-with-body", "--cacert", certs.ca_pem, *version, "-v",
         "-w", "|%{http_code}|%{http_version}\n",
         f"{base}/json", f"{base}/plaintext", f"{base}/json?x=1"],
        capture_output=True, text=True, timeout=30, env=TOOL_ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    bodies = out.stdout.splitlines()
    assert bodies == ['{"message": "Hello, World!"}|200|1.1',
                      "Hello, World!|200|1.1",
                      '{"message": "Hello, World!"}|200|1.1'], out.stdout
    assert "SSL certificate verify ok" in out.stderr, out.stderr
    assert "ALPN: server accepted http/1.1" in out.stderr or \
        "ALPN, server accepted to use http/1.1" in out.stderr, out.stderr
    assert re.search(r"[Rr]e-?using existing connection", out.stderr), out.stderr
    want = "TLSv1.2" if "--tls-max" in version else "TLSv1.3"
    assert f"SSL connection using {want}" in out.stderr, out.stderr


@pytest.mark.timeout(60)
@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_https_example_refused_by_curl_without_the_ca(start_example, certs):
    needs("httptools")
    ex = start_example("http_server.py", *tls_args(certs))
    out = subprocess.run([CURL, "-sS", "--cacert", certs.other_ca_pem,
                          f"https://localhost:{ex.port}/json"],
                         capture_output=True, text=True, timeout=30, env=TOOL_ENV)
    assert out.returncode == 60, out.stdout + out.stderr      # CURLE_PEER_FAILED_VERIFICATION
    # The server stays up for the next client.
    out = subprocess.run([CURL, "-sS", "--cacert", certs.ca_pem,
                          f"https://127.0.0.1:{ex.port}/plaintext"],
                         capture_output=True, text=True, timeout=30, env=TOOL_ENV)
    assert out.returncode == 0 and out.stdout == "Hello, World!", out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_https_example_with_http_client(start_example, certs):
    needs("httptools")
    ex = start_example("http_server.py", *tls_args(certs))
    ctx = certs.client_context(alpn=["http/1.1"])
    c = http.client.HTTPSConnection("localhost", ex.port, timeout=10, context=ctx)
    try:
        c.connect()
        first = c.sock
        assert isinstance(first, ssl.SSLSocket)
        assert first.selected_alpn_protocol() == "http/1.1"
        seen = []
        for path in ["/plaintext", "/json", "/missing", "/plaintext"]:
            c.request("GET", path)
            r = c.getresponse()
            seen.append((path, r.status, r.read()))
        assert c.sock is first
    finally:
        c.close()
    assert seen == [("/plaintext", 200, b"Hello, World!"),
                    ("/json", 200, json.dumps({"message": "Hello, World!"}).encode()),
                    ("/missing", 404, b"Not Found"),
                    ("/plaintext", 200, b"Hello, World!")]


@pytest.mark.timeout(60)
def test_https_example_connection_close_sends_close_notify(start_example, certs):
    needs("httptools")
    ex = start_example("http_server.py", *tls_args(certs))
    raw = socket.create_connection((ex.host, ex.port), timeout=10)
    with certs.client_context().wrap_socket(raw, server_hostname="localhost",
                                            suppress_ragged_eofs=False) as s:
        s.sendall(b"GET /plaintext HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ssl.SSLEOFError:
                pytest.fail(f"TCP closed without close_notify after {data!r}")
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"Hello, World!")


@pytest.mark.timeout(60)
def test_https_example_under_wrk(start_example, certs):
    needs("httptools")
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.skip("wrk is not installed (apt-get install wrk); skipping the HTTPS load test")
    ex = start_example("http_server.py", *tls_args(certs))
    out = subprocess.run([wrk, "-t1", "-c8", "-d1", f"https://127.0.0.1:{ex.port}/plaintext"],
                         capture_output=True, text=True, timeout=30, env=TOOL_ENV)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"(\d+) requests in", out.stdout)
    assert m and int(m[1]) > 0, out.stdout
    assert "Socket errors" not in out.stdout, out.stdout
    assert "Non-2xx" not in out.stdout, out.stdout


# ======================================================================
# echo (echo_server.py --tls)
# ======================================================================

@pytest.mark.timeout(60)
@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is missing")
@pytest.mark.parametrize("runner", ["pool", "inline"])
@pytest.mark.parametrize("network", ["tcp", "unix"])
def test_echo_example_with_openssl_s_client(start_example, certs, runner, network):
    args = ["--runner", runner, *tls_args(certs)]
    tmpdir = None
    if network == "unix":
        tmpdir = tempfile.mkdtemp(prefix="npx-", dir="/tmp")
        args += ["--unix", os.path.join(tmpdir, "echo.sock")]
    try:
        ex = start_example("echo_server.py", *args)
        where = ["-unix", ex.path] if ex.path else ["-connect", f"127.0.0.1:{ex.port}"]
        lines = [b"hello from openssl\n", b"x" * 5000 + b"\n", b"bye\n"]
        got = s_client_echo(where + ["-servername", "localhost"], certs.ca_pem, lines)
        assert got == b"".join(lines)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.mark.timeout(60)
@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is missing")
def test_echo_example_rejected_by_s_client_with_the_wrong_ca(start_example, certs):
    ex = start_example("echo_server.py", *tls_args(certs))
    out = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{ex.port}",
                          "-CAfile", certs.other_ca_pem, "-verify_return_error", "-quiet"],
                         input=b"hi\n", capture_output=True, timeout=30, env=TOOL_ENV)
    assert out.returncode != 0
    assert b"verify error" in out.stderr or b"certificate verify failed" in out.stderr, \
        out.stderr


@pytest.mark.timeout(60)
def test_echo_example_large_echo_with_python_ssl(start_example, certs):
    ex = start_example("echo_server.py", "--runner", "inline", *tls_args(certs))
    data = os.urandom(1 << 20)
    raw = socket.create_connection((ex.host, ex.port), timeout=20)
    with certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(data[:100])
        assert recv_exact_tls(s, 100) == data[:100]
        s.sendall(data)       # bigger than the socket buffers: echoed while sent
        assert recv_exact_tls(s, len(data)) == data


@pytest.mark.timeout(60)
def test_echo_example_closes_a_plaintext_client(start_example, certs):
    ex = start_example("echo_server.py", *tls_args(certs))
    with socket.create_connection((ex.host, ex.port), timeout=10) as s:
        s.sendall(b"this is not TLS\r\n\r\n")
        assert tls_sees_eof(s, 10.0)


# ======================================================================
# resp (resp_server.py --tls)
# ======================================================================

@pytest.mark.timeout(60)
def test_resp_example_with_redis_py_over_ssl(start_example, certs):
    needs("hiredis")
    redis = pytest.importorskip("redis", reason="redis is missing: pip install -e '.[test]'")
    ex = start_example("resp_server.py", *tls_args(certs))
    r = redis.Redis(host="localhost", port=ex.port, protocol=2, socket_timeout=10,
                    ssl=True, ssl_ca_certs=certs.ca_pem, ssl_cert_reqs="required",
                    ssl_check_hostname=True)
    try:
        assert r.ping() is True
        assert r.set("k", "v") is True and r.get("k") == b"v"
        assert r.incr("n") == 1 and r.incr("n", 10) == 11
        big = os.urandom(300_000)
        assert r.set("big", big) is True and r.get("big") == big
        assert r.mget("k", "absent") == [b"v", None]
        pipe = r.pipeline(transaction=False)
        for _ in range(200):
            pipe.incr("counter")
        assert pipe.execute() == list(range(1, 201))
        pipe = r.pipeline()
        pipe.set("t", "1").incr("t").get("t")
        assert pipe.execute() == [True, 2, b"2"]
    finally:
        r.close()


@pytest.mark.timeout(60)
def test_resp_example_refuses_redis_py_without_the_ca(start_example, certs):
    needs("hiredis")
    redis = pytest.importorskip("redis", reason="redis is missing: pip install -e '.[test]'")
    ex = start_example("resp_server.py", *tls_args(certs))
    r = redis.Redis(host="localhost", port=ex.port, protocol=2, socket_timeout=10,
                    ssl=True, ssl_ca_certs=certs.other_ca_pem, ssl_cert_reqs="required")
    try:
        with pytest.raises(redis.ConnectionError):
            r.ping()
    finally:
        r.close()


def redis_benchmark_tls() -> str:
    bench = shutil.which("redis-benchmark")
    if bench is None:
        pytest.skip("redis-benchmark is not installed (apt-get install redis-tools)")
    helptext = subprocess.run([bench, "--help"], capture_output=True, text=True, timeout=10,
                              env=TOOL_ENV)
    if "--tls" not in helptext.stdout + helptext.stderr:
        pytest.skip("this redis-benchmark was built without TLS support")
    return bench


REDIS_TESTS = ("PING_INLINE", "PING_MBULK", "SET", "GET", "INCR")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pipeline", [None, "16"], ids=["no-pipeline", "P16"])
def test_resp_example_under_redis_benchmark_tls(start_example, certs, pipeline):
    needs("hiredis")
    bench = redis_benchmark_tls()
    ex = start_example("resp_server.py", *tls_args(certs))
    cmd = [bench, "-h", "127.0.0.1", "-p", str(ex.port), "--tls", "--cacert", certs.ca_pem,
           "--sni", "localhost", "-t", "ping,set,get,incr", "-n", "5000", "-c", "16", "-q"]
    if pipeline:
        cmd += ["-P", pipeline]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=100, env=TOOL_ENV)
    lines = [part.split("\r")[-1].strip() for part in out.stdout.splitlines()]
    results = dict(re.findall(r"^(\w+): ([\d.]+) requests per second", "\n".join(lines), re.M))
    print("\n".join(line for line in lines if line))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ERROR" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert set(results) == set(REDIS_TESTS), out.stdout + out.stderr
    assert all(float(v) > 0 for v in results.values()), results
