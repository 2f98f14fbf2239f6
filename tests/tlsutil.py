"""Shared helpers for tests/test_tls*.py: certificates made at test time with
trustme, server and client ``ssl.SSLContext`` factories, PEM files on disk for
openssl/curl/redis-benchmark and the examples, a netpoll TLS server fixture
that always shuts down, and a threaded server speaking Python's own ``ssl``.

Import the fixtures into a test module with
``from tlsutil import certs, make_tls_server  # noqa: F401``.
"""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

import netpoll
from netutil import Server

from opensslca import import_trustme

trustme = import_trustme()     # or its stand-in made with the openssl tool

CLIENT_IDENTITY = "client@example.org"

# The environment for external tools (openssl, curl, wrk, redis-benchmark):
# they are not instrumented, and under .ci/asan's LD_PRELOAD of libasan curl
# hangs; nor should a developer's SSLKEYLOGFILE reach them.
TOOL_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "SSLKEYLOGFILE")}


def has_tls_api() -> bool:
    """True once create_listener takes ssl= (issue 14's TLS core)."""
    import inspect
    try:
        return "ssl" in inspect.signature(netpoll.create_listener).parameters
    except (TypeError, ValueError):
        return False


def _no_keylog(ctx: ssl.SSLContext) -> None:
    # create_default_context() honours $SSLKEYLOGFILE, and netpoll refuses
    # contexts with a key log (Python's callback would get our SSL objects):
    # a developer's environment must not turn every test into a ValueError.
    ctx.keylog_filename = None  # type: ignore[assignment]


class Certs:
    """A CA, a server certificate for 127.0.0.1/localhost/::1, a client
    certificate, a second CA that signed neither, and all of them as PEM
    files in `dir`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()          # trusts nothing we serve
        self.server = self.ca.issue_cert("127.0.0.1", "localhost", "::1")
        self.client = self.ca.issue_cert(CLIENT_IDENTITY, common_name="netpoll test client")
        self.ca_pem = str(directory / "ca.pem")
        self.other_ca_pem = str(directory / "other-ca.pem")
        self.server_cert_pem = str(directory / "server.pem")     # leaf + chain
        self.server_key_pem = str(directory / "server.key")
        self.client_cert_pem = str(directory / "client.pem")
        self.client_key_pem = str(directory / "client.key")
        self.ca.cert_pem.write_to_path(self.ca_pem)
        self.other_ca.cert_pem.write_to_path(self.other_ca_pem)
        for leaf, cert_path, key_path in (
                (self.server, self.server_cert_pem, self.server_key_pem),
                (self.client, self.client_cert_pem, self.client_key_pem)):
            with open(cert_path, "wb") as f:
                for blob in leaf.cert_chain_pems:
                    f.write(blob.bytes())
            leaf.private_key_pem.write_to_path(key_path)

    @property
    def server_der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.server.cert_chain_pems[0].bytes().decode())

    @property
    def client_der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.client.cert_chain_pems[0].bytes().decode())

    def server_context(self, *, require_client_cert: bool = False,
                       alpn: Optional[List[str]] = None,
                       maximum_version: Optional[ssl.TLSVersion] = None,
                       minimum_version: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        _no_keylog(ctx)
        self.server.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        if maximum_version is not None:
            ctx.maximum_version = maximum_version
        if minimum_version is not None:
            ctx.minimum_version = minimum_version
        return ctx

    def client_context(self, *, with_cert: bool = False, trust: str = "ca",
                       alpn: Optional[List[str]] = None,
                       maximum_version: Optional[ssl.TLSVersion] = None,
                       minimum_version: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
        """trust: "ca" (ours), "other" (a CA that signed nothing we serve)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        _no_keylog(ctx)
        (self.ca if trust == "ca" else self.other_ca).configure_trust(ctx)
        if with_cert:
            self.client.configure_cert(ctx)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        if maximum_version is not None:
            ctx.maximum_version = maximum_version
        if minimum_version is not None:
            ctx.minimum_version = minimum_version
        return ctx


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls"))


# ----------------------------------------------------------- netpoll server

