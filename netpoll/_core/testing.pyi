"""Type stub for netpoll._core.testing: test scaffolding for the core (not API)."""

from typing import Any, final

def monotonic_ns() -> int:
    """The CLOCK_MONOTONIC time in nanoseconds (the clock of every deadline)."""

def fail_chunk_allocs(n: int) -> None:
    """Fault injection: the next ``n`` buffer chunk allocations fail (no memory)."""

def fail_timer_pushes(n: int) -> None:
    """Fault injection: the next ``n`` timer pushes (any heap) fail with ENOMEM."""

def _selftest_c_api() -> None:
    """Exercise C-level paths TimerHeap cannot reach; AssertionError on failure."""

@final
class TimerHeap:
    """A timer heap that owns its timers: fires in (when_ns, push order) order."""

    def __init__(self) -> None: ...
    def __len__(self) -> int:
        """Number of scheduled (not yet fired or cancelled) timers."""
    def push(self, when_ns: int, payload: Any) -> int:
        """Schedule ``payload`` at ``when_ns``; returns a new, never reused handle.

        TypeError for a non-int deadline, OverflowError outside int64.
        """
    def cancel(self, handle: int) -> bool:
        """True if the timer was scheduled and is now cancelled; False for any
        other int. TypeError for a non-int."""
    def reschedule(self, handle: int, when_ns: int) -> bool:
        """Re-arm a scheduled timer at when_ns (behind timers already waiting
        for that deadline), keeping handle and payload; False if the handle
        is not scheduled."""
    def pop_expired(self, now_ns: int) -> list[tuple[int, int, Any]]:
        """Remove and return every timer with when_ns <= now_ns as
        (when_ns, handle, payload), in firing order."""
    def peek(self) -> tuple[int, int] | None:
        """(when_ns, handle) of the next timer to fire, or None if empty."""
    def timeout_ms(self, now_ns: int, max_ms: int = -1) -> int:
        """Milliseconds until the next deadline, rounded up; 0 if due; when
        empty, max_ms (or -1 if max_ms < 0). A non-negative max_ms caps it."""
    def check_invariants(self) -> None:
        """Raise AssertionError if the heap's internal structure is broken."""
