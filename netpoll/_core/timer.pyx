"""Timer heap of the netpoll core.

The C API (declared in timer.pxd) is an indexed 4-ary min-heap of caller-owned
``np_timer_t`` structs ordered by ``(when, seq)``. It never needs the GIL: the
poller calls it from its event loop with the GIL released. This module has no
Python-visible API: the tests reach the heap through ``TimerHeap`` in
netpoll/_core/testing.pyx.
"""

from cpython.mem cimport PyMem_RawFree, PyMem_RawRealloc
from libc.errno cimport EINVAL, ENOMEM
from libc.limits cimport INT_MAX
from libc.stdint cimport int64_t, uint64_t
from netpoll._core.includes.system cimport (
    np_atomic_store_int, np_set_errno, np_take_injected_failure,
)

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX


# A 4-ary heap (TIMER_HEAP_ARITY, timer.pxd) is shallower than a binary one
# (fewer cache misses per sift-up, which is what push does) at the cost of 3
# extra compares per sift-down level.
cdef enum:
    _INITIAL_CAP = 64

# Pushes left to fail (timer_fail_next_pushes): 0 outside the tests, so the
# push path pays one relaxed load and a branch that is never taken.
cdef int _fail_pushes = 0


# ------------------------------------------------------------------ helpers

cdef inline void _sift_up(np_timer_heap_t *h, Py_ssize_t i) noexcept nogil:
    # Move items[i] towards the root until its parent is earlier. Holes are
    # filled by moving parents down, so each timer's index is written once per
    # move and the moving timer's once at the end.
    cdef np_timer_t **items = h.items
    cdef np_timer_t *t = items[i]
    cdef Py_ssize_t parent
    while i > 0:
        parent = (i - 1) // TIMER_HEAP_ARITY
        if not timer_before(t, items[parent]):
            break
        items[i] = items[parent]
        items[i].index = i
        i = parent
    items[i] = t
    t.index = i


cdef inline void _sift_down(np_timer_heap_t *h, Py_ssize_t i) noexcept nogil:
    # Move items[i] towards the leaves until no child is earlier.
    cdef np_timer_t **items = h.items
    cdef Py_ssize_t n = h.size
    cdef np_timer_t *t = items[i]
    cdef Py_ssize_t first, last, c, best
    while True:
        first = TIMER_HEAP_ARITY * i + 1
        if first >= n:
            break
        last = first + TIMER_HEAP_ARITY
        if last > n:
            last = n
        best = first
        c = first + 1
        while c < last:
            if timer_before(items[c], items[best]):
                best = c
            c += 1
        if not timer_before(items[best], t):
            break
        items[i] = items[best]
        items[i].index = i
        i = best
    items[i] = t
    t.index = i


