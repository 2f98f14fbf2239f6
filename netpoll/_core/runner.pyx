# Worker pool for runner="pool" (Netpoll's gopool): handlers may block, so they
# run on a bounded set of threads instead of the poller. The poller pushes work
# without the GIL; an idle worker wakes on a condition variable, takes the GIL
# and runs the item.
#
# With the GIL, waking is throttled: two workers running Python only trade the
# GIL (a futex wake and a context switch each time). A sleeping worker is woken
# only when no worker is active, or when the active ones have taken no task for
# STALL_NS (they are blocked in handlers); a worker with the GIL takes the next
# task without dropping it. Without the GIL (free-threaded build, q.parallel)
# workers really run at once, so each queued task not already covered by a
# spinning or signalled worker wakes one more.
#
# `waking` counts signals not yet consumed. A signal only wakes a worker that
# was not already signalled, so one is sent only while waking < idle: a signal
# sent past that is lost, and `waking` would stay raised for good (with the
# GIL that stops all later wake-ups).

import sys
import threading

from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree
from libc.string cimport memset

from netpoll._core.includes.system cimport (
    np_monotonic_ns,
    pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_cond_init, pthread_cond_destroy, pthread_cond_wait, pthread_cond_signal,
    pthread_cond_broadcast,
)


cdef extern from "compat.h" nogil:
    void np_cpu_relax()
    int np_atomic_load_int(int *p)
    size_t np_atomic_load_size(size_t *p)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef enum:
    STALL_NS = 200000     # 200 us without progress (GIL build): wake another worker

# An idle worker polls the queue this long before sleeping (_set_spin()).
cdef long long spin_ns = 50000


def _set_spin(long long ns):
    """Benchmark knob: how long (ns) one idle worker polls for work before
    sleeping; 0 disables."""
    global spin_ns
    if ns < 0:
        raise ValueError("spin time must be >= 0")
    spin_ns = ns


cdef inline bint _should_wake(np_taskq_t *q, long long now) noexcept nogil:
    # A signalled worker counts as active only once it runs, which on a busy
    # core is after the poller has pushed the rest of its batch: without
    # `waking`, every push of the batch woke one more worker to fight for
    # the GIL.
    if q.waking >= q.idle:
        return False            # every sleeping worker is already signalled
    if q.parallel:
        return q.count > <size_t>(q.waking + q.spinning)
    if q.waking > 0:
        return False
    if q.active == 0:
        return q.spinning == 0      # a spinning worker picks it up without a wake
    return now - q.progress_ns > STALL_NS


cdef void np_taskq_check_stall(np_taskq_t *q, long long now) noexcept nogil:
    if q.count == 0:        # racy read: only a hint, checked again under the lock
        return
    pthread_mutex_lock(&q.lock)
    if q.count > 0 and _should_wake(q, now):
        q.progress_ns = now
        q.waking += 1
        pthread_cond_signal(&q.cond)
    pthread_mutex_unlock(&q.lock)


cdef int np_taskq_push(np_taskq_t *q, void *item) noexcept nogil:
    cdef void **grown
    cdef size_t i, newcap
    cdef long long now
    pthread_mutex_lock(&q.lock)
    if q.count == q.cap:
        newcap = q.cap * 2 if q.cap else 64
        grown = <void **>PyMem_RawMalloc(newcap * sizeof(void *))
        if grown == NULL:
            pthread_mutex_unlock(&q.lock)
            return -1
        for i in range(q.count):
            grown[i] = q.items[(q.head + i) % q.cap]
        PyMem_RawFree(q.items)
        q.items = grown
        q.cap = newcap
        q.head = 0
    q.items[(q.head + q.count) % q.cap] = item
    q.count += 1
    if q.idle > 0:
        now = np_monotonic_ns()
        if _should_wake(q, now):
            q.progress_ns = now   # one wake per stall period, not one per item
            q.waking += 1
            pthread_cond_signal(&q.cond)
    pthread_mutex_unlock(&q.lock)
    return 0


cdef inline void *_try_pop(np_taskq_t *q) noexcept nogil:
    """Next item or NULL, without waiting, for a worker counted as active
    (the caller may hold the GIL: the lock is held for a few instructions).
    On NULL the worker stops counting as active."""
    cdef void *item = NULL
    pthread_mutex_lock(&q.lock)
    if q.count > 0:
        item = q.items[q.head]
        q.head = (q.head + 1) % q.cap
        q.count -= 1
        q.progress_ns = np_monotonic_ns()
    else:
        q.active -= 1
    pthread_mutex_unlock(&q.lock)
    return item


