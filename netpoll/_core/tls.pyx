# TLS sessions (see tls.pxd for the model and the thread rule).
#
# The SSL_CTX comes from the user's ssl.SSLContext: certificates, keys, CA
# store, verification mode, protocol range, ciphers and ALPN stay configured
# the standard way. That is only sound when this module and Python's _ssl
# share one libssl in the process (an SSL_CTX of one copy of OpenSSL passed
# to another is memory corruption), so _shared_library() proves it before the
# first use, and contexts whose Python callbacks would receive our SSL objects
# instead of Python's (sni_callback, keylog) are refused.

import ssl as _ssl_mod
import tempfile

from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree
from cpython.ref cimport PyObject
from libc.limits cimport INT_MAX
from libc.stdint cimport int64_t
from libc.string cimport memset, memcpy, strlen, strncpy
from libc.stdlib cimport free

from netpoll._core.includes.openssl cimport (
    SSL_CTX, BIO, BIO_METHOD, X509, SSL_CIPHER,
    SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE, SSL_ERROR_SYSCALL,
    SSL_ERROR_ZERO_RETURN, SSL_MODE_ENABLE_PARTIAL_WRITE, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER,
    SSL_VERIFY_NONE, SSL_VERIFY_PEER, SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
    SSL_OP_NO_RENEGOTIATION, SSL_OP_IGNORE_UNEXPECTED_EOF,
    SSL_new, SSL_free, SSL_set_accept_state, SSL_set_connect_state, SSL_set_bio,
    SSL_do_handshake, SSL_read, SSL_write, SSL_shutdown, SSL_get_error, SSL_has_pending,
    SSL_set_mode, SSL_set_read_ahead, SSL_get_verify_mode, SSL_get_verify_result,
    SSL_set_tlsext_host_name, SSL_get0_param, SSL_get_version, SSL_get_current_cipher,
    SSL_CIPHER_get_name, SSL_CIPHER_get_version, SSL_CIPHER_get_bits, SSL_get0_alpn_selected,
    SSL_CTX_get_verify_mode,
    X509_VERIFY_PARAM_set1_host, X509_VERIFY_PARAM_set1_ip_asc, X509_verify_cert_error_string,
    X509_V_OK, i2d_X509, X509_free,
    BIO_TYPE_SOURCE_SINK, BIO_CTRL_FLUSH, BIO_get_new_index, BIO_meth_new, BIO_meth_set_write,
    BIO_meth_set_read, BIO_meth_set_ctrl, BIO_meth_set_create, BIO_new, BIO_set_data,
    BIO_get_data, BIO_set_init, BIO_set_retry_read, BIO_set_retry_write, BIO_clear_retry_flags,
    ERR_get_error, ERR_peek_error, ERR_clear_error, ERR_error_string_n, OpenSSL_version_num,
    OPENSSL_free,
    np_SSL_get1_peer_certificate, np_SSL_set_options, np_SSL_CTX_get_options,
)
from netpoll._core.includes.system cimport (
    iovec, errno, EAGAIN, EWOULDBLOCK, EINTR, EPIPE, poll, pollfd, POLLIN,
    POLLOUT, pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
    pthread_mutex_unlock, np_monotonic_ns, np_set_errno,
)
from netpoll._core.linkbuffer cimport np_lb_t, np_lb_iovecs, np_lb_consume, np_lb_release
from netpoll._core.sockio cimport np_recv, np_send

from netpoll.errors import TLSError

cdef extern from "<errno.h>" nogil:
    int EPROTO

cdef extern from "<string.h>" nogil:
    char *strdup(const char *s)

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *path, int mode)
    void *dlsym(void *handle, const char *name)
    int dlclose(void *handle)
    int RTLD_NOW, RTLD_NOLOAD

