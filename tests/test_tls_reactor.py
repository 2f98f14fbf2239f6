"""TLS on the Reactor (issue 14): ``Acceptor(reactor, addr, factory, ssl=ctx)``
and ``Connector(reactor).connect(addr, handler, timeout, ssl=ctx,
server_hostname=None)``; ``on_open`` runs after the handshake, ``read()``
gives plaintext, ``write``/``async_write`` take plaintext, ``handler.tls``
describes the session.

SKIPPED until the Reactor's TLS lands (the issue lists it after the
EventLoop and the Dialer): every test here is skipped while Acceptor has no
``ssl`` parameter, and runs as soon as it has one."""
from __future__ import annotations

import inspect
import os
import socket
import ssl
import threading
from typing import Any, List

import pytest

import netpoll
from reactorutil import Recorder, running, wait_until  # noqa: F401  (running: a fixture)
from tlsutil import (  # noqa: F401  (certs, make_py_server: fixtures)
    CLIENT_IDENTITY, certs, make_py_server, py_echo, recv_exact_tls, tls_sees_eof,
)


def _reactor_has_tls() -> bool:
    try:
        return ("ssl" in inspect.signature(netpoll.Acceptor.__init__).parameters
                and "ssl" in inspect.signature(netpoll.Connector.connect).parameters)
    except (TypeError, ValueError):
        return False


pytestmark = pytest.mark.skipif(
    not _reactor_has_tls(),
    reason="Reactor TLS not landed yet (issue 14): Acceptor/Connector.connect take no ssl=")


def tls_info(tls: Any) -> dict:
    return {"version": tls.version(), "cipher": tls.cipher(),
            "alpn": tls.selected_alpn_protocol(), "peercert": tls.getpeercert(),
            "peercert_der": tls.getpeercert(binary_form=True),
            "server_hostname": tls.server_hostname}