class TLSServer(Server):
    """netutil.Server with a TLS listener: the same fixture behaviour
    (serve() on a thread, shutdown at teardown), plus TLS clients."""

    def __init__(self, on_request: Any, ssl_context: ssl.SSLContext, network: str = "tcp",
                 ssl_handshake_timeout: Optional[float] = None, **loop_kw: Any) -> None:
        # Server.__init__ with ssl= on the listener (netutil's fixture is
        # shared with the plain tests, so it is not changed here).
        self.network = network
        self._dir: Optional[str] = None
        if network == "unix":
            self._dir = tempfile.mkdtemp(prefix="npt-", dir="/tmp")
            address: Any = os.path.join(self._dir, "s.sock")
        elif network == "tcp6":
            address = "[::1]:0"
        else:
            address = "127.0.0.1:0"
        kw: Dict[str, Any] = {}
        if ssl_handshake_timeout is not None:
            kw["ssl_handshake_timeout"] = ssl_handshake_timeout
        self.listener = netpoll.create_listener(network, address, ssl=ssl_context, **kw)
        self.addr = self.listener.addr
        self.loop = netpoll.EventLoop(on_request, **loop_kw)
        self.serve_result: Any = "not returned"
        self.serve_error: Optional[BaseException] = None
        self._socks: List[socket.socket] = []
        self._dialed: List[Any] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="np-serve", daemon=True)
        self._thread.start()

    def connect_tls(self, ctx: ssl.SSLContext, server_hostname: Optional[str] = "127.0.0.1",
                    timeout: float = 10.0, **wrap_kw: Any) -> ssl.SSLSocket:
        """A blocking Python ssl client, handshaken."""
        raw = self.connect(timeout)
        s = ctx.wrap_socket(raw, server_hostname=server_hostname, **wrap_kw)
        self._socks.append(s)
        return s

    def dial_tls(self, ctx: ssl.SSLContext, timeout: float = 5.0,
                 server_hostname: Optional[str] = None, **dialer_kw: Any) -> Any:
        conn = netpoll.Dialer(**dialer_kw).dial_connection(
            self.network, self.addr, timeout=timeout, ssl=ctx, server_hostname=server_hostname)
        self._dialed.append(conn)
        return conn


@pytest.fixture
def make_tls_server(certs):
    """make_tls_server(on_request, ctx=None, network="tcp", ssl_handshake_timeout=None,
    **EventLoop kwargs) -> TLSServer (ctx defaults to certs.server_context());
    every server is shut down at teardown."""
    servers: List[TLSServer] = []

    def make(on_request: Any, ctx: Optional[ssl.SSLContext] = None, network: str = "tcp",
             ssl_handshake_timeout: Optional[float] = None, **kw: Any) -> TLSServer:
        srv = TLSServer(on_request, ctx or certs.server_context(), network,
                        ssl_handshake_timeout, **kw)
        servers.append(srv)
        return srv

    yield make
    errors = []
    for srv in servers:
        try:
            srv.shutdown()
        except BaseException as e:
            errors.append(e)
    if errors:
        raise errors[0]


# ------------------------------------------------------- Python ssl server

