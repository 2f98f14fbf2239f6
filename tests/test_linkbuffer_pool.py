"""The chunk pool: per-thread caches, their accounting, and pool_stats() never
holding a lock across a Python allocation."""
import gc
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from netpoll._core import linkbuffer as _lbmod

LinkBuffer = _lbmod.LinkBuffer
pool_stats = _lbmod.pool_stats
pool_trim = _lbmod.pool_trim


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def run_script(code, timeout):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)


def test_pool_stats_survives_gc_freeing_chunks():
    """Issue 15 item 1: pool_stats() built its dicts while holding the pool
    lock; a GC pass inside it could free a view whose chunk goes back to the
    pool, which takes the same (non-reentrant) lock: a hang at 100% CPU.
    Small chunks go back to the thread's cache without that lock, so every
    other round frees a chunk above the cached classes (64 KiB), which goes
    straight to the shared pool under pool_lock."""
    code = """
        import gc, time
        from netpoll._core.linkbuffer import LinkBuffer, pool_stats
        gc.set_threshold(1)
        deadline = time.monotonic() + 2.0
        rounds = 0
        while time.monotonic() < deadline:
            for i in range(20):
                n = 100_000 if i % 2 else 100    # the last one (i = 19) is big
                b = LinkBuffer()
                b.write_binary(b"x" * n)
                b.flush()
                v = b.next(n)
                b.close()
                cycle = [v]
                cycle.append(cycle)   # only the cyclic GC frees v, and with it the chunk
                del b, v, cycle
            pool_stats()
            rounds += 1
        print("done", rounds)
    """
    try:
        r = run_script(code, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("pool_stats() deadlocked with the GC freeing chunks")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("done")


def test_pool_stats_keys():
    st = pool_stats()
    for key in ("chunks_in_use", "bytes_in_use", "chunks_cached", "bytes_cached",
                "thread_chunks_cached", "thread_bytes_cached", "thread_caches",
                "direct_chunks_in_use", "direct_bytes_in_use"):
        assert isinstance(st[key], int) and st[key] >= 0, key
    for cls in st["classes"].values():
        assert set(cls) == {"in_use", "cached", "thread_cached"}
        assert min(cls.values()) >= 0


def _churn(n_bufs=40, size=8192):
    bufs = []
    for i in range(n_bufs):
        b = LinkBuffer()
        b.write_binary(bytes([i & 0xFF]) * size)
        b.flush()
        bufs.append(b)
    for b in bufs:
        assert b.read_binary(size)[:1] == bytes([bufs.index(b) & 0xFF])
        b.close()


def test_thread_cache_goes_back_to_the_shared_pool_at_thread_exit():
    gc.collect()
    base = pool_stats()
    started = threading.Event()
    finish = threading.Event()

    def worker():
        _churn()
        started.set()
        finish.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(10)
    mid = pool_stats()
    assert mid["thread_caches"] >= base["thread_caches"] + 1
    assert mid["thread_chunks_cached"] > 0
    finish.set()
    t.join(10)
    # The key destructor runs after join() returns (thread teardown): wait for it.
    assert wait_until(lambda: pool_stats()["thread_caches"] <= mid["thread_caches"] - 1)
    after = pool_stats()
    assert after["chunks_in_use"] == base["chunks_in_use"]
    assert after["chunks_cached"] >= base["chunks_cached"]


def test_chunks_allocated_and_freed_on_different_threads_are_accounted():
    gc.collect()
    base = pool_stats()["chunks_in_use"]
    views = []
    lock = threading.Lock()
    ready = threading.Barrier(2, timeout=10)

    def producer():
        for i in range(300):
            b = LinkBuffer()
            b.write_binary(b"p" * (3000 + i))
            b.flush()
            v = b.next(len(b))
            b.close()
            with lock:
                views.append(v)
        ready.wait()

    def consumer():
        ready.wait()
        with lock:
            mine = list(views)
            views.clear()
        for v in mine:
            assert v[0] == ord("p")
        del mine          # the chunks are freed on this thread

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    gc.collect()
    assert pool_stats()["chunks_in_use"] == base


def test_pool_trim_empties_the_callers_cache():
    code = """
        from netpoll._core.linkbuffer import LinkBuffer, pool_stats, pool_trim
        bufs = []
        for i in range(20):
            b = LinkBuffer()
            b.write_binary(b"x" * 8000)
            b.flush()
            bufs.append(b)
        for b in bufs:
            b.close()
        st = pool_stats()
        assert st["thread_chunks_cached"] > 0, st
        pool_trim()
        st = pool_stats()
        assert st["thread_chunks_cached"] == 0 and st["chunks_cached"] == 0, st
        print("ok")
    """
    r = run_script(code, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_no_thread_leaks_caches():
    """Many short-lived threads: every cache is handed back at exit."""
    gc.collect()
    base = pool_stats()

    def worker():
        _churn(n_bufs=4)

    for _ in range(30):
        t = threading.Thread(target=worker)
        t.start()
        t.join(10)
    assert wait_until(lambda: pool_stats()["thread_caches"] <= base["thread_caches"])
    after = pool_stats()
    assert after["chunks_in_use"] == base["chunks_in_use"]
