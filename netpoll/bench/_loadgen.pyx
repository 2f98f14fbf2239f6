# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Native load generator for netpoll's side-by-side benchmarks (``python -m netpoll.bench``).

The whole measurement runs in C without the GIL: every worker thread owns an
epoll fd and a slice of the connections (non-blocking sockets, level-triggered
epoll, ``sendmsg``/``recv``), sends each request, verifies every byte of the
reply against what it sent and records the latency of each request in a
log-linear histogram (HdrHistogram-like, 64 sub-buckets per power of two). Worker 0
runs on the calling thread; workers 1.. are started with ``pthread_create``.
No Python object is touched between the start and the end of the run.

Request shapes (``mode``):

- ``"echo"``: the request is ``size`` bytes; the server echoes the byte
  stream; a request completes when ``size`` bytes of it came back.
- ``"framed"``: the request is a 4-byte big-endian length (``size``) followed by
  ``size`` bytes of body (Netpoll's benchmark shape); the reply must be the same
  frame, header included.

Payloads differ per message: each body is a window of a 1 MiB random
pattern (per worker) starting at an offset drawn from the connection id and
its message counter, so consecutive messages differ everywhere and a stale or
misrouted reply is detected as well as a corrupted byte. Nothing is generated
or copied per message on the client side: ``sendmsg`` points into the pattern
and replies are compared against it with ``memcmp``.

A reply whose bytes differ counts one error (``verify_errors``) and is not
counted as a request; bytes arriving beyond what was sent, a reset, an EOF or a
failed connect count as errors too and the connection is re-dialled after a
short back-off, all within the run's deadline.

With ``tls=True`` every connection runs an OpenSSL client session over its
non-blocking socket (a socket BIO: ``SSL_write``/``SSL_read`` call
``send``/``recv`` themselves, still without the GIL). All sessions share one
``SSL_CTX`` made with ``TLS_client_method()`` that verifies nothing (the
benchmark measures the record layer, not the PKI). The measured window
starts only once every connection has finished its handshake (or 10 s after
the warm-up, whichever is first), so handshakes are never counted in the
window: the server's CPU per request is the record work alone.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcmp, memcpy, memset

from netpoll._core.includes.openssl cimport (
    SSL_CTX, SSL, TLS_client_method, SSL_CTX_new, SSL_CTX_free, SSL_CTX_set_verify,
    SSL_new, SSL_free, SSL_set_connect_state, SSL_do_handshake, SSL_read, SSL_write,
    SSL_get_error, SSL_set_mode, SSL_set_read_ahead, SSL_VERIFY_NONE,
    SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE, SSL_MODE_ENABLE_PARTIAL_WRITE,
    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, ERR_clear_error,
)

import os as _os
import resource as _resource


cdef extern from *:
    """
    #include <errno.h>
    #include <time.h>
    #include <unistd.h>
    #include <pthread.h>
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <sys/un.h>
    #include <sys/epoll.h>
    #include <netinet/in.h>
    #include <netinet/tcp.h>
    #include <netdb.h>

    static inline int64_t lg_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    static inline int64_t lg_thread_cpu_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    static inline int lg_errno(void) { return errno; }
    static inline int lg_msb64(uint64_t v) { return 63 - __builtin_clzll(v); }
    static inline uint64_t lg_mix64(uint64_t z) {      /* splitmix64 finaliser */
        z += 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
    static inline int lg_errno_is_again(int e) { return e == EAGAIN || e == EWOULDBLOCK; }
    /* TLS: connections whose handshake is done, summed over all workers. */
    static inline void lg_atomic_inc(int *p) { __atomic_fetch_add(p, 1, __ATOMIC_RELAXED); }
    static inline int lg_atomic_get(int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    """
    int64_t lg_now_ns() nogil
    int64_t lg_thread_cpu_ns() nogil
    int lg_errno() nogil
    int lg_msb64(uint64_t v) nogil
    uint64_t lg_mix64(uint64_t z) nogil
    int lg_errno_is_again(int e) nogil
    void lg_atomic_inc(int *p) nogil
    int lg_atomic_get(int *p) nogil


cdef extern from "<openssl/ssl.h>" nogil:
    # not in includes/openssl.pxd: the core drives its own BIO, the generator a socket BIO
    int SSL_set_fd(SSL *s, int fd)


cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t

cdef extern from "<errno.h>" nogil:
    int EINTR, EINPROGRESS

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t write(int fd, const void *buf, size_t n)

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *t, const void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t t, void **ret)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int AF_INET, AF_INET6, AF_UNIX, AF_UNSPEC
    int SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC
    int SOL_SOCKET, SO_ERROR, MSG_NOSIGNAL

cdef extern from "<sys/un.h>" nogil:
    struct sockaddr_un:
        sa_family_t sun_family
        char sun_path[108]

cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY

cdef extern from "<netdb.h>" nogil:
    struct addrinfo:
        int ai_flags
        int ai_family
        int ai_socktype
        int ai_protocol
        socklen_t ai_addrlen
        sockaddr *ai_addr
        char *ai_canonname
        addrinfo *ai_next
    int getaddrinfo(const char *node, const char *service, const addrinfo *hints, addrinfo **res)
    void freeaddrinfo(addrinfo *res)
    const char *gai_strerror(int errcode)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *ev)
    int epoll_wait(int epfd, epoll_event *evs, int maxevents, int timeout)
    int EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL, EPOLL_CLOEXEC
    uint32_t EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP


# ------------------------------------------------------------------ constants

cdef enum:
    HIST_BUCKETS = 2048        # log-linear: 64 sub-buckets per power of two, ns, up to ~68 s
    MAX_EVENTS = 512
    SCRATCH_LEN = 262144
    PATTERN_LEN = 1048576      # bodies start at 8-aligned offsets below this
    MAX_IOV = 64
    ST_IDLE = 0                # waiting for its back-off to end
    ST_CONNECTING = 1
    ST_ACTIVE = 2
    ST_DONE = 3
    ST_HANDSHAKE = 4           # TLS: connected, handshake under way
    TLS_RECORD = 16384         # plaintext per SSL_write: one full record at most

cdef int64_t BACKOFF_NS = 20000000      # 20 ms between re-dials of a failed connection
cdef int64_t TLS_READY_WAIT_NS = 10000000000   # TLS: longest wait for all handshakes after warm-up


# ------------------------------------------------------------------ structures

cdef struct Conn:
    int fd
    int state
    int want_out             # EPOLLOUT currently in the interest set
    int cur_bad              # the message being received has a mismatch
    uint32_t index           # position in the worker's array (epoll data)
    uint64_t ident           # global connection number (pattern key)
    uint64_t counter         # messages generated on this connection, across re-dials
    uint64_t gen_pos         # bytes generated (queued) on the current socket
    uint64_t send_pos        # bytes the kernel accepted
    uint64_t recv_pos        # bytes received and verified
    uint64_t win_done        # requests completed in the measured window
    int64_t retry_at
    uint32_t *offs           # pipeline slots: pattern offset of each in-flight body
    int64_t *t_sent          # pipeline slots: when each in-flight message was issued
    SSL *ssl                 # TLS session on fd (NULL on plain runs)
    int hs_counted           # its handshake was counted in *tls_ready (once per connection)

cdef struct Worker:
    # configuration
    int nconns
    Conn *conns
    uint32_t *offs_arena
    int64_t *times
    uint8_t *pattern         # PATTERN_LEN + size random bytes: bodies are windows of it
    uint8_t hdr[4]           # framed mode: the big-endian length every frame starts with
    uint8_t *scratch
    int size
    int msg_len
    int pipeline
    int framed
    int family
    sockaddr_storage addr
    socklen_t addrlen
    int notify_fd            # worker 0 only: writes b"S" at window start, b"E" at the end
    int spin                 # poll with a zero timeout instead of sleeping in epoll_wait
    int64_t win_start
    int64_t win_end
    int64_t ready_at         # TLS: the end of the warm-up; the window starts once all are ready
    int64_t dur_ns           # TLS: the window's length
    SSL_CTX *ssl_ctx         # TLS: shared by every worker (NULL on plain runs)
    int *tls_ready           # TLS: connections with a finished handshake, all workers
    int total_conns
    # state
    int epfd
    int n_idle
    # results
    uint64_t requests
    uint64_t bytes
    uint64_t verify_errors
    uint64_t io_errors
    uint64_t connect_errors
    uint64_t connects
    uint64_t handshakes      # TLS handshakes completed, re-dials included
    uint64_t handshakes_in_window
    uint64_t tls_errors      # TLS handshake or record failures
    uint64_t starved
    uint64_t lat_sum
    uint64_t lat_max
    int64_t cpu_ns
    int64_t spin_idle_ns     # spin mode: time in polls that found nothing, in the window
    int64_t measured_ns
    int setup_failed
    uint64_t hist[HIST_BUCKETS]


# ------------------------------------------------------------------ histogram

cdef inline int hist_index(uint64_t v) noexcept nogil:
    cdef int shift, idx
    if v < 128:
        return <int>v
    shift = lg_msb64(v) - 6
    idx = 128 + (shift - 1) * 64 + <int>((v >> shift) - 64)
    if idx >= HIST_BUCKETS:
        idx = HIST_BUCKETS - 1
    return idx

cdef inline double hist_value(int idx) noexcept nogil:
    """Midpoint of a bucket, in ns."""
    cdef int k, shift
    cdef uint64_t sub
    if idx < 128:
        return <double>idx
    k = idx - 128
    shift = k // 64 + 1
    sub = <uint64_t>(k % 64 + 64)
    return <double>(sub << shift) + <double>((<uint64_t>1) << shift) / 2.0

