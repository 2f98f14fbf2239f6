# TLS: one OpenSSL session over one connection's socket, driven without the
# GIL by whichever thread reads or sends for that connection (connection.pyx,
# reactor.pyx). The record layer talks to the socket through a BIO of ours
# (recv/send with MSG_NOSIGNAL on the fd), so ciphertext is never copied
# through a memory BIO and the connection's ownership of the fd is unchanged:
# the session never closes it.
#
# Thread rule: an SSL object is not thread-safe, and a connection's reads (the
# poller) and sends (any flushing thread) run at the same time; every SSL_*
# call on a session is made under np_tls_t.lock. The lock is never held across
# a blocking call (the socket is non-blocking) or the GIL.

from libc.stdint cimport int64_t
from netpoll._core.includes.system cimport pthread_mutex_t
from netpoll._core.includes.openssl cimport SSL
from netpoll._core.linkbuffer cimport np_lb_t

cdef enum:
    TLS_DONE = 0          # np_tls_handshake: finished
    TLS_WANT_READ = 1     # ... needs the socket readable
    TLS_WANT_WRITE = 2    # ... needs the socket writable
    TLS_FAILED = -1       # ... failed (np_tls_t.reason says why)
    TLS_TIMEOUT = -2      # np_tls_handshake_wait: the deadline passed

cdef struct np_tls_t:
    SSL *ssl
    int fd                 # the owner's socket (the BIO reads and writes it)
    int sys_errno          # errno of the last socket call that failed in the BIO
    int failed             # a fatal error: no more SSL_* calls but SSL_free
    int read_wants_write   # SSL_read needs the socket writable (a TLS 1.3 key update reply)
    int notify_sent        # close_notify sent
    long verify_result     # SSL_get_verify_result() after a failed handshake
    pthread_mutex_t lock
    char *hostname         # server_hostname of a client session (malloc'd), or NULL
    char reason[256]       # why the session failed, for logs and exceptions


# All without the GIL. recv/send follow the socket calls' conventions, so the
# connection code treats a TLS session like a socket.
cdef int np_tls_handshake(np_tls_t *t) noexcept nogil
# Bytes of plaintext (> 0), 0 at the end (close_notify or the peer's FIN), or
# -1 with errno (EAGAIN: nothing decrypted yet; EPROTO: a TLS error).
cdef ssize_t np_tls_recv(np_tls_t *t, char *buf, size_t n) noexcept nogil
# The same, and when it returns > 0, *more is np_tls_pending() taken under the
# same lock (False otherwise): the hot read path locks the session once.
cdef ssize_t np_tls_recv_more(np_tls_t *t, char *buf, size_t n, bint *more) noexcept nogil
# Encrypt and send lb's readable bytes: 0 all sent, 1 the socket is full,
# -errno on error (the connection's np_send_lb contract).
cdef int np_tls_send_lb(np_tls_t *t, np_lb_t *lb) noexcept nogil
# Send close_notify once: 0 sent (or nothing to send), 1 the socket is full
# (call again when writable), -errno.
cdef int np_tls_close_notify(np_tls_t *t) noexcept nogil
# Decrypted or undecrypted bytes held inside OpenSSL: the socket may be
# drained while these wait, so the poller must read again without an event.
cdef bint np_tls_pending(np_tls_t *t) noexcept nogil
cdef void np_tls_free(np_tls_t *t) noexcept nogil

# Python-side helpers (GIL held).
# A new session over fd for `sslctx` (an ssl.SSLContext, checked), or raise.
cdef np_tls_t *np_tls_open(object sslctx, int fd, bint server, object server_hostname) except NULL
# conn.tls / handler.tls: an object over t that keeps `owner` (which keeps t) alive.
cdef object np_tls_info(object owner, np_tls_t *t)
# The exception for a failed handshake of t.
cdef object np_tls_error(np_tls_t *t)


cdef class TLSSession:
    # A client session whose handshake ran before its fd became a connection;
    # np_tls_take() hands the session over (it then owns nothing).
    cdef np_tls_t *t
    cdef object ctx


cdef np_tls_t *np_tls_take(TLSSession s) noexcept
