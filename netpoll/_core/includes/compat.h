/*
 * Platform glue for netpoll's Cython core.
 *
 * Everything here is small and static inline so that the Cython modules stay
 * platform-neutral: one readiness API (np_poll_*) over epoll on Linux and
 * kqueue on macOS/BSD, a wake-up fd (eventfd or a pipe), accept with
 * non-blocking/cloexec flags, atomics and the monotonic clock.
 *
 * The kqueue half is compiled on macOS but cannot be tested on the Linux CI
 * machines; it is kept deliberately minimal.
 */
#ifndef NETPOLL_COMPAT_H
#define NETPOLL_COMPAT_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#define NP_EV_READ  0x1u
#define NP_EV_WRITE 0x2u
#define NP_EV_HUP   0x4u   /* peer hung up (both directions) */
#define NP_EV_ERR   0x8u
#define NP_EV_RDHUP 0x10u  /* peer shut down its write side */
#define NP_EV_ET    0x20u  /* np_poll_ctl only: edge-triggered (Reactor EV_*_ET) */

enum { NP_CTL_ADD = 0, NP_CTL_MOD = 1, NP_CTL_DEL = 2 };

typedef struct np_event_s {
    void *ptr;
    uint32_t events;
} np_event_t;

/* Cython binds `errno = x` inside a function to a new local variable, so
 * stores to errno go through this. */
static inline void np_set_errno(int e) { errno = e; }

/* ---------------------------------------------------------------- atomics */

/* Fault injection for the tests (netpoll._core.testing): a counter of
 * operations left to fail. 1 if this one is to fail (the counter is
 * decremented), else 0; outside the tests the counter is 0 and this costs one
 * relaxed load. */