cdef extern from *:
    """
    #include <openssl/ssl.h>
    /* CPython's _ssl._SSLContext starts with the SSL_CTX pointer after the
       object header, in every release since 3.0 (Modules/_ssl.c). */
    typedef struct { PyObject_HEAD SSL_CTX *ctx; } np_PySSLContext;
    static void *np_ssl_ctx_new_addr(void) { return (void *)&SSL_CTX_new; }
    """
    ctypedef struct np_PySSLContext:
        SSL_CTX *ctx
    void *np_ssl_ctx_new_addr() nogil

cdef enum:
    GATHER = 16384          # plaintext per record: small writes are coalesced up to this

# ------------------------------------------------------------------ the BIO
#
# recv/send on the session's fd. Returning -1 with a retry flag is OpenSSL's
# "would block"; any other -1 leaves the errno in t.sys_errno, where the
# SSL_ERROR_SYSCALL handling below finds it (errno itself may be clobbered by
# the time SSL_get_error returns).

cdef inline int _bio_result(BIO *b, ssize_t r, bint writing) noexcept nogil:
    cdef np_tls_t *t
    if r >= 0:
        return <int>r
    if errno == EAGAIN or errno == EWOULDBLOCK:
        if writing:
            BIO_set_retry_write(b)
        else:
            BIO_set_retry_read(b)
    else:
        t = <np_tls_t *>BIO_get_data(b)
        t.sys_errno = errno
    return -1


cdef int _bio_read(BIO *b, char *buf, int n) noexcept nogil:
    BIO_clear_retry_flags(b)
    return _bio_result(b, np_recv((<np_tls_t *>BIO_get_data(b)).fd, buf, <size_t>n), False)


cdef int _bio_write(BIO *b, const char *buf, int n) noexcept nogil:
    BIO_clear_retry_flags(b)
    return _bio_result(b, np_send((<np_tls_t *>BIO_get_data(b)).fd, buf, <size_t>n), True)


cdef long _bio_ctrl(BIO *b, int cmd, long num, void *ptr) noexcept nogil:
    # Writes go straight to the socket: a flush (which the handshake asks
    # for after each flight) has nothing to do and must report success.
    if cmd == BIO_CTRL_FLUSH:
        return 1
    return 0


cdef int _bio_create(BIO *b) noexcept nogil:
    BIO_set_init(b, 1)
    return 1


cdef BIO_METHOD *_new_bio_method() except NULL:
    cdef BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK,
                                      b"netpoll socket")
    if m == NULL:
        raise MemoryError()
    BIO_meth_set_write(m, _bio_write)
    BIO_meth_set_read(m, _bio_read)
    BIO_meth_set_ctrl(m, _bio_ctrl)
    BIO_meth_set_create(m, _bio_create)
    return m


# Made at import (one thread, also without the GIL); never freed.
cdef BIO_METHOD *_bio_method = _new_bio_method()

# ------------------------------------------------------- the session (C)

cdef inline void _clear_errors() noexcept nogil:
    # SSL_get_error() reads this thread's error queue, which must be empty
    # before the call it explains; another user of OpenSSL on this thread
    # (Python's ssl module) may have left something there. Peeking is much
    # cheaper than ERR_clear_error() on OpenSSL 3, and the queue is nearly
    # always empty.
    if ERR_peek_error() != 0:
        ERR_clear_error()


cdef void _fail_locked(np_tls_t *t, int ssl_error) noexcept nogil:
    """Record why the session failed (lock held): the first queued OpenSSL
    error, or the socket error, or an EOF in the middle of the protocol."""
    cdef unsigned long e
    t.failed = 1
    if t.reason[0]:
        return
    e = ERR_get_error()
    if e != 0:
        ERR_error_string_n(e, t.reason, sizeof(t.reason))
    elif ssl_error == SSL_ERROR_SYSCALL and t.sys_errno != 0:
        strncpy(t.reason, b"socket error", sizeof(t.reason) - 1)
    elif ssl_error == SSL_ERROR_SYSCALL or ssl_error == SSL_ERROR_ZERO_RETURN:
        strncpy(t.reason, b"the peer closed the connection during the handshake",
                sizeof(t.reason) - 1)
    else:
        strncpy(t.reason, b"TLS protocol error", sizeof(t.reason) - 1)
    ERR_clear_error()


