"""Free-threaded CPython: importing netpoll leaves the GIL off, and Python
handlers on two pollers (inline runner) or two pool workers really run at the
same moment.

Overlap is detected with shared counters, not timing: each handler counts
itself in, spins on pure-Python work until it has seen the other one inside
and the other has seen it (a two-party rendezvous), or an iteration bound
passes. The scenario sets a switch interval far longer than the scenario, so
that with a GIL the spinning handler never hands it over and the rendezvous
cannot happen by interleaving: only parallel execution passes.

Each scenario runs in a subprocess (num_loops and the pool size are per
process, and a hang is bounded by the subprocess timeout).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

needs_free_threading = pytest.mark.skipif(
    not FREE_THREADED,
    reason="needs a free-threaded CPython build (python3.13t, e.g. from .ci/build-ft-python); "
           "with the GIL, Python handlers cannot run in parallel",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, *args: str, env: dict | None = None, timeout: float = 90.0) -> dict:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"scenario failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_free_threading
def test_import_leaves_the_gil_off() -> None:
    # PYTHON_GIL unset: the modules' Py_mod_gil declarations decide. One module
    # without freethreading_compatible turns the GIL back on at import.
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    out = _run(textwrap.dedent("""
        import json, sys
        before = sys._is_gil_enabled()
        import netpoll
        import netpoll._core.connection, netpoll._core.linkbuffer, netpoll._core.poller
        import netpoll._core.reactor, netpoll._core.runner, netpoll._core.server
        import netpoll._core.timer, netpoll._core.testing
        from netpoll.config import runtime
        print(json.dumps({"before": before, "after": sys._is_gil_enabled(),
                          "num_loops": runtime().num_loops,
                          "cpus": len(__import__("os").sched_getaffinity(0))}))
    """), env=env)
    assert out["before"] is False
    assert out["after"] is False, "importing netpoll turned the GIL on"
    # The default follows the cores the process may run on when the GIL is off.
    assert out["num_loops"] == out["cpus"]


SCENARIO = textwrap.dedent(r"""
    import json, socket, sys, threading
    import netpoll

    RUNNER = sys.argv[1]
    BOUND = int(sys.argv[2])
    # With a GIL a thread running pure Python keeps it for a whole switch
    # interval: make that longer than the scenario, so that the two handlers
    # can only meet if they run in parallel.
    sys.setswitchinterval(1000.0)
    if RUNNER == "inline":
        netpoll.configure(num_loops=2, runner="inline")   # round robin: one per poller
    else:
        netpoll.configure(num_loops=1, runner="pool", pool_size=2)

    lock = threading.Lock()
    state = {"inside": 0, "met": 0}
    threads = set()
    results = []

    def on_request(ctx, conn):
        conn.reader.skip(len(conn.reader))
        with lock:
            state["inside"] += 1
            threads.add(threading.get_ident())
        counted = False
        i = 0
        while i < BOUND:
            if not counted and state["inside"] >= 2:     # the other one is inside too
                with lock:
                    state["met"] += 1
                counted = True
            if counted and state["met"] >= 2:            # ...and it has seen this one
                break
            i += 1
            sum(range(32))                               # pure-Python work
        met = counted and state["met"] >= 2
        with lock:
            state["inside"] -= 1
            results.append((met, i))
        conn.writer.write_binary(b"1" if met else b"0")
        conn.writer.flush()

    loop = netpoll.EventLoop(on_request)
    listener = netpoll.create_listener("tcp", ("127.0.0.1", 0))
    server = threading.Thread(target=loop.serve, args=(listener,), daemon=True)
    server.start()
    clients = [socket.create_connection(listener.addr, timeout=60) for _ in range(2)]
    for _ in range(6000):                     # both registered before either sends
        if loop.connections == 2:
            break
        threading.Event().wait(0.005)
    for c in clients:
        c.sendall(b"x")
    replies = [c.recv(1) for c in clients]
    for c in clients:
        c.close()
    loop.shutdown(5.0)
    print(json.dumps({"replies": [r.decode() for r in replies], "threads": len(threads),
                      "results": results, "gil": sys._is_gil_enabled()}))
