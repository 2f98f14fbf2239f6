"""Test scaffolding for the netpoll core: not part of the library's API.

The core's C-level pieces have no Python surface of their own; the tests and
micro-benchmarks reach them through this module:

- ``TimerHeap``: a Python-visible heap that owns its timers, over the C timer
  heap of timer.pyx (the same code the pollers drive without the GIL);
- ``_selftest_c_api()``: the C paths ``TimerHeap`` cannot reach;
- ``monotonic_ns()``: the clock of every deadline in the core.
- ``fail_timer_pushes(n)``, ``fail_chunk_allocs(n)``: fault injection, the
  next n timer pushes or buffer chunk allocations fail as when memory is out
  (what the core does then is tested).

Nothing in ``netpoll`` imports it.
"""

cimport cython
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc
from libc.errno cimport EINVAL, errno
from libc.stdint cimport INT64_MIN, int64_t, uint64_t, uintptr_t

from netpoll._core.includes.system cimport np_monotonic_ns, np_set_errno
from netpoll._core.linkbuffer cimport np_chunk_fail_next_allocs
from netpoll._core.timer cimport (
    TIMER_HEAP_ARITY, np_timer_heap_t, np_timer_t, timer_before, timer_heap_free,
    timer_heap_init, timer_heap_peek, timer_heap_pop_expired, timer_heap_push,
    timer_fail_next_pushes, timer_heap_remove, timer_heap_timeout_ms, timer_init,
)


# ---------------------------------------------------------- Python wrapper

def monotonic_ns():
    """The CLOCK_MONOTONIC time in nanoseconds, the clock every timer deadline in
    the core is expressed in.
    """
    return np_monotonic_ns()


cdef inline int64_t _as_int64(object value, str name) except? -1:
    # Only real ints: a float deadline would be silently truncated otherwise.
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value  # OverflowError outside int64