cdef int np_tls_handshake(np_tls_t *t) noexcept nogil:
    cdef int r, e
    pthread_mutex_lock(&t.lock)
    if t.failed:
        pthread_mutex_unlock(&t.lock)
        return TLS_FAILED
    _clear_errors()
    r = SSL_do_handshake(t.ssl)
    if r == 1:
        pthread_mutex_unlock(&t.lock)
        return TLS_DONE
    e = SSL_get_error(t.ssl, r)
    if e == SSL_ERROR_WANT_READ:
        r = TLS_WANT_READ
    elif e == SSL_ERROR_WANT_WRITE:
        r = TLS_WANT_WRITE
    else:
        t.verify_result = SSL_get_verify_result(t.ssl)
        _fail_locked(t, e)
        r = TLS_FAILED
    pthread_mutex_unlock(&t.lock)
    return r


cdef ssize_t np_tls_recv(np_tls_t *t, char *buf, size_t n) noexcept nogil:
    return np_tls_recv_more(t, buf, n, NULL)


cdef ssize_t np_tls_recv_more(np_tls_t *t, char *buf, size_t n, bint *more) noexcept nogil:
    cdef int r, e, err = 0
    if more != NULL:
        more[0] = False
    if n > <size_t>INT_MAX:
        n = <size_t>INT_MAX
    pthread_mutex_lock(&t.lock)
    if t.failed:
        pthread_mutex_unlock(&t.lock)
        np_set_errno(EPROTO)
        return -1
    _clear_errors()
    r = SSL_read(t.ssl, buf, <int>n)
    if r > 0:
        if more != NULL:
            # np_tls_pending()'s answer, under the lock already held: a
            # short read then costs one lock round, not two.
            more[0] = SSL_has_pending(t.ssl) != 0
        pthread_mutex_unlock(&t.lock)
        return r
    e = SSL_get_error(t.ssl, r)
    if e == SSL_ERROR_WANT_READ:
        err = EAGAIN
    elif e == SSL_ERROR_WANT_WRITE:
        # A reply (a TLS 1.3 key update) did not fit in the socket: the
        # owner retries the read when the socket is writable.
        t.read_wants_write = 1
        err = EAGAIN
    elif e == SSL_ERROR_ZERO_RETURN:
        err = 0                  # close_notify (or a FIN: IGNORE_UNEXPECTED_EOF)
    elif e == SSL_ERROR_SYSCALL and t.sys_errno == 0:
        err = 0                  # a FIN where OpenSSL wanted more
    elif e == SSL_ERROR_SYSCALL:
        err = t.sys_errno
        t.failed = 1
    else:
        _fail_locked(t, e)
        err = EPROTO
    pthread_mutex_unlock(&t.lock)
    if err == 0:
        return 0
    np_set_errno(err)
    return -1


cdef inline int _write_locked(np_tls_t *t, const char *p, size_t n) noexcept nogil:
    """One SSL_write: > 0 bytes taken, 0 would block, -errno."""
    cdef int r, e
    _clear_errors()
    r = SSL_write(t.ssl, p, <int>n)
    if r > 0:
        return r
    e = SSL_get_error(t.ssl, r)
    if e == SSL_ERROR_WANT_WRITE:
        return 0
    if e == SSL_ERROR_SYSCALL and t.sys_errno != 0:
        t.failed = 1
        return -t.sys_errno
    # WANT_READ cannot happen without renegotiation (refused); anything else
    # is a protocol failure.
    _fail_locked(t, e)
    return -EPROTO if e != SSL_ERROR_SYSCALL else -EPIPE


