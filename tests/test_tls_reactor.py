"""TLS on the Reactor (issue 14): ``Acceptor(reactor, addr, factory, ssl=ctx)``
and ``Connector(reactor).connect(addr, handler, timeout, ssl=ctx,
server_hostname=None)``. ``on_open`` runs after the handshake, ``read()``
gives plaintext, ``write``/``async_write`` take plaintext, ``handler.tls``
describes the session; a failed handshake closes the fd without ``on_open``
(Acceptor: no callback at all; Connector: ``on_connect_fail``).

The peers are Python's own ``ssl`` module (clients and a server) and raw
sockets for hostile ones. Certificates are made at test time with trustme."""
from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, List, Optional, Tuple

import pytest

import netpoll
from reactorutil import Recorder, running, wait_until  # noqa: F401  (running: a fixture)

from opensslca import import_trustme

trustme = import_trustme()     # or its stand-in made with the openssl tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Certs:
    """A CA, a server certificate for localhost/127.0.0.1/::1 and a client one."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert("localhost", "127.0.0.1", "::1")
        self.client = self.ca.issue_cert("client.example")

    def server_ctx(self, **kw: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        for k, v in kw.items():
            setattr(ctx, k, v)
        return ctx

    def client_ctx(self, trust: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if trust:
            self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="module")
def certs() -> Certs:
    return Certs()


def tls_client(certs: Certs, addr: Any, *, ctx: Optional[ssl.SSLContext] = None,
               timeout: float = 10.0, **kw: Any) -> ssl.SSLSocket:
    ctx = ctx or certs.client_ctx()
    raw = socket.create_connection(addr, timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost", **kw)
    except BaseException:
        raw.close()
        raise


def recv_n(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = s.recv(min(n - len(out), 1 << 20))
        if not b:
            break
        out += b
    return bytes(out)


def tls_info(tls: Any) -> dict:
    return {"version": tls.version(), "cipher": tls.cipher(),
            "alpn": tls.selected_alpn_protocol(), "peercert": tls.getpeercert(),
            "peercert_der": tls.getpeercert(binary_form=True),
            "server_hostname": tls.server_hostname}


class TLSEcho(Recorder):
    """Recorder (echo) that also records handler.tls in on_open."""

    def __init__(self) -> None:
        super().__init__()
        self.info: Any = "not opened"

    def on_open(self) -> bool:
        self.info = None if self.tls is None else tls_info(self.tls)
        return super().on_open()


class Factory:
    """An Acceptor factory that keeps every handler it made."""

    def __init__(self, cls: Any = TLSEcho) -> None:
        self.cls = cls
        self.made: List[Any] = []

    def __call__(self) -> Any:
        h = self.cls()
        self.made.append(h)
        return h


def serve(running: Any, certs: Certs, cls: Any = TLSEcho, poll_num: int = 1,
          address: Any = "127.0.0.1:0", ctx: Optional[ssl.SSLContext] = None,
          reactor_kw: Optional[dict] = None, **kw: Any) -> Tuple[Any, Any, Factory]:
    r = running(poll_num, **(reactor_kw or {}))
    f = Factory(cls)
    acc = netpoll.Acceptor(r.reactor, address, f, ssl=ctx or certs.server_ctx(), **kw)
    return r, acc, f


# ---------------------------------------------------------------- Acceptor


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_acceptor_echo_with_python_ssl_client(running, certs, version):
    r, acc, f = serve(running, certs)
    ctx = certs.client_ctx()
    ctx.minimum_version = ctx.maximum_version = version
    with tls_client(certs, acc.addr, ctx=ctx) as c:
        c.sendall(b"hello")
        assert recv_n(c, 5) == b"hello"
        # One thread per SSLSocket: an OpenSSL session is not for concurrent
        # reads and writes, so the client sends a piece and reads its echo.
        big = os.urandom(3 << 20)
        got = bytearray()
        for i in range(0, len(big), 200000):
            piece = big[i:i + 200000]
            c.sendall(piece)
            got += recv_n(c, len(piece))
        assert got == big
        vname = c.version()
        assert vname == version.name.replace("v1_", "v1.")
        cipher = c.cipher()
    h = f.made[0]
    assert wait_until(lambda: h.closed_ev.is_set())
    assert h.calls[0] == "open" and h.calls[-1] == "close"
    assert h.info["version"] == vname
    assert h.info["cipher"][0] == cipher[0]
    assert h.info["peercert"] is None and h.info["peercert_der"] is None
    assert h.info["server_hostname"] is None and h.info["alpn"] is None
    assert len(h.threads) == 1            # every callback on the handler's poller


def test_acceptor_many_clients_on_two_pollers(running, certs):
    r, acc, f = serve(running, certs, poll_num=2)
    errors: List[Any] = []

    def client(i: int) -> None:
        try:
            with tls_client(certs, acc.addr) as c:
                for j in range(20):
                    msg = b"%d-%d " % (i, j) * (1 + j * 50)
                    c.sendall(msg)
                    assert recv_n(c, len(msg)) == msg
        except BaseException as e:          # reported below
            errors.append(e)

    ts = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors
    assert wait_until(lambda: len(f.made) == 12 and all(h.closed_ev.is_set() for h in f.made))
    assert {h.poller_index for h in f.made} == {0, 1}


class Mover(TLSEcho):
    """Moves itself to the other poller in on_open."""

    def on_open(self) -> bool:
        self.info = tls_info(self.tls)
        self.calls.append("open")
        self.moved_from = self.poller_index
        self.get_reactor().add_ev_handler(self, self.fd(), netpoll.EV_IN,
                                          poller=1 - self.poller_index)
        return True


def test_handler_moved_in_on_open_keeps_its_session(running, certs):
    r, acc, f = serve(running, certs, cls=Mover, poll_num=2)
    for i in range(4):
        with tls_client(certs, acc.addr) as c:
            msg = os.urandom(50000 + i)
            c.sendall(msg)
            assert recv_n(c, len(msg)) == msg
    assert wait_until(lambda: len(f.made) == 4 and all(h.closed_ev.is_set() for h in f.made))
    for h in f.made:
        assert h.calls[0] == "open" and h.calls[-1] == "close"
        assert len(h.threads) == 1           # on_read and on_close on the new poller
        assert h.poller_index == 1 - h.moved_from


def test_plain_handlers_have_no_tls(running, certs):
    r = running()
    f = Factory()
    acc = netpoll.Acceptor(r.reactor, "127.0.0.1:0", f)
    with socket.create_connection(acc.addr, timeout=5) as c:
        c.sendall(b"x")
        assert recv_n(c, 1) == b"x"
    assert f.made[0].info is None
    assert netpoll.EvHandler().tls is None


class ReadOncePerCall(TLSEcho):
    """Level-triggered, and only one read() per on_read: with a read buffer
    smaller than a record, the rest of the record waits inside OpenSSL where
    no socket event announces it."""


class ReadUntilBlocked(TLSEcho):
    """Edge-triggered: reads until BlockingIOError, as EV_IN_ET requires."""

    def on_open(self) -> bool:
        self.info = tls_info(self.tls)
        self.calls.append("open")
        self.get_reactor().add_ev_handler(self, self.fd(), netpoll.EV_IN_ET)
        return True

    def on_read(self) -> bool:
        while True:
            try:
                data = self.read()
            except BlockingIOError:
                return True
            if not data:
                return False
            self.write(data)


@pytest.mark.parametrize("cls", [ReadOncePerCall, ReadUntilBlocked])
def test_input_buffered_in_openssl_is_delivered(running, certs, cls):
    # 1 KiB read buffer, 16 KiB records: each read() leaves plaintext inside
    # OpenSSL after the socket is drained.
    r, acc, f = serve(running, certs, cls=cls, reactor_kw={"read_buffer_size": 1024})
    with tls_client(certs, acc.addr) as c:
        for n in (16384, 5000, 100000):
            msg = os.urandom(n)
            c.sendall(msg)
            assert recv_n(c, n) == msg
    h = f.made[0]
    assert wait_until(lambda: h.closed_ev.is_set())


def test_data_sent_with_the_last_handshake_flight_is_delivered(running, certs):
    # The client's first record follows its Finished at once; the server may
    # decrypt (or buffer) it during the handshake, before on_open registers
    # EV_IN: it must still reach on_read.
    r, acc, f = serve(running, certs)
    for _ in range(10):
        raw = socket.create_connection(acc.addr, timeout=10)
        obj_in, obj_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = certs.client_ctx().wrap_bio(obj_in, obj_out, server_hostname="localhost")
        try:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(obj_out.read())
                    data = raw.recv(65536)
                    assert data
                    obj_in.write(data)
            obj.write(b"early bird")
            raw.sendall(obj_out.read())      # Finished and data in one send
            got = b""
            while len(got) < 10:
                data = raw.recv(65536)
                assert data
                obj_in.write(data)
                try:
                    got += obj.read(100)
                except ssl.SSLWantReadError:
                    pass
            assert got == b"early bird"
        finally:
            raw.close()


def test_close_sends_close_notify(running, certs):
    class Bye(TLSEcho):
        def on_read(self) -> bool:
            data = self.read()
            self.write(b"bye:" + bytes(data))
            return False                     # close after the reply

    r, acc, f = serve(running, certs, cls=Bye)
    with tls_client(certs, acc.addr, suppress_ragged_eofs=False) as c:
        c.sendall(b"x")
        assert recv_n(c, 5) == b"bye:x"
        # A close without close_notify would raise SSLEOFError here.
        assert c.recv(10) == b""


def test_peer_close_without_close_notify_delivers_data_then_eof(running, certs):
    r, acc, f = serve(running, certs)
    c = tls_client(certs, acc.addr)
    try:
        c.sendall(b"last words")
        assert recv_n(c, 10) == b"last words"
        socket.socket.shutdown(c, socket.SHUT_WR)   # FIN, no close_notify
        h = f.made[0]
        assert wait_until(lambda: h.closed_ev.is_set())
        assert h.calls == ["open", ("read", b"last words"), ("read", b""), "close"]
    finally:
        c.close()


def test_garbage_instead_of_client_hello_is_closed_without_callbacks(running, certs):
    r, acc, f = serve(running, certs)
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), b"\x16\x03\x01\xff\xff"):
        with socket.create_connection(acc.addr, timeout=5) as c:
            c.sendall(junk)
            t0 = time.monotonic()
            try:
                while c.recv(65536):                 # an alert, then EOF
                    pass
            except ConnectionResetError:
                pass
            assert time.monotonic() - t0 < 4        # closed, not timed out
    assert wait_until(lambda: len(f.made) == 3)
    assert wait_until(lambda: r.reactor.stats()[0]["handlers"] == 0)
    for h in f.made:
        assert h.calls == [] and h.info == "not opened"
        assert h.closed


def test_silent_client_is_closed_by_the_handshake_timeout(running, certs):
    r, acc, f = serve(running, certs, ssl_handshake_timeout=0.3)
    with socket.create_connection(acc.addr, timeout=5) as c:
        t0 = time.monotonic()
        assert c.recv(100) == b""                    # closed by the server
        took = time.monotonic() - t0
    assert 0.25 <= took < 4
    assert wait_until(lambda: len(f.made) == 1 and f.made[0].closed)
    assert f.made[0].calls == []


def test_client_that_fails_verification_is_refused(running, certs):
    r, acc, f = serve(running, certs)
    bad = ssl.create_default_context()               # does not trust our CA
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_client(certs, acc.addr, ctx=bad)
    assert wait_until(lambda: len(f.made) == 1 and f.made[0].closed)
    assert f.made[0].calls == []


def test_mutual_tls(running, certs):
    sctx = certs.server_ctx()
    sctx.verify_mode = ssl.CERT_REQUIRED
    certs.ca.configure_trust(sctx)
    r, acc, f = serve(running, certs, ctx=sctx)
    cctx = certs.client_ctx()
    certs.client.configure_cert(cctx)
    with tls_client(certs, acc.addr, ctx=cctx) as c:
        c.sendall(b"me")
        assert recv_n(c, 2) == b"me"
    h = f.made[0]
    assert ("DNS", "client.example") in h.info["peercert"]["subjectAltName"]
    assert h.info["peercert_der"] == ssl.PEM_cert_to_DER_cert(
        certs.client.cert_chain_pems[0].bytes().decode())
    # Without a client certificate: refused, and the handler sees nothing.
    n = len(f.made)
    try:
        with tls_client(certs, acc.addr) as c:
            c.sendall(b"x")
            c.recv(10)                               # TLS 1.3: the alert comes here
    except (ssl.SSLError, ConnectionError):
        pass
    assert wait_until(lambda: len(f.made) == n + 1 and f.made[-1].closed)
    assert f.made[-1].calls == []


def test_alpn(running, certs):
    sctx = certs.server_ctx()
    sctx.set_alpn_protocols(["h2", "http/1.1"])
    r, acc, f = serve(running, certs, ctx=sctx)
    cctx = certs.client_ctx()
    cctx.set_alpn_protocols(["http/1.1"])
    with tls_client(certs, acc.addr, ctx=cctx) as c:
        c.sendall(b"a")
        assert recv_n(c, 1) == b"a"
        assert c.selected_alpn_protocol() == "http/1.1"
    assert f.made[0].info["alpn"] == "http/1.1"


class Sender(TLSEcho):
    """Writes `total` bytes in on_open (a pattern), watermarks on."""

    total = 16 << 20

    def __init__(self) -> None:
        super().__init__()
        self.marks: List[Any] = []

    def on_open(self) -> bool:
        self.info = tls_info(self.tls)
        self.calls.append("open")
        self.set_watermarks(1 << 20, 256 << 10)
        chunk = bytes(i % 251 for i in range(1 << 16))
        for _ in range(self.total // len(chunk)):
            self.write(chunk)
        return True

    def on_high_watermark(self, pending: int) -> None:
        self.marks.append(("high", pending))

    def on_low_watermark(self, pending: int) -> None:
        self.marks.append(("low", pending))


def test_16_mib_write_to_a_slow_reader_arrives_intact_with_watermarks(running, certs):
    r, acc, f = serve(running, certs, cls=Sender)
    chunk = bytes(i % 251 for i in range(1 << 16))
    with tls_client(certs, acc.addr, timeout=30) as c:
        time.sleep(0.2)                      # let the output queue up
        got = bytearray()
        while len(got) < Sender.total:
            b = c.recv(1 << 16)
            assert b
            got += b
            if len(got) < (1 << 20):
                time.sleep(0.001)            # slow at first
    assert len(got) == Sender.total
    assert got == chunk * (Sender.total // len(chunk))
    h = f.made[0]
    assert h.marks and h.marks[0][0] == "high" and h.marks[0][1] >= 1 << 20
    assert ("low" in [m[0] for m in h.marks])
    assert wait_until(lambda: h.pending_output_size() == 0 or h.closed)


def test_async_write_from_another_thread_with_callbacks(running, certs):
    r, acc, f = serve(running, certs)
    with tls_client(certs, acc.addr) as c:
        c.sendall(b"!")
        assert recv_n(c, 1) == b"!"
        h = f.made[0]
        done: List[Any] = []
        all_done = threading.Event()
        parts = [os.urandom(1000 + 7919 * i) for i in range(40)]

        def cb(i: int) -> Any:
            def call(err: Any) -> None:
                done.append((i, err, threading.get_ident()))
                if len(done) == len(parts):
                    all_done.set()
            return call

        for i, p in enumerate(parts):
            h.async_write(p, cb(i))
        expected = b"".join(parts)
        assert recv_n(c, len(expected)) == expected
        assert all_done.wait(10)
    assert [d[0] for d in done] == list(range(len(parts)))
    assert all(d[1] is None for d in done)
    assert {d[2] for d in done} == h.threads     # on the poller


def test_reactor_stop_during_handshakes(certs):
    reactor = netpoll.Reactor(poll_num=2)
    f = Factory()
    try:
        acc = netpoll.Acceptor(reactor, "127.0.0.1:0", f, ssl=certs.server_ctx(),
                               ssl_handshake_timeout=30)
        socks = [socket.create_connection(acc.addr, timeout=5) for _ in range(4)]
        assert wait_until(lambda: len(f.made) == 4)
    finally:
        reactor.stop()
    assert reactor.wait_stopped(10)
    for s in socks:
        assert s.recv(10) == b""
        s.close()
    assert all(h.calls == [] and h.closed for h in f.made)


def test_unix_socket(running, certs, tmp_path):
    path = str(tmp_path / "tls.sock")
    r, acc, f = serve(running, certs, address="unix:" + path)
    c = Client(b"over unix")
    netpoll.Connector(r.reactor).connect("unix:" + path, c, 5.0, ssl=certs.client_ctx(),
                                         server_hostname="localhost")
    assert c.done.wait(10), c.calls
    assert bytes(c.got) == b"over unix"
    assert c.info["server_hostname"] == "localhost"


def test_argument_checks(running, certs):
    r = running()
    with pytest.raises(TypeError):
        netpoll.Acceptor(r.reactor, "127.0.0.1:0", TLSEcho, ssl=object())
    with pytest.raises(ValueError):
        netpoll.Acceptor(r.reactor, "127.0.0.1:0", TLSEcho, ssl=certs.client_ctx())
    with pytest.raises(ValueError):
        netpoll.Acceptor(r.reactor, "127.0.0.1:0", TLSEcho, ssl_handshake_timeout=1.0)
    for bad in (0, -1, float("nan"), "1"):
        with pytest.raises((TypeError, ValueError)):
            netpoll.Acceptor(r.reactor, "127.0.0.1:0", TLSEcho, ssl=certs.server_ctx(),
                             ssl_handshake_timeout=bad)
    conn = netpoll.Connector(r.reactor)
    with pytest.raises(ValueError):
        conn.connect("127.0.0.1:1", TLSEcho(), 1.0, ssl=certs.server_ctx())
    with pytest.raises(ValueError):
        conn.connect("127.0.0.1:1", TLSEcho(), 1.0, server_hostname="x")
    with pytest.raises(TypeError):
        conn.connect("127.0.0.1:1", TLSEcho(), 1.0, ssl=certs.client_ctx(), server_hostname=1)
    with pytest.raises(ValueError):                  # check_hostname and no name to check
        conn.connect("unix:/nonexistent", TLSEcho(), 1.0, ssl=certs.client_ctx())


# --------------------------------------------------------------- Connector


class Client(TLSEcho):
    """Connector handler: writes `payload` in on_open, collects the echo."""

    def __init__(self, payload: bytes = b"ping", write_on_open: bool = True) -> None:
        super().__init__()
        self.payload = payload
        self.write_on_open = write_on_open
        self.got = bytearray()
        self.done = threading.Event()

    def on_open(self) -> bool:
        self.info = tls_info(self.tls)
        self.calls.append("open")
        self.get_reactor().add_ev_handler(self, self.fd(), netpoll.EV_IN)
        if self.write_on_open:
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

    def on_connect_fail(self, err: Any) -> None:
        super().on_connect_fail(err)
        self.done.set()


class PyServer:
    """A Python ssl echo server on a thread (or one that misbehaves)."""

    def __init__(self, ctx: Optional[ssl.SSLContext], mode: str = "echo") -> None:
        self.ctx = ctx
        self.mode = mode
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.2)
        self.addr = self.lsock.getsockname()
        self.sni: List[Any] = []
        self.stopping = False
        self.conns: List[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                s, _ = self.lsock.accept()
            except (socket.timeout, OSError):
                continue
            self.conns.append(s)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        s.settimeout(10)
        try:
            if self.mode == "silent":
                s.recv(65536)                    # the ClientHello, never answered
                while not self.stopping:
                    time.sleep(0.05)
                return
            if self.mode == "garbage":
                s.recv(65536)
                s.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 10)
                return
            assert self.ctx is not None
            ss = self.ctx.wrap_socket(s, server_side=True)
            self.conns.append(ss)
            while True:
                d = ss.recv(65536)
                if not d:
                    break
                ss.sendall(d)
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.lsock.close()
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def py_server(certs) -> Iterator[Any]:
    made: List[PyServer] = []

    def make(mode: str = "echo", ctx: Optional[ssl.SSLContext] = None) -> PyServer:
        if ctx is None and mode == "echo":
            ctx = certs.server_ctx()
        s = PyServer(ctx, mode)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_connector_against_python_ssl_server(running, certs, py_server):
    srv = py_server()
    seen: List[Any] = []
    ctx = certs.server_ctx()

    def sni(obj: Any, name: Any, c: Any) -> None:
        seen.append(name)
    ctx.sni_callback = sni
    srv.ctx = ctx
    r = running()
    c = Client(os.urandom(300000))
    netpoll.Connector(r.reactor).connect(srv.addr, c, 5.0, ssl=certs.client_ctx(),
                                         server_hostname="localhost")
    assert c.done.wait(15), c.calls
    assert c.error is None
    assert bytes(c.got) == c.payload
    assert seen == ["localhost"]
    assert c.info["server_hostname"] == "localhost"
    assert c.info["version"] == "TLSv1.3"
    assert c.info["peercert"]["subjectAltName"][0] == ("DNS", "localhost")
    assert c.info["peercert_der"] == ssl.PEM_cert_to_DER_cert(
        certs.server.cert_chain_pems[0].bytes().decode())
    c.destroy()
    assert wait_until(lambda: c.closed_ev.is_set())
    assert c.calls[0] == "open" and c.calls[-1] == "close" and "fail" not in c.calls


def test_connector_to_netpoll_acceptor_default_hostname(running, certs):
    r, acc, f = serve(running, certs, poll_num=2)
    clients = [Client(b"n%d" % i * 1000) for i in range(6)]
    # Both directions full at once: netpoll encrypts and decrypts on each side.
    clients.append(Client(os.urandom(4 << 20)))
    for c in clients:
        # The host of the address is the name to check: 127.0.0.1 is in the cert.
        netpoll.Connector(r.reactor).connect(acc.addr, c, 5.0, ssl=certs.client_ctx())
    for c in clients:
        assert c.done.wait(15), c.calls
        assert bytes(c.got) == c.payload
        assert c.info["server_hostname"] == "127.0.0.1"


def test_connector_writes_before_open_are_sent_after_the_handshake(running, certs):
    r, acc, f = serve(running, certs)
    c = Client(b"queued early" * 100, write_on_open=False)
    netpoll.Connector(r.reactor).connect(acc.addr, c, 5.0, ssl=certs.client_ctx(),
                                         server_hostname="localhost")
    done = threading.Event()
    res: List[Any] = []
    # connect() attached the handler: the bytes queue until the handshake ends.
    c.async_write(c.payload, lambda err: (res.append(err), done.set()))
    assert done.wait(10) and res == [None]
    assert c.done.wait(10)
    assert bytes(c.got) == c.payload


def test_connector_certificate_not_trusted(running, certs, py_server):
    srv = py_server()
    r = running()
    c = Client()
    netpoll.Connector(r.reactor).connect(srv.addr, c, 5.0, ssl=certs.client_ctx(trust=False),
                                         server_hostname="localhost")
    assert c.done.wait(10)
    assert isinstance(c.error, ssl.SSLCertVerificationError)
    assert c.error.verify_code != 0
    assert c.calls == ["fail"]


def test_connector_hostname_mismatch(running, certs, py_server):
    srv = py_server()
    r = running()
    c = Client()
    netpoll.Connector(r.reactor).connect(srv.addr, c, 5.0, ssl=certs.client_ctx(),
                                         server_hostname="other.example")
    assert c.done.wait(10)
    assert isinstance(c.error, ssl.SSLCertVerificationError)
    assert "mismatch" in str(c.error) or "Hostname" in str(c.error)
    assert c.calls == ["fail"]


def test_connector_server_that_is_not_tls(running, certs, py_server):
    srv = py_server("garbage")
    r = running()
    c = Client()
    netpoll.Connector(r.reactor).connect(srv.addr, c, 5.0, ssl=certs.client_ctx(),
                                         server_hostname="localhost")
    assert c.done.wait(10)
    assert isinstance(c.error, netpoll.TLSError) and isinstance(c.error, ssl.SSLError)
    assert c.calls == ["fail"]


def test_connector_handshake_timeout(running, certs, py_server):
    srv = py_server("silent")
    r = running()
    c = Client()
    t0 = time.monotonic()
    netpoll.Connector(r.reactor).connect(srv.addr, c, 0.3, ssl=certs.client_ctx(),
                                         server_hostname="localhost")
    assert c.done.wait(10)
    took = time.monotonic() - t0
    assert isinstance(c.error, netpoll.DialTimeoutError) and isinstance(c.error, TimeoutError)
    assert "TLS handshake" in str(c.error)
    assert 0.25 <= took < 5
    assert c.calls == ["fail"]


def test_connector_handshake_timeout_after_an_immediate_connect(running, certs, tmp_path):
    # A Unix socket connects at once (no connect timer runs): the handshake
    # gets its own timer, from the same `timeout`.
    path = str(tmp_path / "silent.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lsock.bind(path)
        lsock.listen(8)                      # never accepts: nobody answers
        r = running()
        c = Client()
        t0 = time.monotonic()
        netpoll.Connector(r.reactor).connect("unix:" + path, c, 0.3, ssl=certs.client_ctx(),
                                             server_hostname="localhost")
        assert c.done.wait(10)
        took = time.monotonic() - t0
        assert isinstance(c.error, netpoll.DialTimeoutError)
        assert "TLS handshake" in str(c.error)
        assert 0.25 <= took < 5
        assert c.calls == ["fail"]
    finally:
        lsock.close()


def test_connector_destroy_during_handshake(running, certs, py_server):
    srv = py_server("silent")
    r = running()
    c = Client()
    netpoll.Connector(r.reactor).connect(srv.addr, c, 30.0, ssl=certs.client_ctx(),
                                         server_hostname="localhost")
    time.sleep(0.2)                          # connected; the ClientHello is unanswered
    c.destroy()
    assert c.done.wait(10)
    assert isinstance(c.error, ConnectionAbortedError)
    assert c.calls == ["fail"]
    assert c.fd() == -1


# ------------------------------------------------------------------ example


def test_reactor_echo_example_with_tls(certs, tmp_path):
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    certs.server.cert_chain_pems[0].write_to_path(str(cert))
    certs.server.private_key_pem.write_to_path(str(key))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "reactor_echo.py"),
                          "--port", str(port), "--tls", str(cert), str(key)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        line = p.stdout.readline()
        assert b"TLS" in line, p.stderr.read().decode()
        with tls_client(certs, ("127.0.0.1", port)) as c:
            msg = b"secret echo " * 1000
            c.sendall(msg)
            assert recv_n(c, len(msg)) == msg
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0, p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        p.stdout.close()
        p.stderr.close()