cdef double hist_percentile(uint64_t *hist, uint64_t total, double q) noexcept nogil:
    cdef uint64_t target, acc = 0
    cdef int i
    if total == 0:
        return 0.0
    target = <uint64_t>(q * <double>total + 0.999999)
    if target < 1:
        target = 1
    if target > total:
        target = total
    for i in range(HIST_BUCKETS):
        acc += hist[i]
        if acc >= target:
            return hist_value(i)
    return hist_value(HIST_BUCKETS - 1)


# ------------------------------------------------------------------ connection handling

cdef inline void epoll_set(Worker *w, Conn *c, int op, uint32_t events) noexcept nogil:
    cdef epoll_event ev
    ev.events = events
    ev.data.u64 = 0
    ev.data.u32 = c.index
    epoll_ctl(w.epfd, op, c.fd, &ev)

cdef void conn_fail(Worker *w, Conn *c, int64_t now) noexcept nogil:
    if c.ssl != NULL:
        SSL_free(c.ssl)      # a socket BIO made by SSL_set_fd does not close the fd
        c.ssl = NULL
        ERR_clear_error()    # the failure may have left errors queued on this thread
    if c.fd >= 0:
        close(c.fd)          # also removes it from the epoll set
    c.fd = -1
    c.state = ST_IDLE
    c.want_out = 0
    c.cur_bad = 0
    c.gen_pos = 0
    c.send_pos = 0
    c.recv_pos = 0
    c.retry_at = now + BACKOFF_NS
    w.n_idle += 1