cdef int np_tls_send_lb(np_tls_t *t, np_lb_t *lb) noexcept nogil:
    # A retried SSL_write must offer the same bytes it offered when it
    # would block (OpenSSL has encrypted them already): they are still the
    # front of lb, since nothing is consumed until SSL_write accepts it, and
    # the offer never shrinks (lb only grows meanwhile).
    # ACCEPT_MOVING_WRITE_BUFFER lets the gathered copy live at another address.
    cdef iovec iov[16]
    cdef char gather[GATHER]
    cdef size_t total, n, take
    cdef const char *p
    cdef int cnt, i, r
    while True:
        cnt = np_lb_iovecs(lb, iov, 16, &total)
        if cnt == 0:
            np_lb_release(lb)
            return 0
        if cnt == 1 or iov[0].iov_len >= GATHER:
            p = <const char *>iov[0].iov_base
            n = iov[0].iov_len
        else:
            # Several small regions (many writes flushed together): one
            # record for them rather than a record and a send() each.
            n = 0
            for i in range(cnt):
                take = iov[i].iov_len
                if take > GATHER - n:
                    take = GATHER - n
                memcpy(gather + n, iov[i].iov_base, take)
                n += take
                if n == GATHER:
                    break
            p = gather
        if n > <size_t>INT_MAX:
            n = <size_t>INT_MAX
        pthread_mutex_lock(&t.lock)
        if t.failed:
            pthread_mutex_unlock(&t.lock)
            return -EPIPE
        r = _write_locked(t, p, n)
        pthread_mutex_unlock(&t.lock)
        if r > 0:
            np_lb_consume(lb, <size_t>r, <size_t>r == total)
            if <size_t>r == total:
                return 0
            continue
        if r == 0:
            return 1
        return r


cdef int np_tls_close_notify(np_tls_t *t) noexcept nogil:
    cdef int r, e, st = 0
    pthread_mutex_lock(&t.lock)
    if t.failed or t.notify_sent:
        t.notify_sent = 1        # nothing (more) can be sent: done either way
        pthread_mutex_unlock(&t.lock)
        return 0
    _clear_errors()
    r = SSL_shutdown(t.ssl)
    if r >= 0:
        t.notify_sent = 1        # 0: sent, the peer's not seen yet; 1: both
    else:
        e = SSL_get_error(t.ssl, r)
        if e == SSL_ERROR_WANT_WRITE:
            st = 1
        elif e == SSL_ERROR_WANT_READ:
            t.notify_sent = 1    # sent; OpenSSL would like to read the reply
        else:
            t.failed = 1
            st = -(t.sys_errno if t.sys_errno else EPIPE)
    ERR_clear_error()
    pthread_mutex_unlock(&t.lock)
    return st


cdef bint np_tls_pending(np_tls_t *t) noexcept nogil:
    cdef bint r
    pthread_mutex_lock(&t.lock)
    r = not t.failed and SSL_has_pending(t.ssl) != 0
    pthread_mutex_unlock(&t.lock)
    return r


cdef void np_tls_free(np_tls_t *t) noexcept nogil:
    if t == NULL:
        return
    if t.ssl != NULL:
        SSL_free(t.ssl)          # frees the BIO; never the fd
    if t.hostname != NULL:
        free(t.hostname)
    pthread_mutex_destroy(&t.lock)
    PyMem_RawFree(t)