cdef void _spin(np_taskq_t *q) noexcept nogil:
    """Poll for work for up to SPIN_NS before sleeping (one spinner at a time):
    a burst that arrives meanwhile costs no futex wake and no context switch.
    Yields the CPU every few polls so a poller on the same core runs."""
    cdef long long until
    cdef int i = 0
    if spin_ns <= 0:
        return
    pthread_mutex_lock(&q.lock)
    if q.spinning or q.count > 0 or q.stopping:
        pthread_mutex_unlock(&q.lock)
        return
    q.spinning = 1
    pthread_mutex_unlock(&q.lock)
    until = np_monotonic_ns() + spin_ns
    while np_atomic_load_size(&q.count) == 0 and not np_atomic_load_int(&q.stopping):
        i += 1
        if i % 16 == 0:
            sched_yield()
            if np_monotonic_ns() > until:
                break
        else:
            np_cpu_relax()
    pthread_mutex_lock(&q.lock)
    q.spinning = 0
    pthread_mutex_unlock(&q.lock)


cdef void *_pop_wait(np_taskq_t *q) noexcept nogil:
    """Next item, waiting while the queue is empty; NULL once stopping and drained."""
    cdef void *item = NULL
    _spin(q)
    pthread_mutex_lock(&q.lock)
    while q.count == 0 and not q.stopping:
        q.idle += 1
        pthread_cond_wait(&q.cond, &q.lock)
        q.idle -= 1
        if q.waking > 0:
            q.waking -= 1
    if q.count > 0:
        item = q.items[q.head]
        q.head = (q.head + 1) % q.cap
        q.count -= 1
        q.active += 1
        q.progress_ns = np_monotonic_ns()
    pthread_mutex_unlock(&q.lock)
    return item


cdef class WorkerPool:
    """A fixed set of worker threads draining a C queue.

    Items are run in FIFO order, each by exactly one worker. `stop()` lets the
    workers finish what is queued, then joins them.
    """

    def __cinit__(self):
        self.q = <np_taskq_t *>PyMem_RawMalloc(sizeof(np_taskq_t))
        if self.q == NULL:
            raise MemoryError()
        memset(self.q, 0, sizeof(np_taskq_t))
        pthread_mutex_init(&self.q.lock, NULL)
        pthread_cond_init(&self.q.cond, NULL)
        self.threads = []
        self.size = 0

    def __init__(self, int size=16, str name="netpoll-worker"):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        if self.threads:
            raise RuntimeError("WorkerPool already started")
        self.size = size
        # Free-threaded build with the GIL off (it can only be turned back on
        # at start-up, before any pool exists).
        self.q.parallel = not getattr(sys, "_is_gil_enabled", lambda: True)()
        for i in range(size):
            t = threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            self.threads.append(t)
        for t in self.threads:
            t.start()

    def _work(self):
        cdef void *item
        cdef np_taskq_t *q = self.q
        with nogil:
            item = _pop_wait(q)
        while item != NULL:
            if q.handler != NULL:
                q.handler(item)
            # Keep the GIL from one task to the next while work is queued:
            # dropping it per task hands it to another worker every time.
            item = _try_pop(q)
            if item == NULL:
                with nogil:
                    item = _pop_wait(q)

    def pending(self):
        """Items queued and not yet picked up by a worker."""
        return self.q.count

    def active(self):
        """Workers running a task."""
        return self.q.active

    def stop(self, timeout=None):
        """Stop accepting work once the queue drains and join the workers."""
        pthread_mutex_lock(&self.q.lock)
        self.q.stopping = 1
        pthread_cond_broadcast(&self.q.cond)
        pthread_mutex_unlock(&self.q.lock)
        current = threading.current_thread()
        for t in self.threads:
            if t is not current:
                t.join(timeout)

    def __dealloc__(self):
        if self.q != NULL:
            # Workers hold a reference to self while running, so none is left.
            PyMem_RawFree(self.q.items)
            pthread_cond_destroy(&self.q.cond)
            pthread_mutex_destroy(&self.q.lock)
            PyMem_RawFree(self.q)
            self.q = NULL

    def __repr__(self):
        return f"<WorkerPool size={self.size} pending={self.q.count}>"