class PySSLServer:
    """A blocking server speaking Python's ssl module, a thread per
    connection: handler(ssl_socket) runs for each accepted connection (a
    failed handshake is recorded in `errors`, not raised). TCP on 127.0.0.1
    or a Unix socket."""

    def __init__(self, ctx: ssl.SSLContext, handler: Callable[[ssl.SSLSocket], Any],
                 network: str = "tcp", suppress_ragged_eofs: bool = True) -> None:
        self.ctx = ctx
        self.suppress_ragged_eofs = suppress_ragged_eofs
        self.handler = handler
        self.network = network
        self._dir: Optional[str] = None
        if network == "unix":
            self._dir = tempfile.mkdtemp(prefix="npt-", dir="/tmp")
            self.addr: Any = os.path.join(self._dir, "s.sock")
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(self.addr)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.addr = self.sock.getsockname()
        self.sock.listen(64)
        self.errors: List[BaseException] = []
        self.handled = threading.Event()
        self._threads: List[threading.Thread] = []
        self._conns: List[socket.socket] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._accepter = threading.Thread(target=self._accept_loop, name="py-ssl-accept",
                                          daemon=True)
        self._accepter.start()

    @property
    def address(self) -> Any:
        """The address in netpoll's form ("127.0.0.1:PORT" or a path)."""
        return self.addr if self.network == "unix" else f"127.0.0.1:{self.addr[1]}"

    def _accept_loop(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return                      # closed by stop()
            with self._lock:
                if self._stopping:
                    raw.close()
                    return
                self._conns.append(raw)
                t = threading.Thread(target=self._serve_one, args=(raw,),
                                     name="py-ssl-conn", daemon=True)
                self._threads.append(t)
            t.start()

    def _serve_one(self, raw: socket.socket) -> None:
        raw.settimeout(20)
        try:
            s = self.ctx.wrap_socket(raw, server_side=True,
                                     suppress_ragged_eofs=self.suppress_ragged_eofs)
        except (OSError, ssl.SSLError) as e:
            with self._lock:
                self.errors.append(e)
            raw.close()
            return
        try:
            self.handler(s)
        except BaseException as e:  # recorded for the test to inspect
            with self._lock:
                self.errors.append(e)
        finally:
            self.handled.set()
            try:
                s.close()
            except OSError:
                pass

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            conns = list(self._conns)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accepter.join(10)
        for t in self._threads:
            t.join(10)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        assert not self._accepter.is_alive()


@pytest.fixture
def make_py_server():
    """make_py_server(ctx, handler, network="tcp") -> PySSLServer, stopped at teardown."""
    made: List[PySSLServer] = []

    def make(ctx: ssl.SSLContext, handler: Callable[[ssl.SSLSocket], Any],
             network: str = "tcp", **kw: Any) -> PySSLServer:
        srv = PySSLServer(ctx, handler, network, **kw)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()


def py_echo(s: ssl.SSLSocket) -> None:
    """Echo until the peer ends the stream (close_notify or a ragged EOF)."""
    while True:
        try:
            data = s.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            return
        if not data:
            return
        s.sendall(data)


def recv_exact_tls(s: Any, n: int) -> bytes:
    """Exactly n bytes from a (possibly ssl) socket; EOFError on an early EOF."""
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise EOFError(f"peer closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def tls_sees_eof(s: Any, timeout: float = 5.0) -> bool:
    """True if the TLS (or plain) peer ended the stream within `timeout`:
    close_notify, a TCP EOF, a reset or a fatal alert. Data is drained."""
    import time
    deadline = time.monotonic() + timeout
    old = s.gettimeout()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            s.settimeout(left)
            try:
                data = s.recv(65536)
            except (socket.timeout, TimeoutError):
                return False
            except (ConnectionError, ssl.SSLError, OSError):
                return True
            if not data:
                return True
    finally:
        try:
            s.settimeout(old)
        except OSError:
            pass


class BioClient:
    """A TLS client over a blocking socket through Python's ssl.SSLObject
    and memory BIOs, so the test decides how the bytes go out: one byte per
    TCP segment, several records in one write, close_notify without a FIN."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext,
                 server_hostname: Optional[str] = "127.0.0.1") -> None:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    def _send(self, data: bytes, chunk: int) -> None:
        for i in range(0, len(data), chunk):
            self.sock.sendall(data[i:i + chunk])

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def handshake(self, chunk: int = 1 << 20) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self._send(self.outgoing.read(), chunk)
                return
            except ssl.SSLWantReadError:
                self._send(self.outgoing.read(), chunk)
                if not self._fill():
                    raise ConnectionError("EOF during the handshake") from None

    def send(self, data: bytes, chunk: int = 1 << 20, records: int = 1) -> None:
        """`data` as `records` TLS records, sent `chunk` bytes per write."""
        step = max(1, -(-len(data) // records))
        for i in range(0, len(data), step):
            self.obj.write(data[i:i + step])
        self._send(self.outgoing.read(), chunk)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                out += self.obj.read(n - len(out))
            except ssl.SSLWantReadError:
                if not self._fill():
                    raise EOFError(f"EOF after {len(out)} of {n} bytes") from None
            except ssl.SSLZeroReturnError:
                raise EOFError(f"close_notify after {len(out)} of {n} bytes") from None
        return bytes(out)

    def send_close_notify(self) -> None:
        """close_notify only: no FIN, and without waiting for the peer's."""
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._send(self.outgoing.read(), 1 << 20)