cdef int _handshake_wait(np_tls_t *t, int64_t deadline) noexcept nogil:
    """Handshake on a non-blocking fd, poll()ing it until done or `deadline`
    (monotonic ns, < 0: none). TLS_DONE, TLS_FAILED or TLS_TIMEOUT."""
    cdef pollfd pfd
    cdef int r, ms
    cdef int64_t now
    while True:
        r = np_tls_handshake(t)
        if r == TLS_DONE or r == TLS_FAILED:
            return r
        ms = -1
        if deadline >= 0:
            now = np_monotonic_ns()
            if now >= deadline:
                return TLS_TIMEOUT
            ms = <int>((deadline - now + 999999) // 1000000)
        pfd.fd = t.fd
        pfd.events = POLLIN if r == TLS_WANT_READ else POLLOUT
        pfd.revents = 0
        if poll(&pfd, 1, ms) < 0 and errno != EINTR:
            pthread_mutex_lock(&t.lock)
            t.sys_errno = errno
            _fail_locked(t, SSL_ERROR_SYSCALL)
            pthread_mutex_unlock(&t.lock)
            return TLS_FAILED

# --------------------------------------------------- contexts (Python side)

cdef int _library_state = 0     # 0 unknown, 1 shared with Python's ssl, -1 not


cdef int _shared_library() except -1:
    """1 if Python's _ssl module resolved SSL_CTX_new to the very function
    this module calls (one libssl in the process), else raise."""
    global _library_state
    cdef void *h
    cdef void *theirs = NULL
    if _library_state == 1:
        return 1
    import _ssl
    path = getattr(_ssl, "__file__", None)
    if path is not None:
        h = dlopen(path.encode(), RTLD_NOW | RTLD_NOLOAD)
        if h != NULL:
            theirs = dlsym(h, b"SSL_CTX_new")
            dlclose(h)
    if theirs == NULL or theirs != np_ssl_ctx_new_addr():
        _library_state = -1
        raise RuntimeError(
            "netpoll's TLS needs the OpenSSL library that Python's ssl module uses, and "
            f"this Python carries another one ({_ssl_mod.OPENSSL_VERSION}; netpoll was "
            f"built against 0x{OpenSSL_version_num():x}): build netpoll from source on "
            "this machine (pip install --no-binary netpoll netpoll)")
    _library_state = 1
    return 1


_VERIFY_BITS = {
    _ssl_mod.CERT_NONE: SSL_VERIFY_NONE,
    _ssl_mod.CERT_OPTIONAL: SSL_VERIFY_PEER,
    _ssl_mod.CERT_REQUIRED: SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
}


cdef SSL_CTX *_ctx_of(object sslctx, bint server) except NULL:
    """The SSL_CTX inside an ssl.SSLContext, after checking that it is one,
    that it suits the side, and that nothing in it calls back into Python."""
    cdef SSL_CTX *ctx
    if not isinstance(sslctx, _ssl_mod.SSLContext):
        raise TypeError(f"ssl must be an ssl.SSLContext, not {type(sslctx).__name__}")
    if server and sslctx.protocol == _ssl_mod.PROTOCOL_TLS_CLIENT:
        raise ValueError("a server needs a server context (ssl.PROTOCOL_TLS_SERVER, or "
                         "ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))")
    if not server and sslctx.protocol == _ssl_mod.PROTOCOL_TLS_SERVER:
        raise ValueError("a client needs a client context (ssl.PROTOCOL_TLS_CLIENT, or "
                         "ssl.create_default_context())")
    # These run Python callbacks that expect Python's own SSL objects.
    if sslctx.sni_callback is not None:
        raise ValueError("netpoll does not support SSLContext.sni_callback")
    if getattr(sslctx, "keylog_filename", None) is not None:
        raise ValueError("netpoll does not support SSLContext.keylog_filename "
                         "(is SSLKEYLOGFILE set?)")
    if getattr(sslctx, "_msg_callback", None) is not None:
        raise ValueError("netpoll does not support SSLContext._msg_callback")
    _shared_library()
    ctx = (<np_PySSLContext *><PyObject *>sslctx).ctx
    # The layout is CPython's, not an API: cross-check it against two values
    # read through the Python API before trusting the pointer.
    if (ctx == NULL or np_SSL_CTX_get_options(ctx) != <unsigned long long>int(sslctx.options)
            or (SSL_CTX_get_verify_mode(ctx) & 3) != _VERIFY_BITS[sslctx.verify_mode]):
        raise RuntimeError("cannot use this ssl.SSLContext with netpoll (unexpected layout)")
    return ctx


def check_context(sslctx, bint server):
    """Raise TypeError/ValueError/RuntimeError if `sslctx` cannot serve this side."""
    _ctx_of(sslctx, server)


cdef np_tls_t *np_tls_open(object sslctx, int fd, bint server, object server_hostname) except NULL:
    cdef SSL_CTX *ctx = _ctx_of(sslctx, server)
    cdef np_tls_t *t
    cdef BIO *bio
    cdef bytes host = None
    cdef bint is_ip = False
    if server_hostname is not None:
        if server:
            raise ValueError("server_hostname is for clients")
        if not isinstance(server_hostname, str):
            raise TypeError("server_hostname must be a str")
        if not server_hostname or "\0" in server_hostname:
            raise ValueError(f"invalid server_hostname {server_hostname!r}")
        try:
            import ipaddress
            ipaddress.ip_address(server_hostname.strip("[]"))
            is_ip = True
        except ValueError:
            pass
        host = server_hostname.strip("[]").encode("idna") if not is_ip else \
            server_hostname.strip("[]").encode("ascii")
    elif not server and sslctx.check_hostname:
        raise ValueError("check_hostname requires server_hostname")
    t = <np_tls_t *>PyMem_RawMalloc(sizeof(np_tls_t))
    if t == NULL:
        raise MemoryError()
    memset(t, 0, sizeof(np_tls_t))
    pthread_mutex_init(&t.lock, NULL)
    t.fd = fd
    t.ssl = SSL_new(ctx)
    bio = BIO_new(_bio_method) if t.ssl != NULL else NULL
    if bio == NULL:
        np_tls_free(t)
        ERR_clear_error()
        raise MemoryError("cannot create a TLS session")
    BIO_set_data(bio, t)
    SSL_set_bio(t.ssl, bio, bio)     # one reference, owned by the SSL
    # Partial writes: one record per SSL_write, so a full socket keeps at
    # most one record in OpenSSL; the retry may pass a gathered copy.
    SSL_set_mode(t.ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
    # One recv() takes as many records as have arrived (not a 5-byte header
    # and then a body): np_tls_pending() tells the owner to keep reading.
    SSL_set_read_ahead(t.ssl, 1)
    # A peer that closes without close_notify ends the stream like a FIN
    # (the data before it is delivered); renegotiation is refused.
    np_SSL_set_options(t.ssl, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF)
    if server:
        SSL_set_accept_state(t.ssl)
    else:
        SSL_set_connect_state(t.ssl)
        if host is not None:
            t.hostname = strdup(host)
            if t.hostname == NULL:
                np_tls_free(t)
                raise MemoryError()
            ok = 1
            if not is_ip:
                ok = SSL_set_tlsext_host_name(t.ssl, t.hostname)
            if ok == 1 and sslctx.check_hostname:
                if is_ip:
                    ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t.ssl), t.hostname)
                else:
                    ok = X509_VERIFY_PARAM_set1_host(SSL_get0_param(t.ssl), t.hostname, 0)
            if ok != 1:
                ERR_clear_error()
                np_tls_free(t)
                raise ValueError(f"invalid server_hostname {server_hostname!r}")
    return t


