"""The Reactor's TLS (issue 14), the parts of the contract that
tests/test_tls_reactor.py does not cover: a mutual-TLS Acceptor refuses a
client without a certificate (no on_open), contexts carrying Python-level
callbacks (sni_callback, keylog_filename) are refused with ValueError by the
Acceptor and the Connector, and async_write from several threads at once
keeps each thread's order over TLS.

Skipped where the Reactor has no TLS (Acceptor/Connector.connect without
``ssl=``)."""
from __future__ import annotations

import inspect
import socket
import ssl
import threading
from typing import Any, List

import pytest

import netpoll
from reactorutil import Recorder, running, wait_until  # noqa: F401  (running: a fixture)
from tlsutil import (  # noqa: F401  (certs: a fixture)
    CLIENT_IDENTITY, certs, recv_exact_tls, tls_sees_eof,
)


def _reactor_has_tls() -> bool:
    try:
        return ("ssl" in inspect.signature(netpoll.Acceptor.__init__).parameters
                and "ssl" in inspect.signature(netpoll.Connector.connect).parameters)
    except (TypeError, ValueError):
        return False


pytestmark = pytest.mark.skipif(
    not _reactor_has_tls(),
    reason="this netpoll's Reactor has no TLS (Acceptor/Connector.connect take no ssl=)")


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
def test_contexts_with_python_callbacks_are_refused(running, certs, tmp_path):
    r = running().reactor
    ctx = certs.server_context()
    ctx.sni_callback = lambda sslobj, name, c: None
    with pytest.raises(ValueError):
        netpoll.Acceptor(r, "127.0.0.1:0", TLSRecorder, ssl=ctx)
    ctx = certs.server_context()
    ctx.keylog_filename = str(tmp_path / "server-keys.log")
    with pytest.raises(ValueError):
        netpoll.Acceptor(r, "127.0.0.1:0", TLSRecorder, ssl=ctx)
    ctx = certs.client_context()
    ctx.keylog_filename = str(tmp_path / "client-keys.log")
    h = TLSClient()
    with pytest.raises(ValueError):
        netpoll.Connector(r).connect("127.0.0.1:1", h, timeout=1.0, ssl=ctx)
    assert "open" not in h.calls and "fail" not in h.calls


# ======================================================================
# Connector
# ======================================================================

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
