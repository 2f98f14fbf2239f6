# C declarations used by the core, all callable without the GIL.
# Platform differences live in compat.h; this file only declares.

from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)
    ssize_t readv(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int shutdown(int fd, int how)
    int SHUT_RD, SHUT_WR, SHUT_RDWR
    int MSG_DONTWAIT, MSG_PEEK

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN, POLLOUT, POLLERR, POLLHUP

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN, EWOULDBLOCK, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM
    int ECONNABORTED, ECONNRESET, EPIPE, EINPROGRESS, ETIMEDOUT, EBADF, EINVAL, ENOENT

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    ctypedef unsigned long pthread_t
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_condattr_init(pthread_condattr_t *a)
    int pthread_condattr_destroy(pthread_condattr_t *a)
    int pthread_cond_init(pthread_cond_t *c, pthread_condattr_t *a)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_signal(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)
    pthread_t pthread_self()
    int pthread_equal(pthread_t a, pthread_t b)

cdef extern from *:
    """
    #include <pthread.h>
    #include <time.h>
    /* Condition variables that wait on CLOCK_MONOTONIC where the platform allows,
       so that wall-clock jumps do not stretch or cut timeouts. */
    static inline int np_cond_init_monotonic(pthread_cond_t *c) {
    #if defined(__linux__)
        pthread_condattr_t a;
        int r;
        pthread_condattr_init(&a);
        pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
        r = pthread_cond_init(c, &a);
        pthread_condattr_destroy(&a);
        return r;
    #else
        return pthread_cond_init(c, NULL);
    #endif
    }
    /* Wait until the absolute monotonic deadline `deadline_ns` (< 0: forever).
       Returns 0 when signalled (or spuriously woken), ETIMEDOUT at the deadline. */
    static inline int np_cond_wait_until(pthread_cond_t *c, pthread_mutex_t *m, long long deadline_ns) {
        struct timespec ts;
        if (deadline_ns < 0) return pthread_cond_wait(c, m);
    #if defined(__linux__)
        ts.tv_sec = (time_t)(deadline_ns / 1000000000LL);
        ts.tv_nsec = (long)(deadline_ns % 1000000000LL);
        return pthread_cond_timedwait(c, m, &ts);
    #else
        {
            /* macOS lacks setclock: convert the remaining time to a relative wait. */
            struct timespec now;
            long long rem;
            clock_gettime(CLOCK_MONOTONIC, &now);
            rem = deadline_ns - ((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
            if (rem <= 0) return ETIMEDOUT;
            ts.tv_sec = (time_t)(rem / 1000000000LL);
            ts.tv_nsec = (long)(rem % 1000000000LL);
            return pthread_cond_timedwait_relative_np(c, m, &ts);
        }
    #endif
    }
    """
    int np_cond_init_monotonic(pthread_cond_t *c) nogil
    int np_cond_wait_until(pthread_cond_t *c, pthread_mutex_t *m, long long deadline_ns) nogil

cdef extern from "compat.h" nogil:
    void np_set_errno(int e)
    ctypedef struct np_event_t:
        void *ptr
        uint32_t events
    uint32_t NP_EV_READ, NP_EV_WRITE, NP_EV_HUP, NP_EV_ERR, NP_EV_RDHUP
    uint32_t NP_EV_ET
    int NP_POLL_MAX
    int NP_MSG_NOSIGNAL

    ctypedef struct np_spin_t:
        int v
    void np_spin_init(np_spin_t *l)
    void np_spin_lock(np_spin_t *l)
    void np_spin_unlock(np_spin_t *l)
    unsigned int np_atomic_load_uint(unsigned int *p)

    bint np_take_injected_failure(int *left)
    int np_atomic_inc_int(int *p)
    int np_atomic_dec_int(int *p)
    int np_atomic_load_int(int *p)
    void np_atomic_store_int(int *p, int v)
    int np_atomic_cas_int(int *p, int expected, int desired)
    int np_atomic_xchg_int(int *p, int v)
    size_t np_atomic_load_size(size_t *p)
    void np_atomic_store_size(size_t *p, size_t v)

    int64_t np_monotonic_ns()

    int np_set_nonblock_cloexec(int fd)
    int np_set_nodelay(int fd)
    int np_set_nosigpipe(int fd)
    int np_accept(int lfd)
    int np_is_inet(int fd)

    int NP_CTL_ADD, NP_CTL_MOD, NP_CTL_DEL
    int NP_POLL_NEEDS_REBUILD
    int np_fd_identity(int fd, uint64_t *dev, uint64_t *ino)
    int np_poll_replace(int newfd, int oldfd)
    int np_poll_create()
    int np_poll_ctl(int pfd, int op, int fd, uint32_t ev, uint32_t old, void *ptr)
    int np_poll_wait(int pfd, np_event_t *out, int maxev, int timeout_ms)
    int np_wakeup_create(int *rfd, int *wfd)
    void np_wakeup_signal(int wfd)
    void np_wakeup_drain(int rfd)
    void np_wakeup_close(int rfd, int wfd)
