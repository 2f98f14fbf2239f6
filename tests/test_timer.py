"""Tests of netpoll._core.timer: the 4-ary timer heap, through the TimerHeap wrapper
of netpoll._core.testing.

The stateful test compares TimerHeap step by step with a reference model built
on ``heapq`` (ordered by (when, seq), lazy deletion) and checks the heap's
internal structure after every step.
"""

import gc
import heapq
import itertools
import random
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from netpoll._core.testing import TimerHeap, _selftest_c_api, monotonic_ns

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
MS = 1_000_000


def expected_timeout_ms(first_when, now, max_ms):
    """What timeout_ms must return, from its specification."""
    if first_when is None:
        return max_ms if max_ms >= 0 else -1
    if first_when <= now:
        return 0
    ms = -((now - first_when) // MS)  # ceiling division
    if max_ms >= 0 and ms > max_ms:
        return max_ms
    return min(ms, INT_MAX)


class HeapModel:
    """Reference: heapq of [when, seq, handle, payload] with lazy deletion."""

    def __init__(self):
        self.heap = []
        self.live = {}  # handle -> its current heap entry
        self.seq = itertools.count()

    def _schedule(self, when, handle, payload):
        entry = [when, next(self.seq), handle, payload]
        self.live[handle] = entry
        heapq.heappush(self.heap, entry)

    def push(self, when, handle, payload):
        self._schedule(when, handle, payload)

    def _drop_dead(self):
        while self.heap and self.live.get(self.heap[0][2]) is not self.heap[0]:
            heapq.heappop(self.heap)

    def cancel(self, handle):
        return self.live.pop(handle, None) is not None

    def reschedule(self, handle, when):
        entry = self.live.get(handle)
        if entry is None:
            return False
        self._schedule(when, handle, entry[3])  # the old entry is now dead
        return True

    def pop_expired(self, now):
        out = []
        self._drop_dead()
        while self.heap and self.heap[0][0] <= now:
            when, _seq, handle, payload = heapq.heappop(self.heap)
            del self.live[handle]
            out.append((when, handle, payload))
            self._drop_dead()
        return out

    def peek(self):
        self._drop_dead()
        return (self.heap[0][0], self.heap[0][2]) if self.heap else None

    def __len__(self):
        return len(self.live)


class Payload:
    """A distinct object per timer; equality is identity."""

    __slots__ = ("n",)

    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"Payload({self.n})"


# Deadlines: mostly a narrow range, so that ties (FIFO order) and interleaved
# expiries are common, plus the int64 extremes.
whens = st.one_of(
    st.integers(-20, 60),
    st.integers(-20, 60).map(lambda x: x * MS),
    st.sampled_from([INT64_MIN, INT64_MIN + 1, INT64_MAX - 1, INT64_MAX]),
)
nows = st.one_of(
    st.integers(-25, 65),
    st.integers(-25, 65).map(lambda x: x * MS),
    st.sampled_from([INT64_MIN, INT64_MAX]),
)


class TimerHeapMachine(RuleBasedStateMachine):
    handles = Bundle("handles")

    def __init__(self):
        super().__init__()
        self.heap = TimerHeap()
        self.model = HeapModel()
        self.counter = itertools.count()
        self.seen_handles = []

    @rule(target=handles, when=whens)
    def push(self, when):
        payload = Payload(next(self.counter))
        handle = self.heap.push(when, payload)
        assert isinstance(handle, int)
        if self.seen_handles:
            assert handle > self.seen_handles[-1]
        self.seen_handles.append(handle)
        self.model.push(when, handle, payload)
        return handle

    @rule(target=handles, when=whens, n=st.integers(2, 6))
    def push_same_deadline(self, when, n):
        # A burst of equal deadlines must fire in push order.
        return multiple(*(self.push(when) for _ in range(n)))

    @rule(handle=handles)
    def cancel_known(self, handle):
        assert self.heap.cancel(handle) == self.model.cancel(handle)

    @rule(handle=consumes(handles))
    def cancel_consumed(self, handle):
        assert self.heap.cancel(handle) == self.model.cancel(handle)

    @rule(handle=st.integers(-(2**70), 2**70))
    def cancel_random(self, handle):
        assert self.heap.cancel(handle) == self.model.cancel(handle)

    @rule(handle=handles, when=whens)
    def reschedule(self, handle, when):
        assert self.heap.reschedule(handle, when) == self.model.reschedule(handle, when)

    @rule(now=nows)
    def pop_expired(self, now):
        got = self.heap.pop_expired(now)
        want = self.model.pop_expired(now)
        assert got == want
        for (_, _, p1), (_, _, p2) in zip(got, want):
            assert p1 is p2

    @rule()
    def pop_all(self):
        assert self.heap.pop_expired(INT64_MAX) == self.model.pop_expired(INT64_MAX)
        assert len(self.heap) == 0

    @rule(now=nows, max_ms=st.sampled_from([-1, -5, 0, 1, 7, 1000, INT_MAX]))
    def timeout_ms(self, now, max_ms):
        first = self.model.peek()
        want = expected_timeout_ms(first and first[0], now, max_ms)
        assert self.heap.timeout_ms(now, max_ms) == want
        if max_ms == -1:
            assert self.heap.timeout_ms(now) == want

    @invariant()
    def same_peek_and_len(self):
        assert self.heap.peek() == self.model.peek()
        assert len(self.heap) == len(self.model)
        assert bool(self.heap) == (len(self.model) > 0)

    @invariant()
    def structure_ok(self):
        self.heap.check_invariants()


TimerHeapMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTimerHeapStateful = TimerHeapMachine.TestCase


# ------------------------------------------------------------- bulk order


def test_10000_timers_pop_in_sorted_order():
    rng = random.Random(1234)
    heap = TimerHeap()
    # Few distinct deadlines among many timers: lots of ties to keep FIFO.
    whens = [rng.randrange(-5000, 5000) for _ in range(10_000)]
    pushed = []
    for w in whens:
        pushed.append((w, heap.push(w, w)))
    heap.check_invariants()
    assert len(heap) == 10_000
    # Handles increase with push order, so (when, handle) is the firing order.
    want = sorted(pushed)
    got = heap.pop_expired(INT64_MAX)
    assert [(w, h) for w, h, _ in got] == want
    assert all(p == w for w, _, p in got)
    assert len(heap) == 0 and heap.peek() is None
    heap.check_invariants()


def test_10000_timers_cancel_half_rest_in_order():
    rng = random.Random(99)
    heap = TimerHeap()
    pushed = [(w, heap.push(w, None)) for w in (rng.randrange(10**9) for _ in range(10_000))]
    victims = rng.sample(pushed, 5_000)
    for i, (_, h) in enumerate(victims):
        assert heap.cancel(h) is True
        if i % 500 == 0:
            heap.check_invariants()
    for _, h in victims[:100]:
        assert heap.cancel(h) is False
    heap.check_invariants()
    assert len(heap) == 5_000
    rest = sorted(set(pushed) - set(victims))
    # Pop incrementally, in slices of time, and check nothing early or late.
    got = []
    for now in range(0, 10**9 + 10**8, 10**8):
        batch = heap.pop_expired(now)
        assert all(w <= now for w, _, _ in batch)
        if heap.peek() is not None:
            assert heap.peek()[0] > now
        got.extend((w, h) for w, h, _ in batch)
    assert got == rest
    assert len(heap) == 0


def test_interleaved_push_pop_matches_sorted():
    rng = random.Random(7)
    heap = TimerHeap()
    model = HeapModel()
    now = 0
    for step in range(20_000):
        r = rng.random()
        if r < 0.55:
            w = now + rng.randrange(0, 1000)
            p = object()
            model.push(w, heap.push(w, p), p)
        elif r < 0.75 and model.live:
            h = rng.choice(list(model.live))
            assert heap.cancel(h) is model.cancel(h)
        else:
            now += rng.randrange(0, 50)
            assert heap.pop_expired(now) == model.pop_expired(now)
        if step % 1000 == 0:
            heap.check_invariants()
    assert heap.pop_expired(INT64_MAX) == model.pop_expired(INT64_MAX)


# ------------------------------------------- sift paths at the boundaries


def build(whens):
    """Push in this order; ascending-per-level input yields a known layout."""
    heap = TimerHeap()
    handles = {w: heap.push(w, w) for w in whens}
    heap.check_invariants()
    return heap, handles


# Layout for this push order (4-ary, children of i at 4i+1..4i+4):
#   slot 0: 0 | slots 1-4: 500 10 20 30 | slots 5-8 (under 500): 510 520 530 540
#   slots 9-12 (under 10): 11 12 13 14 | slot 13 (under 20): 21
LAYOUT = [0, 500, 10, 20, 30, 510, 520, 530, 540, 11, 12, 13, 14, 21]


@pytest.mark.parametrize(
    "victim, path",
    [
        (21, "last element"),
        (0, "root"),
        (510, "middle, replacement sifts up"),
        (10, "middle, replacement sifts down"),
        (500, "middle, replacement stays"),
        (14, "leaf, replacement stays"),
    ],
)
def test_remove_boundaries(victim, path):
    heap, handles = build(LAYOUT)
    assert heap.cancel(handles[victim]) is True, path
    heap.check_invariants()
    assert heap.cancel(handles[victim]) is False
    rest = sorted(w for w in LAYOUT if w != victim)
    assert [w for w, _, _ in heap.pop_expired(INT64_MAX)] == rest


def test_remove_every_position_of_every_size():
    # For each heap size and each slot, removal must leave a valid heap.
    for n in range(1, 40):
        for k in range(n):
            heap = TimerHeap()
            hs = [heap.push(w, None) for w in range(n)]  # slot i holds when i
            assert heap.cancel(hs[k])
            heap.check_invariants()
            assert [w for w, _, _ in heap.pop_expired(INT64_MAX)] == [w for w in range(n) if w != k]


def test_pop_until_empty_and_reuse():
    heap, _ = build(LAYOUT)
    for w in sorted(LAYOUT):
        assert heap.peek()[0] == w
        [(got, _, payload)] = heap.pop_expired(w)
        assert got == w and payload == w
        heap.check_invariants()
    assert heap.peek() is None and heap.pop_expired(INT64_MAX) == []
    h = heap.push(3, "again")
    assert heap.pop_expired(3) == [(3, h, "again")]


def test_fifo_ties_and_reschedule():
    heap = TimerHeap()
    a = heap.push(5, "a")
    b = heap.push(5, "b")
    c = heap.push(5, "c")
    assert heap.peek() == (5, a)
    # Re-arming to the same deadline sends it behind the others.
    assert heap.reschedule(a, 5) is True
    heap.check_invariants()
    assert heap.peek() == (5, b)
    assert heap.reschedule(c, 1) is True
    assert heap.peek() == (1, c)
    assert heap.reschedule(12345, 1) is False
    assert heap.pop_expired(5) == [(1, c, "c"), (5, b, "b"), (5, a, "a")]
    assert heap.reschedule(a, 1) is False


def test_handles_are_distinct_and_increasing():
    heap = TimerHeap()
    hs = [heap.push(0, None) for _ in range(100)]
    heap.pop_expired(0)
    hs += [heap.push(0, None) for _ in range(100)]
    assert hs == sorted(set(hs))


# ------------------------------------------------------------ timeout_ms


def test_timeout_ms_rounds_up():
    heap = TimerHeap()
    now = 10**12
    heap.push(now + 1, None)
    assert heap.timeout_ms(now) == 1
    assert heap.timeout_ms(now, 100) == 1
    assert heap.timeout_ms(now, 0) == 0  # the cap wins
    heap.pop_expired(INT64_MAX)
    for delta, want in [(MS - 1, 1), (MS, 1), (MS + 1, 2), (2 * MS, 2), (1500 * MS, 1500)]:
        h = heap.push(now + delta, None)
        assert heap.timeout_ms(now) == want, delta
        heap.cancel(h)


def test_timeout_ms_due_and_empty():
    heap = TimerHeap()
    assert heap.timeout_ms(0) == -1
    assert heap.timeout_ms(0, -1) == -1
    assert heap.timeout_ms(0, -100) == -1
    assert heap.timeout_ms(0, 0) == 0
    assert heap.timeout_ms(0, 250) == 250
    heap.push(100, None)
    assert heap.timeout_ms(100) == 0
    assert heap.timeout_ms(101, 50) == 0
    assert heap.timeout_ms(INT64_MAX) == 0
    assert heap.timeout_ms(99, 50) == 1


def test_timeout_ms_extremes_do_not_overflow():
    heap = TimerHeap()
    heap.push(INT64_MAX, None)
    assert heap.timeout_ms(INT64_MIN) == INT_MAX
    assert heap.timeout_ms(INT64_MIN, 5) == 5
    assert heap.timeout_ms(INT64_MAX - 1) == 1
    assert heap.timeout_ms(0, INT_MAX) == INT_MAX


@given(first=st.integers(INT64_MIN, INT64_MAX), now=st.integers(INT64_MIN, INT64_MAX),
       max_ms=st.integers(-(2**31), INT_MAX))
def test_timeout_ms_matches_spec(first, now, max_ms):
    heap = TimerHeap()
    heap.push(first, None)
    assert heap.timeout_ms(now, max_ms) == expected_timeout_ms(first, now, max_ms)


def test_timeout_ms_never_wakes_early():
    # A poll of timeout_ms() milliseconds ends at or after the deadline.
    rng = random.Random(5)
    for _ in range(2000):
        now = rng.randrange(-(10**15), 10**15)
        when = now + rng.randrange(1, 10**10)
        heap = TimerHeap()
        heap.push(when, None)
        ms = heap.timeout_ms(now)
        assert now + ms * MS >= when
        assert now + (ms - 1) * MS < when  # and not a millisecond more


# --------------------------------------------------------------- garbage


def test_garbage_arguments():
    heap = TimerHeap()
    with pytest.raises(TypeError):
        heap.push("5", None)
    with pytest.raises(TypeError):
        heap.push(1.5, None)
    with pytest.raises(TypeError):
        heap.push(None, None)
    with pytest.raises(TypeError):
        heap.cancel("x")
    with pytest.raises(TypeError):
        heap.cancel(1.0)
    with pytest.raises(TypeError):
        heap.cancel(None)
    with pytest.raises(TypeError):
        heap.pop_expired("now")
    with pytest.raises(TypeError):
        heap.timeout_ms(0, 1.5)
    with pytest.raises(TypeError):
        heap.reschedule("x", 0)
    assert heap.cancel(-5) is False
    assert heap.cancel(0) is False
    assert heap.cancel(2**200) is False
    assert heap.cancel(-(2**200)) is False
    for huge in (2**63, -(2**63) - 1, 2**200):
        with pytest.raises((OverflowError, TypeError)):
            heap.push(huge, None)
        with pytest.raises((OverflowError, TypeError)):
            heap.pop_expired(huge)
        with pytest.raises((OverflowError, TypeError)):
            heap.timeout_ms(huge)
    with pytest.raises((OverflowError, TypeError)):
        heap.timeout_ms(0, 2**31)
    # Nothing half-done by the failed calls.
    assert len(heap) == 0
    heap.check_invariants()
    h = heap.push(1, "ok")
    assert heap.cancel(h - 1) is False and heap.cancel(h + 1) is False
    assert heap.pop_expired(1) == [(1, h, "ok")]


def test_payload_lifetime():
    class Tracked:
        alive = 0

        def __init__(self):
            Tracked.alive += 1

        def __del__(self):
            Tracked.alive -= 1

    heap = TimerHeap()
    h1 = heap.push(1, Tracked())
    heap.push(2, Tracked())
    heap.push(3, Tracked())
    gc.collect()
    assert Tracked.alive == 3  # the heap keeps payloads alive
    assert heap.cancel(h1)
    assert Tracked.alive == 2
    fired = heap.pop_expired(2)
    assert Tracked.alive == 1 + len(fired)
    del fired
    assert Tracked.alive == 1
    del heap  # frees the pending timer and its payload
    gc.collect()
    assert Tracked.alive == 0


def test_reentrant_payload_finalizer():
    # A payload whose finalizer uses the heap while cancel drops it.
    heap = TimerHeap()
    log = []

    class Reenter:
        def __del__(self):
            log.append(heap.push(50, "from __del__"))
            heap.check_invariants()

    h = heap.push(10, Reenter())
    other = heap.push(20, "x")
    assert heap.cancel(h) is True
    assert len(log) == 1
    heap.check_invariants()
    assert heap.pop_expired(100) == [(20, other, "x"), (50, log[0], "from __del__")]


def test_cycle_through_payload_is_collected():
    heap = TimerHeap()

    class Holder:
        pass

    holder = Holder()
    holder.heap = heap
    heap.push(1, holder)
    heap.push(2, [holder, heap])
    del heap, holder
    gc.collect()  # must neither crash nor leave the heap half-cleared and used


def test_no_leak_of_timer_structs():
    # PyMem_RawMalloc is traced by tracemalloc, so leaked timers (or arrays)
    # would show up as growth proportional to the number of timers.
    def churn():
        heap = TimerHeap()
        hs = [heap.push(i % 97, None) for i in range(20_000)]
        for h in hs[::3]:
            heap.cancel(h)
        heap.pop_expired(50)
        heap.check_invariants()
        # The rest are freed with the heap.

    churn()  # warm up caches and free lists
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            churn()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown  # 100,000 leaked timers would be megabytes


# ------------------------------------------------------------ C API, misc


def test_c_api_selftest():
    _selftest_c_api()


def test_monotonic_ns():
    a = monotonic_ns()
    b = monotonic_ns()
    assert isinstance(a, int) and 0 <= a <= b


def test_check_invariants_passes_on_fresh_heap():
    heap = TimerHeap()
    heap.check_invariants()
    assert len(heap) == 0 and heap.peek() is None and heap.pop_expired(INT64_MAX) == []


def test_timer_module_ships_only_the_heap():
    # The Python wrapper and the self-test are test scaffolding: they live in
    # netpoll._core.testing, and the core's timer module exposes nothing.
    from netpoll._core import timer
    names = sorted(n for n in vars(timer) if not (n.startswith("__") and n.endswith("__")))
    assert names == [], names