@cython.final
@cython.no_gc_clear  # keep _handles valid until __dealloc__, even in a GC cycle
cdef class TimerHeap:
    """A timer heap that owns its timers, for tests and benchmarks.

    Each ``push`` allocates one timer and returns a handle: a distinct int,
    increasing over the heap's lifetime and never reused. Timers fire in
    ``(when_ns, push order)`` order. The heap keeps each payload alive until
    its timer fires or is cancelled. Relies on the GIL: no method lets other
    Python code run while the C heap and the handle table disagree.
    """
    cdef np_timer_heap_t _heap
    # handle -> (timer address as int, payload): the only path from a handle
    # to memory, so a stale or forged handle can never reach a freed timer.
    cdef dict _handles
    cdef uint64_t _next_handle

    def __cinit__(self):
        self._handles = {}
        self._next_handle = 1
        if timer_heap_init(&self._heap) < 0:
            raise MemoryError()

    def __dealloc__(self):
        # Walk the C array rather than the dict: it is the authority on which
        # timers are allocated, and the dict may already be cleared by the GC.
        cdef Py_ssize_t i
        for i in range(self._heap.size):
            PyMem_RawFree(self._heap.items[i])
        self._heap.size = 0
        timer_heap_free(&self._heap)

    def __len__(self):
        """Number of scheduled (not yet fired or cancelled) timers."""
        return self._heap.size

    def push(self, when_ns, payload):
        """Schedule ``payload`` at the absolute monotonic deadline ``when_ns`` and
        return its handle. Raises TypeError if ``when_ns`` is not an int,
        OverflowError if it does not fit in int64, MemoryError if allocation
        fails (then nothing is scheduled).
        """
        cdef int64_t when = _as_int64(when_ns, "when_ns")
        cdef np_timer_t *t = <np_timer_t *>PyMem_RawMalloc(sizeof(np_timer_t))
        if t == NULL:
            raise MemoryError()
        timer_init(t)
        t.when = when
        t.id = self._next_handle
        handle = t.id
        # Register first so that, if the heap cannot grow, undoing is a dict
        # deletion and a free of a timer the heap never saw.
        try:
            self._handles[handle] = (<uintptr_t>t, payload)
        except BaseException:
            PyMem_RawFree(t)
            raise
        if timer_heap_push(&self._heap, t) < 0:
            del self._handles[handle]
            PyMem_RawFree(t)
            raise MemoryError()
        self._next_handle += 1
        return handle

    def cancel(self, handle):
        """Unschedule the timer with this handle and drop the heap's reference to
        its payload. True if it was scheduled; False for a handle that already
        fired, was cancelled, or never existed (any int is safe). TypeError if
        ``handle`` is not an int.
        """
        cdef np_timer_t *t
        if not isinstance(handle, int):
            raise TypeError(f"handle must be an int, not {type(handle).__name__}")
        # Only handles found in the dict lead to memory, so forged ones are
        # rejected without dereferencing anything.
        entry = self._handles.pop(handle, None)
        if entry is None:
            return False
        t = <np_timer_t *><uintptr_t>(<tuple>entry)[0]
        timer_heap_remove(&self._heap, t)
        PyMem_RawFree(t)
        # The payload is released when `entry` dies, after the heap is
        # consistent again, so its finalizer may safely call back into us.
        return True

    def reschedule(self, handle, when_ns):
        """Move a scheduled timer to the deadline ``when_ns`` (re-arm) and
        return True; it then fires after timers already waiting for the same
        deadline, exactly as after cancel + push, but keeps its handle and
        payload. False if the handle is not scheduled (nothing changes).
        TypeError for non-int arguments, OverflowError outside int64.
        """
        cdef int64_t when = _as_int64(when_ns, "when_ns")
        cdef np_timer_t *t
        if not isinstance(handle, int):
            raise TypeError(f"handle must be an int, not {type(handle).__name__}")
        entry = self._handles.get(handle)
        if entry is None:
            return False
        t = <np_timer_t *><uintptr_t>(<tuple>entry)[0]
        t.when = when
        # A scheduled timer is re-positioned in place, which cannot fail.
        if timer_heap_push(&self._heap, t) < 0:
            raise SystemError("timer_heap_push failed on a scheduled timer")
        return True

    def pop_expired(self, now_ns):
        """Remove and return every timer with ``when_ns <= now_ns`` as
        ``(when_ns, handle, payload)``, in firing order (deadline, then push
        order). Empty list when none is due.
        """
        cdef int64_t now = _as_int64(now_ns, "now_ns")
        cdef np_timer_t *t
        cdef list fired = []
        while True:
            t = timer_heap_pop_expired(&self._heap, now)
            if t == NULL:
                break
            when = t.when
            handle = t.id
            PyMem_RawFree(t)
            entry = self._handles.pop(handle, None)
            if entry is None:
                # Only possible if the GC cleared our dict while breaking a
                # cycle; the payload is gone, so report nothing for it.
                continue
            fired.append((when, handle, (<tuple>entry)[1]))
        return fired

    def peek(self):
        """``(when_ns, handle)`` of the timer that fires next, or None if empty."""
        cdef np_timer_t *t = timer_heap_peek(&self._heap)
        if t == NULL:
            return None
        return (t.when, t.id)

    def timeout_ms(self, now_ns, max_ms=-1):
        """Milliseconds from ``now_ns`` until the next deadline, rounded up (a
        poll with this timeout never wakes early); 0 if a timer is due. If
        empty: ``max_ms``, or -1 when ``max_ms`` is negative. A non-negative
        ``max_ms`` also caps the result.
        """
        cdef int64_t now = _as_int64(now_ns, "now_ns")
        cdef int limit
        if not isinstance(max_ms, int):
            raise TypeError(f"max_ms must be an int, not {type(max_ms).__name__}")
        limit = max_ms  # OverflowError outside C int
        return timer_heap_timeout_ms(&self._heap, now, limit)

    def check_invariants(self):
        """Walk the array and raise AssertionError if anything is inconsistent:
        a parent later than a child in (when, seq) order, an index
        back-pointer that does not match the slot, a seq not below the next
        one, or a disagreement between the array and the handle table.
        """
        cdef np_timer_heap_t *h = &self._heap
        cdef Py_ssize_t i, parent
        cdef np_timer_t *t
        if not 0 <= h.size <= h.cap:
            raise AssertionError(f"size {h.size} outside [0, cap={h.cap}]")
        if h.cap > 0 and h.items == NULL:
            raise AssertionError("cap > 0 but no array")
        if h.size != len(self._handles):
            raise AssertionError(f"heap has {h.size} timers, table has {len(self._handles)}")
        for i in range(h.size):
            t = h.items[i]
            if t == NULL:
                raise AssertionError(f"NULL timer at slot {i}")
            if t.index != i:
                raise AssertionError(f"timer at slot {i} has index {t.index}")
            if t.seq >= h.next_seq:
                raise AssertionError(f"slot {i}: seq {t.seq} >= next_seq {h.next_seq}")
            if i > 0:
                parent = (i - 1) // TIMER_HEAP_ARITY
                if timer_before(t, h.items[parent]):
                    raise AssertionError(
                        f"slot {i} ({t.when}, {t.seq}) precedes its parent "
                        f"slot {parent} ({h.items[parent].when}, {h.items[parent].seq})"
                    )
            entry = self._handles.get(t.id)
            if entry is None or (<tuple>entry)[0] != <uintptr_t>t:
                raise AssertionError(f"slot {i}: handle {t.id} not mapped to this timer")


# ---------------------------------------------------------------- self-test

cdef int _check(bint ok, str what) except -1:
    if not ok:
        raise AssertionError(what)
    return 0


def fail_chunk_allocs(int n):
    """Fault injection: the next `n` buffer chunk allocations (any buffer, the
    connections' included) fail as when memory is out; 0 turns it off."""
    np_chunk_fail_next_allocs(n)