static inline int np_take_injected_failure(int *left) {
    int v = __atomic_load_n(left, __ATOMIC_RELAXED);
    while (v > 0) {
        if (__atomic_compare_exchange_n(left, &v, v - 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return 1;
    }
    return 0;
}

static inline int np_atomic_inc_int(int *p) { return __atomic_add_fetch(p, 1, __ATOMIC_ACQ_REL); }
static inline int np_atomic_dec_int(int *p) { return __atomic_sub_fetch(p, 1, __ATOMIC_ACQ_REL); }
static inline int np_atomic_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void np_atomic_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline size_t np_atomic_load_size(size_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void np_atomic_store_size(size_t *p, size_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/* Sequentially consistent exchange: a full barrier, so a load after it
 * cannot be satisfied before the exchange is visible (store->load order). */
static inline int np_atomic_xchg_int(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline int np_atomic_cas_int(int *p, int expected, int desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static inline unsigned int np_atomic_load_uint(unsigned int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

/* Statistics counters (the chunk pool's), relaxed: load/store for counters
 * one thread writes and others only sample (the owner pays a plain load and
 * store), add/sub for counters every thread updates. */
static inline size_t np_atomic_load_size_relaxed(size_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void np_atomic_store_size_relaxed(size_t *p, size_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline size_t np_atomic_add_size(size_t *p, size_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
static inline size_t np_atomic_sub_size(size_t *p, size_t v) { return __atomic_sub_fetch(p, v, __ATOMIC_RELAXED); }

/* ------------------------------------------------------------- spinlock */

/* A test-and-test-and-set lock for the LinkBuffer and chunk-pool critical
 * sections. Its users hold it for pointer and counter updates, list walks
 * and copies of a few KiB at most: never across malloc/free, a syscall,
 * Python code or the GIL (linkbuffer.pyx allocates before and frees after
 * its critical sections). It is not reentrant: code that can run Python (a
 * finalizer, the GC) must never be reached while it is held. Uncontended it
 * is one atomic exchange and one store, inlined (a pthread mutex costs two
 * calls through the PLT). Under contention it spins briefly, then yields so
 * a preempted holder can run. */
#include <sched.h>
typedef struct { int v; } np_spin_t;

static inline void np_spin_init(np_spin_t *l) { l->v = 0; }

static inline void np_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline void np_spin_lock(np_spin_t *l) {
    int spins = 0;
    while (__atomic_exchange_n(&l->v, 1, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(&l->v, __ATOMIC_RELAXED)) {
            if (++spins < 128) np_cpu_relax();
            else { sched_yield(); spins = 0; }
        }
    }
}

static inline void np_spin_unlock(np_spin_t *l) { __atomic_store_n(&l->v, 0, __ATOMIC_RELEASE); }

/* ------------------------------------------------------------------ clock */

static inline int64_t np_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ------------------------------------------------------- socket helpers */

static inline int np_set_nonblock_cloexec(int fd) {
    int fl = fcntl(fd, F_GETFL, 0);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -1;
    fl = fcntl(fd, F_GETFD, 0);
    if (fl < 0 || fcntl(fd, F_SETFD, fl | FD_CLOEXEC) < 0) return -1;
    return 0;
}

static inline int np_set_nodelay(int fd) {
    int one = 1;
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

#ifdef MSG_NOSIGNAL
#define NP_MSG_NOSIGNAL MSG_NOSIGNAL
static inline int np_set_nosigpipe(int fd) { (void)fd; return 0; }
#else
#define NP_MSG_NOSIGNAL 0
static inline int np_set_nosigpipe(int fd) {
    int one = 1;
    return setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one));
}
#endif

/* Accept one connection, non-blocking and close-on-exec. */
static inline int np_accept(int lfd) {
#if defined(__linux__)
    return accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
    int fd = accept(lfd, NULL, NULL);
    if (fd >= 0 && (np_set_nonblock_cloexec(fd) < 0 || np_set_nosigpipe(fd) < 0)) {
        int e = errno; close(fd); errno = e; return -1;
    }
    return fd;
#endif
}

/* Is fd a TCP (AF_INET/AF_INET6 stream) socket? Used to decide on TCP_NODELAY. */
static inline int np_is_inet(int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0) return 0;
    return ss.ss_family == AF_INET || ss.ss_family == AF_INET6;
}

/* ------------------------------------------------------ readiness (poll) */

#if defined(__linux__)
#include <sys/epoll.h>
#include <sys/eventfd.h>

static inline int np_poll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

static inline uint32_t np__to_epoll(uint32_t ev) {
    uint32_t e = 0;
    if (ev & NP_EV_READ) e |= EPOLLIN | EPOLLRDHUP;
    if (ev & NP_EV_WRITE) e |= EPOLLOUT;
    if (ev & NP_EV_ET) e |= EPOLLET;
    return e;
}

/* op: NP_CTL_ADD, NP_CTL_MOD or NP_CTL_DEL. `old` is the previous mask (unused on epoll). */
static inline int np_poll_ctl(int pfd, int op, int fd, uint32_t ev, uint32_t old, void *ptr) {
    struct epoll_event e;
    (void)old;
    memset(&e, 0, sizeof(e));
    e.events = np__to_epoll(ev);
    e.data.ptr = ptr;
    return epoll_ctl(pfd, op == NP_CTL_ADD ? EPOLL_CTL_ADD : op == NP_CTL_MOD ? EPOLL_CTL_MOD : EPOLL_CTL_DEL, fd, &e);
}

#define NP_POLL_MAX 256
static inline int np_poll_wait(int pfd, np_event_t *out, int max, int timeout_ms) {
    struct epoll_event evs[NP_POLL_MAX];
    int i, n;
    if (max > NP_POLL_MAX) max = NP_POLL_MAX;
    n = epoll_wait(pfd, evs, max, timeout_ms);
    for (i = 0; i < n; i++) {
        uint32_t e = evs[i].events, r = 0;
        if (e & (EPOLLIN | EPOLLPRI)) r |= NP_EV_READ;
        if (e & EPOLLOUT) r |= NP_EV_WRITE;
        if (e & EPOLLRDHUP) r |= NP_EV_RDHUP | NP_EV_READ;
        if (e & EPOLLHUP) r |= NP_EV_HUP | NP_EV_READ;
        if (e & EPOLLERR) r |= NP_EV_ERR | NP_EV_READ;
        out[i].ptr = evs[i].data.ptr;
        out[i].events = r;
    }
    return n;
}

/* Wake-up channel: one eventfd used for both ends. */
static inline int np_wakeup_create(int *rfd, int *wfd) {
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0) return -1;
    *rfd = *wfd = fd;
    return 0;
}
static inline void np_wakeup_signal(int wfd) {
    uint64_t one = 1;
    ssize_t r = write(wfd, &one, sizeof(one));
    (void)r;
}
static inline void np_wakeup_drain(int rfd) {
    uint64_t v;
    ssize_t r = read(rfd, &v, sizeof(v));
    (void)r;
}
static inline void np_wakeup_close(int rfd, int wfd) { (void)wfd; close(rfd); }

#else /* kqueue: macOS and the BSDs. Built there, not testable on Linux CI. */
#include <sys/event.h>

static inline int np_poll_create(void) {
    int fd = kqueue();
    if (fd >= 0) fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
}

static inline int np_poll_ctl(int pfd, int op, int fd, uint32_t ev, uint32_t old, void *ptr) {
    struct kevent ch[2];
    int n = 0;
    if (op == NP_CTL_DEL) ev = 0;
    if ((ev & NP_EV_READ) && (op == NP_CTL_ADD || !(old & NP_EV_READ))) {
        EV_SET(&ch[n++], fd, EVFILT_READ, EV_ADD | ((ev & NP_EV_ET) ? EV_CLEAR : 0), 0, 0, ptr);
    } else if (!(ev & NP_EV_READ) && op != NP_CTL_ADD && (old & NP_EV_READ)) {
        EV_SET(&ch[n++], fd, EVFILT_READ, EV_DELETE, 0, 0, ptr);
    }
    if ((ev & NP_EV_WRITE) && (op == NP_CTL_ADD || !(old & NP_EV_WRITE))) {
        EV_SET(&ch[n++], fd, EVFILT_WRITE, EV_ADD | ((ev & NP_EV_ET) ? EV_CLEAR : 0), 0, 0, ptr);
    } else if (!(ev & NP_EV_WRITE) && op != NP_CTL_ADD && (old & NP_EV_WRITE)) {
        EV_SET(&ch[n++], fd, EVFILT_WRITE, EV_DELETE, 0, 0, ptr);
    }
    if (n == 0) return 0;
    return kevent(pfd, ch, n, NULL, 0, NULL);
}

#define NP_POLL_MAX 256
static inline int np_poll_wait(int pfd, np_event_t *out, int max, int timeout_ms) {
    struct kevent evs[NP_POLL_MAX];
    struct timespec ts, *tp = NULL;
    int i, n;
    if (max > NP_POLL_MAX) max = NP_POLL_MAX;
    if (timeout_ms >= 0) {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
        tp = &ts;
    }
    n = kevent(pfd, NULL, 0, evs, max, tp);
    for (i = 0; i < n; i++) {
        uint32_t r = 0;
        if (evs[i].filter == EVFILT_READ) r |= NP_EV_READ;
        if (evs[i].filter == EVFILT_WRITE) r |= NP_EV_WRITE;
        if (evs[i].flags & EV_EOF) r |= NP_EV_RDHUP | NP_EV_READ;
        if (evs[i].flags & EV_ERROR) r |= NP_EV_ERR | NP_EV_READ;
        out[i].ptr = evs[i].udata;
        out[i].events = r;
    }
    return n;
}

static inline int np_wakeup_create(int *rfd, int *wfd) {
    int p[2];
    if (pipe(p) < 0) return -1;
    np_set_nonblock_cloexec(p[0]);
    np_set_nonblock_cloexec(p[1]);
    *rfd = p[0];
    *wfd = p[1];
    return 0;
}
static inline void np_wakeup_signal(int wfd) {
    char c = 1;
    ssize_t r = write(wfd, &c, 1);
    (void)r;
}
static inline void np_wakeup_drain(int rfd) {
    char buf[64];
    while (read(rfd, buf, sizeof(buf)) > 0) {}
}
static inline void np_wakeup_close(int rfd, int wfd) { close(rfd); close(wfd); }
#endif

/* ------------------------------------------------ descriptor identity */

#include <sys/stat.h>

/* The (device, inode) pair that names the open file behind fd: the library
 * records it when it takes ownership of an fd and checks it before closing
 * the number, so that a number the user closed and the kernel reused for
 * another file is never closed by us. -1 if fstat fails (errno set). */
static inline int np_fd_identity(int fd, uint64_t *dev, uint64_t *ino) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -1;
    *dev = (uint64_t)st.st_dev;
    *ino = (uint64_t)st.st_ino;
    return 0;
}

/* Replace the poll set at number `oldfd` by the one at `newfd` (which is
 * closed). On epoll this drops every registration of the old set, including
 * ones keyed on files whose fd number we no longer have (see poller.pxd). */
#if defined(__linux__)
#define NP_POLL_NEEDS_REBUILD 1
static inline int np_poll_replace(int newfd, int oldfd) {
    int r = dup3(newfd, oldfd, O_CLOEXEC);
    int e = errno;
    close(newfd);
    errno = e;
    return r < 0 ? -1 : 0;
}
#else
/* kqueue removes a descriptor's events when that descriptor is closed, so a
 * registration never outlives the number: nothing to rebuild. */
#define NP_POLL_NEEDS_REBUILD 0
static inline int np_poll_replace(int newfd, int oldfd) { (void)oldfd; close(newfd); return 0; }
#endif

#endif /* NETPOLL_COMPAT_H */
