"""Misuse scenarios whose failure mode is a hang or a crash of the whole
process, so each runs in a subprocess with a deadline (issue 15: the suite
itself must never hang; pytest-timeout cannot fire while a thread spins on a
lock with the GIL held):

- a Connection setter that rejects its argument holds no lock afterwards
  (issue 15 item 2: set_input_limit(2**64) raised with the connection lock
  held, and the next close() froze the process);
- an EvHandler whose fd the user dup()ed and closed behind its back (issue 11
  item 6, "the same for an EvHandler"): the registration epoll keeps on the
  dup'ed file must neither reach the freed handler nor spin the poller.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(script: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE),
                                         env.get("PYTHONPATH", "")])
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the scenario hung (no exit within {timeout} s)") from e


def test_rejected_connection_setters_leave_no_lock_held():
    r = _run("""
        import netpoll
        listener = netpoll.create_listener("tcp", "127.0.0.1:0")
        loop = netpoll.EventLoop(lambda ctx, conn: None, runner="inline")
        import threading
        threading.Thread(target=loop.serve, args=(listener,), daemon=True).start()
        calls = [("set_input_limit", 2 ** 64), ("set_input_limit", -1),
                 ("set_input_limit", "1"), ("set_output_limit", 2 ** 64),
                 ("set_output_limit", -1), ("set_read_timeout", float("nan")),
                 ("set_read_timeout", 2 ** 64), ("set_write_timeout", -1),
                 ("set_idle_timeout", 2 ** 64)]
        for name, value in calls:
            conn = netpoll.dial_connection("tcp", listener.addr, timeout=2)
            try:
                getattr(conn, name)(value)
            except (ValueError, TypeError):
                pass
            else:
                raise SystemExit(f"{name}({value!r}) was accepted")
            conn.set_input_limit(1 << 20)     # takes the lock: frozen if left held
            conn.close()
        loop.shutdown(5)
        print("OK")
    """, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "OK"


def test_handler_fd_dup_and_closed_behind_its_back_no_spin_no_crash():
    r = _run("""
        import gc, os, socket, threading, time
        import netpoll
        from reactorutil import wait_until

        class Echo(netpoll.EvHandler):
            def __init__(self):
                self.closed_ev = threading.Event()
            def on_read(self):
                data = bytes(self.read())
                if data:
                    self.write(data)
                return bool(data)
            def on_close(self):
                self.closed_ev.set()

        r = netpoll.Reactor(poll_num=1)
        t = threading.Thread(target=r.run, daemon=True)
        t.start()
        peers, dups = [], []
        for i in range(20):
            a, b = socket.socketpair()
            h = Echo()
            r.add_ev_handler(h, a.detach(), netpoll.EV_IN)
            d = os.dup(h.fd())
            os.close(h.fd())            # behind the handler's back
            h.destroy()
            assert h.closed_ev.wait(5)
            del h
            gc.collect()                # the handler's operator may be freed now
            peers.append(b)
            dups.append(d)
        # The dup'ed files turn readable: a registration that outlived the
        # handler would report EPOLLIN with the freed operator's address.
        for b in peers:
            b.sendall(b"x")
        time.sleep(0.2)
        t0 = time.process_time()
        time.sleep(1.0)
        busy = time.process_time() - t0
        # The poller still serves.
        a, b = socket.socketpair()
        h = Echo()
        r.add_ev_handler(h, a.detach(), netpoll.EV_IN)
        b.settimeout(5)
        b.sendall(b"ok")
        assert b.recv(2) == b"ok"
        r.stop()
        t.join(10)
        print("BUSY", busy)
    """, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    busy = float(r.stdout.split("BUSY")[1])
    assert busy < 0.5, f"the process spun at {busy:.2f} s CPU per second: a zombie registration"