""")

# Enough pure-Python turns to take seconds when the handlers are serialised:
# the rendezvous needs microseconds when they are not.
BOUND = "3000000"


@needs_free_threading
@pytest.mark.parametrize("runner", ["inline", "pool"])
def test_two_handlers_run_python_in_parallel(runner: str) -> None:
    out = _run(SCENARIO, runner, BOUND)
    assert out["threads"] == 2, f"both handlers ran on one thread: {out}"
    assert out["replies"] == ["1", "1"], (
        f"the two {runner} handlers were never inside Python at the same moment "
        f"(GIL enabled: {out['gil']}): {out}")


LIFETIME = textwrap.dedent(r"""
    import json, socket, threading
    import netpoll
    from netpoll.config import runtime

    netpoll.configure(num_loops=1, pool_size=1)
    block = threading.Event()
    blocking = threading.Event()
    conns = {}

    def on_prepare(conn):
        conns[conn.remote_addr[1]] = conn

    def pool_handler(ctx, conn):
        data = conn.reader.next(len(conn.reader))
        if data == b"block":
            blocking.set()
            block.wait(30)          # the pool's only worker is busy
        conn.writer.write_binary(data)
        conn.writer.flush()

    def inline_handler(ctx, conn):
        conn.writer.write_binary(conn.reader.next(len(conn.reader)))
        conn.writer.flush()

    pool_loop = netpoll.EventLoop(pool_handler, on_prepare=on_prepare, runner="pool")
    inline_loop = netpoll.EventLoop(inline_handler, runner="inline")
    lp = netpoll.create_listener("tcp", ("127.0.0.1", 0))
    li = netpoll.create_listener("tcp", ("127.0.0.1", 0))
    for loop, l in ((pool_loop, lp), (inline_loop, li)):
        threading.Thread(target=loop.serve, args=(l,), daemon=True).start()
    a = socket.create_connection(lp.addr, timeout=30)
    b = socket.create_connection(lp.addr, timeout=30)
    a.sendall(b"block")
    assert blocking.wait(30)
    b.sendall(b"queued")            # a pool task for B waits behind A
    while runtime().pool.pending() < 1:
        threading.Event().wait(0.001)
    conn_b = conns[b.getsockname()[1]]
    poller = runtime().pollers[0]
    conn_b.close()                  # teardown on the poller while B's task is queued
    b.settimeout(30)
    assert b.recv(1) == b""         # the poller closed B's fd...
    c = socket.create_connection(li.addr, timeout=30)
    c.sendall(b"sync")
    assert c.recv(4) == b"sync"     # ...and finished the GIL phase that tore it down
    kept = conn_b in poller.operators()
    block.set()
    assert a.recv(5) == b"block"
    forgotten = False
    for _ in range(6000):           # the queued task runs, then forgets B
        if conn_b not in poller.operators():
            forgotten = True
            break
        threading.Event().wait(0.005)
    for s in (a, b, c):
        s.close()
    pool_loop.shutdown(5.0)
    inline_loop.shutdown(5.0)
    print(json.dumps({"kept": kept, "forgotten": forgotten}))
""")


def test_registry_keeps_a_connection_while_a_pool_task_for_it_is_queued() -> None:
    # The pool worker turns the operator's borrowed pyobj into a reference: the
    # owner must stay referenced (by its poller's registry) until no queued
    # task can read it, even when the teardown ran first. Without the GIL the
    # owner could otherwise be freed by another thread between read and INCREF.
    out = _run(LIFETIME)
    assert out["kept"], "the teardown dropped the registry's reference with a pool task queued"
    assert out["forgotten"], "the connection stayed registered after its last task"