class TLSRecorder(Recorder):
    """Echo handler that also records what handler.tls says in on_open."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_at_open: Any = "not opened"

    def on_open(self) -> bool:
        self.tls_at_open = None if self.tls is None else tls_info(self.tls)
        return super().on_open()


class TLSClient(TLSRecorder):
    """Connector handler: sends `payload` on open, collects the echo."""

    def __init__(self, payload: bytes = b"ping") -> None:
        super().__init__()
        self.payload = payload
        self.got = bytearray()
        self.done = threading.Event()

    def on_open(self) -> bool:
        self.tls_at_open = None if self.tls is None else tls_info(self.tls)
        self.calls.append("open")
        self.get_reactor().add_ev_handler(self, self.fd(), netpoll.EV_IN)
        if self.payload:
            self.write(self.payload)
        self.opened.set()
        return True

    def on_read(self) -> bool:
        d = self.read()
        if not d:
            return False
        self.got += d
        if len(self.got) >= len(self.payload):
            self.done.set()
        return True


def make_acceptor(r: Any, ctx: ssl.SSLContext, made: List[TLSRecorder]) -> Any:
    def factory() -> TLSRecorder:
        h = TLSRecorder()
        made.append(h)
        return h

    return netpoll.Acceptor(r, "127.0.0.1:0", factory, ssl=ctx)


# ======================================================================
# Acceptor
# ======================================================================

@pytest.mark.timeout(30)
@pytest.mark.parametrize("poll_num", [1, 2])
def test_acceptor_tls_echo_with_python_client(running, certs, poll_num):
    r = running(poll_num=poll_num).reactor
    made: List[TLSRecorder] = []
    acc = make_acceptor(r, certs.server_context(alpn=["echo"]), made)
    for i in range(4):
        raw = socket.create_connection(acc.addr, timeout=10)
        with certs.client_context(alpn=["echo"]).wrap_socket(
                raw, server_hostname="127.0.0.1") as s:
            for msg in (b"hello %d" % i, os.urandom(200_000)):
                s.sendall(msg)
                assert recv_exact_tls(s, len(msg)) == msg
            version = s.version()
    assert wait_until(lambda: len(made) == 4 and all(h.closed_ev.is_set() for h in made))
    for h in made:
        assert h.calls[0] == "open" and h.calls.count("close") == 1
        info = h.tls_at_open
        assert info is not None, "handler.tls is None in on_open on a TLS acceptor"
        assert info["version"] == version and info["alpn"] == "echo"
        assert isinstance(info["cipher"], tuple) and len(info["cipher"]) == 3
        assert info["peercert"] is None          # no client certificate asked for
    acc.close()


@pytest.mark.timeout(30)
def test_acceptor_mutual_tls(running, certs):
    r = running().reactor
    made: List[TLSRecorder] = []
    acc = make_acceptor(r, certs.server_context(require_client_cert=True), made)
    raw = socket.create_connection(acc.addr, timeout=10)
    with certs.client_context(with_cert=True).wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"mtls")
        assert recv_exact_tls(s, 4) == b"mtls"
    assert wait_until(lambda: made and made[0].tls_at_open != "not opened")
    info = made[0].tls_at_open
    assert info["peercert_der"] == certs.client_der
    assert ("email", CLIENT_IDENTITY) in info["peercert"]["subjectAltName"]
    # Without a client certificate: refused, and no on_open.
    before = len(made)
    raw = socket.create_connection(acc.addr, timeout=10)
    try:
        s = certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
    except (ssl.SSLError, ConnectionError):
        pass
    else:
        try:
            s.sendall(b"let me in")
        except (ssl.SSLError, ConnectionError):
            pass
        assert tls_sees_eof(s, 5.0)
        s.close()
    assert all(h.tls_at_open == "not opened" for h in made[before:])
    acc.close()


@pytest.mark.timeout(30)
def test_acceptor_plain_handlers_have_no_tls(running):
    r = running().reactor
    made: List[TLSRecorder] = []

    def factory() -> TLSRecorder:
        made.append(TLSRecorder())
        return made[-1]

    acc = netpoll.Acceptor(r, "127.0.0.1:0", factory)
    with socket.create_connection(acc.addr, timeout=10) as s:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    assert wait_until(lambda: made and made[0].tls_at_open != "not opened")
    assert made[0].tls_at_open is None
    acc.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n", os.urandom(2048)],
                         ids=["http", "random"])
def test_acceptor_closes_garbage_without_on_open(running, certs, garbage):
    r = running().reactor
    made: List[TLSRecorder] = []
    acc = make_acceptor(r, certs.server_context(), made)
    with socket.create_connection(acc.addr, timeout=10) as s:
        s.sendall(garbage)
        assert tls_sees_eof(s, 5.0), "the reactor kept a connection that sent garbage"
    assert all(h.tls_at_open == "not opened" for h in made)
    # Still serving.
    raw = socket.create_connection(acc.addr, timeout=10)
    with certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as t:
        t.sendall(b"ok")
        assert recv_exact_tls(t, 2) == b"ok"
    acc.close()


@pytest.mark.timeout(30)
def test_acceptor_refuses_contexts_with_python_callbacks(running, certs):
    r = running().reactor
    ctx = certs.server_context()
    ctx.sni_callback = lambda sslobj, name, c: None
    with pytest.raises(ValueError):
        netpoll.Acceptor(r, "127.0.0.1:0", TLSRecorder, ssl=ctx)


# ======================================================================
# Connector
# ======================================================================

@pytest.mark.timeout(30)
def test_connector_tls_to_python_server(running, make_py_server, certs):
    r = running().reactor
    srv = make_py_server(certs.server_context(), py_echo)
    h = TLSClient(b"hello python" + os.urandom(100_000))
    netpoll.Connector(r).connect(srv.address, h, timeout=5.0, ssl=certs.client_context())
    assert h.done.wait(10), h.calls
    assert bytes(h.got) == h.payload
    assert h.tls_at_open["server_hostname"] == "127.0.0.1"
    assert h.tls_at_open["peercert_der"] == certs.server_der
    assert "fail" not in h.calls
    h.destroy()
    assert h.closed_ev.wait(5)


@pytest.mark.timeout(30)
def test_connector_tls_to_a_tls_acceptor(running, certs):
    r = running(poll_num=2).reactor
    made: List[TLSRecorder] = []
    acc = make_acceptor(r, certs.server_context(), made)
    h = TLSClient(b"reactor to reactor")
    netpoll.Connector(r).connect(acc.addr, h, timeout=5.0, ssl=certs.client_context(),
                                 server_hostname="localhost")
    assert h.done.wait(10), h.calls
    assert bytes(h.got) == b"reactor to reactor"
    assert h.tls_at_open["server_hostname"] == "localhost"
    h.destroy()
    acc.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what", ["wrong-ca", "wrong-hostname"])
def test_connector_verification_failure_calls_on_connect_fail(running, make_py_server,
                                                              certs, what):
    r = running().reactor
    srv = make_py_server(certs.server_context(), py_echo)
    h = TLSClient()
    if what == "wrong-ca":
        netpoll.Connector(r).connect(srv.address, h, timeout=5.0,
                                     ssl=certs.client_context(trust="other"))
    else:
        netpoll.Connector(r).connect(srv.address, h, timeout=5.0, ssl=certs.client_context(),
                                     server_hostname="wrong.example.org")
    assert h.failed.wait(10), h.calls
    assert isinstance(h.error, ssl.SSLCertVerificationError), repr(h.error)
    assert "open" not in h.calls


@pytest.mark.timeout(30)
def test_connector_handshake_timeout_calls_on_connect_fail(running, certs):
    r = running().reactor
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)                  # accepts (in the backlog), never answers
    try:
        h = TLSClient()
        netpoll.Connector(r).connect(lsock.getsockname(), h, timeout=0.5,
                                     ssl=certs.client_context())
        assert h.failed.wait(5), h.calls
        assert isinstance(h.error, TimeoutError), repr(h.error)
        assert "open" not in h.calls
    finally:
        lsock.close()


@pytest.mark.timeout(30)
def test_async_write_over_tls_from_other_threads_is_ordered(running, certs):
    r = running().reactor
    made: List[TLSRecorder] = []
    acc = make_acceptor(r, certs.server_context(), made)
    h = TLSClient(b"")           # sends nothing on open; the threads below write
    netpoll.Connector(r).connect(acc.addr, h, timeout=5.0, ssl=certs.client_context())
    assert h.opened.wait(10)
    pieces = {t: [b"<%d:%04d>" % (t, k) for k in range(300)] for t in range(4)}

    def writer(t: int) -> None:
        for p in pieces[t]:
            h.async_write(p)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    want = sum(len(p) for ps in pieces.values() for p in ps)
    assert wait_until(lambda: len(h.got) >= want, 10.0), (len(h.got), want)
    text = bytes(h.got)
    for t in range(4):
        got = [m for m in text.split(b">") if m.startswith(b"<%d:" % t)]
        assert [m + b">" for m in got] == pieces[t]
    assert len(text) == want
    h.destroy()
    acc.close()
