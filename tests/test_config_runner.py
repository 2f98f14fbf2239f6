"""Global configuration checks and the callable runner (Netpoll's Config.Runner)."""
import socket
import threading

import pytest

import netpoll
from netpoll._core.runner import WorkerPool


def test_set_num_loops_rejects_bad_values():
    with pytest.raises(ValueError):
        netpoll.set_num_loops(0)
    with pytest.raises(ValueError):
        netpoll.set_num_loops(-3)
    with pytest.raises(TypeError):
        netpoll.set_num_loops("2")
    with pytest.raises(TypeError):
        netpoll.set_num_loops(True)


def test_configure_rejects_bad_values():
    with pytest.raises(TypeError):
        netpoll.set_load_balance("random")
    with pytest.raises(ValueError):
        netpoll.configure(buffer_size=0)
    with pytest.raises(ValueError):
        netpoll.configure(runner="threads")
    with pytest.raises(ValueError):
        netpoll.EventLoop(lambda ctx, conn: None, runner="threads")
    with pytest.raises(TypeError):
        netpoll.EventLoop(None)
    with pytest.raises(ValueError):
        netpoll.EventLoop(lambda ctx, conn: None, read_timeout=-1)
    netpoll.set_load_balance(netpoll.LoadBalance.RANDOM)
    netpoll.set_load_balance(netpoll.LoadBalance.ROUND_ROBIN)


def test_worker_pool_rejects_bad_sizes():
    with pytest.raises(ValueError):
        WorkerPool(0)
    with pytest.raises(TypeError):
        WorkerPool("4")


def test_stats_reports_pollers_and_buffers():
    s = netpoll.stats()
    assert s["num_loops"] >= 1
    assert {"bytes_in_use", "chunks_in_use"} <= set(s["buffers"])


@pytest.mark.timeout(30)
def test_callable_runner_receives_every_task_and_runs_it():
    tasks_seen = []
    tasks_run = []
    task_threads = []
    handler_threads = set()

    def runner(task):
        # A user runner: here a thread per task, to show tasks may run anywhere.
        tasks_seen.append(task)

        def run():
            task()
            tasks_run.append(task)
        t = threading.Thread(target=run)
        task_threads.append(t)
        t.start()

    def on_request(ctx, conn):
        handler_threads.add(threading.get_ident())
        data = conn.reader.next(len(conn.reader))
        conn.writer.write_binary(data)
        conn.writer.flush()

    lst = netpoll.create_listener("tcp", "127.0.0.1:0")
    loop = netpoll.EventLoop(on_request, runner=runner)
    th = threading.Thread(target=loop.serve, args=(lst,), daemon=True)
    th.start()
    try:
        with socket.create_connection(lst.addr, timeout=5) as s:
            for i in range(20):
                msg = b"msg-%d" % i
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(100)
                    assert chunk
                    got += chunk
                assert got == msg
    finally:
        loop.shutdown(5)
        th.join(5)
        for t in list(task_threads):
            t.join(5)
    # Not one task per message: a task's process() calls on_request again for
    # bytes that arrive before it returns, and without the GIL (free-threaded
    # builds) the client's next message often arrives while the task that
    # echoed the previous one is still finishing. Every task handed to the
    # runner must have run, once (with the GIL usually 21: a message each, the EOF).
    assert len(tasks_seen) >= 1
    assert all(callable(t) for t in tasks_seen)
    assert sorted(map(id, tasks_run)) == sorted(map(id, tasks_seen))
    assert threading.main_thread().ident not in handler_threads
