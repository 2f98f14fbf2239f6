"""The main job (issue "main job"): ``python -m netpoll.bench`` runs servers in
their own processes against the native load generator and reports; ``python -m
netpoll.bench client`` drives any echo server. Short runs: this checks that
the machinery works and verifies replies, not speed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netutil import frame_echo, make_server, stream_echo  # noqa: F401  (make_server is a fixture)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the driver reads /proc")


def run_module(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netpoll.bench", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(150)
def test_driver_runs_servers_side_by_side_and_writes_json(tmp_path):
    servers = ["netpoll-inline", "netpoll-pool", "asyncio", "threaded"]
    if shutil.which("cc") or shutil.which("gcc"):
        servers.append("c-epoll")
    out = tmp_path / "r.json"
    p = run_module("--servers", ",".join(servers), "--modes", "echo,framed", "--sizes", "64",
                   "--conns", "2", "--duration", "0.3", "--warmup", "0.1", "--no-pin",
                   "--json", str(out), timeout=140)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("echo/", "framed/"))]
    assert len(lines) == 2 * len(servers), p.stdout
    assert all("failed" not in ln for ln in lines), p.stdout
    data = json.loads(out.read_text())
    cells = data["cells"]
    assert {(c["mode"], c["server"]) for c in cells} == \
        {(m, s) for m in ("echo", "framed") for s in servers}
    for c in cells:
        assert c["ok_runs"] == 1 and c["rps"] > 0, c
        assert c["errors"] == 0, c                   # every echoed byte verified
        assert c["cpu_us_per_req"] is not None and c["cpu_us_per_req"] > 0


@pytest.mark.timeout(60)
def test_driver_holds_idle_connections_beside_the_busy_ones(tmp_path):
    out = tmp_path / "r.json"
    p = run_module("--servers", "netpoll-inline", "--modes", "framed", "--sizes", "1024",
                   "--conns", "4", "--idle-conns", "16", "--duration", "0.3", "--warmup", "0.1",
                   "--no-pin", "--json", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "framed/1KiB/4c+16idle/" in p.stdout
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["idle"] == 16 and cell["rps"] > 0 and cell["errors"] == 0


def test_driver_rejects_bad_options():
    for bad in (["--servers", "nope"], ["--modes", "gossip"], ["--repeat", "0"],
                ["--conns", "0"], ["--duration", "-1"], ["--idle-conns", "-1"]):
        p = run_module(*bad, timeout=30)
        assert p.returncode == 2, (bad, p.stdout, p.stderr)
        assert "error" in p.stderr


@pytest.mark.parametrize("mode", ["echo", "framed"])
def test_client_subcommand_drives_any_echo_server(make_server, mode):
    srv = make_server(stream_echo if mode == "echo" else frame_echo, runner="inline")
    host, port = tuple(srv.addr)[:2]
    p = run_module("client", f"{host}:{port}", "--conns", "4", "--size", "3000", "--mode", mode,
                   "--duration", "0.3", "--warmup", "0.1", "--pipeline", "2", timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["requests"] > 0
    assert res["errors"] == 0 and res["verify_errors"] == 0
    assert res["p50_us"] > 0 and res["p99_us"] >= res["p50_us"]


def test_client_reports_a_server_that_corrupts_replies(make_server):
    def corrupt(ctx, conn):
        r = conn.reader
        n = len(r)
        if n:
            data = bytearray(r.next(n))
            data[0] ^= 0xFF
            conn.writer.write_binary(bytes(data))
            conn.writer.flush()

    srv = make_server(corrupt, runner="inline")
    host, port = tuple(srv.addr)[:2]
    p = run_module("client", f"{host}:{port}", "--conns", "1", "--size", "64",
                   "--duration", "0.3", "--warmup", "0.1", timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["verify_errors"] > 0


def test_client_rejects_a_bad_target():
    p = run_module("client", "no-port-here", timeout=30)
    assert p.returncode != 0
    assert "HOST:PORT" in p.stderr


def test_load_generator_lives_in_the_bench_package_not_the_core():
    import netpoll
    pkg = Path(netpoll.__file__).resolve().parent
    p = run_module("client", "--check", timeout=30)
    assert p.returncode == 0, p.stderr[-2000:]
    where = Path(p.stdout.strip()).resolve()
    assert where.parent == pkg / "bench" and where.name.startswith("_loadgen."), where
    assert not [f.name for f in (pkg / "_core").iterdir() if f.name.startswith("loadgen")]


def test_importing_the_library_imports_no_bench_or_test_code():
    code = ("import sys, netpoll, netpoll.reactor; print(sorted(m for m in sys.modules "
            "if m.startswith(('netpoll.bench', 'netpoll._core.testing'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ------------------------------------------------------------------ TLS (issue 14, "Benchmarks")

@pytest.mark.timeout(150)
def test_driver_tls_runs_every_server_over_tls_and_verifies_the_plaintext(tmp_path):
    servers = ["netpoll-inline", "netpoll-pool", "asyncio", "threaded"]
    try:
        import uvloop  # noqa: F401
        servers.append("uvloop")
    except ImportError:
        pass
    out = tmp_path / "r.json"
    # 20000 B: every message spans two TLS records each way
    p = run_module("--tls", "--servers", ",".join(servers), "--modes", "echo,framed",
                   "--sizes", "20000", "--conns", "3", "--duration", "0.3", "--warmup", "0.1",
                   "--no-pin", "--json", str(out), timeout=140)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("tls-")]
    assert len(lines) == 2 * len(servers), p.stdout
    assert all("failed" not in ln for ln in lines), p.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["tls"] is True
    assert {(c["mode"], c["server"]) for c in data["cells"]} == \
        {(m, s) for m in ("echo", "framed") for s in servers}
    for c in data["cells"]:
        assert c["tls"] is True and c["ok_runs"] == 1 and c["rps"] > 0 and c["errors"] == 0, c
        (run,) = c["raw"]
        assert run["tls"] is True
        # every connection handshook once, all before the measured window
        assert run["tls_handshakes"] == 3 and run["tls_handshakes_in_window"] == 0, run
        assert run["tls_errors"] == 0


def _tls_echo_server(corrupt: bool):
    """A blocking Python ssl echo server on a thread (one per connection); returns (port, stop)."""
    import socket
    import ssl
    import tempfile
    import threading

    from netpoll.bench.tlscerts import make_cert

    tmp = tempfile.TemporaryDirectory()
    cert, key = make_cert(tmp.name)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    stopping = threading.Event()

    def serve(sock):
        try:
            with ctx.wrap_socket(sock, server_side=True) as tls:
                tls.settimeout(10.0)
                while not stopping.is_set():
                    data = tls.recv(65536)
                    if not data:
                        return
                    if corrupt:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                    tls.sendall(data)
        except OSError:
            pass

    def accept_loop():
        while not stopping.is_set():
            try:
                sock, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(10.0)
            threading.Thread(target=serve, args=(sock,), daemon=True).start()

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()

    def stop():
        stopping.set()
        t.join(5.0)
        lsock.close()
        tmp.cleanup()

    return lsock.getsockname()[1], stop


@pytest.mark.parametrize("corrupt", [False, True])
def test_client_tls_drives_a_python_ssl_server_and_verifies_what_it_decrypts(corrupt):
    port, stop = _tls_echo_server(corrupt)
    try:
        p = run_module("client", f"127.0.0.1:{port}", "--tls", "--conns", "2", "--size", "1000",
                       "--duration", "0.3", "--warmup", "0.1", timeout=60)
    finally:
        stop()
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["tls"] is True and res["tls_handshakes"] == 2 and res["tls_errors"] == 0
    if corrupt:
        assert res["verify_errors"] > 0
    else:
        assert res["requests"] > 0 and res["errors"] == 0


@pytest.mark.timeout(90)
def test_driver_tls_also_plain_runs_the_same_matrix_over_plain_tcp_in_the_same_session(tmp_path):
    out = tmp_path / "r.json"
    p = run_module("--tls", "--also-plain", "--servers", "netpoll-inline", "--modes", "echo",
                   "--sizes", "1024", "--conns", "2", "--duration", "0.3", "--warmup", "0.1",
                   "--no-pin", "--json", str(out), timeout=80)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tls-echo/1KiB/2c/unpinned" in p.stdout and "\necho/1KiB/2c/unpinned" in p.stdout
    cells = json.loads(out.read_text())["cells"]
    assert sorted(c["tls"] for c in cells) == [False, True]
    for c in cells:
        assert c["rps"] > 0 and c["errors"] == 0, c
        (run,) = c["raw"]
        assert run["tls"] is c["tls"]
        assert run["tls_handshakes"] == (2 if c["tls"] else 0)


def test_driver_rejects_also_plain_without_tls():
    p = run_module("--also-plain", timeout=30)
    assert p.returncode == 2 and "--also-plain goes with --tls" in p.stderr


def test_client_tls_opens_its_window_only_after_every_handshake():
    # No warm-up at all: without the wait for the handshakes they would land in the window.
    port, stop = _tls_echo_server(False)
    try:
        p = run_module("client", f"127.0.0.1:{port}", "--tls", "--conns", "6", "--size", "100",
                       "--duration", "0.3", "--warmup", "0", timeout=60)
    finally:
        stop()
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["tls_handshakes"] == 6 and res["tls_handshakes_in_window"] == 0, res
    assert res["requests"] > 0 and res["errors"] == 0 and res["starved_connections"] == 0
