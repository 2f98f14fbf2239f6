"""Typed use of netpoll's public API, checked by ``mypy --strict`` (.ci/lint)
and executed by tests/test_typing.py so it stays valid at run time as well.

Each function below exercises one part of the surface with the annotations a
user would write; ``main()`` runs them all and returns normally.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional

import netpoll
from netpoll import Connection, LinkBuffer


def linkbuffer_roundtrip() -> bytes:
    buf: LinkBuffer = netpoll.LinkBuffer()
    n: int = buf.write_binary(b"\x00\x00\x00\x05hello")
    assert n == 9
    m: memoryview = buf.malloc(1)
    m[:] = b"!"
    buf.flush()
    size = int.from_bytes(buf.next(4), "big")
    body: LinkBuffer = buf.slice(size)
    buf.release()
    last: int = buf.read_byte()
    assert last == ord("!") and len(buf) == 0
    try:
        buf.next(1)
    except netpoll.BufferUnderflowError as e:
        assert isinstance(e, netpoll.NetpollError)
    out: bytes = body.bytes()
    buf.close()
    return out


def echo_server_and_client() -> str:
    def on_request(ctx: Any, conn: Connection) -> None:
        line: memoryview = conn.reader.until(b"\n")
        conn.writer.write_binary(line)
        conn.writer.flush()

    def on_connect(ctx: Any, conn: Connection) -> Dict[str, int]:
        return {"requests": 0}

    listener: netpoll.Listener = netpoll.create_listener("tcp", "127.0.0.1:0")
    loop = netpoll.EventLoop(on_request, on_connect=on_connect, runner="pool",
                             read_timeout=5.0, idle_timeout=60.0)
    server = threading.Thread(target=loop.serve, args=(listener,), daemon=True)
    server.start()
    conn: Connection = netpoll.dial_connection("tcp", listener.addr, timeout=2.0)
    closed: List[Connection] = []
    conn.add_close_callback(closed.append)
    conn.set_read_timeout(5.0)
    sent: int = conn.write(b"ping\n")
    assert sent == 5
    reply: str = conn.reader.read_string(5)
    assert conn.is_active() and conn.fileno() >= 0
    text = repr(conn)
    conn.close()
    assert closed == [conn]
    loop.shutdown(timeout=5.0)
    server.join(5.0)
    listener.close()
    assert reply == "ping\n"
    return text


def dialer_timeout() -> Optional[BaseException]:
    dialer = netpoll.Dialer(read_timeout=1.0, write_timeout=1.0)
    listener = netpoll.create_listener("tcp", "127.0.0.1:0")
    addr = listener.addr
    listener.close()
    try:
        dialer.dial_connection("tcp", addr, timeout=1.0).close()
    except (ConnectionError, netpoll.DialTimeoutError) as e:
        return e
    return None


class Echo(netpoll.EvHandler):
    def on_open(self) -> bool:
        reactor = self.get_reactor()
        assert reactor is not None
        reactor.add_ev_handler(self, self.fd(), netpoll.EV_IN)
        return True

    def on_read(self) -> bool:
        data: memoryview = self.read()
        if not data:
            return False
        self.write(data)
        return True

    def on_timeout(self, timer_id: int, now: float) -> bool:
        return False


class Client(netpoll.EvHandler):
    def __init__(self, done: threading.Event) -> None:
        self.done = done
        self.got = b""

    def on_open(self) -> bool:
        reactor = self.get_reactor()
        assert reactor is not None
        reactor.add_ev_handler(self, self.fd(), netpoll.EV_IN)
        self.write(b"hi")
        return True

    def on_read(self) -> bool:
        self.got += bytes(self.read())
        if self.got == b"hi":
            self.done.set()
            return False
        return True

    def on_connect_fail(self, err: BaseException) -> None:
        self.done.set()


def reactor_echo() -> bytes:
    reactor = netpoll.Reactor(poll_num=1)
    acceptor = netpoll.Acceptor(reactor, "127.0.0.1:0", Echo)
    done = threading.Event()
    client = Client(done)
    netpoll.Connector(reactor).connect(acceptor.addr, client, timeout=2.0)
    runner = threading.Thread(target=reactor.run, daemon=True)
    runner.start()
    assert done.wait(5.0)
    acceptor.close()
    reactor.stop()
    runner.join(5.0)
    return client.got


def diagnostics() -> Dict[str, Any]:
    stats: Dict[str, Any] = netpoll.stats()
    assert isinstance(netpoll.__version__, str)
    assert "LinkBuffer" in netpoll.__all__
    return stats


def main() -> None:
    assert linkbuffer_roundtrip() == b"hello"
    assert echo_server_and_client().startswith("<Connection")
    assert dialer_timeout() is not None
    assert reactor_echo() == b"hi"
    assert "pollers" in diagnostics()


if __name__ == "__main__":
    main()