def fail_timer_pushes(int n):
    """Fault injection: the next `n` pushes of a timer into any heap (the
    pollers' included) fail as when memory is out (ENOMEM); 0 turns it off.
    For the tests of what the core does when it cannot arm a timer."""
    timer_fail_next_pushes(n)


def _selftest_c_api():
    """Exercise the C-level paths that TimerHeap cannot reach (timers of
    another heap, freeing a heap with timers in it, reuse after free, the
    empty-heap answers) and raise AssertionError on the first wrong answer.
    For the test suite.
    """
    cdef np_timer_heap_t a, b
    cdef np_timer_t t[300]
    cdef np_timer_t lone
    cdef Py_ssize_t i, _n
    cdef int r_push, r_errno
    cdef bint r_remove, ok_empty
    cdef np_timer_t *p
    cdef int64_t prev_when
    cdef uint64_t prev_seq

    timer_init(&lone)
    _check(lone.index == -1 and lone.when == 0 and lone.seq == 0 and lone.kind == 0
           and lone.data == NULL and lone.id == 0, "timer_init fields")
    for i in range(300):
        timer_init(&t[i])

    _check(timer_heap_init(&a) == 0 and timer_heap_init(&b) == 0, "heap init")
    try:
        with nogil:
            # Empty-heap answers.
            ok_empty = (timer_heap_peek(&a) == NULL
                         and timer_heap_pop_expired(&a, 1 << 62) == NULL
                         and timer_heap_timeout_ms(&a, 0, -1) == -1
                         and timer_heap_timeout_ms(&a, 0, -7) == -1
                         and timer_heap_timeout_ms(&a, 0, 0) == 0
                         and timer_heap_timeout_ms(&a, 0, 250) == 250)
        _check(ok_empty, "empty heap: peek/pop/timeout_ms")
        _check(not timer_heap_remove(&a, &lone), "remove of an unscheduled timer")

        # Past the initial capacity, so the array grows a few times.
        for i in range(300):
            t[i].when = (i * 7919) % 301
            _check(timer_heap_push(&a, &t[i]) == 0, "push")
        _check(a.size == 300 and a.cap >= 300, "size after 300 pushes")

        # A timer scheduled in heap a is refused by heap b, and b is unchanged.
        timer_heap_push(&b, &lone)
        np_set_errno(0)
        r_push = timer_heap_push(&b, &t[5])
        r_errno = errno
        _check(r_push == -1 and r_errno == EINVAL, "push of another heap's timer -> -1/EINVAL")
        _check(b.size == 1 and b.items[0] == &lone, "other heap untouched by the refused push")
        r_remove = timer_heap_remove(&b, &t[0])
        _check(not r_remove and a.items[t[0].index] == &t[0], "remove of another heap's timer")

        # Re-arm to the front and to the back: new seq, still one entry each.
        t[10].when = -1
        _check(timer_heap_push(&a, &t[10]) == 0 and a.size == 300, "re-arm in place")
        _check(timer_heap_peek(&a) == &t[10], "re-armed timer is now first")
        t[10].when = 1000
        _check(timer_heap_push(&a, &t[10]) == 0 and a.size == 300, "re-arm to the back")

        # Drain: non-decreasing (when, seq), every popped timer unscheduled.
        prev_when = INT64_MIN
        prev_seq = 0
        for _n in range(299):
            p = timer_heap_pop_expired(&a, 999)
            _check(p != NULL and p.index == -1, "pop_expired returns unscheduled timers")
            _check(p.when > prev_when or (p.when == prev_when and p.seq > prev_seq),
                   "pop order")
            prev_when = p.when
            prev_seq = p.seq
        _check(timer_heap_pop_expired(&a, 999) == NULL, "t[10] not due at 999")
        _check(timer_heap_timeout_ms(&a, 999, -1) == 1, "1 ns away rounds up to 1 ms")
        _check(timer_heap_pop_expired(&a, 1000) == &t[10] and a.size == 0, "last pop")

        # free() with timers still in: they read as unscheduled afterwards.
        for i in range(3):
            timer_heap_push(&a, &t[i])
    finally:
        timer_heap_free(&a)
    _check(t[0].index == -1 and t[1].index == -1 and t[2].index == -1,
           "timer_heap_free marks scheduled timers index -1")
    _check(a.items == NULL and a.size == 0 and a.cap == 0, "freed heap is empty")
    timer_heap_free(&a)  # a second free is harmless
    # A freed heap is reusable: the array comes back on the next push.
    _check(timer_heap_push(&a, &t[0]) == 0 and a.size == 1, "push after free")
    _check(timer_heap_remove(&a, &t[0]) and a.size == 0 and t[0].index == -1,
           "remove of the only timer")
    timer_heap_free(&a)
    timer_heap_free(&b)
    _check(lone.index == -1, "lone unscheduled by free of b")