cdef inline void gen_msg(Worker *w, Conn *c, int64_t now) noexcept nogil:
    """Queue the next message of c (its slot is known to be free): pick its body window."""
    cdef uint64_t slot = (c.gen_pos // <uint64_t>w.msg_len) % <uint64_t>w.pipeline
    cdef uint64_t key = lg_mix64((c.ident << 40) ^ c.counter)
    c.counter += 1
    c.offs[slot] = <uint32_t>((key % (PATTERN_LEN // 8)) * 8)
    c.t_sent[slot] = now
    c.gen_pos += <uint64_t>w.msg_len

cdef inline const uint8_t *stream_ptr(Worker *w, Conn *c, uint64_t pos, uint64_t *run) noexcept nogil:
    """The bytes c sent at stream position pos, and how many follow contiguously (*run)."""
    cdef uint64_t ml = <uint64_t>w.msg_len
    cdef uint64_t o = pos % ml
    cdef uint64_t slot = (pos // ml) % <uint64_t>w.pipeline
    if w.framed:
        if o < 4:
            run[0] = 4 - o
            return w.hdr + o
        run[0] = ml - o
        return w.pattern + c.offs[slot] + (o - 4)
    run[0] = ml - o
    return w.pattern + c.offs[slot] + o

cdef int tls_send(Worker *w, Conn *c) noexcept nogil:
    """SSL_write what is queued, one record per contiguous run (at most TLS_RECORD bytes).

    With partial writes and a moving buffer allowed, a write that returned
    WANT_WRITE is retried later with the same bytes (send_pos did not move), as
    OpenSSL requires. -1: failed."""
    cdef uint64_t run
    cdef const uint8_t *ptr
    cdef int n, err
    while c.send_pos < c.gen_pos:
        ptr = stream_ptr(w, c, c.send_pos, &run)
        if run > c.gen_pos - c.send_pos:
            run = c.gen_pos - c.send_pos
        if run > TLS_RECORD:
            run = TLS_RECORD
        n = SSL_write(c.ssl, ptr, <int>run)
        if n > 0:
            c.send_pos += <uint64_t>n
            continue
        err = SSL_get_error(c.ssl, n)
        if err == SSL_ERROR_WANT_WRITE or err == SSL_ERROR_WANT_READ:
            break
        return -1               # counted as an I/O error by the caller
    return 0

cdef int do_send(Worker *w, Conn *c) noexcept nogil:
    """Send what is queued; keep EPOLLOUT in the interest set while some is left. -1: failed."""
    cdef iovec iov[MAX_IOV]
    cdef msghdr mh
    cdef uint64_t pos, run
    cdef ssize_t n
    cdef int e, k
    memset(&mh, 0, sizeof(mh))
    mh.msg_iov = iov
    if c.ssl != NULL and tls_send(w, c) < 0:
        return -1
    while c.ssl == NULL and c.send_pos < c.gen_pos:
        pos = c.send_pos
        k = 0
        while pos < c.gen_pos and k < MAX_IOV:
            iov[k].iov_base = <void *>stream_ptr(w, c, pos, &run)
            iov[k].iov_len = run
            pos += run
            k += 1
        mh.msg_iovlen = k
        n = sendmsg(c.fd, &mh, MSG_NOSIGNAL)
        if n < 0:
            e = lg_errno()
            if e == EINTR:
                continue
            if lg_errno_is_again(e):
                break
            return -1
        c.send_pos += <uint64_t>n
    if c.send_pos < c.gen_pos:
        if not c.want_out:
            c.want_out = 1
            epoll_set(w, c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT)
    elif c.want_out:
        c.want_out = 0
        epoll_set(w, c, EPOLL_CTL_MOD, EPOLLIN)
    return 0

cdef void conn_activate(Worker *w, Conn *c, int64_t now) noexcept nogil:
    cdef int i
    c.state = ST_ACTIVE
    w.connects += 1
    if now < w.win_end:
        for i in range(w.pipeline):
            gen_msg(w, c, now)
    if do_send(w, c) < 0:
        w.io_errors += 1
        conn_fail(w, c, now)

cdef inline void set_want_out(Worker *w, Conn *c, int want) noexcept nogil:
    if c.want_out != want:
        c.want_out = want
        epoll_set(w, c, EPOLL_CTL_MOD, (EPOLLIN | EPOLLOUT) if want else EPOLLIN)

cdef void tls_handshake_step(Worker *w, Conn *c, int64_t now) noexcept nogil:
    """Drive the client handshake; the connection starts its requests once it is done."""
    cdef int r, err
    r = SSL_do_handshake(c.ssl)
    if r == 1:
        w.handshakes += 1
        if not c.hs_counted:
            c.hs_counted = 1
            lg_atomic_inc(w.tls_ready)
        if now >= w.win_start and now < w.win_end:
            w.handshakes_in_window += 1
        set_want_out(w, c, 0)
        conn_activate(w, c, now)
        return
    err = SSL_get_error(c.ssl, r)
    if err == SSL_ERROR_WANT_READ:
        set_want_out(w, c, 0)
    elif err == SSL_ERROR_WANT_WRITE:
        set_want_out(w, c, 1)
    else:
        w.tls_errors += 1
        conn_fail(w, c, now)

cdef void conn_connected(Worker *w, Conn *c, int64_t now) noexcept nogil:
    """The TCP connection is up (its fd is in the epoll set, EPOLLIN only)."""
    if w.ssl_ctx == NULL:
        conn_activate(w, c, now)
        return
    c.ssl = SSL_new(w.ssl_ctx)
    if c.ssl == NULL or SSL_set_fd(c.ssl, c.fd) != 1:
        w.tls_errors += 1
        conn_fail(w, c, now)
        return
    SSL_set_connect_state(c.ssl)
    SSL_set_mode(c.ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
    # read_ahead: one recv per burst of records instead of two per record (header,
    # body); tls_read drains the session to WANT_READ, so nothing stays buffered
    # inside OpenSSL where level-triggered epoll cannot see it.
    SSL_set_read_ahead(c.ssl, 1)
    c.state = ST_HANDSHAKE
    tls_handshake_step(w, c, now)

cdef void conn_start(Worker *w, Conn *c, int64_t now) noexcept nogil:
    cdef int fd, r, e, one = 1
    fd = socket(w.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        w.connect_errors += 1
        c.fd = -1
        conn_fail(w, c, now)
        return
    if w.family != AF_UNIX:
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    c.fd = fd
    c.gen_pos = 0
    c.send_pos = 0
    c.recv_pos = 0
    c.cur_bad = 0
    c.want_out = 0
    r = connect(fd, <sockaddr *>&w.addr, w.addrlen)
    if r == 0:
        epoll_set(w, c, EPOLL_CTL_ADD, EPOLLIN)
        conn_connected(w, c, now)
        return
    e = lg_errno()
    if e == EINPROGRESS:
        c.state = ST_CONNECTING
        c.want_out = 1
        epoll_set(w, c, EPOLL_CTL_ADD, EPOLLOUT)
        return
    # refused, or EAGAIN on a Unix socket whose backlog is full
    w.connect_errors += 1
    conn_fail(w, c, now)

cdef int verify(Worker *w, Conn *c, uint8_t *p, uint64_t left, int64_t now) noexcept nogil:
    """Check received bytes against the stream sent; count completed requests. 1: excess bytes."""
    cdef uint64_t off, seg, ml = <uint64_t>w.msg_len, slot, lat, run
    cdef const uint8_t *ptr
    cdef int excess = 0
    if c.recv_pos + left > c.send_pos:
        # An echo cannot hold bytes that were never sent.
        excess = 1
        left = c.send_pos - c.recv_pos
    while left > 0:
        off = c.recv_pos % ml
        ptr = stream_ptr(w, c, c.recv_pos, &run)
        seg = left if left < run else run
        if memcmp(p, ptr, seg) != 0:
            c.cur_bad = 1
        c.recv_pos += seg
        p += seg
        left -= seg
        if off + seg == ml:      # (a framed header is its own segment: off + 4 < ml)
            slot = ((c.recv_pos - 1) // ml) % <uint64_t>w.pipeline
            if c.cur_bad:
                w.verify_errors += 1
                c.cur_bad = 0
            elif now >= w.win_start and now < w.win_end:
                lat = <uint64_t>(now - c.t_sent[slot])
                w.requests += 1
                c.win_done += 1
                w.bytes += ml
                w.lat_sum += lat
                if lat > w.lat_max:
                    w.lat_max = lat
                w.hist[hist_index(lat)] += 1
            if now < w.win_end:
                gen_msg(w, c, now)
    return excess

cdef int tls_read(Worker *w, Conn *c) noexcept nogil:
    """SSL_read until the session wants more from the socket (see conn_connected)."""
    cdef int n, err
    while True:
        n = SSL_read(c.ssl, w.scratch, SCRATCH_LEN)
        if n > 0:
            if verify(w, c, w.scratch, <uint64_t>n, lg_now_ns()):
                return -2
            continue
        err = SSL_get_error(c.ssl, n)
        if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
            return 0
        return -1               # close_notify, EOF, reset or a bad record

cdef int do_read(Worker *w, Conn *c) noexcept nogil:
    """Receive and verify. 0: fine; -1: I/O error or EOF; -2: protocol error (excess bytes)."""
    cdef ssize_t n
    cdef int e, rounds = 0
    if c.ssl != NULL:
        return tls_read(w, c)
    while rounds < 4:
        rounds += 1
        n = recv(c.fd, w.scratch, SCRATCH_LEN, 0)
        if n == 0:
            return -1
        if n < 0:
            e = lg_errno()
            if e == EINTR:
                continue
            if lg_errno_is_again(e):
                return 0
            return -1
        if verify(w, c, w.scratch, <uint64_t>n, lg_now_ns()):
            return -2
        if <size_t>n < SCRATCH_LEN:
            return 0
    return 0


cdef void *worker_main(void *arg) noexcept nogil:
    cdef Worker *w = <Worker *>arg
    cdef epoll_event *events
    cdef int i, n, r, timeout_ms, err, started = 0
    cdef socklen_t errlen
    cdef uint32_t ev
    cdef int64_t now, wait_ns, next_scan = 0, cpu0 = 0, t_started = 0
    cdef Conn *c
    cdef char mark

    events = <epoll_event *>malloc(sizeof(epoll_event) * MAX_EVENTS)
    w.epfd = epoll_create1(EPOLL_CLOEXEC)
    if events == NULL or w.epfd < 0:
        w.setup_failed = 1
        free(events)
        if w.epfd >= 0:
            close(w.epfd)
        return NULL

    now = lg_now_ns()
    for i in range(w.nconns):
        conn_start(w, &w.conns[i], now)

    while True:
        now = lg_now_ns()
        if (not started and w.ssl_ctx != NULL and now >= w.ready_at
                and (lg_atomic_get(w.tls_ready) >= w.total_conns
                     or now >= w.ready_at + TLS_READY_WAIT_NS)):
            # every handshake is done (or will not be): the window opens now
            w.win_start = now
            w.win_end = now + w.dur_ns
        if not started and now >= w.win_start:
            started = 1
            t_started = now
            cpu0 = lg_thread_cpu_ns()
            if w.notify_fd >= 0:
                mark = b'S'
                write(w.notify_fd, &mark, 1)
        if now >= w.win_end:
            break
        # re-dial connections whose back-off has ended
        if w.n_idle > 0 and now >= next_scan:
            next_scan = now + 5000000
            for i in range(w.nconns):
                c = &w.conns[i]
                if c.state == ST_IDLE and c.retry_at <= now:
                    w.n_idle -= 1
                    conn_start(w, c, now)
        wait_ns = w.win_end - now
        if not started and w.win_start - now < wait_ns:
            wait_ns = w.win_start - now
        if (w.n_idle > 0 or (not started and w.ssl_ctx != NULL)) and wait_ns > 5000000:
            wait_ns = 5000000     # (TLS: the window's start is far away until all are ready)
        timeout_ms = 0 if w.spin else <int>(wait_ns // 1000000) + 1
        n = epoll_wait(w.epfd, events, MAX_EVENTS, timeout_ms)
        if n == 0 and w.spin and started:
            w.spin_idle_ns += lg_now_ns() - now
        if n < 0:
            if lg_errno() == EINTR:
                continue
            w.setup_failed = 1
            break
        for i in range(n):
            c = &w.conns[events[i].data.u32]
            ev = events[i].events
            if c.fd < 0:
                continue
            if c.state == ST_CONNECTING:
                err = 0
                errlen = sizeof(err)
                r = getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &errlen)
                if r < 0 or err != 0 or (ev & (EPOLLERR | EPOLLHUP)):
                    w.connect_errors += 1
                    conn_fail(w, c, lg_now_ns())
                    continue
                c.want_out = 0
                epoll_set(w, c, EPOLL_CTL_MOD, EPOLLIN)
                conn_connected(w, c, lg_now_ns())
                continue
            if c.state == ST_HANDSHAKE:
                tls_handshake_step(w, c, lg_now_ns())
                continue
            if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
                r = do_read(w, c)
                if r == -2:
                    w.verify_errors += 1
                    conn_fail(w, c, lg_now_ns())
                    continue
                if r < 0:
                    w.io_errors += 1
                    conn_fail(w, c, lg_now_ns())
                    continue
            if c.send_pos < c.gen_pos or c.want_out:
                if do_send(w, c) < 0:
                    w.io_errors += 1
                    conn_fail(w, c, lg_now_ns())

    now = lg_now_ns()
    if started:
        w.cpu_ns = lg_thread_cpu_ns() - cpu0
        w.measured_ns = now - t_started
    if w.notify_fd >= 0:
        mark = b'E'
        write(w.notify_fd, &mark, 1)
    for i in range(w.nconns):
        c = &w.conns[i]
        if c.win_done == 0:
            w.starved += 1
        if c.ssl != NULL:
            SSL_free(c.ssl)
            c.ssl = NULL
        if c.fd >= 0:
            close(c.fd)
            c.fd = -1
        c.state = ST_DONE
    close(w.epfd)
    free(events)
    return NULL


# ------------------------------------------------------------------ Python entry point

cdef int resolve(str host, int port, object unix_path, sockaddr_storage *out, socklen_t *outlen,
                 int *family) except -1:
    cdef sockaddr_un *un
    cdef addrinfo hints
    cdef addrinfo *res = NULL
    cdef int rc
    cdef bytes bhost, bport, bpath
    memset(out, 0, sizeof(sockaddr_storage))
    if unix_path is not None:
        bpath = _os.fsencode(unix_path)
        if len(bpath) >= 108:
            raise ValueError("unix_path too long")
        un = <sockaddr_un *>out
        un.sun_family = AF_UNIX
        memcpy(un.sun_path, <char *>bpath, len(bpath))
        outlen[0] = <socklen_t>sizeof(sockaddr_un)
        family[0] = AF_UNIX
        return 0
    bhost = host.encode()
    bport = str(port).encode()
    memset(&hints, 0, sizeof(hints))
    hints.ai_family = AF_UNSPEC
    hints.ai_socktype = SOCK_STREAM
    rc = getaddrinfo(bhost, bport, &hints, &res)
    if rc != 0 or res == NULL:
        raise OSError(f"cannot resolve {host}:{port}: {gai_strerror(rc).decode()}")
    memcpy(out, res.ai_addr, res.ai_addrlen)
    outlen[0] = res.ai_addrlen
    family[0] = res.ai_family
    freeaddrinfo(res)
    return 0


def _raise_nofile(int needed):
    soft, hard = _resource.getrlimit(_resource.RLIMIT_NOFILE)
    if soft != _resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == _resource.RLIM_INFINITY else min(needed, hard)
        if hard != _resource.RLIM_INFINITY and hard < needed:
            try:        # root may raise the hard limit too
                _resource.setrlimit(_resource.RLIMIT_NOFILE, (needed, needed))
                return
            except (ValueError, OSError):
                pass
        try:
            _resource.setrlimit(_resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def run(str host="127.0.0.1", int port=0, *, unix_path=None, int connections=1, int size=64,
        double duration=1.0, str mode="echo", int pipeline=1, int threads=1, double warmup=0.5,
        int notify_fd=-1, bint spin=False, int seed=0x5eed, bint tls=False):
    """Drive an echo or framed server and measure it.

    ``connections`` connections are spread over ``threads`` worker threads; each
    keeps ``pipeline`` requests of ``size`` bytes in flight (1 = strict
    ping-pong). The first ``warmup`` seconds (connects included) are not counted;
    then ``duration`` seconds are measured. The GIL is released for the whole run.
    ``notify_fd``, if >= 0, receives one byte ``b"S"`` when the measured window
    starts and ``b"E"`` when it ends (used by netpoll/bench/driver.py to sample the
    server's CPU time over exactly that window). ``spin=True`` polls epoll with a
    zero timeout instead of sleeping: the generator never waits to be woken up,
    which takes its own wake-up latency out of the round trip (useful when it
    has a core to itself); its CPU use then reads 100 % and means nothing.
    ``tls=True`` runs every connection over TLS (an OpenSSL client session,
    no certificate verification); the window then starts once every
    connection has finished its handshake, and never later than 10 s after
    the warm-up.

    Returns a dict: ``requests`` (verified replies completed in the window),
    ``seconds`` (window length), ``rps``, ``p50_us``/``p90_us``/``p99_us``/``p999_us``/
    ``max_us``/``mean_us`` (request latency, issue to last reply byte), ``errors``
    (``verify_errors`` + ``io_errors`` + ``connect_errors`` + ``tls_errors``, over the whole run),
    ``bytes`` (request bytes echoed back in the window, frame headers included),
    ``client_cpu_s`` (the generator's own CPU time in the window, all threads),
    ``client_busy_s`` (the same less the time spent in empty polls with ``spin``),
    ``connects`` (successful connects, re-dials included), ``starved_connections``
    (connections that completed no request in the window: a stuck server or an
    unfair one shows here), with ``tls``: ``tls_handshakes`` (completed, re-dials
    included), ``tls_handshakes_in_window`` (0 unless connections were re-dialled
    during the window) and ``tls_errors`` (failed handshakes; a failed record
    counts as an I/O error), and the configuration.
    """
    cdef sockaddr_storage addr
    cdef socklen_t addrlen = 0
    cdef int family = 0
    cdef int t, i, k, msg_len, nthreads
    cdef Worker *workers = NULL
    cdef Worker *w
    cdef Conn *allconns = NULL
    cdef pthread_t *tids = NULL
    cdef int *started = NULL
    cdef uint64_t rnd
    cdef uint64_t *pw
    cdef int64_t t0
    cdef double wdur = duration, wwarm = warmup
    cdef uint64_t hist[HIST_BUCKETS]
    cdef uint64_t requests = 0, nbytes = 0, verr = 0, ioerr = 0, cerr = 0, conns_made = 0, starved = 0
    cdef uint64_t lat_sum = 0, lat_max = 0
    cdef int64_t cpu_ns = 0, measured_ns = 0, spin_idle_ns = 0
    cdef int setup_failed = 0
    cdef SSL_CTX *ssl_ctx = NULL
    cdef int tls_ready = 0
    cdef uint64_t handshakes = 0, hs_in_window = 0, tls_errors = 0

    if mode not in ("echo", "framed"):
        raise ValueError("mode must be 'echo' or 'framed'")
    if connections < 1:
        raise ValueError("connections must be >= 1")
    if size < 1:
        raise ValueError("size must be >= 1")
    if pipeline < 1:
        raise ValueError("pipeline must be >= 1")
    if threads < 1:
        raise ValueError("threads must be >= 1")
    if not duration > 0:
        raise ValueError("duration must be > 0")
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    nthreads = threads if threads <= connections else connections
    msg_len = size + (4 if mode == "framed" else 0)
    if pipeline > 65536:
        raise ValueError("pipeline must be <= 65536")
    if size > (1 << 30):
        raise ValueError("size must be <= 1 GiB")

    resolve(host, port, unix_path, &addr, &addrlen, &family)
    _raise_nofile(connections + 64)

    if tls:
        ssl_ctx = SSL_CTX_new(TLS_client_method())
        if ssl_ctx == NULL:
            raise MemoryError("SSL_CTX_new failed")
        SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_NONE, NULL)   # a benchmark: no PKI

    workers = <Worker *>calloc(nthreads, sizeof(Worker))
    allconns = <Conn *>calloc(connections, sizeof(Conn))
    tids = <pthread_t *>calloc(nthreads, sizeof(pthread_t))
    started = <int *>calloc(nthreads, sizeof(int))
    if workers == NULL or allconns == NULL or tids == NULL or started == NULL:
        free(workers); free(allconns); free(tids); free(started)
        if ssl_ctx != NULL:
            SSL_CTX_free(ssl_ctx)
        raise MemoryError()
    try:
        # each worker owns a contiguous slice of the connection array
        k = 0
        for t in range(nthreads):
            w = &workers[t]
            w.nconns = connections // nthreads + (1 if t < connections % nthreads else 0)
            w.conns = allconns + k
            k += w.nconns
            w.size = size
            w.msg_len = msg_len
            w.pipeline = pipeline
            w.framed = 1 if mode == "framed" else 0
            w.family = family
            memcpy(&w.addr, &addr, sizeof(addr))
            w.addrlen = addrlen
            w.notify_fd = notify_fd if t == 0 else -1
            w.spin = 1 if spin else 0
            w.ssl_ctx = ssl_ctx
            w.tls_ready = &tls_ready
            w.total_conns = connections
            w.epfd = -1
            w.offs_arena = <uint32_t *>malloc(sizeof(uint32_t) * <size_t>(pipeline * w.nconns))
            w.times = <int64_t *>malloc(sizeof(int64_t) * <size_t>(pipeline * w.nconns))
            w.pattern = <uint8_t *>malloc(<size_t>PATTERN_LEN + <size_t>size + 8)
            w.scratch = <uint8_t *>malloc(SCRATCH_LEN)
            if w.offs_arena == NULL or w.times == NULL or w.pattern == NULL or w.scratch == NULL:
                raise MemoryError()
            rnd = <uint64_t>seed * 0x100000001ULL + <uint64_t>t
            pw = <uint64_t *>w.pattern        # malloc'd memory is 8-aligned
            for i in range((PATTERN_LEN + size + 8) // 8):
                rnd = lg_mix64(rnd)
                pw[i] = rnd
            w.hdr[0] = <uint8_t>(<uint32_t>size >> 24)
            w.hdr[1] = <uint8_t>(<uint32_t>size >> 16)
            w.hdr[2] = <uint8_t>(<uint32_t>size >> 8)
            w.hdr[3] = <uint8_t>(<uint32_t>size)
            for i in range(w.nconns):
                w.conns[i].fd = -1
                w.conns[i].index = <uint32_t>i
                w.conns[i].ident = <uint64_t>(k - w.nconns + i)
                w.conns[i].offs = w.offs_arena + pipeline * i
                w.conns[i].t_sent = w.times + pipeline * i
        t0 = lg_now_ns()
        for t in range(nthreads):
            workers[t].win_start = t0 + <int64_t>(wwarm * 1e9)
            workers[t].win_end = workers[t].win_start + <int64_t>(wdur * 1e9)
            if tls:
                # opened by worker_main once every handshake is done (far away until then)
                workers[t].ready_at = workers[t].win_start
                workers[t].dur_ns = <int64_t>(wdur * 1e9)
                workers[t].win_start = t0 + <int64_t>1000000000000000
                workers[t].win_end = workers[t].win_start

        with nogil:
            for t in range(1, nthreads):
                if pthread_create(&tids[t], NULL, worker_main, &workers[t]) == 0:
                    started[t] = 1
                else:
                    workers[t].setup_failed = 1
            worker_main(&workers[0])
            for t in range(1, nthreads):
                if started[t]:
                    pthread_join(tids[t], NULL)

        memset(hist, 0, sizeof(hist))
        for t in range(nthreads):
            w = &workers[t]
            requests += w.requests
            nbytes += w.bytes
            verr += w.verify_errors
            ioerr += w.io_errors
            cerr += w.connect_errors
            conns_made += w.connects
            handshakes += w.handshakes
            hs_in_window += w.handshakes_in_window
            tls_errors += w.tls_errors
            starved += w.starved
            lat_sum += w.lat_sum
            if w.lat_max > lat_max:
                lat_max = w.lat_max
            cpu_ns += w.cpu_ns
            spin_idle_ns += w.spin_idle_ns
            if w.measured_ns > measured_ns:
                measured_ns = w.measured_ns
            setup_failed |= w.setup_failed
            for i in range(HIST_BUCKETS):
                hist[i] += w.hist[i]
        if setup_failed:
            raise OSError("load generator worker failed to start (epoll or thread creation)")
        seconds = measured_ns / 1e9 if measured_ns > 0 else duration
        return {
            "requests": requests,
            "seconds": seconds,
            "rps": requests / seconds if seconds > 0 else 0.0,
            "p50_us": hist_percentile(hist, requests, 0.50) / 1000.0,
            "p90_us": hist_percentile(hist, requests, 0.90) / 1000.0,
            "p99_us": hist_percentile(hist, requests, 0.99) / 1000.0,
            "p999_us": hist_percentile(hist, requests, 0.999) / 1000.0,
            "max_us": lat_max / 1000.0,
            "mean_us": (lat_sum / requests / 1000.0) if requests else 0.0,
            "errors": verr + ioerr + cerr + tls_errors,
            "verify_errors": verr,
            "io_errors": ioerr,
            "connect_errors": cerr,
            "bytes": nbytes,
            "client_cpu_s": cpu_ns / 1e9,
            "client_busy_s": (cpu_ns - spin_idle_ns) / 1e9 if spin else cpu_ns / 1e9,
            "connects": conns_made,
            "starved_connections": starved,
            "connections": connections,
            "threads": nthreads,
            "size": size,
            "mode": mode,
            "pipeline": pipeline,
            "tls": bool(tls),
            "tls_handshakes": handshakes,
            "tls_handshakes_in_window": hs_in_window,
            "tls_errors": tls_errors,
        }
    finally:
        for t in range(nthreads):
            free(workers[t].offs_arena)
            free(workers[t].times)
            free(workers[t].pattern)
            free(workers[t].scratch)
        free(workers)
        free(allconns)
        free(tids)
        free(started)
        if ssl_ctx != NULL:
            SSL_CTX_free(ssl_ctx)