cdef object np_tls_error(np_tls_t *t):
    cdef long vr = t.verify_result
    reason = t.reason[:strlen(t.reason)].decode("utf-8", "replace") or "TLS handshake failed"
    if vr != X509_V_OK and "certificate verify failed" in reason:
        msg = X509_verify_cert_error_string(vr).decode("utf-8", "replace")
        err = _ssl_mod.SSLCertVerificationError(
            1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {msg}")
        err.verify_code = vr
        err.verify_message = msg
        err.reason = "CERTIFICATE_VERIFY_FAILED"
        err.library = "SSL"
        return err
    return TLSError(1, reason)


cdef class TLSSession:
    """A client TLS session made by client_handshake(), before its fd is
    wrapped in a connection (which then owns the session)."""

    def __dealloc__(self):
        np_tls_free(self.t)
        self.t = NULL


cdef np_tls_t *np_tls_take(TLSSession s) noexcept:
    cdef np_tls_t *t = s.t
    s.t = NULL
    return t


def client_handshake(sslctx, int fd, server_hostname, timeout):
    """Run a client handshake on the non-blocking socket `fd` within
    `timeout` seconds (None: no limit), without the GIL. Returns the session;
    raises ssl.SSLCertVerificationError, TLSError or TimeoutError. The fd
    stays the caller's."""
    cdef TLSSession s = TLSSession.__new__(TLSSession)
    cdef int64_t deadline = -1
    cdef int r
    s.t = np_tls_open(sslctx, fd, False, server_hostname)
    s.ctx = sslctx
    if timeout is not None:
        deadline = np_monotonic_ns() + <int64_t>(timeout * 1e9)
    with nogil:
        r = _handshake_wait(s.t, deadline)
    if r == TLS_TIMEOUT:
        raise TimeoutError("TLS handshake timed out")
    if r != TLS_DONE:
        raise np_tls_error(s.t)
    return s

# ------------------------------------------------------------- conn.tls

cdef class TLSInfo:
    """What a connection's TLS session negotiated: the names of
    ssl.SSLObject that a server needs."""
    cdef object _owner           # keeps the session alive
    cdef np_tls_t *t

    def __init__(self):
        raise TypeError("TLSInfo objects come from conn.tls")

    @property
    def server_hostname(self):
        """The name a client asked for (None on the server side)."""
        if self.t.hostname == NULL:
            return None
        return self.t.hostname.decode("ascii")

    def version(self):
        """The protocol version, e.g. "TLSv1.3"."""
        pthread_mutex_lock(&self.t.lock)
        v = SSL_get_version(self.t.ssl)
        pthread_mutex_unlock(&self.t.lock)
        return v.decode("ascii") if v != NULL else None

    def cipher(self):
        """(name, protocol version, secret bits) of the cipher in use, or None."""
        cdef const SSL_CIPHER *c
        cdef int bits = 0
        pthread_mutex_lock(&self.t.lock)
        c = SSL_get_current_cipher(self.t.ssl)
        if c == NULL:
            pthread_mutex_unlock(&self.t.lock)
            return None
        name = SSL_CIPHER_get_name(c).decode("ascii")
        ver = SSL_CIPHER_get_version(c).decode("ascii")
        SSL_CIPHER_get_bits(c, &bits)
        pthread_mutex_unlock(&self.t.lock)
        return (name, ver, bits)

    def selected_alpn_protocol(self):
        """The protocol ALPN chose, or None."""
        cdef const unsigned char *data = NULL
        cdef unsigned int n = 0
        pthread_mutex_lock(&self.t.lock)
        SSL_get0_alpn_selected(self.t.ssl, &data, &n)
        pthread_mutex_unlock(&self.t.lock)
        if data == NULL or n == 0:
            return None
        return (<const char *>data)[:n].decode("ascii", "replace")

    def getpeercert(self, binary_form=False):
        """The peer's certificate: DER bytes with binary_form, else a dict as
        ssl.SSLSocket.getpeercert() gives ({} when it was not verified);
        None when the peer sent none."""
        cdef X509 *x
        cdef unsigned char *der = NULL
        cdef int n
        cdef int mode
        pthread_mutex_lock(&self.t.lock)
        x = np_SSL_get1_peer_certificate(self.t.ssl)
        mode = SSL_get_verify_mode(self.t.ssl)
        pthread_mutex_unlock(&self.t.lock)
        if x == NULL:
            return None
        n = i2d_X509(x, &der)
        X509_free(x)
        if n < 0 or der == NULL:
            raise MemoryError()
        try:
            data = (<const char *>der)[:n]
        finally:
            OPENSSL_free(der)
        if binary_form:
            return data
        if not (mode & SSL_VERIFY_PEER):
            return {}
        return _decode_cert(data)

    def __repr__(self):
        return f"<TLSInfo {self.version()} {self.cipher()}>"


def _decode_cert(bytes der):
    # The stdlib's own decoder, so the dict is exactly ssl's; it reads a
    # PEM file (there is no in-memory variant).
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
        f.write(_ssl_mod.DER_cert_to_PEM_cert(der))
        f.flush()
        return _ssl_mod._ssl._test_decode_cert(f.name)


cdef object np_tls_info(object owner, np_tls_t *t):
    if t == NULL:
        return None
    cdef TLSInfo info = TLSInfo.__new__(TLSInfo)
    info._owner = owner
    info.t = t
    return info
