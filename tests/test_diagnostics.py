"""Diagnostics: useful reprs of every public class, error messages that name
the connection and the operation, netpoll.stats(), and logging (never print)."""
from __future__ import annotations

import logging
import re
import socket
import threading
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest

import netpoll
from netutil import wait_until

PKG = Path(netpoll.__file__).resolve().parent
CONN_RE = (r"<Connection fd=-?\d+ 127\.0\.0\.1:\d+->127\.0\.0\.1:\d+ "
           r"(open|closing|closed|peer-closed)>")


@pytest.fixture
def served() -> Iterator[Tuple[netpoll.EventLoop, netpoll.Listener, List[netpoll.Connection]]]:
    accepted: List[netpoll.Connection] = []

    def on_connect(ctx: Any, conn: netpoll.Connection) -> None:
        accepted.append(conn)

    def on_request(ctx: Any, conn: netpoll.Connection) -> None:
        conn.writer.write_binary(conn.reader.next(len(conn.reader)))
        conn.writer.flush()

    lst = netpoll.create_listener("tcp", "127.0.0.1:0")
    loop = netpoll.EventLoop(on_request, on_connect=on_connect, idle_timeout=30.0)
    th = threading.Thread(target=loop.serve, args=(lst,), daemon=True)
    th.start()
    try:
        yield loop, lst, accepted
    finally:
        loop.shutdown(timeout=5.0)
        th.join(5)
        lst.close()


def test_connection_repr_has_fd_addresses_and_state(served: Any) -> None:
    loop, lst, accepted = served
    conn = netpoll.dial_connection("tcp", lst.addr, timeout=2.0)
    text = repr(conn)
    assert re.fullmatch(CONN_RE, text), text
    assert f"fd={conn.fileno()} " in text
    host, port = conn.local_addr
    assert f"{host}:{port}->127.0.0.1:{lst.addr[1]} open" in text
    assert repr(conn.reader).startswith("<ConnReader of <Connection fd=")
    assert "buffered=0" in repr(conn.reader)
    assert "unflushed=0" in repr(conn.writer)
    assert wait_until(lambda: accepted)
    assert f"->{host}:{port} " in repr(accepted[0])       # the server's view
    assert f"connections={loop.connections}" in repr(loop)
    conn.close()
    closed = repr(conn)
    assert re.fullmatch(CONN_RE, closed) and "open" not in closed, closed
    assert f"{host}:{port}" in closed                       # addresses outlive the fd


