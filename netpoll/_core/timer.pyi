"""Type stub for netpoll._core.timer.

The module has no Python-visible API: its C API (np_timer_t, timer_heap_*) is
reachable only via ``cimport`` of timer.pxd. The tests reach the heap through
netpoll._core.testing.TimerHeap.
"""
