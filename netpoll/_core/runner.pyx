# Worker pool for runner="pool" (Netpoll's gopool): handlers may block, so they
# run on a bounded set of threads instead of the poller. The poller pushes work
# without the GIL; an idle worker wakes on a condition variable, takes the GIL
# and runs the item.

import threading

from cpython.mem cimport PyMem_RawMalloc, PyMem_RawRealloc, PyMem_RawFree
from libc.string cimport memset

from netpoll._core.includes.system cimport (
    pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_cond_init, pthread_cond_destroy, pthread_cond_wait, pthread_cond_signal,
    pthread_cond_broadcast,
)


cdef int np_taskq_push(np_taskq_t *q, void *item) noexcept nogil:
    cdef void **grown
    cdef size_t i, newcap
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
        pthread_cond_signal(&q.cond)
    pthread_mutex_unlock(&q.lock)
    return 0


cdef void *_pop_wait(np_taskq_t *q) noexcept nogil:
    """Next item, waiting while the queue is empty; NULL once stopping and drained."""
    cdef void *item = NULL
    pthread_mutex_lock(&q.lock)
    while q.count == 0 and not q.stopping:
        q.idle += 1
        pthread_cond_wait(&q.cond, &q.lock)
        q.idle -= 1
    if q.count > 0:
        item = q.items[q.head]
        q.head = (q.head + 1) % q.cap
        q.count -= 1
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
        for i in range(size):
            t = threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            self.threads.append(t)
        for t in self.threads:
            t.start()

    def _work(self):
        cdef void *item
        cdef np_taskq_t *q = self.q
        while True:
            with nogil:
                item = _pop_wait(q)
            if item == NULL:
                return
            if q.handler != NULL:
                q.handler(item)

    def pending(self):
        """Items queued and not yet picked up by a worker."""
        return self.q.count

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