cdef inline void _fix(np_timer_heap_t *h, Py_ssize_t i) noexcept nogil:
    # Restore the heap after items[i] changed key (or was replaced): at most
    # one of the two directions moves it.
    if i > 0 and timer_before(h.items[i], h.items[(i - 1) // TIMER_HEAP_ARITY]):
        _sift_up(h, i)
    else:
        _sift_down(h, i)


cdef inline bint _owns(np_timer_heap_t *h, np_timer_t *t) noexcept nogil:
    # True if t sits in h. Bounds are checked before reading the slot, so a
    # timer from another heap (or with a stale index) is never dereferenced
    # beyond h's own array.
    cdef Py_ssize_t i = t.index
    return 0 <= i < h.size and h.items[i] == t


cdef int _grow(np_timer_heap_t *h) noexcept nogil:
    cdef Py_ssize_t new_cap
    cdef np_timer_t **items
    if h.cap == 0:
        new_cap = _INITIAL_CAP
    elif h.cap > PY_SSIZE_T_MAX // (2 * <Py_ssize_t>sizeof(np_timer_t *)):
        np_set_errno(ENOMEM)
        return -1
    else:
        new_cap = h.cap * 2
    items = <np_timer_t **>PyMem_RawRealloc(h.items, <size_t>new_cap * sizeof(np_timer_t *))
    if items == NULL:
        # The old array is still valid and still owned by h.
        np_set_errno(ENOMEM)
        return -1
    h.items = items
    h.cap = new_cap
    return 0


# ------------------------------------------------------------------- C API

cdef void timer_fail_next_pushes(int n) noexcept nogil:
    np_atomic_store_int(&_fail_pushes, n if n > 0 else 0)

cdef void timer_init(np_timer_t *t) noexcept nogil:
    t.when = 0
    t.seq = 0
    t.index = -1
    t.kind = 0
    t.data = NULL
    t.id = 0


cdef int timer_heap_init(np_timer_heap_t *h) noexcept nogil:
    h.items = NULL
    h.size = 0
    h.cap = 0
    h.next_seq = 0
    return _grow(h)


cdef void timer_heap_free(np_timer_heap_t *h) noexcept nogil:
    cdef Py_ssize_t i
    # Owners may look at index to decide whether to cancel later; make sure a
    # timer orphaned by the heap's death reads as unscheduled.
    for i in range(h.size):
        h.items[i].index = -1
    PyMem_RawFree(h.items)
    h.items = NULL
    h.size = 0
    h.cap = 0


cdef int timer_heap_push(np_timer_heap_t *h, np_timer_t *t) noexcept nogil:
    if t.index >= 0:
        if not _owns(h, t):
            np_set_errno(EINVAL)
            return -1
        # Re-arm in place: a fresh seq puts it behind timers already waiting
        # for the same deadline, exactly as a cancel + push would.
        t.seq = h.next_seq
        h.next_seq += 1
        _fix(h, t.index)
        return 0
    if np_take_injected_failure(&_fail_pushes):
        np_set_errno(ENOMEM)
        return -1
    if h.size == h.cap and _grow(h) < 0:
        return -1
    t.seq = h.next_seq
    h.next_seq += 1
    h.items[h.size] = t
    t.index = h.size
    h.size += 1
    _sift_up(h, h.size - 1)
    return 0


cdef bint timer_heap_remove(np_timer_heap_t *h, np_timer_t *t) noexcept nogil:
    cdef Py_ssize_t i
    cdef np_timer_t *moved
    if not _owns(h, t):
        return False
    i = t.index
    h.size -= 1
    t.index = -1
    if i != h.size:
        # Fill the hole with the last leaf; it may belong above or below.
        moved = h.items[h.size]
        h.items[i] = moved
        moved.index = i
        _fix(h, i)
    h.items[h.size] = NULL
    return True


cdef np_timer_t *timer_heap_peek(np_timer_heap_t *h) noexcept nogil:
    if h.size == 0:
        return NULL
    return h.items[0]


cdef np_timer_t *timer_heap_pop_expired(np_timer_heap_t *h, int64_t now) noexcept nogil:
    cdef np_timer_t *t
    if h.size == 0:
        return NULL
    t = h.items[0]
    if t.when > now:
        return NULL
    timer_heap_remove(h, t)
    return t


cdef int timer_heap_timeout_ms(np_timer_heap_t *h, int64_t now, int max_ms) noexcept nogil:
    cdef int64_t when
    cdef uint64_t delta, ms
    if h.size == 0:
        return max_ms if max_ms >= 0 else -1
    when = h.items[0].when
    if when <= now:
        return 0
    # when > now, so the true difference is in (0, 2**64): unsigned
    # subtraction gets it exactly even where int64 subtraction would overflow.
    delta = <uint64_t>when - <uint64_t>now
    # Ceiling division without the overflow of (delta + 999999).
    ms = (delta - 1) // 1000000 + 1
    if max_ms >= 0 and ms > <uint64_t>max_ms:
        return max_ms
    if ms > <uint64_t>INT_MAX:
        return INT_MAX
    return <int>ms
