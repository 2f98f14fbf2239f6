# The worker pool behind runner="pool": a C queue of opaque items that the
# poller fills without the GIL, and Python worker threads that pop them
# (waiting without the GIL) and hand each to `handler` with the GIL held.

from netpoll._core.includes.system cimport pthread_mutex_t, pthread_cond_t

ctypedef void (*np_item_handler_t)(void *item) noexcept   # called with the GIL

cdef struct np_taskq_t:
    pthread_mutex_t lock
    pthread_cond_t cond
    void **items          # ring buffer
    size_t cap
    size_t head
    size_t count
    int idle              # workers waiting on cond
    int active            # workers running a task (or between two tasks)
    int spinning          # a worker is polling the queue before it sleeps
    int waking            # workers signalled that have not woken up yet
    long long progress_ns # when a worker last took a task
    int stopping
    int parallel          # no GIL: wake a worker per queued task (runner.pyx)
    np_item_handler_t handler

# 0, or -1 when memory is out (the item is not queued). Never blocks long.
cdef int np_taskq_push(np_taskq_t *q, void *item) noexcept nogil
# Wake a sleeping worker if items wait while the active ones are stalled
# (blocked in a handler). The pollers call it every iteration.
cdef void np_taskq_check_stall(np_taskq_t *q, long long now) noexcept nogil


cdef class WorkerPool:
    cdef np_taskq_t *q
    cdef list threads
    cdef readonly int size
    cdef object __weakref__
