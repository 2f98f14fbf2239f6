"""The 4-ary timer heap vs heapq (pytest-benchmark).

    python -m pytest bench/bench_timer.py -q --benchmark-only

Workloads (10,000 timers with random deadlines):
  schedule-fire: push all, then pop them all as expired.
  schedule-cancel: push all, cancel every other one by handle, pop the rest.
heapq has no cancel by handle: its usual stand-in (mark cancelled entries and
skip them at pop) is what the second workload compares against.

The Python wrapper's per-call cost dominates both columns; the poller uses the
same heap from C without the GIL (timer_heap_push/remove/pop_expired).
"""
import heapq
import random

import pytest

from netpoll._core.testing import TimerHeap

N = 10_000
DEADLINES = [random.Random(1).randrange(1, 10**12) for _ in range(N)]


def heap_fire():
    h = TimerHeap()
    for i, when in enumerate(DEADLINES):
        h.push(when, i)
    fired = h.pop_expired(10**12)
    assert len(fired) == N


def heapq_fire():
    h = []
    for i, when in enumerate(DEADLINES):
        heapq.heappush(h, (when, i, i))
    fired = [heapq.heappop(h) for _ in range(len(h))]
    assert len(fired) == N


def heap_cancel():
    h = TimerHeap()
    handles = [h.push(when, i) for i, when in enumerate(DEADLINES)]
    for handle in handles[::2]:
        h.cancel(handle)
    assert len(h.pop_expired(10**12)) == N // 2


def heapq_cancel():
    h = []
    entries = []
    for i, when in enumerate(DEADLINES):
        e = [when, i, True]
        entries.append(e)
        heapq.heappush(h, e)
    for e in entries[::2]:
        e[2] = False
    fired = 0
    while h:
        if heapq.heappop(h)[2]:
            fired += 1
    assert fired == N // 2


@pytest.mark.parametrize("impl", [heap_fire, heapq_fire], ids=["TimerHeap", "heapq"])
def test_schedule_fire(benchmark, impl):
    benchmark.group = "schedule-fire 10k"
    benchmark(impl)


@pytest.mark.parametrize("impl", [heap_cancel, heapq_cancel], ids=["TimerHeap", "heapq"])
def test_schedule_cancel(benchmark, impl):
    benchmark.group = "schedule-cancel 10k"
    benchmark(impl)
