"""Each reactor example starts as `python examples/NAME.py --port P`, serves,
and stops cleanly on SIGTERM (the process is stopped by its PID)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from reactorutil import recv_exactly

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def example():
    procs = []

    def start(name, *extra):
        port = free_port()
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", name),
                              "--port", str(port), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        procs.append(p)
        line = p.stdout.readline()          # printed once listening
        assert line, p.stderr.read().decode()
        return p, ("127.0.0.1", port)

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        p.stdout.close()
        p.stderr.close()


def stop(p):
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0, p.stderr.read().decode()


def test_reactor_echo(example):
    p, addr = example("reactor_echo.py")
    for i in range(3):
        with socket.create_connection(addr, timeout=5) as c:
            msg = b"echo %d " % i * 100
            c.sendall(msg)
            assert recv_exactly(c, len(msg)) == msg
    stop(p)


def test_reactor_throttled_sender(example):
    size, rate = 30000, 100000
    p, addr = example("reactor_throttled_sender.py", "--size", str(size), "--rate", str(rate))
    t0 = time.monotonic()
    with socket.create_connection(addr, timeout=5) as c:
        data = bytearray()
        while True:
            b = c.recv(65536)
            if not b:
                break
            data += b
    elapsed = time.monotonic() - t0
    assert len(data) == size
    assert data == bytes(i % 251 for i in range(size))
    assert elapsed >= 0.2            # ~0.3 s at this rate: it is throttled
    stop(p)


def test_reactor_reuseport(example):
    if not hasattr(socket, "SO_REUSEPORT"):
        pytest.skip("no SO_REUSEPORT")
    p, addr = example("reactor_reuseport.py", "--pollers", "2")
    seen = set()
    for _ in range(40):
        with socket.create_connection(addr, timeout=5) as c:
            c.sendall(b"hi")
            reply = recv_exactly(c, 4)
            assert reply[1:] == b":hi"
            seen.add(reply[:1])
    assert seen == {b"0", b"1"}
    stop(p)
