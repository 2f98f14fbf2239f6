# Timer heap: an indexed 4-ary min-heap of caller-owned timers.
#
# The C API below never touches Python objects and never needs the GIL, so the
# poller can drive it from its event loop with the GIL released. The heap
# stores pointers only: every np_timer_t belongs to its owner, who must keep it
# alive (and not move it) while it is scheduled, and must call timer_init()
# once before its first push.
#
# Ordering is by (when, seq): earlier deadline first, and for equal deadlines
# the one pushed first (FIFO). Costs: push/remove/pop O(log n), peek O(1).

from libc.stdint cimport int64_t, uint64_t

cdef struct np_timer_t:
    int64_t when        # absolute CLOCK_MONOTONIC deadline in nanoseconds (set by the caller before push)
    uint64_t seq        # set by push: insertion order; ties on `when` fire in insertion order (FIFO)
    Py_ssize_t index    # position in the heap, -1 when not scheduled (init sets -1)
    int kind            # owner-defined tag, untouched by the heap
    void *data          # owner-defined pointer, untouched
    uint64_t id         # owner-defined id, untouched

cdef struct np_timer_heap_t:
    np_timer_t **items
    Py_ssize_t size
    Py_ssize_t cap
    uint64_t next_seq

# Fault injection for the tests (netpoll._core.testing.fail_timer_pushes): the
# next n pushes of an unscheduled timer, into any heap, fail as if the array
# could not grow (-1, errno ENOMEM). 0 turns it off.
cdef void timer_fail_next_pushes(int n) noexcept nogil

# index = -1, every other field zeroed.
cdef void timer_init(np_timer_t *t) noexcept nogil
# Empty heap with a small preallocated array: 0, or -1 (errno ENOMEM).
cdef int timer_heap_init(np_timer_heap_t *h) noexcept nogil
# Frees the array only (timers belong to their owners) after marking every
# still-scheduled timer index = -1. The heap is left empty and reusable; a
# second call is harmless.
cdef void timer_heap_free(np_timer_heap_t *h) noexcept nogil
# Schedule t at t.when. If t is already scheduled in h, re-position it after a
# change of t.when, with a new seq (it then fires after others with the same
# deadline); re-positioning never allocates. 0; -1 with errno ENOMEM when the
# array cannot grow (t stays unscheduled); -1 with errno EINVAL if t claims to
# be scheduled in another heap (nothing is changed).
cdef int timer_heap_push(np_timer_heap_t *h, np_timer_t *t) noexcept nogil
# Cancel: True if t was scheduled in h (it then has index -1), False otherwise
# (unscheduled, or scheduled in another heap; nothing is changed). O(log n).
cdef bint timer_heap_remove(np_timer_heap_t *h, np_timer_t *t) noexcept nogil
# Earliest timer (still scheduled), or NULL when empty. O(1).
cdef np_timer_t *timer_heap_peek(np_timer_heap_t *h) noexcept nogil
# Pop the earliest timer if its when <= now (it gets index -1), else NULL.
cdef np_timer_t *timer_heap_pop_expired(np_timer_heap_t *h, int64_t now) noexcept nogil
# Milliseconds until the earliest deadline, rounded UP so that a poll with this
# timeout never wakes before the deadline; 0 if already due. When the heap is
# empty: max_ms if max_ms >= 0, else -1 ("block forever"). A non-negative
# max_ms also caps the result; the result never exceeds INT_MAX.
cdef int timer_heap_timeout_ms(np_timer_heap_t *h, int64_t now, int max_ms) noexcept nogil


# The heap's shape and order, shared with its checker (netpoll/_core/testing.pyx):
# children of slot i are at ARITY*i+1 .. ARITY*i+ARITY, the parent of i at (i-1)/ARITY.
cdef enum:
    TIMER_HEAP_ARITY = 4

# Strict (when, seq) order; seq values are unique, so no two timers tie.
cdef inline bint timer_before(const np_timer_t *a, const np_timer_t *b) noexcept nogil:
    return a.when < b.when or (a.when == b.when and a.seq < b.seq)