def test_unix_connection_repr(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    lst = netpoll.create_listener("unix", path)
    loop = netpoll.EventLoop(lambda ctx, conn: None)
    th = threading.Thread(target=loop.serve, args=(lst,), daemon=True)
    th.start()
    try:
        conn = netpoll.dial_connection("unix", path, timeout=2.0)
        assert f"->unix:{path} open>" in repr(conn)
        assert "unix:(unnamed)->" in repr(conn)
        conn.close()
        assert repr(lst) == f"<Listener unix {path!r}>"
    finally:
        loop.shutdown(timeout=5.0)
        th.join(5)
        lst.close()
    assert "closed" in repr(lst)


def test_error_messages_name_connection_and_operation(served: Any) -> None:
    _, lst, _ = served
    conn = netpoll.dial_connection("tcp", lst.addr, timeout=2.0)
    conn.set_read_timeout(0.05)
    desc = repr(conn)
    with pytest.raises(netpoll.ReadTimeoutError) as ei:
        conn.reader.next(10)
    msg = str(ei.value)
    assert msg.startswith(f"read on {desc}: ") and "read timeout" in msg, msg
    with pytest.raises(TypeError, match=r"^write on the reader of <Connection fd="):
        conn.reader.write_binary(b"x")
    with pytest.raises(TypeError, match=r"^read on the writer of <Connection fd="):
        conn.writer.next(1)
    conn.close()
    for op, call in (("read", lambda: conn.reader.next(1)),
                     ("write", lambda: conn.writer.write_binary(b"x")),
                     ("write", lambda: conn.write(b"x"))):
        with pytest.raises(netpoll.ConnectionClosedError) as ei:
            call()
        msg = str(ei.value)
        assert re.match(rf"^{op} on {CONN_RE}: ", msg), msg
        assert "127.0.0.1:" in msg


def test_peer_closed_message(served: Any) -> None:
    loop, lst, accepted = served
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    conn = netpoll.dial_connection("tcp", srv.getsockname(), timeout=2.0)
    peer, _ = srv.accept()
    peer.sendall(b"ab")
    peer.close()
    srv.close()
    with pytest.raises(netpoll.PeerClosedError) as ei:
        conn.reader.next(5)
    msg = str(ei.value)
    assert msg.startswith("read on <Connection fd=") and "2 of 5 bytes" in msg, msg
    conn.close()


def test_linkbuffer_messages_and_repr() -> None:
    buf = netpoll.LinkBuffer()
    buf.write_binary(b"abc")
    assert repr(buf) == "<LinkBuffer readable=0 unflushed=3>"
    buf.flush()
    assert repr(buf) == "<LinkBuffer readable=3 unflushed=0>"
    with pytest.raises(netpoll.BufferUnderflowError,
                       match=r"^read on <LinkBuffer readable=3 unflushed=0>: need 5 bytes, "
                             r"3 buffered$"):
        buf.next(5)
    buf.next(3)
    with pytest.raises(netpoll.BufferUnderflowError, match=r"^read on <LinkBuffer .*need 1 byte"):
        buf.read_byte()
    buf.close()
    assert repr(buf) == "<LinkBuffer closed>"
    with pytest.raises(netpoll.BufferClosedError, match="^LinkBuffer is closed$"):
        buf.next(1)


def test_client_and_reactor_reprs() -> None:
    assert repr(netpoll.Dialer(runner="inline")) == "<Dialer runner='inline'>"
    reactor = netpoll.Reactor(poll_num=1)
    try:
        assert repr(reactor) == "<Reactor poll_num=1 ready>"
        acc = netpoll.Acceptor(reactor, "127.0.0.1:0", netpoll.EvHandler)
        assert repr(acc) == f"<Acceptor {acc.addr!r} listeners=1>"
        connector = netpoll.Connector(reactor)
        assert repr(connector) == "<Connector of <Reactor poll_num=1 ready>>"
        pool = netpoll.ConnectPool(connector, acc.addr, netpoll.EvHandler, min_idle=0)
        assert re.fullmatch(r"<ConnectPool \(.*\) idle=0 live=0 connecting=0>", repr(pool))
        pool.close()
        h = netpoll.EvHandler()
        assert repr(h).startswith("<EvHandler fd=")
        acc.close()
        assert repr(acc).endswith(" closed>")
    finally:
        reactor.stop()
    assert "stopped" in repr(reactor)


def test_stats_reports_connections_timers_pool_and_buffers(served: Any) -> None:
    _, lst, accepted = served
    before = netpoll.stats()
    conns = [netpoll.dial_connection("tcp", lst.addr, timeout=2.0) for _ in range(3)]
    try:
        # 3 dialed + 3 accepted, each accepted one with an idle timer.
        assert wait_until(lambda: netpoll.stats()["connections"] >= before["connections"] + 6)
        s = netpoll.stats()
        assert set(s) >= {"num_loops", "connections", "timers", "pollers", "pool", "buffers"}
        assert s["timers"] >= before["timers"] + 3
        assert len(s["pollers"]) == s["num_loops"]
        assert sum(p["connections"] for p in s["pollers"]) == s["connections"]
        assert sum(p["timers"] for p in s["pollers"]) == s["timers"]
        assert {"threads", "idle", "cap", "threshold"} <= set(s["handoff"])
        # The worker pool starts on first use of runner="pool" (not the default).
        netpoll.config.runtime().get_pool()
        assert set(netpoll.stats()["pool"]) == {"size", "pending", "active"}
        conns[0].write(b"x" * 100)
        assert conns[0].reader.next(100) == b"x" * 100
        b = netpoll.stats()["buffers"]
        assert {"chunks_in_use", "bytes_in_use", "chunks_cached", "classes"} <= set(b)
    finally:
        for c in conns:
            c.close()
    assert wait_until(lambda: netpoll.stats()["connections"] <= before["connections"])


def test_library_logs_through_netpoll_logger(served: Any, caplog: Any) -> None:
    _, lst, _ = served

    def boom(ctx: Any, conn: netpoll.Connection) -> None:
        raise RuntimeError("handler failed")

    lst2 = netpoll.create_listener("tcp", "127.0.0.1:0")
    loop = netpoll.EventLoop(boom)
    th = threading.Thread(target=loop.serve, args=(lst2,), daemon=True)
    th.start()
    try:
        with caplog.at_level(logging.ERROR, logger="netpoll"):
            c = socket.create_connection(lst2.addr, timeout=2)
            c.sendall(b"x")
            assert c.recv(1) == b""            # the library closed it
            c.close()
            assert wait_until(lambda: any(r.name == "netpoll" for r in caplog.records))
        rec = next(r for r in caplog.records if r.name == "netpoll")
        assert "on_request raised for <Connection fd=" in rec.getMessage()
    finally:
        loop.shutdown(timeout=5.0)
        th.join(5)
        lst2.close()


def test_no_print_in_the_library() -> None:
    offenders = []
    for path in sorted(PKG.rglob("*")):
        if path.suffix not in (".py", ".pyx", ".pxd") or "bench" in path.relative_to(PKG).parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(^|[^\w.])print\(", line.split("#")[0]):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, "use logging.getLogger('netpoll'), not print:\n" + "\n".join(offenders)


def test_reactor_run_after_stop_returns() -> None:
    """A signal handler may stop() a reactor before the main thread reaches
    run() (the examples' pattern): run() then returns instead of raising."""
    r = netpoll.Reactor(poll_num=1)
    r.stop()
    r.run()
    assert r.stopped and r.wait_stopped(0)


def test_eventloop_repr_shows_effective_runner_and_state() -> None:
    loop = netpoll.EventLoop(lambda ctx, conn: None, runner="inline")
    assert repr(loop) == "<EventLoop runner='inline' connections=0>"
    loop.shutdown(timeout=1.0)
    assert repr(loop) == "<EventLoop runner='inline' connections=0 shut down>"
    assert "runner='auto'" in repr(netpoll.EventLoop(lambda ctx, conn: None))   # the default
