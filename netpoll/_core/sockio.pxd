# The library's one recv primitive and one send loop, shared by connections
# (connection.pyx) and Reactor handlers (reactor.pyx). Inline: they sit on
# every request's path, and a call through an imported function pointer
# would cost more than their bodies.
#
# Non-socket fds (a Reactor handler on a pipe) fall back to read/write/writev.

from libc.stdint cimport uint64_t
from libc.string cimport memset
from netpoll._core.includes.system cimport (
    iovec, msghdr, recv, send, sendmsg, writev, errno, EINTR, EAGAIN, EWOULDBLOCK,
    NP_MSG_NOSIGNAL,
)
from netpoll._core.linkbuffer cimport np_lb_t, np_lb_iovecs, np_lb_consume, np_lb_release

cdef extern from "<unistd.h>" nogil:
    ssize_t _np_write "write"(int fd, const void *buf, size_t n)
    ssize_t _np_read "read"(int fd, void *buf, size_t n)

cdef extern from "<errno.h>" nogil:
    int ENOTSOCK

cdef enum:
    NP_MAX_IOV = 64             # iovecs per sendmsg


cdef inline ssize_t np_recv(int fd, char *buf, size_t n) noexcept nogil:
    """recv() retried on EINTR; read() on a non-socket. errno is kept."""
    cdef ssize_t r
    while True:
        r = recv(fd, buf, n, 0)
        if r < 0 and errno == ENOTSOCK:
            r = _np_read(fd, buf, n)
        if r < 0 and errno == EINTR:
            continue
        return r


cdef inline ssize_t np_send(int fd, const char *buf, size_t n) noexcept nogil:
    """One send() retried on EINTR (write() on a non-socket). errno is kept."""
    cdef ssize_t r
    while True:
        r = send(fd, buf, n, NP_MSG_NOSIGNAL)
        if r < 0 and errno == ENOTSOCK:
            r = _np_write(fd, buf, n)
        if r < 0 and errno == EINTR:
            continue
        return r


cdef inline int np_send_lb(int fd, np_lb_t *lb, uint64_t *sent) noexcept nogil:
    """Send lb's readable bytes until done (0), EAGAIN (1) or error (-errno),
    consuming what was sent; adds it to *sent unless NULL. The caller owns
    sending on this fd (one sender at a time)."""
    cdef iovec iov[NP_MAX_IOV]
    cdef msghdr msg
    cdef size_t total
    cdef ssize_t r
    cdef int cnt
    memset(&msg, 0, sizeof(msg))
    while True:
        cnt = np_lb_iovecs(lb, iov, NP_MAX_IOV, &total)
        if cnt == 0:
            np_lb_release(lb)
            return 0
        if cnt == 1:
            # One region (the common reply): send() skips msghdr/iovec import.
            r = np_send(fd, <const char *>iov[0].iov_base, iov[0].iov_len)
        else:
            msg.msg_iov = iov
            msg.msg_iovlen = cnt
            r = sendmsg(fd, &msg, NP_MSG_NOSIGNAL)
            if r < 0 and errno == ENOTSOCK:
                r = writev(fd, iov, cnt)
        if r >= 0:
            if sent != NULL:
                sent[0] += <uint64_t>r
            if <size_t>r == total and cnt < NP_MAX_IOV:
                # Everything readable was sent: done without another look.
                np_lb_consume(lb, <size_t>r, True)
                return 0
            np_lb_consume(lb, <size_t>r, False)
            continue
        if errno == EINTR:
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            return 1
        return -errno
